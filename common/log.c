/* Logging; see log.h. One write per line so that threads do not interleave. */
#include "common/log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static enum lp_log_level min_level = LP_LOG_INFO;
static enum lp_log_format log_format = LP_LOG_TEXT;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

static const char *level_names[] = { "debug", "info", "warn", "error" };

void lp_log_setup(enum lp_log_level level, enum lp_log_format format)
{
	min_level = level;
	log_format = format;
}

/* Appends s to out as the inside of a JSON string. */
static size_t json_escape(char *out, size_t cap, const char *s)
{
	size_t n = 0;

	for (; *s && n + 7 < cap; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\') {
			out[n++] = '\\';
			out[n++] = (char)c;
		} else if (c < 0x20) {
			n += (size_t)snprintf(out + n, cap - n, "\\u%04x", c);
		} else {
			out[n++] = (char)c;
		}
	}
	out[n] = '\0';
	return n;
}

void lp_log(enum lp_log_level level, const char *fmt, ...)
{
	char msg[2048], line[4608], stamp[32];
	struct timespec ts;
	struct tm tm;
	va_list ap;

	if (level < min_level)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm);
	if (log_format == LP_LOG_JSON) {
		char esc[4096];
		json_escape(esc, sizeof(esc), msg);
		snprintf(line, sizeof(line),
			 "{\"time\":\"%s.%03ldZ\",\"level\":\"%s\",\"msg\":\"%s\"}\n",
			 stamp, ts.tv_nsec / 1000000, level_names[level], esc);
	} else {
		snprintf(line, sizeof(line), "%s.%03ldZ %-5s %s\n", stamp,
			 ts.tv_nsec / 1000000, level_names[level], msg);
	}
	pthread_mutex_lock(&log_lock);
	fputs(line, stderr);
	pthread_mutex_unlock(&log_lock);
}
