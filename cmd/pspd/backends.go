package main

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/pspd/pspd/keyexchange/wire"
	"github.com/pspd/pspd/offload"
	"github.com/pspd/pspd/policy"
	userspacebackend "github.com/pspd/pspd/userspace/backend"
)

// setupBackends probes what this host can run and starts the backends the
// configuration may use. On error nothing is left running.
func setupBackends(ctx context.Context, pc *policy.Config, log *slog.Logger) (offload.Report, map[wire.Backend]offload.Backend, error) {
	report := offload.Probe(ctx, []offload.Prober{
		{Backend: wire.BackendUserspace, Probe: userspacebackend.Probe},
	})
	wanted := func(b policy.Backend) bool {
		if pc.Backend == b || pc.Backend == policy.BackendAuto {
			return true
		}
		for _, p := range pc.Peers {
			if p.Backend == b {
				return true
			}
		}
		return false
	}
	backends := map[wire.Backend]offload.Backend{}
	for _, b := range report.Available() {
		if b == wire.BackendUserspace && wanted(policy.BackendUserspace) {
			ub, err := userspacebackend.New(ctx, pc, log)
			if err != nil {
				return nil, nil, fmt.Errorf("pspd: %w", err)
			}
			backends[b] = ub
		}
	}
	return report, backends, nil
}
