// Package codec owns one peer's security associations in the userspace
// data plane and the packet transforms that use them: Seal turns an inner
// IPv4/IPv6 packet into an encrypted UDP payload, Open turns a received UDP
// payload back into the inner packet or a counted drop.
//
// The codec works on UDP payloads only; the I/O layer adds and strips the
// outer Ethernet/IP/UDP headers, sends to Codec.Framing().Port(), finds
// the peer of a received payload by wire.PeekSPI (or by outer address),
// and sets the inner MTU to the underlay's UDP payload size minus
// Overhead(). The byte layouts live in package wire and in
// docs/wire-format.md.
//
// # Packet API
//
// Seal and Open work in place: the caller leaves Headroom() bytes before
// and Tailroom() bytes after the inner packet, and gets back the span of
// the result in the same buffer. SealTo and OpenTo write into a separate
// buffer and produce byte-identical results. All four are safe for
// concurrent use from any number of queue goroutines and do not allocate.
// Stats returns per-reason drop counters and per-SA packet/byte counts.
//
// Open checks, in this order: header parse → SPI lookup → nonce prefix
// equals the SPI → PSP version equals the SA's suite → SA not expired →
// AEAD open → replay window → inner packet non-empty and a well-formed
// IPv4/IPv6 packet of the announced protocol. Only an authenticated counter
// moves the replay window, so forged packets cannot make the peer's real
// packets look old. Every refusal returns and counts a DropReason.
//
// # Install seam
//
// InstallRX and InstallTX copy the key of an SA (the caller keeps and
// wipes its own copy) and build the AEAD once. They refuse SPIs whose low
// 31 bits are zero, keys of the wrong length or all zero, a key equal to
// one of the other direction, a duplicate RX SPI, and any TX key that was
// installed before, live or long retired, under any SPI (its counter would
// restart at 0 under the same key: GCM nonce reuse). The record of earlier
// TX keys is a KeyHistory of fingerprints, shared by the codecs of a data
// plane through Config.TXKeys. Every new TX SA starts its counter at zero;
// the first packet carries counter 1, as the PSP reference does.
//
// Rekeying is make-before-break. A new RX SA is installed next to the
// old ones; the old ones are removed as soon as a packet authenticates
// under the new one (the peer has switched) or, at the latest, when
// Config.RXGrace has passed (Maintain does that). InstallTX switches TX at
// once: call it when the peer has the matching RX SA.
//
// Each TX SA has a packet budget and a lifetime. Past SoftPackets or
// SoftLifetime the codec sends one RekeyEvent on RekeyWanted(); at
// HardPackets or HardLifetime Seal fails closed. RX SAs expire at
// HardLifetime too. Time limits are enforced by timers that run Maintain
// at each deadline, so the packet path reads an atomic flag instead of
// the clock. Keys are wiped when their SA is removed or replaced.
// (The AES key schedule inside crypto/aes cannot be wiped from outside the
// standard library; it becomes garbage with the SA.)
package codec

import (
	"crypto/cipher"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/userspace/replay"
	"github.com/pspd/pspd/userspace/wire"
)

// Framing is re-exported so the I/O layer needs only this package.
type Framing = wire.Framing

// The framings.
const (
	Geneve    = wire.Geneve
	PSPTunnel = wire.PSPTunnel
)

// MaxRXSAs bounds the receive SAs of one peer: the live one, the one being
// introduced, and two more for a rekey racing a rekey. Installing a fifth
// retires the oldest: when rekeys come faster than the peer's traffic
// shows which SA it uses (one-way traffic, rotations seconds apart), the
// oldest generation is the one the peer left longest ago.
const MaxRXSAs = 4

// Defaults for Config fields left zero.
const (
	// DefaultHardPackets keeps the AES-GCM confidentiality bound small:
	// 2^40 packets of at most 2^7 blocks is σ = 2^47 blocks, an
	// advantage of about σ²/2^129 = 2^-35.
	DefaultHardPackets  = 1 << 40
	DefaultHardLifetime = time.Hour
	DefaultRXGrace      = 30 * time.Second
)

// Errors returned by Seal and SealTo. They carry no per-packet context so
// that returning them does not allocate.
var (
	ErrNoTXSA      = errors.New("codec: no TX SA installed")
	ErrKeyExpired  = errors.New("codec: TX key expired")
	ErrBudget      = errors.New("codec: TX key packet budget exhausted")
	ErrEmptyPacket = errors.New("codec: empty inner packet")
	ErrInnerPacket = errors.New("codec: inner packet is not one well-formed IPv4/IPv6 packet")
	ErrShortBuffer = errors.New("codec: buffer too small for header, packet and tag")
	ErrClosed      = errors.New("codec: closed")
	ErrOverlap     = errors.New("codec: SealTo destination overlaps the inner packet")
)

