// Package policy owns pspd's configuration file: its schema, its defaults,
// and the validation that refuses a bad file before anything is touched.
//
// A Config is only ever produced by Parse or Load, which check every field
// and report the first problem as "file:line: field: what is wrong", so an
// operator can go straight to the line. Reload compares two Configs and
// either yields the set of peer changes to apply or refuses the new file
// whole.
package policy

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"time"

	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
)

// Backend is the data path a peer's traffic takes.
type Backend string

const (
	BackendAuto      Backend = "auto"
	BackendPSP       Backend = "psp"
	BackendXFRM      Backend = "xfrm"
	BackendUserspace Backend = "userspace"
)

// KeyExchange is the TLS key exchange of the control sessions.
type KeyExchange string

const (
	// KeyExchangeHybrid prefers SecP256r1MLKEM768 (P-256 ECDHE with
	// ML-KEM-768, inside the FIPS 140-3 module), accepts X25519MLKEM768,
	// and falls back to P-256 for a peer that offers nothing else, so that
	// a recorded session cannot be decrypted later by a quantum computer
	// unless both sides allowed the fallback.
	KeyExchangeHybrid KeyExchange = "hybrid"
	// KeyExchangeClassic is P-256 ECDHE only, for peers that cannot do
	// better.
	KeyExchangeClassic KeyExchange = "classic"
)

func parseKeyExchange(s string) (KeyExchange, error) {
	switch k := KeyExchange(s); k {
	case KeyExchangeHybrid, KeyExchangeClassic:
		return k, nil
	}
	return "", fmt.Errorf("%q is not one of hybrid, classic", s)
}

// Offload is how the XFRM backend uses NIC crypto offload.
type Offload string

const (
	OffloadAuto   Offload = "auto"   // use it when the device has it, fall back to software otherwise
	OffloadCrypto Offload = "crypto" // require it; refuse to install without it
	OffloadNone   Offload = "none"
)

// Defaults applied to fields the file leaves out.
const (
	DefaultListenPort    = 6082
	DefaultSocket        = "/run/pspd/pspd.sock"
	DefaultMetrics       = "127.0.0.1:9472"
	DefaultRekeyInterval = 10 * time.Minute
	DefaultPacketBudget  = 1 << 31
	DefaultPSPRotation   = 24 * time.Hour
	DefaultSuite         = kdf.AESGCM256
	DefaultInterface     = "pspd0"
	DefaultDataPort      = 6081
	// DefaultResolveInterval is how often endpoint names are resolved
	// again while pspd runs.
	DefaultResolveInterval = 5 * time.Minute
	// DefaultNATKeepalive is how long a host behind a NAT lets its path
	// to a peer idle before it sends a keep-alive: below the 30 s many
	// NATs keep an idle UDP mapping.
	DefaultNATKeepalive = 20 * time.Second
	minNATKeepalive     = time.Second
	maxNATKeepalive     = 10 * time.Minute
	minRekeyInterval    = 10 * time.Second
	minResolveInterval  = 10 * time.Second
	maxResolveInterval  = 24 * time.Hour
	maxRekeyInterval    = 24 * time.Hour
	minPacketBudget     = 1 << 10
	minPSPRotation      = time.Minute
	maxPSPRotation      = 30 * 24 * time.Hour
	maxPeers            = 4096
	maxPrefixesPerPeer  = 256
	maxConfigFileBytes  = 1 << 20

	// maxPacketBudget bounds packet_budget, the packet count at which a
	// key asks to be replaced; the backends stop using the key at twice
	// that. 2^39 makes the hard limit 2^40, the userspace codec's own
	// default: 2^40 packets of at most 2^7 AES blocks (a 1500-byte MTU)
	// are σ = 2^47 blocks, an AES-GCM confidentiality advantage of about
	// σ²/2^129 = 2^-35 (2^-31 with 9000-byte jumbo frames). The ESP
	// sequence carries it: a 64-bit ESN by far, and an SA without ESN
	// (some offload devices refuse ESN) is capped by the xfrm package
	// below its 32-bit sequence space whatever the budget. Twice the
	// bound cannot wrap, so the hard limit is never 0, which XFRM reads
	// as "no limit".
	maxPacketBudget = 1 << 39
)

