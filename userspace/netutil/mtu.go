// Package netutil owns the userspace data plane's view of the outer
// network: the inner MTU the underlay leaves room for, and the route and
// next hop an outer packet to a peer takes.
package netutil

import (
	"fmt"
	"net/netip"
)

// Outer header sizes without options or extension headers: the data plane
// never emits either.
const (
	IPv4Header = 20
	IPv6Header = 40
	UDPHeader  = 8
)

// InnerMTU is the largest inner packet that, sealed with overhead bytes of
// framing and tag, fits one outer packet of underlayMTU to a peer at outer.
// IPv6 inner packets need at least 1280.
func InnerMTU(underlayMTU int, outer netip.Addr, overhead int) (int, error) {
	ip := IPv4Header
	if outer.Is6() && !outer.Is4In6() {
		ip = IPv6Header
	}
	if !outer.IsValid() {
		return 0, fmt.Errorf("netutil: inner MTU: outer address is not set")
	}
	mtu := underlayMTU - ip - UDPHeader - overhead
	if mtu < 576 {
		return 0, fmt.Errorf("netutil: inner MTU: underlay MTU %d leaves %d bytes after %d of outer headers and %d of overhead; want at least 576",
			underlayMTU, mtu, ip+UDPHeader, overhead)
	}
	return mtu, nil
}
