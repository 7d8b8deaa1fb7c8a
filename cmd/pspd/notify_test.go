package main

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pspd/pspd/internal/nstest"
	"github.com/pspd/pspd/localapi/client"
)

// notifySocket is a stand-in for systemd's end of $NOTIFY_SOCKET.
type notifySocket struct {
	path string
	c    *net.UnixConn
}

func newNotifySocket(t *testing.T) *notifySocket {
	path := filepath.Join(t.TempDir(), "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &notifySocket{path: path, c: c}
}

// next returns the next message, failing the test after timeout.
func (n *notifySocket) next(t *testing.T, timeout time.Duration) string {
	t.Helper()
	buf := make([]byte, 4096)
	n.c.SetReadDeadline(time.Now().Add(timeout))
	k, err := n.c.Read(buf)
	if err != nil {
		t.Fatalf("no sd_notify message within %v: %v", timeout, err)
	}
	return string(buf[:k])
}

// startPspd starts pspd run --config cfg in the namespace ns, telling sd;
// the test's cleanup kills it and logs its stderr if the test failed.
func startPspd(t *testing.T, ns int, cfg string, sd *notifySocket) (*exec.Cmd, chan error) {
	t.Helper()
	var daemon *exec.Cmd
	var stderr strings.Builder
	nstest.Do(t, ns, func() {
		daemon = exec.Command(os.Args[0], "run", "--config", cfg, "--log-format", "text")
		daemon.Env = append(os.Environ(), "PSPD_TEST_AS_PSPD=1", "NOTIFY_SOCKET="+sd.path)
		daemon.Stderr = &stderr
		if err := daemon.Start(); err != nil {
			t.Fatal(err)
		}
	})
	exited := make(chan error, 1)
	go func() { exited <- daemon.Wait() }()
	t.Cleanup(func() {
		daemon.Process.Kill()
		err := <-exited
		exited <- err
		if t.Failed() {
			t.Logf("pspd stderr:\n%s", stderr.String())
		}
	})
	return daemon, exited
}

// TestNotifyReadyAndReload: under Type=notify, pspd says READY=1 once its
// API socket answers; pspd reload (ExecReload) succeeds for an applied
// reload and fails, with the daemon's reason, for a refused one or a
// broken file, each reload framed by RELOADING=1 and READY=1; SIGTERM
// says STOPPING=1 and removes the state file.
func TestNotifyReadyAndReload(t *testing.T) {
	ns := nstest.New(t, "pspdnfy")
	sd := newNotifySocket(t)
	cfg := writeConfig(t, "backend: userspace\nuserspace:\n  interface: pspdn0\n  io: udp")
	orig, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(filepath.Dir(cfg), "pspd.sock")

	daemon, exited := startPspd(t, ns, cfg, sd)

	if msg := sd.next(t, 20*time.Second); !strings.Contains(msg, "READY=1") {
		t.Fatalf("first message %q, want READY=1", msg)
	}
	if c, err := net.Dial("unix", sock); err != nil {
		t.Fatalf("READY=1 sent but the API socket does not answer: %v", err)
	} else {
		c.Close()
	}

	reload := func() (string, int) {
		out, errOut, code := pspdExec(t, -1, "reload", "--config", cfg, "--pid", "0", "--timeout", "20s")
		return out + errOut, code
	}
	expectReloadFrame := func(wantStatus string) {
		t.Helper()
		if msg := sd.next(t, 5*time.Second); !strings.Contains(msg, "RELOADING=1") || !strings.Contains(msg, "MONOTONIC_USEC=") {
			t.Errorf("reload began with %q, want RELOADING=1 and MONOTONIC_USEC", msg)
		}
		if msg := sd.next(t, 5*time.Second); !strings.Contains(msg, "READY=1") || !strings.Contains(msg, wantStatus) {
			t.Errorf("reload ended with %q, want READY=1 and %q", msg, wantStatus)
		}
	}

	// A reload that applies: one more peer.
	peer, err := run(t, "genkey", "--identity", filepath.Join(filepath.Dir(cfg), "peer2.pem"))
	if err != nil {
		t.Fatal(err)
	}
	added := string(orig) + "  - name: c\n    endpoint: 192.0.2.3\n    public_key: " + strings.TrimSpace(peer) + "\n    prefixes: [10.8.0.0/16]\n"
	if err := os.WriteFile(cfg, []byte(added), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, code := reload(); code != 0 || !strings.Contains(out, "configuration reloaded") {
		t.Fatalf("applied reload: exit %d, %q", code, out)
	}
	expectReloadFrame("configuration reloaded")

	// One the daemon refuses: listen needs a restart.
	if err := os.WriteFile(cfg, []byte(strings.Replace(added, "listen: 0.0.0.0:6082", "listen: 0.0.0.0:6083", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, code := reload(); code != 1 || !strings.Contains(out, "needs a restart") {
		t.Errorf("refused reload: exit %d, %q; want 1 and the daemon's reason", code, out)
	}
	expectReloadFrame("last reload refused")

	// A reload through the API (pspctl reload) is one too: systemd hears
	// of it, and so does pspd reload's state file.
	if err := os.WriteFile(cfg, []byte(added), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := client.New(sock).Reload(t.Context()); err != nil {
		t.Fatalf("API reload: %v", err)
	}
	expectReloadFrame("configuration reloaded")
	if st, err := readReloadState(reloadStatePath(sock)); err != nil || !st.OK || st.Seq != 3 {
		t.Errorf("state file after the API reload: %+v %v; want the third reload, applied", st, err)
	}

	// A broken file is refused before the daemon is bothered.
	if err := os.WriteFile(cfg, []byte(added+"bogus_field: 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, code := reload(); code != 1 || !strings.Contains(out, "bogus_field") {
		t.Errorf("broken file: exit %d, %q; want 1 naming the field", code, out)
	}

	daemon.Process.Signal(syscall.SIGTERM)
	if msg := sd.next(t, 10*time.Second); !strings.Contains(msg, "STOPPING=1") {
		t.Errorf("on SIGTERM %q, want STOPPING=1", msg)
	}
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			t.Errorf("pspd after SIGTERM: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("pspd did not stop within 10s of SIGTERM")
	}
	if _, err := os.Stat(reloadStatePath(sock)); !os.IsNotExist(err) {
		t.Errorf("state file after stop: %v", err)
	}
}

// TestReloadRefusesStaleState: a state file left by a pspd that was
// killed names a pid that may since belong to another process; pspd reload
// must not send it SIGHUP when no pspd with that pid serves the socket.
func TestReloadRefusesStaleState(t *testing.T) {
	cfg := writeConfig(t, "")
	sock := filepath.Join(filepath.Dir(cfg), "pspd.sock")
	bystander := exec.Command("sleep", "30")
	if err := bystander.Start(); err != nil {
		t.Fatal(err)
	}
	died := make(chan error, 1)
	go func() { died <- bystander.Wait() }()
	defer bystander.Process.Kill()
	if err := writeReloadState(reloadStatePath(sock), reloadState{PID: bystander.Process.Pid, OK: true, Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	_, errOut, code := pspdExec(t, -1, "reload", "--config", cfg, "--timeout", "1s")
	if code != 1 || !strings.Contains(errOut, "no pspd is serving") {
		t.Errorf("exit %d, stderr %q; want 1 and that no pspd serves the socket", code, errOut)
	}
	select {
	case err := <-died:
		t.Fatalf("pspd reload signalled the stale pid: the bystander died (%v)", err)
	case <-time.After(200 * time.Millisecond):
	}
}
