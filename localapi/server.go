package localapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Access is what a caller may do.
type Access uint8

const (
	AccessNone    Access = iota
	AccessRead           // root or member of the API group
	AccessUpgrade        // reading, and handing sockets to pspd: root or member of the upgrade group
	AccessWrite          // root
)

// Cred is the kernel's word on who is at the other end of a connection.
type Cred struct {
	PID    int32
	UID    uint32
	GID    uint32
	Groups []uint32 // supplementary groups (SO_PEERGROUPS)
}

// Authorizer decides access from credentials.
type Authorizer struct {
	GroupName string
	GID       uint32 // valid when HasGroup
	HasGroup  bool
	// The upgrade group may, besides reading, hand TCP sockets to pspd
	// for PSP: that binds kernel state (a receive key the socket keeps),
	// so membership of the read group is not enough.
	UpgradeGroupName string
	UpgradeGID       uint32 // valid when HasUpgradeGroup
	HasUpgradeGroup  bool
}

// UpgradeGroupSuffix names the upgrade group after the read group:
// group pspd reads, group pspd-upgrade also upgrades.
const UpgradeGroupSuffix = "-upgrade"

// NewAuthorizer looks up the read group and its upgrade group; a missing
// group leaves what it grants to root alone.
func NewAuthorizer(group string) Authorizer {
	a := Authorizer{GroupName: group, UpgradeGroupName: group + UpgradeGroupSuffix}
	a.GID, a.HasGroup = lookupGroup(a.GroupName)
	a.UpgradeGID, a.HasUpgradeGroup = lookupGroup(a.UpgradeGroupName)
	return a
}

func lookupGroup(name string) (uint32, bool) {
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, false
	}
	gid, err := strconv.ParseUint(g.Gid, 10, 32)
	return uint32(gid), err == nil
}

// Access returns what c may do.
func (a Authorizer) Access(c Cred) Access {
	in := func(gid uint32) bool { return c.GID == gid || contains32(c.Groups, gid) }
	switch {
	case c.UID == 0:
		return AccessWrite
	case a.HasUpgradeGroup && in(a.UpgradeGID):
		return AccessUpgrade
	case a.HasGroup && in(a.GID):
		return AccessRead
	}
	return AccessNone
}

func contains32(s []uint32, v uint32) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// PeerCred reads SO_PEERCRED and SO_PEERGROUPS of a unix connection.
func PeerCred(c *net.UnixConn) (Cred, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return Cred{}, err
	}
	var cred Cred
	var opErr error
	err = rc.Control(func(fd uintptr) {
		uc, err := unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if err != nil {
			opErr = fmt.Errorf("SO_PEERCRED: %w", err)
			return
		}
		cred = Cred{PID: uc.Pid, UID: uc.Uid, GID: uc.Gid}
		groups := make([]uint32, 64)
		for {
			n := uint32(len(groups) * 4)
			_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, unix.SOL_SOCKET, unix.SO_PEERGROUPS,
				uintptr(unsafe.Pointer(&groups[0])), uintptr(unsafe.Pointer(&n)), 0)
			if e == unix.ERANGE && int(n/4) > len(groups) {
				groups = make([]uint32, n/4)
				continue
			}
			if e != 0 {
				opErr = fmt.Errorf("SO_PEERGROUPS: %w", e)
				return
			}
			cred.Groups = groups[:n/4]
			return
		}
	})
	if err != nil {
		return Cred{}, err
	}
	return cred, opErr
}

// Listen creates the API socket at path. A socket file that nobody answers
// on is stale and replaced; one a live process answers on is an error, so
// a second daemon cannot steal the first one's socket. The socket is made
// accessible to root and the read group only.
func Listen(path string, auth Authorizer) (*net.UnixListener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("localapi: create socket directory: %w", err)
	}
	if err := checkDir(dir); err != nil {
		return nil, err
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("localapi: %s exists and is not a socket; remove it or choose another socket path", path)
		}
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
			return nil, fmt.Errorf("localapi: another pspd is already serving %s; stop it first (pspctl status shows it)", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("localapi: remove stale socket %s: %w", path, err)
		}
	}
	// Create the socket with no access for others, then widen to the group:
	// there is no window in which anyone but root can connect.
	old := syscall.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("localapi: listen on %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(true)
	if auth.HasGroup || auth.HasUpgradeGroup {
		// Group access is granted by the API (SO_PEERCRED), per request;
		// the file mode only lets group members connect at all.
		gid := auth.GID
		if !auth.HasGroup {
			gid = auth.UpgradeGID
		}
		if err := chownSocket(path, gid); err != nil {
			ln.Close()
			return nil, err
		}
	}
	return ln, nil
}

