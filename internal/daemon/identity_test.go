package daemon

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/localapi/client"
	"github.com/pspd/pspd/policy"
)

// pinning rewrites h's configuration of peer p to pin keys (the first as
// public_key, a second as next_public_key) and loads it.
func pinning(t *testing.T, pc *policy.Config, p *host, keys ...identity.PublicKey) *policy.Config {
	t.Helper()
	b, err := os.ReadFile(pc.File)
	if err != nil {
		t.Fatal(err)
	}
	old := "public_key: " + p.id.Public().String()
	pin := "public_key: " + keys[0].String()
	if len(keys) > 1 {
		pin += ", next_public_key: " + keys[1].String()
	}
	src := strings.Replace(string(b), old, pin, 1)
	if src == string(b) {
		t.Fatalf("%s does not pin %s", pc.File, p.name)
	}
	if err := os.WriteFile(pc.File, []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	next, err := policy.Load(pc.File)
	if err != nil {
		t.Fatal(err)
	}
	return next
}

// neverUnassociated samples c's associations until stop and reports
// whether one sample had none: an identity rotation is make-before-break.
func neverUnassociated(c *client.Client, stop <-chan struct{}) *atomic.Bool {
	gap := &atomic.Bool{}
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			if as, err := c.Assocs(context.Background()); err == nil && len(as) == 0 {
				gap.Store(true)
			}
		}
	}()
	return gap
}

// TestIdentityRotation rotates a's identity with a static peer b, through
// restarts of a in each phase: staged (b pins both keys by reload),
// switched (b's session moves, make-before-break), done (the previous
// identity is dropped on its own, b pins the new key alone and keeps its
// session, and a restarted b starts from it).
func TestIdentityRotation(t *testing.T) {
	a, b := runningPair(t)
	ca, cb := client.New(a.sock), client.New(b.sock)
	waitAssoc(t, ca, 1)
	waitAssoc(t, cb, 1)
	ctx := context.Background()
	idPath := filepath.Join(a.dir, "id.pem")

	v, err := ca.ChangeIdentity(ctx, localapi.StepRotate)
	if err != nil {
		t.Fatal(err)
	}
	if v.Phase != localapi.RotationStaged || v.Next == "" || v.PublicKey != a.id.Public().String() {
		t.Fatalf("after rotate: %+v", v)
	}
	if st, err := os.Stat(idPath + ".next"); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("staged identity file: %v %v", st, err)
	}
	next, err := identity.ParsePublicKey(v.Next)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.ChangeIdentity(ctx, localapi.StepRotate); err == nil {
		t.Error("a second rotate while one is staged was accepted")
	}

	// A restart keeps the staged identity.
	apc := a.config(t, "", b)
	a.stop()
	a.start(t, apc)
	if v, err := ca.Identity(ctx); err != nil || v.Phase != localapi.RotationStaged || v.Next != next.String() {
		t.Fatalf("after a restart while staged: %+v %v", v, err)
	}
	waitAssoc(t, cb, 1)

	bpc := pinning(t, b.config(t, "", a), a, a.id.Public(), next)
	if err := b.d.Reload(bpc); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	gap := neverUnassociated(cb, stop)
	before := waitAssoc(t, cb, 1)
	if v, err = ca.ChangeIdentity(ctx, localapi.StepSwitch); err != nil {
		t.Fatal(err)
	}
	if v.Phase != localapi.RotationSwitched || v.PublicKey != next.String() || v.Previous != a.id.Public().String() {
		t.Fatalf("after switch: %+v", v)
	}
	waitRotationDone(t, a, 15*time.Second)
	close(stop)
	if gap.Load() {
		t.Error("b had no association with a during the switch")
	}
	if _, err := os.Stat(idPath + ".prev"); !os.IsNotExist(err) {
		t.Errorf("previous identity file still there after the rotation: %v", err)
	}
	if st, err := ca.Status(ctx); err != nil || st.PublicKey != next.String() || st.Rotation != "" {
		t.Fatalf("status after the rotation: %+v %v", st, err)
	}
	after := waitAssoc(t, cb, before.Generation+1)
	if after.ID != before.ID {
		t.Errorf("association %s became %s: the rotation should keep it", before.ID, after.ID)
	}

	// b pins the new key alone: the peer stays, as does its session.
	calls := len(b.rec.Calls())
	if err := b.d.Reload(pinning(t, b.config(t, "", a), a, next)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	for _, c := range b.rec.Calls()[calls:] {
		if strings.HasPrefix(c, "RemovePeer") || strings.HasPrefix(c, "AddPeer") {
			t.Errorf("pinning the new key alone re-added the peer: %s", c)
		}
	}
	if ps, err := cb.Peers(ctx); err != nil || len(ps) != 1 || ps[0].State != "up" || ps[0].SessionFingerprint != next.Fingerprint() {
		t.Fatalf("b's peers after pinning the new key: %+v %v", ps, err)
	}

	// Both restart from what they hold now.
	if a.id, err = identity.Load(idPath); err != nil || a.id.Public() != next {
		t.Fatalf("%s after the rotation: %v %v", idPath, a.id, err)
	}
	a.stop()
	a.start(t, a.config(t, "", b))
	b.stop()
	b.start(t, b.config(t, "", a))
	waitAssoc(t, ca, 1)
	waitAssoc(t, cb, 1)
	if st, err := ca.Status(ctx); err != nil || st.PublicKey != next.String() {
		t.Fatalf("a restarted with %s, want the new identity: %v", st.PublicKey, err)
	}
}

