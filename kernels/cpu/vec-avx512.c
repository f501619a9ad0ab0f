/* AVX-512 kernels of the CPU backend; see cpu.h.
 *
 * Like vec-avx2.c, every function carries a target attribute and is only
 * called after lp_cpu_has_avx512() said yes. Each kernel here computes every
 * output element with the same f32 operations in the same order as its AVX2
 * counterpart, on registers twice as wide, so that results are the same bits
 * whichever of the two runs. */
#include "kernels/cpu/cpu.h"

#if LP_CPU_X86

#include <string.h>

#include "kernels/cpu/vec-x86.h"

#define AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
#define AVX512_INLINE                                                                              \
	static inline __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"),   \
	                             always_inline))

/* AVX-512 F, VL, BW and DQ with the OS saving the ZMM state, which
 * __builtin_cpu_supports checks. */
bool lp_cpu_has_avx512(void)
{
	__builtin_cpu_init();
	return lp_cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
	       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
	       __builtin_cpu_supports("avx512dq");
}

AVX512_INLINE uint16_t load_u16(const void *p)
{
	uint16_t v;
	memcpy(&v, p, sizeof(v));
	return v;
}

/* 8 bytes at a | 8 bytes at b, as the low 128 bits */
AVX512_INLINE __m128i join_i128(const void *a, const void *b)
{
	return _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)a),
	                          _mm_loadl_epi64((const __m128i *)b));
}

/* mr rows of x times one packed panel (LP_CPU_NR = 16 columns: one
 * register per row), into an mr x ncols tile of out. Each element is one
 * fused multiply-add chain in kk order, as gemm_tile in vec-avx2.c. */
AVX512_INLINE void gemm_tile(const int mr, int64_t kc, const float *x, int64_t ldx,
                             const float *panel, float *out, int64_t ldo, __mmask16 m, bool load)
{
	__m512 c[LP_CPU_MR512];

#pragma GCC unroll 16
	for (int r = 0; r < mr; r++)
		c[r] = load ? _mm512_maskz_loadu_ps(m, out + r * ldo) : _mm512_setzero_ps();
	for (int64_t kk = 0; kk < kc; kk++) {
		__m512 b = _mm512_load_ps(panel + kk * LP_CPU_NR);
#pragma GCC unroll 16
		for (int r = 0; r < mr; r++)
			c[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + kk]), b, c[r]);
	}
#pragma GCC unroll 16
	for (int r = 0; r < mr; r++)
		_mm512_mask_storeu_ps(out + r * ldo, m, c[r]);
}

_Static_assert(LP_CPU_NR == 16, "one AVX-512 register per row of a panel");

#define TILE_CASE(N)                                                                               \
	case N:                                                                                    \
		gemm_tile(N, kc, x + i * ldx, ldx, panel, out + i * ldo, ldo, m, load);            \
		break

AVX512 void lp_cpu_gemm_panel_avx512(int n, int64_t kc, const float *x, int64_t ldx,
                                     const float *panel, float *out, int64_t ldo, int ncols,
                                     bool load)
{
	__mmask16 m = (__mmask16)((1u << ncols) - 1);
	int i = 0;

	for (; i + LP_CPU_MR512 <= n; i += LP_CPU_MR512)
		gemm_tile(LP_CPU_MR512, kc, x + i * ldx, ldx, panel, out + i * ldo, ldo, m, load);
	switch (n - i) {
		TILE_CASE(11);
		TILE_CASE(10);
		TILE_CASE(9);
		TILE_CASE(8);
		TILE_CASE(7);
		TILE_CASE(6);
		TILE_CASE(5);
		TILE_CASE(4);
		TILE_CASE(3);
		TILE_CASE(2);
		TILE_CASE(1);
	default:
		break;
	}
}

/* gemm_tile for 32 columns, panel a's 16 then panel b's (mask mb): two
 * registers per row, so that each broadcast of x serves both. */
