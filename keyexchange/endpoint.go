// Package keyexchange authenticates pspd peers and agrees on the keys of
// their security associations.
//
// An Endpoint owns one UDP socket, used by a quic.Transport both to accept
// and to dial, and one identity. Each pinned peer is a Peer: a lifecycle
// object that keeps one QUIC session with mutual TLS 1.3 to that peer up,
// negotiates SAs over it, rekeys them on a jittered timer and on demand,
// and reconnects with exponential backoff when the session is lost.
//
//	ep, err := keyexchange.NewEndpoint(ctx, keyexchange.Config{
//		Identity:   id,
//		ListenAddr: "0.0.0.0:6082",
//		Installers: map[wire.Backend]keyexchange.Installer{wire.BackendXFRM: xfrmBackend},
//	})
//	peer, err := ep.AddPeer(keyexchange.PeerConfig{Key: pin, Addr: addr, Backend: wire.BackendXFRM, Suite: kdf.AESGCM256})
//	sa, err := peer.WaitGeneration(ctx, 1) // first SA confirmed on both sides
//
// Security properties, and where they come from:
//
//   - Authentication is SPKI pinning in VerifyConnection and nothing else;
//     certificates are self-signed per process. TLS 1.3 only, ALPN
//     "pspd/1", no session tickets; a resumed or 0-RTT session is refused
//     after the handshake as well, so every session is a fresh key
//     exchange. The key exchange is hybrid post-quantum by default
//     (SecP256r1MLKEM768 preferred, X25519MLKEM768 accepted, P-256 as the
//     fallback; Config.ClassicKeyExchange for P-256 only).
//   - Each session exports a 32-byte root secret (label
//     "EXPORTER-pspd-root-v1"), expands it with HKDF-SHA256 into the two
//     PSP master keys and wipes it; the master keys are wiped when the
//     session ends. SA keys are derived from master key and SPI with the
//     PSP KDF on both sides; for derived-key backends no key crosses the
//     wire.
//   - The peer with the smaller SPKI is the canonical initiator: it dials
//     and it negotiates. Each side announces the SPI it receives on
//     (SAOffer, SAAck); the responder installs before it acks, the
//     initiator installs before it confirms, and only the confirmation
//     makes an SA current. Each side switches its outbound traffic
//     (Installer.Activate) only once the other side can receive: the
//     initiator on the ack, the responder on the confirmation. Any
//     negotiation error ends the session and leaves nothing of that SA
//     installed.
//   - Rekeying is make-before-break: the new generation is installed and
//     confirmed before the previous one is removed, after a grace period.
//   - A pinned peer is authenticated, not trusted. No SPI is used twice in
//     a session in either direction (one SPI under one session's master
//     keys is one key, and a key installed again restarts its nonce
//     counter), whatever the peer sends; generations must follow each
//     other; offers for an association the peer does not have are
//     refused; and the negotiations a peer can make this host run are
//     rate-limited (Config.PeerNegotiationBurst). Each violation ends the
//     session with an error naming the peer's fingerprint.
//   - The peer's boot id in Hello tells a reconnect from a restart; after a
//     restart the previous generation is removed at once, since the peer
//     has lost its keys. A starting responder dials the initiator at once,
//     so that an initiator still holding a session with its previous
//     incarnation learns of the restart without waiting for a timeout. A
//     responder that lost its session dials the initiator too, with
//     backoff, until it has one again: behind a NAT that rebound, the
//     initiator can reach it only through the mapping that dial opens.
//   - A clean stop (Endpoint.Close, Peer.Close) sends a Goodbye, so the
//     other side marks this host down at once rather than after
//     Config.IdleTimeout, and reconnects with backoff as after any
//     session end.
//
// Each Peer is a state machine (Peer.Status): connecting (dialing, or
// waiting for the peer to dial), handshaking (the peer answered; TLS, the
// Hellos and the first SA under way), up (an SA is confirmed), backoff
// (the last attempt failed) and down (closed). While not up, Status.Cause
// says why in operator terms: a wrong pin on either side names the key
// presented and the key pinned, by fingerprint, on both sides (the dialer
// sees the listener's key; the listener matches a refused key, or a
// handshake the dialer aborted, to the peer configured at that address);
// an unreachable peer says it does not answer; hosts without a common
// backend say what each offers. The log has one WARN line per cause, not
// one per retry, a reminder every few minutes while the peer stays down,
// and one INFO line when it is up. Causes learnt from inbound handshakes
// are hints from an unauthenticated source (a host at the peer's address
// that passed the QUIC address check), so they only ever change what a
// peer that is not up reports.
//
// Kernel PSP device keys (wire.ExplicitKey) are carried by the protocol but
// not yet negotiated by Peer; that needs the PSP netlink backend.
package keyexchange

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/keyexchange/wire"
)

