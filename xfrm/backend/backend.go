// Package backend is the kernel XFRM (IPsec ESP) data plane as pspd's key
// exchange sees it: for every configured peer it owns one reqid, the
// policies that steer the peer's prefixes into ESP, and the SA pairs of
// the associations the key exchange negotiates.
//
// It implements offload.Backend; that package states what every
// lifecycle transition leaves in the kernel.
//
// A peer whose prefixes are only its own address is protected in
// transport mode; any other prefix makes the peer's SAs tunnel mode
// between the two hosts. A peer that requires encryption has its policies
// installed as soon as it is added, and they stay in the kernel when pspd
// stops or dies, so that traffic to the peer is held back (the kernel
// finds no SA and drops it) rather than sent in clear until pspd is back
// and has negotiated new SAs. Without it, the policies exist only while
// an association does.
//
// A new generation replaces the old one make-before-break by traffic: the
// old generation's SAs go as soon as the new inbound SA has counted a
// packet (the peer has switched), at the latest after Config.RetireGrace.
// The key exchange's own later Remove of it is then a no-op.
//
// Behind a NAT (the key exchange detected one on either side) or with
// nat_traversal forced, a peer's SAs carry ESP in UDP (RFC 3948) between
// this host's encapsulation socket and the peer's as this host sees it:
// the address its session comes from, and the port its ESP comes from
// once the kernel reported a packet from another port than the SA's
// (XFRM_MSG_MAPPING, after the packet authenticated). A changed mapping
// asks the key exchange for a new generation, which uses it; the kernel
// sends NAT keep-alives for the host behind the NAT.
//
// Keys stay in the process only until the kernel has them: Install hands
// the receive key to the kernel and keeps a copy of the transmit key,
// which Activate hands over and wipes. What the backend remembers of a
// transmit key is a fingerprint under a per-process random key, so that
// it can refuse a transmit SPI and key it was given before.
package backend

import (
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"syscall"
	"time"

	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/offload"
	"github.com/pspd/pspd/xfrm"
)

// Config is what the backend is started with.
type Config struct {
	Offload xfrm.OffloadMode
	Logger  *slog.Logger
	// NetNS is an open network namespace fd to program; 0 means the
	// caller's namespace.
	NetNS int
	// Peers are the peers configured at start: the fail-closed state of
	// those that require encryption is kept through the start-up
	// reconcile, everything else pspd left in the kernel is removed.
	Peers []offload.PeerSpec
	// RetireGrace bounds how long a replaced generation stays when no
	// packet arrives on its successor; 0 means 30s.
	RetireGrace time.Duration
}

// defaultRetireGrace is how long a replaced generation stays at most when
// Config.RetireGrace is 0: the key exchange's default grace.
const defaultRetireGrace = 30 * time.Second

// defaultNATKeepalive is how long an outbound SA of a host behind a NAT
// may be idle before the kernel sends a keep-alive, when the spec does
// not say: below the 30 s that NATs commonly keep an idle UDP mapping.
const defaultNATKeepalive = 20 * time.Second

// retirePoll is how often a pending retirement reads the new inbound SA's
// counters, and so about how long the old generation outlives the first
// packet on the new one.
const retirePoll = 10 * time.Millisecond

// Backend programs XFRM state for pspd's peers.
type Backend struct {
	offload xfrm.OffloadMode
	log     *slog.Logger
	h       *xfrm.Handle
	links   *vnl.Handle
	netNS   int
	rekey   chan identity.PublicKey
	grace   time.Duration
	// ctx ends with Close: the kernel monitor and every pending
	// retirement run under it.
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{} // closed when the monitor has stopped; nil until it runs
	wg     sync.WaitGroup

	// fpKey keys the fingerprints of sent. It is random per backend (one
	// per pspd process) so that a fingerprint says nothing about a key
	// outside the process.
	fpKey secret.Key

	mu    sync.Mutex
	peers map[identity.PublicKey]*peer
	// sent holds, per peer, a fingerprint of every transmit (SPI, key)
	// pair the backend was given, for as long as it runs: peers come and
	// go, the record stays.
	sent map[identity.PublicKey]map[[sha256.Size]byte]struct{}
	// encap holds the ESP-in-UDP sockets, opened at the first SA that
	// needs one and kept until Close: the kernel takes the ESP arriving
	// on them.
	encap map[encapKey]*net.UDPConn
	// noKeepalive is set once the kernel refused NAT keep-alives (older
	// than 6.10); outbound SAs go without them from then on.
	noKeepalive bool
}

type encapKey struct {
	v6   bool
	port uint16
}

type peer struct {
	cfg   offload.PeerSpec
	reqid uint32
	mode  xfrm.Mode
	local netip.Addr
	// remote is the peer's address in SAs and policy templates: its
	// endpoint's, or with encapsulation the one its session or its ESP
	// comes from.
	remote netip.Addr
	// mapped is where the peer's ESP-in-UDP last came from when that was
	// not where its SAs expected it (a NAT's new mapping); unset until
	// then.
	mapped   netip.AddrPort
	dev      string // egress device, for crypto offload
	policies []xfrm.Policy
	polUp    bool
	sas      map[saKey]*pair
	retire   *retirement // replaced generations waiting for traffic on the newest
}

// saKey names one generation of an association.
type saKey struct {
	assoc assoc.ID
	gen   uint32
}

