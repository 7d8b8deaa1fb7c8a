// Package daemon is pspd itself: it joins the configuration, the identity,
// the key exchange, the data-plane backends and the local API into one
// running service, and owns its lifecycle (start, reload, stop).
package daemon

import (
	"context"
	"crypto/fips140"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/pspd/pspd/keyexchange"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/wire"
	"github.com/pspd/pspd/localapi"
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
	Backends map[wire.Backend]offload.Backend
	// Group is the local API's read group (default localapi.DefaultGroup).
	Group string
	// PSP manages kernel PSP devices and socket upgrades; nil on a host
	// without them. The daemon closes it.
	PSP *psp.Manager
}

// Daemon is a running pspd.
type Daemon struct {
	log      *slog.Logger
	id       *identity.Identity
	report   offload.Report
	backends map[wire.Backend]offload.Backend
	psp      *psp.Manager
	ep       *keyexchange.Endpoint
	started  time.Time
	bootID   string
	events   *hub
	metrics  *prometheus.Registry
	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup

	// byKey finds a peer from the SAs the key exchange installs. It has
	// its own lock because installs run while mu is held (Close, Reload).
	kmu   sync.Mutex
	byKey map[identity.PublicKey]*peer

	mu    sync.Mutex
	cfg   *policy.Config
	peers map[string]*peer // by name
}

type peer struct {
	cfg     policy.Peer
	backend wire.Backend // the best candidate; SA.Backend is the one in use
	kx      *keyexchange.Peer

	// bmu guards on: the backends holding the peer (routes, policies),
	// with the number of the peer's SAs each has installed.
	bmu     sync.Mutex
	on      map[wire.Backend]int
	stop    context.CancelFunc
	rekeys  uint64
	created map[uint32]time.Time // generation → when it became current
}

// New starts a daemon: it loads the identity, binds the control socket
// and starts keeping a session with every configured peer. Nothing is
// left running when it returns an error.
func New(ctx context.Context, cfg Config) (d *Daemon, err error) {
	pc := cfg.Policy
	id, err := identity.Load(pc.Identity)
	if err != nil {
		return nil, err
	}
	if len(cfg.Backends) == 0 {
		return nil, fmt.Errorf("no data plane can run on this host: %s", cfg.Report.Missing())
	}
	var boot [8]byte
	rand.Read(boot[:])
	dctx, cancel := context.WithCancel(ctx)
	d = &Daemon{
		log: cfg.Logger, id: id, report: cfg.Report, backends: cfg.Backends, psp: cfg.PSP, started: time.Now(),
		bootID: hex.EncodeToString(boot[:]), events: newHub(), ctx: dctx, cancel: cancel,
		cfg: pc, peers: map[string]*peer{}, byKey: map[identity.PublicKey]*peer{},
	}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()
	installers := map[wire.Backend]keyexchange.Installer{}
	for k := range cfg.Backends {
		installers[k] = installer{d, k}
	}
	kc := keyexchange.Config{
		Identity: id, ListenAddr: pc.Listen.String(), Installers: installers,
		Suites: wire.NewSuites(pc.Suite), Logger: d.log.With("part", "keyexchange"),
	}
	for _, b := range cfg.Backends {
		if c, ok := b.(interface {
			Control(network, address string, c syscall.RawConn) error
		}); ok {
			kc.Control = c.Control
		}
	}
	if d.psp != nil {
		kc.Offers = wire.NewBackends(wire.BackendPSP)
		kc.ExplicitKeys = d.psp.PeerKey
		d.wg.Add(1)
		go d.servePSPEvents()
	}
	d.ep, err = keyexchange.NewEndpoint(dctx, kc)
	if err != nil {
		return nil, err
	}
	for _, p := range pc.Peers {
		if err := d.addPeer(p); err != nil {
			return nil, err
		}
	}
	for _, b := range cfg.Backends {
		if rw, ok := b.(interface {
			RekeyWanted() <-chan identity.PublicKey
		}); ok {
			d.wg.Add(1)
			go d.serveRekeys(rw.RekeyWanted())
		}
	}
	d.metrics = newMetrics(d)
	d.log.Info("pspd started", "version", Version, "listen", d.ep.Addr(), "public_key", id.Public().String(),
		"backends", fmt.Sprint(cfg.Report.Available()), "peers", len(pc.Peers), "fips140", fips140.Enabled())
	return d, nil
}

