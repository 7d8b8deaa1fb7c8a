package psp_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/genl"
	"github.com/pspd/pspd/internal/daemon"
	"github.com/pspd/pspd/internal/nsim"
	"github.com/pspd/pspd/internal/nstest"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/keyexchange/wire"
	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/localapi/client"
	"github.com/pspd/pspd/offload"
	"github.com/pspd/pspd/offload/psp"
	"github.com/pspd/pspd/policy"
	"github.com/pspd/pspd/xfrm"
	xfrmbackend "github.com/pspd/pspd/xfrm/backend"
)

// The tests in this file need kernel PSP and netdevsim; they run inside
// the project's test VM (make vmtest) and skip elsewhere.

// host is one namespace with a netdevsim port and a whole pspd in it: the
// daemon with its key exchange, the XFRM backend (the host-to-host data
// plane the daemon needs; here it protects a subnet no test traffic
// uses), the PSP manager and the local API.
type host struct {
	name string
	ns   int
	addr netip.Addr
	port *nsim.Port
	id   *identity.Identity
	d    *daemon.Daemon
	pm   *psp.Manager
	sock string
	logs syncBuf
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) Bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return bytes.Clone(s.b.Bytes())
}

func newHost(t *testing.T, name string, nsimID uint32, addr string) *host {
	t.Helper()
	if _, err := os.Stat("/sys/bus/netdevsim/new_device"); err != nil {
		t.Skip("kernel has no netdevsim (CONFIG_NETDEVSIM): run make vmtest")
	}
	if err := psp.Probe(0); err != nil && strings.Contains(err.Error(), "CONFIG_INET_PSP") {
		t.Skipf("%v: run make vmtest", err)
	}
	h := &host{name: name, ns: nstest.New(t, "ppsp"), addr: netip.MustParseAddr(addr)}
	var err error
	if h.port, err = nsim.New(nsimID, fmt.Sprintf("/proc/self/fd/%d", h.ns)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.port.Close() })
	if h.id, err = identity.Generate(); err != nil {
		t.Fatal(err)
	}
	lh, err := vnl.NewHandleAt(netns.NsHandle(h.ns), unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer lh.Close()
	l, err := lh.LinkByIndex(h.port.Ifindex)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := vnl.ParseAddr(addr + "/24")
	if err := lh.AddrAdd(l, a); err != nil {
		t.Fatal(err)
	}
	if err := lh.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
	lo, _ := lh.LinkByName("lo")
	lh.LinkSetUp(lo)
	return h
}

func (h *host) start(t *testing.T, peer *host) {
	t.Helper()
	h.startSuite(t, peer, kdf.AESGCM128)
}

