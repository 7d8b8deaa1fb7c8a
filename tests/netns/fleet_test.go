package netns

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/pspd/pspd/internal/etcdtest"
	"github.com/pspd/pspd/internal/kubetest"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/membership"
	"github.com/pspd/pspd/membership/kube"
)

// fleetService is a membership service the fleet scenario runs against,
// started in the control host ctl.
type fleetService struct {
	// discovery is the service's part of a node's discovery block.
	discovery func(d *Daemon) string
	// remove deletes a node's record as an operator would; forge puts
	// one in as an operator would.
	remove func(node string)
	forge  func(r membership.Record)
	// stop and restart take the service away and bring it back.
	stop, restart func()
	// published lists the names of the records the service holds.
	published func() []string
	// pids are the service's processes by name, for their memory.
	pids func() map[string]int
}

// fleetStart starts a membership service at place.
type fleetStart func(ctx context.Context, t *testing.T, place etcdtest.Place) fleetService

// TestFleetEtcd runs the fleet scenario (testFleet) on a real etcd with
// TLS client certificates.
func TestFleetEtcd(t *testing.T) { testFleet(t, "pfe-", etcdFleet) }

// TestFleetKubernetes runs the fleet scenario on a real kube-apiserver
// (on a real etcd) with the manifests of deploy/kubernetes: each pspd
// authenticates with a service-account token bound to a pod on its node.
func TestFleetKubernetes(t *testing.T) { testFleet(t, "pfk-", kubeFleet) }

// etcdFleet is a real etcd with TLS client certificates, at place.
func etcdFleet(ctx context.Context, t *testing.T, place etcdtest.Place) fleetService {
	srv := etcdtest.Start(t, etcdtest.Options{Place: place, TLS: true})
	admin := srv.Client("root")
	const prefix = "/pspd/nodes/"
	return fleetService{
		discovery: func(d *Daemon) string {
			ca, cert, key := srv.ClientFiles(d.Host.Name)
			return fmt.Sprintf("  etcd:\n    endpoints: [%s]\n    ca: %s\n    cert: %s\n    key: %s\n    lease: 5s\n", srv.Endpoint, ca, cert, key)
		},
		remove: func(node string) {
			if _, err := admin.Delete(ctx, prefix+node); err != nil {
				t.Fatal(err)
			}
		},
		forge: func(r membership.Record) {
			b, err := r.Encode()
			if err == nil {
				_, err = admin.Put(ctx, prefix+r.Name, string(b))
			}
			if err != nil {
				t.Fatal(err)
			}
		},
		stop:    srv.Stop,
		restart: srv.Restart,
		pids:    func() map[string]int { return map[string]int{"etcd": srv.Pid()} },
		published: func() []string {
			r, err := admin.Get(ctx, prefix, clientv3.WithPrefix())
			if err != nil {
				return nil
			}
			var names []string
			for _, kv := range r.Kvs {
				names = append(names, strings.TrimPrefix(string(kv.Key), prefix))
			}
			return names
		},
	}
}

// kubeFleet is a real kube-apiserver on a real etcd, at place, with the
// manifests of deploy/kubernetes: each pspd authenticates with a
// service-account token bound to a pod on its node.
func kubeFleet(ctx context.Context, t *testing.T, place etcdtest.Place) fleetService {
	srv := kubetest.Start(t, place)
	root := moduleRoot(t)
	var files []string
	for _, f := range []string{"crd.yaml", "rbac.yaml", "admission.yaml", "daemonset.yaml"} {
		files = append(files, filepath.Join(root, "deploy", "kubernetes", f))
	}
	srv.Apply(files...)
	const path = "/apis/pspd.dev/v1/pspnodes/"
	return fleetService{
		discovery: func(d *Daemon) string {
			tok := filepath.Join(d.Dir, "token")
			if err := os.WriteFile(tok, []byte(srv.NodeToken("pspd", "pspd", d.Host.Name)), 0o600); err != nil {
				t.Fatal(err)
			}
			return fmt.Sprintf("  kubernetes:\n    server: %s\n    token_file: %s\n    ca: %s\n", srv.URL, tok, srv.CAFile)
		},
		remove: func(node string) {
			if code, out := srv.Do("DELETE", path+node, "", nil); code/100 != 2 {
				t.Fatalf("delete PSPNode %s: %d %s", node, code, out)
			}
		},
		forge: func(r membership.Record) {
			b, err := kube.Object(r)
			if err != nil {
				t.Fatal(err)
			}
			if code, out := srv.Do("PATCH", path+r.Name+"?fieldManager=admin&force=true", "application/apply-patch+yaml", b); code/100 != 2 {
				t.Fatalf("forge PSPNode %s: %d %s", r.Name, code, out)
			}
		},
		stop:    srv.Stop,
		restart: srv.Restart,
		pids:    func() map[string]int { return map[string]int{"kube-apiserver": srv.Pid(), "etcd": srv.Etcd.Pid()} },
		published: func() []string {
			code, out := srv.Do("GET", path, "", nil)
			if code != 200 {
				return nil
			}
			var list struct {
				Items []struct {
					Metadata struct{ Name string } `json:"metadata"`
				} `json:"items"`
			}
			json.Unmarshal(out, &list)
			var names []string
			for _, o := range list.Items {
				names = append(names, o.Metadata.Name)
			}
			return names
		},
	}
}

