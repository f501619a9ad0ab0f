/* The agent's HTTP servers: civetweb setup, TLS, routing, auth, bodies,
 * responses and the access log; see server.h. */
#include "agent/api/server.h"

#include <civetweb.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/api/admin.h"
#include "agent/api/gate.h"
#include "agent/api/metrics.h"
#include "agent/api/openai.h"
#include "agent/api/registry.h"
#include "agent/api/tls.h"
#include "agent/api/tokenize.h"
#include "common/log.h"

/* Bytes of an over-limit body read and thrown away so that the client
 * sees the 413 instead of a reset connection; past this we just close. */
#define DISCARD_MAX (64u << 20)

double lp_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- routes ------------------------------------------------------------ */

enum {
	ON_PUBLIC = 1,
	ON_ADMIN = 2,
};

enum {
	R_PREFIX = 1,       /* path is a prefix ("/v1/loras/" + name) */
	R_RUNTIME_LORA = 2, /* on the public port only with --allow-runtime-lora-updating */
	R_OPEN = 4,         /* no auth on either port */
	R_OPEN_PUBLIC = 8,  /* no auth on the public port */
	R_QUIET = 16,       /* access log at debug level */
};

struct route {
	const char *method;
	const char *path;
	unsigned ports;
	unsigned flags;
	int (*fn)(struct lp_call *c);
};

static const struct route routes[] = {
    {"GET", "/health", ON_PUBLIC | ON_ADMIN, R_OPEN | R_QUIET, lp_admin_health},
    {"GET", "/ready", ON_PUBLIC | ON_ADMIN, R_OPEN_PUBLIC | R_QUIET, lp_admin_ready},
    {"GET", "/v1/models", ON_PUBLIC | ON_ADMIN, 0, lp_openai_models},
    {"GET", "/v1/models/", ON_PUBLIC | ON_ADMIN, R_PREFIX, lp_openai_model},
    {"POST", "/v1/completions", ON_PUBLIC, 0, lp_openai_completions},
    {"POST", "/v1/chat/completions", ON_PUBLIC, 0, lp_openai_chat},
    {"POST", "/tokenize", ON_PUBLIC, 0, lp_tokenize},
    {"POST", "/detokenize", ON_PUBLIC, 0, lp_detokenize},
    {"GET", "/v1/loras", ON_ADMIN, 0, lp_admin_loras_list},
    {"POST", "/v1/loras", ON_ADMIN, 0, lp_admin_loras_load},
    {"GET", "/v1/loras/", ON_ADMIN, R_PREFIX, lp_admin_loras_get},
    {"DELETE", "/v1/loras/", ON_ADMIN, R_PREFIX, lp_admin_loras_delete},
    {"POST", "/v1/load_lora_adapter", ON_ADMIN | ON_PUBLIC, R_RUNTIME_LORA, lp_admin_vllm_load},
    {"POST", "/v1/unload_lora_adapter", ON_ADMIN | ON_PUBLIC, R_RUNTIME_LORA, lp_admin_vllm_unload},
    {"GET", "/metrics", ON_ADMIN | ON_PUBLIC, R_OPEN_PUBLIC | R_QUIET, lp_admin_metrics},
};

static bool route_path_matches(const struct route *r, const char *path)
{
	size_t n = strlen(r->path);

	if (r->flags & R_PREFIX)
		return !strncmp(path, r->path, n) && path[n];
	return !strcmp(path, r->path);
}

static bool route_on_port(const struct lp_server *s, const struct route *r, bool admin)
{
	if (!(r->ports & (admin ? ON_ADMIN : ON_PUBLIC)))
		return false;
	if (!admin && (r->flags & R_RUNTIME_LORA))
		return s->cfg.allow_runtime_lora_updating;
	return true;
}

/* ---- auth -------------------------------------------------------------- */

/* Compares in time independent of where the strings differ. */
static bool secret_equal(const char *a, const char *b)
{
	size_t na = strlen(a), nb = strlen(b);
	unsigned char diff = (unsigned char)(na != nb);

	for (size_t i = 0; i < na; i++)
		diff |= (unsigned char)(a[i] ^ b[i % (nb ? nb : 1)]);
	return diff == 0 && nb > 0;
}

