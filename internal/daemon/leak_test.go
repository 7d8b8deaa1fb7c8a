package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"

	"github.com/pspd/pspd/internal/logscan"
	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/localapi/client"
)

// TestNoKeysAnywhere runs a pair through bring-up and two rotations and
// looks for every key either daemon installed, in every encoding logscan
// knows, in everything an operator can read: the logs, what pspctl prints
// as JSON (status, peers, associations), /metrics, and the event stream.
func TestNoKeysAnywhere(t *testing.T) {
	a, b := runningPair(t)
	ca, cb := client.New(a.sock), client.New(b.sock)
	waitAssoc(t, ca, 1)

	var events bytes.Buffer
	var emu sync.Mutex
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		ca.Events(ctx, func(e localapi.Event) error {
			emu.Lock()
			defer emu.Unlock()
			return json.NewEncoder(&events).Encode(e)
		})
	}()
	time.Sleep(100 * time.Millisecond) // subscribed
	for range 2 {
		if _, err := cb.Rotate(context.Background(), localapi.RotateRequest{All: true}); err != nil {
			t.Fatal(err)
		}
	}
	waitAssoc(t, ca, 3)
	time.Sleep(100 * time.Millisecond)
	cancel()
	<-done

	var out bytes.Buffer
	for _, c := range []*client.Client{ca, cb} {
		st, _ := c.Status(context.Background())
		ps, _ := c.Peers(context.Background())
		as, _ := c.Assocs(context.Background())
		json.NewEncoder(&out).Encode([]any{st, ps, as})
	}
	for _, h := range []*host{a, b} {
		mfs, err := h.d.metrics.Gather()
		if err != nil {
			t.Fatal(err)
		}
		enc := expfmt.NewEncoder(&out, expfmt.NewFormat(expfmt.TypeTextPlain))
		for _, mf := range mfs {
			if err := enc.Encode(mf); err != nil {
				t.Fatal(err)
			}
		}
	}
	keys := append(a.rec.Keys(), b.rec.Keys()...)
	if len(keys) < 12 {
		t.Fatalf("the backends were given %d keys, want those of 3 generations on both sides", len(keys))
	}
	emu.Lock()
	if events.Len() == 0 {
		t.Error("the event stream carried nothing across two rotations")
	}
	logscan.AssertNoKeys(t, events.Bytes(), keys...)
	emu.Unlock()
	logscan.AssertNoKeys(t, out.Bytes(), keys...)
	logscan.AssertNoKeys(t, a.logs.Bytes(), keys...)
	logscan.AssertNoKeys(t, b.logs.Bytes(), keys...)
}

// TestMetricsOnUnixSocket: metrics: unix:PATH serves /metrics on a unix
// socket with the API socket's permissions instead of on loopback, where
// any local user could read peer names and traffic.
func TestMetricsOnUnixSocket(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the local API answers root or the pspd group only")
	}
	a := newHost(t, "a")
	sock := filepath.Join(a.dir, "metrics.sock")
	pc := a.config(t, "")
	pc.Metrics = "unix:" + sock
	a.start(t, pc)
	var st os.FileInfo
	var err error
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if st, err = os.Stat(sock); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode()&0o077 != 0 {
		t.Errorf("metrics socket mode %v: others may read it", st.Mode())
	}
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	resp, err := hc.Get("http://pspd/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !bytes.Contains(body, []byte("pspd_handshakes_total")) {
		t.Fatalf("GET /metrics on the unix socket: %d %.200s", resp.StatusCode, body)
	}
}

// TestJSONLogsTyped: the JSON log of a bring-up and two rekeys parses
// line by line, and values come out as the text form shows them: SPIs as
// hex strings, durations as strings, suites, framings and backends by
// name, lists as arrays.
func TestJSONLogsTyped(t *testing.T) {
	a, _ := runningPair(t)
	ca := client.New(a.sock)
	waitAssoc(t, ca, 1)
	for range 2 {
		if _, err := ca.Rotate(context.Background(), localapi.RotateRequest{All: true}); err != nil {
			t.Fatal(err)
		}
	}
	waitAssoc(t, ca, 3)
	lines := bytes.Split(bytes.TrimSpace(a.logs.Bytes()), []byte("\n"))
	if len(lines) < 5 {
		t.Fatalf("only %d log lines", len(lines))
	}
	var check func(key string, v any)
	check = func(key string, v any) {
		switch {
		case strings.Contains(key, "spi"):
			if s, ok := v.(string); !ok || !strings.HasPrefix(s, "0x") {
				t.Errorf("%s = %#v, want a hex string", key, v)
			}
		case key == "suite" || key == "framing" || key == "backend" || key == "state":
			if _, ok := v.(string); !ok {
				t.Errorf("%s = %#v, want a name", key, v)
			}
		case key == "backends":
			if _, ok := v.([]any); !ok {
				t.Errorf("%s = %#v, want an array", key, v)
			}
		case strings.HasSuffix(key, "_in") || strings.HasSuffix(key, "_for") || key == "after" || key == "grace" || key == "interval":
			if _, ok := v.(string); !ok {
				t.Errorf("%s = %#v, want a duration string", key, v)
			}
		}
		if m, ok := v.(map[string]any); ok {
			for k, x := range m {
				check(k, x)
			}
		}
	}
	for _, line := range lines {
		var m map[string]any
		if err := json.Unmarshal(line, &m); err != nil {
			t.Fatalf("log line does not parse: %v\n%s", err, line)
		}
		for k, v := range m {
			check(k, v)
		}
	}
}

// TestObservedAndExpiry: peer list says where the peer's session comes
// from, and assoc list when the generation ends without a rekey.
func TestObservedAndExpiry(t *testing.T) {
	a, _ := runningPair(t)
	ca := client.New(a.sock)
	as := waitAssoc(t, ca, 1)
	if want := as.Created.Add(3 * time.Hour); !as.HardExpiry.Equal(want) { // rekey_interval 1h in the test config
		t.Errorf("hard expiry %v, want %v (3 × rekey_interval after creation)", as.HardExpiry, want)
	}
	ps, err := ca.Peers(context.Background())
	if err != nil || len(ps) != 1 || !strings.HasPrefix(ps[0].Observed, "127.0.0.1:") {
		t.Errorf("peers %+v %v, want b observed on 127.0.0.1", ps, err)
	}
}
