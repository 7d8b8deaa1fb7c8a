// Package xsk owns AF_XDP sockets: the UMEM frame area, the fill, completion,
// RX and TX rings mapped from the kernel, and the index protocol on them.
//
// The rings are single-producer/single-consumer queues shared with the
// kernel. Like libbpf's xsk.h, the side that owns an index keeps a cached
// copy of the other side's index and refreshes it with a load-acquire only
// when the cache says the ring is empty (consumer) or full (producer), and
// publishes its own index with a store-release after it has written or read
// the descriptors. sync/atomic loads and stores are sequentially consistent,
// which is at least as strong on every architecture Go supports.
//
// System calls are made only when the kernel asks for them: the socket is
// bound with XDP_USE_NEED_WAKEUP, and Transmit kicks the kernel with sendto
// only while the TX ring's need_wakeup flag is set, Release polls only when
// the fill ring's flag is set. (In copy mode the kernel keeps the TX flag
// set, because there the sendto is what transmits; Open raises the frames
// one sendto may send, XDP_MAX_TX_SKB_BUDGET, from 32 to the ring size, so
// that a batch goes out with one call.)
//
// WaitRX waits in the Go runtime's poller, as a socket read does, not in a
// poll(2) of its own: a thread blocked in a system call is one the runtime
// has to wake and hand a P back to, and while it is blocked sysmon wakes
// every 20 µs to see whether it should take that P away.
//
// A Socket's receive side (Receive, Release, WaitRX) and transmit side
// (AllocTX, Transmit, FreeTX) each belong to one goroutine at a time; the two
// sides may run concurrently because they touch disjoint rings and frames.
package xsk

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Desc describes one frame in the UMEM: Addr is its byte offset, Len the
// packet length. It has the kernel's struct xdp_desc layout.
type Desc = unix.XDPDesc

// Config sizes a socket. Zero fields take the defaults.
type Config struct {
	// FrameSize is the UMEM chunk size, a power of two: 2048 (default) or
	// 4096. A frame holds one Ethernet frame, so the link MTU must fit.
	FrameSize int
	// NumFrames is the number of UMEM frames, split evenly between
	// receiving and transmitting. Default 4096.
	NumFrames int
	// RingSize is the number of entries of each ring, a power of two.
	// Default NumFrames/2.
	RingSize int
	// Bind chooses between zero-copy and copy mode; default BindAuto.
	Bind Bind
}

// Bind is how the socket shares its UMEM with the driver.
type Bind int

const (
	// BindAuto asks for zero-copy and lets the kernel fall back to copy
	// mode where the driver does not offer it (veth and most virtual
	// devices); Socket.ZeroCopy tells which it got.
	BindAuto Bind = iota
	// BindCopy forces copy mode: the kernel copies every frame.
	BindCopy
	// BindZeroCopy requires zero-copy; Open fails where the driver
	// cannot do it.
	BindZeroCopy
)

func (b Bind) String() string {
	switch b {
	case BindCopy:
		return "copy"
	case BindZeroCopy:
		return "zero-copy"
	}
	return "auto"
}

// Counters count a socket's system calls and batches, so tests and
// benchmarks can see how many frames one call moved.
type Counters struct {
	TXKicks     uint64 // sendto calls asking the kernel to transmit
	TXNoWakeup  uint64 // kicks left out because the kernel did not ask (need_wakeup clear)
	TXBatches   uint64 // Transmit calls that queued frames
	TXFrames    uint64 // frames queued by Transmit
	RXPolls     uint64 // waits for frames in the runtime poller (WaitRX on an empty ring)
	FillWakeups uint64 // poll calls because the fill ring asked for one
	RXBatches   uint64 // Receive calls that returned frames
	RXFrames    uint64 // frames returned by Receive
}

type counters struct {
	txKicks, txNoWakeup, txBatches, txFrames  atomic.Uint64
	rxPolls, fillWakeups, rxBatches, rxFrames atomic.Uint64
}

