package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/membership"
	"github.com/pspd/pspd/membership/etcd"
	"github.com/pspd/pspd/membership/kube"
	"github.com/pspd/pspd/policy"
)

// Fleet is this host's membership in a fleet: the peers a membership
// service reports join the file's (the file wins by name) through the
// reload path, so that an added, changed or removed member is handled like
// a peer edited in the file, make-before-break. A member that leaves keeps
// its fail-closed state (a lease can lapse while the node is alive: its
// traffic must not go out in clear meanwhile). The last membership is
// cached on disk, so a restart while the service is unreachable starts
// from it.
type Fleet struct {
	src   membership.Source
	disc  *policy.Discovery
	log   *slog.Logger
	mu    sync.Mutex
	known []membership.Record // the last membership, this node's record included
	// selfRec is this node's record as published; the identity rotation
	// changes it.
	selfRec *membership.Self
	said    []string // the refusals last logged, to log each set once
}

// NewFleet is the membership of the host pc configures, starting from the
// cache. src is the membership service pc.Discovery names.
func NewFleet(pc *policy.Config, src membership.Source, log *slog.Logger) (*Fleet, error) {
	if pc.Discovery == nil {
		return nil, fmt.Errorf("%s: no discovery block", pc.File)
	}
	f := &Fleet{src: src, disc: pc.Discovery, log: log.With("part", "fleet")}
	rs, err := membership.LoadCache(pc.Discovery.Cache)
	if err != nil {
		f.log.Warn("membership cache unreadable; starting from the file's peers alone until the membership service answers", "err", err)
	}
	f.known = rs
	return f, nil
}

// Merge is file with the members' peers added, and the names of those.
func (f *Fleet) Merge(file *policy.Config) (*policy.Config, map[string]bool) {
	return f.merge(file, nil)
}

// merge is Merge without the members in out, which a backend refused
// (the reason is the value).
func (f *Fleet) merge(file *policy.Config, out map[string]error) (*policy.Config, map[string]bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	peers, bad := membership.Peers(f.known, f.disc.Node)
	peers = slices.DeleteFunc(peers, func(p policy.Peer) bool {
		if err := out[p.Name]; err != nil {
			bad = append(bad, err)
			return true
		}
		return false
	})
	merged, refused := file.WithPeers(peers)
	members := map[string]bool{}
	for _, p := range merged.Peers {
		if _, ok := file.Peer(p.Name); !ok {
			members[p.Name] = true
		}
	}
	var msgs []string
	for _, err := range append(bad, refused...) {
		msgs = append(msgs, err.Error())
	}
	if !slices.Equal(msgs, f.said) {
		f.said = msgs
		for _, m := range msgs {
			f.log.Warn("a member is left out", "reason", m)
		}
	}
	return merged, members
}

// status is the fleet's part of pspctl status; members is how many peers
// in force come from it.
func (f *Fleet) status(members int) *localapi.Fleet {
	h := f.src.Health()
	f.mu.Lock()
	st := &localapi.Fleet{Node: f.disc.Node, Service: h.Service, Connected: h.Connected, Since: h.Since, Members: members,
		LeftOut: slices.Clone(f.said)}
	f.mu.Unlock()
	if h.Err != nil {
		st.Error = h.Err.Error()
	}
	return st
}

// self is this host's record, with its identities.
func (f *Fleet) self(keys []identity.PublicKey) membership.Record {
	r := membership.Record{Name: f.disc.Node, Endpoints: []string{f.disc.Endpoint.String()}}
	for _, k := range keys {
		r.PublicKeys = append(r.PublicKeys, k.String())
	}
	for _, pf := range f.disc.Prefixes {
		r.Prefixes = append(r.Prefixes, pf.String())
	}
	return r
}

