// Package daemon is pspd itself: it joins the configuration, the identity,
// the key exchange, the data-plane backends and the local API into one
// running service, and owns its lifecycle (start, reload, stop).
package daemon

import (
	"cmp"
	"context"
	"crypto/fips140"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/keyexchange"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/wire"
	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/membership"
	"github.com/pspd/pspd/offload"
	"github.com/pspd/pspd/offload/psp"
	"github.com/pspd/pspd/policy"
)

// Version is pspd's version, reported by the API.
const Version = "0.1.0"

// Config is what a Daemon is made of. Backends are built by the caller
// from the probe report, so tests and the command share this package.
type Config struct {
	Policy   *policy.Config
	Logger   *slog.Logger
	Report   offload.Report
	Backends map[assoc.Backend]offload.Backend
	// Group is the local API's read group (default localapi.DefaultGroup).
	Group string
	// PSP manages kernel PSP devices and socket upgrades; nil on a host
	// without them. The daemon closes it.
	PSP *psp.Manager
	// Reloads, if set, hears of every reload of the configuration file,
	// however it was asked for (SIGHUP, the API).
	Reloads ReloadObserver
	// Resolver looks endpoint names up again while pspd runs; default
	// net.DefaultResolver.
	Resolver policy.Resolver
	// Fleet, if set, adds the members of the fleet the file's discovery
	// block names to the file's peers.
	Fleet *Fleet
}

// ReloadObserver is told when a reload of the configuration file begins
// and how it ended: cmd/pspd tells systemd (RELOADING=1, READY=1) and
// records the outcome for pspd reload. Calls come in pairs, one reload at
// a time.
type ReloadObserver interface {
	Reloading()
	Reloaded(err error)
}

// Daemon is a running pspd.
type Daemon struct {
	log *slog.Logger
	// imu guards id, the identity presented, and rot, its rotation.
	imu      sync.Mutex
	id       *identity.Identity
	rot      rotation
	report   offload.Report
	backends map[assoc.Backend]offload.Backend
	psp      *psp.Manager
	ep       *keyexchange.Endpoint
	started  time.Time
	events   *hub
	metrics  *prometheus.Registry
	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup

	// byKey finds a peer from the SAs the key exchange installs. It has
	// its own lock because installs run while mu is held (Close, Reload).
	kmu   sync.Mutex
	byKey map[identity.PublicKey]*peer

	rmu      sync.Mutex
	reloaded reloadResult // guarded by rmu
	// lmu makes reloads of the file one at a time, so that the observer's
	// calls pair up.
	lmu      sync.Mutex
	reloads  ReloadObserver
	resolver policy.Resolver

	// fleet adds members to the file's peers; fmu makes its changes and
	// the file's reloads one at a time.
	fleet     *Fleet
	fmu       sync.Mutex
	stopFleet context.CancelFunc
	// retained is the backends still holding the fail-closed state of
	// peers that left the fleet; guarded by kmu.
	retained map[identity.PublicKey][]assoc.Backend

	mu      sync.Mutex
	cfg     *policy.Config   // in force: the file's peers and the members
	file    *policy.Config   // as the file says
	members map[string]bool  // the peers of cfg that are members, not the file's
	peers   map[string]*peer // by name
}

type peer struct {
	// key names the peer to the key exchange and the backends: the key
	// it was added with, kept while its identity rotation moves cfg's
	// keys (reconfigure).
	key     identity.PublicKey
	cfg     policy.Peer
	backend assoc.Backend // the best candidate; SA.Backend is the one in use
	kx      *keyexchange.Peer

	// bmu guards on: the backends holding the peer (routes, policies),
	// with the number of the peer's SAs each has installed.
	bmu     sync.Mutex
	on      map[assoc.Backend]int
	traffic traffic              // cumulative counters, also guarded by bmu
	nat     offload.NAT          // of the session that installed the latest SA; guarded by bmu
	stop    context.CancelFunc   // stops the watch of the current kx
	hist    history              // guarded by Daemon.mu
	created map[uint32]time.Time // generation → when it became current
	resolve resolving            // guarded by Daemon.mu
}

