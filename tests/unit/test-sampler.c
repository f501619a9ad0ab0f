/* Tests for agent/engine/sampler.c: what each sampling option lets through,
 * that frequencies follow the (truncated, renormalised) softmax, seeds,
 * penalties, logit bias, parameter errors, and stop strings over streamed
 * text. */
#include "agent/engine/sampler.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>

#include "tests/test.h"

/* ---- helpers ------------------------------------------------------------ */

/* The test's own generator for logits and text (not the sampler's). */
static uint64_t test_rng_state = 12345;

static uint64_t test_rand(void)
{
	uint64_t z = (test_rng_state += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static double test_uniform(void)
{
	return ((double)(test_rand() >> 11) + 0.5) * 0x1.0p-53;
}

/* Roughly normal with standard deviation sd (sum of uniforms). */
static float test_normal(float sd)
{
	double x = 0.0;

	for (int i = 0; i < 12; i++)
		x += test_uniform();
	return (float)((x - 6.0) * sd);
}

static struct lp_sampling_params params(float temperature, int top_k, float top_p, float min_p)
{
	struct lp_sampling_params p;

	lp_sampling_params_default(&p);
	p.temperature = temperature;
	p.top_k = top_k;
	p.top_p = top_p;
	p.min_p = min_p;
	p.has_seed = true;
	p.seed = 42;
	return p;
}

/* Draws n tokens, each from a fresh copy of logits, into counts[vocab].
 * Returns false (leaving a message in why) on a token outside the vocab. */
static bool draw_many(const struct lp_sampling_params *p, const float *logits, int vocab, int n,
                      long *counts, char *why, size_t why_len)
{
	struct lp_sampler s;
	struct lp_err err = {0};
	float *work = malloc(sizeof(float) * (size_t)vocab);
	bool ok = true;

	if (!work || lp_sampler_init(&s, p, vocab, &err) != 0) {
		snprintf(why, why_len, "setup failed: %s", err.msg);
		free(work);
		return false;
	}
	memset(counts, 0, sizeof(long) * (size_t)vocab);
	for (int i = 0; i < n; i++) {
		int32_t t;

		memcpy(work, logits, sizeof(float) * (size_t)vocab);
		t = lp_sampler_sample(&s, work);
		if (t < 0 || t >= vocab) {
			snprintf(why, why_len, "token %d outside a vocabulary of %d", t, vocab);
			ok = false;
			break;
		}
		counts[t]++;
	}
	lp_sampler_release(&s);
	free(work);
	return ok;
}

/* Pearson's chi-square of counts against expected probabilities prob[]
 * (which sum to 1 over the kept tokens). A count on a token with probability
 * 0 is reported as infinity. */
static double chi_square(const long *counts, const double *prob, int vocab, long n, int *dof)
{
	double chi = 0.0;

	*dof = -1;
	for (int i = 0; i < vocab; i++) {
		double e = prob[i] * (double)n;

		if (prob[i] == 0.0) {
			if (counts[i])
				return INFINITY;
			continue;
		}
		chi += ((double)counts[i] - e) * ((double)counts[i] - e) / e;
		(*dof)++;
	}
	return chi;
}

/* Softmax of logits / t restricted to keep[] (all when keep is NULL). */
static void softmax_ref(const float *logits, int vocab, float t, const bool *keep, double *out)
{
	double mx = -INFINITY, sum = 0.0;

	for (int i = 0; i < vocab; i++)
		if ((!keep || keep[i]) && logits[i] / t > mx)
			mx = logits[i] / t;
	for (int i = 0; i < vocab; i++) {
		out[i] = (!keep || keep[i]) ? exp(logits[i] / t - mx) : 0.0;
		sum += out[i];
	}
	for (int i = 0; i < vocab; i++)
		out[i] /= sum;
}

/* Critical values of chi-square at p = 1e-4 are about dof + 4.5 sqrt(dof)
 * for the sizes used here; the seeds are fixed, so these never flake. */
static double chi_limit(int dof)
{
	return dof + 4.5 * sqrt(2.0 * dof) + 6.0;
}

/* ---- parameters --------------------------------------------------------- */

static void test_params_default(void)
{
	struct lp_sampling_params p;
	struct lp_err err = {0};

	memset(&p, 0x5a, sizeof(p));
	lp_sampling_params_default(&p);
	CHECK(p.temperature == 1.0f);
	CHECK(p.top_p == 1.0f);
	CHECK(p.top_k == 0);
	CHECK(p.min_p == 0.0f);
	CHECK(p.presence_penalty == 0.0f);
	CHECK(p.frequency_penalty == 0.0f);
	CHECK(p.repetition_penalty == 1.0f);
	CHECK(!p.has_seed);
	CHECK_OK(lp_sampling_params_check(&p, &err), &err);
}

static void test_params_check_messages(void)
{
	struct {
		const char *field;
		float value;
		const char *msg;
	} bad[] = {
	    {"temperature", -0.5f, "'temperature' must be a finite number >= 0, got -0.5"},
	    {"temperature", NAN, "'temperature' must be a finite number >= 0, got nan"},
	    {"temperature", INFINITY, "'temperature' must be a finite number >= 0, got inf"},
	    {"top_p", 1.5f, "'top_p' must be in (0, 1], got 1.5"},
	    {"top_p", 0.0f, "'top_p' must be in (0, 1], got 0"},
	    {"top_p", NAN, "'top_p' must be in (0, 1], got nan"},
	    {"min_p", -0.25f, "'min_p' must be in [0, 1], got -0.25"},
	    {"min_p", 1.5f, "'min_p' must be in [0, 1], got 1.5"},
	    {"presence_penalty", 2.5f, "'presence_penalty' must be in [-2, 2], got 2.5"},
	    {"presence_penalty", -3.0f, "'presence_penalty' must be in [-2, 2], got -3"},
	    {"frequency_penalty", -2.5f, "'frequency_penalty' must be in [-2, 2], got -2.5"},
	    {"repetition_penalty", 0.0f, "'repetition_penalty' must be a finite number > 0, got 0"},
	    {"repetition_penalty", -1.0f,
	     "'repetition_penalty' must be a finite number > 0, got -1"},
	};

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		struct lp_sampling_params p;
		struct lp_err err = {0};
		int rc;

		lp_sampling_params_default(&p);
		if (!strcmp(bad[i].field, "temperature"))
			p.temperature = bad[i].value;
		else if (!strcmp(bad[i].field, "top_p"))
			p.top_p = bad[i].value;
		else if (!strcmp(bad[i].field, "min_p"))
			p.min_p = bad[i].value;
		else if (!strcmp(bad[i].field, "presence_penalty"))
			p.presence_penalty = bad[i].value;
		else if (!strcmp(bad[i].field, "frequency_penalty"))
			p.frequency_penalty = bad[i].value;
		else
			p.repetition_penalty = bad[i].value;
		rc = lp_sampling_params_check(&p, &err);
		CHECK_EQ_INT(rc, -EINVAL);
		CHECK_EQ_INT(err.code, -EINVAL);
		CHECK_EQ_STR(err.msg, bad[i].msg);
	}
	{
		struct lp_sampling_params p;
		struct lp_err err = {0};

		lp_sampling_params_default(&p);
		p.top_k = -2;
		CHECK_EQ_INT(lp_sampling_params_check(&p, &err), -EINVAL);
		CHECK_EQ_STR(err.msg,
		             "'top_k' must be at least 1, or 0 or -1 to turn it off, got -2");
	}
}

static void test_params_check_accepts_edges(void)
{
	struct lp_sampling_params p;
	struct lp_err err = {0};

	lp_sampling_params_default(&p);
	p.temperature = 0.0f;
	p.top_p = 1.0f;
	p.top_k = -1;
	p.min_p = 1.0f;
	p.presence_penalty = -2.0f;
	p.frequency_penalty = 2.0f;
	p.repetition_penalty = 0.01f;
	CHECK_OK(lp_sampling_params_check(&p, &err), &err);
	p.top_k = 1;
	p.min_p = 0.0f;
	p.top_p = 1e-6f;
	p.temperature = 100.0f;
	CHECK_OK(lp_sampling_params_check(&p, &err), &err);
}

static void test_init_rejects_bad_input(void)
{
	struct lp_sampling_params p;
	struct lp_sampler s;
	struct lp_err err = {0};

	lp_sampling_params_default(&p);
	CHECK_EQ_INT(lp_sampler_init(&s, &p, 0, &err), -EINVAL);
	CHECK_EQ_STR(err.msg, "'vocab' must be positive, got 0");
	lp_sampler_release(&s);
	p.top_p = 2.0f;
	CHECK_EQ_INT(lp_sampler_init(&s, &p, 10, &err), -EINVAL);
	CHECK_EQ_STR(err.msg, "'top_p' must be in (0, 1], got 2");
	lp_sampler_release(&s);
	lp_sampler_release(&s); /* twice is harmless */
}

/* ---- greedy ------------------------------------------------------------- */

static void test_greedy_picks_argmax(void)
{
	struct lp_sampling_params p = params(0.0f, 0, 1.0f, 0.0f);
	struct lp_sampler s;
	struct lp_err err = {0};
	float a[] = {0.1f, -3.0f, 2.5f, 7.0f, 1.0f, 6.999f};
	float ties[] = {1.0f, 4.0f, -1.0f, 4.0f, 4.0f};
	float with_nan[] = {NAN, 1.0f, NAN, 3.0f, 2.0f};
	float all_low[] = {-INFINITY, -INFINITY, -INFINITY};

	CHECK_OK(lp_sampler_init(&s, &p, 6, &err), &err);
	for (int i = 0; i < 5; i++)
		CHECK_EQ_INT(lp_sampler_sample(&s, a), 3);
	lp_sampler_release(&s);

	CHECK_OK(lp_sampler_init(&s, &p, 5, &err), &err);
	CHECK_EQ_INT(lp_sampler_sample(&s, ties), 1); /* ties go to the lowest id */
	CHECK_EQ_INT(lp_sampler_sample(&s, with_nan), 3);
	lp_sampler_release(&s);

	CHECK_OK(lp_sampler_init(&s, &p, 3, &err), &err);
	CHECK_EQ_INT(lp_sampler_sample(&s, all_low), 0);
	lp_sampler_release(&s);
}

/* top_k 1 is greedy too, whatever the temperature. */
static void test_top_k_one_is_greedy(void)
{
	struct lp_sampling_params p = params(5.0f, 1, 1.0f, 0.0f);
	float logits[] = {0.1f, 0.3f, 0.2f, 0.25f};
	long counts[4];
	char why[LP_ERR_MSG_MAX + 64] = "";

	CHECK_MSG(draw_many(&p, logits, 4, 500, counts, why, sizeof(why)), "%s", why);
	CHECK_EQ_INT(counts[1], 500);
}

/* Every option on a vocabulary of one token (and on -inf logits, which
 * must never be drawn while another token has a chance). */
static void test_tiny_vocab_and_masked_tokens(void)
{
	const struct lp_sampling_params cases[] = {
	    params(1.0f, 0, 1.0f, 0.0f), params(0.7f, 0, 0.9f, 0.0f), params(1.0f, 5, 1.0f, 0.0f),
	    params(1.0f, 0, 1.0f, 0.5f), params(1.0f, 3, 0.5f, 0.1f), params(0.0f, 0, 1.0f, 0.0f),
	};
	float masked[] = {-INFINITY, 0.0f, -INFINITY, NAN, -0.5f, -INFINITY, 0.25f};

	for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
		long counts[7];
		float one = 3.0f;
		char why[LP_ERR_MSG_MAX + 64] = "";

		CHECK_MSG(draw_many(&cases[c], &one, 1, 20, counts, why, sizeof(why)), "%s", why);
		CHECK_EQ_INT(counts[0], 20);
		CHECK_MSG(draw_many(&cases[c], masked, 7, 3000, counts, why, sizeof(why)), "%s",
		          why);
		CHECK_MSG(counts[0] + counts[2] + counts[3] + counts[5] == 0,
		          "case %zu drew a token with a -inf or NaN logit", c);
	}
}

