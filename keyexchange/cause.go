package keyexchange

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/quic-go/quic-go"

	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/wire"
)

// The causes below say why a peer is not up in an operator's terms: what
// went wrong and what to change. Status.Cause and the WARN line of a state
// change carry them; each wraps the error it explains, and Status.LastError
// keeps that error in full.

// wrongPinError: the peer presented a key other than the one pinned here.
type wrongPinError struct {
	addr              netip.AddrPort
	presented, pinned identity.PublicKey
	err               error
}

func (e *wrongPinError) Error() string {
	return fmt.Sprintf("wrong pin: the peer at %s presented key %s, which is not the pinned key %s (if the peer's identity changed, put its new public key in this host's peer entry)",
		e.addr, e.presented.Fingerprint(), e.pinned.Fingerprint())
}

func (e *wrongPinError) Unwrap() error { return e.err }

// refusedKeyError: the peer aborted the handshake on this host's key: it
// pins another key for this host (or none).
type refusedKeyError struct {
	addr          netip.AddrPort
	local, pinned identity.PublicKey
	err           error
}

func (e *refusedKeyError) Error() string {
	return fmt.Sprintf("the peer at %s refused this host's key %s: it pins another key for this host (its peer entry for this host needs public key %s); this host pins %s for the peer",
		e.addr, e.local.Fingerprint(), e.local.Fingerprint(), e.pinned.Fingerprint())
}

func (e *refusedKeyError) Unwrap() error { return e.err }

// unreachableError: nothing answered the dial.
type unreachableError struct {
	addr netip.AddrPort
	err  error
}

func (e *unreachableError) Error() string {
	return fmt.Sprintf("no answer from %s: the peer is unreachable or pspd is not running there (check its address, and that UDP port %d is open on the way)", e.addr, e.addr.Port())
}

func (e *unreachableError) Unwrap() error { return e.err }

// noBackendError: the two hosts have no data plane in common.
type noBackendError struct {
	accepts, offers wire.Backends // this host's for the peer; the peer's
	remote          bool          // the peer found none in this host's offer
}

func (e *noBackendError) Error() string {
	if e.remote {
		return fmt.Sprintf("no common backend: the peer accepts none of the backends this host offers (%s); the peer offers %s (set backend for this peer to one both hosts can run)", e.accepts, e.offers)
	}
	return fmt.Sprintf("no common backend: this host accepts %s for the peer, the peer offers %s (set backend for this peer to one both hosts can run)", e.accepts, e.offers)
}

func (e *noBackendError) Unwrap() error { return errUnsupported }

// installError: a data plane refused an SA, on this host or the peer.
type installError struct {
	remote bool
	msg    string // the installer's error, with the SA
	err    error
}

func (e *installError) Error() string {
	if e.remote {
		return "the peer's data plane refused the SA (its log says more): " + e.msg
	}
	return "this host's data plane refused the SA: " + e.msg
}

func (e *installError) Unwrap() error { return e.err }

// key: every retry installs another SA (other generation, other SPIs),
// and the message names it; the cause is the same.
func (e *installError) key() string { return fmt.Sprintf("install remote=%v", e.remote) }

// causeKey is what must change for a new cause to be logged again: its
// text, except where that names what differs from one retry to the next.
func causeKey(err error) string {
	var k interface{ key() string }
	if errors.As(err, &k) {
		return k.key()
	}
	var pe *wire.ProtocolError
	if errors.As(err, &pe) {
		return fmt.Sprintf("protocol %s remote=%v", pe.Code, pe.Remote)
	}
	return err.Error()
}

// sessionLostError: an established session ended without an error of
// the protocol: the peer said goodbye, went silent or restarted.
type sessionLostError struct {
	msg string
	err error
}

func (e *sessionLostError) Error() string { return e.msg }
func (e *sessionLostError) Unwrap() error { return e.err }

// badCertificate is the TLS alert (bad_certificate, 42) a pspd sends when
// the other side's key is not the one it pins, as a QUIC CRYPTO_ERROR.
const badCertificate = quic.TransportErrorCode(0x100 + 42)

// refusedByPeer reports whether err is the peer aborting the handshake
// over this host's certificate.
func refusedByPeer(err error) bool {
	var te *quic.TransportError
	return errors.As(err, &te) && te.Remote && te.ErrorCode == badCertificate
}

// explain turns a failed dial or session into its cause, or nil if the
// failure is no reason to be down. s is the session that failed, if one
// came up.
func (p *Peer) explain(err error, s *Session) error {
	var (
		wp    *wrongPinError
		rk    *refusedKeyError
		nb    *noBackendError
		ae    *quic.ApplicationError
		pe    *wire.ProtocolError
		perr  *PeerError
		idle  *quic.IdleTimeoutError
		reset *quic.StatelessResetError
	)
	switch {
	case err == nil:
		return nil
	case s != nil && errors.As(err, &ae) && ae.Remote && ae.ErrorCode == closeReplaced:
		// The peer keeps another session with this host (the initiator
		// refusing the responder's duplicate, or either side taking a
		// newer one), which this side takes when it arrives: no reason
		// to be down, and a WARN saying so would only mislead.
		return nil
	case errors.As(err, &wp):
		return wp
	case errors.As(err, &rk):
		return rk
	case errors.As(err, &nb):
		return nb
	case refusedByPeer(err):
		return &refusedKeyError{addr: p.cfg.Addr, local: p.e.Public(), pinned: p.cfg.Key, err: err}
	case s == nil && (isTimeout(err) || errors.Is(err, context.DeadlineExceeded)):
		return &unreachableError{addr: p.cfg.Addr, err: err}
	case errors.As(err, &pe) && pe.Code == wire.CodeInstall:
		return &installError{remote: pe.Remote, msg: pe.Msg, err: err}
	case s != nil && errors.As(err, &ae) && ae.Remote && ae.ErrorCode == closeProtocol && strings.Contains(ae.ErrorMessage, errInstall.Error()):
		// The peer's close overtook its Error message.
		return &installError{remote: true, msg: ae.ErrorMessage, err: err}
	case errors.Is(err, errInstall):
		msg := err.Error()
		if errors.As(err, &perr) {
			msg = perr.Err.Error()
		}
		return &installError{msg: msg, err: err}
	case s != nil && errors.Is(err, errGoodbye):
		reason := err.Error()
		if i := strings.LastIndex(reason, errGoodbye.Error()+": "); i >= 0 {
			reason = reason[i+len(errGoodbye.Error())+2:]
		}
		return &sessionLostError{msg: "the peer closed the session on purpose (goodbye: " + reason + ")", err: err}
	case s != nil && errors.As(err, &idle):
		return &sessionLostError{msg: fmt.Sprintf("the peer went silent: nothing heard from %s for %s (it stopped, or the path is down)", p.cfg.Addr, p.e.cfg.IdleTimeout), err: err}
	case s != nil && errors.As(err, &reset):
		return &sessionLostError{msg: "the peer no longer knows the session (stateless reset): it restarted", err: err}
	case s != nil && errors.As(err, &ae) && ae.Remote && strings.Contains(ae.ErrorMessage, "no common backend"):
		return &noBackendError{accepts: p.e.hello(p.cfg.Key).Backends, offers: s.hello.Backends, remote: true}
	}
	return err
}
