/* The few socket operations the agent's two relays share (the front door,
 * agent/api/gate.c, and the TLS terminator, agent/api/tls.c): a listening
 * socket, a connection to a loopback backend, and a send of every byte. */
#ifndef LP_API_SOCKET_H
#define LP_API_SOCKET_H

#include <stdbool.h>
#include <stddef.h>

#include "common/err.h"

/* Binds host:port (host NULL: every IPv4 interface; port 0: any free port)
 * and listens with the given backlog. On success *fd_out is the socket
 * (close-on-exec) and *port_out the port actually bound. Errors:
 * -EADDRINUSE, -EINVAL (host cannot be resolved), -errno. */
int lp_socket_listen(const char *host, int port, int backlog, int *fd_out, int *port_out,
                     struct lp_err *err);

/* A TCP connection to 127.0.0.1:port with TCP_NODELAY, and a send timeout
 * of send_timeout_s seconds when that is positive; -1 on failure. */
int lp_socket_connect_loopback(int port, int send_timeout_s);

/* Sends all n bytes of b (retrying partial sends and EINTR, never raising
 * SIGPIPE); false when the peer is gone or a send timed out. */
bool lp_socket_send_all(int fd, const char *b, size_t n);

#endif
