package userspace

import "net/netip"

// Message is one UDP payload travelling through an Underlay. The payload is
// Buf[Off:Off+N]; the bytes of Buf before Off and after Off+N are room the
// codec seals into, so an Underlay must not assume Off is zero.
type Message struct {
	Buf  []byte
	Off  int
	N    int
	Addr netip.AddrPort // TX: the peer's outer endpoint; RX: where it came from
}

// Payload is the UDP payload the message carries.
func (m *Message) Payload() []byte { return m.Buf[m.Off : m.Off+m.N] }

// Underlay carries UDP payloads to and from peers' outer endpoints. The
// batched UDP socket (package userspace/udp) and the AF_XDP path implement it;
// an AF_XDP underlay writes the outer Ethernet/IP/UDP headers itself.
//
// ReadBatch blocks until at least one payload arrives, fills msgs[:n] (Off, N
// and Addr; Buf is the caller's and must not be replaced) and returns n.
// WriteBatch sends msgs[:len(msgs)] and returns how many were accepted; a
// short count with a nil error is not allowed. After Close both return an
// error wrapping net.ErrClosed. ReadBatch and WriteBatch are called from one
// goroutine each, concurrently with each other.
type Underlay interface {
	ReadBatch(msgs []Message) (int, error)
	WriteBatch(msgs []Message) (int, error)
	Close() error
}
