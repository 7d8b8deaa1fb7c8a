// Package membershiptest runs a membership.Source in a test, as the
// daemon would, and records what it reports.
package membershiptest

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/pspd/pspd/membership"
)

// Node is a running Source.
type Node struct {
	Source  membership.Source
	mu      sync.Mutex
	names   []string // of the last update
	updates int
	changed chan struct{}
	cancel  context.CancelFunc
	done    chan struct{}
}

// Run runs src publishing self until Stop or the end of the test.
func Run(t testing.TB, src membership.Source, self membership.Record) *Node {
	s, err := membership.NewSelf(self)
	if err != nil {
		t.Fatal(err)
	}
	return RunSelf(t, src, s)
}

// RunSelf is Run with a Self the test may change.
func RunSelf(t testing.TB, src membership.Source, self *membership.Self) *Node {
	n := &Node{Source: src, changed: make(chan struct{}, 1), done: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	n.cancel = cancel
	go func() {
		defer close(n.done)
		src.Run(ctx, self, func(rs []membership.Record) {
			n.mu.Lock()
			n.names = n.names[:0]
			for _, r := range rs {
				n.names = append(n.names, r.Name)
			}
			n.updates++
			n.mu.Unlock()
			select {
			case n.changed <- struct{}{}:
			default:
			}
		})
	}()
	t.Cleanup(n.Stop)
	return n
}

// Stop ends Run and waits for it (idempotent).
func (n *Node) Stop() {
	n.cancel()
	<-n.done
}

// Updates is how many updates the source made.
func (n *Node) Updates() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.updates
}

// Names are the record names of the last update.
func (n *Node) Names() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.names)
}

// WaitFor waits until the last update names exactly want, at most d.
func (n *Node) WaitFor(d time.Duration, want ...string) error {
	deadline := time.After(d)
	for {
		if got := n.Names(); slices.Equal(got, want) {
			return nil
		}
		select {
		case <-n.changed:
		case <-deadline:
			return &WaitError{Got: n.Names(), Want: want}
		}
	}
}

// WaitError is a WaitFor that timed out.
type WaitError struct{ Got, Want []string }

func (e *WaitError) Error() string {
	return fmt.Sprintf("membershiptest: records %v, want %v", e.Got, e.Want)
}

// Log collects a source's log lines for a test's checks.
type Log struct {
	mu sync.Mutex
	b  bytes.Buffer
}

// Logger writes text lines to l.
func (l *Log) Logger() *slog.Logger { return slog.New(slog.NewTextHandler(l, nil)) }

func (l *Log) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// String is everything logged so far.
func (l *Log) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
