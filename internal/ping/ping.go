// Package ping owns ICMP echo round trips: it sends echo requests from
// this host's network namespace and times the replies, for `pspctl ping`,
// which sends them through a peer's association.
//
// It uses raw ICMP sockets (CAP_NET_RAW, which pspd holds), not the
// kernel's unprivileged ping sockets, which net.ipv4.ping_group_range
// disables by default. A raw socket sees every ICMP packet the host
// receives, so replies are matched by identifier, sequence, sender and a
// random token in the payload.
package ping

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"
)

// Reply is the outcome of one echo request.
type Reply struct {
	Seq int
	RTT time.Duration // zero when Err is set
	Err error         // ErrTimeout, or why the request could not be sent
}

// ErrTimeout: no reply came within the timeout.
var ErrTimeout = errors.New("no reply")

// Config says how many requests to send and how long to wait.
type Config struct {
	Count    int           // default 3
	Interval time.Duration // between requests; default 200ms
	Timeout  time.Duration // for each reply; default 1s
	Size     int           // payload bytes, at least the 16-byte token; default 56
}

const tokenLen = 16

// Run sends cfg.Count echo requests to dst and returns one Reply per
// request, in order. An error means nothing could be sent at all.
func Run(ctx context.Context, dst netip.Addr, cfg Config) ([]Reply, error) {
	if cfg.Count <= 0 {
		cfg.Count = 3
	}
	if cfg.Interval <= 0 {
		cfg.Interval = 200 * time.Millisecond
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = time.Second
	}
	if cfg.Size <= 0 {
		cfg.Size = 56
	}
	cfg.Size = max(cfg.Size, tokenLen)
	dst = dst.Unmap()
	network, local, reqType, replyType := "ip4:icmp", "0.0.0.0", byte(8), byte(0)
	if dst.Is6() {
		network, local, reqType, replyType = "ip6:ipv6-icmp", "::", 128, 129
	}
	c, err := net.ListenPacket(network, local)
	if err != nil {
		return nil, fmt.Errorf("ping: raw ICMP socket: %w", err)
	}
	defer c.Close()
	var tok [tokenLen + 2]byte
	rand.Read(tok[:])
	id := binary.BigEndian.Uint16(tok[tokenLen:])

	replies := make([]Reply, cfg.Count)
	sent := make([]time.Time, cfg.Count)
	got := make(chan int, cfg.Count)
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return // closed
			}
			seq, ok := match(buf[:n], replyType, id, tok[:tokenLen])
			if !ok || seq >= cfg.Count || !fromAddr(from, dst) {
				continue
			}
			got <- seq
		}
	}()

	dstAddr := &net.IPAddr{IP: dst.AsSlice()}
	pending := 0
	deadline := time.NewTimer(0)
	<-deadline.C
	next := time.NewTimer(0)
	defer next.Stop()
	defer deadline.Stop()
	for seq := 0; seq < cfg.Count || pending > 0; {
		select {
		case <-ctx.Done():
			for i := range replies {
				if replies[i].RTT == 0 && replies[i].Err == nil {
					replies[i] = Reply{Seq: i, Err: ctx.Err()}
				}
			}
			return replies, nil
		case <-next.C:
			if seq >= cfg.Count {
				continue
			}
			replies[seq].Seq = seq
			sent[seq] = time.Now()
			if _, err := c.WriteTo(request(reqType, id, uint16(seq), tok[:tokenLen], cfg.Size, dst.Is4()), dstAddr); err != nil {
				replies[seq].Err = fmt.Errorf("send: %w", err)
			} else {
				pending++
			}
			seq++
			if seq < cfg.Count {
				next.Reset(cfg.Interval)
			}
			if pending > 0 {
				deadline.Reset(cfg.Timeout)
			}
		case s := <-got:
			if replies[s].RTT != 0 || replies[s].Err != nil || sent[s].IsZero() {
				continue // a duplicate, or one that timed out already
			}
			replies[s].RTT = max(time.Since(sent[s]), time.Nanosecond)
			pending--
		case <-deadline.C:
			// Everything sent a timeout or more ago that has no reply.
			for i := range seq {
				if replies[i].RTT == 0 && replies[i].Err == nil && time.Since(sent[i]) >= cfg.Timeout {
					replies[i].Err = ErrTimeout
					pending--
				}
			}
			if pending > 0 {
				deadline.Reset(cfg.Timeout / 4)
			}
		}
	}
	return replies, nil
}

// request is an echo request; the kernel fills in an ICMPv6 checksum, an
// ICMPv4 one is ours.
func request(typ byte, id, seq uint16, tok []byte, size int, v4 bool) []byte {
	b := make([]byte, 8+size)
	b[0] = typ
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], seq)
	copy(b[8:], tok)
	if v4 {
		binary.BigEndian.PutUint16(b[2:], checksum(b))
	}
	return b
}

// match reports whether b is an echo reply to one of our requests, and
// its sequence number.
func match(b []byte, typ byte, id uint16, tok []byte) (int, bool) {
	if len(b) < 8+len(tok) || b[0] != typ || b[1] != 0 || binary.BigEndian.Uint16(b[4:]) != id {
		return 0, false
	}
	if string(b[8:8+len(tok)]) != string(tok) {
		return 0, false
	}
	return int(binary.BigEndian.Uint16(b[6:])), true
}

func fromAddr(a net.Addr, want netip.Addr) bool {
	ip, ok := a.(*net.IPAddr)
	if !ok {
		return false
	}
	got, ok := netip.AddrFromSlice(ip.IP)
	return ok && got.Unmap() == want
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
