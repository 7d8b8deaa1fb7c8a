package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/pspd/pspd/internal/logscan"
	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/kdf"
)

var testKey = []byte{0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xf0, 0x0f}

// samples holds one valid message of every type.
func samples() []Message {
	return []Message{
		Hello{Backends: NewBackends(BackendXFRM, BackendUserspace), Suites: NewSuites(kdf.AESGCM128, kdf.AESGCM256), BootID: BootID{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}, SPIFloor: 42},
		SAOffer{Assoc: 7, Generation: 3, Backend: BackendXFRM, Suite: kdf.AESGCM256, RxSPI: 0x00000005},
		SAAck{Assoc: 7, Generation: 3, Backend: BackendXFRM, Suite: kdf.AESGCM256, RxSPI: 0x40000009},
		SAConfirm{Assoc: 7, Generation: 3},
		ExplicitKey{Assoc: 1, Generation: 1, Suite: kdf.AESGCM128, SPI: 0x80000012, Key: secret.New(testKey),
			Local: netip.MustParseAddrPort("10.0.0.1:40000"), Remote: netip.MustParseAddrPort("10.0.0.2:5201")},
		ExplicitKey{Assoc: 2, Generation: 9, Suite: kdf.AESGCM128, SPI: 0x12, Key: secret.New(testKey),
			Local: netip.MustParseAddrPort("[fd00::1]:1"), Remote: netip.MustParseAddrPort("[fd00::2]:65535")},
		Rekey{Assoc: 99},
		Delete{Assoc: 7, Generation: 2},
		Error{Code: CodeInstall, Text: "xfrm: add SA spi=0x5: no such device"},
		Goodbye{Reason: GoodbyeShutdown},
		Goodbye{Reason: GoodbyeRemoved},
		Hello{Backends: NewBackends(BackendXFRM), Suites: NewSuites(kdf.AESGCM128), BootID: BootID{9}, SPIFloor: 300,
			Observed: netip.MustParseAddrPort("198.51.100.1:6082")},
		Hello{Backends: NewBackends(BackendXFRM), Suites: NewSuites(kdf.AESGCM256), BootID: BootID{9},
			Observed: netip.MustParseAddrPort("[2001:db8::1]:40000")},
		Hello{Backends: NewBackends(BackendXFRM), Suites: NewSuites(kdf.AESGCM256), BootID: BootID{9},
			Observed: netip.MustParseAddrPort("198.51.100.1:6082"), Source: netip.MustParseAddrPort("10.9.0.2:6082")},
		Hello{Backends: NewBackends(BackendXFRM), Suites: NewSuites(kdf.AESGCM256), BootID: BootID{9},
			Source: netip.MustParseAddrPort("[fd00::2]:6082")},
		Hello{Backends: NewBackends(BackendPSP, BackendXFRM), Suites: NewSuites(kdf.AESGCM256), BootID: BootID{9},
			Observed: netip.MustParseAddrPort("198.51.100.1:6082"), Source: netip.MustParseAddrPort("10.9.0.2:6082"), PSP: 0b0011, PSPKnown: true},
		// A host with kernel PSP whose devices accept no version says so.
		Hello{Backends: NewBackends(BackendPSP), Suites: NewSuites(kdf.AESGCM128), BootID: BootID{9}, PSPKnown: true},
	}
}