AVX512_INLINE void gemm_tile2(const int mr, int64_t kc, const float *x, int64_t ldx,
                              const float *pa, const float *pb, float *out, int64_t ldo,
                              __mmask16 mb, bool load)
{
	__m512 c0[LP_CPU_MR512], c1[LP_CPU_MR512];

#pragma GCC unroll 16
	for (int r = 0; r < mr; r++) {
		c0[r] = load ? _mm512_loadu_ps(out + r * ldo) : _mm512_setzero_ps();
		c1[r] = load ? _mm512_maskz_loadu_ps(mb, out + r * ldo + 16) : _mm512_setzero_ps();
	}
	for (int64_t kk = 0; kk < kc; kk++) {
		__m512 a = _mm512_load_ps(pa + kk * LP_CPU_NR);
		__m512 b = _mm512_load_ps(pb + kk * LP_CPU_NR);
#pragma GCC unroll 16
		for (int r = 0; r < mr; r++) {
			__m512 xv = _mm512_set1_ps(x[r * ldx + kk]);
			c0[r] = _mm512_fmadd_ps(xv, a, c0[r]);
			c1[r] = _mm512_fmadd_ps(xv, b, c1[r]);
		}
	}
#pragma GCC unroll 16
	for (int r = 0; r < mr; r++) {
		_mm512_storeu_ps(out + r * ldo, c0[r]);
		_mm512_mask_storeu_ps(out + r * ldo + 16, mb, c1[r]);
	}
}

#define TILE2_CASE(N)                                                                              \
	case N:                                                                                    \
		gemm_tile2(N, kc, x + i * ldx, ldx, panel, panel2, out + i * ldo, ldo, mb, load);  \
		break

AVX512 void lp_cpu_gemm_panels_avx512(int n, int64_t kc, const float *x, int64_t ldx,
                                      const float *panel, const float *panel2, float *out,
                                      int64_t ldo, int ncols2, bool load)
{
	__mmask16 mb = (__mmask16)((1u << ncols2) - 1);
	int i = 0;

	for (; i + LP_CPU_MR512 <= n; i += LP_CPU_MR512)
		gemm_tile2(LP_CPU_MR512, kc, x + i * ldx, ldx, panel, panel2, out + i * ldo, ldo,
		           mb, load);
	switch (n - i) {
		TILE2_CASE(11);
		TILE2_CASE(10);
		TILE2_CASE(9);
		TILE2_CASE(8);
		TILE2_CASE(7);
		TILE2_CASE(6);
		TILE2_CASE(5);
		TILE2_CASE(4);
		TILE2_CASE(3);
		TILE2_CASE(2);
		TILE2_CASE(1);
	default:
		break;
	}
}

/* lp_cpu_dequant_avx2's operations, 16 weights at a time. */
AVX512 void lp_cpu_dequant_avx512(enum lp_dtype t, const void *row, int64_t k0, int64_t len,
                                  float *dst)
{
	const bool has_m = t == LP_DTYPE_Q4_1 || t == LP_DTYPE_Q5_1;
	const bool five = t == LP_DTYPE_Q5_0 || t == LP_DTYPE_Q5_1;
	size_t bb = lp_dtype_block_bytes(t);
	const uint8_t *p;

	if (t != LP_DTYPE_Q4_0 && t != LP_DTYPE_Q4_1 && t != LP_DTYPE_Q5_0 && t != LP_DTYPE_Q5_1 &&
	    t != LP_DTYPE_Q8_0) {
		lp_cpu_dequant_avx2(t, row, k0, len, dst);
		return;
	}
	p = (const uint8_t *)row + (size_t)(k0 / LP_QK) * bb;
	for (int64_t i = 0; i < len; i += LP_QK, p += bb) {
		__m128 dm = _mm_cvtph_ps(_mm_loadu_si32(p));
		__m512 dv = _mm512_broadcastss_ps(dm);
		__m512 mv = _mm512_broadcastss_ps(_mm_movehdup_ps(dm));
		__m512 v[2];

		if (t == LP_DTYPE_Q8_0) {
			v[0] = _mm512_cvtepi32_ps(
			    _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 2))));
			v[1] = _mm512_cvtepi32_ps(
			    _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 18))));
			_mm512_storeu_ps(dst + i, _mm512_mul_ps(dv, v[0]));
			_mm512_storeu_ps(dst + i + 16, _mm512_mul_ps(dv, v[1]));
			continue;
		}
		size_t qs = (has_m ? 4 : 2) + (five ? 4 : 0);
		__m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + qs)));
		__m512i q[2] = {_mm512_and_si512(b, _mm512_set1_epi32(0x0f)),
		                _mm512_srli_epi32(b, 4)};

		if (five) {
			/* bit j of qh (j < 16) goes to weight j, bit 16 + j to 16 + j */
			__m512i h = _mm512_set1_epi32((int)load_u32(p + (has_m ? 4 : 2)));
			const __m512i lane =
			    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
			const __m512i one = _mm512_set1_epi32(1);
			for (int s = 0; s < 2; s++)
				q[s] = _mm512_or_si512(
				    q[s], _mm512_slli_epi32(
				              _mm512_and_si512(
				                  _mm512_srlv_epi32(
				                      h, _mm512_add_epi32(
				                             lane, _mm512_set1_epi32(16 * s))),
				                  one),
				              4));
		}
		for (int s = 0; s < 2; s++) {
			__m512 w;
			if (t == LP_DTYPE_Q5_0)
				w = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_sub_epi32(
				                          q[s], _mm512_set1_epi32(16))));
			else if (has_m)
				w = _mm512_add_ps(_mm512_mul_ps(dv, _mm512_cvtepi32_ps(q[s])), mv);
			else /* Q4_0 */
				w = _mm512_mul_ps(dv, _mm512_sub_ps(_mm512_cvtepi32_ps(q[s]),
				                                    _mm512_set1_ps(8.0f)));
			_mm512_storeu_ps(dst + i + 16 * s, w);
		}
	}
}

