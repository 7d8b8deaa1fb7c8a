package daemon

import (
	"context"
	"crypto/fips140"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/genl"
	"github.com/pspd/pspd/keyexchange"
	"github.com/pspd/pspd/keyexchange/wire"
	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/offload"
	"github.com/pspd/pspd/offload/psp"
)

// The Daemon is the local API's Service.
var _ localapi.Service = (*Daemon)(nil)

func (d *Daemon) Status(context.Context) (localapi.Status, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := localapi.Status{
		Version: Version, BootID: fmt.Sprintf("%x", d.ep.BootID()), Started: d.started, PublicKey: d.ep.Public().String(),
		Fingerprint: d.ep.Public().Fingerprint(), Listen: d.ep.Addr().String(), FIPS: fips140.Enabled(),
		Peers: len(d.peers),
	}
	r := d.lastReload()
	st.LastReload = r.at
	if r.err != nil {
		st.LastReloadError = r.err.Error()
	}
	for _, b := range d.report.Available() {
		st.Backends = append(st.Backends, b.String())
	}
	for _, b := range d.backends {
		if u, ok := b.(offload.UnderlayReporter); ok {
			st.UserspaceIO, st.UserspaceIOReason = u.IO()
		}
	}
	for _, p := range d.peers {
		if p.kx.Session() != nil {
			st.PeersUp++
		}
		if _, ok := p.kx.Current(); ok {
			st.Assocs++
		}
	}
	if d.fleet != nil {
		st.Fleet = d.fleet.status(len(d.members))
	}
	d.imu.Lock()
	st.Rotation = d.rot.phase
	d.imu.Unlock()
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
		out = append(out, d.peerInfo(p))
	}
	return out, nil
}

// peerInfo is what the API shows of a peer. Callers hold d.mu.
func (d *Daemon) peerInfo(p *peer) localapi.Peer {
	st := p.kx.Status()
	lp := localapi.Peer{Name: p.cfg.Name, Endpoint: p.cfg.Endpoint.String(), EndpointName: p.cfg.EndpointName, Fingerprint: p.cfg.PublicKey.Fingerprint(),
		State: st.State.String(), Since: st.Since, DownSince: st.DownSince, Backend: p.backend.String(), Prefixes: []string{},
		LastHandshake: p.hist.lastHandshake, LastUp: st.LastUp, Rekeys: p.hist.rekeys()}
	for _, pf := range p.cfg.Prefixes {
		lp.Prefixes = append(lp.Prefixes, pf.String())
	}
	if !p.cfg.NextKey.IsZero() {
		lp.NextFingerprint = p.cfg.NextKey.Fingerprint()
	}
	if st.Cause != nil {
		lp.Cause = st.Cause.Error()
	}
	if st.LastError != nil {
		lp.LastError, lp.LastErrorAt = st.LastError.Error(), st.LastErrorAt
		lp.LastErrorOld = st.Up
	}
	if st.Up {
		lp.PeerBootID = fmt.Sprintf("%x", st.PeerBootID)
		lp.KeyExchange = st.Group.String()
		if s := p.kx.Session(); s != nil {
			lp.Observed = s.RemoteAddr().String()
			lp.SessionFingerprint = s.Peer().Fingerprint()
			lp.RTTMicros = uint64(s.RTT().Microseconds())
			if v, ok := s.PeerPSPVersions(); ok {
				lp.PSP = &localapi.PeerPSP{Versions: []string{}}
				for _, pv := range genl.Versions(v).List() {
					lp.PSP.Versions = append(lp.PSP.Versions, pv.String())
				}
			}
			if n := s.NAT(); n.Detected() {
				lp.NAT = &localapi.PeerNAT{Behind: n.Behind, PeerBehind: n.PeerBehind}
				if n.LocalObserved.IsValid() {
					lp.NAT.LocalObserved = n.LocalObserved.String()
				}
			}
		}
	}
	var id assoc.ID
	if sa, ok := p.kx.Current(); ok {
		lp.Backend = sa.Backend.String()
		lp.Assocs = 1
		lp.Assoc = assocID(p.cfg.Name, sa)
		id = sa.ID
	}
	all, _, _ := d.totals(p, id, 0)
	lp.Counters = counters(all)
	return lp
}

