package kdf

import (
	"errors"
	"fmt"
	"sync"

	"github.com/pspd/pspd/assoc"
)

// SPI is a PSP security parameter index; package assoc owns the type and
// documents its layout.
type SPI = assoc.SPI

// Role is the side of a session that allocated an SPI.
type Role = assoc.Role

const (
	Initiator = assoc.Initiator
	Responder = assoc.Responder

	// MaxKeyID is the largest key id an allocator hands out.
	MaxKeyID = assoc.MaxKeyID

	masterBit = 1 << 31
	roleBit   = 1 << 30
)

// MakeSPI builds an SPI. It returns an error for a zero or too-large key id.
func MakeSPI(master int, role Role, id uint32) (SPI, error) {
	if master != 0 && master != 1 {
		return 0, fmt.Errorf("kdf: master key index %d (want 0 or 1)", master)
	}
	if role > Responder {
		return 0, fmt.Errorf("kdf: role %d", role)
	}
	if id == 0 || id > MaxKeyID {
		return 0, fmt.Errorf("kdf: key id %d out of range 1..%d", id, MaxKeyID)
	}
	s := SPI(id)
	if master == 1 {
		s |= masterBit
	}
	if role == Responder {
		s |= roleBit
	}
	return s, nil
}

// ErrSPIExhausted means an allocator has handed out every key id for its
// master key and role; the session must be re-established (fresh master
// keys) before another association can be made.
var ErrSPIExhausted = errors.New("kdf: SPI space exhausted")

// Allocator hands out receive SPIs for one role under one master key,
// strictly increasing, never reusing one within a session. It is safe for
// concurrent use.
type Allocator struct {
	mu     sync.Mutex
	master int
	role   Role
	next   uint32
	limit  uint32
}

// NewAllocator returns an allocator for role under master key index master.
func NewAllocator(master int, role Role) (*Allocator, error) {
	if _, err := MakeSPI(master, role, 1); err != nil {
		return nil, err
	}
	return &Allocator{master: master, role: role, next: 1, limit: MaxKeyID}, nil
}

// NewAllocatorRange is NewAllocator restricted to key ids first..last.
// A session starts above the SPIs its predecessor still has installed
// (make-before-break keeps them alive for a grace period), and a caller can
// cap the SPIs per session to force fresh master keys long before the 2^30
// ids of a role run out.
func NewAllocatorRange(master int, role Role, first, last uint32) (*Allocator, error) {
	a, err := NewAllocator(master, role)
	if err != nil {
		return nil, err
	}
	if first == 0 || first > last || last > MaxKeyID {
		return nil, fmt.Errorf("kdf: allocator range %d..%d (want 1 <= first <= last <= %d)", first, last, MaxKeyID)
	}
	a.next, a.limit = first, last
	return a, nil
}

// Next returns a fresh SPI or ErrSPIExhausted.
func (a *Allocator) Next() (SPI, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.next == 0 || a.next > a.limit {
		return 0, fmt.Errorf("%w (master key %d, role %s, %d SPIs used)", ErrSPIExhausted, a.master, a.role, a.limit)
	}
	id := a.next
	a.next++
	return MakeSPI(a.master, a.role, id)
}

// Remaining reports how many SPIs are left.
func (a *Allocator) Remaining() uint32 {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.next == 0 || a.next > a.limit {
		return 0
	}
	return a.limit - a.next + 1
}
