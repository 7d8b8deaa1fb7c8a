package userspace

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pspd/pspd/userspace/codec"
)

// TUN is the inner interface: one IP packet per buffer. Package
// userspace/tun implements it.
type TUN interface {
	// ReadBatch blocks until a packet is readable, then reads up to
	// len(bufs) packets: packet i is bufs[i][:lens[i]].
	ReadBatch(bufs [][]byte, lens []int) (int, error)
	// WriteBatch writes packets and returns how many were written; on an
	// error the packet at that index failed.
	WriteBatch(pkts [][]byte) (int, error)
	Close() error
}

// DefaultBatch is the number of packets moved per syscall when
// Config.Batch is zero.
const DefaultBatch = 64

// maxPayload sizes receive buffers so the underlay never truncates a UDP
// payload: a truncated packet would only fail authentication, but the
// counter would blame the wrong thing.
const maxPayload = 65535

// Config configures a Dataplane. Once Start succeeds the Dataplane owns TUN
// and Underlay and closes them in Close; if it fails the caller still does.
type Config struct {
	TUN      TUN
	Underlay Underlay
	// MTU is the inner MTU the TUN device was created with; netutil.InnerMTU
	// computes it from the underlay.
	MTU int
	// Framing of every peer's codec; the underlay receives on its port.
	Framing codec.Framing
	// Batch is how many packets one syscall moves. Default DefaultBatch.
	Batch int
	// Logger receives loop errors and recovered panics. Default: discard.
	Logger *slog.Logger
}

// Peer is one remote end of the tunnel.
type Peer struct {
	// Endpoint is the peer's configured outer address and UDP port: where
	// its packets are sent until a packet that authenticated under its
	// codec arrives from another address (roaming, NAT rebinding), and the
	// key by which UpdatePeer and RemovePeer name the peer.
	Endpoint netip.AddrPort
	// Prefixes are the inner addresses the peer may send from and that are
	// routed to it (cryptokey routing). Each must be masked.
	Prefixes []netip.Prefix
	// Codec holds the peer's SAs. The caller keeps ownership: RemovePeer
	// and Close do not close it.
	Codec *codec.Codec
	// Keepalive, when set, is how long the peer may be sent nothing
	// before it is sent a keep-alive (keepalive.go): for a host behind a
	// NAT. Its resolution is a second.
	Keepalive time.Duration
}

// Drop says why the engine, rather than the codec, dropped a packet.
type Drop uint8

const (
	DropNoPeer        Drop = iota // TX: no peer's prefix holds the destination; RX: no peer has the packet's SPI
	DropNotIP                     // TX: a TUN packet too short or not IPv4/IPv6
	DropSrcNotAllowed             // RX: the inner source is outside the sending peer's prefixes
	DropTUNWrite                  // RX: writing to the TUN device failed
	DropUnderlayWrite             // TX: the underlay refused the payload
	DropPanic                     // a queue loop recovered from a panic; its batch is lost
	NumDrops
)

var dropNames = [NumDrops]string{"no-peer", "not-ip", "src-not-allowed", "tun-write-error", "underlay-write-error", "panic"}

// String is a stable lower-case name, suitable as a metrics label.
func (d Drop) String() string {
	if d < NumDrops {
		return dropNames[d]
	}
	return fmt.Sprintf("drop(%d)", uint8(d))
}

// Stats is a snapshot of the engine's counters.
type Stats struct {
	// Drops counts packets that could not be attributed to a peer.
	Drops [NumDrops]uint64
	Peers []PeerStats
}

// PeerStats is one peer's share of Stats.
type PeerStats struct {
	Endpoint  netip.AddrPort // as configured
	Current   netip.AddrPort // where packets go now: Endpoint, or where the peer roamed to
	Roams     uint64         // times Current moved
	TXPackets uint64         // handed to the underlay
	RXPackets uint64         // written to the TUN device
	// Keepalives counts the keep-alives sent to the peer (not in
	// TXPackets).
	Keepalives uint64
	// LastTX and LastRX are when the last packet went to the underlay and
	// when the last authenticated one went to the TUN device; zero if none
	// has.
	LastTX, LastRX time.Time
	Drops          [NumDrops]uint64
	Codec          codec.Stats
}

type counters [NumDrops]atomic.Uint64

func (c *counters) snapshot() (s [NumDrops]uint64) {
	for i := range c {
		s[i] = c[i].Load()
	}
	return s
}

