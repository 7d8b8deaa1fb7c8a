// Package udp owns the UDP-socket underlay of the userspace data plane: one
// socket moving batches of payloads with recvmmsg/sendmmsg, for hosts where
// AF_XDP is not available. Conn implements userspace.Underlay.
//
// Both directions use the kernel's UDP offloads where it has them: runs of
// equal datagrams to one peer go out as one segmented send (UDP GSO), and
// runs of datagrams of one flow come in as one coalesced read (UDP GRO)
// that ReadBatch splits again, so the stack is traversed once per run
// rather than once per datagram.
package udp

import (
	"errors"
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
	// noGSO is set once the kernel refused a segmented send; later sends
	// go one datagram per message.
	noGSO atomic.Bool
	// ctrl holds one UDP_SEGMENT control message per tx header; groups
	// maps tx header i to the number of messages it carries.
	ctrl   [][]byte
	groups []int
	// gro is the coalesced-read state; nil when UDP_GRO is off.
	gro *groReader
}

// maxSegments is how many datagrams one segmented send carries
// (UDP_MAX_SEGMENTS on older kernels).
const maxSegments = 64

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

// ListenConfig holds the settings of a socket Listen opens.
type ListenConfig struct {
	// Batch is how many payloads one syscall moves, 1..1024.
	Batch int
	// NoGRO leaves UDP_GRO off: every datagram is read on its own. By
	// default the socket asks the kernel to coalesce datagrams (UDP_GRO),
	// which costs 64 KiB of receive buffer per message of the batch, and
	// falls back to reading them one by one if the kernel refuses.
	NoGRO bool
}

// Listen opens a UDP socket on laddr (an unspecified address listens on
// all) that moves up to size payloads per syscall, with UDP GRO if the
// kernel has it.
func Listen(laddr netip.AddrPort, size int) (*Conn, error) {
	return ListenConfig{Batch: size}.Listen(laddr)
}

// Listen opens a UDP socket on laddr with lc's settings.
func (lc ListenConfig) Listen(laddr netip.AddrPort) (*Conn, error) {
	size := lc.Batch
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
	u.ctrl, u.groups = make([][]byte, size), make([]int, size)
	for i := range u.ctrl {
		u.ctrl[i] = make([]byte, unix.CmsgSpace(2))
	}
	u.rx.call = u.recv
	u.tx.call = u.send
	if !lc.NoGRO && u.enableGRO() {
		u.gro = newGROReader(size, u)
	}
	return u, nil
}

// GRO reports whether the kernel coalesces this socket's received
// datagrams (UDP_GRO is on).
func (u *Conn) GRO() bool { return u.gro != nil }

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
// (payload at Off 0), one datagram per message, however the kernel
// coalesced them.
func (u *Conn) ReadBatch(msgs []userspace.Message) (int, error) {
	if u.gro != nil {
		return u.gro.read(msgs)
	}
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

// WriteBatch implements userspace.Underlay. Runs of datagrams to one
// address of one size (the last may be shorter), which is what a TCP burst
// becomes, go to the kernel as one segmented send (UDP GSO): one trip
// through the UDP and IP stack instead of one per datagram. On an error it
// returns how many messages went out before the one that failed.
func (u *Conn) WriteBatch(msgs []userspace.Message) (int, error) {
	sent := 0
	for sent < len(msgs) {
		b := &u.tx
		b.n = 0
		next := sent
		for next < len(msgs) && b.n < len(b.hdrs) {
			k, err := u.group(msgs, next, len(b.iovs)-(next-sent))
			if k == 0 && err == nil {
				break // no iovec left in this round
			}
			if err != nil {
				if b.n == 0 {
					return next, err
				}
				break // send what is ready; the next call reports it
			}
			h := &b.hdrs[b.n]
			h.Hdr.Iov = &b.iovs[next-sent]
			h.Hdr.SetIovlen(k)
			for i := range k {
				m := &msgs[next+i]
				b.iovs[next-sent+i].Base = &m.Buf[m.Off]
				b.iovs[next-sent+i].SetLen(m.N)
			}
			nl, _ := u.toSockaddr(&b.names[b.n], msgs[next].Addr)
			h.Hdr.Namelen = nl
			h.Hdr.Control, h.Hdr.Controllen = nil, 0
			if k > 1 {
				c := u.ctrl[b.n]
				cm := (*unix.Cmsghdr)(unsafe.Pointer(&c[0]))
				cm.Level, cm.Type = unix.SOL_UDP, unix.UDP_SEGMENT
				cm.SetLen(unix.CmsgLen(2))
				*(*uint16)(unsafe.Pointer(&c[unix.CmsgLen(0)])) = uint16(msgs[next].N)
				h.Hdr.Control = &c[0]
				h.Hdr.SetControllen(len(c))
			}
			u.groups[b.n] = k
			b.n++
			next += k
		}
		err := u.do(b, u.rc.Write)
		for _, k := range u.groups[:b.done] {
			sent += k
		}
		if err != nil {
			if u.groups[b.done] > 1 && !u.noGSO.Load() && gsoRefused(err) {
				// A kernel or device without UDP GSO: say so once, go on
				// without it.
				u.noGSO.Store(true)
				continue
			}
			return sent, fmt.Errorf("udp: sendmmsg to %v: %w", msgs[sent].Addr, err)
		}
	}
	return sent, nil
}

// gsoRefused tells a kernel or device that cannot segment UDP from other
// send errors.
func gsoRefused(err error) bool {
	return errors.Is(err, unix.EIO) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOPROTOOPT) || errors.Is(err, unix.EOPNOTSUPP)
}

// group returns how many messages from msgs[i] go out in one send: one
// without GSO, else the run of one address and one size (the last may be
// shorter). It checks the messages it takes.
func (u *Conn) group(msgs []userspace.Message, i, room int) (int, error) {
	if room <= 0 {
		return 0, nil
	}
	m := &msgs[i]
	if m.N == 0 {
		return 0, fmt.Errorf("udp: write: message %d is empty", i)
	}
	var sa unix.RawSockaddrInet6
	if _, ok := u.toSockaddr(&sa, m.Addr); !ok {
		return 0, fmt.Errorf("udp: write to %v: address family does not match the socket", m.Addr)
	}
	if u.noGSO.Load() {
		return 1, nil
	}
	k, total := 1, m.N
	for i+k < len(msgs) && k < min(maxSegments, room) {
		q := &msgs[i+k]
		if q.Addr != m.Addr || q.N == 0 || q.N > m.N || total+q.N > 65000 {
			break
		}
		total += q.N
		k++
		if q.N < m.N {
			break // a shorter datagram ends a segmented send
		}
	}
	return k, nil
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
