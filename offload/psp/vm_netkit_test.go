package psp_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/genl"
	"github.com/pspd/pspd/internal/nsim"
	"github.com/pspd/pspd/internal/nstest"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/localapi/client"
)

// nsPath is the /run/netns entry of namespace fd, the path an operator
// would give pspctl dev assoc.
func nsPath(t *testing.T, fd int) string {
	t.Helper()
	var want unix.Stat_t
	if err := unix.Fstat(fd, &want); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir("/run/netns")
	for _, e := range ents {
		p := filepath.Join("/run/netns", e.Name())
		var st unix.Stat_t
		if unix.Stat(p, &st) == nil && st.Dev == want.Dev && st.Ino == want.Ino {
			return p
		}
	}
	t.Fatalf("namespace fd %d has no entry in /run/netns", fd)
	return ""
}

// redirectToPhys attaches to the guest side of netkit primary (in the
// namespace ns) a program that sends the guest's IP packets straight out
// of phys (bpf_redirect_neigh), as psp.py's nk_primary_rx_redirect does:
// through the host's IP stack they would lose their socket, and with it
// their PSP transmit key. ARP and ICMPv6 (neighbour discovery) go the
// normal way, to the primary.
func redirectToPhys(t *testing.T, ns, primary, phys int) {
	t.Helper()
	attachProg(t, ns, "the redirect program", asm.Instructions{
		// skb->protocol (__sk_buff offset 16) is big-endian.
		asm.LoadMem(asm.R5, asm.R1, 16, asm.Word),
		asm.JEq.Imm(asm.R5, int32(htons(unix.ETH_P_IP)), "redirect"),
		asm.JNE.Imm(asm.R5, int32(htons(unix.ETH_P_IPV6)), "pass"),
		asm.LoadMem(asm.R2, asm.R1, 76, asm.Word), // skb->data
		asm.LoadMem(asm.R3, asm.R1, 80, asm.Word), // skb->data_end
		asm.Mov.Reg(asm.R4, asm.R2),
		asm.Add.Imm(asm.R4, 14+40),
		asm.JGT.Reg(asm.R4, asm.R3, "pass"),
		asm.LoadMem(asm.R5, asm.R2, 14+6, asm.Byte), // next header
		asm.JEq.Imm(asm.R5, unix.IPPROTO_ICMPV6, "pass"),
		asm.Mov.Imm(asm.R1, int32(phys)).WithSymbol("redirect"),
		asm.Mov.Imm(asm.R2, 0),
		asm.Mov.Imm(asm.R3, 0),
		asm.Mov.Imm(asm.R4, 0),
		asm.FnRedirectNeigh.Call(),
		asm.Return(),
		asm.Mov.Imm(asm.R0, 0).WithSymbol("pass"), // NETKIT_PASS
		asm.Return(),
	}, func(prog *ebpf.Program) (link.Link, error) {
		return link.AttachNetkit(link.NetkitOptions{Program: prog, Interface: primary, Attach: ebpf.AttachNetkitPeer})
	})
}

// attachProg loads a SchedCLS program and attaches it inside namespace
// ns, where the interface indexes of attach are.
func attachProg(t *testing.T, ns int, what string, insns asm.Instructions, attach func(*ebpf.Program) (link.Link, error)) {
	t.Helper()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL", Instructions: insns})
	if err != nil {
		t.Fatalf("load %s: %v", what, err)
	}
	t.Cleanup(func() { prog.Close() })
	var l link.Link
	nstest.Do(t, ns, func() { l, err = attach(prog) })
	if err != nil {
		t.Fatalf("attach %s: %v", what, err)
	}
	t.Cleanup(func() { l.Close() })
}

