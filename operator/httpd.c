/* Tiny HTTP server for probes and metrics; see httpd.h. */
#include "operator/httpd.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define REQUEST_MAX 8192

struct op_httpd {
	int fd;
	int port;
	op_httpd_handler handler;
	void *user;
	pthread_t thread;
	atomic_bool stop;
};

static const char *status_text(int code)
{
	switch (code) {
	case 200:
		return "OK";
	case 404:
		return "Not Found";
	case 405:
		return "Method Not Allowed";
	case 400:
		return "Bad Request";
	case 503:
		return "Service Unavailable";
	default:
		return "Error";
	}
}

static void send_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = send(fd, p, n, MSG_NOSIGNAL);

		if (w <= 0)
			return;
		p += w;
		n -= (size_t)w;
	}
}

static void respond(int fd, int code, const char *ctype, const char *body, size_t len)
{
	char head[256];
	int n = snprintf(head, sizeof(head),
	                 "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
	                 "Connection: close\r\n\r\n",
	                 code, status_text(code), ctype, len);

	send_all(fd, head, (size_t)n);
	send_all(fd, body, len);
}

static void serve(struct op_httpd *s, int fd)
{
	char req[REQUEST_MAX + 1], method[16], target[1024];
	const char *ctype = "text/plain; charset=utf-8";
	struct lp_buf body;
	size_t len = 0;
	char *q;
	int code;

	/* headers within 2 s, or give up on the client */
	while (len < REQUEST_MAX) {
		struct pollfd p = {.fd = fd, .events = POLLIN};
		ssize_t n;

		if (poll(&p, 1, 2000) <= 0)
			return;
		n = recv(fd, req + len, REQUEST_MAX - len, 0);
		if (n <= 0)
			return;
		len += (size_t)n;
		req[len] = '\0';
		if (strstr(req, "\r\n\r\n") || strstr(req, "\n\n"))
			break;
	}
	req[len] = '\0';
	if (sscanf(req, "%15s %1023s", method, target) != 2) {
		respond(fd, 400, ctype, "bad request\n", 12);
		return;
	}
	if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
		respond(fd, 405, ctype, "only GET\n", 9);
		return;
	}
	q = strchr(target, '?');
	if (q)
		*q = '\0';
	lp_buf_init(&body, 16u << 20);
	code = s->handler(s->user, target, &body, &ctype);
	respond(fd, code, ctype, strcmp(method, "HEAD") == 0 ? "" : (body.data ? body.data : ""),
	        strcmp(method, "HEAD") == 0 ? 0 : body.len);
	lp_buf_release(&body);
}

static void *httpd_main(void *arg)
{
	struct op_httpd *s = arg;

	while (!atomic_load(&s->stop)) {
		struct pollfd p = {.fd = s->fd, .events = POLLIN};
		int c;

		if (poll(&p, 1, 100) <= 0)
			continue;
		c = accept(s->fd, NULL, NULL);
		if (c < 0)
			continue;
		serve(s, c);
		close(c);
	}
	return NULL;
}

int op_httpd_start(struct op_httpd **out, const char *host, int port, op_httpd_handler h,
                   void *user, struct lp_err *err)
{
	struct op_httpd *s;
	struct sockaddr_in a;
	socklen_t alen = sizeof(a);
	int one = 1;

	*out = NULL;
	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_port = htons((uint16_t)port);
	a.sin_addr.s_addr = htonl(INADDR_ANY);
	if (host && *host && inet_pton(AF_INET, host, &a.sin_addr) != 1)
		return lp_errf(err, -EINVAL, "invalid bind address '%s' (an IPv4 address)", host);
	s = calloc(1, sizeof(*s));
	if (!s)
		return lp_errf(err, -ENOMEM, "out of memory");
	s->handler = h;
	s->user = user;
	s->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s->fd < 0) {
		free(s);
		return lp_errf(err, -errno, "socket: %s", strerror(errno));
	}
	setsockopt(s->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(s->fd, (struct sockaddr *)&a, sizeof(a)) || listen(s->fd, 16) ||
	    getsockname(s->fd, (struct sockaddr *)&a, &alen)) {
		int e = errno;

		close(s->fd);
		free(s);
		return lp_errf(err, -e, "cannot listen on port %d: %s", port, strerror(e));
	}
	s->port = ntohs(a.sin_port);
	if (pthread_create(&s->thread, NULL, httpd_main, s)) {
		close(s->fd);
		free(s);
		return lp_errf(err, -EAGAIN, "cannot start the http thread");
	}
	*out = s;
	return 0;
}

int op_httpd_port(const struct op_httpd *s)
{
	return s->port;
}

void op_httpd_stop(struct op_httpd *s)
{
	if (!s)
		return;
	atomic_store(&s->stop, true);
	pthread_join(s->thread, NULL);
	close(s->fd);
	free(s);
}