/* ---- distributions ------------------------------------------------------ */

static void test_temperature_follows_softmax(void)
{
	const float logits[] = {1.0f, 2.0f, 0.5f, -1.0f, 3.0f, 0.0f, -4.0f};
	const int vocab = 7, n = 200000;
	const float temps[] = {1.0f, 0.5f, 2.0f};

	for (size_t t = 0; t < sizeof(temps) / sizeof(temps[0]); t++) {
		struct lp_sampling_params p = params(temps[t], 0, 1.0f, 0.0f);
		long counts[7];
		double prob[7], chi;
		char why[LP_ERR_MSG_MAX + 64] = "";
		int dof;

		p.seed = 1000 + t;
		CHECK_MSG(draw_many(&p, logits, vocab, n, counts, why, sizeof(why)), "%s", why);
		softmax_ref(logits, vocab, temps[t], NULL, prob);
		chi = chi_square(counts, prob, vocab, n, &dof);
		CHECK_MSG(chi < chi_limit(dof), "temperature %g: chi-square %g with %d dof",
		          (double)temps[t], chi, dof);
	}
}

static void test_top_k_keeps_the_k_best(void)
{
	enum { V = 1000, K = 10, N = 50000 };
	static float logits[V];
	static long counts[V];
	static double prob[V];
	static bool keep[V];
	struct lp_sampling_params p = params(1.0f, K, 1.0f, 0.0f);
	char why[LP_ERR_MSG_MAX + 64] = "";
	double chi;
	int dof;

	for (int i = 0; i < V; i++)
		logits[i] = test_normal(1.0f);
	/* The k best by a plain count of who beats whom. */
	for (int i = 0; i < V; i++) {
		int better = 0;

		for (int j = 0; j < V; j++)
			better += logits[j] > logits[i] || (logits[j] == logits[i] && j < i);
		keep[i] = better < K;
	}
	CHECK_MSG(draw_many(&p, logits, V, N, counts, why, sizeof(why)), "%s", why);
	for (int i = 0; i < V; i++)
		CHECK_MSG(keep[i] || counts[i] == 0, "token %d outside the top %d drawn %ld times",
		          i, K, counts[i]);
	softmax_ref(logits, V, 1.0f, keep, prob);
	chi = chi_square(counts, prob, V, N, &dof);
	CHECK_EQ_INT(dof, K - 1);
	CHECK_MSG(chi < chi_limit(dof), "chi-square %g with %d dof", chi, dof);
}

