package psp

import (
	"fmt"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// TCP states (include/net/tcp_states.h), as tcp_info and sock_diag carry them.
const (
	tcpEstablished = 1
	tcpTimeWait    = 6
	tcpClose       = 7
	tcpListen      = 10
)

var tcpStateNames = [...]string{1: "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2",
	"TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV"}

func tcpStateName(s uint8) string {
	if int(s) < len(tcpStateNames) && tcpStateNames[s] != "" {
		return tcpStateNames[s]
	}
	return fmt.Sprintf("state %d", s)
}

// tuple is a TCP connection as this host sees it.
type tuple struct{ local, remote netip.AddrPort }

func (t tuple) String() string { return t.local.String() + " -> " + t.remote.String() }

// sockInfo is what an upgrade needs to know about a socket before it
// touches it.
type sockInfo struct {
	t      tuple
	cookie uint64 // SO_COOKIE: the socket's identity for as long as it lives
	state  uint8  // TCP state from tcp_info
}

// sockQueues are a socket's clear-data counters.
type sockQueues struct {
	inq  int // SIOCINQ: received, not yet read by the application
	outq int // SIOCOUTQ: written, not yet acknowledged by the peer (unsent included)
}

func control(sock syscall.Conn, f func(fd int) error) error {
	rc, err := sock.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = f(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

func inspect(sock syscall.Conn) (sockInfo, error) {
	var si sockInfo
	err := control(sock, func(fd int) error {
		typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
		if err != nil {
			return fmt.Errorf("SO_TYPE: %w", err)
		}
		proto, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
		if err != nil {
			return fmt.Errorf("SO_PROTOCOL: %w", err)
		}
		if typ != unix.SOCK_STREAM || proto != unix.IPPROTO_TCP {
			return fmt.Errorf("not a TCP socket (type %d, protocol %d)", typ, proto)
		}
		if si.cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE); err != nil {
			return fmt.Errorf("SO_COOKIE: %w", err)
		}
		ti, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			return fmt.Errorf("TCP_INFO: %w", err)
		}
		si.state = ti.State
		la, err := unix.Getsockname(fd)
		if err != nil {
			return fmt.Errorf("getsockname: %w", err)
		}
		si.t.local = addrPort(la)
		if ra, err := unix.Getpeername(fd); err == nil {
			si.t.remote = addrPort(ra)
		}
		return nil
	})
	return si, err
}

func queues(sock syscall.Conn) (sockQueues, error) {
	var q sockQueues
	err := control(sock, func(fd int) error {
		var err error
		if q.inq, err = unix.IoctlGetInt(fd, unix.SIOCINQ); err != nil {
			return fmt.Errorf("SIOCINQ: %w", err)
		}
		if q.outq, err = unix.IoctlGetInt(fd, unix.SIOCOUTQ); err != nil {
			return fmt.Errorf("SIOCOUTQ: %w", err)
		}
		return nil
	})
	return q, err
}

func addrPort(sa unix.Sockaddr) netip.AddrPort {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr).Unmap(), uint16(a.Port))
	}
	return netip.AddrPort{}
}
