// SPDX-License-Identifier: MIT
//
// libpspd-preload.so: kernel PSP for unmodified, dynamically linked
// programs. Loaded with LD_PRELOAD, it wraps connect(), accept() and
// accept4(): once a TCP connection the configuration selects is
// established, and before the program can send a byte on it, the library
// hands the socket to the pspd of this host over the local API's fd-passing
// upgrade (POST /v1/psp/upgrade, Upgrade: pspd-fd/1, one byte carrying the
// descriptor in SCM_RIGHTS, one JSON line back). pspd picks the peer by the
// connection's remote address (peer=auto), exchanges keys with that peer's
// pspd and binds PSP to the socket; no key ever passes through the program.
// Both ends must upgrade: the program at the other end runs under the
// library too, or upgrades itself through pspd's client.
//
// Environment (read once, at the first hooked call):
//
//   PSPD_PRELOAD_SOCKET   pspd's API socket (default /run/pspd/pspd.sock).
//   PSPD_PRELOAD_PEER     the peer to name (default "auto": pspd chooses the
//                         configured peer whose endpoint or prefixes hold
//                         the remote address, and refuses ambiguity).
//   PSPD_PRELOAD_CONNECT  which outgoing connections to upgrade, by remote
//                         address and port; PSPD_PRELOAD_ACCEPT: which
//                         accepted ones, by remote address and local port.
//                         A list separated by commas or spaces of
//                         ADDR[/LEN][:PORT[-PORT]], [V6ADDR[/LEN]]:PORT...,
//                         :PORT or "*"; "none" hooks nothing. Unset: every
//                         TCP connection. Loopback addresses are never
//                         upgraded (there is no PSP device on lo).
//   PSPD_PRELOAD_NONPEER  "refuse" (default) or "clear": what to do with a
//                         selected connection whose remote address belongs
//                         to no peer of pspd. "clear" leaves it alone, so
//                         pspd's peer prefixes alone decide.
//   PSPD_PRELOAD_FAIL     "closed" (default) or "open": what to do when
//                         pspd cannot be reached or refuses the upgrade.
//   PSPD_PRELOAD_TIMEOUT  seconds to wait for connect and the upgrade
//                         (default 30).
//   PSPD_PRELOAD_DEBUG    1: also log each upgrade to stderr.
//
// Failing closed: connect() returns -1 with errno ECONNREFUSED and
// accept()/accept4() return -1 with errno ECONNABORTED (the connection was
// taken off the queue and reset; servers retry accept on it). The socket of
// a refused connect is shut down in both directions (reads see EOF, writes
// EPIPE): a connection that may already expect PSP must not carry clear
// text. Each failure is logged to stderr with pspd's reason. Failing open
// logs the same and returns the connection as the kernel made it, in the
// clear.
//
// Statically linked programs (Go's by default) do not go through libc's
// connect and are not served: they use pspd's Go client (localapi/client).

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/pspd/pspd.sock"
#define MAX_RULES 64
#define PEER_MAX 128

struct rule {
	int family; // 0: any address
	uint8_t addr[16];
	int bits;
	uint16_t lo, hi; // port range; 0-65535 for any
};

struct rules {
	bool none;
	int n;
	struct rule r[MAX_RULES];
};

static struct {
	char socket[sizeof(((struct sockaddr_un *)0)->sun_path)];
	char peer[PEER_MAX];
	struct rules connect, accept;
	bool fail_open, nonpeer_clear, debug;
	int timeout_ms;
	const char *invalid; // a configuration error: every selected call fails closed
} cfg;

static int (*real_connect)(int, const struct sockaddr *, socklen_t);
static int (*real_accept)(int, struct sockaddr *, socklen_t *);
static int (*real_accept4)(int, struct sockaddr *, socklen_t *, int);
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void logf_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

// logf_ writes one line to stderr with a single write, so lines of
// concurrent threads do not interleave.
static void logf_(const char *fmt, ...)
{
	char line[1024];
	int n = snprintf(line, sizeof line, "pspd-preload[%d]: ", (int)getpid());
	va_list ap;
	va_start(ap, fmt);
	int m = vsnprintf(line + n, sizeof line - n - 1, fmt, ap);
	va_end(ap);
	if (m < 0)
		return;
	n += m;
	if (n > (int)sizeof line - 2)
		n = sizeof line - 2;
	line[n++] = '\n';
	int saved = errno;
	ssize_t w = write(2, line, n);
	(void)w;
	errno = saved;
}

