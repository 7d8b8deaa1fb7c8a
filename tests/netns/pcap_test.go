package netns

import (
	"encoding/binary"
	"maps"
	"testing"
)

// pcapOf builds a little-endian classic pcap file of Ethernet frames.
func pcapOf(frames ...[]byte) []byte {
	b := binary.LittleEndian.AppendUint32(nil, 0xa1b2c3d4)
	b = append(b, 2, 0, 4, 0)         // version 2.4
	b = append(b, make([]byte, 8)...) // thiszone, sigfigs
	b = binary.LittleEndian.AppendUint32(b, 262144)
	b = binary.LittleEndian.AppendUint32(b, 1)
	for _, f := range frames {
		b = append(b, make([]byte, 8)...)
		b = binary.LittleEndian.AppendUint32(b, uint32(len(f)))
		b = binary.LittleEndian.AppendUint32(b, uint32(len(f)))
		b = append(b, f...)
	}
	return b
}

func ipv4Frame(proto byte, l4 []byte) []byte {
	f := make([]byte, 12, 64)
	f = append(f, 0x08, 0x00, 0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0, 192, 0, 2, 1, 192, 0, 2, 2)
	return append(f, l4...)
}

func TestWireKinds(t *testing.T) {
	quic := ipv4Frame(17, []byte{0xc0, 0x00, 0x17, 0xa2}) // 49152 -> 6050
	quic[len(quic)-2], quic[len(quic)-1] = 0x17, 0xa2
	arp := append(make([]byte, 12), 0x08, 0x06, 0, 1)
	got, err := WireKinds(pcapOf(ipv4Frame(50, []byte{1, 2, 3, 4}), ipv4Frame(50, nil), ipv4Frame(6, make([]byte, 20)), quic, arp, []byte{1, 2}))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int{"esp": 2, "tcp": 1, "udp/6050": 1, "arp": 1, "runt": 1}
	if !maps.Equal(got, want) {
		t.Fatalf("WireKinds = %v, want %v", got, want)
	}
	if _, err := WireKinds(pcapOf(arp)[:30]); err == nil {
		t.Fatal("a truncated record was accepted")
	}
	if _, err := WireKinds([]byte("0123456789012345678901234567")); err == nil {
		t.Fatal("a file without the pcap magic was accepted")
	}
}

// FuzzWireKinds: captures come from tcpdump, but a short write or a
// garbled file must be an error, never a panic.
func FuzzWireKinds(f *testing.F) {
	f.Add(pcapOf(ipv4Frame(50, []byte{1, 2, 3, 4}), ipv4Frame(17, []byte{0, 1})))
	f.Add(pcapOf([]byte{0x08, 0x00}))
	f.Fuzz(func(t *testing.T, b []byte) {
		WireKinds(b)
	})
}
