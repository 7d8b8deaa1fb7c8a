// Package psp is pspd's manager of kernel PSP (the generic netlink family
// psp): it enables the PSP version the policy's suite needs on every PSP
// device, rotates device keys on schedule and follows rotations others
// do, and upgrades TCP connections that applications hand to pspd.
//
// An upgrade binds a receive key to the local socket (rx-assoc; the
// device makes the key), sends that key to the peer's pspd inside the
// authenticated key-exchange session, and installs the key the peer's
// pspd sends for the same connection as the socket's transmit key
// (tx-assoc). Each side finishes on its own once it has both.
//
// The kernel ties a socket's receive key to the device key of its time:
// the first device-key rotation leaves it working, the second kills it,
// and a socket cannot be given a new receive key. So pspd cannot rekey an
// upgraded connection; after a rotation it reports every connection that
// the next rotation will kill, for the application to re-establish in
// time (psp.rst: "applications are expected to re-establish connections
// before keys are rotated again").
package psp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"time"

	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/genl"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/keyexchange/wire"
	"github.com/pspd/pspd/localapi"
)

// Probe reports whether this host has kernel PSP and a device to use.
func Probe(netNS int) error {
	c, err := genl.Dial(genl.Config{NetNS: netNS})
	if err != nil {
		return err
	}
	defer c.Close()
	devs, err := c.Devices()
	if err != nil {
		return err
	}
	if len(devs) == 0 {
		return errors.New("the kernel has PSP but no PSP-capable NIC is present")
	}
	return nil
}

// Config configures a Manager.
type Config struct {
	NetNS int // network namespace fd; 0: the caller's
	// Suite fixes the PSP version of upgraded connections.
	Suite kdf.Suite
	// Rotation is the device-key rotation interval; 0 leaves rotation to
	// others (pspd still follows their rotations).
	Rotation time.Duration
	// KeyWait bounds how long an upgrade waits for the peer's key (10s).
	KeyWait time.Duration
	Logger  *slog.Logger
}

// Event is a rotation, or a connection that a rotation will kill or has
// killed.
type Event struct {
	Kind   string // "psp-rotated", "psp-stale-soon" or "psp-stale"
	Detail string
}

// Manager manages the PSP devices of one network namespace.
type Manager struct {
	cfg     Config
	version genl.Version
	c       *genl.Client
	log     *slog.Logger
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	events  chan Event

	mu      sync.Mutex
	devs    map[uint32]*device
	pending map[tuple]*waiter // local upgrades waiting for the peer's key
	early   map[tuple]*early  // peer keys that came before the local upgrade
	conns   map[tuple]*conn   // upgraded connections, until a rotation kills them
}

type device struct {
	lastRotation time.Time
	nextRotation time.Time
}

// tuple is a TCP connection as this host sees it.
type tuple struct{ local, remote netip.AddrPort }

type waiter struct {
	peer identity.PublicKey
	key  chan wire.ExplicitKey
}

type early struct {
	peer    identity.PublicKey
	key     wire.ExplicitKey
	expires time.Time
}

type conn struct {
	dev       uint32
	rotations int // device-key rotations since the upgrade
}

// maxEarly bounds the keys held for upgrades the local application has
// not asked for yet.
const maxEarly = 1024

// New dials the kernel, enables the needed version on every device and
// starts the rotation schedule and the notification watch.
func New(ctx context.Context, cfg Config) (*Manager, error) {
	if cfg.KeyWait <= 0 {
		cfg.KeyWait = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	c, err := genl.Dial(genl.Config{NetNS: cfg.NetNS})
	if err != nil {
		return nil, fmt.Errorf("psp: %w", err)
	}
	m := &Manager{cfg: cfg, version: genl.Version(cfg.Suite), c: c, log: cfg.Logger,
		events: make(chan Event, 64), devs: map[uint32]*device{}, pending: map[tuple]*waiter{}, early: map[tuple]*early{}, conns: map[tuple]*conn{}}
	devs, err := c.Devices()
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("psp: %w", err)
	}
	for _, d := range devs {
		if err := m.enable(d); err != nil {
			c.Close()
			return nil, err
		}
	}
	wctx, cancel := context.WithCancel(ctx)
	m.cancel = cancel
	m.wg.Add(1)
	go m.watch(wctx)
	if cfg.Rotation > 0 {
		m.wg.Add(1)
		go m.rotate(wctx)
	}
	return m, nil
}

