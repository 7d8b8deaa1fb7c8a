package keyexchange

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/keyexchange/wire"
)

// PeerConfig describes one pinned peer. Zero durations take the defaults
// shown.
type PeerConfig struct {
	// Name is the peer's name in the configuration, for log lines (which
	// also give its fingerprint). Optional.
	Name string
	// Key is the peer's key. It names the peer (SA.Peer, ExplicitKeys,
	// Peer.Key) for as long as the Peer lives, and is pinned unless Pins
	// is set.
	Key identity.PublicKey
	// Pins, if set, are the keys pinned instead of Key alone (one or two):
	// during the peer's identity rotation both of its keys, after it its
	// new one, which need not be Key. A session under either is the
	// peer's. SetKeys changes them.
	Pins []identity.PublicKey
	// Addr is the peer's control socket. Set it on both sides: which side
	// initiates depends on the keys, and a responder dials it too, at
	// start and after it lost its session (see knock).
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

	// PSPVersions, if set, says which kernel PSP versions this host's
	// PSP devices accept; each Hello to the peer carries them
	// (wire.Hello.PSP), so that the peer's pspd refuses an upgrade with
	// a version they do not take before it touches the socket. ok false:
	// this host cannot say now, and the Hello says nothing.
	PSPVersions func() (v wire.PSPVersions, ok bool)
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

	pins            pins            // the keys the peer may present; guarded by e.mu
	prevOnly        atomic.Bool     // it refused this host's new identity: show it the previous one
	moving          atomic.Bool     // moveIdentity is dialing
	rotation        chan struct{}   // this host's identity changed (timersRotated)
	identityRefused chan struct{}   // moveIdentity's dial was refused
	limit           *limiter        // negotiations the peer makes us run
	timers          peerTimers      // owned by run
	incoming        chan *Session   // sessions the peer opened to us
	rekeyReq        chan chan error // local on-demand rekeys
	remoteRekey     chan struct{}   // the peer asked for a rekey

	mu       sync.Mutex
	sess     *Session
	cur      *SA
	old      map[*SA]*time.Timer // retiring generations
	gen      uint32              // initiator: last generation offered
	commits  uint64
	changed  chan struct{} // closed on every commit, then replaced
	lastBoot wire.BootID
	bye      wire.GoodbyeReason // what to tell the peer when closing

	// The state machine behind Status (see update).
	state     State
	since     time.Time // when state was entered
	cause     error     // why the peer is not up; nil while up
	downSince time.Time // when the peer was added or last went down
	lastUp    time.Time
	lastErr   error // why the last dial or session failed
	lastErrAt time.Time
	// warned holds the causeKeys logged at WARN since the peer was last up, so that retries,
	// and causes that alternate with a transient one (a replaced session), do not repeat them.
	warned    map[string]bool
	remind    *time.Timer // while not up: expiredReminder
	remindGen uint64      // tells the armed reminder from one stopped before it ran
	closed    bool
	nat       NAT // last NAT detection logged, so that each session does not repeat it
}

// natChanged records n and reports whether it differs from the last NAT
// detection of the peer's sessions.
func (p *Peer) natChanged(n NAT) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.nat == n {
		return false
	}
	p.nat = n
	return true
}

