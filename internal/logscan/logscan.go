// Package logscan finds key material in text: captured log output, command
// output, listings. Every package that handles keys uses it in its tests to
// prove that no key byte leaks, in any of the encodings a careless format
// verb or encoder would produce.
package logscan

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"

	"github.com/pspd/pspd/internal/secret"
)

// MinKeyLen is the shortest key Scan looks for; shorter needles would match
// ordinary text by chance.
const MinKeyLen = 8

// Finding is one occurrence of a key in the scanned text.
type Finding struct {
	Key    int    // index of the key in the Scan arguments
	Form   string // encoding in which it was found, e.g. "hex"
	Offset int    // byte offset in the text
}

func (f Finding) String() string {
	return fmt.Sprintf("key %d as %s at offset %d", f.Key, f.Form, f.Offset)
}

// forms returns the encodings of k that Scan searches for. Base64 is tried
// at all three alignments so that a key embedded in a longer encoded blob
// is found too.
func forms(k []byte) map[string][]byte {
	out := map[string][]byte{
		"raw":           k,
		"hex":           []byte(hex.EncodeToString(k)),
		"HEX":           []byte(strings.ToUpper(hex.EncodeToString(k))),
		"spaced hex":    []byte(fmt.Sprintf("% x", k)),
		"decimal slice": []byte(strings.Trim(fmt.Sprint(k), "[]")),
	}
	for shift := 0; shift < 3; shift++ {
		padded := append(make([]byte, shift), k...)
		for name, enc := range map[string]*base64.Encoding{"base64": base64.StdEncoding, "base64url": base64.URLEncoding} {
			s := enc.EncodeToString(padded)
			// Drop the characters that depend on the padding prefix or on
			// what follows the key; what remains depends only on key bytes.
			start := (shift*8 + 5) / 6
			if shift == 0 {
				start = 0
			}
			end := (len(padded) * 8) / 6
			if end-start < MinKeyLen {
				continue
			}
			out[fmt.Sprintf("%s/%d", name, shift)] = []byte(s[start:end])
		}
	}
	return out
}

// Scan reports every occurrence of any key in text. Keys shorter than
// MinKeyLen are ignored.
func Scan(text []byte, keys ...[]byte) []Finding {
	var found []Finding
	for i, k := range keys {
		if len(k) < MinKeyLen {
			continue
		}
		for form, needle := range forms(k) {
			for off := 0; ; {
				j := bytes.Index(text[off:], needle)
				if j < 0 {
					break
				}
				found = append(found, Finding{Key: i, Form: form, Offset: off + j})
				off += j + 1
			}
		}
	}
	return found
}

// AssertNoKeys fails tb if text contains any of keys in any form Scan knows.
func AssertNoKeys(tb testing.TB, text []byte, keys ...secret.Key) {
	tb.Helper()
	raw := make([][]byte, 0, len(keys))
	for _, k := range keys {
		if k.Len() < MinKeyLen {
			tb.Fatalf("logscan: key %v is shorter than %d bytes and cannot be searched for", k, MinKeyLen)
		}
		raw = append(raw, k.Bytes())
	}
	for _, f := range Scan(text, raw...) {
		tb.Errorf("logscan: key material leaked: %s", f)
	}
}
