package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/localapi/apitest"
)

var update = flag.Bool("update", false, "rewrite the golden files")

var now = time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)

// fixture is what the in-memory daemon answers; the golden files show how
// pspctl renders it. Real daemons are exercised by the demo test.
func fixture() *apitest.Service {
	boot := "5d41402abc4b2a76b9719d911017c592"
	evs := make(chan localapi.Event, 8)
	for _, e := range []localapi.Event{
		{Time: now.Add(-75 * time.Second), Kind: localapi.EventPeerUp, Peer: "web-2", PeerBootID: boot, Detail: "session with web-2 up (key exchange SecP256r1MLKEM768)"},
		{Time: now.Add(-75 * time.Second), Kind: localapi.EventAssocUp, Peer: "web-2", Assoc: "web-2/3", Generation: 3, RxSPI: 3, TxSPI: 0x40000003, Backend: "userspace"},
		{Time: now.Add(-10 * time.Second), Kind: localapi.EventRekey, Peer: "web-2", Assoc: "web-2/3", Generation: 4, RxSPI: 4, TxSPI: 0x40000004, Backend: "userspace",
			Reason: localapi.ReasonOperator, Detail: "generation 4 replaces 3 (operator)"},
		{Time: now.Add(-5 * time.Second), Kind: localapi.EventPeerDown, Peer: "db-1", Reason: "dial 192.0.2.9:6082: timeout: no recent network activity"},
		{Time: now, Kind: localapi.EventDeviceRotated, Detail: "device 1 key rotated"},
	} {
		evs <- e
	}
	close(evs)
	return &apitest.Service{
		StatusV: localapi.Status{Version: "0.1.0", PublicKey: "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE", Fingerprint: "sha256:1f2e3d4c",
			Listen: "[::]:6082", Backends: []string{"userspace"}, Started: now.Add(-90 * time.Minute), Peers: 2, PeersUp: 1, Assocs: 1,
			LastReload: now.Add(-20 * time.Minute), Rotation: localapi.RotationSwitched, UserspaceIO: "udp", UserspaceIOReason: "auto: the driver offers no zero-copy AF_XDP",
			Fleet: &localapi.Fleet{Node: "web-1", Service: "etcd https://192.0.2.100:2379", Connected: false, Since: now.Add(-2 * time.Minute),
				Error: "grant a lease: context deadline exceeded", Members: 1,
				LeftOut: []string{`peer "db-2": prefixes[0]: 10.9.0.0/24 overlaps 10.9.0.0/24 of peer "db-1": traffic must map to one peer`}}},
		PeersV: []localapi.Peer{
			{Name: "web-2", Endpoint: "192.0.2.2:6082", Prefixes: []string{"10.2.0.0/24", "fd00:2::/64"}, Fingerprint: "sha256:aa11bb22", NextFingerprint: "sha256:ee55ff66", SessionFingerprint: "sha256:ee55ff66",
				State: "up", Since: now.Add(-75 * time.Second), Backend: "userspace", PSP: &localapi.PeerPSP{Versions: []string{"hdr0-aes-gcm-128", "hdr0-aes-gcm-256"}}, PeerBootID: boot, KeyExchange: "SecP256r1MLKEM768", Observed: "192.0.2.2:6082",
				LastHandshake: now.Add(-42 * time.Second), LastUp: now.Add(-75 * time.Second), Assocs: 1, Assoc: "web-2/3", Rekeys: 7, RTTMicros: 412,
				LastError: "dial 192.0.2.2:6082: timeout: no recent network activity", LastErrorAt: now.Add(-80 * time.Second), LastErrorOld: true,
				Counters: localapi.Counters{BytesIn: 9_437_184, PacketsIn: 7100, BytesOut: 1_048_576, PacketsOut: 812, Drops: 4,
					LastIn: now.Add(-2 * time.Second), LastOut: now.Add(-1 * time.Second)}},
			{Name: "db-1", Endpoint: "192.0.2.9:6082", EndpointName: "db-1.example:6082", Prefixes: []string{"10.9.0.0/24"}, Fingerprint: "sha256:cc33dd44", State: "backoff", Since: now.Add(-3 * time.Second), DownSince: now.Add(-20 * time.Minute),
				Cause:     "peer presented key sha256:ffff0000, not the pinned sha256:cc33dd44",
				LastError: "peer presented key sha256:ffff0000, not the pinned sha256:cc33dd44", LastErrorAt: now.Add(-3 * time.Second)},
		},
		AssocsV: []localapi.Assoc{{ID: "web-2/3", Peer: "web-2", Backend: "userspace", Suite: "aes-gcm-256", RxSPI: 0x00000003, TxSPI: 0x40000003,
			Generation: 3, Created: now.Add(-75 * time.Second), NextRekey: now.Add(525 * time.Second), HardExpiry: now.Add(1725 * time.Second),
			Counters:       localapi.Counters{BytesIn: 9_437_184, PacketsIn: 7100, BytesOut: 1_048_576, PacketsOut: 812, Drops: 4},
			ThisGeneration: localapi.Counters{BytesIn: 1536000, PacketsIn: 1100, BytesOut: 2048, PacketsOut: 12, Drops: 1}}},
		DevicesV: []localapi.Device{{ID: 1, Ifindex: 4, Ifname: "eth0", Capable: []string{"hdr0-aes-gcm-128", "hdr0-aes-gcm-256"},
			Enabled: []string{"hdr0-aes-gcm-256"}, Rotations: 5, LastRotation: now.Add(-3 * time.Hour),
			Assoc: []localapi.AssocDev{{Ifindex: 9, NSID: 1, NetNS: "/run/netns/web", Ifname: "nk0"}, {Ifindex: 12, NSID: 3}}},
			// As a pspd in a container sees the host's device.
			{ID: 2, Ifindex: 4, Capable: []string{"hdr0-aes-gcm-128"}, Enabled: []string{"hdr0-aes-gcm-128"}, ByAssociation: true,
				Assoc: []localapi.AssocDev{{Ifindex: 3, NSID: -1, Ifname: "eth0"}}}},
		EventsC: evs,
		IdentityV: localapi.Identity{PublicKey: "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE", Fingerprint: "sha256:1f2e3d4c",
			Phase: localapi.RotationSwitched, Previous: "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAF", NotMoved: []string{"db-1"}},
	}
}

