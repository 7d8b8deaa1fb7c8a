package psp_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/internal/nstest"
	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/localapi/apitest"
)

// The preload library's side of the upgrade, on any kernel: the real
// local API server with a service that answers as told, an unmodified
// socat under the library. TestVMPreloadSocat runs it against real pspds
// on PSP devices.

// preloadService records the peer each upgrade names and answers err.
type preloadService struct {
	apitest.Service
	mu    sync.Mutex
	peers []string
	err   error
}

func (s *preloadService) UpgradePSP(_ context.Context, sock *os.File, peer string) (localapi.UpgradeResult, error) {
	defer sock.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.peers = append(s.peers, peer)
	if s.err != nil {
		return localapi.UpgradeResult{}, s.err
	}
	return localapi.UpgradeResult{Peer: "b", Version: "hdr0-aes-gcm-128"}, nil
}

func (s *preloadService) set(err error) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.peers
	s.peers, s.err = nil, err
	return p
}

// preloadLib is the library from the environment, or built with make.
func preloadLib(t *testing.T) string {
	t.Helper()
	if lib := os.Getenv("PSPD_PRELOAD_LIB"); lib != "" {
		return lib
	}
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("no make to build the preload library")
	}
	lib := filepath.Join(t.TempDir(), "libpspd-preload.so")
	cmd := exec.Command("make", "-s", "preload", "PRELOAD="+lib)
	cmd.Dir = "../.."
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Skipf("cannot build the preload library (a C compiler is needed): %v\n%s", err, out)
	}
	return lib
}