// Config is a validated pspd configuration.
type Config struct {
	File     string // where it was read from, for messages
	Identity string // path of the PEM identity key
	Listen   netip.AddrPort
	Socket   string
	Metrics  string // host:port, unix:/path, or "" for none
	Backend  Backend
	Offload  Offload
	// NATTraversal is when the XFRM backend wraps ESP in UDP (RFC 3948);
	// a peer may override it. EncapPort is the UDP port of that
	// encapsulation, on both sides.
	NATTraversal NATTraversal
	EncapPort    uint16
	// NATKeepalive is how long a host behind a NAT lets its data path to
	// a peer idle before it sends a keep-alive (both backends).
	NATKeepalive time.Duration
	Suite        kdf.Suite
	// Discovery, if set, adds the peers of a fleet's membership service.
	Discovery     *Discovery
	RekeyInterval time.Duration
	PacketBudget  uint64
	PSPRotation   time.Duration
	// ResolveInterval is how often peers' endpoint names are resolved
	// again while pspd runs (a peer that is down is resolved again at
	// most this often too, and at least every minute).
	ResolveInterval   time.Duration
	RequireEncryption bool
	KeyExchange       KeyExchange
	Userspace         Userspace
	Peers             []Peer

	lines map[string]int // field path → line, for errors found after parsing
}

// Userspace configures pspd's own data plane: the inner interface the host
// routes peers' prefixes into, and the outer UDP port the encrypted
// packets travel on.
type Userspace struct {
	Interface string       // TUN device name
	Address   netip.Prefix // this host's inner address; unset: none is assigned
	Port      uint16       // outer UDP port, on both peers
	Framing   Framing
	IO        IO
}

// Framing is the userspace data plane's packet format.
type Framing string

const (
	FramingGeneve Framing = "geneve" // Geneve with pspd options (UDP 6081)
	FramingPSP    Framing = "psp"    // PSP tunnel mode (UDP 1000)
)

// IO is how the userspace data plane moves outer packets.
type IO string

const (
	IOAuto  IO = "auto"   // AF_XDP where it works, else UDP sockets
	IOAFXDP IO = "af_xdp" // require AF_XDP
	IOUDP   IO = "udp"    // batched UDP sockets
)

// Peer is one remote pspd.
type Peer struct {
	Name     string
	Endpoint netip.AddrPort
	// EndpointName is the host name (with the port, if given) the file
	// gives as endpoint, resolved into Endpoint when the file was loaded
	// and again at each reload; "" for an address.
	EndpointName string
	PublicKey    identity.PublicKey
	// NextKey, if set, is pinned too: the key the peer's identity
	// rotation moves to (next_public_key; a fleet record's second key).
	NextKey  identity.PublicKey
	Prefixes []netip.Prefix
	Backend  Backend // BackendAuto unless the peer overrides the global choice
	Suite    kdf.Suite
	// NATTraversal is the peer's own choice; "" leaves it to the global
	// one (see OrDefault).
	NATTraversal NATTraversal
}

// NATTraversal is when ESP travels in UDP (RFC 3948) to get through NATs.
type NATTraversal string

const (
	// NATAuto encapsulates when the key exchange detects a NAT between
	// the two hosts, and sends plain ESP otherwise.
	NATAuto NATTraversal = "auto"
	// NATForce always encapsulates, for paths that drop plain ESP.
	NATForce NATTraversal = "force"
	// NATOff never encapsulates, NAT or not.
	NATOff NATTraversal = "off"
)

