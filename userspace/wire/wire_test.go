package wire

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
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

func gcm(t testing.TB, key []byte) cipher.AEAD {
	t.Helper()
	b, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	a, err := cipher.NewGCM(b)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// PSP reference packet vectors V-A (v0) and V-B (v1) from psp.md §3.5:
// psp_encrypt output for an IPv4/TCP frame, SPI 0x12345678, IV 1.
var pspVectors = []struct {
	name    string
	version uint8
	key     string
	frame   string
}{
	{"V-A", 0, "96c22dc799198090b74b70ae468e4e30",
		"008899aabb00002233445500080045000060000040004011268b0a0000010a0000027da903e8004c0000060100011234567800000000000000012d9ea697458315d5f8910db8af55da4bc2f2e80fffe1ae83bd119bd6718289c8fc334389f029de0e39a80de7f0858bec486b4f85"},
	{"V-B", 1, "2b7d72074e42ca334487f2990e3f8c4037e436f38283449b76463e9b7fb2e3de",
		"008899aabb00002233445500080045000060000040004011268b0a0000010a0000027da903e8004c0000060100051234567800000000000000014b4012fc407edf63fb009bec65cfde2f6600225d1c620180f347e1eee51c9d6d22f9746a704eb170e64b9cd8f538bace7da16dfa"},
}

// The cleartext frame both vectors encrypt; its TCP segment starts at 34.
const pspClearFrame = "008899aabb0000223344550008004500003800004000400626be0a0000010a0000022b6756ce00000001000000015018ffffe1420000000102030405060708090a0b0c0d0e0f"

const ethIPUDP = 14 + 20 + 8

func TestPSPTransportVectors(t *testing.T) {
	segment := unhex(t, pspClearFrame)[14+20:]
	for _, v := range pspVectors {
		t.Run(v.name, func(t *testing.T) {
			want := unhex(t, v.frame)[ethIPUDP:] // the UDP payload on port 1000
			h := PSPHeader{NextHeader: 6, Version: v.version, SPI: 0x12345678, IV: 1}
			got, err := AppendPSPTransport(nil, gcm(t, unhex(t, v.key)), h, segment)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("payload mismatch\n got %x\nwant %x", got, want)
			}
			// Header, nonce and AAD as psp.md lists them.
			wantAAD := map[uint8]string{0: "06010001123456780000000000000001", 1: "06010005123456780000000000000001"}[v.version]
			if hex.EncodeToString(got[:PSPHeaderLen]) != wantAAD {
				t.Errorf("header/AAD %x want %s", got[:PSPHeaderLen], wantAAD)
			}
			if n := hex.EncodeToString(got[PSPNonceOff : PSPNonceOff+NonceLen]); n != "123456780000000000000001" {
				t.Errorf("nonce %s", n)
			}
			back, err := ParsePSPHeader(want)
			if err != nil || back != h {
				t.Fatalf("ParsePSPHeader = %+v, %v; want %+v", back, err, h)
			}
		})
	}
}

func TestPSPTransportCryptOffset(t *testing.T) {
	a := gcm(t, make([]byte, 16))
	seg := []byte("0123456789abcdefghij")
	out, err := AppendPSPTransport([]byte("prefix"), a, PSPHeader{NextHeader: 17, CryptOffset: 2, SPI: 1, IV: 9}, seg)
	if err != nil {
		t.Fatal(err)
	}
	p := out[len("prefix"):]
	if !bytes.Equal(p[16:24], seg[:8]) {
		t.Fatalf("crypt-offset bytes not in the clear: %x", p[16:24])
	}
	pt, err := a.Open(nil, p[4:16], p[24:], p[:24])
	if err != nil || !bytes.Equal(pt, seg[8:]) {
		t.Fatalf("AAD must be header + crypt-offset bytes: %v", err)
	}
	if _, err := AppendPSPTransport(nil, a, PSPHeader{CryptOffset: 6}, seg); err == nil {
		t.Fatal("crypt offset past the segment accepted")
	}
}

func TestGeneveLayoutPinned(t *testing.T) {
	b := make([]byte, GeneveHeaderLen+TagLen)
	PutGeneve(b, IPv6, 0xC0000005, 0x0102030405060708)
	want := "06" + "40" + "86dd" + "00000000" +
		"ff50" + "81" + "01" + "c0000005" +
		"ff50" + "82" + "03" + "c0000005" + "0102030405060708"
	if got := hex.EncodeToString(b[:GeneveHeaderLen]); got != want {
		t.Fatalf("geneve header\n got %s\nwant %s", got, want)
	}
	h, err := Parse(Geneve, b)
	if err != nil {
		t.Fatal(err)
	}
	if h.SPI != 0xC0000005 || h.NonceSPI != 0xC0000005 || h.Counter != 0x0102030405060708 || h.Inner != IPv6 ||
		h.AADLen != GeneveHeaderLen || h.HeaderLen != GeneveHeaderLen || h.NonceOff != GeneveNonceOff || h.Version != NoVersion {
		t.Fatalf("parsed %+v", h)
	}
	if spi, ok := PeekSPI(Geneve, b); !ok || spi != 0xC0000005 {
		t.Fatalf("PeekSPI = %#x %v", spi, ok)
	}
}

