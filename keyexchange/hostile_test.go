package keyexchange

import (
	"bytes"
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/keyexchange/wire"
)

// The tests in this file play a hostile pinned peer: one that passes
// authentication (its key is pinned, its TLS is pspd's own) and then
// misbehaves in the control protocol, over a real QUIC/TLS session. A
// pinned peer is authenticated, not trusted: every misbehaviour must end
// in a clear error naming the peer, install no key twice, and leave the
// host's other peers alone.

// hostile is a misbehaving peer's end of a real session with a victim
// endpoint that also keeps a session with an honest peer.
type hostile struct {
	t      *testing.T
	s      *Session
	bad    *node // the hostile peer's own endpoint
	victim *node
	honest *Peer // the victim's Peer for the honest peer
	before *Session
}

// arena starts a victim endpoint, an honest peer of it (associated before
// the test starts) and a hostile one, whose session with the victim is
// returned. The hostile side is the initiator if hostileInitiates.
func arena(t *testing.T, hostileInitiates bool, mod func(*Config)) (h *hostile, victimPeer *Peer) {
	t.Helper()
	a, b := orderedIdentities(t)
	badID, victimID := a, b
	if !hostileInitiates {
		badID, victimID = b, a
	}
	h = &hostile{t: t, bad: newNode(t, badID, mod), victim: newNode(t, victimID, mod)}
	hid, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	good := newNode(t, hid, mod)
	if h.honest, err = h.victim.ep.AddPeer(peerCfg(good)); err != nil {
		t.Fatal(err)
	}
	gp, err := good.ep.AddPeer(peerCfg(h.victim))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []*Peer{h.honest, gp} {
		if _, err := p.WaitGeneration(ctxT(t, 10*time.Second), 1); err != nil {
			t.Fatal(err)
		}
	}
	h.before = h.honest.Session()
	if victimPeer, err = h.victim.ep.AddPeer(peerCfg(h.bad)); err != nil {
		t.Fatal(err)
	}
	h.s = rawSession(t, h.bad, h.victim)
	return h, victimPeer
}

