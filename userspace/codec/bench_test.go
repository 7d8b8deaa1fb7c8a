package codec

import (
	"crypto/aes"
	"crypto/cipher"
	"fmt"
	"testing"
	"time"

	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/userspace/replay"
)

const benchInner = 1400

func TestZeroAllocs(t *testing.T) {
	for _, f := range framings {
		a, b := pair(t, f, kdf.AESGCM128, nil)
		inner := ipv4(benchInner-28, 0)
		buf := make([]byte, a.Headroom()+len(inner)+a.Tailroom())
		dst := make([]byte, len(buf))
		out := make([]byte, len(inner))
		allocs := testing.AllocsPerRun(100, func() {
			copy(buf[a.Headroom():], inner)
			st, n, err := a.Seal(buf, a.Headroom(), len(inner))
			if err != nil {
				t.Fatal(err)
			}
			if _, _, r := b.Open(f, buf, st, n); r != Pass {
				t.Fatal(r)
			}
			m, err := a.SealTo(dst, inner)
			if err != nil {
				t.Fatal(err)
			}
			if _, r := b.OpenTo(f, out, dst[:m]); r != Pass {
				t.Fatal(r)
			}
			b.Open(f, buf, 0, 3) // a drop
		})
		if allocs != 0 {
			t.Errorf("%v: %v allocations per seal+open", f, allocs)
		}
	}
}

// BenchmarkVsBare interleaves batches of a codec transform with batches
// of a bare AES-GCM Seal or Open of the same packets and reports the rate
// ratio (bare time / codec time; 1.0 = no overhead) as "of-bare", plus
// both per-packet times. Interleaving keeps the two measurements under
// the same load, which separate benchmarks cannot on a shared host. One
// op is one batch.
func BenchmarkVsBare(b *testing.B) {
	const batch = 64
	for _, f := range framings {
		for _, s := range suites {
			a, rx := pair(b, f, s, nil)
			blk, _ := aes.NewCipher(testKey(s, 1).Bytes()) // the A→B key
			g, _ := cipher.NewGCM(blk)
			h := a.Headroom()
			no := a.nonceOff()
			inner := ipv4(benchInner-28, 0)
			buf := make([]byte, h+len(inner)+a.Tailroom())
			bare := make([]byte, len(buf))
			out := make([]byte, len(inner))
			pkts := make([][]byte, batch)
			for i := range pkts {
				pkts[i] = make([]byte, len(buf))
			}
			sa := rx.tab.Load().rx[0]

			for _, op := range []string{"Seal/InPlace", "Seal/Cross", "Open/InPlace", "Open/Cross"} {
				open := op[:4] == "Open"
				b.Run(fmt.Sprintf("%s/%v/%v", op, f, s), func(b *testing.B) {
					var tBare, tCodec time.Duration
					b.ReportAllocs()
					for b.Loop() {
						if open {
							b.StopTimer()
							for i := range pkts {
								if _, err := a.SealTo(pkts[i], inner); err != nil {
									b.Fatal(err)
								}
							}
							sa.mu.Lock()
							sa.win = replay.Window{}
							sa.mu.Unlock()
							b.StartTimer()
						}
						t0 := time.Now()
						for i := range batch {
							var err error
							r := Pass
							switch op {
							case "Seal/InPlace":
								copy(buf[h:], inner[:20]) // CheckInner reads the header
								_, _, err = a.Seal(buf, h, len(inner))
							case "Seal/Cross":
								_, err = a.SealTo(buf, inner)
							case "Open/InPlace":
								copy(buf, pkts[i])
								_, _, r = rx.Open(f, buf, 0, len(buf))
							case "Open/Cross":
								_, r = rx.OpenTo(f, out, pkts[i])
							}
							if err != nil || r != Pass {
								b.Fatal(err, r)
							}
						}
						t1 := time.Now()
						for i := range batch {
							p := pkts[i]
							if open {
								copy(bare, p)
								if _, err := g.Open(bare[h:h], p[no:no+12], bare[h:], p[:h]); err != nil {
									b.Fatal(err)
								}
							} else {
								g.Seal(bare[h:h], p[no:no+12], inner, p[:h])
							}
						}
						tCodec += t1.Sub(t0)
						tBare += time.Since(t1)
					}
					n := float64(b.N * batch)
					b.ReportMetric(float64(tCodec)/n, "ns/pkt")
					b.ReportMetric(float64(tBare)/n, "bare-ns/pkt")
					b.ReportMetric(float64(tBare)/float64(tCodec), "of-bare")
				})
			}
		}
	}
}

// BenchmarkSealOpen seals and opens one 1400-byte packet per op, in
// place, AES-GCM-256 under Geneve framing: the codec's whole per-packet
// work on both ends. make bench-instructions runs it under callgrind at
// two op counts, and the difference over the difference of ops is the
// instructions per packet, a figure that machine noise does not move.
func BenchmarkSealOpen(b *testing.B) {
	a, rx := pair(b, Geneve, kdf.AESGCM256, nil)
	inner := ipv4(benchInner-28, 0)
	h := a.Headroom()
	buf := make([]byte, h+len(inner)+a.Tailroom())
	for b.Loop() {
		copy(buf[h:], inner[:20]) // Seal reads the header Open decrypted in place
		st, n, err := a.Seal(buf, h, len(inner))
		if err != nil {
			b.Fatal(err)
		}
		if _, _, r := rx.Open(Geneve, buf, st, n); r != Pass {
			b.Fatal(r)
		}
	}
}

// BenchmarkSeal is BenchmarkSealOpen's sealing half alone.
func BenchmarkSeal(b *testing.B) {
	a, _ := pair(b, Geneve, kdf.AESGCM256, nil)
	inner := ipv4(benchInner-28, 0)
	h := a.Headroom()
	buf := make([]byte, h+len(inner)+a.Tailroom())
	for b.Loop() {
		copy(buf[h:], inner[:20]) // the previous Seal encrypted the header in place
		if _, _, err := a.Seal(buf, h, len(inner)); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkBareSeal is a bare AES-GCM-256 seal of the same packet under
// the same key: the baseline the codec's instruction count is read
// against.
func BenchmarkBareSeal(b *testing.B) {
	blk, _ := aes.NewCipher(testKey(kdf.AESGCM256, 1).Bytes())
	g, _ := cipher.NewGCM(blk)
	inner := ipv4(benchInner-28, 0)
	out := make([]byte, len(inner)+g.Overhead())
	nonce, aad := make([]byte, 12), make([]byte, 24)
	for b.Loop() {
		nonce[11]++
		g.Seal(out[:0], nonce, inner, aad)
	}
}
