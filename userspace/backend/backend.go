// Package backend is the userspace data plane as the daemon drives it: one
// engine (a TUN device and a UDP or AF_XDP underlay), one codec per peer,
// and the offload.Backend that feeds each negotiated SA into the right
// codec, inbound first and outbound only when the peer receives. That
// package states what every lifecycle transition leaves in the kernel.
//
// It also owns the host side of the tunnel: the TUN device's address, a
// route into it for every peer prefix, and, for a peer that requires
// encryption, a lower-priority "prohibit" route for each prefix that
// outlives the TUN device, so that while pspd is down (stopped,
// restarting, crashed) traffic to the peer is refused instead of leaving
// in clear. Those routes carry pspd's routing protocol number, so that the
// next start finds and reconciles them.
package backend

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/offload"
	"github.com/pspd/pspd/userspace"
	"github.com/pspd/pspd/userspace/codec"
	"github.com/pspd/pspd/userspace/netutil"
	"github.com/pspd/pspd/userspace/tun"
	"github.com/pspd/pspd/userspace/udp"
	"github.com/pspd/pspd/userspace/xdp"
	"github.com/pspd/pspd/userspace/xsk"
)

// prohibitMetric places the fail-closed routes behind the TUN routes.
const prohibitMetric = 4096

// routeProto marks the routes pspd installs (rtnetlink's rtm_protocol;
// values above RTPROT_STATIC are for routing daemons), so that a restart
// can tell its own fail-closed routes from everybody else's.
const routeProto netlink.RouteProtocol = 0x9e

// underlayMTU is assumed for the outer path; the inner MTU is derived
// from it.
const underlayMTU = 1500

// Probe reports whether this host can run the userspace data plane.
func Probe(context.Context) error {
	f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("cannot open /dev/net/tun (%v): the userspace data plane needs the tun driver and CAP_NET_ADMIN", err)
	}
	return f.Close()
}

// IO is how the data plane moves outer packets.
type IO string

const (
	IOAuto  IO = "auto"   // zero-copy AF_XDP where the driver offers it, else UDP sockets
	IOAFXDP IO = "af_xdp" // require AF_XDP
	IOUDP   IO = "udp"    // batched UDP sockets
)

// Config is what the data plane is started with.
type Config struct {
	Interface string       // TUN device name
	Address   netip.Prefix // this host's inner address; unset: none
	Listen    netip.Addr   // underlay address; unspecified: all
	Port      uint16       // outer UDP port, the same on both peers
	Framing   codec.Framing
	IO        IO
	Logger    *slog.Logger
	// Peers are the peers configured at start: the fail-closed routes of
	// those that require encryption are kept, the others pspd left behind
	// are removed.
	Peers []offload.PeerSpec
}

// Backend is the running userspace data plane.
type Backend struct {
	cfg    Config
	log    *slog.Logger
	dev    *tun.Device
	link   netlink.Link
	engine *userspace.Dataplane
	rekey  chan identity.PublicKey
	// txKeys outlives every peer's codec: a peer removed and added back
	// must not be given an earlier TX key either.
	txKeys *codec.KeyHistory

	// io is the underlay start picked and ioReason why (for status).
	io       IO
	ioReason string

	mu    sync.Mutex
	peers map[identity.PublicKey]*peer
}

type peer struct {
	cfg    offload.PeerSpec
	codec  *codec.Codec
	outer  netip.AddrPort
	routes []netlink.Route
	stop   context.CancelFunc
}

var _ offload.Backend = (*Backend)(nil)

