// Package client is the Go client of pspd's local API, used by pspctl,
// by applications that upgrade their TCP connections to PSP, and by tests.
package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/pspd/pspd/localapi"
)

// Client talks to one pspd.
type Client struct {
	path string
	hc   *http.Client
}

// New returns a client for the daemon listening at socketPath ("" means
// localapi.DefaultSocket).
func New(socketPath string) *Client {
	if socketPath == "" {
		socketPath = localapi.DefaultSocket
	}
	c := &Client{path: socketPath}
	c.hc = &http.Client{Transport: &http.Transport{
		DialContext:       func(ctx context.Context, _, _ string) (net.Conn, error) { return c.dial(ctx) },
		DisableKeepAlives: true,
	}}
	return c
}

// ErrDaemonNotRunning means nothing answers on the socket.
var ErrDaemonNotRunning = errors.New("pspd is not running")

// APIError is an error answer from the daemon.
type APIError struct {
	Status  int
	Message string
}

func (e *APIError) Error() string { return e.Message }

// IsAccessDenied reports whether err is the daemon refusing the caller.
func IsAccessDenied(err error) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.Status == http.StatusForbidden
}

func (c *Client) dial(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.path)
	switch {
	case err == nil:
		return conn, nil
	case errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.ECONNREFUSED):
		return nil, fmt.Errorf("%w: nothing answers on %s; start it (systemctl start pspd, or pspd run --config FILE) or pass --socket", ErrDaemonNotRunning, c.path)
	case errors.Is(err, syscall.EACCES):
		return nil, fmt.Errorf("permission denied on %s: run as root, or add your user to group %s to read state", c.path, localapi.DefaultGroup)
	}
	return nil, err
}

func (c *Client) do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://pspd"+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			return ue.Err
		}
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return decodeError(resp)
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

func decodeError(resp *http.Response) error {
	var eb localapi.ErrorBody
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if json.Unmarshal(b, &eb) != nil || eb.Error == "" {
		eb.Error = fmt.Sprintf("pspd answered %s", resp.Status)
	}
	return &APIError{Status: resp.StatusCode, Message: eb.Error}
}

// Status returns the daemon's status.
func (c *Client) Status(ctx context.Context) (localapi.Status, error) {
	var v localapi.Status
	return v, c.do(ctx, http.MethodGet, "/v1/status", nil, &v)
}

// Peers lists configured peers.
func (c *Client) Peers(ctx context.Context) ([]localapi.Peer, error) {
	var v []localapi.Peer
	return v, c.do(ctx, http.MethodGet, "/v1/peers", nil, &v)
}

// Peer returns one configured peer by name.
func (c *Client) Peer(ctx context.Context, name string) (localapi.Peer, error) {
	var v localapi.Peer
	return v, c.do(ctx, http.MethodGet, "/v1/peers/"+url.PathEscape(name), nil, &v)
}

// Assocs lists associations.
func (c *Client) Assocs(ctx context.Context) ([]localapi.Assoc, error) {
	var v []localapi.Assoc
	return v, c.do(ctx, http.MethodGet, "/v1/assocs", nil, &v)
}

// Rotate rekeys the selected associations make-before-break and returns
// once each has its new SPIs.
func (c *Client) Rotate(ctx context.Context, req localapi.RotateRequest) ([]localapi.Rotated, error) {
	if err := req.Validate(); err != nil {
		return nil, err
	}
	var v []localapi.Rotated
	return v, c.do(ctx, http.MethodPost, "/v1/assocs/rotate", req, &v)
}

// Ping asks the daemon for ICMP echo round trips through the peer's
// association.
func (c *Client) Ping(ctx context.Context, peer string, req localapi.PingRequest) (localapi.PingResult, error) {
	var v localapi.PingResult
	return v, c.do(ctx, http.MethodPost, "/v1/peers/"+url.PathEscape(peer)+"/ping", req, &v)
}

// Reload makes the daemon read its configuration file again. A reload it
// refuses is an *APIError with status 409 and the reason.
func (c *Client) Reload(ctx context.Context) (localapi.Reloaded, error) {
	var v localapi.Reloaded
	return v, c.do(ctx, http.MethodPost, "/v1/reload", nil, &v)
}

// Identity is the daemon's identity and its rotation.
func (c *Client) Identity(ctx context.Context) (localapi.Identity, error) {
	var v localapi.Identity
	return v, c.do(ctx, http.MethodGet, "/v1/identity", nil, &v)
}

// ChangeIdentity takes a step of the identity rotation.
func (c *Client) ChangeIdentity(ctx context.Context, step localapi.IdentityStep) (localapi.Identity, error) {
	var v localapi.Identity
	return v, c.do(ctx, http.MethodPost, "/v1/identity/"+string(step), nil, &v)
}

