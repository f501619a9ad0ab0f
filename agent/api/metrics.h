/* The agent's Prometheus metrics: counters and histograms the HTTP
 * threads record, rendered in the text exposition format together with
 * the engine's own figures (lp_worker_stats) at scrape time.
 *
 * Thread-safe: one mutex guards everything here. */
#ifndef LP_API_METRICS_H
#define LP_API_METRICS_H

#include "agent/engine/worker.h"
#include "common/buf.h"
#include "common/err.h"

/* Distinct (model, status) series kept; later ones count as model "other". */
#define LP_METRICS_MAX_SERIES 1024

struct lp_metrics;

int lp_metrics_new(struct lp_metrics **out, struct lp_err *err);
void lp_metrics_free(struct lp_metrics *m);

/* One finished generation request of model (the name the client asked
 * for) that ended with an HTTP status; tokens are the prompt and
 * generated tokens it used. */
void lp_metrics_request(struct lp_metrics *m, const char *model, int status, long prompt_tokens,
                        long generated_tokens);
/* Seconds from a request's arrival to its first token. */
void lp_metrics_ttft(struct lp_metrics *m, double seconds);
/* Seconds between two tokens of one sequence. */
void lp_metrics_inter_token(struct lp_metrics *m, double seconds);
/* A client that went away mid-response. */
void lp_metrics_disconnect(struct lp_metrics *m);

/* Appends the exposition text (metrics plus ws) to out. */
int lp_metrics_render(struct lp_metrics *m, const struct lp_worker_stats *ws, bool ready,
                      struct lp_buf *out, struct lp_err *err);

#endif
