package genl

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/mdlayher/netlink"
	"github.com/pspd/pspd/internal/secret"
)

// The decoders reject replies that lack a required attribute or carry one of
// the wrong size: a reply we cannot read fully must not turn into a device
// with id 0 or an association with an empty key. Unknown attributes are
// skipped so a newer kernel can add some.

func u32(ad *netlink.AttributeDecoder, name string) (v uint32) {
	ad.Do(func(b []byte) error {
		if len(b) != 4 {
			return fmt.Errorf("attribute %s is %d bytes, want 4", name, len(b))
		}
		v = binary.NativeEndian.Uint32(b)
		return nil
	})
	return v
}

// uintAttr decodes NLA_UINT: the kernel sends 4 bytes when the value fits, else 8.
func uintAttr(ad *netlink.AttributeDecoder, name string) (v uint64) {
	ad.Do(func(b []byte) error {
		switch len(b) {
		case 4:
			v = uint64(binary.NativeEndian.Uint32(b))
		case 8:
			v = binary.NativeEndian.Uint64(b)
		default:
			return fmt.Errorf("attribute %s is %d bytes, want 4 or 8", name, len(b))
		}
		return nil
	})
	return v
}

func s32(ad *netlink.AttributeDecoder, name string) int32 { return int32(u32(ad, name)) }

func decodeDevice(b []byte) (Device, error) {
	d := Device{NSID: -1}
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return Device{}, fmt.Errorf("psp: decode dev: %w", err)
	}
	var seen uint
	for ad.Next() {
		switch ad.Type() {
		case attrDevID:
			d.ID = u32(ad, "dev.id")
		case attrDevIfindex:
			d.Ifindex = u32(ad, "dev.ifindex")
		case attrDevVersionsCap:
			d.Cap = Versions(u32(ad, "dev.psp-versions-cap"))
		case attrDevVersionsEna:
			d.Enabled = Versions(u32(ad, "dev.psp-versions-ena"))
		case attrDevAssocList:
			ad.Nested(func(nad *netlink.AttributeDecoder) error {
				a := AssocDev{NSID: -1}
				for nad.Next() {
					switch nad.Type() {
					case attrAssocDevIfindex:
						a.Ifindex = u32(nad, "assoc-dev-info.ifindex")
					case attrAssocDevNSID:
						a.NSID = s32(nad, "assoc-dev-info.nsid")
					}
				}
				if nad.Err() == nil && a.Ifindex == 0 {
					return errors.New("assoc-list entry without ifindex")
				}
				d.AssocList = append(d.AssocList, a)
				return nil
			})
		case attrDevNSID:
			d.NSID = s32(ad, "dev.nsid")
		case attrDevByAssociation:
			d.ByAssociation = true
		default:
			continue
		}
		seen |= 1 << ad.Type()
	}
	if err := ad.Err(); err != nil {
		return Device{}, fmt.Errorf("psp: decode dev: %w", err)
	}
	// ifindex is optional: net-next leaves it out where the netdev is not
	// in the caller's namespace.
	for _, a := range []struct {
		t    uint16
		name string
	}{{attrDevID, "id"}, {attrDevVersionsCap, "psp-versions-cap"}, {attrDevVersionsEna, "psp-versions-ena"}} {
		if seen&(1<<a.t) == 0 {
			return Device{}, fmt.Errorf("psp: decode dev: attribute %s missing", a.name)
		}
	}
	if d.ID == 0 {
		return Device{}, errors.New("psp: decode dev: id 0")
	}
	return d, nil
}

// decodeDevID reads a reply that carries only a device id (key-rotate and
// its notification).
func decodeDevID(b []byte) (uint32, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return 0, fmt.Errorf("psp: decode dev id: %w", err)
	}
	var id uint32
	for ad.Next() {
		if ad.Type() == attrDevID {
			id = u32(ad, "dev.id")
		}
	}
	if err := ad.Err(); err != nil {
		return 0, fmt.Errorf("psp: decode dev id: %w", err)
	}
	if id == 0 {
		return 0, errors.New("psp: decode dev id: attribute id missing or 0")
	}
	return id, nil
}

