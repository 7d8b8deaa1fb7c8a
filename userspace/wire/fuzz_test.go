package wire

import "testing"

// FuzzParse: no input panics any decoder, and an accepted header's
// offsets stay inside the payload with room for the tag.
func FuzzParse(f *testing.F) {
	g := make([]byte, GeneveHeaderLen+TagLen+20)
	PutGeneve(g, IPv4, 0x40000001, 7)
	f.Add(g)
	p := make([]byte, PSPHeaderLen+TagLen+20)
	PSPHeader{NextHeader: 41, CryptOffset: 1, Version: 1, SPI: 3, IV: 9}.Put(p)
	f.Add(p)
	f.Add([]byte{0x45, 0, 0, 20})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, fr := range []Framing{Geneve, PSPTunnel, 0} {
			h, err := Parse(fr, b)
			spi, peeked := PeekSPI(fr, b)
			if err != nil {
				continue
			}
			if !peeked || spi != h.SPI {
				t.Fatalf("%v: PeekSPI %#x %v, Parse SPI %#x", fr, spi, peeked, h.SPI)
			}
			if h.NonceOff+NonceLen > h.AADLen || h.HeaderLen > h.AADLen || h.AADLen+TagLen > len(b) {
				t.Fatalf("%v: offsets out of range: %+v len %d", fr, h, len(b))
			}
			if h.Inner != IPv4 && h.Inner != IPv6 {
				t.Fatalf("%v: inner %v", fr, h.Inner)
			}
		}
		if in, err := CheckInner(b); err == nil && (len(b) == 0 || int(b[0]>>4) != int(in)) {
			t.Fatalf("CheckInner accepted %x as %v", b, in)
		}
		_, _ = ParsePSPHeader(b)
	})
}
