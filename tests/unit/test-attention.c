/* The CPU backend's paged attention beyond the per-op check of
 * test-backend-cpu: a lone decode token with a long context against a
 * double-precision reference, results that do not depend on the thread
 * count, rows whose results do not depend on the rest of the call, padding
 * rows, and block ids outside the cache. Caches are f32, f16 or bf16.
 *
 * attention.c picks one of three ways to cut the work from the call's
 * shapes: the split decode path (n_tokens * n_kv_heads < 16 and a context
 * longer than 64 positions: parts of 64 positions merged afterwards), the
 * prefill runs (when the tokens of a sequence come in runs of two or more
 * on average) and the default path, one token at a time. None may change a
 * result: each test names the path its calls take.
 *
 * Every call reads one "world": a K/V cache of random values and the block
 * table of each sequence, its blocks shuffled over the pool. The query of a
 * token is a fixed function of its (sequence, position), so the same token
 * has the same query in every call it is part of.
 *
 * (e) runs the checks of (a) to (c) again with sliding windows (g_window)
 * of 1 to 5000 positions, and shows that block-table entries before a
 * window are never read. */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/cpu/cpu.h"
#include "tests/test.h"

#define BS   16 /* positions per cache block */
#define MAXB 72 /* blocks per sequence: up to 1152 positions */

/* AVX2 kernels on 1, 2 and 3 threads; the portable C kernels
 * (LP_CPU_NO_AVX2=1) on 1 and 3 threads. */
static struct lp_backend *g_avx[3];
static struct lp_backend *g_scalar[2];
/* The sliding window of every call (0: none) and of the reference. */
static int g_window;

