package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A captured ttyS1 stream, shaped like Go's -test.v output: nested subtests, a skip with its
// reason, a failure with log lines, a marker glued to an unterminated line, and a second
// binary that panicked mid-test.
const sampleRun = `@@PSPD-VM BOOTED
@@PSPD-VM START a.test
=== RUN   TestOK
--- PASS: TestOK (0.00s)
=== RUN   TestParent
=== RUN   TestParent/skipped
    a_test.go:10: no netdevsim here
=== RUN   TestParent/failed
    a_test.go:20: want 1, got 2
    a_test.go:21: second line
--- FAIL: TestParent (0.01s)
    --- SKIP: TestParent/skipped (0.00s)
    --- FAIL: TestParent/failed (0.00s)
FAIL
@@PSPD-VM EXIT a.test 1
@@PSPD-VM START b.test
=== RUN   TestBoom
panic: boom
goroutine 1 [running]:@@PSPD-VM EXIT b.test 2
@@PSPD-VM DONE
`

func TestParseRun(t *testing.T) {
	r := parseRun(sampleRun)
	if !r.booted || !r.done || len(r.binaries) != 2 {
		t.Fatalf("booted=%v done=%v binaries=%d, want true true 2", r.booted, r.done, len(r.binaries))
	}
	a, b := r.binaries[0], r.binaries[1]
	if a.name != "a.test" || a.exit != 1 {
		t.Errorf("first binary %q exit %d, want a.test exit 1", a.name, a.exit)
	}
	if got := a.counts(); got[pass] != 1 || got[fail] != 2 || got[skip] != 1 {
		t.Errorf("a.test counts %v, want pass 1 fail 2 skip 1", got)
	}
	if len(a.problems()) != 0 {
		t.Errorf("a.test problems %q, want none (its failures are test failures)", a.problems())
	}
	parent := a.byName["TestParent"]
	if parent == nil || len(parent.children) != 2 {
		t.Fatalf("TestParent children: %+v", parent)
	}
	if s := parent.children[0]; s.name != "skipped" || s.outcome != skip || strings.Join(s.output, "|") != "    a_test.go:10: no netdevsim here" {
		t.Errorf("skipped subtest: %+v", s)
	}
	if f := parent.children[1]; f.outcome != fail || len(f.output) != 2 {
		t.Errorf("failed subtest: %+v", f)
	}
	if len(parent.output) != 0 {
		t.Errorf("TestParent got its children's or the binary's lines: %q", parent.output)
	}
	if b.exit != 2 {
		t.Errorf("b.test exit %d, want 2 (marker after an unterminated line)", b.exit)
	}
	if boom := b.byName["TestBoom"]; boom == nil || boom.outcome != "" || !strings.Contains(strings.Join(boom.output, "\n"), "panic: boom") {
		t.Errorf("TestBoom: %+v, want no outcome and the panic in its output", boom)
	}
	if p := b.problems(); len(p) != 2 {
		t.Errorf("b.test problems %q, want a crash and a test without outcome", p)
	}
}

func TestParseRunMissingMarkers(t *testing.T) {
	r := parseRun("@@PSPD-VM BOOTED\n@@PSPD-VM START a.test\n=== RUN   TestHang\n")
	if r.done {
		t.Error("done without a DONE marker")
	}
	if p := r.binaries[0].problems(); len(p) != 1 || !strings.Contains(p[0], "no exit marker") {
		t.Errorf("problems %q, want the missing exit marker", p)
	}
	empty := parseRun("@@PSPD-VM BOOTED\n@@PSPD-VM START a.test\ntesting: warning: no tests to run\nPASS\n@@PSPD-VM EXIT a.test 0\n@@PSPD-VM DONE\n")
	if p := empty.binaries[0].problems(); len(p) != 1 || !strings.Contains(p[0], "ran no tests") {
		t.Errorf("problems %q, want ran no tests", p)
	}
}

