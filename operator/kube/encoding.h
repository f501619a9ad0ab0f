/* Small encodings the Kubernetes client needs: base64 (kubeconfig *-data
 * fields), percent-encoding (query values, adapter names in agent URLs),
 * sha256 in hex (the base-model label), and RFC 3339 times (Leases,
 * Events, conditions). */
#ifndef LP_OPERATOR_KUBE_ENCODING_H
#define LP_OPERATOR_KUBE_ENCODING_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include "common/buf.h"
#include "common/err.h"

/* Decodes standard base64 (padding optional, ASCII whitespace ignored)
 * from text[0..len). On success *out is a malloc'ed buffer the caller
 * frees, NUL-terminated for convenience, and *out_len its length without
 * the NUL. -EINVAL with err on a character outside the alphabet or a bad
 * length. */
int kube_base64_decode(const char *text, size_t len, unsigned char **out, size_t *out_len,
                       struct lp_err *err);

/* Appends s percent-encoded to b. With keep_slash, '/' is kept as is.
 * Unreserved characters (A-Z a-z 0-9 - . _ ~) are never encoded. */
int kube_percent_encode(struct lp_buf *b, const char *s, bool keep_slash, struct lp_err *err);

/* Writes the lowercase hex sha256 of data[0..len) into hex (65 bytes with
 * the NUL). */
void kube_sha256_hex(const void *data, size_t len, char hex[65]);

/* Formats t (UTC) as RFC 3339, "2024-05-01T10:00:00Z", or with
 * microseconds "2024-05-01T10:00:00.123456Z" when micro is true (the
 * MicroTime of Leases). out must hold at least 32 bytes. */
void kube_time_format(const struct timespec *t, bool micro, char *out, size_t size);

/* Parses an RFC 3339 time with optional fraction and a "Z" or "+hh:mm"
 * offset into *t. -EINVAL with err on anything else. */
int kube_time_parse(const char *s, struct timespec *t, struct lp_err *err);

/* Seconds since the epoch (CLOCK_REALTIME) and on CLOCK_MONOTONIC. */
double kube_now_wall(void);
double kube_now_mono(void);

/* A uniform random double in [0, 1), thread-safe, seeded per process. */
double kube_random(void);

#endif
