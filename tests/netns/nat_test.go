package netns

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/localapi"
)

// TestNATRebinding puts a masquerading NAT (nftables) between a and b and
// runs the userspace backend across it: a, behind the NAT, knows b's
// address; b knows only the NAT's public address for a. The association
// comes up, UDP echoes flow both ways, then the NAT mapping changes
// mid-stream (the rule now maps to another public address and conntrack
// is flushed): b's engine follows a to its new outer address on a's first
// authenticated packet, and the echoes resume by themselves. The recovery
// time is logged. Last, forged packets under b's live RX SPI from a third
// address must not move b's idea of where a is.
//
// Which side dials the control plane follows the keys (the smaller SPKI
// initiates). The subtests pick the identities so that the host behind
// the NAT is the initiator in one and the responder in the other. Both
// end with a rekey through the new mapping, and the time from the
// rebinding until it completed is logged. With the initiator behind the
// NAT, QUIC migrates its session to the new mapping. With the responder
// behind it (issue 16), the initiator reaches it only through the
// mapping the responder's own dial left, and QUIC does not migrate the
// server's side: the session is lost (the responder's idle timeout) and
// the control plane recovers only because the responder, having lost its
// session, dials the initiator again through the new mapping.
func TestNATRebinding(t *testing.T) {
	hostOnly(t)
	t.Run("nated-initiator", func(t *testing.T) { testNATRebinding(t, true, "udp") })
	t.Run("nated-responder", func(t *testing.T) { testNATRebinding(t, false, "udp") })
	// auto takes AF_XDP where the veth supports it.
	t.Run("nated-initiator-io-auto", func(t *testing.T) { testNATRebinding(t, true, "auto") })
}

