/* A tiny HTTP/1.1 server for the operator's /metrics, /healthz and
 * /readyz: one thread, one short request at a time, GET only, the
 * connection closed after each answer. Enough for probes and Prometheus
 * scrapes without another dependency. */
#ifndef LP_OPERATOR_HTTPD_H
#define LP_OPERATOR_HTTPD_H

#include "common/buf.h"
#include "common/err.h"

/* Fills body for path (no query) and returns the HTTP status; called on
 * the server thread. *content_type defaults to text/plain. */
typedef int (*op_httpd_handler)(void *user, const char *path, struct lp_buf *body,
                                const char **content_type);

struct op_httpd;

/* Listens on host:port (host NULL = all IPv4 addresses; port 0 picks a
 * free one, see op_httpd_port). */
int op_httpd_start(struct op_httpd **out, const char *host, int port, op_httpd_handler h,
                   void *user, struct lp_err *err);
int op_httpd_port(const struct op_httpd *s);
/* Stops the thread, closes the socket and frees s. */
void op_httpd_stop(struct op_httpd *s);

#endif