// New starts a daemon: it loads the identity, binds the control socket
// and starts keeping a session with every configured peer. Nothing is
// left running when it returns an error.
func New(ctx context.Context, cfg Config) (d *Daemon, err error) {
	pc := cfg.Policy
	id, err := pc.LoadIdentity()
	if err != nil {
		return nil, err
	}
	rot, err := loadRotation(pc.Identity, id)
	if err != nil {
		return nil, err
	}
	if len(cfg.Backends) == 0 {
		return nil, fmt.Errorf("no data plane can run on this host: %s", cfg.Report.Missing())
	}
	dctx, cancel := context.WithCancel(ctx)
	// dd survives the "return nil, err" below for the deferred cleanup.
	dd := &Daemon{
		log: cfg.Logger, id: id, rot: rot, report: cfg.Report, backends: cfg.Backends, psp: cfg.PSP, started: time.Now(), reloads: cfg.Reloads,
		resolver: cmp.Or[policy.Resolver](cfg.Resolver, net.DefaultResolver),
		events:   newHub(), ctx: dctx, cancel: cancel, reloaded: reloadResult{at: time.Now()},
		cfg: pc, file: pc, peers: map[string]*peer{}, byKey: map[identity.PublicKey]*peer{},
		fleet: cfg.Fleet, retained: map[identity.PublicKey][]assoc.Backend{},
	}
	if dd.fleet != nil {
		dd.cfg, dd.members = dd.fleet.Merge(pc)
		pc = dd.cfg
	}
	d = dd
	defer func() {
		if err != nil {
			dd.Close()
		}
	}()
	installers := map[wire.Backend]keyexchange.Installer{}
	for k := range cfg.Backends {
		installers[k] = installer{d, k}
	}
	// Both suites are enabled: each peer accepts only its own (so a reload
	// may change it), and the endpoint must not need a restart for that.
	kc := keyexchange.Config{
		Identity: id, ListenAddr: pc.Listen.String(), Installers: installers,
		Logger: d.log.With("part", "keyexchange"), ClassicKeyExchange: pc.KeyExchange == policy.KeyExchangeClassic,
	}
	for _, b := range cfg.Backends {
		if c, ok := b.(offload.SocketController); ok {
			kc.Control = c.Control
		}
	}
	if d.psp != nil {
		kc.Offers = wire.NewBackends(wire.BackendPSP)
		kc.ExplicitKeys = d.psp.PeerKey
		d.wg.Add(1)
		go d.servePSPEvents()
	}
	if rot.phase == localapi.RotationSwitched {
		kc.Previous = rot.other
	}
	d.ep, err = keyexchange.NewEndpoint(dctx, kc)
	if err != nil {
		return nil, err
	}
	if rot.phase != localapi.RotationNone {
		d.log.Info("identity rotation resumed", "phase", rot.phase, "other", rot.other.Public().Fingerprint())
	}
	for _, p := range pc.Peers {
		if err := d.addPeer(p); err != nil {
			return nil, err
		}
	}
	if rot.phase == localapi.RotationSwitched {
		// With every peer added: none has moved yet.
		d.imu.Lock()
		d.startFinishing()
		d.imu.Unlock()
	}
	for _, b := range cfg.Backends {
		d.wg.Add(1)
		go d.serveRekeys(b.RekeyWanted())
	}
	d.wg.Add(1)
	go d.watchStates()
	d.wg.Add(1)
	go d.resolveLoop(dctx)
	if d.fleet != nil {
		if d.fleet.selfRec, err = membership.NewSelf(d.fleet.self(d.keys())); err != nil {
			return nil, err
		}
		fctx, stop := context.WithCancel(dctx)
		d.stopFleet = stop
		d.wg.Add(1)
		go d.runFleet(fctx)
	}
	d.metrics = newMetrics(d)
	d.log.Info("pspd started", "version", Version, "listen", d.ep.Addr(), "public_key", id.Public().String(),
		"backends", backendNames(cfg.Report.Available()), "peers", len(pc.Peers), "fips140", fips140.Enabled())
	return d, nil
}

// candidates lists the backends a peer may use, best first, among those
// this daemon runs, under cfg.
func (d *Daemon) candidates(pc policy.Peer, cfg *policy.Config) ([]assoc.Backend, error) {
	return usable(pc, cfg, d.report, func(b assoc.Backend) bool { return d.backends[b] != nil })
}

func (d *Daemon) addPeer(pc policy.Peer) error {
	cs, err := d.candidates(pc, d.cfg)
	if err != nil {
		return fmt.Errorf("peer %s: %w", pc.Name, err)
	}
	p := &peer{key: pc.PublicKey, cfg: pc, backend: cs[0], created: map[uint32]time.Time{}, on: map[assoc.Backend]int{}, resolve: resolving{at: time.Now()}}
	// The best backend gets the peer now, so that with
	// require_encryption its traffic is held back from the start; the
	// one the key exchange settles on gets it with the first SA.
	if err := d.attach(d.ctx, p, cs[0]); err != nil {
		return fmt.Errorf("peer %s: %w", pc.Name, err)
	}
	d.kmu.Lock()
	d.byKey[p.key] = p
	d.kmu.Unlock()
	if err := d.startKX(p, cs); err != nil {
		d.forget(d.ctx, p, true)
		return fmt.Errorf("peer %s: %w", pc.Name, err)
	}
	d.peers[pc.Name] = p
	return nil
}