// New opens the TUN device and the underlay socket, starts the engine and
// removes the fail-closed routes an earlier pspd left for peers that are
// no longer configured (or no longer require encryption). On error
// nothing stays open or installed.
func New(ctx context.Context, cfg Config) (*Backend, error) {
	fr := cfg.Framing
	// A scratch codec tells the framing's overhead.
	probe, err := codec.New(codec.Config{Framing: fr})
	if err != nil {
		return nil, err
	}
	overhead := probe.Overhead()
	probe.Close()
	mtu, err := netutil.InnerMTU(underlayMTU, cfg.Listen, overhead)
	if err != nil {
		return nil, fmt.Errorf("userspace: %w", err)
	}
	b := &Backend{cfg: cfg, log: cfg.Logger, peers: map[identity.PublicKey]*peer{}, rekey: make(chan identity.PublicKey, 16), txKeys: codec.NewKeyHistory()}
	if err := b.start(ctx, mtu); err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

func (b *Backend) start(ctx context.Context, mtu int) (err error) {
	cfg := b.cfg
	if b.dev, err = tun.Open(cfg.Interface, mtu); err != nil {
		return fmt.Errorf("userspace: open TUN %s: %w (is another pspd running, or another interface of that name? set userspace.interface)", cfg.Interface, err)
	}
	if b.link, err = netlink.LinkByName(cfg.Interface); err != nil {
		return fmt.Errorf("userspace: %s: %w", cfg.Interface, err)
	}
	if cfg.Address.IsValid() {
		addr := &netlink.Addr{IPNet: toIPNet(cfg.Address)}
		if err := netlink.AddrReplace(b.link, addr); err != nil {
			return fmt.Errorf("userspace: address %v on %s: %w", cfg.Address, cfg.Interface, err)
		}
	}
	conn, io, reason, err := openUnderlay(cfg)
	if err != nil {
		return err
	}
	b.io, b.ioReason = io, reason
	b.log.Info("userspace: underlay picked", "io", io, "configured", cfg.IO, "reason", reason)
	dev := b.dev
	b.engine, err = userspace.Start(ctx, userspace.Config{TUN: dev, Underlay: conn, MTU: mtu, Framing: cfg.Framing, Logger: b.log.With("part", "userspace")})
	if err != nil {
		conn.Close()
		return fmt.Errorf("userspace: %w", err)
	}
	b.dev = nil // the engine owns it now
	b.reconcileRoutes()
	b.log.Info("userspace data plane up", "interface", cfg.Interface, "mtu", mtu, "framing", cfg.Framing, "port", cfg.Port, "io", io)
	return nil
}

// reconcileRoutes removes pspd's fail-closed routes that no peer of the
// start-up configuration keeps; AddPeer replaces the others.
func (b *Backend) reconcileRoutes() {
	keep := map[netip.Prefix]bool{}
	for _, p := range b.cfg.Peers {
		if p.RequireEncryption {
			for _, pf := range p.Prefixes {
				keep[pf.Masked()] = true
			}
		}
	}
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Protocol: routeProto, Type: unix.RTN_PROHIBIT},
		netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TYPE)
	if err != nil {
		b.log.Warn("userspace: list fail-closed routes an earlier pspd left", "err", err)
		return
	}
	removed := 0
	for _, r := range routes {
		if r.Dst == nil {
			continue
		}
		pf, ok := netipPrefix(r.Dst)
		if ok && keep[pf] {
			continue
		}
		if err := netlink.RouteDel(&r); err != nil {
			b.log.Warn("userspace: remove stale fail-closed route", "dst", r.Dst, "err", err)
			continue
		}
		removed++
	}
	if removed > 0 {
		b.log.Info("userspace: removed fail-closed routes of peers no longer configured", "routes", removed)
	}
}