/* 0 when the request carries the token (or none is needed). */
static int check_auth(struct lp_call *c, const struct route *r)
{
	const char *want, *h;

	if (r->flags & R_OPEN)
		return 0;
	if (!c->admin && (r->flags & R_OPEN_PUBLIC))
		return 0;
	want = c->admin ? c->s->cfg.admin_token : c->s->cfg.api_key;
	if (!want)
		return 0;
	h = mg_get_header(c->conn, "Authorization");
	if (!h)
		return lp_call_errorf(c, 401, "invalid_api_key", NULL,
		                      "missing 'Authorization: Bearer <token>' header");
	if (strncasecmp(h, "Bearer ", 7) != 0)
		return lp_call_errorf(c, 401, "invalid_api_key", NULL,
		                      "the 'Authorization' header must be 'Bearer <token>'");
	h += 7;
	while (*h == ' ')
		h++;
	if (!secret_equal(h, want))
		return lp_call_errorf(c, 401, "invalid_api_key", NULL, "invalid bearer token");
	return 0;
}

/* ---- request ids ------------------------------------------------------- */

static bool request_id_ok(const char *s)
{
	size_t n = 0;

	for (; s[n]; n++) {
		char ch = s[n];
		if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
		      (ch >= '0' && ch <= '9') || ch == '-' || ch == '_' || ch == '.' || ch == ':'))
			return false;
	}
	return n >= 1 && n <= 64;
}

static void set_request_id(struct lp_call *c)
{
	const char *h = mg_get_header(c->conn, "X-Request-Id");

	if (h && request_id_ok(h)) {
		snprintf(c->id, sizeof(c->id), "%s", h);
		return;
	}
	snprintf(c->id, sizeof(c->id), "req-%llu",
	         (unsigned long long)atomic_fetch_add(&c->s->next_id, 1));
}

/* ---- bodies ------------------------------------------------------------ */

/* Reads and drops the rest of the body, up to DISCARD_MAX bytes; past
 * that the connection is closed after the response instead. */
static void discard_body(struct lp_call *c)
{
	char junk[16384];
	size_t total = 0;
	int n = 0;

	while (total < DISCARD_MAX && (n = mg_read(c->conn, junk, sizeof(junk))) > 0)
		total += (size_t)n;
	if (n != 0)
		mg_disable_keep_alive(c->conn);
}

int lp_call_read_body(struct lp_call *c, struct lp_api_error *e)
{
	size_t max = c->s->cfg.max_body;
	long long cl = c->ri->content_length;
	char chunk[16384];
	struct lp_err err;
	int n;

	c->body_read = true;
	if (cl > (long long)max) {
		/* a client waiting for the 100 has not sent the body */
		if (cl <= (long long)DISCARD_MAX && !c->expect_100)
			discard_body(c);
		mg_disable_keep_alive(c->conn);
		return lp_api_errorf(e, 413, "request_too_large", NULL,
		                     "the request body is %lld bytes, more than the limit of %zu",
		                     cl, max);
	}
	if (c->expect_100) {
		c->expect_100 = false;
		if (mg_write(c->conn, "HTTP/1.1 100 Continue\r\n\r\n", 25) != 25) {
			mg_disable_keep_alive(c->conn);
			return lp_api_errorf(e, 400, NULL, NULL, "cannot read the request body");
		}
	}
	lp_buf_reset(&c->body);
	while ((n = mg_read(c->conn, chunk, sizeof(chunk))) > 0) {
		if (lp_buf_append(&c->body, chunk, (size_t)n, &err)) {
			discard_body(c);
			mg_disable_keep_alive(c->conn);
			if (err.code == -E2BIG)
				return lp_api_errorf(
				    e, 413, "request_too_large", NULL,
				    "the request body is more than the limit of %zu "
				    "bytes",
				    max);
			return lp_api_error_from(e, 500, NULL, NULL, &err);
		}
	}
	if (n < 0) {
		mg_disable_keep_alive(c->conn);
		return lp_api_errorf(e, 400, NULL, NULL, "cannot read the request body");
	}
	if (cl >= 0 && c->body.len < (size_t)cl) {
		mg_disable_keep_alive(c->conn);
		return lp_api_errorf(e, 400, NULL, NULL,
		                     "the request body ended after %zu of %lld bytes", c->body.len,
		                     cl);
	}
	if (!c->body.data && lp_buf_append(&c->body, "", 0, &err))
		return lp_api_error_from(e, 500, NULL, NULL, &err);
	return 0;
}

