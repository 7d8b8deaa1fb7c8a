package codec

import (
	"github.com/pspd/pspd/userspace/wire"
)

// Seal encrypts the inner packet buf[off:off+n] in place. It writes the
// header into buf[off-Headroom():off] and the tag into
// buf[off+n:off+n+Tailroom()], and returns the UDP payload span
// buf[start:start+length]. On error nothing in buf is changed and no
// counter is used, except that ErrBudget uses up the counter it refused.
func (c *Codec) Seal(buf []byte, off, n int) (start, length int, err error) {
	if off < c.hdrLen || n < 0 || off > len(buf) || n > len(buf)-off-wire.TagLen {
		return 0, 0, c.txFail(ErrShortBuffer)
	}
	inner := buf[off : off+n]
	sa, proto, err := c.txPrepare(inner)
	if err != nil {
		return 0, 0, c.txFail(err)
	}
	ctr, err := c.nextCounter(sa)
	if err != nil {
		return 0, 0, c.txFail(err)
	}
	hdr := buf[off-c.hdrLen : off]
	c.putHeader(hdr, sa, proto, ctr)
	sa.aead.Seal(inner[:0], hdr[c.nonceOff():c.nonceOff()+wire.NonceLen], inner, hdr)
	sa.bytes.Add(uint64(n))
	return off - c.hdrLen, c.hdrLen + n + wire.TagLen, nil
}

// SealTo encrypts inner into dst and returns the UDP payload length
// written to dst[:length]. The bytes are those Seal would produce for the
// same counter. A dst that overlaps inner is refused with ErrOverlap.
func (c *Codec) SealTo(dst, inner []byte) (length int, err error) {
	need := c.hdrLen + len(inner) + wire.TagLen
	if len(dst) < need {
		return 0, c.txFail(ErrShortBuffer)
	}
	if anyOverlap(dst[:need], inner) {
		return 0, c.txFail(ErrOverlap)
	}
	sa, proto, err := c.txPrepare(inner)
	if err != nil {
		return 0, c.txFail(err)
	}
	ctr, err := c.nextCounter(sa)
	if err != nil {
		return 0, c.txFail(err)
	}
	hdr := dst[:c.hdrLen]
	c.putHeader(hdr, sa, proto, ctr)
	sa.aead.Seal(dst[c.hdrLen:c.hdrLen], hdr[c.nonceOff():c.nonceOff()+wire.NonceLen], inner, hdr)
	sa.bytes.Add(uint64(len(inner)))
	return need, nil
}

// SealKeepalive seals an empty inner packet into buf at off, as Seal
// lays it out, and returns the UDP payload span. The receiver
// authenticates it, moves its replay window and its idea of where this
// host is, and delivers nothing: a keep-alive that holds a NAT's mapping
// open. It uses a counter of the TX SA like any packet; a failure counts
// no drop, since no packet was dropped.
func (c *Codec) SealKeepalive(buf []byte, off int) (start, length int, err error) {
	if off < c.hdrLen || off > len(buf)-wire.TagLen {
		return 0, 0, ErrShortBuffer
	}
	sa, err := c.txSA()
	if err != nil {
		return 0, 0, err
	}
	ctr, err := c.nextCounter(sa)
	if err != nil {
		return 0, 0, err
	}
	hdr := buf[off-c.hdrLen : off]
	c.putHeader(hdr, sa, wire.IPv4, ctr)
	sa.aead.Seal(buf[off:off], hdr[c.nonceOff():c.nonceOff()+wire.NonceLen], nil, hdr)
	return off - c.hdrLen, c.hdrLen + wire.TagLen, nil
}

func (c *Codec) txFail(err error) error {
	c.drops[txDrop(err)].Add(1)
	return err
}

// txPrepare does every check that does not consume a counter.
func (c *Codec) txPrepare(inner []byte) (*txSA, wire.Inner, error) {
	proto, err := wire.CheckInner(inner)
	switch {
	case err == wire.ErrEmpty:
		return nil, 0, ErrEmptyPacket
	case err != nil:
		return nil, 0, ErrInnerPacket
	}
	sa, err := c.txSA()
	return sa, proto, err
}

// txSA is the TX SA to seal under now.
func (c *Codec) txSA() (*txSA, error) {
	// An SA that goes off between loading the table and this check was
	// either replaced by a rekey, in which case the table already holds its
	// successor and the packet goes out under that (a rekey loses no
	// packet), or expired, in which case the reload finds no TX SA.
	for range 3 {
		t := c.tab.Load()
		sa := t.tx
		if sa == nil {
			if t.txExpired {
				return nil, ErrKeyExpired
			}
			return nil, ErrNoTXSA
		}
		if !sa.off.Load() {
			return sa, nil
		}
	}
	return nil, ErrKeyExpired
}

// nextCounter hands out the next counter of sa. The counter is the one
// piece of per-packet shared state on TX: an atomic add, no lock.
func (c *Codec) nextCounter(sa *txSA) (uint64, error) {
	ctr := sa.counter.Add(1)
	if ctr > c.hardPkts {
		return 0, ErrBudget
	}
	if ctr >= c.softPkts && sa.askedPkt.CompareAndSwap(false, true) {
		c.askRekey(sa.spi, RekeyPackets)
	}
	return ctr, nil
}