// startKX starts keeping a session with the peer.
func (d *Daemon) startKX(p *peer, cs []assoc.Backend) error {
	kc := keyexchange.PeerConfig{
		Name: p.cfg.Name, Key: p.key, Pins: p.cfg.Keys(), Addr: p.cfg.Endpoint, Backends: cs, Suite: p.cfg.Suite,
		RekeyInterval: d.cfg.RekeyInterval,
	}
	if d.psp != nil {
		kc.PSPVersions = d.pspVersions
	}
	kx, err := d.ep.AddPeer(kc)
	if err != nil {
		return err
	}
	ctx, stop := context.WithCancel(d.ctx)
	p.kx, p.stop, p.backend = kx, stop, cs[0]
	if d.psp != nil {
		// The addresses a socket handed over for this peer may connect to.
		d.psp.SetPeer(p.key, p.cfg.Endpoint.Addr(), p.cfg.Prefixes)
	}
	d.wg.Add(1)
	go d.watch(ctx, p, kx)
	return nil
}

// pspVersions are what this host's PSP devices accept, for the Hello,
// as they are when a session begins: without a device the Hello says
// nothing, so that a device associated later is not refused by peers.
func (d *Daemon) pspVersions() (wire.PSPVersions, bool) {
	v, err := d.psp.EnabledVersions()
	switch {
	case errors.Is(err, psp.ErrNoDevice):
		return 0, false
	case err != nil:
		d.log.Warn("the Hello says nothing of the PSP devices' versions", "err", err)
		return 0, false
	}
	return wire.PSPVersions(v), true
}

// stopKX ends the peer's session, removing its SAs through the backends;
// the backends keep the peer itself.
func (d *Daemon) stopKX(p *peer) {
	p.stop()
	p.kx.Close()
}

// removePeer stops the peer's session and, with removeState, takes
// everything of it out of the backends, fail-closed state included (the
// operator removed it); without, what a stop leaves stays.
func (d *Daemon) removePeer(name string, removeState bool) {
	p := d.peers[name]
	if p == nil {
		return
	}
	delete(d.peers, name)
	d.stopKX(p)
	if d.psp != nil {
		d.psp.RemovePeer(p.key)
	}
	d.forget(d.ctx, p, removeState)
	if removeState {
		d.events.publish(localapi.Event{Kind: localapi.EventPeerRemoved, Peer: name, Detail: "removed from the configuration"})
	}
}

// servePSPEvents publishes device-key rotations and the connections they
// doom, so applications can re-establish those in time.
func (d *Daemon) servePSPEvents() {
	defer d.wg.Done()
	for {
		select {
		case <-d.ctx.Done():
			return
		case ev := <-d.psp.Events():
			e := localapi.Event{Kind: pspEventKind(ev.Kind), Device: ev.Device, Detail: ev.Detail}
			if ev.Peer != (identity.PublicKey{}) {
				d.mu.Lock() // guards p.cfg
				for _, p := range d.peers {
					if p.key == ev.Peer {
						e.Peer = p.cfg.Name
					}
				}
				d.mu.Unlock()
			}
			d.events.publish(e)
		}
	}
}

// serveRekeys rekeys a peer whose data plane reports its TX key reached
// the packet budget or its age.
func (d *Daemon) serveRekeys(wanted <-chan identity.PublicKey) {
	defer d.wg.Done()
	for {
		select {
		case <-d.ctx.Done():
			return
		case key := <-wanted:
			d.mu.Lock()
			var kx *keyexchange.Peer
			var name string
			for _, p := range d.peers {
				if p.key == key {
					kx, name = p.kx, p.cfg.Name
					p.hist.asked(localapi.ReasonBudget)
				}
			}
			d.mu.Unlock()
			if kx == nil {
				continue
			}
			go func() {
				ctx, cancel := context.WithTimeout(d.ctx, 30*time.Second)
				defer cancel()
				if _, err := kx.Rekey(ctx); err != nil {
					d.log.Warn("rekey asked for by the data plane failed", "peer", name, "err", err)
					d.rekeyFailed(name, localapi.ReasonBudget)
				}
			}()
		}
	}
}