static uint64_t mix64(uint64_t z)
{
	z += 0x9e3779b97f4a7c15ULL;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/* uniform in [lo, hi), a fixed function of the key */
static float hash_float(uint64_t key, float lo, float hi)
{
	return lo + (hi - lo) * (float)((mix64(key) >> 40) * (1.0 / 16777216.0));
}

struct world {
	enum lp_dtype ct; /* cache type: f32, f16 or bf16 */
	int nh, nkv, hd, n_seqs;
	int64_t rows, cols; /* cache [n_seqs * MAXB * BS, nkv * hd] */
	void *kb, *vb;      /* the caches as stored */
	float *kf, *vf;     /* the same values as f32, for the reference */
	int32_t *tables;    /* [n_seqs, MAXB] */
	uint64_t seed;
};

static void world_release(struct world *w)
{
	free(w->kb);
	free(w->vb);
	free(w->kf);
	free(w->vf);
	free(w->tables);
	memset(w, 0, sizeof(*w));
}

static int world_init(struct world *w, enum lp_dtype ct, int nh, int nkv, int hd, int n_seqs,
                      uint64_t seed)
{
	int n_blocks = n_seqs * MAXB;
	size_t es = ct == LP_DTYPE_F32 ? sizeof(float) : sizeof(uint16_t);
	size_t n;

	memset(w, 0, sizeof(*w));
	w->ct = ct;
	w->nh = nh;
	w->nkv = nkv;
	w->hd = hd;
	w->n_seqs = n_seqs;
	w->seed = seed;
	w->rows = (int64_t)n_blocks * BS;
	w->cols = (int64_t)nkv * hd;
	n = (size_t)(w->rows * w->cols);
	w->kb = malloc(n * es);
	w->vb = malloc(n * es);
	w->kf = malloc(n * sizeof(float));
	w->vf = malloc(n * sizeof(float));
	w->tables = malloc((size_t)n_blocks * sizeof(int32_t));
	if (!w->kb || !w->vb || !w->kf || !w->vf || !w->tables) {
		world_release(w);
		return -ENOMEM;
	}
	for (size_t i = 0; i < n; i++) {
		float k = hash_float(mix64(seed) + 2 * (uint64_t)i, -1, 1);
		float v = hash_float(mix64(seed) + 2 * (uint64_t)i + 1, -1, 1);

		if (ct == LP_DTYPE_F16) {
			((uint16_t *)w->kb)[i] = lp_f32_to_f16(k);
			((uint16_t *)w->vb)[i] = lp_f32_to_f16(v);
			w->kf[i] = lp_f16_to_f32(((uint16_t *)w->kb)[i]);
			w->vf[i] = lp_f16_to_f32(((uint16_t *)w->vb)[i]);
		} else if (ct == LP_DTYPE_BF16) {
			((uint16_t *)w->kb)[i] = lp_f32_to_bf16(k);
			((uint16_t *)w->vb)[i] = lp_f32_to_bf16(v);
			w->kf[i] = lp_bf16_to_f32(((uint16_t *)w->kb)[i]);
			w->vf[i] = lp_bf16_to_f32(((uint16_t *)w->vb)[i]);
		} else {
			((float *)w->kb)[i] = w->kf[i] = k;
			((float *)w->vb)[i] = w->vf[i] = v;
		}
	}
	/* every sequence's blocks scattered over the whole pool */
	for (int i = 0; i < n_blocks; i++)
		w->tables[i] = i;
	for (int i = n_blocks - 1; i > 0; i--) {
		int j = (int)(mix64(seed + 77 * (uint64_t)i) % (uint64_t)(i + 1));
		int32_t t = w->tables[i];

		w->tables[i] = w->tables[j];
		w->tables[j] = t;
	}
	return 0;
}

/* Query element i of the token at (seq, pos). */
static float query_value(const struct world *w, int seq, int pos, int i)
{
	uint64_t key = ((uint64_t)seq << 48) ^ ((uint64_t)pos << 20) ^ (uint64_t)i;

	return hash_float(mix64(w->seed ^ 0x71e5) + key, -3, 3);
}

/* The cache row of (seq, pos), or -1 where its block is outside the cache
 * (the op skips such positions). */
static int64_t cache_row(const struct world *w, int seq, int pos)
{
	int32_t b = w->tables[seq * MAXB + pos / BS];
	int64_t row = (int64_t)b * BS + pos % BS;

	return b < 0 || row >= w->rows ? -1 : row;
}

/* Runs one attention call of n tokens on be; *out is the f32 output [n, nh *
 * hd], malloc'd. The output buffer holds NaNs before the call, so that an
 * element the op leaves unwritten shows. */
static int run_call(struct lp_backend *be, const struct world *w, int n, const int32_t *seq,
                    const int32_t *pos, float **out, struct lp_err *err)
{
	struct lp_buffer bq = {0}, bk = {0}, bv = {0}, bo = {0}, bs = {0}, bp = {0}, bt = {0};
	int64_t qcols = (int64_t)w->nh * w->hd;
	size_t qbytes = (size_t)n * (size_t)qcols * sizeof(float);
	size_t cbytes = (size_t)w->rows * lp_dtype_row_bytes(w->ct, w->cols);
	float *q = malloc(qbytes);
	int rc;

	*out = malloc(qbytes);
	if (!q || !*out) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out_free;
	}
	for (int t = 0; t < n; t++)
		for (int64_t i = 0; i < qcols; i++)
			q[t * qcols + i] = query_value(w, seq[t], pos[t], (int)i);
	for (size_t i = 0; i < (size_t)n * (size_t)qcols; i++)
		(*out)[i] = NAN;
	if ((rc = lp_backend_alloc(be, qbytes, &bq, err)) ||
	    (rc = lp_backend_alloc(be, cbytes, &bk, err)) ||
	    (rc = lp_backend_alloc(be, cbytes, &bv, err)) ||
	    (rc = lp_backend_alloc(be, qbytes, &bo, err)) ||
	    (rc = lp_backend_alloc(be, (size_t)n * 4, &bs, err)) ||
	    (rc = lp_backend_alloc(be, (size_t)n * 4, &bp, err)) ||
	    (rc = lp_backend_alloc(be, (size_t)w->n_seqs * MAXB * 4, &bt, err)))
		goto out_free;
	lp_backend_upload(be, bq.data, q, qbytes);
	lp_backend_upload(be, bk.data, w->kb, cbytes);
	lp_backend_upload(be, bv.data, w->vb, cbytes);
	lp_backend_upload(be, bs.data, seq, (size_t)n * 4);
	lp_backend_upload(be, bp.data, pos, (size_t)n * 4);
	lp_backend_upload(be, bt.data, w->tables, (size_t)w->n_seqs * MAXB * 4);
	lp_backend_upload(be, bo.data, *out, qbytes);

	struct lp_tensor tq = {bq.data, LP_DTYPE_F32, n, qcols};
	struct lp_tensor tk = {bk.data, w->ct, w->rows, w->cols};
	struct lp_tensor tv = {bv.data, w->ct, w->rows, w->cols};
	struct lp_tensor to = {bo.data, LP_DTYPE_F32, n, qcols};
	struct lp_attention_args a = {
	    .n_tokens = n,
	    .n_heads = w->nh,
	    .n_kv_heads = w->nkv,
	    .head_dim = w->hd,
	    .block_size = BS,
	    .max_blocks_per_seq = MAXB,
	    .max_context = MAXB * BS,
	    .window = g_window,
	    .scale = 1.0f / sqrtf((float)w->hd),
	    .q = &tq,
	    .k_cache = &tk,
	    .v_cache = &tv,
	    .tok_seq = bs.data,
	    .tok_pos = bp.data,
	    .block_tables = bt.data,
	    .out = &to,
	};
	be->ops->attention(be->ctx, &a);
	be->ops->synchronize(be->ctx);
	lp_backend_download(be, *out, bo.data, qbytes);
	rc = 0;

out_free:
	lp_backend_free(be, &bq);
	lp_backend_free(be, &bk);
	lp_backend_free(be, &bv);
	lp_backend_free(be, &bo);
	lp_backend_free(be, &bs);
	lp_backend_free(be, &bp);
	lp_backend_free(be, &bt);
	free(q);
	if (rc) {
		free(*out);
		*out = NULL;
	}
	return rc;
}

/* The largest error of got (the row of the token at (seq, pos)) against a
 * double-precision softmax over positions 0..pos, or the g_window last of
 * them (less those whose block is outside the cache), relative to the
 * largest |v| the row attends to. */