func testNATRebinding(t *testing.T, natedInitiates bool, io string) {
	for _, bin := range []string{"nft", "conntrack"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("needs %s (tests/deps.sh installs nftables and conntrack)", bin)
		}
	}
	l := newLab(t, "pnat-")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	var hs [3]*Host
	for i, name := range []string{"a", "n", "b"} {
		h, err := l.Host(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		hs[i] = h
	}
	a, n, b := hs[0], hs[1], hs[2]
	pfx := netip.MustParsePrefix
	const (
		natPublic  = "198.51.100.1"
		natPublic2 = "198.51.100.3"
		bAddr      = "198.51.100.2"
		forger     = "198.51.100.9"
	)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(l.Link(ctx, a, n, pfx("10.9.0.2/24"), pfx("10.9.0.1/24")))
	must(l.Link(ctx, n, b, pfx(natPublic+"/24"), pfx(bAddr+"/24")))
	wan := l.Prefix + "nb"
	must(n.IP(ctx, "addr", "add", natPublic2+"/24", "dev", wan))
	must(a.IP(ctx, "route", "add", "default", "via", "10.9.0.1"))
	must(n.Run(ctx, "sysctl", "-qw", "net.ipv4.ip_forward=1"))
	must(n.Nft(ctx, fmt.Sprintf(`table ip nat {
	chain post {
		type nat hook postrouting priority srcnat; policy accept;
		oifname %q masquerade
	}
}
`, wan)))

	da, err := l.NewDaemon(ctx, a)
	must(err)
	db, err := l.NewDaemon(ctx, b)
	must(err)
	for initiates(t, da, db) != natedInitiates {
		if da, err = l.NewDaemon(ctx, a); err != nil {
			t.Fatal(err)
		}
	}
	inner := [2]string{"10.200.0.1", "10.200.0.2"}
	conf := func(self *Daemon, listen, addr, peerName, peerEP, peerKey, peerInner string) {
		t.Helper()
		must(self.WriteConfig(fmt.Sprintf(`listen: %s
metrics: off
backend: userspace
rekey_interval: 10m
require_encryption: true
userspace:
  address: %s/24
  io: %s
peers:
  - name: %s
    endpoint: %s
    public_key: %s
    prefixes: [%s/32]
`, listen, addr, io, peerName, peerEP, peerKey, peerInner)))
	}
	// a knows b by name, from its namespace's hosts file.
	hostsFile(t, a, bAddr+" peer-b.pspd.test\n")
	conf(da, "10.9.0.2", inner[0], "b", "peer-b.pspd.test", db.PubKey, inner[1])
	conf(db, bAddr, inner[1], "a", natPublic, da.PubKey, inner[0])
	available(ctx, t, da, "userspace")
	for _, d := range []*Daemon{da, db} {
		must(d.Start(ctx))
	}
	p := &Pair{A: da, B: db, Inner: inner}
	as, err := p.WaitAssoc(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("association up through the NAT: a rx %#x, b rx %#x", as[0].RxSPI, as[1].RxSPI)
	for _, line := range strings.Split(readFile(t, db.Log), "\n") {
		if i := strings.Index(line, " io="); i >= 0 && strings.Contains(line, "data plane up") {
			t.Logf("b's data plane: %s", line[i+1:])
		}
	}
	out, err := da.Ctl(ctx, "peer", "list", "--json")
	must(err)
	var peers []localapi.Peer
	if err := json.Unmarshal([]byte(out), &peers); err != nil || len(peers) != 1 || peers[0].Endpoint != bAddr+":6082" {
		t.Fatalf("a's peer b, configured as peer-b.pspd.test, is not at %s:6082: %s %v", bAddr, out, err)
	}

	// Echo servers on both inner addresses; each side probes the other.
	ea, err := listenIn(a, "udp4", inner[0]+":7790")
	must(err)
	eb, err := listenIn(b, "udp4", inner[1]+":7790")
	must(err)
	for _, c := range []*net.UDPConn{ea, eb} {
		t.Cleanup(func() { c.Close() })
		go echo(c)
	}
	pa, err := newProber(a, inner[1]+":7790")
	must(err)
	t.Cleanup(pa.close)
	pb, err := newProber(b, inner[0]+":7790")
	must(err)
	t.Cleanup(pb.close)
	for _, pr := range []*prober{pa, pb} {
		if _, err := pr.waitReply(time.Now(), 10*time.Second); err != nil {
			t.Fatalf("before the rebinding, %s → %s: %v\n%s\n%s", pr.from.Name, pr.to, err, da.Tail(20), db.Tail(20))
		}
	}

	// The NAT now maps a to another public address, and forgets the old
	// mapping: a's packets reach b from an address b never heard of.
	must(n.Nft(ctx, fmt.Sprintf(`flush chain ip nat post
add rule ip nat post oifname %q snat ip to %s
`, wan, natPublic2)))
	// Until the flush the old conntrack entries still map a as before.
	must(n.Run(ctx, "conntrack", "-F"))
	rebound := time.Now()
	for _, pr := range []*prober{pa, pb} {
		took, err := pr.waitReply(rebound, 10*time.Second)
		if err != nil {
			t.Fatalf("after the NAT rebinding, %s → %s: %v\n%s\n%s", pr.from.Name, pr.to, err, da.Tail(20), db.Tail(20))
		}
		t.Logf("NAT rebinding: echoes %s → %s resumed %v after the mapping changed", pr.from.Name, pr.to, took.Round(time.Millisecond))
	}
	moved := ""
	for deadline := time.Now().Add(5 * time.Second); moved == "" && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		for _, line := range strings.Split(readFile(t, db.Log), "\n") {
			if strings.Contains(line, "peer endpoint moved") && strings.Contains(line, "to="+natPublic2+":") {
				moved = line
			}
		}
	}
	if moved == "" {
		t.Fatalf("b's log does not say a's endpoint moved to %s\n%s", natPublic2, db.Tail(20))
	}
	t.Logf("b: %s", moved)

	// Forged packets under b's RX SPI for a, from a third address: they
	// fail authentication, so b keeps sending to a's real mapping. The
	// capture is on the NAT's side of the link: an AF_XDP sender's frames
	// do not pass its own host's packet sockets.
	stop, err := capture(ctx, n, wan, false)
	must(err)
	must(n.Spray(ctx, "forged", forger+":6081", bAddr+":6081", 200, as[1].RxSPI))
	since := time.Now()
	if _, err := pb.waitReply(since, 5*time.Second); err != nil {
		t.Fatalf("after the forged spray, b → a: %v", err)
	}
	pcap, err := stop()
	must(err)
	if got := framesTo(t, pcap, netip.MustParseAddr(natPublic2)); got == 0 {
		t.Fatalf("the capture of the NAT's outside link shows no frame to a's mapping %s: it proves nothing", natPublic2)
	}
	if got := framesTo(t, pcap, netip.MustParseAddr(forger)); got != 0 {
		t.Fatalf("b sent %d frames to the forger's address %s after forged packets under its SPI", got, forger)
	}
	if _, err := pa.waitReply(since, 5*time.Second); err != nil {
		t.Fatalf("after the forged spray, a → b: %v", err)
	}

	// The control plane across the new mapping: a rekey from b (whose
	// QUIC peer now sits behind another address) completes, and the data
	// plane carries traffic under the new generation. With a behind the
	// NAT as the responder this needs a new session, which a must dial
	// once it notices the old one is gone (its idle timeout).
	rotated := time.Now()
	for {
		out, err = db.Ctl(ctx, "assoc", "rotate", "--all")
		if err == nil && strings.Contains(out, " ok") {
			break
		}
		if time.Since(rotated) > 90*time.Second {
			t.Fatalf("no rekey through the rebound NAT within 90s: %q %v\n%s\n%s", out, err, da.Tail(20), db.Tail(20))
		}
		time.Sleep(time.Second)
	}
	after, err := p.WaitAssoc(ctx, as[0].Generation+1)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("rekey through the rebound NAT: generation %d → %d, %v after asking", as[0].Generation, after[0].Generation, time.Since(rotated).Round(time.Millisecond))
	t.Logf("NAT rebinding: control plane recovered %v after the mapping changed", time.Since(rebound).Round(time.Millisecond))
	since = time.Now()
	for _, pr := range []*prober{pa, pb} {
		if _, err := pr.waitReply(since, 10*time.Second); err != nil {
			t.Fatalf("after the rekey, %s → %s: %v", pr.from.Name, pr.to, err)
		}
	}
}

