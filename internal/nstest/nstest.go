// Package nstest gives tests throwaway network namespaces and a way to run
// code inside one, so that sockets a test opens belong to that namespace.
package nstest

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// New creates a network namespace named prefix+<random> for one test and
// returns its fd; the namespace is deleted when the test ends. It skips
// the test when the caller is not root.
func New(t testing.TB, prefix string) int {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_SYS_ADMIN) to create network namespaces")
	}
	var rnd [4]byte
	rand.Read(rnd[:])
	name := prefix + hex.EncodeToString(rnd[:])
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	ns, err := netns.NewNamed(name)
	if serr := netns.Set(orig); serr != nil {
		t.Fatalf("return to original netns: %v", serr) // the thread stays locked and dies with the test
	}
	runtime.UnlockOSThread()
	orig.Close()
	if err != nil {
		t.Fatalf("create netns %s: %v", name, err)
	}
	t.Cleanup(func() {
		ns.Close()
		netns.DeleteNamed(name)
	})
	return int(ns)
}

// Do runs f on a thread inside the namespace nsFD; sockets f opens stay
// in that namespace.
func Do(t testing.TB, nsFD int, f func()) {
	t.Helper()
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	if err := netns.Set(netns.NsHandle(nsFD)); err != nil {
		runtime.UnlockOSThread()
		t.Fatal(err)
	}
	f()
	if err := netns.Set(orig); err != nil {
		t.Fatalf("return to original netns: %v", err) // the thread stays locked and is discarded
	}
	runtime.UnlockOSThread()
}

// NewUp is New with the namespace's loopback device up, as a host's is.
func NewUp(t testing.TB, prefix string) int {
	t.Helper()
	ns := New(t, prefix)
	Do(t, ns, func() {
		lo, err := netlink.LinkByName("lo")
		if err == nil {
			err = netlink.LinkSetUp(lo)
		}
		if err != nil {
			t.Fatalf("loopback up: %v", err)
		}
	})
	return ns
}
