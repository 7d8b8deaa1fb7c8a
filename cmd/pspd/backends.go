package main

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/pspd/pspd/keyexchange/wire"
	"github.com/pspd/pspd/offload"
	"github.com/pspd/pspd/policy"
	userspacebackend "github.com/pspd/pspd/userspace/backend"
	xfrmbackend "github.com/pspd/pspd/xfrm/backend"
)

// probe finds out which backends this host can run for pc, best first.
func probe(ctx context.Context, pc *policy.Config) offload.Report {
	return offload.Probe(ctx, []offload.Prober{
		{Backend: wire.BackendXFRM, Probe: func(ctx context.Context) error { return xfrmbackend.Probe(ctx, pc, 0) }},
		{Backend: wire.BackendUserspace, Probe: userspacebackend.Probe},
	})
}

// setupBackends probes what this host can run and starts the backends the
// configuration may use. On error nothing is left running.
func setupBackends(ctx context.Context, pc *policy.Config, log *slog.Logger) (_ offload.Report, _ map[wire.Backend]offload.Backend, err error) {
	report := probe(ctx, pc)
	// Only the backends some peer will use are started (a userspace data
	// plane nobody uses would still hold a TUN device and a port); with no
	// peers yet, the one new peers would get by default.
	used := map[wire.Backend]bool{}
	for _, p := range pc.Peers {
		if b, err := offload.Choose(p.Backend.OrDefault(pc.Backend), report, nil); err == nil {
			used[b] = true
		}
	}
	if len(pc.Peers) == 0 {
		if b, err := offload.Choose(pc.Backend, report, nil); err == nil {
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
				return nil, nil, fmt.Errorf("pspd: %w", err)
			}
			backends[b] = xb
		case b == wire.BackendUserspace:
			ub, err := userspacebackend.New(ctx, pc, log)
			if err != nil {
				return nil, nil, fmt.Errorf("pspd: %w", err)
			}
			backends[b] = ub
		}
	}
	return report, backends, nil
}
