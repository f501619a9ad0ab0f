/* AVX2 + FMA + F16C kernels of the CPU backend; see cpu.h.
 *
 * The project is built without -march flags, so every function here carries
 * a target attribute and is only called after lp_cpu_has_avx2() said yes.
 * Weights are expanded to f32 in registers; products and sums are f32. */
#include "kernels/cpu/cpu.h"

#if LP_CPU_X86

#include <immintrin.h>

#define AVX2        __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE static inline __attribute__((target("avx2,fma,f16c"), always_inline))

bool lp_cpu_has_avx2(void)
{
	__builtin_cpu_init();
	return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
	       __builtin_cpu_supports("f16c");
}

AVX2_INLINE float hsum(__m256 v)
{
	__m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
	s = _mm_add_ps(s, _mm_movehl_ps(s, s));
	s = _mm_add_ss(s, _mm_movehdup_ps(s));
	return _mm_cvtss_f32(s);
}

AVX2_INLINE float f16(uint16_t h)
{
	return _cvtsh_ss(h);
}

AVX2_INLINE __m256 load_f16(const uint16_t *p)
{
	return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

AVX2_INLINE __m256 load_bf16(const uint16_t *p)
{
	__m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
	return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

AVX2_INLINE uint32_t load_u32(const void *p)
{
	uint32_t v;
	memcpy(&v, p, sizeof(v));
	return v;
}

AVX2_INLINE uint16_t load_u16(const void *p)
{
	uint16_t v;
	memcpy(&v, p, sizeof(v));
	return v;
}

/* 8 bytes zero- or sign-extended to 8 dwords, one instruction with the load */
AVX2_INLINE __m256i load8_u8(const uint8_t *p)
{
	return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

AVX2_INLINE __m256i load8_s8(const int8_t *p)
{
	return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

/* Weights of one quantized block as floats: w[0..3] hold elements 0-7,
 * 8-15, 16-23, 24-31 of q (Q8_0: the int8; Q4_x: the raw nibble 0..15).
 * Lane 0 of the result is the scale d, lane 1 the minimum m (Q4_1) or 0. */
AVX2_INLINE __m128 load_block(enum lp_dtype t, const uint8_t *p, __m256 w[4])
{
	/* the first four bytes: d and m for Q4_1, d and two weights otherwise */
	__m128 dm = _mm_cvtph_ps(_mm_loadu_si32(p));

	if (t == LP_DTYPE_Q8_0) {
		const struct lp_block_q8_0 *b = (const struct lp_block_q8_0 *)p;

		w[0] = _mm256_cvtepi32_ps(load8_s8(b->qs));
		w[1] = _mm256_cvtepi32_ps(load8_s8(b->qs + 8));
		w[2] = _mm256_cvtepi32_ps(load8_s8(b->qs + 16));
		w[3] = _mm256_cvtepi32_ps(load8_s8(b->qs + 24));
		return dm;
	}
	const uint8_t *qs = t == LP_DTYPE_Q4_0 ? ((const struct lp_block_q4_0 *)p)->qs
	                                       : ((const struct lp_block_q4_1 *)p)->qs;
	/* byte j holds weight j (low nibble) and weight j + 16 (high) */
	__m256i v0 = load8_u8(qs), v1 = load8_u8(qs + 8);
	__m256i mask = _mm256_set1_epi32(0x0f);

	w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v0, mask));
	w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(v1, mask));
	w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
	w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
	return dm;
}

/* Same values as lp_dequantize_row (the same f32 operations in the same
 * order, without contraction). */
AVX2 void lp_cpu_dequant_avx2(enum lp_dtype t, const void *row, int64_t k0, int64_t len, float *dst)
{
	int64_t i = 0;

	switch (t) {
	case LP_DTYPE_F32:
		memcpy(dst, (const float *)row + k0, (size_t)len * sizeof(float));
		return;
	case LP_DTYPE_F16: {
		const uint16_t *src = (const uint16_t *)row + k0;
		for (; i + 8 <= len; i += 8)
			_mm256_storeu_ps(dst + i, load_f16(src + i));
		for (; i < len; i++)
			dst[i] = f16(src[i]);
		return;
	}
	case LP_DTYPE_BF16: {
		const uint16_t *src = (const uint16_t *)row + k0;
		for (; i + 8 <= len; i += 8)
			_mm256_storeu_ps(dst + i, load_bf16(src + i));
		for (; i < len; i++)
			dst[i] = lp_bf16_to_f32(src[i]);
		return;
	}
	case LP_DTYPE_Q8_0:
	case LP_DTYPE_Q4_0:
	case LP_DTYPE_Q4_1: {
		size_t bb = lp_dtype_block_bytes(t);
		const uint8_t *p = (const uint8_t *)row + (size_t)(k0 / LP_QK) * bb;
		__m256 w[4];

		for (; i < len; i += LP_QK, p += bb) {
			__m128 dm = load_block(t, p, w);
			__m256 dv = _mm256_broadcastss_ps(dm);
			__m256 mv = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
#pragma GCC unroll 4
			for (int j = 0; j < 4; j++) {
				__m256 v = w[j];
				if (t == LP_DTYPE_Q4_0)
					v = _mm256_sub_ps(v, _mm256_set1_ps(8.0f));
				v = _mm256_mul_ps(dv, v);
				if (t == LP_DTYPE_Q4_1)
					v = _mm256_add_ps(v, mv);
				_mm256_storeu_ps(dst + i + 8 * j, v);
			}
		}
		return;
	}
	default:
		lp_dequantize_row(t, (const char *)row + lp_dtype_row_bytes(t, k0), dst, len);
		return;
	}
}

/* One block against n activation rows: acc[j] += d * (q . x_j), and the
 * block's share of the 4-bit offset into macc[j]: lane 1 += m * xsum for
 * Q4_1, lane 0 += d * (-8 xsum) for Q4_0 (see lp_cpu_matvec_avx2). */
AVX2_INLINE void mv_block(enum lp_dtype t, const uint8_t *p, const float *x, int64_t ldx,
                          const int n, const float *xsum, __m256 *acc, __m128 *macc)
{
	__m256 w[4];
	__m128 dm = load_block(t, p, w);
	__m256 dv = _mm256_broadcastss_ps(dm);

#pragma GCC unroll 4
	for (int j = 0; j < n; j++) {
		const float *xj = x + j * ldx;
		const float *xs = xsum + (size_t)j * LP_CPU_XSUM_MAX_BLOCKS * 4;
		__m256 d = _mm256_mul_ps(w[0], _mm256_loadu_ps(xj));
		d = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xj + 8), d);
		d = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xj + 16), d);
		d = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xj + 24), d);
		acc[j] = _mm256_fmadd_ps(dv, d, acc[j]);
		if (t == LP_DTYPE_Q4_1)
			macc[j] = _mm_fmadd_ps(dm, _mm_load_ps(xs), macc[j]);
		else if (t == LP_DTYPE_Q4_0)
			macc[j] = _mm_fmadd_ss(dm, _mm_load_ss(xs), macc[j]);
	}
}

