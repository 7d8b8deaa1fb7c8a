package tun

import (
	"bytes"
	"encoding/binary"
	"github.com/pspd/pspd/userspace/internal/csum"
)

// On the way in, consecutive segments of one TCP flow in a batch go to
// the kernel as one GSO packet (as GRO would build it): one write(2) and
// one trip through the kernel's IP and TCP input instead of one per
// segment.

const (
	tcpACK = 0x10
	tcpPSH = 0x08
	// maxRun bounds the segments merged into one write.
	maxRun = 64
)

// tcpSeg is what coalescing needs to know about one TCP/IP packet.
type tcpSeg struct {
	ipHL, tcpHL int
	payload     int
	flags       byte
	seq         uint32
}

// parseSeg accepts only plain data segments: IPv4 without options and not
// fragmented, or IPv6 without extension headers; TCP with ACK, optionally
// PSH, and a payload.
func parseSeg(p []byte) (tcpSeg, bool) {
	var s tcpSeg
	switch {
	case len(p) >= 40 && p[0] == 0x45:
		if p[9] != 6 || int(binary.BigEndian.Uint16(p[2:])) != len(p) || binary.BigEndian.Uint16(p[6:])&0x3fff != 0 {
			return s, false
		}
		s.ipHL = 20
	case len(p) >= 60 && p[0]>>4 == 6:
		if p[6] != 6 || int(binary.BigEndian.Uint16(p[4:]))+40 != len(p) {
			return s, false
		}
		s.ipHL = 40
	default:
		return s, false
	}
	tcp := p[s.ipHL:]
	s.tcpHL = int(tcp[12]>>4) * 4
	s.flags = tcp[13]
	if s.tcpHL < 20 || len(tcp) <= s.tcpHL || (s.flags != tcpACK && s.flags != tcpACK|tcpPSH) {
		return s, false
	}
	s.payload = len(tcp) - s.tcpHL
	s.seq = binary.BigEndian.Uint32(tcp[4:])
	return s, true
}

// sameFlow reports whether q can follow p in one GSO packet: the same
// addresses, ports, ack, window, options and IP header fields that a
// merged header cannot vary.
func sameFlow(p, q []byte, a, b tcpSeg) bool {
	if a.ipHL != b.ipHL || a.tcpHL != b.tcpHL {
		return false
	}
	if a.ipHL == 20 {
		// TOS, TTL, flags (DF) and both addresses.
		if p[1] != q[1] || p[8] != q[8] || p[6]&0x40 != q[6]&0x40 || !bytes.Equal(p[12:20], q[12:20]) {
			return false
		}
	} else if !bytes.Equal(p[:4], q[:4]) || p[7] != q[7] || !bytes.Equal(p[8:40], q[8:40]) {
		return false // traffic class, flow label, hop limit, addresses
	}
	tp, tq := p[a.ipHL:a.ipHL+a.tcpHL], q[b.ipHL:b.ipHL+b.tcpHL]
	return bytes.Equal(tp[0:4], tq[0:4]) && // ports
		bytes.Equal(tp[8:12], tq[8:12]) && // ack
		bytes.Equal(tp[14:16], tq[14:16]) && // window
		bytes.Equal(tp[20:], tq[20:]) // options
}

// run returns how many packets from the start of pkts form one GSO packet
// (1 when the first cannot be merged with anything).
func run(pkts [][]byte) int {
	a, ok := parseSeg(pkts[0])
	if !ok || a.flags&tcpPSH != 0 {
		return 1
	}
	total, next := len(pkts[0]), a.seq+uint32(a.payload)
	n := 1
	for n < len(pkts) && n < maxRun {
		b, ok := parseSeg(pkts[n])
		if !ok || b.seq != next || b.payload > a.payload || total+b.payload > 65535 || !sameFlow(pkts[0], pkts[n], a, b) {
			break
		}
		total += b.payload
		next += uint32(b.payload)
		n++
		if b.payload < a.payload || b.flags&tcpPSH != 0 {
			break // a short or pushed segment ends the burst
		}
	}
	return n
}

// merge writes pkts, which run accepted as one burst, into dst as one GSO
// packet behind its virtio_net_hdr, and returns its length.
func merge(dst []byte, pkts [][]byte) int {
	first, _ := parseSeg(pkts[0])
	hl := first.ipHL + first.tcpHL
	h := dst[:vnetHdrLen]
	clear(h)
	h[0] = vnetFlagNeedsCsum
	h[1] = gsoTCPv4
	if first.ipHL == 40 {
		h[1] = gsoTCPv6
	}
	binary.LittleEndian.PutUint16(h[2:], uint16(hl))
	binary.LittleEndian.PutUint16(h[4:], uint16(first.payload))
	binary.LittleEndian.PutUint16(h[6:], uint16(first.ipHL))
	binary.LittleEndian.PutUint16(h[8:], 16)
	p := dst[vnetHdrLen:]
	n := copy(p, pkts[0][:hl])
	var flags byte
	for _, q := range pkts {
		n += copy(p[n:], q[hl:])
		flags |= q[first.ipHL+13]
	}
	p = p[:n]
	ip, tcp := p[:first.ipHL], p[first.ipHL:]
	if first.ipHL == 20 {
		binary.BigEndian.PutUint16(ip[2:], uint16(n))
		ip[10], ip[11] = 0, 0
		binary.BigEndian.PutUint16(ip[10:], ^csum.Fold(csum.Sum(ip, 0)))
	} else {
		binary.BigEndian.PutUint16(ip[4:], uint16(n-40))
	}
	tcp[13] = flags
	// With NEEDS_CSUM the field holds the pseudo-header sum; the kernel
	// (or nobody, for local delivery) completes it per segment.
	binary.BigEndian.PutUint16(tcp[16:], csum.Fold(pseudoHeader(ip, len(tcp))))
	return vnetHdrLen + n
}