static double reference_error(const struct world *w, int seq, int pos, const float *got)
{
	int np = pos + 1, group = w->nh / w->nkv;
	int first = g_window > 0 && pos - g_window + 1 > 0 ? pos - g_window + 1 : 0;
	double *s = malloc((size_t)np * sizeof(double)), worst = 0;

	if (!s)
		return INFINITY;
	for (int h = 0; h < w->nh; h++) {
		int kvh = h / group;
		double mx = -INFINITY, l = 0, vmax = 0;

		for (int p = 0; p < np; p++) {
			int64_t row = cache_row(w, seq, p);
			double acc = 0;

			s[p] = -INFINITY;
			if (row < 0 || p < first)
				continue;
			const float *k = w->kf + row * w->cols + kvh * w->hd;
			for (int d = 0; d < w->hd; d++)
				acc += (double)query_value(w, seq, pos, h * w->hd + d) * k[d];
			s[p] = acc / sqrt((double)w->hd);
			mx = s[p] > mx ? s[p] : mx;
		}
		for (int p = 0; p < np; p++)
			l += s[p] = exp(s[p] - mx);
		for (int d = 0; d < w->hd; d++) {
			double want = 0;

			for (int p = first; p < np; p++) {
				if (cache_row(w, seq, p) < 0)
					continue;
				double v = w->vf[cache_row(w, seq, p) * w->cols + kvh * w->hd + d];

				want += s[p] / l * v;
				vmax = fabs(v) > vmax ? fabs(v) : vmax;
			}
			double e = fabs((double)got[h * w->hd + d] - want) / vmax;
			if (!(e <= worst))
				worst = isnan(e) ? INFINITY : e;
		}
	}
	free(s);
	return worst;
}

/* Describes where n_rows rows of nh heads of hd floats in a and b first
 * differ; false when they are bitwise equal. */
static bool rows_differ(const float *a, const float *b, int n_rows, int nh, int hd, char *msg,
                        size_t cap)
{
	size_t cols = (size_t)nh * (size_t)hd, n = (size_t)n_rows * cols, first = n;
	double maxdiff = 0;

	if (!memcmp(a, b, n * sizeof(float)))
		return false;
	for (size_t i = 0; i < n; i++) {
		if (memcmp(&a[i], &b[i], sizeof(float)) != 0) {
			double d = fabs((double)a[i] - b[i]);
			if (first == n)
				first = i;
			maxdiff = d > maxdiff ? d : maxdiff;
		}
	}
	snprintf(msg, cap, "row %zu head %zu dim %zu: %.9g vs %.9g (largest difference %.3g)",
	         first / cols, first % cols / (size_t)hd, first % (size_t)hd, a[first], b[first],
	         maxdiff);
	return true;
}

/* The scalar backends run the portable kernels, the others AVX2 where the
 * CPU has it (without it, the AVX2 kernels go untested). */
static void test_kernel_sets(void)
{
	for (int i = 0; i < 3; i++)
		CHECK_EQ_INT(lp_backend_cpu_uses_avx2(g_avx[i]), lp_cpu_has_avx2());
	for (int i = 0; i < 2; i++)
		CHECK(!lp_backend_cpu_uses_avx2(g_scalar[i]));
}

/* ---- (a) a lone decode token against the reference ---- */

/* One decode token at position 1000 alone in the call: 1001 positions over
 * 63 scattered blocks, the last one partly filled. Alone, it takes the
 * split decode path (16 parts merged). */
static void test_decode_alone_matches_reference(void)
{
	static const struct {
		enum lp_dtype ct;
		int hd;
	} shapes[] = {{LP_DTYPE_F32, 64}, {LP_DTYPE_F16, 64}, {LP_DTYPE_BF16, 64},
	              {LP_DTYPE_F32, 20}, {LP_DTYPE_F16, 36}, {LP_DTYPE_BF16, 40}};
	struct lp_backend *bes[] = {g_avx[2], g_avx[0], g_scalar[1]};
	const char *names[] = {"avx2 x3", "avx2 x1", "scalar x3"};
	int32_t seq = 1, pos = 1000;

	for (size_t c = 0; c < sizeof(shapes) / sizeof(shapes[0]); c++) {
		struct world w;
		struct lp_err err = {0};

		CHECK_MSG(world_init(&w, shapes[c].ct, 6, 2, shapes[c].hd, 3, 11 + c) == 0,
		          "out of memory");
		for (int b = 0; b < 3; b++) {
			float *out;
			double e;

			if (run_call(bes[b], &w, 1, &seq, &pos, &out, &err)) {
				TEST_FAIL("%s: %s", names[b], err.msg);
				continue;
			}
			e = reference_error(&w, seq, pos, out);
			if (!(e <= 2e-6))
				TEST_FAIL("%s %s head_dim %d: relative error %g", names[b],
				          lp_dtype_name(shapes[c].ct), shapes[c].hd, e);
			free(out);
		}
		world_release(&w);
	}
}

/* ---- (b) the same call on any number of threads ---- */

/* Runs the call on every backend and checks that AVX2 on 1, 2 and 3 threads
 * agree bitwise, and the portable kernels on 1 and 3 threads. The two
 * kernel sets differ in rounding, so each is checked against the reference
 * instead, every row. */
