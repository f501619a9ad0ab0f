/* Exponential backoff with jitter for reconnecting watches and retrying
 * API calls: 0.8 s doubling to 30 s by default, each delay stretched by a
 * random 0..jitter fraction so that many clients do not retry in step. */
#ifndef LP_OPERATOR_KUBE_BACKOFF_H
#define LP_OPERATOR_KUBE_BACKOFF_H

#include <stdatomic.h>
#include <stdbool.h>

struct kube_backoff {
	double initial; /* first delay, seconds */
	double max;     /* cap, seconds (jitter included) */
	double factor;  /* growth per failure */
	double jitter;  /* 0..1: fraction of the delay added at random */
	double next;    /* delay before jitter for the next failure */
};

/* 0.8 s, 30 s, factor 2, jitter 0.2. */
void kube_backoff_init(struct kube_backoff *b);

/* The delay to wait after one more failure; grows the next one. */
double kube_backoff_next(struct kube_backoff *b);

/* Back to the initial delay after a success. */
void kube_backoff_reset(struct kube_backoff *b);

/* Sleeps for seconds, waking every 50 ms to check *stop (may be NULL).
 * Returns false when stopped early. */
bool kube_sleep(double seconds, const atomic_bool *stop);

#endif
