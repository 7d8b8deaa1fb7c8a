package psp_test

import (
	"bytes"
	"context"
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
	dir := t.TempDir()
	h.sock = filepath.Join(dir, "pspd.sock")
	pc := &policy.Config{
		Listen: netip.AddrPortFrom(h.addr, 6082), Socket: h.sock, Backend: policy.BackendXFRM, Offload: policy.OffloadNone,
		Suite: kdf.AESGCM128, RekeyInterval: time.Hour, PacketBudget: 1 << 30, PSPRotation: 24 * time.Hour,
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
	xb, err := xfrmbackend.New(ctx, xfrmbackend.Config{Policy: pc, Logger: log, NetNS: h.ns})
	if err != nil {
		t.Fatal(err)
	}
	pm, err := psp.New(ctx, psp.Config{NetNS: h.ns, Suite: pc.Suite, Logger: log, KeyWait: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
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
	if os.Getenv("PSPD_IN_VM") != "1" {
		t.Skip("kernel lacks PSP and netdevsim: run make vmtest (PSPD_IN_VM unset)")
	}
	a, b := newHost(t, "a", 3201, "10.81.0.1"), newHost(t, "b", 3202, "10.81.0.2")
	if err := nsim.Link(a.port, b.port); err != nil {
		t.Fatal(err)
	}
	a.start(t, b)
	b.start(t, a)
	ca, cb := client.New(a.sock), client.New(b.sock)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	waitSession(ctx, t, a, b)
	devs, err := ca.Devices(ctx)
	if err != nil || len(devs) != 1 || !strings.Contains(strings.Join(devs[0].Enabled, ","), "128") {
		t.Fatalf("A's PSP devices: %+v, %v (want one with the suite's version enabled)", devs, err)
	}

	// The applications: B listens, A connects.
	var ln net.Listener
	nstest.Do(t, b.ns, func() { ln, err = net.Listen("tcp4", "10.81.0.2:7000") })
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var connA net.Conn
	nstest.Do(t, a.ns, func() { connA, err = net.Dial("tcp4", "10.81.0.2:7000") })
	if err != nil {
		t.Fatal(err)
	}
	defer connA.Close()
	connB, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer connB.Close()
	ta, tb := connA.(*net.TCPConn), connB.(*net.TCPConn)
	mssBefore := mss(t, ta)
	before := pspStats(t, a)

	type res struct {
		r   localapi.UpgradeResult
		err error
	}
	ra, rb := make(chan res, 1), make(chan res, 1)
	go func() { r, err := ca.UpgradePSP(ctx, ta, "b"); ra <- res{r, err} }()
	go func() { r, err := cb.UpgradePSP(ctx, tb, "a"); rb <- res{r, err} }()
	ua, ub := <-ra, <-rb
	if ua.err != nil || ub.err != nil {
		t.Fatalf("upgrade: A %v, B %v\nA:\n%s\nB:\n%s", ua.err, ub.err, a.logs.Bytes(), b.logs.Bytes())
	}
	if ua.r.TxSPI != ub.r.RxSPI || ub.r.TxSPI != ua.r.RxSPI || ua.r.Version != genl.AESGCM128.String() {
		t.Errorf("upgrades do not mirror each other: A %+v, B %+v", ua.r, ub.r)
	}
	if got := mss(t, ta); got != mssBefore-40 {
		t.Errorf("MSS %d after the upgrade, want %d - 40", got, mssBefore)
	}

	msg := bytes.Repeat([]byte("pspd-psp-canary "), 4096)
	go func() {
		io.Copy(connB, connB) // B echoes
	}()
	connA.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := connA.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(connA, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo through PSP: %v", err)
	}
	after := pspStats(t, a)
	if after.TxPackets <= before.TxPackets || after.RxPackets <= before.RxPackets || after.TxBytes-before.TxBytes < uint64(len(msg)) {
		t.Errorf("PSP counters did not carry the data: before %+v after %+v", before, after)
	}

	// A device-key rotation: the connection still works, and pspd says the
	// next rotation will end it.
	stale := make(chan struct{})
	ectx, stopEvents := context.WithCancel(ctx)
	defer stopEvents()
	go ca.Events(ectx, func(ev localapi.Event) error {
		if ev.Kind == "psp-stale-soon" && strings.Contains(ev.Detail, "10.81.0.2:7000") {
			close(stale)
			return io.EOF
		}
		return nil
	})
	time.Sleep(200 * time.Millisecond) // the event stream is subscribed
	if _, err := ca.RotateDevice(ctx, devs[0].ID); err != nil {
		t.Fatal(err)
	}
	select {
	case <-stale:
	case <-ctx.Done():
		t.Fatal("no psp-stale-soon event after the rotation")
	}
	if _, err := connA.Write([]byte("after")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(connA, got[:5]); err != nil || string(got[:5]) != "after" {
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

// TestVMUpgradeErrors: a socket handed over for an unknown peer, and one
// whose peer application never upgrades, get errors that say what to do.
func TestVMUpgradeErrors(t *testing.T) {
	if os.Getenv("PSPD_IN_VM") != "1" {
		t.Skip("kernel lacks PSP and netdevsim: run make vmtest (PSPD_IN_VM unset)")
	}
	a, b := newHost(t, "a", 3203, "10.82.0.1"), newHost(t, "b", 3204, "10.82.0.2")
	if err := nsim.Link(a.port, b.port); err != nil {
		t.Fatal(err)
	}
	a.start(t, b)
	b.start(t, a)
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
