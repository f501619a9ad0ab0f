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

/* splitmix64: a fixed sequence for every run */
static uint64_t rng_state = 0x5eed1234abcdULL;

static uint64_t rng_next(void)
{
	uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
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
	/* matvec (n <= 4) and GEMM (n > 4) regimes; m not a multiple of the
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
			int32_t ids[7] = {3, 0, 49, 3, 17, -1, 50}; /* last two invalid */
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
				memset(bo.data, 0x7f, bo.size); /* the bad ids must zero */
				be->ops->get_rows(be->ctx, &to, &tt, ti32.data, 7);
				got = download(be, &to);
				for (int i = 0; i < 7 && bad < 0; i++) {
					for (int64_t c = 0; c < cols; c++) {
						float want = i < 5 ? deq[ids[i] * cols + c] : 0.0f;
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
	enum { N = 6, HEADS = 3, HD = 64 };
	int32_t pos[N] = {0, 1, 7, 4095, 32767, 131071};
	float inv_freq[HD / 2];

	for (int i = 0; i < HD / 2; i++)
		inv_freq[i] = (float)(1.0 / pow(10000.0, 2.0 * i / HD));
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
		    !dev_tensor(be, &bf, &tf, LP_DTYPE_F32, 1, HD / 2, inv_freq) &&
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
		CHECK_MSG(got != NULL, "allocation failed");
		CHECK_MSG(worst < 2e-6, "%s rope: error %g", g_be_name[b], worst);
	}
}

static void test_kv_store(void)
{
	enum { ROWS = 5, COLS = 40, CACHE = 64 };
	int32_t slots[ROWS] = {17, 0, 63, 40, -3}; /* the last is outside: skipped */

	for (int b = 0; b < N_BACKENDS; b++) {
		struct lp_backend *be = g_be[b];
		for (int ct = 0; ct < 2; ct++) {
			enum lp_dtype type = ct ? LP_DTYPE_F16 : LP_DTYPE_F32;
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
						} else {
							gk = lp_f16_to_f32(
							    ((uint16_t *)(kc + slot * rb))[c]);
							gv = lp_f16_to_f32(
							    ((uint16_t *)(vc + slot * rb))[c]);
						}
						if (src >= 0 && type == LP_DTYPE_F32) {
							wk = k[src * COLS + c];
							wv = v[src * COLS + c];
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

/* LoRA (SGMV) on up to four segments of one input with up to three
 * outputs (the q/k/v case); rank 0 leaves a target out of a segment. Rows
 * between and after the segments get nothing. */
struct lora_case {
	int n, in, n_outs, outs[LP_LORA_MAX_OUTS];
	int n_segs, row0[4], rows[4];
	int rank[4][LP_LORA_MAX_OUTS];
};

/* n values as type t (f32, f16, bf16) in new memory; vals are rounded to
 * t in place first, so that they are exactly what the op reads. */
static void *to_type(float *vals, size_t n, enum lp_dtype t)
{
	uint16_t *h;

	if (t == LP_DTYPE_F32) {
		float *f = malloc(n * sizeof(float));
		memcpy(f, vals, n * sizeof(float));
		return f;
	}
	h = malloc(n * sizeof(uint16_t));
	for (size_t i = 0; i < n; i++) {
		h[i] = t == LP_DTYPE_F16 ? lp_f32_to_f16(vals[i]) : lp_f32_to_bf16(vals[i]);
		vals[i] = t == LP_DTYPE_F16 ? lp_f16_to_f32(h[i]) : lp_bf16_to_f32(h[i]);
	}
	return h;
}

struct lora_bufs {
	struct lp_buffer x, tmp, out[LP_LORA_MAX_OUTS], a[4], b[4][LP_LORA_MAX_OUTS];
	struct lp_tensor tx, ttmp, tout[LP_LORA_MAX_OUTS], ta[4], tb[4][LP_LORA_MAX_OUTS];
};

static void lora_bufs_free(struct lp_backend *be, struct lora_bufs *lb)
{
	lp_backend_free(be, &lb->x);
	lp_backend_free(be, &lb->tmp);
	for (int i = 0; i < LP_LORA_MAX_OUTS; i++)
		lp_backend_free(be, &lb->out[i]);
	for (int g = 0; g < 4; g++) {
		lp_backend_free(be, &lb->a[g]);
		for (int i = 0; i < LP_LORA_MAX_OUTS; i++)
			lp_backend_free(be, &lb->b[g][i]);
	}
}

/* Runs the op on segments segs[0 .. n_segs) of the case with outputs
 * starting at out0; returns the outputs, downloaded, one after another. */
static float *run_lora(struct lp_backend *be, const struct lora_case *c, struct lora_bufs *lb,
                       const int *seg_ids, const int *rows, int n_segs, float *const *out0)
{
	struct lp_lora_seg segs[4];
	struct lp_lora_args args = {.x = &lb->tx, .n_outs = c->n_outs, .tmp = &lb->ttmp};
	size_t total = 0, at = 0;
	float *res;

	for (int i = 0; i < c->n_outs; i++) {
		lp_backend_upload(be, lb->out[i].data, out0[i],
		                  (size_t)c->n * (size_t)c->outs[i] * sizeof(float));
		args.out[i] = &lb->tout[i];
		total += (size_t)c->n * (size_t)c->outs[i];
	}
	for (int s = 0; s < n_segs; s++) {
		int g = seg_ids[s];
		segs[s] = (struct lp_lora_seg){c->row0[g], rows[s], &lb->ta[g], {NULL, NULL, NULL}};
		for (int i = 0; i < c->n_outs; i++)
			segs[s].b[i] = c->rank[g][i] ? &lb->tb[g][i] : NULL;
	}
	args.segs = segs;
	args.n_segs = n_segs;
	be->ops->lora(be->ctx, &args);
	res = malloc(total * sizeof(float));
	for (int i = 0; i < c->n_outs; i++) {
		float *o = download(be, &lb->tout[i]);
		memcpy(res + at, o, (size_t)c->n * (size_t)c->outs[i] * sizeof(float));
		at += (size_t)c->n * (size_t)c->outs[i];
		free(o);
	}
	return res;
}

/* a_type, b_type: storage of A and B (f32, f16 or bf16). */
static int check_lora(struct lp_backend *be, const char *bname, const struct lora_case *c,
                      enum lp_dtype a_type, enum lp_dtype b_type)
{
	float *x = rand_floats((size_t)c->n * c->in, -1, 1), *out0[LP_LORA_MAX_OUTS] = {0};
	float *a[4] = {0}, *bt[4][LP_LORA_MAX_OUTS] = {{0}}, *got = NULL;
	struct lora_bufs lb;
	int ids[4], max_r = 1, ok = 0;
	double worst = 0;
	char where[160] = "";

	memset(&lb, 0, sizeof(lb));
	for (int i = 0; i < c->n_outs; i++)
		out0[i] = rand_floats((size_t)c->n * c->outs[i], -1, 1);
	if (dev_tensor(be, &lb.x, &lb.tx, LP_DTYPE_F32, c->n, c->in, x))
		goto alloc_failed;
	for (int i = 0; i < c->n_outs; i++)
		if (dev_tensor(be, &lb.out[i], &lb.tout[i], LP_DTYPE_F32, c->n, c->outs[i], NULL))
			goto alloc_failed;
	for (int g = 0; g < c->n_segs; g++) {
		int r = 0;
		ids[g] = g;
		for (int i = 0; i < c->n_outs; i++) {
			int rk = c->rank[g][i];
			float *panels;
			if (!rk)
				continue;
			/* B transposed, [rank, out], and its panel layout */
			bt[g][i] = rand_floats((size_t)rk * c->outs[i], -0.5f, 0.5f);
			panels = malloc((size_t)rk * c->outs[i] * sizeof(float));
			for (int k = 0; k < rk; k++)
				for (int o = 0; o < c->outs[i]; o++)
					panels[lp_lora_b_index(rk, c->outs[i], k, o)] =
					    bt[g][i][(size_t)k * c->outs[i] + o];
			void *stored = to_type(panels, (size_t)rk * c->outs[i], b_type);
			for (int k = 0; k < rk; k++)
				for (int o = 0; o < c->outs[i]; o++)
					bt[g][i][(size_t)k * c->outs[i] + o] =
					    panels[lp_lora_b_index(rk, c->outs[i], k, o)];
			int rc = dev_tensor(be, &lb.b[g][i], &lb.tb[g][i], b_type, rk, c->outs[i],
			                    stored);
			free(panels);
			free(stored);
			if (rc)
				goto alloc_failed;
			r += rk;
		}
		max_r = r > max_r ? r : max_r;
		a[g] = rand_floats((size_t)r * c->in, -0.5f, 0.5f);
		void *stored = to_type(a[g], (size_t)r * c->in, a_type);
		int rc = dev_tensor(be, &lb.a[g], &lb.ta[g], a_type, r, c->in, stored);
		free(stored);
		if (rc)
			goto alloc_failed;
	}
	if (dev_tensor(be, &lb.tmp, &lb.ttmp, LP_DTYPE_F32, c->n, max_r, NULL))
		goto alloc_failed;

	got = run_lora(be, c, &lb, ids, c->rows, c->n_segs, out0);
	size_t at = 0;
	for (int i = 0; i < c->n_outs; i++) {
		for (int r = 0; r < c->n; r++) {
			int g = -1, k0 = 0;
			for (int s = 0; s < c->n_segs; s++)
				if (r >= c->row0[s] && r < c->row0[s] + c->rows[s])
					g = s;
			if (g >= 0)
				for (int j = 0; j < i; j++)
					k0 += c->rank[g][j];
			for (int o = 0; o < c->outs[i]; o++) {
				double want = out0[i][(size_t)r * c->outs[i] + o], mag = fabs(want);
				for (int k = 0; g >= 0 && k < c->rank[g][i]; k++) {
					double t = 0;
					for (int e = 0; e < c->in; e++)
						t += (double)x[(size_t)r * c->in + e] *
						     a[g][(size_t)(k0 + k) * c->in + e];
					double d = t * bt[g][i][(size_t)k * c->outs[i] + o];
					want += d;
					mag += fabs(d);
				}
				double e = fabs(got[at + (size_t)r * c->outs[i] + o] - want) /
				           (mag + 1e-6);
				if (e > worst) {
					worst = e;
					snprintf(where, sizeof(where), "output %d row %d col %d", i,
					         r, o);
				}
			}
		}
		at += (size_t)c->n * (size_t)c->outs[i];
	}
	if (worst > 1e-5) {
		TEST_FAIL("%s lora n=%d in=%d: error %g at %s", bname, c->n, c->in, worst, where);
		goto out;
	}
	/* each segment's first row alone, in a one-row segment, gives the
	 * same bits: whatever work split the backend picks, a row's result
	 * does not depend on the rest of the batch */
	for (int g = 0; g < c->n_segs; g++) {
		int one = 1;
		float *alone = run_lora(be, c, &lb, &g, &one, 1, out0);
		size_t off = 0;
		for (int i = 0; i < c->n_outs; i++) {
			size_t row = off + (size_t)c->row0[g] * c->outs[i];
			if (memcmp(alone + row, got + row, (size_t)c->outs[i] * sizeof(float))) {
				TEST_FAIL("%s lora n=%d in=%d: row %d of output %d differs alone",
				          bname, c->n, c->in, c->row0[g], i);
				free(alone);
				goto out;
			}
			off += (size_t)c->n * (size_t)c->outs[i];
		}
		free(alone);
	}
	/* half-precision weights give the same bits as the same values in f32:
	 * the conversion in registers is exact */
	if (a_type != LP_DTYPE_F32 || b_type != LP_DTYPE_F32) {
		struct lora_bufs f32 = lb;
		float *same;
		int all[4] = {0, 1, 2, 3}, bad = 0;
		for (int g = 0; g < c->n_segs && !bad; g++) {
			memset(&f32.a[g], 0, sizeof(f32.a[g]));
			bad |= dev_tensor(be, &f32.a[g], &f32.ta[g], LP_DTYPE_F32, lb.ta[g].rows,
			                  c->in, a[g]);
			for (int i = 0; i < c->n_outs && !bad; i++) {
				int rk = c->rank[g][i], n = c->outs[i];
				float *panels;
				memset(&f32.b[g][i], 0, sizeof(f32.b[g][i]));
				if (!rk)
					continue;
				panels = malloc((size_t)rk * n * sizeof(float));
				for (int k = 0; k < rk; k++)
					for (int o = 0; o < n; o++)
						panels[lp_lora_b_index(rk, n, k, o)] =
						    bt[g][i][(size_t)k * n + o];
				bad |= dev_tensor(be, &f32.b[g][i], &f32.tb[g][i], LP_DTYPE_F32, rk,
				                  n, panels);
				free(panels);
			}
		}
		same = bad ? NULL : run_lora(be, c, &f32, all, c->rows, c->n_segs, out0);
		for (int g = 0; g < c->n_segs; g++) {
			lp_backend_free(be, &f32.a[g]);
			for (int i = 0; i < c->n_outs; i++)
				lp_backend_free(be, &f32.b[g][i]);
		}
		if (!same) {
			TEST_FAIL("allocation failed");
			goto out;
		}
		bad = memcmp(same, got, at * sizeof(float)) != 0;
		free(same);
		if (bad) {
			TEST_FAIL(
			    "%s lora n=%d in=%d: half weights differ from the same values in f32",
			    bname, c->n, c->in);
			goto out;
		}
	}
	ok = 1;
	goto out;
alloc_failed:
	TEST_FAIL("allocation failed");
out:
	lora_bufs_free(be, &lb);
	for (int g = 0; g < 4; g++) {
		free(a[g]);
		for (int i = 0; i < LP_LORA_MAX_OUTS; i++)
			free(bt[g][i]);
	}
	for (int i = 0; i < LP_LORA_MAX_OUTS; i++)
		free(out0[i]);
	free(x);
	free(got);
	return ok;
}

static void test_lora(void)
{
	static const struct lora_case shapes[] = {
	    /* small: one output, two segments of different rank */
	    {7, 40, 1, {24}, 2, {0, 3}, {2, 3}, {{4}, {8}}},
	    /* SmolLM2's q/k/v shapes, a segment without k, odd ranks */
	    {40,
	     576,
	     3,
	     {576, 192, 192},
	     4,
	     {0, 5, 9, 30},
	     {5, 3, 17, 9},
	     {{16, 16, 16}, {8, 0, 8}, {5, 7, 3}, {16, 16, 16}}},
	    /* gate/up and down shapes, outputs not a multiple of the panel */
	    {12, 576, 2, {1536, 100}, 3, {0, 4, 8}, {4, 4, 4}, {{16, 16}, {8, 0}, {0, 4}}},
	    {9, 1536, 1, {576}, 2, {1, 2}, {1, 7}, {{16}, {1}}},
	    /* input length not a multiple of 8, narrow outputs */
	    {5, 33, 3, {21, 7, 70}, 2, {0, 2}, {2, 3}, {{16, 3, 2}, {24, 1, 9}}},
	    /* one row: the split path on the pool */
	    {1, 576, 3, {576, 192, 192}, 1, {0}, {1}, {{16, 16, 16}}},
	};
	/* every shape in f32, then some with the weights kept in the adapter
	 * file's half precision, converted in registers (B in f32 beside a
	 * half A: a scale that does not fold exactly) */
	static const struct {
		int shape;
		enum lp_dtype a, b;
	} half[] = {{1, LP_DTYPE_BF16, LP_DTYPE_BF16},
	            {2, LP_DTYPE_F16, LP_DTYPE_F16},
	            {4, LP_DTYPE_BF16, LP_DTYPE_F32},
	            {5, LP_DTYPE_F16, LP_DTYPE_BF16}};
	const size_t n_shapes = sizeof(shapes) / sizeof(shapes[0]);

	for (int b = 0; b < N_BACKENDS; b++) {
		for (size_t i = 0; i < n_shapes; i++)
			CHECK(check_lora(g_be[b], g_be_name[b], &shapes[i], LP_DTYPE_F32,
			                 LP_DTYPE_F32));
		for (size_t i = 0; i < sizeof(half) / sizeof(half[0]); i++)
			CHECK(check_lora(g_be[b], g_be_name[b], &shapes[half[i].shape], half[i].a,
			                 half[i].b));
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
	RUN(test_matmul_thread_invariant);
	RUN(test_get_rows);
	RUN(test_rmsnorm);
	RUN(test_elementwise);
	RUN(test_rope);
	RUN(test_kv_store);
	RUN(test_attention);
	RUN(test_lora);

	for (int b = 0; b < N_BACKENDS; b++)
		lp_backend_destroy(g_be[b]);
	TEST_MAIN_END();
}