// runFleet publishes this host and follows the membership until ctx ends.
// It starts after New has installed every configured peer's state, so a
// host is announced only once it can receive.
func (d *Daemon) runFleet(ctx context.Context) {
	defer d.wg.Done()
	f := d.fleet
	err := f.src.Run(ctx, f.selfRec, func(rs []membership.Record) {
		if err := membership.SaveCache(f.disc.Cache, rs); err != nil {
			f.log.Warn("membership cache not written; a restart while the service is unreachable would start from an older one", "err", err)
		}
		f.mu.Lock()
		f.known = slices.Clone(rs)
		f.mu.Unlock()
		d.fmu.Lock()
		defer d.fmu.Unlock()
		if ctx.Err() != nil {
			return
		}
		d.mu.Lock()
		file := d.file
		d.mu.Unlock()
		if err := d.applyMembers(file); err != nil {
			f.log.Warn("membership change not applied", "err", err)
		}
	})
	if err != nil {
		f.log.Error("membership stopped; the peers known stay", "err", err)
	}
}

// applyMembers reloads file with the fleet's members. A member that makes
// the reload fail (a backend refuses it) is left out, with the reason,
// and the rest applied: one bad record must not hold the whole fleet's
// changes back. Callers hold d.fmu.
func (d *Daemon) applyMembers(file *policy.Config) error {
	out := map[string]error{}
	for {
		merged, members := d.fleet.merge(file, out)
		err := d.reload(merged, members)
		var pf *peerFailed
		if !errors.As(err, &pf) || !members[pf.name] || out[pf.name] != nil {
			return err
		}
		out[pf.name] = pf.err
	}
}

// retire takes a peer that left the fleet out of the daemon and leaves its
// fail-closed state in the backends that hold it, for attach to take over
// if it comes back. Callers hold d.mu.
func (d *Daemon) retire(name string) {
	p := d.peers[name]
	if p == nil {
		return
	}
	p.bmu.Lock()
	var held []assoc.Backend
	for b := range p.on {
		held = append(held, b)
	}
	p.bmu.Unlock()
	d.removePeer(name, false)
	d.kmu.Lock()
	d.retained[p.key] = held
	d.kmu.Unlock()
	const why = "left the fleet; its fail-closed state stays"
	d.log.Info("peer "+why, "peer", name)
	d.events.publish(localapi.Event{Kind: localapi.EventPeerRemoved, Peer: name, Detail: why})
}

// reclaim reports whether backend b still holds the peer with key from
// before it left the fleet, and forgets it: the caller updates that state
// rather than adding it again.
func (d *Daemon) reclaim(key identity.PublicKey, b assoc.Backend) bool {
	d.kmu.Lock()
	defer d.kmu.Unlock()
	held := d.retained[key]
	i := slices.Index(held, b)
	if i < 0 {
		return false
	}
	held = slices.Delete(held, i, i+1)
	if len(held) == 0 {
		delete(d.retained, key)
	} else {
		d.retained[key] = held
	}
	return true
}

// MembershipSource is the membership service d configures, with its
// files loaded.
func MembershipSource(d *policy.Discovery, log *slog.Logger) (membership.Source, error) {
	if k := d.Kubernetes; k != nil {
		return kube.New(kube.Config{Server: k.Server, TokenFile: k.TokenFile, CAFile: k.CA, Logger: log})
	}
	return etcdSource(d.Etcd, log)
}

func etcdSource(e *policy.Etcd, log *slog.Logger) (membership.Source, error) {
	cfg := etcd.Config{Endpoints: e.Endpoints, Prefix: e.Prefix, Lease: e.Lease, Logger: log}
	if e.Cert != "" || e.CA != "" {
		t := &tls.Config{MinVersion: tls.VersionTLS12}
		if e.Cert != "" {
			pair, err := tls.LoadX509KeyPair(e.Cert, e.Key)
			if err != nil {
				return nil, fmt.Errorf("discovery.etcd: client certificate %s, key %s: %w", e.Cert, e.Key, err)
			}
			t.Certificates = []tls.Certificate{pair}
		}
		if e.CA != "" {
			pem, err := os.ReadFile(e.CA)
			if err != nil {
				return nil, fmt.Errorf("discovery.etcd.ca: %w", err)
			}
			t.RootCAs = x509.NewCertPool()
			if !t.RootCAs.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("discovery.etcd.ca: %s holds no PEM certificate", e.CA)
			}
		}
		cfg.TLS = t
	}
	return etcd.New(cfg)
}
