package backend

import (
	"context"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

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
