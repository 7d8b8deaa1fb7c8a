package main

import (
	"context"
	"log/slog"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/internal/daemon"
	"github.com/pspd/pspd/offload"
	"github.com/pspd/pspd/offload/psp"
	"github.com/pspd/pspd/policy"
)

// probe finds out which backends this host can run for pc, best first.
func probe(ctx context.Context, pc *policy.Config) offload.Report { return daemon.Probe(ctx, pc) }

// setupBackends starts the backends pc may use; see daemon.StartBackends.
func setupBackends(ctx context.Context, pc *policy.Config, report offload.Report, log *slog.Logger) (map[assoc.Backend]offload.Backend, *psp.Manager, error) {
	return daemon.StartBackends(ctx, pc, report, log)
}
