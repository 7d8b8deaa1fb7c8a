package keyexchange

import (
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pspd/pspd/keyexchange/identity"
)

// newIdentityAgainst generates an identity whose role towards peer is, or
// is not (flip), the one old has.
func newIdentityAgainst(t *testing.T, old, peer identity.PublicKey, flip bool) *identity.Identity {
	t.Helper()
	for {
		id, err := identity.Generate()
		if err != nil {
			t.Fatal(err)
		}
		if (identity.Compare(id.Public(), peer) != identity.Compare(old, peer)) == flip {
			return id
		}
	}
}

// alwaysInstalled samples r until stop and reports whether it ever held
// no SA for peer: a rotation must keep an SA installed throughout.
func alwaysInstalled(r *recorder, peer identity.PublicKey, stop <-chan struct{}) *atomic.Bool {
	gap := &atomic.Bool{}
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
			r.mu.Lock()
			n := 0
			for k := range r.live {
				if k.peer == peer {
					n++
				}
			}
			r.mu.Unlock()
			if n == 0 {
				gap.Store(true)
			}
		}
	}()
	return gap
}

// TestIdentityRotation rotates x's identity with two peers: y pins the new
// key before the switch, z only later. y's session moves at once, z's
// stays on the previous identity until z pins the new key; every SA
// stays installed throughout, and the peers keep naming x by the key they
// added it with. Both role orders: the new key may change the role.
func TestIdentityRotation(t *testing.T) {
	for _, flip := range []bool{false, true} {
		name := "role kept"
		if flip {
			name = "role changes"
		}
		t.Run(name, func(t *testing.T) { testIdentityRotation(t, flip) })
	}
}

func testIdentityRotation(t *testing.T, flip bool) {
	oldX, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	x := newNode(t, oldX, nil)
	x.ep.identityRetry = 100 * time.Millisecond
	y, z := newNode(t, mustIdentity(t), nil), newNode(t, mustIdentity(t), nil)
	add := func(a, b *node) *Peer {
		t.Helper()
		p, err := a.ep.AddPeer(peerCfg(b))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	xy, xz := add(x, y), add(x, z)
	yx, zx := add(y, x), add(z, x)
	ctx := ctxT(t, 30*time.Second)
	for _, p := range []*Peer{xy, xz, yx, zx} {
		if _, err := p.WaitGeneration(ctx, 1); err != nil {
			t.Fatal(err)
		}
	}
	roleBefore := yx.Role()
	newX := newIdentityAgainst(t, oldX.Public(), y.ep.Public(), flip)

	stop := make(chan struct{})
	defer close(stop)
	gapY := alwaysInstalled(y.inst, oldX.Public(), stop)
	gapZ := alwaysInstalled(z.inst, oldX.Public(), stop)

	if err := yx.SetKeys(oldX.Public(), newX.Public()); err != nil {
		t.Fatal(err)
	}
	if err := x.ep.Rotate(newX); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "y's session with x under x's new identity", func() bool {
		s := yx.Session()
		return s != nil && s.Peer() == newX.Public() && yx.Status().Up
	})
	if _, err := yx.Wait(ctx, func(sa SA) bool { return sa.Generation >= 2 }); err != nil {
		t.Fatal(err)
	}
	if got := yx.Role() != roleBefore; got != flip {
		t.Errorf("role changed: %v, want %v", got, flip)
	}
	// z does not pin the new key: it keeps its session under the old one.
	waitUntil(t, "x showing z its previous identity", xz.prevOnly.Load)
	if s := zx.Session(); s == nil || s.Peer() != oldX.Public() || !zx.Status().Up {
		t.Fatalf("z's session with x: %v, want up under the old key", s)
	}
	if got := x.ep.NotMoved(); !slices.Equal(got, []string{z.ep.Public().Fingerprint()}) {
		t.Fatalf("NotMoved = %v, want z alone", got)
	}

	if err := zx.SetKeys(oldX.Public(), newX.Public()); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "z's session with x under x's new identity", func() bool {
		s := zx.Session()
		return s != nil && s.Peer() == newX.Public() && zx.Status().Up
	})
	waitUntil(t, "every peer moved", func() bool { return len(x.ep.NotMoved()) == 0 })
	x.ep.DropPrevious()
	for _, p := range []*Peer{yx, zx} {
		if err := p.SetKeys(newX.Public()); err != nil {
			t.Fatal(err)
		}
	}
	if y.ep.peer(oldX.Public()) != nil {
		t.Error("y still pins x's old key after SetKeys")
	}
	time.Sleep(200 * time.Millisecond) // a session that wrongly ended would show
	for _, p := range []*Peer{yx, zx} {
		if s := p.Session(); s == nil || s.Peer() != newX.Public() || !p.Status().Up {
			t.Errorf("%v: session %v, want up under the new key", p.Key().Fingerprint(), s)
		}
	}
	if gapY.Load() || gapZ.Load() {
		t.Errorf("a peer had no SA installed for x during the rotation (y: %v, z: %v)", gapY.Load(), gapZ.Load())
	}
	for _, r := range []*recorder{y.inst, z.inst} {
		r.mu.Lock()
		for k := range r.live {
			if k.peer != oldX.Public() {
				t.Errorf("an SA names x by %s, not by the key it was added with", k.peer.Fingerprint())
			}
		}
		r.mu.Unlock()
	}
}

