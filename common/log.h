/* Logging for the programs (never for library code): one line per event on
 * stderr, as text or as a JSON object, with an optional request id.
 *
 *   text: 2025-01-02T03:04:05.678Z info [req-7] loaded adapter 'sql'
 *   json: {"ts":"2025-01-02T03:04:05.678Z","level":"info","request_id":"req-7",
 *          "msg":"loaded adapter 'sql'"}
 *
 * Thread-safe: each line is written whole with one write(2) under a lock,
 * so lines from different threads never interleave. */
#ifndef LP_COMMON_LOG_H
#define LP_COMMON_LOG_H

#include <stdbool.h>

enum lp_log_level {
	LP_LOG_DEBUG,
	LP_LOG_INFO,
	LP_LOG_WARN,
	LP_LOG_ERROR,
};

enum lp_log_format {
	LP_LOG_TEXT,
	LP_LOG_JSON,
};

/* Longest line written; longer messages are cut (and end with "..."). */
#define LP_LOG_LINE_MAX 4096

/* Sets the format and the lowest level written (defaults: text, info).
 * Call before starting threads. */
void lp_log_setup(enum lp_log_format format, enum lp_log_level min_level);
/* Parses "text" / "json"; false for anything else. */
bool lp_log_parse_format(const char *s, enum lp_log_format *out);
/* Parses "debug", "info", "warn", "error"; false for anything else. */
bool lp_log_parse_level(const char *s, enum lp_log_level *out);
bool lp_log_enabled(enum lp_log_level level);

/* Writes one line. request_id may be NULL (no request field). */
void lp_log(enum lp_log_level level, const char *request_id, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define lp_log_debug(...) lp_log(LP_LOG_DEBUG, NULL, __VA_ARGS__)
#define lp_log_info(...)  lp_log(LP_LOG_INFO, NULL, __VA_ARGS__)
#define lp_log_warn(...)  lp_log(LP_LOG_WARN, NULL, __VA_ARGS__)
#define lp_log_error(...) lp_log(LP_LOG_ERROR, NULL, __VA_ARGS__)

#endif
