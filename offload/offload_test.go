package offload

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/pspd/pspd/assoc"
)

func TestCandidates(t *testing.T) {
	report := Probe(context.Background(), []Prober{
		{assoc.BackendPSP, func(context.Context) error {
			return errors.New("no generic netlink family psp (kernel built without CONFIG_INET_PSP)")
		}},
		{assoc.BackendXFRM, func(context.Context) error { return errors.New("kernel lacks ESP rfc4106(gcm(aes))") }},
		{assoc.BackendUserspace, func(context.Context) error { return nil }},
	})
	for _, tc := range []struct {
		want    assoc.Backend
		got     []assoc.Backend
		errText string
	}{
		{0, []assoc.Backend{assoc.BackendUserspace}, ""},
		{assoc.BackendUserspace, []assoc.Backend{assoc.BackendUserspace}, ""},
		{assoc.BackendXFRM, nil, "backend xfrm was configured but this host cannot run it: kernel lacks ESP"},
		{assoc.BackendPSP, nil, "backend psp protects TCP connections that applications hand to pspd"},
	} {
		got, err := Candidates(tc.want, report)
		if tc.errText != "" {
			if err == nil || !strings.Contains(err.Error(), tc.errText) {
				t.Errorf("Candidates(%s) = %v, %v; want error containing %q", tc.want, got, err, tc.errText)
			}
			continue
		}
		if err != nil || len(got) != len(tc.got) || got[0] != tc.got[0] {
			t.Errorf("Candidates(%s) = %v, %v; want %v", tc.want, got, err, tc.got)
		}
	}
	none := Probe(context.Background(), []Prober{{assoc.BackendUserspace, func(context.Context) error { return errors.New("no /dev/net/tun") }}})
	if _, err := Candidates(0, none); !errors.Is(err, ErrNoCommonBackend) || !strings.Contains(err.Error(), "no /dev/net/tun") {
		t.Errorf("Candidates(auto) on a host with nothing = %v; want ErrNoCommonBackend with the reason", err)
	}
}

func TestEncapsulate(t *testing.T) {
	for _, c := range []struct {
		mode NATTraversal
		nat  NAT
		want bool
	}{
		{NATAuto, NAT{}, false},
		{NATAuto, NAT{Behind: true}, true},
		{NATAuto, NAT{PeerBehind: true}, true},
		{NATForce, NAT{}, true},
		{NATOff, NAT{Behind: true, PeerBehind: true}, false},
	} {
		if got := (PeerSpec{NATTraversal: c.mode, NAT: c.nat}).Encapsulate(); got != c.want {
			t.Errorf("%s with %+v: encapsulate %v, want %v", c.mode, c.nat, got, c.want)
		}
	}
}
