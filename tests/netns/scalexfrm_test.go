package netns

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// xfrmScalePeers is TestScaleXFRM's spoke count: the VM emulates its CPU,
// so make vmtest keeps it small; PSPD_VM_TESTFLAGS=-xfrm-scale-peers=N
// measures more.
var xfrmScalePeers = flag.Int("xfrm-scale-peers", 8, "spokes of TestScaleXFRM (at most 250)")

// TestScaleXFRM is TestScale on the XFRM backend, which only the VM's
// kernel runs: a hub with many spokes, each on a veth of its own (the VM
// kernel has no bridge), in tunnel mode between inner addresses on each
// host's loopback. It measures how long until every association is up,
// what pspctl assoc list costs, how long a rekey of every association
// takes, and the hub's memory per peer; traffic crosses a few of them.
// Every receive SPI on the hub is unique across its spokes, which share
// its one address family and role pattern (two spokes of the same role
// once could not coexist).
func TestScaleXFRM(t *testing.T) {
	n := *xfrmScalePeers
	if n < 1 || n > 250 {
		t.Fatalf("-xfrm-scale-peers=%d: want 1..250", n)
	}
	l := newLab(t, "pnx-")
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	hubHost, err := l.Host(ctx, "hub")
	if err != nil {
		t.Fatal(err)
	}
	hub, err := l.NewDaemon(ctx, hubHost)
	if err != nil {
		t.Fatal(err)
	}
	const hubConfig = "listen: 0.0.0.0\nbackend: xfrm\noffload: none\nrekey_interval: 10m\nrequire_encryption: true\n"
	if err := hub.WriteConfig(hubConfig + "peers: []\n"); err != nil {
		t.Fatal(err)
	}
	available(ctx, t, hub, "xfrm")
	// Spoke i: underlay 198.18.i.2 (the hub 198.18.i.1), inner 10.201.i.1
	// (the hub 10.201.0.1).
	under := func(i, end int) string { return fmt.Sprintf("198.18.%d.%d", i+1, end) }
	inner := func(i int) string { return fmt.Sprintf("10.201.%d.1", i+1) }
	if err := hubHost.IP(ctx, "addr", "add", "10.201.0.1/32", "dev", "lo"); err != nil {
		t.Fatal(err)
	}
	spokes := make([]*Daemon, n)
	var peers strings.Builder
	for i := range n {
		h, err := l.Host(ctx, fmt.Sprintf("s%d", i))
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Link(ctx, hubHost, h, netip.MustParsePrefix(under(i, 1)+"/24"), netip.MustParsePrefix(under(i, 2)+"/24")); err != nil {
			t.Fatal(err)
		}
		for _, c := range [][]string{
			{"addr", "add", inner(i) + "/32", "dev", "lo"},
			{"route", "add", "10.201.0.1/32", "via", under(i, 1), "src", inner(i)},
		} {
			if err := h.IP(ctx, c...); err != nil {
				t.Fatal(err)
			}
		}
		if err := hubHost.IP(ctx, "route", "add", inner(i)+"/32", "via", under(i, 2), "src", "10.201.0.1"); err != nil {
			t.Fatal(err)
		}
		if spokes[i], err = l.NewDaemon(ctx, h); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&peers, "  - {name: s%d, endpoint: %s, public_key: %s, prefixes: [%s/32]}\n", i, under(i, 2), spokes[i].PubKey, inner(i))
		if err := spokes[i].WriteConfig(fmt.Sprintf("listen: %s\nmetrics: off\nbackend: xfrm\noffload: none\nrekey_interval: 10m\nrequire_encryption: true\npeers:\n  - {name: hub, endpoint: %s, public_key: %s, prefixes: [10.201.0.1/32]}\n",
			under(i, 2), under(i, 1), hub.PubKey)); err != nil {
			t.Fatal(err)
		}
	}
	sh := &scaleHub{hub: hub, n: n}
	empty, idle := sh.start(ctx, t, hubConfig, peers.String())
	start := time.Now()
	for _, s := range spokes {
		if err := s.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	started := time.Since(start)
	as := sh.waitGeneration(ctx, t, 1, 10*time.Minute)
	t.Logf("%d xfrm spokes started in %v; all %d associations up %v after the first spoke started", n, started.Round(time.Millisecond), n, time.Since(start).Round(time.Millisecond))
	seen := map[uint32]string{}
	for _, a := range as {
		if o, dup := seen[a.RxSPI]; dup {
			t.Fatalf("receive SPI %#x of the hub serves both %s and %s", a.RxSPI, o, a.Peer)
		}
		seen[a.RxSPI] = a.Peer
	}

	sh.listAndRekey(ctx, t, 5)
	for _, i := range []int{0, n / 2, n - 1} {
		if _, err := EchoTCP(ctx, spokes[i].Host, hubHost, "10.201.0.1", 16<<10, "scale-canary-"); err != nil {
			t.Fatalf("spoke %d to hub: %v", i, err)
		}
	}
	sh.memory(ctx, t, empty, idle)
}
