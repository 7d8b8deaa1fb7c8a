package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"
)

// sample is one round's figures for one system; zero means not measured.
type sample struct {
	TCP1, TCP2, TCP4 float64 // bit/s received with 1, 2 and 4 streams
	// CPU1 is the whole machine's busy CPU time (all CPUs; user, nice,
	// system, irq and softirq) during the one-stream TCP run over the data
	// it carried: CPU-seconds per Gbit, i.e. CPUs per Gbit/s.
	CPU1   float64
	UDP    float64 // bit/s received at the best rate with < 1% loss
	UDPPPS float64 // datagrams/s received at that rate
	RRP50  float64 // µs
	RRP99  float64 // µs
}

// iperfSum is one of the totals in `iperf3 -J`'s end section.
type iperfSum struct {
	BitsPerSecond float64 `json:"bits_per_second"`
	Bytes         float64 `json:"bytes"`
	Packets       int     `json:"packets"`      // UDP
	LostPackets   int     `json:"lost_packets"` // UDP
	LostPercent   float64 `json:"lost_percent"` // UDP
	Seconds       float64 `json:"seconds"`
}

// iperfResult is the part of `iperf3 -J` the runner reads: the receiver's
// totals, which for UDP carry the loss the server counted.
type iperfResult struct {
	End struct {
		SumReceived iperfSum `json:"sum_received"`
	} `json:"end"`
	Error string `json:"error"`
	// busy is the machine's busy CPU time during the client run that
	// produced this result (not the failed attempts before it); zero if
	// /proc/stat could not be read.
	busy time.Duration
}

func parseIperf(out []byte) (*iperfResult, error) {
	var r iperfResult
	if err := json.Unmarshal(out, &r); err != nil {
		return nil, fmt.Errorf("iperf3 -J output: %w", err)
	}
	if r.Error != "" {
		return &r, fmt.Errorf("iperf3: %s", r.Error)
	}
	return &r, nil
}

// iperfServer runs iperf3 -s in e's server until the returned stop is called.
func iperfServer(ctx context.Context, e *env) (stop func(), err error) {
	srv := e.server.Command(ctx, "iperf3", "-s", "-p", "5201")
	if err := srv.Start(); err != nil {
		return nil, fmt.Errorf("iperf3 -s in %s: %w", e.server.NS, err)
	}
	return func() { bgKill(srv) }, nil
}

