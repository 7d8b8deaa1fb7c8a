package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/pspd/pspd/internal/nstest"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/wire"
	"github.com/pspd/pspd/policy"
)

// TestMain lets the tests run this binary as pspd itself, so that they see
// the exit status and stderr an operator (or systemd) sees.
func TestMain(m *testing.M) {
	if os.Getenv("PSPD_TEST_AS_PSPD") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// pspdExec runs this test binary as pspd with args; nsFD >= 0 runs it in
// that network namespace (a child forked from a thread inside it).
func pspdExec(t *testing.T, nsFD int, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var o, e strings.Builder
	do := func() {
		cmd := exec.Command(os.Args[0], args...)
		cmd.Env = append(os.Environ(), "PSPD_TEST_AS_PSPD=1")
		cmd.Stdout, cmd.Stderr = &o, &e
		err := cmd.Run()
		var ee *exec.ExitError
		switch {
		case errors.As(err, &ee):
			code = ee.ExitCode()
		case err != nil:
			t.Fatal(err)
		}
	}
	if nsFD >= 0 {
		nstest.Do(t, nsFD, do)
	} else {
		do()
	}
	return o.String(), e.String(), code
}

// writeConfig writes an identity, a peer's key and a configuration with
// the given extra top-level lines; it returns the configuration's path.
func writeConfig(t *testing.T, extra string) string {
	t.Helper()
	dir := t.TempDir()
	if _, err := run(t, "genkey", "--identity", filepath.Join(dir, "id.pem")); err != nil {
		t.Fatal(err)
	}
	peer, err := run(t, "genkey", "--identity", filepath.Join(dir, "peer.pem"))
	if err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`identity: %s
listen: 0.0.0.0:6082
socket: %s
metrics: "off"
%s
peers:
  - name: b
    endpoint: 192.0.2.2
    public_key: %s
    prefixes: [10.9.0.0/16]
`, filepath.Join(dir, "id.pem"), filepath.Join(dir, "pspd.sock"), extra, strings.TrimSpace(peer))
	path := filepath.Join(dir, "pspd.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// refusedByBoth asserts that check and run both refuse cfg with an error
// containing want, exit status 1, no panic and no doubled prefixes.
func refusedByBoth(t *testing.T, nsFD int, cfg, want string) {
	t.Helper()
	out, errOut, code := pspdExec(t, nsFD, "check", "--config", cfg)
	if code == 0 || !strings.Contains(errOut, want) {
		t.Errorf("pspd check: exit %d, stdout %q, stderr %q; want non-zero and %q", code, out, errOut, want)
	}
	_, runErr, code := pspdExec(t, nsFD, "run", "--config", cfg, "--log-format", "text")
	if code != 1 || !strings.Contains(runErr, want) || strings.Contains(runErr, "panic") {
		t.Errorf("pspd run: exit %d, stderr %q; want 1 and %q", code, runErr, want)
	}
	for _, s := range []string{errOut, runErr} {
		for _, doubled := range []string{"pspd: pspd:", "psp: psp:", "xfrm: xfrm:", "offload: offload:"} {
			if strings.Contains(s, doubled) {
				t.Errorf("doubled prefix %q in %q", doubled, s)
			}
		}
	}
}

// TestCheckRefusesXFRMWithoutESP: backend xfrm on a kernel without ESP
// (this host's; the test VM's kernel has it, where the test skips).
func TestCheckRefusesXFRMWithoutESP(t *testing.T) {
	cfg := writeConfig(t, "backend: xfrm")
	pc, err := policy.Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range probe(context.Background(), pc) {
		if a.Backend == wire.BackendXFRM && a.Available {
			t.Skip("this kernel runs ESP; the refusal needs one without it")
		}
	}
	refusedByBoth(t, -1, cfg, "peer b: offload: backend xfrm was configured but this host cannot run it")
}

// TestCheckRefusesNonTUNInterface: userspace.interface naming an existing
// veth device (this host's kernel has veth, not dummy). run must refuse it too, without a panic, and leave the
// device as it was.
func TestCheckRefusesNonTUNInterface(t *testing.T) {
	ns := nstest.New(t, "pspdchk")
	nstest.Do(t, ns, func() {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "pspdt0"}, PeerName: "pspdt0p"}); err != nil {
			t.Fatal(err)
		}
	})
	cfg := writeConfig(t, "backend: userspace\nuserspace:\n  interface: pspdt0\n  io: udp")
	refusedByBoth(t, ns, cfg, "userspace.interface pspdt0: a veth device of that name exists")
	nstest.Do(t, ns, func() {
		l, err := netlink.LinkByName("pspdt0")
		if err != nil || l.Type() != "veth" {
			t.Errorf("after run: link %v, %v; want the veth untouched", l, err)
		}
	})

	// The same file with a free name passes.
	free := writeConfig(t, "backend: userspace\nuserspace:\n  interface: pspdt1\n  io: udp")
	out, errOut, code := pspdExec(t, ns, "check", "--config", free)
	if code != 0 || !strings.Contains(out, ": ok (identity sha256:") || !strings.Contains(out, "1 peer: b)") {
		t.Errorf("check with a free name: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
}

// TestMissingAPIGroupWarns: without the read group the API socket is
// root-only; run says so at WARN with the fix instead of staying silent.
func TestMissingAPIGroupWarns(t *testing.T) {
	dir := t.TempDir()
	peer, err := run(t, "genkey", "--identity", filepath.Join(dir, "peer.pem"))
	if err != nil {
		t.Fatal(err)
	}
	// No identity file: run stops at the preflight, after the socket.
	cfg := filepath.Join(dir, "pspd.yaml")
	body := fmt.Sprintf("identity: %s\nsocket: %s\nmetrics: \"off\"\npeers:\n  - name: b\n    endpoint: 192.0.2.2\n    public_key: %s\n",
		filepath.Join(dir, "missing.pem"), filepath.Join(dir, "pspd.sock"), strings.TrimSpace(peer))
	if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	_, stderr, code := pspdExec(t, -1, "run", "--config", cfg, "--log-format", "text", "--api-group", "pspd-test-no-such-group")
	if code != 1 || !strings.Contains(stderr, "pspd genkey --identity") {
		t.Fatalf("exit %d, stderr %q; want 1 and the genkey hint", code, stderr)
	}
	var warn string
	for _, l := range strings.Split(stderr, "\n") {
		if strings.Contains(l, "level=WARN") && strings.Contains(l, "pspd-test-no-such-group") {
			warn = l
		}
	}
	if !strings.Contains(warn, "root-only") || !strings.Contains(warn, "sysusers") || !strings.Contains(warn, "groupadd --system pspd-test-no-such-group") {
		t.Errorf("no WARN naming the group, the effect and the fix in %q", stderr)
	}
}

// pspd check names the line of the identity field when the key file is
// missing or pinned as a peer, and counts peers in English.
func TestCheckIdentityErrors(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "id.pem")
	cfg := filepath.Join(dir, "pspd.yaml")
	write := func(src string) {
		t.Helper()
		if err := os.WriteFile(cfg, []byte(src), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("metrics: off\nidentity: " + key + "\n")
	_, err := run(t, "check", "--config", cfg)
	if want := cfg + ":2: identity: " + key + " does not exist"; err == nil || !strings.HasPrefix(err.Error(), want) || !strings.Contains(err.Error(), "run: pspd genkey --identity "+key) {
		t.Fatalf("missing key: %v, want %q and the genkey hint", err, want)
	}

	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	if err := identity.WriteFile(key, id, false); err != nil {
		t.Fatal(err)
	}
	peer, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	write("metrics: off\nidentity: " + key + "\npeers:\n  - name: b\n    endpoint: 192.0.2.2\n    public_key: " + id.Public().String() + "\n")
	if _, err := run(t, "check", "--config", cfg); err == nil || !strings.HasPrefix(err.Error(), cfg+":6: peers[0].public_key: is this host's own key") {
		t.Fatalf("own key pinned: %v", err)
	}

	write("metrics: off\nidentity: " + key + "\npeers:\n  - name: b\n    endpoint: 192.0.2.2\n    public_key: " + peer.Public().String() + "\n    prefixes: [10.9.0.0/16]\n")
	out, err := run(t, "check", "--config", cfg)
	if err != nil {
		t.Fatal(err)
	}
	if want := "(identity " + id.Public().Fingerprint() + ", 1 peer: b)"; !strings.Contains(out, want) {
		t.Fatalf("check printed %q, want %q", out, want)
	}
}

// TestCheckRefusesAFXDPOnWildcard: io af_xdp with listen 0.0.0.0 cannot
// work (the XDP program goes on the interface holding the listen
// address); run refuses it, so check must.
func TestCheckRefusesAFXDPOnWildcard(t *testing.T) {
	cfg := writeConfig(t, "backend: userspace\nuserspace:\n  interface: pspdw0\n  io: af_xdp")
	skipWithoutUserspace(t, cfg)
	refusedByBoth(t, nstest.New(t, "pspdxdp"), cfg, "userspace.io af_xdp needs a specific listen address")
}

// TestCheckRefusesUserspacePeerWithoutPrefixes: the userspace data plane
// routes a peer's prefixes; a peer with none would carry nothing, and
// run refuses it, so check must.
func TestCheckRefusesUserspacePeerWithoutPrefixes(t *testing.T) {
	cfg := writeConfig(t, "backend: userspace\nuserspace:\n  interface: pspdn1\n  io: udp")
	b, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfg, []byte(strings.Replace(string(b), "    prefixes: [10.9.0.0/16]\n", "", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	skipWithoutUserspace(t, cfg)
	refusedByBoth(t, nstest.New(t, "pspdnp"), cfg, "peers[0]: peer b has no prefixes")
}

// skipWithoutUserspace skips a test of a refusal that run only reaches on
// a host that can run the userspace data plane.
func skipWithoutUserspace(t *testing.T, cfg string) {
	t.Helper()
	pc, err := policy.Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range probe(context.Background(), pc) {
		if a.Backend == wire.BackendUserspace && !a.Available {
			t.Skipf("no userspace data plane here (%s): run refuses earlier", a.Reason)
		}
	}
}
