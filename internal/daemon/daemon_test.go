package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/internal/logscan"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/wire"
	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/localapi/client"
	"github.com/pspd/pspd/offload"
	"github.com/pspd/pspd/offload/offloadtest"
	"github.com/pspd/pspd/policy"
)

// The daemon's tests run a real key exchange (QUIC and TLS on loopback)
// and a real local API (a unix socket) around offloadtest's fake data
// plane; the backend packages and tests/netns run the real data planes.
func newRec() *offloadtest.Backend { return offloadtest.New(assoc.BackendUserspace, nil) }

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuf) Bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]byte(nil), s.b.Bytes()...)
}

type host struct {
	name string
	dir  string
	id   *identity.Identity
	port int
	d    *Daemon
	rec  *offloadtest.Backend
	logs *syncBuf
	sock string
	// resolver, if set, answers the daemon's endpoint look-ups.
	resolver policy.Resolver
	cancel   context.CancelFunc
	done     chan error
}

func freeUDPPort(t *testing.T) int {
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port
}

func newHost(t *testing.T, name string) *host {
	dir := t.TempDir()
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	if err := identity.WriteFile(filepath.Join(dir, "id.pem"), id, false); err != nil {
		t.Fatal(err)
	}
	return &host{name: name, dir: dir, id: id, port: freeUDPPort(t), sock: filepath.Join(dir, "pspd.sock")}
}

func (h *host) config(t *testing.T, extra string, peers ...*host) *policy.Config {
	if !strings.Contains(extra, "backend:") {
		extra += "backend: userspace\n"
	}
	src := fmt.Sprintf("identity: %s\nlisten: 127.0.0.1:%d\nsocket: %s\nmetrics: off\nrekey_interval: 1h\n%speers:\n",
		filepath.Join(h.dir, "id.pem"), h.port, h.sock, extra)
	for _, p := range peers {
		src += fmt.Sprintf("  - {name: %s, endpoint: 127.0.0.1:%d, public_key: %s, prefixes: [10.%d.%d.0/24]}\n",
			p.name, p.port, p.id.Public(), 100+p.port>>8&0x7f, p.port&0xff)
	}
	if len(peers) == 0 {
		src += "  []\n"
	}
	path := filepath.Join(h.dir, "pspd.yaml")
	os.WriteFile(path, []byte(src), 0o600)
	c, err := policy.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func (h *host) start(t *testing.T, pc *policy.Config) {
	h.rec = newRec()
	report := offload.Report{{Backend: wire.BackendXFRM, Reason: "kernel lacks ESP"}, {Backend: wire.BackendUserspace, Available: true}}
	h.startWith(t, pc, report, h.rec)
}

// startWith runs the daemon with the given backends, which must match
// the report.
func (h *host) startWith(t *testing.T, pc *policy.Config, report offload.Report, recs ...*offloadtest.Backend) {
	bs := make([]offload.Backend, len(recs))
	for i, r := range recs {
		bs[i] = r
	}
	h.startBackends(t, pc, report, bs...)
}

// startBackends is startWith for any offload.Backend (a wrapped fake).
func (h *host) startBackends(t *testing.T, pc *policy.Config, report offload.Report, recs ...offload.Backend) {
	h.logs = &syncBuf{}
	log := slog.New(slog.NewJSONHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	bs := map[assoc.Backend]offload.Backend{}
	for _, r := range recs {
		bs[r.Kind()] = r
	}
	ctx, cancel := context.WithCancel(context.Background())
	d, err := New(ctx, Config{Policy: pc, Logger: log, Report: report, Backends: bs, Resolver: h.resolver})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	ln, err := localapi.Listen(pc.Socket, localapi.Authorizer{})
	if err != nil {
		t.Fatal(err)
	}
	h.d, h.cancel, h.done = d, cancel, make(chan error, 1)
	go func() { h.done <- d.Serve(ctx, ln, "pspd-test-nonexistent") }()
	t.Cleanup(h.stop)
}

func (h *host) stop() {
	if h.d == nil {
		return
	}
	h.cancel()
	<-h.done
	h.d.Close()
	h.d = nil
}

// runningPair starts two daemons that pin each other with the default
// test configuration (root only: the local API answers root or group
// pspd).
func runningPair(t *testing.T) (a, b *host) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: the local API answers root or the pspd group only")
	}
	a, b = newHost(t, "a"), newHost(t, "b")
	a.start(t, a.config(t, "", b))
	b.start(t, b.config(t, "", a))
	return a, b
}

