package backend

import (
	"context"
	"net/netip"
	"slices"
	"time"

	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/pspd/pspd/keyexchange/identity"
)

// addrSettle is how long the address watch lets a change settle before it
// reads the routes: moving to another address is a delete and an add.
const addrSettle = 200 * time.Millisecond

// subscribeAddrs delivers this host's address changes, in the backend's
// namespace, on a channel that closes when ctx ends; nil if the kernel
// refuses (the SAs then follow a move only at the next rekey).
func (b *Backend) subscribeAddrs(ctx context.Context) <-chan vnl.AddrUpdate {
	ch := make(chan vnl.AddrUpdate, 64)
	opts := vnl.AddrSubscribeOptions{ErrorCallback: func(err error) {
		if ctx.Err() == nil {
			b.log.Warn("xfrm: address watch", "err", err)
		}
	}}
	if b.netNS != 0 {
		ns := netns.NsHandle(b.netNS)
		opts.Namespace = &ns
	}
	if err := vnl.AddrSubscribeWithOptions(ch, ctx.Done(), opts); err != nil {
		b.log.Warn("xfrm: no address watch; a peer's SAs follow this host's address changes only at the next rekey", "err", err)
		return nil
	}
	return ch
}

// localMoved asks for a new generation for every peer whose local address
// comes from the routes (pspd listens on a wildcard address) and is now
// another: the SAs in place carry the old one, which the host no longer
// has. Install moves the peer to the new address.
func (b *Backend) localMoved() {
	b.mu.Lock()
	var moved []identity.PublicKey
	for k, pr := range b.peers {
		if l := pr.cfg.Local; l.IsValid() && !l.IsUnspecified() {
			continue
		}
		next, err := b.newPeer(pr.cfg, pr.reqid, pr.mapped)
		if err != nil || next.local == pr.local {
			continue // no route now: the next change may bring one
		}
		b.log.Info("xfrm: this host's address towards the peer changed; rekeying to follow it", "peer", pr.cfg.Name, "from", pr.local, "to", next.local)
		moved = append(moved, k)
	}
	b.mu.Unlock()
	for _, k := range moved {
		select {
		case b.rekey <- k:
		default:
		}
	}
}

// refresh moves pr to the addresses it has now, if they changed: this
// host's own (a wildcard listen address takes the route's source) and,
// in tunnel mode, the peer's as its session shows it. Callers hold b.mu.
func (b *Backend) refresh(ctx context.Context, pr *peer) error {
	next, err := b.newPeer(pr.cfg, pr.reqid, pr.mapped)
	if err != nil || (next.local == pr.local && next.remote == pr.remote) {
		return nil // without a route, the addresses in place are as good a guess as any
	}
	b.log.Info("xfrm: the addresses between this host and the peer changed; its SAs and policies follow", "peer", pr.cfg.Name,
		"local", next.local, "remote", next.remote, "was_local", pr.local, "was_remote", pr.remote)
	return b.follow(ctx, pr, next)
}

// tunnels reports whether a peer at endpoint is protected in tunnel mode:
// some prefix is not its own address. Only then may its SAs run to where
// its session comes from rather than to the endpoint: tunnel mode carries
// the prefixes between wherever the hosts are, transport mode protects the
// endpoint address itself.
func tunnels(prefixes []netip.Prefix, endpoint netip.Addr) bool {
	self := netip.PrefixFrom(endpoint, endpoint.BitLen())
	return slices.ContainsFunc(prefixes, func(pf netip.Prefix) bool { return pf.Masked() != self })
}