/* The fields that name a model or an adapter: a NUL in one is an invalid
 * name (it would otherwise be cut short to another name), not just bad
 * JSON. */
static const char *const name_fields[] = {"lora_name", "model", "name"};

/* Called when jansson refused a "\u0000": 400 invalid_name when it is in a
 * name field at the top level, else 0 (the caller's invalid_json stands). */
static int nul_in_name(const struct lp_buf *body, struct lp_api_error *e)
{
	json_t *j = json_loadb(body->data, body->len, JSON_ALLOW_NUL, NULL);
	int rc = 0;

	if (!json_is_object(j))
		goto out;
	for (size_t i = 0; i < sizeof(name_fields) / sizeof(name_fields[0]); i++) {
		json_t *v = json_object_get(j, name_fields[i]);
		if (json_is_string(v) && strlen(json_string_value(v)) != json_string_length(v)) {
			rc = lp_api_errorf(e, 400, "invalid_name", name_fields[i],
			                   "'%s' contains a NUL character", name_fields[i]);
			break;
		}
	}
out:
	json_decref(j);
	return rc;
}

int lp_call_read_json(struct lp_call *c, json_t **out, struct lp_api_error *e)
{
	json_error_t je;
	json_t *j;
	int rc;

	*out = NULL;
	rc = lp_call_read_body(c, e);
	if (rc)
		return rc;
	if (c->body.len == 0)
		return lp_api_errorf(e, 400, "invalid_json", NULL,
		                     "the request body is empty: a JSON object is required");
	j = json_loadb(c->body.data, c->body.len, 0, &je);
	if (!j) {
		if (strstr(je.text, "JSON_ALLOW_NUL") && (rc = nul_in_name(&c->body, e)))
			return rc;
		lp_api_utf8_sanitize(je.text);
		if (strstr(je.text, "UTF-8") || strstr(je.text, "decode byte"))
			return lp_api_errorf(e, 400, "invalid_json", NULL,
			                     "the request body is not valid UTF-8: %s (at byte %d)",
			                     je.text, je.position);
		return lp_api_errorf(e, 400, "invalid_json", NULL,
		                     "the request body is not valid JSON: %s (line %d, column %d)",
		                     je.text, je.line, je.column);
	}
	if (!json_is_object(j)) {
		json_decref(j);
		return lp_api_errorf(e, 400, "invalid_json", NULL,
		                     "the request body must be a JSON object");
	}
	*out = j;
	return 0;
}

/* ---- responses --------------------------------------------------------- */

int lp_call_send(struct lp_call *c, int status, const char *content_type, const char *body,
                 size_t len, const char *extra_headers)
{
	if (c->status)
		return c->status; /* a response is already on its way */
	c->status = status;
	mg_printf(c->conn,
	          "HTTP/1.1 %d %s\r\n"
	          "Content-Type: %s\r\n"
	          "Content-Length: %zu\r\n"
	          "X-Request-Id: %s\r\n"
	          "Cache-Control: no-store\r\n"
	          "%s\r\n",
	          status, mg_get_response_code_text(c->conn, status), content_type, len, c->id,
	          extra_headers ? extra_headers : "");
	if (len && !c->head)
		mg_write(c->conn, body, len);
	return status;
}

