package netns

import (
	"testing"
	"time"
)

// TestNATKeepalive, per backend: the NAT forgets an idle UDP mapping
// after 3 s (conntrack timeouts), and a, behind it, sends nothing for
// 8 s. With nat_keepalive: 1s its keep-alives (the userspace engine's
// empty authenticated packets, the kernel's for xfrm) hold the mapping
// of its data path, so b's first packets after the pause reach a at
// once; without them they would be dropped at the NAT until a sent
// something.
func TestNATKeepalive(t *testing.T) { perBackend(t, testNATKeepalive) }

func testNATKeepalive(t *testing.T, backend string) {
	nl := newNATLab(t, backend, true, "nat_keepalive: 1s\n")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	ctx := nl.ctx
	for _, k := range []string{"nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"} {
		must(nl.n.Run(ctx, "sysctl", "-qw", "net.netfilter."+k+"=3"))
	}
	ea, err := listenIn(nl.a, "udp4", nl.inner[0]+":7790")
	must(err)
	t.Cleanup(func() { ea.Close() })
	go echo(ea)
	probe := func(what string) {
		t.Helper()
		pb, err := newProber(nl.b, nl.inner[0]+":7790")
		must(err)
		defer pb.close()
		if _, err := pb.waitReply(time.Now(), 2*time.Second); err != nil {
			t.Fatalf("%s, b → a: %v\n%s\n%s", what, err, nl.da.Tail(20), nl.db.Tail(20))
		}
	}
	probe("before the pause")
	// The mapping was created and used; the conntrack entries now time
	// out 3 s after their last packet.
	time.Sleep(8 * time.Second)
	probe("after 8 s of silence from a (the NAT forgets after 3 s)")
}
