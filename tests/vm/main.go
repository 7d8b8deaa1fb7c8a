// Command vm boots a real Linux kernel (with PSP, ESP, XFRM offload, netdevsim, AF_XDP and
// TUN built in) under qemu and runs Go test binaries inside it, one boot per group.
//
// It owns the whole real-kernel test path: fetching Debian's kernel source through a private
// apt configuration, building and caching the bzImage from kernel.config, packing the
// initramfs, booting, and turning the serial output back into per-test results. `go test`
// drives it through TestVM; engineers run their own prebuilt binaries with
//
//	CGO_ENABLED=0 go test -c -o /tmp/x.test ./genl
//	go run ./tests/vm -bin /tmp/x.test [-run REGEX] [-flags "-test.bench=. -test.benchtime=1s"]
package main

import (
	"context"
	_ "embed"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

//go:embed kernel.config
var fragment []byte

// sourcePackage is the Debian package whose kernel has PSP (kernel-vm.md: 7.2 and 7.3 do, no
// 6.18 source package exists).
const sourcePackage = "linux-source-7.3"

// harness holds the settings shared by the CLI and TestVM.
type harness struct {
	cacheDir string
	timeout  time.Duration
	refresh  bool
	log      func(format string, args ...any)
}

// harnessFromEnv reads PSPD_VM_CACHE, PSPD_VM_TIMEOUT and PSPD_VM_REFRESH.
func harnessFromEnv(log func(string, ...any)) (harness, error) {
	h := harness{
		cacheDir: os.Getenv("PSPD_VM_CACHE"),
		timeout:  10 * time.Minute,
		refresh:  os.Getenv("PSPD_VM_REFRESH") == "1",
		log:      log,
	}
	if h.cacheDir == "" {
		h.cacheDir = "/var/cache/pspd/vm"
	}
	if s := os.Getenv("PSPD_VM_TIMEOUT"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 {
			return h, fmt.Errorf("PSPD_VM_TIMEOUT=%q: want a positive Go duration such as 10m", s)
		}
		h.timeout = d
	}
	return h, nil
}

// kernel is the VM kernel in h's cache.
func (h harness) kernel() kernel {
	return kernel{dir: h.cacheDir, pkg: sourcePackage, fragment: fragment, refresh: h.refresh, jobs: runtime.NumCPU(), log: h.log}
}

// runGroup builds or finds the kernel, boots once with all tests, and parses the result. The
// error covers the VM as a whole (no kernel, no boot, timeout); per-binary and per-test
// outcomes are in the returned runResult.
func (h harness) runGroup(ctx context.Context, tests []testBinary, flags []string, console io.Writer) (*runResult, *bootResult, error) {
	k := h.kernel()
	start := time.Now()
	img, err := k.ensure(ctx)
	if err != nil {
		return nil, nil, err
	}
	h.log("vm: kernel %s ready in %s", img, time.Since(start).Round(time.Millisecond))
	work, err := os.MkdirTemp("", "pspd-vm-")
	if err != nil {
		return nil, nil, err
	}
	defer os.RemoveAll(work)
	root, err := moduleRoot(ctx)
	if err != nil {
		return nil, nil, err
	}
	progs, err := buildPrograms(ctx, root, work)
	if err != nil {
		return nil, nil, err
	}
	res, err := boot(ctx, bootConfig{kernel: img, tests: tests, progs: progs, flags: flags, timeout: h.timeout, workDir: work, console: console})
	if err != nil {
		return nil, nil, err
	}
	h.log("vm: boot and tests took %s", res.duration.Round(time.Millisecond))
	r := parseRun(res.tests)
	switch {
	case res.timedOut:
		return r, res, fmt.Errorf("VM timed out after %s (PSPD_VM_TIMEOUT); console tail:\n%s", h.timeout, tail(res.console, 40))
	case !r.booted:
		return r, res, fmt.Errorf("VM never reached /init (qemu: %v); console tail:\n%s", res.exitErr, tail(res.console, 40))
	case !r.done:
		return r, res, fmt.Errorf("VM stopped before /init finished (qemu: %v); console tail:\n%s", res.exitErr, tail(res.console, 40))
	case res.exitErr != nil:
		return r, res, fmt.Errorf("qemu: %v; console tail:\n%s", res.exitErr, tail(res.console, 40))
	}
	return r, res, nil
}

func main() {
	bins := flag.String("bin", "", "comma-separated test binaries to run in one boot (build with CGO_ENABLED=0 go test -c)")
	run := flag.String("run", "", "passed to every binary as -test.run")
	extra := flag.String("flags", "", "more space-separated flags for every binary, e.g. \"-test.bench=. -test.benchtime=100x\"")
	verbose := flag.Bool("v", false, "stream the kernel console while the VM runs")
	kernelOnly := flag.Bool("kernel", false, "only build the kernel into the cache (or find it there), and exit")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	logf := func(format string, args ...any) { log.Info(fmt.Sprintf(format, args...)) }
	if *kernelOnly {
		h, err := harnessFromEnv(logf)
		if err == nil {
			_, err = h.kernel().ensure(context.Background())
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "vm:", err)
			os.Exit(1)
		}
		return
	}
	if *bins == "" {
		fmt.Fprintln(os.Stderr, "usage: go run ./tests/vm -bin a.test,b.test [-run REGEX] [-flags FLAGS] [-v] | -kernel")
		os.Exit(2)
	}
	tests, err := binariesFromPaths(strings.Split(*bins, ","))
	if err != nil {
		fmt.Fprintln(os.Stderr, "vm:", err)
		os.Exit(2)
	}
	h, err := harnessFromEnv(logf)
	if err != nil {
		fmt.Fprintln(os.Stderr, "vm:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	var console io.Writer
	if *verbose {
		console = os.Stderr
	}
	r, res, err := h.runGroup(ctx, tests, testFlags(*run, *extra), console)
	if res != nil {
		fmt.Printf("===== kernel console (ttyS0)\n%s\n===== tests (ttyS1)\n%s\n", res.console, res.tests)
	}
	ok := err == nil
	if err != nil {
		fmt.Fprintln(os.Stderr, "vm:", err)
	}
	if r != nil {
		ok = summarize(os.Stdout, r, tests) && ok
	}
	if !ok {
		os.Exit(1)
	}
}

// testFlags turns a -test.run filter and a space-separated list of flags into arguments.
func testFlags(run, extra string) []string {
	var flags []string
	if run != "" {
		flags = append(flags, "-test.run="+run)
	}
	return append(flags, strings.Fields(extra)...)
}

// binariesFromPaths names each binary after its file, which must be unique in one boot.
func binariesFromPaths(paths []string) ([]testBinary, error) {
	var tests []testBinary
	for _, p := range paths {
		p = strings.TrimSpace(p)
		if p == "" {
			continue
		}
		st, err := os.Stat(p)
		if err != nil {
			return nil, fmt.Errorf("-bin: %w", err)
		}
		if st.IsDir() || st.Mode()&0o111 == 0 {
			return nil, fmt.Errorf("-bin %s: not an executable file", p)
		}
		tests = append(tests, testBinary{name: filepath.Base(p), path: p})
	}
	if len(tests) == 0 {
		return nil, errors.New("-bin: no binaries given")
	}
	return tests, nil
}

// summarize prints one line per binary and every failure; it reports whether all passed.
func summarize(w io.Writer, r *runResult, want []testBinary) bool {
	ok := true
	fmt.Fprintln(w, "===== summary")
	got := map[string]*binaryResult{}
	for _, b := range r.binaries {
		got[b.name] = b
	}
	for _, tb := range want {
		b := got[tb.name]
		if b == nil {
			fmt.Fprintf(w, "%-30s NOT RUN\n", tb.name)
			ok = false
			continue
		}
		c := b.counts()
		fmt.Fprintf(w, "%-30s exit=%d pass=%d fail=%d skip=%d\n", b.name, b.exit, c[pass], c[fail], c[skip])
		var walk func([]*testResult)
		walk = func(ts []*testResult) {
			for _, t := range ts {
				if t.outcome == fail || t.outcome == "" {
					fmt.Fprintf(w, "  %s %s\n", orNoResult(t.outcome), t.full)
				}
				walk(t.children)
			}
		}
		walk(b.tests)
		for _, p := range b.problems() {
			fmt.Fprintf(w, "  problem: %s\n", p)
			ok = false
		}
		if c[fail] > 0 {
			ok = false
		}
	}
	if ok {
		fmt.Fprintln(w, "PASS")
	} else {
		fmt.Fprintln(w, "FAIL")
	}
	return ok
}

func orNoResult(outcome string) string {
	if outcome == "" {
		return "NO RESULT"
	}
	return outcome
}