static void check_thread_invariant(const char *what, enum lp_dtype ct, int nh, int nkv, int hd,
                                   int n, const int32_t *seq, const int32_t *pos)
{
	struct world w;
	struct lp_err err = {0};
	float *avx[3] = {NULL, NULL, NULL}, *sc[2] = {NULL, NULL};
	int cols = nh * hd;
	char msg[256];

	if (world_init(&w, ct, nh, nkv, hd, 8, 1234)) {
		TEST_FAIL("out of memory");
		return;
	}
	for (int i = 0; i < 3; i++)
		if (run_call(g_avx[i], &w, n, seq, pos, &avx[i], &err))
			TEST_FAIL("%s: %s", what, err.msg);
	for (int i = 0; i < 2; i++)
		if (run_call(g_scalar[i], &w, n, seq, pos, &sc[i], &err))
			TEST_FAIL("%s: %s", what, err.msg);
	if (test_current_failed)
		goto out;
	for (int i = 1; i < 3; i++)
		if (rows_differ(avx[0], avx[i], n, nh, hd, msg, sizeof(msg)))
			TEST_FAIL("%s %s: avx2 on 1 and %d threads differ at %s", what,
			          lp_dtype_name(ct), i + 1, msg);
	if (rows_differ(sc[0], sc[1], n, nh, hd, msg, sizeof(msg)))
		TEST_FAIL("%s %s: scalar on 1 and 3 threads differ at %s", what, lp_dtype_name(ct),
		          msg);
	/* and the results are right, not just stable */
	for (int t = 0; t < n; t++) {
		double ea = reference_error(&w, seq[t], pos[t], avx[0] + (size_t)t * cols);
		double es = reference_error(&w, seq[t], pos[t], sc[0] + (size_t)t * cols);

		if (!(ea <= 2e-6 && es <= 2e-6)) {
			TEST_FAIL("%s %s: token %d (position %d) relative error %g (avx2), %g "
			          "(scalar)",
			          what, lp_dtype_name(ct), t, pos[t], ea, es);
			break;
		}
	}
out:
	for (int i = 0; i < 3; i++)
		free(avx[i]);
	for (int i = 0; i < 2; i++)
		free(sc[i]);
	world_release(&w);
}

/* Appends a run of count tokens of seq at positions pos0.. */
static int add_run(int32_t *seq, int32_t *pos, int n, int s, int pos0, int count)
{
	for (int i = 0; i < count; i++) {
		seq[n + i] = s;
		pos[n + i] = pos0 + i;
	}
	return n + count;
}

/* A step's batch: prefill chunks (one at positions 600..619, one at the
 * start of a sequence, one of 9 tokens at 1100..1108) and decode rows at
 * 1000, 530, 37 and 0. Runs of two or more on average: the prefill runs
 * path on both kernel sets. */
static void test_threads_mixed_batch(void)
{
	int32_t seq[64], pos[64];
	int n = 0;

	n = add_run(seq, pos, n, 0, 600, 20);
	n = add_run(seq, pos, n, 1, 1000, 1);
	n = add_run(seq, pos, n, 2, 0, 9);
	n = add_run(seq, pos, n, 3, 530, 1);
	n = add_run(seq, pos, n, 4, 1100, 9);
	n = add_run(seq, pos, n, 5, 37, 1);
	n = add_run(seq, pos, n, 6, 0, 1);
	check_thread_invariant("mixed batch", LP_DTYPE_F32, 6, 2, 64, n, seq, pos);
	check_thread_invariant("mixed batch", LP_DTYPE_F16, 6, 2, 64, n, seq, pos);
	check_thread_invariant("mixed batch", LP_DTYPE_BF16, 6, 2, 64, n, seq, pos);
}

/* Three decode rows at positions 1000, 530 and 77: 3 tokens x 2 kv heads
 * < 16, so the split path with up to 16 parts of 64 positions. */
static void test_threads_split_decode(void)
{
	int32_t seq[3] = {0, 1, 2}, pos[3] = {1000, 530, 77};

	check_thread_invariant("split decode", LP_DTYPE_F32, 6, 2, 64, 3, seq, pos);
	check_thread_invariant("split decode", LP_DTYPE_F16, 6, 2, 64, 3, seq, pos);
	check_thread_invariant("split decode", LP_DTYPE_BF16, 6, 2, 64, 3, seq, pos);
}

/* Eight decode rows with long and short contexts and one short prefill
 * chunk: too many tokens to split, too few runs for the runs path, so the default
 * path walks contexts of up to 1101 positions in one online softmax. */
static void test_threads_decode_batch(void)
{
	int32_t seq[16], pos[16];
	int n = 0;
	static const int decode_pos[8] = {1000, 530, 77, 1100, 0, 513, 640, 3};

	for (int s = 0; s < 8; s++)
		n = add_run(seq, pos, n, s, decode_pos[s], 1);
	n = add_run(seq, pos, n, 7, 4, 2);
	check_thread_invariant("decode batch", LP_DTYPE_F32, 6, 2, 64, n, seq, pos);
	check_thread_invariant("decode batch", LP_DTYPE_F16, 6, 2, 64, n, seq, pos);
	check_thread_invariant("decode batch", LP_DTYPE_BF16, 6, 2, 64, n, seq, pos);
}

/* One token with 8 query heads on one kv head and a context of 60
 * positions (too short to split): the default path cuts the kv group into
 * fewer heads per unit the more threads there are (4 heads on 1 thread, 2
 * on 2, 1 on 3), which must change no result. */
