package etcd

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/pspd/pspd/internal/etcdtest"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/membership"
	"github.com/pspd/pspd/membership/membershiptest"
)

const prefix = "/pspd/nodes/"

func record(t *testing.T, name, ep string) membership.Record {
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return membership.Record{Name: name, Endpoints: []string{ep}, PublicKeys: []string{id.Public().String()}, Prefixes: []string{"10.9." + ep[len(ep)-1:] + ".0/24"}}
}

type node struct {
	*membershiptest.Node
	logs *membershiptest.Log
}

func run(t *testing.T, cfg Config, self membership.Record) *node {
	t.Helper()
	logs := &membershiptest.Log{}
	cfg.Logger = logs.Logger()
	src, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return &node{membershiptest.Run(t, src, self), logs}
}

func (n *node) waitFor(t *testing.T, want ...string) {
	t.Helper()
	if err := n.WaitFor(20*time.Second, want...); err != nil {
		t.Fatalf("%v\n%s", err, n.logs)
	}
}

// TestSourceTLS: two nodes with client certificates publish their records
// and see each other's; a record an operator deletes leaves the fleet and
// is not put back by its node; a node that stops withdraws its record;
// a client without a certificate gets nothing.
func TestSourceTLS(t *testing.T) {
	srv := etcdtest.Start(t, etcdtest.Options{TLS: true})
	cfg := func(cn string) Config {
		return Config{Endpoints: []string{srv.Endpoint}, Prefix: prefix, TLS: srv.ClientTLS(cn), Lease: 5 * time.Second}
	}
	a := run(t, cfg("a"), record(t, "a", "192.0.2.1:6082"))
	b := run(t, cfg("b"), record(t, "b", "192.0.2.2:6082"))
	a.waitFor(t, "a", "b")
	b.waitFor(t, "a", "b")

	admin := srv.Client("root")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := admin.Delete(ctx, prefix+"b"); err != nil {
		t.Fatal(err)
	}
	a.waitFor(t, "a")
	b.waitFor(t, "a")
	time.Sleep(2 * time.Second)
	if r, err := admin.Get(ctx, prefix+"b"); err != nil || len(r.Kvs) != 0 {
		t.Fatalf("b put its record back after an operator deleted it: %v %v", r, err)
	}
	if !strings.Contains(b.logs.String(), "an operator removed the node") {
		t.Errorf("b does not say its record was removed:\n%s", b.logs)
	}

	b.Stop()
	a.Stop()
	if r, err := admin.Get(ctx, prefix, clientv3.WithPrefix()); err != nil || len(r.Kvs) != 0 {
		t.Fatalf("records left after both nodes stopped: %v %v", r.Kvs, err)
	}

	bare := cfg("c")
	bare.TLS = bare.TLS.Clone()
	bare.TLS.Certificates = nil
	c := run(t, bare, record(t, "c", "192.0.2.3:6082"))
	for deadline := time.Now().Add(15 * time.Second); !strings.Contains(c.logs.String(), "membership unavailable"); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no warning for the client without a certificate:\n%s", c.logs)
		}
	}
	if updates := c.Updates(); updates != 0 {
		t.Fatalf("a client without a certificate got %d updates", updates)
	}
}

// TestSourceOutage: while etcd is down the last update stands (no empty
// one), and when it is back each node publishes itself again.
func TestSourceOutage(t *testing.T) {
	srv := etcdtest.Start(t, etcdtest.Options{})
	cfg := Config{Endpoints: []string{srv.Endpoint}, Prefix: prefix, Lease: 5 * time.Second}
	a := run(t, cfg, record(t, "a", "192.0.2.1:6082"))
	b := run(t, cfg, record(t, "b", "192.0.2.2:6082"))
	a.waitFor(t, "a", "b")
	srv.Stop()
	time.Sleep(8 * time.Second) // beyond the lease
	if got := a.Names(); !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("during the outage a's peers became %v", got)
	}
	srv.Restart()
	a.waitFor(t, "a", "b")
	b.waitFor(t, "a", "b")
}