// Config configures a Codec. Zero fields take the defaults documented on
// each.
type Config struct {
	// Framing of every packet this peer sends and accepts. Required.
	Framing Framing
	// HardPackets is the number of packets a TX key may seal; the next
	// Seal fails with ErrBudget. Default DefaultHardPackets, at most
	// replay.RejectAfter.
	HardPackets uint64
	// SoftPackets is the low watermark that asks for a rekey. Default
	// HardPackets/2. Must be below HardPackets.
	SoftPackets uint64
	// HardLifetime is how long after install a key of either direction
	// is used. Default DefaultHardLifetime.
	HardLifetime time.Duration
	// SoftLifetime is when a TX key asks for a rekey. Default 3/4 of
	// HardLifetime. Must be below HardLifetime.
	SoftLifetime time.Duration
	// RXGrace is how long older RX SAs stay after a newer one is
	// installed if the peer is not seen on the newer one. Default
	// DefaultRXGrace.
	RXGrace time.Duration
	// ReorderGrace is how long older RX SAs still accept packets once the
	// peer has been seen on a newer one, for packets sealed before the
	// peer switched that arrive late (several TX queues, reordering
	// underlay). Default 0: retire them at once.
	ReorderGrace time.Duration
	// Now is the clock Maintain and Stats read; default time.Now. Only
	// differences between its readings are used. The deadline timers
	// that call Maintain run on real time.
	Now func() time.Time
	// Logger receives install/remove events (never key bytes). Default:
	// discard.
	Logger *slog.Logger
	// TXKeys is the record of TX keys installed before, which InstallTX
	// refuses to install again. Share one among all codecs of a data
	// plane: a peer's keys must stay refused after its codec is closed
	// (see KeyHistory). Default: a history of this codec's own.
	TXKeys *KeyHistory
}

// SA is one direction's security association as the control plane hands
// it over.
type SA struct {
	SPI   kdf.SPI
	Suite kdf.Suite
	// Key is copied by Install; the caller still owns it and wipes it.
	Key secret.Key
}

// RekeyReason says which limit a TX SA approached.
type RekeyReason uint8

const (
	RekeyPackets RekeyReason = iota + 1 // SoftPackets reached
	RekeyTime                           // SoftLifetime reached
)

func (r RekeyReason) String() string {
	switch r {
	case RekeyPackets:
		return "packet budget"
	case RekeyTime:
		return "lifetime"
	}
	return fmt.Sprintf("rekey-reason(%d)", uint8(r))
}

// RekeyEvent asks the control plane for a new TX SA.
type RekeyEvent struct {
	TXSPI  kdf.SPI
	Reason RekeyReason
}

// Codec holds one peer's SAs. Create it with New.
type Codec struct {
	framing  Framing
	hdrLen   int
	hardPkts uint64
	softPkts uint64
	hardLife time.Duration
	softLife time.Duration
	grace    time.Duration
	reorder  time.Duration
	now      func() time.Time
	epoch    time.Time // clock readings become durations since epoch
	// afterFunc arms the timers that enforce lifetimes without a clock
	// read per packet; tests replace it with their fake clock's.
	afterFunc func(time.Duration, func()) (stop func() bool)
	log       *slog.Logger
	rekey     chan RekeyEvent
	txKeys    *KeyHistory

	mu     sync.Mutex // serialises writers of tab
	closed bool
	tab    atomic.Pointer[table]

	drops [NumDropReasons]atomic.Uint64
	// keepalives counts authenticated empty packets, which Open reports
	// as DropEmpty but which drop nothing.
	keepalives atomic.Uint64
}

// table is an immutable snapshot of the SAs; writers replace it whole so
// the packet path reads it with one atomic load and no lock.
type table struct {
	tx        *txSA
	rx        []*rxSA // oldest first
	txExpired bool    // tx is nil because the last one expired
}

type txSA struct {
	spi      kdf.SPI
	suite    kdf.Suite
	aead     cipher.AEAD
	key      secret.Key
	softAt   time.Duration
	hardAt   time.Duration
	counter  atomic.Uint64 // last counter handed out
	bytes    atomic.Uint64
	askedPkt atomic.Bool
	askedAge atomic.Bool
	off      atomic.Bool   // expired or removed: Seal refuses
	stops    []func() bool // its timers; written under Codec.mu
}

