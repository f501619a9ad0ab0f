/* The operator's small HTTP server for /metrics, /healthz and /readyz,
 * built on civetweb: two worker threads per port, requests of at most
 * 8 KiB, no keep-alive, no files served. GET and HEAD only (HEAD answers
 * like GET without the body); any other method is 405 with an Allow
 * header. Enough for kubelet probes and Prometheus scrapes. */
#ifndef LP_OPERATOR_HTTPD_H
#define LP_OPERATOR_HTTPD_H

#include "common/buf.h"
#include "common/err.h"

/* Fills body (capped at 16 MiB) for path (decoded, without the query)
 * and returns the HTTP status. *content_type starts as
 * "text/plain; charset=utf-8"; set it to a static string to change it.
 * Called on civetweb's worker threads, possibly on several at once, so it
 * must be thread-safe. A handler that fails to fill body (the cap) should
 * return 500. */
typedef int (*op_httpd_handler)(void *user, const char *path, struct lp_buf *body,
                                const char **content_type);

struct op_httpd;

/* Listens on host:port (host NULL or "" = all IPv4 addresses; otherwise an
 * IPv4 address; port 0 picks a free one, see op_httpd_port) and serves
 * every path through h, which borrows user for the server's life. On
 * success *out is the server, freed by op_httpd_stop. */
int op_httpd_start(struct op_httpd **out, const char *host, int port, op_httpd_handler h,
                   void *user, struct lp_err *err);
/* The port listened on. */
int op_httpd_port(const struct op_httpd *s);
/* Stops listening, waits for requests in progress and frees s; NULL is a
 * no-op. */
void op_httpd_stop(struct op_httpd *s);

#endif
