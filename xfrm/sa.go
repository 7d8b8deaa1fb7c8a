package xfrm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"
	"unsafe"

	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/cmac"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Mode is the ESP encapsulation mode.
type Mode uint8

const (
	Transport Mode = 0 // XFRM_MODE_TRANSPORT: host to host
	Tunnel    Mode = 1 // XFRM_MODE_TUNNEL: subnets behind the hosts
)

func (m Mode) String() string {
	switch m {
	case Transport:
		return "transport"
	case Tunnel:
		return "tunnel"
	}
	return fmt.Sprintf("mode(%d)", uint8(m))
}

// Dir is the direction of an SA or policy. The zero value is invalid so a
// forgotten field is an error, not an outbound SA.
type Dir uint8

const (
	In Dir = iota + 1
	Out
	Fwd // policies only: forwarded traffic in tunnel mode
)

func (d Dir) String() string {
	switch d {
	case In:
		return "in"
	case Out:
		return "out"
	case Fwd:
		return "fwd"
	}
	return fmt.Sprintf("dir(%d)", uint8(d))
}

// ReplayWindow is the anti-replay window of every SA this package
// installs, in packets. It is always set with ESN: legacy windows are
// capped at 32 and a zero window disables anti-replay.
const ReplayWindow = 1024

// ICVBits is the ESP integrity check value length (RFC 4106 allows 64, 96
// or 128; netdevsim offload and pspd require 128).
const ICVBits = 128

// SaltLen is the length of the RFC 4106 salt appended to the AES key.
const SaltLen = 4

const aeadName = "rfc4106(gcm(aes))"

// maxPackets32 bounds an SA without ESN well before its 32-bit sequence
// number wraps, leaving the window's worth of room.
const maxPackets32 = 1<<32 - 1<<16

// Lifetime bounds an SA. Zero fields mean no limit. The soft limits raise
// a soft EXPIRE event (time to rekey), the hard limits remove the SA.
type Lifetime struct {
	SoftBytes, HardBytes     uint64
	SoftPackets, HardPackets uint64
	Soft, Hard               time.Duration // since the SA was added
}

func (l Lifetime) validate() error {
	check := func(name string, soft, hard uint64) error {
		if soft != 0 && hard != 0 && soft > hard {
			return fmt.Errorf("lifetime: soft %s %d exceeds hard %d", name, soft, hard)
		}
		return nil
	}
	if l.Soft < 0 || l.Hard < 0 {
		return errors.New("lifetime: negative time limit")
	}
	return errors.Join(check("bytes", l.SoftBytes, l.HardBytes), check("packets", l.SoftPackets, l.HardPackets),
		check("seconds", uint64(l.Soft/time.Second), uint64(l.Hard/time.Second)))
}

func infIfZero(v uint64) uint64 {
	if v == 0 {
		return ^uint64(0) // XFRM_INF
	}
	return v
}

// SA is one ESP security association to install.
type SA struct {
	Src, Dst netip.Addr // outer addresses; the SA is keyed by Dst and SPI
	SPI      uint32
	ReqID    uint32 // must lie in the Handle's owner range
	Dir      Dir
	Mode     Mode
	Suite    kdf.Suite
	// Key is the AES key, Suite.KeyLen() bytes, as the key schedule
	// derived it for SPI.
	Key secret.Key
	// Salt is the 4-byte RFC 4106 salt, the key schedule's own output for
	// SPI (assoc.SA's RxSalt and TxSalt), so both peers agree on it
	// without sending it. Zero derives one from Key (see KeySalt), which
	// only probes and tests rely on.
	Salt     [SaltLen]byte
	Lifetime Lifetime
	// OffloadDev names the device whose NIC should do the ESP crypto
	// (egress device for Out, ingress for In); empty means software.
	OffloadDev string
	// Offload overrides the Handle's offload mode for this SA when set.
	Offload OffloadMode
	// Encap, when set, carries the SA's ESP in UDP (RFC 3948), as
	// through a NAT. Such an SA is never offloaded.
	Encap *Encap
	// NATKeepalive, on an outbound SA with Encap, makes the kernel send a
	// NAT keep-alive (RFC 3948 §2.3) whenever the SA has been idle this
	// long, and one as soon as it is added, so that the NAT in front of
	// this host keeps the mapping the peer sends to. Whole seconds; it
	// needs Linux 6.10 (XFRMA_NAT_KEEPALIVE_INTERVAL).
	NATKeepalive time.Duration
}

