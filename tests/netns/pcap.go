package netns

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
)

// ControlPort is pspd's QUIC port, the only clear UDP an xfrm underlay may
// carry besides ESP.
const ControlPort = 6082

// Wire is what a capture of the underlay recorded: one pcap file per tap.
type Wire [][]byte

// Size is the number of bytes captured.
func (w Wire) Size() int {
	n := 0
	for _, f := range w {
		n += len(f)
	}
	return n
}

// Contains reports whether any captured frame holds s.
func (w Wire) Contains(s string) bool {
	return slices.ContainsFunc(w, func(f []byte) bool { return bytes.Contains(f, []byte(s)) })
}

// Kinds is WireKinds summed over every tap.
func (w Wire) Kinds() (map[string]int, error) {
	sum := map[string]int{}
	for _, f := range w {
		k, err := WireKinds(f)
		if err != nil {
			return nil, err
		}
		for kind, n := range k {
			sum[kind] += n
		}
	}
	return sum, nil
}

// WireKinds counts the frames of a classic pcap capture (Ethernet link
// type, as tcpdump -w writes) by what they carry: "esp", "arp",
// "udp/PORT" (the lower of the two ports), "tcp", "icmp", "ipv4/PROTO",
// "ipv6/NEXTHDR" or "ethertype/0xTYPE". Scenarios check with it that a
// protected underlay carries ESP and nothing else in clear.
func WireKinds(pcap []byte) (map[string]int, error) {
	if len(pcap) < 24 {
		return nil, errors.New("pcap: shorter than its file header")
	}
	var bo binary.ByteOrder
	switch binary.LittleEndian.Uint32(pcap) {
	case 0xa1b2c3d4, 0xa1b23c4d:
		bo = binary.LittleEndian
	default:
		switch binary.BigEndian.Uint32(pcap) {
		case 0xa1b2c3d4, 0xa1b23c4d:
			bo = binary.BigEndian
		default:
			return nil, fmt.Errorf("pcap: magic %#x is not classic pcap", pcap[:4])
		}
	}
	if lt := bo.Uint32(pcap[20:]); lt != 1 {
		return nil, fmt.Errorf("pcap: link type %d, want 1 (Ethernet)", lt)
	}
	kinds := map[string]int{}
	for rest := pcap[24:]; len(rest) > 0; {
		if len(rest) < 16 {
			return nil, errors.New("pcap: truncated record header")
		}
		n := int(bo.Uint32(rest[8:]))
		if n > len(rest)-16 {
			return nil, fmt.Errorf("pcap: record of %d bytes, %d left", n, len(rest)-16)
		}
		kinds[frameKind(rest[16:16+n])]++
		rest = rest[16+n:]
	}
	return kinds, nil
}

func frameKind(f []byte) string {
	if len(f) < 14 {
		return "runt"
	}
	et, p := binary.BigEndian.Uint16(f[12:]), f[14:]
	switch {
	case et == 0x0806:
		return "arp"
	case et == 0x86dd && len(p) >= 40:
		return fmt.Sprintf("ipv6/%d", p[6])
	case et != 0x0800:
		return fmt.Sprintf("ethertype/%#04x", et)
	case len(p) < 20:
		return "runt"
	}
	ihl := int(p[0]&0x0f) * 4
	if ihl < 20 || ihl > len(p) {
		return "runt"
	}
	proto, l4 := p[9], p[ihl:]
	switch proto {
	case 1:
		return "icmp"
	case 6:
		return "tcp"
	case 50:
		return "esp"
	case 17:
		if len(l4) < 4 {
			return "runt"
		}
		return fmt.Sprintf("udp/%d", min(binary.BigEndian.Uint16(l4), binary.BigEndian.Uint16(l4[2:])))
	}
	return fmt.Sprintf("ipv4/%d", proto)
}
