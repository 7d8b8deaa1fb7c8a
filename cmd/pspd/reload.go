package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/policy"
)

// reloadState is what a running pspd says about its configuration, in a
// file beside its API socket: written at start (Seq 0) and after every
// SIGHUP, so that pspd reload (the unit's ExecReload) can report a
// refused reload as a failure instead of only logging it.
type reloadState struct {
	PID   int       `json:"pid"`
	Seq   uint64    `json:"seq"` // reloads handled since start
	OK    bool      `json:"ok"`  // the last reload applied (true at start)
	Error string    `json:"error,omitempty"`
	Time  time.Time `json:"time"`
}

func reloadStatePath(socket string) string { return socket + ".reload" }

// writeReloadState replaces the file in one rename, so a reader never
// sees half of it.
func writeReloadState(path string, st reloadState) error {
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("reload state: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("reload state: %w", err)
	}
	return nil
}

func readReloadState(path string) (reloadState, error) {
	var st reloadState
	b, err := os.ReadFile(path)
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("reload state %s: %w", path, err)
	}
	return st, nil
}

func newReloadCmd() *cobra.Command {
	var cfgPath string
	var pid int
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "reload --config FILE",
		Short: "make the running pspd reload its configuration and report whether it applied",
		Long: `reload checks the configuration file, sends SIGHUP to the pspd serving its
socket and waits for that pspd's verdict. It exits non-zero, with the reason,
when the file is broken or the daemon refuses the reload (which then leaves
the running configuration unchanged). It is the systemd unit's ExecReload.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			pc, err := policy.Load(cfgPath)
			if err != nil {
				return fmt.Errorf("reload refused, nothing applied: %w", err)
			}
			path := reloadStatePath(pc.Socket)
			before, err := readReloadState(path)
			if errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("no pspd is running for %s (%s does not exist)", cfgPath, path)
			}
			if err != nil {
				return err
			}
			if pid != 0 && pid != before.PID {
				return fmt.Errorf("%s is pid %d's, not --pid %d's; is another pspd using socket %s?", path, before.PID, pid, pc.Socket)
			}
			// A pspd that was killed leaves its state file, and its pid may
			// be another process's by now: signal only the one serving the
			// socket.
			server, err := socketServer(pc.Socket)
			if err != nil {
				return fmt.Errorf("no pspd is serving %s (%v); %s is stale", pc.Socket, err, path)
			}
			if server != before.PID {
				return fmt.Errorf("%s names pid %d, but pid %d serves %s", path, before.PID, server, pc.Socket)
			}
			if err := syscall.Kill(before.PID, syscall.SIGHUP); err != nil {
				return fmt.Errorf("signal pspd (pid %d): %w", before.PID, err)
			}
			deadline := time.Now().Add(timeout)
			for {
				st, err := readReloadState(path)
				switch {
				case err != nil && !errors.Is(err, fs.ErrNotExist):
					return err
				case err == nil && st.PID != before.PID:
					return fmt.Errorf("pspd (pid %d) was replaced by pid %d during the reload", before.PID, st.PID)
				case err == nil && st.Seq > before.Seq && st.OK:
					fmt.Fprintln(cmd.OutOrStdout(), "configuration reloaded")
					return nil
				case err == nil && st.Seq > before.Seq:
					return errors.New(st.Error)
				case errors.Is(err, fs.ErrNotExist):
					return fmt.Errorf("pspd (pid %d) stopped during the reload", before.PID)
				case time.Now().After(deadline):
					return fmt.Errorf("pspd (pid %d) did not answer the reload within %v", before.PID, timeout)
				}
				time.Sleep(20 * time.Millisecond)
			}
		},
	}
	cmd.Flags().StringVar(&cfgPath, "config", "/etc/pspd/pspd.yaml", "configuration file the running pspd was started with")
	cmd.Flags().IntVar(&pid, "pid", 0, "the pspd expected to answer (systemd's $MAINPID); 0: whichever serves the socket")
	cmd.Flags().DurationVar(&timeout, "timeout", 30*time.Second, "how long to wait for the daemon's verdict")
	return cmd
}

// socketServer is the pid of the process listening on the unix socket
// path (SO_PEERCRED of a connection to it).
func socketServer(path string) (int, error) {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	cred, err := localapi.PeerCred(c.(*net.UnixConn))
	if err != nil {
		return 0, err
	}
	return int(cred.PID), nil
}
