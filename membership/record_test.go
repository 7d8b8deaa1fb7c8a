package membership

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pspd/pspd/keyexchange/identity"
)

func pubkey(t testing.TB) string {
	t.Helper()
	id, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return id.Public().String()
}

func record(t testing.TB, name string) Record {
	return Record{Name: name, Endpoints: []string{"192.0.2.1:6082"}, PublicKeys: []string{pubkey(t)}, Prefixes: []string{"10.1.0.0/16"}}
}

func TestDecode(t *testing.T) {
	good := record(t, "a")
	data, err := good.Encode()
	if err != nil {
		t.Fatal(err)
	}
	r, err := Decode("/pspd/nodes/a", data)
	if err != nil {
		t.Fatal(err)
	}
	p, err := r.Peer()
	if err != nil || p.Name != "a" || p.Endpoint.String() != "192.0.2.1:6082" || len(p.Prefixes) != 1 {
		t.Fatalf("Peer = %+v, %v", p, err)
	}
	for _, c := range []struct {
		name, key, data, want string
	}{
		{"other node's key", "/pspd/nodes/b", string(data), `names node "a": a node's record must be stored under its own name`},
		{"not json", "/pspd/nodes/a", "{", "unexpected EOF"},
		{"trailing", "/pspd/nodes/a", string(data) + "{}", "data after the JSON object"},
		{"no endpoint", "/pspd/nodes/a", `{"name":"a","public_keys":["` + good.PublicKeys[0] + `"],"prefixes":["10.0.0.0/8"]}`, "0 endpoints"},
		{"name endpoint", "/pspd/nodes/a", `{"name":"a","endpoints":["a.example:1"],"public_keys":["` + good.PublicKeys[0] + `"],"prefixes":["10.0.0.0/8"]}`, `endpoint "a.example:1" is not an address:port`},
		{"multicast endpoint", "/pspd/nodes/a", `{"name":"a","endpoints":["224.0.0.1:6082"],"public_keys":["` + good.PublicKeys[0] + `"],"prefixes":["10.0.0.0/8"]}`, "unicast"},
		{"bad key", "/pspd/nodes/a", `{"name":"a","endpoints":["192.0.2.1:6082"],"public_keys":["AAAA"],"prefixes":["10.0.0.0/8"]}`, "public key 0"},
		{"three keys", "/pspd/nodes/a", `{"name":"a","endpoints":["192.0.2.1:6082"],"public_keys":["x","y","z"],"prefixes":["10.0.0.0/8"]}`, "3 public keys"},
		{"host bits", "/pspd/nodes/a", `{"name":"a","endpoints":["192.0.2.1:6082"],"public_keys":["` + good.PublicKeys[0] + `"],"prefixes":["10.0.0.1/8"]}`, "host bits"},
		{"bad backend", "/pspd/nodes/a", `{"name":"a","endpoints":["192.0.2.1:6082"],"public_keys":["` + good.PublicKeys[0] + `"],"prefixes":["10.0.0.0/8"],"backend":"gre"}`, "backend"},
		{"big", "/pspd/nodes/a", `{"name":"a","x":"` + strings.Repeat("x", MaxRecordBytes) + `"}`, "more than"},
	} {
		if _, err := Decode(c.key, []byte(c.data)); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: Decode = %v, want an error containing %q", c.name, err, c.want)
		}
	}
}

// TestPeers: the others' records become peers in name order; this node's
// own is skipped and a broken one is refused alone.
func TestPeers(t *testing.T) {
	bad := record(t, "c")
	bad.Prefixes = nil
	peers, refused := Peers([]Record{record(t, "d"), record(t, "self"), bad, record(t, "b")}, "self")
	if len(peers) != 2 || peers[0].Name != "b" || peers[1].Name != "d" {
		t.Fatalf("peers %+v", peers)
	}
	if len(refused) != 1 || !strings.Contains(refused[0].Error(), `record of "c"`) {
		t.Fatalf("refused %v", refused)
	}
}

func TestCache(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", "members.json")
	if rs, err := LoadCache(path); err != nil || rs != nil {
		t.Fatalf("no cache: %v %v", rs, err)
	}
	want := []Record{record(t, "a"), record(t, "b")}
	if err := SaveCache(path, want); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("cache file %v, %v: want mode 0600", fi.Mode(), err)
	}
	got, err := LoadCache(path)
	if err != nil || len(got) != 2 || got[1].PublicKeys[0] != want[1].PublicKeys[0] {
		t.Fatalf("LoadCache = %+v, %v", got, err)
	}
	if err := os.WriteFile(path, []byte("[{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadCache(path); err == nil || !strings.Contains(err.Error(), "remove it") {
		t.Fatalf("corrupt cache: %v", err)
	}
}

// FuzzDecode: whatever a store holds, Decode returns a record whose peer
// converts, or an error; never a panic.
func FuzzDecode(f *testing.F) {
	r := record(f, "a")
	data, _ := r.Encode()
	f.Add("/p/a", data)
	f.Add("/p/a", []byte(`{"name":"a","endpoints":["[::1]:1"],"public_keys":[""],"prefixes":["::/0"]}`))
	f.Fuzz(func(t *testing.T, key string, data []byte) {
		r, err := Decode(key, data)
		if err != nil {
			return
		}
		if _, err := r.Peer(); err != nil {
			t.Fatalf("Decode accepted a record whose Peer fails: %v", err)
		}
	})
}
