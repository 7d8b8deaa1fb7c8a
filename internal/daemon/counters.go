package daemon

import (
	"time"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/offload"
)

// traffic keeps a peer's byte and packet counters cumulative. A data
// plane counts per SA, and a rekey replaces the SA, so the daemon keeps
// the highest counts it has seen of each installed SA and adds them to
// running totals when the SA is removed. Data planes may forget an SA's
// counts before its removal (the userspace codec keeps one TX SA: the
// next Activate replaces it), so every SA of the peer is read before each
// Install, Activate and Remove, and at every query. Guarded by peer.bmu,
// which the installer holds.
type traffic struct {
	live    map[liveKey]*liveSA
	current *liveKey        // the generation in use, once the key exchange confirmed it
	retired offload.Traffic // every removed SA of the peer
	byAssoc map[assoc.ID]offload.Traffic
}

type liveKey struct {
	b  assoc.Backend
	rx assoc.SPI
}

type liveSA struct {
	sa   assoc.SA        // without keys
	seen offload.Traffic // the highest counts read, per field
}

// addTraffic adds b's counts to a; the last-packet times are the later of
// the two.
func addTraffic(a *offload.Traffic, b offload.Traffic) {
	a.BytesIn += b.BytesIn
	a.BytesOut += b.BytesOut
	a.PacketsIn += b.PacketsIn
	a.PacketsOut += b.PacketsOut
	a.LastIn, a.LastOut = later(a.LastIn, b.LastIn), later(a.LastOut, b.LastOut)
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

func counters(t offload.Traffic) localapi.Counters {
	return localapi.Counters{BytesIn: t.BytesIn, BytesOut: t.BytesOut, PacketsIn: t.PacketsIn, PacketsOut: t.PacketsOut, Drops: t.Drops,
		LastIn: t.LastIn, LastOut: t.LastOut}
}

// sample reads the counts of every SA of the peer into their high-water
// marks.
func (t *traffic) sample(backends map[assoc.Backend]offload.Backend) {
	for k, l := range t.live {
		b := backends[k.b]
		if b == nil {
			continue
		}
		c, ok := b.Traffic(&l.sa)
		if !ok {
			continue
		}
		s := &l.seen
		s.BytesIn, s.BytesOut = max(s.BytesIn, c.BytesIn), max(s.BytesOut, c.BytesOut)
		s.PacketsIn, s.PacketsOut = max(s.PacketsIn, c.PacketsIn), max(s.PacketsOut, c.PacketsOut)
		s.LastIn, s.LastOut = later(s.LastIn, c.LastIn), later(s.LastOut, c.LastOut)
		s.Drops = c.Drops // as the data plane counts them now (see Counters)
	}
}

// installed notes an SA backend b took.
func (t *traffic) installed(b assoc.Backend, sa *assoc.SA) {
	if t.live == nil {
		t.live, t.byAssoc = map[liveKey]*liveSA{}, map[assoc.ID]offload.Traffic{}
	}
	t.live[liveKey{b, sa.RxSPI}] = &liveSA{sa: sa.WithoutKeys()}
	// Totals of associations that have nothing installed any more and
	// are not this one are only in the peer's totals from now on: a new
	// session brings a new association, and the map stays small.
	for id := range t.byAssoc {
		if id != sa.ID && !t.hasLive(id) {
			delete(t.byAssoc, id)
		}
	}
}

func (t *traffic) hasLive(id assoc.ID) bool {
	for _, l := range t.live {
		if l.sa.ID == id {
			return true
		}
	}
	return false
}

// removed adds what sa carried, as last sampled, to the totals. It
// reports whether sa was the generation in use.
func (t *traffic) removed(b assoc.Backend, sa *assoc.SA) bool {
	k := liveKey{b, sa.RxSPI}
	l, ok := t.live[k]
	if !ok {
		return false // never installed here (a failed install being undone)
	}
	delete(t.live, k)
	wasCurrent := t.current != nil && *t.current == k
	if wasCurrent {
		t.current = nil
	}
	addTraffic(&t.retired, l.seen)
	a := t.byAssoc[sa.ID]
	addTraffic(&a, l.seen)
	t.byAssoc[sa.ID] = a
	return wasCurrent
}

// confirmed notes the generation now in use.
func (t *traffic) confirmed(sa *assoc.SA) {
	k := liveKey{sa.Backend, sa.RxSPI}
	if _, ok := t.live[k]; ok {
		t.current = &k
	}
}

// totals are the peer's counters, those of association id over its
// generations, and those of its generation gen alone. Drops are the data
// plane's count for generation gen (per SA for XFRM, per peer for the
// userspace data plane), not a sum.
func (d *Daemon) totals(p *peer, id assoc.ID, gen uint32) (all, ofAssoc, ofGen offload.Traffic) {
	p.bmu.Lock()
	defer p.bmu.Unlock()
	t := &p.traffic
	t.sample(d.backends)
	all, ofAssoc = t.retired, t.byAssoc[id]
	for _, l := range t.live {
		addTraffic(&all, l.seen)
		if l.sa.ID == id {
			addTraffic(&ofAssoc, l.seen)
			if l.sa.Generation == gen {
				ofGen = l.seen
			}
		}
	}
	all.Drops, ofAssoc.Drops = ofGen.Drops, ofGen.Drops
	return all, ofAssoc, ofGen
}
