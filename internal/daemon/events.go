package daemon

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/pspd/pspd/keyexchange"
	"github.com/pspd/pspd/keyexchange/wire"
	"github.com/pspd/pspd/localapi"
)

// hub fans events out to API subscribers. A subscriber that does not keep
// up loses events rather than slowing the daemon down.
type hub struct {
	mu   sync.Mutex
	subs map[chan localapi.Event]struct{}
}

func newHub() *hub { return &hub{subs: map[chan localapi.Event]struct{}{}} }

func (h *hub) subscribe(ctx context.Context) <-chan localapi.Event {
	ch := make(chan localapi.Event, 64)
	h.mu.Lock()
	h.subs[ch] = struct{}{}
	h.mu.Unlock()
	context.AfterFunc(ctx, func() {
		h.mu.Lock()
		delete(h.subs, ch)
		h.mu.Unlock()
		close(ch)
	})
	return ch
}

func (h *hub) publish(e localapi.Event) {
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for ch := range h.subs {
		select {
		case ch <- e:
		default:
		}
	}
}

// history is what the daemon remembers of a peer to tell events apart
// and to keep status that outlives a session. Guarded by Daemon.mu.
type history struct {
	lastHandshake time.Time
	up            bool
	boot          wire.BootID // of the peer's pspd in the latest session
	// pending are the reasons of rekeys this daemon asked for and has not
	// seen yet, oldest first.
	pending  []string
	rekeysBy map[string]uint64
}

func (h *history) rekeys() uint64 {
	var n uint64
	for _, v := range h.rekeysBy {
		n += v
	}
	return n
}

// asked notes a rekey this daemon requests, for the reason.
func (h *history) asked(reason string) { h.pending = append(h.pending, reason) }

// failed forgets a rekey asked for that did not happen.
func (h *history) failed(reason string) {
	if i := slices.Index(h.pending, reason); i >= 0 {
		h.pending = slices.Delete(h.pending, i, i+1)
	}
}

// rekeyed counts a rekey at now and says why it happened: the reason
// this daemon asked for, or else the timer if rekey_interval was (nearly,
// it is jittered) due, or else the peer asked (its operator or budget).
func (h *history) rekeyed(now time.Time, interval time.Duration) string {
	var r string
	switch {
	case len(h.pending) > 0:
		r, h.pending = h.pending[0], h.pending[1:]
	case !h.lastHandshake.IsZero() && now.Sub(h.lastHandshake) >= interval/2:
		r = localapi.ReasonTimer
	default:
		r = localapi.ReasonPeer
	}
	if h.rekeysBy == nil {
		h.rekeysBy = map[string]uint64{}
	}
	h.rekeysBy[r]++
	return r
}

