package kdf

import (
	"encoding/binary"
	"fmt"

	"github.com/pspd/pspd/keyexchange/cmac"
)

// SaltLen is the length of an association's AES-GCM salt: the implicit
// part of the nonce of RFC 4106 ESP (XFRM's rfc4106(gcm(aes))).
const SaltLen = 4

// saltLabel is the SP 800-108 label of the salt. Every PSP key derivation
// input is exactly one 16-byte block; a salt input is 23 bytes, so the two
// can never coincide and the salt is independent of the key.
const saltLabel = "pspd salt"

// DeriveSalt returns the AES-GCM salt for spi under suite, from the master
// key SPI bit 31 selects, like Derive.
func (m *MasterKeys) DeriveSalt(spi SPI, s Suite) ([SaltLen]byte, error) {
	if spi.KeyID() == 0 {
		return [SaltLen]byte{}, fmt.Errorf("kdf: derive salt spi=%#x: low 31 bits must be non-zero", uint32(spi))
	}
	return DeriveSalt(m.k[spi.MasterKeyIndex()].Bytes(), uint32(spi), s)
}

// DeriveSalt is the salt output of pspd's key schedule: the same SP 800-108
// counter-mode KDF with AES-256-CMAC under the master key as Derive, with
// its own label and the suite in the context:
//
//	salt = first 4 bytes of CMAC(master, 00000001 ‖ "pspd salt" ‖ 00 ‖ SPI ‖ suite ‖ 00000020)
//
// SPI is big endian, suite is the PSP version byte and 00000020 is the
// output length in bits. Both peers hold the master key and the SPI, so
// the salt never crosses the wire; unlike a salt computed from the AES key
// (a MAC under the very key it salts), it shares no input with the key
// but the master key, as NIST SP 800-108 intends for separate outputs.
func DeriveSalt(masterKey []byte, spi uint32, s Suite) ([SaltLen]byte, error) {
	var salt [SaltLen]byte
	if !s.Valid() {
		return salt, fmt.Errorf("kdf: derive salt: unknown suite %d", uint8(s))
	}
	if len(masterKey) != MasterKeyLen {
		return salt, fmt.Errorf("kdf: derive salt: master key must be %d bytes, got %d", MasterKeyLen, len(masterKey))
	}
	prf, err := cmac.New(masterKey)
	if err != nil {
		return salt, err
	}
	defer prf.Wipe()
	in := make([]byte, 0, 4+len(saltLabel)+1+4+1+4)
	in = binary.BigEndian.AppendUint32(in, 1)
	in = append(in, saltLabel...)
	in = append(in, 0)
	in = binary.BigEndian.AppendUint32(in, spi)
	in = append(in, byte(s))
	in = binary.BigEndian.AppendUint32(in, SaltLen*8)
	out := prf.Sum(make([]byte, 0, cmac.Size), in)
	copy(salt[:], out)
	clear(out)
	return salt, nil
}
