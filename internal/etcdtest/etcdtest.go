// Package etcdtest runs a real etcd server for tests: built once from the
// etcd module (at Version, into /var/cache/pspd/etcd, never into the
// repository) and started by the test, on loopback or inside a test's
// network namespace, with TLS client-certificate authentication when asked.
package etcdtest

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// Version is the etcd server built for the tests.
const Version = "v3.7.3"

// CacheDir is where the server binary is built.
const CacheDir = "/var/cache/pspd/etcd"

// Binary is the path of the etcd server, built on first use (about 15 s
// and the module download; tests/deps.sh builds it ahead). It skips the
// test if Go or the module proxy is not there to build it.
func Binary(t testing.TB) string {
	t.Helper()
	bin, err := Build(filepath.Join(CacheDir, Version))
	if err != nil {
		t.Skipf("etcdtest: cannot build etcd %s: %v", Version, err)
	}
	return bin
}

// Build builds the etcd server into dir unless it is there, and returns
// its path. Builders in other processes wait for each other.
func Build(dir string) (string, error) {
	bin := filepath.Join(dir, "etcd")
	files := map[string]string{
		"go.mod":  "module pspd.invalid/etcdserver\n\ngo 1.26\n\nrequire go.etcd.io/etcd/server/v3 " + Version + "\n",
		"main.go": "package main\n\nimport (\n\t\"os\"\n\n\t\"go.etcd.io/etcd/server/v3/etcdmain\"\n)\n\nfunc main() { etcdmain.Main(os.Args) }\n",
	}
	return bin, BuildModule(dir, bin, files, [][]string{{"mod", "tidy"}, {"build", "-o", bin + ".tmp", "."}})
}

// BuildModule runs the go commands (the last writing bin + ".tmp") in a
// throwaway module made of files in dir, under a lock that other
// processes building there take too, and renames the result to bin; it
// does nothing if bin is there.
func BuildModule(dir, bin string, files map[string]string, cmds [][]string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return err
	}
	if _, err := os.Stat(bin); err == nil {
		return nil
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			return err
		}
	}
	for _, args := range cmds {
		cmd := exec.Command("go", args...)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod", "GOWORK=off", "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go %s in %s: %v\n%s", strings.Join(args, " "), dir, err, out)
		}
	}
	return os.Rename(bin+".tmp", bin)
}

// Place says where a test server runs (kubetest's too).
type Place struct {
	// Addr is the address to listen on (default 127.0.0.1). Wrap runs
	// the server's command elsewhere, e.g. inside a network namespace,
	// and Dial then connects from where the server can be reached.
	Addr netip.Addr
	Wrap func(name string, args ...string) *exec.Cmd
	Dial func(ctx context.Context, addr string) (net.Conn, error)
}

// Options say how to run a server.
type Options struct {
	Place
	// TLS serves https and requires client certificates signed by the
	// server's CA (Server.ClientTLS makes one).
	TLS bool
}

// Server is a running etcd.
type Server struct {
	Endpoint string // client URL
	dir      string
	opts     Options
	port     int
	cmd      *exec.Cmd
	log      *bytes.Buffer
	ca       *x509.Certificate
	caKey    *ecdsa.PrivateKey
	t        testing.TB
}

// Start runs a one-member etcd with its data in a temporary directory,
// and stops it when the test ends.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	bin := Binary(t)
	opts.Place = opts.Place.Defaults()
	s := &Server{dir: t.TempDir(), opts: opts, t: t, port: FreePort(t)}
	scheme := "http"
	if opts.TLS {
		scheme = "https"
		s.makeCA()
		s.issue("server", filepath.Join(s.dir, "server"), opts.Addr)
	}
	s.Endpoint = fmt.Sprintf("%s://%s", scheme, net.JoinHostPort(opts.Addr.String(), strconv.Itoa(s.port)))
	s.start(bin)
	t.Cleanup(s.Stop)
	return s
}

// Defaults is o with what it leaves out filled in: loopback, a command
// run here, a TCP dial from here.
func (o Place) Defaults() Place {
	if !o.Addr.IsValid() {
		o.Addr = netip.MustParseAddr("127.0.0.1")
	}
	if o.Wrap == nil {
		o.Wrap = exec.Command
	}
	if o.Dial == nil {
		var d net.Dialer
		o.Dial = func(ctx context.Context, addr string) (net.Conn, error) { return d.DialContext(ctx, "tcp", addr) }
	}
	return o
}

