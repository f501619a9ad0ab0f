/* The front door of an HTTP port: request heads read with a deadline,
 * probes answered here, the rest relayed to civetweb; see gate.h. */
#include "agent/api/gate.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "agent/api/errors.h"
#include "agent/api/socket.h"
#include "common/hex.h"

#define CONN_STACK      (256u << 10)
#define SEND_TIMEOUT_S  60
#define RELAY_BUF       16384
#define CHUNK_LINE_MAX  1024
#define MAX_METHOD      16
#define CONTENT_LEN_MAX (1ull << 53)
#define LINGER_S        1.0
#define LINGER_MAX      (256u << 10)

struct gconn {
	struct lp_gate *g;
	int fd;
	bool relaying; /* has a backend connection: never evicted */
	double since;  /* accepted */
	struct gconn *prev, *next;
};

struct lp_gate {
	struct lp_gate_config cfg;
	lp_gate_local_fn local;
	void *ud;
	struct lp_listener listener;
	int backend_port;
	pthread_mutex_t mu;
	struct gconn *conns; /* every open client connection, newest first */
	int n_conns;
};

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- head parsing ---- */

/* Looks for header name in the header lines after the line that from
 * points into; on a match copies the value and returns the end of its
 * line (to search on from), else NULL. */
static const char *find_header(const char *from, const char *name, char *out, size_t cap)
{
	size_t nl = strlen(name);
	const char *p = strchr(from, '\n');

	while (p && p[1]) {
		const char *line = p + 1, *end = strchr(line, '\n'), *v;
		size_t n;

		if (!end)
			end = line + strlen(line);
		if (!strncasecmp(line, name, nl) && line[nl] == ':') {
			v = line + nl + 1;
			while (v < end && (*v == ' ' || *v == '\t'))
				v++;
			n = (size_t)(end - v);
			while (n && (v[n - 1] == '\r' || v[n - 1] == ' ' || v[n - 1] == '\t'))
				n--;
			if (cap) {
				if (n >= cap)
					n = cap - 1;
				memcpy(out, v, n);
				out[n] = '\0';
			}
			return end;
		}
		p = *end ? end : NULL;
	}
	return NULL;
}

bool lp_gate_header(const struct lp_gate_request *rq, const char *name, char *out, size_t cap)
{
	return find_header(rq->head, name, out, cap) != NULL;
}

/* Offset just past the blank line that ends the head in b[0..n), or 0. */
static size_t head_end(const char *b, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (b[i] != '\n')
			continue;
		if (i + 1 < n && b[i + 1] == '\n')
			return i + 2;
		if (i + 2 < n && b[i + 1] == '\r' && b[i + 2] == '\n')
			return i + 3;
	}
	return 0;
}

/* True when the target, percent-decoded, holds a control character (NUL
 * included): a name cut short at a NUL would name another adapter. */
static bool target_has_control(const char *t)
{
	for (; *t; t++) {
		unsigned char ch = (unsigned char)*t;
		if (ch == '%' && lp_hex_digit(t[1]) >= 0 && lp_hex_digit(t[2]) >= 0)
			ch = (unsigned char)(lp_hex_digit(t[1]) * 16 + lp_hex_digit(t[2]));
		if (ch < 0x20 || ch == 0x7f)
			return true;
	}
	return false;
}

/* What a head asks for, once checked. */
struct head {
	char method[MAX_METHOD + 1];
	char target[LP_GATE_MAX_HEAD + 1];
	char path[LP_GATE_MAX_HEAD + 1]; /* target up to '?' */
	bool http10;
	bool chunked;
	long long content_length; /* -1: none */
	bool close;               /* Connection: close, or HTTP/1.0 without keep-alive */
};

/* A refusal: the status, the error code and a fixed message (the gate
 * never echoes what the client sent). */
struct refusal {
	int status;
	const char *code;
	const char *msg;
};

static bool refuse(struct refusal *r, int status, const char *code, const char *msg)
{
	r->status = status;
	r->code = code;
	r->msg = msg;
	return false;
}

/* Parses the NUL-terminated head h into hd and rq (which points into hd
 * and h). */
static bool parse_head(const char *h, struct head *hd, struct lp_gate_request *rq,
                       struct refusal *r)
{
	const char *sp1, *sp2, *eol, *p;
	char val[64], first[64];
	size_t n;

