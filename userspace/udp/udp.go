// Package udp owns the UDP-socket underlay of the userspace data plane: one
// socket moving batches of payloads with recvmmsg/sendmmsg, for hosts where
// AF_XDP is not available. Conn implements userspace.Underlay.
package udp

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"syscall"
	"unsafe"

	"github.com/pspd/pspd/userspace"
	"golang.org/x/sys/unix"
)

// SocketBuffer is the receive and send buffer size asked for, so a burst from
// the peer's batch does not overflow while the receive loop is busy.
const SocketBuffer = 8 << 20

// Conn is a batched UDP socket. ReadBatch and WriteBatch may run
// concurrently with each other, each from one goroutine.
type Conn struct {
	c      *net.UDPConn
	rc     syscall.RawConn
	v6     bool // AF_INET6 socket: IPv4 peers are v4-mapped
	closed atomic.Bool
	rx, tx batch
}

// batch is the preallocated mmsghdr vector of one direction.
type batch struct {
	hdrs  []unix.Mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6 // large enough for either family
	n     int                     // entries passed to the syscall
	done  int                     // result
	errno unix.Errno
	call  func(fd uintptr) bool
}

// Listen opens a UDP socket on laddr (an unspecified address listens on
// all) that moves up to size payloads per syscall.
func Listen(laddr netip.AddrPort, size int) (*Conn, error) {
	if size < 1 || size > 1024 {
		return nil, fmt.Errorf("udp: batch size %d: want 1..1024", size)
	}
	network := "udp"
	if laddr.Addr().Is4() {
		network = "udp4"
	}
	c, err := net.ListenUDP(network, net.UDPAddrFromAddrPort(laddr))
	if err != nil {
		return nil, fmt.Errorf("udp: listen %v: %w", laddr, err)
	}
	u := &Conn{c: c, v6: !laddr.Addr().Is4()}
	if u.rc, err = c.SyscallConn(); err != nil {
		c.Close()
		return nil, fmt.Errorf("udp: %w", err)
	}
	u.bigBuffers()
	u.rx.init(size)
	u.tx.init(size)
	u.rx.call = u.recv
	u.tx.call = u.send
	return u, nil
}

// bigBuffers asks for SocketBuffer, past net.core.[rw]mem_max when the
// process has CAP_NET_ADMIN. Failure only costs drops under bursts.
func (u *Conn) bigBuffers() {
	u.rc.Control(func(fd uintptr) {
		for _, o := range [][2]int{{unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}, {unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}} {
			if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, o[0], SocketBuffer) != nil {
				unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, o[1], SocketBuffer)
			}
		}
	})
}

func (b *batch) init(size int) {
	b.hdrs = make([]unix.Mmsghdr, size)
	b.iovs = make([]unix.Iovec, size)
	b.names = make([]unix.RawSockaddrInet6, size)
	for i := range b.hdrs {
		b.hdrs[i].Hdr.Iov = &b.iovs[i]
		b.hdrs[i].Hdr.SetIovlen(1)
		b.hdrs[i].Hdr.Name = (*byte)(unsafe.Pointer(&b.names[i]))
	}
}

// LocalAddr is the socket's bound address.
func (u *Conn) LocalAddr() netip.AddrPort { return u.c.LocalAddr().(*net.UDPAddr).AddrPort() }

// ReadBatch implements userspace.Underlay: it receives into msgs[i].Buf
// (payload at Off 0).
func (u *Conn) ReadBatch(msgs []userspace.Message) (int, error) {
	b := &u.rx
	b.n = min(len(msgs), len(b.hdrs))
	for i := range b.n {
		buf := msgs[i].Buf
		if len(buf) == 0 {
			return 0, fmt.Errorf("udp: read: message %d has no buffer", i)
		}
		b.iovs[i].Base = &buf[0]
		b.iovs[i].SetLen(len(buf))
		b.hdrs[i].Hdr.Namelen = unix.SizeofSockaddrInet6
		b.hdrs[i].Hdr.Flags = 0
	}
	if err := u.do(b, u.rc.Read); err != nil {
		return 0, fmt.Errorf("udp: recvmmsg: %w", err)
	}
	for i := range b.done {
		m := &msgs[i]
		m.Off, m.N = 0, int(b.hdrs[i].Len)
		m.Addr = fromSockaddr(&b.names[i])
	}
	return b.done, nil
}

