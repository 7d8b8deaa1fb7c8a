package xfrm

import (
	"context"
	"encoding/binary"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

func writeSysctl(t testing.TB, nsFD int, path, val string) {
	t.Helper()
	fd, err := inNetNS(nsFD, func() (int, error) { return unix.Open(path, unix.O_WRONLY|unix.O_CLOEXEC, 0) })
	if err != nil {
		t.Fatalf("open %s: %v", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	if _, err := f.WriteString(val); err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
}

func startMonitor(t testing.TB, h *Handle) <-chan Event {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan Event, 16)
	done := make(chan error, 1)
	go func() { done <- h.Monitor(ctx, ch) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != context.Canceled {
			t.Errorf("monitor ended with %v, want context.Canceled", err)
		}
	})
	// The monitor's socket must have joined its groups before the test
	// makes the kernel send anything.
	time.Sleep(50 * time.Millisecond)
	return ch
}

func waitEvent(t testing.TB, ch <-chan Event, kind EventKind, d time.Duration) Event {
	t.Helper()
	deadline := time.After(d)
	for {
		select {
		case ev := <-ch:
			if ev.Kind == kind {
				return ev
			}
			t.Logf("ignoring %+v while waiting for %s", ev, kind)
		case <-deadline:
			t.Fatalf("no %s event within %s", kind, d)
		}
	}
}

// TestMonitorExpire reserves an SPI with a one-second acquire lifetime and
// waits for the kernel's hard EXPIRE of the larval state; another owner's
// reservation expiring at the same time must not be reported.
func TestMonitorExpire(t *testing.T) {
	nsFD := newNS(t)
	writeSysctl(t, nsFD, "/proc/sys/net/core/xfrm_acq_expires", "1")
	h := openNS(t, nsFD, Config{})
	other := openNS(t, nsFD, Config{Owner: Owner{ReqIDMin: 7, ReqIDMax: 7, MarkMask: 1}})
	ch := startMonitor(t, h)
	ctx := context.Background()
	if _, err := other.ReserveSPI(ctx, addrB, addrA, 7, Transport, 0x5000, 0x5000); err != nil {
		t.Fatal(err)
	}
	spi, err := h.ReserveSPI(ctx, addrB, addrA, testReqID, Transport, 0x4000_0777, 0x4000_0777)
	if err != nil {
		t.Fatal(err)
	}
	ev := waitEvent(t, ch, HardExpire, 10*time.Second)
	if ev.SA != (ID{Dst: addrA, SPI: spi}) || ev.ReqID != testReqID {
		t.Fatalf("expire event %+v, want SA %s/%#x reqid %#x", ev, addrA, spi, testReqID)
	}
	select {
	case ev := <-ch:
		t.Fatalf("unexpected event %+v (the foreign reservation must not be reported)", ev)
	case <-time.After(1500 * time.Millisecond):
	}
}

// TestMonitorAcquire sends a UDP datagram that matches pspd's outbound
// policy while no SA exists: the kernel asks for one with ACQUIRE.
func TestMonitorAcquire(t *testing.T) {
	nsFD := newNS(t)
	link, err := vnl.NewHandleAt(netns.NsHandle(nsFD), unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer link.Close()
	// Not lo: loopback routes bypass XFRM (disable_xfrm).
	veth := &vnl.Veth{LinkAttrs: vnl.LinkAttrs{Name: "pxf0"}, PeerName: "pxf1"}
	if err := link.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	a, _ := vnl.ParseAddr(addrA.String() + "/24")
	if err := link.AddrAdd(veth, a); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"pxf0", "pxf1"} {
		if err := link.LinkSetUp(&vnl.Veth{LinkAttrs: vnl.LinkAttrs{Name: n}}); err != nil {
			t.Fatal(err)
		}
	}
	h := openNS(t, nsFD, Config{})
	pol := testPolicies()[0]
	if err := h.AddPolicy(context.Background(), &pol); err != nil {
		t.Fatal(err)
	}
	ch := startMonitor(t, h)
	fd, err := inNetNS(nsFD, func() (int, error) { return unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0) })
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	// With net.core.xfrm_larval_drop (default 1) the datagram is
	// dropped while the kernel asks for an SA, and sendto succeeds.
	if err := unix.Sendto(fd, []byte("hello"), 0, &unix.SockaddrInet4{Port: 9, Addr: addrB.As4()}); err != nil {
		t.Fatal(err)
	}
	ev := waitEvent(t, ch, Acquire, 5*time.Second)
	if ev.ReqID != testReqID || ev.Src != addrA || ev.Dst != addrB {
		t.Fatalf("acquire event %+v, want reqid %#x %s->%s", ev, testReqID, addrA, addrB)
	}
}

