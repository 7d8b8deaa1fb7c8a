package daemon

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// collector reads the daemon's state at scrape time, so the numbers are
// the ones pspctl shows and nothing is counted twice.
type collector struct{ d *Daemon }

var (
	descPeers  = prometheus.NewDesc("pspd_peers", "Configured peers by session state.", []string{"state"}, nil)
	descAssocs = prometheus.NewDesc("pspd_associations", "Current associations by backend.", []string{"backend"}, nil)
	descRekeys = prometheus.NewDesc("pspd_rekeys_total", "Completed rekeys by peer.", []string{"peer"}, nil)
	descBytes  = prometheus.NewDesc("pspd_bytes_total", "Bytes through current associations.", []string{"peer", "backend", "direction"}, nil)
	descPkts   = prometheus.NewDesc("pspd_packets_total", "Packets through current associations.", []string{"peer", "backend", "direction"}, nil)
	descHands  = prometheus.NewDesc("pspd_handshakes_total", "Key-exchange handshakes by result.", []string{"result"}, nil)
	descDrops  = prometheus.NewDesc("pspd_drops_total", "Packets dropped by the data plane, by reason.", []string{"backend", "reason"}, nil)
)

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descPeers, descAssocs, descRekeys, descBytes, descPkts, descHands, descDrops} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	d := c.d
	d.mu.Lock()
	states := map[string]float64{"up": 0, "connecting": 0}
	assocs := map[string]float64{}
	for _, p := range d.peers {
		if p.kx.Session() != nil {
			states["up"]++
		} else {
			states["connecting"]++
		}
		ch <- prometheus.MustNewConstMetric(descRekeys, prometheus.CounterValue, float64(p.rekeys), p.cfg.Name)
		if sa, ok := p.kx.Current(); ok {
			assocs[sa.Backend.String()]++
			a := d.assoc(p, sa)
			for dir, v := range map[string][2]uint64{"in": {a.BytesIn, a.PacketsIn}, "out": {a.BytesOut, a.PacketsOut}} {
				ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(v[0]), p.cfg.Name, a.Backend, dir)
				ch <- prometheus.MustNewConstMetric(descPkts, prometheus.CounterValue, float64(v[1]), p.cfg.Name, a.Backend, dir)
			}
		}
	}
	d.mu.Unlock()
	hs := d.ep.Stats()
	ch <- prometheus.MustNewConstMetric(descHands, prometheus.CounterValue, float64(hs.Handshakes), "ok")
	ch <- prometheus.MustNewConstMetric(descHands, prometheus.CounterValue, float64(hs.HandshakeFailures), "failed")
	for s, v := range states {
		ch <- prometheus.MustNewConstMetric(descPeers, prometheus.GaugeValue, v, s)
	}
	for b, v := range assocs {
		ch <- prometheus.MustNewConstMetric(descAssocs, prometheus.GaugeValue, v, b)
	}
	for kind, b := range d.backends {
		for reason, v := range b.Drops() {
			ch <- prometheus.MustNewConstMetric(descDrops, prometheus.CounterValue, float64(v), kind.String(), reason)
		}
	}
}

func newMetrics(d *Daemon) *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(collector{d}, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return r
}