	hd->content_length = -1;
	hd->chunked = hd->close = hd->http10 = false;
	for (const unsigned char *c = (const unsigned char *)h; *c; c++)
		if ((*c < 0x20 && *c != '\r' && *c != '\n' && *c != '\t') || *c == 0x7f)
			return refuse(r, 400, "invalid_request",
			              "the request head contains a control character");
	eol = strchr(h, '\n');
	sp1 = strchr(h, ' ');
	if (!eol || !sp1 || sp1 > eol)
		return refuse(r, 400, "invalid_request", "malformed request line");
	sp2 = strchr(sp1 + 1, ' ');
	if (!sp2 || sp2 > eol || sp2 == sp1 + 1)
		return refuse(r, 400, "invalid_request", "malformed request line");
	n = (size_t)(sp1 - h);
	if (n == 0 || n > MAX_METHOD)
		return refuse(r, 400, "invalid_request", "malformed request line");
	for (size_t i = 0; i < n; i++)
		if (h[i] < 'A' || h[i] > 'Z')
			return refuse(r, 400, "invalid_request", "malformed request method");
	memcpy(hd->method, h, n);
	hd->method[n] = '\0';
	if (!strncmp(sp2 + 1, "HTTP/1.1", 8))
		hd->http10 = false;
	else if (!strncmp(sp2 + 1, "HTTP/1.0", 8))
		hd->http10 = true;
	else
		return refuse(r, 505, "http_version_not_supported",
		              "only HTTP/1.0 and HTTP/1.1 are served");
	if (sp2[9] != '\r' && sp2[9] != '\n')
		return refuse(r, 400, "invalid_request", "malformed request line");
	n = (size_t)(sp2 - sp1 - 1);
	memcpy(hd->target, sp1 + 1, n);
	hd->target[n] = '\0';
	n = strcspn(hd->target, "?");
	memcpy(hd->path, hd->target, n);
	hd->path[n] = '\0';
	if (target_has_control(hd->target))
		return refuse(r, 400,
		              !strncmp(hd->path, "/v1/loras/", 10) ? "invalid_name"
		                                                   : "invalid_request",
		              "the request target contains a control character (NUL included)");
	/* obsolete line folding would hide a header from the checks below */
	for (p = eol; p && p[1]; p = strchr(p + 1, '\n'))
		if (p[1] == ' ' || p[1] == '\t')
			return refuse(r, 400, "invalid_request",
			              "folded header lines are not accepted");

	rq->method = hd->method;
	rq->path = hd->path;
	rq->head = h;
	if (lp_gate_header(rq, "Transfer-Encoding", val, sizeof(val))) {
		if (strcasecmp(val, "chunked"))
			return refuse(r, 501, "not_implemented",
			              "the only transfer coding accepted is 'chunked'");
		hd->chunked = true;
	}
	p = find_header(h, "Content-Length", first, sizeof(first));
	if (p) {
		char *end;
		unsigned long long cl;

		if (hd->chunked)
			return refuse(r, 400, "invalid_request",
			              "'Content-Length' and 'Transfer-Encoding' together");
		/* repeated ones must agree: differing ones smuggle requests */
		while ((p = find_header(p, "Content-Length", val, sizeof(val))))
			if (strcmp(val, first))
				return refuse(r, 400, "invalid_request",
				              "'Content-Length' headers that differ");
		if (first[0] < '0' || first[0] > '9')
			return refuse(r, 400, "invalid_request", "malformed 'Content-Length'");
		errno = 0;
		cl = strtoull(first, &end, 10);
		if (errno || *end || cl > CONTENT_LEN_MAX)
			return refuse(r, 400, "invalid_request", "malformed 'Content-Length'");
		hd->content_length = (long long)cl;
	}
	if (lp_gate_header(rq, "Connection", val, sizeof(val)))
		hd->close =
		    hd->http10 ? strcasecmp(val, "keep-alive") != 0 : !strcasecmp(val, "close");
	else
		hd->close = hd->http10;
	return true;
}

/* ---- one connection ---- */

