package offload

import (
	"context"
	"net/netip"
	"syscall"
	"time"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/keyexchange/identity"
)

// Backend is one data plane (kernel XFRM, the userspace data plane) as the
// daemon drives it. The daemon is its only caller; the key exchange sees
// the Install, Activate and Remove subset through the daemon.
//
// # Peers
//
// AddPeer gives the backend a configured peer. With RequireEncryption the
// peer's fail-closed state (XFRM policies with no SA to use, userspace
// prohibit routes) is in place when AddPeer returns, so traffic to the
// peer is refused, never sent in clear, until an association is up.
// AddPeer is atomic: on error nothing of the peer is installed.
//
// UpdatePeer applies a changed PeerSpec of a peer the backend holds, in
// place and without a gap: the peer's installed SAs stay and keep
// carrying traffic; policies and routes for new prefixes are added before
// those for dropped prefixes go, and fail-closed state follows
// RequireEncryption. Limits stay those of AddPeer (the daemon refuses a
// reload that changes them). A peer whose endpoint or suite changed is
// re-negotiated by the key exchange; the backend only follows the
// addresses. On error the peer is left as it was.
//
// RemovePeer takes everything of a peer out, its fail-closed state
// included: the operator removed the peer from the configuration.
//
// # SA generations
//
// A new generation goes live in two steps, so that no packet is ever sent
// under a key the peer cannot yet decrypt. Install programs the inbound
// direction and prepares the outbound one without sending under it; it is
// atomic. Activate switches outbound traffic to the generation; the key
// exchange calls it only once the peer has installed its inbound side.
// Remove deletes whatever of the generation Install and Activate put in
// place. A backend copies the keys it needs from the SA (the kernel
// backends hand them to the kernel and keep none); the key exchange wipes
// the SA's own copies. A backend refuses to install a transmit key it has
// installed before for the same peer, so that nothing a peer sends can
// make this host reuse a nonce.
//
// # Stop
//
// Close stops the backend. What stays in the kernel is decided by each
// peer's RequireEncryption: for a peer that requires encryption the SAs
// may go, but its fail-closed state stays, and the next start reconciles
// it (Config.Peers of the backend's constructor); for any other peer
// everything pspd installed goes. A crash (kill -9) leaves what was
// installed: SAs until they expire, fail-closed state until the next
// start.
type Backend interface {
	Kind() assoc.Backend

	AddPeer(ctx context.Context, p PeerSpec) error
	UpdatePeer(ctx context.Context, p PeerSpec) error
	RemovePeer(ctx context.Context, key identity.PublicKey) error

	Install(ctx context.Context, sa *assoc.SA) error
	Activate(ctx context.Context, sa *assoc.SA) error
	Remove(ctx context.Context, sa *assoc.SA) error

	// Traffic reports the counters of an installed SA pair.
	Traffic(sa *assoc.SA) (Traffic, bool)
	// Drops reports dropped packets by reason (DropReason names), over
	// every peer.
	Drops() map[string]uint64
	// RekeyWanted delivers peers whose transmit key reached its packet
	// budget or age.
	RekeyWanted() <-chan identity.PublicKey

	Close() error
}

// SocketController is a Backend that must see the key exchange's sockets
// before they are bound: the XFRM backend exempts them from its policies.
type SocketController interface {
	Control(network, address string, c syscall.RawConn) error
}

// UnderlayReporter is a Backend that chose how to move outer packets at
// start (the userspace data plane: AF_XDP or UDP sockets) and says which
// and why, for pspctl status.
type UnderlayReporter interface {
	IO() (pick, reason string)
}

// PeerSpec is a peer as a data plane needs it. The daemon is the only
// place that makes one, from the configuration.
type PeerSpec struct {
	Name     string // for messages and logs
	Key      identity.PublicKey
	Endpoint netip.AddrPort // the peer's control endpoint; its address is the underlay address
	// Local is this host's address towards the peer; unspecified means
	// the kernel's choice of source address.
	Local netip.Addr
	// Prefixes are the inner destinations that go to the peer. An XFRM
	// peer has at least one: the daemon gives a peer without prefixes its
	// endpoint's address (transport mode).
	Prefixes          []netip.Prefix
	RequireEncryption bool
	Suite             assoc.Suite
	Limits            Limits
	// NATTraversal is when the XFRM data plane wraps ESP in UDP (RFC
	// 3948), and EncapPort the UDP port of that on both hosts.
	NATTraversal NATTraversal
	EncapPort    uint16
	// NATKeepalive is how long the data path to the peer may idle before
	// a host behind a NAT sends a keep-alive; zero means the backend's
	// default.
	NATKeepalive time.Duration
	// NAT is what the key exchange's NAT detection found for the peer's
	// session; zero until a session has come up.
	NAT NAT
}

// NATTraversal says when ESP travels in UDP.
type NATTraversal uint8

const (
	NATAuto  NATTraversal = iota // when the key exchange detects a NAT
	NATForce                     // always
	NATOff                       // never
)

func (n NATTraversal) String() string {
	switch n {
	case NATAuto:
		return "auto"
	case NATForce:
		return "force"
	case NATOff:
		return "off"
	}
	return "nat_traversal(?)"
}

// NAT is a peer's NAT detection result, as the data plane needs it.
type NAT struct {
	Behind     bool // a NAT sits in front of this host
	PeerBehind bool // a NAT sits in front of the peer
	// PeerObserved is where this host sees the peer's packets come from:
	// behind a NAT, the NAT's public address, which SAs must be sent to.
	PeerObserved netip.AddrPort
}

// Encapsulate reports whether the peer's ESP travels in UDP: forced, or
// automatic with a NAT detected on either side.
func (p PeerSpec) Encapsulate() bool {
	switch p.NATTraversal {
	case NATForce:
		return true
	case NATAuto:
		return p.NAT.Behind || p.NAT.PeerBehind
	}
	return false
}

// Limits bound an SA's life. The soft limits ask for a rekey, the hard
// ones end the SA.
type Limits struct {
	SoftPackets, HardPackets   uint64
	SoftLifetime, HardLifetime time.Duration
}

// Traffic is what a backend counted for one SA pair.
type Traffic struct {
	BytesIn, BytesOut     uint64
	PacketsIn, PacketsOut uint64
	Drops                 uint64
	// LastIn and LastOut are when a packet was last received and sent,
	// zero if never: the SA pair's for XFRM (to the second), the peer's
	// for the userspace data plane.
	LastIn, LastOut time.Time
}
