package userspace_test

import (
	"context"
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

// recordingTUN is a fake TUN device that hands every packet written to it
// to a channel and never has a packet to read. The real device is
// exercised by the netns tests in dataplane_test.go; this one lets the
// receive path run on loopback without root.
type recordingTUN struct {
	got    chan []byte
	closed chan struct{}
}

func (f *recordingTUN) ReadBatch([][]byte, []int) (int, error) {
	<-f.closed
	return 0, os.ErrClosed
}

func (f *recordingTUN) WriteBatch(pkts [][]byte) (int, error) {
	for _, p := range pkts {
		f.got <- append([]byte(nil), p...)
	}
	return len(pkts), nil
}

func (f *recordingTUN) Close() error { close(f.closed); return nil }

// innerFrom is a minimal IPv4/UDP packet from src.
func innerFrom(src netip.Addr, fill byte) []byte {
	p := make([]byte, 28+16)
	p[0], p[8], p[9] = 0x45, 64, 17
	p[2], p[3] = byte(len(p)>>8), byte(len(p))
	s := src.As4()
	copy(p[12:], s[:])
	copy(p[16:], []byte{10, 0, 0, 1})
	for i := 28; i < len(p); i++ {
		p[i] = fill
	}
	return p
}

// TestSameRXSPIForTwoPeers: two peers of the same role both have this
// host receive on SPI 256 (each session allocates from 256 up). The
// engine opens a payload from a peer's current address with that peer's
// codec only (roam_test.go covers other addresses), and each peer's codec
// has its own SA table, so peer B's
// install neither replaces nor shadows peer A's SA, and removing B's
// leaves A's. (Issue 11 item 3 is the XFRM version, where the kernel keys
// inbound SAs by SPI.)
func TestSameRXSPIForTwoPeers(t *testing.T) {
	const spi kdf.SPI = 256
	suite := kdf.AESGCM256
	fr := codec.Geneve
	u, err := udp.Listen(netip.MustParseAddrPort("127.0.0.1:0"), 8)
	if err != nil {
		t.Fatal(err)
	}
	tunDev := &recordingTUN{got: make(chan []byte, 16), closed: make(chan struct{})}
	dp, err := userspace.Start(context.Background(), userspace.Config{TUN: tunDev, Underlay: u, MTU: 1400, Framing: fr})
	if err != nil {
		u.Close()
		t.Fatal(err)
	}
	defer dp.Close()
	local := u.LocalAddr()

	type remote struct {
		name   string
		conn   *net.UDPConn
		inner  netip.Addr
		rx     *codec.Codec // this host's codec for the peer
		sealer *codec.Codec // the peer's own TX side
	}
	mk := func(name string, outer, inner string, seed byte) *remote {
		conn, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(outer+":0")))
		if err != nil {
			t.Skipf("cannot bind loopback address %s: %v", outer, err)
		}
		t.Cleanup(func() { conn.Close() })
		r := &remote{name: name, conn: conn, inner: netip.MustParseAddr(inner)}
		for _, c := range []**codec.Codec{&r.rx, &r.sealer} {
			if *c, err = codec.New(codec.Config{Framing: fr}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup((*c).Close)
		}
		key := make([]byte, suite.KeyLen())
		for i := range key {
			key[i] = seed + byte(i)
		}
		k := secret.Own(key)
		defer k.Wipe()
		if err := r.sealer.InstallTX(codec.SA{SPI: spi, Suite: suite, Key: k}); err != nil {
			t.Fatal(err)
		}
		if err := dp.AddPeer(userspace.Peer{
			Endpoint: conn.LocalAddr().(*net.UDPAddr).AddrPort(),
			Prefixes: []netip.Prefix{netip.PrefixFrom(r.inner, 32)},
			Codec:    r.rx,
		}); err != nil {
			t.Fatal(err)
		}
		if err := r.rx.InstallRX(codec.SA{SPI: spi, Suite: suite, Key: k}); err != nil {
			t.Fatalf("peer %s: install RX SPI %v: %v", name, spi, err)
		}
		return r
	}
	a := mk("A", "127.0.0.2", "10.1.0.1", 0x10)
	b := mk("B", "127.0.0.3", "10.2.0.1", 0x80) // same SPI, installed after A's

	// send seals a packet from `from`'s inner address with `key`'s TX SA
	// and sends it from `from`'s outer endpoint.
	send := func(from, key *remote, fill byte) {
		t.Helper()
		pkt := innerFrom(from.inner, fill)
		buf := make([]byte, key.sealer.Overhead()+len(pkt))
		n, err := key.sealer.SealTo(buf, pkt)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := from.conn.WriteToUDPAddrPort(buf[:n], local); err != nil {
			t.Fatal(err)
		}
	}
	expect := func(what string, from *remote, fill byte) {
		t.Helper()
		select {
		case p := <-tunDev.got:
			if netip.AddrFrom4([4]byte(p[12:16])) != from.inner || p[28] != fill {
				t.Fatalf("%s: delivered %x, want a packet from %v filled with %#x", what, p, from.inner, fill)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: not delivered", what)
		}
	}
	authDrops := func(r *remote) uint64 { return r.rx.Stats().Drops[codec.DropAuth] }

	send(a, a, 1)
	expect("A under its SPI 256 after B installed SPI 256", a, 1)
	send(b, b, 2)
	expect("B under its SPI 256", b, 2)

	// A's packet arriving from B's endpoint is B's to open, under B's key:
	// it fails authentication there, and is not opened with A's SA.
	send(b, a, 3)
	deadline := time.Now().Add(5 * time.Second)
	for authDrops(b) == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if authDrops(b) != 1 || authDrops(a) != 0 {
		t.Fatalf("auth drops: A %d, B %d; want B's codec to refuse A's packet", authDrops(a), authDrops(b))
	}

	// Removing B's SA 256 leaves A's.
	if !b.rx.RemoveRX(spi) {
		t.Fatal("B's SA not found")
	}
	send(a, a, 4)
	expect("A after B's SPI 256 was removed", a, 4)
	select {
	case p := <-tunDev.got:
		t.Fatalf("unexpected delivery %x", p)
	default:
	}
}