func (d *Daemon) assoc(p *peer, sa keyexchange.SA) localapi.Assoc {
	a := localapi.Assoc{
		ID: assocID(p.cfg.Name, sa), Peer: p.cfg.Name, Backend: sa.Backend.String(), Suite: sa.Suite.String(),
		RxSPI: uint32(sa.RxSPI), TxSPI: uint32(sa.TxSPI), Generation: sa.Generation, Created: p.created[sa.Generation],
	}
	if !a.Created.IsZero() {
		a.NextRekey = a.Created.Add(d.cfg.RekeyInterval)
		a.HardExpiry = a.Created.Add(limits(d.cfg).HardLifetime)
	}
	_, ofAssoc, ofGen := d.totals(p, sa.ID, sa.Generation)
	a.Counters, a.ThisGeneration = counters(ofAssoc), counters(ofGen)
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
			p.hist.asked(localapi.ReasonOperator)
		}
	}
	d.mu.Unlock()
	if len(sel) == 0 {
		return nil, fmt.Errorf("no association matches (see pspctl assoc list): %w", localapi.ErrNotFound)
	}
	// A few at a time, each with its own deadline: one after the other,
	// a rekey of every association took longer than any one deadline
	// with 64 XFRM peers on a slow host.
	out := make([]localapi.Rotated, len(sel))
	sem := make(chan struct{}, rotateParallel)
	var wg sync.WaitGroup
	for i, p := range sel {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			old, _ := p.kx.Current()
			r := localapi.Rotated{ID: assocID(p.cfg.Name, old), Peer: p.cfg.Name, OldRxSPI: uint32(old.RxSPI), OldTxSPI: uint32(old.TxSPI)}
			sa, err := p.kx.Rekey(ctx)
			if err != nil {
				d.rekeyFailed(p.cfg.Name, localapi.ReasonOperator)
				r.Error = err.Error()
			} else {
				r.RxSPI, r.TxSPI, r.Generation = uint32(sa.RxSPI), uint32(sa.TxSPI), sa.Generation
			}
			out[i] = r
		})
	}
	wg.Wait()
	return out, nil
}

// rotateParallel bounds the rekeys one Rotate runs at once.
const rotateParallel = 16

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
	if d.psp == nil {
		return nil, d.errNoPSP()
	}
	devs, err := d.psp.Devices()
	out := make([]localapi.Device, 0, len(devs))
	for _, dv := range devs {
		out = append(out, apiDevice(dv))
	}
	return out, err
}

func apiDevice(dv psp.Device) localapi.Device {
	ld := localapi.Device{ID: dv.ID, Ifindex: dv.Ifindex, Ifname: dv.Ifname, Capable: dv.Capable, Enabled: dv.Enabled,
		Rotations: dv.Rotations, StaleEvents: dv.StaleEvents, LastRotation: dv.LastRotation, NextRotation: dv.NextRotation,
		ByAssociation: dv.ByAssociation}
	for _, a := range dv.Assoc {
		ld.Assoc = append(ld.Assoc, localapi.AssocDev(a))
	}
	return ld
}

func (d *Daemon) RotateDevice(ctx context.Context, id uint32) (localapi.Device, error) {
	if d.psp == nil {
		return localapi.Device{}, d.errNoPSP()
	}
	dv, err := d.psp.RotateDevice(ctx, id)
	if errors.Is(err, psp.ErrNoDevice) {
		err = fmt.Errorf("%w: %w", err, localapi.ErrNotFound)
	}
	return apiDevice(dv), err
}

// AssocDevice gives a netdev of another network namespace (a container's
// end of a netkit or veth pair) the use of a PSP device of pspd's.
func (d *Daemon) AssocDevice(_ context.Context, id uint32, req localapi.AssocRequest) (localapi.Device, error) {
	return d.assocDevice(id, req, d.psp.AssocDevice)
}

// DisassocDevice takes it back.
func (d *Daemon) DisassocDevice(_ context.Context, id uint32, req localapi.AssocRequest) (localapi.Device, error) {
	return d.assocDevice(id, req, d.psp.DisassocDevice)
}

func (d *Daemon) assocDevice(id uint32, req localapi.AssocRequest, do func(uint32, psp.AssocTarget) (psp.Device, error)) (localapi.Device, error) {
	if d.psp == nil {
		return localapi.Device{}, d.errNoPSP()
	}
	dv, err := do(id, psp.AssocTarget{NetNS: req.Path(), Ifname: req.Ifname, Ifindex: req.Ifindex})
	switch {
	case err == nil:
		return apiDevice(dv), nil
	case errors.Is(err, psp.ErrNoDevice), errors.Is(err, psp.ErrNoNetNS), errors.Is(err, psp.ErrNoInterface):
		err = fmt.Errorf("%w: %w", err, localapi.ErrNotFound)
	case errors.Is(err, genl.ErrAssociated), errors.Is(err, genl.ErrNoDevAssoc):
		err = localapi.Refused(err)
	}
	return localapi.Device{}, err
}