type pair struct {
	in, out  xfrm.ID
	outAdded bool
	// tx is the backend's copy of the transmit key, from Install until
	// Activate hands it to the kernel; it is wiped then and on every path
	// that ends the pair, so that no key stays in the process once the
	// kernel has it.
	tx     secret.Key
	txSalt [xfrm.SaltLen]byte
	failed bool // Activate failed and wiped tx: only Remove is left
}

// retirement is the replaced generations of a peer, removed once the
// newest generation's inbound SA has counted a packet (the peer sends
// under it, so it no longer sends under the old ones), or after the grace.
type retirement struct {
	newest saKey
	old    []saKey
	cancel context.CancelFunc
}

var _ offload.Backend = (*Backend)(nil)

// probeSPI is far from anything the key schedule allocates (it has bit 30
// clear and a key id of 0x3fff_fff0), so a probe never collides with a
// live SA.
const probeSPI = 0x3ffffff0

// Probe reports whether this host can run the XFRM backend for peers:
// the kernel must take an ESP rfc4106(gcm(aes)) SA (Probe adds and
// removes one that no policy uses), and ESP in UDP for peers that always
// need it.
func Probe(ctx context.Context, peers []offload.PeerSpec, netNS int) error {
	h, err := xfrm.Open(xfrm.Config{NetNS: netNS, Offload: xfrm.OffloadNone, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return fmt.Errorf("no XFRM netlink (%v): the xfrm backend needs CONFIG_XFRM_USER and CAP_NET_ADMIN", err)
	}
	defer h.Close()
	key := make([]byte, assoc.AESGCM128.KeyLen())
	sa := &xfrm.SA{
		Src: netip.MustParseAddr("192.0.2.254"), Dst: netip.MustParseAddr("192.0.2.255"), SPI: probeSPI,
		ReqID: h.Owner().ReqIDMax, Dir: xfrm.In, Suite: assoc.AESGCM128, Key: secret.Own(key),
	}
	if _, err := h.AddSA(ctx, sa); err != nil {
		return fmt.Errorf("the kernel refused an ESP rfc4106(gcm(aes)) SA (%v): the xfrm backend needs CONFIG_INET_ESP, CONFIG_INET6_ESP and CONFIG_CRYPTO_GCM", err)
	}
	if err := h.DeleteSA(ctx, sa.ID()); err != nil {
		return fmt.Errorf("remove the probe SA: %w", err)
	}
	// A peer that always needs ESP in UDP needs a kernel that has it; one
	// that needs it only behind a NAT finds out at its first such SA.
	for _, p := range peers {
		if p.NATTraversal != offload.NATForce {
			continue
		}
		network := "udp4"
		if p.Endpoint.Addr().Unmap().Is6() {
			network = "udp6"
		}
		c, err := xfrm.ListenEncap(ctx, netNS, network, 0)
		if err != nil {
			return fmt.Errorf("peer %s has nat_traversal: force, but %w", p.Name, err)
		}
		c.Close()
	}
	return nil
}

// New opens the kernel interfaces, removes whatever an earlier pspd left
// behind (its SAs carry keys this process does not have), and starts
// watching for expiring SAs.
func New(ctx context.Context, cfg Config) (b *Backend, err error) {
	h, err := xfrm.Open(xfrm.Config{NetNS: cfg.NetNS, Offload: cfg.Offload, Logger: cfg.Logger})
	if err != nil {
		return nil, err
	}
	var links *vnl.Handle
	if cfg.NetNS == 0 {
		links, err = vnl.NewHandle(unix.NETLINK_ROUTE)
	} else {
		links, err = vnl.NewHandleAt(netns.NsHandle(cfg.NetNS), unix.NETLINK_ROUTE)
	}
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("xfrm: route netlink: %w", err)
	}
	if b, err = newBackend(h, links, cfg); err != nil {
		links.Close()
		h.Close()
		return nil, err
	}
	// Policies of peers that are still configured stay, so a restart with
	// require_encryption never opens a window in which traffic leaves in
	// clear; stale SAs and policies of removed peers go.
	var keep []xfrm.Policy
	for i, p := range cfg.Peers {
		if !p.RequireEncryption {
			continue
		}
		pr, err := b.newPeer(p, h.Owner().ReqIDMin+uint32(i), netip.AddrPort{})
		if err != nil {
			continue // AddPeer reports it
		}
		keep = append(keep, pr.policies...)
	}
	res, err := h.Reconcile(ctx, nil, keep)
	if err != nil {
		b.Close()
		return nil, err
	}
	b.log.Info("xfrm: kernel state reconciled", "removed_sas", res.RemovedSAs, "kept_policies", res.KeptPolicies,
		"added_policies", res.AddedPolicies, "removed_policies", res.RemovedPolicies)
	b.done = make(chan struct{})
	go b.watch(b.ctx)
	return b, nil
}

