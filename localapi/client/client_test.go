package client_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/localapi/apitest"
	"github.com/pspd/pspd/localapi/client"
)

func serve(t *testing.T, auth localapi.Authorizer) (string, *apitest.Service) {
	t.Helper()
	svc := &apitest.Service{
		StatusV: localapi.Status{Version: "test", Peers: 1},
		AssocsV: []localapi.Assoc{{ID: "b/1", Peer: "b", RxSPI: 1, TxSPI: 0x40000001}},
		EventsC: make(chan localapi.Event, 4),
	}
	return apitest.Serve(t, svc, auth), svc
}

func TestReadWriteAsRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the API grants write access to uid 0 only")
	}
	path, svc := serve(t, localapi.NewAuthorizer("pspd-test-nonexistent"))
	c := client.New(path)
	ctx := context.Background()
	st, err := c.Status(ctx)
	if err != nil || st.Version != "test" {
		t.Fatalf("status: %+v %v", st, err)
	}
	if _, err := c.Rotate(ctx, localapi.RotateRequest{Peer: "b"}); err != nil {
		t.Fatal(err)
	}
	if len(svc.Rotated) != 1 || svc.Rotated[0].Peer != "b" {
		t.Fatalf("rotate not delivered: %+v", svc.Rotated)
	}
	_, err = c.Rotate(ctx, localapi.RotateRequest{Peer: "nobody"})
	var ae *client.APIError
	if !errors.As(err, &ae) || ae.Status != 404 || !strings.Contains(ae.Message, "no association matches") {
		t.Fatalf("unknown peer: %v", err)
	}
	if _, err := c.Rotate(ctx, localapi.RotateRequest{Peer: "b", All: true}); err == nil {
		t.Fatal("ambiguous rotate accepted")
	}
	// Associations name one namespace and one netdev; the server checks
	// that before the daemon sees the request.
	for _, bad := range []localapi.AssocRequest{{Ifname: "nk0"}, {NetNS: "/run/netns/c", PID: 1, Ifname: "nk0"}, {PID: 1}, {PID: -1, Ifname: "nk0"}} {
		_, err = c.AssocDevice(ctx, 1, bad)
		if !errors.As(err, &ae) || ae.Status != 400 {
			t.Errorf("association %+v: %v, want 400", bad, err)
		}
	}
	_, err = c.AssocDevice(ctx, 3, localapi.AssocRequest{PID: 1, Ifname: "nk0"})
	if !errors.As(err, &ae) || ae.Status != 404 || !strings.Contains(ae.Message, "no device 3") {
		t.Errorf("association with an unknown device: %v, want 404", err)
	}
}

func TestEvents(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to read state without a pspd group")
	}
	path, svc := serve(t, localapi.NewAuthorizer("pspd-test-nonexistent"))
	svc.EventsC <- localapi.Event{Kind: localapi.EventAssocUp, Peer: "b"}
	svc.EventsC <- localapi.Event{Kind: localapi.EventRekey, Peer: "b", Reason: localapi.ReasonOperator}
	close(svc.EventsC)
	var got []string
	err := client.New(path).Events(context.Background(), func(e localapi.Event) error {
		got = append(got, e.Kind.String())
		return nil
	})
	if err != nil || strings.Join(got, ",") != "assoc-up,rekey" {
		t.Fatalf("events %v err %v", got, err)
	}
}

func TestNotRunning(t *testing.T) {
	c := client.New(filepath.Join(t.TempDir(), "none.sock"))
	_, err := c.Status(context.Background())
	if !errors.Is(err, client.ErrDaemonNotRunning) || !strings.Contains(err.Error(), "start it") {
		t.Fatalf("got %v", err)
	}
}

func TestListenRefusesLiveAndReplacesStale(t *testing.T) {
	path, _ := serve(t, localapi.Authorizer{})
	if _, err := localapi.Listen(path, localapi.Authorizer{}); err == nil || !strings.Contains(err.Error(), "another pspd is already serving") {
		t.Fatalf("live socket not refused: %v", err)
	}

	stale := filepath.Join(t.TempDir(), "stale.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close() // the file stays, nobody answers
	ln2, err := localapi.Listen(stale, localapi.Authorizer{})
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	fi, _ := os.Stat(stale)
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want 0600 without a group", fi.Mode().Perm())
	}
	ln2.Close()

	plain := filepath.Join(t.TempDir(), "file")
	os.WriteFile(plain, nil, 0o600)
	if _, err := localapi.Listen(plain, localapi.Authorizer{}); err == nil || !strings.Contains(err.Error(), "is not a socket") {
		t.Fatalf("regular file not refused: %v", err)
	}
}

// helperEnv makes the test binary act as an unprivileged API caller.
const helperEnv = "PSPD_LOCALAPI_HELPER"

