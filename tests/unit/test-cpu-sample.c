/* The CPU backend's sample op against the host sampler
 * (agent/engine/sampler.c) and against a reference written here in double
 * precision with a full sort (the semantics of backend.h: rank by value
 * logit / temperature with ties to the lower id, top-k, top-p over the
 * top-k mass, min-p relative to the best, the first kept candidate whose
 * running mass exceeds u times the kept mass).
 *
 * - Greedy: the same token as the host sampler, exactly.
 * - Draws at chosen u: for every kept candidate carrying at least 1e-4 of
 *   the kept mass, u in the middle of its interval gives exactly it. The
 *   op's probabilities (a polynomial e^x, fixed-point masses) differ from
 *   the reference's by ~1e-7 relative, far inside that margin; the test
 *   cases are checked to keep their top-p and min-p cuts at least 1e-6
 *   away from a boundary, so the kept sets agree exactly.
 * - Distributions: 60000 draws of the host sampler (seeded) and of the op
 *   (u from a fixed-seed generator) each against the reference
 *   probabilities by a chi-square statistic over the candidates expected
 *   at least 5 times (the rest pooled). The seeds are fixed, so the test is
 *   deterministic; the bound, df + 6 sqrt(2 df) + 10, is far in the tail of
 *   the chi-square distribution (a correct sampler fails it with
 *   probability below 1e-7) yet a wrong cut or a missing renormalisation
 *   exceeds it by orders of magnitude.
 * - logprobs: log-softmax of the raw row within 1e-5 (the op sums e^x in
 *   float blocks of 64 into a double, with a ~2e-7 relative e^x). */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "agent/engine/sampler.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu.h"
#include "tests/test.h"

#define MAX_ROWS     512
#define MAX_LOGPROBS 20
#define BIG_VOCAB    151936
#define MIDPOINTS    40 /* draws checked per case */

static struct lp_backend *g_be;        /* 3 threads */
static struct lp_backend *g_be1;       /* 1 thread */
static struct lp_backend *g_be_scalar; /* 2 threads, portable C (no AVX2) */

static uint64_t rng_state = 0x5a3b1e5eedULL;

static uint64_t rng_next(void)
{
	return test_splitmix64(&rng_state);
}

static double urand(void)
{
	return (double)(rng_next() >> 11) * 0x1.0p-53;
}

/* Roughly normal, with mean 0 and deviation s. */
static float nrand(float s)
{
	double a = 0;

	for (int i = 0; i < 12; i++)
		a += urand();
	return (float)((a - 6.0) * s);
}

/* ---- the reference ---- */

struct ref {
	int vocab;
	int32_t *ids; /* [vocab] in rank order */
	double *p;    /* [vocab]: e^(value - best) of ids[j] */
	int len;      /* the prefix top-k and top-p keep */
	bool *kept;   /* [vocab]: min-p keeps rank position j (j < len) */
	double mass;  /* of the kept candidates */
	bool sharp;   /* the cuts are at least 1e-6 away from a boundary */
};

static const float *g_sort_values;

static float value_of(float l, float t)
{
	float v = l / t;

	if (isnan(v))
		return -INFINITY;
	return v == 0.0f ? 0.0f : v;
}

static int by_rank(const void *pa, const void *pb)
{
	int32_t a = *(const int32_t *)pa, b = *(const int32_t *)pb;
	float va = g_sort_values[a], vb = g_sort_values[b];

	if (va != vb)
		return va > vb ? -1 : 1;
	return a < b ? -1 : a > b;
}

static void ref_free(struct ref *r)
{
	free(r->ids);
	free(r->p);
	free(r->kept);
	memset(r, 0, sizeof(*r));
}

/* Only for rows whose best value is finite. */
static void ref_build(struct ref *r, const float *l, int vocab, const struct lp_sample_row *row)
{
	float *v = malloc((size_t)vocab * sizeof(float));
	int k = row->top_k > 0 && row->top_k < vocab ? row->top_k : vocab;
	double m;

	r->vocab = vocab;
	r->ids = malloc((size_t)vocab * sizeof(int32_t));
	r->p = malloc((size_t)vocab * sizeof(double));
	r->kept = calloc((size_t)vocab, sizeof(bool));
	r->sharp = true;
	for (int i = 0; i < vocab; i++) {
		v[i] = value_of(l[i], row->temperature);
		r->ids[i] = i;
	}
	g_sort_values = v;
	qsort(r->ids, (size_t)vocab, sizeof(int32_t), by_rank);
	m = v[r->ids[0]];
	for (int j = 0; j < vocab; j++)
		r->p[j] = exp((double)v[r->ids[j]] - m);
	r->len = k;
	if (row->top_p < 1.0f) {
		double mass = 0, cum = 0, target;

		for (int j = 0; j < k; j++)
			mass += r->p[j];
		target = (double)row->top_p * mass;
		for (int j = 0; j < k; j++) {
			cum += r->p[j];
			if (cum >= target) {
				r->len = j + 1;
				r->sharp &= cum - target > 1e-6 * mass &&
				            target - (cum - r->p[j]) > 1e-6 * mass;
				break;
			}
		}
	}
	r->mass = 0;
	for (int j = 0; j < r->len; j++) {
		r->kept[j] = r->p[j] >= row->min_p;
		if (row->min_p > 0)
			r->sharp &= fabs(r->p[j] - row->min_p) > 1e-6;
		if (r->kept[j])
			r->mass += r->p[j];
	}
	free(v);
}

/* Probability of rank position j under the reference (0 if not kept). */
static double ref_prob(const struct ref *r, int j)
{
	return j < r->len && r->kept[j] ? r->p[j] / r->mass : 0.0;
}

/* log-softmax of the raw logit of id, in double */
static double ref_logprob(const float *l, int vocab, int id)
{
	double m = -INFINITY, s = 0;

	for (int i = 0; i < vocab; i++)
		if (l[i] > m)
			m = l[i];
	for (int i = 0; i < vocab; i++)
		if (!isnan(l[i]))
			s += exp((double)l[i] - m);
	return isnan(l[id]) ? -INFINITY : (double)l[id] - m - log(s);
}

/* ---- running the op ---- */

struct run {
	struct lp_buffer logits, rows, pen, tokens, logprob, top_ids, top_lp;
	int32_t tokens_h[MAX_ROWS];
	float logprob_h[MAX_ROWS];
	int32_t top_ids_h[MAX_ROWS * MAX_LOGPROBS];
	float top_lp_h[MAX_ROWS * MAX_LOGPROBS];
};

/* n rows: row i is logits row i % n_distinct with parameters rows[i] and
 * its slice of the n_pen entries pen (NULL: none passed). */
static int run_op_pen(struct lp_backend *be, struct run *out, const float *logits, int vocab,
                      int n_distinct, const struct lp_sample_row *rows, int n,
                      const struct lp_sample_penalty *pen, int n_pen)
{
	struct lp_err err = {0};
	struct lp_tensor t = {NULL, LP_DTYPE_F32, n, vocab};
	struct lp_sample_args a = {.logits = &t, .n = n, .max_logprobs = MAX_LOGPROBS};
	size_t row_bytes = (size_t)vocab * sizeof(float);
	int rc = 0;

	memset(out, 0, sizeof(*out));
	if ((rc = lp_backend_alloc(be, row_bytes * (size_t)n, &out->logits, &err)) ||
	    (rc = lp_backend_alloc(be, sizeof(*rows) * (size_t)n, &out->rows, &err)) ||
	    (rc = lp_backend_alloc(be, 4 * (size_t)n, &out->tokens, &err)) ||
	    (rc = lp_backend_alloc(be, 4 * (size_t)n, &out->logprob, &err)) ||
	    (rc = lp_backend_alloc(be, 4 * (size_t)n * MAX_LOGPROBS, &out->top_ids, &err)) ||
	    (rc = lp_backend_alloc(be, 4 * (size_t)n * MAX_LOGPROBS, &out->top_lp, &err)) ||
	    (pen && (rc = lp_backend_alloc(be, sizeof(*pen) * (size_t)(n_pen ? n_pen : 1),
	                                   &out->pen, &err))))
		goto out;
	if (pen) {
		lp_backend_upload(be, out->pen.data, pen, sizeof(*pen) * (size_t)n_pen);
		a.pen = out->pen.data;
	}
	for (int i = 0; i < n; i++)
		lp_backend_upload(be, (char *)out->logits.data + row_bytes * (size_t)i,
		                  logits + (size_t)(i % n_distinct) * vocab, row_bytes);
	lp_backend_upload(be, out->rows.data, rows, sizeof(*rows) * (size_t)n);
	t.data = out->logits.data;
	a.rows = out->rows.data;
	a.tokens = out->tokens.data;
	a.logprob = out->logprob.data;
	a.top_ids = out->top_ids.data;
	a.top_logprobs = out->top_lp.data;
	be->ops->sample(be->ctx, &a);
	lp_backend_download(be, out->tokens_h, a.tokens, 4 * (size_t)n);
	lp_backend_download(be, out->logprob_h, a.logprob, 4 * (size_t)n);
	lp_backend_download(be, out->top_ids_h, a.top_ids, 4 * (size_t)n * MAX_LOGPROBS);
	lp_backend_download(be, out->top_lp_h, a.top_logprobs, 4 * (size_t)n * MAX_LOGPROBS);
out:
	lp_backend_free(be, &out->logits);
	lp_backend_free(be, &out->rows);
	lp_backend_free(be, &out->pen);
	lp_backend_free(be, &out->tokens);
	lp_backend_free(be, &out->logprob);
	lp_backend_free(be, &out->top_ids);
	lp_backend_free(be, &out->top_lp);
	return rc;
}

