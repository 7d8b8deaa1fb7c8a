package xfrm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"sync"

	"github.com/pspd/pspd/internal/secret"
	"golang.org/x/sys/unix"
)

// sock is a minimal NETLINK_XFRM request socket. It exists, instead of a
// general netlink library, so that the buffers carrying key material (the
// request written and the GETSA answers read) are ours to wipe.
type sock struct {
	mu  sync.Mutex
	fd  int
	seq uint32
	buf []byte // receive buffer, wiped after every request
}

// dialSock opens a NETLINK_XFRM socket in the namespace nsFD (0: the
// caller's).
func dialSock(nsFD int) (*sock, error) {
	fd, err := inNetNS(nsFD, func() (int, error) {
		return unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_XFRM)
	})
	if err != nil {
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	// Extended acks give the kernel's reason ("Requested AEAD algorithm
	// not found") instead of a bare errno.
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_EXT_ACK, 1)
	return &sock{fd: fd, buf: make([]byte, 1<<16)}, nil
}

// inNetNS runs f on a fresh thread switched into the namespace nsFD.
// Sockets keep the namespace they were created in. If the thread cannot
// be switched back it stays locked, so the runtime discards it with its
// goroutine instead of reusing it in the wrong namespace.
func inNetNS(nsFD int, f func() (int, error)) (int, error) {
	if nsFD == 0 {
		return f()
	}
	type result struct {
		v   int
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{-1, err}
			return
		}
		defer unix.Close(orig)
		if err := unix.Setns(nsFD, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- result{-1, fmt.Errorf("setns: %w", err)}
			return
		}
		v, err := f()
		if unix.Setns(orig, unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		ch <- result{v, err}
	}()
	r := <-ch
	return r.v, r.err
}

func (s *sock) close() error { return unix.Close(s.fd) }

// kernelError is a netlink error answer with the kernel's extended-ack
// message when it sent one.
type kernelError struct {
	errno unix.Errno
	msg   string
}

func (e *kernelError) Error() string {
	if e.msg != "" {
		return e.msg + ": " + e.errno.Error()
	}
	return e.errno.Error()
}

func (e *kernelError) Unwrap() error { return e.errno }

// do sends one request (msg is the payload after the netlink header) and
// calls each for every answer message of the dump, or waits for the ack.
// msg is wiped before do returns: callers put key material in it.
func (s *sock) do(typ uint16, flags uint16, msg []byte, each func(typ uint16, b []byte) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	defer secret.Zero(s.buf)
	s.seq++
	seq := s.seq
	req := make([]byte, unix.NLMSG_HDRLEN+len(msg))
	defer secret.Zero(req)
	binary.NativeEndian.PutUint32(req[0:4], uint32(len(req)))
	binary.NativeEndian.PutUint16(req[4:6], typ)
	binary.NativeEndian.PutUint16(req[6:8], flags|unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	binary.NativeEndian.PutUint32(req[8:12], seq)
	copy(req[unix.NLMSG_HDRLEN:], msg)
	secret.Zero(msg)
	if err := unix.Sendto(s.fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	var cbErr error
	for {
		n, _, err := unix.Recvfrom(s.fd, s.buf, 0)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return err
		}
		b := s.buf[:n]
		for len(b) >= unix.NLMSG_HDRLEN {
			l := int(binary.NativeEndian.Uint32(b[0:4]))
			if l < unix.NLMSG_HDRLEN || l > len(b) {
				return fmt.Errorf("netlink: malformed message length %d", l)
			}
			mt := binary.NativeEndian.Uint16(b[4:6])
			mseq := binary.NativeEndian.Uint32(b[8:12])
			body := b[unix.NLMSG_HDRLEN:l]
			if next := nlmAlign(l); next < len(b) {
				b = b[next:]
			} else {
				b = nil
			}
			if mseq != seq {
				continue // a stale answer to an abandoned request
			}
			switch mt {
			case unix.NLMSG_DONE:
				return cbErr
			case unix.NLMSG_ERROR:
				if len(body) < 4 {
					return errors.New("netlink: short error message")
				}
				code := int32(binary.NativeEndian.Uint32(body[0:4]))
				if code == 0 {
					if flags&unix.NLM_F_DUMP != 0 {
						continue // dumps end with DONE
					}
					return cbErr
				}
				return &kernelError{errno: unix.Errno(-code), msg: extAckMsg(body)}
			default:
				if each != nil && cbErr == nil {
					cbErr = each(mt, body)
				}
			}
		}
	}
}

func nlmAlign(n int) int { return (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }

// extAckMsg finds NLMSGERR_ATTR_MSG after the echoed request header in an
// error answer.
func extAckMsg(body []byte) string {
	if len(body) < 4+unix.NLMSG_HDRLEN {
		return ""
	}
	l := int(binary.NativeEndian.Uint32(body[4:8]))
	// Without NLM_F_CAPPED the whole request is echoed; we only need its
	// length to skip it, and it is wiped with the receive buffer.
	off := 4 + unix.NLMSG_HDRLEN
	if flags := binary.NativeEndian.Uint16(body[10:12]); flags&unix.NLM_F_CAPPED == 0 {
		off = 4 + nlmAlign(l)
	}
	if off > len(body) {
		return ""
	}
	for _, a := range parseAttrs(body[off:]) {
		if a.typ == unix.NLMSGERR_ATTR_MSG {
			m := a.data
			for len(m) > 0 && m[len(m)-1] == 0 {
				m = m[:len(m)-1]
			}
			return string(m)
		}
	}
	return ""
}

type attr struct {
	typ  uint16
	data []byte
}

// parseAttrs splits netlink attributes, stopping at the first malformed
// one: everything it returns is in bounds.
func parseAttrs(b []byte) []attr {
	var out []attr
	for len(b) >= 4 {
		l := int(binary.NativeEndian.Uint16(b[0:2]))
		if l < 4 || l > len(b) {
			break
		}
		out = append(out, attr{typ: binary.NativeEndian.Uint16(b[2:4]) & nlaTypeMask, data: b[4:l]})
		next := (l + unix.NLA_ALIGNTO - 1) &^ (unix.NLA_ALIGNTO - 1)
		if next >= len(b) {
			break
		}
		b = b[next:]
	}
	return out
}

// appendAttr appends one attribute, padded.
func appendAttr(b []byte, typ uint16, data []byte) []byte {
	l := 4 + len(data)
	b = binary.NativeEndian.AppendUint16(b, uint16(l))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, data...)
	for i := l; i%unix.NLA_ALIGNTO != 0; i++ {
		b = append(b, 0)
	}
	return b
}

// Constants from the kernel's uapi that golang.org/x/sys does not export.
const (
	nlaTypeMask   = 0x3fff // ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)
	ethSSFeatures = 4      // ETH_SS_FEATURES
	ethGstringLen = 32     // ETH_GSTRING_LEN
	xfrmStateESN  = 128    // XFRM_STATE_ESN
)
