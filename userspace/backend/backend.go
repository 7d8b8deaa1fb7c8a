// Package backend is the userspace data plane as pspd's key exchange sees
// it: one engine (a TUN device and a UDP underlay), one codec per peer,
// and the keyexchange.Installer that feeds each negotiated SA into the
// right codec, inbound first and outbound only when the peer receives.
//
// It also owns the host side of the tunnel: the TUN device's address, a
// route into it for every peer prefix, and, when encryption is required,
// a lower-priority "prohibit" route for each prefix that outlives the
// TUN device, so that while pspd is down (crashed, restarting) traffic to
// a peer is refused instead of leaving in clear.
package backend

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/keyexchange"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/wire"
	"github.com/pspd/pspd/offload"
	"github.com/pspd/pspd/policy"
	"github.com/pspd/pspd/userspace"
	"github.com/pspd/pspd/userspace/codec"
	"github.com/pspd/pspd/userspace/netutil"
	"github.com/pspd/pspd/userspace/tun"
	"github.com/pspd/pspd/userspace/udp"
	"github.com/pspd/pspd/userspace/xdp"
)

// prohibitMetric places the fail-closed routes behind the TUN routes.
const prohibitMetric = 4096

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

// Backend is the running userspace data plane.
type Backend struct {
	cfg    *policy.Config
	log    *slog.Logger
	dev    *tun.Device
	link   netlink.Link
	engine *userspace.Dataplane
	rekey  chan identity.PublicKey
	// txKeys outlives every peer's codec: a peer removed and added back
	// must not be given an earlier TX key either.
	txKeys *codec.KeyHistory

	mu    sync.Mutex
	peers map[identity.PublicKey]*peer
}

type peer struct {
	cfg    policy.Peer
	codec  *codec.Codec
	outer  netip.AddrPort
	routes []netlink.Route
	stop   context.CancelFunc
}

var _ offload.Backend = (*Backend)(nil)

func framing(f policy.Framing) codec.Framing {
	if f == policy.FramingPSP {
		return codec.PSPTunnel
	}
	return codec.Geneve
}

// New opens the TUN device and the underlay socket and starts the engine.
// On error nothing stays open.
func New(ctx context.Context, cfg *policy.Config, log *slog.Logger) (b *Backend, err error) {
	us := cfg.Userspace
	fr := framing(us.Framing)
	// A scratch codec tells the framing's overhead.
	probe, err := codec.New(codec.Config{Framing: fr})
	if err != nil {
		return nil, err
	}
	overhead := probe.Overhead()
	probe.Close()
	mtu, err := netutil.InnerMTU(underlayMTU, cfg.Listen.Addr(), overhead)
	if err != nil {
		return nil, fmt.Errorf("userspace: %w", err)
	}
	b = &Backend{cfg: cfg, log: log, peers: map[identity.PublicKey]*peer{}, rekey: make(chan identity.PublicKey, 16), txKeys: codec.NewKeyHistory()}
	defer func() {
		if err != nil {
			b.Close()
		}
	}()
	if b.dev, err = tun.Open(us.Interface, mtu); err != nil {
		return nil, fmt.Errorf("userspace: open TUN %s: %w", us.Interface, err)
	}
	if b.link, err = netlink.LinkByName(us.Interface); err != nil {
		return nil, fmt.Errorf("userspace: %s: %w", us.Interface, err)
	}
	if us.Address.IsValid() {
		addr := &netlink.Addr{IPNet: toIPNet(us.Address)}
		if err := netlink.AddrReplace(b.link, addr); err != nil {
			return nil, fmt.Errorf("userspace: address %v on %s: %w", us.Address, us.Interface, err)
		}
	}
	conn, io, err := openUnderlay(cfg, log)
	if err != nil {
		return nil, err
	}
	dev := b.dev
	b.engine, err = userspace.Start(ctx, userspace.Config{TUN: dev, Underlay: conn, MTU: mtu, Framing: fr, Logger: log.With("part", "userspace")})
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("userspace: %w", err)
	}
	b.dev = nil // the engine owns it now
	log.Info("userspace data plane up", "interface", us.Interface, "mtu", mtu, "framing", fr, "port", us.Port, "io", io)
	return b, nil
}

