/* The operator's probe and metrics server on civetweb; see httpd.h. */
#include "operator/httpd.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <civetweb.h>

#define BODY_MAX (16u << 20)

struct op_httpd {
	struct mg_context *ctx;
	int port;
	op_httpd_handler handler;
	void *user;
};

/* Writes a whole response; HEAD gets the headers of the GET answer
 * (Content-Length included) and no body. */
static void respond(struct mg_connection *conn, int code, const char *ctype, const char *extra,
                    const char *body, size_t len, bool head)
{
	mg_printf(conn,
	          "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
	          "Cache-Control: no-store\r\nConnection: close\r\n%s\r\n",
	          code, mg_get_response_code_text(conn, code), ctype, len, extra);
	if (!head && len > 0)
		mg_write(conn, body, len);
}

/* Every path and method: GET and HEAD go to the caller's handler. */
static int handle(struct mg_connection *conn, void *cbdata)
{
	static const char not_allowed[] = "method not allowed: use GET or HEAD\n";
	const struct mg_request_info *ri = mg_get_request_info(conn);
	const char *ctype = "text/plain; charset=utf-8";
	struct op_httpd *s = cbdata;
	struct lp_buf body;
	bool head = !strcmp(ri->request_method, "HEAD");
	int code;

	if (!head && strcmp(ri->request_method, "GET")) {
		respond(conn, 405, ctype, "Allow: GET, HEAD\r\n", not_allowed,
		        sizeof(not_allowed) - 1, false);
		return 405;
	}
	lp_buf_init(&body, BODY_MAX);
	code = s->handler(s->user, ri->local_uri ? ri->local_uri : "/", &body, &ctype);
	respond(conn, code, ctype, "", body.data, body.len, head);
	lp_buf_release(&body);
	return code;
}

/* civetweb's own messages: the start error comes back through
 * mg_start2's error data, and library code does not print. */
static int quiet(const struct mg_connection *conn, const char *message)
{
	return 1;
}

/* Why civetweb could not listen, for the message: binds a socket of our
 * own to the same address and returns its errno (0 when that works). */
static int bind_errno(const struct in_addr *host, int port)
{
	struct sockaddr_in sa;
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1, e = 0;

	if (fd < 0)
		return errno;
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)port);
	sa.sin_addr.s_addr = host ? host->s_addr : htonl(INADDR_ANY);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)))
		e = errno;
	close(fd);
	return e;
}

int op_httpd_start(struct op_httpd **out, const char *host, int port, op_httpd_handler h,
                   void *user, struct lp_err *err)
{
	char ports[64], msg[256] = "";
	/* pairs of name and value; no document_root: civetweb serves no file
	 * and lists no directory */
	const char *opts[] = {"listening_ports",
	                      ports,
	                      "num_threads",
	                      "2",
	                      "connection_queue",
	                      "16",
	                      "listen_backlog",
	                      "16",
	                      "max_request_size",
	                      "8192",
	                      "request_timeout_ms",
	                      "3000",
	                      "enable_keep_alive",
	                      "no",
	                      "enable_directory_listing",
	                      "no",
	                      "access_control_allow_origin",
	                      "",
	                      NULL};
	struct in_addr a;
	struct mg_callbacks cbs;
	struct mg_init_data init;
	struct mg_error_data ed;
	struct mg_server_port sp[2];
	struct op_httpd *s;
	unsigned code = 0;

	*out = NULL;
	if (port < 0 || port > 65535)
		return lp_errf(err, -EINVAL, "invalid port %d (0..65535)", port);
	if (host && *host && inet_pton(AF_INET, host, &a) != 1)
		return lp_errf(err, -EINVAL, "invalid bind address '%s' (an IPv4 address)", host);
	if (host && *host)
		snprintf(ports, sizeof(ports), "%s:%d", host, port);
	else
		snprintf(ports, sizeof(ports), "%d", port);
	s = calloc(1, sizeof(*s));
	if (!s)
		return lp_errf(err, -ENOMEM, "out of memory");
	s->handler = h;
	s->user = user;
	mg_init_library(0);
	memset(&cbs, 0, sizeof(cbs));
	cbs.log_message = quiet;
	memset(&init, 0, sizeof(init));
	init.callbacks = &cbs;
	init.user_data = s;
	init.configuration_options = opts;
	memset(&ed, 0, sizeof(ed));
	ed.code = &code;
	ed.text = msg;
	ed.text_buffer_size = sizeof(msg);
	s->ctx = mg_start2(&init, &ed);
	if (!s->ctx) {
		int e = bind_errno(host && *host ? &a : NULL, port);

		free(s);
		mg_exit_library();
		if (e)
			return lp_errf(err, -e, "cannot listen on '%s': %s", ports, strerror(e));
		return lp_errf(err, -EADDRINUSE, "cannot listen on '%s': %s", ports,
		               msg[0] ? msg : "unknown error");
	}
	mg_set_request_handler(s->ctx, "**", handle, s);
	s->port = port;
	if (mg_get_server_ports(s->ctx, 2, sp) >= 1)
		s->port = sp[0].port;
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
	mg_stop(s->ctx);
	mg_exit_library();
	free(s);
}