// UpgradePSP binds PSP to an application's connected TCP socket with the
// key the named peer's pspd sends for the same connection.
func (d *Daemon) UpgradePSP(ctx context.Context, sock *os.File, peerName string) (localapi.UpgradeResult, error) {
	defer sock.Close()
	if d.psp == nil {
		return localapi.UpgradeResult{}, d.errNoPSP()
	}
	var p *peer
	if peerName == localapi.UpgradeAutoPeer {
		var err error
		if p, err = d.peerForSocket(sock); err != nil {
			return localapi.UpgradeResult{}, err
		}
		peerName = p.cfg.Name
	} else {
		d.mu.Lock()
		p = d.peers[peerName]
		d.mu.Unlock()
	}
	if p == nil {
		return localapi.UpgradeResult{}, fmt.Errorf("unknown peer %q (see pspctl peer list): %w", peerName, localapi.ErrNotFound)
	}
	s := p.kx.Session()
	if s == nil {
		return localapi.UpgradeResult{}, fmt.Errorf("no session with peer %s right now (see pspctl peer list); the socket was not touched", peerName)
	}
	if !s.PeerBackends().Has(wire.BackendPSP) {
		return localapi.UpgradeResult{}, fmt.Errorf("peer %s has no kernel PSP; the socket was not touched", peerName)
	}
	v, known := s.PeerPSPVersions()
	r, err := d.psp.Upgrade(ctx, sock, p.key, psp.PeerVersions{Known: known, Enabled: genl.Versions(v)}, p.kx.SendExplicitKey)
	if err != nil {
		d.log.Warn("PSP upgrade failed", "peer", peerName, "err", err)
		return localapi.UpgradeResult{}, err
	}
	d.events.publish(localapi.Event{Kind: localapi.EventPSPUpgrade, Peer: peerName, Device: r.Device, RxSPI: r.RxSPI, TxSPI: r.TxSPI,
		Backend: "psp", Detail: fmt.Sprintf("connection upgraded to PSP %s on device %d", r.Version, r.Device)})
	return localapi.UpgradeResult{Peer: peerName, Device: r.Device, Version: r.Version.String(), RxSPI: r.RxSPI, TxSPI: r.TxSPI}, nil
}

// peerForSocket is the one peer whose endpoint or prefixes hold the
// socket's remote address, as the PSP manager knows them.
func (d *Daemon) peerForSocket(sock *os.File) (*peer, error) {
	sa, err := unix.Getpeername(int(sock.Fd()))
	if err != nil {
		return nil, fmt.Errorf("the socket's remote address: %w (the socket was not touched): %w", err, localapi.ErrInvalid)
	}
	var remote netip.Addr
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		remote = netip.AddrFrom4(a.Addr)
	case *unix.SockaddrInet6:
		remote = netip.AddrFrom16(a.Addr).Unmap()
	default:
		return nil, fmt.Errorf("the socket is not an IP connection (the socket was not touched): %w", localapi.ErrInvalid)
	}
	keys := d.psp.PeersFor(remote)
	d.mu.Lock()
	defer d.mu.Unlock()
	var found []*peer
	for _, p := range d.peers {
		if slices.Contains(keys, p.key) {
			found = append(found, p)
		}
	}
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("%s is neither the endpoint nor in the prefixes of any peer (see pspctl peer list); the socket was not touched: %w", remote, localapi.ErrNoPeer)
	case 1:
		return found[0], nil
	}
	names := make([]string, len(found))
	for i, p := range found {
		names[i] = p.cfg.Name
	}
	slices.Sort(names)
	return nil, localapi.Refused(fmt.Errorf("%s belongs to peers %s: name the peer instead of %s, or make their prefixes disjoint; the socket was not touched",
		remote, strings.Join(names, ", "), localapi.UpgradeAutoPeer))
}

func (d *Daemon) Events(ctx context.Context) (<-chan localapi.Event, error) {
	return d.events.subscribe(ctx), nil
}
