package xdp

import (
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/pspd/pspd/userspace/frame"
	"github.com/pspd/pspd/userspace/internal/nstest"
	"github.com/pspd/pspd/userspace/xsk"
)

const xdpRedirect = 4

func udpFrame(src, dst netip.AddrPort, payload int) []byte {
	b := make([]byte, frame.EthLen+frame.IPv6Len+frame.UDPLen+payload)
	et := uint16(frame.EtherTypeIPv4)
	if !dst.Addr().Is4() {
		et = frame.EtherTypeIPv6
	}
	frame.PutEthernet(b, frame.MAC{2}, frame.MAC{4}, et)
	n := frame.PutIPUDP(b[frame.EthLen:], src, dst, payload)
	return b[:frame.EthLen+n+payload]
}

// TestVerdicts runs the loaded program on crafted frames with the kernel's
// BPF_PROG_TEST_RUN and checks which ones it redirects.
func TestVerdicts(t *testing.T) {
	ns := nstest.New(t)
	dev, _ := nstest.Veth(t, ns, ns, netip.MustParsePrefix("192.0.2.1/24"), netip.MustParsePrefix("192.0.2.2/24"))
	l, err := ns.Netlink.LinkByName(dev)
	if err != nil {
		t.Fatal(err)
	}
	var s *xsk.Socket
	if err := ns.Do(func() (err error) { s, err = xsk.Open(l.Attrs().Index, 0, xsk.Config{NumFrames: 64}); return err }); err != nil {
		t.Skip("no AF_XDP socket to redirect to (CONFIG_XDP_SOCKETS): ", err)
	}
	defer s.Close()
	p, err := Load(1, []uint16{6081, 1000})
	if err != nil {
		t.Skip("cannot load an XDP program with an XSKMAP (needs CONFIG_BPF_SYSCALL, CONFIG_XDP_SOCKETS): ", err)
	}
	defer p.Close()
	v4 := func(port uint16) []byte {
		return udpFrame(netip.MustParseAddrPort("192.0.2.1:5"), netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port), 64)
	}
	v6 := func(port uint16) []byte {
		return udpFrame(netip.MustParseAddrPort("[2001:db8::1]:5"), netip.AddrPortFrom(netip.MustParseAddr("2001:db8::2"), port), 64)
	}
	withOptions := func() []byte {
		// IHL 6: one 4-byte option word (NOPs) between IP and UDP.
		b := v4(6081)
		out := append([]byte{}, b[:frame.EthLen+frame.IPv4Len]...)
		out = append(out, 1, 1, 1, 1)
		out = append(out, b[frame.EthLen+frame.IPv4Len:]...)
		out[frame.EthLen] = 0x46
		return out
	}
	mutate := func(b []byte, f func([]byte)) []byte { f(b); return b }
	cases := []struct {
		name string
		pkt  []byte
		want uint32
	}{
		{"v4 geneve", v4(6081), xdpRedirect},
		{"v4 psp", v4(1000), xdpRedirect},
		{"v4 other port", v4(6082), xdpPass},
		{"v4 ip options", withOptions(), xdpRedirect},
		{"v4 fragment", mutate(v4(6081), func(b []byte) { b[frame.EthLen+6] |= 0x20 }), xdpPass},
		{"v4 tcp", mutate(v4(6081), func(b []byte) { b[frame.EthLen+9] = 6 }), xdpPass},
		{"v4 truncated udp", v4(6081)[:frame.EthLen+frame.IPv4Len+4], xdpPass},
		{"v6 geneve", v6(6081), xdpRedirect},
		{"v6 other port", v6(53), xdpPass},
		{"v6 extension header", mutate(v6(6081), func(b []byte) { b[frame.EthLen+6] = 0 }), xdpPass},
		{"arp", mutate(v4(6081), func(b []byte) { b[12], b[13] = 0x08, 0x06 }), xdpPass},
		{"ethernet only", v4(6081)[:frame.EthLen], xdpPass},
	}
	check := func(registered bool) {
		for _, c := range cases {
			want := c.want
			if !registered {
				want = xdpPass
			}
			got, err := p.prog.Run(&ebpf.RunOptions{Data: c.pkt})
			if err != nil {
				t.Fatalf("%s: test run: %v", c.name, err)
			}
			if got != want {
				t.Errorf("%s (socket registered %v): verdict %d, want %d", c.name, registered, got, want)
			}
		}
	}
	if err := p.Register(0, s.FD()); err != nil {
		t.Fatal(err)
	}
	check(true)
	if err := p.Unregister(0); err != nil {
		t.Fatal(err)
	}
	check(false)
}

func TestLoadRejects(t *testing.T) {
	if _, err := Load(0, []uint16{6081}); err == nil {
		t.Error("0 queues accepted")
	}
	if _, err := Load(1, nil); err == nil {
		t.Error("no ports accepted")
	}
	if _, err := Load(1, make([]uint16, MaxPorts+1)); err == nil {
		t.Error("too many ports accepted")
	}
	nstest.RequireRoot(t)
	if _, err := Load(1, []uint16{6081, 0}); err == nil {
		t.Error("port 0 accepted")
	}
}
