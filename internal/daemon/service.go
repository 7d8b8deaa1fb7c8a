package daemon

import (
	"context"
	"crypto/fips140"
	"fmt"
	"os"
	"sort"
	"time"

	"github.com/pspd/pspd/keyexchange"
	"github.com/pspd/pspd/localapi"
)

// The Daemon is the local API's Service.
var _ localapi.Service = (*Daemon)(nil)

func (d *Daemon) Status(context.Context) (localapi.Status, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := localapi.Status{
		Version: Version, BootID: d.bootID, Started: d.started, PublicKey: d.id.Public().String(),
		Fingerprint: d.id.Public().Fingerprint(), Listen: d.ep.Addr().String(), FIPS: fips140.Enabled(),
		Peers: len(d.peers),
	}
	for _, b := range d.report.Available() {
		st.Backends = append(st.Backends, b.String())
	}
	for _, p := range d.peers {
		if p.kx.Session() != nil {
			st.PeersUp++
		}
		if _, ok := p.kx.Current(); ok {
			st.Assocs++
		}
	}
	return st, nil
}

func (d *Daemon) sortedPeers() []*peer {
	ps := make([]*peer, 0, len(d.peers))
	for _, p := range d.peers {
		ps = append(ps, p)
	}
	sort.Slice(ps, func(i, j int) bool { return ps[i].cfg.Name < ps[j].cfg.Name })
	return ps
}

func (d *Daemon) Peers(context.Context) ([]localapi.Peer, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := []localapi.Peer{}
	for _, p := range d.sortedPeers() {
		lp := localapi.Peer{Name: p.cfg.Name, Endpoint: p.cfg.Endpoint.String(), Fingerprint: p.cfg.PublicKey.Fingerprint(),
			State: "connecting", Backend: p.backend.String()}
		if s := p.kx.Session(); s != nil {
			lp.State = "up"
			lp.PeerBootID = fmt.Sprintf("%x", s.PeerBootID())
		} else if err := p.kx.LastError(); err != nil {
			lp.State = "backoff"
		}
		if err := p.kx.LastError(); err != nil {
			lp.LastError = err.Error()
		}
		if sa, ok := p.kx.Current(); ok {
			lp.Backend = sa.Backend.String()
			lp.Assocs = 1
			lp.LastHandshake = p.created[sa.Generation]
		}
		out = append(out, lp)
	}
	return out, nil
}

func (d *Daemon) assoc(p *peer, sa keyexchange.SA) localapi.Assoc {
	a := localapi.Assoc{
		ID: assocID(p.cfg.Name, sa), Peer: p.cfg.Name, Backend: sa.Backend.String(), Suite: sa.Suite.String(),
		RxSPI: uint32(sa.RxSPI), TxSPI: uint32(sa.TxSPI), Generation: sa.Generation, Created: p.created[sa.Generation],
	}
	if !a.Created.IsZero() {
		a.NextRekey = a.Created.Add(d.cfg.RekeyInterval)
	}
	if b := d.backends[sa.Backend]; b != nil {
		if t, ok := b.Traffic(&sa); ok {
			a.BytesIn, a.BytesOut, a.PacketsIn, a.PacketsOut, a.Drops = t.BytesIn, t.BytesOut, t.PacketsIn, t.PacketsOut, t.Drops
		}
	}
	return a
}

func (d *Daemon) Assocs(context.Context) ([]localapi.Assoc, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := []localapi.Assoc{}
	for _, p := range d.sortedPeers() {
		if sa, ok := p.kx.Current(); ok {
			out = append(out, d.assoc(p, sa))
		}
	}
	return out, nil
}

// Rotate rekeys the selected associations make-before-break and returns
// once each new generation is confirmed by both sides.
func (d *Daemon) Rotate(ctx context.Context, req localapi.RotateRequest) ([]localapi.Rotated, error) {
	d.mu.Lock()
	var sel []*peer
	for _, p := range d.sortedPeers() {
		sa, ok := p.kx.Current()
		if req.All || req.Peer == p.cfg.Name || (ok && req.ID == assocID(p.cfg.Name, sa)) {
			sel = append(sel, p)
		}
	}
	d.mu.Unlock()
	if len(sel) == 0 {
		return nil, fmt.Errorf("no association matches (see pspctl assoc list): %w", localapi.ErrNotFound)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var out []localapi.Rotated
	for _, p := range sel {
		old, _ := p.kx.Current()
		r := localapi.Rotated{ID: assocID(p.cfg.Name, old), Peer: p.cfg.Name, OldRxSPI: uint32(old.RxSPI), OldTxSPI: uint32(old.TxSPI)}
		sa, err := p.kx.Rekey(ctx)
		if err != nil {
			r.Error = err.Error()
		} else {
			r.RxSPI, r.TxSPI, r.Generation = uint32(sa.RxSPI), uint32(sa.TxSPI), sa.Generation
		}
		out = append(out, r)
	}
	return out, nil
}

// errNoPSP is what device and upgrade requests get on a host without
// kernel PSP.
func (d *Daemon) errNoPSP() error {
	for _, a := range d.report {
		if a.Backend.String() == "psp" && !a.Available {
			return fmt.Errorf("this host has no kernel PSP: %s: %w", a.Reason, localapi.ErrNotFound)
		}
	}
	return fmt.Errorf("kernel PSP is not managed by this pspd: %w", localapi.ErrNotFound)
}

func (d *Daemon) Devices(context.Context) ([]localapi.Device, error) {
	if pd, ok := d.pspDevices(); ok {
		return pd.Devices()
	}
	return []localapi.Device{}, nil
}

func (d *Daemon) RotateDevice(ctx context.Context, id uint32) (localapi.Device, error) {
	if pd, ok := d.pspDevices(); ok {
		return pd.RotateDevice(ctx, id)
	}
	return localapi.Device{}, d.errNoPSP()
}

func (d *Daemon) UpgradePSP(ctx context.Context, sock *os.File, peerName string) (localapi.UpgradeResult, error) {
	defer sock.Close()
	d.mu.Lock()
	_, known := d.peers[peerName]
	d.mu.Unlock()
	if !known {
		return localapi.UpgradeResult{}, fmt.Errorf("unknown peer %q (see pspctl peer list): %w", peerName, localapi.ErrNotFound)
	}
	return localapi.UpgradeResult{}, d.errNoPSP()
}

// pspDeviceManager is implemented by the kernel PSP backend.
type pspDeviceManager interface {
	Devices() ([]localapi.Device, error)
	RotateDevice(ctx context.Context, id uint32) (localapi.Device, error)
}

func (d *Daemon) pspDevices() (pspDeviceManager, bool) {
	for _, b := range d.backends {
		if m, ok := b.(pspDeviceManager); ok {
			return m, true
		}
	}
	return nil, false
}

func (d *Daemon) Events(ctx context.Context) (<-chan localapi.Event, error) {
	return d.events.subscribe(ctx), nil
}
