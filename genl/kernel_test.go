package genl

// Conformance tests against the REAL kernel psp family, mirroring the
// kernel's own selftest list (tools/testing/selftests/drivers/net/psp.py,
// psp.md §2.3). They need a kernel with CONFIG_INET_PSP and netdevsim, so
// they run inside the VM (make vmtest) and skip elsewhere. Each test makes
// its own network namespaces and netdevsim devices and removes them.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pspd/pspd/internal/secret"
	vnl "github.com/vishvananda/netlink"
	vns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const skipNoPSP = "kernel has no generic netlink family psp (CONFIG_INET_PSP): run make vmtest"

// nsimSeq numbers this binary's netdevsim devices from nsimBase, away from
// the ids other packages' VM tests use.
var nsimSeq atomic.Uint32

const nsimBase = 4200

// netns is a network namespace owned by one test.
type netns struct{ f *os.File }

func newNetns(t *testing.T) *netns {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_SYS_ADMIN) to create network namespaces")
	}
	var f *os.File
	var err error
	onThread(t, func() error { return unix.Unshare(unix.CLONE_NEWNET) }, func() {
		f, err = os.Open("/proc/thread-self/ns/net")
	})
	if err != nil {
		t.Fatalf("open new netns: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	return &netns{f: f}
}

// do runs fn on a thread inside the namespace; sockets fn opens and
// processes it starts live there.
func (n *netns) do(t *testing.T, fn func()) {
	t.Helper()
	onThread(t, func() error { return unix.Setns(int(n.f.Fd()), unix.CLONE_NEWNET) }, fn)
}

// onThread runs fn on a locked thread whose network namespace enter has
// changed, then puts the thread back in its original namespace.
func onThread(t *testing.T, enter func() error, fn func()) {
	t.Helper()
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("open current netns: %v", err)
	}
	defer orig.Close()
	if err := enter(); err != nil {
		runtime.UnlockOSThread()
		t.Fatalf("enter netns: %v", err)
	}
	defer func() {
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// The thread stays locked and dies with this goroutine.
			t.Fatalf("return to the original netns: %v", err)
		}
		runtime.UnlockOSThread()
	}()
	fn()
}

