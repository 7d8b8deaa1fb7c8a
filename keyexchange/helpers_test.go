package keyexchange

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/keyexchange/wire"
)

// recorder is an Installer that keeps what would be programmed into a data
// plane in memory. It is the backend seam, not a stand-in for the network:
// every test using it runs real QUIC and TLS over loopback.
type recorder struct {
	mu       sync.Mutex
	live     map[recKey]recorded // by peer and rx SPI
	history  []recorded          // every install, keys cloned
	removed  int
	failNext error
	// activated records, by rx SPI, which SAs carry outbound traffic;
	// onActivate, if set, runs before an SA is marked active.
	activated  map[recKey]bool
	onActivate func(SA)
	// hostWide refuses a receive SPI live for any peer, as the kernel's
	// XFRM does.
	hostWide bool
}

// recKey names an inbound SA: receive SPIs are unique per peer (the
// key exchange allocates them per session); a data plane that needs them
// unique per host has its own allocator.
type recKey struct {
	peer identity.PublicKey
	spi  kdf.SPI
}

func keyOf(sa *SA) recKey { return recKey{sa.Peer, sa.RxSPI} }

type recorded struct {
	sa             SA
	rxKey, txKey   secret.Key
	rxSalt, txSalt [kdf.SaltLen]byte
}

func newRecorder() *recorder {
	return &recorder{live: map[recKey]recorded{}, activated: map[recKey]bool{}}
}

func (r *recorder) Activate(_ context.Context, sa *SA) error {
	r.mu.Lock()
	hook := r.onActivate
	_, ok := r.live[keyOf(sa)]
	r.mu.Unlock()
	if !ok {
		return errors.New("recorder: activating an SA that is not installed")
	}
	if hook != nil {
		hook(sa.WithoutKeys())
	}
	r.mu.Lock()
	r.activated[keyOf(sa)] = true
	r.mu.Unlock()
	return nil
}

func (r *recorder) isActive(spi kdf.SPI) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for k, on := range r.activated {
		if k.spi == spi && on {
			return true
		}
	}
	return false
}

func (r *recorder) Install(_ context.Context, sa *SA) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.failNext; err != nil {
		r.failNext = nil
		return err
	}
	if _, dup := r.live[keyOf(sa)]; dup {
		return errors.New("recorder: rx SPI already installed")
	}
	if r.hostWide {
		for k := range r.live {
			if k.spi == sa.RxSPI {
				return errors.New("recorder: rx SPI already installed for another peer (the kernel keys inbound SAs by local address and SPI)")
			}
		}
	}
	rec := recorded{sa: sa.WithoutKeys(), rxKey: sa.RxKey.Clone(), txKey: sa.TxKey.Clone(), rxSalt: sa.RxSalt, txSalt: sa.TxSalt}
	r.live[keyOf(sa)] = rec
	r.history = append(r.history, rec)
	return nil
}

func (r *recorder) Remove(_ context.Context, sa *SA) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.live[keyOf(sa)]; !ok {
		return errors.New("recorder: removing an SA that is not installed")
	}
	delete(r.live, keyOf(sa))
	delete(r.activated, keyOf(sa))
	r.removed++
	return nil
}

func (r *recorder) failOnce(err error) {
	r.mu.Lock()
	r.failNext = err
	r.mu.Unlock()
}

func (r *recorder) liveCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.live)
}

func (r *recorder) removedCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.removed
}

func (r *recorder) isLive(spi kdf.SPI) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for k := range r.live {
		if k.spi == spi {
			return true
		}
	}
	return false
}

func (r *recorder) find(gen uint32) (recorded, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i := len(r.history) - 1; i >= 0; i-- {
		if r.history[i].sa.Generation == gen {
			return r.history[i], true
		}
	}
	return recorded{}, false
}

func (r *recorder) keys() []secret.Key {
	r.mu.Lock()
	defer r.mu.Unlock()
	var ks []secret.Key
	for _, h := range r.history {
		ks = append(ks, h.rxKey, h.txKey)
	}
	return ks
}

// syncBuffer collects log output from many goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) Bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return bytes.Clone(s.b.Bytes())
}

// orderedIdentities returns an initiator and a responder identity.
func orderedIdentities(t testing.TB) (ini, resp *identity.Identity) {
	t.Helper()
	a, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	b, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	if identity.Compare(a.Public(), b.Public()) > 0 {
		a, b = b, a
	}
	return a, b
}

type node struct {
	ep   *Endpoint
	inst *recorder
	logs *syncBuffer
}

func newNode(t testing.TB, id *identity.Identity, mod func(*Config)) *node {
	t.Helper()
	n := &node{inst: newRecorder(), logs: &syncBuffer{}}
	cfg := Config{
		Identity:           id,
		ListenAddr:         "127.0.0.1:0",
		Installers:         map[wire.Backend]Installer{wire.BackendXFRM: n.inst, wire.BackendUserspace: n.inst},
		Logger:             slog.New(slog.NewJSONHandler(n.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		NegotiationTimeout: 2 * time.Second,
		IdleTimeout:        5 * time.Second,
		KeepAlive:          time.Second,
	}
	if mod != nil {
		mod(&cfg)
	}
	ep, err := NewEndpoint(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ep.Close() })
	n.ep = ep
	return n
}

func peerCfg(other *node) PeerConfig {
	return PeerConfig{
		Key: other.ep.Public(), Addr: other.ep.Addr(), Backend: wire.BackendXFRM, Suite: kdf.AESGCM256,
		BackoffMin: 20 * time.Millisecond, BackoffMax: 200 * time.Millisecond, Grace: time.Hour,
	}
}

// pair brings up two nodes that pin each other.
func pair(t testing.TB, mod func(*Config), pmod func(*PeerConfig)) (ini, resp *node, pi, pr *Peer) {
	t.Helper()
	a, b := orderedIdentities(t)
	ini, resp = newNode(t, a, mod), newNode(t, b, mod)
	ci, cr := peerCfg(resp), peerCfg(ini)
	if pmod != nil {
		pmod(&ci)
		pmod(&cr)
	}
	var err error
	if pr, err = resp.ep.AddPeer(cr); err != nil {
		t.Fatal(err)
	}
	if pi, err = ini.ep.AddPeer(ci); err != nil {
		t.Fatal(err)
	}
	return ini, resp, pi, pr
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
