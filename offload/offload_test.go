package offload

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/pspd/pspd/keyexchange/wire"
	"github.com/pspd/pspd/policy"
)

func TestChoose(t *testing.T) {
	report := Probe(context.Background(), []Prober{
		{wire.BackendPSP, func(context.Context) error {
			return errors.New("no generic netlink family psp (kernel built without CONFIG_INET_PSP)")
		}},
		{wire.BackendXFRM, func(context.Context) error { return errors.New("kernel lacks ESP rfc4106(gcm(aes))") }},
		{wire.BackendUserspace, func(context.Context) error { return nil }},
	})
	both := []wire.Backend{wire.BackendXFRM, wire.BackendUserspace}
	for _, tc := range []struct {
		want    policy.Backend
		peer    []wire.Backend
		got     wire.Backend
		errText string
	}{
		{policy.BackendAuto, nil, wire.BackendUserspace, ""},
		{policy.BackendAuto, both, wire.BackendUserspace, ""},
		{policy.BackendUserspace, both, wire.BackendUserspace, ""},
		{policy.BackendXFRM, both, 0, "backend xfrm was configured but this host cannot run it: kernel lacks ESP"},
		{policy.BackendPSP, nil, 0, "backend psp protects TCP connections that applications hand to pspd"},
		{policy.BackendUserspace, []wire.Backend{wire.BackendXFRM}, 0, "the peer does not offer it (it offers xfrm)"},
		{policy.BackendAuto, []wire.Backend{wire.BackendXFRM}, 0, "no common backend: this host offers userspace, the peer offers xfrm"},
	} {
		b, err := Choose(tc.want, report, tc.peer)
		if tc.errText != "" {
			if err == nil || !strings.Contains(err.Error(), tc.errText) {
				t.Errorf("Choose(%s, %v) = %v, %v; want error containing %q", tc.want, tc.peer, b, err, tc.errText)
			}
			continue
		}
		if err != nil || b != tc.got {
			t.Errorf("Choose(%s, %v) = %v, %v; want %v", tc.want, tc.peer, b, err, tc.got)
		}
	}
}
