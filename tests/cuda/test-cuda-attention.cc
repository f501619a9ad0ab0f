/* The CUDA paged attention (kernels/cuda/attention.cu), run through the
 * emulation, against the CPU backend's attention on the same inputs: the
 * same stored f32, f16 or bf16 caches, queries and block tables.
 *
 * Tolerance: the largest |cuda - cpu| of a call, divided by the largest
 * |cpu| of the call (the output range), must stay within 1e-5 for every
 * cache type. Both read the same stored values and compute in f32; they
 * differ only in the order of the sums (hd-long dot products, tiles of 32
 * positions against chunks of 64, partitions) and in exp (exp2 with log2 e
 * folded into the scale against expf), which is some 1e-7 relative per
 * operation: measured worst cases are printed per test. Every element of
 * the CUDA output starts as NaN, so one left unwritten fails.
 *
 * Every call reads one "world": K/V caches of random values in [-1, 1] and
 * each sequence's block table, its entries drawn at random from the pool
 * (sequences may share blocks, as with prefix caching). The query of a
 * token is a fixed function of its (sequence, position). The window tests
 * run the decode, mixed and prefill calls with sliding windows, and with
 * the block-table entries before each window poisoned as the engine leaves
 * them once it releases those blocks. */
#include "kernels/cuda/ops.cuh"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "kernels/backend.h"
#include "tests/test.h"

#define TOL 1e-5

static struct lp_backend *g_cpu;
static struct lp_cuda g_cu;
static double g_worst;      /* largest relative error seen by the running test */
static uint64_t g_launches; /* kernel launches of the last run_cuda */

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
	enum lp_dtype ct;
	int nh, nkv, hd, bs, max_blocks, n_seqs, n_blocks;
	int64_t rows, cols;          /* cache [n_blocks * bs, nkv * hd] */
	std::vector<uint8_t> kb, vb; /* the caches as stored */
	std::vector<int32_t> tables; /* [n_seqs, max_blocks] */
	uint64_t seed;
};

static void world_init(struct world *w, enum lp_dtype ct, int nh, int nkv, int hd, int bs,
                       int n_seqs, int max_blocks, int n_blocks, uint64_t seed)
{
	size_t es = ct == LP_DTYPE_F32 ? 4 : 2;

	w->ct = ct;
	w->nh = nh;
	w->nkv = nkv;
	w->hd = hd;
	w->bs = bs;
	w->max_blocks = max_blocks;
	w->n_seqs = n_seqs;
	w->n_blocks = n_blocks;
	w->seed = seed;
	w->rows = (int64_t)n_blocks * bs;
	w->cols = (int64_t)nkv * hd;
	size_t n = (size_t)(w->rows * w->cols);
	w->kb.assign(n * es, 0);
	w->vb.assign(n * es, 0);
	for (size_t i = 0; i < n; i++) {
		float kv[2] = {hash_float(mix64(seed) + 2 * (uint64_t)i, -1, 1),
		               hash_float(mix64(seed) + 2 * (uint64_t)i + 1, -1, 1)};
		uint8_t *dst[2] = {&w->kb[i * es], &w->vb[i * es]};

		for (int x = 0; x < 2; x++) {
			if (ct == LP_DTYPE_F16) {
				uint16_t h = lp_f32_to_f16(kv[x]);
				memcpy(dst[x], &h, 2);
			} else if (ct == LP_DTYPE_BF16) {
				uint16_t h = lp_f32_to_bf16(kv[x]);
				memcpy(dst[x], &h, 2);
			} else {
				memcpy(dst[x], &kv[x], 4);
			}
		}
	}
	w->tables.resize((size_t)n_seqs * max_blocks);
	for (size_t i = 0; i < w->tables.size(); i++)
		w->tables[i] = (int32_t)(mix64(seed * 131 + i) % (uint64_t)n_blocks);
}

/* One call: token t of sequence seq[t] at position pos[t]. */
struct call {
	std::vector<int32_t> seq, pos;
	float scale;     /* 0: 1 / sqrt(head_dim) */
	int max_context; /* 0: the largest position + 1; -1: left 0 */
	int window;      /* sliding window, 0: none */
};

static void add_run(struct call *c, int s, int pos0, int count)
{
	for (int i = 0; i < count; i++) {
		c->seq.push_back(s);
		c->pos.push_back(pos0 + i);
	}
}

static float query_value(const struct world *w, int seq, int pos, int i)
{
	uint64_t key =
	    ((uint64_t)(uint32_t)seq << 44) ^ ((uint64_t)(uint32_t)pos << 16) ^ (uint64_t)i;

	return hash_float(mix64(w->seed ^ 0x71e5) + key, -3, 3);
}

