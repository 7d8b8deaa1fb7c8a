package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/pspd/pspd/tests/netns"
)

// prefix names every namespace and interface the runner creates.
const prefix = "pbe-"

// A system is one way of carrying traffic between the two hosts.
type system struct {
	Name string // as printed in the tables
	kind string // veth, wireguard-go or pspd
	io   string // pspd's userspace.io
	// base runs the pspd built from -baseline's revision instead of the
	// working tree's.
	base bool
}

func (s system) isPspd() bool { return s.kind == "pspd" }

// id is how -systems names s: its kind, and pspd's io setting.
func (s system) id() string {
	if s.io != "" {
		return s.kind + ":" + s.io
	}
	return s.kind
}

// withBaseline adds after each pspd system its twin built from rev, so a
// change and the revision before it are measured in the same rounds.
func withBaseline(ss []system, rev string) []system {
	var out []system
	for _, s := range ss {
		out = append(out, s)
		if s.isPspd() {
			b := s
			b.Name, b.base = s.Name+" @"+rev, true
			out = append(out, b)
		}
	}
	return out
}

var allSystems = []system{
	{Name: "plain veth", kind: "veth"},
	{Name: "wireguard-go", kind: "wireguard-go"},
	{Name: "pspd userspace io=udp", kind: "pspd", io: "udp"},
	{Name: "pspd userspace io=af_xdp", kind: "pspd", io: "af_xdp"},
}

// env is a system brought up: traffic goes from client to addr on server.
type env struct {
	client, server *netns.Host
	addr           string
	pair           *netns.Pair // pspd only
	lab            *netns.Lab
	procs          []*exec.Cmd // wireguard-go processes
}

// close stops everything env started and deletes its namespaces.
func (e *env) close() {
	for _, p := range e.procs {
		// SIGTERM lets wireguard-go remove its control socket; a stale
		// one would make the next run's wg fall back to the kernel.
		p.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { p.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			p.Process.Kill()
			<-done
		}
	}
	e.lab.Close()
}

// tools are the binaries the runner builds once.
type tools struct {
	dir         string
	pspd        string
	pspctl      string
	wireguardGo string
	// basePspd and basePspctl are built from -baseline's revision.
	basePspd, basePspctl string
}

func buildTools(ctx context.Context, root, dir string) (*tools, error) {
	lab, err := netns.NewLab(ctx, prefix, root, dir)
	if err != nil {
		return nil, err
	}
	t := &tools{dir: dir, pspd: lab.Pspd, pspctl: lab.Pspctl, wireguardGo: filepath.Join(dir, "wireguard-go")}
	// Built from this module, whose go.mod pins wireguard-go as a tool, so
	// the main module never depends on it.
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", t.wireguardGo, "golang.zx2c4.com/wireguard").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build wireguard-go: %v\n%s", err, out)
	}
	if _, err := exec.LookPath("wg"); err != nil {
		return nil, errors.New("wireguard-go needs the wg command (apt-get install wireguard-tools)")
	}
	if _, err := exec.LookPath("iperf3"); err != nil {
		return nil, errors.New("iperf3 is missing (apt-get install iperf3)")
	}
	return t, nil
}

// buildBaseline builds pspd and pspctl from revision rev of the
// repository at root, from a copy of its tree (git archive), so that
// neither the working tree nor the repository's worktrees change.
func (t *tools) buildBaseline(ctx context.Context, root, rev string) error {
	src := filepath.Join(t.dir, "baseline-src")
	bin := filepath.Join(t.dir, "baseline")
	for _, d := range []string{src, bin} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	archive := exec.CommandContext(ctx, "sh", "-c", `git -C "$1" archive "$2" | tar -x -C "$3"`, "sh", root, rev, src)
	if out, err := archive.CombinedOutput(); err != nil {
		return fmt.Errorf("baseline %s: %v\n%s", rev, err, out)
	}
	lab, err := netns.NewLab(ctx, prefix, src, bin)
	if err != nil {
		return fmt.Errorf("baseline %s: %w", rev, err)
	}
	t.basePspd, t.basePspctl = lab.Pspd, lab.Pspctl
	return nil
}

