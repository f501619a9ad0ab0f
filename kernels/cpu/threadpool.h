/* A persistent pool of compute threads for the CPU backend.
 *
 * lp_threadpool_run() splits one op into n_chunks chunks and runs
 * fn(arg, chunk, n_chunks, thread) once for every chunk, on the calling
 * thread (thread 0) and the pool's workers (threads 1 .. size - 1), and
 * returns when every chunk has run. Threads claim chunks one at a time, so
 * a worker that the OS has not scheduled yet (a busy machine) delays the op
 * only by the chunk it holds, not by a fixed share. Between runs the
 * workers spin for a short while (ops come back to back during a forward
 * pass), then sleep on a condition variable.
 *
 * One thread at a time may call lp_threadpool_run(); fn must not call it.
 * The thread index lets fn use per-thread scratch: no two calls with the
 * same index run at once. */
#ifndef LP_KERNELS_CPU_THREADPOOL_H
#define LP_KERNELS_CPU_THREADPOOL_H

#include "common/err.h"

struct lp_threadpool;

typedef void (*lp_threadpool_fn)(void *arg, int chunk, int n_chunks, int thread);

/* Starts n_threads - 1 workers (n_threads >= 1). The caller frees *out with
 * lp_threadpool_free(). */
int lp_threadpool_new(struct lp_threadpool **out, int n_threads, struct lp_err *err);

/* Stops and joins the workers and frees the pool. NULL-safe. */
void lp_threadpool_free(struct lp_threadpool *pool);

int lp_threadpool_size(const struct lp_threadpool *pool);

/* Most chunks one run spreads over the pool; a run of more (no op of the
 * CPU backend makes one: it caps runs at a few chunks per thread) runs
 * every chunk on the caller, in order. */
#define LP_THREADPOOL_MAX_CHUNKS 0xffff

/* Runs fn for chunks 0 .. n_chunks - 1 (n_chunks >= 1); borrows arg until
 * it returns. */
void lp_threadpool_run(struct lp_threadpool *pool, lp_threadpool_fn fn, void *arg, int n_chunks);

#endif
