package xfrm

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"time"
)

// Pair is one association: the inbound and outbound SA and the policies
// that use them.
type Pair struct {
	In, Out  SA
	Policies []Policy
}

// Install adds a pair inbound first, so the peer's traffic is accepted
// before ours is sent, and removes everything it added if any step fails.
func (h *Handle) Install(ctx context.Context, p *Pair) error {
	var undo []func()
	rollback := func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}
	cleanup := context.WithoutCancel(ctx)
	for _, s := range []*SA{&p.In, &p.Out} {
		if _, err := h.AddSA(ctx, s); err != nil {
			rollback()
			return err
		}
		id := s.ID()
		undo = append(undo, func() {
			if err := h.DeleteSA(cleanup, id); err != nil {
				h.log.Error("xfrm: rollback", "err", err)
			}
		})
	}
	for i := range p.Policies {
		pol := &p.Policies[i]
		if err := h.AddPolicy(ctx, pol); err != nil {
			rollback()
			return err
		}
		undo = append(undo, func() {
			if err := h.DeletePolicy(cleanup, pol); err != nil {
				h.log.Error("xfrm: rollback", "err", err)
			}
		})
	}
	return nil
}

// Remove deletes a pair's policies and SAs.
func (h *Handle) Remove(ctx context.Context, p *Pair) error {
	var errs []error
	for i := range p.Policies {
		errs = append(errs, h.DeletePolicy(ctx, &p.Policies[i]))
	}
	errs = append(errs, h.DeleteSA(ctx, p.Out.ID()), h.DeleteSA(ctx, p.In.ID()))
	return errors.Join(errs...)
}

// ReconcileResult counts what Reconcile did.
type ReconcileResult struct {
	KeptSAs, AddedSAs, RemovedSAs                int
	KeptPolicies, AddedPolicies, RemovedPolicies int
}

// Reconcile makes pspd's kernel state equal to want: SAs that are already
// installed with the same key, addresses, reqid and mode are kept (so
// traffic keeps flowing across a daemon restart), pspd's SAs and policies
// that are not wanted are removed, and the missing ones are added.
// Nothing without pspd's tag is read back, changed or removed.
func (h *Handle) Reconcile(ctx context.Context, want []SA, wantPolicies []Policy) (ReconcileResult, error) {
	var res ReconcileResult
	if err := ctx.Err(); err != nil {
		return res, err
	}
	byID := make(map[ID]*SA, len(want))
	for i := range want {
		s := &want[i]
		if err := h.validateSA(s); err != nil {
			return res, fmt.Errorf("xfrm: reconcile: SA spi=%#x: %w", s.SPI, err)
		}
		if _, dup := byID[s.ID()]; dup {
			return res, fmt.Errorf("xfrm: reconcile: SA spi=%#x dst=%s wanted twice", s.SPI, s.Dst)
		}
		byID[s.ID()] = s
	}
	keep := make(map[ID]bool)
	var stale []ID
	err := h.dumpSAs(func(st State, key []byte) {
		id := ID{Dst: st.Dst, SPI: st.SPI}
		if w, ok := byID[id]; ok && !st.Larval && w.matches(st, key) {
			keep[id] = true
			return
		}
		stale = append(stale, id)
	})
	if err != nil {
		return res, fmt.Errorf("xfrm: reconcile: %w", err)
	}
	var errs []error
	for _, id := range stale {
		if err := h.DeleteSA(ctx, id); err != nil {
			errs = append(errs, err)
			continue
		}
		res.RemovedSAs++
	}
	for i := range want {
		s := &want[i]
		if keep[s.ID()] {
			res.KeptSAs++
			continue
		}
		if _, err := h.AddSA(ctx, s); err != nil {
			errs = append(errs, err)
			continue
		}
		res.AddedSAs++
	}

	have, err := h.ListPolicies(ctx)
	if err != nil {
		return res, errors.Join(append(errs, err)...)
	}
	wantPol := make(map[polKey]*Policy, len(wantPolicies))
	for i := range wantPolicies {
		wantPol[wantPolicies[i].key()] = &wantPolicies[i]
	}
	for i := range have {
		p := &have[i]
		if w, ok := wantPol[p.key()]; ok && *w == *p {
			res.KeptPolicies++
			delete(wantPol, p.key())
			continue
		}
		if _, ok := wantPol[p.key()]; ok {
			continue // same selector, different template: AddPolicy updates it below
		}
		if err := h.DeletePolicy(ctx, p); err != nil {
			errs = append(errs, err)
			continue
		}
		res.RemovedPolicies++
	}
	for i := range wantPolicies {
		p := &wantPolicies[i]
		if _, ok := wantPol[p.key()]; !ok {
			continue
		}
		if err := h.AddPolicy(ctx, p); err != nil {
			errs = append(errs, err)
			continue
		}
		res.AddedPolicies++
	}
	return res, errors.Join(errs...)
}

