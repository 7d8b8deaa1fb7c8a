package keyexchange

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/pspd/pspd/internal/secret"
	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
	"github.com/pspd/pspd/keyexchange/wire"
)

// SA is one generation of an association with a peer: a pair of simplex
// security associations, one per direction.
type SA struct {
	Peer       identity.PublicKey
	ID         wire.AssocID
	Backend    wire.Backend
	Suite      kdf.Suite
	Generation uint32
	RxSPI      kdf.SPI // we receive and decrypt under this SPI
	TxSPI      kdf.SPI // we encrypt to the peer under this SPI
	RxKey      secret.Key
	TxKey      secret.Key
}

// Wipe zeroes both keys.
func (sa *SA) Wipe() {
	sa.RxKey.Wipe()
	sa.TxKey.Wipe()
}

// withoutKeys is what the SA looks like to anyone but the installer.
func (sa *SA) withoutKeys() SA {
	c := *sa
	c.RxKey, c.TxKey = secret.Key{}, secret.Key{}
	return c
}

func (sa *SA) String() string {
	return fmt.Sprintf("sa{peer=%s id=%d gen=%d %s/%s rx=%s tx=%s}",
		sa.Peer.Fingerprint(), sa.ID, sa.Generation, sa.Backend, sa.Suite, sa.RxSPI, sa.TxSPI)
}

// LogValue logs the SA without its keys.
func (sa *SA) LogValue() slog.Value {
	return slog.GroupValue(
		slog.Uint64("id", uint64(sa.ID)), slog.Uint64("gen", uint64(sa.Generation)),
		slog.String("backend", sa.Backend.String()), slog.String("suite", sa.Suite.String()),
		slog.String("rx_spi", sa.RxSPI.String()), slog.String("tx_spi", sa.TxSPI.String()))
}

// Installer is a data plane (kernel PSP, XFRM, userspace) as the key
// exchange sees it. A new generation goes live in two steps, so that no
// packet is ever sent under a key the peer cannot yet decrypt:
//
// Install programs the inbound direction of sa and prepares the outbound
// one without sending under it. It must be atomic: when it returns an
// error, nothing of sa is installed. The installer copies the keys it
// needs; pspd wipes them when the SA is removed.
//
// Activate switches outbound traffic to sa. The key exchange calls it only
// once the peer has installed its inbound side of sa: the initiator after
// the responder's SAAck, the responder after the initiator's SAConfirm.
//
// Remove deletes whatever of sa Install and Activate put in place.
type Installer interface {
	Install(ctx context.Context, sa *SA) error
	Activate(ctx context.Context, sa *SA) error
	Remove(ctx context.Context, sa *SA) error
}
