package psp

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pspd/pspd/genl"
	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/keyexchange/wire"
)

// These tests drive the matching of peer keys to local upgrades and the
// connection table without a kernel (a Manager with no genl client, and a
// fake list of open sockets, fakeLive); the VM tests in vm_test.go run the
// same code against kernel PSP and sock_diag.

func testManager() *Manager { return newManager(Config{KeyWait: time.Minute}) }

func peerKey(b byte, local, remote string) wire.ExplicitKey {
	return wire.ExplicitKey{Suite: kdf.AESGCM128, SPI: 0x1234, Key: secret.New(bytes.Repeat([]byte{b}, 16)),
		Local: netip.MustParseAddrPort(local), Remote: netip.MustParseAddrPort(remote)}
}

func wiped(k secret.Key) bool { return bytes.Equal(k.Bytes(), make([]byte, k.Len())) }

func newPeer(t *testing.T) identity.PublicKey {
	t.Helper()
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return id.Public()
}

func TestPeerKeyMatching(t *testing.T) {
	p1, p2 := newPeer(t), newPeer(t)
	m := testManager()
	m.SetPeer(p1, netip.MustParseAddr("10.0.0.2"), nil)
	m.SetPeer(p2, netip.MustParseAddr("10.0.0.3"), []netip.Prefix{netip.MustParsePrefix("10.0.5.0/24")})
	// Our connection 10.0.0.1:5000 -> 10.0.0.2:443 as the peer sees it.
	mine := tuple{local: netip.MustParseAddrPort("10.0.0.1:5000"), remote: netip.MustParseAddrPort("10.0.0.2:443")}
	early := func(p identity.PublicKey, t tuple) *early { return m.keys.early[peerTuple{p, t}] }

	// A key before the local upgrade waits; a newer one replaces it.
	k1 := peerKey(1, "10.0.0.2:443", "10.0.0.1:5000")
	m.PeerKey(p1, k1)
	k2 := peerKey(2, "10.0.0.2:443", "10.0.0.1:5000")
	m.PeerKey(p1, k2)
	if e := early(p1, mine); e == nil || !bytes.Equal(e.key.Key.Bytes(), bytes.Repeat([]byte{2}, 16)) || !wiped(k1.Key) {
		t.Fatalf("early keys: %v; the replaced one wiped: %v", m.keys.early, wiped(k1.Key))
	}

	// Another pinned peer cannot replace it, nor hold a key for a
	// connection whose remote address is not its own.
	forged := peerKey(9, "10.0.0.2:443", "10.0.0.1:5000")
	m.PeerKey(p2, forged)
	if e := early(p1, mine); e == nil || !bytes.Equal(e.key.Key.Bytes(), bytes.Repeat([]byte{2}, 16)) {
		t.Fatal("another peer's key replaced p1's early key")
	}
	if early(p2, mine) != nil || !wiped(forged.Key) {
		t.Fatal("a key for a connection to another peer's address was kept")
	}

	// A waiting upgrade gets the key of its peer, for its connection only.
	other := tuple{local: netip.MustParseAddrPort("10.0.0.1:5001"), remote: mine.remote}
	w, err := m.keys.wait(p1, other)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.keys.wait(p1, other); err == nil {
		t.Fatal("two upgrades of one connection at once")
	}
	right := peerKey(4, "10.0.0.2:443", "10.0.0.1:5001")
	m.PeerKey(p1, right)
	if got := <-w.key; !bytes.Equal(got.Key.Bytes(), bytes.Repeat([]byte{4}, 16)) {
		t.Fatal("the upgrade did not get its peer's key intact")
	}
	m.keys.done(other, w)

	// The early key goes, intact, to the upgrade that asks for it later.
	w, err = m.keys.wait(p1, mine)
	if err != nil {
		t.Fatal(err)
	}
	if got := <-w.key; !bytes.Equal(got.Key.Bytes(), bytes.Repeat([]byte{2}, 16)) || early(p1, mine) != nil {
		t.Fatalf("the early key did not go to the upgrade intact: %x", got.Key.Bytes())
	}
	m.keys.done(mine, w)

	// Keys nobody asked for expire, and are wiped when they do.
	k5 := peerKey(5, "10.0.0.2:443", "10.0.0.1:6000")
	m.PeerKey(p1, k5)
	for _, e := range m.keys.early {
		e.expires = time.Now().Add(-time.Second)
	}
	m.PeerKey(p1, peerKey(6, "10.0.0.2:443", "10.0.0.1:6001"))
	if len(m.keys.early) != 1 || !wiped(k5.Key) {
		t.Errorf("expired keys kept or not wiped: %d held", len(m.keys.early))
	}
}