static std::vector<float> make_q(const struct world *w, const struct call *c)
{
	size_t n = c->seq.size(), cols = (size_t)w->nh * w->hd;
	std::vector<float> q(n * cols);

	for (size_t t = 0; t < n; t++)
		for (size_t i = 0; i < cols; i++)
			q[t * cols + i] = query_value(w, c->seq[t], c->pos[t], (int)i);
	return q;
}

static struct lp_attention_args make_args(const struct world *w, const struct call *c)
{
	struct lp_attention_args a;
	int mc = 0;

	memset(&a, 0, sizeof(a));
	for (size_t t = 0; t < c->pos.size(); t++)
		mc = c->pos[t] + 1 > mc ? c->pos[t] + 1 : mc;
	a.n_tokens = (int)c->seq.size();
	a.n_heads = w->nh;
	a.n_kv_heads = w->nkv;
	a.head_dim = w->hd;
	a.block_size = w->bs;
	a.max_blocks_per_seq = w->max_blocks;
	a.max_context = c->max_context > 0 ? c->max_context : c->max_context < 0 ? 0 : mc;
	a.window = c->window;
	a.scale = c->scale > 0 ? c->scale : 1.0f / sqrtf((float)w->hd);
	return a;
}

/* The CPU backend's output [n, nh * hd] on be; its status afterwards. */
static int run_cpu(struct lp_backend *be, const struct world *w, const struct call *c,
                   std::vector<float> *out, struct lp_err *err)
{
	struct lp_attention_args a = make_args(w, c);
	std::vector<float> q = make_q(w, c);
	int64_t n = a.n_tokens, qc = (int64_t)w->nh * w->hd;
	struct lp_tensor tq = {q.data(), LP_DTYPE_F32, n, qc};
	struct lp_tensor tk = {(void *)w->kb.data(), w->ct, w->rows, w->cols};
	struct lp_tensor tv = {(void *)w->vb.data(), w->ct, w->rows, w->cols};

	out->assign((size_t)(n * qc), NAN);
	struct lp_tensor to = {out->data(), LP_DTYPE_F32, n, qc};
	a.q = &tq;
	a.k_cache = &tk;
	a.v_cache = &tv;
	a.tok_seq = c->seq.data();
	a.tok_pos = c->pos.data();
	a.block_tables = w->tables.data();
	a.out = &to;
	be->ops->attention(be->ctx, &a);
	return lp_backend_status(be, err);
}

/* Device copies of a call's inputs. */
struct dev_call {
	float *q, *out;
	void *k, *v, *ws;
	int32_t *seq, *pos, *tables;
};

static void dev_free(struct dev_call *d)
{
	cudaFree(d->q);
	cudaFree(d->out);
	cudaFree(d->k);
	cudaFree(d->v);
	cudaFree(d->ws);
	cudaFree(d->seq);
	cudaFree(d->pos);
	cudaFree(d->tables);
	memset(d, 0, sizeof(*d));
}

static bool dev_upload(struct dev_call *d, const struct world *w, const struct call *c, bool ws)
{
	std::vector<float> q = make_q(w, c);
	size_t n = c->seq.size(), qb = q.size() * sizeof(float), tb = w->tables.size() * 4;
	struct lp_backend_limits lim;
	size_t wsb;

	memset(d, 0, sizeof(*d));
	memset(&lim, 0, sizeof(lim));
	lim.n_heads = w->nh;
	lim.n_kv_heads = w->nkv;
	lim.head_dim = w->hd;
	lim.max_tokens = (int)n;
	lim.block_size = w->bs;
	lim.max_blocks_per_seq = w->max_blocks;
	wsb = ws ? lp_cuda_attention_workspace(&lim) : 0;
	if (cudaMalloc((void **)&d->q, qb) || cudaMalloc((void **)&d->out, qb) ||
	    cudaMalloc(&d->k, w->kb.size()) || cudaMalloc(&d->v, w->vb.size()) ||
	    cudaMalloc((void **)&d->seq, n * 4) || cudaMalloc((void **)&d->pos, n * 4) ||
	    cudaMalloc((void **)&d->tables, tb) || (wsb && cudaMalloc(&d->ws, wsb)))
		return false;
	cudaMemcpy(d->q, q.data(), qb, cudaMemcpyHostToDevice);
	cudaMemcpy(d->k, w->kb.data(), w->kb.size(), cudaMemcpyHostToDevice);
	cudaMemcpy(d->v, w->vb.data(), w->vb.size(), cudaMemcpyHostToDevice);
	cudaMemcpy(d->seq, c->seq.data(), n * 4, cudaMemcpyHostToDevice);
	cudaMemcpy(d->pos, c->pos.data(), n * 4, cudaMemcpyHostToDevice);
	cudaMemcpy(d->tables, w->tables.data(), tb, cudaMemcpyHostToDevice);
	/* NaN everywhere: an element the op does not write shows */
	cudaMemset(d->out, 0xff, qb);
	g_cu.ws[LP_CUDA_WS_ATTENTION] = d->ws;
	g_cu.ws_bytes[LP_CUDA_WS_ATTENTION] = wsb;
	return cudaGetLastError() == cudaSuccess;
}