// checkDir refuses a socket directory that someone other than root or
// this user could change: they could replace the socket with a link to
// a file that chown and chmod would then hand to the API group.
func checkDir(dir string) error {
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		return fmt.Errorf("localapi: socket directory %s: %w", dir, err)
	}
	uid := uint32(os.Geteuid())
	switch {
	case st.Mode&unix.S_IFMT != unix.S_IFDIR:
		return fmt.Errorf("localapi: socket directory %s is not a directory (a symbolic link?); point socket at a directory owned by root", dir)
	case st.Uid != 0 && st.Uid != uid:
		return fmt.Errorf("localapi: socket directory %s is owned by uid %d; it must belong to root (chown root %s)", dir, st.Uid, dir)
	case st.Mode&0o022 != 0:
		return fmt.Errorf("localapi: socket directory %s is writable by group or others (mode %#o); chmod go-w %s", dir, st.Mode&0o777, dir)
	}
	return nil
}

// chownSocket gives the socket at path to group gid with mode 0660,
// through an O_PATH descriptor of the socket itself, so that nothing put
// in its place (a symbolic link) is followed.
func chownSocket(path string, gid uint32) error {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("localapi: open %s: %w", path, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("localapi: stat %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return fmt.Errorf("localapi: %s was replaced by something that is not pspd's socket", path)
	}
	// chown and chmod cannot take an O_PATH descriptor; its /proc link
	// names the inode itself.
	self := fmt.Sprintf("/proc/self/fd/%d", fd)
	if err := os.Chown(self, 0, int(gid)); err != nil {
		return fmt.Errorf("localapi: chown %s to gid %d: %w", path, gid, err)
	}
	if err := os.Chmod(self, 0o660); err != nil {
		return fmt.Errorf("localapi: chmod %s: %w", path, err)
	}
	return nil
}

type credKey struct{}

// Server serves the API for one Service.
type Server struct {
	svc  Service
	auth Authorizer
	log  *slog.Logger
	mux  *http.ServeMux
}

// NewServer returns a server for svc.
func NewServer(svc Service, auth Authorizer, log *slog.Logger) *Server {
	s := &Server{svc: svc, auth: auth, log: log, mux: http.NewServeMux()}
	s.route("GET /v1/status", AccessRead, read(svc.Status))
	s.route("GET /v1/peers", AccessRead, read(svc.Peers))
	s.route("GET /v1/peers/{name}", AccessRead, s.peer)
	s.route("POST /v1/peers/{name}/ping", AccessRead, s.ping)
	s.route("GET /v1/assocs", AccessRead, read(svc.Assocs))
	s.route("POST /v1/assocs/rotate", AccessWrite, s.rotate)
	s.route("GET /v1/devices", AccessRead, read(svc.Devices))
	s.route("POST /v1/devices/{id}/rotate", AccessWrite, s.rotateDevice)
	s.route("POST /v1/devices/{id}/assoc", AccessWrite, s.assocDevice(svc.AssocDevice))
	s.route("POST /v1/devices/{id}/disassoc", AccessWrite, s.assocDevice(svc.DisassocDevice))
	s.route("GET /v1/events", AccessRead, s.events)
	s.route("POST /v1/reload", AccessWrite, s.reload)
	s.route("POST /v1/psp/upgrade", AccessUpgrade, s.upgrade)
	s.route("GET /v1/identity", AccessRead, read(svc.Identity))
	s.route("POST /v1/identity/{step}", AccessWrite, s.changeIdentity)
	return s
}

// Serve answers on ln until ctx ends.
func (s *Server) Serve(ctx context.Context, ln *net.UnixListener) error {
	hs := &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 5 * time.Second,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			uc, ok := c.(*net.UnixConn)
			if !ok {
				return ctx
			}
			cred, err := PeerCred(uc)
			if err != nil {
				s.log.Warn("local API: cannot read peer credentials", "err", err)
				return ctx
			}
			return context.WithValue(ctx, credKey{}, cred)
		},
		BaseContext: func(net.Listener) context.Context { return ctx },
	}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		hs.Shutdown(sctx)
	}()
	err := hs.Serve(ln)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// ServeHTTP answers what no route takes with a JSON error, as every other
