package netns

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	MaybeHelper()
	os.Exit(m.Run())
}

func moduleRoot(t *testing.T) string {
	wd, _ := os.Getwd()
	return filepath.Join(wd, "..", "..")
}

func newLab(t *testing.T, prefix string) *Lab {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	l, err := NewLab(ctx, prefix, moduleRoot(t), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Close)
	return l
}

// TestDemo is `make demo` as a test: two real daemons, the userspace
// backend, a TCP exchange through the tunnel, and a capture of the
// underlay that never shows the plaintext.
func TestDemo(t *testing.T) {
	l := newLab(t, "pnd-")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	p, err := l.TwoHosts(ctx, "userspace")
	if err != nil {
		t.Fatal(err)
	}
	as, err := p.WaitAssoc(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("association up %v after start: %+v", time.Since(start), as[0])

	const canary = "pspd-test-canary-"
	stop, err := Capture(ctx, p.A.Host, p.Underlay[0])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := EchoTCP(ctx, p.A.Host, p.B.Host, p.Inner[1], 256<<10, canary); err != nil {
		t.Fatal(err)
	}
	pcap, err := stop()
	if err != nil {
		t.Fatal(err)
	}
	if len(pcap) < 256<<10 {
		t.Fatalf("capture holds %d bytes: the traffic did not cross the underlay", len(pcap))
	}
	if bytes.Contains(pcap, []byte(canary)) {
		t.Fatal("plaintext canary on the underlay")
	}

	out, err := p.A.Ctl(ctx, "assoc", "list")
	if err != nil || !strings.Contains(out, "b/1") || !strings.Contains(out, "userspace") {
		t.Fatalf("assoc list: %q %v", out, err)
	}
	// Rotation from pspctl: new SPIs, traffic still flows.
	if out, err := p.B.Ctl(ctx, "assoc", "rotate", "--all"); err != nil || !strings.Contains(out, " ok") {
		t.Fatalf("rotate: %q %v", out, err)
	}
	if _, err := p.WaitAssoc(ctx, as[0].Generation+1); err != nil {
		t.Fatal(err)
	}
	if _, err := EchoTCP(ctx, p.A.Host, p.B.Host, p.Inner[1], 64<<10, canary); err != nil {
		t.Fatalf("after rotation: %v", err)
	}
}