// newBackend is the Backend on h and links before New reconciles and
// watches the kernel.
func newBackend(h *xfrm.Handle, links *vnl.Handle, cfg Config) (*Backend, error) {
	if cfg.RetireGrace < 0 {
		return nil, fmt.Errorf("xfrm: retire grace %v is negative", cfg.RetireGrace)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	fp := make([]byte, sha256.Size)
	if _, err := rand.Read(fp); err != nil {
		return nil, fmt.Errorf("xfrm: fingerprint key: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Backend{offload: cfg.Offload, log: cfg.Logger, h: h, links: links, netNS: cfg.NetNS, rekey: make(chan identity.PublicKey, 16),
		grace: cmp.Or(cfg.RetireGrace, defaultRetireGrace), ctx: ctx, cancel: cancel, fpKey: secret.Own(fp),
		peers: map[identity.PublicKey]*peer{}, sent: map[identity.PublicKey]map[[sha256.Size]byte]struct{}{}, encap: map[encapKey]*net.UDPConn{}}, nil
}

// Control exempts pspd's control socket from the policies this backend
// installs; the daemon passes it to the key exchange.
func (b *Backend) Control(network, address string, c syscall.RawConn) error {
	return xfrm.BypassSocket(c)
}

func (b *Backend) watch(ctx context.Context) {
	defer close(b.done)
	events := make(chan xfrm.Event, 64)
	go func() {
		if err := b.h.Monitor(ctx, events); err != nil && ctx.Err() == nil {
			b.log.Error("xfrm: monitor stopped; SAs will only be rekeyed on the key exchange's timer", "err", err)
		}
	}()
	go func() {
		if err := b.h.WatchUnknownSPI(ctx, time.Second, events); err != nil && ctx.Err() == nil {
			b.log.Warn("xfrm: unknown-SPI watch stopped", "err", err)
		}
	}()
	addrs := b.subscribeAddrs(ctx)
	var settle <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-events:
			b.event(ev)
		case _, ok := <-addrs:
			if !ok {
				addrs = nil
				continue
			}
			settle = time.After(addrSettle)
		case <-settle:
			settle = nil
			b.localMoved()
		}
	}
}

func (b *Backend) event(ev xfrm.Event) {
	switch ev.Kind {
	case xfrm.SoftExpire:
		b.mu.Lock()
		var key identity.PublicKey
		found := false
		for k, p := range b.peers {
			if p.reqid == ev.ReqID {
				key, found = k, true
			}
		}
		b.mu.Unlock()
		if found {
			select {
			case b.rekey <- key:
			default:
			}
		}
	case xfrm.HardExpire:
		b.log.Warn("xfrm: the kernel expired an SA before it was rekeyed", "sa", ev.SA)
	case xfrm.UnknownSPI:
		b.log.Info("xfrm: ESP arrived for SPIs with no SA (a peer restarted?)", "packets", ev.Count)
	case xfrm.Mapping:
		b.mapping(ev)
	}
}

// mapping follows a peer whose ESP-in-UDP now comes from another address
// or port. The kernel reports every such packet, and only packets that
// authenticated on the peer's inbound SA, so a forger cannot move the
// peer; one change is acted on once. The SAs in place keep their
// addresses (an SA's cannot change); the next generation uses the new
// ones, and a new address moves the policies at once.
func (b *Backend) mapping(ev xfrm.Event) {
	now := netip.AddrPortFrom(ev.Src.Unmap(), ev.Port)
	b.mu.Lock()
	var key identity.PublicKey
	var pr *peer
	for k, p := range b.peers {
		if p.reqid != ev.ReqID || !p.cfg.Encapsulate() {
			continue
		}
		for _, sp := range p.sas {
			if sp.in == ev.SA {
				key, pr = k, p
			}
		}
	}
	if pr == nil || now == pr.mapped || (!pr.mapped.IsValid() && now == netip.AddrPortFrom(pr.remote, pr.cfg.EncapPort)) {
		b.mu.Unlock()
		return
	}
	was := netip.AddrPortFrom(pr.remote, cmp.Or(pr.mapped.Port(), pr.cfg.EncapPort))
	var err error
	if now.Addr() != pr.remote {
		ctx, cancel := context.WithTimeout(b.ctx, 5*time.Second)
		var next *peer
		if next, err = b.newPeer(pr.cfg, pr.reqid, now); err == nil {
			err = b.follow(ctx, pr, next)
		}
		cancel()
	} else {
		pr.mapped = now
	}
	name := pr.cfg.Name
	b.mu.Unlock()
	if err != nil {
		b.log.Warn("xfrm: the peer's NAT mapping changed, but its policies could not follow", "peer", name, "from", was, "to", now, "err", err)
		return
	}
	b.log.Info("xfrm: the peer's NAT mapping changed; rekeying to follow it", "peer", name, "from", was, "to", now)
	select {
	case b.rekey <- key:
	default:
	}
}

// RekeyWanted delivers peers whose SAs reached a soft lifetime.
func (b *Backend) RekeyWanted() <-chan identity.PublicKey { return b.rekey }

// Kind implements offload.Backend.
func (b *Backend) Kind() assoc.Backend { return assoc.BackendXFRM }