// openUnderlay opens the outer side as configured: AF_XDP on the
// interface that holds the listen address, or batched UDP sockets. It
// returns what it opened and why, for the log and for status.
//
// io auto takes AF_XDP only where the driver offers zero-copy. In copy
// mode (veth, virtual NICs, drivers without AF_XDP support) the kernel
// copies and builds an skb for every frame on both ends, while the UDP
// socket path hands it whole 64 KB bursts (UDP GSO on send, GRO on
// receive): BenchmarkTunnelTCP on veth measures copy-mode AF_XDP at about
// half the TCP rate of UDP sockets, and an XDP program on a veth also
// turns off GSO for the host's own traffic there. Copy-mode AF_XDP has
// the lower round-trip latency; io af_xdp still asks for it.
func openUnderlay(cfg Config) (u userspace.Underlay, io IO, reason string, err error) {
	switch cfg.IO {
	case IOAFXDP:
		x, err := openXDP(cfg.Listen, cfg.Port, xsk.BindAuto)
		if err != nil {
			return nil, "", "", fmt.Errorf("userspace: io af_xdp: %w (set userspace.io to udp or auto)", err)
		}
		mode := "copy mode: the driver offers no zero-copy"
		if x.ZeroCopy() {
			mode = "zero-copy"
		}
		return x, IOAFXDP, fmt.Sprintf("configured (io: af_xdp); %s, XDP %s", mode, x.Mode()), nil
	case IOUDP:
		reason = "configured (io: udp)"
	default:
		x, err := openXDP(cfg.Listen, cfg.Port, xsk.BindZeroCopy)
		if err == nil {
			return x, IOAFXDP, fmt.Sprintf("auto: the driver offers zero-copy AF_XDP (XDP %s), where the kernel does no per-packet work for pspd", x.Mode()), nil
		}
		if errors.Is(err, xsk.ErrNoZeroCopy) {
			reason = fmt.Sprintf("auto: %v; copy-mode AF_XDP measured about half the TCP rate of UDP sockets with segmentation offload on such hosts (set io: af_xdp to use it anyway)", err)
		} else {
			reason = fmt.Sprintf("auto: AF_XDP unusable: %v", err)
		}
	}
	conn, err := udp.Listen(netip.AddrPortFrom(cfg.Listen, cfg.Port), userspace.DefaultBatch)
	if err != nil {
		return nil, "", "", fmt.Errorf("userspace: underlay socket on port %d: %w", cfg.Port, err)
	}
	if !conn.GRO() {
		reason += "; the kernel refused UDP GRO (needs Linux 5.0), datagrams are read one by one"
	}
	return conn, IOUDP, reason, nil
}

func openXDP(listen netip.Addr, port uint16, bind xsk.Bind) (*userspace.XDPUnderlay, error) {
	if listen.IsUnspecified() {
		return nil, errors.New("AF_XDP needs a specific listen address: the interface holding it gets the XDP program")
	}
	link, err := linkWithAddr(listen)
	if err != nil {
		return nil, err
	}
	// The socket binds one receive queue; packets the NIC steers to other
	// queues would reach no one.
	if q := rxQueues(link.Attrs().Name); q != 1 {
		return nil, fmt.Errorf("%s has %d receive queues; the AF_XDP underlay binds one (reduce them with ethtool -L, or use udp)", link.Attrs().Name, q)
	}
	u, err := userspace.NewXDPUnderlay(userspace.XDPConfig{Ifindex: link.Attrs().Index, Mode: xdp.Auto, Port: port, Ports: []uint16{port},
		Socket: xsk.Config{Bind: bind}})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", link.Attrs().Name, err)
	}
	return u, nil
}

// ethtoolChannels is struct ethtool_channels.
type ethtoolChannels struct {
	cmd                                         uint32
	maxRX, maxTX, maxOther, maxCombined         uint32
	rxCount, txCount, otherCount, combinedCount uint32
}

// ifreqData is struct ifreq with its ifr_data member.
type ifreqData struct {
	name [unix.IFNAMSIZ]byte
	data unsafe.Pointer
	_    [24 - unsafe.Sizeof(uintptr(0))]byte
}