/* Logits with known probabilities {0.5, 0.3, 0.15, 0.05}, in shuffled ids. */
static void test_top_p_keeps_the_nucleus(void)
{
	const int order[] = {2, 0, 3, 1}; /* id of the most, 2nd, ... likely */
	const double pr[] = {0.5, 0.3, 0.15, 0.05};
	const struct {
		float top_p;
		int size;
	} cases[] = {{0.4f, 1}, {0.75f, 2}, {0.85f, 3}, {0.97f, 4}, {1e-6f, 1}};
	float logits[4];

	for (int r = 0; r < 4; r++)
		logits[order[r]] = logf((float)pr[r]);
	for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
		struct lp_sampling_params p = params(1.0f, 0, cases[c].top_p, 0.0f);
		long counts[4];
		double prob[4] = {0}, mass = 0.0, chi;
		char why[LP_ERR_MSG_MAX + 64] = "";
		int dof;

		CHECK_MSG(draw_many(&p, logits, 4, 40000, counts, why, sizeof(why)), "%s", why);
		for (int r = 0; r < cases[c].size; r++)
			mass += pr[r];
		for (int r = 0; r < cases[c].size; r++)
			prob[order[r]] = pr[r] / mass;
		chi = chi_square(counts, prob, 4, 40000, &dof);
		CHECK_MSG(chi < chi_limit(dof > 0 ? dof : 1),
		          "top_p %g: chi-square %g (counts %ld %ld %ld %ld)",
		          (double)cases[c].top_p, chi, counts[0], counts[1], counts[2], counts[3]);
	}
}

static void test_min_p_drops_unlikely_tokens(void)
{
	const double pr[] = {0.06, 0.4, 0.04, 0.3, 0.2};
	const struct {
		float min_p;
		bool keep[5];
	} cases[] = {
	    {0.2f, {false, true, false, true, true}},  /* below 0.08 goes */
	    {0.6f, {false, true, false, true, false}}, /* below 0.24 goes */
	    {1.0f, {false, true, false, false, false}},
	    {0.05f, {true, true, true, true, true}},
	};
	float logits[5];

	for (int i = 0; i < 5; i++)
		logits[i] = logf((float)pr[i]);
	for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
		struct lp_sampling_params p = params(1.0f, 0, 1.0f, cases[c].min_p);
		long counts[5];
		double prob[5], chi;
		char why[LP_ERR_MSG_MAX + 64] = "";
		int dof;

		CHECK_MSG(draw_many(&p, logits, 5, 40000, counts, why, sizeof(why)), "%s", why);
		softmax_ref(logits, 5, 1.0f, cases[c].keep, prob);
		chi = chi_square(counts, prob, 5, 40000, &dof);
		CHECK_MSG(chi < chi_limit(dof > 0 ? dof : 1), "min_p %g: chi-square %g",
		          (double)cases[c].min_p, chi);
	}
}

/* Top-p applies to the top-k distribution renormalised: with probabilities
 * {0.4, 0.3, 0.2, 0.1}, k 3 and top_p 0.75 keep two tokens (0.44 + 0.33),
 * where top_p alone would keep three (0.4 + 0.3 + 0.2). */
static void test_top_k_then_top_p(void)
{
	const double pr[] = {0.4, 0.3, 0.2, 0.1};
	float logits[4];
	long counts[4];
	char why[LP_ERR_MSG_MAX + 64] = "";
	struct lp_sampling_params p = params(1.0f, 3, 0.75f, 0.0f);

	for (int i = 0; i < 4; i++)
		logits[i] = logf((float)pr[i]);
	CHECK_MSG(draw_many(&p, logits, 4, 20000, counts, why, sizeof(why)), "%s", why);
	CHECK(counts[0] > 0 && counts[1] > 0);
	CHECK_EQ_INT(counts[2], 0);
	CHECK_EQ_INT(counts[3], 0);
	p.top_k = 0;
	CHECK_MSG(draw_many(&p, logits, 4, 20000, counts, why, sizeof(why)), "%s", why);
	CHECK(counts[2] > 0);
	CHECK_EQ_INT(counts[3], 0);
}

/* Reference truncation with a full sort, for a real-sized vocabulary: the
 * set of tokens that may be drawn. Same float steps as the sampler. */
static float *ref_x;

static int ref_cmp(const void *a, const void *b)
{
	int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;

	if (ref_x[i] != ref_x[j])
		return ref_x[i] > ref_x[j] ? -1 : 1;
	return i < j ? -1 : 1;
}

static void reference_keep(const float *logits, int vocab, const struct lp_sampling_params *p,
                           float *x, int32_t *order, bool *keep)
{
	float m = -INFINITY;
	int n;
	double total = 0.0, acc = 0.0;

	for (int i = 0; i < vocab; i++) {
		x[i] = logits[i] / p->temperature;
		if (x[i] > m)
			m = x[i];
		order[i] = i;
		keep[i] = false;
	}
	ref_x = x;
	qsort(order, (size_t)vocab, sizeof(*order), ref_cmp);
	n = p->top_k > 0 && p->top_k < vocab ? p->top_k : vocab;
	for (int j = 0; j < n; j++)
		total += expf(x[order[j]] - m);
	if (p->top_p < 1.0f) {
		for (int j = 0; j < n; j++) {
			acc += expf(x[order[j]] - m);
			if (acc >= (double)p->top_p * total) {
				n = j + 1;
				break;
			}
		}
	}
	for (int j = 0; j < n; j++)
		keep[order[j]] = expf(x[order[j]] - m) >= p->min_p;
}

static void test_truncation_matches_full_sort(void)
{
	enum { V = 49152, DRAWS = 150 };
	static float logits[V], work[V], x[V];
	static int32_t order[V];
	static bool keep[V];
	const struct {
		float t, top_p, min_p;
		int k;
	} cases[] = {
	    {0.7f, 0.9f, 0.0f, 0},    {1.0f, 0.5f, 0.0f, 0},  {1.0f, 0.3f, 0.0f, 0},
	    {1.0f, 1.0f, 0.0f, 50},   {1.0f, 0.5f, 0.0f, 50}, {1.3f, 1.0f, 0.05f, 0},
	    {0.8f, 0.95f, 0.02f, 0},  {1.0f, 1.0f, 0.5f, 5},  {2.0f, 0.99f, 0.0f, 0},
	    {1.0f, 0.8f, 0.01f, 200}, {0.3f, 1.0f, 1e-4f, 0},
	};

	for (int i = 0; i < V; i++)
		logits[i] = test_normal(2.5f);
	for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
		struct lp_sampling_params p =
		    params(cases[c].t, cases[c].k, cases[c].top_p, cases[c].min_p);
		struct lp_sampler s;
		struct lp_err err = {0};
		int kept = 0;

		reference_keep(logits, V, &p, x, order, keep);
		for (int i = 0; i < V; i++)
			kept += keep[i];
		CHECK_OK(lp_sampler_init(&s, &p, V, &err), &err);
		for (int d = 0; d < DRAWS; d++) {
			int32_t t;

			memcpy(work, logits, sizeof(work));
			t = lp_sampler_sample(&s, work);
			if (t < 0 || t >= V || !keep[t]) {
				lp_sampler_release(&s);
				CHECK_MSG(0, "case %zu: drew %d, outside the %d kept tokens", c, t,
				          kept);
			}
		}
		lp_sampler_release(&s);
	}
}

/* The bucketed top-p path against the softmax, with a nucleus of dozens of
 * tokens spread over several buckets. */
