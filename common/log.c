/* Line-oriented logging to stderr; see log.h. */
#include "common/log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static enum lp_log_format log_format = LP_LOG_TEXT;
static enum lp_log_level log_min = LP_LOG_INFO;
static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void lp_log_setup(enum lp_log_format format, enum lp_log_level min_level)
{
	log_format = format;
	log_min = min_level;
}

bool lp_log_parse_format(const char *s, enum lp_log_format *out)
{
	if (!strcmp(s, "text"))
		*out = LP_LOG_TEXT;
	else if (!strcmp(s, "json"))
		*out = LP_LOG_JSON;
	else
		return false;
	return true;
}

bool lp_log_parse_level(const char *s, enum lp_log_level *out)
{
	for (int i = 0; i < 4; i++) {
		if (!strcmp(s, level_names[i])) {
			*out = (enum lp_log_level)i;
			return true;
		}
	}
	return false;
}

bool lp_log_enabled(enum lp_log_level level)
{
	return level >= log_min;
}

/* Appends s as the inside of a JSON string (escaped) to out at *pos,
 * never writing past cap - 1. */
static void append_json_escaped(char *out, size_t cap, size_t *pos, const char *s)
{
	static const char hex[] = "0123456789abcdef";

	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		char esc[7];
		size_t n;

		if (*p == '"' || *p == '\\') {
			esc[0] = '\\';
			esc[1] = (char)*p;
			n = 2;
		} else if (*p == '\n') {
			memcpy(esc, "\\n", 2);
			n = 2;
		} else if (*p == '\t') {
			memcpy(esc, "\\t", 2);
			n = 2;
		} else if (*p < 0x20 || *p == 0x7f) {
			memcpy(esc, "\\u00", 4);
			esc[4] = hex[*p >> 4];
			esc[5] = hex[*p & 15];
			n = 6;
		} else {
			esc[0] = (char)*p;
			n = 1;
		}
		if (*pos + n >= cap)
			return;
		memcpy(out + *pos, esc, n);
		*pos += n;
	}
}

static void append_str(char *out, size_t cap, size_t *pos, const char *s)
{
	size_t n = strlen(s);

	if (*pos + n >= cap)
		n = cap - 1 - *pos;
	memcpy(out + *pos, s, n);
	*pos += n;
}

/* Replaces bytes that would break a text line (control characters) with
 * spaces, so one event stays one line. */
static void flatten(char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 && *s != '\t')
			*s = ' ';
}

void lp_log(enum lp_log_level level, const char *request_id, const char *fmt, ...)
{
	char msg[LP_LOG_LINE_MAX - 256], line[LP_LOG_LINE_MAX], ts[96];
	struct timespec now;
	struct tm tm;
	size_t pos = 0;
	va_list ap;
	int n;

	if (level < log_min)
		return;
	va_start(ap, fmt);
	n = vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= sizeof(msg))
		memcpy(msg + sizeof(msg) - 4, "...", 4);
	clock_gettime(CLOCK_REALTIME, &now);
	gmtime_r(&now.tv_sec, &tm);
	snprintf(ts, sizeof(ts), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
	         tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
	         (int)(now.tv_nsec / 1000000L));
	if (log_format == LP_LOG_JSON) {
		append_str(line, sizeof(line), &pos, "{\"ts\":\"");
		append_str(line, sizeof(line), &pos, ts);
		append_str(line, sizeof(line), &pos, "\",\"level\":\"");
		append_str(line, sizeof(line), &pos, level_names[level]);
		if (request_id) {
			append_str(line, sizeof(line), &pos, "\",\"request_id\":\"");
			append_json_escaped(line, sizeof(line), &pos, request_id);
		}
		append_str(line, sizeof(line), &pos, "\",\"msg\":\"");
		append_json_escaped(line, sizeof(line), &pos, msg);
		/* room for the closing characters is kept by the - 3 below */
		if (pos > sizeof(line) - 4)
			pos = sizeof(line) - 4;
		memcpy(line + pos, "\"}\n", 3);
		pos += 3;
	} else {
		flatten(msg);
		append_str(line, sizeof(line), &pos, ts);
		append_str(line, sizeof(line), &pos, " ");
		append_str(line, sizeof(line), &pos, level_names[level]);
		append_str(line, sizeof(line), &pos, " ");
		if (request_id) {
			append_str(line, sizeof(line), &pos, "[");
			append_str(line, sizeof(line), &pos, request_id);
			append_str(line, sizeof(line), &pos, "] ");
		}
		append_str(line, sizeof(line), &pos, msg);
		if (pos > sizeof(line) - 2)
			pos = sizeof(line) - 2;
		line[pos++] = '\n';
	}
	pthread_mutex_lock(&log_mu);
	for (size_t off = 0; off < pos;) {
		ssize_t w = write(STDERR_FILENO, line + off, pos - off);
		if (w <= 0)
			break;
		off += (size_t)w;
	}
	pthread_mutex_unlock(&log_mu);
}