func waitAssoc(t *testing.T, c *client.Client, gen uint32) localapi.Assoc {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		as, err := c.Assocs(context.Background())
		if err == nil && len(as) == 1 && as[0].Generation >= gen {
			return as[0]
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no association of generation %d within 15s", gen)
	return localapi.Assoc{}
}

func TestTwoDaemons(t *testing.T) {
	a, b := runningPair(t)
	ca, cb := client.New(a.sock), client.New(b.sock)

	aa, ab := waitAssoc(t, ca, 1), waitAssoc(t, cb, 1)
	if aa.RxSPI != ab.TxSPI || aa.TxSPI != ab.RxSPI || aa.Peer != "b" || ab.Peer != "a" || aa.Backend != "userspace" {
		t.Fatalf("associations do not mirror each other:\n a: %+v\n b: %+v", aa, ab)
	}
	st, err := ca.Status(context.Background())
	if err != nil || st.Peers != 1 || st.PeersUp != 1 || st.Assocs != 1 || st.PublicKey != a.id.Public().String() {
		t.Fatalf("status %+v %v", st, err)
	}
	ps, err := ca.Peers(context.Background())
	if err != nil || len(ps) != 1 || ps[0].State != "up" || ps[0].Fingerprint != b.id.Public().Fingerprint() {
		t.Fatalf("peers %+v %v", ps, err)
	}
	if ps[0].KeyExchange != "SecP256r1MLKEM768" {
		t.Errorf("peer list shows key exchange %q, want the hybrid post-quantum SecP256r1MLKEM768 by default", ps[0].KeyExchange)
	}

	// Rotate from b's side: make-before-break, new SPIs reported.
	rs, err := cb.Rotate(context.Background(), localapi.RotateRequest{Peer: "a"})
	if err != nil || len(rs) != 1 || rs[0].Error != "" || rs[0].Generation != ab.Generation+1 || rs[0].RxSPI == ab.RxSPI || rs[0].OldRxSPI != ab.RxSPI {
		t.Fatalf("rotate %+v %v", rs, err)
	}
	waitAssoc(t, ca, rs[0].Generation)
	var ae *client.APIError
	if _, err := cb.Rotate(context.Background(), localapi.RotateRequest{Peer: "nobody"}); !errors.As(err, &ae) || ae.Status != 404 {
		t.Fatalf("rotating an unknown peer: %v", err)
	}

	// The listing and the logs hold no key bytes.
	var listing bytes.Buffer
	for _, c := range []*client.Client{ca, cb} {
		as, _ := c.Assocs(context.Background())
		json.NewEncoder(&listing).Encode(as)
	}
	keys := append(a.rec.Keys(), b.rec.Keys()...)
	if len(keys) < 4 {
		t.Fatalf("recorded %d keys", len(keys))
	}
	logscan.AssertNoKeys(t, listing.Bytes(), keys...)
	logscan.AssertNoKeys(t, a.logs.Bytes(), keys...)
	logscan.AssertNoKeys(t, b.logs.Bytes(), keys...)
}

func TestReload(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the local API answers root or the pspd group only")
	}
	a, b, c := newHost(t, "a"), newHost(t, "b"), newHost(t, "c")
	a.start(t, a.config(t, "", b))
	b.start(t, b.config(t, "", a, c))
	c.start(t, c.config(t, "", b))
	cb := client.New(b.sock)
	waitAssoc(t, client.New(c.sock), 1)

	// A start-only setting is refused whole: peers stay as they are.
	moved := b.config(t, "", a)
	moved.Identity = "/elsewhere.pem"
	if err := b.d.Reload(moved); err == nil {
		t.Fatal("identity change accepted on reload")
	}
	if ps, _ := cb.Peers(context.Background()); len(ps) != 2 {
		t.Fatalf("refused reload changed peers: %+v", ps)
	}
	// Dropping peer c removes its association.
	if err := b.d.Reload(b.config(t, "", a)); err != nil {
		t.Fatal(err)
	}
	ps, _ := cb.Peers(context.Background())
	if len(ps) != 1 || ps[0].Name != "a" {
		t.Fatalf("after reload: %+v", ps)
	}
}

func TestNoBackendRefusesToStart(t *testing.T) {
	h := newHost(t, "a")
	_, err := New(context.Background(), Config{Policy: h.config(t, ""), Logger: slog.New(slog.DiscardHandler),
		Report: offload.Report{{Backend: wire.BackendXFRM, Reason: "kernel lacks ESP"}}})
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte("kernel lacks ESP")) {
		t.Fatalf("got %v", err)
	}
}