// candidates lists the backends a peer may use, best first, among those
// this daemon runs.
func (d *Daemon) candidates(pc policy.Peer, global policy.Backend) ([]wire.Backend, error) {
	cs, err := offload.Candidates(pc.Backend.OrDefault(global), d.report)
	if err != nil {
		return nil, err
	}
	var out []wire.Backend
	for _, b := range cs {
		if d.backends[b] != nil {
			out = append(out, b)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("backend %s was not started because no peer used it when pspd started; restart pspd to use it", cs[0])
	}
	return out, nil
}

func (d *Daemon) addPeer(pc policy.Peer) error {
	cs, err := d.candidates(pc, d.cfg.Backend)
	if err != nil {
		return fmt.Errorf("peer %s: %w", pc.Name, err)
	}
	ctx, stop := context.WithCancel(d.ctx)
	p := &peer{cfg: pc, backend: cs[0], stop: stop, created: map[uint32]time.Time{}, on: map[wire.Backend]int{}}
	// The best backend gets the peer now, so that with
	// require_encryption its traffic is held back from the start; the
	// one the key exchange settles on gets it with the first SA.
	if err := d.attach(p, cs[0]); err != nil {
		stop()
		return fmt.Errorf("peer %s: %w", pc.Name, err)
	}
	d.kmu.Lock()
	d.byKey[pc.PublicKey] = p
	d.kmu.Unlock()
	p.kx, err = d.ep.AddPeer(keyexchange.PeerConfig{
		Key: pc.PublicKey, Addr: pc.Endpoint, Backends: cs, Suite: pc.Suite,
		RekeyInterval: d.cfg.RekeyInterval,
	})
	if err != nil {
		d.forget(p)
		stop()
		return fmt.Errorf("peer %s: %w", pc.Name, err)
	}
	d.peers[pc.Name] = p
	d.wg.Add(1)
	go d.watch(ctx, p)
	return nil
}

func (d *Daemon) removePeer(name string) {
	p := d.peers[name]
	if p == nil {
		return
	}
	delete(d.peers, name)
	p.stop()
	p.kx.Close() // removes the peer's SAs through the backends
	d.forget(p)
	d.events.publish(localapi.Event{Kind: "peer-removed", Peer: name})
}

// watch turns a peer's generations into events.
func (d *Daemon) watch(ctx context.Context, p *peer) {
	defer d.wg.Done()
	var last uint32
	for {
		sa, err := p.kx.Wait(ctx, func(sa keyexchange.SA) bool { return sa.Generation != last })
		if err != nil {
			return
		}
		d.mu.Lock()
		p.created[sa.Generation] = time.Now()
		for g := range p.created {
			if g+8 < sa.Generation {
				delete(p.created, g) // keep the map bounded
			}
		}
		kind := "rekey"
		if last == 0 || sa.Generation < last {
			kind = "assoc-up"
		} else {
			p.rekeys++
		}
		d.mu.Unlock()
		d.events.publish(localapi.Event{Kind: kind, Peer: p.cfg.Name, Assoc: assocID(p.cfg.Name, sa),
			Detail: fmt.Sprintf("generation %d rx %v tx %v on %s", sa.Generation, sa.RxSPI, sa.TxSPI, sa.Backend)})
		d.log.Info("association current", "peer", p.cfg.Name, "sa", &sa)
		last = sa.Generation
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
			d.events.publish(localapi.Event{Kind: ev.Kind, Detail: ev.Detail})
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
			var target *peer
			for _, p := range d.peers {
				if p.cfg.PublicKey == key {
					target = p
				}
			}
			d.mu.Unlock()
			if target == nil {
				continue
			}
			go func() {
				ctx, cancel := context.WithTimeout(d.ctx, 30*time.Second)
				defer cancel()
				if _, err := target.kx.Rekey(ctx); err != nil {
					d.log.Warn("rekey asked for by the data plane failed", "peer", target.cfg.Name, "err", err)
				}
			}()
		}
	}
}

func assocID(peer string, sa keyexchange.SA) string {
	return fmt.Sprintf("%s/%d", peer, sa.ID)
}

// Reload applies a new configuration or refuses it whole.
func (d *Daemon) Reload(next *policy.Config) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	diff, err := policy.Reload(d.cfg, next)
	if err != nil {
		return err
	}
	// Check every added or changed peer can be served before touching any.
	for _, p := range slices.Concat(diff.Added, diff.Changed) {
		if _, err := d.candidates(p, next.Backend); err != nil {
			return fmt.Errorf("reload refused, nothing applied: peer %s: %w", p.Name, err)
		}
	}
	for _, p := range slices.Concat(diff.Removed, diff.Changed) {
		d.removePeer(p.Name)
	}
	d.cfg = next
	for _, p := range slices.Concat(diff.Added, diff.Changed) {
		if err := d.addPeer(p); err != nil {
			d.log.Error("reload: peer could not be added", "peer", p.Name, "err", err)
		}
	}
	d.log.Info("configuration reloaded", "added", len(diff.Added), "removed", len(diff.Removed), "changed", len(diff.Changed))
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
		mln, err := net.Listen("tcp", addr)
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

// Close stops every peer (removing their SAs), the control socket and the
// backends.
func (d *Daemon) Close() {
	d.mu.Lock()
	for name := range d.peers {
		d.removePeer(name)
	}
	d.mu.Unlock()
	if d.ep != nil {
		d.ep.Close()
	}
	d.cancel()
	d.wg.Wait()
	for _, b := range d.backends {
		b.Close()
	}
	if d.psp != nil {
		d.psp.Close()
	}
	d.log.Info("pspd stopped")
}

// Addr is the control socket's address.
func (d *Daemon) Addr() net.Addr { return net.UDPAddrFromAddrPort(d.ep.Addr()) }
