package daemon

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/policy"
)

// TestPingTarget: a ping goes only where the peer's association carries
// it, and an ambiguous or foreign target is refused with what to do.
func TestPingTarget(t *testing.T) {
	mk := func(prefixes ...string) *peer {
		p := &peer{cfg: policy.Peer{Name: "b", Endpoint: netip.MustParseAddrPort("192.0.2.2:6082")}}
		for _, s := range prefixes {
			p.cfg.Prefixes = append(p.cfg.Prefixes, netip.MustParsePrefix(s))
		}
		return p
	}
	for _, tc := range []struct {
		name     string
		p        *peer
		to, want string
		refusal  string // in the error, if refused
	}{
		{"one host prefix", mk("10.0.0.2/32", "10.1.0.0/24"), "", "10.0.0.2", ""},
		{"transport mode", mk(), "", "192.0.2.2", ""},
		{"inside a prefix", mk("10.1.0.0/24"), "10.1.0.9", "10.1.0.9", ""},
		{"ipv6", mk("fd00::/64"), "fd00::9", "fd00::9", ""},
		{"no single address", mk("10.1.0.0/24"), "", "", "give one with --to"},
		{"two host prefixes", mk("10.0.0.2/32", "10.0.0.3/32"), "", "", "give one with --to"},
		{"outside", mk("10.1.0.0/24"), "10.2.0.1", "", "would not go through its association"},
		{"not an address", mk("10.1.0.0/24"), "b.example", "", "not an IP address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := pingTarget(tc.p, tc.to)
			if tc.refusal != "" {
				if !errors.Is(err, localapi.ErrInvalid) || !strings.Contains(err.Error(), tc.refusal) {
					t.Fatalf("got %v %v, want an ErrInvalid saying %q", got, err, tc.refusal)
				}
				return
			}
			if err != nil || got.String() != tc.want {
				t.Fatalf("got %v %v, want %s", got, err, tc.want)
			}
		})
	}
}
