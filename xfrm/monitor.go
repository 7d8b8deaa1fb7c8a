package xfrm

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strconv"
	"time"

	"github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// EventKind says what the kernel reported.
type EventKind uint8

const (
	// SoftExpire: an SA reached a soft lifetime limit; ask the key
	// exchange for a rekey.
	SoftExpire EventKind = iota + 1
	// HardExpire: the kernel removed an SA (or a reservation timed out).
	HardExpire
	// Acquire: traffic hit a policy with no SA; negotiate one.
	Acquire
	// Migrate: SAs of a reqid moved to new addresses.
	Migrate
	// UnknownSPI: ESP arrived for SPIs with no SA (XfrmInNoStates grew),
	// typically because the peer restarted; re-establish associations.
	UnknownSPI
	// Mapping: a UDP-encapsulated packet that authenticated on the
	// inbound SA came from another address or port than the SA's (a NAT
	// in front of the peer changed its mapping); Src and Port are the new
	// ones. The kernel reports it for every such packet.
	Mapping
)

func (k EventKind) String() string {
	switch k {
	case SoftExpire:
		return "soft-expire"
	case HardExpire:
		return "hard-expire"
	case Acquire:
		return "acquire"
	case Migrate:
		return "migrate"
	case UnknownSPI:
		return "unknown-spi"
	case Mapping:
		return "mapping"
	}
	return fmt.Sprintf("event(%d)", uint8(k))
}

// Event is one kernel notification about pspd's state.
type Event struct {
	Kind EventKind
	// SA is the expired SA (SoftExpire, HardExpire).
	SA    ID
	ReqID uint32
	// Src and Dst are the packet addresses that triggered an Acquire, or
	// the new endpoints of a Migrate; Src and Port the new source of a
	// Mapping.
	Src, Dst netip.Addr
	Port     uint16
	// Count is how many packets with unknown SPIs arrived since the last
	// UnknownSPI event.
	Count uint64
}

const (
	grpAcquire = 1 // XFRMNLGRP_ACQUIRE
	grpExpire  = 2 // XFRMNLGRP_EXPIRE
	grpMigrate = 7 // XFRMNLGRP_MIGRATE
	grpMapping = 8 // XFRMNLGRP_MAPPING

	sizeofUserExpire  = nl.SizeofXfrmUsersaInfo + 8 // struct xfrm_user_expire, padded
	sizeofUserAcquire = 280                         // struct xfrm_user_acquire
	sizeofUserMigrate = 76                          // struct xfrm_user_migrate
	sizeofUserMapping = 64                          // struct xfrm_user_mapping
)

