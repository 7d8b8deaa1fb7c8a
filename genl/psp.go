// Package genl is a client of the Linux kernel's PSP generic netlink family
// ("psp", Linux 6.18+): it lists and configures PSP devices, rotates their
// device keys, binds PSP associations to TCP sockets, reads the devices'
// statistics and follows the family's multicast notifications.
//
// The package owns the wire encoding of that family: command and attribute
// numbers, validation of requests before they reach the kernel, decoding of
// replies, and the mapping of kernel errors (with their extended-ack text)
// to the sentinel errors below. Keys cross it only as secret.Key.
package genl

import (
	"fmt"
	"strings"

	"github.com/pspd/pspd/internal/secret"
)

// Family names and numbers from the kernel's psp.yaml (uapi linux/psp.h).
const (
	familyName    = "psp"
	familyVersion = 1

	groupMgmt = "mgmt"
	groupUse  = "use"
)

// Commands.
const (
	cmdDevGet       = 1
	cmdDevAddNtf    = 2
	cmdDevDelNtf    = 3
	cmdDevSet       = 4
	cmdDevChangeNtf = 5
	cmdKeyRotate    = 6
	cmdKeyRotateNtf = 7
	cmdRxAssoc      = 8
	cmdTxAssoc      = 9
	cmdGetStats     = 10
	cmdDevAssoc     = 11 // Linux 7.3
	cmdDevDisassoc  = 12 // Linux 7.3
)

// Attribute set "dev".
const (
	attrDevID          = 1
	attrDevIfindex     = 2
	attrDevVersionsCap = 3
	attrDevVersionsEna = 4
	// Linux 7.3 (dev-assoc): the devices of other namespaces that may use
	// this one, the namespace of a dev-assoc request, and the flag that
	// says the caller sees the device only by association.
	attrDevAssocList     = 5
	attrDevNSID          = 6
	attrDevByAssociation = 7
)

// Attribute set "assoc-dev-info" (Linux 7.3), nested in assoc-list.
const (
	attrAssocDevIfindex = 1
	attrAssocDevNSID    = 2
)

// Attribute set "assoc".
const (
	attrAssocDevID   = 1
	attrAssocVersion = 2
	attrAssocRxKey   = 3
	attrAssocTxKey   = 4
	attrAssocSockFD  = 5
)

// Attribute set "keys".
const (
	attrKeysKey = 1
	attrKeysSPI = 2
)

// Attribute set "stats".
const (
	attrStatsDevID        = 1
	attrStatsKeyRotations = 2
	attrStatsStaleEvents  = 3
	attrStatsRxPackets    = 4
	attrStatsRxBytes      = 5
	attrStatsRxAuthFail   = 6
	attrStatsRxError      = 7
	attrStatsRxBad        = 8
	attrStatsTxPackets    = 9
	attrStatsTxBytes      = 10
	attrStatsTxError      = 11
)

// Version is a PSP protocol version (enum psp_version): it fixes the
// cipher and so the key length.
type Version uint32

// The versions the kernel knows.
const (
	AESGCM128  Version = 0 // hdr0-aes-gcm-128
	AESGCM256  Version = 1 // hdr0-aes-gcm-256
	AESGMAC128 Version = 2 // hdr0-aes-gmac-128
	AESGMAC256 Version = 3 // hdr0-aes-gmac-256

	maxVersion = AESGMAC256
)

var versionNames = [...]string{"hdr0-aes-gcm-128", "hdr0-aes-gcm-256", "hdr0-aes-gmac-128", "hdr0-aes-gmac-256"}

// Valid reports whether v is a version the kernel accepts.
func (v Version) Valid() bool { return v <= maxVersion }

// KeyLen is the key length in bytes for v (psp_key_size), 0 if v is invalid.
func (v Version) KeyLen() int {
	switch v {
	case AESGCM128, AESGMAC128:
		return 16
	case AESGCM256, AESGMAC256:
		return 32
	}
	return 0
}

func (v Version) String() string {
	if v.Valid() {
		return versionNames[v]
	}
	return fmt.Sprintf("version(%d)", uint32(v))
}

func (v Version) check() error {
	if !v.Valid() {
		return fmt.Errorf("psp: version %d out of range 0..%d", uint32(v), maxVersion)
	}
	return nil
}

