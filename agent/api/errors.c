/* OpenAI-shaped API errors; see errors.h. */
#include "agent/api/errors.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int lp_api_errorf(struct lp_api_error *e, int status, const char *code, const char *param,
                  const char *fmt, ...)
{
	va_list ap;

	memset(e, 0, sizeof(*e));
	e->status = status;
	e->code = code;
	snprintf(e->param, sizeof(e->param), "%s", param ? param : "");
	va_start(ap, fmt);
	vsnprintf(e->message, sizeof(e->message), fmt, ap);
	va_end(ap);
	return -status;
}

int lp_api_error_from(struct lp_api_error *e, int status, const char *code, const char *param,
                      const struct lp_err *err)
{
	return lp_api_errorf(e, status, code, param, "%s",
	                     err && err->msg[0] ? err->msg : "unknown error");
}

const char *lp_api_error_type(int status)
{
	switch (status) {
	case 401:
		return "authentication_error";
	case 403:
		return "permission_error";
	case 429:
		return "rate_limit_error";
	default:
		return status >= 500 ? "server_error" : "invalid_request_error";
	}
}

/* Length of the valid UTF-8 sequence at s (1-4), or 0 when invalid. */
static size_t utf8_seq_len(const unsigned char *s)
{
	size_t n;
	unsigned cp;

	if (s[0] < 0x80)
		return 1;
	if (s[0] >= 0xc2 && s[0] <= 0xdf) {
		n = 2;
		cp = s[0] & 0x1f;
	} else if (s[0] >= 0xe0 && s[0] <= 0xef) {
		n = 3;
		cp = s[0] & 0x0f;
	} else if (s[0] >= 0xf0 && s[0] <= 0xf4) {
		n = 4;
		cp = s[0] & 0x07;
	} else {
		return 0;
	}
	for (size_t i = 1; i < n; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		cp = cp << 6 | (s[i] & 0x3f);
	}
	if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
	    (cp >= 0xd800 && cp <= 0xdfff))
		return 0;
	return n;
}

void lp_api_utf8_sanitize(char *s)
{
	unsigned char *p = (unsigned char *)s;

	while (*p) {
		size_t n = utf8_seq_len(p);
		if (n == 0) {
			*p++ = '?';
			continue;
		}
		p += n;
	}
}

json_t *lp_api_error_json(const struct lp_api_error *e)
{
	const char *type = e->type ? e->type : lp_api_error_type(e->status);
	char msg[sizeof(e->message)], param[sizeof(e->param)];

	memcpy(msg, e->message, sizeof(msg));
	msg[sizeof(msg) - 1] = '\0';
	memcpy(param, e->param, sizeof(param));
	param[sizeof(param) - 1] = '\0';
	lp_api_utf8_sanitize(msg);
	lp_api_utf8_sanitize(param);
	return json_pack("{s:{s:s, s:s, s:o, s:o}}", "error", "message", msg, "type", type, "param",
	                 param[0] ? json_string(param) : json_null(), "code",
	                 e->code ? json_string(e->code) : json_null());
}