// openUnderlay opens the outer side as configured: AF_XDP on the
// interface that holds the listen address, or batched UDP sockets. With
// io auto, AF_XDP is used when it can be and UDP otherwise, and the log
// says why.
func openUnderlay(cfg *policy.Config, log *slog.Logger) (userspace.Underlay, policy.IO, error) {
	us := cfg.Userspace
	if us.IO != policy.IOUDP {
		u, err := openXDP(cfg.Listen.Addr(), us.Port)
		if err == nil {
			return u, policy.IOAFXDP, nil
		}
		if us.IO == policy.IOAFXDP {
			return nil, "", fmt.Errorf("userspace: io af_xdp: %w (set userspace.io to udp or auto)", err)
		}
		log.Info("userspace: AF_XDP not used; batched UDP sockets instead", "reason", err)
	}
	conn, err := udp.Listen(netip.AddrPortFrom(cfg.Listen.Addr(), us.Port), userspace.DefaultBatch)
	if err != nil {
		return nil, "", fmt.Errorf("userspace: underlay socket on port %d: %w", us.Port, err)
	}
	if !conn.GRO() {
		log.Info("userspace: the kernel refused UDP GRO (needs Linux 5.0); datagrams are read one by one")
	}
	return conn, policy.IOUDP, nil
}

func openXDP(listen netip.Addr, port uint16) (userspace.Underlay, error) {
	if listen.IsUnspecified() {
		return nil, errors.New("AF_XDP needs a specific listen address: the interface holding it gets the XDP program")
	}
	link, err := linkWithAddr(listen)
	if err != nil {
		return nil, err
	}
	// The socket binds one receive queue; packets the NIC steers to other
	// queues would reach no one.
	queues, _ := filepath.Glob(filepath.Join("/sys/class/net", link.Attrs().Name, "queues", "rx-*"))
	if len(queues) != 1 {
		return nil, fmt.Errorf("%s has %d receive queues; the AF_XDP underlay binds one (reduce them with ethtool -L, or use udp)", link.Attrs().Name, len(queues))
	}
	return userspace.NewXDPUnderlay(userspace.XDPConfig{Ifindex: link.Attrs().Index, Mode: xdp.Auto, Port: port, Ports: []uint16{port}})
}

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
func (b *Backend) Kind() wire.Backend { return wire.BackendUserspace }

// RekeyWanted delivers the peers whose TX key reached its packet budget or
// age; the daemon rekeys them.
func (b *Backend) RekeyWanted() <-chan identity.PublicKey { return b.rekey }

