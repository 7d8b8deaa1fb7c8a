package membership

import (
	"context"
	"maps"
	"slices"
	"sync"
	"time"
)

// Source is a membership service as the daemon uses it. Run publishes
// self, keeps it published while it runs (renewing its liveness, putting
// it back if the store lost it, publishing each change), and calls update with every record the
// service holds (this node's included) each time they change, the first
// time once it has read them all. Unreachable stores are retried; the last
// update stands meanwhile. Run returns when ctx ends, having withdrawn
// self where the store allows.
type Source interface {
	Run(ctx context.Context, self *Self, update func([]Record)) error
	// Health is what the source knows of its service now.
	Health() Health
}

// Health is a membership source's connection, for operators.
type Health struct {
	Service   string    // what it talks to, e.g. "etcd https://192.0.2.10:2379"
	Connected bool      // following the service's changes now
	Since     time.Time // when Connected last changed; zero before the first attempt ended
	Err       error     // why it is not connected
}

// HealthTracker keeps a source's Health as it connects and fails; a
// source embeds it for its Health method.
type HealthTracker struct {
	mu sync.Mutex
	h  Health
}

// NewHealthTracker is a tracker for a source that talks to service.
func NewHealthTracker(service string) *HealthTracker {
	return &HealthTracker{h: Health{Service: service}}
}

// Health is the state last tracked.
func (t *HealthTracker) Health() Health {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.h
}

// Track records that the source is connected now, or is not, and why.
func (t *HealthTracker) Track(connected bool, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.h.Connected != connected || t.h.Since.IsZero() {
		t.h.Since = time.Now()
	}
	t.h.Connected, t.h.Err = connected, err
}

// Sorted is a source's records (by whatever key it holds them) in key
// order, for an update.
func Sorted(records map[string]Record) []Record {
	keys := slices.Sorted(maps.Keys(records))
	out := make([]Record, 0, len(keys))
	for _, k := range keys {
		out = append(out, records[k])
	}
	return out
}
