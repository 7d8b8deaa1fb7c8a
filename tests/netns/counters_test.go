package netns

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/pspd/pspd/localapi"
)

// TestCountersAcrossRotations: on the real data planes, the peer's and
// the association's byte counters (pspctl peer show, assoc list) and
// pspd_bytes_total never go back across five rotations while traffic
// flows between them, and grow by at least what each exchange carried.
// The peer's last packet in and out fall within each exchange (XFRM
// knows them to the second) and, like the counters, survive rotations;
// the control path's RTT is known while the peer is up.
func TestCountersAcrossRotations(t *testing.T) { perBackend(t, testCounters) }

type counterReading struct {
	peerIn, peerOut, assocIn, assocOut, metricIn, metricOut float64
	lastIn, lastOut                                         time.Time
	rtt                                                     uint64
}

func readCounters(t *testing.T, ctx context.Context, d *Daemon) counterReading {
	t.Helper()
	out, err := d.Ctl(ctx, "peer", "list", "--json")
	var ps []localapi.Peer
	if err == nil {
		err = json.Unmarshal([]byte(out), &ps)
	}
	if err != nil || len(ps) != 1 {
		t.Fatalf("peer list %q: %v", out, err)
	}
	name := ps[0].Name
	if out, err = d.Ctl(ctx, "peer", "show", name, "--json"); err != nil {
		t.Fatalf("peer show %s: %q %v", name, out, err)
	}
	var p localapi.Peer
	if err := json.Unmarshal([]byte(out), &p); err != nil {
		t.Fatal(err)
	}
	as, err := d.Assocs(ctx)
	if err != nil || len(as) != 1 {
		t.Fatalf("assoc list %+v %v", as, err)
	}
	m, err := d.Host.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	r := counterReading{peerIn: float64(p.BytesIn), peerOut: float64(p.BytesOut), assocIn: float64(as[0].BytesIn), assocOut: float64(as[0].BytesOut),
		lastIn: p.LastIn, lastOut: p.LastOut, rtt: p.RTTMicros}
	var ok1, ok2 bool
	r.metricIn, ok1 = MetricValue(m, "pspd_bytes_total", fmt.Sprintf(`direction="in",peer=%q`, name))
	r.metricOut, ok2 = MetricValue(m, "pspd_bytes_total", fmt.Sprintf(`direction="out",peer=%q`, name))
	if !ok1 || !ok2 {
		t.Fatalf("no pspd_bytes_total for peer %s in /metrics", name)
	}
	if ts, ok := MetricValue(m, "pspd_peer_last_packet_timestamp_seconds", fmt.Sprintf(`direction="in",peer=%q`, name)); !ok || int64(ts) < p.LastIn.Unix() {
		t.Errorf("pspd_peer_last_packet_timestamp_seconds in: %v %v; peer show says %s", ts, ok, p.LastIn)
	}
	return r
}

func testCounters(t *testing.T, backend string) {
	ctx, p, as := upPair(t, "pnc-", backend, 3*time.Minute, func(l *Lab) { l.Metrics = true })
	const n = 256 << 10
	var last counterReading
	// check reads the counters; with traffic, the exchange began at
	// sent.
	check := func(when string, grew float64, sent time.Time) {
		t.Helper()
		r := readCounters(t, ctx, p.A)
		t.Logf("%s: peer in %.0f out %.0f, assoc in %.0f out %.0f, metric in %.0f out %.0f, last in %s out %s, rtt %dµs", when, r.peerIn, r.peerOut, r.assocIn, r.assocOut, r.metricIn, r.metricOut,
			r.lastIn.Format(time.StampMilli), r.lastOut.Format(time.StampMilli), r.rtt)
		if r.rtt == 0 {
			t.Errorf("%s: peer show gives no rtt_us for an up peer", when)
		}
		for _, c := range []struct {
			what      string
			now, prev time.Time
		}{{"last in", r.lastIn, last.lastIn}, {"last out", r.lastOut, last.lastOut}} {
			switch {
			case c.now.Before(c.prev):
				t.Errorf("%s: %s went back from %s to %s", when, c.what, c.prev, c.now)
			case !sent.IsZero() && (c.now.Before(sent.Truncate(time.Second)) || c.now.After(time.Now())):
				t.Errorf("%s: %s is %s, not within the exchange that began at %s", when, c.what, c.now, sent)
			}
		}
		for _, c := range []struct {
			what      string
			now, prev float64
		}{
			{"peer in", r.peerIn, last.peerIn}, {"peer out", r.peerOut, last.peerOut},
			{"assoc in", r.assocIn, last.assocIn}, {"assoc out", r.assocOut, last.assocOut},
			{"pspd_bytes_total in", r.metricIn, last.metricIn}, {"pspd_bytes_total out", r.metricOut, last.metricOut},
		} {
			if c.now < c.prev+grew {
				t.Errorf("%s: %s went from %.0f to %.0f; want at least %.0f more", when, c.what, c.prev, c.now, grew)
			}
		}
		last = r
	}
	gen := as[0].Generation
	for round := 0; round <= 5; round++ {
		sent := time.Now()
		if _, err := EchoTCP(ctx, p.A.Host, p.B.Host, p.Inner[1], n, "pspd-counters-"); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		check(fmt.Sprintf("round %d, after traffic", round), n, sent)
		if round == 5 {
			break
		}
		if out, err := p.B.Ctl(ctx, "assoc", "rotate", "--all"); err != nil {
			t.Fatalf("rotate: %q %v", out, err)
		}
		gen++
		if _, err := p.WaitAssoc(ctx, gen); err != nil {
			t.Fatal(err)
		}
		check(fmt.Sprintf("round %d, after rotation to generation %d", round, gen), 0, time.Time{})
	}
}
