package netns

import (
	"bytes"
	"context"
	"crypto/fips140"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

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

// upPair starts two daemons (TwoHosts, userspace backend) in a new lab,
// after configure adjusts the lab, and waits for their first association.
// The context ends with the test or after timeout.
func upPair(t *testing.T, prefix string, timeout time.Duration, configure func(*Lab)) (context.Context, *Pair, [2]localapi.Assoc) {
	t.Helper()
	l := newLab(t, prefix)
	if configure != nil {
		configure(l)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	start := time.Now()
	p, err := l.TwoHosts(ctx, "userspace")
	if err != nil {
		t.Fatal(err)
	}
	as, err := p.WaitAssoc(ctx, 1)
	if err != nil {
		t.Fatal(err)
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

// TestDemo is `make demo` as a test: two real daemons, the userspace
// backend, a TCP exchange through the tunnel, and a capture of the
// underlay that never shows the plaintext.
func TestDemo(t *testing.T) {
	for _, io := range []string{"auto", "udp"} {
		t.Run(io, func(t *testing.T) { testDemo(t, io) })
	}
}

func testDemo(t *testing.T, io string) {
	ctx, p, as := upPair(t, "pnd-", 2*time.Minute, func(l *Lab) { l.IO = io })
	for _, line := range strings.Split(p.A.Tail(50), "\n") {
		if strings.Contains(line, "userspace data plane up") {
			t.Log(line)
		}
	}

	const canary = "pspd-test-canary-"
	stop, err := Capture(ctx, p.Switch, p.Tap)
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
	if bytes.Contains(pcap, []byte(canary)) {
		t.Fatal("plaintext canary on the underlay")
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
	if err != nil || !strings.Contains(out, "b/1") || !strings.Contains(out, "userspace") {
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

// TestCrashFailsClosed kills one daemon with SIGKILL: with
// require_encryption the host refuses traffic to the peer while pspd is
// down (nothing leaves in clear), and a restarted daemon is back in
// association quickly.
func TestCrashFailsClosed(t *testing.T) {
	ctx, p, _ := upPair(t, "pnc-", 2*time.Minute, nil)
	bootBefore := peerBoot(t, ctx, p.B)
	p.A.Kill()

	out, err := p.A.Host.Command(ctx, "ip", "route", "get", p.Inner[1]).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "prohibit") && !strings.Contains(string(out), "Permission denied") {
		t.Fatalf("with pspd dead, the route to the peer is %q (%v); want it prohibited", out, err)
	}
	const canary = "pspd-crash-canary-"
	stop, err := Capture(ctx, p.Switch, p.Tap)
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
