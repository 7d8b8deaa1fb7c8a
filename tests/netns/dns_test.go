package netns

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pspd/pspd/localapi"
)

// TestEndpointNameFollowed: a knows b by a name in its hosts file. b
// moves to another address and the name follows; without a reload, a
// resolves the name again (resolve_interval: 10s), re-negotiates at the
// new address, and traffic flows again. The time from the move to the
// first echo is logged.
func TestEndpointNameFollowed(t *testing.T) {
	hostOnly(t) // the VM has no /etc/hosts for ip netns exec to bind over
	l := newLab(t, "pdnf-")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	a, err := l.Host(ctx, "a")
	must(err)
	b, err := l.Host(ctx, "b")
	must(err)
	must(l.Link(ctx, a, b, netip.MustParsePrefix("192.0.2.1/24"), netip.MustParsePrefix("192.0.2.2/24")))
	hostsFile(t, a, "192.0.2.2 peer-b.pspd.test\n")
	da, err := l.NewDaemon(ctx, a)
	must(err)
	db, err := l.NewDaemon(ctx, b)
	must(err)
	inner := [2]string{"10.200.0.1", "10.200.0.2"}
	conf := func(d *Daemon, self, peer, peerEP, peerKey, peerInner string) {
		t.Helper()
		must(d.WriteConfig(fmt.Sprintf(`listen: 0.0.0.0
metrics: off
backend: userspace
resolve_interval: 10s
userspace:
  address: %s/24
  io: udp
peers:
  - name: %s
    endpoint: %s
    public_key: %s
    prefixes: [%s/32]
`, self, peer, peerEP, peerKey, peerInner)))
	}
	conf(da, inner[0], "b", "peer-b.pspd.test", db.PubKey, inner[1])
	conf(db, inner[1], "a", "192.0.2.1", da.PubKey, inner[0])
	for _, d := range []*Daemon{da, db} {
		must(d.Start(ctx))
	}
	p := &Pair{A: da, B: db, Inner: inner}
	if _, err := p.WaitAssoc(ctx, 1); err != nil {
		t.Fatal(err)
	}
	show := func() localapi.Peer {
		t.Helper()
		out, err := da.Ctl(ctx, "peer", "show", "b", "--json")
		var lp localapi.Peer
		if err == nil {
			err = json.Unmarshal([]byte(out), &lp)
		}
		must(err)
		return lp
	}
	if lp := show(); lp.EndpointName != "peer-b.pspd.test" || lp.Endpoint != "192.0.2.2:6082" {
		t.Fatalf("peer b at %s (%s), want peer-b.pspd.test at 192.0.2.2:6082", lp.EndpointName, lp.Endpoint)
	}

	// b moves: its new address is added, the name points there, the old
	// address goes.
	dev := l.Prefix + "ba"
	// Without promotion, deleting the primary address takes its
	// secondaries with it.
	must(b.Run(ctx, "sysctl", "-qw", "net.ipv4.conf."+dev+".promote_secondaries=1"))
	must(b.IP(ctx, "addr", "add", "192.0.2.3/24", "dev", dev))
	hostsFile(t, a, "192.0.2.3 peer-b.pspd.test\n")
	must(b.IP(ctx, "addr", "del", "192.0.2.2/24", "dev", dev))
	moved := time.Now()
	var took time.Duration
	for {
		if _, err := EchoTCP(ctx, a, b, inner[1], 4<<10, "pspd-dns-"); err == nil && show().Endpoint == "192.0.2.3:6082" {
			took = time.Since(moved)
			break
		}
		if time.Since(moved) > 40*time.Second {
			t.Fatalf("40s after b moved, a has it at %s\n%s\n%s", show().Endpoint, da.Tail(30), db.Tail(30))
		}
		time.Sleep(time.Second)
	}
	t.Logf("b moved to 192.0.2.3: traffic through the association again %v later, without a reload", took.Round(time.Millisecond))
	if log := readFile(t, da.Log); !strings.Contains(log, "resolves to a new address") {
		t.Errorf("a's log does not say the name moved:\n%s", da.Tail(20))
	}
}
