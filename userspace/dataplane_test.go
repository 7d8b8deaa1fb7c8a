package userspace_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/userspace"
	"github.com/pspd/pspd/userspace/codec"
	"github.com/pspd/pspd/userspace/internal/nstest"
	"github.com/pspd/pspd/userspace/netutil"
	"github.com/pspd/pspd/userspace/tun"
	"github.com/pspd/pspd/userspace/udp"
	"github.com/pspd/pspd/userspace/xdp"
	"golang.org/x/sys/unix"
)

var (
	outerA = netip.MustParseAddr("192.0.2.1")
	outerB = netip.MustParseAddr("192.0.2.2")
	innerA = netip.MustParseAddr("10.200.0.1")
	innerB = netip.MustParseAddr("10.200.0.2")
)

// side is one namespace running a Dataplane with one peer (the other side).
type side struct {
	ns    *nstest.NS
	veth  string
	dp    *userspace.Dataplane
	codec *codec.Codec
	xdp   *userspace.XDPUnderlay // the underlay when it is AF_XDP, for its counters
}

// tunnel is two namespaces joined by veth, each running the real engine
// over the real TUN device and batched UDP underlay.
type tunnel struct {
	a, b    side
	framing codec.Framing
	suite   kdf.Suite
	master  []byte
	next    uint32 // key id for the next pair of SPIs
	spis    []kdf.SPI
}

func newTunnel(t testing.TB, f codec.Framing) *tunnel { return newTunnelIO(t, f, "udp") }

// newTunnelIO is newTunnel with the underlay io: "udp" (batched sockets),
// "udp-nogro" (the same without UDP GRO), "afxdp" (AF_XDP with the XDP
// program, native where the driver has it) or "afxdp-generic" (the program
// in generic mode).
func newTunnelIO(t testing.TB, f codec.Framing, underlay string) *tunnel {
	t.Helper()
	nstest.RequireRoot(t)
	tn := &tunnel{framing: f, suite: kdf.AESGCM256, master: make([]byte, kdf.MasterKeyLen)}
	rand.Read(tn.master)
	t.Cleanup(func() { secret.Zero(tn.master) })
	tn.a.ns, tn.b.ns = nstest.New(t), nstest.New(t)
	tn.a.veth, tn.b.veth = nstest.Veth(t, tn.a.ns, tn.b.ns,
		netip.PrefixFrom(outerA, 24), netip.PrefixFrom(outerB, 24))
	tn.a.start(t, f, underlay, innerA, innerB, outerB)
	tn.b.start(t, f, underlay, innerB, innerA, outerA)
	return tn
}