// Config configures an Endpoint. Zero durations take the defaults shown.
type Config struct {
	Identity *identity.Identity
	// Previous, if set, is the identity presented before Identity: an
	// identity rotation under way when the endpoint starts (see Rotate).
	Previous *identity.Identity
	// ListenAddr is the UDP address of the control socket, e.g.
	// "0.0.0.0:6082". The IPv6 wildcard ("[::]:6082" or ":6082") binds
	// two sockets, an IPv4 one and an IPv6-only one, and Control sees
	// each.
	ListenAddr string
	// Installers are the data planes this host offers, by backend; the
	// Hello advertises exactly these.
	Installers map[wire.Backend]Installer
	// Suites this host accepts; zero means both AES-GCM suites.
	Suites wire.Suites
	Logger *slog.Logger
	// Offers are backends the Hello advertises besides the installers':
	// kernel PSP, whose keys travel as ExplicitKey rather than through an
	// Installer.
	Offers wire.Backends
	// ExplicitKeys receives the kernel PSP keys peers send
	// (wire.ExplicitKey), only ever on their authenticated sessions. It
	// owns the key and must wipe it, and must not block: the session
	// reads nothing else while it runs. Nil drops and wipes them.
	ExplicitKeys func(peer identity.PublicKey, k wire.ExplicitKey)
	// Control, when set, runs on the control socket before it is bound
	// (as in net.ListenConfig). The XFRM backend uses it to exempt the
	// socket from IPsec policies that cover the peers' addresses.
	Control func(network, address string, c syscall.RawConn) error

	HandshakeTimeout   time.Duration // 5s
	IdleTimeout        time.Duration // 30s; a silent peer is gone after this
	KeepAlive          time.Duration // 5s
	NegotiationTimeout time.Duration // 5s; a peer stalling mid-negotiation hits it
	// MaxSAsPerSession caps the SPIs one session hands out (default: the
	// whole 2^30 space); exhaustion ends the session and a new one with
	// fresh master keys takes over.
	MaxSAsPerSession uint32
	// PeerNegotiationBurst and PeerNegotiationInterval bound the
	// negotiations a peer can make this host run, since each costs key
	// derivations and kernel installs: beyond a burst of
	// PeerNegotiationBurst (8), one per PeerNegotiationInterval (1s). As
	// responder (allowing one more than the burst, for jitter), an SAOffer
	// over the limit ends the session with a rate-limit error; as initiator, the peer's Rekey requests over the
	// limit are coalesced and served when the limit allows, and the
	// initiator paces every negotiation it starts (timer, Peer.Rekey) to
	// the same limit, so set the same values on both sides.
	PeerNegotiationBurst    int
	PeerNegotiationInterval time.Duration
	// ClassicKeyExchange restricts the TLS key exchange to P-256 ECDHE,
	// for peers that cannot do the hybrid post-quantum groups. By default
	// an endpoint prefers SecP256r1MLKEM768, accepts X25519MLKEM768 and
	// still accepts P-256, so a classic peer and a default one agree on
	// P-256: the default protects only sessions with peers that can do
	// better. Peer.Status and Session.Group say what a session used.
	ClassicKeyExchange bool
}

func (c *Config) setDefaults() error {
	if c.Identity == nil {
		return errors.New("keyexchange: Config.Identity is required (load one with identity.Load)")
	}
	if len(c.Installers) == 0 {
		return errors.New("keyexchange: Config.Installers is empty; at least one backend is needed")
	}
	for b, inst := range c.Installers {
		if !b.Valid() || inst == nil {
			return fmt.Errorf("keyexchange: Config.Installers[%s]: invalid backend or nil installer", b)
		}
	}
	if c.Suites == 0 {
		c.Suites = wire.NewSuites(kdf.AESGCM128, kdf.AESGCM256)
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.HandshakeTimeout, 5*time.Second)
	def(&c.IdleTimeout, 30*time.Second)
	def(&c.KeepAlive, 5*time.Second)
	def(&c.NegotiationTimeout, 5*time.Second)
	def(&c.PeerNegotiationInterval, time.Second)
	if c.PeerNegotiationBurst <= 0 {
		c.PeerNegotiationBurst = 8
	}
	return nil
}

