package keyexchange

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/keyexchange/wire"
)

// The tests in this file play a hostile pinned peer: one that passes
// authentication (its key is pinned, its TLS is pspd's own) and then
// misbehaves in the control protocol, over a real QUIC/TLS session. A
// pinned peer is authenticated, not trusted: every misbehaviour must end
// in a clear error naming the peer, install no key twice, and leave the
// host's other peers alone.

// hostile is a misbehaving peer's end of a real session.
type hostile struct {
	t   *testing.T
	s   *Session
	bad *node // the hostile peer's own endpoint
}

// hostileInitiator returns a victim responder that pins the hostile
// initiator, and the hostile side of a session to it.
func hostileInitiator(t *testing.T, mod func(*Config)) (victim *node, h *hostile) {
	t.Helper()
	a, b := orderedIdentities(t)
	bad, victim := newNode(t, a, mod), newNode(t, b, mod)
	if _, err := victim.ep.AddPeer(peerCfg(bad)); err != nil {
		t.Fatal(err)
	}
	return victim, &hostile{t: t, s: rawSession(t, bad, victim), bad: bad}
}

// hostileResponder returns a victim initiator that pins the hostile
// responder, the victim's Peer, and the hostile side of a session to it.
func hostileResponder(t *testing.T, mod func(*Config)) (victim *node, p *Peer, h *hostile) {
	t.Helper()
	a, b := orderedIdentities(t)
	victim, bad := newNode(t, a, mod), newNode(t, b, mod)
	p, err := victim.ep.AddPeer(peerCfg(bad))
	if err != nil {
		t.Fatal(err)
	}
	return victim, p, &hostile{t: t, s: rawSession(t, bad, victim), bad: bad}
}

func spi(t *testing.T, master int, role kdf.Role, id uint32) kdf.SPI {
	t.Helper()
	s, err := kdf.MakeSPI(master, role, id)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// remoteErr turns an Error message into the error it reports.
func remoteErr(m wire.Message, want string) error {
	if em, ok := m.(wire.Error); ok {
		return &wire.ProtocolError{Code: em.Code, Msg: em.Text, Remote: true}
	}
	return errors.New("got " + m.Type().String() + ", want " + want)
}

// offer runs one negotiation as the initiator: offer, read the ack,
// confirm. It returns the victim's ack, or the error it answered with.
func (h *hostile) offer(o wire.SAOffer) (wire.SAAck, error) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	str, err := h.s.conn.OpenStreamSync(ctx)
	if err != nil {
		return wire.SAAck{}, err
	}
	defer str.Close()
	str.SetDeadline(time.Now().Add(5 * time.Second))
	if err := wire.WriteMessage(str, o); err != nil {
		return wire.SAAck{}, err
	}
	m, err := wire.ReadMessage(str)
	if err != nil {
		return wire.SAAck{}, err
	}
	ack, ok := m.(wire.SAAck)
	if !ok {
		return wire.SAAck{}, remoteErr(m, "SAAck")
	}
	if err := wire.WriteMessage(str, wire.SAConfirm{Assoc: o.Assoc, Generation: o.Generation}); err != nil {
		return ack, err
	}
	return ack, nil
}

// accept takes the victim initiator's next offer.
func (h *hostile) accept() (*quic.Stream, wire.SAOffer) {
	h.t.Helper()
	str, err := h.s.conn.AcceptStream(ctxT(h.t, 5*time.Second))
	if err != nil {
		h.t.Fatalf("no offer from the victim: %v", err)
	}
	str.SetDeadline(time.Now().Add(5 * time.Second))
	m, err := wire.ReadMessage(str)
	if err != nil {
		h.t.Fatal(err)
	}
	o, ok := m.(wire.SAOffer)
	if !ok {
		h.t.Fatalf("got %v, want SAOffer", m)
	}
	return str, o
}