// enable turns on the configured version on a device that can do it,
// leaving the versions others enabled.
func (m *Manager) enable(d genl.Device) error {
	m.mu.Lock()
	if m.devs[d.ID] == nil {
		m.devs[d.ID] = &device{}
		if m.cfg.Rotation > 0 {
			m.devs[d.ID].nextRotation = time.Now().Add(m.cfg.Rotation)
		}
	}
	m.mu.Unlock()
	if !d.Cap.Has(m.version) {
		m.log.Warn("psp: device cannot do the configured suite; connections through it cannot be upgraded",
			"dev", d.ID, "ifindex", d.Ifindex, "capable", d.Cap.String(), "want", m.version.String())
		return nil
	}
	if d.Enabled.Has(m.version) {
		return nil
	}
	if err := m.c.DevSet(d.ID, d.Enabled|genl.VersionsOf(m.version)); err != nil {
		return fmt.Errorf("psp: enable %s on device %d: %w", m.version, d.ID, err)
	}
	m.log.Info("psp: version enabled", "dev", d.ID, "version", m.version.String())
	return nil
}

func (m *Manager) watch(ctx context.Context) {
	defer m.wg.Done()
	for ctx.Err() == nil {
		err := m.c.Watch(ctx, func(ev genl.Event) error {
			switch ev.Kind {
			case genl.Resync:
				for _, d := range ev.Devices {
					if err := m.enable(d); err != nil {
						m.log.Error("psp: resync", "err", err)
					}
				}
			case genl.DevAdded, genl.DevChanged:
				if err := m.enable(ev.Device); err != nil {
					m.log.Error("psp: device change", "err", err)
				}
			case genl.DevDeleted:
				m.mu.Lock()
				delete(m.devs, ev.DevID)
				m.mu.Unlock()
			case genl.KeyRotated:
				m.rotated(ev.DevID)
			}
			return nil
		})
		if ctx.Err() == nil {
			m.log.Error("psp: notification watch failed; restarting", "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}
}

// rotated records a device-key rotation, whoever did it, and reports the
// connections it affects.
func (m *Manager) rotated(dev uint32) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if d := m.devs[dev]; d != nil {
		d.lastRotation = time.Now()
		if m.cfg.Rotation > 0 {
			d.nextRotation = d.lastRotation.Add(m.cfg.Rotation)
		}
	}
	m.notify("psp-rotated", fmt.Sprintf("device %d rotated its key", dev))
	for t, c := range m.conns {
		if c.dev != dev {
			continue
		}
		c.rotations++
		if c.rotations == 1 {
			m.log.Warn("psp: the next device-key rotation ends this connection's PSP receive key; re-establish it",
				"dev", dev, "local", t.local, "remote", t.remote)
			m.notify("psp-stale-soon", fmt.Sprintf("connection %s -> %s: re-establish before device %d rotates again", t.local, t.remote, dev))
			continue
		}
		m.log.Warn("psp: a second device-key rotation ended this connection's PSP receive key", "dev", dev, "local", t.local, "remote", t.remote)
		m.notify("psp-stale", fmt.Sprintf("connection %s -> %s can no longer receive", t.local, t.remote))
		delete(m.conns, t)
	}
}

// notify queues an event; a reader too slow for rotations loses some, but
// never blocks the notification watch.
func (m *Manager) notify(kind, detail string) {
	select {
	case m.events <- Event{kind, detail}:
	default:
	}
}

// Events delivers rotations and the connections they doom.
func (m *Manager) Events() <-chan Event { return m.events }

func (m *Manager) rotate(ctx context.Context) {
	defer m.wg.Done()
	t := time.NewTicker(m.cfg.Rotation)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		devs, err := m.c.Devices()
		if err != nil {
			m.log.Error("psp: scheduled rotation: list devices", "err", err)
			continue
		}
		for _, d := range devs {
			if err := m.c.KeyRotate(d.ID); err != nil {
				m.log.Error("psp: scheduled rotation", "dev", d.ID, "err", err)
			}
		}
	}
}

// Devices lists the PSP devices with their counters and rotation times.
func (m *Manager) Devices() ([]localapi.Device, error) {
	devs, err := m.c.Devices()
	if err != nil {
		return nil, fmt.Errorf("psp: %w", err)
	}
	out := make([]localapi.Device, 0, len(devs))
	for _, d := range devs {
		out = append(out, m.describe(d))
	}
	return out, nil
}

func (m *Manager) describe(d genl.Device) localapi.Device {
	ld := localapi.Device{ID: d.ID, Ifindex: d.Ifindex, Capable: names(d.Cap), Enabled: names(d.Enabled)}
	if l, err := netInterface(int(d.Ifindex), m.cfg.NetNS); err == nil {
		ld.Ifname = l
	}
	if st, err := m.c.Stats(d.ID); err == nil {
		ld.Rotations, ld.StaleEvents = st.KeyRotations, st.StaleEvents
	}
	m.mu.Lock()
	if md := m.devs[d.ID]; md != nil {
		ld.LastRotation, ld.NextRotation = md.lastRotation, md.nextRotation
	}
	m.mu.Unlock()
	return ld
}

func names(vs genl.Versions) []string {
	out := []string{}
	for _, v := range vs.List() {
		out = append(out, v.String())
	}
	return out
}

// RotateDevice rotates one device's key now.
func (m *Manager) RotateDevice(_ context.Context, id uint32) (localapi.Device, error) {
	if err := m.c.KeyRotate(id); err != nil {
		if errors.Is(err, genl.ErrNoDevice) {
			return localapi.Device{}, fmt.Errorf("psp: no device %d (see pspctl dev list): %w", id, localapi.ErrNotFound)
		}
		return localapi.Device{}, fmt.Errorf("psp: rotate device %d: %w", id, err)
	}
	d, err := m.c.DevGet(id)
	if err != nil {
		return localapi.Device{}, fmt.Errorf("psp: %w", err)
	}
	return m.describe(d), nil
}

// Result is a completed upgrade.
type Result struct {
	Device       uint32
	Version      genl.Version
	RxSPI, TxSPI uint32
}

// Upgrade binds PSP to a connected TCP socket: rx-assoc, send the key to
// peer through send, wait for the peer's key for the same connection, and
// tx-assoc. The caller keeps sock.
//
// A failure after rx-assoc leaves the socket with a receive key the
// kernel cannot take back, and the peer may already send under PSP: the
// error says so, and the connection should be closed.
func (m *Manager) Upgrade(ctx context.Context, sock *os.File, peer identity.PublicKey, send func(context.Context, wire.ExplicitKey) error) (Result, error) {
	t, err := tupleOf(sock)
	if err != nil {
		return Result{}, fmt.Errorf("psp: %w", err)
	}
	w := &waiter{peer: peer, key: make(chan wire.ExplicitKey, 1)}
	m.mu.Lock()
	if m.pending[t] != nil || m.conns[t] != nil {
		m.mu.Unlock()
		return Result{}, fmt.Errorf("psp: connection %s -> %s is already being upgraded or was upgraded", t.local, t.remote)
	}
	m.pending[t] = w
	if e := m.early[t]; e != nil {
		delete(m.early, t)
		if e.peer == peer {
			w.key <- e.key
		} else {
			e.key.Key.Wipe()
		}
	}
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.pending, t)
		m.mu.Unlock()
		select {
		case k := <-w.key: // arrived after we gave up
			k.Key.Wipe()
		default:
		}
	}()

	rx, err := m.c.RxAssoc(sock, m.version, 0)
	if err != nil {
		return Result{}, fmt.Errorf("psp: rx-assoc on %s -> %s: %w", t.local, t.remote, err)
	}
	mine := wire.ExplicitKey{Suite: m.cfg.Suite, SPI: kdf.SPI(rx.Key.SPI), Key: rx.Key.Key, Local: t.local, Remote: t.remote}
	err = send(ctx, mine)
	rx.Key.Wipe()
	if err != nil {
		return Result{}, fmt.Errorf("psp: send the receive key to the peer: %w (the socket has a PSP receive key now and cannot go back; close it)", err)
	}
	var theirs wire.ExplicitKey
	wctx, cancel := context.WithTimeout(ctx, m.cfg.KeyWait)
	defer cancel()
	select {
	case theirs = <-w.key:
	case <-wctx.Done():
		return Result{}, fmt.Errorf("psp: the peer's pspd sent no key for %s -> %s within %s: did the application at the other end upgrade its socket? (this socket has a PSP receive key now; close it)", t.local, t.remote, m.cfg.KeyWait)
	}
	defer theirs.Key.Wipe()
	if theirs.Suite != m.cfg.Suite {
		return Result{}, fmt.Errorf("psp: the peer uses %s, this host %s (set the same suite on both; close this socket)", theirs.Suite, m.cfg.Suite)
	}
	// The kernel refuses the transmit key while clear data the peer sent
	// before its upgrade is still queued; the application drains it.
	for {
		err := m.c.TxAssoc(sock, m.version, rx.DevID, genl.AssocKey{SPI: genl.SPI(theirs.SPI), Key: theirs.Key})
		if err == nil {
			break
		}
		if !errors.Is(err, genl.ErrBusy) || wctx.Err() != nil {
			return Result{}, fmt.Errorf("psp: tx-assoc on %s -> %s: %w (close this socket)", t.local, t.remote, err)
		}
		select {
		case <-wctx.Done():
		case <-time.After(20 * time.Millisecond):
		}
	}
	m.mu.Lock()
	m.conns[t] = &conn{dev: rx.DevID}
	m.mu.Unlock()
	m.log.Info("psp: connection upgraded", "local", t.local, "remote", t.remote, "dev", rx.DevID, "rx_spi", rx.Key.SPI, "tx_spi", theirs.SPI)
	return Result{Device: rx.DevID, Version: m.version, RxSPI: uint32(rx.Key.SPI), TxSPI: uint32(theirs.SPI)}, nil
}