int lp_call_send_json(struct lp_call *c, int status, json_t *body)
{
	/* The admin port's numbers are durations and counts: 15 digits print
	 * 0.791366 ms as that, not as 0.79136600000000001. The public port
	 * keeps full precision (logprobs equal the streamed ones bit for bit). */
	size_t flags = JSON_COMPACT | (c->admin ? JSON_REAL_PRECISION(15) : 0);
	char *text = body ? json_dumps(body, flags) : NULL;
	int rc;

	json_decref(body);
	if (!text) {
		static const char fallback[] =
		    "{\"error\":{\"message\":\"cannot encode the response\",\"type\":"
		    "\"server_error\",\"param\":null,\"code\":null}}";
		return lp_call_send(c, 500, "application/json", fallback, sizeof(fallback) - 1,
		                    NULL);
	}
	rc = lp_call_send(c, status, "application/json", text, strlen(text), NULL);
	free(text);
	return rc;
}

int lp_call_send_error(struct lp_call *c, const struct lp_api_error *e)
{
	char extra[64] = "";
	char *text;
	json_t *j;
	int rc;

	if (c->streaming) {
		/* the status is gone already: tell the client in the stream */
		j = lp_api_error_json(e);
		text = j ? json_dumps(j, JSON_COMPACT) : NULL;
		json_decref(j);
		if (text) {
			struct lp_buf b;
			lp_buf_init(&b, strlen(text) + 16);
			if (!lp_buf_appendf(&b, NULL, "data: %s\n\n", text))
				lp_call_stream_write(c, b.data, b.len);
			lp_buf_release(&b);
			free(text);
		}
		return c->status;
	}
	if ((e->status == 429 || e->status == 503) && e->retry_after > 0)
		snprintf(extra, sizeof(extra), "Retry-After: %d\r\n", e->retry_after);
	if (e->status == 401)
		snprintf(extra, sizeof(extra), "WWW-Authenticate: Bearer\r\n");
	j = lp_api_error_json(e);
	text = j ? json_dumps(j, JSON_COMPACT) : NULL;
	json_decref(j);
	if (!text)
		return lp_call_send(c, e->status, "text/plain", e->message, strlen(e->message),
		                    extra);
	rc = lp_call_send(c, e->status, "application/json", text, strlen(text), extra);
	free(text);
	return rc;
}

int lp_call_errorf(struct lp_call *c, int status, const char *code, const char *param,
                   const char *fmt, ...)
{
	struct lp_api_error e;
	va_list ap;

	memset(&e, 0, sizeof(e));
	e.status = status;
	e.code = code;
	snprintf(e.param, sizeof(e.param), "%s", param ? param : "");
	va_start(ap, fmt);
	vsnprintf(e.message, sizeof(e.message), fmt, ap);
	va_end(ap);
	if (status == 429 || status == 503)
		e.retry_after = 1;
	return lp_call_send_error(c, &e);
}

int lp_call_stream_start(struct lp_call *c)
{
	int n;

	if (c->status)
		return -EALREADY;
	c->status = 200;
	c->streaming = true;
	n = mg_printf(c->conn,
	              "HTTP/1.1 200 OK\r\n"
	              "Content-Type: text/event-stream\r\n"
	              "Cache-Control: no-cache\r\n"
	              "Transfer-Encoding: chunked\r\n"
	              "X-Request-Id: %s\r\n"
	              "\r\n",
	              c->id);
	return n > 0 ? 0 : -EPIPE;
}

int lp_call_stream_write(struct lp_call *c, const char *data, size_t len)
{
	char stackbuf[1024];
	char *b = stackbuf;
	int hn, rc = 0;

	if (!len)
		return 0;
	if (len + 32 > sizeof(stackbuf) && !(b = malloc(len + 32)))
		return -ENOMEM;
	hn = snprintf(b, 24, "%zx\r\n", len);
	memcpy(b + hn, data, len);
	memcpy(b + hn + len, "\r\n", 2);
	if (mg_write(c->conn, b, (size_t)hn + len + 2) != (int)((size_t)hn + len + 2))
		rc = -EPIPE;
	if (b != stackbuf)
		free(b);
	return rc;
}

int lp_call_stream_end(struct lp_call *c)
{
	return mg_write(c->conn, "0\r\n\r\n", 5) == 5 ? 0 : -EPIPE;
}

