/* Microbenchmark of the CPU backend's kernels:
 *   - memory read bandwidth (a multi-threaded sum over 256 MB),
 *   - matrix-vector products (batch 1) per weight type, in GB/s of weights
 *     streamed and as a fraction of that bandwidth; the matrices rotate
 *     over enough copies that they come from DRAM, as in a decode step.
 *     Next to it, the same product with the weights in cache on one thread:
 *     the compute ceiling of one core (times the threads, it bounds the
 *     streaming figure when it is below the bandwidth),
 *   - attention with SmolLM2-135M's shapes (9 query heads, 3 kv heads, head
 *     dim 64, f32 cache): one decode token at several context lengths, and
 *     a 512-token prefill,
 *   - GEMM GFLOP/s at n = 512 (prefill),
 *   - thread-pool dispatch overhead per op.
 *
 * Build and run: `make bench-kernels` (build/tools/bench-kernels
 * [--threads N]).
 * The machine's other load shows in every figure: run it when it is idle,
 * or compare variants run in turn. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/backend.h"
#include "kernels/cpu/cpu.h"
#include "kernels/cpu/threadpool.h"

#if LP_CPU_X86
#include <immintrin.h>
#endif

#define BW_BYTES (256u << 20)
/* rotate matvec weights over at least this many bytes (well past L3) */
#define MV_SPAN_BYTES (192u << 20)

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

struct bw_task {
	const float *buf;
	size_t n;
	float sums[512];
};

#if LP_CPU_X86
__attribute__((target("avx2"))) static float sum_avx2(const float *p, size_t n)
{
	__m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;

	for (size_t i = 0; i + 32 <= n; i += 32) {
		a0 = _mm256_add_ps(a0, _mm256_load_ps(p + i));
		a1 = _mm256_add_ps(a1, _mm256_load_ps(p + i + 8));
		a2 = _mm256_add_ps(a2, _mm256_load_ps(p + i + 16));
		a3 = _mm256_add_ps(a3, _mm256_load_ps(p + i + 24));
	}
	a0 = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
	float t[8];
	_mm256_storeu_ps(t, a0);
	return t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
}
#endif

static float sum_plain(const float *p, size_t n)
{
	float a[8] = {0};

	for (size_t i = 0; i + 8 <= n; i += 8)
		for (int j = 0; j < 8; j++)
			a[j] += p[i + j];
	return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
}

static void bw_thread(void *arg, int chunk, int n_chunks, int thread)
{
	struct bw_task *t = arg;
	size_t len = t->n / (size_t)n_chunks / 32 * 32;
	const float *p = t->buf + len * (size_t)chunk;

#if LP_CPU_X86
	if (lp_cpu_has_avx2()) {
		t->sums[chunk] = sum_avx2(p, len);
		return;
	}
#endif
	t->sums[chunk] = sum_plain(p, len);
}

static void noop_thread(void *arg, int chunk, int n_chunks, int thread)
{
}

static double memory_bandwidth(struct lp_threadpool *pool)
{
	struct bw_task t = {0};
	float *buf = aligned_alloc(64, BW_BYTES);
	double best = 1e30;

	if (!buf)
		return 0;
	for (size_t i = 0; i < BW_BYTES / sizeof(float); i++)
		buf[i] = (float)(i & 7);
	t.buf = buf;
	t.n = BW_BYTES / sizeof(float);
	for (int rep = 0; rep < 8; rep++) {
		double t0 = now_s();
		lp_threadpool_run(pool, bw_thread, &t, lp_threadpool_size(pool));
		double dt = now_s() - t0;
		best = dt < best ? dt : best;
	}
	free(buf);
	size_t chunk = t.n / (size_t)lp_threadpool_size(pool) / 32 * 32;
	return (double)chunk * lp_threadpool_size(pool) * sizeof(float) / best / 1e9;
}

/* Random bytes that decode to finite weights: f16/bf16 values and block
 * scales are drawn from a small range. */
