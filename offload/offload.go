// Package offload is the contract between the daemon and pspd's data
// planes: the Backend interface that kernel XFRM and the userspace data
// plane implement (backend.go, which also states what each lifecycle
// transition leaves in the kernel), the peer spec they are given, the probe
// that finds out which of them this host can run, and the list of backends
// a peer may use on this host.
//
// It imports neither the key exchange nor the configuration: the daemon
// turns both into this package's types, so a data plane links no QUIC and
// no YAML.
package offload

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/pspd/pspd/assoc"
)

// Availability is the probe's verdict on one backend.
type Availability struct {
	Backend   assoc.Backend
	Available bool
	// Reason says what is missing when the backend is not available, in
	// terms an operator can act on.
	Reason string
}

// Report is what this host can run, best backend first.
type Report []Availability

// Available lists the usable backends, best first.
func (r Report) Available() []assoc.Backend {
	var out []assoc.Backend
	for _, a := range r {
		if a.Available {
			out = append(out, a.Backend)
		}
	}
	return out
}

func (r Report) reason(b assoc.Backend) string {
	for _, a := range r {
		if a.Backend == b {
			return a.Reason
		}
	}
	return "not probed"
}

// Prober checks whether one backend can run here.
type Prober struct {
	Backend assoc.Backend
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
var Preference = []assoc.Backend{assoc.BackendXFRM, assoc.BackendUserspace}

// ErrNoCommonBackend means the two peers share no usable backend.
var ErrNoCommonBackend = errors.New("offload: no common backend")

// Candidates lists the backends a peer may use on this host, best first:
// want alone, or with want 0 (auto) every host-to-host backend this host
// can run. The key exchange offers them in this order and settles on the
// first the peer offers too. The error says what is missing.
func Candidates(want assoc.Backend, local Report) ([]assoc.Backend, error) {
	mine := local.Available()
	if want != 0 {
		if want == assoc.BackendPSP {
			return nil, errors.New("offload: backend psp protects TCP connections that applications hand to pspd, not a host's traffic to a peer; set backend to auto, xfrm or userspace (PSP upgrades work whatever it is)")
		}
		if !want.Valid() {
			return nil, fmt.Errorf("offload: unknown backend %s", want)
		}
		if !slices.Contains(mine, want) {
			return nil, fmt.Errorf("offload: backend %s was configured but this host cannot run it: %s", want, local.reason(want))
		}
		return []assoc.Backend{want}, nil
	}
	var out []assoc.Backend
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

func list(bs []assoc.Backend) string {
	if len(bs) == 0 {
		return "none"
	}
	var s []string
	for _, b := range bs {
		s = append(s, b.String())
	}
	return strings.Join(s, ", ")
}
