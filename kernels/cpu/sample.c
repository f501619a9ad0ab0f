/* The sample op on the CPU: one token per row of logits with the host
 * sampler's distribution (contract in kernels/backend.h above struct
 * lp_sample_row; the shared arithmetic, fixed-point masses included, in
 * kernels/sample-math.h). This op is the reference the device kernels are
 * compared with.
 *
 * A row is never sorted whole. Its candidates are counted into buckets of
 * 1/16 nat below the best value (everything more than 32 nats down, and
 * -inf, shares the last bucket), which orders them by rank up to the order
 * inside a bucket. The bucket counts (top-k) or the bucket masses (top-p,
 * the draw without top-k) say which bucket the last cut falls in; only the
 * candidates of the buckets up to it are gathered, and the walks in rank
 * order (top-k, top-p, the draw) sort a bucket when they reach it, usually
 * stopping within the first few. The masses are fixed-point integers, so
 * a sum over a set is exact whatever its order: the bucket masses, the
 * walks and the device's parallel sums agree to the bit.
 *
 * The passes over the whole row (values, buckets, e^x and masses, the
 * log-softmax) run 8 lanes at a time with AVX2 + FMA where the CPU has
 * them: each lane does the IEEE operations of sample-math.h (division,
 * fused multiply-adds), so the candidates, masses and token are the same
 * bits as the portable path's; only the log-softmax's float sum is added
 * in another order (logprobs differ in the last bits between the paths).
 *
 * A row's logit bias and penalties (its entries of args->pen) apply to a
 * copy of the row in the values scratch, each penalised logit computed by
 * lp_sample_penalise (the host sampler's arithmetic, which the device uses
 * too); greedy and the draw read the copy, the logprobs and top-N the row
 * as given.
 *
 * Rows run in parallel on the pool, each thread with its own scratch
 * (arrays of the vocabulary's length and the top-N list), sized at reserve
 * so that the op never allocates. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu.h"
#include "kernels/sample-math.h"

#define N_BUCKETS       512
#define BUCKETS_PER_NAT 16.0f

struct sample_scratch {
	int vocab, max_logprobs, n_threads;
	float *values;    /* [n_threads][vocab]: the row's values at its temperature */
	int32_t *order;   /* [n_threads][vocab]: ids by bucket, then by rank once sorted */
	uint16_t *bucket; /* [n_threads][vocab]: each candidate's bucket */
	int32_t *top;     /* [n_threads][max(max_logprobs, 1)] */
};

int lp_cpu_sample_reserve(struct lp_cpu *cpu, const struct lp_backend_limits *lim,
                          struct lp_err *err)
{
	struct sample_scratch *s;
	size_t vocab, top, n;

	lp_cpu_sample_release(cpu);
	if (lim->vocab < 0 || lim->vocab > (1 << 24) || lim->max_logprobs < 0 ||
	    lim->max_logprobs > (1 << 16))
		return lp_errf(err, -EINVAL, "cpu backend: sampling %d tokens, %d logprobs",
		               lim->vocab, lim->max_logprobs);
	vocab = (size_t)(lim->vocab ? lim->vocab : 1);
	top = (size_t)(lim->max_logprobs > 0 ? lim->max_logprobs : 1);
	n = (size_t)cpu->n_threads;
	s = calloc(1, sizeof(*s));
	if (!s)
		goto out_nomem;
	s->vocab = lim->vocab;
	s->max_logprobs = lim->max_logprobs;
	s->n_threads = cpu->n_threads;
	s->values = malloc(n * vocab * sizeof(float));
	s->order = malloc(n * vocab * sizeof(int32_t));
	s->bucket = malloc(n * vocab * sizeof(uint16_t));
	s->top = malloc(n * top * sizeof(int32_t));
	cpu->sample_scratch = s;
	if (!s->values || !s->order || !s->bucket || !s->top) {
		lp_cpu_sample_release(cpu);
		goto out_nomem;
	}
	return 0;

out_nomem:
	return lp_errf(err, -ENOMEM, "out of memory for sampling scratch (%d tokens, %d threads)",
	               lim->vocab, cpu->n_threads);
}

