package xsk_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/userspace/frame"
	"github.com/pspd/pspd/userspace/internal/nstest"
	"github.com/pspd/pspd/userspace/xdp"
	"github.com/pspd/pspd/userspace/xsk"
)

var (
	addrA = netip.MustParsePrefix("192.0.2.1/24")
	addrB = netip.MustParsePrefix("192.0.2.2/24")
)

type pair struct {
	a, b         *nstest.NS
	ifA, ifB     int
	macA, macB   frame.MAC
	nameA, nameB string
}

func newPair(t *testing.T) *pair {
	p := &pair{a: nstest.New(t), b: nstest.New(t)}
	p.nameA, p.nameB = nstest.Veth(t, p.a, p.b, addrA, addrB)
	for _, e := range []struct {
		ns   *nstest.NS
		name string
		idx  *int
		mac  *frame.MAC
	}{{p.a, p.nameA, &p.ifA, &p.macA}, {p.b, p.nameB, &p.ifB, &p.macB}} {
		l, err := e.ns.Netlink.LinkByName(e.name)
		if err != nil {
			t.Fatal(err)
		}
		*e.idx = l.Attrs().Index
		copy(e.mac[:], l.Attrs().HardwareAddr)
	}
	return p
}

// open runs xsk.Open in ns, skipping if the kernel has no AF_XDP.
func open(t *testing.T, ns *nstest.NS, ifindex int) *xsk.Socket {
	t.Helper()
	var s *xsk.Socket
	err := ns.Do(func() (err error) { s, err = xsk.Open(ifindex, 0, xsk.Config{NumFrames: 1024}); return err })
	if errors.Is(err, unix.EAFNOSUPPORT) {
		t.Skip("kernel lacks AF_XDP sockets (CONFIG_XDP_SOCKETS): ", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func readFile(t *testing.T, path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func countFDs(t *testing.T) int {
	e, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(e)
}

// umemBytes is an unusual mapping size, so the test can find the UMEM
// among the runtime's own mappings.
const umemFrames, umemFrameSize = 4096, 4096

// mappings counts the ring mappings (they show as the socket) and the
// UMEM-sized anonymous mappings of the process.
func mappings(t *testing.T) (rings, umems int) {
	for _, line := range strings.Split(readFile(t, "/proc/self/maps"), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		if len(f) >= 6 && strings.HasPrefix(f[5], "socket:[") {
			rings++
			continue
		}
		var lo, hi uint64
		if _, err := fmt.Sscanf(f[0], "%x-%x", &lo, &hi); err == nil && hi-lo == umemFrames*umemFrameSize && len(f) == 5 {
			umems++
		}
	}
	return rings, umems
}

// TestLifecycleLeaksNothing opens and closes sockets and checks that no ring
// mapping, UMEM or file descriptor is left behind, also after a failed Open.
func TestLifecycleLeaksNothing(t *testing.T) {
	p := newPair(t)
	open(t, p.a, p.ifA).Close() // skips without AF_XDP
	cfg := xsk.Config{NumFrames: umemFrames, FrameSize: umemFrameSize}
	err := p.a.Do(func() error {
		fds := countFDs(t)
		_, umems := mappings(t)
		for range 5 {
			s, err := xsk.Open(p.ifA, 0, cfg)
			if err != nil {
				return err
			}
			if r, u := mappings(t); r != 4 || u != umems+1 {
				t.Errorf("open socket: %d ring mappings, %d UMEMs; want 4, %d", r, u, umems+1)
			}
			if err := s.Close(); err != nil {
				return err
			}
		}
		// A failed Open (no such queue) must not leak either.
		if _, err := xsk.Open(p.ifA, 63, cfg); err == nil {
			t.Error("bind to queue 63 of a two-queue veth succeeded")
		}
		if r, u := mappings(t); r != 0 || u != umems {
			t.Errorf("after Close: %d ring mappings and %d UMEMs left (had %d)", r, u, umems)
		}
		if f := countFDs(t); f != fds {
			t.Errorf("after 5 open/close and a failed open: %d→%d fds", fds, f)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestConfigRejected(t *testing.T) {
	for _, c := range []xsk.Config{{FrameSize: 1000}, {NumFrames: 100}, {NumFrames: 64, RingSize: 16}} {
		if _, err := xsk.Open(1, 0, c); err == nil {
			t.Errorf("config %+v accepted", c)
		}
	}
}

// TestRedirect sends frames from an AF_XDP socket on one end of a veth and
// receives them on an AF_XDP socket on the other end through the XDP
// program, in each attach mode; other UDP ports, and ARP, go to the kernel.
func TestRedirect(t *testing.T) {
	for _, mode := range []xdp.Mode{xdp.Generic, xdp.Native} {
		t.Run(mode.String(), func(t *testing.T) { testRedirect(t, mode) })
	}
}

func testRedirect(t *testing.T, mode xdp.Mode) {
	p := newPair(t)
	prog, err := xdp.Load(1, []uint16{6081, 1000})
	if err != nil {
		t.Skip("cannot load an XDP program with an XSKMAP (needs CONFIG_BPF_SYSCALL, CONFIG_XDP_SOCKETS): ", err)
	}
	t.Cleanup(func() { prog.Close() })
	// The kernel resolves the ifindex in the calling thread's namespace.
	if err := p.b.Do(func() error { return prog.Attach(p.ifB, mode) }); err != nil {
		t.Fatalf("attach %s: %v", mode, err)
	}
	rx := open(t, p.b, p.ifB)
	if err := prog.Register(0, rx.FD()); err != nil {
		t.Fatal(err)
	}
	tx := open(t, p.a, p.ifA)

	// Kernel sockets in B: the data-plane port must see nothing, another
	// port must see its packet (and ARP must have resolved to deliver it).
	var dpConn, otherConn *net.UDPConn
	err = p.b.Do(func() (err error) {
		if dpConn, err = net.ListenUDP("udp4", &net.UDPAddr{Port: 6081}); err != nil {
			return err
		}
		otherConn, err = net.ListenUDP("udp4", &net.UDPAddr{Port: 7777})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer dpConn.Close()
	defer otherConn.Close()
	var kconn *net.UDPConn
	if err := p.a.Do(func() (err error) { kconn, err = net.ListenUDP("udp4", nil); return err }); err != nil {
		t.Fatal(err)
	}
	defer kconn.Close()
	if _, err := kconn.WriteToUDPAddrPort([]byte("kernel"), netip.AddrPortFrom(addrB.Addr(), 7777)); err != nil {
		t.Fatal(err)
	}
	otherConn.SetReadDeadline(time.Now().Add(2 * time.Second))
	if n, _, err := otherConn.ReadFromUDPAddrPort(make([]byte, 64)); err != nil || n != 6 {
		t.Fatalf("port 7777 (not redirected) did not receive through the kernel: %v", err)
	}

	const count = 200
	src := netip.AddrPortFrom(addrA.Addr(), 40000)
	descs := make([]xsk.Desc, 32)
	sent := 0
	for sent < count {
		n := tx.AllocTX(descs)
		if n == 0 {
			tx.Flush()
			continue
		}
		n = min(n, count-sent)
		for i := range n {
			port := uint16(6081)
			if (sent+i)%2 == 1 {
				port = 1000
			}
			f := tx.Frame(descs[i])
			hl := frame.HeaderLen(addrB.Addr())
			payload := f[hl : hl+100]
			binary.BigEndian.PutUint32(payload, uint32(sent+i))
			copy(payload[4:], "xsk-payload")
			frame.PutEthernet(f, p.macB, p.macA, frame.EtherTypeIPv4)
			frame.PutIPUDP(f[frame.EthLen:], src, netip.AddrPortFrom(addrB.Addr(), port), len(payload))
			descs[i].Len = uint32(hl + len(payload))
		}
		q, err := tx.Transmit(descs[:n])
		if err != nil && !errors.Is(err, xsk.ErrTXBusy) {
			t.Fatal(err)
		}
		tx.FreeTX(descs[q:n])
		sent += q
	}

	seen := make([]bool, count)
	got := 0
	deadline := time.Now().Add(5 * time.Second)
	for got < count && time.Now().Before(deadline) {
		tx.Flush()
		if err := rx.WaitRX(50); err != nil {
			t.Fatal(err)
		}
		n := rx.Receive(descs)
		for _, d := range descs[:n] {
			et, ip, err := frame.ParseEthernet(rx.Frame(d))
			if err != nil || et != frame.EtherTypeIPv4 {
				t.Fatalf("received non-IPv4 frame %#x: %v", et, err)
			}
			u, err := frame.ParseIPUDP(ip)
			if err != nil {
				t.Fatalf("received bad frame: %v", err)
			}
			pl := ip[u.Off : u.Off+u.Len]
			if u.Src != src || !bytes.Equal(pl[4:15], []byte("xsk-payload")) {
				t.Fatalf("received %v→%v %q", u.Src, u.Dst, pl)
			}
			i := binary.BigEndian.Uint32(pl)
			if i >= count || seen[i] {
				t.Fatalf("sequence %d duplicated or out of range", i)
			}
			seen[i] = true
			got++
		}
		if err := rx.Release(descs[:n]); err != nil {
			t.Fatal(err)
		}
	}
	st, err := rx.Stats()
	if err != nil {
		t.Fatal(err)
	}
	// The RX ring and fill ring hold every frame sent, so none may be lost.
	if got != count {
		t.Errorf("%s mode: received %d of %d frames (socket stats %+v)", mode, got, count, st)
	}
	t.Logf("%s mode: received %d of %d frames, stats %+v", prog.Mode(), got, count, st)

	dpConn.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if n, from, err := dpConn.ReadFromUDPAddrPort(make([]byte, 2048)); err == nil {
		t.Errorf("kernel socket on the redirected port 6081 received %d bytes from %v", n, from)
	}
	// With the socket unregistered, data-plane packets go to the kernel.
	if err := prog.Unregister(0); err != nil {
		t.Fatal(err)
	}
	if _, err := kconn.WriteToUDPAddrPort([]byte("fallback"), netip.AddrPortFrom(addrB.Addr(), 6081)); err != nil {
		t.Fatal(err)
	}
	dpConn.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, _, err := dpConn.ReadFromUDPAddrPort(make([]byte, 64)); err != nil {
		t.Errorf("with no socket registered, port 6081 did not fall back to the kernel: %v", err)
	}
}

// TestBindModes: on veth, which has no zero-copy AF_XDP, BindAuto falls back
// to copy mode and says so, and BindZeroCopy fails naming the cause.
func TestBindModes(t *testing.T) {
	p := newPair(t)
	s := open(t, p.a, p.ifA) // skips without AF_XDP
	if s.ZeroCopy() {
		t.Errorf("veth socket bound with BindAuto reports zero-copy")
	}
	s.Close() // one socket per queue
	err := p.a.Do(func() error {
		zc, err := xsk.Open(p.ifA, 0, xsk.Config{NumFrames: 64, Bind: xsk.BindZeroCopy})
		if err == nil {
			zc.Close()
		}
		return err
	})
	if !errors.Is(err, xsk.ErrNoZeroCopy) {
		t.Errorf("BindZeroCopy on veth: %v, want ErrNoZeroCopy", err)
	}
	if err := p.a.Do(func() error {
		c, err := xsk.Open(p.ifA, 0, xsk.Config{NumFrames: 64, Bind: xsk.BindCopy})
		if err == nil {
			defer c.Close()
			if c.ZeroCopy() {
				t.Error("BindCopy socket reports zero-copy")
			}
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
}

// TestBatchIsOneKick sends a batch of frames with one Transmit through the
// real kernel (copy mode on veth): it costs ceil(frames/TXBudget) sendto
// calls, one where the kernel lets the budget be raised (Linux 6.17), and
// the receiver takes the whole batch with one Receive and one Release.
func TestBatchIsOneKick(t *testing.T) {
	p := newPair(t)
	prog, err := xdp.Load(1, []uint16{6081})
	if err != nil {
		t.Skip("cannot load an XDP program with an XSKMAP (needs CONFIG_BPF_SYSCALL, CONFIG_XDP_SOCKETS): ", err)
	}
	t.Cleanup(func() { prog.Close() })
	if err := p.b.Do(func() error { return prog.Attach(p.ifB, xdp.Auto) }); err != nil {
		t.Fatal(err)
	}
	rx := open(t, p.b, p.ifB)
	if err := prog.Register(0, rx.FD()); err != nil {
		t.Fatal(err)
	}
	tx := open(t, p.a, p.ifA)
	const count = 200
	descs := make([]xsk.Desc, 256)
	if n := tx.AllocTX(descs[:count]); n != count {
		t.Fatalf("AllocTX: %d of %d frames", n, count)
	}
	src, dst := netip.AddrPortFrom(addrA.Addr(), 40000), netip.AddrPortFrom(addrB.Addr(), 6081)
	for i := range count {
		f := tx.Frame(descs[i])
		hl := frame.HeaderLen(dst.Addr())
		binary.BigEndian.PutUint32(f[hl:], uint32(i))
		frame.PutEthernet(f, p.macB, p.macA, frame.EtherTypeIPv4)
		frame.PutIPUDP(f[frame.EthLen:], src, dst, 64)
		descs[i].Len = uint32(hl + 64)
	}
	before := tx.Counters()
	if q, err := tx.Transmit(descs[:count]); q != count || err != nil {
		t.Fatalf("Transmit: %d of %d queued, %v", q, count, err)
	}
	c := tx.Counters()
	want := uint64((count + tx.TXBudget() - 1) / tx.TXBudget())
	if kicks := c.TXKicks - before.TXKicks; kicks != want {
		t.Errorf("one Transmit of %d frames with budget %d: %d sendto calls, want %d", count, tx.TXBudget(), kicks, want)
	}
	t.Logf("TX budget %d: %d frames, %d kicks (%+v)", tx.TXBudget(), count, c.TXKicks-before.TXKicks, c)

	// Copy mode delivers asynchronously (the receiver's NAPI or backlog);
	// wait until the whole batch is in the RX ring, then take it at once.
	for deadline := time.Now().Add(5 * time.Second); rx.Pending() < count && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	n := rx.Receive(descs)
	if n != count {
		st, _ := rx.Stats()
		t.Fatalf("Receive: %d frames of %d in one call (socket stats %+v)", n, count, st)
	}
	if err := rx.Release(descs[:n]); err != nil {
		t.Fatal(err)
	}
	if rc := rx.Counters(); rc.RXBatches != 1 || rc.RXFrames != count {
		t.Errorf("RX counters %+v: want one batch of %d", rc, count)
	}
}
