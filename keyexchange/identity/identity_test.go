package identity

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestWriteLoadRoundTrip(t *testing.T) {
	id, err := Generate()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "id.pem")
	if err := WriteFile(path, id, false); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %#o, want 0600", st.Mode().Perm())
	}
	got, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if got.Public() != id.Public() {
		t.Fatal("loaded identity has a different public key")
	}
}

func TestWriteRefusesOverwriteUnlessForced(t *testing.T) {
	a, _ := Generate()
	b, _ := Generate()
	path := filepath.Join(t.TempDir(), "id.pem")
	if err := WriteFile(path, a, false); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(path, b, false); !errors.Is(err, ErrExists) {
		t.Fatalf("second write: %v, want ErrExists", err)
	}
	if got, _ := Load(path); got.Public() != a.Public() {
		t.Fatal("refused write still changed the file")
	}
	if err := WriteFile(path, b, true); err != nil {
		t.Fatal(err)
	}
	got, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if got.Public() != b.Public() {
		t.Fatal("forced write did not replace the key")
	}
	ents, _ := os.ReadDir(filepath.Dir(path))
	if len(ents) != 1 {
		t.Fatalf("temporary files left behind: %v", ents)
	}
}

func TestLoadRefusesLoosePermissions(t *testing.T) {
	id, _ := Generate()
	path := filepath.Join(t.TempDir(), "id.pem")
	if err := WriteFile(path, id, false); err != nil {
		t.Fatal(err)
	}
	for _, mode := range []os.FileMode{0o640, 0o604, 0o644, 0o660} {
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
		_, err := Load(path)
		if err == nil || !strings.Contains(err.Error(), "chmod 600") {
			t.Errorf("mode %#o: err %v, want a refusal telling to chmod 600", mode, err)
		}
	}
}

func TestParsePEMRejects(t *testing.T) {
	for name, in := range map[string]string{
		"empty":     "",
		"not pem":   "hello",
		"wrong typ": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
		"bad der":   "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
	} {
		if _, err := ParsePEM([]byte(in)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestPublicKeyPinRoundTrip(t *testing.T) {
	id, _ := Generate()
	line := id.Public().String()
	if strings.ContainsAny(line, "\n ") {
		t.Fatalf("pin %q is not one line", line)
	}
	p, err := ParsePublicKey(line + "\n")
	if err != nil {
		t.Fatal(err)
	}
	if p != id.Public() {
		t.Fatal("parsed pin differs")
	}
	fp := p.Fingerprint()
	if !strings.HasPrefix(fp, "sha256:") || len(fp) != len("sha256:")+16 {
		t.Fatalf("fingerprint %q", fp)
	}
	for _, bad := range []string{"", "!!!", "AAAA", id.Public().String()[:20]} {
		if _, err := ParsePublicKey(bad); err == nil {
			t.Errorf("pin %q accepted", bad)
		}
	}
}

func TestCompareIsAntisymmetric(t *testing.T) {
	a, _ := Generate()
	b, _ := Generate()
	if Compare(a.Public(), b.Public()) != -Compare(b.Public(), a.Public()) || Compare(a.Public(), a.Public()) != 0 {
		t.Fatal("Compare is not a total order")
	}
}

func TestIdentityStringHidesKey(t *testing.T) {
	id, _ := Generate()
	if s := id.String(); !strings.Contains(s, id.Public().Fingerprint()) || strings.Contains(s, "PRIVATE") {
		t.Fatalf("String() = %q", s)
	}
}
