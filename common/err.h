/* Error reporting: a caller-owned struct that library code fills.
 *
 * Functions that can fail return 0 or a negative errno-style code and, on
 * failure, write a readable message into the caller's struct lp_err.
 * Library code never prints and never exits. */
#ifndef LP_COMMON_ERR_H
#define LP_COMMON_ERR_H

#include <stdarg.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LP_ERR_MSG_MAX 512

struct lp_err {
	int code;                 /* negative errno-style code, 0 when clear */
	char msg[LP_ERR_MSG_MAX]; /* lowercase, no trailing period */
};

/* Sets err (which may be NULL) to code and the formatted message; returns
 * code so that callers can write `return lp_errf(err, -EINVAL, ...)`. */
int lp_errf(struct lp_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prefixes err's message with the formatted text and ": "; returns
 * err->code. Used to add context (a file name) as an error travels up. */
int lp_err_prefix(struct lp_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

void lp_err_clear(struct lp_err *err);

#ifdef __cplusplus
}
#endif

#endif
