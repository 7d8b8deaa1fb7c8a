package policy

import (
	"bytes"
	"errors"
	"fmt"
	"math/bits"
	"net"
	"net/netip"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"go.yaml.in/yaml/v3"

	"github.com/pspd/pspd/keyexchange/identity"
	"github.com/pspd/pspd/keyexchange/kdf"
)

// FieldError locates a problem in the configuration file.
type FieldError struct {
	File  string
	Line  int
	Field string // dotted path, e.g. peers[1].public_key
	Err   error
}

func (e *FieldError) Error() string {
	where := e.File
	if e.Line > 0 {
		where = fmt.Sprintf("%s:%d", e.File, e.Line)
	}
	if e.Field == "" {
		return fmt.Sprintf("%s: %v", where, e.Err)
	}
	// An error of package identity about field identity says
	// "identity: " once, not twice.
	msg := strings.TrimPrefix(e.Err.Error(), e.Field+": ")
	return fmt.Sprintf("%s: %s: %s", where, e.Field, msg)
}

func (e *FieldError) Unwrap() error { return e.Err }

type parser struct {
	file    string
	lines   map[string]int // field path → line of its key (of the entry, in lists)
	maxLine int
	resolve Resolver // nil: host-name endpoints are refused
}

func (p parser) fail(n *yaml.Node, field, format string, args ...any) error {
	line := 1
	if n != nil {
		// yaml.v3 places a node it made up for a missing value (an empty
		// document, a key without a value at the end) after the input.
		line = max(min(n.Line, p.maxLine), 1)
	}
	return &FieldError{File: p.file, Line: line, Field: field, Err: fmt.Errorf(format, args...)}
}

// failAt reports a check across fields at the line of field, the one at
// fault, or at line 1 when the file left it to its default.
func (p parser) failAt(field, format string, args ...any) error {
	line := p.lines[field]
	if line == 0 {
		line = 1
	}
	return &FieldError{File: p.file, Line: line, Field: field, Err: fmt.Errorf(format, args...)}
}

// where describes field for a message about another one: its line, or
// that the file leaves it to its default.
func (p parser) where(field string) string {
	if l := p.lines[field]; l != 0 {
		return fmt.Sprintf("(line %d)", l)
	}
	return "(the default)"
}

// fields walks a mapping node, refusing duplicate and unknown keys; set is
// called for each key in file order.
func (p parser) fields(n *yaml.Node, path string, known []string, set func(key string, v *yaml.Node) error) error {
	if n.Kind != yaml.MappingNode {
		return p.fail(n, strings.TrimSuffix(path, "."), "expected a mapping of fields")
	}
	seen := map[string]bool{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		field := path + k.Value
		if seen[k.Value] {
			return p.fail(k, field, "set twice")
		}
		seen[k.Value] = true
		p.lines[field] = k.Line
		if !contains(known, k.Value) {
			return p.fail(k, field, "unknown field (known: %s)", strings.Join(known, ", "))
		}
		if err := set(k.Value, v); err != nil {
			return err
		}
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func (p parser) str(n *yaml.Node, field string) (string, error) {
	if n.Kind != yaml.ScalarNode || n.Tag == "!!null" {
		return "", p.fail(n, field, "expected a string")
	}
	if n.Value == "" {
		return "", p.fail(n, field, "must not be empty")
	}
	return n.Value, nil
}

// publicKey is a pspd pubkey line.
func (p parser) publicKey(n *yaml.Node, field string) (identity.PublicKey, error) {
	s, err := p.str(n, field)
	if err != nil {
		return identity.PublicKey{}, err
	}
	k, err := identity.ParsePublicKey(s)
	if err != nil {
		return identity.PublicKey{}, p.fail(n, field, "%v", err)
	}
	return k, nil
}

func (p parser) duration(n *yaml.Node, field string, lo, hi time.Duration) (time.Duration, error) {
	s, err := p.str(n, field)
	if err != nil {
		return 0, err
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		if durationSyntax.MatchString(s) {
			// Well formed but beyond what a time.Duration holds.
			return 0, p.fail(n, field, "%q is outside %s..%s", s, fmtDuration(lo), fmtDuration(hi))
		}
		return 0, p.fail(n, field, "%q is not a duration in %s..%s (like 90s, 10m or 24h)", s, fmtDuration(lo), fmtDuration(hi))
	}
	if d < lo || d > hi {
		return 0, p.fail(n, field, "%s is outside %s..%s", fmtDuration(d), fmtDuration(lo), fmtDuration(hi))
	}
	return d, nil
}

// durationSyntax is what time.ParseDuration takes, whatever the size.
var durationSyntax = regexp.MustCompile(`^[-+]?(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h))+$`)

// fmtDuration is d as an operator writes it: 24h, not 24h0m0s.
func fmtDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = s[:len(s)-2]
	}
	if strings.HasSuffix(s, "h0m") {
		s = s[:len(s)-2]
	}
	return s
}

