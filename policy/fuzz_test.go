package policy

import "testing"

// FuzzParse holds Parse to its contract on arbitrary input: a Config or an
// error, never a panic, and every error a FieldError with a line, so that
// every message has the one file:line: form.
func FuzzParse(f *testing.F) {
	f.Add([]byte("identity: /k\npeers:\n  - {name: b, endpoint: 192.0.2.2, prefixes: [10.0.0.0/8]}\n"))
	f.Add([]byte("identity: /k\nrekey_interval: 2m\npacket_budget: 0x10000\n"))
	f.Add([]byte("- a\n- b\n"))
	f.Add([]byte("identity: &a /k\nsocket: *a\n"))
	f.Add([]byte("identity: /k\npeers: [a,\n"))
	f.Add([]byte("identity: /k\nsocket: *b\n"))
	f.Add([]byte("identity: /k\npacket_budget: 18446744073709551616\nrekey_interval: 24h\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse("f", data)
		if err == nil && c.Identity == "" {
			t.Fatal("accepted a config without identity")
		}
		if err == nil {
			return
		}
		fe, ok := err.(*FieldError)
		if !ok {
			t.Fatalf("%T, not a *FieldError: %v", err, err)
		}
		if fe.Line < 1 || fe.Line > maxLine(data) {
			t.Fatalf("FieldError line %d outside the input: %v", fe.Line, fe)
		}
	})
}