func assocID(peer string, sa keyexchange.SA) string {
	return fmt.Sprintf("%s/%d", peer, sa.ID)
}

// reload applies a new configuration or refuses it whole, with the
// reason: everything is checked against what the running daemon can do
// before anything is touched. Peers whose prefixes (or the global
// require_encryption) change keep their session and SAs and are updated
// in place; peers whose endpoint, suite or backend change are
// re-negotiated while their backends keep holding them, so that with
// require_encryption no packet leaves in clear meanwhile; a peer whose
// keys change but keep one in common (its identity rotation) keeps its
// session and SAs, and one whose keys are all new is a new peer.
//
// members are the peers of next that come from the fleet: one that leaves
// it keeps its fail-closed state (retire).
func (d *Daemon) reload(next *policy.Config, members map[string]bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	diff, err := policy.Reload(d.cfg, next)
	if err != nil {
		return err
	}
	if err := restartOnly(d.cfg, next); err != nil {
		return err
	}
	refuse := func(p policy.Peer, err error) error {
		return fmt.Errorf("reload %s refused, nothing applied: %w", next.File, &peerFailed{name: p.Name, err: fmt.Errorf("peer %s: %w", p.Name, err)})
	}
	// Every peer of the new file is checked, not only those that changed:
	// a new global backend or require_encryption concerns them all.
	for _, p := range next.Peers {
		if _, err := d.candidates(p, next); err != nil {
			return refuse(p, err)
		}
	}
	prev := d.cfg
	d.cfg = next
	ctx := d.ctx
	var added []string
	for _, p := range diff.Added {
		if err := d.addPeer(p); err != nil {
			for _, name := range added {
				d.removePeer(name, true)
			}
			d.cfg = prev
			return fmt.Errorf("reload %s failed, nothing applied: %w", next.File, &peerFailed{name: p.Name, err: err})
		}
		added = append(added, p.Name)
	}
	var errs []error
	for _, np := range next.Peers {
		p := d.peers[np.Name]
		if p == nil || slices.Contains(added, np.Name) {
			continue
		}
		if err := d.reconfigure(ctx, p, np, prev, next); err != nil {
			errs = append(errs, fmt.Errorf("peer %s: %w", np.Name, err))
		}
	}
	for _, p := range diff.Removed {
		if d.members[p.Name] {
			d.retire(p.Name)
		} else {
			d.removePeer(p.Name, true)
		}
	}
	d.members = members
	if err := errors.Join(errs...); err != nil {
		d.log.Error("reload applied in part", "file", next.File, "err", err)
		return fmt.Errorf("reload %s applied in part: %w", next.File, err)
	}
	d.log.Info("configuration reloaded", "added", len(diff.Added), "removed", len(diff.Removed), "changed", len(diff.Changed))
	return nil
}

// peerFailed is a reload that one peer made fail; err names the peer.
type peerFailed struct {
	name string
	err  error
}

func (e *peerFailed) Error() string { return e.err.Error() }

func (e *peerFailed) Unwrap() error { return e.err }

// reconfigure applies a peer's new settings: in place when its session
// can stay, by a new session (the backends keep holding the peer) when it
// cannot.
func (d *Daemon) reconfigure(ctx context.Context, p *peer, np policy.Peer, prev, next *policy.Config) error {
	old := p.cfg
	if old.Endpoint == np.Endpoint && slices.Equal(old.Keys(), np.Keys()) && slices.Equal(old.Prefixes, np.Prefixes) &&
		old.Backend == np.Backend && old.Suite == np.Suite &&
		prev.Backend == next.Backend && prev.RequireEncryption == next.RequireEncryption {
		return nil // nothing the backends or the session see changed
	}
	cs, err := d.candidates(np, next)
	if err != nil {
		return err
	}
	oldCs, _ := d.candidates(old, prev)
	if !slices.ContainsFunc(np.Keys(), func(k identity.PublicKey) bool { return slices.Contains(old.Keys(), k) }) {
		d.removePeer(np.Name, true)
		return d.addPeer(np)
	}
	if !slices.Equal(old.Keys(), np.Keys()) {
		// One key stays: the peer's identity rotation, which its
		// session and SAs outlive.
		if err := p.kx.SetKeys(np.Keys()...); err != nil {
			return err
		}
		d.log.Info("peer's keys changed (identity rotation)", "peer", np.Name, "keys", fingerprints(np.Keys()))
	}
	renegotiate := np.Endpoint != old.Endpoint || np.Suite != old.Suite || !slices.Equal(cs, oldCs)
	p.bmu.Lock()
	p.cfg = np
	err = d.update(ctx, p, next)
	if err != nil {
		p.cfg = old
		d.update(ctx, p, prev)
	}
	p.bmu.Unlock()
	if err == nil && d.psp != nil {
		d.psp.SetPeer(p.key, np.Endpoint.Addr(), np.Prefixes)
	}
	if err != nil || !renegotiate {
		return err
	}
	d.log.Info("peer re-negotiated: its endpoint, suite or backends changed", "peer", np.Name, "endpoint", np.Endpoint)
	d.stopKX(p)
	p.bmu.Lock()
	if _, ok := p.on[cs[0]]; !ok {
		if err := d.attach(ctx, p, cs[0]); err != nil {
			d.log.Warn("reload: the peer's new backend could not take it yet", "peer", np.Name, "backend", cs[0], "err", err)
		}
	}
	p.bmu.Unlock()
	return d.startKX(p, cs)
}

