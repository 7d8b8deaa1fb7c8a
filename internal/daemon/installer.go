package daemon

import (
	"context"
	"fmt"
	"net"
	"net/netip"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/keyexchange"
	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/offload"
	"github.com/pspd/pspd/policy"
)

// installer is what the key exchange sees of one backend. A peer may use
// any of its candidate backends, and which one is settled per session by
// what the peer offers, so a backend gets the peer (its routes or
// policies) with the peer's first SA there, and gives it up once its last
// SA there is gone while another backend carries the peer.
type installer struct {
	d *Daemon
	b assoc.Backend
}

var _ keyexchange.Installer = installer{}

func (i installer) peer(sa *assoc.SA) (*peer, error) {
	i.d.kmu.Lock()
	defer i.d.kmu.Unlock()
	p := i.d.byKey[sa.Peer]
	if p == nil {
		return nil, fmt.Errorf("SA for a peer that is not configured (%s)", sa.Peer.Fingerprint())
	}
	return p, nil
}

func (i installer) Install(ctx context.Context, sa *assoc.SA) error {
	p, err := i.peer(sa)
	if err != nil {
		return err
	}
	p.bmu.Lock()
	defer p.bmu.Unlock()
	nat := sessionNAT(p.kx.Session())
	if _, ok := p.on[i.b]; !ok {
		p.nat = nat
		if err := i.d.attach(ctx, p, i.b); err != nil {
			return err
		}
	} else if nat != p.nat {
		// The session that negotiated this SA runs through other NATs
		// than the last one: the backend's next SAs follow it.
		s, err := i.d.specFor(p, i.b)
		if err != nil {
			return err
		}
		s.NAT = nat
		if err := i.d.backends[i.b].UpdatePeer(ctx, s); err != nil {
			return err
		}
		p.nat = nat
	}
	p.traffic.sample(i.d.backends)
	if err := i.d.backends[i.b].Install(ctx, sa); err != nil {
		return err
	}
	p.traffic.installed(i.b, sa)
	p.on[i.b]++
	for b, n := range p.on {
		if b != i.b && n == 0 {
			i.d.detach(ctx, p, b)
		}
	}
	return nil
}

func (i installer) Activate(ctx context.Context, sa *assoc.SA) error {
	p, err := i.peer(sa)
	if err != nil {
		return err
	}
	p.bmu.Lock()
	defer p.bmu.Unlock()
	// The data plane may forget the previous TX SA's counts now.
	p.traffic.sample(i.d.backends)
	return i.d.backends[i.b].Activate(ctx, sa)
}

func (i installer) Remove(ctx context.Context, sa *assoc.SA) error {
	p, err := i.peer(sa)
	if err != nil {
		return err
	}
	p.bmu.Lock()
	defer p.bmu.Unlock()
	// What the SA carried is read before it goes, for the totals.
	p.traffic.sample(i.d.backends)
	err = i.d.backends[i.b].Remove(ctx, sa)
	if err == nil && p.traffic.removed(i.b, sa) {
		i.d.events.publish(localapi.Event{Kind: localapi.EventAssocDown, Peer: p.cfg.Name, Assoc: assocID(p.cfg.Name, *sa),
			Generation: sa.Generation, RxSPI: uint32(sa.RxSPI), TxSPI: uint32(sa.TxSPI), Backend: i.b.String(),
			Detail: fmt.Sprintf("the generation in use with %s was removed; nothing new is encrypted to it until the next association", p.cfg.Name)})
	}
	if p.on[i.b] > 0 {
		p.on[i.b]--
	}
	if p.on[i.b] == 0 {
		for b, n := range p.on {
			if b != i.b && n > 0 {
				i.d.detach(ctx, p, i.b) // another backend carries the peer now
				break
			}
		}
	}
	return err
}

