package logscan

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"log/slog"
	"testing"

	"github.com/pspd/pspd/internal/secret"
)

var key = []byte{0x8f, 0x01, 0xfe, 0x22, 0x9a, 0x00, 0x13, 0x77, 0x42, 0xc3, 0x5d, 0x10, 0xee, 0x01, 0x02, 0x99}

func TestScanFindsEveryForm(t *testing.T) {
	cases := map[string]string{
		"hex":         fmt.Sprintf("key=%x", key),
		"HEX":         fmt.Sprintf("key=%X end", key),
		"spaced hex":  fmt.Sprintf("key=% x", key),
		"decimal":     fmt.Sprintf("key=%v", key),
		"raw":         "a" + string(key) + "b",
		"base64":      "k:" + base64.StdEncoding.EncodeToString(key),
		"base64url":   base64.RawURLEncoding.EncodeToString(key),
		"b64 shift 1": base64.StdEncoding.EncodeToString(append([]byte{7}, key...)),
		"b64 shift 2": base64.StdEncoding.EncodeToString(append([]byte{7, 9}, key...)),
	}
	for name, text := range cases {
		if got := Scan([]byte(text), []byte("unrelated-needle"), key); len(got) == 0 {
			t.Errorf("%s: key not found in %q", name, text)
		} else if got[0].Key != 1 {
			t.Errorf("%s: finding names key %d, want 1", name, got[0].Key)
		}
	}
}

func TestScanCleanText(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	k := secret.New(key)
	log.Info("installed", "key", k, "spi", 0x10)
	if got := Scan(buf.Bytes(), key); len(got) != 0 {
		t.Fatalf("false positive in %q: %v", buf.String(), got)
	}
	AssertNoKeys(t, buf.Bytes(), k)
}

func TestAssertNoKeysFails(t *testing.T) {
	ft := &fakeTB{TB: t}
	AssertNoKeys(ft, []byte(fmt.Sprintf("%x", key)), secret.New(key))
	if !ft.failed {
		t.Fatal("AssertNoKeys did not fail on a leaked key")
	}
}

func TestShortKeysIgnored(t *testing.T) {
	if got := Scan([]byte("abc"), []byte("abc")); len(got) != 0 {
		t.Fatalf("short key matched: %v", got)
	}
}

// fakeTB records failures instead of failing the real test; it exists only
// to show that AssertNoKeys reports a leak (TestScanFindsEveryForm covers
// the real search).
type fakeTB struct {
	testing.TB
	failed bool
}

func (f *fakeTB) Helper()                        {}
func (f *fakeTB) Errorf(string, ...any)          { f.failed = true }
func (f *fakeTB) Fatalf(format string, a ...any) { f.failed = true }
