package daemon

import (
	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/offload"
)

// traffic keeps a peer's counters cumulative. A data plane counts per SA,
// and a rekey replaces the SA, so the daemon adds each SA's final counts
// to running totals as it is removed and the live SAs' current counts
// on top. Guarded by peer.bmu, which the installer holds.
type traffic struct {
	live    map[liveKey]assoc.SA // installed SAs, without keys
	retired offload.Traffic      // every removed SA of the peer
	byAssoc map[assoc.ID]offload.Traffic
}

type liveKey struct {
	b  assoc.Backend
	rx assoc.SPI
}

func addTraffic(a *offload.Traffic, b offload.Traffic) {
	a.BytesIn += b.BytesIn
	a.BytesOut += b.BytesOut
	a.PacketsIn += b.PacketsIn
	a.PacketsOut += b.PacketsOut
	a.Drops += b.Drops
}

func counters(t offload.Traffic) localapi.Counters {
	return localapi.Counters{BytesIn: t.BytesIn, BytesOut: t.BytesOut, PacketsIn: t.PacketsIn, PacketsOut: t.PacketsOut, Drops: t.Drops}
}

// installed notes an SA backend b took.
func (t *traffic) installed(b assoc.Backend, sa *assoc.SA) {
	if t.live == nil {
		t.live, t.byAssoc = map[liveKey]assoc.SA{}, map[assoc.ID]offload.Traffic{}
	}
	t.live[liveKey{b, sa.RxSPI}] = sa.WithoutKeys()
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
	for _, sa := range t.live {
		if sa.ID == id {
			return true
		}
	}
	return false
}

// removed adds final, what backend b counted for sa just before removing
// it, to the totals. It reports whether sa was installed.
func (t *traffic) removed(b assoc.Backend, sa *assoc.SA, final offload.Traffic) bool {
	k := liveKey{b, sa.RxSPI}
	if _, ok := t.live[k]; !ok {
		return false // never installed here (a failed install being undone)
	}
	delete(t.live, k)
	addTraffic(&t.retired, final)
	a := t.byAssoc[sa.ID]
	addTraffic(&a, final)
	t.byAssoc[sa.ID] = a
	return true
}

// totals are the peer's counters, those of association id over its
// generations, and those of its generation gen alone.
func (d *Daemon) totals(p *peer, id assoc.ID, gen uint32) (all, ofAssoc, ofGen offload.Traffic) {
	p.bmu.Lock()
	defer p.bmu.Unlock()
	t := &p.traffic
	all, ofAssoc = t.retired, t.byAssoc[id]
	for k, sa := range t.live {
		b := d.backends[k.b]
		if b == nil {
			continue
		}
		c, ok := b.Traffic(&sa)
		if !ok {
			continue
		}
		addTraffic(&all, c)
		if sa.ID == id {
			addTraffic(&ofAssoc, c)
			if sa.Generation == gen {
				ofGen = c
			}
		}
	}
	return all, ofAssoc, ofGen
}