void lp_cpu_sample_release(struct lp_cpu *cpu)
{
	struct sample_scratch *s = cpu->sample_scratch;

	if (!s)
		return;
	free(s->values);
	free(s->order);
	free(s->bucket);
	free(s->top);
	free(s);
	cpu->sample_scratch = NULL;
}

/* ---- passes over a whole row ---- */

static inline int bucket_of(float d)
{
	float b = -d * BUCKETS_PER_NAT; /* d <= 0; -inf falls through */

	return b < (float)(N_BUCKETS - 1) ? (int)b : N_BUCKETS - 1;
}

/* v[i] = value of l[i] at temperature t; returns the best value. */
static float values_scalar(const float *l, float *v, int n, float t)
{
	float best = -INFINITY;

	for (int i = 0; i < n; i++) {
		v[i] = lp_sample_value(l[i], t);
		best = v[i] > best ? v[i] : best;
	}
	return best;
}

/* b[i] = bucket of v[i] below m; count[bucket]++. */
static void buckets_scalar(const float *v, uint16_t *b, int n, float m, int *count)
{
	for (int i = 0; i < n; i++) {
		b[i] = (uint16_t)bucket_of(v[i] - m);
		count[b[i]]++;
	}
}

/* mass[b[i]] += weight of v[i] where p >= min_p. */
static void masses_scalar(const float *v, const uint16_t *b, int n, float m, float min_p,
                          uint64_t *mass)
{
	for (int i = 0; i < n; i++) {
		float p = lp_sample_exp(v[i] - m);

		mass[b[i]] += p >= min_p ? lp_sample_weight(p) : 0;
	}
}

/* sum of e^(l - m) over the row (NaN: nothing), for the log-softmax */
static double lse_scalar(const float *l, int n, float m)
{
	double s = 0.0;
	float part = 0.0f;

	for (int i = 0; i < n; i++) {
		if (l[i] == l[i])
			part += lp_sample_exp(l[i] - m);
		if ((i & 63) == 63) {
			s += part;
			part = 0.0f;
		}
	}
	return s + part;
}

#if LP_CPU_X86
#include <immintrin.h>

#define AVX2        __attribute__((target("avx2,fma")))
#define AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) static inline

/* lp_sample_exp on 8 lanes, operation for operation. */
AVX2_INLINE __m256 exp8(__m256 d)
{
	const __m256 round = _mm256_set1_ps(12582912.0f);
	__m256 x = _mm256_max_ps(d, _mm256_set1_ps(-87.0f));
	__m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504f), round), round);
	__m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
	__m256 e, scale;

	r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
	e = _mm256_fmadd_ps(r, _mm256_set1_ps(1.0f / 720), _mm256_set1_ps(1.0f / 120));
	e = _mm256_fmadd_ps(r, e, _mm256_set1_ps(1.0f / 24));
	e = _mm256_fmadd_ps(r, e, _mm256_set1_ps(1.0f / 6));
	e = _mm256_fmadd_ps(r, e, _mm256_set1_ps(0.5f));
	e = _mm256_fmadd_ps(r, e, _mm256_set1_ps(1.0f));
	e = _mm256_fmadd_ps(r, e, _mm256_set1_ps(1.0f));
	scale = _mm256_castsi256_ps(_mm256_slli_epi32(
	    _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23));
	e = _mm256_mul_ps(e, scale);
	return _mm256_andnot_ps(_mm256_cmp_ps(d, _mm256_set1_ps(-87.0f), _CMP_LT_OQ), e);
}

/* lp_sample_weight on 8 lanes: trunc(p 2^40) = a 2^20 + trunc(b) with
 * a = trunc(p 2^20) and b = p 2^40 - a 2^20, both exact in float (a <=
 * 2^20, b < 2^20), so that 32-bit conversions do. */
