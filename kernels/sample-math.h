/* The arithmetic of the sample op (kernels/backend.h, struct lp_sample_row)
 * that its backends share: kernels/cpu/sample.c and kernels/cuda/sample.cu
 * include this one definition, so that both rank, weigh and cut a row's
 * candidates bit for bit alike and the device op returns the CPU op's token
 * for the same u.
 *
 * - A candidate's value is its logit divided by the temperature (IEEE
 *   division, correctly rounded on both sides), NaN taken as -inf and -0 as
 *   +0. Candidates rank by value, ties to the lower id: lp_sample_rank()
 *   orders them as unsigned integers, larger first.
 * - p = lp_sample_exp(value - best value), written with explicit fused
 *   multiply-adds and no other arithmetic that a compiler could contract,
 *   so that the CPU and the device compute the same bits.
 * - Masses are sums of p in fixed point (lp_sample_weight: p * 2^40,
 *   truncated), in 64-bit integers: sums are exact whatever their order,
 *   which is what lets a device reduce in parallel and still agree with
 *   the CPU's sequential walk. 2^40 leaves room for 2^24 candidates of
 *   weight 1; a p below 2^-40 weighs nothing.
 * - Cuts and the draw compare integers: top-p keeps the shortest prefix
 *   whose weight reaches lp_sample_fraction(top_p, mass), the draw takes the
 *   first kept candidate whose running weight exceeds lp_sample_fraction(u,
 *   kept weight).
 * - A penalised logit (lp_sample_penalise) is the host sampler's
 *   apply_bias and apply_penalties (agent/engine/sampler.c) operation for
 *   operation: logit + bias, a division or a product, then logit -
 *   (count * frequency + presence) with each rounded on its own, as the
 *   host's C (built without contraction) rounds them. nvcc and the
 *   emulation's g++ (-ffp-contract=fast) would fuse the product into the
 *   sums, so there they go through the _rn intrinsics, which are never
 *   contracted.
 *
 * Header-only; compiled as C (CPU), CUDA (nvcc) and C++ (emulation). The C
 * build relies on the Makefile's -std=c11, under which GCC does not
 * contract (clang contracts within one expression only, and none of the
 * expressions here holds both a product and a sum). */
#ifndef LP_KERNELS_SAMPLE_MATH_H
#define LP_KERNELS_SAMPLE_MATH_H

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "kernels/backend.h"

#ifdef __CUDACC__
#define LP_SAMPLE_FN static __host__ __device__ __forceinline__
#else
#define LP_SAMPLE_FN static inline __attribute__((always_inline))
#endif

/* One rounding per operation, whatever the compiler's contraction (device
 * code, and the emulation built with -ffp-contract=fast; nvcc's host pass
 * calls none of this). */
#if defined(__CUDA_ARCH__) || defined(LP_CUDA_EMU)
#ifdef LP_CUDA_EMU
#include "kernels/cuda/emu/emu.h" /* the _rn intrinsics */
#endif
#define LP_SAMPLE_MUL(a, b) __fmul_rn((a), (b))
#define LP_SAMPLE_ADD(a, b) __fadd_rn((a), (b))
#define LP_SAMPLE_SUB(a, b) __fsub_rn((a), (b))
#else
#define LP_SAMPLE_MUL(a, b) ((a) * (b))
#define LP_SAMPLE_ADD(a, b) ((a) + (b))
#define LP_SAMPLE_SUB(a, b) ((a) - (b))
#endif

#define LP_SAMPLE_ONE         (1ull << 40) /* weight of p = 1 */
#define LP_SAMPLE_NEG_INF_KEY 0x007fffffu  /* lp_sample_key(-inf), also NaN's */

/* The value a logit ranks by at temperature t > 0. */
LP_SAMPLE_FN float lp_sample_value(float logit, float t)
{
	float x = logit / t;

	if (x != x)
		return -INFINITY;
	return x == 0.0f ? 0.0f : x;
}

/* An unsigned integer that orders values as floats do (NaN as -inf, -0 as
 * +0): a larger key is a larger value. */
