package keyexchange

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"time"

	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/keyexchange/wire"
)

// offer hands an inbound session to the peer, replacing one still queued.
func (p *Peer) offer(s *Session) {
	for {
		select {
		case p.incoming <- s:
			return
		case <-p.ctx.Done():
			s.Close(errors.New("peer closed"))
			return
		case old := <-p.incoming:
			old.Close(errReplaced)
		}
	}
}

// run keeps a session with the peer until the peer is closed: it takes
// the sessions the peer opens, dials (initiator; responder once at start,
// and again after it lost a session) and backs off after every failure.
func (p *Peer) run() {
	defer close(p.done)
	defer p.removeAll()
	defer p.timersStop()
	var (
		next    *Session
		ours    dialed // initiator: the last session this side dialed
		knocked bool
		// lost: this responder had a session and lost it. It dials
		// until it has one again, since the initiator may only reach it
		// through the path its own dial opens (a NAT in front of it that
		// rebound).
		lost bool
	)
	for p.ctx.Err() == nil {
		s := next
		next = nil
		if s == nil {
			select {
			case s = <-p.incoming:
			default:
			}
		}
		if s == nil && p.role == kdf.Responder && !knocked {
			knocked = true
			s = p.knock()
		}
		if s == nil && (p.role == kdf.Initiator || lost && p.cfg.Addr.IsValid()) {
			var err error
			if s, err = p.dialPeer(); err != nil {
				d := p.timersAttemptFailed()
				p.setState(StateBackoff, nil)
				p.log.Debug("dial failed; retrying", "err", err, durationAttr("retry_in", d))
				if s = p.waitBackoff(); s == nil {
					continue
				}
			} else if p.role == kdf.Initiator {
				ours = dialed{s.PeerBootID(), time.Now()}
			}
		}
		if s == nil {
			p.setState(StateConnecting, nil) // waiting for the initiator
			select {
			case s = <-p.incoming:
			case <-p.ctx.Done():
				continue
			}
		}
		if s.Context().Err() != nil {
			// Queued while the peer already closed it: the losing side of
			// a race between its dial and ours.
			s.Close(nil)
			continue
		}
		if ours.raced(p, s) {
			p.log.Debug("refusing the responder's session that raced the one this side dialed")
			s.Close(errDuplicate)
			continue
		}
		var err error
		next, err = p.runSession(s)
		p.log.Debug("session ended", "err", err)
		lost = p.role == kdf.Responder
		if next == nil && err != nil && p.ctx.Err() == nil {
			// A session that failed after the handshake (a refused
			// install, a protocol error) must not turn into a tight
			// reconnect loop: back off as after a failed dial. A session
			// the peer opens meanwhile is taken at once.
			d := p.timersAttemptFailed()
			p.log.Debug("backing off after the session failed", durationAttr("retry_in", d))
			next = p.waitBackoff()
		}
	}
}

// dialed is a session the initiator dialed: whom it reached, and when.
type dialed struct {
	boot wire.BootID
	at   time.Time
}

// raced reports whether s is the responder's side of a race with the
// session d: the responder began dialing s before d came up, so it takes
// d and drops s, as when drive refuses a duplicate. drive sees only what
// arrives while d is live; a session queued late, after d ended, would
// otherwise become the next session, and fail at its first negotiation.
// A responder that lost d dials after d came up, and is not refused.
func (d dialed) raced(p *Peer, s *Session) bool {
	if p.role != kdf.Initiator || s.Dialed() || d.at.IsZero() || s.PeerBootID() != d.boot {
		return false
	}
	began, ok := s.conn.Context().Value(inboundBegan{}).(time.Time)
	return ok && began.Before(d.at)
}

// waitBackoff waits for the backoff timer (expiredBackoff), or returns at
// once the session the peer opens meanwhile.
func (p *Peer) waitBackoff() *Session {
	select {
	case s := <-p.incoming:
		p.timers.backoff.del()
		return s
	case <-p.timers.backoff.C():
		p.timers.backoff.fired()
	case <-p.ctx.Done():
		p.timers.backoff.del()
	}
	return nil
}

// knock is a starting responder's dial to the initiator. The initiator
// normally dials, but after this side restarted the initiator may still
// hold a session with this side's previous incarnation, which it would
// only notice at the idle timeout. A starting responder has no session
// with the initiator, whatever the initiator believes, so it dials at
// once; a session arriving from us, with our new boot id, replaces the
// stale one on the initiator.
//
// A failed knock leaves the dialing to the initiator, as it was before
// this side ever had a session: most often the initiator is not up yet,
// and it dials when it starts. A responder that lost a session, though,
// keeps dialing with backoff until it has one again (run): the initiator
// may have reached it only through the path the responder's dial opened,
// and a NAT in front of the responder forgets that path when it rebinds.
//
// When both sides dial at once (they start together, or both lost the
// session) their dials race: the initiator keeps the session it dialed
// and refuses ours as a duplicate (same boot id), and we switch to its
// session when it arrives (see drive and dialPeer), so both settle on
// one.
func (p *Peer) knock() *Session {
	select {
	case s := <-p.incoming:
		return s
	default:
	}
	if !p.cfg.Addr.IsValid() {
		return nil
	}
	s, err := p.dialPeer()
	if err != nil {
		p.log.Debug("responder could not reach the initiator; waiting for it to dial", "err", err)
		return nil
	}
	return s
}