// error answer is.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h, pattern := s.mux.Handler(r)
	if pattern != "" {
		s.mux.ServeHTTP(w, r)
		return
	}
	// The mux knows whether the path exists with other methods: let it
	// answer into a recorder, and keep its status and Allow header.
	rec := &statusRecorder{header: http.Header{}}
	h.ServeHTTP(rec, r)
	switch rec.code {
	case http.StatusMethodNotAllowed:
		allow := rec.header.Get("Allow")
		w.Header().Set("Allow", allow)
		writeError(w, rec.code, fmt.Sprintf("%s does not take %s; it takes %s", r.URL.Path, r.Method, allow))
	case http.StatusNotFound:
		writeError(w, rec.code, fmt.Sprintf("%s is not an endpoint of pspd's API (its endpoints are under /v1/: status, peers, assocs, devices, events, reload)", r.URL.Path))
	default: // a redirect to a cleaned path
		s.mux.ServeHTTP(w, r)
	}
}

// statusRecorder keeps the status and headers of an answer, not its body.
type statusRecorder struct {
	header http.Header
	code   int
}

func (r *statusRecorder) Header() http.Header { return r.header }
func (r *statusRecorder) WriteHeader(code int) {
	if r.code == 0 {
		r.code = code
	}
}
func (r *statusRecorder) Write(b []byte) (int, error) {
	r.WriteHeader(http.StatusOK)
	return len(b), nil
}

func (s *Server) route(pattern string, need Access, h func(http.ResponseWriter, *http.Request) error) {
	s.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		cred, ok := r.Context().Value(credKey{}).(Cred)
		if !ok {
			writeError(w, http.StatusForbidden, "permission denied: peer credentials unavailable")
			return
		}
		if got := s.auth.Access(cred); got < need {
			writeError(w, http.StatusForbidden, s.denied(need))
			return
		}
		if err := h(w, r); err != nil {
			code := http.StatusInternalServerError
			switch {
			case errors.Is(err, ErrNotFound):
				code = http.StatusNotFound
			case errors.Is(err, ErrInvalid):
				code = http.StatusBadRequest
			case errors.Is(err, ErrRefused):
				code = http.StatusConflict
			}
			writeError(w, code, err.Error())
		}
	})
}

func (s *Server) denied(need Access) string {
	switch need {
	case AccessWrite:
		return "permission denied: changing pspd state needs root"
	case AccessUpgrade:
		return fmt.Sprintf("permission denied: handing a connection to pspd for PSP binds kernel state and needs root or membership in group %s", s.auth.UpgradeGroupName)
	}
	if s.auth.HasGroup {
		return fmt.Sprintf("permission denied: reading pspd state needs root or membership in group %s", s.auth.GroupName)
	}
	return fmt.Sprintf("permission denied: reading pspd state needs root (create group %s to grant read access)", s.auth.GroupName)
}

func writeError(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(ErrorBody{Error: msg})
}

func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(v)
}

// read adapts a Service getter to a handler.
func read[T any](get func(context.Context) (T, error)) func(http.ResponseWriter, *http.Request) error {
	return func(w http.ResponseWriter, r *http.Request) error {
		v, err := get(r.Context())
		if err != nil {
			return err
		}
		return writeJSON(w, v)
	}
}

// peer answers one peer of the list by name.
func (s *Server) peer(w http.ResponseWriter, r *http.Request) error {
	ps, err := s.svc.Peers(r.Context())
	if err != nil {
		return err
	}
	name := r.PathValue("name")
	for _, p := range ps {
		if p.Name == name {
			return writeJSON(w, p)
		}
	}
	return fmt.Errorf("no peer named %q is configured (see pspctl peer list): %w", name, ErrNotFound)
}