// Endpoint is one daemon's control-plane socket and identity.
type Endpoint struct {
	cfg    Config
	boot   wire.BootID
	log    *slog.Logger
	listen netip.AddrPort
	socks  []*socket // one, or an IPv4 and an IPv6 one
	qconf  *quic.Config
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu sync.Mutex
	// cur is the identity this host presents; prev, during an identity
	// rotation, the one it presented before, still presented to the
	// peers that do not accept cur yet (Rotate, DropPrevious).
	cur, prev *local
	peers     map[identity.PublicKey]*Peer // by each key a peer may present
	rxIDs     rxIDSpace

	remindEvery   time.Duration                    // remindEvery; tests shorten it
	identityRetry time.Duration                    // identityRetry; tests shorten it
	strangers     map[identity.PublicKey]time.Time // keys refused, when last WARNed

	handshakes, failures atomic.Uint64
	groupsMu             sync.Mutex
	groups               map[tls.CurveID]uint64
}

// Stats counts an Endpoint's handshakes.
type Stats struct {
	// Handshakes are sessions that came up: TLS done, peer pinned, Hellos
	// exchanged.
	Handshakes uint64
	// HandshakeFailures are dials and sessions that failed before that.
	HandshakeFailures uint64
	// Groups counts the Handshakes by TLS key exchange group
	// (tls.SecP256r1MLKEM768, tls.CurveP256, ...).
	Groups map[tls.CurveID]uint64
}

// Stats reports the handshake counters.
func (e *Endpoint) Stats() Stats {
	e.groupsMu.Lock()
	groups := maps.Clone(e.groups)
	e.groupsMu.Unlock()
	return Stats{Handshakes: e.handshakes.Load(), HandshakeFailures: e.failures.Load(), Groups: groups}
}

func (e *Endpoint) countHandshake(g tls.CurveID) {
	e.handshakes.Add(1)
	e.groupsMu.Lock()
	e.groups[g]++
	e.groupsMu.Unlock()
}

