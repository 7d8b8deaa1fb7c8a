package psp_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/genl"
	"github.com/pspd/pspd/internal/nstest"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/keyexchange/wire"
	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/localapi/client"
	"github.com/pspd/pspd/offload/psp"
)

// The tests in this file are the upgrade protocol's against kernel PSP in
// the VM: clear data in flight, refusals before the socket is touched,
// the connection table's cleanup, device removal and outside rotations.

// dialPair connects A's application to B's on port and returns both ends,
// not upgraded.
func dialPair(t *testing.T, a, b *host, port int) (ca, cb *net.TCPConn) {
	t.Helper()
	return dialTo(t, a, b, netip.AddrPortFrom(b.addr, uint16(port)))
}

// dialTo connects A's application to one of B's listening on dst.
func dialTo(t *testing.T, a, b *host, addr netip.AddrPort) (ca, cb *net.TCPConn) {
	t.Helper()
	dst := addr.String()
	var ln net.Listener
	var err error
	nstest.Do(t, b.ns, func() { ln, err = net.Listen("tcp", dst) })
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var c net.Conn
	nstest.Do(t, a.ns, func() { c, err = net.Dial("tcp", dst) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	d, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return c.(*net.TCPConn), d.(*net.TCPConn)
}

// pattern is n bytes that say who sent them and where they belong.
func pattern(seed byte, off, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte((off+i)%251)
	}
	return b
}

// upgradeBoth hands both ends to their pspds at once.
func upgradeBoth(ctx context.Context, a, b *host, ca, cb *net.TCPConn) (ra, rb localapi.UpgradeResult, ea, eb error) {
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); ra, ea = client.New(a.sock).UpgradePSP(ctx, ca, b.name) }()
	go func() { defer wg.Done(); rb, eb = client.New(b.sock).UpgradePSP(ctx, cb, a.name) }()
	wg.Wait()
	return
}

// TestVMUpgradeDataInFlight: both applications write clear data right
// before they hand their sockets over and keep reading meanwhile. Both
// upgrades succeed, nothing stalls, every byte arrives intact and in
// order, and what is written after the upgrade goes through PSP.
func TestVMUpgradeDataInFlight(t *testing.T) {
	a, b := pair(t, 3207, "10.84.0")
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	waitSession(ctx, t, a, b)
	for i, tc := range []struct {
		name           string
		clearA, clearB int
	}{{"from A", 1 << 20, 0}, {"from B", 0, 1 << 20}, {"both", 1 << 20, 1 << 20}} {
		t.Run(tc.name, func(t *testing.T) {
			ca, cb := dialPair(t, a, b, 7100+i)
			const after = 128 << 10
			// Each side reads everything the other sends, from the start.
			type got struct {
				b   []byte
				err error
			}
			// A slow reader: 32 KiB every 20 ms, so that clear data is
			// still queued or in flight when the upgrades start.
			read := func(c *net.TCPConn, n int) <-chan got {
				ch := make(chan got, 1)
				go func() {
					c.SetReadDeadline(time.Now().Add(60 * time.Second))
					buf := make([]byte, n)
					var err error
					for off := 0; off < n && err == nil; {
						var k int
						k, err = io.ReadFull(c, buf[off:min(n, off+32<<10)])
						off += k
						time.Sleep(20 * time.Millisecond)
					}
					ch <- got{buf, err}
				}()
				return ch
			}
			atA, atB := read(ca, tc.clearB+after), read(cb, tc.clearA+after)
			if _, err := ca.Write(pattern('a', 0, tc.clearA)); err != nil {
				t.Fatal(err)
			}
			if _, err := cb.Write(pattern('b', 0, tc.clearB)); err != nil {
				t.Fatal(err)
			}
			sa0, sb0 := pspStats(t, a), pspStats(t, b)
			start := time.Now()
			_, _, ea, eb := upgradeBoth(ctx, a, b, ca, cb)
			if ea != nil || eb != nil {
				t.Fatalf("upgrade with clear data in flight: A %v, B %v", ea, eb)
			}
			took := time.Since(start)
			if _, err := ca.Write(pattern('a', tc.clearA, after)); err != nil {
				t.Fatal(err)
			}
			if _, err := cb.Write(pattern('b', tc.clearB, after)); err != nil {
				t.Fatal(err)
			}
			ga, gb := <-atA, <-atB
			if ga.err != nil || gb.err != nil {
				t.Fatalf("the connection stalled: A read %v, B read %v", ga.err, gb.err)
			}
			if !bytes.Equal(gb.b, pattern('a', 0, tc.clearA+after)) || !bytes.Equal(ga.b, pattern('b', 0, tc.clearB+after)) {
				t.Fatal("data arrived corrupted or out of order")
			}
			// Everything written after both upgrades returned went
			// through the PSP devices.
			sa, sb := pspStats(t, a), pspStats(t, b)
			if sa.TxBytes-sa0.TxBytes < after || sb.TxBytes-sb0.TxBytes < after || sb.RxBytes-sb0.RxBytes < after {
				t.Errorf("PSP counters did not carry the data written after the upgrade: A tx +%d, B tx +%d rx +%d", sa.TxBytes-sa0.TxBytes, sb.TxBytes-sb0.TxBytes, sb.RxBytes-sb0.RxBytes)
			}
			if ca, cb := a.pm.Counters(), b.pm.Counters(); ca.UpgradesOK != uint64(i+1) || cb.UpgradesOK != uint64(i+1) {
				t.Errorf("counters A %+v, B %+v: want %d upgrades each", ca, cb, i+1)
			}
			t.Logf("upgrade with %d+%d clear bytes in flight took %v", tc.clearA, tc.clearB, took.Round(time.Millisecond))
		})
	}
}

