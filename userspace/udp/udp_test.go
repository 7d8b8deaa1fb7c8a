package udp_test

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pspd/pspd/userspace"
	"github.com/pspd/pspd/userspace/udp"
)

func msgs(n, size int) []userspace.Message {
	m := make([]userspace.Message, n)
	for i := range m {
		m[i].Buf = make([]byte, size)
	}
	return m
}

// receivers are the two read paths: with UDP GRO (the default) and
// without (a kernel that refuses it).
var receivers = []struct {
	name string
	cfg  udp.ListenConfig
}{{"gro", udp.ListenConfig{}}, {"nogro", udp.ListenConfig{NoGRO: true}}}

func TestBatchRoundTrip(t *testing.T) {
	for _, r := range receivers {
		for _, la := range []string{"127.0.0.1:0", "[::1]:0", "[::]:0"} {
			t.Run(r.name+"/"+la, func(t *testing.T) { roundTrip(t, la, r.cfg) })
		}
	}
}

func roundTrip(t *testing.T, la string, rcfg udp.ListenConfig) {
	a, err := udp.Listen(netip.MustParseAddrPort(la), 16)
	if err != nil {
		t.Skipf("no %s socket on this host: %v", la, err)
	}
	defer a.Close()
	rcfg.Batch = 16
	b, err := rcfg.Listen(netip.MustParseAddrPort(la))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	to := b.LocalAddr()
	if to.Addr().IsUnspecified() {
		// A dual-stack socket reached over IPv4 reports v4 sources.
		to = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), to.Port())
	}
	const n = 40 // more than one batch: WriteBatch loops
	out := msgs(n, 64)
	for i := range out {
		// A non-zero Off: the underlay must send only the span.
		out[i].Off = 3
		out[i].N = copy(out[i].Buf[3:], fmt.Sprintf("payload-%02d", i))
		out[i].Addr = to
	}
	if k, err := a.WriteBatch(out); k != n || err != nil {
		t.Fatalf("WriteBatch = %d, %v", k, err)
	}
	in := msgs(16, 64)
	for got := 0; got < n; {
		k, err := b.ReadBatch(in)
		if err != nil {
			t.Fatal(err)
		}
		for i := range k {
			if p := string(in[i].Payload()); p != fmt.Sprintf("payload-%02d", got) {
				t.Fatalf("message %d = %q", got, p)
			}
			if in[i].Addr.Port() != a.LocalAddr().Port() || !in[i].Addr.Addr().IsLoopback() {
				t.Fatalf("from %v, want loopback port %d", in[i].Addr, a.LocalAddr().Port())
			}
			got++
		}
	}
}

func TestFamilyMismatch(t *testing.T) {
	a, err := udp.Listen(netip.MustParseAddrPort("127.0.0.1:0"), 4)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	m := msgs(1, 16)
	m[0].N, m[0].Addr = 4, netip.MustParseAddrPort("[2001:db8::1]:6081")
	if k, err := a.WriteBatch(m); k != 0 || err == nil {
		t.Fatalf("IPv6 destination on an IPv4 socket: %d, %v", k, err)
	}
}

func TestCloseUnblocksRead(t *testing.T) {
	a, err := udp.Listen(netip.MustParseAddrPort("127.0.0.1:0"), 4)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := a.ReadBatch(msgs(4, 64)); done <- err }()
	time.Sleep(50 * time.Millisecond)
	a.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("read after close: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not unblock ReadBatch")
	}
}

func TestZeroAllocs(t *testing.T) {
	for _, r := range receivers {
		t.Run(r.name, func(t *testing.T) { zeroAllocs(t, r.cfg) })
	}
}

func zeroAllocs(t *testing.T, rcfg udp.ListenConfig) {
	a, _ := udp.Listen(netip.MustParseAddrPort("127.0.0.1:0"), 8)
	rcfg.Batch = 8
	b, err := rcfg.Listen(netip.MustParseAddrPort("127.0.0.1:0"))
	if a == nil || err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	defer b.Close()
	out, in := msgs(8, 1500), msgs(8, 1500)
	for i := range out {
		out[i].N, out[i].Addr = 1400, b.LocalAddr()
	}
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := a.WriteBatch(out); err != nil {
			t.Fatal(err)
		}
		for got := 0; got < len(out); {
			k, err := b.ReadBatch(in)
			if err != nil {
				t.Fatal(err)
			}
			got += k
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per batch, want 0", allocs)
	}
}

// TestSegmentedSendsKeepBoundaries: runs of equal datagrams to one address
// go out as one segmented send; a shorter one ends a run, another address
// or a longer one starts a new one, and the receiver sees every datagram
// as it was sent, in order.
func TestSegmentedSendsKeepBoundaries(t *testing.T) {
	a, err := udp.Listen(netip.MustParseAddrPort("127.0.0.1:0"), 64)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	var to [2]*udp.Conn
	for i := range to {
		if to[i], err = udp.Listen(netip.MustParseAddrPort("127.0.0.1:0"), 64); err != nil {
			t.Fatal(err)
		}
		defer to[i].Close()
	}
	sizes := []int{1200, 1200, 1200, 700, 1200, 1200, 1300, 1300, 5, 1200}
	dest := []int{0, 0, 0, 0, 0, 1, 1, 1, 1, 0}
	out := msgs(len(sizes), 1400)
	want := [2][]string{}
	for i, n := range sizes {
		p := out[i].Buf[:n]
		for j := range p {
			p[j] = byte(i)
		}
		copy(p, fmt.Sprintf("%02d", i))
		out[i].N, out[i].Addr = n, to[dest[i]].LocalAddr()
		want[dest[i]] = append(want[dest[i]], string(p))
	}
	if k, err := a.WriteBatch(out); k != len(out) || err != nil {
		t.Fatalf("WriteBatch = %d, %v", k, err)
	}
	for d := range to {
		in := msgs(64, 2000)
		var got []string
		deadline := time.Now().Add(5 * time.Second)
		for len(got) < len(want[d]) && time.Now().Before(deadline) {
			k, err := to[d].ReadBatch(in)
			if err != nil {
				t.Fatal(err)
			}
			for i := range k {
				got = append(got, string(in[i].Payload()))
			}
		}
		if len(got) != len(want[d]) {
			t.Fatalf("receiver %d got %d datagrams, want %d", d, len(got), len(want[d]))
		}
		for i := range got {
			if got[i] != want[d][i] {
				t.Errorf("receiver %d datagram %d: %d bytes starting %q, want %d bytes starting %q", d, i, len(got[i]), got[i][:2], len(want[d][i]), want[d][i][:2])
			}
		}
	}
}
