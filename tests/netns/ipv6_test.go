package netns

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"
)

// TestIPv6 runs each backend over an IPv6-only underlay (no IPv4
// address on either host but loopback's) with IPv6 inner addresses (the
// xfrm backend in tunnel mode between addresses on loopback): the
// association comes up, UDP echoes flow both ways, and a rekey keeps
// them flowing.
func TestIPv6(t *testing.T) { perBackend(t, testIPv6) }

func testIPv6(t *testing.T, backend string) {
	l := newLab(t, "pv6-")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	a, err := l.Host(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.Host(ctx, "b")
	if err != nil {
		t.Fatal(err)
	}
	under := [2]string{"2001:db8:6::1", "2001:db8:6::2"}
	inner := [2]string{"fd00:200::1", "fd00:200::2"}
	devs := [2]string{l.Prefix + "ua", l.Prefix + "ub"}
	if err := run(ctx, "ip", "link", "add", devs[0], "netns", a.NS, "type", "veth", "peer", "name", devs[1], "netns", b.NS); err != nil {
		t.Fatal(err)
	}
	for i, h := range []*Host{a, b} {
		// nodad: the address is usable at once, not tentative for DAD.
		if err := h.IP(ctx, "addr", "add", under[i]+"/64", "dev", devs[i], "nodad"); err != nil {
			t.Fatal(err)
		}
		if err := h.IP(ctx, "link", "set", devs[i], "up"); err != nil {
			t.Fatal(err)
		}
	}
	var ds [2]*Daemon
	for i, h := range []*Host{a, b} {
		if ds[i], err = l.NewDaemon(ctx, h); err != nil {
			t.Fatal(err)
		}
	}
	for i, d := range ds {
		peer := ds[1-i]
		plane := fmt.Sprintf("userspace:\n  address: %s/64\n  io: udp\n", inner[i])
		if backend == "xfrm" {
			plane = ""
			h := d.Host
			if err := h.IP(ctx, "addr", "add", inner[i]+"/128", "dev", "lo"); err != nil {
				t.Fatal(err)
			}
			if err := h.IP(ctx, "route", "add", inner[1-i]+"/128", "via", under[1-i], "src", inner[i]); err != nil {
				t.Fatal(err)
			}
		}
		if err := d.WriteConfig(fmt.Sprintf(`listen: "[%s]"
metrics: off
backend: %s
rekey_interval: 10m
require_encryption: true
%speers:
  - name: %s
    endpoint: "[%s]"
    public_key: %s
    prefixes: [%s/128]
`, under[i], backend, plane, peer.Host.Name, under[1-i], peer.PubKey, inner[1-i])); err != nil {
			t.Fatal(err)
		}
	}
	available(ctx, t, ds[0], backend)
	for _, d := range ds {
		if err := d.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	p := &Pair{A: ds[0], B: ds[1], Inner: inner}
	as, err := p.WaitAssoc(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	var probers []*prober
	for i, h := range []*Host{a, b} {
		addr := netip.AddrPortFrom(netip.MustParseAddr(inner[i]), 7790).String()
		e, err := listenIn(h, "udp6", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { e.Close() })
		go echo(e)
		pr, err := newProber(h, netip.AddrPortFrom(netip.MustParseAddr(inner[1-i]), 7790).String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pr.close)
		probers = append(probers, pr)
	}
	for _, pr := range probers {
		if _, err := pr.waitReply(time.Now(), 10*time.Second); err != nil {
			t.Fatalf("%s → %s over the IPv6 underlay: %v\n%s\n%s", pr.from.Name, pr.to, err, ds[0].Tail(20), ds[1].Tail(20))
		}
	}
	if out, err := ds[1].Ctl(ctx, "assoc", "rotate", "--all"); err != nil {
		t.Fatalf("rotate: %q %v", out, err)
	}
	after, err := p.WaitAssoc(ctx, as[0].Generation+1)
	if err != nil {
		t.Fatal(err)
	}
	since := time.Now()
	for _, pr := range probers {
		if _, err := pr.waitReply(since, 10*time.Second); err != nil {
			t.Fatalf("after the rekey, %s → %s: %v", pr.from.Name, pr.to, err)
		}
	}
	t.Logf("%s over the IPv6 underlay %s ↔ %s, inner %s ↔ %s: echoes both ways, generation %d → %d", backend, under[0], under[1], inner[0], inner[1], as[0].Generation, after[0].Generation)
}