// honestUnaffected checks that the victim's session with the honest peer
// survived and still negotiates.
func (h *hostile) honestUnaffected() {
	h.t.Helper()
	if s := h.honest.Session(); s != h.before || s.Context().Err() != nil {
		h.t.Fatal("the honest peer's session did not survive the hostile one")
	}
	cur, _ := h.honest.Current()
	sa, err := h.honest.Rekey(ctxT(h.t, 10*time.Second))
	if err != nil || sa.Generation <= cur.Generation {
		h.t.Fatalf("honest peer rekey after the attack: %v %v", &sa, err)
	}
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

func (h *hostile) send(m wire.Message) error {
	return h.s.send(ctxT(h.t, 5*time.Second), m)
}

// refused checks that the victim refused with an error of code, which it
// logged naming the hostile peer, and that the session ended.
func (h *hostile) refused(err error, code wire.ErrorCode, text string) {
	h.t.Helper()
	var pe *wire.ProtocolError
	if !errors.As(err, &pe) || pe.Code != code || !pe.Remote {
		h.t.Fatalf("victim answered %v, want an Error with code %s", err, code)
	}
	ended(h.t, h.s)
	bad := h.bad.ep.Public().Fingerprint()
	victim := h.victim
	deadline := time.Now().Add(5 * time.Second)
	for {
		logs := string(victim.logs.Bytes())
		if strings.Contains(logs, text) && strings.Contains(logs, bad) {
			break
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("victim's log does not name the peer with %q: %s", text, logs)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// noKeyTwice fails if the installer was ever handed one TX key (or one
// RX key) twice, for any peer.
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

// installs counts the installs for the hostile peer, and how many of them
// are still live.
func (h *hostile) installs() (n, live int) {
	r := h.victim.inst
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, rec := range r.history {
		if rec.sa.Peer == h.bad.ep.Public() {
			n++
		}
	}
	for _, rec := range r.live {
		if rec.sa.Peer == h.bad.ep.Public() {
			live++
		}
	}
	return n, live
}

func offerOf(gen uint32, rx kdf.SPI) wire.SAOffer {
	return wire.SAOffer{Assoc: 1, Generation: gen, Backend: wire.BackendXFRM, Suite: kdf.AESGCM256, RxSPI: rx}
}

// rawNegotiation writes an offer, reads the ack, then sends tail in place
// of the confirm and closes the stream; it returns what the victim answers.
func (h *hostile) rawNegotiation(o wire.SAOffer, tail []byte) error {
	str, err := h.s.conn.OpenStreamSync(ctxT(h.t, 5*time.Second))
	if err != nil {
		return err
	}
	str.SetDeadline(time.Now().Add(5 * time.Second))
	if err := wire.WriteMessage(str, o); err != nil {
		return err
	}
	if m, err := wire.ReadMessage(str); err != nil {
		return err
	} else if _, ok := m.(wire.SAAck); !ok {
		return remoteErr(m, "SAAck")
	}
	if tail != nil { // nil: stall
		str.Write(tail)
		str.Close()
	}
	m, err := wire.ReadMessage(str)
	if err != nil {
		return err
	}
	return remoteErr(m, "Error")
}

var (
	oversizeFrame  = []byte{wire.Version, byte(wire.TypeSAConfirm), 0xff, 0xff}
	truncatedFrame = []byte{wire.Version, byte(wire.TypeSAConfirm), 0, 12, 0, 0, 0}
)

// TestHostileInitiator: a pinned initiator that misbehaves towards a
// responder.
func TestHostileInitiator(t *testing.T) {
	lim := func(c *Config) {
		short(c)
		c.PeerNegotiationBurst, c.PeerNegotiationInterval = 3, time.Hour
	}
	x, y := kdf.SPI(0), kdf.SPI(0)
	for _, tc := range []struct {
		name     string
		attack   func(h *hostile) error
		code     wire.ErrorCode
		text     string
		installs int // by the victim for the hostile peer
		live     int // of those, still installed once refused
	}{
		{"repeated SPI X Y X", func(h *hostile) error {
			for gen, rx := range []kdf.SPI{x, y} {
				if _, err := h.offer(offerOf(uint32(gen+1), rx)); err != nil {
					h.t.Fatalf("offer %d: %v", gen+1, err)
				}
			}
			_, err := h.offer(offerOf(3, x))
			return err
		}, wire.CodeSPIReuse, "repeats", 2, 2},
		{"SPI going back", func(h *hostile) error {
			if _, err := h.offer(offerOf(1, y)); err != nil {
				h.t.Fatal(err)
			}
			_, err := h.offer(offerOf(2, x))
			return err
		}, wire.CodeSPIReuse, "precedes", 1, 1},
		{"responder-role SPI", func(h *hostile) error {
			_, err := h.offer(offerOf(1, spi(h.t, 0, kdf.Responder, 300)))
			return err
		}, wire.CodeMalformed, "is not a initiator SPI", 0, 0},
		{"master key 1 SPI", func(h *hostile) error {
			_, err := h.offer(offerOf(1, spi(h.t, 1, kdf.Initiator, 300)))
			return err
		}, wire.CodeMalformed, "under master key 0", 0, 0},
		{"generation going back", func(h *hostile) error {
			if _, err := h.offer(offerOf(2, x)); err != nil {
				h.t.Fatal(err)
			}
			_, err := h.offer(offerOf(1, y))
			return err
		}, wire.CodeGeneration, "generation 1 of association 1 after 2", 1, 1},
		{"generation jumping to the maximum", func(h *hostile) error {
			_, err := h.offer(offerOf(^uint32(0), x))
			return err
		}, wire.CodeGeneration, "above the limit", 0, 0},
		{"generation jumping ahead", func(h *hostile) error {
			if _, err := h.offer(offerOf(1, x)); err != nil {
				h.t.Fatal(err)
			}
			_, err := h.offer(offerOf(1+maxGenerationStep+1, y))
			return err
		}, wire.CodeGeneration, "jumps more than", 1, 1},
		{"unknown association", func(h *hostile) error {
			o := offerOf(1, x)
			o.Assoc = 99
			_, err := h.offer(o)
			return err
		}, wire.CodeUnsupported, "association 99", 0, 0},
		{"offer flood", func(h *hostile) error {
			for i := range 50 {
				if _, err := h.offer(offerOf(uint32(i+1), spi(h.t, 0, kdf.Initiator, 300+uint32(i)))); err != nil {
					return err
				}
			}
			return nil
		}, wire.CodeRateLimit, "faster than", 4, 4}, // the burst of 3, and one of slack
		{"oversize frame instead of the confirm", func(h *hostile) error {
			return h.rawNegotiation(offerOf(1, x), oversizeFrame)
		}, wire.CodeTooLarge, "SAConfirm", 1, 0},
		{"truncated confirm", func(h *hostile) error {
			return h.rawNegotiation(offerOf(1, x), truncatedFrame)
		}, wire.CodeMalformed, "truncated", 1, 0},
		{"stream ended instead of the confirm", func(h *hostile) error {
			return h.rawNegotiation(offerOf(1, x), []byte{})
		}, wire.CodeMalformed, "SAConfirm", 1, 0},
		{"stall instead of the confirm", func(h *hostile) error {
			return h.rawNegotiation(offerOf(1, x), nil)
		}, wire.CodeTimeout, "SAConfirm", 1, 0},
		{"stall before the offer", func(h *hostile) error {
			str, err := h.s.conn.OpenStreamSync(ctxT(h.t, time.Second))
			if err != nil {
				return err
			}
			str.Write([]byte{wire.Version}) // opens the stream, then nothing
			m, err := wire.ReadMessage(str)
			if err != nil {
				return err
			}
			return remoteErr(m, "Error")
		}, wire.CodeTimeout, "no complete message within", 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x, y = spi(t, 0, kdf.Initiator, 300), spi(t, 0, kdf.Initiator, 301)
			h, _ := arena(t, true, lim)
			h.refused(tc.attack(h), tc.code, tc.text)
			waitFor(t, func() bool { _, live := h.installs(); return live == tc.live })
			if n, _ := h.installs(); n != tc.installs {
				t.Fatalf("%d installs for the hostile peer, want %d", n, tc.installs)
			}
			noKeyTwice(t, h.victim.inst)
			h.honestUnaffected()
		})
	}
}

// answer takes the victim initiator's next offer and writes resp (a frame,
// or nothing for a stall) in place of the ack; it returns the victim's
// answer.
func (h *hostile) answer(resp func(wire.SAOffer) []byte) error {
	str, o := h.accept()
	defer str.Close()
	if b := resp(o); b != nil {
		str.Write(b)
		str.Close()
	}
	m, err := wire.ReadMessage(str)
	if err != nil {
		return err
	}
	if _, ok := m.(wire.SAConfirm); ok {
		return nil
	}
	return remoteErr(m, "SAConfirm")
}

func ackFrame(o wire.SAOffer, mod func(*wire.SAAck)) []byte {
	a := wire.SAAck(o)
	mod(&a)
	b, _ := wire.AppendFrame(nil, a)
	return b
}

// TestHostileResponder: a pinned responder that misbehaves towards an
// initiator.
func TestHostileResponder(t *testing.T) {
	var x, y kdf.SPI
	withRx := func(rx kdf.SPI) func(o wire.SAOffer) []byte {
		return func(o wire.SAOffer) []byte { return ackFrame(o, func(a *wire.SAAck) { a.RxSPI = rx }) }
	}
	for _, tc := range []struct {
		name     string
		attack   func(h *hostile) error
		code     wire.ErrorCode
		text     string
		installs int
		live     int
	}{
		{"repeated SPI X Y X", func(h *hostile) error {
			for i, rx := range []kdf.SPI{x, y, x} {
				if i > 0 {
					if err := h.send(wire.Rekey{Assoc: 1}); err != nil {
						h.t.Fatal(err)
					}
				}
				if err := h.answer(withRx(rx)); err != nil || i == 2 {
					return err
				}
			}
			return nil
		}, wire.CodeSPIReuse, "repeats", 2, 2},
		{"initiator-role SPI", func(h *hostile) error {
			return h.answer(withRx(spi(h.t, 0, kdf.Initiator, 300)))
		}, wire.CodeMalformed, "is not a responder SPI", 0, 0},
		{"master key 1 SPI", func(h *hostile) error {
			return h.answer(withRx(spi(h.t, 1, kdf.Responder, 300)))
		}, wire.CodeMalformed, "under master key 0", 0, 0},
		{"ack for another generation", func(h *hostile) error {
			return h.answer(func(o wire.SAOffer) []byte {
				return ackFrame(o, func(a *wire.SAAck) { a.RxSPI, a.Generation = x, ^uint32(0) })
			})
		}, wire.CodeMalformed, "does not answer offer", 0, 0},
		{"oversize ack", func(h *hostile) error {
			return h.answer(func(wire.SAOffer) []byte { return []byte{wire.Version, byte(wire.TypeSAAck), 0xff, 0xff} })
		}, wire.CodeTooLarge, "SAAck", 0, 0},
		{"truncated ack", func(h *hostile) error {
			return h.answer(func(o wire.SAOffer) []byte { return withRx(x)(o)[:9] })
		}, wire.CodeMalformed, "truncated", 0, 0},
		{"stall instead of the ack", func(h *hostile) error {
			return h.answer(func(wire.SAOffer) []byte { return nil })
		}, wire.CodeTimeout, "waiting for SAAck", 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x, y = spi(t, 0, kdf.Responder, 300), spi(t, 0, kdf.Responder, 301)
			h, _ := arena(t, false, short)
			h.refused(tc.attack(h), tc.code, tc.text)
			waitFor(t, func() bool { _, live := h.installs(); return live == tc.live })
			if n, _ := h.installs(); n != tc.installs {
				t.Fatalf("%d installs for the hostile peer, want %d", n, tc.installs)
			}
			noKeyTwice(t, h.victim.inst)
			h.honestUnaffected()
		})
	}
}

// TestHostileRekeyFlood: a responder asking for rekeys as fast as it can
// gets them served at the configured rate, not one per request.
func TestHostileRekeyFlood(t *testing.T) {
	const burst, interval, window = 3, 200 * time.Millisecond, 1200 * time.Millisecond
	h, p := arena(t, false, func(c *Config) {
		c.PeerNegotiationBurst, c.PeerNegotiationInterval = burst, interval
	})
	served := make(chan struct{})
	go func() { // ack every offer with a fresh SPI, like an honest responder
		defer close(served)
		for id := uint32(300); ; id++ {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			str, err := h.s.conn.AcceptStream(ctx)
			cancel()
			if err != nil {
				return
			}
			str.SetDeadline(time.Now().Add(2 * time.Second))
			m, err := wire.ReadMessage(str)
			o, ok := m.(wire.SAOffer)
			if err != nil || !ok {
				return
			}
			a := wire.SAAck(o)
			a.RxSPI, _ = kdf.MakeSPI(0, kdf.Responder, id)
			wire.WriteMessage(str, a)
			wire.ReadMessage(str)
			str.Close()
		}
	}()
	if _, err := p.WaitGeneration(ctxT(t, 5*time.Second), 1); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	sent := 0
	for time.Since(start) < window {
		if err := h.send(wire.Rekey{Assoc: 1}); err != nil {
			t.Fatal(err)
		}
		sent++
		time.Sleep(5 * time.Millisecond)
	}
	n, _ := h.installs()
	elapsed := time.Since(start)
	// The first generation, the burst, then one per interval.
	limit := 1 + burst + int(elapsed/interval) + 1
	t.Logf("%d Rekey requests in %s served with %d negotiations (limit %d)", sent, elapsed, n, limit)
	if n > limit || n < 1+burst {
		t.Fatalf("%d negotiations for %d Rekey requests in %s: want between %d and %d", n, sent, elapsed, 1+burst, limit)
	}
	if !strings.Contains(string(h.victim.logs.Bytes()), "faster than this host serves") {
		t.Fatal("the flood was not logged")
	}
	if h.s.Context().Err() != nil {
		t.Fatal("a Rekey flood ended the session: the limit should delay, not fail")
	}
	noKeyTwice(t, h.victim.inst)
	h.honestUnaffected()
}

// TestHostileExplicitKey: a peer's PSP key reaches the handler attributed
// to that peer and to no other (the handler checks that the peer owns the
// connection), and nothing is installed for it.
func TestHostileExplicitKey(t *testing.T) {
	type keyFrom struct {
		peer identity.PublicKey
		k    wire.ExplicitKey
	}
	got := make(chan keyFrom, 4)
	h, _ := arena(t, true, func(c *Config) {
		c.ExplicitKeys = func(peer identity.PublicKey, k wire.ExplicitKey) {
			got <- keyFrom{peer, k}
		}
	})
	before := installs(h.victim.inst)
	// A connection of the honest peer's, claimed by the hostile one.
	k := wire.ExplicitKey{Assoc: 1, Generation: 1, Suite: kdf.AESGCM256, SPI: 0x80001234, Key: secret.New(bytes.Repeat([]byte{7}, 32)),
		Local: netip.MustParseAddrPort("192.0.2.9:40000"), Remote: netip.MustParseAddrPort("192.0.2.2:443")}
	defer k.Key.Wipe()
	if err := h.send(k); err != nil {
		t.Fatal(err)
	}
	select {
	case kf := <-got:
		kf.k.Key.Wipe()
		if kf.peer != h.bad.ep.Public() {
			t.Fatalf("key attributed to %s, sent by %s", kf.peer.Fingerprint(), h.bad.ep.Public().Fingerprint())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("key not delivered")
	}
	if n := installs(h.victim.inst); n != before {
		t.Fatalf("an explicit key made the key exchange install %d SAs", n-before)
	}
	h.honestUnaffected()
}

func installs(r *recorder) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.history)
}

// TestLocalRekeysPaced: an honest initiator whose own side asks for
// rekeys faster than the peer serves them paces itself instead of
// tripping the peer's limit and losing the session.
func TestLocalRekeysPaced(t *testing.T) {
	const burst, interval = 2, 100 * time.Millisecond
	_, resp, pi, pr := pair(t, func(c *Config) {
		c.PeerNegotiationBurst, c.PeerNegotiationInterval = burst, interval
	}, nil)
	ctx := ctxT(t, 10*time.Second)
	if _, err := pr.WaitGeneration(ctx, 1); err != nil {
		t.Fatal(err)
	}
	s := pi.Session()
	for i := range 6 {
		if _, err := pi.Rekey(ctx); err != nil {
			t.Fatalf("rekey %d: %v", i+1, err)
		}
	}
	if pi.Session() != s {
		t.Fatal("the session did not survive")
	}
	if strings.Contains(string(resp.logs.Bytes()), "faster than") {
		t.Fatal("the responder's limit tripped")
	}
}
