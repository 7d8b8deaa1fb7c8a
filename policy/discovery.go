package policy

import (
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Discovery is where a host learns its peers besides the file: a fleet's
// membership service, which it also tells about itself. The file's peers
// win by name.
type Discovery struct {
	// Node is this host's name in the fleet (its record's name); the
	// host name by default.
	Node string
	// Endpoint and Prefixes are what this host publishes: where peers
	// reach its key exchange (the listen address by default, when that is
	// not a wildcard) and the networks its traffic comes from.
	Endpoint netip.AddrPort
	Prefixes []netip.Prefix
	// Cache holds the last membership known, which a restart starts from
	// while the service is out of reach.
	Cache string
	// The membership service: exactly one of these.
	Etcd       *Etcd
	Kubernetes *Kubernetes
}

// Kubernetes is the Kubernetes membership service: PSPNode objects.
// Everything left out is the pod's: the in-cluster API server, the
// service account's token and CA.
type Kubernetes struct {
	Server    string
	TokenFile string
	CA        string
}

// Etcd is the etcd membership service.
type Etcd struct {
	Endpoints []string
	Prefix    string
	// CA, Cert and Key are PEM files: the CA that signed etcd's serving
	// certificate, and this host's client certificate and key.
	CA, Cert, Key string
	Lease         time.Duration
}

// DefaultMembersCache is where the last membership is kept.
const DefaultMembersCache = "/var/lib/pspd/members.json"

func (p parser) discovery(c *Config, n *yaml.Node) error {
	d := &Discovery{Cache: DefaultMembersCache}
	const path = "discovery."
	err := p.fields(n, path, []string{"node", "endpoint", "prefixes", "cache", "etcd", "kubernetes"}, func(k string, v *yaml.Node) (err error) {
		f := path + k
		switch k {
		case "node":
			d.Node, err = p.str(v, f)
			if err == nil && !peerName.MatchString(d.Node) {
				err = p.fail(v, f, "%s", badName(d.Node))
			}
		case "endpoint":
			d.Endpoint, err = p.addrPort(v, f, c.Listen.Port())
		case "prefixes":
			d.Prefixes, err = p.prefixes(v, f)
		case "cache":
			d.Cache, err = p.str(v, f)
			if err == nil && !strings.HasPrefix(d.Cache, "/") {
				err = p.fail(v, f, "%q must be an absolute path", d.Cache)
			}
		case "etcd":
			d.Etcd, err = p.etcd(v, f+".")
		case "kubernetes":
			d.Kubernetes, err = p.kubernetes(v, f+".")
		}
		return err
	})
	if err != nil {
		return err
	}
	switch {
	case d.Etcd == nil && d.Kubernetes == nil:
		return p.fail(n, "discovery", "no membership service: add etcd or kubernetes")
	case d.Etcd != nil && d.Kubernetes != nil:
		return p.fail(n, "discovery.kubernetes", "one membership service at a time: etcd is set too")
	}
	if len(d.Prefixes) == 0 {
		return p.fail(n, "discovery.prefixes", "required: the networks this host's traffic comes from, which its peers route to it")
	}
	if d.Node == "" {
		h, err := os.Hostname()
		if err != nil || !peerName.MatchString(strings.ToLower(h)) {
			return p.fail(n, "discovery.node", "required: the host name %q is not a peer name (%v)", h, err)
		}
		d.Node = strings.ToLower(h)
	}
	if !d.Endpoint.IsValid() {
		if c.Listen.Addr().IsUnspecified() {
			return p.fail(n, "discovery.endpoint", "required when listen is a wildcard address: the address peers reach this host at")
		}
		d.Endpoint = c.Listen
	}
	c.Discovery = d
	return nil
}

func (p parser) etcd(n *yaml.Node, path string) (*Etcd, error) {
	e := &Etcd{Prefix: "/pspd/nodes/", Lease: 30 * time.Second}
	err := p.fields(n, path, []string{"endpoints", "prefix", "ca", "cert", "key", "lease"}, func(k string, v *yaml.Node) (err error) {
		f := path + k
		switch k {
		case "endpoints":
			if v.Kind != yaml.SequenceNode || len(v.Content) == 0 {
				return p.fail(v, f, "expected a list of client URLs like https://192.0.2.10:2379")
			}
			for i, u := range v.Content {
				s, err := p.str(u, fmt.Sprintf("%s[%d]", f, i))
				if err != nil {
					return err
				}
				if !strings.HasPrefix(s, "https://") && !strings.HasPrefix(s, "http://") {
					return p.fail(u, fmt.Sprintf("%s[%d]", f, i), "%q is not an http:// or https:// URL", s)
				}
				e.Endpoints = append(e.Endpoints, s)
			}
		case "prefix":
			e.Prefix, err = p.str(v, f)
			if err == nil && (!strings.HasPrefix(e.Prefix, "/") || !strings.HasSuffix(e.Prefix, "/") || e.Prefix == "/") {
				err = p.fail(v, f, "%q must be a key path like /pspd/nodes/", e.Prefix)
			}
		case "ca":
			e.CA, err = p.str(v, f)
		case "cert":
			e.Cert, err = p.str(v, f)
		case "key":
			e.Key, err = p.str(v, f)
		case "lease":
			e.Lease, err = p.duration(v, f, 5*time.Second, 10*time.Minute)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	if len(e.Endpoints) == 0 {
		return nil, p.fail(n, path+"endpoints", "required")
	}
	if (e.Cert == "") != (e.Key == "") {
		return nil, p.fail(n, path+"cert", "cert and key go together: the client certificate etcd knows this host by, and its key")
	}
	https := strings.HasPrefix(e.Endpoints[0], "https://")
	for i, u := range e.Endpoints {
		if strings.HasPrefix(u, "https://") != https {
			return nil, p.fail(n, fmt.Sprintf("%sendpoints[%d]", path, i), "mixes http:// and https:// endpoints")
		}
	}
	if https && e.Cert == "" {
		return nil, p.fail(n, path+"cert", "required with https endpoints: etcd should know each node by its client certificate")
	}
	return e, nil
}

func (p parser) kubernetes(n *yaml.Node, path string) (*Kubernetes, error) {
	k := &Kubernetes{}
	if n.Kind == yaml.ScalarNode && (n.Tag == "!!null" || n.Value == "") {
		return k, nil // kubernetes: (in the cluster)
	}
	err := p.fields(n, path, []string{"server", "token_file", "ca"}, func(key string, v *yaml.Node) (err error) {
		f := path + key
		switch key {
		case "server":
			k.Server, err = p.str(v, f)
			if err == nil && !strings.HasPrefix(k.Server, "https://") {
				err = p.fail(v, f, "%q is not an https:// URL", k.Server)
			}
		case "token_file":
			k.TokenFile, err = p.str(v, f)
		case "ca":
			k.CA, err = p.str(v, f)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	if k.Server != "" && k.TokenFile == "" {
		return nil, p.fail(n, path+"token_file", "required with server: the bearer token pspd authenticates with")
	}
	return k, nil
}
