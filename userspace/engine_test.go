package userspace_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/pspd/pspd/userspace"
	"github.com/pspd/pspd/userspace/codec"
	"github.com/pspd/pspd/userspace/udp"
)

// panickyTUN is a fake TUN device (the real one is exercised by the netns
// tests in dataplane_test.go): its first read panics, its second returns a
// packet to an address no peer routes, later reads block until Close.
type panickyTUN struct {
	reads  int
	closed chan struct{}
}

func (f *panickyTUN) ReadBatch(bufs [][]byte, lens []int) (int, error) {
	f.reads++
	switch f.reads {
	case 1:
		panic("injected")
	case 2:
		pkt := []byte{0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 198, 51, 100, 1}
		lens[0] = copy(bufs[0], pkt)
		return 1, nil
	}
	<-f.closed
	return 0, os.ErrClosed
}

func (f *panickyTUN) WriteBatch(p [][]byte) (int, error) { return len(p), nil }
func (f *panickyTUN) Close() error                       { close(f.closed); return nil }

func TestPanicBecomesCountedDrop(t *testing.T) {
	u, err := udp.Listen(netip.MustParseAddrPort("127.0.0.1:0"), 8)
	if err != nil {
		t.Fatal(err)
	}
	var log bytes.Buffer
	dp, err := userspace.Start(context.Background(), userspace.Config{
		TUN: &panickyTUN{closed: make(chan struct{})}, Underlay: u, MTU: 1400, Framing: codec.Geneve,
		Logger: slog.New(slog.NewTextHandler(&log, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for dp.Stats().Drops[userspace.DropNoPeer] == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if err := dp.Close(); err != nil {
		t.Fatal(err)
	}
	st := dp.Stats()
	if st.Drops[userspace.DropPanic] != 1 || st.Drops[userspace.DropNoPeer] != 1 {
		t.Fatalf("drops %v: want one panic and, after it, one no-peer", st.Drops)
	}
	if !strings.Contains(log.String(), "recovered panic") || !strings.Contains(log.String(), "injected") {
		t.Fatalf("panic not logged: %s", log.String())
	}
}

func TestAddPeerRefuses(t *testing.T) {
	u, err := udp.Listen(netip.MustParseAddrPort("127.0.0.1:0"), 8)
	if err != nil {
		t.Fatal(err)
	}
	dp, err := userspace.Start(context.Background(), userspace.Config{
		TUN: &panickyTUN{reads: 2, closed: make(chan struct{})}, Underlay: u, MTU: 1400, Framing: codec.Geneve,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	gen, _ := codec.New(codec.Config{Framing: codec.Geneve})
	psp, _ := codec.New(codec.Config{Framing: codec.PSPTunnel})
	defer gen.Close()
	defer psp.Close()
	ep := netip.MustParseAddrPort("192.0.2.2:6081")
	pfx := []netip.Prefix{netip.MustParsePrefix("10.200.0.0/24")}
	if err := dp.AddPeer(userspace.Peer{Endpoint: ep, Prefixes: pfx, Codec: gen}); err != nil {
		t.Fatal(err)
	}
	for name, p := range map[string]userspace.Peer{
		"no port":          {Endpoint: netip.AddrPortFrom(ep.Addr(), 0), Prefixes: pfx, Codec: gen},
		"nil codec":        {Endpoint: netip.MustParseAddrPort("192.0.2.3:6081"), Prefixes: pfx},
		"other framing":    {Endpoint: netip.MustParseAddrPort("192.0.2.3:1000"), Prefixes: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}, Codec: psp},
		"no prefixes":      {Endpoint: netip.MustParseAddrPort("192.0.2.3:6081"), Codec: gen},
		"unmasked prefix":  {Endpoint: netip.MustParseAddrPort("192.0.2.3:6081"), Prefixes: []netip.Prefix{netip.MustParsePrefix("10.1.2.3/16")}, Codec: gen},
		"same endpoint":    {Endpoint: ep, Prefixes: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}, Codec: gen},
		"prefix of a peer": {Endpoint: netip.MustParseAddrPort("192.0.2.3:6081"), Prefixes: pfx, Codec: gen},
	} {
		if err := dp.AddPeer(p); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if len(dp.Stats().Peers) != 1 {
		t.Fatalf("peers after refusals: %+v", dp.Stats().Peers)
	}
	if !dp.RemovePeer(ep) || dp.RemovePeer(ep) || len(dp.Stats().Peers) != 0 {
		t.Fatal("RemovePeer: want true once, then false, and no peers left")
	}
}

func TestCancelCloses(t *testing.T) {
	u, err := udp.Listen(netip.MustParseAddrPort("127.0.0.1:0"), 8)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	f := &panickyTUN{reads: 2, closed: make(chan struct{})}
	if _, err := userspace.Start(ctx, userspace.Config{TUN: f, Underlay: u, MTU: 1400, Framing: codec.Geneve}); err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case <-f.closed:
	case <-time.After(5 * time.Second):
		t.Fatal("cancelling the context did not close the TUN device")
	}
	if _, err := u.ReadBatch([]userspace.Message{{Buf: make([]byte, 64)}}); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("underlay after cancel: %v, want net.ErrClosed", err)
	}
}