/* The matrix-vector kernels.
 *
 * vec-avx2.c's kernels keep two accumulators per row of x, acc0 and acc1
 * (even and odd blocks; or the low and high nibbles of a K-quant's bytes),
 * and feed each a chain of multiply-adds, one 8-float register at a time.
 * Here one 16-float register holds both, [acc0 | acc1], and every
 * multiply-add serves the two chains at once: the weights' registers hold
 * the even block (or low side) in lanes 0-7 and the odd one in lanes 8-15,
 * and the prepared x is interleaved to match (lp_cpu_matvec_prep_avx512).
 * Work that the AVX2 kernel gives one accumulator alone is masked to its
 * half. Each lane thus sees the AVX2 kernel's operations in its order. */

/* [lo | hi] as one register */
AVX512_INLINE __m512 join(__m256 lo, __m256 hi)
{
	return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}

AVX512_INLINE __m512i join_i(__m256i lo, __m256i hi)
{
	return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* hsum(acc0 + acc1), as vec-avx2.c's kernels end */
AVX512_INLINE float hsum_halves(__m512 a)
{
	return hsum(_mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1)));
}

AVX512_INLINE void store_out(float *out, int64_t ldo, int64_t r, int j, float s, bool accumulate)
{
	float *o = out + j * ldo + r;
	*o = accumulate ? *o + s : s;
}

/* load_q4 of vec-avx2.c for two blocks: lanes 0-7 block a, 8-15 block b */
AVX512_INLINE void load_q4x2(const uint8_t *qa, const uint8_t *qb, __m512 w[4])
{
	const __m512i m0 = _mm512_setr_epi32(0xf, 0xf, 0xf, 0xf, 0xf0, 0xf0, 0xf0, 0xf0, 0xf, 0xf,
	                                     0xf, 0xf, 0xf0, 0xf0, 0xf0, 0xf0);
	const __m512i m1 = _mm512_slli_epi32(m0, 8);
	__m512i v = join_i(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qa)),
	                   _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qb)));
	__m512i u = _mm512_srli_epi32(v, 16);

	w[0] = _mm512_cvtepi32_ps(_mm512_and_si512(v, m0));
	w[1] = _mm512_cvtepi32_ps(_mm512_and_si512(v, m1));
	w[2] = _mm512_cvtepi32_ps(_mm512_and_si512(u, m0));
	w[3] = _mm512_cvtepi32_ps(_mm512_and_si512(u, m1));
}

/* load_q5 of vec-avx2.c for two blocks */
AVX512_INLINE void load_q5x2(const uint8_t *qa, const uint8_t *ha, const uint8_t *qb,
                             const uint8_t *hb, __m512 w[4])
{
	const __m512i spread = _mm512_set_epi64(
	    0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0x0000000000000000LL,
	    0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0x0000000000000000LL);
	const __m512i sel = _mm512_set1_epi64((long long)0x8040201008040201ULL);
	const __m512i shift = _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 0, 0, 0, 0, 4, 4, 4, 4);
	__m512i q = join_i(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qa)),
	                   _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qb)));
	uint32_t hav, hbv;

	memcpy(&hav, ha, 4);
	memcpy(&hbv, hb, 4);
	__m512i h = join_i(_mm256_set1_epi32((int)hav), _mm256_set1_epi32((int)hbv));
	q = _mm512_and_si512(_mm512_srlv_epi32(q, shift), _mm512_set1_epi8(0x0f));
	h = _mm512_shuffle_epi8(h, spread);
	__mmask64 hit = _mm512_cmpeq_epi8_mask(_mm512_and_si512(h, sel), sel);
	q = _mm512_mask_or_epi32(q, 0xffff, q, _mm512_maskz_mov_epi8(hit, _mm512_set1_epi8(0x10)));
#pragma GCC unroll 4
	for (int i = 0; i < 4; i++)
		w[i] = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0x1f << (8 * i))));
}

