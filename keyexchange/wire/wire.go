// Package wire is pspd's control protocol: the messages two peers exchange
// over their authenticated QUIC connection and the frame format that
// carries them.
//
// A frame is
//
//	version u8 | type u8 | length u16 (big endian) | body (length bytes)
//
// with the body bounded by MaxBody. Every integer is big endian. Decoders
// validate every field and return a *ProtocolError for anything they do not
// fully understand (unknown version or type, wrong length, out-of-range
// value); they never panic and never return a half-filled message. The only
// message that carries key material is ExplicitKey; its buffers are wiped
// on both the encode and the decode path.
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"unicode/utf8"

	"github.com/pspd/pspd/assoc"
	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/kdf"
)

// Version is the protocol version in every frame header.
const Version = 1

const (
	headerLen = 4
	// MaxBody bounds a frame body. Every message is far smaller; the bound
	// keeps a peer from making us buffer more than this per stream.
	MaxBody = 4092
	// MaxErrorText bounds the text of an Error message.
	MaxErrorText = 512
)

// Type is a message type.
type Type uint8

const (
	TypeHello Type = iota + 1
	TypeSAOffer
	TypeSAAck
	TypeSAConfirm
	TypeExplicitKey
	TypeRekey
	TypeDelete
	TypeError
	TypeGoodbye
	typeLast = TypeGoodbye
)

