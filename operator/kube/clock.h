/* The clock the operator's timing runs on: the work queue's delays and
 * token bucket, leader election's Lease timings, backoff sleeps. A real
 * clock by default; tests pass a fake one that stands still until they
 * advance it, so that they assert what happens after N seconds without
 * waiting N seconds or depending on how fast the machine is.
 *
 * Behaviour that varies is a struct of function pointers (as redis's
 * dictType); every function taking a clock accepts NULL for the real one. */
#ifndef LP_OPERATOR_KUBE_CLOCK_H
#define LP_OPERATOR_KUBE_CLOCK_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <time.h>

struct kube_clock {
	/* seconds on a monotonic clock */
	double (*mono)(struct kube_clock *c);
	/* time since the epoch (Lease renewTime and the like) */
	void (*wall)(struct kube_clock *c, struct timespec *out);
	/* Blocks until mono() >= until or *stop (may be NULL) is set;
	 * returns false when stopped. */
	bool (*sleep_until)(struct kube_clock *c, double until, const atomic_bool *stop);
	/* One pthread_cond_timedwait on cond (created with CLOCK_MONOTONIC)
	 * with m held, returning by mono() time until at the latest; may
	 * return earlier (spuriously, or on a signal): callers re-check. */
	void (*cond_wait_until)(struct kube_clock *c, pthread_cond_t *cond, pthread_mutex_t *m,
	                        double until);
};

/* The process's real clock (CLOCK_MONOTONIC / CLOCK_REALTIME); static,
 * never freed. */
/* Parses a duration as the operator's flags take it: seconds, optionally
 * with a unit (500ms, 30s, 5m, 1h), not negative. 0 or -1. */
int kube_parse_duration(const char *s, double *out);

struct kube_clock *kube_clock_real(void);

/* Conveniences that map a NULL clock to the real one. */
double kube_clock_mono(struct kube_clock *c);
void kube_clock_wall(struct kube_clock *c, struct timespec *out);
/* Sleeps seconds of c's time; false when *stop (may be NULL) ended it. */
bool kube_clock_sleep(struct kube_clock *c, double seconds, const atomic_bool *stop);
void kube_clock_cond_wait_until(struct kube_clock *c, pthread_cond_t *cond, pthread_mutex_t *m,
                                double until);

/* A clock for tests: time moves only in kube_fake_clock_advance. Sleepers
 * wake when an advance reaches their deadline (and check their stop flag
 * every few real milliseconds). Thread-safe. */
#define KUBE_FAKE_CLOCK_SLOTS 64
struct kube_fake_clock {
	struct kube_clock clock; /* first: pass &f->clock where a clock is wanted */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	double mono;
	struct timespec wall;
	double sleeping[KUBE_FAKE_CLOCK_SLOTS]; /* deadlines of blocked sleepers, 0 = free */
};

/* Starts at mono 1000 s and wall time wall_start seconds since the epoch. */
void kube_fake_clock_init(struct kube_fake_clock *f, time_t wall_start);
/* Call once no thread uses the clock any more. */
void kube_fake_clock_release(struct kube_fake_clock *f);
/* Moves time forward by seconds (>= 0) and wakes the sleepers it makes due. */
void kube_fake_clock_advance(struct kube_fake_clock *f, double seconds);
/* How many threads are blocked waiting for a time still in the future:
 * a test waits for this to reach the number of its threads before it
 * advances, so that each has finished what the last advance woke it for. */
int kube_fake_clock_waiters(struct kube_fake_clock *f);

#endif