/* ---- dispatch ---------------------------------------------------------- */

static int dispatch(struct mg_connection *conn, struct lp_server *s, bool admin)
{
	struct lp_call c;
	const struct route *r = NULL;
	const char *expect;
	char allow[96] = "";
	bool path_known = false;

	memset(&c, 0, sizeof(c));
	c.s = s;
	c.conn = conn;
	c.ri = mg_get_request_info(conn);
	c.admin = admin;
	c.t0 = lp_now();
	c.method = c.ri->request_method ? c.ri->request_method : "";
	c.path = c.ri->local_uri_raw ? c.ri->local_uri_raw : "";
	lp_buf_init(&c.body, s->cfg.max_body);
	set_request_id(&c);
	/* HEAD is GET without the body (RFC 9110 9.3.2) */
	c.head = !strcmp(c.method, "HEAD");
	expect = mg_get_header(conn, "Expect");
	c.expect_100 = expect && !strcasecmp(expect, "100-continue") &&
	               (c.ri->content_length > 0 ||
	                (c.ri->content_length < 0 && mg_get_header(conn, "Transfer-Encoding")));

	for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++) {
		const struct route *cand = &routes[i];
		if (!route_on_port(s, cand, admin) || !route_path_matches(cand, c.path))
			continue;
		path_known = true;
		if (!strcmp(cand->method, c.method) || (c.head && !strcmp(cand->method, "GET"))) {
			r = cand;
			break;
		}
		size_t n = strlen(allow);
		snprintf(allow + n, sizeof(allow) - n, "%s%s%s", n ? ", " : "", cand->method,
		         strcmp(cand->method, "GET") ? "" : ", HEAD");
	}
	if (expect && strcasecmp(expect, "100-continue")) {
		/* RFC 9110 10.1.1: an expectation we cannot meet */
		lp_call_errorf(&c, 417, "expectation_failed", NULL,
		               "the only expectation served is '100-continue'");
	} else if (!r && path_known) {
		char extra[128];
		snprintf(extra, sizeof(extra), "Allow: %s\r\n", allow);
		struct lp_api_error e;
		lp_api_errorf(&e, 405, "method_not_allowed", NULL,
		              "'%s' is not allowed on '%s' (allowed: %s)", c.method, c.path, allow);
		json_t *j = lp_api_error_json(&e);
		char *text = j ? json_dumps(j, JSON_COMPACT) : NULL;
		json_decref(j);
		lp_call_send(&c, 405, "application/json", text ? text : "", text ? strlen(text) : 0,
		             extra);
		free(text);
	} else if (!r) {
		lp_call_errorf(&c, 404, "not_found", NULL, "no route for '%s %s'", c.method,
		               c.path);
	} else {
		c.quiet = (r->flags & R_QUIET) != 0;
		if (check_auth(&c, r) == 0)
			r->fn(&c);
	}
	if (!c.status) /* a handler that sent nothing is a bug; answer anyway */
		lp_call_errorf(&c, 500, NULL, NULL, "no response was produced");
	/* a body nobody read (an early error) is drained, so that closing or
	 * reusing the connection does not reset it under the client */
	if (!c.body_read && c.expect_100)
		mg_disable_keep_alive(conn); /* refused before the 100: the body never comes */
	else if (!c.body_read)
		discard_body(&c);
	lp_log(c.quiet && c.status < 400 ? LP_LOG_DEBUG : LP_LOG_INFO, c.id,
	       "%s %s %s -> %d in %.1f ms%s%s", admin ? "admin" : "api", c.method, c.path, c.status,
	       (lp_now() - c.t0) * 1e3, c.model[0] ? " model=" : "", c.model);
	lp_buf_release(&c.body);
	return c.status;
}

/* civetweb's worker threads have 100 KiB stacks (its build's
 * USE_STACK_SIZE), too little for JSON nesting up to jansson's depth
 * limit, PCRE2's JIT stack, adapter parsers and path buffers. Each
 * request therefore runs on a thread of its own with a full-size stack
 * while the civetweb thread waits; the pages are only committed as used. */
