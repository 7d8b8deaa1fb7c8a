package psp_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pspd/pspd/internal/nstest"
	"github.com/pspd/pspd/localapi/client"
)

// preloadTools are the preload library and socat, from the VM image or
// the environment; the test skips without them.
func preloadTools(t *testing.T) (lib, socat string) {
	t.Helper()
	lib, socat = os.Getenv("PSPD_PRELOAD_LIB"), os.Getenv("PSPD_VM_SOCAT")
	if lib == "" {
		t.Skip("PSPD_PRELOAD_LIB unset: the VM ships the preload library when the host has a C compiler (make preload)")
	}
	if socat == "" {
		t.Skip("PSPD_VM_SOCAT unset: the VM ships socat when the host has it (apt-get install socat)")
	}
	return lib, socat
}

// preloaded is a command run under the preload library, talking to the
// pspd at sock.
func preloaded(lib, sock string, env []string, name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "LD_PRELOAD="+lib, "PSPD_PRELOAD_SOCKET="+sock, "PSPD_PRELOAD_DEBUG=1", "PSPD_PRELOAD_TIMEOUT=20")
	cmd.Env = append(cmd.Env, env...)
	return cmd
}

// runIn starts cmd on a thread inside namespace ns: the child inherits
// the thread's network namespace.
func runIn(t *testing.T, ns int, cmd *exec.Cmd) {
	t.Helper()
	var err error
	nstest.Do(t, ns, func() { err = cmd.Start() })
	if err != nil {
		t.Fatal(err)
	}
}

// listening reports whether something listens on TCP port in namespace ns.
func listening(t *testing.T, ns int, port int) bool {
	var b []byte
	nstest.Do(t, ns, func() { b, _ = os.ReadFile("/proc/thread-self/net/tcp") })
	return bytes.Contains(b, fmt.Appendf(nil, ":%04X 00000000:0000 0A", port))
}