// Monitor delivers pspd's EXPIRE, ACQUIRE, MIGRATE and MAPPING events until ctx is
// done. Events about other owners' state are not delivered. Decoding
// failures are counted and logged, never fatal: a monitor must outlive a
// kernel that sends something new.
func (h *Handle) Monitor(ctx context.Context, events chan<- Event) error {
	conn, err := netlink.Dial(unix.NETLINK_XFRM, &netlink.Config{
		NetNS:  h.nsFD,
		Groups: 1<<(grpAcquire-1) | 1<<(grpExpire-1) | 1<<(grpMigrate-1) | 1<<(grpMapping-1),
	})
	if err != nil {
		return fmt.Errorf("xfrm: monitor: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer func() {
		if stop() {
			conn.Close()
		}
	}()
	for {
		msgs, err := conn.Receive()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, unix.ENOBUFS) {
				// The kernel dropped events; the caller's reconcile and
				// lifetimes still hold, so keep listening.
				h.log.Warn("xfrm: monitor overrun, events lost")
				continue
			}
			return fmt.Errorf("xfrm: monitor: %w", err)
		}
		for _, m := range msgs {
			ev, ok, err := decodeEvent(uint16(m.Header.Type), m.Data)
			if err != nil {
				h.log.Warn("xfrm: monitor: dropped malformed event", "type", m.Header.Type, "err", err)
				continue
			}
			if !ok || !h.owner.ownsReqID(ev.ReqID) {
				continue
			}
			// MIGRATE and MAPPING messages carry no mark; the others
			// must carry ours.
			if ev.Kind != Migrate && ev.Kind != Mapping && !h.owner.ownsMark(ev.mark.Value, ev.mark.Mask) {
				continue
			}
			select {
			case events <- ev.Event:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
}

type decoded struct {
	Event
	mark nl.XfrmMark
}

// decodeEvent parses one XFRM multicast message. ok is false for message
// types the monitor does not report.
func decodeEvent(typ uint16, b []byte) (decoded, bool, error) {
	var ev decoded
	switch typ {
	case nl.XFRM_MSG_EXPIRE:
		if len(b) < sizeofUserExpire {
			return ev, false, fmt.Errorf("expire message is %d bytes, want %d", len(b), sizeofUserExpire)
		}
		var info nl.XfrmUsersaInfo
		copy(structBytes(&info), b)
		if info.Family != unix.AF_INET && info.Family != unix.AF_INET6 {
			return ev, false, fmt.Errorf("expire message has address family %d", info.Family)
		}
		ev.Kind = SoftExpire
		if b[nl.SizeofXfrmUsersaInfo] != 0 {
			ev.Kind = HardExpire
		}
		ev.SA = ID{Dst: fromXaddr(info.Id.Daddr, info.Family), SPI: nl.Swap32(info.Id.Spi)}
		ev.Src = fromXaddr(info.Saddr, info.Family)
		ev.Dst = ev.SA.Dst
		ev.ReqID = info.Reqid
		ev.mark = markAttr(b[sizeofUserExpire:])
		return ev, true, nil
	case nl.XFRM_MSG_ACQUIRE:
		if len(b) < sizeofUserAcquire {
			return ev, false, fmt.Errorf("acquire message is %d bytes, want %d", len(b), sizeofUserAcquire)
		}
		var sel nl.XfrmSelector
		copy(structBytes(&sel), b[40:]) // after xfrm_id and saddr
		if sel.Family != unix.AF_INET && sel.Family != unix.AF_INET6 {
			return ev, false, fmt.Errorf("acquire message has selector family %d", sel.Family)
		}
		ev.Kind = Acquire
		ev.Src = fromXaddr(sel.Saddr, sel.Family)
		ev.Dst = fromXaddr(sel.Daddr, sel.Family)
		attrs := b[sizeofUserAcquire:]
		ev.mark = markAttr(attrs)
		for _, a := range parseAttrs(attrs) {
			if a.typ == nl.XFRMA_TMPL && len(a.data) >= nl.SizeofXfrmUserTmpl {
				var t nl.XfrmUserTmpl
				copy(structBytes(&t), a.data)
				ev.ReqID = t.Reqid
			}
		}
		return ev, true, nil
	case nl.XFRM_MSG_MIGRATE:
		if len(b) < nl.SizeofXfrmUserpolicyId {
			return ev, false, fmt.Errorf("migrate message is %d bytes, want %d", len(b), nl.SizeofXfrmUserpolicyId)
		}
		attrs := b[nl.SizeofXfrmUserpolicyId:]
		ev.Kind = Migrate
		ev.mark = markAttr(attrs)
		for _, a := range parseAttrs(attrs) {
			if a.typ != nl.XFRMA_MIGRATE || len(a.data) < sizeofUserMigrate {
				continue
			}
			m := a.data
			fam := binary.NativeEndian.Uint16(m[74:])
			if fam != unix.AF_INET && fam != unix.AF_INET6 {
				return ev, false, fmt.Errorf("migrate message has new family %d", fam)
			}
			ev.Dst = fromXaddr(nl.XfrmAddress(m[32:48]), fam)
			ev.Src = fromXaddr(nl.XfrmAddress(m[48:64]), fam)
			ev.ReqID = binary.NativeEndian.Uint32(m[68:])
			return ev, true, nil
		}
		return ev, false, errors.New("migrate message without a migrate entry")
	case nl.XFRM_MSG_MAPPING:
		if len(b) < sizeofUserMapping {
			return ev, false, fmt.Errorf("mapping message is %d bytes, want %d", len(b), sizeofUserMapping)
		}
		// struct xfrm_user_mapping: xfrm_usersa_id (daddr, spi, family,
		// proto), reqid, old and new saddr, old and new sport.
		fam := binary.NativeEndian.Uint16(b[20:])
		if fam != unix.AF_INET && fam != unix.AF_INET6 {
			return ev, false, fmt.Errorf("mapping message has address family %d", fam)
		}
		ev.Kind = Mapping
		ev.SA = ID{Dst: fromXaddr(nl.XfrmAddress(b[0:16]), fam), SPI: binary.BigEndian.Uint32(b[16:])}
		ev.Dst = ev.SA.Dst
		ev.ReqID = binary.NativeEndian.Uint32(b[24:])
		ev.Src = fromXaddr(nl.XfrmAddress(b[44:60]), fam)
		ev.Port = binary.BigEndian.Uint16(b[62:])
		return ev, true, nil
	}
	return ev, false, nil
}

func markAttr(attrs []byte) nl.XfrmMark {
	var m nl.XfrmMark
	for _, a := range parseAttrs(attrs) {
		if a.typ == nl.XFRMA_MARK && len(a.data) >= 8 {
			copy(structBytes(&m), a.data)
		}
	}
	return m
}

// WatchUnknownSPI polls the namespace's XfrmInNoStates counter every
// interval and sends an UnknownSPI event when it grew, so at most one
// event per interval whatever the packet rate. The kernel's ACQUIRE does
// not fire for inbound ESP, so this is how a peer that restarted and lost
// its SAs is noticed while only it is sending.
func (h *Handle) WatchUnknownSPI(ctx context.Context, interval time.Duration, events chan<- Event) error {
	f, err := h.openStat()
	if err != nil {
		return fmt.Errorf("xfrm: watch unknown SPIs: %w", err)
	}
	defer f.Close()
	read := func() (uint64, error) {
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return 0, err
		}
		return parseXfrmStat(f, "XfrmInNoStates")
	}
	last, err := read()
	if err != nil {
		return fmt.Errorf("xfrm: watch unknown SPIs: %w", err)
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		n, err := read()
		if err != nil {
			return fmt.Errorf("xfrm: watch unknown SPIs: %w", err)
		}
		if n > last {
			select {
			case events <- Event{Kind: UnknownSPI, Count: n - last}:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		last = n
	}
}

// openStat opens the Handle's namespace's /proc/net/xfrm_stat.
func (h *Handle) openStat() (*os.File, error) {
	fd, err := inNetNS(h.nsFD, func() (int, error) {
		return unix.Open("/proc/thread-self/net/xfrm_stat", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	})
	if err != nil {
		return nil, fmt.Errorf("open xfrm_stat (kernel without CONFIG_XFRM_STATISTICS?): %w", err)
	}
	return os.NewFile(uintptr(fd), "xfrm_stat"), nil
}

// Counters returns the namespace's XFRM error counters (the kernel's
// /proc/net/xfrm_stat, such as XfrmInNoStates or XfrmInStateProtoError) by
// name. They count every SA's packets, pspd's and any other owner's.
func (h *Handle) Counters() (map[string]uint64, error) {
	f, err := h.openStat()
	if err != nil {
		return nil, fmt.Errorf("xfrm: %w", err)
	}
	defer f.Close()
	out := map[string]uint64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := bytes.Fields(sc.Bytes())
		if len(fs) != 2 {
			continue
		}
		if v, err := strconv.ParseUint(string(fs[1]), 10, 64); err == nil {
			out[string(fs[0])] = v
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("xfrm: read xfrm_stat: %w", err)
	}
	return out, nil
}

// parseXfrmStat finds one counter in /proc/net/xfrm_stat ("Name<spaces>N"
// lines).
func parseXfrmStat(r io.Reader, name string) (uint64, error) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := bytes.Fields(sc.Bytes())
		if len(f) == 2 && string(f[0]) == name {
			v, err := strconv.ParseUint(string(f[1]), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("xfrm_stat %s: %w", name, err)
			}
			return v, nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("xfrm_stat has no %s counter", name)
}
