package netns

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"
)

// TestDualStack: a listens on [::] with one peer over IPv4 (b) and one
// over IPv6 (c); b and c listen on their own addresses. Both associations
// come up and carry traffic both ways, and after a kill -9 and restart of
// a both come back. With xfrm both peers are protected in transport mode,
// so the policies cover a's control traffic to each: only the bypass of
// the socket of that family keeps it out of ESP.
func TestDualStack(t *testing.T) { perBackend(t, testDualStack) }

func testDualStack(t *testing.T, backend string) {
	l := newLab(t, "pds-")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	var hs [3]*Host
	for i, name := range []string{"a", "b", "c"} {
		h, err := l.Host(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		hs[i] = h
	}
	a, b, c := hs[0], hs[1], hs[2]
	// a–b over IPv4, a–c over IPv6 only.
	if err := l.Link(ctx, a, b, netip.MustParsePrefix("192.0.2.1/24"), netip.MustParsePrefix("192.0.2.2/24")); err != nil {
		t.Fatal(err)
	}
	ac, ca := l.Prefix+"ac", l.Prefix+"ca"
	if err := run(ctx, "ip", "link", "add", ac, "netns", a.NS, "type", "veth", "peer", "name", ca, "netns", c.NS); err != nil {
		t.Fatal(err)
	}
	for _, e := range []struct {
		h         *Host
		dev, addr string
	}{{a, ac, "2001:db8:7::1/64"}, {c, ca, "2001:db8:7::3/64"}} {
		if err := e.h.IP(ctx, "addr", "add", e.addr, "dev", e.dev, "nodad"); err != nil {
			t.Fatal(err)
		}
		if err := e.h.IP(ctx, "link", "set", e.dev, "up"); err != nil {
			t.Fatal(err)
		}
	}
	var ds [3]*Daemon
	for i, h := range hs {
		d, err := l.NewDaemon(ctx, h)
		if err != nil {
			t.Fatal(err)
		}
		ds[i] = d
	}
	under := map[*Host]string{b: "192.0.2.2", c: "2001:db8:7::3"}
	aTo := map[*Host]string{b: "192.0.2.1", c: "2001:db8:7::1"}
	inner := map[*Host]string{a: "10.200.0.1", b: "10.200.0.2", c: "10.200.0.3"}
	// target is where traffic to h goes: its inner address on the
	// userspace data plane, its own address in xfrm transport mode.
	target := func(h, from *Host) string {
		switch {
		case backend == "userspace":
			return inner[h]
		case h == a:
			return aTo[from]
		}
		return under[h]
	}
	plane := func(h *Host) string {
		if backend == "userspace" {
			return fmt.Sprintf("userspace: {address: %s/24, io: udp}\n", inner[h])
		}
		return ""
	}
	peer := func(name, ep, key, prefix string) string {
		return fmt.Sprintf("  - {name: %s, endpoint: %q, public_key: %s, prefixes: [%s]}\n", name, ep, key, prefix)
	}
	prefixOf := func(h, from *Host) string {
		a := netip.MustParseAddr(target(h, from))
		return netip.PrefixFrom(a, a.BitLen()).String()
	}
	head := func(listen string, h *Host) string {
		return fmt.Sprintf("listen: %q\nmetrics: off\nbackend: %s\nrequire_encryption: true\nrekey_interval: 10m\n%speers:\n", listen, backend, plane(h))
	}
	bracket := func(s string) string {
		if netip.MustParseAddr(s).Is6() {
			return "[" + s + "]"
		}
		return s
	}
	if err := ds[0].WriteConfig(head("[::]", a) +
		peer("b", under[b], ds[1].PubKey, prefixOf(b, a)) + peer("c", bracket(under[c]), ds[2].PubKey, prefixOf(c, a))); err != nil {
		t.Fatal(err)
	}
	for i, h := range []*Host{b, c} {
		if err := ds[i+1].WriteConfig(head(bracket(under[h]), h) + peer("a", bracket(aTo[h]), ds[0].PubKey, prefixOf(a, h))); err != nil {
			t.Fatal(err)
		}
	}
	available(ctx, t, ds[0], backend)
	for _, d := range ds {
		if err := d.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	waitBoth := func(when string) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			as, err := ds[0].Assocs(ctx)
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, x := range as {
				names = append(names, x.Peer)
			}
			slices.Sort(names)
			if slices.Equal(names, []string{"b", "c"}) {
				return
			}
			if time.Now().After(deadline) {
				out, _ := a.Command(ctx, "ip", "-6", "neigh").CombinedOutput()
				t.Fatalf("%s: a is associated with %v, want b (IPv4) and c (IPv6)\n%s\nneighbours: %s", when, names, ds[0].Tail(30), out)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	traffic := func(when string) {
		t.Helper()
		for _, h := range []*Host{b, c} {
			if _, err := EchoTCP(ctx, a, h, target(h, a), 16<<10, "pspd-dualstack-"); err != nil {
				t.Fatalf("%s: a → %s: %v\n%s", when, h.Name, err, ds[0].Tail(20))
			}
			if _, err := EchoTCP(ctx, h, a, target(a, h), 16<<10, "pspd-dualstack-"); err != nil {
				t.Fatalf("%s: %s → a: %v\n%s", when, h.Name, err, ds[0].Tail(20))
			}
		}
	}
	waitBoth("at start")
	traffic("at start")
	ds[0].Kill()
	restart := time.Now()
	if err := ds[0].Start(ctx); err != nil {
		t.Fatal(err)
	}
	waitBoth("after a restart")
	t.Logf("%s: a on [::] with an IPv4 and an IPv6 peer: both back %v after a kill -9 and restart", backend, time.Since(restart).Round(time.Millisecond))
	traffic("after a restart")
}
