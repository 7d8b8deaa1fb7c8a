package psp

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/pspd/pspd/genl"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/keyexchange/wire"
)

// This file is the socket half of the manager: upgrading an application's
// TCP connection (rx-assoc, key exchange, tx-assoc) and matching the keys
// peers send to local upgrades.

// Errors an upgrade can end with, for errors.Is. Every error also says, in
// its text, whether the socket was touched and what the application must
// do.
var (
	// ErrNotEstablished: the socket is not a connected TCP socket in
	// state ESTABLISHED (the kernel binds PSP only to those).
	ErrNotEstablished = errors.New("not an established TCP connection")
	// ErrWrongPeer: the connection's remote address is not the named
	// peer's (its endpoint or prefixes), or a peer sent a key for a
	// connection that is not its own.
	ErrWrongPeer = errors.New("connection does not belong to the peer")
	// ErrVersionDisabled: the device the connection leaves through does
	// not accept the configured PSP version.
	ErrVersionDisabled = errors.New("PSP version not enabled on the device")
	// ErrPeerVersionDisabled: the peer's pspd says its PSP devices do not
	// accept the configured PSP version.
	ErrPeerVersionDisabled = errors.New("PSP version not enabled on the peer's devices")
	// ErrClearData: clear data in flight did not drain in time.
	ErrClearData = errors.New("clear data in flight")
	// ErrBusy: the connection is being upgraded or was upgraded.
	ErrBusy = errors.New("connection already upgraded or being upgraded")
)

const (
	// maxEarlyPerPeer bounds the keys one peer can have pspd hold for
	// upgrades the local application has not asked for yet.
	maxEarlyPerPeer = 64
	// drainPoll is how often an upgrade looks at the socket's queues
	// while it waits for clear data to drain.
	drainPoll = 10 * time.Millisecond
)

// keyBroker matches the keys peers send to local upgrades: it is the one
// record of upgrades in progress and of keys that came first.
type keyBroker struct {
	mu      sync.Mutex
	pending map[tuple]*waiter // one upgrade per live connection
	early   map[peerTuple]*early
	perPeer map[identity.PublicKey]int // early keys held per peer
}

type peerTuple struct {
	peer identity.PublicKey
	t    tuple
}

type waiter struct {
	peer identity.PublicKey
	key  chan wire.ExplicitKey
}

type early struct {
	key     wire.ExplicitKey
	expires time.Time
}

func newKeyBroker() *keyBroker {
	return &keyBroker{pending: map[tuple]*waiter{}, early: map[peerTuple]*early{}, perPeer: map[identity.PublicKey]int{}}
}

// wait registers an upgrade of t towards peer; a key the peer sent
// before is handed over at once.
func (b *keyBroker) wait(peer identity.PublicKey, t tuple) (*waiter, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.pending[t] != nil {
		return nil, fmt.Errorf("psp: connection %s is already being upgraded: %w", t, ErrBusy)
	}
	w := &waiter{peer: peer, key: make(chan wire.ExplicitKey, 1)}
	b.pending[t] = w
	pt := peerTuple{peer, t}
	if e := b.early[pt]; e != nil {
		b.forgetEarly(pt)
		w.key <- e.key // the upgrade owns it now, and wipes it
	}
	return w, nil
}

// done ends an upgrade and wipes a key that came too late.
func (b *keyBroker) done(t tuple, w *waiter) {
	b.mu.Lock()
	if b.pending[t] == w {
		delete(b.pending, t)
	}
	b.mu.Unlock()
	select {
	case k := <-w.key:
		k.Key.Wipe()
	default:
	}
}

