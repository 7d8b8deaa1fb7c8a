package daemon

import (
	"context"
	"fmt"
	"net/netip"
	"strings"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/internal/ping"
	"github.com/pspd/pspd/localapi"
)

// Ping implements localapi.Service: ICMP echo requests from this host to
// an address the peer's prefixes hold, which the data plane in use sends
// through the association (XFRM policies, the userspace TUN route). The
// association's packet counters, read before and after, show whether
// they did.
func (d *Daemon) Ping(ctx context.Context, name string, req localapi.PingRequest) (localapi.PingResult, error) {
	d.mu.Lock()
	p := d.peers[name]
	d.mu.Unlock()
	if p == nil {
		return localapi.PingResult{}, fmt.Errorf("no peer named %q is configured (see pspctl peer list): %w", name, localapi.ErrNotFound)
	}
	to, err := pingTarget(p, req.To)
	if err != nil {
		return localapi.PingResult{}, err
	}
	sa, ok := p.kx.Current()
	if !ok {
		st := p.kx.Status()
		why := st.State.String()
		if st.Cause != nil {
			why += ": " + st.Cause.Error()
		}
		return localapi.PingResult{}, localapi.Refused(fmt.Errorf("peer %s has no association to ping through (%s)", name, why))
	}
	if sa.Backend == assoc.BackendPSP {
		return localapi.PingResult{}, localapi.Refused(fmt.Errorf("peer %s uses kernel PSP, whose associations belong to the TCP sockets of applications: pspd has no path of its own to ping through", name))
	}
	before, _, _ := d.totals(p, sa.ID, 0)
	replies, err := ping.Run(ctx, to, ping.Config{Count: req.Count})
	if err != nil {
		return localapi.PingResult{}, err
	}
	after, _, _ := d.totals(p, sa.ID, 0)
	r := localapi.PingResult{Peer: name, To: to.String(), Assoc: assocID(name, sa), Backend: sa.Backend.String(),
		AssocPacketsOut: after.PacketsOut - before.PacketsOut, AssocPacketsIn: after.PacketsIn - before.PacketsIn}
	for _, rp := range replies {
		pr := localapi.PingReply{Seq: rp.Seq}
		if rp.Err != nil {
			pr.Error = rp.Err.Error()
		} else {
			pr.RTTMicros = max(uint64(rp.RTT.Microseconds()), 1)
		}
		r.Replies = append(r.Replies, pr)
	}
	return r, nil
}

// pingTarget is the address to ping: to, which must be one the peer's
// prefixes route to it, or the peer's one single-address prefix.
func pingTarget(p *peer, to string) (netip.Addr, error) {
	pfx := p.cfg.Prefixes
	if len(pfx) == 0 {
		// An XFRM peer without prefixes is in transport mode: its
		// endpoint's address is what the association carries.
		pfx = []netip.Prefix{netip.PrefixFrom(p.cfg.Endpoint.Addr(), p.cfg.Endpoint.Addr().BitLen())}
	}
	names := make([]string, len(pfx))
	for i, f := range pfx {
		names[i] = f.String()
	}
	if to == "" {
		var single []netip.Addr
		for _, f := range pfx {
			if f.IsSingleIP() {
				single = append(single, f.Addr())
			}
		}
		if len(single) != 1 {
			return netip.Addr{}, fmt.Errorf("%w: peer %s's prefixes (%s) do not name one address to ping; give one with --to", localapi.ErrInvalid, p.cfg.Name, strings.Join(names, ", "))
		}
		return single[0], nil
	}
	a, err := netip.ParseAddr(to)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%w: ping to %q: not an IP address", localapi.ErrInvalid, to)
	}
	for _, f := range pfx {
		if f.Contains(a.Unmap()) {
			return a.Unmap(), nil
		}
	}
	return netip.Addr{}, fmt.Errorf("%w: %s is not in peer %s's prefixes (%s): a ping there would not go through its association", localapi.ErrInvalid, a, p.cfg.Name, strings.Join(names, ", "))
}
