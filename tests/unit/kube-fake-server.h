/* A tiny scripted HTTP/1.1 server for the Kubernetes client tests: one
 * thread, one connection at a time, "Connection: close". The handler
 * sees each request and writes the whole response to the socket itself
 * (so it can stream chunked watch bodies). Header-only; test use only. */
#ifndef LP_TESTS_KUBE_FAKE_SERVER_H
#define LP_TESTS_KUBE_FAKE_SERVER_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

struct fake_request {
	char method[16];
	char path[2048];
	char auth[512];   /* Authorization header value */
	char ctype[128];  /* Content-Type header value */
	char body[65536]; /* request body (truncated) */
};

typedef void (*fake_handler)(int fd, const struct fake_request *req, void *user);

struct fake_server {
	int listen_fd;
	int port;
	pthread_t thread;
	atomic_bool stop;
	fake_handler handler;
	void *user;
	atomic_int nrequests;
};

static inline void fake_write(int fd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static inline void fake_write(int fd, const char *fmt, ...)
{
	char *s = NULL;
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vasprintf(&s, fmt, ap);
	va_end(ap);
	if (n > 0) {
		ssize_t off = 0;

		while (off < n) {
			ssize_t w = send(fd, s + off, (size_t)(n - off), MSG_NOSIGNAL);

			if (w <= 0)
				break;
			off += w;
		}
	}
	free(s);
}

/* A complete response with a JSON (or any) body. */
static inline void fake_respond(int fd, int code, const char *body)
{
	fake_write(fd,
	           "HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
	           "Connection: close\r\n\r\n%s",
	           code, strlen(body), body);
}

/* Chunked streaming: start, one chunk per call, end. */
static inline void fake_stream_begin(int fd)
{
	fake_write(fd, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
	               "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
}

static inline void fake_stream_chunk(int fd, const char *data)
{
	fake_write(fd, "%zx\r\n%s\r\n", strlen(data), data);
}

static inline void fake_stream_end(int fd)
{
	fake_write(fd, "0\r\n\r\n");
}

static inline void fake_header(const char *headers, const char *name, char *out, size_t size)
{
	const char *p = headers;
	size_t n = strlen(name);

	out[0] = '\0';
	while ((p = strstr(p, "\r\n")) != NULL) {
		p += 2;
		if (strncasecmp(p, name, n) == 0 && p[n] == ':') {
			const char *v = p + n + 1, *end;

			while (*v == ' ')
				v++;
			end = strstr(v, "\r\n");
			if (!end)
				end = v + strlen(v);
			snprintf(out, size, "%.*s", (int)(end - v), v);
			return;
		}
	}
}

static inline void fake_serve_one(struct fake_server *s, int fd)
{
	static char buf[1 << 17];
	struct fake_request *req = calloc(1, sizeof(*req));
	size_t len = 0;
	char *end = NULL, cl[32];
	long want;

	if (!req)
		return;
	while (len < sizeof(buf) - 1) {
		ssize_t n = recv(fd, buf + len, sizeof(buf) - 1 - len, 0);

		if (n <= 0)
			goto out;
		len += (size_t)n;
		buf[len] = '\0';
		end = strstr(buf, "\r\n\r\n");
		if (end)
			break;
	}
	if (!end)
		goto out;
	*end = '\0';
	fake_header(buf, "Content-Length", cl, sizeof(cl));
	want = cl[0] ? strtol(cl, NULL, 10) : 0;
	while ((long)(len - (size_t)(end + 4 - buf)) < want && len < sizeof(buf) - 1) {
		ssize_t n = recv(fd, buf + len, sizeof(buf) - 1 - len, 0);

		if (n <= 0)
			break;
		len += (size_t)n;
	}
	buf[len] = '\0';
	sscanf(buf, "%15s %2047s", req->method, req->path);
	fake_header(buf, "Authorization", req->auth, sizeof(req->auth));
	fake_header(buf, "Content-Type", req->ctype, sizeof(req->ctype));
	snprintf(req->body, sizeof(req->body), "%s", end + 4);
	atomic_fetch_add(&s->nrequests, 1);
	s->handler(fd, req, s->user);
out:
	free(req);
}

static inline void *fake_server_main(void *arg)
{
	struct fake_server *s = arg;

	while (!atomic_load(&s->stop)) {
		struct pollfd p = {.fd = s->listen_fd, .events = POLLIN};
		int fd;

		if (poll(&p, 1, 50) <= 0)
			continue;
		fd = accept(s->listen_fd, NULL, NULL);
		if (fd < 0)
			continue;
		fake_serve_one(s, fd);
		shutdown(fd, SHUT_RDWR);
		close(fd);
	}
	return NULL;
}

static inline int fake_server_start(struct fake_server *s, fake_handler h, void *user)
{
	struct sockaddr_in a;
	socklen_t alen = sizeof(a);
	int one = 1;

	memset(s, 0, sizeof(*s));
	s->handler = h;
	s->user = user;
	s->listen_fd = socket(AF_INET, SOCK_STREAM, 0);
	if (s->listen_fd < 0)
		return -1;
	setsockopt(s->listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(s->listen_fd, (struct sockaddr *)&a, sizeof(a)) || listen(s->listen_fd, 16) ||
	    getsockname(s->listen_fd, (struct sockaddr *)&a, &alen)) {
		close(s->listen_fd);
		return -1;
	}
	s->port = ntohs(a.sin_port);
	return pthread_create(&s->thread, NULL, fake_server_main, s) ? -1 : 0;
}

static inline void fake_server_stop(struct fake_server *s)
{
	atomic_store(&s->stop, true);
	pthread_join(s->thread, NULL);
	close(s->listen_fd);
}

#endif