// TestEarlyKeysPerPeerCap: one peer filling the table of keys held for
// upgrades that did not happen cannot keep another peer's keys out.
func TestEarlyKeysPerPeerCap(t *testing.T) {
	p1, p2 := newPeer(t), newPeer(t)
	m := testManager()
	m.SetPeer(p1, netip.MustParseAddr("10.0.0.2"), nil)
	m.SetPeer(p2, netip.MustParseAddr("10.0.0.3"), nil)
	var over []wire.ExplicitKey
	for i := range 2000 {
		k := peerKey(7, "10.0.0.2:443", netip.AddrPortFrom(netip.MustParseAddr("10.0.1.1"), uint16(i+1)).String())
		m.PeerKey(p1, k)
		if i >= maxEarlyPerPeer {
			over = append(over, k)
		}
	}
	if n := m.keys.perPeer[p1]; n != maxEarlyPerPeer || len(m.keys.early) != maxEarlyPerPeer {
		t.Errorf("p1 holds %d early keys (table %d), limit %d", n, len(m.keys.early), maxEarlyPerPeer)
	}
	for _, k := range over {
		if !wiped(k.Key) {
			t.Fatal("a key refused for the cap was not wiped")
		}
	}
	m.PeerKey(p2, peerKey(8, "10.0.0.3:443", "10.0.0.1:7000"))
	if m.keys.perPeer[p2] != 1 {
		t.Error("p2's key was refused because p1 filled the table")
	}
	// Removing a peer wipes what it left.
	held := m.keys.early[peerTuple{p2, tuple{netip.MustParseAddrPort("10.0.0.1:7000"), netip.MustParseAddrPort("10.0.0.3:443")}}]
	m.RemovePeer(p2)
	if held == nil || !wiped(held.key.Key) || m.keys.perPeer[p2] != 0 {
		t.Error("RemovePeer left p2's keys")
	}
	m.PeerKey(p2, peerKey(8, "10.0.0.3:443", "10.0.0.1:7001"))
	if m.keys.perPeer[p2] != 0 {
		t.Error("a removed peer's key was held")
	}
}

func TestSetPeerAddresses(t *testing.T) {
	p, q := newPeer(t), newPeer(t)
	m := testManager()
	m.SetPeer(p, netip.MustParseAddr("192.0.2.7"), []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16"), netip.MustParsePrefix("2001:db8::/64"), netip.MustParsePrefix("::ffff:10.9.0.0/112")})
	for addr, want := range map[string]bool{
		"192.0.2.7": true, "::ffff:192.0.2.7": true, "192.0.2.8": false,
		"10.1.200.3": true, "10.2.0.1": false, "2001:db8::5": true, "2001:db8:1::5": false, "10.9.3.4": true,
	} {
		if got := m.peers.allows(p, netip.MustParseAddr(addr)); got != want {
			t.Errorf("peer allows %s: %v, want %v", addr, got, want)
		}
		if m.peers.allows(q, netip.MustParseAddr(addr)) {
			t.Errorf("a peer the manager was not told about allows %s", addr)
		}
	}
	m.SetPeer(p, netip.MustParseAddr("192.0.2.9"), nil)
	if m.peers.allows(p, netip.MustParseAddr("10.1.0.1")) || !m.peers.allows(p, netip.MustParseAddr("192.0.2.9")) {
		t.Error("SetPeer did not replace the set")
	}
}

// TestPeersFor: peer=auto upgrades pick the peer whose addresses hold
// the connection's remote address. An address no peer holds gives none,
// and one that two peers' prefixes hold gives both, which the daemon
// refuses as ambiguous rather than guess.
func TestPeersFor(t *testing.T) {
	p, q := newPeer(t), newPeer(t)
	m := testManager()
	m.SetPeer(p, netip.MustParseAddr("192.0.2.7"), []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")})
	m.SetPeer(q, netip.MustParseAddr("192.0.2.8"), []netip.Prefix{netip.MustParsePrefix("10.1.2.0/24")})
	for addr, want := range map[string][]identity.PublicKey{
		"192.0.2.7": {p}, "::ffff:192.0.2.8": {q}, "10.1.9.9": {p}, "10.1.2.3": {p, q}, "10.2.0.1": nil,
	} {
		got := m.PeersFor(netip.MustParseAddr(addr))
		if len(got) != len(want) {
			t.Errorf("peers for %s: %d, want %d", addr, len(got), len(want))
			continue
		}
		for _, w := range want {
			if !slices.Contains(got, w) {
				t.Errorf("peers for %s: %v lacks %v", addr, got, w.Fingerprint())
			}
		}
	}
	m.RemovePeer(q)
	if got := m.PeersFor(netip.MustParseAddr("10.1.2.3")); len(got) != 1 || got[0] != p {
		t.Errorf("after q was removed, peers for 10.1.2.3: %v", got)
	}
}

// fakeLive is a fake of sock_diag's list of open sockets.
type fakeLive map[uint64]struct{}

func (f fakeLive) list() (map[uint64]struct{}, error) { return f, nil }

func addConn(m *Manager, cookie uint64, dev uint32, port uint16) {
	m.conns.add(&conn{cookie: cookie, dev: dev, t: tuple{netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), port), netip.MustParseAddrPort("10.0.0.2:443")}})
}

