/* The CPU backend against naive double-precision references written here.
 *
 * Every op runs on three backends: AVX2 with several threads, the portable
 * C path (LP_CPU_NO_AVX2=1) with several threads, and AVX2 on one thread.
 * Inputs come from a fixed-seed generator; quantized weights are made by
 * quantizing random floats, and references use their dequantized values. */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kernels/backend.h"
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/threadpool.h"
#include "tests/test.h"

#define N_BACKENDS 3

static struct lp_backend *g_be[N_BACKENDS];
static const char *g_be_name[N_BACKENDS] = {"avx2x3", "scalar-x3", "avx2x1"};

static uint64_t rng_state = 0x5eed1234abcdULL;

static uint64_t rng_next(void)
{
	return test_splitmix64(&rng_state);
}

/* uniform in [lo, hi) */
static float frand(float lo, float hi)
{
	return lo + (hi - lo) * (float)((rng_next() >> 40) * (1.0 / 16777216.0));
}

static float *rand_floats(size_t n, float lo, float hi)
{
	float *p = malloc(n * sizeof(float));
	for (size_t i = 0; i < n; i++)
		p[i] = frand(lo, hi);
	return p;
}

static const enum lp_dtype weight_types[] = {LP_DTYPE_F32,  LP_DTYPE_F16,  LP_DTYPE_BF16,
                                             LP_DTYPE_Q8_0, LP_DTYPE_Q4_0, LP_DTYPE_Q4_1};
#define N_WEIGHT_TYPES (int)(sizeof(weight_types) / sizeof(weight_types[0]))

static float absmax(const float *x, int n)
{
	float a = 0.0f;
	for (int i = 0; i < n; i++)
		a = fabsf(x[i]) > a ? fabsf(x[i]) : a;
	return a;
}

static int clampi(int v, int lo, int hi)
{
	return v < lo ? lo : v > hi ? hi : v;
}

/* One row of n floats in type t at dst (lp_dtype_row_bytes(t, n) bytes). */
static void quantize_row(enum lp_dtype t, const float *x, void *dst, int64_t n)
{
	switch (t) {
	case LP_DTYPE_F32:
		memcpy(dst, x, (size_t)n * sizeof(float));
		break;
	case LP_DTYPE_F16:
		for (int64_t i = 0; i < n; i++)
			((uint16_t *)dst)[i] = lp_f32_to_f16(x[i]);
		break;
	case LP_DTYPE_BF16:
		for (int64_t i = 0; i < n; i++)
			((uint16_t *)dst)[i] = lp_f32_to_bf16(x[i]);
		break;
	case LP_DTYPE_Q8_0:
		for (int64_t b = 0; b < n / LP_QK; b++) {
			struct lp_block_q8_0 *blk = (struct lp_block_q8_0 *)dst + b;
			const float *xb = x + b * LP_QK;
			float d = absmax(xb, LP_QK) / 127.0f;
			blk->d = lp_f32_to_f16(d);
			for (int j = 0; j < LP_QK; j++)
				blk->qs[j] =
				    (int8_t)(d > 0 ? clampi((int)lrintf(xb[j] / d), -127, 127) : 0);
		}
		break;
	case LP_DTYPE_Q4_0:
		for (int64_t b = 0; b < n / LP_QK; b++) {
			struct lp_block_q4_0 *blk = (struct lp_block_q4_0 *)dst + b;
			const float *xb = x + b * LP_QK;
			float d = absmax(xb, LP_QK) / 7.0f;
			blk->d = lp_f32_to_f16(d);
			for (int j = 0; j < LP_QK / 2; j++) {
				int lo = d > 0 ? clampi((int)lrintf(xb[j] / d) + 8, 0, 15) : 8;
				int hi = d > 0 ? clampi((int)lrintf(xb[j + 16] / d) + 8, 0, 15) : 8;
				blk->qs[j] = (uint8_t)(lo | hi << 4);
			}
		}
		break;
	case LP_DTYPE_Q4_1:
		for (int64_t b = 0; b < n / LP_QK; b++) {
			struct lp_block_q4_1 *blk = (struct lp_block_q4_1 *)dst + b;
			const float *xb = x + b * LP_QK;
			float mn = xb[0], mx = xb[0];
			for (int j = 1; j < LP_QK; j++) {
				mn = xb[j] < mn ? xb[j] : mn;
				mx = xb[j] > mx ? xb[j] : mx;
			}
			float d = (mx - mn) / 15.0f;
			blk->d = lp_f32_to_f16(d);
			blk->m = lp_f32_to_f16(mn);
			for (int j = 0; j < LP_QK / 2; j++) {
				int lo = d > 0 ? clampi((int)lrintf((xb[j] - mn) / d), 0, 15) : 0;
				int hi =
				    d > 0 ? clampi((int)lrintf((xb[j + 16] - mn) / d), 0, 15) : 0;
				blk->qs[j] = (uint8_t)(lo | hi << 4);
			}
		}
		break;
	default:
		break;
	}
}

/* Random weights [m, k] of type t: *bytes holds the encoded matrix and
 * *deq its dequantized f32 values, both malloc'd. */
static void make_weights(enum lp_dtype t, int64_t m, int64_t k, void **bytes, float **deq)
{
	size_t rb = lp_dtype_row_bytes(t, k);
	float *src = rand_floats((size_t)(m * k), -1.0f, 1.0f);

	*bytes = malloc(rb * (size_t)m + 1);
	*deq = malloc((size_t)(m * k) * sizeof(float) + 1);
	for (int64_t r = 0; r < m; r++) {
		quantize_row(t, src + r * k, (char *)*bytes + rb * (size_t)r, k);
		lp_dequantize_row(t, (char *)*bytes + rb * (size_t)r, *deq + r * k, k);
	}
	free(src);
}

/* A device tensor [rows, cols] of type t holding host bytes. */
static int dev_tensor(struct lp_backend *be, struct lp_buffer *buf, struct lp_tensor *t,
                      enum lp_dtype type, int64_t rows, int64_t cols, const void *host)
{
	struct lp_err err = {0};
	size_t n = lp_dtype_row_bytes(type, cols) * (size_t)rows;
	int rc = lp_backend_alloc(be, n, buf, &err);

	if (rc)
		return rc;
	if (host)
		lp_backend_upload(be, buf->data, host, n);
	t->data = buf->data;
	t->type = type;
	t->rows = rows;
	t->cols = cols;
	return 0;
}

static void *download(struct lp_backend *be, const struct lp_tensor *t)
{
	size_t n = lp_tensor_bytes(t);
	void *p = malloc(n + 1);

	be->ops->synchronize(be->ctx);
	lp_backend_download(be, p, t->data, n);
	return p;
}

/* Largest |got - want| / scale over n values, scale[i] > 0. */
static double max_rel_err(const float *got, const double *want, const double *scale, size_t n,
                          size_t *where)
{
	double worst = 0.0;

	*where = 0;
	for (size_t i = 0; i < n; i++) {
		double e = fabs((double)got[i] - want[i]) / scale[i];
		if (!(e <= worst)) {
			worst = e;
			*where = i;
			if (isnan(e))
				return INFINITY;
		}
	}
	return worst;
}

