// Package csum is the Internet checksum (RFC 1071) as the userspace data
// plane builds and cuts packets with it: partial sums that callers extend
// (pseudo-headers, headers, payload) and fold once.
package csum

import "encoding/binary"

// Sum adds b, as big-endian 16-bit words from an even offset, to acc. It
// reads 4 bytes at a time; Fold reduces the result to 16 bits.
func Sum(b []byte, acc uint64) uint64 {
	for len(b) >= 4 {
		acc += uint64(binary.BigEndian.Uint32(b))
		b = b[4:]
	}
	if len(b) >= 2 {
		acc += uint64(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		acc += uint64(b[0]) << 8
	}
	return acc
}

// Fold reduces a sum to its 16-bit one's-complement form.
func Fold(acc uint64) uint16 {
	for acc > 0xffff {
		acc = acc>>16 + acc&0xffff
	}
	return uint16(acc)
}

// Checksum is the checksum of b: the complement of its folded sum.
func Checksum(b []byte) uint16 { return ^Fold(Sum(b, 0)) }