static void fill_weights(enum lp_dtype t, void *p, size_t bytes, int64_t rows, int64_t cols)
{
	size_t rb = lp_dtype_row_bytes(t, cols);
	unsigned char *b = p;
	uint32_t s = 12345;

	for (size_t i = 0; i < bytes; i++) {
		s = s * 1664525u + 1013904223u;
		b[i] = (unsigned char)(s >> 24);
	}
	for (int64_t r = 0; r < rows; r++) {
		unsigned char *row = b + rb * (size_t)r;
		for (int64_t i = 0; i < cols / lp_dtype_block(t); i++) {
			unsigned char *blk = row + (size_t)i * lp_dtype_block_bytes(t);
			uint16_t h = lp_f32_to_f16(0.01f + (float)(i % 7) * 0.001f);
			switch (t) {
			case LP_DTYPE_F32: {
				float f = (float)((i * 31 + r) % 17) * 0.01f;
				memcpy(blk, &f, 4);
				break;
			}
			case LP_DTYPE_BF16: {
				uint16_t v = lp_f32_to_bf16((float)((i * 31 + r) % 17) * 0.01f);
				memcpy(blk, &v, 2);
				break;
			}
			case LP_DTYPE_F16:
			case LP_DTYPE_Q8_0:
			case LP_DTYPE_Q4_0:
				memcpy(blk, &h, 2);
				break;
			case LP_DTYPE_Q4_1:
			case LP_DTYPE_Q5_1:
			case LP_DTYPE_Q4_K:
			case LP_DTYPE_Q5_K:
				memcpy(blk, &h, 2);
				memcpy(blk + 2, &h, 2);
				break;
			case LP_DTYPE_Q5_0:
				memcpy(blk, &h, 2);
				break;
			case LP_DTYPE_Q6_K:
				memcpy(blk + 208, &h, 2);
				break;
			default:
				break;
			}
		}
	}
}

/* Seconds per matmul out = x . w^T with w [m, k] of type t and x [n, k],
 * rotating over copies of w that together exceed span bytes. */
static double time_matmul(struct lp_backend *be, enum lp_dtype t, int n, int64_t k, int64_t m,
                          size_t span, int reps, size_t *w_bytes)
{
	struct lp_err err = {0};
	size_t wb = lp_dtype_row_bytes(t, k) * (size_t)m;
	int copies = (int)((span + wb - 1) / wb);
	struct lp_buffer bw = {0}, bx = {0}, bo = {0};
	struct lp_tensor tw = {NULL, t, m, k}, tx = {NULL, LP_DTYPE_F32, n, k};
	struct lp_tensor to = {NULL, LP_DTYPE_F32, n, m};
	double best = 1e30;

	if (copies < 1)
		copies = 1;
	*w_bytes = wb;
	if (lp_backend_alloc(be, wb * (size_t)copies, &bw, &err) ||
	    lp_backend_alloc(be, (size_t)(n * k) * sizeof(float), &bx, &err) ||
	    lp_backend_alloc(be, (size_t)(n * m) * sizeof(float), &bo, &err)) {
		fprintf(stderr, "bench-kernels: %s\n", err.msg);
		exit(1);
	}
	for (int c = 0; c < copies; c++)
		fill_weights(t, (char *)bw.data + wb * (size_t)c, wb, m, k);
	for (int64_t i = 0; i < n * k; i++)
		((float *)bx.data)[i] = (float)(i % 13) * 0.1f - 0.6f;
	tx.data = bx.data;
	to.data = bo.data;
	for (int rep = 0; rep < reps; rep++) {
		double t0 = now_s();
		for (int c = 0; c < copies; c++) {
			tw.data = (char *)bw.data + wb * (size_t)c;
			be->ops->matmul(be->ctx, &to, &tx, &tw, false);
		}
		double dt = (now_s() - t0) / copies;
		best = dt < best ? dt : best;
	}
	lp_backend_free(be, &bw);
	lp_backend_free(be, &bx);
	lp_backend_free(be, &bo);
	return best;
}

/* Microseconds per attention call: n_tokens tokens of one sequence at
 * positions ctx - n_tokens .. ctx - 1, the cache's blocks scattered. */
