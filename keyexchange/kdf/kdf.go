// Package kdf is the PSP key schedule: the SP 800-108 counter-mode KDF with
// AES-256-CMAC as PRF that turns a 32-byte master key and an SPI into a
// per-association AES-GCM key, the same KDF's separate salt output for
// backends whose AES-GCM nonce has an implicit salt (ESP, RFC 4106; see
// DeriveSalt), the SPI bit layout pspd uses for derived-key associations,
// and an allocator for those SPIs.
//
// The derivation matches the PSP architecture specification bit for bit
// (see psp.md §3.4 in the project's shared reference); the tests hold the
// published vectors.
package kdf

import (
	"encoding/binary"
	"fmt"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/cmac"
)

// MasterKeyLen is the length of a PSP master (device) key.
const MasterKeyLen = 32

// Suite is an AEAD suite (package assoc owns the type).
type Suite = assoc.Suite

const (
	AESGCM128 = assoc.AESGCM128 // PSP v0, hdr0-aes-gcm-128
	AESGCM256 = assoc.AESGCM256 // PSP v1, hdr0-aes-gcm-256
)

// ParseSuite accepts the names String returns.
func ParseSuite(name string) (Suite, error) {
	switch name {
	case "aes-gcm-128":
		return AESGCM128, nil
	case "aes-gcm-256":
		return AESGCM256, nil
	}
	return 0, fmt.Errorf("kdf: unknown suite %q (want aes-gcm-128 or aes-gcm-256)", name)
}

// MasterKeys is the pair of PSP master keys; SPI bit 31 selects one.
type MasterKeys struct {
	k [2]secret.Key
}

// NewMasterKeys takes ownership of two 32-byte keys.
func NewMasterKeys(k0, k1 secret.Key) (*MasterKeys, error) {
	if k0.Len() != MasterKeyLen || k1.Len() != MasterKeyLen {
		return nil, fmt.Errorf("kdf: master keys must be %d bytes, got %d and %d", MasterKeyLen, k0.Len(), k1.Len())
	}
	if k0.Equal(k1) {
		return nil, fmt.Errorf("kdf: the two master keys are equal")
	}
	return &MasterKeys{k: [2]secret.Key{k0, k1}}, nil
}

// Wipe zeroes both master keys.
func (m *MasterKeys) Wipe() {
	m.k[0].Wipe()
	m.k[1].Wipe()
}

// Derive returns the key for spi under suite. The master key is chosen by
// SPI bit 31, as the receiver of a PSP packet does.
func (m *MasterKeys) Derive(spi SPI, s Suite) (secret.Key, error) {
	if !s.Valid() {
		return secret.Key{}, fmt.Errorf("kdf: derive spi=%#x: unknown suite %d", uint32(spi), uint8(s))
	}
	if spi.KeyID() == 0 {
		return secret.Key{}, fmt.Errorf("kdf: derive spi=%#x: low 31 bits must be non-zero", uint32(spi))
	}
	return Derive(m.k[spi.MasterKeyIndex()].Bytes(), uint32(spi), s)
}

// Derive is the raw SP 800-108 counter-mode KDF of PSP: one or two
// AES-256-CMAC blocks over counter ‖ label ‖ 0x00 ‖ SPI ‖ L.
func Derive(masterKey []byte, spi uint32, s Suite) (secret.Key, error) {
	n := s.KeyLen()
	if n == 0 {
		return secret.Key{}, fmt.Errorf("kdf: unknown suite %d", uint8(s))
	}
	if len(masterKey) != MasterKeyLen {
		return secret.Key{}, fmt.Errorf("kdf: master key must be %d bytes, got %d", MasterKeyLen, len(masterKey))
	}
	prf, err := cmac.New(masterKey)
	if err != nil {
		return secret.Key{}, err
	}
	defer prf.Wipe()
	var in [16]byte
	in[4], in[5] = 'P', 'v'
	in[6] = '0' + byte(s) // "Pv0" for 128-bit keys, "Pv1" for 256-bit keys
	binary.BigEndian.PutUint32(in[8:], spi)
	binary.BigEndian.PutUint32(in[12:], uint32(n*8))
	out := make([]byte, 0, n)
	for i := uint32(1); len(out) < n; i++ {
		binary.BigEndian.PutUint32(in[0:], i)
		out = prf.Sum(out, in[:])
	}
	return secret.Own(out), nil
}