// ping is open to readers: a diagnosis, bounded by MaxPingCount.
func (s *Server) ping(w http.ResponseWriter, r *http.Request) error {
	var req PingRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4096))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return fmt.Errorf("%w: ping body: %v", ErrInvalid, err)
	}
	if req.Count < 0 || req.Count > MaxPingCount {
		return fmt.Errorf("%w: count %d: want 1 to %d", ErrInvalid, req.Count, MaxPingCount)
	}
	v, err := s.svc.Ping(r.Context(), r.PathValue("name"), req)
	if err != nil {
		return err
	}
	return writeJSON(w, v)
}

func (s *Server) changeIdentity(w http.ResponseWriter, r *http.Request) error {
	step := IdentityStep(r.PathValue("step"))
	switch step {
	case StepRotate, StepSwitch, StepDrop:
	default:
		return fmt.Errorf("unknown identity step %q (rotate, switch or drop): %w", step, ErrInvalid)
	}
	v, err := s.svc.ChangeIdentity(r.Context(), step)
	if err != nil {
		return err
	}
	return writeJSON(w, v)
}

func (s *Server) reload(w http.ResponseWriter, r *http.Request) error {
	v, err := s.svc.ReloadConfig(r.Context())
	if err != nil {
		return err
	}
	return writeJSON(w, v)
}

// decodeRequest reads a small JSON body that must be valid as a whole.
func decodeRequest(w http.ResponseWriter, r *http.Request, what string, req interface{ Validate() error }) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4096))
	dec.DisallowUnknownFields()
	if err := dec.Decode(req); err != nil {
		return fmt.Errorf("%w: %s body: %v", ErrInvalid, what, err)
	}
	if err := req.Validate(); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return nil
}

func (s *Server) rotate(w http.ResponseWriter, r *http.Request) error {
	var req RotateRequest
	if err := decodeRequest(w, r, "rotate", &req); err != nil {
		return err
	}
	v, err := s.svc.Rotate(r.Context(), req)
	if err != nil {
		return err
	}
	return writeJSON(w, v)
}

func deviceID(r *http.Request) (uint32, error) {
	id, err := strconv.ParseUint(r.PathValue("id"), 10, 32)
	if err != nil || id == 0 {
		return 0, fmt.Errorf("%w: device id %q is not a positive number (see pspctl dev list)", ErrInvalid, r.PathValue("id"))
	}
	return uint32(id), nil
}

func (s *Server) rotateDevice(w http.ResponseWriter, r *http.Request) error {
	id, err := deviceID(r)
	if err != nil {
		return err
	}
	v, err := s.svc.RotateDevice(r.Context(), id)
	if err != nil {
		return err
	}
	return writeJSON(w, v)
}

// assocDevice adapts AssocDevice or DisassocDevice to a handler.
func (s *Server) assocDevice(do func(context.Context, uint32, AssocRequest) (Device, error)) func(http.ResponseWriter, *http.Request) error {
	return func(w http.ResponseWriter, r *http.Request) error {
		id, err := deviceID(r)
		if err != nil {
			return err
		}
		var req AssocRequest
		if err := decodeRequest(w, r, "association", &req); err != nil {
			return err
		}
		v, err := do(r.Context(), id, req)
		if err != nil {
			return err
		}
		return writeJSON(w, v)
	}
}