static int run_op(struct lp_backend *be, struct run *out, const float *logits, int vocab,
                  int n_distinct, const struct lp_sample_row *rows, int n)
{
	return run_op_pen(be, out, logits, vocab, n_distinct, rows, n, NULL, 0);
}

static int status_of(struct lp_backend *be, char *msg, size_t len)
{
	struct lp_err err = {0};
	int rc = be->ops->status(be->ctx, &err);

	snprintf(msg, len, "%s", err.msg);
	return rc;
}

/* A row without penalties. */
static struct lp_sample_row mkrow(float t, float top_p, float min_p, int top_k, float u,
                                  int n_logprobs)
{
	return (struct lp_sample_row){.temperature = t,
	                              .top_p = top_p,
	                              .min_p = min_p,
	                              .top_k = top_k,
	                              .u = u,
	                              .n_logprobs = n_logprobs,
	                              .repetition_penalty = 1.0f};
}

static struct lp_sample_row greedy_row(int n_logprobs)
{
	return mkrow(0.0f, 1.0f, 0.0f, 0, 0.5f, n_logprobs);
}

/* Rows of vocab logits: random, with NaN and -inf sprinkled, ties for the
 * best, all -inf, all NaN, +inf. */
static float *special_rows(int vocab, int *n_rows)
{
	const int n = 9;
	float *l = malloc((size_t)n * vocab * sizeof(float));

	for (int r = 0; r < n; r++)
		for (int i = 0; i < vocab; i++)
			l[(size_t)r * vocab + i] = nrand(3.0f);
	/* 1: NaN and -inf sprinkled, NaN where the best would be */
	for (int i = 0; i < vocab; i += 7)
		l[vocab + i] = NAN;
	for (int i = 3; i < vocab; i += 11)
		l[vocab + i] = -INFINITY;
	l[vocab + 14] = 50.0f;
	l[vocab + 21] = NAN;
	/* 2: a tie for the best, the lower id wins */
	l[2 * vocab + vocab - 5] = 40.0f;
	l[2 * vocab + vocab / 2] = 40.0f;
	/* 3: all -inf; 4: all NaN; 5: two +inf */
	for (int i = 0; i < vocab; i++) {
		l[3 * vocab + i] = -INFINITY;
		l[4 * vocab + i] = NAN;
	}
	l[5 * vocab + vocab - 1] = INFINITY;
	l[5 * vocab + 17] = INFINITY;
	/* 6: flat; 7: huge values that overflow at a small temperature */
	for (int i = 0; i < vocab; i++)
		l[6 * vocab + i] = 0.25f;
	l[7 * vocab + 30] = 3e38f;
	l[7 * vocab + 10] = 2e38f;
	/* 8: -0 and +0 as the best, the lower id wins */
	for (int i = 0; i < vocab; i++)
		l[8 * vocab + i] = -fabsf(l[8 * vocab + i]) - 1.0f;
	l[8 * vocab + 40] = 0.0f;
	l[8 * vocab + 20] = -0.0f;
	*n_rows = n;
	return l;
}

static int32_t host_sample(const float *logits, int vocab, const struct lp_sampling_params *p,
                           struct lp_sampler *s, float *scratch)
{
	memcpy(scratch, logits, (size_t)vocab * sizeof(float));
	(void)p;
	return lp_sampler_sample(s, scratch);
}

/* Greedy and the infinite cases give the host sampler's token exactly, with
 * log-softmax logprobs. */
static void test_greedy_matches_host(void)
{
	static const int vocabs[] = {1000, 49152};

	for (size_t vi = 0; vi < 4; vi++) {
		struct lp_backend *be = vi & 2 ? g_be_scalar : g_be;
		int vocab = vocabs[vi & 1], n;
		float *l = special_rows(vocab, &n),
		      *scratch = malloc((size_t)vocab * sizeof(float));
		struct lp_sample_row rows[9];
		struct lp_sampling_params p;
		struct lp_sampler s;
		struct lp_err err = {0};
		struct run *run = malloc(sizeof(*run));
		char msg[LP_ERR_MSG_MAX];

		lp_sampling_params_default(&p);
		p.temperature = 0.0f;
		p.has_seed = true;
		CHECK_OK(lp_sampler_init(&s, &p, vocab, &err), &err);
		for (int r = 0; r < n; r++)
			rows[r] = greedy_row(0);
		CHECK_OK(run_op(be, run, l, vocab, n, rows, n), &err);
		CHECK_EQ_INT(status_of(be, msg, sizeof(msg)), 0);
		for (int r = 0; r < n; r++) {
			const float *row = l + (size_t)r * vocab;
			int32_t want = host_sample(row, vocab, &p, &s, scratch);

			CHECK_MSG(run->tokens_h[r] == want, "vocab %d row %d: token %d, host %d",
			          vocab, r, run->tokens_h[r], want);
		}
		CHECK_EQ_INT(run->tokens_h[1], 14);
		CHECK_EQ_INT(run->tokens_h[2], vocab / 2);
		CHECK_EQ_INT(run->tokens_h[3], 0);
		CHECK_EQ_INT(run->tokens_h[5], 17);
		CHECK_EQ_INT(run->tokens_h[8], 20);
		/* logprobs: finite rows by the reference; an infinite best shares
		 * the mass among the candidates equal to it */
		for (int r = 0; r < n; r++) {
			double want;

			if (r == 3 || r == 4)
				want = -log((double)vocab);
			else if (r == 5)
				want = -log(2.0);
			else
				want = ref_logprob(l + (size_t)r * vocab, vocab, run->tokens_h[r]);
			CHECK_MSG(fabs(run->logprob_h[r] - want) <= 1e-5,
			          "vocab %d row %d: logprob %g, want %g", vocab, r,
			          (double)run->logprob_h[r], want);
		}
		/* sampling at any u with an infinite best is the argmax of the
		 * values; host too */
		lp_sampler_release(&s);
		p.temperature = 0.01f;
		CHECK_OK(lp_sampler_init(&s, &p, vocab, &err), &err);
		for (int r = 0; r < n; r++)
			rows[r] = mkrow(0.01f, 1.0f, 0.0f, 0, 0.7f, 0);
		CHECK_OK(run_op(be, run, l, vocab, n, rows, n), &err);
		for (int r = 3; r <= 7; r += 2) {
			int32_t want = host_sample(l + (size_t)r * vocab, vocab, &p, &s, scratch);
			CHECK_MSG(run->tokens_h[r] == want,
			          "vocab %d row %d at t 0.01: %d, host %d", vocab, r,
			          run->tokens_h[r], want);
		}
		CHECK_EQ_INT(run->tokens_h[7], 10);
		lp_sampler_release(&s);
		free(run);
		free(scratch);
		free(l);
	}
}

/* For each parameter set, the kept candidates with at least 1e-4 of the
 * kept mass come out exactly at u in the middle of their interval. */
struct params_case {
	float t, top_p, min_p;
	int top_k;
};

