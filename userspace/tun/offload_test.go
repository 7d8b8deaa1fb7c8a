package tun

import (
	"bytes"
	"encoding/binary"
	"github.com/pspd/pspd/userspace/internal/csum"
	"testing"
)

// tcpPacket builds an IPv4 or IPv6 TCP packet with payload n bytes long,
// TCP flags fl and sequence number 1000, checksums left zero.
func tcpPacket(v6 bool, n int, fl byte) []byte {
	var ip []byte
	if v6 {
		ip = make([]byte, 40)
		ip[0] = 0x60
		binary.BigEndian.PutUint16(ip[4:], uint16(20+n))
		ip[6], ip[7] = 6, 64
		copy(ip[8:], []byte{0xfd, 0, 15: 1})
		copy(ip[24:], []byte{0xfd, 0, 15: 2})
	} else {
		ip = make([]byte, 20)
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], uint16(40+n))
		binary.BigEndian.PutUint16(ip[4:], 7)
		ip[8], ip[9] = 64, 6
		copy(ip[12:], []byte{10, 200, 0, 1, 10, 200, 0, 2})
	}
	tcp := make([]byte, 20)
	binary.BigEndian.PutUint16(tcp[0:], 40000)
	binary.BigEndian.PutUint16(tcp[2:], 5201)
	binary.BigEndian.PutUint32(tcp[4:], 1000)
	tcp[12], tcp[13] = 5<<4, fl
	p := append(ip, tcp...)
	for i := range n {
		p = append(p, byte(i*7))
	}
	return p
}

func withVnet(h vnetHdr, p []byte) []byte {
	b := make([]byte, vnetHdrLen, vnetHdrLen+len(p))
	b[0], b[1] = h.flags, h.gsoType
	binary.LittleEndian.PutUint16(b[2:], h.hdrLen)
	binary.LittleEndian.PutUint16(b[4:], h.gsoSize)
	binary.LittleEndian.PutUint16(b[6:], h.csumStart)
	binary.LittleEndian.PutUint16(b[8:], h.csumOffset)
	return append(b, p...)
}

// checksumsValid verifies a packet's IPv4 header and TCP checksums the way
// a receiver does: the sums come out as 0xffff.
func checksumsValid(t *testing.T, p []byte) {
	t.Helper()
	ipHL := 40
	if p[0]>>4 == 4 {
		ipHL = int(p[0]&0xf) * 4
		if csum.Fold(csum.Sum(p[:ipHL], 0)) != 0xffff {
			t.Errorf("IPv4 header checksum wrong")
		}
	}
	if csum.Fold(csum.Sum(p[ipHL:], pseudoHeader(p[:ipHL], len(p)-ipHL))) != 0xffff {
		t.Errorf("TCP checksum wrong")
	}
}

func TestSegmentTSO(t *testing.T) {
	const fin, psh, cwr = 0x01, 0x08, 0x80
	for _, v6 := range []bool{false, true} {
		orig := tcpPacket(v6, 3000, 0x10|fin|psh|cwr)
		typ, ipHL := uint8(gsoTCPv4), 20
		if v6 {
			typ, ipHL = gsoTCPv6, 40
		}
		var s segmenter
		if err := s.reset(withVnet(vnetHdr{flags: vnetFlagNeedsCsum, gsoType: typ, hdrLen: uint16(ipHL + 20), gsoSize: 1400,
			csumStart: uint16(ipHL), csumOffset: 16}, orig)); err != nil {
			t.Fatal(err)
		}
		var payload []byte
		for i := 0; !s.done(); i++ {
			buf := make([]byte, 1500)
			n, err := s.nextPacket(buf)
			if err != nil {
				t.Fatal(err)
			}
			p := buf[:n]
			checksumsValid(t, p)
			tcp := p[ipHL:]
			if seq := binary.BigEndian.Uint32(tcp[4:]); seq != uint32(1000+len(payload)) {
				t.Errorf("v6=%v segment %d: seq %d", v6, i, seq)
			}
			last := len(payload)+n-ipHL-20 == 3000
			if got := tcp[13] & (fin | psh); (got != 0) != last {
				t.Errorf("v6=%v segment %d: FIN/PSH %#x, last %v", v6, i, got, last)
			}
			if got := tcp[13] & cwr; (got != 0) != (i == 0) {
				t.Errorf("v6=%v segment %d: CWR %#x", v6, i, got)
			}
			if !v6 && binary.BigEndian.Uint16(p[4:]) != uint16(7+i) {
				t.Errorf("segment %d: IPv4 id %d", i, binary.BigEndian.Uint16(p[4:]))
			}
			if (!v6 && int(binary.BigEndian.Uint16(p[2:])) != n) || (v6 && int(binary.BigEndian.Uint16(p[4:])) != n-40) {
				t.Errorf("v6=%v segment %d: IP length field does not match %d bytes", v6, i, n)
			}
			payload = append(payload, tcp[20:]...)
		}
		if !bytes.Equal(payload, orig[ipHL+20:]) {
			t.Errorf("v6=%v: segments do not add up to the burst", v6)
		}
	}
}