// TestBackendAgreement: a host that can run XFRM and the userspace data
// plane and one that runs only the latter both use auto; they settle on
// userspace, and the XFRM backend, which held the peer from the start (it
// is the better one), gives it up once the association is up elsewhere.
func TestBackendAgreement(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the local API answers root or the pspd group only")
	}
	a, b := newHost(t, "a"), newHost(t, "b")
	xa, ua := offloadtest.New(assoc.BackendXFRM, nil), offloadtest.New(assoc.BackendUserspace, nil)
	a.startWith(t, a.config(t, "backend: auto\n", b),
		offload.Report{{Backend: wire.BackendXFRM, Available: true}, {Backend: wire.BackendUserspace, Available: true}}, xa, ua)
	if !xa.Holds("b") || ua.Holds("b") {
		t.Fatalf("before any session the best backend should hold the peer: xfrm %v, userspace %v", xa.Holds("b"), ua.Holds("b"))
	}
	b.rec = newRec()
	b.startWith(t, b.config(t, "backend: auto\n", a),
		offload.Report{{Backend: wire.BackendXFRM, Reason: "kernel lacks ESP"}, {Backend: wire.BackendUserspace, Available: true}}, b.rec)
	aa, ab := waitAssoc(t, client.New(a.sock), 1), waitAssoc(t, client.New(b.sock), 1)
	if aa.Backend != "userspace" || ab.Backend != "userspace" {
		t.Fatalf("backends %s/%s, want userspace on both", aa.Backend, ab.Backend)
	}
	if xa.Holds("b") || !ua.Holds("b") {
		t.Errorf("after settling on userspace: xfrm holds the peer %v, userspace %v", xa.Holds("b"), ua.Holds("b"))
	}
	if len(xa.Keys()) != 0 {
		t.Error("the unused backend was given keys")
	}
	mfs, err := a.d.metrics.Gather()
	if err != nil {
		t.Fatal(err)
	}
	ok := false
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			if mf.GetName() == "pspd_handshakes_total" && m.GetLabel()[0].GetValue() == "ok" && m.GetCounter().GetValue() >= 1 {
				ok = true
			}
		}
	}
	if !ok {
		t.Error("pspd_handshakes_total{result=ok} did not count the session")
	}
}

// TestStopKeepsFailClosedState: a stop ends the sessions and closes the
// backends, but peers that require encryption keep their fail-closed
// state in the kernel; only removing a peer from the configuration
// takes it away.
func TestStopKeepsFailClosedState(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the local API answers root or the pspd group only")
	}
	a, b, c := newHost(t, "a"), newHost(t, "b"), newHost(t, "c")
	a.start(t, a.config(t, "", b, c))
	b.start(t, b.config(t, "", a))
	waitAssoc(t, client.New(b.sock), 1)
	kernel := a.rec.Kernel()
	if got := kernel.FailClosed(); !slices.Equal(got, []string{"b", "c"}) {
		t.Fatalf("fail-closed state while running: %v, want b and c", got)
	}
	if err := a.d.Reload(a.config(t, "", b)); err != nil {
		t.Fatal(err)
	}
	if got := kernel.FailClosed(); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("after removing c: %v, want only b", got)
	}
	a.stop()
	if !a.rec.Closed() || len(a.rec.Live()) != 0 {
		t.Fatalf("after the stop: closed %v, %d SAs live", a.rec.Closed(), len(a.rec.Live()))
	}
	if got := kernel.FailClosed(); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("after the stop: fail-closed state %v, want b's kept", got)
	}
	for _, call := range a.rec.Calls() {
		if call == "RemovePeer b" {
			t.Fatalf("the stop removed peer b from the backend: %v", a.rec.Calls())
		}
	}
}

