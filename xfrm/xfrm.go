// Package xfrm is pspd's kernel IPsec backend: it programs ESP security
// associations (rfc4106(gcm(aes)), 128-bit ICV, ESN anti-replay) and the
// policies that steer traffic into them through NETLINK_XFRM, and owns
// exactly the kernel objects tagged with its reqid range and mark, so that
// reconciling on start never disturbs anything another daemon installed.
//
// SA adds, SPI reservations and SA reads are raw XFRM messages, because
// vishvananda/netlink has no offload attribute and does not read the ESN
// replay state back; policies go through vishvananda/netlink.
package xfrm

import (
	"errors"
	"fmt"
	"log/slog"

	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Owner is the tag that marks a kernel object as pspd's. Every SA and
// policy this package installs carries a reqid in [ReqIDMin, ReqIDMax] and
// the mark Mark/MarkMask; only objects carrying both are listed, reconciled
// or removed.
//
// The kernel matches an SA's or policy's mark against each packet's
// skb->mark as (skb->mark & MarkMask) == Mark, so Mark must be what pspd's
// traffic carries (0 for unmarked traffic) and MarkMask selects the mark
// bits reserved for pspd on this host.
type Owner struct {
	ReqIDMin, ReqIDMax uint32
	Mark, MarkMask     uint32
}

// DefaultOwner is pspd's tag unless configured otherwise: reqids 0x50530000
// to 0x5053ffff ("PS") and mark 0 under mask 0x00500000, which unmarked
// traffic matches.
func DefaultOwner() Owner {
	return Owner{ReqIDMin: 0x50530000, ReqIDMax: 0x5053ffff, Mark: 0, MarkMask: 0x00500000}
}

func (o Owner) validate() error {
	switch {
	case o.ReqIDMin == 0 || o.ReqIDMax < o.ReqIDMin:
		return fmt.Errorf("xfrm: owner reqid range [%d, %d] is empty or includes 0 (reqid 0 means 'any')", o.ReqIDMin, o.ReqIDMax)
	case o.MarkMask == 0:
		return errors.New("xfrm: owner mark mask is 0: pspd needs mark bits of its own to tell its objects apart")
	case o.Mark&^o.MarkMask != 0:
		return fmt.Errorf("xfrm: owner mark %#x has bits outside mask %#x", o.Mark, o.MarkMask)
	}
	return nil
}

func (o Owner) ownsReqID(r uint32) bool { return r >= o.ReqIDMin && r <= o.ReqIDMax }

func (o Owner) ownsMark(v, m uint32) bool { return v == o.Mark && m == o.MarkMask }

// Config configures a Handle.
type Config struct {
	// NetNS is an open network namespace file descriptor; 0 means the
	// namespace of the calling thread.
	NetNS int
	// Owner tags everything the Handle installs; the zero value means
	// DefaultOwner.
	Owner Owner
	// Offload is the default ESP offload mode for SAs that name a device.
	Offload OffloadMode
	Logger  *slog.Logger
}

// Handle programs XFRM state in one network namespace. It is safe for
// concurrent use.
type Handle struct {
	owner   Owner
	offload OffloadMode
	log     *slog.Logger
	nsFD    int
	sa      *sock       // raw NETLINK_XFRM for SAs
	pol     *vnl.Handle // policies
}

// Open connects to the kernel's XFRM netlink interface.
func Open(cfg Config) (*Handle, error) {
	if cfg.Owner == (Owner{}) {
		cfg.Owner = DefaultOwner()
	}
	if err := cfg.Owner.validate(); err != nil {
		return nil, err
	}
	if !cfg.Offload.valid() {
		return nil, fmt.Errorf("xfrm: offload mode %d is not auto, crypto or none", cfg.Offload)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	sa, err := dialSock(cfg.NetNS)
	if err != nil {
		return nil, fmt.Errorf("xfrm: open netlink socket: %w", err)
	}
	var pol *vnl.Handle
	if cfg.NetNS != 0 {
		pol, err = vnl.NewHandleAt(netns.NsHandle(cfg.NetNS), unix.NETLINK_XFRM)
	} else {
		pol, err = vnl.NewHandle(unix.NETLINK_XFRM)
	}
	if err != nil {
		sa.close()
		return nil, fmt.Errorf("xfrm: open policy netlink socket: %w", err)
	}
	return &Handle{owner: cfg.Owner, offload: cfg.Offload, log: cfg.Logger, nsFD: cfg.NetNS, sa: sa, pol: pol}, nil
}

// Owner reports the tag this Handle installs and manages.
func (h *Handle) Owner() Owner { return h.owner }

// Close releases the netlink sockets. Installed state stays in the kernel:
// a restarted owner picks it up with Reconcile.
func (h *Handle) Close() error {
	h.pol.Close()
	return h.sa.close()
}
