package daemon

import (
	"context"
	"sync"
	"time"

	"github.com/pspd/pspd/localapi"
)

// hub fans events out to API subscribers. A subscriber that does not keep
// up loses events rather than slowing the daemon down.
type hub struct {
	mu   sync.Mutex
	subs map[chan localapi.Event]struct{}
}

func newHub() *hub { return &hub{subs: map[chan localapi.Event]struct{}{}} }

func (h *hub) subscribe(ctx context.Context) <-chan localapi.Event {
	ch := make(chan localapi.Event, 64)
	h.mu.Lock()
	h.subs[ch] = struct{}{}
	h.mu.Unlock()
	context.AfterFunc(ctx, func() {
		h.mu.Lock()
		delete(h.subs, ch)
		h.mu.Unlock()
		close(ch)
	})
	return ch
}

func (h *hub) publish(e localapi.Event) {
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for ch := range h.subs {
		select {
		case ch <- e:
		default:
		}
	}
}
