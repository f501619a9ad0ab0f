/* The CUDA mask_logits op (mask.cu), run through the emulation layer (or a
 * real device), against the CPU backend's op (kernels/cpu/backend-cpu.c),
 * whose own test (tests/unit/test-backend-cpu.c) checks it against the
 * contract of backend.h.
 *
 * Tolerances: none. The op only writes -inf or leaves a logit alone, so
 * the device's rows are compared with the CPU's bit for bit: rows with a
 * mask, rows without (-1), the row past n, NaN and infinite logits,
 * vocabularies that end inside a mask word, mask rows with a stride
 * beyond the vocabulary's words and garbage in the bits past it.
 *
 * Then the op through the backend's ops table in decode steps: the first
 * step of a bucket is captured into a CUDA Graph, later ones replay it
 * with other masks and mask rows in the same buffers, and every step
 * gives the CPU op's rows. */
#include "kernels/cuda-loader.h"
#include "kernels/cuda/ops.cuh"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tests/test.h"

static struct lp_cuda cu;
static struct lp_backend *cpu;

static uint64_t rng_state = 0x3a5c0ffee17ULL;

static uint64_t rng_next(void)
{
	return test_splitmix64(&rng_state);
}

static float frand(float lo, float hi)
{
	return lo + (hi - lo) * (float)((rng_next() >> 40) * (1.0 / 16777216.0));
}

/* One case: rows x vocab logits (n of them masked by the op), n_masks mask
 * rows of words words each, and the mask row of each of the n rows. */
struct mask_case {
	int vocab, n, rows, n_masks, words;
	float *logits;
	uint32_t *mask;
	int32_t *row_mask;
};

static void case_free(struct mask_case *c)
{
	free(c->logits);
	free(c->mask);
	free(c->row_mask);
	memset(c, 0, sizeof(*c));
}

/* Random logits with a NaN and infinities in the first rows; mask rows of
 * random bits at several densities, one that allows everything and one
 * that allows a single token; garbage past the vocabulary; every fifth row
 * without a mask and some rows sharing one. */
static bool case_make(struct mask_case *c, int vocab, int n, int words_pad)
{
	memset(c, 0, sizeof(*c));
	c->vocab = vocab;
	c->n = n;
	c->rows = n + 1;
	c->n_masks = 5;
	c->words = (vocab + 31) / 32 + words_pad;
	c->logits = (float *)malloc((size_t)c->rows * vocab * sizeof(float));
	c->mask = (uint32_t *)malloc((size_t)c->n_masks * c->words * sizeof(uint32_t));
	c->row_mask = (int32_t *)malloc((size_t)n * sizeof(int32_t));
	if (!c->logits || !c->mask || !c->row_mask)
		return false;
	for (size_t i = 0; i < (size_t)c->rows * vocab; i++)
		c->logits[i] = frand(-10.0f, 10.0f);
	for (int r = 0; r < 2 && r < n && vocab >= 3; r++) {
		c->logits[(size_t)r * vocab] = NAN;
		c->logits[(size_t)r * vocab + 1] = INFINITY;
		c->logits[(size_t)r * vocab + 2] = -INFINITY;
	}
	for (int m = 0; m < c->n_masks; m++)
		for (int w = 0; w < c->words; w++) {
			uint32_t *word = &c->mask[(size_t)m * c->words + w];
			uint32_t a = (uint32_t)rng_next(), b = (uint32_t)rng_next();
			int used = vocab - w * 32; /* bits inside the vocabulary */

			switch (m) {
			case 0:
				*word = a;
				break;
			case 1:
				*word = 0xffffffffu;
				break;
			case 2:
				*word = w == (vocab / 2) / 32 ? 1u << ((vocab / 2) % 32) : 0;
				break;
			case 3:
				*word = a & b;
				break;
			default:
				*word = a | b;
				break;
			}
			if (used < 32)
				*word |= used <= 0 ? ~0u : ~0u << used;
		}
	for (int r = 0; r < n; r++)
		c->row_mask[r] = r % 5 == 4 ? -1 : (int32_t)((r * 3) % c->n_masks);
	return true;
}

