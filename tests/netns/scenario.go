package netns

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/pspd/pspd/localapi"
)

// MetricsAddr is where daemons of a Lab with Metrics set serve /metrics,
// inside their own namespace.
const MetricsAddr = "127.0.0.1:9472"

// Pair is two hosts, each running pspd, on one switched underlay.
type Pair struct {
	A, B     *Daemon
	Inner    [2]string // inner addresses of A and B
	Underlay [2]string // underlay interface names in A and B
	// Switch joins the two; Tap is its port toward A. Captures are taken
	// there, on the wire: an AF_XDP data plane bypasses the packet taps
	// of the hosts' own interfaces.
	Switch *Host
	Tap    string
}

// TwoHosts sets up the demo topology: underlay 192.0.2.1/24 ↔ 192.0.2.2/24
// through a switch (a bridge in its own namespace), pspd in each namespace with the given backend, inner
// addresses 10.200.0.1 and 10.200.0.2 protected between them.
func (l *Lab) TwoHosts(ctx context.Context, backend string) (*Pair, error) {
	ha, err := l.Host(ctx, "a")
	if err != nil {
		return nil, err
	}
	hb, err := l.Host(ctx, "b")
	if err != nil {
		return nil, err
	}
	sw, err := l.Switch(ctx, "sw")
	if err != nil {
		return nil, err
	}
	if err := l.Attach(ctx, sw, ha, netip.MustParsePrefix("192.0.2.1/24")); err != nil {
		return nil, err
	}
	if err := l.Attach(ctx, sw, hb, netip.MustParsePrefix("192.0.2.2/24")); err != nil {
		return nil, err
	}
	p := &Pair{Inner: [2]string{"10.200.0.1", "10.200.0.2"}, Underlay: [2]string{l.Prefix + "ua", l.Prefix + "ub"},
		Switch: sw, Tap: l.Prefix + "pa"}
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
	conf := func(self, peer *Daemon, i int) error {
		return self.WriteConfig(fmt.Sprintf(`listen: 192.0.2.%d
metrics: %s
backend: %s
rekey_interval: 10m
require_encryption: true
userspace:
  address: %s/24
  io: %s
peers:
  - name: %s
    endpoint: 192.0.2.%d
    public_key: %s
    prefixes: [%s/32]
`, i+1, metrics, backend, p.Inner[i], io, peer.Host.Name, 2-i, peer.PubKey, p.Inner[1-i]))
	}
	if err := conf(p.A, p.B, 0); err != nil {
		return nil, err
	}
	if err := conf(p.B, p.A, 1); err != nil {
		return nil, err
	}
	for _, d := range []*Daemon{p.A, p.B} {
		if err := d.Start(ctx); err != nil {
			return nil, err
		}
	}
	return p, nil
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
	if _, err := exec.LookPath("tcpdump"); err != nil {
		return nil, fmt.Errorf("netns: capture needs tcpdump (apt-get install tcpdump)")
	}
	file := filepath.Join(h.lab.Dir, h.Name+"-"+dev+".pcap")
	cmd := h.Command(ctx, "tcpdump", "-i", dev, "-U", "-s", "0", "-w", file, "--immediate-mode")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	for range 50 { // tcpdump prints "listening on" once the socket is bound
		if bytes.Contains(stderr.Bytes(), []byte("listening on")) {
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
