package netutil

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// ErrNoNeighbour means the kernel has no usable link-layer address for the
// next hop yet. Sending any packet to it through the kernel (a UDP
// datagram, a ping) starts resolution; look up again afterwards.
var ErrNoNeighbour = errors.New("netutil: next hop has no resolved link-layer address")

// NextHop is where the kernel would send an outer packet to a peer: what an
// underlay that writes its own Ethernet frames (AF_XDP) needs.
type NextHop struct {
	LinkIndex int
	LinkName  string
	LinkMTU   int
	LinkMAC   net.HardwareAddr // source MAC of the frames
	Src       netip.Addr       // the kernel's preferred source address
	Gateway   netip.Addr       // invalid when the peer is on-link
	MAC       net.HardwareAddr // destination MAC: the gateway's or the peer's
}

// Lookup asks the kernel's routing table and neighbour cache, through h
// (nil: the calling thread's namespace), how a packet to dst leaves.
func Lookup(h *netlink.Handle, dst netip.Addr) (NextHop, error) {
	if h == nil {
		h = &netlink.Handle{}
	}
	routes, err := h.RouteGet(dst.AsSlice())
	if err != nil {
		return NextHop{}, fmt.Errorf("netutil: route to %v: %w", dst, err)
	}
	if len(routes) == 0 {
		return NextHop{}, fmt.Errorf("netutil: route to %v: none", dst)
	}
	r := routes[0]
	link, err := h.LinkByIndex(r.LinkIndex)
	if err != nil {
		return NextHop{}, fmt.Errorf("netutil: route to %v: link %d: %w", dst, r.LinkIndex, err)
	}
	nh := NextHop{LinkIndex: r.LinkIndex, LinkName: link.Attrs().Name, LinkMTU: link.Attrs().MTU, LinkMAC: link.Attrs().HardwareAddr}
	nh.Src, _ = netip.AddrFromSlice(r.Src)
	nh.Src = nh.Src.Unmap()
	neigh := dst
	if gw, ok := netip.AddrFromSlice(r.Gw); ok && !gw.IsUnspecified() {
		nh.Gateway = gw.Unmap()
		neigh = nh.Gateway
	}
	family := netlink.FAMILY_V4
	if neigh.Is6() {
		family = netlink.FAMILY_V6
	}
	neighs, err := h.NeighList(r.LinkIndex, family)
	if err != nil {
		return NextHop{}, fmt.Errorf("netutil: neighbours of %s: %w", nh.LinkName, err)
	}
	for _, n := range neighs {
		ip, _ := netip.AddrFromSlice(n.IP)
		if ip.Unmap() != neigh || len(n.HardwareAddr) == 0 {
			continue
		}
		if n.State&(netlink.NUD_REACHABLE|netlink.NUD_STALE|netlink.NUD_DELAY|netlink.NUD_PROBE|netlink.NUD_PERMANENT|netlink.NUD_NOARP) != 0 {
			nh.MAC = n.HardwareAddr
			return nh, nil
		}
	}
	return nh, fmt.Errorf("netutil: next hop %v on %s toward %v: %w", neigh, nh.LinkName, dst, ErrNoNeighbour)
}
