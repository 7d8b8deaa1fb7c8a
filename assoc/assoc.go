// Package assoc is the vocabulary every part of pspd shares about
// associations: the SA of one generation (both directions, with its keys),
// its SPIs, AEAD suite and association id, and the kind of data plane that
// carries it.
//
// It is a leaf: it depends on nothing of pspd but the key type that cannot
// be printed and the peer's public key type, so that the key exchange, the
// configuration, the daemon and the data planes can all speak it without
// importing one another.
package assoc

import (
	"fmt"
	"log/slog"

	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/identity"
)

// SPI is a PSP security parameter index as pspd lays it out for derived-key
// associations:
//
//	bit 31      master-key selector (PSP key phase)
//	bit 30      role of the allocating (receiving) side
//	bits 29..0  key id, never zero
//
// The role bit partitions the SPI space between the two peers of a session,
// so the SPI one side receives on can never equal the SPI the other side
// receives on, and the two directions never derive the same key.
type SPI uint32

const (
	masterBit = 1 << 31
	roleBit   = 1 << 30
	idMask    = roleBit - 1

	// MaxKeyID is the largest key id an allocator hands out.
	MaxKeyID = idMask
)

// Role is the side of a session that allocated an SPI.
type Role uint8

const (
	Initiator Role = 0
	Responder Role = 1
)

func (r Role) String() string {
	if r == Initiator {
		return "initiator"
	}
	return "responder"
}

// MasterKeyIndex is 0 or 1 (bit 31).
func (s SPI) MasterKeyIndex() int { return int(s >> 31) }

// Role is the role bit (bit 30).
func (s SPI) Role() Role { return Role(s >> 30 & 1) }

// KeyID is the low 31 bits as PSP defines them (role bit included); PSP
// requires it to be non-zero.
func (s SPI) KeyID() uint32 { return uint32(s) &^ masterBit }

// Counter is bits 29..0, the allocator's counter.
func (s SPI) Counter() uint32 { return uint32(s) & idMask }

func (s SPI) String() string { return fmt.Sprintf("%#08x", uint32(s)) }

// LogValue logs an SPI in hex, as listings show it.
func (s SPI) LogValue() slog.Value { return slog.StringValue(s.String()) }

// Suite is an AEAD suite. Its numeric value is the PSP version codepoint,
// which is also what goes on the wire of the control protocol.
type Suite uint8

const (
	AESGCM128 Suite = 0 // PSP v0, hdr0-aes-gcm-128
	AESGCM256 Suite = 1 // PSP v1, hdr0-aes-gcm-256
)

// KeyLen is the AEAD key length of the suite, or 0 for an unknown suite.
func (s Suite) KeyLen() int {
	switch s {
	case AESGCM128:
		return 16
	case AESGCM256:
		return 32
	}
	return 0
}

// Valid reports whether s is a suite pspd implements.
func (s Suite) Valid() bool { return s.KeyLen() != 0 }

func (s Suite) String() string {
	switch s {
	case AESGCM128:
		return "aes-gcm-128"
	case AESGCM256:
		return "aes-gcm-256"
	}
	return fmt.Sprintf("suite(%d)", uint8(s))
}

// LogValue logs a suite by its name.
func (s Suite) LogValue() slog.Value { return slog.StringValue(s.String()) }

// Backend is a kind of data plane. Its numeric value goes on the wire of
// the control protocol.
type Backend uint8

const (
	BackendPSP       Backend = 1 // kernel PSP: explicit device keys
	BackendXFRM      Backend = 2 // kernel XFRM ESP: derived keys
	BackendUserspace Backend = 3 // pspd's own data plane: derived keys
)

// Valid reports whether b is a backend pspd implements.
func (b Backend) Valid() bool { return b >= BackendPSP && b <= BackendUserspace }

func (b Backend) String() string {
	switch b {
	case BackendPSP:
		return "psp"
	case BackendXFRM:
		return "xfrm"
	case BackendUserspace:
		return "userspace"
	}
	return fmt.Sprintf("backend(%d)", uint8(b))
}

// LogValue logs a backend by its name.
func (b Backend) LogValue() slog.Value { return slog.StringValue(b.String()) }

// ParseBackend is the inverse of String.
func ParseBackend(s string) (Backend, bool) {
	for b := BackendPSP; b <= BackendUserspace; b++ {
		if b.String() == s {
			return b, true
		}
	}
	return 0, false
}

// ID names an association between two peers; it stays the same across
// rekeys, which bump the generation.
type ID uint64

// SA is one generation of an association with a peer: a pair of simplex
// security associations, one per direction.
type SA struct {
	Peer       identity.PublicKey
	ID         ID
	Backend    Backend
	Suite      Suite
	Generation uint32
	RxSPI      SPI // we receive and decrypt under this SPI
	TxSPI      SPI // we encrypt to the peer under this SPI
	RxKey      secret.Key
	TxKey      secret.Key
	// RxSalt and TxSalt are the ESP (RFC 4106) salts of the two
	// directions: their own output of the key schedule, not derived from
	// the AES-GCM keys. PSP framing does not use them.
	RxSalt, TxSalt [SaltLen]byte
}

// SaltLen is the length of an RFC 4106 salt.
const SaltLen = 4

// Wipe zeroes both keys and both salts.
func (sa *SA) Wipe() {
	sa.RxKey.Wipe()
	sa.TxKey.Wipe()
	clear(sa.RxSalt[:])
	clear(sa.TxSalt[:])
}

// WithoutKeys is what the SA looks like to anyone but a data plane.
func (sa *SA) WithoutKeys() SA {
	c := *sa
	c.RxKey, c.TxKey = secret.Key{}, secret.Key{}
	c.RxSalt, c.TxSalt = [SaltLen]byte{}, [SaltLen]byte{}
	return c
}

func (sa *SA) String() string {
	return fmt.Sprintf("sa{peer=%s id=%d gen=%d %s/%s rx=%s tx=%s}",
		sa.Peer.Fingerprint(), sa.ID, sa.Generation, sa.Backend, sa.Suite, sa.RxSPI, sa.TxSPI)
}

// LogValue logs the SA without its keys.
func (sa *SA) LogValue() slog.Value {
	return slog.GroupValue(
		slog.Uint64("id", uint64(sa.ID)), slog.Uint64("gen", uint64(sa.Generation)),
		slog.String("backend", sa.Backend.String()), slog.String("suite", sa.Suite.String()),
		slog.String("rx_spi", sa.RxSPI.String()), slog.String("tx_spi", sa.TxSPI.String()))
}
