/* Logging for main() and the programs' top layers only: library code
 * returns errors instead of printing. Lines go to stderr as text or as one
 * JSON object per line. */
#ifndef LP_COMMON_LOG_H
#define LP_COMMON_LOG_H

enum lp_log_level { LP_LOG_DEBUG, LP_LOG_INFO, LP_LOG_WARN, LP_LOG_ERROR };
enum lp_log_format { LP_LOG_TEXT, LP_LOG_JSON };

void lp_log_setup(enum lp_log_level min_level, enum lp_log_format format);
void lp_log(enum lp_log_level level, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

#endif
