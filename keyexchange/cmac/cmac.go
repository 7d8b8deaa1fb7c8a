// Package cmac implements AES-CMAC (NIST SP 800-38B, RFC 4493) on top of
// crypto/aes, so the PSP key schedule stays inside the Go FIPS 140-3 module.
package cmac

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/subtle"
	"fmt"
)

// Size is the CMAC tag size in bytes.
const Size = aes.BlockSize

// CMAC is a keyed AES-CMAC PRF. It holds the two subkeys; Sum is safe for
// concurrent use.
type CMAC struct {
	b      cipher.Block
	k1, k2 [Size]byte
}

// New returns a CMAC keyed with an AES-128, -192 or -256 key.
func New(key []byte) (*CMAC, error) {
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("cmac: %w", err)
	}
	c := &CMAC{b: b}
	var l [Size]byte
	b.Encrypt(l[:], l[:])
	double(&c.k1, &l)
	double(&c.k2, &c.k1)
	clear(l[:])
	return c, nil
}

// double computes the GF(2^128) doubling of RFC 4493 §2.3.
func double(dst, src *[Size]byte) {
	carry := src[0] >> 7
	for i := 0; i < Size-1; i++ {
		dst[i] = src[i]<<1 | src[i+1]>>7
	}
	// Constant-time conditional XOR with Rb = 0x87.
	dst[Size-1] = src[Size-1]<<1 ^ byte(subtle.ConstantTimeSelect(int(carry), 0x87, 0))
}

// Sum appends the tag of msg to dst.
func (c *CMAC) Sum(dst, msg []byte) []byte {
	var x, last [Size]byte
	n := len(msg)
	full := n > 0 && n%Size == 0
	// Process every block but the last.
	blocks := (n + Size - 1) / Size
	if blocks == 0 {
		blocks = 1
	}
	for i := 0; i < blocks-1; i++ {
		subtle.XORBytes(x[:], x[:], msg[i*Size:(i+1)*Size])
		c.b.Encrypt(x[:], x[:])
	}
	tail := msg[(blocks-1)*Size:]
	if full {
		subtle.XORBytes(last[:], tail, c.k1[:])
	} else {
		copy(last[:], tail)
		last[len(tail)] = 0x80
		subtle.XORBytes(last[:], last[:], c.k2[:])
	}
	subtle.XORBytes(x[:], x[:], last[:])
	c.b.Encrypt(x[:], x[:])
	return append(dst, x[:]...)
}

// Wipe clears the subkeys. The AES key schedule inside crypto/aes cannot be
// reached; callers drop the CMAC right after use so it becomes garbage.
func (c *CMAC) Wipe() {
	clear(c.k1[:])
	clear(c.k2[:])
}
