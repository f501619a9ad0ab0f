/* Error reporting; see err.h. */
#include "common/err.h"

#include <stdio.h>
#include <string.h>

int lp_errf(struct lp_err *err, int code, const char *fmt, ...)
{
	va_list ap;

	if (!err)
		return code;
	err->code = code;
	va_start(ap, fmt);
	vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
	va_end(ap);
	return code;
}

int lp_err_prefix(struct lp_err *err, const char *fmt, ...)
{
	char prefix[LP_ERR_MSG_MAX];
	char old[LP_ERR_MSG_MAX];
	va_list ap;

	if (!err)
		return 0;
	va_start(ap, fmt);
	vsnprintf(prefix, sizeof(prefix), fmt, ap);
	va_end(ap);
	memcpy(old, err->msg, sizeof(old));
	/* truncation keeps the start, which names the context */
	if (snprintf(err->msg, sizeof(err->msg), "%.200s: %.300s", prefix, old) < 0)
		err->msg[0] = '\0';
	return err->code;
}

void lp_err_clear(struct lp_err *err)
{
	if (!err)
		return;
	err->code = 0;
	err->msg[0] = '\0';
}