func TestPreloadProtocol(t *testing.T) {
	socat := os.Getenv("PSPD_VM_SOCAT")
	if socat == "" {
		var err error
		if socat, err = exec.LookPath("socat"); err != nil {
			t.Skip("no socat (apt-get install socat)")
		}
	}
	lib := preloadLib(t)
	ns := nstest.New(t, "ppre")
	// A non-loopback address on lo: the library leaves loopback alone.
	lh, err := vnl.NewHandleAt(netns.NsHandle(ns), unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	lo, err := lh.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	a, _ := vnl.ParseAddr("10.77.0.1/32")
	if err := lh.AddrAdd(lo, a); err != nil {
		t.Fatal(err)
	}
	lh.LinkSetUp(lo)
	lh.Close()

	svc := &preloadService{}
	sock := apitest.Serve(t, svc, localapi.Authorizer{})
	var ln net.Listener
	nstest.Do(t, ns, func() { ln, err = net.Listen("tcp4", "10.77.0.1:7400") })
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	// send runs socat under the library to the listener with env and
	// returns what the listener read, socat's error and its stderr.
	send := func(t *testing.T, env ...string) (got, stderr string, err error) {
		t.Helper()
		var errBuf bytes.Buffer
		cmd := preloaded(lib, sock, env, socat, "-u", "-", "TCP:10.77.0.1:7400")
		cmd.Stdin, cmd.Stderr = strings.NewReader("hello"), &errBuf
		runIn(t, ns, cmd)
		werr := cmd.Wait()
		ln.(*net.TCPListener).SetDeadline(time.Now().Add(3 * time.Second))
		c, aerr := ln.Accept()
		if aerr != nil {
			return "", errBuf.String(), werr // the connection never came (refused before connect)
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		b, _ := io.ReadAll(c)
		return string(b), errBuf.String(), werr
	}

	t.Run("upgraded", func(t *testing.T) {
		svc.set(nil)
		got, stderr, err := send(t)
		if got != "hello" || err != nil {
			t.Fatalf("read %q, socat %v:\n%s", got, err, stderr)
		}
		if p := svc.set(nil); len(p) != 1 || p[0] != localapi.UpgradeAutoPeer {
			t.Errorf("upgrades asked for peers %q, want one for %q", p, localapi.UpgradeAutoPeer)
		}
		if !strings.Contains(stderr, "upgraded to PSP hdr0-aes-gcm-128 with peer b") {
			t.Errorf("stderr: %s", stderr)
		}
	})
	t.Run("refused-fails-closed", func(t *testing.T) {
		svc.set(errors.New("no session with peer b right now"))
		got, stderr, err := send(t)
		if got != "" || err == nil {
			t.Fatalf("pspd refused, yet the listener read %q (socat: %v)", got, err)
		}
		for _, want := range []string{"no session with peer b right now", "PSPD_PRELOAD_FAIL=closed", "Connection refused"} {
			if !strings.Contains(stderr, want) {
				t.Errorf("stderr lacks %q:\n%s", want, stderr)
			}
		}
	})
	t.Run("refused-fails-open", func(t *testing.T) {
		svc.set(errors.New("no session"))
		if got, stderr, err := send(t, "PSPD_PRELOAD_FAIL=open"); got != "hello" || err != nil || !strings.Contains(stderr, "stays in the clear") {
			t.Fatalf("read %q, socat %v:\n%s", got, err, stderr)
		}
	})
	t.Run("no-peer", func(t *testing.T) {
		svc.set(fmt.Errorf("10.77.0.1 is no peer's: %w", localapi.ErrNoPeer))
		if got, _, err := send(t); got != "" || err == nil {
			t.Errorf("no peer, default refuse: read %q, socat %v", got, err)
		}
		if got, stderr, err := send(t, "PSPD_PRELOAD_NONPEER=clear"); got != "hello" || err != nil {
			t.Errorf("no peer, PSPD_PRELOAD_NONPEER=clear: read %q, socat %v:\n%s", got, err, stderr)
		}
	})
	t.Run("not-selected", func(t *testing.T) {
		svc.set(errors.New("must not be asked"))
		for _, rule := range []string{"10.1.0.0/16", "10.77.0.1:7401", "[fd00::]:7400", "none"} {
			if got, stderr, err := send(t, "PSPD_PRELOAD_CONNECT="+rule); got != "hello" || err != nil {
				t.Errorf("PSPD_PRELOAD_CONNECT=%s: read %q, socat %v:\n%s", rule, got, err, stderr)
			}
		}
		if p := svc.set(nil); len(p) != 0 {
			t.Errorf("connections no rule selects were handed over: %q", p)
		}
		for _, rule := range []string{"10.77.0.0/24", "10.77.0.1:7400", ":7000-7500", "*"} {
			if got, _, err := send(t, "PSPD_PRELOAD_CONNECT="+rule); got != "hello" || err != nil {
				t.Errorf("PSPD_PRELOAD_CONNECT=%s: read %q, socat %v", rule, got, err)
			}
		}
		if p := svc.set(nil); len(p) != 4 {
			t.Errorf("%d of 4 selected connections handed over", len(p))
		}
	})
	t.Run("bad-config-fails-closed", func(t *testing.T) {
		svc.set(nil)
		got, stderr, err := send(t, "PSPD_PRELOAD_CONNECT=10.77.0.0/33")
		if got != "" || err == nil || !strings.Contains(stderr, "PSPD_PRELOAD_CONNECT") {
			t.Errorf("read %q, socat %v:\n%s", got, err, stderr)
		}
	})
	t.Run("accept-fails-closed", func(t *testing.T) {
		svc.set(errors.New("no session"))
		var stderr syncBuf
		srv := preloaded(lib, sock, nil, socat, "-u", "TCP-LISTEN:7402,bind=10.77.0.1,reuseaddr", "-")
		srv.Stderr = &stderr
		runIn(t, ns, srv)
		defer func() { srv.Process.Kill(); srv.Wait() }()
		if !waitFor(5*time.Second, func() bool { return listening(t, ns, 7402) }) {
			t.Fatal("socat does not listen")
		}
		var c net.Conn
		nstest.Do(t, ns, func() { c, err = net.Dial("tcp4", "10.77.0.1:7402") })
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := c.Read(make([]byte, 1))
		if !errors.Is(err, unix.ECONNRESET) && !errors.Is(err, io.EOF) {
			t.Errorf("a connection accept refused: read %v, want a reset", err)
		}
		if !waitFor(3*time.Second, func() bool { return bytes.Contains(stderr.Bytes(), []byte("accept from 10.77.0.1")) }) {
			t.Errorf("stderr: %s", stderr.Bytes())
		}
	})
}