// Encap is an SA's UDP encapsulation (XFRMA_ENCAP, XFRM_ENCAP_ESPINUDP).
type Encap struct {
	// SrcPort and DstPort are the UDP ports of the packets the SA
	// covers: this host's encapsulation port and the peer's as observed
	// (behind a NAT, the NAT's) for an outbound SA, the other way round
	// for an inbound one. The kernel compares an inbound packet's source
	// with the inbound SA's Src and SrcPort and reports a mismatch as a
	// mapping change (XFRM_MSG_MAPPING).
	SrcPort, DstPort uint16
	// OrigAddr is the peer's original address (NAT-OA, RFC 3948 §4.2),
	// for transport mode checksum fixing; unset means none.
	OrigAddr netip.Addr
}

// encapESPInUDP is UDP_ENCAP_ESPINUDP (RFC 3948, non-IKE marker free).
const encapESPInUDP = 2

// saDirOut is XFRM_SA_DIR_OUT.
const saDirOut = 2

func (e *Encap) attr() []byte {
	t := nl.XfrmEncapTmpl{EncapType: encapESPInUDP, EncapSport: nl.Swap16(e.SrcPort), EncapDport: nl.Swap16(e.DstPort)}
	if e.OrigAddr.IsValid() {
		t.EncapOa = xaddr(e.OrigAddr)
	}
	return append([]byte(nil), t.Serialize()...)
}

// ID names an installed SA.
type ID struct {
	Dst netip.Addr
	SPI uint32
}

func (id ID) String() string { return fmt.Sprintf("%s/%#x", id.Dst, id.SPI) }

// ID returns the SA's identity in the kernel.
func (s *SA) ID() ID { return ID{Dst: s.Dst, SPI: s.SPI} }

func (h *Handle) validateSA(s *SA) error {
	switch {
	case !s.Src.IsValid() || !s.Dst.IsValid():
		return errors.New("src and dst addresses are required")
	case s.Src.Unmap().Is4() != s.Dst.Unmap().Is4():
		return fmt.Errorf("src %s and dst %s are of different families", s.Src, s.Dst)
	case s.SPI < 256:
		return fmt.Errorf("spi %#x is reserved (SPIs below 256 are not for SAs, RFC 4303)", s.SPI)
	case !h.owner.ownsReqID(s.ReqID):
		return fmt.Errorf("reqid %#x is outside pspd's range [%#x, %#x]", s.ReqID, h.owner.ReqIDMin, h.owner.ReqIDMax)
	case s.Dir != In && s.Dir != Out:
		return fmt.Errorf("dir %s: an SA is in or out", s.Dir)
	case s.Mode != Transport && s.Mode != Tunnel:
		return fmt.Errorf("unknown %s", s.Mode)
	case !s.Suite.Valid():
		return fmt.Errorf("unknown suite %d", s.Suite)
	case s.Key.Len() != s.Suite.KeyLen():
		return fmt.Errorf("key is %d bytes, suite %s needs %d", s.Key.Len(), s.Suite, s.Suite.KeyLen())
	case s.Offload != 0 && !s.Offload.valid():
		return fmt.Errorf("offload mode %d is not auto, crypto or none", s.Offload)
	case s.Encap != nil && (s.Encap.SrcPort == 0 || s.Encap.DstPort == 0):
		return fmt.Errorf("UDP encapsulation with port %d -> %d: both ports are required", s.Encap.SrcPort, s.Encap.DstPort)
	case s.Encap != nil && s.Offload == OffloadCrypto:
		return errors.New("UDP-encapsulated ESP is not offloaded: crypto offload cannot be required for it")
	case s.NATKeepalive != 0 && (s.Dir != Out || s.Encap == nil || s.NATKeepalive < time.Second):
		return fmt.Errorf("NAT keep-alive every %v on a %s SA with encap %v: keep-alives are for outbound UDP-encapsulated SAs, at least a second apart", s.NATKeepalive, s.Dir, s.Encap != nil)
	}
	return s.Lifetime.validate()
}

// salt is the SA's RFC 4106 salt: Salt, or derived from the key when
// Salt is zero.
func (s *SA) salt() ([SaltLen]byte, error) {
	if s.Salt != ([SaltLen]byte{}) {
		return s.Salt, nil
	}
	return KeySalt(s.Key, s.SPI)
}

