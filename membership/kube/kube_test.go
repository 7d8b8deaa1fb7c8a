package kube

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pspd/pspd/internal/etcdtest"
	"github.com/pspd/pspd/internal/kubetest"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/membership"
	"github.com/pspd/pspd/membership/membershiptest"
)

func record(t *testing.T, name, ep, prefix string) membership.Record {
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return membership.Record{Name: name, Endpoints: []string{ep}, PublicKeys: []string{id.Public().String()}, Prefixes: []string{prefix}}
}

// node runs a Source as a pspd on a node would: with a token bound to a
// pod on that node.
type node struct {
	*membershiptest.Node
	src  *Source
	logs *membershiptest.Log
}

func run(t *testing.T, srv *kubetest.Server, on string, self membership.Record) *node {
	t.Helper()
	tok := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tok, []byte(srv.NodeToken("pspd", "pspd", on)), 0o600); err != nil {
		t.Fatal(err)
	}
	logs := &membershiptest.Log{}
	src, err := New(Config{Server: srv.URL, TokenFile: tok, CAFile: srv.CAFile, Logger: logs.Logger()})
	if err != nil {
		t.Fatal(err)
	}
	return &node{membershiptest.Run(t, src, self), src, logs}
}

func (n *node) waitFor(t *testing.T, want ...string) {
	t.Helper()
	if err := n.WaitFor(30*time.Second, want...); err != nil {
		t.Fatalf("%v\n%s", err, n.logs)
	}
}

func manifests(t *testing.T) []string {
	var fs []string
	for _, f := range []string{"crd.yaml", "rbac.yaml", "admission.yaml"} {
		fs = append(fs, filepath.Join("..", "..", "deploy", "kubernetes", f))
	}
	return fs
}

// TestKubernetes runs the Source against a real kube-apiserver with the
// manifests of deploy/kubernetes: pspds on two nodes, each with a
// service-account token bound to a pod on its node, publish their
// PSPNodes and see each other's. A pspd whose token is bound to node n1
// cannot write n0's object (the ValidatingAdmissionPolicy), nor can a
// request impersonating the pspd service account with another node's
// name; an administrator's deletion takes a node out and its pspd does
// not put it back; a malformed object is left out.
func TestKubernetes(t *testing.T) {
	srv := kubetest.Start(t, etcdtest.Place{})
	srv.Apply(manifests(t)...)
	// The schema applies at once; the admission policy once the API
	// server has compiled it: wait until an impersonated wrong-node write
	// is refused.
	wrong, _ := Object(record(t, "n0", "192.0.2.1:6082", "10.1.0.0/24"))
	impersonate := []string{"Impersonate-User", "system:serviceaccount:pspd:pspd", "Impersonate-Group", "system:serviceaccounts",
		"Impersonate-Group", "system:authenticated", "Impersonate-Extra-authentication.kubernetes.io%2fnode-name", "n1"}
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, out := srv.Do("PATCH", "/apis/pspd.dev/v1/pspnodes/n0?fieldManager=pspd&force=true", "application/apply-patch+yaml", wrong, impersonate...)
		if code == 403 && strings.Contains(string(out), "a pspd may write only the PSPNode named after its own node") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("an impersonated pspd of node n1 writing n0's PSPNode: %d %s, want 403 from the admission policy", code, out)
		}
		srv.Do("DELETE", "/apis/pspd.dev/v1/pspnodes/n0", "", nil)
		time.Sleep(200 * time.Millisecond)
	}

	a := run(t, srv, "n0", record(t, "n0", "192.0.2.1:6082", "10.1.0.0/24"))
	b := run(t, srv, "n1", record(t, "n1", "192.0.2.2:6082", "10.1.1.0/24"))
	a.waitFor(t, "n0", "n1")
	b.waitFor(t, "n0", "n1")

	// n2's pspd claims n0's name: refused, so it never publishes.
	evil := run(t, srv, "n2", record(t, "n0", "192.0.2.66:6082", "10.1.2.0/24"))
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if h := evil.src.Health(); h.Err != nil && strings.Contains(h.Err.Error(), "a pspd may write only the PSPNode named after its own node") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the pspd on n2 writing n0's PSPNode: health %+v, want the admission policy's refusal\n%s", evil.src.Health(), evil.logs)
		}
	}
	_, out := srv.Do("GET", "/apis/pspd.dev/v1/pspnodes/n0", "", nil)
	if strings.Contains(string(out), "192.0.2.66") {
		t.Fatalf("n2's pspd rewrote n0's PSPNode: %s", out)
	}

	// A malformed object from an administrator is left out.
	bad, _ := Object(record(t, "n9", "192.0.2.9:6082", "10.1.9.0/24"))
	bad = bytes.Replace(bad, []byte(`"publicKeys":["`), []byte(`"publicKeys":["AAAA`), 1)
	if code, out := srv.Do("PATCH", "/apis/pspd.dev/v1/pspnodes/n9?fieldManager=admin&force=true", "application/apply-patch+yaml", bad); code/100 != 2 {
		t.Fatalf("admin's PSPNode n9: %d %s", code, out)
	}
	time.Sleep(time.Second)
	a.waitFor(t, "n0", "n1")
	if !strings.Contains(a.logs.String(), "PSPNode ignored") {
		t.Errorf("no log for the malformed PSPNode:\n%s", a.logs)
	}

	if code, out := srv.Do("DELETE", "/apis/pspd.dev/v1/pspnodes/n1", "", nil); code/100 != 2 {
		t.Fatalf("delete n1: %d %s", code, out)
	}
	a.waitFor(t, "n0")
	time.Sleep(2 * time.Second)
	if code, _ := srv.Do("GET", "/apis/pspd.dev/v1/pspnodes/n1", "", nil); code != 404 {
		t.Fatalf("n1's pspd put its PSPNode back after an administrator deleted it (GET: %d)", code)
	}
	if !strings.Contains(b.logs.String(), "an operator removed the node") {
		t.Errorf("n1's pspd does not say it was removed:\n%s", b.logs)
	}
	if h := a.src.Health(); !h.Connected || h.Service != "kubernetes "+srv.URL {
		t.Errorf("health %+v, want connected to %s", h, srv.URL)
	}
}