// ack answers an offer with rx as the hostile side's receive SPI and
// returns the victim's confirm, or the error it answered with.
func (h *hostile) ack(str *quic.Stream, o wire.SAOffer, rx kdf.SPI) error {
	h.t.Helper()
	defer str.Close()
	a := wire.SAAck(o)
	a.RxSPI = rx
	if err := wire.WriteMessage(str, a); err != nil {
		return err
	}
	m, err := wire.ReadMessage(str)
	if err != nil {
		return err
	}
	if _, ok := m.(wire.SAConfirm); !ok {
		return remoteErr(m, "SAConfirm")
	}
	return nil
}

func (h *hostile) send(m wire.Message) error {
	return h.s.send(ctxT(h.t, 5*time.Second), m)
}

// refused checks that the victim refused with an error of code, which it
// logged naming the hostile peer, and that the session ended.
func (h *hostile) refused(victim *node, err error, code wire.ErrorCode, text string) {
	h.t.Helper()
	var pe *wire.ProtocolError
	if !errors.As(err, &pe) || pe.Code != code || !pe.Remote {
		h.t.Fatalf("victim answered %v, want an Error with code %s", err, code)
	}
	ended(h.t, h.s)
	bad := h.bad.ep.Public().Fingerprint()
	waitFor(h.t, func() bool {
		logs := string(victim.logs.Bytes())
		return strings.Contains(logs, text) && strings.Contains(logs, bad)
	})
}

// noKeyTwice fails if the installer was ever handed one TX key (or one
// RX key) twice.
func noKeyTwice(t *testing.T, r *recorder) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	for i, a := range r.history {
		for _, b := range r.history[:i] {
			if a.txKey.Equal(b.txKey) || a.rxKey.Equal(b.rxKey) {
				t.Fatalf("key installed twice: %s and %s", &b.sa, &a.sa)
			}
		}
	}
}

func installs(r *recorder) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.history)
}

// TestRepeatedOfferedSPIRefused: an initiator that offers receive SPIs X,
// Y, X would make the responder derive X's TX key again and restart its
// nonce counter under it. The third offer must be refused.
func TestRepeatedOfferedSPIRefused(t *testing.T) {
	victim, h := hostileInitiator(t, nil)
	x, y := spi(t, 0, kdf.Initiator, 300), spi(t, 0, kdf.Initiator, 301)
	for gen, rx := range []kdf.SPI{x, y} {
		if _, err := h.offer(wire.SAOffer{Assoc: 1, Generation: uint32(gen + 1), Backend: wire.BackendXFRM, Suite: kdf.AESGCM256, RxSPI: rx}); err != nil {
			t.Fatalf("honest-looking offer %d: %v", gen+1, err)
		}
	}
	_, err := h.offer(wire.SAOffer{Assoc: 1, Generation: 3, Backend: wire.BackendXFRM, Suite: kdf.AESGCM256, RxSPI: x})
	h.refused(victim, err, wire.CodeSPIReuse, "repeats")
	if n := installs(victim.inst); n != 2 {
		t.Fatalf("%d installs, want 2", n)
	}
	noKeyTwice(t, victim.inst)
}

// TestRepeatedAckedSPIRefused is the same attack from a responder, with
// SAAck.RxSPI: X, Y, X.
func TestRepeatedAckedSPIRefused(t *testing.T) {
	victim, _, h := hostileResponder(t, nil)
	x, y := spi(t, 0, kdf.Responder, 300), spi(t, 0, kdf.Responder, 301)
	for i, rx := range []kdf.SPI{x, y, x} {
		if i > 0 {
			if err := h.send(wire.Rekey{Assoc: 1}); err != nil {
				t.Fatal(err)
			}
		}
		str, o := h.accept()
		err := h.ack(str, o, rx)
		if i < 2 {
			if err != nil {
				t.Fatalf("negotiation %d: %v", i+1, err)
			}
			continue
		}
		h.refused(victim, err, wire.CodeSPIReuse, "repeats")
	}
	if n := installs(victim.inst); n != 2 {
		t.Fatalf("%d installs, want 2", n)
	}
	noKeyTwice(t, victim.inst)
}