func (c *Codec) nonceOff() int {
	if c.framing == wire.Geneve {
		return wire.GeneveNonceOff
	}
	return wire.PSPNonceOff
}

func (c *Codec) putHeader(hdr []byte, sa *txSA, proto wire.Inner, ctr uint64) {
	if c.framing == wire.Geneve {
		wire.PutGeneve(hdr, proto, uint32(sa.spi), ctr)
		return
	}
	wire.PSPHeader{NextHeader: proto.IPProto(), Version: uint8(sa.suite), SPI: uint32(sa.spi), IV: ctr}.Put(hdr)
}

// Open authenticates and decrypts the UDP payload buf[off:off+n] in place
// and returns the inner packet's span buf[start:start+length], or the
// reason it was dropped (and counted). f is the framing the packet
// arrived as (by UDP port). On a drop the bytes of buf[off:off+n] are
// unspecified.
func (c *Codec) Open(f Framing, buf []byte, off, n int) (start, length int, reason DropReason) {
	if off < 0 || n < 0 || off > len(buf) || n > len(buf)-off {
		return 0, 0, c.rxDrop(DropBadBuffer)
	}
	p := buf[off : off+n]
	sa, h, r := c.rxLookup(f, p)
	if r != Pass {
		return 0, 0, c.rxDrop(r)
	}
	ct := p[h.AADLen:]
	pt, err := sa.aead.Open(ct[:0], p[h.NonceOff:h.NonceOff+wire.NonceLen], ct, p[:h.AADLen])
	if err != nil {
		return 0, 0, c.rxDrop(DropAuth)
	}
	inner := p[h.HeaderLen : h.AADLen+len(pt)]
	if r := c.rxAccept(sa, &h, inner); r != Pass {
		return 0, 0, c.rxDrop(r)
	}
	return off + h.HeaderLen, len(inner), Pass
}

// OpenTo authenticates and decrypts the UDP payload pkt into dst and
// returns the inner packet length written to dst[:length]. dst needs room
// for len(pkt) minus the header and tag and must not overlap pkt
// (DropBadBuffer otherwise).
func (c *Codec) OpenTo(f Framing, dst, pkt []byte) (length int, reason DropReason) {
	sa, h, r := c.rxLookup(f, pkt)
	if r != Pass {
		return 0, c.rxDrop(r)
	}
	// PSP's crypt-offset bytes are the start of the inner packet, sent in
	// the clear; Open in place finds them already in front of the
	// plaintext, OpenTo copies them there.
	inClear := h.AADLen - h.HeaderLen
	ct := pkt[h.AADLen:]
	if len(dst) < inClear+len(ct)-wire.TagLen || anyOverlap(dst[:inClear+len(ct)-wire.TagLen], pkt) {
		return 0, c.rxDrop(DropBadBuffer)
	}
	copy(dst, pkt[h.HeaderLen:h.AADLen])
	pt, err := sa.aead.Open(dst[inClear:inClear], pkt[h.NonceOff:h.NonceOff+wire.NonceLen], ct, pkt[:h.AADLen])
	if err != nil {
		return 0, c.rxDrop(DropAuth)
	}
	inner := dst[:inClear+len(pt)]
	if r := c.rxAccept(sa, &h, inner); r != Pass {
		return 0, c.rxDrop(r)
	}
	return len(inner), Pass
}

func (c *Codec) rxDrop(r DropReason) DropReason {
	if r == DropEmpty {
		c.keepalives.Add(1)
		return r
	}
	c.drops[r].Add(1)
	return r
}

// rxLookup is everything before the AEAD: parse, SPI lookup, nonce prefix,
// version and expiry.
func (c *Codec) rxLookup(f Framing, p []byte) (*rxSA, wire.Header, DropReason) {
	if f != c.framing {
		return nil, wire.Header{}, DropFraming
	}
	h, err := wire.Parse(f, p)
	if err != nil {
		return nil, h, DropMalformed
	}
	var sa *rxSA
	for _, r := range c.tab.Load().rx {
		if uint32(r.spi) == h.SPI {
			sa = r
			break
		}
	}
	if sa == nil {
		return nil, h, DropUnknownSPI
	}
	if h.NonceSPI != uint32(sa.spi) {
		return nil, h, DropSPIMismatch
	}
	if h.Version != wire.NoVersion && h.Version != uint8(sa.suite) {
		return nil, h, DropVersion
	}
	if sa.off.Load() {
		return nil, h, DropExpired
	}
	return sa, h, Pass
}

// rxAccept runs after a successful AEAD open: replay window first (only
// authenticated counters move it), then the inner packet checks.
func (c *Codec) rxAccept(sa *rxSA, h *wire.Header, inner []byte) DropReason {
	sa.mu.Lock()
	fresh := sa.win.Accept(h.Counter)
	sa.mu.Unlock()
	if !fresh {
		return DropReplay
	}
	if !sa.seen.Load() {
		c.peerSeen(sa)
	}
	proto, err := wire.CheckInner(inner)
	switch {
	case err == wire.ErrEmpty:
		return DropEmpty
	case err != nil || proto != h.Inner:
		return DropInnerMalformed
	}
	sa.packets.Add(1)
	sa.bytes.Add(uint64(len(inner)))
	return Pass
}