/* dot_q4 of vec-avx2.c on both halves */
AVX512_INLINE __m512 dot_x2(const __m512 w[4], const float *q)
{
	__m512 d = _mm512_mul_ps(w[0], _mm512_load_ps(q));
	d = _mm512_fmadd_ps(w[1], _mm512_load_ps(q + 16), d);
	d = _mm512_fmadd_ps(w[2], _mm512_load_ps(q + 32), d);
	return _mm512_fmadd_ps(w[3], _mm512_load_ps(q + 48), d);
}

/* dot_q4 of one block (AVX2 layout) in lanes 0-7 */
AVX512_INLINE __m512 dot_x1(const __m512 w[4], const float *q)
{
	__m512 d = _mm512_mul_ps(w[0], _mm512_castps256_ps512(_mm256_load_ps(q)));
	d = _mm512_fmadd_ps(w[1], _mm512_castps256_ps512(_mm256_load_ps(q + 8)), d);
	d = _mm512_fmadd_ps(w[2], _mm512_castps256_ps512(_mm256_load_ps(q + 16)), d);
	return _mm512_fmadd_ps(w[3], _mm512_castps256_ps512(_mm256_load_ps(q + 24)), d);
}

/* mv_q4 of vec-avx2.c (Q4_0, Q4_1, Q5_0, Q5_1) for n <= LP_CPU_MATVEC512_MAX_N
 * rows. Per group of four blocks: the offsets' multiply-add into acc1
 * (masked to the high half), then blocks (0, 1) and (2, 3) as pairs. The
 * blocks past the last four go one by one into acc0 (masked to the low
 * half), as there. */
AVX512_INLINE void mv_q4(enum lp_dtype t, const void *w, size_t w_stride, int64_t r0, int64_t r1,
                         int64_t k, const int n, const float *prep, float *out, int64_t ldo,
                         bool accumulate)
{
	const bool has_m = t == LP_DTYPE_Q4_1 || t == LP_DTYPE_Q5_1;
	const bool five = t == LP_DTYPE_Q5_0 || t == LP_DTYPE_Q5_1;
	const size_t bb = lp_dtype_block_bytes(t), qh = has_m ? 4 : 2, qs = qh + (five ? 4 : 0);
	const __m256 even = _mm256_castsi256_ps(_mm256_setr_epi32(-1, 0, -1, 0, -1, 0, -1, 0));
	const uint8_t *end = (const uint8_t *)w + (size_t)r1 * w_stride;
	int64_t nb = k / LP_QK;

	lp_cpu_prefetch_head(w, w_stride, r0, r1);
	for (int64_t r = r0; r < r1; r++) {
		const uint8_t *p = (const uint8_t *)w + (size_t)r * w_stride;
		const float *q = prep, *s = prep + LP_CPU_PREP_SUMS;
		__m512 acc[LP_CPU_MATVEC512_MAX_N];
		__m128 macc[LP_CPU_MATVEC512_MAX_N];
		int64_t b = 0;

		lp_cpu_prefetch_row(p, w_stride, end);
#pragma GCC unroll 16
		for (int j = 0; j < n; j++) {
			acc[j] = _mm512_setzero_ps();
			macc[j] = _mm_setzero_ps();
		}
		for (; b + 4 <= nb; b += 4, p += 4 * bb, q += 4 * LP_QK, s += 8) {
			__m128i h = _mm_loadu_si32(p);
			h = _mm_insert_epi32(h, (int)load_u32(p + bb), 1);
			h = _mm_insert_epi32(h, (int)load_u32(p + 2 * bb), 2);
			h = _mm_insert_epi32(h, (int)load_u32(p + 3 * bb), 3);
			__m256 dm = _mm256_cvtph_ps(h);
			if (!has_m)
				dm = _mm256_and_ps(dm, even);
			__m512 dmh = join(dm, dm);
			/* [d0 x8 | d1 x8], [d2 x8 | d3 x8] */
			__m512 dv01 = _mm512_permutexvar_ps(
			    _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2), dmh);
			__m512 dv23 = _mm512_permutexvar_ps(
			    _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6), dmh);
#pragma GCC unroll 16
			for (int j = 0; j < n; j++)
				acc[j] = _mm512_mask3_fmadd_ps(
				    dmh,
				    _mm512_broadcast_f32x8(
				        _mm256_load_ps(s + (size_t)j * LP_CPU_PREP_ROW_FLOATS)),
				    acc[j], 0xff00);
#pragma GCC unroll 2
			for (int i = 0; i < 4; i += 2) {
				__m512 wv[4];

				if (five)
					load_q5x2(p + i * bb + qs, p + i * bb + qh,
					          p + (i + 1) * bb + qs, p + (i + 1) * bb + qh, wv);
				else
					load_q4x2(p + i * bb + qs, p + (i + 1) * bb + qs, wv);
#pragma GCC unroll 16
				for (int j = 0; j < n; j++)
					acc[j] = _mm512_fmadd_ps(
					    i ? dv23 : dv01,
					    dot_x2(wv, q + i * LP_QK +
					                   (size_t)j * LP_CPU_PREP_ROW_FLOATS),
					    acc[j]);
			}
		}
		for (; b < nb; b++, p += bb, q += LP_QK, s += 2) {
			__m512 wv[4];
			__m128 dm = _mm_cvtph_ps(_mm_loadu_si32(p));
			__m512 dv = _mm512_broadcastss_ps(dm);

			if (five)
				load_q5x2(p + qs, p + qh, p + qs, p + qh, wv);
			else
				load_q4x2(p + qs, p + qs, wv);
#pragma GCC unroll 16
			for (int j = 0; j < n; j++) {
				const float *sj = s + (size_t)j * LP_CPU_PREP_ROW_FLOATS;
				__m128 sv = _mm_castpd_ps(_mm_load_sd((const double *)sj));
				acc[j] = _mm512_mask3_fmadd_ps(
				    dv, dot_x1(wv, q + (size_t)j * LP_CPU_PREP_ROW_FLOATS), acc[j],
				    0x00ff);
				if (has_m)
					macc[j] = _mm_fmadd_ps(dm, sv, macc[j]);
				else
					macc[j] = _mm_fmadd_ss(dm, sv, macc[j]);
			}
		}
