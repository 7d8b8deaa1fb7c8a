package policy

import "testing"

// FuzzParse holds Parse to its contract on arbitrary input: a Config or an
// error, never a panic, and every FieldError has a line.
func FuzzParse(f *testing.F) {
	f.Add([]byte("identity: /k\npeers:\n  - {name: b, endpoint: 192.0.2.2, prefixes: [10.0.0.0/8]}\n"))
	f.Add([]byte("identity: /k\nrekey_interval: 2m\npacket_budget: 0x10000\n"))
	f.Add([]byte("- a\n- b\n"))
	f.Add([]byte("identity: &a /k\nsocket: *a\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse("f", data)
		if err == nil && c.Identity == "" {
			t.Fatal("accepted a config without identity")
		}
		if fe, ok := err.(*FieldError); ok && fe.Line < 1 {
			t.Fatalf("FieldError without a line: %v", fe)
		}
	})
}