type peer struct {
	Peer
	drops          counters
	txPkts, rxPkts atomic.Uint64
	// lastTX and lastRX are Unix nanoseconds, read once per batch: the
	// packet path reads no clock per packet.
	lastTX, lastRX atomic.Int64
	keepalives     atomic.Uint64
	// roam is shared by the entries UpdatePeer makes for one peer while
	// its configured endpoint stays.
	roam *roaming
}

func newPeer(p Peer, r *roaming) *peer {
	np := &peer{Peer: p, roam: r}
	np.Prefixes = slices.Clone(p.Prefixes)
	if np.roam == nil {
		np.roam = newRoaming(p.Endpoint)
	}
	return np
}

func (p *peer) allows(a netip.Addr) bool {
	for _, pfx := range p.Prefixes {
		if pfx.Contains(a) {
			return true
		}
	}
	return false
}

type route struct {
	pfx netip.Prefix
	p   *peer
}

// table is replaced, never modified, so the packet path reads it without
// locks.
type table struct {
	byEndpoint map[netip.AddrPort]*peer // by configured endpoint
	// bySource finds the peer of a received packet by where the peer is
	// now; a packet from elsewhere is attributed by its SPI (roam.go).
	bySource map[netip.AddrPort]*peer
	routes   []route // longest prefix first
}

func (t *table) lookup(dst netip.Addr) *peer {
	for _, r := range t.routes {
		if r.pfx.Contains(dst) {
			return r.p
		}
	}
	return nil
}

// Dataplane moves packets between a TUN device and an Underlay: one
// goroutine seals TUN packets to the peer routed by inner destination, one
// opens underlay payloads from the peer whose codec authenticates them
// (roam.go). One RX loop: roaming state is that loop's alone.
type Dataplane struct {
	cfg                Config
	headroom, tailroom int
	log                *slog.Logger
	mu                 sync.Mutex // serialises table writers
	wmu                sync.Mutex // serialises underlay writes: the TX loop's and keep-alives
	stop               chan struct{}
	table              atomic.Pointer[table]
	drops              counters
	closing            atomic.Bool
	closeOnce          sync.Once
	wg                 sync.WaitGroup
	panicLogged        atomic.Bool
	readErrLogged      atomic.Bool
	stopCtx            func() bool
}

// Start checks cfg and starts the queue goroutines. Cancelling ctx closes
// the Dataplane as Close does.
func Start(ctx context.Context, cfg Config) (*Dataplane, error) {
	if cfg.TUN == nil || cfg.Underlay == nil {
		return nil, errors.New("userspace: config needs both TUN and Underlay")
	}
	if cfg.MTU < 576 || cfg.MTU > 65535 {
		return nil, fmt.Errorf("userspace: MTU %d: want 576..65535", cfg.MTU)
	}
	if cfg.Batch == 0 {
		cfg.Batch = DefaultBatch
	}
	if cfg.Batch < 1 || cfg.Batch > 1024 {
		return nil, fmt.Errorf("userspace: Batch %d: want 1..1024", cfg.Batch)
	}
	// A scratch codec tells the framing's header and tag sizes.
	probe, err := codec.New(codec.Config{Framing: cfg.Framing})
	if err != nil {
		return nil, fmt.Errorf("userspace: framing: %w", err)
	}
	d := &Dataplane{cfg: cfg, headroom: probe.Headroom(), tailroom: probe.Tailroom(), log: cfg.Logger}
	probe.Close()
	if d.log == nil {
		d.log = slog.New(slog.DiscardHandler)
	}
	d.table.Store(&table{byEndpoint: map[netip.AddrPort]*peer{}, bySource: map[netip.AddrPort]*peer{}})
	d.stop = make(chan struct{})
	d.wg.Add(3)
	go d.txLoop()
	go d.rxLoop()
	go d.keepaliveLoop(d.stop)
	d.stopCtx = context.AfterFunc(ctx, func() { d.Close() })
	return d, nil
}

// AddPeer adds p. It refuses a peer whose endpoint or one of whose prefixes
// another peer already has.
func (d *Dataplane) AddPeer(p Peer) error {
	if err := d.check(p); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	old := d.table.Load()
	if _, ok := old.byEndpoint[p.Endpoint]; ok {
		return fmt.Errorf("userspace: add peer %v: endpoint already has a peer", p.Endpoint)
	}
	for _, r := range old.routes {
		if slices.Contains(p.Prefixes, r.pfx) {
			return fmt.Errorf("userspace: add peer %v: prefix %v already routes to peer %v", p.Endpoint, r.pfx, r.p.Endpoint)
		}
	}
	d.table.Store(old.with(newPeer(p, nil), nil))
	return nil
}

