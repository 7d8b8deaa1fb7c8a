package netns

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestAddressChange: a's underlay address changes under a running
// association (the old address deleted, another added, as DHCP or a
// failover does). a listens on the wildcard address, so its sockets
// survive. The userspace engine on b follows a to the new address on a's
// first authenticated packet. With xfrm (tunnel mode), a's backend sees
// the address change and asks for a new generation, which both hosts
// install between the addresses they now have (b takes a's from the
// session, which quic-go moved to the new path). Either way the echoes
// resume by themselves; the recovery time is logged. a is the key
// exchange's initiator, and a rekey works afterwards.
func TestAddressChange(t *testing.T) { perBackend(t, testAddressChange) }

func testAddressChange(t *testing.T, backend string) {
	l := newLab(t, "padc-")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	a, err := l.Host(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.Host(ctx, "b")
	if err != nil {
		t.Fatal(err)
	}
	const (
		aOld, aNew, bAddr = "192.0.2.1", "192.0.2.11", "192.0.2.2"
	)
	p := &Pair{Inner: [2]string{"10.200.0.1", "10.200.0.2"}}
	l.Underlay = Veth // 192.0.2.1 on a, 192.0.2.2 on b
	if err := l.underlay(ctx, p, a, b); err != nil {
		t.Fatal(err)
	}
	if p.A, err = l.NewDaemon(ctx, a); err != nil {
		t.Fatal(err)
	}
	if p.B, err = l.NewDaemon(ctx, b); err != nil {
		t.Fatal(err)
	}
	for initiates(t, p.B, p.A) {
		if p.A, err = l.NewDaemon(ctx, a); err != nil {
			t.Fatal(err)
		}
	}
	conf := func(d *Daemon, listen, self, peer, peerEP, peerKey, peerInner string) {
		t.Helper()
		plane := fmt.Sprintf("userspace:\n  address: %s/24\n  io: udp\n", self)
		if backend == "xfrm" {
			plane = ""
			// Tunnel mode between whatever addresses the hosts have: the
			// inner addresses sit on lo, and the route to the peer's
			// names only the device, so that it outlives a's old address.
			if err := d.Host.IP(ctx, "addr", "add", self+"/32", "dev", "lo"); err != nil {
				t.Fatal(err)
			}
			dev := p.Underlay[0]
			if d == p.B {
				dev = p.Underlay[1]
			}
			if err := d.Host.IP(ctx, "route", "add", peerInner+"/32", "dev", dev, "src", self); err != nil {
				t.Fatal(err)
			}
		}
		if err := d.WriteConfig(fmt.Sprintf(`listen: %s
metrics: off
backend: %s
rekey_interval: 10m
require_encryption: true
%speers:
  - name: %s
    endpoint: %s
    public_key: %s
    prefixes: [%s/32]
`, listen, backend, plane, peer, peerEP, peerKey, peerInner)); err != nil {
			t.Fatal(err)
		}
	}
	conf(p.A, `"[::]"`, p.Inner[0], "b", bAddr, p.B.PubKey, p.Inner[1])
	conf(p.B, bAddr, p.Inner[1], "a", aOld, p.A.PubKey, p.Inner[0])
	available(ctx, t, p.A, backend)
	for _, d := range []*Daemon{p.A, p.B} {
		if err := d.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	as, err := p.WaitAssoc(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	var probers []*prober
	for i, h := range []*Host{a, b} {
		e, err := listenIn(h, "udp4", p.Inner[i]+":7790")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { e.Close() })
		go echo(e)
		pr, err := newProber(h, p.Inner[1-i]+":7790")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pr.close)
		probers = append(probers, pr)
	}
	for _, pr := range probers {
		if _, err := pr.waitReply(time.Now(), 10*time.Second); err != nil {
			t.Fatalf("before the address change, %s → %s: %v", pr.from.Name, pr.to, err)
		}
	}

	// Delete first: deleting a primary address takes its secondaries too.
	if err := a.IP(ctx, "addr", "del", aOld+"/24", "dev", p.Underlay[0]); err != nil {
		t.Fatal(err)
	}
	if err := a.IP(ctx, "addr", "add", aNew+"/24", "dev", p.Underlay[0]); err != nil {
		t.Fatal(err)
	}
	if backend == "xfrm" {
		// The device's last address took its routes along, as a DHCP
		// client would, it puts them back.
		if err := a.IP(ctx, "route", "add", p.Inner[1]+"/32", "dev", p.Underlay[0], "src", p.Inner[0]); err != nil {
			t.Fatal(err)
		}
	}
	changed := time.Now()
	for _, pr := range probers {
		took, err := pr.waitReply(changed, 10*time.Second)
		if err != nil {
			var state string
			if backend == "xfrm" {
				for _, h := range []*Host{a, b} {
					for _, what := range [][]string{{"xfrm", "state"}, {"xfrm", "policy"}, {"route"}} {
						out, _ := h.Command(ctx, "ip", what...).CombinedOutput()
						state += fmt.Sprintf("%s, ip %s:\n%s\n", h.Name, strings.Join(what, " "), out)
					}
				}
			}
			t.Fatalf("after the address change, %s → %s: %v\n%s\n%s\n%s", pr.from.Name, pr.to, err, p.A.Tail(20), p.B.Tail(20), state)
		}
		t.Logf("address change %s → %s: echoes %s → %s resumed %v after it", aOld, aNew, pr.from.Name, pr.to, took.Round(time.Millisecond))
	}
	if backend == "userspace" && !strings.Contains(readFile(t, p.B.Log), "to="+aNew+":6081") {
		t.Errorf("b's log does not say a moved to %s\n%s", aNew, p.B.Tail(20))
	}
	if backend == "xfrm" {
		if out, err := p.B.Host.Command(ctx, "ip", "xfrm", "state").CombinedOutput(); err != nil || !strings.Contains(string(out), "dst "+aNew) {
			t.Errorf("b has no SA to %s: %v\n%s", aNew, err, out)
		}
	}

	rotated := time.Now()
	for {
		out, err := p.B.Ctl(ctx, "assoc", "rotate", "--all")
		if err == nil && strings.Contains(out, " ok") {
			break
		}
		if time.Since(rotated) > 90*time.Second {
			t.Fatalf("no rekey after the address change within 90s: %q %v\n%s\n%s", out, err, p.A.Tail(20), p.B.Tail(20))
		}
		time.Sleep(time.Second)
	}
	after, err := p.WaitAssoc(ctx, as[0].Generation+1)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("rekey after the address change: generation %d → %d, %v after asking", as[0].Generation, after[0].Generation, time.Since(rotated).Round(time.Millisecond))
	since := time.Now()
	for _, pr := range probers {
		if _, err := pr.waitReply(since, 10*time.Second); err != nil {
			t.Fatalf("after the rekey, %s → %s: %v", pr.from.Name, pr.to, err)
		}
	}
}