// deliver hands a peer's key to the upgrade of the same connection, or
// holds it for KeyWait. It reports why a key was dropped (wiped).
func (b *keyBroker) deliver(peer identity.PublicKey, t tuple, k wire.ExplicitKey, hold time.Duration) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if w := b.pending[t]; w != nil {
		if w.peer != peer {
			k.Key.Wipe()
			return fmt.Errorf("connection %s is being upgraded towards another peer: %w", t, ErrWrongPeer)
		}
		select {
		case w.key <- k:
		default:
			k.Key.Wipe() // a second key for the same connection
			return fmt.Errorf("a second key for connection %s", t)
		}
		return nil
	}
	now := time.Now()
	for pt, e := range b.early {
		if now.After(e.expires) {
			b.dropEarly(pt)
		}
	}
	pt := peerTuple{peer, t}
	if b.early[pt] != nil {
		b.dropEarly(pt)
	} else if b.perPeer[peer] >= maxEarlyPerPeer {
		k.Key.Wipe()
		return fmt.Errorf("the peer already has %d keys waiting for connections not upgraded here", maxEarlyPerPeer)
	}
	b.early[pt] = &early{key: k, expires: now.Add(hold)}
	b.perPeer[peer]++
	return nil
}

// dropEarly wipes and forgets a held key; b.mu held.
func (b *keyBroker) dropEarly(pt peerTuple) {
	if e := b.early[pt]; e != nil {
		e.key.Key.Wipe()
		b.forgetEarly(pt)
	}
}

// forgetEarly forgets a held key without wiping it; b.mu held.
func (b *keyBroker) forgetEarly(pt peerTuple) {
	if b.early[pt] == nil {
		return
	}
	delete(b.early, pt)
	if b.perPeer[pt.peer]--; b.perPeer[pt.peer] <= 0 {
		delete(b.perPeer, pt.peer)
	}
}

// forget wipes the keys held from peer (nil: from every peer).
func (b *keyBroker) forget(peer *identity.PublicKey) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for pt := range b.early {
		if peer == nil || pt.peer == *peer {
			b.dropEarly(pt)
		}
	}
}

// peerAddrs is the one record of which remote addresses belong to which
// peer: its endpoint and its prefixes.
type peerAddrs struct {
	mu sync.Mutex
	m  map[identity.PublicKey][]netip.Prefix
}

func (p *peerAddrs) allows(peer identity.PublicKey, a netip.Addr) bool {
	a = a.Unmap()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, pf := range p.m[peer] {
		if pf.Contains(a) {
			return true
		}
	}
	return false
}

// PeersFor returns the peers whose endpoint or prefixes hold a, the
// remote address of a connection to upgrade without a named peer.
func (m *Manager) PeersFor(a netip.Addr) []identity.PublicKey {
	a = a.Unmap()
	m.peers.mu.Lock()
	defer m.peers.mu.Unlock()
	var out []identity.PublicKey
	for peer, set := range m.peers.m {
		if slices.ContainsFunc(set, func(pf netip.Prefix) bool { return pf.Contains(a) }) {
			out = append(out, peer)
		}
	}
	return out
}

// SetPeer tells the manager which remote addresses belong to peer: its
// endpoint's and those in prefixes. Upgrade refuses a connection towards
// peer whose remote address is not among them, and PeerKey drops keys
// peer sends for such connections. Calling it again replaces the set.
func (m *Manager) SetPeer(peer identity.PublicKey, endpoint netip.Addr, prefixes []netip.Prefix) {
	var set []netip.Prefix
	if endpoint.IsValid() {
		e := endpoint.Unmap()
		set = append(set, netip.PrefixFrom(e, e.BitLen()))
	}
	for _, pf := range prefixes {
		if !pf.IsValid() {
			continue
		}
		if pf.Addr().Is4In6() && pf.Bits() >= 96 {
			pf = netip.PrefixFrom(pf.Addr().Unmap(), pf.Bits()-96)
		}
		set = append(set, pf.Masked())
	}
	m.peers.mu.Lock()
	m.peers.m[peer] = set
	m.peers.mu.Unlock()
}

// RemovePeer forgets a peer's addresses and wipes the keys held from it.
func (m *Manager) RemovePeer(peer identity.PublicKey) {
	m.peers.mu.Lock()
	delete(m.peers.m, peer)
	m.peers.mu.Unlock()
	m.keys.forget(&peer)
}

// PeerVersions is what the peer's pspd says its PSP devices accept (its
// Hello).
type PeerVersions struct {
	// Known is false when it did not say (a pspd from before the Hello
	// said it); then only the peer's own checks and its kernel's refuse a
	// version its devices do not take.
	Known   bool
	Enabled genl.Versions
}