// dialPeer is dial for either role. The initiator waits for its own dial,
// which it prefers to the responder's. The responder takes a session the
// initiator opens meanwhile at once, since the initiator would refuse the
// responder's anyway and starts negotiating on its own as soon as it is
// up. The responder's dial is then abandoned before the initiator can
// take it for a next session, which the responder would refuse.
func (p *Peer) dialPeer() (*Session, error) {
	if p.role == kdf.Initiator {
		return p.dial()
	}
	p.log.Debug("responder has no session with the initiator; dialing it now")
	p.setState(StateConnecting, nil)
	type result struct {
		s        *Session
		err      error
		answered bool
	}
	ctx, cancel := context.WithCancel(p.ctx)
	res := make(chan result, 1)
	go func() {
		s, answered, err := p.dialOnce(ctx)
		res <- result{s, err, answered}
	}()
	select {
	case r := <-res:
		cancel()
		if r.err != nil {
			p.dialFailed(r.err, r.answered)
			return nil, r.err
		}
		p.log.Info("responder reached the initiator")
		return r.s, nil
	case s := <-p.incoming:
		cancel()
		go func() {
			if r := <-res; r.s != nil {
				r.s.Close(errDuplicate)
			}
		}()
		return s, nil
	}
}

// dial is one attempt to open a session to the peer. A failure is
// recorded, explained, as the peer's cause.
func (p *Peer) dial() (*Session, error) {
	p.setState(StateConnecting, nil)
	s, answered, err := p.dialOnce(p.ctx)
	if err != nil {
		p.dialFailed(err, answered)
	}
	return s, err
}

// dialOnce opens a session to the peer and reports whether the peer
// answered (presented its pinned key). It records nothing, so that a
// dial whose result is no longer wanted (dialPeer) does not change the
// peer's state.
func (p *Peer) dialOnce(ctx context.Context) (*Session, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*p.e.cfg.HandshakeTimeout)
	defer cancel()
	var answered atomic.Bool
	s, err := p.e.dialAnd(ctx, p.cfg.Addr, p.pinned(), p.e.presentTo(p), func() {
		answered.Store(true)
		p.handshaking()
	})
	return s, answered.Load(), err
}

// dialFailed records a failed dial, explained, as the peer's cause.
func (p *Peer) dialFailed(err error, answered bool) {
	if refusedByPeer(err) && p.e.hasPrevious() && !p.prevOnly.Swap(true) {
		p.log.Warn("the peer refused this host's new identity (it does not pin it yet); presenting the previous one meanwhile", "err", err)
	}
	p.setLastErr(err)
	cause := err
	if !answered || refusedByPeer(err) {
		cause = p.explain(err, nil)
	}
	p.setState(StateConnecting, cause)
}

// runSession drives one session until it ends. It returns a newer session
// that replaced it, if any.
func (p *Peer) runSession(s *Session) (*Session, error) {
	p.handshaking() // until the first SA is confirmed
	if err := p.attach(s); err != nil {
		s.Close(err)
		return nil, err
	}
	if p.role == kdf.Responder && !slices.ContainsFunc(p.cfg.Backends, s.hello.Backends.Has) {
		// The initiator will end the session for the same reason; say it
		// here too, as this side sees it.
		nb := &noBackendError{accepts: wire.NewBackends(p.cfg.Backends...), offers: s.hello.Backends}
		p.noteCause(nb)
	}
	serveErr := make(chan error, 1)
	go func() {
		serveErr <- s.serve(handlers{
			installer: func(a wire.AssocID, b wire.Backend, x kdf.Suite) (Installer, error) {
				switch {
				case a != p.cfg.Assoc:
					return nil, fmt.Errorf("%w: association %d (this host has association %d with the peer)", errUnsupported, a, p.cfg.Assoc)
				case !slices.Contains(p.cfg.Backends, b) || x != p.cfg.Suite:
					return nil, fmt.Errorf("%w: backend %s with suite %s", errUnsupported, b, x)
				}
				return p.e.cfg.Installers[b], nil
			},
			allow:     func() bool { return p.limit.allow(time.Now()) },
			confirmed: p.commit,
			deleted:   p.deleted,
			key: func(k wire.ExplicitKey) {
				if f := p.e.cfg.ExplicitKeys; f != nil {
					f(p.cfg.Key, k)
					return
				}
				k.Key.Wipe()
				p.log.Warn("peer sent a PSP key but this host does not manage PSP; dropped")
			},
			rekey: func(a wire.AssocID) {
				if a != p.cfg.Assoc {
					return
				}
				select {
				case p.remoteRekey <- struct{}{}:
				default:
				}
			},
		})
	}()
	var next *Session
	err := p.drive(s, serveErr, &next)
	p.timersSessionEnded()
	if p.ctx.Err() != nil {
		p.sendDelete(s)
		p.mu.Lock()
		reason := p.bye
		p.mu.Unlock()
		if reason == 0 { // the endpoint's context ended
			reason = wire.GoodbyeShutdown
		}
		s.goodbye(reason)
	} else {
		cause := err
		if next != nil {
			cause = errReplaced
		}
		s.Close(cause)
	}
	<-serveErr
	p.mu.Lock()
	if p.sess == s {
		p.sess = nil
	}
	p.mu.Unlock()
	if next == nil && err != nil {
		p.setLastErr(err)
		p.setState(StateBackoff, p.explain(err, s))
	}
	return next, err
}

