package psp

import (
	"context"
	"errors"
	"fmt"
	"time"

	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/genl"
)

// This file is the device half of the manager: which PSP devices exist,
// the versions they accept, their key rotations (pspd's schedule and
// anyone else's) and their counters.

// ErrNoDevice is returned for a device id the kernel does not know.
var ErrNoDevice = errors.New("no such PSP device")

// Device is a PSP device as pspd reports it.
type Device struct {
	ID           uint32
	Ifindex      uint32 // 0 if the kernel did not say (associated namespaces)
	Ifname       string
	Capable      []string // version names the device supports
	Enabled      []string // version names it accepts on receive
	Rotations    uint64   // the kernel's key-rotations counter
	StaleEvents  uint64   // the kernel's stale-events counter
	LastRotation time.Time
	NextRotation time.Time // zero when pspd does not rotate this device
	// ByAssociation: pspd's namespace uses the device only through an
	// association; another namespace administers it.
	ByAssociation bool
	// Assoc are the netdevs associated with the device (AssocDevice): of
	// every namespace when pspd's administers it, else of pspd's only.
	Assoc []AssocDev
}

// devState is what pspd knows of a device beyond what the kernel reports.
type devState struct {
	rotations    uint64 // the kernel's key-rotations counter, as accounted for
	lastRotation time.Time
	nextRotation time.Time
}

// admin reports whether this namespace may administer d: a device seen
// only by association (dev-assoc) belongs to another namespace's pspd.
func admin(d genl.Device) bool { return !d.ByAssociation }

