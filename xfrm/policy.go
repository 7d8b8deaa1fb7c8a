package xfrm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"

	vnl "github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Policy steers traffic matching a selector into pspd's ESP SAs. Its
// template names the SA endpoints and reqid; the kernel uses the newest
// SA matching them, which is what lets a rekey switch outbound traffic by
// adding an SA.
type Policy struct {
	Src, Dst netip.Prefix // selector
	Proto    uint8        // 0: any protocol
	// ICMPType narrows an ICMP or ICMPv6 selector (Proto 1 or 58) to one
	// message type, which the kernel matches in the source-port field;
	// 0 is every type.
	ICMPType uint8
	Dir      Dir
	// Bypass lets the selected traffic pass in clear ahead of pspd's
	// protecting policies for the same hosts (give it a lower Priority).
	// It has no template and so no reqid: it is pspd's by its mark alone.
	Bypass bool
	// TmplSrc and TmplDst are the outer addresses of the SAs (the hosts
	// in transport mode, the tunnel endpoints in tunnel mode).
	TmplSrc, TmplDst netip.Addr
	Mode             Mode
	ReqID            uint32
	Priority         uint32 // lower wins; 0 means the kernel default
}

func (p *Policy) String() string {
	if p.Bypass {
		return fmt.Sprintf("%s %s->%s proto %d type %d bypass", p.Dir, p.Src, p.Dst, p.Proto, p.ICMPType)
	}
	return fmt.Sprintf("%s %s->%s via %s->%s %s reqid=%#x", p.Dir, p.Src, p.Dst, p.TmplSrc, p.TmplDst, p.Mode, p.ReqID)
}

func (h *Handle) validatePolicy(p *Policy) error {
	switch {
	case !p.Src.IsValid() || !p.Dst.IsValid():
		return errors.New("selector src and dst prefixes are required")
	case p.Src.Addr().Is4() != p.Dst.Addr().Is4():
		return fmt.Errorf("selector %s -> %s mixes families", p.Src, p.Dst)
	case p.ICMPType != 0 && p.Proto != unix.IPPROTO_ICMP && p.Proto != unix.IPPROTO_ICMPV6:
		return fmt.Errorf("an ICMP type selector needs protocol ICMP or ICMPv6, not %d", p.Proto)
	case p.Bypass:
		if p.TmplSrc.IsValid() || p.TmplDst.IsValid() || p.ReqID != 0 {
			return errors.New("a bypass policy has no template")
		}
		if p.Dir != In && p.Dir != Out && p.Dir != Fwd {
			return fmt.Errorf("unknown %s", p.Dir)
		}
		return nil
	case !p.TmplSrc.IsValid() || !p.TmplDst.IsValid() || family(p.TmplSrc) != family(p.TmplDst):
		return fmt.Errorf("template %s -> %s needs two addresses of one family", p.TmplSrc, p.TmplDst)
	case p.Dir != In && p.Dir != Out && p.Dir != Fwd:
		return fmt.Errorf("unknown %s", p.Dir)
	case p.Mode != Transport && p.Mode != Tunnel:
		return fmt.Errorf("unknown %s", p.Mode)
	case p.Mode == Transport && (p.Src.Addr().Is4() != p.TmplSrc.Unmap().Is4()):
		return errors.New("transport mode selector and template must be of one family")
	case !h.owner.ownsReqID(p.ReqID):
		return fmt.Errorf("reqid %#x is outside pspd's range [%#x, %#x]", p.ReqID, h.owner.ReqIDMin, h.owner.ReqIDMax)
	}
	return nil
}

func ipnet(p netip.Prefix) *net.IPNet {
	p = p.Masked()
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func vdir(d Dir) vnl.Dir {
	switch d {
	case In:
		return vnl.XFRM_DIR_IN
	case Fwd:
		return vnl.XFRM_DIR_FWD
	}
	return vnl.XFRM_DIR_OUT
}

func (h *Handle) vpolicy(p *Policy) *vnl.XfrmPolicy {
	vp := &vnl.XfrmPolicy{
		Src: ipnet(p.Src), Dst: ipnet(p.Dst), Proto: vnl.Proto(p.Proto), SrcPort: int(p.ICMPType), Dir: vdir(p.Dir),
		Priority: int(p.Priority), Action: vnl.XFRM_POLICY_ALLOW,
		Mark: &vnl.XfrmMark{Value: h.owner.Mark, Mask: h.owner.MarkMask},
	}
	if !p.Bypass {
		vp.Tmpls = []vnl.XfrmPolicyTmpl{{
			Src: p.TmplSrc.Unmap().AsSlice(), Dst: p.TmplDst.Unmap().AsSlice(),
			Proto: vnl.XFRM_PROTO_ESP, Mode: vnl.Mode(p.Mode), Reqid: int(p.ReqID),
		}}
	}
	return vp
}

// AddPolicy installs a policy, or updates pspd's own policy with the same
// selector and direction. A foreign policy with the same selector is left
// alone and reported.
func (h *Handle) AddPolicy(ctx context.Context, p *Policy) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := h.validatePolicy(p); err != nil {
		return fmt.Errorf("xfrm: add policy %s: %w", p, err)
	}
	if err := h.pol.XfrmPolicyUpdate(h.vpolicy(p)); err != nil {
		return fmt.Errorf("xfrm: add policy %s: %w", p, err)
	}
	return nil
}

