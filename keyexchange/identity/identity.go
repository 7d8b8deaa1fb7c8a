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
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

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
func ParsePEM(b []byte) (*Identity, error) {
	blk, rest := pem.Decode(b)
	if blk == nil {
		return nil, errors.New("identity: no PEM block (want a PKCS#8 \"PRIVATE KEY\" written by pspd genkey)")
	}
	defer secret.Zero(blk.Bytes)
	if blk.Type != pemType {
		return nil, fmt.Errorf("identity: PEM block type %q, want %q (PKCS#8)", blk.Type, pemType)
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
		return nil, fmt.Errorf("identity: key is %T, want an ECDSA P-256 key", k)
	}
	return fromPrivate(ek)
}

// Load reads an identity file. It refuses a file that group or others can
// access, as ssh does, because such a key must be assumed compromised.
func Load(path string) (*Identity, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("identity: %w", err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("identity: %s is not a regular file", path)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("identity: %s has mode %#o; it must not be accessible by group or others (chmod 600 %s)", path, perm, path)
	}
	b := make([]byte, st.Size()+1)
	n, err := f.Read(b)
	defer secret.Zero(b)
	if err != nil {
		return nil, fmt.Errorf("identity: read %s: %w", path, err)
	}
	id, err := ParsePEM(b[:n])
	if err != nil {
		return nil, fmt.Errorf("%w (file %s)", err, path)
	}
	return id, nil
}

// ErrExists is returned by WriteFile when the file exists and force is off.
var ErrExists = errors.New("identity: file exists (use --force to replace it)")

// WriteFile stores id at path with mode 0600. Without force it creates the
// file exclusively and fails with ErrExists if it is there. With force it
// writes a temporary file beside it and renames it over the old one, so a
// crash leaves either the old or the new key, never a torn one.
func WriteFile(path string, id *Identity, force bool) error {
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
		return fmt.Errorf("identity: %w", err)
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
		return fmt.Errorf("identity: create %s: %w", path, err)
	}
	if err := fillAndClose(f, b); err != nil {
		os.Remove(path)
		return err
	}
	return nil
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
	if !ok || ek.Curve != elliptic.P256() {
		return PublicKey{}, fmt.Errorf("identity: not an ECDSA P-256 key (want the line printed by pspd pubkey)")
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
