package policy

import (
	"context"
	"crypto/elliptic"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeResolver answers from a map; names it lacks fail as DNS would. The
// real resolver runs in TestLoadResolvesLocalhost and in the netns test
// TestNATRebinding (a peer named in /etc/netns/NS/hosts).
type fakeResolver map[string][]netip.Addr

func (f fakeResolver) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	if a, ok := f[strings.TrimSuffix(host, ".")]; ok { // a trailing dot: the same, absolute name
		return a, nil
	}
	return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
}

func namedConfig(t *testing.T, listen, endpoint string) string {
	return "identity: /k\nlisten: " + listen + "\npeers:\n  - name: b\n    endpoint: " + endpoint +
		"\n    public_key: " + pubkey(t, elliptic.P256()) + "\n    prefixes: [10.1.0.0/16]\n"
}

func TestEndpointByName(t *testing.T) {
	r := fakeResolver{
		"b.example":      {netip.MustParseAddr("2001:db8::2"), netip.MustParseAddr("192.0.2.2")},
		"v6.example":     {netip.MustParseAddr("2001:db8::6")},
		"mapped.example": {netip.MustParseAddr("::ffff:192.0.2.7")},
		"self.example":   {netip.MustParseAddr("192.0.2.1")},
		"empty.example":  {},
	}
	for _, tc := range []struct {
		name, listen, endpoint string
		want                   string // resolved endpoint, or the error's text
	}{
		{"port given, dual stack listen takes the first", "\"[::]\"", "b.example:7000", "[2001:db8::2]:7000"},
		{"default port", "\"[::]\"", "b.example", "[2001:db8::2]:6082"},
		{"IPv4 listen takes the IPv4 address", "192.0.2.1", "b.example", "192.0.2.2:6082"},
		{"4in6 answer unmapped", "192.0.2.1", "mapped.example:1", "192.0.2.7:1"},
		{"trailing dot", "\"[::]\"", "v6.example.:9", "[2001:db8::6]:9"},
		{"unresolvable", "\"[::]\"", "nope.example", `f.yaml:5: peers[0].endpoint: cannot resolve host name "nope.example"`},
		{"no address", "\"[::]\"", "empty.example", `f.yaml:5: peers[0].endpoint: host name "empty.example" resolves to no address`},
		{"family", "192.0.2.1", "v6.example", `f.yaml:5: peers[0].endpoint: host name "v6.example" resolves to [2001:db8::6], none of the family of listen 192.0.2.1`},
		{"bad port", "\"[::]\"", "b.example:0", `f.yaml:5: peers[0].endpoint: port 0 is outside 1..65535`},
		{"not a name", "\"[::]\"", "b_x!:1", `f.yaml:5: peers[0].endpoint: "b_x!:1" is neither an IP address nor a host name`},
		// The checks that need the address run on the resolved one.
		{"resolves to own listen address", "192.0.2.1", "self.example", `f.yaml:5: peers[0].endpoint: 192.0.2.1:6082 is this host's listen address`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseResolve("f.yaml", []byte(namedConfig(t, tc.listen, tc.endpoint)), r)
			if strings.Contains(tc.want, "f.yaml:") {
				var fe *FieldError
				if err == nil || !errors.As(err, &fe) || !strings.HasPrefix(err.Error(), tc.want) {
					t.Fatalf("err = %v, want a FieldError starting %q", err, tc.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			p := c.Peers[0]
			if p.Endpoint.String() != tc.want || p.EndpointName != tc.endpoint {
				t.Fatalf("endpoint %v from %q, want %s from %q", p.Endpoint, p.EndpointName, tc.want, tc.endpoint)
			}
		})
	}
}

// TestParseRefusesNames: Parse, used to check a file without side
// effects, resolves nothing and says where names are resolved; an address
// literal has no name.
func TestParseRefusesNames(t *testing.T) {
	_, err := Parse("f.yaml", []byte(namedConfig(t, "\"[::]\"", "b.example:7000")))
	if err == nil || !strings.HasPrefix(err.Error(), `f.yaml:5: peers[0].endpoint: host name "b.example": this check does not resolve names`) {
		t.Fatalf("err = %v", err)
	}
	c, err := Parse("f.yaml", []byte(namedConfig(t, "\"[::]\"", "192.0.2.2")))
	if err != nil || c.Peers[0].EndpointName != "" {
		t.Fatalf("literal: %v, name %q", err, c.Peers[0].EndpointName)
	}
}

// TestLoadResolvesLocalhost runs Load's real resolver on a name every
// system's hosts file has.
func TestLoadResolvesLocalhost(t *testing.T) {
	path := filepath.Join(t.TempDir(), "pspd.yaml")
	if err := os.WriteFile(path, []byte(namedConfig(t, "\"[::]\"", "localhost:7000")), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if a := c.Peers[0].Endpoint; !a.Addr().IsLoopback() || a.Port() != 7000 {
		t.Fatalf("localhost:7000 loaded as %v", a)
	}
	if got := c.Peers[0].EndpointString(); !strings.HasPrefix(got, "localhost:7000 (") {
		t.Fatalf("EndpointString %q", got)
	}
}