static void test_memory(void)
{
	struct lp_err err = {0};

	for (int b = 0; b < N_BACKENDS; b++) {
		struct lp_backend *be = g_be[b];
		struct lp_buffer buf = {0}, imp = {0}, empty = {0};
		unsigned char host[1000], back[1000];

		CHECK_EQ_STR(be->ops->name, "cpu");
		CHECK_OK(lp_backend_alloc(be, 1000, &buf, &err), &err);
		CHECK(((uintptr_t)buf.data & 63) == 0);
		CHECK(buf.owned && buf.size == 1000);
		for (int i = 0; i < 1000; i++)
			CHECK_EQ_INT(((unsigned char *)buf.data)[i], 0);
		for (int i = 0; i < 1000; i++)
			host[i] = (unsigned char)(i * 7);
		lp_backend_upload(be, buf.data, host, sizeof(host));
		memset(back, 0, sizeof(back));
		be->ops->synchronize(be->ctx);
		lp_backend_download(be, back, buf.data, sizeof(back));
		CHECK(memcmp(host, back, sizeof(host)) == 0);
		lp_backend_free(be, &buf);
		CHECK(buf.data == NULL && buf.size == 0);
		lp_backend_free(be, &buf); /* zeroed buffer: no-op */

		CHECK_OK(lp_backend_import(be, host, sizeof(host), &imp, &err), &err);
		CHECK(imp.data == (void *)host && !imp.owned && imp.size == sizeof(host));
		lp_backend_free(be, &imp); /* must not free the host array */
		CHECK_EQ_INT(host[999], (unsigned char)(999 * 7));

		CHECK_OK(lp_backend_alloc(be, 0, &empty, &err), &err);
		lp_backend_free(be, &empty);
	}
}

static void test_create_errors(void)
{
	struct lp_err err = {0};
	struct lp_backend *be = (struct lp_backend *)&err;

	CHECK_EQ_INT(lp_backend_cpu_new(&be, -1, &err), -EINVAL);
	CHECK(be == NULL);
	CHECK(strstr(err.msg, "thread count -1") != NULL);
	CHECK_OK(lp_backend_cpu_new(&be, 0, &err), &err);
	lp_backend_destroy(be);
	lp_backend_destroy(NULL);
}

static void test_paths_selected(void)
{
	CHECK(!lp_backend_cpu_uses_avx2(g_be[1]));
	if (!lp_cpu_has_avx2()) {
		printf("note: this CPU has no AVX2; both paths are portable C\n");
		return;
	}
	CHECK(lp_backend_cpu_uses_avx2(g_be[0]));
	CHECK(lp_backend_cpu_uses_avx2(g_be[2]));
}

#define POOL_CHUNKS 37

struct pool_count {
	long chunk_runs[POOL_CHUNKS];
	int bad_args;
	int busy[8]; /* a thread index in use by two calls at once is a bug */
};

static void pool_count_fn(void *arg, int chunk, int n_chunks, int thread)
{
	struct pool_count *c = arg;

	if (chunk < 0 || chunk >= n_chunks || n_chunks != POOL_CHUNKS || thread < 0 ||
	    thread >= 4 || __atomic_fetch_add(&c->busy[thread], 1, __ATOMIC_SEQ_CST) != 0) {
		__atomic_fetch_add(&c->bad_args, 1, __ATOMIC_SEQ_CST);
		return;
	}
	__atomic_fetch_add(&c->chunk_runs[chunk], 1, __ATOMIC_SEQ_CST);
	__atomic_fetch_sub(&c->busy[thread], 1, __ATOMIC_SEQ_CST);
}

/* Every chunk runs exactly once per run, over thousands of back-to-back
 * runs and runs after the workers fell asleep. */
static void test_threadpool_runs(void)
{
	struct lp_err err = {0};
	struct lp_threadpool *pool = NULL;
	static struct pool_count c;

	CHECK_EQ_INT(lp_threadpool_new(&pool, 0, &err), -EINVAL);
	CHECK_OK(lp_threadpool_new(&pool, 4, &err), &err);
	CHECK_EQ_INT(lp_threadpool_size(pool), 4);
	for (int i = 0; i < 5000; i++)
		lp_threadpool_run(pool, pool_count_fn, &c, POOL_CHUNKS);
	for (int i = 0; i < 3; i++) {
		struct timespec ts = {0, 20 * 1000 * 1000};
		nanosleep(&ts, NULL);
		lp_threadpool_run(pool, pool_count_fn, &c, POOL_CHUNKS);
	}
	lp_threadpool_free(pool);
	CHECK_EQ_INT(c.bad_args, 0);
	for (int k = 0; k < POOL_CHUNKS; k++)
		CHECK_EQ_INT(c.chunk_runs[k], 5003);
}

struct pool_run {
	int n_chunks;
	int calls;
	int bad;
};

static struct pool_run *volatile g_pool_run; /* the run in progress */

static void pool_run_fn(void *arg, int chunk, int n_chunks, int thread)
{
	struct pool_run *r = arg;

	if (r != g_pool_run || n_chunks != r->n_chunks || chunk < 0 || chunk >= n_chunks)
		__atomic_fetch_add(&r->bad, 1, __ATOMIC_SEQ_CST);
	__atomic_fetch_add(&r->calls, 1, __ATOMIC_SEQ_CST);
}

/* Back-to-back runs of different chunk counts, as consecutive ops make
 * them: a worker still holding the end of one run must not claim a chunk
 * of the next run's count (it once could, between the count's store and
 * the claim word's: a chunk that does not exist ran, and the caller then
 * waited for ever or returned with a chunk still running). Each run gets
 * exactly its own chunks, none after it returned. */
static void test_threadpool_changing_counts(void)
{
	struct lp_err err = {0};
	struct lp_threadpool *pool = NULL;
	struct pool_run runs[2];
	int wrong = 0;

	alarm(120); /* the bug hung the caller: die with SIGALRM instead */
	CHECK_OK(lp_threadpool_new(&pool, 3, &err), &err);
	for (int i = 0; i < 200000 && !wrong; i++) {
		struct pool_run *r = &runs[i & 1];

		*r = (struct pool_run){.n_chunks = i % 3 == 0 ? 9 : 2 + i % 7};
		g_pool_run = r;
		lp_threadpool_run(pool, pool_run_fn, r, r->n_chunks);
		g_pool_run = NULL;
		if (__atomic_load_n(&r->calls, __ATOMIC_SEQ_CST) != r->n_chunks ||
		    __atomic_load_n(&r->bad, __ATOMIC_SEQ_CST)) {
			TEST_FAIL("run %d of %d chunks: %d calls, %d wrong", i, r->n_chunks,
			          r->calls, r->bad);
			wrong = 1;
		}
		/* a late call into the previous run shows up there */
		if (i && (__atomic_load_n(&runs[(i - 1) & 1].calls, __ATOMIC_SEQ_CST) !=
		              runs[(i - 1) & 1].n_chunks ||
		          __atomic_load_n(&runs[(i - 1) & 1].bad, __ATOMIC_SEQ_CST))) {
			TEST_FAIL("run %d: a chunk of it ran after it returned", i - 1);
			wrong = 1;
		}
	}
	lp_threadpool_free(pool);
	alarm(0);
}