static void test_threads_group_cut(void)
{
	int32_t seq[1] = {3}, pos[1] = {59};

	check_thread_invariant("one token, 8:1 group", LP_DTYPE_F32, 8, 1, 64, 1, seq, pos);
	check_thread_invariant("one token, 8:1 group", LP_DTYPE_F16, 8, 1, 64, 1, seq, pos);
	check_thread_invariant("one token, 8:1 group", LP_DTYPE_BF16, 8, 1, 64, 1, seq, pos);
}

/* ---- (c) a row's result does not depend on the other rows ---- */

/* Runs the call and compares row `row` of its output with target alone
 * (the row of the same token run in a call of its own). */
static void check_same_as_alone(const char *what, struct lp_backend *be, const char *bname,
                                const struct world *w, int n, const int32_t *seq,
                                const int32_t *pos, int row)
{
	struct lp_err err = {0};
	float *alone = NULL, *batch = NULL;
	int cols = w->nh * w->hd;
	char msg[256];

	if (run_call(be, w, 1, &seq[row], &pos[row], &alone, &err) ||
	    run_call(be, w, n, seq, pos, &batch, &err)) {
		TEST_FAIL("%s: %s", what, err.msg);
		goto out;
	}
	if (rows_differ(alone, batch + (size_t)row * cols, 1, w->nh, w->hd, msg, sizeof(msg)))
		TEST_FAIL("%s, %s %s: the token at position %d alone and as row %d of %d differ "
		          "at %s",
		          what, bname, lp_dtype_name(w->ct), pos[row], row, n, msg);
out:
	free(alone);
	free(batch);
}

/* The backends and cache types every row test runs on. */
static void check_rows_everywhere(const char *what, int n, const int32_t *seq, const int32_t *pos,
                                  int row)
{
	static const enum lp_dtype cts[] = {LP_DTYPE_F32, LP_DTYPE_F16, LP_DTYPE_BF16};

	for (int c = 0; c < 3; c++) {
		struct world w;

		if (world_init(&w, cts[c], 6, 2, 64, 8, 99)) {
			TEST_FAIL("out of memory");
			return;
		}
		check_same_as_alone(what, g_avx[2], "avx2 x3", &w, n, seq, pos, row);
		check_same_as_alone(what, g_scalar[1], "scalar x3", &w, n, seq, pos, row);
		world_release(&w);
	}
}

/* A decode row at position 1000 next to two other decode rows: alone and
 * in the batch it takes the split path. */
static void test_row_in_small_decode_batch(void)
{
	int32_t seq[3] = {0, 1, 2}, pos[3] = {530, 1000, 77};

	check_rows_everywhere("small decode batch", 3, seq, pos, 1);
}

/* The same decode row next to seven other decode rows: alone it takes the
 * split path, in the batch (8 tokens x 2 kv heads = 16) the default one. */
static void test_row_in_large_decode_batch(void)
{
	int32_t seq[8] = {0, 1, 2, 3, 4, 5, 6, 7}, pos[8] = {530, 1000, 77, 1100, 0, 513, 640, 3};

	check_rows_everywhere("large decode batch", 8, seq, pos, 1);
}

/* The same decode row in a step with prefill chunks of other sequences
 * (the prefill runs path). */
static void test_row_in_prefill_batch(void)
{
	int32_t seq[40], pos[40];
	int n = 0, row;

	n = add_run(seq, pos, n, 0, 600, 20);
	row = n;
	n = add_run(seq, pos, n, 1, 1000, 1);
	n = add_run(seq, pos, n, 2, 0, 9);
	check_rows_everywhere("prefill batch", n, seq, pos, row);
}

/* A prefill chunk of 9 tokens of one sequence (positions 700..708) first
 * in the call, and the same chunk after three decode rows of other
 * sequences: each of its rows must come out the same. */
static void test_prefill_rows_anywhere_in_batch(void)
{
	static const enum lp_dtype cts[] = {LP_DTYPE_F32, LP_DTYPE_F16, LP_DTYPE_BF16};
	struct lp_backend *bes[] = {g_avx[2], g_scalar[1]};
	const char *names[] = {"avx2 x3", "scalar x3"};
	int32_t s1[12], p1[12], s2[12], p2[12];
	int n1 = 0, n2 = 0;

	n1 = add_run(s1, p1, n1, 3, 700, 9);
	n1 = add_run(s1, p1, n1, 0, 530, 1);
	n1 = add_run(s1, p1, n1, 1, 1000, 1);
	n1 = add_run(s1, p1, n1, 2, 77, 1);
	n2 = add_run(s2, p2, n2, 0, 530, 1);
	n2 = add_run(s2, p2, n2, 1, 1000, 1);
	n2 = add_run(s2, p2, n2, 2, 77, 1);
	n2 = add_run(s2, p2, n2, 3, 700, 9);
	for (int c = 0; c < 3; c++) {
		struct world w;

		if (world_init(&w, cts[c], 6, 2, 64, 8, 7)) {
			TEST_FAIL("out of memory");
			return;
		}
		for (int b = 0; b < 2; b++) {
			struct lp_err err = {0};
			float *o1 = NULL, *o2 = NULL;
			int cols = w.nh * w.hd;
			char msg[256];

			if (run_call(bes[b], &w, n1, s1, p1, &o1, &err) ||
			    run_call(bes[b], &w, n2, s2, p2, &o2, &err)) {
				TEST_FAIL("%s", err.msg);
			} else {
				/* the chunk is rows 0..8 of the first call, 3..11 of
				 * the second; the decode rows 9..11 and 0..2 */
				for (int i = 0; i < 9; i++)
					if (rows_differ(o1 + (size_t)i * cols,
					                o2 + (size_t)(3 + i) * cols, 1, w.nh, w.hd,
					                msg, sizeof(msg)))
						TEST_FAIL("%s %s: prefill token at position %d "
						          "first in the call and after 3 decode "
						          "rows differ at %s",
						          names[b], lp_dtype_name(cts[c]), p1[i],
						          msg);
				for (int i = 0; i < 3; i++)
					if (rows_differ(o1 + (size_t)(9 + i) * cols,
					                o2 + (size_t)i * cols, 1, w.nh, w.hd, msg,
					                sizeof(msg)))
						TEST_FAIL("%s %s: decode token at position %d "
						          "after and before the chunk differ at %s",
						          names[b], lp_dtype_name(cts[c]), p2[i],
						          msg);
			}
			free(o1);
			free(o2);
		}
		world_release(&w);
	}
}