func (s *side) start(t testing.TB, f codec.Framing, underlay string, self, peer, peerOuter netip.Addr) {
	t.Helper()
	c, err := codec.New(codec.Config{Framing: f})
	if err != nil {
		t.Fatal(err)
	}
	s.codec = c
	t.Cleanup(c.Close)
	mtu, err := netutil.InnerMTU(1500, peerOuter, c.Overhead())
	if err != nil {
		t.Fatal(err)
	}
	name := nstest.Name("t")
	var dev *tun.Device
	var conn userspace.Underlay
	var xdpErr error
	if err := s.ns.Do(func() (err error) {
		if dev, err = tun.Open(name, mtu); err != nil {
			return err
		}
		if underlay == "afxdp" || underlay == "afxdp-generic" {
			l, err := s.ns.Netlink.LinkByName(s.veth)
			if err != nil {
				return err
			}
			mode := xdp.Auto
			if underlay == "afxdp-generic" {
				mode = xdp.Generic
			}
			s.xdp, xdpErr = userspace.NewXDPUnderlay(userspace.XDPConfig{
				Ifindex: l.Attrs().Index, Mode: mode, Port: f.Port(), Ports: []uint16{f.Port()}, Netlink: s.ns.Netlink,
			})
			conn = s.xdp
			return nil
		}
		// "udp-nogro" is the path of a kernel without UDP GRO, for benchmarks.
		conn, err = udp.ListenConfig{Batch: 64, NoGRO: underlay == "udp-nogro"}.Listen(netip.AddrPortFrom(netip.IPv4Unspecified(), f.Port()))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if xdpErr != nil {
		dev.Close()
		t.Skipf("AF_XDP underlay unavailable here (needs CONFIG_XDP_SOCKETS and BPF): %v", xdpErr)
	}
	s.dp, err = userspace.Start(context.Background(), userspace.Config{
		TUN: dev, Underlay: conn, MTU: mtu, Framing: f,
		Logger: slog.New(slog.NewTextHandler(testWriter{t}, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.dp.Close() })
	nstest.Addr(t, s.ns, name, netip.PrefixFrom(self, 32))
	// The TUN's queue (500 packets) holds what the kernel sends while the TX
	// loop waits for a core; a busy host is not a lost packet.
	l, err := s.ns.Netlink.LinkByName(name)
	if err == nil {
		err = s.ns.Netlink.LinkSetTxQLen(l, 4096)
	}
	if err != nil {
		t.Fatalf("txqueuelen of %s: %v", name, err)
	}
	nstest.Route(t, s.ns, name, netip.PrefixFrom(peer, 32))
	if err := s.dp.AddPeer(userspace.Peer{
		Endpoint: netip.AddrPortFrom(peerOuter, f.Port()),
		Prefixes: []netip.Prefix{netip.PrefixFrom(peer, 32)},
		Codec:    c,
	}); err != nil {
		t.Fatal(err)
	}
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) { w.t.Logf("%s", p); return len(p), nil }

// sa derives the SA for spi from the tunnel's master key, as the key
// exchange would.
func (tn *tunnel) sa(t testing.TB, spi kdf.SPI) codec.SA {
	t.Helper()
	k, err := kdf.Derive(tn.master, uint32(spi), tn.suite)
	if err != nil {
		t.Fatal(err)
	}
	return codec.SA{SPI: spi, Suite: tn.suite, Key: k}
}

// installRX installs a fresh RX SA on both sides and returns the SAs each
// side's peer must send on.
func (tn *tunnel) installRX(t testing.TB) (toA, toB codec.SA) {
	t.Helper()
	tn.next++
	sa, err := kdf.MakeSPI(0, kdf.Initiator, tn.next)
	if err != nil {
		t.Fatal(err)
	}
	sb, err := kdf.MakeSPI(0, kdf.Responder, tn.next)
	if err != nil {
		t.Fatal(err)
	}
	toA, toB = tn.sa(t, sa), tn.sa(t, sb)
	tn.spis = append(tn.spis, sa, sb)
	if err := tn.a.codec.InstallRX(toA); err != nil {
		t.Fatal(err)
	}
	if err := tn.b.codec.InstallRX(toB); err != nil {
		t.Fatal(err)
	}
	return toA, toB
}

// rekey is make-before-break: both RX SAs first, then both TX.
func (tn *tunnel) rekey(t testing.TB) {
	t.Helper()
	toA, toB := tn.installRX(t)
	defer toA.Key.Wipe()
	defer toB.Key.Wipe()
	if err := tn.a.codec.InstallTX(toB); err != nil {
		t.Fatal(err)
	}
	if err := tn.b.codec.InstallTX(toA); err != nil {
		t.Fatal(err)
	}
}

func framings(t *testing.T, f func(t *testing.T, fr codec.Framing)) {
	for _, fr := range []codec.Framing{codec.Geneve, codec.PSPTunnel} {
		t.Run(fr.String(), func(t *testing.T) { f(t, fr) })
	}
}

// underlays runs f for each framing on each underlay.
func underlays(t *testing.T, f func(t *testing.T, fr codec.Framing, underlay string)) {
	for _, u := range []string{"udp", "afxdp"} {
		t.Run(u, func(t *testing.T) {
			framings(t, func(t *testing.T, fr codec.Framing) { f(t, fr, u) })
		})
	}
}

func TestPing(t *testing.T) {
	underlays(t, func(t *testing.T, fr codec.Framing, underlay string) {
		tn := newTunnelIO(t, fr, underlay)
		tn.rekey(t)
		var c net.PacketConn
		if err := tn.a.ns.Do(func() (err error) { c, err = net.ListenPacket("ip4:icmp", innerA.String()); return err }); err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		for seq := range 3 {
			echo := icmpEcho(0x5053, uint16(seq), []byte("pspd ping"))
			if _, err := c.WriteTo(echo, &net.IPAddr{IP: innerB.AsSlice()}); err != nil {
				t.Fatal(err)
			}
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			b := make([]byte, 1500)
			for {
				n, from, err := c.ReadFrom(b)
				if err != nil {
					t.Fatalf("echo %d: %v (stats A %+v)", seq, err, tn.a.dp.Stats())
				}
				// Raw ICMP sockets also see our own requests on some
				// paths; wait for the reply.
				if b[0] == 0 && from.String() == innerB.String() &&
					binary.BigEndian.Uint16(b[6:]) == uint16(seq) && bytes.Equal(b[8:n], []byte("pspd ping")) {
					break
				}
			}
		}
	})
}

func icmpEcho(id, seq uint16, data []byte) []byte {
	b := make([]byte, 8+len(data))
	b[0] = 8
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], seq)
	copy(b[8:], data)
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	binary.BigEndian.PutUint16(b[2:], ^uint16(sum))
	return b
}

func TestTCPTransfer(t *testing.T) {
	underlays(t, func(t *testing.T, fr codec.Framing, underlay string) {
		tn := newTunnelIO(t, fr, underlay)
		tn.rekey(t)
		const size = 8 << 20
		data := make([]byte, size)
		rand.Read(data)
		want := sha256.Sum256(data)

		var ln net.Listener
		if err := tn.b.ns.Do(func() (err error) { ln, err = net.Listen("tcp4", innerB.String()+":5001"); return err }); err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		got := make(chan [32]byte, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				got <- [32]byte{}
				return
			}
			defer c.Close()
			h := sha256.New()
			io.Copy(h, c)
			got <- [32]byte(h.Sum(nil))
		}()
		var c net.Conn
		if err := tn.a.ns.Do(func() (err error) {
			c, err = net.DialTimeout("tcp4", innerB.String()+":5001", 5*time.Second)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(60 * time.Second))
		if _, err := c.Write(data); err != nil {
			t.Fatal(err)
		}
		c.Close()
		select {
		case h := <-got:
			if h != want {
				t.Fatal("received data differs from sent data")
			}
		case <-time.After(60 * time.Second):
			t.Fatal("transfer did not finish")
		}
	})
}

// capture is an AF_PACKET socket on one veth end, seeing every frame.
type capture struct{ fd int }

func startCapture(t *testing.T, s *side) *capture {
	t.Helper()
	var fd int
	if err := s.ns.Do(func() error {
		l, err := s.ns.Netlink.LinkByName(s.veth)
		if err != nil {
			return err
		}
		proto := int(htons(unix.ETH_P_ALL))
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
		if err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: uint16(proto), Ifindex: l.Attrs().Index})
	}); err != nil {
		t.Fatalf("capture on %s: %v", s.veth, err)
	}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 200_000})
	t.Cleanup(func() { unix.Close(fd) })
	return &capture{fd}
}

