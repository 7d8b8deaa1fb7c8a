package identitycmd

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/pspd/pspd/keyexchange/identity"
)

func run(t *testing.T, cmd *cobra.Command, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	cmd.SilenceUsage = true
	err := cmd.Execute()
	return out.String(), err
}

func TestGenkeyPubkey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "identity.pem")
	out, err := run(t, Genkey(), "--identity", path)
	if err != nil {
		t.Fatal(err)
	}
	id, err := identity.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(out) != id.Public().String() {
		t.Fatalf("genkey printed %q, the file's key is %s", out, id.Public())
	}
	out, err = run(t, Pubkey(), "--identity", path)
	if err != nil || strings.TrimSpace(out) != id.Public().String() {
		t.Fatalf("pubkey: %q, %v", out, err)
	}
	if _, err := run(t, Genkey(), "--identity", path); err == nil || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("genkey over an existing key: %v", err)
	}
}

// Each mistake is named as what it is, with the fix.
func TestGenkeyPubkeyMistakes(t *testing.T) {
	dir := t.TempDir()
	if _, err := run(t, Genkey(), "--identity", dir); err == nil || !strings.Contains(err.Error(), dir+" is a directory") {
		t.Fatalf("genkey --identity DIR: %v", err)
	}
	if _, err := run(t, Genkey(), "--identity", dir, "--force"); err == nil || !strings.Contains(err.Error(), dir+" is a directory") {
		t.Fatalf("genkey --force --identity DIR: %v", err)
	}
	missing := filepath.Join(dir, "missing.pem")
	if _, err := run(t, Pubkey(), "--identity", missing); err == nil || !strings.Contains(err.Error(), "run: pspd genkey --identity "+missing) {
		t.Fatalf("pubkey of a missing file: %v", err)
	}
	if _, err := run(t, Genkey()); err == nil || !strings.Contains(err.Error(), "--identity FILE is required") {
		t.Fatalf("genkey without --identity: %v", err)
	}
}
