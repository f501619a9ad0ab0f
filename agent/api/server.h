/* The agent's two HTTP servers (civetweb): the public OpenAI API and the
 * admin API, their shared state, routing, authentication, TLS, body
 * limits, request ids and the access log.
 *
 * Threads (docs/api.md, section 8): civetweb's worker threads run the handlers; they
 * parse, validate and tokenize, submit to the engine worker, read the
 * request's channel and write the response. They never touch engine
 * state except through worker.h's thread-safe functions. Adapter loads run
 * on the HTTP thread that asked for them.
 *
 * Each port is a front door (gate.h: request heads with a deadline, the
 * probes answered without a civetweb worker) in front of civetweb on
 * 127.0.0.1; with TLS, the terminator (tls.h) sits in front of the gate. */
#ifndef LP_API_SERVER_H
#define LP_API_SERVER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include "agent/api/errors.h"
#include "agent/engine/chat-template.h"
#include "agent/engine/grammar-cache.h"
#include "agent/engine/worker.h"
#include "common/buf.h"
#include "common/err.h"

struct mg_context;
struct mg_connection;
struct mg_request_info;
struct lp_metrics;
struct lp_source_cache;
struct lp_tls_proxy;
struct lp_gate;
struct lp_registry;
struct lp_resolver;

/* Largest request body accepted (413 above it). */
#define LP_API_MAX_BODY_DEFAULT (4u << 20)
/* Parsed grammars (response_format, tools) the server keeps for reuse. */
#define LP_SERVER_GRAMMARS 64

struct lp_server_config {
	const char *host;                 /* NULL or "": every interface */
	int port;                         /* public API; 0: any free port */
	int admin_port;                   /* admin API; 0: any free port */
	const char *tls_cert;             /* PEM certificate (chain); with tls_key: HTTPS */
	const char *tls_key;              /* PEM private key */
	const char *api_key;              /* bearer token for /v1/ on the public port, or NULL */
	const char *admin_token;          /* bearer token for the admin port, or NULL */
	bool allow_runtime_lora_updating; /* vLLM's load/unload on the public port */
	const char *served_name;          /* the base model's name in the API */
	const char *model_source;         /* the base model's "root" in /v1/models */
	size_t max_body;                  /* bytes; 0: LP_API_MAX_BODY_DEFAULT */
	int http_threads;                 /* civetweb worker threads per port */
	double http_header_timeout_s;     /* a request head; 0: LP_GATE_HEADER_TIMEOUT_DEFAULT */
	double http_body_timeout_s;       /* a body after its head; 0: the default */
	int http_max_connections;         /* open client connections per port; 0: the default */
};

/* What a port's front door (gate.h) needs to answer probes itself. */
struct lp_server_side {
	struct lp_server *s;
	bool admin;
};

struct lp_server {
	struct lp_server_config cfg; /* strings borrowed; must outlive the server */
	struct lp_worker *w;         /* borrowed */
	const struct lp_model *model;
	const struct lp_chat_template *chat; /* NULL: the model has none */
	struct lp_source_cache *sources;     /* borrowed; adapter URIs */
	struct lp_metrics *metrics;          /* owned */
	struct lp_registry *loras;           /* owned: loaded adapters (registry.h) */
	struct lp_resolver *resolver;        /* borrowed; NULL: no --lora-resolver */
	struct lp_grammar_cache *grammars;   /* owned: response_format and tool grammars */
	int max_model_len;
	time_t created;
	atomic_bool ready;     /* model loaded and engine running */
	atomic_bool draining;  /* shutting down: new generation requests get 503 */
	atomic_bool aborting;  /* the drain time is over: running requests stop */
	atomic_int in_flight;  /* generation requests being served */
	atomic_ullong next_id; /* request ids */
	struct mg_context *pub, *adm;
	int pub_port, adm_port;              /* the ports actually bound */
	struct lp_gate *gate_pub, *gate_adm; /* the front doors of pub/adm */
	struct lp_server_side side_pub, side_adm;
	struct lp_tls_proxy *tls_pub, *tls_adm; /* HTTPS in front of the gates */
};

/* Fills s's fields that need no threads (metrics, counters). w, model,
 * chat, sources and max_model_len are set by the caller before start. */
int lp_server_init(struct lp_server *s, const struct lp_server_config *cfg, struct lp_err *err);
/* Starts both servers; on success pub_port/adm_port hold the bound
 * ports. -EADDRINUSE and others with a message. */
int lp_server_start(struct lp_server *s, struct lp_err *err);
/* Stops both servers: closes the listening sockets, then waits for every
 * handler to return. Call after setting draining/aborting as needed. */
void lp_server_stop(struct lp_server *s);
/* Frees what lp_server_init allocated. */
void lp_server_release(struct lp_server *s);

/* One HTTP request being handled. */
struct lp_call {
	struct lp_server *s;
	struct mg_connection *conn;
	const struct mg_request_info *ri;
	const char *method;
	const char *path; /* percent-decoded, not normalised */
	bool admin;       /* arrived on the admin port */
	char id[72];      /* request id (X-Request-Id) */
	double t0;        /* arrival, lp_now() */
	int status;       /* status sent, 0 before */
	bool streaming;   /* a chunked response is open */
	bool quiet;       /* access log at debug level (health, metrics) */
	bool body_read;   /* the request body was consumed */
	bool head;        /* a HEAD request: headers only */
	bool expect_100;  /* the client waits for "100 Continue" before its body */
	char model[260];  /* model label for metrics, "" if none */
	struct lp_buf body;
};

double lp_now(void);

/* Reads the whole body (at most cfg.max_body bytes) into c->body, NUL
 * terminated; sends "100 Continue" first when the client asked for it.
 * 413 in e when it is larger (by Content-Length: without a 100). */
int lp_call_read_body(struct lp_call *c, struct lp_api_error *e);
/* Reads the body and parses it as one JSON object (new reference in
 * *out). 400 for malformed JSON or invalid UTF-8, 413 for size. */
int lp_call_read_json(struct lp_call *c, json_t **out, struct lp_api_error *e);

/* Responses. Each returns the status sent (for the handler's return). */
int lp_call_send(struct lp_call *c, int status, const char *content_type, const char *body,
                 size_t len, const char *extra_headers);
/* Sends body (a reference is taken over) as JSON. */
int lp_call_send_json(struct lp_call *c, int status, json_t *body);
int lp_call_send_error(struct lp_call *c, const struct lp_api_error *e);
int lp_call_errorf(struct lp_call *c, int status, const char *code, const char *param,
                   const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* Server-sent events over chunked transfer encoding. write returns 0, or
 * -EPIPE when the client is gone. */
int lp_call_stream_start(struct lp_call *c);
int lp_call_stream_write(struct lp_call *c, const char *data, size_t len);
int lp_call_stream_end(struct lp_call *c);

#endif