// up builds the topology every system shares, the one netns.Lab.TwoHosts
// builds for pspd: hosts a (192.0.2.1) and b (192.0.2.2) joined through a
// bridge in a third namespace; then the system's tunnel over it.
func (t *tools) up(ctx context.Context, s system) (*env, error) {
	dir, err := os.MkdirTemp(t.dir, strings.ReplaceAll(s.Name, " ", "_")+"-")
	if err != nil {
		return nil, err
	}
	lab := &netns.Lab{Prefix: prefix, Dir: dir, Pspd: t.pspd, Pspctl: t.pspctl, IO: s.io}
	if s.base {
		lab.Pspd, lab.Pspctl = t.basePspd, t.basePspctl
	}
	e := &env{lab: lab}
	ok := false
	defer func() {
		if !ok {
			e.close()
		}
	}()
	if s.isPspd() {
		if e.pair, err = lab.TwoHosts(ctx, "userspace"); err != nil {
			return nil, err
		}
		if _, err := e.pair.WaitAssoc(ctx, 1); err != nil {
			return nil, err
		}
		e.client, e.server, e.addr = e.pair.A.Host, e.pair.B.Host, e.pair.Inner[1]
		ok = true
		return e, nil
	}
	if e.client, err = lab.Host(ctx, "a"); err != nil {
		return nil, err
	}
	if e.server, err = lab.Host(ctx, "b"); err != nil {
		return nil, err
	}
	sw, err := lab.Switch(ctx, "sw")
	if err != nil {
		return nil, err
	}
	for i, h := range []*netns.Host{e.client, e.server} {
		if err := lab.Attach(ctx, sw, h, netip.MustParsePrefix(fmt.Sprintf("192.0.2.%d/24", i+1))); err != nil {
			return nil, err
		}
	}
	e.addr = "192.0.2.2"
	if s.kind == "wireguard-go" {
		if err := t.wireguard(ctx, e); err != nil {
			return nil, err
		}
		e.addr = "10.200.0.2"
	}
	ok = true
	return e, nil
}

// wireguard runs wireguard-go in both hosts with the inner addresses pspd
// uses (10.200.0.1, 10.200.0.2) and configures it with wg. The interfaces
// have different names because wireguard-go's control socket path
// (/var/run/wireguard/NAME.sock) is not per namespace.
func (t *tools) wireguard(ctx context.Context, e *env) error {
	hosts := []*netns.Host{e.client, e.server}
	var keys, pubs [2]string
	for i := range hosts {
		priv, err := exec.CommandContext(ctx, "wg", "genkey").Output()
		if err != nil {
			return fmt.Errorf("wg genkey: %w", err)
		}
		keys[i] = filepath.Join(e.lab.Dir, fmt.Sprintf("wg%d.key", i))
		if err := os.WriteFile(keys[i], priv, 0o600); err != nil {
			return err
		}
		pub := exec.CommandContext(ctx, "wg", "pubkey")
		pub.Stdin = bytes.NewReader(priv)
		out, err := pub.Output()
		if err != nil {
			return fmt.Errorf("wg pubkey: %w", err)
		}
		pubs[i] = strings.TrimSpace(string(out))
	}
	for i, h := range hosts {
		dev := fmt.Sprintf("%swg%s", prefix, h.Name)
		sock := fmt.Sprintf("/var/run/wireguard/%s.sock", dev)
		os.Remove(sock) // left by a killed run
		cmd := h.Command(context.Background(), t.wireguardGo, dev)
		cmd.Env = append(os.Environ(), "WG_PROCESS_FOREGROUND=1", "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1")
		logf, err := os.Create(filepath.Join(e.lab.Dir, dev+".log"))
		if err != nil {
			return err
		}
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			logf.Close()
			return fmt.Errorf("start wireguard-go in %s: %w", h.NS, err)
		}
		logf.Close()
		e.procs = append(e.procs, cmd)
		if err := waitSocket(sock, 5*time.Second); err != nil {
			return fmt.Errorf("wireguard-go in %s: %w", h.NS, err)
		}
		wg := h.Command(ctx, "wg", "set", dev, "listen-port", "51820", "private-key", keys[i],
			"peer", pubs[1-i], "allowed-ips", fmt.Sprintf("10.200.0.%d/32", 2-i), "endpoint", fmt.Sprintf("192.0.2.%d:51820", 2-i))
		if out, err := wg.CombinedOutput(); err != nil {
			return fmt.Errorf("wg set %s: %v: %s", dev, err, out)
		}
		if err := h.IP(ctx, "addr", "add", fmt.Sprintf("10.200.0.%d/24", i+1), "dev", dev); err != nil {
			return err
		}
		if err := h.IP(ctx, "link", "set", dev, "up"); err != nil {
			return err
		}
	}
	return nil
}

// waitSocket waits until a unix socket accepts connections.
func waitSocket(path string, d time.Duration) error {
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil
		}
	}
	return fmt.Errorf("%s accepted no connection within %v", path, d)
}
