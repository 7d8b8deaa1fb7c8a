package keyexchange

import (
	"testing"
	"time"

	"github.com/pspd/pspd/keyexchange/wire"
)

// TestHelloPSPVersions: a host that knows its PSP devices' versions says
// so in its Hello and the peer's session has them; one that does not say
// leaves the peer knowing that it did not, and a host that cannot tell
// right now (ok false) says nothing either.
func TestHelloPSPVersions(t *testing.T) {
	for _, tc := range []struct {
		name   string
		says   func() (wire.PSPVersions, bool)
		want   wire.PSPVersions
		wantOK bool
	}{
		{"versions", func() (wire.PSPVersions, bool) { return 0b0011, true }, 0b0011, true},
		{"none enabled", func() (wire.PSPVersions, bool) { return 0, true }, 0, true},
		{"cannot tell", func() (wire.PSPVersions, bool) { return 0b0001, false }, 0, false},
		{"no PSP", nil, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ini, resp := orderedIdentities(t)
			a, b := newNode(t, ini, nil), newNode(t, resp, nil)
			ca, cb := peerCfg(b), peerCfg(a)
			ca.PSPVersions = tc.says
			pb, err := b.ep.AddPeer(cb)
			if err != nil {
				t.Fatal(err)
			}
			pa, err := a.ep.AddPeer(ca)
			if err != nil {
				t.Fatal(err)
			}
			ctx := ctxT(t, 10*time.Second)
			if _, err := pb.WaitGeneration(ctx, 1); err != nil {
				t.Fatal(err)
			}
			if v, ok := pb.Session().PeerPSPVersions(); v != tc.want || ok != tc.wantOK {
				t.Errorf("the peer's session has PSP versions %#x (said %v), want %#x (%v)", v, ok, tc.want, tc.wantOK)
			}
			if v, ok := pa.Session().PeerPSPVersions(); ok || v != 0 {
				t.Errorf("the sender's session has PSP versions %#x (said %v) from a peer that said nothing", v, ok)
			}
		})
	}
}