/* The device op on a copy of the case's logits; *out gets all rows. */
static bool run_cuda(const struct mask_case *c, float *out)
{
	size_t lbytes = (size_t)c->rows * c->vocab * sizeof(float);
	size_t mbytes = (size_t)c->n_masks * c->words * sizeof(uint32_t);
	float *dl = NULL;
	uint32_t *dm = NULL;
	int32_t *dr = NULL;
	bool ok;

	ok = cudaMalloc((void **)&dl, lbytes) == cudaSuccess &&
	     cudaMalloc((void **)&dm, mbytes) == cudaSuccess &&
	     cudaMalloc((void **)&dr, (size_t)c->n * 4) == cudaSuccess &&
	     cudaMemcpy(dl, c->logits, lbytes, cudaMemcpyHostToDevice) == cudaSuccess &&
	     cudaMemcpy(dm, c->mask, mbytes, cudaMemcpyHostToDevice) == cudaSuccess &&
	     cudaMemcpy(dr, c->row_mask, (size_t)c->n * 4, cudaMemcpyHostToDevice) == cudaSuccess &&
	     cudaDeviceSynchronize() == cudaSuccess;
	if (ok) {
		struct lp_tensor t = {dl, LP_DTYPE_F32, c->rows, c->vocab};
		struct lp_mask_args a = {&t, dm, dr, c->n, c->n_masks, c->words};

		lp_cuda_mask_logits(&cu, &a);
		ok = cudaStreamSynchronize(cu.stream) == cudaSuccess &&
		     cudaMemcpy(out, dl, lbytes, cudaMemcpyDeviceToHost) == cudaSuccess;
	}
	cudaFree(dl);
	cudaFree(dm);
	cudaFree(dr);
	return ok;
}

/* The CPU op on a copy of the case's logits. */
static bool run_cpu(const struct mask_case *c, float *out)
{
	struct lp_tensor t = {out, LP_DTYPE_F32, c->rows, c->vocab};
	struct lp_mask_args a = {&t, c->mask, c->row_mask, c->n, c->n_masks, c->words};
	struct lp_err err;

	memcpy(out, c->logits, (size_t)c->rows * c->vocab * sizeof(float));
	cpu->ops->mask_logits(cpu->ctx, &a);
	return cpu->ops->status(cpu->ctx, &err) == 0;
}

static unsigned bad_flags(void)
{
	unsigned v = 0, zero = 0;

	cudaStreamSynchronize(cu.stream);
	cudaMemcpy(&v, cu.bad, sizeof(v), cudaMemcpyDeviceToHost);
	cudaMemcpy(cu.bad, &zero, sizeof(zero), cudaMemcpyHostToDevice);
	cudaDeviceSynchronize();
	return v;
}

/* Both ops on the case: the same bits everywhere. */
static bool compare(const char *what, const struct mask_case *c)
{
	size_t cnt = (size_t)c->rows * c->vocab;
	float *g = (float *)malloc(cnt * sizeof(float)), *w = (float *)malloc(cnt * sizeof(float));
	bool ok = g && w && run_cuda(c, g) && run_cpu(c, w);
	size_t masked = 0;

	if (!ok)
		TEST_FAIL("%s: a run failed", what);
	if (ok && (cu.status || bad_flags())) {
		TEST_FAIL("%s: device status %d (%s)", what, cu.status, cu.status_msg);
		ok = false;
	}
	for (size_t i = 0; ok && i < cnt; i++) {
		if (memcmp(&g[i], &w[i], sizeof(float)) != 0) {
			TEST_FAIL("%s: row %zu token %zu: device %g, cpu %g", what, i / c->vocab,
			          i % c->vocab, g[i], w[i]);
			ok = false;
		}
		masked += isinf(w[i]) && w[i] < 0 && !(isinf(c->logits[i]) && c->logits[i] < 0);
	}
	/* the case does mask something */
	if (ok && masked == 0) {
		TEST_FAIL("%s: nothing was masked", what);
		ok = false;
	}
	free(g);
	free(w);
	return ok;
}

static void test_matches_cpu(void)
{
	static const struct {
		int vocab, n, words_pad;
	} cases[] = {
	    {1000, 9, 0}, {1024, 4, 2}, {33, 3, 0}, {5, 2, 0}, {49152, 2, 0}, {151936, 3, 1},
	};
	struct mask_case c;
	char what[64];

	for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
		snprintf(what, sizeof(what), "vocab %d, %d rows", cases[k].vocab, cases[k].n);
		CHECK_MSG(case_make(&c, cases[k].vocab, cases[k].n, cases[k].words_pad),
		          "out of memory");
		bool ok = compare(what, &c);
		case_free(&c);
		CHECK(ok);
	}
}

/* A mask row read from device memory outside -1 .. n_masks - 1 leaves its
 * row alone and flags LP_CUDA_BAD_MASK; the other rows are masked. */
