package kdf

import (
	"encoding/hex"
	"testing"

	"github.com/pspd/pspd/internal/secret"
)

// TestSaltVectors freezes the salt derivation. The values were computed
// independently of this package (Python's cryptography AES-CMAC over
// 00000001 ‖ "pspd salt" ‖ 00 ‖ SPI ‖ suite ‖ 00000020) from the PSP
// reference master keys; a change here breaks interoperability with every
// deployed pspd.
func TestSaltVectors(t *testing.T) {
	mk, err := NewMasterKeys(secret.New(unhex(t, mk0)), secret.New(unhex(t, mk1)))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		spi   SPI
		suite Suite
		want  string
	}{
		{0x12345678, AESGCM128, "43f4d8f5"},
		{0x12345678, AESGCM256, "30f9ea26"},
		{0x9A345678, AESGCM128, "ef5ed14c"}, // master key 1
	} {
		salt, err := mk.DeriveSalt(tc.spi, tc.suite)
		if err != nil {
			t.Fatal(err)
		}
		if got := hex.EncodeToString(salt[:]); got != tc.want {
			t.Errorf("spi %v %v: salt %s, want %s", tc.spi, tc.suite, got, tc.want)
		}
		// The salt is a separate output of the key schedule: not a part
		// of the key, and not computable from the key alone.
		key, _ := mk.Derive(tc.spi, tc.suite)
		if hex.EncodeToString(key.Bytes()[:SaltLen]) == tc.want {
			t.Errorf("spi %v: salt equals the start of the key", tc.spi)
		}
	}
	if _, err := mk.DeriveSalt(0x80000000, AESGCM128); err == nil {
		t.Error("SPI with a zero key id accepted")
	}
	if _, err := mk.DeriveSalt(1, Suite(9)); err == nil {
		t.Error("unknown suite accepted")
	}
	if _, err := DeriveSalt(make([]byte, 16), 1, AESGCM128); err == nil {
		t.Error("16-byte master key accepted")
	}
}
