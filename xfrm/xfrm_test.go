package xfrm

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pspd/pspd/internal/nstest"
	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/kdf"
	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// newNS creates a network namespace named pxf<random> for one test.
func newNS(t testing.TB) int { return nstest.New(t, "pxf") }

func openNS(t testing.TB, nsFD int, cfg Config) *Handle {
	t.Helper()
	cfg.NetNS = nsFD
	h, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

func randKey(t testing.TB, s kdf.Suite) secret.Key {
	b := make([]byte, s.KeyLen())
	rand.Read(b)
	return secret.Own(b)
}

var (
	addrA  = netip.MustParseAddr("10.77.0.1")
	addrB  = netip.MustParseAddr("10.77.0.2")
	addrA6 = netip.MustParseAddr("fd77::1")
	addrB6 = netip.MustParseAddr("fd77::2")
)

const testReqID = 0x50530001

func TestReserveSPI(t *testing.T) {
	h := openNS(t, newNS(t), Config{})
	ctx := context.Background()
	for _, pair := range [][2]netip.Addr{{addrB, addrA}, {addrB6, addrA6}} {
		spi, err := h.ReserveSPI(ctx, pair[0], pair[1], testReqID, Transport, 0x4000_0123, 0x4000_0123)
		if err != nil {
			t.Fatal(err)
		}
		if spi != 0x4000_0123 {
			t.Fatalf("reserved spi %#x, asked for exactly 0x40000123", spi)
		}
		st, err := h.GetSA(ctx, ID{Dst: pair[1], SPI: spi})
		if err != nil {
			t.Fatal(err)
		}
		if !st.Larval || st.ReqID != testReqID || st.Src != pair[0] || st.Dst != pair[1] {
			t.Fatalf("reserved state = %+v, want larval, reqid %#x, %s->%s", st, testReqID, pair[0], pair[1])
		}
		if _, err := h.ReserveSPI(ctx, pair[0], pair[1], testReqID, Transport, spi, spi); err == nil {
			t.Fatal("second reservation of the same SPI succeeded")
		}
		// A range lets the kernel choose a free SPI in it.
		spi2, err := h.ReserveSPI(ctx, pair[0], pair[1], testReqID, Transport, 0x1000, 0x1fff)
		if err != nil || spi2 < 0x1000 || spi2 > 0x1fff {
			t.Fatalf("range reservation = %#x, %v", spi2, err)
		}
		if err := h.DeleteSA(ctx, ID{Dst: pair[1], SPI: spi}); err != nil {
			t.Fatal(err)
		}
		if _, err := h.GetSA(ctx, ID{Dst: pair[1], SPI: spi}); !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
			t.Fatalf("after delete: %v, want not found", err)
		}
	}
	if _, err := h.ReserveSPI(ctx, addrB, addrA, 7, Transport, 0x1000, 0x1fff); err == nil || !strings.Contains(err.Error(), "reqid") {
		t.Fatalf("reqid outside the owner range: %v, want an error naming reqid", err)
	}
}

func testPolicies() []Policy {
	host := func(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }
	return []Policy{
		{Src: host(addrA), Dst: host(addrB), Dir: Out, TmplSrc: addrA, TmplDst: addrB, Mode: Transport, ReqID: testReqID},
		{Src: host(addrB), Dst: host(addrA), Dir: In, TmplSrc: addrB, TmplDst: addrA, Mode: Transport, ReqID: testReqID},
		{Src: netip.MustParsePrefix("fd78::/64"), Dst: netip.MustParsePrefix("fd79::/64"), Dir: Out, TmplSrc: addrA6, TmplDst: addrB6, Mode: Tunnel, ReqID: testReqID + 1},
		{Src: netip.MustParsePrefix("fd79::/64"), Dst: netip.MustParsePrefix("fd78::/64"), Dir: Fwd, TmplSrc: addrB6, TmplDst: addrA6, Mode: Tunnel, ReqID: testReqID + 1},
		{Src: netip.MustParsePrefix("fd79::/64"), Dst: netip.MustParsePrefix("fd78::/64"), Dir: In, TmplSrc: addrB6, TmplDst: addrA6, Mode: Tunnel, ReqID: testReqID + 1},
		// Neighbour discovery let through ahead of a transport-mode peer's
		// protection: pspd's by its mark, without a template.
		{Src: host(addrA6), Dst: host(addrB6), Proto: unix.IPPROTO_ICMPV6, ICMPType: 135, Dir: Out, Bypass: true, Priority: 1},
		{Src: host(addrB6), Dst: host(addrA6), Proto: unix.IPPROTO_ICMPV6, ICMPType: 136, Dir: In, Bypass: true, Priority: 1},
	}
}

