package xfrm

import (
	"fmt"
	"math"
	"syscall"

	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// BypassSocket exempts one socket from every IPsec policy, in both
// directions, with per-socket "allow" policies (the way IKE daemons keep
// their own traffic out of the tunnels they negotiate). pspd's control
// socket needs it: a transport-mode policy between two hosts covers the
// QUIC packets that carry the keys, and with no SA yet, or with the peer's
// SAs gone after a restart, the hosts could never talk again.
//
// A socket policy matches one address family. A dual-stack IPv6 socket
// also carries IPv4 traffic that such a policy does not match, so callers
// use one socket per family (keyexchange binds [::] as two).
func BypassSocket(c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		domain, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN)
		if err != nil {
			serr = err
			return
		}
		level, opt := unix.SOL_IP, unix.IP_XFRM_POLICY
		if domain == unix.AF_INET6 {
			level, opt = unix.SOL_IPV6, unix.IPV6_XFRM_POLICY
		}
		for _, dir := range []vnl.Dir{vnl.XFRM_DIR_IN, vnl.XFRM_DIR_OUT} {
			p := nl.XfrmUserpolicyInfo{Dir: uint8(dir), Action: uint8(vnl.XFRM_POLICY_ALLOW)}
			p.Sel.Family = uint16(domain)
			p.Lft = nl.XfrmLifetimeCfg{
				SoftByteLimit: math.MaxUint64, HardByteLimit: math.MaxUint64,
				SoftPacketLimit: math.MaxUint64, HardPacketLimit: math.MaxUint64,
			}
			if err := unix.SetsockoptString(int(fd), level, opt, string(p.Serialize())); err != nil {
				serr = fmt.Errorf("xfrm: bypass policy (dir %d) on socket: %w", dir, err)
				return
			}
		}
	})
	if err != nil {
		return fmt.Errorf("xfrm: bypass policy: %w", err)
	}
	return serr
}
