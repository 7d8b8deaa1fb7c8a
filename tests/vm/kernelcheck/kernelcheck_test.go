package kernelcheck

import (
	"crypto/rand"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/mdlayher/genetlink"
	mdnetlink "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// inVM skips unless the test runs inside the harness's VM, where a missing feature is a
// failure rather than a property of the host.
func inVM(t *testing.T) {
	t.Helper()
	if os.Getenv("PSPD_IN_VM") != "1" {
		t.Skip("not inside the pspd test VM (PSPD_IN_VM unset): run with make vmtest")
	}
}

// tool returns the full path of a host tool the harness copied in, named by its env variable.
func tool(t *testing.T, env string) string {
	t.Helper()
	p := os.Getenv(env)
	if p == "" {
		t.Fatalf("%s unset: the harness copies this tool in when the host has it (bash .ci/run installs it)", env)
	}
	return p
}

func TestMounts(t *testing.T) {
	inVM(t)
	want := map[string]int64{
		"/proc":             unix.PROC_SUPER_MAGIC,
		"/sys":              unix.SYSFS_MAGIC,
		"/dev":              unix.TMPFS_MAGIC, // devtmpfs reports the tmpfs magic
		"/run":              unix.TMPFS_MAGIC,
		"/tmp":              unix.TMPFS_MAGIC,
		"/sys/kernel/debug": unix.DEBUGFS_MAGIC,
		"/sys/fs/bpf":       unix.BPF_FS_MAGIC,
	}
	for dir, magic := range want {
		var st unix.Statfs_t
		if err := unix.Statfs(dir, &st); err != nil {
			t.Errorf("statfs %s: %v", dir, err)
			continue
		}
		if st.Type != magic {
			t.Errorf("%s: filesystem magic %#x, want %#x", dir, st.Type, magic)
		}
	}
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if lo.Flags&net.FlagUp == 0 {
		t.Error("lo is down: /init should bring it up")
	}
}

func TestPSPFamily(t *testing.T) {
	inVM(t)
	c, err := genetlink.Dial(nil)
	if err != nil {
		t.Fatalf("dial generic netlink: %v", err)
	}
	defer c.Close()
	fam, err := c.GetFamily("psp")
	if err != nil {
		t.Fatalf("resolve generic netlink family psp (CONFIG_INET_PSP): %v", err)
	}
	groups := map[string]bool{}
	for _, g := range fam.Groups {
		groups[g.Name] = true
	}
	for _, g := range []string{"mgmt", "use"} {
		if !groups[g] {
			t.Errorf("family psp (id %d) has no multicast group %q; groups: %v", fam.ID, g, fam.Groups)
		}
	}
}

// TestNetdevsimPSPDevice checks that a netdevsim port registers a PSP device, which every
// PSP conformance test builds on: a psp dev-get dump (cmd 1) must list a device whose ifindex
// (attr 2) is the port's and whose psp-versions-cap (attr 3) is non-zero.
func TestNetdevsimPSPDevice(t *testing.T) {
	inVM(t)
	dev := newNetdevsim(t, 42)
	ifi, err := net.InterfaceByName(dev)
	if err != nil {
		t.Fatal(err)
	}
	c, err := genetlink.Dial(nil)
	if err != nil {
		t.Fatalf("dial generic netlink: %v", err)
	}
	defer c.Close()
	fam, err := c.GetFamily("psp")
	if err != nil {
		t.Fatalf("resolve family psp: %v", err)
	}
	const cmdDevGet, attrIfindex, attrCap = 1, 2, 3
	msgs, err := c.Execute(genetlink.Message{Header: genetlink.Header{Command: cmdDevGet, Version: fam.Version}},
		fam.ID, mdnetlink.Request|mdnetlink.Dump)
	if err != nil {
		t.Fatalf("psp dev-get dump: %v", err)
	}
	var devs []string
	for _, m := range msgs {
		ad, err := mdnetlink.NewAttributeDecoder(m.Data)
		if err != nil {
			t.Fatalf("decode dev-get reply: %v", err)
		}
		var ifindex, capMask uint32
		for ad.Next() {
			switch ad.Type() {
			case attrIfindex:
				ifindex = ad.Uint32()
			case attrCap:
				capMask = ad.Uint32()
			}
		}
		if err := ad.Err(); err != nil {
			t.Fatalf("decode dev-get reply: %v", err)
		}
		if ifindex == uint32(ifi.Index) && capMask != 0 {
			return
		}
		devs = append(devs, fmt.Sprintf("ifindex %d cap %#x", ifindex, capMask))
	}
	t.Errorf("no PSP device for %s (ifindex %d) with a non-zero cap; dump: %v", dev, ifi.Index, devs)
}

// newNetdevsim creates a netdevsim device with one port in the current network namespace and
// returns its interface name; the device is deleted when the test ends.
func newNetdevsim(t *testing.T, id int) string {
	t.Helper()
	if err := os.WriteFile("/sys/bus/netdevsim/new_device", fmt.Appendf(nil, "%d 1", id), 0); err != nil {
		t.Fatalf("create netdevsim%d (CONFIG_NETDEVSIM): %v", id, err)
	}
	t.Cleanup(func() {
		if err := os.WriteFile("/sys/bus/netdevsim/del_device", fmt.Append(nil, id), 0); err != nil {
			t.Errorf("delete netdevsim%d: %v", id, err)
		}
	})
	// The port's netdev registers asynchronously after the write returns.
	glob := fmt.Sprintf("/sys/bus/netdevsim/devices/netdevsim%d/net/*", id)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if m, _ := filepath.Glob(glob); len(m) == 1 {
			return filepath.Base(m[0])
		}
	}
	t.Fatalf("netdevsim%d: no netdev appeared under %s", id, glob)
	return ""
}

