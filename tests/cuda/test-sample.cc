/* The CUDA sample op (sample.cu), run through the emulation layer (or a
 * real device), against the CPU backend's sample op (kernels/cpu/sample.c).
 *
 * Both compute a row's values, probabilities and fixed-point masses with
 * the same code (kernels/sample-math.h: IEEE division, an e^x written in
 * fused multiply-adds, integer sums), so the kept set and the draw are the
 * same bits whatever the order of the sums: the test asks for the same
 * token at every u, random ones included, not only at u away from a
 * boundary. (Were the two ever to differ by rounding, only a u within
 * about 1e-7 of a boundary of the cumulative masses could change the
 * token; the random u of this test would then fail with a probability of
 * that order per draw, and the draws at chosen u of test-cpu-sample would
 * still hold.) Greedy is compared exactly too.
 *
 * logprobs are log-softmax of the raw row, summed in float blocks on the
 * device and in double on the CPU: within 1e-5 absolute. Top-N ids are
 * compared exactly, their logprobs within 1e-5.
 *
 * Penalties: both sides penalise a logit with lp_sample_penalise
 * (sample-math.h, no contraction), so the penalised rows are the same bits
 * and the tokens are compared exactly, as above. The device penalises its
 * copy of the logits in place and keeps the raw logits it overwrites in
 * the workspace; the logprobs, of the raw row, are held to the same 1e-5,
 * and the tests check that rows do choose penalised tokens (whose logprob
 * needs the kept raw logit). Entries carry a logit bias too (OpenAI's
 * logit_bias, added before the penalties by the same function): some of
 * every slice, and rows with a bias alone. */
#include "kernels/cuda/ops.cuh"
#include "kernels/sample-math.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tests/test.h"

#define MAX_ROWS     64
#define MAX_LOGPROBS 20
#define BIG_VOCAB    151936

static struct lp_cuda cu;
static struct lp_backend *cpu;

static uint64_t rng_state = 0x5a3a1e0cafeULL;