/* Quantized rows [r0, r1) against n rows of x: sum_b d_b * (q_b . x_b) +
 * m_b * xsum_b. Two accumulators (even and odd blocks) keep the fused
 * multiply-add chains short. */
AVX2_INLINE void mv_quant(enum lp_dtype t, const void *w, size_t w_stride, int64_t r0, int64_t r1,
                          int64_t k, const float *x, const int n, const float *xsum, float *out,
                          int64_t ldo, bool accumulate)
{
	size_t bb = lp_dtype_block_bytes(t);
	int64_t nb = k / LP_QK;

	for (int64_t r = r0; r < r1; r++) {
		const uint8_t *p = (const uint8_t *)w + (size_t)r * w_stride;
		__m256 acc0[LP_CPU_MATVEC_MAX_N], acc1[LP_CPU_MATVEC_MAX_N];
		__m128 macc0[LP_CPU_MATVEC_MAX_N], macc1[LP_CPU_MATVEC_MAX_N];
		int64_t b = 0;

#pragma GCC unroll 4
		for (int j = 0; j < n; j++) {
			acc0[j] = _mm256_setzero_ps();
			acc1[j] = _mm256_setzero_ps();
			macc0[j] = _mm_setzero_ps();
			macc1[j] = _mm_setzero_ps();
		}
		for (; b + 2 <= nb; b += 2) {
			mv_block(t, p + (size_t)b * bb, x + b * LP_QK, k, n, xsum + 4 * b, acc0,
			         macc0);
			mv_block(t, p + (size_t)(b + 1) * bb, x + (b + 1) * LP_QK, k, n,
			         xsum + 4 * (b + 1), acc1, macc1);
		}
		if (b < nb)
			mv_block(t, p + (size_t)b * bb, x + b * LP_QK, k, n, xsum + 4 * b, acc0,
			         macc0);
#pragma GCC unroll 4
		for (int j = 0; j < n; j++) {
			__m128 mt = _mm_add_ps(macc0[j], macc1[j]);
			float s = hsum(_mm256_add_ps(acc0[j], acc1[j]));
			if (t == LP_DTYPE_Q4_1)
				s += _mm_cvtss_f32(_mm_movehdup_ps(mt));
			else if (t == LP_DTYPE_Q4_0)
				s += _mm_cvtss_f32(mt);
			float *o = out + j * ldo + r;
			*o = accumulate ? *o + s : s;
		}
	}
}

