package codec

import "unsafe"

// anyOverlap reports whether x and y share memory. crypto/cipher panics
// when the output of a cross-buffer transform partly overlaps its input;
// checking first turns a caller's buffer mix-up into a counted drop.
func anyOverlap(x, y []byte) bool {
	return len(x) > 0 && len(y) > 0 &&
		uintptr(unsafe.Pointer(&x[0])) <= uintptr(unsafe.Pointer(&y[len(y)-1])) &&
		uintptr(unsafe.Pointer(&y[0])) <= uintptr(unsafe.Pointer(&x[len(x)-1]))
}