/* Queues the op on g_cu's stream with d's buffers. */
static void dev_attention(struct dev_call *d, const struct world *w, const struct call *c)
{
	struct lp_attention_args a = make_args(w, c);
	int64_t n = a.n_tokens, qc = (int64_t)w->nh * w->hd;
	struct lp_tensor tq = {d->q, LP_DTYPE_F32, n, qc};
	struct lp_tensor tk = {d->k, w->ct, w->rows, w->cols};
	struct lp_tensor tv = {d->v, w->ct, w->rows, w->cols};
	struct lp_tensor to = {d->out, LP_DTYPE_F32, n, qc};

	a.q = &tq;
	a.k_cache = &tk;
	a.v_cache = &tv;
	a.tok_seq = d->seq;
	a.tok_pos = d->pos;
	a.block_tables = d->tables;
	a.out = &to;
	lp_cuda_attention(&g_cu, &a);
}

/* The CUDA op's output of the call; *bad gets the bad-index word. False
 * (with the reason in msg) when a CUDA call or the op failed. */
static bool run_cuda(const struct world *w, const struct call *c, std::vector<float> *out,
                     unsigned *bad, bool ws, char *msg, size_t cap)
{
	struct dev_call d;
	bool ok = false;

	cudaMemset(g_cu.bad, 0, sizeof(unsigned));
	if (!dev_upload(&d, w, c, ws)) {
		snprintf(msg, cap, "cannot set up the device buffers");
		goto out;
	}
	g_launches = g_cu.launches;
	dev_attention(&d, w, c);
	g_launches = g_cu.launches - g_launches;
	if (lp_cuda_failed(&g_cu)) {
		snprintf(msg, cap, "op failed: %s", g_cu.status_msg);
		goto out;
	}
	if (cudaStreamSynchronize(g_cu.stream) != cudaSuccess) {
		snprintf(msg, cap, "stream: %s", cudaGetErrorString(cudaGetLastError()));
		goto out;
	}
	out->assign(c->seq.size() * (size_t)w->nh * w->hd, 0.0f);
	cudaMemcpy(out->data(), d.out, out->size() * sizeof(float), cudaMemcpyDeviceToHost);
	cudaMemcpy(bad, g_cu.bad, sizeof(unsigned), cudaMemcpyDeviceToHost);
	ok = cudaGetLastError() == cudaSuccess;
	if (!ok)
		snprintf(msg, cap, "copying back failed");
out:
	dev_free(&d);
	g_cu.ws[LP_CUDA_WS_ATTENTION] = NULL;
	g_cu.ws_bytes[LP_CUDA_WS_ATTENTION] = 0;
	return ok;
}

/* The largest |got - want| over the largest |want|; infinite when got has
 * a NaN. *where: the first element at the largest difference. */
static double rel_error(const std::vector<float> &got, const std::vector<float> &want,
                        size_t *where)
{
	double range = 0, worst = 0;

	*where = 0;
	for (size_t i = 0; i < want.size(); i++)
		range = fabs(want[i]) > range ? fabs(want[i]) : range;
	if (range == 0)
		range = 1;
	for (size_t i = 0; i < want.size(); i++) {
		double e = fabs((double)got[i] - want[i]) / range;

		if (isnan(got[i]) || isnan(want[i]))
			e = INFINITY;
		if (e > worst) {
			worst = e;
			*where = i;
		}
	}
	return worst;
}

/* Runs the call on both backends and compares; false on a failure (already
 * reported). expect_bad: the call reads a block outside the cache. */