// polKey is what the kernel tells policies apart by: the selector (the
// ICMP type is its source port) and the direction.
type polKey struct {
	src, dst string
	proto    uint8
	icmpType uint8
	dir      Dir
}

func (p *Policy) key() polKey {
	return polKey{p.Src.Masked().String(), p.Dst.Masked().String(), p.Proto, p.ICMPType, p.Dir}
}

// matches reports whether the kernel's SA st (with key||salt key) is s.
func (s *SA) matches(st State, key []byte) bool {
	if st.Src != s.Src.Unmap() || st.ReqID != s.ReqID || st.Mode != s.Mode || st.AEAD != aeadName ||
		st.ICVBits != ICVBits || st.ReplayWindow < ReplayWindow || len(key) != s.Key.Len()+SaltLen {
		return false
	}
	salt, err := s.salt()
	if err != nil {
		return false
	}
	ok := subtle.ConstantTimeCompare(key[:s.Key.Len()], s.Key.Bytes()) == 1 &&
		subtle.ConstantTimeCompare(key[s.Key.Len():], salt[:]) == 1
	clear(salt[:])
	return ok
}

// RetireInbound removes the old inbound SA of a rekey once a packet has
// decrypted on the new one, or when grace has passed, whichever is first
// (make-before-break: the peer may still send on the old SA until it has
// switched). It polls the new SA's counters every poll interval.
func (h *Handle) RetireInbound(ctx context.Context, oldIn, newIn ID, grace, poll time.Duration) error {
	if oldIn == newIn {
		return fmt.Errorf("xfrm: retire SA spi=%#x: old and new inbound SA are the same", oldIn.SPI)
	}
	used, err := h.WaitUsed(ctx, newIn, grace, poll)
	if err != nil {
		return fmt.Errorf("xfrm: retire SA spi=%#x: %w", oldIn.SPI, err)
	}
	if used {
		h.log.Debug("xfrm: new inbound SA in use, removing old", "old", oldIn, "new", newIn)
	} else {
		h.log.Info("xfrm: no packet on new inbound SA within grace, removing old anyway", "old", oldIn, "new", newIn)
	}
	return h.DeleteSA(context.WithoutCancel(ctx), oldIn)
}

// WaitUsed waits until the SA id has counted a packet (true) or grace has
// passed (false), reading its counters every poll interval: the kernel
// sends no event for an SA's first packet.
func (h *Handle) WaitUsed(ctx context.Context, id ID, grace, poll time.Duration) (bool, error) {
	deadline := time.NewTimer(grace)
	defer deadline.Stop()
	tick := time.NewTicker(poll)
	defer tick.Stop()
	for {
		st, err := h.GetSA(ctx, id)
		if err != nil {
			return false, fmt.Errorf("watch SA spi=%#x: %w", id.SPI, err)
		}
		if st.Stats.Packets > 0 {
			return true, nil
		}
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-deadline.C:
			return false, nil
		case <-tick.C:
		}
	}
}
