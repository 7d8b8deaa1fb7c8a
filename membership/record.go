// Package membership is pspd's view of a fleet: the record each node
// publishes about itself, the conversion of the others' records into
// peers, and the on-disk cache of the last set known, which a restart
// starts from while the membership service is out of reach.
//
// A record is authenticated by whoever stores it (etcd's client
// certificates and key prefix permissions, Kubernetes' admission), not by
// pspd: a record says which key to pin for a node, and a session then
// authenticates the node by that key. A record that is malformed or
// conflicts with the configured peers is left out, and the reason logged;
// it never takes another peer's place.
package membership

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"path"
	"slices"
	"strings"

	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/policy"
)

// Record is what a node publishes about itself, as JSON.
type Record struct {
	// Name is the node's peer name; the record is stored under it.
	Name string `json:"name"`
	// Endpoints are where the node's key exchange listens; the first is
	// dialed.
	Endpoints []string `json:"endpoints"`
	// PublicKeys are the node's identities (pspd pubkey lines): one, or
	// during its identity rotation the one it presents and the other.
	// Both are pinned.
	PublicKeys []string `json:"public_keys"`
	// Prefixes are the networks the node's traffic comes from.
	Prefixes []string `json:"prefixes"`
	// Backend is the data plane the node wants for its peers ("" or
	// "auto": each side's choice); Suite likewise.
	Backend string `json:"backend,omitempty"`
	Suite   string `json:"suite,omitempty"`
}

// Limits on a record, so that one member cannot make every other node
// hold or parse much.
const (
	MaxRecordBytes = 16 << 10
	maxEndpoints   = 4
	maxKeys        = 2
	maxPrefixes    = 256
)

// Decode parses the record stored at key, whose last element must be the
// record's name: the store's permissions are per key, so a record under
// another node's key is not believed.
func Decode(key string, data []byte) (Record, error) {
	var r Record
	if len(data) > MaxRecordBytes {
		return r, fmt.Errorf("membership: record %s is %d bytes, more than %d", key, len(data), MaxRecordBytes)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&r); err != nil {
		return Record{}, fmt.Errorf("membership: record %s: %w", key, err)
	}
	if dec.More() {
		return Record{}, fmt.Errorf("membership: record %s: data after the JSON object", key)
	}
	if name := path.Base(key); r.Name != name {
		return Record{}, fmt.Errorf("membership: record %s names node %q: a node's record must be stored under its own name", key, r.Name)
	}
	if _, err := r.Peer(); err != nil {
		return Record{}, err
	}
	return r, nil
}

// Encode is the record as stored.
func (r Record) Encode() ([]byte, error) {
	if _, err := r.Peer(); err != nil {
		return nil, err
	}
	return json.Marshal(r)
}

// Peer is the peer the record describes, with what a record alone can
// get wrong refused; the checks against the other peers are
// policy.Config.WithPeers'.
func (r Record) Peer() (policy.Peer, error) {
	fail := func(format string, args ...any) (policy.Peer, error) {
		return policy.Peer{}, fmt.Errorf("membership: record of %q: %s", r.Name, fmt.Sprintf(format, args...))
	}
	if r.Name == "" {
		return fail("no name")
	}
	if n := len(r.Endpoints); n == 0 || n > maxEndpoints {
		return fail("%d endpoints, want 1..%d", n, maxEndpoints)
	}
	if n := len(r.PublicKeys); n == 0 || n > maxKeys {
		return fail("%d public keys, want 1..%d", n, maxKeys)
	}
	if n := len(r.Prefixes); n == 0 || n > maxPrefixes {
		return fail("%d prefixes, want 1..%d", n, maxPrefixes)
	}
	p := policy.Peer{Name: r.Name, Backend: policy.BackendAuto}
	for i, s := range r.Endpoints {
		ap, err := netip.ParseAddrPort(s)
		if err != nil || ap.Port() == 0 || !ap.Addr().IsGlobalUnicast() && !ap.Addr().IsPrivate() && !ap.Addr().IsLoopback() {
			return fail("endpoint %q is not an address:port of a unicast address", s)
		}
		if i == 0 {
			p.Endpoint = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		}
	}
	for i, s := range r.PublicKeys {
		k, err := identity.ParsePublicKey(s)
		if err != nil {
			return fail("public key %d: %v", i, err)
		}
		if i == 0 {
			p.PublicKey = k
		} else {
			p.NextKey = k
		}
	}
	for _, s := range r.Prefixes {
		pf, err := policy.ParsePrefix(s)
		if err != nil {
			return fail("prefix: %v", err)
		}
		p.Prefixes = append(p.Prefixes, pf)
	}
	if r.Backend != "" {
		b, err := policy.ParseBackend(r.Backend)
		if err != nil {
			return fail("backend: %v", err)
		}
		p.Backend = b
	}
	if r.Suite != "" {
		s, err := kdf.ParseSuite(r.Suite)
		if err != nil {
			return fail("suite: %v", err)
		}
		p.Suite = s
	}
	return p, nil
}

// Peers converts the records of the other nodes into peers, sorted by
// name (so that conflicts between records resolve the same way on every
// node). self is this node's name; its own record is skipped. Records
// that do not convert are left out, with the reason in refused.
func Peers(records []Record, self string) (peers []policy.Peer, refused []error) {
	rs := slices.Clone(records)
	slices.SortFunc(rs, func(a, b Record) int { return strings.Compare(a.Name, b.Name) })
	for _, r := range rs {
		if r.Name == self {
			continue
		}
		p, err := r.Peer()
		if err != nil {
			refused = append(refused, err)
			continue
		}
		peers = append(peers, p)
	}
	return peers, refused
}