func (n *netns) ip(t *testing.T, args ...string) {
	t.Helper()
	ip := os.Getenv("PSPD_VM_IP")
	if ip == "" {
		ip = "ip"
	}
	n.do(t, func() {
		if out, err := exec.Command(ip, args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
	})
}

// port is one netdevsim port with its PSP device.
type port struct {
	ns      *netns
	nsim    uint32
	ifindex int
	ifname  string
	psp     *Client // a client in the port's namespace
	dev     Device
}

// pspClient dials the psp family in ns, skipping if the kernel has none.
func pspClient(t *testing.T, ns *netns) *Client {
	t.Helper()
	c, err := Dial(Config{NetNS: int(ns.f.Fd())})
	if errors.Is(err, ErrNoFamily) {
		t.Skip(skipNoPSP)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// newPort creates a netdevsim device with one port in ns, brings it up
// with addr, and finds its PSP device.
func newPort(t *testing.T, ns *netns, addr string) *port {
	t.Helper()
	c := pspClient(t, ns) // skips before touching netdevsim on a PSP-less kernel
	if _, err := os.Stat("/sys/bus/netdevsim/new_device"); err != nil {
		t.Skipf("kernel has no netdevsim (CONFIG_NETDEVSIM): %v", err)
	}
	p := &port{ns: ns, nsim: nsimBase + nsimSeq.Add(1), psp: c}
	ns.do(t, func() {
		// netdevsim creates the port in the writer's namespace.
		if err := os.WriteFile("/sys/bus/netdevsim/new_device", fmt.Appendf(nil, "%d 1", p.nsim), 0); err != nil {
			t.Fatalf("create netdevsim%d: %v", p.nsim, err)
		}
	})
	t.Cleanup(func() {
		if err := os.WriteFile("/sys/bus/netdevsim/del_device", fmt.Append(nil, p.nsim), 0); err != nil {
			t.Errorf("delete netdevsim%d: %v", p.nsim, err)
		}
	})
	ns.do(t, func() {
		ifs, err := net.Interfaces()
		if err != nil {
			t.Fatalf("list interfaces: %v", err)
		}
		for _, ifc := range ifs {
			if ifc.Flags&net.FlagLoopback == 0 {
				p.ifindex, p.ifname = ifc.Index, ifc.Name
			}
		}
	})
	if p.ifindex == 0 {
		t.Fatalf("netdevsim%d: no port netdev in the namespace", p.nsim)
	}
	ns.ip(t, "link", "set", "lo", "up")
	ns.ip(t, "link", "set", p.ifname, "up")
	if addr != "" {
		ns.ip(t, "addr", "add", addr, "dev", p.ifname, "nodad")
	}
	p.dev = p.find(t)
	return p
}

// find returns the PSP device of the port's netdev.
func (p *port) find(t *testing.T) Device {
	t.Helper()
	devs, err := p.psp.Devices()
	if err != nil {
		t.Fatal(err)
	}
	var found []Device
	for _, d := range devs {
		if int(d.Ifindex) == p.ifindex {
			found = append(found, d)
		}
	}
	if len(found) != 1 {
		t.Fatalf("netdevsim%d (ifindex %d): %d PSP devices in %+v", p.nsim, p.ifindex, len(found), devs)
	}
	return found[0]
}

// tcpSocket opens an unconnected TCP socket (raw fd).
func tcpSocket(t *testing.T, family int) FD {
	t.Helper()
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return FD(fd)
}

// loopback returns one end of an ESTABLISHED TCP connection over lo in
// the port's namespace. Newer kernels (net-next) refuse rx-assoc and
// tx-assoc on sockets that are not ESTABLISHED, so the association tests
// use these, as psp.py does; lo has no PSP device, so the requests name
// the port's device.
func (p *port) loopback(t *testing.T, family int) *net.TCPConn {
	t.Helper()
	network, addr := "tcp4", "127.0.0.1:0"
	if family == unix.AF_INET6 {
		network, addr = "tcp6", "[::1]:0"
	}
	var c, d net.Conn
	p.ns.do(t, func() {
		l, err := net.Listen(network, addr)
		if err != nil {
			t.Fatalf("listen on lo: %v", err)
		}
		defer l.Close()
		if c, err = net.Dial(network, l.Addr().String()); err != nil {
			t.Fatalf("dial over lo: %v", err)
		}
		if d, err = l.Accept(); err != nil {
			t.Fatalf("accept over lo: %v", err)
		}
	})
	t.Cleanup(func() { c.Close(); d.Close() })
	return c.(*net.TCPConn)
}

// kernelSays checks that err keeps the kernel's extended-ack text.
func kernelSays(t *testing.T, err error, text string) {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) || e.Message != text {
		t.Fatalf("error %v: want the kernel's extack %q", err, text)
	}
}

func TestKernelDevices(t *testing.T) {
	p := newPort(t, newNetns(t), "")
	if p.dev.Cap != AllVersions {
		t.Errorf("netdevsim caps %v, want all versions", p.dev.Cap)
	}
	t.Run("list", func(t *testing.T) {
		// newPort found the device in the dump.
		if p.dev.ID == 0 {
			t.Fatal("no device id")
		}
	})
	t.Run("get", func(t *testing.T) {
		d, err := p.psp.DevGet(p.dev.ID)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(d, p.dev) {
			t.Fatalf("dev-get %+v, dump %+v", d, p.dev)
		}
	})
	t.Run("get_bad", func(t *testing.T) {
		_, err := p.psp.DevGet(1234567)
		if !errors.Is(err, ErrNoDevice) || !errors.Is(err, unix.ENODEV) {
			t.Fatalf("dev-get 1234567: %v, want ErrNoDevice/ENODEV", err)
		}
	})
	t.Run("other_netns", func(t *testing.T) {
		// A device is visible only in its netdev's namespace.
		c := pspClient(t, newNetns(t))
		if _, err := c.DevGet(p.dev.ID); !errors.Is(err, ErrNoDevice) {
			t.Fatalf("dev-get from another netns: %v, want ErrNoDevice", err)
		}
	})
}

// watch runs Watch in the background and returns its events.
func watch(t *testing.T, c *Client) <-chan Event {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	evs := make(chan Event, 64)
	done := make(chan error, 1)
	go func() { done <- c.Watch(ctx, func(ev Event) error { evs <- ev; return nil }) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Watch ended with %v", err)
		}
	})
	if ev := nextEvent(t, evs); ev.Kind != Resync {
		t.Fatalf("first event %v, want resync", ev.Kind)
	}
	return evs
}

func nextEvent(t *testing.T, evs <-chan Event) Event {
	t.Helper()
	select {
	case ev := <-evs:
		return ev
	case <-time.After(5 * time.Second):
		t.Fatal("no notification within 5s")
	}
	return Event{}
}