AVX2_INLINE void weights8(__m256 p, uint64_t w[8])
{
	const __m256 two20 = _mm256_set1_ps(1048576.0f);
	__m256 v = _mm256_mul_ps(p, _mm256_set1_ps(1099511627776.0f));
	__m256i a = _mm256_cvttps_epi32(_mm256_mul_ps(p, two20));
	__m256i t =
	    _mm256_cvttps_epi32(_mm256_sub_ps(v, _mm256_mul_ps(_mm256_cvtepi32_ps(a), two20)));
	__m256i lo = _mm256_add_epi64(
	    _mm256_slli_epi64(_mm256_cvtepu32_epi64(_mm256_castsi256_si128(a)), 20),
	    _mm256_cvtepu32_epi64(_mm256_castsi256_si128(t)));
	__m256i hi = _mm256_add_epi64(
	    _mm256_slli_epi64(_mm256_cvtepu32_epi64(_mm256_extracti128_si256(a, 1)), 20),
	    _mm256_cvtepu32_epi64(_mm256_extracti128_si256(t, 1)));

	_mm256_storeu_si256((__m256i *)w, lo);
	_mm256_storeu_si256((__m256i *)(w + 4), hi);
}

AVX2 static float values_avx2(const float *l, float *v, int n, float t)
{
	__m256 vt = _mm256_set1_ps(t), best = _mm256_set1_ps(-INFINITY), zero = _mm256_setzero_ps();
	float lanes[8], m;
	int i = 0;

	for (; i + 8 <= n; i += 8) {
		__m256 x = _mm256_div_ps(_mm256_loadu_ps(l + i), vt);

		x = _mm256_blendv_ps(x, _mm256_set1_ps(-INFINITY),
		                     _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
		x = _mm256_andnot_ps(_mm256_cmp_ps(x, zero, _CMP_EQ_OQ), x); /* -0 -> +0 */
		_mm256_storeu_ps(v + i, x);
		best = _mm256_max_ps(best, x);
	}
	_mm256_storeu_ps(lanes, best);
	m = values_scalar(l + i, v + i, n - i, t);
	for (int j = 0; j < 8; j++)
		m = lanes[j] > m ? lanes[j] : m;
	return m;
}

AVX2 static void buckets_avx2(const float *v, uint16_t *b, int n, float m, int *count)
{
	const __m256 vm = _mm256_set1_ps(m), scale = _mm256_set1_ps(-BUCKETS_PER_NAT);
	const __m256 last = _mm256_set1_ps((float)(N_BUCKETS - 1));
	int32_t lanes[8];
	int i = 0;

	for (; i + 8 <= n; i += 8) {
		__m256 f = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(v + i), vm), scale);

		/* f < last ? f : last, so that +inf (and big f) land in the last */
		f = _mm256_blendv_ps(last, f, _mm256_cmp_ps(f, last, _CMP_LT_OQ));
		_mm256_storeu_si256((__m256i *)lanes, _mm256_cvttps_epi32(f));
		for (int j = 0; j < 8; j++) {
			b[i + j] = (uint16_t)lanes[j];
			count[lanes[j]]++;
		}
	}
	buckets_scalar(v + i, b + i, n - i, m, count);
}

AVX2 static void masses_avx2(const float *v, const uint16_t *b, int n, float m, float min_p,
                             uint64_t *mass)
{
	const __m256 vm = _mm256_set1_ps(m), vmin = _mm256_set1_ps(min_p);
	int i = 0;

	for (; i + 8 <= n; i += 8) {
		__m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(v + i), vm));
		uint64_t w[8];

		weights8(_mm256_and_ps(p, _mm256_cmp_ps(p, vmin, _CMP_GE_OQ)), w);
		for (int j = 0; j < 8; j++)
			mass[b[i + j]] += w[j];
	}
	masses_scalar(v + i, b + i, n - i, m, min_p, mass);
}

/* argmax: the best value, then the first lane holding it */
AVX2 static int32_t argmax_avx2(const float *x, int n)
{
	__m256 best = _mm256_set1_ps(-INFINITY), vb;
	float lanes[8], m = -INFINITY;
	int i = 0;

	for (; i + 8 <= n; i += 8)
		best = _mm256_max_ps(_mm256_loadu_ps(x + i), best); /* NaN: keeps best */
	_mm256_storeu_ps(lanes, best);
	for (int j = 0; j < 8; j++)
		m = lanes[j] > m ? lanes[j] : m;
	for (int j = i; j < n; j++)
		m = x[j] > m ? x[j] : m;
	if (m == -INFINITY)
		return 0;
	vb = _mm256_set1_ps(m);
	for (i = 0; i + 8 <= n; i += 8) {
		int mask =
		    _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vb, _CMP_EQ_OQ));

		if (mask)
			return i + __builtin_ctz((unsigned)mask);
	}
	for (; i < n; i++)
		if (x[i] == m)
			return i;
	return 0;
}

