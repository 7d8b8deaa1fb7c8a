package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// defaultPkgs are the packages whose tests TestVM runs inside the VM when PSPD_VM_PKGS is unset.
// A default package whose directory is not in the tree yet is reported as a skipped subtest;
// one named in PSPD_VM_PKGS must exist.
var defaultPkgs = []string{"./tests/vm/kernelcheck", "./genl", "./xfrm", "./xfrm/backend", "./offload/psp", "./internal/nsim", "./tests/netns"}

// TestVM builds the in-VM test binaries, boots the kernel once and reports every in-VM test
// as a subtest with the same outcome. It runs only with PSPD_VM=auto|required (make vmtest),
// so `go test ./...` does not boot a VM a second time.
func TestVM(t *testing.T) {
	h, cannot := vmHarness(t)
	ctx := t.Context()
	pkgs, explicit := defaultPkgs, false
	if s := os.Getenv("PSPD_VM_PKGS"); s != "" {
		pkgs, explicit = strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' }), true
	}
	root, err := moduleRoot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var present []string
	for _, pkg := range pkgs {
		if _, err := os.Stat(filepath.Join(root, pkg)); err != nil {
			if explicit {
				t.Fatalf("PSPD_VM_PKGS names %s: %v", pkg, err)
			}
			t.Run(binaryName(pkg), func(t *testing.T) { t.Skipf("package %s is not in this tree yet: %v", pkg, err) })
			continue
		}
		present = append(present, pkg)
	}
	tests, err := buildTestBinaries(ctx, t.TempDir(), present)
	if err != nil {
		t.Fatal(err)
	}
	r, res, err := h.runGroup(ctx, tests, testFlags(os.Getenv("PSPD_VM_RUN"), os.Getenv("PSPD_VM_TESTFLAGS")), nil)
	if err != nil {
		if r == nil {
			cannot(err)
		}
		t.Error(err)
	}
	if res != nil {
		t.Logf("VM run (boot + %d binaries) took %s", len(tests), res.duration.Round(time.Millisecond))
	}
	if r == nil {
		return
	}
	got := map[string]*binaryResult{}
	for _, b := range r.binaries {
		got[b.name] = b
	}
	for _, tb := range tests {
		t.Run(tb.name, func(t *testing.T) {
			b := got[tb.name]
			if b == nil {
				t.Fatal("binary never started in the VM")
			}
			for _, tr := range b.tests {
				report(t, tr)
			}
			for _, p := range b.problems() {
				t.Error(p)
			}
			// A kernel warning or oops explains many in-VM failures; it went to the console.
			if t.Failed() && res != nil {
				t.Logf("kernel console (ttyS0), last lines:\n%s", tail(res.console, 60))
			}
		})
	}
}

// vmHarness applies the PSPD_VM gate and returns the harness and a function that ends the test
// when the VM cannot be had: a skip under auto, a failure under required. Anything else wrong
// (kernel config, boot, tests) always fails.
func vmHarness(t *testing.T) (harness, func(error)) {
	t.Helper()
	mode := os.Getenv("PSPD_VM")
	switch mode {
	case "":
		t.Skip("set PSPD_VM=auto|required (make vmtest)")
	case "auto", "required":
	default:
		t.Fatalf("PSPD_VM=%q: want auto or required", mode)
	}
	if os.Getenv("PSPD_IN_VM") == "1" {
		t.Skip("already inside the test VM")
	}
	h, err := harnessFromEnv(t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	if d, ok := t.Deadline(); ok && time.Until(d) < h.timeout+time.Minute {
		h.timeout = time.Until(d) - time.Minute
	}
	cannot := func(err error) {
		t.Helper()
		var u *unavailableError
		if mode == "auto" && errors.As(err, &u) {
			t.Skipf("PSPD_VM=auto: %v", err)
		}
		t.Fatal(err)
	}
	return h, cannot
}

// TestVMReportsOutcomes boots the fixture in testdata/outcomes, which has a test of every
// outcome and then crashes, and checks that the harness sees each as it happened in the VM.
func TestVMReportsOutcomes(t *testing.T) {
	h, cannot := vmHarness(t)
	tests, err := buildTestBinaries(t.Context(), t.TempDir(), []string{"./tests/vm/testdata/outcomes"})
	if err != nil {
		t.Fatal(err)
	}
	r, _, err := h.runGroup(t.Context(), tests, nil, nil)
	if err != nil {
		if r == nil {
			cannot(err)
		}
		t.Fatal(err)
	}
	if len(r.binaries) != 1 {
		t.Fatalf("%d binaries ran, want 1", len(r.binaries))
	}
	b := r.binaries[0]
	if b.exit != 3 {
		t.Errorf("exit %d, want 3 from os.Exit in TestCrash", b.exit)
	}
	if c := b.counts(); c[pass] != 2 || c[fail] != 2 || c[skip] != 1 || c[""] != 1 {
		t.Errorf("counts %v, want pass 2 (TestPass, TestFail/ok), fail 2 (TestFail, TestFail/bad), skip 1, no result 1 (TestCrash)", c)
	}
	for name, want := range map[string]string{"TestSkip": "fixture skip reason", "TestFail/bad": "fixture failure message"} {
		if tr := b.byName[name]; tr == nil || !strings.Contains(strings.Join(tr.output, "\n"), want) {
			t.Errorf("%s: output lacks %q: %+v", name, want, tr)
		}
	}
	if p := b.problems(); len(p) != 1 || !strings.Contains(p[0], "never reported an outcome") {
		t.Errorf("problems %q, want only the crashed test without outcome", p)
	}
}

// report mirrors one in-VM test (and its subtests) as a subtest with the same outcome.
func report(t *testing.T, tr *testResult) {
	t.Run(tr.name, func(t *testing.T) {
		childFailed := false
		for _, c := range tr.children {
			report(t, c)
			childFailed = childFailed || c.outcome == fail
		}
		out := strings.TrimSpace(strings.Join(tr.output, "\n"))
		switch tr.outcome {
		case pass:
			if out != "" {
				t.Log(out)
			}
		case skip:
			t.Skip(out)
		case fail:
			if out != "" || !childFailed {
				t.Errorf("failed in the VM:\n%s", out)
			}
		default:
			t.Errorf("no outcome reported (the binary died during this test):\n%s", out)
		}
	})
}

// buildTestBinaries compiles each package's tests into a static binary named after the package
// path, so one boot can hold binaries from several packages.
func buildTestBinaries(ctx context.Context, dir string, pkgs []string) ([]testBinary, error) {
	root, err := moduleRoot(ctx)
	if err != nil {
		return nil, err
	}
	var tests []testBinary
	for _, pkg := range pkgs {
		name := binaryName(pkg)
		out := filepath.Join(dir, name)
		cmd := exec.CommandContext(ctx, "go", "test", "-c", "-o", out, pkg)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("build test binary for %s: %v\n%s", pkg, err, b)
		}
		if _, err := os.Stat(out); err != nil {
			return nil, fmt.Errorf("build test binary for %s: no binary written (does the package have tests?)", pkg)
		}
		tests = append(tests, testBinary{name: name, path: out})
	}
	return tests, nil
}

// binaryName names a package's test binary after its path: ./tests/vm/kernelcheck becomes
// tests-vm-kernelcheck.test, unique within one boot and the name its subtest carries.
func binaryName(pkg string) string {
	return strings.ReplaceAll(strings.Trim(strings.TrimPrefix(pkg, "./"), "/"), "/", "-") + ".test"
}