static bool check_call(const char *what, const struct world *w, const struct call *c,
                       bool expect_bad = false, bool ws = true, double tol = TOL)
{
	struct lp_backend *be = g_cpu;
	std::vector<float> want, got;
	struct lp_err err = {};
	char msg[LP_ERR_MSG_MAX + 64];
	unsigned bad = 0;
	size_t where;
	bool ok = true;

	if (expect_bad && lp_backend_cpu_new(&be, 2, &err)) {
		TEST_FAIL("%s: cpu backend: %s", what, err.msg);
		return false;
	}
	int st = run_cpu(be, w, c, &want, &err);
	if (expect_bad ? st != -EIO : st != 0) {
		TEST_FAIL("%s: cpu status %d (%s)", what, st, err.msg);
		ok = false;
	}
	if (be != g_cpu)
		lp_backend_destroy(be);
	if (!ok)
		return false;
	if (!run_cuda(w, c, &got, &bad, ws, msg, sizeof(msg))) {
		TEST_FAIL("%s: %s", what, msg);
		return false;
	}
	if (expect_bad != ((bad & LP_CUDA_BAD_BLOCK) != 0) || (bad & ~LP_CUDA_BAD_BLOCK)) {
		TEST_FAIL("%s: bad-index word %#x, expected %#x", what, bad,
		          expect_bad ? LP_CUDA_BAD_BLOCK : 0u);
		return false;
	}
	double e = rel_error(got, want, &where);
	g_worst = e > g_worst ? e : g_worst;
	if (!(e <= tol)) {
		size_t cols = (size_t)w->nh * w->hd;
		TEST_FAIL(
		    "%s (%s, %d heads on %d, head_dim %d, block %d, %zu tokens): relative error "
		    "%.3g at token %zu (seq %d pos %d) head %zu dim %zu: cuda %.9g cpu %.9g",
		    what, lp_dtype_name(w->ct), w->nh, w->nkv, w->hd, w->bs, c->seq.size(), e,
		    where / cols, c->seq[where / cols], c->pos[where / cols], where % cols / w->hd,
		    where % w->hd, got[where], want[where]);
		return false;
	}
	/* padding rows: exactly zero */
	for (size_t t = 0; t < c->seq.size(); t++) {
		if (c->seq[t] >= 0)
			continue;
		for (int i = 0; i < w->nh * w->hd; i++) {
			if (got[t * w->nh * w->hd + i] != 0.0f) {
				TEST_FAIL("%s: padding row %zu element %d is %g", what, t, i,
				          got[t * w->nh * w->hd + i]);
				return false;
			}
		}
	}
	return true;
}

static void report_worst(const char *test, double tol = TOL)
{
	printf("     %s: worst relative error %.3g (tolerance %.0e)\n", test, g_worst, tol);
	g_worst = 0;
}

static const enum lp_dtype g_types[3] = {LP_DTYPE_F32, LP_DTYPE_F16, LP_DTYPE_BF16};

/* ---- decode ---- */

/* Decode rows of contexts 1, 15, 16, 17, 100 and 1030 positions (blocks of
 * 16: inside one block, its end, across it, many blocks) in one call: 6
 * tokens are few, so the decode grid splits the context into partitions
 * and the reduce kernel folds them. head_dim 16, 64, 128; 1, 3 and 8 query
 * heads per kv head; every cache type. */
static void test_decode_shapes(void)
{
	static const int hds[] = {16, 64, 128}, groups[] = {1, 3, 8};
	static const int lens[] = {1, 15, 16, 17, 100, 1030};

	for (int hi = 0; hi < 3; hi++) {
		for (int gi = 0; gi < 3; gi++) {
			for (int ti = 0; ti < 3; ti++) {
				struct world w;
				struct call c = {};

				world_init(&w, g_types[ti], 2 * groups[gi], 2, hds[hi], 16, 6, 72,
				           200, 11 + hi * 9 + gi * 3 + ti);
				for (int s = 0; s < 6; s++)
					add_run(&c, s, lens[s] - 1, 1);
				if (!check_call("decode", &w, &c))
					return;
				/* decode (split), reduce, prefill (no run: nothing) */
				CHECK_EQ_INT(g_launches, 3);
			}
		}
	}
	report_worst("decode shapes");
}

/* One sequence decoding, long contexts: 2048 positions (8 partitions of
 * 256: the decode and reduce kernels), the same without max_context (the
 * table's reach bounds the grid) and without a workspace (one partition,
 * no reduce: the same result). */
static void test_decode_one_long(void)
{
	for (int ti = 0; ti < 3; ti++) {
		struct world w;
		struct call c = {};

		world_init(&w, g_types[ti], 8, 1, 64, 16, 2, 160, 300, 5 + ti);
		add_run(&c, 1, 2047, 1);
		if (!check_call("one long decode row", &w, &c))
			return;
		CHECK_EQ_INT(g_launches, 2);
		c.max_context = -1;
		if (!check_call("one long decode row, max_context 0", &w, &c))
			return;
		CHECK_EQ_INT(g_launches, 2);
		c.max_context = 0;
		if (!check_call("one long decode row, no workspace", &w, &c, false, false))
			return;
		CHECK_EQ_INT(g_launches, 1);
	}
	report_worst("one long decode row");
}