AVX2_INLINE __m256 load_plain(enum lp_dtype t, const void *row, int64_t i)
{
	if (t == LP_DTYPE_F32)
		return _mm256_loadu_ps((const float *)row + i);
	if (t == LP_DTYPE_F16)
		return load_f16((const uint16_t *)row + i);
	return load_bf16((const uint16_t *)row + i);
}

AVX2_INLINE float plain_at(enum lp_dtype t, const void *row, int64_t i)
{
	if (t == LP_DTYPE_F32)
		return ((const float *)row)[i];
	if (t == LP_DTYPE_F16)
		return f16(((const uint16_t *)row)[i]);
	return lp_bf16_to_f32(((const uint16_t *)row)[i]);
}

AVX2_INLINE void mv_plain(enum lp_dtype t, const void *w, size_t w_stride, int64_t r0, int64_t r1,
                          int64_t k, const float *x, const int n, float *out, int64_t ldo,
                          bool accumulate)
{
	for (int64_t r = r0; r < r1; r++) {
		const void *row = (const uint8_t *)w + (size_t)r * w_stride;
		__m256 acc0[LP_CPU_MATVEC_MAX_N], acc1[LP_CPU_MATVEC_MAX_N];
		int64_t i = 0;

#pragma GCC unroll 4
		for (int j = 0; j < n; j++) {
			acc0[j] = _mm256_setzero_ps();
			acc1[j] = _mm256_setzero_ps();
		}
		for (; i + 16 <= k; i += 16) {
			__m256 w0 = load_plain(t, row, i), w1 = load_plain(t, row, i + 8);
#pragma GCC unroll 4
			for (int j = 0; j < n; j++) {
				acc0[j] =
				    _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + j * k + i), acc0[j]);
				acc1[j] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + j * k + i + 8),
				                          acc1[j]);
			}
		}
		for (; i + 8 <= k; i += 8) {
			__m256 w0 = load_plain(t, row, i);
#pragma GCC unroll 4
			for (int j = 0; j < n; j++)
				acc0[j] =
				    _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + j * k + i), acc0[j]);
		}
#pragma GCC unroll 4
		for (int j = 0; j < n; j++) {
			float s = hsum(_mm256_add_ps(acc0[j], acc1[j]));
			for (int64_t e = i; e < k; e++)
				s += plain_at(t, row, e) * x[j * k + e];
			float *o = out + j * ldo + r;
			*o = accumulate ? *o + s : s;
		}
	}
}

