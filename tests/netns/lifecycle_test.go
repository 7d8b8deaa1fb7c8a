package netns

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pspd/pspd/localapi"
)

// TestLifecycle takes one pair, per backend, with require_encryption on,
// through the transitions an operator makes: stop and restart, reloads
// that change prefixes, the suite, a restart-only setting or nothing
// valid at all, removing and re-adding the peer, and a stop without
// require_encryption. A capture covers all of it and must never hold the
// canary in clear.
func TestLifecycle(t *testing.T) {
	perBackend(t, testLifecycle)
	t.Run("xfrm-offload", testLifecycleOffload)
}

// testLifecycleOffload takes an offloaded pair (offload: crypto on two
// linked netdevsim ports) through stop, restart and a prefix reload: the
// ports drop the SAs with the stop while the policies stay, hold the new
// SAs after the restart, and keep them through the reload. netdevsim
// only simulates ESP offload (no round trip of traffic), so this checks
// the kernel state, and TestLifecycle/xfrm the traffic.
func testLifecycleOffload(t *testing.T) {
	ctx, p, _ := upPair(t, "pnlo-", "xfrm", 3*time.Minute, func(l *Lab) { l.Underlay, l.Offload = Netdevsim, "crypto" })
	offloaded := func() int {
		sas, _, err := p.Ports[0].ESP()
		if err != nil {
			t.Fatal(err)
		}
		return sas
	}
	if n := offloaded(); n != 2 {
		t.Fatalf("a's port holds %d SAs, want the association's 2", n)
	}
	p.A.Stop()
	if n := offloaded(); n != 0 {
		t.Errorf("after SIGTERM a's port still holds %d SAs", n)
	}
	if fc := failClosedState(t, ctx, p, "xfrm"); fc == "" {
		t.Errorf("after SIGTERM no fail-closed state for the peer\n%s", xfrmDiag(ctx, p.A.Host))
	}
	restart := time.Now()
	if err := p.A.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if as, err := p.WaitAssoc(ctx, 1); err != nil {
		t.Fatal(err)
	} else {
		t.Logf("offload: association back %v after the restart (generation %d)", time.Since(restart), as[0].Generation)
	}
	for deadline := time.Now().Add(5 * time.Second); offloaded() != 2 && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	if n := offloaded(); n != 2 {
		t.Errorf("after the restart a's port holds %d SAs, want 2", n)
	}
	before, err := p.WaitAssoc(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.A.EditConfig(func(s string) string {
		return strings.Replace(s, "prefixes: ["+p.Inner[1]+"/32]", "prefixes: ["+p.Inner[1]+"/32, 10.201.0.2/32]", 1)
	}); err != nil {
		t.Fatal(err)
	}
	if line, err := p.A.Reload(ctx, "configuration reloaded", "reload failed"); err != nil || !strings.Contains(line, "configuration reloaded") {
		t.Fatalf("prefix reload: %q %v", line, err)
	}
	after, err := p.WaitAssoc(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	if after[0].Generation != before[0].Generation || after[0].RxSPI != before[0].RxSPI || offloaded() != 2 {
		t.Errorf("the prefix reload replaced the offloaded association: %d/%#x → %d/%#x, %d SAs on the port", before[0].Generation, before[0].RxSPI, after[0].Generation, after[0].RxSPI, offloaded())
	}
}

const lifecycleCanary = "pspd-lifecycle-canary-"

func testLifecycle(t *testing.T, backend string) {
	ctx, p, as := upPair(t, "pnl-", backend, 5*time.Minute, nil)
	stopCapture, err := p.Capture(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		wire, err := stopCapture()
		if err != nil {
			t.Fatal(err)
		}
		if wire.Contains(lifecycleCanary) {
			t.Fatal("plaintext canary on the underlay during the lifecycle")
		}
		if backend == "xfrm" {
			nothingInClear(t, wire)
		}
	}()
	echo := func(step string) {
		t.Helper()
		if _, err := EchoTCP(ctx, p.A.Host, p.B.Host, p.Inner[1], 64<<10, lifecycleCanary); err != nil {
			t.Fatalf("%s: traffic: %v\n%s", step, err, xfrmDiag(ctx, p.A.Host))
		}
	}

	// SIGTERM: the SAs go, the fail-closed state stays, nothing leaves
	// in clear until the restarted daemon is back.
	p.A.Stop()
	failsClosed(t, ctx, p, backend, "after SIGTERM")
	restart := time.Now()
	if err := p.A.Start(ctx); err != nil {
		t.Fatal(err)
	}
	as, err = p.WaitAssoc(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("SIGTERM + restart: association back %v after the restart", time.Since(restart))
	echo("after SIGTERM and restart")

	// A reload that adds a prefix on both sides keeps the session and its
	// SAs: same generation, same SPIs, no datagram lost meanwhile.
	extra := [2]string{"10.201.0.1", "10.201.0.2"}
	got, err := UDPStream(ctx, p.A.Host, p.B.Host, p.Inner[1], 2000, 1000, func() error {
		time.Sleep(300 * time.Millisecond)
		for i, d := range []*Daemon{p.A, p.B} {
			peerAddr := p.Inner[1-i]
			if err := d.EditConfig(func(s string) string {
				return strings.Replace(s, "prefixes: ["+peerAddr+"/32]", "prefixes: ["+peerAddr+"/32, "+extra[1-i]+"/32]", 1)
			}); err != nil {
				return err
			}
			if line, err := d.Reload(ctx, "configuration reloaded", "reload failed"); err != nil || !strings.Contains(line, "configuration reloaded") {
				return fmt.Errorf("prefix reload in %s: %q %v", d.Host.Name, line, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	after, err := p.WaitAssoc(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("prefix reload: %d of 2000 datagrams; generation %d/%#x → %d/%#x", got, as[0].Generation, as[0].RxSPI, after[0].Generation, after[0].RxSPI)
	if after[0].Generation != as[0].Generation || after[0].RxSPI != as[0].RxSPI || after[1].RxSPI != as[1].RxSPI {
		t.Errorf("a prefix change replaced the association: %+v → %+v", as, after)
	}
	if got != 2000 {
		t.Errorf("lost %d datagrams across a prefix reload", 2000-got)
	}
	prefixes := peerPrefixes(t, ctx, p.A)
	if !strings.Contains(prefixes, extra[1]) {
		t.Errorf("a's peer list after the reload shows prefixes %q, want %s among them", prefixes, extra[1])
	}
	echo("after the prefix reload")

	// A restart-only setting refuses the whole reload and changes nothing.
	if err := p.A.EditConfig(func(s string) string { return s + "packet_budget: 1048576\n" }); err != nil {
		t.Fatal(err)
	}
	line, err := p.A.Reload(ctx, "configuration reloaded", "reload failed")
	if err != nil || !strings.Contains(line, "packet_budget") || !strings.Contains(line, "needs a restart") {
		t.Errorf("packet_budget change on reload: %q %v; want it refused as needing a restart", line, err)
	}
	// A broken file too.
	if err := p.A.EditConfig(func(s string) string { return s + "peers: [\n" }); err != nil {
		t.Fatal(err)
	}
	if line, err := p.A.Reload(ctx, "configuration reloaded", "reload failed"); err != nil || !strings.Contains(line, "reload failed") {
		t.Errorf("broken file on reload: %q %v; want it refused", line, err)
	}
	if now, err := p.WaitAssoc(ctx, 1); err != nil || now[0].Generation != after[0].Generation || now[0].RxSPI != after[0].RxSPI {
		t.Errorf("refused reloads changed the association: %+v (%v)", now, err)
	}
	if err := p.A.EditConfig(func(s string) string {
		s = strings.TrimSuffix(s, "peers: [\n")
		return strings.TrimSuffix(s, "packet_budget: 1048576\n")
	}); err != nil {
		t.Fatal(err)
	}

	// A new suite on both sides: re-negotiated, never in clear meanwhile.
	for _, d := range []*Daemon{p.A, p.B} {
		if err := d.EditConfig(func(s string) string { return "suite: aes-gcm-128\n" + s }); err != nil {
			t.Fatal(err)
		}
		if line, err := d.Reload(ctx, "configuration reloaded", "reload failed"); err != nil || !strings.Contains(line, "configuration reloaded") {
			t.Fatalf("suite reload in %s: %q %v", d.Host.Name, line, err)
		}
	}
	suiteStart := time.Now()
	for {
		now, err := p.WaitAssoc(ctx, 1)
		if err == nil && now[0].Suite == "aes-gcm-128" && now[1].Suite == "aes-gcm-128" {
			t.Logf("suite reload: re-negotiated as %s in %v", now[0].Suite, time.Since(suiteStart))
			break
		}
		if time.Since(suiteStart) > 20*time.Second {
			t.Fatalf("no aes-gcm-128 association 20 s after the suite reload: %+v %v\n%s", now, err, p.A.Tail(20))
		}
		time.Sleep(100 * time.Millisecond)
	}
	echo("after the suite reload")

	// Removing the peer takes its fail-closed state too; adding it back
	// brings the association back.
	withPeer := ""
	if err := p.A.EditConfig(func(s string) string {
		i := strings.Index(s, "peers:\n")
		withPeer = s
		return s[:i] + "peers: []\n"
	}); err != nil {
		t.Fatal(err)
	}
	if line, err := p.A.Reload(ctx, "configuration reloaded", "reload failed"); err != nil || !strings.Contains(line, "configuration reloaded") {
		t.Fatalf("peer removal: %q %v", line, err)
	}
	if fc := failClosedState(t, ctx, p, backend); fc != "" {
		t.Errorf("a peer removed from the configuration keeps fail-closed state: %s", fc)
	}
	if err := p.A.EditConfig(func(string) string { return withPeer }); err != nil {
		t.Fatal(err)
	}
	if line, err := p.A.Reload(ctx, "configuration reloaded", "reload failed"); err != nil || !strings.Contains(line, "configuration reloaded") {
		t.Fatalf("peer re-added: %q %v", line, err)
	}
	if _, err := p.WaitAssoc(ctx, 1); err != nil {
		t.Fatal(err)
	}
	echo("after the peer was re-added")

	// require_encryption off applies at once, and a stop then leaves
	// nothing behind.
	if err := p.A.EditConfig(func(s string) string {
		return strings.Replace(s, "require_encryption: true", "require_encryption: false", 1)
	}); err != nil {
		t.Fatal(err)
	}
	if line, err := p.A.Reload(ctx, "configuration reloaded", "reload failed"); err != nil || !strings.Contains(line, "configuration reloaded") {
		t.Fatalf("require_encryption reload: %q %v", line, err)
	}
	p.A.Stop()
	if fc := failClosedState(t, ctx, p, backend); fc != "" {
		t.Errorf("a stop without require_encryption left state behind: %s", fc)
	}
}

// failsClosed checks that a's traffic to b is refused and that a's
// kernel holds the fail-closed state for b.
func failsClosed(t *testing.T, ctx context.Context, p *Pair, backend, when string) {
	t.Helper()
	if fc := failClosedState(t, ctx, p, backend); fc == "" {
		t.Errorf("%s: no fail-closed state for the peer in a's kernel\n%s", when, xfrmDiag(ctx, p.A.Host))
	}
	refused, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if _, err := EchoTCP(refused, p.A.Host, p.B.Host, p.Inner[1], 4096, lifecycleCanary); err == nil {
		t.Errorf("%s: traffic to the peer got through while pspd was down", when)
	}
}

// failClosedState describes what in a's kernel holds traffic to b back
// without pspd: a prohibit route (userspace) or pspd's XFRM policies for
// b's inner address with no SA (xfrm); "" when there is none.
func failClosedState(t *testing.T, ctx context.Context, p *Pair, backend string) string {
	t.Helper()
	if backend == "userspace" {
		out, _ := p.A.Host.Command(ctx, "ip", "route", "show", "type", "prohibit").CombinedOutput()
		if strings.Contains(string(out), p.Inner[1]) {
			return "prohibit route: " + strings.TrimSpace(string(out))
		}
		return ""
	}
	out, _ := p.A.Host.Command(ctx, "ip", "xfrm", "policy", "list", "dst", p.Inner[1]+"/32").CombinedOutput()
	if strings.Contains(string(out), "dir out") {
		return "xfrm policy: " + strings.SplitN(strings.TrimSpace(string(out)), "\n", 2)[0]
	}
	return ""
}

// peerPrefixes is what d's pspctl peer list says its only peer's prefixes
// are.
func peerPrefixes(t *testing.T, ctx context.Context, d *Daemon) string {
	t.Helper()
	out, err := d.Ctl(ctx, "peer", "list", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var ps []map[string]any
	if err := json.Unmarshal([]byte(out), &ps); err != nil || len(ps) != 1 {
		t.Fatalf("peer list %q: %v", out, err)
	}
	return fmt.Sprint(ps[0]["prefixes"])
}

// TestCleanStopSeenByPeer: a daemon that stops cleanly says goodbye on
// its session, so its peer shows it down at once instead of after the
// 30 s idle timeout.
func TestCleanStopSeenByPeer(t *testing.T) { perBackend(t, testCleanStop) }

func testCleanStop(t *testing.T, backend string) {
	ctx, p, _ := upPair(t, "pns-", backend, 2*time.Minute, nil)
	stopped := time.Now()
	p.B.Stop()
	took := time.Since(stopped)
	for {
		ps, err := p.A.Ctl(ctx, "peer", "list", "--json")
		if err != nil {
			t.Fatal(err)
		}
		var peers []map[string]any
		if err := json.Unmarshal([]byte(ps), &peers); err != nil || len(peers) != 1 {
			t.Fatalf("peer list %q: %v", ps, err)
		}
		if peers[0]["state"] != "up" {
			t.Logf("a shows b %v %v after b's SIGTERM (b took %v to exit)", peers[0]["state"], time.Since(stopped), took)
			break
		}
		// Far below the idle timeout, with room for a loaded machine.
		if time.Since(stopped) > 3*time.Second {
			t.Fatalf("a still shows b up %v after b stopped cleanly\n%s", time.Since(stopped), p.A.Tail(20))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestHub: one hub with 8 peers, each on its own veth (the test VM's
// kernel has no bridge), half of them on each side of the role order
// (the smaller key negotiates), all associated and carrying traffic; then
// one peer is killed and restarted and the others keep their
// associations undisturbed.
func TestHub(t *testing.T) { perBackend(t, testHub) }

func testHub(t *testing.T, backend string) {
	const n = 8
	l := newLab(t, "pnb-")
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	var ds []*Daemon
	for i := range n + 1 {
		h, err := l.Host(ctx, fmt.Sprintf("h%d", i))
		if err != nil {
			t.Fatal(err)
		}
		d, err := l.NewDaemon(ctx, h)
		if err != nil {
			t.Fatal(err)
		}
		ds = append(ds, d)
	}
	// The median key is the hub's: four peers negotiate with it, it
	// negotiates with the other four.
	slices.SortFunc(ds, func(a, b *Daemon) int { return strings.Compare(spki(t, a), spki(t, b)) })
	hub, spokes := ds[n/2], slices.Delete(slices.Clone(ds), n/2, n/2+1)
	hubInner := "10.200.0.1"
	inner := func(i int) string { return fmt.Sprintf("10.200.1.%d", i+1) }
	hubPeers := ""
	if backend != "userspace" {
		if err := hub.Host.IP(ctx, "addr", "add", hubInner+"/32", "dev", "lo"); err != nil {
			t.Fatal(err)
		}
	}
	for i, s := range spokes {
		hubAddr := netip.MustParsePrefix(fmt.Sprintf("192.0.%d.1/24", 2+i))
		spokeAddr := netip.MustParsePrefix(fmt.Sprintf("192.0.%d.2/24", 2+i))
		if err := l.Link(ctx, hub.Host, s.Host, hubAddr, spokeAddr); err != nil {
			t.Fatal(err)
		}
		hubPeers += fmt.Sprintf("  - {name: %s, endpoint: %s, public_key: %s, prefixes: [%s/32]}\n", s.Host.Name, spokeAddr.Addr(), s.PubKey, inner(i))
		cfg := fmt.Sprintf("listen: %s\nmetrics: off\nbackend: %s\nrequire_encryption: true\n", spokeAddr.Addr(), backend)
		if backend == "userspace" {
			cfg += fmt.Sprintf("userspace: {address: %s/16, io: udp}\n", inner(i))
		} else {
			if err := s.Host.IP(ctx, "addr", "add", inner(i)+"/32", "dev", "lo"); err != nil {
				t.Fatal(err)
			}
			if err := s.Host.IP(ctx, "route", "add", hubInner+"/32", "via", hubAddr.Addr().String(), "src", inner(i)); err != nil {
				t.Fatal(err)
			}
			if err := hub.Host.IP(ctx, "route", "add", inner(i)+"/32", "via", spokeAddr.Addr().String(), "src", hubInner); err != nil && !strings.Contains(err.Error(), "exists") {
				t.Fatal(err)
			}
		}
		cfg += fmt.Sprintf("peers:\n  - {name: hub, endpoint: %s, public_key: %s, prefixes: [%s/32]}\n", hubAddr.Addr(), hub.PubKey, hubInner)
		if err := s.WriteConfig(cfg); err != nil {
			t.Fatal(err)
		}
	}
	hubCfg := fmt.Sprintf("listen: 0.0.0.0\nmetrics: off\nbackend: %s\nrequire_encryption: true\n", backend)
	if backend == "userspace" {
		hubCfg += fmt.Sprintf("userspace: {address: %s/16, io: udp}\n", hubInner)
	}
	if err := hub.WriteConfig(hubCfg + "peers:\n" + hubPeers); err != nil {
		t.Fatal(err)
	}
	available(ctx, t, hub, backend)
	start := time.Now()
	for _, d := range ds {
		if err := d.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	byPeer := func() map[string]localapi.Assoc {
		as, err := hub.Assocs(ctx)
		if err != nil {
			t.Fatal(err)
		}
		m := map[string]localapi.Assoc{}
		for _, a := range as {
			m[a.Peer] = a
		}
		return m
	}
	var up map[string]localapi.Assoc
	for up = byPeer(); len(up) < n; up = byPeer() {
		if time.Since(start) > 90*time.Second {
			t.Fatalf("%d of %d associations after 90 s\n%s", len(up), n, hub.Tail(30))
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("%d associations (%s) up %v after start", n, backend, time.Since(start))
	for i, s := range spokes {
		if _, err := EchoTCP(ctx, s.Host, hub.Host, hubInner, 16<<10, lifecycleCanary); err != nil {
			t.Fatalf("peer %s (%d) to the hub: %v\n%s", s.Host.Name, i, err, xfrmDiag(ctx, hub.Host))
		}
	}
	victim := spokes[0]
	victim.Kill()
	restart := time.Now()
	if err := victim.Start(ctx); err != nil {
		t.Fatal(err)
	}
	for {
		now := byPeer()
		if a, ok := now[victim.Host.Name]; ok && (a.RxSPI != up[victim.Host.Name].RxSPI || a.Generation != up[victim.Host.Name].Generation) {
			t.Logf("restarted peer %s back %v after its restart", victim.Host.Name, time.Since(restart))
			break
		}
		if time.Since(restart) > 20*time.Second {
			t.Fatalf("restarted peer %s has no new association 20 s later\n%s", victim.Host.Name, hub.Tail(20))
		}
		time.Sleep(100 * time.Millisecond)
	}
	now := byPeer()
	for _, s := range spokes[1:] {
		a, b := up[s.Host.Name], now[s.Host.Name]
		if a.Generation != b.Generation || a.RxSPI != b.RxSPI {
			t.Errorf("peer %s disturbed by another's restart: %d/%#x → %d/%#x", s.Host.Name, a.Generation, a.RxSPI, b.Generation, b.RxSPI)
		}
	}
	for _, s := range []*Daemon{spokes[0], spokes[n-1]} {
		if _, err := EchoTCP(ctx, s.Host, hub.Host, hubInner, 16<<10, lifecycleCanary); err != nil {
			t.Fatalf("peer %s to the hub after the restart: %v", s.Host.Name, err)
		}
	}
}

// spki is d's public key as bytes, in the order that elects roles.
func spki(t *testing.T, d *Daemon) string {
	t.Helper()
	b, err := base64.StdEncoding.DecodeString(d.PubKey)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
