package userspace_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/userspace"
	"github.com/pspd/pspd/userspace/codec"
	"github.com/pspd/pspd/userspace/udp"
)

// pipeTUN is a fake TUN device: the test injects the packets it reads and
// receives those written to it. The real device runs in the netns tests
// of dataplane_test.go; this one lets both directions run on loopback
// without root.
type pipeTUN struct {
	in     chan []byte
	got    chan []byte
	closed chan struct{}
}

func newPipeTUN() *pipeTUN {
	return &pipeTUN{in: make(chan []byte, 16), got: make(chan []byte, 16), closed: make(chan struct{})}
}

func (f *pipeTUN) ReadBatch(bufs [][]byte, lens []int) (int, error) {
	select {
	case p := <-f.in:
		lens[0] = copy(bufs[0], p)
		return 1, nil
	case <-f.closed:
		return 0, os.ErrClosed
	}
}

func (f *pipeTUN) WriteBatch(pkts [][]byte) (int, error) {
	for _, p := range pkts {
		f.got <- append([]byte(nil), p...)
	}
	return len(pkts), nil
}

func (f *pipeTUN) Close() error { close(f.closed); return nil }

// ipv4 is a minimal IPv4/UDP packet from src to dst.
func ipv4(src, dst netip.Addr, fill byte) []byte {
	p := innerFrom(src, fill)
	d := dst.As4()
	copy(p[16:], d[:])
	return p
}

// roamRig is an engine on loopback with one peer, and the peer's own codec
// on the far side, which can send from any of several loopback sockets.
type roamRig struct {
	t      *testing.T
	dp     *userspace.Dataplane
	tun    *pipeTUN
	local  netip.AddrPort
	engine *codec.Codec // the engine's codec for the peer
	remote *codec.Codec // the peer's: seals what it sends, opens what it gets
	inner  netip.Addr   // the peer's inner address
	self   netip.Addr   // the engine host's inner address
}