var ctlAddr = netip.MustParsePrefix("192.0.2.100/24")

// inCtl places a test server in the control host ctl, at addr.
func inCtl(ctx context.Context, ctl *Host, addr netip.Addr) etcdtest.Place {
	return etcdtest.Place{
		Addr: addr,
		Wrap: func(name string, args ...string) *exec.Cmd { return ctl.Command(ctx, name, args...) },
		Dial: func(ctx context.Context, addr string) (c net.Conn, err error) {
			err = inNetns(ctl, func() (err error) {
				var d net.Dialer
				c, err = d.DialContext(ctx, "tcp", addr)
				return err
			})
			return c, err
		},
	}
}

// fleetRotation rotates ds[1]'s identity under traffic from ds[0]: the
// fleet's record carries both keys, the others pin both, the sessions move
// to the new one and the old one is dropped, and not a datagram is lost.
// ds[1], killed and restarted, comes up under its new identity, which the
// others now pin alone.
func fleetRotation(ctx context.Context, t *testing.T, ds []*Daemon, inner func(int) string) {
	t.Helper()
	identityOf := func(d *Daemon) localapi.Identity { return identityOf(ctx, t, d) }
	waitLog := func(d *Daemon, what string, n int) error {
		for deadline := time.Now().Add(20 * time.Second); strings.Count(readFile(t, d.Log), what) < n; time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				return fmt.Errorf("%s's log does not say %q %d times:\n%s", d.Host.Name, what, n, d.Tail(20))
			}
		}
		return nil
	}
	before := identityOf(ds[1])
	var took time.Duration
	const n, pps = 4000, 1000
	got, err := UDPStream(ctx, ds[0].Host, ds[1].Host, inner(1), n, pps, func() error {
		time.Sleep(300 * time.Millisecond)
		if _, err := ds[1].Ctl(ctx, "identity", "rotate"); err != nil {
			return err
		}
		// The others pin the staged key once the fleet carries it.
		for _, d := range []*Daemon{ds[0], ds[2]} {
			if err := waitLog(d, "peer's keys changed (identity rotation)", 1); err != nil {
				return err
			}
		}
		start := time.Now()
		if _, err := ds[1].Ctl(ctx, "identity", "switch"); err != nil {
			return err
		}
		for deadline := time.Now().Add(20 * time.Second); identityOf(ds[1]).Phase != localapi.RotationNone; time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				return fmt.Errorf("n1's rotation not done in 20 s: %+v\n%s", identityOf(ds[1]), ds[1].Tail(20))
			}
		}
		took = time.Since(start)
		// The record says the new key alone: the others pin it alone.
		for _, d := range []*Daemon{ds[0], ds[2]} {
			if err := waitLog(d, "peer's keys changed (identity rotation)", 2); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	after := identityOf(ds[1])
	t.Logf("n1's identity rotated from %s to %s: every session moved and the old key dropped %v after the switch; %d of %d datagrams at %d/s", before.Fingerprint, after.Fingerprint, took.Round(time.Millisecond), got, n, pps)
	if got != n {
		t.Errorf("lost %d datagrams across n1's identity rotation", n-got)
	}
	if after.PublicKey == before.PublicKey {
		t.Fatalf("n1 still presents %s", before.Fingerprint)
	}
	ds[1].Kill()
	if err := ds[1].Start(ctx); err != nil {
		t.Fatal(err)
	}
	for i := range ds {
		for j := range ds {
			if i != j {
				if _, err := EchoTCP(ctx, ds[i].Host, ds[j].Host, inner(j), 4096, "pspd-fleet-canary-"); err != nil {
					t.Fatalf("%s → %s after n1's rotation and restart: %v\n%s", ds[i].Host.Name, ds[j].Host.Name, err, ds[1].Tail(20))
				}
			}
		}
	}
	if v := identityOf(ds[1]); v.PublicKey != after.PublicKey || v.Phase != localapi.RotationNone {
		t.Fatalf("n1 restarted with %+v, want its new identity", v)
	}
}