static const struct params_case g_cases[] = {
    {1.0f, 1.0f, 0.0f, 0},  {0.7f, 1.0f, 0.0f, 20},  {1.0f, 0.9f, 0.0f, 0},
    {1.0f, 1.0f, 0.05f, 0}, {1.3f, 0.8f, 0.02f, 50}, {0.5f, 0.95f, 0.1f, 0},
    {2.0f, 0.6f, 0.0f, 1},  {1.0f, 1.0f, 0.0f, 999}, {0.9f, 0.3f, 0.0f, 400},
};
#define N_CASES (int)(sizeof(g_cases) / sizeof(g_cases[0]))

/* A row's penalties: the parameters and the entries (pen_off 0). */
struct penalties {
	float rep, freq, pres;
	const struct lp_sample_penalty *e;
	int n;
};

static struct lp_sample_row with_penalties(struct lp_sample_row r, const struct penalties *pz,
                                           int off)
{
	r.repetition_penalty = pz->rep;
	r.frequency_penalty = pz->freq;
	r.presence_penalty = pz->pres;
	r.pen_off = off;
	r.pen_n = pz->n;
	return r;
}

/* The row l with bias and penalties pz applied, by the definition
 * (backend.h): the reference samples from it. */
static float *penalised(const float *l, int vocab, const struct penalties *pz)
{
	float *p = malloc((size_t)vocab * sizeof(float));

	memcpy(p, l, (size_t)vocab * sizeof(float));
	for (int j = 0; j < pz->n; j++) {
		const struct lp_sample_penalty *e = &pz->e[j];
		float x = l[e->token];

		if (e->bias != 0.0f)
			x += e->bias;
		if (pz->rep != 1.0f && (e->count > 0 || e->in_prompt))
			x = x > 0.0f ? x / pz->rep : x * pz->rep;
		if (e->count > 0)
			x -= (float)e->count * pz->freq + pz->pres;
		p[e->token] = x;
	}
	return p;
}

static int check_midpoints_pen(struct lp_backend *be, const float *l, int vocab,
                               const struct params_case *c, const struct penalties *pz,
                               const char *what)
{
	struct lp_sample_row base = mkrow(c->t, c->top_p, c->min_p, c->top_k, 0.0f, 3);
	struct lp_sample_row *rows = malloc(MAX_ROWS * sizeof(*rows));
	int32_t *want = malloc(MAX_ROWS * sizeof(int32_t));
	struct run *run = malloc(sizeof(*run));
	float *lp = pz ? penalised(l, vocab, pz) : NULL;
	struct ref r;
	double cum = 0;
	int n = 0, ok = 0, eligible = 0;
	char msg[LP_ERR_MSG_MAX];

	if (pz)
		base = with_penalties(base, pz, 0);
	/* the reference samples from the penalised row; the logprobs stay
	 * the raw row's */
	ref_build(&r, lp ? lp : l, vocab, &base);
	if (!r.sharp) {
		TEST_FAIL("%s: the case is within 1e-6 of a cut; pick another", what);
		goto out;
	}
	rows[n] = base;
	want[n++] = r.ids[0];
	for (int j = 0; j < r.len; j++) {
		double pj = ref_prob(&r, j);

		if (pj >= 1e-4)
			eligible++;
	}
	/* at most MIDPOINTS of them, spread over the ranking */
	for (int j = 0, e = 0; j < r.len; j++) {
		double pj = ref_prob(&r, j);

		if (pj >= 1e-4 && (e++ * MIDPOINTS) % eligible < MIDPOINTS) {
			rows[n] = base;
			rows[n].u = (float)(cum + pj / 2);
			want[n++] = r.ids[j];
		}
		cum += pj;
	}
	if (run_op_pen(be, run, l, vocab, 1, rows, n, pz ? pz->e : NULL, pz ? pz->n : 0)) {
		TEST_FAIL("%s: allocation failed", what);
		goto out;
	}
	if (status_of(be, msg, sizeof(msg))) {
		TEST_FAIL("%s: status: %s", what, msg);
		goto out;
	}
	for (int i = 0; i < n; i++) {
		double lp = ref_logprob(l, vocab, want[i]);

		if (run->tokens_h[i] != want[i]) {
			TEST_FAIL("%s: u %.9g gave %d, want %d", what, (double)rows[i].u,
			          run->tokens_h[i], want[i]);
			goto out;
		}
		if (!(fabs(run->logprob_h[i] - lp) <= 1e-5)) {
			TEST_FAIL("%s: logprob %g, want %g", what, (double)run->logprob_h[i], lp);
			goto out;
		}
	}
	ok = 1;
out:
	ref_free(&r);
	free(rows);
	free(want);
	free(run);
	free(lp);
	return ok;
}

static int check_midpoints(struct lp_backend *be, const float *l, int vocab,
                           const struct params_case *c, const char *what)
{
	return check_midpoints_pen(be, l, vocab, c, NULL, what);
}

static float *random_row(int vocab, float spread)
{
	float *l = malloc((size_t)vocab * sizeof(float));

	for (int i = 0; i < vocab; i++)
		l[i] = nrand(spread);
	return l;
}

static void test_draws_at_chosen_u(void)
{
	static const int vocabs[] = {1000, 49152, BIG_VOCAB};

	for (int vi = 0; vi < 3; vi++) {
		float *l = random_row(vocabs[vi], 3.0f);

		for (int c = 0; c < N_CASES; c++) {
			char what[64];

			snprintf(what, sizeof(what), "vocab %d case %d", vocabs[vi], c);
			if (!check_midpoints(g_be, l, vocabs[vi], &g_cases[c], what)) {
				free(l);
				return;
			}
		}
		free(l);
	}
}

/* A flat row puts the whole vocabulary in one bucket; ties rank by id. */
static void test_flat_row(void)
{
	float *l = malloc(BIG_VOCAB * sizeof(float));
	static const struct params_case cases[] = {
	    {1.0f, 0.37f, 0.0f, 0}, {1.0f, 1.0f, 0.0f, 1000}, {1.0f, 1.0f, 0.0f, 0}};

	for (int i = 0; i < BIG_VOCAB; i++)
		l[i] = 1.5f;
	for (int c = 0; c < 3; c++)
		CHECK(check_midpoints(g_be, l, BIG_VOCAB, &cases[c], "flat"));
	free(l);
}

/* Empirical distribution of tokens against the reference. */
static double chi_square(const int *counts, int n_draws, const struct ref *r, int *df, int *outside)
{
	double stat = 0, pooled_e = 0, pooled_o = 0;
	int k = 0;

	*outside = 0;
	for (int j = 0; j < r->vocab; j++) {
		double e = ref_prob(r, j) * n_draws;
		int o = counts[r->ids[j]];

		if (e == 0.0) {
			*outside += o;
			continue;
		}
		if (e < 5) {
			pooled_e += e;
			pooled_o += o;
			continue;
		}
		stat += (o - e) * (o - e) / e;
		k++;
	}
	if (pooled_e > 0) {
		stat += (pooled_o - pooled_e) * (pooled_o - pooled_e) / pooled_e;
		k++;
	}
	*df = k - 1;
	return stat;
}

