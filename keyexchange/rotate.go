package keyexchange

import (
	"cmp"
	"crypto/tls"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/pspd/pspd/keyexchange/identity"
)

// Identity rotation, on both sides of it.
//
// The rotating host (Rotate) presents its new identity from then on, and
// moves each session to it: it dials the peer where the session runs now
// and the new session replaces the old one like any other, the SAs
// staying make-before-break. A peer that refuses the new key (it has not
// learnt it yet) is shown the previous identity until the identity timer
// tries again. DropPrevious ends the rotation, once Moved says every peer
// has a session under the new identity.
//
// A peer of the rotating host pins both keys (PeerConfig.Next, SetKeys),
// and accepts a session under either; the Peer keeps its name, SA.Peer,
// throughout.
//
// The role of a pair depends on the keys its session presents
// (electRole), so it may change with the identity: a Peer takes the role
// of its latest session (attach).

// local is one identity of this host with the certificate that carries it.
type local struct {
	id   *identity.Identity
	leaf tls.Certificate
}

func newLocal(id *identity.Identity) (*local, error) {
	leaf, err := selfSignedLeaf(id, time.Now())
	if err != nil {
		return nil, err
	}
	return &local{id: id, leaf: leaf}, nil
}

// pins are the keys a peer may present: its key and, during its identity
// rotation, the second one. The zero key is never a pin.
type pins [2]identity.PublicKey

func (ps pins) has(pk identity.PublicKey) bool {
	return !pk.IsZero() && (pk == ps[0] || pk == ps[1])
}

// presented is which identity the listener showed an inbound connection,
// kept in the connection's context from listenConfig to newSession.
type presented struct {
	mu sync.Mutex
	pk identity.PublicKey
}

type presentedKey struct{}

func (n *presented) set(pk identity.PublicKey) {
	n.mu.Lock()
	n.pk = pk
	n.mu.Unlock()
}

func (n *presented) get() identity.PublicKey {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.pk
}

// presentTo is the identity to show p (nil: a connection from an unknown
// address): the current one, unless p refused it during a rotation.
func (e *Endpoint) presentTo(p *Peer) *local {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.prev != nil && p != nil && p.prevOnly.Load() {
		return e.prev
	}
	return e.cur
}

// isCurrent reports whether pk is the identity this host presents.
func (e *Endpoint) isCurrent(pk identity.PublicKey) bool { return pk == e.Public() }

// hasPrevious reports whether a rotation keeps the previous identity.
func (e *Endpoint) hasPrevious() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.prev != nil
}

// Identities are the identity this host presents and, during a rotation,
// the previous one (else zero).
func (e *Endpoint) Identities() (cur, prev identity.PublicKey) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.prev != nil {
		prev = e.prev.id.Public()
	}
	return e.cur.id.Public(), prev
}

// Rotate makes next the identity this host presents, keeping the current
// one beside it for peers that do not accept next yet, and moves every
// session to next. Peers learn next out of band (the fleet's record, or
// their configuration's next_public_key) before or while it runs.
func (e *Endpoint) Rotate(next *identity.Identity) error {
	l, err := newLocal(next)
	if err != nil {
		return err
	}
	pk := next.Public()
	e.mu.Lock()
	switch {
	case e.prev != nil:
		err = errors.New("an identity rotation is already under way; drop the previous identity first")
	case pk == e.cur.id.Public():
		err = errors.New("the new identity is the current one")
	case e.peers[pk] != nil:
		err = fmt.Errorf("the new identity is pinned here as peer %q's key", e.peers[pk].cfg.Name)
	}
	if err != nil {
		e.mu.Unlock()
		return fmt.Errorf("keyexchange: rotate: %w", err)
	}
	e.prev, e.cur = e.cur, l
	prev := e.prev.id.Public()
	peers := e.distinctPeers()
	e.mu.Unlock()
	e.log.Info("identity rotation: presenting the new identity", "new", pk.Fingerprint(), "previous", prev.Fingerprint())
	for _, p := range peers {
		p.timersRotated()
	}
	return nil
}

// DropPrevious ends a rotation: the previous identity is no longer
// presented, and sessions still under it are moved to the current one.
func (e *Endpoint) DropPrevious() {
	e.mu.Lock()
	prev := e.prev
	e.prev = nil
	peers := e.distinctPeers()
	e.mu.Unlock()
	if prev == nil {
		return
	}
	e.log.Info("identity rotation: previous identity dropped", "previous", prev.id.Public().Fingerprint())
	for _, p := range peers {
		p.prevOnly.Store(false)
		p.timersRotated()
	}
}

