package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/pspd/pspd/internal/nstest"
)

// TestLiveMetricsPassPromtool: a running pspd's /metrics carries its
// metrics and passes promtool check metrics (Prometheus's naming and
// exposition lint). promtool comes with Debian's prometheus package
// (tests/deps.sh); without it the test skips, except in CI.
func TestLiveMetricsPassPromtool(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("promtool missing in CI: tests/deps.sh installs Debian's prometheus package")
		}
		t.Skip("promtool not installed (apt-get install prometheus, or tests/deps.sh)")
	}
	ns := nstest.NewUp(t, "pspdmet")
	cfg := writeConfig(t, "backend: userspace\nuserspace:\n  interface: pspdm0\n  io: udp")
	body, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfg, bytes.Replace(body, []byte(`metrics: "off"`), []byte("metrics: 127.0.0.1:9472"), 1), 0o600); err != nil {
		t.Fatal(err)
	}
	sd := newNotifySocket(t)
	startPspd(t, ns, cfg, sd)
	if msg := sd.next(t, 20*time.Second); !strings.Contains(msg, "READY=1") {
		t.Fatalf("first message %q, want READY=1", msg)
	}
	var metrics []byte
	deadline := time.Now().Add(10 * time.Second)
	for {
		var err error
		// The connection is dialled on this thread, in the namespace: the
		// transport would dial from another goroutine, in the host's.
		var conn net.Conn
		nstest.Do(t, ns, func() { conn, err = net.Dial("tcp", "127.0.0.1:9472") })
		if err == nil {
			c := http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
				DisableKeepAlives: true,
				DialContext:       func(context.Context, string, string) (net.Conn, error) { return conn, nil },
			}}
			var resp *http.Response
			if resp, err = c.Get("http://127.0.0.1:9472/metrics"); err == nil {
				metrics, err = io.ReadAll(resp.Body)
				resp.Body.Close()
			}
		}
		if err == nil || time.Now().After(deadline) {
			if err != nil {
				t.Fatal(err)
			}
			break
		}
		time.Sleep(100 * time.Millisecond) // the metrics listener comes up just after READY=1
	}
	for _, want := range []string{"pspd_peers{", "pspd_handshakes_total{", "pspd_rekeys_total{", "process_start_time_seconds"} {
		if !bytes.Contains(metrics, []byte(want)) {
			t.Errorf("/metrics lacks %s:\n%s", want, metrics)
		}
	}
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = bytes.NewReader(metrics)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}