// KeySalt derives an RFC 4106 salt from an SA's key: the first four bytes
// of AES-CMAC(key, "pspd xfrm salt" || 0x00 || SPI big-endian). pspd's own
// SAs carry a salt of the key schedule's instead (SA.Salt), which shares
// no input with the AES-GCM key; this is for SAs made without one.
func KeySalt(key secret.Key, spi uint32) ([SaltLen]byte, error) {
	var salt [SaltLen]byte
	c, err := cmac.New(key.Bytes())
	if err != nil {
		return salt, fmt.Errorf("xfrm: salt: %w", err)
	}
	defer c.Wipe()
	msg := binary.BigEndian.AppendUint32([]byte("pspd xfrm salt\x00"), spi)
	tag := c.Sum(nil, msg)
	copy(salt[:], tag)
	secret.Zero(tag)
	return salt, nil
}

func family(a netip.Addr) uint16 {
	if a.Unmap().Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

func xaddr(a netip.Addr) nl.XfrmAddress {
	var x nl.XfrmAddress
	a = a.Unmap()
	if a.Is4() {
		b := a.As4()
		copy(x[:], b[:])
	} else {
		b := a.As16()
		copy(x[:], b[:])
	}
	return x
}

func fromXaddr(x nl.XfrmAddress, fam uint16) netip.Addr {
	if fam == unix.AF_INET {
		return netip.AddrFrom4([4]byte(x[:4]))
	}
	return netip.AddrFrom16(x)
}

func structBytes[T any](p *T) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(p)), unsafe.Sizeof(*p))
}

func (h *Handle) markAttr(b []byte) []byte {
	m := nl.XfrmMark{Value: h.owner.Mark, Mask: h.owner.MarkMask}
	return appendAttr(b, nl.XFRMA_MARK, structBytes(&m))
}

