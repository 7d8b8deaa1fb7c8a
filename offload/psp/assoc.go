package psp

import (
	"errors"
	"fmt"
	"slices"

	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/genl"
)

// This file gives other network namespaces (containers) the use of a
// PSP device of pspd's namespace (dev-assoc, Linux 7.3): a netdev there,
// such as the container's end of a netkit or veth pair, is associated
// with the device, and the container's sockets routed through it can
// then be upgraded with the device's keys.

// Errors of AssocDevice and DisassocDevice, for errors.Is.
var (
	// ErrNoNetNS: the namespace named is not there, or is not a network
	// namespace.
	ErrNoNetNS = errors.New("no such network namespace")
	// ErrNoInterface: the namespace has no such interface, or the
	// interface is not associated with the device.
	ErrNoInterface = errors.New("no such interface")
)

// AssocTarget names a netdev in some network namespace.
type AssocTarget struct {
	// NetNS is a namespace file: /run/netns/NAME (ip netns), or
	// /proc/PID/ns/net for a process's (a container's init).
	NetNS string
	// Ifname or Ifindex names the netdev in that namespace; Ifname wins.
	Ifname  string
	Ifindex uint32
}

// AssocDev is one netdev associated with a device.
type AssocDev struct {
	Ifindex uint32 // in its namespace
	// NSID is its namespace's id as pspd's namespace knows it; -1: pspd's
	// own namespace.
	NSID int32
	// NetNS and Ifname are what the association was made with, when pspd
	// made it; otherwise Ifname names a netdev of pspd's own namespace,
	// and both are empty for one elsewhere.
	NetNS  string
	Ifname string
}

// assocKey identifies an association as the kernel lists it.
type assocKey struct {
	dev     uint32
	nsid    int32
	ifindex uint32
}

// assocName is what pspd knows of an association it made.
type assocName struct{ netns, ifname string }

// target is an AssocTarget resolved: the namespace's id relative to
// pspd's (-1 for pspd's own) and the netdev's index there.
type target struct {
	AssocTarget
	nsid    int32
	ifindex uint32
}

// nsGetNSType is ioctl NS_GET_NSTYPE (linux/nsfs.h), which x/sys lacks.
const nsGetNSType = 0xb703

// openNetNS opens path and checks that it is a network namespace.
func openNetNS(path string) (int, error) {
	if path == "" {
		return -1, fmt.Errorf("psp: name the network namespace (a path such as /run/netns/NAME or /proc/PID/ns/net): %w", ErrNoNetNS)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("psp: network namespace %s: %w: %w", path, err, ErrNoNetNS)
	}
	var fs unix.Statfs_t
	if err := unix.Fstatfs(fd, &fs); err != nil || fs.Type != unix.NSFS_MAGIC {
		unix.Close(fd)
		return -1, fmt.Errorf("psp: %s is not a namespace file (ip netns add makes /run/netns/NAME; a process's is /proc/PID/ns/net): %w", path, ErrNoNetNS)
	}
	if t, err := unix.IoctlRetInt(fd, nsGetNSType); err != nil || t != unix.CLONE_NEWNET {
		unix.Close(fd)
		return -1, fmt.Errorf("psp: %s is a namespace, but not a network namespace: %w", path, ErrNoNetNS)
	}
	return fd, nil
}

