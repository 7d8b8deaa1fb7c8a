package ping

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/pspd/pspd/internal/nstest"
)

// TestRun pings through a real kernel in a namespace of its own: its
// loopback answers over IPv4 and IPv6; an address on a veth whose other
// end has no address answers nothing (no one answers ARP for it), and
// every request times out without holding up the others.
func TestRun(t *testing.T) {
	ns := nstest.NewUp(t, "ppg")
	nstest.Do(t, ns, func() {
		d := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "v0"}, PeerName: "v1"}
		if err := netlink.LinkAdd(d); err != nil {
			t.Fatal(err)
		}
		peer, err := netlink.LinkByName("v1")
		if err == nil {
			err = netlink.LinkSetUp(peer)
		}
		if err != nil {
			t.Fatal(err)
		}
		addr, _ := netlink.ParseAddr("192.0.2.1/24")
		if err := netlink.AddrAdd(d, addr); err != nil {
			t.Fatal(err)
		}
		if err := netlink.LinkSetUp(d); err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		for _, dst := range []string{"127.0.0.1", "::1"} {
			rs, err := Run(ctx, netip.MustParseAddr(dst), Config{Count: 3, Interval: 10 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			if len(rs) != 3 {
				t.Fatalf("%s: %d replies, want 3", dst, len(rs))
			}
			for i, r := range rs {
				if r.Seq != i || r.Err != nil || r.RTT <= 0 {
					t.Errorf("%s: reply %d: %+v, want seq %d answered", dst, i, r, i)
				}
			}
		}
		start := time.Now()
		rs, err := Run(ctx, netip.MustParseAddr("192.0.2.99"), Config{Count: 2, Interval: 10 * time.Millisecond, Timeout: 200 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		for i, r := range rs {
			if !errors.Is(r.Err, ErrTimeout) {
				t.Errorf("unanswered request %d: %+v, want ErrTimeout", i, r)
			}
		}
		if took := time.Since(start); took > 2*time.Second {
			t.Errorf("two unanswered requests with a 200ms timeout took %v", took)
		}
	})
}

// TestMatch: a reply counts only with our identifier, type and token.
func TestMatch(t *testing.T) {
	tok := []byte("0123456789abcdef")
	req := request(8, 0x1234, 7, tok, 56, true)
	if checksum(req) != 0 {
		t.Fatal("request checksum does not verify")
	}
	reply := append([]byte(nil), req...)
	reply[0] = 0
	if seq, ok := match(reply, 0, 0x1234, tok); !ok || seq != 7 {
		t.Fatalf("our reply: seq %d ok %v", seq, ok)
	}
	for name, b := range map[string][]byte{
		"request":   req,
		"other id":  func() []byte { b := append([]byte(nil), reply...); b[4] ^= 1; return b }(),
		"other tok": func() []byte { b := append([]byte(nil), reply...); b[9] ^= 1; return b }(),
		"short":     reply[:12],
	} {
		if _, ok := match(b, 0, 0x1234, tok); ok {
			t.Errorf("%s matched", name)
		}
	}
}