func TestKernelDevSet(t *testing.T) {
	p := newPort(t, newNetns(t), "")
	evs := watch(t, p.psp)
	if err := p.psp.DevSet(p.dev.ID, VersionsOf(AESGCM128, AESGCM256)); err != nil {
		t.Fatal(err)
	}
	if ev := nextEvent(t, evs); ev.Kind != DevChanged || ev.Device.ID != p.dev.ID || ev.Device.Enabled != 3 {
		t.Fatalf("after dev-set: event %+v, want dev-change with ena 0x3", ev)
	}
	d, err := p.psp.DevGet(p.dev.ID)
	if err != nil || d.Enabled != 3 {
		t.Fatalf("dev-get after dev-set: %+v, %v", d, err)
	}
	// netdevsim supports every version the kernel knows, so a mask beyond
	// the capability can only be one beyond the kernel's policy: the client
	// refuses it before sending.
	if err := p.psp.DevSet(p.dev.ID, 0x10); err == nil {
		t.Fatal("dev-set 0x10 accepted")
	}
	if d, _ := p.psp.DevGet(p.dev.ID); d.Enabled != 3 {
		t.Fatalf("rejected dev-set changed ena to %v", d.Enabled)
	}
}

func TestKernelKeyRotate(t *testing.T) {
	p := newPort(t, newNetns(t), "")
	evs := watch(t, p.psp)
	before, err := p.psp.Stats(p.dev.ID)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if err := p.psp.KeyRotate(p.dev.ID); err != nil {
			t.Fatalf("rotation %d: %v", i+1, err)
		}
		if ev := nextEvent(t, evs); ev.Kind != KeyRotated || ev.DevID != p.dev.ID {
			t.Fatalf("rotation %d: event %+v, want key-rotate for %d", i+1, ev, p.dev.ID)
		}
	}
	after, err := p.psp.Stats(p.dev.ID)
	if err != nil {
		t.Fatal(err)
	}
	if after.KeyRotations != before.KeyRotations+2 {
		t.Fatalf("key-rotations %d -> %d, want +2", before.KeyRotations, after.KeyRotations)
	}
	all, err := p.psp.AllStats()
	if err != nil || len(all) != 1 || all[0] != after {
		t.Fatalf("get-stats dump %+v (%v), want [%+v]", all, err, after)
	}
}

func TestKernelRotateSPIPhase(t *testing.T) {
	p := newPort(t, newNetns(t), "")
	r1, err := p.psp.RxAssoc(p.loopback(t, unix.AF_INET6), AESGCM128, p.dev.ID)
	if err != nil {
		t.Fatal(err)
	}
	defer r1.Key.Wipe()
	if err := p.psp.KeyRotate(p.dev.ID); err != nil {
		t.Fatal(err)
	}
	r2, err := p.psp.RxAssoc(p.loopback(t, unix.AF_INET6), AESGCM128, p.dev.ID)
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Key.Wipe()
	if r1.Key.SPI.Phase() == r2.Key.SPI.Phase() {
		t.Fatalf("SPI phase bit did not flip across a rotation: %v then %v", r1.Key.SPI, r2.Key.SPI)
	}
}