// rxQueues counts an interface's receive queues in use: ethtool's channel
// count, asked over a socket in the calling thread's namespace, or for
// drivers without channels sysfs (which shows the namespace it was
// mounted in, not necessarily pspd's).
func rxQueues(name string) int {
	if fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err == nil {
		ch := &ethtoolChannels{cmd: unix.ETHTOOL_GCHANNELS}
		ifr := &ifreqData{data: unsafe.Pointer(ch)}
		copy(ifr.name[:unix.IFNAMSIZ-1], name)
		_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(ifr)))
		unix.Close(fd)
		if e == 0 && ch.rxCount+ch.combinedCount > 0 {
			return int(ch.rxCount + ch.combinedCount)
		}
	}
	queues, _ := filepath.Glob(filepath.Join("/sys/class/net", name, "queues", "rx-*"))
	return len(queues)
}

// IO returns the underlay the data plane uses ("af_xdp" or "udp") and why
// it was picked, for the daemon's status.
func (b *Backend) IO() (string, string) { return string(b.io), b.ioReason }

func linkWithAddr(a netip.Addr) (netlink.Link, error) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, err
	}
	for _, ad := range addrs {
		if x, ok := netip.AddrFromSlice(ad.IP); ok && x.Unmap() == a.Unmap() {
			return netlink.LinkByIndex(ad.LinkIndex)
		}
	}
	return nil, fmt.Errorf("no interface holds the listen address %v", a)
}

// Kind implements offload.Backend.
func (b *Backend) Kind() assoc.Backend { return assoc.BackendUserspace }

// RekeyWanted delivers the peers whose TX key reached its packet budget or
// age; the daemon rekeys them.
func (b *Backend) RekeyWanted() <-chan identity.PublicKey { return b.rekey }

// AddPeer implements offload.Backend: a codec for the peer, its place in
// the engine, and routes for its prefixes.
func (b *Backend) AddPeer(_ context.Context, p offload.PeerSpec) (err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.peers[p.Key] != nil {
		return fmt.Errorf("userspace: peer %s added twice", p.Name)
	}
	l := p.Limits
	c, err := codec.New(codec.Config{
		Framing: b.cfg.Framing, SoftPackets: l.SoftPackets, HardPackets: l.HardPackets,
		SoftLifetime: l.SoftLifetime, HardLifetime: l.HardLifetime, Logger: b.log.With("peer", p.Name),
		TXKeys: b.txKeys,
	})
	if err != nil {
		return fmt.Errorf("userspace: peer %s: %w", p.Name, err)
	}
	pr := &peer{cfg: p, codec: c, outer: netip.AddrPortFrom(p.Endpoint.Addr(), b.cfg.Port)}
	defer func() {
		if err != nil {
			b.dropRoutes(pr.routes)
			c.Close()
		}
	}()
	if err := b.engine.AddPeer(userspace.Peer{Endpoint: pr.outer, Prefixes: p.Prefixes, Codec: c, Keepalive: keepalive(p)}); err != nil {
		return fmt.Errorf("userspace: peer %s: %w", p.Name, err)
	}
	if pr.routes, err = b.addRoutes(p, p.Prefixes, nil); err != nil {
		b.engine.RemovePeer(pr.outer)
		return err
	}
	ctx, stop := context.WithCancel(context.Background())
	pr.stop = stop
	go b.forwardRekeys(ctx, p.Key, c)
	b.peers[p.Key] = pr
	return nil
}

// routes are the routes for one prefix of p: into the TUN device, and
// behind it the fail-closed one when p requires encryption.
func (b *Backend) routes(p offload.PeerSpec, pf netip.Prefix) []netlink.Route {
	rs := []netlink.Route{{LinkIndex: b.link.Attrs().Index, Dst: toIPNet(pf), Scope: netlink.SCOPE_LINK, Protocol: routeProto}}
	if p.RequireEncryption {
		rs = append(rs, netlink.Route{Dst: toIPNet(pf), Type: unix.RTN_PROHIBIT, Priority: prohibitMetric, Protocol: routeProto})
	}
	return rs
}

