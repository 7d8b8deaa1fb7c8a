// Package kube is a membership.Source on Kubernetes: each node's record
// is a cluster-scoped PSPNode object (group pspd.dev) named after the
// node, which its pspd writes with server-side apply and the others
// watch. The API server is the authority: deploy/ ships the custom
// resource, RBAC, and a ValidatingAdmissionPolicy that lets a pspd write
// only the object named after the node its service-account token is bound
// to.
//
// The client is the API's REST interface over net/http (list, then watch
// from the list's resourceVersion, relisting when the watch expires), so
// that pspd does not carry client-go.
package kube

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/pspd/pspd/membership"
)

// Group, Version and Resource name the PSPNode API.
const (
	Group    = "pspd.dev"
	Version  = "v1"
	Resource = "pspnodes"
	Kind     = "PSPNode"
)

// In-cluster defaults, where a pod's service account is mounted.
const (
	inClusterToken = "/var/run/secrets/kubernetes.io/serviceaccount/token"
	inClusterCA    = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
)

// Config says how to reach the API server.
type Config struct {
	// Server is the API server's URL; "" is the in-cluster one
	// (KUBERNETES_SERVICE_HOST and _PORT, the pod's service account).
	Server string
	// TokenFile is read again for every request (bound tokens rotate);
	// CAFile is the PEM bundle the server's certificate chains to.
	TokenFile, CAFile string
	// Dial, if set, connects to the server (tests reach it inside a
	// network namespace).
	Dial   func(ctx context.Context, addr string) (net.Conn, error)
	Logger *slog.Logger
}

// Source is the Kubernetes membership source.
type Source struct {
	cfg    Config
	log    *slog.Logger
	client *http.Client
	base   string
	*membership.HealthTracker
}

var _ membership.Source = (*Source)(nil)

// New checks cfg and loads the CA; it does not connect (Run does, and
// retries).
func New(cfg Config) (*Source, error) {
	if cfg.Server == "" {
		host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
		if host == "" || port == "" {
			return nil, errors.New("kubernetes: no server given and not in a cluster (KUBERNETES_SERVICE_HOST is unset)")
		}
		cfg.Server = "https://" + net.JoinHostPort(host, port)
		if cfg.TokenFile == "" {
			cfg.TokenFile = inClusterToken
		}
		if cfg.CAFile == "" {
			cfg.CAFile = inClusterCA
		}
	}
	u, err := url.Parse(cfg.Server)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("kubernetes: server %q is not an https:// URL", cfg.Server)
	}
	if cfg.TokenFile == "" {
		return nil, errors.New("kubernetes: no token file")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("kubernetes: CA: %w", err)
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("kubernetes: CA %s holds no PEM certificate", cfg.CAFile)
		}
	}
	tr := &http.Transport{TLSClientConfig: tc, ResponseHeaderTimeout: 30 * time.Second}
	if cfg.Dial != nil {
		tr.DialContext = func(ctx context.Context, _, addr string) (net.Conn, error) { return cfg.Dial(ctx, addr) }
	}
	s := &Source{cfg: cfg, log: cfg.Logger.With("part", "kubernetes"), client: &http.Client{Transport: tr},
		base: strings.TrimSuffix(cfg.Server, "/") + "/apis/" + Group + "/" + Version + "/" + Resource}
	s.HealthTracker = membership.NewHealthTracker("kubernetes " + cfg.Server)
	return s, nil
}

// object is a PSPNode as the API serves it.
type object struct {
	APIVersion string `json:"apiVersion,omitempty"`
	Kind       string `json:"kind,omitempty"`
	Metadata   struct {
		Name            string `json:"name"`
		ResourceVersion string `json:"resourceVersion,omitempty"`
	} `json:"metadata"`
	Spec spec `json:"spec"`
}

// spec is a PSPNode's record; the name is the object's.
type spec struct {
	Endpoints  []string `json:"endpoints"`
	PublicKeys []string `json:"publicKeys"`
	Prefixes   []string `json:"prefixes"`
	Backend    string   `json:"backend,omitempty"`
	Suite      string   `json:"suite,omitempty"`
}

func (o object) record() (membership.Record, error) {
	r := membership.Record{Name: o.Metadata.Name, Endpoints: o.Spec.Endpoints, PublicKeys: o.Spec.PublicKeys,
		Prefixes: o.Spec.Prefixes, Backend: o.Spec.Backend, Suite: o.Spec.Suite}
	_, err := r.Peer()
	return r, err
}

// Object is the PSPNode that publishes r, as JSON.
func Object(r membership.Record) ([]byte, error) {
	if _, err := r.Peer(); err != nil {
		return nil, err
	}
	o := object{APIVersion: Group + "/" + Version, Kind: Kind,
		Spec: spec{Endpoints: r.Endpoints, PublicKeys: r.PublicKeys, Prefixes: r.Prefixes, Backend: r.Backend, Suite: r.Suite}}
	o.Metadata.Name = r.Name
	return json.Marshal(o)
}

// resync is how often the whole list is read again even when the watch
// runs, as informers do.
const resync = 10 * time.Minute

// Run implements membership.Source.
func (s *Source) Run(ctx context.Context, self *membership.Self, update func([]membership.Record)) error {
	membership.Follow(ctx, s.log, s.HealthTracker, func(ctx context.Context, publish bool) error {
		return s.session(ctx, self, publish, update)
	})
	return nil
}