// TestKernelAssoc is psp.py's assoc_* cases on connected loopback pairs.
func TestKernelAssoc(t *testing.T) {
	p := newPort(t, newNetns(t), "")
	c, id := p.psp, p.dev.ID

	t.Run("basic", func(t *testing.T) {
		s := p.loopback(t, unix.AF_INET6)
		r, err := c.RxAssoc(s, AESGCM128, id)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Key.Wipe()
		if r.DevID != id || r.Key.SPI.KeyID() == 0 || r.Key.Key.Len() != 16 {
			t.Fatalf("rx-assoc: dev %d spi %v keylen %d", r.DevID, r.Key.SPI, r.Key.Key.Len())
		}
		if err := c.TxAssoc(s, AESGCM128, id, r.Key); err != nil {
			t.Fatal(err)
		}
		err = c.TxAssoc(s, AESGCM128, id, r.Key)
		if !errors.Is(err, ErrTxKeySet) {
			t.Fatalf("second tx-assoc: %v, want ErrTxKeySet", err)
		}
		kernelSays(t, err, "Tx key already set")
		_, err = c.RxAssoc(s, AESGCM128, id)
		if !errors.Is(err, ErrHasPSPState) {
			t.Fatalf("second rx-assoc: %v, want ErrHasPSPState", err)
		}
		kernelSays(t, err, "Socket already has PSP state")
	})
	t.Run("bad_dev", func(t *testing.T) {
		_, err := c.RxAssoc(p.loopback(t, unix.AF_INET6), AESGCM128, id+1234567)
		if !errors.Is(err, ErrNoDevice) {
			t.Fatalf("rx-assoc on dev %d: %v, want ErrNoDevice", id+1234567, err)
		}
	})
	t.Run("sk_only_unconn", func(t *testing.T) {
		// Unconnected on purpose: 7.3 asks for the dev-id it cannot
		// take from a route, net-next refuses the socket (ENOTCONN).
		_, err := c.RxAssoc(tcpSocket(t, unix.AF_INET6), AESGCM128, 0)
		if !(errors.Is(err, ErrDevRequired) && errors.Is(err, unix.EINVAL)) && !errors.Is(err, ErrNotConnected) {
			t.Fatalf("rx-assoc without dev-id on an unconnected socket: %v, want ErrDevRequired or ErrNotConnected", err)
		}
	})
	t.Run("not_tcp", func(t *testing.T) {
		fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		if _, err := c.RxAssoc(FD(fd), AESGCM128, id); !errors.Is(err, ErrNotTCP) {
			t.Fatalf("rx-assoc on UDP: %v, want ErrNotTCP", err)
		} else {
			kernelSays(t, err, "Unsupported socket family and type")
		}
	})
	t.Run("tx_without_rx", func(t *testing.T) {
		k := AssocKey{SPI: 1, Key: secret.New(make([]byte, 16))}
		err := c.TxAssoc(p.loopback(t, unix.AF_INET6), AESGCM128, id, k)
		if !errors.Is(err, ErrNoRxKey) {
			t.Fatalf("tx-assoc before rx-assoc: %v, want ErrNoRxKey", err)
		}
		kernelSays(t, err, "Socket has no Rx key")
	})
	t.Run("version_mismatch", func(t *testing.T) {
		s := p.loopback(t, unix.AF_INET6)
		r, err := c.RxAssoc(s, AESGCM128, id)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Key.Wipe()
		k := AssocKey{SPI: r.Key.SPI, Key: secret.New(make([]byte, 32))}
		err = c.TxAssoc(s, AESGCM256, id, k)
		if !errors.Is(err, ErrVersionMismatch) {
			t.Fatalf("tx-assoc v1 after rx-assoc v0: %v, want ErrVersionMismatch", err)
		}
		kernelSays(t, err, "PSP version mismatch with existing state")
	})
	t.Run("twice", func(t *testing.T) {
		// One Tx key on two sockets.
		var tx AssocKey
		for i := range 2 {
			s := p.loopback(t, unix.AF_INET)
			r, err := c.RxAssoc(s, AESGCM256, id)
			if err != nil {
				t.Fatal(err)
			}
			if i == 0 {
				tx = r.Key
			} else {
				defer r.Key.Wipe()
			}
			if err := c.TxAssoc(s, AESGCM256, id, tx); err != nil {
				t.Fatalf("socket %d: %v", i, err)
			}
		}
		tx.Wipe()
	})
}

// pair is two linked netdevsim ports in two namespaces with a TCP
// connection between them (a in ns A dialled b in ns B).
type pair struct {
	a, b      *port
	listener  net.Listener // IPv4
	listener6 net.Listener // IPv6
}

func newPair(t *testing.T) *pair {
	t.Helper()
	nsA, nsB := newNetns(t), newNetns(t)
	a := newPort(t, nsA, "192.0.2.1/24")
	b := newPort(t, nsB, "192.0.2.2/24")
	link := fmt.Sprintf("%d:%d %d:%d", nsA.f.Fd(), a.ifindex, nsB.f.Fd(), b.ifindex)
	if err := os.WriteFile("/sys/bus/netdevsim/link_device", []byte(link), 0); err != nil {
		t.Fatalf("link netdevsim ports (%s): %v", link, err)
	}
	for _, p := range []*port{a, b} {
		if err := p.psp.DevSet(p.dev.ID, p.dev.Cap); err != nil {
			t.Fatal(err)
		}
	}
	nsA.ip(t, "addr", "add", "2001:db8::1/64", "dev", a.ifname, "nodad")
	nsB.ip(t, "addr", "add", "2001:db8::2/64", "dev", b.ifname, "nodad")
	pr := &pair{a: a, b: b}
	nsB.do(t, func() {
		l, err := net.Listen("tcp4", "192.0.2.2:0")
		if err != nil {
			t.Fatal(err)
		}
		pr.listener = l
		if l, err = net.Listen("tcp6", "[2001:db8::2]:0"); err != nil {
			t.Fatal(err)
		}
		pr.listener6 = l
	})
	t.Cleanup(func() { pr.listener.Close(); pr.listener6.Close() })
	return pr
}

// connect makes a new connection a -> b over IPv4.
func (pr *pair) connect(t *testing.T) (ca, cb *net.TCPConn) {
	t.Helper()
	return pr.connectOn(t, pr.listener)
}

