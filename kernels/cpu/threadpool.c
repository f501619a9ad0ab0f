/* Persistent compute threads; see threadpool.h.
 *
 * A run publishes (fn, arg), zeroes the count of finished chunks, sets the
 * claim word to (run number, n_chunks, next chunk 0) and bumps a wake-up
 * counter. Every thread then claims chunks by compare-and-swap on the claim
 * word until none is left; the run number in the word makes a claim by a
 * worker that wakes after its run has ended fail, so it never touches a
 * finished run's arguments. The chunk count travels in the same word: a
 * worker holding the last word of a finished run must not compare its
 * chunk with the next run's count, published before the next run's word,
 * or it would claim a chunk that does not exist (a wrong result, and a
 * finished count that never matches). A successful claim keeps the run
 * open until that chunk finishes, so fn and arg stay valid while it runs.
 * The caller waits for the finished count to reach n_chunks.
 *
 * Waiting (workers for a new run, the caller for the last chunks) first
 * polls with pause instructions, then polls between sched_yield() calls
 * (which hand the core to a runnable thread when the machine has fewer
 * free cores than the pool has threads) for up to LP_POOL_YIELD_NS, then
 * sleeps on a condition variable. The sleeping counter lets a run skip the
 * mutex when every worker is still polling: a worker increments it before
 * its last check of the wake-up counter and the caller reads it after
 * bumping that counter, both sequentially consistent, so one of them sees
 * the other's write. */
#include "kernels/cpu/threadpool.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define LP_POOL_SPIN     256
#define LP_POOL_YIELD_NS 100000

struct pool_worker {
	struct lp_threadpool *pool;
	pthread_t thread;
	int index;
};

struct lp_threadpool {
	int n_threads;
	struct pool_worker *workers; /* [n_threads - 1] */
	int n_started;

	pthread_mutex_t mu;
	pthread_cond_t work_cv;
	pthread_cond_t done_cv;

	/* the current run; written by the caller before it publishes claim */
	lp_threadpool_fn fn;
	void *arg;
	atomic_bool stop;

	_Atomic uint64_t claim; /* run number << 32 | n_chunks << 16 | next chunk */
	atomic_int finished;    /* chunks of the current run done */
	atomic_uint wake;       /* bumped once per run and at stop */
	atomic_int sleeping;
	uint32_t run; /* caller only */
};

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Polls until ready(pool, seen) or the polling budget is spent. */
static bool pool_poll(struct lp_threadpool *pool, unsigned seen,
                      bool (*ready)(struct lp_threadpool *, unsigned))
{
	int64_t deadline;

	for (int i = 0; i < LP_POOL_SPIN; i++) {
		if (ready(pool, seen))
			return true;
		cpu_relax();
	}
	deadline = now_ns() + LP_POOL_YIELD_NS;
	do {
		sched_yield();
		if (ready(pool, seen))
			return true;
	} while (now_ns() < deadline);
	return false;
}

static bool woken(struct lp_threadpool *pool, unsigned seen)
{
	return atomic_load_explicit(&pool->wake, memory_order_acquire) != seen;
}

static bool all_finished(struct lp_threadpool *pool, unsigned n_chunks)
{
	return atomic_load_explicit(&pool->finished, memory_order_acquire) == (int)n_chunks;
}

#define CLAIM_CHUNK(c)    ((int)((c)&0xffff))
#define CLAIM_N_CHUNKS(c) ((int)(((c) >> 16) & 0xffff))

/* Claims and runs chunks of the run in the claim word until none is left. */
static void pool_work(struct lp_threadpool *pool, int thread)
{
	uint64_t c = atomic_load_explicit(&pool->claim, memory_order_acquire);

	for (;;) {
		int chunk = CLAIM_CHUNK(c), n_chunks = CLAIM_N_CHUNKS(c);

		if (chunk >= n_chunks)
			return;
		if (!atomic_compare_exchange_weak_explicit(
		        &pool->claim, &c, c + 1, memory_order_acq_rel, memory_order_acquire))
			continue; /* c now holds the current word */
		pool->fn(pool->arg, chunk, n_chunks, thread);
		if (atomic_fetch_add_explicit(&pool->finished, 1, memory_order_acq_rel) ==
		    n_chunks - 1) {
			pthread_mutex_lock(&pool->mu);
			pthread_cond_signal(&pool->done_cv);
			pthread_mutex_unlock(&pool->mu);
		}
		c = atomic_load_explicit(&pool->claim, memory_order_acquire);
	}
}