struct mm_shape {
	int n, k, m;
};

/* out (+)= x . w^T for one type and shape on one backend, against double. */
static int check_matmul(struct lp_backend *be, const char *bname, enum lp_dtype t,
                        struct mm_shape s, bool accumulate)
{
	struct lp_buffer bx = {0}, bw = {0}, bo = {0};
	struct lp_tensor tx, tw, to;
	void *wbytes;
	float *wdeq, *x, *out0, *got;
	double *want, *scale;
	size_t where;
	int ok = 0;

	make_weights(t, s.m, s.k, &wbytes, &wdeq);
	x = rand_floats((size_t)s.n * s.k, -1.0f, 1.0f);
	out0 = rand_floats((size_t)s.n * s.m, -2.0f, 2.0f);
	want = malloc((size_t)s.n * s.m * sizeof(double));
	scale = malloc((size_t)s.n * s.m * sizeof(double));
	for (int i = 0; i < s.n; i++) {
		for (int r = 0; r < s.m; r++) {
			double acc = accumulate ? out0[i * s.m + r] : 0.0, mag = 0.0;
			for (int kk = 0; kk < s.k; kk++) {
				double p = (double)x[i * s.k + kk] * wdeq[r * s.k + kk];
				acc += p;
				mag += fabs(p);
			}
			want[i * s.m + r] = acc;
			scale[i * s.m + r] =
			    mag + (accumulate ? fabs(out0[i * s.m + r]) : 0) + 1e-6;
		}
	}
	if (dev_tensor(be, &bx, &tx, LP_DTYPE_F32, s.n, s.k, x) ||
	    dev_tensor(be, &bw, &tw, t, s.m, s.k, wbytes) ||
	    dev_tensor(be, &bo, &to, LP_DTYPE_F32, s.n, s.m, out0)) {
		TEST_FAIL("allocation failed");
		goto out;
	}
	be->ops->matmul(be->ctx, &to, &tx, &tw, accumulate);
	got = download(be, &to);
	double e = max_rel_err(got, want, scale, (size_t)s.n * s.m, &where);
	if (e > 1e-5) {
		TEST_FAIL("%s matmul %s n=%d k=%d m=%d acc=%d: relative error %g at [%zu, %zu] "
		          "(got %g, want %g)",
		          bname, lp_dtype_name(t), s.n, s.k, s.m, accumulate, e, where / s.m,
		          where % s.m, got[where], want[where]);
	} else {
		ok = 1;
	}
	free(got);
out:
	lp_backend_free(be, &bx);
	lp_backend_free(be, &bw);
	lp_backend_free(be, &bo);
	free(wbytes);
	free(wdeq);
	free(x);
	free(out0);
	free(want);
	free(scale);
	return ok;
}

static void test_matmul_all_types(void)
{
	/* small n (the matrix-vector path up to each type's crossover,
	 * test_matvec_crossover) and large (the GEMM); m not a multiple of the
	 * panel width or the thread count; k spanning several GEMM chunks */
	static const struct mm_shape shapes[] = {
	    {1, 32, 1},     {1, 576, 3},   {2, 96, 17},    {3, 64, 5},
	    {4, 576, 1536}, {1, 1024, 40}, {5, 576, 17},   {64, 288, 33},
	    {513, 96, 18},  {7, 800, 100}, {2, 576, 1536},
	};
	static const struct mm_shape plain_shapes[] = {
	    {1, 37, 5}, {3, 7, 9}, {6, 300, 19}, {4, 17, 3}, {9, 1, 2},
	};

	for (int b = 0; b < N_BACKENDS; b++) {
		for (int ti = 0; ti < N_WEIGHT_TYPES; ti++) {
			enum lp_dtype t = weight_types[ti];
			for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++)
				for (int acc = 0; acc < 2; acc++)
					if (!check_matmul(g_be[b], g_be_name[b], t, shapes[si],
					                  acc))
						return;
			if (lp_dtype_block(t) != 1)
				continue;
			for (size_t si = 0; si < sizeof(plain_shapes) / sizeof(plain_shapes[0]);
			     si++)
				for (int acc = 0; acc < 2; acc++)
					if (!check_matmul(g_be[b], g_be_name[b], t,
					                  plain_shapes[si], acc))
						return;
		}
	}
}

/* Around each type's matrix-vector crossover, and up to its largest, both
 * paths (forced with LP_CPU_MATVEC_BATCH) give the reference product; the
 * knob takes 0 .. LP_CPU_MATVEC_BATCH_MAX only. */
static void test_matvec_crossover(void)
{
	struct lp_err err = {0};
	struct lp_backend *be[2] = {NULL, NULL}, *bad = (struct lp_backend *)&err;
	static const char *const names[2] = {"gemm-forced", "matvec-forced"};

	setenv("LP_CPU_MATVEC_BATCH", "33", 1);
	CHECK_EQ_INT(lp_backend_cpu_new(&bad, 2, &err), -EINVAL);
	CHECK(bad == NULL && strstr(err.msg, "LP_CPU_MATVEC_BATCH='33'"));
	setenv("LP_CPU_MATVEC_BATCH", "4x", 1);
	CHECK_EQ_INT(lp_backend_cpu_new(&bad, 2, &err), -EINVAL);
	setenv("LP_CPU_MATVEC_BATCH", "0", 1);
	int rc = lp_backend_cpu_new(&be[0], 3, &err);
	setenv("LP_CPU_MATVEC_BATCH", "32", 1);
	if (!rc)
		rc = lp_backend_cpu_new(&be[1], 3, &err);
	unsetenv("LP_CPU_MATVEC_BATCH");
	if (rc) {
		lp_backend_destroy(be[0]);
		CHECK_OK(rc, &err);
	}
	for (int ti = 0; ti < N_WEIGHT_TYPES; ti++) {
		enum lp_dtype t = weight_types[ti];
		int c = lp_cpu_matvec_batch_default(t, lp_backend_cpu_uses_avx512(be[1]));
		const int ns[] = {1, c, c + 1, LP_CPU_MATVEC_BATCH_MAX};
		CHECK(c >= 1 && c <= LP_CPU_MATVEC_BATCH_MAX);
		for (int b = 0; b < 2; b++)
			for (size_t i = 0; i < sizeof(ns) / sizeof(ns[0]); i++)
				if (!check_matmul(be[b], names[b], t,
				                  (struct mm_shape){ns[i], 576, 40}, i % 2))
					goto out;
	}
out:
	lp_backend_destroy(be[0]);
	lp_backend_destroy(be[1]);
}

