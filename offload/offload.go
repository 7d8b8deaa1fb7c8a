// Package offload is where pspd's data planes meet: the Backend interface
// that kernel PSP, kernel XFRM and the userspace data plane implement, the
// probe that finds out which of them this host can run, and the choice of
// one backend per peer from the operator's preference and what both peers
// offer.
package offload

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/pspd/pspd/keyexchange"
	"github.com/pspd/pspd/keyexchange/wire"
	"github.com/pspd/pspd/policy"
)

// Traffic is what a backend counted for one SA pair.
type Traffic struct {
	BytesIn, BytesOut     uint64
	PacketsIn, PacketsOut uint64
	Drops                 uint64
}

// Backend is one data plane. Install, Activate and Remove follow the
// keyexchange.Installer contract: inbound first, outbound only once the
// peer receives, nothing left behind by a failure.
type Backend interface {
	keyexchange.Installer
	Kind() wire.Backend
	// Traffic reports the counters of an installed SA pair.
	Traffic(sa *keyexchange.SA) (Traffic, bool)
	Close() error
}

// Availability is the probe's verdict on one backend.
type Availability struct {
	Backend   wire.Backend
	Available bool
	// Reason says what is missing when the backend is not available, in
	// terms an operator can act on.
	Reason string
}

// Report is what this host can run, best backend first.
type Report []Availability

// Available lists the usable backends, best first.
func (r Report) Available() []wire.Backend {
	var out []wire.Backend
	for _, a := range r {
		if a.Available {
			out = append(out, a.Backend)
		}
	}
	return out
}

func (r Report) reason(b wire.Backend) string {
	for _, a := range r {
		if a.Backend == b {
			return a.Reason
		}
	}
	return "not probed"
}

// Prober checks whether one backend can run here.
type Prober struct {
	Backend wire.Backend
	Probe   func(ctx context.Context) error
}

// Probe runs the probers in order of preference (best first).
func Probe(ctx context.Context, probers []Prober) Report {
	var r Report
	for _, p := range probers {
		a := Availability{Backend: p.Backend, Available: true}
		if err := p.Probe(ctx); err != nil {
			a.Available, a.Reason = false, err.Error()
		}
		r = append(r, a)
	}
	return r
}

// Preference orders backends for host-to-host associations. Kernel PSP
// protects individual TCP sockets handed to pspd, not a host's traffic, so
// it is never chosen here; it is used for socket upgrades.
var Preference = []wire.Backend{wire.BackendXFRM, wire.BackendUserspace}

// ErrNoCommonBackend means the two peers share no usable backend.
var ErrNoCommonBackend = errors.New("offload: no common backend")

// Candidates lists the backends a peer may use on this host, best first:
// the configured one alone, or with auto every host-to-host backend this
// host can run. The key exchange offers them in this order and settles on
// the first the peer offers too. The error says what is missing.
func Candidates(want policy.Backend, local Report) ([]wire.Backend, error) {
	mine := local.Available()
	if want != policy.BackendAuto && want != "" {
		b, ok := map[policy.Backend]wire.Backend{
			policy.BackendPSP: wire.BackendPSP, policy.BackendXFRM: wire.BackendXFRM, policy.BackendUserspace: wire.BackendUserspace,
		}[want]
		if !ok {
			return nil, fmt.Errorf("offload: unknown backend %q", want)
		}
		if b == wire.BackendPSP {
			return nil, errors.New("offload: backend psp protects TCP connections that applications hand to pspd, not a host's traffic to a peer; set backend to auto, xfrm or userspace (PSP upgrades work whatever it is)")
		}
		if !slices.Contains(mine, b) {
			return nil, fmt.Errorf("offload: backend %s was configured but this host cannot run it: %s", b, local.reason(b))
		}
		return []wire.Backend{b}, nil
	}
	var out []wire.Backend
	for _, b := range Preference {
		if slices.Contains(mine, b) {
			out = append(out, b)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: this host can run none of %s (%s)", ErrNoCommonBackend, list(Preference), local.Missing())
	}
	return out, nil
}

// Choose picks the backend for a peer that offers peer (nil: unknown
// yet): the first of Candidates the peer offers too.
func Choose(want policy.Backend, local Report, peer []wire.Backend) (wire.Backend, error) {
	cs, err := Candidates(want, local)
	if err != nil {
		return 0, err
	}
	for _, b := range cs {
		if peer == nil || slices.Contains(peer, b) {
			return b, nil
		}
	}
	if len(cs) == 1 && want != policy.BackendAuto && want != "" {
		return 0, fmt.Errorf("offload: backend %s was configured but the peer does not offer it (it offers %s)", cs[0], list(peer))
	}
	return 0, fmt.Errorf("%w: this host offers %s, the peer offers %s", ErrNoCommonBackend, list(cs), list(peer))
}

// Missing says, for each backend this host cannot run, why not.
func (r Report) Missing() string {
	var s []string
	for _, a := range r {
		if !a.Available {
			s = append(s, a.Backend.String()+": "+a.Reason)
		}
	}
	return strings.Join(s, "; ")
}

func list(bs []wire.Backend) string {
	if len(bs) == 0 {
		return "none"
	}
	var s []string
	for _, b := range bs {
		s = append(s, b.String())
	}
	return strings.Join(s, ", ")
}
