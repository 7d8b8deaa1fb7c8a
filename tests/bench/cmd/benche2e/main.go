// Command benche2e is `make bench-e2e`: end-to-end throughput and latency
// between two network namespaces through plain veth, wireguard-go and
// pspd's userspace data plane in the identical topology, measured in
// interleaved rounds and reported as medians and ratios in a markdown
// table (and docs/benchmarks.md with -out). Needs root, iperf3 and wg.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

func main() {
	maybeHelper()
	root := flag.String("root", "../..", "root of the pspd module (pspd and pspctl are built from it)")
	out := flag.String("out", "", "also write the report to this markdown file")
	rounds := flag.Int("rounds", 3, "rounds; systems are interleaved within each round")
	dur := flag.Duration("time", 5*time.Second, "duration of each TCP run")
	prof := flag.Bool("profile", true, "after the rounds, profile each tunnel under one TCP stream with perf")
	only := flag.String("systems", "", "comma-separated system names to run (default all): "+names(allSystems))
	baseline := flag.String("baseline", "", "also run every pspd system built from this git revision of -root, interleaved, for before/after comparisons")
	meas := flag.String("measure", "", "comma-separated parts to measure (default all): "+strings.Join(allParts, ","))
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ps, err := pickParts(*meas)
	if err != nil {
		log.Error("bench-e2e failed", "err", err)
		os.Exit(2)
	}
	if err := run(ctx, log, *root, *out, *rounds, *dur, *only, *baseline, ps, *prof); err != nil {
		log.Error("bench-e2e failed", "err", err)
		os.Exit(1)
	}
}

func names(ss []system) string {
	var n []string
	for _, s := range ss {
		n = append(n, s.id())
	}
	return strings.Join(n, ",")
}

func pick(only string) ([]system, error) {
	if only == "" {
		return allSystems, nil
	}
	var ss []system
	for _, want := range strings.Split(only, ",") {
		found := false
		for _, s := range allSystems {
			if s.id() == want {
				ss, found = append(ss, s), true
			}
		}
		if !found {
			return nil, fmt.Errorf("-systems: unknown system %q (have %s)", want, names(allSystems))
		}
	}
	return ss, nil
}

// allParts are what one round measures, in order; -measure picks some,
// so that one figure can be iterated on without waiting for the rest.
var allParts = []string{"tcp", "udp", "rr", "startup"}

type parts map[string]bool

func pickParts(list string) (parts, error) {
	ps := parts{}
	if list == "" {
		for _, p := range allParts {
			ps[p] = true
		}
		return ps, nil
	}
	for _, p := range strings.Split(list, ",") {
		if !slices.Contains(allParts, p) {
			return nil, fmt.Errorf("-measure: unknown part %q (have %s)", p, strings.Join(allParts, ","))
		}
		ps[p] = true
	}
	return ps, nil
}

func run(ctx context.Context, log *slog.Logger, root, out string, rounds int, d time.Duration, only, baseline string, ps parts, prof bool) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root to create network namespaces")
	}
	systems, err := pick(only)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "pbe-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	log.Info("building pspd, pspctl and wireguard-go", "dir", dir)
	t, err := buildTools(ctx, root, dir)
	if err != nil {
		return err
	}
	if baseline != "" {
		log.Info("building the baseline", "rev", baseline)
		if err := t.buildBaseline(ctx, root, baseline); err != nil {
			return err
		}
		systems = withBaseline(systems, baseline)
	}
	res := newResults(systems)
	start := time.Now()
	for round := range rounds {
		// Rotate the order each round so no system always runs first
		// (after a build) or last.
		for i := range systems {
			s := systems[(i+round)%len(systems)]
			if ctx.Err() != nil {
				return ctx.Err()
			}
			log.Info("measuring", "round", round+1, "system", s.Name)
			smp, st, err := once(ctx, t, s, d, ps)
			if err != nil {
				log.Error("round failed", "round", round+1, "system", s.Name, "err", err)
				res.errs[s.Name] = append(res.errs[s.Name], fmt.Sprintf("round %d: %v", round+1, err))
			}
			if smp != (sample{}) {
				log.Info("measured", "round", round+1, "system", s.Name, "tcp1", gbit(smp.TCP1), "tcp2", gbit(smp.TCP2), "tcp4", gbit(smp.TCP4), "cpu_s_per_gbit", cpuGbit(smp.CPU1), "udp", gbit(smp.UDP), "rr_p50_us", smp.RRP50, "rr_p99_us", smp.RRP99)
				res.samples[s.Name] = append(res.samples[s.Name], smp)
			}
			if st != nil && *st != (startupSample{}) {
				log.Info("startup", "round", round+1, "system", s.Name, "cold", st.Cold, "initiator_restart", st.Initiator, "responder_restart", st.Responder)
				res.startup[s.Name] = append(res.startup[s.Name], *st)
			}
		}
	}
	for _, s := range systems {
		if !prof || s.kind == "veth" || ctx.Err() != nil {
			continue
		}
		log.Info("profiling", "system", s.Name)
		p, err := profile(ctx, t, s, d)
		if err != nil {
			log.Error("profile failed", "system", s.Name, "err", err)
			p = fmt.Sprintf("%s: profile failed: %v\n", s.Name, err)
		}
		res.profiles = append(res.profiles, p)
	}
	var table bytes.Buffer
	res.table(&table)
	fmt.Print(table.String())
	log.Info("done", "took", time.Since(start).Round(time.Second))
	if out == "" {
		return nil
	}
	return writeDoc(out, res, table.String(), rounds, d)
}