// NewEndpoint binds the control socket and starts accepting sessions from
// peers added with AddPeer. It runs until ctx ends or Close is called.
func NewEndpoint(ctx context.Context, cfg Config) (*Endpoint, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	e := &Endpoint{cfg: cfg, peers: map[identity.PublicKey]*Peer{}, groups: map[tls.CurveID]uint64{}, remindEvery: remindEvery,
		identityRetry: identityRetry, strangers: map[identity.PublicKey]time.Time{}}
	if _, err := rand.Read(e.boot[:]); err != nil {
		return nil, fmt.Errorf("keyexchange: boot id: %w", err)
	}
	e.log = cfg.Logger.With("local", cfg.Identity.Public().Fingerprint())
	var err error
	if e.cur, err = newLocal(cfg.Identity); err != nil {
		return nil, err
	}
	if cfg.Previous != nil {
		if cfg.Previous.Public() == cfg.Identity.Public() {
			return nil, errors.New("keyexchange: Config.Previous is Config.Identity")
		}
		if e.prev, err = newLocal(cfg.Previous); err != nil {
			return nil, err
		}
	}
	ua, err := net.ResolveUDPAddr("udp", cfg.ListenAddr)
	if err != nil {
		return nil, fmt.Errorf("keyexchange: listen address %q: %w", cfg.ListenAddr, err)
	}
	listen := netip.AddrPortFrom(ua.AddrPort().Addr().Unmap(), uint16(ua.Port))
	if !listen.Addr().IsValid() { // ":6082"
		listen = netip.AddrPortFrom(netip.IPv6Unspecified(), uint16(ua.Port))
	}
	// The stateless-reset key comes from the identity, so that after a
	// restart this host answers the packets of its previous incarnation's
	// connections with a valid reset: the peer learns at once that the
	// session is gone and reconnects, instead of waiting for the idle
	// timeout.
	rk, err := cfg.Identity.DeriveSecret("pspd quic stateless reset v1", len(quic.StatelessResetKey{}))
	if err != nil {
		return nil, fmt.Errorf("keyexchange: %w", err)
	}
	var resetKey quic.StatelessResetKey
	copy(resetKey[:], rk)
	secret.Zero(rk)
	e.qconf = &quic.Config{
		HandshakeIdleTimeout:  cfg.HandshakeTimeout,
		MaxIdleTimeout:        cfg.IdleTimeout,
		KeepAlivePeriod:       cfg.KeepAlive,
		Allow0RTT:             false,
		MaxIncomingUniStreams: -1,
	}
	// Each socket has one address family, not a dual-stack socket for
	// [::], so that per-socket options (such as IPsec bypass policies,
	// which match one family) cover all of its traffic: [::] gets an
	// IPv4 socket and an IPv6-only one on the same port.
	la := listen.Addr().Unmap()
	binds := []netip.AddrPort{netip.AddrPortFrom(la, listen.Port())}
	if la.Is6() && la.IsUnspecified() {
		binds = []netip.AddrPort{netip.AddrPortFrom(netip.IPv4Unspecified(), listen.Port()), listen}
	}
	for _, b := range binds {
		if b.Port() == 0 && len(e.socks) > 0 {
			b = netip.AddrPortFrom(b.Addr(), e.socks[0].port())
		}
		s, err := e.open(ctx, b, &resetKey)
		if err != nil {
			e.closeSockets()
			return nil, err
		}
		e.socks = append(e.socks, s)
	}
	e.listen = netip.AddrPortFrom(listen.Addr(), e.socks[0].port())
	e.ctx, e.cancel = context.WithCancel(ctx)
	for _, s := range e.socks {
		e.wg.Go(func() { e.acceptLoop(s.ln) })
	}
	return e, nil
}

// socket is one control socket with its QUIC transport and listener.
type socket struct {
	udp *net.UDPConn
	tr  *quic.Transport
	ln  *quic.Listener
}

func (s *socket) port() uint16 { return s.udp.LocalAddr().(*net.UDPAddr).AddrPort().Port() }

func (s *socket) is4() bool { return s.udp.LocalAddr().(*net.UDPAddr).AddrPort().Addr().Unmap().Is4() }

func (s *socket) close() error {
	if s.ln != nil {
		s.ln.Close()
	}
	err := s.tr.Close()
	s.udp.Close()
	return err
}

// open binds one control socket at addr and listens on it.
func (e *Endpoint) open(ctx context.Context, addr netip.AddrPort, resetKey *quic.StatelessResetKey) (*socket, error) {
	network := "udp4"
	if addr.Addr().Is6() {
		network = "udp6" // IPv6 only, also for [::]
	}
	lc := net.ListenConfig{Control: e.cfg.Control}
	pc, err := lc.ListenPacket(ctx, network, addr.String())
	if err != nil {
		return nil, fmt.Errorf("keyexchange: %w", err)
	}
	s := &socket{udp: pc.(*net.UDPConn)}
	s.tr = &quic.Transport{
		Conn: s.udp,
		// Retry on every new connection: a spoofed source cannot make us
		// do handshake work or amplify towards a victim.
		VerifySourceAddress: func(net.Addr) bool { return true },
		StatelessResetKey:   resetKey,
		// To learn of inbound handshakes the dialer aborted (see
		// inboundEnded), when each inbound connection began (see
		// dialed.raced) and which identity it was shown (listenConfig).
		ConnContext: func(ctx context.Context, ci *quic.ClientInfo) (context.Context, error) {
			remote := ci.RemoteAddr
			context.AfterFunc(ctx, func() { e.inboundEnded(remote, context.Cause(ctx)) })
			ctx = context.WithValue(ctx, inboundBegan{}, time.Now())
			return context.WithValue(ctx, presentedKey{}, &presented{}), nil
		},
	}
	if s.ln, err = s.tr.Listen(e.listenConfig(), e.qconf); err != nil {
		s.close()
		return nil, fmt.Errorf("keyexchange: listen on %v: %w", addr, err)
	}
	return s, nil
}