static void test_top_p_frequencies_wide_nucleus(void)
{
	enum { V = 300, N = 200000 };
	static float logits[V], x[V];
	static int32_t order[V];
	static bool keep[V];
	static long counts[V];
	static double prob[V];
	struct lp_sampling_params p = params(0.8f, 0, 0.9f, 0.0f);
	char why[LP_ERR_MSG_MAX + 64] = "";
	double chi, expected_low = 1e9;
	int dof;

	for (int i = 0; i < V; i++)
		logits[i] = test_normal(1.0f);
	reference_keep(logits, V, &p, x, order, keep);
	CHECK_MSG(draw_many(&p, logits, V, N, counts, why, sizeof(why)), "%s", why);
	softmax_ref(logits, V, p.temperature, keep, prob);
	for (int i = 0; i < V; i++)
		if (keep[i] && prob[i] * N < expected_low)
			expected_low = prob[i] * N;
	chi = chi_square(counts, prob, V, N, &dof);
	CHECK_MSG(dof > 20, "nucleus of only %d tokens", dof + 1);
	CHECK_MSG(expected_low > 5.0, "expected counts too low for chi-square: %g", expected_low);
	CHECK_MSG(chi < chi_limit(dof), "chi-square %g with %d dof", chi, dof);
}

/* Nearly flat logits put thousands of tokens in one bucket, so the cut is
 * found by quickselect: the set drawn must be exactly the reference one,
 * every token of it drawn (about 30 times each) and none outside it. */
static bool check_exact_set(const struct lp_sampling_params *p, const float *logits, int vocab,
                            char *why, size_t why_len)
{
	float *x = malloc(sizeof(float) * (size_t)vocab);
	int32_t *order = malloc(sizeof(int32_t) * (size_t)vocab);
	bool *keep = malloc(sizeof(bool) * (size_t)vocab);
	long *counts = malloc(sizeof(long) * (size_t)vocab);
	int size = 0;
	bool ok = false;

	if (!x || !order || !keep || !counts) {
		snprintf(why, why_len, "out of memory");
		goto out;
	}
	reference_keep(logits, vocab, p, x, order, keep);
	for (int i = 0; i < vocab; i++)
		size += keep[i];
	if (!draw_many(p, logits, vocab, 30 * size + 200, counts, why, why_len))
		goto out;
	for (int i = 0; i < vocab; i++) {
		if (keep[i] != (counts[i] > 0)) {
			snprintf(why, why_len,
			         "top_k %d top_p %g: token %d %s the %d kept is drawn %ld times",
			         p->top_k, (double)p->top_p, i, keep[i] ? "in" : "outside", size,
			         counts[i]);
			goto out;
		}
	}
	ok = true;
out:
	free(x);
	free(order);
	free(keep);
	free(counts);
	return ok;
}

static void test_exact_cut_among_near_ties(void)
{
	enum { V = 1000 };
	static float logits[V];
	const int ks[] = {25, 26, 31, 57, 100, 133};
	const float ps[] = {0.05f, 0.3f, 0.9f};
	char why[LP_ERR_MSG_MAX + 64] = "";

	for (int i = 0; i < V; i++)
		logits[i] = 0.05f * (float)test_uniform();
	for (size_t c = 0; c < sizeof(ks) / sizeof(ks[0]); c++) {
		struct lp_sampling_params p = params(1.0f, ks[c], 1.0f, 0.0f);

		CHECK_MSG(check_exact_set(&p, logits, V, why, sizeof(why)), "%s", why);
	}
	for (size_t c = 0; c < sizeof(ps) / sizeof(ps[0]); c++) {
		struct lp_sampling_params p = params(1.0f, 0, ps[c], 0.0f);

		CHECK_MSG(check_exact_set(&p, logits, V, why, sizeof(why)), "%s", why);
		p.top_k = 400; /* top-p within a top-k found by quickselect */
		CHECK_MSG(check_exact_set(&p, logits, V, why, sizeof(why)), "%s", why);
	}
}

/* The min-p threshold is sharp to 1e-5 relative, far down the distribution
 * too (which also pins down the accuracy of the exponentials). */
static void test_min_p_threshold_is_sharp(void)
{
	enum { V = 2001 };
	static float logits[V];
	const float ds[] = {-1.5f, -4.0f, -9.0f};

	for (size_t c = 0; c < sizeof(ds) / sizeof(ds[0]); c++) {
		double e = exp((double)ds[c]);

		logits[0] = 0.0f;
		for (int i = 1; i < V; i++)
			logits[i] = ds[c];
		for (int side = 0; side < 2; side++) {
			struct lp_sampling_params p =
			    params(1.0f, 0, 1.0f, (float)(e * (side ? 1.0 + 1e-5 : 1.0 - 1e-5)));
			static long counts[V];
			char why[LP_ERR_MSG_MAX + 64] = "";
			long others;

			CHECK_MSG(draw_many(&p, logits, V, 3000, counts, why, sizeof(why)), "%s",
			          why);
			others = 3000 - counts[0];
			CHECK_MSG(side ? others == 0 : others > 100,
			          "logit %g, min_p %.7g: other tokens drawn %ld times",
			          (double)ds[c], (double)p.min_p, others);
		}
	}
}

/* ---- seeds -------------------------------------------------------------- */

static void draw_sequence(const struct lp_sampling_params *p, int32_t *out, int n)
{
	enum { V = 500 };
	float logits[V], work[V];
	struct lp_sampler s;
	struct lp_err err = {0};

	for (int i = 0; i < V; i++)
		logits[i] = (float)((i * 7919) % 97) / 40.0f;
	memset(out, 0xff, sizeof(*out) * (size_t)n);
	if (lp_sampler_init(&s, p, V, &err) != 0)
		return;
	for (int i = 0; i < n; i++) {
		memcpy(work, logits, sizeof(work));
		out[i] = lp_sampler_sample(&s, work);
		lp_sampler_accept(&s, out[i]);
	}
	lp_sampler_release(&s);
}

static void test_seed_reproducible_and_distinct(void)
{
	enum { N = 200 };
	int32_t a[N], b[N], c[N], d[N];
	struct lp_sampling_params p = params(1.0f, 0, 0.95f, 0.0f);

	p.frequency_penalty = 0.1f;
	p.seed = 7;
	draw_sequence(&p, a, N);
	draw_sequence(&p, b, N);
	CHECK(a[0] >= 0);
	CHECK(memcmp(a, b, sizeof(a)) == 0);
	p.seed = 8;
	draw_sequence(&p, c, N);
	CHECK(memcmp(a, c, sizeof(a)) != 0);
	/* Without a seed, two samplers differ too. */
	p.has_seed = false;
	draw_sequence(&p, c, N);
	draw_sequence(&p, d, N);
	CHECK(memcmp(c, d, sizeof(c)) != 0);
}

/* ---- penalties ---------------------------------------------------------- */

static void test_repetition_penalty_exact(void)
{
	struct lp_sampling_params p = params(0.0f, 0, 1.0f, 0.0f);
	struct lp_sampler s;
	struct lp_err err = {0};
	const int32_t prompt[] = {0, 1, 1, 99, -3};
	float l[] = {2.0f, -1.0f, 0.5f, 3.0f, -2.0f, 1.0f};

	p.repetition_penalty = 2.0f;
	CHECK_OK(lp_sampler_init(&s, &p, 6, &err), &err);
	lp_sampler_set_prompt(&s, prompt, 5); /* out-of-range ids are ignored */
	lp_sampler_accept(&s, 4);
	lp_sampler_accept(&s, 4);
	CHECK_EQ_INT(lp_sampler_sample(&s, l), 3);
	lp_sampler_release(&s);
	CHECK(l[0] == 1.0f);  /* prompt, positive: divided */
	CHECK(l[1] == -2.0f); /* prompt, negative: multiplied */
	CHECK(l[2] == 0.5f);
	CHECK(l[3] == 3.0f);
	CHECK(l[4] == -4.0f); /* generated twice: penalised once, not per count */
	CHECK(l[5] == 1.0f);
}