func (t Type) String() string {
	switch t {
	case TypeHello:
		return "Hello"
	case TypeSAOffer:
		return "SAOffer"
	case TypeSAAck:
		return "SAAck"
	case TypeSAConfirm:
		return "SAConfirm"
	case TypeExplicitKey:
		return "ExplicitKey"
	case TypeRekey:
		return "Rekey"
	case TypeDelete:
		return "Delete"
	case TypeError:
		return "Error"
	case TypeGoodbye:
		return "Goodbye"
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// Message is one control message.
type Message interface {
	Type() Type
	appendBody(b []byte) []byte
}

// Backend is a data plane that can install SAs (package assoc owns the
// type).
type Backend = assoc.Backend

const (
	BackendPSP       = assoc.BackendPSP
	BackendXFRM      = assoc.BackendXFRM
	BackendUserspace = assoc.BackendUserspace
)

// Backends is a set of backends.
type Backends uint8

const allBackends = Backends(1<<BackendPSP | 1<<BackendXFRM | 1<<BackendUserspace)

// NewBackends returns the set of bs.
func NewBackends(bs ...Backend) Backends {
	var s Backends
	for _, b := range bs {
		if b.Valid() {
			s |= 1 << b
		}
	}
	return s
}

// Has reports whether b is in the set.
func (s Backends) Has(b Backend) bool { return b.Valid() && s&(1<<b) != 0 }

// String lists the set's backends, or says "none".
func (s Backends) String() string {
	var names []string
	for b := BackendPSP; b <= BackendUserspace; b++ {
		if s.Has(b) {
			names = append(names, b.String())
		}
	}
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}

// Suites is a set of AEAD suites.
type Suites uint8

const allSuites = Suites(1<<kdf.AESGCM128 | 1<<kdf.AESGCM256)

// NewSuites returns the set of ss.
func NewSuites(ss ...kdf.Suite) Suites {
	var s Suites
	for _, x := range ss {
		if x.Valid() {
			s |= 1 << x
		}
	}
	return s
}

// Has reports whether x is in the set.
func (s Suites) Has(x kdf.Suite) bool { return x.Valid() && s&(1<<x) != 0 }

// BootID is generated once per process start; a peer that sees a new one
// knows the other side restarted and lost every key.
type BootID [16]byte

// AssocID names an association between two peers (package assoc owns the
// type).
type AssocID = assoc.ID

// Hello opens a session in both directions.
type Hello struct {
	Backends Backends
	Suites   Suites
	BootID   BootID
	// SPIFloor is the highest SPI counter (either role) the sender still
	// has installed for this peer. Both sides allocate above it, so a new
	// session never reuses an SPI of a generation that one side kept and
	// the other rolled back when the previous session died mid-negotiation.
	SPIFloor uint32
	// Observed is where the sender sees the receiver's end of the session
	// from (its QUIC remote address): behind a NAT, the NAT's public
	// address and port. The receiver compares it with its own socket
	// address to learn whether a NAT sits in front of it (NAT detection,
	// as IKEv2's NAT_DETECTION payloads). Zero: the sender did not say
	// (an older pspd).
	Observed netip.AddrPort
	// Source is where the sender believes its own end of the session is:
	// the address and port it sends from. A receiver that sees the
	// session come from elsewhere knows a NAT sits in front of the sender,
	// whatever address it was configured with for it (IKEv2's
	// NAT_DETECTION_SOURCE_IP). Zero: the sender did not say.
	Source netip.AddrPort
	// PSP, when PSPKnown, are the kernel PSP versions the sender's PSP
	// devices accept (the union of their psp-versions-ena when the
	// session began), so that an upgrade the peer's devices would refuse
	// is refused before either socket gets a key. A pspd without kernel
	// PSP, or an older one, does not say.
	PSP      PSPVersions
	PSPKnown bool
}

// PSPVersions is a set of kernel PSP versions (enum psp_version: 0 is
// hdr0-aes-gcm-128, 1 hdr0-aes-gcm-256, 2 and 3 the GMAC ones), bit 1<<v
// for version v, as the psp family's psp-versions-ena. Bits of versions
// a later kernel adds travel unchanged.
type PSPVersions uint32

// Has reports whether version v is in the set.
func (s PSPVersions) Has(v uint32) bool { return v < 32 && s&(1<<v) != 0 }

// Hello extensions follow the fixed fields as
//
//	type u8 | length u8 | value (length bytes)
//
// in increasing type order, each type at most once. A receiver skips a
// type it does not know, so a later version can add fields without a new
// frame version; a known type with a bad value is refused.
const (
	helloExtObserved = 1 // value: family u8 | address [16] | port u16, as ExplicitKey's
	helloExtSource   = 2 // value: as helloExtObserved's
	helloExtPSP      = 3 // value: PSPVersions u32
)

// SAOffer is the initiator's proposal: it will receive on RxSPI.
type SAOffer struct {
	Assoc      AssocID
	Generation uint32
	Backend    Backend
	Suite      kdf.Suite
	RxSPI      kdf.SPI
}

// SAAck is the responder's answer, sent after it installed the pair: it will
// receive on RxSPI.
type SAAck SAOffer

// SAConfirm is the initiator's last word: it installed the pair too. Only
// now is the SA confirmed on both sides.
type SAConfirm struct {
	Assoc      AssocID
	Generation uint32
}

// ExplicitKey carries a receive key the kernel PSP device generated for one
// TCP connection (rx-assoc); the peer needs it to transmit. It is the only
// message with key material and is only ever sent on the mutually
// authenticated channel.
type ExplicitKey struct {
	Assoc      AssocID
	Generation uint32
	Suite      kdf.Suite
	SPI        kdf.SPI
	Key        secret.Key
	// Local and Remote are the TCP endpoints as seen by the sender.
	Local, Remote netip.AddrPort
}

// Rekey asks the initiator to renegotiate an association now.
type Rekey struct {
	Assoc AssocID
}

// Delete tells the peer that a generation of an association is gone.
type Delete struct {
	Assoc      AssocID
	Generation uint32
}

// Error reports a fatal protocol or negotiation error before the sender
// closes the session.
type Error struct {
	Code ErrorCode
	Text string
}

// Goodbye tells the peer that the sender is ending the session on purpose
// and will not be back soon: the receiver marks the peer down at once
// instead of waiting for the idle timeout.
type Goodbye struct {
	Reason GoodbyeReason
}

// GoodbyeReason says why a peer said goodbye.
type GoodbyeReason uint8

const (
	GoodbyeShutdown GoodbyeReason = 1 // the sender's pspd is stopping
	GoodbyeRemoved  GoodbyeReason = 2 // the sender no longer pins the receiver
)

// Valid reports whether r is a reason this version knows.
func (r GoodbyeReason) Valid() bool { return r == GoodbyeShutdown || r == GoodbyeRemoved }

func (r GoodbyeReason) String() string {
	switch r {
	case GoodbyeShutdown:
		return "shutting down"
	case GoodbyeRemoved:
		return "removed this peer from its configuration"
	}
	return fmt.Sprintf("reason(%d)", uint8(r))
}

func (Hello) Type() Type       { return TypeHello }
func (SAOffer) Type() Type     { return TypeSAOffer }
func (SAAck) Type() Type       { return TypeSAAck }
func (SAConfirm) Type() Type   { return TypeSAConfirm }
func (ExplicitKey) Type() Type { return TypeExplicitKey }
func (Rekey) Type() Type       { return TypeRekey }
func (Delete) Type() Type      { return TypeDelete }
func (Error) Type() Type       { return TypeError }
func (Goodbye) Type() Type     { return TypeGoodbye }

// String never shows the key.
func (m ExplicitKey) String() string {
	return fmt.Sprintf("ExplicitKey{assoc=%d gen=%d suite=%s spi=%s key=%s local=%s remote=%s}",
		m.Assoc, m.Generation, m.Suite, m.SPI, m.Key, m.Local, m.Remote)
}

// Format makes every verb, including %#v and %+v, use String.
func (m ExplicitKey) Format(f fmt.State, _ rune) { io.WriteString(f, m.String()) }

// ErrorCode classifies an Error message and a ProtocolError.
type ErrorCode uint16

const (
	CodeMalformed    ErrorCode = 1 // a frame or field is invalid
	CodeVersion      ErrorCode = 2 // unknown protocol version
	CodeType         ErrorCode = 3 // unknown or unexpected message type
	CodeTooLarge     ErrorCode = 4 // frame body over MaxBody
	CodeUnsupported  ErrorCode = 5 // backend or suite not offered
	CodeInstall      ErrorCode = 6 // the backend refused the SA
	CodeSPIExhausted ErrorCode = 7 // no SPI left in this session
	CodeTimeout      ErrorCode = 8 // the peer stalled
	CodeInternal     ErrorCode = 9
	CodeSPIReuse     ErrorCode = 10 // the peer repeated an SPI of this session
	CodeRateLimit    ErrorCode = 11 // the peer negotiates faster than allowed
	CodeGeneration   ErrorCode = 12 // a generation out of order or out of range
)

func (c ErrorCode) String() string {
	switch c {
	case CodeMalformed:
		return "malformed"
	case CodeVersion:
		return "unknown version"
	case CodeType:
		return "unexpected message type"
	case CodeTooLarge:
		return "frame too large"
	case CodeUnsupported:
		return "unsupported"
	case CodeInstall:
		return "install failed"
	case CodeSPIExhausted:
		return "SPI space exhausted"
	case CodeTimeout:
		return "timeout"
	case CodeInternal:
		return "internal error"
	case CodeSPIReuse:
		return "SPI reused"
	case CodeRateLimit:
		return "rate limited"
	case CodeGeneration:
		return "bad generation"
	}
	return fmt.Sprintf("code(%d)", uint16(c))
}

// ProtocolError is a decode failure, or an Error message received from the
// peer (Remote set).
type ProtocolError struct {
	Code   ErrorCode
	Msg    string
	Remote bool
}

func (e *ProtocolError) Error() string {
	if e.Remote {
		return fmt.Sprintf("wire: peer reported %s: %s", e.Code, e.Msg)
	}
	return fmt.Sprintf("wire: %s: %s", e.Code, e.Msg)
}

func protoErr(c ErrorCode, format string, a ...any) *ProtocolError {
	return &ProtocolError{Code: c, Msg: fmt.Sprintf(format, a...)}
}

// AppendFrame appends the frame of m to b.
func AppendFrame(b []byte, m Message) ([]byte, error) {
	start := len(b)
	b = append(b, Version, byte(m.Type()), 0, 0)
	b = m.appendBody(b)
	n := len(b) - start - headerLen
	if n > MaxBody {
		secret.Zero(b[start:])
		return b[:start], protoErr(CodeTooLarge, "%s body is %d bytes, limit %d", m.Type(), n, MaxBody)
	}
	binary.BigEndian.PutUint16(b[start+2:], uint16(n))
	return b, nil
}

// WriteMessage writes m as one frame and wipes the encoding afterwards.
func WriteMessage(w io.Writer, m Message) error {
	b, err := AppendFrame(make([]byte, 0, 64), m)
	if err != nil {
		return err
	}
	defer secret.Zero(b)
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("wire: write %s: %w", m.Type(), err)
	}
	return nil
}

// ReadMessage reads one frame. It returns io.EOF if the stream ended
// cleanly before a frame, and a *ProtocolError for a frame it rejects. The
// size is checked before the body is read.
func ReadMessage(r io.Reader) (Message, error) {
	var hdr [headerLen]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		if err == io.ErrUnexpectedEOF {
			return nil, protoErr(CodeMalformed, "truncated frame header")
		}
		return nil, err
	}
	typ, n, err := parseHeader(hdr[:])
	if err != nil {
		return nil, err
	}
	body := make([]byte, n)
	defer secret.Zero(body)
	if _, err := io.ReadFull(r, body); err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return nil, protoErr(CodeMalformed, "truncated %s frame: want %d body bytes", typ, n)
		}
		return nil, err
	}
	return decodeBody(typ, body)
}

