package genl

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
	"github.com/mdlayher/netlink/nlenc"
	"github.com/pspd/pspd/internal/secret"
)

// Config selects where a Client talks.
type Config struct {
	// NetNS, if non-zero, is an open file descriptor of the network namespace
	// whose PSP devices the client sees (the kernel shows a PSP device only
	// in the namespace of its netdev). Zero means the caller's namespace.
	// It must stay open while the Client is in use: Watch opens its
	// socket there too.
	NetNS int
}

// Client talks to the kernel's psp family. It is safe for concurrent use.
type Client struct {
	c      *genetlink.Conn
	family genetlink.Family
	groups map[string]uint32

	// dialWatch opens a separate socket joined to the multicast groups
	// for Watch, so notifications never interleave with replies.
	dialWatch func(groups []uint32) (*genetlink.Conn, error)
}

// Dial opens a generic netlink socket and resolves the psp family. It
// returns an error matching ErrNoFamily when the kernel lacks PSP.
func Dial(cfg Config) (*Client, error) {
	c, err := dial(cfg)
	if err != nil {
		return nil, err
	}
	cl, err := newClient(c)
	if err != nil {
		c.Close()
		return nil, err
	}
	cl.dialWatch = func(groups []uint32) (*genetlink.Conn, error) {
		c, err := dial(cfg)
		if err != nil {
			return nil, err
		}
		for _, g := range groups {
			if err := c.JoinGroup(g); err != nil {
				c.Close()
				return nil, fmt.Errorf("psp: join multicast group %d: %w", g, err)
			}
		}
		return c, nil
	}
	return cl, nil
}

func dial(cfg Config) (*genetlink.Conn, error) {
	c, err := genetlink.Dial(&netlink.Config{NetNS: cfg.NetNS})
	if err != nil {
		return nil, fmt.Errorf("psp: dial generic netlink: %w", err)
	}
	// The kernel explains most PSP errors only in the extended ack.
	if err := c.SetOption(netlink.ExtendedAcknowledge, true); err != nil {
		c.Close()
		return nil, fmt.Errorf("psp: enable extended ack: %w", err)
	}
	return c, nil
}

// newClient resolves the family on an open connection (tests pass a
// genltest connection here).
func newClient(c *genetlink.Conn) (*Client, error) {
	f, err := c.GetFamily(familyName)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("psp: %w", ErrNoFamily)
		}
		return nil, fmt.Errorf("psp: resolve family %q: %w", familyName, err)
	}
	groups := make(map[string]uint32, len(f.Groups))
	for _, g := range f.Groups {
		groups[g.Name] = g.ID
	}
	for _, name := range []string{groupMgmt, groupUse} {
		if _, ok := groups[name]; !ok {
			return nil, fmt.Errorf("psp: family %q has no multicast group %q", familyName, name)
		}
	}
	return &Client{c: c, family: f, groups: groups}, nil
}

// Close closes the socket.
func (c *Client) Close() error { return c.c.Close() }

func (c *Client) execute(op string, cmd uint8, flags netlink.HeaderFlags, attrs []byte, devIDSent bool) ([]genetlink.Message, error) {
	msgs, err := c.c.Execute(genetlink.Message{
		Header: genetlink.Header{Command: cmd, Version: familyVersion},
		Data:   attrs,
	}, c.family.ID, flags)
	if err != nil {
		return nil, mapError(op, err, devIDSent)
	}
	return msgs, nil
}

// do runs a request that has exactly one reply message.
func (c *Client) do(op string, cmd uint8, attrs []byte, devIDSent bool) ([]byte, error) {
	msgs, err := c.execute(op, cmd, netlink.Request, attrs, devIDSent)
	if err != nil {
		return nil, err
	}
	if len(msgs) != 1 {
		return nil, fmt.Errorf("psp: %s: %d reply messages, want 1", op, len(msgs))
	}
	if got := msgs[0].Header.Command; got != cmd {
		return nil, fmt.Errorf("psp: %s: reply command %d, want %d", op, got, cmd)
	}
	return msgs[0].Data, nil
}

func encodeU32(typ uint16, v uint32) []byte {
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(typ, v)
	b, _ := ae.Encode() // cannot fail: one fixed-size attribute
	return b
}

