package backend

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/internal/nstest"
	"github.com/pspd/pspd/userspace/codec"
)

// TestNewWithNonTUNInterface: the configured interface name is taken by
// a device that is not a TUN device (or by another pspd). New must say so
// and leave nothing behind, not panic closing a backend it never made.
func TestNewWithNonTUNInterface(t *testing.T) {
	ns := nstest.New(t, "pub")
	nstest.Do(t, ns, func() {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "pspd0"}, PeerName: "pspd0p"}); err != nil {
			t.Fatal(err)
		}
		b, err := New(context.Background(), Config{
			Interface: "pspd0", Listen: netip.MustParseAddr("127.0.0.1"), Port: 6081, Framing: codec.Geneve,
			IO: IOUDP, Logger: slog.New(slog.DiscardHandler),
		})
		if err == nil {
			b.Close()
			t.Fatal("New took an interface that is not a TUN device")
		}
		if !strings.Contains(err.Error(), "pspd0") || !strings.Contains(err.Error(), "userspace.interface") {
			t.Errorf("error %q does not name the interface and the setting to change", err)
		}
		links, _ := netlink.LinkList()
		for _, l := range links {
			if l.Type() == "tuntap" {
				t.Errorf("a TUN device %s was left behind", l.Attrs().Name)
			}
		}
	})
}

// TestIOPick: on veth, which has no zero-copy AF_XDP, io auto picks UDP
// sockets and says why; io af_xdp gets copy-mode AF_XDP and says so; io
// udp is taken as configured. The pick shows in IO and in the log.
func TestIOPick(t *testing.T) {
	ns := nstest.New(t, "pio")
	nstest.Do(t, ns, func() {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "pio0"}, PeerName: "pio1"}
		if err := netlink.LinkAdd(veth); err != nil {
			t.Fatal(err)
		}
		for _, name := range []string{"pio0", "pio1"} {
			l, err := netlink.LinkByName(name)
			if err == nil {
				err = netlink.LinkSetUp(l)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
		l, _ := netlink.LinkByName("pio0")
		if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: toIPNet(netip.MustParsePrefix("192.0.2.1/24"))}); err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct {
			io     IO
			pick   string
			reason string
		}{
			{IOAuto, "udp", "zero-copy"},
			{IOAFXDP, "af_xdp", "copy mode"},
			{IOUDP, "udp", "configured (io: udp)"},
		} {
			var log strings.Builder
			b, err := New(context.Background(), Config{
				Interface: "piot0", Listen: netip.MustParseAddr("192.0.2.1"), Port: 6081, Framing: codec.Geneve,
				IO: c.io, Logger: slog.New(slog.NewTextHandler(&log, nil)),
			})
			if c.io == IOAFXDP && errors.Is(err, unix.EAFNOSUPPORT) {
				t.Logf("kernel lacks AF_XDP sockets (CONFIG_XDP_SOCKETS): %v", err)
				continue
			}
			if err != nil {
				t.Fatalf("io %s: %v", c.io, err)
			}
			pick, reason := b.IO()
			b.Close()
			if pick != c.pick || !strings.Contains(reason, c.reason) {
				t.Errorf("io %s: picked %s because %q; want %s, a reason naming %q", c.io, pick, reason, c.pick, c.reason)
			}
			if !strings.Contains(log.String(), "underlay picked") || !strings.Contains(log.String(), "io="+pick) {
				t.Errorf("io %s: the log does not name the pick:\n%s", c.io, log.String())
			}
			t.Logf("io %s → %s: %s", c.io, pick, reason)
		}
	})
}
