package keyexchange

import (
	"bytes"
	"errors"
	"fmt"
	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/wire"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pspd/pspd/internal/logscan"
	"github.com/pspd/pspd/keyexchange/kdf"
)

// checkPair verifies that both sides installed matching keys for gen: the
// initiator's transmit key is the responder's receive key and vice versa,
// and the two directions differ.
func checkPair(t *testing.T, ini, resp *node, gen uint32) (recorded, recorded) {
	t.Helper()
	a, ok1 := ini.inst.find(gen)
	b, ok2 := resp.inst.find(gen)
	if !ok1 || !ok2 {
		t.Fatalf("generation %d installed: initiator %v responder %v", gen, ok1, ok2)
	}
	if a.sa.TxSPI != b.sa.RxSPI || a.sa.RxSPI != b.sa.TxSPI {
		t.Fatalf("SPIs do not pair up: %s / %s", &a.sa, &b.sa)
	}
	if a.sa.RxSPI.Role() != kdf.Initiator || b.sa.RxSPI.Role() != kdf.Responder {
		t.Fatalf("receive SPIs carry the wrong role bit: %s / %s", a.sa.RxSPI, b.sa.RxSPI)
	}
	if !a.txKey.Equal(b.rxKey) || !a.rxKey.Equal(b.txKey) {
		t.Fatal("the two sides derived different keys for one direction")
	}
	if a.rxKey.Equal(a.txKey) {
		t.Fatal("both directions share a key")
	}
	if a.rxKey.Len() != 32 {
		t.Fatalf("AES-GCM-256 key is %d bytes", a.rxKey.Len())
	}
	return a, b
}

