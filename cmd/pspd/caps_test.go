package main

import (
	"bufio"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/pspd/pspd/internal/nstest"
)

// unitCaps is the CapabilityBoundingSet of the shipped systemd unit.
func unitCaps(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("../../contrib/pspd.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "CapabilityBoundingSet="); ok {
			return strings.Fields(v)
		}
	}
	t.Fatal("contrib/pspd.service has no CapabilityBoundingSet")
	return nil
}

// TestUnitCapabilitiesRunAFXDP: with only the unit's capabilities pspd
// brings up its userspace data plane on AF_XDP (TUN, XDP program, XSKMAP,
// AF_XDP socket), and without CAP_PERFMON or CAP_NET_RAW it cannot: the
// two whose need is least obvious are shown to be needed.
func TestUnitCapabilitiesRunAFXDP(t *testing.T) {
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Skip("setpriv (util-linux) not installed")
	}
	ns := nstest.New(t, "pspdcap")
	nstest.Do(t, ns, func() {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "pspdv0"}, PeerName: "pspdv1"}
		if err := netlink.LinkAdd(veth); err != nil {
			t.Fatal(err)
		}
		addr, _ := netlink.ParseAddr("192.0.2.1/24")
		for _, step := range []func() error{
			func() error { return netlink.AddrAdd(veth, addr) },
			func() error { return netlink.LinkSetUp(veth) },
			func() error { return netlink.LinkSetUp(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "pspdv1"}}) },
		} {
			if err := step(); err != nil {
				t.Fatal(err)
			}
		}
	})
	cfg := writeConfig(t, "backend: userspace\nuserspace:\n  interface: pspdc0\n  io: af_xdp")
	body, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfg, []byte(strings.Replace(string(body), "listen: 0.0.0.0:6082", "listen: 192.0.2.1:6082", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	caps := unitCaps(t)
	without := func(drop string) []string {
		var out []string
		for _, c := range caps {
			if c != drop {
				out = append(out, c)
			}
		}
		return out
	}
	for _, tc := range []struct {
		name string
		caps []string
		want string // in the log or the error
		ok   bool
	}{
		{"unit", caps, "io=af_xdp", true},
		{"without CAP_PERFMON", without("CAP_PERFMON"), "pointer arithmetic", false},
		{"without CAP_NET_RAW", without("CAP_NET_RAW"), "socket(AF_XDP)", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			set := "-all"
			for _, c := range tc.caps {
				set += ",+" + strings.ToLower(strings.TrimPrefix(c, "CAP_"))
			}
			var cmd *exec.Cmd
			var stderr *bufio.Scanner
			nstest.Do(t, ns, func() {
				// A mount namespace with its own /sys, as ip netns exec
				// does: pspd reads the interface's queues there.
				cmd = exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", `mount -t sysfs sysfs /sys && exec "$@"`, "sh",
					setpriv, "--bounding-set="+set, "--inh-caps=-all", os.Args[0], "run", "--config", cfg, "--log-format", "text")
				cmd.Env = append(os.Environ(), "PSPD_TEST_AS_PSPD=1")
				pipe, err := cmd.StderrPipe()
				if err != nil {
					t.Fatal(err)
				}
				stderr = bufio.NewScanner(pipe)
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
			})
			lines := make(chan string)
			go func() {
				defer close(lines)
				for stderr.Scan() {
					lines <- stderr.Text()
				}
			}()
			defer func() {
				cmd.Process.Kill()
				for range lines {
				}
				cmd.Wait()
			}()
			var log []string
			timeout := time.After(20 * time.Second)
			for {
				select {
				case l, open := <-lines:
					if !open {
						t.Fatalf("pspd exited; want %q in:\n%s", tc.want, strings.Join(log, "\n"))
					}
					log = append(log, l)
					if !strings.Contains(l, tc.want) {
						continue
					}
					if tc.ok != !strings.HasPrefix(l, "pspd: ") {
						t.Fatalf("%q in %q, but want started=%v", tc.want, l, tc.ok)
					}
					if tc.ok {
						// Started: the API socket answers.
						c, err := net.Dial("unix", strings.TrimSuffix(cfg, "pspd.yaml")+"pspd.sock")
						if err != nil {
							t.Fatal(err)
						}
						c.Close()
					}
					return
				case <-timeout:
					t.Fatalf("no %q within 20s:\n%s", tc.want, strings.Join(log, "\n"))
				}
			}
		})
	}
}
