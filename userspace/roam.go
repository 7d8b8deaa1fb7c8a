package userspace

import (
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/pspd/pspd/userspace/codec"
	"github.com/pspd/pspd/userspace/wire"
)

// Roaming, as WireGuard does it: a received packet belongs to the peer
// whose codec authenticates it, wherever it came from, and the peer's
// send address follows the newest authenticated packet. The outer source
// address is only a hint that picks the peer to try first; it is believed
// only after the packet authenticated, so a forged packet (a valid SPI,
// a bad tag) from a new address moves nothing, and a replayed or delayed
// one is refused by the replay window or is not newer than what the peer
// already sent.
//
// A packet from a peer's current address whose SPI that peer's codec has
// is that peer's to open and no other's: the hot path costs one map
// look-up and one AEAD open, as before roaming. A packet from any other
// address is found by its SPI in an index of every peer's receive SPIs.
// The codecs install SAs without the engine seeing it, so the index is
// rebuilt when an SPI misses it, at most every spiIndexInterval: a spray
// of unknown SPIs from unknown addresses costs a map look-up per packet
// and ten index builds a second, not a scan of every peer per packet; a
// peer that roams right after a rekey waits at most that interval.
//
// The key exchange hands out receive SPIs once per host, so an SPI has
// one peer; should two peers' codecs hold the same SPI anyway, the packet
// is tried with each (one AEAD open each, on a copy but for the last). A
// limit follows: a peer that roams onto the exact address and port
// another peer holds, under an SPI that other peer also has, is not
// recognised until one of them moves.

// roaming is a peer's current send address and what the RX loop knows of
// the newest packet it authenticated. Only the RX loop writes it; the TX
// loop and Stats read cur and moves.
type roaming struct {
	cur   atomic.Pointer[netip.AddrPort]
	moves atomic.Uint64

	// RX loop only. newest is the SA and counter of the newest
	// authenticated packet; retired are SAs the peer has moved on from,
	// whose packets are late by definition.
	haveNewest bool
	newestSPI  uint32
	newestCtr  uint64
	retired    [codec.MaxRXSAs]uint32
	nextRetire int
	// A flapping path logs at most movesLogged moves a second.
	logSince time.Time
	logCount int
}

const movesLogged = 4

func newRoaming(ep netip.AddrPort) *roaming {
	r := &roaming{}
	r.cur.Store(&ep)
	return r
}

func (r *roaming) current() netip.AddrPort { return *r.cur.Load() }

// observe records an authenticated, replay-checked packet under spi with
// counter ctr and reports whether it is the newest the peer has sent:
// later on the newest SA, or the first on an SA the peer had not yet used
// (a rekey).
func (r *roaming) observe(spi uint32, ctr uint64) bool {
	switch {
	case r.haveNewest && spi == r.newestSPI:
		if ctr <= r.newestCtr {
			return false
		}
	case r.isRetired(spi):
		return false
	default:
		if r.haveNewest {
			r.retired[r.nextRetire] = r.newestSPI
			r.nextRetire = (r.nextRetire + 1) % len(r.retired)
		}
		r.haveNewest, r.newestSPI = true, spi
	}
	r.newestCtr = ctr
	return true
}

func (r *roaming) isRetired(spi uint32) bool {
	for _, s := range r.retired {
		if s == spi && s != 0 {
			return true
		}
	}
	return false
}

