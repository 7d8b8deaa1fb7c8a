package psp

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/pspd/pspd/internal/nstest"
)

// TestResolveTarget: the namespace and netdev of an association request
// are checked before any device is touched, each refusal saying what was
// wrong; pspd's own namespace needs no nsid.
func TestResolveTarget(t *testing.T) {
	m := newManager(Config{})
	for _, tc := range []struct {
		name string
		t    AssocTarget
		want error
		text string
	}{
		{"no namespace", AssocTarget{Ifname: "lo"}, ErrNoNetNS, "name the network namespace"},
		{"missing namespace", AssocTarget{NetNS: "/run/netns/pspd-test-nonexistent", Ifname: "lo"}, ErrNoNetNS, "/run/netns/pspd-test-nonexistent"},
		{"not a namespace", AssocTarget{NetNS: "/dev/null", Ifname: "lo"}, ErrNoNetNS, "not a namespace file"},
		{"not a network namespace", AssocTarget{NetNS: "/proc/self/ns/uts", Ifname: "lo"}, ErrNoNetNS, "not a network namespace"},
		{"no interface named", AssocTarget{NetNS: "/proc/self/ns/net"}, ErrNoInterface, "name the interface"},
		{"unknown interface", AssocTarget{NetNS: "/proc/self/ns/net", Ifname: "pspd-nope0"}, ErrNoInterface, "no interface pspd-nope0"},
		{"unknown ifindex", AssocTarget{NetNS: "/proc/self/ns/net", Ifindex: 1 << 30}, ErrNoInterface, "with index 1073741824"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := m.resolve(tc.t)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.text) {
				t.Fatalf("resolve(%+v): %v, want %v saying %q", tc.t, err, tc.want, tc.text)
			}
		})
	}
	for _, at := range []AssocTarget{{NetNS: "/proc/self/ns/net", Ifname: "lo"}, {NetNS: "/proc/self/ns/net", Ifindex: 1}} {
		r, err := m.resolve(at)
		if err != nil {
			t.Fatal(err)
		}
		if r.ifindex != 1 || r.Ifname != "lo" || r.nsid != -1 {
			t.Errorf("resolve(%+v) = ifindex %d %q nsid %d, want lo (1) in pspd's own namespace (-1)", at, r.ifindex, r.Ifname, r.nsid)
		}
	}
}

// TestResolveOtherNamespace: a namespace other than pspd's gets an id in
// pspd's namespace if it had none (dev-assoc names it by that id), and
// keeps it on the next request.
func TestResolveOtherNamespace(t *testing.T) {
	own, other := nstest.New(t, "pspa"), nstest.New(t, "pspc")
	m := newManager(Config{NetNS: own})
	at := AssocTarget{NetNS: fmt.Sprintf("/proc/self/fd/%d", other), Ifname: "lo"}
	r, err := m.resolve(at)
	if err != nil {
		t.Fatal(err)
	}
	if r.nsid < 0 || r.ifindex != 1 {
		t.Fatalf("resolve(%+v) = nsid %d ifindex %d: want an assigned nsid and lo", at, r.nsid, r.ifindex)
	}
	again, err := m.resolve(at)
	if err != nil || again.nsid != r.nsid {
		t.Fatalf("second resolve: nsid %d %v, want %d", again.nsid, err, r.nsid)
	}
	if r, err := m.resolve(AssocTarget{NetNS: fmt.Sprintf("/proc/self/fd/%d", own), Ifindex: 1}); err != nil || r.nsid != -1 {
		t.Fatalf("pspd's own namespace by its fd: nsid %d %v, want -1", r.nsid, err)
	}
}