// kernel is the socket's system calls: the real ones, or a fake in the
// package's ring tests.
type kernel interface {
	sendto(fd int) unix.Errno
	// poll is poll(2) without waiting: what wakes a driver that asked for
	// it through the fill ring's need_wakeup flag.
	poll(fd int) error
	// wait blocks until ready reports true, the kernel having said the
	// socket is readable, or timeoutMS passes (-1: no timeout), or
	// Interrupt is called.
	wait(timeoutMS int, ready func() bool) error
	interrupt()
}

// sysKernel waits in the runtime's poller on the socket, which Open
// registers there as an *os.File.
type sysKernel struct {
	f  *os.File
	rc syscall.RawConn
}

func (*sysKernel) sendto(fd int) unix.Errno {
	_, _, e := unix.Syscall6(unix.SYS_SENDTO, uintptr(fd), 0, 0, unix.MSG_DONTWAIT, 0, 0)
	return e
}

func (*sysKernel) poll(fd int) error {
	_, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 0)
	return err
}

func (k *sysKernel) wait(timeoutMS int, ready func() bool) error {
	if timeoutMS >= 0 {
		// Only a bounded wait sets a deadline, so that one does not
		// undo an interrupt that an unbounded wait is to see.
		k.f.SetReadDeadline(time.Now().Add(time.Duration(timeoutMS) * time.Millisecond))
	}
	err := k.rc.Read(func(uintptr) bool { return ready() })
	if timeoutMS >= 0 && errors.Is(err, os.ErrDeadlineExceeded) {
		return nil
	}
	return err
}

func (k *sysKernel) interrupt() { k.f.SetReadDeadline(time.Unix(1, 0)) }

func (c *Config) setDefaults() error {
	if c.FrameSize == 0 {
		c.FrameSize = 2048
	}
	if c.NumFrames == 0 {
		c.NumFrames = 4096
	}
	if c.RingSize == 0 {
		c.RingSize = c.NumFrames / 2
	}
	if c.FrameSize != 2048 && c.FrameSize != 4096 {
		return fmt.Errorf("xsk: FrameSize %d: must be 2048 or 4096", c.FrameSize)
	}
	if c.NumFrames < 2 || c.NumFrames&(c.NumFrames-1) != 0 {
		return fmt.Errorf("xsk: NumFrames %d: must be a power of two >= 2", c.NumFrames)
	}
	if c.RingSize < 1 || c.RingSize&(c.RingSize-1) != 0 || c.RingSize < c.NumFrames/2 {
		return fmt.Errorf("xsk: RingSize %d: must be a power of two >= NumFrames/2 (%d)", c.RingSize, c.NumFrames/2)
	}
	return nil
}

// Stats are the kernel's per-socket counters (XDP_STATISTICS).
type Stats struct {
	RxDropped, RxInvalidDescs, TxInvalidDescs, RxRingFull, RxFillRingEmpty, TxRingEmpty uint64
}

// ring is one mmapped ring. For the fill and TX rings userspace produces;
// for the completion and RX rings it consumes.
type ring struct {
	mem        []byte
	producer   *uint32
	consumer   *uint32
	flags      *uint32
	descs      unsafe.Pointer
	mask       uint32
	size       uint32
	cachedProd uint32
	cachedCons uint32
}

func (r *ring) addr(i uint32) *uint64 {
	return (*uint64)(unsafe.Add(r.descs, uintptr(i&r.mask)*8))
}

func (r *ring) desc(i uint32) *Desc {
	return (*Desc)(unsafe.Add(r.descs, uintptr(i&r.mask)*unsafe.Sizeof(Desc{})))
}

// free returns how many entries the producer can write, refreshing the
// cached consumer index only when the cache shows fewer than n.
func (r *ring) free(n uint32) uint32 {
	f := r.size - (r.cachedProd - r.cachedCons)
	if f >= n {
		return f
	}
	r.cachedCons = atomic.LoadUint32(r.consumer)
	return r.size - (r.cachedProd - r.cachedCons)
}