func TestBringUpNegotiateRekey(t *testing.T) {
	ini, resp, pi, pr := pair(t, nil, nil)
	ctx := ctxT(t, 10*time.Second)
	for _, p := range []*Peer{pi, pr} {
		if _, err := p.WaitGeneration(ctx, 1); err != nil {
			t.Fatal(err)
		}
	}
	if pi.Role() != kdf.Initiator || pr.Role() != kdf.Responder {
		t.Fatalf("roles %s/%s", pi.Role(), pr.Role())
	}
	g1, _ := checkPair(t, ini, resp, 1)

	sa, err := pi.Rekey(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if sa.Generation != 2 || !sa.RxKey.IsZero() {
		t.Fatalf("rekey returned %s (keys must not be exposed)", &sa)
	}
	if _, err := pr.WaitGeneration(ctx, 2); err != nil {
		t.Fatal(err)
	}
	g2, _ := checkPair(t, ini, resp, 2)
	if g2.rxKey.Equal(g1.rxKey) || g2.sa.RxSPI == g1.sa.RxSPI {
		t.Fatal("rekey reused an SPI or key")
	}
	// Make-before-break: generation 1 stays installed for the grace period.
	if ini.inst.liveCount() != 2 || resp.inst.liveCount() != 2 {
		t.Fatalf("live SAs %d/%d, want both generations", ini.inst.liveCount(), resp.inst.liveCount())
	}

	// The responder asks; the initiator negotiates.
	sa, err = pr.Rekey(ctx)
	if err != nil || sa.Generation != 3 {
		t.Fatalf("responder rekey: %v %v", &sa, err)
	}
	checkPair(t, ini, resp, 3)

	// Closing removes everything on both sides (the peer learns via Delete
	// for the current generation; the rest goes with its own Close).
	pi.Close()
	pr.Close()
	if ini.inst.liveCount() != 0 || resp.inst.liveCount() != 0 {
		t.Fatalf("SAs left after close: %d/%d", ini.inst.liveCount(), resp.inst.liveCount())
	}
}

func TestGraceRemovesOldGeneration(t *testing.T) {
	ini, resp, pi, pr := pair(t, nil, func(c *PeerConfig) { c.Grace = 50 * time.Millisecond })
	ctx := ctxT(t, 10*time.Second)
	if _, err := pr.WaitGeneration(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := pi.Rekey(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := pr.WaitGeneration(ctx, 2); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return ini.inst.liveCount() == 1 && resp.inst.liveCount() == 1 })
}

func TestRekeyTimer(t *testing.T) {
	_, _, pi, pr := pair(t, nil, func(c *PeerConfig) { c.RekeyInterval = 100 * time.Millisecond })
	ctx := ctxT(t, 10*time.Second)
	for _, p := range []*Peer{pi, pr} {
		if _, err := p.WaitGeneration(ctx, 3); err != nil {
			t.Fatal(err)
		}
	}
}

func TestReconnectYieldsFreshKeys(t *testing.T) {
	ini, resp, pi, pr := pair(t, nil, nil)
	ctx := ctxT(t, 10*time.Second)
	if _, err := pr.WaitGeneration(ctx, 1); err != nil {
		t.Fatal(err)
	}
	first := pi.Session()
	first.Close(errors.New("test: drop the session"))
	if _, err := pr.WaitGeneration(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if pi.Session() == first {
		t.Fatal("no new session")
	}
	g1, _ := checkPair(t, ini, resp, 1)
	g2, _ := checkPair(t, ini, resp, 2)
	// The new session's allocator starts above the SPIs still installed,
	// and its fresh master keys give unrelated keys.
	if g2.sa.RxSPI.Counter() <= g1.sa.RxSPI.Counter() {
		t.Fatalf("SPI %s reused below live %s", g2.sa.RxSPI, g1.sa.RxSPI)
	}
	if g2.rxKey.Equal(g1.rxKey) || g2.txKey.Equal(g1.txKey) {
		t.Fatal("reconnect reused keys")
	}
}

// TestSessionMasterKeysFresh compares the master keys of two sessions
// directly: one SPI must give the same key on both ends of a session and a
// different key in the next session.
func TestSessionMasterKeysFresh(t *testing.T) {
	_, _, pi, pr := pair(t, nil, nil)
	ctx := ctxT(t, 10*time.Second)
	spi, _ := kdf.MakeSPI(0, kdf.Initiator, 77)
	probe := func() (a, b []byte) {
		if _, err := pr.Wait(ctx, func(SA) bool { return pr.Session() != nil && pi.Session() != nil }); err != nil {
			t.Fatal(err)
		}
		si, sr := pi.Session(), pr.Session()
		si.mu.Lock()
		ka, err1 := si.mk.Derive(spi, kdf.AESGCM256)
		si.mu.Unlock()
		sr.mu.Lock()
		kb, err2 := sr.mk.Derive(spi, kdf.AESGCM256)
		sr.mu.Unlock()
		if err1 != nil || err2 != nil {
			t.Fatal(err1, err2)
		}
		return ka.Bytes(), kb.Bytes()
	}
	a1, b1 := probe()
	if string(a1) != string(b1) {
		t.Fatal("the two ends of a session have different master keys")
	}
	first := pi.Session()
	first.Close(errors.New("test: reconnect"))
	if _, err := pr.WaitGeneration(ctx, 2); err != nil {
		t.Fatal(err)
	}
	a2, b2 := probe()
	if string(a2) != string(b2) {
		t.Fatal("the two ends of the second session disagree")
	}
	if string(a1) == string(a2) {
		t.Fatal("reconnect reused the master keys")
	}
	first.mu.Lock()
	wiped := first.mk == nil
	first.mu.Unlock()
	if !wiped {
		t.Fatal("closed session kept its master keys")
	}
}

func TestAddPeerRejectsOwnKey(t *testing.T) {
	a, _ := orderedIdentities(t)
	n := newNode(t, a, nil)
	_, err := n.ep.AddPeer(PeerConfig{Key: a.Public(), Backend: 2, Suite: kdf.AESGCM128})
	if err == nil || !strings.Contains(err.Error(), a.Public().Fingerprint()) {
		t.Fatalf("own key as peer: %v", err)
	}
}

func TestNoKeysInLogs(t *testing.T) {
	ini, resp, pi, pr := pair(t, nil, func(c *PeerConfig) { c.Grace = 10 * time.Millisecond })
	ctx := ctxT(t, 10*time.Second)
	if _, err := pr.WaitGeneration(ctx, 1); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, err := pi.Rekey(ctx); err != nil {
			t.Fatal(err)
		}
	}
	pi.Session().Close(errors.New("test: reconnect"))
	if _, err := pr.WaitGeneration(ctx, 5); err != nil {
		t.Fatal(err)
	}
	pi.Close()
	pr.Close()
	keys := append(ini.inst.keys(), resp.inst.keys()...)
	if len(keys) < 20 {
		t.Fatalf("only %d keys recorded", len(keys))
	}
	logs := append(ini.logs.Bytes(), resp.logs.Bytes()...)
	if !strings.Contains(string(logs), "SA confirmed") {
		t.Fatalf("logs captured nothing: %s", logs)
	}
	logscan.AssertNoKeys(t, logs, keys...)
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 5s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestActivateOnlyAfterPeerInstalled holds the make-before-break order: a
// side starts sending under a generation only once the other side can
// receive it, on bring-up and on rekeys started by either side.
func TestActivateOnlyAfterPeerInstalled(t *testing.T) {
	ini, resp, pi, pr := pair(t, nil, nil)
	var mu sync.Mutex
	var violations []string
	checkOther := func(self string, other *recorder) func(SA) {
		return func(sa SA) {
			if !other.isLive(sa.TxSPI) {
				mu.Lock()
				violations = append(violations, fmt.Sprintf("%s activated generation %d (tx %v) before the peer installed it", self, sa.Generation, sa.TxSPI))
				mu.Unlock()
			}
		}
	}
	ini.inst.mu.Lock()
	ini.inst.onActivate = checkOther("initiator", resp.inst)
	ini.inst.mu.Unlock()
	resp.inst.mu.Lock()
	resp.inst.onActivate = checkOther("responder", ini.inst)
	resp.inst.mu.Unlock()

	ctx := ctxT(t, 10*time.Second)
	for _, p := range []*Peer{pi, pr} {
		if _, err := p.WaitGeneration(ctx, 1); err != nil {
			t.Fatal(err)
		}
	}
	for i, p := range []*Peer{pi, pr, pi} {
		if _, err := p.Rekey(ctx); err != nil {
			t.Fatalf("rekey %d: %v", i, err)
		}
	}
	if _, err := pr.WaitGeneration(ctx, 4); err != nil {
		t.Fatal(err)
	}
	for gen := uint32(1); gen <= 4; gen++ {
		gi, _ := ini.inst.find(gen)
		gr, _ := resp.inst.find(gen)
		waitFor(t, func() bool { return ini.inst.isActive(gi.sa.RxSPI) && resp.inst.isActive(gr.sa.RxSPI) })
	}
	mu.Lock()
	defer mu.Unlock()
	for _, v := range violations {
		t.Error(v)
	}
}

// TestExplicitKey carries a PSP receive key both ways on a real session:
// it arrives intact with its connection endpoints, the receiver owns (and
// here wipes) it, a host without a handler drops it without ending the
// session, and no log line holds the key.
func TestExplicitKey(t *testing.T) {
	type keyFrom struct {
		peer identity.PublicKey
		k    wire.ExplicitKey
	}
	got := make(chan keyFrom, 1)
	a, b := orderedIdentities(t)
	ini := newNode(t, a, nil)
	resp := newNode(t, b, func(c *Config) {
		c.ExplicitKeys = func(peer identity.PublicKey, k wire.ExplicitKey) { got <- keyFrom{peer, k} }
	})
	pr, err := resp.ep.AddPeer(peerCfg(ini))
	if err != nil {
		t.Fatal(err)
	}
	pi, err := ini.ep.AddPeer(peerCfg(resp))
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t, 10*time.Second)
	if _, err := pi.Wait(ctx, func(SA) bool { return true }); err != nil {
		t.Fatal(err)
	}
	raw := bytes.Repeat([]byte{0x5a, 0xc3}, 16)
	k := wire.ExplicitKey{Assoc: 7, Generation: 1, Suite: kdf.AESGCM256, SPI: 0x80001234, Key: secret.New(raw),
		Local: netip.MustParseAddrPort("192.0.2.1:40000"), Remote: netip.MustParseAddrPort("192.0.2.2:443")}
	if err := pi.SendExplicitKey(ctx, k); err != nil {
		t.Fatal(err)
	}
	select {
	case kf := <-got:
		r, from := kf.k, kf.peer
		if from != ini.ep.Public() || r.SPI != k.SPI || r.Local != k.Local || r.Remote != k.Remote || r.Suite != k.Suite || !r.Key.Equal(k.Key) {
			t.Errorf("received %v from %s, sent %v", r, from.Fingerprint(), k)
		}
		r.Key.Wipe()
	case <-ctx.Done():
		t.Fatal("the key did not arrive")
	}
	// The initiator has no handler: the key is dropped, the session stays.
	if err := pr.SendExplicitKey(ctx, k); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return bytes.Contains(ini.logs.Bytes(), []byte("dropped")) })
	if pi.Session() == nil || pr.Session() == nil {
		t.Error("an unexpected key ended the session")
	}
	for _, n := range []*node{ini, resp} {
		logscan.AssertNoKeys(t, n.logs.Bytes(), k.Key)
	}
	k.Key.Wipe()
}