func frame(t testing.TB, m Message) []byte {
	t.Helper()
	b, err := AppendFrame(nil, m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestRoundTrip(t *testing.T) {
	for _, m := range samples() {
		b := frame(t, m)
		got, err := Decode(b)
		if err != nil {
			t.Fatalf("%s: %v", m.Type(), err)
		}
		if !equal(got, m) {
			t.Fatalf("%s: got %v want %v", m.Type(), got, m)
		}
		got, err = ReadMessage(bytes.NewReader(b))
		if err != nil || !equal(got, m) {
			t.Fatalf("%s via ReadMessage: %v %v", m.Type(), got, err)
		}
	}
}

// equal compares messages; ExplicitKey's key is compared with Equal since
// secret.Key hides its bytes from reflect-based printing only, not from ==.
func equal(a, b Message) bool {
	ea, ok1 := a.(ExplicitKey)
	eb, ok2 := b.(ExplicitKey)
	if ok1 && ok2 {
		k1, k2 := ea.Key, eb.Key
		ea.Key, eb.Key = secret.Key{}, secret.Key{}
		return k1.Equal(k2) && reflect.DeepEqual(ea, eb)
	}
	return reflect.DeepEqual(a, b)
}

func code(err error) ErrorCode {
	var pe *ProtocolError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return 0
}

func TestTruncatedFramesRejected(t *testing.T) {
	for _, m := range samples() {
		b := frame(t, m)
		for n := 0; n < len(b); n++ {
			if _, err := Decode(b[:n]); code(err) != CodeMalformed {
				t.Errorf("%s cut to %d bytes: %v", m.Type(), n, err)
			}
			_, err := ReadMessage(bytes.NewReader(b[:n]))
			if n == 0 && err != io.EOF {
				t.Errorf("empty stream: %v, want io.EOF", err)
			}
			if n > 0 && code(err) != CodeMalformed {
				t.Errorf("%s read cut to %d bytes: %v", m.Type(), n, err)
			}
		}
		if _, err := Decode(append(b, 0)); code(err) != CodeMalformed {
			t.Errorf("%s with a trailing byte: %v", m.Type(), err)
		}
	}
}

func TestBodyLengthMismatchRejected(t *testing.T) {
	// A frame whose declared length covers extra bytes is malformed for
	// every fixed-size message.
	for _, m := range samples() {
		if _, ok := m.(Error); ok {
			continue // its text takes the rest of the body
		}
		b := append(frame(t, m), 0xff)
		b[3]++
		if _, err := Decode(b); code(err) != CodeMalformed {
			t.Errorf("%s with a longer body: %v", m.Type(), err)
		}
	}
}

func TestOversizeRejectedBeforeBody(t *testing.T) {
	hdr := []byte{Version, byte(TypeError), 0xff, 0xff}
	r := &countingReader{r: io.MultiReader(bytes.NewReader(hdr), neverEnding{})}
	if _, err := ReadMessage(r); code(err) != CodeTooLarge {
		t.Fatalf("oversize frame: %v", err)
	}
	if r.n != len(hdr) {
		t.Fatalf("read %d bytes, want only the %d header bytes", r.n, len(hdr))
	}
	if _, err := AppendFrame(nil, Error{Code: 1, Text: strings.Repeat("x", 10000)}); err != nil {
		t.Fatalf("long error text must be truncated, got %v", err)
	}
}

func TestUnknownVersionAndType(t *testing.T) {
	b := frame(t, Rekey{Assoc: 1})
	b[0] = 2
	if _, err := Decode(b); code(err) != CodeVersion {
		t.Errorf("version 2: %v", err)
	}
	for _, typ := range []byte{0, byte(TypeGoodbye) + 1, 0xff} {
		b := frame(t, Rekey{Assoc: 1})
		b[1] = typ
		if _, err := Decode(b); code(err) != CodeType {
			t.Errorf("type %d: %v", typ, err)
		}
	}
}

func TestInvalidFieldsRejected(t *testing.T) {
	bad := []Message{
		Hello{Backends: 0, Suites: NewSuites(kdf.AESGCM128), BootID: BootID{1}},
		Hello{Backends: NewBackends(BackendPSP), Suites: 0, BootID: BootID{1}},
		Hello{Backends: NewBackends(BackendPSP), Suites: NewSuites(kdf.AESGCM128)},
		Hello{Backends: 0x80, Suites: NewSuites(kdf.AESGCM128), BootID: BootID{1}},
		Hello{Backends: NewBackends(BackendPSP), Suites: NewSuites(kdf.AESGCM128), BootID: BootID{1}, SPIFloor: kdf.MaxKeyID},
		SAOffer{Assoc: 1, Backend: 0, Suite: kdf.AESGCM128, RxSPI: 1},
		SAOffer{Assoc: 1, Backend: BackendXFRM, Suite: 7, RxSPI: 1},
		SAAck{Assoc: 1, Backend: BackendXFRM, Suite: kdf.AESGCM128, RxSPI: 0x80000000},
		ExplicitKey{Suite: kdf.AESGCM256, SPI: 1, Key: secret.New(testKey), // 16-byte key for a 32-byte suite
			Local: netip.MustParseAddrPort("10.0.0.1:1"), Remote: netip.MustParseAddrPort("10.0.0.2:2")},
		ExplicitKey{Suite: kdf.AESGCM128, SPI: 1, Key: secret.New(testKey),
			Local: netip.MustParseAddrPort("10.0.0.1:1"), Remote: netip.MustParseAddrPort("[fd00::2]:2")},
		ExplicitKey{Suite: kdf.AESGCM128, SPI: 1, Key: secret.New(testKey),
			Local: netip.MustParseAddrPort("10.0.0.1:0"), Remote: netip.MustParseAddrPort("10.0.0.2:2")},
	}
	for i, m := range bad {
		if _, err := Decode(frame(t, m)); code(err) != CodeMalformed {
			t.Errorf("bad[%d] %T accepted: %v", i, m, err)
		}
	}
	for _, r := range []byte{0, 3, 0xff} {
		if _, err := Decode([]byte{Version, byte(TypeGoodbye), 0, 1, r}); code(err) != CodeMalformed {
			t.Errorf("goodbye reason %d: %v", r, err)
		}
	}
	b := frame(t, Error{Code: 1, Text: "ok"})
	b[len(b)-1] = 0xff
	if _, err := Decode(b); code(err) != CodeMalformed {
		t.Errorf("invalid UTF-8 error text: %v", err)
	}
}

func TestExplicitKeyNeverPrinted(t *testing.T) {
	m := samples()[4].(ExplicitKey)
	var out bytes.Buffer
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%x", "%q"} {
		fmt.Fprintf(&out, verb+"\n", m)
		fmt.Fprintf(&out, verb+"\n", &m)
		fmt.Fprintf(&out, verb+"\n", Message(m))
	}
	logscan.AssertNoKeys(t, out.Bytes(), m.Key)
	if !strings.Contains(out.String(), "spi=0x80000012") {
		t.Fatalf("String lost the non-secret fields: %s", out.String())
	}
}

func TestReadMessageWipesBody(t *testing.T) {
	m := samples()[4].(ExplicitKey)
	b := frame(t, m)
	wr := &wipeCheckReader{data: b}
	got, err := ReadMessage(wr)
	if err != nil {
		t.Fatal(err)
	}
	if !got.(ExplicitKey).Key.Equal(m.Key) {
		t.Fatal("key lost")
	}
	if logscan.Scan(wr.seen(), testKey) != nil {
		t.Fatal("ReadMessage left the key in its body buffer")
	}
}

func FuzzDecode(f *testing.F) {
	for _, m := range samples() {
		b, _ := AppendFrame(nil, m)
		f.Add(b)
	}
	f.Add([]byte{})
	f.Add([]byte{Version, byte(TypeError), 0, 2, 0, 1})
	f.Add([]byte{Version, 0xff, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Decode(b)
		if err != nil {
			if m != nil || code(err) == 0 {
				t.Fatalf("error %v with message %v or without a code", err, m)
			}
			return
		}
		// Anything accepted re-encodes to bytes that decode to the same
		// message: no known field is dropped or normalised. Only a Hello's
		// extensions of types this version does not know are skipped, so
		// the bytes themselves may shrink there.
		again, err := AppendFrame(nil, m)
		if err != nil {
			t.Fatal(err)
		}
		m2, err := Decode(again)
		if err != nil || !equal(m2, m) {
			t.Fatalf("re-encoding does not decode to the same message (%v):\n in %x\nout %x", err, b, again)
		}
		if _, hello := m.(Hello); !hello && !bytes.Equal(again, b) {
			t.Fatalf("re-encoding differs:\n in %x\nout %x", b, again)
		}
		rm, err := ReadMessage(bytes.NewReader(b))
		if err != nil || !equal(rm, m) {
			t.Fatalf("ReadMessage disagrees with Decode: %v", err)
		}
	})
}

type neverEnding struct{}

func (neverEnding) Read(p []byte) (int, error) { return len(p), nil }

type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// wipeCheckReader remembers the buffers ReadMessage read into, so the test
// can look at them after ReadMessage returned.
type wipeCheckReader struct {
	data []byte
	bufs [][]byte
}

func (w *wipeCheckReader) Read(p []byte) (int, error) {
	if len(w.data) == 0 {
		return 0, io.EOF
	}
	n := copy(p, w.data)
	w.data = w.data[n:]
	w.bufs = append(w.bufs, p[:n])
	return n, nil
}

func (w *wipeCheckReader) seen() []byte { return bytes.Join(w.bufs, nil) }

// TestHelloExtensions: a Hello without extensions is what an older pspd
// sends and still decodes; an unknown extension is skipped; extensions out
// of order, repeated, truncated or with a bad observed address are refused.
func TestHelloExtensions(t *testing.T) {
	base := Hello{Backends: NewBackends(BackendXFRM), Suites: NewSuites(kdf.AESGCM128), BootID: BootID{7}}
	plain := frame(t, base)
	withObs := base
	withObs.Observed = netip.MustParseAddrPort("203.0.113.5:4500")
	obs := frame(t, withObs)
	ext := obs[len(plain):]
	mk := func(exts ...[]byte) []byte {
		b := append([]byte(nil), plain...)
		for _, e := range exts {
			b = append(b, e...)
		}
		binary.BigEndian.PutUint16(b[2:], uint16(len(b)-headerLen))
		return b
	}
	unknown := []byte{200, 3, 1, 2, 3}
	if m, err := Decode(mk(ext, unknown)); err != nil || m.(Hello).Observed != withObs.Observed {
		t.Fatalf("Hello with an unknown extension after observed: %v %v", m, err)
	}
	if m, err := Decode(plain); err != nil || m.(Hello).Observed.IsValid() || m.(Hello).PSPKnown {
		t.Fatalf("Hello without extensions: %v %v", m, err)
	}
	// The PSP versions: type 3, a big-endian u32 of version bits, after
	// the addresses; versions this pspd does not know are kept.
	psp := []byte{helloExtPSP, 4, 0x80, 0, 0, 0b0110}
	if m, err := Decode(mk(ext, psp, unknown)); err != nil || m.(Hello).PSP != 0x80000006 || !m.(Hello).PSPKnown || m.(Hello).Observed != withObs.Observed {
		t.Fatalf("Hello with PSP versions: %+v %v", m, err)
	}
	withPSP := withObs
	withPSP.PSP, withPSP.PSPKnown = 0b0110, true
	if b := frame(t, withPSP); !bytes.Equal(b[len(obs):], []byte{helloExtPSP, 4, 0, 0, 0, 0b0110}) {
		t.Fatalf("PSP versions encode as %x", b[len(obs):])
	}
	if v := PSPVersions(0b0110); !v.Has(1) || !v.Has(2) || v.Has(0) || v.Has(3) || v.Has(40) {
		t.Errorf("PSPVersions(0b0110).Has is wrong")
	}
	bad := ext[:len(ext):len(ext)]
	zeroPort := append(append([]byte(nil), bad[:len(bad)-2]...), 0, 0)
	mapped := append([]byte(nil), bad...)
	mapped[2] = 6 // family 6 with an IPv4-mapped address
	for name, b := range map[string][]byte{
		"repeated":     mk(ext, ext),
		"out-of-order": mk(unknown, ext),
		"truncated":    mk(ext[:5]),
		"short-value":  mk([]byte{helloExtObserved, 2, 4, 0}),
		"zero-port":    mk(zeroPort),
		"mapped-v6":    mk(mapped),
		"psp-short":    mk([]byte{helloExtPSP, 2, 0, 1}),
		"psp-long":     mk([]byte{helloExtPSP, 5, 0, 0, 0, 1, 0}),
		"psp-twice":    mk([]byte{helloExtPSP, 4, 0, 0, 0, 1}, []byte{helloExtPSP, 4, 0, 0, 0, 1}),
		"psp-before":   mk([]byte{helloExtPSP, 4, 0, 0, 0, 1}, ext),
	} {
		if m, err := Decode(b); err == nil {
			t.Errorf("%s: decoded %v", name, m)
		}
	}
}