// connectOn makes a new connection a -> b to listener l.
func (pr *pair) connectOn(t *testing.T, l net.Listener) (ca, cb *net.TCPConn) {
	t.Helper()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			c = nil
		}
		accepted <- c
	}()
	var err error
	var c net.Conn
	pr.a.ns.do(t, func() {
		c, err = net.DialTimeout(l.Addr().Network(), l.Addr().String(), 5*time.Second)
	})
	if err != nil {
		t.Fatalf("dial across the netdevsim link: %v", err)
	}
	ca = c.(*net.TCPConn)
	t.Cleanup(func() { ca.Close() })
	cbc := <-accepted
	if cbc == nil {
		t.Fatal("accept failed")
	}
	cb = cbc.(*net.TCPConn)
	t.Cleanup(func() { cb.Close() })
	return ca, cb
}

func mss(t *testing.T, c *net.TCPConn) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var serr error
	if err := rc.Control(func(fd uintptr) { v, serr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_MAXSEG) }); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatal(serr)
	}
	return v
}

// upgrade turns both ends of a connection to PSP (v0, devices taken from
// the sockets' routes). corrupt flips byte 0 of a's Tx key, which
// netdevsim's fake crypto reads as the key generation.
func (pr *pair) upgrade(t *testing.T, ca, cb *net.TCPConn, corrupt bool) {
	t.Helper()
	pr.upgradeV(t, ca, cb, AESGCM128, corrupt)
}