// check validates a peer for AddPeer and UpdatePeer.
func (d *Dataplane) check(p Peer) error {
	if !p.Endpoint.IsValid() || p.Endpoint.Port() == 0 {
		return fmt.Errorf("userspace: add peer: endpoint %v: want address and non-zero port", p.Endpoint)
	}
	if p.Codec == nil {
		return fmt.Errorf("userspace: add peer %v: Codec is nil", p.Endpoint)
	}
	if f := p.Codec.Framing(); f != d.cfg.Framing {
		return fmt.Errorf("userspace: add peer %v: codec framing %v, dataplane framing %v", p.Endpoint, f, d.cfg.Framing)
	}
	if len(p.Prefixes) == 0 {
		return fmt.Errorf("userspace: add peer %v: no Prefixes: it could neither send nor receive", p.Endpoint)
	}
	for _, pfx := range p.Prefixes {
		if !pfx.IsValid() || pfx != pfx.Masked() {
			return fmt.Errorf("userspace: add peer %v: prefix %v: want a valid masked prefix (%v)", p.Endpoint, pfx, pfx.Masked())
		}
	}
	return nil
}

// UpdatePeer replaces the endpoint and prefixes of the peer at old,
// keeping its codec (and with it its SAs) and its counters. Packets in
// flight during the switch are attributed to the old or the new entry.
func (d *Dataplane) UpdatePeer(old netip.AddrPort, p Peer) error {
	if err := d.check(p); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	t := d.table.Load()
	cur, ok := t.byEndpoint[old]
	if !ok {
		return fmt.Errorf("userspace: update peer %v: no such peer", old)
	}
	if cur.Codec != p.Codec {
		return fmt.Errorf("userspace: update peer %v: the codec of a peer cannot change", old)
	}
	if other, ok := t.byEndpoint[p.Endpoint]; ok && other != cur {
		return fmt.Errorf("userspace: update peer %v: endpoint %v already has a peer", old, p.Endpoint)
	}
	for _, r := range t.routes {
		if r.p != cur && slices.Contains(p.Prefixes, r.pfx) {
			return fmt.Errorf("userspace: update peer %v: prefix %v already routes to peer %v", old, r.pfx, r.p.Endpoint)
		}
	}
	// A peer keeps where it roamed to unless its configured endpoint
	// changed: then the operator's word is the new place to send.
	var r *roaming
	if p.Endpoint == cur.Endpoint {
		r = cur.roam
	}
	np := newPeer(p, r)
	np.txPkts.Store(cur.txPkts.Load())
	np.rxPkts.Store(cur.rxPkts.Load())
	np.lastTX.Store(cur.lastTX.Load())
	np.lastRX.Store(cur.lastRX.Load())
	np.keepalives.Store(cur.keepalives.Load())
	for i := range cur.drops {
		np.drops[i].Store(cur.drops[i].Load())
	}
	d.table.Store(t.with(np, cur))
	return nil
}

// RemovePeer removes the peer at endpoint; its packets are dropped from now
// on. It reports whether there was one.
func (d *Dataplane) RemovePeer(endpoint netip.AddrPort) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	old := d.table.Load()
	gone, ok := old.byEndpoint[endpoint]
	if !ok {
		return false
	}
	d.table.Store(old.with(nil, gone))
	return true
}

// with returns a copy of t plus add minus remove.
func (t *table) with(add, remove *peer) *table {
	nt := &table{
		byEndpoint: make(map[netip.AddrPort]*peer, len(t.byEndpoint)+1),
		bySource:   make(map[netip.AddrPort]*peer, len(t.bySource)+1),
	}
	for ep, p := range t.byEndpoint {
		if p != remove {
			nt.byEndpoint[ep] = p
		}
	}
	for src, p := range t.bySource {
		if p != remove {
			nt.bySource[src] = p
		}
	}
	for _, r := range t.routes {
		if r.p != remove {
			nt.routes = append(nt.routes, r)
		}
	}
	if add != nil {
		nt.byEndpoint[add.Endpoint] = add
		nt.bySource[add.roam.current()] = add
		for _, pfx := range add.Prefixes {
			nt.routes = append(nt.routes, route{pfx, add})
		}
	}
	slices.SortStableFunc(nt.routes, func(a, b route) int { return b.pfx.Bits() - a.pfx.Bits() })
	return nt
}

