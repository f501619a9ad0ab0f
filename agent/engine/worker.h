/* The engine thread and the thread-safe doors into it (docs/architecture.md, threads).
 *
 * HTTP threads submit requests through a bounded queue and read each
 * request's own bounded channel of events (tokens with their logprobs, then
 * one final event); they never touch model, KV or adapter memory. One
 * engine thread drains the queue, runs steps, and pushes events. A channel
 * that is full when a token is ready pauses nothing: the request is
 * cancelled (its reader stopped reading) and its last event says so.
 * Adapter loads parse files on the caller's thread (a loader thread) and
 * take the engine's lock only to install the result.
 *
 * Every function here may be called from any thread unless it says
 * otherwise. */
#ifndef LP_ENGINE_WORKER_H
#define LP_ENGINE_WORKER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "agent/engine/engine.h"
#include "common/err.h"

#define LP_MAX_TOP_LOGPROBS LP_ENGINE_MAX_LOGPROBS

struct lp_worker_config {
	int queue_capacity;   /* requests waiting to enter the engine (default 1024) */
	int channel_capacity; /* events buffered per request (default 4096) */
};

void lp_worker_config_default(struct lp_worker_config *c);

struct lp_request_params {
	const char *adapter;   /* NULL or "" for the base model; copied */
	const int32_t *prompt; /* copied */
	size_t n_prompt;
	int max_tokens; /* >= 1 */
	bool ignore_eos;
	struct lp_sampling_params sampling;
	int logprobs; /* -1: none; 0..LP_MAX_TOP_LOGPROBS: the chosen
	                 token's logprob and this many alternatives */
};

enum lp_event_kind {
	LP_EVENT_TOKEN, /* one generated token */
	LP_EVENT_END,   /* the request is over: finish says why */
	LP_EVENT_ERROR, /* it could not start: err says why (code as
	                   lp_engine_add returns it) */
};

struct lp_event {
	enum lp_event_kind kind;
	int32_t token;
	float logprob; /* of token, when logprobs >= 0 */
	int n_top;
	int32_t top_ids[LP_MAX_TOP_LOGPROBS];
	float top_logprobs[LP_MAX_TOP_LOGPROBS];
	enum lp_finish_reason finish; /* LP_EVENT_END */
	bool cancelled;               /* LP_EVENT_END: by lp_request_cancel or a full channel */
	int prompt_tokens;            /* LP_EVENT_END */
	int completion_tokens;        /* LP_EVENT_END */
	struct lp_err err;            /* LP_EVENT_ERROR */
};

struct lp_worker;
struct lp_request;

/* Starts the engine thread over e, which the worker owns from now on
 * (lp_worker_free frees it). */
int lp_worker_start(struct lp_worker **out, struct lp_engine *e, const struct lp_worker_config *cfg,
                    struct lp_err *err);
/* Stops accepting requests; lets running and queued ones finish for up to
 * drain_ms, cancels the rest, stops the thread, frees everything. */
void lp_worker_free(struct lp_worker *w, int drain_ms);
/* Stops accepting new requests (submit returns -ESHUTDOWN) without
 * stopping the ones in flight. */
void lp_worker_close(struct lp_worker *w);

/* Queues a request. -EAGAIN when the queue is full (429), -ESHUTDOWN after
 * close, -EINVAL for bad parameters. Errors the engine finds (unknown
 * adapter, host tier full, prompt too long) arrive as the request's first
 * event. The caller reads events with lp_request_next() and frees the
 * request with lp_request_free(). */
/* 0 while the engine works; once a step failed (the backend's sticky
 * error: the device is unusable) its error, for good: requests then fail
 * with it and the agent reports itself not ready. */
int lp_worker_failure(struct lp_worker *w, struct lp_err *err);

int lp_worker_submit(struct lp_worker *w, const struct lp_request_params *p,
                     struct lp_request **out, struct lp_err *err);
/* Waits up to timeout_ms (-1: no limit) for the next event: 0 with *ev
 * filled, -ETIMEDOUT. After LP_EVENT_END or LP_EVENT_ERROR no more events
 * come. */
int lp_request_next(struct lp_request *r, struct lp_event *ev, int timeout_ms);
/* Asks the engine to stop the request and free its KV blocks before its
 * next step; an LP_EVENT_END with cancelled follows. */
void lp_request_cancel(struct lp_request *r);
/* Frees the request (cancelling it first if it is still running). A
 * request may outlive its worker: after lp_worker_free() its remaining
 * events can still be read, and freeing it is safe. */
void lp_request_free(struct lp_request *r);
uint64_t lp_request_id(const struct lp_request *r);

/* Adapters. load parses path on the calling thread, opening its files
 * below root (borrowed; NULL or "" for none: lp_lora_load_in), then
 * installs it under the engine's lock (see lp_lora_cache_install for
 * codes). */
struct lp_adapter_summary {
	char name[256];
	char source[1024];
	char sha256[65];
	int32_t lora_id;
	int rank;
	unsigned targets;
	const char *format;
	const char *tier;
	int requests_running;
	double load_ms;
};

int lp_worker_lora_load(struct lp_worker *w, const char *name, const char *path, const char *root,
                        const char *source, const char *sha256, bool inplace, bool *already,
                        struct lp_adapter_summary *out, struct lp_err *err);
int lp_worker_lora_unload(struct lp_worker *w, const char *name, struct lp_err *err);
/* Fills up to cap summaries of registered adapters in load order; returns
 * how many there are in all. */
size_t lp_worker_lora_list(struct lp_worker *w, struct lp_adapter_summary *out, size_t cap);
/* -ENOENT when name is not loaded. */
int lp_worker_lora_get(struct lp_worker *w, const char *name, struct lp_adapter_summary *out);

struct lp_worker_stats {
	struct lp_engine_stats engine;
	struct lp_lora_cache_stats loras;
	int queued;
};

void lp_worker_stats(struct lp_worker *w, struct lp_worker_stats *out);
/* The model the engine runs (read-only: tokenizer, config). */
const struct lp_model *lp_worker_model(const struct lp_worker *w);

#endif
