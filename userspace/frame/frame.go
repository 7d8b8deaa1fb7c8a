// Package frame encodes and decodes the outer headers the AF_XDP data plane
// puts around a UDP payload: Ethernet, IPv4 or IPv6, and UDP. Decoding
// validates every length and never panics; encoding writes into a caller's
// buffer without allocating.
package frame

import (
	"encoding/binary"
	"errors"
	"github.com/pspd/pspd/userspace/internal/csum"
	"net/netip"
)

// Header sizes.
const (
	EthLen  = 14
	IPv4Len = 20
	IPv6Len = 40
	UDPLen  = 8
)

// EtherTypes the data plane handles.
const (
	EtherTypeIPv4 = 0x0800
	EtherTypeIPv6 = 0x86dd
)

const protoUDP = 17

// Decode errors. They carry no per-packet data so returning them does not
// allocate; each is a drop reason for the caller's counters.
var (
	ErrShort      = errors.New("frame: truncated header")
	ErrEtherType  = errors.New("frame: not IPv4 or IPv6")
	ErrIPHeader   = errors.New("frame: bad IP version, header length or total length")
	ErrFragment   = errors.New("frame: IP fragment")
	ErrNotUDP     = errors.New("frame: not UDP")
	ErrUDPLength  = errors.New("frame: UDP length disagrees with IP length")
	ErrIPChecksum = errors.New("frame: IPv4 header checksum mismatch")
)

// MAC is an Ethernet address.
type MAC [6]byte

// HeaderLen is the number of bytes of Ethernet+IP+UDP before the payload for
// an outer packet between addresses of dst's family.
func HeaderLen(dst netip.Addr) int {
	if dst.Is4() {
		return EthLen + IPv4Len + UDPLen
	}
	return EthLen + IPv6Len + UDPLen
}

// PutEthernet writes an Ethernet header into b[:EthLen].
func PutEthernet(b []byte, dst, src MAC, etherType uint16) {
	_ = b[EthLen-1]
	copy(b[0:6], dst[:])
	copy(b[6:12], src[:])
	binary.BigEndian.PutUint16(b[12:14], etherType)
}

// PutIPUDP writes an IPv4 or IPv6 header and a UDP header at the start of b
// for a payload of payloadLen bytes that the caller has already placed right
// after them, and returns the header length. src and dst must be the same
// family (4-in-6 mapped addresses count as IPv4). The IPv6 UDP checksum, which
// is mandatory, covers the payload; IPv4 UDP uses checksum 0 (RFC 768) since
// the AEAD already authenticates every payload byte.
func PutIPUDP(b []byte, src, dst netip.AddrPort, payloadLen int) int {
	sa, da := src.Addr().Unmap(), dst.Addr().Unmap()
	udpLen := UDPLen + payloadLen
	if da.Is4() {
		h := b[:IPv4Len+UDPLen]
		h[0] = 0x45
		h[1] = 0
		binary.BigEndian.PutUint16(h[2:4], uint16(IPv4Len+udpLen))
		binary.BigEndian.PutUint16(h[4:6], 0)      // ID: DF is set, so unused (RFC 6864)
		binary.BigEndian.PutUint16(h[6:8], 0x4000) // DF
		h[8] = 64
		h[9] = protoUDP
		h[10], h[11] = 0, 0
		s4, d4 := sa.As4(), da.As4()
		copy(h[12:16], s4[:])
		copy(h[16:20], d4[:])
		binary.BigEndian.PutUint16(h[10:12], csum.Checksum(h[:IPv4Len]))
		putUDP(h[IPv4Len:], src.Port(), dst.Port(), udpLen)
		return IPv4Len + UDPLen
	}
	h := b[:IPv6Len+UDPLen]
	binary.BigEndian.PutUint32(h[0:4], 6<<28)
	binary.BigEndian.PutUint16(h[4:6], uint16(udpLen))
	h[6] = protoUDP
	h[7] = 64
	s16, d16 := sa.As16(), da.As16()
	copy(h[8:24], s16[:])
	copy(h[24:40], d16[:])
	u := h[IPv6Len:]
	putUDP(u, src.Port(), dst.Port(), udpLen)
	// Pseudo-header: addresses, UDP length, next header.
	c := csum.Sum(h[8:40], uint64(udpLen)+protoUDP)
	c = csum.Sum(b[IPv6Len:IPv6Len+udpLen], c)
	ck := ^csum.Fold(c)
	if ck == 0 {
		ck = 0xffff
	}
	binary.BigEndian.PutUint16(u[6:8], ck)
	return IPv6Len + UDPLen
}

