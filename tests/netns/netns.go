// Package netns builds throwaway topologies of hosts (network namespaces
// joined by veth pairs) and runs real pspd daemons in them, for pspd's
// system tests and for `make demo`. Everything it creates is named with a
// caller-chosen prefix and removed by Close, also after a failure.
package netns

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/pspd/pspd/internal/nsim"
)

// Lab is a set of hosts and links that Close tears down.
type Lab struct {
	Prefix string
	Dir    string // scratch directory for identities, configs, logs
	Pspd   string // path of the pspd binary
	Pspctl string // path of the pspctl binary
	// Metrics makes TwoHosts' daemons serve /metrics on MetricsAddr.
	Metrics bool
	// IO is TwoHosts' userspace.io setting ("" leaves the default, auto).
	IO string
	// Offload is TwoHosts' offload setting for the xfrm backend ("" is
	// none: a veth or bridge has no ESP offload to use).
	Offload string
	// Underlay is how TwoHosts joins its hosts.
	Underlay Underlay
	// Transport makes TwoHosts protect the hosts' own underlay addresses
	// (xfrm transport mode) instead of inner addresses (tunnel mode).
	Transport bool
	// Wildcard makes TwoHosts' daemons listen on "[::]" instead of their
	// underlay address.
	Wildcard bool

	mu      sync.Mutex
	hosts   []*Host
	daemons []*Daemon
	ports   []*nsim.Port
	lastID  uint32
}

// nsimBase numbers the lab's netdevsim devices away from the ids other
// packages' VM tests use (they share one kernel, one binary at a time).
const nsimBase = 4600

func (l *Lab) nsimID() uint32 {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lastID++
	return nsimBase + l.lastID
}

// NewLab builds pspd and pspctl from the module at root into dir, unless
// PSPD_BIN and PSPCTL_BIN name binaries to use (the test VM ships them:
// it has no Go toolchain).
func NewLab(ctx context.Context, prefix, root, dir string) (*Lab, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("netns: needs root to create network namespaces")
	}
	if _, err := exec.LookPath(tool("ip")); err != nil {
		return nil, errors.New("netns: needs iproute2's ip command (apt-get install iproute2)")
	}
	l := &Lab{Prefix: prefix, Dir: dir}
	if pspd, pspctl := os.Getenv("PSPD_BIN"), os.Getenv("PSPCTL_BIN"); pspd != "" && pspctl != "" {
		l.Pspd, l.Pspctl = pspd, pspctl
		return l, nil
	}
	for _, b := range []string{"pspd", "pspctl"} {
		out := filepath.Join(dir, b)
		cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "./cmd/"+b)
		cmd.Dir = root
		if o, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("netns: build %s: %v\n%s", b, err, o)
		}
	}
	l.Pspd, l.Pspctl = filepath.Join(dir, "pspd"), filepath.Join(dir, "pspctl")
	return l, nil
}

// Host is one network namespace.
type Host struct {
	Name string // short name, e.g. "a"
	NS   string // namespace name
	lab  *Lab
}

// tool is the command to run for name: inside the test VM the one in
// PSPD_VM_<NAME> (the host's iproute2, tcpdump...), because PATH may find a
// busybox applet first that lacks what the lab needs (ip netns, veth).
func tool(name string) string {
	if strings.Contains(name, "/") {
		return name
	}
	if p := os.Getenv("PSPD_VM_" + strings.ToUpper(name)); p != "" {
		return p
	}
	return name
}

func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, tool(name), args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// Host creates a namespace with loopback up.
func (l *Lab) Host(ctx context.Context, name string) (*Host, error) {
	h := &Host{Name: name, NS: l.Prefix + name, lab: l}
	run(ctx, "ip", "netns", "del", h.NS) // a leftover from a killed run
	if err := run(ctx, "ip", "netns", "add", h.NS); err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.hosts = append(l.hosts, h)
	l.mu.Unlock()
	if err := h.IP(ctx, "link", "set", "lo", "up"); err != nil {
		return nil, err
	}
	return h, nil
}