AVX2 static double lse_avx2(const float *l, int n, float m)
{
	const __m256 vm = _mm256_set1_ps(m);
	double s = 0.0;
	int i = 0;

	while (i + 8 <= n) {
		__m256 acc = _mm256_setzero_ps();
		float lanes[8];

		for (int j = 0; j < 8 && i + 8 <= n; j++, i += 8) {
			__m256 x = _mm256_loadu_ps(l + i);
			__m256 e = exp8(_mm256_sub_ps(x, vm));

			acc = _mm256_add_ps(acc, _mm256_and_ps(e, _mm256_cmp_ps(x, x, _CMP_ORD_Q)));
		}
		_mm256_storeu_ps(lanes, acc);
		s += ((double)lanes[0] + lanes[4]) + ((double)lanes[1] + lanes[5]) +
		     (((double)lanes[2] + lanes[6]) + ((double)lanes[3] + lanes[7]));
	}
	return s + lse_scalar(l + i, n - i, m);
}
#endif

/* ---- one row ---- */

struct row_ctx {
	int vocab;
	float m; /* best value */
	const float *values;
	int32_t *order;
	int bucket_start[N_BUCKETS + 1];
	int next_bucket; /* buckets before it are sorted */
	int sorted;      /* rank positions sorted so far */
};

static inline bool ranks_before(const float *v, int32_t a, int32_t b)
{
	uint32_t ka = lp_sample_key(v[a]), kb = lp_sample_key(v[b]);

	return ka > kb || (ka == kb && a < b);
}

/* Heapsort of ids in rank order: bounded time whatever the row holds (a
 * flat row puts the whole vocabulary in one bucket). */
static void sift_down(int32_t *ids, int n, int i, const float *v)
{
	for (;;) {
		int c = 2 * i + 1;
		int32_t t;

		if (c >= n)
			return;
		if (c + 1 < n && ranks_before(v, ids[c], ids[c + 1]))
			c++;
		if (!ranks_before(v, ids[i], ids[c]))
			return;
		t = ids[i];
		ids[i] = ids[c];
		ids[c] = t;
		i = c;
	}
}

static void sort_by_rank(int32_t *ids, int n, const float *v)
{
	for (int i = n / 2 - 1; i >= 0; i--)
		sift_down(ids, n, i, v);
	for (int end = n - 1; end > 0; end--) {
		int32_t t = ids[0];

		ids[0] = ids[end];
		ids[end] = t;
		sift_down(ids, end, 0, v);
	}
}

/* The id at rank position j (j below the candidates gathered), sorting
 * buckets up to it first. */
static inline int32_t rank_at(struct row_ctx *c, int j)
{
	while (j >= c->sorted) {
		int b = c->next_bucket++;
		int n = c->bucket_start[b + 1] - c->bucket_start[b];

		if (n > 1)
			sort_by_rank(c->order + c->bucket_start[b], n, c->values);
		c->sorted = c->bucket_start[b + 1];
	}
	return c->order[j];
}

static inline float prob_of(const struct row_ctx *c, int32_t id)
{
	return lp_sample_exp(c->values[id] - c->m);
}

/* The first bucket at which a running sum over the buckets (in rank order)
 * reaches target (strict: exceeds it); an empty bucket is never the one. */
static int bucket_reaching(const uint64_t *sum, const int *count, uint64_t target, bool strict)
{
	uint64_t acc = 0;

	for (int b = 0; b < N_BUCKETS; b++) {
		acc += sum[b];
		if (count[b] && (strict ? acc > target : acc >= target))
			return b;
	}
	return N_BUCKETS - 1;
}