/* ---- (d) padding rows and block ids outside the cache ---- */

/* Runs the call of n tokens, then the same call with padding rows
 * (tok_seq -1, position 0) put in wherever pad[i] is set: the padding rows
 * must come out exactly zero and the others as without them, bitwise. */
static void check_padding(const char *what, struct lp_backend *be, const char *bname,
                          const struct world *w, int n, const int32_t *seq, const int32_t *pos,
                          const bool *pad, int n_padded)
{
	struct lp_err err = {0};
	int32_t ps[64], pp[64];
	float *plain = NULL, *padded = NULL;
	int cols = w->nh * w->hd;
	char msg[256];

	for (int i = 0, t = 0; i < n_padded; i++) {
		ps[i] = pad[i] ? -1 : seq[t];
		pp[i] = pad[i] ? 0 : pos[t];
		t += !pad[i];
	}
	if (run_call(be, w, n, seq, pos, &plain, &err) ||
	    run_call(be, w, n_padded, ps, pp, &padded, &err)) {
		TEST_FAIL("%s: %s", what, err.msg);
		goto out;
	}
	for (int i = 0, t = 0; i < n_padded; i++) {
		const float *row = padded + (size_t)i * cols;

		if (!pad[i]) {
			if (rows_differ(plain + (size_t)t * cols, row, 1, w->nh, w->hd, msg,
			                sizeof(msg)))
				TEST_FAIL("%s, %s %s: token %d alone and among padding rows (row "
				          "%d) differ at %s",
				          what, bname, lp_dtype_name(w->ct), t, i, msg);
			t++;
			continue;
		}
		for (int c = 0; c < cols; c++) {
			if (row[c] != 0.0f) {
				TEST_FAIL("%s, %s %s: padding row %d element %d is %g, not 0", what,
				          bname, lp_dtype_name(w->ct), i, c, row[c]);
				goto out;
			}
		}
	}
	CHECK_MSG(lp_backend_status(be, &err) == 0, "%s: status: %s", what, err.msg);
out:
	free(plain);
	free(padded);
}

/* Padding rows (as begin_step pads a step to a token bucket) in each of the
 * three paths: after a lone decode token (split), after a prefill chunk
 * (runs) and between decode rows (default). */
static void test_padding_rows(void)
{
	static const enum lp_dtype cts[] = {LP_DTYPE_F32, LP_DTYPE_BF16};
	struct lp_backend *bes[] = {g_avx[2], g_scalar[1]};
	const char *names[] = {"avx2 x3", "scalar x3"};
	int32_t s1[1] = {1}, p1[1] = {1000};
	bool pad1[4] = {false, true, true, true};
	int32_t s2[20], p2[20];
	bool pad2[32];
	int32_t s3[8] = {0, 1, 2, 3, 4, 5, 6, 7}, p3[8] = {530, 1000, 77, 1100, 0, 513, 640, 3};
	bool pad3[16];

	add_run(s2, p2, 0, 0, 600, 20);
	for (int i = 0; i < 32; i++)
		pad2[i] = i >= 20;
	for (int i = 0; i < 16; i++)
		pad3[i] = i % 2 == 1;
	for (int c = 0; c < 2; c++) {
		struct world w;

		if (world_init(&w, cts[c], 6, 2, 64, 8, 5)) {
			TEST_FAIL("out of memory");
			return;
		}
		for (int b = 0; b < 2; b++) {
			check_padding("split decode", bes[b], names[b], &w, 1, s1, p1, pad1, 4);
			check_padding("prefill runs", bes[b], names[b], &w, 20, s2, p2, pad2, 32);
			check_padding("decode rows", bes[b], names[b], &w, 8, s3, p3, pad3, 16);
		}
		world_release(&w);
	}
}

/* Sequence 2's block table with entry 3 past the end of the cache and entry
 * 5 negative. A token whose context covers them (position 200) skips their
 * positions, matching the reference without them, and the backend reports
 * the first as an I/O error naming attention; a token whose context stops
 * short of them (position 40) reads neither and reports nothing. Each call
 * on a backend of its own (the status is sticky), on both kernel sets, in
 * the split path (alone) and the runs path (with a prefill chunk). */
