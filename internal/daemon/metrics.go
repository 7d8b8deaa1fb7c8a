package daemon

import (
	"crypto/fips140"
	"runtime"
	"runtime/debug"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/keyexchange"
	"github.com/pspd/pspd/localapi"
)

// collector reads the daemon's state at scrape time, so the numbers are
// the ones pspctl shows and nothing is counted twice.
type collector struct{ d *Daemon }

var (
	descBuild      = prometheus.NewDesc("pspd_build_info", "pspd's version, commit, Go version and FIPS 140-3 mode; always 1.", []string{"version", "revision", "goversion", "fips140"}, nil)
	descPeers      = prometheus.NewDesc("pspd_peers", "Configured peers by session state (down, connecting, handshaking, up, backoff).", []string{"state"}, nil)
	descPeerUp     = prometheus.NewDesc("pspd_peer_up", "1 while a session with the peer is established.", []string{"peer"}, nil)
	descPeerState  = prometheus.NewDesc("pspd_peer_state", "1 for the state the peer's session is in, 0 for the others.", []string{"peer", "state"}, nil)
	descPeerSince  = prometheus.NewDesc("pspd_peer_state_since_timestamp_seconds", "When the peer entered its current state.", []string{"peer"}, nil)
	descDownSince  = prometheus.NewDesc("pspd_peer_down_since_timestamp_seconds", "When the peer was added or last went down; absent while it is up.", []string{"peer"}, nil)
	descHandshake  = prometheus.NewDesc("pspd_peer_last_handshake_timestamp_seconds", "When the peer's latest generation of keys was confirmed; kept while it is down.", []string{"peer"}, nil)
	descLastPacket = prometheus.NewDesc("pspd_peer_last_packet_timestamp_seconds", "When a packet of the peer last went through its associations, by direction (xfrm: to the second); kept while it is down.", []string{"peer", "direction"}, nil)
	descAssocs     = prometheus.NewDesc("pspd_associations", "Current associations by backend.", []string{"backend"}, nil)
	descAssocAge   = prometheus.NewDesc("pspd_association_age_seconds", "Age of the peer's current generation of keys.", []string{"peer", "backend"}, nil)
	descRekeys     = prometheus.NewDesc("pspd_rekeys_total", "Completed rekeys by peer and reason (timer, budget, operator, peer).", []string{"peer", "reason"}, nil)
	descBytes      = prometheus.NewDesc("pspd_bytes_total", "Bytes through the peer's associations, over every generation since pspd started.", []string{"peer", "direction"}, nil)
	descPkts       = prometheus.NewDesc("pspd_packets_total", "Packets through the peer's associations, over every generation since pspd started.", []string{"peer", "direction"}, nil)
	descPeerDrops  = prometheus.NewDesc("pspd_peer_drops_total", "Packets of the peer the data plane dropped, as it counts them: per SA for xfrm (restarting at each rekey), per peer for userspace.", []string{"peer"}, nil)
	descHands      = prometheus.NewDesc("pspd_handshakes_total", "Key-exchange handshakes by result.", []string{"result"}, nil)
	descGroups     = prometheus.NewDesc("pspd_handshake_groups_total", "Key-exchange handshakes that came up, by TLS key exchange group (SecP256r1MLKEM768: hybrid post-quantum).", []string{"group"}, nil)
	descDrops      = prometheus.NewDesc("pspd_drops_total", "Packets dropped by the data plane, by backend and reason (one set of reason names for every backend).", []string{"backend", "reason"}, nil)
	descReloadOK   = prometheus.NewDesc("pspd_reload_success", "1 if the latest configuration load (start or reload) was applied, 0 if it was refused or applied in part.", nil, nil)
	descReloadTime = prometheus.NewDesc("pspd_reload_timestamp_seconds", "When the configuration was last loaded (start or reload), applied or not.", nil, nil)
	descPSPDev     = prometheus.NewDesc("pspd_psp_device_total", "The kernel's statistics of a PSP device (key-rotations, stale-events, rx-packets, rx-bytes, rx-auth-fail, rx-error, rx-bad, tx-packets, tx-bytes, tx-error), by device id.", []string{"device", "stat"}, nil)
	descPSPUp      = prometheus.NewDesc("pspd_psp_upgrades_total", "Socket upgrades to PSP by result: ok, refused (before the socket was touched), failed (the socket had to be closed).", []string{"result"}, nil)
	descPSPStale   = prometheus.NewDesc("pspd_psp_stale_reported_total", "Upgraded connections reported psp-stale-soon or psp-stale.", nil, nil)
	descPSPConns   = prometheus.NewDesc("pspd_psp_connections", "Upgraded connections still open.", nil, nil)
	descFleetUp    = prometheus.NewDesc("pspd_fleet_connected", "1 while the membership service is followed, 0 while it is unreachable (the last membership known stays in force); absent without one.", nil, nil)
	descFleetPeers = prometheus.NewDesc("pspd_fleet_members", "Peers in force that come from the fleet's membership.", nil, nil)
	descFleetOut   = prometheus.NewDesc("pspd_fleet_left_out", "Membership records left out (malformed, or in conflict with the configured peers).", nil, nil)
)

