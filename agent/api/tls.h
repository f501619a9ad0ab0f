/* HTTPS for the agent's ports: a TLS terminator in front of a plain
 * civetweb listener on 127.0.0.1.
 *
 * Why not civetweb's own TLS: Debian 12's civetweb 1.15 is built for the
 * OpenSSL 1.1 API and loads libssl at run time; OpenSSL 3 no longer
 * exports SSL_get_peer_certificate (now a macro), so civetweb's TLS
 * cannot start (civetweb issue #1334). This module takes the TLS
 * connections itself (OpenSSL 3's libssl, looked up at run time so the
 * build needs no extra library) and relays the plain bytes to civetweb.
 *
 * One thread accepts; each connection gets a thread that does the
 * handshake and relays both ways until either side closes. A client that
 * goes away closes the relay's backend socket, so civetweb's next write
 * fails as it would without TLS. */
#ifndef LP_API_TLS_H
#define LP_API_TLS_H

#include "common/err.h"

struct lp_tls_proxy;

/* Loads the certificate chain and key (PEM files), binds host:port (host
 * NULL: every interface; port 0: any free port) and starts relaying to
 * 127.0.0.1:backend_port. At most max_conns connections are open at once
 * (handshaking or relaying); one more is closed at once. Free with
 * lp_tls_proxy_free(). */
int lp_tls_proxy_start(struct lp_tls_proxy **out, const char *host, int port, int backend_port,
                       int max_conns, const char *cert, const char *key, struct lp_err *err);
/* The port actually bound. */
int lp_tls_proxy_port(const struct lp_tls_proxy *p);
/* Stops accepting new connections; those relaying go on. */
void lp_tls_proxy_close(struct lp_tls_proxy *p);
/* Closes p if needed, waits up to wait_ms for the relays to end (they end
 * when civetweb closes its side) and frees p. A relay still running after
 * that keeps p until the process exits. NULL is fine. */
void lp_tls_proxy_free(struct lp_tls_proxy *p, int wait_ms);

#endif