// ReserveSPI reserves an SPI in [min, max] for an inbound SA from src to
// dst with XFRM_MSG_ALLOCSPI: the kernel holds a larval SA for it until
// AddSA fills it in or net.core.xfrm_acq_expires seconds pass. To reserve
// the SPI the key schedule allocated, pass it as both min and max.
func (h *Handle) ReserveSPI(ctx context.Context, src, dst netip.Addr, reqid uint32, mode Mode, min, max uint32) (uint32, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	switch {
	case !src.IsValid() || !dst.IsValid() || family(src) != family(dst):
		return 0, fmt.Errorf("xfrm: reserve SPI %s->%s: need two addresses of one family", src, dst)
	case !h.owner.ownsReqID(reqid):
		return 0, fmt.Errorf("xfrm: reserve SPI: reqid %#x is outside pspd's range [%#x, %#x]", reqid, h.owner.ReqIDMin, h.owner.ReqIDMax)
	case min < 256 || max < min:
		return 0, fmt.Errorf("xfrm: reserve SPI: range [%#x, %#x] is empty or below 256", min, max)
	}
	var info nl.XfrmUserSpiInfo
	info.XfrmUsersaInfo.Id.Daddr = xaddr(dst)
	info.XfrmUsersaInfo.Id.Proto = unix.IPPROTO_ESP
	info.XfrmUsersaInfo.Saddr = xaddr(src)
	info.XfrmUsersaInfo.Family = family(dst)
	info.XfrmUsersaInfo.Reqid = reqid
	info.XfrmUsersaInfo.Mode = uint8(mode)
	info.Min, info.Max = min, max
	msg := append([]byte(nil), structBytes(&info)...)
	msg = h.markAttr(msg)
	var spi uint32
	err := h.sa.do(nl.XFRM_MSG_ALLOCSPI, 0, msg, func(typ uint16, b []byte) error {
		st, _, err := parseSA(b)
		if err != nil {
			return err
		}
		spi = st.SPI
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("xfrm: reserve SPI in [%#x, %#x] for %s: %w", min, max, dst, err)
	}
	if spi == 0 {
		return 0, fmt.Errorf("xfrm: reserve SPI for %s: kernel answered without an SA", dst)
	}
	return spi, nil
}

// AddSA installs an SA. An inbound SA whose SPI was reserved replaces its
// larval state; an SPI that already carries a key is refused, because the
// kernel's UPDSA silently keeps the old key: a new key needs a new SPI.
// It reports whether the NIC does the crypto.
//
// Software SAs always use ESN with a ReplayWindow-packet window. Some
// offload devices (netdevsim among them) refuse ESN; for those the SA
// keeps the same window with 32-bit sequence numbers, and its hard packet
// limit is capped below 2^32 so the sequence number never wraps.
func (h *Handle) AddSA(ctx context.Context, s *SA) (offloaded bool, err error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	if err := h.validateSA(s); err != nil {
		return false, fmt.Errorf("xfrm: add SA spi=%#x: %w", s.SPI, err)
	}
	mode := s.Offload
	if mode == 0 {
		mode = h.offload
	}
	dev, err := h.offloadDevice(s, mode)
	if err != nil {
		return false, fmt.Errorf("xfrm: add SA spi=%#x: %w", s.SPI, err)
	}
	if s.Encap != nil {
		dev = nil // devices that offload ESP in UDP are rare and untested here
	}
	if dev != nil {
		err = h.addSA(s, dev, true)
		if err != nil && !errors.Is(err, errSPIInUse) {
			err = h.addSA(s, dev, false)
		}
		if err == nil {
			return true, nil
		}
		if mode == OffloadCrypto || errors.Is(err, errSPIInUse) {
			return false, fmt.Errorf("xfrm: add SA spi=%#x: crypto offload on %s (offload=%s does not fall back): %w", s.SPI, s.OffloadDev, mode, err)
		}
		h.log.Info("xfrm: device refused ESP crypto offload, installing in software", "spi", s.SPI, "dev", s.OffloadDev, "err", err)
	}
	if err := h.addSA(s, nil, true); err != nil {
		return false, fmt.Errorf("xfrm: add SA spi=%#x dst=%s: %w", s.SPI, s.Dst, err)
	}
	return false, nil
}

var errSPIInUse = errors.New("the SPI is in use (a new key needs a new SPI)")

// addSA sends NEWSA, and UPDSA when the SPI holds a larval reservation.
func (h *Handle) addSA(s *SA, dev *offloadReq, esn bool) error {
	err := h.sa.do(nl.XFRM_MSG_NEWSA, 0, h.newSAMsg(s, dev, esn), nil)
	if !errors.Is(err, unix.EEXIST) {
		return err
	}
	cur, gerr := h.getSA(s.ID(), nil)
	if gerr != nil {
		return fmt.Errorf("%w (and looking it up: %v)", err, gerr)
	}
	if !cur.Larval || !h.owns(cur) {
		return errSPIInUse
	}
	return h.sa.do(nl.XFRM_MSG_UPDSA, 0, h.newSAMsg(s, dev, esn), nil)
}

// offloadReq is a resolved XFRMA_OFFLOAD_DEV request.
type offloadReq struct {
	ifindex int
}

// newSAMsgCap holds the largest NEWSA payload (about 520 bytes: IPv6,
// a 32-byte key, an offload request).
const newSAMsgCap = 1024

// newSAMsg builds the NEWSA/UPDSA payload. The buffer is allocated once at
// its final size so no copy of the key is left behind by append growing
// it; sock.do wipes it after sending.
func (h *Handle) newSAMsg(s *SA, off *offloadReq, esn bool) []byte {
	var info nl.XfrmUsersaInfo
	fam := family(s.Dst)
	info.Id.Daddr = xaddr(s.Dst)
	info.Id.Spi = nl.Swap32(s.SPI)
	info.Id.Proto = unix.IPPROTO_ESP
	info.Saddr = xaddr(s.Src)
	info.Family = fam
	info.Mode = uint8(s.Mode)
	info.Reqid = s.ReqID
	if esn {
		info.Flags = xfrmStateESN
	}
	info.Sel.Family = fam
	if s.Mode == Transport {
		info.Sel.Daddr, info.Sel.Saddr = xaddr(s.Dst), xaddr(s.Src)
		bits := uint8(s.Dst.Unmap().BitLen())
		info.Sel.PrefixlenD, info.Sel.PrefixlenS = bits, bits
	}
	l := s.Lifetime
	info.Lft = nl.XfrmLifetimeCfg{
		SoftByteLimit: infIfZero(l.SoftBytes), HardByteLimit: infIfZero(l.HardBytes),
		SoftPacketLimit: infIfZero(l.SoftPackets), HardPacketLimit: infIfZero(l.HardPackets),
		SoftAddExpiresSeconds: uint64(l.Soft / time.Second), HardAddExpiresSeconds: uint64(l.Hard / time.Second),
	}
	if !esn {
		info.Lft.HardPacketLimit = min(info.Lft.HardPacketLimit, maxPackets32)
		info.Lft.SoftPacketLimit = min(info.Lft.SoftPacketLimit, maxPackets32*7/8)
	}

	keyLen := s.Key.Len() + SaltLen
	b := make([]byte, 0, newSAMsgCap)
	b = append(b, structBytes(&info)...)

	aead := make([]byte, nl.SizeofXfrmAlgoAEAD+keyLen)
	copy(aead, aeadName)
	binary.NativeEndian.PutUint32(aead[64:], uint32(keyLen*8))
	binary.NativeEndian.PutUint32(aead[68:], ICVBits)
	copy(aead[nl.SizeofXfrmAlgoAEAD:], s.Key.Bytes())
	salt, err := s.salt()
	if err == nil { // validateSA checked the key length
		copy(aead[nl.SizeofXfrmAlgoAEAD+s.Key.Len():], salt[:])
	}
	secret.Zero(salt[:])
	b = appendAttr(b, nl.XFRMA_ALG_AEAD, aead)
	secret.Zero(aead)

	b = h.markAttr(b)

	if s.Encap != nil {
		b = appendAttr(b, nl.XFRMA_ENCAP, s.Encap.attr())
	}

	// The kernel sends keep-alives only for an SA that says it is
	// outbound (XFRMA_SA_DIR), and an SA that says so may carry no replay
	// window.
	window := uint32(ReplayWindow)
	if s.NATKeepalive != 0 {
		b = appendAttr(b, nl.XFRMA_SA_DIR, []byte{saDirOut})
		b = appendAttr(b, nl.XFRMA_NAT_KEEPALIVE_INTERVAL, binary.NativeEndian.AppendUint32(nil, uint32(s.NATKeepalive/time.Second)))
		window = 0
	}
	replay := make([]byte, nl.SizeofXfrmReplayStateEsn+window/8)
	binary.NativeEndian.PutUint32(replay[0:], window/32) // bmp_len in u32 words
	binary.NativeEndian.PutUint32(replay[20:], window)
	b = appendAttr(b, nl.XFRMA_REPLAY_ESN_VAL, replay)

	if off != nil {
		// struct xfrm_user_offload { int ifindex; __u8 flags; }
		o := make([]byte, 8)
		binary.NativeEndian.PutUint32(o, uint32(off.ifindex))
		var flags uint8
		if fam == unix.AF_INET6 {
			flags |= 1 // XFRM_OFFLOAD_IPV6
		}
		if s.Dir == In {
			flags |= 2 // XFRM_OFFLOAD_INBOUND
		}
		o[4] = flags
		b = appendAttr(b, nl.XFRMA_OFFLOAD_DEV, o)
	}
	return b
}

// DeleteSA removes one of pspd's SAs. Removing an SA that is not there is
// not an error; an SA with a foreign tag is refused.
func (h *Handle) DeleteSA(ctx context.Context, id ID) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	st, err := h.getSA(id, nil)
	if errors.Is(err, unix.ESRCH) || errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("xfrm: delete SA spi=%#x: %w", id.SPI, err)
	}
	if !h.owns(st) {
		return fmt.Errorf("xfrm: delete SA spi=%#x dst=%s: not pspd's (reqid %#x, mark %#x/%#x)", id.SPI, id.Dst, st.ReqID, st.Mark, st.MarkMask)
	}
	if err := h.sa.do(nl.XFRM_MSG_DELSA, 0, h.saIDMsg(id), nil); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("xfrm: delete SA spi=%#x dst=%s: %w", id.SPI, id.Dst, err)
	}
	return nil
}

