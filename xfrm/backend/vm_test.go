package backend

import (
	"bytes"
	"cmp"
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/internal/logscan"
	"github.com/pspd/pspd/internal/nstest"
	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/keyexchange/wire"
	"github.com/pspd/pspd/offload"
	"github.com/pspd/pspd/xfrm"
)

// host is one side of the test: a namespace with a pspd key exchange and
// an XFRM backend in it, as the daemon wires them.
type host struct {
	ns     int
	addr   netip.Addr
	id     *identity.Identity
	listen netip.AddrPort
	spec   offload.PeerSpec
	b      *Backend
	ep     *keyexchange.Endpoint
	kp     *keyexchange.Peer
	logs   bytes.Buffer
	tap    *keyTap
	// kxGrace is the key exchange's grace for an old generation (2s
	// unless set); retireGrace the backend's (its default unless set).
	kxGrace, retireGrace time.Duration
}

// keyTap keeps a copy of every key the key exchange hands the backend, so
// the test can prove none of them reaches a log. It passes everything on
// to the real backend unchanged.
type keyTap struct {
	*Backend
	keys []secret.Key
}

func (k *keyTap) Install(ctx context.Context, sa *keyexchange.SA) error {
	k.keys = append(k.keys, secret.New(sa.RxKey.Bytes()), secret.New(sa.TxKey.Bytes()))
	return k.Backend.Install(ctx, sa)
}