/* Dispatch with the dtype and the row count as compile-time constants. */
#define MV_CASES(T)                                                                                \
	switch (n) {                                                                               \
	case 1:                                                                                    \
		MV_CALL(T, 1);                                                                     \
		break;                                                                             \
	case 2:                                                                                    \
		MV_CALL(T, 2);                                                                     \
		break;                                                                             \
	case 3:                                                                                    \
		MV_CALL(T, 3);                                                                     \
		break;                                                                             \
	default:                                                                                   \
		MV_CALL(T, 4);                                                                     \
		break;                                                                             \
	}

AVX2 void lp_cpu_matvec_avx2(enum lp_dtype t, const void *w, size_t w_stride, int64_t r0,
                             int64_t r1, int64_t k, const float *x, int n, const float *xsum,
                             float *out, int64_t ldo, bool accumulate)
{
#define MV_CALL(T, N) mv_quant(T, w, w_stride, r0, r1, k, x, N, xsum, out, ldo, accumulate)
	switch (t) {
	case LP_DTYPE_Q8_0:
		MV_CASES(LP_DTYPE_Q8_0);
		return;
	case LP_DTYPE_Q4_0:
		MV_CASES(LP_DTYPE_Q4_0);
		return;
	case LP_DTYPE_Q4_1:
		MV_CASES(LP_DTYPE_Q4_1);
		return;
	default:
		break;
	}
#undef MV_CALL
#define MV_CALL(T, N) mv_plain(T, w, w_stride, r0, r1, k, x, N, out, ldo, accumulate)
	switch (t) {
	case LP_DTYPE_F32:
		MV_CASES(LP_DTYPE_F32);
		return;
	case LP_DTYPE_F16:
		MV_CASES(LP_DTYPE_F16);
		return;
	default:
		MV_CASES(LP_DTYPE_BF16);
		return;
	}
#undef MV_CALL
}

/* 8 x 8 transpose of floats: rows in r[0..7] become columns. */
AVX2_INLINE void transpose8(__m256 r[8])
{
	__m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
	__m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
	__m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
	__m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
	__m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xee);
	__m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xee);
	__m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xee);
	__m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xee);

	r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
	r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
	r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
	r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
	r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
	r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
	r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
	r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

AVX2 void lp_cpu_pack_panel_avx2(enum lp_dtype t, const void *w, size_t w_stride, int64_t c0,
                                 int ncols, int64_t k0, int64_t kc, float *panel, float *rows)
{
	int64_t kk = 0;

	for (int c = 0; c < LP_CPU_NR; c++) {
		float *dst = rows + (size_t)c * LP_CPU_ROWS_STRIDE;
		if (c < ncols)
			lp_cpu_dequant_avx2(t, (const char *)w + (size_t)(c0 + c) * w_stride, k0,
			                    kc, dst);
		else
			memset(dst, 0, (size_t)kc * sizeof(float));
	}
	for (; kk + 8 <= kc; kk += 8) {
#pragma GCC unroll 2
		for (int h = 0; h < LP_CPU_NR; h += 8) {
			__m256 r[8];
#pragma GCC unroll 8
			for (int i = 0; i < 8; i++)
				r[i] = _mm256_loadu_ps(rows + (size_t)(h + i) * LP_CPU_ROWS_STRIDE +
				                       kk);
			transpose8(r);
#pragma GCC unroll 8
			for (int i = 0; i < 8; i++)
				_mm256_store_ps(panel + (kk + i) * LP_CPU_NR + h, r[i]);
		}
	}
	for (; kk < kc; kk++)
		for (int c = 0; c < LP_CPU_NR; c++)
			panel[kk * LP_CPU_NR + c] = rows[(size_t)c * LP_CPU_ROWS_STRIDE + kk];
}

/* mr rows of x times one packed panel, into an mr x ncols tile of out. */
AVX2_INLINE void gemm_tile(const int mr, int64_t kc, const float *x, int64_t ldx,
                           const float *panel, float *out, int64_t ldo, int ncols, bool load)
{
	__m256 c0[LP_CPU_MR], c1[LP_CPU_MR];
	__m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
	__m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(ncols), lane);
	__m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(ncols - 8), lane);
	bool full = ncols == LP_CPU_NR;