// DefaultEncapPort is the UDP port of ESP-in-UDP (RFC 3948's 4500).
const DefaultEncapPort = 4500

func parseNATTraversal(s string) (NATTraversal, error) {
	switch n := NATTraversal(s); n {
	case NATAuto, NATForce, NATOff:
		return n, nil
	}
	return "", fmt.Errorf("%q is not one of auto, force, off", s)
}

// OrDefault is n, or global when the peer leaves the choice to it.
func (n NATTraversal) OrDefault(global NATTraversal) NATTraversal {
	if n == "" {
		return global
	}
	return n
}

// Peer returns the peer with the given name.
func (c *Config) Peer(name string) (Peer, bool) {
	i := slices.IndexFunc(c.Peers, func(p Peer) bool { return p.Name == name })
	if i < 0 {
		return Peer{}, false
	}
	return c.Peers[i], true
}

// Line is the line of field (a dotted path as in FieldError, such as
// "rekey_interval" or "peers[1].prefixes[0]") in the file, or 0 when the
// file leaves it out or c was not parsed from a file. Checks made after
// Parse, such as a reload's, use it to point at the line at fault.
func (c *Config) Line(field string) int { return c.lines[field] }

// LoadIdentity loads the identity file c names and checks that no peer
// pins this host's own key. Its errors are FieldErrors at the line of the
// field at fault: the identity line for a missing or unusable file.
func (c *Config) LoadIdentity() (*identity.Identity, error) {
	id, err := identity.Load(c.Identity)
	if err != nil {
		return nil, &FieldError{File: c.File, Line: c.Line("identity"), Field: "identity", Err: err}
	}
	for i, p := range c.Peers {
		if p.PublicKey == id.Public() || p.NextKey == id.Public() {
			f := fmt.Sprintf("peers[%d].public_key", i)
			if p.NextKey == id.Public() {
				f = fmt.Sprintf("peers[%d].next_public_key", i)
			}
			return nil, &FieldError{File: c.File, Line: c.Line(f), Field: f,
				Err: fmt.Errorf("is this host's own key (%s); pin the key pspd pubkey prints on peer %q", id.Public().Fingerprint(), p.Name)}
		}
	}
	return id, nil
}

// Load reads and validates the file at path.
func Load(path string) (*Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	if st.Size() > maxConfigFileBytes {
		return nil, fmt.Errorf("policy: %s: %d bytes is larger than the %d-byte limit", path, st.Size(), maxConfigFileBytes)
	}
	buf := make([]byte, st.Size())
	if _, err := f.ReadAt(buf, 0); err != nil && st.Size() > 0 {
		return nil, fmt.Errorf("policy: read %s: %w", path, err)
	}
	return ParseResolve(path, buf, net.DefaultResolver)
}

var peerName = regexp.MustCompile(`^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$`)

// ParseBackend parses a backend name.
func ParseBackend(s string) (Backend, error) {
	switch b := Backend(s); b {
	case BackendAuto, BackendPSP, BackendXFRM, BackendUserspace:
		return b, nil
	}
	return "", fmt.Errorf("%q is not one of auto, psp, xfrm, userspace", s)
}

func parseOffload(s string) (Offload, error) {
	switch o := Offload(s); o {
	case OffloadAuto, OffloadCrypto, OffloadNone:
		return o, nil
	}
	return "", fmt.Errorf("%q is not one of auto, crypto, none", s)
}

// OrDefault is b, or global when the peer leaves the choice to it.
func (b Backend) OrDefault(global Backend) Backend {
	if b == "" || b == BackendAuto {
		return global
	}
	return b
}

// Keys are the keys pinned for the peer: PublicKey, and NextKey if set.
func (p Peer) Keys() []identity.PublicKey {
	if p.NextKey.IsZero() {
		return []identity.PublicKey{p.PublicKey}
	}
	return []identity.PublicKey{p.PublicKey, p.NextKey}
}