func (s *Server) events(w http.ResponseWriter, r *http.Request) error {
	ch, err := s.svc.Events(r.Context())
	if err != nil {
		return err
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	rc.Flush()
	enc := json.NewEncoder(w)
	for {
		select {
		case <-r.Context().Done():
			return nil
		case ev, ok := <-ch:
			if !ok {
				return nil
			}
			if err := enc.Encode(ev); err != nil {
				return nil // client went away
			}
			rc.Flush()
		}
	}
}

// UpgradeProtocol is the HTTP Upgrade token for passing a socket.
const UpgradeProtocol = "pspd-fd/1"

// UpgradeAutoPeer, as the peer of an upgrade, has the daemon pick the
// configured peer whose endpoint or prefixes hold the connection's remote
// address (the preload library asks this way: it knows no peer names).
const UpgradeAutoPeer = "auto"

// ErrNoPeer: an upgrade with UpgradeAutoPeer found no configured peer for
// the connection's remote address. Its answer says so ("no_peer": true),
// so that a caller told to leave connections to non-peers in the clear
// can tell this refusal from the others.
var ErrNoPeer = errors.New("no configured peer has the connection's remote address")

// upgradeError is the JSON line of a failed upgrade after the socket was
// passed: ErrorBody, and whether the cause is ErrNoPeer.
type upgradeError struct {
	Error  string `json:"error"`
	NoPeer bool   `json:"no_peer,omitempty"`
}

// upgrade switches the connection to fd passing: after "101 Switching
// Protocols" the client sends one byte carrying exactly one descriptor in
// SCM_RIGHTS, and the server answers with one JSON line.
func (s *Server) upgrade(w http.ResponseWriter, r *http.Request) error {
	peer := r.URL.Query().Get("peer")
	if peer == "" {
		return fmt.Errorf("%w: the peer query parameter names the pspd peer the socket is connected to (or is %s)", ErrInvalid, UpgradeAutoPeer)
	}
	if r.Header.Get("Upgrade") != UpgradeProtocol {
		return fmt.Errorf("%w: expected Upgrade: %s", ErrInvalid, UpgradeProtocol)
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return err
	}
	defer conn.Close()
	uc, ok := conn.(*net.UnixConn)
	if !ok || brw.Reader.Buffered() > 0 {
		return nil // not a unix socket, or the client did not wait for 101
	}
	fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: %s\r\nConnection: Upgrade\r\n\r\n", UpgradeProtocol)
	if err := brw.Flush(); err != nil {
		return nil
	}
	reply := func(res any) {
		line, _ := json.Marshal(res)
		brw.Write(append(line, '\n'))
		brw.Flush()
	}
	uc.SetDeadline(time.Now().Add(10 * time.Second))
	f, err := receiveFD(uc)
	if err != nil {
		reply(ErrorBody{Error: err.Error()})
		return nil
	}
	if err := CheckConnectedTCP(f); err != nil {
		f.Close()
		reply(ErrorBody{Error: err.Error()})
		return nil
	}
	uc.SetDeadline(time.Time{})
	res, err := s.svc.UpgradePSP(r.Context(), f, peer)
	if err != nil {
		reply(upgradeError{Error: err.Error(), NoPeer: errors.Is(err, ErrNoPeer)})
		return nil
	}
	reply(res)
	return nil
}

func receiveFD(uc *net.UnixConn) (*os.File, error) {
	buf := make([]byte, 1)
	oob := make([]byte, unix.CmsgSpace(4*4))
	_, oobn, flags, _, err := uc.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, fmt.Errorf("receive socket: %w", err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		return nil, fmt.Errorf("receive socket: %w", err)
	}
	var fds []int
	for _, m := range msgs {
		rights, err := unix.ParseUnixRights(&m)
		if err == nil {
			fds = append(fds, rights...)
		}
	}
	if flags&unix.MSG_CTRUNC != 0 || len(fds) != 1 {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("pass exactly one socket descriptor (got %d)", len(fds))
	}
	return os.NewFile(uintptr(fds[0]), "psp-upgrade"), nil
}

// CheckConnectedTCP refuses anything but a connected TCP socket, with an
// error that says which it is.
func CheckConnectedTCP(f *os.File) error {
	fd := int(f.Fd())
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return fmt.Errorf("the passed descriptor is not a socket: %w", err)
	}
	proto, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if err != nil {
		return fmt.Errorf("the passed socket's protocol: %w", err)
	}
	if typ != unix.SOCK_STREAM || proto != unix.IPPROTO_TCP {
		return errors.New("the passed socket is not a TCP socket; PSP protects TCP connections only")
	}
	if _, err := unix.Getpeername(fd); err != nil {
		return errors.New("the passed TCP socket is not connected; upgrade after connect() or accept()")
	}
	return nil
}