#define HANDLER_STACK (8u << 20)

struct trampoline {
	struct mg_connection *conn;
	struct lp_server *s;
	bool admin;
	int status;
};

static void *trampoline_main(void *arg)
{
	struct trampoline *t = arg;

	t->status = dispatch(t->conn, t->s, t->admin);
	return NULL;
}

static int dispatch_on_big_stack(struct mg_connection *conn, struct lp_server *s, bool admin)
{
	struct trampoline t = {conn, s, admin, 0};
	pthread_attr_t attr;
	pthread_t th;
	int rc;

	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, HANDLER_STACK);
	rc = pthread_create(&th, &attr, trampoline_main, &t);
	pthread_attr_destroy(&attr);
	if (rc != 0) {
		mg_printf(conn, "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
		                "Retry-After: 1\r\nConnection: close\r\n\r\n");
		return 503;
	}
	pthread_join(th, NULL);
	return t.status;
}

static int dispatch_public(struct mg_connection *conn, void *cbdata)
{
	return dispatch_on_big_stack(conn, cbdata, false);
}

static int dispatch_admin(struct mg_connection *conn, void *cbdata)
{
	return dispatch_on_big_stack(conn, cbdata, true);
}

/* civetweb's own messages (bind failures, TLS errors) go to our log. */
static int civetweb_log(const struct mg_connection *conn, const char *message)
{
	lp_log(LP_LOG_WARN, NULL, "http: %s", message);
	return 1;
}

/* ---- probes answered by the front door --------------------------------- */

/* GET/HEAD /health and /ready without a civetweb worker, so that they
 * answer while slow or many connections hold every worker (gate.h). The
 * responses are the handlers' (admin.c). A request this does not answer
 * (another route, a missing or wrong token for /ready on the admin port)
 * goes on to civetweb. */
static bool gate_local(void *ud, const struct lp_gate_request *rq, struct lp_buf *out)
{
	const struct lp_server_side *side = ud;
	struct lp_server *s = side->s;
	bool head = !strcmp(rq->method, "HEAD");
	char id[72], h[600];
	const char *body;
	char *dumped = NULL;
	int status = 200;
	double t0 = lp_now();
	struct lp_err err;

	if (!head && strcmp(rq->method, "GET"))
		return false;
	if (!strcmp(rq->path, "/health")) {
		body = "{\"status\":\"ok\"}";
	} else if (!strcmp(rq->path, "/ready")) {
		if (side->admin && s->cfg.admin_token) {
			const char *t = h + 7;
			if (!lp_gate_header(rq, "Authorization", h, sizeof(h)) ||
			    strncasecmp(h, "Bearer ", 7))
				return false;
			while (*t == ' ')
				t++;
			if (!secret_equal(t, s->cfg.admin_token))
				return false;
		}
		if (atomic_load(&s->draining)) {
			status = 503;
			body = "{\"status\":\"not_ready\",\"reason\":\"shutting down\"}";
		} else if (!atomic_load(&s->ready)) {
			status = 503;
			body = "{\"status\":\"not_ready\",\"reason\":\"the model is loading\"}";
		} else if (lp_worker_failure(s->w, &err)) {
			json_t *j = json_pack("{s:s, s:s+}", "status", "not_ready", "reason",
			                      "the engine failed: ", err.msg);
			status = 503;
			dumped = j ? json_dumps(j, JSON_COMPACT) : NULL;
			json_decref(j);
			body = dumped ? dumped : "{\"status\":\"not_ready\"}";
		} else {
			body = "{\"status\":\"ready\"}";
		}
	} else {
		return false;
	}
	if (!lp_gate_header(rq, "X-Request-Id", id, sizeof(id)) || !request_id_ok(id))
		snprintf(id, sizeof(id), "req-%llu",
		         (unsigned long long)atomic_fetch_add(&s->next_id, 1));
	if (lp_buf_appendf(out, NULL,
	                   "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
	                   "Content-Length: %zu\r\nX-Request-Id: %s\r\n"
	                   "Cache-Control: no-store\r\n\r\n%s",
	                   status, status == 200 ? "OK" : "Service Unavailable", strlen(body), id,
	                   head ? "" : body)) {
		free(dumped);
		return false;
	}
	free(dumped);
	lp_log(status < 400 ? LP_LOG_DEBUG : LP_LOG_INFO, id, "%s %s %s -> %d in %.1f ms",
	       side->admin ? "admin" : "api", rq->method, rq->path, status, (lp_now() - t0) * 1e3);
	return true;
}

