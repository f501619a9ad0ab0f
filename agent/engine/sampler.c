/* Next-token sampling and stop strings; see sampler.h.
 *
 * The sampler runs once per generated token over the whole vocabulary
 * (49152 for the default model), so it makes few passes over the logits and
 * never sorts: when top-k, top-p or min-p prune, the tokens are first
 * counted into buckets of equal width in log-probability, the bucket where
 * the cut falls is found from the bucket counts and masses, only the tokens
 * of the buckets down to that one are gathered, and the exact cut among them
 * is found by quickselect. All memory comes from lp_sampler_init(), and the
 * exponentials are computed four at a time.
 *
 * After lp_sampler_sample() the logits hold the biased and penalised
 * logits, divided by the temperature when it is not 0. */
#include "agent/engine/sampler.h"

#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- parameters --------------------------------------------------------- */

void lp_sampling_params_default(struct lp_sampling_params *p)
{
	memset(p, 0, sizeof(*p));
	p->temperature = 1.0f;
	p->top_p = 1.0f;
	p->top_k = 0;
	p->min_p = 0.0f;
	p->presence_penalty = 0.0f;
	p->frequency_penalty = 0.0f;
	p->repetition_penalty = 1.0f;
	p->has_seed = false;
	p->seed = 0;
}

/* The comparisons are written so that NaN fails them. */
int lp_sampling_params_check(const struct lp_sampling_params *p, struct lp_err *err)
{
	if (!(p->temperature >= 0.0f) || isinf(p->temperature))
		return lp_errf(err, -EINVAL, "'temperature' must be a finite number >= 0, got %g",
		               (double)p->temperature);
	if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
		return lp_errf(err, -EINVAL, "'top_p' must be in (0, 1], got %g", (double)p->top_p);
	if (p->top_k < -1)
		return lp_errf(err, -EINVAL,
		               "'top_k' must be at least 1, or 0 or -1 to turn it off, got %d",
		               p->top_k);
	if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
		return lp_errf(err, -EINVAL, "'min_p' must be in [0, 1], got %g", (double)p->min_p);
	if (!(p->presence_penalty >= -2.0f && p->presence_penalty <= 2.0f))
		return lp_errf(err, -EINVAL, "'presence_penalty' must be in [-2, 2], got %g",
		               (double)p->presence_penalty);
	if (!(p->frequency_penalty >= -2.0f && p->frequency_penalty <= 2.0f))
		return lp_errf(err, -EINVAL, "'frequency_penalty' must be in [-2, 2], got %g",
		               (double)p->frequency_penalty);
	if (!(p->repetition_penalty > 0.0f) || isinf(p->repetition_penalty))
		return lp_errf(err, -EINVAL,
		               "'repetition_penalty' must be a finite number > 0, got %g",
		               (double)p->repetition_penalty);
	if (p->n_logit_bias < 0 || p->n_logit_bias > LP_MAX_LOGIT_BIAS)
		return lp_errf(err, -EINVAL, "'logit_bias' must have at most %d entries, got %d",
		               LP_MAX_LOGIT_BIAS, p->n_logit_bias);
	for (int i = 0; i < p->n_logit_bias; i++) {
		const struct lp_logit_bias *b = &p->logit_bias[i];

		if (b->token < 0)
			return lp_errf(err, -EINVAL, "'logit_bias' has a negative token id %d",
			               b->token);
		if (!(b->bias >= -LP_LOGIT_BIAS_MAX && b->bias <= LP_LOGIT_BIAS_MAX))
			return lp_errf(err, -EINVAL,
			               "'logit_bias' of token %d must be in [-100, 100], got %g",
			               b->token, (double)b->bias);
		/* at most LP_MAX_LOGIT_BIAS entries: a quadratic check is cheap */
		for (int j = 0; j < i; j++)
			if (p->logit_bias[j].token == b->token)
				return lp_errf(err, -EINVAL, "'logit_bias' has token %d twice",
				               b->token);
	}
	return 0;
}

/* ---- random numbers ----------------------------------------------------- */

/* splitmix64 (Steele, Lea, Flood): spreads one 64-bit seed over the four
 * words of xoshiro's state, as its authors recommend. */
