/* The few socket operations the agent's two relays share (the front door,
 * agent/api/gate.c, and the TLS terminator, agent/api/tls.c): a listener
 * with its accepting thread, a connection to a loopback backend, and a
 * send of every byte. */
#ifndef LP_API_SOCKET_H
#define LP_API_SOCKET_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>

#include "common/err.h"

/* Binds host:port (host NULL: every IPv4 interface; port 0: any free port)
 * and listens with the given backlog. On success *fd_out is the socket
 * (close-on-exec) and *port_out the port actually bound. Errors:
 * -EADDRINUSE, -EINVAL (host cannot be resolved), -errno. */
int lp_socket_listen(const char *host, int port, int backlog, int *fd_out, int *port_out,
                     struct lp_err *err);

/* Called on the listener's thread for every accepted connection; takes
 * ownership of fd (close-on-exec). */
typedef void (*lp_accept_fn)(void *arg, int fd);

/* A listening socket and the thread that accepts on it. */
struct lp_listener {
	int fd;
	int port; /* the port actually bound */
	int stop_pipe[2];
	pthread_t thread;
	bool started;
	lp_accept_fn on_accept;
	void *arg;
};

/* Marks l as not started, so that lp_listener_stop() is safe on it. */
void lp_listener_init(struct lp_listener *l);

/* Listens on host:port (as lp_socket_listen) and starts a thread that
 * calls on_accept(arg, fd) for every connection, pausing briefly when the
 * process is out of descriptors or memory. what names the listener in
 * errors. On failure l is stopped again. */
int lp_listener_start(struct lp_listener *l, const char *host, int port, int backlog,
                      lp_accept_fn on_accept, void *arg, const char *what, struct lp_err *err);

/* Stops accepting: wakes and joins the thread and closes the socket.
 * Connections already handed to on_accept are not touched. Safe to call
 * again, and on an initialised listener that never started. */
void lp_listener_stop(struct lp_listener *l);

/* A TCP connection to 127.0.0.1:port with TCP_NODELAY, and a send timeout
 * of send_timeout_s seconds when that is positive; -1 on failure. */
int lp_socket_connect_loopback(int port, int send_timeout_s);

/* Sends all n bytes of b (retrying partial sends and EINTR, never raising
 * SIGPIPE); false when the peer is gone or a send timed out. */
bool lp_socket_send_all(int fd, const char *b, size_t n);

#endif