// initiates reports whether x is the key exchange's initiator towards y:
// the side with the smaller SPKI.
func initiates(t *testing.T, x, y *Daemon) bool {
	t.Helper()
	kx, err := identity.ParsePublicKey(x.PubKey)
	if err != nil {
		t.Fatal(err)
	}
	ky, err := identity.ParsePublicKey(y.PubKey)
	if err != nil {
		t.Fatal(err)
	}
	return identity.Compare(kx, ky) < 0
}

// listenIn opens a UDP socket inside h's network namespace; the socket
// stays there after the thread that made it leaves.
func listenIn(h *Host, network, addr string) (*net.UDPConn, error) {
	var c *net.UDPConn
	err := inNetns(h, func() (err error) {
		c, err = net.ListenUDP(network, net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)))
		return err
	})
	return c, err
}

func inNetns(h *Host, f func() error) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	self, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return err
	}
	defer self.Close()
	target, err := os.Open("/run/netns/" + h.NS)
	if err != nil {
		return err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("setns %s: %w", h.NS, err)
	}
	ferr := f()
	if err := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); err != nil {
		// This thread is in the wrong namespace: let it die with the
		// goroutine instead of running anything else.
		runtime.Goexit()
	}
	return ferr
}

func echo(c *net.UDPConn) {
	buf := make([]byte, 2048)
	for {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		c.WriteToUDPAddrPort(buf[:n], from)
	}
}

// prober sends a numbered, timestamped datagram every 20ms to an echo
// server and records when each reply comes back.
type prober struct {
	from *Host
	to   string
	c    *net.UDPConn
	mu   sync.Mutex
	// replies holds the send time of every datagram whose echo came back.
	replies []time.Time
	done    chan struct{}
}

func newProber(from *Host, to string) (*prober, error) {
	dst := net.UDPAddrFromAddrPort(netip.MustParseAddrPort(to))
	network, wildcard := "udp4", "0.0.0.0:0"
	if dst.IP.To4() == nil {
		network, wildcard = "udp6", "[::]:0"
	}
	c, err := listenIn(from, network, wildcard)
	if err != nil {
		return nil, err
	}
	p := &prober{from: from, to: to, c: c, done: make(chan struct{})}
	go func() {
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		buf := make([]byte, 16)
		for {
			select {
			case <-p.done:
				return
			case <-tick.C:
			}
			binary.BigEndian.PutUint64(buf, uint64(time.Now().UnixNano()))
			c.WriteToUDP(buf, dst)
		}
	}()
	go func() {
		buf := make([]byte, 64)
		for {
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			if n == 16 {
				sent := time.Unix(0, int64(binary.BigEndian.Uint64(buf)))
				p.mu.Lock()
				p.replies = append(p.replies, sent)
				p.mu.Unlock()
			}
		}
	}()
	return p, nil
}