static void test_repetition_penalty_changes_choice(void)
{
	struct lp_sampling_params p = params(0.0f, 0, 1.0f, 0.0f);
	struct lp_sampler s;
	struct lp_err err = {0};
	const int32_t prompt[] = {0};
	float l[] = {3.0f, 2.5f, 1.0f};
	float l2[] = {3.0f, 2.5f, 1.0f};

	p.repetition_penalty = 1.5f;
	CHECK_OK(lp_sampler_init(&s, &p, 3, &err), &err);
	lp_sampler_set_prompt(&s, prompt, 1);
	CHECK_EQ_INT(lp_sampler_sample(&s, l), 1);
	lp_sampler_set_prompt(&s, NULL, 0); /* replaces the prompt */
	CHECK_EQ_INT(lp_sampler_sample(&s, l2), 0);
	lp_sampler_release(&s);
}

static void test_frequency_and_presence_penalties_exact(void)
{
	struct lp_sampling_params p = params(0.0f, 0, 1.0f, 0.0f);
	struct lp_sampler s;
	struct lp_err err = {0};
	const int32_t prompt[] = {0, 1};
	float l[] = {1.0f, 2.0f, 3.0f, 0.0f, -1.0f, 2.5f};

	p.frequency_penalty = 0.5f;
	p.presence_penalty = 0.25f;
	CHECK_OK(lp_sampler_init(&s, &p, 6, &err), &err);
	lp_sampler_set_prompt(&s, prompt, 2);
	for (int i = 0; i < 3; i++)
		lp_sampler_accept(&s, 2);
	lp_sampler_accept(&s, 5);
	lp_sampler_accept(&s, 6);  /* outside the vocabulary: ignored */
	lp_sampler_accept(&s, -1); /* likewise */
	/* 2: 3 - 3 * 0.5 - 0.25 = 1.25; 5: 2.5 - 0.5 - 0.25 = 1.75 */
	CHECK_EQ_INT(lp_sampler_sample(&s, l), 1);
	lp_sampler_release(&s);
	CHECK(l[0] == 1.0f); /* prompt tokens: untouched by OpenAI penalties */
	CHECK(l[1] == 2.0f);
	CHECK(l[2] == 1.25f);
	CHECK(l[3] == 0.0f);
	CHECK(l[4] == -1.0f);
	CHECK(l[5] == 1.75f);
}

/* Negative penalties encourage repetition. */
static void test_negative_presence_penalty(void)
{
	struct lp_sampling_params p = params(0.0f, 0, 1.0f, 0.0f);
	struct lp_sampler s;
	struct lp_err err = {0};
	float l[] = {1.0f, 0.5f};

	p.presence_penalty = -1.0f;
	CHECK_OK(lp_sampler_init(&s, &p, 2, &err), &err);
	lp_sampler_accept(&s, 1);
	CHECK_EQ_INT(lp_sampler_sample(&s, l), 1);
	lp_sampler_release(&s);
	CHECK(l[1] == 1.5f);
}

/* Repetition penalty first (HF), then the OpenAI ones, then temperature:
 * (4 / 2 - 1 * 1 - 0.5) / 0.5 = 1. */
static void test_penalty_order_and_temperature(void)
{
	struct lp_sampling_params p = params(0.5f, 0, 1.0f, 0.0f);
	struct lp_sampler s;
	struct lp_err err = {0};
	float l[] = {4.0f, 1.0f, -1.0f};

	p.repetition_penalty = 2.0f;
	p.frequency_penalty = 1.0f;
	p.presence_penalty = 0.5f;
	CHECK_OK(lp_sampler_init(&s, &p, 3, &err), &err);
	lp_sampler_accept(&s, 0);
	lp_sampler_sample(&s, l);
	lp_sampler_release(&s);
	CHECK(l[0] == 1.0f);
	CHECK(l[1] == 2.0f);
	CHECK(l[2] == -2.0f);
}

/* ---- logit bias --------------------------------------------------------- */

static void add_bias(struct lp_sampling_params *p, int32_t token, float bias)
{
	p->logit_bias[p->n_logit_bias++] = (struct lp_logit_bias){token, bias};
}

/* The bias is added to the logit: a negative one on the greedy token
 * hands the choice to the next best, and the logits show the sums. */
static void test_logit_bias_exact(void)
{
	struct lp_sampling_params p = params(0.0f, 0, 1.0f, 0.0f);
	struct lp_sampler s;
	struct lp_err err = {0};
	float l[] = {1.0f, 3.0f, 2.0f, -1.0f};

	add_bias(&p, 1, -1.5f);
	add_bias(&p, 3, 0.25f);
	add_bias(&p, 0, 0.0f); /* allowed, changes nothing */
	CHECK_OK(lp_sampler_init(&s, &p, 4, &err), &err);
	CHECK(lp_sampler_has_penalties(&s));
	CHECK_EQ_INT(lp_sampler_sample(&s, l), 2);
	lp_sampler_release(&s);
	CHECK(l[0] == 1.0f);
	CHECK(l[1] == 1.5f);
	CHECK(l[2] == 2.0f);
	CHECK(l[3] == -0.75f);
}

/* +100 forces a token whatever the sampling; -100 bans one. */
static void test_logit_bias_forces_and_bans(void)
{
	const int vocab = 1000;
	float *logits = malloc(sizeof(float) * vocab);
	long *counts = malloc(sizeof(long) * vocab);
	struct lp_sampling_params p = params(1.0f, 0, 0.9f, 0.0f);
	char why[256];

	CHECK(logits && counts);
	for (int i = 0; i < vocab; i++)
		logits[i] = test_normal(2.0f);
	logits[17] = -20.0f; /* an unlikely token */
	add_bias(&p, 17, 100.0f);
	CHECK_MSG(draw_many(&p, logits, vocab, 500, counts, why, sizeof(why)), "%s", why);
	CHECK_EQ_INT(counts[17], 500);

	/* two tokens hold nearly all the mass; banning one leaves the other */
	for (int i = 0; i < vocab; i++)
		logits[i] = -10.0f;
	logits[3] = 10.0f;
	logits[4] = 10.0f;
	p = params(1.0f, 0, 1.0f, 0.0f);
	add_bias(&p, 3, -100.0f);
	CHECK_MSG(draw_many(&p, logits, vocab, 500, counts, why, sizeof(why)), "%s", why);
	CHECK_EQ_INT(counts[3], 0);
	CHECK(counts[4] > 490);
	free(logits);
	free(counts);
}

/* With temperature, the draw follows the softmax of the biased logits. */
static void test_logit_bias_shifts_frequencies(void)
{
	const int vocab = 4, n = 40000;
	float logits[4] = {0.0f, 0.0f, 0.0f, 0.0f};
	long counts[4];
	struct lp_sampling_params p = params(1.0f, 0, 1.0f, 0.0f);
	double want[4] = {3.0 / 6, 1.0 / 6, 1.0 / 6, 1.0 / 6}, chi = 0.0;
	char why[256];

	add_bias(&p, 0, (float)log(3.0));
	CHECK_MSG(draw_many(&p, logits, vocab, n, counts, why, sizeof(why)), "%s", why);
	for (int i = 0; i < vocab; i++) {
		double e = want[i] * n;
		chi += (counts[i] - e) * (counts[i] - e) / e;
	}
	CHECK_MSG(chi < chi_limit(vocab - 1), "chi-square %g (counts %ld %ld %ld %ld)", chi,
	          counts[0], counts[1], counts[2], counts[3]);
}