// newPeer works out a peer's addresses, mode and policies; mapped is
// where its ESP-in-UDP was last seen coming from, if that is known.
func (b *Backend) newPeer(p offload.PeerSpec, reqid uint32, mapped netip.AddrPort) (*peer, error) {
	if len(p.Prefixes) == 0 {
		// Tunnel mode with no policy would be "up" and protect nothing.
		return nil, fmt.Errorf("xfrm: peer %s: no prefixes: the xfrm backend protects a peer's prefixes (list the peer's endpoint address in prefixes for transport mode)", p.Name)
	}
	remote := p.Endpoint.Addr().Unmap()
	if p.Encapsulate() {
		switch {
		case mapped.IsValid():
			remote = mapped.Addr().Unmap()
		case p.NAT.PeerObserved.IsValid():
			remote = p.NAT.PeerObserved.Addr().Unmap()
		}
	} else {
		mapped = netip.AddrPort{}
		// The session's address is authenticated (its handshake, and
		// quic-go validates a new path before it moves there).
		if o := p.NAT.PeerObserved.Addr().Unmap(); o.IsValid() && tunnels(p.Prefixes, remote) {
			remote = o
		}
	}
	local := p.Local.Unmap()
	var dev string
	routes, err := b.links.RouteGet(remote.AsSlice())
	if err != nil || len(routes) == 0 {
		return nil, fmt.Errorf("xfrm: peer %s: no route to %v: %v", p.Name, remote, err)
	}
	if local.IsUnspecified() || !local.IsValid() {
		src, ok := netip.AddrFromSlice(routes[0].Src)
		if !ok {
			return nil, fmt.Errorf("xfrm: peer %s: the route to %v has no source address; set listen to this host's address", p.Name, remote)
		}
		local = src.Unmap()
	}
	if local.Is4() != remote.Is4() {
		return nil, fmt.Errorf("xfrm: peer %s: endpoint %v and local address %v are of different families", p.Name, remote, local)
	}
	if l, err := b.links.LinkByIndex(routes[0].LinkIndex); err == nil {
		dev = l.Attrs().Name
	}
	pr := &peer{cfg: p, reqid: reqid, local: local, remote: remote, mapped: mapped, dev: dev, sas: map[saKey]*pair{}}
	pr.mode, pr.policies = policies(p, local, remote, reqid)
	return pr, nil
}

// Priorities of an IPv6 transport-mode peer's policies (lower wins): its
// neighbour discovery bypass comes before the policies that protect its
// address.
const (
	ndPriority      = 1
	protectPriority = 2
)

// ndBypass adds to an IPv6 transport-mode peer's policies the bypass of
// neighbour discovery between the two hosts (as Libreswan does): the
// protecting policies cover every packet between the addresses, and
// without an exception the hosts' neighbour solicitations and
// advertisements would wait for an SA that cannot be negotiated until
// they resolve each other, so the hosts would never reach each other.
func ndBypass(protect []xfrm.Policy, me, peer netip.Prefix) []xfrm.Policy {
	out := make([]xfrm.Policy, 0, len(protect)+10)
	for _, p := range protect {
		p.Priority = protectPriority
		out = append(out, p)
	}
	// Router solicitation and advertisement, neighbour solicitation and
	// advertisement, redirect (RFC 4861).
	for typ := uint8(133); typ <= 137; typ++ {
		out = append(out,
			xfrm.Policy{Src: me, Dst: peer, Proto: unix.IPPROTO_ICMPV6, ICMPType: typ, Dir: xfrm.Out, Bypass: true, Priority: ndPriority},
			xfrm.Policy{Src: peer, Dst: me, Proto: unix.IPPROTO_ICMPV6, ICMPType: typ, Dir: xfrm.In, Bypass: true, Priority: ndPriority},
		)
	}
	return out
}

// policies returns the mode and the policies for a peer: transport mode
// when every prefix is the peer's own address, tunnel mode otherwise.
func policies(p offload.PeerSpec, local, remote netip.Addr, reqid uint32) (xfrm.Mode, []xfrm.Policy) {
	self := netip.PrefixFrom(remote, remote.BitLen())
	mode := xfrm.Transport
	if tunnels(p.Prefixes, remote) {
		mode = xfrm.Tunnel
	}
	var out []xfrm.Policy
	if mode == xfrm.Transport {
		me := netip.PrefixFrom(local, local.BitLen())
		out = []xfrm.Policy{
			{Src: me, Dst: self, Dir: xfrm.Out, TmplSrc: local, TmplDst: remote, Mode: mode, ReqID: reqid},
			{Src: self, Dst: me, Dir: xfrm.In, TmplSrc: remote, TmplDst: local, Mode: mode, ReqID: reqid},
		}
		if remote.Is6() {
			out = ndBypass(out, me, self)
		}
		return mode, out
	}
	for _, pf := range p.Prefixes {
		pf = pf.Masked()
		all := netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		if pf.Addr().Is6() {
			all = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
		out = append(out,
			xfrm.Policy{Src: all, Dst: pf, Dir: xfrm.Out, TmplSrc: local, TmplDst: remote, Mode: mode, ReqID: reqid},
			xfrm.Policy{Src: pf, Dst: all, Dir: xfrm.In, TmplSrc: remote, TmplDst: local, Mode: mode, ReqID: reqid},
			xfrm.Policy{Src: pf, Dst: all, Dir: xfrm.Fwd, TmplSrc: remote, TmplDst: local, Mode: mode, ReqID: reqid},
		)
	}
	return mode, out
}

// AddPeer implements offload.Backend: a reqid for the peer and, when it
// requires encryption, its policies.
func (b *Backend) AddPeer(ctx context.Context, p offload.PeerSpec) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.peers[p.Key] != nil {
		return fmt.Errorf("xfrm: peer %s added twice", p.Name)
	}
	reqid, err := b.freeReqID()
	if err != nil {
		return err
	}
	pr, err := b.newPeer(p, reqid, netip.AddrPort{})
	if err != nil {
		return err
	}
	if p.RequireEncryption {
		if err := b.addPolicies(ctx, pr, pr.policies); err != nil {
			return err
		}
	}
	b.peers[p.Key] = pr
	return nil
}

