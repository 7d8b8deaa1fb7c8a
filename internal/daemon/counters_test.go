package daemon

import (
	"context"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/keyexchange/wire"
	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/localapi/client"
	"github.com/pspd/pspd/offload"
	"github.com/pspd/pspd/offload/offloadtest"
)

// meteredBackend is a fake: offloadtest's backend with counters per SA
// (by receive SPI), as a real data plane keeps them, so that each new
// generation starts from zero; like the userspace codec, which keeps one
// TX SA, it forgets the outbound counts of the previous SA when the next
// one is activated. tests/netns/counters_test.go runs the same path on
// the real data planes.
type meteredBackend struct {
	*offloadtest.Backend
	mu     sync.Mutex
	perSA  map[assoc.SPI]offload.Traffic
	active assoc.SPI
	had    bool
}

func (m *meteredBackend) Activate(ctx context.Context, sa *assoc.SA) error {
	if err := m.Backend.Activate(ctx, sa); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.had && m.active != sa.RxSPI {
		t := m.perSA[m.active]
		t.BytesOut, t.PacketsOut = 0, 0
		m.perSA[m.active] = t
	}
	m.active, m.had = sa.RxSPI, true
	return nil
}

func newMetered() *meteredBackend {
	return &meteredBackend{Backend: newRec(), perSA: map[assoc.SPI]offload.Traffic{}}
}

// carry counts traffic on the SA with receive SPI rx.
func (m *meteredBackend) carry(rx assoc.SPI, in, out uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	t := m.perSA[rx]
	t.BytesIn += in * 100
	t.PacketsIn += in
	t.BytesOut += out * 100
	t.PacketsOut += out
	m.perSA[rx] = t
}

func (m *meteredBackend) Traffic(sa *assoc.SA) (offload.Traffic, bool) {
	if _, live := m.Backend.Traffic(sa); !live {
		return offload.Traffic{}, false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.perSA[sa.RxSPI], true
}

// gauge reads one sample of a metric family from the daemon's registry.
func sample(t *testing.T, r *prometheus.Registry, name string, labels map[string]string) (float64, bool) {
	t.Helper()
	mfs, err := r.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			got := map[string]string{}
			for _, lp := range m.GetLabel() {
				got[lp.GetName()] = lp.GetValue()
			}
			for k, v := range labels {
				if got[k] != v {
					continue next
				}
			}
			switch {
			case m.GetCounter() != nil:
				return m.GetCounter().GetValue(), true
			case m.GetGauge() != nil:
				return m.GetGauge().GetValue(), true
			}
		}
	}
	return 0, false
}

// TestCountersSurviveRekeys: the byte and packet counters of a peer and
// of its association are cumulative over generations: five rotations
// while traffic flows never make them go back, they equal the sum of what
// every generation carried (in the API and in /metrics), and they stay
// when the session ends and its SAs are removed.
func TestCountersSurviveRekeys(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the local API answers root or the pspd group only")
	}
	a, b := newHost(t, "a"), newHost(t, "b")
	m := newMetered()
	report := offload.Report{{Backend: wire.BackendXFRM, Reason: "kernel lacks ESP"}, {Backend: wire.BackendUserspace, Available: true}}
	a.startBackends(t, a.config(t, "", b), report, m)
	b.start(t, b.config(t, "", a))
	ca := client.New(a.sock)
	ctx := context.Background()

	var wantIn, wantOut, last uint64
	cur := waitAssoc(t, ca, 1)
	id := cur.ID
	check := func(round int) {
		t.Helper()
		as, err := ca.Assocs(ctx)
		if err != nil || len(as) != 1 {
			t.Fatalf("round %d: assocs %+v %v", round, as, err)
		}
		ps, err := ca.Peers(ctx)
		if err != nil || len(ps) != 1 {
			t.Fatalf("round %d: peers %+v %v", round, ps, err)
		}
		if as[0].ID == id && (as[0].BytesOut != wantOut || as[0].BytesIn != wantIn || as[0].PacketsOut != wantOut/100) {
			t.Errorf("round %d: assoc %s counts in %d out %d bytes, want %d and %d (the sum over its generations)", round, id, as[0].BytesIn, as[0].BytesOut, wantIn, wantOut)
		}
		if ps[0].BytesOut != wantOut || ps[0].BytesIn != wantIn || ps[0].PacketsIn != wantIn/100 {
			t.Errorf("round %d: peer counts in %d out %d bytes, want %d and %d", round, ps[0].BytesIn, ps[0].BytesOut, wantIn, wantOut)
		}
		if ps[0].BytesOut < last {
			t.Errorf("round %d: peer bytes out went back from %d to %d", round, last, ps[0].BytesOut)
		}
		last = ps[0].BytesOut
		for dir, want := range map[string]uint64{"in": wantIn, "out": wantOut} {
			v, ok := sample(t, a.d.metrics, "pspd_bytes_total", map[string]string{"peer": "b", "direction": dir})
			if !ok || v != float64(want) {
				t.Errorf("round %d: pspd_bytes_total{peer=b,direction=%s} = %v (present %v), want %d", round, dir, v, ok, want)
			}
		}
	}
	for round := 0; round <= 5; round++ {
		m.carry(assoc.SPI(cur.RxSPI), uint64(10+round), uint64(20+round))
		wantIn += uint64(10+round) * 100
		wantOut += uint64(20+round) * 100
		if round == 5 {
			check(round)
			break
		}
		if round%2 == 0 {
			// Odd rounds rotate without a query in between: only the
			// daemon's own reads before Activate save the counts.
			check(round)
		}
		rs, err := ca.Rotate(ctx, localapi.RotateRequest{Peer: "b"})
		if err != nil || len(rs) != 1 || rs[0].Error != "" {
			t.Fatalf("rotate %d: %+v %v", round, rs, err)
		}
		cur = waitAssoc(t, ca, rs[0].Generation)
		// The new generation starts from zero in the data plane.
		check(round)
	}

	// The session ends: a reload points a at another endpoint of b, so a
	// closes the session and removes every SA it had, the four previous
	// generations in their grace period included. What they carried stays
	// in the peer's totals.
	b.port = freeUDPPort(t)
	if err := a.d.Reload(a.config(t, "", b)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(15 * time.Second)
	for len(m.Live()) > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := len(m.Live()); n > 0 {
		t.Fatalf("%d SAs still installed 15s after the session ended", n)
	}
	ps, err := ca.Peers(ctx)
	if err != nil || len(ps) != 1 || ps[0].BytesOut != wantOut || ps[0].BytesIn != wantIn {
		t.Fatalf("after the session ended: peers %+v %v; want in %d out %d bytes", ps, err, wantIn, wantOut)
	}
	if v, _ := sample(t, a.d.metrics, "pspd_bytes_total", map[string]string{"peer": "b", "direction": "out"}); v != float64(wantOut) {
		t.Errorf("after the session ended: pspd_bytes_total{peer=b,direction=out} = %v, want %d", v, wantOut)
	}
}
