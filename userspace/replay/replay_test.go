package replay

import (
	"math/rand/v2"
	"testing"
)

func TestWindowSizeAtLeast8192(t *testing.T) {
	if WindowSize < 8192 {
		t.Fatalf("WindowSize %d < 8192", WindowSize)
	}
}

func TestAcceptOnceInOrder(t *testing.T) {
	var w Window
	for c := range uint64(20000) {
		if !w.Accept(c) {
			t.Fatalf("counter %d refused", c)
		}
		if w.Accept(c) {
			t.Fatalf("counter %d accepted twice", c)
		}
	}
	if top, ok := w.Top(); !ok || top != 19999 {
		t.Fatalf("Top = %d, %v", top, ok)
	}
}

func TestReorderInsideWindowAccepted(t *testing.T) {
	var w Window
	if !w.Accept(WindowSize + 100) {
		t.Fatal("first counter refused")
	}
	// Everything strictly inside the window, in reverse order, is new.
	for c := uint64(WindowSize + 99); c > 100; c-- {
		if !w.Accept(c) {
			t.Fatalf("in-window counter %d refused", c)
		}
	}
	// The edge: exactly WindowSize behind is outside.
	if w.Accept(100) {
		t.Fatal("counter WindowSize behind the top accepted")
	}
	if w.Accept(0) {
		t.Fatal("counter far behind the top accepted")
	}
}

func TestBehindWindowRefused(t *testing.T) {
	var w Window
	w.Accept(1 << 40)
	for _, c := range []uint64{0, 1, 1<<40 - WindowSize, 1<<40 - WindowSize - 1} {
		if w.Accept(c) {
			t.Errorf("counter %d behind window accepted", c)
		}
	}
	if !w.Accept(1<<40 - WindowSize + 1) {
		t.Error("oldest in-window counter refused")
	}
}

func TestJumpClearsStaleBits(t *testing.T) {
	var w Window
	for c := range uint64(64 * 4) {
		w.Accept(c)
	}
	// A jump of exactly one ring revolution lands on the same ring slots;
	// counters in those slots must be new again.
	base := uint64(blocks * blockBits)
	for c := base; c < base+64*4; c++ {
		if !w.Accept(c) {
			t.Fatalf("counter %d refused after jump", c)
		}
	}
}

func TestRejectAfter(t *testing.T) {
	var w Window
	if w.Accept(RejectAfter) || w.Accept(1<<64-1) {
		t.Fatal("counter at or past RejectAfter accepted")
	}
	if !w.Accept(RejectAfter - 1) {
		t.Fatal("last valid counter refused")
	}
	if w.Accept(RejectAfter - 1) {
		t.Fatal("last valid counter accepted twice")
	}
}

func TestSeenDoesNotMove(t *testing.T) {
	var w Window
	w.Accept(10)
	if w.Seen(1 << 50) {
		t.Fatal("future counter reported seen")
	}
	if !w.Accept(9) {
		t.Fatal("Seen moved the window")
	}
	if !w.Seen(9) || !w.Seen(10) {
		t.Fatal("accepted counters not reported seen")
	}
}

// TestAgainstModel compares the ring against a plain set-and-max model on
// random traffic: duplicates, reordering and jumps.
func TestAgainstModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var w Window
	seen := map[uint64]bool{}
	var top uint64
	var any bool
	for i := range 200000 {
		var c uint64
		switch r := rng.IntN(10); {
		case r < 6 && any:
			c = top - uint64(rng.IntN(WindowSize+200))
			if c > top {
				c = 0
			}
		case r < 9:
			c = top + uint64(rng.IntN(100))
		default:
			c = top + uint64(rng.IntN(3*WindowSize))
		}
		want := !seen[c] && (!any || c > top || top-c < WindowSize)
		if got := w.Accept(c); got != want {
			t.Fatalf("step %d counter %d top %d: got %v want %v", i, c, top, got, want)
		}
		if want {
			seen[c] = true
			if !any || c > top {
				top, any = c, true
			}
		}
	}
}

func BenchmarkAcceptInOrder(b *testing.B) {
	var w Window
	var c uint64
	for b.Loop() {
		w.Accept(c)
		c++
	}
}
