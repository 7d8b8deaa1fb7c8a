package keyexchange

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/keyexchange/wire"
)

// PeerConfig describes one pinned peer. Zero durations take the defaults
// shown.
type PeerConfig struct {
	Key identity.PublicKey
	// Addr is the peer's control socket. Only the initiator dials, but set
	// it on both sides: which side initiates depends on the keys.
	Addr  netip.AddrPort
	Assoc wire.AssocID // 1
	// Backends are the data planes this host accepts for the peer, best
	// first. The initiator offers the first one the peer's Hello lists
	// too, so two hosts that accept several agree on the best one both
	// can run, and a later session may settle on another (SA.Backend
	// says which). Backend alone is shorthand for Backends{Backend}.
	Backends []wire.Backend
	Backend  wire.Backend
	Suite    kdf.Suite

	RekeyInterval time.Duration // 2m, minus up to RekeyJitter of it
	RekeyJitter   float64       // 0.1
	Grace         time.Duration // 30s: the previous generation stays this long
	BackoffMin    time.Duration // 200ms
	BackoffMax    time.Duration // 30s
}

// Peer keeps a session and a current SA with one peer. All its methods are
// safe for concurrent use.
type Peer struct {
	e      *Endpoint
	cfg    PeerConfig
	role   kdf.Role
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	limit       *limiter        // negotiations the peer makes us run
	incoming    chan *Session   // sessions the peer opened to us
	rekeyReq    chan chan error // local on-demand rekeys
	remoteRekey chan struct{}   // the peer asked for a rekey

	mu       sync.Mutex
	sess     *Session
	cur      *SA
	old      map[*SA]*time.Timer // retiring generations
	gen      uint32              // initiator: last generation offered
	commits  uint64
	changed  chan struct{} // closed on every commit, then replaced
	lastBoot wire.BootID
	lastErr  error              // why the last dial or session failed, for status output
	bye      wire.GoodbyeReason // what to tell the peer when closing
}

// AddPeer pins a peer and starts keeping a session with it.
func (e *Endpoint) AddPeer(cfg PeerConfig) (*Peer, error) {
	if cfg.Key.IsZero() {
		return nil, errors.New("keyexchange: PeerConfig.Key is required (the peer's pspd pubkey line)")
	}
	role, err := electRole(e.id.Public(), cfg.Key)
	if err != nil {
		return nil, peerErr(cfg.Key, "add peer", err)
	}
	if len(cfg.Backends) == 0 {
		cfg.Backends = []wire.Backend{cfg.Backend}
	}
	cfg.Backend = 0
	for _, b := range cfg.Backends {
		if e.cfg.Installers[b] == nil {
			err = fmt.Errorf("backend %s has no installer on this host", b)
		}
	}
	switch {
	case err != nil:
	case !e.cfg.Suites.Has(cfg.Suite):
		err = fmt.Errorf("suite %s is not enabled on this host", cfg.Suite)
	case role == kdf.Initiator && !cfg.Addr.IsValid():
		err = errors.New("PeerConfig.Addr is required: this host is the initiator for this peer and must dial it")
	}
	if err != nil {
		return nil, peerErr(cfg.Key, "add peer", err)
	}
	if cfg.Assoc == 0 {
		cfg.Assoc = 1
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&cfg.RekeyInterval, 2*time.Minute)
	def(&cfg.Grace, 30*time.Second)
	def(&cfg.BackoffMin, 200*time.Millisecond)
	def(&cfg.BackoffMax, 30*time.Second)
	if cfg.RekeyJitter <= 0 || cfg.RekeyJitter >= 1 {
		cfg.RekeyJitter = 0.1
	}
	p := &Peer{
		e: e, cfg: cfg, role: role, done: make(chan struct{}),
		log:      e.log.With("peer", cfg.Key.Fingerprint(), "role", role.String()),
		incoming: make(chan *Session, 1), rekeyReq: make(chan chan error), remoteRekey: make(chan struct{}, 1),
		old: map[*SA]*time.Timer{}, changed: make(chan struct{}),
	}
	// The initiator paces its negotiations to the limit the responder
	// enforces; one token of slack on the responder absorbs the jitter
	// between the two buckets (they start and drain a network delay
	// apart), so an honest initiator never trips it.
	burst := e.cfg.PeerNegotiationBurst
	if role == kdf.Responder {
		burst++
	}
	p.limit = newLimiter(burst, e.cfg.PeerNegotiationInterval)
	p.ctx, p.cancel = context.WithCancel(e.ctx)
	e.mu.Lock()
	if e.peers[cfg.Key] != nil {
		e.mu.Unlock()
		return nil, peerErr(cfg.Key, "add peer", errors.New("already added"))
	}
	e.peers[cfg.Key] = p
	e.mu.Unlock()
	go p.run()
	return p, nil
}

