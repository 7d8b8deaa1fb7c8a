package keyexchange

import (
	"context"
	"crypto/hkdf"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/keyexchange/wire"
)

const (
	exporterLabel = "EXPORTER-pspd-root-v1"
	masterKeyInfo = "pspd psp master keys v1"
	rootSecretLen = 32
)

// QUIC application error codes used when pspd closes a connection.
const (
	closeNormal   quic.ApplicationErrorCode = 0
	closeProtocol quic.ApplicationErrorCode = 1
	closeReplaced quic.ApplicationErrorCode = 2
	closeGoodbye  quic.ApplicationErrorCode = 3 // the reason is the close message
)

// Session is one authenticated QUIC connection to a peer, with its own
// master keys. It ends when the peer goes away, on any negotiation error,
// or when it is closed; its master keys are wiped then.
type Session struct {
	conn    *quic.Conn
	dialed  bool               // this side dialed the connection
	peer    identity.PublicKey // the key the peer presented
	local   identity.PublicKey // the identity this side presented
	saPeer  identity.PublicKey // the Peer's Key, which names it in SAs
	role    kdf.Role
	hello   wire.Hello // the peer's
	nat     NAT
	timeout time.Duration
	log     *slog.Logger
	ctx     context.Context
	cancel  context.CancelCauseFunc

	mu      sync.Mutex
	mk      *kdf.MasterKeys         // nil after close
	alloc   *kdf.Allocator          // this session's budget of receive SPIs, above the floor
	rxIDs   *rxIDSpace              // the endpoint's: makes them unique host-wide
	lastGen map[wire.AssocID]uint32 // responder: generations seen this session
	used    spiRecord               // every SPI this session derived a key for
}

// spiRecord is the record of every SPI a session derived a key for, by the
// side that allocated it. One SPI under one session's master keys is one
// key, and an AEAD key used twice is a nonce used twice (the counter
// restarts with every install), so a repeat must never reach an
// installer, whatever the peer sends. Both sides allocate strictly
// increasing SPIs (kdf.Allocator), so the record of every SPI a side used
// is its highest one: an SPI at or below it is a repeat, or one an honest
// pspd never sends.
type spiRecord struct {
	ours, peers kdf.SPI // highest so far; 0: none yet
}

// use records a pair of SPIs, or refuses if either was used before.
func (r *spiRecord) use(ours, peers kdf.SPI) error {
	if ours.KeyID() <= r.ours.KeyID() {
		// Our allocator never goes back; this is a bug on this host.
		return fmt.Errorf("internal error: our receive SPI %s repeats or precedes %s already used in this session", ours, r.ours)
	}
	if peers.KeyID() <= r.peers.KeyID() {
		return &wire.ProtocolError{Code: wire.CodeSPIReuse, Msg: fmt.Sprintf(
			"peer SPI %s repeats or precedes SPI %s it already used in this session; deriving its key again would reuse AES-GCM nonces", peers, r.peers)}
	}
	r.ours, r.peers = ours, peers
	return nil
}

// Context ends when the session is over; context.Cause says why.
func (s *Session) Context() context.Context { return s.ctx }

// Dialed reports whether this side dialed the session (rather than
// accepted it).
func (s *Session) Dialed() bool { return s.dialed }

// Peer is the authenticated peer key.
func (s *Session) Peer() identity.PublicKey { return s.peer }

// Local is the identity this side presented.
func (s *Session) Local() identity.PublicKey { return s.local }

// Role is this side's role, elected by SPKI order.
func (s *Session) Role() kdf.Role { return s.role }

// PeerBootID identifies the peer's process; it changes when the peer
// restarts.
func (s *Session) PeerBootID() wire.BootID { return s.hello.BootID }

// Group is the TLS key exchange group the session was set up with, such
// as tls.SecP256r1MLKEM768 (hybrid post-quantum) or tls.CurveP256.
func (s *Session) Group() tls.CurveID { return s.conn.ConnectionState().TLS.CurveID }

// RemoteAddr is where the peer's end of the session is, as this host
// sees it (behind a NAT, the NAT's address and port).
func (s *Session) RemoteAddr() net.Addr { return s.conn.RemoteAddr() }