static bool parse_port_range(const char *s, const char *end, struct rule *r)
{
	char *e;
	if (s == end)
		return false;
	unsigned long lo = strtoul(s, &e, 10), hi = lo;
	if (e == s || lo > 65535)
		return false;
	if (e < end && *e == '-') {
		const char *h = e + 1;
		hi = strtoul(h, &e, 10);
		if (e == h || hi > 65535 || hi < lo)
			return false;
	}
	if (e != end)
		return false;
	r->lo = lo, r->hi = hi;
	return true;
}

static bool parse_prefix(const char *s, size_t len, struct rule *r)
{
	char buf[INET6_ADDRSTRLEN + 8];
	if (len == 0 || len >= sizeof buf)
		return false;
	memcpy(buf, s, len);
	buf[len] = 0;
	char *slash = strchr(buf, '/');
	if (slash)
		*slash = 0;
	if (inet_pton(AF_INET, buf, r->addr) == 1)
		r->family = AF_INET, r->bits = 32;
	else if (inet_pton(AF_INET6, buf, r->addr) == 1)
		r->family = AF_INET6, r->bits = 128;
	else
		return false;
	if (slash) {
		char *e;
		long b = strtol(slash + 1, &e, 10);
		if (e == slash + 1 || *e || b < 0 || b > r->bits)
			return false;
		r->bits = b;
	}
	return true;
}

// parse_item reads one rule: *, :PORTS, ADDR[/LEN][:PORTS] or
// [V6ADDR[/LEN]][:PORTS].
static bool parse_item(const char *s, size_t len, struct rule *r)
{
	const char *end = s + len, *ports = NULL;
	memset(r, 0, sizeof *r);
	r->lo = 0, r->hi = 65535;
	if (len == 1 && *s == '*')
		return true;
	if (*s == '[') {
		const char *close = memchr(s, ']', len);
		if (!close || !parse_prefix(s + 1, close - s - 1, r) || r->family != AF_INET6)
			return false;
		if (close + 1 == end)
			return true;
		if (close[1] != ':')
			return false;
		return parse_port_range(close + 2, end, r);
	}
	if (*s == ':')
		return parse_port_range(s + 1, end, r);
	if (len > 2 && s[0] == '*' && s[1] == ':')
		return parse_port_range(s + 2, end, r);
	// Only IPv4 takes a port without brackets: an IPv6 address has colons.
	const char *colon = memchr(s, ':', len);
	if (colon && !memchr(colon + 1, ':', end - colon - 1)) {
		ports = colon + 1;
		if (!parse_prefix(s, colon - s, r) || r->family != AF_INET)
			return false;
		return parse_port_range(ports, end, r);
	}
	return parse_prefix(s, len, r);
}

static const char *parse_rules(const char *env, struct rules *out)
{
	const char *v = getenv(env);
	memset(out, 0, sizeof *out);
	if (!v) { // every TCP connection
		out->n = 1;
		out->r[0].lo = 0, out->r[0].hi = 65535;
		return NULL;
	}
	if (!strcmp(v, "none") || !*v) {
		out->none = true;
		return NULL;
	}
	for (const char *p = v; *p;) {
		while (*p == ',' || *p == ' ')
			p++;
		if (!*p)
			break;
		size_t len = strcspn(p, ", ");
		if (out->n == MAX_RULES)
			return "too many rules";
		if (!parse_item(p, len, &out->r[out->n]))
			return "a rule is not ADDR[/LEN][:PORT[-PORT]], [V6ADDR[/LEN]][:PORT[-PORT]], :PORT[-PORT], * or none";
		out->n++;
		p += len;
	}
	return NULL;
}