// Devices lists kernel PSP devices.
func (c *Client) Devices(ctx context.Context) ([]localapi.Device, error) {
	var v []localapi.Device
	return v, c.do(ctx, http.MethodGet, "/v1/devices", nil, &v)
}

// RotateDevice rotates a PSP device key.
func (c *Client) RotateDevice(ctx context.Context, id uint32) (localapi.Device, error) {
	var v localapi.Device
	return v, c.do(ctx, http.MethodPost, fmt.Sprintf("/v1/devices/%d/rotate", id), nil, &v)
}

// AssocDevice gives a netdev of another network namespace (a
// container's) the use of PSP device id.
func (c *Client) AssocDevice(ctx context.Context, id uint32, req localapi.AssocRequest) (localapi.Device, error) {
	var v localapi.Device
	return v, c.do(ctx, http.MethodPost, fmt.Sprintf("/v1/devices/%d/assoc", id), req, &v)
}

// DisassocDevice takes back what AssocDevice gave.
func (c *Client) DisassocDevice(ctx context.Context, id uint32, req localapi.AssocRequest) (localapi.Device, error) {
	var v localapi.Device
	return v, c.do(ctx, http.MethodPost, fmt.Sprintf("/v1/devices/%d/disassoc", id), req, &v)
}

// Events streams events to fn until ctx ends, fn returns an error, or the
// daemon closes the stream.
func (c *Client) Events(ctx context.Context, fn func(localapi.Event) error) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://pspd/v1/events", nil)
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return decodeError(resp)
	}
	dec := json.NewDecoder(resp.Body)
	for {
		var ev localapi.Event
		if err := dec.Decode(&ev); err != nil {
			if ctx.Err() != nil || errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if err := fn(ev); err != nil {
			return err
		}
	}
}

// UpgradePSP hands a connected TCP socket to pspd, which upgrades it to PSP
// with the named peer (whose pspd must be handed the other end). The
// caller keeps its conn: pspd works on a duplicate of the descriptor.
func (c *Client) UpgradePSP(ctx context.Context, conn syscall.Conn, peer string) (localapi.UpgradeResult, error) {
	var res localapi.UpgradeResult
	raw, err := conn.SyscallConn()
	if err != nil {
		return res, err
	}
	uc, err := c.dial(ctx)
	if err != nil {
		return res, err
	}
	defer uc.Close()
	if dl, ok := ctx.Deadline(); ok {
		uc.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { uc.Close() })
	defer stop()
	fmt.Fprintf(uc, "POST /v1/psp/upgrade?peer=%s HTTP/1.1\r\nHost: pspd\r\nUpgrade: %s\r\nConnection: Upgrade\r\nContent-Length: 0\r\n\r\n",
		url.QueryEscape(peer), localapi.UpgradeProtocol)
	br := bufio.NewReader(uc)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return res, fmt.Errorf("psp upgrade: %w", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		defer resp.Body.Close()
		return res, decodeError(resp)
	}
	var sendErr error
	if err := raw.Control(func(fd uintptr) {
		_, _, sendErr = uc.(*net.UnixConn).WriteMsgUnix([]byte{0}, unix.UnixRights(int(fd)), nil)
	}); err != nil {
		return res, err
	}
	if sendErr != nil {
		return res, fmt.Errorf("psp upgrade: pass socket: %w", sendErr)
	}
	line, err := br.ReadBytes('\n')
	if err != nil {
		return res, fmt.Errorf("psp upgrade: no answer from pspd: %w", err)
	}
	if strings.Contains(string(line), `"error"`) {
		var eb localapi.ErrorBody
		if json.Unmarshal(line, &eb) == nil && eb.Error != "" {
			return res, fmt.Errorf("psp upgrade: %s", eb.Error)
		}
	}
	if err := json.Unmarshal(line, &res); err != nil {
		return res, fmt.Errorf("psp upgrade: bad answer: %w", err)
	}
	return res, nil
}

// Upgrade hands an application's connected TCP connection to the pspd of
// this host (at localapi.DefaultSocket), which upgrades it to kernel PSP
// with the named peer. The application at the other end must hand its end
// of the same connection to its pspd at about the same time. Upgrade
// before sending data: the kernel refuses the transmit key while clear
// data is queued, and on failure the connection should be closed, since
// its receive side may already expect PSP.
func Upgrade(ctx context.Context, conn *net.TCPConn, peer string) (localapi.UpgradeResult, error) {
	return New("").UpgradePSP(ctx, conn, peer)
}