func TestNetdevsimESPOffload(t *testing.T) {
	inVM(t)
	const id = 41
	dev := newNetdevsim(t, id)
	ip := tool(t, "PSPD_VM_IP")
	if out, err := exec.Command(ip, "link", "set", dev, "up").CombinedOutput(); err != nil {
		t.Fatalf("ip link set %s up: %v\n%s", dev, err, out)
	}
	out, err := exec.Command(tool(t, "PSPD_VM_ETHTOOL"), "-k", dev).CombinedOutput()
	if err != nil {
		t.Fatalf("ethtool -k %s: %v\n%s", dev, err, out)
	}
	if !strings.Contains(string(out), "esp-hw-offload: on") {
		t.Fatalf("ethtool -k %s does not show esp-hw-offload: on:\n%s", dev, out)
	}
	if out, err := exec.Command(ip, "addr", "add", "192.0.2.1/24", "dev", dev).CombinedOutput(); err != nil {
		t.Fatalf("ip addr add: %v\n%s", err, out)
	}
	key := make([]byte, 20)
	rand.Read(key)
	defer clear(key)
	// netdevsim accepts only crypto offload with a 128-bit ICV (kernel-vm.md).
	add := exec.Command(ip, "xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2",
		"proto", "esp", "spi", "0x1001", "mode", "transport",
		"aead", "rfc4106(gcm(aes))", fmt.Sprintf("0x%x", key), "128",
		"offload", "dev", dev, "dir", "out")
	if out, err := add.CombinedOutput(); err != nil {
		t.Fatalf("ip xfrm state add ... offload dev %s dir out: %v\n%s", dev, err, out)
	}
	defer exec.Command(ip, "xfrm", "state", "flush").Run()
	ipsec := fmt.Sprintf("/sys/kernel/debug/netdevsim/netdevsim%d/ports/0/ipsec", id)
	b, err := os.ReadFile(ipsec)
	if err != nil {
		t.Fatalf("read %s: %v", ipsec, err)
	}
	if !strings.Contains(strings.ToLower(string(b)), "1001") {
		t.Errorf("%s does not list the offloaded SA spi 0x1001:\n%s", ipsec, b)
	}
}

