package codec

import (
	"bytes"
	"encoding/binary"
	"runtime"
	"strings"
	"testing"

	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/userspace/wire"
)

// ciphertext returns the encrypted inner packet of a sealed payload
// (without header and tag) and the payload's 12-byte nonce.
func ciphertext(t *testing.T, c *Codec, payload []byte) (ct, nonce []byte) {
	t.Helper()
	if len(payload) < c.Overhead() {
		t.Fatalf("payload of %d bytes is shorter than the overhead", len(payload))
	}
	return payload[c.Headroom() : len(payload)-c.Tailroom()], payload[c.nonceOff() : c.nonceOff()+wire.NonceLen]
}

func xor(a, b []byte) []byte {
	out := make([]byte, min(len(a), len(b)))
	for i := range out {
		out[i] = a[i] ^ b[i]
	}
	return out
}

// TestTXKeyNeverReinstalled is issue 12 item 1 on the data-plane side: a
// TX key that was installed before, even one long retired, is refused,
// whether it comes back under its old SPI or a new one. Without that a
// peer that gets the key exchange to derive the same key again makes the
// codec start its counter at 1 again: two packets under one (key, nonce),
// and ct1 ^ ct2 == pt1 ^ pt2.
func TestTXKeyNeverReinstalled(t *testing.T) {
	for _, f := range framings {
		for _, s := range suites {
			c := mustNew(t, Config{Framing: f})
			k1, k2 := testKey(s, 1), testKey(s, 2)
			const spi1, spi2 kdf.SPI = 0x40000101, 0x40000102
			pt1, pt2 := ipv4(40, 0x11), ipv4(40, 0x5a)

			must(t, c.InstallTX(SA{SPI: spi1, Suite: s, Key: k1}))
			ct1, n1 := ciphertext(t, c, sealOne(t, c, pt1))
			must(t, c.InstallTX(SA{SPI: spi2, Suite: s, Key: k2})) // retires spi1 and wipes the codec's copy of k1
			sealOne(t, c, ipv4(1, 0))

			err := c.InstallTX(SA{SPI: spi1, Suite: s, Key: k1})
			if err == nil {
				ct2, n2 := ciphertext(t, c, sealOne(t, c, pt2))
				if bytes.Equal(n1, n2) && bytes.Equal(xor(ct1, ct2), xor(pt1, pt2)) {
					t.Fatalf("%v/%v: retired TX SA re-installed: nonce %x sealed twice under one key, ct1^ct2 == pt1^pt2", f, s, n1)
				}
				t.Fatalf("%v/%v: retired TX SA re-installed without error", f, s)
			}
			if !strings.Contains(err.Error(), "installed before") || !strings.Contains(err.Error(), "nonce reuse") {
				t.Errorf("%v/%v: error %q does not say why", f, s, err)
			}
			// The same key under another SPI is refused too: the SPI is part
			// of the nonce, but a repeated key means the key schedule is being
			// played, and no honest derivation produces it.
			if err := c.InstallTX(SA{SPI: 0x40000103, Suite: s, Key: k1}); err == nil || !strings.Contains(err.Error(), "installed before") {
				t.Errorf("%v/%v: earlier key under a new SPI: got %v", f, s, err)
			}
			// The refusals changed nothing: spi2 stays live, its counter goes on.
			h, err := wire.Parse(f, sealOne(t, c, ipv4(1, 0)))
			if err != nil || h.SPI != uint32(spi2) || h.Counter != 2 {
				t.Errorf("%v/%v: after refusals: %+v %v, want spi %v counter 2", f, s, h, err, spi2)
			}
		}
	}
}

// TestTXKeyRefusedAfterExpiry: a TX SA that expired (the codec holds no
// TX SA at all) does not make its key installable again.
func TestTXKeyRefusedAfterExpiry(t *testing.T) {
	s := kdf.AESGCM128
	clk := newClock()
	c := mustNew(t, Config{Framing: Geneve, Now: clk.Now})
	clk.use(c)
	must(t, c.InstallTX(SA{SPI: 7, Suite: s, Key: testKey(s, 1)}))
	sealOne(t, c, ipv4(1, 0))
	clk.Advance(DefaultHardLifetime)
	if len(c.Stats().SAs) != 0 {
		t.Fatal("TX SA not expired")
	}
	if err := c.InstallTX(SA{SPI: 7, Suite: s, Key: testKey(s, 1)}); err == nil || !strings.Contains(err.Error(), "installed before") {
		t.Fatalf("expired key re-installed: %v", err)
	}
	must(t, c.InstallTX(SA{SPI: 7, Suite: s, Key: testKey(s, 2)}))
}

