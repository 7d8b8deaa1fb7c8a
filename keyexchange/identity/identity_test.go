package identity

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
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

func pemOf(t *testing.T, typ string, der []byte) []byte {
	t.Helper()
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func writeKey(t *testing.T, b []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "id.pem")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// A key pspd cannot use is named by what it is, with the way to one it
// can use.
func TestLoadNamesUnusableKeys(t *testing.T) {
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p256, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, ed, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pkcs8 := func(k any) []byte {
		der, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return pemOf(t, "PRIVATE KEY", der)
	}
	sec1 := func(k *ecdsa.PrivateKey) []byte {
		der, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return pemOf(t, "EC PRIVATE KEY", der)
	}
	for _, tc := range []struct {
		name string
		pem  []byte
		want string
	}{
		{"p384 pkcs8", pkcs8(p384), "identity: ECDSA P-384 key; pspd needs P-256 (pspd genkey makes one)"},
		{"ed25519 pkcs8", pkcs8(ed), "identity: Ed25519 key; pspd needs ECDSA P-256 (pspd genkey makes one)"},
		{"p384 sec1", sec1(p384), "identity: ECDSA P-384 key; pspd needs P-256 (pspd genkey makes one)"},
		{"p256 sec1", sec1(p256), `identity: %s holds a SEC1 "EC PRIVATE KEY"; pspd reads PKCS#8 ("PRIVATE KEY"): convert it with: openssl pkcs8 -topk8 -nocrypt -in %s -out`},
		{"encrypted", pemOf(t, "ENCRYPTED PRIVATE KEY", []byte{0x30, 0}), "identity: %s is encrypted; pspd needs it unencrypted (mode 0600 protects it): openssl pkcs8 -in %s -out"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := writeKey(t, tc.pem)
			want := tc.want
			if strings.Contains(want, "%s") {
				want = strings.ReplaceAll(want, "%s", path)
			}
			_, err := Load(path)
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Fatalf("error %v, want one containing %q", err, want)
			}
		})
	}
	der, err := x509.MarshalPKIXPublicKey(&p384.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := PublicKeyFromSPKI(der); err == nil || !strings.Contains(err.Error(), "identity: ECDSA P-384 key; pspd pins P-256 keys (want the line printed by pspd pubkey)") {
		t.Fatalf("P-384 pin: %v", err)
	}
}

func TestLoadMissingSaysGenkey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "id.pem")
	_, err := Load(path)
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), "run: pspd genkey --identity "+path) {
		t.Fatalf("error %v, want ErrNotExist with the genkey hint", err)
	}
}

func TestWriteFileToDirectory(t *testing.T) {
	dir := t.TempDir()
	id, _ := Generate()
	for _, force := range []bool{false, true} {
		err := WriteFile(dir, id, force)
		if err == nil || !strings.Contains(err.Error(), dir+" is a directory") || strings.Contains(err.Error(), "exists") {
			t.Fatalf("force=%v: error %v, want one saying %s is a directory", force, err, dir)
		}
	}
	if err := WriteFile(filepath.Join(dir, "no", "such", "id.pem"), id, false); err == nil || !strings.Contains(err.Error(), "mkdir -p -m 700 "+filepath.Join(dir, "no", "such")) {
		t.Fatalf("missing directory: %v", err)
	}
}

// The key file is opened without following a link and checked on the
// descriptor it is read from.
func TestLoadRefusesSymlinkAndNonFile(t *testing.T) {
	id, _ := Generate()
	dir := t.TempDir()
	path := filepath.Join(dir, "id.pem")
	if err := WriteFile(path, id, false); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link.pem")
	if err := os.Symlink(path, link); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(link); err == nil || !strings.Contains(err.Error(), link+" is a symbolic link (to "+path+")") {
		t.Fatalf("symlink: %v", err)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := Load(fifo); done <- err }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "is not a regular file") {
			t.Fatalf("fifo: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Load blocked opening a FIFO")
	}
}

// A key file another user owns could have been replaced by that user: it
// is not this host's key.
func TestLoadRefusesForeignOwner(t *testing.T) {
	id, _ := Generate()
	path := filepath.Join(t.TempDir(), "id.pem")
	if err := WriteFile(path, id, false); err != nil {
		t.Fatal(err)
	}
	me := os.Geteuid()
	if me != 0 {
		// As seen by a process of another (non-root) user: the file is
		// ours, not theirs.
		if _, err := load(path, me+1); err == nil || !strings.Contains(err.Error(), fmt.Sprintf("owned by uid %d", me)) || !strings.Contains(err.Error(), fmt.Sprintf("chown %d %s", me+1, path)) {
			t.Fatalf("load as uid %d: %v", me+1, err)
		}
		if _, err := load(path, me); err != nil {
			t.Fatalf("own file refused: %v", err)
		}
		t.Skip("chowning a file to another user needs root; the check above ran as a simulated other user")
	}
	// Root may read a file owned by another user, but must not trust it.
	if err := os.Chown(path, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	_, err := Load(path)
	if err == nil || !strings.Contains(err.Error(), "owned by uid 65534") || !strings.Contains(err.Error(), "chown 0 "+path) {
		t.Fatalf("root loading a key owned by 65534: %v", err)
	}
	// A key owned by root is fine for any user that can read it.
	if err := os.Chown(path, 0, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := load(path, 65534); err != nil {
		t.Fatalf("root-owned key refused for uid 65534: %v", err)
	}
	// And a key owned by one ordinary user is refused to another.
	if err := os.Chown(path, 1000, 1000); err != nil {
		t.Fatal(err)
	}
	if _, err := load(path, 1001); err == nil || !strings.Contains(err.Error(), "owned by uid 1000") || !strings.Contains(err.Error(), "chown 1001 "+path) {
		t.Fatalf("uid 1001 loading a key owned by 1000: %v", err)
	}
	if _, err := load(path, 1000); err != nil {
		t.Fatalf("uid 1000 loading its own key: %v", err)
	}
}