func (h *Handle) saIDMsg(id ID) []byte {
	m := nl.XfrmUsersaId{Daddr: xaddr(id.Dst), Spi: nl.Swap32(id.SPI), Family: family(id.Dst), Proto: unix.IPPROTO_ESP}
	return h.markAttr(append([]byte(nil), structBytes(&m)...))
}

// State is what the kernel holds for one SA. It never carries the key.
type State struct {
	Src, Dst     netip.Addr
	SPI          uint32
	ReqID        uint32
	Mode         Mode
	Mark         uint32
	MarkMask     uint32
	ESN          bool
	ReplayWindow uint32 // packets; from the ESN replay state when ESN is on
	// Larval is a reserved SPI without keys (ALLOCSPI or ACQUIRE).
	Larval   bool
	AEAD     string
	KeyBits  uint32 // key and salt, as the kernel counts it
	ICVBits  uint32
	Offload  bool
	Ifindex  int // offload device
	Lifetime Lifetime
	Stats    Stats
	Encap    *Encap // UDP encapsulation; nil for plain ESP
	// NATKeepalive is the kernel's NAT keep-alive interval for the SA.
	NATKeepalive time.Duration
}

// Stats are an SA's counters.
type Stats struct {
	Bytes, Packets  uint64
	ReplayDrops     uint32 // packets dropped as replays
	OutOfWindow     uint32 // packets dropped as older than the replay window
	IntegrityFailed uint32 // packets whose ICV did not verify (wrong key, forgery)
	Added           time.Time
	// FirstUsed is when the SA first carried a packet (curlft.use_time),
	// LastUsed when it last did (XFRMA_LASTUSED); seconds, zero if never.
	FirstUsed, LastUsed time.Time
}