static void *pool_worker_main(void *p)
{
	struct pool_worker *w = p;
	struct lp_threadpool *pool = w->pool;
	unsigned seen = 0; /* not the current value: a run may precede this line */

	for (;;) {
		if (!pool_poll(pool, seen, woken)) {
			pthread_mutex_lock(&pool->mu);
			atomic_fetch_add(&pool->sleeping, 1);
			while (atomic_load(&pool->wake) == seen)
				pthread_cond_wait(&pool->work_cv, &pool->mu);
			atomic_fetch_sub(&pool->sleeping, 1);
			pthread_mutex_unlock(&pool->mu);
		}
		seen = atomic_load_explicit(&pool->wake, memory_order_acquire);
		if (atomic_load(&pool->stop))
			break;
		pool_work(pool, w->index);
	}
	return NULL;
}

static void pool_wake(struct lp_threadpool *pool)
{
	atomic_fetch_add(&pool->wake, 1);
	if (atomic_load(&pool->sleeping) > 0) {
		pthread_mutex_lock(&pool->mu);
		pthread_cond_broadcast(&pool->work_cv);
		pthread_mutex_unlock(&pool->mu);
	}
}

int lp_threadpool_new(struct lp_threadpool **out, int n_threads, struct lp_err *err)
{
	struct lp_threadpool *pool;
	int rc;

	*out = NULL;
	if (n_threads < 1)
		return lp_errf(err, -EINVAL, "thread count %d is not positive", n_threads);
	pool = calloc(1, sizeof(*pool));
	if (!pool)
		return lp_errf(err, -ENOMEM, "out of memory for the thread pool");
	pool->n_threads = n_threads;
	atomic_init(&pool->claim, 0);
	atomic_init(&pool->finished, 0);
	atomic_init(&pool->wake, 0);
	atomic_init(&pool->sleeping, 0);
	atomic_init(&pool->stop, false);
	pthread_mutex_init(&pool->mu, NULL);
	pthread_cond_init(&pool->work_cv, NULL);
	pthread_cond_init(&pool->done_cv, NULL);
	if (n_threads > 1) {
		pool->workers = calloc((size_t)n_threads - 1, sizeof(*pool->workers));
		if (!pool->workers) {
			rc = lp_errf(err, -ENOMEM, "out of memory for the thread pool");
			goto out_free;
		}
	}
	for (int i = 1; i < n_threads; i++) {
		struct pool_worker *w = &pool->workers[i - 1];

		w->pool = pool;
		w->index = i;
		rc = pthread_create(&w->thread, NULL, pool_worker_main, w);
		if (rc != 0) {
			rc = lp_errf(err, -rc, "cannot start compute thread %d: %s", i,
			             strerror(rc));
			goto out_free;
		}
		pool->n_started++;
	}
	*out = pool;
	return 0;

out_free:
	lp_threadpool_free(pool);
	return rc;
}

void lp_threadpool_free(struct lp_threadpool *pool)
{
	if (!pool)
		return;
	if (pool->n_started > 0) {
		atomic_store(&pool->stop, true);
		pool_wake(pool);
		for (int i = 0; i < pool->n_started; i++)
			pthread_join(pool->workers[i].thread, NULL);
	}
	pthread_cond_destroy(&pool->done_cv);
	pthread_cond_destroy(&pool->work_cv);
	pthread_mutex_destroy(&pool->mu);
	free(pool->workers);
	free(pool);
}

int lp_threadpool_size(const struct lp_threadpool *pool)
{
	return pool->n_threads;
}

void lp_threadpool_run(struct lp_threadpool *pool, lp_threadpool_fn fn, void *arg, int n_chunks)
{
	if (pool->n_threads == 1 || n_chunks == 1 || n_chunks > LP_THREADPOOL_MAX_CHUNKS) {
		for (int c = 0; c < n_chunks; c++)
			fn(arg, c, n_chunks, 0);
		return;
	}
	pool->fn = fn;
	pool->arg = arg;
	atomic_store_explicit(&pool->finished, 0, memory_order_relaxed);
	pool->run++;
	atomic_store_explicit(&pool->claim, (uint64_t)pool->run << 32 | (uint64_t)n_chunks << 16,
	                      memory_order_release);
	pool_wake(pool);
	pool_work(pool, 0);
	if (pool_poll(pool, (unsigned)n_chunks, all_finished))
		return;
	pthread_mutex_lock(&pool->mu);
	while (atomic_load(&pool->finished) != n_chunks)
		pthread_cond_wait(&pool->done_cv, &pool->mu);
	pthread_mutex_unlock(&pool->mu);
}
