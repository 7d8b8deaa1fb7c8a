package tun_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/pspd/pspd/userspace/internal/nstest"
	"github.com/pspd/pspd/userspace/tun"
)

// udp4 builds an IPv4/UDP packet (UDP checksum 0: allowed over IPv4).
func udp4(src, dst netip.AddrPort, payload []byte) []byte {
	p := make([]byte, 28+len(payload))
	p[0], p[8], p[9] = 0x45, 64, 17
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(p[12:], s[:])
	copy(p[16:], d[:])
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(p[i:]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	binary.BigEndian.PutUint16(p[10:], ^uint16(sum))
	binary.BigEndian.PutUint16(p[20:], src.Port())
	binary.BigEndian.PutUint16(p[22:], dst.Port())
	binary.BigEndian.PutUint16(p[24:], uint16(8+len(payload)))
	copy(p[28:], payload)
	return p
}

func TestTUNBothDirections(t *testing.T) {
	nstest.RequireRoot(t)
	ns := nstest.New(t)
	name := nstest.Name("t")
	var dev *tun.Device
	var sock *net.UDPConn
	if err := ns.Do(func() (err error) {
		if dev, err = tun.Open(name, 1400); err != nil {
			return err
		}
		sock, err = net.ListenUDP("udp4", &net.UDPAddr{Port: 7000})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dev.Close(); sock.Close() })
	nstest.Addr(t, ns, name, netip.MustParsePrefix("10.201.0.1/24"))
	l, err := ns.Netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if l.Attrs().MTU != 1400 {
		t.Fatalf("mtu %d, want 1400", l.Attrs().MTU)
	}

	// Kernel → TUN: several datagrams, read as one batch where possible.
	local := netip.MustParseAddrPort("10.201.0.1:7000")
	remote := netip.MustParseAddrPort("10.201.0.2:9000")
	const n = 8
	for i := range n {
		if _, err := sock.WriteToUDPAddrPort([]byte{'k', byte(i)}, remote); err != nil {
			t.Fatal(err)
		}
	}
	bufs := make([][]byte, 4)
	for i := range bufs {
		bufs[i] = make([]byte, 1500)
	}
	lens := make([]int, len(bufs))
	got := 0
	for got < n {
		k, err := dev.ReadBatch(bufs, lens)
		if err != nil {
			t.Fatal(err)
		}
		for i := range k {
			p := bufs[i][:lens[i]]
			if p[0]>>4 != 4 || p[9] != 17 || !bytes.Equal(p[28:], []byte{'k', byte(got)}) {
				// The kernel may also emit IGMP/IPv6 noise; only
				// our UDP datagrams count.
				if p[0]>>4 == 4 && p[9] == 17 {
					t.Fatalf("packet %d: % x", got, p)
				}
				continue
			}
			got++
		}
	}

	// TUN → kernel.
	if _, err := dev.Write(udp4(remote, local, []byte("hello"))); err != nil {
		t.Fatal(err)
	}
	sock.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 100)
	m, from, err := sock.ReadFromUDPAddrPort(b)
	if err != nil {
		t.Fatal(err)
	}
	if string(b[:m]) != "hello" || from != remote {
		t.Fatalf("got %q from %v", b[:m], from)
	}
}

func TestCloseUnblocksRead(t *testing.T) {
	nstest.RequireRoot(t)
	ns := nstest.New(t)
	var dev *tun.Device
	if err := ns.Do(func() (err error) { dev, err = tun.Open(nstest.Name("t"), 1400); return err }); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		// The kernel may send IPv6 router solicitations to the fresh
		// device; read until the error.
		for {
			if _, err := dev.ReadBatch([][]byte{make([]byte, 1500)}, []int{0}); err != nil {
				done <- err
				return
			}
		}
	}()
	time.Sleep(50 * time.Millisecond)
	dev.Close()
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrClosed) {
			t.Fatalf("read after close: %v, want os.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not unblock ReadBatch")
	}
}

func TestOpenRejects(t *testing.T) {
	if _, err := tun.Open("", 1400); err == nil {
		t.Error("empty name accepted")
	}
	if _, err := tun.Open("pengx", 100); err == nil {
		t.Error("mtu 100 accepted")
	}
}