// addRoutes installs the routes of prefixes for p, all or none, leaving
// alone those already in have.
func (b *Backend) addRoutes(p offload.PeerSpec, prefixes []netip.Prefix, have []netlink.Route) ([]netlink.Route, error) {
	var added []netlink.Route
	for _, pf := range prefixes {
		for _, r := range b.routes(p, pf) {
			if slices.ContainsFunc(have, func(h netlink.Route) bool { return sameRoute(h, r) }) {
				continue
			}
			if err := netlink.RouteReplace(&r); err != nil {
				b.dropRoutes(added)
				return nil, fmt.Errorf("userspace: peer %s: route %v: %w", p.Name, pf, err)
			}
			added = append(added, r)
		}
	}
	return added, nil
}

func sameRoute(a, b netlink.Route) bool {
	return a.Dst.String() == b.Dst.String() && a.Type == b.Type && a.Priority == b.Priority && a.LinkIndex == b.LinkIndex
}

// UpdatePeer implements offload.Backend: routes for new prefixes (and new
// fail-closed routes) go in before the dropped ones go out; the codec and
// its SAs stay. The codec's limits are those of AddPeer.
func (b *Backend) UpdatePeer(_ context.Context, p offload.PeerSpec) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	pr := b.peers[p.Key]
	if pr == nil {
		return fmt.Errorf("userspace: update of peer %s that was never added", p.Name)
	}
	outer := netip.AddrPortFrom(p.Endpoint.Addr(), b.cfg.Port)
	var want []netlink.Route
	for _, pf := range p.Prefixes {
		want = append(want, b.routes(p, pf)...)
	}
	added, err := b.addRoutes(p, p.Prefixes, pr.routes)
	if err != nil {
		return err
	}
	if err := b.engine.UpdatePeer(pr.outer, userspace.Peer{Endpoint: outer, Prefixes: p.Prefixes, Codec: pr.codec, Keepalive: keepalive(p)}); err != nil {
		b.dropRoutes(added)
		return fmt.Errorf("userspace: peer %s: %w", p.Name, err)
	}
	var kept, dropped []netlink.Route
	for _, r := range pr.routes {
		if slices.ContainsFunc(want, func(w netlink.Route) bool { return sameRoute(w, r) }) {
			kept = append(kept, r)
		} else {
			dropped = append(dropped, r)
		}
	}
	b.dropRoutes(dropped)
	pr.cfg, pr.outer, pr.routes = p, outer, append(kept, added...)
	return nil
}

// defaultNATKeepalive is the keep-alive interval when the spec gives none.
const defaultNATKeepalive = 20 * time.Second

// keepalive is the engine's keep-alive interval for a peer: only a host
// behind a NAT needs to hold a mapping open.
func keepalive(p offload.PeerSpec) time.Duration {
	if !p.NAT.Behind {
		return 0
	}
	return cmp.Or(p.NATKeepalive, defaultNATKeepalive)
}

func (b *Backend) forwardRekeys(ctx context.Context, key identity.PublicKey, c *codec.Codec) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.RekeyWanted():
			select {
			case b.rekey <- key:
			default:
			}
		}
	}
}

func (b *Backend) dropRoutes(routes []netlink.Route) {
	for _, r := range routes {
		if err := netlink.RouteDel(&r); err != nil {
			b.log.Warn("userspace: remove route", "dst", r.Dst, "err", err)
		}
	}
}

// RemovePeer implements offload.Backend: the peer leaves the engine and
// its routes go, the fail-closed ones included.
func (b *Backend) RemovePeer(_ context.Context, key identity.PublicKey) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	pr := b.peers[key]
	if pr == nil {
		return nil
	}
	delete(b.peers, key)
	pr.stop()
	b.engine.RemovePeer(pr.outer)
	b.dropRoutes(pr.routes)
	pr.codec.Close()
	return nil
}

