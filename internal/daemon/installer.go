package daemon

import (
	"context"
	"fmt"

	"github.com/pspd/pspd/keyexchange"
	"github.com/pspd/pspd/keyexchange/wire"
	"github.com/pspd/pspd/policy"
)

// installer is what the key exchange sees of one backend. A peer may use
// any of its candidate backends, and which one is settled per session by
// what the peer offers, so a backend gets the peer (its routes or
// policies) with the peer's first SA there, and gives it up once its last
// SA there is gone while another backend carries the peer.
type installer struct {
	d *Daemon
	b wire.Backend
}

func (i installer) peer(sa *keyexchange.SA) (*peer, error) {
	i.d.kmu.Lock()
	defer i.d.kmu.Unlock()
	p := i.d.byKey[sa.Peer]
	if p == nil {
		return nil, fmt.Errorf("SA for a peer that is not configured (%s)", sa.Peer.Fingerprint())
	}
	return p, nil
}

func (i installer) Install(ctx context.Context, sa *keyexchange.SA) error {
	p, err := i.peer(sa)
	if err != nil {
		return err
	}
	p.bmu.Lock()
	defer p.bmu.Unlock()
	if _, ok := p.on[i.b]; !ok {
		if err := i.d.attach(p, i.b); err != nil {
			return err
		}
	}
	if err := i.d.backends[i.b].Install(ctx, sa); err != nil {
		return err
	}
	p.on[i.b]++
	for b, n := range p.on {
		if b != i.b && n == 0 {
			i.d.detach(p, b)
		}
	}
	return nil
}

func (i installer) Activate(ctx context.Context, sa *keyexchange.SA) error {
	return i.d.backends[i.b].Activate(ctx, sa)
}

func (i installer) Remove(ctx context.Context, sa *keyexchange.SA) error {
	p, err := i.peer(sa)
	if err != nil {
		return err
	}
	p.bmu.Lock()
	defer p.bmu.Unlock()
	err = i.d.backends[i.b].Remove(ctx, sa)
	if p.on[i.b] > 0 {
		p.on[i.b]--
	}
	if p.on[i.b] == 0 {
		for b, n := range p.on {
			if b != i.b && n > 0 {
				i.d.detach(p, i.b) // another backend carries the peer now
				break
			}
		}
	}
	return err
}

// attach gives backend b the peer. Callers hold p.bmu or own p alone.
func (d *Daemon) attach(p *peer, b wire.Backend) error {
	if bk, ok := d.backends[b].(interface{ AddPeer(policy.Peer) error }); ok {
		if err := bk.AddPeer(p.cfg); err != nil {
			return err
		}
	}
	p.on[b] = 0
	return nil
}

// detach takes the peer from backend b. Callers hold p.bmu.
func (d *Daemon) detach(p *peer, b wire.Backend) {
	if bk, ok := d.backends[b].(interface{ RemovePeer(policy.Peer) }); ok {
		bk.RemovePeer(p.cfg)
	}
	delete(p.on, b)
}

// forget takes a peer whose key exchange is closed from every backend.
func (d *Daemon) forget(p *peer) {
	d.kmu.Lock()
	if d.byKey[p.cfg.PublicKey] == p {
		delete(d.byKey, p.cfg.PublicKey)
	}
	d.kmu.Unlock()
	p.bmu.Lock()
	defer p.bmu.Unlock()
	for b := range p.on {
		d.detach(p, b)
	}
}
