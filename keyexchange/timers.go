package keyexchange

import (
	"math/rand/v2"
	"time"
)

// Every timer of a Peer is in this file, with the events that arm and stop
// it and what runs when it expires, so that a peer's life reads in one
// place (as in wireguard-go's device/timers.go). The events are named
// timersX (called when X happened) and the handlers expiredX.
//
//	backoff        after a failed dial or session: wait, then try again (waitBackoff)
//	rekeyDue       initiator: the current generation is due for replacement (drive)
//	rekeyDeferred  a Rekey request of the peer that the negotiation limit held back (drive)
//	pace           initiator: our next negotiation waits for the limit (rekeyOn)
//	grace (per SA) a replaced generation is removed (expiredGrace)
//	remind         the peer is still not up: say so again (expiredReminder)
//	path           while a session runs: did it move to another address? (expiredPath)
//	identity       the peer refused this host's new identity: try it again (maybeMove)
//
// The session's own timers are QUIC's: the handshake timeout, keep-alives
// and the idle timeout (Config.HandshakeTimeout, KeepAlive, IdleTimeout).
// Their expiry fails the dial or ends the session, which reconnect.go
// handles like any other failure.
//
// backoff, rekeyDue, rekeyDeferred, pace, path and identity belong to the peer's run
// goroutine, which selects on their channels (timer.C) and runs the
// handlers itself, so they need no lock. grace and remind run on their own
// (time.AfterFunc) and take p.mu.
type peerTimers struct {
	backoff       timer
	rekeyDue      timer
	rekeyDeferred timer
	pace          timer
	path          timer
	identity      timer

	// nextBackoff is the wait after the next failure: BackoffMin after a
	// success, doubling per failure up to BackoffMax.
	nextBackoff time.Duration
}

// timer is a one-shot timer owned by one goroutine. Since Go 1.23 Stop and
// Reset discard a value not yet received, so a stopped or re-armed timer
// never delivers a stale expiry.
type timer struct {
	t  *time.Timer
	on bool
}

func newTimer() timer {
	t := time.NewTimer(time.Hour)
	t.Stop()
	return timer{t: t}
}

// mod (re)arms the timer to expire after d.
func (t *timer) mod(d time.Duration) { t.t.Reset(d); t.on = true }

// del disarms the timer.
func (t *timer) del() { t.t.Stop(); t.on = false }

// C is the timer's channel while it is armed and nil (never ready)
// otherwise. After receiving from it, call fired.
func (t *timer) C() <-chan time.Time {
	if !t.on {
		return nil
	}
	return t.t.C
}

func (t *timer) fired() { t.on = false }

func (p *Peer) timersInit() {
	p.timers = peerTimers{
		backoff: newTimer(), rekeyDue: newTimer(), rekeyDeferred: newTimer(), pace: newTimer(), path: newTimer(),
		identity: newTimer(), nextBackoff: p.cfg.BackoffMin,
	}
}

// timersStop disarms every timer of the run goroutine; the grace timers
// are stopped with their SAs (removeAll).
func (p *Peer) timersStop() {
	p.timers.backoff.del()
	p.timers.rekeyDue.del()
	p.timers.rekeyDeferred.del()
	p.timers.pace.del()
	p.timers.path.del()
	p.timers.identity.del()
}

// timersNegotiated: a generation was confirmed. The next one is due after
// the (jittered) rekey interval, and the next failure starts the backoff
// from the beginning.
func (p *Peer) timersNegotiated() {
	p.timers.nextBackoff = p.cfg.BackoffMin
	p.timers.rekeyDue.mod(p.rekeyDelay())
}

// timersAttemptFailed: a dial or a session failed. The next attempt waits
// for the backoff timer, and the one after that twice as long. It returns
// the wait.
func (p *Peer) timersAttemptFailed() time.Duration {
	d := jitter(p.timers.nextBackoff)
	p.timers.backoff.mod(d)
	p.timers.nextBackoff = min(2*p.timers.nextBackoff, p.cfg.BackoffMax)
	return d
}

// timersSessionEnded: nothing of a session's schedule outlives it.
func (p *Peer) timersSessionEnded() {
	p.timers.rekeyDue.del()
	p.timers.rekeyDeferred.del()
	p.timers.pace.del()
	p.timers.path.del()
	p.timers.identity.del()
}

