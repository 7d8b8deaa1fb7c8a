// Package localapi is pspd's local control API: HTTP/JSON over a unix
// socket, authorised per connection from the peer's kernel credentials.
//
// It owns the wire types (none of which has a field that could hold key
// material), the server that maps requests onto a Service implemented by
// the daemon, and the socket lifecycle (refusing to start beside a live
// daemon, replacing a stale socket file). Package localapi/client is the Go
// client that pspctl, applications and tests use.
//
// Reading state needs root or membership in the pspd group; changing it
// needs root. Passing a TCP socket for a PSP upgrade is an application's
// act and needs the same as reading.
package localapi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"
)

// DefaultSocket is where pspd listens unless configured otherwise.
const DefaultSocket = "/run/pspd/pspd.sock"

// DefaultGroup is the group whose members may read state.
const DefaultGroup = "pspd"

// Status describes the daemon.
type Status struct {
	Version     string    `json:"version"`
	BootID      string    `json:"boot_id"`
	Started     time.Time `json:"started"`
	PublicKey   string    `json:"public_key"` // base64 SPKI, what peers pin
	Fingerprint string    `json:"fingerprint"`
	Listen      string    `json:"listen"`
	Backends    []string  `json:"backends"` // what this host can run, best first
	FIPS        bool      `json:"fips"`
	Peers       int       `json:"peers"`
	PeersUp     int       `json:"peers_up"`
	Assocs      int       `json:"assocs"`
	// LastReload is when the configuration was last loaded (at start or
	// by a reload); LastReloadError why that load was not applied.
	LastReload      time.Time `json:"last_reload"`
	LastReloadError string    `json:"last_reload_error,omitempty"`
	// UserspaceIO is how the userspace data plane moves outer packets
	// (af_xdp or udp), and UserspaceIOReason why; empty without it.
	UserspaceIO       string `json:"userspace_io,omitempty"`
	UserspaceIOReason string `json:"userspace_io_reason,omitempty"`
	// Fleet is the membership service's state; nil without one.
	Fleet *Fleet `json:"fleet,omitempty"`
	// Rotation is the phase of this host's identity rotation; empty
	// without one (see Identity).
	Rotation RotationPhase `json:"rotation,omitempty"`
}

// Identity is this host's identity and its rotation. Keys are pspd pubkey
// lines (base64 SPKI): public, never secret.
type Identity struct {
	PublicKey   string        `json:"public_key"` // presented now
	Fingerprint string        `json:"fingerprint"`
	Phase       RotationPhase `json:"phase,omitempty"`
	// Next is the staged identity: published, to be pinned by the peers
	// (next_public_key) before the switch.
	Next string `json:"next,omitempty"`
	// Previous, once switched, is the identity still shown to peers that
	// refuse the new one, until every session moved (then it is dropped).
	Previous string `json:"previous,omitempty"`
	// NotMoved, once switched, are the peers whose session is not under
	// PublicKey yet.
	NotMoved []string `json:"not_moved,omitempty"`
}

// RotationPhase is where an identity rotation stands.
type RotationPhase string

const (
	RotationNone     RotationPhase = ""
	RotationStaged   RotationPhase = "staged"   // a next identity is held and published
	RotationSwitched RotationPhase = "switched" // the next identity is presented; the previous one is held
)

// IdentityStep is a step of an identity rotation.
type IdentityStep string

const (
	// StepRotate stages a new identity: generated, kept beside the
	// current one, published.
	StepRotate IdentityStep = "rotate"
	// StepSwitch presents the staged identity and moves every session to
	// it; the previous one is dropped once they all moved.
	StepSwitch IdentityStep = "switch"
	// StepDrop drops the previous identity now, moved or not; before
	// the switch, it drops the staged one (the rotation is abandoned).
	StepDrop IdentityStep = "drop"
)

// Fleet is this host's membership in a fleet.
type Fleet struct {
	Node      string    `json:"node"`    // this host's name there
	Service   string    `json:"service"` // e.g. "etcd https://192.0.2.10:2379"
	Connected bool      `json:"connected"`
	Since     time.Time `json:"since,omitzero"` // when Connected last changed
	Error     string    `json:"error,omitempty"`
	// Members are the peers in force that come from the fleet; LeftOut
	// the records left out, each with the reason.
	Members int      `json:"members"`
	LeftOut []string `json:"left_out,omitempty"`
}