/* The bias comes first, then the penalties (vLLM's order):
 * (2 + 2) / 2 = 2 for a prompt token; -1 + 3 = 2, / 2 = 1. */
static void test_logit_bias_before_penalties(void)
{
	struct lp_sampling_params p = params(0.0f, 0, 1.0f, 0.0f);
	struct lp_sampler s;
	struct lp_err err = {0};
	const int32_t prompt[] = {0, 1};
	float l[] = {2.0f, -1.0f, 0.5f};

	p.repetition_penalty = 2.0f;
	p.frequency_penalty = 0.5f;
	add_bias(&p, 0, 2.0f);
	add_bias(&p, 1, 3.0f);
	add_bias(&p, 2, 1.0f);
	CHECK_OK(lp_sampler_init(&s, &p, 3, &err), &err);
	lp_sampler_set_prompt(&s, prompt, 2);
	lp_sampler_accept(&s, 2);
	CHECK_EQ_INT(lp_sampler_sample(&s, l), 0);
	lp_sampler_release(&s);
	CHECK(l[0] == 2.0f);
	CHECK(l[1] == 1.0f);
	CHECK(l[2] == 0.25f); /* (0.5 + 1) / 2 - 1 * 0.5 */
}

static void test_logit_bias_refused(void)
{
	struct lp_sampling_params p;
	struct lp_sampler s;
	struct lp_err err = {0};

	lp_sampling_params_default(&p);
	add_bias(&p, 5, 100.5f);
	CHECK_EQ_INT(lp_sampling_params_check(&p, &err), -EINVAL);
	CHECK_EQ_STR(err.msg, "'logit_bias' of token 5 must be in [-100, 100], got 100.5");
	p.logit_bias[0].bias = NAN;
	CHECK_EQ_INT(lp_sampling_params_check(&p, &err), -EINVAL);
	p.logit_bias[0] = (struct lp_logit_bias){-2, 1.0f};
	CHECK_EQ_INT(lp_sampling_params_check(&p, &err), -EINVAL);
	CHECK_EQ_STR(err.msg, "'logit_bias' has a negative token id -2");
	p.logit_bias[0] = (struct lp_logit_bias){5, -100.0f};
	add_bias(&p, 6, 100.0f);
	CHECK_OK(lp_sampling_params_check(&p, &err), &err);
	add_bias(&p, 5, 1.0f);
	CHECK_EQ_INT(lp_sampling_params_check(&p, &err), -EINVAL);
	CHECK_EQ_STR(err.msg, "'logit_bias' has token 5 twice");
	p.n_logit_bias = LP_MAX_LOGIT_BIAS + 1;
	CHECK_EQ_INT(lp_sampling_params_check(&p, &err), -EINVAL);
	CHECK_EQ_STR(err.msg, "'logit_bias' must have at most 300 entries, got 301");

	/* a token past the vocabulary: only init knows its size */
	lp_sampling_params_default(&p);
	add_bias(&p, 10, 1.0f);
	CHECK_OK(lp_sampling_params_check(&p, &err), &err);
	CHECK_EQ_INT(lp_sampler_init(&s, &p, 10, &err), -EINVAL);
	CHECK_EQ_STR(err.msg, "'logit_bias' token id 10 is outside the vocabulary (0 to 9)");
	lp_sampler_release(&s);
	CHECK_OK(lp_sampler_init(&s, &p, 11, &err), &err);
	lp_sampler_release(&s);
}

/* The entries a device's sample op gets: one per distinct token, the
 * penalised ones with their bias, then the biased ones not penalised;
 * none for a zero bias. */
static void test_logit_bias_entries(void)
{
	struct lp_sampling_params p = params(0.0f, 0, 1.0f, 0.0f);
	struct lp_sample_penalty e[8];
	struct lp_sampler s;
	struct lp_err err = {0};
	const int32_t prompt[] = {1, 2};
	bool seen[10] = {false};
	int n;

	/* bias alone: its tokens only */
	add_bias(&p, 7, -3.0f);
	add_bias(&p, 2, 1.5f);
	add_bias(&p, 9, 0.0f);
	CHECK_OK(lp_sampler_init(&s, &p, 10, &err), &err);
	lp_sampler_set_prompt(&s, prompt, 2);
	lp_sampler_accept(&s, 4);
	CHECK(lp_sampler_has_penalties(&s));
	n = lp_sampler_penalty_entries(&s, e, 8);
	CHECK_EQ_INT(n, 2);
	CHECK(e[0].token == 7 && e[0].bias == -3.0f && e[0].count == 0);
	CHECK(e[1].token == 2 && e[1].bias == 1.5f && e[1].in_prompt == 1);
	CHECK_EQ_INT(lp_sampler_penalty_entries(&s, e, 1), -1);
	lp_sampler_release(&s);

	/* with a repetition penalty: the seen tokens (1, 2, 4), 2 with its
	 * bias, then 7 */
	p.repetition_penalty = 1.2f;
	CHECK_OK(lp_sampler_init(&s, &p, 10, &err), &err);
	lp_sampler_set_prompt(&s, prompt, 2);
	lp_sampler_accept(&s, 4);
	n = lp_sampler_penalty_entries(&s, e, 8);
	CHECK_EQ_INT(n, 4);
	for (int i = 0; i < n; i++) {
		CHECK_MSG(!seen[e[i].token], "token %d twice", e[i].token);
		seen[e[i].token] = true;
		CHECK(e[i].bias == (e[i].token == 2 ? 1.5f : e[i].token == 7 ? -3.0f : 0.0f));
	}
	CHECK(seen[1] && seen[2] && seen[4] && seen[7]);
	lp_sampler_release(&s);

	/* without a bias or penalties there is nothing for the device */
	p = params(0.0f, 0, 1.0f, 0.0f);
	CHECK_OK(lp_sampler_init(&s, &p, 10, &err), &err);
	CHECK(!lp_sampler_has_penalties(&s));
	lp_sampler_release(&s);
}

/* ---- stop strings ------------------------------------------------------- */

struct stream_out {
	char text[4096];
	size_t len;
	bool matched;
	bool overflow;
};

static void append_out(struct stream_out *o, const char *p, size_t n)
{
	if (o->len + n >= sizeof(o->text)) {
		o->overflow = true;
		return;
	}
	memcpy(o->text + o->len, p, n);
	o->len += n;
	o->text[o->len] = '\0';
}

/* Feeds text in pieces of the given sizes (cycled; 0 means an empty piece),
 * then finishes. */
static void stream(struct lp_stop_matcher *m, const char *text, const size_t *sizes, size_t n_sizes,
                   struct stream_out *o)
{
	size_t len = strlen(text), at = 0, k = 0;
	const char *e;
	size_t elen;

	memset(o, 0, sizeof(*o));
	while (at < len && !o->matched) {
		size_t n = sizes[k++ % n_sizes];

		if (n > len - at)
			n = len - at;
		o->matched = lp_stop_matcher_feed(m, text + at, n, &e, &elen);
		append_out(o, e, elen);
		at += n;
	}
	lp_stop_matcher_finish(m, &e, &elen);
	append_out(o, e, elen);
}

/* The expected result on the whole text: the first stop string to end, the
 * longest of those ending at the same byte; text before it. */
