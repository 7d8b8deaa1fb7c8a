package daemon

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"time"

	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/localapi"
)

// rotation is this host's identity rotation as the files beside the
// identity file hold it; they are its only record, so a restart resumes
// it where it was:
//
//	none      identity
//	staged    identity (presented) and identity.next (published for the
//	          peers to pin, not presented yet)
//	switched  identity (the new one, presented) and identity.prev (still
//	          shown to peers that refuse the new one, until every session
//	          moved; then removed)
type rotation struct {
	path  string
	phase localapi.RotationPhase
	other *identity.Identity // staged: the next identity; switched: the previous one
	// finishing: finishRotation runs (while switched).
	finishing bool
}

func nextPath(path string) string { return path + ".next" }
func prevPath(path string) string { return path + ".prev" }

// loadRotation reads the rotation the files beside path hold; cur is the
// identity at path.
func loadRotation(path string, cur *identity.Identity) (rotation, error) {
	r := rotation{path: path}
	load := func(p string) (*identity.Identity, error) {
		id, err := identity.Load(p)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		return id, err
	}
	next, err := load(nextPath(path))
	if err != nil {
		return r, fmt.Errorf("identity rotation: %w", err)
	}
	prev, err := load(prevPath(path))
	if err != nil {
		return r, fmt.Errorf("identity rotation: %w", err)
	}
	if prev != nil && prev.Public() == cur.Public() {
		// A switch that stopped between its two steps (switchFiles):
		// still staged.
		if err := os.Remove(prevPath(path)); err != nil {
			return r, fmt.Errorf("identity rotation: %w", err)
		}
		prev = nil
	}
	switch {
	case next != nil && prev != nil:
		return r, fmt.Errorf("identity rotation: both %s and %s exist; remove %s to abandon the staged identity, or %s to drop the previous one",
			nextPath(path), prevPath(path), nextPath(path), prevPath(path))
	case next != nil && next.Public() == cur.Public():
		return r, fmt.Errorf("identity rotation: %s holds the identity of %s; remove it", nextPath(path), path)
	case next != nil:
		r.phase, r.other = localapi.RotationStaged, next
	case prev != nil:
		r.phase, r.other = localapi.RotationSwitched, prev
	}
	return r, nil
}

// switchFiles makes the staged identity the one at path, keeping the
// current one as the previous: a link first, so that a crash in between
// leaves both the identity and the staged one (loadRotation).
func (r *rotation) switchFiles() error {
	if err := os.Link(r.path, prevPath(r.path)); err != nil {
		return fmt.Errorf("identity rotation: keep the current identity as %s: %w", prevPath(r.path), err)
	}
	if err := os.Rename(nextPath(r.path), r.path); err != nil {
		os.Remove(prevPath(r.path))
		return fmt.Errorf("identity rotation: %w", err)
	}
	return nil
}

// undoSwitch puts the files back as they were before switchFiles.
func (r *rotation) undoSwitch() {
	if err := os.Rename(r.path, nextPath(r.path)); err == nil {
		os.Rename(prevPath(r.path), r.path)
	}
}

// keys are this host's identities to publish: the one presented first.
func (d *Daemon) keys() []identity.PublicKey {
	cur := d.ep.Public()
	if d.rot.other == nil {
		return []identity.PublicKey{cur}
	}
	return []identity.PublicKey{cur, d.rot.other.Public()}
}

// Identity is the local API's view of the identity and its rotation.
func (d *Daemon) Identity(context.Context) (localapi.Identity, error) {
	d.imu.Lock()
	defer d.imu.Unlock()
	return d.identityLocked(), nil
}

func (d *Daemon) identityLocked() localapi.Identity {
	cur := d.ep.Public()
	v := localapi.Identity{PublicKey: cur.String(), Fingerprint: cur.Fingerprint(), Phase: d.rot.phase}
	switch d.rot.phase {
	case localapi.RotationStaged:
		v.Next = d.rot.other.Public().String()
	case localapi.RotationSwitched:
		v.Previous = d.rot.other.Public().String()
		v.NotMoved = d.ep.NotMoved()
		slices.Sort(v.NotMoved)
	}
	return v
}