func TestMain(m *testing.M) {
	if op := os.Getenv(helperEnv); op != "" {
		c := client.New(os.Getenv("PSPD_SOCK"))
		var err error
		switch op {
		case "read":
			_, err = c.Status(context.Background())
		case "write":
			_, err = c.Rotate(context.Background(), localapi.RotateRequest{All: true})
		case "upgrade":
			var ln net.Listener
			if ln, err = net.Listen("tcp", "127.0.0.1:0"); err == nil {
				var conn net.Conn
				if conn, err = net.Dial("tcp", ln.Addr().String()); err == nil {
					_, err = c.UpgradePSP(context.Background(), conn.(*net.TCPConn), "b")
				}
			}
		}
		if err != nil {
			fmt.Print(err)
			os.Exit(3)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestAuthorization runs real unprivileged processes against the socket:
// the kernel's SO_PEERCRED / SO_PEERGROUPS decide, not a test flag.
func TestAuthorization(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to start callers with other uids")
	}
	const group = 54321 // a gid no account uses; the authorizer is told it is the pspd group
	const upgrade = 54322
	path, _ := serve(t, localapi.Authorizer{GroupName: "pspd", GID: group, HasGroup: true,
		UpgradeGroupName: "pspd-upgrade", UpgradeGID: upgrade, HasUpgradeGroup: true})
	if err := os.Chmod(path, 0o666); err != nil { // so the refusal comes from the API, not the file mode
		t.Fatal(err)
	}
	exe := worldExecutableCopy(t)
	run := func(op string, cred *syscall.Credential) (string, error) {
		cmd := exec.Command(exe)
		cmd.Env = []string{helperEnv + "=" + op, "PSPD_SOCK=" + path}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	nobody := &syscall.Credential{Uid: 65534, Gid: 65534, NoSetGroups: false, Groups: []uint32{}}
	member := &syscall.Credential{Uid: 65534, Gid: group, Groups: []uint32{}}
	supplementary := &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{group}}
	upgrader := &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{upgrade}}
	for _, tc := range []struct {
		name    string
		op      string
		cred    *syscall.Credential
		wantErr string
	}{
		{"stranger read", "read", nobody, "reading pspd state needs root or membership in group pspd"},
		{"stranger write", "write", nobody, "changing pspd state needs root"},
		{"primary group read", "read", member, ""},
		{"primary group write", "write", member, "changing pspd state needs root"},
		{"supplementary group read", "read", supplementary, ""},
		// Handing a socket to pspd binds a receive key to it: reading is
		// not enough.
		{"read group upgrade", "upgrade", member, "needs root or membership in group pspd-upgrade"},
		{"stranger upgrade", "upgrade", nobody, "needs root or membership in group pspd-upgrade"},
		{"upgrade group upgrade", "upgrade", upgrader, ""},
		{"upgrade group read", "read", upgrader, ""},
		{"upgrade group write", "write", upgrader, "changing pspd state needs root"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := run(tc.op, tc.cred)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("refused: %s (%v)", out, err)
				}
				return
			}
			if err == nil || !strings.Contains(out, tc.wantErr) {
				t.Fatalf("got %q (%v), want refusal %q", out, err, tc.wantErr)
			}
		})
	}
}

func TestUpgradePassesSocket(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to read state without a pspd group")
	}
	path, svc := serve(t, localapi.NewAuthorizer("pspd-test-nonexistent"))
	c := client.New(path)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if s, err := ln.Accept(); err == nil {
			defer s.Close()
			io.Copy(io.Discard, s)
		}
	}()
	conn, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	res, err := c.UpgradePSP(ctx, conn.(*net.TCPConn), "b")
	if err != nil {
		t.Fatal(err)
	}
	if res.Peer != "b" || res.RxSPI != 7 {
		t.Fatalf("result %+v", res)
	}
	port := conn.LocalAddr().(*net.TCPAddr).Port
	if len(svc.Upgraded) != 1 || svc.Upgraded[0] != port {
		t.Fatalf("service saw %v, want the socket with local port %d", svc.Upgraded, port)
	}

	udp, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	if _, err := c.UpgradePSP(ctx, udp.(*net.UDPConn), "b"); err == nil || !strings.Contains(err.Error(), "not a TCP socket") {
		t.Fatalf("UDP socket: %v", err)
	}

	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, unix.IPPROTO_TCP)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "unconnected")
	defer f.Close()
	if _, err := c.UpgradePSP(ctx, f, "b"); err == nil || !strings.Contains(err.Error(), "not connected") {
		t.Fatalf("unconnected socket: %v", err)
	}
	if len(svc.Upgraded) != 1 {
		t.Fatalf("refused sockets reached the service: %v", svc.Upgraded)
	}
}

// worldExecutableCopy copies the test binary where an unprivileged uid can
// run it (go test builds it in a directory only root can enter).
func worldExecutableCopy(t *testing.T) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(apitest.OpenTempDir(t), "caller")
	if err := os.WriteFile(exe, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return exe
}

// TestListenRefusesUnsafeDirectory: a socket directory others can write
// lets them swap the socket for a link that chown would follow.
func TestListenRefusesUnsafeDirectory(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to own the directory as the daemon does")
	}
	dir := t.TempDir()
	open := filepath.Join(dir, "open")
	if err := os.Mkdir(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if _, err := localapi.Listen(filepath.Join(open, "pspd.sock"), localapi.Authorizer{}); err == nil || !strings.Contains(err.Error(), "chmod go-w") {
		t.Errorf("world-writable socket directory: %v, want a refusal naming the fix", err)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(t.TempDir(), link); err != nil {
		t.Fatal(err)
	}
	if _, err := localapi.Listen(filepath.Join(link, "pspd.sock"), localapi.Authorizer{}); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("socket directory behind a symbolic link: %v, want a refusal", err)
	}
	other := filepath.Join(dir, "other")
	if err := os.Mkdir(other, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(other, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if _, err := localapi.Listen(filepath.Join(other, "pspd.sock"), localapi.Authorizer{}); err == nil || !strings.Contains(err.Error(), "owned by uid 65534") {
		t.Errorf("socket directory of another user: %v, want a refusal", err)
	}
}
