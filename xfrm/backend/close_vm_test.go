package backend

import (
	"bytes"
	"context"
	"encoding/binary"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/internal/nstest"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/offload"
	"github.com/pspd/pspd/xfrm"
)

// capture records every frame arriving on ifname in namespace ns until
// the returned function is called, which returns them.
func capture(t *testing.T, ns int, ifname string) func() [][]byte {
	t.Helper()
	var fd int
	var err error
	nstest.Do(t, ns, func() {
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return
		}
		var ifi *net.Interface
		if ifi, err = net.InterfaceByName(ifname); err != nil {
			return
		}
		err = unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index})
	})
	if err != nil {
		t.Fatalf("capture on %s: %v", ifname, err)
	}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 50000})
	var mu sync.Mutex
	var frames [][]byte
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for {
			select {
			case <-stop:
				return
			default:
			}
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				continue
			}
			mu.Lock()
			frames = append(frames, bytes.Clone(buf[:n]))
			mu.Unlock()
		}
	}()
	return func() [][]byte {
		close(stop)
		<-done
		unix.Close(fd)
		mu.Lock()
		defer mu.Unlock()
		return frames
	}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// ipProtos counts the IPv4 frames of a capture by IP protocol.
func ipProtos(frames [][]byte) map[byte]int {
	n := map[byte]int{}
	for _, f := range frames {
		if len(f) >= 34 && binary.BigEndian.Uint16(f[12:14]) == 0x0800 {
			n[f[23]]++
		}
	}
	return n
}

// sendUDP sends msg from src to dst:7002 in namespace ns, from src
// explicitly: the transport-mode policies select on the host addresses.
func sendUDP(t *testing.T, ns int, src, dst netip.Addr, msg []byte) {
	t.Helper()
	var c *net.UDPConn
	var err error
	nstest.Do(t, ns, func() {
		c, err = net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0)), net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, 7002)))
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for range 5 {
		c.Write(msg) // a policy with no SA refuses the send: that is the point
	}
}