// Stats returns a snapshot of the engine's and every peer's counters.
func (d *Dataplane) Stats() Stats {
	s := Stats{Drops: d.drops.snapshot()}
	for _, p := range d.table.Load().byEndpoint {
		s.Peers = append(s.Peers, PeerStats{
			Endpoint:   p.Endpoint,
			Current:    p.roam.current(),
			Roams:      p.roam.moves.Load(),
			TXPackets:  p.txPkts.Load(),
			RXPackets:  p.rxPkts.Load(),
			Keepalives: p.keepalives.Load(),
			LastTX:     unixNano(p.lastTX.Load()),
			LastRX:     unixNano(p.lastRX.Load()),
			Drops:      p.drops.snapshot(),
			Codec:      p.Codec.Stats(),
		})
	}
	slices.SortFunc(s.Peers, func(a, b PeerStats) int { return a.Endpoint.Compare(b.Endpoint) })
	return s
}

// Activity reports when the peer at endpoint (as configured) last sent
// and received, without the cost of Stats.
func (d *Dataplane) Activity(endpoint netip.AddrPort) (lastTX, lastRX time.Time, ok bool) {
	p, ok := d.table.Load().byEndpoint[endpoint]
	if !ok {
		return time.Time{}, time.Time{}, false
	}
	return unixNano(p.lastTX.Load()), unixNano(p.lastRX.Load()), true
}

func unixNano(ns int64) time.Time {
	if ns == 0 {
		return time.Time{}
	}
	return time.Unix(0, ns)
}

// Close stops both loops, closes the TUN device and the underlay, and waits
// for the loops to return.
func (d *Dataplane) Close() error {
	var err error
	d.closeOnce.Do(func() {
		d.closing.Store(true)
		close(d.stop)
		err = errors.Join(d.cfg.Underlay.Close(), d.cfg.TUN.Close())
		d.wg.Wait()
		d.stopCtx()
	})
	return err
}

// recovered turns a panic in a queue loop into a counted drop, logged once
// so a packet that triggers it repeatedly cannot flood the log.
func (d *Dataplane) recovered(loop string, r any) {
	d.drops[DropPanic].Add(1)
	if d.panicLogged.CompareAndSwap(false, true) {
		buf := make([]byte, 4096)
		buf = buf[:runtime.Stack(buf, false)]
		d.log.Error("userspace: recovered panic in queue loop; packets are dropped and counted, later panics are not logged",
			"loop", loop, "panic", fmt.Sprint(r), "stack", string(buf))
	}
}

func (d *Dataplane) readError(what string, err error) {
	if d.readErrLogged.CompareAndSwap(false, true) {
		d.log.Warn("userspace: read error; retrying, later errors are not logged", "from", what, "err", err)
	}
}

// txState is the TX loop's preallocated batch.
type txState struct {
	bufs  [][]byte // whole buffers, headroom included
	rd    [][]byte // the inner-packet windows TUN reads into
	lens  []int
	msgs  []Message
	peers []*peer
}

// The loops do not lock their OS threads: a locked goroutine that the
// poller wakes cannot run on the thread that found it ready; that thread
// hands it to the locked one and sleeps, and the locked one hands the P
// back when the goroutine blocks again, two futex wake-ups and two context
// switches per hop. With four hops per round trip (both loops of both
// ends) that was most of the latency of a round trip.
func (d *Dataplane) txLoop() {
	defer d.wg.Done()
	n := d.cfg.Batch
	s := &txState{bufs: make([][]byte, n), rd: make([][]byte, n), lens: make([]int, n),
		msgs: make([]Message, n), peers: make([]*peer, n)}
	for i := range s.bufs {
		s.bufs[i] = make([]byte, d.headroom+d.cfg.MTU+d.tailroom)
		s.rd[i] = s.bufs[i][d.headroom : d.headroom+d.cfg.MTU]
	}
	for d.txBatch(s) {
	}
}