func putUDP(u []byte, sport, dport uint16, udpLen int) {
	binary.BigEndian.PutUint16(u[0:2], sport)
	binary.BigEndian.PutUint16(u[2:4], dport)
	binary.BigEndian.PutUint16(u[4:6], uint16(udpLen))
	binary.BigEndian.PutUint16(u[6:8], 0)
}

// Checksum is the Internet checksum (RFC 1071) of b.
func Checksum(b []byte) uint16 { return csum.Checksum(b) }

// ParseEthernet returns the EtherType and the bytes after the Ethernet
// header. VLAN tags are not accepted: the data plane binds untagged links.
func ParseEthernet(b []byte) (etherType uint16, payload []byte, err error) {
	if len(b) < EthLen {
		return 0, nil, ErrShort
	}
	return binary.BigEndian.Uint16(b[12:14]), b[EthLen:], nil
}

// UDP is a decoded IP+UDP header.
type UDP struct {
	Src, Dst netip.AddrPort
	// Off and Len locate the UDP payload in the packet passed to ParseIPUDP.
	Off, Len int
}

// ParseIPUDP decodes an IPv4 or IPv6 packet carrying UDP. Trailing bytes
// beyond the IP total length (Ethernet padding) are ignored. IPv4 options are
// skipped; IPv6 extension headers are refused (ErrNotUDP), as the data
// plane's peers never send them.
func ParseIPUDP(p []byte) (UDP, error) {
	if len(p) < 1 {
		return UDP{}, ErrShort
	}
	var (
		u     UDP
		hl    int
		total int
	)
	switch p[0] >> 4 {
	case 4:
		if len(p) < IPv4Len {
			return UDP{}, ErrShort
		}
		hl = int(p[0]&0x0f) * 4
		total = int(binary.BigEndian.Uint16(p[2:4]))
		if hl < IPv4Len || total < hl || total > len(p) {
			return UDP{}, ErrIPHeader
		}
		if csum.Fold(csum.Sum(p[:hl], 0)) != 0xffff {
			return UDP{}, ErrIPChecksum
		}
		if binary.BigEndian.Uint16(p[6:8])&0x3fff != 0 { // MF or offset
			return UDP{}, ErrFragment
		}
		if p[9] != protoUDP {
			return UDP{}, ErrNotUDP
		}
		u.Src = netip.AddrPortFrom(netip.AddrFrom4([4]byte(p[12:16])), 0)
		u.Dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(p[16:20])), 0)
	case 6:
		if len(p) < IPv6Len {
			return UDP{}, ErrShort
		}
		hl = IPv6Len
		total = IPv6Len + int(binary.BigEndian.Uint16(p[4:6]))
		if total > len(p) {
			return UDP{}, ErrIPHeader
		}
		if p[6] != protoUDP {
			return UDP{}, ErrNotUDP
		}
		u.Src = netip.AddrPortFrom(netip.AddrFrom16([16]byte(p[8:24])), 0)
		u.Dst = netip.AddrPortFrom(netip.AddrFrom16([16]byte(p[24:40])), 0)
	default:
		return UDP{}, ErrIPHeader
	}
	if total-hl < UDPLen {
		return UDP{}, ErrShort
	}
	h := p[hl:]
	ulen := int(binary.BigEndian.Uint16(h[4:6]))
	if ulen < UDPLen || ulen > total-hl {
		return UDP{}, ErrUDPLength
	}
	u.Src = netip.AddrPortFrom(u.Src.Addr(), binary.BigEndian.Uint16(h[0:2]))
	u.Dst = netip.AddrPortFrom(u.Dst.Addr(), binary.BigEndian.Uint16(h[2:4]))
	u.Off = hl + UDPLen
	u.Len = ulen - UDPLen
	return u, nil
}
