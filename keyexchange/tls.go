package keyexchange

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
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

// tlsConfig is the TLS 1.3 configuration for both directions. allowed is
// the pin check: for a dial it accepts exactly the dialed peer, for the
// listener any registered peer.
func tlsConfig(leaf tls.Certificate, allowed func(identity.PublicKey) error) *tls.Config {
	return &tls.Config{
		MinVersion:             tls.VersionTLS13,
		MaxVersion:             tls.VersionTLS13,
		CurvePreferences:       []tls.CurveID{tls.CurveP256},
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
