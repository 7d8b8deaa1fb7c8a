package userspace

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/pspd/pspd/userspace/codec"
	"github.com/pspd/pspd/userspace/frame"
	"github.com/pspd/pspd/userspace/netutil"
	"github.com/pspd/pspd/userspace/xdp"
	"github.com/pspd/pspd/userspace/xsk"
)

// XDPConfig configures an AF_XDP underlay.
type XDPConfig struct {
	// Ifindex is the underlay interface; it must be Ethernet.
	Ifindex int
	// Queue is the receive queue to bind. Data-plane packets the NIC
	// steers to other queues pass to the kernel, so configure the NIC
	// (RSS, or ethtool -L) to use this one.
	Queue int
	// Ports are the UDP ports to steer to the socket; default both
	// framings' ports.
	Ports []uint16
	// Mode is the XDP attach mode; Auto tries native, then generic.
	Mode xdp.Mode
	// Socket sizes the UMEM and rings.
	Socket xsk.Config
	// Port is this host's data-plane UDP port: the source port of every
	// datagram, which the peer uses to tell this host's packets apart.
	Port uint16
	// Netlink looks up routes and neighbours in the interface's
	// namespace; nil uses the calling thread's.
	Netlink *netlink.Handle
}

// XDPStats counts what the AF_XDP underlay dropped itself.
type XDPStats struct {
	RXMalformed  uint64 // redirected frame that is not Ethernet/IP/UDP
	RXNoRoom     uint64 // payload larger than the engine's buffer
	TXUnresolved uint64 // no route via this interface or no next-hop MAC
	TXTooBig     uint64 // frame larger than a UMEM frame
	TXNoFrame    uint64 // every TX frame in flight
	Socket       xsk.Stats
	// Counters are the socket's system calls and batches.
	Counters xsk.Counters
}

// hopTTL bounds how long a resolved next hop is used before the neighbour
// table is asked again, so a peer whose MAC changes is followed.
const hopTTL = 10 * time.Second

type hop struct {
	mac     frame.MAC
	src     netip.Addr
	expires time.Time
}

// XDPUnderlay sends and receives the data plane's UDP payloads as raw
// Ethernet frames on an AF_XDP socket, with the XDP program steering the
// data-plane ports to it and everything else to the kernel.
type XDPUnderlay struct {
	sock    *xsk.Socket
	prog    *xdp.Program
	nl      *netlink.Handle
	port    uint16
	ifindex int
	srcMAC  frame.MAC

	closed atomic.Bool
	rxMu   sync.Mutex // held by ReadBatch; Close waits for it
	txMu   sync.Mutex // held by WriteBatch; Close waits for it
	rxD    []xsk.Desc
	txD    []xsk.Desc
	hops   map[netip.Addr]hop // used under txMu only

	rxMalformed, rxNoRoom, txUnresolved, txTooBig, txNoFrame atomic.Uint64
}

// NewXDPUnderlay loads and attaches the XDP program, opens the AF_XDP socket
// and registers it. Call it on a thread in the interface's network
// namespace: the kernel resolves ifindex there. On error nothing stays
// attached or open.
func NewXDPUnderlay(cfg XDPConfig) (u *XDPUnderlay, err error) {
	if len(cfg.Ports) == 0 {
		cfg.Ports = []uint16{codec.Geneve.Port(), codec.PSPTunnel.Port()}
	}
	if cfg.Port == 0 {
		return nil, errors.New("userspace: AF_XDP underlay needs the local data-plane port")
	}
	u = &XDPUnderlay{nl: cfg.Netlink, port: cfg.Port, ifindex: cfg.Ifindex, hops: map[netip.Addr]hop{},
		rxD: make([]xsk.Desc, maxXDPBatch), txD: make([]xsk.Desc, maxXDPBatch)}
	link, err := u.linkByIndex(cfg.Ifindex)
	if err != nil {
		return nil, fmt.Errorf("userspace: AF_XDP underlay: interface %d: %w", cfg.Ifindex, err)
	}
	if len(link.Attrs().HardwareAddr) != len(u.srcMAC) {
		return nil, fmt.Errorf("userspace: AF_XDP underlay: %s is not an Ethernet interface", link.Attrs().Name)
	}
	copy(u.srcMAC[:], link.Attrs().HardwareAddr)
	defer func() {
		if err != nil {
			u.Close()
			u = nil
		}
	}()
	if u.prog, err = xdp.Load(cfg.Queue+1, cfg.Ports); err != nil {
		return u, err
	}
	// The socket binds before the program attaches, so a socket the
	// driver refuses (cfg.Socket.Bind requiring zero-copy) leaves the
	// interface untouched.
	if u.sock, err = xsk.Open(cfg.Ifindex, cfg.Queue, cfg.Socket); err != nil {
		return u, err
	}
	if err = u.prog.Attach(cfg.Ifindex, cfg.Mode); err != nil {
		return u, err
	}
	if err = u.prog.Register(cfg.Queue, u.sock.FD()); err != nil {
		return u, err
	}
	return u, nil
}