func TestPolicies(t *testing.T) {
	h := openNS(t, newNS(t), Config{})
	ctx := context.Background()
	want := testPolicies()
	for i := range want {
		if err := h.AddPolicy(ctx, &want[i]); err != nil {
			t.Fatal(err)
		}
	}
	got, err := h.ListPolicies(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("listed %d policies, want %d: %v", len(got), len(want), got)
	}
	for _, w := range want {
		found := false
		for _, g := range got {
			found = found || g == w
		}
		if !found {
			t.Errorf("policy %s not listed back as installed; got %v", &w, got)
		}
	}
	for i := range want {
		if err := h.DeletePolicy(ctx, &want[i]); err != nil {
			t.Fatal(err)
		}
	}
	if got, _ := h.ListPolicies(ctx); len(got) != 0 {
		t.Fatalf("policies left after delete: %v", got)
	}
	bad := want[0]
	bad.ReqID = 5
	if err := h.AddPolicy(ctx, &bad); err == nil || !strings.Contains(err.Error(), "reqid") {
		t.Fatalf("foreign reqid: %v, want an error naming reqid", err)
	}
}

// TestReconcileLeavesForeignState installs a foreign policy and a foreign
// larval SA (no pspd mark, reqid outside pspd's range) next to stale pspd
// state and checks that reconcile removes only pspd's stale objects.
func TestReconcileLeavesForeignState(t *testing.T) {
	nsFD := newNS(t)
	h := openNS(t, nsFD, Config{})
	ctx := context.Background()

	foreign, err := vnl.NewHandleAt(netns.NsHandle(nsFD), unix.NETLINK_XFRM)
	if err != nil {
		t.Fatal(err)
	}
	defer foreign.Close()
	fpol := &vnl.XfrmPolicy{
		Src: ipnet(netip.MustParsePrefix(addrA.String() + "/32")), Dst: ipnet(netip.MustParsePrefix(addrB.String() + "/32")),
		Dir: vnl.XFRM_DIR_OUT, Tmpls: []vnl.XfrmPolicyTmpl{{Src: addrA.AsSlice(), Dst: addrB.AsSlice(), Proto: vnl.XFRM_PROTO_ESP, Mode: vnl.XFRM_MODE_TRANSPORT, Reqid: 7}},
	}
	if err := foreign.XfrmPolicyAdd(fpol); err != nil {
		t.Fatal(err)
	}
	// Another daemon's reservation: reqid 7 and its own mark bits.
	other := openNS(t, nsFD, Config{Owner: Owner{ReqIDMin: 7, ReqIDMax: 7, Mark: 0, MarkMask: 1}})
	fspi, err := other.ReserveSPI(ctx, addrB, addrA, 7, Transport, 0x3000, 0x3000)
	if err != nil {
		t.Fatal(err)
	}

	pols := testPolicies()
	for i := range pols {
		if err := h.AddPolicy(ctx, &pols[i]); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := h.ReserveSPI(ctx, addrB, addrA, testReqID, Transport, 0x2000, 0x2000); err != nil {
		t.Fatal(err)
	}

	// A restarted owner wants only the first two policies and no SA.
	h2 := openNS(t, nsFD, Config{})
	changed := pols[1]
	changed.Priority = 50
	res, err := h2.Reconcile(ctx, nil, []Policy{pols[0], changed})
	if err != nil {
		t.Fatal(err)
	}
	want := ReconcileResult{RemovedSAs: 1, KeptPolicies: 1, AddedPolicies: 1, RemovedPolicies: len(pols) - 2} // the bypasses too, pspd's by their mark
	if res != want {
		t.Errorf("reconcile = %+v, want %+v", res, want)
	}
	got, _ := h2.ListPolicies(ctx)
	if len(got) != 2 {
		t.Errorf("pspd policies after reconcile: %v, want 2", got)
	}
	if sas, _ := h2.ListSAs(ctx); len(sas) != 0 {
		t.Errorf("pspd SAs after reconcile: %v, want none", sas)
	}

	all, err := foreign.XfrmPolicyList(unix.AF_UNSPEC)
	if err != nil {
		t.Fatal(err)
	}
	var sawForeign bool
	for _, p := range all {
		sawForeign = sawForeign || (p.Mark == nil && len(p.Tmpls) == 1 && p.Tmpls[0].Reqid == 7)
	}
	if !sawForeign {
		t.Error("reconcile removed the foreign policy")
	}
	if _, err := other.GetSA(ctx, ID{Dst: addrA, SPI: fspi}); err != nil {
		t.Errorf("foreign reserved SA spi=%#x gone after reconcile: %v", fspi, err)
	}
	// Deleting a foreign SA through pspd's handle is refused.
	if err := h2.DeleteSA(ctx, ID{Dst: addrA, SPI: fspi}); err == nil {
		t.Error("DeleteSA removed a foreign SA")
	}
}

func testSA(t testing.TB, suite kdf.Suite) SA {
	return SA{Src: addrA, Dst: addrB, SPI: 0x40000042, ReqID: testReqID, Dir: Out, Mode: Transport, Suite: suite, Key: randKey(t, suite)}
}

func TestValidation(t *testing.T) {
	h := &Handle{owner: DefaultOwner()}
	for _, tc := range []struct {
		name, want string
		mod        func(*SA)
	}{
		{"short key", "needs 16", func(s *SA) { s.Key = secret.New(make([]byte, 15)) }},
		{"low spi", "reserved", func(s *SA) { s.SPI = 255 }},
		{"reqid", "reqid", func(s *SA) { s.ReqID = 1 }},
		{"families", "families", func(s *SA) { s.Dst = addrB6 }},
		{"dir", "in or out", func(s *SA) { s.Dir = Fwd }},
		{"lifetime", "soft packets", func(s *SA) { s.Lifetime = Lifetime{SoftPackets: 10, HardPackets: 5} }},
		{"no dst", "required", func(s *SA) { s.Dst = netip.Addr{} }},
	} {
		s := testSA(t, kdf.AESGCM128)
		tc.mod(&s)
		if err := h.validateSA(&s); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want error containing %q", tc.name, err, tc.want)
		}
	}
	if _, err := Open(Config{Owner: Owner{ReqIDMin: 0, ReqIDMax: 10, MarkMask: 1}}); err == nil {
		t.Error("Open accepted an owner range that includes reqid 0")
	}
	if _, err := Open(Config{Owner: Owner{ReqIDMin: 1, ReqIDMax: 10}}); err == nil {
		t.Error("Open accepted an owner without mark bits")
	}
}