// ChangeIdentity takes a step of the identity rotation.
func (d *Daemon) ChangeIdentity(_ context.Context, step localapi.IdentityStep) (localapi.Identity, error) {
	d.imu.Lock()
	defer d.imu.Unlock()
	var err error
	switch step {
	case localapi.StepRotate:
		err = d.stageIdentity()
	case localapi.StepSwitch:
		err = d.switchIdentity()
	case localapi.StepDrop:
		err = d.dropIdentity()
	default:
		err = fmt.Errorf("unknown identity step %q: %w", step, localapi.ErrInvalid)
	}
	if err != nil {
		return localapi.Identity{}, err
	}
	d.publishSelf()
	return d.identityLocked(), nil
}

func (d *Daemon) stageIdentity() error {
	if d.rot.phase != localapi.RotationNone {
		return localapi.Refused(fmt.Errorf("an identity rotation is already %s; finish it first (pspctl identity switch, or drop)", d.rot.phase))
	}
	next, err := identity.Generate()
	if err != nil {
		return err
	}
	if err := identity.WriteFile(nextPath(d.rot.path), next, false); err != nil {
		return err
	}
	d.rot.phase, d.rot.other = localapi.RotationStaged, next
	d.log.Info("identity rotation: new identity staged; pin it on the peers (next_public_key), then pspctl identity switch",
		"next", next.Public().String(), "file", nextPath(d.rot.path))
	return nil
}

func (d *Daemon) switchIdentity() error {
	if d.rot.phase != localapi.RotationStaged {
		return localapi.Refused(errors.New("no identity is staged (pspctl identity rotate stages one)"))
	}
	next, prev := d.rot.other, d.id
	if err := d.rot.switchFiles(); err != nil {
		return err
	}
	if err := d.ep.Rotate(next); err != nil {
		d.rot.undoSwitch()
		return localapi.Refused(err)
	}
	d.id = next
	d.rot.phase, d.rot.other = localapi.RotationSwitched, prev
	d.startFinishing()
	return nil
}

// dropIdentity ends a rotation at once: after the switch, the previous
// identity goes, moved or not; before it, the staged one.
func (d *Daemon) dropIdentity() error {
	switch d.rot.phase {
	case localapi.RotationNone:
		return localapi.Refused(errors.New("no identity rotation is under way"))
	case localapi.RotationStaged:
		if err := os.Remove(nextPath(d.rot.path)); err != nil {
			return fmt.Errorf("identity rotation: %w", err)
		}
		d.log.Info("identity rotation abandoned: the staged identity is removed", "next", d.rot.other.Public().Fingerprint())
	case localapi.RotationSwitched:
		if err := os.Remove(prevPath(d.rot.path)); err != nil {
			return fmt.Errorf("identity rotation: %w", err)
		}
		d.ep.DropPrevious()
	}
	d.rot.phase, d.rot.other = localapi.RotationNone, nil
	return nil
}

// rotationCheck is how often a switched rotation looks whether every
// session moved to the new identity.
const rotationCheck = time.Second

// startFinishing runs finishRotation unless it runs already. d.imu is
// held.
func (d *Daemon) startFinishing() {
	if d.rot.finishing {
		return
	}
	d.rot.finishing = true
	d.wg.Add(1)
	go d.finishRotation(d.ctx)
}

// finishRotation drops the previous identity once every peer's session
// is under the new one. It ends with the switched phase, or with ctx.
func (d *Daemon) finishRotation(ctx context.Context) {
	defer d.wg.Done()
	t := time.NewTicker(rotationCheck)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		d.imu.Lock()
		switch {
		case d.rot.phase != localapi.RotationSwitched:
		case len(d.ep.NotMoved()) > 0:
			d.imu.Unlock()
			continue
		default:
			if err := d.dropIdentity(); err != nil {
				d.log.Warn("identity rotation: the previous identity could not be dropped", "err", err)
				d.imu.Unlock()
				continue
			}
			d.log.Info("identity rotation done: every session is under the new identity")
			d.publishSelf()
		}
		d.rot.finishing = false
		d.imu.Unlock()
		return
	}
}

// publishSelf gives the fleet this host's record with its identities now.
// d.imu is held.
func (d *Daemon) publishSelf() {
	if d.fleet == nil {
		return
	}
	if err := d.fleet.selfRec.Set(d.fleet.self(d.keys())); err != nil {
		d.log.Warn("this host's record could not be published", "err", err)
	}
}