// apply publishes r by server-side apply: it creates or updates the
// object, owned by field manager pspd.
func (s *Source) apply(ctx context.Context, r membership.Record) error {
	body, err := Object(r)
	if err != nil {
		return err
	}
	if _, err := s.do(ctx, "PATCH", "/"+url.PathEscape(r.Name)+"?fieldManager=pspd&force=true", "application/apply-patch+yaml", body); err != nil {
		return fmt.Errorf("publish PSPNode %s: %w", r.Name, err)
	}
	return nil
}

// session publishes the object (if publish), lists the PSPNodes and
// watches them until the watch ends, fails, or a resync is due. A change
// of self is applied while it runs; a failure to apply it ends the
// session, and the next one publishes it.
func (s *Source) session(ctx context.Context, self *membership.Self, publish bool, update func([]membership.Record)) error {
	r, changed := self.Get()
	name := r.Name
	if publish {
		if err := s.apply(ctx, r); err != nil {
			return err
		}
	}
	b, err := s.do(ctx, "GET", "", "", nil)
	if err != nil {
		return fmt.Errorf("list PSPNodes: %w", err)
	}
	var list struct {
		Metadata struct {
			ResourceVersion string `json:"resourceVersion"`
		} `json:"metadata"`
		Items []object `json:"items"`
	}
	if err := json.Unmarshal(b, &list); err != nil {
		return fmt.Errorf("list PSPNodes: %w", err)
	}
	records := map[string]membership.Record{}
	for _, o := range list.Items {
		s.put(records, o)
	}
	s.log.Info("kubernetes: membership read", "objects", len(list.Items), "published", publish)
	s.Track(true, nil)
	update(membership.Sorted(records))
	wctx, cancel := context.WithTimeout(ctx, resync)
	defer cancel()
	applyErr := make(chan error, 1)
	if publish {
		go func(changed <-chan struct{}) {
			for {
				select {
				case <-wctx.Done():
					return
				case <-changed:
				}
				var r membership.Record
				r, changed = self.Get()
				if err := s.apply(wctx, r); err != nil {
					applyErr <- err
					cancel()
					return
				}
				s.log.Info("kubernetes: this node's record changed; published", "name", name)
			}
		}(changed)
	}
	req, err := s.request(wctx, "GET", "?watch=1&allowWatchBookmarks=true&resourceVersion="+url.QueryEscape(list.Metadata.ResourceVersion), "", nil)
	if err != nil {
		return err
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return fmt.Errorf("watch PSPNodes: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("watch PSPNodes: %w", apiError(resp))
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var ev struct {
			Type   string          `json:"type"`
			Object json.RawMessage `json:"object"`
		}
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return fmt.Errorf("watch PSPNodes: %w", err)
		}
		var o object
		switch ev.Type {
		case "ADDED", "MODIFIED", "DELETED":
			if err := json.Unmarshal(ev.Object, &o); err != nil {
				return fmt.Errorf("watch PSPNodes: %w", err)
			}
		case "BOOKMARK":
			continue
		default: // ERROR: the resourceVersion is too old, say; relist
			return fmt.Errorf("watch PSPNodes: %s %s", ev.Type, ev.Object)
		}
		if ev.Type == "DELETED" {
			delete(records, o.Metadata.Name)
			update(membership.Sorted(records))
			if o.Metadata.Name == name && publish {
				return membership.ErrRemoved
			}
			continue
		}
		s.put(records, o)
		update(membership.Sorted(records))
	}
	select {
	case err := <-applyErr:
		return err
	default:
	}
	if wctx.Err() != nil && ctx.Err() == nil {
		return nil // resync: relist at once
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("watch PSPNodes: %w", err)
	}
	return errors.New("watch PSPNodes: the server ended it")
}

// put records o, or forgets it if it is not a valid record.
func (s *Source) put(records map[string]membership.Record, o object) {
	r, err := o.record()
	if err != nil {
		delete(records, o.Metadata.Name)
		s.log.Warn("kubernetes: PSPNode ignored", "name", o.Metadata.Name, "err", err)
		return
	}
	records[o.Metadata.Name] = r
}

func (s *Source) request(ctx context.Context, method, suffix, contentType string, body []byte) (*http.Request, error) {
	tok, err := os.ReadFile(s.cfg.TokenFile)
	if err != nil {
		return nil, fmt.Errorf("token: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, method, s.base+suffix, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
	req.Header.Set("Accept", "application/json")
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	return req, nil
}

// do sends one request with a timeout and returns the body of a 2xx
// answer; any other answer is an error with the API's message.
func (s *Source) do(ctx context.Context, method, suffix, contentType string, body []byte) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	req, err := s.request(ctx, method, suffix, contentType, body)
	if err != nil {
		return nil, err
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return nil, apiError(resp)
	}
	return io.ReadAll(io.LimitReader(resp.Body, 64<<20))
}

// apiError is the API's Status message for a failed request.
func apiError(resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var st struct {
		Message string `json:"message"`
	}
	if json.Unmarshal(b, &st) == nil && st.Message != "" {
		return fmt.Errorf("%s: %s", resp.Status, st.Message)
	}
	return fmt.Errorf("%s: %s", resp.Status, bytes.TrimSpace(b))
}