func TestSalt(t *testing.T) {
	k := secret.New(bytes.Repeat([]byte{7}, 16))
	s1, err := KeySalt(k, 0x100)
	if err != nil {
		t.Fatal(err)
	}
	s1b, _ := KeySalt(secret.New(bytes.Repeat([]byte{7}, 16)), 0x100)
	s2, _ := KeySalt(k, 0x101)
	s3, _ := KeySalt(secret.New(bytes.Repeat([]byte{8}, 16)), 0x100)
	if s1 != s1b {
		t.Error("salt is not deterministic")
	}
	if s1 == s2 || s1 == s3 {
		t.Error("salt does not depend on both SPI and key")
	}
	if _, err := KeySalt(secret.New(make([]byte, 5)), 1); err == nil {
		t.Error("salt accepted a 5-byte key")
	}
}

// skipWithoutESP skips when the kernel cannot hold an ESP GCM SA, as on
// the development host (no CONFIG_INET_ESP, no CONFIG_CRYPTO_GCM).
func skipWithoutESP(t testing.TB, err error) {
	t.Helper()
	var ke *kernelError
	if errors.As(err, &ke) && (ke.errno == unix.ENOENT || ke.errno == unix.ENOSYS || ke.errno == unix.EPROTONOSUPPORT) {
		t.Skipf("kernel lacks ESP rfc4106(gcm(aes)): run make vmtest (%v)", err)
	}
}