static void init(void)
{
	real_connect = dlsym(RTLD_NEXT, "connect");
	real_accept = dlsym(RTLD_NEXT, "accept");
	real_accept4 = dlsym(RTLD_NEXT, "accept4");

	const char *s = getenv("PSPD_PRELOAD_SOCKET");
	if (!s || !*s)
		s = DEFAULT_SOCKET;
	if (strlen(s) >= sizeof cfg.socket)
		cfg.invalid = "PSPD_PRELOAD_SOCKET is longer than a unix socket path can be";
	else
		strcpy(cfg.socket, s);
	s = getenv("PSPD_PRELOAD_PEER");
	if (!s || !*s)
		s = "auto";
	if (strlen(s) >= sizeof cfg.peer || strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") != strlen(s))
		cfg.invalid = "PSPD_PRELOAD_PEER is not a peer name (letters, digits, '.', '_', '-')";
	else
		strcpy(cfg.peer, s);

	static char bad[160];
	const char *err;
	if ((err = parse_rules("PSPD_PRELOAD_CONNECT", &cfg.connect)))
		snprintf(bad, sizeof bad, "PSPD_PRELOAD_CONNECT: %s", err), cfg.invalid = bad;
	if ((err = parse_rules("PSPD_PRELOAD_ACCEPT", &cfg.accept)))
		snprintf(bad, sizeof bad, "PSPD_PRELOAD_ACCEPT: %s", err), cfg.invalid = bad;

	s = getenv("PSPD_PRELOAD_FAIL");
	if (s && !strcmp(s, "open"))
		cfg.fail_open = true;
	else if (s && *s && strcmp(s, "closed"))
		cfg.invalid = "PSPD_PRELOAD_FAIL is neither closed nor open";
	s = getenv("PSPD_PRELOAD_NONPEER");
	if (s && !strcmp(s, "clear"))
		cfg.nonpeer_clear = true;
	else if (s && *s && strcmp(s, "refuse"))
		cfg.invalid = "PSPD_PRELOAD_NONPEER is neither refuse nor clear";
	cfg.timeout_ms = 30000;
	if ((s = getenv("PSPD_PRELOAD_TIMEOUT")) && *s) {
		char *e;
		long t = strtol(s, &e, 10);
		if (*e || t <= 0 || t > 3600)
			cfg.invalid = "PSPD_PRELOAD_TIMEOUT is not a number of seconds (1-3600)";
		else
			cfg.timeout_ms = t * 1000;
	}
	s = getenv("PSPD_PRELOAD_DEBUG");
	cfg.debug = s && *s && strcmp(s, "0");
	if (cfg.invalid)
		logf_("%s: every selected TCP connection fails until it is fixed", cfg.invalid);
}

// endpoint is an address and port in the form the rules compare.
struct endpoint {
	int family;
	uint8_t addr[16];
	uint16_t port;
};

static bool to_endpoint(const struct sockaddr *sa, socklen_t len, struct endpoint *e)
{
	memset(e, 0, sizeof *e);
	if (sa->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
		const struct sockaddr_in *in = (const void *)sa;
		e->family = AF_INET;
		memcpy(e->addr, &in->sin_addr, 4);
		e->port = ntohs(in->sin_port);
		return true;
	}
	if (sa->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
		const struct sockaddr_in6 *in6 = (const void *)sa;
		e->port = ntohs(in6->sin6_port);
		if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
			e->family = AF_INET;
			memcpy(e->addr, in6->sin6_addr.s6_addr + 12, 4);
		} else {
			e->family = AF_INET6;
			memcpy(e->addr, &in6->sin6_addr, 16);
		}
		return true;
	}
	return false;
}

static bool is_loopback(const struct endpoint *e)
{
	if (e->family == AF_INET)
		return e->addr[0] == 127;
	return IN6_IS_ADDR_LOOPBACK((const struct in6_addr *)e->addr);
}

static bool prefix_has(const struct rule *r, const uint8_t *a)
{
	int full = r->bits / 8, rest = r->bits % 8;
	if (memcmp(r->addr, a, full))
		return false;
	if (!rest)
		return true;
	uint8_t mask = 0xff << (8 - rest);
	return (r->addr[full] & mask) == (a[full] & mask);
}

