package codec

import (
	"time"

	"github.com/pspd/pspd/keyexchange/kdf"
)

// Direction of an SA.
type Direction uint8

const (
	RX Direction = iota + 1
	TX
)

func (d Direction) String() string {
	if d == TX {
		return "tx"
	}
	return "rx"
}

// SAStats is a snapshot of one live SA. It holds no key material.
type SAStats struct {
	Dir     Direction
	SPI     kdf.SPI
	Suite   kdf.Suite
	Packets uint64 // RX: accepted; TX: sealed
	Bytes   uint64 // inner packet bytes
	// ExpiresIn is the time left before the SA stops being used: its
	// lifetime, or for an RX SA being replaced, its grace deadline.
	ExpiresIn time.Duration
	// Retiring marks an RX SA that a newer one replaces.
	Retiring bool
}

// Stats is a snapshot of a codec's counters.
type Stats struct {
	// Drops counts packets by reason; Drops[Pass] is always 0.
	Drops [NumDropReasons]uint64
	// Keepalives counts the empty packets that authenticated
	// (SealKeepalive's): Open reports them as DropEmpty, but nothing was
	// dropped.
	Keepalives uint64
	// SAs lists the TX SA (if any) first, then RX SAs oldest first.
	SAs []SAStats
}

// Stats returns a snapshot. Counters are read one by one while packets
// flow, so they are individually exact but not mutually atomic.
func (c *Codec) Stats() Stats {
	var s Stats
	for i := range s.Drops {
		s.Drops[i] = c.drops[i].Load()
	}
	s.Keepalives = c.keepalives.Load()
	now := c.clock()
	t := c.tab.Load()
	if t.tx != nil {
		s.SAs = append(s.SAs, SAStats{
			Dir: TX, SPI: t.tx.spi, Suite: t.tx.suite,
			Packets: t.tx.sent(c.hardPkts), Bytes: t.tx.bytes.Load(),
			ExpiresIn: t.tx.hardAt - now,
		})
	}
	for _, r := range t.rx {
		until := r.hardAt
		g := time.Duration(r.graceAt.Load())
		if g != 0 && g < until {
			until = g
		}
		s.SAs = append(s.SAs, SAStats{
			Dir: RX, SPI: r.spi, Suite: r.suite,
			Packets: r.packets.Load(), Bytes: r.bytes.Load(),
			ExpiresIn: until - now, Retiring: g != 0,
		})
	}
	return s
}
