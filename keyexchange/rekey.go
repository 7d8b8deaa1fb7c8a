package keyexchange

import (
	"context"
	"errors"
	"slices"
	"time"

	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/keyexchange/wire"
)

// Rekey negotiates a new generation now and returns it once confirmed. On
// the responder it asks the initiator to do so.
func (p *Peer) Rekey(ctx context.Context) (SA, error) {
	p.mu.Lock()
	before := p.commits
	p.mu.Unlock()
	res := make(chan error, 1)
	select {
	case p.rekeyReq <- res:
	case <-ctx.Done():
		return SA{}, peerErr(p.cfg.Key, "rekey", context.Cause(ctx))
	case <-p.done:
		return SA{}, peerErr(p.cfg.Key, "rekey", errors.New("peer closed"))
	}
	select {
	case err := <-res:
		if err != nil {
			return SA{}, err
		}
	case <-ctx.Done():
		return SA{}, peerErr(p.cfg.Key, "rekey", context.Cause(ctx))
	}
	for {
		p.mu.Lock()
		ch, n := p.changed, p.commits
		var sa SA
		if p.cur != nil {
			sa = p.cur.WithoutKeys()
		}
		p.mu.Unlock()
		if n > before {
			return sa, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return SA{}, peerErr(p.cfg.Key, "rekey", context.Cause(ctx))
		}
	}
}

// rekeyOn negotiates the next generation on s now, or as soon as the
// negotiation limit allows: every negotiation costs the responder a token
// of its limit, so an honest initiator paces its own to the same limit
// (the default on both sides) and never trips it.
func (p *Peer) rekeyOn(s *Session, serveErr chan error) error {
	for !p.limit.allow(time.Now()) {
		p.timers.pace.mod(p.limit.wait(time.Now()))
		select {
		case <-p.timers.pace.C():
			p.timers.pace.fired()
		case err := <-serveErr:
			p.timers.pace.del()
			serveErr <- err
			return err
		case <-p.ctx.Done():
			p.timers.pace.del()
			return p.ctx.Err()
		}
	}
	sa, err := p.negotiate(s)
	if err == nil {
		p.commit(sa)
		p.timersNegotiated()
	}
	return err
}

// requestedRekey serves a local Rekey call: the initiator negotiates, the
// responder asks the initiator to.
func (p *Peer) requestedRekey(s *Session, serveErr chan error) error {
	if p.role == kdf.Initiator {
		return p.rekeyOn(s, serveErr)
	}
	return s.send(p.ctx, wire.Rekey{Assoc: p.cfg.Assoc})
}

// remoteRekeyed handles the peer's Rekey request, holding it back while
// the limit does not allow it. It reports whether to negotiate now; warned
// is whether the session already said that the peer asks too fast.
func (p *Peer) remoteRekeyed(warned *bool) bool {
	if p.timers.rekeyDeferred.on {
		return false // coalesced into the one already waiting
	}
	if d := p.limit.wait(time.Now()); d > 0 {
		if !*warned {
			*warned = true
			p.log.Warn("peer requests rekeys faster than this host serves them; serving them at the limit", durationAttr("interval", p.e.cfg.PeerNegotiationInterval), "burst", p.e.cfg.PeerNegotiationBurst)
		}
		p.timersRekeyHeldBack(d)
		return false
	}
	return true
}

func (p *Peer) negotiate(s *Session) (*SA, error) {
	p.mu.Lock()
	if p.cur != nil {
		// A new initiator, after a rotation changed the role, continues
		// the generations the other side numbered.
		p.gen = max(p.gen, p.cur.Generation)
	}
	p.gen++
	gen := p.gen
	p.mu.Unlock()
	i := slices.IndexFunc(p.cfg.Backends, s.hello.Backends.Has)
	if i < 0 {
		return nil, s.fail(nil, "negotiate", &noBackendError{accepts: wire.NewBackends(p.cfg.Backends...), offers: s.hello.Backends})
	}
	b := p.cfg.Backends[i]
	return s.negotiate(p.ctx, p.e.cfg.Installers[b], p.cfg.Assoc, gen, b, p.cfg.Suite)
}

// spiFloor is the highest SPI counter, of either direction, still
// installed for this peer.
func (p *Peer) spiFloor() uint32 {
	p.mu.Lock()
	defer p.mu.Unlock()
	var floor uint32
	if p.cur != nil {
		floor = max(p.cur.RxSPI.Counter(), p.cur.TxSPI.Counter())
	}
	for sa := range p.old {
		floor = max(floor, sa.RxSPI.Counter(), sa.TxSPI.Counter())
	}
	return floor
}

// commit makes sa current and retires the previous generation after the
// grace period (make-before-break). Both directions are installed and
// active by now, and every data plane copied what it needs (the kernel
// ones hold nothing but the kernel's copy), so the key exchange's own
// copies of the keys and salts go: Remove needs only the SPIs.
//
// The first generation of a session puts the peer up: up means that
// traffic can flow, not only that a session exists.
func (p *Peer) commit(sa *SA) {
	sa.Wipe()
	p.mu.Lock()
	prev := p.cur
	p.cur = sa
	if prev != nil {
		p.timersCommitted(prev)
	}
	log := p.updateLocked(nil, func(State) State { return StateUp })
	p.commits++
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()
	log()
	p.log.Info("SA confirmed", "sa", sa)
}

func (p *Peer) deleted(assoc wire.AssocID, gen uint32) {
	p.mu.Lock()
	var gone *SA
	if p.cur != nil && p.cur.ID == assoc && p.cur.Generation == gen {
		gone, p.cur = p.cur, nil
	}
	for sa, t := range p.old {
		if sa.ID == assoc && sa.Generation == gen {
			t.Stop()
			delete(p.old, sa)
			gone = sa
		}
	}
	p.mu.Unlock()
	if gone != nil {
		p.log.Info("peer deleted SA", "sa", gone)
		p.remove(gone)
	}
}

func (p *Peer) sendDelete(s *Session) {
	p.mu.Lock()
	cur := p.cur
	p.mu.Unlock()
	if cur == nil || s.Context().Err() != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := s.send(ctx, wire.Delete{Assoc: cur.ID, Generation: cur.Generation}); err != nil {
		p.log.Debug("could not tell peer about deletion", "err", err)
	}
}

func (p *Peer) remove(sa *SA) {
	ctx, cancel := context.WithTimeout(context.Background(), p.e.cfg.NegotiationTimeout)
	defer cancel()
	if err := p.e.cfg.Installers[sa.Backend].Remove(ctx, sa); err != nil {
		p.log.Error("remove SA", "sa", sa, "err", peerErr(p.cfg.Key, "remove SA", err))
	} else {
		p.log.Info("SA removed", "sa", sa)
	}
	sa.Wipe()
}

// removeAll removes every generation at once, stopping their grace
// timers.
func (p *Peer) removeAll() {
	p.mu.Lock()
	var all []*SA
	for sa, t := range p.old {
		t.Stop()
		all = append(all, sa)
	}
	clear(p.old)
	if p.cur != nil {
		all = append(all, p.cur)
		p.cur = nil
	}
	p.mu.Unlock()
	for _, sa := range all {
		p.remove(sa)
	}
}
