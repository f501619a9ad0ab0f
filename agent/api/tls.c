/* TLS termination in front of civetweb; see tls.h. */
#include "agent/api/tls.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "agent/api/socket.h"

#define HANDSHAKE_TIMEOUT_S 10
#define WRITE_TIMEOUT_MS    60000
#define RELAY_BUF           16384

/* The libssl functions used, looked up at run time. */
static struct {
	int (*init)(uint64_t opts, const OPENSSL_INIT_SETTINGS *settings);
	const SSL_METHOD *(*server_method)(void);
	SSL_CTX *(*ctx_new)(const SSL_METHOD *m);
	void (*ctx_free)(SSL_CTX *c);
	int (*use_chain)(SSL_CTX *c, const char *file);
	int (*use_key)(SSL_CTX *c, const char *file, int type);
	int (*check_key)(const SSL_CTX *c);
	long (*ctx_ctrl)(SSL_CTX *c, int cmd, long larg, void *parg);
	SSL *(*ssl_new)(SSL_CTX *c);
	void (*ssl_free)(SSL *s);
	int (*set_fd)(SSL *s, int fd);
	int (*accept)(SSL *s);
	int (*read)(SSL *s, void *buf, int n);
	int (*write)(SSL *s, const void *buf, int n);
	int (*pending)(const SSL *s);
	int (*get_error)(const SSL *s, int ret);
	int (*shutdown)(SSL *s);
} ssl;

static pthread_once_t ssl_once = PTHREAD_ONCE_INIT;
static char ssl_load_error[256];

static void load_libssl(void)
{
	static const struct {
		const char *name;
		size_t offset;
	} fns[] = {
	    {"OPENSSL_init_ssl", offsetof(__typeof__(ssl), init)},
	    {"TLS_server_method", offsetof(__typeof__(ssl), server_method)},
	    {"SSL_CTX_new", offsetof(__typeof__(ssl), ctx_new)},
	    {"SSL_CTX_free", offsetof(__typeof__(ssl), ctx_free)},
	    {"SSL_CTX_use_certificate_chain_file", offsetof(__typeof__(ssl), use_chain)},
	    {"SSL_CTX_use_PrivateKey_file", offsetof(__typeof__(ssl), use_key)},
	    {"SSL_CTX_check_private_key", offsetof(__typeof__(ssl), check_key)},
	    {"SSL_CTX_ctrl", offsetof(__typeof__(ssl), ctx_ctrl)},
	    {"SSL_new", offsetof(__typeof__(ssl), ssl_new)},
	    {"SSL_free", offsetof(__typeof__(ssl), ssl_free)},
	    {"SSL_set_fd", offsetof(__typeof__(ssl), set_fd)},
	    {"SSL_accept", offsetof(__typeof__(ssl), accept)},
	    {"SSL_read", offsetof(__typeof__(ssl), read)},
	    {"SSL_write", offsetof(__typeof__(ssl), write)},
	    {"SSL_pending", offsetof(__typeof__(ssl), pending)},
	    {"SSL_get_error", offsetof(__typeof__(ssl), get_error)},
	    {"SSL_shutdown", offsetof(__typeof__(ssl), shutdown)},
	};
	void *h = dlopen("libssl.so.3", RTLD_NOW | RTLD_LOCAL);

	if (!h)
		h = dlopen("libssl.so", RTLD_NOW | RTLD_LOCAL);
	if (!h) {
		snprintf(ssl_load_error, sizeof(ssl_load_error), "cannot load libssl: %s",
		         dlerror());
		return;
	}
	for (size_t i = 0; i < sizeof(fns) / sizeof(fns[0]); i++) {
		void *f = dlsym(h, fns[i].name);
		if (!f) {
			snprintf(ssl_load_error, sizeof(ssl_load_error),
			         "libssl has no '%s' (OpenSSL 1.1 or later is needed)",
			         fns[i].name);
			return;
		}
		memcpy((char *)&ssl + fns[i].offset, &f, sizeof(f));
	}
	ssl.init(0, NULL);
}

