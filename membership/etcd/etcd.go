// Package etcd is a membership.Source on etcd v3, for fleets without
// Kubernetes: each node's record is a key under a prefix
// (prefix + node name), attached to a lease that the node keeps alive, so
// that a node that stops or dies leaves the fleet when its lease expires.
// A node should be allowed (etcd role permissions) to write only its own
// key and to read the prefix; with TLS client certificates, etcd knows
// each node by its certificate's common name.
package etcd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/pspd/pspd/membership"
)

// Config says where the records are and how to reach etcd.
type Config struct {
	Endpoints []string // client URLs, https:// with TLS
	Prefix    string   // key prefix of the records, ending in "/"
	TLS       *tls.Config
	// Lease is how long a node's record outlives its last renewal (the
	// etcd lease TTL); 0 means 30s.
	Lease  time.Duration
	Logger *slog.Logger
}

// Source is the etcd membership source.
type Source struct {
	cfg Config
	log *slog.Logger
	*membership.HealthTracker
}

var _ membership.Source = (*Source)(nil)

// New checks cfg; it does not connect (Run does, and retries).
func New(cfg Config) (*Source, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("etcd: no endpoints")
	}
	if !strings.HasSuffix(cfg.Prefix, "/") || cfg.Prefix == "/" {
		return nil, fmt.Errorf("etcd: prefix %q must be a key path ending in /, such as /pspd/nodes/", cfg.Prefix)
	}
	if cfg.Lease == 0 {
		cfg.Lease = 30 * time.Second
	}
	if cfg.Lease < 5*time.Second {
		return nil, fmt.Errorf("etcd: lease %v is shorter than 5s", cfg.Lease)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Source{cfg: cfg, log: cfg.Logger.With("part", "etcd")}
	s.HealthTracker = membership.NewHealthTracker("etcd " + strings.Join(cfg.Endpoints, ","))
	return s, nil
}

// dialTimeout bounds each call to etcd.
const dialTimeout = 5 * time.Second

// Run implements membership.Source.
func (s *Source) Run(ctx context.Context, self *membership.Self, update func([]membership.Record)) error {
	c, err := clientv3.New(clientv3.Config{
		Endpoints: s.cfg.Endpoints, TLS: s.cfg.TLS, DialTimeout: dialTimeout, Context: ctx,
		Logger: zap.NewNop(),
	})
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	defer c.Close()
	membership.Follow(ctx, s.log, s.HealthTracker, func(ctx context.Context, publish bool) error {
		return s.session(ctx, c, self, publish, update)
	})
	return nil
}

// session publishes the record under a new lease (if publish), reads the
// prefix and follows it until the lease is lost, the watch fails or ctx
// ends.
func (s *Source) session(ctx context.Context, c *clientv3.Client, self *membership.Self, publish bool, update func([]membership.Record)) error {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	call := func() (context.Context, context.CancelFunc) { return context.WithTimeout(sctx, dialTimeout) }
	r, changed := self.Get()
	key := s.cfg.Prefix + r.Name
	var lease clientv3.LeaseID
	put := func(r membership.Record) error {
		value, err := r.Encode()
		if err != nil {
			return err
		}
		cctx, ccancel := call()
		_, err = c.Put(cctx, key, string(value), clientv3.WithLease(lease))
		ccancel()
		if err != nil {
			return fmt.Errorf("publish %s: %w", key, err)
		}
		return nil
	}
	var alive <-chan *clientv3.LeaseKeepAliveResponse
	if publish {
		cctx, ccancel := call()
		g, err := c.Grant(cctx, int64(s.cfg.Lease/time.Second))
		ccancel()
		if err != nil {
			return fmt.Errorf("grant a lease: %w", err)
		}
		lease = g.ID
		defer func() {
			// When pspd stops, leave at once, not only when the lease
			// expires. A session that failed while pspd goes on leaves
			// the lease to run out instead: the next one publishes under
			// a new lease, and the record stands meanwhile, so that a
			// slow or briefly unreachable etcd does not take the node out
			// of every other's configuration and back in (seen with 128
			// nodes on two CPUs: each Get or Put that timed out made every
			// other node drop the node's associations and, once it was
			// back, negotiate them again).
			if ctx.Err() == nil {
				return
			}
			rctx, rcancel := context.WithTimeout(context.Background(), 2*time.Second)
			c.Revoke(rctx, lease)
			rcancel()
		}()
		if alive, err = c.KeepAlive(sctx, lease); err != nil {
			return fmt.Errorf("keep the lease alive: %w", err)
		}
		if err := put(r); err != nil {
			return err
		}
	} else {
		changed = nil // the operator's deletion stands
	}
	cctx, ccancel := call()
	resp, err := c.Get(cctx, s.cfg.Prefix, clientv3.WithPrefix())
	ccancel()
	if err != nil {
		return fmt.Errorf("read %s: %w", s.cfg.Prefix, err)
	}
	records := map[string]membership.Record{}
	for _, kv := range resp.Kvs {
		s.put(records, string(kv.Key), kv.Value)
	}
	s.log.Info("etcd: membership read", "prefix", s.cfg.Prefix, "records", len(records), "published", publish)
	s.Track(true, nil)
	update(membership.Sorted(records))
	watch := c.Watch(clientv3.WithRequireLeader(sctx), s.cfg.Prefix, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case _, ok := <-alive:
			if !ok {
				return errors.New("the lease was lost")
			}
		case <-changed:
			r, changed = self.Get()
			if err := put(r); err != nil {
				return err
			}
			s.log.Info("etcd: this node's record changed; published", "key", key)
		case wr, ok := <-watch:
			if !ok {
				return errors.New("the watch ended")
			}
			if err := wr.Err(); err != nil {
				return fmt.Errorf("watch %s: %w", s.cfg.Prefix, err)
			}
			for _, ev := range wr.Events {
				k := string(ev.Kv.Key)
				if ev.Type == clientv3.EventTypeDelete {
					delete(records, k)
					if k == key && publish && s.leaseAlive(sctx, c, lease) {
						update(membership.Sorted(records))
						return membership.ErrRemoved
					}
					continue
				}
				s.put(records, k, ev.Kv.Value)
			}
			update(membership.Sorted(records))
		}
	}
}

// leaseAlive reports whether lease still has time left: if it has, the
// record under it was deleted by someone, not expired.
func (s *Source) leaseAlive(ctx context.Context, c *clientv3.Client, lease clientv3.LeaseID) bool {
	cctx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	r, err := c.TimeToLive(cctx, lease)
	return err == nil && r.TTL > 0
}

// put records the value of key, or forgets the key if its value is not a
// record: a malformed record is out of the fleet, not a reason to stop.
func (s *Source) put(records map[string]membership.Record, key string, value []byte) {
	if strings.Contains(strings.TrimPrefix(key, s.cfg.Prefix), "/") {
		// Not a node's key: one under it could otherwise pass for the
		// node its last element names.
		delete(records, key)
		s.log.Warn("etcd: key below the prefix's node keys ignored", "key", key)
		return
	}
	r, err := membership.Decode(key, value)
	if err != nil {
		delete(records, key)
		s.log.Warn("etcd: record ignored", "key", key, "err", err)
		return
	}
	records[key] = r
}
