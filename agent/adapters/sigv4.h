/* AWS Signature Version 4 for S3 requests, computed with OpenSSL.
 *
 * The caller describes one request (method, path exactly as sent, raw
 * query parameters, the headers to sign, the payload hash); this module
 * builds the canonical request, the string to sign and the Authorization
 * header value. Nothing here does I/O, reads the clock or the environment,
 * so every step can be checked against AWS's published examples. */
#ifndef LP_ADAPTERS_SIGV4_H
#define LP_ADAPTERS_SIGV4_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include "common/buf.h"
#include "common/err.h"

/* Hex SHA-256 of the empty string: the payload hash of a GET. */
#define LP_SIGV4_EMPTY_SHA256 "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
#define LP_SIGV4_UNSIGNED     "UNSIGNED-PAYLOAD"
/* "20130524T000000Z" plus NUL */
#define LP_SIGV4_DATE_LEN 17

/* A name and a value, borrowed. Used for query parameters (raw, not yet
 * encoded; a NULL value is the same as "") and for headers (any case; the
 * value is trimmed and inner runs of spaces collapse to one). */
struct lp_sigv4_param {
	const char *name;
	const char *value;
};

struct lp_sigv4_request {
	const char *method; /* "GET" */
	/* The path exactly as it goes on the wire, already encoded with
	 * lp_sigv4_uri_encode(..., false) per segment: S3 signs it as is. */
	const char *path;
	const struct lp_sigv4_param *query;
	size_t n_query;
	/* Every header to sign; must include host and x-amz-date (and
	 * x-amz-content-sha256, x-amz-security-token when sent). */
	const struct lp_sigv4_param *headers;
	size_t n_headers;
	const char *payload_hash; /* hex SHA-256 of the body or LP_SIGV4_UNSIGNED */
};

struct lp_sigv4_key {
	const char *access_key; /* AKIA... */
	const char *secret_key;
	const char *region;  /* "us-east-1" */
	const char *service; /* "s3" */
};

/* Appends the n bytes at s to out, URI-encoded the way SigV4 wants it:
 * A-Z a-z 0-9 - _ . ~ stay, every other byte becomes %XX with upper-case
 * hex (a space is %20, never +), and '/' stays only when !encode_slash.
 * -E2BIG or -ENOMEM with err when out is full. */
int lp_sigv4_uri_encode(struct lp_buf *out, const char *s, size_t n, bool encode_slash,
                        struct lp_err *err);

/* Appends the canonical query string of q to out: names and values
 * encoded, pairs sorted by encoded name then value, joined by '&'. The
 * same string is used as the URL's query, so that what is signed is what
 * is sent. */
int lp_sigv4_canonical_query(struct lp_buf *out, const struct lp_sigv4_param *q, size_t n,
                             struct lp_err *err);

/* Writes the canonical request of r into out (which is reset first).
 * -EINVAL for a request with no host header, a header name that is not a
 * token, or more than 64 headers or 64 query parameters. */
int lp_sigv4_canonical_request(struct lp_buf *out, const struct lp_sigv4_request *r,
                               struct lp_err *err);

/* Writes "AWS4-HMAC-SHA256 Credential=.../scope, SignedHeaders=..., Signature=..."
 * into out (cap bytes). amz_date is the request's x-amz-date value
 * ("YYYYMMDDTHHMMSSZ"); its first 8 characters are the scope's date.
 * signature, when not NULL, receives the 64 hex characters (65 bytes). */
int lp_sigv4_authorization(char *out, size_t cap, char *signature, const struct lp_sigv4_key *k,
                           const struct lp_sigv4_request *r, const char *amz_date,
                           struct lp_err *err);

/* Formats t (UTC) as an x-amz-date value into out[LP_SIGV4_DATE_LEN]. */
void lp_sigv4_format_date(time_t t, char *out);

/* Hex SHA-256 of n bytes into out[65]. */
void lp_sha256_hex(const void *p, size_t n, char *out);

#endif