// DevGet returns one device.
func (c *Client) DevGet(id uint32) (Device, error) {
	if err := checkDevID("dev-get id", id); err != nil {
		return Device{}, err
	}
	b, err := c.do("dev-get", cmdDevGet, encodeU32(attrDevID, id), true)
	if err != nil {
		return Device{}, err
	}
	return decodeDevice(b)
}

// Devices lists the PSP devices visible in the client's namespace.
func (c *Client) Devices() ([]Device, error) {
	return dump(c, "dev-get dump", cmdDevGet, decodeDevice)
}

// DevSet sets the versions device id accepts on receive. ena must be a
// subset of the device's capabilities (the kernel checks that).
func (c *Client) DevSet(id uint32, ena Versions) error {
	if err := checkDevID("dev-set id", id); err != nil {
		return err
	}
	if ena&^AllVersions != 0 {
		return fmt.Errorf("psp: dev-set psp-versions-ena %#x has bits beyond %#x", uint32(ena), uint32(AllVersions))
	}
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(attrDevID, id)
	ae.Uint32(attrDevVersionsEna, uint32(ena))
	b, err := ae.Encode()
	if err != nil {
		return fmt.Errorf("psp: dev-set: %w", err)
	}
	_, err = c.do("dev-set", cmdDevSet, b, true)
	return err
}

// KeyRotate rotates the device key of device id. Associations made before
// the previous rotation become stale.
func (c *Client) KeyRotate(id uint32) error {
	if err := checkDevID("key-rotate id", id); err != nil {
		return err
	}
	b, err := c.do("key-rotate", cmdKeyRotate, encodeU32(attrDevID, id), true)
	if err != nil {
		return err
	}
	got, err := decodeDevID(b)
	if err != nil {
		return err
	}
	if got != id {
		return fmt.Errorf("psp: key-rotate: reply names device %d, want %d", got, id)
	}
	return nil
}

// Stats returns device id's counters.
func (c *Client) Stats(id uint32) (Stats, error) {
	if err := checkDevID("get-stats dev-id", id); err != nil {
		return Stats{}, err
	}
	b, err := c.do("get-stats", cmdGetStats, encodeU32(attrStatsDevID, id), true)
	if err != nil {
		return Stats{}, err
	}
	return decodeStats(b)
}

// AllStats returns the counters of every visible device.
func (c *Client) AllStats() ([]Stats, error) {
	return dump(c, "get-stats dump", cmdGetStats, decodeStats)
}

func dump[T any](c *Client, op string, cmd uint8, decode func([]byte) (T, error)) ([]T, error) {
	msgs, err := c.execute(op, cmd, netlink.Request|netlink.Dump, nil, false)
	if err != nil {
		return nil, err
	}
	out := make([]T, 0, len(msgs))
	for _, m := range msgs {
		v, err := decode(m.Data)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}

// Socket is a TCP socket to bind an association to: a *net.TCPConn, an
// *os.File, or FD for a raw descriptor.
type Socket interface {
	SyscallConn() (syscall.RawConn, error)
}

// FD is a raw socket descriptor owned by the caller.
type FD int

// SyscallConn implements Socket.
func (fd FD) SyscallConn() (syscall.RawConn, error) { return rawFD(fd), nil }

type rawFD int

func (fd rawFD) Control(f func(uintptr)) error { f(uintptr(fd)); return nil }
func (rawFD) Read(func(uintptr) bool) error {
	return errors.New("psp: raw fd supports Control only")
}
func (rawFD) Write(func(uintptr) bool) error {
	return errors.New("psp: raw fd supports Control only")
}

// withFD runs f with the socket's descriptor, which stays open meanwhile.
func withFD(op string, s Socket, f func(fd uint32) error) error {
	rc, err := s.SyscallConn()
	if err != nil {
		return fmt.Errorf("psp: %s: sock-fd: %w", op, err)
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) {
		if fd > 1<<31-1 {
			ferr = fmt.Errorf("psp: %s: sock-fd %d out of range", op, fd)
			return
		}
		ferr = f(uint32(fd))
	}); err != nil {
		return fmt.Errorf("psp: %s: sock-fd: %w", op, err)
	}
	return ferr
}

