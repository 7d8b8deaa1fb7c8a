package keyexchange

import (
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/wire"
)

// logLine is one JSON log record.
type logLine map[string]any

func logLines(t *testing.T, n *node) []logLine {
	t.Helper()
	var out []logLine
	for _, l := range strings.Split(strings.TrimSpace(string(n.logs.Bytes())), "\n") {
		if l == "" {
			continue
		}
		var m logLine
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("log line is not JSON: %v: %s", err, l)
		}
		out = append(out, m)
	}
	return out
}

// warnsWith returns the WARN lines that contain every one of subs.
func warnsWith(t *testing.T, n *node, subs ...string) []string {
	var out []string
	for _, l := range logLines(t, n) {
		if l["level"] != "WARN" {
			continue
		}
		b, _ := json.Marshal(l)
		s := string(b)
		ok := true
		for _, sub := range subs {
			ok = ok && strings.Contains(s, sub)
		}
		if ok {
			out = append(out, s)
		}
	}
	return out
}

// deadAddr is a loopback UDP address nothing answers on.
func deadAddr(t *testing.T) netip.AddrPort {
	t.Helper()
	c, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := c.LocalAddr().(*net.UDPAddr).AddrPort()
	c.Close()
	return a
}

func quick(c *Config) {
	c.HandshakeTimeout = 300 * time.Millisecond
	c.NegotiationTimeout = 300 * time.Millisecond
}

func within(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestWrongPinBothSides: when one side pins a key the other does not have,
// both sides say so within 2 s, at WARN and in Status.Cause, naming the
// key presented and the key pinned by fingerprint; and say it once, not
// on every retry.
func TestWrongPinBothSides(t *testing.T) {
	for _, wrongOnInitiator := range []bool{true, false} {
		name := "responder pins a wrong key"
		if wrongOnInitiator {
			name = "initiator pins a wrong key"
		}
		t.Run(name, func(t *testing.T) {
			a, b := orderedIdentities(t)
			ini, resp := newNode(t, a, quick), newNode(t, b, quick)
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("INI %s\nRESP %s", ini.logs.Bytes(), resp.logs.Bytes())
				}
			})
			x, err := identity.Generate()
			if err != nil {
				t.Fatal(err)
			}
			ci, cr := peerCfg(resp), peerCfg(ini)
			// The wrong side's peer entry has the right address and a key
			// the peer does not have.
			wrong, wrongNode, rightNode := &cr, resp, ini
			if wrongOnInitiator {
				wrong, wrongNode, rightNode = &ci, ini, resp
			}
			wrong.Key = x.Public()
			pr, err := resp.ep.AddPeer(cr)
			if err != nil {
				t.Fatal(err)
			}
			pi, err := ini.ep.AddPeer(ci)
			if err != nil {
				t.Fatal(err)
			}
			pw, pok := pr, pi
			if wrongOnInitiator {
				pw, pok = pi, pr
			}
			rightFP := rightNode.ep.Public().Fingerprint() // presented to the wrong side
			wrongFP := wrongNode.ep.Public().Fingerprint() // the key the right side pins and presents
			xFP := x.Public().Fingerprint()
			// The side with the wrong pin: the peer presented rightFP,
			// this host pins xFP.
			// The other side: it presented rightFP, which the peer
			// refused; it pins wrongFP for the peer.
			within(t, 2*time.Second, "the side with the wrong pin says so", func() bool {
				c := pw.Status().Cause
				return c != nil && strings.Contains(c.Error(), rightFP) && strings.Contains(c.Error(), xFP) &&
					len(warnsWith(t, wrongNode, rightFP, xFP)) > 0
			})
			within(t, 2*time.Second, "the side with the right pin says the peer refused its key", func() bool {
				c := pok.Status().Cause
				return c != nil && strings.Contains(c.Error(), rightFP) && strings.Contains(c.Error(), wrongFP) &&
					strings.Contains(c.Error(), "refused") &&
					len(warnsWith(t, rightNode, rightFP, wrongFP, "refused")) > 0
			})
			t.Logf("wrong side: %v\nright side: %v", pw.Status().Cause, pok.Status().Cause)
			// Retries go on (backoff up to 200 ms) without a WARN each.
			time.Sleep(time.Second)
			for _, n := range []*node{ini, resp} {
				if w := warnsWith(t, n, "peer"); len(w) > 3 {
					t.Errorf("%d WARN lines in 1.5 s of retries:\n%s", len(w), strings.Join(w, "\n"))
				}
			}
			if st := pw.Status(); st.State == StateUp || st.Since.IsZero() {
				t.Errorf("wrong side status %+v", st)
			}
		})
	}
}