/* Prefill-sized product (n = 513 rows) on the two multi-threaded paths. */
static void test_matmul_prefill(void)
{
	struct mm_shape s = {513, 576, 70};

	for (int b = 0; b < 2; b++)
		for (int ti = 0; ti < N_WEIGHT_TYPES; ti++)
			if (!check_matmul(g_be[b], g_be_name[b], weight_types[ti], s, ti % 2))
				return;
}

/* Output elements do not depend on the thread count. */
static void test_matmul_thread_invariant(void)
{
	struct lp_err err = {0};
	struct lp_backend *one[2] = {NULL, NULL};
	static const struct mm_shape shapes[] = {{1, 576, 1536}, {3, 96, 37}, {70, 288, 53}};

	CHECK_OK(lp_backend_cpu_new(&one[0], 1, &err), &err);
	setenv("LP_CPU_NO_AVX2", "1", 1);
	int rc = lp_backend_cpu_new(&one[1], 1, &err);
	unsetenv("LP_CPU_NO_AVX2");
	if (rc) {
		lp_backend_destroy(one[0]);
		CHECK_OK(rc, &err);
	}
	for (int path = 0; path < 2; path++) {
		struct lp_backend *many = g_be[path]; /* 3 threads, same path */
		for (int ti = 0; ti < N_WEIGHT_TYPES; ti++) {
			for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
				struct mm_shape s = shapes[si];
				enum lp_dtype t = weight_types[ti];
				struct lp_buffer bx = {0}, bw = {0}, bo1 = {0}, bo2 = {0};
				struct lp_tensor tx, tw, to1, to2;
				void *wbytes;
				float *wdeq, *x = rand_floats((size_t)s.n * s.k, -1, 1);
				int same = 0;

				make_weights(t, s.m, s.k, &wbytes, &wdeq);
				/* the CPU backend's memory is host memory: one set of
				 * buffers serves both backends */
				if (!dev_tensor(many, &bx, &tx, LP_DTYPE_F32, s.n, s.k, x) &&
				    !dev_tensor(many, &bw, &tw, t, s.m, s.k, wbytes) &&
				    !dev_tensor(many, &bo1, &to1, LP_DTYPE_F32, s.n, s.m, NULL) &&
				    !dev_tensor(many, &bo2, &to2, LP_DTYPE_F32, s.n, s.m, NULL)) {
					one[path]->ops->matmul(one[path]->ctx, &to1, &tx, &tw,
					                       false);
					many->ops->matmul(many->ctx, &to2, &tx, &tw, false);
					same =
					    memcmp(bo1.data, bo2.data, lp_tensor_bytes(&to1)) == 0;
				}
				lp_backend_free(many, &bx);
				lp_backend_free(many, &bw);
				lp_backend_free(many, &bo1);
				lp_backend_free(many, &bo2);
				free(wbytes);
				free(wdeq);
				free(x);
				if (!same) {
					lp_backend_destroy(one[0]);
					lp_backend_destroy(one[1]);
					CHECK_MSG(0, "%s %s n=%d k=%d m=%d: 1 and 3 threads differ",
					          g_be_name[path], lp_dtype_name(t), s.n, s.k, s.m);
				}
			}
		}
	}
	lp_backend_destroy(one[0]);
	lp_backend_destroy(one[1]);
}

static void test_get_rows(void)
{
	for (int b = 0; b < N_BACKENDS; b++) {
		struct lp_backend *be = g_be[b];
		for (int ti = 0; ti < N_WEIGHT_TYPES; ti++) {
			enum lp_dtype t = weight_types[ti];
			int64_t rows = 50, cols = t == LP_DTYPE_F32 ? 37 : 96;
			int32_t ids[7] = {3, 0, 49, 3, 17, 49, 0};
			struct lp_buffer bt = {0}, bo = {0}, bi = {0};
			struct lp_tensor tt, to, ti32;
			void *bytes;
			float *deq, *got = NULL;
			int bad = -1;

			if (lp_dtype_block(t) == 1 && t != LP_DTYPE_F32)
				cols = 41;
			make_weights(t, rows, cols, &bytes, &deq);
			if (!dev_tensor(be, &bt, &tt, t, rows, cols, bytes) &&
			    !dev_tensor(be, &bo, &to, LP_DTYPE_F32, 7, cols, NULL) &&
			    !dev_tensor(be, &bi, &ti32, LP_DTYPE_I32, 1, 7, ids)) {
				memset(bo.data, 0x7f, bo.size);
				be->ops->get_rows(be->ctx, &to, &tt, ti32.data, 7);
				got = download(be, &to);
				for (int i = 0; i < 7 && bad < 0; i++) {
					for (int64_t c = 0; c < cols; c++) {
						float want = deq[ids[i] * cols + c];
						if (got[i * cols + c] != want) {
							bad = i;
							break;
						}
					}
				}
			}
			lp_backend_free(be, &bt);
			lp_backend_free(be, &bo);
			lp_backend_free(be, &bi);
			free(bytes);
			free(deq);
			free(got);
			CHECK_MSG(got != NULL, "allocation failed");
			CHECK_MSG(bad < 0,
			          "%s get_rows %s: row %d differs from the dequantized table",
			          g_be_name[b], lp_dtype_name(t), bad);
		}
	}
}

static void test_rmsnorm(void)
{
	static const int shapes[][2] = {{1, 576}, {3, 17}, {513, 64}, {2, 1}};

	for (int b = 0; b < N_BACKENDS; b++) {
		struct lp_backend *be = g_be[b];
		for (int si = 0; si < 4; si++) {
			for (int inplace = 0; inplace < 2; inplace++) {
				int rows = shapes[si][0], cols = shapes[si][1];
				float eps = 1e-5f;
				float *x = rand_floats((size_t)rows * cols, -3, 3);
				float *w = rand_floats((size_t)cols, 0.5f, 1.5f);
				struct lp_buffer bx = {0}, bw = {0}, bo = {0};
				struct lp_tensor tx, tw, to;
				float *got = NULL;
				double worst = 0;

				if (!dev_tensor(be, &bx, &tx, LP_DTYPE_F32, rows, cols, x) &&
				    !dev_tensor(be, &bw, &tw, LP_DTYPE_F32, 1, cols, w) &&
				    !dev_tensor(be, &bo, &to, LP_DTYPE_F32, rows, cols, NULL)) {
					struct lp_tensor *o = inplace ? &tx : &to;
					be->ops->rmsnorm(be->ctx, o, &tx, &tw, eps);
					got = download(be, o);
					for (int r = 0; r < rows; r++) {
						double ss = 0;
						for (int c = 0; c < cols; c++)
							ss += (double)x[r * cols + c] *
							      x[r * cols + c];
						double inv = 1.0 / sqrt(ss / cols + eps);
						for (int c = 0; c < cols; c++) {
							double want = x[r * cols + c] * inv * w[c];
							double e = fabs(got[r * cols + c] - want) /
							           (fabs(want) + 1e-6);
							worst = e > worst ? e : worst;
						}
					}
				}
				lp_backend_free(be, &bx);
				lp_backend_free(be, &bw);
				lp_backend_free(be, &bo);
				free(x);
				free(w);
				free(got);
				CHECK_MSG(got != NULL, "allocation failed");
				CHECK_MSG(worst < 1e-5, "%s rmsnorm [%d, %d] inplace=%d: error %g",
				          g_be_name[b], rows, cols, inplace, worst);
			}
		}
	}
}