// upgradeV is upgrade with version v.
func (pr *pair) upgradeV(t *testing.T, ca, cb *net.TCPConn, v Version, corrupt bool) {
	t.Helper()
	mssBefore, mssBeforeB := mss(t, ca), mss(t, cb)
	ra, err := pr.a.psp.RxAssoc(ca, v, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer ra.Key.Wipe()
	rb, err := pr.b.psp.RxAssoc(cb, v, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer rb.Key.Wipe()
	if ra.DevID != pr.a.dev.ID || rb.DevID != pr.b.dev.ID {
		t.Fatalf("rx-assoc picked devices %d/%d, want %d/%d", ra.DevID, rb.DevID, pr.a.dev.ID, pr.b.dev.ID)
	}
	if got := mss(t, ca); got != mssBefore {
		t.Fatalf("MSS changed by rx-assoc: %d -> %d", mssBefore, got)
	}
	txA := AssocKey{SPI: rb.Key.SPI, Key: rb.Key.Key.Clone()}
	defer txA.Wipe()
	if corrupt {
		txA.Key.Bytes()[0] ^= 0xff
	}
	if err := pr.a.psp.TxAssoc(ca, v, 0, txA); err != nil {
		t.Fatal(err)
	}
	if err := pr.b.psp.TxAssoc(cb, v, 0, ra.Key); err != nil {
		t.Fatal(err)
	}
	if got, gotB := mss(t, ca), mss(t, cb); got != mssBefore-40 || gotB != mssBeforeB-40 {
		t.Fatalf("MSS after tx-assoc %d and %d, want %d - 40 and %d - 40", got, gotB, mssBefore, mssBeforeB)
	}
}

// delivered sends n bytes a -> b and reports how many arrive within wait.
func delivered(t *testing.T, ca, cb *net.TCPConn, n int, wait time.Duration) int {
	t.Helper()
	if _, err := ca.Write(make([]byte, n)); err != nil {
		t.Fatalf("write: %v", err)
	}
	cb.SetReadDeadline(time.Now().Add(wait))
	got, err := io.ReadFull(cb, make([]byte, n))
	if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read: %v", err)
	}
	return got
}

func TestKernelData(t *testing.T) {
	pr := newPair(t)

	t.Run("basic_send", func(t *testing.T) {
		ca, cb := pr.connect(t)
		sa0, _ := pr.a.psp.Stats(pr.a.dev.ID)
		sb0, _ := pr.b.psp.Stats(pr.b.dev.ID)
		pr.upgrade(t, ca, cb, false)
		const n = 100 * 2000
		if got := delivered(t, ca, cb, n, 10*time.Second); got != n {
			t.Fatalf("delivered %d of %d bytes", got, n)
		}
		sa, err := pr.a.psp.Stats(pr.a.dev.ID)
		if err != nil {
			t.Fatal(err)
		}
		sb, err := pr.b.psp.Stats(pr.b.dev.ID)
		if err != nil {
			t.Fatal(err)
		}
		if sa.TxPackets <= sa0.TxPackets || sa.TxBytes < sa0.TxBytes+n || sb.RxPackets <= sb0.RxPackets || sb.RxBytes < sb0.RxBytes+n {
			t.Fatalf("PSP counters did not follow %d bytes: a %+v -> %+v, b %+v -> %+v", n, sa0, sa, sb0, sb)
		}
	})
	t.Run("bad_key", func(t *testing.T) {
		ca, cb := pr.connect(t)
		pr.upgrade(t, ca, cb, true)
		if got := delivered(t, ca, cb, 2000, time.Second); got != 0 {
			t.Fatalf("%d bytes delivered with a wrong Tx key", got)
		}
	})
	t.Run("stale_key", func(t *testing.T) {
		ca, cb := pr.connect(t)
		pr.upgrade(t, ca, cb, false)
		if got := delivered(t, ca, cb, 2000, 5*time.Second); got != 2000 {
			t.Fatalf("delivered %d of 2000 bytes before rotation", got)
		}
		// One rotation leaves the association usable...
		if err := pr.b.psp.KeyRotate(pr.b.dev.ID); err != nil {
			t.Fatal(err)
		}
		if got := delivered(t, ca, cb, 2000, 5*time.Second); got != 2000 {
			t.Fatalf("delivered %d of 2000 bytes after one rotation", got)
		}
		// ...the second makes it stale.
		if err := pr.b.psp.KeyRotate(pr.b.dev.ID); err != nil {
			t.Fatal(err)
		}
		if got := delivered(t, ca, cb, 2000, time.Second); got != 0 {
			t.Fatalf("%d bytes delivered on a stale association", got)
		}
		if s, err := pr.b.psp.Stats(pr.b.dev.ID); err != nil || s.StaleEvents == 0 {
			t.Fatalf("stale-events not counted: %+v %v", s, err)
		}
	})
	t.Run("sk_only_conn", func(t *testing.T) {
		ca, _ := pr.connect(t)
		r, err := pr.a.psp.RxAssoc(ca, AESGCM128, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Key.Wipe()
		if r.DevID != pr.a.dev.ID {
			t.Fatalf("rx-assoc on a connected socket picked dev %d, want %d", r.DevID, pr.a.dev.ID)
		}
		if err := pr.a.psp.TxAssoc(ca, AESGCM128, 0, r.Key); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("sk_only_mismatch", func(t *testing.T) {
		ca, _ := pr.connect(t)
		_, err := pr.a.psp.RxAssoc(ca, AESGCM128, pr.a.dev.ID+1000)
		if !errors.Is(err, ErrDevMismatch) {
			t.Fatalf("rx-assoc with a foreign dev-id: %v, want ErrDevMismatch", err)
		}
		kernelSays(t, err, "Device id vs socket mismatch")
	})
	t.Run("sk_only_mismatch_tx", func(t *testing.T) {
		ca, _ := pr.connect(t)
		r, err := pr.a.psp.RxAssoc(ca, AESGCM128, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Key.Wipe()
		err = pr.a.psp.TxAssoc(ca, AESGCM128, pr.a.dev.ID+1000, r.Key)
		if !errors.Is(err, ErrDevMismatch) {
			t.Fatalf("tx-assoc with a foreign dev-id: %v, want ErrDevMismatch", err)
		}
		kernelSays(t, err, "Device id vs socket mismatch")
	})
}

// TestKernelDataVersions is psp.py's data_basic_send_v{0..3}_ip{4,6} and
// data_mss_adjust_ip{4,6}: every version over both address families, the
// MSS of both ends down by the PSP overhead, the data intact, and
// data_send_disconnect: data written just before a close all arrives,
// followed by the end of the stream.
func TestKernelDataVersions(t *testing.T) {
	pr := newPair(t)
	for _, v := range []Version{AESGCM128, AESGCM256, AESGMAC128, AESGMAC256} {
		for _, fam := range []struct {
			name string
			l    net.Listener
		}{{"ip4", pr.listener}, {"ip6", pr.listener6}} {
			t.Run(fmt.Sprintf("v%d_%s", v, fam.name), func(t *testing.T) {
				ca, cb := pr.connectOn(t, fam.l)
				sa0, _ := pr.a.psp.Stats(pr.a.dev.ID)
				pr.upgradeV(t, ca, cb, v, false)
				const n = 100 * 2000
				msg := make([]byte, n)
				for i := range msg {
					msg[i] = byte(i % 251)
				}
				go func() {
					ca.Write(msg)
					ca.Close() // data_send_disconnect
				}()
				cb.SetReadDeadline(time.Now().Add(10 * time.Second))
				got, err := io.ReadAll(cb)
				if err != nil || !bytes.Equal(got, msg) {
					t.Fatalf("read %d of %d bytes (%v), intact %v", len(got), n, err, bytes.Equal(got, msg))
				}
				if sa, _ := pr.a.psp.Stats(pr.a.dev.ID); sa.TxBytes-sa0.TxBytes < n {
					t.Fatalf("PSP tx bytes +%d, want >= %d", sa.TxBytes-sa0.TxBytes, n)
				}
			})
		}
	}
}

// TestKernelRemoval re-registers a PSP device under live associations
// (Rx only, and Rx+Tx): exactly one new device id appears, announced by
// dev-del and dev-add notifications.
func TestKernelRemoval(t *testing.T) {
	for _, tc := range []struct {
		name string
		tx   bool
	}{{"device_rx", false}, {"device_bi", true}} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPort(t, newNetns(t), "")
			s := p.loopback(t, unix.AF_INET6)
			r, err := p.psp.RxAssoc(s, AESGCM128, p.dev.ID)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Key.Wipe()
			if tc.tx {
				if err := p.psp.TxAssoc(s, AESGCM128, p.dev.ID, r.Key); err != nil {
					t.Fatal(err)
				}
			}
			evs := watch(t, p.psp)
			rereg := filepath.Join("/sys/kernel/debug/netdevsim", fmt.Sprintf("netdevsim%d", p.nsim), "ports/0/psp_rereg")
			if err := os.WriteFile(rereg, []byte("1"), 0); err != nil {
				t.Fatalf("%s: %v", rereg, err)
			}
			d := p.find(t)
			if d.ID == p.dev.ID {
				t.Fatalf("re-registered device kept id %d", d.ID)
			}
			if _, err := p.psp.DevGet(p.dev.ID); !errors.Is(err, ErrNoDevice) {
				t.Fatalf("old device id %d still answers: %v", p.dev.ID, err)
			}
			del, add := nextEvent(t, evs), nextEvent(t, evs)
			if del.Kind != DevDeleted || del.DevID != p.dev.ID || add.Kind != DevAdded || add.DevID != d.ID {
				t.Fatalf("notifications %v:%d %v:%d, want dev-del:%d dev-add:%d", del.Kind, del.DevID, add.Kind, add.DevID, p.dev.ID, d.ID)
			}
		})
	}
}

// TestKernelDevAssoc lets a veth end in another namespace use the port's
// PSP device (dev-assoc, Linux 7.3): that namespace then sees the device
// flagged by-association, with only its own associated device listed and
// no ifindex of the main netdev required, may not administer it, and
// loses it again with dev-disassoc.
func TestKernelDevAssoc(t *testing.T) {
	nsA, nsC := newNetns(t), newNetns(t)
	p := newPort(t, nsA, "")
	hA, err := vnl.NewHandleAt(vns.NsHandle(nsA.f.Fd()), unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer hA.Close()
	hC, err := vnl.NewHandleAt(vns.NsHandle(nsC.f.Fd()), unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer hC.Close()
	if err := hA.LinkAdd(&vnl.Veth{LinkAttrs: vnl.LinkAttrs{Name: "pspva"}, PeerName: "pspvc", PeerNamespace: vnl.NsFd(nsC.f.Fd())}); err != nil {
		t.Fatalf("veth: %v", err)
	}
	// Creating the veth across namespaces gave C an nsid in A already.
	id, err := hA.GetNetNsIdByFd(int(nsC.f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	if id < 0 {
		if err := hA.SetNetNsIdByFd(int(nsC.f.Fd()), 7); err != nil {
			t.Fatalf("assign nsid: %v", err)
		}
		id = 7
	}
	nsid := int32(id)
	vc, err := hC.LinkByName("pspvc")
	if err != nil {
		t.Fatal(err)
	}
	ifC := uint32(vc.Attrs().Index)
	evs := watch(t, p.psp)
	if err := p.psp.DevAssoc(p.dev.ID, ifC, nsid); err != nil {
		t.Fatal(err)
	}
	if ev := nextEvent(t, evs); ev.Kind != DevChanged || ev.DevID != p.dev.ID {
		t.Fatalf("after dev-assoc: event %+v, want dev-change", ev)
	}
	d, err := p.psp.DevGet(p.dev.ID)
	if err != nil {
		t.Fatal(err)
	}
	if d.ByAssociation || !reflect.DeepEqual(d.AssocList, []AssocDev{{Ifindex: ifC, NSID: nsid}}) {
		t.Fatalf("the device from its own namespace: %+v", d)
	}
	cC := pspClient(t, nsC)
	devs, err := cC.Devices()
	if err != nil {
		t.Fatal(err)
	}
	if len(devs) != 1 || devs[0].ID != p.dev.ID || !devs[0].ByAssociation || !reflect.DeepEqual(devs[0].AssocList, []AssocDev{{Ifindex: ifC, NSID: -1}}) {
		t.Fatalf("the device from the associated namespace: %+v", devs)
	}
	if err := cC.KeyRotate(p.dev.ID); !errors.Is(err, ErrNoDevice) {
		t.Fatalf("key-rotate from the associated namespace: %v, want ErrNoDevice (admin operations belong to the device's namespace)", err)
	}
	// psp.py's _dev_change_notify_multi_ns_netkit and
	// _key_rotation_notify_multi_ns_netkit: the device's notifications
	// reach the associated namespace as well as its own.
	evsC := watch(t, cC)
	for _, op := range []struct {
		name string
		do   func() error
		want EventKind
	}{
		{"dev-set", func() error { return p.psp.DevSet(p.dev.ID, p.dev.Cap) }, DevChanged},
		{"key-rotate", func() error { return p.psp.KeyRotate(p.dev.ID) }, KeyRotated},
	} {
		if err := op.do(); err != nil {
			t.Fatal(err)
		}
		for ns, evs := range map[string]<-chan Event{"own": evs, "associated": evsC} {
			if ev := nextEvent(t, evs); ev.Kind != op.want || ev.DevID != p.dev.ID {
				t.Fatalf("after %s, in the %s namespace: event %+v, want %v", op.name, ns, ev, op.want)
			}
		}
	}
	if err := p.psp.DevAssoc(p.dev.ID, ifC, nsid); !errors.Is(err, ErrAssociated) {
		t.Fatalf("second dev-assoc: %v, want ErrAssociated", err)
	}
	if err := p.psp.DevDisassoc(p.dev.ID, ifC, nsid); err != nil {
		t.Fatal(err)
	}
	if devs, err := cC.Devices(); err != nil || len(devs) != 0 {
		t.Fatalf("after dev-disassoc the other namespace sees %+v (%v)", devs, err)
	}
}

// setTLS puts the kernel TLS ULP on s and, if dir is TLS_TX (1) or TLS_RX
// (2), a TLS 1.2 AES-GCM-128 state in that direction (a fixed test key).
func setTLS(s *net.TCPConn, dir int) error {
	rc, err := s.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	rc.Control(func(fd uintptr) {
		if serr = unix.SetsockoptString(int(fd), unix.SOL_TCP, unix.TCP_ULP, "tls"); serr != nil || dir == 0 {
			return
		}
		// struct tls12_crypto_info_aes_gcm_128: version, cipher_type,
		// iv[8], key[16], salt[4], rec_seq[8].
		info := make([]byte, 40)
		binary.NativeEndian.PutUint16(info[0:], 0x0303) // TLS_1_2_VERSION
		binary.NativeEndian.PutUint16(info[2:], 51)     // TLS_CIPHER_AES_GCM_128
		for i := 4; i < 36; i++ {
			info[i] = byte(i)
		}
		serr = unix.SetsockoptString(int(fd), unix.SOL_TLS, dir, string(info))
	})
	return serr
}

// TestKernelTLSExclusive is psp.py's kTLS cases: a socket is either kernel
// TLS or PSP. rx-assoc on a socket with the TLS ULP (with or without a TX
// or RX state) is EINVAL "Socket has incompatible state"
// (ErrIncompatibleState); the TLS ULP on a socket with PSP state is EINVAL.
func TestKernelTLSExclusive(t *testing.T) {
	p := newPort(t, newNetns(t), "")
	c, id := p.psp, p.dev.ID
	if err := setTLS(p.loopback(t, unix.AF_INET6), 0); errors.Is(err, unix.ENOENT) {
		t.Skip("kernel has no TLS ULP (CONFIG_TLS)")
	} else if err != nil {
		t.Fatalf("TCP_ULP tls on a fresh connection: %v", err)
	}
	for _, tc := range []struct {
		name string
		dir  int
	}{{"ulp", 0}, {"tls-tx", 1}, {"tls-rx", 2}} {
		t.Run(tc.name+"-then-psp", func(t *testing.T) {
			s := p.loopback(t, unix.AF_INET6)
			if err := setTLS(s, tc.dir); err != nil {
				t.Fatalf("kTLS: %v", err)
			}
			r, err := c.RxAssoc(s, AESGCM128, id)
			t.Logf("rx-assoc on a kTLS (%s) socket: %v", tc.name, err)
			if err == nil {
				r.Key.Wipe()
				t.Fatal("rx-assoc accepted a socket with the TLS ULP")
			}
			if !errors.Is(err, ErrIncompatibleState) {
				t.Fatalf("rx-assoc on a kTLS socket: %v, want ErrIncompatibleState", err)
			}
			kernelSays(t, err, "Socket has incompatible state")
		})
	}
	t.Run("psp-then-ulp", func(t *testing.T) {
		s := p.loopback(t, unix.AF_INET6)
		r, err := c.RxAssoc(s, AESGCM128, id)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Key.Wipe()
		err = setTLS(s, 0)
		t.Logf("TCP_ULP tls after rx-assoc: %v", err)
		if !errors.Is(err, unix.EINVAL) {
			t.Fatalf("TCP_ULP tls on a socket with PSP state: %v, want EINVAL", err)
		}
	})
}