func TestVerifyConfig(t *testing.T) {
	frag := []byte("# comment\nCONFIG_A=y\nCONFIG_B=n\n# CONFIG_C is not set\nCONFIG_D=y\nCONFIG_E=\"x\"\n")
	good := []byte("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_D=y\nCONFIG_E=\"x\"\n")
	if err := verifyConfig(frag, good); err != nil {
		t.Errorf("good config: %v", err)
	}
	bad := []byte("CONFIG_A=y\nCONFIG_B=y\nCONFIG_C=y\nCONFIG_E=\"y\"\n")
	err := verifyConfig(frag, bad)
	if err == nil {
		t.Fatal("bad config accepted")
	}
	for _, want := range []string{"CONFIG_B=n (olddefconfig set it to y)", "CONFIG_C=n (olddefconfig set it to y)", "CONFIG_D=y (olddefconfig dropped it", `CONFIG_E="x"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not name %q:\n%v", want, err)
		}
	}
	if strings.Contains(err.Error(), "CONFIG_A") {
		t.Errorf("error names CONFIG_A, which survived:\n%v", err)
	}
}

// The shipped fragment must parse into CONFIG_ lines only: a typo such as "CONIFG_X=y" would
// otherwise be ignored by both kconfig and verifyConfig.
func TestFragmentWellFormed(t *testing.T) {
	for i, line := range strings.Split(string(fragment), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || (strings.HasPrefix(line, "#") && !strings.HasPrefix(line, "# CONFIG_")) {
			continue
		}
		if _, _, ok := configLine(line); !ok {
			t.Errorf("kernel.config:%d: %q is neither a comment nor a CONFIG_ line", i+1, line)
		}
	}
	for _, want := range []string{"CONFIG_INET_PSP=y", "CONFIG_NETDEVSIM=y", "CONFIG_INET_ESP=y", "CONFIG_XDP_SOCKETS=y", "CONFIG_TUN=y"} {
		if !bytes.Contains(fragment, []byte(want+"\n")) {
			t.Errorf("kernel.config lacks %s", want)
		}
	}
}

func TestMirrorFromDeb822(t *testing.T) {
	src := `Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm

Types: deb
# a comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/x.gpg
`
	m, ok := mirrorFromDeb822(src)
	if !ok || m.URI != "http://mirror.example/debian" || m.SignedBy != "/usr/share/keyrings/x.gpg" {
		t.Errorf("got %+v %v", m, ok)
	}
	m, ok = mirrorFromDeb822("Types: deb\nURIs: http://m.example/debian\nSuites: trixie\n")
	if !ok || m.SignedBy != defaultKeyring {
		t.Errorf("without Signed-By: got %+v %v, want the default keyring", m, ok)
	}
	if _, ok := mirrorFromDeb822("Types: deb\nURIs: http://m.example/debian-security\nSuites: trixie-security\n"); ok {
		t.Error("picked a security-only archive")
	}
}

func TestDebVersion(t *testing.T) {
	for in, want := range map[string]string{
		"/c/debs/linux-source-7.3_7.3.4-1~bpo13+1_all.deb": "7.3.4-1~bpo13+1",
		"x_1%3a2.0-1_all.deb":                              "1:2.0-1",
		"broken.deb":                                       "",
	} {
		if got := debVersion(in); got != want {
			t.Errorf("debVersion(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestInitramfsExtracts checks the newc writer against GNU cpio, an independent reader, and
// that a dynamic host tool arrives with its loader and libraries.
func TestInitramfsExtracts(t *testing.T) {
	cpio, err := exec.LookPath("cpio")
	if err != nil {
		t.Skip("cpio not installed (bash .ci/run installs it)")
	}
	bb, applets, err := findBusybox()
	if err != nil {
		t.Skipf("static busybox: %v", err)
	}
	ip, err := exec.LookPath("ip")
	if err != nil {
		t.Skip("ip (iproute2) not installed")
	}
	dir := t.TempDir()
	bin := bb // any static ELF stands in for a test binary
	im := image{
		busybox: bb,
		applets: applets,
		tools:   map[string]string{"PSPD_VM_IP": ip},
		progs:   map[string]string{"PSPD_BIN": bin}, // a static binary stands in for pspd too
		tests:   []testBinary{{name: "x.test", path: bin}},
		init:    initScript([]testBinary{{name: "x.test", path: bin}}, []string{"-test.run=TestA|TestB"}, map[string]string{"PSPD_VM_IP": ip}, time.Minute),
	}
	var buf bytes.Buffer
	if err := im.write(&buf); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(dir, "root")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sh", "-c", "gzip -dc | "+cpio+" -idm --quiet")
	cmd.Dir = root
	cmd.Stdin = &buf
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio rejected the archive: %v\n%s", err, out)
	}
	mustMatch := func(inImage, host string) {
		t.Helper()
		got, err := os.ReadFile(filepath.Join(root, inImage))
		if err != nil {
			t.Errorf("%s missing from image: %v", inImage, err)
			return
		}
		want, _ := os.ReadFile(host)
		if !bytes.Equal(got, want) {
			t.Errorf("%s differs from host %s", inImage, host)
		}
	}
	mustMatch("bin/busybox", bb)
	mustMatch("tests/x.test", bin)
	mustMatch(strings.TrimPrefix(programPath(bin), "/"), bin)
	mustMatch(strings.TrimPrefix(ip, "/"), ip)
	deps, err := elfDeps(ip)
	if err != nil {
		t.Fatal(err)
	}
	if len(deps) < 2 {
		t.Errorf("ip: found %d dependencies, want the loader and libc at least", len(deps))
	}
	for _, d := range deps {
		mustMatch(strings.TrimPrefix(d, "/"), d)
	}
	if target, err := os.Readlink(filepath.Join(root, "bin/sh")); err != nil || target != "/bin/busybox" {
		t.Errorf("bin/sh -> %q (%v), want /bin/busybox", target, err)
	}
	init, err := os.ReadFile(filepath.Join(root, "init"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"export PSPD_VM_IP='" + ip + "'", "/tests/'x.test' -test.v -test.count=1 -test.timeout=1m0s '-test.run=TestA|TestB'", "reboot -f"} {
		if !strings.Contains(string(init), want) {
			t.Errorf("/init lacks %q:\n%s", want, init)
		}
	}
	if st, err := os.Stat(filepath.Join(root, "init")); err != nil || st.Mode().Perm()&0o100 == 0 {
		t.Errorf("/init not executable: %v %v", st, err)
	}
}

func TestShellQuote(t *testing.T) {
	got, err := exec.Command("sh", "-c", "printf %s "+shellQuote(`a'b $x "c"`)).Output()
	if err != nil || string(got) != `a'b $x "c"` {
		t.Errorf("shellQuote round trip: %q %v", got, err)
	}
}

// Two holders of the cache lock must not overlap: the second waits for the first to release.
func TestLockFileSerialises(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	unlock, err := lockFile(t.Context(), path, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() {
		unlock2, err := lockFile(t.Context(), path, t.Logf)
		if err == nil {
			unlock2()
		}
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("second lock taken while the first is held (err %v)", err)
	case <-time.After(700 * time.Millisecond):
	}
	unlock()
	if err := <-got; err != nil {
		t.Fatalf("second lock after release: %v", err)
	}

	unlock, err = lockFile(t.Context(), path, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	if _, err := lockFile(ctx, path, t.Logf); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("lock wait with an expiring context: %v, want context.DeadlineExceeded", err)
	}
}

func TestRunKillsProcessGroup(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	pidFile := filepath.Join(t.TempDir(), "pid")
	// The shell starts a grandchild that does not hold the output pipe (so run returns as soon as
	// the shell dies) and waits; cancelling must kill both.
	_, err := run(ctx, nil, "", "sh", "-c", `sleep 30 >/dev/null 2>&1 & echo $! > "$1"; wait`, "sh", pidFile)
	if err == nil {
		t.Fatal("run returned no error after its context expired")
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	// A killed grandchild is reparented and may stay a zombie until reaped; that counts as dead.
	alive := func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return false
		}
		_, after, _ := strings.Cut(string(b), ") ")
		return !strings.HasPrefix(after, "Z")
	}
	deadline := time.Now().Add(2 * time.Second)
	for alive() {
		if time.Now().After(deadline) {
			syscall.Kill(pid, syscall.SIGKILL)
			t.Fatalf("grandchild %d still running after cancel", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The serial stream is whatever the VM printed, including a dying binary's half-written
// lines: the parser must never panic, and every test it reports must be reachable from its
// binary exactly once.
func FuzzParseRun(f *testing.F) {
	f.Add(sampleRun)
	f.Add("@@PSPD-VM START a\n=== RUN   A/B/C\n    --- FAIL: A/B (0s)\n--- PASS: /x (\n@@PSPD-VM EXIT a x\n")
	f.Add("@@PSPD-VM START a\n=== RUN   a//b\n--- SKIP: a/ (\n@@PSPD-VM START b\n@@PSPD-VM EXIT a 1\n")
	f.Fuzz(func(t *testing.T, text string) {
		r := parseRun(text)
		for _, b := range r.binaries {
			seen := map[*testResult]bool{}
			var walk func([]*testResult)
			walk = func(ts []*testResult) {
				for _, tr := range ts {
					if seen[tr] {
						t.Fatalf("%s reachable twice", tr.full)
					}
					seen[tr] = true
					walk(tr.children)
				}
			}
			walk(b.tests)
			if len(seen) != len(b.byName) {
				t.Fatalf("%d tests reachable, %d parsed", len(seen), len(b.byName))
			}
			b.problems()
		}
	})
}

func TestStripTerminalControl(t *testing.T) {
	in := "\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2)\nBooting from ROM..\x1bc\x1b[?7l\x1b[2Jreboot: Restarting system\r\n"
	want := "SeaBIOS (version 1.16.2)\nBooting from ROM..reboot: Restarting system\n"
	if got := stripTerminalControl(in); got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}