static void test_distribution_matches_host(void)
{
	const int vocab = 1000, n_draws = 60000;
	float *l = random_row(vocab, 2.5f), *scratch = malloc(vocab * sizeof(float));
	int *host = malloc(vocab * sizeof(int)), *op = malloc(vocab * sizeof(int));
	struct lp_sample_row *rows = malloc(MAX_ROWS * sizeof(*rows));
	struct run *run = malloc(sizeof(*run));
	struct lp_err err = {0};

	for (int c = 0; c < N_CASES; c++) {
		const struct params_case *pc = &g_cases[c];
		struct lp_sample_row base = mkrow(pc->t, pc->top_p, pc->min_p, pc->top_k, 0.0f, 0);
		struct lp_sampling_params p;
		struct lp_sampler s;
		struct ref r;
		double stat_h, stat_o, bound;
		int df, out_h, out_o;

		lp_sampling_params_default(&p);
		p.temperature = pc->t;
		p.top_p = pc->top_p;
		p.min_p = pc->min_p;
		p.top_k = pc->top_k;
		p.has_seed = true;
		p.seed = 1234 + (uint64_t)c;
		CHECK_OK(lp_sampler_init(&s, &p, vocab, &err), &err);
		memset(host, 0, vocab * sizeof(int));
		memset(op, 0, vocab * sizeof(int));
		for (int d = 0; d < n_draws; d++)
			host[host_sample(l, vocab, &p, &s, scratch)]++;
		lp_sampler_release(&s);
		for (int d = 0; d < n_draws; d += MAX_ROWS) {
			int n = n_draws - d < MAX_ROWS ? n_draws - d : MAX_ROWS;

			for (int i = 0; i < n; i++) {
				rows[i] = base;
				rows[i].u = (float)urand();
				if (rows[i].u >= 1.0f)
					rows[i].u = 0.0f;
			}
			CHECK_OK(run_op(g_be, run, l, vocab, 1, rows, n), &err);
			for (int i = 0; i < n; i++)
				op[run->tokens_h[i]]++;
		}
		ref_build(&r, l, vocab, &base);
		stat_h = chi_square(host, n_draws, &r, &df, &out_h);
		stat_o = chi_square(op, n_draws, &r, &df, &out_o);
		bound = df + 6 * sqrt(2.0 * df) + 10;
		ref_free(&r);
		CHECK_MSG(out_h == 0 && out_o == 0,
		          "case %d: %d host and %d op draws outside the kept set", c, out_h, out_o);
		CHECK_MSG(stat_h <= bound, "case %d: host chi-square %g over %d df (bound %g)", c,
		          stat_h, df, bound);
		CHECK_MSG(stat_o <= bound, "case %d: op chi-square %g over %d df (bound %g)", c,
		          stat_o, df, bound);
	}
	free(l);
	free(scratch);
	free(host);
	free(op);
	free(rows);
	free(run);
}

/* Top-N logprobs: best first by the raw logits, ties to the lower id, NaN
 * last; unused columns -1 / -inf. */
static void test_top_logprobs(void)
{
	const int vocab = 3000;
	float *l = random_row(vocab, 2.0f);
	struct lp_sample_row rows[4] = {greedy_row(MAX_LOGPROBS), greedy_row(5), greedy_row(0),
	                                mkrow(0.8f, 0.9f, 0.0f, 40, 0.3f, 7)};
	struct run *run = malloc(sizeof(*run));
	struct lp_err err = {0};
	struct ref r;
	struct lp_sample_row raw = mkrow(1.0f, 1.0f, 0.0f, 0, 0.0f, 0);

	l[100] = 9.0f;
	l[2000] = 9.0f; /* tie with 100 */
	l[5] = NAN;
	l[6] = 8.5f;
	CHECK_OK(run_op(g_be, run, l, vocab, 1, rows, 4), &err);
	ref_build(&r, l, vocab, &raw);
	CHECK_EQ_INT(run->top_ids_h[0], 100);
	CHECK_EQ_INT(run->top_ids_h[1], 2000);
	CHECK_EQ_INT(run->top_ids_h[2], 6);
	for (int row = 0; row < 4; row++) {
		int n = rows[row].n_logprobs;

		for (int j = 0; j < MAX_LOGPROBS; j++) {
			int32_t id = run->top_ids_h[row * MAX_LOGPROBS + j];
			float lp = run->top_lp_h[row * MAX_LOGPROBS + j];

			if (j >= n) {
				CHECK_MSG(id == -1 && lp == -INFINITY, "row %d column %d: %d %g",
				          row, j, id, (double)lp);
				continue;
			}
			CHECK_MSG(id == r.ids[j], "row %d column %d: id %d, want %d", row, j, id,
			          r.ids[j]);
			CHECK_NEAR(lp, ref_logprob(l, vocab, id), 1e-5);
		}
	}
	ref_free(&r);
	free(run);
	free(l);
}

/* Rows with parameters out of range: the failure is recorded (sticky) and
 * the row gets token 0; the other rows are sampled as usual. */
static void test_bad_rows(void)
{
	struct lp_backend *be = NULL;
	struct lp_backend_limits lim = {.vocab = 100, .max_out = 16, .max_logprobs = MAX_LOGPROBS};
	struct lp_err err = {0};
	float *l = random_row(100, 1.0f);
	struct run *run = malloc(sizeof(*run));
	size_t bytes;
	char msg[LP_ERR_MSG_MAX];
	const struct lp_sample_row rows[] = {
	    greedy_row(0),
	    mkrow(-1.0f, 1.0f, 0.0f, 0, 0.5f, 0),
	    mkrow(1.0f, 0.0f, 0.0f, 0, 0.5f, 0),
	    mkrow(1.0f, 1.5f, 0.0f, 0, 0.5f, 0),
	    mkrow(1.0f, 1.0f, -0.1f, 0, 0.5f, 0),
	    mkrow(1.0f, 1.0f, 0.0f, 0, 1.0f, 0),
	    mkrow(1.0f, 1.0f, 0.0f, 0, 0.5f, MAX_LOGPROBS + 1),
	    mkrow(NAN, 1.0f, 0.0f, 0, 0.5f, 0),
	    greedy_row(2),
	};
	const int n = (int)(sizeof(rows) / sizeof(rows[0]));
	int32_t best = 0;

	l[0] = -5.0f;
	for (int i = 1; i < 100; i++)
		best = l[i] > l[best] ? i : best;
	CHECK_OK(lp_backend_cpu_new(&be, 2, &err), &err);
	CHECK_OK(be->ops->reserve(be->ctx, &lim, &bytes, &err), &err);
	CHECK_OK(run_op(be, run, l, 100, 1, rows, n), &err);
	CHECK_EQ_INT(status_of(be, msg, sizeof(msg)), -EINVAL);
	CHECK_MSG(strstr(msg, "sample: row"), "status names the row: %s", msg);
	CHECK_EQ_INT(run->tokens_h[0], best);
	CHECK_EQ_INT(run->tokens_h[n - 1], best);
	for (int i = 1; i < n - 1; i++)
		CHECK_MSG(run->tokens_h[i] == 0, "bad row %d: token %d", i, run->tokens_h[i]);
	/* a logits row wider than reserved is refused as a whole */
	lp_backend_destroy(be);
	CHECK_OK(lp_backend_cpu_new(&be, 1, &err), &err);
	CHECK_OK(be->ops->reserve(be->ctx, &lim, &bytes, &err), &err);
	{
		float *wide = random_row(101, 1.0f);
		CHECK_OK(run_op(be, run, wide, 101, 1, rows, 1), &err);
		free(wide);
	}
	CHECK_EQ_INT(status_of(be, msg, sizeof(msg)), -EINVAL);
	lp_backend_destroy(be);
	free(run);
	free(l);
}

/* ---- penalties ---- */

/* The penalty sets: each kind alone, together, negative ones that favour
 * the seen tokens, the ends of the allowed ranges, all off. */
static const struct {
	float rep, freq, pres;
} g_pens[] = {
    {1.3f, 0.0f, 0.0f}, {0.7f, 0.0f, 0.0f},   {1.0f, 0.6f, 0.0f},
    {1.0f, 0.0f, 1.5f}, {1.2f, 0.4f, 0.3f},   {1.0f, -0.7f, -1.0f},
    {2.0f, 2.0f, 2.0f}, {0.5f, -2.0f, -2.0f}, {1.0f, 0.0f, 0.0f},
};
#define N_PENS (int)(sizeof(g_pens) / sizeof(g_pens[0]))

/* What a sequence has seen: its prompt, and what it generated (repeats
 * count); and the logit bias of its request. */
struct history {
	int32_t prompt[64], gen[64];
	int n_prompt, n_gen;
	struct lp_logit_bias bias[8];
	int n_bias;
};

/* HIST_BIASED: prompt and generated tokens, and a logit bias */
enum { HIST_PROMPT, HIST_GENERATED, HIST_BOTH, HIST_BIASED, N_HIST };

static bool has_bias(const struct history *h, int32_t t)
{
	for (int i = 0; i < h->n_bias; i++)
		if (h->bias[i].token == t)
			return true;
	return false;
}

/* Biases a token the history has not biased yet. */
static void add_bias(struct history *h, int32_t t, float bias)
{
	if (!has_bias(h, t))
		h->bias[h->n_bias++] = (struct lp_logit_bias){t, bias};
}

/* A history of the given kind over row l, drawn mostly from its best
 * tokens (above hi) so that the penalties change what is chosen. A
 * biased one demotes the best token, promotes others (seen ones too),
 * bans one and gives one a bias of 0 (no entry). */
