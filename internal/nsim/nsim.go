// Package nsim creates netdevsim devices (the kernel's simulated NIC,
// CONFIG_NETDEVSIM) for tests: one port each, moved into a network
// namespace, and two ports linked back to back so that what one sends the
// other receives. netdevsim offers what no veth does, ESP crypto offload
// (esp-hw-offload) and PSP devices, so tests of those paths need it; the
// test VM's kernel has it, the development hosts' kernels do not.
package nsim

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const bus = "/sys/bus/netdevsim"

// ErrUnsupported means the running kernel has no netdevsim.
var ErrUnsupported = errors.New("kernel has no netdevsim (CONFIG_NETDEVSIM)")

// Port is the single port of a netdevsim device, in a network namespace.
type Port struct {
	ID      uint32 // netdevsim device id, unique on the machine
	Name    string // netdev name inside NS
	Ifindex int    // ifindex inside NS
	NS      string // path of the namespace holding the port, e.g. /run/netns/x
}

// New creates netdevsim device id with one port and moves the port into
// the namespace at path ns (a file such as /run/netns/NAME). Close
// deletes the device.
func New(id uint32, ns string) (*Port, error) {
	if _, err := os.Stat(filepath.Join(bus, "new_device")); err != nil {
		return nil, fmt.Errorf("nsim: %w", ErrUnsupported)
	}
	if err := os.WriteFile(filepath.Join(bus, "new_device"), fmt.Appendf(nil, "%d 1", id), 0); err != nil {
		return nil, fmt.Errorf("nsim: create netdevsim%d: %w", id, err)
	}
	p := &Port{ID: id, NS: ns}
	if err := p.moveTo(ns); err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

// moveTo finds the port the kernel created in this process's namespace
// (its sysfs entry appears asynchronously) and moves it into ns.
func (p *Port) moveTo(ns string) error {
	var name string
	for deadline := time.Now().Add(5 * time.Second); name == ""; {
		nets, _ := filepath.Glob(fmt.Sprintf("%s/devices/netdevsim%d/net/*", bus, p.ID))
		if len(nets) == 1 {
			name = filepath.Base(nets[0])
		} else if time.Now().After(deadline) {
			return fmt.Errorf("nsim: netdevsim%d has %d ports after 5s, want 1", p.ID, len(nets))
		} else {
			time.Sleep(10 * time.Millisecond)
		}
	}
	link, err := vnl.LinkByName(name)
	if err != nil {
		return fmt.Errorf("nsim: netdevsim%d port %s: %w", p.ID, name, err)
	}
	target, err := netns.GetFromPath(ns)
	if err != nil {
		return fmt.Errorf("nsim: open namespace %s: %w", ns, err)
	}
	defer target.Close()
	if err := vnl.LinkSetNsFd(link, int(target)); err != nil {
		return fmt.Errorf("nsim: move %s into %s: %w", name, ns, err)
	}
	h, err := vnl.NewHandleAt(target, unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("nsim: netlink in %s: %w", ns, err)
	}
	defer h.Close()
	moved, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("nsim: %s after the move into %s: %w", name, ns, err)
	}
	p.Name, p.Ifindex = name, moved.Attrs().Index
	return nil
}

// Close deletes the netdevsim device and with it the port.
func (p *Port) Close() error {
	if err := os.WriteFile(filepath.Join(bus, "del_device"), fmt.Append(nil, p.ID), 0); err != nil {
		return fmt.Errorf("nsim: delete netdevsim%d: %w", p.ID, err)
	}
	return nil
}

// Link joins two ports back to back: a frame a transmits arrives at b and
// the other way round, like a cable.
func Link(a, b *Port) error {
	fa, err := os.Open(a.NS)
	if err != nil {
		return fmt.Errorf("nsim: link: %w", err)
	}
	defer fa.Close()
	fb, err := os.Open(b.NS)
	if err != nil {
		return fmt.Errorf("nsim: link: %w", err)
	}
	defer fb.Close()
	// The kernel resolves the fds in the writer's fd table.
	spec := fmt.Sprintf("%d:%d %d:%d", fa.Fd(), a.Ifindex, fb.Fd(), b.Ifindex)
	if err := os.WriteFile(filepath.Join(bus, "link_device"), []byte(spec), 0); err != nil {
		return fmt.Errorf("nsim: link netdevsim%d and netdevsim%d (%s): %w", a.ID, b.ID, spec, err)
	}
	return nil
}

// ESP reports how many ESP SAs are offloaded to the port and how many
// packets it has transmitted through them, from its debugfs listing
// (debugfs mounted at /sys/kernel/debug). The listing also holds the SAs'
// keys; they are never returned.
func (p *Port) ESP() (sas, tx int, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/sys/kernel/debug/netdevsim/netdevsim%d/ports/0/ipsec", p.ID))
	if err != nil {
		return 0, 0, fmt.Errorf("nsim: %w", err)
	}
	defer clear(b)
	first, _, _ := bytes.Cut(b, []byte("\n"))
	if _, err := fmt.Sscanf(string(first), "SA count=%d tx=%d", &sas, &tx); err != nil {
		return 0, 0, fmt.Errorf("nsim: netdevsim%d ipsec listing starts %q: %w", p.ID, first, err)
	}
	return sas, tx, nil
}