// Result is a completed upgrade.
type Result struct {
	Device       uint32
	Version      genl.Version
	RxSPI, TxSPI uint32
}

// Upgrade binds PSP to a connected TCP socket towards peer, following the
// safe upgrade protocol (see the package doc). The caller keeps sock.
// pv is what the peer's pspd said its devices accept: an upgrade with a
// version they do not is refused before the socket is touched, as one
// with a version the local device does not accept is.
//
// Errors before rx-assoc leave the socket untouched and say so. A failure
// after rx-assoc leaves the socket with a receive key the kernel cannot
// take back, and the peer may already send under PSP: the error says so,
// and the connection should be closed.
func (m *Manager) Upgrade(ctx context.Context, sock *os.File, peer identity.PublicKey, pv PeerVersions, send func(context.Context, wire.ExplicitKey) error) (Result, error) {
	var touched bool
	r, err := m.upgrade(ctx, sock, peer, pv, send, &touched)
	switch {
	case err == nil:
		m.counts.upgradesOK.Add(1)
	case touched:
		m.counts.upgradesFailed.Add(1)
	default:
		m.counts.upgradesRefused.Add(1)
	}
	return r, err
}

func (m *Manager) upgrade(ctx context.Context, sock *os.File, peer identity.PublicKey, pv PeerVersions, send func(context.Context, wire.ExplicitKey) error, touched *bool) (Result, error) {
	si, err := inspect(sock)
	if err != nil {
		return Result{}, fmt.Errorf("psp: %w (the socket was not touched)", err)
	}
	t := si.t
	if si.state != tcpEstablished || !t.remote.IsValid() {
		return Result{}, fmt.Errorf("psp: the socket is %s, not an established TCP connection: hand over a connected socket (the socket was not touched): %w", tcpStateName(si.state), ErrNotEstablished)
	}
	if !m.peers.allows(peer, t.remote.Addr()) {
		return Result{}, fmt.Errorf("psp: connection %s: %s is neither the peer's endpoint nor in its prefixes; name the peer this connection goes to (the socket was not touched): %w", t, t.remote.Addr(), ErrWrongPeer)
	}
	// The peer's devices would drop what this socket sends under a
	// version they do not accept; the kernel here cannot know, and after
	// rx-assoc the socket could not go back.
	if pv.Known && !pv.Enabled.Has(m.version) {
		return Result{}, fmt.Errorf("psp: connection %s: this host upgrades with %v (suite %v), but the peer's PSP devices accept %v: enable %v on them (the peer's pspd does so for its suite) or set the same suite on both (the socket was not touched): %w",
			t, m.version, m.cfg.Suite, pv.Enabled, m.version, ErrPeerVersionDisabled)
	}
	if err := m.checkDevice(t); err != nil {
		return Result{}, err
	}
	if m.conns.has(si.cookie) {
		return Result{}, fmt.Errorf("psp: connection %s was upgraded already: %w", t, ErrBusy)
	}
	w, err := m.keys.wait(peer, t)
	if err != nil {
		return Result{}, err
	}
	defer m.keys.done(t, w)

	// Clear data this side sent must reach the peer before the peer's
	// tx-assoc, after which the peer drops clear data (and retransmits
	// of it stay clear): wait for it to be acknowledged before the key
	// that lets the peer install its transmit key goes out.
	deadline := time.Now().Add(m.cfg.DrainWait)
	if q, err := m.drain(ctx, sock, deadline, func(q sockQueues) bool { return q.outq == 0 }); err != nil {
		return Result{}, fmt.Errorf("psp: connection %s: %w (the socket was not touched)", t, err)
	} else if q.outq > 0 {
		return Result{}, fmt.Errorf("psp: connection %s: %d bytes this application sent are still unacknowledged after %v: the peer's application must read what was sent before the upgrade, and neither side may write once it asks for the upgrade; retry (the socket was not touched): %w",
			t, q.outq, m.cfg.DrainWait, ErrClearData)
	}

	rx, err := m.c.RxAssoc(sock, m.version, 0)
	if err != nil {
		return Result{}, fmt.Errorf("psp: rx-assoc on %s: %w (the socket was not touched)", t, err)
	}
	*touched = true
	defer rx.Key.Wipe()
	afterRx := " (the socket has a PSP receive key now and cannot go back; close it)"
	if q, err := queues(sock); err != nil {
		return Result{}, fmt.Errorf("psp: connection %s: %w%s", t, err, afterRx)
	} else if q.outq > 0 {
		return Result{}, fmt.Errorf("psp: connection %s: the application wrote %d bytes during the upgrade: it must not write until the upgrade returns%s: %w", t, q.outq, afterRx, ErrClearData)
	}
	mine := wire.ExplicitKey{Suite: m.cfg.Suite, SPI: kdf.SPI(rx.Key.SPI), Key: rx.Key.Key, Local: t.local, Remote: t.remote}
	if err := send(ctx, mine); err != nil {
		return Result{}, fmt.Errorf("psp: send the receive key to the peer: %w%s", err, afterRx)
	}
	var theirs wire.ExplicitKey
	kctx, cancel := context.WithTimeout(ctx, m.cfg.KeyWait)
	defer cancel()
	select {
	case theirs = <-w.key:
	case <-kctx.Done():
		return Result{}, fmt.Errorf("psp: the peer's pspd sent no key for %s within %s: did the application at the other end upgrade its socket?%s", t, m.cfg.KeyWait, afterRx)
	}
	defer theirs.Key.Wipe()
	if theirs.Suite != m.cfg.Suite {
		return Result{}, fmt.Errorf("psp: the peer uses %s, this host %s (set the same suite on both)%s", theirs.Suite, m.cfg.Suite, afterRx)
	}
	if theirs.Key.Equal(rx.Key.Key) {
		// Sending with our own receive key would let anyone reflect
		// this socket's packets back to it.
		return Result{}, fmt.Errorf("psp: the peer sent this socket's own receive key as its key for %s; refused%s: %w", t, afterRx, ErrWrongPeer)
	}

	// The kernel refuses the transmit key while clear data the peer sent
	// before its upgrade is unread ("incompatible segments"); the
	// application's reader drains it meanwhile. Clear data this side
	// writes now would be sent after the peer's tx-assoc and dropped.
	deadline = time.Now().Add(m.cfg.DrainWait)
	var last sockQueues
	for {
		q, err := queues(sock)
		if err != nil {
			return Result{}, fmt.Errorf("psp: connection %s: %w%s", t, err, afterRx)
		}
		last = q
		if q.outq == 0 {
			err = m.c.TxAssoc(sock, m.version, rx.DevID, genl.AssocKey{SPI: genl.SPI(theirs.SPI), Key: theirs.Key})
			if err == nil {
				break
			}
			if !errors.Is(err, genl.ErrIncompatibleSegment) {
				return Result{}, fmt.Errorf("psp: tx-assoc on %s: %w%s", t, err, afterRx)
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			if last.outq > 0 {
				return Result{}, fmt.Errorf("psp: connection %s: %d bytes written during the upgrade are unacknowledged after %v: the application must not write until the upgrade returns%s: %w", t, last.outq, m.cfg.DrainWait, afterRx, ErrClearData)
			}
			return Result{}, fmt.Errorf("psp: connection %s: clear data the peer sent before its upgrade is still unread after %v (%d bytes queued): the application must keep reading while the upgrade runs, or agree with the peer that neither side writes until both upgrades are done%s: %w", t, m.cfg.DrainWait, last.inq, afterRx, ErrClearData)
		}
		select {
		case <-ctx.Done():
		case <-time.After(drainPoll):
		}
	}
	m.conns.add(&conn{cookie: si.cookie, t: t, peer: peer, dev: rx.DevID})
	m.log.Info("psp: connection upgraded", "local", t.local, "remote", t.remote, "dev", rx.DevID, "rx_spi", rx.Key.SPI, "tx_spi", theirs.SPI)
	return Result{Device: rx.DevID, Version: m.version, RxSPI: uint32(rx.Key.SPI), TxSPI: uint32(theirs.SPI)}, nil
}

// drain polls the socket's queues until ok or the deadline.
func (m *Manager) drain(ctx context.Context, sock *os.File, deadline time.Time, ok func(sockQueues) bool) (sockQueues, error) {
	for {
		q, err := queues(sock)
		if err != nil || ok(q) || time.Now().After(deadline) {
			return q, err
		}
		select {
		case <-ctx.Done():
			return q, ctx.Err()
		case <-time.After(drainPoll):
		}
	}
}

// checkDevice refuses, before the socket is touched, a connection whose
// route leaves through a PSP device that does not accept the configured
// version.
func (m *Manager) checkDevice(t tuple) error {
	ifindex, err := m.routeIfindex(t)
	if err != nil {
		return fmt.Errorf("psp: connection %s: route lookup: %w (the socket was not touched)", t, err)
	}
	devs, err := m.c.Devices()
	if err != nil {
		return fmt.Errorf("psp: %w (the socket was not touched)", err)
	}
	unknown := false
	self := m.selfNSID()
	for _, d := range devs {
		ifs := localIfindexes(d, self)
		if len(ifs) == 0 {
			unknown = true // the kernel did not say; it checks at rx-assoc
			continue
		}
		if !slices.Contains(ifs, uint32(ifindex)) {
			continue
		}
		if !d.Enabled.Has(m.version) {
			owner := "enable it (pspd enables it at start; somebody disabled it)"
			if d.ByAssociation {
				owner = "the pspd of the device's own network namespace must enable it"
			}
			return fmt.Errorf("psp: connection %s leaves through PSP device %d, which accepts %v but not %v: %s (the socket was not touched): %w",
				t, d.ID, d.Enabled, m.version, owner, ErrVersionDisabled)
		}
		return nil
	}
	if unknown {
		return nil
	}
	return fmt.Errorf("psp: connection %s leaves through interface %d, which has no PSP device: it cannot be upgraded (the socket was not touched): %w", t, ifindex, genl.ErrNoDevice)
}

// localIfindexes are the interfaces of this namespace whose sockets use
// device d: its main netdev (unless this namespace sees d only by
// association, when ifindex names a netdev elsewhere) and the netdevs of
// this namespace associated with it (dev-assoc): listed with nsid -1 in
// an associated namespace, with self (the namespace's id in itself) in
// the device's own.
func localIfindexes(d genl.Device, self int32) []uint32 {
	var out []uint32
	if !d.ByAssociation && d.Ifindex != 0 {
		out = append(out, d.Ifindex)
	}
	for _, a := range d.AssocList {
		if a.NSID == -1 || !d.ByAssociation && self >= 0 && a.NSID == self {
			out = append(out, a.Ifindex)
		}
	}
	return out
}

// routeIfindex is the interface the kernel routes t through.
func (m *Manager) routeIfindex(t tuple) (int, error) {
	h, err := routeHandle(m.cfg.NetNS)
	if err != nil {
		return 0, err
	}
	defer h.Close()
	rs, err := h.RouteGet(t.remote.Addr().AsSlice())
	if err != nil {
		return 0, err
	}
	if len(rs) == 0 {
		return 0, errors.New("no route")
	}
	return rs[0].LinkIndex, nil
}

// PeerKey takes a key the peer's pspd sent for one of its connections to
// this host. It goes to the local upgrade of the same connection, or
// waits for it for KeyWait. A key for a connection whose address is not
// the peer's is dropped.
func (m *Manager) PeerKey(peer identity.PublicKey, k wire.ExplicitKey) {
	t := tuple{local: k.Remote, remote: k.Local} // the peer's view, reversed
	if !m.peers.allows(peer, t.remote.Addr()) {
		k.Key.Wipe()
		m.log.Warn("psp: a peer sent a key for a connection that is not its own; dropped", "from", peer.Fingerprint(), "local", t.local, "remote", t.remote)
		return
	}
	if err := m.keys.deliver(peer, t, k, m.cfg.KeyWait); err != nil {
		m.log.Warn("psp: peer key dropped", "from", peer.Fingerprint(), "local", t.local, "remote", t.remote, "err", err)
	}
}
