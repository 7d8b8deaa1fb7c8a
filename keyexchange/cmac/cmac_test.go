package cmac

import (
	"bytes"
	"encoding/hex"
	"testing"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// RFC 4493 §4 examples (AES-128) and NIST SP 800-38B appendix D.3 (AES-256).
func TestVectors(t *testing.T) {
	const msg = "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e5130c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710"
	k128 := "2b7e151628aed2a6abf7158809cf4f3c"
	k256 := "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"
	for _, tc := range []struct {
		key  string
		n    int
		want string
	}{
		{k128, 0, "bb1d6929e95937287fa37d129b756746"},
		{k128, 16, "070a16b46b4d4144f79bdd9dd04a287c"},
		{k128, 40, "dfa66747de9ae63030ca32611497c827"},
		{k128, 64, "51f0bebf7e3b9d92fc49741779363cfe"},
		{k256, 0, "028962f61b7bf89efc6b551f4667d983"},
		{k256, 16, "28a7023f452e8f82bd4bf28d8c37c35c"},
		{k256, 40, "aaf3d8f1de5640c232f5b169b9c911e6"},
		{k256, 64, "e1992190549f6ed5696a2c056c315410"},
	} {
		c, err := New(unhex(t, tc.key))
		if err != nil {
			t.Fatal(err)
		}
		got := c.Sum(nil, unhex(t, msg)[:tc.n])
		if !bytes.Equal(got, unhex(t, tc.want)) {
			t.Errorf("key %s.. len %d: got %x want %s", tc.key[:8], tc.n, got, tc.want)
		}
	}
}

func TestSubkeys(t *testing.T) {
	c, err := New(unhex(t, "2b7e151628aed2a6abf7158809cf4f3c"))
	if err != nil {
		t.Fatal(err)
	}
	if got := hex.EncodeToString(c.k1[:]); got != "fbeed618357133667c85e08f7236a8de" {
		t.Errorf("K1 = %s", got)
	}
	if got := hex.EncodeToString(c.k2[:]); got != "f7ddac306ae266ccf90bc11ee46d513b" {
		t.Errorf("K2 = %s", got)
	}
}

func TestBadKey(t *testing.T) {
	if _, err := New(make([]byte, 7)); err == nil {
		t.Fatal("7-byte key accepted")
	}
}

func BenchmarkSum16(b *testing.B) {
	c, _ := New(make([]byte, 32))
	msg := make([]byte, 16)
	out := make([]byte, 0, Size)
	for b.Loop() {
		out = c.Sum(out[:0], msg)
	}
}
