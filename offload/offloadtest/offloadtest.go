// Package offloadtest provides a fake offload.Backend that keeps in memory
// what a data plane would program, and checks the contract while doing so:
// SAs only for peers it holds, inbound before outbound, no transmit key
// installed twice for a peer, fail-closed state that outlives Close for
// peers that require encryption.
//
// It is the seam for the daemon's and the key exchange's tests, which run
// real QUIC, TLS and local API sockets around it; the data planes
// themselves are tested against real kernels in their own packages.
package offloadtest

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/offload"
)

// Kernel is the state a fake backend leaves behind when it stops: the
// fail-closed state of peers (by name). A backend made over the same Kernel
// sees it, as a restarted pspd sees the real kernel's.
type Kernel struct {
	mu         sync.Mutex
	failClosed map[string]bool
}

// NewKernel returns an empty Kernel.
func NewKernel() *Kernel { return &Kernel{failClosed: map[string]bool{}} }

// FailClosed lists the peers whose traffic the fake kernel refuses, sorted.
func (k *Kernel) FailClosed() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Sorted(maps.Keys(k.failClosed))
}

func (k *Kernel) set(name string, on bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if on {
		k.failClosed[name] = true
	} else {
		delete(k.failClosed, name)
	}
}

// Backend is a fake offload.Backend.
type Backend struct {
	kind   assoc.Backend
	kernel *Kernel
	rekey  chan identity.PublicKey

	mu     sync.Mutex
	peers  map[identity.PublicKey]offload.PeerSpec
	live   map[saKey]*installed
	txSeen map[identity.PublicKey]map[[32]byte]bool
	keys   []secret.Key
	drops  map[string]uint64
	calls  []string
	closed bool
}

type saKey struct {
	peer identity.PublicKey
	spi  assoc.SPI
}

type installed struct {
	sa     assoc.SA // without keys
	active bool
}

var _ offload.Backend = (*Backend)(nil)

// New returns a fake backend of kind k over kernel (nil: a fresh one).
func New(k assoc.Backend, kernel *Kernel) *Backend {
	if kernel == nil {
		kernel = NewKernel()
	}
	return &Backend{kind: k, kernel: kernel, rekey: make(chan identity.PublicKey, 16),
		peers: map[identity.PublicKey]offload.PeerSpec{}, live: map[saKey]*installed{},
		txSeen: map[identity.PublicKey]map[[32]byte]bool{}, drops: map[string]uint64{}}
}

// Kind implements offload.Backend.
func (b *Backend) Kind() assoc.Backend { return b.kind }

// Kernel is the state this backend leaves behind.
func (b *Backend) Kernel() *Kernel { return b.kernel }

func (b *Backend) call(format string, args ...any) {
	b.calls = append(b.calls, fmt.Sprintf(format, args...))
}

// Calls lists the contract calls made so far, in order ("AddPeer a",
// "Install a 0x00000100", ...).
func (b *Backend) Calls() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.calls)
}

// AddPeer implements offload.Backend.
func (b *Backend) AddPeer(_ context.Context, p offload.PeerSpec) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.peers[p.Key]; ok {
		return fmt.Errorf("offloadtest: peer %s added twice", p.Name)
	}
	b.call("AddPeer %s", p.Name)
	b.peers[p.Key] = p
	b.kernel.set(p.Name, p.RequireEncryption)
	return nil
}

// UpdatePeer implements offload.Backend.
func (b *Backend) UpdatePeer(_ context.Context, p offload.PeerSpec) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.peers[p.Key]; !ok {
		return fmt.Errorf("offloadtest: update of peer %s that was never added", p.Name)
	}
	b.call("UpdatePeer %s", p.Name)
	b.peers[p.Key] = p
	b.kernel.set(p.Name, p.RequireEncryption)
	return nil
}

// RemovePeer implements offload.Backend: everything of the peer goes.
func (b *Backend) RemovePeer(_ context.Context, key identity.PublicKey) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	p, ok := b.peers[key]
	if !ok {
		return nil
	}
	b.call("RemovePeer %s", p.Name)
	delete(b.peers, key)
	for k := range b.live {
		if k.peer == key {
			delete(b.live, k)
		}
	}
	b.kernel.set(p.Name, false)
	return nil
}

