// Package kubetest runs a real kube-apiserver for tests, on a real etcd
// (etcdtest): built once from the Kubernetes module (at Version, into
// /var/cache/pspd/kube, never into the repository) and started by the
// test, with static tokens for an administrator and RBAC authorization.
package kubetest

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/pspd/pspd/internal/etcdtest"
)

// Version is the Kubernetes release whose API server is built.
const Version = "v1.37.2"

// stagingVersion is the published version of the staging modules that
// release uses.
const stagingVersion = "v0.37.2"

// CacheDir is where the server binary is built.
const CacheDir = "/var/cache/pspd/kube"

// staging are the modules k8s.io/kubernetes replaces with its own
// staging directories; a module that requires it must replace them with
// their published versions.
var staging = []string{
	"api", "apiextensions-apiserver", "apimachinery", "apiserver", "cli-runtime", "client-go",
	"cloud-provider", "cluster-bootstrap", "code-generator", "component-base", "component-helpers",
	"controller-manager", "cri-api", "cri-client", "cri-streaming", "csi-translation-lib",
	"dynamic-resource-allocation", "endpointslice", "externaljwt", "kms", "kube-aggregator",
	"kube-controller-manager", "kube-proxy", "kube-scheduler", "kubectl", "kubelet", "metrics",
	"mount-utils", "pod-security-admission", "sample-apiserver", "sample-cli-plugin",
	"sample-controller", "streaming",
}

// Binary is the path of kube-apiserver, built on first use (about five
// minutes on two cores, and the module download; tests/deps.sh builds it
// ahead). It skips the test if the toolchain or the module proxy is not
// there to build it.
func Binary(t testing.TB) string {
	t.Helper()
	bin, err := Build(filepath.Join(CacheDir, Version))
	if err != nil {
		t.Skipf("kubetest: cannot build kube-apiserver %s: %v", Version, err)
	}
	return bin
}

// Build builds kube-apiserver into dir unless it is there, and returns
// its path.
func Build(dir string) (string, error) {
	var mod strings.Builder
	fmt.Fprintf(&mod, "module pspd.invalid/kubeapiserver\n\ngo 1.26\n\nrequire k8s.io/kubernetes %s\n\n", Version)
	for _, m := range staging {
		fmt.Fprintf(&mod, "replace k8s.io/%s => k8s.io/%s %s\n", m, m, stagingVersion)
	}
	files := map[string]string{
		"go.mod":   mod.String(),
		"tools.go": "//go:build tools\n\npackage tools\n\nimport _ \"k8s.io/kubernetes/cmd/kube-apiserver\"\n",
	}
	bin := filepath.Join(dir, "kube-apiserver")
	// Stamped, since the API server reports (and gates features on) its
	// version; unstamped it is v0.0.0-master.
	ldflags := "-s -w -X k8s.io/component-base/version.gitVersion=" + Version +
		" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=" + strings.Split(Version, ".")[1]
	return bin, etcdtest.BuildModule(dir, bin, files, [][]string{{"mod", "tidy"}, {"build", "-ldflags", ldflags, "-o", bin + ".tmp", "k8s.io/kubernetes/cmd/kube-apiserver"}})
}

// Server is a running kube-apiserver with its etcd.
type Server struct {
	URL        string // https://addr:port
	AdminToken string // a system:masters token
	CA         []byte // PEM of the serving certificate's issuer
	CAFile     string
	Etcd       *etcdtest.Server
	dir        string
	place      etcdtest.Place
	cmd        *exec.Cmd
	exited     chan struct{} // closed when cmd has ended
	args       []string      // the binary and its flags
	certs      string
	log        *bytes.Buffer
	t          testing.TB
}