// Decode decodes exactly one frame that fills b. It does not wipe b.
func Decode(b []byte) (Message, error) {
	if len(b) < headerLen {
		return nil, protoErr(CodeMalformed, "truncated frame header (%d bytes)", len(b))
	}
	typ, n, err := parseHeader(b[:headerLen])
	if err != nil {
		return nil, err
	}
	if len(b)-headerLen != n {
		return nil, protoErr(CodeMalformed, "%s frame declares %d body bytes, has %d", typ, n, len(b)-headerLen)
	}
	return decodeBody(typ, b[headerLen:])
}

func parseHeader(h []byte) (Type, int, error) {
	if h[0] != Version {
		return 0, 0, protoErr(CodeVersion, "frame version %d, this side speaks %d", h[0], Version)
	}
	n := int(binary.BigEndian.Uint16(h[2:]))
	if n > MaxBody {
		return 0, 0, protoErr(CodeTooLarge, "frame body %d bytes, limit %d", n, MaxBody)
	}
	typ := Type(h[1])
	if typ < TypeHello || typ > typeLast {
		return 0, 0, protoErr(CodeType, "unknown message type %d", h[1])
	}
	return typ, n, nil
}

var errShort = errors.New("short")

// reader consumes a body; the first failure sticks.
type reader struct {
	b   []byte
	err error
}