static void make_history(struct history *h, int kind, const float *l, int vocab, float hi)
{
	int32_t best[48];
	int n_best = 0;

	for (int i = 0; i < vocab && n_best < 48; i++)
		if (l[i] > hi)
			best[n_best++] = i;
	memset(h, 0, sizeof(*h));
	if (kind != HIST_GENERATED)
		for (int i = 0; i < 40; i++)
			h->prompt[h->n_prompt++] = i % 3 == 2 || !n_best
			                               ? (int32_t)(rng_next() % (uint64_t)vocab)
			                               : best[rng_next() % (uint64_t)n_best];
	if (kind != HIST_PROMPT)
		for (int i = 0; i < 50; i++)
			h->gen[h->n_gen++] =
			    i % 4 == 3 || !n_best
			        ? (int32_t)(rng_next() % (uint64_t)vocab)
			        : best[rng_next() % (uint64_t)(n_best < 12 ? n_best : 12)];
	if (kind == HIST_BIASED) {
		int32_t top = 0;

		for (int i = 1; i < vocab; i++)
			top = l[i] > l[top] ? i : top;
		add_bias(h, top, -6.5f);
		add_bias(h, (int32_t)(rng_next() % (uint64_t)vocab), 7.25f);
		add_bias(h, h->prompt[0], 3.5f);
		add_bias(h, h->gen[0], -2.25f);
		add_bias(h, n_best > 1 ? best[1] : (int32_t)(rng_next() % (uint64_t)vocab),
		         -100.0f);
		add_bias(h, (int32_t)(rng_next() % (uint64_t)vocab), 0.0f);
	}
}

/* The op's entries for a history, written from backend.h's definition
 * (every distinct token seen or biased, with its count, whether the
 * prompt holds it and its bias), in a shuffled order; how many. */
static int entries_of(const struct history *h, int vocab, struct lp_sample_penalty *out)
{
	int32_t *count = calloc((size_t)vocab, sizeof(int32_t));
	char *in_prompt = calloc((size_t)vocab, 1);
	float *bias = calloc((size_t)vocab, sizeof(float));
	int n = 0;

	for (int i = 0; i < h->n_prompt; i++)
		in_prompt[h->prompt[i]] = 1;
	for (int i = 0; i < h->n_gen; i++)
		count[h->gen[i]]++;
	for (int i = 0; i < h->n_bias; i++)
		bias[h->bias[i].token] = h->bias[i].bias;
	for (int t = 0; t < vocab; t++)
		if (count[t] || in_prompt[t] || bias[t] != 0.0f)
			out[n++] = (struct lp_sample_penalty){t, count[t], in_prompt[t], bias[t]};
	for (int i = n - 1; i > 0; i--) {
		int j = (int)(rng_next() % (uint64_t)(i + 1));
		struct lp_sample_penalty t = out[i];

		out[i] = out[j];
		out[j] = t;
	}
	free(count);
	free(in_prompt);
	free(bias);
	return n;
}

/* The host sampler with parameters p and history h's logit bias, having
 * seen history h. */
static int host_with_history(struct lp_sampler *s, const struct lp_sampling_params *p, int vocab,
                             const struct history *h, struct lp_err *err)
{
	struct lp_sampling_params pb = *p;
	int rc;

	pb.n_logit_bias = h->n_bias;
	memcpy(pb.logit_bias, h->bias, (size_t)h->n_bias * sizeof(h->bias[0]));
	rc = lp_sampler_init(s, &pb, vocab, err);

	if (rc)
		return rc;
	lp_sampler_set_prompt(s, h->prompt, (size_t)h->n_prompt);
	for (int i = 0; i < h->n_gen; i++)
		lp_sampler_accept(s, h->gen[i]);
	return 0;
}

static struct penalties pens_of(int set, const struct lp_sample_penalty *e, int n)
{
	return (struct penalties){g_pens[set].rep, g_pens[set].freq, g_pens[set].pres, e, n};
}

/* Greedy with penalties gives the host sampler's token, for every penalty
 * set and history kind, each row with its slice of one pen array, on
 * random rows and on the special ones (entries on NaN, +-inf, huge, -0 and
 * tied logits). The logprobs and top-N stay the raw row's: the same bits
 * as the same rows without entries. */
static void test_penalties_greedy_matches_host(void)
{
	static const int vocabs[] = {1000, 49152};
	const int n = N_PENS * N_HIST;
	int changed = 0, touched = 0;

	for (size_t vi = 0; vi < 6; vi++) {
		struct lp_backend *be = vi & 2 ? g_be_scalar : g_be;
		int vocab = vocabs[vi & 1], n_special;
		bool special = vi >= 4;
		float *sp = special_rows(vocab, &n_special);
		float *l = malloc((size_t)n * vocab * sizeof(float));
		float *scratch = malloc((size_t)vocab * sizeof(float));
		struct lp_sample_penalty *pen = malloc((size_t)n * 64 * 2 * sizeof(*pen));
		struct lp_sample_row rows[N_PENS * N_HIST], plain[N_PENS * N_HIST];
		struct history *h = malloc((size_t)n * sizeof(*h));
		struct run *run = malloc(sizeof(*run)), *raw = malloc(sizeof(*raw));
		struct lp_err err = {0};
		char msg[LP_ERR_MSG_MAX];
		int n_pen = 0;

		for (int r = 0; r < n; r++) {
			float *row = l + (size_t)r * vocab;
			struct penalties pz;

			if (special)
				memcpy(row, sp + (size_t)(r % n_special) * vocab,
				       (size_t)vocab * sizeof(float));
			else
				for (int i = 0; i < vocab; i++)
					row[i] = nrand(3.0f);
			make_history(&h[r], r % N_HIST, row, vocab, 6.0f);
			if (special) /* the special spots, seen in the prompt and generated */
				for (int i = 0; i < 10; i++) {
					static const int spots[] = {10, 14, 17, 20, 21, 30, 40, 0};
					int32_t t = i < 8    ? spots[i]
					            : i == 8 ? vocab / 2
					                     : vocab - 1;

					h[r].prompt[h[r].n_prompt++] = t;
					if (i % 2)
						h[r].gen[h[r].n_gen++] = t;
				}
			pz =
			    pens_of(r / N_HIST, pen + n_pen, entries_of(&h[r], vocab, pen + n_pen));
			plain[r] = greedy_row(r % (MAX_LOGPROBS + 1));
			rows[r] = with_penalties(plain[r], &pz, n_pen);
			n_pen += pz.n;
		}
		CHECK_OK(run_op_pen(be, run, l, vocab, n, rows, n, pen, n_pen), &err);
		CHECK_EQ_INT(status_of(be, msg, sizeof(msg)), 0);
		CHECK_OK(run_op(be, raw, l, vocab, n, plain, n), &err);
		for (int r = 0; r < n; r++) {
			const float *row = l + (size_t)r * vocab;
			struct lp_sampling_params p;
			struct lp_sampler s;
			int32_t want, tok = run->tokens_h[r];

			lp_sampling_params_default(&p);
			p.temperature = 0.0f;
			p.repetition_penalty = rows[r].repetition_penalty;
			p.frequency_penalty = rows[r].frequency_penalty;
			p.presence_penalty = rows[r].presence_penalty;
			CHECK_OK(host_with_history(&s, &p, vocab, &h[r], &err), &err);
			want = host_sample(row, vocab, &p, &s, scratch);
			lp_sampler_release(&s);
			CHECK_MSG(tok == want,
			          "vocab %d row %d (penalties %d, history %d): %d, host %d", vocab,
			          r, r / N_HIST, r % N_HIST, tok, want);
			changed += tok != raw->tokens_h[r];
			for (int j = 0; j < rows[r].pen_n; j++)
				touched += pen[rows[r].pen_off + j].token == tok;
			/* the raw row's logprob, not the penalised one's */
			if (isfinite(row[tok]))
				CHECK_MSG(fabs(run->logprob_h[r] - ref_logprob(row, vocab, tok)) <=
				              1e-5,
				          "vocab %d row %d: logprob %g, want %g", vocab, r,
				          (double)run->logprob_h[r], ref_logprob(row, vocab, tok));
		}
		CHECK(!memcmp(run->top_ids_h, raw->top_ids_h, sizeof(int32_t) * n * MAX_LOGPROBS));
		CHECK(!memcmp(run->top_lp_h, raw->top_lp_h, sizeof(float) * n * MAX_LOGPROBS));
		free(sp);
		free(l);
		free(scratch);
		free(pen);
		free(h);
		free(run);
		free(raw);
	}
	/* the penalties did change choices, and penalised tokens were chosen */
	CHECK_MSG(changed >= 20, "penalties changed only %d tokens", changed);
	CHECK_MSG(touched >= 20, "only %d penalised tokens chosen", touched);
}