// TestSegmentNeedsCsum: a single packet whose checksum the kernel left to
// the device (it holds the pseudo-header sum) comes out complete.
func TestSegmentNeedsCsum(t *testing.T) {
	p := tcpPacket(false, 100, 0x18)
	binary.BigEndian.PutUint16(p[10:], ^csum.Fold(csum.Sum(p[:20], 0)))
	binary.BigEndian.PutUint16(p[36:], csum.Fold(pseudoHeader(p[:20], len(p)-20)))
	var s segmenter
	if err := s.reset(withVnet(vnetHdr{flags: vnetFlagNeedsCsum, csumStart: 20, csumOffset: 16}, p)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1500)
	n, err := s.nextPacket(buf)
	if err != nil || n != len(p) || !s.done() {
		t.Fatalf("nextPacket = %d, %v; done %v", n, err, s.done())
	}
	checksumsValid(t, buf[:n])
}

func TestSegmentRejects(t *testing.T) {
	good := tcpPacket(false, 3000, 0x10)
	for name, b := range map[string][]byte{
		"short":       make([]byte, 12),
		"not ip":      withVnet(vnetHdr{}, append([]byte{0x20}, make([]byte, 40)...)),
		"udp gso":     withVnet(vnetHdr{gsoType: 5, gsoSize: 1400}, good),
		"zero size":   withVnet(vnetHdr{gsoType: gsoTCPv4}, good),
		"not tcp":     withVnet(vnetHdr{gsoType: gsoTCPv4, gsoSize: 1400}, append(append([]byte{}, good[:9]...), append([]byte{17}, good[10:]...)...)),
		"cut headers": withVnet(vnetHdr{gsoType: gsoTCPv4, gsoSize: 1400}, good[:30]),
	} {
		var s segmenter
		if s.reset(b) == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// A segment that does not fit the caller's buffer is an error, not a
	// truncated packet.
	var s segmenter
	if err := s.reset(withVnet(vnetHdr{gsoType: gsoTCPv4, gsoSize: 1400}, good)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.nextPacket(make([]byte, 100)); err == nil {
		t.Error("a segment larger than the buffer was produced")
	}
}

func FuzzSegment(f *testing.F) {
	f.Add(withVnet(vnetHdr{gsoType: gsoTCPv4, gsoSize: 1400}, tcpPacket(false, 3000, 0x10)))
	f.Add(withVnet(vnetHdr{gsoType: gsoTCPv6, gsoSize: 500}, tcpPacket(true, 1200, 0x19)))
	f.Add(withVnet(vnetHdr{flags: vnetFlagNeedsCsum, csumStart: 20, csumOffset: 16}, tcpPacket(false, 10, 0x10)))
	f.Fuzz(func(t *testing.T, b []byte) {
		var s segmenter
		if s.reset(b) != nil {
			return
		}
		buf := make([]byte, 2000)
		for i := 0; !s.done() && i < 200; i++ {
			s.nextPacket(buf)
		}
	})
}

// segments cuts a payload of n bytes into TCP segments of mss bytes with
// complete checksums, as a peer's kernel would have sent them.
func segments(v6 bool, n, mss int) [][]byte {
	burst := tcpPacket(v6, n, tcpACK)
	typ, ipHL := uint8(gsoTCPv4), 20
	if v6 {
		typ, ipHL = gsoTCPv6, 40
	}
	var s segmenter
	if err := s.reset(withVnet(vnetHdr{gsoType: typ, gsoSize: uint16(mss), hdrLen: uint16(ipHL + 20)}, burst)); err != nil {
		panic(err)
	}
	var out [][]byte
	for !s.done() {
		b := make([]byte, 2000)
		k, _ := s.nextPacket(b)
		out = append(out, b[:k])
	}
	return out
}

// TestMergeRoundTrip: consecutive segments of one flow merge into one GSO
// packet that, cut again the way the kernel would, gives back the same
// segments.
func TestMergeRoundTrip(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		segs := segments(v6, 5000, 1400) // 1400, 1400, 1400, 800
		if n := run(segs); n != len(segs) {
			t.Fatalf("v6=%v: run = %d of %d segments", v6, n, len(segs))
		}
		buf := make([]byte, maxSuper)
		m := merge(buf, segs)
		var s segmenter
		if err := s.reset(buf[:m]); err != nil {
			t.Fatal(err)
		}
		if s.hdr.gsoSize != 1400 || s.hdr.flags != vnetFlagNeedsCsum {
			t.Errorf("v6=%v: header %+v", v6, s.hdr)
		}
		for i := 0; !s.done(); i++ {
			b := make([]byte, 2000)
			k, err := s.nextPacket(b)
			if err != nil || i >= len(segs) || !bytes.Equal(b[:k], segs[i]) {
				t.Fatalf("v6=%v: segment %d differs after merge and cut (%v)", v6, i, err)
			}
		}
	}
}

func TestRunStopsAtFlowBreaks(t *testing.T) {
	segs := segments(false, 5600, 1400) // four full segments
	gap := append([][]byte{segs[0], segs[2]}, segs[3])
	other := segments(false, 2800, 1400)
	binary.BigEndian.PutUint16(other[1][20:], 40001) // another source port
	pushed := segments(false, 4200, 1400)
	pushed[1][33] |= tcpPSH
	syn := segments(false, 2800, 1400)
	syn[1][33] |= 0x02
	for name, tc := range map[string]struct {
		pkts [][]byte
		want int
	}{
		"sequence gap":    {gap, 1},
		"other flow":      {other, 1},
		"push ends a run": {pushed, 2},
		"syn never":       {syn, 1},
		"single":          {segs[:1], 1},
	} {
		if n := run(tc.pkts); n != tc.want {
			t.Errorf("%s: run = %d, want %d", name, n, tc.want)
		}
	}
}