// drive runs the session's events (timers, rekey requests, a replacing
// session) until it ends.
func (p *Peer) drive(s *Session, serveErr chan error, next **Session) error {
	warned := false
	if p.role == kdf.Initiator {
		if err := p.rekeyOn(s, serveErr); err != nil {
			return err
		}
	}
	at := s.RemoteAddr().String()
	p.timersSessionUp()
	if !p.e.isCurrent(s.local) {
		if p.prevOnly.Load() {
			p.timersIdentityRefused()
		} else {
			p.maybeMove(s)
		}
	}
	for {
		select {
		case <-p.rotation:
			p.maybeMove(s)
		case <-p.identityRefused:
			p.timersIdentityRefused()
		case <-p.timers.identity.C():
			p.timers.identity.fired()
			p.maybeMove(s)
		case <-p.timers.path.C():
			p.timers.path.fired()
			if !p.expiredPath(s, &at) {
				continue
			}
			if err := p.requestedRekey(s, serveErr); err != nil {
				return err
			}
		case <-p.timers.rekeyDue.C(): // expiredRekeyDue
			p.timers.rekeyDue.fired()
			if err := p.rekeyOn(s, serveErr); err != nil {
				return err
			}
		case <-p.remoteRekey:
			if !p.remoteRekeyed(&warned) {
				continue
			}
			if err := p.rekeyOn(s, serveErr); err != nil {
				return err
			}
		case <-p.timers.rekeyDeferred.C(): // expiredRekeyDeferred
			p.timers.rekeyDeferred.fired()
			if err := p.rekeyOn(s, serveErr); err != nil {
				return err
			}
		case res := <-p.rekeyReq:
			err := p.requestedRekey(s, serveErr)
			res <- err
			if err != nil {
				return err
			}
		case err := <-serveErr:
			serveErr <- err // runSession waits for it too
			return err
		case n := <-p.incoming:
			if p.refuseDuplicate(s, n) {
				continue
			}
			*next = n
			return errReplaced
		case <-p.ctx.Done():
			return p.ctx.Err()
		}
	}
}

// refuseDuplicate closes n, a session the peer opened while s was live,
// if it duplicates s, and reports whether it did. The responder dialed
// while our own dial was under way (both started together, or both lost
// the session): keep ours, which the responder switches to. A restarted
// responder has a new boot id and replaces s. So does a responder that
// dials again while we hold a session it dialed: it dials only when it
// has no session, so that one is dead on its side even if we have not
// noticed (its NAT rebound and our packets no longer reach it).
//
// A session under other identities than s is never a duplicate: it is
// one side's identity rotation moving the pair (moveIdentity).
func (p *Peer) refuseDuplicate(s, n *Session) bool {
	if p.role != kdf.Initiator || !s.Dialed() || n.PeerBootID() != s.PeerBootID() || n.peer != s.peer || n.local != s.local {
		return false
	}
	p.log.Debug("refusing the responder's duplicate session; keeping the one this side dialed")
	n.Close(errDuplicate)
	return true
}

// attach makes s the live session. A new boot id means the peer restarted
// and lost its keys, so every generation we still hold is useless and goes
// at once instead of after the grace period.
//
// The pair's role is the session's: an identity rotation may change it.
func (p *Peer) attach(s *Session) error {
	if p.e.isCurrent(s.local) {
		p.prevOnly.Store(false)
	}
	p.mu.Lock()
	p.sess = s
	if p.role != s.role {
		p.log.Info("role changed with the identities of the new session", "role", s.role.String(), "was", p.role.String())
		p.role = s.role
	}
	restarted := p.lastBoot != (wire.BootID{}) && p.lastBoot != s.PeerBootID()
	p.lastBoot = s.PeerBootID()
	var stale []*SA
	if restarted {
		for sa, t := range p.old {
			t.Stop()
			stale = append(stale, sa)
		}
		clear(p.old)
		if p.cur != nil {
			stale = append(stale, p.cur)
			p.cur = nil
		}
	}
	p.mu.Unlock()
	if restarted {
		p.log.Info("peer restarted (new boot id); removing its old SAs now", "removed", len(stale))
	}
	for _, sa := range stale {
		p.remove(sa)
	}
	if err := s.raiseFloor(max(p.spiFloor(), s.hello.SPIFloor), p.e.cfg.MaxSAsPerSession); err != nil {
		return peerErr(p.cfg.Key, "session setup", err)
	}
	p.log.Debug("session established", "remote", s.conn.RemoteAddr().String(), "boot_id", fmt.Sprintf("%x", s.PeerBootID()))
	return nil
}
