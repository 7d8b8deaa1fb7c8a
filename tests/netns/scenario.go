package netns

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/pspd/pspd/internal/nsim"
	"github.com/pspd/pspd/localapi"
)

// MetricsAddr is where daemons of a Lab with Metrics set serve /metrics,
// inside their own namespace.
const MetricsAddr = "127.0.0.1:9472"

// Underlay is how TwoHosts joins its two hosts.
type Underlay string

const (
	// Switched puts a bridge in a namespace of its own between the hosts;
	// captures are taken at its port toward a, on the wire: an AF_XDP data
	// plane bypasses the packet taps of the hosts' own interfaces.
	Switched Underlay = ""
	// Veth is one veth pair, for kernels without CONFIG_BRIDGE such as the
	// test VM's; captures are taken at both ends, outbound.
	Veth Underlay = "veth"
	// Netdevsim is two linked netdevsim ports, which offer ESP crypto
	// offload (esp-hw-offload); captures are taken at both ports,
	// outbound. It needs CONFIG_NETDEVSIM (the test VM has it).
	Netdevsim Underlay = "netdevsim"
)

// Pair is two hosts, each running pspd, joined by an underlay.
type Pair struct {
	A, B     *Daemon
	Inner    [2]string // inner addresses of A and B
	Underlay [2]string // underlay interface names in A and B
	// Ports are the netdevsim ports of A and B (Netdevsim underlay only).
	Ports [2]*nsim.Port

	taps []tap // where Capture records the underlay
}

// tap is one place to capture: a device in a host, and whether only
// frames it sends count. A host's own end must be captured outbound only:
// after decapsulating tunnel-mode ESP the kernel passes the inner packet
// up through the same device, where a capture of both directions shows
// it in clear although it crossed the wire encrypted.
type tap struct {
	h       *Host
	dev     string
	outOnly bool
}

// UnavailableError is TwoHosts' answer when pspd says this host cannot
// run the backend asked for; Reason is pspd's (from pspd check).
type UnavailableError struct {
	Backend, Reason string
}

func (e *UnavailableError) Error() string {
	return fmt.Sprintf("backend %s not available: %s", e.Backend, e.Reason)
}