// redirectToGuest attaches to phys's ingress (tcx, in namespace ns) a
// program that hands packets for the guest's subnets (IPv4: the first
// three bytes of the destination, IPv6: the first four) straight to the
// netkit peer of primary (bpf_redirect_peer), as psp.py's nk_forward
// does: forwarded through the host's stack, a packet the device
// decrypted would be dropped at the netkit's transmit ("unencrypted skb
// with no associated socket", SOCK_VALIDATE_XMIT).
func redirectToGuest(t *testing.T, ns, phys, primary int, v4 [3]byte, v6 [4]byte) {
	t.Helper()
	// The destination's first bytes, as a little-endian load reads them.
	p4 := int32(uint32(v4[0]) | uint32(v4[1])<<8 | uint32(v4[2])<<16)
	p6 := int32(binary.LittleEndian.Uint32(v6[:]))
	attachProg(t, ns, "the ingress program", asm.Instructions{
		asm.LoadMem(asm.R2, asm.R1, 76, asm.Word), // skb->data
		asm.LoadMem(asm.R3, asm.R1, 80, asm.Word), // skb->data_end
		asm.LoadMem(asm.R5, asm.R1, 16, asm.Word), // skb->protocol
		asm.JEq.Imm(asm.R5, int32(htons(unix.ETH_P_IP)), "v4"),
		asm.JNE.Imm(asm.R5, int32(htons(unix.ETH_P_IPV6)), "pass"),
		asm.Mov.Reg(asm.R4, asm.R2),
		asm.Add.Imm(asm.R4, 14+40),
		asm.JGT.Reg(asm.R4, asm.R3, "pass"),
		asm.LoadMem(asm.R5, asm.R2, 14+24, asm.Word), // the IPv6 destination's first word
		asm.JNE.Imm32(asm.R5, p6, "pass"),
		asm.Ja.Label("redirect"),
		asm.Mov.Reg(asm.R4, asm.R2).WithSymbol("v4"),
		asm.Add.Imm(asm.R4, 14+20),
		asm.JGT.Reg(asm.R4, asm.R3, "pass"),
		asm.LoadMem(asm.R5, asm.R2, 14+16, asm.Word), // the IPv4 destination
		asm.And.Imm(asm.R5, 0xffffff),
		asm.JNE.Imm(asm.R5, p4, "pass"),
		asm.Mov.Imm(asm.R1, int32(primary)).WithSymbol("redirect"),
		asm.Mov.Imm(asm.R2, 0),
		asm.FnRedirectPeer.Call(),
		asm.Return(),
		asm.Mov.Imm(asm.R0, 0).WithSymbol("pass"), // TCX_PASS
		asm.Return(),
	}, func(prog *ebpf.Program) (link.Link, error) {
		return link.AttachTCX(link.TCXOptions{Program: prog, Interface: phys, Attach: ebpf.AttachTCXIngress})
	})
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// netkitPair makes an L2 netkit pair in namespace h with its peer moved
// to guest, both up, and returns their interfaces.
func netkitPair(t *testing.T, h *vnl.Handle, hg *vnl.Handle, guest int, name, peer string) (primary, gpeer vnl.Link) {
	t.Helper()
	nk := &vnl.Netkit{LinkAttrs: vnl.LinkAttrs{Name: name}, Mode: vnl.NETKIT_MODE_L2, Policy: vnl.NETKIT_POLICY_FORWARD, PeerPolicy: vnl.NETKIT_POLICY_FORWARD}
	nk.SetPeerAttrs(&vnl.LinkAttrs{Name: peer})
	if err := h.LinkAdd(nk); err != nil {
		t.Fatalf("netkit %s/%s: %v (CONFIG_NETKIT)", name, peer, err)
	}
	p, err := h.LinkByName(peer)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetNsFd(p, guest); err != nil {
		t.Fatal(err)
	}
	if primary, err = h.LinkByName(name); err != nil {
		t.Fatal(err)
	}
	if gpeer, err = hg.LinkByName(peer); err != nil {
		t.Fatal(err)
	}
	for _, x := range []struct {
		h *vnl.Handle
		l vnl.Link
	}{{h, primary}, {hg, gpeer}} {
		if err := x.h.LinkSetUp(x.l); err != nil {
			t.Fatal(err)
		}
	}
	return primary, gpeer
}

// rtnl is a route netlink handle in namespace ns for the test.
func rtnl(t *testing.T, ns int) *vnl.Handle {
	t.Helper()
	h, err := vnl.NewHandleAt(netns.NsHandle(ns), unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

func linkByIndex(t *testing.T, h *vnl.Handle, ifindex int) vnl.Link {
	t.Helper()
	l, err := h.LinkByIndex(ifindex)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func addAddr(t *testing.T, h *vnl.Handle, l vnl.Link, addr string) {
	t.Helper()
	a, err := vnl.ParseAddr(addr)
	if err != nil {
		t.Fatal(err)
	}
	a.Flags = unix.IFA_F_NODAD
	if err := h.AddrAdd(l, a); err != nil {
		t.Fatal(err)
	}
}

// genlAt is pspd's PSP netlink client in namespace ns, for the test.
func genlAt(t *testing.T, ns int) *genl.Client {
	t.Helper()
	c, err := genl.Dial(genl.Config{NetNS: ns})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func addRoute(t *testing.T, h *vnl.Handle, dst, gw string) {
	t.Helper()
	_, n, err := net.ParseCIDR(dst)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.RouteAdd(&vnl.Route{Dst: n, Gw: net.ParseIP(gw)}); err != nil {
		t.Fatalf("route %s via %s: %v", dst, gw, err)
	}
}

// TestVMNetkit is psp.py's netkit cases through pspd. Host A owns a PSP
// device (netdevsim, linked to B's) and runs a pspd; a container
// namespace C hangs off A on a netkit pair and runs a pspd of its own,
// whose peer is B's. A's pspd associates C's netkit end with its device
// through the API, as an operator would with pspctl dev assoc. Then a TCP
// connection from C's application to B's is upgraded by C's and B's
// pspds through pspd's client, carries data under PSP, and moves A's
// device counters; every PSP version carries data from C over IPv6 with
// keys C binds itself, as in psp.py; a rotation by A reaches C's pspd;
// after a disassoc C can no longer upgrade. The association's other shapes (a netdev of
// A's own namespace, one whose netkit is deleted) and the API's errors
// come first.
func TestVMNetkit(t *testing.T) {
	if os.Getenv("PSPD_IN_VM") != "1" {
		t.Skip("kernel lacks PSP, netdevsim and netkit: run make vmtest (PSPD_IN_VM unset)")
	}
	const subnet = "10.97.0"
	a, b := newHost(t, "a", 3231, "10.96.0.1"), newHost(t, "b", 3232, "10.96.0.2")
	if err := nsim.Link(a.port, b.port); err != nil {
		t.Fatal(err)
	}
	skewKeys(t, b)
	c := &host{name: "c", ns: nstest.New(t, "ppspc"), addr: netip.MustParseAddr(subnet + ".2")}
	var err error
	if c.id, err = identity.Generate(); err != nil {
		t.Fatal(err)
	}
	hA, hB, hC := rtnl(t, a.ns), rtnl(t, b.ns), rtnl(t, c.ns)
	nkh, nkg := netkitPair(t, hA, hC, c.ns, "nkh", "nkg")
	addAddr(t, hA, nkh, subnet+".1/24")
	addAddr(t, hC, nkg, subnet+".2/24")
	if lo, err := hC.LinkByName("lo"); err == nil {
		hC.LinkSetUp(lo)
	}
	addRoute(t, hC, "0.0.0.0/0", subnet+".1")
	addRoute(t, hB, subnet+".0/24", a.addr.String())
	// IPv6 beside, for psp.py's data_basic_send_netkit_psp_assoc_v*_ip6;
	// no duplicate address detection, so the addresses work at once.
	for _, x := range []struct {
		h    *vnl.Handle
		l    vnl.Link
		addr string
	}{{hA, linkByIndex(t, hA, a.port.Ifindex), "fd00:96::1/64"}, {hB, linkByIndex(t, hB, b.port.Ifindex), "fd00:96::2/64"},
		{hA, nkh, "fd00:97::1/64"}, {hC, nkg, "fd00:97::2/64"}} {
		addAddr(t, x.h, x.l, x.addr)
	}
	addRoute(t, hC, "::/0", "fd00:97::1")
	addRoute(t, hB, "fd00:97::/64", "fd00:96::1")
	nstest.Do(t, a.ns, func() { err = os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0) })
	if err != nil {
		t.Fatal(err)
	}
	redirectToPhys(t, a.ns, nkh.Attrs().Index, a.port.Ifindex)
	redirectToGuest(t, a.ns, a.port.Ifindex, nkh.Attrs().Index, [3]byte{10, 97, 0}, [4]byte{0xfd, 0, 0, 0x97})

	// A's pspd owns the device; its one peer is nowhere, its job here is
	// the device. B's peer is C's pspd and C's is B's.
	nobody := &host{name: "nobody", addr: netip.MustParseAddr("10.96.0.9")}
	if nobody.id, err = identity.Generate(); err != nil {
		t.Fatal(err)
	}
	a.start(t, nobody)
	b.start(t, c)
	c.start(t, b)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	ca, cc := client.New(a.sock), client.New(c.sock)
	devs, err := ca.Devices(ctx)
	if err != nil || len(devs) != 1 {
		t.Fatalf("A's devices: %+v %v", devs, err)
	}
	dev := devs[0]
	cPath, aPath := nsPath(t, c.ns), nsPath(t, a.ns)

	t.Run("errors", func(t *testing.T) {
		var ae *client.APIError
		for _, tc := range []struct {
			name   string
			id     uint32
			req    localapi.AssocRequest
			status int
			text   string
		}{
			{"unknown device", dev.ID + 100, localapi.AssocRequest{NetNS: cPath, Ifname: "nkg"}, 404, fmt.Sprintf("no device %d", dev.ID+100)},
			{"unknown namespace", dev.ID, localapi.AssocRequest{NetNS: "/run/netns/pspd-nonexistent", Ifname: "nkg"}, 404, "no such network namespace"},
			{"not a namespace", dev.ID, localapi.AssocRequest{NetNS: "/proc/version", Ifname: "nkg"}, 404, "not a namespace file"},
			{"unknown process", dev.ID, localapi.AssocRequest{PID: 1 << 22, Ifname: "nkg"}, 404, fmt.Sprintf("/proc/%d/ns/net", 1<<22)},
			{"unknown interface", dev.ID, localapi.AssocRequest{NetNS: cPath, Ifname: "nope0"}, 404, "has no interface nope0"},
			{"not associated", dev.ID, localapi.AssocRequest{NetNS: cPath, Ifname: "nkg"}, 404, "is not associated"},
		} {
			do := ca.AssocDevice
			if tc.name == "not associated" {
				do = ca.DisassocDevice
			}
			_, err := do(ctx, tc.id, tc.req)
			if !errors.As(err, &ae) || ae.Status != tc.status || !strings.Contains(ae.Message, tc.text) {
				t.Errorf("%s: %v, want %d saying %q", tc.name, err, tc.status, tc.text)
			}
		}
		// C's pspd sees no device yet, and could not give one away.
		if ds, err := cc.Devices(ctx); err != nil || len(ds) != 0 {
			t.Errorf("C's devices before the association: %+v %v", ds, err)
		}
	})

	// psp.py _dev_assoc_no_nsid: a netdev of the device's own namespace,
	// named without an nsid.
	t.Run("own namespace", func(t *testing.T) {
		// The kernel lists it under the id A has in itself, which it
		// assigns when it first lists such an entry.
		d, err := ca.AssocDevice(ctx, dev.ID, localapi.AssocRequest{NetNS: aPath, Ifname: "nkh"})
		if err != nil || len(d.Assoc) != 1 || d.Assoc[0].Ifindex != uint32(nkh.Attrs().Index) || d.Assoc[0].NetNS != aPath || d.Assoc[0].Ifname != "nkh" {
			t.Fatalf("assoc of A's own nkh: %+v %v, want nkh of %s", d.Assoc, err, aPath)
		}
		if again, err := ca.AssocDevice(ctx, dev.ID, localapi.AssocRequest{NetNS: aPath, Ifname: "nkh"}); err != nil || !slices.Equal(again.Assoc, d.Assoc) {
			t.Fatalf("second assoc of nkh: %+v %v, want it unchanged", again.Assoc, err)
		}
		if d, err = ca.DisassocDevice(ctx, dev.ID, localapi.AssocRequest{NetNS: aPath, Ifindex: uint32(nkh.Attrs().Index)}); err != nil || len(d.Assoc) != 0 {
			t.Fatalf("disassoc of A's own nkh: %+v %v", d.Assoc, err)
		}
	})

	// psp.py _psp_dev_assoc_cleanup_on_netkit_del: the association goes
	// with its netdev.
	t.Run("netkit deleted", func(t *testing.T) {
		tmp, _ := netkitPair(t, hA, hC, c.ns, "nktmp", "nktmpg")
		d, err := ca.AssocDevice(ctx, dev.ID, localapi.AssocRequest{NetNS: cPath, Ifname: "nktmpg"})
		if err != nil || len(d.Assoc) != 1 || d.Assoc[0].Ifname != "nktmpg" || d.Assoc[0].NSID < 0 {
			t.Fatalf("assoc of nktmpg: %+v %v", d, err)
		}
		if err := hA.LinkDel(tmp); err != nil {
			t.Fatal(err)
		}
		if ds, err := ca.Devices(ctx); err != nil || len(ds) != 1 || len(ds[0].Assoc) != 0 {
			t.Fatalf("after the netkit pair was deleted: %+v %v, want no association", ds, err)
		}
	})

	// psp.py _assoc_check_list and _psp_dev_get_check_netkit_psp_assoc:
	// the association as the device's namespace and the container's see
	// it. Asking twice is not an error.
	var nsid int32
	t.Run("assoc", func(t *testing.T) {
		// The second time by its name in /run/netns, as ip netns has it.
		for _, ns := range []string{cPath, filepath.Base(cPath)} {
			d, err := ca.AssocDevice(ctx, dev.ID, localapi.AssocRequest{NetNS: ns, Ifname: "nkg"})
			if err != nil || len(d.Assoc) != 1 {
				t.Fatalf("assoc of C's nkg: %+v %v", d, err)
			}
			got := d.Assoc[0]
			nsid = got.NSID
			if got.Ifindex != uint32(nkg.Attrs().Index) || got.NSID < 0 || got.NetNS != cPath || got.Ifname != "nkg" || d.Ifname != a.port.Name {
				t.Fatalf("A's device after the assoc: %+v, want nkg (%d) of %s with an nsid", d, nkg.Attrs().Index, cPath)
			}
		}
		ds, err := cc.Devices(ctx)
		if err != nil || len(ds) != 1 || ds[0].ID != dev.ID || !ds[0].ByAssociation || ds[0].Ifname != "" ||
			!slices.Equal(ds[0].Assoc, []localapi.AssocDev{{Ifindex: uint32(nkg.Attrs().Index), NSID: -1, Ifname: "nkg"}}) {
			t.Fatalf("the device as C's pspd sees it: %+v %v, want it by association with nkg alone", ds, err)
		}
		if !slices.Contains(ds[0].Enabled, "hdr0-aes-gcm-128") {
			t.Errorf("C sees the versions A enabled as %v", ds[0].Enabled)
		}
		if _, err := cc.RotateDevice(ctx, dev.ID); err == nil || !strings.Contains(err.Error(), "another network namespace") {
			t.Errorf("rotation from C: %v, want a refusal (A administers the device)", err)
		}
	})
	t.Logf("C's namespace has nsid %d in A's", nsid)

	// psp.py data_basic_send_netkit_psp_assoc: an upgraded connection
	// from the container carries data through A's device. As in psp.py
	// the data goes from the container out: what B sends back is PSP the
	// device decrypts, and the kernel (7.3) loses the decryption's mark
	// (the skb's PSP extension) on the way into the container
	// (bpf_redirect_peer and netkit scrub it), so the container's socket
	// drops it; only pure ACKs pass.
	waitSession(ctx, t, b, c)
	// C had no device when its session began: its Hello said nothing of
	// PSP versions, so B does not refuse what C's device now accepts.
	if ps, err := client.New(b.sock).Peers(ctx); err != nil || len(ps) != 1 || ps[0].PSP != nil {
		t.Errorf("B's peer C: %+v %v, want no PSP versions said", ps, err)
	}
	t.Run("data", func(t *testing.T) {
		x, y := dialPair(t, c, b, 7900)
		mssBefore := mss(t, x)
		before := pspStats(t, a)
		_, _, ex, ey := upgradeBoth(ctx, c, b, x, y)
		if ex != nil || ey != nil {
			t.Fatalf("upgrade: C %v, B %v\nC:\n%s\nB:\n%s", ex, ey, c.logs.Bytes(), b.logs.Bytes())
		}
		if got := mss(t, x); got != mssBefore-40 {
			t.Errorf("MSS %d in the container after the upgrade, want %d - 40", got, mssBefore)
		}
		msg := bytes.Repeat([]byte("pspd-netkit "), 8192)
		if _, err := x.Write(msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		y.SetReadDeadline(time.Now().Add(20 * time.Second))
		if _, err := io.ReadFull(y, got); err != nil || !bytes.Equal(got, msg) {
			diagnose(t, a, b)
			tcpDiag(t, "C end", x)
			tcpDiag(t, "B end", y)
			t.Fatalf("B read from the container through PSP: %v (intact %v)", err, bytes.Equal(got, msg))
		}
		after := pspStats(t, a)
		if after.TxBytes-before.TxBytes < uint64(len(msg)) || after.TxPackets <= before.TxPackets {
			t.Errorf("A's device did not carry the container's data: before %+v after %+v", before, after)
		}
		// What the kernel does with data the other way, for the record.
		y.Write([]byte("back"))
		x.SetReadDeadline(time.Now().Add(3 * time.Second))
		n, err := x.Read(make([]byte, 4))
		t.Logf("B to the container under PSP: read %d bytes, %v; A's device %+v", n, err, pspStats(t, a))
	})

	// psp.py data_basic_send_netkit_psp_assoc_v{0..3}_ip6, as psp.py
	// does it: the container binds the keys itself with pspd's netlink
	// client (by association, without naming the device), every version
	// over IPv6, and the data crosses A's device.
	t.Run("versions ip6", func(t *testing.T) {
		owner, bc, cc := genlAt(t, a.ns), genlAt(t, b.ns), genlAt(t, c.ns)
		bdevs, err := bc.Devices()
		if err != nil || len(bdevs) != 1 {
			t.Fatalf("B's devices: %+v %v", bdevs, err)
		}
		if err := owner.DevSet(dev.ID, genl.AllVersions); err != nil {
			t.Fatal(err)
		}
		if err := bc.DevSet(bdevs[0].ID, genl.AllVersions); err != nil {
			t.Fatal(err)
		}
		for v := genl.AESGCM128; v <= genl.AESGMAC256; v++ {
			t.Run(v.String(), func(t *testing.T) {
				x, y := dialTo(t, c, b, netip.MustParseAddrPort(fmt.Sprintf("[fd00:96::2]:%d", 7910+v)))
				rc, err := cc.RxAssoc(x, v, 0)
				if err != nil {
					t.Fatalf("rx-assoc in the container: %v", err)
				}
				defer rc.Key.Wipe()
				rb, err := bc.RxAssoc(y, v, 0)
				if err != nil {
					t.Fatal(err)
				}
				defer rb.Key.Wipe()
				if rc.DevID != dev.ID {
					t.Errorf("the container's key came from device %d, want A's %d", rc.DevID, dev.ID)
				}
				if err := cc.TxAssoc(x, v, 0, rb.Key); err != nil {
					t.Fatalf("tx-assoc in the container: %v", err)
				}
				if err := bc.TxAssoc(y, v, 0, rc.Key); err != nil {
					t.Fatal(err)
				}
				before := pspStats(t, a)
				msg := bytes.Repeat([]byte{byte(v)}, 64<<10)
				if _, err := x.Write(msg); err != nil {
					t.Fatal(err)
				}
				got := make([]byte, len(msg))
				y.SetReadDeadline(time.Now().Add(20 * time.Second))
				if _, err := io.ReadFull(y, got); err != nil || !bytes.Equal(got, msg) {
					t.Fatalf("B read %v (intact %v)", err, bytes.Equal(got, msg))
				}
				if after := pspStats(t, a); after.TxBytes-before.TxBytes < uint64(len(msg)) {
					t.Errorf("A's device did not carry the data: before %+v after %+v", before, after)
				}
			})
		}
	})

	// psp.py _key_rotation_notify_multi_ns_netkit: A rotates, and C's
	// pspd hears of it.
	t.Run("rotation", func(t *testing.T) {
		seen := watchEvent(ctx, t, cc, "device-rotated", fmt.Sprintf("device %d", dev.ID))
		if _, err := ca.RotateDevice(ctx, dev.ID); err != nil {
			t.Fatal(err)
		}
		select {
		case <-seen:
		case <-time.After(10 * time.Second):
			t.Fatal("C's pspd did not hear of A's rotation")
		}
	})

	t.Run("disassoc", func(t *testing.T) {
		d, err := ca.DisassocDevice(ctx, dev.ID, localapi.AssocRequest{NetNS: cPath, Ifname: "nkg"})
		if err != nil || len(d.Assoc) != 0 {
			t.Fatalf("disassoc: %+v %v", d, err)
		}
		if ds, err := cc.Devices(ctx); err != nil || len(ds) != 0 {
			t.Fatalf("C's devices after the disassoc: %+v %v", ds, err)
		}
		x, y := dialPair(t, c, b, 7901)
		_, err = cc.UpgradePSP(ctx, x, b.name)
		if err == nil || !strings.Contains(err.Error(), "has no PSP device") || !strings.Contains(err.Error(), "not touched") {
			t.Fatalf("upgrade from C after the disassoc: %v, want a refusal before rx-assoc", err)
		}
		y.Close()
	})
}
