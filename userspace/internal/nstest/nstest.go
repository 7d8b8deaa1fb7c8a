// Package nstest owns the network-namespace scaffolding of the userspace
// data plane's tests: throwaway namespaces, running code inside one, and veth
// pairs between two. Everything it creates is removed by t.Cleanup.
package nstest

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// RequireRoot skips t unless the process can create network namespaces.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to create network namespaces, TUN and veth")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skipf("needs /dev/net/tun: %v", err)
	}
}

var seq atomic.Uint32

// Name returns an interface/namespace name unique to this process, with the
// "peng" prefix the userspace engine's tests own.
func Name(kind string) string {
	return fmt.Sprintf("peng%s%d-%d", kind, os.Getpid()%10000, seq.Add(1))
}

// NS is a network namespace created for one test.
type NS struct {
	h netns.NsHandle
	// Netlink is a handle that configures links inside the namespace.
	Netlink *netlink.Handle
}

// New creates an empty namespace with loopback up.
func New(t testing.TB) *NS {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatalf("get current netns: %v", err)
	}
	defer orig.Close()
	h, err := netns.New()
	if err != nil {
		t.Fatalf("new netns: %v", err)
	}
	if err := netns.Set(orig); err != nil {
		// This thread is in the wrong namespace; it must not run anything else.
		panic(fmt.Sprintf("nstest: restore netns: %v", err))
	}
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		h.Close()
		t.Fatalf("netlink handle: %v", err)
	}
	ns := &NS{h: h, Netlink: nl}
	t.Cleanup(func() { nl.Close(); h.Close() })
	lo, err := nl.LinkByName("lo")
	if err != nil {
		t.Fatalf("find lo: %v", err)
	}
	if err := nl.LinkSetUp(lo); err != nil {
		t.Fatalf("lo up: %v", err)
	}
	return ns
}

// Do runs f on an OS thread inside the namespace. Sockets and devices f
// creates stay in the namespace when used from other threads later.
func (ns *NS) Do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(ns.h); err != nil {
			errc <- err
			return
		}
		ferr := f()
		if err := netns.Set(orig); err != nil {
			// Leave the thread locked: the runtime then discards it
			// when this goroutine exits.
			errc <- fmt.Errorf("restore netns: %w", err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Veth joins a and b with a veth pair, gives each end its address and brings
// both up. It returns the two interface names.
func Veth(t testing.TB, a, b *NS, addrA, addrB netip.Prefix) (string, string) {
	t.Helper()
	na, nb := Name("a"), Name("b")
	la := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: na, Namespace: netlink.NsFd(a.h)},
		PeerName: nb, PeerNamespace: netlink.NsFd(b.h)}
	if err := netlink.LinkAdd(la); err != nil {
		t.Fatalf("add veth %s/%s: %v", na, nb, err)
	}
	// Both ends go with their namespaces; deleting one removes the pair.
	t.Cleanup(func() {
		if l, err := a.Netlink.LinkByName(na); err == nil {
			a.Netlink.LinkDel(l)
		}
	})
	Addr(t, a, na, addrA)
	Addr(t, b, nb, addrB)
	// Until the kernel's link watcher has activated a device (up to a
	// second later on a busy host), its queue discards what is sent, the
	// first ARP request included; the next one goes a second later, and a
	// burst sent meanwhile mostly dies in the unresolved-neighbour queue.
	// Its operational state turns up at the same moment.
	for _, end := range []struct {
		ns   *NS
		name string
	}{{a, na}, {b, nb}} {
		deadline := time.Now().Add(5 * time.Second)
		for {
			l, err := end.ns.Netlink.LinkByName(end.name)
			if err != nil {
				t.Fatalf("find %s: %v", end.name, err)
			}
			if l.Attrs().OperState == netlink.OperUp {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s still %v after 5 s", end.name, l.Attrs().OperState)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return na, nb
}

// Addr adds p to the link name inside ns and brings the link up.
func Addr(t testing.TB, ns *NS, name string, p netip.Prefix) {
	t.Helper()
	l, err := ns.Netlink.LinkByName(name)
	if err != nil {
		t.Fatalf("find %s: %v", name, err)
	}
	a, err := netlink.ParseAddr(p.String())
	if err != nil {
		t.Fatalf("parse %v: %v", p, err)
	}
	if err := ns.Netlink.AddrAdd(l, a); err != nil {
		t.Fatalf("add %v to %s: %v", p, name, err)
	}
	if err := ns.Netlink.LinkSetUp(l); err != nil {
		t.Fatalf("%s up: %v", name, err)
	}
}

// Route routes dst via the link name inside ns.
func Route(t testing.TB, ns *NS, name string, dst netip.Prefix) {
	t.Helper()
	l, err := ns.Netlink.LinkByName(name)
	if err != nil {
		t.Fatalf("find %s: %v", name, err)
	}
	ipn := &net.IPNet{IP: dst.Addr().AsSlice(), Mask: net.CIDRMask(dst.Bits(), dst.Addr().BitLen())}
	if err := ns.Netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: ipn}); err != nil {
		t.Fatalf("route %v dev %s: %v", dst, name, err)
	}
}
