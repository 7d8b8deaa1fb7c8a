package backend

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"net/netip"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/internal/nstest"
	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/identity"
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

// TestPoliciesIPv6TransportND: an IPv6 transport-mode peer's policies
// cover every packet between the two addresses, so neighbour discovery
// between them is let through ahead of them, or the hosts could never
// resolve each other (TestDualStack/xfrm in the VM).
func TestPoliciesIPv6TransportND(t *testing.T) {
	local, remote := netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("2001:db8::2")
	_, pols := policies(offload.PeerSpec{Name: "b", Prefixes: []netip.Prefix{netip.PrefixFrom(remote, 128)}}, local, remote, 0x50530007)
	var got []string
	for _, p := range pols {
		got = append(got, fmt.Sprintf("%v prio %d", &p, p.Priority))
	}
	want := []string{
		"out 2001:db8::1/128->2001:db8::2/128 via 2001:db8::1->2001:db8::2 transport reqid=0x50530007 prio 2",
		"in 2001:db8::2/128->2001:db8::1/128 via 2001:db8::2->2001:db8::1 transport reqid=0x50530007 prio 2",
	}
	for typ := 133; typ <= 137; typ++ {
		want = append(want,
			fmt.Sprintf("out 2001:db8::1/128->2001:db8::2/128 proto 58 type %d bypass prio 1", typ),
			fmt.Sprintf("in 2001:db8::2/128->2001:db8::1/128 proto 58 type %d bypass prio 1", typ))
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("policies:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestProbeKernel checks the probe against the kernel: inside the test VM
// (ESP and GCM built in) it must succeed; on a kernel without them it must
// say what is missing.
func TestProbeKernel(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_NET_ADMIN) to add the probe SA")
	}
	err := Probe(context.Background(), nil, nstest.New(t, "pxb"))
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

// testBackend is a Backend on a real handle that was never bound to a
// namespace's state: peers given to it with reqid 1, outside pspd's
// range, make every SA fail the handle's own validation, so nothing ever
// reaches the kernel. It checks what the backend does before the kernel
// call.
func testBackend(t *testing.T) *Backend {
	t.Helper()
	h, err := xfrm.Open(xfrm.Config{})
	if err != nil {
		t.Skipf("no NETLINK_XFRM socket: %v", err)
	}
	t.Cleanup(func() { h.Close() })
	b, err := newBackend(h, nil, Config{})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func testPeer(t *testing.T, b *Backend) identity.PublicKey {
	t.Helper()
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	key := id.Public()
	b.peers[key] = &peer{cfg: offload.PeerSpec{Name: "b", Key: key, Endpoint: netip.MustParseAddrPort("10.1.0.2:6082")}, reqid: 1, local: netip.MustParseAddr("10.1.0.1"), remote: netip.MustParseAddr("10.1.0.2"),
		sas: map[saKey]*pair{}}
	return key
}

func randKey(t *testing.T, n int) secret.Key {
	k := make([]byte, n)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return secret.Own(k)
}

// TestInstallRefusesRepeatedTxPair: a transmit (SPI, key) pair the
// backend was given once is refused for that peer ever after, before the
// kernel sees it, even once the peer was removed and added again; the
// same SPI with another key, or the same key under another SPI, is not a
// repeat.
func TestInstallRefusesRepeatedTxPair(t *testing.T) {
	b := testBackend(t)
	peer := testPeer(t, b)
	ctx := context.Background()
	const kernel = "outside pspd's range" // the handle's refusal: the kernel path was taken
	txKey := randKey(t, 16)
	sa := func(gen uint32, rx, tx assoc.SPI, txKey secret.Key) *assoc.SA {
		return &assoc.SA{Peer: peer, ID: 1, Backend: assoc.BackendXFRM, Suite: assoc.AESGCM128, Generation: gen,
			RxSPI: rx, TxSPI: tx, RxKey: randKey(t, 16), TxKey: txKey, RxSalt: [4]byte{1}, TxSalt: [4]byte{2}}
	}
	if err := b.Install(ctx, sa(1, 0x100, 0x40000100, txKey.Clone())); err == nil || !strings.Contains(err.Error(), kernel) {
		t.Fatalf("first install: %v, want the handle's refusal", err)
	}
	for _, tc := range []struct {
		name   string
		sa     *assoc.SA
		reused bool
	}{
		{"same pair, next generation", sa(2, 0x101, 0x40000100, txKey.Clone()), true},
		{"same SPI, new key", sa(3, 0x102, 0x40000100, randKey(t, 16)), false},
		{"same key, new SPI", sa(4, 0x103, 0x40000101, txKey.Clone()), false},
	} {
		err := b.Install(ctx, tc.sa)
		if tc.reused && (err == nil || !strings.Contains(err.Error(), "installed before") || strings.Contains(err.Error(), kernel)) {
			t.Errorf("%s: %v, want a refusal before the kernel call", tc.name, err)
		}
		if !tc.reused && (err == nil || !strings.Contains(err.Error(), kernel)) {
			t.Errorf("%s: %v, want it to reach the kernel", tc.name, err)
		}
	}
	// The record outlives the peer.
	pr := b.peers[peer]
	if err := b.RemovePeer(ctx, peer); err != nil {
		t.Fatal(err)
	}
	b.peers[peer] = pr
	if err := b.Install(ctx, sa(5, 0x104, 0x40000100, txKey.Clone())); err == nil || !strings.Contains(err.Error(), "installed before") {
		t.Errorf("after RemovePeer and AddPeer: %v, want the repeat refused", err)
	}
	if ks := b.heldKeys(); len(ks) != 0 {
		t.Errorf("failed installs left %d keys in the backend", len(ks))
	}
}

// TestFingerprintHidesKey: the record is keyed per backend, so the same
// pair fingerprints differently in two processes, and it never holds the
// key.
func TestFingerprintHidesKey(t *testing.T) {
	b1, b2 := testBackend(t), testBackend(t)
	k := randKey(t, 32)
	f1, f2 := b1.fingerprint(0x40000100, k), b2.fingerprint(0x40000100, k)
	if f1 == f2 {
		t.Error("two backends fingerprint a pair alike: the fingerprint key is not per process")
	}
	if f1 != b1.fingerprint(0x40000100, k.Clone()) {
		t.Error("the fingerprint is not a function of the pair")
	}
	if bytes.Contains(f1[:], k.Bytes()[:8]) {
		t.Error("the fingerprint carries key bytes")
	}
}

// TestPeerWithoutPrefixesRefused: an XFRM peer with no prefixes would be
// up and protect nothing; AddPeer and UpdatePeer refuse it naming the
// field, before looking at routes (this backend has no route handle: a
// lookup would panic).
func TestPeerWithoutPrefixesRefused(t *testing.T) {
	b := testBackend(t)
	ctx := context.Background()
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	spec := offload.PeerSpec{Name: "b", Key: id.Public(), Endpoint: netip.MustParseAddrPort("192.0.2.2:6082")}
	if err := b.AddPeer(ctx, spec); err == nil || !strings.Contains(err.Error(), "prefixes") {
		t.Errorf("AddPeer without prefixes: %v, want a refusal naming prefixes", err)
	}
	if len(b.peers) != 0 {
		t.Error("the refused peer was added")
	}
	key := testPeer(t, b)
	before := *b.peers[key]
	spec.Key = key
	if err := b.UpdatePeer(ctx, spec); err == nil || !strings.Contains(err.Error(), "prefixes") {
		t.Errorf("UpdatePeer to no prefixes: %v, want a refusal naming prefixes", err)
	}
	if got := b.peers[key]; !reflect.DeepEqual(got.cfg, before.cfg) {
		t.Errorf("the refused update changed the peer: %+v", got.cfg)
	}
}

// TestInstallRefusesSAWithoutSalts: an SA without the key schedule's ESP
// salts is refused rather than installed under a salt derived from its
// key.
func TestInstallRefusesSAWithoutSalts(t *testing.T) {
	b := testBackend(t)
	peer := testPeer(t, b)
	sa := &assoc.SA{Peer: peer, ID: 1, Backend: assoc.BackendXFRM, Suite: assoc.AESGCM128, Generation: 1,
		RxSPI: 0x100, TxSPI: 0x40000100, RxKey: randKey(t, 16), TxKey: randKey(t, 16)}
	if err := b.Install(context.Background(), sa); err == nil || !strings.Contains(err.Error(), "no ESP salts") {
		t.Fatalf("Install = %v, want the missing salts refused", err)
	}
}
