// Package apitest serves the local API from an in-memory Service for tests
// of the client and of pspctl. It is a fake of the daemon, not of the API:
// requests go over a real unix socket through the real server and its
// authorisation. The daemon's own tests drive the same client against the
// real service.
package apitest

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/localapi"
)

// Service is an in-memory localapi.Service with fixed answers.
type Service struct {
	StatusV  localapi.Status
	PeersV   []localapi.Peer
	AssocsV  []localapi.Assoc
	DevicesV []localapi.Device
	// DevicesErr, if set, is the answer to Devices (a host without PSP).
	DevicesErr error
	EventsC    chan localapi.Event

	// ReloadErr, if set, is the answer to Reload.
	ReloadErr error
	// IdentityV is the identity answered; ChangeIdentity records each step
	// in Steps and answers IdentityV.
	IdentityV localapi.Identity
	Steps     []localapi.IdentityStep

	mu       sync.Mutex
	Rotated  []localapi.RotateRequest
	Upgraded []int // local port of each socket received
}

func (s *Service) Status(context.Context) (localapi.Status, error) { return s.StatusV, nil }

func (s *Service) Identity(context.Context) (localapi.Identity, error) { return s.IdentityV, nil }

func (s *Service) ChangeIdentity(_ context.Context, step localapi.IdentityStep) (localapi.Identity, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.Steps = append(s.Steps, step)
	return s.IdentityV, nil
}
func (s *Service) Peers(context.Context) ([]localapi.Peer, error)   { return s.PeersV, nil }
func (s *Service) Assocs(context.Context) ([]localapi.Assoc, error) { return s.AssocsV, nil }
func (s *Service) Devices(context.Context) ([]localapi.Device, error) {
	if s.DevicesErr != nil {
		return nil, s.DevicesErr
	}
	return s.DevicesV, nil
}

func (s *Service) Events(context.Context) (<-chan localapi.Event, error) { return s.EventsC, nil }

// ReloadConfig answers ReloadErr, or that StatusV's file was reloaded.
func (s *Service) ReloadConfig(context.Context) (localapi.Reloaded, error) {
	if s.ReloadErr != nil {
		return localapi.Reloaded{}, s.ReloadErr
	}
	return localapi.Reloaded{File: "/etc/pspd/pspd.yaml", Time: s.StatusV.LastReload}, nil
}

// Ping answers for an up peer as if each request came back after
// 400µs plus 10µs per sequence number.
func (s *Service) Ping(_ context.Context, peer string, req localapi.PingRequest) (localapi.PingResult, error) {
	for _, p := range s.PeersV {
		if p.Name != peer {
			continue
		}
		if p.State != "up" {
			return localapi.PingResult{}, localapi.Refused(fmt.Errorf("peer %s is %s: it has no association to ping through", peer, p.State))
		}
		to := req.To
		if to == "" {
			to = netip.MustParsePrefix(p.Prefixes[0]).Addr().String()
		}
		r := localapi.PingResult{Peer: peer, To: to, Assoc: p.Assoc, Backend: p.Backend}
		n := cmp.Or(req.Count, 3)
		for i := range n {
			r.Replies = append(r.Replies, localapi.PingReply{Seq: i, RTTMicros: uint64(400 + 10*i)})
		}
		r.AssocPacketsOut, r.AssocPacketsIn = uint64(n), uint64(n)
		return r, nil
	}
	return localapi.PingResult{}, fmt.Errorf("no peer named %q: %w", peer, localapi.ErrNotFound)
}

