package psp

import (
	"fmt"

	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// liveSockets lists, by SO_COOKIE, the TCP sockets of namespace ns (0:
// the caller's) that an application still holds: sock_diag
// (NETLINK_SOCK_DIAG) dumps of both families. A socket the application
// closed is either gone, in TIME_WAIT/CLOSE, or an orphan the kernel
// finishes alone (inode 0); none of those can use PSP any more.
//
// A dump the kernel marked interrupted is an error: a socket missing from
// it may still be alive, and dropping its entry would lose its events.
func liveSockets(ns int) (map[uint64]struct{}, error) {
	var h *vnl.Handle
	var err error
	if ns == 0 {
		h, err = vnl.NewHandle(unix.NETLINK_SOCK_DIAG)
	} else {
		h, err = vnl.NewHandleAt(netns.NsHandle(ns), unix.NETLINK_SOCK_DIAG)
	}
	if err != nil {
		return nil, fmt.Errorf("sock_diag: %w", err)
	}
	defer h.Close()
	live := map[uint64]struct{}{}
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		socks, err := h.SocketDiagTCP(fam)
		if err != nil {
			return nil, fmt.Errorf("sock_diag TCP dump (CONFIG_INET_DIAG, CONFIG_INET_TCP_DIAG): %w", err)
		}
		for _, s := range socks {
			switch s.State {
			case tcpTimeWait, tcpClose, tcpListen:
				continue
			}
			if s.INode == 0 {
				continue
			}
			live[uint64(s.ID.Cookie[0])|uint64(s.ID.Cookie[1])<<32] = struct{}{}
		}
	}
	return live, nil
}