func TestGeneveParseRefuses(t *testing.T) {
	good := make([]byte, GeneveHeaderLen+TagLen)
	PutGeneve(good, IPv4, 7, 1)
	for _, tc := range []struct {
		name string
		mut  func(b []byte) []byte
	}{
		{"short", func(b []byte) []byte { return b[:GeneveHeaderLen+TagLen-1] }},
		{"version", func(b []byte) []byte { b[0] |= 0x40; return b }},
		{"optlen", func(b []byte) []byte { b[0] = 5; return b }},
		{"O bit", func(b []byte) []byte { b[1] |= 0x80; return b }},
		{"C bit", func(b []byte) []byte { b[1] = 0; return b }},
		{"ethertype", func(b []byte) []byte { b[2], b[3] = 0x65, 0x58; return b }},
		{"spi class", func(b []byte) []byte { b[9] = 0; return b }},
		{"spi type", func(b []byte) []byte { b[10] = 0x01; return b }},
		{"spi len", func(b []byte) []byte { b[11] = 2; return b }},
		{"nonce class", func(b []byte) []byte { b[16] = 0; return b }},
		{"nonce type", func(b []byte) []byte { b[18] = 0x81; return b }},
		{"nonce len", func(b []byte) []byte { b[19] = 2; return b }},
	} {
		b := tc.mut(append([]byte(nil), good...))
		if _, err := Parse(Geneve, b); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
	if _, err := Parse(Framing(9), good); err == nil {
		t.Error("unknown framing accepted")
	}
}

func TestPSPTunnelParse(t *testing.T) {
	b := make([]byte, 64)
	PSPHeader{NextHeader: 41, CryptOffset: 3, Version: 1, SPI: 0x80000001, IV: 42}.Put(b)
	h, err := Parse(PSPTunnel, b)
	if err != nil {
		t.Fatal(err)
	}
	if h.Inner != IPv6 || h.AADLen != 16+12 || h.HeaderLen != 16 || h.Counter != 42 || h.SPI != 0x80000001 || h.Version != 1 {
		t.Fatalf("parsed %+v", h)
	}
	for _, tc := range []struct {
		name string
		mut  func(b []byte) []byte
	}{
		{"transport next header", func(b []byte) []byte { b[0] = 6; return b }},
		{"always-1 bit", func(b []byte) []byte { b[3] &^= 1; return b }},
		{"VC", func(b []byte) []byte { b[1], b[3] = 2, b[3]|2; return b }},
		{"hdr ext len", func(b []byte) []byte { b[1] = 2; return b }},
		{"short for crypt offset", func(b []byte) []byte { return b[:16+12+15] }},
		{"short", func(b []byte) []byte { return b[:15] }},
	} {
		if _, err := Parse(PSPTunnel, tc.mut(append([]byte(nil), b...))); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
}

func TestCheckInner(t *testing.T) {
	v4 := make([]byte, 28)
	v4[0], v4[3] = 0x45, 28
	v6 := make([]byte, 48)
	v6[0], v6[5] = 0x60, 8
	for _, tc := range []struct {
		name string
		p    []byte
		want Inner
		err  error
	}{
		{"ipv4", v4, IPv4, nil},
		{"ipv6", v6, IPv6, nil},
		{"ipv6 no payload", append([]byte{0x60}, make([]byte, 39)...), IPv6, nil},
		{"empty", nil, 0, ErrEmpty},
		{"not ip", []byte{0x20, 1, 2}, 0, ErrNotIP},
		{"v4 short", v4[:19], 0, ErrInnerHead},
		{"v4 trailing", append(append([]byte(nil), v4...), 0), 0, ErrInnerLen},
		{"v4 truncated", v4[:27], 0, ErrInnerLen},
		{"v4 ihl", append([]byte{0x44}, v4[1:]...), 0, ErrInnerLen},
		{"v6 short", v6[:39], 0, ErrInnerHead},
		{"v6 len", v6[:47], 0, ErrInnerLen},
	} {
		got, err := CheckInner(tc.p)
		if got != tc.want || err != tc.err {
			t.Errorf("%s: got %v, %v; want %v, %v", tc.name, got, err, tc.want, tc.err)
		}
	}
}

func TestFramingNames(t *testing.T) {
	for _, f := range []Framing{Geneve, PSPTunnel} {
		g, err := ParseFraming(f.String())
		if err != nil || g != f || !f.Valid() || f.Port() == 0 || f.HeaderLen() == 0 {
			t.Errorf("%v: round trip %v %v", f, g, err)
		}
	}
	if Geneve.Port() != 6081 || PSPTunnel.Port() != 1000 {
		t.Error("ports")
	}
	if _, err := ParseFraming("vxlan"); err == nil {
		t.Error("unknown name accepted")
	}
}