// Rotate answers for the associations the request selects, giving each a
// new SPI pair one above its old one.
func (s *Service) Rotate(_ context.Context, r localapi.RotateRequest) ([]localapi.Rotated, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.Rotated = append(s.Rotated, r)
	var out []localapi.Rotated
	for _, a := range s.AssocsV {
		if r.All || r.ID == a.ID || r.Peer == a.Peer {
			out = append(out, localapi.Rotated{ID: a.ID, Peer: a.Peer, OldRxSPI: a.RxSPI, OldTxSPI: a.TxSPI,
				RxSPI: a.RxSPI + 1, TxSPI: a.TxSPI + 1, Generation: a.Generation + 1})
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no association matches %+v: %w", r, localapi.ErrNotFound)
	}
	return out, nil
}

func (s *Service) RotateDevice(_ context.Context, id uint32) (localapi.Device, error) {
	for _, d := range s.DevicesV {
		if d.ID == id {
			d.Rotations++
			return d, nil
		}
	}
	return localapi.Device{}, fmt.Errorf("device %d: %w", id, localapi.ErrNotFound)
}

// UpgradePSP records the local port of the socket it was handed.
func (s *Service) UpgradePSP(_ context.Context, sock *os.File, peer string) (localapi.UpgradeResult, error) {
	defer sock.Close()
	sa, err := unix.Getsockname(int(sock.Fd()))
	if err != nil {
		return localapi.UpgradeResult{}, err
	}
	port := 0
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		port = a.Port
	case *unix.SockaddrInet6:
		port = a.Port
	}
	s.mu.Lock()
	s.Upgraded = append(s.Upgraded, port)
	s.mu.Unlock()
	return localapi.UpgradeResult{Peer: peer, RxSPI: 7}, nil
}

// Serve runs the API for svc on a socket in a directory unprivileged test
// processes can enter, and returns the socket path.
func Serve(t testing.TB, svc localapi.Service, auth localapi.Authorizer) string {
	t.Helper()
	dir := OpenTempDir(t)
	path := filepath.Join(dir, "pspd.sock")
	ln, err := localapi.Listen(path, auth)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		localapi.NewServer(svc, auth, slog.New(slog.NewTextHandler(io.Discard, nil))).Serve(ctx, ln)
	}()
	t.Cleanup(func() { cancel(); <-done })
	return path
}

// OpenTempDir is a temporary directory that unprivileged helper processes
// can enter (t.TempDir and its parent are 0700).
func OpenTempDir(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	for _, d := range []string{dir, filepath.Dir(dir)} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// AssocDevice adds the request's netdev to the device's associations, as
// the daemon reports one it made: with the namespace and name asked for.
func (s *Service) AssocDevice(_ context.Context, id uint32, req localapi.AssocRequest) (localapi.Device, error) {
	return s.changeDevice(id, func(d *localapi.Device) error {
		d.Assoc = append(slices.Clone(d.Assoc), localapi.AssocDev{Ifindex: cmp.Or(req.Ifindex, 2), NSID: 0, NetNS: req.Path(), Ifname: cmp.Or(req.Ifname, "eth0")})
		return nil
	})
}

// DisassocDevice removes the association with the request's netns and
// ifname.
func (s *Service) DisassocDevice(_ context.Context, id uint32, req localapi.AssocRequest) (localapi.Device, error) {
	return s.changeDevice(id, func(d *localapi.Device) error {
		n := slices.IndexFunc(d.Assoc, func(a localapi.AssocDev) bool { return a.NetNS == req.Path() && a.Ifname == req.Ifname })
		if n < 0 {
			return fmt.Errorf("%s in %s is not associated with device %d: %w", req.Ifname, req.Path(), id, localapi.ErrNotFound)
		}
		d.Assoc = slices.Delete(slices.Clone(d.Assoc), n, n+1)
		return nil
	})
}

// changeDevice applies change to a copy of device id and keeps it.
func (s *Service) changeDevice(id uint32, change func(*localapi.Device) error) (localapi.Device, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.DevicesErr != nil {
		return localapi.Device{}, s.DevicesErr
	}
	for i, d := range s.DevicesV {
		if d.ID == id {
			if err := change(&d); err != nil {
				return localapi.Device{}, err
			}
			s.DevicesV[i] = d
			return d, nil
		}
	}
	return localapi.Device{}, fmt.Errorf("no device %d (see pspctl dev list): %w", id, localapi.ErrNotFound)
}