// AddPeer pins a peer and starts keeping a session with it.
func (e *Endpoint) AddPeer(cfg PeerConfig) (*Peer, error) {
	if cfg.Key.IsZero() {
		return nil, errors.New("keyexchange: PeerConfig.Key is required (the peer's pspd pubkey line)")
	}
	ps, err := pinsOf(cfg.Key, cfg.Pins)
	if err != nil {
		return nil, peerErr(cfg.Key, "add peer", err)
	}
	role, err := electRole(e.Public(), ps[0])
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
		log:      e.log.With(peerAttrs(cfg)...).With("role", role.String()),
		incoming: make(chan *Session, 1), rekeyReq: make(chan chan error), remoteRekey: make(chan struct{}, 1),
		old: map[*SA]*time.Timer{}, changed: make(chan struct{}),
		rotation: make(chan struct{}, 1), identityRefused: make(chan struct{}, 1),
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
	p.timersInit()
	now := time.Now()
	p.state, p.since, p.downSince = StateConnecting, now, now
	p.pins = ps
	p.ctx, p.cancel = context.WithCancel(e.ctx)
	e.mu.Lock()
	if e.peers[cfg.Key] != nil {
		e.mu.Unlock()
		return nil, peerErr(cfg.Key, "add peer", errors.New("already added"))
	}
	if err := e.pinLocked(p, p.pins); err != nil {
		e.mu.Unlock()
		return nil, peerErr(cfg.Key, "add peer", err)
	}
	for _, k := range p.pins {
		if !k.IsZero() {
			e.peers[k] = p
		}
	}
	e.mu.Unlock()
	p.mu.Lock()
	p.timersDown()
	p.mu.Unlock()
	go p.run()
	return p, nil
}

func (p *Peer) setLastErr(err error) {
	if err == nil || p.ctx.Err() != nil {
		return
	}
	p.mu.Lock()
	p.lastErr, p.lastErrAt = err, time.Now()
	p.mu.Unlock()
}

// LastError is why the most recent dial or session with the peer failed,
// or nil if none has. It stays after the peer recovers: it is history,
// Status.Cause is the present.
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
	StateHandshaking              // the peer answered: TLS, Hellos and the first SA under way
	StateUp                       // a session is established and has a confirmed SA
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

// LogValue logs a State by name.
func (s State) LogValue() slog.Value { return slog.StringValue(s.String()) }

// Status is a snapshot of a Peer for status output and metrics.
type Status struct {
	State State
	// Since is when the peer entered State. A peer that cannot connect
	// alternates between connecting and backoff; DownSince says how long
	// it has not been up.
	Since time.Time
	// Cause says, in operator terms, why the peer is not up: what the
	// last attempt ran into and what to change. It is nil while up.
	Cause error
	// DownSince is when the peer was added or last went down; zero while
	// up.
	DownSince  time.Time
	Up         bool        // State is StateUp: a session is established and its first SA confirmed
	Group      tls.CurveID // the session's key exchange group; 0 when down
	PeerBootID wire.BootID // of the session's peer process; zero when down
	// LastError is why the last dial or session failed, if one did, in
	// full. It is history: it stays after the peer recovers, and
	// LastErrorAt says when it happened (before Since, once up).
	LastError   error
	LastErrorAt time.Time
	// LastUp is when the most recent session came up; zero if none has.
	LastUp time.Time
	// NAT is what the session's Hellos showed about NATs; zero when down.
	NAT NAT
}

// Status reports the peer's session state.
func (p *Peer) Status() Status {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := Status{State: p.state, Since: p.since, Cause: p.cause, LastError: p.lastErr, LastErrorAt: p.lastErrAt, LastUp: p.lastUp}
	if p.state == StateUp {
		st.Up = true
		if s := p.sess; s != nil {
			st.Group, st.PeerBootID, st.NAT = s.Group(), s.PeerBootID(), s.NAT()
		}
	} else {
		st.DownSince = p.downSince
	}
	return st
}

// setState moves the peer to st. A nil cause keeps the current one (a
// retry does not change why the peer is down); entering StateUp clears
// it.
func (p *Peer) setState(st State, cause error) {
	p.update(cause, func(State) State { return st })
}

// noteCause records why the peer is not up, learnt outside its own
// attempts (a handshake the listener refused or the peer aborted). It
// does nothing while the peer is up: such an attempt came from somewhere
// else, and the session stands.
func (p *Peer) noteCause(cause error) {
	p.setLastErr(cause)
	p.update(cause, func(s State) State {
		if s == StateHandshaking {
			return StateConnecting
		}
		return s
	})
}

