package backend

import (
	"net"
	"net/netip"
)

// toIPNet converts to the form vishvananda/netlink takes.
func toIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