func (b *Backend) codecFor(sa *assoc.SA) (*codec.Codec, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	pr := b.peers[sa.Peer]
	if pr == nil {
		return nil, fmt.Errorf("userspace: no peer %s in the data plane", sa.Peer.Fingerprint())
	}
	return pr.codec, nil
}

// Install implements offload.Backend: the inbound SA goes live, the
// outbound one waits for Activate.
func (b *Backend) Install(_ context.Context, sa *assoc.SA) error {
	c, err := b.codecFor(sa)
	if err != nil {
		return err
	}
	return c.InstallRX(codec.SA{SPI: sa.RxSPI, Suite: sa.Suite, Key: sa.RxKey})
}

// Activate implements offload.Backend: TX moves to the new SA.
func (b *Backend) Activate(_ context.Context, sa *assoc.SA) error {
	c, err := b.codecFor(sa)
	if err != nil {
		return err
	}
	return c.InstallTX(codec.SA{SPI: sa.TxSPI, Suite: sa.Suite, Key: sa.TxKey})
}

// Remove implements offload.Backend. A replaced TX SA is already
// gone from the codec; the inbound one goes now.
func (b *Backend) Remove(_ context.Context, sa *assoc.SA) error {
	c, err := b.codecFor(sa)
	if err != nil {
		return nil // the peer, and with it every SA, is gone already
	}
	c.RemoveRX(sa.RxSPI)
	return nil
}

// Traffic implements offload.Backend from the codec's per-SA counters.
func (b *Backend) Traffic(sa *assoc.SA) (offload.Traffic, bool) {
	b.mu.Lock()
	pr := b.peers[sa.Peer]
	var outer netip.AddrPort
	if pr != nil {
		outer = pr.outer
	}
	b.mu.Unlock()
	if pr == nil {
		return offload.Traffic{}, false
	}
	c := pr.codec
	var t offload.Traffic
	t.LastOut, t.LastIn, _ = b.engine.Activity(outer)
	found := false
	st := c.Stats()
	for _, s := range st.SAs {
		switch {
		case s.Dir == codec.RX && s.SPI == sa.RxSPI:
			t.PacketsIn, t.BytesIn, found = s.Packets, s.Bytes, true
		case s.Dir == codec.TX && s.SPI == sa.TxSPI:
			t.PacketsOut, t.BytesOut, found = s.Packets, s.Bytes, true
		}
	}
	for _, d := range st.Drops {
		t.Drops += d
	}
	return t, found
}

// Drops implements offload.Backend: codec and engine drops by reason,
// over all peers.
func (b *Backend) Drops() map[string]uint64 {
	out := map[string]uint64{}
	st := b.engine.Stats()
	add := func(ds [userspace.NumDrops]uint64) {
		for i, v := range ds {
			if v > 0 {
				out[userspace.Drop(i).String()] += v
			}
		}
	}
	add(st.Drops)
	for _, p := range st.Peers {
		add(p.Drops)
		for i, v := range p.Codec.Drops {
			if v > 0 {
				out[codec.DropReason(i).String()] += v
			}
		}
	}
	return out
}

// Close implements offload.Backend: it stops the engine and wipes every
// key. The routes into the TUN device go with it; the fail-closed routes
// of peers that require encryption stay, so that their traffic is refused
// until the next start.
func (b *Backend) Close() error {
	b.mu.Lock()
	peers := b.peers
	b.peers = map[identity.PublicKey]*peer{}
	b.mu.Unlock()
	for _, pr := range peers {
		pr.stop()
		var drop []netlink.Route
		for _, r := range pr.routes {
			if r.Type != unix.RTN_PROHIBIT || !pr.cfg.RequireEncryption {
				drop = append(drop, r)
			}
		}
		b.dropRoutes(drop)
		pr.codec.Close()
	}
	var errs []error
	if b.engine != nil {
		errs = append(errs, b.engine.Close())
	}
	if b.dev != nil {
		errs = append(errs, b.dev.Close())
	}
	return errors.Join(errs...)
}