// UpdatePeer implements offload.Backend. Policies that stay are left
// alone, new ones are added before the dropped ones go, so traffic to a
// prefix that stays never finds a gap. The installed SAs keep their
// addresses and limits; new limits apply to the next generation.
func (b *Backend) UpdatePeer(ctx context.Context, p offload.PeerSpec) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	pr := b.peers[p.Key]
	if pr == nil {
		return fmt.Errorf("xfrm: update of peer %s that was never added", p.Name)
	}
	next, err := b.newPeer(p, pr.reqid, pr.mapped)
	if err != nil {
		return err
	}
	return b.follow(ctx, pr, next)
}

// follow moves pr to next's addresses and policies. Policies that stay
// are left alone, new ones are added before the dropped ones go.
// Callers hold b.mu.
func (b *Backend) follow(ctx context.Context, pr, next *peer) error {
	p := next.cfg
	want := pr.polUp || p.RequireEncryption
	var added, dropped []xfrm.Policy
	for _, np := range next.policies {
		if !slices.Contains(pr.policies, np) {
			added = append(added, np)
		}
	}
	// A policy whose selector stays is updated in place by AddPolicy;
	// deleting it afterwards would delete the update.
	sel := func(p xfrm.Policy) xfrm.Policy {
		return xfrm.Policy{Src: p.Src, Dst: p.Dst, Proto: p.Proto, ICMPType: p.ICMPType, Dir: p.Dir}
	}
	for _, op := range pr.policies {
		if !slices.ContainsFunc(next.policies, func(np xfrm.Policy) bool { return sel(np) == sel(op) }) {
			dropped = append(dropped, op)
		}
	}
	if want {
		if !pr.polUp {
			added = next.policies
			dropped = nil
		}
		if err := b.addPolicies(ctx, pr, added); err != nil {
			return err
		}
		for i := range dropped {
			if err := b.h.DeletePolicy(ctx, &dropped[i]); err != nil {
				b.log.Warn("xfrm: remove policy", "peer", p.Name, "policy", &dropped[i], "err", err)
			}
		}
	}
	pr.cfg, pr.mode, pr.policies, pr.local, pr.remote, pr.mapped, pr.dev = p, next.mode, next.policies, next.local, next.remote, next.mapped, next.dev
	pr.polUp = want
	if pr.polUp && !p.RequireEncryption && len(pr.sas) == 0 {
		b.dropPolicies(ctx, pr)
	}
	return nil
}

func (b *Backend) freeReqID() (uint32, error) {
	o := b.h.Owner()
	used := map[uint32]bool{}
	for _, p := range b.peers {
		used[p.reqid] = true
	}
	// The top reqid is the probe's.
	for r := o.ReqIDMin; r < o.ReqIDMax; r++ {
		if !used[r] {
			return r, nil
		}
	}
	return 0, errors.New("xfrm: every reqid of pspd's range is in use")
}

// addPolicies installs ps for a peer, all or none.
func (b *Backend) addPolicies(ctx context.Context, pr *peer, ps []xfrm.Policy) error {
	for i := range ps {
		if err := b.h.AddPolicy(ctx, &ps[i]); err != nil {
			for j := range i {
				b.h.DeletePolicy(ctx, &ps[j])
			}
			return fmt.Errorf("xfrm: peer %s: %w", pr.cfg.Name, err)
		}
	}
	pr.polUp = true
	return nil
}

func (b *Backend) dropPolicies(ctx context.Context, pr *peer) {
	for i := range pr.policies {
		if err := b.h.DeletePolicy(ctx, &pr.policies[i]); err != nil {
			b.log.Warn("xfrm: remove policy", "peer", pr.cfg.Name, "policy", &pr.policies[i], "err", err)
		}
	}
	pr.polUp = false
}

// RemovePeer implements offload.Backend: the peer's SAs and policies go.
func (b *Backend) RemovePeer(ctx context.Context, key identity.PublicKey) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	pr := b.peers[key]
	if pr == nil {
		return nil
	}
	delete(b.peers, key)
	if pr.retire != nil {
		pr.retire.cancel()
		pr.retire = nil
	}
	var errs []error
	for _, sp := range pr.sas {
		errs = append(errs, b.deletePair(ctx, sp))
	}
	b.dropPolicies(ctx, pr)
	return errors.Join(errs...)
}

// sa is the kernel SA of one direction of a generation, under key and
// salt.
func (b *Backend) sa(pr *peer, sa *assoc.SA, dir xfrm.Dir, key secret.Key, salt [xfrm.SaltLen]byte) xfrm.SA {
	l := pr.cfg.Limits
	s := xfrm.SA{ReqID: pr.reqid, Dir: dir, Mode: pr.mode, Suite: sa.Suite, OffloadDev: pr.dev, Lifetime: xfrm.Lifetime{
		SoftPackets: l.SoftPackets, HardPackets: l.HardPackets, Soft: l.SoftLifetime, Hard: l.HardLifetime,
	}}
	if dir == xfrm.In {
		s.Src, s.Dst, s.SPI = pr.remote, pr.local, uint32(sa.RxSPI)
	} else {
		s.Src, s.Dst, s.SPI = pr.local, pr.remote, uint32(sa.TxSPI)
	}
	s.Key, s.Salt = key, salt
	if b.offload == xfrm.OffloadNone {
		s.OffloadDev = ""
	}
	if pr.cfg.Encapsulate() {
		port := pr.cfg.EncapPort
		theirs := cmp.Or(pr.mapped.Port(), port)
		s.OffloadDev = ""
		if dir == xfrm.In {
			s.Encap = &xfrm.Encap{SrcPort: theirs, DstPort: port}
		} else {
			s.Encap = &xfrm.Encap{SrcPort: port, DstPort: theirs}
			if pr.cfg.NAT.Behind && !b.noKeepalive {
				s.NATKeepalive = cmp.Or(pr.cfg.NATKeepalive, defaultNATKeepalive).Round(time.Second)
			}
		}
	}
	return s
}

