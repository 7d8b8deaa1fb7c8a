package codec

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"sync"

	"github.com/pspd/pspd/internal/secret"
)

// FingerprintLen is what KeyHistory keeps per key.
const FingerprintLen = sha256.Size

// KeyHistory remembers every TX key installed through the codecs that
// share it, so that none is installed twice. A TX SA's counter starts at
// zero, and its nonce is SPI‖counter: installing a key a second time would
// seal again under (key, nonce) pairs already used, which for AES-GCM
// gives away the XOR of the plaintexts and the authentication key. The
// key exchange is meant never to derive a key twice, but the SPI that
// selects the TX key is chosen by the peer, and a peer is authenticated,
// not trusted: this record makes nonce uniqueness independent of the
// peer's (and the key exchange's) behaviour. A key is refused whatever SPI
// it comes back under; no honest derivation repeats one.
//
// It keeps no key material: only an HMAC-SHA256 of each key under a
// random key of its own, drawn when the history is made. A fingerprint
// seen in memory neither reveals a key nor can be checked against a
// guess without that HMAC key.
//
// # Memory
//
// Every successful InstallTX adds one entry of FingerprintLen (32) bytes,
// plus the map's own overhead: 50 to 85 bytes per entry in all, depending
// on how full the map's table is (BenchmarkKeyHistoryAdd measures it). The
// history forgets nothing. The reason
// is that nothing the data plane sees tells it when a key can no longer
// come back. A TX key is a function of the session's master keys and of
// the peer's SPI; as long as the session that derived it lives, the peer
// can make it derive that key again, at any time, whatever became of the
// SA. Only the end of the session (its master keys wiped; the next
// session's come from a fresh TLS exporter secret, so its keys repeat
// earlier ones with probability 2^-128) makes an entry useless, and the
// data plane is told about SAs, never about sessions. Nor is removing a
// peer from the data plane such a signal: nothing in the data plane's
// contract says that the peer's session ended first (a reload may remove
// a peer and add it back while its session goes on), and the codec that
// knew its keys is gone by then. So one history is shared by
// all codecs of a data plane (one per process in pspd) and outlives every
// peer.
//
// Growth is therefore one entry per TX rekey, at the rate the key
// exchange rekeys (a flood of peer-requested rekeys is for the key
// exchange to rate-limit): with pspd's default
// rekey_interval (10 min) a peer adds 144 entries, at most 12 KiB, a day;
// a thousand peers at the smallest interval (10 s) add 8.6 million
// entries, 0.4 to 0.7 GiB, a day. A process restart starts a fresh
// history safely, because it also ends every session. Were sessions
// given a maximum age, entries older than that age could be dropped; they
// have none today.
type KeyHistory struct {
	mac [sha256.Size]byte

	mu   sync.Mutex
	seen map[[FingerprintLen]byte]struct{}
}

// NewKeyHistory returns an empty history with a fresh fingerprint key.
func NewKeyHistory() *KeyHistory {
	h := &KeyHistory{seen: map[[FingerprintLen]byte]struct{}{}}
	rand.Read(h.mac[:]) // never fails; crashes the program if the OS has no randomness
	return h
}

// Len is the number of keys remembered.
func (h *KeyHistory) Len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.seen)
}

// add records k and reports whether it is new. A key seen before is not
// recorded again.
func (h *KeyHistory) add(k secret.Key) bool {
	m := hmac.New(sha256.New, h.mac[:])
	m.Write(k.Bytes())
	var fp [FingerprintLen]byte
	m.Sum(fp[:0])
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.seen[fp]; ok {
		return false
	}
	h.seen[fp] = struct{}{}
	return true
}
