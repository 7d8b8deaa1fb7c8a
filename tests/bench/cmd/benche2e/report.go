package main

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"time"
)

// results are every round's samples per system, in table order.
type results struct {
	systems  []system
	samples  map[string][]sample
	startup  map[string][]startupSample
	errs     map[string][]string
	profiles []string // perf summaries, markdown
}

func newResults(systems []system) *results {
	return &results{systems: systems, samples: map[string][]sample{}, startup: map[string][]startupSample{}, errs: map[string][]string{}}
}

// median of the field f over the rounds that measured it (f > 0).
func median[T any](xs []T, f func(T) float64) float64 {
	var v []float64
	for _, x := range xs {
		if y := f(x); y > 0 {
			v = append(v, y)
		}
	}
	if len(v) == 0 {
		return 0
	}
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

// medians is one system's row.
func (r *results) medians(s system) sample {
	xs := r.samples[s.Name]
	return sample{
		TCP1:   median(xs, func(x sample) float64 { return x.TCP1 }),
		TCP2:   median(xs, func(x sample) float64 { return x.TCP2 }),
		TCP4:   median(xs, func(x sample) float64 { return x.TCP4 }),
		CPU1:   median(xs, func(x sample) float64 { return x.CPU1 }),
		UDP:    median(xs, func(x sample) float64 { return x.UDP }),
		UDPPPS: median(xs, func(x sample) float64 { return x.UDPPPS }),
		RRP50:  median(xs, func(x sample) float64 { return x.RRP50 }),
		RRP99:  median(xs, func(x sample) float64 { return x.RRP99 }),
	}
}

func gbit(bps float64) string {
	if bps == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f Gbit/s", bps/1e9)
}

// cpuGbit formats a sample.CPU1 figure.
func cpuGbit(v float64) string {
	if v == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", v)
}

func micros(us float64) string {
	if us == 0 {
		return "–"
	}
	return fmt.Sprintf("%.0f µs", us)
}

// ratio is a/b to two decimals, or "–" when either is missing.
func ratio(a, b float64) string {
	if a == 0 || b == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2fx", a/b)
}

// table writes the figures and the ratios as markdown.
func (r *results) table(w io.Writer) {
	fmt.Fprintln(w, "| system | TCP 1 stream | TCP 2 streams | TCP 4 streams | CPU per Gbit/s, TCP 1 stream (CPUs busy, whole machine; lower is better) | UDP 1300 B, best rate < 1% loss | TCP RR p50 | TCP RR p99 | rounds |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|---|")
	for _, s := range r.systems {
		m := r.medians(s)
		udp := gbit(m.UDP)
		if m.UDP > 0 {
			udp += fmt.Sprintf(" (%.0f k pkt/s)", m.UDPPPS/1e3)
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s | %s | %d |\n", s.Name, gbit(m.TCP1), gbit(m.TCP2), gbit(m.TCP4), cpuGbit(m.CPU1), udp, micros(m.RRP50), micros(m.RRP99), len(r.samples[s.Name]))
	}
	var veth, wg *system
	for i, s := range r.systems {
		switch s.kind {
		case "veth":
			veth = &r.systems[i]
		case "wireguard-go":
			wg = &r.systems[i]
		}
	}
	if veth == nil && wg == nil && !slices.ContainsFunc(r.systems, func(s system) bool { return s.base }) {
		return
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Ratios of the medians, all higher is better (throughput: this system's over the other's; CPU per Gbit/s and round trip: the other system's over this one's):")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| system | vs | TCP 1 | TCP 2 | TCP 4 | CPU per Gbit/s | UDP | RR p50 |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|")
	row := func(s, base system) {
		a, b := r.medians(s), r.medians(base)
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s | %s |\n", s.Name, base.Name, ratio(a.TCP1, b.TCP1), ratio(a.TCP2, b.TCP2), ratio(a.TCP4, b.TCP4), ratio(b.CPU1, a.CPU1), ratio(a.UDP, b.UDP), ratio(b.RRP50, a.RRP50))
	}
	for _, s := range r.systems {
		if veth != nil && s.kind != "veth" {
			row(s, *veth)
		}
	}
	for _, s := range r.systems {
		if wg != nil && s.isPspd() {
			row(s, *wg)
		}
	}
	for i, s := range r.systems {
		if i > 0 && s.base {
			row(r.systems[i-1], s)
		}
	}
	if len(r.startup) > 0 {
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| system | both daemons started → first protected packet delivered | kill -9 of the initiator, restarted at once → first packet | the same for the responder |")
		fmt.Fprintln(w, "|---|---|---|---|")
		for _, s := range r.systems {
			xs, ok := r.startup[s.Name]
			if !ok {
				continue
			}
			ms := func(f func(startupSample) float64) string {
				v := median(xs, f)
				if v == 0 {
					return "–"
				}
				return fmt.Sprintf("%.0f ms", v)
			}
			fmt.Fprintf(w, "| %s | %s | %s | %s |\n", s.Name,
				ms(func(x startupSample) float64 { return ms64(x.Cold) }),
				ms(func(x startupSample) float64 { return ms64(x.Initiator) }),
				ms(func(x startupSample) float64 { return ms64(x.Responder) }))
		}
	}
	for _, s := range r.systems {
		for _, e := range r.errs[s.Name] {
			fmt.Fprintf(w, "\n**%s failed a round:** %s\n", s.Name, e)
		}
	}
}

func ms64(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// machine describes where the figures were taken.
func machine() string {
	cpu := "unknown"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	kernel := "unknown"
	if out, err := exec.Command("uname", "-r").Output(); err == nil {
		kernel = strings.TrimSpace(string(out))
	}
	iperfVer := "unknown"
	if out, err := exec.Command("iperf3", "--version").Output(); err == nil {
		iperfVer, _, _ = strings.Cut(strings.TrimSpace(string(out)), "\n")
	}
	return fmt.Sprintf("%d CPUs (%s), kernel %s, %s, %s", runtime.NumCPU(), cpu, kernel, runtime.Version(), iperfVer)
}
