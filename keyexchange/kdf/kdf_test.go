package kdf

import (
	"encoding/hex"
	"errors"
	"testing"

	"github.com/pspd/pspd/internal/secret"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Master keys and derived keys from the PSP reference configuration and the
// published vectors (psp.md §3.5).
const (
	mk0 = "34448a064292601b11a0978f56a2d34cf3fc35ede1a6bc04f8db3e5243a2b0ca"
	mk1 = "563952565d3a78ae773ec1b779f2f2d99f4a7f53a6fbb9b07d5b71f39364d739"
)

func TestPSPVectors(t *testing.T) {
	mk, err := NewMasterKeys(secret.New(unhex(t, mk0)), secret.New(unhex(t, mk1)))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		spi   SPI
		suite Suite
		want  string
	}{
		{0x12345678, AESGCM128, "96c22dc799198090b74b70ae468e4e30"},
		{0x9A345678, AESGCM128, "3946da2554eae46ad1ef77a64372edc4"},
		{0x12345678, AESGCM256, "2b7d72074e42ca334487f2990e3f8c4037e436f38283449b76463e9b7fb2e3de"},
	} {
		k, err := mk.Derive(tc.spi, tc.suite)
		if err != nil {
			t.Fatal(err)
		}
		if got := hex.EncodeToString(k.Bytes()); got != tc.want {
			t.Errorf("spi %v %v: got %s want %s", tc.spi, tc.suite, got, tc.want)
		}
	}
}

func TestDeriveRefuses(t *testing.T) {
	mk, err := NewMasterKeys(secret.New(unhex(t, mk0)), secret.New(unhex(t, mk1)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := mk.Derive(0x80000000, AESGCM128); err == nil {
		t.Error("SPI with zero key id accepted")
	}
	if _, err := mk.Derive(1, Suite(7)); err == nil {
		t.Error("unknown suite accepted")
	}
	if _, err := Derive(make([]byte, 16), 1, AESGCM128); err == nil {
		t.Error("16-byte master key accepted")
	}
	if _, err := NewMasterKeys(secret.New(unhex(t, mk0)), secret.New(unhex(t, mk0))); err == nil {
		t.Error("equal master keys accepted")
	}
}

func TestSPILayout(t *testing.T) {
	s, err := MakeSPI(1, Responder, 5)
	if err != nil {
		t.Fatal(err)
	}
	if uint32(s) != 0xC0000005 || s.MasterKeyIndex() != 1 || s.Role() != Responder || s.Counter() != 5 || s.KeyID() != 0x40000005 {
		t.Fatalf("layout wrong: %v", s)
	}
	for _, bad := range []uint32{0, MaxKeyID + 1} {
		if _, err := MakeSPI(0, Initiator, bad); err == nil {
			t.Errorf("key id %d accepted", bad)
		}
	}
}

func TestAllocatorRolesNeverCollide(t *testing.T) {
	ai, _ := NewAllocator(0, Initiator)
	ar, _ := NewAllocator(0, Responder)
	seen := map[SPI]bool{}
	for range 1000 {
		for _, a := range []*Allocator{ai, ar} {
			s, err := a.Next()
			if err != nil {
				t.Fatal(err)
			}
			if seen[s] || s.KeyID() == 0 {
				t.Fatalf("duplicate or zero SPI %v", s)
			}
			seen[s] = true
		}
	}
}

func TestAllocatorExhaustion(t *testing.T) {
	a, err := NewAllocatorRange(0, Initiator, 5, 7)
	if err != nil {
		t.Fatal(err)
	}
	if s, _ := NewAllocatorRange(0, Responder, 5, 7); s == nil {
		t.Fatal("responder range refused")
	} else if spi, _ := s.Next(); spi.Counter() != 5 || spi.Role() != Responder {
		t.Fatalf("first SPI of range 5..7: %s", spi)
	}
	for range 3 {
		if _, err := a.Next(); err != nil {
			t.Fatal(err)
		}
	}
	if a.Remaining() != 0 {
		t.Fatalf("remaining %d", a.Remaining())
	}
	if _, err := a.Next(); !errors.Is(err, ErrSPIExhausted) {
		t.Fatalf("got %v, want ErrSPIExhausted", err)
	}
	for _, bad := range [][2]uint32{{0, 1}, {2, 1}, {1, MaxKeyID + 1}} {
		if _, err := NewAllocatorRange(0, Initiator, bad[0], bad[1]); err == nil {
			t.Errorf("range %d..%d accepted", bad[0], bad[1])
		}
	}
	// The real limit: a fresh allocator reports the full 30-bit space.
	b, _ := NewAllocator(1, Responder)
	if b.Remaining() != MaxKeyID {
		t.Fatalf("remaining %d want %d", b.Remaining(), MaxKeyID)
	}
}

func BenchmarkDerive128(b *testing.B) {
	mk := make([]byte, 32)
	mk[0] = 1
	for b.Loop() {
		k, _ := Derive(mk, 0x12345678, AESGCM128)
		k.Wipe()
	}
}

func BenchmarkDerive256(b *testing.B) {
	mk := make([]byte, 32)
	mk[0] = 1
	for b.Loop() {
		k, _ := Derive(mk, 0x12345678, AESGCM256)
		k.Wipe()
	}
}
