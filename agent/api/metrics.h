/* The agent's Prometheus metrics: counters and histograms the HTTP
 * threads record, rendered in the text exposition format together with
 * the engine's own figures (lp_worker_stats) at scrape time.
 *
 * Two sets: vLLM's names (`vllm:`), so that the Gateway API Inference
 * Extension's endpoint picker and dashboards made for vLLM read the agent
 * as they read vLLM, and the `loraplane_` ones (adapter tiers and what
 * vLLM has no name for). docs/api.md lists them all.
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
/* The prompt tokens of a request whose prefill is done (every choice has
 * its first event), counted once per request as its usage counts them. */
void lp_metrics_prompt(struct lp_metrics *m, long prompt_tokens);
/* The first generated token of a sequence, seconds after the request's
 * arrival; each call is also one generated token. */
void lp_metrics_ttft(struct lp_metrics *m, double seconds);
/* A later token of a sequence, seconds after the one before it; one
 * generated token. */
void lp_metrics_inter_token(struct lp_metrics *m, double seconds);
/* A client that went away mid-response. */
void lp_metrics_disconnect(struct lp_metrics *m);

/* Why a sequence ended (vLLM's finished_reason). */
enum lp_metrics_finish {
	LP_METRICS_STOP,   /* end of sequence or a stop string */
	LP_METRICS_LENGTH, /* max_tokens or the model length */
	LP_METRICS_ABORT,  /* cancelled: the client went away, shutdown */
	LP_METRICS_ERROR,  /* the engine failed under it */
	LP_METRICS_N_FINISH,
};

/* The life of one sequence (one choice of a request), in lp_now()
 * seconds (CLOCK_MONOTONIC). */
struct lp_metrics_seq {
	enum lp_metrics_finish finish;
	double arrival;     /* the HTTP request arrived */
	double queued;      /* it entered the engine's submit queue */
	double scheduled;   /* it first ran in the engine; 0: never */
	double first_token; /* its first token reached the HTTP thread; 0: none */
	double last_token;  /* its last token did */
	double end;         /* it was over for the HTTP thread */
};

/* A sequence that is over: its finish reason and the time it spent in
 * each phase it reached (queue, prefill, decode) and in all. */
void lp_metrics_seq_finished(struct lp_metrics *m, const struct lp_metrics_seq *s);

/* Appends the exposition text to out: the metrics recorded here, and
 * those of ws (all zero and the info metrics left out when ws is zeroed,
 * before the model is loaded). model_name (borrowed) is the base model's
 * served name, the model_name label of every vLLM metric. */
int lp_metrics_render(struct lp_metrics *m, const struct lp_worker_stats *ws, bool ready,
                      const char *model_name, struct lp_buf *out, struct lp_err *err);

#endif
