package codec

import (
	"bytes"
	"testing"

	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/userspace/wire"
)

// fuzzOpen feeds arbitrary payloads to two receivers with identical SAs,
// one opening in place and one cross-buffer. Neither may panic; both must
// reach the same verdict and the same inner packet. The seeds include
// valid packets, empty authenticated payloads and replays, so the fuzzer
// starts past the AEAD.
func fuzzOpen(f *testing.F, fr Framing) {
	const s = kdf.AESGCM128
	key := testKey(s, 1)
	a, _ := pair(f, fr, s, nil)
	for i, inner := range [][]byte{ipv4(0, 0), ipv4(64, 1), ipv6(30, 2)} {
		f.Add(sealOne(f, a, inner))
		f.Add(forge(f, fr, s, key, uint32(spiAtoB), uint32(spiAtoB), uint64(100+i), wire.IPv4, nil))
		f.Add(forge(f, fr, s, key, uint32(spiAtoB), uint32(spiAtoB), uint64(200+i), wire.IPv6, inner))
	}
	f.Add([]byte{})
	f.Add(make([]byte, fr.HeaderLen()+wire.TagLen))

	f.Fuzz(func(t *testing.T, p []byte) {
		_, inPlace := pair(t, fr, s, nil)
		_, cross := pair(t, fr, s, nil)
		for round := range 2 { // the second round is a replay of an accepted packet
			buf := append([]byte(nil), p...)
			st, n, r1 := inPlace.Open(fr, buf, 0, len(buf))
			dst := make([]byte, len(p))
			m, r2 := cross.OpenTo(fr, dst, p)
			if r1 != r2 {
				t.Fatalf("round %d: in place %v, cross buffer %v", round, r1, r2)
			}
			if r1 != Pass {
				return
			}
			if n != m || !bytes.Equal(buf[st:st+n], dst[:m]) {
				t.Fatalf("round %d: outputs differ", round)
			}
			if _, err := wire.CheckInner(dst[:m]); err != nil {
				t.Fatalf("accepted a bad inner packet: %v", err)
			}
			if round == 1 {
				t.Fatal("replay accepted")
			}
		}
	})
}

func FuzzOpenGeneve(f *testing.F)    { fuzzOpen(f, Geneve) }
func FuzzOpenPSPTunnel(f *testing.F) { fuzzOpen(f, PSPTunnel) }

// FuzzSealEquivalence: Seal in place and SealTo produce the same bytes for
// the same counter, refuse the same inputs, and what they produce opens to
// the original packet.
func FuzzSealEquivalence(f *testing.F) {
	f.Add(ipv4(0, 0), uint8(0), false)
	f.Add(ipv4(100, 1), uint8(1), true)
	f.Add(ipv6(1, 2), uint8(0), true)
	f.Add([]byte{}, uint8(1), false)
	f.Add([]byte{0x45, 0, 0, 1}, uint8(0), false)
	f.Fuzz(func(t *testing.T, inner []byte, suite uint8, psp bool) {
		fr := Geneve
		if psp {
			fr = PSPTunnel
		}
		s := kdf.Suite(suite % 2)
		a1, b := pair(t, fr, s, nil)
		a2, _ := pair(t, fr, s, nil)
		// Slack around the packet catches writes outside the span.
		const slack = 7
		buf := make([]byte, slack+a1.Headroom()+len(inner)+a1.Tailroom()+slack)
		copy(buf[slack+a1.Headroom():], inner)
		st, n, err1 := a1.Seal(buf, slack+a1.Headroom(), len(inner))
		dst := make([]byte, a2.Overhead()+len(inner))
		m, err2 := a2.SealTo(dst, inner)
		if err1 != err2 {
			t.Fatalf("in place %v, cross buffer %v", err1, err2)
		}
		if err1 != nil {
			return
		}
		if st != slack || n != m || !bytes.Equal(buf[st:st+n], dst[:m]) {
			t.Fatalf("outputs differ")
		}
		if !bytes.Equal(buf[:slack], make([]byte, slack)) || !bytes.Equal(buf[st+n:], make([]byte, slack)) {
			t.Fatal("Seal wrote outside its span")
		}
		got, r := openOne(b, fr, dst[:m])
		if r != Pass || !bytes.Equal(got, inner) {
			t.Fatalf("round trip: %v", r)
		}
	})
}