// RxAssoc asks device devID (0: the device the socket's route goes
// through; needs a connected socket) for a receive SPI and key for socket s,
// and binds them to it. The returned key is what the peer must send with;
// the caller wipes it when done.
func (c *Client) RxAssoc(s Socket, v Version, devID uint32) (RxAssoc, error) {
	if err := v.check(); err != nil {
		return RxAssoc{}, err
	}
	var r RxAssoc
	err := withFD("rx-assoc", s, func(fd uint32) error {
		ae := netlink.NewAttributeEncoder()
		if devID != 0 {
			ae.Uint32(attrAssocDevID, devID)
		}
		ae.Uint32(attrAssocVersion, uint32(v))
		ae.Uint32(attrAssocSockFD, fd)
		b, err := ae.Encode()
		if err != nil {
			return fmt.Errorf("psp: rx-assoc: %w", err)
		}
		reply, err := c.do("rx-assoc", cmdRxAssoc, b, devID != 0)
		if err != nil {
			return err
		}
		// The reply buffer holds the key; it is copied into r and wiped here.
		defer secret.Zero(reply)
		r, err = decodeRxAssoc(reply)
		return err
	})
	if err != nil {
		return RxAssoc{}, err
	}
	if r.Key.Key.Len() != v.KeyLen() {
		r.Key.Wipe()
		return RxAssoc{}, fmt.Errorf("psp: rx-assoc: kernel returned a %d-byte key for %v", r.Key.Key.Len(), v)
	}
	return r, nil
}

// TxAssoc installs the peer's key k as socket s's transmit key. The socket
// must already have an Rx association of the same version and device.
func (c *Client) TxAssoc(s Socket, v Version, devID uint32, k AssocKey) error {
	if err := v.check(); err != nil {
		return err
	}
	if err := k.check(v); err != nil {
		return err
	}
	return withFD("tx-assoc", s, func(fd uint32) error {
		ae := netlink.NewAttributeEncoder()
		if devID != 0 {
			ae.Uint32(attrAssocDevID, devID)
		}
		ae.Uint32(attrAssocVersion, uint32(v))
		// Encoded by hand rather than with ae.Nested so this copy of the
		// key can be wiped.
		keys, err := netlink.MarshalAttributes([]netlink.Attribute{
			{Type: attrKeysKey, Data: k.Key.Bytes()},
			{Type: attrKeysSPI, Data: nlenc.Uint32Bytes(uint32(k.SPI))},
		})
		if err != nil {
			return fmt.Errorf("psp: tx-assoc: %w", err)
		}
		defer secret.Zero(keys)
		ae.Bytes(attrAssocTxKey|netlink.Nested, keys)
		ae.Uint32(attrAssocSockFD, fd)
		b, err := ae.Encode()
		if err != nil {
			return fmt.Errorf("psp: tx-assoc: %w", err)
		}
		defer secret.Zero(b)
		_, err = c.do("tx-assoc", cmdTxAssoc, b, devID != 0)
		return err
	})
}

// DevAssoc lets netdev ifindex use PSP device id (dev-assoc, Linux 7.3):
// sockets routed through it, e.g. a container's netkit or veth end in
// another network namespace, can then be upgraded with the device, and
// that namespace sees the device (flagged ByAssociation). nsid names the
// netdev's namespace relative to the caller's (RTM_NEWNSID); -1 means
// the caller's own. Only the device's own namespace may name another.
func (c *Client) DevAssoc(id, ifindex uint32, nsid int32) error {
	return c.devAssoc("dev-assoc", cmdDevAssoc, id, ifindex, nsid)
}

// DevDisassoc undoes DevAssoc (dev-disassoc, Linux 7.3).
func (c *Client) DevDisassoc(id, ifindex uint32, nsid int32) error {
	return c.devAssoc("dev-disassoc", cmdDevDisassoc, id, ifindex, nsid)
}

func (c *Client) devAssoc(op string, cmd uint8, id, ifindex uint32, nsid int32) error {
	if err := checkDevID(op+" id", id); err != nil {
		return err
	}
	if ifindex == 0 {
		return fmt.Errorf("psp: %s: ifindex must be >= 1", op)
	}
	if nsid < -1 {
		return fmt.Errorf("psp: %s: nsid %d: want -1 (this namespace) or an assigned nsid >= 0", op, nsid)
	}
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(attrDevID, id)
	ae.Uint32(attrDevIfindex, ifindex)
	if nsid >= 0 {
		ae.Int32(attrDevNSID, nsid)
	}
	b, err := ae.Encode()
	if err != nil {
		return fmt.Errorf("psp: %s: %w", op, err)
	}
	_, err = c.do(op, cmd, b, true)
	return err
}
