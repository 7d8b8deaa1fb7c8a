package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// profile samples the whole machine with perf while one TCP stream runs
// through s, and summarises where the CPU went: by command, the hottest
// symbols of the tunnel's processes, and their system calls and context
// switches per MiB carried. pspd has no pprof endpoint; perf also sees
// the kernel work done on its behalf.
func profile(ctx context.Context, t *tools, s system, d time.Duration) (string, error) {
	if _, err := exec.LookPath("perf"); err != nil {
		return "", errors.New("perf is missing (apt-get install linux-perf)")
	}
	comm := map[string]string{"wireguard-go": "wireguard-go", "pspd": "pspd"}[s.kind]
	e, err := t.up(ctx, s)
	if err != nil {
		return "", err
	}
	defer e.close()
	stop, err := iperfServer(ctx, e)
	if err != nil {
		return "", err
	}
	defer stop()
	// A short TCP run first, so the capture sees steady state.
	if _, _, err := tcpRate(ctx, e, 1, time.Second); err != nil {
		return "", err
	}
	// Other work shares this machine: report only the processes in the
	// benchmark's namespaces (their kernel work included).
	pids, tunnel, err := nsPids(ctx, e, comm)
	if err != nil {
		return "", err
	}
	data := filepath.Join(e.lab.Dir, "perf.data")
	rec := exec.CommandContext(ctx, "perf", "record", "-F", "999", "-a", "-g", "-o", data, "--", "sleep", secs(d))
	stat := exec.CommandContext(ctx, "perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter,context-switches", "-p", tunnel, "--", "sleep", secs(d))
	var recOut, statOut syncBuffer
	rec.Stdout, rec.Stderr = &recOut, &recOut
	stat.Stdout, stat.Stderr = &statOut, &statOut
	if err := rec.Start(); err != nil {
		return "", err
	}
	if err := stat.Start(); err != nil {
		bgKill(rec)
		return "", err
	}
	r, err := iperf(ctx, e, "-t", secs(d))
	if werr := rec.Wait(); werr != nil {
		bgKill(stat)
		return "", fmt.Errorf("perf record: %v: %s", werr, recOut.Bytes())
	}
	if werr := stat.Wait(); werr != nil {
		return "", fmt.Errorf("perf stat: %v: %s", werr, statOut.Bytes())
	}
	if err != nil {
		return "", err
	}
	byComm, err := perfReport(ctx, data, "--pid", pids, "--sort", "comm", "--percent-limit", "1")
	if err != nil {
		return "", err
	}
	syms, err := perfReport(ctx, data, "--pid", pids, "--comm", comm, "--sort", "dso,symbol", "--percent-limit", "1")
	if err != nil {
		return "", err
	}
	counts, err := parsePerfStat(statOut.Bytes())
	if err != nil {
		return "", err
	}
	got := r.End.SumReceived
	mib := got.Bytes / (1 << 20)
	var b strings.Builder
	fmt.Fprintf(&b, "%s, one TCP stream at %s during a %v capture of all CPUs (`perf record -a -g`), "+
		"processes in the benchmark's namespaces only, as shares of all samples (100%% = all %d CPUs busy):\n\n", s.Name, gbit(got.BitsPerSecond), d, runtime.NumCPU())
	if share := commShare(byComm, comm); share > 0 && mib > 0 {
		cpus := share / 100 * float64(runtime.NumCPU())
		fmt.Fprintf(&b, "- %s used %.2f CPUs: %.2f Gbit/s per CPU; per MiB carried, %.0f system calls and %.0f context switches (`perf stat -p`).\n\n",
			comm, cpus, got.BitsPerSecond/1e9/cpus, counts["raw_syscalls:sys_enter"]/mib, counts["context-switches"]/mib)
	}
	fmt.Fprintf(&b, "```\n# by command\n%s\n# %s's hottest symbols\n%s```\n", byComm, comm, syms)
	return b.String(), nil
}

// parsePerfStat reads `perf stat -x ,` output: count,unit,event,...
func parsePerfStat(out []byte) (map[string]float64, error) {
	m := map[string]float64{}
	for _, l := range strings.Split(string(out), "\n") {
		f := strings.Split(l, ",")
		if len(f) < 3 {
			continue
		}
		if v, err := strconv.ParseFloat(f[0], 64); err == nil {
			m[f[2]] = v
		}
	}
	if len(m) == 0 {
		return nil, fmt.Errorf("perf stat counted nothing: %s", out)
	}
	return m, nil
}

// commShare is the percentage perfReport printed for comm.
func commShare(report, comm string) float64 {
	for _, l := range strings.Split(report, "\n") {
		f := strings.Fields(l)
		if len(f) == 2 && f[1] == comm {
			v, _ := strconv.ParseFloat(strings.TrimSuffix(f[0], "%"), 64)
			return v
		}
	}
	return 0
}

// perfReport is `perf report` flat output without comments and blanks.
func perfReport(ctx context.Context, data string, args ...string) (string, error) {
	args = append([]string{"report", "-i", data, "--stdio", "--no-children", "-g", "none"}, args...)
	out, err := exec.CommandContext(ctx, "perf", args...).Output()
	if err != nil {
		return "", fmt.Errorf("perf %s: %v: %s", strings.Join(args, " "), err, stderrOf(err))
	}
	var b strings.Builder
	n := 0
	for _, l := range strings.Split(string(out), "\n") {
		if strings.TrimSpace(l) == "" || strings.HasPrefix(l, "#") {
			continue
		}
		if n++; n > 18 {
			break
		}
		// Columns are padded to the longest symbol and end in "-" for
		// fields perf cannot fill; keep the words.
		f := strings.Fields(l)
		for len(f) > 0 && f[len(f)-1] == "-" {
			f = f[:len(f)-1]
		}
		fmt.Fprintf(&b, "%8s  %s\n", f[0], strings.Join(f[1:], " "))
	}
	return b.String(), nil
}

// nsPids lists the processes in e's hosts, and those among them named
// comm, comma-separated for perf.
func nsPids(ctx context.Context, e *env, comm string) (all, named string, err error) {
	var pids, match []string
	for _, h := range []string{e.client.NS, e.server.NS} {
		out, err := exec.CommandContext(ctx, "ip", "netns", "pids", h).Output()
		if err != nil {
			return "", "", fmt.Errorf("ip netns pids %s: %w", h, err)
		}
		for _, pid := range strings.Fields(string(out)) {
			pids = append(pids, pid)
			if c, err := os.ReadFile("/proc/" + pid + "/comm"); err == nil && strings.TrimSpace(string(c)) == comm {
				match = append(match, pid)
			}
		}
	}
	if len(match) == 0 {
		return "", "", fmt.Errorf("no %s process in %s or %s", comm, e.client.NS, e.server.NS)
	}
	return strings.Join(pids, ","), strings.Join(match, ","), nil
}