// sameNS reports whether namespace files a and b are one namespace.
func sameNS(a, b int) (bool, error) {
	var sa, sb unix.Stat_t
	if err := unix.Fstat(a, &sa); err != nil {
		return false, err
	}
	if err := unix.Fstat(b, &sb); err != nil {
		return false, err
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino, nil
}

// resolve finds t's namespace and netdev. For a namespace other than
// pspd's it also finds, or has the kernel assign, the namespace's id in
// pspd's namespace, which is how dev-assoc names it.
func (m *Manager) resolve(t AssocTarget) (target, error) {
	if t.Ifname == "" && t.Ifindex == 0 {
		return target{}, fmt.Errorf("psp: name the interface in %s: %w", t.NetNS, ErrNoInterface)
	}
	fd, err := openNetNS(t.NetNS)
	if err != nil {
		return target{}, err
	}
	defer unix.Close(fd)
	th, err := vnl.NewHandleAt(netns.NsHandle(fd), unix.NETLINK_ROUTE)
	if err != nil {
		return target{}, fmt.Errorf("psp: route netlink in %s: %w", t.NetNS, err)
	}
	defer th.Close()
	var l vnl.Link
	if t.Ifname != "" {
		l, err = th.LinkByName(t.Ifname)
	} else {
		l, err = th.LinkByIndex(int(t.Ifindex))
	}
	if err != nil {
		which := t.Ifname
		if which == "" {
			which = fmt.Sprintf("with index %d", t.Ifindex)
		}
		return target{}, fmt.Errorf("psp: network namespace %s has no interface %s (%v): %w", t.NetNS, which, err, ErrNoInterface)
	}
	r := target{AssocTarget: t, nsid: -1, ifindex: uint32(l.Attrs().Index)}
	r.Ifname = l.Attrs().Name

	own, err := m.ownNS()
	if err != nil {
		return target{}, err
	}
	defer unix.Close(own)
	if same, err := sameNS(fd, own); err != nil {
		return target{}, fmt.Errorf("psp: compare namespaces: %w", err)
	} else if same {
		return r, nil
	}
	h, err := routeHandle(m.cfg.NetNS)
	if err != nil {
		return target{}, fmt.Errorf("psp: route netlink: %w", err)
	}
	defer h.Close()
	id, err := h.GetNetNsIdByFd(fd)
	if err == nil && id < 0 {
		// The namespace has no id here yet: have the kernel pick one
		// (RTM_NEWNSID with -1). Somebody else may assign one meanwhile;
		// either way the id is read back.
		if serr := h.SetNetNsIdByFd(fd, -1); serr != nil && !errors.Is(serr, unix.EEXIST) {
			return target{}, fmt.Errorf("psp: assign an id to network namespace %s: %w", t.NetNS, serr)
		}
		id, err = h.GetNetNsIdByFd(fd)
	}
	if err != nil || id < 0 {
		return target{}, fmt.Errorf("psp: the id of network namespace %s in pspd's: %d %v", t.NetNS, id, err)
	}
	r.nsid = int32(id)
	return r, nil
}

// ownNS opens pspd's own network namespace.
func (m *Manager) ownNS() (int, error) {
	path := "/proc/self/ns/net"
	if m.cfg.NetNS != 0 {
		path = fmt.Sprintf("/proc/self/fd/%d", m.cfg.NetNS)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("psp: pspd's network namespace: %w", err)
	}
	return fd, nil
}

// assocRequest resolves t and fetches device id, which this namespace
// must administer: the start of AssocDevice and DisassocDevice.
func (m *Manager) assocRequest(op string, id uint32, t AssocTarget) (genl.Device, target, error) {
	tg, err := m.resolve(t)
	if err != nil {
		return genl.Device{}, target{}, err
	}
	d, err := m.adminDevice(op, id)
	return d, tg, err
}

// adminDevice is device id if this namespace administers it.
func (m *Manager) adminDevice(op string, id uint32) (genl.Device, error) {
	d, err := m.c.DevGet(id)
	if errors.Is(err, genl.ErrNoDevice) {
		return genl.Device{}, fmt.Errorf("psp: no device %d (see pspctl dev list): %w", id, ErrNoDevice)
	}
	if err != nil {
		return genl.Device{}, fmt.Errorf("psp: %w", err)
	}
	if !admin(d) {
		return genl.Device{}, fmt.Errorf("psp: device %d belongs to another network namespace (used here by association); %s it from there", id, op)
	}
	return d, nil
}

// selfNSID is the id pspd's namespace has in itself, -1 if none. The
// kernel lists a device's associations with netdevs of its own
// namespace under that id, and gives the namespace one (peernet2id_alloc)
// when it first lists one.
func (m *Manager) selfNSID() int32 {
	h, err := routeHandle(m.cfg.NetNS)
	if err != nil {
		return -1
	}
	defer h.Close()
	own, err := m.ownNS()
	if err != nil {
		return -1
	}
	defer unix.Close(own)
	id, err := h.GetNetNsIdByFd(own)
	if err != nil {
		return -1
	}
	return int32(id)
}

// findAssoc is the entry of d's association list that is t.
func (m *Manager) findAssoc(d genl.Device, t target) (genl.AssocDev, bool) {
	self := int32(-1)
	if t.nsid == -1 {
		self = m.selfNSID()
	}
	i := slices.IndexFunc(d.AssocList, func(a genl.AssocDev) bool {
		return a.Ifindex == t.ifindex && (a.NSID == t.nsid || t.nsid == -1 && a.NSID == self)
	})
	if i < 0 {
		return genl.AssocDev{}, false
	}
	return d.AssocList[i], true
}

// AssocDevice lets the netdev t use PSP device id (dev-assoc): sockets in
// t's namespace routed through it can then be upgraded, by a pspd there
// or by this one. It answers the device with its associations. Asking
// for an association that exists is not an error.
func (m *Manager) AssocDevice(id uint32, t AssocTarget) (Device, error) {
	d, tg, err := m.assocRequest("associate", id, t)
	if err != nil {
		return Device{}, err
	}
	if _, ok := m.findAssoc(d, tg); !ok {
		if err := m.c.DevAssoc(id, tg.ifindex, tg.nsid); err != nil {
			switch {
			case errors.Is(err, genl.ErrAssociated):
				return Device{}, fmt.Errorf("psp: %s in %s is associated with another PSP device already; disassociate it from that one first: %w", tg.Ifname, tg.NetNS, err)
			case errors.Is(err, genl.ErrNoDevAssoc):
				return Device{}, fmt.Errorf("psp: this kernel (%s) cannot give other namespaces a PSP device: %w", kernelRelease(), err)
			}
			return Device{}, fmt.Errorf("psp: associate %s in %s with device %d: %w", tg.Ifname, tg.NetNS, id, err)
		}
		m.log.Info("psp: device associated with a netdev of another namespace", "dev", id, "netns", tg.NetNS, "ifname", tg.Ifname, "ifindex", tg.ifindex, "nsid", tg.nsid)
	}
	if d, err = m.c.DevGet(id); err != nil {
		return Device{}, fmt.Errorf("psp: %w", err)
	}
	if a, ok := m.findAssoc(d, tg); ok {
		m.mu.Lock()
		m.assocNames[assocKey{id, a.NSID, a.Ifindex}] = assocName{tg.NetNS, tg.Ifname}
		m.mu.Unlock()
	}
	return m.describe(d), nil
}

// DisassocDevice undoes AssocDevice (dev-disassoc). Upgraded connections
// through the netdev keep their keys; new ones can no longer be made.
func (m *Manager) DisassocDevice(id uint32, t AssocTarget) (Device, error) {
	d, tg, err := m.assocRequest("disassociate", id, t)
	if err != nil {
		return Device{}, err
	}
	a, ok := m.findAssoc(d, tg)
	if !ok {
		return Device{}, fmt.Errorf("psp: %s in %s is not associated with device %d (see pspctl dev list): %w", tg.Ifname, tg.NetNS, id, ErrNoInterface)
	}
	if err := m.c.DevDisassoc(id, tg.ifindex, tg.nsid); err != nil {
		if errors.Is(err, genl.ErrNoDevAssoc) {
			return Device{}, fmt.Errorf("psp: this kernel (%s): %w", kernelRelease(), err)
		}
		return Device{}, fmt.Errorf("psp: disassociate %s in %s from device %d: %w", tg.Ifname, tg.NetNS, id, err)
	}
	m.log.Info("psp: device disassociated from a netdev of another namespace", "dev", id, "netns", tg.NetNS, "ifname", tg.Ifname)
	m.mu.Lock()
	delete(m.assocNames, assocKey{id, a.NSID, a.Ifindex})
	m.mu.Unlock()
	if d, err = m.c.DevGet(id); err != nil {
		return Device{}, fmt.Errorf("psp: %w", err)
	}
	return m.describe(d), nil
}

// assocs is d's association list with the names pspd knows, and forgets
// the names of associations the kernel dropped (their netdev went away).
// A netdev of pspd's own namespace is named as it is there now.
func (m *Manager) assocs(d genl.Device) []AssocDev {
	out := m.knownAssocs(d)
	self := int32(-1)
	for i, a := range out {
		if a.Ifname != "" {
			continue
		}
		if a.NSID != -1 && self == -1 && !d.ByAssociation {
			self = m.selfNSID()
		}
		if a.NSID == -1 || !d.ByAssociation && a.NSID == self {
			if name, err := netInterface(int(a.Ifindex), m.cfg.NetNS); err == nil {
				out[i].Ifname = name
			}
		}
	}
	return out
}

// knownAssocs is d's association list with the names of the associations
// pspd made.
func (m *Manager) knownAssocs(d genl.Device) []AssocDev {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []AssocDev
	seen := map[assocKey]bool{}
	for _, a := range d.AssocList {
		k := assocKey{d.ID, a.NSID, a.Ifindex}
		seen[k] = true
		n := m.assocNames[k]
		out = append(out, AssocDev{Ifindex: a.Ifindex, NSID: a.NSID, NetNS: n.netns, Ifname: n.ifname})
	}
	if !d.ByAssociation {
		for k := range m.assocNames {
			if k.dev == d.ID && !seen[k] {
				delete(m.assocNames, k)
			}
		}
	}
	return out
}

// kernelRelease is uname -r, for errors that depend on the kernel.
func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown release"
	}
	return "Linux " + unix.ByteSliceToString(u.Release[:])
}