// TestSourceIgnoresBadRecords: a malformed record, one stored under
// another node's name, and one under a key nested below a node's (which
// its last element would otherwise pass for node b's) are left out; the
// good ones stay.
func TestSourceIgnoresBadRecords(t *testing.T) {
	srv := etcdtest.Start(t, etcdtest.Options{})
	admin := srv.Client("")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	forged, _ := record(t, "a", "192.0.2.9:6082").Encode()
	nested, _ := record(t, "b", "192.0.2.8:6082").Encode()
	for k, v := range map[string]string{prefix + "x": "{not json", prefix + "y": string(forged), prefix + "z/b": string(nested)} {
		if _, err := admin.Put(ctx, k, v); err != nil {
			t.Fatal(err)
		}
	}
	a := run(t, Config{Endpoints: []string{srv.Endpoint}, Prefix: prefix}, record(t, "a", "192.0.2.1:6082"))
	a.waitFor(t, "a")
	for _, want := range []string{"key=/pspd/nodes/x", `names node \"a\"`, "key below the prefix's node keys ignored\" part=etcd key=/pspd/nodes/z/b"} {
		if !strings.Contains(a.logs.String(), want) {
			t.Errorf("log does not say why a record was ignored (%s):\n%s", want, a.logs)
		}
	}
}

// TestSourceFailedSessionKeepsRecord: a session that fails while the
// source goes on (here node b may write its key but not read the prefix)
// leaves b's record in etcd for the next session to publish again,
// instead of revoking its lease: a slow or briefly failing etcd must not
// take a node out of every other's configuration and back in.
func TestSourceFailedSessionKeepsRecord(t *testing.T) {
	srv := etcdtest.Start(t, etcdtest.Options{TLS: true})
	admin := srv.Client("root")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	noPassword := &clientv3.UserAddOptions{NoPassword: true}
	for _, step := range []func() error{
		func() error { _, err := admin.RoleAdd(ctx, "root"); return err },
		func() error { _, err := admin.UserAddWithOptions(ctx, "root", "", noPassword); return err },
		func() error { _, err := admin.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := admin.RoleAdd(ctx, "b"); return err },
		func() error {
			_, err := admin.RoleGrantPermission(ctx, "b", prefix+"b", "", clientv3.PermissionType(clientv3.PermReadWrite))
			return err
		},
		func() error { _, err := admin.UserAddWithOptions(ctx, "b", "", noPassword); return err },
		func() error { _, err := admin.UserGrantRole(ctx, "b", "b"); return err },
		func() error { _, err := admin.AuthEnable(ctx); return err },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	r, err := admin.Get(ctx, prefix+"b")
	if err != nil {
		t.Fatal(err)
	}
	watch := admin.Watch(ctx, prefix+"b", clientv3.WithRev(r.Header.Revision+1))
	b := run(t, Config{Endpoints: []string{srv.Endpoint}, Prefix: prefix, TLS: srv.ClientTLS("b"), Lease: 10 * time.Second}, record(t, "b", "192.0.2.2:6082"))
	var puts int
	for deadline := time.After(8 * time.Second); ; {
		select {
		case wr := <-watch:
			for _, ev := range wr.Events {
				if ev.Type == clientv3.EventTypeDelete {
					t.Fatalf("b's record was deleted after a failed session (put %d times)\n%s", puts, b.logs)
				}
				puts++
			}
			continue
		case <-deadline:
		}
		break
	}
	// Backoffs of 1, 2 and 4 s: four sessions, each well within the
	// lease of the one before.
	if puts < 3 || !strings.Contains(b.logs.String(), "permission denied") {
		t.Fatalf("b published %d times; want sessions that fail reading the prefix\n%s", puts, b.logs)
	}
	if r, err := admin.Get(ctx, prefix+"b"); err != nil || len(r.Kvs) != 1 {
		t.Fatalf("b's record after its failed sessions: %v %v", r, err)
	}
}