// kernelState lists what pspd has in ns's kernel.
func kernelState(t *testing.T, ns int) ([]xfrm.State, []xfrm.Policy, map[string]uint64) {
	t.Helper()
	h, err := xfrm.Open(xfrm.Config{NetNS: ns})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	ctx := context.Background()
	sas, err := h.ListSAs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pols, err := h.ListPolicies(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c, err := h.Counters()
	if err != nil {
		t.Fatal(err)
	}
	return sas, pols, c
}

func policiesTo(pols []xfrm.Policy, a netip.Addr) int {
	n := 0
	for _, p := range pols {
		if p.Dst.Addr() == a || p.Src.Addr() == a {
			n++
		}
	}
	return n
}

// TestVMCloseAndReconcile: Close removes every SA; it keeps the policies
// of the peers that require encryption, so traffic to them is dropped
// (XfrmOutNoStates), never sent in clear, and removes those of the other
// peers; a New with Config.Peers keeps the policies of the still
// configured peers that require encryption and removes those of a peer
// no longer configured.
func TestVMCloseAndReconcile(t *testing.T) {
	needVM(t)
	hub := &node{name: "a", ns: nstest.New(t, "pxc"), addr: netip.MustParseAddr("10.81.0.1")}
	hubLo(t, hub)
	// b and e require encryption, c does not.
	var spokes []*node
	for i, name := range []string{"b", "c", "e"} {
		id, err := identity.Generate()
		if err != nil {
			t.Fatal(err)
		}
		s := &node{name: name, ns: nstest.New(t, "pxc"), addr: netip.AddrFrom4([4]byte{10, 81, byte(i + 1), 2}), id: id}
		wireSpoke(t, hub, s, i+1)
		spokes = append(spokes, s)
	}
	b, c, e := spokes[0], spokes[1], spokes[2]
	var specs []offload.PeerSpec
	for _, s := range spokes {
		sp := hub.spec(s, hub.addr)
		sp.RequireEncryption = s != c
		specs = append(specs, sp)
	}
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	ctx := context.Background()
	be, err := New(ctx, Config{Offload: xfrm.OffloadNone, Logger: log, NetNS: hub.ns, Peers: specs})
	if err != nil {
		t.Fatal(err)
	}
	for i, sp := range specs {
		if err := be.AddPeer(ctx, sp); err != nil {
			t.Fatal(err)
		}
		sa := &assoc.SA{Peer: sp.Key, ID: assoc.ID(i + 1), Backend: assoc.BackendXFRM, Suite: sp.Suite, Generation: 1,
			RxSPI: assoc.SPI(0x100 + i), TxSPI: assoc.SPI(0x40000100 + i), RxKey: randKey(t, 32), TxKey: randKey(t, 32), RxSalt: [4]byte{1}, TxSalt: [4]byte{2}}
		if err := be.Install(ctx, sa); err != nil {
			t.Fatal(err)
		}
		if err := be.Activate(ctx, sa); err != nil {
			t.Fatal(err)
		}
		sa.Wipe()
	}
	sas, pols, _ := kernelState(t, hub.ns)
	if len(sas) != 6 || len(pols) != 6 {
		t.Fatalf("before Close: %d SAs, %d policies, want 6 and 6", len(sas), len(pols))
	}
	// With an SA, traffic to b leaves as ESP.
	canary := []byte("pspd-close-canary-in-clear")
	stop := capture(t, b.ns, "up")
	sendUDP(t, hub.ns, hub.addr, b.addr, canary)
	time.Sleep(100 * time.Millisecond)
	if n := ipProtos(stop())[unix.IPPROTO_ESP]; n == 0 {
		t.Fatal("no ESP reached b while its SA was up: the capture sees nothing")
	}

	if err := be.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	sas, pols, before := kernelState(t, hub.ns)
	if len(sas) != 0 {
		t.Errorf("SAs left after Close: %+v", sas)
	}
	if policiesTo(pols, b.addr) != 2 || policiesTo(pols, e.addr) != 2 || policiesTo(pols, c.addr) != 0 {
		t.Errorf("policies after Close: %v; want b's and e's two each and none of c's", pols)
	}
	// b requires encryption: its traffic is dropped at a, counted, and
	// never seen in clear.
	stop = capture(t, b.ns, "up")
	sendUDP(t, hub.ns, hub.addr, b.addr, canary)
	time.Sleep(200 * time.Millisecond)
	frames := stop()
	for _, f := range frames {
		if bytes.Contains(f, canary) {
			t.Fatal("the canary reached b in clear after Close")
		}
	}
	if n := ipProtos(frames); n[unix.IPPROTO_UDP]+n[unix.IPPROTO_ESP] != 0 {
		t.Errorf("frames reached b after Close: %v", n)
	}
	_, _, after := kernelState(t, hub.ns)
	if after["XfrmOutNoStates"] <= before["XfrmOutNoStates"] {
		t.Errorf("XfrmOutNoStates %d -> %d: the held-back packets were not counted", before["XfrmOutNoStates"], after["XfrmOutNoStates"])
	}
	// c does not: with its policies gone its traffic is plain again.
	stop = capture(t, c.ns, "up")
	sendUDP(t, hub.ns, hub.addr, c.addr, canary)
	time.Sleep(200 * time.Millisecond)
	if n := ipProtos(stop())[unix.IPPROTO_UDP]; n == 0 {
		t.Error("traffic to c (no require_encryption) does not flow after Close: something of pspd's stayed")
	}

	// The next start still configures b, no longer e.
	logs.Reset()
	be, err = New(ctx, Config{Offload: xfrm.OffloadNone, Logger: log, NetNS: hub.ns, Peers: []offload.PeerSpec{specs[0], specs[1]}})
	if err != nil {
		t.Fatal(err)
	}
	defer be.Close()
	if !bytes.Contains(logs.Bytes(), []byte("kept_policies=2")) || !bytes.Contains(logs.Bytes(), []byte("removed_policies=2")) {
		t.Errorf("reconcile did not keep b's two policies and remove e's two:\n%s", logs.String())
	}
	_, pols, _ = kernelState(t, hub.ns)
	if policiesTo(pols, b.addr) != 2 || policiesTo(pols, e.addr) != 0 || policiesTo(pols, c.addr) != 0 {
		t.Errorf("policies after the restart: %v; want b's two only", pols)
	}
	stop = capture(t, b.ns, "up")
	sendUDP(t, hub.ns, hub.addr, b.addr, canary)
	time.Sleep(200 * time.Millisecond)
	for _, f := range stop() {
		if bytes.Contains(f, canary) {
			t.Fatal("the canary reached b in clear after the restart")
		}
	}
}