// fmtCount is v, and its power of two when it is one: limits are chosen
// as powers of two and read better that way.
func fmtCount(v uint64) string {
	if v >= 1<<20 && v&(v-1) == 0 {
		return fmt.Sprintf("%d (2^%d)", v, bits.TrailingZeros64(v))
	}
	return strconv.FormatUint(v, 10)
}

// uint parses an integer in lo..hi. A number YAML reads as a float
// (1e30, 4096.5, or an integer too large for 64 bits) or as a negative
// integer is refused with the range, never converted: a conversion could
// wrap into an accepted value.
func (p parser) uint(n *yaml.Node, field string, lo, hi uint64) (uint64, error) {
	rng := fmtCount(lo) + ".." + fmtCount(hi)
	if n.Kind == yaml.ScalarNode && n.Tag == "!!float" {
		if f, err := strconv.ParseFloat(strings.ReplaceAll(n.Value, "_", ""), 64); err == nil && (f < float64(lo) || f > float64(hi)) {
			return 0, p.fail(n, field, "%s is outside %s", n.Value, rng)
		}
		return 0, p.fail(n, field, "%s is not an integer; want an integer in %s", n.Value, rng)
	}
	if n.Kind != yaml.ScalarNode || n.Tag != "!!int" {
		return 0, p.fail(n, field, "expected an integer in %s, got %q", rng, n.Value)
	}
	s := strings.ReplaceAll(n.Value, "_", "")
	if d := strings.TrimLeft(s, "+"); len(d) > 1 && d[0] == '0' && d[1] >= '0' && d[1] <= '9' {
		// yaml.v3 reads 0100 as octal 64, YAML 1.2 as decimal 100.
		digits := strings.TrimLeft(d, "0")
		if digits == "" {
			digits = "0"
		}
		return 0, p.fail(n, field, "%s has a leading zero, which YAML may read as octal; write %s or 0o%s", n.Value, digits, digits)
	}
	if strings.HasPrefix(s, "-") {
		return 0, p.fail(n, field, "%s is outside %s", n.Value, rng)
	}
	v, err := strconv.ParseUint(strings.TrimPrefix(s, "+"), 0, 64)
	if errors.Is(err, strconv.ErrRange) || err == nil && (v < lo || v > hi) {
		return 0, p.fail(n, field, "%s is outside %s", n.Value, rng)
	}
	if err != nil {
		return 0, p.fail(n, field, "%q is not an integer; want an integer in %s", n.Value, rng)
	}
	return v, nil
}

func (p parser) boolean(n *yaml.Node, field string) (bool, error) {
	if n.Kind != yaml.ScalarNode || n.Tag != "!!bool" {
		return false, p.fail(n, field, "expected true or false")
	}
	return n.Value == "true", nil
}

// addrPort parses an IP address with an optional port (defaultPort when
// it is left out; required when defaultPort is 0).
func (p parser) addrPort(n *yaml.Node, field string, defaultPort uint16) (netip.AddrPort, error) {
	s, err := p.str(n, field)
	if err != nil {
		return netip.AddrPort{}, err
	}
	if host, port, err := net.SplitHostPort(s); err == nil {
		a, aerr := netip.ParseAddr(host)
		if aerr != nil {
			return netip.AddrPort{}, p.fail(n, field, "%q is not an IP address with optional :port (host names are not resolved)", s)
		}
		v, err := strconv.ParseUint(port, 10, 16)
		if err != nil && !errors.Is(err, strconv.ErrRange) {
			return netip.AddrPort{}, p.fail(n, field, "port %q in %q is not a number in 1..65535", port, s)
		}
		if err != nil || v == 0 {
			return netip.AddrPort{}, p.fail(n, field, "port %s is outside 1..65535", port)
		}
		return netip.AddrPortFrom(a, uint16(v)), nil
	}
	bare := strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")
	if a, err := netip.ParseAddr(bare); err == nil {
		if defaultPort == 0 {
			return netip.AddrPort{}, p.fail(n, field, "%q has no port; want address:port", s)
		}
		return netip.AddrPortFrom(a, defaultPort), nil
	}
	return netip.AddrPort{}, p.fail(n, field, "%q is not an IP address with optional :port (host names are not resolved)", s)
}