// RTT is the session's smoothed round-trip time (RFC 9002) as QUIC
// measures it on the control path; zero before the first sample.
func (s *Session) RTT() time.Duration { return s.conn.ConnectionStats().SmoothedRTT }

// NAT is what the Hellos showed about NATs between the two sides.
func (s *Session) NAT() NAT { return s.nat }

// NAT is the result of NAT detection: each side tells the other, in its
// Hello, the address and port it observes the session from.
type NAT struct {
	// LocalObserved is where the peer sees this side's end of the
	// session; zero if the peer did not say (an older pspd).
	LocalObserved netip.AddrPort
	// PeerObserved is where this side sees the peer's end.
	PeerObserved netip.AddrPort
	// Behind: this side's own address and port differ from what the peer
	// observed, so a NAT sits in front of this host.
	Behind bool
	// PeerBehind: the peer's configured endpoint differs from where its
	// packets come from, so a NAT sits in front of the peer.
	PeerBehind bool
}

// Detected reports whether a NAT sits on either side.
func (n NAT) Detected() bool { return n.Behind || n.PeerBehind }

// detectNAT compares what each side observed. local is this side's socket
// address (perhaps a wildcard, then localAddrs are the host's addresses),
// peerSource where the peer says it sends from (zero if it did not say),
// peerCfg the peer's configured endpoint (zero for a responder that was
// not told one).
func detectNAT(local, localObserved, peerObserved, peerSource, peerCfg netip.AddrPort, localAddrs []netip.Addr) NAT {
	n := NAT{LocalObserved: localObserved, PeerObserved: peerObserved}
	if lo := localObserved; lo.IsValid() {
		la := local.Addr().Unmap()
		switch {
		case lo.Port() != local.Port():
			n.Behind = true
		case la.IsValid() && !la.IsUnspecified():
			n.Behind = lo.Addr().Unmap() != la
		default:
			n.Behind = !slices.Contains(localAddrs, lo.Addr().Unmap())
		}
	}
	differs := func(a, b netip.AddrPort) bool {
		return a.IsValid() && b.IsValid() && (a.Addr().Unmap() != b.Addr().Unmap() || a.Port() != b.Port())
	}
	n.PeerBehind = differs(peerSource, peerObserved) || differs(peerCfg, peerObserved)
	return n
}

// sourceOf is where this side sends a session to remote from: the
// socket's own address if it is bound to one, else the address the
// kernel picks towards remote, with the socket's port. Zero if neither
// is known.
func sourceOf(local, remote netip.AddrPort) netip.AddrPort {
	if !local.IsValid() || !remote.IsValid() {
		return netip.AddrPort{}
	}
	if a := local.Addr().Unmap(); !a.IsUnspecified() {
		return netip.AddrPortFrom(a, local.Port())
	}
	// Connecting a UDP socket sends nothing; it makes the kernel choose
	// the source address as it does for the session's packets.
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())))
	if err != nil {
		return netip.AddrPort{}
	}
	defer c.Close()
	return netip.AddrPortFrom(c.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Unmap(), local.Port())
}

// hostAddrs are the addresses of this host's interfaces, unmapped.
func hostAddrs() []netip.Addr {
	as, err := net.InterfaceAddrs()
	if err != nil {
		return nil
	}
	var out []netip.Addr
	for _, a := range as {
		if pn, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(pn.IP); ok {
				out = append(out, ip.Unmap())
			}
		}
	}
	return out
}

