// Package xdp owns the XDP program that steers the data plane's UDP packets
// into AF_XDP sockets. The program is written with cilium/ebpf's asm package
// so building pspd needs no C compiler. It parses Ethernet → IPv4 (any IHL,
// not fragments) or IPv6 (no extension headers) → UDP and redirects a packet
// into the XSKMAP slot of its receive queue when the UDP destination port is
// one of the configured data-plane ports. Everything else (ARP, ICMP, the
// QUIC control connection, fragments) passes to the kernel stack, as does a
// data-plane packet on a queue without a registered socket.
package xdp

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
)

// Mode is how the program is attached.
type Mode int

const (
	// Auto tries Native and falls back to Generic.
	Auto Mode = iota
	// Native runs the program in the driver (XDP_FLAGS_DRV_MODE).
	Native
	// Generic runs it after the kernel built an skb (XDP_FLAGS_SKB_MODE);
	// every driver supports it.
	Generic
)

func (m Mode) String() string {
	switch m {
	case Native:
		return "native"
	case Generic:
		return "generic"
	}
	return "auto"
}

// MaxPorts bounds the data-plane ports one program steers.
const MaxPorts = 16

// Program is a loaded XDP redirect program with its maps, attached to at
// most one interface.
type Program struct {
	prog  *ebpf.Program
	xsks  *ebpf.Map
	ports *ebpf.Map
	link  link.Link
	mode  Mode
}

// struct xdp_md offsets.
const (
	mdData          = 0
	mdDataEnd       = 4
	mdRxQueueIndex  = 16
	xdpPass         = 2
	ethHdr          = 14
	etherTypeOffset = 12
)

// Load creates the maps and loads the program. queues is the number of
// receive queues that can get a socket; ports are the UDP destination ports
// to redirect (e.g. 6081 for Geneve, 1000 for PSP tunnel mode).
func Load(queues int, ports []uint16) (p *Program, err error) {
	if queues < 1 {
		return nil, fmt.Errorf("xdp: queues %d: need at least 1", queues)
	}
	if len(ports) == 0 || len(ports) > MaxPorts {
		return nil, fmt.Errorf("xdp: %d ports: need 1..%d", len(ports), MaxPorts)
	}
	p = &Program{}
	defer func() {
		if err != nil {
			p.Close()
			p = nil
		}
	}()
	p.xsks, err = ebpf.NewMap(&ebpf.MapSpec{Name: "pspd_xsks", Type: ebpf.XSKMap, KeySize: 4, ValueSize: 4, MaxEntries: uint32(queues)})
	if err != nil {
		return p, fmt.Errorf("xdp: create XSKMAP: %w", err)
	}
	p.ports, err = ebpf.NewMap(&ebpf.MapSpec{Name: "pspd_ports", Type: ebpf.Hash, KeySize: 2, ValueSize: 1, MaxEntries: MaxPorts})
	if err != nil {
		return p, fmt.Errorf("xdp: create port map: %w", err)
	}
	for _, port := range ports {
		if port == 0 {
			return p, errors.New("xdp: port 0 is not a data-plane port")
		}
		// The program looks up the port as it sits in the packet.
		if err := p.ports.Put([2]byte{byte(port >> 8), byte(port)}, uint8(1)); err != nil {
			return p, fmt.Errorf("xdp: add port %d: %w", port, err)
		}
	}
	p.prog, err = ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "pspd_redirect",
		Type:         ebpf.XDP,
		License:      "Dual BSD/GPL",
		Instructions: instructions(p.xsks.FD(), p.ports.FD()),
	})
	if err != nil {
		return p, fmt.Errorf("xdp: load program: %w", err)
	}
	return p, nil
}