/* The sampled token of a row whose best value m is finite. */
static int32_t draw_row(struct row_ctx *c, const struct lp_sample_row *r, bool avx2,
                        uint16_t *bucket)
{
	const int vocab = c->vocab;
	const int k = r->top_k > 0 && r->top_k < vocab ? r->top_k : 0;
	const bool p_on = r->top_p < 1.0f;
	int len = k ? k : vocab, count[N_BUCKETS] = {0}, last, pos[N_BUCKETS];
	uint64_t bucket_mass[N_BUCKETS] = {0}, mass = 0, target, acc = 0;

#if LP_CPU_X86
	if (avx2)
		buckets_avx2(c->values, bucket, vocab, c->m, count);
	else
#endif
		buckets_scalar(c->values, bucket, vocab, c->m, count);

	/* the last bucket any walk reaches: top-k's cut by the counts, else
	 * top-p's cut or (neither) the draw by the masses, whose min-p
	 * filter applies before a draw only when top-p does not come first */
	if (k) {
		uint64_t cnt[N_BUCKETS];

		for (int b = 0; b < N_BUCKETS; b++)
			cnt[b] = (uint64_t)count[b];
		last = bucket_reaching(cnt, count, (uint64_t)k, false);
	} else {
#if LP_CPU_X86
		if (avx2)
			masses_avx2(c->values, bucket, vocab, c->m, p_on ? 0.0f : r->min_p,
			            bucket_mass);
		else
#endif
			masses_scalar(c->values, bucket, vocab, c->m, p_on ? 0.0f : r->min_p,
			              bucket_mass);
		for (int b = 0; b < N_BUCKETS; b++)
			mass += bucket_mass[b];
		target = lp_sample_fraction(p_on ? r->top_p : r->u, mass);
		last = bucket_reaching(bucket_mass, count, target, !p_on);
	}

	/* gather the candidates of buckets 0 .. last, ids ascending inside
	 * each */
	c->bucket_start[0] = 0;
	for (int b = 0; b < N_BUCKETS; b++) {
		c->bucket_start[b + 1] = c->bucket_start[b] + (b <= last ? count[b] : 0);
		pos[b] = c->bucket_start[b];
	}
	for (int i = 0; i < vocab; i++)
		if (bucket[i] <= last)
			c->order[pos[bucket[i]]++] = i;
	c->next_bucket = 0;
	c->sorted = 0;
	/* every walk ends inside the gathered buckets; the bound only keeps
	 * rank_at within them */
	if (len > c->bucket_start[last + 1])
		len = c->bucket_start[last + 1];

	/* top-p over what top-k left (or the whole row, whose mass is known) */
	if (p_on) {
		if (k) {
			mass = 0;
			for (int j = 0; j < len; j++)
				mass += lp_sample_weight(prob_of(c, rank_at(c, j)));
		}
		target = lp_sample_fraction(r->top_p, mass);
		acc = 0;
		for (int j = 0; j < len; j++) {
			acc += lp_sample_weight(prob_of(c, rank_at(c, j)));
			if (acc >= target) {
				len = j + 1;
				break;
			}
		}
	}
	/* min-p (p >= min_p; the best has p = 1) over the kept prefix; with
	 * neither cut, the bucket masses hold it already */
	if (k || p_on) {
		mass = 0;
		for (int j = 0; j < len; j++) {
			float p = prob_of(c, rank_at(c, j));

			mass += p >= r->min_p ? lp_sample_weight(p) : 0;
		}
	}
	target = lp_sample_fraction(r->u, mass);
	acc = 0;
	for (int j = 0; j < len; j++) {
		int32_t id = rank_at(c, j);
		float p = prob_of(c, id);

		if (p < r->min_p)
			continue;
		acc += lp_sample_weight(p);
		if (acc > target)
			return id;
	}
	return rank_at(c, 0); /* unreachable: target < mass */
}

/* Argmax by rank: the best value, ties to the lower id (NaN never wins, -0
 * ties +0; a row of -inf and NaN gives 0). */
static int32_t argmax(const float *x, int n, bool avx2)
{
#if LP_CPU_X86
	if (avx2)
		return argmax_avx2(x, n);
#endif
	float best = -INFINITY;
	int32_t id = 0;

	for (int i = 0; i < n; i++)
		if (x[i] > best) {
			best = x[i];
			id = i;
		}
	return id;
}

struct sample_job {
	struct lp_cpu *cpu;
	const struct lp_sample_args *args;
	struct sample_scratch *s;
};

/* Whether row's parameters, penalties and entries are in range
 * (sample-math.h); records the failure when not. */