#pragma GCC unroll 16
		for (int j = 0; j < n; j++) {
			__m128 mt = has_m ? _mm_movehdup_ps(macc[j]) : macc[j];
			store_out(out, ldo, r, j, hsum_halves(acc[j]) + _mm_cvtss_f32(mt),
			          accumulate);
		}
	}
}

/* mv_q8 of vec-avx2.c: blocks in pairs (even | odd), x prepared as pairs;
 * an odd last block into acc0 alone. */
AVX512_INLINE void mv_q8(const void *w, size_t w_stride, int64_t r0, int64_t r1, int64_t k,
                         const int n, const float *prep, float *out, int64_t ldo, bool accumulate)
{
	const size_t bb = sizeof(struct lp_block_q8_0);
	const uint8_t *end = (const uint8_t *)w + (size_t)r1 * w_stride;
	int64_t nb = k / LP_QK;

	lp_cpu_prefetch_head(w, w_stride, r0, r1);
	for (int64_t r = r0; r < r1; r++) {
		const uint8_t *p = (const uint8_t *)w + (size_t)r * w_stride;
		__m512 acc[LP_CPU_MATVEC512_MAX_N];
		int64_t b = 0;

		lp_cpu_prefetch_row(p, w_stride, end);
#pragma GCC unroll 16
		for (int j = 0; j < n; j++)
			acc[j] = _mm512_setzero_ps();
		for (; b + 2 <= nb; b += 2, p += 2 * bb) {
			__m512 wv[4];
			__m512 dv = join(_mm256_set1_ps(_cvtsh_ss(load_u16(p))),
			                 _mm256_set1_ps(_cvtsh_ss(load_u16(p + bb))));
#pragma GCC unroll 4
			for (int i = 0; i < 4; i++)
				wv[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
				    join_i128(p + 2 + 8 * i, p + bb + 2 + 8 * i)));
#pragma GCC unroll 16
			for (int j = 0; j < n; j++)
				acc[j] = _mm512_fmadd_ps(
				    dv,
				    dot_x2(wv,
				           prep + (size_t)j * LP_CPU_PREP_ROW_FLOATS + b * LP_QK),
				    acc[j]);
		}
		if (b < nb) {
			__m512 wv[4];
			__m512 dv = _mm512_set1_ps(_cvtsh_ss(load_u16(p)));
#pragma GCC unroll 4
			for (int i = 0; i < 4; i++)
				wv[i] = _mm512_cvtepi32_ps(
				    _mm512_cvtepi8_epi32(join_i128(p + 2 + 8 * i, p + 2 + 8 * i)));
#pragma GCC unroll 16
			for (int j = 0; j < n; j++)
				acc[j] = _mm512_mask3_fmadd_ps(
				    dv,
				    dot_x1(wv,
				           prep + (size_t)j * LP_CPU_PREP_ROW_FLOATS + b * LP_QK),
				    acc[j], 0x00ff);
		}
#pragma GCC unroll 16
		for (int j = 0; j < n; j++)
			store_out(out, ldo, r, j, hsum_halves(acc[j]), accumulate);
	}
}