/* ---- start and stop ---------------------------------------------------- */

int lp_server_init(struct lp_server *s, const struct lp_server_config *cfg, struct lp_err *err)
{
	int rc;

	memset(s, 0, sizeof(*s));
	s->cfg = *cfg;
	if (!s->cfg.max_body)
		s->cfg.max_body = LP_API_MAX_BODY_DEFAULT;
	if (s->cfg.http_threads <= 0)
		s->cfg.http_threads = 64;
	s->created = time(NULL);
	atomic_init(&s->ready, false);
	atomic_init(&s->draining, false);
	atomic_init(&s->aborting, false);
	atomic_init(&s->in_flight, 0);
	atomic_init(&s->next_id, 1);
	rc = lp_metrics_new(&s->metrics, err);
	if (!rc)
		rc = lp_registry_new(&s->loras, err);
	if (!rc)
		rc = lp_grammar_cache_new(&s->grammars, LP_SERVER_GRAMMARS, err);
	return rc;
}

/* Starts one civetweb context on host:port (plain HTTP). */
static int start_one(struct lp_server *s, bool admin, const char *host, int port,
                     struct mg_context **out, int *port_out, struct lp_err *err)
{
	char ports[320], threads[16], msg[256] = "";
	const char *opts[16];
	int n = 0;
	struct mg_callbacks cbs;
	struct mg_init_data init;
	struct mg_error_data ed;
	unsigned code = 0;
	struct mg_server_port sp[4];

	if (host)
		snprintf(ports, sizeof(ports), "%s:%d", host, port);
	else
		snprintf(ports, sizeof(ports), "%d", port);
	snprintf(threads, sizeof(threads), "%d", s->cfg.http_threads);
	opts[n++] = "listening_ports";
	opts[n++] = ports;
	opts[n++] = "num_threads";
	opts[n++] = threads;
	opts[n++] = "enable_keep_alive";
	opts[n++] = "yes";
	opts[n++] = "request_timeout_ms";
	opts[n++] = "60000";
	opts[n++] = "tcp_nodelay";
	opts[n++] = "1";
	opts[n] = NULL;
	memset(&cbs, 0, sizeof(cbs));
	cbs.log_message = civetweb_log;
	init.callbacks = &cbs;
	init.user_data = s;
	init.configuration_options = opts;
	ed.code = &code;
	ed.text = msg;
	ed.text_buffer_size = sizeof(msg);
	*out = mg_start2(&init, &ed);
	if (!*out)
		return lp_errf(err, -EADDRINUSE, "cannot start the %s server on '%s': %s",
		               admin ? "admin" : "public", ports, msg[0] ? msg : "unknown error");
	mg_set_request_handler(*out, "**", admin ? dispatch_admin : dispatch_public, s);
	*port_out = port;
	if (mg_get_server_ports(*out, 4, sp) >= 1)
		*port_out = sp[0].port;
	return 0;
}

/* Starts the front door of one port in front of civetweb's backend_port. */
static int start_gate(struct lp_server *s, bool admin, const char *host, int port, int backend_port,
                      struct lp_gate **out, struct lp_err *err)
{
	struct lp_gate_config gc = {s->cfg.http_header_timeout_s, s->cfg.http_body_timeout_s,
	                            s->cfg.http_max_connections};
	struct lp_server_side *side = admin ? &s->side_adm : &s->side_pub;
	struct lp_err e;
	int rc;

	side->s = s;
	side->admin = admin;
	rc = lp_gate_start(out, host, port, backend_port, &gc, gate_local, side, &e);
	if (rc)
		return lp_errf(err, rc, "cannot start the %s server on '%s:%d': %s",
		               admin ? "admin" : "public", host ? host : "*", port, e.msg);
	return 0;
}

