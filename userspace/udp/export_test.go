package udp

import "time"

// CoalescedReads returns how many reads held more than one datagram and
// how many datagrams they held.
func (u *Conn) CoalescedReads() (reads, datagrams uint64) {
	if u.gro == nil {
		return 0, 0
	}
	return u.gro.coalesced, u.gro.coalescedDatagrams
}

// SetReadDeadline makes a blocked ReadBatch fail at t instead of hanging a
// test whose datagrams were lost.
func (u *Conn) SetReadDeadline(t time.Time) error { return u.c.SetReadDeadline(t) }