/* The first OpenSSL error queued, for messages. */
static const char *ssl_error_text(char *buf, size_t cap)
{
	unsigned long e = ERR_get_error();

	if (!e)
		return "unknown TLS error";
	ERR_error_string_n(e, buf, cap);
	ERR_clear_error();
	return buf;
}

struct lp_tls_proxy {
	SSL_CTX *ctx;
	struct lp_listener listener;
	int backend_port;
	int max_conns;
	atomic_int conns;
};

struct conn {
	struct lp_tls_proxy *p;
	int fd;
};

/* ---- relaying ---- */

static bool wait_fd(int fd, short events, int timeout_ms)
{
	struct pollfd pf = {fd, events, 0};
	int r;

	do
		r = poll(&pf, 1, timeout_ms);
	while (r < 0 && errno == EINTR);
	return r > 0;
}

static bool ssl_write_all(SSL *s, int fd, const char *b, int n)
{
	while (n > 0) {
		int w = ssl.write(s, b, n);
		if (w > 0) {
			b += w;
			n -= w;
			continue;
		}
		switch (ssl.get_error(s, w)) {
		case SSL_ERROR_WANT_WRITE:
			if (!wait_fd(fd, POLLOUT, WRITE_TIMEOUT_MS))
				return false;
			break;
		case SSL_ERROR_WANT_READ:
			if (!wait_fd(fd, POLLIN, WRITE_TIMEOUT_MS))
				return false;
			break;
		default:
			return false;
		}
	}
	return true;
}

/* Moves bytes both ways until either side closes. */
static void relay(SSL *s, int cfd, int bfd)
{
	char *buf = malloc(RELAY_BUF);

	if (!buf)
		return;
	for (;;) {
		struct pollfd pf[2] = {{cfd, POLLIN, 0}, {bfd, POLLIN, 0}};
		if (ssl.pending(s) > 0) {
			pf[0].revents = POLLIN;
		} else {
			int r = poll(pf, 2, 1000);
			if (r < 0 && errno != EINTR)
				break;
			if (r <= 0)
				continue;
		}
		if (pf[0].revents) {
			bool closed = false;
			for (;;) {
				int n = ssl.read(s, buf, RELAY_BUF);
				if (n > 0) {
					if (!lp_socket_send_all(bfd, buf, (size_t)n)) {
						closed = true;
						break;
					}
					continue;
				}
				int e = ssl.get_error(s, n);
				if (e == SSL_ERROR_WANT_READ)
					break;
				if (e == SSL_ERROR_WANT_WRITE &&
				    wait_fd(cfd, POLLOUT, WRITE_TIMEOUT_MS))
					continue;
				closed = true; /* close_notify, reset or a TLS error */
				break;
			}
			if (closed)
				break;
		}
		if (pf[1].revents) {
			ssize_t n = recv(bfd, buf, RELAY_BUF, 0);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0 || !ssl_write_all(s, cfd, buf, (int)n))
				break;
		}
	}
	free(buf);
}

static void *conn_main(void *arg)
{
	struct conn *c = arg;
	struct lp_tls_proxy *p = c->p;
	struct timeval tv = {HANDSHAKE_TIMEOUT_S, 0};
	struct timeval none = {0, 0};
	int cfd = c->fd, bfd = -1, one = 1;
	SSL *s;

	free(c);
	setsockopt(cfd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(cfd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	s = ssl.ssl_new(p->ctx);
	if (!s || ssl.set_fd(s, cfd) != 1 || ssl.accept(s) != 1)
		goto out; /* a failed handshake: nothing to tell anyone */
	setsockopt(cfd, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof(none));
	setsockopt(cfd, SOL_SOCKET, SO_SNDTIMEO, &none, sizeof(none));
	fcntl(cfd, F_SETFL, fcntl(cfd, F_GETFL) | O_NONBLOCK);
	bfd = lp_socket_connect_loopback(p->backend_port, 0);
	if (bfd >= 0)
		relay(s, cfd, bfd);
	ssl.shutdown(s);
out:
	ERR_clear_error();
	if (s)
		ssl.ssl_free(s);
	if (bfd >= 0)
		close(bfd);
	close(cfd);
	atomic_fetch_sub(&p->conns, 1);
	return NULL;
}

/* The listener's callback: a thread per connection, up to the cap. */
static void on_accept(void *arg, int fd)
{
	struct lp_tls_proxy *p = arg;
	pthread_attr_t attr;
	pthread_t th;
	struct conn *c;

	if (atomic_load(&p->conns) >= p->max_conns) {
		close(fd); /* no TLS yet: nothing can be said to it */
		return;
	}
	c = malloc(sizeof(*c));
	if (!c) {
		close(fd);
		return;
	}
	c->p = p;
	c->fd = fd;
	atomic_fetch_add(&p->conns, 1);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&th, &attr, conn_main, c)) {
		atomic_fetch_sub(&p->conns, 1);
		close(fd);
		free(c);
	}
	pthread_attr_destroy(&attr);
}

