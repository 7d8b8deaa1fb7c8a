// Package userspace owns pspd's userspace data-plane engine: it moves inner
// packets between a TUN device and an Underlay, sealing and opening them with
// each peer's codec, and picks the peer by inner destination on transmit
// (cryptokey routing) and by outer source on receive.
//
// The byte layouts live in userspace/wire, the SAs and transforms in
// userspace/codec; this package owns the queues, the peer table and the
// engine's own drop counters.
package userspace