enum ew_op { EW_ADD, EW_ADD_BIAS, EW_SILU_MUL, EW_SILU_MUL_INPLACE };

static void test_elementwise(void)
{
	static const int shapes[][2] = {{1, 5}, {3, 17}, {513, 576}};
	static const char *names[] = {"add", "add_bias", "silu_mul", "silu_mul in place"};

	for (int b = 0; b < N_BACKENDS; b++) {
		struct lp_backend *be = g_be[b];
		for (int op = EW_ADD; op <= EW_SILU_MUL_INPLACE; op++) {
			for (int si = 0; si < 3; si++) {
				int rows = shapes[si][0], cols = shapes[si][1];
				size_t n = (size_t)rows * cols;
				float *a = rand_floats(n, -8, 8), *c = rand_floats(n, -2, 2);
				struct lp_buffer ba = {0}, bc = {0}, bo = {0};
				struct lp_tensor ta, tc, to;
				float *got = NULL;
				double worst = 0;
				int crow = op == EW_ADD_BIAS ? 1 : rows;

				if (!dev_tensor(be, &ba, &ta, LP_DTYPE_F32, rows, cols, a) &&
				    !dev_tensor(be, &bc, &tc, LP_DTYPE_F32, crow, cols, c) &&
				    !dev_tensor(be, &bo, &to, LP_DTYPE_F32, rows, cols, NULL)) {
					struct lp_tensor *res = &ta;
					if (op == EW_ADD)
						be->ops->add(be->ctx, &ta, &tc);
					else if (op == EW_ADD_BIAS)
						be->ops->add_bias(be->ctx, &ta, &tc);
					else if (op == EW_SILU_MUL)
						be->ops->silu_mul(be->ctx, res = &to, &ta, &tc);
					else
						be->ops->silu_mul(be->ctx, &ta, &ta, &tc);
					got = download(be, res);
					for (size_t i = 0; i < n; i++) {
						double x = a[i],
						       y = c[op == EW_ADD_BIAS ? i % cols : i];
						double want = op <= EW_ADD_BIAS
						                  ? x + y
						                  : x / (1 + exp(-x)) * y;
						double e =
						    fabs(got[i] - want) / (fabs(want) + 1e-6);
						worst = e > worst ? e : worst;
					}
				}
				lp_backend_free(be, &ba);
				lp_backend_free(be, &bc);
				lp_backend_free(be, &bo);
				free(a);
				free(c);
				free(got);
				CHECK_MSG(got != NULL, "allocation failed");
				CHECK_MSG(worst < 1e-6, "%s %s [%d, %d]: error %g", g_be_name[b],
				          names[op], rows, cols, worst);
			}
		}
	}
}

static void test_rope(void)
{
	enum { N = 6, HEADS = 3, HD = 64, NPOS = 131072 };
	int32_t pos[N] = {0, 1, 7, 4095, 32767, 131071};
	float inv_freq[HD / 2];
	float *table = malloc((size_t)NPOS * HD * sizeof(float));

	CHECK(table != NULL);
	for (int i = 0; i < HD / 2; i++)
		inv_freq[i] = (float)(1.0 / pow(10000.0, 2.0 * i / HD));
	/* the table as lp_model_rope_table makes it */
	for (int p = 0; p < NPOS; p++)
		for (int i = 0; i < HD / 2; i++) {
			float ang = (float)p * inv_freq[i];
			table[(size_t)p * HD + i] = cosf(ang);
			table[(size_t)p * HD + HD / 2 + i] = sinf(ang);
		}
	for (int b = 0; b < N_BACKENDS; b++) {
		struct lp_backend *be = g_be[b];
		/* x has one extra column past the heads, which rope leaves alone */
		int cols = HEADS * HD + 1;
		float *x = rand_floats((size_t)N * cols, -1, 1);
		struct lp_buffer bx = {0}, bf = {0}, bp = {0};
		struct lp_tensor tx, tf, tp;
		float *got = NULL;
		double worst = 0;

		if (!dev_tensor(be, &bx, &tx, LP_DTYPE_F32, N, cols, x) &&
		    !dev_tensor(be, &bf, &tf, LP_DTYPE_F32, NPOS, HD, table) &&
		    !dev_tensor(be, &bp, &tp, LP_DTYPE_I32, 1, N, pos)) {
			be->ops->rope(be->ctx, &tx, HEADS, HD, tp.data, &tf);
			got = download(be, &tx);
			for (int t = 0; t < N; t++) {
				for (int h = 0; h < HEADS; h++) {
					for (int i = 0; i < HD / 2; i++) {
						/* the angle as HF forms it: an f32 product */
						float ang = (float)pos[t] * inv_freq[i];
						double c = cos((double)ang), s = sin((double)ang);
						int j0 = t * cols + h * HD + i, j1 = j0 + HD / 2;
						double w0 = x[j0] * c - x[j1] * s;
						double w1 = x[j1] * c + x[j0] * s;
						double e0 = fabs(got[j0] - w0),
						       e1 = fabs(got[j1] - w1);
						worst = e0 > worst ? e0 : worst;
						worst = e1 > worst ? e1 : worst;
					}
				}
				if (got[t * cols + cols - 1] != x[t * cols + cols - 1])
					worst = INFINITY;
			}
		}
		lp_backend_free(be, &bx);
		lp_backend_free(be, &bf);
		lp_backend_free(be, &bp);
		free(x);
		free(got);
		if (!got || worst >= 2e-6) {
			free(table);
			CHECK_MSG(got != NULL, "allocation failed");
			CHECK_MSG(worst < 2e-6, "%s rope: error %g", g_be_name[b], worst);
		}
	}
	free(table);
}