static bool row_ok(struct lp_cpu *cpu, const struct lp_sample_args *a, int row, int vocab)
{
	const struct lp_sample_row *r = &a->rows[row];
	const struct lp_sample_penalty *pen;

	if (!lp_sample_row_ok(r, a->max_logprobs)) {
		lp_cpu_fail(cpu, -EINVAL,
		            "sample: row %d: temperature %g, top_p %g, min_p %g, u %g, %d logprobs "
		            "(at most %d)",
		            row, (double)r->temperature, (double)r->top_p, (double)r->min_p,
		            (double)r->u, r->n_logprobs, a->max_logprobs);
		return false;
	}
	if (!lp_sample_penalties_ok(r, vocab)) {
		lp_cpu_fail(cpu, -EINVAL,
		            "sample: row %d: repetition_penalty %g, frequency_penalty %g, "
		            "presence_penalty %g, %d penalty entries at %d (vocabulary %d)",
		            row, (double)r->repetition_penalty, (double)r->frequency_penalty,
		            (double)r->presence_penalty, r->pen_n, r->pen_off, vocab);
		return false;
	}
	if (r->pen_n > 0 && !a->pen) {
		lp_cpu_fail(cpu, -EINVAL, "sample: row %d: %d penalty entries and no pen array",
		            row, r->pen_n);
		return false;
	}
	pen = r->pen_n > 0 ? a->pen + r->pen_off : NULL;
	for (int j = 0; j < r->pen_n; j++)
		if (!lp_sample_entry_ok(&pen[j], vocab)) {
			lp_cpu_fail(cpu, -EINVAL,
			            "sample: row %d: penalty entry %d: token %d, count %d, bias %g "
			            "(vocabulary %d)",
			            row, j, pen[j].token, pen[j].count, (double)pen[j].bias, vocab);
			return false;
		}
	return true;
}

