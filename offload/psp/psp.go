// Package psp is pspd's manager of kernel PSP (the generic netlink family
// psp). It has two halves:
//
//   - devices (device.go): it enables the PSP version the policy's suite
//     needs on every PSP device of its namespace, rotates device keys on a
//     schedule anchored on each device's last rotation (whoever did it),
//     follows the kernel's notifications, and reports device counters;
//   - upgrades (upgrade.go, conn.go): it upgrades TCP connections that
//     applications hand to pspd and keeps the table of upgraded
//     connections that are still open.
//
// # The upgrade protocol
//
// Once a socket has a transmit key the kernel drops clear data it
// receives, and data queued before the transmit key stays clear, even
// when retransmitted. So both ends must stop sending clear data, and
// have all of it delivered, before either installs its transmit key.
// Each end's pspd does, for one connection:
//
//  1. checks, before touching the socket, that it is an ESTABLISHED TCP
//     connection, that its remote address belongs to the named peer (its
//     endpoint or prefixes, see SetPeer), that the peer's PSP devices
//     accept the configured version (as the peer's pspd said in its
//     session's Hello, PeerVersions), and that the PSP device its route
//     leaves through accepts it;
//  2. waits (at most DrainWait) until the peer has acknowledged every
//     byte this end sent (SIOCOUTQ is 0);
//  3. binds a receive key to the socket (rx-assoc; the device makes it)
//     and sends it to the peer's pspd inside the authenticated session:
//     this message is also the promise that this end's clear data has
//     arrived;
//  4. waits (at most KeyWait) for the peer's key for the same
//     connection, refusing one equal to its own receive key;
//  5. installs it as the transmit key (tx-assoc) once this end has no
//     unacknowledged data and the application has read the clear data
//     the peer sent before its upgrade (the kernel refuses otherwise with
//     "incompatible segments", and pspd retries for at most DrainWait
//     while the application's reader drains it).
//
// The application must therefore not write while its upgrade runs, and
// must keep reading (or know that the peer sent nothing unread) until it
// returns; the errors say which rule was broken.
//
// # Rotations
//
// The kernel ties a socket's receive key to the device key of its time:
// the first device-key rotation leaves it working, the second kills it,
// and a socket cannot be given a new receive key. So pspd cannot rekey an
// upgraded connection; after a rotation it reports every open connection
// that the next rotation will kill, for the application to re-establish
// in time (psp.rst: "applications are expected to re-establish
// connections before keys are rotated again"), and when a device goes
// away it reports the connections that lost PSP with it.
package psp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pspd/pspd/genl"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
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
	// DrainWait bounds each wait of an upgrade for clear data in flight
	// to be acknowledged or read (KeyWait).
	DrainWait time.Duration
	// Sweep is how often the entries of closed sockets are dropped from
	// the connection table (10s); they are also dropped before any event
	// about their device is reported.
	Sweep  time.Duration
	Logger *slog.Logger
}

// Event is a rotation, or a connection that a rotation or a device's
// removal will kill or has killed.
type Event struct {
	Kind   string // "psp-rotated", "psp-stale-soon" or "psp-stale"
	Detail string
	Device uint32
	// The connection, for the stale kinds.
	Peer          identity.PublicKey
	Local, Remote netip.AddrPort
}

// Manager manages the PSP devices of one network namespace and the
// connections upgraded through them.
type Manager struct {
	cfg     Config
	version genl.Version
	c       *genl.Client
	log     *slog.Logger
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	events  chan Event
	kick    chan struct{} // the device list or a schedule changed

	mu         sync.Mutex // guards devs and assocNames
	devs       map[uint32]*devState
	assocNames map[assocKey]assocName // the associations pspd made

	counts counters

	conns *connTable
	keys  *keyBroker
	peers *peerAddrs
	live  func() (map[uint64]struct{}, error) // open sockets by cookie
}