int lp_server_start(struct lp_server *s, struct lp_err *err)
{
	const char *host = s->cfg.host && *s->cfg.host ? s->cfg.host : NULL;
	bool tls = s->cfg.tls_cert || s->cfg.tls_key;
	int maxc = s->cfg.http_max_connections, pub_backend, adm_backend, rc;

	if (tls && !(s->cfg.tls_cert && s->cfg.tls_key))
		return lp_errf(err, -EINVAL, "'--tls-cert' and '--tls-key' go together");
	mg_init_library(0);
	/* civetweb on loopback ports; the gates (and the TLS terminators)
	 * outside */
	if ((rc = start_one(s, false, "127.0.0.1", 0, &s->pub, &pub_backend, err)) ||
	    (rc = start_one(s, true, "127.0.0.1", 0, &s->adm, &adm_backend, err)))
		goto fail;
	if (!tls) {
		if ((rc =
		         start_gate(s, false, host, s->cfg.port, pub_backend, &s->gate_pub, err)) ||
		    (rc = start_gate(s, true, host, s->cfg.admin_port, adm_backend, &s->gate_adm,
		                     err)))
			goto fail;
		s->pub_port = lp_gate_port(s->gate_pub);
		s->adm_port = lp_gate_port(s->gate_adm);
		return 0;
	}
	if ((rc = start_gate(s, false, "127.0.0.1", 0, pub_backend, &s->gate_pub, err)) ||
	    (rc = start_gate(s, true, "127.0.0.1", 0, adm_backend, &s->gate_adm, err)) ||
	    (rc = lp_tls_proxy_start(&s->tls_pub, host, s->cfg.port, lp_gate_port(s->gate_pub),
	                             maxc, s->cfg.tls_cert, s->cfg.tls_key, err)) ||
	    (rc =
	         lp_tls_proxy_start(&s->tls_adm, host, s->cfg.admin_port, lp_gate_port(s->gate_adm),
	                            maxc, s->cfg.tls_cert, s->cfg.tls_key, err)))
		goto fail;
	s->pub_port = lp_tls_proxy_port(s->tls_pub);
	s->adm_port = lp_tls_proxy_port(s->tls_adm);
	return 0;
fail:
	lp_server_stop(s);
	return rc;
}

static void *stop_context(void *arg)
{
	mg_stop(arg);
	return NULL;
}

void lp_server_stop(struct lp_server *s)
{
	pthread_t t;
	bool threaded = false;

	/* TLS listeners close first; their relays end as civetweb closes the
	 * plain side below */
	struct lp_tls_proxy *tp = s->tls_pub, *ta = s->tls_adm;
	struct lp_gate *gp = s->gate_pub, *ga = s->gate_adm;
	s->tls_pub = s->tls_adm = NULL;
	s->gate_pub = s->gate_adm = NULL;
	lp_tls_proxy_close(tp);
	lp_tls_proxy_close(ta);
	/* the gates stop accepting and drop connections that relay nothing;
	 * the rest end as civetweb closes their backend side */
	lp_gate_close(gp);
	lp_gate_close(ga);

	/* both ports stop accepting at once; each mg_stop then waits for its
	 * handlers */
	if (s->adm)
		threaded = pthread_create(&t, NULL, stop_context, s->adm) == 0;
	if (s->pub)
		mg_stop(s->pub);
	if (s->adm) {
		if (threaded)
			pthread_join(t, NULL);
		else
			mg_stop(s->adm);
	}
	s->pub = s->adm = NULL;
	lp_tls_proxy_free(tp, 2000);
	lp_tls_proxy_free(ta, 2000);
	lp_gate_free(gp, 2000);
	lp_gate_free(ga, 2000);
}

void lp_server_release(struct lp_server *s)
{
	lp_metrics_free(s->metrics);
	s->metrics = NULL;
	lp_registry_free(s->loras);
	s->loras = NULL;
	lp_grammar_cache_free(s->grammars);
	s->grammars = NULL;
}