static size_t reference_stop(const char *text, const char *const *stops, size_t n, bool *matched)
{
	size_t len = strlen(text);

	for (size_t end = 1; end <= len; end++) {
		size_t best = SIZE_MAX;

		for (size_t i = 0; i < n; i++) {
			size_t sl = strlen(stops[i]);

			if (sl <= end && !memcmp(text + end - sl, stops[i], sl) &&
			    (best == SIZE_MAX || end - sl < best))
				best = end - sl;
		}
		if (best != SIZE_MAX) {
			*matched = true;
			return best;
		}
	}
	*matched = false;
	return len;
}

static void test_stop_empty_list_emits_everything(void)
{
	struct lp_stop_matcher m;
	struct lp_err err = {0};
	const char *e;
	size_t elen;

	CHECK_OK(lp_stop_matcher_init(&m, NULL, 0, &err), &err);
	CHECK(!lp_stop_matcher_feed(&m, "Hello", 5, &e, &elen));
	CHECK_EQ_INT(elen, 5);
	CHECK(!memcmp(e, "Hello", 5));
	CHECK(!lp_stop_matcher_feed(&m, "", 0, &e, &elen));
	CHECK_EQ_INT(elen, 0);
	CHECK(!lp_stop_matcher_feed(&m, ", world", 7, &e, &elen));
	CHECK_EQ_INT(elen, 7);
	CHECK(!memcmp(e, ", world", 7));
	lp_stop_matcher_finish(&m, &e, &elen);
	CHECK_EQ_INT(elen, 0);
	lp_stop_matcher_release(&m);
}

static void test_stop_init_rejects_bad_lists(void)
{
	struct lp_stop_matcher m;
	struct lp_err err = {0};
	const char *with_empty[] = {"###", ""};
	const char *with_null[] = {NULL};
	static char longs[600];
	const char *too_long[] = {longs};
	const char *many[65];

	CHECK_EQ_INT(lp_stop_matcher_init(&m, with_empty, 2, &err), -EINVAL);
	CHECK_EQ_STR(err.msg, "'stop' string 1 is empty");
	lp_stop_matcher_release(&m);
	CHECK_EQ_INT(lp_stop_matcher_init(&m, with_null, 1, &err), -EINVAL);
	CHECK_EQ_STR(err.msg, "'stop' string 0 is empty");
	memset(longs, 'x', sizeof(longs) - 1);
	CHECK_EQ_INT(lp_stop_matcher_init(&m, too_long, 1, &err), -EINVAL);
	CHECK_EQ_STR(err.msg, "'stop' string 0 is 599 bytes long, at most 512 are allowed");
	for (int i = 0; i < 65; i++)
		many[i] = "x";
	CHECK_EQ_INT(lp_stop_matcher_init(&m, many, 65, &err), -EINVAL);
	CHECK_EQ_STR(err.msg, "'stop' has 65 strings, at most 64 are allowed");
	CHECK_OK(lp_stop_matcher_init(&m, many, 64, &err), &err);
	lp_stop_matcher_release(&m);
	lp_stop_matcher_release(&m);
}

static void test_stop_in_one_piece(void)
{
	struct lp_stop_matcher m;
	struct lp_err err = {0};
	const char *stops[] = {". "};
	const char *e;
	size_t elen;

	CHECK_OK(lp_stop_matcher_init(&m, stops, 1, &err), &err);
	CHECK(lp_stop_matcher_feed(&m, "Hello world. Bye. ", 18, &e, &elen));
	CHECK_EQ_INT(elen, 11);
	CHECK(!memcmp(e, "Hello world", 11));
	CHECK(m.matched);
	/* Nothing more after a match, and finish does not send the rest. */
	CHECK(lp_stop_matcher_feed(&m, "more", 4, &e, &elen));
	CHECK_EQ_INT(elen, 0);
	lp_stop_matcher_finish(&m, &e, &elen);
	CHECK_EQ_INT(elen, 0);
	lp_stop_matcher_release(&m);
}

static void test_stop_holds_back_possible_starts(void)
{
	struct lp_stop_matcher m;
	struct lp_err err = {0};
	const char *stops[] = {"END"};
	const char *e;
	size_t elen;

	CHECK_OK(lp_stop_matcher_init(&m, stops, 1, &err), &err);
	CHECK(!lp_stop_matcher_feed(&m, "abcE", 4, &e, &elen));
	CHECK_EQ_INT(elen, 3);
	CHECK(!memcmp(e, "abc", 3));
	CHECK(!lp_stop_matcher_feed(&m, "N", 1, &e, &elen));
	CHECK_EQ_INT(elen, 0);
	/* "ENx" cannot become "END" any more: all of it goes out. */
	CHECK(!lp_stop_matcher_feed(&m, "x", 1, &e, &elen));
	CHECK_EQ_INT(elen, 3);
	CHECK(!memcmp(e, "ENx", 3));
	/* "EEN" holds "EN", sends the first "E". */
	CHECK(!lp_stop_matcher_feed(&m, "EEN", 3, &e, &elen));
	CHECK_EQ_INT(elen, 1);
	CHECK(!memcmp(e, "E", 1));
	CHECK(lp_stop_matcher_feed(&m, "D!", 2, &e, &elen));
	CHECK_EQ_INT(elen, 0);
	lp_stop_matcher_release(&m);
}

static void test_stop_finish_flushes_held_text(void)
{
	struct lp_stop_matcher m;
	struct lp_err err = {0};
	const char *stops[] = {"world"};
	const char *e;
	size_t elen;

	CHECK_OK(lp_stop_matcher_init(&m, stops, 1, &err), &err);
	CHECK(!lp_stop_matcher_feed(&m, "hello wor", 9, &e, &elen));
	CHECK_EQ_INT(elen, 6);
	CHECK(!memcmp(e, "hello ", 6));
	lp_stop_matcher_finish(&m, &e, &elen);
	CHECK_EQ_INT(elen, 3);
	CHECK(!memcmp(e, "wor", 3));
	CHECK(!m.matched);
	lp_stop_matcher_release(&m);
}

static void test_stop_byte_by_byte(void)
{
	struct lp_stop_matcher m;
	struct lp_err err = {0};
	const char *stops[] = {"\nUser:", "</s>"};
	const size_t one[] = {1};
	struct stream_out o;

	CHECK_OK(lp_stop_matcher_init(&m, stops, 2, &err), &err);
	stream(&m, "The answer is 42.\nUs\nUser: hi</s>", one, 1, &o);
	CHECK(o.matched);
	CHECK_EQ_STR(o.text, "The answer is 42.\nUs");
	lp_stop_matcher_release(&m);
}

static void test_stop_across_utf8_characters(void)
{
	struct lp_stop_matcher m;
	struct lp_err err = {0};
	const char *cjk[] = {"世界"};
	const char *accent[] = {"é"}; /* c3 a9 */
	const size_t one[] = {1}, mixed[] = {2, 1, 4, 1};
	struct stream_out o;

	CHECK_OK(lp_stop_matcher_init(&m, cjk, 1, &err), &err);
	stream(&m, "你好世界!", one, 1, &o);
	CHECK(o.matched);
	CHECK_EQ_STR(o.text, "你好");
	lp_stop_matcher_release(&m);

	CHECK_OK(lp_stop_matcher_init(&m, cjk, 1, &err), &err);
	stream(&m, "你好世界!", mixed, 4, &o);
	CHECK(o.matched);
	CHECK_EQ_STR(o.text, "你好");
	lp_stop_matcher_release(&m);

	/* "è" (c3 a8) shares its first byte with "é": held, then sent whole. */
	CHECK_OK(lp_stop_matcher_init(&m, accent, 1, &err), &err);
	stream(&m, "très café", one, 1, &o);
	CHECK(o.matched);
	CHECK_EQ_STR(o.text, "très caf");
	lp_stop_matcher_release(&m);
}