static void test_kv_store(void)
{
	enum { ROWS = 5, COLS = 40, CACHE = 64 };
	int32_t slots[ROWS] = {17, 0, 63, 40, -1}; /* the last is padding: skipped */

	for (int b = 0; b < N_BACKENDS; b++) {
		struct lp_backend *be = g_be[b];
		for (int ct = 0; ct < 3; ct++) {
			enum lp_dtype type = ct == 2 ? LP_DTYPE_BF16
			                     : ct    ? LP_DTYPE_F16
			                             : LP_DTYPE_F32;
			float *k = rand_floats(ROWS * COLS, -4, 4),
			      *v = rand_floats(ROWS * COLS, -4, 4);
			struct lp_buffer bk = {0}, bv = {0}, bkc = {0}, bvc = {0}, bs = {0};
			struct lp_tensor tk, tv, tkc, tvc, ts;
			int bad = -1;
			char *kc = NULL, *vc = NULL;

			if (!dev_tensor(be, &bk, &tk, LP_DTYPE_F32, ROWS, COLS, k) &&
			    !dev_tensor(be, &bv, &tv, LP_DTYPE_F32, ROWS, COLS, v) &&
			    !dev_tensor(be, &bkc, &tkc, type, CACHE, COLS, NULL) &&
			    !dev_tensor(be, &bvc, &tvc, type, CACHE, COLS, NULL) &&
			    !dev_tensor(be, &bs, &ts, LP_DTYPE_I32, 1, ROWS, slots)) {
				be->ops->kv_store(be->ctx, &tkc, &tvc, &tk, &tv, ts.data);
				kc = download(be, &tkc);
				vc = download(be, &tvc);
				size_t rb = lp_dtype_row_bytes(type, COLS);
				for (int slot = 0; slot < CACHE && bad < 0; slot++) {
					int src = -1;
					for (int r = 0; r < ROWS; r++)
						src = slots[r] == slot ? r : src;
					for (int c = 0; c < COLS; c++) {
						float gk, gv, wk = 0, wv = 0;
						if (type == LP_DTYPE_F32) {
							gk = ((float *)(kc + slot * rb))[c];
							gv = ((float *)(vc + slot * rb))[c];
						} else if (type == LP_DTYPE_BF16) {
							gk = lp_bf16_to_f32(
							    ((uint16_t *)(kc + slot * rb))[c]);
							gv = lp_bf16_to_f32(
							    ((uint16_t *)(vc + slot * rb))[c]);
						} else {
							gk = lp_f16_to_f32(
							    ((uint16_t *)(kc + slot * rb))[c]);
							gv = lp_f16_to_f32(
							    ((uint16_t *)(vc + slot * rb))[c]);
						}
						if (src >= 0 && type == LP_DTYPE_F32) {
							wk = k[src * COLS + c];
							wv = v[src * COLS + c];
						} else if (src >= 0 && type == LP_DTYPE_BF16) {
							wk = lp_bf16_to_f32(
							    lp_f32_to_bf16(k[src * COLS + c]));
							wv = lp_bf16_to_f32(
							    lp_f32_to_bf16(v[src * COLS + c]));
						} else if (src >= 0) {
							wk = lp_f16_to_f32(
							    lp_f32_to_f16(k[src * COLS + c]));
							wv = lp_f16_to_f32(
							    lp_f32_to_f16(v[src * COLS + c]));
						}
						if (gk != wk || gv != wv) {
							bad = slot;
							break;
						}
					}
				}
			}
			lp_backend_free(be, &bk);
			lp_backend_free(be, &bv);
			lp_backend_free(be, &bkc);
			lp_backend_free(be, &bvc);
			lp_backend_free(be, &bs);
			free(k);
			free(v);
			free(vc);
			free(kc);
			CHECK_MSG(kc != NULL, "allocation failed");
			CHECK_MSG(bad < 0, "%s kv_store %s: cache row %d is wrong", g_be_name[b],
			          lp_dtype_name(type), bad);
		}
	}
}

/* Three sequences in one call: a decode token at position 0, a prefill chunk
 * (positions 20..36 of a 37-token sequence) and a decode token at position
 * 1000; block size 16, block tables shuffled over the pool, GQA 6:2. */
static int check_attention(struct lp_backend *be, const char *bname, enum lp_dtype ct, int hd)
{
	enum { BS = 16, MAXB = 64, NBLK = 3 * MAXB, NSEQ = 3, NH = 6, NKV = 2 };
	int n_tok = 1 + 17 + 1;
	int32_t tok_seq[19], tok_pos[19], tables[NSEQ * MAXB], perm[NBLK];
	int64_t crow = (int64_t)NBLK * BS, ccols = NKV * hd, qcols = NH * hd;
	size_t rb = lp_dtype_row_bytes(ct, ccols);
	float *kf = rand_floats((size_t)(crow * ccols), -1, 1);
	float *vf = rand_floats((size_t)(crow * ccols), -1, 1);
	float *q = rand_floats((size_t)n_tok * qcols, -2, 2);
	char *kbytes = malloc(rb * (size_t)crow), *vbytes = malloc(rb * (size_t)crow);
	struct lp_buffer bq = {0}, bk = {0}, bv = {0}, bo = {0}, bs = {0}, bp = {0}, bt = {0};
	struct lp_tensor tq, tk, tv, to, ts, tp, tt;
	float *got = NULL;
	double worst = 0;
	int ok = 0;

	/* cache contents as the kernel will read them */
	for (int64_t r = 0; r < crow; r++) {
		quantize_row(ct, kf + r * ccols, kbytes + r * rb, ccols);
		quantize_row(ct, vf + r * ccols, vbytes + r * rb, ccols);
		lp_dequantize_row(ct, kbytes + r * rb, kf + r * ccols, ccols);
		lp_dequantize_row(ct, vbytes + r * rb, vf + r * ccols, ccols);
	}
	for (int i = 0; i < NBLK; i++)
		perm[i] = i;
	for (int i = NBLK - 1; i > 0; i--) {
		int j = (int)(rng_next() % (uint64_t)(i + 1)), tmp = perm[i];
		perm[i] = perm[j];
		perm[j] = tmp;
	}
	for (int i = 0; i < NSEQ * MAXB; i++)
		tables[i] = perm[i];
	tok_seq[0] = 0;
	tok_pos[0] = 0;
	for (int i = 0; i < 17; i++) {
		tok_seq[1 + i] = 1;
		tok_pos[1 + i] = 20 + i;
	}
	tok_seq[18] = 2;
	tok_pos[18] = 1000;

	struct lp_attention_args a = {
	    .n_tokens = n_tok,
	    .n_heads = NH,
	    .n_kv_heads = NKV,
	    .head_dim = hd,
	    .block_size = BS,
	    .max_blocks_per_seq = MAXB,
	    .scale = 1.0f / sqrtf((float)hd),
	    .q = &tq,
	    .k_cache = &tk,
	    .v_cache = &tv,
	    .out = &to,
	};
	if (dev_tensor(be, &bq, &tq, LP_DTYPE_F32, n_tok, qcols, q) ||
	    dev_tensor(be, &bk, &tk, ct, crow, ccols, kbytes) ||
	    dev_tensor(be, &bv, &tv, ct, crow, ccols, vbytes) ||
	    dev_tensor(be, &bo, &to, LP_DTYPE_F32, n_tok, qcols, NULL) ||
	    dev_tensor(be, &bs, &ts, LP_DTYPE_I32, 1, n_tok, tok_seq) ||
	    dev_tensor(be, &bp, &tp, LP_DTYPE_I32, 1, n_tok, tok_pos) ||
	    dev_tensor(be, &bt, &tt, LP_DTYPE_I32, NSEQ, MAXB, tables)) {
		TEST_FAIL("allocation failed");
		goto out;
	}
	a.tok_seq = ts.data;
	a.tok_pos = tp.data;
	a.block_tables = tt.data;
	be->ops->attention(be->ctx, &a);
	got = download(be, &to);

	for (int t = 0; t < n_tok; t++) {
		for (int h = 0; h < NH; h++) {
			int kvh = h / (NH / NKV), np = tok_pos[t] + 1;
			const float *qv = q + t * qcols + h * hd;
			double *sc = malloc((size_t)np * sizeof(double)), mx = -INFINITY, l = 0;
			for (int p = 0; p < np; p++) {
				int64_t row =
				    (int64_t)tables[tok_seq[t] * MAXB + p / BS] * BS + p % BS;
				double s = 0;
				for (int d = 0; d < hd; d++)
					s += (double)qv[d] * kf[row * ccols + kvh * hd + d];
				sc[p] = s / sqrt((double)hd);
				mx = sc[p] > mx ? sc[p] : mx;
			}
			for (int p = 0; p < np; p++)
				l += sc[p] = exp(sc[p] - mx);
			for (int d = 0; d < hd; d++) {
				double want = 0;
				for (int p = 0; p < np; p++) {
					int64_t row =
					    (int64_t)tables[tok_seq[t] * MAXB + p / BS] * BS +
					    p % BS;
					want += sc[p] / l * vf[row * ccols + kvh * hd + d];
				}
				double e = fabs(got[t * qcols + h * hd + d] - want);
				worst = e > worst ? e : worst;
			}
			free(sc);
		}
	}
	if (worst > 2e-6)
		TEST_FAIL("%s attention %s head_dim %d: error %g", bname, lp_dtype_name(ct), hd,
		          worst);
	else
		ok = 1;
out:
	lp_backend_free(be, &bq);
	lp_backend_free(be, &bk);
	lp_backend_free(be, &bv);
	lp_backend_free(be, &bo);
	lp_backend_free(be, &bs);
	lp_backend_free(be, &bp);
	lp_backend_free(be, &bt);
	free(kf);
	free(vf);
	free(q);
	free(kbytes);
	free(vbytes);
	free(got);
	return ok;
}

