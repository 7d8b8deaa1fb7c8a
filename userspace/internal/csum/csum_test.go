package csum

import (
	"math/rand/v2"
	"testing"
)

// naive is RFC 1071 word by word, to check the 4-byte loop against.
func naive(b []byte) uint16 {
	var acc uint32
	for i := 0; i+1 < len(b); i += 2 {
		acc += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		acc += uint32(b[len(b)-1]) << 8
	}
	for acc > 0xffff {
		acc = acc>>16 + acc&0xffff
	}
	return ^uint16(acc)
}

func TestChecksum(t *testing.T) {
	// RFC 1071 §3's example bytes.
	if got := Checksum([]byte{0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7}); got != ^uint16(0xddf2) {
		t.Errorf("RFC 1071 example: %#x", got)
	}
	r := rand.New(rand.NewPCG(1, 2))
	for n := range 200 {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		if Checksum(b) != naive(b) {
			t.Fatalf("%d bytes: %#x, word by word %#x", n, Checksum(b), naive(b))
		}
	}
}