var states = []keyexchange.State{keyexchange.StateDown, keyexchange.StateConnecting, keyexchange.StateHandshaking, keyexchange.StateUp, keyexchange.StateBackoff}

var rekeyReasons = []string{localapi.ReasonTimer, localapi.ReasonBudget, localapi.ReasonOperator, localapi.ReasonPeer}

// dropNames maps the backends' drop-reason names onto the one set
// /metrics uses: receive-side reasons unprefixed (unknown-spi,
// auth-failed, replay, ...: the userspace codec's and XFRM's agree),
// transmit-side ones prefixed outbound- (XFRM's outbound-no-sa, which the
// README documents for traffic held back by require_encryption). Names
// not listed pass through.
var dropNames = map[string]string{
	"tx-no-sa":            "outbound-no-sa",
	"tx-expired":          "outbound-expired-sa",
	"tx-budget-exhausted": "outbound-budget-exhausted",
	"tx-empty-inner":      "outbound-empty-inner",
	"tx-malformed-inner":  "outbound-malformed-inner",
	"tx-bad-buffer":       "outbound-bad-buffer",
}

func dropName(backendName string) string {
	if n, ok := dropNames[backendName]; ok {
		return n
	}
	return backendName
}

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descPSPDev, descPSPUp, descPSPStale, descPSPConns, descBuild, descPeers, descPeerUp, descPeerState, descPeerSince, descDownSince, descHandshake, descLastPacket, descAssocs,
		descAssocAge, descRekeys, descBytes, descPkts, descPeerDrops, descHands, descGroups, descDrops, descReloadOK, descReloadTime,
		descFleetUp, descFleetPeers, descFleetOut} {
		ch <- d
	}
}