// TestLoadRotationAfterInterruptedSwitch: a switch that stopped between
// its link and its rename leaves the rotation staged.
func TestLoadRotationAfterInterruptedSwitch(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "id.pem")
	cur, next := mustGenerate(t), mustGenerate(t)
	if err := identity.WriteFile(path, cur, false); err != nil {
		t.Fatal(err)
	}
	if err := identity.WriteFile(nextPath(path), next, false); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(path, prevPath(path)); err != nil {
		t.Fatal(err)
	}
	r, err := loadRotation(path, cur)
	if err != nil {
		t.Fatal(err)
	}
	if r.phase != localapi.RotationStaged || r.other.Public() != next.Public() {
		t.Fatalf("phase %q with %v, want staged with the next identity", r.phase, r.other)
	}
	if _, err := os.Stat(prevPath(path)); !os.IsNotExist(err) {
		t.Errorf("the stale link to the current identity stayed: %v", err)
	}
	// Both a staged and a previous identity: refused, naming the files.
	if err := identity.WriteFile(prevPath(path), mustGenerate(t), false); err != nil {
		t.Fatal(err)
	}
	_, err = loadRotation(path, cur)
	if err == nil || !strings.Contains(err.Error(), nextPath(path)) {
		t.Fatalf("loadRotation with .next and .prev: %v", err)
	}
}

// waitRotationDone waits up to limit for h's rotation to end.
func waitRotationDone(t *testing.T, h *host, limit time.Duration) {
	t.Helper()
	c := client.New(h.sock)
	deadline := time.Now().Add(limit)
	for {
		v, err := c.Identity(context.Background())
		if err == nil && v.Phase == localapi.RotationNone {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s's rotation not done within %v: %+v %v\n%s", h.name, limit, v, err, h.logs.Bytes())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func mustGenerate(t *testing.T) *identity.Identity {
	t.Helper()
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// TestIdentityRotationPeerLate: a switches before b pins the new key. b
// refuses it, so a shows b its previous identity and the association
// stays; the rotation waits for b, also across a restart of a in the
// switched phase, and ends once b pins the new key.
func TestIdentityRotationPeerLate(t *testing.T) {
	a, b := runningPair(t)
	ca, cb := client.New(a.sock), client.New(b.sock)
	waitAssoc(t, ca, 1)
	ctx := context.Background()
	v, err := ca.ChangeIdentity(ctx, localapi.StepRotate)
	if err != nil {
		t.Fatal(err)
	}
	next, err := identity.ParsePublicKey(v.Next)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.ChangeIdentity(ctx, localapi.StepSwitch); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond) // past a's first move and rotation check
	if v, err := ca.Identity(ctx); err != nil || v.Phase != localapi.RotationSwitched || !slices.Equal(v.NotMoved, []string{"b"}) {
		t.Fatalf("with b not pinning the new key: %+v %v, want switched, waiting for b", v, err)
	}
	if ps, err := cb.Peers(ctx); err != nil || len(ps) != 1 || ps[0].State != "up" || ps[0].SessionFingerprint != a.id.Public().Fingerprint() {
		t.Fatalf("b's session with a: %+v %v, want up under a's previous key", ps, err)
	}

	apc := a.config(t, "", b)
	a.stop()
	a.start(t, apc)
	if v, err := ca.Identity(ctx); err != nil || v.Phase != localapi.RotationSwitched || v.PublicKey != next.String() {
		t.Fatalf("after a restart while switched: %+v %v", v, err)
	}
	waitAssoc(t, cb, 1) // b reaches a, which shows it the previous identity

	if err := b.d.Reload(pinning(t, b.config(t, "", a), a, a.id.Public(), next)); err != nil {
		t.Fatal(err)
	}
	waitRotationDone(t, a, 30*time.Second)
	if ps, err := cb.Peers(ctx); err != nil || len(ps) != 1 || ps[0].SessionFingerprint != next.Fingerprint() {
		t.Fatalf("b's session with a after the rotation: %+v %v", ps, err)
	}
}