func (r *reader) take(n int) []byte {
	if r.err != nil || len(r.b) < n {
		r.err = errShort
		return make([]byte, n)
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) u8() uint8   { return r.take(1)[0] }
func (r *reader) u16() uint16 { return binary.BigEndian.Uint16(r.take(2)) }
func (r *reader) u32() uint32 { return binary.BigEndian.Uint32(r.take(4)) }
func (r *reader) u64() uint64 { return binary.BigEndian.Uint64(r.take(8)) }

func (r *reader) addrPort() (netip.AddrPort, error) {
	fam := r.u8()
	raw := r.take(16)
	port := r.u16()
	if r.err != nil {
		return netip.AddrPort{}, nil
	}
	a := netip.AddrFrom16([16]byte(raw))
	switch fam {
	case 4:
		if !a.Is4In6() {
			return netip.AddrPort{}, fmt.Errorf("IPv4 address not in ::ffff:0:0/96 form")
		}
		a = a.Unmap()
	case 6:
		if a.Is4In6() {
			return netip.AddrPort{}, fmt.Errorf("IPv6 family with an IPv4-mapped address")
		}
	default:
		return netip.AddrPort{}, fmt.Errorf("address family %d (want 4 or 6)", fam)
	}
	if port == 0 || a.IsUnspecified() {
		return netip.AddrPort{}, fmt.Errorf("address %s port %d: must be specified", a, port)
	}
	return netip.AddrPortFrom(a, port), nil
}

func appendAddrPort(b []byte, ap netip.AddrPort) []byte {
	fam := byte(6)
	if ap.Addr().Is4() {
		fam = 4
	}
	a := ap.Addr().As16()
	b = append(b, fam)
	b = append(b, a[:]...)
	return binary.BigEndian.AppendUint16(b, ap.Port())
}

func (m Hello) appendBody(b []byte) []byte {
	b = append(b, byte(m.Backends), byte(m.Suites))
	b = append(b, m.BootID[:]...)
	b = binary.BigEndian.AppendUint32(b, m.SPIFloor)
	if m.Observed.IsValid() {
		b = append(b, helloExtObserved, addrPortLen)
		b = appendAddrPort(b, m.Observed)
	}
	if m.Source.IsValid() {
		b = append(b, helloExtSource, addrPortLen)
		b = appendAddrPort(b, m.Source)
	}
	if m.PSPKnown {
		b = append(b, helloExtPSP, 4)
		b = binary.BigEndian.AppendUint32(b, uint32(m.PSP))
	}
	return b
}

// addrPortLen is the encoded size of an address and port.
const addrPortLen = 1 + 16 + 2

// helloExts decodes the extensions of a Hello into m.
func helloExts(r *reader, m *Hello) error {
	last := -1
	for r.err == nil && len(r.b) > 0 {
		typ := int(r.u8())
		n := int(r.u8())
		v := r.take(n)
		if r.err != nil {
			return nil // reported as too short
		}
		if typ <= last {
			return fmt.Errorf("extension %d after %d: out of order or repeated", typ, last)
		}
		last = typ
		var field *netip.AddrPort
		var what string
		switch typ {
		case helloExtPSP:
			if n != 4 {
				return fmt.Errorf("PSP versions extension is %d bytes, want 4", n)
			}
			m.PSP, m.PSPKnown = PSPVersions(binary.BigEndian.Uint32(v)), true
			continue
		case helloExtObserved:
			field, what = &m.Observed, "observed address"
		case helloExtSource:
			field, what = &m.Source, "source address"
		default:
			continue
		}
		if n != addrPortLen {
			return fmt.Errorf("%s extension is %d bytes, want %d", what, n, addrPortLen)
		}
		er := &reader{b: v}
		ap, err := er.addrPort()
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		*field = ap
	}
	return nil
}

func (m SAOffer) appendBody(b []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, uint64(m.Assoc))
	b = binary.BigEndian.AppendUint32(b, m.Generation)
	b = append(b, byte(m.Backend), byte(m.Suite))
	return binary.BigEndian.AppendUint32(b, uint32(m.RxSPI))
}

