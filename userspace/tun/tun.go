// Package tun owns the inner interface of the userspace data plane: a Linux
// TUN device (IFF_TUN|IFF_NO_PI, one IP packet per read or write) opened on
// golang.org/x/sys, in the network namespace of the calling thread.
package tun

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Device is an open TUN device. Read and ReadBatch may run concurrently with
// Write; Close unblocks them.
type Device struct {
	name   string
	f      *os.File
	rc     syscall.RawConn
	closed atomic.Bool

	// ReadBatch state, preallocated so a batch read does not allocate.
	rbufs [][]byte
	rlens []int
	rn    int
	rerr  error
	readF func(fd uintptr) bool
}

// Open creates (or attaches to) the TUN device name in the calling thread's
// network namespace, sets its MTU and brings it up. The caller that wants a
// specific namespace locks its OS thread and enters it first; the device
// stays in that namespace afterwards.
func Open(name string, mtu int) (*Device, error) {
	if len(name) == 0 || len(name) >= unix.IFNAMSIZ {
		return nil, fmt.Errorf("tun: name %q: want 1..%d bytes", name, unix.IFNAMSIZ-1)
	}
	if mtu < 576 || mtu > 65535 {
		return nil, fmt.Errorf("tun %s: mtu %d: want 576..65535", name, mtu)
	}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("tun %s: open /dev/net/tun: %w", name, err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun %s: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun %s: TUNSETIFF: %w", name, err)
	}
	// A non-blocking fd makes os.NewFile register it with the runtime
	// poller, so Close wakes a blocked Read.
	d := &Device{name: name, f: os.NewFile(uintptr(fd), "tun:"+name)}
	if d.rc, err = d.f.SyscallConn(); err != nil {
		d.f.Close()
		return nil, fmt.Errorf("tun %s: %w", name, err)
	}
	d.readF = d.readSome
	if err := setUp(name, mtu); err != nil {
		d.f.Close()
		return nil, fmt.Errorf("tun %s: %w", name, err)
	}
	return d, nil
}

func setUp(name string, mtu int) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find link: %w", err)
	}
	if err := netlink.LinkSetMTU(l, mtu); err != nil {
		return fmt.Errorf("set mtu %d: %w", mtu, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("set up: %w", err)
	}
	return nil
}

// Name is the interface name.
func (d *Device) Name() string { return d.name }

// Read reads one packet into b. A packet longer than b is truncated by the
// kernel, so b should hold at least the MTU.
func (d *Device) Read(b []byte) (int, error) { return d.f.Read(b) }

// Write writes one IP packet.
func (d *Device) Write(b []byte) (int, error) { return d.f.Write(b) }

// ReadBatch blocks until at least one packet is readable, then reads up to
// len(bufs) packets without blocking again: packet i is bufs[i][:lens[i]].
// It returns the number of packets read.
func (d *Device) ReadBatch(bufs [][]byte, lens []int) (int, error) {
	d.rbufs, d.rlens, d.rn, d.rerr = bufs, lens[:len(bufs)], 0, nil
	err := d.rc.Read(d.readF)
	d.rbufs, d.rlens = nil, nil
	if d.rn > 0 {
		return d.rn, nil
	}
	if err != nil {
		if d.closed.Load() {
			// RawConn reports the poller's unexported closing error.
			err = os.ErrClosed
		}
		return 0, fmt.Errorf("tun %s: read: %w", d.name, err)
	}
	return 0, fmt.Errorf("tun %s: read: %w", d.name, d.rerr)
}

// readSome is the RawConn callback: false asks the poller to wait.
func (d *Device) readSome(fd uintptr) bool {
	for d.rn < len(d.rbufs) {
		n, err := unix.Read(int(fd), d.rbufs[d.rn])
		if err != nil {
			if errors.Is(err, unix.EAGAIN) {
				return d.rn > 0
			}
			if errors.Is(err, unix.EINTR) {
				continue
			}
			d.rerr = err
			return true
		}
		d.rlens[d.rn] = n
		d.rn++
	}
	return true
}

// Close closes the device; a device Open created disappears with its last fd.
func (d *Device) Close() error {
	d.closed.Store(true)
	return d.f.Close()
}
