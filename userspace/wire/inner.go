package wire

// Inner is the protocol of the packet a pspd tunnel carries.
type Inner uint8

const (
	IPv4 Inner = 4
	IPv6 Inner = 6
)

// EtherType is the Geneve protocol type announcing the inner packet.
func (i Inner) EtherType() uint16 {
	if i == IPv6 {
		return 0x86dd
	}
	return 0x0800
}

// IPProto is the PSP next-header value announcing the inner packet.
func (i Inner) IPProto() uint8 {
	if i == IPv6 {
		return 41
	}
	return 4
}

func (i Inner) String() string {
	switch i {
	case IPv4:
		return "ipv4"
	case IPv6:
		return "ipv6"
	}
	return "inner(?)"
}

func innerFromEtherType(et uint16) (Inner, bool) {
	switch et {
	case 0x0800:
		return IPv4, true
	case 0x86dd:
		return IPv6, true
	}
	return 0, false
}

func innerFromIPProto(p uint8) (Inner, bool) {
	switch p {
	case 4:
		return IPv4, true
	case 41:
		return IPv6, true
	}
	return 0, false
}

// Errors of CheckInner. ErrEmpty is separate because an empty packet is a
// distinct drop reason (the ICX empty-payload panic).
const (
	ErrEmpty     = ParseError("wire: inner packet is empty")
	ErrNotIP     = ParseError("wire: inner packet is not IPv4 or IPv6")
	ErrInnerLen  = ParseError("wire: inner packet length field does not match its size")
	ErrInnerHead = ParseError("wire: inner packet shorter than its IP header")
)

const (
	ipv4MinLen = 20
	ipv6HdrLen = 40
)

// CheckInner validates that p is exactly one IPv4 or IPv6 packet: version
// nibble, minimum header, and the IP length field equal to len(p). It
// returns the packet's protocol.
func CheckInner(p []byte) (Inner, error) {
	if len(p) == 0 {
		return 0, ErrEmpty
	}
	switch p[0] >> 4 {
	case 4:
		if len(p) < ipv4MinLen {
			return 0, ErrInnerHead
		}
		ihl := int(p[0]&0x0f) * 4
		total := int(p[2])<<8 | int(p[3])
		if ihl < ipv4MinLen || ihl > total || total != len(p) {
			return 0, ErrInnerLen
		}
		return IPv4, nil
	case 6:
		if len(p) < ipv6HdrLen {
			return 0, ErrInnerHead
		}
		// Jumbograms (payload length 0 with a bigger packet) fail here
		// too: a tunnel MTU cannot carry them.
		payload := int(p[4])<<8 | int(p[5])
		if ipv6HdrLen+payload != len(p) {
			return 0, ErrInnerLen
		}
		return IPv6, nil
	}
	return 0, ErrNotIP
}