enum rx_state {
	RX_HEAD,
	RX_BODY,       /* remaining bytes of a Content-Length body */
	RX_CHUNK_SIZE, /* a chunk-size line */
	RX_CHUNK_DATA, /* remaining bytes of a chunk */
	RX_CHUNK_END,  /* the CRLF after a chunk */
	RX_TRAILER,    /* trailer lines up to the blank one */
};

struct rx {
	char buf[LP_GATE_MAX_HEAD + 1]; /* bytes from the client not yet handled */
	size_t len;
	enum rx_state state;
	unsigned long long remaining;
	double deadline; /* 0: none (a relayed response may be running) */
	char head[LP_GATE_MAX_HEAD + 1];
	struct head hd;
	struct lp_buf out;
};

/* Sends a JSON error and asks for the connection to be closed. */
static void send_refusal(int fd, const struct refusal *r)
{
	char body[384], resp[768];
	int bn, n;

	bn = snprintf(body, sizeof(body),
	              "{\"error\":{\"message\":\"%s\",\"type\":\"%s\",\"param\":null,"
	              "\"code\":\"%s\"}}",
	              r->msg, lp_api_error_type(r->status), r->code);
	n = snprintf(resp, sizeof(resp),
	             "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
	             "Content-Length: %d\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n%s",
	             r->status,
	             r->status == 400   ? "Bad Request"
	             : r->status == 408 ? "Request Timeout"
	             : r->status == 431 ? "Request Header Fields Too Large"
	             : r->status == 501 ? "Not Implemented"
	             : r->status == 505 ? "HTTP Version Not Supported"
	                                : "Service Unavailable",
	             bn, body);
	if (n > 0 && (size_t)n < sizeof(resp))
		lp_socket_send_all(fd, resp, (size_t)n);
}

static void consume(struct rx *rx, size_t n)
{
	memmove(rx->buf, rx->buf + n, rx->len - n);
	rx->len -= n;
}

/* Forwards n bytes from the front of rx->buf to the backend. */
static bool forward(struct rx *rx, int bfd, size_t n)
{
	if (!lp_socket_send_all(bfd, rx->buf, n))
		return false;
	consume(rx, n);
	return true;
}

/* One line of chunked framing at the front of rx->buf: its length with
 * the LF, 0 when incomplete, -1 when too long. */
static long chunk_line(const struct rx *rx)
{
	const char *lf = memchr(rx->buf, '\n', rx->len < CHUNK_LINE_MAX ? rx->len : CHUNK_LINE_MAX);

	if (lf)
		return (long)(lf - rx->buf) + 1;
	return rx->len >= CHUNK_LINE_MAX ? -1 : 0;
}

enum step {
	STEP_MORE,  /* wait for bytes */
	STEP_AGAIN, /* handled something: look again */
	STEP_CLOSE, /* close the connection */
};

/* Handles a complete head at the front of rx->buf (end bytes long). */
static enum step on_head(struct gconn *c, struct rx *rx, int *bfd, size_t end)
{
	struct lp_gate *g = c->g;
	struct lp_gate_request rq;
	struct refusal r;
	bool body;

	memcpy(rx->head, rx->buf, end);
	rx->head[end] = '\0';
	if (!parse_head(rx->head, &rx->hd, &rq, &r)) {
		send_refusal(c->fd, &r);
		return STEP_CLOSE;
	}
	body = rx->hd.chunked || rx->hd.content_length > 0;
	lp_buf_reset(&rx->out);
	if (*bfd < 0 && !body && g->local && g->local(g->ud, &rq, &rx->out)) {
		if (!lp_socket_send_all(c->fd, rx->out.data, rx->out.len) || rx->hd.close)
			return STEP_CLOSE;
		consume(rx, end);
		rx->deadline = now_s() + g->cfg.header_timeout_s;
		return STEP_AGAIN;
	}
	if (*bfd < 0) {
		*bfd = lp_socket_connect_loopback(g->backend_port, SEND_TIMEOUT_S);
		if (*bfd < 0) {
			struct refusal busy = {503, "server_busy", "cannot reach the HTTP server"};
			send_refusal(c->fd, &busy);
			return STEP_CLOSE;
		}
		pthread_mutex_lock(&g->mu);
		c->relaying = true;
		pthread_mutex_unlock(&g->mu);
	}
	if (!forward(rx, *bfd, end))
		return STEP_CLOSE;
	rx->deadline = body ? now_s() + g->cfg.body_timeout_s : 0;
	rx->state = rx->hd.chunked ? RX_CHUNK_SIZE : body ? RX_BODY : RX_HEAD;
	rx->remaining = body && !rx->hd.chunked ? (unsigned long long)rx->hd.content_length : 0;
	return STEP_AGAIN;
}

