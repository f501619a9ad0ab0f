/* API errors in OpenAI's shape:
 *
 *   {"error": {"message": "...", "type": "invalid_request_error",
 *              "param": "max_tokens", "code": null}}
 *
 * Parsers and handlers fill a struct lp_api_error (status, type, code,
 * param, message); the server turns it into the response body. */
#ifndef LP_API_ERRORS_H
#define LP_API_ERRORS_H

#include <jansson.h>

#include "common/err.h"

#define LP_API_PARAM_MAX 96

struct lp_api_error {
	int status;                   /* HTTP status */
	const char *type;             /* static string; NULL: from the status */
	const char *code;             /* static string or NULL (JSON null) */
	char param[LP_API_PARAM_MAX]; /* "" for JSON null */
	char message[LP_ERR_MSG_MAX];
	int retry_after; /* seconds for 429/503 (Retry-After), 0: none */
};

/* Fills e and returns -status (a negative number, so parsers can write
 * `return lp_api_errorf(...)`). param may be NULL. */
int lp_api_errorf(struct lp_api_error *e, int status, const char *code, const char *param,
                  const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* Same with the message taken from err (and a prefix-free copy). */
int lp_api_error_from(struct lp_api_error *e, int status, const char *code, const char *param,
                      const struct lp_err *err);

/* The OpenAI error type for a status: invalid_request_error (400, 404,
 * 409, 413, 422), authentication_error (401), permission_error (403),
 * rate_limit_error (429), server_error (500, 503, 507). */
const char *lp_api_error_type(int status);

/* Replaces every byte of s that is not part of valid UTF-8 with '?', so
 * the text can go into JSON (messages quote paths and user input, and
 * truncation may cut a character). */
void lp_api_utf8_sanitize(char *s);

/* The body {"error": {...}} as a new JSON object (caller decrefs). */
json_t *lp_api_error_json(const struct lp_api_error *e);

#endif
