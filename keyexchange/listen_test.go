package keyexchange

import (
	"net/netip"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestWildcardListenOneSocketPerFamily: an endpoint told to listen on
// [::] binds an IPv4 socket and an IPv6-only one, and gives each to
// Config.Control, so that a per-family socket option (the xfrm backend's
// IPsec bypass policy) covers every packet; a dual-stack socket would
// carry IPv4 peers past an IPv6 policy. Sessions come up over each
// family, IPv4 ones from the IPv4 socket.
func TestWildcardListenOneSocketPerFamily(t *testing.T) {
	for _, loop := range []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()} {
		t.Run(loop.String(), func(t *testing.T) {
			var mu sync.Mutex
			var nets []string
			mod := func(c *Config) {
				c.ListenAddr = "[::]:0"
				c.Control = func(network, address string, _ syscall.RawConn) error {
					mu.Lock()
					defer mu.Unlock()
					nets = append(nets, network)
					return nil
				}
			}
			at := func(p *PeerConfig) { p.Addr = netip.AddrPortFrom(loop, p.Addr.Port()) }
			ini, resp, pi, _ := pair(t, mod, at)
			mu.Lock()
			slices.Sort(nets)
			got := slices.Clone(nets)
			mu.Unlock()
			if want := []string{"udp4", "udp4", "udp6", "udp6"}; !slices.Equal(got, want) {
				t.Fatalf("Control saw sockets %q, want one udp4 and one udp6 per endpoint", got)
			}
			for _, n := range []*node{ini, resp} {
				if a := n.ep.Addr(); a.Addr() != netip.IPv6Unspecified() || a.Port() == 0 {
					t.Errorf("Addr = %v, want [::] with the bound port", a)
				}
			}
			if _, err := pi.WaitGeneration(ctxT(t, 10*time.Second), 1); err != nil {
				t.Fatal(err)
			}
			s := pi.Session()
			if ra, err := netip.ParseAddrPort(s.RemoteAddr().String()); err != nil || ra.Addr() != loop {
				t.Errorf("session remote address %v, want %v (not IPv4-mapped)", s.RemoteAddr(), loop)
			}
		})
	}
}