// NotMoved lists the peers whose live session does not present the
// current identity yet, by name (or fingerprint); none means a rotation
// can drop the previous identity.
func (e *Endpoint) NotMoved() []string {
	e.mu.Lock()
	cur := e.cur.id.Public()
	peers := e.distinctPeers()
	e.mu.Unlock()
	var out []string
	for _, p := range peers {
		if s := p.Session(); s == nil || s.local != cur {
			out = append(out, cmp.Or(p.cfg.Name, p.cfg.Key.Fingerprint()))
		}
	}
	return out
}

// distinctPeers lists every peer once; e.mu is held.
func (e *Endpoint) distinctPeers() []*Peer {
	seen := map[*Peer]bool{}
	var out []*Peer
	for _, p := range e.peers {
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	return out
}

// pinLocked checks that ps can be p's pins: no key is another peer's or
// this host's own. e.mu is held.
func (e *Endpoint) pinLocked(p *Peer, ps pins) error {
	for _, k := range ps {
		if k.IsZero() {
			continue
		}
		if o := e.peers[k]; o != nil && o != p {
			return fmt.Errorf("key %s is pinned for another peer", k.Fingerprint())
		}
		if k == e.cur.id.Public() || e.prev != nil && k == e.prev.id.Public() {
			return fmt.Errorf("key %s is this host's own", k.Fingerprint())
		}
	}
	return nil
}

// pinsOf is the pins of a PeerConfig: keys, or key alone.
func pinsOf(key identity.PublicKey, keys []identity.PublicKey) (pins, error) {
	var ps pins
	if len(keys) == 0 {
		keys = []identity.PublicKey{key}
	}
	if len(keys) > len(ps) {
		return ps, fmt.Errorf("%d keys pinned; at most %d", len(keys), len(ps))
	}
	for i, k := range keys {
		if k.IsZero() {
			return ps, errors.New("a pinned key is missing")
		}
		ps[i] = k
	}
	return ps, nil
}

// SetKeys changes the keys the peer may present (its identity rotation:
// both keys while it runs, then the new one alone). The peer keeps its
// name (Key, SA.Peer) and its SAs. A session that presented a key no
// longer pinned ends, and the peer reconnects under a pinned one.
func (p *Peer) SetKeys(keys ...identity.PublicKey) error {
	ps, err := pinsOf(identity.PublicKey{}, keys)
	if err != nil {
		return peerErr(p.cfg.Key, "set keys", err)
	}
	e := p.e
	e.mu.Lock()
	if err := e.pinLocked(p, ps); err != nil {
		e.mu.Unlock()
		return peerErr(p.cfg.Key, "set keys", err)
	}
	for _, k := range p.pins {
		if !k.IsZero() && e.peers[k] == p {
			delete(e.peers, k)
		}
	}
	for _, k := range ps {
		if !k.IsZero() {
			e.peers[k] = p
		}
	}
	p.pins = ps
	e.mu.Unlock()
	if s := p.Session(); s != nil && !ps.has(s.peer) {
		p.log.Info("the peer's session key is no longer pinned; reconnecting", "key", s.peer.Fingerprint())
		s.Close(errUnpinned)
	}
	return nil
}

// pinned is the peer's pins now.
func (p *Peer) pinned() pins {
	p.e.mu.Lock()
	defer p.e.mu.Unlock()
	return p.pins
}

var errUnpinned = errors.New("the key this session was authenticated with is no longer pinned")

// moveIdentity dials the peer where session s runs, presenting the
// current identity; the new session replaces s like any other the peer
// offers (drive). It runs on its own, so that s carries traffic until the
// new one has its SA. A peer that refuses the new identity is shown the
// previous one until expiredIdentity tries again.
func (p *Peer) moveIdentity(s *Session) {
	if p.moving.Swap(true) {
		return
	}
	addr := addrPortOf(s.RemoteAddr())
	go func() {
		defer p.moving.Store(false)
		ctx := p.ctx
		cur := p.e.presentTo(nil)
		ns, err := p.e.dialAnd(ctx, addr, p.pinned(), cur, nil)
		if err != nil {
			if refusedByPeer(err) && p.e.hasPrevious() {
				p.prevOnly.Store(true)
				p.log.Warn("the peer refused this host's new identity (it does not pin it yet); presenting the previous one meanwhile", "err", err)
			} else {
				p.log.Debug("could not move the session to the new identity yet", "err", err)
			}
			select {
			case p.identityRefused <- struct{}{}:
			default:
			}
			return
		}
		p.log.Info("session moved to the new identity", "remote", addr)
		p.offer(ns)
	}()
}

// expiredIdentity, or this host's rotation: move s to the current
// identity unless it is under it already.
func (p *Peer) maybeMove(s *Session) {
	if !p.e.isCurrent(s.local) {
		p.moveIdentity(s)
	}
}