func addrPortOf(a net.Addr) netip.AddrPort {
	ua, ok := a.(*net.UDPAddr)
	if !ok {
		return netip.AddrPort{}
	}
	ap := ua.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// PeerBackends are the backends the peer offered in its Hello.
func (s *Session) PeerBackends() wire.Backends { return s.hello.Backends }

// PeerPSPVersions are the kernel PSP versions the peer's devices accept,
// as its Hello said; ok false if it did not say.
func (s *Session) PeerPSPVersions() (v wire.PSPVersions, ok bool) {
	return s.hello.PSP, s.hello.PSPKnown
}

// Close ends the session, telling the peer why, and wipes its master keys.
func (s *Session) Close(cause error) {
	code, msg := closeNormal, "closed"
	switch {
	case errors.Is(cause, errReplaced), errors.Is(cause, errDuplicate):
		code, msg = closeReplaced, cause.Error()
	case errors.Is(cause, errGoodbye):
		msg = cause.Error()
	case cause != nil:
		code, msg = closeProtocol, cause.Error()
	}
	s.cancel(cause)
	if code == closeProtocol {
		// Give the Error frame we just wrote a moment to arrive before
		// CONNECTION_CLOSE discards unsent stream data; a conforming peer
		// closes first when it reads it.
		go func() {
			select {
			case <-s.conn.Context().Done():
			case <-time.After(errorLinger):
			}
			s.conn.CloseWithError(code, msg)
		}()
	} else {
		s.conn.CloseWithError(code, msg)
	}
	s.mu.Lock()
	if s.mk != nil {
		s.mk.Wipe()
		s.mk = nil
	}
	s.mu.Unlock()
}

const errorLinger = 250 * time.Millisecond

var (
	errReplaced  = errors.New("replaced by a newer session")
	errDuplicate = errors.New("duplicate session: the initiator keeps the one it dialed")
)

// errGoodbye is the cause of a session the peer ended on purpose.
var errGoodbye = errors.New("peer said goodbye")

func goodbyeErr(reason string) error { return fmt.Errorf("%w: %s", errGoodbye, reason) }

// goodbye ends the session on purpose, telling the peer why so that it
// marks this side down at once: a Goodbye message, and the same reason in
// the CONNECTION_CLOSE in case the message does not make it. It waits up
// to errorLinger for the peer to close first (it does on the Goodbye), so
// that the close is not lost when the caller shuts the socket next.
func (s *Session) goodbye(reason wire.GoodbyeReason) {
	if s.ctx.Err() == nil {
		ctx, cancel := context.WithTimeout(context.Background(), errorLinger)
		if err := s.send(ctx, wire.Goodbye{Reason: reason}); err == nil {
			select {
			case <-s.conn.Context().Done():
			case <-ctx.Done():
			}
		}
		cancel()
	}
	s.cancel(goodbyeErr("sent: " + reason.String()))
	s.conn.CloseWithError(closeGoodbye, reason.String())
	s.mu.Lock()
	if s.mk != nil {
		s.mk.Wipe()
		s.mk = nil
	}
	s.mu.Unlock()
}

// electRole makes the side with the smaller SPKI the initiator. Both sides
// compute the same answer without a message; equal keys mean someone
// copied an identity and are refused.
func electRole(local, peer identity.PublicKey) (kdf.Role, error) {
	switch identity.Compare(local, peer) {
	case -1:
		return kdf.Initiator, nil
	case 1:
		return kdf.Responder, nil
	}
	return 0, errors.New("peer presents our own identity key; each host needs its own (pspd genkey)")
}

// deriveMasterKeys turns the TLS exporter secret into the two PSP master
// keys. The root secret is wiped on every path.
func deriveMasterKeys(st quic.ConnectionState) (*kdf.MasterKeys, error) {
	root, err := st.TLS.ExportKeyingMaterial(exporterLabel, nil, rootSecretLen)
	if err != nil {
		return nil, fmt.Errorf("TLS exporter: %w", err)
	}
	defer secret.Zero(root)
	okm, err := hkdf.Key(sha256.New, root, nil, masterKeyInfo, 2*kdf.MasterKeyLen)
	if err != nil {
		return nil, fmt.Errorf("HKDF: %w", err)
	}
	mk, err := kdf.NewMasterKeys(secret.New(okm[:kdf.MasterKeyLen]), secret.New(okm[kdf.MasterKeyLen:]))
	secret.Zero(okm)
	return mk, err
}

// newSession authenticates conn's result, derives the master keys and
// exchanges Hellos; the dialer speaks first. local is the identity this
// side presented when it dialed; zero for an inbound connection, whose
// context says (listenConfig). On error conn is closed.
func (e *Endpoint) newSession(ctx context.Context, conn *quic.Conn, local identity.PublicKey) (s *Session, err error) {
	dialer := !local.IsZero()
	if !dialer {
		if n, ok := conn.Context().Value(presentedKey{}).(*presented); ok {
			local = n.get()
		}
	}
	st := conn.ConnectionState()
	peer, err := verifyPeer(st.TLS, time.Now())
	if err == nil {
		err = checkFresh(st)
	}
	defer func() {
		if err != nil {
			e.failures.Add(1)
			err = peerErr(peer, "session setup", err)
			conn.CloseWithError(closeProtocol, err.Error())
		} else {
			e.countHandshake(st.TLS.CurveID)
		}
	}()
	if err != nil {
		return nil, err
	}
	if local.IsZero() {
		return nil, errors.New("internal error: the identity this host presented is not known")
	}
	role, err := electRole(local, peer)
	if err != nil {
		return nil, err
	}
	mk, err := deriveMasterKeys(st)
	if err != nil {
		return nil, err
	}
	alloc, err := newAllocator(role, 0, e.cfg.MaxSAsPerSession)
	if err != nil {
		mk.Wipe()
		return nil, err
	}
	sctx, cancel := context.WithCancelCause(conn.Context())
	s = &Session{
		conn: conn, dialed: dialer, peer: peer, local: local, saPeer: peer, role: role, timeout: e.cfg.NegotiationTimeout,
		log: e.log.With(e.peerAttrs(peer)...).With("role", role.String()),
		ctx: sctx, cancel: cancel, mk: mk, alloc: alloc, rxIDs: &e.rxIDs, lastGen: map[wire.AssocID]uint32{},
	}
	if s.hello, err = e.exchangeHello(ctx, conn, peer, dialer); err != nil {
		s.Close(err)
		return nil, err
	}
	var peerCfg netip.AddrPort
	p := e.peer(peer)
	if p != nil {
		peerCfg, s.saPeer = p.cfg.Addr, p.cfg.Key
	}
	s.nat = detectNAT(addrPortOf(conn.LocalAddr()), s.hello.Observed, addrPortOf(conn.RemoteAddr()), s.hello.Source, peerCfg, hostAddrs())
	if s.nat.Detected() && (p == nil || p.natChanged(s.nat)) {
		s.log.Info("NAT detected", "behind_nat", s.nat.Behind, "peer_behind_nat", s.nat.PeerBehind,
			"local_observed", s.nat.LocalObserved.String(), "peer_observed", s.nat.PeerObserved.String(), "peer_configured", peerCfg.String())
	}
	return s, nil
}

// reservedKeyIDs are never allocated: an initiator SPI under master key 0
// is its key id, and ESP reserves SPIs 1-255 (RFC 4303 §2.1), which the
// XFRM backend cannot install. Skipping them everywhere costs 255 of the
// 2^30 ids and keeps SPIs the same whatever the backend.
const reservedKeyIDs = 255

// newAllocator hands out at most perSession receive SPIs above floor.
func newAllocator(role kdf.Role, floor, perSession uint32) (*kdf.Allocator, error) {
	floor = max(floor, reservedKeyIDs)
	if floor >= kdf.MaxKeyID {
		return nil, kdf.ErrSPIExhausted
	}
	last := uint32(kdf.MaxKeyID)
	if perSession != 0 && perSession < last-floor {
		last = floor + perSession
	}
	return kdf.NewAllocatorRange(0, role, floor+1, last)
}

// rxIDSpace hands out the key ids of every receive SPI of an endpoint,
// across all its peers and sessions, each once. The kernel keys an inbound
// ESP SA by (destination address, SPI, mark), the same for every peer, so
// two peers of the same role must never get the same receive SPI; and an
// SPI still held by a retiring SA of an earlier session is never handed
// out again either.
type rxIDSpace struct {
	mu   sync.Mutex
	next uint32
}

// take returns an id of at least min that was never returned before.
func (r *rxIDSpace) take(min uint32) (uint32, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	id := max(min, r.next)
	if id == 0 || id > kdf.MaxKeyID {
		return 0, kdf.ErrSPIExhausted
	}
	r.next = id + 1
	return id, nil
}

// nextRxSPI allocates a receive SPI: within the session's budget and
// above its floor, and unique among all of the endpoint's.
func (s *Session) nextRxSPI() (kdf.SPI, error) {
	s.mu.Lock()
	a := s.alloc
	s.mu.Unlock()
	spi, err := a.Next()
	if err != nil {
		return 0, err
	}
	id, err := s.rxIDs.take(spi.Counter())
	if err != nil {
		return 0, err
	}
	return kdf.MakeSPI(spi.MasterKeyIndex(), s.role, id)
}

// raiseFloor makes the session allocate above floor, so that it never
// hands out an SPI that an SA of an earlier session still uses. It must be
// called before the session negotiates.
func (s *Session) raiseFloor(floor, perSession uint32) error {
	a, err := newAllocator(s.role, floor, perSession)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.alloc = a
	s.mu.Unlock()
	return nil
}

func (e *Endpoint) exchangeHello(ctx context.Context, conn *quic.Conn, peer identity.PublicKey, dialer bool) (wire.Hello, error) {
	ctx, cancel := context.WithTimeout(ctx, e.cfg.NegotiationTimeout)
	defer cancel()
	var str *quic.Stream
	var err error
	if dialer {
		str, err = conn.OpenStreamSync(ctx)
	} else {
		str, err = conn.AcceptStream(ctx)
	}
	if err != nil {
		return wire.Hello{}, fmt.Errorf("hello stream: %w", err)
	}
	defer str.Close()
	if d, ok := ctx.Deadline(); ok {
		str.SetDeadline(d)
	}
	mine := e.hello(peer)
	mine.Observed = addrPortOf(conn.RemoteAddr())
	mine.Source = sourceOf(addrPortOf(conn.LocalAddr()), mine.Observed)
	if p := e.peer(peer); p != nil && p.cfg.PSPVersions != nil {
		mine.PSP, mine.PSPKnown = p.cfg.PSPVersions()
	}
	if dialer {
		if err := wire.WriteMessage(str, mine); err != nil {
			return wire.Hello{}, err
		}
	}
	m, err := wire.ReadMessage(str)
	if err != nil {
		return wire.Hello{}, fmt.Errorf("read hello: %w", err)
	}
	h, ok := m.(wire.Hello)
	if !ok {
		return wire.Hello{}, unexpected(m, "Hello")
	}
	if !dialer {
		if err := wire.WriteMessage(str, mine); err != nil {
			return wire.Hello{}, err
		}
	}
	return h, nil
}

func unexpected(m wire.Message, want string) error {
	if em, ok := m.(wire.Error); ok {
		return &wire.ProtocolError{Code: em.Code, Msg: em.Text, Remote: true}
	}
	return &wire.ProtocolError{Code: wire.CodeType, Msg: fmt.Sprintf("got %s, want %s", m.Type(), want)}
}

// fail reports err to the peer on str (best effort) and returns it wrapped
// with the peer's fingerprint.
func (s *Session) fail(str *quic.Stream, op string, err error) error {
	var pe *wire.ProtocolError
	code := wire.CodeInternal
	switch {
	case errors.As(err, &pe):
		code = pe.Code
		if pe.Remote {
			str = nil // never echo the peer's own error back
		}
	case errors.Is(err, kdf.ErrSPIExhausted):
		code = wire.CodeSPIExhausted
	case errors.Is(err, errInstall):
		code = wire.CodeInstall
	case errors.Is(err, errUnsupported):
		code = wire.CodeUnsupported
	case errors.Is(err, context.DeadlineExceeded) || isTimeout(err):
		code = wire.CodeTimeout
	}
	if str != nil {
		str.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		wire.WriteMessage(str, wire.Error{Code: code, Text: err.Error()})
		str.Close()
	}
	return peerErr(s.peer, op, err)
}

func isTimeout(err error) bool {
	var ne interface{ Timeout() bool }
	return errors.As(err, &ne) && ne.Timeout()
}

var (
	errInstall     = errors.New("install failed")
	errUnsupported = errors.New("unsupported")
)

// derive builds the SA for our rx SPI and the peer's. It checks that the
// peer's SPI carries the peer's role bit, so the two directions can never
// share an SPI or a key, and that neither SPI was used before in this
// session, so no key is ever derived (and installed) twice.
func (s *Session) derive(peer identity.PublicKey, assoc wire.AssocID, gen uint32, b wire.Backend, suite kdf.Suite, rx, tx kdf.SPI) (*SA, error) {
	if tx.Role() == s.role || tx.MasterKeyIndex() != 0 || tx.Counter() == 0 {
		return nil, &wire.ProtocolError{Code: wire.CodeMalformed, Msg: fmt.Sprintf("peer SPI %s is not a %s SPI under master key 0", tx, otherRole(s.role))}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mk == nil {
		return nil, errors.New("session closed")
	}
	if err := s.used.use(rx, tx); err != nil {
		return nil, err
	}
	rxKey, err := s.mk.Derive(rx, suite)
	if err != nil {
		return nil, err
	}
	txKey, err := s.mk.Derive(tx, suite)
	if err != nil {
		rxKey.Wipe()
		return nil, err
	}
	sa := &SA{Peer: peer, ID: assoc, Backend: b, Suite: suite, Generation: gen, RxSPI: rx, TxSPI: tx, RxKey: rxKey, TxKey: txKey}
	if sa.RxSalt, err = s.mk.DeriveSalt(rx, suite); err == nil {
		sa.TxSalt, err = s.mk.DeriveSalt(tx, suite)
	}
	if err != nil {
		sa.Wipe()
		return nil, err
	}
	return sa, nil
}

func otherRole(r kdf.Role) kdf.Role { return 1 - r }

// install runs the installer and turns its failure into errInstall; on
// failure the SA's keys are wiped.
func install(ctx context.Context, inst Installer, sa *SA) error {
	if err := inst.Install(ctx, sa); err != nil {
		sa.Wipe()
		return fmt.Errorf("%w: %s: %w", errInstall, sa, err)
	}
	return nil
}

func (s *Session) openStream(ctx context.Context) (*quic.Stream, context.CancelFunc, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	str, err := s.conn.OpenStreamSync(ctx)
	if err != nil {
		cancel()
		return nil, nil, err
	}
	d, _ := ctx.Deadline()
	str.SetDeadline(d)
	return str, cancel, nil
}

// negotiate is the initiator's side of one SA negotiation: offer our rx
// SPI, get the responder's after it installed, install, confirm. It
// returns the installed SA. Any error is fatal to the session, and leaves
// nothing installed on this side.
func (s *Session) negotiate(ctx context.Context, inst Installer, assoc wire.AssocID, gen uint32, b wire.Backend, suite kdf.Suite) (*SA, error) {
	const op = "negotiate"
	if s.role != kdf.Initiator {
		return nil, peerErr(s.peer, op, errors.New("only the initiator negotiates"))
	}
	if !s.hello.Backends.Has(b) || !s.hello.Suites.Has(suite) {
		return nil, s.fail(nil, op, fmt.Errorf("%w: peer does not offer backend %s with suite %s", errUnsupported, b, suite))
	}
	rx, err := s.nextRxSPI()
	if err != nil {
		return nil, s.fail(nil, op, err)
	}
	str, cancel, err := s.openStream(ctx)
	if err != nil {
		return nil, s.fail(nil, op, err)
	}
	defer cancel()
	offer := wire.SAOffer{Assoc: assoc, Generation: gen, Backend: b, Suite: suite, RxSPI: rx}
	if err := wire.WriteMessage(str, offer); err != nil {
		return nil, s.fail(str, op, err)
	}
	m, err := wire.ReadMessage(str)
	if err != nil {
		return nil, s.fail(str, op, fmt.Errorf("waiting for SAAck: %w", err))
	}
	ack, ok := m.(wire.SAAck)
	if !ok {
		return nil, s.fail(str, op, unexpected(m, "SAAck"))
	}
	if ack.Assoc != assoc || ack.Generation != gen || ack.Backend != b || ack.Suite != suite {
		return nil, s.fail(str, op, &wire.ProtocolError{Code: wire.CodeMalformed, Msg: fmt.Sprintf("SAAck %+v does not answer offer %+v", ack, offer)})
	}
	sa, err := s.derive(s.saPeer, assoc, gen, b, suite, rx, ack.RxSPI)
	if err != nil {
		return nil, s.fail(str, op, err)
	}
	if err := install(ctx, inst, sa); err != nil {
		return nil, s.fail(str, op, err)
	}
	// The ack says the responder receives on our TX SPI: send under it now.
	// The responder switches only after our confirm, by which time our
	// inbound side is in place.
	if err := inst.Activate(ctx, sa); err != nil {
		s.removeAfterFailure(inst, sa)
		return nil, s.fail(str, op, fmt.Errorf("%w: %s: activate: %w", errInstall, sa, err))
	}
	if err := wire.WriteMessage(str, wire.SAConfirm{Assoc: assoc, Generation: gen}); err != nil {
		s.removeAfterFailure(inst, sa)
		return nil, s.fail(str, op, err)
	}
	str.Close()
	return sa, nil
}

func (s *Session) removeAfterFailure(inst Installer, sa *SA) {
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	if err := inst.Remove(ctx, sa); err != nil {
		s.log.Error("remove SA after failed negotiation", "sa", sa, "err", err)
	}
	sa.Wipe()
}

// handlers are what a session reports to its owner.
type handlers struct {
	installer func(wire.AssocID, wire.Backend, kdf.Suite) (Installer, error) // error: not accepted
	allow     func() bool                                                    // responder: may the peer negotiate now?
	confirmed func(*SA)                                                      // responder: an SA is confirmed
	deleted   func(wire.AssocID, uint32)                                     // peer deleted a generation
	rekey     func(wire.AssocID)                                             // peer asks for a rekey
	key       func(wire.ExplicitKey)                                         // peer sent a PSP key; owns it
}

// serve handles the streams the peer opens until the session ends, and
// returns why it ended. A protocol or negotiation error closes the session.
func (s *Session) serve(h handlers) error {
	for {
		str, err := s.conn.AcceptStream(s.ctx)
		if err != nil {
			cause := context.Cause(s.ctx)
			var ae *quic.ApplicationError
			if errors.As(cause, &ae) && ae.Remote && ae.ErrorCode == closeGoodbye {
				// The Goodbye message was lost, its CONNECTION_CLOSE was not.
				cause = goodbyeErr(ae.ErrorMessage)
			}
			return peerErr(s.peer, "session", cause)
		}
		str.SetDeadline(time.Now().Add(s.timeout))
		if err := s.handle(str, h); err != nil {
			s.Close(err)
			return err
		}
	}
}

func (s *Session) handle(str *quic.Stream, h handlers) error {
	m, err := wire.ReadMessage(str)
	if err != nil {
		if errors.Is(err, io.EOF) {
			return s.fail(str, "serve", &wire.ProtocolError{Code: wire.CodeMalformed, Msg: "empty stream"})
		}
		if isTimeout(err) {
			err = fmt.Errorf("no complete message within %s: %w", s.timeout, err)
		}
		return s.fail(str, "serve", err)
	}
	switch m := m.(type) {
	case wire.SAOffer:
		return s.respond(str, h, m)
	case wire.Rekey:
		if s.role != kdf.Initiator {
			return s.fail(str, "serve", &wire.ProtocolError{Code: wire.CodeType, Msg: "Rekey sent to the responder"})
		}
		str.Close()
		h.rekey(m.Assoc)
	case wire.Delete:
		str.Close()
		h.deleted(m.Assoc, m.Generation)
	case wire.ExplicitKey:
		str.Close()
		h.key(m)
	case wire.Goodbye:
		str.Close()
		return peerErr(s.peer, "session", goodbyeErr(m.Reason.String()))
	default:
		return s.fail(str, "serve", unexpected(m, "SAOffer, Rekey, Delete, ExplicitKey or Goodbye"))
	}
	return nil
}

// respond is the responder's side of a negotiation. The SA it installs is
// removed again unless the initiator confirms it before the deadline.
func (s *Session) respond(str *quic.Stream, h handlers, offer wire.SAOffer) error {
	const op = "respond"
	if s.role != kdf.Responder {
		return s.fail(str, op, &wire.ProtocolError{Code: wire.CodeType, Msg: "SAOffer sent to the initiator"})
	}
	if !h.allow() {
		return s.fail(str, op, &wire.ProtocolError{Code: wire.CodeRateLimit, Msg: "peer starts negotiations faster than this host serves them (see Config.PeerNegotiationBurst)"})
	}
	inst, err := h.installer(offer.Assoc, offer.Backend, offer.Suite)
	if err != nil {
		return s.fail(str, op, err)
	}
	if err := s.checkGeneration(offer.Assoc, offer.Generation); err != nil {
		return s.fail(str, op, err)
	}
	rx, err := s.nextRxSPI()
	if err != nil {
		return s.fail(str, op, err)
	}
	sa, err := s.derive(s.saPeer, offer.Assoc, offer.Generation, offer.Backend, offer.Suite, rx, offer.RxSPI)
	if err != nil {
		return s.fail(str, op, err)
	}
	ctx, cancel := context.WithTimeout(s.ctx, s.timeout)
	defer cancel()
	if err := install(ctx, inst, sa); err != nil {
		return s.fail(str, op, err)
	}
	ack := wire.SAAck{Assoc: offer.Assoc, Generation: offer.Generation, Backend: offer.Backend, Suite: offer.Suite, RxSPI: rx}
	err = wire.WriteMessage(str, ack)
	var m wire.Message
	if err == nil {
		m, err = wire.ReadMessage(str)
		if errors.Is(err, io.EOF) {
			err = &wire.ProtocolError{Code: wire.CodeMalformed, Msg: "stream ended before SAConfirm"}
		}
	}
	if err == nil {
		if c, ok := m.(wire.SAConfirm); !ok {
			err = unexpected(m, "SAConfirm")
		} else if c.Assoc != offer.Assoc || c.Generation != offer.Generation {
			err = &wire.ProtocolError{Code: wire.CodeMalformed, Msg: fmt.Sprintf("SAConfirm for %d/%d, offer was %d/%d", c.Assoc, c.Generation, offer.Assoc, offer.Generation)}
		}
	}
	if err != nil {
		s.removeAfterFailure(inst, sa)
		return s.fail(str, op, fmt.Errorf("waiting for SAConfirm: %w", err))
	}
	if err := inst.Activate(ctx, sa); err != nil {
		s.removeAfterFailure(inst, sa)
		return s.fail(str, op, fmt.Errorf("%w: %s: activate: %w", errInstall, sa, err))
	}
	str.Close()
	h.confirmed(sa)
	return nil
}

// Generations bounds. An honest initiator numbers the offers of one
// session consecutively, and never comes near maxGeneration (one rekey a
// second would take 68 years); a peer jumping ahead would otherwise drive
// the counter to its end, where no later generation can follow.
const (
	maxGeneration     = 1 << 31
	maxGenerationStep = 1024
)

// checkGeneration refuses a generation that does not follow the ones this
// session has seen. Across sessions generations are not compared: an
// initiator whose Peer was re-added starts again at 1, and keys never
// depend on the generation (the SPI record guards them).
func (s *Session) checkGeneration(assoc wire.AssocID, gen uint32) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	last := s.lastGen[assoc]
	var msg string
	switch {
	case gen > maxGeneration:
		msg = fmt.Sprintf("generation %d of association %d is above the limit %d", gen, assoc, uint32(maxGeneration))
	case gen <= last:
		msg = fmt.Sprintf("generation %d of association %d after %d", gen, assoc, last)
	case last != 0 && gen-last > maxGenerationStep:
		msg = fmt.Sprintf("generation %d of association %d jumps more than %d past %d", gen, assoc, maxGenerationStep, last)
	}
	if msg != "" {
		return &wire.ProtocolError{Code: wire.CodeGeneration, Msg: msg}
	}
	s.lastGen[assoc] = gen
	return nil
}

// send opens a stream for a one-message notification (Rekey, Delete).
func (s *Session) send(ctx context.Context, m wire.Message) error {
	str, cancel, err := s.openStream(ctx)
	if err != nil {
		return peerErr(s.peer, "send "+m.Type().String(), err)
	}
	defer cancel()
	defer str.Close()
	if err := wire.WriteMessage(str, m); err != nil {
		return peerErr(s.peer, "send "+m.Type().String(), err)
	}
	return nil
}
