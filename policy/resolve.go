package policy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Resolver looks up the addresses of a host name; *net.Resolver is one.
// Load uses net.DefaultResolver (which reads /etc/hosts first); Parse has
// none and refuses host names, so that checking a file never waits on
// the network.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// resolveTimeout bounds the look-up of one endpoint name at load.
const resolveTimeout = 5 * time.Second

// hostName is an RFC 1123 host name: dot-separated labels of letters,
// digits and inner hyphens.
var hostName = regexp.MustCompile(`^([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$`)

// endpoint parses a peer's endpoint: an IP address or a host name, with an
// optional port. A name is resolved now; name is what the file says ("" for
// an address literal) so that a reload can resolve it again. With a
// specific listen address the name must have an address of its family.
func (p parser) endpoint(n *yaml.Node, field string, listen netip.AddrPort) (ap netip.AddrPort, name string, err error) {
	s, err := p.str(n, field)
	if err != nil {
		return netip.AddrPort{}, "", err
	}
	host, port := s, uint16(DefaultListenPort)
	if h, ps, err := net.SplitHostPort(s); err == nil {
		v, err := strconv.ParseUint(ps, 10, 16)
		if err != nil && !errors.Is(err, strconv.ErrRange) {
			return netip.AddrPort{}, "", p.fail(n, field, "port %q in %q is not a number in 1..65535", ps, s)
		}
		if err != nil || v == 0 {
			return netip.AddrPort{}, "", p.fail(n, field, "port %s is outside 1..65535", ps)
		}
		host, port = h, uint16(v)
	}
	if _, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")); err == nil {
		ap, err := p.addrPort(n, field, DefaultListenPort)
		return ap, "", err
	}
	if !hostName.MatchString(host) || len(host) > 253 {
		return netip.AddrPort{}, "", p.fail(n, field, "%q is neither an IP address nor a host name, with optional :port", s)
	}
	if p.resolve == nil {
		return netip.AddrPort{}, "", p.fail(n, field, "host name %q: this check does not resolve names (pspd resolves them when it loads the file); give an IP address here", host)
	}
	ctx, cancel := context.WithTimeout(context.Background(), resolveTimeout)
	defer cancel()
	ap, err = resolve(ctx, p.resolve, host, port, listen)
	if err != nil {
		return netip.AddrPort{}, "", p.fail(n, field, "%v", err)
	}
	return ap, s, nil
}

// resolve looks host up and returns its first address of listen's family
// (any family for a wildcard listen) with port.
func resolve(ctx context.Context, r Resolver, host string, port uint16, listen netip.AddrPort) (netip.AddrPort, error) {
	addrs, err := r.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("cannot resolve host name %q: %v; fix the name or the resolver (/etc/hosts, DNS), or give the peer's IP address", host, err)
	}
	want4, want6 := true, true
	if l := listen.Addr(); !l.IsUnspecified() {
		want4, want6 = l.Unmap().Is4(), l.Unmap().Is6()
	}
	for _, a := range addrs {
		a = a.Unmap()
		if (a.Is4() && want4) || (a.Is6() && want6) {
			return netip.AddrPortFrom(a, port), nil
		}
	}
	if len(addrs) == 0 {
		return netip.AddrPort{}, fmt.Errorf("host name %q resolves to no address; fix the name or the resolver, or give the peer's IP address", host)
	}
	return netip.AddrPort{}, fmt.Errorf("host name %q resolves to %v, none of the family of listen %v; listen on [::] or give an address of that family", host, addrs, listen.Addr())
}

// Resolve looks the peer's endpoint name up again, as Load did, and
// returns the endpoint it names now; a peer given by address is its
// endpoint.
func (p Peer) Resolve(ctx context.Context, r Resolver, listen netip.AddrPort) (netip.AddrPort, error) {
	if p.EndpointName == "" {
		return p.Endpoint, nil
	}
	host := p.EndpointName
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	return resolve(ctx, r, host, p.Endpoint.Port(), listen)
}

// ParseResolve is Parse with host-name endpoints resolved by r.
func ParseResolve(file string, data []byte, r Resolver) (*Config, error) {
	return parse(parser{file: file, lines: map[string]int{}, maxLine: maxLine(data), resolve: r}, data)
}

// EndpointString shows where a peer is: its endpoint, and the name it was
// resolved from if the file gives one.
func (p Peer) EndpointString() string {
	if p.EndpointName == "" {
		return p.Endpoint.String()
	}
	return fmt.Sprintf("%s (%v)", p.EndpointName, p.Endpoint)
}
