package backend

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/internal/nstest"
	"github.com/pspd/pspd/keyexchange"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/keyexchange/wire"
	"github.com/pspd/pspd/offload"
	"github.com/pspd/pspd/xfrm"
)

// node is a host of the hub test: a namespace with one key exchange
// endpoint and one XFRM backend, wired as the daemon wires them, and any
// number of peers.
type node struct {
	name  string
	ns    int
	addr  netip.Addr
	id    *identity.Identity
	specs []offload.PeerSpec
	b     *Backend
	ep    *keyexchange.Endpoint
	kps   map[identity.PublicKey]*keyexchange.Peer
	logs  bytes.Buffer
}

func (n *node) start(t *testing.T) {
	t.Helper()
	log := slog.New(slog.NewTextHandler(&n.logs, nil)).With("host", n.name)
	ctx := context.Background()
	var err error
	if n.b, err = New(ctx, Config{Offload: xfrm.OffloadNone, Logger: log, NetNS: n.ns, Peers: n.specs}); err != nil {
		t.Fatal(err)
	}
	for _, s := range n.specs {
		if err := n.b.AddPeer(ctx, s); err != nil {
			t.Fatalf("%s: %v", n.name, err)
		}
	}
	nstest.Do(t, n.ns, func() {
		n.ep, err = keyexchange.NewEndpoint(ctx, keyexchange.Config{
			Identity: n.id, ListenAddr: netip.AddrPortFrom(n.addr, 6082).String(),
			Installers: map[wire.Backend]keyexchange.Installer{wire.BackendXFRM: n.b}, Logger: log, Control: n.b.Control,
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	n.kps = map[identity.PublicKey]*keyexchange.Peer{}
	for _, s := range n.specs {
		kp, err := n.ep.AddPeer(keyexchange.PeerConfig{Key: s.Key, Addr: s.Endpoint, Backend: wire.BackendXFRM,
			Suite: kdf.AESGCM256, RekeyInterval: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		n.kps[s.Key] = kp
	}
}

// stop is a stop of the whole pspd: key exchange and backend.
func (n *node) stop() {
	for _, kp := range n.kps {
		kp.Close()
	}
	n.ep.Close()
	n.b.Close()
}

// spec is the peer p as n's configuration names it.
func (n *node) spec(p *node, local netip.Addr) offload.PeerSpec {
	return offload.PeerSpec{Name: p.name, Key: p.id.Public(), Endpoint: netip.AddrPortFrom(p.addr, 6082), Local: local,
		Prefixes: []netip.Prefix{netip.PrefixFrom(p.addr, 32)}, Suite: kdf.AESGCM256,
		Limits: offload.Limits{SoftPackets: 1 << 30, HardPackets: 1 << 31, SoftLifetime: 2 * time.Hour, HardLifetime: 3 * time.Hour}}
}

// wireSpoke connects the hub to a spoke with one veth: the spoke has addr/24
// on it and reaches the hub's service address through the hub's end, x.1.
func wireSpoke(t *testing.T, hub, spoke *node, i int) {
	t.Helper()
	lh, err := vnl.NewHandleAt(netns.NsHandle(hub.ns), unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer lh.Close()
	ls, err := vnl.NewHandleAt(netns.NsHandle(spoke.ns), unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer ls.Close()
	hn := fmt.Sprintf("hub%d", i)
	if err := lh.LinkAdd(&vnl.Veth{LinkAttrs: vnl.LinkAttrs{Name: hn}, PeerName: "up", PeerNamespace: vnl.NsFd(spoke.ns)}); err != nil {
		t.Fatal(err)
	}
	gw := spoke.addr.As4()
	gw[3] = 1
	for _, s := range []struct {
		h    *vnl.Handle
		name string
		addr string
	}{{lh, hn, netip.AddrFrom4(gw).String() + "/24"}, {ls, "up", spoke.addr.String() + "/24"}} {
		l, err := s.h.LinkByName(s.name)
		if err != nil {
			t.Fatal(err)
		}
		ad, _ := vnl.ParseAddr(s.addr)
		if err := s.h.AddrAdd(l, ad); err != nil {
			t.Fatal(err)
		}
		if err := s.h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
		lo, _ := s.h.LinkByName("lo")
		s.h.LinkSetUp(lo)
		if s.h == ls {
			dst := &net.IPNet{IP: hub.addr.AsSlice(), Mask: net.CIDRMask(32, 32)}
			if err := ls.RouteAdd(&vnl.Route{LinkIndex: l.Attrs().Index, Dst: dst, Gw: netip.AddrFrom4(gw).AsSlice()}); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// hubLo gives the hub its one service address, on lo.
func hubLo(t *testing.T, hub *node) {
	t.Helper()
	lh, err := vnl.NewHandleAt(netns.NsHandle(hub.ns), unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer lh.Close()
	lo, _ := lh.LinkByName("lo")
	ad, _ := vnl.ParseAddr(hub.addr.String() + "/32")
	if err := lh.AddrAdd(lo, ad); err != nil {
		t.Fatal(err)
	}
	lh.LinkSetUp(lo)
}

// mirrored waits until a's SA with b and b's SA with a are the two halves
// of one generation, and returns a's.
func mirrored(t *testing.T, a, b *node, d time.Duration) keyexchange.SA {
	t.Helper()
	end := time.Now().Add(d)
	for {
		sa, okA := a.kps[b.id.Public()].Current()
		sb, okB := b.kps[a.id.Public()].Current()
		if okA && okB && sa.RxSPI == sb.TxSPI && sa.TxSPI == sb.RxSPI && sa.Generation == sb.Generation {
			return sa
		}
		if time.Now().After(end) {
			t.Fatalf("%s and %s not associated after %v (%v / %v; last errors %v / %v)\n%s\n%s", a.name, b.name, d, &sa, &sb,
				a.kps[b.id.Public()].LastError(), b.kps[a.id.Public()].LastError(), a.logs.String(), b.logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestVMHubEightPeers: a hub with 8 XFRM peers, 4 of which it initiates
// to and 4 it responds to, all on one local address of the hub (so every
// inbound SA of the hub shares its destination and the receive SPIs must
// differ across peers of the same role); TCP through ESP to each; then one
// peer of each role restarted, and the others keep their generation and
// their traffic.
func TestVMHubEightPeers(t *testing.T) {
	needVM(t)
	const n = 8
	hubID, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	hub := &node{name: "hub", ns: nstest.New(t, "pxh"), addr: netip.MustParseAddr("10.80.0.1"), id: hubID}
	// Identity order elects the initiator: draw keys until half of the
	// peers sort below the hub and half above.
	var spokes []*node
	below, above := 0, 0
	for len(spokes) < n {
		id, err := identity.Generate()
		if err != nil {
			t.Fatal(err)
		}
		if identity.Compare(id.Public(), hubID.Public()) < 0 {
			if below == n/2 {
				continue
			}
			below++
		} else {
			if above == n/2 {
				continue
			}
			above++
		}
		i := len(spokes) + 1
		spokes = append(spokes, &node{name: fmt.Sprintf("spoke%d", i), ns: nstest.New(t, "pxh"),
			addr: netip.AddrFrom4([4]byte{10, 80, byte(i), 2}), id: id})
	}
	hubLo(t, hub)
	for i, s := range spokes {
		wireSpoke(t, hub, s, i+1)
		hub.specs = append(hub.specs, hub.spec(s, hub.addr))
		s.specs = []offload.PeerSpec{s.spec(hub, s.addr)}
	}
	hub.start(t)
	for _, s := range spokes {
		s.start(t)
	}
	defer func() {
		hub.stop()
		for _, s := range spokes {
			s.stop()
		}
	}()

	roles := map[kdf.Role]int{}
	cur := map[string]keyexchange.SA{}
	for _, s := range spokes {
		cur[s.name] = mirrored(t, hub, s, 60*time.Second)
		roles[hub.kps[s.id.Public()].Role()]++
	}
	if roles[kdf.Initiator] != n/2 || roles[kdf.Responder] != n/2 {
		t.Fatalf("hub roles %v, want %d of each", roles, n/2)
	}
	ctx := context.Background()
	sas, err := hub.b.h.ListSAs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Every peer's current inbound SA is in the hub's kernel, on the one
	// hub address, under an SPI of its own. (A peer may also still have a
	// replaced generation there, waiting for traffic on the new one.)
	inbound := map[uint32]bool{}
	for _, st := range sas {
		if st.Dst == hub.addr {
			inbound[st.SPI] = true
		}
	}
	rx := map[kdf.SPI]string{}
	for _, s := range spokes {
		spi := cur[s.name].RxSPI
		if other, dup := rx[spi]; dup {
			t.Errorf("%s and %s receive on the same SPI %s at the hub", other, s.name, spi)
		}
		rx[spi] = s.name
		if !inbound[uint32(spi)] {
			t.Errorf("%s's inbound SA %v/%s is not in the hub's kernel: %+v", s.name, hub.addr, spi, sas)
		}
	}

	msg := bytes.Repeat([]byte("pspd-hub-canary "), 200)
	traffic := func(label string) {
		t.Helper()
		for _, s := range spokes {
			sa := cur[s.name]
			before, _ := hub.b.Traffic(&sa)
			if err := echoNodes(t, s, hub, msg); err != nil {
				t.Errorf("%s: TCP %s -> hub: %v\n%s", label, s.name, err, peerLog(hub, s))
				continue
			}
			after, ok := hub.b.Traffic(&sa)
			if !ok || after.PacketsIn <= before.PacketsIn || after.PacketsOut <= before.PacketsOut {
				t.Errorf("%s: %s's traffic did not go through its SAs at the hub: %+v -> %+v\n%s", label, s.name, before, after, peerLog(hub, s))
			}
		}
	}
	traffic("all up")
	// What the restarts must not disturb. (Taken after the traffic, so a
	// late settling of the first sessions is not blamed on them.)
	for _, s := range spokes {
		cur[s.name] = mirrored(t, hub, s, 10*time.Second)
	}

	// Restart one spoke the hub initiates to and one it responds to.
	var restarted []*node
	for _, role := range []kdf.Role{kdf.Initiator, kdf.Responder} {
		for _, s := range spokes {
			if hub.kps[s.id.Public()].Role() == role {
				restarted = append(restarted, s)
				break
			}
		}
	}
	for _, s := range restarted {
		old := cur[s.name]
		s.stop()
		s.logs.Reset()
		s.start(t)
		sa := mirrored(t, hub, s, 60*time.Second)
		if sa.ID == old.ID && sa.Generation == old.Generation && sa.RxSPI == old.RxSPI && sa.TxSPI == old.TxSPI {
			t.Errorf("%s restarted but the hub kept its generation %v", s.name, &sa)
		}
		cur[s.name] = sa
		t.Logf("%s (hub is %s) restarted: %v -> %v", s.name, hub.kps[s.id.Public()].Role(), &old, &sa)
	}
	for _, s := range spokes {
		sa, _ := hub.kps[s.id.Public()].Current()
		if slices.Contains(restarted, s) {
			continue
		}
		if old := cur[s.name]; sa.ID != old.ID || sa.Generation != old.Generation || sa.RxSPI != old.RxSPI || sa.TxSPI != old.TxSPI {
			t.Errorf("%s was disturbed by another peer's restart: %v -> %v\n%s", s.name, &old, &sa, peerLog(hub, s))
		}
	}
	traffic("after restarts")
}

// peerLog is what n logged about peer p.
func peerLog(n, p *node) string {
	fp := []byte(p.id.Public().Fingerprint())
	var out []byte
	for _, l := range bytes.Split(n.logs.Bytes(), []byte("\n")) {
		if bytes.Contains(l, fp) || bytes.Contains(l, []byte("peer="+p.name+" ")) {
			out = append(append(out, l...), '\n')
		}
	}
	return string(out)
}

// echoNodes is echo between two nodes.
func echoNodes(t *testing.T, a, b *node, msg []byte) error {
	t.Helper()
	return echo(t, &host{ns: a.ns, addr: a.addr}, &host{ns: b.ns, addr: b.addr}, msg)
}