// Versions is a set of versions, bit 1<<Version (psp-versions-cap/-ena).
type Versions uint32

// AllVersions is every version the kernel knows (the dev-set policy mask).
const AllVersions Versions = 1<<(maxVersion+1) - 1

// VersionsOf builds a set.
func VersionsOf(vs ...Version) Versions {
	var m Versions
	for _, v := range vs {
		m |= 1 << v
	}
	return m
}

// Has reports whether v is in the set.
func (m Versions) Has(v Version) bool { return v.Valid() && m&(1<<v) != 0 }

// List returns the versions in the set, lowest first.
func (m Versions) List() []Version {
	var out []Version
	for v := Version(0); v <= maxVersion; v++ {
		if m.Has(v) {
			out = append(out, v)
		}
	}
	return out
}

func (m Versions) String() string {
	var parts []string
	for _, v := range m.List() {
		parts = append(parts, v.String())
	}
	if rest := m &^ AllVersions; rest != 0 {
		parts = append(parts, fmt.Sprintf("%#x", uint32(rest)))
	}
	return "{" + strings.Join(parts, ",") + "}"
}

// SPI is a PSP security parameter index as the kernel's netlink API carries
// it (host order): bit 31 is the device-key phase, bits 30..0 the key id.
type SPI uint32

const spiKeyIDMask = 1<<31 - 1

// Phase is the device-key generation parity selected by bit 31.
func (s SPI) Phase() uint32 { return uint32(s) >> 31 }

// KeyID is the low 31 bits; the kernel rejects 0.
func (s SPI) KeyID() uint32 { return uint32(s) & spiKeyIDMask }

func (s SPI) String() string { return fmt.Sprintf("%#08x", uint32(s)) }

// Device is one PSP device (a dev-get reply or a mgmt notification).
type Device struct {
	ID uint32
	// Ifindex is the device's main netdev in the caller's namespace; 0
	// when the kernel leaves it out (net-next does in associated
	// namespaces and in dev-del-ntf).
	Ifindex uint32
	Cap     Versions // versions the device supports
	Enabled Versions // versions accepted on receive

	// Linux 7.3 (dev-assoc). ByAssociation: the caller's namespace only
	// uses the device through an association and must leave its
	// administration (dev-set, key-rotate) to the device's own namespace.
	ByAssociation bool
	AssocList     []AssocDev // devices of other namespaces associated with it
	NSID          int32      // the nsid attribute if present, else -1
}

// AssocDev is one entry of a device's assoc-list: a netdev of some
// namespace that may use the device.
type AssocDev struct {
	Ifindex uint32
	NSID    int32 // relative to the caller's namespace; -1: the caller's own
}

// AssocKey is one direction's key of an association: an SPI and the key.
type AssocKey struct {
	SPI SPI
	Key secret.Key
}

// Wipe clears the key bytes.
func (k AssocKey) Wipe() { k.Key.Wipe() }

func (k AssocKey) check(v Version) error {
	if k.SPI.KeyID() == 0 {
		return fmt.Errorf("psp: tx-key spi %v: low 31 bits must be non-zero", k.SPI)
	}
	if want := v.KeyLen(); k.Key.Len() != want {
		return fmt.Errorf("psp: tx-key key is %d bytes, version %v needs %d", k.Key.Len(), v, want)
	}
	return nil
}

// RxAssoc is what rx-assoc returns: the device that allocated the key and
// the key the peer must use to send to this socket.
type RxAssoc struct {
	DevID uint32
	Key   AssocKey
}

// Stats are a device's counters (get-stats).
type Stats struct {
	DevID        uint32
	KeyRotations uint64 // device key rotations during the device's life
	StaleEvents  uint64 // sockets whose Rx died on a rotated-out key
	RxPackets    uint64
	RxBytes      uint64
	RxAuthFail   uint64
	RxError      uint64
	RxBad        uint64
	TxPackets    uint64
	TxBytes      uint64
	TxError      uint64
}

func checkDevID(field string, id uint32) error {
	if id == 0 {
		return fmt.Errorf("psp: %s must be >= 1", field)
	}
	return nil
}
