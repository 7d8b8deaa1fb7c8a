package netns

import (
	"context"
	"crypto/fips140"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
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

// available skips the test when pspd check in the lab says the backend
// cannot run on this kernel, except inside the VM, whose kernel has every
// backend: there a refusal is pspd's own, and the test fails.
func available(ctx context.Context, t *testing.T, d *Daemon, backend string) {
	t.Helper()
	err := d.Available(ctx, backend)
	var u *UnavailableError
	switch {
	case err == nil:
	case errors.As(err, &u) && !inVM():
		t.Skipf("%v (pspd check in the lab); the test VM's kernel has it: make vmtest", err)
	default:
		t.Fatal(err)
	}
}

// hostOnly skips a userspace scenario inside the VM: the VM emulates its
// CPU (TCG), so it runs only TestDemo/userspace-udp of them, which proves
// the harness; the host kernel runs them all.
func hostOnly(t *testing.T) {
	if inVM() {
		t.Skip("userspace scenario runs on the host kernel (make unit); the VM (TCG) runs only TestDemo/userspace-udp to keep make vmtest short")
	}
}

// perBackend runs test as a subtest per backend; the userspace one on
// the host only.
func perBackend(t *testing.T, test func(t *testing.T, backend string)) {
	t.Run("userspace", func(t *testing.T) {
		hostOnly(t)
		test(t, "userspace")
	})
	t.Run("xfrm", func(t *testing.T) { test(t, "xfrm") })
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
	case errors.As(err, &u) && !inVM():
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
	// io auto takes UDP sockets on veth (no zero-copy AF_XDP), so AF_XDP
	// is asked for by name to keep it under test.
	t.Run("userspace-af_xdp", func(t *testing.T) {
		hostOnly(t)
		testDemo(t, "userspace", func(l *Lab) { l.IO = "af_xdp" })
	})
	t.Run("xfrm", func(t *testing.T) { testDemo(t, "xfrm", nil) })
	t.Run("xfrm-transport", func(t *testing.T) { testDemo(t, "xfrm", func(l *Lab) { l.Transport = true }) })
	t.Run("xfrm-offload", testOffload)
}

func testDemo(t *testing.T, backend string, configure func(*Lab)) {
	ctx, p, as := upPair(t, "pnd-", backend, 2*time.Minute, configure)
	for _, line := range strings.Split(p.A.Tail(50), "\n") {
		if strings.Contains(line, "data plane up") || strings.Contains(line, "underlay picked") {
			t.Log(line)
		}
	}

	const canary = "pspd-test-canary-"
	before, err := p.UnderlayBytes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	stop, err := p.Capture(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := EchoTCP(ctx, p.A.Host, p.B.Host, p.Inner[1], 256<<10, canary); err != nil {
		t.Fatalf("%v\n%s\n%s", err, xfrmDiag(ctx, p.A.Host), xfrmDiag(ctx, p.B.Host))
	}
	wire, err := stop()
	if err != nil {
		t.Fatal(err)
	}
	// The echo carries 256 KiB each way; the device counters, not the
	// capture, prove it crossed the underlay.
	after, err := p.UnderlayBytes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("underlay carried %d bytes; the capture holds %d", after-before, wire.Size())
	if after-before < 512<<10 {
		t.Fatalf("the underlay carried %d bytes for a 256 KiB echo: the traffic did not cross it", after-before)
	}
	if wire.Size() < 256<<10 {
		t.Fatalf("capture holds %d bytes of the echo: tcpdump lost most of it, so the plaintext check would be blind", wire.Size())
	}
	if wire.Contains(canary) {
		t.Fatalf("plaintext canary on the underlay\n%s", xfrmDiag(ctx, p.A.Host))
	}
	if backend == "xfrm" {
		espOnly(t, wire)
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

	// pspctl ping: round trips through the association, which its
	// counters show.
	out, err := p.A.Ctl(ctx, "ping", p.B.Host.Name, "--json")
	var pr localapi.PingResult
	if err == nil {
		err = json.Unmarshal([]byte(out), &pr)
	}
	if err != nil {
		t.Fatalf("pspctl ping %s: %v\n%s", p.B.Host.Name, err, out)
	}
	t.Logf("pspctl ping: %+v", pr)
	for _, r := range pr.Replies {
		if r.Error != "" || r.RTTMicros == 0 {
			t.Errorf("ping reply %+v", r)
		}
	}
	if len(pr.Replies) != 3 || pr.AssocPacketsOut < 3 || pr.AssocPacketsIn < 3 || pr.Backend != backend {
		t.Errorf("pspctl ping %s: %+v, want 3 round trips through the %s association", p.B.Host.Name, pr, backend)
	}

	out, err = p.A.Ctl(ctx, "assoc", "list")
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

// espOnly checks that an xfrm underlay carried ESP and nothing else in
// clear.
func espOnly(t *testing.T, wire Wire) {
	t.Helper()
	if kinds := nothingInClear(t, wire); kinds["esp"] == 0 {
		t.Error("no ESP on the underlay")
	}
}

// nothingInClear checks that the underlay carried, in clear, nothing but
// pspd's QUIC (and the unreachables a closed QUIC port draws), ARP,
// IGMP, IPv6 neighbour discovery and MLD, and the kinds in also, and
// returns what it carried.
func nothingInClear(t *testing.T, wire Wire, also ...string) map[string]int {
	t.Helper()
	kinds, err := wire.Kinds()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("on the wire: %v", kinds)
	for k, n := range kinds {
		switch {
		case slices.Contains(also, k):
		case slices.Contains([]string{"esp", "arp", "ipv4/2", "ipv6/0", "ipv6/58", // IGMP; IPv6 MLD and ND
			fmt.Sprintf("udp/%d", ControlPort), fmt.Sprintf("icmp-unreachable/udp/%d", ControlPort)}, k):
		default:
			t.Errorf("%d frames of %s in clear on the underlay", n, k)
		}
	}
	return kinds
}

// testOffload brings the xfrm backend up with offload: crypto on two
// linked netdevsim ports: both ports must hold the association's SAs and
// what a sends to b must go through its port's SA as ESP. netdevsim only
// simulates ESP offload: it encrypts nothing on transmit and does not
// decrypt on receive, so b's kernel rejects what arrives (an ICV
// failure) and traffic cannot complete a round trip; that part of the
// data path is TestDemo/xfrm's.
func testOffload(t *testing.T) {
	ctx, p, _ := upPair(t, "pno-", "xfrm", 2*time.Minute, func(l *Lab) { l.Underlay, l.Offload = Netdevsim, "crypto" })
	var txBefore int
	for i, port := range p.Ports {
		sas, tx, err := port.ESP()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("netdevsim%d (%s): %d SAs offloaded, %d packets sent through them", port.ID, port.Name, sas, tx)
		if sas != 2 {
			t.Errorf("netdevsim%d (%s) holds %d SAs, want the association's 2", port.ID, port.Name, sas)
		}
		if i == 0 {
			txBefore = tx
		}
	}
	const n = 50
	stop, err := p.Capture(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := UDPSend(ctx, p.A.Host, p.Inner[1], n, 500); err != nil {
		t.Fatal(err)
	}
	wire, err := stop()
	if err != nil {
		t.Fatal(err)
	}
	espOnly(t, wire)
	_, tx, err := p.Ports[0].ESP()
	if err != nil {
		t.Fatal(err)
	}
	if tx-txBefore < n {
		t.Errorf("netdevsim%d sent %d packets through its offloaded SA, want at least the %d datagrams", p.Ports[0].ID, tx-txBefore, n)
	}
}

// TestCrashFailsClosed kills one daemon with SIGKILL, per backend: with
// require_encryption the host refuses traffic to the peer while pspd is
// down (nothing leaves in clear: the userspace backend's prohibit route,
// the xfrm backend's policies stay in the kernel), and a restarted daemon
// is back in association quickly.
func TestCrashFailsClosed(t *testing.T) { perBackend(t, testCrash) }

func testCrash(t *testing.T, backend string) {
	ctx, p, _ := upPair(t, "pnc-", backend, 2*time.Minute, nil)
	bootBefore := peerBoot(t, ctx, p.B)
	p.A.Kill()

	if backend == "userspace" {
		out, err := p.A.Host.Command(ctx, "ip", "route", "get", p.Inner[1]).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "prohibit") && !strings.Contains(string(out), "Permission denied") {
			t.Fatalf("with pspd dead, the route to the peer is %q (%v); want it prohibited", out, err)
		}
	}
	const canary = "pspd-crash-canary-"
	if backend == "xfrm" {
		// The SAs a killed pspd leaves keep carrying traffic, encrypted,
		// until their hard lifetime; the restarted pspd reconciles them.
		stop, err := p.Capture(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := EchoTCP(ctx, p.A.Host, p.B.Host, p.Inner[1], 4096, canary); err != nil {
			t.Fatalf("on the SAs the killed pspd left: %v", err)
		}
		wire, _ := stop()
		if wire.Contains(canary) {
			t.Fatal("plaintext left the host while pspd was down")
		}
		espOnly(t, wire)
		// Once those SAs are gone, as at their expiry, the policies pspd
		// installed first must hold traffic back.
		if err := p.A.Host.IP(ctx, "xfrm", "state", "flush"); err != nil {
			t.Fatal(err)
		}
	}
	stop, err := p.Capture(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Refused traffic retries until this context ends.
	refusedCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	_, err = EchoTCP(refusedCtx, p.A.Host, p.B.Host, p.Inner[1], 4096, canary)
	cancel()
	if err == nil {
		t.Fatal("traffic to the peer got through while pspd was down")
	}
	wire, _ := stop()
	if wire.Contains(canary) {
		t.Fatal("plaintext left the host while pspd was down")
	}
	nothingInClear(t, wire)

	restart := time.Now()
	if err := p.A.Start(ctx); err != nil {
		t.Fatal(err)
	}
	answered := time.Now()
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
	t.Logf("association back %v after the restart, %v after pspd answered", time.Since(restart), time.Since(answered))
	if d := time.Since(answered); d > 2*time.Second {
		t.Errorf("association back only %v after the restarted pspd answered, want within 2s", d)
	}
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

// xfrmDiag is h's routes, XFRM policies and SAs for a failure message,
// without the SAs' key lines.
func xfrmDiag(ctx context.Context, h *Host) string {
	var b strings.Builder
	for _, args := range [][]string{{"route"}, {"-s", "xfrm", "state"}} {
		out, err := h.Command(ctx, "ip", args...).CombinedOutput()
		st, _ := h.Command(ctx, "cat", "/proc/net/xfrm_stat").CombinedOutput()
		out = append(out, st...)
		fmt.Fprintf(&b, "--- ip %s (%v)\n", strings.Join(args, " "), err)
		for _, line := range strings.Split(string(out), "\n") {
			if !strings.Contains(line, "aead") && !strings.Contains(line, "0x") {
				b.WriteString(line + "\n")
			}
		}
	}
	return b.String()
}
