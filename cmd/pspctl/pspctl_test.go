package main

import (
	"bytes"
	"context"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/localapi/apitest"
)

var update = flag.Bool("update", false, "rewrite the golden files")

var now = time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)

// fixture is what the in-memory daemon answers; the golden files show how
// pspctl renders it. Real daemons are exercised by the demo test.
func fixture() *apitest.Service {
	return &apitest.Service{
		StatusV: localapi.Status{Version: "0.1.0", PublicKey: "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE", Fingerprint: "sha256:1f2e3d4c",
			Listen: "[::]:6082", Backends: []string{"userspace"}, Started: now.Add(-90 * time.Minute), Peers: 2, PeersUp: 1, Assocs: 1},
		PeersV: []localapi.Peer{
			{Name: "web-2", Endpoint: "192.0.2.2:6082", Fingerprint: "sha256:aa11bb22", State: "up", Backend: "userspace", KeyExchange: "SecP256r1MLKEM768", LastHandshake: now.Add(-42 * time.Second), Assocs: 1},
			{Name: "db-1", Endpoint: "192.0.2.9:6082", Fingerprint: "sha256:cc33dd44", State: "backoff", LastError: "pin mismatch: peer presented sha256:ffff0000"},
		},
		AssocsV: []localapi.Assoc{{ID: "web-2/3", Peer: "web-2", Backend: "userspace", Suite: "aes-gcm-256", RxSPI: 0x00000003, TxSPI: 0x40000003,
			Generation: 3, Created: now.Add(-75 * time.Second), NextRekey: now.Add(525 * time.Second),
			BytesIn: 1536000, PacketsIn: 1100, BytesOut: 2048, PacketsOut: 12, Drops: 4}},
		DevicesV: []localapi.Device{{ID: 1, Ifindex: 4, Ifname: "eth0", Capable: []string{"hdr0-aes-gcm-128", "hdr0-aes-gcm-256"},
			Enabled: []string{"hdr0-aes-gcm-256"}, Rotations: 5, LastRotation: now.Add(-3 * time.Hour)}},
	}
}

func run(t *testing.T, sock string, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	root := newRoot(&out, func() time.Time { return now })
	root.SetArgs(append([]string{"--socket", sock}, args...))
	err := root.ExecuteContext(context.Background())
	return out.String(), err
}

func TestGolden(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the API answers root or the pspd group only")
	}
	sock := apitest.Serve(t, fixture(), localapi.NewAuthorizer("pspd-test-nonexistent"))
	for _, tc := range []struct {
		golden string
		args   []string
	}{
		{"status.txt", []string{"status"}},
		{"peer-list.txt", []string{"peer", "list"}},
		{"assoc-list.txt", []string{"assoc", "list"}},
		{"assoc-list.json", []string{"assoc", "list", "--json"}},
		{"assoc-rotate.txt", []string{"assoc", "rotate", "--peer", "web-2"}},
		{"dev-list.txt", []string{"dev", "list"}},
	} {
		t.Run(tc.golden, func(t *testing.T) {
			got, err := run(t, sock, tc.args...)
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join("testdata", tc.golden)
			if *update {
				os.WriteFile(path, []byte(got), 0o644)
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if got != string(want) {
				t.Errorf("pspctl %s:\n got:\n%s\nwant:\n%s", strings.Join(tc.args, " "), got, want)
			}
		})
	}
}

func TestErrorsSayWhatToDo(t *testing.T) {
	if _, err := run(t, filepath.Join(t.TempDir(), "no.sock"), "status"); err == nil || !strings.Contains(err.Error(), "start it") {
		t.Errorf("no daemon: %v", err)
	}
	if _, err := run(t, "/nonexistent", "assoc", "rotate"); err == nil || !strings.Contains(err.Error(), "give an association ID, --peer NAME or --all") {
		t.Errorf("rotate without selector: %v", err)
	}
	if _, err := run(t, "/nonexistent", "dev", "rotate", "eth0"); err == nil || !strings.Contains(err.Error(), "see pspctl dev list") {
		t.Errorf("bad device id: %v", err)
	}
	if os.Geteuid() == 0 {
		sock := apitest.Serve(t, fixture(), localapi.NewAuthorizer("pspd-test-nonexistent"))
		if _, err := run(t, sock, "assoc", "rotate", "nope/1"); err == nil || !strings.Contains(err.Error(), "no association matches") {
			t.Errorf("unknown association: %v", err)
		}
	}
}