// TestTXKeyHistorySharedAcrossCodecs: with one KeyHistory for the data
// plane, a peer removed (its codec closed) and added back cannot be given
// an earlier TX key either, nor can another peer's codec.
func TestTXKeyHistorySharedAcrossCodecs(t *testing.T) {
	s := kdf.AESGCM256
	h := NewKeyHistory()
	first := mustNew(t, Config{Framing: PSPTunnel, TXKeys: h})
	must(t, first.InstallTX(SA{SPI: 0x40000100, Suite: s, Key: testKey(s, 1)}))
	must(t, first.InstallTX(SA{SPI: 0x40000101, Suite: s, Key: testKey(s, 2)}))
	first.Close()

	again := mustNew(t, Config{Framing: PSPTunnel, TXKeys: h})
	for _, seed := range []byte{1, 2} {
		if err := again.InstallTX(SA{SPI: 0x40000100, Suite: s, Key: testKey(s, seed)}); err == nil || !strings.Contains(err.Error(), "installed before") {
			t.Errorf("key %d of a closed codec accepted by its successor: %v", seed, err)
		}
	}
	must(t, again.InstallTX(SA{SPI: 0x40000100, Suite: s, Key: testKey(s, 3)}))
	if n := h.Len(); n != 3 {
		t.Errorf("history holds %d keys, want 3 (refusals add none)", n)
	}
	// A codec with a history of its own knows nothing of the shared one.
	own := mustNew(t, Config{Framing: PSPTunnel})
	must(t, own.InstallTX(SA{SPI: 0x40000100, Suite: s, Key: testKey(s, 1)}))
}

// TestTXKeyHistoryRace: codecs installing the same key at once: exactly
// one wins.
func TestTXKeyHistoryRace(t *testing.T) {
	s := kdf.AESGCM128
	h := NewKeyHistory()
	const n = 8
	errs := make(chan error, n)
	for i := range n {
		c := mustNew(t, Config{Framing: Geneve, TXKeys: h})
		go func() { errs <- c.InstallTX(SA{SPI: kdf.SPI(0x40000001 + i), Suite: s, Key: testKey(s, 9)}) }()
	}
	ok := 0
	for range n {
		if <-errs == nil {
			ok++
		}
	}
	if ok != 1 {
		t.Fatalf("%d of %d concurrent installs of one key succeeded, want 1", ok, n)
	}
}

// TestKeyHistoryHoldsNoKeyBytes: the record is fingerprints, keyed per
// history: the same key has different fingerprints in two histories, and
// no fingerprint contains the key.
func TestKeyHistoryHoldsNoKeyBytes(t *testing.T) {
	s := kdf.AESGCM256
	k := testKey(s, 1)
	h1, h2 := NewKeyHistory(), NewKeyHistory()
	if !h1.add(k) || !h2.add(k) || h1.add(k) {
		t.Fatal("add: want new, new, seen")
	}
	if h1.mac == h2.mac {
		t.Fatal("two histories share a fingerprint key")
	}
	var fp1, fp2 [FingerprintLen]byte
	for fp := range h1.seen {
		fp1 = fp
	}
	for fp := range h2.seen {
		fp2 = fp
	}
	if fp1 == fp2 {
		t.Error("fingerprints of one key equal across histories: not keyed")
	}
	for _, fp := range [][FingerprintLen]byte{fp1, fp2} {
		if bytes.Contains(fp[:], k.Bytes()[:8]) || bytes.Equal(fp[:], k.Bytes()) {
			t.Errorf("fingerprint %x holds key bytes", fp)
		}
	}
}

// BenchmarkKeyHistoryAdd reports the memory one remembered key costs,
// map overhead included (bytes/key).
func BenchmarkKeyHistoryAdd(b *testing.B) {
	h := NewKeyHistory()
	key := make([]byte, 16)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := 0; b.Loop(); i++ {
		binary.BigEndian.PutUint64(key, uint64(i)+1)
		if !h.add(secret.Own(key)) {
			b.Fatal("fresh key seen")
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/float64(h.Len()), "bytes/key")
	runtime.KeepAlive(h)
}
