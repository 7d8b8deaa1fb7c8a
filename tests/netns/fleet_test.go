package netns

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/pspd/pspd/internal/etcdtest"
	"github.com/pspd/pspd/localapi"
)

// TestFleetEtcd: three daemons with no peers in their files learn each
// other from a real etcd (TLS client certificates, in a namespace of its
// own on the hosts' switch) and associate; traffic flows between every
// pair. An operator deleting a node's record takes its associations down
// on the others and leaves its fail-closed state (traffic to it is held
// back, not sent in clear). With etcd down, the associations stay, and a
// daemon restarted during the outage starts from its cache; with etcd back
// the remaining nodes publish themselves again, and the removed node,
// restarted, rejoins.
func TestFleetEtcd(t *testing.T) {
	hostOnly(t)
	l := newLab(t, "pfe-")
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	t.Cleanup(cancel)
	sw, err := l.Switch(ctx, "sw")
	if err != nil {
		t.Fatal(err)
	}
	ctl, err := l.Host(ctx, "ctl")
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Attach(ctx, sw, ctl, netip.MustParsePrefix("192.0.2.100/24")); err != nil {
		t.Fatal(err)
	}
	srv := etcdtest.Start(t, etcdtest.Options{
		Addr: netip.MustParseAddr("192.0.2.100"), TLS: true,
		Wrap: func(name string, args ...string) *exec.Cmd { return ctl.Command(ctx, name, args...) },
		Dial: func(ctx context.Context, addr string) (c net.Conn, err error) {
			err = inNetns(ctl, func() (err error) {
				var d net.Dialer
				c, err = d.DialContext(ctx, "tcp", addr)
				return err
			})
			return c, err
		},
	})
	const n = 3
	inner := func(i int) string { return fmt.Sprintf("10.200.0.%d", i+1) }
	var ds []*Daemon
	for i := range n {
		h, err := l.Host(ctx, fmt.Sprintf("n%d", i))
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Attach(ctx, sw, h, netip.MustParsePrefix(fmt.Sprintf("192.0.2.%d/24", i+1))); err != nil {
			t.Fatal(err)
		}
		d, err := l.NewDaemon(ctx, h)
		if err != nil {
			t.Fatal(err)
		}
		ca, cert, key := srv.ClientFiles(h.Name)
		if err := d.WriteConfig(fmt.Sprintf(`listen: 192.0.2.%d
metrics: off
backend: userspace
require_encryption: true
userspace: {address: %s/24, io: udp}
discovery:
  node: %s
  prefixes: [%s/32]
  cache: %s
  etcd:
    endpoints: [%s]
    ca: %s
    cert: %s
    key: %s
    lease: 5s
`, i+1, inner(i), h.Name, inner(i), filepath.Join(d.Dir, "members.json"), srv.Endpoint, ca, cert, key)); err != nil {
			t.Fatal(err)
		}
		ds = append(ds, d)
	}
	available(ctx, t, ds[0], "userspace")
	start := time.Now()
	for _, d := range ds {
		if err := d.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	peersOf := func(d *Daemon) []string {
		as, err := d.Assocs(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, a := range as {
			names = append(names, a.Peer)
		}
		slices.Sort(names)
		return names
	}
	waitPeers := func(d *Daemon, want ...string) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for got := peersOf(d); !slices.Equal(got, want); got = peersOf(d) {
			if time.Now().After(deadline) {
				t.Fatalf("%s associated with %v, want %v\n%s", d.Host.Name, got, want, d.Tail(30))
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	waitPeers(ds[0], "n1", "n2")
	waitPeers(ds[1], "n0", "n2")
	waitPeers(ds[2], "n0", "n1")
	t.Logf("%d daemons with empty peer lists associated through etcd %v after start", n, time.Since(start).Round(time.Millisecond))
	fleetOf := func(d *Daemon) localapi.Fleet {
		t.Helper()
		out, err := d.Ctl(ctx, "status", "--json")
		var st localapi.Status
		if err == nil {
			err = json.Unmarshal([]byte(out), &st)
		}
		if err != nil || st.Fleet == nil {
			t.Fatalf("%s: status without a fleet: %v %s", d.Host.Name, err, out)
		}
		return *st.Fleet
	}
	if f := fleetOf(ds[0]); !f.Connected || f.Members != 2 || f.Node != "n0" {
		t.Errorf("n0's fleet status %+v, want connected with 2 members", f)
	}
	for i := range n {
		for j := i + 1; j < n; j++ {
			if _, err := EchoTCP(ctx, ds[i].Host, ds[j].Host, inner(j), 16<<10, "pspd-fleet-canary-"); err != nil {
				t.Fatalf("%s → %s: %v", ds[i].Host.Name, ds[j].Host.Name, err)
			}
		}
	}

	// An operator removes n2 from the fleet.
	admin := srv.Client("root")
	if _, err := admin.Delete(ctx, "/pspd/nodes/n2"); err != nil {
		t.Fatal(err)
	}
	removed := time.Now()
	waitPeers(ds[0], "n1")
	waitPeers(ds[1], "n0")
	t.Logf("n2's record deleted: its associations gone %v later", time.Since(removed).Round(time.Millisecond))
	// Fail closed: n2's prefix still leads into the data plane (or is
	// prohibited), which has no SA for it, never out of the underlay.
	out, err := ds[0].Host.Command(ctx, "ip", "route", "get", inner(2)).CombinedOutput()
	if err == nil && !strings.Contains(string(out), "dev pspd0") && !strings.Contains(string(out), "prohibit") {
		t.Errorf("with n2 out of the fleet, n0's route to it is %q; want it held back (fail closed)", out)
	}
	refusedCtx, refusedCancel := context.WithTimeout(ctx, 3*time.Second)
	_, err = EchoTCP(refusedCtx, ds[0].Host, ds[2].Host, inner(2), 4096, "pspd-fleet-canary-")
	refusedCancel()
	if err == nil {
		t.Error("traffic from n0 reached n2 after n2 left the fleet")
	}
	if !strings.Contains(readFile(t, ds[0].Log), "peer left the fleet; its fail-closed state stays") {
		t.Errorf("n0's log does not say n2 left the fleet:\n%s", ds[0].Tail(20))
	}
	if _, err := EchoTCP(ctx, ds[0].Host, ds[1].Host, inner(1), 16<<10, "pspd-fleet-canary-"); err != nil {
		t.Fatalf("n0 → n1 after n2 left: %v", err)
	}

	// etcd goes away: nothing changes, and a restart starts from the cache.
	srv.Stop()
	time.Sleep(7 * time.Second) // beyond the 5 s lease
	waitPeers(ds[0], "n1")
	if f := fleetOf(ds[0]); f.Connected || f.Error == "" || f.Members != 1 {
		t.Errorf("with etcd down, n0's fleet status %+v, want unreachable with the reason and its 1 member kept", f)
	}
	ds[0].Kill()
	restart := time.Now()
	if err := ds[0].Start(ctx); err != nil {
		t.Fatal(err)
	}
	waitPeers(ds[0], "n1")
	waitPeers(ds[1], "n0")
	t.Logf("n0 restarted during the etcd outage: associated with n1 again %v later, from its cache", time.Since(restart).Round(time.Millisecond))
	if _, err := EchoTCP(ctx, ds[0].Host, ds[1].Host, inner(1), 16<<10, "pspd-fleet-canary-"); err != nil {
		t.Fatalf("n0 → n1 during the outage: %v", err)
	}

	srv.Restart()
	deadline := time.Now().Add(45 * time.Second)
	for {
		r, err := admin.Get(ctx, "/pspd/nodes/", clientv3.WithPrefix())
		var keys []string
		if err == nil {
			for _, kv := range r.Kvs {
				keys = append(keys, string(kv.Key))
			}
		}
		if slices.Equal(keys, []string{"/pspd/nodes/n0", "/pspd/nodes/n1"}) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after etcd came back the records are %v (%v), want n0 and n1 only\n%s", keys, err, ds[0].Tail(20))
		}
		time.Sleep(500 * time.Millisecond)
	}
	waitPeers(ds[0], "n1")

	// n2, restarted, publishes itself again and rejoins: n1 takes over
	// the fail-closed state it kept for n2.
	ds[2].Stop()
	if err := ds[2].Start(ctx); err != nil {
		t.Fatal(err)
	}
	waitPeers(ds[1], "n0", "n2")
	waitPeers(ds[0], "n1", "n2")
	for _, d := range ds[:2] {
		if _, err := EchoTCP(ctx, d.Host, ds[2].Host, inner(2), 16<<10, "pspd-fleet-canary-"); err != nil {
			t.Fatalf("%s → n2 after it rejoined: %v\n%s", d.Host.Name, err, d.Tail(20))
		}
	}
}
