package genl

import (
	"errors"
	"fmt"
	"strings"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Sentinel errors. A kernel error is returned as *Error, which matches one of
// these and also the raw unix.Errno with errors.Is.
var (
	ErrNoFamily            = errors.New("kernel has no generic netlink family psp (CONFIG_INET_PSP)")
	ErrNoDevice            = errors.New("no such PSP device")
	ErrBusy                = errors.New("socket busy")
	ErrHasPSPState         = errors.New("socket already has PSP state (rx-assoc done before)")
	ErrTxKeySet            = errors.New("socket already has a PSP transmit key")
	ErrNotConnected        = errors.New("socket is not an established TCP connection")
	ErrIncompatibleState   = errors.New("socket has the kernel TLS ULP, which excludes PSP")
	ErrVersionUnsupported  = errors.New("PSP version not supported by the device")
	ErrVersionMismatch     = errors.New("PSP version differs from the socket's Rx association")
	ErrNotTCP              = errors.New("socket is not TCP")
	ErrDevMismatch         = errors.New("device id does not match the socket")
	ErrDevRequired         = errors.New("socket has no PSP device route: dev-id required")
	ErrNoRxKey             = errors.New("socket has no Rx association")
	ErrInvalidKey          = errors.New("invalid key")
	ErrInvalidSPI          = errors.New("invalid SPI")
	ErrNoSettings          = errors.New("no settings in request")
	ErrPermission          = errors.New("operation needs CAP_NET_ADMIN")
	ErrInvalid             = errors.New("invalid request")
	ErrIncompatibleSegment = errors.New("socket has clear-text segments queued")
	// ErrNoDevAssoc: the kernel's psp family has no dev-assoc or
	// dev-disassoc (they came with Linux 7.3).
	ErrNoDevAssoc = errors.New("kernel has no PSP dev-assoc (giving other network namespaces a device needs Linux 7.3)")
	// ErrAssociated: the netdev of a dev-assoc is associated with a PSP
	// device already (this one or another).
	ErrAssociated = errors.New("netdev already associated with a PSP device")
)

// Error is an error the kernel returned for a request. Message is the
// kernel's extended-ack text (may be empty).
type Error struct {
	Op      string     // command name, e.g. "rx-assoc"
	Kind    error      // one of the sentinels above
	Errno   unix.Errno // the kernel's error number
	Message string     // extack message
	Offset  int        // extack offset of the offending attribute, if any
}

func (e *Error) Error() string {
	s := fmt.Sprintf("psp: %s: %v (%s)", e.Op, e.Kind, unix.ErrnoName(e.Errno))
	if e.Message != "" {
		s += fmt.Sprintf(": kernel: %q", e.Message)
	}
	return s
}

// Unwrap lets errors.Is match both the sentinel and the errno.
func (e *Error) Unwrap() []error { return []error{e.Kind, e.Errno} }

// extack texts from net/psp/psp_nl.c and psp_sock.c that pick a sentinel
// more precise than the errno alone.
var messageKinds = []struct {
	errno unix.Errno
	text  string
	kind  error
}{
	{unix.EINVAL, "device id vs socket mismatch", ErrDevMismatch},
	{unix.EINVAL, "rx key from different device", ErrDevMismatch},
	{unix.EINVAL, "socket has no rx key", ErrNoRxKey},
	{unix.EINVAL, "psp version mismatch", ErrVersionMismatch},
	{unix.EINVAL, "versions not supported", ErrVersionUnsupported},
	{unix.EINVAL, "incorrect key length", ErrInvalidKey},
	{unix.EINVAL, "invalid spi", ErrInvalidSPI},
	{unix.EINVAL, "no settings present", ErrNoSettings},
	{unix.EOPNOTSUPP, "unsupported socket family", ErrNotTCP},
	{unix.EINVAL, "socket has incompatible state", ErrIncompatibleState},
	{unix.EBUSY, "incompatible segments", ErrIncompatibleSegment},
	{unix.EBUSY, "tx key already set", ErrTxKeySet},
	{unix.EBUSY, "already has psp state", ErrHasPSPState},
	{unix.EBUSY, "already associated with a psp device", ErrAssociated},
}

// mapError turns a netlink error into *Error. devIDSent tells whether the
// request carried a dev-id: the kernel reports a missing one as a bare
// EINVAL with only a "missing attribute" extack, which mdlayher/netlink does
// not expose.
func mapError(op string, err error, devIDSent bool) error {
	var oe *netlink.OpError
	if !errors.As(err, &oe) {
		return fmt.Errorf("psp: %s: %w", op, err)
	}
	var errno unix.Errno
	if !errors.As(oe.Err, &errno) || oe.Op != "receive" {
		return fmt.Errorf("psp: %s: %w", op, err)
	}
	e := &Error{Op: op, Errno: errno, Message: oe.Message, Offset: oe.Offset}
	low := strings.ToLower(oe.Message)
	for _, mk := range messageKinds {
		if mk.errno == errno && strings.Contains(low, mk.text) {
			e.Kind = mk.kind
			return e
		}
	}
	switch {
	case errno == unix.EOPNOTSUPP && (op == "dev-assoc" || op == "dev-disassoc"):
		// genetlink's answer to a command the family does not have.
		e.Kind = ErrNoDevAssoc
		return e
	}
	switch errno {
	case unix.ENODEV, unix.ENOENT:
		e.Kind = ErrNoDevice
	case unix.EBUSY:
		e.Kind = ErrBusy
	case unix.EOPNOTSUPP:
		e.Kind = ErrVersionUnsupported
	case unix.ENOTCONN:
		e.Kind = ErrNotConnected
	case unix.EPERM:
		e.Kind = ErrPermission
	case unix.EINVAL:
		if (op == "rx-assoc" || op == "tx-assoc") && !devIDSent && oe.Message == "" {
			e.Kind = ErrDevRequired
		} else {
			e.Kind = ErrInvalid
		}
	default:
		e.Kind = ErrInvalid
	}
	return e
}