static double time_attention(struct lp_backend *be, int n_tokens, int ctx, int reps)
{
	enum { H = 9, KV = 3, HD = 64, BS = 16, MAXB = 64, NBLK = 96 };
	struct lp_err err = {0};
	struct lp_buffer bk = {0}, bv = {0}, bq = {0}, bo = {0};
	int64_t rows = (int64_t)NBLK * BS;
	struct lp_tensor tk = {NULL, LP_DTYPE_F32, rows, KV * HD};
	struct lp_tensor tv = {NULL, LP_DTYPE_F32, rows, KV * HD};
	struct lp_tensor tq = {NULL, LP_DTYPE_F32, n_tokens, H * HD};
	struct lp_tensor to = {NULL, LP_DTYPE_F32, n_tokens, H * HD};
	int32_t *seq = calloc((size_t)n_tokens, sizeof(int32_t));
	int32_t *pos = calloc((size_t)n_tokens, sizeof(int32_t));
	int32_t table[MAXB];
	double best = 1e30;

	if (!seq || !pos || ctx > MAXB * BS || n_tokens > ctx ||
	    lp_backend_alloc(be, (size_t)(rows * KV * HD) * sizeof(float), &bk, &err) ||
	    lp_backend_alloc(be, (size_t)(rows * KV * HD) * sizeof(float), &bv, &err) ||
	    lp_backend_alloc(be, (size_t)n_tokens * H * HD * sizeof(float), &bq, &err) ||
	    lp_backend_alloc(be, (size_t)n_tokens * H * HD * sizeof(float), &bo, &err)) {
		fprintf(stderr, "bench-kernels: attention setup failed\n");
		exit(1);
	}
	for (int64_t i = 0; i < rows * KV * HD; i++) {
		((float *)bk.data)[i] = (float)(i % 17) * 0.05f - 0.4f;
		((float *)bv.data)[i] = (float)(i % 13) * 0.05f - 0.3f;
	}
	for (int64_t i = 0; i < (int64_t)n_tokens * H * HD; i++)
		((float *)bq.data)[i] = (float)(i % 11) * 0.1f - 0.5f;
	for (int i = 0; i < MAXB; i++)
		table[i] = (i * 37) % NBLK;
	for (int t = 0; t < n_tokens; t++)
		pos[t] = ctx - n_tokens + t;
	tk.data = bk.data;
	tv.data = bv.data;
	tq.data = bq.data;
	to.data = bo.data;
	struct lp_attention_args a = {
	    .n_tokens = n_tokens,
	    .n_heads = H,
	    .n_kv_heads = KV,
	    .head_dim = HD,
	    .block_size = BS,
	    .max_blocks_per_seq = MAXB,
	    .scale = 0.125f,
	    .q = &tq,
	    .k_cache = &tk,
	    .v_cache = &tv,
	    .tok_seq = seq,
	    .tok_pos = pos,
	    .block_tables = table,
	    .out = &to,
	};
	for (int rep = 0; rep < reps; rep++) {
		double t0 = now_s();
		be->ops->attention(be->ctx, &a);
		double dt = now_s() - t0;
		best = dt < best ? dt : best;
	}
	lp_backend_free(be, &bk);
	lp_backend_free(be, &bv);
	lp_backend_free(be, &bq);
	lp_backend_free(be, &bo);
	free(seq);
	free(pos);
	return best * 1e6;
}