// AddPeer gives a configured peer a codec, a place in the engine and
// routes for its prefixes.
func (b *Backend) AddPeer(p policy.Peer) (err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.peers[p.PublicKey] != nil {
		return fmt.Errorf("userspace: peer %s added twice", p.Name)
	}
	life := 3 * b.cfg.RekeyInterval
	c, err := codec.New(codec.Config{
		Framing: framing(b.cfg.Userspace.Framing), SoftPackets: b.cfg.PacketBudget, HardPackets: 2 * b.cfg.PacketBudget,
		SoftLifetime: 2 * b.cfg.RekeyInterval, HardLifetime: life, Logger: b.log.With("peer", p.Name),
		TXKeys: b.txKeys,
	})
	if err != nil {
		return fmt.Errorf("userspace: peer %s: %w", p.Name, err)
	}
	pr := &peer{cfg: p, codec: c, outer: netip.AddrPortFrom(p.Endpoint.Addr(), b.cfg.Userspace.Port)}
	defer func() {
		if err != nil {
			b.dropRoutes(pr)
			c.Close()
		}
	}()
	if err := b.engine.AddPeer(userspace.Peer{Endpoint: pr.outer, Prefixes: p.Prefixes, Codec: c}); err != nil {
		return fmt.Errorf("userspace: peer %s: %w", p.Name, err)
	}
	for _, pf := range p.Prefixes {
		routes := []netlink.Route{{LinkIndex: b.link.Attrs().Index, Dst: toIPNet(pf), Scope: netlink.SCOPE_LINK}}
		if b.cfg.RequireEncryption {
			routes = append(routes, netlink.Route{Dst: toIPNet(pf), Type: unix.RTN_PROHIBIT, Priority: prohibitMetric})
		}
		for _, r := range routes {
			if err := netlink.RouteReplace(&r); err != nil {
				b.engine.RemovePeer(pr.outer)
				return fmt.Errorf("userspace: peer %s: route %v: %w", p.Name, pf, err)
			}
			pr.routes = append(pr.routes, r)
		}
	}
	ctx, stop := context.WithCancel(context.Background())
	pr.stop = stop
	go b.forwardRekeys(ctx, p.PublicKey, c)
	b.peers[p.PublicKey] = pr
	return nil
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

func (b *Backend) dropRoutes(pr *peer) {
	for _, r := range pr.routes {
		if err := netlink.RouteDel(&r); err != nil {
			b.log.Warn("userspace: remove route", "dst", r.Dst, "err", err)
		}
	}
	pr.routes = nil
}

// RemovePeer takes a peer out of the engine and removes its routes,
// including the fail-closed ones: the operator removed the peer.
func (b *Backend) RemovePeer(p policy.Peer) {
	b.mu.Lock()
	defer b.mu.Unlock()
	pr := b.peers[p.PublicKey]
	if pr == nil {
		return
	}
	delete(b.peers, p.PublicKey)
	pr.stop()
	b.engine.RemovePeer(pr.outer)
	b.dropRoutes(pr)
	pr.codec.Close()
}

func (b *Backend) codecFor(sa *keyexchange.SA) (*codec.Codec, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	pr := b.peers[sa.Peer]
	if pr == nil {
		return nil, fmt.Errorf("userspace: no peer %s in the data plane", sa.Peer.Fingerprint())
	}
	return pr.codec, nil
}

// Install implements keyexchange.Installer: the inbound SA goes live, the
// outbound one waits for Activate.
func (b *Backend) Install(_ context.Context, sa *keyexchange.SA) error {
	c, err := b.codecFor(sa)
	if err != nil {
		return err
	}
	return c.InstallRX(codec.SA{SPI: sa.RxSPI, Suite: sa.Suite, Key: sa.RxKey})
}

// Activate implements keyexchange.Installer: TX moves to the new SA.
func (b *Backend) Activate(_ context.Context, sa *keyexchange.SA) error {
	c, err := b.codecFor(sa)
	if err != nil {
		return err
	}
	return c.InstallTX(codec.SA{SPI: sa.TxSPI, Suite: sa.Suite, Key: sa.TxKey})
}

// Remove implements keyexchange.Installer. A replaced TX SA is already
// gone from the codec; the inbound one goes now.
func (b *Backend) Remove(_ context.Context, sa *keyexchange.SA) error {
	c, err := b.codecFor(sa)
	if err != nil {
		return nil // the peer, and with it every SA, is gone already
	}
	c.RemoveRX(sa.RxSPI)
	return nil
}

// Traffic implements offload.Backend from the codec's per-SA counters.
func (b *Backend) Traffic(sa *keyexchange.SA) (offload.Traffic, bool) {
	c, err := b.codecFor(sa)
	if err != nil {
		return offload.Traffic{}, false
	}
	var t offload.Traffic
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

// Drops implements the daemon's drop counter: codec and engine drops by
// reason, over all peers.
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

// Close stops the engine, wipes every key, and removes the routes into
// the TUN device. The fail-closed routes go too: pspd was stopped on
// purpose. A crash leaves them in place.
func (b *Backend) Close() error {
	b.mu.Lock()
	peers := b.peers
	b.peers = map[identity.PublicKey]*peer{}
	b.mu.Unlock()
	for _, pr := range peers {
		pr.stop()
		b.dropRoutes(pr)
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