// PeerNAT is the NAT detection of a peer's session: each side tells the
// other where it sees it from.
type PeerNAT struct {
	// LocalObserved is where the peer sees this host from.
	LocalObserved string `json:"local_observed,omitempty"`
	Behind        bool   `json:"behind"`      // a NAT sits in front of this host
	PeerBehind    bool   `json:"peer_behind"` // a NAT sits in front of the peer
}

// PeerPSP is what a peer's pspd says of its kernel PSP devices.
type PeerPSP struct {
	// Versions are the PSP versions they accept (empty: none); an
	// upgrade with another is refused before the socket is touched.
	Versions []string `json:"versions"`
}

// Peer is one configured remote pspd.
type Peer struct {
	Name     string `json:"name"`
	Endpoint string `json:"endpoint"`
	// EndpointName is the host name the configuration gives as the
	// endpoint, which pspd resolves again while it runs; Endpoint is
	// what it resolved to last.
	EndpointName string   `json:"endpoint_name,omitempty"`
	Prefixes     []string `json:"prefixes"`
	Fingerprint  string   `json:"fingerprint"`
	// NextFingerprint is the peer's second pinned key, during its
	// identity rotation (next_public_key, or a fleet record's second key).
	NextFingerprint string `json:"next_fingerprint,omitempty"`
	// SessionFingerprint is the key the peer's session presented, while
	// up: one of the pinned ones.
	SessionFingerprint string `json:"session_fingerprint,omitempty"`
	// State is down, connecting, handshaking, up or backoff; Since is
	// when the peer entered it, and Cause why it is not up.
	State string    `json:"state"`
	Since time.Time `json:"since,omitzero"`
	Cause string    `json:"cause,omitempty"`
	// DownSince is when the peer was added or last went down; zero while
	// up. A peer that cannot connect alternates between connecting and
	// backoff, so this says for how long it has not been up.
	DownSince  time.Time `json:"down_since,omitzero"`
	Backend    string    `json:"backend,omitempty"`
	PeerBootID string    `json:"peer_boot_id,omitempty"`
	// KeyExchange is the TLS key exchange group of the session, e.g.
	// SecP256r1MLKEM768 (hybrid post-quantum) or P256 (classic).
	KeyExchange string `json:"key_exchange,omitempty"`
	// LastHandshake is when the latest generation was confirmed, and
	// LastUp when the latest session came up; both stay once it is down.
	LastHandshake time.Time `json:"last_handshake,omitzero"`
	LastUp        time.Time `json:"last_up,omitzero"`
	// Observed is where this host sees the peer's session come from
	// (behind a NAT, the NAT's address), while up.
	Observed string `json:"observed,omitempty"`
	// NAT is what NAT detection in the key exchange found, while up: nil
	// when neither side is behind a NAT.
	NAT *PeerNAT `json:"nat,omitempty"`
	// PSP is what the peer's pspd said of its kernel PSP devices when the
	// session began, while up: nil when it did not say.
	PSP *PeerPSP `json:"psp,omitempty"`
	// RTTMicros is the session's smoothed round-trip time on the control
	// path, as QUIC measures it, in microseconds; while up.
	RTTMicros   uint64    `json:"rtt_us,omitempty"`
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at,omitzero"`
	// LastErrorOld says LastError is from before the session now up.
	LastErrorOld bool   `json:"last_error_old,omitempty"`
	Assocs       int    `json:"assocs"`
	Assoc        string `json:"assoc,omitempty"` // the current association's ID
	Rekeys       uint64 `json:"rekeys"`
	// Counters are the peer's, over every association and generation
	// since pspd started.
	Counters
}

