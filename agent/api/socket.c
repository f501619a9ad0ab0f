/* Socket helpers of the relays; see socket.h. */
#include "agent/api/socket.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

int lp_socket_listen(const char *host, int port, int backlog, int *fd_out, int *port_out,
                     struct lp_err *err)
{
	struct addrinfo hints, *res = NULL;
	char service[16];
	int fd, one = 1, rc;
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);

	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_INET;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
	snprintf(service, sizeof(service), "%d", port);
	rc = getaddrinfo(host, service, &hints, &res);
	if (rc)
		return lp_errf(err, -EINVAL, "cannot resolve '%s': %s", host ? host : "*",
		               gai_strerror(rc));
	fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		freeaddrinfo(res);
		return lp_errf(err, -errno, "socket: %s", strerror(errno));
	}
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, backlog) < 0) {
		int e = errno;
		freeaddrinfo(res);
		close(fd);
		return lp_errf(err, e == EADDRINUSE ? -EADDRINUSE : -e,
		               "cannot listen on %s:%d: %s", host ? host : "*", port, strerror(e));
	}
	freeaddrinfo(res);
	if (getsockname(fd, (struct sockaddr *)&ss, &len) == 0 && ss.ss_family == AF_INET)
		*port_out = ntohs(((struct sockaddr_in *)&ss)->sin_port);
	else
		*port_out = port;
	*fd_out = fd;
	return 0;
}

int lp_socket_connect_loopback(int port, int send_timeout_s)
{
	struct sockaddr_in a;
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;

	if (fd < 0)
		return -1;
	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_port = htons((uint16_t)port);
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		close(fd);
		return -1;
	}
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (send_timeout_s > 0) {
		struct timeval tv = {send_timeout_s, 0};
		setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	}
	return fd;
}

bool lp_socket_send_all(int fd, const char *b, size_t n)
{
	while (n) {
		ssize_t w = send(fd, b, n, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return false;
		b += w;
		n -= (size_t)w;
	}
	return true;
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

void lp_listener_init(struct lp_listener *l)
{
	l->fd = l->stop_pipe[0] = l->stop_pipe[1] = -1;
	l->port = 0;
	l->started = false;
}

static void *listener_main(void *arg)
{
	struct lp_listener *l = arg;

	for (;;) {
		struct pollfd pf[2] = {{l->fd, POLLIN, 0}, {l->stop_pipe[0], POLLIN, 0}};
		int fd;

		if (poll(pf, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (pf[1].revents)
			break;
		fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			/* out of descriptors or memory: let some connections end */
			if (errno == EMFILE || errno == ENFILE || errno == ENOMEM ||
			    errno == ENOBUFS) {
				struct timespec ts = {0, 100000000L};
				nanosleep(&ts, NULL);
			}
			continue;
		}
		l->on_accept(l->arg, fd);
	}
	return NULL;
}

int lp_listener_start(struct lp_listener *l, const char *host, int port, int backlog,
                      lp_accept_fn on_accept, void *arg, const char *what, struct lp_err *err)
{
	int rc;

	lp_listener_init(l);
	l->on_accept = on_accept;
	l->arg = arg;
	if ((rc = lp_socket_listen(host, port, backlog, &l->fd, &l->port, err)))
		goto fail;
	if (pipe2(l->stop_pipe, O_CLOEXEC) < 0) {
		rc = lp_errf(err, -errno, "pipe: %s", strerror(errno));
		goto fail;
	}
	if (pthread_create(&l->thread, NULL, listener_main, l)) {
		rc = lp_errf(err, -EAGAIN, "cannot start the %s listener thread", what);
		goto fail;
	}
	l->started = true;
	return 0;
fail:
	lp_listener_stop(l);
	return rc;
}

void lp_listener_stop(struct lp_listener *l)
{
	if (l->started) {
		if (write(l->stop_pipe[1], "x", 1) != 1)
			pthread_cancel(l->thread);
		pthread_join(l->thread, NULL);
		l->started = false;
	}
	close_fd(&l->fd);
	close_fd(&l->stop_pipe[0]);
	close_fd(&l->stop_pipe[1]);
}
