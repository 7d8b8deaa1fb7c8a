package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"
)

// marker starts every line /init writes about the run itself; test output never starts with it.
const marker = "@@PSPD-VM "

// hostTools are copied into the image when the host has them; tests find them through the
// environment variable because busybox ash runs its own applet for a bare "ip".
var hostTools = map[string]string{
	"PSPD_VM_IP":        "ip",
	"PSPD_VM_TC":        "tc",
	"PSPD_VM_ETHTOOL":   "ethtool",
	"PSPD_VM_TCPDUMP":   "tcpdump",
	"PSPD_VM_SS":        "ss",
	"PSPD_VM_NFT":       "nft",
	"PSPD_VM_CONNTRACK": "conntrack",
	"PSPD_VM_SOCAT":     "socat",
	"PSPD_VM_CURL":      "curl",
}

// bootConfig is one VM run: a kernel, a group of test binaries and their filter.
type bootConfig struct {
	kernel  string
	tests   []testBinary
	progs   map[string]string // env name -> host path of a program to ship (see programs)
	flags   []string          // extra flags for every binary, such as -test.run=REGEX
	timeout time.Duration     // whole boot, including every binary
	workDir string            // initramfs and serial logs go here
	console io.Writer         // if set, receives the kernel console as it arrives
}

// bootResult holds both serial ports: ttyS0 is the kernel console, ttyS1 carries only what
// /init and the test binaries write, so kernel messages never split a test's output line.
type bootResult struct {
	console  string
	tests    string
	duration time.Duration
	timedOut bool
	exitErr  error
}

// shellQuote quotes s for /bin/sh.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// initScript renders /init: mount the usual filesystems, bring up lo, run each binary with its
// start and exit markers on ttyS1, and end the VM.
func initScript(tests []testBinary, flags []string, tools map[string]string, perBinary time.Duration) []byte {
	var b strings.Builder
	b.WriteString(`#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp PSPD_IN_VM=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t debugfs debugfs /sys/kernel/debug
mount -t bpf bpf /sys/fs/bpf || echo "pspd-vm: bpffs not mounted"
ip link set lo up
stty -F /dev/ttyS1 raw -echo
exec 3>/dev/ttyS1
`)
	names := make([]string, 0, len(tools))
	for env := range tools {
		names = append(names, env)
	}
	sort.Strings(names)
	for _, env := range names {
		fmt.Fprintf(&b, "export %s=%s\n", env, shellQuote(tools[env]))
	}
	fmt.Fprintf(&b, "echo %sBOOTED >&3\ncd /tmp\n", marker)
	args := fmt.Sprintf("-test.v -test.count=1 -test.timeout=%s", perBinary)
	for _, f := range flags {
		args += " " + shellQuote(f)
	}
	for _, t := range tests {
		q := shellQuote(t.name)
		fmt.Fprintf(&b, "echo %sSTART %s >&3\n/tests/%s %s >&3 2>&1\necho %sEXIT %s $? >&3\n", marker, q, q, args, marker, q)
	}
	// The kernel has no ACPI, so "poweroff -f" only halts ("Power off not available: System
	// halted instead") and qemu would sit until the timeout; a reboot makes qemu (-no-reboot) exit.
	fmt.Fprintf(&b, "echo %sDONE >&3\nreboot -f\n", marker)
	return []byte(b.String())
}

// boot packs the initramfs and runs qemu once for the whole group.
func boot(ctx context.Context, cfg bootConfig) (*bootResult, error) {
	if err := needTools("boot the test VM", "qemu-system-x86_64"); err != nil {
		return nil, err
	}
	busybox, applets, err := findBusybox()
	if err != nil {
		return nil, err
	}
	tools := map[string]string{}
	for env, name := range hostTools {
		if p, err := exec.LookPath(name); err == nil {
			tools[env] = p
		}
	}
	seen := map[string]bool{}
	for _, t := range cfg.tests {
		if seen[t.name] {
			return nil, fmt.Errorf("two test binaries named %q: names must be unique", t.name)
		}
		seen[t.name] = true
	}
	// Each binary gets the whole budget minus boot time, so a hung test panics with its
	// goroutine dump instead of the VM being killed silently.
	perBinary := cfg.timeout - 30*time.Second
	if perBinary < 10*time.Second {
		perBinary = cfg.timeout
	}
	env := map[string]string{}
	for name, p := range tools {
		env[name] = p
	}
	for name, p := range cfg.progs {
		env[name] = programPath(p)
	}
	im := image{
		busybox: busybox,
		applets: applets,
		tools:   tools,
		progs:   cfg.progs,
		tests:   cfg.tests,
		init:    initScript(cfg.tests, cfg.flags, env, perBinary),
	}
	initrd := filepath.Join(cfg.workDir, "initrd.cpio.gz")
	f, err := os.Create(initrd)
	if err != nil {
		return nil, err
	}
	if err := im.write(f); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	testsLog := filepath.Join(cfg.workDir, "ttyS1.log")
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64",
		"-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "2",
		"-nodefaults", "-nographic", "-no-reboot",
		"-serial", "stdio", "-serial", "file:"+testsLog,
		"-kernel", cfg.kernel, "-initrd", initrd,
		"-append", "console=ttyS0 panic=-1 quiet")
	var console bytes.Buffer
	cmd.Stdout = &console
	if cfg.console != nil {
		cmd.Stdout = io.MultiWriter(&console, cfg.console)
	}
	cmd.Stderr = cmd.Stdout
	start := time.Now()
	runErr := cmd.Run()
	res := &bootResult{console: stripTerminalControl(console.String()), duration: time.Since(start), exitErr: runErr}
	res.timedOut = errors.Is(ctx.Err(), context.DeadlineExceeded)
	b, err := os.ReadFile(testsLog)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	res.tests = string(b)
	return res, nil
}

// terminalControl matches the screen resets and mode changes SeaBIOS writes to the serial port,
// and the carriage returns of the tty line discipline.
var terminalControl = regexp.MustCompile(`\x1b(\[[0-9;?]*[A-Za-z]|c)|\r`)

func stripTerminalControl(s string) string { return terminalControl.ReplaceAllString(s, "") }

// findBusybox returns a static busybox and its applet paths. A dynamic busybox would need the
// host's libc inside the image before /init can even start, so it is refused.
func findBusybox() (string, []string, error) {
	bb, err := exec.LookPath("busybox")
	if err != nil {
		return "", nil, unavailable("cannot build the initramfs: busybox not found (install busybox-static)")
	}
	static, err := isStatic(bb)
	if err != nil {
		return "", nil, fmt.Errorf("inspect %s: %w", bb, err)
	}
	if !static {
		return "", nil, unavailable("cannot build the initramfs: %s is dynamically linked (install busybox-static)", bb)
	}
	out, err := exec.Command(bb, "--list-full").Output()
	if err != nil {
		return "", nil, fmt.Errorf("%s --list-full: %w", bb, err)
	}
	var applets []string
	for _, a := range strings.Fields(string(out)) {
		applets = append(applets, "/"+a)
	}
	return bb, applets, nil
}