// spec is the one place that turns a configured peer into what backend b
// is given.
func spec(pc policy.Peer, cfg *policy.Config, b assoc.Backend) (offload.PeerSpec, error) {
	s := offload.PeerSpec{
		Name: pc.Name, Key: pc.PublicKey, Endpoint: pc.Endpoint, Local: cfg.Listen.Addr(),
		Prefixes: pc.Prefixes, RequireEncryption: cfg.RequireEncryption, Suite: pc.Suite,
		Limits: limits(cfg), EncapPort: cfg.EncapPort, NATKeepalive: cfg.NATKeepalive,
	}
	switch pc.NATTraversal.OrDefault(cfg.NATTraversal) {
	case policy.NATForce:
		s.NATTraversal = offload.NATForce
	case policy.NATOff:
		s.NATTraversal = offload.NATOff
	default:
		s.NATTraversal = offload.NATAuto
	}
	if len(s.Prefixes) == 0 {
		if b != assoc.BackendXFRM {
			return s, fmt.Errorf("peer %s has no prefixes: the %s backend routes a peer's prefixes into the tunnel (set prefixes, or backend: xfrm to protect the traffic between the two hosts)", pc.Name, b)
		}
		// Between the two hosts themselves: transport mode.
		a := pc.Endpoint.Addr().Unmap()
		s.Prefixes = []netip.Prefix{netip.PrefixFrom(a, a.BitLen())}
	}
	return s, nil
}

// limits bound every SA under cfg: the soft limits ask for a rekey well
// after the key exchange's own timer would have made one, the hard ones
// end the SA if no rekey came.
func limits(cfg *policy.Config) offload.Limits {
	return offload.Limits{
		SoftPackets: cfg.PacketBudget, HardPackets: 2 * cfg.PacketBudget,
		SoftLifetime: 2 * cfg.RekeyInterval, HardLifetime: 3 * cfg.RekeyInterval,
	}
}

// specFor is the peer's spec for backend b under the configuration in
// force, with the NAT detection of its latest session. Callers hold
// p.bmu or own p alone.
func (d *Daemon) specFor(p *peer, b assoc.Backend) (offload.PeerSpec, error) {
	s, err := spec(p.cfg, d.cfg, b)
	s.Key, s.NAT = p.key, p.nat
	return s, err
}

// sessionNAT is what the data plane needs of a session's NAT detection.
func sessionNAT(s *keyexchange.Session) offload.NAT {
	if s == nil {
		return offload.NAT{}
	}
	n := s.NAT()
	out := offload.NAT{Behind: n.Behind, PeerBehind: n.PeerBehind}
	if a, ok := s.RemoteAddr().(*net.UDPAddr); ok {
		out.PeerObserved = a.AddrPort()
	}
	return out
}

// attach gives backend b the peer. Callers hold p.bmu or own p alone.
func (d *Daemon) attach(ctx context.Context, p *peer, b assoc.Backend) error {
	s, err := d.specFor(p, b)
	if err != nil {
		return err
	}
	add := d.backends[b].AddPeer
	if d.reclaim(p.key, b) {
		add = d.backends[b].UpdatePeer // the fail-closed state it left is there still
	}
	if err := add(ctx, s); err != nil {
		return err
	}
	p.on[b] = 0
	return nil
}

// detach takes the peer from backend b. Callers hold p.bmu.
func (d *Daemon) detach(ctx context.Context, p *peer, b assoc.Backend) {
	if err := d.backends[b].RemovePeer(ctx, p.key); err != nil {
		d.log.Warn("backend could not remove all of a peer's state", "peer", p.cfg.Name, "backend", b, "err", err)
	}
	delete(p.on, b)
}

// update gives every backend holding the peer its new spec. Callers hold
// p.bmu.
func (d *Daemon) update(ctx context.Context, p *peer, cfg *policy.Config) error {
	for b := range p.on {
		s, err := spec(p.cfg, cfg, b)
		if err != nil {
			return err
		}
		s.Key, s.NAT = p.key, p.nat
		if err := d.backends[b].UpdatePeer(ctx, s); err != nil {
			return err
		}
	}
	return nil
}

// forget takes a peer out of the daemon's table and, with removeState,
// out of every backend, fail-closed state included.
func (d *Daemon) forget(ctx context.Context, p *peer, removeState bool) {
	d.kmu.Lock()
	if d.byKey[p.key] == p {
		delete(d.byKey, p.key)
	}
	d.kmu.Unlock()
	if !removeState {
		return
	}
	p.bmu.Lock()
	defer p.bmu.Unlock()
	for b := range p.on {
		d.detach(ctx, p, b)
	}
}