func decodeRxAssoc(b []byte) (RxAssoc, error) {
	var r RxAssoc
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return RxAssoc{}, fmt.Errorf("psp: decode rx-assoc: %w", err)
	}
	var haveKey bool
	for ad.Next() {
		switch ad.Type() {
		case attrAssocDevID:
			r.DevID = u32(ad, "assoc.dev-id")
		case attrAssocRxKey:
			if haveKey {
				ad.Do(func([]byte) error { return errors.New("attribute rx-key repeated") })
				continue
			}
			haveKey = true
			ad.Nested(func(nad *netlink.AttributeDecoder) error {
				r.Key = decodeKeys(nad)
				return nil
			})
		}
	}
	if err := ad.Err(); err != nil {
		r.Key.Wipe()
		return RxAssoc{}, fmt.Errorf("psp: decode rx-assoc: %w", err)
	}
	switch {
	case r.DevID == 0:
		err = errors.New("attribute dev-id missing or 0")
	case !haveKey:
		err = errors.New("attribute rx-key missing")
	case r.Key.SPI.KeyID() == 0:
		err = fmt.Errorf("rx-key spi %v has zero key id", r.Key.SPI)
	case r.Key.Key.Len() != 16 && r.Key.Key.Len() != 32:
		err = fmt.Errorf("rx-key key is %d bytes", r.Key.Key.Len())
	}
	if err != nil {
		r.Key.Wipe()
		return RxAssoc{}, fmt.Errorf("psp: decode rx-assoc: %w", err)
	}
	return r, nil
}

// decodeKeys reads the "keys" set; errors land in nad.Err. The key is
// copied out of the receive buffer, which the caller wipes.
func decodeKeys(nad *netlink.AttributeDecoder) AssocKey {
	var k AssocKey
	for nad.Next() {
		switch nad.Type() {
		case attrKeysKey:
			k.Key.Wipe()
			k.Key = secret.New(nad.Bytes())
		case attrKeysSPI:
			k.SPI = SPI(u32(nad, "keys.spi"))
		}
	}
	return k
}

func decodeStats(b []byte) (Stats, error) {
	var s Stats
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return Stats{}, fmt.Errorf("psp: decode stats: %w", err)
	}
	for ad.Next() {
		switch ad.Type() {
		case attrStatsDevID:
			s.DevID = u32(ad, "stats.dev-id")
		case attrStatsKeyRotations:
			s.KeyRotations = uintAttr(ad, "stats.key-rotations")
		case attrStatsStaleEvents:
			s.StaleEvents = uintAttr(ad, "stats.stale-events")
		case attrStatsRxPackets:
			s.RxPackets = uintAttr(ad, "stats.rx-packets")
		case attrStatsRxBytes:
			s.RxBytes = uintAttr(ad, "stats.rx-bytes")
		case attrStatsRxAuthFail:
			s.RxAuthFail = uintAttr(ad, "stats.rx-auth-fail")
		case attrStatsRxError:
			s.RxError = uintAttr(ad, "stats.rx-error")
		case attrStatsRxBad:
			s.RxBad = uintAttr(ad, "stats.rx-bad")
		case attrStatsTxPackets:
			s.TxPackets = uintAttr(ad, "stats.tx-packets")
		case attrStatsTxBytes:
			s.TxBytes = uintAttr(ad, "stats.tx-bytes")
		case attrStatsTxError:
			s.TxError = uintAttr(ad, "stats.tx-error")
		}
	}
	if err := ad.Err(); err != nil {
		return Stats{}, fmt.Errorf("psp: decode stats: %w", err)
	}
	if s.DevID == 0 {
		return Stats{}, errors.New("psp: decode stats: attribute dev-id missing or 0")
	}
	return s, nil
}
