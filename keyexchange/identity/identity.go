// Package identity owns pspd's long-term host identities: ECDSA P-256 keys
// stored as PKCS#8 PEM files, the base64 SPKI form a peer pins, and the
// short fingerprint every error message uses to name a peer.
//
// Identities are pinned the way WireGuard pins public keys: there is no CA
// and no certificate chain; a peer is exactly the holder of the private key
// behind a pinned SPKI.
package identity

import (
	"bytes"
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/internal/secret"
)

const pemType = "PRIVATE KEY"

// Identity is a host's long-term private key.
type Identity struct {
	priv *ecdsa.PrivateKey
	pub  PublicKey
}

// Generate returns a fresh P-256 identity.
func Generate() (*Identity, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("identity: generate P-256 key: %w", err)
	}
	return fromPrivate(k)
}

func fromPrivate(k *ecdsa.PrivateKey) (*Identity, error) {
	der, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("identity: marshal public key: %w", err)
	}
	pub, err := PublicKeyFromSPKI(der)
	if err != nil {
		return nil, err
	}
	return &Identity{priv: k, pub: pub}, nil
}

// Public is the key peers pin.
func (id *Identity) Public() PublicKey { return id.pub }

// DeriveSecret returns n bytes derived with HKDF-SHA256 from the private
// key under label. They are stable for the lifetime of the identity file
// and secret as long as it is, which is what state that must survive a
// restart without being stored needs (the QUIC stateless-reset key).
func (id *Identity) DeriveSecret(label string, n int) ([]byte, error) {
	priv, err := id.priv.Bytes()
	if err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	defer clear(priv)
	out, err := hkdf.Key(sha256.New, priv, nil, label, n)
	if err != nil {
		return nil, fmt.Errorf("identity: derive %s: %w", label, err)
	}
	return out, nil
}

// Signer is the private key, for the TLS handshake only.
func (id *Identity) Signer() crypto.Signer { return id.priv }

// String names the identity by its public fingerprint; the private key is
// never printed.
func (id *Identity) String() string { return "identity " + id.pub.Fingerprint() }

// MarshalPEM returns the PKCS#8 PEM encoding. The caller should wipe it.
func (id *Identity) MarshalPEM() ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(id.priv)
	if err != nil {
		return nil, fmt.Errorf("identity: marshal PKCS#8: %w", err)
	}
	defer secret.Zero(der)
	return pem.EncodeToMemory(&pem.Block{Type: pemType, Bytes: der}), nil
}

// ParsePEM parses a PKCS#8 PEM ECDSA P-256 private key.
func ParsePEM(b []byte) (*Identity, error) { return parsePEM(b, "KEY") }

