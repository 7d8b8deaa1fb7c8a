package xsk

import (
	"sync/atomic"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// These tests run the socket's ring and wake-up logic against fakeKernel,
// a stand-in for the kernel's side of the rings, so they can set the
// need_wakeup flags a copy-mode veth never clears. TestBatchIsOneKick in
// xsk_test.go runs the same TX path against the real kernel.

// fakeRing backs a ring with Go memory laid out as the kernel's would be:
// producer, consumer and flags words, then the descriptors.
func fakeRing(n uint32, descSize uintptr) ring {
	mem := make([]uint64, 3+(uintptr(n)*descSize+7)/8)
	base := unsafe.Pointer(&mem[0])
	return ring{
		producer: (*uint32)(base),
		consumer: (*uint32)(unsafe.Add(base, 8)),
		flags:    (*uint32)(unsafe.Add(base, 16)),
		descs:    unsafe.Add(base, 24),
		size:     n,
		mask:     n - 1,
	}
}

// fakeKernel plays the kernel's side of the rings: sendto consumes up to
// budget TX descriptors and completes them at once, as copy mode does;
// poll only counts.
type fakeKernel struct {
	s              *Socket
	budget         int
	sendtos, polls int
}

func (k *fakeKernel) sendto(int) unix.Errno {
	k.sendtos++
	tx, comp := &k.s.tx, &k.s.comp
	cons := atomic.LoadUint32(tx.consumer)
	prod := atomic.LoadUint32(tx.producer)
	cprod := atomic.LoadUint32(comp.producer)
	for i := 0; i < k.budget && cons != prod; i++ {
		*comp.addr(cprod) = tx.desc(cons).Addr
		cons++
		cprod++
	}
	atomic.StoreUint32(comp.producer, cprod)
	atomic.StoreUint32(tx.consumer, cons)
	if cons != prod {
		return unix.EAGAIN
	}
	return 0
}

func (k *fakeKernel) poll(int) error              { k.polls++; return nil }
func (k *fakeKernel) wait(int, func() bool) error { k.polls++; return nil }
func (k *fakeKernel) interrupt()                  {}

// newFakeSocket is a Socket of frames frames whose rings only fakeKernel
// serves. Half the frames are RX frames handed to the fill ring, sized
// as Open sizes it.
func newFakeSocket(t *testing.T, frames int, budget int) (*Socket, *fakeKernel) {
	t.Helper()
	const fs = 2048
	n := uint32(frames / 2)
	s := &Socket{umem: make([]byte, frames*fs), frameSize: fs, txBudget: budget,
		fill: fakeRing(fillRingSize(n), 8), comp: fakeRing(n, 8),
		rx: fakeRing(n, unsafe.Sizeof(Desc{})), tx: fakeRing(n, unsafe.Sizeof(Desc{}))}
	k := &fakeKernel{s: s, budget: budget}
	s.sys = k
	for i := n; i < uint32(frames); i++ {
		s.txFree = append(s.txFree, uint64(i)*fs)
	}
	// The kernel holds the RX frames: the fill ring's producer is ahead.
	atomic.StoreUint32(s.fill.producer, n)
	s.fill.cachedProd = n
	return s, k
}

// setFlag sets or clears a ring's need_wakeup flag, as a driver would.
func setFlag(r *ring, on bool) {
	var v uint32
	if on {
		v = unix.XDP_RING_NEED_WAKEUP
	}
	atomic.StoreUint32(r.flags, v)
}

func transmit(t *testing.T, s *Socket, frames int) {
	t.Helper()
	d := make([]Desc, frames)
	if n := s.AllocTX(d); n != frames {
		t.Fatalf("AllocTX: %d of %d frames", n, frames)
	}
	for i := range d {
		d[i].Len = 100
	}
	n, err := s.Transmit(d)
	if n != frames || err != nil {
		t.Fatalf("Transmit: %d of %d queued, %v", n, frames, err)
	}
}

// TestFakeBatchIsOneKick: a batch of N frames costs one sendto when the
// budget covers it, ceil(N/budget) when it does not, and its completions
// are reaped together.
func TestFakeBatchIsOneKick(t *testing.T) {
	for _, c := range []struct{ budget, frames, kicks int }{{256, 200, 1}, {512, 512, 1}, {32, 200, 7}, {32, 32, 1}} {
		s, k := newFakeSocket(t, 1024, c.budget)
		setFlag(&s.tx, true) // copy mode: the kernel keeps asking
		transmit(t, s, c.frames)
		if k.sendtos != c.kicks || s.Counters().TXKicks != uint64(c.kicks) {
			t.Errorf("budget %d, %d frames: %d sendto calls (counted %d), want %d",
				c.budget, c.frames, k.sendtos, s.Counters().TXKicks, c.kicks)
		}
		if got := s.Counters(); got.TXBatches != 1 || got.TXFrames != uint64(c.frames) {
			t.Errorf("counters %+v: want one batch of %d", got, c.frames)
		}
		// All completions were reaped in bulk: every TX frame is free again.
		if len(s.txFree) != 512 {
			t.Errorf("after the batch completed, %d of 512 TX frames free", len(s.txFree))
		}
	}
}

// TestFakeNoWakeupNoSyscall: while the driver has cleared the TX ring's
// need_wakeup flag (it is draining the ring itself), Transmit makes no
// system call; once it sets the flag, one kick follows.
func TestFakeNoWakeupNoSyscall(t *testing.T) {
	s, k := newFakeSocket(t, 256, 256)
	setFlag(&s.tx, false)
	transmit(t, s, 64)
	if k.sendtos != 0 {
		t.Fatalf("need_wakeup clear: %d sendto calls, want none", k.sendtos)
	}
	if c := s.Counters(); c.TXKicks != 0 || c.TXNoWakeup != 1 {
		t.Errorf("counters %+v: want no kick, one skipped", c)
	}
	if err := s.Flush(); err != nil || k.sendtos != 0 {
		t.Fatalf("Flush with need_wakeup clear: %d sendto calls, %v", k.sendtos, err)
	}
	setFlag(&s.tx, true)
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	if k.sendtos != 1 {
		t.Errorf("need_wakeup set with 64 frames queued: %d sendto calls, want 1", k.sendtos)
	}
	// Nothing queued: no kick even with the flag set.
	if err := s.Flush(); err != nil || k.sendtos != 1 {
		t.Errorf("empty TX ring: %d sendto calls, want still 1 (%v)", k.sendtos, err)
	}
}

// produceRX fills the RX ring with n descriptors from the fill ring's
// frames, as the kernel does on receive.
func produceRX(s *Socket, n uint32) {
	fc := atomic.LoadUint32(s.fill.consumer)
	rp := atomic.LoadUint32(s.rx.producer)
	for i := range n {
		addr := *s.fill.addr(fc + i)
		*s.rx.desc(rp + i) = Desc{Addr: addr, Len: 60}
	}
	atomic.StoreUint32(s.fill.consumer, fc+n)
	atomic.StoreUint32(s.rx.producer, rp+n)
}

// TestFakeRXBatch: Receive takes everything pending in one call and
// publishes the consumer index once; Release refills the fill ring with
// the whole batch in one store and polls only when the fill ring asks;
// WaitRX polls only when the RX ring is empty.
func TestFakeRXBatch(t *testing.T) {
	s, k := newFakeSocket(t, 512, 32)
	if err := s.WaitRX(0); err != nil || k.polls != 1 {
		t.Fatalf("WaitRX on an empty ring: %d polls, want 1 (%v)", k.polls, err)
	}
	produceRX(s, 100)
	if got := s.Pending(); got != 100 {
		t.Errorf("Pending: %d, want 100", got)
	}
	if err := s.WaitRX(0); err != nil || k.polls != 1 {
		t.Fatalf("WaitRX with frames pending: %d polls, want still 1 (%v)", k.polls, err)
	}
	d := make([]Desc, 256)
	n := s.Receive(d)
	if n != 100 || atomic.LoadUint32(s.rx.consumer) != 100 {
		t.Fatalf("Receive: %d frames, consumer %d; want 100, 100", n, atomic.LoadUint32(s.rx.consumer))
	}
	if c := s.Counters(); c.RXBatches != 1 || c.RXFrames != 100 {
		t.Errorf("counters %+v: want one RX batch of 100", c)
	}
	setFlag(&s.fill, false)
	if err := s.Release(d[:n]); err != nil {
		t.Fatal(err)
	}
	if k.polls != 1 {
		t.Errorf("Release with the fill flag clear: %d polls, want still 1", k.polls)
	}
	if p := atomic.LoadUint32(s.fill.producer); p != 256+100 {
		t.Errorf("fill producer %d after Release, want %d", p, 256+100)
	}
	produceRX(s, 10)
	n = s.Receive(d)
	setFlag(&s.fill, true)
	if err := s.Release(d[:n]); err != nil {
		t.Fatal(err)
	}
	if k.polls != 2 || s.Counters().FillWakeups != 1 {
		t.Errorf("Release with the fill flag set: %d polls (%d fill wake-ups), want 2 (1)", k.polls, s.Counters().FillWakeups)
	}
	// A frame released twice overflows the fill ring.
	if err := s.Release(make([]Desc, 1)); err != ErrFillOverflow {
		t.Errorf("releasing more frames than were received: %v, want ErrFillOverflow", err)
	}
	produceRX(s, 5)
	n = s.Receive(d)
	if err := s.Release(append(d[:n:n], d[0])); err != ErrFillOverflow {
		t.Errorf("releasing 6 frames of 5 received: %v, want ErrFillOverflow", err)
	}
	if err := s.Release(d[:n]); err != nil {
		t.Errorf("releasing the 5 frames after a refused release: %v", err)
	}
}

// TestFakeRXKernelLagsOnFill: the kernel publishes its fill-ring consumer
// index after the RX producer (fillRingSize), so frames can be received,
// and released, while the fill ring still shows them as filled, here all
// of them. Release must take them all back (with a fill ring of one entry
// per frame it refused them and the frames were lost).
func TestFakeRXKernelLagsOnFill(t *testing.T) {
	s, _ := newFakeSocket(t, 512, 32) // 256 RX frames
	// The kernel receives into all 256 frames without publishing that it
	// took them from the fill ring.
	produceRX(s, 256)
	atomic.StoreUint32(s.fill.consumer, 0)
	d := make([]Desc, 256)
	n := s.Receive(d)
	if n != 256 {
		t.Fatalf("Receive: %d frames, want 256", n)
	}
	for round := range 2 {
		if err := s.Release(d[:n]); err != nil {
			t.Fatalf("round %d: Release of every frame while the kernel lags: %v", round, err)
		}
		if p := atomic.LoadUint32(s.fill.producer); p != uint32(256*(round+2)) {
			t.Fatalf("round %d: fill producer %d, want %d", round, p, 256*(round+2))
		}
		// The kernel publishes its consumer and takes the frames again.
		atomic.StoreUint32(s.fill.consumer, uint32(256*(round+1)))
		produceRX(s, 256)
		atomic.StoreUint32(s.fill.consumer, uint32(256*(round+1)))
		if n = s.Receive(d); n != 256 {
			t.Fatalf("round %d: Receive: %d frames, want 256", round, n)
		}
	}
}
