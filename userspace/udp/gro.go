package udp

import (
	"fmt"
	"net"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/userspace"
)

// groBufSize holds the largest coalesced read: the kernel stops merging at
// 64 KiB of UDP payload.
const groBufSize = 1 << 16

// enableGRO turns UDP_GRO on and reports whether the kernel took it.
// Kernels before 5.0 (and some sandboxes) refuse with ENOPROTOOPT; the
// socket then reads datagram by datagram, as before.
func (u *Conn) enableGRO() bool {
	var err error
	if cerr := u.rc.Control(func(fd uintptr) {
		err = unix.SetsockoptInt(int(fd), unix.SOL_UDP, unix.UDP_GRO, 1)
	}); cerr != nil {
		return false
	}
	return err == nil
}

// groReader reads coalesced datagrams into buffers of its own and hands
// them out one datagram per message. A coalesced read is a run of
// datagrams of one flow (one source) back to back, all of the size the
// UDP_GRO control message gives except the last, which may be shorter. A
// read may hold more datagrams than the caller has messages; the rest wait
// for the next ReadBatch, which returns them without a system call.
//
// The caller's buffers cannot take the kernel's read directly: one read
// fills one buffer with up to 64 datagrams that the Underlay contract
// wants in separate messages, so each datagram costs one copy, far less
// than the trip through the stack that coalescing saves. The buffers cost
// 64 KiB per message of the batch.
type groReader struct {
	u     *Conn
	b     batch
	bufs  [][]byte
	ctrl  [][]byte
	lens  []int // bytes in bufs[i]
	segs  []int // datagram size in bufs[i]; 0: one datagram
	addrs []netip.AddrPort
	// Pending datagrams: reads next..count-1 of the last recvmmsg, the
	// first of them from byte off.
	next, count, off int
	// Counters, read by tests and benchmarks: reads that held more than
	// one datagram, and the datagrams they held.
	coalesced, coalescedDatagrams uint64
}

func newGROReader(size int, u *Conn) *groReader {
	g := &groReader{
		u: u, bufs: make([][]byte, size), ctrl: make([][]byte, size),
		lens: make([]int, size), segs: make([]int, size), addrs: make([]netip.AddrPort, size),
	}
	g.b.init(size)
	g.b.call = func(fd uintptr) bool { return u.mmsg(fd, unix.SYS_RECVMMSG, &g.b) }
	for i := range size {
		g.bufs[i] = make([]byte, groBufSize)
		g.ctrl[i] = make([]byte, unix.CmsgSpace(4))
		g.b.iovs[i].Base = &g.bufs[i][0]
		g.b.iovs[i].SetLen(groBufSize)
		g.b.hdrs[i].Hdr.Control = &g.ctrl[i][0]
	}
	return g
}

func (g *groReader) read(msgs []userspace.Message) (int, error) {
	if g.u.closed.Load() {
		return 0, fmt.Errorf("udp: read: %w", net.ErrClosed)
	}
	if len(msgs) == 0 {
		return 0, nil // do not take datagrams off the socket for nobody
	}
	for i := range msgs {
		if len(msgs[i].Buf) == 0 {
			return 0, fmt.Errorf("udp: read: message %d has no buffer", i)
		}
	}
	if g.next == g.count {
		if err := g.recv(); err != nil {
			return 0, err
		}
	}
	n := 0
	for n < len(msgs) && g.next < g.count {
		i := g.next
		size := g.segs[i]
		if size <= 0 || size > g.lens[i]-g.off {
			size = g.lens[i] - g.off
		}
		m := &msgs[n]
		// A buffer too small truncates, as a plain read would; the codec
		// then drops the datagram as unauthentic.
		m.Off, m.N, m.Addr = 0, copy(m.Buf, g.bufs[i][g.off:g.off+size]), g.addrs[i]
		n++
		if g.off += size; g.off >= g.lens[i] {
			g.next, g.off = g.next+1, 0
		}
	}
	return n, nil
}

// recv blocks until at least one read arrives and records the reads.
func (g *groReader) recv() error {
	b := &g.b
	b.n = len(b.hdrs)
	for i := range b.n {
		b.hdrs[i].Hdr.Namelen = unix.SizeofSockaddrInet6
		b.hdrs[i].Hdr.Flags = 0
		b.hdrs[i].Hdr.SetControllen(len(g.ctrl[i]))
	}
	g.next, g.count, g.off = 0, 0, 0
	if err := g.u.do(b, g.u.rc.Read); err != nil {
		return fmt.Errorf("udp: recvmmsg: %w", err)
	}
	for i := range b.done {
		h := &b.hdrs[i]
		g.lens[i] = min(int(h.Len), groBufSize)
		g.segs[i] = groSize(g.ctrl[i][:h.Hdr.Controllen])
		g.addrs[i] = fromSockaddr(&b.names[i])
		if s := g.segs[i]; s > 0 && g.lens[i] > s {
			g.coalesced++
			g.coalescedDatagrams += uint64((g.lens[i] + s - 1) / s)
		}
	}
	g.count = b.done
	return nil
}

// groSize returns the datagram size a UDP_GRO control message in c gives,
// or 0 if c has none (the read is one datagram).
func groSize(c []byte) int {
	for len(c) >= unix.SizeofCmsghdr {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&c[0]))
		l := int(h.Len)
		if l < unix.CmsgLen(0) || l > len(c) {
			return 0
		}
		if h.Level == unix.SOL_UDP && h.Type == unix.UDP_GRO && l >= unix.CmsgLen(4) {
			return int(*(*int32)(unsafe.Pointer(&c[unix.CmsgLen(0)])))
		}
		c = c[min(unix.CmsgSpace(l-unix.CmsgLen(0)), len(c)):]
	}
	return 0
}
