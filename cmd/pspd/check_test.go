package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pspd/pspd/keyexchange/identity"
)

// pspd check names the line of the identity field when the key file is
// missing or pinned as a peer, and counts peers in English.
func TestCheckIdentityErrors(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "id.pem")
	cfg := filepath.Join(dir, "pspd.yaml")
	write := func(src string) {
		t.Helper()
		if err := os.WriteFile(cfg, []byte(src), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("metrics: off\nidentity: " + key + "\n")
	_, err := run(t, "check", "--config", cfg)
	if want := cfg + ":2: identity: " + key + " does not exist"; err == nil || !strings.HasPrefix(err.Error(), want) || !strings.Contains(err.Error(), "run: pspd genkey --identity "+key) {
		t.Fatalf("missing key: %v, want %q and the genkey hint", err, want)
	}

	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	if err := identity.WriteFile(key, id, false); err != nil {
		t.Fatal(err)
	}
	peer, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	write("metrics: off\nidentity: " + key + "\npeers:\n  - name: b\n    endpoint: 192.0.2.2\n    public_key: " + id.Public().String() + "\n")
	if _, err := run(t, "check", "--config", cfg); err == nil || !strings.HasPrefix(err.Error(), cfg+":6: peers[0].public_key: is this host's own key") {
		t.Fatalf("own key pinned: %v", err)
	}

	write("metrics: off\nidentity: " + key + "\npeers:\n  - name: b\n    endpoint: 192.0.2.2\n    public_key: " + peer.Public().String() + "\n")
	out, err := run(t, "check", "--config", cfg)
	if err != nil {
		t.Fatal(err)
	}
	if want := "(identity " + id.Public().Fingerprint() + ", 1 peer: b)"; !strings.Contains(out, want) {
		t.Fatalf("check printed %q, want %q", out, want)
	}
}