func (h *Handle) owns(st State) bool {
	return h.owner.ownsReqID(st.ReqID) && h.owner.ownsMark(st.Mark, st.MarkMask)
}

// parseSA decodes an xfrm_usersa_info message with its attributes. key
// aliases b (the AEAD key and salt) and is only valid until b is wiped.
func parseSA(b []byte) (State, []byte, error) {
	var st State
	if len(b) < nl.SizeofXfrmUsersaInfo {
		return st, nil, fmt.Errorf("xfrm: SA message is %d bytes, want at least %d", len(b), nl.SizeofXfrmUsersaInfo)
	}
	var info nl.XfrmUsersaInfo
	copy(structBytes(&info), b)
	if info.Family != unix.AF_INET && info.Family != unix.AF_INET6 {
		return st, nil, fmt.Errorf("xfrm: SA message has address family %d", info.Family)
	}
	st.Dst = fromXaddr(info.Id.Daddr, info.Family)
	st.Src = fromXaddr(info.Saddr, info.Family)
	st.SPI = nl.Swap32(info.Id.Spi)
	st.ReqID = info.Reqid
	st.Mode = Mode(info.Mode)
	st.ESN = info.Flags&xfrmStateESN != 0
	st.ReplayWindow = uint32(info.ReplayWindow)
	lim := func(v uint64) uint64 {
		if v == ^uint64(0) {
			return 0
		}
		return v
	}
	st.Lifetime = Lifetime{
		SoftBytes: lim(info.Lft.SoftByteLimit), HardBytes: lim(info.Lft.HardByteLimit),
		SoftPackets: lim(info.Lft.SoftPacketLimit), HardPackets: lim(info.Lft.HardPacketLimit),
		Soft: time.Duration(min(info.Lft.SoftAddExpiresSeconds, 1<<32)) * time.Second,
		Hard: time.Duration(min(info.Lft.HardAddExpiresSeconds, 1<<32)) * time.Second,
	}
	st.Stats = Stats{
		Bytes: info.Curlft.Bytes, Packets: info.Curlft.Packets,
		OutOfWindow: info.Stats.ReplayWindow, ReplayDrops: info.Stats.Replay, IntegrityFailed: info.Stats.IntegrityFailed,
	}
	if info.Curlft.AddTime != 0 {
		st.Stats.Added = time.Unix(int64(min(info.Curlft.AddTime, 1<<40)), 0)
	}
	if info.Curlft.UseTime != 0 {
		st.Stats.FirstUsed = time.Unix(int64(min(info.Curlft.UseTime, 1<<40)), 0)
	}
	st.Larval = true
	var key []byte
	for _, a := range parseAttrs(b[nl.SizeofXfrmUsersaInfo:]) {
		switch a.typ {
		case nl.XFRMA_MARK:
			if len(a.data) >= 8 {
				st.Mark = binary.NativeEndian.Uint32(a.data[0:])
				st.MarkMask = binary.NativeEndian.Uint32(a.data[4:])
			}
		case nl.XFRMA_REPLAY_ESN_VAL:
			if len(a.data) >= nl.SizeofXfrmReplayStateEsn {
				st.ReplayWindow = binary.NativeEndian.Uint32(a.data[20:])
			}
		case nl.XFRMA_ALG_AEAD:
			if len(a.data) >= nl.SizeofXfrmAlgoAEAD {
				st.Larval = false
				name := a.data[:64]
				for i, c := range name {
					if c == 0 {
						name = name[:i]
						break
					}
				}
				st.AEAD = string(name)
				st.KeyBits = binary.NativeEndian.Uint32(a.data[64:])
				st.ICVBits = binary.NativeEndian.Uint32(a.data[68:])
				if n := int(st.KeyBits / 8); n <= len(a.data)-nl.SizeofXfrmAlgoAEAD {
					key = a.data[nl.SizeofXfrmAlgoAEAD : nl.SizeofXfrmAlgoAEAD+n]
				}
			}
		case nl.XFRMA_ALG_CRYPT, nl.XFRMA_ALG_AUTH, nl.XFRMA_ALG_AUTH_TRUNC:
			st.Larval = false
		case nl.XFRMA_ENCAP:
			if len(a.data) >= nl.SizeofXfrmEncapTmpl {
				var t nl.XfrmEncapTmpl
				copy(structBytes(&t), a.data)
				e := &Encap{SrcPort: nl.Swap16(t.EncapSport), DstPort: nl.Swap16(t.EncapDport)}
				if oa := fromXaddr(t.EncapOa, info.Family); !oa.IsUnspecified() {
					e.OrigAddr = oa
				}
				st.Encap = e
			}
		case nl.XFRMA_NAT_KEEPALIVE_INTERVAL:
			if len(a.data) >= 4 {
				st.NATKeepalive = time.Duration(binary.NativeEndian.Uint32(a.data)) * time.Second
			}
		case nl.XFRMA_LASTUSED:
			if len(a.data) >= 8 {
				if t := binary.NativeEndian.Uint64(a.data); t != 0 {
					st.Stats.LastUsed = time.Unix(int64(min(t, 1<<40)), 0)
				}
			}
		case nl.XFRMA_OFFLOAD_DEV:
			if len(a.data) >= 5 {
				st.Offload = true
				st.Ifindex = int(int32(binary.NativeEndian.Uint32(a.data)))
			}
		}
	}
	return st, key, nil
}