/* k_bytes of vec-avx2.c on [side 0 | side 1] */
AVX512_INLINE void k_bytes_x2(__m256i q0, __m256i q1, __m512 w[4])
{
	__m512i q = join_i(q0, q1);
#pragma GCC unroll 4
	for (int i = 0; i < 4; i++)
		w[i] = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0x3f << (8 * i))));
}

/* k_nibbles of vec-avx2.c on [side 0 | side 1] of the same 32 bytes */
AVX512_INLINE void k_nibbles_x2(const uint8_t *p, __m512 w[4])
{
	const __m512i m0 = _mm512_setr_epi32(0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f, 0xf0,
	                                     0xf0, 0xf0, 0xf0, 0xf0, 0xf0, 0xf0, 0xf0);
	const __m512i m1 = _mm512_slli_epi32(m0, 8);
	/* one load that fills both halves */
	__m512i vv = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p));
	__m512i u = _mm512_srli_epi32(vv, 16);

	w[0] = _mm512_cvtepi32_ps(_mm512_and_si512(vv, m0));
	w[1] = _mm512_cvtepi32_ps(_mm512_and_si512(vv, m1));
	w[2] = _mm512_cvtepi32_ps(_mm512_and_si512(u, m0));
	w[3] = _mm512_cvtepi32_ps(_mm512_and_si512(u, m1));
}

/* acc[j] += dv * (w . interleaved x of row j) */
AVX512_INLINE void k_sides(const __m512 w[4], __m512 dv, const float *q, const int n, __m512 *acc)
{
#pragma GCC unroll 16
	for (int j = 0; j < n; j++)
		acc[j] =
		    _mm512_fmadd_ps(dv, dot_x2(w, q + (size_t)j * LP_CPU_PREP_ROW_FLOATS), acc[j]);
}

/* k4_scales of vec-avx2.c as one register [D | M]: the same products. */
AVX512_INLINE __m512 k4_scales_x2(const uint8_t *p)
{
	__m128i x = _mm_loadu_si128((const __m128i *)p);
	__m128 dm = _mm_cvtph_ps(x);
	__m128i lo = _mm_srlv_epi32(_mm_shuffle_epi32(x, _MM_SHUFFLE(3, 2, 3, 1)),
	                            _mm_setr_epi32(0, 0, 0, 4));
	__m128i hi = _mm_srli_epi32(_mm_shuffle_epi32(x, _MM_SHUFFLE(2, 0, 1, 0)), 2);
	__m128i sm = _mm_or_si128(
	    _mm_and_si128(lo, _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f)),
	    _mm_and_si128(hi, _mm_setr_epi32(0, 0x30303030, 0, 0x30303030)));
	/* [d x 8 | dmin x 8] */
	__m512 f =
	    _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
	                          _mm512_castps128_ps512(dm));

	return _mm512_mul_ps(f, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sm)));
}

/* mv_k of vec-avx2.c (Q4_K, Q5_K, Q6_K): each 32 bytes' two sides (acc0 and
 * acc1 there) as one register; the minimums' (Q6_K: the offsets') share,
 * which goes to acc1 alone, masked to the high half. */
AVX512_INLINE void mv_k(enum lp_dtype t, const void *w, size_t w_stride, int64_t r0, int64_t r1,
                        int64_t k, const int n, const float *prep, float *out, int64_t ldo,
                        bool accumulate)
{
	const bool six = t == LP_DTYPE_Q6_K, five = t == LP_DTYPE_Q5_K;
	const size_t bb = lp_dtype_block_bytes(t), nsums = six ? 16 : 8;
	const uint8_t *end = (const uint8_t *)w + (size_t)r1 * w_stride;
	int64_t nb = k / LP_QK_K;

	lp_cpu_prefetch_head(w, w_stride, r0, r1);
	for (int64_t r = r0; r < r1; r++) {
		const uint8_t *p = (const uint8_t *)w + (size_t)r * w_stride;
		const float *q = prep, *s = prep + LP_CPU_PREP_SUMS;
		__m512 acc[LP_CPU_MATVEC512_MAX_N];

		lp_cpu_prefetch_row(p, w_stride, end);
#pragma GCC unroll 16
		for (int j = 0; j < n; j++)
			acc[j] = _mm512_setzero_ps();
		for (int64_t b = 0; b < nb; b++, p += bb, q += LP_QK_K, s += nsums) {
			if (six) {
				const struct lp_block_q6_k *blk = (const struct lp_block_q6_k *)p;
				__m256 d = _mm256_set1_ps(_cvtsh_ss(blk->d)), D[2];

				D[0] = _mm256_mul_ps(
				    d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
				           _mm_loadl_epi64((const __m128i *)blk->scales))));
				D[1] = _mm256_mul_ps(
				    d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
				           _mm_loadl_epi64((const __m128i *)(blk->scales + 8)))));
				__m512 d0 = join(D[0], D[0]), d1 = join(D[1], D[1]);
