package membership

import (
	"context"
	"time"
)

// Source is a membership service as the daemon uses it. Run publishes
// self, keeps it published while it runs (renewing its liveness, putting
// it back if the store lost it), and calls update with every record the
// service holds (this node's included) each time they change, the first
// time once it has read them all. Unreachable stores are retried; the last
// update stands meanwhile. Run returns when ctx ends, having withdrawn
// self where the store allows.
type Source interface {
	Run(ctx context.Context, self Record, update func([]Record)) error
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