static void test_bad_mask_row(void)
{
	struct mask_case c;
	size_t cnt;
	float *g = NULL, *w = NULL;

	CHECK_MSG(case_make(&c, 100, 4, 0), "out of memory");
	cnt = (size_t)c.rows * c.vocab;
	g = (float *)malloc(cnt * sizeof(float));
	w = (float *)malloc(cnt * sizeof(float));
	c.row_mask[0] = 0;
	c.row_mask[1] = c.n_masks; /* one past the end */
	c.row_mask[2] = -2;
	c.row_mask[3] = 3;
	bool ran = g && w && run_cuda(&c, g);
	unsigned bad = bad_flags();
	/* what the device should have done: rows 1 and 2 left alone */
	c.row_mask[1] = -1;
	c.row_mask[2] = -1;
	bool ref = ran && run_cpu(&c, w);
	bool same = ref && !memcmp(g, w, cnt * sizeof(float));
	case_free(&c);
	free(g);
	free(w);
	CHECK(ran && ref);
	CHECK_EQ_INT(bad, LP_CUDA_BAD_MASK);
	CHECK_MSG(same, "the rows differ from the CPU's with the bad rows left alone");
}

/* Arguments the op refuses go to the sticky status, naming the op; n = 0
 * does nothing. */
static void test_shape_errors(void)
{
	struct lp_tensor t = {cu.bad, LP_DTYPE_F16, 2, 100};
	const uint32_t *mask = (const uint32_t *)cu.bad;   /* never read */
	const int32_t *row_mask = (const int32_t *)cu.bad; /* never read */
	struct lp_mask_args a = {&t, mask, row_mask, 2, 1, 4};

	lp_cuda_mask_logits(&cu, &a);
	CHECK_EQ_INT(cu.status, -EINVAL);
	CHECK_MSG(strstr(cu.status_msg, "mask_logits"), "status names the op: %s", cu.status_msg);
	cu.status = 0;
	cu.status_msg[0] = 0;
	t.type = LP_DTYPE_F32;
	a.words = 3; /* 96 bits for 100 tokens */
	lp_cuda_mask_logits(&cu, &a);
	CHECK_EQ_INT(cu.status, -EINVAL);
	cu.status = 0;
	cu.status_msg[0] = 0;
	a.words = 4;
	a.n = 3; /* more rows than the tensor */
	lp_cuda_mask_logits(&cu, &a);
	CHECK_EQ_INT(cu.status, -EINVAL);
	cu.status = 0;
	cu.status_msg[0] = 0;
	a.n = 2;
	a.row_mask = NULL;
	lp_cuda_mask_logits(&cu, &a);
	CHECK_EQ_INT(cu.status, -EINVAL);
	cu.status = 0;
	cu.status_msg[0] = 0;
	a.n = 0; /* nothing to do: nothing read */
	lp_cuda_mask_logits(&cu, &a);
	CHECK_EQ_INT(cu.status, 0);
	CHECK_EQ_INT(bad_flags(), 0);
}

/* Through the backend's ops table in decode steps, as the engine calls it:
 * the step's logits, masks and mask rows in fixed buffers, uploaded after
 * begin_step; n the padded row count, n_masks and words fixed. The first
 * step of each bucket is captured, the later ones replay the graph with
 * other contents; every step gives the CPU op's rows. */
enum { G_VOCAB = 300, G_ROWS = 8, G_MASKS = 6, G_WORDS = (G_VOCAB + 31) / 32 };

