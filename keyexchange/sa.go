package keyexchange

import (
	"context"

	"github.com/pspd/pspd/assoc"
)

// SA is one generation of an association (package assoc owns the type).
type SA = assoc.SA

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
