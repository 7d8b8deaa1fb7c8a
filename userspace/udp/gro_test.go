package udp_test

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/userspace"
	"github.com/pspd/pspd/userspace/udp"
)

// groTraffic is what the GRO tests send: runs of equal datagrams (which a
// segmented send carries, and which a GRO socket receives coalesced on
// loopback), a run ending in a shorter one, single ones, and a run longer
// than the receiver's batch.
type groTraffic struct {
	sizes []int
	from  []int // index of the sending socket
}

func newGROTraffic() groTraffic {
	var tr groTraffic
	add := func(from, size, n int) {
		for range n {
			tr.sizes, tr.from = append(tr.sizes, size), append(tr.from, from)
		}
	}
	add(0, 1200, 20) // longer than the receiver's batch of 8
	add(0, 300, 1)   // ends the run
	add(1, 1400, 5)
	add(1, 900, 3)
	add(0, 1, 1)
	add(0, 1200, 3)
	add(1, 777, 1)
	return tr
}

// payload is datagram i: its index, then bytes derived from it.
func (tr groTraffic) payload(i int) []byte {
	p := make([]byte, tr.sizes[i])
	for j := range p {
		p[j] = byte(i*31 + j)
	}
	copy(p, fmt.Sprintf("%02d", i))
	return p
}

// sendAndCheck sends tr from two sockets to rx and checks that rx reads
// every datagram whole, in order per sender, with the right source.
func sendAndCheck(t *testing.T, rx *udp.Conn, batch int) {
	t.Helper()
	tr := newGROTraffic()
	var tx [2]*udp.Conn
	for i := range tx {
		c, err := udp.Listen(netip.MustParseAddrPort("127.0.0.1:0"), 64)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		tx[i] = c
	}
	want := map[netip.AddrPort][]string{}
	for s := range tx {
		var out []userspace.Message
		for i := range tr.sizes {
			if tr.from[i] != s {
				continue
			}
			p := tr.payload(i)
			out = append(out, userspace.Message{Buf: p, N: len(p), Addr: rx.LocalAddr()})
			want[tx[s].LocalAddr()] = append(want[tx[s].LocalAddr()], string(p))
		}
		if k, err := tx[s].WriteBatch(out); k != len(out) || err != nil {
			t.Fatalf("sender %d: WriteBatch = %d, %v", s, k, err)
		}
	}
	got := map[netip.AddrPort][]string{}
	in := msgs(batch, 2000)
	rx.SetReadDeadline(time.Now().Add(5 * time.Second))
	for n := 0; n < len(tr.sizes); {
		k, err := rx.ReadBatch(in)
		if err != nil {
			t.Fatalf("after %d of %d datagrams: %v", n, len(tr.sizes), err)
		}
		if k == 0 || k > batch {
			t.Fatalf("ReadBatch returned %d messages for a batch of %d", k, batch)
		}
		for i := range k {
			got[in[i].Addr] = append(got[in[i].Addr], string(in[i].Payload()))
		}
		n += k
	}
	for from, w := range want {
		g := got[from]
		if len(g) != len(w) {
			t.Fatalf("from %v: %d datagrams, want %d", from, len(g), len(w))
		}
		for i := range w {
			if g[i] != w[i] {
				t.Errorf("from %v datagram %d: %d bytes starting %q, want %d bytes starting %q", from, i, len(g[i]), g[i][:min(2, len(g[i]))], len(w[i]), w[i][:min(2, len(w[i]))])
			}
		}
	}
	if len(got) != len(want) {
		t.Errorf("datagrams from %d sources, want %d", len(got), len(want))
	}
}

// TestGROSplitsCoalescedReads: with UDP_GRO on, the kernel hands the
// receiver runs of datagrams as single reads (checked: the test fails if
// none was coalesced), and ReadBatch gives them back one per message,
// exactly as sent, across calls when a read holds more datagrams than the
// batch has messages.
func TestGROSplitsCoalescedReads(t *testing.T) {
	rx, err := udp.Listen(netip.MustParseAddrPort("127.0.0.1:0"), 8)
	if err != nil {
		t.Fatal(err)
	}
	defer rx.Close()
	if !rx.GRO() {
		t.Skip("the kernel refused UDP_GRO (needs Linux 5.0)")
	}
	sendAndCheck(t, rx, 8)
	reads, datagrams := rx.CoalescedReads()
	t.Logf("%d coalesced reads held %d datagrams", reads, datagrams)
	if reads == 0 || datagrams < 20 {
		t.Fatalf("%d coalesced reads with %d datagrams: the runs did not arrive coalesced, so the split was not exercised", reads, datagrams)
	}
}