// Peer returns the spec the backend holds for key.
func (b *Backend) Peer(key identity.PublicKey) (offload.PeerSpec, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	p, ok := b.peers[key]
	return p, ok
}

// Holds reports whether the backend holds a peer of that name.
func (b *Backend) Holds(name string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, p := range b.peers {
		if p.Name == name {
			return true
		}
	}
	return false
}

// Install implements offload.Backend.
func (b *Backend) Install(_ context.Context, sa *assoc.SA) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	p, ok := b.peers[sa.Peer]
	if !ok {
		return fmt.Errorf("offloadtest: install for peer %s that was never added", sa.Peer.Fingerprint())
	}
	k := saKey{sa.Peer, sa.RxSPI}
	if b.live[k] != nil {
		return fmt.Errorf("offloadtest: peer %s: rx SPI %s already installed", p.Name, sa.RxSPI)
	}
	b.call("Install %s %s", p.Name, sa.RxSPI)
	b.live[k] = &installed{sa: sa.WithoutKeys()}
	b.keys = append(b.keys, sa.RxKey.Clone(), sa.TxKey.Clone())
	return nil
}

// Activate implements offload.Backend. It refuses a transmit key this
// backend was given before for the peer: sending under it again would
// repeat nonces.
func (b *Backend) Activate(_ context.Context, sa *assoc.SA) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	in := b.live[saKey{sa.Peer, sa.RxSPI}]
	if in == nil {
		return fmt.Errorf("offloadtest: activate of rx SPI %s that is not installed", sa.RxSPI)
	}
	if in.active {
		return nil
	}
	fp := sha256.Sum256(append(fmt.Appendf(nil, "%d|", sa.TxSPI), sa.TxKey.Bytes()...))
	seen := b.txSeen[sa.Peer]
	if seen == nil {
		seen = map[[32]byte]bool{}
		b.txSeen[sa.Peer] = seen
	}
	if seen[fp] {
		return fmt.Errorf("offloadtest: peer %s: transmit key of SPI %s installed before", b.peers[sa.Peer].Name, sa.TxSPI)
	}
	seen[fp] = true
	b.call("Activate %s %s", b.peers[sa.Peer].Name, sa.TxSPI)
	in.active = true
	return nil
}

// Remove implements offload.Backend.
func (b *Backend) Remove(_ context.Context, sa *assoc.SA) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	k := saKey{sa.Peer, sa.RxSPI}
	if b.live[k] == nil {
		return nil
	}
	b.call("Remove %s %s", b.peers[sa.Peer].Name, sa.RxSPI)
	delete(b.live, k)
	return nil
}

// Live lists the installed SAs (without keys).
func (b *Backend) Live() []assoc.SA {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []assoc.SA
	for _, in := range b.live {
		out = append(out, in.sa)
	}
	return out
}

// Keys returns clones of every key the backend was given, for tests that
// look for key bytes where they must not be.
func (b *Backend) Keys() []secret.Key {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.keys)
}

// Traffic implements offload.Backend: the fake counts nothing, so it
// reports zero counters for every live SA.
func (b *Backend) Traffic(sa *assoc.SA) (offload.Traffic, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return offload.Traffic{}, b.live[saKey{sa.Peer, sa.RxSPI}] != nil
}

// SetDrops sets what Drops reports.
func (b *Backend) SetDrops(d map[string]uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.drops = maps.Clone(d)
}

// Drops implements offload.Backend.
func (b *Backend) Drops() map[string]uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return maps.Clone(b.drops)
}

// WantRekey makes the backend ask for a rekey of the peer, as a data plane
// does when a key reaches its budget.
func (b *Backend) WantRekey(key identity.PublicKey) { b.rekey <- key }

// RekeyWanted implements offload.Backend.
func (b *Backend) RekeyWanted() <-chan identity.PublicKey { return b.rekey }

// Close implements offload.Backend: the SAs go; peers that require
// encryption keep their fail-closed state in the Kernel.
func (b *Backend) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return errors.New("offloadtest: closed twice")
	}
	b.closed = true
	b.call("Close")
	b.live = map[saKey]*installed{}
	for _, p := range b.peers {
		b.kernel.set(p.Name, p.RequireEncryption)
	}
	return nil
}

// Closed reports whether Close was called.
func (b *Backend) Closed() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.closed
}