static void test_attention(void)
{
	for (int b = 0; b < N_BACKENDS; b++) {
		CHECK(check_attention(g_be[b], g_be_name[b], LP_DTYPE_F32, 64));
		CHECK(check_attention(g_be[b], g_be_name[b], LP_DTYPE_F16, 64));
		CHECK(check_attention(g_be[b], g_be_name[b], LP_DTYPE_F32, 36));
		CHECK(check_attention(g_be[b], g_be_name[b], LP_DTYPE_F16, 20));
	}
}

static void test_backend_info(void)
{
	struct lp_backend_info info;
	struct lp_backend_limits lim = {.max_loras = 4, .vocab = 100, .max_logprobs = 5};
	struct lp_err err = {0};
	size_t bytes = 1;
	float w[6] = {1, 2, 3, 4, 5, 6};
	struct lp_tensor t;
	struct lp_buffer b = {0};
	void *h = NULL;

	g_be[0]->ops->info(g_be[0]->ctx, &info);
	CHECK(!strcmp(info.name, "cpu"));
	CHECK(info.host_memory && info.token_buckets == 0);
	CHECK(info.kv_type == LP_DTYPE_F32);
	CHECK(info.total_bytes > 0 && info.free_bytes <= info.total_bytes);
	CHECK(info.weight_types & (1u << LP_DTYPE_Q4_1));
	CHECK(!(info.weight_types & (1u << LP_DTYPE_I32)));
	/* one reservation at a time; reserve(NULL) gives it back */
	CHECK_OK(g_be[0]->ops->reserve(g_be[0]->ctx, &lim, &bytes, &err), &err);
	CHECK_EQ_INT(g_be[0]->ops->reserve(g_be[0]->ctx, &lim, &bytes, &err), -EBUSY);
	CHECK_OK(g_be[0]->ops->reserve(g_be[0]->ctx, NULL, &bytes, &err), &err);
	CHECK_OK(g_be[0]->ops->reserve(g_be[0]->ctx, &lim, &bytes, &err), &err);
	CHECK_OK(g_be[0]->ops->reserve(g_be[0]->ctx, NULL, &bytes, &err), &err);
	/* weights keep their type and alias the host bytes */
	CHECK_OK(g_be[0]->ops->import_weight(g_be[0]->ctx, w, LP_DTYPE_F32, 2, 3, &t, &b, &err),
	         &err);
	CHECK(t.data == (void *)w && t.type == LP_DTYPE_F32 && t.rows == 2 && t.cols == 3);
	lp_backend_free(g_be[0], &b);
	CHECK_EQ_INT(
	    g_be[0]->ops->import_weight(g_be[0]->ctx, w, LP_DTYPE_Q4_0, 1, 6, &t, &b, &err),
	    -EINVAL);
	CHECK_OK(g_be[0]->ops->host_alloc(g_be[0]->ctx, 100, &h, &err), &err);
	CHECK(h != NULL);
	g_be[0]->ops->host_free(g_be[0]->ctx, h);
	CHECK_OK(lp_backend_status(g_be[0], &err), &err);
}

/* mask_logits: a row with a mask gets exactly -inf at the tokens whose bit
 * is 0 and keeps every other logit (NaN and +-inf too); a row with mask -1,
 * the rows past n and the columns past the vocabulary are untouched. Masks:
 * random bits, all allowed, one token allowed, and garbage bits past the
 * vocabulary; vocabularies that end inside a word and one that does not;
 * two rows sharing a mask row. */
