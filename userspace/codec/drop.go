package codec

import "fmt"

// DropReason says why a packet was not delivered. The zero value, Pass,
// is not a drop.
type DropReason uint8

const (
	Pass DropReason = iota

	// Receive side, in the order Open checks them.
	DropBadBuffer      // offsets outside the buffer, or OpenTo dst too small
	DropFraming        // packet arrived on the other framing's port
	DropMalformed      // payload header did not parse
	DropUnknownSPI     // no RX SA with the packet's SPI
	DropSPIMismatch    // nonce prefix differs from the SPI
	DropVersion        // PSP version is not the SA's suite
	DropExpired        // RX SA expired, past its grace, or just removed
	DropAuth           // AEAD authentication failed
	DropReplay         // counter seen before or behind the window
	DropEmpty          // authenticated but empty: a keep-alive, counted in Stats.Keepalives, not as a drop
	DropInnerMalformed // inner packet not IPv4/IPv6, bad length, or not what the header announced

	// Transmit side.
	DropTXNoSA
	DropTXExpired
	DropTXBudget
	DropTXEmpty
	DropTXInnerMalformed
	DropTXBadBuffer

	// NumDropReasons sizes arrays indexed by DropReason.
	NumDropReasons
)

var dropNames = [NumDropReasons]string{
	Pass:                 "pass",
	DropBadBuffer:        "bad-buffer",
	DropFraming:          "wrong-framing",
	DropMalformed:        "malformed-header",
	DropUnknownSPI:       "unknown-spi",
	DropSPIMismatch:      "spi-nonce-mismatch",
	DropVersion:          "version-mismatch",
	DropExpired:          "expired-sa",
	DropAuth:             "auth-failed",
	DropReplay:           "replay",
	DropEmpty:            "empty-inner",
	DropInnerMalformed:   "malformed-inner",
	DropTXNoSA:           "tx-no-sa",
	DropTXExpired:        "tx-expired",
	DropTXBudget:         "tx-budget-exhausted",
	DropTXEmpty:          "tx-empty-inner",
	DropTXInnerMalformed: "tx-malformed-inner",
	DropTXBadBuffer:      "tx-bad-buffer",
}

// String is a stable lower-case name, suitable as a metrics label.
func (r DropReason) String() string {
	if r < NumDropReasons {
		return dropNames[r]
	}
	return fmt.Sprintf("drop(%d)", uint8(r))
}

// txDrop maps Seal errors to their drop reason.
func txDrop(err error) DropReason {
	switch err {
	case ErrNoTXSA, ErrClosed:
		return DropTXNoSA
	case ErrKeyExpired:
		return DropTXExpired
	case ErrBudget:
		return DropTXBudget
	case ErrEmptyPacket:
		return DropTXEmpty
	case ErrInnerPacket:
		return DropTXInnerMalformed
	}
	return DropTXBadBuffer
}