static void test_stop_one_prefix_of_another(void)
{
	struct lp_stop_matcher m;
	struct lp_err err = {0};
	const char *nested[] = {"abc", "ab"};
	const char *suffixes[] = {"bc", "abc"};
	const size_t one[] = {1}, whole[] = {100};
	struct stream_out o;

	/* "ab" ends first, whether "abc" follows or not. */
	for (int pass = 0; pass < 2; pass++) {
		CHECK_OK(lp_stop_matcher_init(&m, nested, 2, &err), &err);
		stream(&m, "xxabcd", pass ? whole : one, 1, &o);
		CHECK(o.matched);
		CHECK_EQ_STR(o.text, "xx");
		lp_stop_matcher_release(&m);
	}
	/* Both end at the same byte: the longer one is cut. */
	for (int pass = 0; pass < 2; pass++) {
		CHECK_OK(lp_stop_matcher_init(&m, suffixes, 2, &err), &err);
		stream(&m, "zabcd", pass ? whole : one, 1, &o);
		CHECK(o.matched);
		CHECK_EQ_STR(o.text, "z");
		lp_stop_matcher_release(&m);
	}
}

/* Random texts, stop lists and splits against the whole-text reference;
 * after every feed without a match, exactly the longest tail that is the
 * start of a stop string is held. */
static void test_stop_random_splits(void)
{
	/* Characters, not bytes: "é" is two bytes, so pieces split it. */
	const char *const chars[] = {"a", "b", "c", "é"};
	const int stop_chars[] = {0, 1, 3}; /* no "c": some texts never match */

	test_rng_state = 777;
	for (int iter = 0; iter < 3000; iter++) {
		char text[96] = "", stop_buf[4][16];
		const char *stops[4];
		size_t n_stops = 1 + test_rand() % 4, n_chars = test_rand() % 40, len = 0;
		size_t at = 0, sent = 0, exp_len;
		bool exp_matched;
		struct lp_stop_matcher m;
		struct lp_err err = {0};
		struct stream_out o;
		const char *e;
		size_t elen;

		for (size_t i = 0; i < n_chars; i++) {
			const char *c = chars[test_rand() % 4];

			memcpy(text + len, c, strlen(c) + 1);
			len += strlen(c);
		}
		for (size_t s = 0; s < n_stops; s++) {
			size_t sl = 1 + test_rand() % 4, bl = 0;

			for (size_t i = 0; i < sl; i++) {
				const char *c = chars[stop_chars[test_rand() % 3]];

				memcpy(stop_buf[s] + bl, c, strlen(c) + 1);
				bl += strlen(c);
			}
			stops[s] = stop_buf[s];
		}
		exp_len = reference_stop(text, stops, n_stops, &exp_matched);
		CHECK_OK(lp_stop_matcher_init(&m, stops, n_stops, &err), &err);
		memset(&o, 0, sizeof(o));
		while (at < len && !o.matched) {
			size_t n = test_rand() % 5, hold = 0;

			if (n > len - at)
				n = len - at;
			o.matched = lp_stop_matcher_feed(&m, text + at, n, &e, &elen);
			append_out(&o, e, elen);
			at += n;
			sent += elen;
			if (o.matched)
				break;
			for (size_t s = 0; s < n_stops; s++)
				for (size_t h = 1; h < strlen(stops[s]) && h <= at; h++)
					if (!memcmp(text + at - h, stops[s], h) && h > hold)
						hold = h;
			if (sent != at - hold) {
				lp_stop_matcher_release(&m);
				CHECK_MSG(0, "text '%s': after %zu bytes sent %zu, held %zu", text,
				          at, sent, hold);
			}
		}
		lp_stop_matcher_finish(&m, &e, &elen);
		append_out(&o, e, elen);
		lp_stop_matcher_release(&m);
		if (o.matched != exp_matched || o.len != exp_len || memcmp(o.text, text, exp_len)) {
			CHECK_MSG(0,
			          "text '%s' stops '%s' '%s': got '%s' (matched %d), expected %zu "
			          "bytes (matched %d)",
			          text, stops[0], n_stops > 1 ? stops[1] : "", o.text, o.matched,
			          exp_len, exp_matched);
		}
	}
}

static void test_stop_piece_larger_than_buffer(void)
{
	static char big[20001];
	struct lp_stop_matcher m;
	struct lp_err err = {0};
	const char *stops[] = {"<|end|>"};
	const size_t sizes[] = {3, 9000, 5};
	struct stream_out *o = malloc(sizeof(*o));
	const char *e;
	size_t elen;

	CHECK(o);
	memset(big, 'q', 20000);
	CHECK_OK(lp_stop_matcher_init(&m, stops, 1, &err), &err);
	/* Without a stop string in it, a large piece goes out whole. */
	CHECK(!lp_stop_matcher_feed(&m, big, 20000, &e, &elen));
	CHECK_EQ_INT(elen, 20000);
	CHECK(e[0] == 'q' && e[19999] == 'q');
	lp_stop_matcher_release(&m);

	memcpy(big + 3000, "<|end|>", 7);
	big[3010] = '\0';
	CHECK_OK(lp_stop_matcher_init(&m, stops, 1, &err), &err);
	stream(&m, big, sizes, 3, o);
	lp_stop_matcher_release(&m);
	CHECK(o->matched);
	CHECK_EQ_INT(o->len, 3000);
	free(o);
}

int main(void)
{
	TEST_MAIN_BEGIN("test-sampler");
	RUN(test_params_default);
	RUN(test_params_check_messages);
	RUN(test_params_check_accepts_edges);
	RUN(test_init_rejects_bad_input);
	RUN(test_greedy_picks_argmax);
	RUN(test_top_k_one_is_greedy);
	RUN(test_tiny_vocab_and_masked_tokens);
	RUN(test_temperature_follows_softmax);
	RUN(test_top_k_keeps_the_k_best);
	RUN(test_top_p_keeps_the_nucleus);
	RUN(test_min_p_drops_unlikely_tokens);
	RUN(test_top_k_then_top_p);
	RUN(test_truncation_matches_full_sort);
	RUN(test_top_p_frequencies_wide_nucleus);
	RUN(test_exact_cut_among_near_ties);
	RUN(test_min_p_threshold_is_sharp);
	RUN(test_seed_reproducible_and_distinct);
	RUN(test_repetition_penalty_exact);
	RUN(test_repetition_penalty_changes_choice);
	RUN(test_frequency_and_presence_penalties_exact);
	RUN(test_negative_presence_penalty);
	RUN(test_penalty_order_and_temperature);
	RUN(test_logit_bias_exact);
	RUN(test_logit_bias_forces_and_bans);
	RUN(test_logit_bias_shifts_frequencies);
	RUN(test_logit_bias_before_penalties);
	RUN(test_logit_bias_refused);
	RUN(test_logit_bias_entries);
	RUN(test_stop_empty_list_emits_everything);
	RUN(test_stop_init_rejects_bad_lists);
	RUN(test_stop_in_one_piece);
	RUN(test_stop_holds_back_possible_starts);
	RUN(test_stop_finish_flushes_held_text);
	RUN(test_stop_byte_by_byte);
	RUN(test_stop_across_utf8_characters);
	RUN(test_stop_one_prefix_of_another);
	RUN(test_stop_random_splits);
	RUN(test_stop_piece_larger_than_buffer);
	TEST_MAIN_END();
}