// TestAddSAReadBack installs SAs of both suites and families and reads
// them back: ESN on, a replay window of 1024, the AEAD and ICV pspd asked
// for, the lifetimes, and no key byte in any listing or log.
func TestAddSAReadBack(t *testing.T) {
	var logs bytes.Buffer
	h := openNS(t, newNS(t), Config{Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	ctx := context.Background()
	var keys [][]byte
	for i, tc := range []struct {
		suite    kdf.Suite
		src, dst netip.Addr
		dir      Dir
	}{
		{kdf.AESGCM128, addrA, addrB, Out}, {kdf.AESGCM256, addrB, addrA, In},
		{kdf.AESGCM128, addrA6, addrB6, Out}, {kdf.AESGCM256, addrB6, addrA6, In},
	} {
		s := SA{Src: tc.src, Dst: tc.dst, SPI: 0x40000100 + uint32(i), ReqID: testReqID, Dir: tc.dir, Mode: Transport, Suite: tc.suite,
			Key: randKey(t, tc.suite), Lifetime: Lifetime{SoftBytes: 1 << 30, HardBytes: 1 << 31, SoftPackets: 1 << 20, HardPackets: 1 << 21, Soft: 3000e9, Hard: 3600e9},
			OffloadDev: "lo"}
		keys = append(keys, bytes.Clone(s.Key.Bytes()))
		off, err := h.AddSA(ctx, &s)
		if err != nil {
			skipWithoutESP(t, err)
			t.Fatal(err)
		}
		if off {
			t.Error("lo reported as offloading ESP")
		}
		st, err := h.GetSA(ctx, s.ID())
		if err != nil {
			t.Fatal(err)
		}
		if !st.ESN || st.ReplayWindow != ReplayWindow || st.AEAD != aeadName || st.ICVBits != 128 ||
			int(st.KeyBits) != (tc.suite.KeyLen()+SaltLen)*8 || st.Larval || st.Lifetime != s.Lifetime {
			t.Errorf("SA %d read back as %+v", i, st)
		}
		s2 := s
		s2.Key = randKey(t, tc.suite)
		if _, err := h.AddSA(ctx, &s2); err == nil || !strings.Contains(err.Error(), "new SPI") {
			t.Errorf("re-adding spi %#x with a new key: %v, want refusal asking for a new SPI", s.SPI, err)
		}
	}
	// The reserved-then-filled path: ALLOCSPI, then AddSA replaces the larval state.
	spi, err := h.ReserveSPI(ctx, addrB, addrA, testReqID, Transport, 0x40000200, 0x40000200)
	if err != nil {
		t.Fatal(err)
	}
	in := SA{Src: addrB, Dst: addrA, SPI: spi, ReqID: testReqID, Dir: In, Mode: Transport, Suite: kdf.AESGCM128, Key: randKey(t, kdf.AESGCM128)}
	keys = append(keys, bytes.Clone(in.Key.Bytes()))
	if _, err := h.AddSA(ctx, &in); err != nil {
		t.Fatal(err)
	}
	if st, err := h.GetSA(ctx, in.ID()); err != nil || st.Larval || st.ReplayWindow != ReplayWindow {
		t.Fatalf("reserved SA after AddSA: %+v, %v", st, err)
	}

	list, err := h.ListSAs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 5 {
		t.Errorf("listed %d SAs, want 5", len(list))
	}
	out := fmt.Sprintf("%v %+v %#v %s", list, list, list, logs.String())
	for _, k := range keys {
		for _, enc := range []string{string(k), hex.EncodeToString(k), fmt.Sprint(k)} {
			if strings.Contains(out, enc) {
				t.Fatal("a key appears in a listing or log")
			}
		}
	}
}

// TestNewSAMsgWipedAfterSend: the NEWSA payload carries the key and the
// salt; it is built at its final size (append never leaves a stale copy
// behind) and wiped once sent, whether the kernel takes it or not.
func TestNewSAMsgWipedAfterSend(t *testing.T) {
	h := openNS(t, newNS(t), Config{})
	// The largest message: IPv6, the longest key, an offload request.
	s := SA{Src: addrA6, Dst: addrB6, SPI: 0x40000100, ReqID: testReqID, Dir: In, Mode: Tunnel, Suite: kdf.AESGCM256,
		Key: randKey(t, kdf.AESGCM256)}
	salt, err := KeySalt(s.Key, s.SPI)
	if err != nil {
		t.Fatal(err)
	}
	msg := h.newSAMsg(&s, &offloadReq{ifindex: 1}, true)
	if !bytes.Contains(msg, append(bytes.Clone(s.Key.Bytes()), salt[:]...)) {
		t.Fatal("the message does not carry the key and salt: the test looks in the wrong place")
	}
	if c := cap(msg); c != newSAMsgCap {
		t.Errorf("the message grew to %d bytes from %d: append left an unwiped copy of the key", c, newSAMsgCap)
	}
	err = h.sa.do(nl.XFRM_MSG_NEWSA, 0, msg, nil)
	t.Logf("kernel: %v", err)
	for _, c := range msg[:cap(msg)] {
		if c != 0 {
			t.Fatal("the sent message was not wiped")
		}
	}
}

// TestNewSAMsgCarriesSalt: an SA's own salt (the key schedule's) goes to
// the kernel, not the one derived from its key.
func TestNewSAMsgCarriesSalt(t *testing.T) {
	h := openNS(t, newNS(t), Config{})
	s := SA{Src: addrA6, Dst: addrB6, SPI: 0x40000100, ReqID: testReqID, Dir: In, Mode: Tunnel, Suite: kdf.AESGCM128,
		Key: randKey(t, kdf.AESGCM128), Salt: [SaltLen]byte{1, 2, 3, 4}}
	derived, err := KeySalt(s.Key, s.SPI)
	if err != nil {
		t.Fatal(err)
	}
	msg := h.newSAMsg(&s, nil, true)
	if !bytes.Contains(msg, append(bytes.Clone(s.Key.Bytes()), s.Salt[:]...)) {
		t.Fatal("the message does not carry the SA's salt after its key")
	}
	if bytes.Contains(msg, append(bytes.Clone(s.Key.Bytes()), derived[:]...)) {
		t.Fatal("the message carries the salt derived from the key")
	}
}

// TestNewSAMsgEncap: an SA with UDP encapsulation carries XFRMA_ENCAP with
// ESP-in-UDP, its ports in network order and the original address, and
// parseSA reads them back; one without carries none.
func TestNewSAMsgEncap(t *testing.T) {
	h := openNS(t, newNS(t), Config{})
	s := SA{Src: addrA6, Dst: addrB6, SPI: 0x40000100, ReqID: testReqID, Dir: Out, Mode: Tunnel, Suite: kdf.AESGCM128,
		Key: randKey(t, kdf.AESGCM128), Salt: [SaltLen]byte{1, 2, 3, 4},
		Encap: &Encap{SrcPort: 4500, DstPort: 1024, OrigAddr: addrA6}}
	msg := h.newSAMsg(&s, nil, true)
	st, _, err := parseSA(msg)
	if err != nil {
		t.Fatal(err)
	}
	if st.Encap == nil || *st.Encap != *s.Encap {
		t.Fatalf("encap read back as %+v, want %+v", st.Encap, s.Encap)
	}
	if !bytes.Contains(msg, []byte{encapESPInUDP, 0, 0x11, 0x94, 0x04, 0x00}) {
		t.Fatal("no ESP-in-UDP template with ports 4500 -> 1024 in network order")
	}
	s.Encap = nil
	if st, _, _ := parseSA(h.newSAMsg(&s, nil, true)); st.Encap != nil {
		t.Fatalf("plain ESP SA carries encap %+v", st.Encap)
	}
	s.Encap = &Encap{SrcPort: 4500}
	if err := h.validateSA(&s); err == nil {
		t.Fatal("an encapsulation without a destination port was accepted")
	}

	// NAT keep-alives: only on an outbound encapsulated SA, which then
	// says it is outbound and carries no replay window.
	s.Encap, s.NATKeepalive = &Encap{SrcPort: 4500, DstPort: 4500}, 20*time.Second
	if err := h.validateSA(&s); err != nil {
		t.Fatalf("outbound SA with keep-alives refused: %v", err)
	}
	st, _, err = parseSA(h.newSAMsg(&s, nil, true))
	if err != nil || st.NATKeepalive != 20*time.Second || st.ReplayWindow != 0 {
		t.Fatalf("keep-alive read back as %v, replay window %d (%v); want 20s and 0", st.NATKeepalive, st.ReplayWindow, err)
	}
	in := s
	in.Dir = In
	if err := h.validateSA(&in); err == nil {
		t.Fatal("keep-alives on an inbound SA were accepted")
	}
	s.Encap = nil
	if err := h.validateSA(&s); err == nil {
		t.Fatal("keep-alives on plain ESP were accepted")
	}
}

// TestParseSAUseTimes: curlft.use_time is when the SA first carried a
// packet and XFRMA_LASTUSED when it last did; the kernel sets the first
// once and the second on every packet, so they must not be confused.
func TestParseSAUseTimes(t *testing.T) {
	h := openNS(t, newNS(t), Config{})
	s := SA{Src: addrA6, Dst: addrB6, SPI: 0x40000100, ReqID: testReqID, Dir: Out, Mode: Tunnel, Suite: kdf.AESGCM128,
		Key: randKey(t, kdf.AESGCM128), Salt: [SaltLen]byte{1, 2, 3, 4}}
	msg := h.newSAMsg(&s, nil, true)
	var info nl.XfrmUsersaInfo
	copy(structBytes(&info), msg)
	info.Curlft.UseTime = 1_700_000_000
	copy(msg, structBytes(&info))
	msg = appendAttr(msg, nl.XFRMA_LASTUSED, binary.NativeEndian.AppendUint64(nil, 1_700_000_042))
	st, _, err := parseSA(msg)
	if err != nil {
		t.Fatal(err)
	}
	if got := st.Stats.FirstUsed.Unix(); got != 1_700_000_000 {
		t.Errorf("FirstUsed %d, want the use_time 1700000000", got)
	}
	if got := st.Stats.LastUsed.Unix(); got != 1_700_000_042 {
		t.Errorf("LastUsed %d, want XFRMA_LASTUSED 1700000042", got)
	}
}
