package wire

// Geneve layout (RFC 8926), 32 bytes, all fields fixed except the protocol
// type and the nonce:
//
//	 0  ver=0,optlen=6 | O=0,C=1 | protocol type (inner EtherType)
//	 4  VNI (0) | reserved
//	 8  option class 0xFF50 | type 0x81 | len 1
//	12  receiver SPI
//	16  option class 0xFF50 | type 0x82 | len 3
//	20  nonce: SPI (4) ‖ counter (8)
const (
	// OptionClass is pspd's Geneve option class, from the range RFC 8926
	// leaves for experimental use (0xFF00-0xFFFF).
	OptionClass = 0xFF50
	// Option types have the critical bit (0x80) set: a Geneve endpoint
	// that does not know pspd's options must drop the packet rather than
	// deliver ciphertext as if it were an inner frame.
	OptionTypeSPI   = 0x81
	OptionTypeNonce = 0x82

	// GeneveNonceOff is where the 12-byte nonce starts in the header.
	GeneveNonceOff = 20

	geneveOptWords = (GeneveHeaderLen - 8) / 4
	geneveFlagC    = 0x40
	geneveFlagO    = 0x80
	geneveSPIOff   = 12
)

// PutGeneve writes a Geneve header into b[:GeneveHeaderLen] announcing
// inner, for receiver SPI spi and counter. The nonce option repeats the
// SPI so that the nonce is one contiguous slice of the header.
func PutGeneve(b []byte, inner Inner, spi uint32, counter uint64) {
	_ = b[GeneveHeaderLen-1]
	b[0] = geneveOptWords
	b[1] = geneveFlagC
	et := inner.EtherType()
	b[2], b[3] = byte(et>>8), byte(et)
	put32(b[4:], 0)
	b[8], b[9], b[10], b[11] = OptionClass>>8, OptionClass&0xff, OptionTypeSPI, 1
	put32(b[12:], spi)
	b[16], b[17], b[18], b[19] = OptionClass>>8, OptionClass&0xff, OptionTypeNonce, 3
	put32(b[20:], spi)
	put64(b[24:], counter)
}

func parseGeneve(b []byte) (Header, error) {
	if len(b) < GeneveHeaderLen+TagLen {
		return Header{}, ParseError("wire: geneve: payload shorter than header and tag")
	}
	if b[0]>>6 != 0 {
		return Header{}, ParseError("wire: geneve: version is not 0")
	}
	if b[0]&0x3f != geneveOptWords {
		return Header{}, ParseError("wire: geneve: option length is not pspd's fixed 24 bytes")
	}
	if b[1]&geneveFlagO != 0 {
		return Header{}, ParseError("wire: geneve: O (control) bit set")
	}
	if b[1]&geneveFlagC == 0 {
		return Header{}, ParseError("wire: geneve: C (critical options) bit clear")
	}
	inner, ok := innerFromEtherType(uint16(b[2])<<8 | uint16(b[3]))
	if !ok {
		return Header{}, ParseError("wire: geneve: protocol type is not IPv4 or IPv6")
	}
	if uint16(b[8])<<8|uint16(b[9]) != OptionClass || b[10] != OptionTypeSPI || b[11]&0x1f != 1 {
		return Header{}, ParseError("wire: geneve: first option is not pspd's SPI option")
	}
	if uint16(b[16])<<8|uint16(b[17]) != OptionClass || b[18] != OptionTypeNonce || b[19]&0x1f != 3 {
		return Header{}, ParseError("wire: geneve: second option is not pspd's nonce option")
	}
	return Header{
		SPI:       be32(b[geneveSPIOff:]),
		NonceSPI:  be32(b[GeneveNonceOff:]),
		Counter:   be64(b[GeneveNonceOff+4:]),
		Inner:     inner,
		Version:   NoVersion,
		NonceOff:  GeneveNonceOff,
		AADLen:    GeneveHeaderLen,
		HeaderLen: GeneveHeaderLen,
	}, nil
}