// pathCheck is how often a session's address is compared with the one
// its generation was negotiated on: a peer that moved is followed about
// this long after QUIC moved the session.
const pathCheck = time.Second

// identityRetry is how long a peer that refused this host's new identity
// is shown the previous one before the new one is tried again: about how
// long its fleet or its operator takes to pin the new key.
const identityRetry = 10 * time.Second

// timersRotated: this host's identity changed (Rotate, DropPrevious); the
// run goroutine moves the live session (maybeMove).
func (p *Peer) timersRotated() {
	select {
	case p.rotation <- struct{}{}:
	default:
	}
}

// timersIdentityRefused: the peer refused the new identity; try again
// after identityRetry (maybeMove).
func (p *Peer) timersIdentityRefused() { p.timers.identity.mod(p.e.identityRetry) }

// timersSessionUp: a session runs; watch its address (expiredPath).
func (p *Peer) timersSessionUp() { p.timers.path.mod(pathCheck) }

// expiredPath reports whether s runs from another address than at, the
// one of the last check, and updates at. QUIC moves a session to a
// peer's new address once the path validated (the peer roamed, or its
// NAT rebound); SAs that the kernel binds to the hosts' addresses follow
// only in a new generation, which the caller negotiates.
func (p *Peer) expiredPath(s *Session, at *string) bool {
	p.timers.path.mod(pathCheck)
	now := s.RemoteAddr().String()
	if now == *at {
		return false
	}
	p.log.Info("the peer's session moved to another address; negotiating a generation there", "from", *at, "to", now)
	*at = now
	return true
}

// timersRekeyHeldBack: the peer asked for a rekey the limit does not allow
// yet; serve it after d (expiredRekeyDeferred).
func (p *Peer) timersRekeyHeldBack(d time.Duration) { p.timers.rekeyDeferred.mod(d) }

// timersCommitted: sa replaced prev, which is removed after the grace
// period (make-before-break). Called with p.mu held.
func (p *Peer) timersCommitted(prev *SA) {
	p.old[prev] = time.AfterFunc(p.cfg.Grace, func() { p.expiredGrace(prev) })
}

// expiredGrace removes a replaced generation, unless something (a restart
// of the peer, its Delete) removed it already.
func (p *Peer) expiredGrace(prev *SA) {
	p.mu.Lock()
	_, ok := p.old[prev]
	delete(p.old, prev)
	p.mu.Unlock()
	if ok {
		p.remove(prev)
	}
}

// jitter spreads d over [d/2, d) so peers that lost each other at once do
// not retry in lockstep.
func jitter(d time.Duration) time.Duration {
	return d/2 + rand.N(d/2+1)
}

// rekeyDelay is the rekey interval minus up to RekeyJitter of it, so that
// the peers of one host do not all rekey at once.
func (p *Peer) rekeyDelay() time.Duration {
	iv := p.cfg.RekeyInterval
	return iv - time.Duration(rand.Float64()*p.cfg.RekeyJitter*float64(iv))
}

// remindEvery is how often a WARN line says that a peer is still not up,
// after the one that said why.
const remindEvery = 5 * time.Minute

// timersDown: the peer is not up; arm the reminder if it is not armed.
// Called with p.mu held.
func (p *Peer) timersDown() {
	if p.remind != nil {
		return
	}
	p.remindGen++
	gen := p.remindGen
	p.remind = time.AfterFunc(p.e.remindEvery, func() { p.expiredReminder(gen) })
}

// timersUp: the peer is up (or closed); nothing to remind of. Called with
// p.mu held.
func (p *Peer) timersUp() {
	if p.remind != nil {
		p.remind.Stop()
		p.remind = nil
	}
}

// expiredReminder says again that the peer is not up, and for how long.
func (p *Peer) expiredReminder(gen uint64) {
	p.mu.Lock()
	if p.remind == nil || p.remindGen != gen || p.closed || p.state == StateUp {
		p.mu.Unlock()
		return
	}
	st, cause, downFor := p.state, "none yet", time.Since(p.downSince)
	if p.cause != nil {
		cause = p.cause.Error()
	}
	p.remind.Reset(p.e.remindEvery)
	p.mu.Unlock()
	p.log.Warn("peer still not up", "state", st, "cause", cause, durationAttr("down_for", downFor))
}