func (e *Endpoint) closeSockets() error {
	var err error
	for _, s := range e.socks {
		err = errors.Join(err, s.close())
	}
	return err
}

// socketFor is the socket that reaches addr: the one of its family.
func (e *Endpoint) socketFor(addr netip.AddrPort) *socket {
	for _, s := range e.socks {
		if s.is4() == addr.Addr().Unmap().Is4() {
			return s
		}
	}
	return e.socks[0] // the other family: the dial fails with the kernel's reason
}

// Addr is the bound control socket address.
func (e *Endpoint) Addr() netip.AddrPort { return e.listen }

// Public is the identity this endpoint presents.
func (e *Endpoint) Public() identity.PublicKey {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.cur.id.Public()
}

// BootID identifies this endpoint instance.
func (e *Endpoint) BootID() wire.BootID { return e.boot }

// Close stops every peer (removing their SAs, telling each peer goodbye)
// and closes the socket.
func (e *Endpoint) Close() error {
	e.mu.Lock()
	peers := e.distinctPeers()
	e.mu.Unlock()
	// In parallel: each says goodbye and waits a moment for the peer.
	var wg sync.WaitGroup
	for _, p := range peers {
		wg.Go(func() { p.close(wire.GoodbyeShutdown) })
	}
	wg.Wait()
	e.cancel()
	err := e.closeSockets()
	e.wg.Wait()
	return err
}

func (e *Endpoint) hello(peer identity.PublicKey) wire.Hello {
	bs := e.cfg.Offers
	for b := range e.cfg.Installers {
		bs |= wire.NewBackends(b)
	}
	h := wire.Hello{Backends: bs, Suites: e.cfg.Suites, BootID: e.boot}
	if p := e.peer(peer); p != nil {
		h.SPIFloor = p.spiFloor()
	}
	return h
}

func (e *Endpoint) peer(pk identity.PublicKey) *Peer {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.peers[pk]
}

// listenConfig is the listener's TLS configuration. Each connection gets
// its own copy, whose pin check knows where the dialer is: a key that is
// not pinned here, arriving from the address of a pinned peer, is most
// likely that peer with a wrong pin, and its status should say so.
//
// The identity presented is the one the peer at that address takes
// (presentTo), and is noted in the connection's context for newSession.
func (e *Endpoint) listenConfig() *tls.Config {
	groups := keyExchangeGroups(false, e.cfg.ClassicKeyExchange)
	e.mu.Lock()
	cur := e.cur
	e.mu.Unlock()
	conf := tlsConfig(cur.leaf, func(pk identity.PublicKey) error { return e.allowInbound(pk, nil) }, groups)
	conf.GetConfigForClient = func(info *tls.ClientHelloInfo) (*tls.Config, error) {
		var remote net.Addr
		if info.Conn != nil {
			remote = info.Conn.RemoteAddr()
		}
		l := e.presentTo(e.peerAt(remote))
		if n, ok := info.Context().Value(presentedKey{}).(*presented); ok {
			n.set(l.id.Public())
		}
		return tlsConfig(l.leaf, func(pk identity.PublicKey) error { return e.allowInbound(pk, remote) }, groups), nil
	}
	return conf
}

// allowInbound is the listener's pin check.
func (e *Endpoint) allowInbound(pk identity.PublicKey, remote net.Addr) error {
	if p := e.peer(pk); p != nil {
		p.handshaking()
		return nil
	}
	err := &PeerError{Peer: pk, Op: "handshake", Err: errors.New("key is not pinned here; refusing")}
	if p := e.peerAt(remote); p != nil {
		p.noteCause(&wrongPinError{addr: p.cfg.Addr, presented: pk, pinned: p.cfg.Key, err: err})
		return err
	}
	if e.strangerNew(pk) {
		e.log.Warn("refused inbound session", "err", err, "remote", addrString(remote))
	} else {
		e.log.Debug("refused inbound session", "err", err, "remote", addrString(remote))
	}
	return err
}

// maxStrangers bounds the keys strangerNew remembers: each costs the
// stranger only a handshake.
const maxStrangers = 256

