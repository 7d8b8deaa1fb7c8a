package daemon

import (
	"context"
	"net/netip"
	"slices"
	"time"

	"github.com/pspd/pspd/policy"
)

// Endpoint names are resolved when the file is loaded (package policy)
// and again while pspd runs: every ResolveInterval, and at most a minute
// apart for a peer that is not up, since a peer that moved is one that
// cannot be reached. A name that resolves elsewhere re-negotiates the
// peer at the new address, as a reload that changed its endpoint would;
// a name that stops resolving keeps the address it had.

// resolveTick is how often the resolver looks for names that are due.
const resolveTick = 10 * time.Second

// resolveWhileDown bounds the interval for a peer that is not up.
const resolveWhileDown = time.Minute

// resolveTimeout bounds one look-up.
const resolveTimeout = 5 * time.Second

// resolving is a named peer's re-resolution state; guarded by Daemon.mu.
type resolving struct {
	at     time.Time // of the latest look-up (the load's, at first)
	failed bool      // the latest look-up failed, and that was logged
}

func (d *Daemon) resolveLoop(ctx context.Context) {
	defer d.wg.Done()
	t := time.NewTimer(resolveTick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		d.resolveDue(ctx, time.Now())
		t.Reset(resolveTick)
	}
}

// resolveDue looks up every endpoint name that is due and moves the
// peers whose name now resolves elsewhere.
func (d *Daemon) resolveDue(ctx context.Context, now time.Time) {
	type due struct {
		pc     policy.Peer
		listen netip.AddrPort
	}
	var todo []due
	d.mu.Lock()
	for _, p := range d.sortedPeers() {
		if p.cfg.EndpointName == "" {
			continue
		}
		every := d.cfg.ResolveInterval
		if !p.kx.Status().Up {
			every = min(every, resolveWhileDown)
		}
		if now.Sub(p.resolve.at) >= every {
			p.resolve.at = now
			todo = append(todo, due{p.cfg, d.cfg.Listen})
		}
	}
	d.mu.Unlock()
	for _, t := range todo {
		lctx, cancel := context.WithTimeout(ctx, resolveTimeout)
		ap, err := t.pc.Resolve(lctx, d.resolver, t.listen)
		cancel()
		d.resolved(t.pc, ap, err)
	}
}

// resolved applies one look-up of pc's endpoint name.
func (d *Daemon) resolved(pc policy.Peer, ap netip.AddrPort, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	p := d.peers[pc.Name]
	if p == nil || p.cfg.EndpointName != pc.EndpointName {
		return // removed or changed by a reload meanwhile
	}
	if err != nil {
		if !p.resolve.failed {
			d.log.Warn("peer's endpoint name no longer resolves; keeping its last address", "peer", pc.Name, "endpoint", p.cfg.EndpointString(), "err", err)
		}
		p.resolve.failed = true
		return
	}
	if p.resolve.failed {
		d.log.Info("peer's endpoint name resolves again", "peer", pc.Name, "endpoint", p.cfg.EndpointName, "address", ap)
		p.resolve.failed = false
	}
	if ap == p.cfg.Endpoint {
		return
	}
	prev := d.cfg
	i := slices.IndexFunc(prev.Peers, func(q policy.Peer) bool { return q.Name == pc.Name })
	if i < 0 {
		return
	}
	d.log.Info("peer's endpoint name resolves to a new address; re-negotiating there", "peer", pc.Name, "endpoint", p.cfg.EndpointName,
		"from", p.cfg.Endpoint, "to", ap)
	next := *prev
	next.Peers = slices.Clone(prev.Peers)
	next.Peers[i].Endpoint = ap
	d.cfg = &next
	if err := d.reconfigure(d.ctx, p, next.Peers[i], prev, &next); err != nil {
		d.cfg = prev
		d.log.Warn("peer could not move to its endpoint name's new address; staying at the old one", "peer", pc.Name, "to", ap, "err", err)
	}
}
