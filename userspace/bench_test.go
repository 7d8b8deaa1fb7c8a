package userspace_test

import (
	"io"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/userspace/codec"
	"github.com/pspd/pspd/userspace/xsk"
)

// BenchmarkTunnelTCP moves 4 MiB per iteration over one TCP connection
// through the tunnel and, as the baseline in the same run, over one TCP
// connection between the veth addresses the tunnel runs on. It reports
// both rates, their ratio and the allocations per tunnelled packet, and,
// per MiB tunnelled, the process's context switches (both daemons and the
// TCP ends share it, so compare rows, not absolute figures) and, for
// AF_XDP, the sockets' sendto and poll calls. With an XDP program on the
// veth the kernel gives up GSO there, so the veth baseline of the afxdp
// rows is lower; compare tunnel-Mbit/s across rows of one run. cpu-ms/MiB
// is the process's CPU time (user and system, both daemons and the TCP
// ends, and the kernel work done in their system calls) per MiB
// tunnelled: unlike the rates it leaves out the time spent waiting for a
// core, so it moves less with the machine's other load.
// udp-nogro is the UDP underlay without UDP GRO on receive, to compare
// with udp in the same run; afxdp-generic is AF_XDP with the XDP program
// in generic (skb) mode rather than veth's native mode.
func BenchmarkTunnelTCP(b *testing.B) {
	for _, bench := range []struct {
		underlay string
		fr       codec.Framing
	}{{"udp", codec.Geneve}, {"udp-nogro", codec.Geneve}, {"udp", codec.PSPTunnel}, {"afxdp", codec.Geneve}, {"afxdp", codec.PSPTunnel}, {"afxdp-generic", codec.Geneve}} {
		fr := bench.fr
		b.Run(bench.underlay+"/"+fr.String(), func(b *testing.B) {
			tn := newTunnelIO(b, fr, bench.underlay)
			tn.rekey(b)
			tunnelled := tcpPair(b, &tn.a, &tn.b, netip.AddrPortFrom(innerB, 5201))
			plain := tcpPair(b, &tn.a, &tn.b, netip.AddrPortFrom(outerB, 5202))
			chunk := make([]byte, 4<<20)
			var tTunnel, tPlain time.Duration
			var ms0, ms1 runtime.MemStats
			var csw uint64
			var cpu time.Duration
			x0 := tn.xskCalls()
			pk0 := tn.a.dp.Stats().Peers[0].TXPackets + tn.b.dp.Stats().Peers[0].TXPackets
			b.ResetTimer()
			for range b.N {
				tPlain += plain.send(b, chunk)
				runtime.ReadMemStats(&ms0)
				c0, u0 := ctxSwitches(b), cpuTime(b)
				tTunnel += tunnelled.send(b, chunk)
				csw += ctxSwitches(b) - c0
				cpu += cpuTime(b) - u0
				runtime.ReadMemStats(&ms1)
			}
			b.StopTimer()
			// The plain TCP connection is not steered to the AF_XDP
			// socket, so these are the tunnel's (and idle polls').
			x1 := tn.xskCalls()
			mib := float64(b.N) * float64(len(chunk)) / (1 << 20)
			b.ReportMetric(float64(csw)/mib, "ctxsw/MiB")
			b.ReportMetric(float64(cpu)/float64(time.Millisecond)/mib, "cpu-ms/MiB")
			if tn.a.xdp != nil {
				b.ReportMetric(float64(x1.TXKicks-x0.TXKicks)/mib, "kicks/MiB")
				b.ReportMetric(float64(x1.RXPolls+x1.FillWakeups-x0.RXPolls-x0.FillWakeups)/mib, "polls/MiB")
				b.ReportMetric(float64(x1.TXFrames-x0.TXFrames)/float64(max(1, x1.TXBatches-x0.TXBatches)), "frames/kick-batch")
			}
			pk := tn.a.dp.Stats().Peers[0].TXPackets + tn.b.dp.Stats().Peers[0].TXPackets - pk0
			mbit := func(d time.Duration) float64 { return float64(b.N) * float64(len(chunk)) * 8 / d.Seconds() / 1e6 }
			b.ReportMetric(mbit(tTunnel), "tunnel-Mbit/s")
			b.ReportMetric(mbit(tPlain), "veth-Mbit/s")
			b.ReportMetric(mbit(tTunnel)/mbit(tPlain), "tunnel/veth")
			if pk > 0 {
				// Only the last iteration's allocations: earlier ones include warm-up.
				b.ReportMetric(float64(ms1.Mallocs-ms0.Mallocs)/(float64(pk)/float64(b.N)), "allocs/pkt")
			}
		})
	}
}

