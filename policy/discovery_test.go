package policy

import (
	"strings"
	"testing"
	"time"
)

func TestDiscovery(t *testing.T) {
	src := `identity: /k
listen: 192.0.2.1
discovery:
  node: a
  prefixes: [10.1.0.0/16]
  etcd:
    endpoints: [https://192.0.2.100:2379]
    ca: /ca.pem
    cert: /a.pem
    key: /a-key.pem
    lease: 10s
`
	c, err := Parse("f.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	d := c.Discovery
	if d.Node != "a" || d.Endpoint.String() != "192.0.2.1:6082" || d.Cache != DefaultMembersCache || d.Etcd.Prefix != "/pspd/nodes/" || d.Etcd.Lease != 10*time.Second {
		t.Fatalf("discovery %+v etcd %+v", d, d.Etcd)
	}
	next, err := Parse("f.yaml", []byte(strings.Replace(src, "lease: 10s", "lease: 20s", 1)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Reload(c, next); err == nil || !strings.Contains(err.Error(), "discovery: changed") {
		t.Errorf("a changed discovery block reloads: %v", err)
	}
	if _, err := Reload(c, c); err != nil {
		t.Errorf("an unchanged discovery block refuses the reload: %v", err)
	}
	inCluster, err := Parse("f.yaml", []byte("identity: /k\nlisten: 192.0.2.1\ndiscovery:\n  node: a\n  prefixes: [10.1.0.0/16]\n  kubernetes:\n"))
	if err != nil || inCluster.Discovery.Kubernetes == nil || *inCluster.Discovery.Kubernetes != (Kubernetes{}) {
		t.Errorf("kubernetes: with nothing set: %v %+v", err, inCluster)
	}
	for _, tc := range []struct{ name, body, want string }{
		{"no service", "discovery: {node: a, prefixes: [10.1.0.0/16]}\n", "f.yaml:3: discovery: no membership service: add etcd or kubernetes"},
		{"two services", "discovery: {node: a, prefixes: [10.1.0.0/16], kubernetes: {}, etcd: {endpoints: [http://192.0.2.9:2379]}}\n", "discovery.kubernetes: one membership service at a time"},
		{"kube server without token", "discovery: {node: a, prefixes: [10.1.0.0/16], kubernetes: {server: https://192.0.2.9:6443}}\n", "discovery.kubernetes.token_file: required with server"},
		{"kube http", "discovery: {node: a, prefixes: [10.1.0.0/16], kubernetes: {server: http://192.0.2.9:6443, token_file: /t}}\n", `discovery.kubernetes.server: "http://192.0.2.9:6443" is not an https:// URL`},
		{"no prefixes", "discovery: {node: a, etcd: {endpoints: [http://192.0.2.9:2379]}}\n", "discovery.prefixes: required"},
		{"wildcard without endpoint", "listen: 0.0.0.0\ndiscovery: {node: a, prefixes: [10.1.0.0/16], etcd: {endpoints: [http://192.0.2.9:2379]}}\n", "discovery.endpoint: required when listen is a wildcard"},
		{"https without cert", "discovery: {node: a, prefixes: [10.1.0.0/16], etcd: {endpoints: [https://192.0.2.9:2379]}}\n", "discovery.etcd.cert: required with https endpoints"},
		{"bad url", "discovery: {node: a, prefixes: [10.1.0.0/16], etcd: {endpoints: [192.0.2.9:2379]}}\n", `discovery.etcd.endpoints[0]: "192.0.2.9:2379" is not an http:// or https:// URL`},
		{"bad prefix", "discovery: {node: a, prefixes: [10.1.0.0/16], etcd: {endpoints: [http://192.0.2.9:2379], prefix: nodes}}\n", `discovery.etcd.prefix: "nodes" must be a key path`},
		{"bad node", "discovery: {node: A_1, prefixes: [10.1.0.0/16], etcd: {endpoints: [http://192.0.2.9:2379]}}\n", `discovery.node: "A_1" must be lower-case`},
	} {
		body := "identity: /k\n"
		if !strings.HasPrefix(tc.body, "listen") {
			body += "listen: 192.0.2.1\n"
		}
		_, err := Parse("f.yaml", []byte(body+tc.body))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
}