type rxSA struct {
	spi     kdf.SPI
	suite   kdf.Suite
	aead    cipher.AEAD
	key     secret.Key
	hardAt  time.Duration
	graceAt atomic.Int64 // time.Duration; 0 = no grace deadline
	off     atomic.Bool  // expired or removed: Open drops
	stops   []func() bool
	seen    atomic.Bool // a packet authenticated under it
	packets atomic.Uint64
	bytes   atomic.Uint64

	mu  sync.Mutex // guards win only
	win replay.Window
}

// New returns a Codec with no SAs.
func New(cfg Config) (*Codec, error) {
	if !cfg.Framing.Valid() {
		return nil, fmt.Errorf("codec: config: Framing %v is not geneve or psp-tunnel", cfg.Framing)
	}
	c := &Codec{
		framing:  cfg.Framing,
		hdrLen:   cfg.Framing.HeaderLen(),
		hardPkts: cfg.HardPackets,
		softPkts: cfg.SoftPackets,
		hardLife: cfg.HardLifetime,
		softLife: cfg.SoftLifetime,
		grace:    cfg.RXGrace,
		reorder:  cfg.ReorderGrace,
		now:      cfg.Now,
		log:      cfg.Logger,
		rekey:    make(chan RekeyEvent, 1),
		txKeys:   cfg.TXKeys,
	}
	if c.hardPkts == 0 {
		c.hardPkts = DefaultHardPackets
	}
	if c.hardPkts > replay.RejectAfter {
		return nil, fmt.Errorf("codec: config: HardPackets %d above the replay window limit %d", c.hardPkts, uint64(replay.RejectAfter))
	}
	if c.softPkts == 0 {
		c.softPkts = c.hardPkts / 2
	}
	if c.softPkts >= c.hardPkts {
		return nil, fmt.Errorf("codec: config: SoftPackets %d must be below HardPackets %d", c.softPkts, c.hardPkts)
	}
	if c.hardLife == 0 {
		c.hardLife = DefaultHardLifetime
	}
	if c.softLife == 0 {
		c.softLife = c.hardLife / 4 * 3
	}
	if c.hardLife < 0 || c.softLife <= 0 || c.softLife >= c.hardLife {
		return nil, fmt.Errorf("codec: config: want 0 < SoftLifetime (%v) < HardLifetime (%v)", c.softLife, c.hardLife)
	}
	if c.grace == 0 {
		c.grace = DefaultRXGrace
	}
	if c.grace < 0 {
		return nil, fmt.Errorf("codec: config: RXGrace %v is negative", c.grace)
	}
	if c.reorder < 0 || c.reorder > c.grace {
		return nil, fmt.Errorf("codec: config: want 0 <= ReorderGrace (%v) <= RXGrace (%v)", c.reorder, c.grace)
	}
	if c.now == nil {
		c.now = time.Now
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	if c.txKeys == nil {
		c.txKeys = NewKeyHistory()
	}
	c.epoch = c.now()
	c.afterFunc = func(d time.Duration, f func()) func() bool { return time.AfterFunc(d, f).Stop }
	c.tab.Store(&table{})
	return c, nil
}

// Framing is the codec's framing; its Port() is the UDP port to send to.
func (c *Codec) Framing() Framing { return c.framing }

// Headroom is the number of bytes Seal needs before the inner packet.
func (c *Codec) Headroom() int { return c.hdrLen }

// Tailroom is the number of bytes Seal needs after the inner packet.
func (c *Codec) Tailroom() int { return wire.TagLen }

// Overhead is what sealing adds to an inner packet: the inner MTU is the
// underlay's UDP payload size minus Overhead.
func (c *Codec) Overhead() int { return c.hdrLen + wire.TagLen }

// RekeyWanted delivers at most one pending event; the codec never blocks
// on it, so a slow reader sees the latest reason only once.
func (c *Codec) RekeyWanted() <-chan RekeyEvent { return c.rekey }

func (c *Codec) clock() time.Duration { return c.now().Sub(c.epoch) }

func (c *Codec) askRekey(spi kdf.SPI, r RekeyReason) {
	select {
	case c.rekey <- RekeyEvent{TXSPI: spi, Reason: r}:
	default:
	}
}
