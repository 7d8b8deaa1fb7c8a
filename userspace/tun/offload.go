package tun

import (
	"encoding/binary"
	"errors"
	"github.com/pspd/pspd/userspace/internal/csum"
)

// With IFF_VNET_HDR and TUNSETOFFLOAD the kernel hands the device whole
// TCP bursts of up to 64 KB (TSO) with a virtio_net_hdr in front, instead
// of segmenting them first: one read(2) for what would otherwise be ~45.
// The device cuts them into MTU-sized packets itself, so its callers still
// see one IP packet per buffer.

const (
	vnetHdrLen = 10 // struct virtio_net_hdr

	vnetFlagNeedsCsum = 1 // VIRTIO_NET_HDR_F_NEEDS_CSUM

	gsoNone  = 0 // VIRTIO_NET_HDR_GSO_NONE
	gsoTCPv4 = 1 // VIRTIO_NET_HDR_GSO_TCPV4
	gsoTCPv6 = 4 // VIRTIO_NET_HDR_GSO_TCPV6

	tunFCsum = 0x01 // TUN_F_CSUM
	tunFTSO4 = 0x02 // TUN_F_TSO4
	tunFTSO6 = 0x04 // TUN_F_TSO6

	maxSuper = 65535 + vnetHdrLen
)

// vnetHdr is a virtio_net_hdr in the host's byte order (the device never
// sets TUNSETVNETLE/BE, and pspd runs on little-endian machines).
type vnetHdr struct {
	flags, gsoType                         uint8
	hdrLen, gsoSize, csumStart, csumOffset uint16
}

func parseVnetHdr(b []byte) vnetHdr {
	return vnetHdr{
		flags: b[0], gsoType: b[1],
		hdrLen: binary.LittleEndian.Uint16(b[2:]), gsoSize: binary.LittleEndian.Uint16(b[4:]),
		csumStart: binary.LittleEndian.Uint16(b[6:]), csumOffset: binary.LittleEndian.Uint16(b[8:]),
	}
}

var errBadOffload = errors.New("tun: malformed offload packet from the kernel")

// segmenter cuts one packet the kernel handed over with a virtio_net_hdr
// into plain IP packets with complete checksums.
type segmenter struct {
	pkt  []byte // the packet, header stripped
	hdr  vnetHdr
	ipHL int // IP header length
	l4HL int // TCP header length (GSO only)
	next int // payload offset of the next segment (GSO only)
}

// reset takes a packet as read from the device (virtio_net_hdr first).
func (s *segmenter) reset(b []byte) error {
	if len(b) < vnetHdrLen+20 {
		return errBadOffload
	}
	s.hdr, s.pkt, s.next = parseVnetHdr(b), b[vnetHdrLen:], 0
	switch s.pkt[0] >> 4 {
	case 4:
		s.ipHL = int(s.pkt[0]&0x0f) * 4
	case 6:
		s.ipHL = 40
	default:
		return errBadOffload
	}
	if s.hdr.gsoType == gsoNone {
		return nil
	}
	if (s.hdr.gsoType != gsoTCPv4 && s.hdr.gsoType != gsoTCPv6) || s.hdr.gsoSize == 0 {
		return errBadOffload
	}
	if s.ipHL < 20 || len(s.pkt) < s.ipHL+20 || (s.pkt[0]>>4 == 6 && s.pkt[6] != 6) || (s.pkt[0]>>4 == 4 && s.pkt[9] != 6) {
		return errBadOffload // only TCP is offloaded, without IPv6 extension headers
	}
	s.l4HL = int(s.pkt[s.ipHL+12]>>4) * 4
	if s.l4HL < 20 || len(s.pkt) < s.ipHL+s.l4HL {
		return errBadOffload
	}
	return nil
}

// done reports whether every packet of the current one was produced.
func (s *segmenter) done() bool { return s.pkt == nil }

// nextPacket writes the next plain packet into dst and returns its length.
func (s *segmenter) nextPacket(dst []byte) (int, error) {
	if s.hdr.gsoType == gsoNone {
		n := copy(dst, s.pkt)
		if n < len(s.pkt) {
			s.pkt = nil
			return 0, errBadOffload
		}
		p := dst[:n]
		s.pkt = nil
		if s.hdr.flags&vnetFlagNeedsCsum != 0 {
			start, off := int(s.hdr.csumStart), int(s.hdr.csumStart)+int(s.hdr.csumOffset)
			if start >= n || off+2 > n {
				return 0, errBadOffload
			}
			// The field holds the pseudo-header sum; summing the rest
			// over it completes the checksum.
			binary.BigEndian.PutUint16(p[off:], ^csum.Fold(csum.Sum(p[start:], 0)))
		}
		return n, nil
	}
	hl := s.ipHL + s.l4HL
	payload := s.pkt[hl:]
	chunk := min(int(s.hdr.gsoSize), len(payload)-s.next)
	if hl+chunk > len(dst) {
		s.pkt = nil
		return 0, errBadOffload
	}
	first, last := s.next == 0, s.next+chunk >= len(payload)
	p := dst[:hl+chunk]
	copy(p, s.pkt[:hl])
	copy(p[hl:], payload[s.next:s.next+chunk])
	ip, tcp := p[:s.ipHL], p[s.ipHL:hl]
	if ip[0]>>4 == 4 {
		binary.BigEndian.PutUint16(ip[2:], uint16(len(p)))
		id := binary.BigEndian.Uint16(ip[4:])
		binary.BigEndian.PutUint16(ip[4:], id+uint16(s.next/int(s.hdr.gsoSize)))
		ip[10], ip[11] = 0, 0
		binary.BigEndian.PutUint16(ip[10:], ^csum.Fold(csum.Sum(ip, 0)))
	} else {
		binary.BigEndian.PutUint16(ip[4:], uint16(len(p)-40))
	}
	seq := binary.BigEndian.Uint32(tcp[4:])
	binary.BigEndian.PutUint32(tcp[4:], seq+uint32(s.next))
	const fin, psh, cwr = 0x01, 0x08, 0x80
	if !last {
		tcp[13] &^= fin | psh
	}
	if !first {
		tcp[13] &^= cwr
	}
	tcp[16], tcp[17] = 0, 0
	binary.BigEndian.PutUint16(tcp[16:], ^csum.Fold(csum.Sum(p[s.ipHL:], pseudoHeader(ip, len(p)-s.ipHL))))
	s.next += chunk
	if last {
		s.pkt = nil
	}
	return len(p), nil
}

// pseudoHeader is the TCP pseudo-header sum for a segment of l4Len bytes.
func pseudoHeader(ip []byte, l4Len int) uint64 {
	var acc uint64
	if ip[0]>>4 == 4 {
		acc = csum.Sum(ip[12:20], 0)
	} else {
		acc = csum.Sum(ip[8:40], 0)
	}
	return acc + 6 + uint64(l4Len)
}