// openEncap makes sure the ESP-in-UDP socket pr's SAs need is open.
// Callers hold b.mu.
func (b *Backend) openEncap(ctx context.Context, pr *peer) error {
	if !pr.cfg.Encapsulate() {
		return nil
	}
	k := encapKey{v6: pr.local.Is6(), port: pr.cfg.EncapPort}
	if b.encap[k] != nil {
		return nil
	}
	network := "udp4"
	if k.v6 {
		network = "udp6"
	}
	c, err := xfrm.ListenEncap(ctx, b.netNS, network, k.port)
	if err != nil {
		return fmt.Errorf("xfrm: peer %s needs ESP in UDP (%s): %w", pr.cfg.Name, natWhy(pr.cfg), err)
	}
	b.encap[k] = c
	b.log.Info("xfrm: ESP-in-UDP socket open", "network", network, "port", k.port, "peer", pr.cfg.Name, "why", natWhy(pr.cfg))
	return nil
}

// natWhy says why a peer's ESP travels in UDP.
func natWhy(p offload.PeerSpec) string {
	switch {
	case p.NATTraversal == offload.NATForce:
		return "nat_traversal: force"
	case p.NAT.Behind && p.NAT.PeerBehind:
		return "NATs in front of both hosts"
	case p.NAT.Behind:
		return "a NAT in front of this host"
	}
	return "a NAT in front of the peer"
}

func (b *Backend) peer(sa *assoc.SA) (*peer, error) {
	pr := b.peers[sa.Peer]
	if pr == nil {
		return nil, fmt.Errorf("xfrm: SA for a peer that is not configured (%s)", sa.Peer.Fingerprint())
	}
	return pr, nil
}

// Install adds the inbound SA and keeps a copy of the transmit key for
// Activate. The outbound SA waits for Activate: the kernel sends under the
// newest SA matching a policy's template, so adding it is what switches
// traffic.
//
// A transmit (SPI, key) pair the backend was given before for the peer is
// refused, before anything reaches the kernel: an ESP nonce is the salt,
// fixed by SPI and key, and a sequence number that starts at 1 with every
// SA, so a second SA under the same pair would repeat every nonce of the
// first. The key exchange never derives the same pair twice; this keeps it
// so whatever a peer sends.
func (b *Backend) Install(ctx context.Context, sa *assoc.SA) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	pr, err := b.peer(sa)
	if err != nil {
		return err
	}
	k := saKey{sa.ID, sa.Generation}
	if pr.sas[k] != nil {
		return fmt.Errorf("xfrm: peer %s: association %d generation %d installed twice", pr.cfg.Name, sa.ID, sa.Generation)
	}
	if n := sa.Suite.KeyLen(); n == 0 || sa.TxKey.Len() != n || sa.RxKey.Len() != n {
		return fmt.Errorf("xfrm: peer %s: %s with keys of %d and %d bytes: suite %s needs %d", pr.cfg.Name, sa, sa.RxKey.Len(), sa.TxKey.Len(), sa.Suite, n)
	}
	var none [assoc.SaltLen]byte
	if sa.RxSalt == none || sa.TxSalt == none {
		return fmt.Errorf("xfrm: peer %s: %s carries no ESP salts (a key exchange that does not derive them)", pr.cfg.Name, sa)
	}
	if err := b.refresh(ctx, pr); err != nil {
		return err
	}
	if err := b.openEncap(ctx, pr); err != nil {
		return err
	}
	if err := b.claimTx(pr, sa); err != nil {
		return err
	}
	in := b.sa(pr, sa, xfrm.In, sa.RxKey, sa.RxSalt)
	_, err = b.h.AddSA(ctx, &in)
	clear(in.Salt[:])
	if err != nil {
		return fmt.Errorf("xfrm: peer %s: %w", pr.cfg.Name, err)
	}
	out := b.sa(pr, sa, xfrm.Out, secret.Key{}, none)
	pr.sas[k] = &pair{in: in.ID(), out: out.ID(), tx: sa.TxKey.Clone(), txSalt: sa.TxSalt}
	return nil
}

// claimTx records sa's transmit pair for the peer, or refuses it if it is
// there already. A pair is recorded before the kernel sees it, so one
// whose install failed is refused too: the key exchange never offers a
// pair again, only a peer replaying an SPI would.
func (b *Backend) claimTx(pr *peer, sa *assoc.SA) error {
	fp := b.fingerprint(sa.TxSPI, sa.TxKey)
	seen := b.sent[sa.Peer]
	if seen == nil {
		seen = map[[sha256.Size]byte]struct{}{}
		b.sent[sa.Peer] = seen
	}
	if _, dup := seen[fp]; dup {
		return fmt.Errorf("xfrm: peer %s: refusing %s: its transmit SPI and key were installed before, and sending under them again would repeat AES-GCM nonces (the peer offered an SPI a second time)", pr.cfg.Name, sa)
	}
	seen[fp] = struct{}{}
	return nil
}