// TestReloadInPlace: a prefix change updates the peer in its backend and
// keeps its session; a restart-only setting or a peer the running
// backends cannot serve refuses the reload before any backend call.
func TestReloadInPlace(t *testing.T) {
	a, b := runningPair(t)
	before := waitAssoc(t, client.New(a.sock), 1)

	next := a.config(t, "", b)
	next.Peers[0].Prefixes = []netip.Prefix{netip.MustParsePrefix("10.9.0.0/16")}
	if err := a.d.Reload(next); err != nil {
		t.Fatal(err)
	}
	spec, ok := a.rec.Peer(b.id.Public())
	if !ok || len(spec.Prefixes) != 1 || spec.Prefixes[0].String() != "10.9.0.0/16" {
		t.Fatalf("backend holds %+v after the prefix reload", spec)
	}
	after := waitAssoc(t, client.New(a.sock), 1)
	if after.Generation != before.Generation || after.RxSPI != before.RxSPI {
		t.Fatalf("prefix reload replaced the association: %+v → %+v", before, after)
	}
	calls := len(a.rec.Calls())
	for _, tc := range []struct {
		name string
		edit func(*policy.Config)
		want string
	}{
		{"packet_budget", func(c *policy.Config) { c.PacketBudget *= 2 }, "packet_budget changed"},
		{"rekey_interval", func(c *policy.Config) { c.RekeyInterval *= 2 }, "rekey_interval changed"},
		{"offload", func(c *policy.Config) { c.Offload = policy.OffloadCrypto }, "offload changed"},
		{"backend not running", func(c *policy.Config) { c.Peers[0].Backend = policy.BackendXFRM }, "xfrm"},
	} {
		cfg := a.config(t, "", b)
		cfg.Peers[0].Prefixes = next.Peers[0].Prefixes
		tc.edit(cfg)
		err := a.d.Reload(cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: reload = %v, want a refusal naming %q", tc.name, err, tc.want)
		}
	}
	if got := a.rec.Calls(); len(got) != calls {
		t.Errorf("refused reloads touched the backend: %v", got[calls:])
	}
}

// TestNewFailsCleanly: a peer the backend cannot take makes New fail
// with the reason, without a panic and without leaving the peer in the
// backend.
func TestNewFailsCleanly(t *testing.T) {
	a, b := newHost(t, "a"), newHost(t, "b")
	pc := a.config(t, "", b)
	pc.Peers[0].Prefixes = nil
	rec := newRec()
	_, err := New(context.Background(), Config{Policy: pc, Logger: slog.New(slog.DiscardHandler),
		Report: offload.Report{{Backend: assoc.BackendUserspace, Available: true}}, Backends: map[assoc.Backend]offload.Backend{assoc.BackendUserspace: rec}})
	if err == nil || !strings.Contains(err.Error(), "no prefixes") {
		t.Fatalf("New = %v, want the peer refused for having no prefixes", err)
	}
	if rec.Holds("b") {
		t.Error("the refused peer was left in the backend")
	}
}

// TestClassicKeyExchange: key_exchange: classic on one side makes the
// pair agree on P-256; both sides show it.
func TestClassicKeyExchange(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the local API answers root or the pspd group only")
	}
	a, b := newHost(t, "a"), newHost(t, "b")
	a.start(t, a.config(t, "key_exchange: classic\n", b))
	b.start(t, b.config(t, "", a))
	waitAssoc(t, client.New(a.sock), 1)
	for _, h := range []*host{a, b} {
		ps, err := client.New(h.sock).Peers(context.Background())
		if err != nil || len(ps) != 1 || ps[0].KeyExchange != "CurveP256" {
			t.Errorf("%s: peers %+v %v, want key exchange CurveP256", h.name, ps, err)
		}
	}
}

// nat_traversal reaches every backend's spec: a global setting, and a
// peer's own, which wins.
func TestSpecNATTraversal(t *testing.T) {
	pc := policy.Peer{Name: "b", Endpoint: netip.MustParseAddrPort("192.0.2.2:6082"),
		Prefixes: []netip.Prefix{netip.MustParsePrefix("10.0.0.2/32")}}
	for _, tc := range []struct {
		global, own policy.NATTraversal
		want        offload.NATTraversal
	}{
		{"", "", offload.NATAuto},
		{policy.NATForce, "", offload.NATForce},
		{policy.NATForce, policy.NATOff, offload.NATOff},
		{policy.NATAuto, policy.NATForce, offload.NATForce},
	} {
		pc.NATTraversal = tc.own
		for _, b := range []assoc.Backend{assoc.BackendXFRM, assoc.BackendUserspace} {
			s, err := spec(pc, &policy.Config{NATTraversal: tc.global, EncapPort: 4500}, b)
			if err != nil || s.NATTraversal != tc.want || s.EncapPort != 4500 {
				t.Errorf("%s: global %q, peer %q: %v %v, want %v", b, tc.global, tc.own, s.NATTraversal, err, tc.want)
			}
		}
	}
}