// TwoHosts sets up the demo topology: underlay 192.0.2.1/24 ↔ 192.0.2.2/24
// (l.Underlay says how they are joined), pspd in each namespace with the
// given backend, inner addresses 10.200.0.1 and 10.200.0.2 protected
// between them. With backend userspace the inner addresses sit on pspd's
// TUN device; with xfrm on each host's loopback, routed to the peer, so
// pspd protects them in tunnel mode (with l.Transport the underlay
// addresses are the protected ones, in transport mode). It returns an
// *UnavailableError, before starting any daemon, when pspd check says the
// host lacks the backend.
func (l *Lab) TwoHosts(ctx context.Context, backend string) (*Pair, error) {
	if l.Transport && backend != "xfrm" {
		return nil, fmt.Errorf("netns: Transport is an xfrm mode; backend %s needs inner addresses", backend)
	}
	ha, err := l.Host(ctx, "a")
	if err != nil {
		return nil, err
	}
	hb, err := l.Host(ctx, "b")
	if err != nil {
		return nil, err
	}
	p := &Pair{Inner: [2]string{"10.200.0.1", "10.200.0.2"}}
	if l.Transport {
		p.Inner = [2]string{"192.0.2.1", "192.0.2.2"}
	}
	if err := l.underlay(ctx, p, ha, hb); err != nil {
		return nil, err
	}
	if p.A, err = l.NewDaemon(ctx, ha); err != nil {
		return nil, err
	}
	if p.B, err = l.NewDaemon(ctx, hb); err != nil {
		return nil, err
	}
	io := "auto"
	if l.IO != "" {
		io = l.IO
	}
	metrics := "off"
	if l.Metrics {
		metrics = MetricsAddr
	}
	offload := "none"
	if l.Offload != "" {
		offload = l.Offload
	}
	conf := func(self, peer *Daemon, i int) error {
		listen := fmt.Sprintf("192.0.2.%d", i+1)
		if l.Wildcard {
			listen = `"[::]"`
		}
		cfg := fmt.Sprintf(`listen: %s
metrics: %s
backend: %s
rekey_interval: 10m
require_encryption: true
`, listen, metrics, backend)
		if backend == "userspace" {
			cfg += fmt.Sprintf("userspace:\n  address: %s/24\n  io: %s\n", p.Inner[i], io)
		} else {
			cfg += fmt.Sprintf("offload: %s\n", offload)
		}
		return self.WriteConfig(cfg + fmt.Sprintf(`peers:
  - name: %s
    endpoint: 192.0.2.%d
    public_key: %s
    prefixes: [%s/32]
`, peer.Host.Name, 2-i, peer.PubKey, p.Inner[1-i]))
	}
	for i, d := range []*Daemon{p.A, p.B} {
		if err := conf(d, []*Daemon{p.B, p.A}[i], i); err != nil {
			return nil, err
		}
		if backend == "userspace" || l.Transport {
			continue
		}
		if err := d.Host.IP(ctx, "addr", "add", p.Inner[i]+"/32", "dev", "lo"); err != nil {
			return nil, err
		}
		if err := d.Host.IP(ctx, "route", "add", p.Inner[1-i]+"/32", "via", fmt.Sprintf("192.0.2.%d", 2-i), "src", p.Inner[i]); err != nil {
			return nil, err
		}
	}
	if err := p.A.Available(ctx, backend); err != nil {
		return nil, err
	}
	for _, d := range []*Daemon{p.A, p.B} {
		if err := d.Start(ctx); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// underlay joins a and b as l.Underlay says, with 192.0.2.1/24 on a and
// 192.0.2.2/24 on b.
func (l *Lab) underlay(ctx context.Context, p *Pair, a, b *Host) error {
	addrs := [2]netip.Prefix{netip.MustParsePrefix("192.0.2.1/24"), netip.MustParsePrefix("192.0.2.2/24")}
	switch l.Underlay {
	case Switched:
		sw, err := l.Switch(ctx, "sw")
		if err != nil {
			return err
		}
		for i, h := range []*Host{a, b} {
			if err := l.Attach(ctx, sw, h, addrs[i]); err != nil {
				return err
			}
		}
		p.Underlay = [2]string{l.Prefix + "ua", l.Prefix + "ub"}
		p.taps = []tap{{h: sw, dev: l.Prefix + "pa"}}
		return nil
	case Veth:
		p.Underlay = [2]string{l.Prefix + "ua", l.Prefix + "ub"}
		if err := run(ctx, "ip", "link", "add", p.Underlay[0], "netns", a.NS, "type", "veth", "peer", "name", p.Underlay[1], "netns", b.NS); err != nil {
			return err
		}
	case Netdevsim:
		for i, h := range []*Host{a, b} {
			port, err := nsim.New(l.nsimID(), filepath.Join("/run/netns", h.NS))
			if err != nil {
				return err
			}
			l.mu.Lock()
			l.ports = append(l.ports, port)
			l.mu.Unlock()
			p.Ports[i], p.Underlay[i] = port, port.Name
		}
		if err := nsim.Link(p.Ports[0], p.Ports[1]); err != nil {
			return err
		}
	default:
		return fmt.Errorf("netns: unknown underlay %q", l.Underlay)
	}
	for i, h := range []*Host{a, b} {
		if err := h.up(ctx, p.Underlay[i], addrs[i]); err != nil {
			return err
		}
		p.taps = append(p.taps, tap{h: h, dev: p.Underlay[i], outOnly: true})
	}
	return nil
}

// Available runs pspd check on d's configuration inside its host and
// returns an *UnavailableError if pspd says it cannot run backend there.
func (d *Daemon) Available(ctx context.Context, backend string) error {
	// check fails when the configured backend cannot run here; its probe
	// lines say why, and that is a skip, not a failure.
	out, err := d.Host.Command(ctx, d.Host.lab.Pspd, "check", "--config", d.Config).CombinedOutput()
	prefix := "backend " + backend + ": not available: "
	for _, line := range strings.Split(string(out), "\n") {
		if reason, ok := strings.CutPrefix(line, prefix); ok {
			return &UnavailableError{Backend: backend, Reason: reason}
		}
	}
	if err != nil {
		return fmt.Errorf("netns: pspd check in %s: %v: %s", d.Host.Name, err, bytes.TrimSpace(out))
	}
	return nil
}

// Capture records what crosses the underlay until stop is called.
func (p *Pair) Capture(ctx context.Context) (stop func() (Wire, error), err error) {
	var stops []func() ([]byte, error)
	stopAll := func() (Wire, error) {
		var w Wire
		var errs []error
		for _, s := range stops {
			b, err := s()
			w, errs = append(w, b), append(errs, err)
		}
		return w, errors.Join(errs...)
	}
	for _, tp := range p.taps {
		s, err := capture(ctx, tp.h, tp.dev, tp.outOnly)
		if err != nil {
			stopAll()
			return nil, err
		}
		stops = append(stops, s)
	}
	return stopAll, nil
}

// UnderlayBytes is how many bytes the capture points have carried so far:
// what a switch port sent and received, or what a host's own end sent.
// Unlike a capture, a device counter drops nothing under load.
func (p *Pair) UnderlayBytes(ctx context.Context) (uint64, error) {
	var sum uint64
	for _, tp := range p.taps {
		out, err := tp.h.Command(ctx, "ip", "-j", "-s", "link", "show", "dev", tp.dev).Output()
		if err != nil {
			return 0, fmt.Errorf("netns: counters of %s in %s: %w", tp.dev, tp.h.Name, err)
		}
		var links []struct {
			Stats struct {
				RX struct{ Bytes uint64 } `json:"rx"`
				TX struct{ Bytes uint64 } `json:"tx"`
			} `json:"stats64"`
		}
		if err := json.Unmarshal(out, &links); err != nil || len(links) != 1 {
			return 0, fmt.Errorf("netns: counters of %s in %s: %q: %v", tp.dev, tp.h.Name, out, err)
		}
		sum += links[0].Stats.TX.Bytes
		if !tp.outOnly {
			sum += links[0].Stats.RX.Bytes
		}
	}
	return sum, nil
}

// Assocs is the daemon's association list.
func (d *Daemon) Assocs(ctx context.Context) ([]localapi.Assoc, error) {
	out, err := d.Ctl(ctx, "assoc", "list", "--json")
	if err != nil {
		return nil, err
	}
	var as []localapi.Assoc
	return as, json.Unmarshal([]byte(out), &as)
}

// WaitAssoc waits until both daemons list an association of at least
// generation gen whose SPIs mirror each other.
func (p *Pair) WaitAssoc(ctx context.Context, gen uint32) ([2]localapi.Assoc, error) {
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		aa, err1 := p.A.Assocs(ctx)
		ab, err2 := p.B.Assocs(ctx)
		if err1 == nil && err2 == nil && len(aa) == 1 && len(ab) == 1 && aa[0].Generation >= gen &&
			aa[0].Generation == ab[0].Generation && aa[0].RxSPI == ab[0].TxSPI && aa[0].TxSPI == ab[0].RxSPI {
			return [2]localapi.Assoc{aa[0], ab[0]}, nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return [2]localapi.Assoc{}, fmt.Errorf("no mirrored association of generation ≥ %d within 20s\n--- a:\n%s\n--- b:\n%s", gen, p.A.Tail(20), p.B.Tail(20))
}

// Capture records the underlay of a host with tcpdump until stop is
// called, and returns the raw capture.
func Capture(ctx context.Context, h *Host, dev string) (stop func() ([]byte, error), err error) {
	return capture(ctx, h, dev, false)
}

func capture(ctx context.Context, h *Host, dev string, outOnly bool) (stop func() ([]byte, error), err error) {
	if _, err := exec.LookPath(tool("tcpdump")); err != nil {
		return nil, fmt.Errorf("netns: capture needs tcpdump (apt-get install tcpdump)")
	}
	file := filepath.Join(h.lab.Dir, h.Name+"-"+dev+".pcap")
	// -Z root: tcpdump would otherwise switch to user tcpdump, which the
	// VM's /etc/passwd does not have.
	// -B: a burst from an AF_XDP data plane overflows the default 2 MiB
	// buffer, and every frame dropped there is one the plaintext check
	// never sees.
	args := []string{"-Z", "root", "-i", dev, "-U", "-s", "0", "-B", "32768", "-w", file, "--immediate-mode"}
	if outOnly {
		args = append(args, "-Q", "out")
	}
	cmd := h.Command(ctx, "tcpdump", args...)
	var stderr lockedBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	for range 50 { // tcpdump prints "listening on" once the socket is bound
		if strings.Contains(stderr.String(), "listening on") {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	return func() ([]byte, error) {
		time.Sleep(200 * time.Millisecond)
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
		return os.ReadFile(file)
	}, nil
}