func newRoamRig(t *testing.T, configured *net.UDPConn) *roamRig {
	t.Helper()
	fr, suite := codec.Geneve, kdf.AESGCM256
	u, err := udp.Listen(netip.MustParseAddrPort("127.0.0.1:0"), 8)
	if err != nil {
		t.Fatal(err)
	}
	r := &roamRig{t: t, tun: newPipeTUN(), local: u.LocalAddr(),
		inner: netip.MustParseAddr("10.1.0.1"), self: netip.MustParseAddr("10.0.0.1")}
	r.dp, err = userspace.Start(context.Background(), userspace.Config{TUN: r.tun, Underlay: u, MTU: 1400, Framing: fr})
	if err != nil {
		u.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { r.dp.Close() })
	for _, c := range []**codec.Codec{&r.engine, &r.remote} {
		if *c, err = codec.New(codec.Config{Framing: fr}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup((*c).Close)
	}
	key := func(seed byte) secret.Key {
		k := make([]byte, suite.KeyLen())
		for i := range k {
			k[i] = seed + byte(i)
		}
		return secret.Own(k)
	}
	in, out := key(0x10), key(0x90)
	defer in.Wipe()
	defer out.Wipe()
	for _, step := range []error{
		r.remote.InstallTX(codec.SA{SPI: 256, Suite: suite, Key: in}),
		r.engine.InstallRX(codec.SA{SPI: 256, Suite: suite, Key: in}),
		r.remote.InstallRX(codec.SA{SPI: 300, Suite: suite, Key: out}),
		r.engine.InstallTX(codec.SA{SPI: 300, Suite: suite, Key: out}),
	} {
		if step != nil {
			t.Fatal(step)
		}
	}
	if err := r.dp.AddPeer(userspace.Peer{
		Endpoint: configured.LocalAddr().(*net.UDPAddr).AddrPort(),
		Prefixes: []netip.Prefix{netip.PrefixFrom(r.inner, 32)},
		Codec:    r.engine,
	}); err != nil {
		t.Fatal(err)
	}
	return r
}

// rekey gives the peer's direction towards the engine a new SA, as a
// rekey does: the engine's codec receives on spi before the peer sends.
func (r *roamRig) rekey(spi kdf.SPI, seed byte) {
	r.t.Helper()
	k := make([]byte, kdf.AESGCM256.KeyLen())
	for i := range k {
		k[i] = seed + byte(i)
	}
	key := secret.Own(k)
	defer key.Wipe()
	if err := r.engine.InstallRX(codec.SA{SPI: spi, Suite: kdf.AESGCM256, Key: key}); err != nil {
		r.t.Fatal(err)
	}
	if err := r.remote.InstallTX(codec.SA{SPI: spi, Suite: kdf.AESGCM256, Key: key}); err != nil {
		r.t.Fatal(err)
	}
}

// seal returns a fresh packet from the peer, carrying fill.
func (r *roamRig) seal(fill byte) []byte {
	r.t.Helper()
	pkt := ipv4(r.inner, r.self, fill)
	buf := make([]byte, r.remote.Overhead()+len(pkt))
	n, err := r.remote.SealTo(buf, pkt)
	if err != nil {
		r.t.Fatal(err)
	}
	return buf[:n]
}

func (r *roamRig) sendFrom(c *net.UDPConn, payload []byte) {
	r.t.Helper()
	if _, err := c.WriteToUDPAddrPort(payload, r.local); err != nil {
		r.t.Fatal(err)
	}
}

// delivered reports whether the engine wrote a packet filled with fill to
// its TUN device within wait; any other packet fails the test.
func (r *roamRig) delivered(fill byte, wait time.Duration) bool {
	r.t.Helper()
	select {
	case p := <-r.tun.got:
		if p[28] != fill {
			r.t.Fatalf("delivered a packet filled with %#x, want %#x", p[28], fill)
		}
		return true
	case <-time.After(wait):
		return false
	}
}

// replyGoesTo has the engine send one packet to the peer and reports
// which of conns received it (nil: none within 2s).
func (r *roamRig) replyGoesTo(fill byte, conns ...*net.UDPConn) *net.UDPConn {
	r.t.Helper()
	r.tun.in <- ipv4(r.self, r.inner, fill)
	type got struct {
		c   *net.UDPConn
		buf []byte
	}
	ch := make(chan got, len(conns))
	for _, c := range conns {
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
	}
	for _, c := range conns {
		go func() {
			buf := make([]byte, 2048)
			n, _, err := c.ReadFromUDPAddrPort(buf)
			if err == nil {
				ch <- got{c, buf[:n]}
			} else if !errors.Is(err, os.ErrDeadlineExceeded) {
				r.t.Error(err)
			}
			if err == nil {
				return
			}
			ch <- got{}
		}()
	}
	var to *net.UDPConn
	for range conns {
		g := <-ch
		if g.c == nil {
			continue
		}
		// One socket got it: give the others a moment to show a
		// duplicate, not the full wait.
		for _, c := range conns {
			if c != g.c {
				c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
			}
		}
		if to != nil {
			r.t.Fatal("the engine's packet arrived at two sockets")
		}
		out := make([]byte, len(g.buf))
		n, reason := r.remote.OpenTo(codec.Geneve, out, g.buf)
		if reason != codec.Pass || out[28] != fill || n == 0 {
			r.t.Fatalf("the peer cannot open the engine's packet: %v", reason)
		}
		to = g.c
	}
	return to
}

func (r *roamRig) current() (netip.AddrPort, uint64) {
	st := r.dp.Stats()
	if len(st.Peers) != 1 {
		r.t.Fatalf("%d peers in stats, want 1", len(st.Peers))
	}
	return st.Peers[0].Current, st.Peers[0].Roams
}

func listenLoopback(t *testing.T, addr string) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr+":0")))
	if err != nil {
		t.Skipf("cannot bind loopback address %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestRoaming: the engine finds a peer's packets by SPI wherever they come
// from, authenticates them before believing their source, and moves the
// peer's send address only for an authenticated packet newer than any
// before it. A forged packet (valid SPI, bad tag) and a replay from a new
// address move nothing; a delayed genuine packet from the old address is
// delivered but does not move the peer back.
func TestRoaming(t *testing.T) {
	home := listenLoopback(t, "127.0.0.2")  // the configured endpoint
	rogue := listenLoopback(t, "127.0.0.4") // an attacker
	away := listenLoopback(t, "127.0.0.5")  // where the peer roams to
	r := newRoamRig(t, home)
	all := []*net.UDPConn{home, rogue, away}

	first := r.seal(1)
	r.sendFrom(home, first)
	if !r.delivered(1, 5*time.Second) {
		t.Fatal("a packet from the configured endpoint was not delivered")
	}
	if to := r.replyGoesTo(2, all...); to != home {
		t.Fatalf("engine sent to %v, want the configured endpoint", to.LocalAddr())
	}

	// Forged: the peer's SPI and a header the codec accepts, a bad tag.
	forged := r.seal(3)
	forged[len(forged)-1] ^= 1
	r.sendFrom(rogue, forged)
	if r.delivered(3, 300*time.Millisecond) {
		t.Fatal("a forged packet was delivered")
	}
	if got := r.engine.Stats().Drops[codec.DropAuth]; got != 1 {
		t.Fatalf("auth drops %d, want the forged packet counted", got)
	}
	// Replayed from a new address.
	r.sendFrom(rogue, first)
	if r.delivered(1, 300*time.Millisecond) {
		t.Fatal("a replayed packet was delivered")
	}
	if cur, n := r.current(); cur != home.LocalAddr().(*net.UDPAddr).AddrPort() || n != 0 {
		t.Fatalf("after a forgery and a replay the peer is at %v after %d moves; want the configured endpoint, no move", cur, n)
	}
	if to := r.replyGoesTo(4, all...); to != home {
		t.Fatalf("after a forgery the engine sent to %v, want the configured endpoint", to.LocalAddr())
	}

	// The peer roams (a NAT rebinding): its next packet comes from away.
	delayed := r.seal(5) // sent late, from home, below
	r.sendFrom(away, r.seal(6))
	if !r.delivered(6, 5*time.Second) {
		t.Fatal("an authenticated packet from a new address was not delivered")
	}
	if to := r.replyGoesTo(7, all...); to != away {
		t.Fatalf("after the peer roamed the engine sent to %v, want the new address %v", to.LocalAddr(), away.LocalAddr())
	}
	if cur, n := r.current(); cur != away.LocalAddr().(*net.UDPAddr).AddrPort() || n != 1 {
		t.Fatalf("peer at %v after %d moves, want %v after 1", cur, n, away.LocalAddr())
	}

	// A genuine packet that was delayed on the old path is fresh to the
	// replay window, so it is delivered, but it is older than what the
	// peer sent from away: the peer stays there.
	r.sendFrom(home, delayed)
	if !r.delivered(5, 5*time.Second) {
		t.Fatal("a delayed genuine packet was not delivered")
	}
	if to := r.replyGoesTo(8, all...); to != away {
		t.Fatalf("a delayed packet moved the peer back to %v", to.LocalAddr())
	}
	// Newer packets from the old address bring it back.
	r.sendFrom(home, r.seal(9))
	if !r.delivered(9, 5*time.Second) {
		t.Fatal("not delivered")
	}
	if to := r.replyGoesTo(10, all...); to != home {
		t.Fatalf("the peer came back but the engine sent to %v", to.LocalAddr())
	}

	// A rekey, then a roam: the first packet under the new SPI comes from
	// a new address, so the engine finds it by an SPI it has not indexed
	// yet. Past the index's rebuild interval it is found at once.
	late := r.seal(13) // under the old SA
	r.rekey(257, 0x50)
	time.Sleep(150 * time.Millisecond)
	r.sendFrom(away, r.seal(11))
	if !r.delivered(11, 5*time.Second) {
		t.Fatal("the first packet under a new SPI, from a new address, was not delivered")
	}
	if to := r.replyGoesTo(12, all...); to != away {
		t.Fatalf("after a rekey and a roam the engine sent to %v, want %v", to.LocalAddr(), away.LocalAddr())
	}
	// A late packet under the old SA, from the old address, is from
	// before the peer's switch to the new SA: whether the codec still
	// takes it or not, it moves nothing.
	r.sendFrom(home, late)
	r.delivered(13, 300*time.Millisecond)
	if to := r.replyGoesTo(14, all...); to != away {
		t.Fatalf("a late packet under the old SA moved the peer to %v", to.LocalAddr())
	}
	if _, n := r.current(); n != 3 {
		t.Fatalf("%d moves, want 3", n)
	}
}

// TestRoamingSharedSPI: two peers receive on the same SPI (SPIs are
// allocated per session). A packet of the second from a new address is
// tried with both codecs; whichever order the engine tries them in, it is
// delivered as the second peer's, only the second peer moves, and the
// first peer's packets, from its own address, still open in place.
func TestRoamingSharedSPI(t *testing.T) {
	homeA := listenLoopback(t, "127.0.0.2")
	homeB := listenLoopback(t, "127.0.0.3")
	r := newRoamRig(t, homeA)

	// Peer B: its own keys, the same SPIs as A.
	fr, suite := codec.Geneve, kdf.AESGCM256
	var engB, remB *codec.Codec
	for _, c := range []**codec.Codec{&engB, &remB} {
		var err error
		if *c, err = codec.New(codec.Config{Framing: fr}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup((*c).Close)
	}
	kb := make([]byte, suite.KeyLen())
	for i := range kb {
		kb[i] = 0x40 + byte(i)
	}
	k := secret.Own(kb)
	defer k.Wipe()
	if err := remB.InstallTX(codec.SA{SPI: 256, Suite: suite, Key: k}); err != nil {
		t.Fatal(err)
	}
	if err := engB.InstallRX(codec.SA{SPI: 256, Suite: suite, Key: k}); err != nil {
		t.Fatal(err)
	}
	innerB := netip.MustParseAddr("10.2.0.1")
	if err := r.dp.AddPeer(userspace.Peer{
		Endpoint: homeB.LocalAddr().(*net.UDPAddr).AddrPort(),
		Prefixes: []netip.Prefix{netip.PrefixFrom(innerB, 32)},
		Codec:    engB,
	}); err != nil {
		t.Fatal(err)
	}
	sealB := func(fill byte) []byte {
		pkt := ipv4(innerB, r.self, fill)
		buf := make([]byte, remB.Overhead()+len(pkt))
		n, err := remB.SealTo(buf, pkt)
		if err != nil {
			t.Fatal(err)
		}
		return buf[:n]
	}
	at := func(ep netip.AddrPort) netip.AddrPort {
		for _, p := range r.dp.Stats().Peers {
			if p.Endpoint == ep {
				return p.Current
			}
		}
		t.Fatalf("no peer %v", ep)
		return netip.AddrPort{}
	}
	epA, epB := homeA.LocalAddr().(*net.UDPAddr).AddrPort(), homeB.LocalAddr().(*net.UDPAddr).AddrPort()

	// Map order decides which codec is tried first; several rounds from
	// several addresses cover both orders with high probability.
	for i := range 8 {
		away := listenLoopback(t, "127.0.0.6")
		fill := byte(0x20 + i)
		r.sendFrom(away, sealB(fill))
		select {
		case p := <-r.tun.got:
			if netip.AddrFrom4([4]byte(p[12:16])) != innerB || p[28] != fill {
				t.Fatalf("round %d: delivered %x, want B's packet %#x", i, p[:29], fill)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("round %d: B's packet from a new address not delivered", i)
		}
		if got, want := at(epB), away.LocalAddr().(*net.UDPAddr).AddrPort(); got != want {
			t.Fatalf("round %d: B at %v, want %v", i, got, want)
		}
		if got := at(epA); got != epA {
			t.Fatalf("round %d: A moved to %v", i, got)
		}
		r.sendFrom(homeA, r.seal(fill))
		if !r.delivered(fill, 5*time.Second) {
			t.Fatalf("round %d: A's packet from its own address not delivered", i)
		}
	}
	if d := engB.Stats().Drops[codec.DropAuth]; d != 0 {
		t.Fatalf("B's codec counted %d auth drops, want 0", d)
	}
}

// TestUpdatePeerKeepsRoam: an UpdatePeer that keeps the configured
// endpoint (a reload that changed prefixes) keeps where the peer roamed
// to; one that changes the endpoint sends to the new one.
func TestUpdatePeerKeepsRoam(t *testing.T) {
	home := listenLoopback(t, "127.0.0.2")
	away := listenLoopback(t, "127.0.0.5")
	moved := listenLoopback(t, "127.0.0.7") // the operator's new endpoint
	r := newRoamRig(t, home)
	all := []*net.UDPConn{home, away, moved}
	r.sendFrom(away, r.seal(1))
	if !r.delivered(1, 5*time.Second) {
		t.Fatal("not delivered")
	}
	ep := home.LocalAddr().(*net.UDPAddr).AddrPort()
	wider := []netip.Prefix{netip.MustParsePrefix("10.1.0.0/24")}
	if err := r.dp.UpdatePeer(ep, userspace.Peer{Endpoint: ep, Prefixes: wider, Codec: r.engine}); err != nil {
		t.Fatal(err)
	}
	if to := r.replyGoesTo(2, all...); to != away {
		t.Fatalf("after a prefix update the engine sent to %v, want where the peer roamed (%v)", to.LocalAddr(), away.LocalAddr())
	}
	next := moved.LocalAddr().(*net.UDPAddr).AddrPort()
	if err := r.dp.UpdatePeer(ep, userspace.Peer{Endpoint: next, Prefixes: wider, Codec: r.engine}); err != nil {
		t.Fatal(err)
	}
	if to := r.replyGoesTo(3, all...); to != moved {
		t.Fatalf("after an endpoint update the engine sent to %v, want the new endpoint %v", to.LocalAddr(), moved.LocalAddr())
	}
	// The peer is still where it roamed; its next packet moves it back.
	r.sendFrom(away, r.seal(4))
	if !r.delivered(4, 5*time.Second) {
		t.Fatal("not delivered")
	}
	if to := r.replyGoesTo(5, all...); to != away {
		t.Fatalf("engine sent to %v, want %v", to.LocalAddr(), away.LocalAddr())
	}
}
