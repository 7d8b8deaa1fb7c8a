package genl

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/mdlayher/genetlink"
	"golang.org/x/sys/unix"
)

// EventKind says what an Event reports.
type EventKind int

// Event kinds.
const (
	// Resync carries the full device list: first when the watch starts, and
	// again whenever notifications were lost (the socket overflowed), so a
	// consumer can rebuild its state instead of trusting a gap.
	Resync EventKind = iota + 1
	DevAdded
	DevDeleted
	DevChanged
	KeyRotated // only Event.DevID is set
)

func (k EventKind) String() string {
	switch k {
	case Resync:
		return "resync"
	case DevAdded:
		return "dev-add"
	case DevDeleted:
		return "dev-del"
	case DevChanged:
		return "dev-change"
	case KeyRotated:
		return "key-rotate"
	}
	return fmt.Sprintf("event(%d)", int(k))
}

// Event is one notification from the psp family.
type Event struct {
	Kind    EventKind
	DevID   uint32   // every kind but Resync
	Device  Device   // DevAdded, DevDeleted, DevChanged
	Devices []Device // Resync
}

// Watch follows the mgmt and use multicast groups on a socket of its own
// and calls fn for each event, starting with a Resync. It returns when ctx
// is done (with ctx.Err()), when fn returns an error, or when the socket
// fails other than by overflowing.
func (c *Client) Watch(ctx context.Context, fn func(Event) error) error {
	conn, err := c.dialWatch([]uint32{c.groups[groupMgmt], c.groups[groupUse]})
	if err != nil {
		return fmt.Errorf("psp: watch: %w", err)
	}
	defer conn.Close()

	stop := context.AfterFunc(ctx, func() {
		// Unblocks Receive; the fake conn in tests has no deadlines and
		// watches ctx itself.
		_ = conn.SetReadDeadline(time.Unix(1, 0))
	})
	defer stop()

	if err := c.resync(fn); err != nil {
		return err
	}
	for {
		msgs, _, err := conn.Receive()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, unix.ENOBUFS) {
			if err := c.resync(fn); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return fmt.Errorf("psp: watch: receive: %w", err)
		}
		for _, m := range msgs {
			ev, ok, err := decodeEvent(m)
			if err != nil {
				return fmt.Errorf("psp: watch: %w", err)
			}
			if !ok {
				continue
			}
			if err := fn(ev); err != nil {
				return err
			}
		}
	}
}

func (c *Client) resync(fn func(Event) error) error {
	devs, err := c.Devices()
	if err != nil {
		return fmt.Errorf("psp: watch: resync: %w", err)
	}
	return fn(Event{Kind: Resync, Devices: devs})
}

// decodeEvent reads a notification; ok is false for commands that are not
// notifications of this family (ignored, so a newer kernel can add some).
func decodeEvent(m genetlink.Message) (ev Event, ok bool, err error) {
	switch m.Header.Command {
	case cmdDevAddNtf, cmdDevDelNtf, cmdDevChangeNtf:
		d, err := decodeDevice(m.Data)
		if err != nil {
			return Event{}, false, err
		}
		kind := map[uint8]EventKind{cmdDevAddNtf: DevAdded, cmdDevDelNtf: DevDeleted, cmdDevChangeNtf: DevChanged}[m.Header.Command]
		return Event{Kind: kind, DevID: d.ID, Device: d}, true, nil
	case cmdKeyRotateNtf:
		id, err := decodeDevID(m.Data)
		if err != nil {
			return Event{}, false, err
		}
		return Event{Kind: KeyRotated, DevID: id}, true, nil
	}
	return Event{}, false, nil
}
