/* HTTP GET with libcurl for adapter downloads.
 *
 * One lp_http_client per thread at a time: it owns a curl easy handle, so
 * the files of one adapter reuse one connection. A GET is retried with
 * exponential backoff and jitter on connection errors, timeouts, 429 and
 * 5xx (a Retry-After in seconds is honoured up to the backoff cap), never
 * on other 4xx. Bodies go to a capped memory buffer or to a file
 * whose SHA-256 is computed as it is written; the size cap is checked
 * against Content-Length before the first byte is stored and again while
 * streaming. The body of an error response never reaches the sink: its
 * start is kept in the result for the error message. */
#ifndef LP_ADAPTERS_HTTP_FETCH_H
#define LP_ADAPTERS_HTTP_FETCH_H

#include <stdbool.h>
#include <stdint.h>

#include <curl/curl.h>

#include "common/buf.h"
#include "common/err.h"

struct lp_http_policy {
	int max_attempts;        /* tries per GET, >= 1 */
	long backoff_initial_ms; /* delay before the second try; doubles after each */
	long backoff_max_ms;     /* cap on one delay (and on a Retry-After) */
	long connect_timeout_s;
	long low_speed_bytes;  /* abort a try slower than this many bytes/s ... */
	long low_speed_time_s; /* ... for this many seconds */
	long memory_timeout_s; /* whole-try limit for memory bodies (JSON, XML); 0: none */
	const char *ca_bundle; /* PEM file of trusted CAs, or NULL for the system's */
};

struct lp_http_client {
	CURL *curl;
	struct lp_http_policy policy; /* ca_bundle is copied */
	char ca_bundle[4096];
	unsigned int seed; /* jitter */
};

/* Called before each try to add headers that must be fresh (a SigV4
 * signature carries the time): append to *list with curl_slist_append;
 * the client frees the list after the try. */
typedef int (*lp_http_headers_fn)(void *arg, struct curl_slist **list, struct lp_err *err);

/* Called as body bytes of a successful response arrive: bytes is the body
 * size stored so far in this try (it starts again at 0 on a retry). */
typedef void (*lp_http_progress_fn)(void *arg, uint64_t bytes);

struct lp_http_get {
	const char *url;
	const char *const *headers; /* "Name: value" lines, NULL-terminated, or NULL */
	lp_http_headers_fn headers_fn;
	void *headers_arg;
	bool follow_redirects; /* at most 10; never from https to http */
	/* Exactly one sink: */
	struct lp_buf *body; /* reset per try; its max caps the body (-EFBIG) */
	const char *path;    /* created (0644) or truncated per try, fsynced at the end */
	uint64_t max_bytes;  /* cap for the file sink (-EFBIG past it) */
	lp_http_progress_fn progress;
	void *progress_arg;
};

#define LP_HTTP_ERROR_BODY_MAX 2048

struct lp_http_result {
	long status;     /* status of the final response; 0 when none came */
	uint64_t bytes;  /* body bytes stored in the sink */
	char sha256[65]; /* file sink: hex SHA-256 of what was stored */
	int attempts;    /* tries made */
	/* Start of a non-2xx body and the X-Error-Message header (the HF hub
	 * puts its reason there), NUL-terminated, "" when absent. */
	char error_body[LP_HTTP_ERROR_BODY_MAX];
	char error_header[256];
};

/* Initialises curl once per process (thread-safe) and a client with a copy
 * of policy. Release with lp_http_client_release(). */
int lp_http_client_init(struct lp_http_client *c, const struct lp_http_policy *policy,
                        struct lp_err *err);
void lp_http_client_release(struct lp_http_client *c);

/* Performs the GET described by g (borrowed for the call). Returns 0 when
 * a response arrived, whatever its status (res->status; 5xx and 429 only
 * after the last try); -EIO when none did after every try or on a
 * permanent transport error (TLS verification, bad URL), with curl's
 * reason; -EFBIG past the sink's cap; -errno when the file cannot be
 * written. res is filled in every case. */
int lp_http_get(struct lp_http_client *c, const struct lp_http_get *g, struct lp_http_result *res,
                struct lp_err *err);

/* Maps an HTTP status to this project's codes: 2xx 0, 401 and 403
 * -EACCES, 404 and 410 -ENOENT, anything else -EIO. */
int lp_http_status_errno(long status);

#endif
