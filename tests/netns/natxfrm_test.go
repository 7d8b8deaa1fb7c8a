package netns

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/pspd/pspd/localapi"
)

// TestNATXFRM runs the xfrm backend through a masquerading NAT (nftables)
// with require_encryption on: a, behind the NAT, knows b's address; b
// knows a only as the NAT's public address. Both sides detect the NAT in
// the key exchange and carry ESP in UDP: the NAT's outside link shows
// nothing but ESP-in-UDP on port 4500 and pspd's QUIC, TCP echoes flow
// both ways, and a rotation works. Then the NAT maps a to other ports
// (and forgets the old mapping): b's kernel reports the new port of a's
// authenticated ESP, b rekeys to follow it (once the key exchange has a
// session again: a responder behind the NAT redials after its idle
// timeout), and b's echoes to a resume by themselves; the time that takes
// is logged.
//
// It needs the VM's kernel (ESP, ESP in UDP, netfilter NAT). The host
// behind the NAT is the key exchange's initiator in one subtest and its
// responder in the other.
func TestNATXFRM(t *testing.T) {
	t.Run("nated-initiator", func(t *testing.T) { testNATXFRM(t, true) })
	t.Run("nated-responder", func(t *testing.T) { testNATXFRM(t, false) })
}

// natLab is two hosts with a masquerading NAT (nftables) between them,
// each running pspd: a (10.9.0.2) behind the NAT knows b's address; b
// (198.51.100.2) knows a only as the NAT's public address 198.51.100.1.
type natLab struct {
	ctx     context.Context
	a, n, b *Host
	da, db  *Daemon
	wan     string // the NAT's outside link
	inner   [2]string
	p       *Pair
	as      [2]localapi.Assoc
}

const (
	natPublic = "198.51.100.1"
	natB      = "198.51.100.2"
)

// newNATLab builds the topology, starts both daemons on backend with the
// extra configuration lines, and waits for their first association. The
// host behind the NAT is the key exchange's initiator if natedInitiates.
func newNATLab(t *testing.T, backend string, natedInitiates bool, extra string) *natLab {
	t.Helper()
	for _, bin := range []string{"nft", "conntrack"} {
		if _, err := exec.LookPath(tool(bin)); err != nil {
			t.Skipf("needs %s (tests/deps.sh installs nftables and conntrack)", bin)
		}
	}
	l := newLab(t, "pnx-")
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	t.Cleanup(cancel)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	nl := &natLab{ctx: ctx, inner: [2]string{"10.200.0.1", "10.200.0.2"}}
	var hs [3]*Host
	for i, name := range []string{"a", "n", "b"} {
		h, err := l.Host(ctx, name)
		must(err)
		hs[i] = h
	}
	a, n, b := hs[0], hs[1], hs[2]
	nl.a, nl.n, nl.b = a, n, b
	inner := nl.inner
	must(l.Link(ctx, a, n, netip.MustParsePrefix("10.9.0.2/24"), netip.MustParsePrefix("10.9.0.1/24")))
	must(l.Link(ctx, n, b, netip.MustParsePrefix(natPublic+"/24"), netip.MustParsePrefix(natB+"/24")))
	nl.wan = l.Prefix + "nb"
	must(a.IP(ctx, "route", "add", "default", "via", "10.9.0.1"))
	plane := [2]string{}
	if backend == "xfrm" {
		// Tunnel mode between inner addresses on loopback, as
		// TestDemo/xfrm.
		must(a.IP(ctx, "addr", "add", inner[0]+"/32", "dev", "lo"))
		must(b.IP(ctx, "addr", "add", inner[1]+"/32", "dev", "lo"))
		must(a.IP(ctx, "route", "add", inner[1]+"/32", "via", "10.9.0.1", "src", inner[0]))
		must(b.IP(ctx, "route", "add", inner[0]+"/32", "via", natPublic, "src", inner[1]))
	} else {
		for i := range plane {
			plane[i] = fmt.Sprintf("userspace:\n  address: %s/24\n  io: udp\n", inner[i])
		}
	}
	must(n.Run(ctx, "sysctl", "-qw", "net.ipv4.ip_forward=1"))
	must(n.Nft(ctx, fmt.Sprintf("table ip nat {\n\tchain post {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\toifname %q masquerade\n\t}\n}\n", nl.wan)))

	da, err := l.NewDaemon(ctx, a)
	must(err)
	db, err := l.NewDaemon(ctx, b)
	must(err)
	for initiates(t, da, db) != natedInitiates {
		da, err = l.NewDaemon(ctx, a)
		must(err)
	}
	conf := func(self *Daemon, listen, plane, peerName, peerEP, peerKey, peerInner string) {
		t.Helper()
		must(self.WriteConfig(fmt.Sprintf(`listen: %s
metrics: off
backend: %s
rekey_interval: 10m
require_encryption: true
%s%speers:
  - name: %s
    endpoint: %s
    public_key: %s
    prefixes: [%s/32]
`, listen, backend, extra, plane, peerName, peerEP, peerKey, peerInner)))
	}
	conf(da, "10.9.0.2", plane[0], "b", natB, db.PubKey, inner[1])
	conf(db, natB, plane[1], "a", natPublic, da.PubKey, inner[0])
	available(ctx, t, da, backend)
	for _, d := range []*Daemon{da, db} {
		must(d.Start(ctx))
	}
	nl.da, nl.db = da, db
	nl.p = &Pair{A: da, B: db, Inner: inner}
	if nl.as, err = nl.p.WaitAssoc(ctx, 1); err != nil {
		t.Fatalf("%v\n%s\n%s", err, da.Tail(30), db.Tail(30))
	}
	return nl
}