// Counters count the traffic of SAs: the ones in place now and every
// one removed before (rekeyed, or gone with a session), so the byte and
// packet counts never go back while pspd runs.
type Counters struct {
	BytesIn    uint64 `json:"bytes_in"`
	BytesOut   uint64 `json:"bytes_out"`
	PacketsIn  uint64 `json:"packets_in"`
	PacketsOut uint64 `json:"packets_out"`
	// Drops is the data plane's own count for the current generation:
	// XFRM counts per SA (it restarts at a rekey), the userspace data
	// plane per peer.
	Drops uint64 `json:"drops"`
	// LastIn and LastOut are when a packet was last received and sent
	// (XFRM knows it to the second); they stay once the peer is down.
	LastIn  time.Time `json:"last_in,omitzero"`
	LastOut time.Time `json:"last_out,omitzero"`
}

// Assoc is one association: an SA pair on one backend.
type Assoc struct {
	ID         string    `json:"id"`
	Peer       string    `json:"peer"`
	Backend    string    `json:"backend"`
	Suite      string    `json:"suite"`
	RxSPI      uint32    `json:"rx_spi"`
	TxSPI      uint32    `json:"tx_spi"`
	Generation uint32    `json:"generation"`
	Created    time.Time `json:"created"`
	NextRekey  time.Time `json:"next_rekey,omitzero"`
	// HardExpiry is when the data plane ends the generation if no rekey
	// replaced it.
	HardExpiry time.Time `json:"hard_expiry,omitzero"`
	// Counters are the association's, over all its generations.
	Counters
	// ThisGeneration is what the current generation alone carried.
	ThisGeneration Counters `json:"this_generation"`
}

// RotateRequest selects associations to rekey: exactly one of ID, Peer or
// All.
type RotateRequest struct {
	ID   string `json:"id,omitempty"`
	Peer string `json:"peer,omitempty"`
	All  bool   `json:"all,omitempty"`
}

// Validate reports a request that selects nothing or more than one way.
func (r RotateRequest) Validate() error {
	n := 0
	for _, set := range []bool{r.ID != "", r.Peer != "", r.All} {
		if set {
			n++
		}
	}
	if n != 1 {
		return errors.New("select exactly one of an association id, a peer, or all")
	}
	return nil
}

// Rotated reports one rekeyed association.
type Rotated struct {
	ID         string `json:"id"`
	Peer       string `json:"peer"`
	OldRxSPI   uint32 `json:"old_rx_spi"`
	OldTxSPI   uint32 `json:"old_tx_spi"`
	RxSPI      uint32 `json:"rx_spi"`
	TxSPI      uint32 `json:"tx_spi"`
	Generation uint32 `json:"generation"`
	Error      string `json:"error,omitempty"`
}

// Device is a kernel PSP device.
type Device struct {
	ID           uint32    `json:"id"`
	Ifindex      uint32    `json:"ifindex"`
	Ifname       string    `json:"ifname"`
	Capable      []string  `json:"capable"`
	Enabled      []string  `json:"enabled"`
	Rotations    uint64    `json:"rotations"`
	StaleEvents  uint64    `json:"stale_events"`
	LastRotation time.Time `json:"last_rotation,omitzero"`
	NextRotation time.Time `json:"next_rotation,omitzero"`
	// ByAssociation: pspd's namespace only uses the device through an
	// association (dev-assoc); the device's own namespace administers it.
	ByAssociation bool `json:"by_association,omitempty"`
	// Assoc are the netdevs of other namespaces (containers) that may use
	// the device; see AssocRequest.
	Assoc []AssocDev `json:"assoc,omitempty"`
}

// AssocDev is a netdev associated with a PSP device.
type AssocDev struct {
	Ifindex uint32 `json:"ifindex"`
	// NSID is the netdev's namespace id in pspd's namespace; -1: pspd's
	// own.
	NSID int32 `json:"nsid"`
	// NetNS and Ifname are what the association was made with through
	// this API, if it was; Ifname alone names a netdev of pspd's own
	// namespace.
	NetNS  string `json:"netns,omitempty"`
	Ifname string `json:"ifname,omitempty"`
}

// AssocRequest names a netdev of some network namespace (a container's
// end of a netkit or veth pair) to associate with a PSP device (POST
// /v1/devices/{id}/assoc) or to disassociate (/disassoc). Sockets of that
// namespace routed through it can then be upgraded with the device.
type AssocRequest struct {
	// NetNS is a namespace file (/run/netns/NAME, /proc/PID/ns/net) or
	// the NAME of one in /run/netns (as ip netns names them), or PID a
	// process whose namespace it is: exactly one.
	NetNS string `json:"netns,omitempty"`
	PID   int    `json:"pid,omitempty"`
	// Ifname or Ifindex names the netdev in that namespace: exactly one.
	Ifname  string `json:"ifname,omitempty"`
	Ifindex uint32 `json:"ifindex,omitempty"`
}