// BenchmarkTunnelRR does 1-byte request/response round trips over one TCP
// connection (TCP_NODELAY) through the tunnel and, interleaved with them,
// over the veth it runs on, and reports both medians and the tunnel's
// 99th percentile, and the process's context switches per round trip
// (both ends, both daemons: compare rows of one run). A round trip is
// four hops through the loops (TX at one end, RX at the other, and back);
// a hop that waits for a batch to fill, a timer, or a hand-off between
// threads shows here rather than in BenchmarkTunnelTCP. ns/op is a
// tunnel round trip plus a veth one.
func BenchmarkTunnelRR(b *testing.B) {
	for _, underlay := range []string{"udp", "afxdp"} {
		b.Run(underlay, func(b *testing.B) {
			tn := newTunnelIO(b, codec.Geneve, underlay)
			tn.rekey(b)
			tunnelled := echoPair(b, &tn.a, &tn.b, netip.AddrPortFrom(innerB, 5203))
			plain := echoPair(b, &tn.a, &tn.b, netip.AddrPortFrom(outerB, 5204))
			// The first round trips resolve neighbours and warm the loops.
			for range 10 {
				tunnelled.roundTrip(b)
				plain.roundTrip(b)
			}
			rtt := make([]time.Duration, 0, b.N)
			vrtt := make([]time.Duration, 0, b.N)
			var csw uint64
			b.ResetTimer()
			for range b.N {
				vrtt = append(vrtt, plain.roundTrip(b))
				c0 := ctxSwitches(b)
				rtt = append(rtt, tunnelled.roundTrip(b))
				csw += ctxSwitches(b) - c0
			}
			b.StopTimer()
			slices.Sort(rtt)
			slices.Sort(vrtt)
			us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
			b.ReportMetric(us(rtt[len(rtt)/2]), "tunnel-p50-µs")
			b.ReportMetric(us(rtt[len(rtt)*99/100]), "tunnel-p99-µs")
			b.ReportMetric(us(vrtt[len(vrtt)/2]), "veth-p50-µs")
			b.ReportMetric(float64(csw)/float64(b.N), "ctxsw/rt")
		})
	}
}

// xskCalls sums both sides' AF_XDP socket counters (zero for UDP).
func (tn *tunnel) xskCalls() (c xsk.Counters) {
	for _, s := range []*side{&tn.a, &tn.b} {
		if s.xdp == nil {
			continue
		}
		x := s.xdp.Stats().Counters
		c.TXKicks += x.TXKicks
		c.TXBatches += x.TXBatches
		c.TXFrames += x.TXFrames
		c.RXPolls += x.RXPolls
		c.FillWakeups += x.FillWakeups
	}
	return c
}

// ctxSwitches is the process's voluntary and involuntary context switches.
func ctxSwitches(b *testing.B) uint64 {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return uint64(ru.Nvcsw + ru.Nivcsw)
}

// cpuTime is the process's user plus system CPU time.
func cpuTime(b *testing.B) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// tcpConn is a sender whose receiver discards a chunk and answers one byte.
type tcpConn struct {
	c   net.Conn
	ack []byte
}

func tcpPair(b *testing.B, from, to *side, addr netip.AddrPort) *tcpConn {
	b.Helper()
	return connect(b, from, to, addr, func(c net.Conn) {
		buf := make([]byte, 4<<20)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				return
			}
			if _, err := c.Write([]byte{1}); err != nil {
				return
			}
		}
	})
}

// echoPair connects from to a server in to that echoes every byte.
func echoPair(b *testing.B, from, to *side, addr netip.AddrPort) *tcpConn {
	b.Helper()
	return connect(b, from, to, addr, func(c net.Conn) { io.Copy(c, c) })
}

// connect dials from from to addr in to, where serve handles the one
// connection it accepts.
func connect(b *testing.B, from, to *side, addr netip.AddrPort, serve func(net.Conn)) *tcpConn {
	b.Helper()
	var ln net.Listener
	if err := to.ns.Do(func() (err error) { ln, err = net.Listen("tcp4", addr.String()); return err }); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		serve(c)
	}()
	var c net.Conn
	if err := from.ns.Do(func() (err error) { c, err = net.DialTimeout("tcp4", addr.String(), 5*time.Second); return err }); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return &tcpConn{c: c, ack: make([]byte, 1)}
}

func (t *tcpConn) send(b *testing.B, chunk []byte) time.Duration {
	start := time.Now()
	t.c.SetDeadline(start.Add(30 * time.Second))
	if _, err := t.c.Write(chunk); err != nil {
		b.Fatal(err)
	}
	if _, err := io.ReadFull(t.c, t.ack); err != nil {
		b.Fatal(err)
	}
	return time.Since(start)
}

func (t *tcpConn) roundTrip(b *testing.B) time.Duration {
	start := time.Now()
	t.c.SetDeadline(start.Add(5 * time.Second))
	if _, err := t.c.Write(t.ack); err != nil {
		b.Fatal(err)
	}
	if _, err := io.ReadFull(t.c, t.ack); err != nil {
		b.Fatal(err)
	}
	return time.Since(start)
}