#pragma GCC unroll 6
	for (int r = 0; r < mr; r++) {
		float *o = out + r * ldo;
		if (!load) {
			c0[r] = _mm256_setzero_ps();
			c1[r] = _mm256_setzero_ps();
		} else if (full) {
			c0[r] = _mm256_loadu_ps(o);
			c1[r] = _mm256_loadu_ps(o + 8);
		} else {
			c0[r] = _mm256_maskload_ps(o, m0);
			c1[r] = _mm256_maskload_ps(o + 8, m1);
		}
	}
	for (int64_t kk = 0; kk < kc; kk++) {
		__m256 b0 = _mm256_load_ps(panel + kk * LP_CPU_NR);
		__m256 b1 = _mm256_load_ps(panel + kk * LP_CPU_NR + 8);
#pragma GCC unroll 6
		for (int r = 0; r < mr; r++) {
			__m256 a = _mm256_broadcast_ss(x + r * ldx + kk);
			c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
			c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
		}
	}
#pragma GCC unroll 6
	for (int r = 0; r < mr; r++) {
		float *o = out + r * ldo;
		if (full) {
			_mm256_storeu_ps(o, c0[r]);
			_mm256_storeu_ps(o + 8, c1[r]);
		} else {
			_mm256_maskstore_ps(o, m0, c0[r]);
			_mm256_maskstore_ps(o + 8, m1, c1[r]);
		}
	}
}

AVX2 void lp_cpu_gemm_panel_avx2(int n, int64_t kc, const float *x, int64_t ldx, const float *panel,
                                 float *out, int64_t ldo, int ncols, bool load)
{
	int i = 0;

	for (; i + LP_CPU_MR <= n; i += LP_CPU_MR)
		gemm_tile(LP_CPU_MR, kc, x + i * ldx, ldx, panel, out + i * ldo, ldo, ncols, load);
	switch (n - i) {
	case 5:
		gemm_tile(5, kc, x + i * ldx, ldx, panel, out + i * ldo, ldo, ncols, load);
		break;
	case 4:
		gemm_tile(4, kc, x + i * ldx, ldx, panel, out + i * ldo, ldo, ncols, load);
		break;
	case 3:
		gemm_tile(3, kc, x + i * ldx, ldx, panel, out + i * ldo, ldo, ncols, load);
		break;
	case 2:
		gemm_tile(2, kc, x + i * ldx, ldx, panel, out + i * ldo, ldo, ncols, load);
		break;
	case 1:
		gemm_tile(1, kc, x + i * ldx, ldx, panel, out + i * ldo, ldo, ncols, load);
		break;
	default:
		break;
	}
}

/* exp(x) for x in [-87.3, 88.7] (inputs are clamped to it): x = n ln2 + r
 * with |r| <= ln2 / 2, exp(r) by its Taylor series to r^7 (truncation
 * below 1e-8 relative), times 2^n built in the exponent bits. */
AVX2_INLINE __m256 exp8(__m256 x)
{
	const __m256 ln2_hi = _mm256_set1_ps(0.693359375f);
	const __m256 ln2_lo = _mm256_set1_ps(-2.12194440e-4f);

	x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
	__m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
	                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
	__m256 r = _mm256_fnmadd_ps(n, ln2_hi, x);
	r = _mm256_fnmadd_ps(n, ln2_lo, r);
	__m256 p = _mm256_set1_ps(1.0f / 5040);
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
	p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
	/* n in [-126, 128]: 2^n as (n + 127) << 23, split in two factors so
	 * that n = 128 does not overflow the exponent field */
	__m256i ni = _mm256_cvtps_epi32(n);
	__m256i h = _mm256_srai_epi32(ni, 1);
	__m256 s1 =
	    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, _mm256_set1_epi32(127)), 23));
	__m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(
	    _mm256_add_epi32(_mm256_sub_epi32(ni, h), _mm256_set1_epi32(127)), 23));
	return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