func newManager(cfg Config) *Manager {
	if cfg.KeyWait <= 0 {
		cfg.KeyWait = 10 * time.Second
	}
	if cfg.DrainWait <= 0 {
		cfg.DrainWait = cfg.KeyWait
	}
	if cfg.Sweep <= 0 {
		cfg.Sweep = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	ns := cfg.NetNS
	return &Manager{cfg: cfg, version: genl.Version(cfg.Suite), log: cfg.Logger,
		events: make(chan Event, 1024), kick: make(chan struct{}, 1), devs: map[uint32]*devState{}, assocNames: map[assocKey]assocName{},
		conns: newConnTable(), keys: newKeyBroker(), peers: &peerAddrs{m: map[identity.PublicKey][]netip.Prefix{}},
		live: func() (map[uint64]struct{}, error) { return liveSockets(ns) }}
}

// New dials the kernel, enables the needed version on every device and
// starts the rotation schedule, the notification watch and the sweep of
// closed connections.
func New(ctx context.Context, cfg Config) (*Manager, error) {
	m := newManager(cfg)
	c, err := genl.Dial(genl.Config{NetNS: cfg.NetNS})
	if err != nil {
		return nil, fmt.Errorf("psp: %w", err)
	}
	m.c = c
	devs, err := c.Devices()
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("psp: %w", err)
	}
	for _, d := range devs {
		if err := m.track(d); err != nil {
			c.Close()
			return nil, err
		}
	}
	wctx, cancel := context.WithCancel(ctx)
	m.cancel = cancel
	m.wg.Add(2)
	go m.watch(wctx)
	go m.sweepLoop(wctx)
	if m.cfg.Rotation > 0 {
		m.wg.Add(1)
		go m.schedule(wctx)
	}
	return m, nil
}

// notify queues an event; a reader too slow for rotations loses some, but
// never blocks the notification watch.
func (m *Manager) notify(ev Event) {
	if ev.Kind != "psp-rotated" {
		m.counts.stale.Add(1)
	}
	select {
	case m.events <- ev:
	default:
		m.log.Warn("psp: event dropped: the reader is too slow", "kind", ev.Kind, "detail", ev.Detail)
	}
}

// Events delivers rotations and the connections they doom.
func (m *Manager) Events() <-chan Event { return m.events }

// Connections is the number of upgraded connections still open.
func (m *Manager) Connections() int { return m.conns.len() }

// Counters are the manager's own counts since it started, for metrics
// (the devices' own are in DeviceStats).
type Counters struct {
	UpgradesOK      uint64 // upgrades completed
	UpgradesRefused uint64 // refused before the socket was touched
	UpgradesFailed  uint64 // failed after rx-assoc: the socket had to be closed
	StaleReported   uint64 // connections reported psp-stale-soon or psp-stale
	Connections     int    // upgraded connections still open
}

type counters struct {
	upgradesOK, upgradesRefused, upgradesFailed, stale atomic.Uint64
}

// Counters returns the manager's counts.
func (m *Manager) Counters() Counters {
	return Counters{UpgradesOK: m.counts.upgradesOK.Load(), UpgradesRefused: m.counts.upgradesRefused.Load(),
		UpgradesFailed: m.counts.upgradesFailed.Load(), StaleReported: m.counts.stale.Load(), Connections: m.conns.len()}
}

// sweep drops the table entries of sockets that were closed. If the
// kernel cannot say which sockets are open, entries stay.
func (m *Manager) sweep() {
	live, err := m.live()
	if err != nil {
		m.log.Warn("psp: cannot list open sockets; closed connections stay in the table", "err", err)
		return
	}
	if n := m.conns.sweep(live); n > 0 {
		m.log.Debug("psp: closed connections forgotten", "count", n)
	}
}

func (m *Manager) sweepLoop(ctx context.Context) {
	defer m.wg.Done()
	t := time.NewTicker(m.cfg.Sweep)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if m.conns.len() > 0 {
				m.sweep()
			}
		}
	}
}

// Close stops the schedule, the watch and the sweep, and wipes keys still
// held.
func (m *Manager) Close() error {
	m.cancel()
	m.wg.Wait()
	m.keys.forget(nil)
	return m.c.Close()
}
