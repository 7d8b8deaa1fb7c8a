package psp_test

import (
	"context"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pspd/pspd/genl"
	"github.com/pspd/pspd/internal/nsim"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/localapi/client"
)

// TestVMUpgradePeerVersion: A's pspd upgrades with AES-GCM-128 (PSP
// version 0), B's with AES-GCM-256 (version 1), so each enabled only its
// own on its device. Their Hellos say so, and each refuses its end of a
// connection before rx-assoc, naming both sides' versions; neither
// socket is touched.
func TestVMUpgradePeerVersion(t *testing.T) {
	if os.Getenv("PSPD_IN_VM") != "1" {
		t.Skip("kernel lacks PSP and netdevsim: run make vmtest (PSPD_IN_VM unset)")
	}
	a, b := newHost(t, "a", 3241, "10.98.0.1"), newHost(t, "b", 3242, "10.98.0.2")
	if err := nsim.Link(a.port, b.port); err != nil {
		t.Fatal(err)
	}
	skewKeys(t, b)
	a.startSuite(t, b, kdf.AESGCM128)
	b.startSuite(t, a, kdf.AESGCM256)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	waitSession(ctx, t, a, b)
	// pspctl peer show has what the peer said.
	for _, side := range []struct {
		h    *host
		want string
	}{{a, "hdr0-aes-gcm-256"}, {b, "hdr0-aes-gcm-128"}} {
		ps, err := client.New(side.h.sock).Peers(ctx)
		if err != nil || len(ps) != 1 || ps[0].PSP == nil || !slices.Equal(ps[0].PSP.Versions, []string{side.want}) {
			t.Errorf("%s's peer: %+v %v, want its PSP devices at %s", side.h.name, ps, err, side.want)
		}
	}
	ca, cb := dialPair(t, a, b, 7950)
	ra, rb, ea, eb := upgradeBoth(ctx, a, b, ca, cb)
	for _, side := range []struct {
		name         string
		err          error
		mine, theirs string
	}{
		{"A", ea, "hdr0-aes-gcm-128", "{hdr0-aes-gcm-256}"},
		{"B", eb, "hdr0-aes-gcm-256", "{hdr0-aes-gcm-128}"},
	} {
		if side.err == nil || !strings.Contains(side.err.Error(), "this host upgrades with "+side.mine) ||
			!strings.Contains(side.err.Error(), "the peer's PSP devices accept "+side.theirs) || !strings.Contains(side.err.Error(), "not touched") {
			t.Errorf("%s's upgrade: %v, want a refusal naming %s here and %s at the peer", side.name, side.err, side.mine, side.theirs)
		}
	}
	if ea == nil || eb == nil {
		t.Fatalf("upgrades went through: A %+v, B %+v", ra, rb)
	}
	assertUntouchedWith(t, a, ca, genl.AESGCM128)
	assertUntouchedWith(t, b, cb, genl.AESGCM256)
	if c := a.pm.Counters(); c.UpgradesRefused != 1 || c.UpgradesFailed != 0 {
		t.Errorf("A's counters %+v, want one refused upgrade", c)
	}
}
