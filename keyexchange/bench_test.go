package keyexchange

import (
	"context"
	"crypto/tls"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/pspd/pspd/keyexchange/identity"
)

func reportLatency(b *testing.B, lat []time.Duration) {
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(len(lat))/b.Elapsed().Seconds(), "handshakes/s")
}

// BenchmarkHandshake is a full pspd session setup on loopback: QUIC with
// Retry, mutual TLS 1.3 with pinning, exporter and HKDF, Hello exchange;
// with the default hybrid post-quantum key exchange and with
// ClassicKeyExchange, in one run so that the two compare.
func BenchmarkHandshake(b *testing.B) {
	for _, tc := range []struct {
		name    string
		classic bool
		want    tls.CurveID
	}{
		{"SecP256r1MLKEM768", false, tls.SecP256r1MLKEM768},
		{"P256", true, tls.CurveP256},
	} {
		b.Run(tc.name, func(b *testing.B) {
			mod := func(c *Config) { c.ClassicKeyExchange = tc.classic }
			a, c := orderedIdentities(b)
			ini, resp := newNode(b, a, mod), newNode(b, c, mod)
			if _, err := resp.ep.AddPeer(peerCfg(ini)); err != nil {
				b.Fatal(err)
			}
			ctx := context.Background()
			var lat []time.Duration
			for b.Loop() {
				t0 := time.Now()
				s, err := ini.ep.dial(ctx, resp.ep.Addr(), resp.ep.Public())
				if err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(t0))
				if g := s.Group(); g != tc.want {
					b.Fatalf("negotiated %s, want %s", g, tc.want)
				}
				s.Close(nil)
			}
			reportLatency(b, lat)
		})
	}
}

// BenchmarkHandshakeTLSOverTCP is the baseline for BenchmarkHandshake: a
// bare TLS 1.3 handshake with the same certificates, curve and pin check
// over TCP loopback, plus the exporter.
func BenchmarkHandshakeTLSOverTCP(b *testing.B) {
	a, c := orderedIdentities(b)
	la, err := selfSignedLeaf(a, time.Now())
	if err != nil {
		b.Fatal(err)
	}
	lc, err := selfSignedLeaf(c, time.Now())
	if err != nil {
		b.Fatal(err)
	}
	pin := func(want identity.PublicKey) func(identity.PublicKey) error {
		return func(got identity.PublicKey) error {
			if got != want {
				return &PeerError{Peer: got, Op: "handshake", Err: net.ErrClosed}
			}
			return nil
		}
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", tlsConfig(lc, pin(a.Public()), keyExchangeGroups(false, false)))
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				conn.(*tls.Conn).Handshake()
				conn.Read(make([]byte, 1))
				conn.Close()
			}()
		}
	}()
	conf := tlsConfig(la, pin(c.Public()), keyExchangeGroups(true, false))
	var lat []time.Duration
	for b.Loop() {
		t0 := time.Now()
		conn, err := tls.Dial("tcp", ln.Addr().String(), conf)
		if err != nil {
			b.Fatal(err)
		}
		cs := conn.ConnectionState()
		root, err := cs.ExportKeyingMaterial(exporterLabel, nil, rootSecretLen)
		if err != nil {
			b.Fatal(err)
		}
		clear(root)
		lat = append(lat, time.Since(t0))
		conn.Close()
	}
	reportLatency(b, lat)
}

// BenchmarkSANegotiation is full SA negotiations (offer, install, ack,
// install, confirm) on one session through the public Peer API.
func BenchmarkSANegotiation(b *testing.B) {
	_, _, pi, pr := pair(b, func(c *Config) {
		c.MaxSAsPerSession = 0
		c.PeerNegotiationBurst = 1 << 30 // measure the negotiation, not the limit
	}, func(c *PeerConfig) { c.Grace = time.Millisecond })
	ctx := context.Background()
	if _, err := pr.WaitGeneration(ctx, 1); err != nil {
		b.Fatal(err)
	}
	s := pi.Session()
	for b.Loop() {
		if _, err := pi.Rekey(ctx); err != nil {
			b.Fatal(err)
		}
	}
	if pi.Session() != s {
		b.Fatal("session changed during the benchmark")
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "SAs/s")
}

// BenchmarkHandshakeHybridVsP256 interleaves hybrid (SecP256r1MLKEM768)
// and classic (P-256) session setups, one of each per iteration, so that
// both see the same machine load; it reports each one's rate from its own
// time and their ratio.
func BenchmarkHandshakeHybridVsP256(b *testing.B) {
	type side struct {
		ini, resp *node
		want      tls.CurveID
		spent     time.Duration
	}
	mk := func(classic bool, want tls.CurveID) *side {
		mod := func(c *Config) { c.ClassicKeyExchange = classic }
		a, c := orderedIdentities(b)
		s := &side{ini: newNode(b, a, mod), resp: newNode(b, c, mod), want: want}
		if _, err := s.resp.ep.AddPeer(peerCfg(s.ini)); err != nil {
			b.Fatal(err)
		}
		return s
	}
	sides := []*side{mk(false, tls.SecP256r1MLKEM768), mk(true, tls.CurveP256)}
	ctx := context.Background()
	n := 0
	for b.Loop() {
		for _, s := range sides {
			t0 := time.Now()
			sess, err := s.ini.ep.dial(ctx, s.resp.ep.Addr(), s.resp.ep.Public())
			if err != nil {
				b.Fatal(err)
			}
			s.spent += time.Since(t0)
			if g := sess.Group(); g != s.want {
				b.Fatalf("negotiated %s, want %s", g, s.want)
			}
			sess.Close(nil)
		}
		n++
	}
	hybrid := float64(n) / sides[0].spent.Seconds()
	classic := float64(n) / sides[1].spent.Seconds()
	b.ReportMetric(hybrid, "hybrid-handshakes/s")
	b.ReportMetric(classic, "p256-handshakes/s")
	b.ReportMetric(hybrid/classic, "hybrid/p256")
}
