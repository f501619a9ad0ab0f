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
	/* tests only (LORAPLANE_TEST_STEP_DELAY_MS): the engine thread
	 * pauses this long after every step, outside the engine's lock, so
	 * that a test can watch requests run and wait; 0 (the default) */
	int test_step_delay_ms;
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
	/* the caller's request this one belongs to (the choices of one HTTP
	 * request): requests of one group count as one in the stats; 0 for a
	 * request of its own. lp_worker_new_group() hands out fresh ones. */
	uint64_t group;
	/* constrained decoding, or NULL; the request takes its own
	 * reference (lp_seq_params.grammar) */
	struct lp_grammar *grammar;
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
	int cached_tokens;            /* LP_EVENT_END: prompt tokens the prefix cache held */
	/* LP_EVENT_TOKEN and LP_EVENT_END: CLOCK_MONOTONIC seconds (lp_now's
	 * clock) the request entered the submit queue, and its sequence
	 * first ran in the engine (0: it never ran) */
	double t_queued;
	double t_scheduled;
	struct lp_err err; /* LP_EVENT_ERROR; keep it last (run_step clears the rest) */
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

/* 0 while the engine works; once a step failed (the backend's sticky
 * error: the device is unusable) its error, for good: requests then fail
 * with it and the agent reports itself not ready. */
int lp_worker_failure(struct lp_worker *w, struct lp_err *err);

/* Queues a request. -EAGAIN when the queue is full (429), -ESHUTDOWN after
 * close, -EINVAL for bad parameters. Errors the engine finds (unknown
 * adapter, host tier full, prompt too long) arrive as the request's first
 * event. The caller reads events with lp_request_next() and frees the
 * request with lp_request_free(). */
int lp_worker_submit(struct lp_worker *w, const struct lp_request_params *p,
                     struct lp_request **out, struct lp_err *err);
/* A group id no other caller has (lp_request_params.group), never 0. */
uint64_t lp_worker_new_group(struct lp_worker *w);
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
	struct lp_lora_absent absent; /* targeted modules without weights */
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

/* Bytes of each comma-separated adapter list in the stats. */
#define LP_WORKER_ADAPTER_LIST 8192

struct lp_worker_stats {
	struct lp_engine_stats engine;
	struct lp_lora_cache_stats loras;
	struct lp_engine_config config; /* the engine's settings in effect; block_size
	                                   is 0 in a zeroed struct (no stats read) */
	int queued;                     /* requests in the submit queue */
	/* requests as clients made them (lp_request_params.group): those
	 * with a sequence running, and those with none running and one
	 * waiting in the engine or in the submit queue */
	int running_requests;
	int waiting_requests;
	/* the adapters of running sequences, and of waiting ones (queued
	 * requests included), each name once, comma-separated (an adapter may
	 * be in both); a list that did not fit ends at the last name that did,
	 * and adapters_truncated says so */
	char running_adapters[LP_WORKER_ADAPTER_LIST];
	char waiting_adapters[LP_WORKER_ADAPTER_LIST];
	bool adapters_truncated;
};

/* A consistent snapshot: takes the engine's lock (it waits for the step
 * in progress), then the queue's, so every request is counted once, in
 * the engine or in the queue. */
void lp_worker_stats(struct lp_worker *w, struct lp_worker_stats *out);
/* The model the engine runs (read-only: tokenizer, config). */
const struct lp_model *lp_worker_model(const struct lp_worker *w);

#endif
