/* HTTP GET with retries, caps and streaming SHA-256; see http-fetch.h. */
#include "agent/adapters/http-fetch.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>

/* Error bodies past this are cut off (the start holds the reason). */
#define ERROR_BODY_KEEP (64 * 1024)

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc = CURLE_OK;

static void curl_init_once(void)
{
	curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

/* State of one try. */
struct xfer {
	const struct lp_http_get *g;
	struct lp_http_result *res;
	CURL *curl;
	bool started;  /* the first body byte of the final response arrived */
	bool is_error; /* the final response is not 2xx */
	bool too_big;
	bool error_cut; /* we stopped reading an overlong error body */
	int io_errno;
	int fd;
	EVP_MD_CTX *md;
	size_t error_len;
	size_t error_seen;
	uint64_t cap;
	long retry_after_s;
	char error_header[256];
};

int lp_http_status_errno(long status)
{
	if (status >= 200 && status < 300)
		return 0;
	if (status == 401 || status == 403)
		return -EACCES;
	if (status == 404 || status == 410)
		return -ENOENT;
	return -EIO;
}

int lp_http_client_init(struct lp_http_client *c, const struct lp_http_policy *policy,
                        struct lp_err *err)
{
	struct timespec ts;

	memset(c, 0, sizeof(*c));
	pthread_once(&curl_once, curl_init_once);
	if (curl_init_rc != CURLE_OK)
		return lp_errf(err, -EIO, "cannot initialise libcurl: %s",
		               curl_easy_strerror(curl_init_rc));
	c->policy = *policy;
	if (c->policy.max_attempts < 1)
		c->policy.max_attempts = 1;
	if (policy->ca_bundle) {
		size_t n = strlen(policy->ca_bundle);
		if (n >= sizeof(c->ca_bundle))
			return lp_errf(err, -ENAMETOOLONG, "CA bundle path is too long");
		memcpy(c->ca_bundle, policy->ca_bundle, n + 1);
		c->policy.ca_bundle = c->ca_bundle;
	}
	c->curl = curl_easy_init();
	if (!c->curl)
		return lp_errf(err, -ENOMEM, "cannot create a curl handle");
	clock_gettime(CLOCK_MONOTONIC, &ts);
	c->seed = (unsigned int)(ts.tv_nsec ^ ts.tv_sec ^ (long)getpid() ^ (long)(uintptr_t)c);
	return 0;
}

void lp_http_client_release(struct lp_http_client *c)
{
	if (!c)
		return;
	if (c->curl)
		curl_easy_cleanup(c->curl);
	c->curl = NULL;
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return errno;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

/* The first body byte of the final response: decide where the body goes
 * and check its announced size. Returns false to abort the try. */
static bool xfer_start(struct xfer *x)
{
	const struct lp_http_get *g = x->g;
	curl_off_t length = -1;
	long status = 0;

	x->started = true;
	curl_easy_getinfo(x->curl, CURLINFO_RESPONSE_CODE, &status);
	x->is_error = status < 200 || status >= 300;
	if (x->is_error)
		return true;
	curl_easy_getinfo(x->curl, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &length);
	if (length >= 0 && (uint64_t)length > x->cap) {
		x->too_big = true;
		return false;
	}
	if (g->path) {
		x->fd = open(g->path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
		if (x->fd < 0) {
			x->io_errno = errno;
			return false;
		}
	}
	return true;
}

static size_t on_body(char *p, size_t size, size_t nmemb, void *arg)
{
	struct xfer *x = arg;
	size_t n = size * nmemb;

	if (!x->started && !xfer_start(x))
		return 0;
	if (x->is_error) {
		size_t room = sizeof(x->res->error_body) - 1 - x->error_len;
		size_t keep = n < room ? n : room;
		memcpy(x->res->error_body + x->error_len, p, keep);
		x->error_len += keep;
		x->res->error_body[x->error_len] = '\0';
		x->error_seen += n;
		if (x->error_seen > ERROR_BODY_KEEP) {
			x->error_cut = true;
			return 0;
		}
		return n;
	}
	if (n > x->cap - x->res->bytes) {
		x->too_big = true;
		return 0;
	}
	if (x->g->path) {
		int e = write_all(x->fd, p, n);
		if (e) {
			x->io_errno = e;
			return 0;
		}
		if (EVP_DigestUpdate(x->md, p, n) != 1) {
			x->io_errno = ENOMEM;
			return 0;
		}
	} else if (lp_buf_append(x->g->body, p, n, NULL) < 0) {
		x->too_big = true;
		return 0;
	}
	x->res->bytes += n;
	if (x->g->progress)
		x->g->progress(x->g->progress_arg, x->res->bytes);
	return n;
}

/* Header lines of every response in a redirect chain: keep what the final
 * one says about retrying and errors. */
static size_t on_header(char *p, size_t size, size_t nmemb, void *arg)
{
	struct xfer *x = arg;
	size_t n = size * nmemb, len = n;
	const char *v;

	while (len > 0 && (p[len - 1] == '\n' || p[len - 1] == '\r'))
		len--;
	if (len >= 5 && strncmp(p, "HTTP/", 5) == 0) {
		x->retry_after_s = 0;
		x->error_header[0] = '\0';
		return n;
	}
	if (len > 12 && strncasecmp(p, "retry-after:", 12) == 0) {
		char tmp[32];
		size_t k = len - 12 < sizeof(tmp) - 1 ? len - 12 : sizeof(tmp) - 1;
		char *end;
		long s;
		memcpy(tmp, p + 12, k);
		tmp[k] = '\0';
		s = strtol(tmp, &end, 10);
		/* HTTP dates are ignored: the backoff applies */
		if (end != tmp && s > 0)
			x->retry_after_s = s;
	} else if (len > 16 && strncasecmp(p, "x-error-message:", 16) == 0) {
		v = p + 16;
		while (v < p + len && *v == ' ')
			v++;
		size_t k = (size_t)(p + len - v);
		if (k >= sizeof(x->error_header))
			k = sizeof(x->error_header) - 1;
		memcpy(x->error_header, v, k);
		x->error_header[k] = '\0';
	}
	return n;
}

static bool retryable_curl(CURLcode rc)
{
	switch (rc) {
	case CURLE_COULDNT_RESOLVE_HOST:
	case CURLE_COULDNT_RESOLVE_PROXY:
	case CURLE_COULDNT_CONNECT:
	case CURLE_OPERATION_TIMEDOUT:
	case CURLE_PARTIAL_FILE:
	case CURLE_GOT_NOTHING:
	case CURLE_SEND_ERROR:
	case CURLE_RECV_ERROR:
	case CURLE_SSL_CONNECT_ERROR:
	case CURLE_HTTP2:
	case CURLE_HTTP2_STREAM:
	case CURLE_HTTP3:
		return true;
	default:
		return false;
	}
}

static bool retryable_status(long status)
{
	return status == 429 || status >= 500;
}

static void backoff_sleep(struct lp_http_client *c, int attempt, long retry_after_s)
{
	long base = c->policy.backoff_initial_ms > 0 ? c->policy.backoff_initial_ms : 1;
	long cap = c->policy.backoff_max_ms > base ? c->policy.backoff_max_ms : base;
	long delay = base;
	struct timespec ts;

	for (int i = 1; i < attempt && delay < cap; i++)
		delay *= 2;
	if (delay > cap)
		delay = cap;
	/* "equal jitter": half fixed, half random, so that many loaders
	 * failing together do not come back together */
	delay = delay / 2 + (long)(rand_r(&c->seed) % (unsigned long)(delay / 2 + 1));
	if (retry_after_s > 0) {
		long ra = retry_after_s > cap / 1000 + 1 ? cap : retry_after_s * 1000;
		if (ra > cap)
			ra = cap;
		if (ra > delay)
			delay = ra;
	}
	ts.tv_sec = delay / 1000;
	ts.tv_nsec = (delay % 1000) * 1000000L;
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* Sets every option of one try; curl_easy_reset keeps the connections. */
static int setup_try(struct lp_http_client *c, const struct lp_http_get *g, struct xfer *x,
                     struct curl_slist *headers, char *errbuf)
{
	CURL *h = c->curl;
	const struct lp_http_policy *p = &c->policy;
	bool https = strncasecmp(g->url, "https://", 8) == 0;
	CURLcode rc = CURLE_OK;

#define SET(opt, val)                                                                              \
	do {                                                                                       \
		if (rc == CURLE_OK)                                                                \
			rc = curl_easy_setopt(h, opt, val);                                        \
	} while (0)
	curl_easy_reset(h);
	SET(CURLOPT_URL, g->url);
	SET(CURLOPT_HTTPGET, 1L);
	SET(CURLOPT_NOSIGNAL, 1L);
	SET(CURLOPT_PROTOCOLS_STR, "http,https");
	SET(CURLOPT_REDIR_PROTOCOLS_STR, https ? "https" : "http,https");
	SET(CURLOPT_FOLLOWLOCATION, g->follow_redirects ? 1L : 0L);
	SET(CURLOPT_MAXREDIRS, 10L);
	/* Authorization (an HF token, a SigV4 signature) never follows a
	 * redirect to another host, port or scheme (curl's default, stated) */
	SET(CURLOPT_UNRESTRICTED_AUTH, 0L);
	SET(CURLOPT_CONNECTTIMEOUT, p->connect_timeout_s > 0 ? p->connect_timeout_s : 10L);
	if (p->low_speed_time_s > 0 && p->low_speed_bytes > 0) {
		SET(CURLOPT_LOW_SPEED_LIMIT, p->low_speed_bytes);
		SET(CURLOPT_LOW_SPEED_TIME, p->low_speed_time_s);
	}
	if (g->body && p->memory_timeout_s > 0)
		SET(CURLOPT_TIMEOUT, p->memory_timeout_s);
	SET(CURLOPT_TCP_KEEPALIVE, 1L);
	SET(CURLOPT_USERAGENT, "loraplane-agent");
	SET(CURLOPT_HTTPHEADER, headers);
	SET(CURLOPT_WRITEFUNCTION, on_body);
	SET(CURLOPT_WRITEDATA, x);
	SET(CURLOPT_HEADERFUNCTION, on_header);
	SET(CURLOPT_HEADERDATA, x);
	SET(CURLOPT_ERRORBUFFER, errbuf);
	if (p->ca_bundle)
		SET(CURLOPT_CAINFO, p->ca_bundle);
#undef SET
	return rc == CURLE_OK ? 0 : -1;
}

/* Builds the header list of one try: the fixed lines, then headers_fn's. */
static int build_headers(const struct lp_http_get *g, struct curl_slist **out, struct lp_err *err)
{
	struct curl_slist *list = NULL, *t;
	int rc;

	/* no "Expect:" games and no compression: the bytes are the file */
	t = curl_slist_append(list, "Accept-Encoding: identity");
	if (!t)
		goto out_nomem;
	list = t;
	for (const char *const *h = g->headers; h && *h; h++) {
		t = curl_slist_append(list, *h);
		if (!t)
			goto out_nomem;
		list = t;
	}
	if (g->headers_fn && (rc = g->headers_fn(g->headers_arg, &list, err)) < 0) {
		curl_slist_free_all(list);
		return rc;
	}
	*out = list;
	return 0;
out_nomem:
	curl_slist_free_all(list);
	return lp_errf(err, -ENOMEM, "out of memory building request headers");
}

int lp_http_get(struct lp_http_client *c, const struct lp_http_get *g, struct lp_http_result *res,
                struct lp_err *err)
{
	char errbuf[CURL_ERROR_SIZE];
	struct xfer x;
	int rc = 0;

	memset(res, 0, sizeof(*res));
	if (!g->url || (!g->body == !g->path))
		return lp_errf(err, -EINVAL, "a GET needs a url and exactly one sink");
	for (int attempt = 1; attempt <= c->policy.max_attempts; attempt++) {
		struct curl_slist *headers = NULL;
		CURLcode crc;
		long status = 0;
		bool last = attempt == c->policy.max_attempts;

		memset(&x, 0, sizeof(x));
		x.g = g;
		x.res = res;
		x.curl = c->curl;
		x.fd = -1;
		res->status = 0;
		res->bytes = 0;
		res->error_body[0] = '\0';
		res->attempts = attempt;
		errbuf[0] = '\0';
		if (g->body)
			lp_buf_reset(g->body);
		x.cap = g->path ? g->max_bytes : g->body->max;
		if (g->path) {
			x.md = EVP_MD_CTX_new();
			if (!x.md || EVP_DigestInit_ex(x.md, EVP_sha256(), NULL) != 1) {
				EVP_MD_CTX_free(x.md);
				return lp_errf(err, -ENOMEM, "cannot start a SHA-256 digest");
			}
		}
		if ((rc = build_headers(g, &headers, err)) < 0) {
			EVP_MD_CTX_free(x.md);
			return rc;
		}
		if (setup_try(c, g, &x, headers, errbuf) < 0) {
			curl_slist_free_all(headers);
			EVP_MD_CTX_free(x.md);
			return lp_errf(err, -EIO, "cannot set up a request to '%s'", g->url);
		}
		crc = curl_easy_perform(c->curl);
		curl_slist_free_all(headers);
		curl_easy_getinfo(c->curl, CURLINFO_RESPONSE_CODE, &status);
		memcpy(res->error_header, x.error_header, sizeof(res->error_header));

		if (crc == CURLE_OK && g->path && status >= 200 && status < 300 && x.fd < 0 &&
		    !xfer_start(&x))
			crc = CURLE_WRITE_ERROR; /* an empty body still makes a file */
		if (x.fd >= 0) {
			if (crc == CURLE_OK && fsync(x.fd) < 0)
				x.io_errno = errno;
			if (close(x.fd) < 0 && crc == CURLE_OK && !x.io_errno)
				x.io_errno = errno;
		}
		if (x.md) {
			unsigned char md[EVP_MAX_MD_SIZE];
			unsigned int mdlen = 0;
			static const char digits[] = "0123456789abcdef";
			if (EVP_DigestFinal_ex(x.md, md, &mdlen) == 1 && mdlen == 32) {
				for (unsigned int i = 0; i < mdlen; i++) {
					res->sha256[2 * i] = digits[md[i] >> 4];
					res->sha256[2 * i + 1] = digits[md[i] & 15];
				}
				res->sha256[64] = '\0';
			}
			EVP_MD_CTX_free(x.md);
			x.md = NULL;
		}

		if (x.too_big)
			return lp_errf(err, -EFBIG, "'%s' is larger than the limit of %llu bytes",
			               g->url, (unsigned long long)x.cap);
		if (x.io_errno)
			return lp_errf(err, -x.io_errno, "cannot write '%s': %s", g->path,
			               strerror(x.io_errno));
		if (crc == CURLE_OK || (crc == CURLE_WRITE_ERROR && x.error_cut)) {
			res->status = status;
			if (retryable_status(status) && !last) {
				backoff_sleep(c, attempt, x.retry_after_s);
				continue;
			}
			return 0;
		}
		if (retryable_curl(crc) && !last) {
			backoff_sleep(c, attempt, 0);
			continue;
		}
		return lp_errf(err, -EIO, "GET '%s' failed after %d %s: %s", g->url, attempt,
		               attempt == 1 ? "try" : "tries",
		               errbuf[0] ? errbuf : curl_easy_strerror(crc));
	}
	return rc;
}