AVX2 void lp_cpu_exp_avx2(float *x, int n)
{
	int i = 0;

	for (; i + 8 <= n; i += 8)
		_mm256_storeu_ps(x + i, exp8(_mm256_loadu_ps(x + i)));
	if (i < n) {
		float t[8] = {0};
		memcpy(t, x + i, (size_t)(n - i) * sizeof(float));
		_mm256_storeu_ps(t, exp8(_mm256_loadu_ps(t)));
		memcpy(x + i, t, (size_t)(n - i) * sizeof(float));
	}
}

AVX2 void lp_cpu_silu_mul_avx2(float *out, const float *gate, const float *up, int64_t n)
{
	const __m256 one = _mm256_set1_ps(1.0f);
	int64_t i = 0;

	for (; i + 8 <= n; i += 8) {
		__m256 g = _mm256_loadu_ps(gate + i);
		__m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
		__m256 s = _mm256_div_ps(g, _mm256_add_ps(one, e));
		_mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
	}
	if (i < n) {
		float g[8] = {0}, u[8] = {0};
		int rest = (int)(n - i);
		memcpy(g, gate + i, (size_t)rest * sizeof(float));
		memcpy(u, up + i, (size_t)rest * sizeof(float));
		__m256 gv = _mm256_loadu_ps(g);
		__m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
		__m256 sv =
		    _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u));
		_mm256_storeu_ps(g, sv);
		memcpy(out + i, g, (size_t)rest * sizeof(float));
	}
}

AVX2_INLINE __m256 load_kv(const void *row, int i, bool is_f16)
{
	return is_f16 ? load_f16((const uint16_t *)row + i)
	              : _mm256_loadu_ps((const float *)row + i);
}

AVX2_INLINE float kv_at(const void *row, int i, bool is_f16)
{
	return is_f16 ? f16(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

/* Eight sums of eight vectors each, in order. */
AVX2_INLINE __m256 hsum8x8(const __m256 a[8])
{
	__m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
	__m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
	__m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);

	return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
	                     _mm256_permute2f128_ps(u0, u1, 0x31));
}

AVX2_INLINE void attn_scores(const float *q, const char *kbase, size_t stride, const int64_t *rows,
                             int cnt, int hd, const bool is_f16, float scale, float *s)
{
	int full = hd / 8 * 8, j = 0;

	for (; j + 8 <= cnt; j += 8) {
		const char *k[8];
		__m256 acc[8];
#pragma GCC unroll 8
		for (int p = 0; p < 8; p++) {
			k[p] = kbase + (size_t)rows[j + p] * stride;
			acc[p] = _mm256_setzero_ps();
		}
		for (int i = 0; i < full; i += 8) {
			__m256 qv = _mm256_loadu_ps(q + i);
#pragma GCC unroll 8
			for (int p = 0; p < 8; p++)
				acc[p] = _mm256_fmadd_ps(qv, load_kv(k[p], i, is_f16), acc[p]);
		}
		__m256 sv = hsum8x8(acc);
		if (full < hd) {
			float t[8];
			_mm256_storeu_ps(t, sv);
			for (int p = 0; p < 8; p++)
				for (int i = full; i < hd; i++)
					t[p] += q[i] * kv_at(k[p], i, is_f16);
			sv = _mm256_loadu_ps(t);
		}
		_mm256_storeu_ps(s + j, _mm256_mul_ps(sv, _mm256_set1_ps(scale)));
	}
	for (; j < cnt; j++) {
		const char *k = kbase + (size_t)rows[j] * stride;
		__m256 acc = _mm256_setzero_ps();
		for (int i = 0; i < full; i += 8)
			acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load_kv(k, i, is_f16), acc);
		float t = hsum(acc);
		for (int i = full; i < hd; i++)
			t += q[i] * kv_at(k, i, is_f16);
		s[j] = scale * t;
	}
}

