package policy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
)

func pubkey(t *testing.T, c elliptic.Curve) string {
	t.Helper()
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(der)
}

func TestParseGood(t *testing.T) {
	kb, kc := pubkey(t, elliptic.P256()), pubkey(t, elliptic.P256())
	src := `identity: /etc/pspd/id.pem
listen: 192.0.2.1
backend: userspace
suite: aes-gcm-128
rekey_interval: 2m
packet_budget: 1_000_000
require_encryption: false
metrics: off
peers:
  - name: b
    endpoint: 192.0.2.2:7000
    public_key: ` + kb + `
    prefixes: [10.1.0.0/16, "2001:db8:1::/64"]
  - name: c
    endpoint: "[2001:db8::3]"
    public_key: ` + kc + `
    prefixes: [192.0.2.3]
    backend: xfrm
    suite: aes-gcm-256
`
	c, err := Parse("pspd.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen.String() != "192.0.2.1:6082" || c.Backend != BackendUserspace || c.Suite != kdf.AESGCM128 ||
		c.RekeyInterval != 2*time.Minute || c.PacketBudget != 1_000_000 || c.RequireEncryption || c.Metrics != "" ||
		c.Offload != OffloadAuto || c.Socket != DefaultSocket {
		t.Fatalf("globals wrong: %+v", c)
	}
	b, _ := c.Peer("b")
	if b.Endpoint.String() != "192.0.2.2:7000" || len(b.Prefixes) != 2 || b.Suite != kdf.AESGCM128 || b.Backend != BackendAuto {
		t.Fatalf("peer b wrong: %+v", b)
	}
	cc, _ := c.Peer("c")
	if cc.Endpoint.String() != "[2001:db8::3]:6082" || cc.Prefixes[0].String() != "192.0.2.3/32" || cc.Backend != BackendXFRM || cc.Suite != kdf.AESGCM256 {
		t.Fatalf("peer c wrong: %+v", cc)
	}
}

func TestUserspace(t *testing.T) {
	c, err := Parse("x", []byte("identity: /k\nuserspace:\n  interface: tun7\n  address: 10.200.0.1/24\n  port: 7000\n  framing: psp\n  io: udp\n"))
	if err != nil {
		t.Fatal(err)
	}
	u := c.Userspace
	if u.Interface != "tun7" || u.Address.String() != "10.200.0.1/24" || u.Port != 7000 || u.Framing != FramingPSP || u.IO != IOUDP {
		t.Fatalf("userspace %+v", u)
	}
	d, _ := Parse("x", []byte("identity: /k\n"))
	if d.Userspace.Interface != DefaultInterface || d.Userspace.Port != DefaultDataPort || d.Userspace.Framing != FramingGeneve || d.Userspace.IO != IOAuto {
		t.Fatalf("userspace defaults %+v", d.Userspace)
	}
	if _, err := Reload(d, c); err == nil {
		t.Fatal("a userspace change was accepted on reload")
	}
}

func TestDefaults(t *testing.T) {
	c, err := Parse("x", []byte("identity: /k.pem\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !c.RequireEncryption || c.Suite != DefaultSuite || c.RekeyInterval != DefaultRekeyInterval || c.Metrics != DefaultMetrics || c.KeyExchange != KeyExchangeHybrid {
		t.Fatalf("defaults wrong: %+v", c)
	}
	c, err = Parse("x", []byte("identity: /k.pem\nmetrics: unix:/run/pspd/metrics.sock\nkey_exchange: classic\n"))
	if err != nil || c.Metrics != "unix:/run/pspd/metrics.sock" || c.KeyExchange != KeyExchangeClassic {
		t.Fatalf("metrics %q key_exchange %q (%v)", c.Metrics, c.KeyExchange, err)
	}
}

// TestNATTraversal: auto and port 4500 by default; a peer overrides the
// global choice.
func TestNATTraversal(t *testing.T) {
	c, err := Parse("x", []byte("identity: /k.pem\n"))
	if err != nil || c.NATTraversal != NATAuto || c.EncapPort != DefaultEncapPort {
		t.Fatalf("defaults: nat_traversal %q encap_port %d (%v)", c.NATTraversal, c.EncapPort, err)
	}
	key := pubkey(t, elliptic.P256())
	c, err = Parse("x", []byte("identity: /k.pem\nnat_traversal: off\nencap_port: 4501\npeers:\n  - {name: b, endpoint: 192.0.2.2, public_key: "+key+", nat_traversal: force}\n  - {name: c, endpoint: 192.0.2.3, public_key: "+pubkey(t, elliptic.P256())+"}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.EncapPort != 4501 || c.Peers[0].NATTraversal.OrDefault(c.NATTraversal) != NATForce || c.Peers[1].NATTraversal.OrDefault(c.NATTraversal) != NATOff {
		t.Fatalf("encap_port %d, peer b %q, peer c %q", c.EncapPort, c.Peers[0].NATTraversal, c.Peers[1].NATTraversal)
	}
}

// Every refusal names the file, the line and the field.
func TestParseRefuses(t *testing.T) {
	good := pubkey(t, elliptic.P256())
	p384 := pubkey(t, elliptic.P384())
	for _, tc := range []struct {
		name, src, want string
	}{
		{"empty", ``, "f.yaml:1: empty configuration"},
		{"no identity", "listen: 192.0.2.1\n", "f.yaml:1: identity: required"},
		{"unknown field", "identity: /k\nrekey: 5m\n", "f.yaml:2: rekey: unknown field"},
		{"twice", "identity: /k\nidentity: /j\n", "f.yaml:2: identity: set twice"},
		{"bad backend", "identity: /k\nbackend: ipsec\n", `f.yaml:2: backend: "ipsec" is not one of auto, psp, xfrm, userspace`},
		{"bad offload", "identity: /k\noffload: packet\n", `f.yaml:2: offload: "packet" is not one of`},
		{"bad suite", "identity: /k\nsuite: chacha\n", `f.yaml:2: suite: kdf: unknown suite "chacha"`},
		{"bad duration", "identity: /k\nrekey_interval: soon\n", `f.yaml:2: rekey_interval: "soon" is not a duration`},
		{"short rekey", "identity: /k\nrekey_interval: 1s\n", "f.yaml:2: rekey_interval: 1s is outside"},
		{"rotation below rekey", "identity: /k\nrekey_interval: 2h\npsp_rotation_interval: 1h\n", "f.yaml:3: psp_rotation_interval: 1h must be longer than rekey_interval 2h (line 2)"},
		{"budget string", "identity: /k\npacket_budget: lots\n", "f.yaml:2: packet_budget: expected an integer"},
		{"budget leading zero", "identity: /k\npacket_budget: 0100000\n", "f.yaml:2: packet_budget: 0100000 has a leading zero, which YAML may read as octal; write 100000 or 0o100000"},
		{"port leading zero", "identity: /k\nuserspace: {port: 07000}\n", "f.yaml:2: userspace.port: 07000 has a leading zero"},
		{"budget small", "identity: /k\npacket_budget: 5\n", "f.yaml:2: packet_budget: 5 is outside 1024..549755813888 (2^39)"},
		{"bool", "identity: /k\nrequire_encryption: maybe\n", "f.yaml:2: require_encryption: expected true or false"},
		{"relative socket", "identity: /k\nsocket: pspd.sock\n", "f.yaml:2: socket: \"pspd.sock\" must be an absolute path"},
		{"relative metrics socket", "identity: /k\nmetrics: unix:m.sock\n", "f.yaml:2: metrics: \"unix:m.sock\": the unix socket path must be absolute"},
		{"bad nat traversal", "identity: /k\nnat_traversal: always\n", `f.yaml:2: nat_traversal: "always" is not one of auto, force, off`},
		{"bad encap port", "identity: /k\nencap_port: 70000\n", "f.yaml:2: encap_port: 70000 is outside 1..65535"},
		{"bad peer nat traversal", "identity: /k\npeers:\n  - name: b\n    endpoint: 192.0.2.2\n    public_key: " + good + "\n    nat_traversal: yes\n", `f.yaml:6: peers[0].nat_traversal: "yes" is not one of auto, force, off`},
		{"bad key exchange", "identity: /k\nkey_exchange: quantum\n", `f.yaml:2: key_exchange: "quantum" is not one of hybrid, classic`},
		{"hostname listen", "identity: /k\nlisten: example:1\n", "f.yaml:2: listen: \"example:1\" is not an IP address"},
		{"peers not list", "identity: /k\npeers: {}\n", "f.yaml:2: peers: expected a list"},
		{"peer missing key", "identity: /k\npeers:\n  - name: b\n    endpoint: 192.0.2.2\n", "f.yaml:3: peers[0].public_key: required"},
		{"peer bad key", "identity: /k\npeers:\n  - name: b\n    endpoint: 192.0.2.2\n    public_key: AAAA\n", "f.yaml:5: peers[0].public_key: identity: not a public key (want the line printed by pspd pubkey)"},
		{"peer p384", "identity: /k\npeers:\n  - name: b\n    endpoint: 192.0.2.2\n    public_key: " + p384 + "\n", "f.yaml:5: peers[0].public_key: identity: ECDSA P-384 key; pspd pins P-256 keys (want the line printed by pspd pubkey)"},
		{"peer bad name", "identity: /k\npeers:\n  - name: B_1\n", `f.yaml:3: peers[0].name: "B_1" must be lower-case`},
		{"peer unknown", "identity: /k\npeers:\n  - name: b\n    key: x\n", "f.yaml:4: peers[0].key: unknown field"},
		{"host bits", "identity: /k\npeers:\n  - name: b\n    prefixes: [10.0.0.1/8]\n", "f.yaml:4: peers[0].prefixes[0]: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?"},
		{"dup name", "identity: /k\npeers:\n  - {name: b, endpoint: 192.0.2.2, public_key: " + good + "}\n  - {name: b, endpoint: 192.0.2.3, public_key: " + pubkey(t, elliptic.P256()) + "}\n", `f.yaml:4: peers[1].name: "b" is already the name of another peer`},
		{"dup key", "identity: /k\npeers:\n  - {name: b, endpoint: 192.0.2.2, public_key: " + good + "}\n  - {name: c, endpoint: 192.0.2.3, public_key: " + good + "}\n", `f.yaml:4: peers[1].public_key: the same key is pinned for peer "b"`},
		{"dup next key", "identity: /k\npeers:\n  - {name: b, endpoint: 192.0.2.2, public_key: " + good + "}\n  - {name: c, endpoint: 192.0.2.3, public_key: " + pubkey(t, elliptic.P256()) + ",\n     next_public_key: " + good + "}\n", `f.yaml:5: peers[1].next_public_key: the same key is pinned for peer "b"`},
		{"next key twice", "identity: /k\npeers:\n  - {name: b, endpoint: 192.0.2.2, public_key: " + good + ", next_public_key: " + good + "}\n", `peers[0].next_public_key: is the same key as public_key`},
		{"overlap", "identity: /k\npeers:\n  - {name: b, endpoint: 192.0.2.2, public_key: " + good + ", prefixes: [10.0.0.0/8]}\n  - {name: c, endpoint: 192.0.2.3, public_key: " + pubkey(t, elliptic.P256()) + ", prefixes: [10.1.0.0/16]}\n", "f.yaml:4: peers[1].prefixes[0]: 10.1.0.0/16 overlaps 10.0.0.0/8 of peer \"b\""},
		{"yaml syntax", "identity: [\n", "f.yaml:2: YAML syntax: did not find expected node content"},
		{"userspace unknown", "identity: /k\nuserspace:\n  tun: x\n", "f.yaml:3: userspace.tun: unknown field"},
		{"userspace ifname", "identity: /k\nuserspace: {interface: this-name-is-too-long}\n", "userspace.interface: \"this-name-is-too-long\" is not a Linux interface name"},
		{"userspace address", "identity: /k\nuserspace: {address: 10.0.0.1}\n", "userspace.address: \"10.0.0.1\" is not an address with prefix length"},
		{"userspace port", "identity: /k\nuserspace: {port: 70000}\n", "f.yaml:2: userspace.port: 70000 is outside 1..65535"},
		{"userspace framing", "identity: /k\nuserspace: {framing: vxlan}\n", `userspace.framing: "vxlan" is not one of geneve, psp`},
		{"userspace io", "identity: /k\nuserspace: {io: dpdk}\n", `userspace.io: "dpdk" is not one of auto, af_xdp, udp`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("f.yaml", []byte(tc.src))
			if err == nil {
				t.Fatalf("accepted; want error containing %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not contain %q", err, tc.want)
			}
		})
	}
}

func TestFieldErrorUnwraps(t *testing.T) {
	_, err := Parse("f", []byte("identity: /k\nbackend: nope\n"))
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Line != 2 || fe.Field != "backend" {
		t.Fatalf("got %#v", err)
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "pspd.yaml")
	if err := os.WriteFile(p, []byte("identity: /k\nbogus: 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(p)
	if err == nil || !strings.Contains(err.Error(), p+":2: bogus: unknown field") {
		t.Fatalf("got %v", err)
	}
	if _, err := Load(filepath.Join(dir, "missing.yaml")); err == nil {
		t.Fatal("missing file accepted")
	}
}

func TestReload(t *testing.T) {
	kb, kc, kd := pubkey(t, elliptic.P256()), pubkey(t, elliptic.P256()), pubkey(t, elliptic.P256())
	cur, err := Parse("f", []byte("identity: /k\npeers:\n  - {name: b, endpoint: 192.0.2.2, public_key: "+kb+"}\n  - {name: c, endpoint: 192.0.2.3, public_key: "+kc+"}\n"))
	if err != nil {
		t.Fatal(err)
	}
	next, err := Parse("f", []byte("identity: /k\nrekey_interval: 1m\npeers:\n  - {name: b, endpoint: 192.0.2.2, public_key: "+kb+"}\n  - {name: c, endpoint: 192.0.2.9, public_key: "+kc+"}\n  - {name: d, endpoint: 192.0.2.4, public_key: "+kd+"}\n"))
	if err != nil {
		t.Fatal(err)
	}
	d, err := Reload(cur, next)
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Added) != 1 || d.Added[0].Name != "d" || len(d.Changed) != 1 || d.Changed[0].Name != "c" || len(d.Removed) != 0 || d.Settings.RekeyInterval != time.Minute {
		t.Fatalf("diff wrong: %+v", d)
	}
	back, err := Reload(next, cur)
	if err != nil || len(back.Removed) != 1 || back.Removed[0].Name != "d" {
		t.Fatalf("reverse diff wrong: %+v %v", back, err)
	}
	if same, _ := Reload(cur, cur); !same.Empty() {
		t.Fatal("identical configs differ")
	}

	moved, err := Parse("f", []byte("identity: /other\n"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Reload(cur, moved); err == nil || !strings.Contains(err.Error(), "f:1: identity: changed") || !strings.Contains(err.Error(), "nothing was applied") {
		t.Fatalf("identity change not refused whole: %v", err)
	}
}

// A prefix routed into a peer's tunnel must not carry the tunnel's own
// underlay packets: a peer whose endpoint (or this host's listen address,
// or another peer's endpoint) lies inside one of its prefixes never comes
// back once the route is in place.
func TestPrefixRefusesUnderlay(t *testing.T) {
	kb, kc := pubkey(t, elliptic.P256()), pubkey(t, elliptic.P256())
	peer := func(name, key, endpoint, prefixes, extra string) string {
		return "  - name: " + name + "\n    endpoint: " + endpoint + "\n    public_key: " + key + "\n    prefixes: " + prefixes + "\n" + extra
	}
	for _, tc := range []struct {
		name, src, want string
	}{
		{"own endpoint", "identity: /k\npeers:\n" + peer("b", kb, "192.0.2.2", "[192.0.2.0/24]", ""),
			`f.yaml:6: peers[0].prefixes[0]: 192.0.2.0/24 contains peer "b"'s endpoint 192.0.2.2`},
		{"own endpoint v4-mapped", "identity: /k\npeers:\n" + peer("b", kb, "\"[::ffff:192.0.2.2]\"", "[192.0.2.0/24]", ""),
			`f.yaml:6: peers[0].prefixes[0]: 192.0.2.0/24 contains peer "b"'s endpoint`},
		{"own endpoint zone", "identity: /k\npeers:\n" + peer("b", kb, "\"[fe80::2%eth0]\"", "[\"fe80::/64\"]", ""),
			`f.yaml:6: peers[0].prefixes[0]: fe80::/64 contains peer "b"'s endpoint`},
		{"default v4", "identity: /k\npeers:\n" + peer("b", kb, "192.0.2.2", "[10.0.0.0/8, 0.0.0.0/0]", ""),
			`f.yaml:6: peers[0].prefixes[1]: 0.0.0.0/0 is a default route`},
		{"default v6", "identity: /k\npeers:\n" + peer("b", kb, "192.0.2.2", "[\"::/0\"]", ""),
			`f.yaml:6: peers[0].prefixes[0]: ::/0 is a default route`},
		{"listen", "identity: /k\nlisten: 198.51.100.1\npeers:\n" + peer("b", kb, "192.0.2.2", "[198.51.100.0/24]", ""),
			`f.yaml:7: peers[0].prefixes[0]: 198.51.100.0/24 contains this host's listen address 198.51.100.1`},
		{"endpoint is listen", "identity: /k\nlisten: 192.0.2.1\npeers:\n" + peer("b", kb, "192.0.2.1", "[10.0.0.0/8]", ""),
			`f.yaml:5: peers[0].endpoint: 192.0.2.1:6082 is this host's listen address`},
		{"other peer's endpoint", "identity: /k\npeers:\n" + peer("b", kb, "192.0.2.2", "[198.51.100.0/24]", "") + peer("c", kc, "198.51.100.7", "[10.3.0.0/16]", ""),
			`f.yaml:6: peers[0].prefixes[0]: 198.51.100.0/24 contains the endpoint 198.51.100.7 of peer "c"`},
		{"transport plus tunnel", "identity: /k\npeers:\n" + peer("b", kb, "192.0.2.2", "[10.0.0.0/8, 192.0.2.2]", ""),
			`f.yaml:6: peers[0].prefixes[1]: 192.0.2.2/32 contains peer "b"'s endpoint 192.0.2.2`},
		{"transport on userspace", "identity: /k\npeers:\n" + peer("b", kb, "192.0.2.2", "[192.0.2.2]", "    backend: userspace\n"),
			`f.yaml:6: peers[0].prefixes[0]: 192.0.2.2/32 is peer "b"'s endpoint: the userspace backend`},
		{"transport on global userspace", "identity: /k\nbackend: userspace\npeers:\n" + peer("b", kb, "192.0.2.2", "[192.0.2.2]", ""),
			`f.yaml:7: peers[0].prefixes[0]: 192.0.2.2/32 is peer "b"'s endpoint: the userspace backend`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("f.yaml", []byte(tc.src))
			if err == nil {
				t.Fatalf("accepted; want error containing %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not contain %q", err, tc.want)
			}
		})
	}
	for _, tc := range []struct{ name, src string }{
		{"unspecified listen", "identity: /k\nlisten: 0.0.0.0\npeers:\n" + peer("b", kb, "192.0.2.2", "[10.0.0.0/8]", "")},
		{"xfrm transport mode", "identity: /k\nbackend: xfrm\npeers:\n" + peer("b", kb, "192.0.2.2", "[192.0.2.2]", "")},
		{"auto transport mode", "identity: /k\nlisten: 192.0.2.1\npeers:\n" + peer("b", kb, "192.0.2.2", "[192.0.2.2/32]", "")},
		{"second pspd on this address", "identity: /k\nlisten: 127.0.0.1:7000\npeers:\n" + peer("b", kb, "127.0.0.1:7001", "[10.0.0.0/8]", "")},
		{"neighbour prefix", "identity: /k\nlisten: 192.0.2.1\npeers:\n" + peer("b", kb, "192.0.2.2", "[192.0.2.128/25]", "")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Parse("f.yaml", []byte(tc.src)); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// Every number that ends up in a kernel limit or a timer is bounded, and
// no spelling of a number wraps around into an accepted value.
func TestNumericBounds(t *testing.T) {
	for _, tc := range []struct {
		name, src, want string
	}{
		{"budget zero", "identity: /k\npacket_budget: 0\n", "f.yaml:2: packet_budget: 0 is outside 1024..549755813888 (2^39)"},
		{"budget 2^63", "identity: /k\npacket_budget: 9223372036854775808\n", "f.yaml:2: packet_budget: 9223372036854775808 is outside 1024..549755813888 (2^39)"},
		{"budget 2*2^63", "identity: /k\npacket_budget: 18446744073709551616\n", "f.yaml:2: packet_budget: 18446744073709551616 is outside 1024..549755813888 (2^39)"},
		{"budget 2^64+1024", "identity: /k\npacket_budget: 18446744073709552640\n", "f.yaml:2: packet_budget: 18446744073709552640 is outside"},
		{"budget above max", "identity: /k\npacket_budget: 0x8000000001\n", "f.yaml:2: packet_budget: 0x8000000001 is outside 1024..549755813888 (2^39)"},
		{"budget negative", "identity: /k\npacket_budget: -1\n", "f.yaml:2: packet_budget: -1 is outside 1024..549755813888"},
		{"budget float", "identity: /k\npacket_budget: 1e30\n", "f.yaml:2: packet_budget: 1e30 is outside 1024..549755813888"},
		{"budget fraction", "identity: /k\npacket_budget: 4096.5\n", "f.yaml:2: packet_budget: 4096.5 is not an integer"},
		{"budget expression", "identity: /k\npacket_budget: 2147483648 * 2\n", `f.yaml:2: packet_budget: expected an integer in 1024..549755813888 (2^39), got "2147483648 * 2"`},
		{"budget small", "identity: /k\npacket_budget: 5\n", "f.yaml:2: packet_budget: 5 is outside 1024.."},
		{"rekey huge", "identity: /k\nrekey_interval: 9999999999h\n", `f.yaml:2: rekey_interval: "9999999999h" is outside 10s..24h`},
		{"rekey unit only", "identity: /k\nrekey_interval: h\n", `f.yaml:2: rekey_interval: "h" is not a duration in 10s..24h`},
		{"rekey huge sum", "identity: /k\nrekey_interval: 2562047h1000000h\n", `f.yaml:2: rekey_interval: "2562047h1000000h" is outside 10s..24h`},
		{"rekey negative", "identity: /k\nrekey_interval: -5m\n", "f.yaml:2: rekey_interval: -5m is outside 10s..24h"},
		{"rekey bare number", "identity: /k\nrekey_interval: 600\n", `f.yaml:2: rekey_interval: "600" is not a duration in 10s..24h (like 90s, 10m or 24h)`},
		{"rotation long", "identity: /k\npsp_rotation_interval: 721h\n", "f.yaml:2: psp_rotation_interval: 721h is outside 1m..720h"},
		{"listen port", "identity: /k\nlisten: 192.0.2.1:70000\n", `f.yaml:2: listen: port 70000 is outside 1..65535`},
		{"listen port zero", "identity: /k\nlisten: \"[::]:0\"\n", `f.yaml:2: listen: port 0 is outside 1..65535`},
		{"metrics port", "identity: /k\nmetrics: 127.0.0.1:99999\n", `f.yaml:2: metrics: port 99999 is outside 1..65535`},
		{"endpoint port", "identity: /k\npeers:\n  - name: b\n    endpoint: 192.0.2.2:65536\n", `f.yaml:4: peers[0].endpoint: port 65536 is outside 1..65535`},
		{"data port zero", "identity: /k\nuserspace: {port: 0}\n", "f.yaml:2: userspace.port: 0 is outside 1..65535"},
		{"data port big", "identity: /k\nuserspace: {port: 4294973378}\n", "f.yaml:2: userspace.port: 4294973378 is outside 1..65535"},
		{"data port negative", "identity: /k\nuserspace: {port: -6081}\n", "f.yaml:2: userspace.port: -6081 is outside 1..65535"},
		{"data port is listen port", "identity: /k\nlisten: 0.0.0.0:7000\nuserspace:\n  port: 7000\n", "f.yaml:4: userspace.port: 7000 is also the port of listen (line 2)"},
		{"listen port is data port", "identity: /k\nlisten: 0.0.0.0:6081\n", "f.yaml:2: listen: port 6081 is also the port of userspace.port (the default)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("f.yaml", []byte(tc.src))
			if err == nil {
				t.Fatalf("accepted; want error containing %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not contain %q", err, tc.want)
			}
		})
	}
	for _, tc := range []struct {
		src    string
		budget uint64
	}{
		{"identity: /k\npacket_budget: 549755813888\n", 1 << 39},
		{"identity: /k\npacket_budget: 1024\n", 1024},
		{"identity: /k\npacket_budget: 0x10000\n", 1 << 16},
		{"identity: /k\npacket_budget: 1_000_000\n", 1_000_000},
		{"identity: /k\npacket_budget: +4096\n", 4096},
	} {
		c, err := Parse("f.yaml", []byte(tc.src))
		if err != nil {
			t.Fatalf("%q: %v", tc.src, err)
		}
		if c.PacketBudget != tc.budget {
			t.Fatalf("%q: budget %d, want %d", tc.src, c.PacketBudget, tc.budget)
		}
		// The backends set the hard limit at twice the budget.
		if 2*c.PacketBudget < c.PacketBudget {
			t.Fatalf("%q: twice the budget wraps", tc.src)
		}
	}
	// A data port equal to the control port is fine when no peer can use
	// the userspace data plane.
	if _, err := Parse("f.yaml", []byte("identity: /k\nbackend: xfrm\nlisten: 0.0.0.0:6081\n")); err != nil {
		t.Fatal(err)
	}
}

// A check across fields names the line of the field the file sets, not
// line 1.
func TestCrossFieldLines(t *testing.T) {
	for _, tc := range []struct {
		name, src, want string
	}{
		{"rotation below default rekey", "identity: /k\nbackend: auto\nsuite: aes-gcm-128\nmetrics: off\npsp_rotation_interval: 5m\n",
			"f.yaml:5: psp_rotation_interval: 5m must be longer than rekey_interval 10m (the default)"},
		{"rekey above default rotation", "identity: /k\nmetrics: off\nrekey_interval: 24h\n",
			"f.yaml:3: rekey_interval: 24h must be shorter than psp_rotation_interval 24h (the default)"},
		{"both set", "identity: /k\npsp_rotation_interval: 20m\nmetrics: off\nrekey_interval: 30m\n",
			"f.yaml:2: psp_rotation_interval: 20m must be longer than rekey_interval 30m (line 4)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("f.yaml", []byte(tc.src))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
	c, err := Parse("f.yaml", []byte("identity: /k\nmetrics: off\npeers:\n  - name: b\n    endpoint: 192.0.2.2\n    public_key: "+
		pubkey(t, elliptic.P256())+"\n    prefixes:\n      - 10.0.0.0/16\n      - 10.9.0.0/16\n"))
	if err != nil {
		t.Fatal(err)
	}
	for field, line := range map[string]int{"identity": 1, "metrics": 2, "peers": 3, "peers[0]": 4, "peers[0].endpoint": 5, "peers[0].prefixes[1]": 9, "rekey_interval": 0} {
		if got := c.Line(field); got != line {
			t.Errorf("Line(%q) = %d, want %d", field, got, line)
		}
	}
}

// YAML syntax errors come in the same file:line: form as every other
// error, at the line of the problem.
func TestSyntaxErrorFormat(t *testing.T) {
	for _, tc := range []struct {
		name, src, want string
	}{
		{"unclosed flow list", "identity: /k\npeers: [a,\nmetrics: off\n", "f.yaml:2: YAML syntax: did not find expected ',' or ']'"},
		{"missing colon", "identity: /k\nmetrics: off\nsuite aes-gcm-128\nbackend: auto\n", "f.yaml:3: YAML syntax: could not find expected ':'"},
		{"bad indentation", "identity: /k\nmetrics: off\n  suite: x\n", "f.yaml:3: YAML syntax: mapping values are not allowed in this context"},
		{"list in mapping", "identity: /k\nuserspace:\n  - a\n  port: 1\n", "f.yaml:3: YAML syntax: did not find expected '-' indicator"},
		{"tab", "identity: /k\n\tsuite: x\n", "f.yaml:2: YAML syntax: found a tab character"},
		{"unknown anchor", "identity: /k\nmetrics: off\nsocket: *nope\n", "f.yaml:3: YAML syntax: unknown anchor 'nope' referenced"},
		{"not utf-8", "identity: /k\nmetrics: off\nsocket: /x\xff\n", "f.yaml:3: YAML syntax: invalid leading UTF-8 octet"},
		{"control character", "identity: /k\n\nsocket: /x\x07\n", "f.yaml:3: YAML syntax: control characters are not allowed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("f.yaml", []byte(tc.src))
			if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
				t.Fatalf("error %v, want one starting %q", err, tc.want)
			}
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("%T is not a *FieldError", err)
			}
		})
	}
}

// Errors about the identity file point at the identity line, and a
// missing file says how to make one.
func TestLoadIdentity(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "id.pem")
	c, err := Parse("f.yaml", []byte("metrics: off\nidentity: "+path+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.LoadIdentity()
	want := "f.yaml:2: identity: " + path + " does not exist"
	if err == nil || !strings.HasPrefix(err.Error(), want) || !strings.Contains(err.Error(), "run: pspd genkey --identity "+path) || !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("error %v, want one starting %q with the genkey hint", err, want)
	}

	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	if err := identity.WriteFile(path, id, false); err != nil {
		t.Fatal(err)
	}
	got, err := c.LoadIdentity()
	if err != nil || got.Public() != id.Public() {
		t.Fatalf("LoadIdentity: %v, %v", got, err)
	}

	self, err := Parse("f.yaml", []byte("identity: "+path+"\npeers:\n  - name: b\n    endpoint: 192.0.2.2\n    public_key: "+pubkey(t, elliptic.P256())+
		"\n  - name: c\n    endpoint: 192.0.2.3\n    public_key: "+id.Public().String()+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = self.LoadIdentity()
	want = "f.yaml:8: peers[1].public_key: is this host's own key (" + id.Public().Fingerprint() + ")"
	if err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("error %v, want one starting %q", err, want)
	}
}

// A reload refused for a setting that needs a restart names the line of
// that setting in the new file.
func TestReloadRefusalLine(t *testing.T) {
	cur, err := Parse("f.yaml", []byte("identity: /k\nmetrics: off\n"))
	if err != nil {
		t.Fatal(err)
	}
	next, err := Parse("f.yaml", []byte("identity: /k\nmetrics: off\nsocket: /run/other.sock\n"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = Reload(cur, next)
	want := `f.yaml:3: socket: changed from "/run/pspd/pspd.sock" to "/run/other.sock", which needs a restart of pspd; reload refused, nothing was applied`
	if err == nil || err.Error() != want {
		t.Fatalf("error %v, want %q", err, want)
	}
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Field != "socket" {
		t.Fatalf("%#v is not a FieldError for socket", err)
	}
}

func TestReloadRefusalToDefault(t *testing.T) {
	cur, _ := Parse("f.yaml", []byte("identity: /k\nsocket: /run/other.sock\n"))
	next, _ := Parse("f.yaml", []byte("identity: /k\n"))
	_, err := Reload(cur, next)
	if want := `f.yaml: socket: changed from "/run/other.sock" to "/run/pspd/pspd.sock"`; err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("error %v, want one starting %q (no line: the new file leaves socket out)", err, want)
	}
}