func link(t *testing.T, a, b *host) {
	t.Helper()
	la, err := vnl.NewHandleAt(netns.NsHandle(a.ns), unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer la.Close()
	lb, err := vnl.NewHandleAt(netns.NsHandle(b.ns), unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer lb.Close()
	if err := la.LinkAdd(&vnl.Veth{LinkAttrs: vnl.LinkAttrs{Name: "pxba"}, PeerName: "pxbb", PeerNamespace: vnl.NsFd(b.ns)}); err != nil {
		t.Fatal(err)
	}
	for _, s := range []struct {
		h    *vnl.Handle
		name string
		addr netip.Addr
	}{{la, "pxba", a.addr}, {lb, "pxbb", b.addr}} {
		l, err := s.h.LinkByName(s.name)
		if err != nil {
			t.Fatal(err)
		}
		ad, _ := vnl.ParseAddr(s.addr.String() + "/24")
		if err := s.h.AddrAdd(l, ad); err != nil {
			t.Fatal(err)
		}
		if err := s.h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
		lo, _ := s.h.LinkByName("lo")
		s.h.LinkSetUp(lo)
	}
}

func newHost(t *testing.T, addr string) *host {
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return &host{ns: nstest.New(t, "pxb"), addr: netip.MustParseAddr(addr), id: id}
}

// start brings up the backend and the key exchange towards peer.
func (h *host) start(t *testing.T, peer *host, require bool) {
	t.Helper()
	log := slog.New(slog.NewTextHandler(&h.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	pp := offload.PeerSpec{Name: "peer", Endpoint: netip.AddrPortFrom(peer.addr, 6082), Key: peer.id.Public(),
		Local: h.addr, Prefixes: []netip.Prefix{netip.PrefixFrom(peer.addr, 32)}, Suite: kdf.AESGCM256,
		RequireEncryption: require, Limits: offload.Limits{SoftPackets: 1 << 30, HardPackets: 1 << 31, SoftLifetime: 2 * time.Hour, HardLifetime: 3 * time.Hour}}
	h.listen = netip.AddrPortFrom(h.addr, 6082)
	h.spec = pp
	ctx := context.Background()
	var err error
	if h.b, err = New(ctx, Config{Offload: xfrm.OffloadNone, Logger: log, NetNS: h.ns, Peers: []offload.PeerSpec{pp}, RetireGrace: h.retireGrace}); err != nil {
		t.Fatal(err)
	}
	if err := h.b.AddPeer(ctx, pp); err != nil {
		t.Fatal(err)
	}
	h.tap = &keyTap{Backend: h.b}
	nstest.Do(t, h.ns, func() {
		h.ep, err = keyexchange.NewEndpoint(ctx, keyexchange.Config{
			Identity: h.id, ListenAddr: h.listen.String(), Installers: map[wire.Backend]keyexchange.Installer{wire.BackendXFRM: h.tap},
			Logger: log, Control: h.b.Control,
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	if h.kp, err = h.ep.AddPeer(keyexchange.PeerConfig{Key: pp.Key, Addr: pp.Endpoint, Backend: wire.BackendXFRM,
		Suite: kdf.AESGCM256, RekeyInterval: time.Hour, Grace: cmp.Or(h.kxGrace, 2*time.Second)}); err != nil {
		t.Fatal(err)
	}
}

// stop is a graceful stop: the key exchange removes the SAs, the backend
// the peer's policies.
func (h *host) stop() {
	h.kp.Close()
	h.ep.Close()
	h.b.RemovePeer(context.Background(), h.spec.Key)
	h.b.Close()
}

func waitUp(t *testing.T, hs ...*host) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, h := range hs {
		if _, err := h.kp.Wait(ctx, func(keyexchange.SA) bool { return true }); err != nil {
			t.Fatalf("no association: %v (last error %v)\n%s", err, h.kp.LastError(), h.logs.String())
		}
	}
}

// echo sends msg over TCP from a to b and reads it back.
func echo(t *testing.T, a, b *host, msg []byte) error {
	t.Helper()
	var ln net.Listener
	var err error
	nstest.Do(t, b.ns, func() { ln, err = net.Listen("tcp4", netip.AddrPortFrom(b.addr, 7000).String()) })
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c)
	}()
	var c net.Conn
	nstest.Do(t, a.ns, func() {
		d := net.Dialer{Timeout: 3 * time.Second}
		c, err = d.Dial("tcp4", netip.AddrPortFrom(b.addr, 7000).String())
	})
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if !bytes.Equal(got, msg) {
		return io.ErrUnexpectedEOF
	}
	return nil
}

func needVM(t *testing.T) {
	if os.Getenv("PSPD_IN_VM") != "1" {
		t.Skip("kernel lacks ESP rfc4106(gcm(aes)): run make vmtest (PSPD_IN_VM unset)")
	}
}

// TestVMKeyExchangeOverXFRM runs the whole path the daemon takes with the
// xfrm backend: two namespaces, QUIC/mTLS between them on a socket exempt
// from the transport-mode policies that cover the same two hosts, SAs from
// the key exchange in the kernel, TCP through them, a rekey, counters,
// and nothing left after a graceful stop.
func TestVMKeyExchangeOverXFRM(t *testing.T) {
	needVM(t)
	a, b := newHost(t, "10.79.0.1"), newHost(t, "10.79.0.2")
	link(t, a, b)
	a.start(t, b, false)
	b.start(t, a, false)
	waitUp(t, a, b)
	msg := bytes.Repeat([]byte("pspd-xfrm-canary "), 1000)
	if err := echo(t, a, b, msg); err != nil {
		t.Fatalf("TCP through ESP: %v", err)
	}
	ctx := context.Background()
	sa, _ := a.kp.Current()
	tr, ok := a.b.Traffic(&sa)
	if !ok || tr.PacketsOut == 0 || tr.PacketsIn == 0 {
		t.Errorf("traffic on A's SAs: %+v, %v", tr, ok)
	}
	// The kernel holds SAs with pspd's reqid in both directions.
	sas, err := a.b.h.ListSAs(ctx)
	if err != nil || len(sas) != 2 {
		t.Fatalf("A's SAs: %v, %v", sas, err)
	}
	next, err := a.kp.Rekey(ctx)
	if err != nil {
		t.Fatalf("rekey: %v", err)
	}
	if next.RxSPI == sa.RxSPI || next.TxSPI == sa.TxSPI {
		t.Errorf("rekey kept an SPI: %v -> %v", &sa, &next)
	}
	if err := echo(t, a, b, msg); err != nil {
		t.Fatalf("TCP after the rekey: %v", err)
	}
	if tr, ok := a.b.Traffic(&next); !ok || tr.PacketsOut == 0 {
		t.Errorf("the new SA carried nothing: %+v", tr)
	}
	for _, h := range []*host{a, b} {
		logscan.AssertNoKeys(t, h.logs.Bytes(), h.tap.keys...)
	}
	a.stop()
	b.stop()
	for _, h := range []*host{a, b} {
		hd, err := xfrm.Open(xfrm.Config{NetNS: h.ns})
		if err != nil {
			t.Fatal(err)
		}
		sas, _ := hd.ListSAs(ctx)
		pols, _ := hd.ListPolicies(ctx)
		hd.Close()
		if len(sas) != 0 || len(pols) != 0 {
			t.Errorf("left in the kernel after a graceful stop: SAs %+v, policies %v\nlog:\n%s", sas, pols, h.logs.String())
		}
	}
}

// TestVMRequireEncryptionOutlivesCrash: with require_encryption the
// policies are in place before any SA and stay when pspd dies, so traffic
// is held back, never sent in clear; a new pspd reconciles (drops the SAs
// whose keys died with the old one, keeps the policies) and traffic flows
// again once it has negotiated.
func TestVMRequireEncryptionOutlivesCrash(t *testing.T) {
	needVM(t)
	a, b := newHost(t, "10.79.1.1"), newHost(t, "10.79.1.2")
	link(t, a, b)
	a.start(t, b, true)
	// Only A runs: its policies already block A->B in clear.
	if err := echo(t, a, b, []byte("x")); err == nil {
		t.Fatal("TCP reached B in clear while encryption is required and no SA exists")
	}
	if d := a.b.Drops(); d["outbound-no-sa"] == 0 {
		t.Errorf("held-back packets not counted: %v", d)
	}
	b.start(t, a, true)
	waitUp(t, a, b)
	if err := echo(t, a, b, []byte("up")); err != nil {
		t.Fatalf("TCP through ESP: %v", err)
	}
	// A stops without removing its peer, as after a crash: its policies
	// stay. (Its SAs go with the key exchange here; the SAs a kill -9
	// leaves are the reconcile's job, tested in package xfrm and by the
	// system tests.)
	a.kp.Close()
	a.ep.Close()
	a.b.Close()
	hd, err := xfrm.Open(xfrm.Config{NetNS: a.ns})
	if err != nil {
		t.Fatal(err)
	}
	defer hd.Close()
	ctx := context.Background()
	pols, err := hd.ListPolicies(ctx)
	if err != nil || len(pols) != 2 {
		t.Fatalf("policies after A stopped without removing its peer: %v, %v", pols, err)
	}
	if err := echo(t, a, b, []byte("x")); err == nil {
		t.Fatal("TCP reached B in clear while A's pspd was down")
	}
	a.logs.Reset()
	a.start(t, b, true)
	if !bytes.Contains(a.logs.Bytes(), []byte("kept_policies=2")) {
		t.Errorf("restart did not keep the policies:\n%s", a.logs.String())
	}
	waitUp(t, a)
	ctx2, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if _, err := b.kp.Wait(ctx2, func(sa keyexchange.SA) bool { cur, _ := a.kp.Current(); return sa.TxSPI == cur.RxSPI }); err != nil {
		t.Fatalf("B did not re-associate with the restarted A: %v", err)
	}
	if err := echo(t, a, b, []byte("back")); err != nil {
		t.Fatalf("TCP after the restart: %v", err)
	}
	a.stop()
	b.stop()
}

// settle waits until a's and b's current generations are the two halves
// of one SA pair (the first sessions of two hosts that dial each other at
// once may replace each other) and returns them.
func settle(t *testing.T, a, b *host) (keyexchange.SA, keyexchange.SA) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		sa, _ := a.kp.Current()
		sb, _ := b.kp.Current()
		if sa.RxSPI == sb.TxSPI && sa.TxSPI == sb.RxSPI && sa.Generation == sb.Generation {
			return sa, sb
		}
		select {
		case <-ctx.Done():
			t.Fatalf("a (%v) and b (%v) never settled on one generation", &sa, &sb)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// hasSA reports whether h's kernel holds an SA with spi towards dst.
func hasSA(t *testing.T, h *host, dst netip.Addr, spi kdf.SPI) bool {
	t.Helper()
	sas, err := h.b.h.ListSAs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range sas {
		if s.Dst == dst && s.SPI == uint32(spi) {
			return true
		}
	}
	return false
}

// waitGone polls h's kernel until the SA dst/spi is gone and returns when
// that was seen, or fails after limit.
func waitGone(t *testing.T, h *host, dst netip.Addr, spi kdf.SPI, limit time.Duration) time.Time {
	t.Helper()
	end := time.Now().Add(limit)
	for time.Now().Before(end) {
		if !hasSA(t, h, dst, spi) {
			return time.Now()
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("SA %s/%s still installed after %v\n%s", dst, spi, limit, h.logs.String())
	return time.Time{}
}

// TestVMRetireOnTraffic: after a rekey the old generation goes as soon as
// the new inbound SA has decrypted a packet, long before any grace; a side
// that sees no packet on its new SA removes the old one after the
// backend's grace. The key exchange's later Remove of the retired
// generation is a no-op, and Remove of the current one still works.
func TestVMRetireOnTraffic(t *testing.T) {
	needVM(t)
	const grace = 3 * time.Second
	a, b := newHost(t, "10.79.2.1"), newHost(t, "10.79.2.2")
	link(t, a, b)
	for _, h := range []*host{a, b} {
		// The key exchange would remove the old generation only after
		// two minutes: anything earlier is the backend's doing.
		h.kxGrace, h.retireGrace = 2*time.Minute, grace
	}
	a.start(t, b, false)
	b.start(t, a, false)
	waitUp(t, a, b)
	ctx := context.Background()
	oldA, oldB := settle(t, a, b)
	next, err := a.kp.Rekey(ctx)
	if err != nil {
		t.Fatalf("rekey: %v", err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := b.kp.WaitGeneration(wctx, next.Generation); err != nil {
		t.Fatal(err)
	}
	activatedB := time.Now() // B activated the new generation before committing it
	// No packet has been sent under the new generation: both sides still
	// hold the old one.
	if !hasSA(t, a, a.addr, oldA.RxSPI) || !hasSA(t, b, b.addr, oldB.RxSPI) {
		t.Fatal("an old inbound SA went before any packet on the new one and before the grace")
	}

	// A receives, and never answers: B's new inbound SA sees nothing.
	var ln net.PacketConn
	nstest.Do(t, a.ns, func() { ln, err = net.ListenPacket("udp4", netip.AddrPortFrom(a.addr, 7001).String()) })
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var c net.Conn
	nstest.Do(t, b.ns, func() { c, err = net.Dial("udp4", netip.AddrPortFrom(a.addr, 7001).String()) })
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sent := time.Now()
	if _, err := c.Write([]byte("first packet on the new SA")); err != nil {
		t.Fatal(err)
	}
	gone := waitGone(t, a, a.addr, oldA.RxSPI, grace/2)
	t.Logf("A: old inbound SA removed %v after the first packet on the new one", gone.Sub(sent).Round(time.Millisecond))
	if hasSA(t, a, b.addr, oldA.TxSPI) {
		t.Error("A removed the old inbound SA but kept the old outbound one")
	}
	ln.SetReadDeadline(time.Now().Add(time.Second))
	if _, _, err := ln.ReadFrom(make([]byte, 64)); err != nil {
		t.Errorf("the packet on the new SA was not delivered: %v", err)
	}

	// B saw no packet on its new SA: its old generation goes at the grace.
	goneB := waitGone(t, b, b.addr, oldB.RxSPI, grace+2*time.Second)
	t.Logf("B: old inbound SA removed %v after activation without traffic (grace %v)", goneB.Sub(activatedB).Round(time.Millisecond), grace)
	if d := goneB.Sub(activatedB); d < grace-500*time.Millisecond {
		t.Errorf("B removed its old generation %v after activation, before the grace of %v", d, grace)
	}
	if hasSA(t, b, a.addr, oldB.TxSPI) {
		t.Error("B removed the old inbound SA but kept the old outbound one")
	}

	// The key exchange's own Remove of the retired generation comes later
	// and must change nothing.
	if err := a.b.Remove(ctx, &oldA); err != nil {
		t.Errorf("Remove of a retired generation: %v", err)
	}
	if err := echo(t, a, b, []byte("still up")); err != nil {
		t.Fatalf("TCP on the new generation after the old one was retired: %v", err)
	}
	// Remove of the current generation still takes its SAs out.
	cur, _ := a.kp.Current()
	if err := a.b.Remove(ctx, &cur); err != nil {
		t.Fatal(err)
	}
	if hasSA(t, a, a.addr, cur.RxSPI) || hasSA(t, a, b.addr, cur.TxSPI) {
		t.Error("Remove of the current generation left its SAs")
	}
	a.stop()
	b.stop()
}

// TestVMRetireCancelledByClose: a retirement still waiting for traffic
// does not hold Close up, and leaves nothing behind.
func TestVMRetireCancelledByClose(t *testing.T) {
	needVM(t)
	a, b := newHost(t, "10.79.3.1"), newHost(t, "10.79.3.2")
	link(t, a, b)
	for _, h := range []*host{a, b} {
		h.kxGrace, h.retireGrace = 2*time.Minute, time.Minute
	}
	a.start(t, b, false)
	b.start(t, a, false)
	waitUp(t, a, b)
	settle(t, a, b)
	next, err := a.kp.Rekey(context.Background())
	if err != nil {
		t.Fatalf("rekey: %v", err)
	}
	wctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := b.kp.WaitGeneration(wctx, next.Generation); err != nil {
		t.Fatal(err)
	}
	// Both sides now wait for traffic on the new generation. The backends
	// go first, before the key exchange removes anything: A's by Close,
	// B's peer by RemovePeer.
	start := time.Now()
	if err := a.b.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if err := b.b.RemovePeer(context.Background(), b.spec.Key); err != nil {
		t.Errorf("RemovePeer: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Close and RemovePeer took %v with retirements pending", d)
	}
	a.kp.Close()
	a.ep.Close()
	b.stop()
	for _, h := range []*host{a, b} {
		hd, err := xfrm.Open(xfrm.Config{NetNS: h.ns})
		if err != nil {
			t.Fatal(err)
		}
		sas, _ := hd.ListSAs(context.Background())
		hd.Close()
		if len(sas) != 0 {
			t.Errorf("SAs left after stop: %+v", sas)
		}
	}
}

// backendTo starts only h's backend, with peer as its one peer: the test
// drives Install, Activate and Remove itself, as the key exchange would.
func backendTo(t *testing.T, h, peer *host) *assoc.SA {
	t.Helper()
	log := slog.New(slog.NewTextHandler(&h.logs, nil))
	spec := offload.PeerSpec{Name: "peer", Key: peer.id.Public(), Endpoint: netip.AddrPortFrom(peer.addr, 6082), Local: h.addr,
		Prefixes: []netip.Prefix{netip.PrefixFrom(peer.addr, 32)}, Suite: assoc.AESGCM128}
	var err error
	if h.b, err = New(context.Background(), Config{Offload: xfrm.OffloadNone, Logger: log, NetNS: h.ns}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.b.Close() })
	if err := h.b.AddPeer(context.Background(), spec); err != nil {
		t.Fatal(err)
	}
	return &assoc.SA{Peer: spec.Key, ID: 7, Backend: assoc.BackendXFRM, Suite: assoc.AESGCM128, Generation: 1,
		RxSPI: 0x100, TxSPI: 0x40000100, RxKey: randKey(t, 16), TxKey: randKey(t, 16), RxSalt: [4]byte{1}, TxSalt: [4]byte{2}}
}

// TestVMRefusesRepeatedTxPair: once a generation was installed, activated
// and removed, a later generation under the same transmit SPI and key
// (which the kernel would take: the SPI is free again) is refused, and
// nothing of it is installed.
func TestVMRefusesRepeatedTxPair(t *testing.T) {
	needVM(t)
	a, b := newHost(t, "10.79.4.1"), newHost(t, "10.79.4.2")
	link(t, a, b)
	sa := backendTo(t, a, b)
	ctx := context.Background()
	if err := a.b.Install(ctx, sa); err != nil {
		t.Fatal(err)
	}
	if err := a.b.Activate(ctx, sa); err != nil {
		t.Fatal(err)
	}
	if err := a.b.Remove(ctx, sa); err != nil {
		t.Fatal(err)
	}
	again := *sa
	again.Generation, again.RxSPI, again.RxKey, again.TxKey = 2, 0x101, randKey(t, 16), sa.TxKey.Clone()
	err := a.b.Install(ctx, &again)
	if err == nil || !strings.Contains(err.Error(), "installed before") {
		t.Fatalf("install of a repeated transmit pair: %v, want it refused", err)
	}
	if hasSA(t, a, a.addr, again.RxSPI) || hasSA(t, a, b.addr, again.TxSPI) {
		t.Error("the refused generation left SAs in the kernel")
	}
	fresh := again
	fresh.Generation, fresh.RxSPI, fresh.RxKey, fresh.TxKey = 3, 0x102, randKey(t, 16), randKey(t, 16)
	if err := a.b.Install(ctx, &fresh); err != nil {
		t.Errorf("a new key under the same SPI: %v", err)
	}
}

// TestVMKeysWipedOnceInKernel: the backend holds a copy of the transmit
// key only between Install and Activate; Activate, a failed Activate and
// Remove wipe it, and the caller's keys are the caller's to wipe.
func TestVMKeysWipedOnceInKernel(t *testing.T) {
	needVM(t)
	a, b := newHost(t, "10.79.5.1"), newHost(t, "10.79.5.2")
	link(t, a, b)
	sa := backendTo(t, a, b)
	ctx := context.Background()
	held := func(want int) []secret.Key {
		t.Helper()
		ks := a.b.heldKeys()
		if len(ks) != want {
			t.Fatalf("backend holds %d keys, want %d", len(ks), want)
		}
		return ks
	}
	if err := a.b.Install(ctx, sa); err != nil {
		t.Fatal(err)
	}
	k := held(1)[0]
	if !k.Equal(sa.TxKey) {
		t.Fatal("the held key is not the transmit key")
	}
	if err := a.b.Activate(ctx, sa); err != nil {
		t.Fatal(err)
	}
	held(0)
	if !k.IsZero() {
		t.Error("Activate dropped the transmit key copy without wiping it")
	}
	if sa.TxKey.IsZero() || sa.RxKey.IsZero() {
		t.Error("the backend wiped the caller's keys")
	}

	// Removed before Activate.
	g2 := *sa
	g2.Generation, g2.RxSPI, g2.TxSPI, g2.RxKey, g2.TxKey = 2, 0x101, 0x40000101, randKey(t, 16), randKey(t, 16)
	if err := a.b.Install(ctx, &g2); err != nil {
		t.Fatal(err)
	}
	k = held(1)[0]
	if err := a.b.Remove(ctx, &g2); err != nil {
		t.Fatal(err)
	}
	held(0)
	if !k.IsZero() {
		t.Error("Remove before Activate left the transmit key copy")
	}

	// A failed Activate: the outbound SPI is taken by generation 1's SA.
	g3 := *sa
	g3.Generation, g3.RxSPI, g3.RxKey, g3.TxKey = 3, 0x102, randKey(t, 16), randKey(t, 16)
	if err := a.b.Install(ctx, &g3); err != nil {
		t.Fatal(err)
	}
	k = held(1)[0]
	if err := a.b.Activate(ctx, &g3); err == nil {
		t.Fatal("Activate under an SPI in use succeeded")
	}
	held(0)
	if !k.IsZero() {
		t.Error("a failed Activate left the transmit key copy")
	}
	if err := a.b.Activate(ctx, &g3); err == nil || !strings.Contains(err.Error(), "remove it") {
		t.Errorf("second Activate after a failure: %v", err)
	}
	if err := a.b.Remove(ctx, &g3); err != nil {
		t.Fatal(err)
	}
	logscan.AssertNoKeys(t, a.logs.Bytes(), sa.RxKey, sa.TxKey, g2.RxKey, g2.TxKey, g3.RxKey, g3.TxKey)
}
