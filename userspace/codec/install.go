package codec

import (
	"crypto/aes"
	"crypto/cipher"
	"fmt"
	"slices"
	"time"

	"github.com/pspd/pspd/keyexchange/kdf"
)

func (c *Codec) checkSA(sa SA) error {
	if sa.SPI.KeyID() == 0 {
		return fmt.Errorf("SPI %v: low 31 bits must be non-zero", sa.SPI)
	}
	if !sa.Suite.Valid() {
		return fmt.Errorf("suite %v is not aes-gcm-128 or aes-gcm-256", sa.Suite)
	}
	if sa.Key.Len() != sa.Suite.KeyLen() {
		return fmt.Errorf("key is %d bytes, suite %v needs %d", sa.Key.Len(), sa.Suite, sa.Suite.KeyLen())
	}
	if sa.Key.IsZero() {
		return fmt.Errorf("key is all zero (wiped?)")
	}
	return nil
}

func newAEAD(sa SA) (cipher.AEAD, error) {
	b, err := aes.NewCipher(sa.Key.Bytes())
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

// InstallRX adds a receive SA. Older RX SAs stay until the peer is seen on
// this one or Config.RXGrace passes.
func (c *Codec) InstallRX(sa SA) error {
	if err := c.checkSA(sa); err != nil {
		return fmt.Errorf("codec: install RX spi=%v: %w", sa.SPI, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return fmt.Errorf("codec: install RX spi=%v: %w", sa.SPI, ErrClosed)
	}
	old := c.tab.Load()
	for _, r := range old.rx {
		if r.spi == sa.SPI {
			return fmt.Errorf("codec: install RX spi=%v: SPI already installed", sa.SPI)
		}
	}
	if old.tx != nil && old.tx.key.Equal(sa.Key) {
		return fmt.Errorf("codec: install RX spi=%v: key equals the TX key (spi=%v); directions need distinct keys", sa.SPI, old.tx.spi)
	}
	aead, err := newAEAD(sa)
	if err != nil {
		return fmt.Errorf("codec: install RX spi=%v: %w", sa.SPI, err)
	}
	if len(old.rx) >= MaxRXSAs {
		evict := old.rx[:len(old.rx)-MaxRXSAs+1]
		c.removeRXLocked(func(r *rxSA) bool { return slices.Contains(evict, r) }, "retired: too many generations live")
		old = c.tab.Load()
	}
	now := c.clock()
	r := &rxSA{spi: sa.SPI, suite: sa.Suite, aead: aead, key: sa.Key.Clone(), hardAt: now + c.hardLife}
	r.stops = append(r.stops, c.afterFunc(c.hardLife, c.Maintain))
	// Deadlines only grow, so an SA keeps the grace of the first SA that
	// superseded it.
	for _, o := range old.rx {
		if o.graceAt.Load() == 0 {
			o.graceAt.Store(int64(now + c.grace))
			o.stops = append(o.stops, c.afterFunc(c.grace, c.Maintain))
		}
	}
	c.tab.Store(&table{tx: old.tx, rx: append(append([]*rxSA(nil), old.rx...), r)})
	c.log.Info("codec: RX SA installed", "spi", sa.SPI, "suite", sa.Suite, "framing", c.framing, "older", len(old.rx))
	return nil
}

// InstallTX makes sa the TX SA at once, with its counter at zero, and
// wipes the previous one. Call it when the peer has the matching RX SA.
func (c *Codec) InstallTX(sa SA) error {
	if err := c.checkSA(sa); err != nil {
		return fmt.Errorf("codec: install TX spi=%v: %w", sa.SPI, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return fmt.Errorf("codec: install TX spi=%v: %w", sa.SPI, ErrClosed)
	}
	old := c.tab.Load()
	if old.tx != nil && old.tx.spi == sa.SPI && old.tx.key.Equal(sa.Key) {
		return fmt.Errorf("codec: install TX spi=%v: this SA is already the live TX SA; re-installing would restart its counter (nonce reuse)", sa.SPI)
	}
	for _, r := range old.rx {
		if r.key.Equal(sa.Key) {
			return fmt.Errorf("codec: install TX spi=%v: key equals the key of RX spi=%v; directions need distinct keys", sa.SPI, r.spi)
		}
	}
	aead, err := newAEAD(sa)
	if err != nil {
		return fmt.Errorf("codec: install TX spi=%v: %w", sa.SPI, err)
	}
	// Last, so that only a key that goes live is recorded.
	if !c.txKeys.add(sa.Key) {
		return fmt.Errorf("codec: install TX spi=%v: key was installed before as a TX key (sealing under it again would repeat its nonces: nonce reuse); renegotiate so that the key exchange derives a fresh key", sa.SPI)
	}
	now := c.clock()
	t := &txSA{spi: sa.SPI, suite: sa.Suite, aead: aead, key: sa.Key.Clone(), softAt: now + c.softLife, hardAt: now + c.hardLife}
	t.stops = append(t.stops, c.afterFunc(c.softLife, c.Maintain), c.afterFunc(c.hardLife, c.Maintain))
	c.tab.Store(&table{tx: t, rx: old.rx})
	if old.tx != nil {
		old.tx.retire()
		c.log.Info("codec: TX SA replaced", "old_spi", old.tx.spi, "packets", old.tx.sent(c.hardPkts))
	}
	c.log.Info("codec: TX SA installed", "spi", sa.SPI, "suite", sa.Suite, "framing", c.framing)
	return nil
}

// RemoveRX removes the RX SA with spi and wipes its key. It reports
// whether there was one.
func (c *Codec) RemoveRX(spi kdf.SPI) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.removeRXLocked(func(r *rxSA) bool { return r.spi == spi }, "removed")
	return n > 0
}

// removeRXLocked drops every RX SA for which gone is true.
func (c *Codec) removeRXLocked(gone func(*rxSA) bool, why string) int {
	old := c.tab.Load()
	keep := make([]*rxSA, 0, len(old.rx))
	var removed []*rxSA
	for _, r := range old.rx {
		if gone(r) {
			removed = append(removed, r)
		} else {
			keep = append(keep, r)
		}
	}
	if len(removed) == 0 {
		return 0
	}
	c.tab.Store(&table{tx: old.tx, rx: keep, txExpired: old.txExpired})
	for _, r := range removed {
		r.off.Store(true)
		stopAll(r.stops)
		r.key.Wipe()
		c.log.Info("codec: RX SA "+why, "spi", r.spi, "packets", r.packets.Load())
	}
	return len(removed)
}

// peerSeen retires the RX SAs older than r: the peer has switched to r.
func (c *Codec) peerSeen(r *rxSA) {
	if !r.seen.CompareAndSwap(false, true) {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.reorder > 0 {
		deadline := int64(c.clock() + c.reorder)
		for _, o := range c.tab.Load().rx {
			if o == r {
				break
			}
			if o.graceAt.Load() > deadline {
				o.graceAt.Store(deadline)
				o.stops = append(o.stops, c.afterFunc(c.reorder, c.Maintain))
			}
		}
		return
	}
	older := true
	c.removeRXLocked(func(o *rxSA) bool {
		if o == r {
			older = false
		}
		return older
	}, "retired: peer uses a newer SA")
}

// Maintain enforces the time limits: it removes RX SAs past their grace
// deadline or lifetime, removes an expired TX SA, and asks for a rekey
// when the TX SA reaches SoftLifetime. The codec's timers call it at each
// deadline; calling it more often is harmless.
func (c *Codec) Maintain() {
	now := c.clock()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.removeRXLocked(func(r *rxSA) bool { return r.expiredAt(now) }, "expired")
	t := c.tab.Load()
	if t.tx == nil {
		return
	}
	if now >= t.tx.hardAt {
		c.tab.Store(&table{rx: t.rx, txExpired: true})
		t.tx.retire()
		c.log.Warn("codec: TX SA expired without a rekey; TX stops until a new SA is installed", "spi", t.tx.spi)
		// Maintain may run late for both deadlines at once (a descheduled
		// process, a clock jump); the control plane must hear of it.
		if t.tx.askedAge.CompareAndSwap(false, true) {
			c.askRekey(t.tx.spi, RekeyTime)
		}
		return
	}
	if now >= t.tx.softAt && t.tx.askedAge.CompareAndSwap(false, true) {
		c.askRekey(t.tx.spi, RekeyTime)
	}
}

// Close removes every SA and wipes their keys. Later installs fail and
// Seal/Open drop.
func (c *Codec) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	c.removeRXLocked(func(*rxSA) bool { return true }, "removed on close")
	if t := c.tab.Load(); t.tx != nil {
		t.tx.retire()
	}
	c.tab.Store(&table{})
}

func (r *rxSA) expiredAt(now time.Duration) bool {
	if now >= r.hardAt {
		return true
	}
	g := r.graceAt.Load()
	return g != 0 && int64(now) >= g
}

// retire makes t unusable and wipes its key. The caller has already
// unpublished t; a Seal that loaded it before sees off or, if it raced
// past that check, uses the AEAD, which does not read the key bytes.
func (t *txSA) retire() {
	t.off.Store(true)
	stopAll(t.stops)
	t.key.Wipe()
}

func stopAll(stops []func() bool) {
	for _, s := range stops {
		s()
	}
}

// sent is the number of packets sealed under t.
func (t *txSA) sent(hard uint64) uint64 { return min(t.counter.Load(), hard) }
