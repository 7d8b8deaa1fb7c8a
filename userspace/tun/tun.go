// Package tun owns the inner interface of the userspace data plane: a Linux
// TUN device opened on golang.org/x/sys, in the network namespace of the
// calling thread, that reads and writes one IP packet per buffer. Where the
// kernel allows it the device takes TCP bursts of up to 64 KB from the
// kernel in one read (TSO through IFF_VNET_HDR) and cuts them into packets
// itself, which saves most of the read system calls of a TCP stream.
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

	// Offload state: the kernel prefixes every packet with a
	// virtio_net_hdr, and TCP bursts arrive whole.
	super  []byte
	seg    segmenter
	wiov   [][]byte
	gro    []byte
	writeF func(fd uintptr) bool
	wn     int
	werr   error
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
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun %s: TUNSETIFF: %w", name, err)
	}
	// Without TUNSETOFFLOAD the kernel still prefixes the header but
	// segments and checksums everything itself.
	unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, tunFCsum|tunFTSO4|tunFTSO6)
	// A non-blocking fd makes os.NewFile register it with the runtime
	// poller, so Close wakes a blocked Read.
	d := &Device{name: name, f: os.NewFile(uintptr(fd), "tun:"+name), super: make([]byte, maxSuper), gro: make([]byte, maxSuper), wiov: make([][]byte, 2)}
	d.writeF = d.writeOne
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

// Read reads one packet into b, which should hold at least the MTU.
func (d *Device) Read(b []byte) (int, error) {
	var n [1]int
	if _, err := d.ReadBatch([][]byte{b}, n[:]); err != nil {
		return 0, err
	}
	return n[0], nil
}

// Write writes one IP packet. Write and WriteBatch must not be called
// concurrently with each other.
func (d *Device) Write(b []byte) (int, error) {
	d.wiov = append(d.wiov[:0], noOffload[:], b)
	n, err := d.write()
	if err != nil {
		return 0, err
	}
	return n - vnetHdrLen, nil
}

// WriteBatch writes IP packets, giving the kernel runs of consecutive
// segments of one TCP flow as one GSO packet. It returns how many packets
// were written; on an error, packet n is the one that failed (with the
// rest of its run).
func (d *Device) WriteBatch(pkts [][]byte) (int, error) {
	for i := 0; i < len(pkts); {
		k := run(pkts[i:])
		if k == 1 {
			d.wiov = append(d.wiov[:0], noOffload[:], pkts[i])
		} else {
			d.wiov = append(d.wiov[:0], d.gro[:merge(d.gro, pkts[i:i+k])])
		}
		if _, err := d.write(); err != nil {
			return i, err
		}
		i += k
	}
	return len(pkts), nil
}

func (d *Device) write() (int, error) {
	d.wn, d.werr = 0, nil
	err := d.rc.Write(d.writeF)
	clear(d.wiov)
	if err == nil {
		err = d.werr
	}
	if err != nil {
		if d.closed.Load() {
			err = os.ErrClosed
		}
		return 0, fmt.Errorf("tun %s: write: %w", d.name, err)
	}
	return d.wn, nil
}

// noOffload is the virtio_net_hdr of a packet pspd writes: complete, with
// nothing for the kernel to do.
var noOffload [vnetHdrLen]byte

// writeOne is the RawConn callback of Write: false asks the poller to wait.
func (d *Device) writeOne(fd uintptr) bool {
	for {
		n, err := unix.Writev(int(fd), d.wiov)
		switch {
		case errors.Is(err, unix.EAGAIN):
			return false
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			d.werr = err
		default:
			d.wn = n
		}
		return true
	}
}

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
		if !d.seg.done() {
			n, err := d.seg.nextPacket(d.rbufs[d.rn])
			if err != nil {
				continue // the rest of a packet the kernel sent malformed is lost
			}
			d.rlens[d.rn] = n
			d.rn++
			continue
		}
		n, err := unix.Read(int(fd), d.super)
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
		if d.seg.reset(d.super[:n]) != nil {
			d.seg.pkt = nil // not a packet pspd can carry: dropped
		}
	}
	return true
}

// Close closes the device; a device Open created disappears with its last fd.
func (d *Device) Close() error {
	d.closed.Store(true)
	return d.f.Close()
}
