package xfrm

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// ListenEncap opens the ESP-in-UDP encapsulation socket on port for
// network ("udp4" or "udp6"): UDP_ENCAP set to UDP_ENCAP_ESPINUDP, so
// that the kernel takes the ESP packets arriving on it to its SAs, and
// exempted from IPsec policies like pspd's control socket (BypassSocket),
// so that what it sends is never itself encrypted or held back. The
// kernel needs CONFIG_XFRM and ESP for the family (CONFIG_INET_ESP,
// CONFIG_INET6_ESP for IPv6 since Linux 5.8). A non-zero netNS is the
// network namespace to open it in.
func ListenEncap(ctx context.Context, netNS int, network string, port uint16) (c *net.UDPConn, err error) {
	if netNS != 0 {
		_, err = inNetNS(netNS, func() (int, error) {
			c, err = ListenEncap(ctx, 0, network, port)
			return 0, err
		})
		return c, err
	}
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_ENCAP, unix.UDP_ENCAP_ESPINUDP)
		})
		if err == nil && serr != nil {
			err = fmt.Errorf("UDP_ENCAP_ESPINUDP: %w (the kernel lacks ESP in UDP: it needs CONFIG_XFRM with CONFIG_INET_ESP, and CONFIG_INET6_ESP for IPv6)", serr)
		}
		if err == nil {
			err = BypassSocket(c)
		}
		return err
	}}
	addr := netip.AddrPortFrom(netip.IPv4Unspecified(), port)
	if network == "udp6" {
		addr = netip.AddrPortFrom(netip.IPv6Unspecified(), port)
	}
	pc, err := lc.ListenPacket(ctx, network, addr.String())
	if err != nil {
		return nil, fmt.Errorf("xfrm: encapsulation socket %s %s: %w", network, addr, err)
	}
	return pc.(*net.UDPConn), nil
}