// TestStatusUnreachableThenRecovers: a peer nothing answers for shows
// connecting or backoff with the time entered and the cause, on both
// roles; once the peer comes up, Cause is nil and the last error is
// marked old.
func TestStatusUnreachableThenRecovers(t *testing.T) {
	for _, initiator := range []bool{true, false} {
		name := "responder waits"
		if initiator {
			name = "initiator dials"
		}
		t.Run(name, func(t *testing.T) {
			a, b := orderedIdentities(t)
			local, remote := a, b
			if !initiator {
				local, remote = b, a
			}
			n := newNode(t, local, quick)
			addr := deadAddr(t)
			cfg := PeerConfig{Key: remote.Public(), Addr: addr, Backend: peerCfg(n).Backend, Suite: peerCfg(n).Suite,
				BackoffMin: 20 * time.Millisecond, BackoffMax: 200 * time.Millisecond, Grace: time.Hour}
			added := time.Now()
			p, err := n.ep.AddPeer(cfg)
			if err != nil {
				t.Fatal(err)
			}
			within(t, 2*time.Second, "cause: no answer", func() bool {
				c := p.Status().Cause
				return c != nil && strings.Contains(c.Error(), "no answer") && strings.Contains(c.Error(), addr.String())
			})
			st := p.Status()
			if st.State != StateConnecting && st.State != StateBackoff {
				t.Fatalf("state %s, want connecting or backoff", st.State)
			}
			if st.Since.Before(added) || st.DownSince.Before(added) || st.DownSince.After(st.Since) || st.Up || !st.LastUp.IsZero() {
				t.Fatalf("status %+v (added %s)", st, added)
			}
			if w := warnsWith(t, n, "no answer", addr.String()); len(w) == 0 {
				t.Fatal("no WARN says the peer does not answer")
			}
			time.Sleep(time.Second) // many retries
			if w := warnsWith(t, n, "no answer"); len(w) != 1 {
				t.Fatalf("%d WARN lines for one unreachable peer, want 1:\n%s", len(w), strings.Join(w, "\n"))
			}
			// The peer comes up on that address.
			other := newNode(t, remote, func(c *Config) { quick(c); c.ListenAddr = addr.String() })
			oc := peerCfg(n)
			op, err := other.ep.AddPeer(oc)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := p.WaitGeneration(ctxT(t, 10*time.Second), 1); err != nil {
				t.Fatal(err)
			}
			if _, err := op.WaitGeneration(ctxT(t, 10*time.Second), 1); err != nil {
				t.Fatal(err)
			}
			st = p.Status()
			if st.State != StateUp || st.Cause != nil || !st.Up || st.LastUp.IsZero() || st.Since.Before(st.LastErrorAt) {
				t.Fatalf("after recovery: %+v", st)
			}
			if st.LastError == nil || st.LastErrorAt.After(st.LastUp) {
				t.Fatalf("LastError %v at %s: want the old error, from before %s", st.LastError, st.LastErrorAt, st.LastUp)
			}
			p.Close()
			if st := p.Status(); st.State != StateDown {
				t.Fatalf("after Close: %s", st.State)
			}
		})
	}
}