static uint64_t rng_next(void)
{
	uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static double urand(void)
{
	return (double)(rng_next() >> 11) * 0x1.0p-53;
}

static float nrand(float s)
{
	double a = 0;

	for (int i = 0; i < 12; i++)
		a += urand();
	return (float)((a - 6.0) * s);
}

static float u01(void)
{
	float u = (float)urand();
	return u < 1.0f ? u : 0.0f;
}

struct result {
	int32_t tokens[MAX_ROWS];
	float logprob[MAX_ROWS];
	int32_t top_ids[MAX_ROWS * MAX_LOGPROBS];
	float top_lp[MAX_ROWS * MAX_LOGPROBS];
};

/* The device op on n rows of vocab logits, with n_pen penalty entries
 * (pen NULL: none passed). */
static bool run_cuda(const float *logits, int vocab, const struct lp_sample_row *rows, int n,
                     const struct lp_sample_penalty *pen, int n_pen, struct result *res)
{
	float *dl = NULL, *dlp = NULL, *dtl = NULL;
	int32_t *dtok = NULL, *dti = NULL;
	struct lp_sample_row *drows = NULL;
	struct lp_sample_penalty *dpen = NULL;
	struct lp_tensor t;
	struct lp_sample_args a;
	size_t lbytes = (size_t)n * vocab * sizeof(float);
	bool ok;

	ok = cudaMalloc((void **)&dl, lbytes) == cudaSuccess &&
	     cudaMalloc((void **)&drows, n * sizeof(*rows)) == cudaSuccess &&
	     cudaMalloc((void **)&dtok, n * 4) == cudaSuccess &&
	     cudaMalloc((void **)&dlp, n * 4) == cudaSuccess &&
	     cudaMalloc((void **)&dti, (size_t)n * MAX_LOGPROBS * 4) == cudaSuccess &&
	     cudaMalloc((void **)&dtl, (size_t)n * MAX_LOGPROBS * 4) == cudaSuccess &&
	     (!pen ||
	      (cudaMalloc((void **)&dpen, (n_pen ? n_pen : 1) * sizeof(*pen)) == cudaSuccess &&
	       cudaMemcpy(dpen, pen, n_pen * sizeof(*pen), cudaMemcpyHostToDevice) ==
	           cudaSuccess)) &&
	     cudaMemcpy(dl, logits, lbytes, cudaMemcpyHostToDevice) == cudaSuccess &&
	     cudaMemcpy(drows, rows, n * sizeof(*rows), cudaMemcpyHostToDevice) == cudaSuccess &&
	     cudaDeviceSynchronize() == cudaSuccess;
	if (ok) {
		t = lp_tensor{dl, LP_DTYPE_F32, n, vocab};
		memset(&a, 0, sizeof(a));
		a.logits = &t;
		a.rows = drows;
		a.n = n;
		a.max_logprobs = MAX_LOGPROBS;
		a.pen = dpen;
		a.tokens = dtok;
		a.logprob = dlp;
		a.top_ids = dti;
		a.top_logprobs = dtl;
		lp_cuda_sample(&cu, &a);
		ok = cudaStreamSynchronize(cu.stream) == cudaSuccess &&
		     cudaMemcpy(res->tokens, dtok, n * 4, cudaMemcpyDeviceToHost) == cudaSuccess &&
		     cudaMemcpy(res->logprob, dlp, n * 4, cudaMemcpyDeviceToHost) == cudaSuccess &&
		     cudaMemcpy(res->top_ids, dti, (size_t)n * MAX_LOGPROBS * 4,
		                cudaMemcpyDeviceToHost) == cudaSuccess &&
		     cudaMemcpy(res->top_lp, dtl, (size_t)n * MAX_LOGPROBS * 4,
		                cudaMemcpyDeviceToHost) == cudaSuccess;
	}
	cudaFree(dl);
	cudaFree(drows);
	cudaFree(dpen);
	cudaFree(dtok);
	cudaFree(dlp);
	cudaFree(dti);
	cudaFree(dtl);
	return ok;
}

static bool run_cpu(const float *logits, int vocab, const struct lp_sample_row *rows, int n,
                    const struct lp_sample_penalty *pen, struct result *res)
{
	struct lp_tensor t = {(void *)logits, LP_DTYPE_F32, n, vocab};
	struct lp_sample_args a;
	struct lp_err err;

	memset(&a, 0, sizeof(a));
	a.logits = &t;
	a.rows = rows;
	a.n = n;
	a.max_logprobs = MAX_LOGPROBS;
	a.pen = pen;
	a.tokens = res->tokens;
	a.logprob = res->logprob;
	a.top_ids = res->top_ids;
	a.top_logprobs = res->top_lp;
	cpu->ops->sample(cpu->ctx, &a);
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

static bool same_float(float a, float b, double tol)
{
	if (isinf(a) || isinf(b))
		return a == b;
	return fabs((double)a - b) <= tol;
}

/* Both ops on the same rows (and entries): tokens and top ids the same,
 * logprobs within 1e-5. The device's tokens go to *tokens when given. */
static int compare_pen(const char *what, const float *logits, int vocab,
                       const struct lp_sample_row *rows, int n, const struct lp_sample_penalty *pen,
                       int n_pen, int32_t *tokens)
{
	struct result *g = (struct result *)calloc(1, sizeof(*g));
	struct result *w = (struct result *)calloc(1, sizeof(*w));
	int ok = 0;

	if (!run_cuda(logits, vocab, rows, n, pen, n_pen, g) ||
	    !run_cpu(logits, vocab, rows, n, pen, w)) {
		TEST_FAIL("%s: a run failed", what);
		goto out;
	}
	if (cu.status || bad_flags()) {
		TEST_FAIL("%s: device status %d (%s)", what, cu.status, cu.status_msg);
		goto out;
	}
	for (int r = 0; r < n; r++) {
		const struct lp_sample_row *p = &rows[r];

		if (g->tokens[r] != w->tokens[r]) {
			TEST_FAIL(
			    "%s row %d (t %g, k %d, p %g, min_p %g, u %.9g): token %d, cpu %d",
			    what, r, (double)p->temperature, p->top_k, (double)p->top_p,
			    (double)p->min_p, (double)p->u, g->tokens[r], w->tokens[r]);
			goto out;
		}
		if (!same_float(g->logprob[r], w->logprob[r], 1e-5)) {
			TEST_FAIL("%s row %d: logprob %.9g, cpu %.9g", what, r,
			          (double)g->logprob[r], (double)w->logprob[r]);
			goto out;
		}
		for (int j = 0; j < MAX_LOGPROBS; j++) {
			int at = r * MAX_LOGPROBS + j;

			if (g->top_ids[at] != w->top_ids[at] ||
			    !same_float(g->top_lp[at], w->top_lp[at], 1e-5)) {
				TEST_FAIL("%s row %d top %d: %d (%g), cpu %d (%g)", what, r, j,
				          g->top_ids[at], (double)g->top_lp[at], w->top_ids[at],
				          (double)w->top_lp[at]);
				goto out;
			}
		}
	}
	if (tokens)
		memcpy(tokens, g->tokens, (size_t)n * sizeof(int32_t));
	ok = 1;
out:
	free(g);
	free(w);
	return ok;
}

static int compare(const char *what, const float *logits, int vocab,
                   const struct lp_sample_row *rows, int n)
{
	return compare_pen(what, logits, vocab, rows, n, NULL, 0, NULL);
}

/* n rows of random logits (spread s), each its own. */
static float *random_rows(int n, int vocab, float s)
{
	float *l = (float *)malloc((size_t)n * vocab * sizeof(float));

	for (size_t i = 0; i < (size_t)n * vocab; i++)
		l[i] = nrand(s);
	return l;
}

static struct lp_sample_row row_of(float t, float top_p, float min_p, int top_k, float u, int n)
{
	struct lp_sample_row r;

	r.temperature = t;
	r.top_p = top_p;
	r.min_p = min_p;
	r.top_k = top_k;
	r.u = u;
	r.n_logprobs = n;
	r.repetition_penalty = 1.0f;
	r.frequency_penalty = 0.0f;
	r.presence_penalty = 0.0f;
	r.pen_off = 0;
	r.pen_n = 0;
	return r;
}

/* The parameter sets every vocabulary runs with. */
static const struct {
	float t, top_p, min_p;
	int top_k;
} g_params[] = {
    {0.0f, 1.0f, 0.0f, 0},    /* greedy */
    {1.0f, 1.0f, 0.0f, 0},    /* temperature alone */
    {0.6f, 1.0f, 0.0f, 0},    /* */
    {1.0f, 1.0f, 0.0f, 40},   /* top-k */
    {1.0f, 1.0f, 0.0f, 1},    /* */
    {1.0f, 0.9f, 0.0f, 0},    /* top-p */
    {1.0f, 0.3f, 0.0f, 0},    /* */
    {1.0f, 1.0f, 0.05f, 0},   /* min-p */
    {1.3f, 0.8f, 0.02f, 50},  /* all of them */
    {0.7f, 0.95f, 0.0f, 300}, /* top-k and top-p */
    {2.0f, 1.0f, 0.1f, 1000}, /* top-k and min-p */
    {1.0f, 0.5f, 0.3f, 0},    /* top-p and min-p */
};
#define N_PARAMS (int)(sizeof(g_params) / sizeof(g_params[0]))

static void run_vocab(int vocab, int n_rows, float spread)
{
	float *l = random_rows(n_rows, vocab, spread);
	struct lp_sample_row rows[MAX_ROWS];
	char what[96];

	for (int r = 0; r < n_rows; r++) {
		int p = r % N_PARAMS;
		rows[r] = row_of(g_params[p].t, g_params[p].top_p, g_params[p].min_p,
		                 g_params[p].top_k, u01(), r % (MAX_LOGPROBS + 1));
	}
	snprintf(what, sizeof(what), "vocab %d", vocab);
	compare(what, l, vocab, rows, n_rows);
	free(l);
}

static void test_vocab_1000(void)
{
	for (int round = 0; round < 4 && !test_current_failed; round++)
		run_vocab(1000, MAX_ROWS, 2.0f + round);
}

static void test_vocab_49152(void)
{
	run_vocab(49152, 2 * N_PARAMS, 3.0f);
}

static void test_vocab_151936(void)
{
	run_vocab(BIG_VOCAB, N_PARAMS, 3.0f);
}

/* Many u on one row and one parameter set each: the whole interval of u
 * maps to the same tokens. */
static void test_many_u(void)
{
	const int vocab = 3000;
	float *one = random_rows(1, vocab, 2.5f);
	float *l = (float *)malloc((size_t)MAX_ROWS * vocab * sizeof(float));
	struct lp_sample_row rows[MAX_ROWS];

	for (int r = 0; r < MAX_ROWS; r++)
		memcpy(l + (size_t)r * vocab, one, vocab * sizeof(float));
	for (int p = 1; p < N_PARAMS && !test_current_failed; p++) {
		char what[96];

		for (int r = 0; r < MAX_ROWS; r++)
			rows[r] = row_of(g_params[p].t, g_params[p].top_p, g_params[p].min_p,
			                 g_params[p].top_k,
			                 r == 0   ? 0.0f
			                 : r == 1 ? 0.99999994f
			                          : u01(),
			                 0);
		snprintf(what, sizeof(what), "params %d", p);
		compare(what, l, vocab, rows, MAX_ROWS);
	}
	free(one);
	free(l);
}

/* Rows of -inf and NaN, ties, +inf, a flat row, values that overflow at a
 * small temperature, -0 against +0. */
static void test_special_rows(void)
{
	const int vocab = 5000, n = 10;
	float *l = random_rows(n, vocab, 3.0f);
	struct lp_sample_row rows[MAX_ROWS];

	for (int i = 0; i < vocab; i += 7)
		l[vocab + i] = NAN;
	for (int i = 3; i < vocab; i += 11)
		l[vocab + i] = -INFINITY;
	l[vocab + 14] = 50.0f;
	l[2 * vocab + vocab - 5] = 40.0f;
	l[2 * vocab + vocab / 2] = 40.0f;
	for (int i = 0; i < vocab; i++) {
		l[3 * vocab + i] = -INFINITY;
		l[4 * vocab + i] = NAN;
		l[6 * vocab + i] = 0.25f;
		l[8 * vocab + i] = -fabsf(l[8 * vocab + i]) - 1.0f;
		l[9 * vocab + i] = (float)(i % 3); /* three values, many ties */
	}
	l[5 * vocab + vocab - 1] = INFINITY;
	l[5 * vocab + 17] = INFINITY;
	l[7 * vocab + 30] = 3e38f;
	l[7 * vocab + 10] = 2e38f;
	l[8 * vocab + 40] = 0.0f;
	l[8 * vocab + 20] = -0.0f;
	for (int p = 0; p < N_PARAMS && !test_current_failed; p++) {
		char what[96];

		for (int r = 0; r < n; r++)
			rows[r] = row_of(g_params[p].t, g_params[p].top_p, g_params[p].min_p,
			                 g_params[p].top_k, u01(), MAX_LOGPROBS - r);
		snprintf(what, sizeof(what), "special rows, params %d", p);
		compare(what, l, vocab, rows, n);
		/* the same at a temperature that overflows row 7 */
		for (int r = 0; r < n; r++)
			rows[r].temperature = rows[r].temperature > 0 ? 0.01f : 0.0f;
		snprintf(what, sizeof(what), "special rows at t 0.01, params %d", p);
		compare(what, l, vocab, rows, n);
	}
	free(l);
}

/* A flat row of the big vocabulary: one value, every cut falls among ties
 * (the id scan of the selection). */
static void test_flat_big(void)
{
	float *l = (float *)malloc((size_t)3 * BIG_VOCAB * sizeof(float));
	struct lp_sample_row rows[3] = {row_of(1.0f, 0.37f, 0.0f, 0, 0.61f, 5),
	                                row_of(1.0f, 1.0f, 0.0f, 777, 0.3f, 0),
	                                row_of(1.0f, 1.0f, 0.0f, 0, 0.999f, MAX_LOGPROBS)};

	for (size_t i = 0; i < (size_t)3 * BIG_VOCAB; i++)
		l[i] = 1.5f;
	compare("flat", l, BIG_VOCAB, rows, 3);
	free(l);
}

/* Rows with parameters out of range: token 0, LP_CUDA_BAD_SAMPLE; the
 * other rows are sampled as usual. */
static void test_bad_rows(void)
{
	const int vocab = 100;
	float *l = random_rows(8, vocab, 1.0f);
	struct lp_sample_row rows[8] = {
	    row_of(0.0f, 1.0f, 0.0f, 0, 0.5f, 0), row_of(-1.0f, 1.0f, 0.0f, 0, 0.5f, 0),
	    row_of(1.0f, 0.0f, 0.0f, 0, 0.5f, 0), row_of(1.0f, 1.0f, 1.5f, 0, 0.5f, 0),
	    row_of(1.0f, 1.0f, 0.0f, 0, 1.0f, 0), row_of(1.0f, 1.0f, 0.0f, 0, 0.5f, 21),
	    row_of(NAN, 1.0f, 0.0f, 0, 0.5f, 0),  row_of(0.0f, 1.0f, 0.0f, 0, 0.5f, 3),
	};
	struct result *g = (struct result *)calloc(1, sizeof(*g));
	int32_t best0 = 0, best7 = 0;

	for (int i = 1; i < vocab; i++) {
		best0 = l[i] > l[best0] ? i : best0;
		best7 = l[7 * vocab + i] > l[7 * vocab + best7] ? i : best7;
	}
	CHECK(run_cuda(l, vocab, rows, 8, NULL, 0, g));
	CHECK_EQ_INT(bad_flags(), LP_CUDA_BAD_SAMPLE);
	CHECK_EQ_INT(cu.status, 0);
	CHECK_EQ_INT(g->tokens[0], best0);
	CHECK_EQ_INT(g->tokens[7], best7);
	for (int r = 1; r < 7; r++)
		CHECK_MSG(g->tokens[r] == 0, "bad row %d: token %d", r, g->tokens[r]);
	free(g);
	free(l);
}

/* ---- penalties ---- */

/* The penalty sets rows cycle through: off, on their own, together,
 * negative ones that favour the seen tokens (so that penalised tokens are
 * chosen, and their logprob needs the raw logit the device kept), the
 * ends of the allowed ranges. */
static const struct {
	float rep, freq, pres;
} g_pens[] = {
    {1.3f, 0.0f, 0.0f}, {0.7f, 0.0f, 0.0f},   {1.0f, 0.6f, 0.0f}, {1.0f, 0.0f, -1.5f},
    {1.2f, 0.4f, 0.3f}, {1.0f, -0.7f, -1.0f}, {2.0f, 2.0f, 2.0f}, {0.5f, -2.0f, -2.0f},
    {1.0f, 0.0f, 0.0f}, {0.9f, -0.3f, 0.5f},
};
#define N_PENS (int)(sizeof(g_pens) / sizeof(g_pens[0]))

static struct lp_sample_row with_pen(struct lp_sample_row r, int set, int off, int n)
{
	r.repetition_penalty = g_pens[set].rep;
	r.frequency_penalty = g_pens[set].freq;
	r.presence_penalty = g_pens[set].pres;
	r.pen_off = off;
	r.pen_n = n;
	return r;
}

/* A logit bias for an entry: mostly none, else small or large, either
 * way, now and then +-100 (logit_bias's ends). */
static float random_bias(void)
{
	switch (rng_next() % 8) {
	case 4:
		return (float)(20.0 * urand() - 10.0);
	case 5:
		return (float)(4.0 * urand() - 2.0);
	case 6:
		return rng_next() % 4 ? -100.0f : 100.0f;
	case 7:
		return 5.5f;
	default:
		return 0.0f;
	}
}

/* n entries of distinct tokens of a row of vocab logits l: about half of
 * them among its best tokens (l above hi), the rest anywhere; counts 0 .. 3
 * and in_prompt at random (both 0 now and then: an entry that changes
 * nothing), and a bias on about half of them (random_bias). */
static void make_entries(struct lp_sample_penalty *e, int n, const float *l, int vocab, float hi)
{
	char *used = (char *)calloc((size_t)vocab, 1);
	int k = 0;

	for (int i = 0; i < vocab && k < n / 2; i++)
		if (l[i] > hi && rng_next() % 2) {
			used[i] = 1;
			e[k++].token = i;
		}
	while (k < n) {
		int t = (int)(rng_next() % (uint64_t)vocab);

		if (used[t])
			continue;
		used[t] = 1;
		e[k++].token = t;
	}
	/* shuffled: the order of a slice is no order of the tokens */
	for (int i = n - 1; i > 0; i--) {
		int j = (int)(rng_next() % (uint64_t)(i + 1));
		int32_t t = e[i].token;

		e[i].token = e[j].token;
		e[j].token = t;
	}
	for (int i = 0; i < n; i++) {
		e[i].count = (int32_t)(rng_next() % 4);
		e[i].in_prompt = (int32_t)(rng_next() % 2);
		e[i].bias = random_bias();
	}
	free(used);
}

/* How many of rows' tokens have an entry. */
static int touched_tokens(const struct lp_sample_row *rows, int n, const int32_t *tokens,
                          const struct lp_sample_penalty *pen)
{
	int touched = 0;

	for (int r = 0; r < n; r++)
		for (int j = 0; j < rows[r].pen_n; j++)
			if (pen[rows[r].pen_off + j].token == tokens[r]) {
				touched++;
				break;
			}
	return touched;
}

/* Rows of every parameter set, each with its own slice of one pen array:
 * slices of 0, 1, a few, fewer and more than the block's threads, and
 * (vocabulary 1000) every token. */
static void run_penalties(int vocab, int n_rows, float spread, int *touched)
{
	static const int sizes[] = {0, 1, 7, 100, 511, 512, 513, 1500, 1000};
	float *l = random_rows(n_rows, vocab, spread);
	struct lp_sample_row rows[MAX_ROWS];
	struct lp_sample_penalty *pen;
	int32_t tokens[MAX_ROWS];
	int n_pen = 0;
	char what[96];

	for (int r = 0; r < n_rows; r++)
		n_pen += sizes[r % 9] < vocab ? sizes[r % 9] : vocab;
	pen = (struct lp_sample_penalty *)calloc((size_t)n_pen + 1, sizeof(*pen));
	n_pen = 0;
	for (int r = 0; r < n_rows; r++) {
		int p = r % N_PARAMS, k = sizes[r % 9] < vocab ? sizes[r % 9] : vocab;

		rows[r] = with_pen(row_of(g_params[p].t, g_params[p].top_p, g_params[p].min_p,
		                          g_params[p].top_k, u01(), r % (MAX_LOGPROBS + 1)),
		                   r % N_PENS, n_pen, k);
		make_entries(pen + n_pen, k, l + (size_t)r * vocab, vocab, 2.0f * spread);
		n_pen += k;
	}
	snprintf(what, sizeof(what), "penalties, vocab %d", vocab);
	if (compare_pen(what, l, vocab, rows, n_rows, pen, n_pen, tokens))
		*touched += touched_tokens(rows, n_rows, tokens, pen);
	free(pen);
	free(l);
}

static void test_penalties(void)
{
	int touched = 0;

	for (int round = 0; round < 3 && !test_current_failed; round++)
		run_penalties(1000, MAX_ROWS, 2.0f + round, &touched);
	if (!test_current_failed)
		run_penalties(49152, 2 * N_PARAMS, 3.0f, &touched);
	if (!test_current_failed)
		run_penalties(BIG_VOCAB, N_PARAMS, 3.0f, &touched);
	CHECK_MSG(touched >= 10, "only %d rows chose a penalised token", touched);
}

/* One row and one slice shared by every row (rows may share entries), many
 * u per parameter set and penalty set. */
static void test_penalties_many_u(void)
{
	const int vocab = 3000, k = 600;
	float *one = random_rows(1, vocab, 2.5f);
	float *l = (float *)malloc((size_t)MAX_ROWS * vocab * sizeof(float));
	struct lp_sample_penalty pen[600];
	struct lp_sample_row rows[MAX_ROWS];
	int32_t tokens[MAX_ROWS];
	int touched = 0;

	make_entries(pen, k, one, vocab, 5.0f);
	for (int r = 0; r < MAX_ROWS; r++)
		memcpy(l + (size_t)r * vocab, one, vocab * sizeof(float));
	for (int p = 1; p < N_PARAMS && !test_current_failed; p++) {
		char what[96];

		for (int r = 0; r < MAX_ROWS; r++)
			rows[r] = with_pen(row_of(g_params[p].t, g_params[p].top_p,
			                          g_params[p].min_p, g_params[p].top_k,
			                          r == 0   ? 0.0f
			                          : r == 1 ? 0.99999994f
			                                   : u01(),
			                          1),
			                   p % N_PENS, 0, k);
		snprintf(what, sizeof(what), "penalties %d, params %d", p % N_PENS, p);
		if (compare_pen(what, l, vocab, rows, MAX_ROWS, pen, k, tokens))
			touched += touched_tokens(rows, MAX_ROWS, tokens, pen);
	}
	CHECK_MSG(touched >= 10, "only %d rows chose a penalised token", touched);
	free(one);
	free(l);
}

/* Entries on NaN, -inf, +inf, huge, -0 and +0 logits and on ties; a row
 * whose every token has an entry. */
static void test_penalties_special(void)
{
	const int vocab = 2000, n = 8;
	float *l = random_rows(n, vocab, 3.0f);
	static const int32_t spots[] = {3, 7, 10, 14, 17, 20, 21, 30, 40, 1000, 1995, 1999};
	const int n_spots = (int)(sizeof(spots) / sizeof(spots[0]));
	struct lp_sample_penalty *pen =
	    (struct lp_sample_penalty *)calloc((size_t)(n - 1) * n_spots + vocab, sizeof(*pen));
	struct lp_sample_row rows[MAX_ROWS];
	int n_pen = 0;

	for (int i = 0; i < vocab; i += 7)
		l[i] = NAN; /* 7, 14, 21 ... */
	for (int i = 3; i < vocab; i += 11)
		l[i] = -INFINITY;
	l[10] = 50.0f;
	l[vocab + 1995] = 40.0f; /* a tie for the best, both with entries */
	l[vocab + 1000] = 40.0f;
	for (int i = 0; i < vocab; i++) {
		l[2 * vocab + i] = -INFINITY;
		l[5 * vocab + i] = -fabsf(l[5 * vocab + i]) - 1.0f;
		l[6 * vocab + i] = (float)(i % 3);
	}
	l[2 * vocab + 17] = 1.0f; /* the only finite one */
	l[3 * vocab + 1999] = INFINITY;
	l[3 * vocab + 17] = INFINITY;
	l[4 * vocab + 30] = 3e38f;
	l[4 * vocab + 10] = 2e38f;
	l[4 * vocab + 40] = -3e38f;
	l[5 * vocab + 40] = 0.0f;
	l[5 * vocab + 20] = -0.0f;
	/* biases of 0, +-2.5 and +-100 on the special spots too */
	for (int r = 0; r < n - 1; r++)
		for (int j = 0; j < n_spots; j++)
			pen[n_pen++] = lp_sample_penalty{spots[j], (j + r) % 3, (j + r) % 2,
			                                 (j + r) % 5 == 0   ? 0.0f
			                                 : (j + r) % 5 == 1 ? 2.5f
			                                 : (j + r) % 5 == 2 ? -2.5f
			                                 : (j + r) % 5 == 3 ? 100.0f
			                                                    : -100.0f};
	for (int i = 0; i < vocab; i++) /* row 7: every token */
		pen[n_pen++] = lp_sample_penalty{(i * 7919) % vocab, i % 3, i % 2, random_bias()};
	for (int p = 0; p < N_PARAMS && !test_current_failed; p++) {
		for (int set = 0; set < N_PENS && !test_current_failed; set += 3) {
			char what[96];

			for (int r = 0; r < n; r++)
				rows[r] = with_pen(
				    row_of(g_params[p].t, g_params[p].top_p, g_params[p].min_p,
				           g_params[p].top_k, u01(), MAX_LOGPROBS - r),
				    (set + r) % N_PENS, r * n_spots, r < n - 1 ? n_spots : vocab);
			snprintf(what, sizeof(what), "special rows, params %d, penalties %d", p,
			         set);
			compare_pen(what, l, vocab, rows, n, pen, n_pen, NULL);
			for (int r = 0; r < n; r++)
				rows[r].temperature = rows[r].temperature > 0 ? 0.01f : 0.0f;
			snprintf(what, sizeof(what),
			         "special rows at t 0.01, params %d, penalties %d", p, set);
			compare_pen(what, l, vocab, rows, n, pen, n_pen, NULL);
		}
	}
	free(pen);
	free(l);
}

/* lp_sample_penalise rounds each operation on its own: here, built as the
 * emulation is (g++ -ffp-contract=fast -mfma), it matches a reference whose
 * every intermediate is stored through a volatile (which no compiler
 * fuses), as the CPU op's C build computes it without contraction. */
static void test_penalise_rounding(void)
{
	int differ_fused = 0;

	for (int i = 0; i < 200000; i++) {
		struct lp_sample_row r = row_of(1.0f, 1.0f, 0.0f, 0, 0.0f, 0);
		struct lp_sample_penalty e = {0, (int32_t)(rng_next() % 1000), (int32_t)(i & 1),
		                              i % 3 ? (float)(200.0 * urand() - 100.0) : 0.0f};
		float x = nrand(10.0f), got, want;
		volatile float v, prod, sum;
		uint32_t a, b;

		r.repetition_penalty = (float)(0.05 + 3.0 * urand());
		r.frequency_penalty = (float)(4.0 * urand() - 2.0);
		r.presence_penalty = (float)(4.0 * urand() - 2.0);
		got = lp_sample_penalise(x, &r, &e);
		v = x;
		if (e.bias != 0.0f)
			v = v + e.bias;
		if (e.count > 0 || e.in_prompt)
			v = v > 0.0f ? v / r.repetition_penalty : v * r.repetition_penalty;
		if (e.count > 0) {
			prod = (float)e.count * r.frequency_penalty;
			sum = prod + r.presence_penalty;
			v = v - sum;
			differ_fused +=
			    fmaf((float)e.count, r.frequency_penalty, r.presence_penalty) != sum;
		}
		want = v;
		memcpy(&a, &got, 4);
		memcpy(&b, &want, 4);
		CHECK_MSG(a == b,
		          "x %.9g bias %.9g count %d rep %.9g freq %.9g pres %.9g: %.9g, want %.9g",
		          (double)x, (double)e.bias, e.count, (double)r.repetition_penalty,
		          (double)r.frequency_penalty, (double)r.presence_penalty, (double)got,
		          (double)want);
	}
	/* the inputs do tell a fused multiply-add apart */
	CHECK_MSG(differ_fused > 1000, "only %d inputs where fusing changes the sum", differ_fused);
}

/* Rows without entries read neither pen nor their penalty fields: pen
 * NULL, and garbage penalties that would be refused with entries. */
static void test_penalties_none(void)
{
	const int vocab = 1000, n = 12;
	float *l = random_rows(n, vocab, 2.0f);
	struct lp_sample_row rows[MAX_ROWS];
	struct lp_sample_penalty one = {5, 1, 1, 0.0f};

	for (int r = 0; r < n; r++) {
		int p = r % N_PARAMS;

		rows[r] = row_of(g_params[p].t, g_params[p].top_p, g_params[p].min_p,
		                 g_params[p].top_k, u01(), r);
		rows[r].repetition_penalty = r % 2 ? 0.0f : NAN;
		rows[r].frequency_penalty = 7.0f;
		rows[r].pen_off = -3;
	}
	compare_pen("pen NULL", l, vocab, rows, n, NULL, 0, NULL);
	compare_pen("pen given, no row uses it", l, vocab, rows, n, &one, 1, NULL);
	free(l);
}

/* Rows whose only entries are a logit bias (penalties off), at every
 * parameter set: the device's tokens are the CPU's; a +100 bias on a poor
 * token forces it at any u, and -100 on the best one bans it. */
static void test_logit_bias(void)
{
	const int vocab = 49152, k = 40;
	float *one = random_rows(1, vocab, 3.0f);
	float *l = (float *)malloc((size_t)MAX_ROWS * vocab * sizeof(float));
	struct lp_sample_penalty pen[40];
	struct lp_sample_row rows[MAX_ROWS];
	int32_t tokens[MAX_ROWS], best = 0;
	int touched = 0;

	for (int i = 1; i < vocab; i++)
		best = one[i] > one[best] ? i : best;
	for (int r = 0; r < MAX_ROWS; r++)
		memcpy(l + (size_t)r * vocab, one, vocab * sizeof(float));
	make_entries(pen, k, one, vocab, 6.0f);
	for (int j = 0; j < k; j++) /* no penalty, a bias on each */
		pen[j].bias = j % 2 ? (float)(16.0 * urand() - 8.0) : 4.0f + (float)j / 8;
	for (int p = 0; p < N_PARAMS && !test_current_failed; p++) {
		char what[96];

		for (int r = 0; r < MAX_ROWS; r++)
			rows[r] = with_pen(row_of(g_params[p].t, g_params[p].top_p,
			                          g_params[p].min_p, g_params[p].top_k, u01(), 2),
			                   8, 0, k); /* set 8: every penalty off */
		snprintf(what, sizeof(what), "logit bias, params %d", p);
		if (compare_pen(what, l, vocab, rows, MAX_ROWS, pen, k, tokens))
			touched += touched_tokens(rows, MAX_ROWS, tokens, pen);
	}
	CHECK_MSG(touched >= 10, "only %d rows chose a biased token", touched);

	/* forced and banned */
	pen[0] = lp_sample_penalty{(best + 777) % vocab, 0, 0, 100.0f};
	pen[1] = lp_sample_penalty{best, 0, 0, -100.0f};
	for (int r = 0; r < MAX_ROWS; r++)
		rows[r] =
		    with_pen(row_of(1.0f, 1.0f, 0.0f, 0, (float)r / MAX_ROWS, 1), 8, r % 2, 1);
	CHECK(compare_pen("forced and banned", l, vocab, rows, MAX_ROWS, pen, 2, tokens));
	for (int r = 0; r < MAX_ROWS; r++) {
		if (r % 2 == 0)
			CHECK_MSG(tokens[r] == pen[0].token, "u %g: %d, not the forced %d",
			          (double)rows[r].u, tokens[r], pen[0].token);
		else
			CHECK_MSG(tokens[r] != best, "u %g: the banned %d", (double)rows[r].u,
			          best);
	}
	free(one);
	free(l);
}

/* Rows whose penalties or entries are out of range: token 0, logprob
 * -inf, LP_CUDA_BAD_SAMPLE; the other rows are sampled as usual. */
static void test_penalties_bad(void)
{
	const int vocab = 100, n = 16;
	float *l = random_rows(n, vocab, 1.0f);
	struct lp_sample_penalty pen[2 * 100 + 8];
	struct lp_sample_row rows[MAX_ROWS];
	struct result *g = (struct result *)calloc(1, sizeof(*g));
	struct result *w = (struct result *)calloc(1, sizeof(*w));
	static const bool good[n] = {true,  false, false, false, false, false, false, false,
	                             false, false, false, false, false, true,  false, false};

	for (int i = 0; i < 2 * vocab + 8; i++)
		pen[i] = lp_sample_penalty{i % vocab, 1, 0, 0.0f};
	pen[0] = lp_sample_penalty{7, 2, 1, 0.0f};
	pen[1] = lp_sample_penalty{-1, 1, 0, 0.0f};                /* token below the vocabulary */
	pen[2] = lp_sample_penalty{vocab, 1, 0, 0.0f};             /* token past it */
	pen[3] = lp_sample_penalty{9, -1, 0, 0.0f};                /* negative count */
	pen[2 * vocab + 6] = lp_sample_penalty{9, 0, 0, NAN};      /* a bias not finite */
	pen[2 * vocab + 7] = lp_sample_penalty{9, 0, 0, INFINITY}; /* likewise */
	for (int r = 0; r < n; r++)
		rows[r] = with_pen(row_of(0.0f, 1.0f, 0.0f, 0, 0.5f, 2), 0, 0, 1);
	rows[1].pen_off = 1;
	rows[2].pen_off = 2;
	rows[3].pen_off = 3;
	rows[4] = with_pen(rows[4], 0, 8, vocab + 1); /* more entries than tokens */
	rows[5].pen_n = -1;
	rows[6].pen_off = -1;
	rows[7].repetition_penalty = 0.0f;
	rows[8].repetition_penalty = INFINITY;
	rows[9].repetition_penalty = NAN;
	rows[10].frequency_penalty = 2.5f;
	rows[11].presence_penalty = -2.01f;
	rows[12].frequency_penalty = NAN;
	rows[13] = with_pen(rows[13], 4, 4, 100); /* entries 4 .. 103: fine */
	rows[14].pen_off = 2 * vocab + 6;
	rows[15].pen_off = 2 * vocab + 7;
	CHECK(run_cuda(l, vocab, rows, n, pen, 2 * vocab + 8, g));
	CHECK_EQ_INT(bad_flags(), LP_CUDA_BAD_SAMPLE);
	CHECK_EQ_INT(cu.status, 0);
	for (int r = 0; r < n; r++)
		if (!good[r])
			CHECK_MSG(g->tokens[r] == 0 && g->logprob[r] == -INFINITY,
			          "bad row %d: token %d, logprob %g", r, g->tokens[r],
			          (double)g->logprob[r]);
	/* the good rows as the CPU samples them alone */
	for (int r = 0; r < n; r++) {
		if (!good[r])
			continue;
		CHECK(run_cpu(l + (size_t)r * vocab, vocab, &rows[r], 1, pen, w));
		CHECK_EQ_INT(g->tokens[r], w->tokens[0]);
		CHECK_NEAR(g->logprob[r], w->logprob[0], 1e-5);
	}
	/* entries without a pen array */
	CHECK(run_cuda(l, vocab, rows, 1, NULL, 0, g));
	CHECK_EQ_INT(bad_flags(), LP_CUDA_BAD_SAMPLE);
	CHECK_EQ_INT(g->tokens[0], 0);
	free(g);
	free(w);
	free(l);
}

/* Shapes the op refuses go to the sticky status. */
static void test_shape_errors(void)
{
	struct lp_tensor t = {NULL, LP_DTYPE_F16, 1, 10};
	struct lp_sample_args a;

	memset(&a, 0, sizeof(a));
	a.logits = &t;
	a.n = 1;
	a.rows = (const struct lp_sample_row *)cu.bad; /* never read */
	a.tokens = (int32_t *)cu.bad;
	lp_cuda_sample(&cu, &a);
	CHECK_EQ_INT(cu.status, -EINVAL);
	CHECK_MSG(strstr(cu.status_msg, "sample"), "status names the op: %s", cu.status_msg);
	cu.status = 0;
	cu.status_msg[0] = 0;
	t.type = LP_DTYPE_F32;
	a.max_logprobs = 1 << 20;
	lp_cuda_sample(&cu, &a);
	CHECK_EQ_INT(cu.status, -EINVAL);
	cu.status = 0;
	cu.status_msg[0] = 0;
	/* entries, and no workspace for the raw logits they overwrite */
	{
		void *ws = cu.ws[LP_CUDA_WS_SAMPLE];

		a.max_logprobs = 0;
		a.pen = (const struct lp_sample_penalty *)cu.bad; /* never read */
		cu.ws[LP_CUDA_WS_SAMPLE] = NULL;
		lp_cuda_sample(&cu, &a);
		cu.ws[LP_CUDA_WS_SAMPLE] = ws;
		CHECK_EQ_INT(cu.status, -EINVAL);
		cu.status = 0;
		cu.status_msg[0] = 0;
		/* the workspace: one float per entry a call may carry */
		struct lp_backend_limits lim;
		memset(&lim, 0, sizeof(lim));
		CHECK(lp_cuda_sample_workspace(&lim) == 0);
		lim.max_penalties = 1000;
		CHECK(lp_cuda_sample_workspace(&lim) == 1000 * sizeof(float));
	}
}

int main(void)
{
	struct lp_err err;
	struct lp_backend_limits lim;
	size_t bytes;
	unsigned zero = 0;

	TEST_MAIN_BEGIN("test-sample");
	if (lp_cuda_init(&cu, 0, &err) != 0) {
		printf("FAIL test-sample:init: %s\n", err.msg);
		return 1;
	}
	memset(&lim, 0, sizeof(lim));
	lim.vocab = BIG_VOCAB;
	lim.max_out = MAX_ROWS;
	lim.max_logprobs = MAX_LOGPROBS;
	lim.max_penalties = 1 << 18; /* as the engine sets it */
	if (lp_backend_cpu_new(&cpu, 2, &err) != 0 ||
	    cpu->ops->reserve(cpu->ctx, &lim, &bytes, &err) != 0) {
		printf("FAIL test-sample:init: %s\n", err.msg);
		return 1;
	}
	if (cudaMalloc((void **)&cu.bad, sizeof(unsigned)) != cudaSuccess ||
	    cudaMemcpy(cu.bad, &zero, sizeof(zero), cudaMemcpyHostToDevice) != cudaSuccess) {
		printf("FAIL test-sample:init: cannot allocate the flag word\n");
		return 1;
	}
	/* what reserve() does in backend-cuda.cu */
	cu.lim = lim;
	cu.ws_bytes[LP_CUDA_WS_SAMPLE] = lp_cuda_sample_workspace(&lim);
	if (cudaMalloc(&cu.ws[LP_CUDA_WS_SAMPLE], cu.ws_bytes[LP_CUDA_WS_SAMPLE]) != cudaSuccess) {
		printf("FAIL test-sample:init: cannot allocate the workspace\n");
		return 1;
	}
	RUN(test_vocab_1000);
	RUN(test_many_u);
	RUN(test_special_rows);
	RUN(test_vocab_49152);
	RUN(test_vocab_151936);
	RUN(test_flat_big);
	RUN(test_bad_rows);
	RUN(test_penalise_rounding);
	RUN(test_penalties);
	RUN(test_penalties_many_u);
	RUN(test_penalties_special);
	RUN(test_penalties_none);
	RUN(test_penalties_bad);
	RUN(test_logit_bias);
	RUN(test_shape_errors);
	cudaFree(cu.ws[LP_CUDA_WS_SAMPLE]);
	cu.ws[LP_CUDA_WS_SAMPLE] = NULL;
	cudaFree(cu.bad);
	lp_cuda_release(&cu);
	lp_backend_destroy(cpu);
	TEST_MAIN_END();
}