static void sample_row(const struct sample_job *job, int row, int thread)
{
	const struct lp_sample_args *a = job->args;
	const struct lp_sample_row *r = &a->rows[row];
	const int vocab = (int)a->logits->cols, n_top = a->max_logprobs;
	const float *l = (const float *)a->logits->data + (size_t)row * (size_t)vocab;
	struct sample_scratch *s = job->s;
	const bool avx2 = job->cpu->avx2;
	int32_t *top =
	    s->top + (size_t)thread * (size_t)(s->max_logprobs > 0 ? s->max_logprobs : 1);
	int32_t *top_ids = a->top_ids ? a->top_ids + (size_t)row * (size_t)n_top : NULL;
	float *top_lp = a->top_logprobs ? a->top_logprobs + (size_t)row * (size_t)n_top : NULL;
	const struct lp_sample_penalty *pen;
	float *values = s->values + (size_t)thread * (size_t)s->vocab;
	const float *x = l; /* the row sampled from: l, or values once penalised */
	int32_t token, n_best = 0;
	uint32_t raw_key;
	float m_raw;
	double log_z = 0.0, n_max = 1.0;
	int want;

	for (int j = 0; j < n_top; j++) {
		if (top_ids)
			top_ids[j] = -1;
		if (top_lp)
			top_lp[j] = -INFINITY;
	}
	if (!row_ok(job->cpu, a, row, vocab)) {
		a->tokens[row] = 0;
		if (a->logprob)
			a->logprob[row] = -INFINITY;
		return;
	}
	pen = r->pen_n > 0 ? a->pen + r->pen_off : NULL;

	/* log-softmax of the raw row (l, never written: the penalties go to
	 * a copy below): with an infinite best, the candidates equal to it
	 * share the mass and the others get none */
	token = argmax(l, vocab, avx2);
	raw_key = lp_sample_key(l[token]);
	m_raw = lp_sample_key_value(raw_key);
	want = r->n_logprobs < vocab ? r->n_logprobs : vocab;
	if (isfinite(m_raw) && (a->logprob || want > 0)) {
#if LP_CPU_X86
		if (avx2)
			log_z = log(lse_avx2(l, vocab, m_raw));
		else
#endif
			log_z = log(lse_scalar(l, vocab, m_raw));
	} else if (!isfinite(m_raw)) {
		n_max = 0;
		for (int i = 0; i < vocab; i++)
			n_max += lp_sample_key(l[i]) == raw_key;
	}
#define LOGPROB(id)                                                                                \
	(isfinite(m_raw) ? (l[id] == l[id] ? (float)((double)l[id] - m_raw - log_z) : -INFINITY)   \
	                 : (lp_sample_key(l[id]) == raw_key ? (float)-log(n_max) : -INFINITY))

	/* top-N by the raw logits, best first; most candidates fall below
	 * the N-th best so far by a plain comparison */
	for (int i = 0; i < vocab && want > 0; i++) {
		uint64_t rank;
		int j;

		if (n_best == want && l[i] < l[top[n_best - 1]])
			continue;
		rank = lp_sample_rank(lp_sample_key(l[i]), i);
		if (n_best == want &&
		    rank <= lp_sample_rank(lp_sample_key(l[top[n_best - 1]]), top[n_best - 1]))
			continue;
		j = n_best < want ? n_best++ : want - 1;
		for (; j > 0 && rank > lp_sample_rank(lp_sample_key(l[top[j - 1]]), top[j - 1]);
		     j--)
			top[j] = top[j - 1];
		top[j] = i;
	}
	for (int j = 0; j < n_best; j++) {
		if (top_ids)
			top_ids[j] = top[j];
		if (top_lp)
			top_lp[j] = LOGPROB(top[j]);
	}

	/* the bias and penalties, on a copy: the row with its entries' tokens
	 * penalised, which greedy and the values below read instead of l */
	if (pen) {
		memcpy(values, l, (size_t)vocab * sizeof(float));
		for (int j = 0; j < r->pen_n; j++)
			values[pen[j].token] = lp_sample_penalise(l[pen[j].token], r, &pen[j]);
		x = values;
		if (r->temperature == 0.0f)
			token = argmax(x, vocab, avx2);
	}

	if (r->temperature > 0.0f) {
		struct row_ctx c = {.vocab = vocab};

		/* values may be x itself: each lane reads its logit first */
#if LP_CPU_X86
		if (avx2)
			c.m = values_avx2(x, values, vocab, r->temperature);
		else
#endif
			c.m = values_scalar(x, values, vocab, r->temperature);
		c.values = values;
		c.order = s->order + (size_t)thread * (size_t)s->vocab;
		if (isfinite(c.m))
			token =
			    draw_row(&c, r, avx2, s->bucket + (size_t)thread * (size_t)s->vocab);
		else /* +inf takes all the mass; all -inf has none to share */
			token = argmax(values, vocab, avx2);
	}
	a->tokens[row] = token;
	if (a->logprob)
		a->logprob[row] = LOGPROB(token);
#undef LOGPROB
}

static void sample_chunk(void *arg, int chunk, int n_chunks, int thread)
{
	const struct sample_job *job = arg;
	int64_t r0, r1;

	lp_cpu_split(job->args->n, chunk, n_chunks, &r0, &r1);
	for (int64_t r = r0; r < r1; r++)
		sample_row(job, (int)r, thread);
}

void lp_cpu_sample(struct lp_cpu *cpu, const struct lp_sample_args *args)
{
	struct sample_job job = {cpu, args, cpu->sample_scratch};
	const struct lp_tensor *lg = args->logits;

	if (!job.s) {
		lp_cpu_fail(cpu, -EINVAL, "sample: the backend was not reserved");
		return;
	}
	if (lg->type != LP_DTYPE_F32 || lg->cols < 1 || lg->cols > job.s->vocab || args->n < 0 ||
	    args->n > lg->rows || args->max_logprobs < 0 ||
	    args->max_logprobs > job.s->max_logprobs || !args->rows || !args->tokens) {
		lp_cpu_fail(cpu, -EINVAL,
		            "sample: %d rows of [%lld, %lld] logits, %d logprobs (reserved %d "
		            "tokens, %d logprobs)",
		            args->n, (long long)lg->rows, (long long)lg->cols, args->max_logprobs,
		            job.s->vocab, job.s->max_logprobs);
		return;
	}
	lp_cpu_parallel(cpu, (int64_t)args->n * lg->cols, args->n, sample_chunk, &job);
}
