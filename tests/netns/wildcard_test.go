package netns

import (
	"testing"
	"time"
)

// TestWildcardListen: both daemons listen on [::] and reach each other
// over IPv4. The xfrm backend runs in transport mode, where the peers'
// policies cover the hosts' own addresses and so pspd's control traffic
// too: only the control sockets' bypass keeps it out of ESP. A daemon
// killed and restarted finds no SAs on its side and the survivor's
// policies in place (require_encryption), so the association comes back
// only if the bypass covers the IPv4 control traffic of a socket bound
// to [::].
func TestWildcardListen(t *testing.T) { perBackend(t, testWildcardListen) }

func testWildcardListen(t *testing.T, backend string) {
	ctx, p, _ := upPair(t, "pwl-", backend, 2*time.Minute, func(l *Lab) {
		l.Wildcard = true
		l.Transport = backend == "xfrm"
	})
	const canary = "pspd-wildcard-canary-"
	check := func(when string) {
		t.Helper()
		stop, err := p.Capture(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := EchoTCP(ctx, p.A.Host, p.B.Host, p.Inner[1], 16<<10, canary); err != nil {
			t.Fatalf("%s: %v\n%s\n%s", when, err, p.A.Tail(20), p.B.Tail(20))
		}
		wire, _ := stop()
		if wire.Contains(canary) {
			t.Fatalf("%s: plaintext on the wire", when)
		}
		if backend == "userspace" {
			nothingInClear(t, wire, "udp/6081") // its encrypted frames
		} else {
			nothingInClear(t, wire)
		}
	}
	check("listening on [::]")
	p.A.Kill()
	restart := time.Now()
	if err := p.A.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := p.WaitAssoc(ctx, 1); err != nil {
		t.Fatalf("no association after a restart: %v\n%s\n%s", err, p.A.Tail(20), p.B.Tail(20))
	}
	t.Logf("%s with listen [::] over IPv4: association back %v after a kill -9 and restart", backend, time.Since(restart).Round(time.Millisecond))
	check("after the restart")
}