// inNewNetns runs fn on a locked OS thread inside a fresh network namespace.
func inNewNetns(t *testing.T, fn func(ns netns.NsHandle)) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		// The thread is left locked on purpose: it ends in a namespace other goroutines must
		// not inherit, so the runtime discards it when this goroutine exits.
		ns, err := netns.New()
		if err != nil {
			t.Errorf("create netns (CONFIG_NET_NS): %v", err)
			return
		}
		defer ns.Close()
		fn(ns)
	}()
	<-done
}

func TestESPStateInNetns(t *testing.T) {
	inVM(t)
	inNewNetns(t, func(ns netns.NsHandle) {
		h, err := netlink.NewHandleAt(ns, unix.NETLINK_XFRM)
		if err != nil {
			t.Errorf("netlink handle in netns: %v", err)
			return
		}
		defer h.Close()
		key := make([]byte, 20) // 16-byte AES key + 4-byte salt
		rand.Read(key)
		defer clear(key)
		sa := &netlink.XfrmState{
			Src:   net.ParseIP("198.51.100.1"),
			Dst:   net.ParseIP("198.51.100.2"),
			Proto: netlink.XFRM_PROTO_ESP,
			Mode:  netlink.XFRM_MODE_TRANSPORT,
			Spi:   0x2002,
			Aead:  &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: key, ICVLen: 128},
		}
		if err := h.XfrmStateAdd(sa); err != nil {
			t.Errorf("add ESP SA rfc4106(gcm(aes)) (CONFIG_INET_ESP, CONFIG_CRYPTO_GCM): %v", err)
			return
		}
		states, err := h.XfrmStateList(netlink.FAMILY_V4)
		if err != nil {
			t.Errorf("list SAs: %v", err)
			return
		}
		if len(states) != 1 || states[0].Spi != 0x2002 || states[0].Aead == nil || states[0].Aead.Name != "rfc4106(gcm(aes))" {
			t.Errorf("SA list after add: got %d states, want the one with spi 0x2002 and rfc4106(gcm(aes))", len(states))
		}
	})
}

