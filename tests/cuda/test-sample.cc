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
 * compared exactly, their logprobs within 1e-5. */
#include "kernels/cuda/ops.cuh"

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

/* The device op on n rows of vocab logits. */
static bool run_cuda(const float *logits, int vocab, const struct lp_sample_row *rows, int n,
                     struct result *res)
{
	float *dl = NULL, *dlp = NULL, *dtl = NULL;
	int32_t *dtok = NULL, *dti = NULL;
	struct lp_sample_row *drows = NULL;
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
	cudaFree(dtok);
	cudaFree(dlp);
	cudaFree(dti);
	cudaFree(dtl);
	return ok;
}

static bool run_cpu(const float *logits, int vocab, const struct lp_sample_row *rows, int n,
                    struct result *res)
{
	struct lp_tensor t = {(void *)logits, LP_DTYPE_F32, n, vocab};
	struct lp_sample_args a;
	struct lp_err err;

	memset(&a, 0, sizeof(a));
	a.logits = &t;
	a.rows = rows;
	a.n = n;
	a.max_logprobs = MAX_LOGPROBS;
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

/* Both ops on the same rows: tokens and top ids the same, logprobs within
 * 1e-5. */
static int compare(const char *what, const float *logits, int vocab,
                   const struct lp_sample_row *rows, int n)
{
	struct result *g = (struct result *)calloc(1, sizeof(*g));
	struct result *w = (struct result *)calloc(1, sizeof(*w));
	int ok = 0;

	if (!run_cuda(logits, vocab, rows, n, g) || !run_cpu(logits, vocab, rows, n, w)) {
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
	ok = 1;
out:
	free(g);
	free(w);
	return ok;
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
	char what[64];

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
		char what[64];

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
		char what[64];

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
	CHECK(run_cuda(l, vocab, rows, 8, g));
	CHECK_EQ_INT(bad_flags(), LP_CUDA_BAD_SAMPLE);
	CHECK_EQ_INT(cu.status, 0);
	CHECK_EQ_INT(g->tokens[0], best0);
	CHECK_EQ_INT(g->tokens[7], best7);
	for (int r = 1; r < 7; r++)
		CHECK_MSG(g->tokens[r] == 0, "bad row %d: token %d", r, g->tokens[r]);
	free(g);
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
	RUN(test_vocab_1000);
	RUN(test_many_u);
	RUN(test_special_rows);
	RUN(test_vocab_49152);
	RUN(test_vocab_151936);
	RUN(test_flat_big);
	RUN(test_bad_rows);
	RUN(test_shape_errors);
	cudaFree(cu.bad);
	lp_cuda_release(&cu);
	lp_backend_destroy(cpu);
	TEST_MAIN_END();
}
