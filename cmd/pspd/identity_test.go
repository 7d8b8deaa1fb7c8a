package main

import (
	"bytes"
	"crypto/fips140"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pspd/pspd/keyexchange/identity"
)

func run(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	root := newRootCmd(&out, &errb)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

func TestGenkeyPubkey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "id.pem")
	gen, err := run(t, "genkey", "--identity", path)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %#o, want 0600", st.Mode().Perm())
	}
	pub, err := run(t, "pubkey", "--identity", path)
	if err != nil {
		t.Fatal(err)
	}
	if pub != gen || strings.Count(pub, "\n") != 1 {
		t.Fatalf("pubkey %q, genkey printed %q", pub, gen)
	}
	pin, err := identity.ParsePublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	id, err := identity.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if pin != id.Public() {
		t.Fatal("printed pin is not the file's public key")
	}
}

func TestGenkeyExclusiveAndForce(t *testing.T) {
	path := filepath.Join(t.TempDir(), "id.pem")
	first, err := run(t, "genkey", "--identity", path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := run(t, "genkey", "--identity", path); err == nil || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("overwrite without --force: %v", err)
	}
	if now, _ := run(t, "pubkey", "--identity", path); now != first {
		t.Fatal("refused genkey changed the identity")
	}
	second, err := run(t, "genkey", "--force", "--identity", path)
	if err != nil {
		t.Fatal(err)
	}
	if second == first {
		t.Fatal("--force did not create a new identity")
	}
	if now, _ := run(t, "pubkey", "--identity", path); now != second {
		t.Fatal("--force did not replace the file")
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
		t.Fatalf("mode after --force %#o", st.Mode().Perm())
	}
}

func TestPubkeyRefusesWorldReadable(t *testing.T) {
	path := filepath.Join(t.TempDir(), "id.pem")
	if _, err := run(t, "genkey", "--identity", path); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := run(t, "pubkey", "--identity", path)
	if err == nil || !strings.Contains(err.Error(), "chmod 600") || out != "" {
		t.Fatalf("world-readable key: out %q err %v", out, err)
	}
}

func TestMissingIdentityFlag(t *testing.T) {
	for _, sub := range []string{"genkey", "pubkey"} {
		if _, err := run(t, sub); err == nil || !strings.Contains(err.Error(), "--identity") {
			t.Errorf("%s without --identity: %v", sub, err)
		}
	}
}

// TestRequireFIPS: --require-fips refuses to start outside FIPS mode and
// names the fix; in FIPS mode it gets past that check.
func TestRequireFIPS(t *testing.T) {
	var out, errb bytes.Buffer
	root := newRootCmd(&out, &errb)
	root.SetArgs([]string{"run", "--require-fips", "--config", filepath.Join(t.TempDir(), "none.yaml")})
	err := root.Execute()
	if fips140.Enabled() {
		if err == nil || strings.Contains(err.Error(), "require-fips") {
			t.Fatalf("in FIPS mode: %v", err)
		}
		return
	}
	if err == nil || !strings.Contains(err.Error(), "GODEBUG=fips140=on") {
		t.Fatalf("got %v", err)
	}
}
