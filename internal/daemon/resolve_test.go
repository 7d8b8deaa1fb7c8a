package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/localapi/client"
	"github.com/pspd/pspd/policy"
)

// fakeResolver answers look-ups of one name with what it is set to. It
// is a fake of DNS beside the netns tests that resolve through a real
// hosts file.
type fakeResolver struct {
	mu    sync.Mutex
	addr  netip.Addr
	err   error
	calls int
}

func (f *fakeResolver) set(a netip.Addr, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.addr, f.err = a, err
}

func (f *fakeResolver) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.err != nil {
		return nil, f.err
	}
	return []netip.Addr{f.addr}, nil
}

// TestEndpointReresolved: a peer given by name is looked up again while
// pspd runs. A look-up that fails keeps the address and warns once; one
// that gives a new address moves the peer there, and the association
// comes up at it.
func TestEndpointReresolved(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the local API answers root or the pspd group only")
	}
	a, b := newHost(t, "a"), newHost(t, "b")
	res := &fakeResolver{addr: netip.MustParseAddr("127.0.0.3")} // nobody listens there
	src := fmt.Sprintf("identity: %s\nlisten: 127.0.0.1:%d\nsocket: %s\nmetrics: off\nrekey_interval: 1h\nbackend: userspace\nresolve_interval: 10s\npeers:\n"+
		"  - {name: b, endpoint: 'peer-b.test:%d', public_key: %s, prefixes: [10.99.0.0/24]}\n",
		filepath.Join(a.dir, "id.pem"), a.port, a.sock, b.port, b.id.Public())
	pc, err := policy.ParseResolve(filepath.Join(a.dir, "pspd.yaml"), []byte(src), res)
	if err != nil {
		t.Fatal(err)
	}
	a.resolver = res
	a.start(t, pc)
	b.start(t, b.config(t, "", a))
	ca := client.New(a.sock)
	peerB := func() localapi.Peer {
		t.Helper()
		ps, err := ca.Peers(context.Background())
		if err != nil || len(ps) != 1 {
			t.Fatalf("peers %+v %v", ps, err)
		}
		return ps[0]
	}
	if p := peerB(); p.Endpoint != fmt.Sprintf("127.0.0.3:%d", b.port) || p.EndpointName != fmt.Sprintf("peer-b.test:%d", b.port) {
		t.Fatalf("peer b at %s (%s), want peer-b.test at 127.0.0.3", p.Endpoint, p.EndpointName)
	}

	res.set(netip.Addr{}, errors.New("no such host"))
	for i := range 2 {
		a.d.resolveDue(context.Background(), time.Now().Add(time.Duration(i+1)*time.Hour))
	}
	if got := strings.Count(string(a.logs.Bytes()), "no longer resolves"); got != 1 {
		t.Errorf("two failed look-ups logged %d warnings, want 1", got)
	}
	if p := peerB(); !strings.HasPrefix(p.Endpoint, "127.0.0.3:") {
		t.Fatalf("a failed look-up moved the peer to %s", p.Endpoint)
	}

	res.set(netip.MustParseAddr("127.0.0.1"), nil)
	a.d.resolveDue(context.Background(), time.Now().Add(3*time.Hour))
	if p := peerB(); p.Endpoint != fmt.Sprintf("127.0.0.1:%d", b.port) {
		t.Fatalf("after the name moved, peer b is at %s", p.Endpoint)
	}
	waitAssoc(t, ca, 1)
	logs := string(a.logs.Bytes())
	for _, want := range []string{"resolves again", "resolves to a new address"} {
		if !strings.Contains(logs, want) {
			t.Errorf("the log does not say %q", want)
		}
	}
}
