package backend

import (
	"context"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/pspd/pspd/internal/nstest"
	"github.com/pspd/pspd/offload"
	"github.com/pspd/pspd/xfrm"
)

func TestPolicies(t *testing.T) {
	local, remote := netip.MustParseAddr("10.1.0.1"), netip.MustParseAddr("10.1.0.2")
	const reqid = 0x50530007
	self := netip.MustParsePrefix("10.1.0.2/32")
	sub := netip.MustParsePrefix("10.9.0.0/16")
	v6 := netip.MustParsePrefix("fd00:9::/64")
	for _, tc := range []struct {
		name     string
		prefixes []netip.Prefix
		mode     xfrm.Mode
		want     []string
	}{
		{"host", []netip.Prefix{self}, xfrm.Transport, []string{
			"out 10.1.0.1/32->10.1.0.2/32 transport", "in 10.1.0.2/32->10.1.0.1/32 transport"}},
		{"subnet", []netip.Prefix{sub}, xfrm.Tunnel, []string{
			"out 0.0.0.0/0->10.9.0.0/16 tunnel", "in 10.9.0.0/16->0.0.0.0/0 tunnel", "fwd 10.9.0.0/16->0.0.0.0/0 tunnel"}},
		// The peer's own address among subnets is carried in the same
		// tunnel-mode SAs: one SA pair per peer.
		{"host and subnets", []netip.Prefix{self, sub, v6}, xfrm.Tunnel, []string{
			"out 0.0.0.0/0->10.1.0.2/32 tunnel", "in 10.1.0.2/32->0.0.0.0/0 tunnel", "fwd 10.1.0.2/32->0.0.0.0/0 tunnel",
			"out 0.0.0.0/0->10.9.0.0/16 tunnel", "in 10.9.0.0/16->0.0.0.0/0 tunnel", "fwd 10.9.0.0/16->0.0.0.0/0 tunnel",
			"out ::/0->fd00:9::/64 tunnel", "in fd00:9::/64->::/0 tunnel", "fwd fd00:9::/64->::/0 tunnel"}},
		{"unmasked prefix", []netip.Prefix{netip.MustParsePrefix("10.9.1.1/16")}, xfrm.Tunnel, []string{
			"out 0.0.0.0/0->10.9.0.0/16 tunnel", "in 10.9.0.0/16->0.0.0.0/0 tunnel", "fwd 10.9.0.0/16->0.0.0.0/0 tunnel"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mode, pols := policies(offload.PeerSpec{Name: "b", Prefixes: tc.prefixes}, local, remote, reqid)
			if mode != tc.mode {
				t.Errorf("mode %v, want %v", mode, tc.mode)
			}
			var got []string
			for _, p := range pols {
				got = append(got, p.Dir.String()+" "+p.Src.String()+"->"+p.Dst.String()+" "+p.Mode.String())
				if p.ReqID != reqid {
					t.Errorf("policy %v has reqid %#x", &p, p.ReqID)
				}
				out := p.Dir == xfrm.Out
				if (out && (p.TmplSrc != local || p.TmplDst != remote)) || (!out && (p.TmplSrc != remote || p.TmplDst != local)) {
					t.Errorf("policy %v: template %v->%v", &p, p.TmplSrc, p.TmplDst)
				}
			}
			if strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
				t.Errorf("policies:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}

// TestProbeRefusesDualStackWithIPv4Peers: a socket policy matches one
// family, so [::] with an IPv4 peer would leave the control traffic under
// the peer's IPsec policy.
func TestProbeRefusesDualStackWithIPv4Peers(t *testing.T) {
	peers := []offload.PeerSpec{{Name: "b", Endpoint: netip.MustParseAddrPort("192.0.2.2:6082")}}
	err := Probe(context.Background(), netip.MustParseAddrPort("[::]:6082"), peers, 0)
	if err == nil || !strings.Contains(err.Error(), "set listen to 0.0.0.0:6082") {
		t.Fatalf("Probe = %v, want the dual-stack refusal naming the fix", err)
	}
}

// TestProbeKernel checks the probe against the kernel: inside the test VM
// (ESP and GCM built in) it must succeed; on a kernel without them it must
// say what is missing.
func TestProbeKernel(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_NET_ADMIN) to add the probe SA")
	}
	err := Probe(context.Background(), netip.MustParseAddrPort("0.0.0.0:6082"), nil, nstest.New(t, "pxb"))
	if os.Getenv("PSPD_IN_VM") == "1" {
		if err != nil {
			t.Fatalf("Probe in the test VM: %v", err)
		}
		return
	}
	if err == nil {
		t.Log("this kernel runs ESP GCM SAs; the xfrm backend is available")
		return
	}
	if !strings.Contains(err.Error(), "CONFIG_INET_ESP") {
		t.Errorf("Probe = %v, want the missing kernel options named", err)
	}
}