/* ---- setup ---- */

int lp_tls_proxy_start(struct lp_tls_proxy **out, const char *host, int port, int backend_port,
                       int max_conns, const char *cert, const char *key, struct lp_err *err)
{
	struct lp_tls_proxy *p;
	char ebuf[256];
	int rc;

	*out = NULL;
	pthread_once(&ssl_once, load_libssl);
	if (ssl_load_error[0])
		return lp_errf(err, -ENOTSUP, "TLS is not available: %s", ssl_load_error);
	p = calloc(1, sizeof(*p));
	if (!p)
		return lp_errf(err, -ENOMEM, "out of memory");
	lp_listener_init(&p->listener);
	p->backend_port = backend_port;
	p->max_conns = max_conns > 0 ? max_conns : 1024;
	atomic_init(&p->conns, 0);
	p->ctx = ssl.ctx_new(ssl.server_method());
	if (!p->ctx) {
		rc = lp_errf(err, -ENOMEM, "cannot create a TLS context: %s",
		             ssl_error_text(ebuf, sizeof(ebuf)));
		goto fail;
	}
	ssl.ctx_ctrl(p->ctx, SSL_CTRL_SET_MIN_PROTO_VERSION, TLS1_2_VERSION, NULL);
	ssl.ctx_ctrl(p->ctx, SSL_CTRL_MODE,
	             SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, NULL);
	if (ssl.use_chain(p->ctx, cert) != 1) {
		rc = lp_errf(err, -EINVAL, "TLS certificate '%s': %s", cert,
		             ssl_error_text(ebuf, sizeof(ebuf)));
		goto fail;
	}
	if (ssl.use_key(p->ctx, key, SSL_FILETYPE_PEM) != 1) {
		rc = lp_errf(err, -EINVAL, "TLS key '%s': %s", key,
		             ssl_error_text(ebuf, sizeof(ebuf)));
		goto fail;
	}
	if (ssl.check_key(p->ctx) != 1) {
		rc = lp_errf(err, -EINVAL, "TLS key '%s' does not match the certificate '%s'", key,
		             cert);
		goto fail;
	}
	if ((rc = lp_listener_start(&p->listener, host, port, 128, on_accept, p, "TLS", err)))
		goto fail;
	*out = p;
	return 0;
fail:
	lp_tls_proxy_free(p, 0);
	return rc;
}

int lp_tls_proxy_port(const struct lp_tls_proxy *p)
{
	return p->listener.port;
}

void lp_tls_proxy_close(struct lp_tls_proxy *p)
{
	if (!p)
		return;
	lp_listener_stop(&p->listener);
}

void lp_tls_proxy_free(struct lp_tls_proxy *p, int wait_ms)
{
	if (!p)
		return;
	lp_tls_proxy_close(p);
	for (int waited = 0; atomic_load(&p->conns) > 0 && waited < wait_ms; waited += 10) {
		struct timespec ts = {0, 10000000L};
		nanosleep(&ts, NULL);
	}
	if (atomic_load(&p->conns) > 0)
		return; /* relays still hold p: leave it to the process exit */
	if (p->ctx)
		ssl.ctx_free(p->ctx);
	free(p);
}
