package policy

import (
	"fmt"
	"slices"
)

// Diff is what a reload changes. Peers in Changed carry their new settings;
// the daemon replaces their associations. Settings is the new global
// configuration (rekey interval, budgets, encryption requirement) to adopt.
type Diff struct {
	Added, Removed, Changed []Peer
	Settings                *Config
}

// Empty reports whether applying the diff would change nothing.
func (d *Diff) Empty() bool {
	return len(d.Added) == 0 && len(d.Removed) == 0 && len(d.Changed) == 0
}

func discoveryString(d *Discovery) string {
	if d == nil {
		return "none"
	}
	c := *d
	var e Etcd
	var k Kubernetes
	if c.Etcd != nil {
		e = *c.Etcd
	}
	if c.Kubernetes != nil {
		k = *c.Kubernetes
	}
	c.Etcd, c.Kubernetes = nil, nil
	return fmt.Sprintf("%+v %+v %+v", c, e, k)
}

// Reload computes the changes from cur to next. Settings that only take
// effect at start (identity, listen address, sockets) make the whole reload
// fail, with a FieldError at the setting's line in next: applying part of
// a file would leave the daemon running a configuration that is in no
// file.
func Reload(cur, next *Config) (*Diff, error) {
	for _, f := range []struct {
		name      string
		old, new_ string
	}{
		{"identity", cur.Identity, next.Identity},
		{"listen", cur.Listen.String(), next.Listen.String()},
		{"socket", cur.Socket, next.Socket},
		{"metrics", cur.Metrics, next.Metrics},
		{"userspace", fmt.Sprintf("%+v", cur.Userspace), fmt.Sprintf("%+v", next.Userspace)},
		{"discovery", discoveryString(cur.Discovery), discoveryString(next.Discovery)},
	} {
		if f.old != f.new_ {
			// Line 0 (left out) when the new file takes the default.
			return nil, &FieldError{File: next.File, Line: next.Line(f.name), Field: f.name,
				Err: fmt.Errorf("changed from %q to %q, which needs a restart of pspd; reload refused, nothing was applied", f.old, f.new_)}
		}
	}
	d := &Diff{Settings: next}
	for _, np := range next.Peers {
		op, ok := cur.Peer(np.Name)
		switch {
		case !ok:
			d.Added = append(d.Added, np)
		case !peerEqual(op, np):
			d.Changed = append(d.Changed, np)
		}
	}
	for _, op := range cur.Peers {
		if _, ok := next.Peer(op.Name); !ok {
			d.Removed = append(d.Removed, op)
		}
	}
	return d, nil
}

func peerEqual(a, b Peer) bool {
	return a.Endpoint == b.Endpoint && a.PublicKey == b.PublicKey && a.NextKey == b.NextKey &&
		slices.Equal(a.Prefixes, b.Prefixes) && a.Backend == b.Backend && a.Suite == b.Suite
}