// fingerprint is HMAC-SHA256 under fpKey of spi || key length || key,
// zero-padded to one SHA-256 block: a whole block is compressed straight
// from buf, so the hash never keeps a copy of the key in its own buffer.
func (b *Backend) fingerprint(spi assoc.SPI, key secret.Key) [sha256.Size]byte {
	var buf [sha256.BlockSize]byte
	binary.BigEndian.PutUint32(buf[:4], uint32(spi))
	buf[4] = byte(key.Len())
	copy(buf[5:], key.Bytes()) // Install checked the length against the suite: at most 32 bytes
	m := hmac.New(sha256.New, b.fpKey.Bytes())
	m.Write(buf[:])
	secret.Zero(buf[:])
	var fp [sha256.Size]byte
	m.Sum(fp[:0])
	return fp
}

// Activate adds the outbound SA under the key Install kept, wipes that
// copy, adds the peer's policies if they are not in place yet, and starts
// retiring the generations this one replaces.
func (b *Backend) Activate(ctx context.Context, sa *assoc.SA) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	pr, err := b.peer(sa)
	if err != nil {
		return err
	}
	k := saKey{sa.ID, sa.Generation}
	p := pr.sas[k]
	if p == nil {
		return fmt.Errorf("xfrm: peer %s: activate association %d generation %d that is not installed", pr.cfg.Name, sa.ID, sa.Generation)
	}
	if p.outAdded {
		return nil
	}
	if p.failed {
		return fmt.Errorf("xfrm: peer %s: association %d generation %d failed to activate before; remove it", pr.cfg.Name, sa.ID, sa.Generation)
	}
	out := b.sa(pr, sa, xfrm.Out, p.tx, p.txSalt)
	// A NAT's new mapping since Install moved the peer: the SA goes
	// where the peer is now, and is removed from there.
	p.out = out.ID()
	_, err = b.h.AddSA(ctx, &out)
	if err != nil && out.NATKeepalive != 0 {
		// A kernel before 6.10 knows no keep-alives; traffic alone then
		// holds the NAT's mapping.
		b.noKeepalive = true
		b.log.Warn("xfrm: the kernel refused NAT keep-alives; the NAT in front of this host keeps its mapping only while traffic flows", "peer", pr.cfg.Name, "err", err)
		out.NATKeepalive = 0
		_, err = b.h.AddSA(ctx, &out)
	}
	p.tx.Wipe()
	p.tx = secret.Key{}
	clear(p.txSalt[:])
	clear(out.Salt[:])
	if err != nil {
		p.failed = true
		return fmt.Errorf("xfrm: peer %s: %w", pr.cfg.Name, err)
	}
	p.outAdded = true
	if !pr.polUp {
		if err := b.addPolicies(ctx, pr, pr.policies); err != nil {
			b.h.DeleteSA(ctx, out.ID())
			p.outAdded, p.failed = false, true
			return err
		}
	}
	b.retireOld(pr, k, p)
	return nil
}

// retireOld starts retiring every generation of the peer that was
// activated before k. A retirement still pending for an older generation
// is folded into this one: k is now the one whose traffic counts.
func (b *Backend) retireOld(pr *peer, k saKey, p *pair) {
	if pr.retire != nil {
		pr.retire.cancel()
		pr.retire = nil
	}
	var old []saKey
	for ok, op := range pr.sas {
		if ok != k && op.outAdded {
			old = append(old, ok)
		}
	}
	if len(old) == 0 {
		return
	}
	ctx, cancel := context.WithCancel(b.ctx)
	r := &retirement{newest: k, old: old, cancel: cancel}
	pr.retire = r
	b.wg.Add(1)
	go b.retireAfterTraffic(ctx, pr, pr.cfg.Name, r, p.in)
}

// retireAfterTraffic removes r's old generations once newIn has counted a
// packet, or after the grace. Whoever cancels ctx (a newer activation,
// Remove of the newest generation, RemovePeer, Close) does so under b.mu
// and owns the old SAs from then on.
func (b *Backend) retireAfterTraffic(ctx context.Context, pr *peer, name string, r *retirement, newIn xfrm.ID) {
	defer b.wg.Done()
	defer r.cancel()
	start := time.Now()
	used, err := b.h.WaitUsed(ctx, newIn, b.grace, retirePoll)
	if err != nil && ctx.Err() == nil {
		// No counters, no telling whether the peer switched: keep the old
		// generation for the whole grace.
		b.log.Warn("xfrm: cannot read the new inbound SA's counters; removing the replaced generation after the grace", "peer", name, "err", err)
		t := time.NewTimer(b.grace - time.Since(start))
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		t.Stop()
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if ctx.Err() != nil {
		return
	}
	pr.retire = nil
	dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var gens []uint32
	for _, k := range r.old {
		p := pr.sas[k]
		if p == nil {
			continue // the key exchange removed it already
		}
		delete(pr.sas, k)
		if err := b.deletePair(dctx, p); err != nil {
			b.log.Warn("xfrm: remove replaced generation", "peer", pr.cfg.Name, "assoc", k.assoc, "gen", k.gen, "err", err)
		}
		gens = append(gens, k.gen)
	}
	if len(gens) == 0 {
		return
	}
	why := "grace passed without a packet on the new SA"
	if used {
		why = "the peer sends on the new SA"
	}
	b.log.Info("xfrm: replaced generation removed", "peer", pr.cfg.Name, "gens", gens, "new_gen", r.newest.gen,
		"why", why, "after", time.Since(start).Round(time.Millisecond))
}

// Remove deletes a generation's SAs, and the policies with the last one
// unless encryption is required. A generation retired already is not
// there any more: removing it is a no-op.
func (b *Backend) Remove(ctx context.Context, sa *assoc.SA) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	pr := b.peers[sa.Peer]
	if pr == nil {
		return nil // RemovePeer took everything
	}
	k := saKey{sa.ID, sa.Generation}
	p := pr.sas[k]
	if p == nil {
		return nil
	}
	delete(pr.sas, k)
	if r := pr.retire; r != nil && (r.newest == k || !slices.ContainsFunc(r.old, func(o saKey) bool { return pr.sas[o] != nil })) {
		// Without the newest generation there is no traffic to wait for
		// (the older ones carry the peer again until the key exchange
		// removes them), and without old ones nothing to retire.
		r.cancel()
		pr.retire = nil
	}
	err := b.deletePair(ctx, p)
	if len(pr.sas) == 0 && pr.polUp && !pr.cfg.RequireEncryption {
		b.dropPolicies(ctx, pr)
	}
	return err
}

