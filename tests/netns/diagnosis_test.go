package netns

import (
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pspd/pspd/localapi"
)

// TestWrongPinDiagnosed: b pins a key for a that is not a's. Within 2 s
// both sides' pspctl peer show and a WARN line name the cause with the
// fingerprints involved; once b pins the right key, the association comes
// up and the cause is gone.
func TestWrongPinDiagnosed(t *testing.T) {
	hostOnly(t)
	ctx, p, _ := upPair(t, "pnw-", "userspace", 2*time.Minute, nil)
	out, err := exec.CommandContext(ctx, p.A.Host.lab.Pspd, "genkey", "--force", "--identity", filepath.Join(p.B.Dir, "stranger.pem")).Output()
	if err != nil {
		t.Fatal(err)
	}
	stranger := strings.TrimSpace(string(out))
	p.B.Stop()
	if err := p.B.EditConfig(func(s string) string { return strings.Replace(s, p.A.PubKey, stranger, 1) }); err != nil {
		t.Fatal(err)
	}
	p.A.Stop() // a fresh a: its session with the old b must not linger
	start := time.Now()
	for _, d := range []*Daemon{p.A, p.B} {
		if err := d.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	fpA := fingerprint(t, ctx, p.A)
	for _, d := range []*Daemon{p.A, p.B} {
		var show localapi.Peer
		for {
			show = peerShow(t, ctx, d)
			if show.State != "up" && strings.Contains(show.Cause, "pin") && strings.Contains(show.Cause, fpA) {
				break
			}
			if time.Since(start) > 2*time.Second {
				t.Fatalf("%s: %v after the start, peer show says state %q cause %q; want the wrong pin named with %s", d.Host.Name, time.Since(start), show.State, show.Cause, fpA)
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Logf("%s after %v: %s: %s", d.Host.Name, time.Since(start), show.State, show.Cause)
		warned := false
		for _, line := range strings.Split(d.Tail(200), "\n") {
			if strings.Contains(line, "level=WARN") && strings.Contains(line, fpA) {
				warned = true
			}
		}
		if !warned {
			t.Errorf("%s logged no WARN naming %s:\n%s", d.Host.Name, fpA, d.Tail(20))
		}
		text, err := d.Ctl(ctx, "peer", "show", show.Name)
		if err != nil || !strings.Contains(text, fpA) {
			t.Errorf("%s: pspctl peer show: %q %v", d.Host.Name, text, err)
		}
	}

	// The right pin: the association comes up and the cause goes.
	if err := p.B.EditConfig(func(s string) string { return strings.Replace(s, stranger, p.A.PubKey, 1) }); err != nil {
		t.Fatal(err)
	}
	if line, err := p.B.Reload(ctx, "configuration reloaded", "reload failed"); err != nil || !strings.Contains(line, "configuration reloaded") {
		t.Fatalf("reload with the right pin: %q %v", line, err)
	}
	if _, err := p.WaitAssoc(ctx, 1); err != nil {
		t.Fatal(err)
	}
	for _, d := range []*Daemon{p.A, p.B} {
		if show := peerShow(t, ctx, d); show.State != "up" || show.Cause != "" {
			t.Errorf("%s after the fix: state %q cause %q", d.Host.Name, show.State, show.Cause)
		}
	}
}

func peerShow(t *testing.T, ctx context.Context, d *Daemon) localapi.Peer {
	t.Helper()
	out, err := d.Ctl(ctx, "peer", "list", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var ps []localapi.Peer
	if err := json.Unmarshal([]byte(out), &ps); err != nil || len(ps) != 1 {
		t.Fatalf("peer list %q: %v", out, err)
	}
	return ps[0]
}

func fingerprint(t *testing.T, ctx context.Context, d *Daemon) string {
	t.Helper()
	out, err := d.Ctl(ctx, "status", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var st localapi.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatal(err)
	}
	return st.Fingerprint
}