// submit publishes n entries written at cachedProd.
func (r *ring) submit(n uint32) {
	r.cachedProd += n
	atomic.StoreUint32(r.producer, r.cachedProd)
}

// avail returns how many entries the consumer can read.
func (r *ring) avail() uint32 {
	a := r.cachedProd - r.cachedCons
	if a == 0 {
		r.cachedProd = atomic.LoadUint32(r.producer)
		a = r.cachedProd - r.cachedCons
	}
	return a
}

// release hands n read entries back to the kernel.
func (r *ring) release(n uint32) {
	r.cachedCons += n
	atomic.StoreUint32(r.consumer, r.cachedCons)
}

func (r *ring) needWakeup() bool {
	return atomic.LoadUint32(r.flags)&unix.XDP_RING_NEED_WAKEUP != 0
}

// Socket is an AF_XDP socket bound to one queue of one interface, with its
// own UMEM.
type Socket struct {
	fd        int
	umem      []byte
	frameSize uint64
	fill      ring
	comp      ring
	rx        ring
	tx        ring
	txFree    []uint64 // TX frames not in the kernel's hands
	ifindex   int
	queue     int
	zeroCopy  bool
	txBudget  int // frames one sendto sends in copy mode
	rxHeld    int // RX frames received and not yet released
	closed    bool
	sys       kernel
	n         counters
}

