package main

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// profile samples the whole machine with perf while one TCP stream runs
// through s, and summarises where the CPU went: by command, and the
// hottest symbols of the tunnel's own processes. pspd has no pprof
// endpoint; perf sees the kernel work done on its behalf as well.
func profile(ctx context.Context, t *tools, s system, d time.Duration) (string, error) {
	if _, err := exec.LookPath("perf"); err != nil {
		return "", errors.New("perf is missing (apt-get install linux-perf)")
	}
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
	if _, err := tcpRate(ctx, e, 1, time.Second); err != nil {
		return "", err
	}
	data := filepath.Join(e.lab.Dir, "perf.data")
	rec := exec.CommandContext(ctx, "perf", "record", "-F", "999", "-a", "-g", "-o", data, "--", "sleep", secs(d))
	recOut := &syncBuffer{}
	rec.Stdout, rec.Stderr = recOut, recOut
	if err := rec.Start(); err != nil {
		return "", err
	}
	// Other work shares this machine: report only the processes in the
	// benchmark's namespaces (their kernel work included).
	pids, err := nsPids(ctx, e)
	if err != nil {
		rec.Process.Kill()
		rec.Wait()
		return "", err
	}
	bps, err := tcpRate(ctx, e, 1, d)
	if werr := rec.Wait(); werr != nil {
		return "", fmt.Errorf("perf record: %v: %s", werr, recOut.Bytes())
	}
	if err != nil {
		return "", err
	}
	byComm, err := perfReport(ctx, data, "--pid", pids, "--sort", "comm", "--percent-limit", "1")
	if err != nil {
		return "", err
	}
	comm := map[string]string{"wireguard-go": "wireguard-go", "pspd": "pspd"}[s.kind]
	var b strings.Builder
	fmt.Fprintf(&b, "%s, one TCP stream at %s during a %v capture of all CPUs (`perf record -a -g`), "+
		"processes in the benchmark's namespaces only, as shares of all samples (100%% = both CPUs busy):\n\n", s.Name, gbit(bps), d)
	fmt.Fprintf(&b, "```\n# by command\n%s", byComm)
	if comm != "" {
		dsos, err := perfReport(ctx, data, "--pid", pids, "--comm", comm, "--sort", "dso", "--percent-limit", "0.5")
		if err != nil {
			return "", err
		}
		syms, err := perfReport(ctx, data, "--pid", pids, "--comm", comm, "--sort", "dso,symbol", "--percent-limit", "1")
		if err != nil {
			return "", err
		}
		fmt.Fprintf(&b, "\n# %s: kernel or its own code\n%s\n# %s's hottest symbols\n%s", comm, dsos, comm, syms)
	}
	b.WriteString("```\n")
	return b.String(), nil
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

// nsPids lists the processes in e's hosts, comma-separated for perf.
func nsPids(ctx context.Context, e *env) (string, error) {
	var pids []string
	for _, h := range []string{e.client.NS, e.server.NS} {
		out, err := exec.CommandContext(ctx, "ip", "netns", "pids", h).Output()
		if err != nil {
			return "", fmt.Errorf("ip netns pids %s: %w", h, err)
		}
		pids = append(pids, strings.Fields(string(out))...)
	}
	return strings.Join(pids, ","), nil
}