// txBatch moves one batch from the TUN device to the underlay. It reports
// whether the loop goes on.
func (d *Dataplane) txBatch(s *txState) (more bool) {
	defer func() {
		if r := recover(); r != nil {
			d.recovered("tx", r)
			more = !d.closing.Load()
		}
	}()
	n, err := d.cfg.TUN.ReadBatch(s.rd, s.lens)
	if err != nil {
		if d.closing.Load() {
			return false
		}
		d.readError("tun", err)
		return true
	}
	t := d.table.Load()
	k := 0
	for i := range n {
		pkt := s.rd[i][:s.lens[i]]
		dst, ok := innerAddr(pkt, false)
		if !ok {
			d.drops[DropNotIP].Add(1)
			continue
		}
		p := t.lookup(dst)
		if p == nil {
			d.drops[DropNoPeer].Add(1)
			continue
		}
		start, length, err := p.Codec.Seal(s.bufs[i], d.headroom, s.lens[i])
		if err != nil {
			continue // counted by the codec; never sent in clear
		}
		s.msgs[k] = Message{Buf: s.bufs[i], Off: start, N: length, Addr: p.roam.current()}
		s.peers[k] = p
		k++
	}
	now := time.Now().UnixNano()
	d.wmu.Lock()
	defer d.wmu.Unlock()
	for off := 0; off < k; {
		w, err := d.cfg.Underlay.WriteBatch(s.msgs[off:k])
		for _, p := range s.peers[off : off+w] {
			p.txPkts.Add(1)
			p.lastTX.Store(now)
		}
		off += w
		if err != nil {
			if d.closing.Load() {
				return false
			}
			if off < k {
				s.peers[off].drops[DropUnderlayWrite].Add(1)
				off++
			}
		}
	}
	clear(s.peers[:k]) // do not pin removed peers
	return true
}

func (d *Dataplane) rxLoop() {
	defer d.wg.Done()
	msgs := make([]Message, d.cfg.Batch)
	for i := range msgs {
		msgs[i].Buf = make([]byte, maxPayload)
	}
	s := &rxState{msgs: msgs, pkts: make([][]byte, 0, d.cfg.Batch), peers: make([]*peer, 0, d.cfg.Batch),
		scratch: make([]byte, maxPayload), bySPI: map[uint32][]*peer{}}
	for d.rxBatch(s) {
	}
}

// rxState is the RX loop's preallocated batch: the underlay's messages and
// the inner packets opened from them, with their peers.
type rxState struct {
	msgs  []Message
	pkts  [][]byte
	peers []*peer
	// The rest serve packets from an address that is no peer's current
	// one (roam.go). bySPI is the SPI index as of indexed; it may pin a
	// removed peer until the next rebuild, but candidates checks the table.
	cands   []*peer
	scratch []byte
	bySPI   map[uint32][]*peer
	spiBuf  []uint32
	indexed time.Time
}

func (d *Dataplane) rxBatch(s *rxState) (more bool) {
	defer func() {
		if r := recover(); r != nil {
			d.recovered("rx", r)
			more = !d.closing.Load()
		}
	}()
	n, err := d.cfg.Underlay.ReadBatch(s.msgs)
	if err != nil {
		if d.closing.Load() {
			return false
		}
		// UDP reports an earlier send's ICMP error on the next read.
		d.readError("underlay", err)
		return true
	}
	t := d.table.Load()
	s.pkts, s.peers = s.pkts[:0], s.peers[:0]
	for i := range n {
		m := &s.msgs[i]
		p, pkt := d.open(t, s, m)
		if pkt == nil {
			continue // counted by the codec or the engine
		}
		if src, ok := innerAddr(pkt, true); !ok || !p.allows(src) {
			p.drops[DropSrcNotAllowed].Add(1)
			continue
		}
		s.pkts = append(s.pkts, pkt)
		s.peers = append(s.peers, p)
	}
	// One batch write lets the TUN device hand runs of one TCP flow to the
	// kernel as one packet.
	now := time.Now().UnixNano()
	for off := 0; off < len(s.pkts); {
		w, err := d.cfg.TUN.WriteBatch(s.pkts[off:])
		for _, p := range s.peers[off : off+w] {
			p.rxPkts.Add(1)
			p.lastRX.Store(now)
		}
		off += w
		if err != nil {
			if d.closing.Load() {
				return false
			}
			s.peers[off].drops[DropTUNWrite].Add(1)
			off++
		}
	}
	clear(s.pkts)
	clear(s.peers) // do not pin removed peers
	return true
}

// innerAddr returns an IP packet's source or destination address.
func innerAddr(p []byte, src bool) (netip.Addr, bool) {
	var off, size int
	switch {
	case len(p) >= 20 && p[0]>>4 == 4:
		off, size = 16, 4
		if src {
			off = 12
		}
	case len(p) >= 40 && p[0]>>4 == 6:
		off, size = 24, 16
		if src {
			off = 8
		}
	default:
		return netip.Addr{}, false
	}
	return netip.AddrFromSlice(p[off : off+size])
}