LP_SAMPLE_FN uint32_t lp_sample_key(float x)
{
	uint32_t u;

	if (x != x)
		return LP_SAMPLE_NEG_INF_KEY;
	if (x == 0.0f)
		x = 0.0f;
	memcpy(&u, &x, sizeof(u));
	return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* The value of a key (the inverse of lp_sample_key). */
LP_SAMPLE_FN float lp_sample_key_value(uint32_t key)
{
	uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
	float x;

	memcpy(&x, &u, sizeof(x));
	return x;
}

/* Rank order as one integer: value first, then the lower id; larger ranks
 * first. */
LP_SAMPLE_FN uint64_t lp_sample_rank(uint32_t key, int32_t id)
{
	return ((uint64_t)key << 32) | (uint64_t)(0xffffffffu - (uint32_t)id);
}

LP_SAMPLE_FN int32_t lp_sample_rank_id(uint64_t rank)
{
	return (int32_t)(0xffffffffu - (uint32_t)rank);
}

/* e^d for d <= 0, within about 2e-7 relative, exactly 1 at 0 and 0 below
 * -87 (-inf included): e^d = 2^n e^r, n = round(d / ln 2), |r| <= ln(2)/2,
 * and a degree-6 Taylor polynomial for e^r. Every multiply-add is an fmaf,
 * and nothing else adds a product, so no compiler contracts differently. */
LP_SAMPLE_FN float lp_sample_exp(float d)
{
	const float round = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
	float x = d < -87.0f ? -87.0f : d;
	float n = fmaf(x, 1.44269504f, round) - round;
	float r = fmaf(-n, 0.693145751953125f, x);
	float e, scale;
	int32_t bits;

	r = fmaf(-n, 1.42860677e-6f, r);
	e = fmaf(r, 1.0f / 720, 1.0f / 120);
	e = fmaf(r, e, 1.0f / 24);
	e = fmaf(r, e, 1.0f / 6);
	e = fmaf(r, e, 0.5f);
	e = fmaf(r, e, 1.0f);
	e = fmaf(r, e, 1.0f);
	bits = ((int32_t)n + 127) * (1 << 23); /* n in [-126, 0] */
	memcpy(&scale, &bits, sizeof(scale));
	return d < -87.0f ? 0.0f : e * scale;
}

/* A probability relative to the best (p in [0, 1]) in fixed point. */
LP_SAMPLE_FN uint64_t lp_sample_weight(float p)
{
	return (uint64_t)(p * 1099511627776.0f); /* 2^40: exact scaling */
}

/* floor(f * mass), f in [0, 1]: a fraction of a weight. */
LP_SAMPLE_FN uint64_t lp_sample_fraction(float f, uint64_t mass)
{
	return (uint64_t)((double)f * (double)mass);
}

/* The rank key and weight of candidate id at temperature t with best value
 * m; *p is its probability relative to the best (for min-p). */
LP_SAMPLE_FN uint64_t lp_sample_candidate(float logit, float t, float m, float *p)
{
	*p = lp_sample_exp(lp_sample_value(logit, t) - m);
	return lp_sample_weight(*p);
}

/* Whether a row's parameters are in range (backend.h): temperature finite
 * and >= 0, top_p in (0, 1], min_p in [0, 1], u in [0, 1), n_logprobs in
 * 0 .. max_logprobs. The comparisons fail on NaN. */
LP_SAMPLE_FN bool lp_sample_row_ok(const struct lp_sample_row *r, int max_logprobs)
{
	return r->temperature >= 0.0f && r->temperature <= 3.0e38f && r->top_p > 0.0f &&
	       r->top_p <= 1.0f && r->min_p >= 0.0f && r->min_p <= 1.0f && r->u >= 0.0f &&
	       r->u < 1.0f && r->n_logprobs >= 0 && r->n_logprobs <= max_logprobs;
}

/* Whether a row's penalties are in range, as lp_sampling_params_check
 * allows them (repetition_penalty finite and > 0, frequency and presence
 * in [-2, 2]), with a slice of at most vocab entries (they are distinct
 * tokens) inside int32. A row without entries (pen_n 0) reads none of
 * them: a zero-initialised row stays valid. */
LP_SAMPLE_FN bool lp_sample_penalties_ok(const struct lp_sample_row *r, int vocab)
{
	if (r->pen_n == 0)
		return true;
	return r->pen_n > 0 && r->pen_n <= vocab && r->pen_off >= 0 &&
	       r->pen_off <= INT32_MAX - r->pen_n && r->repetition_penalty > 0.0f &&
	       r->repetition_penalty <= 3.4028235e38f && r->frequency_penalty >= -2.0f &&
	       r->frequency_penalty <= 2.0f && r->presence_penalty >= -2.0f &&
	       r->presence_penalty <= 2.0f;
}

/* Whether an entry can belong to a row of vocab tokens (a finite bias:
 * the comparisons fail on NaN). */
LP_SAMPLE_FN bool lp_sample_entry_ok(const struct lp_sample_penalty *e, int vocab)
{
	return e->token >= 0 && e->token < vocab && e->count >= 0 && e->bias >= -3.4028235e38f &&
	       e->bias <= 3.4028235e38f;
}

/* The logit of entry e's token after its bias and row r's penalties: the
 * bias (OpenAI's logit_bias), then the repetition penalty (HF / vLLM)
 * when the token was generated or is in the prompt, then the frequency
 * and presence penalties (OpenAI) when it was generated; each is skipped
 * when it is off, as the host skips it. */
LP_SAMPLE_FN float lp_sample_penalise(float logit, const struct lp_sample_row *r,
                                      const struct lp_sample_penalty *e)
{
	const float rep = r->repetition_penalty;
	const float freq = r->frequency_penalty, pres = r->presence_penalty;

	if (e->bias != 0.0f)
		logit = LP_SAMPLE_ADD(logit, e->bias);
	if (rep != 1.0f && (e->count > 0 || e->in_prompt))
		logit = logit > 0.0f ? logit / rep : LP_SAMPLE_MUL(logit, rep);
	if ((freq != 0.0f || pres != 0.0f) && e->count > 0) {
		float d = LP_SAMPLE_MUL((float)e->count, freq);

		d = LP_SAMPLE_ADD(d, pres);
		logit = LP_SAMPLE_SUB(logit, d);
	}
	return logit;
}

#endif