// heldKeys lists the SA keys the backend holds: only transmit keys between
// Install and Activate.
func (b *Backend) heldKeys() []secret.Key {
	b.mu.Lock()
	defer b.mu.Unlock()
	var ks []secret.Key
	for _, pr := range b.peers {
		for _, p := range pr.sas {
			if p.tx.Len() > 0 {
				ks = append(ks, p.tx)
			}
		}
	}
	return ks
}

// deletePair takes a pair out of the kernel and wipes what it held.
func (b *Backend) deletePair(ctx context.Context, p *pair) error {
	p.tx.Wipe()
	p.tx = secret.Key{}
	clear(p.txSalt[:])
	var errs []error
	if p.outAdded {
		errs = append(errs, b.h.DeleteSA(ctx, p.out))
	}
	errs = append(errs, b.h.DeleteSA(ctx, p.in))
	return errors.Join(errs...)
}

// Traffic reports the kernel's counters for a generation's SAs.
func (b *Backend) Traffic(sa *assoc.SA) (offload.Traffic, bool) {
	b.mu.Lock()
	var p pair
	pr := b.peers[sa.Peer]
	found := pr != nil && pr.sas[saKey{sa.ID, sa.Generation}] != nil
	if found {
		p = *pr.sas[saKey{sa.ID, sa.Generation}]
	}
	b.mu.Unlock()
	if !found {
		return offload.Traffic{}, false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var t offload.Traffic
	in, err := b.h.GetSA(ctx, p.in)
	if err != nil {
		return t, false
	}
	t.BytesIn, t.PacketsIn, t.LastIn = in.Stats.Bytes, in.Stats.Packets, in.Stats.LastUsed
	t.Drops = uint64(in.Stats.ReplayDrops) + uint64(in.Stats.OutOfWindow) + uint64(in.Stats.IntegrityFailed)
	if p.outAdded {
		out, err := b.h.GetSA(ctx, p.out)
		if err != nil {
			return t, false
		}
		t.BytesOut, t.PacketsOut, t.LastOut = out.Stats.Bytes, out.Stats.Packets, out.Stats.LastUsed
	}
	return t, true
}

// dropReasons names the kernel's XFRM error counters the way pspd's
// metrics name drop reasons.
var dropReasons = map[string]string{
	"XfrmInNoStates":        "unknown-spi",           // ESP for an SA that is not (or no longer) there
	"XfrmInStateProtoError": "auth-failed",           // the ICV did not verify: wrong key or forgery
	"XfrmInStateSeqError":   "replay",                // replayed or older than the window
	"XfrmInTmplMismatch":    "inbound-not-encrypted", // clear traffic where a policy wants ESP
	"XfrmOutNoStates":       "outbound-no-sa",        // held back: a policy but no SA (require_encryption)
}

// Drops reports the namespace's XFRM drops by reason for /metrics. The
// kernel counts them per namespace, not per SA.
func (b *Backend) Drops() map[string]uint64 {
	c, err := b.h.Counters()
	if err != nil {
		return nil
	}
	out := map[string]uint64{}
	for name, reason := range dropReasons {
		out[reason] = c[name]
	}
	return out
}

// Close implements offload.Backend: it stops watching the kernel and
// removes every SA still installed, and the policies of peers that do not
// require encryption. The policies of those that do stay, so that their
// traffic is held back until the next start.
func (b *Backend) Close() error {
	b.cancel()
	if b.done != nil {
		<-b.done
	}
	b.wg.Wait() // pending retirements see the cancel and leave their SAs to this
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	b.mu.Lock()
	var errs []error
	kept := 0
	for _, pr := range b.peers {
		for k, sp := range pr.sas {
			errs = append(errs, b.deletePair(ctx, sp))
			delete(pr.sas, k)
		}
		if !pr.polUp {
			continue
		}
		if pr.cfg.RequireEncryption {
			kept++
			continue
		}
		b.dropPolicies(ctx, pr)
	}
	b.peers = map[identity.PublicKey]*peer{}
	for k, c := range b.encap {
		errs = append(errs, c.Close())
		delete(b.encap, k)
	}
	b.mu.Unlock()
	b.fpKey.Wipe()
	if kept > 0 {
		b.log.Info("xfrm: policies kept in the kernel so that traffic to peers that require encryption is held back until pspd is back", "peers", kept)
	}
	b.links.Close()
	errs = append(errs, b.h.Close())
	return errors.Join(errs...)
}
