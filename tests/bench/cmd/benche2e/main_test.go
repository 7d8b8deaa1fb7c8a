package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// An abridged `iperf3 -u -J` client report from iperf 3.12 on this machine.
const iperfUDP = `{"start":{},"intervals":[],"end":{
"sum":{"bits_per_second":1487975528.1,"lost_packets":8670,"packets":286151,"lost_percent":3.03,"seconds":2.0,"sender":true},
"sum_sent":{"bits_per_second":1487975528.1,"lost_packets":0,"packets":286151,"lost_percent":0,"seconds":2.0},
"sum_received":{"bits_per_second":1442829779.9,"lost_packets":8670,"packets":286151,"lost_percent":3.03,"seconds":2.0}}}`

func TestParseIperf(t *testing.T) {
	r, err := parseIperf([]byte(iperfUDP))
	if err != nil {
		t.Fatal(err)
	}
	s := r.End.SumReceived
	if s.BitsPerSecond != 1442829779.9 || s.Packets != 286151 || s.LostPackets != 8670 || s.LostPercent != 3.03 {
		t.Fatalf("read the wrong totals: %+v", s)
	}
	if _, err := parseIperf([]byte(`{"error":"unable to connect to server: Connection refused"}`)); err == nil || !strings.Contains(err.Error(), "Connection refused") {
		t.Fatalf("iperf3's error was not reported: %v", err)
	}
	if _, err := parseIperf([]byte("iperf3: error")); err == nil {
		t.Fatal("non-JSON output accepted")
	}
}

func TestMedianSkipsUnmeasured(t *testing.T) {
	f := func(x sample) float64 { return x.TCP1 }
	for _, c := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{0, 0}, 0}, {[]float64{3, 1, 2}, 2}, {[]float64{4, 0, 1, 3}, 3}, {[]float64{4, 2, 1, 3}, 2.5}} {
		var xs []sample
		for _, v := range c.in {
			xs = append(xs, sample{TCP1: v})
		}
		if got := median(xs, f); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}

func TestPercentile(t *testing.T) {
	var d []time.Duration
	for i := 1; i <= 1000; i++ {
		d = append(d, time.Duration(i))
	}
	if p := percentile(d, 50); p != 500 {
		t.Errorf("p50 = %v", p)
	}
	if p := percentile(d, 99); p != 990 {
		t.Errorf("p99 = %v", p)
	}
	if p := percentile(d[:1], 99); p != 1 {
		t.Errorf("p99 of one = %v", p)
	}
	if p := percentile([]time.Duration(nil), 50); p != 0 {
		t.Errorf("p50 of none = %v", p)
	}
}