func (p *Peer) setLastErr(err error) {
	if err == nil || p.ctx.Err() != nil {
		return
	}
	p.mu.Lock()
	p.lastErr = err
	p.mu.Unlock()
}

// LastError is why the most recent dial or session with the peer failed,
// or nil if none has.
func (p *Peer) LastError() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.lastErr
}

// State is where a peer's session stands.
type State uint8

const (
	StateDown        State = iota // closed, or not started
	StateConnecting               // dialing, or waiting for the peer to dial
	StateHandshaking              // TLS and Hellos under way
	StateUp                       // a session is established
	StateBackoff                  // the last attempt failed; waiting to retry
)

func (s State) String() string {
	switch s {
	case StateDown:
		return "down"
	case StateConnecting:
		return "connecting"
	case StateHandshaking:
		return "handshaking"
	case StateUp:
		return "up"
	case StateBackoff:
		return "backoff"
	}
	return fmt.Sprintf("state(%d)", uint8(s))
}

// Status is a snapshot of a Peer for status output and metrics.
type Status struct {
	State State
	// Since is when the peer entered State.
	Since time.Time
	// Cause says, in operator terms, why the peer is not up (the last
	// dial or session failure); nil while up.
	Cause      error
	Up         bool        // a session is established
	Group      tls.CurveID // the session's key exchange group; 0 when down
	PeerBootID wire.BootID // of the session's peer process; zero when down
	LastError  error       // why the last dial or session failed, if one did
	// LastUp is when the most recent session came up; zero if none has.
	LastUp time.Time
}

// Status reports the peer's session state.
func (p *Peer) Status() Status {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := Status{LastError: p.lastErr, State: StateConnecting, Cause: p.lastErr}
	if p.lastErr != nil {
		st.State = StateBackoff
	}
	if s := p.sess; s != nil {
		st.Up, st.Group, st.PeerBootID = true, s.Group(), s.PeerBootID()
		st.State, st.Cause = StateUp, nil
	}
	return st
}

// Key is the peer's pinned key.
func (p *Peer) Key() identity.PublicKey { return p.cfg.Key }

// Role is this side's role towards the peer.
func (p *Peer) Role() kdf.Role { return p.role }

// Session is the live session, or nil.
func (p *Peer) Session() *Session {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sess
}

// ErrNoSession means there is no session with the peer right now.
var ErrNoSession = errors.New("no session with the peer")

// SendExplicitKey sends a kernel PSP receive key to the peer on the
// current session. The caller keeps ownership of k.Key.
func (p *Peer) SendExplicitKey(ctx context.Context, k wire.ExplicitKey) error {
	s := p.Session()
	if s == nil {
		return peerErr(p.cfg.Key, "send ExplicitKey", ErrNoSession)
	}
	return s.send(ctx, k)
}

// Current is the confirmed SA in use, without its keys (they live in the
// installer).
func (p *Peer) Current() (SA, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cur == nil {
		return SA{}, false
	}
	return p.cur.WithoutKeys(), true
}

// Wait blocks until the current SA satisfies ok.
func (p *Peer) Wait(ctx context.Context, ok func(SA) bool) (SA, error) {
	for {
		p.mu.Lock()
		ch := p.changed
		var sa SA
		have := p.cur != nil
		if have {
			sa = p.cur.WithoutKeys()
		}
		p.mu.Unlock()
		if have && ok(sa) {
			return sa, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return SA{}, peerErr(p.cfg.Key, "wait for SA", context.Cause(ctx))
		case <-p.done:
			return SA{}, peerErr(p.cfg.Key, "wait for SA", errors.New("peer closed"))
		}
	}
}

// WaitGeneration waits for a confirmed SA of at least generation gen.
func (p *Peer) WaitGeneration(ctx context.Context, gen uint32) (SA, error) {
	return p.Wait(ctx, func(sa SA) bool { return sa.Generation >= gen })
}

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