/* 300 sequences decoding at once, contexts 1 .. 300 (the decode grid: 600
 * blocks, two partitions each). */
static void test_decode_300(void)
{
	struct world w;
	struct call c = {};

	world_init(&w, LP_DTYPE_F16, 6, 2, 64, 16, 300, 20, 400, 77);
	for (int s = 0; s < 300; s++)
		add_run(&c, s, (int)(mix64(s) % 300), 1);
	check_call("300 decode rows", &w, &c);
	report_worst("300 decode rows");
}

/* ---- prefill and mixed batches ---- */

/* The batch a step of the engine makes: decode rows, a fresh prompt of 37
 * tokens, a chunk of 20 with 100 positions before it, a run of 2, a
 * decode row at position 0, interleaved so that tiles hold runs of several
 * sequences and runs cross tile boundaries. */
static void mixed_batch(struct call *c)
{
	add_run(c, 0, 500, 1);
	add_run(c, 1, 0, 37);
	add_run(c, 2, 16, 1);
	add_run(c, 3, 100, 20);
	add_run(c, 4, 30, 2);
	add_run(c, 5, 0, 1);
	add_run(c, 6, 63, 1);
	add_run(c, 7, 5, 3);
}

static void test_mixed_batch(void)
{
	static const int hds[] = {64, 128}, groups[] = {1, 3, 8};

	for (int hi = 0; hi < 2; hi++) {
		for (int gi = 0; gi < 3; gi++) {
			for (int ti = 0; ti < 3; ti++) {
				struct world w;
				struct call c = {};

				world_init(&w, g_types[ti], 2 * groups[gi], 2, hds[hi], 16, 8, 40,
				           120, 300 + hi * 9 + gi * 3 + ti);
				mixed_batch(&c);
				if (!check_call("mixed batch", &w, &c))
					return;
			}
		}
	}
	report_worst("mixed batch");
}

/* A long prompt alone (130 tokens at 0..129, several prefill tiles per kv
 * head, causal within each), and the same prompt's second chunk after 700
 * positions of context. */
static void test_prefill_long(void)
{
	for (int ti = 0; ti < 3; ti += 2) {
		struct world w;
		struct call c = {}, d = {};

		world_init(&w, g_types[ti], 4, 2, 64, 16, 2, 60, 100, 41 + ti);
		add_run(&c, 0, 0, 130);
		if (!check_call("prompt of 130", &w, &c))
			return;
		add_run(&d, 1, 700, 70);
		if (!check_call("chunk of 70 after 700", &w, &d))
			return;
	}
	report_worst("long prefill");
}

/* head_dim 8, 40, 96, 136 and 256 (multiples of 8 that are not powers of
 * two, and the largest: its kernels take more than 48 KiB of shared
 * memory), with a mixed batch. */
static void test_odd_head_dims(void)
{
	static const int hds[] = {8, 40, 96, 136, 256};

	for (int hi = 0; hi < 5; hi++) {
		for (int ti = 0; ti < 3; ti += 1) {
			struct world w;
			struct call c = {};

			world_init(&w, g_types[ti], 4, 2, hds[hi], 16, 8, 40, 100,
			           600 + hi * 3 + ti);
			mixed_batch(&c);
			if (!check_call("odd head_dim", &w, &c))
				return;
		}
	}
	report_worst("odd head dims");
}

/* Block sizes 1, 7 and 32, and groups of 12 and 16 query heads per kv head
 * (more than a block takes: two head chunks). */
static void test_blocks_and_groups(void)
{
	static const int sizes[] = {1, 7, 32};

	for (int i = 0; i < 3; i++) {
		struct world w;
		struct call c = {};

		world_init(&w, LP_DTYPE_BF16, 4, 2, 32, sizes[i], 8, 640 / sizes[i] + 1,
		           4000 / sizes[i], 700 + i);
		mixed_batch(&c);
		if (!check_call("block size", &w, &c))
			return;
	}
	for (int g = 12; g <= 16; g += 4) {
		struct world w;
		struct call c = {};

		world_init(&w, LP_DTYPE_F16, g, 1, 64, 16, 8, 40, 100, 800 + g);
		mixed_batch(&c);
		if (!check_call("large group", &w, &c))
			return;
	}
	report_worst("block sizes and groups");
}

