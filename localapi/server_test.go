package localapi_test

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/pspd/pspd/localapi"
	"github.com/pspd/pspd/localapi/apitest"
)

// TestErrorsAreJSON: every answer but a success is {"error": ...} as
// application/json, the mux's own 404 and 405 included, and a 405 still
// says which methods the path takes.
func TestErrorsAreJSON(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the API answers root or the pspd group only")
	}
	svc := &apitest.Service{PeersV: []localapi.Peer{{Name: "b"}}}
	sock := apitest.Serve(t, svc, localapi.NewAuthorizer("pspd-test-nonexistent"))
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}}
	for _, tc := range []struct {
		method, path string
		code         int
		want         string
	}{
		{"GET", "/v1/nope", 404, "/v1/nope"},
		{"GET", "/", 404, "/v1/"},
		{"DELETE", "/v1/status", 405, "GET"},
		{"GET", "/v1/assocs/rotate", 405, "POST"},
		{"GET", "/v1/peers/nobody", 404, "nobody"},
	} {
		req, _ := http.NewRequest(tc.method, "http://pspd"+tc.path, nil)
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var eb localapi.ErrorBody
		err = json.NewDecoder(resp.Body).Decode(&eb)
		resp.Body.Close()
		if resp.StatusCode != tc.code || resp.Header.Get("Content-Type") != "application/json" || err != nil || !strings.Contains(eb.Error, tc.want) {
			t.Errorf("%s %s: %d %s %q (%v); want %d, application/json and an error naming %q",
				tc.method, tc.path, resp.StatusCode, resp.Header.Get("Content-Type"), eb.Error, err, tc.code, tc.want)
		}
		if tc.code == 405 && !strings.Contains(resp.Header.Get("Allow"), tc.want) {
			t.Errorf("%s %s: Allow %q", tc.method, tc.path, resp.Header.Get("Allow"))
		}
	}
	resp, err := hc.Get("http://pspd/v1/peers/b")
	if err != nil {
		t.Fatal(err)
	}
	var p localapi.Peer
	if err := json.NewDecoder(resp.Body).Decode(&p); err != nil || resp.StatusCode != 200 || p.Name != "b" {
		t.Errorf("GET /v1/peers/b: %d %+v %v", resp.StatusCode, p, err)
	}
	resp.Body.Close()
}

// TestAssocRequest: an association names one namespace and one netdev,
// the namespace by path, by a name of ip netns, or by a process.
func TestAssocRequest(t *testing.T) {
	for _, tc := range []struct {
		req  localapi.AssocRequest
		path string // "": invalid
	}{
		{localapi.AssocRequest{NetNS: "/run/netns/web", Ifname: "eth0"}, "/run/netns/web"},
		{localapi.AssocRequest{NetNS: "web", Ifindex: 3}, "/run/netns/web"},
		{localapi.AssocRequest{NetNS: "/proc/42/ns/net", Ifname: "eth0"}, "/proc/42/ns/net"},
		{localapi.AssocRequest{PID: 42, Ifname: "eth0"}, "/proc/42/ns/net"},
		{localapi.AssocRequest{Ifname: "eth0"}, ""},
		{localapi.AssocRequest{NetNS: "web", PID: 42, Ifname: "eth0"}, ""},
		{localapi.AssocRequest{PID: -1, Ifname: "eth0"}, ""},
		{localapi.AssocRequest{NetNS: "web"}, ""},
		{localapi.AssocRequest{NetNS: "web", Ifname: "eth0", Ifindex: 3}, ""},
	} {
		err := tc.req.Validate()
		switch {
		case tc.path == "" && err == nil:
			t.Errorf("%+v accepted", tc.req)
		case tc.path != "" && err != nil:
			t.Errorf("%+v: %v", tc.req, err)
		case tc.path != "" && tc.req.Path() != tc.path:
			t.Errorf("%+v names %s, want %s", tc.req, tc.req.Path(), tc.path)
		}
	}
}