// Close stops the peer: it tells the peer (a Goodbye, after which the
// peer marks this host down at once), ends the session and removes every
// SA it installed.
func (p *Peer) Close() { p.close(wire.GoodbyeRemoved) }

func (p *Peer) close(reason wire.GoodbyeReason) {
	p.mu.Lock()
	if p.bye == 0 {
		p.bye = reason
	}
	p.mu.Unlock()
	p.cancel()
	<-p.done
	p.e.mu.Lock()
	if p.e.peers[p.cfg.Key] == p {
		delete(p.e.peers, p.cfg.Key)
	}
	p.e.mu.Unlock()
}

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

func (p *Peer) run() {
	defer close(p.done)
	defer p.removeAll()
	backoff := p.cfg.BackoffMin
	var next *Session
	knocked := false
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
		if s == nil && p.role == kdf.Initiator {
			dctx, cancel := context.WithTimeout(p.ctx, 2*p.e.cfg.HandshakeTimeout)
			var err error
			s, err = p.e.dial(dctx, p.cfg.Addr, p.cfg.Key)
			cancel()
			if err != nil {
				p.setLastErr(err)
				d := jitter(backoff)
				p.log.Warn("session failed; retrying", "err", err, "retry_in", d)
				select {
				case s = <-p.incoming:
				case <-time.After(d):
				case <-p.ctx.Done():
				}
				backoff = min(2*backoff, p.cfg.BackoffMax)
				if s == nil {
					continue
				}
			}
		}
		if s == nil {
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
		var err error
		next, err = p.runSession(s, &backoff)
		p.log.Info("session ended", "err", err)
		if next == nil && err != nil && p.ctx.Err() == nil {
			// A session that failed after the handshake (a refused
			// install, a protocol error) must not turn into a tight
			// reconnect loop: back off as after a failed dial. A session
			// the peer opens meanwhile is taken at once.
			d := jitter(backoff)
			select {
			case next = <-p.incoming:
			case <-time.After(d):
			case <-p.ctx.Done():
			}
			backoff = min(2*backoff, p.cfg.BackoffMax)
		}
	}
}

// knock is a starting responder's one dial to the initiator. The
// initiator normally dials, but after this side restarted the initiator
// may still hold a session with this side's previous incarnation, which
// it would only notice at the idle timeout. A starting responder has no
// session with the initiator, whatever the initiator believes, so it
// dials at once; a session arriving from us, with our new boot id,
// replaces the stale one on the initiator. When both sides start together
// the initiator's dial and ours race: the initiator keeps the session it
// dialed and refuses ours as a duplicate (same boot id), and we switch to
// its session when it arrives (see drive), so both settle on one.
func (p *Peer) knock() *Session {
	select {
	case s := <-p.incoming:
		return s
	default:
	}
	if !p.cfg.Addr.IsValid() {
		return nil
	}
	p.log.Debug("responder has no session with the initiator; dialing it now")
	dctx, cancel := context.WithTimeout(p.ctx, 2*p.e.cfg.HandshakeTimeout)
	defer cancel()
	s, err := p.e.dial(dctx, p.cfg.Addr, p.cfg.Key)
	if err != nil {
		p.log.Debug("responder could not reach the initiator; waiting for it to dial", "err", err)
		return nil
	}
	p.log.Info("responder reached the initiator after start")
	return s
}

// jitter spreads d over [d/2, d) so peers that lost each other at once do
// not retry in lockstep.
func jitter(d time.Duration) time.Duration {
	return d/2 + rand.N(d/2+1)
}

func (p *Peer) rekeyDelay() time.Duration {
	iv := p.cfg.RekeyInterval
	return iv - time.Duration(rand.Float64()*p.cfg.RekeyJitter*float64(iv))
}