// FreePort is a TCP port nothing listens on now (a test server binds it
// next, in whatever namespace).
func FreePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func (s *Server) start(bin string) {
	t := s.t
	peer := fmt.Sprintf("http://%s", net.JoinHostPort(s.opts.Addr.String(), strconv.Itoa(s.port+1)))
	args := []string{
		"--name", "default", "--data-dir", filepath.Join(s.dir, "data"),
		"--listen-client-urls", s.Endpoint, "--advertise-client-urls", s.Endpoint,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
		"--initial-cluster", "default=" + peer, "--log-level", "warn",
	}
	if s.opts.TLS {
		args = append(args, "--cert-file", filepath.Join(s.dir, "server.pem"), "--key-file", filepath.Join(s.dir, "server-key.pem"),
			"--trusted-ca-file", filepath.Join(s.dir, "ca.pem"), "--client-cert-auth")
	}
	s.log = &bytes.Buffer{}
	s.cmd = s.opts.Wrap(bin, args...)
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("etcdtest: start: %v", err)
	}
	// Ready when the client port accepts connections.
	addr := net.JoinHostPort(s.opts.Addr.String(), strconv.Itoa(s.port))
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := s.opts.Dial(ctx, addr)
		cancel()
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("etcdtest: not listening on %s after 20s: %v\n%s", addr, err, s.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stop ends the server (idempotent).
func (s *Server) Stop() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	s.cmd.Process.Kill()
	s.cmd.Wait()
	s.cmd = nil
}

// Restart starts the stopped server again on the same data and port.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	s.start(Binary(s.t))
}

// Pid is the server's process id, for its memory: that of the command
// Place.Wrap made (ip netns exec execs the server, it does not fork), or
// 0 while the server is stopped.
func (s *Server) Pid() int {
	if s.cmd == nil || s.cmd.Process == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// Log is what the server printed.
func (s *Server) Log() string { return s.log.String() }

// Dir is the server's scratch directory.
func (s *Server) Dir() string { return s.dir }

// ClientFiles issues a client certificate for common name cn and returns
// the paths of the CA, the certificate and its key, as a pspd
// configuration names them.
func (s *Server) ClientFiles(cn string) (ca, cert, key string) {
	base := filepath.Join(s.dir, "client-"+cn)
	s.issue(cn, base, netip.Addr{})
	return filepath.Join(s.dir, "ca.pem"), base + ".pem", base + "-key.pem"
}

// ClientTLS is a client TLS configuration for common name cn.
func (s *Server) ClientTLS(cn string) *tls.Config {
	ca, cert, key := s.ClientFiles(cn)
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		s.t.Fatal(err)
	}
	pool := x509.NewCertPool()
	b, err := os.ReadFile(ca)
	if err != nil || !pool.AppendCertsFromPEM(b) {
		s.t.Fatalf("etcdtest: CA: %v", err)
	}
	return &tls.Config{Certificates: []tls.Certificate{pair}, RootCAs: pool, MinVersion: tls.VersionTLS12}
}

func (s *Server) makeCA() {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		s.t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "etcdtest CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		s.t.Fatal(err)
	}
	if s.ca, err = x509.ParseCertificate(der); err != nil {
		s.t.Fatal(err)
	}
	s.caKey = k
	writePEM(s.t, filepath.Join(s.dir, "ca.pem"), "CERTIFICATE", der)
}

var serial sync.Mutex
var nextSerial int64 = 2

// issue writes base.pem and base-key.pem: a server certificate for ip
// when it is valid, a client certificate otherwise.
func (s *Server) issue(cn, base string, ip netip.Addr) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		s.t.Fatal(err)
	}
	serial.Lock()
	n := nextSerial
	nextSerial++
	serial.Unlock()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(n), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if ip.IsValid() {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
		tmpl.IPAddresses = []net.IP{ip.AsSlice()}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, s.ca, &k.PublicKey, s.caKey)
	if err != nil {
		s.t.Fatal(err)
	}
	kd, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		s.t.Fatal(err)
	}
	writePEM(s.t, base+".pem", "CERTIFICATE", der)
	writePEM(s.t, base+"-key.pem", "PRIVATE KEY", kd)
}

func writePEM(t testing.TB, path, typ string, der []byte) {
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// Client is an etcd client for the test's own operations (an operator's
// put or delete), as common name cn when the server requires
// certificates.
func (s *Server) Client(cn string) *clientv3.Client {
	s.t.Helper()
	cfg := clientv3.Config{
		Endpoints: []string{s.Endpoint}, DialTimeout: 5 * time.Second, Logger: zap.NewNop(),
		DialOptions: []grpc.DialOption{grpc.WithContextDialer(s.opts.Dial)},
	}
	if s.opts.TLS {
		cfg.TLS = s.ClientTLS(cn)
	}
	c, err := clientv3.New(cfg)
	if err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(func() { c.Close() })
	return c
}
