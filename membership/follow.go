package membership

import (
	"context"
	"errors"
	"log/slog"
	"time"
)

// ErrRemoved is a session's error when this node's record was deleted by
// someone else while the node published it: an operator removed the node.
var ErrRemoved = errors.New("this node's record was deleted")

// Backoff bounds between sessions that failed.
const (
	minBackoff = time.Second
	maxBackoff = 30 * time.Second
)

// Follow is the loop every source runs: session publishes this node's
// record (when publish is set), reads the service and follows it until it
// fails or ctx ends, and Follow runs it again after a backoff (a second,
// doubling to 30 s; one that ran longer than that starts over). It tracks
// the service's health, warns once per run of failures, and after
// ErrRemoved goes on without publishing, so that the operator's deletion
// stands until pspd restarts.
func Follow(ctx context.Context, log *slog.Logger, health *HealthTracker, session func(ctx context.Context, publish bool) error) {
	backoff, failing, publish := minBackoff, false, true
	for ctx.Err() == nil {
		start := time.Now()
		err := session(ctx, publish)
		if ctx.Err() != nil {
			return
		}
		health.Track(false, err)
		if errors.Is(err, ErrRemoved) {
			log.Warn("this node's record was deleted (an operator removed the node); following the fleet without publishing it again until pspd restarts", "service", health.Health().Service)
			publish = false
			continue
		}
		if time.Since(start) > maxBackoff {
			backoff = minBackoff
		}
		if !failing {
			log.Warn("membership unavailable; keeping the last known peers and retrying", "service", health.Health().Service, "err", err)
		} else {
			log.Debug("membership still unavailable", "err", err)
		}
		failing = true
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
}