static void test_bad_block_reported(void)
{
	static const char *names[] = {"avx2", "scalar"};
	struct world w;

	CHECK_MSG(world_init(&w, LP_DTYPE_BF16, 6, 2, 64, 4, 21) == 0, "out of memory");
	w.tables[2 * MAXB + 3] = (int32_t)(w.rows / BS) + 7;
	w.tables[2 * MAXB + 5] = -3;
	for (int kset = 0; kset < 2; kset++) {
		for (int c = 0; c < 3; c++) {
			struct lp_backend *be = NULL;
			struct lp_err err = {0};
			int32_t seq[24], pos[24];
			int n = 0, row = 0;
			bool bad = c != 2;
			float *out = NULL;

			if (c == 1)
				n = add_run(seq, pos, n, 0, 300, 12);
			row = n;
			n = add_run(seq, pos, n, 2, c == 2 ? 40 : 200, 1);
			if (c == 1)
				n = add_run(seq, pos, n, 1, 0, 11);
			if (kset == 1)
				setenv("LP_CPU_NO_AVX2", "1", 1);
			int rc = lp_backend_cpu_new(&be, 2, &err);
			unsetenv("LP_CPU_NO_AVX2");
			if (rc) {
				TEST_FAIL("setup: %s", err.msg);
				break;
			}
			if (run_call(be, &w, n, seq, pos, &out, &err)) {
				TEST_FAIL("%s: %s", names[kset], err.msg);
			} else {
				double e = reference_error(&w, seq[row], pos[row],
				                           out + (size_t)row * w.nh * w.hd);
				int st = lp_backend_status(be, &err);

				if (!(e <= 2e-6))
					TEST_FAIL(
					    "%s call %d: relative error %g against the reference "
					    "without the bad blocks' positions",
					    names[kset], c, e);
				if (bad && (st != -EIO || !strstr(err.msg, "attention")))
					TEST_FAIL(
					    "%s call %d: status %d (%s), expected -EIO naming "
					    "attention",
					    names[kset], c, st, err.msg);
				if (!bad && st != 0)
					TEST_FAIL(
					    "%s call %d: status %d (%s) for a context short of "
					    "the bad blocks",
					    names[kset], c, st, err.msg);
			}
			free(out);
			lp_backend_destroy(be);
		}
	}
	world_release(&w);
}

/* ---- (e) sliding windows ---- */

static const int g_windows[] = {1, 2, 24, 50, 64, 65, 100, 129, 777, 5000};
#define N_WINDOWS ((int)(sizeof(g_windows) / sizeof(g_windows[0])))

/* Windows shorter and longer than the contexts, multiples of neither 64 (the
 * kernels' chunk) nor 16 (the block size), and of both: a lone decode row
 * (the split path), a step's mixed batch (the runs path, prefill chunks
 * crossing chunk boundaries) and eight decode rows (the default path), each
 * row against the reference and bitwise the same on any number of
 * threads. */
static void test_window_matches_reference(void)
{
	static const enum lp_dtype cts[] = {LP_DTYPE_F32, LP_DTYPE_F16, LP_DTYPE_BF16};
	static const int decode_pos[8] = {1000, 530, 77, 1100, 0, 513, 640, 3};
	int32_t s1[1] = {1}, p1[1] = {1000}, s2[128], p2[128], s3[8], p3[8];
	int n2 = 0;
	char what[64];

	n2 = add_run(s2, p2, n2, 0, 600, 20);
	n2 = add_run(s2, p2, n2, 1, 1000, 1);
	n2 = add_run(s2, p2, n2, 2, 0, 9);
	n2 = add_run(s2, p2, n2, 3, 40, 50); /* positions 40 .. 89 */
	n2 = add_run(s2, p2, n2, 4, 1100, 9);
	n2 = add_run(s2, p2, n2, 5, 37, 1);
	for (int s = 0; s < 8; s++) {
		s3[s] = s;
		p3[s] = decode_pos[s];
	}
	for (int i = 0; i < N_WINDOWS && !test_current_failed; i++) {
		enum lp_dtype ct = cts[i % 3];

		g_window = g_windows[i];
		snprintf(what, sizeof(what), "window %d, decode alone", g_window);
		check_thread_invariant(what, ct, 6, 2, 64, 1, s1, p1);
		snprintf(what, sizeof(what), "window %d, mixed batch", g_window);
		check_thread_invariant(what, ct, 6, 2, 64, n2, s2, p2);
		snprintf(what, sizeof(what), "window %d, decode batch", g_window);
		check_thread_invariant(what, ct, 6, 2, 64, 8, s3, p3);
	}
	g_window = 0;
}

/* A row's result does not depend on the rest of the call with a window
 * either: the batches of (c) again, and tokens in the middle of a prefill
 * chunk (positions 600..639 and 40..89, the latter crossing a chunk
 * boundary) against the same token computed alone, as in a decode step:
 * chunked prefill and decoding give the same bits. */
