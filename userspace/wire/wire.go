// Package wire owns the byte layouts of pspd's userspace data plane: the
// UDP payloads of its two framings (Geneve with pspd options, and PSP
// tunnel mode), the inner-packet checks shared by both, and a PSP
// transport-mode encoder used to prove the PSP header and AEAD inputs match
// the PSP reference bit for bit.
//
// Both framings put the whole 96-bit AES-GCM nonce (SPI ‖ 64-bit counter)
// contiguously in the header, so a transform can hand the AEAD a slice of
// the packet and needs no per-packet nonce buffer. docs/wire-format.md has
// the byte diagrams and the reasoning.
//
// Parsing never panics and never allocates: errors are constant values of
// type ParseError naming the offending field.
package wire

import (
	"fmt"
	"log/slog"
)

// Framing selects the UDP payload format of an association.
type Framing uint8

const (
	// Geneve is RFC 8926 Geneve on UDP 6081 with two pspd options
	// carrying the receiver's SPI and the AES-GCM nonce.
	Geneve Framing = 1
	// PSPTunnel is PSP tunnel mode on UDP 1000: a 16-byte PSP header and
	// the encrypted inner IP packet.
	PSPTunnel Framing = 2
)

// UDP destination ports of the framings.
const (
	GenevePort = 6081
	PSPPort    = 1000
)

// Sizes in bytes.
const (
	GeneveHeaderLen = 32 // base 8 + SPI option 8 + nonce option 16
	PSPHeaderLen    = 16 // PSP base header without virtualization cookie
	MaxHeaderLen    = GeneveHeaderLen
	NonceLen        = 12
	TagLen          = 16 // AES-GCM ICV
)

func (f Framing) String() string {
	switch f {
	case Geneve:
		return "geneve"
	case PSPTunnel:
		return "psp-tunnel"
	}
	return fmt.Sprintf("framing(%d)", uint8(f))
}

// LogValue logs a framing by its name, in JSON as in text.
func (f Framing) LogValue() slog.Value { return slog.StringValue(f.String()) }

// Valid reports whether f is a framing pspd implements.
func (f Framing) Valid() bool { return f == Geneve || f == PSPTunnel }

// Port is the UDP destination port of the framing, 0 if invalid.
func (f Framing) Port() uint16 {
	switch f {
	case Geneve:
		return GenevePort
	case PSPTunnel:
		return PSPPort
	}
	return 0
}

// HeaderLen is the length of the header pspd writes, 0 if invalid.
func (f Framing) HeaderLen() int {
	switch f {
	case Geneve:
		return GeneveHeaderLen
	case PSPTunnel:
		return PSPHeaderLen
	}
	return 0
}

// ParseFraming accepts the names String returns.
func ParseFraming(name string) (Framing, error) {
	switch name {
	case "geneve":
		return Geneve, nil
	case "psp-tunnel":
		return PSPTunnel, nil
	}
	return 0, fmt.Errorf("wire: unknown framing %q (want geneve or psp-tunnel)", name)
}

// ParseError is a constant error describing why bytes were refused.
type ParseError string

func (e ParseError) Error() string { return string(e) }

// Header is what a transform needs from a received payload header, in
// either framing. Offsets are relative to the start of the UDP payload.
type Header struct {
	SPI      uint32 // receiver's SPI: the lookup key
	NonceSPI uint32 // first 4 bytes of the nonce as sent
	Counter  uint64 // last 8 bytes of the nonce: the replay counter
	Inner    Inner  // inner protocol the header announces
	Version  uint8  // PSP version (= kdf.Suite); Geneve carries none: 0xff
	// NonceOff is where the 12-byte nonce starts.
	NonceOff int
	// AADLen is how many leading bytes are authenticated but not
	// encrypted. For PSP it includes the crypt-offset bytes, which are the
	// first bytes of the inner packet sent in the clear.
	AADLen int
	// HeaderLen is where the inner packet starts (the clear part of it,
	// for PSP with a crypt offset).
	HeaderLen int
}

// NoVersion is Header.Version for framings without a version field.
const NoVersion = 0xff

// Parse checks the fixed header of a received UDP payload in framing f and
// that the payload is long enough for a tag. It reads only; b is not
// retained.
func Parse(f Framing, b []byte) (Header, error) {
	switch f {
	case Geneve:
		return parseGeneve(b)
	case PSPTunnel:
		return parsePSPTunnel(b)
	}
	return Header{}, ParseError("wire: unknown framing")
}

// PeekSPI returns the receiver's SPI of a payload without validating the
// rest of the header, for demultiplexing a packet to its peer.
func PeekSPI(f Framing, b []byte) (uint32, bool) {
	switch f {
	case Geneve:
		if len(b) >= GeneveHeaderLen {
			return be32(b[geneveSPIOff:]), true
		}
	case PSPTunnel:
		if len(b) >= PSPHeaderLen {
			return be32(b[4:]), true
		}
	}
	return 0, false
}

func be32(b []byte) uint32 {
	_ = b[3]
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func put32(b []byte, v uint32) {
	_ = b[3]
	b[0], b[1], b[2], b[3] = byte(v>>24), byte(v>>16), byte(v>>8), byte(v)
}

func be64(b []byte) uint64 { return uint64(be32(b))<<32 | uint64(be32(b[4:])) }

func put64(b []byte, v uint64) {
	put32(b, uint32(v>>32))
	put32(b[4:], uint32(v))
}
