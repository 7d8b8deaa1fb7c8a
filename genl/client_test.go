package genl

// These tests run the client against a FAKE kernel: mdlayher/genetlink's
// genltest (and netlink's nltest where a raw error message with extended
// ack is needed). The same code paths run against the real kernel in
// kernel_test.go inside the VM. Golden request and reply bytes are written
// out by hand from the attribute tables in psp.md (little-endian, as on
// every machine this project targets), not produced by this package's
// encoder.

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/genetlink/genltest"
	"github.com/mdlayher/netlink"
	"github.com/mdlayher/netlink/nltest"
	"github.com/pspd/pspd/internal/secret"
	"golang.org/x/sys/unix"
)

const testFamilyID = 0x1d

var testFamily = genetlink.Family{
	ID:      testFamilyID,
	Name:    "psp",
	Version: 1,
	Groups:  []genetlink.MulticastGroup{{ID: 5, Name: "mgmt"}, {ID: 6, Name: "use"}},
}

// hx decodes hex with spaces allowed.
func hx(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatalf("bad golden hex %q: %v", s, err)
	}
	return b
}

func littleEndian(t *testing.T) {
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		t.Skip("golden bytes are little-endian; this machine is big-endian")
	}
}

// fakeClient builds a client whose request socket is served by fn after
// the family lookup.
func fakeClient(t *testing.T, fn genltest.Func) *Client {
	t.Helper()
	littleEndian(t)
	c, err := newClient(genltest.Dial(genltest.ServeFamily(testFamily, fn)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// expect returns a fake kernel that checks one request exactly and answers
// with the given reply attributes (or errno if non-zero).
func expect(t *testing.T, cmd uint8, flags netlink.HeaderFlags, req string, replies ...string) genltest.Func {
	return genltest.CheckRequest(testFamilyID, cmd, flags, func(greq genetlink.Message, _ netlink.Message) ([]genetlink.Message, error) {
		if greq.Header.Version != 1 {
			t.Errorf("genl header version %d, want 1", greq.Header.Version)
		}
		if want := hx(t, req); !bytes.Equal(greq.Data, want) {
			t.Errorf("request attributes\n got % x\nwant % x", greq.Data, want)
		}
		var out []genetlink.Message
		for _, r := range replies {
			out = append(out, genetlink.Message{Header: genetlink.Header{Command: cmd, Version: 1}, Data: hx(t, r)})
		}
		return out, nil
	})
}

// Attribute bytes used below: u32 attribute = len 08 00, type, value LE.
const (
	attrID7      = "08000100 07000000"
	devReply7    = attrID7 + " 08000200 03000000 08000300 0f000000 08000400 01000000"
	devReply9    = "08000100 09000000 08000200 04000000 08000300 03000000 08000400 00000000"
	key16        = "00112233445566778899aabbccddeeff"
	key32        = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
	rxAssocReply = attrID7 + " 20000380 14000100 " + key16 + " 08000200 01000080"
)

func TestDevGet(t *testing.T) {
	c := fakeClient(t, expect(t, 1, netlink.Request, attrID7, devReply7))
	d, err := c.DevGet(7)
	if err != nil {
		t.Fatal(err)
	}
	want := Device{ID: 7, Ifindex: 3, Cap: 0xf, Enabled: VersionsOf(AESGCM128), NSID: -1}
	if !reflect.DeepEqual(d, want) {
		t.Fatalf("DevGet = %+v, want %+v", d, want)
	}
}

// TestDecodeDevice73 reads the device attributes Linux 7.3 adds: a device
// seen from a namespace it was associated with (dev-assoc) carries the
// by-association flag and only the associated devices of that namespace,
// and net-next leaves out ifindex there (and in dev-del-ntf): such a
// device must still decode, or one of them breaks the whole dump.
func TestDecodeDevice73(t *testing.T) {
	littleEndian(t)
	for _, tc := range []struct {
		name  string
		attrs string
		want  Device
	}{
		{"primary with assoc-list", devReply7 + " 14000580 08000100 05000000 08000200 02000000" + " 14000580 08000100 06000000 08000200 ffffffff",
			Device{ID: 7, Ifindex: 3, Cap: 0xf, Enabled: 1, NSID: -1, AssocList: []AssocDev{{Ifindex: 5, NSID: 2}, {Ifindex: 6, NSID: -1}}}},
		{"by association, no ifindex", "08000100 09000000 08000300 0f000000 08000400 01000000 04000700 14000580 08000100 05000000 08000200 ffffffff",
			Device{ID: 9, Cap: 0xf, Enabled: 1, NSID: -1, ByAssociation: true, AssocList: []AssocDev{{Ifindex: 5, NSID: -1}}}},
		{"nsid", devReply7 + " 08000600 03000000", Device{ID: 7, Ifindex: 3, Cap: 0xf, Enabled: 1, NSID: 3}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := decodeDevice(hx(t, tc.attrs))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(d, tc.want) {
				t.Fatalf("decoded %+v, want %+v", d, tc.want)
			}
		})
	}
	// Still required: id and the version sets.
	for _, bad := range []string{"08000300 0f000000 08000400 01000000", attrID7 + " 08000400 01000000", attrID7 + " 08000300 0f000000", attrID7 + " 08000300 0f000000 08000400 01000000 0c000580 06000100 05000000"} {
		if d, err := decodeDevice(hx(t, bad)); err == nil {
			t.Errorf("decoded %q as %+v, want an error", bad, d)
		}
	}
}

func TestDevicesDump(t *testing.T) {
	c := fakeClient(t, expect(t, 1, netlink.Request|netlink.Dump, "", devReply7, devReply9))
	devs, err := c.Devices()
	if err != nil {
		t.Fatal(err)
	}
	if len(devs) != 2 || devs[0].ID != 7 || devs[1].ID != 9 || devs[1].Cap != VersionsOf(AESGCM128, AESGCM256) {
		t.Fatalf("Devices = %+v", devs)
	}
}

func TestDevSet(t *testing.T) {
	c := fakeClient(t, expect(t, 4, netlink.Request, attrID7+" 08000400 03000000", ""))
	if err := c.DevSet(7, VersionsOf(AESGCM128, AESGCM256)); err != nil {
		t.Fatal(err)
	}
}

func TestKeyRotate(t *testing.T) {
	c := fakeClient(t, expect(t, 6, netlink.Request, attrID7, attrID7))
	if err := c.KeyRotate(7); err != nil {
		t.Fatal(err)
	}
}

func TestKeyRotateWrongReply(t *testing.T) {
	c := fakeClient(t, expect(t, 6, netlink.Request, attrID7, "08000100 08000000"))
	if err := c.KeyRotate(7); err == nil || !strings.Contains(err.Error(), "device 8") {
		t.Fatalf("KeyRotate with a reply for another device: %v", err)
	}
}

func TestRxAssoc(t *testing.T) {
	c := fakeClient(t, expect(t, 8, netlink.Request,
		attrID7+" 08000200 00000000 08000500 05000000", rxAssocReply))
	r, err := c.RxAssoc(FD(5), AESGCM128, 7)
	if err != nil {
		t.Fatal(err)
	}
	if r.DevID != 7 || r.Key.SPI != 0x80000001 || r.Key.SPI.Phase() != 1 || r.Key.SPI.KeyID() != 1 {
		t.Fatalf("RxAssoc = dev %d spi %v", r.DevID, r.Key.SPI)
	}
	if !r.Key.Key.Equal(secret.New(hx(t, key16))) {
		t.Fatal("RxAssoc key differs from the reply's")
	}
	// Formatting the result must not show the key.
	out := fmt.Sprintf("%v %+v %#v %x", r, r, r, r.Key.Key)
	if strings.Contains(out, key16) || strings.Contains(out, "0x11, 0x22") || strings.Contains(out, "17 34 51") {
		t.Fatalf("key bytes in formatted RxAssoc: %s", out)
	}
}

func TestRxAssocWithoutDevID(t *testing.T) {
	c := fakeClient(t, expect(t, 8, netlink.Request, "08000200 01000000 08000500 2a000000",
		attrID7+" 30000380 24000100 "+key32+" 08000200 02000000"))
	r, err := c.RxAssoc(FD(42), AESGCM256, 0)
	if err != nil {
		t.Fatal(err)
	}
	if r.DevID != 7 || r.Key.SPI != 2 || r.Key.Key.Len() != 32 {
		t.Fatalf("RxAssoc = dev %d spi %v keylen %d", r.DevID, r.Key.SPI, r.Key.Key.Len())
	}
}

func TestRxAssocKeyLengthVsVersion(t *testing.T) {
	// The kernel answered with a 16-byte key for a 256-bit version: refuse.
	c := fakeClient(t, expect(t, 8, netlink.Request, "08000200 01000000 08000500 05000000", rxAssocReply))
	if _, err := c.RxAssoc(FD(5), AESGCM256, 0); err == nil {
		t.Fatal("RxAssoc accepted a key of the wrong length")
	}
}

func TestTxAssoc(t *testing.T) {
	c := fakeClient(t, expect(t, 9, netlink.Request,
		"08000200 01000000 30000480 24000100 "+key32+" 08000200 78563412 08000500 05000000", ""))
	k := AssocKey{SPI: 0x12345678, Key: secret.New(hx(t, key32))}
	if err := c.TxAssoc(FD(5), AESGCM256, 0, k); err != nil {
		t.Fatal(err)
	}
	if k.Key.IsZero() {
		t.Fatal("TxAssoc wiped the caller's key")
	}
}

func TestTxAssocWithDevID(t *testing.T) {
	c := fakeClient(t, expect(t, 9, netlink.Request,
		attrID7+" 08000200 02000000 20000480 14000100 "+key16+" 08000200 ffffffff 08000500 03000000", ""))
	k := AssocKey{SPI: 0xffffffff, Key: secret.New(hx(t, key16))}
	if err := c.TxAssoc(FD(3), AESGMAC128, 7, k); err != nil {
		t.Fatal(err)
	}
}

func TestStats(t *testing.T) {
	// Counters come as 4 or 8 bytes (NLA_UINT); 8-byte attributes are 12 long.
	reply := attrID7 +
		" 08000200 02000000" + // key-rotations 2 (4 bytes)
		" 0c000300 0100000000000000" + // stale-events 1 (8 bytes)
		" 0c000400 0000000001000000" + // rx-packets 1<<32
		" 08000500 e8030000" + // rx-bytes 1000
		" 08000600 03000000 08000700 04000000 08000800 05000000" +
		" 08000900 06000000 0c000a00 ffffffffffffffff 08000b00 07000000"
	c := fakeClient(t, expect(t, 10, netlink.Request, attrID7, reply))
	s, err := c.Stats(7)
	if err != nil {
		t.Fatal(err)
	}
	want := Stats{DevID: 7, KeyRotations: 2, StaleEvents: 1, RxPackets: 1 << 32, RxBytes: 1000,
		RxAuthFail: 3, RxError: 4, RxBad: 5, TxPackets: 6, TxBytes: 1<<64 - 1, TxError: 7}
	if s != want {
		t.Fatalf("Stats = %+v\nwant %+v", s, want)
	}
}

func TestAllStats(t *testing.T) {
	c := fakeClient(t, expect(t, 10, netlink.Request|netlink.Dump, "",
		attrID7+" 08000400 0a000000", "08000100 09000000 0c000900 0b00000000000000"))
	all, err := c.AllStats()
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 2 || all[0].DevID != 7 || all[0].RxPackets != 10 || all[1].DevID != 9 || all[1].TxPackets != 11 {
		t.Fatalf("AllStats = %+v", all)
	}
}

func TestStatsBadCounterSize(t *testing.T) {
	c := fakeClient(t, expect(t, 10, netlink.Request, attrID7, attrID7+" 06000400 0100 0000"))
	if _, err := c.Stats(7); err == nil || !strings.Contains(err.Error(), "rx-packets is 2 bytes") {
		t.Fatalf("Stats with a 2-byte counter: %v", err)
	}
}

func TestNoFamily(t *testing.T) {
	littleEndian(t)
	conn := genltest.Dial(func(genetlink.Message, netlink.Message) ([]genetlink.Message, error) {
		return nil, genltest.Error(int(unix.ENOENT))
	})
	defer conn.Close()
	if _, err := newClient(conn); !errors.Is(err, ErrNoFamily) {
		t.Fatalf("newClient without the family: %v", err)
	}
}

// The requests below must fail before anything is sent.
func TestValidation(t *testing.T) {
	c := fakeClient(t, func(greq genetlink.Message, _ netlink.Message) ([]genetlink.Message, error) {
		t.Errorf("request sent despite invalid input: cmd %d", greq.Header.Command)
		return nil, genltest.Error(int(unix.EINVAL))
	})
	k16 := AssocKey{SPI: 1, Key: secret.New(make([]byte, 16))}
	for _, tc := range []struct {
		name, field string
		err         error
	}{
		{"dev-get id 0", "dev-get id", func() error { _, err := c.DevGet(0); return err }()},
		{"dev-set id 0", "dev-set id", c.DevSet(0, 1)},
		{"dev-set mask", "psp-versions-ena", c.DevSet(1, 0x10)},
		{"key-rotate id 0", "key-rotate id", c.KeyRotate(0)},
		{"stats id 0", "get-stats dev-id", func() error { _, err := c.Stats(0); return err }()},
		{"rx version", "version 4", func() error { _, err := c.RxAssoc(FD(3), 4, 1); return err }()},
		{"tx version", "version 9", c.TxAssoc(FD(3), 9, 1, k16)},
		{"tx key length", "tx-key key is 16 bytes", c.TxAssoc(FD(3), AESGCM256, 1, k16)},
		{"tx spi", "tx-key spi", c.TxAssoc(FD(3), AESGCM128, 1, AssocKey{SPI: 0x80000000, Key: k16.Key})},
	} {
		if tc.err == nil || !strings.Contains(tc.err.Error(), tc.field) {
			t.Errorf("%s: error %v does not name %q", tc.name, tc.err, tc.field)
		}
	}
}

// errorClient answers every request after the family lookup with a raw
// NLMSG_ERROR carrying errno and, if msg is set, an extended-ack message,
// laid out as the kernel does (errno, echoed request, TLVs).
func errorClient(t *testing.T, errno unix.Errno, msg string) *Client {
	t.Helper()
	littleEndian(t)
	conn := genetlink.NewConn(nltest.Dial(func(reqs []netlink.Message) ([]netlink.Message, error) {
		req := reqs[0]
		echo, err := req.MarshalBinary()
		if err != nil {
			return nil, err
		}
		data := binary.LittleEndian.AppendUint32(nil, uint32(-int32(errno)))
		data = append(data, echo...)
		flags := netlink.HeaderFlags(0)
		if msg != "" {
			flags |= netlink.AcknowledgeTLVs
			s := append([]byte(msg), 0)
			tlv := binary.LittleEndian.AppendUint16(nil, uint16(4+len(s)))
			tlv = binary.LittleEndian.AppendUint16(tlv, 1) // NLMSGERR_ATTR_MSG
			tlv = append(tlv, s...)
			for len(tlv)%4 != 0 {
				tlv = append(tlv, 0)
			}
			data = append(data, tlv...)
		}
		return []netlink.Message{{
			Header: netlink.Header{Type: netlink.Error, Flags: flags, Sequence: req.Header.Sequence, PID: req.Header.PID},
			Data:   data,
		}}, nil
	}))
	t.Cleanup(func() { conn.Close() })
	return &Client{c: conn, family: testFamily}
}

func TestErrorMapping(t *testing.T) {
	k := AssocKey{SPI: 1, Key: secret.New(make([]byte, 16))}
	rx := func(dev uint32) func(*Client) error {
		return func(c *Client) error { _, err := c.RxAssoc(FD(3), AESGCM128, dev); return err }
	}
	tx := func(dev uint32) func(*Client) error {
		return func(c *Client) error { return c.TxAssoc(FD(3), AESGCM128, dev, k) }
	}
	for _, tc := range []struct {
		name  string
		errno unix.Errno
		msg   string
		call  func(*Client) error
		want  error
	}{
		{"dev-get unknown", unix.ENODEV, "", func(c *Client) error { _, err := c.DevGet(1234567); return err }, ErrNoDevice},
		{"dev-set beyond cap", unix.EINVAL, "Requested PSP versions not supported by the device", func(c *Client) error { return c.DevSet(1, 0xf) }, ErrVersionUnsupported},
		{"dev-set nothing", unix.EINVAL, "No settings present", func(c *Client) error { return c.DevSet(1, 0) }, ErrNoSettings},
		{"dev-set not admin", unix.EPERM, "", func(c *Client) error { return c.DevSet(1, 1) }, ErrPermission},
		{"rx busy", unix.EBUSY, "Socket already has PSP state", rx(1), ErrHasPSPState},
		{"rx unknown busy", unix.EBUSY, "", rx(1), ErrBusy},
		{"rx not connected", unix.ENOTCONN, "", rx(0), ErrNotConnected},
		{"rx ktls", unix.EINVAL, "Socket has incompatible state", rx(1), ErrIncompatibleState},
		{"rx not tcp", unix.EOPNOTSUPP, "Unsupported socket family and type", rx(1), ErrNotTCP},
		{"rx version", unix.EOPNOTSUPP, "", rx(1), ErrVersionUnsupported},
		{"rx mismatch", unix.EINVAL, "Device id vs socket mismatch", rx(2), ErrDevMismatch},
		{"rx unconnected", unix.EINVAL, "", rx(0), ErrDevRequired},
		{"tx mismatch", unix.EINVAL, "Device id vs socket mismatch", tx(2), ErrDevMismatch},
		{"tx no rx", unix.EINVAL, "Socket has no Rx key", tx(0), ErrNoRxKey},
		{"tx other dev", unix.EINVAL, "Rx key from different device", tx(1), ErrDevMismatch},
		{"tx version", unix.EINVAL, "PSP version mismatch with existing state", tx(0), ErrVersionMismatch},
		{"tx twice", unix.EBUSY, "Tx key already set", tx(0), ErrTxKeySet},
		{"tx not connected", unix.ENOTCONN, "", tx(0), ErrNotConnected},
		{"tx queue", unix.EBUSY, "Socket has incompatible segments already in the recv queue", tx(0), ErrIncompatibleSegment},
		{"tx key length", unix.EINVAL, "incorrect key length", tx(0), ErrInvalidKey},
		{"tx spi", unix.EINVAL, "invalid SPI: lower 31b must be non-zero", tx(0), ErrInvalidSPI},
		{"dev-assoc before 7.3", unix.EOPNOTSUPP, "", func(c *Client) error { return c.DevAssoc(1, 5, 2) }, ErrNoDevAssoc},
		{"dev-disassoc before 7.3", unix.EOPNOTSUPP, "", func(c *Client) error { return c.DevDisassoc(1, 5, 2) }, ErrNoDevAssoc},
		{"dev-assoc twice", unix.EBUSY, "Device already associated with a PSP device", func(c *Client) error { return c.DevAssoc(1, 5, 2) }, ErrAssociated},
		{"other", unix.EINVAL, "", func(c *Client) error { return c.KeyRotate(1) }, ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call(errorClient(t, tc.errno, tc.msg))
			if !errors.Is(err, tc.want) || !errors.Is(err, tc.errno) {
				t.Fatalf("error %v: want errors.Is %v and %v", err, tc.want, tc.errno)
			}
			var e *Error
			if !errors.As(err, &e) || e.Message != tc.msg {
				t.Fatalf("error %#v does not keep the kernel text %q", err, tc.msg)
			}
			if tc.msg != "" && !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("message %q lacks the kernel text %q", err, tc.msg)
			}
		})
	}
}

