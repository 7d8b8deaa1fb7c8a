package policy

import (
	"fmt"
	"net/netip"

	"github.com/pspd/pspd/keyexchange/identity"
)

// PeerError says why a peer cannot join the others: the field at fault
// (of Peer, which may be an already accepted peer whose prefix would
// capture the newcomer's endpoint), relative to that peer ("name",
// "public_key", "endpoint", "prefixes[1]").
type PeerError struct {
	Peer  string
	Field string
	Err   error
}

func (e *PeerError) Error() string { return fmt.Sprintf("peer %q: %s: %v", e.Peer, e.Field, e.Err) }

func (e *PeerError) Unwrap() error { return e.Err }

// admit checks pr against c's own addresses and the peers accepted before
// it. These are the checks that need more than the peer itself; the file's
// peers and discovered ones (WithPeers) pass the same ones, in order.
func (c *Config) admit(accepted []Peer, pr Peer) *PeerError {
	fail := func(peer, field, format string, args ...any) *PeerError {
		return &PeerError{Peer: peer, Field: field, Err: fmt.Errorf(format, args...)}
	}
	if !peerName.MatchString(pr.Name) {
		return fail(pr.Name, "name", "%s", badName(pr.Name))
	}
	if !pr.Endpoint.IsValid() || pr.PublicKey.IsZero() {
		return fail(pr.Name, "endpoint", "a peer needs an endpoint and a public key")
	}
	if len(pr.Prefixes) > maxPrefixesPerPeer {
		return fail(pr.Name, "prefixes", "%d prefixes is more than the limit of %d", len(pr.Prefixes), maxPrefixesPerPeer)
	}
	if pr.NextKey == pr.PublicKey {
		return fail(pr.Name, "next_public_key", "is the same key as public_key")
	}
	for _, o := range accepted {
		switch {
		case o.Name == pr.Name:
			return fail(pr.Name, "name", "%q is already the name of another peer", pr.Name)
		case sharesKey(o, pr.PublicKey):
			return fail(pr.Name, "public_key", "the same key is pinned for peer %q", o.Name)
		case !pr.NextKey.IsZero() && sharesKey(o, pr.NextKey):
			return fail(pr.Name, "next_public_key", "the same key is pinned for peer %q", o.Name)
		case o.Endpoint == pr.Endpoint:
			// One pspd, one identity: the two could not both be right.
			return fail(pr.Name, "endpoint", "%v is already the endpoint of peer %q", pr.Endpoint, o.Name)
		}
	}
	if l := c.Listen; !l.Addr().IsUnspecified() && underlay(pr.Endpoint.Addr()) == underlay(l.Addr()) && pr.Endpoint.Port() == l.Port() {
		return fail(pr.Name, "endpoint", "%v is this host's listen address; give the peer's own address", pr.Endpoint)
	}
	for j, pf := range pr.Prefixes {
		f := fmt.Sprintf("prefixes[%d]", j)
		if err := c.ownUnderlay(pr, pf); err != nil {
			return &PeerError{Peer: pr.Name, Field: f, Err: err}
		}
		for _, o := range accepted {
			for _, opf := range o.Prefixes {
				if opf.Overlaps(pf) {
					return fail(pr.Name, f, "%v overlaps %v of peer %q: traffic must map to one peer", pf, opf, o.Name)
				}
			}
		}
	}
	// A prefix must not hold another peer's endpoint either: that peer's
	// outer packets would be routed into this peer's tunnel, so it would
	// depend on this one being up and never come back on its own.
	for _, o := range accepted {
		if err := endpointCaptured(pr, o); err != nil {
			return err
		}
		if err := endpointCaptured(o, pr); err != nil {
			return err
		}
	}
	return nil
}

func badName(name string) string {
	return fmt.Sprintf("%q must be lower-case letters, digits, '.' and '-' (at most 63)", name)
}