// Mode is the XDP attach mode in use.
func (u *XDPUnderlay) Mode() xdp.Mode { return u.prog.Mode() }

// ZeroCopy reports whether the socket runs in zero-copy mode (the driver
// uses the UMEM directly) rather than copy mode.
func (u *XDPUnderlay) ZeroCopy() bool { return u.sock.ZeroCopy() }

// ReadBatch waits for frames, copies the UDP payload of each into
// msgs[i].Buf[Off:] and returns the frames to the kernel.
func (u *XDPUnderlay) ReadBatch(msgs []Message) (int, error) {
	u.rxMu.Lock()
	defer u.rxMu.Unlock()
	want := min(len(msgs), len(u.rxD))
	for {
		if u.closed.Load() {
			return 0, fmt.Errorf("userspace: AF_XDP underlay: %w", net.ErrClosed)
		}
		n := u.sock.Receive(u.rxD[:want])
		if n == 0 {
			// Close interrupts the wait.
			if err := u.sock.WaitRX(-1); err != nil {
				if u.closed.Load() {
					return 0, fmt.Errorf("userspace: AF_XDP underlay: %w", net.ErrClosed)
				}
				return 0, err
			}
			continue
		}
		out := 0
		for _, d := range u.rxD[:n] {
			et, ip, err := frame.ParseEthernet(u.sock.Frame(d))
			if err != nil || (et != frame.EtherTypeIPv4 && et != frame.EtherTypeIPv6) {
				u.rxMalformed.Add(1)
				continue
			}
			h, err := frame.ParseIPUDP(ip)
			if err != nil {
				u.rxMalformed.Add(1)
				continue
			}
			m := &msgs[out]
			if m.Off < 0 || len(m.Buf)-m.Off < h.Len {
				u.rxNoRoom.Add(1)
				continue
			}
			m.N = copy(m.Buf[m.Off:], ip[h.Off:h.Off+h.Len])
			m.Addr = netip.AddrPortFrom(h.Src.Addr().Unmap(), h.Src.Port())
			out++
		}
		if err := u.sock.Release(u.rxD[:n]); err != nil {
			return out, err
		}
		if out > 0 {
			return out, nil
		}
	}
}

// errDropped reports datagrams WriteBatch dropped (counted in Stats).
var errDropped = errors.New("userspace: AF_XDP underlay dropped datagrams")

// txRetries bounds how often WriteBatch waits for TX frames to complete.
const txRetries = 100

// WriteBatch frames each payload in Ethernet/IP/UDP towards its peer's next
// hop and transmits the batch. It returns how many were queued; if some were
// dropped, the error says so and Stats counts why.
func (u *XDPUnderlay) WriteBatch(msgs []Message) (int, error) {
	u.txMu.Lock()
	defer u.txMu.Unlock()
	if u.closed.Load() {
		return 0, fmt.Errorf("userspace: AF_XDP underlay: %w", net.ErrClosed)
	}
	sent, dropped := 0, false
	for i, tries := 0, 0; i < len(msgs); {
		k := u.sock.AllocTX(u.txD[:min(len(msgs)-i, len(u.txD))])
		if k == 0 {
			if tries++; tries > txRetries {
				u.txNoFrame.Add(uint64(len(msgs) - i))
				return sent, errDropped
			}
			u.sock.Flush()
			time.Sleep(10 * time.Microsecond)
			continue
		}
		// Frames built stay at the front of txD, frames of dropped
		// datagrams go to the back, so the batch goes out in one Transmit.
		q, back := 0, k
		for q < back {
			m := &msgs[i]
			i++
			if n, ok := u.build(u.sock.Frame(u.txD[q]), m); ok {
				u.txD[q].Len = uint32(n)
				q++
			} else {
				dropped = true
				back--
				u.txD[q], u.txD[back] = u.txD[back], u.txD[q]
			}
		}
		u.sock.FreeTX(u.txD[back:k])
		n, err := u.sock.Transmit(u.txD[:q])
		u.sock.FreeTX(u.txD[n:q])
		sent += n
		if n < q {
			dropped = true
			u.txNoFrame.Add(uint64(q - n))
		}
		if err != nil && !errors.Is(err, xsk.ErrTXBusy) {
			return sent, err
		}
	}
	if dropped {
		return sent, errDropped
	}
	return sent, nil
}