/* Handles what rx->buf holds, as far as it goes. */
static enum step step(struct gconn *c, struct rx *rx, int *bfd)
{
	size_t n;
	long ln;

	switch (rx->state) {
	case RX_HEAD:
		/* blank lines before a request line are allowed (RFC 9112 2.2) */
		while (rx->len && (rx->buf[0] == '\r' || rx->buf[0] == '\n'))
			consume(rx, 1);
		if (!rx->len)
			return STEP_MORE;
		if (*bfd >= 0 && rx->deadline == 0)
			rx->deadline = now_s() + c->g->cfg.header_timeout_s;
		n = head_end(rx->buf, rx->len);
		if (n)
			return on_head(c, rx, bfd, n);
		if (rx->len >= LP_GATE_MAX_HEAD) {
			struct refusal r = {431, "request_header_too_large",
			                    "the request head is larger than 16384 bytes"};
			send_refusal(c->fd, &r);
			return STEP_CLOSE;
		}
		return STEP_MORE;
	case RX_BODY:
		n = rx->len < rx->remaining ? rx->len : (size_t)rx->remaining;
		if (!n)
			return STEP_MORE;
		if (!forward(rx, *bfd, n))
			return STEP_CLOSE;
		rx->remaining -= n;
		if (!rx->remaining) {
			rx->state = RX_HEAD;
			rx->deadline = 0;
		}
		return STEP_AGAIN;
	case RX_CHUNK_SIZE: {
		unsigned long long size = 0;
		int digits = 0;

		if ((ln = chunk_line(rx)) <= 0)
			return ln < 0 ? STEP_CLOSE : STEP_MORE;
		for (; digits < (int)ln && lp_hex_digit(rx->buf[digits]) >= 0; digits++) {
			if (digits >= 15)
				return STEP_CLOSE;
			size = size * 16 + (unsigned long long)lp_hex_digit(rx->buf[digits]);
		}
		if (!digits)
			return STEP_CLOSE; /* civetweb refuses it too; nothing to answer */
		if (!forward(rx, *bfd, (size_t)ln))
			return STEP_CLOSE;
		rx->state = size ? RX_CHUNK_DATA : RX_TRAILER;
		rx->remaining = size;
		return STEP_AGAIN;
	}
	case RX_CHUNK_DATA:
		n = rx->len < rx->remaining ? rx->len : (size_t)rx->remaining;
		if (!n)
			return STEP_MORE;
		if (!forward(rx, *bfd, n))
			return STEP_CLOSE;
		rx->remaining -= n;
		if (!rx->remaining)
			rx->state = RX_CHUNK_END;
		return STEP_AGAIN;
	case RX_CHUNK_END:
	case RX_TRAILER:
		if ((ln = chunk_line(rx)) <= 0)
			return ln < 0 ? STEP_CLOSE : STEP_MORE;
		bool blank = ln == 1 || (ln == 2 && rx->buf[0] == '\r');
		if (rx->state == RX_CHUNK_END && !blank)
			return STEP_CLOSE;
		if (!forward(rx, *bfd, (size_t)ln))
			return STEP_CLOSE;
		if (rx->state == RX_CHUNK_END) {
			rx->state = RX_CHUNK_SIZE;
		} else if (blank) {
			rx->state = RX_HEAD;
			rx->deadline = 0;
		}
		return STEP_AGAIN;
	}
	return STEP_CLOSE;
}

/* Ends the sending side and reads what the client still sends, for a
 * bounded time: closing with unread bytes would reset the connection and
 * could destroy a refusal the client has not read yet. */
