/* A rate-limited work queue of string keys ("namespace/name"), in the
 * manner of client-go's:
 *  - a key is queued at most once however often it is added (dedup);
 *  - a key being processed is never handed to a second worker; adding it
 *    meanwhile marks it dirty, and it is queued again when done;
 *  - add_rate_limited delays a key by its own exponential backoff
 *    (base * 2^failures, capped) or by an overall token bucket, whichever
 *    is later; forget resets the key's failures;
 *  - add_after queues a key once a delay has passed.
 * Any number of workers call get/done. Thread-safe. */
#ifndef LP_OPERATOR_KUBE_WORKQUEUE_H
#define LP_OPERATOR_KUBE_WORKQUEUE_H

#include <stdbool.h>
#include <stddef.h>

#include "common/err.h"
#include "operator/kube/clock.h"

struct workqueue_config {
	double base_delay; /* first per-item retry delay, seconds (default 0.1) */
	double max_delay;  /* cap of the per-item delay (default 60) */
	double qps;        /* token bucket refill rate (default 10) */
	int burst;         /* token bucket size (default 100) */
	/* borrowed; delays, the bucket and get's timeout run on it (NULL:
	 * the real clock) */
	struct kube_clock *clock;
};

struct workqueue;

/* cfg may be NULL for the defaults; zero fields take their default. */
int workqueue_new(struct workqueue **out, const struct workqueue_config *cfg, struct lp_err *err);
/* Frees the queue; call after every worker has returned. */
void workqueue_free(struct workqueue *q);

void workqueue_add(struct workqueue *q, const char *key);
void workqueue_add_after(struct workqueue *q, const char *key, double seconds);
/* Returns the delay it chose. */
double workqueue_add_rate_limited(struct workqueue *q, const char *key);
void workqueue_forget(struct workqueue *q, const char *key);
int workqueue_failures(struct workqueue *q, const char *key);

/* Blocks until a key is ready and hands it over: *key is malloc'ed, the
 * caller frees it after calling workqueue_done. Returns -ESHUTDOWN once
 * the queue is shut down (keys still queued are dropped). timeout_s < 0
 * waits forever; otherwise -ETIMEDOUT after that long on the queue's
 * clock (0: only what is ready now). */
int workqueue_get(struct workqueue *q, double timeout_s, char **key);
/* Ends the processing of key (borrowed); re-queues it if it was added
 * meanwhile. */
void workqueue_done(struct workqueue *q, const char *key);

/* Wakes every worker; get returns -ESHUTDOWN from now on. */
void workqueue_shutdown(struct workqueue *q);

/* Keys ready to be handed out (not counting delayed or in process). */
size_t workqueue_len(struct workqueue *q);
/* Keys waiting for a delay to pass. */
size_t workqueue_delayed(struct workqueue *q);

/* The per-item delay after `failures` earlier failures (pure function of
 * the config; exposed for tests): base * 2^failures, capped at max. */
double workqueue_backoff_delay(const struct workqueue_config *cfg, int failures);

#endif
