package psp

import (
	"fmt"
	"sync"

	"github.com/pspd/pspd/keyexchange/identity"
)

// connTable is the one record of upgraded connections that are still
// open, keyed by socket cookie: a closed socket's entry goes at the next
// sweep (and before any event about its device is reported), and a new
// socket that reuses a closed one's 4-tuple is a different entry.
type connTable struct {
	mu sync.Mutex
	m  map[uint64]*conn
}

type conn struct {
	cookie    uint64
	t         tuple
	peer      identity.PublicKey
	dev       uint32
	rotations int // device-key rotations since the upgrade
}

func newConnTable() *connTable { return &connTable{m: map[uint64]*conn{}} }

func (ct *connTable) has(cookie uint64) bool {
	ct.mu.Lock()
	defer ct.mu.Unlock()
	return ct.m[cookie] != nil
}

func (ct *connTable) add(c *conn) {
	ct.mu.Lock()
	defer ct.mu.Unlock()
	ct.m[c.cookie] = c
}

func (ct *connTable) len() int {
	ct.mu.Lock()
	defer ct.mu.Unlock()
	return len(ct.m)
}

// sweep drops the entries whose socket is not in live; it returns how
// many it dropped.
func (ct *connTable) sweep(live map[uint64]struct{}) int {
	ct.mu.Lock()
	defer ct.mu.Unlock()
	n := 0
	for k := range ct.m {
		if _, ok := live[k]; !ok {
			delete(ct.m, k)
			n++
		}
	}
	return n
}

// rotated counts n rotations of device dev's key (more than one when
// notifications were lost) and returns the events for the connections
// through it: the first rotation dooms a connection, the second kills
// it, and a dead connection leaves the table.
func (ct *connTable) rotated(dev uint32, n int) []Event {
	ct.mu.Lock()
	defer ct.mu.Unlock()
	var evs []Event
	for k, c := range ct.m {
		if c.dev != dev {
			continue
		}
		c.rotations += n
		if c.rotations == 1 {
			evs = append(evs, c.event("psp-stale-soon", fmt.Sprintf("connection %s: re-establish before device %d rotates again", c.t, dev)))
			continue
		}
		evs = append(evs, c.event("psp-stale", fmt.Sprintf("connection %s can no longer receive: device %d rotated its key twice since the upgrade", c.t, dev)))
		delete(ct.m, k)
	}
	return evs
}

// removed drops the connections through device dev, which the kernel has
// unregistered (their keys are stale, their TX gone), and returns an
// event for each.
func (ct *connTable) removed(dev uint32) []Event {
	ct.mu.Lock()
	defer ct.mu.Unlock()
	var evs []Event
	for k, c := range ct.m {
		if c.dev != dev {
			continue
		}
		evs = append(evs, c.event("psp-stale", fmt.Sprintf("connection %s lost PSP: device %d was removed", c.t, dev)))
		delete(ct.m, k)
	}
	return evs
}

func (c *conn) event(kind, detail string) Event {
	return Event{Kind: kind, Detail: detail, Device: c.dev, Peer: c.peer, Local: c.t.local, Remote: c.t.remote}
}