func (m SAAck) appendBody(b []byte) []byte { return SAOffer(m).appendBody(b) }

func (m SAConfirm) appendBody(b []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, uint64(m.Assoc))
	return binary.BigEndian.AppendUint32(b, m.Generation)
}

func (m ExplicitKey) appendBody(b []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, uint64(m.Assoc))
	b = binary.BigEndian.AppendUint32(b, m.Generation)
	b = append(b, byte(m.Suite))
	b = binary.BigEndian.AppendUint32(b, uint32(m.SPI))
	b = appendAddrPort(b, m.Local)
	b = appendAddrPort(b, m.Remote)
	b = append(b, byte(m.Key.Len()))
	return append(b, m.Key.Bytes()...)
}

func (m Rekey) appendBody(b []byte) []byte {
	return binary.BigEndian.AppendUint64(b, uint64(m.Assoc))
}

func (m Delete) appendBody(b []byte) []byte { return SAConfirm(m).appendBody(b) }

func (m Goodbye) appendBody(b []byte) []byte { return append(b, byte(m.Reason)) }

func (m Error) appendBody(b []byte) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(m.Code))
	t := strings.ToValidUTF8(m.Text, "?")
	if len(t) > MaxErrorText {
		t = t[:MaxErrorText]
		for !utf8.ValidString(t) {
			t = t[:len(t)-1]
		}
	}
	return append(b, t...)
}

func decodeBody(typ Type, body []byte) (Message, error) {
	r := &reader{b: body}
	m, err := decodeFields(typ, r)
	if err == nil && r.err != nil {
		err = fmt.Errorf("body too short (%d bytes)", len(body))
	}
	if err == nil && len(r.b) != 0 {
		err = fmt.Errorf("%d trailing bytes", len(r.b))
	}
	if err != nil {
		if ek, ok := m.(ExplicitKey); ok {
			ek.Key.Wipe()
		}
		return nil, protoErr(CodeMalformed, "%s: %v", typ, err)
	}
	return m, nil
}