// PeerKey takes a key the peer's pspd sent for one of its connections to
// this host. It goes to the local upgrade of the same connection, or
// waits for it for KeyWait.
func (m *Manager) PeerKey(peer identity.PublicKey, k wire.ExplicitKey) {
	t := tuple{local: k.Remote, remote: k.Local} // the peer's view, reversed
	m.mu.Lock()
	defer m.mu.Unlock()
	if w := m.pending[t]; w != nil {
		if w.peer != peer {
			m.log.Warn("psp: a peer sent a key for a connection upgraded towards another peer; dropped",
				"from", peer.Fingerprint(), "local", t.local, "remote", t.remote)
			k.Key.Wipe()
			return
		}
		select {
		case w.key <- k:
		default:
			k.Key.Wipe() // a second key for the same connection
		}
		return
	}
	now := time.Now()
	for et, e := range m.early {
		if now.After(e.expires) {
			e.key.Key.Wipe()
			delete(m.early, et)
		}
	}
	if old := m.early[t]; old != nil {
		old.key.Key.Wipe()
	} else if len(m.early) >= maxEarly {
		m.log.Warn("psp: too many peer keys for connections not upgraded here; dropped", "from", peer.Fingerprint())
		k.Key.Wipe()
		return
	}
	m.early[t] = &early{peer: peer, key: k, expires: now.Add(m.cfg.KeyWait)}
}

