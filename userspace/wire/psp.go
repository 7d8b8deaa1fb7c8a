package wire

import "crypto/cipher"

// PSPNonceOff is where the nonce (SPI ‖ IV) starts in a PSP header.
const PSPNonceOff = 4

// PSP header bits (psp.md §3.2).
const (
	pspHdrExtLenNoVC = 1    // 8-byte units after the first 8 bytes
	pspAlways1       = 0x01 // byte 3 bit 0
	pspVCBit         = 0x02 // byte 3 bit 1
	pspMaxVersion    = 0x0f
	pspCryptOffMask  = 0x3f
)

// PSPHeader is the 16-byte PSP base header. pspd never sends the optional
// virtualization cookie.
type PSPHeader struct {
	NextHeader  uint8  // IP protocol of what follows: 4/41 in tunnel mode
	CryptOffset uint8  // 4-byte units of payload sent in the clear (0..63)
	Version     uint8  // PSP version = kdf.Suite (0..15)
	SPI         uint32 // receiver's SPI, bit 31 = master-key phase
	IV          uint64 // per-packet counter
}

// Put writes h into b[:PSPHeaderLen]. Out-of-range CryptOffset and Version
// are truncated to their field widths.
func (h PSPHeader) Put(b []byte) {
	_ = b[PSPHeaderLen-1]
	b[0] = h.NextHeader
	b[1] = pspHdrExtLenNoVC
	b[2] = h.CryptOffset & pspCryptOffMask
	b[3] = (h.Version&pspMaxVersion)<<2 | pspAlways1
	put32(b[4:], h.SPI)
	put64(b[8:], h.IV)
}

// ParsePSPHeader decodes a PSP base header in any mode. It refuses the
// virtualization cookie, which pspd does not implement.
func ParsePSPHeader(b []byte) (PSPHeader, error) {
	if len(b) < PSPHeaderLen {
		return PSPHeader{}, ParseError("wire: psp: shorter than the 16-byte header")
	}
	if b[3]&pspAlways1 == 0 {
		return PSPHeader{}, ParseError("wire: psp: byte 3 bit 0 is not 1")
	}
	if b[3]&pspVCBit != 0 || b[1] != pspHdrExtLenNoVC {
		return PSPHeader{}, ParseError("wire: psp: virtualization cookie or header extension not supported (want hdr ext len 1, V=0)")
	}
	return PSPHeader{
		NextHeader:  b[0],
		CryptOffset: b[2] & pspCryptOffMask,
		Version:     b[3] >> 2 & pspMaxVersion,
		SPI:         be32(b[4:]),
		IV:          be64(b[8:]),
	}, nil
}

func parsePSPTunnel(b []byte) (Header, error) {
	h, err := ParsePSPHeader(b)
	if err != nil {
		return Header{}, err
	}
	inner, ok := innerFromIPProto(h.NextHeader)
	if !ok {
		return Header{}, ParseError("wire: psp: next header is not IPv4 (4) or IPv6 (41), not tunnel mode")
	}
	aad := PSPHeaderLen + 4*int(h.CryptOffset)
	if len(b) < aad+TagLen {
		return Header{}, ParseError("wire: psp: payload shorter than header, crypt offset and tag")
	}
	return Header{
		SPI:       h.SPI,
		NonceSPI:  h.SPI, // nonce = header bytes 4..15: SPI ‖ IV
		Counter:   h.IV,
		Inner:     inner,
		Version:   h.Version,
		NonceOff:  PSPNonceOff,
		AADLen:    aad,
		HeaderLen: PSPHeaderLen,
	}, nil
}

// AppendPSPTransport appends a PSP transport-mode payload (the UDP payload
// on port 1000) for an L4 segment to dst: header, the first 4·CryptOffset
// bytes of segment in the clear, the rest encrypted, then the ICV. It
// exists to reproduce the PSP reference vectors; the data plane uses
// tunnel mode.
func AppendPSPTransport(dst []byte, aead cipher.AEAD, h PSPHeader, segment []byte) ([]byte, error) {
	clear := 4 * int(h.CryptOffset&pspCryptOffMask)
	if clear > len(segment) {
		return dst, ParseError("wire: psp: crypt offset beyond the segment")
	}
	if aead.NonceSize() != NonceLen || aead.Overhead() != TagLen {
		return dst, ParseError("wire: psp: AEAD is not AES-GCM with 12-byte nonce and 16-byte tag")
	}
	start := len(dst)
	var hdr [PSPHeaderLen]byte
	h.Put(hdr[:])
	dst = append(dst, hdr[:]...)
	dst = append(dst, segment[:clear]...)
	// The AAD and nonce are re-sliced after the appends above, which may
	// have moved dst.
	aad := dst[start : start+PSPHeaderLen+clear]
	return aead.Seal(dst, aad[4:PSPHeaderLen], segment[clear:], aad), nil
}
