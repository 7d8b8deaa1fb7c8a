package main

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/vishvananda/netlink"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/internal/daemon"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/offload"
	"github.com/pspd/pspd/policy"
)

// preflight is every refusal run can make before it starts anything: the
// identity, the backend probe, a backend this host can run for every
// peer (or, with no peers, for the global setting), and the userspace
// interface. check runs it and stops; run runs it and goes on, so that
// ExecStartPre=pspd check guards what ExecStart would refuse. Left out is
// only what needs the network or another pspd's resources: binding the
// control, underlay and API sockets.
//
// The report is returned with the error too (nil if the probe did not
// run), so that check can show what the host lacks.
func preflight(ctx context.Context, pc *policy.Config) (*identity.Identity, offload.Report, error) {
	id, err := pc.LoadIdentity()
	if err != nil {
		return nil, nil, err
	}
	report := probe(ctx, pc)
	for i, a := range report {
		// The report names the backend; its reason need not again.
		report[i].Reason = strings.TrimPrefix(a.Reason, a.Backend.String()+": ")
	}
	used := map[assoc.Backend]bool{}
	check := func(what string, want policy.Backend) error {
		b, _ := assoc.ParseBackend(string(want)) // auto: 0
		cs, err := offload.Candidates(b, report)
		if err != nil {
			return fmt.Errorf("%s: %s: %w", pc.File, what, err)
		}
		for _, b := range cs {
			used[b] = true
		}
		return nil
	}
	var errs []error
	if len(pc.Peers) == 0 {
		errs = append(errs, check("backend", pc.Backend))
	}
	for _, p := range pc.Peers {
		errs = append(errs, check("peer "+p.Name, p.Backend.OrDefault(pc.Backend)))
	}
	errs = append(errs, daemon.CheckSpecs(pc, report))
	if used[assoc.BackendUserspace] {
		errs = append(errs, checkTUNName(pc))
		if pc.Userspace.IO == policy.IOAFXDP && pc.Listen.Addr().IsUnspecified() {
			errs = append(errs, fmt.Errorf("%s: userspace.io af_xdp needs a specific listen address (the XDP program goes on the interface that holds it), not %v; set listen to this host's address or userspace.io to auto", pc.File, pc.Listen.Addr()))
		}
	}
	return id, report, errors.Join(errs...)
}

// checkTUNName refuses a userspace.interface that names an existing link
// other than a TUN device: opening it would fail, or attach pspd to a
// device that routes elsewhere. An existing TUN is fine (a persistent one,
// or the running pspd's when check validates a file before a reload).
func checkTUNName(pc *policy.Config) error {
	name := pc.Userspace.Interface
	link, err := netlink.LinkByName(name)
	var notFound netlink.LinkNotFoundError
	switch {
	case errors.As(err, &notFound):
		return nil
	case err != nil:
		return fmt.Errorf("%s: userspace.interface %s: %w", pc.File, name, err)
	}
	kind := link.Type()
	if t, ok := link.(*netlink.Tuntap); ok {
		if t.Mode != netlink.TUNTAP_MODE_TAP {
			return nil
		}
		kind = "tap"
	}
	return fmt.Errorf("%s: userspace.interface %s: a %s device of that name exists, and the userspace data plane needs a TUN device; set userspace.interface to a free name or remove it (ip link del %s)", pc.File, name, kind, name)
}