// selected: does a rule take the connection to or from addr (remote) on port?
static bool selected(const struct rules *rs, const struct endpoint *remote, uint16_t port)
{
	if (is_loopback(remote))
		return false;
	if (cfg.invalid) // which connections were meant is unknown: all fail
		return true;
	if (rs->none)
		return false;
	for (int i = 0; i < rs->n; i++) {
		const struct rule *r = &rs->r[i];
		if (port < r->lo || port > r->hi)
			continue;
		if (r->family && (r->family != remote->family || !prefix_has(r, remote->addr)))
			continue;
		return true;
	}
	return false;
}

static bool is_tcp(int fd)
{
	int v;
	socklen_t l = sizeof v;
	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &v, &l) || v != SOCK_STREAM)
		return false;
	l = sizeof v;
	return !getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &v, &l) && v == IPPROTO_TCP;
}

static const char *fmt_endpoint(const struct endpoint *e, char *buf, size_t len)
{
	char a[INET6_ADDRSTRLEN];
	inet_ntop(e->family, e->addr, a, sizeof a);
	snprintf(buf, len, e->family == AF_INET6 ? "[%s]:%u" : "%s:%u", a, e->port);
	return buf;
}

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

// wait_fd polls fd for events until the deadline; 1 ready, 0 timed out, -1 error.
static int wait_fd(int fd, short events, long long deadline)
{
	for (;;) {
		long long left = deadline - now_ms();
		if (left <= 0)
			return 0;
		struct pollfd p = {.fd = fd, .events = events};
		int n = poll(&p, 1, left > 1000000 ? 1000000 : (int)left);
		if (n > 0)
			return 1;
		if (n < 0 && errno != EINTR)
			return -1;
	}
}

static bool write_all(int fd, const char *p, size_t n, long long deadline)
{
	while (n > 0) {
		ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN && wait_fd(fd, POLLOUT, deadline) == 1)
			continue;
		if (w <= 0)
			return false;
		p += w, n -= w;
	}
	return true;
}

// read_some reads into buf[*len..cap) once, waiting until the deadline.
static ssize_t read_some(int fd, char *buf, size_t *len, size_t cap, long long deadline)
{
	for (;;) {
		if (*len >= cap)
			return 0;
		ssize_t r = recv(fd, buf + *len, cap - *len, 0);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && errno == EAGAIN) {
			int w = wait_fd(fd, POLLIN, deadline);
			if (w == 1)
				continue;
			errno = w == 0 ? ETIMEDOUT : errno;
			return -1;
		}
		if (r > 0)
			*len += r;
		return r;
	}
}

// json_value finds key in the one-line JSON object at js (pspd's upgrade
// answer, which this library only reads two fields of) and returns where
// its value starts, or NULL.
static const char *json_value(const char *js, const char *key)
{
	char pat[64];
	snprintf(pat, sizeof pat, "\"%s\"", key);
	const char *p = strstr(js, pat);
	if (!p)
		return NULL;
	p += strlen(pat);
	while (*p == ' ' || *p == ':')
		p++;
	return p;
}

// json_string copies the string value of key in the JSON object at js
// into out (escapes other than \" \\ \/ \n \t kept as written).
static bool json_string(const char *js, const char *key, char *out, size_t cap)
{
	const char *p = json_value(js, key);
	if (!p || *p++ != '"')
		return false;
	size_t n = 0;
	for (; *p && *p != '"' && n + 2 < cap; p++) {
		if (*p != '\\' || !p[1]) {
			out[n++] = *p;
			continue;
		}
		switch (*++p) {
		case 'n':
		case 't':
			out[n++] = ' ';
			break;
		case '"':
		case '\\':
		case '/':
			out[n++] = *p;
			break;
		default: // \uXXXX and the like, as written
			out[n++] = '\\';
			out[n++] = *p;
		}
	}
	out[n] = 0;
	return true;
}

static bool json_true(const char *js, const char *key)
{
	const char *p = json_value(js, key);
	return p && !strncmp(p, "true", 4);
}

enum outcome { UPGRADED, NO_PEER, FAILED };

