// Package replay is the anti-replay filter of the userspace data plane: a
// sliding window over 64-bit packet counters in the style of RFC 6479, one
// per receive security association.
//
// The window is a ring of 64-bit blocks. Moving the window forward clears
// whole blocks instead of shifting a bitmap, so the cost of accepting a
// packet does not grow with the window size.
//
// Callers must only pass counters of packets that have already been
// authenticated: Accept moves the window, and a forged counter that moved
// it would make the real peer's packets look old (the ICX bug APO-645).
package replay

const (
	blockBits = 64
	// blocks is a power of two so the ring index is a mask. One block is
	// always partly behind the window, hence WindowSize below.
	blocks    = 256
	ringMask  = blocks - 1
	blockLog  = 6 // log2(blockBits)
	bitMask   = blockBits - 1
	lastBlock = blocks - 1

	// WindowSize is how far behind the highest accepted counter a counter
	// may be and still be accepted (if not seen before).
	WindowSize = lastBlock * blockBits

	// RejectAfter is the first counter the window refuses outright. It
	// keeps the block arithmetic far from overflow; senders stop long
	// before it (the codec's hard packet budget is lower).
	RejectAfter = 1<<64 - 1 - WindowSize
)

// Window is a sliding replay window. The zero value is an empty window
// that accepts any counter below RejectAfter once. It is not safe for
// concurrent use; the owner serialises Accept.
type Window struct {
	top  uint64 // highest accepted counter + 1; 0 while empty
	ring [blocks]uint64
}

// Accept reports whether counter is new and inside the window, and if so
// records it. A counter ahead of the window moves the window forward.
func (w *Window) Accept(counter uint64) bool {
	if counter >= RejectAfter {
		return false
	}
	c := counter + 1 // so the zero value (top 0) means "nothing seen"
	if c > w.top {
		cur := w.top >> blockLog
		next := c >> blockLog
		diff := next - cur
		if diff > blocks {
			diff = blocks
		}
		for i := uint64(1); i <= diff; i++ {
			w.ring[(cur+i)&ringMask] = 0
		}
		w.top = c
	} else if w.top-c >= WindowSize {
		return false
	}
	idx := (c >> blockLog) & ringMask
	bit := uint64(1) << (c & bitMask)
	if w.ring[idx]&bit != 0 {
		return false
	}
	w.ring[idx] |= bit
	return true
}

// Seen reports whether Accept would refuse counter, without changing the
// window.
func (w *Window) Seen(counter uint64) bool {
	if counter >= RejectAfter {
		return true
	}
	c := counter + 1
	if c > w.top {
		return false
	}
	if w.top-c >= WindowSize {
		return true
	}
	return w.ring[(c>>blockLog)&ringMask]&(1<<(c&bitMask)) != 0
}

// Top is the highest accepted counter, and false if none was accepted.
func (w *Window) Top() (uint64, bool) {
	if w.top == 0 {
		return 0, false
	}
	return w.top - 1, true
}

// Reset empties the window.
func (w *Window) Reset() { *w = Window{} }