// parsePEM is ParsePEM for a key read from file, which the hints for
// converting a key name.
func parsePEM(b []byte, file string) (*Identity, error) {
	blk, rest := pem.Decode(b)
	if blk == nil {
		return nil, errors.New("identity: no PEM block (want a PKCS#8 \"PRIVATE KEY\" written by pspd genkey)")
	}
	defer secret.Zero(blk.Bytes)
	switch blk.Type {
	case pemType:
	case "EC PRIVATE KEY":
		if k, err := x509.ParseECPrivateKey(blk.Bytes); err == nil && k.Curve != elliptic.P256() {
			return nil, unusable(k)
		}
		return nil, fmt.Errorf("identity: %s holds a SEC1 \"EC PRIVATE KEY\"; pspd reads PKCS#8 (%q): convert it with: openssl pkcs8 -topk8 -nocrypt -in %s -out %s.pkcs8 (then chmod 600 it and point identity at it)", file, pemType, file, file)
	case "ENCRYPTED PRIVATE KEY":
		return nil, fmt.Errorf("identity: %s is encrypted; pspd needs it unencrypted (mode 0600 protects it): openssl pkcs8 -in %s -out %s.pkcs8 (then chmod 600 it and point identity at it)", file, file, file)
	case "RSA PRIVATE KEY":
		return nil, errors.New("identity: RSA key; pspd needs ECDSA P-256 (pspd genkey makes one)")
	case "OPENSSH PRIVATE KEY":
		return nil, errors.New("identity: OpenSSH key; pspd needs a PKCS#8 ECDSA P-256 key (pspd genkey makes one)")
	default:
		return nil, fmt.Errorf("identity: PEM block type %q, want %q (PKCS#8, as pspd genkey writes it)", blk.Type, pemType)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, errors.New("identity: trailing data after the PEM block")
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("identity: parse PKCS#8: %w", err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok || ek.Curve != elliptic.P256() {
		return nil, unusable(k)
	}
	return fromPrivate(ek)
}

// unusable names a private key pspd cannot use by what it is.
func unusable(k any) error {
	if ek, ok := k.(*ecdsa.PrivateKey); ok {
		return fmt.Errorf("identity: ECDSA %s key; pspd needs P-256 (pspd genkey makes one)", ek.Curve.Params().Name)
	}
	return fmt.Errorf("identity: %s key; pspd needs ECDSA P-256 (pspd genkey makes one)", keyKind(k))
}

// keyKind is what an operator calls a key of type k.
func keyKind(k any) string {
	switch k := k.(type) {
	case *ecdsa.PrivateKey:
		return "ECDSA " + k.Curve.Params().Name
	case *ecdsa.PublicKey:
		return "ECDSA " + k.Curve.Params().Name
	case *rsa.PrivateKey:
		return fmt.Sprintf("RSA %d-bit", k.N.BitLen())
	case *rsa.PublicKey:
		return fmt.Sprintf("RSA %d-bit", k.N.BitLen())
	case ed25519.PrivateKey, ed25519.PublicKey:
		return "Ed25519"
	case *ecdh.PrivateKey:
		return fmt.Sprint(k.Curve())
	case *ecdh.PublicKey:
		return fmt.Sprint(k.Curve())
	}
	return fmt.Sprintf("%T", k)
}

// maxKeyFile bounds what Load reads: a pspd key file is about 240 bytes.
const maxKeyFile = 16 << 10

// Load reads an identity file. It refuses a file that group or others can
// access, as ssh does, because such a key must be assumed compromised, and
// one that another user owns, who could have replaced it. The file is
// opened without following a final symbolic link and every check is made
// on the opened descriptor, so what is checked is what is read.
func Load(path string) (*Identity, error) { return load(path, os.Geteuid()) }

// load is Load as seen by a process running as uid.
func load(path string, uid int) (*Identity, error) {
	// O_NONBLOCK: a FIFO in the key's place must not hang start-up (it
	// is refused below); on a regular file it changes nothing.
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, openError(path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("identity: %s is not a regular file", path)
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		if owner := int(sys.Uid); owner != uid && owner != 0 {
			return nil, fmt.Errorf("identity: %s is owned by uid %d%s, not by uid %d%s that pspd runs as, nor by root: that user could have replaced this host's key; check it, then chown %d %s",
				path, owner, userName(owner), uid, userName(uid), uid, path)
		}
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("identity: %s has mode %#o; it must not be accessible by group or others (chmod 600 %s)", path, perm, path)
	}
	b := make([]byte, maxKeyFile+1)
	defer secret.Zero(b)
	n, err := io.ReadFull(f, b)
	switch {
	case err == nil:
		return nil, fmt.Errorf("identity: %s is larger than %d bytes; a pspd key file is about 240 (pspd genkey makes one)", path, maxKeyFile)
	case err != io.EOF && err != io.ErrUnexpectedEOF:
		return nil, fmt.Errorf("identity: read %s: %w", path, err)
	}
	id, err := parsePEM(b[:n], path)
	if err != nil {
		if !strings.Contains(err.Error(), path) {
			err = fmt.Errorf("%w (file %s)", err, path)
		}
		return nil, err
	}
	return id, nil
}

// openError explains why the key file could not be opened, with the fix.
func openError(path string, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("identity: %s does not exist (%w); run: pspd genkey --identity %s", path, err, path)
	case errors.Is(err, syscall.ELOOP):
		if target, lerr := os.Readlink(path); lerr == nil {
			return fmt.Errorf("identity: %s is a symbolic link (to %s); pspd opens its key by the file's own path, since a link can be re-pointed: set identity to the file itself", path, target)
		}
	}
	return fmt.Errorf("identity: %w", &fs.PathError{Op: "open", Path: path, Err: err})
}

// userName is " (name)" for a uid with a name, or "".
func userName(uid int) string {
	u, err := user.LookupId(strconv.Itoa(uid))
	if err != nil {
		return ""
	}
	return " (" + u.Username + ")"
}

// ErrExists is returned by WriteFile when the file exists and force is off.
var ErrExists = errors.New("identity: file exists (use --force to replace it)")

// WriteFile stores id at path with mode 0600. Without force it creates the
// file exclusively and fails with ErrExists if it is there. With force it
// writes a temporary file beside it and renames it over the old one, so a
// crash leaves either the old or the new key, never a torn one.
func WriteFile(path string, id *Identity, force bool) error {
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		return fmt.Errorf("identity: %s is a directory; give the path of the key file to create, like %s", path, filepath.Join(path, "identity.pem"))
	}
	b, err := id.MarshalPEM()
	if err != nil {
		return err
	}
	defer secret.Zero(b)
	if !force {
		if err := writeExclusive(path, b); err != nil {
			if errors.Is(err, fs.ErrExist) {
				return fmt.Errorf("%w: %s", ErrExists, path)
			}
			return err
		}
		return syncDir(path)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return createError(path, err)
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	if err := fillAndClose(tmp, b); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("identity: replace %s: %w", path, err)
	}
	return syncDir(path)
}