// runSession drives one session until it ends. It returns a newer session
// that replaced it, if any.
func (p *Peer) runSession(s *Session, backoff *time.Duration) (*Session, error) {
	if err := p.attach(s); err != nil {
		s.Close(err)
		return nil, err
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
	err := p.drive(s, backoff, serveErr, &next)
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
	// In the same step, so that Status never shows a peer down without
	// the reason.
	if err != nil && p.ctx.Err() == nil {
		p.lastErr = err
	}
	p.mu.Unlock()
	return next, err
}

func (p *Peer) drive(s *Session, backoff *time.Duration, serveErr chan error, next **Session) error {
	var timer <-chan time.Time
	var deferred <-chan time.Time // a Rekey request the limit held back
	warned := false
	negotiate := func() error {
		// Every negotiation costs the responder a token of its limit;
		// pace ours to the same limit (the default on both sides) so that
		// an honest initiator never trips it.
		for !p.limit.allow(time.Now()) {
			select {
			case <-time.After(p.limit.wait(time.Now())):
			case err := <-serveErr:
				serveErr <- err
				return err
			case <-p.ctx.Done():
				return p.ctx.Err()
			}
		}
		sa, err := p.negotiate(s)
		if err == nil {
			p.commit(sa)
			*backoff = p.cfg.BackoffMin
			timer = time.After(p.rekeyDelay())
		}
		return err
	}
	if p.role == kdf.Initiator {
		if err := negotiate(); err != nil {
			return err
		}
	}
	for {
		select {
		case <-timer:
			if err := negotiate(); err != nil {
				return err
			}
		case <-p.remoteRekey:
			if deferred != nil {
				continue // coalesced into the one already waiting
			}
			if d := p.limit.wait(time.Now()); d > 0 {
				if !warned {
					warned = true
					p.log.Warn("peer requests rekeys faster than this host serves them; serving them at the limit", "interval", p.e.cfg.PeerNegotiationInterval, "burst", p.e.cfg.PeerNegotiationBurst)
				}
				deferred = time.After(d)
				continue
			}
			if err := negotiate(); err != nil {
				return err
			}
		case <-deferred:
			deferred = nil
			if err := negotiate(); err != nil {
				return err
			}
		case res := <-p.rekeyReq:
			var err error
			if p.role == kdf.Initiator {
				err = negotiate()
			} else {
				err = s.send(p.ctx, wire.Rekey{Assoc: p.cfg.Assoc})
			}
			res <- err
			if err != nil {
				return err
			}
		case err := <-serveErr:
			serveErr <- err // runSession waits for it too
			return err
		case n := <-p.incoming:
			if p.role == kdf.Initiator && n.PeerBootID() == s.PeerBootID() {
				// The responder dialed while our own dial was under way
				// (both started together): keep ours, which the
				// responder switches to. A restarted responder has a new
				// boot id and replaces the stale session below.
				p.log.Debug("refusing the responder's duplicate session; keeping the one this side dialed")
				n.Close(errDuplicate)
				continue
			}
			*next = n
			return errReplaced
		case <-p.ctx.Done():
			return p.ctx.Err()
		}
	}
}

func (p *Peer) negotiate(s *Session) (*SA, error) {
	p.mu.Lock()
	p.gen++
	gen := p.gen
	p.mu.Unlock()
	i := slices.IndexFunc(p.cfg.Backends, s.hello.Backends.Has)
	if i < 0 {
		return nil, s.fail(nil, "negotiate", fmt.Errorf("%w: no common backend: this host accepts %s for the peer, the peer offers %s (set backend for this peer to one both hosts can run)",
			errUnsupported, wire.NewBackends(p.cfg.Backends...), s.hello.Backends))
	}
	b := p.cfg.Backends[i]
	return s.negotiate(p.ctx, p.e.cfg.Installers[b], p.cfg.Assoc, gen, b, p.cfg.Suite)
}

// attach makes s the live session. A new boot id means the peer restarted
// and lost its keys, so every generation we still hold is useless and goes
// at once instead of after the grace period.
func (p *Peer) attach(s *Session) error {
	p.mu.Lock()
	p.sess = s
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
	p.log.Info("session up", "remote", s.conn.RemoteAddr().String(), "boot_id", fmt.Sprintf("%x", s.PeerBootID()))
	return nil
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
// grace period (make-before-break).
func (p *Peer) commit(sa *SA) {
	p.mu.Lock()
	prev := p.cur
	p.cur = sa
	if prev != nil {
		p.old[prev] = time.AfterFunc(p.cfg.Grace, func() {
			p.mu.Lock()
			_, ok := p.old[prev]
			delete(p.old, prev)
			p.mu.Unlock()
			if ok {
				p.remove(prev)
			}
		})
	}
	p.commits++
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()
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