// handshaking: the peer answered; TLS and the Hellos are under way.
func (p *Peer) handshaking() {
	p.update(nil, func(s State) State {
		if s == StateConnecting || s == StateBackoff {
			return StateHandshaking
		}
		return s
	})
}

// update is the state machine's one transition: next computes the new
// state from the current one.
func (p *Peer) update(cause error, next func(State) State) {
	p.mu.Lock()
	log := p.updateLocked(cause, next)
	p.mu.Unlock()
	log()
}

// updateLocked is update with p.mu held; the caller runs the returned
// function, which logs the transition, after unlocking. One WARN line
// says why the peer is not up each time the cause changes; retries with
// the same cause log at DEBUG only, the reminder timer repeats the WARN
// while the peer stays down (timersDown), and an INFO line says when it
// is up.
func (p *Peer) updateLocked(cause error, next func(State) State) func() {
	nolog := func() {}
	if p.closed || p.ctx.Err() != nil {
		return nolog
	}
	now := time.Now()
	prev := p.state
	st := next(prev)
	if st == StateUp && prev == StateUp {
		return nolog
	}
	if st == StateUp {
		cause = nil
	} else if cause == nil {
		cause = p.cause
	}
	if st != prev {
		p.since = now
	}
	if prev == StateUp && st != StateUp {
		p.downSince = now
	}
	p.state, p.cause = st, cause
	downFor := durationAttr("down_for", now.Sub(p.downSince))
	switch {
	case st == StateUp:
		p.lastUp = now
		clear(p.warned)
		p.timersUp()
		attrs := []any{downFor}
		if s := p.sess; s != nil {
			attrs = append(attrs, "remote", s.conn.RemoteAddr().String(), "group", s.Group().String(), "boot_id", fmt.Sprintf("%x", s.PeerBootID()))
		}
		return func() { p.log.Info("peer up", attrs...) }
	case cause != nil && !p.warned[causeKey(cause)]:
		if p.warned == nil {
			p.warned = map[string]bool{}
		}
		p.warned[causeKey(cause)] = true
		p.timersDown()
		msg := "peer not up"
		if prev == StateUp {
			msg = "peer down"
		}
		return func() { p.log.Warn(msg, "state", st, "cause", cause.Error(), downFor) }
	}
	p.timersDown()
	if st != prev {
		return func() { p.log.Debug("peer state", "state", st, "from", prev) }
	}
	return nolog
}

// durationAttr logs a duration as text ("1m30s"), the same in JSON and
// text output.
func durationAttr(key string, d time.Duration) slog.Attr {
	return slog.String(key, d.Round(time.Millisecond).String())
}

// Key is the key the peer was added with, which names it.
func (p *Peer) Key() identity.PublicKey { return p.cfg.Key }

// Role is this side's role towards the peer, that of its latest session.
func (p *Peer) Role() kdf.Role {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.role
}

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
	p.mu.Lock()
	p.closed = true
	p.state, p.since, p.cause = StateDown, time.Now(), nil
	p.timersUp() // nothing left to remind of
	p.mu.Unlock()
	p.e.mu.Lock()
	for _, k := range p.pins {
		if !k.IsZero() && p.e.peers[k] == p {
			delete(p.e.peers, k)
		}
	}
	p.e.mu.Unlock()
}

// peerAttrs name a peer in log lines: by its configured name, if it has
// one, and always by fingerprint.
func peerAttrs(cfg PeerConfig) []any {
	if cfg.Name != "" {
		return []any{"peer", cfg.Name, "fingerprint", cfg.Key.Fingerprint()}
	}
	return []any{"peer", cfg.Key.Fingerprint()}
}

// peerAttrs name the peer with key pk in log lines, by its configured
// name if it is pinned here.
func (e *Endpoint) peerAttrs(pk identity.PublicKey) []any {
	if p := e.peer(pk); p != nil {
		return peerAttrs(p.cfg)
	}
	return peerAttrs(PeerConfig{Key: pk})
}