func TestWatchUnknownSPIOpens(t *testing.T) {
	h := openNS(t, newNS(t), Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	ch := make(chan Event, 1)
	if err := h.WatchUnknownSPI(ctx, 50*time.Millisecond, ch); err != context.DeadlineExceeded {
		t.Fatalf("WatchUnknownSPI = %v, want it to run until the deadline", err)
	}
	if len(ch) != 0 {
		t.Fatalf("event %+v in a namespace that received nothing", <-ch)
	}
}

func TestParseXfrmStat(t *testing.T) {
	const stat = "XfrmInError             \t0\nXfrmInNoStates          \t42\nXfrmInStateProtoError   \t3\n"
	if n, err := parseXfrmStat(strings.NewReader(stat), "XfrmInNoStates"); err != nil || n != 42 {
		t.Fatalf("got %d, %v; want 42", n, err)
	}
	if _, err := parseXfrmStat(strings.NewReader(stat), "XfrmNope"); err == nil {
		t.Fatal("missing counter not reported")
	}
	if _, err := parseXfrmStat(strings.NewReader("XfrmInNoStates x\n"), "XfrmInNoStates"); err == nil {
		t.Fatal("malformed counter not reported")
	}
}

func expireMsg(hard bool, reqid uint32, spi uint32) []byte {
	var info nl.XfrmUsersaInfo
	info.Family = unix.AF_INET
	info.Id.Daddr = xaddr(netip.MustParseAddr("192.0.2.1"))
	info.Id.Spi = nl.Swap32(spi)
	info.Reqid = reqid
	b := append([]byte(nil), structBytes(&info)...)
	b = append(b, 0, 0, 0, 0, 0, 0, 0, 0)
	if hard {
		b[nl.SizeofXfrmUsersaInfo] = 1
	}
	m := nl.XfrmMark{Value: 0, Mask: 0x00500000}
	return appendAttr(b, nl.XFRMA_MARK, structBytes(&m))
}

func TestDecodeEvent(t *testing.T) {
	ev, ok, err := decodeEvent(nl.XFRM_MSG_EXPIRE, expireMsg(false, testReqID, 0x1234))
	if err != nil || !ok || ev.Kind != SoftExpire || ev.SA.SPI != 0x1234 || ev.ReqID != testReqID || ev.mark.Mask != 0x00500000 {
		t.Fatalf("soft expire decoded as %+v ok=%v err=%v", ev, ok, err)
	}
	if ev, _, _ := decodeEvent(nl.XFRM_MSG_EXPIRE, expireMsg(true, 1, 1)); ev.Kind != HardExpire {
		t.Fatalf("hard expire decoded as %s", ev.Kind)
	}
	if _, _, err := decodeEvent(nl.XFRM_MSG_EXPIRE, expireMsg(true, 1, 1)[:100]); err == nil {
		t.Fatal("truncated expire accepted")
	}
	if _, ok, err := decodeEvent(nl.XFRM_MSG_NEWSA, nil); ok || err != nil {
		t.Fatal("unmonitored type reported")
	}
}

// mappingMsg is a struct xfrm_user_mapping as build_mapping lays it out:
// the SA's id, its reqid, the old and the new source, ports big-endian.
func mappingMsg(reqid, spi uint32, newSrc netip.Addr, newPort uint16) []byte {
	b := make([]byte, sizeofUserMapping)
	d := xaddr(netip.MustParseAddr("192.0.2.1"))
	copy(b[0:16], d[:])
	binary.BigEndian.PutUint32(b[16:], spi)
	binary.NativeEndian.PutUint16(b[20:], unix.AF_INET)
	b[22] = unix.IPPROTO_ESP
	binary.NativeEndian.PutUint32(b[24:], reqid)
	old := xaddr(netip.MustParseAddr("198.51.100.1"))
	copy(b[28:44], old[:])
	n := xaddr(newSrc)
	copy(b[44:60], n[:])
	binary.BigEndian.PutUint16(b[60:], 4500)
	binary.BigEndian.PutUint16(b[62:], newPort)
	return b
}

// TestDecodeMapping: a NAT's new mapping of the peer reaches the backend
// with the SA it concerns and the new source address and port.
func TestDecodeMapping(t *testing.T) {
	ev, ok, err := decodeEvent(nl.XFRM_MSG_MAPPING, mappingMsg(testReqID, 0x4000_0101, netip.MustParseAddr("198.51.100.3"), 61000))
	if err != nil || !ok {
		t.Fatalf("mapping: ok=%v err=%v", ok, err)
	}
	if ev.Kind != Mapping || ev.ReqID != testReqID || ev.SA != (ID{Dst: netip.MustParseAddr("192.0.2.1"), SPI: 0x4000_0101}) ||
		ev.Src != netip.MustParseAddr("198.51.100.3") || ev.Port != 61000 {
		t.Fatalf("mapping decoded as %+v", ev.Event)
	}
	if _, _, err := decodeEvent(nl.XFRM_MSG_MAPPING, mappingMsg(1, 1, netip.MustParseAddr("198.51.100.3"), 1)[:40]); err == nil {
		t.Fatal("truncated mapping accepted")
	}
}

// FuzzDecodeEvent checks that no kernel message, however malformed,
// panics the monitor; the seeds run as part of the unit tests.
func FuzzDecodeEvent(f *testing.F) {
	f.Add(uint16(nl.XFRM_MSG_EXPIRE), expireMsg(true, testReqID, 0x100))
	f.Add(uint16(nl.XFRM_MSG_ACQUIRE), make([]byte, sizeofUserAcquire+8))
	f.Add(uint16(nl.XFRM_MSG_MIGRATE), append(make([]byte, nl.SizeofXfrmUserpolicyId), appendAttr(nil, nl.XFRMA_MIGRATE, make([]byte, sizeofUserMigrate))...))
	f.Add(uint16(nl.XFRM_MSG_MAPPING), mappingMsg(testReqID, 0x100, netip.MustParseAddr("198.51.100.3"), 4501))
	f.Fuzz(func(t *testing.T, typ uint16, b []byte) {
		decodeEvent(typ, b)
		parseSA(b)
		parsePolicy(b)
	})
}