func fingerprints(keys []identity.PublicKey) []string {
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = k.Fingerprint()
	}
	return out
}

// restartOnly refuses a reload that changes a setting the running data
// planes were started with.
func restartOnly(cur, next *policy.Config) error {
	for _, f := range []struct {
		name string
		a, b any
	}{
		{"offload", cur.Offload, next.Offload},
		{"packet_budget", cur.PacketBudget, next.PacketBudget},
		{"rekey_interval", cur.RekeyInterval, next.RekeyInterval},
		{"psp_rotation_interval", cur.PSPRotation, next.PSPRotation},
		{"key_exchange", cur.KeyExchange, next.KeyExchange},
	} {
		if f.a != f.b {
			return fmt.Errorf("reload %s refused: %s changed from %v to %v, which needs a restart of pspd (the SAs in place were installed with it); nothing was applied", next.File, f.name, f.a, f.b)
		}
	}
	return nil
}

// Serve runs the local API on ln and, if configured, the metrics endpoint,
// until ctx ends.
func (d *Daemon) Serve(ctx context.Context, ln *net.UnixListener, group string) error {
	errc := make(chan error, 2)
	go func() {
		errc <- localapi.NewServer(d, localapi.NewAuthorizer(group), d.log.With("part", "localapi")).Serve(ctx, ln)
	}()
	d.mu.Lock() // Reload replaces d.cfg
	addr := d.cfg.Metrics
	d.mu.Unlock()
	if addr != "" {
		var mln net.Listener
		var err error
		if path, ok := strings.CutPrefix(addr, "unix:"); ok {
			// The API socket's rules: root and the read group only.
			mln, err = localapi.Listen(path, localapi.NewAuthorizer(group))
		} else {
			mln, err = net.Listen("tcp", addr)
		}
		if err != nil {
			return fmt.Errorf("metrics listener %s: %w (set metrics: off to disable)", addr, err)
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", promhttp.HandlerFor(d.metrics, promhttp.HandlerOpts{}))
		hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			<-ctx.Done()
			hs.Close()
		}()
		go func() {
			if err := hs.Serve(mln); !errors.Is(err, http.ErrServerClosed) {
				errc <- err
			}
		}()
	}
	select {
	case <-ctx.Done():
		return nil
	case err := <-errc:
		return err
	}
}

// Close stops pspd: every session ends (its SAs are removed), then every
// backend stops, leaving the fail-closed state of peers that require
// encryption in the kernel for the next start (see package offload).
func (d *Daemon) Close() {
	if d.stopFleet != nil {
		d.stopFleet()
	}
	// A membership change under way ends first; the next sees the
	// fleet's context ended and applies nothing.
	d.fmu.Lock()
	d.mu.Lock()
	for name := range d.peers {
		d.removePeer(name, false)
	}
	d.mu.Unlock()
	d.fmu.Unlock()
	if d.ep != nil {
		d.ep.Close()
	}
	d.cancel()
	d.wg.Wait()
	for _, b := range d.backends {
		if err := b.Close(); err != nil {
			d.log.Warn("backend stopped with errors", "backend", b.Kind(), "err", err)
		}
	}
	if d.psp != nil {
		d.psp.Close()
	}
	d.log.Info("pspd stopped")
}

// Addr is the control socket's address.
func (d *Daemon) Addr() net.Addr { return net.UDPAddrFromAddrPort(d.ep.Addr()) }