static bool check_mask(struct lp_backend *be, const char *name, int vocab, int n, int words_pad)
{
	const int words = (vocab + 31) / 32 + words_pad, n_masks = 4, rows = n + 1;
	uint32_t *mask = malloc((size_t)n_masks * words * sizeof(uint32_t));
	int32_t *row_mask = malloc((size_t)n * sizeof(int32_t));
	float *l = rand_floats((size_t)rows * vocab, -8.0f, 8.0f);
	float *orig = malloc((size_t)rows * vocab * sizeof(float));
	struct lp_tensor t = {l, LP_DTYPE_F32, rows, vocab};
	struct lp_mask_args a = {&t, mask, row_mask, n, n_masks, words};
	struct lp_err err = {0};
	bool ok = true;

	for (int m = 0; m < n_masks; m++)
		for (int w = 0; w < words; w++) {
			uint32_t *word = &mask[(size_t)m * words + w];
			*word = m == 0   ? (uint32_t)rng_next()
			        : m == 1 ? 0xffffffffu
			        : m == 2 ? (w == (vocab - 1) / 32 ? 1u << ((vocab - 1) % 32) : 0)
			                 : (uint32_t)(rng_next() & rng_next());
			/* garbage in the bits past the vocabulary */
			int used = vocab - w * 32;
			if (used < 32)
				*word |= used <= 0 ? ~0u : ~0u << used;
		}
	for (int r = 0; r < 2 && r < n; r++) { /* row 1 allows everything */
		l[(size_t)r * vocab] = NAN;
		l[(size_t)r * vocab + 1] = INFINITY;
		l[(size_t)r * vocab + 2] = -INFINITY;
	}
	for (int r = 0; r < n; r++)
		row_mask[r] = r % 5 == 4 ? -1 : r % 5 == 3 ? 0 : r % 4;
	memcpy(orig, l, (size_t)rows * vocab * sizeof(float));
	be->ops->mask_logits(be->ctx, &a);
	if (lp_backend_status(be, &err)) {
		TEST_FAIL("%s: status: %s", name, err.msg);
		ok = false;
	}
	for (int r = 0; r < rows && ok; r++)
		for (int c = 0; c < vocab && ok; c++) {
			float x = orig[(size_t)r * vocab + c], y = l[(size_t)r * vocab + c];
			int m = r < n ? row_mask[r] : -1;
			bool allowed = m < 0 || (mask[(size_t)m * words + c / 32] >> (c % 32) & 1u);
			bool same = memcmp(&x, &y, sizeof(x)) == 0;

			if (allowed ? !same : !(isinf(y) && y < 0)) {
				TEST_FAIL("%s: vocab %d, row %d (mask %d), token %d: %g became %g",
				          name, vocab, r, m, c, x, y);
				ok = false;
			}
		}
	free(mask);
	free(row_mask);
	free(l);
	free(orig);
	return ok;
}

static void test_mask_logits(void)
{
	for (int b = 0; b < N_BACKENDS; b++) {
		CHECK(check_mask(g_be[b], g_be_name[b], 1000, 23, 0));
		CHECK(check_mask(g_be[b], g_be_name[b], 1024, 5, 3));
		CHECK(check_mask(g_be[b], g_be_name[b], 33, 1, 0));
		CHECK(check_mask(g_be[b], g_be_name[b], 151936, 6, 0));
	}
}

/* A mask row index outside the mask is an error naming the op; the row is
 * left alone. n = 0 does nothing. */
static void test_mask_logits_errors(void)
{
	struct lp_backend *be = NULL;
	struct lp_err err = {0};
	float l[2 * 40];
	uint32_t mask[2] = {0, 0};
	int32_t row_mask[2] = {-1, 1};
	struct lp_tensor t = {l, LP_DTYPE_F32, 2, 40};
	struct lp_mask_args a = {&t, mask, row_mask, 2, 1, 2};

	for (int i = 0; i < 80; i++)
		l[i] = (float)i;
	CHECK_OK(lp_backend_cpu_new(&be, 1, &err), &err);
	a.n = 0;
	be->ops->mask_logits(be->ctx, &a);
	int rc0 = lp_backend_status(be, &err);
	a.n = 2;
	be->ops->mask_logits(be->ctx, &a);
	int rc = lp_backend_status(be, &err);
	lp_backend_destroy(be);
	CHECK_EQ_INT(rc0, 0);
	CHECK_EQ_INT(rc, -EIO);
	CHECK_MSG(strstr(err.msg, "mask_logits") && strstr(err.msg, "mask row 1"), "message '%s'",
	          err.msg);
	for (int i = 0; i < 80; i++)
		CHECK_MSG(l[i] == (float)i, "logit %d became %g", i, l[i]);
}

/* A bad index read from device memory is skipped and recorded: the status
 * names the op and stays set. Fresh backends, since it is sticky. */
static void test_sticky_errors(void)
{
	static const char *ops[] = {"get_rows", "rope", "kv_store"};

	for (int which = 0; which < 3; which++) {
		struct lp_backend *be = NULL;
		struct lp_err err = {0};
		float table[4 * 8] = {0}, x[2 * 8] = {1, 1, 1, 1, 1, 1, 1, 1};
		float cache[4 * 8], out[2 * 8];
		int32_t bad2[2] = {1, 4};
		struct lp_tensor tt = {table, LP_DTYPE_F32, 4, 8}, tx = {x, LP_DTYPE_F32, 2, 8};
		struct lp_tensor tc = {cache, LP_DTYPE_F32, 4, 8}, tv = {cache, LP_DTYPE_F32, 4, 8};
		struct lp_tensor to = {out, LP_DTYPE_F32, 2, 8};

		memset(cache, 0, sizeof(cache));
		memset(out, 0x7f, sizeof(out));
		CHECK_OK(lp_backend_cpu_new(&be, 1, &err), &err);
		CHECK_OK(lp_backend_status(be, &err), &err);
		if (which == 0)
			be->ops->get_rows(be->ctx, &to, &tt, bad2, 2);
		else if (which == 1)
			be->ops->rope(be->ctx, &tx, 1, 8, bad2, &tt);
		else
			be->ops->kv_store(be->ctx, &tc, &tv, &tx, &tx, bad2);
		int rc = lp_backend_status(be, &err);
		bool named = strstr(err.msg, ops[which]) != NULL;
		int rc2 = lp_backend_status(be, &err);
		bool zero_row = true;
		for (int c = 0; c < 8; c++)
			zero_row &= out[8 + c] == 0.0f;
		lp_backend_destroy(be);
		CHECK_MSG(rc == -EIO && rc2 == -EIO, "%s: status %d then %d", ops[which], rc, rc2);
		CHECK_MSG(named, "%s: message '%s'", ops[which], err.msg);
		CHECK_MSG(which != 0 || zero_row, "get_rows: the bad row is not zero");
	}
}

int main(void)
{
	struct lp_err err = {0};

	TEST_MAIN_BEGIN("test-backend-cpu");
	unsetenv("LP_CPU_NO_AVX2");
	if (lp_backend_cpu_new(&g_be[0], 3, &err) || lp_backend_cpu_new(&g_be[2], 1, &err)) {
		printf("FAIL test-backend-cpu:setup: %s\n", err.msg);
		return 1;
	}
	setenv("LP_CPU_NO_AVX2", "1", 1);
	if (lp_backend_cpu_new(&g_be[1], 3, &err)) {
		printf("FAIL test-backend-cpu:setup: %s\n", err.msg);
		return 1;
	}
	unsetenv("LP_CPU_NO_AVX2");

	RUN(test_memory);
	RUN(test_create_errors);
	RUN(test_paths_selected);
	RUN(test_threadpool_runs);
	RUN(test_threadpool_changing_counts);
	RUN(test_matmul_all_types);
	RUN(test_matmul_prefill);
	RUN(test_matvec_crossover);
	RUN(test_matmul_thread_invariant);
	RUN(test_get_rows);
	RUN(test_rmsnorm);
	RUN(test_elementwise);
	RUN(test_rope);
	RUN(test_kv_store);
	RUN(test_attention);
	RUN(test_backend_info);
	RUN(test_sticky_errors);
	RUN(test_mask_logits);
	RUN(test_mask_logits_errors);

	for (int b = 0; b < N_BACKENDS; b++)
		lp_backend_destroy(g_be[b]);
	TEST_MAIN_END();
}