/* scale 1 instead of 1 / sqrt(head_dim): sharp softmaxes whose maximum
 * moves from tile to tile (the online rescaling). Logits reach about 40
 * here (q . k of 128 terms of variance 1, times 1), where f32 itself
 * rounds a logit by some 40 * 2^-24 * sqrt(128) and exp turns that into a
 * relative error of the weights: the two backends may differ by a few
 * 1e-6 of the output range (8.6e-6 measured), so this test allows 4e-5. */
static void test_sharp_softmax(void)
{
	for (int ti = 0; ti < 3; ti++) {
		struct world w;
		struct call c = {};

		world_init(&w, g_types[ti], 6, 2, 128, 16, 8, 40, 120, 900 + ti);
		mixed_batch(&c);
		c.scale = 1.0f;
		if (!check_call("scale 1", &w, &c, false, true, 4e-5))
			return;
	}
	report_worst("sharp softmax", 4e-5);
}

/* ---- padding, bad blocks, graphs ---- */

/* Padding rows (tok_seq -1, position 0, as begin_step pads a step) among
 * decode rows, after a prompt and inside a tile of prefill: zero rows, the
 * others as without them. */
static void test_padding_rows(void)
{
	for (int ti = 0; ti < 3; ti++) {
		struct world w;
		struct call c = {}, d = {};

		world_init(&w, g_types[ti], 6, 2, 64, 16, 8, 40, 120, 1000 + ti);
		add_run(&c, 0, 300, 1);
		add_run(&c, -1, 0, 1);
		add_run(&c, 1, 16, 1);
		add_run(&c, -1, 0, 2);
		add_run(&c, 2, 0, 1);
		add_run(&c, -1, 0, 3);
		if (!check_call("padding among decode rows", &w, &c))
			return;
		add_run(&d, 3, 0, 25);
		add_run(&d, -1, 0, 7);
		add_run(&d, 4, 200, 1);
		add_run(&d, -1, 0, 30);
		if (!check_call("padding after a prompt", &w, &d))
			return;
	}
	report_worst("padding rows");
}

/* Sequence 2's table with entry 3 past the cache's end and entry 5
 * negative: a decode row over them (split) and a prompt chunk across them
 * skip their positions as the CPU does, and flag LP_CUDA_BAD_BLOCK; a
 * context short of them (entries past a context are never read) flags
 * nothing. */
static void test_bad_block(void)
{
	for (int ti = 0; ti < 3; ti++) {
		struct world w;
		struct call a = {}, b = {}, c = {};

		world_init(&w, g_types[ti], 6, 2, 64, 16, 4, 40, 100, 1100 + ti);
		w.tables[2 * 40 + 3] = 100 + 5;
		w.tables[2 * 40 + 5] = -3;
		/* and garbage past every context of the calls below */
		for (int s = 0; s < 4; s++)
			w.tables[s * 40 + 39] = s % 2 ? 1 << 30 : -1;
		add_run(&a, 2, 600, 1);
		if (!check_call("decode over bad blocks", &w, &a, true))
			return;
		add_run(&b, 0, 10, 1);
		add_run(&b, 2, 40, 60);
		add_run(&b, 1, 7, 1);
		if (!check_call("prompt over bad blocks", &w, &b, true))
			return;
		add_run(&c, 2, 40, 1);
		add_run(&c, 2, 41, 1);
		add_run(&c, 3, 300, 1);
		if (!check_call("contexts short of bad blocks", &w, &c, false))
			return;
	}
	report_worst("bad blocks");
}

/* A decode step of 4 rows captured in a CUDA graph, replayed after the
 * positions and block tables change in device memory (as the engine
 * replays a captured step): every replay matches the CPU on the new
 * inputs. */