func TestAFXDPSocket(t *testing.T) {
	inVM(t)
	fd, err := unix.Socket(unix.AF_XDP, unix.SOCK_RAW, 0)
	if err != nil {
		t.Fatalf("socket(AF_XDP) (CONFIG_XDP_SOCKETS): %v", err)
	}
	defer unix.Close(fd)
	// Registering a UMEM exercises more than the socket family: it pins user pages.
	const frame, frames = 4096, 16
	mem, err := unix.Mmap(-1, 0, frame*frames, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	reg := unix.XDPUmemReg{Addr: uint64(uintptr(unsafe.Pointer(&mem[0]))), Len: frame * frames, Size: frame}
	_, _, errno := unix.Syscall6(unix.SYS_SETSOCKOPT, uintptr(fd), unix.SOL_XDP, unix.XDP_UMEM_REG,
		uintptr(unsafe.Pointer(&reg)), unsafe.Sizeof(reg), 0)
	if errno != 0 {
		t.Fatalf("setsockopt(XDP_UMEM_REG): %v", errno)
	}
}

func TestTUN(t *testing.T) {
	inVM(t)
	f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0)
	if err != nil {
		t.Fatalf("open /dev/net/tun (CONFIG_TUN): %v", err)
	}
	defer f.Close()
	ifr, err := unix.NewIfreq("pspdvmtun0")
	if err != nil {
		t.Fatal(err)
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(int(f.Fd()), unix.TUNSETIFF, ifr); err != nil {
		t.Fatalf("TUNSETIFF: %v", err)
	}
	if _, err := net.InterfaceByName("pspdvmtun0"); err != nil {
		t.Errorf("tun device not visible: %v", err)
	}
}

// TestVethNetem checks the pieces the XFRM and data-plane tests build their links from: a veth
// pair in a fresh network namespace, and a netem qdisc for delay and loss (the host kernel has
// no netem, which is why the fragment asks for it).
func TestVethNetem(t *testing.T) {
	inVM(t)
	inNewNetns(t, func(ns netns.NsHandle) {
		h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
		if err != nil {
			t.Errorf("netlink handle in netns: %v", err)
			return
		}
		defer h.Close()
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "pspdvm-a"}, PeerName: "pspdvm-b"}
		if err := h.LinkAdd(veth); err != nil {
			t.Errorf("add veth pair (CONFIG_VETH): %v", err)
			return
		}
		link, err := h.LinkByName("pspdvm-a")
		if err != nil {
			t.Errorf("veth end: %v", err)
			return
		}
		if err := h.LinkSetUp(link); err != nil {
			t.Errorf("set veth up: %v", err)
			return
		}
		netem := netlink.NewNetem(netlink.QdiscAttrs{
			LinkIndex: link.Attrs().Index,
			Handle:    netlink.MakeHandle(1, 0),
			Parent:    netlink.HANDLE_ROOT,
		}, netlink.NetemQdiscAttrs{Latency: 1000, Loss: 5})
		if err := h.QdiscAdd(netem); err != nil {
			t.Errorf("add netem qdisc (CONFIG_NET_SCH_NETEM): %v", err)
			return
		}
		qdiscs, err := h.QdiscList(link)
		if err != nil {
			t.Errorf("list qdiscs: %v", err)
			return
		}
		for _, q := range qdiscs {
			if q.Type() == "netem" {
				return
			}
		}
		t.Errorf("no netem qdisc on pspdvm-a after adding one: %v", qdiscs)
	})
}

// TestHostTools runs each host tool the harness copied in, so a missing shared library or a
// busybox applet shadowing the real tool shows up here rather than in another package's test.
func TestHostTools(t *testing.T) {
	inVM(t)
	ip := tool(t, "PSPD_VM_IP")
	cases := []struct {
		env  string
		args []string
		want string // in the output
	}{
		{"PSPD_VM_IP", []string{"-V"}, "iproute2"},
		{"PSPD_VM_TC", []string{"-V"}, "iproute2"},
		{"PSPD_VM_SS", []string{"-V"}, "iproute2"},
		{"PSPD_VM_ETHTOOL", []string{"--version"}, "ethtool version"},
		{"PSPD_VM_TCPDUMP", []string{"--version"}, "libpcap"},
	}
	for _, c := range cases {
		t.Run(c.env, func(t *testing.T) {
			out, err := exec.Command(tool(t, c.env), c.args...).CombinedOutput()
			if err != nil || !strings.Contains(string(out), c.want) {
				t.Errorf("%s %s: %v, output lacks %q:\n%s", os.Getenv(c.env), strings.Join(c.args, " "), err, c.want, out)
			}
		})
	}
	// ip netns needs /run (tmpfs) and shared mounts: what the XFRM tests use to build topologies.
	t.Run("ip netns", func(t *testing.T) {
		ipDo := func(args ...string) string {
			t.Helper()
			out, err := exec.Command(ip, args...).CombinedOutput()
			if err != nil {
				t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
			}
			return string(out)
		}
		ipDo("netns", "add", "pspdvm-ns")
		t.Cleanup(func() { exec.Command(ip, "netns", "del", "pspdvm-ns").Run() })
		ipDo("-n", "pspdvm-ns", "link", "set", "lo", "up")
		if out := ipDo("-n", "pspdvm-ns", "-o", "link", "show", "lo"); !strings.Contains(out, "UP") {
			t.Errorf("lo in pspdvm-ns not up:\n%s", out)
		}
	})
}