// open authenticates the payload of m and returns its peer and inner
// packet, or a nil packet if it was dropped (and counted). The packet lies
// in m.Buf either way.
func (d *Dataplane) open(t *table, s *rxState, m *Message) (*peer, []byte) {
	f := d.cfg.Framing
	payload := m.Payload()
	h, err := wire.Parse(f, payload)
	if err != nil {
		// No SPI to find a peer by: count it where the old engine did,
		// against the peer at the source, if any.
		if p := t.bySource[m.Addr]; p != nil {
			p.Codec.Open(f, m.Buf, m.Off, m.N)
		} else {
			d.drops[DropNoPeer].Add(1)
		}
		return nil, nil
	}
	if p := t.bySource[m.Addr]; p != nil && p.Codec.HasRX(h.SPI) {
		start, length, reason := p.Codec.Open(f, m.Buf, m.Off, m.N)
		if !authenticated(reason) {
			return nil, nil
		}
		p.roam.observe(h.SPI, h.Counter)
		if reason != codec.Pass {
			return nil, nil // a keep-alive: authenticated, nothing to deliver
		}
		return p, m.Buf[start : start+length]
	}

	s.candidates(t, h.SPI)
	if len(s.cands) == 0 && time.Since(s.indexed) >= spiIndexInterval {
		s.reindex(t)
		s.candidates(t, h.SPI)
	}
	defer clear(s.cands) // do not pin removed peers
	if len(s.cands) == 0 {
		if p := t.bySource[m.Addr]; p != nil {
			p.Codec.Open(f, m.Buf, m.Off, m.N) // counted as its unknown SPI
		} else {
			d.drops[DropNoPeer].Add(1)
		}
		return nil, nil
	}
	for i, p := range s.cands {
		var (
			pkt    []byte
			reason codec.DropReason
		)
		if i < len(s.cands)-1 {
			// A failed open leaves its buffer unspecified, so every
			// candidate but the last opens a copy.
			var n int
			n, reason = p.Codec.OpenTo(f, s.scratch, payload)
			if authenticated(reason) {
				pkt = m.Buf[:copy(m.Buf, s.scratch[:n])]
			}
		} else {
			var start, length int
			start, length, reason = p.Codec.Open(f, m.Buf, m.Off, m.N)
			pkt = m.Buf[start : start+length]
		}
		if !authenticated(reason) {
			continue
		}
		if p.roam.observe(h.SPI, h.Counter) && m.Addr != p.roam.current() {
			d.moved(p, m.Addr)
		}
		if reason != codec.Pass {
			return nil, nil
		}
		return p, pkt
	}
	return nil, nil
}

// spiIndexInterval is the least time between two builds of the RX loop's
// SPI index.
const spiIndexInterval = 100 * time.Millisecond

// candidates sets s.cands to the peers of t that may own spi: in the
// index, still in the table, and with an SA of spi now.
func (s *rxState) candidates(t *table, spi uint32) {
	s.cands = s.cands[:0]
	for _, p := range s.bySPI[spi] {
		if t.byEndpoint[p.Endpoint] == p && p.Codec.HasRX(spi) {
			s.cands = append(s.cands, p)
		}
	}
}

// reindex rebuilds s.bySPI from every peer's codec.
func (s *rxState) reindex(t *table) {
	clear(s.bySPI)
	for _, p := range t.byEndpoint {
		s.spiBuf = p.Codec.AppendRXSPIs(s.spiBuf[:0])
		for _, spi := range s.spiBuf {
			s.bySPI[spi] = append(s.bySPI[spi], p)
		}
	}
	s.indexed = time.Now()
}

// authenticated reports whether a codec verdict means the packet passed
// the AEAD and the replay window: delivered, or an empty keep-alive.
func authenticated(r codec.DropReason) bool { return r == codec.Pass || r == codec.DropEmpty }

// moved makes src p's send address and the source its packets are looked
// up by first.
func (d *Dataplane) moved(p *peer, src netip.AddrPort) {
	d.mu.Lock()
	defer d.mu.Unlock()
	t := d.table.Load()
	if t.byEndpoint[p.Endpoint] != p {
		return // removed or replaced meanwhile
	}
	old := p.roam.current()
	nt := &table{byEndpoint: t.byEndpoint, routes: t.routes, bySource: make(map[netip.AddrPort]*peer, len(t.bySource))}
	for a, q := range t.bySource {
		if q != p {
			nt.bySource[a] = q
		}
	}
	nt.bySource[src] = p
	p.roam.cur.Store(&src)
	p.roam.moves.Add(1)
	d.table.Store(nt)
	r := p.roam
	if now := time.Now(); now.Sub(r.logSince) >= time.Second {
		r.logSince, r.logCount = now, 0
	}
	if r.logCount < movesLogged {
		r.logCount++
		d.log.Info("userspace: peer endpoint moved: an authenticated packet came from a new address",
			"peer", p.Endpoint, "from", old, "to", src, "moves", r.moves.Load())
	}
}
