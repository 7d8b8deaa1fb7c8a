package keyexchange

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/pspd/pspd/keyexchange/identity"
)

// ALPN is the application protocol both sides must negotiate.
const ALPN = "pspd/1"

// selfSignedLeaf wraps the identity key in a certificate made fresh for
// this process. Nothing checks its issuer or chain; the peer trusts the
// SPKI, never the certificate.
func selfSignedLeaf(id *identity.Identity, now time.Time) (tls.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("keyexchange: certificate serial: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "pspd " + id.Public().Fingerprint()},
		NotBefore:    now.Add(-time.Hour), // tolerate peers whose clock is a little behind
		NotAfter:     now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, id.Signer().Public(), id.Signer())
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("keyexchange: self-signed certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("keyexchange: self-signed certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: id.Signer(), Leaf: leaf}, nil
}

// Key exchange groups. Every SA key derives from the TLS exporter, so a
// recorded session whose key exchange a quantum computer breaks later
// yields every key of that session; a hybrid keeps the session secret
// unless both ML-KEM and the elliptic curve fall.
//
// crypto/tls ignores the order of CurvePreferences (the client sends its
// one key share for the first group in Go's fixed order, and the server
// takes a group it has a share for), so preference is expressed by what
// each side offers. A pspd dialer offers SecP256r1MLKEM768, whose parts
// are both FIPS-approved (it stays inside Go's FIPS 140-3 module), with
// the P-256 share as fallback; a pspd listener also accepts
// X25519MLKEM768, what most other TLS stacks send. Two default pspds thus
// agree on SecP256r1MLKEM768 in one round trip, and a default one and one
// with ClassicKeyExchange on P-256 without a retry. TLS 1.3 signs the
// transcript, so an attacker on the path cannot push two hybrid-capable
// peers down to P-256.
var (
	dialGroups    = []tls.CurveID{tls.SecP256r1MLKEM768, tls.CurveP256}
	listenGroups  = []tls.CurveID{tls.SecP256r1MLKEM768, tls.X25519MLKEM768, tls.CurveP256}
	classicGroups = []tls.CurveID{tls.CurveP256}
)

// keyExchangeGroups are the groups offered when dialing or listening.
func keyExchangeGroups(dial, classic bool) []tls.CurveID {
	switch {
	case classic:
		return classicGroups
	case dial:
		return dialGroups
	}
	return listenGroups
}

// tlsConfig is the TLS 1.3 configuration for both directions. allowed is
// the pin check: for a dial it accepts exactly the dialed peer, for the
// listener any registered peer. groups are the key exchange groups
// (keyExchangeGroups).
func tlsConfig(leaf tls.Certificate, allowed func(identity.PublicKey) error, groups []tls.CurveID) *tls.Config {
	return &tls.Config{
		MinVersion:             tls.VersionTLS13,
		MaxVersion:             tls.VersionTLS13,
		CurvePreferences:       slices.Clone(groups),
		NextProtos:             []string{ALPN},
		Certificates:           []tls.Certificate{leaf},
		ClientAuth:             tls.RequireAnyClientCert,
		SessionTicketsDisabled: true,
		// The pin check in VerifyConnection is the only verification: there
		// is no CA, and the certificate is a carrier for the pinned key.
		InsecureSkipVerify: true,
		ServerName:         "pspd",
		VerifyConnection: func(cs tls.ConnectionState) error {
			pk, err := verifyPeer(cs, time.Now())
			if err != nil {
				return err
			}
			return allowed(pk)
		},
	}
}

// verifyPeer checks everything about the handshake except the pin and
// returns the peer's key. Errors name the peer when its key is known.
func verifyPeer(cs tls.ConnectionState, now time.Time) (identity.PublicKey, error) {
	if len(cs.PeerCertificates) != 1 {
		return identity.PublicKey{}, fmt.Errorf("keyexchange: peer sent %d certificates, want exactly one self-signed leaf", len(cs.PeerCertificates))
	}
	leaf := cs.PeerCertificates[0]
	pk, err := identity.PublicKeyFromSPKI(leaf.RawSubjectPublicKeyInfo)
	if err != nil {
		return identity.PublicKey{}, fmt.Errorf("keyexchange: peer certificate: %w", err)
	}
	switch {
	case cs.Version != tls.VersionTLS13:
		err = fmt.Errorf("TLS version %#x, want 1.3", cs.Version)
	case cs.DidResume:
		err = errors.New("resumed TLS session refused: every session must be a fresh ECDHE handshake")
	case cs.NegotiatedProtocol != ALPN:
		err = fmt.Errorf("ALPN %q, want %q", cs.NegotiatedProtocol, ALPN)
	case now.Before(leaf.NotBefore) || now.After(leaf.NotAfter):
		err = fmt.Errorf("certificate not valid now (valid %s to %s); check the peer's clock", leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	if err != nil {
		return pk, &PeerError{Peer: pk, Op: "handshake", Err: err}
	}
	return pk, nil
}

// checkFresh is the fail-closed check after the handshake: no resumption,
// no 0-RTT, whatever the TLS configuration says.
func checkFresh(st quic.ConnectionState) error {
	if st.TLS.DidResume {
		return errors.New("handshake resumed a TLS session; refusing (fresh ECDHE required)")
	}
	if st.Used0RTT {
		return errors.New("handshake used 0-RTT; refusing (fresh ECDHE required)")
	}
	return nil
}

// PeerError is an error about one peer; its message always names the
// peer's fingerprint.
type PeerError struct {
	Peer identity.PublicKey
	Op   string
	Err  error
}

func (e *PeerError) Error() string {
	return fmt.Sprintf("keyexchange: peer %s: %s: %v", e.Peer.Fingerprint(), e.Op, e.Err)
}

func (e *PeerError) Unwrap() error { return e.Err }

func peerErr(pk identity.PublicKey, op string, err error) error {
	var pe *PeerError
	if errors.As(err, &pe) && pe.Peer == pk {
		return err
	}
	return &PeerError{Peer: pk, Op: op, Err: err}
}