// track starts following a device, or refreshes it: it enables the
// configured version (leaving the versions others enabled) and anchors
// the rotation schedule.
func (m *Manager) track(d genl.Device) error {
	m.mu.Lock()
	known := m.devs[d.ID] != nil
	m.mu.Unlock()
	if !known {
		// The rotation count so far is the baseline that resync compares
		// against to find rotations whose notifications were lost.
		st := &devState{nextRotation: m.scheduleFrom(d, time.Now())}
		if s, err := m.c.Stats(d.ID); err == nil {
			st.rotations = s.KeyRotations
		}
		m.mu.Lock()
		if m.devs[d.ID] == nil {
			m.devs[d.ID] = st
			m.kickSchedule()
		}
		m.mu.Unlock()
	}
	if !admin(d) {
		return nil
	}
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

// scheduleFrom is the next scheduled rotation of d after one at t; zero
// when pspd does not rotate d.
func (m *Manager) scheduleFrom(d genl.Device, t time.Time) time.Time {
	if m.cfg.Rotation <= 0 || !admin(d) {
		return time.Time{}
	}
	return t.Add(m.cfg.Rotation)
}

func (m *Manager) watch(ctx context.Context) {
	defer m.wg.Done()
	for ctx.Err() == nil {
		err := m.c.Watch(ctx, func(ev genl.Event) error {
			switch ev.Kind {
			case genl.Resync:
				m.resync(ev.Devices)
			case genl.DevAdded, genl.DevChanged:
				if err := m.track(ev.Device); err != nil {
					m.log.Error("psp: device change", "err", err)
				}
			case genl.DevDeleted:
				m.deviceGone(ev.DevID)
			case genl.KeyRotated:
				m.rotated(ev.DevID, 1)
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

// resync rebuilds the device state from a full list after notifications
// may have been lost: devices that vanished are removed, and rotations
// missed are found from the kernel's key-rotations counter.
func (m *Manager) resync(devs []genl.Device) {
	present := map[uint32]bool{}
	for _, d := range devs {
		present[d.ID] = true
		if err := m.track(d); err != nil {
			m.log.Error("psp: resync", "err", err)
		}
		s, err := m.c.Stats(d.ID)
		if err != nil {
			continue
		}
		m.mu.Lock()
		st := m.devs[d.ID]
		missed := uint64(0)
		if st != nil && s.KeyRotations > st.rotations {
			missed = s.KeyRotations - st.rotations
		}
		m.mu.Unlock()
		if missed > 0 {
			m.log.Warn("psp: key rotations missed while notifications were lost", "dev", d.ID, "missed", missed)
			m.rotated(d.ID, int(min(missed, 2)))
			m.mu.Lock()
			st.rotations = s.KeyRotations
			m.mu.Unlock()
		}
	}
	m.mu.Lock()
	var gone []uint32
	for id := range m.devs {
		if !present[id] {
			gone = append(gone, id)
		}
	}
	m.mu.Unlock()
	for _, id := range gone {
		m.deviceGone(id)
	}
}

// deviceGone forgets a device the kernel removed and reports every
// connection that lost PSP with it.
func (m *Manager) deviceGone(id uint32) {
	m.mu.Lock()
	delete(m.devs, id)
	m.mu.Unlock()
	m.sweep()
	for _, ev := range m.conns.removed(id) {
		m.log.Warn("psp: connection lost PSP with its device", "dev", id, "local", ev.Local, "remote", ev.Remote)
		m.notify(ev)
	}
}

// rotated records n rotations of device dev's key, whoever did them, moves
// the schedule to count from now, and reports the connections they
// affect (live ones only: closed sockets are swept first).
func (m *Manager) rotated(dev uint32, n int) {
	now := time.Now()
	m.mu.Lock()
	if d := m.devs[dev]; d != nil {
		d.lastRotation = now
		d.rotations += uint64(n)
		if !d.nextRotation.IsZero() {
			d.nextRotation = now.Add(m.cfg.Rotation)
		}
		m.kickSchedule()
	}
	m.mu.Unlock()
	m.notify(Event{Kind: "psp-rotated", Device: dev, Detail: fmt.Sprintf("device %d rotated its key", dev)})
	m.sweep()
	for _, ev := range m.conns.rotated(dev, n) {
		if ev.Kind == "psp-stale-soon" {
			m.log.Warn("psp: the next device-key rotation ends this connection's PSP receive key; re-establish it",
				"dev", dev, "local", ev.Local, "remote", ev.Remote)
		} else {
			m.log.Warn("psp: a second device-key rotation ended this connection's PSP receive key", "dev", dev, "local", ev.Local, "remote", ev.Remote)
		}
		m.notify(ev)
	}
}

// kickSchedule wakes the rotation loop to re-read the schedule; m.mu held.
func (m *Manager) kickSchedule() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// schedule rotates each device Rotation after its last rotation, whoever
// did that one.
func (m *Manager) schedule(ctx context.Context) {
	defer m.wg.Done()
	t := time.NewTimer(time.Hour)
	defer t.Stop()
	for {
		now := time.Now()
		var due []uint32
		next := now.Add(m.cfg.Rotation)
		m.mu.Lock()
		for id, d := range m.devs {
			switch {
			case d.nextRotation.IsZero():
			case !d.nextRotation.After(now):
				due = append(due, id)
			case d.nextRotation.Before(next):
				next = d.nextRotation
			}
		}
		m.mu.Unlock()
		for _, id := range due {
			if err := m.c.KeyRotate(id); err != nil {
				m.log.Error("psp: scheduled rotation", "dev", id, "err", err)
			}
			// The notification moves the schedule too; this keeps it
			// moving if the notification is lost.
			m.mu.Lock()
			if d := m.devs[id]; d != nil && !d.nextRotation.IsZero() && !d.nextRotation.After(now) {
				d.nextRotation = now.Add(m.cfg.Rotation)
			}
			m.mu.Unlock()
		}
		if len(due) > 0 {
			continue
		}
		t.Reset(time.Until(next))
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-m.kick:
			if !t.Stop() {
				select {
				case <-t.C:
				default:
				}
			}
		}
	}
}

// Devices lists the PSP devices with their counters and rotation times.
func (m *Manager) Devices() ([]Device, error) {
	devs, err := m.c.Devices()
	if err != nil {
		return nil, fmt.Errorf("psp: %w", err)
	}
	out := make([]Device, 0, len(devs))
	for _, d := range devs {
		out = append(out, m.describe(d))
	}
	return out, nil
}

func (m *Manager) describe(d genl.Device) Device {
	ld := Device{ID: d.ID, Ifindex: d.Ifindex, Capable: names(d.Cap), Enabled: names(d.Enabled), ByAssociation: d.ByAssociation, Assoc: m.assocs(d)}
	// The ifindex of a device seen by association is its main netdev's,
	// in another namespace.
	if d.Ifindex != 0 && !d.ByAssociation {
		if l, err := netInterface(int(d.Ifindex), m.cfg.NetNS); err == nil {
			ld.Ifname = l
		}
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

// EnabledVersions is the union of the versions this namespace's PSP
// devices accept on receive: what the Hello tells peers. With no device
// it is ErrNoDevice: a namespace that gets one later (a container's, by
// association) must not have told its peers it accepts nothing.
func (m *Manager) EnabledVersions() (genl.Versions, error) {
	devs, err := m.c.Devices()
	if err != nil {
		return 0, fmt.Errorf("psp: %w", err)
	}
	if len(devs) == 0 {
		return 0, fmt.Errorf("psp: no PSP device in this namespace: %w", ErrNoDevice)
	}
	var vs genl.Versions
	for _, d := range devs {
		vs |= d.Enabled
	}
	return vs, nil
}

// DeviceStats returns every counter of every PSP device (get-stats).
func (m *Manager) DeviceStats() ([]genl.Stats, error) {
	st, err := m.c.AllStats()
	if err != nil {
		return nil, fmt.Errorf("psp: %w", err)
	}
	return st, nil
}

func names(vs genl.Versions) []string {
	out := []string{}
	for _, v := range vs.List() {
		out = append(out, v.String())
	}
	return out
}

// RotateDevice rotates one device's key now.
func (m *Manager) RotateDevice(_ context.Context, id uint32) (Device, error) {
	d, err := m.c.DevGet(id)
	if errors.Is(err, genl.ErrNoDevice) {
		return Device{}, fmt.Errorf("psp: no device %d (see pspctl dev list): %w", id, ErrNoDevice)
	}
	if err != nil {
		return Device{}, fmt.Errorf("psp: %w", err)
	}
	if !admin(d) {
		return Device{}, fmt.Errorf("psp: device %d belongs to another network namespace (used here by association); rotate it from there", id)
	}
	if err := m.c.KeyRotate(id); err != nil {
		if errors.Is(err, genl.ErrNoDevice) {
			return Device{}, fmt.Errorf("psp: no device %d (see pspctl dev list): %w", id, ErrNoDevice)
		}
		return Device{}, fmt.Errorf("psp: rotate device %d: %w", id, err)
	}
	return m.describe(d), nil
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
