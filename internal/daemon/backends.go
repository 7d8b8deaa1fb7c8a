package daemon

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/offload"
	"github.com/pspd/pspd/offload/psp"
	"github.com/pspd/pspd/policy"
	userspacebackend "github.com/pspd/pspd/userspace/backend"
	"github.com/pspd/pspd/userspace/codec"
	"github.com/pspd/pspd/xfrm"
	xfrmbackend "github.com/pspd/pspd/xfrm/backend"
)

// specs are the configured peers as backend b is given them; peers b
// cannot take are left out (AddPeer reports them).
func specs(pc *policy.Config, b assoc.Backend) []offload.PeerSpec {
	var out []offload.PeerSpec
	for _, p := range pc.Peers {
		if s, err := spec(p, pc, b); err == nil {
			out = append(out, s)
		}
	}
	return out
}

// usable lists the backends peer pc may use under cfg on a host with
// report, best first: those the configuration and the host allow, that
// run (running; nil: any), and that can take the peer as configured (the
// userspace data plane cannot take a peer without prefixes, XFRM can).
func usable(pc policy.Peer, cfg *policy.Config, report offload.Report, running func(assoc.Backend) bool) ([]assoc.Backend, error) {
	want, _ := assoc.ParseBackend(string(pc.Backend.OrDefault(cfg.Backend))) // auto: 0
	cs, err := offload.Candidates(want, report)
	if err != nil {
		return nil, err
	}
	var out []assoc.Backend
	var refused error
	for _, b := range cs {
		if running != nil && !running(b) {
			continue
		}
		if _, err := spec(pc, cfg, b); err != nil {
			refused = cmp.Or(refused, err)
			continue
		}
		out = append(out, b)
	}
	switch {
	case len(out) > 0:
		return out, nil
	case refused != nil:
		return nil, refused
	}
	return nil, fmt.Errorf("backend %s was not started because no peer used it when pspd started; restart pspd to use it", cs[0])
}

// CheckSpecs refuses, as New would, a peer of pc that no backend it may
// use on a host with report can take (a userspace peer without prefixes,
// say), so that pspd check says what pspd run would. Peers no backend is
// available for at all are the caller's to report.
func CheckSpecs(pc *policy.Config, report offload.Report) error {
	var errs []error
	for i, p := range pc.Peers {
		want, _ := assoc.ParseBackend(string(p.Backend.OrDefault(pc.Backend)))
		if _, err := offload.Candidates(want, report); err != nil {
			continue
		}
		if _, err := usable(p, pc, report, nil); err != nil {
			f := fmt.Sprintf("peers[%d]", i)
			errs = append(errs, &policy.FieldError{File: pc.File, Line: pc.Line(f), Field: f, Err: err})
		}
	}
	return errors.Join(errs...)
}

// Probe finds out which backends this host can run for pc, best first.
func Probe(ctx context.Context, pc *policy.Config) offload.Report {
	return offload.Probe(ctx, []offload.Prober{
		{Backend: assoc.BackendPSP, Probe: func(context.Context) error { return psp.Probe(0) }},
		{Backend: assoc.BackendXFRM, Probe: func(ctx context.Context) error {
			return xfrmbackend.Probe(ctx, specs(pc, assoc.BackendXFRM), 0)
		}},
		{Backend: assoc.BackendUserspace, Probe: userspacebackend.Probe},
	})
}

// StartBackends starts the backends the configuration may use, of those
// the probe report says this host can run, and the PSP manager when the
// host has kernel PSP. On error nothing is left running.
func StartBackends(ctx context.Context, pc *policy.Config, report offload.Report, log *slog.Logger) (_ map[assoc.Backend]offload.Backend, _ *psp.Manager, err error) {
	// Only the backends some peer may use are started (a userspace data
	// plane nobody uses would still hold a TUN device and a port). With
	// auto that is every one this host can run, because the peer's offer
	// decides; with no peers yet, the ones new peers would get by default.
	used := map[assoc.Backend]bool{}
	wants := []policy.Backend{pc.Backend}
	for _, p := range pc.Peers {
		wants = append(wants, p.Backend.OrDefault(pc.Backend))
	}
	if len(pc.Peers) > 0 {
		wants = wants[1:]
	}
	for _, w := range wants {
		want, _ := assoc.ParseBackend(string(w))
		cs, _ := offload.Candidates(want, report)
		for _, b := range cs {
			used[b] = true
		}
	}
	backends := map[assoc.Backend]offload.Backend{}
	defer func() {
		if err != nil {
			for _, b := range backends {
				b.Close()
			}
		}
	}()
	for _, b := range report.Available() {
		switch {
		case !used[b]:
		case b == assoc.BackendXFRM:
			mode, err := xfrm.ParseOffloadMode(string(pc.Offload))
			if err != nil {
				return nil, nil, fmt.Errorf("offload: %w", err)
			}
			xb, err := xfrmbackend.New(ctx, xfrmbackend.Config{Offload: mode, Logger: log.With("part", "xfrm"), Peers: specs(pc, b)})
			if err != nil {
				return nil, nil, err
			}
			backends[b] = xb
		case b == assoc.BackendUserspace:
			us := pc.Userspace
			fr := codec.Geneve
			if us.Framing == policy.FramingPSP {
				fr = codec.PSPTunnel
			}
			ub, err := userspacebackend.New(ctx, userspacebackend.Config{
				Interface: us.Interface, Address: us.Address, Listen: pc.Listen.Addr(), Port: us.Port,
				Framing: fr, IO: userspacebackend.IO(us.IO), Logger: log, Peers: specs(pc, b),
			})
			if err != nil {
				return nil, nil, err
			}
			backends[b] = ub
		}
	}
	var pm *psp.Manager
	if slices.Contains(report.Available(), assoc.BackendPSP) {
		if pm, err = psp.New(ctx, psp.Config{Suite: pc.Suite, Rotation: pc.PSPRotation, Logger: log.With("part", "psp")}); err != nil {
			return nil, nil, err
		}
	}
	return backends, pm, nil
}

// backendNames is bs by name, for logs: a list in JSON, not one string.
func backendNames(bs []assoc.Backend) []string {
	names := make([]string, 0, len(bs))
	for _, b := range bs {
		names = append(names, b.String())
	}
	return names
}
