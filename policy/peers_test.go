package policy

import (
	"crypto/elliptic"
	"net/netip"
	"strings"
	"testing"

	"github.com/pspd/pspd/keyexchange/identity"
)

// TestWithPeers: discovered peers join the file's after the same checks
// the file's pass; the file wins a name, and each conflict leaves only the
// peer at fault out, with its reason.
func TestWithPeers(t *testing.T) {
	c, err := Parse("f.yaml", []byte("identity: /k\nlisten: 192.0.2.1\npeers:\n  - {name: b, endpoint: 192.0.2.2, public_key: "+pubkey(t, elliptic.P256())+", prefixes: [10.2.0.0/16]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	key := func() identity.PublicKey {
		k, err := identity.ParsePublicKey(pubkey(t, elliptic.P256()))
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	pf := netip.MustParsePrefix
	ep := netip.MustParseAddrPort
	bKey := c.Peers[0].PublicKey
	extra := []Peer{
		{Name: "b", Endpoint: ep("192.0.2.99:6082"), PublicKey: key(), Prefixes: []netip.Prefix{pf("10.99.0.0/16")}}, // the file's b wins
		{Name: "c", Endpoint: ep("192.0.2.3:6082"), PublicKey: key(), Prefixes: []netip.Prefix{pf("10.3.0.0/16")}},
		{Name: "d", Endpoint: ep("192.0.2.4:6082"), PublicKey: key(), Prefixes: []netip.Prefix{pf("10.3.1.0/24")}},   // overlaps c
		{Name: "e", Endpoint: ep("192.0.2.5:6082"), PublicKey: bKey, Prefixes: []netip.Prefix{pf("10.5.0.0/16")}},    // b's key
		{Name: "f", Endpoint: ep("10.2.0.9:6082"), PublicKey: key(), Prefixes: []netip.Prefix{pf("10.6.0.0/16")}},    // inside b's prefix
		{Name: "g", Endpoint: ep("192.0.2.1:6082"), PublicKey: key(), Prefixes: []netip.Prefix{pf("10.7.0.0/16")}},   // this host
		{Name: "h", Endpoint: ep("192.0.2.8:6082"), PublicKey: key(), Prefixes: []netip.Prefix{pf("0.0.0.0/0")}},     // default route
		{Name: "I", Endpoint: ep("192.0.2.9:6082"), PublicKey: key(), Prefixes: []netip.Prefix{pf("10.9.0.0/16")}},   // bad name
		{Name: "k", Endpoint: ep("192.0.2.3:6082"), PublicKey: key(), Prefixes: []netip.Prefix{pf("10.11.0.0/16")}},  // c's endpoint
		{Name: "j", Endpoint: ep("192.0.2.10:6082"), PublicKey: key(), Prefixes: []netip.Prefix{pf("10.10.0.0/16")}}, // fine
	}
	m, refused := c.WithPeers(extra)
	var names []string
	for _, p := range m.Peers {
		names = append(names, p.Name)
	}
	if got := strings.Join(names, ","); got != "b,c,j" {
		t.Errorf("merged peers %s, want b,c,j", got)
	}
	if m.Peers[0].Endpoint != c.Peers[0].Endpoint {
		t.Errorf("the file's b was replaced by the discovered one: %v", m.Peers[0].Endpoint)
	}
	if m.Peers[1].Suite != c.Suite || m.Peers[1].Backend != BackendAuto {
		t.Errorf("discovered peer c has suite %v backend %q, want the file's %v and auto", m.Peers[1].Suite, m.Peers[1].Backend, c.Suite)
	}
	want := []string{
		`peer "d": prefixes[0]: 10.3.1.0/24 overlaps 10.3.0.0/16 of peer "c"`,
		`peer "e": public_key: the same key is pinned for peer "b"`,
		`peer "b": prefixes[0]: 10.2.0.0/16 contains the endpoint 10.2.0.9 of peer "f"`,
		`peer "g": endpoint: 192.0.2.1:6082 is this host's listen address`,
		`peer "h": prefixes[0]: 0.0.0.0/0 is a default route`,
		`peer "I": name: "I" must be lower-case`,
		`peer "k": endpoint: 192.0.2.3:6082 is already the endpoint of peer "c"`,
	}
	if len(refused) != len(want) {
		t.Fatalf("refused %d peers, want %d: %v", len(refused), len(want), refused)
	}
	for i, w := range want {
		if !strings.Contains(refused[i].Error(), w) {
			t.Errorf("refusal %d = %q, want it to contain %q", i, refused[i], w)
		}
	}
	if len(c.Peers) != 1 {
		t.Errorf("WithPeers changed its receiver: %d peers", len(c.Peers))
	}
}