func TestTableRatios(t *testing.T) {
	res := newResults(allSystems[:3])
	res.samples["plain veth"] = []sample{{TCP1: 10e9, TCP2: 20e9, TCP4: 16e9, CPU1: 0.1, UDP: 2e9, UDPPPS: 190e3, RRP50: 20, RRP99: 50}}
	res.samples["wireguard-go"] = []sample{{TCP1: 2e9, TCP2: 2e9, TCP4: 4e9, CPU1: 0.9, UDP: 0.4e9, UDPPPS: 38e3, RRP50: 200, RRP99: 400}}
	// Two rounds: medians of 1 and 1.5 (TCP 4: 2 and 3) and of the CPU
	// figures 0.3 and 0.6; the UDP sweep failed in both.
	res.samples["pspd userspace io=udp"] = []sample{
		{TCP1: 1e9, TCP2: 1.5e9, TCP4: 2e9, CPU1: 0.3, RRP50: 100, RRP99: 300},
		{TCP1: 1.5e9, TCP2: 1.5e9, TCP4: 3e9, CPU1: 0.6, RRP50: 100, RRP99: 300},
	}
	res.errs["pspd userspace io=udp"] = []string{"round 2: boom"}
	var b bytes.Buffer
	res.table(&b)
	out := b.String()
	for _, want := range []string{
		"| system | TCP 1 stream | TCP 2 streams | TCP 4 streams | CPU per Gbit/s, TCP 1 stream (CPUs busy, whole machine; lower is better) |",
		"| plain veth | 10.00 Gbit/s | 20.00 Gbit/s | 16.00 Gbit/s | 0.10 | 2.00 Gbit/s (190 k pkt/s) | 20 µs | 50 µs | 1 |",
		"| pspd userspace io=udp | 1.25 Gbit/s | 1.50 Gbit/s | 2.50 Gbit/s | 0.45 | – | 100 µs | 300 µs | 2 |",
		"| system | vs | TCP 1 | TCP 2 | TCP 4 | CPU per Gbit/s | UDP | RR p50 |",
		"| wireguard-go | plain veth | 0.20x | 0.10x | 0.25x | 0.11x | 0.20x | 0.10x |",
		"| pspd userspace io=udp | plain veth | 0.12x | 0.07x | 0.16x | 0.22x | – | 0.20x |",
		"| pspd userspace io=udp | wireguard-go | 0.62x | 0.75x | 0.62x | 2.00x | – | 2.00x |",
		"round 2: boom",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}

func TestBaselineRows(t *testing.T) {
	ss := withBaseline(allSystems[1:3], "abc123")
	if len(ss) != 3 || !ss[2].base || ss[2].Name != "pspd userspace io=udp @abc123" || ss[1].base {
		t.Fatalf("withBaseline = %+v", ss)
	}
	res := newResults(ss)
	res.samples["pspd userspace io=udp"] = []sample{{RRP50: 100}}
	res.samples["pspd userspace io=udp @abc123"] = []sample{{RRP50: 250}}
	var b bytes.Buffer
	res.table(&b)
	if want := "| pspd userspace io=udp | pspd userspace io=udp @abc123 | – | – | – | – | – | 2.50x |"; !strings.Contains(b.String(), want) {
		t.Errorf("table lacks %q:\n%s", want, b.String())
	}
}

// /proc/stat as Linux 6.x prints it on a 2-CPU machine (abridged).
const procStat = `cpu  1000 50 300 90000 700 20 30 5 0 0
cpu0 500 25 150 45000 350 10 15 3 0 0
cpu1 500 25 150 45000 350 10 15 2 0 0
intr 123 0 9
`

func TestCPUBusy(t *testing.T) {
	// user 1000 + nice 50 + system 300 + irq 20 + softirq 30 ticks of
	// 10 ms; not idle, iowait or steal.
	got, err := parseCPUBusy([]byte(procStat))
	if err != nil || got != 14*time.Second {
		t.Fatalf("parseCPUBusy = %v, %v; want 14s", got, err)
	}
	for _, bad := range []string{"", "cpu0 1 2 3 4 5 6 7 8\n", "cpu  1 2 3 4 5 6\n", "cpu  1 2 x 4 5 6 7 8\n"} {
		if _, err := parseCPUBusy([]byte(bad)); err == nil {
			t.Errorf("parseCPUBusy(%q) accepted", bad)
		}
	}
	// 1.5 CPU-seconds for 2.5e8 bytes (2 Gbit): 0.75 CPU-s per Gbit.
	if v := cpuPerGbit(1500*time.Millisecond, 2.5e8); v != 0.75 {
		t.Errorf("cpuPerGbit = %v, want 0.75", v)
	}
	if v := cpuPerGbit(0, 2.5e8); v != 0 {
		t.Errorf("cpuPerGbit without a CPU figure = %v, want 0 (not measured)", v)
	}
	if now, err := cpuBusy(); err != nil || now <= 0 {
		t.Errorf("cpuBusy on this machine = %v, %v", now, err)
	}
}

func TestPick(t *testing.T) {
	ss, err := pick("veth,pspd:af_xdp")
	if err != nil || len(ss) != 2 || ss[1].io != "af_xdp" {
		t.Fatalf("pick = %v, %v", ss, err)
	}
	if _, err := pick("wireguard"); err == nil || !strings.Contains(err.Error(), "wireguard-go") {
		t.Fatalf("unknown name not refused with the list: %v", err)
	}
}

// freePort is a loopback TCP or UDP port nothing listens on right now.
func freePort(t *testing.T, network string) string {
	t.Helper()
	var addr net.Addr
	switch network {
	case "tcp":
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr = l.Addr()
		l.Close()
	default:
		c, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr = c.LocalAddr()
		c.Close()
	}
	_, port, _ := net.SplitHostPort(addr.String())
	return port
}

// The helpers the runner execs in the namespaces, here in-process over
// loopback: the real code, only without the namespaces.
func TestRoundTripHelpers(t *testing.T) {
	addr := net.JoinHostPort("127.0.0.1", freePort(t, "tcp"))
	var srvOut syncBuffer
	go rrServer(addr, &srvOut)
	var out bytes.Buffer
	if err := rrClient(addr, 300*time.Millisecond, &out); err != nil {
		t.Fatal(err)
	}
	var r rrReport
	if err := json.Unmarshal(out.Bytes(), &r); err != nil {
		t.Fatalf("rr-client printed %q: %v", out.Bytes(), err)
	}
	if r.N < 10 || r.P50 <= 0 || r.P99 < r.P50 {
		t.Fatalf("implausible round trips over loopback: %+v", r)
	}
}

func TestFirstSinkSeesSpray(t *testing.T) {
	port := freePort(t, "udp")
	var out syncBuffer
	done := make(chan error, 1)
	go func() { done <- firstSink(port, &out) }()
	for !bytes.Contains(out.Bytes(), []byte("listening")) {
		time.Sleep(5 * time.Millisecond)
	}
	before := time.Now()
	go spray(net.JoinHostPort("127.0.0.1", port))
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	var ns int64
	if _, err := fmt.Sscanf(string(out.Bytes()), "listening\narrived %d", &ns); err != nil {
		t.Fatalf("first-sink printed %q: %v", out.Bytes(), err)
	}
	if at := time.Unix(0, ns); at.Before(before) || time.Since(at) > 5*time.Second {
		t.Fatalf("arrival time %v is not after the spray started at %v", at, before)
	}
}

func TestPerfStatAndShare(t *testing.T) {
	// `perf stat -x ,` as perf 6.x prints it, and a by-command report.
	m, err := parsePerfStat([]byte("4273,,raw_syscalls:sys_enter,44431658,100.00,,\n244,,context-switches,44482964,100.00,,\n"))
	if err != nil || m["raw_syscalls:sys_enter"] != 4273 || m["context-switches"] != 244 {
		t.Fatalf("parsePerfStat = %v, %v", m, err)
	}
	if _, err := parsePerfStat([]byte("<not counted>,,context-switches,0,100.00,,\n")); err == nil {
		t.Fatal("an uncounted event was read as a count")
	}
	report := "  66.40%  wireguard-go\n   6.72%  iperf3\n"
	if got := commShare(report, "wireguard-go"); got != 66.40 {
		t.Fatalf("commShare = %v", got)
	}
	if got := commShare(report, "pspd"); got != 0 {
		t.Fatalf("commShare of an absent command = %v", got)
	}
}

func TestMain(m *testing.M) {
	maybeHelper() // the tests below exec this binary as the helpers
	os.Exit(m.Run())
}

// TestEverySystemCarriesTraffic brings each system up for real, as the
// runner does, and takes a short measurement through it: the runner's
// whole path except the long rounds. For pspd it also takes the start
// and restart times.
func TestEverySystemCarriesTraffic(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: builds pspd and wireguard-go and runs iperf3 in namespaces (about 15 s)")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	for _, tool := range []string{"iperf3", "wg", "ip"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (tests/deps.sh bench installs it)", tool)
		}
	}
	ctx := context.Background()
	tl, err := buildTools(ctx, "../../../..", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range allSystems {
		t.Run(strings.ReplaceAll(s.Name, " ", "_"), func(t *testing.T) {
			e, err := tl.up(ctx, s)
			if err != nil {
				t.Fatal(err)
			}
			defer e.close()
			stop, err := iperfServer(ctx, e)
			if err != nil {
				t.Fatal(err)
			}
			defer stop()
			bps, cpu, err := tcpRate(ctx, e, 1, time.Second)
			if err != nil || bps <= 0 || cpu <= 0 {
				t.Fatalf("tcp: %v bit/s, %v CPU-s/Gbit, %v", bps, cpu, err)
			}
			p50, p99, err := roundTrips(ctx, e, 300*time.Millisecond)
			if err != nil || p50 <= 0 || p99 < p50 {
				t.Fatalf("round trips: p50 %v p99 %v, %v", p50, p99, err)
			}
			t.Logf("%s: %s at %s CPU-s/Gbit, round trip p50 %.0f µs", s.Name, gbit(bps), cpuGbit(cpu), p50)
			if !s.isPspd() {
				return
			}
			st, err := startup(ctx, e)
			if err != nil {
				t.Fatal(err)
			}
			if st.Cold <= 0 || st.Initiator <= 0 || st.Responder <= 0 {
				t.Fatalf("start and restart times not all measured: %+v", st)
			}
			t.Logf("%s: cold %v, initiator restart %v, responder restart %v", s.Name, st.Cold, st.Initiator, st.Responder)
		})
	}
	if out, _ := exec.Command("ip", "netns", "list").Output(); bytes.Contains(out, []byte(prefix)) {
		t.Fatalf("namespaces left behind:\n%s", out)
	}
}