#pragma GCC unroll 16
				for (int j = 0; j < n; j++) {
					const float *sj = s + (size_t)j * LP_CPU_PREP_ROW_FLOATS;
					acc[j] = _mm512_mask3_fmadd_ps(
					    d0, _mm512_broadcast_f32x8(_mm256_load_ps(sj)), acc[j],
					    0xff00);
					acc[j] = _mm512_mask3_fmadd_ps(
					    d1, _mm512_broadcast_f32x8(_mm256_load_ps(sj + 8)),
					    acc[j], 0xff00);
				}
#pragma GCC unroll 2
				for (int h = 0; h < 2; h++) {
					__m256i hv =
					    _mm256_loadu_si256((const __m256i *)(blk->qh + 32 * h));
#pragma GCC unroll 2
					for (int c = 0; c < 2; c++) {
						__m256i v = _mm256_loadu_si256(
						    (const __m256i *)(blk->ql + 64 * h + 32 * c));
						__m512 wv[4];

						k_bytes_x2(k_assemble(v, hv, 0, 2 * c, 2),
						           k_assemble(v, hv, 1, 2 * c + 4, 2), wv);
						k_sides(
						    wv,
						    join(pair_bcast(D[h], 2 * c, 2 * c + 1),
						         pair_bcast(D[h], 2 * c + 4, 2 * c + 5)),
						    q + 64 * (2 * h + c), n, acc);
					}
				}
				continue;
			}
			__m256i hv = five ? _mm256_loadu_si256((const __m256i *)(p + 16))
			                  : _mm256_setzero_si256();
			/* [D | M] in one register: lanes 0-7 the scales, 8-15 the
			 * minimums, which the minimums' masked share takes as they are */
			__m512 dd = k4_scales_x2(p);
#pragma GCC unroll 16
			for (int j = 0; j < n; j++)
				acc[j] = _mm512_mask3_fmadd_ps(
				    dd,
				    _mm512_broadcast_f32x8(
				        _mm256_load_ps(s + (size_t)j * LP_CPU_PREP_ROW_FLOATS)),
				    acc[j], 0xff00);
#pragma GCC unroll 4
			for (int g = 0; g < 4; g++) {
				__m256i v = _mm256_loadu_si256(
				    (const __m256i *)(p + (five ? 48 : 16) + 32 * g));
				__m512 dv = _mm512_permutexvar_ps(
				    _mm512_setr_epi32(2 * g, 2 * g, 2 * g, 2 * g, 2 * g, 2 * g,
				                      2 * g, 2 * g, 2 * g + 1, 2 * g + 1, 2 * g + 1,
				                      2 * g + 1, 2 * g + 1, 2 * g + 1, 2 * g + 1,
				                      2 * g + 1),
				    dd);
				__m512 wv[4];

				if (five)
					k_bytes_x2(k_assemble(v, hv, 0, 2 * g, 1),
					           k_assemble(v, hv, 1, 2 * g + 1, 1), wv);
				else
					k_nibbles_x2(p + 16 + 32 * g, wv);
				k_sides(wv, dv, q + 64 * g, n, acc);
			}
		}
#pragma GCC unroll 16
		for (int j = 0; j < n; j++)
			store_out(out, ldo, r, j, hsum_halves(acc[j]), accumulate);
	}
}

#define MV512_CASES                                                                                \
	switch (n) {                                                                               \
	case 1:                                                                                    \
		MV_CALL(1);                                                                        \
		break;                                                                             \
	case 2:                                                                                    \
		MV_CALL(2);                                                                        \
		break;                                                                             \
	case 3:                                                                                    \
		MV_CALL(3);                                                                        \
		break;                                                                             \
	case 4:                                                                                    \
		MV_CALL(4);                                                                        \
		break;                                                                             \
	case 5:                                                                                    \
		MV_CALL(5);                                                                        \
		break;                                                                             \
	case 6:                                                                                    \
		MV_CALL(6);                                                                        \
		break;                                                                             \
	case 7:                                                                                    \
		MV_CALL(7);                                                                        \
		break;                                                                             \
	case 8:                                                                                    \
		MV_CALL(8);                                                                        \
		break;                                                                             \
	case 9:                                                                                    \
		MV_CALL(9);                                                                        \
		break;                                                                             \
	case 10:                                                                                   \
		MV_CALL(10);                                                                       \
		break;                                                                             \
	case 11:                                                                                   \
		MV_CALL(11);                                                                       \
		break;                                                                             \
	default:                                                                                   \
		MV_CALL(12);                                                                       \
		break;                                                                             \
	}