AVX2 void lp_cpu_attn_scores_avx2(const float *q, const char *kbase, size_t stride,
                                  const int64_t *rows, int cnt, int hd, bool is_f16, float scale,
                                  float *s)
{
	if (is_f16)
		attn_scores(q, kbase, stride, rows, cnt, hd, true, scale, s);
	else
		attn_scores(q, kbase, stride, rows, cnt, hd, false, scale, s);
}

/* o[d0, d0 + 8 nv) = corr * o + sum_j e[j] v_j, the strip in registers. */
AVX2_INLINE void attn_accum_strip(float *o, const char *vbase, size_t stride, const int64_t *rows,
                                  const float *e, int cnt, const bool is_f16, float corr, int d0,
                                  const int nv)
{
	__m256 acc[8], c = _mm256_set1_ps(corr);

#pragma GCC unroll 8
	for (int v = 0; v < nv; v++)
		acc[v] = _mm256_mul_ps(c, _mm256_loadu_ps(o + d0 + 8 * v));
	for (int j = 0; j < cnt; j++) {
		const char *row = vbase + (size_t)rows[j] * stride;
		__m256 ev = _mm256_set1_ps(e[j]);
#pragma GCC unroll 8
		for (int v = 0; v < nv; v++)
			acc[v] = _mm256_fmadd_ps(ev, load_kv(row, d0 + 8 * v, is_f16), acc[v]);
	}
#pragma GCC unroll 8
	for (int v = 0; v < nv; v++)
		_mm256_storeu_ps(o + d0 + 8 * v, acc[v]);
}

AVX2_INLINE void attn_accum(float *o, const char *vbase, size_t stride, const int64_t *rows,
                            const float *e, int cnt, int hd, const bool is_f16, float corr)
{
	int d0 = 0;

	for (; d0 + 64 <= hd; d0 += 64)
		attn_accum_strip(o, vbase, stride, rows, e, cnt, is_f16, corr, d0, 8);
	switch ((hd - d0) / 8) {
	case 7:
		attn_accum_strip(o, vbase, stride, rows, e, cnt, is_f16, corr, d0, 7);
		break;
	case 6:
		attn_accum_strip(o, vbase, stride, rows, e, cnt, is_f16, corr, d0, 6);
		break;
	case 5:
		attn_accum_strip(o, vbase, stride, rows, e, cnt, is_f16, corr, d0, 5);
		break;
	case 4:
		attn_accum_strip(o, vbase, stride, rows, e, cnt, is_f16, corr, d0, 4);
		break;
	case 3:
		attn_accum_strip(o, vbase, stride, rows, e, cnt, is_f16, corr, d0, 3);
		break;
	case 2:
		attn_accum_strip(o, vbase, stride, rows, e, cnt, is_f16, corr, d0, 2);
		break;
	case 1:
		attn_accum_strip(o, vbase, stride, rows, e, cnt, is_f16, corr, d0, 1);
		break;
	default:
		break;
	}
	for (int i = hd / 8 * 8; i < hd; i++) {
		float acc = corr * o[i];
		for (int j = 0; j < cnt; j++)
			acc += e[j] * kv_at(vbase + (size_t)rows[j] * stride, i, is_f16);
		o[i] = acc;
	}
}

AVX2 void lp_cpu_attn_accum_avx2(float *o, const char *vbase, size_t stride, const int64_t *rows,
                                 const float *e, int cnt, int hd, bool is_f16, float corr)
{
	if (is_f16)
		attn_accum(o, vbase, stride, rows, e, cnt, hd, true, corr);
	else
		attn_accum(o, vbase, stride, rows, e, cnt, hd, false, corr);
}

AVX2 void lp_cpu_f32_to_f16_avx2(uint16_t *dst, const float *src, int64_t n)
{
	int64_t i = 0;

	for (; i + 8 <= n; i += 8)
		_mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
		                                                       _MM_FROUND_TO_NEAREST_INT));
	for (; i < n; i++)
		dst[i] = lp_f32_to_f16(src[i]);
}

#else

bool lp_cpu_has_avx2(void)
{
	return false;
}

#endif