// Close stops the schedule and the watch and wipes keys still held.
func (m *Manager) Close() error {
	m.cancel()
	m.wg.Wait()
	m.mu.Lock()
	for t, e := range m.early {
		e.key.Key.Wipe()
		delete(m.early, t)
	}
	m.mu.Unlock()
	return m.c.Close()
}

func tupleOf(sock *os.File) (tuple, error) {
	rc, err := sock.SyscallConn()
	if err != nil {
		return tuple{}, err
	}
	var t tuple
	var serr error
	err = rc.Control(func(fd uintptr) {
		var la, ra unix.Sockaddr
		if la, serr = unix.Getsockname(int(fd)); serr != nil {
			return
		}
		if ra, serr = unix.Getpeername(int(fd)); serr != nil {
			serr = fmt.Errorf("socket is not connected: %w", serr)
			return
		}
		t = tuple{local: addrPort(la), remote: addrPort(ra)}
	})
	if err != nil {
		return tuple{}, err
	}
	return t, serr
}

func addrPort(sa unix.Sockaddr) netip.AddrPort {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr).Unmap(), uint16(a.Port))
	}
	return netip.AddrPort{}
}

// netInterface names the interface with index ifindex in namespace ns.
func netInterface(ifindex, ns int) (string, error) {
	h, err := routeHandle(ns)
	if err != nil {
		return "", err
	}
	defer h.Close()
	l, err := h.LinkByIndex(ifindex)
	if err != nil {
		return "", err
	}
	return l.Attrs().Name, nil
}

// routeHandle opens route netlink in namespace ns (0: the caller's).
func routeHandle(ns int) (*vnl.Handle, error) {
	if ns == 0 {
		return vnl.NewHandle(unix.NETLINK_ROUTE)
	}
	return vnl.NewHandleAt(netns.NsHandle(ns), unix.NETLINK_ROUTE)
}
