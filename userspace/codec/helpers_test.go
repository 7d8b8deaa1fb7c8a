package codec

import (
	"crypto/aes"
	"crypto/cipher"
	"sync"
	"testing"
	"time"

	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/userspace/wire"
)

// fakeClock is a test clock with timers that fire when Advance passes
// their deadline. The real clock and timers are exercised by every test
// that leaves Config.Now nil, and by TestRealTimers.
type fakeClock struct {
	mu     sync.Mutex
	t      time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	at      time.Time
	f       func()
	stopped bool
}

// use makes c run on the fake clock's timers.
func (c *fakeClock) use(cd *Codec) { cd.afterFunc = c.AfterFunc }

func (c *fakeClock) AfterFunc(d time.Duration, f func()) func() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	ft := &fakeTimer{at: c.t.Add(d), f: f}
	c.timers = append(c.timers, ft)
	return func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		was := !ft.stopped
		ft.stopped = true
		return was
	}
}

func newClock() *fakeClock { return &fakeClock{t: time.Unix(1_800_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	var due []func()
	keep := c.timers[:0]
	for _, ft := range c.timers {
		switch {
		case ft.stopped:
		case !ft.at.After(c.t):
			ft.stopped = true
			due = append(due, ft.f)
		default:
			keep = append(keep, ft)
		}
	}
	c.timers = keep
	c.mu.Unlock()
	for _, f := range due {
		f()
	}
}

// testKey is a deterministic non-zero key for suite s.
func testKey(s kdf.Suite, seed byte) secret.Key {
	b := make([]byte, s.KeyLen())
	for i := range b {
		b[i] = seed ^ byte(i*7+1)
	}
	return secret.Own(b)
}

const (
	spiAtoB kdf.SPI = 0x40000001 // B receives on it (responder-allocated)
	spiBtoA kdf.SPI = 0x00000001 // A receives on it
)

// pair returns two codecs wired to each other: A seals to B, B to A.
func pair(t testing.TB, f Framing, s kdf.Suite, clk *fakeClock) (a, b *Codec) {
	t.Helper()
	cfg := Config{Framing: f}
	if clk != nil {
		cfg.Now = clk.Now
	}
	a, b = mustNew(t, cfg), mustNew(t, cfg)
	if clk != nil {
		clk.use(a)
		clk.use(b)
	}
	kab, kba := testKey(s, 1), testKey(s, 2)
	must(t, a.InstallTX(SA{SPI: spiAtoB, Suite: s, Key: kab}))
	must(t, b.InstallRX(SA{SPI: spiAtoB, Suite: s, Key: kab}))
	must(t, b.InstallTX(SA{SPI: spiBtoA, Suite: s, Key: kba}))
	must(t, a.InstallRX(SA{SPI: spiBtoA, Suite: s, Key: kba}))
	return a, b
}

func mustNew(t testing.TB, cfg Config) *Codec {
	t.Helper()
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// ipv4 is a well-formed IPv4/UDP packet with n payload bytes.
func ipv4(n int, fill byte) []byte {
	p := make([]byte, 28+n)
	p[0], p[8], p[9] = 0x45, 64, 17
	p[2], p[3] = byte(len(p)>>8), byte(len(p))
	copy(p[12:], []byte{10, 0, 0, 1, 10, 0, 0, 2})
	for i := 28; i < len(p); i++ {
		p[i] = fill + byte(i)
	}
	return p
}

// ipv6 is a well-formed IPv6/UDP packet with n payload bytes.
func ipv6(n int, fill byte) []byte {
	p := make([]byte, 48+n)
	p[0], p[6], p[7] = 0x60, 17, 64
	p[4], p[5] = byte((8+n)>>8), byte(8+n)
	p[23], p[39] = 1, 2
	for i := 48; i < len(p); i++ {
		p[i] = fill + byte(i)
	}
	return p
}

// forge is the tests' reference encoder: it builds a UDP payload from
// first principles with its own AES-GCM, for any counter, any nonce SPI
// and any inner bytes (even ones Seal refuses).
func forge(t testing.TB, f Framing, s kdf.Suite, key secret.Key, spi, nonceSPI uint32, ctr uint64, announce wire.Inner, inner []byte) []byte {
	t.Helper()
	blk, err := aes.NewCipher(key.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	g, err := cipher.NewGCM(blk)
	if err != nil {
		t.Fatal(err)
	}
	var hdr []byte
	if f == Geneve {
		hdr = make([]byte, wire.GeneveHeaderLen)
		wire.PutGeneve(hdr, announce, spi, ctr)
		hdr[20], hdr[21], hdr[22], hdr[23] = byte(nonceSPI>>24), byte(nonceSPI>>16), byte(nonceSPI>>8), byte(nonceSPI)
	} else {
		hdr = make([]byte, wire.PSPHeaderLen)
		wire.PSPHeader{NextHeader: announce.IPProto(), Version: uint8(s), SPI: spi, IV: ctr}.Put(hdr)
		if nonceSPI != spi {
			t.Fatal("PSP has no separate nonce SPI")
		}
	}
	nonce := append([]byte(nil), hdr[len(hdr)-12:]...)
	return g.Seal(hdr, nonce, inner, hdr)
}

// sealOne seals inner with c (in place) and returns a copy of the payload.
func sealOne(t testing.TB, c *Codec, inner []byte) []byte {
	t.Helper()
	buf := make([]byte, c.Headroom()+len(inner)+c.Tailroom())
	copy(buf[c.Headroom():], inner)
	s, n, err := c.Seal(buf, c.Headroom(), len(inner))
	if err != nil {
		t.Fatal(err)
	}
	return append([]byte(nil), buf[s:s+n]...)
}

// openOne opens a copy of payload in place.
func openOne(c *Codec, f Framing, payload []byte) ([]byte, DropReason) {
	buf := append([]byte(nil), payload...)
	s, n, r := c.Open(f, buf, 0, len(buf))
	if r != Pass {
		return nil, r
	}
	return buf[s : s+n], r
}

var (
	framings = []Framing{Geneve, PSPTunnel}
	suites   = []kdf.Suite{kdf.AESGCM128, kdf.AESGCM256}
)