func drainEvents(m *Manager) []Event {
	var out []Event
	for {
		select {
		case ev := <-m.events:
			out = append(out, ev)
		default:
			return out
		}
	}
}

// TestRotationEventsLiveOnly: rotations report the open connections of
// the rotated device only; closed ones are swept first and never
// reported; the second rotation ends a connection's entry.
func TestRotationEventsLiveOnly(t *testing.T) {
	m := testManager()
	live := fakeLive{}
	m.live = live.list
	for i := range uint64(10) {
		addConn(m, 100+i, 1, uint16(5000+i))
		live[100+i] = struct{}{}
	}
	addConn(m, 200, 2, 6000)
	live[200] = struct{}{}
	for i := range uint64(5) {
		delete(live, 100+i) // closed by the application
	}
	m.rotated(1, 1)
	evs := drainEvents(m)
	if len(evs) != 6 || evs[0].Kind != "psp-rotated" {
		t.Fatalf("events after one rotation: %+v", evs)
	}
	for _, ev := range evs[1:] {
		if ev.Kind != "psp-stale-soon" || ev.Device != 1 || ev.Local.Port() < 5005 {
			t.Errorf("event %+v: want psp-stale-soon for an open connection of device 1", ev)
		}
	}
	if m.Connections() != 6 {
		t.Errorf("%d connections in the table, want 6", m.Connections())
	}
	m.rotated(1, 1)
	evs = drainEvents(m)
	if len(evs) != 6 || evs[1].Kind != "psp-stale" {
		t.Fatalf("events after the second rotation: %+v", evs)
	}
	if m.Connections() != 1 {
		t.Errorf("%d connections in the table after two rotations, want device 2's one", m.Connections())
	}
	if c := m.Counters(); c.StaleReported != 10 || c.Connections != 1 {
		t.Errorf("counters %+v, want 10 stale reports and 1 connection", c)
	}
}

// TestDeviceRemovalEvents: a device's removal reports every open
// connection through it as stale and forgets them.
func TestDeviceRemovalEvents(t *testing.T) {
	m := testManager()
	live := fakeLive{1: {}, 2: {}, 3: {}}
	m.live = live.list
	m.devs[7] = &devState{}
	addConn(m, 1, 7, 5001)
	addConn(m, 2, 7, 5002)
	addConn(m, 3, 8, 5003)
	m.deviceGone(7)
	evs := drainEvents(m)
	if len(evs) != 2 {
		t.Fatalf("events after the removal: %+v", evs)
	}
	for _, ev := range evs {
		if ev.Kind != "psp-stale" || ev.Device != 7 || !strings.Contains(ev.Detail, "removed") {
			t.Errorf("event %+v", ev)
		}
	}
	if m.Connections() != 1 || m.devs[7] != nil {
		t.Errorf("after the removal: %d connections, device state %v", m.Connections(), m.devs[7])
	}
}

// TestUpgradeRefusesPeerVersion: a peer whose pspd says its devices do
// not accept the configured version gets its connection refused before
// anything touches the socket (no device lookup, no rx-assoc, no key
// sent), with an error that names both sides' versions.
func TestUpgradeRefusesPeerVersion(t *testing.T) {
	m := newManager(Config{Suite: kdf.AESGCM128, KeyWait: time.Minute})
	peer := newPeer(t)
	m.SetPeer(peer, netip.MustParseAddr("127.0.0.1"), nil)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	f, err := c.(*net.TCPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, pv := range []PeerVersions{{Known: true, Enabled: genl.VersionsOf(genl.AESGCM256, genl.AESGMAC128)}, {Known: true}} {
		_, err = m.Upgrade(context.Background(), f, peer, pv, func(context.Context, wire.ExplicitKey) error {
			t.Error("a key was sent for a connection the peer's devices cannot take")
			return nil
		})
		if !errors.Is(err, ErrPeerVersionDisabled) {
			t.Fatalf("peer devices %v: %v, want ErrPeerVersionDisabled", pv.Enabled, err)
		}
		for _, want := range []string{"hdr0-aes-gcm-128", pv.Enabled.String(), "not touched"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not say %q", err, want)
			}
		}
	}
	if c := m.Counters(); c.UpgradesRefused != 2 || c.UpgradesFailed != 0 {
		t.Errorf("counters %+v, want two refused upgrades", c)
	}
}