// startSuite is start with suite for kernel PSP (the XFRM backend keeps
// AES-GCM-128).
func (h *host) startSuite(t *testing.T, peer *host, suite kdf.Suite) {
	t.Helper()
	dir := t.TempDir()
	h.sock = filepath.Join(dir, "pspd.sock")
	pc := &policy.Config{
		Listen: netip.AddrPortFrom(h.addr, 6082), Socket: h.sock, Backend: policy.BackendXFRM, Offload: policy.OffloadNone,
		Suite: suite, RekeyInterval: time.Hour, PacketBudget: 1 << 30, PSPRotation: 24 * time.Hour,
		Peers: []policy.Peer{{Name: peer.name, Endpoint: netip.AddrPortFrom(peer.addr, 6082), PublicKey: peer.id.Public(),
			Prefixes: []netip.Prefix{netip.MustParsePrefix("10.99.0.0/24")}, Backend: policy.BackendXFRM, Suite: kdf.AESGCM128}},
	}
	idPath := filepath.Join(dir, "id.pem")
	if err := identity.WriteFile(idPath, h.id, false); err != nil {
		t.Fatal(err)
	}
	pc.Identity = idPath
	log := slog.New(slog.NewTextHandler(&h.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ctx, cancel := context.WithCancel(context.Background())
	xb, err := xfrmbackend.New(ctx, xfrmbackend.Config{Offload: xfrm.OffloadNone, Logger: log, NetNS: h.ns})
	if err != nil {
		t.Fatal(err)
	}
	pm, err := psp.New(ctx, psp.Config{NetNS: h.ns, Suite: pc.Suite, Logger: log, KeyWait: 5 * time.Second, Sweep: 300 * time.Millisecond, Rotation: pc.PSPRotation})
	if err != nil {
		t.Fatal(err)
	}
	h.pm = pm
	pm.SetPeer(peer.id.Public(), peer.addr, nil)
	report := offload.Report{{Backend: wire.BackendPSP, Available: true}, {Backend: wire.BackendXFRM, Available: true}}
	nstest.Do(t, h.ns, func() { // the control socket belongs to the namespace
		h.d, err = daemon.New(ctx, daemon.Config{Policy: pc, Logger: log, Report: report,
			Backends: map[wire.Backend]offload.Backend{wire.BackendXFRM: xb}, PSP: pm})
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := localapi.Listen(h.sock, localapi.Authorizer{})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- h.d.Serve(ctx, ln, "pspd-test-nonexistent") }()
	t.Cleanup(func() {
		cancel()
		<-done
		h.d.Close()
	})
}

// pair starts two hosts on linked netdevsim ports nsimID and nsimID+1,
// with addresses net.1 and net.2, each running a pspd pinned to the other.
func pair(t *testing.T, nsimID uint32, net string) (a, b *host) {
	t.Helper()
	if os.Getenv("PSPD_IN_VM") != "1" {
		t.Skip("kernel lacks PSP and netdevsim: run make vmtest (PSPD_IN_VM unset)")
	}
	a, b = newHost(t, "a", nsimID, net+".1"), newHost(t, "b", nsimID+1, net+".2")
	if err := nsim.Link(a.port, b.port); err != nil {
		t.Fatal(err)
	}
	skewKeys(t, b)
	a.start(t, b)
	b.start(t, a)
	return a, b
}

// skewKeys rotates h's device key once before pspd starts. netdevsim's
// "keys" are its key generation followed by a per-device counter, so two
// fresh devices hand out the same SPI and key for their n-th
// association, and pspd rightly refuses a peer key equal to its own
// receive key; real devices derive keys from their own secrets.
func skewKeys(t *testing.T, h *host) {
	t.Helper()
	c, err := genl.Dial(genl.Config{NetNS: h.ns})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	devs, err := c.Devices()
	if err != nil || len(devs) != 1 {
		t.Fatalf("PSP devices in %s: %+v %v", h.name, devs, err)
	}
	if err := c.KeyRotate(devs[0].ID); err != nil {
		t.Fatal(err)
	}
}

// watchEvent returns a channel closed when the daemon behind c publishes
// an event of kind whose detail mentions substr.
func watchEvent(ctx context.Context, t *testing.T, c *client.Client, kind, substr string) <-chan struct{} {
	t.Helper()
	seen := make(chan struct{})
	ectx, stop := context.WithCancel(ctx)
	t.Cleanup(stop)
	go c.Events(ectx, func(ev localapi.Event) error {
		if string(ev.Kind) == kind && strings.Contains(ev.Detail, substr) {
			close(seen)
			return io.EOF
		}
		return nil
	})
	// The daemon subscribes the stream before it answers, but the client
	// does not say when the answer came; a missed event fails the test.
	time.Sleep(300 * time.Millisecond)
	return seen
}

// waitSession waits until both daemons report their session with the
// other up.
func waitSession(ctx context.Context, t *testing.T, hs ...*host) {
	t.Helper()
	for _, h := range hs {
		for {
			ps, err := client.New(h.sock).Peers(ctx)
			if err == nil && len(ps) == 1 && ps[0].State == "up" {
				break
			}
			if ctx.Err() != nil {
				t.Fatalf("%s: no session: %v %v\n%s", h.name, ps, err, h.logs.Bytes())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// upgraded is one TCP connection from A to B with both ends upgraded; B
// echoes what it reads.
type upgraded struct {
	a, b      *net.TCPConn
	ra, rb    localapi.UpgradeResult
	mssBefore int
}

// upgradedConn connects A's application to B's on port, hands both ends
// to their pspds at once, and checks the two upgrades mirror each other.
func upgradedConn(ctx context.Context, t *testing.T, a, b *host, port int) upgraded {
	t.Helper()
	dst := netip.AddrPortFrom(b.addr, uint16(port)).String()
	var ln net.Listener
	var err error
	nstest.Do(t, b.ns, func() { ln, err = net.Listen("tcp4", dst) })
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var ca net.Conn
	nstest.Do(t, a.ns, func() { ca, err = net.Dial("tcp4", dst) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ca.Close() })
	cb, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cb.Close() })
	u := upgraded{a: ca.(*net.TCPConn), b: cb.(*net.TCPConn)}
	u.mssBefore = mss(t, u.a)
	type res struct {
		r   localapi.UpgradeResult
		err error
	}
	ra, rb := make(chan res, 1), make(chan res, 1)
	go func() { r, err := client.New(a.sock).UpgradePSP(ctx, u.a, b.name); ra <- res{r, err} }()
	go func() { r, err := client.New(b.sock).UpgradePSP(ctx, u.b, a.name); rb <- res{r, err} }()
	x, y := <-ra, <-rb
	if x.err != nil || y.err != nil {
		t.Fatalf("upgrade: A %v, B %v\nA:\n%s\nB:\n%s", x.err, y.err, a.logs.Bytes(), b.logs.Bytes())
	}
	if x.r.TxSPI != y.r.RxSPI || y.r.TxSPI != x.r.RxSPI {
		t.Errorf("upgrades do not mirror each other: A %+v, B %+v", x.r, y.r)
	}
	u.ra, u.rb = x.r, y.r
	go io.Copy(u.b, u.b)
	return u
}

// echo writes msg on c and reads it back within d.
func echo(c net.Conn, msg []byte, d time.Duration) error {
	c.SetDeadline(time.Now().Add(d))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if !bytes.Equal(got, msg) {
		return errors.New("echo differs")
	}
	return nil
}

// mss reads a socket's TCP_MAXSEG.
func mss(t *testing.T, c *net.TCPConn) int {
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var serr error
	rc.Control(func(fd uintptr) { v, serr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_MAXSEG) })
	if serr != nil {
		t.Fatal(serr)
	}
	return v
}

func pspStats(t *testing.T, h *host) genl.Stats {
	t.Helper()
	c, err := genl.Dial(genl.Config{NetNS: h.ns})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	all, err := c.AllStats()
	if err != nil || len(all) != 1 {
		t.Fatalf("PSP stats in %s: %v, %v", h.name, all, err)
	}
	return all[0]
}

// TestVMUpgrade is the PSP upgrade end to end: two hosts on linked
// netdevsim ports, a pspd in each, two applications with one TCP
// connection between them, each hands its end to its pspd over the local
// API; both ends get PSP, bytes flow through the PSP devices, the MSS
// shrinks by the PSP overhead, and a device-key rotation is reported with
// the connections the next one will kill.
func TestVMUpgrade(t *testing.T) {
	a, b := pair(t, 3201, "10.81.0")
	ca := client.New(a.sock)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	waitSession(ctx, t, a, b)
	devs, err := ca.Devices(ctx)
	if err != nil || len(devs) != 1 || !strings.Contains(strings.Join(devs[0].Enabled, ","), "128") {
		t.Fatalf("A's PSP devices: %+v, %v (want one with the suite's version enabled)", devs, err)
	}

	before := pspStats(t, a)
	up := upgradedConn(ctx, t, a, b, 7000)
	if up.ra.Version != genl.AESGCM128.String() {
		t.Errorf("upgraded with %s, want the suite's %s", up.ra.Version, genl.AESGCM128)
	}
	if got := mss(t, up.a); got != up.mssBefore-40 {
		t.Errorf("MSS %d after the upgrade, want %d - 40", got, up.mssBefore)
	}
	msg := bytes.Repeat([]byte("pspd-psp-canary "), 4096)
	if err := echo(up.a, msg, 10*time.Second); err != nil {
		t.Fatalf("echo through PSP: %v", err)
	}
	after := pspStats(t, a)
	if after.TxPackets <= before.TxPackets || after.RxPackets <= before.RxPackets || after.TxBytes-before.TxBytes < uint64(len(msg)) {
		t.Errorf("PSP counters did not carry the data: before %+v after %+v", before, after)
	}

	// A device-key rotation: the connection still works, and pspd says the
	// next rotation will end it.
	stale := watchEvent(ctx, t, ca, "psp-stale-soon", up.a.RemoteAddr().String())
	if _, err := ca.RotateDevice(ctx, devs[0].ID); err != nil {
		t.Fatal(err)
	}
	select {
	case <-stale:
	case <-ctx.Done():
		t.Fatal("no psp-stale-soon event after the rotation")
	}
	if err := echo(up.a, []byte("after"), 10*time.Second); err != nil {
		t.Fatalf("echo after one rotation: %v", err)
	}
	devs, _ = ca.Devices(ctx)
	if len(devs) != 1 || devs[0].Rotations == 0 || devs[0].LastRotation.IsZero() {
		t.Errorf("device after the rotation: %+v", devs)
	}
	for _, h := range []*host{a, b} {
		if bytes.Contains(h.logs.Bytes(), []byte("canary")) {
			t.Error("traffic in the log")
		}
	}
}

// TestVMRotateTwice is the device-key rotation scenario: B rotates its
// device key twice while a connection is open. After the first rotation
// pspd tells the application the next one will end the connection; the
// application opens and upgrades a new one and moves its traffic there,
// and after the second rotation the new connection carries on while the
// old one, as the kernel promises, can no longer receive.
func TestVMRotateTwice(t *testing.T) {
	a, b := pair(t, 3205, "10.83.0")
	cb := client.New(b.sock)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	waitSession(ctx, t, a, b)
	devs, err := cb.Devices(ctx)
	if err != nil || len(devs) != 1 {
		t.Fatalf("B's PSP devices: %+v, %v", devs, err)
	}
	old := upgradedConn(ctx, t, a, b, 7000)
	if err := echo(old.a, []byte("first"), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	stale := watchEvent(ctx, t, cb, "psp-stale-soon", old.a.LocalAddr().String())
	start := time.Now()
	if _, err := cb.RotateDevice(ctx, devs[0].ID); err != nil {
		t.Fatal(err)
	}
	select {
	case <-stale:
	case <-ctx.Done():
		t.Fatal("no psp-stale-soon event for the old connection after the first rotation")
	}
	warned := time.Since(start)
	fresh := upgradedConn(ctx, t, a, b, 7001)
	if err := echo(fresh.a, []byte("moved"), 10*time.Second); err != nil {
		diagnose(t, a, b)
		tcpDiag(t, "A end", fresh.a)
		tcpDiag(t, "B end", fresh.b)
		t.Fatalf("echo on the new connection: %v\nA:\n%s\nB:\n%s", err, a.logs.Bytes(), b.logs.Bytes())
	}
	if err := echo(old.a, []byte("still"), 10*time.Second); err != nil {
		t.Fatalf("the old connection stopped after one rotation: %v", err)
	}
	if _, err := cb.RotateDevice(ctx, devs[0].ID); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if err := echo(fresh.a, fmt.Appendf(nil, "after second rotation %d", i), 5*time.Second); err != nil {
			t.Fatalf("the re-established connection stalled after the second rotation: %v", err)
		}
	}
	if err := echo(old.a, []byte("dead"), 2*time.Second); err == nil {
		t.Error("the old connection still receives after two rotations; the kernel should have ended its key")
	}
	st := pspStats(t, b)
	t.Logf("stale warning %v after the first rotation; B's device: %d rotations, %d stale events", warned.Round(time.Millisecond), st.KeyRotations, st.StaleEvents)
}

// TestVMUpgradeErrors: a socket handed over for an unknown peer, and one
// whose peer application never upgrades, get errors that say what to do.
func TestVMUpgradeErrors(t *testing.T) {
	a, b := pair(t, 3203, "10.82.0")
	ca := client.New(a.sock)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	waitSession(ctx, t, a, b)
	var ln net.Listener
	var err error
	nstest.Do(t, b.ns, func() { ln, err = net.Listen("tcp4", "10.82.0.2:7000") })
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var conn net.Conn
	nstest.Do(t, a.ns, func() { conn, err = net.Dial("tcp4", "10.82.0.2:7000") })
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := ca.UpgradePSP(ctx, conn.(*net.TCPConn), "nobody"); err == nil || !strings.Contains(err.Error(), "unknown peer") {
		t.Errorf("unknown peer: %v", err)
	}
	// B's application never hands its end over.
	_, err = ca.UpgradePSP(ctx, conn.(*net.TCPConn), "b")
	if err == nil || !strings.Contains(err.Error(), "did the application at the other end upgrade its socket") {
		t.Errorf("one-sided upgrade: %v", err)
	}
}