// TestVMPreloadSocat: an unmodified socat on each end, under the preload
// library, with nothing configured but pspd's socket. The server's accept
// and the client's connect hand their sockets to their pspds with
// peer=auto; the data then crosses the PSP devices (their counters move,
// both daemons report psp-upgrade), and a connection pspd refuses fails
// closed with ECONNREFUSED and pspd's reason on stderr.
func TestVMPreloadSocat(t *testing.T) {
	lib, socat := preloadTools(t)
	a, b := pair(t, 3223, "10.94.0")
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	waitSession(ctx, t, a, b)
	evA, evB := collect(ctx, t, client.New(a.sock)), collect(ctx, t, client.New(b.sock))
	beforeA, beforeB := pspStats(t, a), pspStats(t, b)

	var srvErr bytes.Buffer
	srv := preloaded(lib, b.sock, nil, socat, "-d", "TCP-LISTEN:7300,bind=10.94.0.2,reuseaddr", "PIPE")
	srv.Stderr = &srvErr
	runIn(t, b.ns, srv)
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
	if !waitFor(10*time.Second, func() bool { return listening(t, b.ns, 7300) }) {
		t.Fatalf("socat does not listen:\n%s", srvErr.String())
	}

	// The MSS of a clear connection on the same link, for comparison.
	var ln net.Listener
	var err error
	nstest.Do(t, b.ns, func() { ln, err = net.Listen("tcp4", "10.94.0.2:7301") })
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var clear net.Conn
	nstest.Do(t, a.ns, func() { clear, err = net.Dial("tcp4", "10.94.0.2:7301") })
	if err != nil {
		t.Fatal(err)
	}
	clearMSS := mss(t, clear.(*net.TCPConn))
	clear.Close()
	if c, err := ln.Accept(); err == nil {
		c.Close()
	}

	// connect-timeout makes socat connect non-blocking: the library
	// completes the connect before it hands the socket over.
	msg := bytes.Repeat([]byte("pspd-preload-canary "), 3277) // 64 KiB
	var cliErr bytes.Buffer
	cli := preloaded(lib, a.sock, nil, socat, "-d", "-t", "10", "-", "TCP:10.94.0.2:7300,connect-timeout=10")
	in, err := cli.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	outR, err := cli.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cli.Stderr = &cliErr
	runIn(t, a.ns, cli)
	got := make(chan []byte, 1)
	go func() {
		b := make([]byte, len(msg))
		n, _ := io.ReadFull(outR, b)
		got <- b[:n]
	}()
	go in.Write(msg)
	var out []byte
	select {
	case out = <-got:
	case <-ctx.Done():
		cli.Process.Kill()
		t.Fatalf("socat client hung\nclient:\n%s\nserver:\n%s\nA:\n%s\nB:\n%s", cliErr.String(), srvErr.String(), a.logs.Bytes(), b.logs.Bytes())
	}
	// While the connection is open: its MSS, as ss reports it.
	if ssBin := os.Getenv("PSPD_VM_SS"); ssBin != "" {
		var ssOut []byte
		nstest.Do(t, a.ns, func() { ssOut, err = exec.Command(ssBin, "-tin", "dst", "10.94.0.2:7300").CombinedOutput() })
		m := regexp.MustCompile(`\bmss:(\d+)`).FindSubmatch(ssOut)
		if err != nil || m == nil {
			t.Errorf("ss: %v\n%s", err, ssOut)
		} else if v, _ := strconv.Atoi(string(m[1])); v != clearMSS-40 {
			t.Errorf("socat's connection has MSS %d, want the clear connection's %d - 40 (PSP overhead)", v, clearMSS)
		} else {
			t.Logf("MSS %d through PSP, %d in the clear", v, clearMSS)
		}
	}
	in.Close()
	if err := cli.Wait(); err != nil {
		t.Fatalf("socat client: %v\nclient:\n%s\nserver:\n%s", err, cliErr.String(), srvErr.String())
	}
	if !bytes.Equal(out, msg) {
		t.Errorf("echo through socat: got %d bytes, want %d intact", len(out), len(msg))
	}
	t.Logf("client stderr:\n%s", cliErr.String())
	t.Logf("server stderr:\n%s", srvErr.String())
	for _, s := range []string{cliErr.String(), srvErr.String()} {
		if !strings.Contains(s, "upgraded to PSP") {
			t.Errorf("the preload library did not report an upgrade: %s", s)
		}
	}
	afterA, afterB := pspStats(t, a), pspStats(t, b)
	t.Logf("A's PSP device: tx %d bytes / %d packets, rx %d bytes / %d packets (during the test)",
		afterA.TxBytes-beforeA.TxBytes, afterA.TxPackets-beforeA.TxPackets, afterA.RxBytes-beforeA.RxBytes, afterA.RxPackets-beforeA.RxPackets)
	t.Logf("B's PSP device: tx %d bytes / %d packets, rx %d bytes / %d packets (during the test)",
		afterB.TxBytes-beforeB.TxBytes, afterB.TxPackets-beforeB.TxPackets, afterB.RxBytes-beforeB.RxBytes, afterB.RxPackets-beforeB.RxPackets)
	for _, d := range []struct {
		name          string
		before, after uint64
	}{
		{"A tx", beforeA.TxBytes, afterA.TxBytes}, {"A rx", beforeA.RxBytes, afterA.RxBytes},
		{"B tx", beforeB.TxBytes, afterB.TxBytes}, {"B rx", beforeB.RxBytes, afterB.RxBytes},
	} {
		if d.after-d.before < uint64(len(msg)) {
			t.Errorf("%s: the PSP device carried %d bytes, want at least the %d echoed", d.name, d.after-d.before, len(msg))
		}
	}
	for _, l := range []struct {
		name, peer string
		log        *eventLog
	}{{"A", "b", evA}, {"B", "a", evB}} {
		ups := l.log.kinds("psp-upgrade")
		if len(ups) != 1 || ups[0].Peer != l.peer {
			t.Errorf("%s: psp-upgrade events %+v, want one for peer %s (picked by peer=auto)", l.name, ups, l.peer)
		}
	}

	// pspd refuses (no such peer): socat's connect fails closed.
	var refErr bytes.Buffer
	ref := preloaded(lib, a.sock, []string{"PSPD_PRELOAD_PEER=nobody"}, socat, "-", "TCP:10.94.0.2:7301")
	ref.Stdin, ref.Stderr = strings.NewReader("must not arrive"), &refErr
	runIn(t, a.ns, ref)
	if err := ref.Wait(); err == nil {
		t.Errorf("socat connected although pspd refused the upgrade:\n%s", refErr.String())
	}
	t.Logf("refused client stderr:\n%s", refErr.String())
	for _, want := range []string{"unknown peer", "PSPD_PRELOAD_FAIL=closed", "Connection refused"} {
		if !strings.Contains(refErr.String(), want) {
			t.Errorf("refused socat's stderr lacks %q", want)
		}
	}
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, _ := c.Read(make([]byte, 64)); n != 0 {
		t.Errorf("the refused connection carried %d clear bytes", n)
	}
	c.Close()
}