// endpointCaptured refuses a prefix of owner that holds other's endpoint.
func endpointCaptured(owner, other Peer) *PeerError {
	for j, pf := range owner.Prefixes {
		if containsAddr(pf, other.Endpoint.Addr()) {
			return &PeerError{Peer: owner.Name, Field: fmt.Sprintf("prefixes[%d]", j), Err: fmt.Errorf(
				"%v contains the endpoint %v of peer %q, whose tunnel's own packets would then be routed into peer %q's tunnel; narrow the prefix to leave %v out",
				pf, other.Endpoint.Addr(), other.Name, owner.Name, other.Endpoint.Addr())}
		}
	}
	return nil
}

// ownUnderlay refuses a prefix that would route pspd's own packets to pr
// (or from this host) into pr's tunnel. The one exception is the peer's
// endpoint as its only prefix: XFRM transport mode protects exactly that
// address, and pspd's control socket bypasses the policies.
func (c *Config) ownUnderlay(pr Peer, pf netip.Prefix) error {
	if pf.Bits() == 0 {
		return fmt.Errorf("%v is a default route: it would also carry pspd's own packets to the peers' endpoints, and pspd does not do full-tunnel routing; list the networks behind peer %q instead", pf, pr.Name)
	}
	ep := underlay(pr.Endpoint.Addr())
	if containsAddr(pf, ep) {
		host := netip.PrefixFrom(ep, ep.BitLen())
		if pf != host || len(pr.Prefixes) > 1 {
			return fmt.Errorf("%v contains peer %q's endpoint %v, so the tunnel's own packets would be routed into the tunnel and the peer would never come back; narrow the prefix to leave %v out (or, for xfrm transport mode, list only the endpoint address)", pf, pr.Name, ep, ep)
		}
		if pr.Backend.OrDefault(c.Backend) == BackendUserspace {
			return fmt.Errorf("%v is peer %q's endpoint: the userspace backend would route its own outer packets into %s; it protects the networks behind a peer, so list those (transport mode needs backend: xfrm)", pf, pr.Name, c.Userspace.Interface)
		}
	}
	if l := c.Listen.Addr(); !l.IsUnspecified() && containsAddr(pf, l) {
		return fmt.Errorf("%v contains this host's listen address %v, so pspd's own packets would be routed into the tunnel; narrow the prefix to leave %v out", pf, underlay(l), underlay(l))
	}
	return nil
}

// WithPeers is c with extra peers (from a fleet's membership) after its
// own, each admitted by the checks the file's peers pass: a peer whose
// name is already c's keeps c's (the file wins), and one that conflicts
// with the peers before it is left out, with the reason in refused. c is
// not changed.
func (c *Config) WithPeers(extra []Peer) (merged *Config, refused []error) {
	m := *c
	m.Peers = append([]Peer(nil), c.Peers...)
	for _, pr := range extra {
		if _, ok := c.Peer(pr.Name); ok {
			continue
		}
		if len(m.Peers) >= maxPeers {
			refused = append(refused, &PeerError{Peer: pr.Name, Field: "name", Err: fmt.Errorf("the limit of %d peers is reached", maxPeers)})
			continue
		}
		if pr.Suite == 0 {
			pr.Suite = c.Suite
		}
		if pr.Backend == "" {
			pr.Backend = BackendAuto
		}
		if err := c.admit(m.Peers, pr); err != nil {
			refused = append(refused, err)
			continue
		}
		m.Peers = append(m.Peers, pr)
	}
	return &m, refused
}

// ParsePrefix parses a peer prefix: a prefix without host bits, or an
// address, which stands for itself alone.
func ParsePrefix(s string) (netip.Prefix, error) {
	pf, err := netip.ParsePrefix(s)
	if err != nil {
		a, aerr := netip.ParseAddr(s)
		if aerr != nil {
			return netip.Prefix{}, fmt.Errorf("%q is not an address or prefix", s)
		}
		pf = netip.PrefixFrom(a, a.BitLen())
	}
	if pf != pf.Masked() {
		return netip.Prefix{}, fmt.Errorf("%v has host bits set; did you mean %v?", pf, pf.Masked())
	}
	return pf, nil
}

// sharesKey reports whether k is one of o's keys.
func sharesKey(o Peer, k identity.PublicKey) bool { return o.PublicKey == k || o.NextKey == k }
