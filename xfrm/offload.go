package xfrm

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// OffloadMode says whether the NIC should do the ESP crypto.
type OffloadMode uint8

const (
	// OffloadAuto uses crypto offload when the device advertises
	// esp-hw-offload and accepts the SA, and software otherwise.
	OffloadAuto OffloadMode = iota + 1
	// OffloadCrypto requires crypto offload; an SA the device refuses is
	// an error, never a silent software SA.
	OffloadCrypto
	// OffloadNone always installs software SAs.
	OffloadNone
)

func (m OffloadMode) valid() bool { return m == 0 || (m >= OffloadAuto && m <= OffloadNone) }

func (m OffloadMode) String() string {
	switch m {
	case 0, OffloadAuto:
		return "auto"
	case OffloadCrypto:
		return "crypto"
	case OffloadNone:
		return "none"
	}
	return fmt.Sprintf("offload(%d)", uint8(m))
}

// ParseOffloadMode parses "auto", "crypto" or "none".
func ParseOffloadMode(s string) (OffloadMode, error) {
	switch s {
	case "auto", "":
		return OffloadAuto, nil
	case "crypto":
		return OffloadCrypto, nil
	case "none":
		return OffloadNone, nil
	}
	return 0, fmt.Errorf("xfrm: offload mode %q: want auto, crypto or none", s)
}

// offloadDevice decides whether to ask for crypto offload. Only a device
// named in the SA is probed: probing devices nobody asked about has hung
// adapters on old kernels (Libreswan #1697).
func (h *Handle) offloadDevice(s *SA, mode OffloadMode) (*offloadReq, error) {
	if mode == OffloadNone || s.OffloadDev == "" {
		if mode == OffloadCrypto {
			return nil, fmt.Errorf("offload=crypto needs a device (OffloadDev is empty)")
		}
		return nil, nil
	}
	ifindex, err := ifindexIn(h.nsFD, s.OffloadDev)
	if err != nil {
		if mode == OffloadCrypto {
			return nil, fmt.Errorf("offload device %q: %w", s.OffloadDev, err)
		}
		h.log.Info("xfrm: offload device not found, installing in software", "dev", s.OffloadDev, "err", err)
		return nil, nil
	}
	on, err := ESPOffloadEnabled(h.nsFD, s.OffloadDev)
	if err == nil && !on {
		err = fmt.Errorf("device %s does not have esp-hw-offload enabled", s.OffloadDev)
	}
	if err != nil {
		if mode == OffloadCrypto {
			return nil, fmt.Errorf("offload=crypto: %w", err)
		}
		h.log.Debug("xfrm: no ESP offload, installing in software", "dev", s.OffloadDev, "reason", err)
		return nil, nil
	}
	return &offloadReq{ifindex: ifindex}, nil
}

// ESPOffloadEnabled reports whether the device dev in namespace nsFD (0:
// the caller's) has the ethtool feature esp-hw-offload active, using the
// ETHTOOL_GSSET_INFO, ETHTOOL_GSTRINGS and ETHTOOL_GFEATURES ioctls.
func ESPOffloadEnabled(nsFD int, dev string) (bool, error) {
	fd, err := inNetNS(nsFD, func() (int, error) {
		return unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	})
	if err != nil {
		return false, fmt.Errorf("ethtool socket: %w", err)
	}
	defer unix.Close(fd)

	// struct ethtool_sset_info { cmd; reserved; u64 sset_mask; u32 data[] }
	info := make([]byte, 4+4+8+4)
	binary.NativeEndian.PutUint32(info[0:], unix.ETHTOOL_GSSET_INFO)
	binary.NativeEndian.PutUint64(info[8:], 1<<ethSSFeatures)
	if err := ethtoolIoctl(fd, dev, info); err != nil {
		return false, fmt.Errorf("ethtool %s: feature count: %w", dev, err)
	}
	if binary.NativeEndian.Uint64(info[8:])&(1<<ethSSFeatures) == 0 {
		return false, fmt.Errorf("ethtool %s: no feature strings", dev)
	}
	n := binary.NativeEndian.Uint32(info[16:])
	if n == 0 || n > 4096 {
		return false, fmt.Errorf("ethtool %s: implausible feature count %d", dev, n)
	}

	// struct ethtool_gstrings { cmd; string_set; len; u8 data[len*32] }
	strs := make([]byte, 12+int(n)*ethGstringLen)
	binary.NativeEndian.PutUint32(strs[0:], unix.ETHTOOL_GSTRINGS)
	binary.NativeEndian.PutUint32(strs[4:], ethSSFeatures)
	binary.NativeEndian.PutUint32(strs[8:], n)
	if err := ethtoolIoctl(fd, dev, strs); err != nil {
		return false, fmt.Errorf("ethtool %s: feature names: %w", dev, err)
	}
	idx := -1
	for i := range int(n) {
		name := strs[12+i*ethGstringLen : 12+(i+1)*ethGstringLen]
		if j := bytes.IndexByte(name, 0); j >= 0 {
			name = name[:j]
		}
		if string(name) == "esp-hw-offload" {
			idx = i
			break
		}
	}
	if idx < 0 {
		return false, nil // kernel without XFRM_OFFLOAD knows no such feature
	}

	// struct ethtool_gfeatures { cmd; size; struct { available, requested, active, never_changed } features[size] }
	blocks := (int(n) + 31) / 32
	feat := make([]byte, 8+blocks*16)
	binary.NativeEndian.PutUint32(feat[0:], unix.ETHTOOL_GFEATURES)
	binary.NativeEndian.PutUint32(feat[4:], uint32(blocks))
	if err := ethtoolIoctl(fd, dev, feat); err != nil {
		return false, fmt.Errorf("ethtool %s: features: %w", dev, err)
	}
	active := binary.NativeEndian.Uint32(feat[8+(idx/32)*16+8:])
	return active&(1<<(idx%32)) != 0, nil
}

func ethtoolIoctl(fd int, dev string, data []byte) error {
	if len(dev) >= unix.IFNAMSIZ {
		return fmt.Errorf("device name %q too long", dev)
	}
	// struct ifreq { char name[16]; void *data; ... } padded to 40 bytes.
	var ifr [40]byte
	copy(ifr[:], dev)
	*(*uintptr)(unsafe.Pointer(&ifr[unix.IFNAMSIZ])) = uintptr(unsafe.Pointer(&data[0]))
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr[0])))
	runtime.KeepAlive(data)
	if errno != 0 {
		return errno
	}
	return nil
}