func htons(v uint16) uint16 { return v>>8 | v<<8 }

// frames reads frames until d passes without one.
func (c *capture) frames(d time.Duration) [][]byte {
	var out [][]byte
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		b := make([]byte, 65536)
		n, _, err := unix.Recvfrom(c.fd, b, 0)
		if err != nil {
			continue
		}
		out = append(out, b[:n])
	}
	return out
}

// udpDst returns the destination port of an Ethernet/IPv4/UDP frame.
func udpDst(f []byte) (uint16, bool) {
	if len(f) < 14+20+8 || binary.BigEndian.Uint16(f[12:]) != unix.ETH_P_IP || f[14+9] != unix.IPPROTO_UDP {
		return 0, false
	}
	ihl := int(f[14]&0xf) * 4
	if len(f) < 14+ihl+8 {
		return 0, false
	}
	return binary.BigEndian.Uint16(f[14+ihl+2:]), true
}

// udpSocket opens a UDP socket on addr inside s's namespace.
func udpSocket(t *testing.T, s *side, addr netip.AddrPort) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	if err := s.ns.Do(func() (err error) { c, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(addr)); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	// Tests that count every datagram read slower than the tunnel delivers
	// when the host is busy; the default buffer (256 small datagrams)
	// then loses some, which is not the engine's doing.
	if err := c.SetReadBuffer(4 << 20); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestNoPlaintextOnUnderlay(t *testing.T) {
	framings(t, func(t *testing.T, fr codec.Framing) {
		tn := newTunnel(t, fr)
		tn.rekey(t)
		cap := startCapture(t, &tn.a)
		canary := []byte("PSPD-CANARY-7f3a9c-plaintext-must-not-leak")
		src := udpSocket(t, &tn.a, netip.AddrPortFrom(innerA, 0))
		dst := udpSocket(t, &tn.b, netip.AddrPortFrom(innerB, 7001))
		const n = 20
		for range n {
			if _, err := src.WriteToUDPAddrPort(canary, netip.AddrPortFrom(innerB, 7001)); err != nil {
				t.Fatal(err)
			}
		}
		dst.SetReadDeadline(time.Now().Add(5 * time.Second))
		b := make([]byte, 1500)
		for i := range n {
			m, err := dst.Read(b)
			if err != nil || !bytes.Equal(b[:m], canary) {
				t.Fatalf("datagram %d through the tunnel: %q, %v", i, b[:m], err)
			}
		}
		// The underlay may send a run of datagrams as one segmented (GSO)
		// packet, which the capture sees whole: count payload bytes.
		tunnelled := 0
		for _, f := range cap.frames(300 * time.Millisecond) {
			if bytes.Contains(f, canary) {
				t.Fatalf("canary in plaintext on the underlay: % x", f)
			}
			if p, ok := udpDst(f); ok && p == fr.Port() {
				tunnelled += len(f) - 14 - int(f[14]&0xf)*4 - 8
			}
		}
		if tunnelled < n*len(canary) {
			t.Fatalf("captured %d bytes of %v payload on the underlay, want at least %d", tunnelled, fr, n*len(canary))
		}
	})
}

func TestFailClosedWithoutTXSA(t *testing.T) {
	tn := newTunnel(t, codec.Geneve)
	// Only RX SAs: neither side may send anything.
	toA, toB := tn.installRX(t)
	toA.Key.Wipe()
	toB.Key.Wipe()
	cap := startCapture(t, &tn.a)
	src := udpSocket(t, &tn.a, netip.AddrPortFrom(innerA, 0))
	const n = 10
	for range n {
		src.WriteToUDPAddrPort([]byte("must not leave"), netip.AddrPortFrom(innerB, 7001))
	}
	for _, f := range cap.frames(300 * time.Millisecond) {
		if p, ok := udpDst(f); ok && p == codec.Geneve.Port() {
			t.Fatalf("a packet left on the underlay without a TX SA: % x", f)
		}
		if bytes.Contains(f, []byte("must not leave")) {
			t.Fatalf("plaintext on the underlay: % x", f)
		}
	}
	st := tn.a.dp.Stats()
	if len(st.Peers) != 1 || st.Peers[0].Codec.Drops[codec.DropTXNoSA] < n || st.Peers[0].TXPackets != 0 {
		t.Fatalf("want >= %d tx-no-sa drops and no TX packets, got %+v", n, st.Peers)
	}
}

func TestRekeyUnderTrafficLosesNothing(t *testing.T) {
	tn := newTunnel(t, codec.Geneve)
	tn.rekey(t)
	src := udpSocket(t, &tn.a, netip.AddrPortFrom(innerA, 0))
	dst := udpSocket(t, &tn.b, netip.AddrPortFrom(innerB, 7002))
	const total = 3000
	// B echoes every datagram, so both directions carry traffic and see
	// each new SA: that is what retires the old RX SAs.
	seenB := count(dst, total, true)
	seenA := count(src, total, false)
	// ~6000 datagrams/s, rekeying every 500: a rekey lands among packets
	// in flight in both directions of the pipeline.
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	to := netip.AddrPortFrom(innerB, 7002)
	for seq := range uint32(total) {
		if seq%6 == 0 {
			<-tick.C
		}
		if seq%500 == 250 {
			tn.rekey(t)
		}
		if _, err := src.WriteToUDPAddrPort(binary.BigEndian.AppendUint32(nil, seq), to); err != nil {
			t.Fatal(err)
		}
	}
	for dir, seen := range map[string]chan []int{"A→B": seenB, "B→A": seenA} {
		if missing := <-seen; len(missing) > 0 {
			t.Errorf("%s lost %d of %d datagrams across %d key generations; first %v\nA %+v\nB %+v",
				dir, len(missing), total, tn.next, missing[:min(20, len(missing))], tn.a.dp.Stats(), tn.b.dp.Stats())
		}
	}
	if tn.next < 6 {
		t.Fatalf("only %d key generations", tn.next)
	}
	t.Logf("%d datagrams across %d key generations, none lost", total, tn.next)

	// Nothing the engine reports carries key bytes, in any format.
	out := []byte(fmt.Sprintf("%v %+v %#v %v %+v %#v", tn.a.dp.Stats(), tn.a.dp.Stats(), tn.a.dp.Stats(),
		tn.b.dp.Stats(), tn.b.dp.Stats(), tn.b.dp.Stats()))
	for _, spi := range tn.spis {
		sa := tn.sa(t, spi)
		k := sa.Key.Bytes()
		if bytes.Contains(out, k) || bytes.Contains(out, []byte(fmt.Sprintf("%x", k))) {
			t.Errorf("key of SPI %#x appears in Stats output", uint32(spi))
		}
		sa.Key.Wipe()
	}
}

// count reads 4-byte sequence numbers from c until all of 0..total-1 have
// arrived or 30 s pass, echoing each back if echo is set, and sends the
// missing ones.
func count(c *net.UDPConn, total int, echo bool) chan []int {
	res := make(chan []int, 1)
	go func() {
		seen := make([]bool, total)
		b := make([]byte, 64)
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		for got := 0; got < total; {
			n, from, err := c.ReadFromUDPAddrPort(b)
			if err != nil {
				break
			}
			if n != 4 {
				continue
			}
			if echo {
				c.WriteToUDPAddrPort(b[:4], from)
			}
			if s := binary.BigEndian.Uint32(b); s < uint32(total) && !seen[s] {
				seen[s] = true
				got++
			}
		}
		var missing []int
		for i, ok := range seen {
			if !ok {
				missing = append(missing, i)
			}
		}
		res <- missing
	}()
	return res
}

func TestSourceNotAllowedDropped(t *testing.T) {
	tn := newTunnel(t, codec.Geneve)
	tn.rekey(t)
	// A may send from 10.200.0.9 (its TUN has the address and B is routed
	// there), but B only accepts 10.200.0.1/32 from A.
	spoofed := netip.MustParseAddr("10.200.0.9")
	nstest.Addr(t, tn.a.ns, tunName(t, &tn.a), netip.PrefixFrom(spoofed, 32))
	src := udpSocket(t, &tn.a, netip.AddrPortFrom(spoofed, 0))
	good := udpSocket(t, &tn.a, netip.AddrPortFrom(innerA, 0))
	dst := udpSocket(t, &tn.b, netip.AddrPortFrom(innerB, 7003))
	to := netip.AddrPortFrom(innerB, 7003)
	const n = 5
	for range n {
		src.WriteToUDPAddrPort([]byte("spoofed"), to)
	}
	good.WriteToUDPAddrPort([]byte("allowed"), to)
	dst.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 100)
	m, err := dst.Read(b)
	if err != nil || string(b[:m]) != "allowed" {
		t.Fatalf("first datagram delivered: %q, %v; want only the allowed one", b[:m], err)
	}
	// The engine counts a batch after writing it to the TUN device, so the
	// reader can see the datagram a moment before the counters move.
	st := tn.b.dp.Stats()
	for deadline := time.Now().Add(time.Second); st.Peers[0].RXPackets < 1 && time.Now().Before(deadline); st = tn.b.dp.Stats() {
		time.Sleep(time.Millisecond)
	}
	if got := st.Peers[0].Drops[userspace.DropSrcNotAllowed]; got != n {
		t.Fatalf("src-not-allowed drops = %d, want %d (%+v)", got, n, st)
	}
	if st.Peers[0].RXPackets != 1 {
		t.Fatalf("RX packets = %d, want 1", st.Peers[0].RXPackets)
	}
}

