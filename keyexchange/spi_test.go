package keyexchange

import (
	"bytes"
	"slices"
	"testing"
	"time"

	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
)

// TestRxSPIsUniqueAcrossPeers: a hub whose two peers both see it in the
// same role. The kernel keys inbound ESP SAs by (local address, SPI,
// mark), the same for every peer, so the hub's receive SPIs must differ
// across peers and sessions; the hub's recorder, like the kernel, refuses
// a receive SPI that is already installed.
func TestRxSPIsUniqueAcrossPeers(t *testing.T) {
	for _, hubRole := range []kdf.Role{kdf.Initiator, kdf.Responder} {
		t.Run("hub-"+hubRole.String(), func(t *testing.T) {
			ids := make([]*identity.Identity, 3)
			for i := range ids {
				id, err := identity.Generate()
				if err != nil {
					t.Fatal(err)
				}
				ids[i] = id
			}
			slices.SortFunc(ids, func(a, b *identity.Identity) int { return identity.Compare(a.Public(), b.Public()) })
			hubID, others := ids[0], ids[1:] // the smallest key negotiates
			if hubRole == kdf.Responder {
				hubID, others = ids[2], ids[:2]
			}
			hub := newNode(t, hubID, nil)
			hub.inst.hostWide = true
			var hubPeers []*Peer
			for _, id := range others {
				n := newNode(t, id, nil)
				if _, err := n.ep.AddPeer(peerCfg(hub)); err != nil {
					t.Fatal(err)
				}
				p, err := hub.ep.AddPeer(peerCfg(n))
				if err != nil {
					t.Fatal(err)
				}
				hubPeers = append(hubPeers, p)
			}
			ctx := ctxT(t, 20*time.Second)
			seen := map[kdf.SPI]bool{}
			for round := range 3 {
				for i, p := range hubPeers {
					if round > 0 {
						if _, err := p.Rekey(ctx); err != nil {
							t.Fatalf("peer %d: rekey %d: %v", i, round, err)
						}
					}
					sa, err := p.Wait(ctx, func(sa SA) bool { return sa.Generation > uint32(round) })
					if err != nil {
						t.Fatalf("peer %d: no association in round %d: %v\n%s", i, round, err, hub.logs.Bytes())
					}
					if seen[sa.RxSPI] {
						t.Fatalf("peer %d: receive SPI %v handed out twice", i, sa.RxSPI)
					}
					seen[sa.RxSPI] = true
				}
			}
		})
	}
}

// TestSaltsMirrorAndStandApart: each direction's ESP salt is the key
// schedule's own output, the same on both sides, and not the salt the
// XFRM backend used to compute from the AES-GCM key itself.
func TestSaltsMirrorAndStandApart(t *testing.T) {
	ini, resp, pi, _ := pair(t, nil, nil)
	ctx := ctxT(t, 10*time.Second)
	if _, err := pi.Wait(ctx, func(SA) bool { return true }); err != nil {
		t.Fatal(err)
	}
	var a, b recorded
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		var ok1, ok2 bool
		a, ok1 = ini.inst.find(1)
		b, ok2 = resp.inst.find(1)
		if ok1 && ok2 {
			break
		}
	}
	if a.rxSalt != b.txSalt || a.txSalt != b.rxSalt {
		t.Fatalf("salts do not mirror: initiator rx %x tx %x, responder rx %x tx %x", a.rxSalt, a.txSalt, b.rxSalt, b.txSalt)
	}
	if a.rxSalt == a.txSalt || a.rxSalt == [kdf.SaltLen]byte{} {
		t.Fatalf("salts %x / %x: want two distinct non-zero salts", a.rxSalt, a.txSalt)
	}
	if k := a.rxKey.Bytes(); bytes.Equal(k[:kdf.SaltLen], a.rxSalt[:]) {
		t.Fatal("the salt is the start of the key")
	}
}

// TestKeysWipedOnceActive: once a generation is active on both sides, the
// key exchange keeps no copy of its keys or salts; the data planes have
// theirs (the kernel ones, only the kernel's).
func TestKeysWipedOnceActive(t *testing.T) {
	ini, resp, pi, pr := pair(t, nil, nil)
	ctx := ctxT(t, 10*time.Second)
	for _, p := range []*Peer{pi, pr} {
		if _, err := p.Wait(ctx, func(SA) bool { return true }); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []*Peer{pi, pr} {
		p.mu.Lock()
		cur := p.cur
		zero := func(b []byte) bool { return !slices.ContainsFunc(b, func(c byte) bool { return c != 0 }) }
		held := cur != nil && (!zero(cur.RxKey.Bytes()) || !zero(cur.TxKey.Bytes()) || !zero(cur.RxSalt[:]) || !zero(cur.TxSalt[:]))
		p.mu.Unlock()
		if cur == nil || held {
			t.Errorf("peer %s: current SA %v still holds keys or salts", p.Key().Fingerprint(), cur)
		}
	}
	if ini.inst.liveCount() == 0 || resp.inst.liveCount() == 0 {
		t.Fatal("nothing installed")
	}
}