static void linger_close(int fd)
{
	char junk[4096];
	size_t total = 0;
	double end = now_s() + LINGER_S;

	shutdown(fd, SHUT_WR);
	while (total < LINGER_MAX) {
		struct pollfd pf = {fd, POLLIN, 0};
		double left = end - now_s();
		ssize_t n;

		if (left <= 0 || poll(&pf, 1, (int)(left * 1000) + 1) <= 0)
			break;
		n = recv(fd, junk, sizeof(junk), MSG_DONTWAIT);
		if (n <= 0 && !(n < 0 && (errno == EAGAIN || errno == EINTR)))
			break;
		if (n > 0)
			total += (size_t)n;
	}
}

/* A connection's buffers. They are mapped, not malloc'd: every connection
 * runs on a short-lived thread of its own, glibc gives such threads arenas
 * that keep their high-water mark (a soak of new connections grew the
 * agent's resident memory for minutes), and a mapping goes back to the
 * kernel when its connection ends. */
struct conn_mem {
	struct rx rx;
	char relay[RELAY_BUF]; /* backend -> client */
};

static void serve(struct gconn *c, struct rx *rx, char *tmp)
{
	struct lp_gate *g = c->g;
	int bfd = -1;

	rx->deadline = c->since + g->cfg.header_timeout_s;
	for (;;) {
		struct pollfd pf[2];
		enum step st;
		int timeout = -1, r;

		while ((st = step(c, rx, &bfd)) == STEP_AGAIN)
			;
		if (st == STEP_CLOSE)
			break;
		/* (after the steps: they may open the backend connection) a full
		 * buffer is never left between steps; the check keeps a
		 * zero-length recv from passing for the client's EOF */
		pf[0] = (struct pollfd){c->fd, rx->len < LP_GATE_MAX_HEAD ? POLLIN : 0, 0};
		pf[1] = (struct pollfd){bfd, POLLIN, 0};
		if (rx->deadline > 0) {
			double left = rx->deadline - now_s();
			if (left <= 0) {
				/* late: a head in progress hears why; a late body or
				 * an idle connection is just closed */
				if (rx->state == RX_HEAD && rx->len) {
					struct refusal rr = {408, "request_timeout",
					                     "the request head took too long"};
					send_refusal(c->fd, &rr);
				}
				break;
			}
			timeout = (int)(left * 1000) + 1;
		}
		r = poll(pf, bfd >= 0 ? 2 : 1, timeout);
		if (r < 0 && errno != EINTR)
			break;
		if (r <= 0)
			continue;
		if (bfd >= 0 && pf[1].revents) {
			ssize_t n = recv(bfd, tmp, RELAY_BUF, MSG_DONTWAIT);
			if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
				break;
			if (n > 0 && !lp_socket_send_all(c->fd, tmp, (size_t)n))
				break;
		}
		if (pf[0].revents && rx->len < LP_GATE_MAX_HEAD) {
			ssize_t n = recv(c->fd, rx->buf + rx->len, LP_GATE_MAX_HEAD - rx->len,
			                 MSG_DONTWAIT);
			if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
				break;
			if (n > 0)
				rx->len += (size_t)n;
		}
	}
	if (bfd >= 0)
		close(bfd);
	linger_close(c->fd);
}

