package secret

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"
)

func TestKeyNeverPrints(t *testing.T) {
	raw := []byte{0xde, 0xad, 0xbe, 0xef, 0x01, 0x02, 0x03, 0x04}
	k := New(raw)
	hexed := hex.EncodeToString(raw)

	var outs []string
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%x", "%X", "%q", "%d"} {
		outs = append(outs, fmt.Sprintf(verb, k), fmt.Sprintf(verb, &k), fmt.Sprintf(verb, struct{ K Key }{k}))
	}
	j, err := json.Marshal(struct{ K Key }{k})
	if err != nil {
		t.Fatal(err)
	}
	outs = append(outs, string(j))
	var logBuf bytes.Buffer
	slog.New(slog.NewJSONHandler(&logBuf, nil)).Info("x", "key", k)
	slog.New(slog.NewTextHandler(&logBuf, nil)).Info("x", "key", k)
	outs = append(outs, logBuf.String())

	for _, o := range outs {
		if strings.Contains(strings.ToLower(o), hexed) || strings.Contains(o, string(raw)) || strings.Contains(o, "222 173") {
			t.Errorf("key bytes leaked: %q", o)
		}
		if !strings.Contains(o, "redacted") {
			t.Errorf("output %q does not show the redaction marker", o)
		}
	}
}

func TestWipe(t *testing.T) {
	k := New([]byte{1, 2, 3})
	if k.IsZero() {
		t.Fatal("fresh key reports zero")
	}
	k.Wipe()
	if !k.IsZero() || k.Len() != 3 {
		t.Fatalf("after Wipe: zero=%v len=%d", k.IsZero(), k.Len())
	}
}

func TestEqual(t *testing.T) {
	a, b, c := New([]byte{1, 2}), New([]byte{1, 2}), New([]byte{1, 3})
	if !a.Equal(b) || a.Equal(c) || a.Equal(New([]byte{1})) {
		t.Fatal("Equal is wrong")
	}
}
