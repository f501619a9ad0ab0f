/* The front door of each HTTP port: a listener that reads every request
 * head itself, with a deadline and a size cap, before civetweb sees it.
 *
 * Why: civetweb 1.15 gives each connection one of its worker threads from
 * accept to close, so a few hundred connections that dribble their
 * headers (slowloris) leave no thread for anyone, /health included; its
 * request_timeout_ms also bounds every body read and response write. The
 * gate holds slow connections on threads of its own (small stacks, a cap
 * on open connections), closes a connection whose head or body is late,
 * answers the probes (GET/HEAD /health, /ready) without a civetweb
 * worker, refuses malformed heads, and relays everything else to civetweb
 * on 127.0.0.1 over one backend connection per client connection, so
 * keep-alive, pipelining and server-sent events pass through unchanged;
 * a client that goes away closes the backend connection, so civetweb's
 * next write fails as if the client were connected directly.
 *
 * Requests are framed (Content-Length or chunked) in the client-to-server
 * direction only: responses are relayed as bytes. Once a connection has
 * relayed a request, later requests on it go to civetweb too, so that
 * responses stay in order. With TLS the terminator (tls.h) relays to the
 * gate. */
#ifndef LP_API_GATE_H
#define LP_API_GATE_H

#include <stdbool.h>
#include <stddef.h>

#include "common/buf.h"
#include "common/err.h"

/* Largest request head (request line and headers); 431 above it. */
#define LP_GATE_MAX_HEAD 16384

#define LP_GATE_HEADER_TIMEOUT_DEFAULT 5.0
#define LP_GATE_BODY_TIMEOUT_DEFAULT   30.0
#define LP_GATE_MAX_CONNS_DEFAULT      1024

struct lp_gate_config {
	double header_timeout_s; /* from accept (or the end of the previous
	                          * request) to the end of a head; 0: default */
	double body_timeout_s;   /* from the end of a head to the end of its body */
	int max_conns;           /* open client connections; 0: default */
};

/* One request head, as the local answerer sees it. Borrowed for the call. */
struct lp_gate_request {
	const char *method;
	const char *path; /* the request target up to '?', not decoded */
	const char *head; /* the whole head, NUL terminated */
};

/* The value of header name in rq (case-insensitive), copied to out (cap
 * bytes, NUL terminated, surrounding blanks trimmed); false when absent. */
bool lp_gate_header(const struct lp_gate_request *rq, const char *name, char *out, size_t cap);

/* Answers rq without civetweb when it can: appends a whole HTTP response
 * to out and returns true. Called only for requests without a body on a
 * connection that has relayed nothing yet; runs on a gate thread. */
typedef bool (*lp_gate_local_fn)(void *ud, const struct lp_gate_request *rq, struct lp_buf *out);

struct lp_gate;

/* Binds host:port (host NULL: every interface; port 0: any free port) and
 * relays to 127.0.0.1:backend_port. cfg is copied; local and ud are
 * borrowed until lp_gate_free. Free with lp_gate_free(). */
int lp_gate_start(struct lp_gate **out, const char *host, int port, int backend_port,
                  const struct lp_gate_config *cfg, lp_gate_local_fn local, void *ud,
                  struct lp_err *err);
/* The port actually bound. */
int lp_gate_port(const struct lp_gate *g);
/* Stops accepting and closes the connections that have relayed nothing;
 * those relaying go on until civetweb closes its side. */
void lp_gate_close(struct lp_gate *g);
/* Closes g if needed, waits up to wait_ms for its connections to end and
 * frees g; one still open after that keeps g until the process exits.
 * NULL is fine. */
void lp_gate_free(struct lp_gate *g, int wait_ms);

#endif