static void test_window_rows_anywhere(void)
{
	static const int windows[] = {24, 100, 777};
	int32_t seq[128], pos[128];
	int n = 0;

	n = add_run(seq, pos, n, 3, 600, 40);
	n = add_run(seq, pos, n, 4, 40, 50);
	n = add_run(seq, pos, n, 1, 1000, 1);
	for (int i = 0; i < 3 && !test_current_failed; i++) {
		g_window = windows[i];
		test_row_in_small_decode_batch();
		test_row_in_large_decode_batch();
		test_row_in_prefill_batch();
		test_prefill_rows_anywhere_in_batch();
		check_rows_everywhere("window, middle of a chunk", n, seq, pos, 20);
		check_rows_everywhere("window, chunk across 64", n, seq, pos, 40 + 30);
		check_rows_everywhere("window, chunk across 64, first", n, seq, pos, 40);
	}
	g_window = 0;
}

/* The engine releases the blocks wholly before a sequence's window and
 * leaves garbage in their table entries: sequence 2's entries before the
 * window of its lowest position in the call are set to -1 and past the
 * cache's end, and the call must read none of them (no error reported) and
 * give the same bits as with the real entries. A decode row alone (split),
 * a prefill chunk with another sequence (runs) and among decode rows
 * (default), both kernel sets, windows 24 and 100. */
static void test_window_skips_released_blocks(void)
{
	static const int windows[] = {24, 100};
	static const char *names[] = {"avx2", "scalar"};

	for (int wi = 0; wi < 2; wi++) {
		g_window = windows[wi];
		for (int kset = 0; kset < 2; kset++) {
			for (int c = 0; c < 3; c++) {
				struct world w;
				struct lp_backend *be = NULL;
				struct lp_err err = {0};
				int32_t seq[24], pos[24];
				float *plain = NULL, *poisoned = NULL;
				int n = 0, lowest = INT32_MAX;
				char msg[256];

				if (c == 1)
					n = add_run(seq, pos, n, 0, 300, 12);
				if (c == 2)
					for (int s = 3; s < 7; s++)
						n = add_run(seq, pos, n, s, 90 * s, 1);
				n = add_run(seq, pos, n, 2, 990, c == 1 ? 11 : 1);
				for (int t = 0; t < n; t++)
					if (seq[t] == 2 && pos[t] < lowest)
						lowest = pos[t];
				if (world_init(&w, LP_DTYPE_BF16, 6, 2, 64, 8, 31 + c)) {
					TEST_FAIL("out of memory");
					goto out;
				}
				if (kset == 1)
					setenv("LP_CPU_NO_AVX2", "1", 1);
				int rc = lp_backend_cpu_new(&be, 2, &err);
				unsetenv("LP_CPU_NO_AVX2");
				if (rc || run_call(be, &w, n, seq, pos, &plain, &err)) {
					TEST_FAIL("setup: %s", err.msg);
					goto next;
				}
				for (int b = 0; (b + 1) * BS <= lowest - g_window + 1; b++)
					w.tables[2 * MAXB + b] =
					    b % 2 ? -1 : (int32_t)(w.rows / BS) + b;
				if (run_call(be, &w, n, seq, pos, &poisoned, &err)) {
					TEST_FAIL("%s", err.msg);
					goto next;
				}
				if (lp_backend_status(be, &err))
					TEST_FAIL("%s window %d call %d: a released block's entry "
					          "was read: %s",
					          names[kset], g_window, c, err.msg);
				if (rows_differ(plain, poisoned, n, w.nh, w.hd, msg, sizeof(msg)))
					TEST_FAIL("%s window %d call %d: released entries change "
					          "the result at %s",
					          names[kset], g_window, c, msg);
			next:
				free(plain);
				free(poisoned);
				lp_backend_destroy(be);
				world_release(&w);
			}
		}
	}
out:
	g_window = 0;
}

int main(void)
{
	struct lp_err err = {0};
	static const int avx_threads[3] = {1, 2, 3}, scalar_threads[2] = {1, 3};

	TEST_MAIN_BEGIN("test-attention");
	unsetenv("LP_CPU_NO_AVX2");
	for (int i = 0; i < 3; i++) {
		if (lp_backend_cpu_new(&g_avx[i], avx_threads[i], &err)) {
			printf("FAIL test-attention:setup: %s\n", err.msg);
			return 1;
		}
	}
	setenv("LP_CPU_NO_AVX2", "1", 1);
	for (int i = 0; i < 2; i++) {
		if (lp_backend_cpu_new(&g_scalar[i], scalar_threads[i], &err)) {
			printf("FAIL test-attention:setup: %s\n", err.msg);
			return 1;
		}
	}
	unsetenv("LP_CPU_NO_AVX2");

	RUN(test_kernel_sets);
	RUN(test_decode_alone_matches_reference);
	RUN(test_threads_mixed_batch);
	RUN(test_threads_split_decode);
	RUN(test_threads_decode_batch);
	RUN(test_threads_group_cut);
	RUN(test_row_in_small_decode_batch);
	RUN(test_row_in_large_decode_batch);
	RUN(test_row_in_prefill_batch);
	RUN(test_prefill_rows_anywhere_in_batch);
	RUN(test_padding_rows);
	RUN(test_bad_block_reported);
	RUN(test_window_matches_reference);
	RUN(test_window_rows_anywhere);
	RUN(test_window_skips_released_blocks);

	for (int i = 0; i < 3; i++)
		lp_backend_destroy(g_avx[i]);
	for (int i = 0; i < 2; i++)
		lp_backend_destroy(g_scalar[i]);
	TEST_MAIN_END();
}