// once brings a system up, measures it and tears it down. For pspd it
// also takes the start and restart times, last, as they restart daemons.
func once(ctx context.Context, t *tools, s system, d time.Duration, ps parts) (sample, *startupSample, error) {
	e, err := t.up(ctx, s)
	if err != nil {
		return sample{}, nil, err
	}
	defer e.close()
	smp, err := measure(ctx, e, d, ps)
	if !s.isPspd() || !ps["startup"] || ctx.Err() != nil {
		return smp, nil, err
	}
	st, serr := startup(ctx, e)
	if serr != nil {
		serr = fmt.Errorf("start and restart times: %w", serr)
	}
	return smp, &st, errors.Join(err, serr)
}

func writeDoc(path string, res *results, table string, rounds int, d time.Duration) error {
	var b bytes.Buffer
	fmt.Fprintf(&b, "# End-to-end benchmarks\n\n")
	fmt.Fprintf(&b, "Measured %s on %s.\n\n", time.Now().UTC().Format("2006-01-02"), machine())
	fmt.Fprintf(&b, "Medians of %d interleaved rounds; TCP runs of %v, UDP sweep steps of %v, %v of round trips per round. "+
		"The machine is shared and noisy: only ratios taken in the same run compare.\n\n", rounds, d, udpStep, rrTime)
	b.WriteString(table)
	b.WriteString(topology)
	if len(res.profiles) > 0 {
		b.WriteString("\n## Where the CPU goes\n\n")
		b.WriteString(strings.Join(res.profiles, "\n"))
	}
	// The analysis is written by hand from a run's figures; a new run
	// keeps it so that regenerating the numbers does not erase it.
	if old, err := os.ReadFile(path); err == nil {
		if i := bytes.Index(old, []byte(whyHeading)); i >= 0 {
			b.WriteString("\n")
			b.Write(old[i:])
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, b.Bytes(), 0o644)
}

// whyHeading starts the hand-written analysis, the file's last section.
const whyHeading = "## Why pspd is where it is"

const topology = `
## What is measured

Every system runs in the same topology, the one pspd's system tests use
(` + "`tests/netns` `Lab.TwoHosts`" + `): namespaces ` + "`pbe-a`" + ` (192.0.2.1) and
` + "`pbe-b`" + ` (192.0.2.2), each with one veth into a bridge in namespace ` + "`pbe-sw`" + `.
Plain veth sends to 192.0.2.2 directly; wireguard-go and pspd carry 10.200.0.1 ↔
10.200.0.2 over that underlay. Each system is built afresh for every round.

- TCP: ` + "`iperf3 -c ... -t T [-P 2|4]`" + ` from a to b, the receiver's rate.
- CPU per Gbit/s: the whole machine's busy CPU time during the one-stream TCP
  run (` + "`/proc/stat`" + `, all CPUs, user + nice + system + irq + softirq; not
  idle, iowait or steal) over the data carried, in CPU-seconds per Gbit (the
  same as CPUs kept busy per Gbit/s): both ends, the tunnel and iperf3, and
  whatever else runs on the machine then, so it is only as clean as the
  machine is quiet.
- UDP: ` + "`iperf3 -u -l 1300 -w 4M -b RATE`" + ` at rising rates from 50 Mbit/s; the best
  received rate with under 1% loss (the sweep stops after two failing rates in a
  row; the large socket buffers keep a delayed iperf3 receiver from counting its
  own drops against the tunnel).
- Inner MTUs: pspd's TUN 1424 (Geneve framing), wireguard-go's 1420.
- TCP RR: 1-byte request, 1-byte response on one TCP connection (TCP_NODELAY), as
  many round trips as fit, p50 and p99 (the runner re-execs itself as the
  client and server inside the namespaces).

## How to reproduce

As root on a Debian machine with Go: ` + "`make bench-e2e`" + ` (installs iperf3 and
wireguard-tools if missing, builds wireguard-go from ` + "`tests/bench/go.mod`" + `,
and rewrites this file). ` + "`cd tests/bench && go run ./cmd/benche2e -h`" + ` lists
the knobs (` + "`-rounds`, `-time`, `-systems`, `-measure`" + `; ` + "`-baseline REV`" + ` runs pspd built
from another revision in the same rounds, for before/after figures);
without ` + "`-out`" + ` it only prints.
`