func decodeFields(typ Type, r *reader) (Message, error) {
	switch typ {
	case TypeHello:
		m := Hello{Backends: Backends(r.u8()), Suites: Suites(r.u8()), BootID: BootID(r.take(16)), SPIFloor: r.u32()}
		switch {
		case r.err != nil:
		case m.Backends == 0 || m.Backends&^allBackends != 0:
			return nil, fmt.Errorf("backend set %#x", uint8(m.Backends))
		case m.Suites == 0 || m.Suites&^allSuites != 0:
			return nil, fmt.Errorf("suite set %#x", uint8(m.Suites))
		case m.BootID == BootID{}:
			return nil, fmt.Errorf("zero boot id")
		case m.SPIFloor >= kdf.MaxKeyID:
			return nil, fmt.Errorf("SPI floor %d leaves no SPI", m.SPIFloor)
		default:
			if err := helloExts(r, &m); err != nil {
				return nil, err
			}
		}
		return m, nil
	case TypeSAOffer, TypeSAAck:
		m := SAOffer{Assoc: AssocID(r.u64()), Generation: r.u32(), Backend: Backend(r.u8()), Suite: kdf.Suite(r.u8()), RxSPI: kdf.SPI(r.u32())}
		if r.err == nil {
			if err := checkSA(m.Backend, m.Suite, m.RxSPI); err != nil {
				return nil, err
			}
		}
		if typ == TypeSAAck {
			return SAAck(m), nil
		}
		return m, nil
	case TypeSAConfirm, TypeDelete:
		m := SAConfirm{Assoc: AssocID(r.u64()), Generation: r.u32()}
		if typ == TypeDelete {
			return Delete(m), nil
		}
		return m, nil
	case TypeExplicitKey:
		return decodeExplicitKey(r)
	case TypeRekey:
		return Rekey{Assoc: AssocID(r.u64())}, nil
	case TypeError:
		m := Error{Code: ErrorCode(r.u16())}
		if r.err != nil {
			return nil, nil
		}
		if len(r.b) > MaxErrorText || !utf8.Valid(r.b) {
			return nil, fmt.Errorf("error text must be at most %d bytes of UTF-8", MaxErrorText)
		}
		m.Text = string(r.take(len(r.b)))
		return m, nil
	case TypeGoodbye:
		m := Goodbye{Reason: GoodbyeReason(r.u8())}
		if r.err == nil && !m.Reason.Valid() {
			return nil, fmt.Errorf("unknown reason %d", uint8(m.Reason))
		}
		return m, nil
	}
	return nil, fmt.Errorf("unhandled type %d", typ)
}

func checkSA(b Backend, s kdf.Suite, spi kdf.SPI) error {
	if !b.Valid() {
		return fmt.Errorf("unknown backend %d", uint8(b))
	}
	if !s.Valid() {
		return fmt.Errorf("unknown suite %d", uint8(s))
	}
	if spi.KeyID() == 0 {
		return fmt.Errorf("SPI %s has a zero key id", spi)
	}
	return nil
}

func decodeExplicitKey(r *reader) (Message, error) {
	m := ExplicitKey{Assoc: AssocID(r.u64()), Generation: r.u32(), Suite: kdf.Suite(r.u8()), SPI: kdf.SPI(r.u32())}
	var err error
	if m.Local, err = r.addrPort(); err != nil {
		return nil, fmt.Errorf("local: %w", err)
	}
	if m.Remote, err = r.addrPort(); err != nil {
		return nil, fmt.Errorf("remote: %w", err)
	}
	n := int(r.u8())
	key := r.take(n)
	if r.err != nil {
		return nil, nil
	}
	if err := checkSA(BackendPSP, m.Suite, m.SPI); err != nil {
		return nil, err
	}
	if n != m.Suite.KeyLen() {
		return nil, fmt.Errorf("key is %d bytes, suite %s needs %d", n, m.Suite, m.Suite.KeyLen())
	}
	if m.Local.Addr().Is4() != m.Remote.Addr().Is4() {
		return nil, fmt.Errorf("local %s and remote %s are of different families", m.Local, m.Remote)
	}
	m.Key = secret.New(key)
	return m, nil
}