// upgrade hands fd to pspd and reports the outcome; why says, for a
// failure, pspd's reason or what went wrong on the way.
static enum outcome upgrade(int fd, const char *what, char *why, size_t whylen)
{
	long long deadline = now_ms() + cfg.timeout_ms;
	int us = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (us < 0) {
		snprintf(why, whylen, "socket(AF_UNIX): %s", strerror(errno));
		return FAILED;
	}
	struct sockaddr_un sun = {.sun_family = AF_UNIX};
	strcpy(sun.sun_path, cfg.socket);
	enum outcome out = FAILED;
	char buf[4096];
	size_t len = 0;
	if (real_connect(us, (struct sockaddr *)&sun, sizeof sun) < 0) {
		if (errno != EINPROGRESS && errno != EAGAIN) {
			snprintf(why, whylen, "cannot reach pspd at %s: %s (is pspd running? set PSPD_PRELOAD_SOCKET)", cfg.socket, strerror(errno));
			goto out;
		}
		int err = 0;
		socklen_t l = sizeof err;
		if (wait_fd(us, POLLOUT, deadline) != 1 || getsockopt(us, SOL_SOCKET, SO_ERROR, &err, &l) || err) {
			snprintf(why, whylen, "cannot reach pspd at %s: %s", cfg.socket, strerror(err ? err : ETIMEDOUT));
			goto out;
		}
	}
	// The same request as pspd's Go client sends (localapi/client UpgradePSP).
	int n = snprintf(buf, sizeof buf,
			 "POST /v1/psp/upgrade?peer=%s HTTP/1.1\r\nHost: pspd\r\nUpgrade: pspd-fd/1\r\n"
			 "Connection: Upgrade\r\nContent-Length: 0\r\n\r\n",
			 cfg.peer);
	if (!write_all(us, buf, n, deadline)) {
		snprintf(why, whylen, "pspd at %s: send the request: %s", cfg.socket, strerror(errno));
		goto out;
	}
	// pspd sends nothing after "101 Switching Protocols" until it has the
	// descriptor, so reading in chunks cannot take more than the headers.
	char *hdr_end = NULL;
	while (!(hdr_end = memmem(buf, len, "\r\n\r\n", 4))) {
		ssize_t r = read_some(us, buf, &len, sizeof buf - 1, deadline);
		if (r <= 0) {
			snprintf(why, whylen, "pspd at %s: no answer to the upgrade request: %s", cfg.socket, r == 0 ? "connection closed" : strerror(errno));
			goto out;
		}
	}
	buf[len] = 0;
	int status = 0;
	if (sscanf(buf, "HTTP/1.%*d %d", &status) != 1) {
		snprintf(why, whylen, "pspd at %s: not an HTTP answer", cfg.socket);
		goto out;
	}
	if (status != 101) {
		// An error before the socket was passed: the body is {"error": ...}.
		size_t want = sizeof buf;
		char *cl = strcasestr(buf, "\r\nContent-Length:");
		if (cl && cl < hdr_end)
			want = (hdr_end + 4 - buf) + strtoul(cl + 17, NULL, 10);
		size_t off = hdr_end - buf;
		while (len < want && len < sizeof buf - 1 && read_some(us, buf, &len, sizeof buf - 1, deadline) > 0)
			;
		buf[len] = 0;
		hdr_end = buf + off;
		char msg[512] = "";
		json_string(hdr_end, "error", msg, sizeof msg);
		snprintf(why, whylen, "pspd answered %d: %s", status, msg[0] ? msg : "(no reason given)");
		goto out;
	}
	char one = 0;
	struct iovec iov = {.iov_base = &one, .iov_len = 1};
	union {
		char b[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} cm;
	memset(&cm, 0, sizeof cm);
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.b, .msg_controllen = sizeof cm.b};
	struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &fd, sizeof fd);
	ssize_t s;
	while ((s = sendmsg(us, &msg, MSG_NOSIGNAL)) < 0 && errno == EINTR)
		;
	if (s != 1) {
		snprintf(why, whylen, "pspd at %s: pass the socket: %s", cfg.socket, strerror(errno));
		goto out;
	}
	len = 0;
	char *nl;
	while (!(nl = memchr(buf, '\n', len))) {
		ssize_t r = read_some(us, buf, &len, sizeof buf - 1, deadline);
		if (r <= 0) {
			snprintf(why, whylen, "pspd at %s: no answer after the socket was passed: %s", cfg.socket, r == 0 ? "connection closed" : strerror(errno));
			goto out;
		}
	}
	*nl = 0;
	char text[512];
	if (json_string(buf, "error", text, sizeof text)) {
		snprintf(why, whylen, "%s", text);
		out = json_true(buf, "no_peer") ? NO_PEER : FAILED;
		goto out;
	}
	if (cfg.debug) {
		char peer[PEER_MAX] = "", ver[64] = "";
		json_string(buf, "peer", peer, sizeof peer);
		json_string(buf, "version", ver, sizeof ver);
		logf_("%s: upgraded to PSP %s with peer %s", what, ver, peer);
	}
	out = UPGRADED;