/* Draws at chosen u over the penalised row: each kept candidate with at
 * least 1e-4 of the mass at the middle of its interval, the logprob the
 * raw row's. */
static void test_penalties_draws_at_chosen_u(void)
{
	static const int vocabs[] = {1000, 49152};

	for (int vi = 0; vi < 2; vi++) {
		int vocab = vocabs[vi];
		float *l = random_row(vocab, 3.0f);
		struct lp_sample_penalty *pen = malloc(128 * sizeof(*pen));

		for (int c = 0; c < N_CASES; c++) {
			struct history h;
			struct penalties pz;
			char what[64];

			make_history(&h, c % N_HIST, l, vocab, 6.0f);
			pz = pens_of(c % N_PENS, pen, entries_of(&h, vocab, pen));
			snprintf(what, sizeof(what), "vocab %d case %d penalties %d", vocab, c,
			         c % N_PENS);
			if (!check_midpoints_pen(g_be, l, vocab, &g_cases[c], &pz, what))
				break;
		}
		free(pen);
		free(l);
		if (test_current_failed)
			return;
	}
}

/* At temperature > 0 with penalties, the op's draws and the host
 * sampler's both follow the reference distribution over the penalised
 * row (chi-square as in test_distribution_matches_host). */
static void test_penalties_distribution_matches_host(void)
{
	const int vocab = 1000, n_draws = 60000;
	static const struct {
		int c, pens, hist;
	} cases[] = {{0, 4, HIST_BOTH},
	             {4, 0, HIST_PROMPT},
	             {5, 5, HIST_GENERATED},
	             {8, 3, HIST_BIASED},
	             {0, 8, HIST_BIASED}};
	float *l = random_row(vocab, 2.5f), *scratch = malloc(vocab * sizeof(float));
	int *host = malloc(vocab * sizeof(int)), *op = malloc(vocab * sizeof(int));
	struct lp_sample_row *rows = malloc(MAX_ROWS * sizeof(*rows));
	struct lp_sample_penalty pen[128];
	struct run *run = malloc(sizeof(*run));
	struct lp_err err = {0};

	for (int k = 0; k < (int)(sizeof(cases) / sizeof(cases[0])); k++) {
		const struct params_case *pc = &g_cases[cases[k].c];
		struct history h;
		struct penalties pz;
		struct lp_sample_row base;
		struct lp_sampling_params p;
		struct lp_sampler s;
		struct ref r;
		float *lp;
		double stat_h, stat_o, bound;
		int df, out_h, out_o;

		make_history(&h, cases[k].hist, l, vocab, 5.0f);
		pz = pens_of(cases[k].pens, pen, entries_of(&h, vocab, pen));
		base =
		    with_penalties(mkrow(pc->t, pc->top_p, pc->min_p, pc->top_k, 0.0f, 0), &pz, 0);
		lp_sampling_params_default(&p);
		p.temperature = pc->t;
		p.top_p = pc->top_p;
		p.min_p = pc->min_p;
		p.top_k = pc->top_k;
		p.repetition_penalty = pz.rep;
		p.frequency_penalty = pz.freq;
		p.presence_penalty = pz.pres;
		p.has_seed = true;
		p.seed = 777 + (uint64_t)k;
		CHECK_OK(host_with_history(&s, &p, vocab, &h, &err), &err);
		memset(host, 0, vocab * sizeof(int));
		memset(op, 0, vocab * sizeof(int));
		for (int d = 0; d < n_draws; d++)
			host[host_sample(l, vocab, &p, &s, scratch)]++;
		lp_sampler_release(&s);
		for (int d = 0; d < n_draws; d += MAX_ROWS) {
			int n = n_draws - d < MAX_ROWS ? n_draws - d : MAX_ROWS;

			for (int i = 0; i < n; i++) {
				rows[i] = base;
				rows[i].u = (float)urand();
				if (rows[i].u >= 1.0f)
					rows[i].u = 0.0f;
			}
			CHECK_OK(run_op_pen(g_be, run, l, vocab, 1, rows, n, pen, pz.n), &err);
			for (int i = 0; i < n; i++)
				op[run->tokens_h[i]]++;
		}
		lp = penalised(l, vocab, &pz);
		ref_build(&r, lp, vocab, &base);
		stat_h = chi_square(host, n_draws, &r, &df, &out_h);
		stat_o = chi_square(op, n_draws, &r, &df, &out_o);
		bound = df + 6 * sqrt(2.0 * df) + 10;
		ref_free(&r);
		free(lp);
		CHECK_MSG(out_h == 0 && out_o == 0,
		          "case %d: %d host and %d op draws outside the kept set", k, out_h, out_o);
		CHECK_MSG(stat_h <= bound, "case %d: host chi-square %g over %d df (bound %g)", k,
		          stat_h, df, bound);
		CHECK_MSG(stat_o <= bound, "case %d: op chi-square %g over %d df (bound %g)", k,
		          stat_o, df, bound);
	}
	free(l);
	free(scratch);
	free(host);
	free(op);
	free(rows);
	free(run);
}

/* The entries the engine sends (lp_sampler_penalty_entries) bring the
 * request's logit bias and penalties to the op: greedy gives the host
 * sampler's token, the logprobs stay the raw row's, and at temperature 1
 * a +100 bias forces its token for any u while -100 bans the best one. */
