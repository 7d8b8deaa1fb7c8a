package keyexchange

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// TestRestartedResponderDialsAtOnce: a responder that starts has no
// session with the initiator, so it dials the initiator at once (no fixed
// wait), and the initiator, seeing a new boot id, replaces the session it
// still holds with the previous incarnation. The idle timeout is far off
// and the initiator dials a stale address, so only the responder's own
// dial can bring the pair back.
func TestRestartedResponderDialsAtOnce(t *testing.T) {
	long := func(c *Config) { c.IdleTimeout, c.KeepAlive = 60*time.Second, 30*time.Second }
	ini, resp, pi, _ := pair(t, long, nil)
	if _, err := pi.WaitGeneration(ctxT(t, 10*time.Second), 1); err != nil {
		t.Fatal(err)
	}
	old, _ := ini.inst.find(1)
	stale := pi.Session()
	resp.ep.socks[0].udp.Close() // crash: no goodbye

	start := time.Now()
	restarted := newNode(t, resp.ep.cur.id, long)
	pr, err := restarted.ep.AddPeer(peerCfg(ini))
	if err != nil {
		t.Fatal(err)
	}
	sa, err := pr.WaitGeneration(ctxT(t, 10*time.Second), 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("restarted responder associated %s after start (generation %d)", time.Since(start), sa.Generation)
	s := pr.Session()
	if s == nil || !s.Dialed() {
		t.Fatal("the restarted responder's session is not one it dialed")
	}
	if !strings.Contains(string(restarted.logs.Bytes()), "no session with the initiator; dialing it now") {
		t.Fatal("the responder did not dial because it had no session")
	}
	if pi.Session() == stale || pi.Session().PeerBootID() != restarted.ep.BootID() {
		t.Fatal("the initiator kept the session with the previous incarnation")
	}
	ini.inst.mu.Lock()
	for _, rec := range ini.inst.live {
		if rec.rxKey.Equal(old.rxKey) {
			t.Error("the initiator kept the SA of the previous incarnation")
		}
	}
	ini.inst.mu.Unlock()
	if !strings.Contains(string(ini.logs.Bytes()), "peer restarted") {
		t.Fatal("restart not noticed")
	}
}

// TestSimultaneousStartOneSession: when both sides start at once, the
// initiator's dial and the responder's race; both settle on one session
// (the initiator's, or the responder's if it arrived before the initiator
// dialed), and stay on it.
func TestSimultaneousStartOneSession(t *testing.T) {
	for range 5 {
		_, _, pi, pr := pair(t, nil, nil)
		for _, p := range []*Peer{pi, pr} {
			if _, err := p.WaitGeneration(ctxT(t, 10*time.Second), 1); err != nil {
				t.Fatal(err)
			}
		}
		waitFor(t, func() bool {
			si, sr := pi.Session(), pr.Session()
			return si != nil && sr != nil && si.Dialed() != sr.Dialed() && sameConn(t, si, sr)
		})
		si, sr := pi.Session(), pr.Session()
		time.Sleep(50 * time.Millisecond)
		if pi.Session() != si || pr.Session() != sr {
			t.Fatal("the two sides left the session they agreed on")
		}
		pi.Close()
		pr.Close()
	}
}

// sameConn reports whether a and b are the two ends of one connection:
// only then do their TLS exporters agree.
func sameConn(t *testing.T, a, b *Session) bool {
	sa, sb := a.conn.ConnectionState().TLS, b.conn.ConnectionState().TLS
	ea, err1 := sa.ExportKeyingMaterial("EXPORTER-pspd-test", nil, 16)
	eb, err2 := sb.ExportKeyingMaterial("EXPORTER-pspd-test", nil, 16)
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	return string(ea) == string(eb)
}

// TestResponderRedialsAfterLosingSession: a responder that the initiator
// cannot reach (its address is stale, as behind a NAT that rebound) gets
// a session only by dialing. After it loses that session it dials again,
// with backoff, and the initiator lets the new session replace the one
// the responder dialed before, even while that one still looks alive on
// the initiator's side.
func TestResponderRedialsAfterLosingSession(t *testing.T) {
	a, b := orderedIdentities(t)
	ini, resp := newNode(t, a, quick), newNode(t, b, quick)
	ci := peerCfg(resp)
	ci.Addr = deadAddr(t)
	pi, err := ini.ep.AddPeer(ci)
	if err != nil {
		t.Fatal(err)
	}
	pr, err := resp.ep.AddPeer(peerCfg(ini))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pi.WaitGeneration(ctxT(t, 10*time.Second), 1); err != nil {
		t.Fatal(err)
	}
	first := pr.Session()
	if first == nil || !first.Dialed() {
		t.Fatal("the responder's first session is not one it dialed")
	}

	// The session ends; only the responder can bring up another.
	pi.Session().Close(errors.New("test: session lost"))
	start := time.Now()
	waitFor(t, func() bool { s := pr.Session(); return s != nil && s != first && s.Dialed() })
	if _, err := pi.WaitGeneration(ctxT(t, 10*time.Second), 2); err != nil {
		t.Fatal(err)
	}
	t.Logf("the responder dialed again and a new generation was confirmed %s after the session was lost", time.Since(start))

	// A responder's new session replaces the one it dialed before on the
	// initiator, which has not noticed that one is gone on the
	// responder's side.
	held := pi.Session()
	if held == nil || held.Dialed() {
		t.Fatal("the initiator does not hold the session the responder dialed")
	}
	n, err := resp.ep.dial(ctxT(t, 5*time.Second), ini.ep.Addr(), ini.ep.Public())
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close(nil)
	waitFor(t, func() bool { return held.Context().Err() != nil })
	waitFor(t, func() bool { return pi.Session() != nil && pi.Session() != held })
}
