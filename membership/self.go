package membership

import "sync"

// Self is this node's record as a source publishes it. It changes while
// the source runs when the node's identity rotates (two keys, then the new
// one alone); the source publishes each change.
type Self struct {
	mu      sync.Mutex
	r       Record
	changed chan struct{}
}

// NewSelf is a Self publishing r.
func NewSelf(r Record) (*Self, error) {
	if _, err := r.Encode(); err != nil {
		return nil, err
	}
	return &Self{r: r, changed: make(chan struct{})}, nil
}

// Get is the record now, and a channel closed when it changes.
func (s *Self) Get() (Record, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.r, s.changed
}

// Set changes the record, which must keep its name.
func (s *Self) Set(r Record) error {
	if _, err := r.Encode(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.Name != s.r.Name {
		return &renameError{from: s.r.Name, to: r.Name}
	}
	s.r = r
	close(s.changed)
	s.changed = make(chan struct{})
	return nil
}

type renameError struct{ from, to string }

func (e *renameError) Error() string {
	return "membership: this node's record cannot change its name from " + e.from + " to " + e.to
}