// WriteBatch implements userspace.Underlay. On an error it returns how many
// messages went out before the one that failed.
func (u *Conn) WriteBatch(msgs []userspace.Message) (int, error) {
	sent := 0
	for sent < len(msgs) {
		b := &u.tx
		b.n = min(len(msgs)-sent, len(b.hdrs))
		for i := range b.n {
			m := &msgs[sent+i]
			if m.N == 0 {
				return sent + i, fmt.Errorf("udp: write: message %d is empty", sent+i)
			}
			b.iovs[i].Base = &m.Buf[m.Off]
			b.iovs[i].SetLen(m.N)
			nl, ok := u.toSockaddr(&b.names[i], m.Addr)
			if !ok {
				return sent + i, fmt.Errorf("udp: write to %v: address family does not match the socket", m.Addr)
			}
			b.hdrs[i].Hdr.Namelen = nl
		}
		if err := u.do(b, u.rc.Write); err != nil {
			return sent, fmt.Errorf("udp: sendmmsg to %v: %w", msgs[sent].Addr, err)
		}
		sent += b.done
	}
	return sent, nil
}

func (u *Conn) do(b *batch, io func(func(uintptr) bool) error) error {
	b.done, b.errno = 0, 0
	if err := io(b.call); err != nil {
		if u.closed.Load() {
			return net.ErrClosed
		}
		return err
	}
	if b.errno != 0 {
		return os.NewSyscallError("", b.errno)
	}
	return nil
}

func (u *Conn) recv(fd uintptr) bool { return u.mmsg(fd, unix.SYS_RECVMMSG, &u.rx) }
func (u *Conn) send(fd uintptr) bool { return u.mmsg(fd, unix.SYS_SENDMMSG, &u.tx) }

// mmsg is the RawConn callback; false asks the poller to wait.
func (u *Conn) mmsg(fd uintptr, trap uintptr, b *batch) bool {
	for {
		r, _, e := unix.Syscall6(trap, fd, uintptr(unsafe.Pointer(&b.hdrs[0])), uintptr(b.n), unix.MSG_DONTWAIT, 0, 0)
		switch e {
		case 0:
			b.done = int(r)
			return true
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		default:
			b.errno = e
			return true
		}
	}
}

func fromSockaddr(sa *unix.RawSockaddrInet6) netip.AddrPort {
	port := uint16(sa.Port>>8 | sa.Port<<8) // network byte order
	if sa.Family == unix.AF_INET {
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), port)
	}
	return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), port)
}

func (u *Conn) toSockaddr(sa *unix.RawSockaddrInet6, ap netip.AddrPort) (uint32, bool) {
	port := ap.Port()
	nport := port>>8 | port<<8
	if !u.v6 {
		if !ap.Addr().Is4() {
			return 0, false
		}
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		*sa4 = unix.RawSockaddrInet4{Family: unix.AF_INET, Port: nport, Addr: ap.Addr().As4()}
		return unix.SizeofSockaddrInet4, true
	}
	*sa = unix.RawSockaddrInet6{Family: unix.AF_INET6, Port: nport, Addr: ap.Addr().As16()}
	return unix.SizeofSockaddrInet6, true
}

// Close closes the socket and wakes blocked calls with net.ErrClosed.
func (u *Conn) Close() error {
	u.closed.Store(true)
	return u.c.Close()
}

var _ userspace.Underlay = (*Conn)(nil)