func testNATXFRM(t *testing.T, natedInitiates bool) {
	nl := newNATLab(t, "xfrm", natedInitiates, "")
	ctx, a, n, b, da, db, wan, inner, p, as := nl.ctx, nl.a, nl.n, nl.b, nl.da, nl.db, nl.wan, nl.inner, nl.p, nl.as
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		d           *Daemon
		name        string
		behind      bool
		peerBehind  bool
		wantLogLine string
	}{{da, "b", true, false, "a NAT in front of this host"}, {db, "a", false, true, "a NAT in front of the peer"}} {
		out, err := c.d.Ctl(ctx, "peer", "show", c.name, "--json")
		var lp localapi.Peer
		if err == nil {
			err = json.Unmarshal([]byte(out), &lp)
		}
		must(err)
		if lp.NAT == nil || lp.NAT.Behind != c.behind || lp.NAT.PeerBehind != c.peerBehind {
			t.Errorf("%s: peer show %s: nat %+v, want behind=%v peer_behind=%v", c.d.Host.Name, c.name, lp.NAT, c.behind, c.peerBehind)
		}
		if log := readFile(t, c.d.Log); !strings.Contains(log, "ESP-in-UDP socket open") || !strings.Contains(log, c.wantLogLine) {
			t.Errorf("%s's log does not say it opened its ESP-in-UDP socket because of %s:\n%s", c.d.Host.Name, c.wantLogLine, c.d.Tail(20))
		}
	}

	// Both directions, captured on the NAT's outside link.
	const canary = "pspd-nat-xfrm-canary-"
	stop, err := capture(ctx, n, wan, false)
	must(err)
	if _, err := EchoTCP(ctx, a, b, inner[1], 64<<10, canary); err != nil {
		t.Fatalf("a → b through the NAT: %v\n%s", err, xfrmDiag(ctx, b))
	}
	if _, err := EchoTCP(ctx, b, a, inner[0], 64<<10, canary); err != nil {
		t.Fatalf("b → a through the NAT: %v\n%s", err, xfrmDiag(ctx, a))
	}
	raw, err := stop()
	must(err)
	wire := Wire{raw}
	if wire.Contains(canary) {
		t.Fatal("plaintext canary on the NAT's outside link")
	}
	kinds := nothingInClear(t, wire, "udp/4500")
	if kinds["udp/4500"] < 2*(64<<10)/1500 {
		t.Errorf("%d frames of ESP in UDP for two 64 KiB echoes", kinds["udp/4500"])
	}
	if kinds["esp"] != 0 {
		t.Errorf("%d frames of plain ESP through the NAT", kinds["esp"])
	}

	if out, err := db.Ctl(ctx, "assoc", "rotate", "--all"); err != nil || !strings.Contains(out, " ok") {
		t.Fatalf("rotate: %q %v", out, err)
	}
	gen := as[0].Generation + 1
	if _, err := p.WaitAssoc(ctx, gen); err != nil {
		t.Fatal(err)
	}
	if _, err := EchoTCP(ctx, a, b, inner[1], 16<<10, canary); err != nil {
		t.Fatalf("after the rotation: %v", err)
	}

	// The NAT now maps a to other ports and forgets the old mapping. A
	// responder behind it loses the key exchange's session (the initiator
	// has nowhere to dial) until it dials again, after its idle timeout.
	ea, err := listenIn(a, "udp4", inner[0]+":7790")
	must(err)
	t.Cleanup(func() { ea.Close() })
	go echo(ea)
	pb, err := newProber(b, inner[0]+":7790")
	must(err)
	t.Cleanup(pb.close)
	if _, err := pb.waitReply(time.Now(), 10*time.Second); err != nil {
		t.Fatalf("before the rebinding, b → a: %v", err)
	}
	must(n.Nft(ctx, fmt.Sprintf("flush chain ip nat post\nadd rule ip nat post oifname %q meta l4proto udp masquerade to :30000-30999\nadd rule ip nat post oifname %q masquerade\n", wan, wan)))
	must(n.Run(ctx, "conntrack", "-F"))
	rebound := time.Now()
	// a's traffic (its keep-alives, its echo replies, its QUIC) now
	// reaches b from new ports; b follows once a's ESP authenticates.
	pa, err := newProber(a, inner[1]+":7791")
	must(err)
	t.Cleanup(pa.close)
	eb, err := listenIn(b, "udp4", inner[1]+":7791")
	must(err)
	t.Cleanup(func() { eb.Close() })
	go echo(eb)
	took, err := pb.waitReply(rebound, 90*time.Second)
	if err != nil {
		t.Fatalf("after the NAT changed a's ports, b → a: %v\n%s\n%s", err, da.Tail(30), db.Tail(30))
	}
	t.Logf("NAT port rebinding: b's echoes to a resumed %v after the mapping changed", took.Round(time.Millisecond))
	if log := readFile(t, db.Log); !strings.Contains(log, "NAT mapping changed") {
		t.Errorf("b's log does not say it followed a's new mapping:\n%s", db.Tail(20))
	}
	if _, err := pa.waitReply(rebound, 10*time.Second); err != nil {
		t.Fatalf("after the rebinding, a → b: %v", err)
	}
}