int main(int argc, char **argv)
{
	struct lp_err err = {0};
	struct lp_backend *be = NULL;
	struct lp_threadpool *pool = NULL;
	int n_threads = 0;
	struct lp_backend *be1 = NULL;
	static const struct {
		enum lp_dtype t;
		int64_t m, k;
	} mv[] = {
	    {LP_DTYPE_Q8_0, 49152, 576},
	    {LP_DTYPE_Q8_0, 1536, 576},
	    {LP_DTYPE_Q4_1, 1536, 576},
	    {LP_DTYPE_Q4_1, 576, 1536},
	    {LP_DTYPE_Q4_1, 576, 576},
	    {LP_DTYPE_Q4_1, 192, 576},
	    {LP_DTYPE_Q4_0, 1536, 576},
	    {LP_DTYPE_F16, 1536, 576},
	    {LP_DTYPE_BF16, 1536, 576},
	    {LP_DTYPE_F32, 1536, 576},
	    /* the K-quants (rows of whole 256-weight blocks) beside the 32-weight
	     * formats on one shape */
	    {LP_DTYPE_Q4_1, 1536, 1536},
	    {LP_DTYPE_Q4_K, 1536, 1536},
	    {LP_DTYPE_Q4_0, 1536, 1536},
	    {LP_DTYPE_Q5_0, 1536, 1536},
	    {LP_DTYPE_Q5_1, 1536, 1536},
	    {LP_DTYPE_Q5_K, 1536, 1536},
	    {LP_DTYPE_Q6_K, 1536, 1536},
	    {LP_DTYPE_Q8_0, 1536, 1536},
	};

	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
			n_threads = (int)strtol(argv[++i], NULL, 10);
		} else {
			fprintf(stderr, "usage: bench-kernels [--threads N]\n");
			return 2;
		}
	}
	if (lp_backend_cpu_new(&be, n_threads, &err) || lp_backend_cpu_new(&be1, 1, &err)) {
		fprintf(stderr, "bench-kernels: %s\n", err.msg);
		return 1;
	}
	n_threads = ((struct lp_cpu *)be->ctx)->n_threads;
	pool = ((struct lp_cpu *)be->ctx)->pool;
	printf("threads %d, kernels %s\n", n_threads,
	       lp_backend_cpu_uses_avx512(be) ? "avx512"
	       : lp_backend_cpu_uses_avx2(be) ? "avx2"
	                                      : "portable c");

	double bw = memory_bandwidth(pool);
	printf("memory read bandwidth: %.2f GB/s (sum over %u MB)\n", bw, BW_BYTES >> 20);

	printf("matvec n=1: weights from DRAM (rotating over %u MB of copies), %d threads | "
	       "weights in cache, 1 thread\n",
	       MV_SPAN_BYTES >> 20, n_threads);
	for (size_t i = 0; i < sizeof(mv) / sizeof(mv[0]); i++) {
		size_t wb;
		double dt = time_matmul(be, mv[i].t, 1, mv[i].k, mv[i].m, MV_SPAN_BYTES, 5, &wb);
		double hot = time_matmul(be1, mv[i].t, 1, mv[i].k, mv[i].m, 0, 200, &wb);
		double gbs = (double)wb / dt / 1e9;
		printf(
		    "  %-5s %6lld x %-5lld %8.1f us  %6.2f GB/s  %.2f of bandwidth | %6.2f GB/s\n",
		    lp_dtype_name(mv[i].t), (long long)mv[i].m, (long long)mv[i].k, dt * 1e6, gbs,
		    gbs / bw, (double)wb / hot / 1e9);
	}

	printf("attention, 9 query heads, 3 kv heads, head dim 64, f32 cache:\n");
	static const int ctxs[] = {128, 512, 1024};
	for (size_t i = 0; i < sizeof(ctxs) / sizeof(ctxs[0]); i++)
		printf("  decode, context %4d   %8.1f us per layer\n", ctxs[i],
		       time_attention(be, 1, ctxs[i], 200));
	printf("  prefill, 512 tokens   %8.2f ms per layer\n",
	       time_attention(be, 512, 512, 5) / 1e3);

	printf("gemm n=512 k=768 m=1536:\n");
	for (int t = LP_DTYPE_F32; t < LP_DTYPE_COUNT; t++) {
		size_t wb;
		double dt;

		if (t == LP_DTYPE_I32)
			continue;
		dt = time_matmul(be, (enum lp_dtype)t, 512, 768, 1536, 0, 5, &wb);
		printf("  %-5s %8.2f ms  %6.1f GFLOP/s\n", lp_dtype_name((enum lp_dtype)t),
		       dt * 1e3, 2.0 * 512 * 768 * 1536 / dt / 1e9);
	}

	int runs = 100000;
	double t0 = now_s();
	for (int i = 0; i < runs; i++)
		lp_threadpool_run(pool, noop_thread, NULL, n_threads);
	double dt = now_s() - t0;
	printf("thread-pool dispatch overhead: %.2f us per op (%d back-to-back empty runs)\n",
	       dt / runs * 1e6, runs);
	lp_backend_destroy(be);
	lp_backend_destroy(be1);
	return 0;
}
