package keyexchange

import (
	"crypto/tls"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/pspd/pspd/keyexchange/identity"
)

// TestHybridKeyExchange: two default endpoints agree on the hybrid
// SecP256r1MLKEM768 group, which both sides report per peer; a
// classic-only endpoint and a default one agree on P-256, because the
// default still offers it after the hybrids.
func TestHybridKeyExchange(t *testing.T) {
	classic := func(c *Config) { c.ClassicKeyExchange = true }
	for _, tc := range []struct {
		name      string
		ini, resp func(*Config)
		want      tls.CurveID
	}{
		{"both default", nil, nil, tls.SecP256r1MLKEM768},
		{"classic initiator", classic, nil, tls.CurveP256},
		{"classic responder", nil, classic, tls.CurveP256},
		{"both classic", classic, classic, tls.CurveP256},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := orderedIdentities(t)
			ini, resp := newNode(t, a, tc.ini), newNode(t, b, tc.resp)
			pr, err := resp.ep.AddPeer(peerCfg(ini))
			if err != nil {
				t.Fatal(err)
			}
			pi, err := ini.ep.AddPeer(peerCfg(resp))
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range []*Peer{pi, pr} {
				if _, err := p.WaitGeneration(ctxT(t, 10*time.Second), 1); err != nil {
					t.Fatal(err)
				}
				if s := p.Session(); s.Group() != tc.want || s.conn.ConnectionState().TLS.CurveID != tc.want {
					t.Errorf("%s: session group %s (TLS %s), want %s", p.Role(), s.Group(), s.conn.ConnectionState().TLS.CurveID, tc.want)
				}
				if g := p.Status().Group; g != tc.want {
					t.Errorf("%s: status group %s, want %s", p.Role(), g, tc.want)
				}
			}
			if st := ini.ep.Stats(); st.Groups[tc.want] == 0 {
				t.Errorf("handshake not counted under %s: %v", tc.want, st.Groups)
			}
		})
	}
}

// TestX25519MLKEM768Accepted: a peer that offers only X25519MLKEM768 gets
// it; one that offers only groups pspd does not, gets no session.
func TestX25519MLKEM768Accepted(t *testing.T) {
	a, b := orderedIdentities(t)
	ini, resp := newNode(t, a, nil), newNode(t, b, nil)
	if _, err := resp.ep.AddPeer(peerCfg(ini)); err != nil {
		t.Fatal(err)
	}
	dial := func(groups ...tls.CurveID) (*quic.Conn, error) {
		conf := tlsConfig(ini.ep.cur.leaf, func(identity.PublicKey) error { return nil }, keyExchangeGroups(true, false))
		conf.CurvePreferences = groups
		return quic.DialAddr(ctxT(t, 5*time.Second), resp.ep.Addr().String(), conf, &quic.Config{})
	}
	c, err := dial(tls.X25519MLKEM768)
	if err != nil {
		t.Fatal(err)
	}
	if g := c.ConnectionState().TLS.CurveID; g != tls.X25519MLKEM768 {
		t.Errorf("negotiated %s, want X25519MLKEM768", g)
	}
	c.CloseWithError(0, "")
	if c, err := dial(tls.CurveP384); err == nil {
		c.CloseWithError(0, "")
		t.Fatalf("a P-384-only peer got a session (group %s)", c.ConnectionState().TLS.CurveID)
	}
}