// iperf runs an iperf3 client in e's client toward e's server with args
// added, retrying while the server is not listening yet.
func iperf(ctx context.Context, e *env, args ...string) (*iperfResult, error) {
	full := append([]string{"-c", e.addr, "-p", "5201", "-J"}, args...)
	var err error
	for range 20 {
		// iperf3 -J reports its own failures as JSON and exits non-zero;
		// the exit status matters only when there is no JSON.
		c0, cerr0 := cpuBusy()
		out, runErr := iperfOnce(ctx, e, full)
		c1, cerr1 := cpuBusy()
		var r *iperfResult
		if r, err = parseIperf(out); err == nil {
			if cerr0 == nil && cerr1 == nil {
				r.busy = c1 - c0
			}
			return r, nil
		}
		if r == nil && runErr != nil {
			err = fmt.Errorf("%w: %s", runErr, stderrOf(runErr))
		}
		if r == nil || !strings.Contains(r.Error, "connect") {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	return nil, fmt.Errorf("%s: iperf3 %s: %w", e.client.NS, strings.Join(full, " "), err)
}

// iperfOnce runs one iperf3 client, bounded so that a wedged tunnel
// fails the run instead of hanging it.
func iperfOnce(ctx context.Context, e *env, args []string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, iperfTimeout)
	defer cancel()
	return e.client.Command(ctx, "iperf3", args...).Output()
}

// iperfTimeout bounds one iperf3 client run, well above any -t used here.
const iperfTimeout = 2 * time.Minute

// tcpRate is the receiver's rate over streams TCP connections for d and
// the machine's busy CPU time per Gbit carried (see sample.CPU1).
func tcpRate(ctx context.Context, e *env, streams int, d time.Duration) (bps, cpuGbit float64, err error) {
	r, err := iperf(ctx, e, "-t", secs(d), "-P", strconv.Itoa(streams))
	if err != nil {
		return 0, 0, err
	}
	s := r.End.SumReceived
	return s.BitsPerSecond, cpuPerGbit(r.busy, s.Bytes), nil
}

// udpRates is the offered-load ladder of the sweep, in Mbit/s.
var udpRates = []int{50, 100, 200, 300, 400, 500, 650, 800, 1000, 1250, 1500, 1800, 2100, 2500, 3000, 3500, 4000}

// udpSweep offers 1300-byte datagrams at rising rates and returns the
// highest received rate with under 1% loss. The 4 MiB socket buffers keep
// the iperf3 receiver, when the shared machine delays it, from dropping
// what the system under test delivered. The sweep stops after two failing
// rates in a row, so one noisy step does not end it.
func udpSweep(ctx context.Context, e *env, d time.Duration) (bps, pps float64, err error) {
	fails := 0
	for _, mbit := range udpRates {
		r, err := iperf(ctx, e, "-u", "-l", "1300", "-w", "4M", "-b", fmt.Sprintf("%dM", mbit), "-t", secs(d))
		if err != nil {
			return 0, 0, err
		}
		s := r.End.SumReceived
		if s.Packets == 0 || s.Seconds == 0 || s.LostPercent >= 1 {
			if fails++; fails == 2 {
				break
			}
			continue
		}
		fails = 0
		if s.BitsPerSecond > bps {
			bps, pps = s.BitsPerSecond, float64(s.Packets-s.LostPackets)/s.Seconds
		}
	}
	if bps == 0 {
		return 0, 0, fmt.Errorf("udp: no rate down to %d Mbit/s had under 1%% loss", udpRates[0])
	}
	return bps, pps, nil
}

// roundTrips runs the rr helpers and returns p50 and p99 in µs.
func roundTrips(ctx context.Context, e *env, d time.Duration) (p50, p99 float64, err error) {
	addr := net.JoinHostPort(e.addr, "7800")
	srv, err := helper(ctx, e.server, "rr-server", addr)
	if err != nil {
		return 0, 0, err
	}
	if err := startListening(srv, &syncBuffer{}); err != nil {
		return 0, 0, err
	}
	defer bgKill(srv)
	cli, err := helper(ctx, e.client, "rr-client", addr, d.String())
	if err != nil {
		return 0, 0, err
	}
	out, err := cli.Output()
	if err != nil {
		return 0, 0, fmt.Errorf("rr-client: %w: %s", err, stderrOf(err))
	}
	var r rrReport
	if err := json.Unmarshal(out, &r); err != nil {
		return 0, 0, fmt.Errorf("rr-client said %q: %w", out, err)
	}
	if r.N == 0 {
		return 0, 0, errors.New("rr-client completed no round trip")
	}
	return r.P50, r.P99, nil
}

// startListening starts a helper and waits for it to print "listening".
func startListening(cmd *exec.Cmd, out *syncBuffer) error {
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		return err
	}
	for range 250 {
		if bytes.Contains(out.Bytes(), []byte("listening")) {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	cmd.Process.Kill()
	cmd.Wait()
	return fmt.Errorf("helper did not start listening: %s", out.Bytes())
}

// measure takes one round of every figure for e. A part that fails
// leaves its figure zero (medians skip it) and the others still run, so
// one noisy UDP sweep does not discard a round's TCP figures.
func measure(ctx context.Context, e *env, d time.Duration, ps parts) (sample, error) {
	var s sample
	stop, err := iperfServer(ctx, e)
	if err != nil {
		return s, err
	}
	defer stop()
	var errs []error
	if ps["tcp"] {
		if s.TCP1, s.CPU1, err = tcpRate(ctx, e, 1, d); err != nil {
			errs = append(errs, fmt.Errorf("tcp 1 stream: %w", err))
		}
		if s.TCP2, _, err = tcpRate(ctx, e, 2, d); err != nil {
			errs = append(errs, fmt.Errorf("tcp 2 streams: %w", err))
		}
		if s.TCP4, _, err = tcpRate(ctx, e, 4, d); err != nil {
			errs = append(errs, fmt.Errorf("tcp 4 streams: %w", err))
		}
	}
	if ps["udp"] {
		if s.UDP, s.UDPPPS, err = udpSweep(ctx, e, udpStep); err != nil {
			errs = append(errs, err)
		}
	}
	if ps["rr"] {
		if s.RRP50, s.RRP99, err = roundTrips(ctx, e, rrTime); err != nil {
			errs = append(errs, fmt.Errorf("round trips: %w", err))
		}
	}
	return s, errors.Join(errs...)
}

const (
	udpStep = 2 * time.Second // each rate of the sweep
	rrTime  = 3 * time.Second // round trips per round
)

func secs(d time.Duration) string { return strconv.Itoa(max(1, int(d.Seconds()))) }

func stderrOf(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(bytes.TrimSpace(ee.Stderr))
	}
	return ""
}

// syncBuffer is written by a child's output copier and read by the runner.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return bytes.Clone(b.b.Bytes())
}