func run(t *testing.T, sock string, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	root := newRoot(&out, func() time.Time { return now })
	root.SetArgs(append([]string{"--socket", sock}, args...))
	err := root.ExecuteContext(context.Background())
	return out.String(), err
}

func TestGolden(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the API answers root or the pspd group only")
	}
	auth := localapi.NewAuthorizer("pspd-test-nonexistent")
	sock := apitest.Serve(t, fixture(), auth)
	// A host without kernel PSP: the daemon says why there are no devices.
	noPSP := fixture()
	noPSP.DevicesErr = fmt.Errorf("this host has no kernel PSP: no genl family psp (kernel older than 6.14?): %w", localapi.ErrNotFound)
	noPSPSock := apitest.Serve(t, noPSP, auth)
	noPSP.StatusV.LastReloadError = "reload /etc/pspd/pspd.yaml refused: packet_budget changed from 1048576 to 4096, which needs a restart of pspd (the SAs in place were installed with it); nothing was applied"
	noPSP.ReloadErr = localapi.Refused(errors.New(noPSP.StatusV.LastReloadError))
	noPSP.IdentityV = localapi.Identity{PublicKey: "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE", Fingerprint: "sha256:1f2e3d4c",
		Phase: localapi.RotationStaged, Next: "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAG"}
	noDevs := fixture()
	noDevs.DevicesV = []localapi.Device{}
	noDevsSock := apitest.Serve(t, noDevs, auth)
	for _, tc := range []struct {
		golden string
		sock   string
		args   []string
	}{
		{"status.txt", sock, []string{"status"}},
		{"status.json", sock, []string{"status", "--json"}},
		{"status-refused.txt", noPSPSock, []string{"status"}},
		{"reload.txt", sock, []string{"reload"}},
		{"reload.json", sock, []string{"reload", "--json"}},
		{"reload-refused.txt", noPSPSock, []string{"reload"}},
		{"peer-list.txt", sock, []string{"peer", "list"}},
		{"peer-list.json", sock, []string{"peer", "list", "--json"}},
		{"peer-show.txt", sock, []string{"peer", "show", "web-2"}},
		{"peer-show-backoff.txt", sock, []string{"peer", "show", "db-1"}},
		{"peer-show.json", sock, []string{"peer", "show", "web-2", "--json"}},
		{"peer-show-unknown.txt", sock, []string{"peer", "show", "nobody"}},
		{"ping.txt", sock, []string{"ping", "web-2"}},
		{"ping.json", sock, []string{"ping", "web-2", "--count", "2", "--to", "10.2.0.7", "--json"}},
		{"ping-down.txt", sock, []string{"ping", "db-1"}},
		{"assoc-list.txt", sock, []string{"assoc", "list"}},
		{"assoc-list.json", sock, []string{"assoc", "list", "--json"}},
		{"assoc-rotate.txt", sock, []string{"assoc", "rotate", "--peer", "web-2"}},
		{"dev-list.txt", sock, []string{"dev", "list"}},
		{"dev-list-nopsp.txt", noPSPSock, []string{"dev", "list"}},
		{"dev-list-none.txt", noDevsSock, []string{"dev", "list"}},
		{"dev-list.json", sock, []string{"dev", "list", "--json"}},
		{"dev-assoc.txt", sock, []string{"dev", "assoc", "1", "--netns", "/run/netns/db", "--dev", "nk1"}},
		{"dev-assoc-unknown.txt", sock, []string{"dev", "assoc", "7", "--pid", "4242", "--dev", "eth0"}},
		{"dev-assoc-nopsp.txt", noPSPSock, []string{"dev", "assoc", "1", "--netns", "/run/netns/db", "--dev", "nk1"}},
		{"dev-disassoc.txt", sock, []string{"dev", "disassoc", "1", "--netns", "/run/netns/web", "--dev", "nk0"}},
		{"identity.txt", sock, []string{"identity"}},
		{"identity.json", sock, []string{"identity", "--json"}},
		{"identity-rotate.txt", noPSPSock, []string{"identity", "rotate"}},
		{"events.txt", sock, []string{"events"}},
		{"events.json", noPSPSock, []string{"events", "--json"}},
		// Shell completion (cobra's __complete, which the completion
		// scripts call) of peer names and association ids.
		{"complete-peer-show.txt", sock, []string{"__complete", "peer", "show", ""}},
		{"complete-rotate.txt", sock, []string{"__complete", "assoc", "rotate", ""}},
		{"complete-rotate-peer.txt", sock, []string{"__complete", "assoc", "rotate", "--peer", ""}},
	} {
		t.Run(tc.golden, func(t *testing.T) {
			got, err := run(t, tc.sock, tc.args...)
			if err != nil {
				// What pspctl prints for an error is part of the output.
				got += "error: " + err.Error() + "\n"
			}
			path := filepath.Join("testdata", tc.golden)
			if *update {
				os.WriteFile(path, []byte(got), 0o644)
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if got != string(want) {
				t.Errorf("pspctl %s:\n got:\n%s\nwant:\n%s", strings.Join(tc.args, " "), got, want)
			}
		})
	}
}