// waitReply waits until a datagram sent after since has come back and
// returns how long after since the first such datagram was sent.
func (p *prober) waitReply(since time.Time, wait time.Duration) (time.Duration, error) {
	deadline := time.Now().Add(wait)
	for time.Now().Before(deadline) {
		p.mu.Lock()
		var first time.Time
		for _, s := range p.replies {
			if s.After(since) && (first.IsZero() || s.Before(first)) {
				first = s
			}
		}
		p.mu.Unlock()
		if !first.IsZero() {
			return first.Sub(since), nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return 0, errors.New("no echo within " + wait.String())
}

func (p *prober) close() {
	close(p.done)
	p.c.Close()
}

func readFile(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// framesTo counts the IPv4 frames of an Ethernet pcap addressed to dst.
func framesTo(t *testing.T, pcap []byte, dst netip.Addr) int {
	t.Helper()
	if len(pcap) < 24 || binary.LittleEndian.Uint32(pcap) != 0xa1b2c3d4 {
		t.Fatalf("capture is not a little-endian classic pcap (%d bytes)", len(pcap))
	}
	count := 0
	for rest := pcap[24:]; len(rest) >= 16; {
		n := int(binary.LittleEndian.Uint32(rest[8:]))
		if n > len(rest)-16 {
			t.Fatal("truncated pcap record")
		}
		f := rest[16 : 16+n]
		if len(f) >= 34 && binary.BigEndian.Uint16(f[12:]) == 0x0800 && netip.AddrFrom4([4]byte(f[30:34])) == dst {
			count++
		}
		rest = rest[16+n:]
	}
	return count
}

// hostsFile gives h its own /etc/hosts: ip netns exec, which runs
// everything in h, bind-mounts /etc/netns/NS/hosts over /etc/hosts.
func hostsFile(t *testing.T, h *Host, body string) {
	t.Helper()
	dir := filepath.Join("/etc/netns", h.NS)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		os.RemoveAll(dir)
		os.Remove("/etc/netns") // only if now empty
	})
	if err := os.WriteFile(filepath.Join(dir, "hosts"), []byte("127.0.0.1 localhost\n"+body), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestEndpointByNameReload: a peer endpoint given by name is resolved at
// start from the namespace's hosts file, and again at each reload; a name
// that does not resolve stops pspd at start, and fails a reload, with the
// file, line and field, not a crash, and the failed reload keeps the
// running configuration.
func TestEndpointByNameReload(t *testing.T) {
	hostOnly(t) // the VM has no /etc/hosts for ip netns exec to bind over
	l := newLab(t, "pdns-")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	h, err := l.Host(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	hostsFile(t, h, "")
	d, err := l.NewDaemon(ctx, h)
	if err != nil {
		t.Fatal(err)
	}
	key := otherKey(t, l)
	conf := func(name string) {
		t.Helper()
		if err := d.WriteConfig(`listen: 127.0.0.1
backend: userspace
userspace:
  address: 10.200.0.1/24
  io: udp
peers:
  - name: b
    endpoint: ` + name + `:6082
    public_key: ` + key + `
    prefixes: [10.1.0.0/16]
`); err != nil {
			t.Fatal(err)
		}
	}
	// The endpoint is on line 10 of the file (identity and socket first).
	unresolvable := d.Config + `:10: peers[0].endpoint: cannot resolve host name "nope.pspd.test"`
	conf("nope.pspd.test")
	if err := d.Start(ctx); err == nil {
		t.Fatal("pspd started with an unresolvable peer endpoint")
	}
	if log := readFile(t, d.Log); !strings.Contains(log, unresolvable) || strings.Contains(log, "panic") {
		t.Fatalf("pspd's start error does not name the line (want %q):\n%s", unresolvable, log)
	}

	endpoint := func() string {
		t.Helper()
		out, err := d.Ctl(ctx, "peer", "list", "--json")
		if err != nil {
			t.Fatal(err)
		}
		var ps []localapi.Peer
		if err := json.Unmarshal([]byte(out), &ps); err != nil || len(ps) != 1 {
			t.Fatalf("peer list %q: %v", out, err)
		}
		return ps[0].Endpoint
	}
	hostsFile(t, h, "127.0.0.2 peer-b.pspd.test\n")
	conf("peer-b.pspd.test")
	if err := d.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if got := endpoint(); got != "127.0.0.2:6082" {
		t.Fatalf("peer-b.pspd.test is at %s, want 127.0.0.2:6082", got)
	}
	// The peer moves; its name follows at the next reload. Go's resolver
	// reads the hosts file again after at most 5 s, so reload until then.
	hostsFile(t, h, "127.0.0.3 peer-b.pspd.test\n")
	deadline := time.Now().Add(15 * time.Second)
	for endpoint() != "127.0.0.3:6082" {
		if time.Now().After(deadline) {
			t.Fatalf("after reloads, peer-b.pspd.test is still at %s, want 127.0.0.3:6082\n%s", endpoint(), d.Tail(20))
		}
		if line, err := d.Reload(ctx, "configuration reloaded", "reload failed"); err != nil || !strings.Contains(line, "configuration reloaded") {
			t.Fatalf("reload: %q %v", line, err)
		}
		time.Sleep(time.Second)
	}
	conf("nope.pspd.test")
	line, err := d.Reload(ctx, "configuration reloaded", "reload failed")
	if err != nil || !strings.Contains(line, "reload failed") || !strings.Contains(line, "peers[0].endpoint: cannot resolve host name") {
		t.Fatalf("reload with an unresolvable name: %q %v", line, err)
	}
	if got := endpoint(); got != "127.0.0.3:6082" {
		t.Fatalf("a failed reload changed the endpoint to %s", got)
	}
}

// otherKey is the public key of a fresh identity, for a peer that never
// runs.
func otherKey(t *testing.T, l *Lab) string {
	t.Helper()
	out, err := exec.Command(l.Pspd, "genkey", "--force", "--identity", filepath.Join(t.TempDir(), "other.pem")).Output()
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(out))
}