// IP runs `ip` inside the host.
func (h *Host) IP(ctx context.Context, args ...string) error {
	return run(ctx, "ip", append([]string{"-n", h.NS}, args...)...)
}

// Command is a command to run inside the host.
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, tool("ip"), append([]string{"netns", "exec", h.NS, tool(name)}, args...)...)
}

// Run runs a command inside the host; its output is in the error.
func (h *Host) Run(ctx context.Context, name string, args ...string) error {
	if out, err := h.Command(ctx, name, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s in %s: %v: %s", name, strings.Join(args, " "), h.Name, err, bytes.TrimSpace(out))
	}
	return nil
}

// Nft loads rules (nft -f syntax) into the host's nftables.
func (h *Host) Nft(ctx context.Context, rules string) error {
	cmd := h.Command(ctx, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft in %s: %v: %s\n%s", h.Name, err, bytes.TrimSpace(out), rules)
	}
	return nil
}

// Link joins a and b with a veth pair carrying the given addresses.
func (l *Lab) Link(ctx context.Context, a, b *Host, addrA, addrB netip.Prefix) error {
	ea, eb := l.Prefix+a.Name+b.Name, l.Prefix+b.Name+a.Name
	if err := run(ctx, "ip", "link", "add", ea, "netns", a.NS, "type", "veth", "peer", "name", eb, "netns", b.NS); err != nil {
		return err
	}
	if err := a.up(ctx, ea, addrA); err != nil {
		return err
	}
	return b.up(ctx, eb, addrB)
}

// up gives dev the address and brings it up.
func (h *Host) up(ctx context.Context, dev string, addr netip.Prefix) error {
	if err := h.IP(ctx, "addr", "add", addr.String(), "dev", dev); err != nil {
		return err
	}
	return h.IP(ctx, "link", "set", dev, "up")
}

// Close stops every daemon and deletes every namespace.
func (l *Lab) Close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, d := range l.daemons {
		d.Stop()
	}
	for _, p := range l.ports {
		p.Close()
	}
	for _, h := range l.hosts {
		run(context.Background(), "ip", "netns", "del", h.NS)
	}
}

// Daemon is a pspd running in a host.
type Daemon struct {
	Host   *Host
	Dir    string
	Config string
	Socket string
	Log    string
	PubKey string

	body string // the configuration after the identity and socket lines
	cmd  *exec.Cmd
	done chan error
}