// testFleet: three daemons with no peers in their files learn each other
// from a membership service (in a namespace of its own on the hosts'
// switch) and associate; traffic flows between every pair. A record an
// operator forges with a wrong key never associates. An operator deleting
// a node's record takes its associations down on the others and leaves
// its fail-closed state (traffic to it is held back, not sent in clear).
// With the service down, the associations stay, and a daemon restarted
// during the outage starts from its cache; with the service back the
// remaining nodes publish themselves again, and the removed node,
// restarted, rejoins.
func testFleet(t *testing.T, prefix string, start fleetStart) {
	hostOnly(t)
	ctx, l, sw, svc := fleetLab(t, prefix, 5*time.Minute, ctlAddr, start)
	const n = 3
	inner := func(i int) string { return fmt.Sprintf("10.200.0.%d", i+1) }
	var ds []*Daemon
	for i := range n {
		underlay := netip.MustParsePrefix(fmt.Sprintf("192.0.2.%d/24", i+1))
		ds = append(ds, fleetNode(ctx, t, l, sw, fmt.Sprintf("n%d", i), underlay, netip.MustParsePrefix(inner(i)+"/24"), false, svc))
	}
	available(ctx, t, ds[0], "userspace")
	begin := time.Now()
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
	t.Logf("%d daemons with empty peer lists associated through the membership service %v after start", n, time.Since(begin).Round(time.Millisecond))
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

	fleetRotation(ctx, t, ds, inner)

	// An operator's record with another key for n1's address: left out,
	// and never associated, with the reason in pspctl status.
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	svc.forge(membership.Record{Name: "n9", Endpoints: []string{"192.0.2.2:6082"}, PublicKeys: []string{id.Public().String()}, Prefixes: []string{"10.200.0.99/32"}})
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		f := fleetOf(ds[0])
		if len(f.LeftOut) == 1 && strings.Contains(f.LeftOut[0], `peer "n9": endpoint: 192.0.2.2:6082 is already the endpoint of peer "n1"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("n0's fleet status %+v, want n9 left out for claiming n1's endpoint", f)
		}
	}
	if got := peersOf(ds[0]); slices.Contains(got, "n9") {
		t.Fatalf("n0 associated with a forged record pinning another key than n1's: %v", got)
	}
	svc.remove("n9")

	// An operator removes n2 from the fleet.
	svc.remove("n2")
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

	// The service goes away: nothing changes, and a restart starts from
	// the cache.
	svc.stop()
	time.Sleep(7 * time.Second) // beyond etcd's 5 s lease
	waitPeers(ds[0], "n1")
	// The client notices by its keep-alives and watch, later on a loaded
	// machine.
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		f := fleetOf(ds[0])
		if !f.Connected && f.Error != "" && f.Members == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("with the service down, n0's fleet status %+v, want unreachable with the reason and its 1 member kept", f)
		}
	}
	ds[0].Kill()
	restart := time.Now()
	if err := ds[0].Start(ctx); err != nil {
		t.Fatal(err)
	}
	waitPeers(ds[0], "n1")
	waitPeers(ds[1], "n0")
	t.Logf("n0 restarted during the outage: associated with n1 again %v later, from its cache", time.Since(restart).Round(time.Millisecond))
	if _, err := EchoTCP(ctx, ds[0].Host, ds[1].Host, inner(1), 16<<10, "pspd-fleet-canary-"); err != nil {
		t.Fatalf("n0 → n1 during the outage: %v", err)
	}

	svc.restart()
	deadline := time.Now().Add(45 * time.Second)
	for got := svc.published(); !slices.Equal(got, []string{"n0", "n1"}); got = svc.published() {
		if time.Now().After(deadline) {
			t.Fatalf("after the service came back the records are %v, want n0 and n1 only\n%s", got, ds[0].Tail(20))
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

// fleetLab is a lab whose context ends after timeout, with a switch sw
// and a control host on it at ctl, where start runs the membership
// service.
func fleetLab(t *testing.T, prefix string, timeout time.Duration, ctl netip.Prefix, start fleetStart) (context.Context, *Lab, *Host, fleetService) {
	l := newLab(t, prefix)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	sw, err := l.Switch(ctx, "sw")
	if err != nil {
		t.Fatal(err)
	}
	h, err := l.Host(ctx, "ctl")
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Attach(ctx, sw, h, ctl); err != nil {
		t.Fatal(err)
	}
	return ctx, l, sw, start(ctx, t, inCtl(ctx, h, ctl.Addr()))
}

// fleetNode is a pspd in a new host plugged into sw at underlay, with no
// peers in its file: it learns them from svc. inner is its address on
// the userspace data plane, whose /32 it announces. With metrics it
// serves /metrics on metricsSock.
func fleetNode(ctx context.Context, t *testing.T, l *Lab, sw *Host, name string, underlay, inner netip.Prefix, metrics bool, svc fleetService) *Daemon {
	t.Helper()
	h, err := l.Host(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Attach(ctx, sw, h, underlay); err != nil {
		t.Fatal(err)
	}
	d, err := l.NewDaemon(ctx, h)
	if err != nil {
		t.Fatal(err)
	}
	m := "off"
	if metrics {
		m = "unix:" + metricsSock(d)
	}
	if err := d.WriteConfig(fmt.Sprintf(`listen: %s
metrics: %s
backend: userspace
require_encryption: true
userspace: {address: %s, io: udp}
discovery:
  node: %s
  prefixes: [%s/32]
  cache: %s
`, underlay.Addr(), m, inner, name, inner.Addr(), filepath.Join(d.Dir, "members.json")) + svc.discovery(d)); err != nil {
		t.Fatal(err)
	}
	return d
}