// tunName finds the TUN device in s's namespace.
func tunName(t *testing.T, s *side) string {
	t.Helper()
	links, err := s.ns.Netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		if l.Type() == "tuntap" {
			return l.Attrs().Name
		}
	}
	t.Fatal("no TUN device")
	return ""
}

// TestKeepalive: a peer given a keep-alive interval is sent an empty
// authenticated packet whenever nothing else went to it for that long,
// on each underlay; the receiver takes it as authenticated and delivers
// nothing, and a peer without the interval is sent none.
func TestKeepalive(t *testing.T) {
	underlays(t, func(t *testing.T, fr codec.Framing, underlay string) {
		tn := newTunnelIO(t, fr, underlay)
		tn.rekey(t)
		if err := tn.a.dp.UpdatePeer(netip.AddrPortFrom(outerB, fr.Port()), userspace.Peer{
			Endpoint: netip.AddrPortFrom(outerB, fr.Port()), Prefixes: []netip.Prefix{netip.PrefixFrom(innerB, 32)},
			Codec: tn.a.codec, Keepalive: time.Second,
		}); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			a, b := tn.a.dp.Stats().Peers[0], tn.b.dp.Stats().Peers[0]
			if a.Keepalives >= 2 && b.Codec.Keepalives >= 2 && b.Codec.Drops[codec.DropEmpty] == 0 {
				if a.TXPackets != 0 || b.RXPackets != 0 {
					t.Errorf("keep-alives counted as traffic: a sent %d, b delivered %d", a.TXPackets, b.RXPackets)
				}
				if b.Keepalives != 0 || a.Codec.Keepalives != 0 {
					t.Errorf("b, without an interval, sent %d keep-alives", b.Keepalives)
				}
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("10s with a 1s interval: a sent %d keep-alives, b authenticated %d (and dropped %d)", a.Keepalives, b.Codec.Keepalives, b.Codec.Drops[codec.DropEmpty])
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
}
