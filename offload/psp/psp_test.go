package psp

import (
	"bytes"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/keyexchange/wire"
)

// These tests drive the matching of peer keys to local upgrades without a
// kernel (a Manager with no genl client); TestVMUpgrade runs the same
// code against kernel PSP in the test VM.

func testManager() *Manager {
	return &Manager{cfg: Config{KeyWait: time.Minute}, log: slog.New(slog.DiscardHandler),
		pending: map[tuple]*waiter{}, early: map[tuple]*early{}, conns: map[tuple]*conn{}}
}

func peerKey(b byte, local, remote string) wire.ExplicitKey {
	return wire.ExplicitKey{Suite: kdf.AESGCM128, SPI: 0x1234, Key: secret.New(bytes.Repeat([]byte{b}, 16)),
		Local: netip.MustParseAddrPort(local), Remote: netip.MustParseAddrPort(remote)}
}

func wiped(k secret.Key) bool { return bytes.Equal(k.Bytes(), make([]byte, k.Len())) }

func TestPeerKeyMatching(t *testing.T) {
	p1, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	p2, _ := identity.Generate()
	m := testManager()
	// Our connection 10.0.0.1:5000 -> 10.0.0.2:443 as the peer sees it.
	mine := tuple{local: netip.MustParseAddrPort("10.0.0.1:5000"), remote: netip.MustParseAddrPort("10.0.0.2:443")}

	// A key before the local upgrade waits; a newer one replaces it.
	k1 := peerKey(1, "10.0.0.2:443", "10.0.0.1:5000")
	m.PeerKey(p1.Public(), k1)
	k2 := peerKey(2, "10.0.0.2:443", "10.0.0.1:5000")
	m.PeerKey(p1.Public(), k2)
	if e := m.early[mine]; e == nil || !e.key.Key.Equal(k2.Key) || !wiped(k1.Key) {
		t.Fatalf("early keys: %v; the replaced one wiped: %v", m.early, wiped(k1.Key))
	}

	// A waiting upgrade gets the key of its peer, for its connection only.
	w := &waiter{peer: p1.Public(), key: make(chan wire.ExplicitKey, 1)}
	other := tuple{local: netip.MustParseAddrPort("10.0.0.1:5001"), remote: mine.remote}
	m.pending[other] = w
	wrong := peerKey(3, "10.0.0.2:443", "10.0.0.1:5001")
	m.PeerKey(p2.Public(), wrong) // another peer claims our connection
	if len(w.key) != 0 || !wiped(wrong.Key) {
		t.Fatal("a key from the wrong peer reached the upgrade, or was kept")
	}
	right := peerKey(4, "10.0.0.2:443", "10.0.0.1:5001")
	m.PeerKey(p1.Public(), right)
	if got := <-w.key; !got.Key.Equal(right.Key) {
		t.Fatal("the upgrade did not get its peer's key")
	}

	// Keys nobody asked for expire, and are wiped when they do.
	m.early[mine].expires = time.Now().Add(-time.Second)
	m.PeerKey(p1.Public(), peerKey(5, "10.0.0.2:443", "10.0.0.1:6000"))
	if m.early[mine] != nil || !wiped(k2.Key) {
		t.Error("an expired key was kept or not wiped")
	}

	// The number of keys held for upgrades that did not happen is bounded.
	for i := range maxEarly + 10 {
		m.PeerKey(p1.Public(), peerKey(6, "10.0.0.2:443", netip.AddrPortFrom(netip.MustParseAddr("10.0.1.1"), uint16(i+1)).String()))
	}
	if len(m.early) > maxEarly {
		t.Errorf("%d early keys held, limit %d", len(m.early), maxEarly)
	}
}