// build writes m as a complete frame into f and returns its length.
func (u *XDPUnderlay) build(f []byte, m *Message) (int, bool) {
	dst := netip.AddrPortFrom(m.Addr.Addr().Unmap(), m.Addr.Port())
	h, ok := u.hop(dst.Addr())
	if !ok {
		u.txUnresolved.Add(1)
		return 0, false
	}
	hl := frame.HeaderLen(dst.Addr())
	if m.N <= 0 || m.Off < 0 || m.Off+m.N > len(m.Buf) || hl+m.N > cap(f) {
		u.txTooBig.Add(1)
		return 0, false
	}
	f = f[:cap(f)]
	copy(f[hl:], m.Buf[m.Off:m.Off+m.N])
	et := uint16(frame.EtherTypeIPv4)
	if !dst.Addr().Is4() {
		et = frame.EtherTypeIPv6
	}
	frame.PutEthernet(f, h.mac, u.srcMAC, et)
	frame.PutIPUDP(f[frame.EthLen:], netip.AddrPortFrom(h.src, u.port), dst, m.N)
	return hl + m.N, true
}

// hop returns the next hop's MAC and the source address for dst, resolving
// through the kernel when the cache has no fresh entry.
func (u *XDPUnderlay) hop(dst netip.Addr) (hop, bool) {
	now := time.Now()
	if h, ok := u.hops[dst]; ok && now.Before(h.expires) {
		return h, true
	}
	nh, err := netutil.Lookup(u.nl, dst)
	if errors.Is(err, netutil.ErrNoNeighbour) {
		// Ask the kernel to resolve it and wait briefly: on first contact
		// with a peer on the link this takes well under a millisecond,
		// and the queue stalls only that once. A peer that does not
		// answer costs its packet, counted as unresolved.
		u.solicit(nh, dst)
		for deadline := now.Add(resolveWait); errors.Is(err, netutil.ErrNoNeighbour) && time.Now().Before(deadline); {
			time.Sleep(time.Millisecond)
			nh, err = netutil.Lookup(u.nl, dst)
		}
	}
	if err != nil || nh.LinkIndex != u.ifindex || len(nh.MAC) != len(frame.MAC{}) {
		return hop{}, false
	}
	h := hop{src: nh.Src, expires: now.Add(hopTTL)}
	copy(h.mac[:], nh.MAC)
	u.hops[dst] = h
	return h, true
}

// solicit asks the kernel to resolve the next hop's link-layer address:
// RTM_NEWNEIGH with NTF_USE sends an ARP request or neighbour
// solicitation, in the interface's namespace.
func (u *XDPUnderlay) solicit(nh netutil.NextHop, dst netip.Addr) {
	ip := dst
	if nh.Gateway.IsValid() {
		ip = nh.Gateway
	}
	fam := netlink.FAMILY_V4
	if !ip.Is4() {
		fam = netlink.FAMILY_V6
	}
	n := &netlink.Neigh{LinkIndex: u.ifindex, IP: ip.AsSlice(), Flags: netlink.NTF_USE, Family: fam}
	if u.nl != nil {
		u.nl.NeighSet(n)
	} else {
		netlink.NeighSet(n)
	}
}

func (u *XDPUnderlay) linkByIndex(i int) (netlink.Link, error) {
	if u.nl != nil {
		return u.nl.LinkByIndex(i)
	}
	return netlink.LinkByIndex(i)
}

// resolveWait bounds how long a send waits for a neighbour to resolve.
const resolveWait = 100 * time.Millisecond

// maxXDPBatch bounds the descriptors one ReadBatch or WriteBatch handles.
const maxXDPBatch = 256

// Stats returns the underlay's own drop counters and the socket's.
func (u *XDPUnderlay) Stats() XDPStats {
	s := XDPStats{RXMalformed: u.rxMalformed.Load(), RXNoRoom: u.rxNoRoom.Load(),
		TXUnresolved: u.txUnresolved.Load(), TXTooBig: u.txTooBig.Load(), TXNoFrame: u.txNoFrame.Load()}
	if u.sock != nil {
		s.Socket, _ = u.sock.Stats()
		s.Counters = u.sock.Counters()
	}
	return s
}

// Close detaches the program (data-plane packets go to the kernel again),
// waits for a ReadBatch or WriteBatch in progress, and frees the socket.
func (u *XDPUnderlay) Close() error {
	if u.closed.Swap(true) {
		return nil
	}
	var errs []error
	if u.prog != nil {
		errs = append(errs, u.prog.Close())
	}
	if u.sock != nil {
		u.sock.Interrupt()
	}
	u.rxMu.Lock()
	u.txMu.Lock()
	defer u.rxMu.Unlock()
	defer u.txMu.Unlock()
	if u.sock != nil {
		errs = append(errs, u.sock.Close())
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("userspace: close AF_XDP underlay: %w", err)
	}
	return nil
}