func writeExclusive(path string, b []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return err
		}
		return createError(path, err)
	}
	if err := fillAndClose(f, b); err != nil {
		os.Remove(path)
		return err
	}
	return nil
}

func createError(path string, err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("identity: create %s: %w; create its directory first: mkdir -p -m 700 %s", path, err, filepath.Dir(path))
	}
	return fmt.Errorf("identity: create %s: %w", path, err)
}

// fillAndClose writes b, forces mode 0600 regardless of umask or of the
// mode CreateTemp picked, and fsyncs.
func fillAndClose(f *os.File, b []byte) error {
	err := f.Chmod(0o600)
	if err == nil {
		_, err = f.Write(b)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("identity: write %s: %w", f.Name(), err)
	}
	return nil
}

func syncDir(path string) error {
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("identity: sync directory of %s: %w", path, err)
	}
	return nil
}

// PublicKey is a pinned peer identity: the DER SubjectPublicKeyInfo of an
// ECDSA P-256 key. It is comparable and usable as a map key; the zero value
// is no key.
type PublicKey struct {
	spki string
}

// PublicKeyFromSPKI validates a DER SPKI and returns it as a PublicKey.
func PublicKeyFromSPKI(der []byte) (PublicKey, error) {
	k, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		// The asn1 error text means nothing to an operator; say what the
		// input should have been.
		return PublicKey{}, fmt.Errorf("identity: not a public key (want the line printed by pspd pubkey): %v", err)
	}
	ek, ok := k.(*ecdsa.PublicKey)
	if !ok {
		return PublicKey{}, fmt.Errorf("identity: %s key; pspd pins ECDSA P-256 keys (want the line printed by pspd pubkey)", keyKind(k))
	}
	if ek.Curve != elliptic.P256() {
		return PublicKey{}, fmt.Errorf("identity: %s key; pspd pins P-256 keys (want the line printed by pspd pubkey)", keyKind(k))
	}
	// Re-encode so that two encodings of one key pin identically.
	canon, err := x509.MarshalPKIXPublicKey(ek)
	if err != nil {
		return PublicKey{}, fmt.Errorf("identity: public key: %w", err)
	}
	return PublicKey{spki: string(canon)}, nil
}

// ParsePublicKey parses the one-line base64 SPKI that pubkey prints.
func ParsePublicKey(s string) (PublicKey, error) {
	der, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil {
		return PublicKey{}, fmt.Errorf("identity: pin is not base64 (want the line printed by pspd pubkey): %w", err)
	}
	return PublicKeyFromSPKI(der)
}

// IsZero reports whether p is the zero value.
func (p PublicKey) IsZero() bool { return p.spki == "" }

// SPKI returns a copy of the DER SubjectPublicKeyInfo.
func (p PublicKey) SPKI() []byte { return []byte(p.spki) }

// String is the base64 SPKI, the form a peer pins.
func (p PublicKey) String() string { return base64.StdEncoding.EncodeToString([]byte(p.spki)) }

// Fingerprint is "sha256:" and the first 16 hex digits of the SHA-256 of
// the SPKI: short enough for a log line, long enough to tell peers apart.
func (p PublicKey) Fingerprint() string {
	if p.IsZero() {
		return "sha256:none"
	}
	h := sha256.Sum256([]byte(p.spki))
	return "sha256:" + hex.EncodeToString(h[:8])
}

// Compare orders keys by their SPKI bytes. Both peers compute the same
// order, which is how the canonical initiator is elected.
func Compare(a, b PublicKey) int { return strings.Compare(a.spki, b.spki) }
