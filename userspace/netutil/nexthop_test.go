package netutil_test

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pspd/pspd/userspace/internal/nstest"
	"github.com/pspd/pspd/userspace/netutil"
	"github.com/vishvananda/netlink"
)

func TestLookup(t *testing.T) {
	nstest.RequireRoot(t)
	a, b := nstest.New(t), nstest.New(t)
	va, vb := nstest.Veth(t, a, b, netip.MustParsePrefix("192.0.2.1/24"), netip.MustParsePrefix("192.0.2.2/24"))
	gw := netip.MustParseAddr("192.0.2.2")
	far := netip.MustParseAddr("198.51.100.7")
	if err := a.Netlink.RouteAdd(&netlink.Route{
		Dst: &net.IPNet{IP: net.IPv4(198, 51, 100, 0), Mask: net.CIDRMask(24, 32)}, Gw: gw.AsSlice(),
	}); err != nil {
		t.Fatal(err)
	}
	peerLink, err := b.Netlink.LinkByName(vb)
	if err != nil {
		t.Fatal(err)
	}
	peerMAC := peerLink.Attrs().HardwareAddr

	if _, err := netutil.Lookup(a.Netlink, gw); !errors.Is(err, netutil.ErrNoNeighbour) {
		t.Fatalf("before resolution: %v, want ErrNoNeighbour", err)
	}
	// Resolve the neighbour the way the docs say: send through the kernel.
	if err := a.Do(func() error {
		c, err := net.Dial("udp4", "192.0.2.2:9")
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte{0})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var nh netutil.NextHop
	for range 200 { // ARP over veth answers in well under 2 s
		if nh, err = netutil.Lookup(a.Netlink, gw); !errors.Is(err, netutil.ErrNoNeighbour) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	if nh.LinkName != va || !bytes.Equal(nh.MAC, peerMAC) || nh.Gateway.IsValid() ||
		nh.Src != netip.MustParseAddr("192.0.2.1") || nh.LinkMTU != 1500 || len(nh.LinkMAC) != 6 {
		t.Fatalf("on-link: %+v, want link %s, MAC %v, no gateway, src 192.0.2.1", nh, va, peerMAC)
	}
	nh, err = netutil.Lookup(a.Netlink, far)
	if err != nil {
		t.Fatal(err)
	}
	if nh.Gateway != gw || !bytes.Equal(nh.MAC, peerMAC) {
		t.Fatalf("via gateway: %+v, want gateway %v with MAC %v", nh, gw, peerMAC)
	}
	if _, err := netutil.Lookup(a.Netlink, netip.MustParseAddr("203.0.113.1")); err == nil {
		t.Fatal("no route: want an error")
	}
}