// DeletePolicy removes pspd's policy for p's selector and direction;
// a missing policy is not an error.
func (h *Handle) DeletePolicy(ctx context.Context, p *Policy) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	// The mark is part of the lookup, so only pspd's policy can match.
	if err := h.pol.XfrmPolicyDel(h.vpolicy(p)); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("xfrm: delete policy %s: %w", p, err)
	}
	return nil
}

// ListPolicies lists pspd's policies. They are read with a raw dump:
// vishvananda/netlink guesses an address's family from its bytes and reads
// an IPv6 selector such as fd79::/64 back as IPv4.
func (h *Handle) ListPolicies(ctx context.Context) ([]Policy, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var out []Policy
	err := h.sa.do(nl.XFRM_MSG_GETPOLICY, unix.NLM_F_DUMP, nil, func(typ uint16, b []byte) error {
		if typ != nl.XFRM_MSG_NEWPOLICY {
			return nil
		}
		p, mark, err := parsePolicy(b)
		if err != nil {
			return err
		}
		if h.owner.ownsMark(mark.Value, mark.Mask) && (h.owner.ownsReqID(p.ReqID) || p.Bypass) {
			out = append(out, p)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("xfrm: list policies: %w", err)
	}
	return out, nil
}

// parsePolicy decodes an xfrm_userpolicy_info message. An allow policy
// without templates is a Bypass; policies with other than exactly one ESP
// template are reported with ReqID 0, which no owner range contains.
func parsePolicy(b []byte) (Policy, nl.XfrmMark, error) {
	var p Policy
	var mark nl.XfrmMark
	if len(b) < nl.SizeofXfrmUserpolicyInfo {
		return p, mark, fmt.Errorf("xfrm: policy message is %d bytes, want at least %d", len(b), nl.SizeofXfrmUserpolicyInfo)
	}
	var info nl.XfrmUserpolicyInfo
	copy(structBytes(&info), b)
	fam := info.Sel.Family
	if fam != unix.AF_INET && fam != unix.AF_INET6 {
		return p, mark, nil // e.g. a socket policy or AF_UNSPEC selector: not one of ours
	}
	bits := 32
	if fam == unix.AF_INET6 {
		bits = 128
	}
	p.Src = netip.PrefixFrom(fromXaddr(info.Sel.Saddr, fam), min(int(info.Sel.PrefixlenS), bits))
	p.Dst = netip.PrefixFrom(fromXaddr(info.Sel.Daddr, fam), min(int(info.Sel.PrefixlenD), bits))
	p.Proto = info.Sel.Proto
	if p.Proto == unix.IPPROTO_ICMP || p.Proto == unix.IPPROTO_ICMPV6 {
		p.ICMPType = uint8(nl.Swap16(info.Sel.Sport))
	}
	p.Priority = info.Priority
	switch info.Dir {
	case 0:
		p.Dir = In
	case 1:
		p.Dir = Out
	case 2:
		p.Dir = Fwd
	}
	var tmpls int
	for _, a := range parseAttrs(b[nl.SizeofXfrmUserpolicyInfo:]) {
		switch a.typ {
		case nl.XFRMA_MARK:
			if len(a.data) >= 8 {
				copy(structBytes(&mark), a.data)
			}
		case nl.XFRMA_TMPL:
			tmpls = len(a.data) / nl.SizeofXfrmUserTmpl
			if tmpls != 1 {
				continue
			}
			var t nl.XfrmUserTmpl
			copy(structBytes(&t), a.data)
			if t.XfrmId.Proto != unix.IPPROTO_ESP || (t.Family != unix.AF_INET && t.Family != unix.AF_INET6) {
				tmpls = 0
				continue
			}
			p.TmplSrc = fromXaddr(t.Saddr, t.Family)
			p.TmplDst = fromXaddr(t.XfrmId.Daddr, t.Family)
			p.Mode = Mode(t.Mode)
			p.ReqID = t.Reqid
		}
	}
	if tmpls != 1 {
		p.ReqID = 0
	}
	p.Bypass = tmpls == 0 && info.Action == uint8(vnl.XFRM_POLICY_ALLOW)
	return p, mark, nil
}