// instructions is the program. Packet loads read network byte order into a
// little- or big-endian register, so comparisons use constants built with
// be16 (the value a 16-bit load yields on this host).
func instructions(xsksFD, portsFD int) asm.Instructions {
	return asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R2, asm.R6, mdData, asm.Word),
		asm.LoadMem(asm.R3, asm.R6, mdDataEnd, asm.Word),
		asm.Mov.Reg(asm.R4, asm.R2),
		asm.Add.Imm(asm.R4, ethHdr),
		asm.JGT.Reg(asm.R4, asm.R3, "pass"),
		asm.LoadMem(asm.R5, asm.R2, etherTypeOffset, asm.Half),
		asm.JEq.Imm(asm.R5, be16(0x0800), "ipv4"),
		asm.JEq.Imm(asm.R5, be16(0x86dd), "ipv6"),
		asm.Ja.Label("pass"),

		// IPv4: 20-byte minimum header, protocol UDP, no fragment, then
		// skip IHL*4 bytes.
		asm.Mov.Reg(asm.R4, asm.R2).WithSymbol("ipv4"),
		asm.Add.Imm(asm.R4, ethHdr+20),
		asm.JGT.Reg(asm.R4, asm.R3, "pass"),
		asm.LoadMem(asm.R5, asm.R2, ethHdr+9, asm.Byte),
		asm.JNE.Imm(asm.R5, 17, "pass"),
		asm.LoadMem(asm.R5, asm.R2, ethHdr+6, asm.Half),
		asm.And.Imm(asm.R5, be16(0x3fff)),
		asm.JNE.Imm(asm.R5, 0, "pass"),
		asm.LoadMem(asm.R5, asm.R2, ethHdr, asm.Byte),
		asm.And.Imm(asm.R5, 0x0f),
		asm.LSh.Imm(asm.R5, 2),
		asm.JLT.Imm(asm.R5, 20, "pass"),
		asm.Add.Reg(asm.R2, asm.R5),
		asm.Add.Imm(asm.R2, ethHdr),
		asm.Ja.Label("udp"),

		// IPv6: next header UDP directly.
		asm.Mov.Reg(asm.R4, asm.R2).WithSymbol("ipv6"),
		asm.Add.Imm(asm.R4, ethHdr+40),
		asm.JGT.Reg(asm.R4, asm.R3, "pass"),
		asm.LoadMem(asm.R5, asm.R2, ethHdr+6, asm.Byte),
		asm.JNE.Imm(asm.R5, 17, "pass"),
		asm.Add.Imm(asm.R2, ethHdr+40),

		// UDP: look the destination port up in the port map.
		asm.Mov.Reg(asm.R4, asm.R2).WithSymbol("udp"),
		asm.Add.Imm(asm.R4, 8),
		asm.JGT.Reg(asm.R4, asm.R3, "pass"),
		asm.LoadMem(asm.R5, asm.R2, 2, asm.Half),
		asm.StoreMem(asm.RFP, -2, asm.R5, asm.Half),
		asm.LoadMapPtr(asm.R1, portsFD),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -2),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "pass"),

		// Redirect to this queue's socket; XDP_PASS if the slot is empty.
		asm.LoadMapPtr(asm.R1, xsksFD),
		asm.LoadMem(asm.R2, asm.R6, mdRxQueueIndex, asm.Word),
		asm.Mov.Imm(asm.R3, xdpPass),
		asm.FnRedirectMap.Call(),
		asm.Return(),

		asm.Mov.Imm(asm.R0, xdpPass).WithSymbol("pass"),
		asm.Return(),
	}
}

// be16 is the value a 16-bit load of the network-order bytes of v yields.
func be16(v uint16) int32 {
	b := [2]byte{byte(v >> 8), byte(v)}
	return int32(binary.NativeEndian.Uint16(b[:]))
}

// Attach attaches the program to the interface ifindex. Auto tries native
// mode first and falls back to generic.
func (p *Program) Attach(ifindex int, mode Mode) error {
	if p.link != nil {
		return fmt.Errorf("xdp: already attached in %s mode", p.mode)
	}
	try := []Mode{mode}
	if mode == Auto {
		try = []Mode{Native, Generic}
	}
	var errs []error
	for _, m := range try {
		flags := link.XDPGenericMode
		if m == Native {
			flags = link.XDPDriverMode
		}
		l, err := link.AttachXDP(link.XDPOptions{Program: p.prog, Interface: ifindex, Flags: flags})
		if err == nil {
			p.link, p.mode = l, m
			return nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", m, err))
	}
	return fmt.Errorf("xdp: attach to ifindex %d: %w", ifindex, errors.Join(errs...))
}

// Mode is the mode the program is attached in.
func (p *Program) Mode() Mode { return p.mode }

// Register steers queue's data-plane packets to the AF_XDP socket fd.
func (p *Program) Register(queue, fd int) error {
	if err := p.xsks.Put(uint32(queue), uint32(fd)); err != nil {
		return fmt.Errorf("xdp: register socket for queue %d: %w", queue, err)
	}
	return nil
}

// Unregister lets queue's data-plane packets pass to the kernel again.
func (p *Program) Unregister(queue int) error {
	if err := p.xsks.Delete(uint32(queue)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("xdp: unregister queue %d: %w", queue, err)
	}
	return nil
}

// Close detaches the program and frees it and its maps.
func (p *Program) Close() error {
	var errs []error
	if p.link != nil {
		errs = append(errs, p.link.Close())
		p.link = nil
	}
	if p.prog != nil {
		errs = append(errs, p.prog.Close())
	}
	for _, m := range []*ebpf.Map{p.xsks, p.ports} {
		if m != nil {
			errs = append(errs, m.Close())
		}
	}
	p.prog, p.xsks, p.ports = nil, nil, nil
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("xdp: close: %w", err)
	}
	return nil
}