// TestWatchResync drives Watch through a notification, a socket overflow
// (ENOBUFS) and a key-rotate notification.
func TestWatchResync(t *testing.T) {
	var dumps int
	c := fakeClient(t, genltest.CheckRequest(testFamilyID, 1, netlink.Request|netlink.Dump,
		func(genetlink.Message, netlink.Message) ([]genetlink.Message, error) {
			dumps++
			out := []genetlink.Message{{Header: genetlink.Header{Command: 1, Version: 1}, Data: hx(t, devReply7)}}
			if dumps > 1 {
				out = append(out, genetlink.Message{Header: genetlink.Header{Command: 1, Version: 1}, Data: hx(t, devReply9)})
			}
			return out, nil
		}))

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var step int
	c.dialWatch = func(groups []uint32) (*genetlink.Conn, error) {
		if fmt.Sprint(groups) != "[5 6]" {
			t.Errorf("watch joins groups %v, want mgmt=5 and use=6", groups)
		}
		return genltest.Dial(func(_ genetlink.Message, nreq netlink.Message) ([]genetlink.Message, error) {
			if len(nreq.Data) != 0 {
				return nil, fmt.Errorf("watch socket sent a request: %+v", nreq)
			}
			step++
			switch step {
			case 1:
				return []genetlink.Message{
					{Header: genetlink.Header{Command: 2, Version: 1}, Data: hx(t, devReply9)},
					{Header: genetlink.Header{Command: 99, Version: 1}}, // unknown: ignored
				}, nil
			case 2:
				return nil, unix.ENOBUFS
			case 3:
				return []genetlink.Message{{Header: genetlink.Header{Command: 7, Version: 1}, Data: hx(t, "08000100 09000000")}}, nil
			}
			<-ctx.Done()
			return nil, ctx.Err()
		}), nil
	}

	var got []string
	err := c.Watch(ctx, func(ev Event) error {
		s := fmt.Sprintf("%v:%d", ev.Kind, ev.DevID)
		if ev.Kind == Resync {
			s = fmt.Sprintf("%v:%d", ev.Kind, len(ev.Devices))
		}
		got = append(got, s)
		if len(got) == 4 {
			cancel()
		}
		return nil
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Watch returned %v, want context.Canceled", err)
	}
	want := "resync:1 dev-add:9 resync:2 key-rotate:9"
	if strings.Join(got, " ") != want {
		t.Fatalf("events %q, want %q", strings.Join(got, " "), want)
	}
}

func TestWatchStopsOnCallbackError(t *testing.T) {
	c := fakeClient(t, expect(t, 1, netlink.Request|netlink.Dump, "", devReply7))
	c.dialWatch = func([]uint32) (*genetlink.Conn, error) {
		return genltest.Dial(func(genetlink.Message, netlink.Message) ([]genetlink.Message, error) {
			return nil, errors.New("receive must not be reached")
		}), nil
	}
	stop := errors.New("stop")
	if err := c.Watch(context.Background(), func(Event) error { return stop }); !errors.Is(err, stop) {
		t.Fatalf("Watch returned %v, want the callback's error", err)
	}
}

func TestDevAssoc(t *testing.T) {
	c := fakeClient(t, expect(t, 11, netlink.Request, attrID7+" 08000200 05000000 08000600 02000000", ""))
	if err := c.DevAssoc(7, 5, 2); err != nil {
		t.Fatal(err)
	}
	c = fakeClient(t, expect(t, 11, netlink.Request, attrID7+" 08000200 05000000", ""))
	if err := c.DevAssoc(7, 5, -1); err != nil {
		t.Fatal(err)
	}
	c = fakeClient(t, expect(t, 12, netlink.Request, attrID7+" 08000200 05000000 08000600 00000000", ""))
	if err := c.DevDisassoc(7, 5, 0); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []struct {
		id, ifindex uint32
		nsid        int32
	}{{0, 5, -1}, {7, 0, -1}, {7, 5, -2}} {
		if err := c.DevAssoc(bad.id, bad.ifindex, bad.nsid); err == nil {
			t.Errorf("DevAssoc(%d, %d, %d) accepted", bad.id, bad.ifindex, bad.nsid)
		}
	}
}