// strangerNew reports whether a key that is not pinned here was last
// refused longer than remindEvery ago, so that a host retrying with a
// wrong or unknown key gets one WARN line, not one per retry.
func (e *Endpoint) strangerNew(pk identity.PublicKey) bool {
	now := time.Now()
	e.mu.Lock()
	defer e.mu.Unlock()
	if last, ok := e.strangers[pk]; ok && now.Sub(last) < e.remindEvery {
		return false
	}
	if len(e.strangers) >= maxStrangers {
		clear(e.strangers)
	}
	e.strangers[pk] = now
	return true
}

// inboundBegan keys, in an inbound connection's context, when it began.
type inboundBegan struct{}

// inboundEnded runs when an inbound connection is over. One that the
// dialer aborted because of this host's certificate (it pins another key
// for this host) is a cause for the peer at that address: that side has
// the wrong pin, and without this, this side would only see silence.
func (e *Endpoint) inboundEnded(remote net.Addr, cause error) {
	if !refusedByPeer(cause) {
		return
	}
	if p := e.peerAt(remote); p != nil {
		p.noteCause(&refusedKeyError{addr: p.cfg.Addr, local: e.Public(), pinned: p.cfg.Key, err: cause})
		return
	}
	e.log.Debug("inbound handshake aborted by the dialer", "remote", addrString(remote), "err", cause)
}

// peerAt is the peer configured at addr: the one with that address and
// port, else the only one with that address.
func (e *Endpoint) peerAt(addr net.Addr) *Peer {
	ua, ok := addr.(*net.UDPAddr)
	if !ok {
		return nil
	}
	ap := ua.AddrPort()
	ip := ap.Addr().Unmap()
	e.mu.Lock()
	defer e.mu.Unlock()
	var byIP *Peer
	n := 0
	for _, p := range e.distinctPeers() {
		if p.cfg.Addr.Addr().Unmap() != ip {
			continue
		}
		if p.cfg.Addr.Port() == ap.Port() {
			return p
		}
		byIP = p
		n++
	}
	if n == 1 {
		return byIP
	}
	return nil
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

func (e *Endpoint) acceptLoop(ln *quic.Listener) {
	for {
		conn, err := ln.Accept(e.ctx)
		if err != nil {
			return
		}
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			s, err := e.newSession(e.ctx, conn, identity.PublicKey{})
			if err != nil {
				// The handshake authenticated the dialer: tell its peer.
				pk, _ := verifyPeer(conn.ConnectionState().TLS, time.Now())
				if p := e.peer(pk); p != nil {
					p.noteCause(err)
				} else {
					e.log.Warn("inbound session failed", "err", err)
				}
				return
			}
			p := e.peer(s.peer)
			if p == nil { // removed while the handshake ran
				s.Close(errors.New("peer removed"))
				return
			}
			p.offer(s)
		}()
	}
}

// dial opens a session to the peer with key want at addr, presenting the
// current identity.
func (e *Endpoint) dial(ctx context.Context, addr netip.AddrPort, want identity.PublicKey) (*Session, error) {
	return e.dialAnd(ctx, addr, pins{want}, e.presentTo(nil), nil)
}

// dialAnd is dial that presents l and accepts the keys in want, and calls
// answered when the peer has presented one of them, i.e. the handshake is
// under way. A peer presenting another key fails the dial with a
// wrongPinError.
func (e *Endpoint) dialAnd(ctx context.Context, addr netip.AddrPort, want pins, l *local, answered func()) (*Session, error) {
	var mismatch error
	conf := tlsConfig(l.leaf, func(got identity.PublicKey) error {
		if !want.has(got) {
			mismatch = &wrongPinError{addr: addr, presented: got, pinned: want[0]}
			return &PeerError{Peer: got, Op: "handshake", Err: mismatch}
		}
		if answered != nil {
			answered()
		}
		return nil
	}, keyExchangeGroups(true, e.cfg.ClassicKeyExchange))
	conn, err := e.socketFor(addr).tr.Dial(ctx, net.UDPAddrFromAddrPort(addr), conf, e.qconf)
	if err != nil {
		e.failures.Add(1)
		var wp *wrongPinError
		if mismatch != nil && !errors.As(err, &wp) {
			// Some quic-go paths keep only the text of a local
			// verification error.
			mismatch.(*wrongPinError).err = err
			err = mismatch
		}
		return nil, peerErr(want[0], "dial "+addr.String(), err)
	}
	return e.newSession(ctx, conn, l.id.Public())
}
