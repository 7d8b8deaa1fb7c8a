package main

import (
	"context"
	"log/slog"
	"slices"

	"github.com/pspd/pspd/keyexchange/wire"
	"github.com/pspd/pspd/offload"
	"github.com/pspd/pspd/offload/psp"
	"github.com/pspd/pspd/policy"
	userspacebackend "github.com/pspd/pspd/userspace/backend"
	xfrmbackend "github.com/pspd/pspd/xfrm/backend"
)

// probe finds out which backends this host can run for pc, best first.
func probe(ctx context.Context, pc *policy.Config) offload.Report {
	return offload.Probe(ctx, []offload.Prober{
		{Backend: wire.BackendPSP, Probe: func(context.Context) error { return psp.Probe(0) }},
		{Backend: wire.BackendXFRM, Probe: func(ctx context.Context) error { return xfrmbackend.Probe(ctx, pc, 0) }},
		{Backend: wire.BackendUserspace, Probe: userspacebackend.Probe},
	})
}

// setupBackends starts the backends the configuration may use, of those
// the probe report says this host can run, and the PSP manager when the
// host has kernel PSP. On error nothing is left running.
func setupBackends(ctx context.Context, pc *policy.Config, report offload.Report, log *slog.Logger) (_ map[wire.Backend]offload.Backend, _ *psp.Manager, err error) {
	// Only the backends some peer may use are started (a userspace data
	// plane nobody uses would still hold a TUN device and a port). With
	// auto that is every one this host can run, because the peer's offer
	// decides; with no peers yet, the ones new peers would get by default.
	used := map[wire.Backend]bool{}
	wants := []policy.Backend{pc.Backend}
	for _, p := range pc.Peers {
		wants = append(wants, p.Backend.OrDefault(pc.Backend))
	}
	if len(pc.Peers) > 0 {
		wants = wants[1:]
	}
	for _, w := range wants {
		cs, _ := offload.Candidates(w, report)
		for _, b := range cs {
			used[b] = true
		}
	}
	backends := map[wire.Backend]offload.Backend{}
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
		case b == wire.BackendXFRM:
			xb, err := xfrmbackend.New(ctx, xfrmbackend.Config{Policy: pc, Logger: log.With("part", "xfrm")})
			if err != nil {
				return nil, nil, err
			}
			backends[b] = xb
		case b == wire.BackendUserspace:
			ub, err := userspacebackend.New(ctx, pc, log)
			if err != nil {
				return nil, nil, err
			}
			backends[b] = ub
		}
	}
	var pm *psp.Manager
	if slices.Contains(report.Available(), wire.BackendPSP) {
		if pm, err = psp.New(ctx, psp.Config{Suite: pc.Suite, Rotation: pc.PSPRotation, Logger: log.With("part", "psp")}); err != nil {
			return nil, nil, err
		}
	}
	return backends, pm, nil
}