func TestErrorsSayWhatToDo(t *testing.T) {
	if _, err := run(t, filepath.Join(t.TempDir(), "no.sock"), "status"); err == nil || !strings.Contains(err.Error(), "start it") {
		t.Errorf("no daemon: %v", err)
	}
	if _, err := run(t, "/nonexistent", "assoc", "rotate"); err == nil || !strings.Contains(err.Error(), "give an association ID, --peer NAME or --all") {
		t.Errorf("rotate without selector: %v", err)
	}
	if _, err := run(t, "/nonexistent", "dev", "rotate", "eth0"); err == nil || !strings.Contains(err.Error(), "see pspctl dev list") {
		t.Errorf("bad device id: %v", err)
	}
	for _, args := range [][]string{
		{"dev", "assoc", "1", "--dev", "nk0"},
		{"dev", "assoc", "1", "--netns", "/run/netns/web", "--pid", "1", "--dev", "nk0"},
		{"dev", "disassoc", "1", "--netns", "/run/netns/web"},
	} {
		if _, err := run(t, "/nonexistent", args...); err == nil || !strings.Contains(err.Error(), "--netns PATH or --pid PID") {
			t.Errorf("pspctl %s: %v", strings.Join(args, " "), err)
		}
	}
	if os.Geteuid() == 0 {
		sock := apitest.Serve(t, fixture(), localapi.NewAuthorizer("pspd-test-nonexistent"))
		if _, err := run(t, sock, "assoc", "rotate", "nope/1"); err == nil || !strings.Contains(err.Error(), "no association matches") {
			t.Errorf("unknown association: %v", err)
		}
	}
}