// TestSetKeysRefusesOthersKeys: a pinned peer's new keys (from its fleet
// record, say) cannot take another peer's key or this host's own.
func TestSetKeysRefusesOthersKeys(t *testing.T) {
	a, b, c := newNode(t, mustIdentity(t), nil), newNode(t, mustIdentity(t), nil), newNode(t, mustIdentity(t), nil)
	ab, err := a.ep.AddPeer(peerCfg(b))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.ep.AddPeer(peerCfg(c)); err != nil {
		t.Fatal(err)
	}
	if err := ab.SetKeys(b.ep.Public(), c.ep.Public()); err == nil {
		t.Error("SetKeys took another peer's key")
	}
	if err := ab.SetKeys(b.ep.Public(), a.ep.Public()); err == nil {
		t.Error("SetKeys took this host's own key")
	}
	if p := a.ep.peer(c.ep.Public()); p == ab {
		t.Error("c's key maps to b after a refused SetKeys")
	}
	cfg := peerCfg(b)
	cfg.Key = mustIdentity(t).Public()
	cfg.Pins = []identity.PublicKey{cfg.Key, c.ep.Public()}
	if _, err := a.ep.AddPeer(cfg); err == nil {
		t.Error("AddPeer took another peer's key as Next")
	}
	if err := a.ep.Rotate(b.ep.cur.id); err == nil {
		t.Error("Rotate took a pinned peer's identity")
	}
}

func mustIdentity(t *testing.T) *identity.Identity {
	t.Helper()
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// waitUntil waits up to 10s for cond, naming what it waited for.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not reached in 10s: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestSetKeysEndsUnpinnedSession: a session authenticated by a key that
// is no longer pinned ends, and a new one under no pinned key cannot come
// up (an operator revoking a peer's old key).
func TestSetKeysEndsUnpinnedSession(t *testing.T) {
	_, _, pi, _ := pair(t, nil, nil)
	ctx := ctxT(t, 10*time.Second)
	if _, err := pi.WaitGeneration(ctx, 1); err != nil {
		t.Fatal(err)
	}
	s := pi.Session()
	other := mustIdentity(t).Public()
	if err := pi.SetKeys(other); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.Context().Done():
	case <-ctx.Done():
		t.Fatal("the session under the unpinned key is still running")
	}
	time.Sleep(500 * time.Millisecond)
	if s := pi.Session(); s != nil {
		t.Fatalf("a session under %s came up although only %s is pinned", s.Peer().Fingerprint(), other.Fingerprint())
	}
	if pi.Status().Up {
		t.Fatal("the peer is up with no pinned key presented")
	}
}
