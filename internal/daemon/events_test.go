package daemon

import (
	"context"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/localapi/client"
)

// recorder collects a daemon's events through the API.
type recorder struct {
	mu  sync.Mutex
	evs []localapi.Event
}

func record(t *testing.T, h *host) *recorder {
	r := &recorder{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		client.New(h.sock).Events(ctx, func(e localapi.Event) error {
			r.mu.Lock()
			r.evs = append(r.evs, e)
			r.mu.Unlock()
			return nil
		})
	}()
	t.Cleanup(func() { cancel(); <-done })
	// Events published before the subscription is in would be missed.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		h.d.events.mu.Lock()
		n := len(h.d.events.subs)
		h.d.events.mu.Unlock()
		if n > 0 {
			return r
		}
		if time.Now().After(deadline) {
			t.Fatal("the event stream did not subscribe within 5s")
		}
	}
}

// wait returns the first event ok accepts.
func (r *recorder) wait(t *testing.T, what string, ok func(localapi.Event) bool) localapi.Event {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		r.mu.Lock()
		for _, e := range r.evs {
			if ok(e) {
				r.mu.Unlock()
				return e
			}
		}
		r.mu.Unlock()
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no %s event within 15s; got %s", what, r.kinds())
	return localapi.Event{}
}

func (r *recorder) kinds() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var ks []string
	for _, e := range r.evs {
		ks = append(ks, e.Kind.String()+"("+e.Reason+")")
	}
	return strings.Join(ks, " ")
}

func (r *recorder) count(kind localapi.EventKind) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, e := range r.evs {
		if e.Kind == kind {
			n++
		}
	}
	return n
}

// TestEventsAndReasons: a rekey an operator asks for is a rekey for
// reason operator on that side and peer on the other, with its
// generation and SPIs as fields; one the data plane asks for has reason
// budget; a restart of the peer's pspd is
// peer-down, assoc-down (for the generation in use only), peer-restarted,
// peer-up and assoc-up, never a rekey; the
// metrics count rekeys by reason and show the peer's state.
func TestEventsAndReasons(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the local API answers root or the pspd group only")
	}
	a, b := newHost(t, "a"), newHost(t, "b")
	a.start(t, a.config(t, "", b))
	ra := record(t, a)
	b.start(t, b.config(t, "", a))
	rb := record(t, b)
	ca := client.New(a.sock)
	first := waitAssoc(t, ca, 1)
	ra.wait(t, "peer-up", func(e localapi.Event) bool {
		return e.Kind == localapi.EventPeerUp && e.Peer == "b" && e.PeerBootID != ""
	})
	up := ra.wait(t, "assoc-up", func(e localapi.Event) bool { return e.Kind == localapi.EventAssocUp })
	if up.Assoc != first.ID || up.Generation != first.Generation || up.RxSPI != first.RxSPI || up.TxSPI != first.TxSPI || up.Backend != "userspace" {
		t.Errorf("assoc-up %+v does not describe %+v", up, first)
	}

	rs, err := ca.Rotate(context.Background(), localapi.RotateRequest{Peer: "b"})
	if err != nil || len(rs) != 1 || rs[0].Error != "" {
		t.Fatalf("rotate %+v %v", rs, err)
	}
	ev := ra.wait(t, "rekey", func(e localapi.Event) bool { return e.Kind == localapi.EventRekey })
	if ev.Reason != localapi.ReasonOperator || ev.Generation != rs[0].Generation || ev.RxSPI != rs[0].RxSPI || ev.TxSPI != rs[0].TxSPI {
		t.Errorf("rekey on the side that asked: %+v, want reason operator and %+v", ev, rs[0])
	}
	if ev := rb.wait(t, "rekey", func(e localapi.Event) bool { return e.Kind == localapi.EventRekey }); ev.Reason != localapi.ReasonPeer {
		t.Errorf("rekey on the other side: reason %q, want peer", ev.Reason)
	}
	// The data plane asks (its packet budget or key age).
	a.rec.WantRekey(b.id.Public())
	ev = ra.wait(t, "budget rekey", func(e localapi.Event) bool {
		return e.Kind == localapi.EventRekey && e.Generation == rs[0].Generation+1
	})
	if ev.Reason != localapi.ReasonBudget {
		t.Errorf("rekey the data plane asked for: reason %q, want budget", ev.Reason)
	}
	waitAssoc(t, ca, rs[0].Generation+1)
	for reason, want := range map[string]float64{"operator": 1, "budget": 1, "timer": 0, "peer": 0} {
		if v, ok := sample(t, a.d.metrics, "pspd_rekeys_total", map[string]string{"peer": "b", "reason": reason}); !ok || v != want {
			t.Errorf("pspd_rekeys_total{peer=b,reason=%s} = %v (%v), want %v", reason, v, ok, want)
		}
	}
	if v, _ := sample(t, a.d.metrics, "pspd_peer_state", map[string]string{"peer": "b", "state": "up"}); v != 1 {
		t.Errorf("pspd_peer_state{peer=b,state=up} = %v, want 1", v)
	}
	if v, ok := sample(t, a.d.metrics, "pspd_peer_up", map[string]string{"peer": "b"}); !ok || v != 1 {
		t.Errorf("pspd_peer_up{peer=b} = %v (%v), want 1", v, ok)
	}

	lint(t, a.d.metrics)

	// b restarts: a new process, a new boot id, a new session.
	rekeys := ra.count(localapi.EventRekey)
	b.stop()
	ra.wait(t, "peer-down", func(e localapi.Event) bool { return e.Kind == localapi.EventPeerDown && e.Peer == "b" })
	down := ra.wait(t, "assoc-down", func(e localapi.Event) bool { return e.Kind == localapi.EventAssocDown })
	if down.Generation != rs[0].Generation+1 || down.Peer != "b" {
		t.Errorf("assoc-down %+v, want the generation in use, %d", down, rs[0].Generation+1)
	}
	if n := ra.count(localapi.EventAssocDown); n != 1 {
		t.Errorf("%d assoc-down events for one association; events: %s", n, ra.kinds())
	}
	b.start(t, b.config(t, "", a))
	ra.wait(t, "peer-restarted", func(e localapi.Event) bool { return e.Kind == localapi.EventPeerRestarted && e.Peer == "b" })
	ra.wait(t, "second assoc-up", func(e localapi.Event) bool { return e.Kind == localapi.EventAssocUp && e.Time.After(up.Time) })
	time.Sleep(2 * statePoll)
	if n := ra.count(localapi.EventRekey); n != rekeys {
		t.Errorf("the peer's restart was counted as %d rekeys; events: %s", n-rekeys, ra.kinds())
	}
	if n := ra.count(localapi.EventPeerUp); n != 2 {
		t.Errorf("%d peer-up events, want 2; events: %s", n, ra.kinds())
	}

	// A reload without b removes it.
	if err := a.d.Reload(a.config(t, "")); err != nil {
		t.Fatal(err)
	}
	ra.wait(t, "peer-removed", func(e localapi.Event) bool { return e.Kind == localapi.EventPeerRemoved && e.Peer == "b" })
}

// TestPSPEventKinds: the PSP manager's events keep the names the README
// documents, except the rotation, which the API calls device-rotated.
func TestPSPEventKinds(t *testing.T) {
	for in, want := range map[string]localapi.EventKind{
		"psp-rotated": localapi.EventDeviceRotated, "psp-stale-soon": localapi.EventPSPStaleSoon, "psp-stale": localapi.EventPSPStale,
	} {
		if got := pspEventKind(in); got != want {
			t.Errorf("PSP event %s is published as %s, want %s", in, got, want)
		}
	}
}