// Open creates an AF_XDP socket, registers a UMEM, maps the four rings, gives
// half the frames to the fill ring and binds to queue of the interface
// ifindex. Packets arrive only once an XDP program redirects them to the
// socket (package xdp). On error nothing stays mapped or open.
func Open(ifindex, queue int, cfg Config) (s *Socket, err error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	fd, err := unix.Socket(unix.AF_XDP, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("xsk: socket(AF_XDP): %w", err)
	}
	s = &Socket{fd: fd, frameSize: uint64(cfg.FrameSize), ifindex: ifindex, queue: queue}
	defer func() {
		if err != nil {
			s.Close()
			s = nil
		}
	}()
	s.umem, err = unix.Mmap(-1, 0, cfg.NumFrames*cfg.FrameSize, unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
	if err != nil {
		return s, fmt.Errorf("xsk: mmap UMEM of %d frames: %w", cfg.NumFrames, err)
	}
	reg := unix.XDPUmemReg{
		Addr: uint64(uintptr(unsafe.Pointer(&s.umem[0]))),
		Len:  uint64(len(s.umem)),
		Size: uint32(cfg.FrameSize),
	}
	// Pass the pre-6.8 size (no tx_metadata_len) so older kernels accept it.
	if err := setsockopt(fd, unix.XDP_UMEM_REG, unsafe.Pointer(&reg), unsafe.Offsetof(reg.Tx_metadata_len)); err != nil {
		return s, fmt.Errorf("xsk: register UMEM: %w", err)
	}
	size := uint32(cfg.RingSize)
	fillSize := fillRingSize(size)
	for _, o := range []struct {
		opt int
		n   uint32
	}{{unix.XDP_UMEM_FILL_RING, fillSize}, {unix.XDP_UMEM_COMPLETION_RING, size}, {unix.XDP_RX_RING, size}, {unix.XDP_TX_RING, size}} {
		if err := setsockopt(fd, o.opt, unsafe.Pointer(&o.n), 4); err != nil {
			return s, fmt.Errorf("xsk: ring size option %d = %d: %w", o.opt, o.n, err)
		}
	}
	var off unix.XDPMmapOffsets
	olen := uint32(unsafe.Sizeof(off))
	if _, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_XDP, unix.XDP_MMAP_OFFSETS,
		uintptr(unsafe.Pointer(&off)), uintptr(unsafe.Pointer(&olen)), 0); e != 0 {
		return s, fmt.Errorf("xsk: XDP_MMAP_OFFSETS: %w", e)
	}
	for _, m := range []struct {
		r    *ring
		off  unix.XDPRingOffset
		pg   int64
		n    uint32
		desc uintptr
	}{
		{&s.fill, off.Fr, unix.XDP_UMEM_PGOFF_FILL_RING, fillSize, 8},
		{&s.comp, off.Cr, unix.XDP_UMEM_PGOFF_COMPLETION_RING, size, 8},
		{&s.rx, off.Rx, unix.XDP_PGOFF_RX_RING, size, unsafe.Sizeof(Desc{})},
		{&s.tx, off.Tx, unix.XDP_PGOFF_TX_RING, size, unsafe.Sizeof(Desc{})},
	} {
		if err := m.r.mmap(fd, m.off, m.pg, m.n, m.desc); err != nil {
			return s, err
		}
	}
	// Frames [0, n/2) start in the fill ring; [n/2, n) are for TX.
	nrx := uint32(cfg.NumFrames / 2)
	s.fill.free(nrx)
	for i := uint32(0); i < nrx; i++ {
		*s.fill.addr(s.fill.cachedProd + i) = uint64(i) * s.frameSize
	}
	s.fill.submit(nrx)
	s.txFree = make([]uint64, 0, cfg.NumFrames-int(nrx))
	for i := nrx; i < uint32(cfg.NumFrames); i++ {
		s.txFree = append(s.txFree, uint64(i)*s.frameSize)
	}
	// In copy mode one sendto sends at most max_tx_budget frames (32 by
	// default); Linux 6.17 lets it be raised to the TX ring's size. Older
	// kernels answer ENOPROTOOPT and a batch takes several kicks.
	s.txBudget = 32
	budget := size
	if setsockopt(fd, unix.XDP_MAX_TX_SKB_BUDGET, unsafe.Pointer(&budget), 4) == nil {
		s.txBudget = int(size)
	}
	// Without a mode flag the kernel tries zero-copy and falls back to
	// copy mode itself; XDP_OPTIONS then says which it chose.
	flags := uint16(unix.XDP_USE_NEED_WAKEUP)
	switch cfg.Bind {
	case BindCopy:
		flags |= unix.XDP_COPY
	case BindZeroCopy:
		flags |= unix.XDP_ZEROCOPY
	}
	if err := bind(fd, &unix.SockaddrXDP{Flags: flags, Ifindex: uint32(ifindex), QueueID: uint32(queue)}); err != nil {
		if cfg.Bind == BindZeroCopy && (errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL)) {
			return s, fmt.Errorf("xsk: bind ifindex %d queue %d in zero-copy mode: %w (%w)", ifindex, queue, ErrNoZeroCopy, err)
		}
		return s, fmt.Errorf("xsk: bind ifindex %d queue %d (%v mode): %w", ifindex, queue, cfg.Bind, err)
	}
	var opts uint32
	olen = 4
	if _, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_XDP, unix.XDP_OPTIONS,
		uintptr(unsafe.Pointer(&opts)), uintptr(unsafe.Pointer(&olen)), 0); e != 0 {
		return s, fmt.Errorf("xsk: XDP_OPTIONS: %w", e)
	}
	s.zeroCopy = opts&unix.XDP_OPTIONS_ZEROCOPY != 0
	// From here the File owns the descriptor and closes it.
	if err := unix.SetNonblock(fd, true); err != nil {
		return s, fmt.Errorf("xsk: %w", err)
	}
	k := &sysKernel{f: os.NewFile(uintptr(fd), "xsk")}
	s.sys = k
	if k.rc, err = k.f.SyscallConn(); err != nil {
		return s, fmt.Errorf("xsk: %w", err)
	}
	return s, nil
}

// fillRingSize is the fill ring's size for rings of size entries (at
// least as many as there are RX frames): twice that. The kernel publishes
// how far it consumed the fill ring only after it has put the frames it
// took into the RX ring (xsk_flush: the RX producer first, then the fill
// consumer), so a reader quick enough can receive frames, and release
// them, while the fill ring still counts them as filled. With one entry
// per frame Release then found the ring full, and the frames were lost to
// the socket for good.
func fillRingSize(size uint32) uint32 { return 2 * size }