// Parse validates data, read from file, into a Config. It resolves no
// host names: an endpoint given by name is an error (ParseResolve and
// Load resolve them).
func Parse(file string, data []byte) (*Config, error) {
	return parse(parser{file: file, lines: map[string]int{}, maxLine: maxLine(data)}, data)
}

func parse(p parser, data []byte) (*Config, error) {
	file := p.file
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, syntaxError(file, data, err)
	}
	if len(doc.Content) == 0 {
		return nil, p.fail(nil, "", "empty configuration: at least identity must be set")
	}
	root := doc.Content[0]
	c := &Config{
		File:              file,
		lines:             p.lines,
		Listen:            netip.AddrPortFrom(netip.IPv6Unspecified(), DefaultListenPort),
		Socket:            DefaultSocket,
		Metrics:           DefaultMetrics,
		Backend:           BackendAuto,
		Offload:           OffloadAuto,
		NATTraversal:      NATAuto,
		EncapPort:         DefaultEncapPort,
		NATKeepalive:      DefaultNATKeepalive,
		Suite:             DefaultSuite,
		RekeyInterval:     DefaultRekeyInterval,
		PacketBudget:      DefaultPacketBudget,
		PSPRotation:       DefaultPSPRotation,
		ResolveInterval:   DefaultResolveInterval,
		RequireEncryption: true,
		KeyExchange:       KeyExchangeHybrid,
		Userspace: Userspace{
			Interface: DefaultInterface,
			Port:      DefaultDataPort,
			Framing:   FramingGeneve,
			IO:        IOAuto,
		},
	}
	var peersNode, discoveryNode *yaml.Node
	known := []string{"identity", "listen", "socket", "metrics", "backend", "offload", "nat_traversal", "encap_port", "nat_keepalive", "suite",
		"rekey_interval", "packet_budget", "psp_rotation_interval", "resolve_interval", "require_encryption", "key_exchange", "userspace", "discovery", "peers"}
	err := p.fields(root, "", known, func(k string, v *yaml.Node) (err error) {
		switch k {
		case "identity":
			c.Identity, err = p.str(v, k)
		case "listen":
			c.Listen, err = p.addrPort(v, k, DefaultListenPort)
		case "socket":
			c.Socket, err = p.str(v, k)
			if err == nil && !strings.HasPrefix(c.Socket, "/") {
				err = p.fail(v, k, "%q must be an absolute path", c.Socket)
			}
		case "metrics":
			if v.Tag == "!!null" || v.Value == "" || v.Value == "off" {
				c.Metrics = ""
				return nil
			}
			if path, ok := strings.CutPrefix(v.Value, "unix:"); ok {
				if !filepath.IsAbs(path) {
					return p.fail(v, k, "%q: the unix socket path must be absolute (unix:/run/pspd/metrics.sock)", v.Value)
				}
				c.Metrics = v.Value
				return nil
			}
			var ap netip.AddrPort
			ap, err = p.addrPort(v, k, 0)
			c.Metrics = ap.String()
		case "backend":
			err = p.enum(v, k, func(s string) (e error) { c.Backend, e = ParseBackend(s); return })
		case "offload":
			err = p.enum(v, k, func(s string) (e error) { c.Offload, e = parseOffload(s); return })
		case "nat_traversal":
			err = p.enum(v, k, func(s string) (e error) { c.NATTraversal, e = parseNATTraversal(s); return })
		case "encap_port":
			var port uint64
			port, err = p.uint(v, k, 1, 65535)
			c.EncapPort = uint16(port)
		case "nat_keepalive":
			c.NATKeepalive, err = p.duration(v, k, minNATKeepalive, maxNATKeepalive)
		case "suite":
			err = p.enum(v, k, func(s string) (e error) { c.Suite, e = kdf.ParseSuite(s); return })
		case "discovery":
			discoveryNode = v
		case "rekey_interval":
			c.RekeyInterval, err = p.duration(v, k, minRekeyInterval, maxRekeyInterval)
		case "packet_budget":
			c.PacketBudget, err = p.uint(v, k, minPacketBudget, maxPacketBudget)
		case "psp_rotation_interval":
			c.PSPRotation, err = p.duration(v, k, minPSPRotation, maxPSPRotation)
		case "resolve_interval":
			c.ResolveInterval, err = p.duration(v, k, minResolveInterval, maxResolveInterval)
		case "require_encryption":
			c.RequireEncryption, err = p.boolean(v, k)
		case "key_exchange":
			err = p.enum(v, k, func(s string) (e error) { c.KeyExchange, e = parseKeyExchange(s); return })
		case "userspace":
			err = p.userspace(&c.Userspace, v)
		case "peers":
			peersNode = v
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	if c.Identity == "" {
		return nil, p.fail(root, "identity", "required: the path of this host's key (create it with `pspd genkey`)")
	}
	if c.PSPRotation <= c.RekeyInterval {
		// An association survives exactly one device-key rotation, so every
		// association must be replaced well within one rotation period.
		// The field at fault is the one the file sets.
		if p.lines["psp_rotation_interval"] != 0 {
			return nil, p.failAt("psp_rotation_interval", "%s must be longer than rekey_interval %s %s: an association must be replaced within one device-key rotation",
				fmtDuration(c.PSPRotation), fmtDuration(c.RekeyInterval), p.where("rekey_interval"))
		}
		return nil, p.failAt("rekey_interval", "%s must be shorter than psp_rotation_interval %s %s: an association must be replaced within one device-key rotation",
			fmtDuration(c.RekeyInterval), fmtDuration(c.PSPRotation), p.where("psp_rotation_interval"))
	}
	if peersNode != nil {
		if err := p.peers(c, peersNode); err != nil {
			return nil, err
		}
	}
	if discoveryNode != nil {
		if err := p.discovery(c, discoveryNode); err != nil {
			return nil, err
		}
	}
	if err := p.ports(c); err != nil {
		return nil, err
	}
	return c, nil
}

// ports refuses a userspace data port equal to the control port: both
// are UDP on the listen address, so the second socket could not bind (and
// AF_XDP would steer the control packets to the data plane).
func (p parser) ports(c *Config) error {
	if c.Userspace.Port != c.Listen.Port() || !c.mayUseUserspace() {
		return nil
	}
	if p.lines["userspace.port"] != 0 {
		return p.failAt("userspace.port", "%d is also the port of listen %s; the userspace data plane and the QUIC control socket need different UDP ports", c.Userspace.Port, p.where("listen"))
	}
	return p.failAt("listen", "port %d is also the port of userspace.port %s; the QUIC control socket and the userspace data plane need different UDP ports", c.Listen.Port(), p.where("userspace.port"))
}

// mayUseUserspace reports whether any peer can end up on the userspace
// data plane.
func (c *Config) mayUseUserspace() bool {
	switch c.Backend {
	case BackendAuto, BackendUserspace:
		if len(c.Peers) == 0 {
			return true
		}
	}
	for _, p := range c.Peers {
		switch p.Backend.OrDefault(c.Backend) {
		case BackendAuto, BackendUserspace:
			return true
		}
	}
	return false
}

var (
	yamlLine      = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)
	unknownAnchor = regexp.MustCompile(`^unknown anchor '(.*)' referenced$`)
)

// yamlParserProblems are the problems yaml.v3's parser (not its scanner)
// reports. It numbers their lines from 0: "line 1" is the second line.
var yamlParserProblems = []string{
	"did not find expected ',' or ']'",
	"did not find expected ',' or '}'",
	"did not find expected '-' indicator",
	"did not find expected <document start>",
	"did not find expected <stream-start>",
	"did not find expected key",
	"did not find expected node content",
	"found duplicate %TAG directive",
	"found duplicate %YAML directive",
	"found incompatible YAML document",
	"found undefined tag handle",
}

// syntaxError turns a YAML syntax error into a FieldError at the line of
// the problem, so that it reads like every other configuration error.
// Errors yaml.v3 reports without a line (bad UTF-8, control characters,
// unknown anchors) are located here.
func syntaxError(file string, data []byte, err error) error {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	line := 0
	if m := yamlLine.FindStringSubmatch(err.Error()); m != nil {
		line, _ = strconv.Atoi(m[1])
		msg = m[2]
		if slices.Contains(yamlParserProblems, msg) {
			line++
		}
	} else if m := unknownAnchor.FindStringSubmatch(msg); m != nil {
		if i := bytes.Index(data, []byte("*"+m[1])); i >= 0 {
			line = 1 + bytes.Count(data[:i], []byte("\n"))
		}
	} else if i := badChar(data); i >= 0 {
		line = 1 + bytes.Count(data[:i], []byte("\n"))
	}
	// The off-by-one is not uniform (a problem at the end of the input is
	// counted from 1): never point past the last line.
	line = min(line, maxLine(data))
	return &FieldError{File: file, Line: max(line, 1), Err: fmt.Errorf("YAML syntax: %s", msg)}
}

// maxLine bounds the number of lines YAML sees in data: it also breaks
// lines at CR, NEL and the Unicode line and paragraph separators.
func maxLine(data []byte) int {
	n := 1
	for _, sep := range []string{"\n", "\r", "\u0085", "\u2028", "\u2029"} {
		n += bytes.Count(data, []byte(sep))
	}
	return n
}

// badChar is the offset of the first byte YAML's reader refuses: invalid
// UTF-8 or a character outside YAML's printable set; -1 if there is none.
func badChar(data []byte) int {
	for i := 0; i < len(data); {
		r, n := utf8.DecodeRune(data[i:])
		ok := r != utf8.RuneError || n > 1
		switch {
		case r == '\t' || r == '\n' || r == '\r' || r == 0x85:
		case r < 0x20 || r == 0x7f || r >= 0x80 && r < 0xa0 || r == 0xfffe || r == 0xffff:
			ok = false
		}
		if !ok {
			return i
		}
		i += n
	}
	return -1
}

func (p parser) enum(n *yaml.Node, field string, set func(string) error) error {
	s, err := p.str(n, field)
	if err != nil {
		return err
	}
	if err := set(s); err != nil {
		var fe *FieldError
		if errors.As(err, &fe) {
			return err
		}
		return p.fail(n, field, "%v", err)
	}
	return nil
}

func (p parser) peers(c *Config, n *yaml.Node) error {
	if n.Kind != yaml.SequenceNode {
		return p.fail(n, "peers", "expected a list of peers")
	}
	if len(n.Content) > maxPeers {
		return p.fail(n, "peers", "%d peers is more than the limit of %d", len(n.Content), maxPeers)
	}
	// Prefix nodes per peer, for the underlay checks that need every
	// peer's endpoint.
	prefixNodes := make([][]*yaml.Node, len(n.Content))
	for i, pn := range n.Content {
		path := fmt.Sprintf("peers[%d].", i)
		p.lines[path[:len(path)-1]] = pn.Line
		pr := Peer{Backend: BackendAuto, Suite: c.Suite}
		var keyNode, nextKeyNode, nameNode, endpointNode *yaml.Node
		known := []string{"name", "endpoint", "public_key", "next_public_key", "prefixes", "backend", "suite", "nat_traversal"}
		err := p.fields(pn, path, known, func(k string, v *yaml.Node) (err error) {
			f := path + k
			switch k {
			case "name":
				nameNode = v
				pr.Name, err = p.str(v, f)
				if err == nil && !peerName.MatchString(pr.Name) {
					err = p.fail(v, f, "%s", badName(pr.Name))
				}
			case "endpoint":
				endpointNode = v
				pr.Endpoint, pr.EndpointName, err = p.endpoint(v, f, c.Listen)
			case "public_key":
				keyNode = v
				pr.PublicKey, err = p.publicKey(v, f)
			case "next_public_key":
				nextKeyNode = v
				pr.NextKey, err = p.publicKey(v, f)
			case "prefixes":
				pr.Prefixes, err = p.prefixes(v, f)
				if err == nil {
					prefixNodes[i] = v.Content
				}
			case "backend":
				err = p.enum(v, f, func(s string) (e error) { pr.Backend, e = ParseBackend(s); return })
			case "suite":
				err = p.enum(v, f, func(s string) (e error) { pr.Suite, e = kdf.ParseSuite(s); return })
			case "nat_traversal":
				err = p.enum(v, f, func(s string) (e error) { pr.NATTraversal, e = parseNATTraversal(s); return })
			}
			return err
		})
		if err != nil {
			return err
		}
		for _, req := range []struct {
			name  string
			unset bool
		}{{"name", pr.Name == ""}, {"endpoint", !pr.Endpoint.IsValid()}, {"public_key", pr.PublicKey.IsZero()}} {
			if req.unset {
				return p.fail(pn, path+req.name, "required")
			}
		}
		if err := c.admit(c.Peers, pr); err != nil {
			k, at := i, (*yaml.Node)(nil)
			switch {
			case err.Peer != pr.Name: // an accepted peer's prefix holds pr's endpoint
				k = slices.IndexFunc(c.Peers, func(o Peer) bool { return o.Name == err.Peer })
				at = prefixNode(prefixNodes[k], err.Field)
			case err.Field == "name":
				at = nameNode
			case err.Field == "public_key":
				at = keyNode
			case err.Field == "next_public_key":
				at = nextKeyNode
			case err.Field == "endpoint":
				at = endpointNode
			default:
				at = prefixNode(prefixNodes[i], err.Field)
			}
			return p.fail(at, fmt.Sprintf("peers[%d].%s", k, err.Field), "%v", err.Err)
		}
		c.Peers = append(c.Peers, pr)
	}
	return nil
}

// prefixNode is the node of field "prefixes[j]" among a peer's prefix
// nodes, or nil (line 1) for another field.
func prefixNode(nodes []*yaml.Node, field string) *yaml.Node {
	var j int
	if _, err := fmt.Sscanf(field, "prefixes[%d]", &j); err != nil || j < 0 || j >= len(nodes) {
		return nil
	}
	return nodes[j]
}

// underlay is a as the kernel routes it: without a zone, and an
// IPv4-mapped address as IPv4.
func underlay(a netip.Addr) netip.Addr { return a.WithZone("").Unmap() }

func containsAddr(pf netip.Prefix, a netip.Addr) bool {
	return pf.Contains(underlay(a)) || pf.Contains(a.WithZone(""))
}

func (p parser) prefixes(n *yaml.Node, field string) ([]netip.Prefix, error) {
	if n.Kind != yaml.SequenceNode {
		return nil, p.fail(n, field, "expected a list of prefixes like 10.0.0.0/24")
	}
	if len(n.Content) > maxPrefixesPerPeer {
		return nil, p.fail(n, field, "%d prefixes is more than the limit of %d", len(n.Content), maxPrefixesPerPeer)
	}
	var out []netip.Prefix
	for i, e := range n.Content {
		f := fmt.Sprintf("%s[%d]", field, i)
		p.lines[f] = e.Line
		s, err := p.str(e, f)
		if err != nil {
			return nil, err
		}
		pf, err := ParsePrefix(s)
		if err != nil {
			return nil, p.fail(e, f, "%v", err)
		}
		out = append(out, pf)
	}
	return out, nil
}

var ifName = regexp.MustCompile(`^[a-zA-Z0-9_.-]{1,15}$`)

func (p parser) userspace(u *Userspace, n *yaml.Node) error {
	known := []string{"interface", "address", "port", "framing", "io"}
	return p.fields(n, "userspace.", known, func(k string, v *yaml.Node) (err error) {
		f := "userspace." + k
		switch k {
		case "interface":
			u.Interface, err = p.str(v, f)
			if err == nil && !ifName.MatchString(u.Interface) {
				err = p.fail(v, f, "%q is not a Linux interface name (1-15 of letters, digits, '_', '.', '-')", u.Interface)
			}
		case "address":
			var s string
			if s, err = p.str(v, f); err == nil {
				if u.Address, err = netip.ParsePrefix(s); err != nil {
					err = p.fail(v, f, "%q is not an address with prefix length, like 10.200.0.1/24", s)
				}
			}
		case "port":
			var port uint64
			port, err = p.uint(v, f, 1, 65535)
			u.Port = uint16(port)
		case "framing":
			err = p.enum(v, f, func(s string) error {
				switch Framing(s) {
				case FramingGeneve, FramingPSP:
					u.Framing = Framing(s)
					return nil
				}
				return fmt.Errorf("%q is not one of geneve, psp", s)
			})
		case "io":
			err = p.enum(v, f, func(s string) error {
				switch IO(s) {
				case IOAuto, IOAFXDP, IOUDP:
					u.IO = IO(s)
					return nil
				}
				return fmt.Errorf("%q is not one of auto, af_xdp, udp", s)
			})
		}
		return err
	})
}