static void *conn_main(void *arg)
{
	struct gconn *c = arg;
	struct lp_gate *g = c->g;
	struct timeval tv = {SEND_TIMEOUT_S, 0};
	struct conn_mem *m =
	    mmap(NULL, sizeof(*m), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	int one = 1;

	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	if (m != MAP_FAILED) {
		struct rx *rx = &m->rx;
		rx->len = 0;
		rx->state = RX_HEAD;
		rx->remaining = 0;
		lp_buf_init(&rx->out, 1u << 20);
		serve(c, rx, m->relay);
		lp_buf_release(&rx->out);
		munmap(m, sizeof(*m));
	}
	/* off the list before close, so an eviction never hits a reused fd */
	pthread_mutex_lock(&g->mu);
	if (c->prev)
		c->prev->next = c->next;
	else
		g->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	g->n_conns--;
	pthread_mutex_unlock(&g->mu);
	close(c->fd);
	free(c);
	return NULL;
}

/* At the cap: ends the connection that has waited longest without
 * relaying anything (slow heads first); false when every one relays. */
static bool evict_one(struct lp_gate *g)
{
	struct gconn *victim = NULL;

	for (struct gconn *c = g->conns; c; c = c->next)
		if (!c->relaying && c->fd >= 0)
			victim = c; /* the list is newest first: the last is oldest */
	if (!victim)
		return false;
	shutdown(victim->fd, SHUT_RDWR);
	victim->relaying = true; /* not again */
	return true;
}

/* The listener's callback: admits the connection (evicting the oldest one
 * still waiting for its head when the cap is reached) and gives it a
 * thread of its own. */
static void on_accept(void *arg, int fd)
{
	struct lp_gate *g = arg;
	pthread_attr_t attr;
	pthread_t th;
	struct gconn *c;
	bool room;

	pthread_mutex_lock(&g->mu);
	/* evicted connections count until their threads end: allow a second
	 * cap's worth of them, then refuse */
	room = g->n_conns < g->cfg.max_conns || (g->n_conns < 2 * g->cfg.max_conns && evict_one(g));
	pthread_mutex_unlock(&g->mu);
	c = room ? calloc(1, sizeof(*c)) : NULL;
	if (!c) {
		struct refusal r = {503, "too_many_connections",
		                    "too many open connections; retry later"};
		struct timeval tv = {0, 100000};
		setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
		send_refusal(fd, &r);
		close(fd);
		return;
	}
	c->g = g;
	c->fd = fd;
	c->since = now_s();
	pthread_mutex_lock(&g->mu);
	c->next = g->conns;
	if (g->conns)
		g->conns->prev = c;
	g->conns = c;
	g->n_conns++;
	pthread_mutex_unlock(&g->mu);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstacksize(&attr, CONN_STACK);
	if (pthread_create(&th, &attr, conn_main, c)) {
		pthread_mutex_lock(&g->mu);
		if (c->next)
			c->next->prev = NULL;
		g->conns = c->next;
		g->n_conns--;
		pthread_mutex_unlock(&g->mu);
		close(fd);
		free(c);
	}
	pthread_attr_destroy(&attr);
}

/* ---- setup ---- */

int lp_gate_start(struct lp_gate **out, const char *host, int port, int backend_port,
                  const struct lp_gate_config *cfg, lp_gate_local_fn local, void *ud,
                  struct lp_err *err)
{
	struct lp_gate *g;
	int rc;

	*out = NULL;
	g = calloc(1, sizeof(*g));
	if (!g)
		return lp_errf(err, -ENOMEM, "out of memory");
	g->cfg = *cfg;
	if (g->cfg.header_timeout_s <= 0)
		g->cfg.header_timeout_s = LP_GATE_HEADER_TIMEOUT_DEFAULT;
	if (g->cfg.body_timeout_s <= 0)
		g->cfg.body_timeout_s = LP_GATE_BODY_TIMEOUT_DEFAULT;
	if (g->cfg.max_conns <= 0)
		g->cfg.max_conns = LP_GATE_MAX_CONNS_DEFAULT;
	g->local = local;
	g->ud = ud;
	g->backend_port = backend_port;
	lp_listener_init(&g->listener);
	pthread_mutex_init(&g->mu, NULL);
	if ((rc = lp_listener_start(&g->listener, host, port, 511, on_accept, g, "HTTP", err)))
		goto fail;
	*out = g;
	return 0;
fail:
	lp_gate_free(g, 0);
	return rc;
}

int lp_gate_port(const struct lp_gate *g)
{
	return g->listener.port;
}

void lp_gate_close(struct lp_gate *g)
{
	if (!g)
		return;
	lp_listener_stop(&g->listener);
	pthread_mutex_lock(&g->mu);
	for (struct gconn *c = g->conns; c; c = c->next)
		if (!c->relaying)
			shutdown(c->fd, SHUT_RDWR);
	pthread_mutex_unlock(&g->mu);
}

void lp_gate_free(struct lp_gate *g, int wait_ms)
{
	int n;

	if (!g)
		return;
	lp_gate_close(g);
	for (int waited = 0;; waited += 10) {
		pthread_mutex_lock(&g->mu);
		n = g->n_conns;
		pthread_mutex_unlock(&g->mu);
		if (n == 0 || waited >= wait_ms)
			break;
		struct timespec ts = {0, 10000000L};
		nanosleep(&ts, NULL);
	}
	if (n > 0)
		return; /* connections still hold g: leave it to the process exit */
	pthread_mutex_destroy(&g->mu);
	free(g);
}