// ErrNoZeroCopy means a socket that required zero-copy was refused it: the
// driver has no zero-copy AF_XDP (veth, most virtual devices).
var ErrNoZeroCopy = errors.New("the driver offers no zero-copy AF_XDP")

// bind binds, waiting out EBUSY for up to a second: the kernel frees a closed
// socket's claim on the queue from a work queue, so a socket reopened right
// after Close (a restarting daemon) would otherwise find the queue busy.
func bind(fd int, sa *unix.SockaddrXDP) error {
	deadline := time.Now().Add(time.Second)
	for {
		err := unix.Bind(fd, sa)
		if err != unix.EBUSY || time.Now().After(deadline) {
			return err
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (r *ring) mmap(fd int, off unix.XDPRingOffset, pgoff int64, n uint32, descSize uintptr) error {
	mem, err := unix.Mmap(fd, pgoff, int(off.Desc)+int(n)*int(descSize),
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("xsk: mmap ring at page offset %#x: %w", pgoff, err)
	}
	base := unsafe.Pointer(&mem[0])
	r.mem = mem
	r.producer = (*uint32)(unsafe.Add(base, off.Producer))
	r.consumer = (*uint32)(unsafe.Add(base, off.Consumer))
	r.flags = (*uint32)(unsafe.Add(base, off.Flags))
	r.descs = unsafe.Add(base, off.Desc)
	r.size = n
	r.mask = n - 1
	// Start from the kernel's view so a ring is never misread as full.
	r.cachedProd = atomic.LoadUint32(r.producer)
	r.cachedCons = atomic.LoadUint32(r.consumer)
	return nil
}

func setsockopt(fd, opt int, v unsafe.Pointer, n uintptr) error {
	if _, _, e := unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_XDP, uintptr(opt), uintptr(v), n, 0); e != 0 {
		return e
	}
	return nil
}

// FD is the socket's file descriptor, to be stored in an XSKMAP.
func (s *Socket) FD() int { return s.fd }

// Ifindex and Queue are what the socket is bound to.
func (s *Socket) Ifindex() int { return s.ifindex }
func (s *Socket) Queue() int   { return s.queue }

// FrameSize is the size of one UMEM frame.
func (s *Socket) FrameSize() int { return int(s.frameSize) }

// ZeroCopy reports whether the driver uses the UMEM directly (zero-copy
// mode) rather than the kernel copying each frame (copy mode).
func (s *Socket) ZeroCopy() bool { return s.zeroCopy }

// TXBudget is how many frames one kick sends in copy mode: the ring size
// where the kernel lets it be raised, else the kernel's 32.
func (s *Socket) TXBudget() int { return s.txBudget }

// Counters returns the socket's system call and batch counts so far.
func (s *Socket) Counters() Counters {
	return Counters{
		TXKicks: s.n.txKicks.Load(), TXNoWakeup: s.n.txNoWakeup.Load(),
		TXBatches: s.n.txBatches.Load(), TXFrames: s.n.txFrames.Load(),
		RXPolls: s.n.rxPolls.Load(), FillWakeups: s.n.fillWakeups.Load(),
		RXBatches: s.n.rxBatches.Load(), RXFrames: s.n.rxFrames.Load(),
	}
}

// Frame returns the packet bytes of d. The slice's capacity ends at the end
// of d's UMEM frame, so appending cannot reach a neighbouring frame.
func (s *Socket) Frame(d Desc) []byte {
	end := d.Addr&^(s.frameSize-1) + s.frameSize
	if d.Addr >= uint64(len(s.umem)) || d.Addr+uint64(d.Len) > end {
		return nil
	}
	return s.umem[d.Addr : d.Addr+uint64(d.Len) : end]
}

// Pending is how many received frames wait in the RX ring. Like Receive,
// it belongs to the receive side.
func (s *Socket) Pending() int { return int(s.rx.avail()) }

// Receive moves up to len(d) received descriptors into d and returns how
// many. It does not block (see WaitRX). The frames belong to the caller until
// it passes them to Release.
func (s *Socket) Receive(d []Desc) int {
	n := min(s.rx.avail(), uint32(len(d)))
	for i := uint32(0); i < n; i++ {
		d[i] = *s.rx.desc(s.rx.cachedCons + i)
	}
	if n > 0 {
		s.rx.release(n)
		s.rxHeld += int(n)
		s.n.rxBatches.Add(1)
		s.n.rxFrames.Add(uint64(n))
	}
	return int(n)
}

// ErrFillOverflow means more frames were released than were received.
var ErrFillOverflow = errors.New("xsk: more RX frames released than received (a frame released twice?)")

// Release gives received frames back to the kernel through the fill ring.
// Releasing more frames than Receive handed out and Release took back
// fails with ErrFillOverflow, and releases none.
func (s *Socket) Release(d []Desc) error {
	n := uint32(len(d))
	if n == 0 {
		return nil
	}
	// The fill ring has twice as many entries as there are RX frames, so
	// it has room for every frame the caller legitimately returns, even
	// while the kernel has not yet published what it took (Open).
	if len(d) > s.rxHeld || s.fill.free(n) < n {
		return ErrFillOverflow
	}
	s.rxHeld -= len(d)
	for i := uint32(0); i < n; i++ {
		*s.fill.addr(s.fill.cachedProd + i) = d[i].Addr &^ (s.frameSize - 1)
	}
	s.fill.submit(n)
	// In copy mode the kernel refills from the ring itself; in zero-copy
	// mode a driver that ran out of frames sets the fill ring's
	// need_wakeup flag and waits for a poll to restart reception.
	if s.fill.needWakeup() {
		s.n.fillWakeups.Add(1)
		s.sys.poll(s.fd)
	}
	return nil
}

// WaitRX blocks until a packet is ready to receive or timeoutMS passes
// (-1: until Interrupt). After Interrupt, WaitRX(-1) returns at once with
// an error wrapping os.ErrDeadlineExceeded.
func (s *Socket) WaitRX(timeoutMS int) error {
	if s.rx.avail() > 0 {
		return nil
	}
	s.n.rxPolls.Add(1)
	if err := s.sys.wait(timeoutMS, func() bool { return s.rx.avail() > 0 }); err != nil {
		return fmt.Errorf("xsk: wait for RX: %w", err)
	}
	return nil
}

// Interrupt makes a WaitRX(-1) in progress, and every later one, return,
// so that a receiver waiting without a timeout can be stopped before
// Close. It may be called from any goroutine.
func (s *Socket) Interrupt() {
	if s.sys != nil {
		s.sys.interrupt()
	}
}

// AllocTX fills d with up to len(d) free TX frames, each with Len set to the
// whole frame, and returns how many. Write a packet into Frame(d[i]), set
// d[i].Len to its length, and hand the frames to Transmit or FreeTX.
func (s *Socket) AllocTX(d []Desc) int {
	if len(s.txFree) < len(d) {
		s.reclaim()
	}
	n := min(len(d), len(s.txFree))
	for i := range n {
		d[i] = Desc{Addr: s.txFree[len(s.txFree)-1-i], Len: uint32(s.frameSize)}
	}
	s.txFree = s.txFree[:len(s.txFree)-n]
	return n
}

// FreeTX returns unsent TX frames.
func (s *Socket) FreeTX(d []Desc) {
	for _, x := range d {
		s.txFree = append(s.txFree, x.Addr&^(s.frameSize-1))
	}
}

// reclaim moves completed TX frames back to the free list.
func (s *Socket) reclaim() {
	n := s.comp.avail()
	for i := uint32(0); i < n; i++ {
		s.txFree = append(s.txFree, *s.comp.addr(s.comp.cachedCons + i))
	}
	if n > 0 {
		s.comp.release(n)
	}
}

// kickBudget bounds the sendto calls of one Transmit. In copy mode each call
// sends at most TXBudget frames and returns EAGAIN when more are queued.
const kickBudget = 64

// ErrTXBusy means the kernel did not take every queued frame; they stay
// queued and go out with the next Transmit.
var ErrTXBusy = errors.New("xsk: TX ring not drained")

// Transmit queues the frames d (from AllocTX, with Len set) and asks the
// kernel to send them. It returns how many were queued; frames not queued
// (TX ring full) still belong to the caller.
func (s *Socket) Transmit(d []Desc) (int, error) {
	n := min(s.tx.free(uint32(len(d))), uint32(len(d)))
	for i := uint32(0); i < n; i++ {
		x := d[i]
		if x.Addr >= uint64(len(s.umem)) || x.Addr+uint64(x.Len) > x.Addr&^(s.frameSize-1)+s.frameSize {
			return int(i), fmt.Errorf("xsk: TX descriptor addr=%#x len=%d outside its frame", x.Addr, x.Len)
		}
		*s.tx.desc(s.tx.cachedProd + i) = x
	}
	if n > 0 {
		s.tx.submit(n)
		s.n.txBatches.Add(1)
		s.n.txFrames.Add(uint64(n))
	}
	err := s.kick()
	s.reclaim()
	return int(n), err
}

// Flush asks the kernel to send frames still queued from an earlier
// Transmit, and reclaims completed ones.
func (s *Socket) Flush() error {
	err := s.kick()
	s.reclaim()
	return err
}

func (s *Socket) kick() error {
	for range kickBudget {
		if atomic.LoadUint32(s.tx.consumer) == s.tx.cachedProd {
			return nil
		}
		// A zero-copy driver that is already draining the ring clears
		// the flag: a sendto would only cost a system call.
		if !s.tx.needWakeup() {
			s.n.txNoWakeup.Add(1)
			return nil
		}
		s.n.txKicks.Add(1)
		e := s.sys.sendto(s.fd)
		switch e {
		case 0, unix.EAGAIN:
			// EAGAIN: the batch limit was reached with frames left.
		case unix.EBUSY, unix.ENOBUFS:
			// Completion ring full or device queue busy: reclaim and retry.
			s.reclaim()
		default:
			return fmt.Errorf("xsk: send on ifindex %d: %w", s.ifindex, e)
		}
	}
	return ErrTXBusy
}

// Stats reads the kernel's counters for the socket.
func (s *Socket) Stats() (Stats, error) {
	var st unix.XDPStatistics
	n := uint32(unsafe.Sizeof(st))
	if _, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(s.fd), unix.SOL_XDP, unix.XDP_STATISTICS,
		uintptr(unsafe.Pointer(&st)), uintptr(unsafe.Pointer(&n)), 0); e != 0 {
		return Stats{}, fmt.Errorf("xsk: XDP_STATISTICS: %w", e)
	}
	return Stats{st.Rx_dropped, st.Rx_invalid_descs, st.Tx_invalid_descs, st.Rx_ring_full,
		st.Rx_fill_ring_empty_descs, st.Tx_ring_empty_descs}, nil
}

// Close unbinds the socket and unmaps its rings and UMEM. Frames and slices
// from Frame are invalid afterwards.
func (s *Socket) Close() error {
	if s.closed {
		return nil
	}
	s.closed = true
	var errs []error
	for _, r := range []*ring{&s.fill, &s.comp, &s.rx, &s.tx} {
		if r.mem != nil {
			errs = append(errs, unix.Munmap(r.mem))
			*r = ring{}
		}
	}
	if k, ok := s.sys.(*sysKernel); ok {
		errs = append(errs, k.f.Close())
	} else {
		errs = append(errs, unix.Close(s.fd))
	}
	if s.umem != nil {
		errs = append(errs, unix.Munmap(s.umem))
		s.umem = nil
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("xsk: close: %w", err)
	}
	return nil
}