// NewDaemon creates an identity for a pspd in h; Start runs it.
func (l *Lab) NewDaemon(ctx context.Context, h *Host) (*Daemon, error) {
	dir := filepath.Join(l.Dir, h.Name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	d := &Daemon{Host: h, Dir: dir, Config: filepath.Join(dir, "pspd.yaml"), Socket: filepath.Join(dir, "pspd.sock"), Log: filepath.Join(dir, "pspd.log")}
	out, err := exec.CommandContext(ctx, l.Pspd, "genkey", "--force", "--identity", filepath.Join(dir, "identity.pem")).Output()
	if err != nil {
		return nil, fmt.Errorf("netns: genkey for %s: %w", h.Name, err)
	}
	d.PubKey = strings.TrimSpace(string(out))
	l.mu.Lock()
	l.daemons = append(l.daemons, d)
	l.mu.Unlock()
	return d, nil
}

// WriteConfig writes the daemon's configuration; body is appended after
// the identity and socket lines.
func (d *Daemon) WriteConfig(body string) error {
	head := fmt.Sprintf("identity: %s\nsocket: %s\n", filepath.Join(d.Dir, "identity.pem"), d.Socket)
	d.body = body
	return os.WriteFile(d.Config, []byte(head+body), 0o600)
}

// EditConfig rewrites the body WriteConfig last wrote with edit.
func (d *Daemon) EditConfig(edit func(body string) string) error {
	return d.WriteConfig(edit(d.body))
}

// Reload sends SIGHUP and waits until the daemon's log has a new line
// containing one of outcomes (what a successful or a refused reload
// logs), which it returns.
func (d *Daemon) Reload(ctx context.Context, outcomes ...string) (string, error) {
	before, _ := os.ReadFile(d.Log)
	if d.cmd == nil || d.cmd.Process == nil {
		return "", fmt.Errorf("netns: reload of pspd in %s, which is not running", d.Host.Name)
	}
	if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		return "", err
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		b, _ := os.ReadFile(d.Log)
		if len(b) > len(before) {
			for _, line := range strings.Split(string(b[len(before):]), "\n") {
				for _, o := range outcomes {
					if strings.Contains(line, o) {
						return line, nil
					}
				}
			}
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return "", fmt.Errorf("netns: pspd in %s logged none of %q within 10s of SIGHUP; log:\n%s", d.Host.Name, outcomes, d.Tail(20))
}

// Start runs pspd in its host and waits until its API answers.
func (d *Daemon) Start(ctx context.Context) error {
	logf, err := os.OpenFile(d.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	d.cmd = d.Host.Command(context.Background(), d.Host.lab.Pspd, "run", "--config", d.Config, "--log-format", "text")
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	if err := d.cmd.Start(); err != nil {
		logf.Close()
		return err
	}
	d.done = make(chan error, 1)
	go func() { d.done <- d.cmd.Wait(); logf.Close() }()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := d.Ctl(ctx, "status"); err == nil {
			return nil
		}
		select {
		case err := <-d.done:
			d.done <- err
			return fmt.Errorf("netns: pspd in %s exited: %v; log:\n%s", d.Host.Name, err, d.Tail(30))
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("netns: pspd in %s did not answer on %s within 15s; log:\n%s", d.Host.Name, d.Socket, d.Tail(30))
}

// Stop sends SIGTERM and waits for the daemon to exit.
func (d *Daemon) Stop() {
	if d.cmd == nil || d.cmd.Process == nil {
		return
	}
	d.cmd.Process.Signal(os.Interrupt)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		d.cmd.Process.Kill()
		<-d.done
	}
	d.cmd = nil
}

// Kill ends the daemon with SIGKILL, as a crash would.
func (d *Daemon) Kill() {
	if d.cmd == nil || d.cmd.Process == nil {
		return
	}
	d.cmd.Process.Kill()
	<-d.done
	d.cmd = nil
}

// Ctl runs pspctl against the daemon and returns its output.
func (d *Daemon) Ctl(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, d.Host.lab.Pspctl, append([]string{"--socket", d.Socket}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("pspctl %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// Tail is the last n lines of the daemon's log.
func (d *Daemon) Tail(n int) string {
	b, _ := os.ReadFile(d.Log)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Switch creates a namespace holding a bridge; Attach plugs hosts into it,
// so many hosts share one underlay segment.
func (l *Lab) Switch(ctx context.Context, name string) (*Host, error) {
	sw, err := l.Host(ctx, name)
	if err != nil {
		return nil, err
	}
	if err := sw.IP(ctx, "link", "add", "br0", "type", "bridge"); err != nil {
		return nil, err
	}
	return sw, sw.IP(ctx, "link", "set", "br0", "up")
}

// Attach links h to the switch sw with address addr on h's side.
func (l *Lab) Attach(ctx context.Context, sw, h *Host, addr netip.Prefix) error {
	ports := l.Prefix + "p" + h.Name
	eh := l.Prefix + "u" + h.Name
	if err := run(ctx, "ip", "link", "add", eh, "netns", h.NS, "type", "veth", "peer", "name", ports, "netns", sw.NS); err != nil {
		return err
	}
	if err := sw.IP(ctx, "link", "set", ports, "master", "br0", "up"); err != nil {
		return err
	}
	return h.up(ctx, eh, addr)
}
