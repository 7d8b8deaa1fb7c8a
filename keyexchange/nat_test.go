package keyexchange

import (
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

func TestDetectNAT(t *testing.T) {
	ap := netip.MustParseAddrPort
	a := netip.MustParseAddr
	host := []netip.Addr{a("10.9.0.2"), a("127.0.0.1")}
	for _, c := range []struct {
		name                       string
		local, observed, peer, cfg netip.AddrPort
		behind, peerBehind         bool
		source                     netip.AddrPort // what the peer says it sends from
	}{
		{"direct", ap("10.9.0.2:6082"), ap("10.9.0.2:6082"), ap("198.51.100.2:6082"), ap("198.51.100.2:6082"), false, false, netip.AddrPort{}},
		{"masquerade keeps the port", ap("10.9.0.2:6082"), ap("198.51.100.1:6082"), ap("198.51.100.2:6082"), ap("198.51.100.2:6082"), true, false, netip.AddrPort{}},
		{"port rewritten", ap("10.9.0.2:6082"), ap("10.9.0.2:1024"), ap("198.51.100.2:6082"), ap("198.51.100.2:6082"), true, false, netip.AddrPort{}},
		{"wildcard, own address", ap("0.0.0.0:6082"), ap("10.9.0.2:6082"), ap("198.51.100.2:6082"), ap("198.51.100.2:6082"), false, false, netip.AddrPort{}},
		{"wildcard, foreign address", ap("0.0.0.0:6082"), ap("198.51.100.1:6082"), ap("198.51.100.2:6082"), ap("198.51.100.2:6082"), true, false, netip.AddrPort{}},
		{"peer NATed", ap("198.51.100.2:6082"), ap("198.51.100.2:6082"), ap("198.51.100.1:6082"), ap("198.51.100.7:6082"), false, true, netip.AddrPort{}},
		{"peer port rewritten", ap("198.51.100.2:6082"), ap("198.51.100.2:6082"), ap("198.51.100.1:3000"), ap("198.51.100.1:6082"), false, true, netip.AddrPort{}},
		{"older peer says nothing", ap("10.9.0.2:6082"), netip.AddrPort{}, ap("198.51.100.2:6082"), ap("198.51.100.2:6082"), false, false, netip.AddrPort{}},
		{"no configured endpoint", ap("198.51.100.2:6082"), ap("198.51.100.2:6082"), ap("198.51.100.1:6082"), netip.AddrPort{}, false, false, netip.AddrPort{}},
		// The peer is configured at its NAT's address, which is where its
		// session comes from: only what it says of its own source tells.
		{"peer NATed, configured at the NAT", ap("198.51.100.2:6082"), ap("198.51.100.2:6082"), ap("198.51.100.1:6082"), ap("198.51.100.1:6082"), false, true, ap("10.9.0.2:6082")},
		{"peer says where it is", ap("198.51.100.2:6082"), ap("198.51.100.2:6082"), ap("198.51.100.1:6082"), ap("198.51.100.1:6082"), false, false, ap("198.51.100.1:6082")},
	} {
		n := detectNAT(c.local, c.observed, c.peer, c.source, c.cfg, host)
		if n.Behind != c.behind || n.PeerBehind != c.peerBehind || n.LocalObserved != c.observed || n.PeerObserved != c.peer {
			t.Errorf("%s: got %+v, want behind=%v peer_behind=%v", c.name, n, c.behind, c.peerBehind)
		}
	}
}

// TestNATDetection: two endpoints on loopback tell each other where they
// see each other from, and without a NAT neither detects one.
func TestNATDetection(t *testing.T) {
	ini, resp, pi, pr := pair(t, nil, nil)
	if _, err := pi.WaitGeneration(ctxT(t, 10*time.Second), 1); err != nil {
		t.Fatal(err)
	}
	within(t, 3*time.Second, "both up", func() bool { return pi.Status().Up && pr.Status().Up })
	for _, c := range []struct {
		p          *Peer
		self, peer *node
	}{{pi, ini, resp}, {pr, resp, ini}} {
		n := c.p.Status().NAT
		if n.LocalObserved != c.self.ep.Addr() || n.PeerObserved != c.peer.ep.Addr() || n.Detected() {
			t.Errorf("%s: NAT %+v; want local observed %s, peer observed %s, no NAT", c.p.Role(), n, c.self.ep.Addr(), c.peer.ep.Addr())
		}
	}
}

// TestNATDetectionPeerMoved: the responder knows the initiator at another
// port than the one its session comes from, as behind a NAT that rewrites
// ports: the responder says the peer is behind a NAT, and logs it once.
func TestNATDetectionPeerMoved(t *testing.T) {
	a, b := orderedIdentities(t)
	ini, resp := newNode(t, a, nil), newNode(t, b, nil)
	cr := peerCfg(ini)
	cr.Addr = netip.AddrPortFrom(cr.Addr.Addr(), cr.Addr.Port()+1)
	pr, err := resp.ep.AddPeer(cr)
	if err != nil {
		t.Fatal(err)
	}
	pi, err := ini.ep.AddPeer(peerCfg(resp))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pi.WaitGeneration(ctxT(t, 10*time.Second), 1); err != nil {
		t.Fatal(err)
	}
	within(t, 3*time.Second, "responder up", func() bool { return pr.Status().Up })
	n := pr.Status().NAT
	if !n.PeerBehind || n.Behind || n.PeerObserved != ini.ep.Addr() {
		t.Fatalf("responder's NAT %+v: want the peer behind a NAT at %s", n, ini.ep.Addr())
	}
	if got := strings.Count(string(resp.logs.Bytes()), `"msg":"NAT detected"`); got != 1 {
		t.Fatalf("responder logged NAT detected %d times, want 1", got)
	}
	if n := pi.Status().NAT; n.Detected() {
		t.Fatalf("initiator detects a NAT: %+v", n)
	}
}

// TestSessionMoveRenegotiates: the dialing side's session moves to
// another socket, as when its host's address changes under a wildcard
// listen socket (QUIC connection migration, validated by the other side).
// The side that accepted the session sees it run from the new address
// and has a new generation negotiated there, so that SAs bound to the
// hosts' addresses (XFRM) follow; the side that moved, whose view did not
// change, does not. (Usually the initiator dialed; when both dialed at
// once the responder's dial may be the one kept.)
func TestSessionMoveRenegotiates(t *testing.T) {
	ini, resp, pi, pr := pair(t, nil, nil)
	ctx := ctxT(t, 15*time.Second)
	if _, err := pi.WaitGeneration(ctx, 1); err != nil {
		t.Fatal(err)
	}
	within(t, 3*time.Second, "responder up", func() bool { return pr.Status().Up })
	mover, stayer, stayerNode := pi, pr, resp
	moverNode := ini
	if !pi.Session().Dialed() {
		mover, stayer, stayerNode, moverNode = pr, pi, ini, resp
	}
	before, _ := stayer.Current()
	moved, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	tr := &quic.Transport{Conn: moved}
	t.Cleanup(func() { tr.Close() })
	path, err := mover.Session().conn.AddPath(tr)
	if err != nil {
		t.Fatal(err)
	}
	if err := path.Probe(ctx); err != nil {
		t.Fatal(err)
	}
	if err := path.Switch(); err != nil {
		t.Fatal(err)
	}
	to := moved.LocalAddr().String()
	// The other side learns of the move from the next packet (a
	// keep-alive at the latest) and checks every pathCheck.
	sa, err := stayer.WaitGeneration(ctx, before.Generation+1)
	if err != nil {
		t.Fatalf("no generation after the move to %s: %v\n%s", to, err, stayerNode.logs.Bytes())
	}
	if got := stayer.Session().RemoteAddr().String(); got != to {
		t.Errorf("the session runs from %s, want %s", got, to)
	}
	logs := string(stayerNode.logs.Bytes())
	if !strings.Contains(logs, `"msg":"the peer's session moved to another address; negotiating a generation there"`) || !strings.Contains(logs, `"to":"`+to+`"`) {
		t.Errorf("the side that stayed does not say its peer moved to %s:\n%s", to, logs)
	}
	if strings.Contains(string(moverNode.logs.Bytes()), "session moved") {
		t.Error("the side that moved says its peer did")
	}
	t.Logf("generation %d negotiated after the move", sa.Generation)
}