AVX512 void lp_cpu_matvec_avx512(enum lp_dtype t, const void *w, size_t w_stride, int64_t r0,
                                 int64_t r1, int64_t k, int n, const float *prep, float *out,
                                 int64_t ldo, bool accumulate)
{
	switch (t) {
#define MV_CALL(N) mv_q4(LP_DTYPE_Q4_0, w, w_stride, r0, r1, k, N, prep, out, ldo, accumulate)
	case LP_DTYPE_Q4_0:
		MV512_CASES;
		return;
#undef MV_CALL
#define MV_CALL(N) mv_q4(LP_DTYPE_Q4_1, w, w_stride, r0, r1, k, N, prep, out, ldo, accumulate)
	case LP_DTYPE_Q4_1:
		MV512_CASES;
		return;
#undef MV_CALL
#define MV_CALL(N) mv_q4(LP_DTYPE_Q5_0, w, w_stride, r0, r1, k, N, prep, out, ldo, accumulate)
	case LP_DTYPE_Q5_0:
		MV512_CASES;
		return;
#undef MV_CALL
#define MV_CALL(N) mv_q4(LP_DTYPE_Q5_1, w, w_stride, r0, r1, k, N, prep, out, ldo, accumulate)
	case LP_DTYPE_Q5_1:
		MV512_CASES;
		return;
#undef MV_CALL
#define MV_CALL(N) mv_k(LP_DTYPE_Q4_K, w, w_stride, r0, r1, k, N, prep, out, ldo, accumulate)
	case LP_DTYPE_Q4_K:
		MV512_CASES;
		return;
#undef MV_CALL
#define MV_CALL(N) mv_k(LP_DTYPE_Q5_K, w, w_stride, r0, r1, k, N, prep, out, ldo, accumulate)
	case LP_DTYPE_Q5_K:
		MV512_CASES;
		return;
#undef MV_CALL
#define MV_CALL(N) mv_k(LP_DTYPE_Q6_K, w, w_stride, r0, r1, k, N, prep, out, ldo, accumulate)
	case LP_DTYPE_Q6_K:
		MV512_CASES;
		return;
#undef MV_CALL
#define MV_CALL(N) mv_q8(w, w_stride, r0, r1, k, N, prep, out, ldo, accumulate)
	case LP_DTYPE_Q8_0:
		MV512_CASES;
		return;
#undef MV_CALL
	default:
		return;
	}
}

/* 8-float units [a0 a1 a2 a3 b0 b1 b2 b3] of each 64 floats in
 * [q, q + len) become [a0 b0 a1 b1 a2 b2 a3 b3]. */
static inline void interleave_pairs(float *q, int64_t len)
{
	for (int64_t c = 0; c + 64 <= len; c += 64) {
		float t[64];
		memcpy(t, q + c, sizeof(t));
		for (int i = 0; i < 4; i++) {
			memcpy(q + c + 16 * i, t + 8 * i, 8 * sizeof(float));
			memcpy(q + c + 16 * i + 8, t + 32 + 8 * i, 8 * sizeof(float));
		}
	}
}

AVX512 void lp_cpu_matvec_prep_avx512(enum lp_dtype t, const float *x, int n, int64_t k,
                                      float *prep)
{
	int64_t nb = k / LP_QK;

	if (t == LP_DTYPE_Q8_0) {
		for (int j = 0; j < n; j++) {
			float *q = prep + (size_t)j * LP_CPU_PREP_ROW_FLOATS;
			memcpy(q, x + j * k, (size_t)k * sizeof(float));
			interleave_pairs(q, nb / 2 * 2 * LP_QK);
		}
		return;
	}
	lp_cpu_matvec_prep_avx2(t, x, n, k, prep);
	/* the blocks of the groups of four, or every 64 floats of a K-quant */
	int64_t len = lp_dtype_block(t) == LP_QK_K ? k : nb / 4 * 4 * LP_QK;
	for (int j = 0; j < n; j++)
		interleave_pairs(prep + (size_t)j * LP_CPU_PREP_ROW_FLOATS, len);
}

#else

bool lp_cpu_has_avx512(void)
{
	return false;
}

#endif