// Validate checks that the request names one namespace and one netdev.
func (r AssocRequest) Validate() error {
	switch {
	case (r.NetNS == "") == (r.PID == 0):
		return errors.New("give the network namespace as netns (a path such as /run/netns/NAME) or as pid, not both")
	case r.PID < 0:
		return fmt.Errorf("pid %d is not a process id", r.PID)
	case (r.Ifname == "") == (r.Ifindex == 0):
		return errors.New("give the netdev in that namespace as ifname or as ifindex, not both")
	}
	return nil
}

// Path is the namespace file the request names.
func (r AssocRequest) Path() string {
	switch {
	case r.PID != 0:
		return fmt.Sprintf("/proc/%d/ns/net", r.PID)
	case !strings.Contains(r.NetNS, "/"):
		return "/run/netns/" + r.NetNS
	}
	return r.NetNS
}

// EventKind names what an Event reports.
type EventKind string

// The kinds of event pspd publishes.
const (
	// EventAssocUp: a session's first generation is in place.
	EventAssocUp EventKind = "assoc-up"
	// EventAssocDown: the peer's last SA was removed.
	EventAssocDown EventKind = "assoc-down"
	// EventRekey: a new generation replaced the previous one of the same
	// session; Reason says why (see the Reason constants).
	EventRekey EventKind = "rekey"
	// EventPeerUp and EventPeerDown: a session with the peer came up or
	// ended; a peer-down's Reason is the cause.
	EventPeerUp   EventKind = "peer-up"
	EventPeerDown EventKind = "peer-down"
	// EventPeerRestarted: the peer's pspd is a new process (its boot id
	// changed), so its associations are new ones, not rekeys.
	EventPeerRestarted EventKind = "peer-restarted"
	// EventPeerRemoved: a reload took the peer out of the configuration.
	EventPeerRemoved EventKind = "peer-removed"
	// EventPSPUpgrade: an application's TCP connection now uses PSP.
	EventPSPUpgrade EventKind = "psp-upgrade"
	// EventDeviceRotated: a kernel PSP device key was rotated.
	EventDeviceRotated EventKind = "device-rotated"
	// EventPSPStaleSoon: the next device rotation will end the receive
	// key of the connection in Detail; re-establish it first.
	EventPSPStaleSoon EventKind = "psp-stale-soon"
	// EventPSPStale: a connection can no longer receive under PSP.
	EventPSPStale EventKind = "psp-stale"
)

func (k EventKind) String() string { return string(k) }

// Reasons of rekey events (and of the pspd_rekeys_total metric).
const (
	ReasonTimer    = "timer"    // rekey_interval came due
	ReasonBudget   = "budget"   // the data plane's packet budget or key age
	ReasonOperator = "operator" // pspctl assoc rotate
	ReasonPeer     = "peer"     // the peer asked before the interval was due
)

// Event is one entry of the event stream.
type Event struct {
	Time       time.Time `json:"time"`
	Kind       EventKind `json:"kind"`
	Peer       string    `json:"peer,omitempty"`
	Assoc      string    `json:"assoc,omitempty"`
	Generation uint32    `json:"generation,omitempty"`
	RxSPI      uint32    `json:"rx_spi,omitempty"`
	TxSPI      uint32    `json:"tx_spi,omitempty"`
	Backend    string    `json:"backend,omitempty"`
	// Reason says why: a rekey's cause, a peer-down's error.
	Reason string `json:"reason,omitempty"`
	// PeerBootID is the peer process's boot id, on peer-up and
	// peer-restarted.
	PeerBootID string `json:"peer_boot_id,omitempty"`
	Device     uint32 `json:"device,omitempty"`
	// Detail is a summary for people; programs use the fields above.
	Detail string `json:"detail,omitempty"`
}