// TestStatusHandshaking: a peer that completes TLS but never sends its
// Hello shows handshaking while it stalls, then the cause.
func TestStatusHandshaking(t *testing.T) {
	a, b := orderedIdentities(t)
	resp := newNode(t, b, quick)
	cfg := PeerConfig{Key: a.Public(), Addr: deadAddr(t), Backend: peerCfg(resp).Backend, Suite: peerCfg(resp).Suite}
	p, err := resp.ep.AddPeer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	within(t, 2*time.Second, "the knock fails", func() bool { return p.Status().Cause != nil })
	leaf, err := selfSignedLeaf(a, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	conf := tlsConfig(leaf, func(identity.PublicKey) error { return nil }, keyExchangeGroups(true, false))
	conn, err := quic.DialAddr(ctxT(t, 5*time.Second), resp.ep.Addr().String(), conf, &quic.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.CloseWithError(0, "")
	within(t, time.Second, "handshaking", func() bool { return p.Status().State == StateHandshaking })
	within(t, 2*time.Second, "the stalled Hello is the cause", func() bool {
		st := p.Status()
		return st.State == StateConnecting && st.Cause != nil && strings.Contains(st.Cause.Error(), "hello")
	})
}

// TestNamedPeerInLogs: a peer with a configured name is named by it in
// the key exchange's log lines, fingerprint beside it; durations and
// states are text in JSON as in text output.
func TestNamedPeerInLogs(t *testing.T) {
	// A second peer entry on ini, named, whose host is not running.
	ini, resp, _, _ := pair(t, quick, nil)
	// A key above ini's, so that ini initiates and dials it.
	var x *identity.Identity
	for x == nil || identity.Compare(ini.ep.Public(), x.Public()) > 0 {
		var err error
		if x, err = identity.Generate(); err != nil {
			t.Fatal(err)
		}
	}
	cfg := PeerConfig{Name: "bravo", Key: x.Public(), Addr: deadAddr(t), Backend: peerCfg(resp).Backend, Suite: peerCfg(resp).Suite,
		BackoffMin: 20 * time.Millisecond, BackoffMax: 100 * time.Millisecond}
	if _, err := ini.ep.AddPeer(cfg); err != nil {
		t.Fatal(err)
	}
	within(t, 3*time.Second, "a WARN names bravo", func() bool {
		return len(warnsWith(t, ini, `"peer":"bravo"`, `"fingerprint":"`+x.Public().Fingerprint()+`"`, "no answer")) == 1
	})
	time.Sleep(300 * time.Millisecond) // some retries, logged at DEBUG
	sawRetry := false
	for _, l := range logLines(t, ini) {
		for _, k := range []string{"down_for", "retry_in", "interval", "state", "from"} {
			if v, ok := l[k]; ok {
				if _, isText := v.(string); !isText {
					t.Errorf("%s is %T (%v) in JSON, want text: %v", k, v, v, l)
				}
			}
		}
		if l["msg"] == "dial failed; retrying" && l["peer"] == "bravo" {
			sawRetry = true
			if d, err := time.ParseDuration(l["retry_in"].(string)); err != nil || d <= 0 {
				t.Errorf("retry_in %v: %v", l["retry_in"], err)
			}
		}
	}
	if !sawRetry {
		t.Error("no retry logged")
	}
}

// TestReminderWhileDown: while a peer stays down, a WARN line says so
// again every remindEvery, with how long it has been down.
func TestReminderWhileDown(t *testing.T) {
	a, b := orderedIdentities(t)
	n := newNode(t, a, quick)
	n.ep.remindEvery = 300 * time.Millisecond
	cfg := PeerConfig{Key: b.Public(), Addr: deadAddr(t), Backend: peerCfg(n).Backend, Suite: peerCfg(n).Suite,
		BackoffMin: 20 * time.Millisecond, BackoffMax: 100 * time.Millisecond}
	if _, err := n.ep.AddPeer(cfg); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1100 * time.Millisecond)
	var reminders []logLine
	for _, l := range logLines(t, n) {
		if l["level"] == "WARN" && l["msg"] == "peer still not up" {
			reminders = append(reminders, l)
		}
	}
	if len(reminders) < 2 || len(reminders) > 4 {
		t.Fatalf("%d reminders in 1.1 s at one per 300 ms", len(reminders))
	}
	last := reminders[len(reminders)-1]
	d, err := time.ParseDuration(last["down_for"].(string))
	if err != nil || d < 600*time.Millisecond || !strings.Contains(last["cause"].(string), "no answer") {
		t.Fatalf("reminder %v", last)
	}
}

// TestNoCommonBackendCause: hosts without a data plane in common both
// say what each side offers.
func TestNoCommonBackendCause(t *testing.T) {
	only := func(b wire.Backend) func(*Config) {
		return func(c *Config) {
			quick(c)
			c.Installers = map[wire.Backend]Installer{b: c.Installers[b]}
		}
	}
	a, b := orderedIdentities(t)
	ini, resp := newNode(t, a, only(wire.BackendUserspace)), newNode(t, b, only(wire.BackendXFRM))
	dumpOnFail(t, ini, resp)
	ci, cr := peerCfg(resp), peerCfg(ini)
	ci.Backend, cr.Backend = wire.BackendUserspace, wire.BackendXFRM
	pr, err := resp.ep.AddPeer(cr)
	if err != nil {
		t.Fatal(err)
	}
	pi, err := ini.ep.AddPeer(ci)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		n    *node
		p    *Peer
		want string
	}{
		{ini, pi, "no common backend: this host accepts userspace for the peer, the peer offers xfrm"},
		{resp, pr, "no common backend: this host accepts xfrm for the peer, the peer offers userspace"},
	} {
		t.Cleanup(func() { t.Logf("%s: %+v", tc.p.Role(), tc.p.Status()) })
		within(t, 2*time.Second, tc.p.Role().String()+": "+tc.want, func() bool {
			c := tc.p.Status().Cause
			return c != nil && strings.Contains(c.Error(), tc.want) && len(warnsWith(t, tc.n, tc.want)) == 1
		})
	}
	time.Sleep(500 * time.Millisecond) // retries
	for _, tc := range []*node{ini, resp} {
		if w := warnsWith(t, tc, "no common backend"); len(w) != 1 {
			t.Errorf("%d WARN lines:\n%s", len(w), strings.Join(w, "\n"))
		}
	}
	if st := pi.Status(); st.State == StateUp || st.Up {
		t.Fatalf("initiator %+v", st)
	}
}