out:
	close(us);
	return out;
}

// decide runs the upgrade of a selected connection and says whether the
// program may have it: 0 yes, -1 it fails closed (the caller resets it).
static int decide(int fd, const struct endpoint *remote, const char *verb)
{
	char what[96], ep[64], why[768];
	snprintf(what, sizeof what, "%s %s", verb, fmt_endpoint(remote, ep, sizeof ep));
	if (cfg.invalid) {
		logf_("%s: refused: %s", what, cfg.invalid);
		return -1;
	}
	switch (upgrade(fd, what, why, sizeof why)) {
	case UPGRADED:
		return 0;
	case NO_PEER:
		if (cfg.nonpeer_clear) {
			if (cfg.debug)
				logf_("%s: not a pspd peer, left in the clear (PSPD_PRELOAD_NONPEER=clear)", what);
			return 0;
		}
		break;
	case FAILED:
		break;
	}
	if (cfg.fail_open) {
		logf_("%s: no PSP: %s; the connection stays in the clear (PSPD_PRELOAD_FAIL=open)", what, why);
		return 0;
	}
	logf_("%s: no PSP: %s; the connection is refused (PSPD_PRELOAD_FAIL=closed)", what, why);
	return -1;
}

// reset ends a connection that failed closed: it may already expect PSP,
// so nothing in the clear goes over it, and the peer sees a reset.
static void reset(int fd)
{
	struct linger l = {.l_onoff = 1, .l_linger = 0};
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
	shutdown(fd, SHUT_RDWR);
}

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
	pthread_once(&once, init);
	struct endpoint remote;
	if (!addr || !to_endpoint(addr, len, &remote) || !selected(&cfg.connect, &remote, remote.port) || !is_tcp(fd))
		return real_connect(fd, addr, len);
	int saved = errno;
	if (real_connect(fd, addr, len) < 0) {
		if (errno != EINPROGRESS && errno != EINTR)
			return -1;
		// A non-blocking connect (or one a signal interrupted): the
		// connection must be up before it can be upgraded, and the
		// program must not write before the upgrade, so wait here.
		long long deadline = now_ms() + cfg.timeout_ms;
		int w = wait_fd(fd, POLLOUT, deadline);
		int err = 0;
		socklen_t l = sizeof err;
		if (w != 1) {
			errno = w == 0 ? ETIMEDOUT : errno;
			return -1;
		}
		if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0)
			return -1;
		if (err) {
			errno = err;
			return -1;
		}
	}
	if (decide(fd, &remote, "connect to") < 0) {
		reset(fd);
		errno = ECONNREFUSED;
		return -1;
	}
	errno = saved;
	return 0;
}

static int accepted(int fd)
{
	struct sockaddr_storage ra, la;
	socklen_t rl = sizeof ra, ll = sizeof la;
	struct endpoint remote, local;
	if (fd < 0 || getpeername(fd, (struct sockaddr *)&ra, &rl) || getsockname(fd, (struct sockaddr *)&la, &ll) ||
	    !to_endpoint((struct sockaddr *)&ra, rl, &remote) || !to_endpoint((struct sockaddr *)&la, ll, &local) ||
	    !selected(&cfg.accept, &remote, local.port) || !is_tcp(fd))
		return fd;
	int saved = errno;
	if (decide(fd, &remote, "accept from") < 0) {
		reset(fd);
		close(fd);
		errno = ECONNABORTED;
		return -1;
	}
	errno = saved;
	return fd;
}

int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
	pthread_once(&once, init);
	return accepted(real_accept(fd, addr, len));
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
	pthread_once(&once, init);
	return accepted(real_accept4(fd, addr, len, flags));
}