// getSA reads one SA; keyFn, if set, sees its key before the buffer is
// wiped.
func (h *Handle) getSA(id ID, keyFn func([]byte)) (State, error) {
	var st State
	found := false
	err := h.sa.do(nl.XFRM_MSG_GETSA, 0, h.saIDMsg(id), func(typ uint16, b []byte) error {
		s, key, err := parseSA(b)
		if err != nil {
			return err
		}
		st, found = s, true
		if keyFn != nil {
			keyFn(key)
		}
		return nil
	})
	if err == nil && !found {
		err = unix.ESRCH
	}
	return st, err
}

// GetSA reads one of pspd's SAs with its counters. The kernel keeps the
// counters per packet, so the first query is as current as any later one.
func (h *Handle) GetSA(ctx context.Context, id ID) (State, error) {
	if err := ctx.Err(); err != nil {
		return State{}, err
	}
	st, err := h.getSA(id, nil)
	if err != nil {
		return State{}, fmt.Errorf("xfrm: get SA spi=%#x dst=%s: %w", id.SPI, id.Dst, err)
	}
	if !h.owns(st) {
		return State{}, fmt.Errorf("xfrm: get SA spi=%#x dst=%s: not pspd's", id.SPI, id.Dst)
	}
	return st, nil
}

// dumpSAs calls each for every SA pspd owns, with its key valid only
// during the call.
func (h *Handle) dumpSAs(each func(State, []byte)) error {
	return h.sa.do(nl.XFRM_MSG_GETSA, unix.NLM_F_DUMP, nil, func(typ uint16, b []byte) error {
		if typ != nl.XFRM_MSG_NEWSA {
			return nil
		}
		st, key, err := parseSA(b)
		if err != nil {
			return err
		}
		if h.owns(st) {
			each(st, key)
		}
		return nil
	})
}

// ListSAs lists pspd's SAs, without keys.
func (h *Handle) ListSAs(ctx context.Context) ([]State, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var out []State
	if err := h.dumpSAs(func(st State, _ []byte) { out = append(out, st) }); err != nil {
		return nil, fmt.Errorf("xfrm: list SAs: %w", err)
	}
	return out, nil
}

func ifindexIn(nsFD int, name string) (int, error) {
	return inNetNS(nsFD, func() (int, error) {
		ifi, err := net.InterfaceByName(name)
		if err != nil {
			return 0, err
		}
		return ifi.Index, nil
	})
}