// TestRefusedInstallNeverUp: a session whose first SA cannot be installed
// is not up: the peer goes handshaking, backoff, ... with the install
// error as the cause, logged once.
func TestRefusedInstallNeverUp(t *testing.T) {
	ref := &refuser{}
	ini, _, pi, _ := pair(t, func(c *Config) {
		c.Installers = map[wire.Backend]Installer{wire.BackendXFRM: ref, wire.BackendUserspace: ref}
	}, func(c *PeerConfig) { c.BackoffMin, c.BackoffMax = 20*time.Millisecond, 100*time.Millisecond })
	seen := map[State]bool{}
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		seen[pi.Status().State] = true
		time.Sleep(time.Millisecond)
	}
	if seen[StateUp] || !seen[StateBackoff] {
		t.Fatalf("states seen %v: want backoff and never up", seen)
	}
	if c := pi.Status().Cause; c == nil || !strings.Contains(c.Error(), "the peer's data plane refused the SA") || !strings.Contains(c.Error(), "refuser: no") {
		t.Fatalf("cause %v", c)
	}
	if w := warnsWith(t, ini, "refused the SA"); len(w) != 1 {
		t.Fatalf("%d WARN lines for the refused install:\n%s\nall:\n%s", len(w), strings.Join(w, "\n"), strings.Join(warnsWith(t, ini), "\n"))
	}
}

func dumpOnFail(t *testing.T, ns ...*node) {
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range ns {
				t.Logf("%s:\n%s", n.ep.Public().Fingerprint(), n.logs.Bytes())
			}
		}
	})
}

// TestSilentPeerCause: a peer that vanishes without a goodbye (its socket
// gone) is down after the idle timeout, and the cause says it went silent.
func TestSilentPeerCause(t *testing.T) {
	fast := func(c *Config) { quick(c); c.IdleTimeout, c.KeepAlive = time.Second, 200*time.Millisecond }
	ini, resp, pi, pr := pair(t, fast, nil)
	dumpOnFail(t, ini, resp)
	for _, p := range []*Peer{pi, pr} {
		if _, err := p.WaitGeneration(ctxT(t, 10*time.Second), 1); err != nil {
			t.Fatal(err)
		}
	}
	resp.ep.socks[0].udp.Close() // nothing more leaves or reaches the responder
	within(t, 3*time.Second, "the initiator says the peer went silent", func() bool {
		c := pi.Status().Cause
		return c != nil && strings.Contains(c.Error(), "went silent") && len(warnsWith(t, ini, "peer down", "went silent")) == 1
	})
}

// TestCauseKeyStable: the forms one refused install takes from retry to
// retry (other SA, the peer's Error message or its close overtaking it)
// are one cause, logged once.
func TestCauseKeyStable(t *testing.T) {
	_, _, pi, _ := pair(t, nil, nil)
	s := &Session{}
	a := pi.explain(peerErr(pi.cfg.Key, "negotiate", &wire.ProtocolError{Code: wire.CodeInstall, Remote: true, Msg: "install failed: sa{gen=1}: no"}), s)
	b := pi.explain(peerErr(pi.cfg.Key, "negotiate", &wire.ProtocolError{Code: wire.CodeInstall, Remote: true, Msg: "install failed: sa{gen=2}: no"}), s)
	c := pi.explain(peerErr(pi.cfg.Key, "session", &quic.ApplicationError{Remote: true, ErrorCode: closeProtocol, ErrorMessage: "keyexchange: peer x: respond: install failed: sa{gen=3}: no"}), s)
	if causeKey(a) != causeKey(b) || causeKey(b) != causeKey(c) {
		t.Fatalf("keys differ: %q %q %q", causeKey(a), causeKey(b), causeKey(c))
	}
	if !strings.Contains(c.Error(), "the peer's data plane refused the SA") || !strings.Contains(c.Error(), "gen=3") {
		t.Fatalf("cause %v", c)
	}
	if other := pi.explain(errors.New("something else"), s); causeKey(other) == causeKey(a) {
		t.Fatal("an unrelated error has the install cause's key")
	}
	// The responder's redial that the initiator refused as a duplicate of
	// the session it dialed: the responder takes that one, nothing is
	// wrong.
	dup := peerErr(pi.cfg.Key, "session", &quic.ApplicationError{Remote: true, ErrorCode: closeReplaced, ErrorMessage: errDuplicate.Error()})
	if c := pi.explain(dup, s); c != nil {
		t.Fatalf("a session refused as a duplicate has cause %v", c)
	}
}