static void test_logit_bias_entries_match_host(void)
{
	const int vocab = 49152, n = N_PENS;
	float *l = malloc((size_t)n * vocab * sizeof(float));
	float *scratch = malloc((size_t)vocab * sizeof(float));
	struct lp_sample_penalty *pen = malloc((size_t)n * 128 * sizeof(*pen));
	struct lp_sample_row rows[MAX_ROWS];
	struct run *run = malloc(sizeof(*run));
	struct lp_err err = {0};
	char msg[LP_ERR_MSG_MAX];
	int32_t want[N_PENS];
	int n_pen = 0, biased = 0;

	for (size_t i = 0; i < (size_t)n * vocab; i++)
		l[i] = nrand(3.0f);
	for (int r = 0; r < n; r++) {
		const float *row = l + (size_t)r * vocab;
		struct lp_sampling_params p;
		struct lp_sampler s;
		struct history h;
		int k;

		make_history(&h, HIST_BIASED, row, vocab, 6.0f);
		lp_sampling_params_default(&p);
		p.temperature = 0.0f;
		p.repetition_penalty = g_pens[r].rep;
		p.frequency_penalty = g_pens[r].freq;
		p.presence_penalty = g_pens[r].pres;
		CHECK_OK(host_with_history(&s, &p, vocab, &h, &err), &err);
		CHECK(lp_sampler_has_penalties(&s));
		k = lp_sampler_penalty_entries(&s, pen + n_pen, 128);
		CHECK(k > 0);
		want[r] = host_sample(row, vocab, &p, &s, scratch);
		lp_sampler_release(&s);
		rows[r] = greedy_row(3);
		rows[r].repetition_penalty = p.repetition_penalty;
		rows[r].frequency_penalty = p.frequency_penalty;
		rows[r].presence_penalty = p.presence_penalty;
		rows[r].pen_off = n_pen;
		rows[r].pen_n = k;
		n_pen += k;
		for (int j = 0; j < h.n_bias; j++)
			biased += h.bias[j].token == want[r];
	}
	CHECK_OK(run_op_pen(g_be, run, l, vocab, n, rows, n, pen, n_pen), &err);
	CHECK_EQ_INT(status_of(g_be, msg, sizeof(msg)), 0);
	for (int r = 0; r < n; r++) {
		const float *row = l + (size_t)r * vocab;
		int32_t tok = run->tokens_h[r];

		CHECK_MSG(tok == want[r], "row %d: %d, host %d", r, tok, want[r]);
		CHECK_MSG(fabs(run->logprob_h[r] - ref_logprob(row, vocab, tok)) <= 1e-5,
		          "row %d: logprob %g, want the raw row's %g", r, (double)run->logprob_h[r],
		          ref_logprob(row, vocab, tok));
	}
	CHECK_MSG(biased >= 1, "no row chose a biased token");

	/* temperature 1: +100 on a poor token forces it, -100 on the best
	 * bans it, whatever u */
	{
		const float *row = l;
		int32_t best = 0, poor = 12345;
		struct lp_sample_penalty two[2];

		for (int i = 1; i < vocab; i++)
			best = row[i] > row[best] ? i : best;
		two[0] = (struct lp_sample_penalty){poor, 0, 0, 100.0f};
		two[1] = (struct lp_sample_penalty){best, 0, 0, -100.0f};
		for (int i = 0; i < MAX_ROWS; i++) {
			rows[i] = mkrow(1.0f, 1.0f, 0.0f, 0, (float)i / MAX_ROWS, 1);
			rows[i].pen_n = 1;
		}
		CHECK_OK(run_op_pen(g_be, run, row, vocab, 1, rows, MAX_ROWS, two, 1), &err);
		for (int i = 0; i < MAX_ROWS; i++)
			CHECK_MSG(run->tokens_h[i] == poor, "u %g: token %d, not the forced %d",
			          (double)rows[i].u, run->tokens_h[i], poor);
		/* the logprob and top-1 are the raw row's */
		CHECK_EQ_INT(run->top_ids_h[0], best);
		for (int i = 0; i < MAX_ROWS; i++) {
			rows[i] = mkrow(1.0f, 1.0f, 0.0f, 0, (float)i / MAX_ROWS, 0);
			rows[i].pen_off = 1;
			rows[i].pen_n = 1;
		}
		CHECK_OK(run_op_pen(g_be, run, row, vocab, 1, rows, MAX_ROWS, two, 2), &err);
		for (int i = 0; i < MAX_ROWS; i++)
			CHECK_MSG(run->tokens_h[i] != best, "u %g: the banned token %d",
			          (double)rows[i].u, best);
	}

	/* a bias that is not finite is a bad entry: the row is refused */
	{
		struct lp_backend_limits lim = {
		    .vocab = vocab, .max_out = 4, .max_logprobs = MAX_LOGPROBS};
		struct lp_sample_penalty bad = {5, 0, 0, NAN};
		struct lp_backend *be = NULL;
		size_t bytes;

		rows[0] = greedy_row(0);
		rows[0].pen_n = 1;
		CHECK_OK(lp_backend_cpu_new(&be, 1, &err), &err);
		CHECK_OK(be->ops->reserve(be->ctx, &lim, &bytes, &err), &err);
		CHECK_OK(run_op_pen(be, run, l, vocab, 1, rows, 1, &bad, 1), &err);
		CHECK_EQ_INT(status_of(be, msg, sizeof(msg)), -EINVAL);
		lp_backend_destroy(be);
		CHECK_MSG(strstr(msg, "penalty entry 0: token 5, count 0, bias nan"),
		          "status names the bias: %s", msg);
		CHECK_EQ_INT(run->tokens_h[0], 0);
	}
	free(l);
	free(scratch);
	free(pen);
	free(run);
}

/* Penalties out of range and bad entries: the failure is recorded (naming
 * the row, and the entry), the row gets token 0 and logprob -inf, the
 * other rows are sampled as usual. A row without entries reads none of
 * its penalty fields. */
static void test_penalties_bad(void)
{
	const int vocab = 100;
	struct lp_backend_limits lim = {
	    .vocab = vocab, .max_out = 16, .max_logprobs = MAX_LOGPROBS};
	struct lp_sample_penalty pen[2 * 100 + 8];
	struct lp_sample_row rows[16];
	struct run *run = malloc(sizeof(*run));
	struct lp_err err = {0};
	float *l = random_row(vocab, 1.0f);
	char msg[LP_ERR_MSG_MAX];
	size_t bytes;
	int32_t best = 0;
	const int n = 15;
	static const bool good[15] = {true,  false, false, false, false, false, false, false,
	                              false, false, false, false, false, true,  true};
	struct penalties one = pens_of(0, NULL, 1);

	for (int i = 0; i < 2 * vocab + 8; i++)
		pen[i] = (struct lp_sample_penalty){i % vocab, 1, 0, 0.0f};
	pen[0] = (struct lp_sample_penalty){7, 2, 1, 0.0f};
	pen[1] = (struct lp_sample_penalty){-1, 1, 0, 0.0f};
	pen[2] = (struct lp_sample_penalty){vocab, 1, 0, 0.0f};
	pen[3] = (struct lp_sample_penalty){9, -1, 0, 0.0f};
	for (int r = 0; r < n; r++)
		rows[r] = with_penalties(greedy_row(2), &one, 0);
	rows[1].pen_off = 1;
	rows[2].pen_off = 2;
	rows[3].pen_off = 3;
	rows[4].pen_off = 8;
	rows[4].pen_n = vocab + 1;
	rows[5].pen_n = -1;
	rows[6].pen_off = -1;
	rows[7].repetition_penalty = 0.0f;
	rows[8].repetition_penalty = INFINITY;
	rows[9].repetition_penalty = NAN;
	rows[10].frequency_penalty = 2.5f;
	rows[11].presence_penalty = -2.01f;
	rows[12].frequency_penalty = NAN;
	rows[13].pen_off = 4; /* entries 4 .. 103: distinct tokens */
	rows[13].pen_n = 100;
	rows[14] = greedy_row(2); /* no entries: its zero fields are not read */
	rows[14].repetition_penalty = 0.0f;
	rows[14].frequency_penalty = 9.0f;
	for (int i = 1; i < vocab; i++)
		best = l[i] > l[best] ? i : best;
	for (int pass = 0; pass < 2; pass++) {
		struct lp_backend *be = NULL;

		CHECK_OK(lp_backend_cpu_new(&be, 2, &err), &err);
		CHECK_OK(be->ops->reserve(be->ctx, &lim, &bytes, &err), &err);
		if (pass == 0) {
			CHECK_OK(run_op_pen(be, run, l, vocab, 1, rows, n, pen, 2 * vocab + 8),
			         &err);
			CHECK_EQ_INT(status_of(be, msg, sizeof(msg)), -EINVAL);
			CHECK_MSG(strstr(msg, "sample: row 1: penalty entry 0: token -1"),
			          "status names the row and the entry: %s", msg);
			for (int r = 0; r < n; r++) {
				if (good[r])
					continue;
				CHECK_MSG(run->tokens_h[r] == 0 && run->logprob_h[r] == -INFINITY,
				          "bad row %d: token %d, logprob %g", r, run->tokens_h[r],
				          (double)run->logprob_h[r]);
			}
			CHECK_EQ_INT(run->tokens_h[14], best);
			CHECK_MSG(run->tokens_h[13] != 0, "row 13: token 0");
		} else {
			/* penalties out of range; then entries but no pen array */
			CHECK_OK(run_op_pen(be, run, l, vocab, 1, rows + 7, 1, pen, 2 * vocab + 8),
			         &err);
			CHECK_EQ_INT(status_of(be, msg, sizeof(msg)), -EINVAL);
			CHECK_MSG(strstr(msg, "sample: row 0: repetition_penalty 0"),
			          "status names the penalty: %s", msg);
			lp_backend_destroy(be);
			CHECK_OK(lp_backend_cpu_new(&be, 2, &err), &err);
			CHECK_OK(be->ops->reserve(be->ctx, &lim, &bytes, &err), &err);
			CHECK_OK(run_op_pen(be, run, l, vocab, 1, rows, 1, NULL, 0), &err);
			CHECK_EQ_INT(status_of(be, msg, sizeof(msg)), -EINVAL);
			CHECK_EQ_INT(run->tokens_h[0], 0);
		}
		lp_backend_destroy(be);
	}
	free(run);
	free(l);
}

/* The same rows give the same bits with one thread and three, and a row
 * gives the same alone as in a batch. The portable path (no AVX2) gives the
 * same tokens and top-N ids; its logprobs sum the log-softmax in another
 * order, within 1e-6. Two rows in three have penalties. */