// TestNoGROReadsOneByOne: the path a kernel without UDP_GRO takes (and
// ListenConfig.NoGRO asks for) reads the same traffic datagram by
// datagram: the kernel splits a segmented send for a socket without GRO.
func TestNoGROReadsOneByOne(t *testing.T) {
	rx, err := udp.ListenConfig{Batch: 8, NoGRO: true}.Listen(netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	defer rx.Close()
	if rx.GRO() {
		t.Fatal("NoGRO socket reports GRO on")
	}
	sendAndCheck(t, rx, 8)
	if reads, _ := rx.CoalescedReads(); reads != 0 {
		t.Fatalf("%d coalesced reads without GRO", reads)
	}
}

// TestGROPendingAfterClose: datagrams left over from a coalesced read are
// not handed out after Close.
func TestGROPendingAfterClose(t *testing.T) {
	rx, err := udp.Listen(netip.MustParseAddrPort("127.0.0.1:0"), 4)
	if err != nil {
		t.Fatal(err)
	}
	if !rx.GRO() {
		rx.Close()
		t.Skip("the kernel refused UDP_GRO (needs Linux 5.0)")
	}
	tx, err := udp.Listen(netip.MustParseAddrPort("127.0.0.1:0"), 16)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Close()
	out := msgs(16, 1000)
	for i := range out {
		out[i].N, out[i].Addr = 1000, rx.LocalAddr()
	}
	if _, err := tx.WriteBatch(out); err != nil {
		t.Fatal(err)
	}
	rx.SetReadDeadline(time.Now().Add(5 * time.Second))
	in := msgs(2, 1500)
	if k, err := rx.ReadBatch(in); err != nil || k != 2 {
		t.Fatalf("first read: %d, %v", k, err)
	}
	if reads, _ := rx.CoalescedReads(); reads == 0 {
		t.Fatal("the run did not arrive coalesced")
	}
	rx.Close()
	if _, err := rx.ReadBatch(in); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("read after close with datagrams pending: %v, want net.ErrClosed", err)
	}
}

// BenchmarkReceive compares reading with and without UDP_GRO in one run.
// Each op sends 32 datagrams of about 1400 bytes to a loopback socket and
// reads them back; the sender is the same in both, the difference is the
// receive path (compare ns/datagram). "runs" are equal datagrams, one
// segmented send that a GRO socket receives as one read; "singles" differ
// in size, so they go out and arrive one by one and GRO can only cost
// (the copy out of its buffers).
func BenchmarkReceive(b *testing.B) {
	for _, traffic := range []string{"runs", "singles"} {
		for _, noGRO := range []bool{false, true} {
			name := traffic + "/gro"
			if noGRO {
				name = traffic + "/nogro"
			}
			b.Run(name, func(b *testing.B) { benchReceive(b, traffic == "singles", noGRO) })
		}
	}
}

// cpuTime is the process's user plus system CPU time in nanoseconds.
func cpuTime(b *testing.B) int64 {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}

func benchReceive(b *testing.B, singles, noGRO bool) {
	rx, err := udp.ListenConfig{Batch: 64, NoGRO: noGRO}.Listen(netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		b.Fatal(err)
	}
	defer rx.Close()
	if rx.GRO() == noGRO {
		b.Skip("the kernel refused UDP_GRO")
	}
	tx, err := udp.Listen(netip.MustParseAddrPort("127.0.0.1:0"), 64)
	if err != nil {
		b.Fatal(err)
	}
	defer tx.Close()
	const n, size = 32, 1400
	out, in := msgs(n, size+n), msgs(64, 2048)
	total := 0
	for i := range out {
		out[i].N, out[i].Addr = size, rx.LocalAddr()
		if singles {
			out[i].N += i // a longer datagram never joins a run
		}
		total += out[i].N
	}
	b.SetBytes(int64(total))
	cpu0 := cpuTime(b)
	for b.Loop() {
		if _, err := tx.WriteBatch(out); err != nil {
			b.Fatal(err)
		}
		rx.SetReadDeadline(time.Now().Add(5 * time.Second))
		for got := 0; got < n; {
			k, err := rx.ReadBatch(in)
			if err != nil {
				b.Fatalf("after %d of %d datagrams: %v", got, n, err)
			}
			got += k
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/datagram")
	// CPU time says more than wall time on a shared machine: it leaves out
	// waiting for a core. Loopback delivery runs in the sender's system
	// call, so both directions count.
	b.ReportMetric(float64(cpuTime(b)-cpu0)/float64(b.N*n), "cpu-ns/datagram")
	r, d := rx.CoalescedReads()
	b.ReportMetric(float64(d)/float64(b.N*n), "coalesced/datagram")
	if singles && r > 0 {
		b.Fatalf("%d coalesced reads of datagrams of different sizes", r)
	}
}
