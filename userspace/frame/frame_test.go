package frame

import (
	"bytes"
	"encoding/binary"
	"errors"
	"github.com/pspd/pspd/userspace/internal/csum"
	"net/netip"
	"testing"
)

func build(src, dst netip.AddrPort, payload []byte) []byte {
	b := make([]byte, EthLen+IPv6Len+UDPLen+len(payload))
	hl := IPv4Len + UDPLen
	if !dst.Addr().Is4() {
		hl = IPv6Len + UDPLen
	}
	copy(b[EthLen+hl:], payload)
	et := uint16(EtherTypeIPv4)
	if hl != IPv4Len+UDPLen {
		et = EtherTypeIPv6
	}
	PutEthernet(b, MAC{1, 2, 3, 4, 5, 6}, MAC{7, 8, 9, 10, 11, 12}, et)
	if n := PutIPUDP(b[EthLen:], src, dst, len(payload)); n != hl {
		panic("header length")
	}
	return b[:EthLen+hl+len(payload)]
}

func TestRoundTrip(t *testing.T) {
	payload := []byte("geneve payload, odd length!")
	for _, tc := range []struct{ src, dst string }{
		{"192.0.2.1:40000", "192.0.2.2:6081"},
		{"[2001:db8::1]:40000", "[2001:db8::2]:1000"},
	} {
		src, dst := netip.MustParseAddrPort(tc.src), netip.MustParseAddrPort(tc.dst)
		f := build(src, dst, payload)
		if got := HeaderLen(dst.Addr()); got != len(f)-len(payload) {
			t.Errorf("%s: HeaderLen %d, frame header %d", tc.dst, got, len(f)-len(payload))
		}
		et, ip, err := ParseEthernet(f)
		if err != nil || (et != EtherTypeIPv4 && et != EtherTypeIPv6) {
			t.Fatalf("%s: ParseEthernet: %#x %v", tc.dst, et, err)
		}
		u, err := ParseIPUDP(ip)
		if err != nil {
			t.Fatalf("%s: ParseIPUDP: %v", tc.dst, err)
		}
		if u.Src != src || u.Dst != dst || !bytes.Equal(ip[u.Off:u.Off+u.Len], payload) {
			t.Errorf("%s: decoded %v→%v %q", tc.dst, u.Src, u.Dst, ip[u.Off:u.Off+u.Len])
		}
		if !dst.Addr().Is4() {
			// A correct UDP checksum sums, with the pseudo-header, to 0xffff.
			c := csum.Sum(ip[8:40], uint64(UDPLen+len(payload))+protoUDP)
			if got := csum.Fold(csum.Sum(ip[IPv6Len:], c)); got != 0xffff {
				t.Errorf("IPv6 UDP checksum does not verify: %#x", got)
			}
		}
	}
}

func TestParseRejects(t *testing.T) {
	good := build(netip.MustParseAddrPort("192.0.2.1:1"), netip.MustParseAddrPort("192.0.2.2:6081"), []byte("x"))[EthLen:]
	mut := func(f func(p []byte)) []byte {
		p := bytes.Clone(good)
		f(p)
		return p
	}
	fixsum := func(p []byte) {
		p[10], p[11] = 0, 0
		binary.BigEndian.PutUint16(p[10:12], Checksum(p[:IPv4Len]))
	}
	for _, tc := range []struct {
		name string
		p    []byte
		want error
	}{
		{"empty", nil, ErrShort},
		{"short v4", good[:10], ErrShort},
		{"version 5", mut(func(p []byte) { p[0] = 0x55 }), ErrIPHeader},
		{"ihl 4", mut(func(p []byte) { p[0] = 0x44; fixsum(p) }), ErrIPHeader},
		{"total beyond buffer", mut(func(p []byte) { p[3] = 200; fixsum(p) }), ErrIPHeader},
		{"bad checksum", mut(func(p []byte) { p[8]-- }), ErrIPChecksum},
		{"fragment", mut(func(p []byte) { p[6] = 0x20; fixsum(p) }), ErrFragment},
		{"tcp", mut(func(p []byte) { p[9] = 6; fixsum(p) }), ErrNotUDP},
		{"udp length too long", mut(func(p []byte) { p[IPv4Len+5] = 99 }), ErrUDPLength},
		{"udp length too short", mut(func(p []byte) { p[IPv4Len+5] = 7 }), ErrUDPLength},
		{"no udp header", mut(func(p []byte) { p[3] = IPv4Len + 4; fixsum(p) }), ErrShort},
	} {
		if _, err := ParseIPUDP(tc.p); !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
		}
	}
	if _, _, err := ParseEthernet(make([]byte, 13)); err != ErrShort {
		t.Errorf("13-byte Ethernet frame: got %v", err)
	}
}

func TestEncodeDoesNotAllocate(t *testing.T) {
	b := make([]byte, 2048)
	src, dst := netip.MustParseAddrPort("[2001:db8::1]:1"), netip.MustParseAddrPort("[2001:db8::2]:6081")
	if n := testing.AllocsPerRun(100, func() { PutIPUDP(b[EthLen:], src, dst, 1400) }); n != 0 {
		t.Errorf("PutIPUDP allocates %v times", n)
	}
}

// FuzzParseIPUDP checks that no input panics and that an accepted packet's
// payload span lies inside it.
func FuzzParseIPUDP(f *testing.F) {
	f.Add(build(netip.MustParseAddrPort("192.0.2.1:1"), netip.MustParseAddrPort("192.0.2.2:6081"), []byte("abc"))[EthLen:])
	f.Add(build(netip.MustParseAddrPort("[2001:db8::1]:1"), netip.MustParseAddrPort("[2001:db8::2]:1000"), []byte("abc"))[EthLen:])
	f.Add([]byte{0x45})
	f.Add([]byte{0x60, 0, 0, 0, 0, 0, 17})
	f.Fuzz(func(t *testing.T, p []byte) {
		u, err := ParseIPUDP(p)
		if err != nil {
			return
		}
		if u.Off < 0 || u.Len < 0 || u.Off+u.Len > len(p) {
			t.Fatalf("payload span [%d:+%d] outside %d-byte packet", u.Off, u.Len, len(p))
		}
	})
}