static void test_graph_steps(void)
{
	const size_t lbytes = (size_t)G_ROWS * G_VOCAB * 4, mbytes = (size_t)G_MASKS * G_WORDS * 4;
	const size_t bytes = lbytes + mbytes + G_ROWS * 4;
	static const int ns[] = {3, 4, 3, 1, 3, 1, 4};
	struct lp_err err = {};
	struct lp_backend *be = NULL;
	struct lp_backend_limits lim;
	struct lp_buffer buf = {};
	struct lp_cuda_counters cnt;
	char *host = NULL;
	float *got = (float *)malloc(lbytes), *want = (float *)malloc(lbytes);
	size_t rb;
	bool ok = got && want;

	CHECK(ok);
	memset(&lim, 0, sizeof(lim));
	lim.n_layers = 1;
	lim.dim = 64;
	lim.n_heads = 4;
	lim.n_kv_heads = 2;
	lim.head_dim = 16;
	lim.ffn_dim = 96;
	lim.vocab = G_VOCAB;
	lim.max_tokens = G_ROWS;
	lim.max_seqs = G_ROWS;
	lim.max_out = G_ROWS;
	lim.block_size = 16;
	lim.max_blocks_per_seq = 4;
	lim.kv_type = LP_DTYPE_F16;
	lim.lora_type = LP_DTYPE_F16;
	lim.max_logprobs = 1;
	if (lp_backend_cuda_emu_new(&be, &err))
		be = NULL;
	ok = be && be->ops->reserve(be->ctx, &lim, &rb, &err) == 0 &&
	     lp_backend_alloc(be, bytes, &buf, &err) == 0 &&
	     be->ops->host_alloc(be->ctx, bytes, (void **)&host, &err) == 0;
	for (size_t k = 0; ok && k < sizeof(ns) / sizeof(ns[0]); k++) {
		struct mask_case c;
		struct lp_step_shape shape = {ns[k], ns[k], ns[k], true, false};
		char *dev = (char *)buf.data;

		if (!case_make(&c, G_VOCAB, G_ROWS, 0)) {
			TEST_FAIL("out of memory");
			ok = false;
			break;
		}
		c.rows = G_ROWS;
		c.n_masks = G_MASKS;
		int p = be->ops->begin_step(be->ctx, &shape);
		/* rows past the batch are padding: no mask */
		for (int r = 0; r < G_ROWS; r++)
			c.row_mask[r] = r >= ns[k] ? -1 : (int32_t)((r + k) % (G_MASKS + 1)) - 1;
		memcpy(host, c.logits, lbytes);
		memcpy(host + lbytes, c.mask, mbytes);
		memcpy(host + lbytes + mbytes, c.row_mask, G_ROWS * 4);
		lp_backend_upload(be, dev, host, bytes);
		struct lp_tensor t = {dev, LP_DTYPE_F32, p, G_VOCAB};
		struct lp_mask_args a = {&t,
		                         (const uint32_t *)(dev + lbytes),
		                         (const int32_t *)(dev + lbytes + mbytes),
		                         p,
		                         G_MASKS,
		                         G_WORDS};
		be->ops->mask_logits(be->ctx, &a);
		be->ops->end_step(be->ctx);
		lp_backend_download(be, got, dev, lbytes);
		c.n = p;
		ok = run_cpu(&c, want);
		if (ok && lp_backend_status(be, &err)) {
			TEST_FAIL("step %zu: %s", k, err.msg);
			ok = false;
		} else if (ok && memcmp(got, want, lbytes) != 0) {
			TEST_FAIL(
			    "step %zu (%d rows, padded to %d): the rows differ from the CPU's", k,
			    ns[k], p);
			ok = false;
		}
		case_free(&c);
	}
	if (!ok && err.msg[0])
		TEST_FAIL("%s", err.msg);
	memset(&cnt, 0, sizeof(cnt));
	if (be)
		lp_cuda_backend_counters(be, &cnt);
	if (host)
		be->ops->host_free(be->ctx, host);
	if (be)
		lp_backend_free(be, &buf);
	lp_backend_destroy(be);
	free(got);
	free(want);
	CHECK(ok);
	CHECK_MSG(cnt.capture_failures == 0 && cnt.mismatches == 0, "graphs: %s",
	          cnt.capture_error);
	CHECK_EQ_INT(cnt.captures, 2);       /* buckets 4 and 1 */
	CHECK_EQ_INT(cnt.graph_launches, 5); /* every step but the first of each */
}

int main(void)
{
	struct lp_err err;
	unsigned zero = 0;

	TEST_MAIN_BEGIN("test-mask");
	if (lp_cuda_init(&cu, 0, &err) != 0 || lp_backend_cpu_new(&cpu, 2, &err) != 0) {
		printf("FAIL test-mask:init: %s\n", err.msg);
		return 1;
	}
	if (cudaMalloc((void **)&cu.bad, sizeof(unsigned)) != cudaSuccess ||
	    cudaMemcpy(cu.bad, &zero, sizeof(zero), cudaMemcpyHostToDevice) != cudaSuccess) {
		printf("FAIL test-mask:init: cannot allocate the flag word\n");
		return 1;
	}
	RUN(test_matches_cpu);
	RUN(test_bad_mask_row);
	RUN(test_shape_errors);
	RUN(test_graph_steps);
	cudaFree(cu.bad);
	lp_cuda_release(&cu);
	lp_backend_destroy(cpu);
	TEST_MAIN_END();
}