func revision() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				return s.Value
			}
		}
	}
	return "unknown"
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	d := c.d
	gauge := func(desc *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(desc, prometheus.GaugeValue, v, labels...)
	}
	counter := func(desc *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(desc, prometheus.CounterValue, float64(v), labels...)
	}
	gauge(descBuild, 1, Version, revision(), runtime.Version(), strconv.FormatBool(fips140.Enabled()))

	d.mu.Lock()
	if d.fleet != nil {
		f := d.fleet.status(len(d.members))
		up := 0.0
		if f.Connected {
			up = 1
		}
		gauge(descFleetUp, up)
		gauge(descFleetPeers, float64(f.Members))
		gauge(descFleetOut, float64(len(f.LeftOut)))
	}
	byState := map[keyexchange.State]float64{}
	assocs := map[string]float64{}
	for _, p := range d.peers {
		name := p.cfg.Name
		st := p.kx.Status()
		byState[st.State]++
		up := 0.0
		if st.Up {
			up = 1
		}
		gauge(descPeerUp, up, name)
		for _, s := range states {
			v := 0.0
			if s == st.State {
				v = 1
			}
			gauge(descPeerState, v, name, s.String())
		}
		if !st.Since.IsZero() {
			gauge(descPeerSince, float64(st.Since.UnixNano())/1e9, name)
		}
		if !st.Up && !st.DownSince.IsZero() {
			gauge(descDownSince, float64(st.DownSince.UnixNano())/1e9, name)
		}
		if t := p.hist.lastHandshake; !t.IsZero() {
			gauge(descHandshake, float64(t.UnixNano())/1e9, name)
		}
		for _, r := range rekeyReasons {
			counter(descRekeys, p.hist.rekeysBy[r], name, r)
		}
		var id assoc.ID
		if sa, ok := p.kx.Current(); ok {
			id = sa.ID
			assocs[sa.Backend.String()]++
			if t := p.created[sa.Generation]; !t.IsZero() {
				gauge(descAssocAge, time.Since(t).Seconds(), name, sa.Backend.String())
			}
		}
		all, _, _ := d.totals(p, id, 0)
		counter(descBytes, all.BytesIn, name, "in")
		counter(descBytes, all.BytesOut, name, "out")
		counter(descPkts, all.PacketsIn, name, "in")
		counter(descPkts, all.PacketsOut, name, "out")
		counter(descPeerDrops, all.Drops, name)
		for dir, t := range map[string]time.Time{"in": all.LastIn, "out": all.LastOut} {
			if !t.IsZero() {
				gauge(descLastPacket, float64(t.UnixNano())/1e9, name, dir)
			}
		}
	}
	d.mu.Unlock()
	for _, s := range states {
		gauge(descPeers, byState[s], s.String())
	}
	for b, v := range assocs {
		gauge(descAssocs, v, b)
	}
	hs := d.ep.Stats()
	counter(descHands, hs.Handshakes, "ok")
	counter(descHands, hs.HandshakeFailures, "failed")
	for g, n := range hs.Groups {
		counter(descGroups, n, g.String())
	}
	for kind, b := range d.backends {
		drops := map[string]uint64{}
		for reason, v := range b.Drops() {
			drops[dropName(reason)] += v
		}
		for reason, v := range drops {
			counter(descDrops, v, kind.String(), reason)
		}
	}
	r := d.lastReload()
	ok := 1.0
	if r.err != nil {
		ok = 0
	}
	gauge(descReloadOK, ok)
	gauge(descReloadTime, float64(r.at.UnixNano())/1e9)
	if d.psp != nil {
		c := d.psp.Counters()
		counter(descPSPUp, c.UpgradesOK, "ok")
		counter(descPSPUp, c.UpgradesRefused, "refused")
		counter(descPSPUp, c.UpgradesFailed, "failed")
		counter(descPSPStale, c.StaleReported)
		gauge(descPSPConns, float64(c.Connections))
		// A device whose statistics the kernel will not give is left out;
		// the rest of /metrics still answers.
		if stats, err := d.psp.DeviceStats(); err == nil {
			for _, st := range stats {
				dev := strconv.FormatUint(uint64(st.DevID), 10)
				for _, v := range []struct {
					name string
					n    uint64
				}{
					{"key-rotations", st.KeyRotations}, {"stale-events", st.StaleEvents},
					{"rx-packets", st.RxPackets}, {"rx-bytes", st.RxBytes}, {"rx-auth-fail", st.RxAuthFail},
					{"rx-error", st.RxError}, {"rx-bad", st.RxBad},
					{"tx-packets", st.TxPackets}, {"tx-bytes", st.TxBytes}, {"tx-error", st.TxError},
				} {
					counter(descPSPDev, v.n, dev, v.name)
				}
			}
		}
	}
}

func newMetrics(d *Daemon) *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(collector{d}, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return r
}