// PingRequest asks for ICMP echo round trips through a peer's
// association.
type PingRequest struct {
	// To is the address to ping, inside the peer's prefixes; empty: the
	// peer's one single-address prefix.
	To string `json:"to,omitempty"`
	// Count is the number of requests, 1 to MaxPingCount; 0 means 3.
	Count int `json:"count,omitempty"`
}

// MaxPingCount bounds a PingRequest: members of the pspd group may ping.
const MaxPingCount = 20

// PingResult reports the round trips of a ping.
type PingResult struct {
	Peer    string      `json:"peer"`
	To      string      `json:"to"`
	Assoc   string      `json:"assoc"`
	Backend string      `json:"backend"`
	Replies []PingReply `json:"replies"`
	// AssocPacketsOut and AssocPacketsIn are what the peer's SAs carried
	// while the ping ran: at least the requests sent and the replies
	// received, if they went through the association.
	AssocPacketsOut uint64 `json:"assoc_packets_out"`
	AssocPacketsIn  uint64 `json:"assoc_packets_in"`
}

// PingReply is one request's outcome: its round-trip time, or why none.
type PingReply struct {
	Seq       int    `json:"seq"`
	RTTMicros uint64 `json:"rtt_us,omitempty"`
	Error     string `json:"error,omitempty"`
}

// Reloaded reports an applied reload.
type Reloaded struct {
	File string    `json:"file"`
	Time time.Time `json:"time"`
}

// UpgradeResult reports a completed PSP socket upgrade.
type UpgradeResult struct {
	Peer    string `json:"peer"`
	Device  uint32 `json:"device"`
	Version string `json:"version"`
	RxSPI   uint32 `json:"rx_spi"`
	TxSPI   uint32 `json:"tx_spi"`
}

// Service is what the daemon provides to the API. Implementations return
// errors wrapping ErrNotFound or ErrInvalid where those apply, so the
// server can answer 404 or 400.
type Service interface {
	Status(ctx context.Context) (Status, error)
	Peers(ctx context.Context) ([]Peer, error)
	Assocs(ctx context.Context) ([]Assoc, error)
	Rotate(ctx context.Context, req RotateRequest) ([]Rotated, error)
	Devices(ctx context.Context) ([]Device, error)
	RotateDevice(ctx context.Context, id uint32) (Device, error)
	// AssocDevice and DisassocDevice give a netdev of another network
	// namespace the use of PSP device id, or take it back, and answer
	// the device.
	AssocDevice(ctx context.Context, id uint32, req AssocRequest) (Device, error)
	DisassocDevice(ctx context.Context, id uint32, req AssocRequest) (Device, error)
	// ReloadConfig reads the configuration file again and applies it, or
	// refuses it whole with the reason (an error wrapping ErrRefused).
	ReloadConfig(ctx context.Context) (Reloaded, error)
	// Ping sends ICMP echo requests through the named peer's association
	// and reports the round trips.
	Ping(ctx context.Context, peer string, req PingRequest) (PingResult, error)
	// Events streams events until ctx ends.
	Events(ctx context.Context) (<-chan Event, error)
	// UpgradePSP takes ownership of sock, a connected TCP socket of the
	// calling application, and upgrades it to PSP with the named peer
	// (UpgradeAutoPeer: the one whose addresses hold the remote address).
	UpgradePSP(ctx context.Context, sock *os.File, peer string) (UpgradeResult, error)
	// Identity is this host's identity and its rotation; ChangeIdentity
	// takes a step of the rotation and answers the result.
	Identity(ctx context.Context) (Identity, error)
	ChangeIdentity(ctx context.Context, step IdentityStep) (Identity, error)
}

// Errors a Service wraps to choose the HTTP status.
var (
	ErrNotFound = errors.New("not found")
	ErrInvalid  = errors.New("invalid request")
	// ErrRefused: the daemon would not do it as asked (409), e.g. a
	// reload that was not applied as a whole.
	ErrRefused = errors.New("refused")
)

// Refused marks err as ErrRefused (a 409) without changing its message.
func Refused(err error) error { return refusedError{err} }

type refusedError struct{ error }

func (e refusedError) Unwrap() []error { return []error{e.error, ErrRefused} }

// ErrorBody is the JSON body of every non-2xx answer.
type ErrorBody struct {
	Error string `json:"error"`
}
