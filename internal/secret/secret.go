// Package secret holds key material in a type that cannot be printed,
// logged or serialised by accident and that can be wiped when done.
//
// Every package of pspd that carries a key (the key schedule, the PSP
// netlink client, the XFRM backend and the userspace data plane) keeps it
// in a Key, so that "no key byte in any log or listing" is a property of
// the type rather than of every call site.
package secret

import (
	"crypto/subtle"
	"fmt"
	"log/slog"
)

// redacted is what every printing path shows instead of key bytes.
const redacted = "[redacted]"

// Key is key material. The zero value is an empty key. A Key must not be
// copied after first use: copies share the bytes, and Wipe on one wipes all.
type Key struct {
	b []byte
}

// New returns a Key holding a copy of b. The caller should wipe b.
func New(b []byte) Key {
	return Key{b: append([]byte(nil), b...)}
}

// Own returns a Key that takes ownership of b without copying.
func Own(b []byte) Key { return Key{b: b} }

// Len is the key length in bytes.
func (k Key) Len() int { return len(k.b) }

// Bytes exposes the key for use by a cipher. The slice aliases the key:
// it must not be retained, logged or sent anywhere except into crypto or
// into the kernel.
func (k Key) Bytes() []byte { return k.b }

// Clone returns an independent copy.
func (k Key) Clone() Key { return New(k.b) }

// Equal reports, in constant time, whether two keys hold the same bytes.
func (k Key) Equal(o Key) bool {
	return len(k.b) == len(o.b) && subtle.ConstantTimeCompare(k.b, o.b) == 1
}

// IsZero reports whether the key is empty or all zero bytes (for example
// after Wipe).
func (k Key) IsZero() bool {
	var acc byte
	for _, c := range k.b {
		acc |= c
	}
	return acc == 0
}

// Wipe overwrites the key bytes with zeros.
func (k Key) Wipe() { Zero(k.b) }

// String implements fmt.Stringer without revealing the key.
func (k Key) String() string { return fmt.Sprintf("secret.Key(%d bytes %s)", len(k.b), redacted) }

// GoString implements fmt.GoStringer so %#v does not dump the bytes.
func (k Key) GoString() string { return k.String() }

// Format makes every verb (%x, %v, %s, %q, %d ...) print the redacted form.
func (k Key) Format(f fmt.State, _ rune) { fmt.Fprint(f, k.String()) }

// LogValue keeps keys out of structured logs.
func (k Key) LogValue() slog.Value { return slog.StringValue(k.String()) }

// MarshalText keeps keys out of JSON, YAML and any other text encoding.
func (k Key) MarshalText() ([]byte, error) { return []byte(redacted), nil }

// Zero overwrites b with zeros. It is the one place the project wipes raw
// buffers, so a later move to a runtime-assisted wipe changes one line.
func Zero(b []byte) {
	clear(b)
}
