package main

import (
	"context"
	"crypto/fips140"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/pspd/pspd/internal/daemon"
	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/policy"
)

func newLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want json or text", format)
}

func newRunCmd() *cobra.Command {
	var cfgPath, level, format, group string
	var requireFIPS bool
	cmd := &cobra.Command{
		Use:   "run --config FILE",
		Short: "run the daemon",
		Long: `run loads the configuration, refuses it as pspd check would, takes the local
API socket, starts the data planes the peers may use and keeps a key-exchange
session with every peer until SIGINT or SIGTERM.

SIGHUP reloads the configuration file; a refused reload is logged and leaves
the running configuration as it was (pspd reload reports it). Under systemd
(Type=notify) run reports READY=1 once the local API and control sockets are
up, and RELOADING=1 / READY=1 around each reload.

The local API socket (socket in the configuration) is readable by root and the
members of --api-group; when that group does not exist run warns and the socket
is root-only. Beside the socket, a state file records the last reload's result
for pspd reload (the socket path with .reload appended).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if requireFIPS && !fips140.Enabled() {
				return errors.New("--require-fips: Go's FIPS 140-3 mode is off; start pspd with GODEBUG=fips140=on")
			}
			log, err := newLogger(cmd.ErrOrStderr(), level, format)
			if err != nil {
				return err
			}
			pc, err := policy.Load(cfgPath)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			return runDaemon(ctx, pc, group, log)
		},
	}
	cmd.Flags().StringVar(&cfgPath, "config", "/etc/pspd/pspd.yaml", "configuration file")
	cmd.Flags().StringVar(&level, "log-level", "info", "debug, info, warn or error")
	cmd.Flags().StringVar(&format, "log-format", "json", "json or text")
	cmd.Flags().StringVar(&group, "api-group", localapi.DefaultGroup, "group whose members may read state through the local API")
	cmd.Flags().BoolVar(&requireFIPS, "require-fips", false, "refuse to start unless Go's FIPS 140-3 mode is on")
	return cmd
}

func runDaemon(ctx context.Context, pc *policy.Config, group string, log *slog.Logger) error {
	// Take the API socket first: a second pspd must fail before it touches
	// any kernel state the first one owns.
	auth := localapi.NewAuthorizer(group)
	if !auth.HasGroup {
		log.Warn("the local API's read group does not exist, so the API socket is root-only",
			"group", group, "socket", pc.Socket,
			"fix", "create the group (systemd-sysusers does, with the pspd package's sysusers.d entry; or groupadd --system "+group+") and restart pspd")
	}
	ln, err := localapi.Listen(pc.Socket, auth)
	if err != nil {
		return err
	}
	defer ln.Close()
	// The backends start with the members the cache knows as well as the
	// file's peers, so that their fail-closed state survives a restart.
	var fleet *daemon.Fleet
	all := pc
	if pc.Discovery != nil {
		src, err := daemon.MembershipSource(pc.Discovery, log)
		if err != nil {
			return err
		}
		if fleet, err = daemon.NewFleet(pc, src, log); err != nil {
			return err
		}
		all, _ = fleet.Merge(pc)
	}
	_, report, err := preflight(ctx, all)
	if err != nil {
		return err
	}
	backends, pm, err := setupBackends(ctx, all, report, log)
	if err != nil {
		return err
	}
	// The state file tells pspd reload where to send SIGHUP and, later,
	// how each reload ended; it exists before systemd hears READY=1.
	state := reloadStatePath(pc.Socket)
	sd := newNotifier()
	obs := &reloadObserver{sd: sd, state: state, log: log}
	d, err := daemon.New(ctx, daemon.Config{Policy: pc, Logger: log, Report: report, Backends: backends, PSP: pm, Reloads: obs, Fleet: fleet})
	if err != nil {
		for _, b := range backends {
			b.Close()
		}
		if pm != nil {
			pm.Close()
		}
		return err
	}
	defer d.Close()

	// SIGHUP is caught before the state file tells pspd reload where to
	// send it.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	if err := writeReloadState(state, reloadState{PID: os.Getpid(), OK: true, Time: time.Now()}); err != nil {
		return err
	}
	defer os.Remove(state)
	if err := sd.notify("READY=1", "STATUS=running; local API on "+pc.Socket); err != nil {
		log.Warn("cannot tell systemd that pspd is ready", "err", err)
	}
	defer sd.notify("STOPPING=1")
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
			}
			d.ReloadConfig(ctx) // the observer reports the outcome
		}
	}()
	return d.Serve(ctx, ln, group)
}

// reloadObserver tells systemd and pspd reload about every reload, from
// SIGHUP or the API.
type reloadObserver struct {
	sd    notifier
	state string
	log   *slog.Logger
	seq   uint64 // reloads so far; the daemon calls one reload at a time
}

func (o *reloadObserver) Reloading() {
	if err := o.sd.reloading(); err != nil {
		o.log.Warn("cannot tell systemd about the reload", "err", err)
	}
}

func (o *reloadObserver) Reloaded(err error) {
	o.seq++
	st, status := reloadState{PID: os.Getpid(), Seq: o.seq, OK: err == nil, Time: time.Now()}, "STATUS=running; configuration reloaded"
	if err != nil {
		o.log.Error("reload failed", "err", err)
		st.Error, status = err.Error(), "STATUS=running; last reload refused: "+err.Error()
	}
	// systemd hears READY=1 before pspd reload (ExecReload) sees the
	// result and exits, so the reload job ends in state active.
	if err := o.sd.notify("READY=1", status); err != nil {
		o.log.Warn("cannot tell systemd about the reload", "err", err)
	}
	if err := writeReloadState(o.state, st); err != nil {
		o.log.Error("cannot record the reload's result for pspd reload", "err", err)
	}
}

func newCheckCmd() *cobra.Command {
	var cfgPath string
	cmd := &cobra.Command{
		Use:   "check --config FILE",
		Short: "validate a configuration and probe this host as run would, then exit",
		Long: `check loads the configuration and its identity, probes the backends and
refuses, with a non-zero exit status, every configuration that run would refuse
before it opens a socket: a backend this host cannot run, a userspace.interface
naming a device that is not a TUN device, a peer pinned to this host's own key.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			pc, err := policy.Load(cfgPath)
			if err != nil {
				return err
			}
			id, report, err := preflight(cmd.Context(), pc)
			out := cmd.OutOrStdout()
			for _, a := range report {
				if a.Available {
					fmt.Fprintf(out, "backend %s: available\n", a.Backend)
				} else {
					fmt.Fprintf(out, "backend %s: not available: %s\n", a.Backend, a.Reason)
				}
			}
			if err != nil {
				return err
			}
			var names []string
			for _, p := range pc.Peers {
				names = append(names, p.Name)
			}
			peers := fmt.Sprintf("%d peers", len(names))
			if len(names) == 1 {
				peers = "1 peer"
			}
			if len(names) > 0 {
				peers += ": " + strings.Join(names, ", ")
			}
			if d := pc.Discovery; d != nil {
				src, err := daemon.MembershipSource(d, nil)
				if err != nil {
					return err
				}
				peers += fmt.Sprintf(", and the members of %s as node %s", src.Health().Service, d.Node)
			}
			fmt.Fprintf(out, "%s: ok (identity %s, %s)\n", cfgPath, id.Public().Fingerprint(), peers)
			return nil
		},
	}
	cmd.Flags().StringVar(&cfgPath, "config", "/etc/pspd/pspd.yaml", "configuration file")
	return cmd
}