static void test_batch_and_threads(void)
{
	const int vocab = 49152, n_rows = 24;
	float *l = malloc((size_t)n_rows * vocab * sizeof(float));
	struct lp_sample_row rows[24];
	struct lp_sample_penalty *pen = malloc((size_t)n_rows * 128 * sizeof(*pen));
	struct run *a = malloc(sizeof(*a)), *b = malloc(sizeof(*b)), *one = malloc(sizeof(*one));
	struct lp_err err = {0};
	int n_pen = 0;

	for (size_t i = 0; i < (size_t)n_rows * vocab; i++)
		l[i] = nrand(3.0f);
	for (int r = 0; r < n_rows; r++) {
		const struct params_case *c = &g_cases[r % N_CASES];
		rows[r] = mkrow(c->t, c->top_p, c->min_p, c->top_k, (float)urand(), r % 6);
		if (r % 3) {
			struct history h;
			struct penalties pz;

			make_history(&h, r % N_HIST, l + (size_t)r * vocab, vocab, 6.0f);
			pz = pens_of(r % N_PENS, pen + n_pen, entries_of(&h, vocab, pen + n_pen));
			rows[r] = with_penalties(rows[r], &pz, n_pen);
			n_pen += pz.n;
		}
	}
	CHECK_OK(run_op_pen(g_be, a, l, vocab, n_rows, rows, n_rows, pen, n_pen), &err);
	CHECK_OK(run_op_pen(g_be1, b, l, vocab, n_rows, rows, n_rows, pen, n_pen), &err);
	CHECK(!memcmp(a->tokens_h, b->tokens_h, sizeof(int32_t) * n_rows));
	CHECK(!memcmp(a->logprob_h, b->logprob_h, sizeof(float) * n_rows));
	CHECK(!memcmp(a->top_ids_h, b->top_ids_h, sizeof(int32_t) * n_rows * MAX_LOGPROBS));
	CHECK(!memcmp(a->top_lp_h, b->top_lp_h, sizeof(float) * n_rows * MAX_LOGPROBS));
	CHECK_OK(run_op_pen(g_be_scalar, b, l, vocab, n_rows, rows, n_rows, pen, n_pen), &err);
	CHECK(!memcmp(a->tokens_h, b->tokens_h, sizeof(int32_t) * n_rows));
	CHECK(!memcmp(a->top_ids_h, b->top_ids_h, sizeof(int32_t) * n_rows * MAX_LOGPROBS));
	for (int r = 0; r < n_rows; r++)
		CHECK_NEAR(a->logprob_h[r], b->logprob_h[r], 1e-6);
	for (int r = 0; r < n_rows; r += 5) {
		struct lp_sample_row alone = rows[r];

		/* its own slice, at 0 */
		alone.pen_off = 0;
		CHECK_OK(run_op_pen(g_be, one, l + (size_t)r * vocab, vocab, 1, &alone, 1,
		                    pen + rows[r].pen_off, rows[r].pen_n),
		         &err);
		CHECK_EQ_INT(one->tokens_h[0], a->tokens_h[r]);
		CHECK(!memcmp(&one->logprob_h[0], &a->logprob_h[r], sizeof(float)));
	}
	free(pen);
	free(a);
	free(b);
	free(one);
	free(l);
}

/* Constrained decoding: after the mask_logits op, whatever the sampling
 * parameters and u, the token is one the mask allows, its logprob is that
 * of the constrained distribution (log-softmax over the allowed tokens of
 * the raw logits) and the top logprobs list allowed tokens only. The best
 * raw logits are forbidden, so an unmasked row would pick them. */
static void test_masked_rows(void)
{
	const int vocab = 5000, words = (vocab + 31) / 32, n = 8;
	float *l = random_row(vocab, 3.0f);
	float *masked = malloc((size_t)vocab * sizeof(float));
	uint32_t *mask = calloc((size_t)words, sizeof(uint32_t));
	int32_t row_mask[1] = {0};
	struct lp_tensor t = {masked, LP_DTYPE_F32, 1, vocab};
	struct lp_mask_args ma = {&t, mask, row_mask, 1, 1, words};
	struct lp_sample_row rows[8] = {
	    greedy_row(5),
	    mkrow(1.0f, 1.0f, 0.0f, 0, 0.01f, 5),
	    mkrow(1.0f, 1.0f, 0.0f, 0, 0.5f, 5),
	    mkrow(1.0f, 1.0f, 0.0f, 0, 0.99f, 5),
	    mkrow(0.7f, 0.9f, 0.0f, 0, 0.8f, 5),
	    mkrow(1.3f, 1.0f, 0.0f, 20, 0.95f, 5),
	    mkrow(1.0f, 1.0f, 0.05f, 0, 0.999f, 5),
	    mkrow(2.0f, 0.5f, 0.0f, 3, 0.6f, 5),
	};
	struct run *run = malloc(sizeof(*run));
	struct lp_err err = {0};
	double m = -INFINITY, z = 0;

	/* about a third of the tokens, never the ten best raw logits */
	for (int i = 0; i < vocab; i++)
		if (rng_next() % 3 == 0)
			mask[i / 32] |= 1u << (i % 32);
	for (int k = 0; k < 10; k++) {
		int id = 13 + 97 * k;

		l[id] = 20.0f + (float)k;
		mask[id / 32] &= ~(1u << (id % 32));
	}
	memcpy(masked, l, (size_t)vocab * sizeof(float));
	g_be->ops->mask_logits(g_be->ctx, &ma);
	CHECK_OK(g_be->ops->status(g_be->ctx, &err), &err);
	for (int i = 0; i < vocab; i++)
		if (mask[i / 32] >> (i % 32) & 1u)
			m = l[i] > m ? l[i] : m;
	for (int i = 0; i < vocab; i++)
		if (mask[i / 32] >> (i % 32) & 1u)
			z += exp((double)l[i] - m);
	CHECK_OK(run_op(g_be, run, masked, vocab, 1, rows, n), &err);
	for (int r = 0; r < n; r++) {
		int32_t tok = run->tokens_h[r];

		CHECK_MSG(tok >= 0 && tok < vocab && (mask[tok / 32] >> (tok % 32) & 1u),
		          "row %d: token %d is forbidden", r, tok);
		CHECK_NEAR(run->logprob_h[r], (double)l[tok] - m - log(z), 1e-5);
		for (int j = 0; j < 5; j++) {
			int32_t id = run->top_ids_h[r * MAX_LOGPROBS + j];

			CHECK_MSG(id >= 0 && (mask[id / 32] >> (id % 32) & 1u),
			          "row %d: top id %d is forbidden", r, id);
		}
	}
	free(run);
	free(mask);
	free(masked);
	free(l);
}

int main(void)
{
	struct lp_err err = {0};
	struct lp_backend_limits lim = {
	    .vocab = BIG_VOCAB, .max_out = MAX_ROWS, .max_logprobs = MAX_LOGPROBS};
	size_t bytes;

	TEST_MAIN_BEGIN("test-cpu-sample");
	unsetenv("LP_CPU_NO_AVX2");
	if (lp_backend_cpu_new(&g_be, 3, &err) || lp_backend_cpu_new(&g_be1, 1, &err) ||
	    setenv("LP_CPU_NO_AVX2", "1", 1) || lp_backend_cpu_new(&g_be_scalar, 2, &err) ||
	    unsetenv("LP_CPU_NO_AVX2") || g_be->ops->reserve(g_be->ctx, &lim, &bytes, &err) ||
	    g_be1->ops->reserve(g_be1->ctx, &lim, &bytes, &err) ||
	    g_be_scalar->ops->reserve(g_be_scalar->ctx, &lim, &bytes, &err)) {
		printf("FAIL test-cpu-sample:setup: %s\n", err.msg);
		return 1;
	}

	RUN(test_greedy_matches_host);
	RUN(test_draws_at_chosen_u);
	RUN(test_flat_row);
	RUN(test_distribution_matches_host);
	RUN(test_top_logprobs);
	RUN(test_bad_rows);
	RUN(test_penalties_greedy_matches_host);
	RUN(test_penalties_draws_at_chosen_u);
	RUN(test_penalties_distribution_matches_host);
	RUN(test_penalties_bad);
	RUN(test_logit_bias_entries_match_host);
	RUN(test_batch_and_threads);
	RUN(test_masked_rows);

	lp_backend_destroy(g_be);
	lp_backend_destroy(g_be1);
	lp_backend_destroy(g_be_scalar);
	TEST_MAIN_END();
}
