/* Socket helpers of the relays; see socket.h. */
#include "agent/api/socket.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
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
