package netns

import (
	"bytes"
	"context"
	"crypto/fips140"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pspd/pspd/internal/nsim"
	"github.com/pspd/pspd/localapi"
)

func TestMain(m *testing.M) {
	MaybeHelper()
	os.Exit(m.Run())
}

func moduleRoot(t *testing.T) string {
	wd, _ := os.Getwd()
	return filepath.Join(wd, "..", "..")
}

// inVM says whether the test runs inside the test VM (make vmtest).
func inVM() bool { return os.Getenv("PSPD_IN_VM") == "1" }

// hostOnly skips a userspace scenario inside the VM: the VM emulates its
// CPU (TCG), so it runs only TestDemo/userspace/udp of them, which proves
// the harness; the host kernel runs them all.
func hostOnly(t *testing.T) {
	if inVM() {
		t.Skip("userspace scenario runs on the host kernel (make unit); the VM (TCG) runs only TestDemo/userspace/udp to keep make vmtest short")
	}
}

// upPair starts two daemons (TwoHosts) with backend in a new lab, after
// configure adjusts the lab, and waits for their first association. The
// context ends with the test or after timeout. It skips when pspd says
// the host cannot run the backend, or the underlay needs netdevsim and
// the kernel has none.
func upPair(t *testing.T, prefix, backend string, timeout time.Duration, configure func(*Lab)) (context.Context, *Pair, [2]localapi.Assoc) {
	t.Helper()
	l := newLab(t, prefix)
	if inVM() {
		l.Underlay = Veth // the VM's kernel has no CONFIG_BRIDGE
	}
	if configure != nil {
		configure(l)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	start := time.Now()
	p, err := l.TwoHosts(ctx, backend)
	var u *UnavailableError
	switch {
	case errors.As(err, &u):
		t.Skipf("%v (pspd check in the lab); the test VM's kernel has it: make vmtest", err)
	case errors.Is(err, nsim.ErrUnsupported):
		t.Skipf("%v; the test VM's kernel has it: make vmtest", err)
	case err != nil:
		t.Fatal(err)
	}
	as, err := p.WaitAssoc(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	if as[0].Backend != backend {
		t.Fatalf("association uses backend %q, want %q", as[0].Backend, backend)
	}
	t.Logf("association up %v after start: a rx %#x, b rx %#x", time.Since(start), as[0].RxSPI, as[1].RxSPI)
	return ctx, p, as
}

func newLab(t *testing.T, prefix string) *Lab {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	l, err := NewLab(ctx, prefix, moduleRoot(t), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Close)
	return l
}

// TestDemo is `make demo` as a test, per backend: two real daemons, a TCP
// exchange through the association, a capture of the underlay that never
// shows the plaintext, and a rotation from pspctl after which traffic
// still flows. The xfrm variants need a kernel with ESP (the VM's).
func TestDemo(t *testing.T) {
	t.Run("userspace-auto", func(t *testing.T) {
		hostOnly(t)
		testDemo(t, "userspace", func(l *Lab) { l.IO = "auto" })
	})
	t.Run("userspace-udp", func(t *testing.T) { testDemo(t, "userspace", func(l *Lab) { l.IO = "udp" }) })
	t.Run("xfrm", func(t *testing.T) { testDemo(t, "xfrm", nil) })
	t.Run("xfrm-offload", func(t *testing.T) {
		testDemo(t, "xfrm", func(l *Lab) { l.Underlay, l.Offload = Netdevsim, "crypto" })
	})
}

func testDemo(t *testing.T, backend string, configure func(*Lab)) {
	ctx, p, as := upPair(t, "pnd-", backend, 2*time.Minute, configure)
	for _, line := range strings.Split(p.A.Tail(50), "\n") {
		if strings.Contains(line, "data plane up") {
			t.Log(line)
		}
	}

	const canary = "pspd-test-canary-"
	stop, err := p.Capture(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := EchoTCP(ctx, p.A.Host, p.B.Host, p.Inner[1], 256<<10, canary); err != nil {
		t.Fatal(err)
	}
	pcap, err := stop()
	if err != nil {
		t.Fatal(err)
	}
	if len(pcap) < 256<<10 {
		t.Fatalf("capture holds %d bytes: the traffic did not cross the underlay", len(pcap))
	}
	if p.Ports[0] != nil {
		offloaded(t, p)
	} else if bytes.Contains(pcap, []byte(canary)) {
		t.Fatal("plaintext canary on the underlay")
	}
	if backend == "xfrm" {
		espOnly(t, pcap)
	}

	// Under GODEBUG=fips140=on (make fips) the daemons run in FIPS 140-3
	// mode too, and say so.
	st, err := p.A.Ctl(ctx, "status", "--json")
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf(`"fips": %v`, fips140.Enabled()); !strings.Contains(st, want) {
		t.Fatalf("status does not say %s: %s", want, st)
	}

	out, err := p.A.Ctl(ctx, "assoc", "list")
	if err != nil || !strings.Contains(out, "b/1") || !strings.Contains(out, backend) {
		t.Fatalf("assoc list: %q %v", out, err)
	}
	// Rotation from pspctl: new SPIs, traffic still flows.
	if out, err := p.B.Ctl(ctx, "assoc", "rotate", "--all"); err != nil || !strings.Contains(out, " ok") {
		t.Fatalf("rotate: %q %v", out, err)
	}
	if _, err := p.WaitAssoc(ctx, as[0].Generation+1); err != nil {
		t.Fatal(err)
	}
	if _, err := EchoTCP(ctx, p.A.Host, p.B.Host, p.Inner[1], 64<<10, canary); err != nil {
		t.Fatalf("after rotation: %v", err)
	}
}

// espOnly checks that an xfrm underlay carried ESP and, in clear, nothing
// but pspd's QUIC, ARP and ICMPv6 (neighbour discovery).
func espOnly(t *testing.T, pcap []byte) {
	t.Helper()
	kinds, err := WireKinds(pcap)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("on the wire: %v", kinds)
	if kinds["esp"] == 0 {
		t.Error("no ESP on the underlay")
	}
	for k, n := range kinds {
		switch k {
		case "esp", "arp", "ipv6/58", fmt.Sprintf("udp/%d", ControlPort):
		default:
			t.Errorf("%d frames of %s in clear on the underlay", n, k)
		}
	}
}

// offloaded checks that both netdevsim ports hold pspd's SAs: the kernel
// handed their crypto to the "NIC". netdevsim only simulates offload and
// encrypts nothing, so on its wire ESP carries the plaintext, as a capture
// at a real offloading NIC's tap would show it before the hardware
// encrypts: the canary check does not apply there.
func offloaded(t *testing.T, p *Pair) {
	t.Helper()
	for _, port := range p.Ports {
		sas, err := port.IPsec()
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(sas, "SA count=2") {
			t.Errorf("netdevsim%d (%s) holds no SA pair:\n%s", port.ID, port.Name, sas)
		}
	}
}

// TestCrashFailsClosed kills one daemon with SIGKILL: with
// require_encryption the host refuses traffic to the peer while pspd is
// down (nothing leaves in clear), and a restarted daemon is back in
// association quickly.
func TestCrashFailsClosed(t *testing.T) {
	ctx, p, _ := upPair(t, "pnc-", "userspace", 2*time.Minute, nil)
	bootBefore := peerBoot(t, ctx, p.B)
	p.A.Kill()

	out, err := p.A.Host.Command(ctx, "ip", "route", "get", p.Inner[1]).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "prohibit") && !strings.Contains(string(out), "Permission denied") {
		t.Fatalf("with pspd dead, the route to the peer is %q (%v); want it prohibited", out, err)
	}
	const canary = "pspd-crash-canary-"
	stop, err := p.Capture(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := EchoTCP(ctx, p.A.Host, p.B.Host, p.Inner[1], 4096, canary); err == nil {
		t.Fatal("traffic to the peer got through while pspd was down")
	}
	pcap, _ := stop()
	if bytes.Contains(pcap, []byte(canary)) {
		t.Fatal("plaintext left the host while pspd was down")
	}

	restart := time.Now()
	if err := p.A.Start(ctx); err != nil {
		t.Fatal(err)
	}
	// The survivor must have a session with the new incarnation (a new
	// boot id), not just its stale association.
	for b := peerBoot(t, ctx, p.B); b == bootBefore || b == ""; b = peerBoot(t, ctx, p.B) {
		if time.Since(restart) > 10*time.Second {
			t.Fatal("the survivor still holds the session of the killed daemon 10s after the restart")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := p.WaitAssoc(ctx, 1); err != nil {
		t.Fatal(err)
	}
	t.Logf("association back %v after the restart", time.Since(restart))
	if _, err := EchoTCP(ctx, p.A.Host, p.B.Host, p.Inner[1], 64<<10, canary); err != nil {
		t.Fatalf("after restart: %v", err)
	}
}

// peerBoot is the boot id d sees for its only peer ("" without a session).
func peerBoot(t *testing.T, ctx context.Context, d *Daemon) string {
	t.Helper()
	out, err := d.Ctl(ctx, "peer", "list", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var ps []localapi.Peer
	if err := json.Unmarshal([]byte(out), &ps); err != nil || len(ps) != 1 {
		t.Fatalf("peer list %q: %v", out, err)
	}
	return ps[0].PeerBootID
}