static void test_graph_replay(void)
{
	struct world w;
	struct call c = {};
	struct dev_call d;
	cudaGraph_t graph = NULL;
	cudaGraphExec_t exec = NULL;
	static const int steps[3][4] = {{10, 200, 0, 700}, {11, 201, 1, 701}, {950, 3, 500, 64}};

	world_init(&w, LP_DTYPE_BF16, 6, 2, 64, 16, 4, 64, 200, 1200);
	for (int s = 0; s < 4; s++)
		add_run(&c, s, steps[0][s], 1);
	c.max_context = 1024; /* the graph's bound, fixed at capture */
	CHECK(dev_upload(&d, &w, &c, true));
	CHECK(cudaStreamBeginCapture(g_cu.stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess);
	dev_attention(&d, &w, &c);
	CHECK(cudaStreamEndCapture(g_cu.stream, &graph) == cudaSuccess);
	CHECK_MSG(!lp_cuda_failed(&g_cu), "op failed in capture: %s", g_cu.status_msg);
	CHECK(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
	for (int step = 0; step < 3; step++) {
		std::vector<float> want, got;
		struct lp_err err = {};
		size_t where;

		for (int s = 0; s < 4; s++)
			c.pos[s] = steps[step][s];
		if (step == 2)
			for (size_t i = 0; i < w.tables.size(); i++)
				w.tables[i] = (w.tables[i] + 17) % w.n_blocks;
		std::vector<float> q = make_q(&w, &c); /* a query follows its position */
		cudaMemcpy(d.q, q.data(), q.size() * 4, cudaMemcpyHostToDevice);
		cudaMemcpy(d.pos, c.pos.data(), 16, cudaMemcpyHostToDevice);
		cudaMemcpy(d.tables, w.tables.data(), w.tables.size() * 4, cudaMemcpyHostToDevice);
		cudaMemset(d.out, 0xff, (size_t)4 * w.nh * w.hd * 4);
		CHECK(cudaGraphLaunch(exec, g_cu.stream) == cudaSuccess);
		CHECK(cudaStreamSynchronize(g_cu.stream) == cudaSuccess);
		got.resize((size_t)4 * w.nh * w.hd);
		cudaMemcpy(got.data(), d.out, got.size() * 4, cudaMemcpyDeviceToHost);
		CHECK(run_cpu(g_cpu, &w, &c, &want, &err) == 0);
		double e = rel_error(got, want, &where);
		g_worst = e > g_worst ? e : g_worst;
		CHECK_MSG(e <= TOL, "replay %d: relative error %g", step, e);
	}
	cudaGraphExecDestroy(exec);
	cudaGraphDestroy(graph);
	dev_free(&d);
	g_cu.ws[LP_CUDA_WS_ATTENTION] = NULL;
	g_cu.ws_bytes[LP_CUDA_WS_ATTENTION] = 0;
	report_worst("graph replay");
}

/* ---- sliding windows ---- */

/* Sets the entries of sequence s's block table that lie wholly before the
 * window of its lowest position in c to -1 or past the cache's end, as the
 * engine leaves them once it has released those blocks. */
static void poison_before_window(struct world *w, const struct call *c, int s)
{
	int lowest = INT32_MAX;

	for (size_t t = 0; t < c->seq.size(); t++)
		if (c->seq[t] == s && c->pos[t] < lowest)
			lowest = c->pos[t];
	if (lowest == INT32_MAX)
		return; /* s is not in the call */
	for (int b = 0; (b + 1) * w->bs <= lowest - c->window + 1; b++)
		w->tables[(size_t)s * w->max_blocks + b] = b % 2 ? -1 : w->n_blocks + b;
}

/* Windows of 1 to 1000 positions (shorter and longer than the contexts,
 * multiples of neither the tile of 32 nor the block size, and of both)
 * over decode rows of contexts 1 .. 1030 (split into partitions counted
 * from each window's first tile), the mixed batch and a long prompt alone
 * and after 700 positions; then the same calls with every sequence's
 * entries before its window poisoned: nothing flagged, the same result. */
static void test_window(void)
{
	static const int windows[] = {1, 7, 24, 32, 33, 100, 256, 300, 1000};
	static const int lens[] = {1, 15, 16, 17, 100, 1030};

	for (int wi = 0; wi < 9; wi++) {
		for (int poison = 0; poison < 2; poison++) {
			struct world w;
			struct call dec = {}, mix = {}, pre = {}, chunk = {};
			enum lp_dtype ct = g_types[(wi + poison) % 3];

			dec.window = mix.window = pre.window = chunk.window = windows[wi];
			world_init(&w, ct, 6, 2, 64, 16, 8, 72, 300, 1400 + wi);
			for (int s = 0; s < 6; s++)
				add_run(&dec, s, lens[s] - 1, 1);
			mixed_batch(&mix);
			if (poison)
				for (int s = 0; s < 8; s++)
					poison_before_window(&w, &dec, s);
			if (!check_call(poison ? "window, decode, poisoned" : "window, decode", &w,
			                &dec))
				return;
			/* decode (split), reduce, prefill (no run) */
			CHECK(g_launches >= 2);
			world_init(&w, ct, 6, 2, 64, 16, 8, 72, 300, 1400 + wi);
			if (poison)
				for (int s = 0; s < 8; s++)
					poison_before_window(&w, &mix, s);
			if (!check_call(poison ? "window, mixed batch, poisoned"
			                       : "window, mixed batch",
			                &w, &mix))
				return;
			world_init(&w, ct, 4, 2, 64, 16, 2, 60, 100, 1500 + wi);
			add_run(&pre, 0, 0, 130);
			add_run(&chunk, 1, 700, 70);
			if (poison) {
				poison_before_window(&w, &pre, 0);
				poison_before_window(&w, &chunk, 1);
			}
			if (!check_call("window, prompt of 130", &w, &pre) ||
			    !check_call("window, chunk of 70 after 700", &w, &chunk))
				return;
		}
	}
	report_worst("window");
}

/* One sequence decoding with a window over a long context (2047
 * positions, window 700: the partitions cover the window only) and a
 * batch of 300 decode rows with window 50, without the poisoned entries
 * being read. */
static void test_window_long_decode(void)
{
	for (int ti = 0; ti < 3; ti++) {
		struct world w;
		struct call c = {};

		world_init(&w, g_types[ti], 8, 1, 64, 16, 2, 160, 300, 1600 + ti);
		add_run(&c, 1, 2047, 1);
		c.window = 700;
		poison_before_window(&w, &c, 1);
		if (!check_call("one long decode row, window 700", &w, &c))
			return;
	}
	{
		struct world w;
		struct call c = {};

		world_init(&w, LP_DTYPE_F16, 6, 2, 64, 16, 300, 20, 400, 1700);
		for (int s = 0; s < 300; s++)
			add_run(&c, s, (int)(mix64(s) % 300), 1);
		c.window = 50;
		for (int s = 0; s < 300; s++)
			poison_before_window(&w, &c, s);
		check_call("300 decode rows, window 50", &w, &c);
	}
	report_worst("window, long decode");
}

/* Shapes the op refuses: recorded in the sticky status, nothing run. */
static void test_bad_shapes(void)
{
	struct lp_cuda cu;
	struct lp_err err = {};
	struct world w;
	struct call c = {};
	struct dev_call d;

	world_init(&w, LP_DTYPE_F32, 4, 2, 64, 16, 2, 8, 16, 1300);
	add_run(&c, 0, 5, 1);
	CHECK(lp_cuda_init(&cu, 0, &err) == 0);
	CHECK(dev_upload(&d, &w, &c, false));
	struct lp_attention_args a = make_args(&w, &c);
	struct lp_tensor tq = {d.q, LP_DTYPE_F32, 1, 4 * 64}, to = {d.out, LP_DTYPE_F32, 1, 4 * 64};
	struct lp_tensor tk = {d.k, LP_DTYPE_F32, w.rows, w.cols}, tv = tk;
	a.q = &tq;
	a.k_cache = &tk;
	a.v_cache = &tv;
	a.tok_seq = d.seq;
	a.tok_pos = d.pos;
	a.block_tables = d.tables;
	a.out = &to;
	a.head_dim = 60; /* not a multiple of 8 */
	lp_cuda_attention(&cu, &a);
	CHECK(cu.status == -EINVAL && strstr(cu.status_msg, "attention"));
	dev_free(&d);
	lp_cuda_release(&cu);
}

int main(void)
{
	struct lp_err err = {};

	TEST_MAIN_BEGIN("test-cuda-attention");
	if (lp_backend_cpu_new(&g_cpu, 2, &err)) {
		printf("FAIL test-cuda-attention:setup: %s\n", err.msg);
		return 1;
	}
	if (lp_cuda_init(&g_cu, 0, &err) || cudaMalloc((void **)&g_cu.bad, sizeof(unsigned))) {
		printf("FAIL test-cuda-attention:setup: %s\n", err.msg);
		return 1;
	}
	RUN(test_decode_shapes);
	RUN(test_decode_one_long);
	RUN(test_decode_300);
	RUN(test_mixed_batch);
	RUN(test_prefill_long);
	RUN(test_odd_head_dims);
	RUN(test_blocks_and_groups);
	RUN(test_sharp_softmax);
	RUN(test_padding_rows);
	RUN(test_bad_block);
	RUN(test_graph_replay);
	RUN(test_window);
	RUN(test_window_long_decode);
	RUN(test_bad_shapes);
#ifdef LP_CUDA_EMU
	struct lp_emu_counters st = lp_emu_stats();
	printf(
	    "     emulation: %llu launches, %llu blocks, %llu GPU threads, %llu fiber switches\n",
	    (unsigned long long)st.launches, (unsigned long long)st.blocks,
	    (unsigned long long)st.threads, (unsigned long long)st.switches);
#endif
	cudaFree(g_cu.bad);
	lp_cuda_release(&g_cu);
	lp_backend_destroy(g_cpu);
	TEST_MAIN_END();
}
