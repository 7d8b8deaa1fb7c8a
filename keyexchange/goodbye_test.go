package keyexchange

import (
	"strings"
	"testing"
	"time"
)

// TestGoodbyeMarksPeerDown: when one side stops cleanly (its endpoint
// closes, or it removes the peer), the other side learns at once from the
// goodbye, not after the idle timeout, and says why.
func TestGoodbyeMarksPeerDown(t *testing.T) {
	for _, tc := range []struct {
		name      string
		initiator bool // the initiator is the one that stops
		endpoint  bool // Endpoint.Close rather than Peer.Close
		reason    string
	}{
		{"initiator shuts down", true, true, "shutting down"},
		{"responder shuts down", false, true, "shutting down"},
		{"initiator removes the peer", true, false, "removed"},
		{"responder removes the peer", false, false, "removed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// An idle timeout far beyond the 1 s budget: only the goodbye
			// can mark the peer down in time.
			long := func(c *Config) { c.IdleTimeout, c.KeepAlive = 30*time.Second, 5*time.Second }
			// The survivor dials again only after the checks below: its
			// next attempt (a stateless reset from the stopping socket, or
			// no answer) would replace the goodbye as its last error.
			slow := func(c *PeerConfig) { c.BackoffMin, c.BackoffMax = 2*time.Second, 2*time.Second }
			ini, resp, pi, pr := pair(t, long, slow)
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("INI %s\nRESP %s", ini.logs.Bytes(), resp.logs.Bytes())
				}
			})
			for _, p := range []*Peer{pi, pr} {
				if _, err := p.WaitGeneration(ctxT(t, 10*time.Second), 1); err != nil {
					t.Fatal(err)
				}
			}
			stopping, other, otherNode := ini, pr, resp
			stopPeer := pi
			if !tc.initiator {
				stopping, other, otherNode, stopPeer = resp, pi, ini, pr
			}
			start := time.Now()
			if tc.endpoint {
				stopping.ep.Close()
			} else {
				stopPeer.Close()
			}
			for other.Status().Up {
				if time.Since(start) > time.Second {
					t.Fatalf("peer still up %s after it stopped", time.Since(start))
				}
				time.Sleep(5 * time.Millisecond)
			}
			t.Logf("peer down %s after it stopped", time.Since(start))
			err := other.Status().LastError
			if err == nil || !strings.Contains(err.Error(), "goodbye") || !strings.Contains(err.Error(), tc.reason) ||
				!strings.Contains(err.Error(), stopping.ep.Public().Fingerprint()) {
				t.Fatalf("LastError %v: want the goodbye with its reason, naming the peer", err)
			}
			if c := other.Status().Cause; c == nil || !strings.Contains(c.Error(), "on purpose (goodbye: "+tc.reason) {
				t.Fatalf("Cause %v: want the goodbye in operator terms", c)
			}
			waitFor(t, func() bool { return len(warnsWith(t, otherNode, "peer down", "goodbye: "+tc.reason)) == 1 })
			// The session ended like any other: when the peer comes back,
			// the pair associates again.
			if tc.endpoint {
				back := newNode(t, stopping.ep.cur.id, long)
				bp, err := back.ep.AddPeer(peerCfg(otherNode))
				if err != nil {
					t.Fatal(err)
				}
				for _, p := range []*Peer{bp, other} {
					if _, err := p.Wait(ctxT(t, 10*time.Second), func(SA) bool { return p.Status().Up }); err != nil {
						t.Fatal(err)
					}
				}
			}
		})
	}
}
