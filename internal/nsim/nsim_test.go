package nsim

import (
	"errors"
	"fmt"
	"net"
	"os"
	"testing"
	"time"

	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/internal/nstest"
)

// TestLinkedPorts creates a port in each of two namespaces, links them
// and sends a datagram across; it runs in the test VM (make vmtest) and
// skips on kernels without netdevsim.
func TestLinkedPorts(t *testing.T) {
	nsA, nsB := nstest.New(t, "pvn-nsa"), nstest.New(t, "pvn-nsb")
	var ports [2]*Port
	for i, ns := range []int{nsA, nsB} {
		p, err := New(uint32(4700+i), fmt.Sprintf("/proc/self/fd/%d", ns))
		if errors.Is(err, ErrUnsupported) {
			t.Skipf("%v: run make vmtest", err)
		}
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := p.Close(); err != nil {
				t.Error(err)
			}
		})
		ports[i] = p
		up(t, ns, p, fmt.Sprintf("192.0.2.%d/24", i+1))
	}
	if err := Link(ports[0], ports[1]); err != nil {
		t.Fatal(err)
	}
	var rx net.PacketConn
	nstest.Do(t, nsB, func() {
		var err error
		if rx, err = net.ListenPacket("udp4", "192.0.2.2:7070"); err != nil {
			t.Fatal(err)
		}
	})
	defer rx.Close()
	nstest.Do(t, nsA, func() {
		c, err := net.Dial("udp4", "192.0.2.2:7070")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write([]byte("across the link")); err != nil {
			t.Fatal(err)
		}
	})
	rx.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 64)
	n, _, err := rx.ReadFrom(buf)
	if err != nil || string(buf[:n]) != "across the link" {
		t.Fatalf("b received %q, %v", buf[:n], err)
	}
	if sas, tx, err := ports[0].ESP(); err != nil || sas != 0 || tx != 0 {
		t.Errorf("ESP() on a port without SAs = %d, %d, %v; want 0, 0", sas, tx, err)
	}
}

func TestNewNamesTheMissingNamespace(t *testing.T) {
	if _, err := os.Stat(bus + "/new_device"); err != nil {
		t.Skipf("kernel has no netdevsim (CONFIG_NETDEVSIM): run make vmtest")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root to create netdevsim devices")
	}
	_, err := New(4710, "/nonexistent/netns")
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("New into a missing namespace: %v, want an error wrapping ErrNotExist", err)
	}
	if _, err := os.Stat(bus + "/devices/netdevsim4710"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the device of a failed New is left behind: %v", err)
	}
}

// up gives p addr inside ns and brings it up.
func up(t *testing.T, ns int, p *Port, addr string) {
	t.Helper()
	h, err := vnl.NewHandleAt(netns.NsHandle(ns), unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByIndex(p.Ifindex)
	if err != nil {
		t.Fatal(err)
	}
	a, err := vnl.ParseAddr(addr)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.AddrAdd(l, a); err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
}