// watch turns a peer's generations into assoc-up and rekey events. A
// generation of another session than the previous one's (the peer
// restarted, or the session was re-established) is an assoc-up, not a
// rekey.
func (d *Daemon) watch(ctx context.Context, p *peer, kx *keyexchange.Peer) {
	defer d.wg.Done()
	var last keyexchange.SA
	var lastSess *keyexchange.Session
	have := false
	for {
		sa, err := kx.Wait(ctx, func(sa keyexchange.SA) bool {
			return !have || sa.ID != last.ID || sa.Generation != last.Generation
		})
		if err != nil {
			return
		}
		sess := kx.Session()
		now := time.Now()
		d.mu.Lock()
		name := p.cfg.Name // a reload rewrites p.cfg under d.mu
		ev := localapi.Event{Time: now, Kind: localapi.EventAssocUp, Peer: name, Assoc: assocID(name, sa),
			Generation: sa.Generation, RxSPI: uint32(sa.RxSPI), TxSPI: uint32(sa.TxSPI), Backend: sa.Backend.String()}
		d.observe(p) // peer-up and peer-restarted come first
		p.created[sa.Generation] = now
		for g := range p.created {
			if g+8 < sa.Generation {
				delete(p.created, g) // keep the map bounded
			}
		}
		if have && sess != nil && sess == lastSess && sa.ID == last.ID && sa.Generation > last.Generation {
			ev.Kind, ev.Reason = localapi.EventRekey, p.hist.rekeyed(now, d.cfg.RekeyInterval)
		} else {
			p.hist.pending = nil // rekeys asked of the previous session are moot
		}
		p.hist.lastHandshake = now
		d.mu.Unlock()
		p.bmu.Lock()
		p.traffic.confirmed(&sa)
		p.bmu.Unlock()
		if ev.Kind == localapi.EventRekey {
			ev.Detail = fmt.Sprintf("generation %d replaces %d (%s)", sa.Generation, last.Generation, ev.Reason)
			d.log.Info("rekeyed", "peer", name, "reason", ev.Reason, "sa", &sa)
		} else {
			ev.Detail = fmt.Sprintf("association %s up on %s, generation %d", ev.Assoc, ev.Backend, sa.Generation)
			d.log.Info("association up", "peer", name, "sa", &sa)
		}
		d.events.publish(ev)
		last, lastSess, have = sa, sess, true
	}
}

// statePoll is how often peer-up and peer-down are looked for between
// generations.
const statePoll = 250 * time.Millisecond

// watchStates publishes peer-up, peer-down and peer-restarted.
func (d *Daemon) watchStates() {
	defer d.wg.Done()
	t := time.NewTicker(statePoll)
	defer t.Stop()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-t.C:
		}
		d.mu.Lock()
		for _, p := range d.peers {
			d.observe(p)
		}
		d.mu.Unlock()
	}
}

// observe publishes the peer's session changes since it last looked.
// Callers hold d.mu.
func (d *Daemon) observe(p *peer) {
	st := p.kx.Status()
	h := &p.hist
	name := p.cfg.Name
	switch {
	case st.Up && (!h.up || st.PeerBootID != h.boot):
		boot := fmt.Sprintf("%x", st.PeerBootID)
		if h.boot != (wire.BootID{}) && st.PeerBootID != h.boot {
			d.log.Info("peer restarted", "peer", name, "peer_boot_id", boot, "previous_boot_id", fmt.Sprintf("%x", h.boot))
			d.events.publish(localapi.Event{Kind: localapi.EventPeerRestarted, Peer: name, PeerBootID: boot,
				Detail: fmt.Sprintf("pspd of %s is a new process (boot id %s, was %x)", name, boot, h.boot)})
		}
		if !h.up {
			d.events.publish(localapi.Event{Kind: localapi.EventPeerUp, Peer: name, PeerBootID: boot,
				Detail: fmt.Sprintf("session with %s up (key exchange %s)", name, st.Group)})
		}
		h.boot = st.PeerBootID
	case !st.Up && h.up:
		ev := localapi.Event{Kind: localapi.EventPeerDown, Peer: name, Detail: fmt.Sprintf("session with %s ended; %s", name, st.State)}
		if st.Cause != nil {
			ev.Reason = st.Cause.Error()
		}
		d.events.publish(ev)
	}
	h.up = st.Up
}

// pspEventKinds names the PSP manager's events as the API does.
var pspEventKinds = map[string]localapi.EventKind{
	"psp-rotated":    localapi.EventDeviceRotated,
	"psp-stale-soon": localapi.EventPSPStaleSoon,
	"psp-stale":      localapi.EventPSPStale,
}

func pspEventKind(k string) localapi.EventKind {
	if v, ok := pspEventKinds[k]; ok {
		return v
	}
	return localapi.EventKind(k)
}

// rekeyFailed forgets a rekey of the named peer, asked for the reason,
// that did not happen.
func (d *Daemon) rekeyFailed(name, reason string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if p := d.peers[name]; p != nil {
		p.hist.failed(reason)
	}
}
