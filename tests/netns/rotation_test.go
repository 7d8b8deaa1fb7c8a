package netns

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/localapi"
)

// TestIdentityRotation rotates the hosts' identities, one after the
// other, under a UDP stream between static peers, the way an operator
// without a fleet does it: rotate, pin the staged key on the peer
// (next_public_key, reload), switch, and once pspd dropped the previous
// key, pin the new one alone. The role of the pair follows the keys, so
// it rotates until both a rotation that keeps the role and one that
// changes it have run. Not a datagram may be lost, and both hosts,
// restarted, come up under their new identities.
func TestIdentityRotation(t *testing.T) { perBackend(t, testIdentityRotation) }

func testIdentityRotation(t *testing.T, backend string) {
	ctx, p, as := upPair(t, "pir-", backend, 4*time.Minute, nil)
	identityOf := func(d *Daemon) localapi.Identity { return identityOf(ctx, t, d) }
	key := func(s string) identity.PublicKey {
		k, err := identity.ParsePublicKey(s)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	reload := func(d *Daemon, edit func(string) string) error {
		if err := d.EditConfig(edit); err != nil {
			return err
		}
		line, err := d.Reload(ctx, "configuration reloaded", "reload failed", "refused")
		if err == nil && !strings.Contains(line, "configuration reloaded") {
			err = fmt.Errorf("%s: %s", d.Host.Name, line)
		}
		return err
	}
	// rotate rotates x's identity with its peer y pinning the keys, and
	// reports whether the pair's role changed.
	rotate := func(x, y *Daemon) (bool, error) {
		old := key(x.PubKey)
		out, err := x.Ctl(ctx, "identity", "rotate", "--json")
		var v localapi.Identity
		if err == nil {
			err = json.Unmarshal([]byte(out), &v)
		}
		if err != nil {
			return false, fmt.Errorf("%s: identity rotate: %v %s", x.Host.Name, err, out)
		}
		pin := "public_key: " + x.PubKey
		if err := reload(y, func(b string) string {
			return strings.Replace(b, pin, pin+"\n    next_public_key: "+v.Next, 1)
		}); err != nil {
			return false, err
		}
		if _, err := x.Ctl(ctx, "identity", "switch"); err != nil {
			return false, err
		}
		for deadline := time.Now().Add(30 * time.Second); identityOf(x).Phase != localapi.RotationNone; time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				return false, fmt.Errorf("%s's rotation not done in 30 s: %+v\n%s", x.Host.Name, identityOf(x), x.Tail(20))
			}
		}
		if err := reload(y, func(b string) string {
			return strings.Replace(b, pin+"\n    next_public_key: "+v.Next, "public_key: "+v.Next, 1)
		}); err != nil {
			return false, err
		}
		x.PubKey = v.Next
		peer := key(y.PubKey)
		return identity.Compare(old, peer) != identity.Compare(key(v.Next), peer), nil
	}

	var kept, changed, rotations int
	const n, pps = 12000, 1000
	got, err := UDPStream(ctx, p.A.Host, p.B.Host, p.Inner[1], n, pps, func() error {
		time.Sleep(300 * time.Millisecond)
		for i := 0; i < 8 && (kept == 0 || changed == 0); i++ {
			x, y := p.A, p.B
			if i%2 == 1 {
				x, y = p.B, p.A
			}
			flipped, err := rotate(x, y)
			if err != nil {
				return err
			}
			rotations++
			if flipped {
				changed++
			} else {
				kept++
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d identity rotations (%d kept the role, %d changed it): %d of %d datagrams at %d/s", rotations, kept, changed, got, n, pps)
	if got != n {
		t.Errorf("lost %d datagrams across %d identity rotations", n-got, rotations)
	}
	if kept == 0 || changed == 0 {
		t.Logf("8 rotations did not run both role orders (kept %d, changed %d)", kept, changed)
	}
	after, err := p.WaitAssoc(ctx, as[0].Generation+1)
	if err != nil {
		t.Fatal(err)
	}
	if after[0].ID != as[0].ID {
		t.Errorf("association %s became %s across the rotations", as[0].ID, after[0].ID)
	}
	for _, d := range []*Daemon{p.A, p.B} {
		d.Kill()
		if err := d.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := p.WaitAssoc(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := EchoTCP(ctx, p.A.Host, p.B.Host, p.Inner[1], 16<<10, "pspd-rotation-canary-"); err != nil {
		t.Fatalf("after the rotations and a restart: %v", err)
	}
	for _, d := range []*Daemon{p.A, p.B} {
		if v := identityOf(d); v.PublicKey != d.PubKey || v.Phase != localapi.RotationNone {
			t.Errorf("%s restarted with %+v, want its new identity %s", d.Host.Name, v, d.PubKey)
		}
	}
}

// identityOf is what pspctl identity says of d.
func identityOf(ctx context.Context, t *testing.T, d *Daemon) localapi.Identity {
	t.Helper()
	out, err := d.Ctl(ctx, "identity", "--json")
	var v localapi.Identity
	if err == nil {
		err = json.Unmarshal([]byte(out), &v)
	}
	if err != nil {
		t.Fatalf("%s: pspctl identity: %v %s", d.Host.Name, err, out)
	}
	return v
}