// TestVMUpgradeUnread: B's application upgrades without reading the clear
// data A sent before: B's upgrade fails after the drain wait with an
// error that says what the application must do.
func TestVMUpgradeUnread(t *testing.T) {
	a, b := pair(t, 3209, "10.85.0")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	waitSession(ctx, t, a, b)
	ca, cb := dialPair(t, a, b, 7200)
	if _, err := ca.Write(pattern('a', 0, 16<<10)); err != nil {
		t.Fatal(err)
	}
	_, _, _, eb := upgradeBoth(ctx, a, b, ca, cb)
	if eb == nil || !strings.Contains(eb.Error(), "must keep reading") || !strings.Contains(eb.Error(), "close it") {
		t.Fatalf("B's upgrade with unread clear data: %v, want the error telling the application to read and to close the socket", eb)
	}
	if c := b.pm.Counters(); c.UpgradesFailed != 1 || c.UpgradesOK != 0 {
		t.Errorf("B's counters %+v, want one failed upgrade", c)
	}
}

// TestVMUpgradeRefused: sockets pspd must refuse before it touches them,
// each with the reason: a connection to an address that is not the named
// peer's, and one that is no longer ESTABLISHED.
func TestVMUpgradeRefused(t *testing.T) {
	a, b := pair(t, 3211, "10.86.0")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	waitSession(ctx, t, a, b)
	ca := client.New(a.sock)

	t.Run("not the peer's address", func(t *testing.T) {
		// A second address on B's port, which belongs to no peer of A's.
		nstest.Do(t, b.ns, func() {
			out, err := runIP("addr", "add", "10.86.0.3/24", "dev", b.port.Name)
			if err != nil {
				t.Fatalf("ip addr add: %v: %s", err, out)
			}
		})
		c, _ := dialTo(t, a, b, netip.MustParseAddrPort("10.86.0.3:7300"))
		_, err := ca.UpgradePSP(ctx, c, b.name)
		if err == nil || !strings.Contains(err.Error(), "neither the peer's endpoint nor in its prefixes") || !strings.Contains(err.Error(), "not touched") {
			t.Fatalf("upgrade towards b of a connection to 10.86.0.3: %v", err)
		}
		assertUntouched(t, a, c)
	})
	t.Run("not established", func(t *testing.T) {
		c, d := dialPair(t, a, b, 7301)
		d.Close() // A's end goes to CLOSE_WAIT
		time.Sleep(200 * time.Millisecond)
		_, err := ca.UpgradePSP(ctx, c, b.name)
		if err == nil || !strings.Contains(err.Error(), "CLOSE_WAIT, not an established TCP connection") {
			t.Fatalf("upgrade of a connection the peer closed: %v", err)
		}
	})
	t.Run("no PSP device on the route", func(t *testing.T) {
		// A loopback connection, with lo counted as the peer's: lo has
		// no PSP device. Called on the manager directly.
		var c, d net.Conn
		nstest.Do(t, a.ns, func() {
			l, err := net.Listen("tcp4", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			if c, err = net.Dial("tcp4", l.Addr().String()); err != nil {
				t.Fatal(err)
			}
			d, _ = l.Accept()
		})
		defer c.Close()
		defer d.Close()
		a.pm.SetPeer(b.id.Public(), b.addr, []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")})
		defer a.pm.SetPeer(b.id.Public(), b.addr, nil)
		f, err := c.(*net.TCPConn).File()
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		_, err = a.pm.Upgrade(ctx, f, b.id.Public(), psp.PeerVersions{}, func(context.Context, wire.ExplicitKey) error {
			t.Error("a key was sent for a socket that cannot be upgraded")
			return nil
		})
		if !errors.Is(err, genl.ErrNoDevice) || !strings.Contains(err.Error(), "has no PSP device") || !strings.Contains(err.Error(), "not touched") {
			t.Fatalf("upgrade over lo: %v", err)
		}
		assertUntouched(t, a, c.(*net.TCPConn))
	})
	if c := a.pm.Counters(); c.UpgradesRefused != 3 || c.UpgradesOK != 0 || c.UpgradesFailed != 0 {
		t.Errorf("A's counters %+v, want three refused upgrades", c)
	}
}

// assertUntouched checks that a refused socket still has no PSP state: a
// fresh rx-assoc on it succeeds.
func assertUntouched(t *testing.T, h *host, c *net.TCPConn) {
	t.Helper()
	assertUntouchedWith(t, h, c, genl.AESGCM128)
}

// assertUntouchedWith is assertUntouched with version v, which h's device
// must accept.
func assertUntouchedWith(t *testing.T, h *host, c *net.TCPConn, v genl.Version) {
	t.Helper()
	gc, err := genl.Dial(genl.Config{NetNS: h.ns})
	if err != nil {
		t.Fatal(err)
	}
	defer gc.Close()
	devs, _ := gc.Devices()
	if len(devs) != 1 {
		t.Fatalf("devices: %+v", devs)
	}
	r, err := gc.RxAssoc(c, v, devs[0].ID)
	if err != nil {
		t.Fatalf("the refused socket was touched: rx-assoc now: %v", err)
	}
	r.Key.Wipe()
}

func runIP(args ...string) ([]byte, error) {
	ip := os.Getenv("PSPD_VM_IP")
	if ip == "" {
		ip = "ip"
	}
	return exec.Command(ip, args...).CombinedOutput()
}

// eventLog collects the events of one daemon.
type eventLog struct {
	mu  sync.Mutex
	evs []localapi.Event
}

func collect(ctx context.Context, t *testing.T, c *client.Client) *eventLog {
	t.Helper()
	l := &eventLog{}
	ectx, stop := context.WithCancel(ctx)
	t.Cleanup(stop)
	go c.Events(ectx, func(ev localapi.Event) error {
		l.mu.Lock()
		l.evs = append(l.evs, ev)
		l.mu.Unlock()
		return nil
	})
	time.Sleep(300 * time.Millisecond) // see watchEvent
	return l
}

func (l *eventLog) kinds(kind string) []localapi.Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []localapi.Event
	for _, ev := range l.evs {
		if string(ev.Kind) == kind {
			out = append(out, ev)
		}
	}
	return out
}

// waitFor polls cond until it holds or d passes.
func waitFor(d time.Duration, cond func() bool) bool {
	for end := time.Now().Add(d); ; time.Sleep(50 * time.Millisecond) {
		if cond() {
			return true
		}
		if time.Now().After(end) {
			return false
		}
	}
}

// TestVMCloseMany upgrades 1,000 connections, closes them all, and checks
// that both pspds forget every one (the sweep) and that a rotation then
// reports none of them.
func TestVMCloseMany(t *testing.T) {
	a, b := pair(t, 3213, "10.87.0")
	ctx, cancel := context.WithTimeout(context.Background(), 240*time.Second)
	defer cancel()
	waitSession(ctx, t, a, b)
	const n, par = 1000, 16
	var ln net.Listener
	var err error
	nstest.Do(t, b.ns, func() { ln, err = net.Listen("tcp4", netip.AddrPortFrom(b.addr, 7400).String()) })
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	conns := make([][2]net.Conn, n)
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	sem := make(chan struct{}, par)
	var mu sync.Mutex // one dial+accept at a time keeps the pairs matched
	for i := range n {
		mu.Lock()
		var c net.Conn
		nstest.Do(t, a.ns, func() { c, err = net.Dial("tcp4", ln.Addr().String()) })
		if err != nil {
			t.Fatal(err)
		}
		d, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		mu.Unlock()
		conns[i] = [2]net.Conn{c, d}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			_, _, ea, eb := upgradeBoth(ctx, a, b, c.(*net.TCPConn), d.(*net.TCPConn))
			if ea != nil || eb != nil {
				errs <- fmt.Errorf("connection %d: A %v, B %v", i, ea, eb)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	upgraded := time.Since(start)
	if a.pm.Connections() != n || b.pm.Connections() != n {
		t.Fatalf("tables hold %d and %d connections, want %d", a.pm.Connections(), b.pm.Connections(), n)
	}
	// Echo on one, to be sure they carry data.
	go io.Copy(conns[0][1], conns[0][1])
	if err := echo(conns[0][0], []byte("alive"), 10*time.Second); err != nil {
		diagnose(t, a, b)
		tcpDiag(t, "A end", conns[0][0])
		tcpDiag(t, "B end", conns[0][1])
		t.Fatal(err)
	}
	evA, evB := collect(ctx, t, client.New(a.sock)), collect(ctx, t, client.New(b.sock))
	closed := time.Now()
	for _, p := range conns {
		p[0].Close()
		p[1].Close()
	}
	if !waitFor(10*time.Second, func() bool { return a.pm.Connections() == 0 && b.pm.Connections() == 0 }) {
		t.Fatalf("after closing all: tables hold %d and %d connections", a.pm.Connections(), b.pm.Connections())
	}
	forgotten := time.Since(closed)
	for _, h := range []*host{a, b} {
		devs, err := client.New(h.sock).Devices(ctx)
		if err != nil || len(devs) != 1 {
			t.Fatal(devs, err)
		}
		if _, err := client.New(h.sock).RotateDevice(ctx, devs[0].ID); err != nil {
			t.Fatal(err)
		}
	}
	if !waitFor(5*time.Second, func() bool { return len(evA.kinds("device-rotated")) > 0 && len(evB.kinds("device-rotated")) > 0 }) {
		t.Fatal("no device-rotated events")
	}
	time.Sleep(300 * time.Millisecond)
	if s := append(evA.kinds("psp-stale-soon"), evB.kinds("psp-stale-soon")...); len(s) > 0 {
		t.Fatalf("%d stale events for closed connections, e.g. %+v", len(s), s[0])
	}
	t.Logf("%d connections upgraded (both ends) in %v; forgotten %v after closing", n, upgraded.Round(time.Millisecond), forgotten.Round(time.Millisecond))
}

// TestVMDeviceEvents: with a connection upgraded, a rotation done by
// somebody else (not pspd) is reported with the connection and moves
// pspd's schedule; the device's removal reports the connection stale.
func TestVMDeviceEvents(t *testing.T) {
	a, b := pair(t, 3215, "10.88.0")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	waitSession(ctx, t, a, b)
	up := upgradedConn(ctx, t, a, b, 7500)
	ev := collect(ctx, t, client.New(a.sock))

	gc, err := genl.Dial(genl.Config{NetNS: a.ns})
	if err != nil {
		t.Fatal(err)
	}
	defer gc.Close()
	before := time.Now()
	if err := gc.KeyRotate(up.ra.Device); err != nil {
		t.Fatal(err)
	}
	remote := up.a.RemoteAddr().String()
	if !waitFor(5*time.Second, func() bool {
		for _, e := range ev.kinds("psp-stale-soon") {
			if strings.Contains(e.Detail, remote) {
				return true
			}
		}
		return false
	}) {
		t.Fatalf("no psp-stale-soon for %s after an outside rotation: %+v", remote, ev.evs)
	}
	devs, err := client.New(a.sock).Devices(ctx)
	if err != nil || len(devs) != 1 {
		t.Fatal(devs, err)
	}
	if d := devs[0]; d.LastRotation.Before(before) || d.NextRotation.Sub(d.LastRotation) != 24*time.Hour {
		t.Errorf("after an outside rotation: last %v, next %v; want the schedule anchored on it", d.LastRotation, d.NextRotation)
	}

	rereg := fmt.Sprintf("/sys/kernel/debug/netdevsim/netdevsim%d/ports/0/psp_rereg", a.port.ID)
	if err := os.WriteFile(rereg, []byte("1"), 0); err != nil {
		t.Fatalf("%s: %v", rereg, err)
	}
	if !waitFor(5*time.Second, func() bool {
		for _, e := range ev.kinds("psp-stale") {
			if strings.Contains(e.Detail, remote) && strings.Contains(e.Detail, "removed") {
				return true
			}
		}
		return false
	}) {
		t.Fatalf("no psp-stale event for %s after the device's removal: %+v", remote, ev.evs)
	}
	if a.pm.Connections() != 0 {
		t.Errorf("%d connections left after the device's removal", a.pm.Connections())
	}
}

// diagnose logs both hosts' PSP device counters, for a test that saw a
// connection stall (tcpDiag adds the sockets' own state).
func diagnose(t *testing.T, hs ...*host) {
	t.Helper()
	for _, h := range hs {
		t.Logf("%s: PSP stats %+v", h.name, pspStats(t, h))
	}
}

// TestVMAssociatedNamespace runs a manager in a namespace that uses a PSP
// device only by association (dev-assoc of a veth end, as a container
// would have): it starts without administering the device (the device's
// own namespace enables versions and rotates), refuses an upgrade while
// the version is disabled there, and binds receive keys through the
// associated netdev once it is enabled.
func TestVMAssociatedNamespace(t *testing.T) {
	if os.Getenv("PSPD_IN_VM") != "1" {
		t.Skip("kernel lacks PSP and netdevsim: run make vmtest (PSPD_IN_VM unset)")
	}
	h := newHost(t, "owner", 3217, "10.90.0.1")
	nsC := nstest.New(t, "ppspc")
	hA, err := vnl.NewHandleAt(netns.NsHandle(h.ns), unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer hA.Close()
	hC, err := vnl.NewHandleAt(netns.NsHandle(nsC), unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer hC.Close()
	if err := hA.LinkAdd(&vnl.Veth{LinkAttrs: vnl.LinkAttrs{Name: "pspva"}, PeerName: "pspvc", PeerNamespace: vnl.NsFd(nsC)}); err != nil {
		t.Fatal(err)
	}
	for _, l := range []struct {
		h    *vnl.Handle
		name string
		addr string
	}{{hA, "pspva", "10.91.0.1/24"}, {hC, "pspvc", "10.91.0.2/24"}, {hC, "lo", ""}} {
		link, err := l.h.LinkByName(l.name)
		if err != nil {
			t.Fatal(err)
		}
		if l.addr != "" {
			a, _ := vnl.ParseAddr(l.addr)
			if err := l.h.AddrAdd(link, a); err != nil {
				t.Fatal(err)
			}
		}
		if err := l.h.LinkSetUp(link); err != nil {
			t.Fatal(err)
		}
	}
	vc, err := hC.LinkByName("pspvc")
	if err != nil {
		t.Fatal(err)
	}
	nsid, err := hA.GetNetNsIdByFd(nsC)
	if err != nil || nsid < 0 {
		t.Fatalf("nsid of the container namespace: %d %v", nsid, err)
	}
	owner, err := genl.Dial(genl.Config{NetNS: h.ns})
	if err != nil {
		t.Fatal(err)
	}
	defer owner.Close()
	devs, err := owner.Devices()
	if err != nil || len(devs) != 1 {
		t.Fatal(devs, err)
	}
	dev := devs[0]
	if err := owner.DevAssoc(dev.ID, uint32(vc.Attrs().Index), int32(nsid)); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	m, err := psp.New(ctx, psp.Config{NetNS: nsC, Suite: kdf.AESGCM128, Rotation: time.Hour, KeyWait: time.Second})
	if err != nil {
		t.Fatalf("a manager in the associated namespace: %v", err)
	}
	defer m.Close()
	if d, err := owner.DevGet(dev.ID); err != nil || d.Enabled != 0 {
		t.Fatalf("the manager in the associated namespace administered the device: %+v %v", d, err)
	}
	mds, err := m.Devices()
	if err != nil || len(mds) != 1 || mds[0].ID != dev.ID || !mds[0].NextRotation.IsZero() {
		t.Fatalf("devices seen from the associated namespace: %+v %v (want the device, not scheduled for rotation here)", mds, err)
	}
	if _, err := m.RotateDevice(ctx, dev.ID); err == nil || !strings.Contains(err.Error(), "another network namespace") {
		t.Fatalf("rotation from the associated namespace: %v", err)
	}

	// A connection from the container namespace to the owner's side of
	// the veth.
	peer, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	m.SetPeer(peer.Public(), netip.MustParseAddr("10.91.0.1"), nil)
	var ln net.Listener
	nstest.Do(t, h.ns, func() { ln, err = net.Listen("tcp4", "10.91.0.1:7600") })
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	upgrade := func() (wire.ExplicitKey, error) {
		var c net.Conn
		var err error
		nstest.Do(t, nsC, func() { c, err = net.Dial("tcp4", "10.91.0.1:7600") })
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		d, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		f, err := c.(*net.TCPConn).File()
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		var sent wire.ExplicitKey
		_, err = m.Upgrade(ctx, f, peer.Public(), psp.PeerVersions{}, func(_ context.Context, k wire.ExplicitKey) error {
			sent = k
			sent.Key = k.Key.Clone()
			return errors.New("test: stop here")
		})
		return sent, err
	}
	if _, err := upgrade(); !errors.Is(err, psp.ErrVersionDisabled) || !strings.Contains(err.Error(), "own network namespace must enable it") {
		t.Fatalf("upgrade while the owner has the version disabled: %v", err)
	}
	if err := owner.DevSet(dev.ID, genl.VersionsOf(genl.AESGCM128)); err != nil {
		t.Fatal(err)
	}
	sent, err := upgrade()
	defer sent.Key.Wipe()
	if err == nil || !strings.Contains(err.Error(), "test: stop here") || sent.Key.Len() != 16 || sent.SPI == 0 {
		t.Fatalf("upgrade through the associated netdev: %v (sent SPI %#x, %d-byte key): want rx-assoc done and the key handed to send", err, sent.SPI, sent.Key.Len())
	}
}

// tcpDiag logs a socket's TCP state and queues.
func tcpDiag(t *testing.T, label string, c net.Conn) {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Log(err)
		return
	}
	rc.Control(func(fd uintptr) {
		ti, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
		inq, _ := unix.IoctlGetInt(int(fd), unix.SIOCINQ)
		outq, _ := unix.IoctlGetInt(int(fd), unix.SIOCOUTQ)
		t.Logf("%s %v -> %v: inq %d outq %d tcp_info %+v %v", label, c.LocalAddr(), c.RemoteAddr(), inq, outq, ti, err)
	})
}

// TestVMUpgradeLateSide: B's application hands its end over a second
// after A's, so A's key reaches B's pspd before B's upgrade asks for it
// (the early-key path), and the other way round on a second connection.
// Both connections carry data afterwards.
func TestVMUpgradeLateSide(t *testing.T) {
	a, b := pair(t, 3219, "10.92.0")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	waitSession(ctx, t, a, b)
	for i, late := range []*host{b, a} {
		ca, cb := dialPair(t, a, b, 7800+i)
		var wg sync.WaitGroup
		var ea, eb error
		wg.Add(2)
		go func() {
			defer wg.Done()
			if late == a {
				time.Sleep(time.Second)
			}
			_, ea = client.New(a.sock).UpgradePSP(ctx, ca, b.name)
		}()
		go func() {
			defer wg.Done()
			if late == b {
				time.Sleep(time.Second)
			}
			_, eb = client.New(b.sock).UpgradePSP(ctx, cb, a.name)
		}()
		wg.Wait()
		if ea != nil || eb != nil {
			t.Fatalf("%s late: upgrade A %v, B %v", late.name, ea, eb)
		}
		go io.Copy(cb, cb)
		if err := echo(ca, []byte("late side"), 10*time.Second); err != nil {
			diagnose(t, a, b)
			tcpDiag(t, "A end", ca)
			tcpDiag(t, "B end", cb)
			t.Fatalf("%s late: echo: %v", late.name, err)
		}
	}
}
