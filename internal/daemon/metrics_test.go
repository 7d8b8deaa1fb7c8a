package daemon

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"

	"github.com/pspd/pspd/localapi/client"
)

// lint fails the test for what Prometheus's linter (promtool check
// metrics) finds in the daemon's metrics.
func lint(t *testing.T, r *prometheus.Registry) {
	t.Helper()
	mfs, err := r.Gather()
	if err != nil {
		t.Fatal(err)
	}
	problems, err := promlint.NewWithMetricFamilies(mfs).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		if strings.HasPrefix(p.Metric, "pspd_") {
			t.Errorf("metric %s: %s", p.Metric, p.Text)
		}
	}
}

// TestMetrics: drops carry one set of reason names whatever the backend
// calls them; every session state has its series, so backoff is not
// folded into connecting; build info and the outcome of the latest
// reload are exported.
func TestMetrics(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the local API answers root or the pspd group only")
	}
	a, b := newHost(t, "a"), newHost(t, "b") // b never starts
	a.start(t, a.config(t, "", b))
	a.rec.SetDrops(map[string]uint64{"tx-no-sa": 3, "auth-failed": 2})
	r := a.d.metrics
	if v, _ := sample(t, r, "pspd_drops_total", map[string]string{"backend": "userspace", "reason": "outbound-no-sa"}); v != 3 {
		t.Errorf("pspd_drops_total{reason=outbound-no-sa} = %v, want the backend's 3 tx-no-sa", v)
	}
	if _, ok := sample(t, r, "pspd_drops_total", map[string]string{"reason": "tx-no-sa"}); ok {
		t.Error("pspd_drops_total has the userspace name tx-no-sa beside outbound-no-sa")
	}
	if v, _ := sample(t, r, "pspd_drops_total", map[string]string{"reason": "auth-failed"}); v != 2 {
		t.Errorf("pspd_drops_total{reason=auth-failed} = %v, want 2", v)
	}
	var total float64
	for _, s := range []string{"down", "connecting", "handshaking", "up", "backoff"} {
		v, ok := sample(t, r, "pspd_peers", map[string]string{"state": s})
		if !ok {
			t.Errorf("pspd_peers{state=%q} missing", s)
		}
		total += v
		if st, _ := sample(t, r, "pspd_peer_state", map[string]string{"peer": "b", "state": s}); st != 0 && st != 1 {
			t.Errorf("pspd_peer_state{peer=b,state=%s} = %v", s, st)
		}
	}
	if total != 1 {
		t.Errorf("pspd_peers sums to %v over the states, want 1 peer", total)
	}
	if up, ok := sample(t, r, "pspd_peer_up", map[string]string{"peer": "b"}); !ok || up != 0 {
		t.Errorf("pspd_peer_up{peer=b} = %v (%v), want 0", up, ok)
	}
	if v, ok := sample(t, r, "pspd_peer_down_since_timestamp_seconds", map[string]string{"peer": "b"}); !ok || v <= 0 || v > float64(time.Now().Unix()+1) {
		t.Errorf("pspd_peer_down_since_timestamp_seconds{peer=b} = %v (%v), want when b was added", v, ok)
	}
	ps, err := client.New(a.sock).Peers(context.Background())
	if err != nil || len(ps) != 1 || ps[0].State == "up" || ps[0].DownSince.IsZero() {
		t.Errorf("peer list of a peer that never came up: %+v %v; want not up, with down_since", ps, err)
	}
	if v, ok := sample(t, r, "pspd_build_info", map[string]string{"version": Version}); !ok || v != 1 {
		t.Errorf("pspd_build_info{version=%s} = %v (%v)", Version, v, ok)
	}
	if v, _ := sample(t, r, "pspd_reload_success", nil); v != 1 {
		t.Errorf("pspd_reload_success = %v at start, want 1", v)
	}
	lint(t, r)
	at, _ := sample(t, r, "pspd_reload_timestamp_seconds", nil)
	if err := a.d.Reload(a.config(t, "packet_budget: 4096\n", b)); err == nil {
		t.Fatal("a reload changing packet_budget was applied; it needs a restart")
	}
	if v, _ := sample(t, r, "pspd_reload_success", nil); v != 0 {
		t.Errorf("pspd_reload_success = %v after a refused reload, want 0", v)
	}
	if at2, _ := sample(t, r, "pspd_reload_timestamp_seconds", nil); at2 <= at {
		t.Errorf("pspd_reload_timestamp_seconds %v did not move from %v", at2, at)
	}
}

// TestAPIReload: POST /v1/reload reads the daemon's file again; a refused
// reload answers 409 with the daemon's reason and leaves the status
// saying so, an applied one clears it.
func TestAPIReload(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the local API answers root or the pspd group only")
	}
	a, b, c := newHost(t, "a"), newHost(t, "b"), newHost(t, "c")
	a.start(t, a.config(t, "", b))
	ca := client.New(a.sock)
	ctx := context.Background()
	a.config(t, "packet_budget: 4096\n", b) // rewrites a's file
	var ae *client.APIError
	if _, err := ca.Reload(ctx); !errors.As(err, &ae) || ae.Status != 409 || !strings.Contains(ae.Message, "needs a restart") {
		t.Fatalf("refused reload through the API: %v; want 409 naming the setting that needs a restart", err)
	}
	st, err := ca.Status(ctx)
	if err != nil || !strings.Contains(st.LastReloadError, "packet_budget") {
		t.Fatalf("status after a refused reload: %+v %v", st, err)
	}
	a.config(t, "", b, c)
	r, err := ca.Reload(ctx)
	if err != nil || r.File != filepath.Join(a.dir, "pspd.yaml") || r.Time.IsZero() {
		t.Fatalf("applied reload: %+v %v", r, err)
	}
	st, err = ca.Status(ctx)
	if err != nil || st.LastReloadError != "" || st.Peers != 2 || !st.LastReload.Equal(r.Time) {
		t.Fatalf("status after an applied reload: %+v %v", st, err)
	}
}