static uint64_t splitmix64(uint64_t *x)
{
	uint64_t z = (*x += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static inline uint64_t rotl64(uint64_t x, int k)
{
	return (x << k) | (x >> (64 - k));
}

/* xoshiro256** (Blackman, Vigna). */
static uint64_t xoshiro_next(uint64_t s[4])
{
	uint64_t result = rotl64(s[1] * 5, 7) * 9;
	uint64_t t = s[1] << 17;

	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = rotl64(s[3], 45);
	return result;
}

/* Uniform in [0, 1), from the top 53 bits. */
static double rng_uniform(uint64_t s[4])
{
	return (double)(xoshiro_next(s) >> 11) * 0x1.0p-53;
}

/* Without a seed: the clocks, the sampler's address and a process-wide
 * counter, so that two samplers started in the same nanosecond differ. */
static uint64_t seed_from_clock(const void *salt)
{
	static atomic_uint_fast64_t counter;
	struct timespec rt = {0}, mono = {0};
	uint64_t x;

	clock_gettime(CLOCK_REALTIME, &rt);
	clock_gettime(CLOCK_MONOTONIC, &mono);
	x = (uint64_t)rt.tv_sec * 1000000000ull + (uint64_t)rt.tv_nsec;
	x ^= rotl64((uint64_t)mono.tv_nsec + (uint64_t)mono.tv_sec * 1000000000ull, 21);
	x ^= rotl64((uint64_t)(uintptr_t)salt, 42);
	x += atomic_fetch_add(&counter, 1) * 0xd1b54a32d192ed03ull;
	return x;
}

/* ---- sampler ------------------------------------------------------------ */

int lp_sampler_init(struct lp_sampler *s, const struct lp_sampling_params *p, int vocab,
                    struct lp_err *err)
{
	uint64_t x;
	int rc;

	memset(s, 0, sizeof(*s));
	rc = lp_sampling_params_check(p, err);
	if (rc)
		return rc;
	if (vocab <= 0)
		return lp_errf(err, -EINVAL, "'vocab' must be positive, got %d", vocab);
	for (int i = 0; i < p->n_logit_bias; i++)
		if (p->logit_bias[i].token >= vocab)
			return lp_errf(
			    err, -EINVAL,
			    "'logit_bias' token id %d is outside the vocabulary (0 to %d)",
			    p->logit_bias[i].token, vocab - 1);
	s->p = *p;
	s->vocab = vocab;
	s->counts = calloc((size_t)vocab, sizeof(*s->counts));
	s->in_prompt = calloc((size_t)vocab, sizeof(*s->in_prompt));
	s->seen = malloc((size_t)vocab * sizeof(*s->seen));
	s->idx = calloc((size_t)vocab, sizeof(*s->idx));
	s->probs = calloc((size_t)vocab, sizeof(*s->probs));
	if (p->n_logit_bias > 0)
		s->bias = calloc((size_t)vocab, sizeof(*s->bias));
	if (!s->counts || !s->in_prompt || !s->idx || !s->probs || !s->seen ||
	    (p->n_logit_bias > 0 && !s->bias)) {
		lp_sampler_release(s);
		return lp_errf(err, -ENOMEM, "out of memory for a sampler over %d tokens", vocab);
	}
	for (int i = 0; i < p->n_logit_bias; i++)
		s->bias[p->logit_bias[i].token] = p->logit_bias[i].bias;
	x = p->has_seed ? p->seed : seed_from_clock(s);
	for (int i = 0; i < 4; i++)
		s->rng[i] = splitmix64(&x);
	return 0;
}

void lp_sampler_release(struct lp_sampler *s)
{
	if (!s)
		return;
	free(s->counts);
	free(s->in_prompt);
	free(s->seen);
	free(s->idx);
	free(s->probs);
	free(s->bias);
	memset(s, 0, sizeof(*s));
}

/* Replaces the recorded prompt; ids outside the vocabulary are ignored. */
void lp_sampler_set_prompt(struct lp_sampler *s, const int32_t *ids, size_t n)
{
	memset(s->in_prompt, 0, (size_t)s->vocab);
	/* seen: the generated tokens (a scan, once per request), then the
	 * prompt's others */
	s->n_seen = 0;
	for (int t = 0; t < s->vocab; t++)
		if (s->counts[t] > 0)
			s->seen[s->n_seen++] = t;
	for (size_t i = 0; i < n; i++)
		if (ids[i] >= 0 && ids[i] < s->vocab && !s->in_prompt[ids[i]]) {
			s->in_prompt[ids[i]] = 1;
			if (s->counts[ids[i]] == 0)
				s->seen[s->n_seen++] = ids[i];
		}
}

void lp_sampler_accept(struct lp_sampler *s, int32_t id)
{
	if (id >= 0 && id < s->vocab && s->counts[id] < INT32_MAX) {
		if (s->counts[id]++ == 0 && !s->in_prompt[id])
			s->seen[s->n_seen++] = id;
	}
}

/* The logit bias, before the penalties (vLLM's order); a bias of 0 leaves
 * the logit alone, as the sample op's entries do (sample-math.h). */
static void apply_bias(const struct lp_sampler *s, float *logits)
{
	for (int i = 0; i < s->p.n_logit_bias; i++)
		if (s->p.logit_bias[i].bias != 0.0f)
			logits[s->p.logit_bias[i].token] += s->p.logit_bias[i].bias;
}

static void apply_penalties(const struct lp_sampler *s, float *logits)
{
	const float rep = s->p.repetition_penalty;
	const float freq = s->p.frequency_penalty;
	const float pres = s->p.presence_penalty;
	const bool do_rep = rep != 1.0f;
	const bool do_openai = freq != 0.0f || pres != 0.0f;

	if (!do_rep && !do_openai)
		return;
	for (int i = 0; i < s->vocab; i++) {
		int32_t c = s->counts[i];

		/* HF/vLLM repetition penalty: every token seen in the prompt or
		 * the output moves towards "less likely" by the same factor,
		 * dividing positive logits and multiplying negative ones. */
		if (do_rep && (c > 0 || s->in_prompt[i]))
			logits[i] = logits[i] > 0.0f ? logits[i] / rep : logits[i] * rep;
		/* OpenAI frequency and presence penalties, on the generated
		 * tokens only: logit -= count * frequency + (count > 0) * presence. */
		if (do_openai && c > 0)
			logits[i] -= (float)c * freq + pres;
	}
}

/* Argmax, ties to the lowest id; NaN never wins. Token 0 when every logit is
 * -inf or NaN (there is nothing better to say). */
static int32_t argmax(const float *logits, int vocab)
{
	int32_t best = 0;
	float bestv = -INFINITY;

	for (int i = 0; i < vocab; i++)
		if (logits[i] > bestv) {
			bestv = logits[i];
			best = i;
		}
	return best;
}

/* ---- the arithmetic of one row -------------------------------------- */

/* e^x for x <= 0, within about 2e-7 relative, and exactly 0 below -87 (so
 * that a -inf logit has no chance at all). glibc's expf costs as much as the
 * rest of sampling put together; this one is written over 4-wide vectors
 * (GCC/Clang vector extensions, plain SSE2/NEON) as well as for one float,
 * with the same steps in both: e^x = 2^n e^r, n = round(x / ln 2), and a
 * degree-6 Taylor polynomial for e^r, |r| <= ln(2) / 2. */
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

#define EXP_LOW   -87.0f
#define EXP_ROUND 12582912.0f /* 1.5 * 2^23: adding it rounds to an integer */
#define LOG2E     1.44269504f
#define LN2_HI    0.693145751953125f /* ln 2 = LN2_HI + LN2_LO, LN2_HI exact in few bits */
#define LN2_LO    1.42860677e-6f
#define EXP_POLY(r)                                                                                \
	(1.0f +                                                                                    \
	 (r) * (1.0f +                                                                             \
	        (r) * (0.5f + (r) * (1.0f / 6 + (r) * (1.0f / 24 + (r) * (1.0f / 120 +             \
	                                                                  (r) * (1.0f / 720)))))))

static inline float exp_neg(float x)
{
	float xc = x < EXP_LOW ? EXP_LOW : x;
	float n = xc * LOG2E + EXP_ROUND;
	float r, scale;
	int32_t bits;

	n -= EXP_ROUND;
	r = xc - n * LN2_HI;
	r -= n * LN2_LO;
	bits = ((int32_t)n + 127) << 23; /* n + 127 in [1, 127] */
	memcpy(&scale, &bits, sizeof(scale));
	return x < EXP_LOW ? 0.0f : EXP_POLY(r) * scale;
}

static inline v4f splat(float f)
{
	return (v4f){f, f, f, f};
}

static inline v4f exp_neg4(v4f x)
{
	v4i low = x < splat(EXP_LOW);
	v4f xc = (v4f)((low & (v4i)splat(EXP_LOW)) | (~low & (v4i)x));
	v4f n = xc * splat(LOG2E) + splat(EXP_ROUND);
	v4f r;
	v4i bits;

	n -= splat(EXP_ROUND);
	r = xc - n * splat(LN2_HI);
	r -= n * splat(LN2_LO);
	bits = (__builtin_convertvector(n, v4i) + 127) << 23;
	return (v4f)(~low & (v4i)(EXP_POLY(r) * (v4f)bits));
}

/* x[i] = x[i] / t, NaN -> -inf; returns the largest. */
static float scale_and_max(float *x, int n, float t)
{
	v4f vmax = splat(-INFINITY), vt = splat(t);
	float m;
	int i = 0;

	for (; i + 4 <= n; i += 4) {
		v4f v;
		v4i mask;

		memcpy(&v, x + i, sizeof(v));
		v /= vt;
		mask = v != v; /* NaN */
		v = (v4f)((mask & (v4i)splat(-INFINITY)) | (~mask & (v4i)v));
		memcpy(x + i, &v, sizeof(v));
		mask = v > vmax;
		vmax = (v4f)((mask & (v4i)v) | (~mask & (v4i)vmax));
	}
	m = vmax[0];
	for (int j = 1; j < 4; j++)
		m = vmax[j] > m ? vmax[j] : m;
	for (; i < n; i++) {
		float v = x[i] / t;

		x[i] = isnan(v) ? -INFINITY : v;
		m = x[i] > m ? x[i] : m;
	}
	return m;
}

/* out[i] = e^(x[i] - m); returns the sum (in double, per block of 64). */
static double exp_all(const float *x, float m, float *out, int n)
{
	double total = 0.0;
	int i = 0;

	while (i + 4 <= n) {
		v4f acc = splat(0.0f);

		for (int j = 0; j < 16 && i + 4 <= n; j++, i += 4) {
			v4f v;

			memcpy(&v, x + i, sizeof(v));
			v = exp_neg4(v - splat(m));
			memcpy(out + i, &v, sizeof(v));
			acc += v;
		}
		total += (double)acc[0] + acc[1] + acc[2] + acc[3];
	}
	for (; i < n; i++) {
		out[i] = exp_neg(x[i] - m);
		total += out[i];
	}
	return total;
}

/* ---- ranking without sorting ------------------------------------------- */

/* Candidate order: higher logit first, ties to the lower id. Ties broken by
 * id make the order total, which keeps quickselect well behaved on flat
 * logits. */
static inline bool ranks_before(const float *x, int32_t a, int32_t b)
{
	return x[a] > x[b] || (x[a] == x[b] && a < b);
}

static void insertion_sort(int32_t *v, size_t n, const float *x)
{
	for (size_t i = 1; i < n; i++) {
		int32_t t = v[i];
		size_t j = i;

		while (j > 0 && ranks_before(x, t, v[j - 1])) {
			v[j] = v[j - 1];
			j--;
		}
		v[j] = t;
	}
}

static inline void swap_i32(int32_t *a, int32_t *b)
{
	int32_t t = *a;

	*a = *b;
	*b = t;
}

#define SELECT_SMALL 24

/* Partitions v[0..n), n > SELECT_SMALL, around a median-of-three pivot and
 * returns where the pivot ends: v[0..p) rank before it, v(p..n) after. */
static size_t partition_ids(int32_t *v, size_t n, const float *x)
{
	size_t mid = n / 2, i = 0, j = n - 2;
	int32_t pivot;

	if (ranks_before(x, v[mid], v[0]))
		swap_i32(&v[mid], &v[0]);
	if (ranks_before(x, v[n - 1], v[0]))
		swap_i32(&v[n - 1], &v[0]);
	if (ranks_before(x, v[n - 1], v[mid]))
		swap_i32(&v[n - 1], &v[mid]);
	/* v[0] <= pivot <= v[n-1] serve as sentinels; park the pivot at n-2. */
	swap_i32(&v[mid], &v[n - 2]);
	pivot = v[n - 2];
	for (;;) {
		while (ranks_before(x, v[++i], pivot))
			;
		while (ranks_before(x, pivot, v[--j]))
			;
		if (i >= j)
			break;
		swap_i32(&v[i], &v[j]);
	}
	swap_i32(&v[i], &v[n - 2]);
	return i;
}

/* Quickselect: moves the k best of v[0..n) into v[0..k), in no order. */
static void select_best(int32_t *v, size_t n, size_t k, const float *x)
{
	while (n > SELECT_SMALL) {
		size_t p = partition_ids(v, n, x);

		if (k == p || k == p + 1)
			return;
		if (k < p) {
			n = p;
		} else {
			v += p + 1;
			n -= p + 1;
			k -= p + 1;
		}
	}
	insertion_sort(v, n, x);
}

/* Quickselect by mass: the length c of the shortest run of best tokens whose
 * probabilities (probs[id]) add up to target, moved into v[0..c) in no
 * order; n when the whole of v falls short (rounding). Expected O(n). */
static size_t select_mass(int32_t *v, size_t n, double target, const float *probs, const float *x)
{
	size_t base = 0;
	double acc = 0.0;

	while (n > SELECT_SMALL) {
		size_t p = partition_ids(v, n, x);
		double upper = 0.0;

		for (size_t j = 0; j < p; j++)
			upper += probs[v[j]];
		if (acc + upper >= target) {
			n = p; /* the cut falls among the better ones */
			continue;
		}
		acc += upper + probs[v[p]];
		if (acc >= target)
			return base + p + 1;
		base += p + 1;
		v += p + 1;
		n -= p + 1;
	}
	insertion_sort(v, n, x);
	for (size_t j = 0; j < n; j++) {
		acc += probs[v[j]];
		if (acc >= target)
			return base + j + 1;
	}
	return base + n;
}

/* Buckets of width 1/BUCKETS_PER_NAT in log-probability below the best
 * token; everything more than N_BUCKETS / BUCKETS_PER_NAT (32) nats down, and
 * -inf, shares the last bucket. */
#define N_BUCKETS       512
#define BUCKETS_PER_NAT 16.0f

static inline int bucket_of(float d)
{
	float b = -d * BUCKETS_PER_NAT; /* d <= 0; -inf falls through */

	return b < (float)(N_BUCKETS - 1) ? (int)b : N_BUCKETS - 1;
}

/* Draws one of ids[0..n) with probability proportional to probs[id]
 * (HF/vLLM "renormalise, then sample"). */
static int32_t draw(struct lp_sampler *s, const int32_t *ids, size_t n)
{
	double total = 0.0, target, acc = 0.0;
	size_t last = 0;

	for (size_t j = 0; j < n; j++)
		total += s->probs[ids[j]];
	target = rng_uniform(s->rng) * total;
	for (size_t j = 0; j < n; j++) {
		float e = s->probs[ids[j]];

		if (e > 0.0f)
			last = j;
		acc += e;
		if (acc > target && e > 0.0f)
			return ids[j];
	}
	return ids[last]; /* rounding left target just above the sum */
}

/* The untruncated case: softmax over the whole vocabulary, then a draw. */
static int32_t draw_full(struct lp_sampler *s, const float *x, float m)
{
	double total = exp_all(x, m, s->probs, s->vocab), target, acc = 0.0;
	int32_t last = 0;

	target = rng_uniform(s->rng) * total;
	for (int i = 0; i < s->vocab; i++) {
		float e = s->probs[i];

		if (e > 0.0f)
			last = i;
		acc += e;
		if (acc > target && e > 0.0f)
			return i;
	}
	return last;
}

int32_t lp_sampler_sample(struct lp_sampler *s, float *logits)
{
	const int vocab = s->vocab;
	const float temp = s->p.temperature;
	const int k = s->p.top_k > 0 && s->p.top_k < vocab ? s->p.top_k : 0;
	const float top_p = s->p.top_p;
	const float min_p = s->p.min_p;
	const bool p_on = top_p < 1.0f;
	const bool need_mass = p_on && !k;
	int32_t cnt[2][N_BUCKETS];
	double mass[2][N_BUCKETS];
	int32_t *idx = s->idx;
	float *probs = s->probs;
	int cut, min_p_bucket = N_BUCKETS - 1;
	size_t n, n_sure, kept;
	double total = 0.0, sure_mass = 0.0;
	float m;

	apply_bias(s, logits);
	apply_penalties(s, logits);

	/* Greedy (vLLM/HF: temperature 0 means argmax). */
	if (temp == 0.0f)
		return argmax(logits, vocab);

	/* Temperature (HF/vLLM: logits / temperature, before any truncation). */
	m = scale_and_max(logits, vocab, temp);
	if (isinf(m)) /* +inf takes all the mass; all -inf has none to share */
		return argmax(logits, vocab);

	if (!k && !p_on && min_p <= 0.0f)
		return draw_full(s, logits, m);

	/* Count (and, for top-p alone, weigh) the tokens per bucket, in two
	 * interleaved histograms so that runs of tokens in one bucket do not
	 * wait on each other's stores. The bucket of each token is parked in
	 * idx[] until the gather below. */
	memset(cnt, 0, sizeof(cnt));
	if (need_mass) {
		int i = 0;

		memset(mass, 0, sizeof(mass));
		total = exp_all(logits, m, probs, vocab);
		for (; i + 2 <= vocab; i += 2) {
			int b0 = bucket_of(logits[i] - m), b1 = bucket_of(logits[i + 1] - m);

			idx[i] = b0;
			idx[i + 1] = b1;
			cnt[0][b0]++;
			cnt[1][b1]++;
			mass[0][b0] += probs[i];
			mass[1][b1] += probs[i + 1];
		}
		for (; i < vocab; i++) {
			idx[i] = bucket_of(logits[i] - m);
			cnt[0][idx[i]]++;
			mass[0][idx[i]] += probs[i];
		}
	} else {
		int i = 0;

		for (; i + 2 <= vocab; i += 2) {
			int b0 = bucket_of(logits[i] - m), b1 = bucket_of(logits[i + 1] - m);

			idx[i] = b0;
			idx[i + 1] = b1;
			cnt[0][b0]++;
			cnt[1][b1]++;
		}
		for (; i < vocab; i++) {
			idx[i] = bucket_of(logits[i] - m);
			cnt[0][idx[i]]++;
		}
	}
	if (min_p > 0.0f) {
		/* min-p keeps p >= min_p * p_max, i.e. d >= log(min_p); one
		 * bucket of slack for rounding, the exact test comes later. */
		float lim = -logf(min_p) * BUCKETS_PER_NAT + 1.0f;

		if (lim < (float)(N_BUCKETS - 1))
			min_p_bucket = (int)lim;
	}
	/* The first bucket by which one of the filters is sure to have cut. */
	{
		int64_t c = 0;
		double w = 0.0;

		for (cut = 0; cut < N_BUCKETS - 1; cut++) {
			c += cnt[0][cut] + cnt[1][cut];
			w += need_mass ? mass[0][cut] + mass[1][cut] : 0.0;
			if (k && c >= k)
				break;
			if (need_mass && w >= (double)top_p * total)
				break;
			/* Not with top-k and top-p together: the nucleus is
			 * measured against the whole top-k mass. */
			if (cut >= min_p_bucket && !(k && p_on))
				break;
			sure_mass = w;
		}
	}
	/* Gather the candidates, in place: buckets above the cut as id, the cut
	 * bucket as ~id, then the latter moved behind the former. */
	n = 0;
	for (int i = 0; i < vocab; i++) {
		int b = idx[i];

		/* Without branches: which way each token goes is a coin toss
		 * to the branch predictor. n <= i, so idx[n] was read. */
		idx[n] = b < cut ? i : ~i;
		n += b <= cut;
	}
	n_sure = 0;
	for (size_t j = 0; j < n; j++) {
		if (idx[j] >= 0) {
			swap_i32(&idx[j], &idx[n_sure]);
			n_sure++;
		}
	}
	for (size_t j = n_sure; j < n; j++)
		idx[j] = ~idx[j];

	if (k) {
		/* Top-k (HF/vLLM): the k best tokens. */
		double sum = 0.0;

		kept = n < (size_t)k ? n : (size_t)k;
		select_best(idx, n, kept, logits);
		for (size_t j = 0; j < kept; j++) {
			probs[idx[j]] = exp_neg(logits[idx[j]] - m);
			sum += probs[idx[j]];
		}
		/* Top-p (HF/vLLM nucleus) over the renormalised top-k: the
		 * smallest set of best tokens with mass >= top_p, at least one. */
		if (p_on)
			kept = select_mass(idx, kept, (double)top_p * sum, probs, logits);
	} else if (p_on) {
		/* Top-p (HF/vLLM nucleus) over the whole distribution: the
		 * buckets above the cut hold less than top_p of the mass, so they
		 * are all in the nucleus; the rest comes from the cut bucket. */
		kept = n_sure + select_mass(idx + n_sure, n - n_sure,
		                            (double)top_p * total - sure_mass, probs, logits);
	} else {
		kept = n;
		for (size_t j = 0; j < kept; j++)
			probs[idx[j]] = exp_neg(logits[idx[j]] - m);
	}

	/* Min-p (HF/vLLM): drop tokens whose probability is below min_p times
	 * the best one's; the best token (probs 1 here) always stays. */
	if (min_p > 0.0f) {
		size_t w = 0;

		for (size_t j = 0; j < kept; j++)
			if (probs[idx[j]] >= min_p)
				idx[w++] = idx[j];
		kept = w;
	}
	if (kept == 0) /* cannot happen: the best token passes every filter */
		return argmax(logits, vocab);

	/* Renormalise over what is left and draw (xoshiro256**). */
	return draw(s, idx, kept);
}

static bool penalties_on(const struct lp_sampler *s)
{
	return s->p.repetition_penalty != 1.0f || s->p.frequency_penalty != 0.0f ||
	       s->p.presence_penalty != 0.0f;
}

bool lp_sampler_has_penalties(const struct lp_sampler *s)
{
	return penalties_on(s) || s->p.n_logit_bias > 0;
}

int lp_sampler_penalty_entries(const struct lp_sampler *s, struct lp_sample_penalty *out, int cap)
{
	const bool pen = penalties_on(s);
	/* without a repetition penalty, tokens only in the prompt change
	 * nothing */
	const bool prompt_too = s->p.repetition_penalty != 1.0f;
	int n = 0;

	/* the tokens the penalties touch, with their bias */
	for (int j = 0; pen && j < s->n_seen; j++) {
		int32_t t = s->seen[j];
		if (!prompt_too && s->counts[t] == 0)
			continue;
		if (n == cap)
			return -1;
		out[n++] = (struct lp_sample_penalty){t, s->counts[t], s->in_prompt[t],
		                                      s->bias ? s->bias[t] : 0.0f};
	}
	/* then the biased tokens the loop above did not take */
	for (int i = 0; i < s->p.n_logit_bias; i++) {
		int32_t t = s->p.logit_bias[i].token;
		if (s->p.logit_bias[i].bias == 0.0f ||
		    (pen && (s->counts[t] > 0 || (prompt_too && s->in_prompt[t]))))
			continue;
		if (n == cap)
			return -1;
		out[n++] = (struct lp_sample_penalty){t, s->counts[t], s->in_prompt[t],
		                                      s->p.logit_bias[i].bias};
	}
	return n;
}

double lp_sampler_uniform(struct lp_sampler *s)
{
	return rng_uniform(s->rng);
}

void lp_logprobs(const float *logits, int vocab, int32_t tok, int n, float *logprob,
                 int32_t *top_ids, float *top_logprobs, int *n_top)
{
	float mx = -INFINITY, lse;
	double sum = 0;
	int k;

	for (int i = 0; i < vocab; i++)
		if (logits[i] > mx)
			mx = logits[i];
	for (int i = 0; i < vocab; i++)
		sum += exp((double)(logits[i] - mx));
	lse = mx + (float)log(sum);
	*logprob = logits[tok] - lse;
	/* the n best by insertion into a short sorted list; a later token
	 * with an equal logit never displaces an earlier one */
	*n_top = 0;
	for (int i = 0; i < vocab && n > 0; i++) {
		float v = logits[i];
		k = *n_top;
		if (k == n && v <= top_logprobs[k - 1])
			continue;
		if (k < n)
			(*n_top)++;
		else
			k--;
		while (k > 0 && top_logprobs[k - 1] < v) {
			top_logprobs[k] = top_logprobs[k - 1];
			top_ids[k] = top_ids[k - 1];
			k--;
		}
		top_logprobs[k] = v;
		top_ids[k] = i;
	}
	for (k = 0; k < *n_top; k++)
		top_logprobs[k] -= lse;
}

/* ---- stop strings ------------------------------------------------------- */

/* Bounds on what a request may ask for; the hold-back search is quadratic
 * in the length of a stop string in the worst case. */
#define STOP_MAX_COUNT 64
#define STOP_MAX_LEN   512
/* Room for one piece beyond the longest stop string, so that feeding
 * token-sized pieces never allocates. */
#define STOP_PIECE_ROOM 1024

int lp_stop_matcher_init(struct lp_stop_matcher *m, const char *const *stops, size_t n,
                         struct lp_err *err)
{
	memset(m, 0, sizeof(*m));
	if (n > STOP_MAX_COUNT)
		return lp_errf(err, -EINVAL, "'stop' has %zu strings, at most %d are allowed", n,
		               STOP_MAX_COUNT);
	if (n && !stops)
		return lp_errf(err, -EINVAL, "'stop' has %zu strings but none were given", n);
	for (size_t i = 0; i < n; i++) {
		size_t len = stops[i] ? strlen(stops[i]) : 0;

		if (len == 0)
			return lp_errf(err, -EINVAL, "'stop' string %zu is empty", i);
		if (len > STOP_MAX_LEN)
			return lp_errf(
			    err, -EINVAL,
			    "'stop' string %zu is %zu bytes long, at most %d are allowed", i, len,
			    STOP_MAX_LEN);
		if (len > m->max_len)
			m->max_len = len;
	}
	if (n) {
		m->stops = calloc(n, sizeof(*m->stops));
		if (!m->stops)
			goto out_nomem;
	}
	for (size_t i = 0; i < n; i++) {
		size_t len = strlen(stops[i]);

		m->stops[i] = malloc(len + 1);
		if (!m->stops[i])
			goto out_nomem;
		memcpy(m->stops[i], stops[i], len + 1);
		m->n_stops = i + 1;
	}
	m->held_cap = m->max_len + STOP_PIECE_ROOM;
	m->held = malloc(m->held_cap);
	if (!m->held)
		goto out_nomem;
	return 0;

out_nomem:
	lp_stop_matcher_release(m);
	return lp_errf(err, -ENOMEM, "out of memory for %zu stop strings", n);
}

void lp_stop_matcher_release(struct lp_stop_matcher *m)
{
	if (!m)
		return;
	for (size_t i = 0; i < m->n_stops; i++)
		free(m->stops[i]);
	free(m->stops);
	free(m->held);
	memset(m, 0, sizeof(*m));
}

static void reverse(char *p, size_t n)
{
	for (size_t i = 0, j = n; i + 1 < j; i++, j--) {
		char t = p[i];

		p[i] = p[j - 1];
		p[j - 1] = t;
	}
}

/* Length of the longest suffix of text[0..len) that is a proper prefix of
 * s (longer than `at_least`, which the caller already has). */
static size_t held_prefix(const char *text, size_t len, const char *s, size_t slen, size_t at_least)
{
	size_t from = len > slen - 1 ? len - (slen - 1) : 0;

	/* Longest first: the earliest start that matches wins. */
	for (size_t j = from; j + at_least < len; j++) {
		const char *c = memchr(text + j, s[0], len - at_least - j);

		if (!c)
			break;
		j = (size_t)(c - text);
		if (memcmp(text + j, s, len - j) == 0)
			return len - j;
	}
	return at_least;
}

/* Semantics (OpenAI, vLLM): generation stops at the first point in the text
 * where any stop string ends; the text sent is what comes before that stop
 * string, which is not sent. When several stop strings end at the same byte
 * (one is a suffix of another), the longest one is cut. The result does not
 * depend on how the text is split into pieces. */
bool lp_stop_matcher_feed(struct lp_stop_matcher *m, const char *piece, size_t len,
                          const char **emit, size_t *emit_len)
{
	size_t old_len = m->held_len, best_end = SIZE_MAX, best_start = 0, hold = 0, out;

	*emit = m->held;
	*emit_len = 0;
	if (m->matched)
		return true;
	if (len > m->held_cap - m->held_len) {
		size_t cap = m->held_cap * 2;
		char *p;

		if (cap < m->held_len + len)
			cap = m->held_len + len;
		p = realloc(m->held, cap);
		if (!p) {
			/* Out of memory: send what was held and end the text,
			 * with m->matched left false to tell the two apart. */
			*emit = m->held;
			*emit_len = m->held_len;
			m->held_len = 0;
			return true;
		}
		m->held = p;
		m->held_cap = cap;
	}
	if (len)
		memmove(m->held + m->held_len, piece, len);
	m->held_len += len;

	/* A new match ends in the new bytes; the held part had none. */
	for (size_t i = 0; i < m->n_stops; i++) {
		const char *s = m->stops[i];
		size_t slen = strlen(s), from = old_len >= slen ? old_len - slen + 1 : 0;
		const char *hit;

		if (from >= m->held_len)
			continue;
		hit = memmem(m->held + from, m->held_len - from, s, slen);
		if (hit) {
			size_t start = (size_t)(hit - m->held), end = start + slen;

			if (end < best_end || (end == best_end && start < best_start)) {
				best_end = end;
				best_start = start;
			}
		}
	}
	if (best_end != SIZE_MAX) {
		m->matched = true;
		*emit = m->held;
		*emit_len = best_start;
		return true;
	}

	/* Hold back the longest tail that may still grow into a stop string. */
	for (size_t i = 0; i < m->n_stops; i++)
		hold = held_prefix(m->held, m->held_len, m->stops[i], strlen(m->stops[i]), hold);
	out = m->held_len - hold;
	if (out && hold) {
		/* [out][hold] -> [hold][out]: the held tail moves to the front
		 * for the next piece, the text sent stays intact until then. */
		reverse(m->held, m->held_len);
		reverse(m->held, hold);
		reverse(m->held + hold, out);
	}
	*emit = m->held + hold;
	*emit_len = out;
	m->held_len = hold;
	return false;
}

void lp_stop_matcher_finish(struct lp_stop_matcher *m, const char **emit, size_t *emit_len)
{
	*emit = m->held;
	*emit_len = m->matched ? 0 : m->held_len;
	m->held_len = 0;
}