// Start runs an etcd and a kube-apiserver on it, and stops both when the
// test ends.
func Start(t testing.TB, place etcdtest.Place) *Server {
	t.Helper()
	bin := Binary(t)
	place = place.Defaults()
	e := etcdtest.Start(t, etcdtest.Options{Place: place})
	s := &Server{Etcd: e, dir: t.TempDir(), place: place, t: t, log: &bytes.Buffer{}}
	tok := make([]byte, 16)
	rand.Read(tok)
	s.AdminToken = hex.EncodeToString(tok)
	if err := os.WriteFile(filepath.Join(s.dir, "tokens.csv"), []byte(s.AdminToken+",admin,admin-uid,system:masters\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	saKey := filepath.Join(s.dir, "sa.key")
	if err := os.WriteFile(saKey, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	port := etcdtest.FreePort(t)
	s.URL = "https://" + net.JoinHostPort(place.Addr.String(), strconv.Itoa(port))
	s.certs = filepath.Join(s.dir, "certs")
	s.args = []string{bin,
		"--etcd-servers", e.Endpoint, "--bind-address", place.Addr.String(), "--advertise-address", place.Addr.String(),
		"--secure-port", strconv.Itoa(port), "--cert-dir", s.certs, "--endpoint-reconciler-type=none",
		"--token-auth-file", filepath.Join(s.dir, "tokens.csv"), "--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc", "--service-account-key-file", saKey,
		"--service-account-signing-key-file", saKey, "--service-cluster-ip-range=10.96.0.0/16",
		"--enable-priority-and-fairness=false", "-v=0"}
	t.Cleanup(s.Stop)
	s.start()
	return s
}

// waitReady waits for the self-signed serving certificate and /readyz.
func (s *Server) waitReady() {
	t := s.t
	deadline := time.Now().Add(90 * time.Second)
	for {
		select {
		case <-s.exited:
			t.Fatalf("kubetest: kube-apiserver exited\n%s", s.log)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("kubetest: not ready after 90s\n%s", s.log)
		}
		if s.CA == nil {
			// The server writes apiserver.crt, self-signed by its own CA
			// in the same file's chain.
			b, err := os.ReadFile(filepath.Join(s.certs, "apiserver.crt"))
			if err != nil {
				time.Sleep(100 * time.Millisecond)
				continue
			}
			s.CA = b
			s.CAFile = filepath.Join(s.certs, "apiserver.crt")
		}
		req, _ := http.NewRequest("GET", s.URL+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+s.AdminToken)
		resp, err := s.HTTPClient().Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// HTTPClient reaches the server (through Options.Dial), trusting its CA.
func (s *Server) HTTPClient() *http.Client {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(s.CA)
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext:     func(ctx context.Context, _, addr string) (net.Conn, error) { return s.place.Dial(ctx, addr) },
		TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
	}}
}

// Do sends an administrator's request: method, path (from /apis/...),
// a JSON or YAML body (or nil), its content type; it returns the status
// and the body.
func (s *Server) Do(method, path, contentType string, body []byte, header ...string) (int, []byte) {
	s.t.Helper()
	req, err := http.NewRequest(method, s.URL+path, bytes.NewReader(body))
	if err != nil {
		s.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+s.AdminToken)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Add(header[i], header[i+1])
	}
	resp, err := s.HTTPClient().Do(req)
	if err != nil {
		s.t.Fatalf("kubetest: %s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// Stop ends the API server (idempotent); its etcd stops with the test.
func (s *Server) Stop() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	s.cmd.Process.Kill()
	<-s.exited
	s.cmd = nil
}

// Pid is the server's process id, for its memory: that of the command
// Place.Wrap made (ip netns exec execs the server, it does not fork), or
// 0 while the server is stopped.
func (s *Server) Pid() int {
	if s.cmd == nil || s.cmd.Process == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// Log is what the API server printed.
func (s *Server) Log() string { return s.log.String() }

// paths maps a manifest's kind to its REST collection (a namespaced one
// has {ns} in it).
var paths = map[string]string{
	"v1/Namespace":      "/api/v1/namespaces",
	"v1/ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
	"v1/Node":           "/api/v1/nodes",
	"v1/Pod":            "/api/v1/namespaces/{ns}/pods",
	"apiextensions.k8s.io/v1/CustomResourceDefinition":                 "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
	"rbac.authorization.k8s.io/v1/ClusterRole":                         "/apis/rbac.authorization.k8s.io/v1/clusterroles",
	"rbac.authorization.k8s.io/v1/ClusterRoleBinding":                  "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
	"admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy":        "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies",
	"admissionregistration.k8s.io/v1/ValidatingAdmissionPolicyBinding": "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings",
	"apps/v1/DaemonSet":   "/apis/apps/v1/namespaces/{ns}/daemonsets",
	"pspd.dev/v1/PSPNode": "/apis/pspd.dev/v1/pspnodes",
}

// Path is the REST path of the object a manifest describes.
func Path(apiVersion, kind, namespace, name string) (string, error) {
	c, ok := paths[apiVersion+"/"+kind]
	if !ok {
		return "", fmt.Errorf("kubetest: no REST path known for %s %s", apiVersion, kind)
	}
	return strings.ReplaceAll(c, "{ns}", namespace) + "/" + name, nil
}

// Apply applies every object of the YAML manifests, as an administrator
// (server-side apply), and waits for custom resource definitions to be
// established.
func (s *Server) Apply(files ...string) {
	s.t.Helper()
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			s.t.Fatal(err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(data))
		for {
			var obj map[string]any
			if err := dec.Decode(&obj); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				s.t.Fatalf("kubetest: %s: %v", f, err)
			}
			if obj == nil {
				continue
			}
			s.ApplyObject(obj)
		}
	}
}

// ApplyObject applies one object and returns what the server made of it.
func (s *Server) ApplyObject(obj map[string]any) map[string]any {
	s.t.Helper()
	meta, _ := obj["metadata"].(map[string]any)
	name, _ := meta["name"].(string)
	ns, _ := meta["namespace"].(string)
	apiVersion, _ := obj["apiVersion"].(string)
	kind, _ := obj["kind"].(string)
	p, err := Path(apiVersion, kind, ns, name)
	if err != nil {
		s.t.Fatal(err)
	}
	body, err := json.Marshal(obj)
	if err != nil {
		s.t.Fatal(err)
	}
	code, out := s.Do("PATCH", p+"?fieldManager=kubetest&force=true", "application/apply-patch+yaml", body)
	if code/100 != 2 {
		s.t.Fatalf("kubetest: apply %s %s: %d %s", kind, name, code, out)
	}
	var got map[string]any
	json.Unmarshal(out, &got)
	if kind == "CustomResourceDefinition" {
		s.waitEstablished(p)
	}
	return got
}

func (s *Server) waitEstablished(p string) {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		_, out := s.Do("GET", p, "", nil)
		var crd struct {
			Status struct {
				Conditions []struct{ Type, Status string } `json:"conditions"`
			} `json:"status"`
		}
		json.Unmarshal(out, &crd)
		for _, c := range crd.Status.Conditions {
			if c.Type == "Established" && c.Status == "True" {
				return
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	s.t.Fatalf("kubetest: %s not established after 30s", p)
}

// NodeToken is a service-account token of namespace/sa as a pod on node
// gets it: the test makes the Node and a Pod bound to it (nothing runs
// it; there is no kubelet), and a TokenRequest bound to the pod, whose
// token then carries the node's name in its extra fields.
func (s *Server) NodeToken(namespace, sa, node string) string {
	s.t.Helper()
	s.ApplyObject(map[string]any{"apiVersion": "v1", "kind": "Node", "metadata": map[string]any{"name": node}})
	pod := s.ApplyObject(map[string]any{
		"apiVersion": "v1", "kind": "Pod",
		"metadata": map[string]any{"name": sa + "-" + node, "namespace": namespace},
		"spec": map[string]any{"nodeName": node, "serviceAccountName": sa,
			"containers": []any{map[string]any{"name": "pspd", "image": "pspd:test"}}},
	})
	uid, _ := pod["metadata"].(map[string]any)["uid"].(string)
	req, _ := json.Marshal(map[string]any{
		"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
		"spec": map[string]any{"expirationSeconds": 3600, "boundObjectRef": map[string]any{
			"apiVersion": "v1", "kind": "Pod", "name": sa + "-" + node, "uid": uid}},
	})
	code, out := s.Do("POST", "/api/v1/namespaces/"+namespace+"/serviceaccounts/"+sa+"/token", "application/json", req)
	if code/100 != 2 {
		s.t.Fatalf("kubetest: token request for %s on %s: %d %s", sa, node, code, out)
	}
	var tr struct {
		Status struct {
			Token string `json:"token"`
		} `json:"status"`
	}
	if err := json.Unmarshal(out, &tr); err != nil || tr.Status.Token == "" {
		s.t.Fatalf("kubetest: token request: %v %s", err, out)
	}
	return tr.Status.Token
}

// Restart starts the stopped API server again, on the same etcd and
// port; its etcd keeps running.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	s.start()
}

func (s *Server) start() {
	s.cmd = s.place.Wrap(s.args[0], s.args[1:]...)
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	if err := s.cmd.Start(); err != nil {
		s.t.Fatalf("kubetest: start: %v", err)
	}
	s.exited = make(chan struct{})
	go func(cmd *exec.Cmd, exited chan struct{}) {
		cmd.Wait()
		close(exited)
	}(s.cmd, s.exited)
	s.waitReady()
}
