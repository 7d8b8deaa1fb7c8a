package userspace

import (
	"time"
)

// Keep-alives: a host behind a NAT must send something before the NAT
// forgets its mapping, or the peer's packets to it are lost while it has
// nothing to say. A peer with Peer.Keepalive set is sent an empty,
// authenticated packet (codec.SealKeepalive) once nothing went to it for
// that long; the receiving engine takes it as a keep-alive, which also
// tells it where this host is now (roam.go).

// keepaliveTick is how often the keep-alive loop looks for idle peers:
// the resolution of Peer.Keepalive.
const keepaliveTick = time.Second

func (d *Dataplane) keepaliveLoop(stop <-chan struct{}) {
	defer d.wg.Done()
	buf := make([]byte, d.headroom+d.tailroom)
	t := time.NewTimer(keepaliveTick)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		d.keepaliveDue(buf, time.Now())
		t.Reset(keepaliveTick)
	}
}

// keepaliveDue sends a keep-alive to every peer that wants them and has
// been sent nothing for its interval.
func (d *Dataplane) keepaliveDue(buf []byte, now time.Time) {
	for _, p := range d.table.Load().byEndpoint {
		if p.Keepalive <= 0 || now.Sub(unixNano(p.lastTX.Load())) < p.Keepalive {
			continue
		}
		start, n, err := p.Codec.SealKeepalive(buf, d.headroom)
		if err != nil {
			continue // no TX SA yet, or none any more: nothing to keep alive
		}
		msg := [1]Message{{Buf: buf, Off: start, N: n, Addr: p.roam.current()}}
		d.wmu.Lock()
		_, err = d.cfg.Underlay.WriteBatch(msg[:])
		d.wmu.Unlock()
		if err != nil {
			p.drops[DropUnderlayWrite].Add(1)
			continue
		}
		p.lastTX.Store(now.UnixNano())
		p.keepalives.Add(1)
	}
}
