/* AVX2 + FMA + F16C kernels of the CPU backend; see cpu.h.
 *
 * The project is built without -march flags, so every function here carries
 * a target attribute and is only called after lp_cpu_has_avx2() said yes.
 * Weights are expanded to f32 in registers; products and sums are f32. */
#include "kernels/cpu/cpu.h"

#if LP_CPU_X86

#include <cpuid.h>
#include <math.h>

#include "kernels/cpu/vec-x86.h"

bool lp_cpu_has_avx2(void)
{
	unsigned a, b, c, d;

	/* F16C from CPUID leaf 1 (ECX bit 29): clang before 16 has no "f16c"
	 * for __builtin_cpu_supports, and `make fuzz` builds with clang */
	__builtin_cpu_init();
	return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
	       __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
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
	case LP_DTYPE_Q5_0:
	case LP_DTYPE_Q5_1: {
		const bool has_m = t == LP_DTYPE_Q5_1;
		size_t bb = lp_dtype_block_bytes(t), qh = has_m ? 4 : 2;
		const uint8_t *p = (const uint8_t *)row + (size_t)(k0 / LP_QK) * bb;

		for (; i < len; i += LP_QK, p += bb) {
			__m128 dm = _mm_cvtph_ps(_mm_loadu_si32(p));
			__m256 dv = _mm256_broadcastss_ps(dm);
			__m256 mv = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
			__m256i hv = _mm256_set1_epi32((int)load_u32(p + qh));
			const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
			const __m256i one = _mm256_set1_epi32(1), mask = _mm256_set1_epi32(0x0f);
#pragma GCC unroll 2
			for (int g = 0; g < 2; g++) {
				__m256i b = load8_u8(p + qh + 4 + 8 * g);
				__m256i hl = _mm256_srlv_epi32(
				    hv, _mm256_add_epi32(lane, _mm256_set1_epi32(8 * g)));
				__m256i hh = _mm256_srlv_epi32(
				    hv, _mm256_add_epi32(lane, _mm256_set1_epi32(16 + 8 * g)));
				__m256i lo = _mm256_or_si256(
				    _mm256_and_si256(b, mask),
				    _mm256_slli_epi32(_mm256_and_si256(hl, one), 4));
				__m256i hi = _mm256_or_si256(
				    _mm256_srli_epi32(b, 4),
				    _mm256_slli_epi32(_mm256_and_si256(hh, one), 4));
				__m256 vl, vh;
				if (has_m) {
					vl = _mm256_add_ps(
					    _mm256_mul_ps(dv, _mm256_cvtepi32_ps(lo)), mv);
					vh = _mm256_add_ps(
					    _mm256_mul_ps(dv, _mm256_cvtepi32_ps(hi)), mv);
				} else {
					const __m256i sixteen = _mm256_set1_epi32(16);
					vl = _mm256_mul_ps(
					    dv, _mm256_cvtepi32_ps(_mm256_sub_epi32(lo, sixteen)));
					vh = _mm256_mul_ps(
					    dv, _mm256_cvtepi32_ps(_mm256_sub_epi32(hi, sixteen)));
				}
				_mm256_storeu_ps(dst + i + 8 * g, vl);
				_mm256_storeu_ps(dst + i + 16 + 8 * g, vh);
			}
		}
		return;
	}
	case LP_DTYPE_Q4_K:
	case LP_DTYPE_Q5_K: {
		const bool five = t == LP_DTYPE_Q5_K;
		size_t bb = lp_dtype_block_bytes(t), qs = five ? 48 : 16;
		const uint8_t *p = (const uint8_t *)row + (size_t)(k0 / LP_QK_K) * bb;
		const __m256i mask = _mm256_set1_epi32(0x0f), one = _mm256_set1_epi32(1);

		for (; i < len; i += LP_QK_K, p += bb) {
			float dbuf[8], mbuf[8];
			__m256 D, M;

			k4_scales(p, &D, &M);
			_mm256_storeu_ps(dbuf, D);
			_mm256_storeu_ps(mbuf, M);
			for (int sb = 0; sb < 8; sb++) {
				__m256 dv = _mm256_set1_ps(dbuf[sb]), mv = _mm256_set1_ps(mbuf[sb]);
				const uint8_t *q = p + qs + 32 * (sb / 2);
#pragma GCC unroll 4
				for (int l = 0; l < 32; l += 8) {
					__m256i v = _mm256_and_si256(
					    _mm256_srli_epi32(load8_u8(q + l), 4 * (sb % 2)), mask);
					if (five) {
						__m256i h =
						    _mm256_srli_epi32(load8_u8(p + 16 + l), sb);
						v = _mm256_or_si256(
						    v,
						    _mm256_slli_epi32(_mm256_and_si256(h, one), 4));
					}
					_mm256_storeu_ps(
					    dst + i + 32 * sb + l,
					    _mm256_sub_ps(_mm256_mul_ps(dv, _mm256_cvtepi32_ps(v)),
					                  mv));
				}
			}
		}
		return;
	}
	case LP_DTYPE_Q6_K: {
		const struct lp_block_q6_k *blk = (const struct lp_block_q6_k *)row + k0 / LP_QK_K;
		const __m256i mask = _mm256_set1_epi32(0x0f), three = _mm256_set1_epi32(3);
		const __m256i off = _mm256_set1_epi32(32);

		for (; i < len; i += LP_QK_K, blk++) {
			__m256 d = _mm256_set1_ps(f16(blk->d));

			for (int e = 0; e < LP_QK_K; e += 8) {
				int h = e / 128, tq = (e % 128) / 32, l = e % 32;
				__m256i lo =
				    _mm256_and_si256(_mm256_srli_epi32(load8_u8(blk->ql + 64 * h +
				                                                32 * (tq % 2) + l),
				                                       4 * (tq / 2)),
				                     mask);
				__m256i hi = _mm256_and_si256(
				    _mm256_srli_epi32(load8_u8(blk->qh + 32 * h + l), 2 * tq),
				    three);
				__m256i qv = _mm256_sub_epi32(
				    _mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), off);
				__m256 ds =
				    _mm256_mul_ps(d, _mm256_set1_ps((float)blk->scales[e / 16]));
				_mm256_storeu_ps(dst + i + e,
				                 _mm256_mul_ps(ds, _mm256_cvtepi32_ps(qv)));
			}
		}
		return;
	}
	default:
		lp_dequantize_row(t, (const char *)row + lp_dtype_row_bytes(t, k0), dst, len);
		return;
	}
}

/* One Q8_0 block against n activation rows: acc[j] += d * (q . x_j). */
AVX2_INLINE void mv_block_q8(const uint8_t *p, const float *x, int64_t ldx, const int n,
                             __m256 *acc)
{
	__m256 w[4];
	__m256 dv = _mm256_broadcastss_ps(load_block(LP_DTYPE_Q8_0, p, w));

#pragma GCC unroll 4
	for (int j = 0; j < n; j++) {
		const float *xj = x + j * ldx;
		__m256 d = _mm256_mul_ps(w[0], _mm256_loadu_ps(xj));
		d = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xj + 8), d);
		d = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xj + 16), d);
		d = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xj + 24), d);
		acc[j] = _mm256_fmadd_ps(dv, d, acc[j]);
	}
}

/* Q8_0 rows [r0, r1) against n rows of x: sum_b d_b * (q_b . x_b). Two
 * accumulators (even and odd blocks) keep the fused multiply-add chains
 * short. */
AVX2_INLINE void mv_q8(const void *w, size_t w_stride, int64_t r0, int64_t r1, int64_t k,
                       const float *x, const int n, float *out, int64_t ldo, bool accumulate)
{
	const size_t bb = sizeof(struct lp_block_q8_0);
	const uint8_t *end = (const uint8_t *)w + (size_t)r1 * w_stride;
	int64_t nb = k / LP_QK;

	lp_cpu_prefetch_head(w, w_stride, r0, r1);
	for (int64_t r = r0; r < r1; r++) {
		const uint8_t *p = (const uint8_t *)w + (size_t)r * w_stride;
		__m256 acc0[LP_CPU_MATVEC_MAX_N], acc1[LP_CPU_MATVEC_MAX_N];
		int64_t b = 0;

		lp_cpu_prefetch_row(p, w_stride, end);

#pragma GCC unroll 4
		for (int j = 0; j < n; j++) {
			acc0[j] = _mm256_setzero_ps();
			acc1[j] = _mm256_setzero_ps();
		}
		for (; b + 2 <= nb; b += 2) {
			mv_block_q8(p + (size_t)b * bb, x + b * LP_QK, k, n, acc0);
			mv_block_q8(p + (size_t)(b + 1) * bb, x + (b + 1) * LP_QK, k, n, acc1);
		}
		if (b < nb)
			mv_block_q8(p + (size_t)b * bb, x + b * LP_QK, k, n, acc0);
#pragma GCC unroll 4
		for (int j = 0; j < n; j++) {
			float s = hsum(_mm256_add_ps(acc0[j], acc1[j]));
			float *o = out + j * ldo + r;
			*o = accumulate ? *o + s : s;
		}
	}
}

/* The 32 weights of a 4-bit block, for the matrix-vector kernel, in four
 * masks of its 16 bytes broadcast to both halves of a register (no
 * per-nibble shifts or byte shuffles): with u the bytes' dwords shifted
 * right by 16,
 *   w[0] = v & 0x000f | v & 0x00f0    w[1] = v & 0x0f00 | v & 0xf000
 *   w[2] = u & 0x000f | u & 0x00f0    w[3] = u & 0x0f00 | u & 0xf000
 * (low half | high half of the register). Lane j (< 4) of w[i] holds weight
 * 4j + i and lane j + 4 weight 4j + 16 + i, times 2^e, e = 0 and 4 for
 * w[0] and w[2], 8 and 12 for w[1] and w[3]: exact, as each has at most
 * four significant bits. lp_cpu_matvec_prep_avx2 orders x the same way and
 * scales it by 2^-e, so that each product is exactly weight times x. */
AVX2_INLINE void load_q4(const uint8_t *qs, __m256 w[4])
{
	const __m256i m0 = _mm256_setr_epi32(0xf, 0xf, 0xf, 0xf, 0xf0, 0xf0, 0xf0, 0xf0);
	const __m256i m1 =
	    _mm256_setr_epi32(0xf00, 0xf00, 0xf00, 0xf00, 0xf000, 0xf000, 0xf000, 0xf000);
	__m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
	__m256i u = _mm256_srli_epi32(v, 16);

	w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v, m0));
	w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(v, m1));
	w[2] = _mm256_cvtepi32_ps(_mm256_and_si256(u, m0));
	w[3] = _mm256_cvtepi32_ps(_mm256_and_si256(u, m1));
}

/* The 32 weights of a Q5_0 / Q5_1 block, for the matrix-vector kernel:
 * first the 5-bit values as bytes, byte j = weight j (the nibbles of qs
 * spread to 32 bytes; bit j of qh, picked into byte j by a byte shuffle and
 * a compare, adds 16), then four masks of those bytes: lane L of w[i] holds
 * weight 4L + i times 2^(8i), exact with five significant bits.
 * lp_cpu_matvec_prep_avx2 orders and scales x to match. */
AVX2_INLINE void load_q5(const uint8_t *qs, const uint8_t *qhp, __m256 w[4])
{
	const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2,
	                                        2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
	const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
	/* both loads are broadcasts straight from memory */
	__m256i q = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
	__m256i h = _mm256_castps_si256(_mm256_broadcast_ss((const float *)qhp));

	q = _mm256_srlv_epi32(q, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
	q = _mm256_and_si256(q, _mm256_set1_epi8(0x0f));
	h = _mm256_shuffle_epi8(h, spread);

	h = _mm256_cmpeq_epi8(_mm256_and_si256(h, sel), sel);
	q = _mm256_or_si256(q, _mm256_and_si256(h, _mm256_set1_epi8(0x10)));
#pragma GCC unroll 4
	for (int i = 0; i < 4; i++)
		w[i] = _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(0x1f << (8 * i))));
}

/* Q4_K's weights, 64 at a time from 32 bytes of 4-bit values, as floats:
 * v is the 32 bytes, u = v >> 16 per dword. Side 0 takes the low nibbles,
 * side 1 the high ones; lane L of w[i] holds the nibble of byte 4L + i times
 * 2^e, e = 8 (i % 2) + 4 side (masks only, no shifts: exact, four
 * significant bits). */
AVX2_INLINE void k_nibbles(__m256i v, __m256i u, const int side, __m256 w[4])
{
	const __m256i m0 = _mm256_set1_epi32(0x0f << (4 * side));
	const __m256i m1 = _mm256_set1_epi32(0x0f00 << (4 * side));

	w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v, m0));
	w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(v, m1));
	w[2] = _mm256_cvtepi32_ps(_mm256_and_si256(u, m0));
	w[3] = _mm256_cvtepi32_ps(_mm256_and_si256(u, m1));
}

/* Q5_K's and Q6_K's weights, 32 at a time from 32 bytes q holding one
 * whole 5- or 6-bit value each: lane L of w[i] holds byte 4L + i times
 * 2^(8i) (masks only; exact, six significant bits). */
AVX2_INLINE void k_bytes(__m256i q, __m256 w[4])
{
#pragma GCC unroll 4
	for (int i = 0; i < 4; i++)
		w[i] = _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(0x3f << (8 * i))));
}

/* 32 floats of x in the order and scale load_q4 gives the weights of 16
 * bytes whose low nibbles go with xa[0 .. 16) and high nibbles with xb[0 ..
 * 16) (for Q4_0 xb = xa + 16). */
AVX2_INLINE void prep_chunk(const float *xa, const float *xb, float *q)
{
	const __m256 s0 = _mm256_setr_ps(1, 1, 1, 1, 0x1p-4f, 0x1p-4f, 0x1p-4f, 0x1p-4f);
	const __m256 s1 = _mm256_setr_ps(0x1p-8f, 0x1p-8f, 0x1p-8f, 0x1p-8f, 0x1p-12f, 0x1p-12f,
	                                 0x1p-12f, 0x1p-12f);
	__m256 x0 = _mm256_loadu_ps(xa), x1 = _mm256_loadu_ps(xa + 8);
	__m256 x2 = _mm256_loadu_ps(xb), x3 = _mm256_loadu_ps(xb + 8);
	/* a = xa 0-3 | xb 0-3, b = 4-7 | 4-7, c = 8-11 | 8-11, d = 12-15 |
	 * 12-15; then a 4 x 4 transpose in each half */
	__m256 a = _mm256_permute2f128_ps(x0, x2, 0x20);
	__m256 bv = _mm256_permute2f128_ps(x0, x2, 0x31);
	__m256 c = _mm256_permute2f128_ps(x1, x3, 0x20);
	__m256 d = _mm256_permute2f128_ps(x1, x3, 0x31);
	__m256 t0 = _mm256_unpacklo_ps(a, bv), t1 = _mm256_unpackhi_ps(a, bv);
	__m256 t2 = _mm256_unpacklo_ps(c, d), t3 = _mm256_unpackhi_ps(c, d);

	_mm256_storeu_ps(q, _mm256_mul_ps(_mm256_shuffle_ps(t0, t2, 0x44), s0));
	_mm256_storeu_ps(q + 8, _mm256_mul_ps(_mm256_shuffle_ps(t0, t2, 0xee), s1));
	_mm256_storeu_ps(q + 16, _mm256_mul_ps(_mm256_shuffle_ps(t1, t3, 0x44), s0));
	_mm256_storeu_ps(q + 24, _mm256_mul_ps(_mm256_shuffle_ps(t1, t3, 0xee), s1));
}

/* The sum of x[0 .. 16) or x[0 .. 32) (n8 = 2 or 4), vectors added as a
 * tree. */
AVX2_INLINE float sum_floats(const float *x, const int n8)
{
	__m256 s = _mm256_add_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8));

	if (n8 == 4)
		s = _mm256_add_ps(s,
		                  _mm256_add_ps(_mm256_loadu_ps(x + 16), _mm256_loadu_ps(x + 24)));
	return hsum(s);
}

/* The 64 floats of x for the registers of 32 bytes of a K-quant whose low
 * nibbles go with xa[0 .. 32) and high nibbles with xb[0 .. 32): for side s
 * and register i, lane L holds x[4L + i] * 2^-e, e as k_nibbles gives it
 * (bytes = false, Q4_K) or as k_bytes does (bytes = true, Q5_K, Q6_K). */
static inline void prep_k_group(const float *xa, const float *xb, float *q, bool bytes)
{
	static const float nib_scale[2][2] = {{1.0f, 0x1p-8f}, {0x1p-4f, 0x1p-12f}};
	static const float byte_scale[4] = {1.0f, 0x1p-8f, 0x1p-16f, 0x1p-24f};

	for (int side = 0; side < 2; side++)
		for (int i = 0; i < 4; i++)
			for (int l = 0; l < 8; l++)
				q[32 * side + 8 * i + l] =
				    (side ? xb : xa)[4 * l + i] *
				    (bytes ? byte_scale[i] : nib_scale[side][i % 2]);
}

/* The 32 floats of x for load_q5: lane L of register i holds x[4L + i] *
 * 2^(-8i). */
static inline void prep_q5_block(const float *x, float *q)
{
	static const float scale[4] = {1.0f, 0x1p-8f, 0x1p-16f, 0x1p-24f};

	for (int i = 0; i < 4; i++)
		for (int l = 0; l < 8; l++)
			q[8 * i + l] = x[4 * l + i] * scale[i];
}

/* x rows x[0 .. n) in the order and scale the weights are expanded in,
 * and per row the sums for the weights' offsets:
 *   Q4_0, Q4_1, Q5_0, Q5_1: per block of 32, its 32 floats (prep_chunk for
 *     load_q4, prep_q5_block for load_q5), and two sums: c (-8 times the
 *     block's sum for Q4_0, -16 for Q5_0, times d) and s (the sum for Q4_1
 *     and Q5_1, times m); the other zero;
 *   Q4_K, Q5_K: per block of 256, groups g < 4 of 64 floats for qs[32g ..
 *     32g + 32) (prep_k_group: low nibbles sub-block 2g, high ones 2g + 1),
 *     and 8 sums: minus each sub-block's sum (times dmin * m);
 *   Q6_K: per block, groups 2h + c for ql[64h + 32c ..] (low nibbles:
 *     weights 128h + 32c .., high ones 64 further), and 16 sums: -32 times
 *     each group of 16's sum (times its scale). */
AVX2 void lp_cpu_matvec_prep_avx2(enum lp_dtype t, const float *x, int n, int64_t k, float *prep)
{
	for (int j = 0; j < n; j++) {
		const float *xj = x + j * k;
		float *q = prep + (size_t)j * LP_CPU_PREP_ROW_FLOATS;
		float *sums = q + LP_CPU_PREP_SUMS;

		switch (t) {
		case LP_DTYPE_Q4_K:
		case LP_DTYPE_Q5_K:
			for (int64_t b = 0; b < k / LP_QK_K; b++, xj += LP_QK_K) {
				for (int g = 0; g < 4; g++)
					prep_k_group(xj + 64 * g, xj + 64 * g + 32, q + 64 * g,
					             t == LP_DTYPE_Q5_K);
				for (int sb = 0; sb < 8; sb++)
					sums[sb] = -sum_floats(xj + 32 * sb, 4);
				q += LP_QK_K;
				sums += 8;
			}
			break;
		case LP_DTYPE_Q6_K:
			for (int64_t b = 0; b < k / LP_QK_K; b++, xj += LP_QK_K) {
				for (int g = 0; g < 4; g++) {
					const float *xa = xj + 128 * (g / 2) + 32 * (g % 2);
					prep_k_group(xa, xa + 64, q + 64 * g, true);
				}
				for (int g = 0; g < 16; g++)
					sums[g] = -32.0f * sum_floats(xj + 16 * g, 2);
				q += LP_QK_K;
				sums += 16;
			}
			break;
		default: {
			const bool has_m = t == LP_DTYPE_Q4_1 || t == LP_DTYPE_Q5_1;
			const bool five = t == LP_DTYPE_Q5_0 || t == LP_DTYPE_Q5_1;
			const float off = t == LP_DTYPE_Q5_0 ? -16.0f : -8.0f;

			for (int64_t b = 0; b < k / LP_QK;
			     b++, xj += LP_QK, q += LP_QK, sums += 2) {
				float sum = sum_floats(xj, 4);

				if (five)
					prep_q5_block(xj, q);
				else
					prep_chunk(xj, xj + 16, q);
				sums[0] = has_m ? 0.0f : off * sum;
				sums[1] = has_m ? sum : 0.0f;
			}
			break;
		}
		}
	}
}

/* q . x of one block, before its scale d: the weights w (load_q4) against
 * the block's 32 prepared floats of x, as 8 partial sums. */
AVX2_INLINE __m256 dot_q4(const __m256 w[4], const float *q)
{
	__m256 d = _mm256_mul_ps(w[0], _mm256_load_ps(q));
	d = _mm256_fmadd_ps(w[1], _mm256_load_ps(q + 8), d);
	d = _mm256_fmadd_ps(w[2], _mm256_load_ps(q + 16), d);
	return _mm256_fmadd_ps(w[3], _mm256_load_ps(q + 24), d);
}

/* Q4_0 / Q4_1 / Q5_0 / Q5_1 rows [r0, r1) against n prepared rows of x:
 * sum_b d_b * (q_b . x_b) + offset_b * sum_b, the offset being m_b (Q4_1,
 * Q5_1) or -8 d_b (Q4_0), -16 d_b (Q5_0).
 *
 * Blocks go by fours: their (d, m) words are gathered into one register and
 * converted at once, [d0 m0 d1 m1 d2 m2 d3 m3] (for Q4_0 and Q5_0 the m
 * lanes hold weights or high bits and are cleared); the scales are
 * broadcast from a copy on the stack, and the offsets' share is one
 * multiply-add against the prepared sums [c0 s0 c1 s1 ...]
 * (lp_cpu_matvec_prep_avx2). Even and odd blocks go to two accumulators to keep the
 * chains short. Blocks past the last four go one by one. */
AVX2_INLINE void mv_q4(enum lp_dtype t, const void *w, size_t w_stride, int64_t r0, int64_t r1,
                       int64_t k, const int n, const float *prep, float *out, int64_t ldo,
                       bool accumulate)
{
	const bool has_m = t == LP_DTYPE_Q4_1 || t == LP_DTYPE_Q5_1;
	const bool five = t == LP_DTYPE_Q5_0 || t == LP_DTYPE_Q5_1;
	/* offsets of qh (Q5_x) and qs in a block */
	const size_t bb = lp_dtype_block_bytes(t), qh = has_m ? 4 : 2, qs = qh + (five ? 4 : 0);
	const __m256 even = _mm256_castsi256_ps(_mm256_setr_epi32(-1, 0, -1, 0, -1, 0, -1, 0));
	const uint8_t *end = (const uint8_t *)w + (size_t)r1 * w_stride;
	int64_t nb = k / LP_QK;
	float dbuf[8] __attribute__((aligned(32)));

	lp_cpu_prefetch_head(w, w_stride, r0, r1);
	for (int64_t r = r0; r < r1; r++) {
		const uint8_t *p = (const uint8_t *)w + (size_t)r * w_stride;
		const float *q = prep, *s = prep + LP_CPU_PREP_SUMS;
		__m256 acc0[LP_CPU_MATVEC_MAX_N], acc1[LP_CPU_MATVEC_MAX_N];
		__m128 macc[LP_CPU_MATVEC_MAX_N];
		int64_t b = 0;

		lp_cpu_prefetch_row(p, w_stride, end);

#pragma GCC unroll 4
		for (int j = 0; j < n; j++) {
			acc0[j] = _mm256_setzero_ps();
			acc1[j] = _mm256_setzero_ps();
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
			_mm256_store_ps(dbuf, dm);
#pragma GCC unroll 4
			for (int j = 0; j < n; j++)
				acc1[j] = _mm256_fmadd_ps(
				    dm, _mm256_load_ps(s + (size_t)j * LP_CPU_PREP_ROW_FLOATS),
				    acc1[j]);
#pragma GCC unroll 4
			for (int i = 0; i < 4; i++) {
				__m256 wv[4];
				__m256 dv = _mm256_broadcast_ss(dbuf + 2 * i);

				if (five)
					load_q5(p + i * bb + qs, p + i * bb + qh, wv);
				else
					load_q4(p + i * bb + qs, wv);
#pragma GCC unroll 4
				for (int j = 0; j < n; j++) {
					__m256 d = dot_q4(
					    wv, q + i * LP_QK + (size_t)j * LP_CPU_PREP_ROW_FLOATS);
					if (i % 2)
						acc1[j] = _mm256_fmadd_ps(dv, d, acc1[j]);
					else
						acc0[j] = _mm256_fmadd_ps(dv, d, acc0[j]);
				}
			}
		}
		for (; b < nb; b++, p += bb, q += LP_QK, s += 2) {
			__m256 wv[4];
			/* d and m, or d and two bytes that are not a scale */
			__m128 dm = _mm_cvtph_ps(_mm_loadu_si32(p));
			__m256 dv = _mm256_broadcastss_ps(dm);

			if (five)
				load_q5(p + qs, p + qh, wv);
			else
				load_q4(p + qs, wv);
#pragma GCC unroll 4
			for (int j = 0; j < n; j++) {
				const float *sj = s + (size_t)j * LP_CPU_PREP_ROW_FLOATS;
				__m128 sv = _mm_castpd_ps(_mm_load_sd((const double *)sj));
				acc0[j] = _mm256_fmadd_ps(
				    dv, dot_q4(wv, q + (size_t)j * LP_CPU_PREP_ROW_FLOATS),
				    acc0[j]);
				if (has_m)
					macc[j] = _mm_fmadd_ps(dm, sv, macc[j]);
				else
					macc[j] = _mm_fmadd_ss(dm, sv, macc[j]);
			}
		}
#pragma GCC unroll 4
		for (int j = 0; j < n; j++) {
			/* m * sum in lane 1 with m, d * c in lane 0 without */
			__m128 mt = has_m ? _mm_movehdup_ps(macc[j]) : macc[j];
			float sum = hsum(_mm256_add_ps(acc0[j], acc1[j])) + _mm_cvtss_f32(mt);
			float *o = out + j * ldo + r;
			*o = accumulate ? *o + sum : sum;
		}
	}
}

/* acc[j] += dv * (w . prepared x of row j), for n rows (dot_q4 over the 32
 * floats at q + 32 side of each row's group) */
AVX2_INLINE void k_side(const __m256 w[4], __m256 dv, const float *q, const int n, __m256 *acc)
{
#pragma GCC unroll 4
	for (int j = 0; j < n; j++)
		acc[j] =
		    _mm256_fmadd_ps(dv, dot_q4(w, q + (size_t)j * LP_CPU_PREP_ROW_FLOATS), acc[j]);
}

/* Q4_K / Q5_K / Q6_K rows [r0, r1) against n prepared rows of x.
 *
 * Q4_K, Q5_K: per block, sum_s D_s (q_s . x_s) - M_s sum(x_s). Each 32 bytes
 * qs[32g ..] hold sub-block 2g in their low nibbles and 2g + 1 in their
 * high ones, so each side is one sub-block: four registers (k_nibbles; for
 * Q5_K, k_bytes of the nibbles with their fifth bits from the same bytes of
 * qh), one scale D_s from a copy on the stack. The minimums' share is one
 * multiply-add per block against the prepared (negated) sub-block sums.
 *
 * Q6_K: per block, sum_g D_g (q_g . x_g) - 32 D_g sum(x_g) over its groups of
 * 16, D_g = d * scales[g]. The 32 bytes ql[64h + 32c ..] hold groups 8h + 2c
 * and + 1 in their low nibbles (the low and high halves of k_bytes'
 * registers), 8h + 2c + 4 and + 5 in their high ones; qh[32h ..] gives the
 * two high bits of both. Sides go to two accumulators. */
AVX2_INLINE void mv_k(enum lp_dtype t, const void *w, size_t w_stride, int64_t r0, int64_t r1,
                      int64_t k, const int n, const float *prep, float *out, int64_t ldo,
                      bool accumulate)
{
	const bool six = t == LP_DTYPE_Q6_K, five = t == LP_DTYPE_Q5_K;
	const size_t bb = lp_dtype_block_bytes(t), nsums = six ? 16 : 8;
	const uint8_t *end = (const uint8_t *)w + (size_t)r1 * w_stride;
	int64_t nb = k / LP_QK_K;
	float dbuf[8] __attribute__((aligned(32)));

	lp_cpu_prefetch_head(w, w_stride, r0, r1);
	for (int64_t r = r0; r < r1; r++) {
		const uint8_t *p = (const uint8_t *)w + (size_t)r * w_stride;
		const float *q = prep, *s = prep + LP_CPU_PREP_SUMS;
		__m256 acc0[LP_CPU_MATVEC_MAX_N], acc1[LP_CPU_MATVEC_MAX_N];

		lp_cpu_prefetch_row(p, w_stride, end);
#pragma GCC unroll 4
		for (int j = 0; j < n; j++) {
			acc0[j] = _mm256_setzero_ps();
			acc1[j] = _mm256_setzero_ps();
		}
		for (int64_t b = 0; b < nb; b++, p += bb, q += LP_QK_K, s += nsums) {
			if (six) {
				const struct lp_block_q6_k *blk = (const struct lp_block_q6_k *)p;
				__m256 d = _mm256_set1_ps(f16(blk->d)), D[2];

				D[0] = _mm256_mul_ps(
				    d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
				           _mm_loadl_epi64((const __m128i *)blk->scales))));
				D[1] = _mm256_mul_ps(
				    d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
				           _mm_loadl_epi64((const __m128i *)(blk->scales + 8)))));
#pragma GCC unroll 4
				for (int j = 0; j < n; j++) {
					const float *sj = s + (size_t)j * LP_CPU_PREP_ROW_FLOATS;
					acc1[j] =
					    _mm256_fmadd_ps(D[0], _mm256_load_ps(sj), acc1[j]);
					acc1[j] =
					    _mm256_fmadd_ps(D[1], _mm256_load_ps(sj + 8), acc1[j]);
				}
#pragma GCC unroll 2
				for (int h = 0; h < 2; h++) {
					__m256i hv =
					    _mm256_loadu_si256((const __m256i *)(blk->qh + 32 * h));
#pragma GCC unroll 2
					for (int c = 0; c < 2; c++) {
						__m256i v = _mm256_loadu_si256(
						    (const __m256i *)(blk->ql + 64 * h + 32 * c));
						const float *qg = q + 64 * (2 * h + c);
						__m256 wv[4];

						k_bytes(k_assemble(v, hv, 0, 2 * c, 2), wv);
						k_side(wv, pair_bcast(D[h], 2 * c, 2 * c + 1), qg,
						       n, acc0);
						k_bytes(k_assemble(v, hv, 1, 2 * c + 4, 2), wv);
						k_side(wv, pair_bcast(D[h], 2 * c + 4, 2 * c + 5),
						       qg + 32, n, acc1);
					}
				}
				continue;
			}
			__m256 D, M;
			__m256i hv = five ? _mm256_loadu_si256((const __m256i *)(p + 16))
			                  : _mm256_setzero_si256();

			k4_scales(p, &D, &M);
			_mm256_store_ps(dbuf, D);
#pragma GCC unroll 4
			for (int j = 0; j < n; j++)
				acc1[j] = _mm256_fmadd_ps(
				    M, _mm256_load_ps(s + (size_t)j * LP_CPU_PREP_ROW_FLOATS),
				    acc1[j]);
#pragma GCC unroll 4
			for (int g = 0; g < 4; g++) {
				__m256i v = _mm256_loadu_si256(
				    (const __m256i *)(p + (five ? 48 : 16) + 32 * g));
				const float *qg = q + 64 * g;
				__m256 wv[4];

				if (five) {
					k_bytes(k_assemble(v, hv, 0, 2 * g, 1), wv);
					k_side(wv, _mm256_broadcast_ss(dbuf + 2 * g), qg, n, acc0);
					k_bytes(k_assemble(v, hv, 1, 2 * g + 1, 1), wv);
					k_side(wv, _mm256_broadcast_ss(dbuf + 2 * g + 1), qg + 32,
					       n, acc1);
					continue;
				}
				__m256i u = _mm256_srli_epi32(v, 16);
				k_nibbles(v, u, 0, wv);
				k_side(wv, _mm256_broadcast_ss(dbuf + 2 * g), qg, n, acc0);
				k_nibbles(v, u, 1, wv);
				k_side(wv, _mm256_broadcast_ss(dbuf + 2 * g + 1), qg + 32, n, acc1);
			}
		}
#pragma GCC unroll 4
		for (int j = 0; j < n; j++) {
			float sum = hsum(_mm256_add_ps(acc0[j], acc1[j]));
			float *o = out + j * ldo + r;
			*o = accumulate ? *o + sum : sum;
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
                             int64_t r1, int64_t k, const float *x, int n, const float *prep,
                             float *out, int64_t ldo, bool accumulate)
{
#define MV_CALL(T, N) mv_q4(T, w, w_stride, r0, r1, k, N, prep, out, ldo, accumulate)
	switch (t) {
	case LP_DTYPE_Q4_0:
		MV_CASES(LP_DTYPE_Q4_0);
		return;
	case LP_DTYPE_Q4_1:
		MV_CASES(LP_DTYPE_Q4_1);
		return;
	case LP_DTYPE_Q5_0:
		MV_CASES(LP_DTYPE_Q5_0);
		return;
	case LP_DTYPE_Q5_1:
		MV_CASES(LP_DTYPE_Q5_1);
		return;
	default:
		break;
	}
#undef MV_CALL
#define MV_CALL(T, N) mv_k(T, w, w_stride, r0, r1, k, N, prep, out, ldo, accumulate)
	switch (t) {
	case LP_DTYPE_Q4_K:
		MV_CASES(LP_DTYPE_Q4_K);
		return;
	case LP_DTYPE_Q5_K:
		MV_CASES(LP_DTYPE_Q5_K);
		return;
	case LP_DTYPE_Q6_K:
		MV_CASES(LP_DTYPE_Q6_K);
		return;
	default:
		break;
	}
#undef MV_CALL
#define MV_CALL(T, N) mv_q8(w, w_stride, r0, r1, k, x, N, out, ldo, accumulate)
	if (t == LP_DTYPE_Q8_0) {
		MV_CASES(LP_DTYPE_Q8_0);
		return;
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
                                 int ncols, int64_t k0, int64_t kc, float *panel, float *rows,
                                 bool avx512)
{
	int64_t kk = 0;

	for (int c = 0; c < LP_CPU_NR; c++) {
		float *dst = rows + (size_t)c * LP_CPU_ROWS_STRIDE;
		const void *row = (const char *)w + (size_t)(c0 + c) * w_stride;
		if (c < ncols && avx512)
			lp_cpu_dequant_avx512(t, row, k0, kc, dst);
		else if (c < ncols)
			lp_cpu_dequant_avx2(t, row, k0, kc, dst);
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

/* ---- attention (attention.c says what a row computes) ---- */

/* Cache elements as f32: kt is F32, F16 or BF16, a constant wherever these
 * are inlined, so that each kernel below is compiled once per cache type. */
AVX2_INLINE __m256 load_kv(const void *row, int i, const enum lp_dtype kt)
{
	if (kt == LP_DTYPE_F16)
		return load_f16((const uint16_t *)row + i);
	if (kt == LP_DTYPE_BF16)
		return load_bf16((const uint16_t *)row + i);
	return _mm256_loadu_ps((const float *)row + i);
}

AVX2_INLINE float kv_at(const void *row, int i, const enum lp_dtype kt)
{
	if (kt == LP_DTYPE_F16)
		return f16(((const uint16_t *)row)[i]);
	if (kt == LP_DTYPE_BF16)
		return lp_bf16_to_f32(((const uint16_t *)row)[i]);
	return ((const float *)row)[i];
}

/* Eight sums of eight vectors each: sum p is ((x0 + x1) + (x2 + x3)) + ((x4 +
 * x5) + (x6 + x7)) of the lanes x0..x7 of a[p]. */
AVX2_INLINE __m256 hsum8x8(const __m256 a[8])
{
	__m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
	__m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
	__m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);

	return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
	                     _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* The sum of the lanes of v in the order hsum8x8 takes them. */
AVX2_INLINE float hsum_tree(__m256 v)
{
	__m256 h = _mm256_hadd_ps(v, v);

	h = _mm256_hadd_ps(h, h);
	return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

/* x, kept in a register: a value that serves two multiply-adds is loaded
 * once (the compiler would otherwise fold the load into both). */
AVX2_INLINE __m256 in_reg(__m256 x)
{
	__asm__("" : "+x"(x));
	return x;
}

/* t plus q[i] k[i] for the dimensions past the last multiple of 8, in order */
AVX2_INLINE float dot_tail(float t, const float *q, const char *k, int full, int hd,
                           const enum lp_dtype kt)
{
	for (int i = full; i < hd; i++)
		t = fmaf(q[i], kv_at(k, i, kt), t);
	return t;
}

/* Scores of nq (1 or 2) queries against cnt rows: s[a][j] = scale * q[a] .
 * k_j. Each is the same function of q[a] and k_j wherever j falls and
 * whatever the other query: lane r of an accumulator sums q[i] k[i] for i
 * = r, r + 8, ... in order, the lanes are added as a tree (hsum8x8 or
 * hsum_tree), then come the tail dimensions and the scale. Blocks of 8 / nq
 * positions share each load of q, and (nq = 2) of k. */
AVX2_INLINE void attn_scores(const int nq, const float *const *q, const char *kbase, size_t stride,
                             const int64_t *rows, int cnt, int hd, const enum lp_dtype kt,
                             float scale, float (*s)[LP_CPU_ATTN_CHUNK])
{
	const int np = 8 / nq;
	int full = hd / 8 * 8, j = 0;

	for (; j + np <= cnt; j += np) {
		const char *k[8];
		__m256 acc[8];
#pragma GCC unroll 8
		for (int p = 0; p < np; p++)
			k[p] = kbase + (size_t)rows[j + p] * stride;
#pragma GCC unroll 8
		for (int x = 0; x < 8; x++)
			acc[x] = _mm256_setzero_ps();
		for (int i = 0; i < full; i += 8) {
			if (nq == 1) {
				__m256 qv = _mm256_loadu_ps(q[0] + i);
#pragma GCC unroll 8
				for (int p = 0; p < 8; p++)
					acc[p] = _mm256_fmadd_ps(qv, load_kv(k[p], i, kt), acc[p]);
			} else {
				__m256 qa = _mm256_loadu_ps(q[0] + i),
				       qb = _mm256_loadu_ps(q[1] + i);
#pragma GCC unroll 4
				for (int p = 0; p < 4; p++) {
					__m256 kv = in_reg(load_kv(k[p], i, kt));
					acc[p] = _mm256_fmadd_ps(qa, kv, acc[p]);
					acc[4 + p] = _mm256_fmadd_ps(qb, kv, acc[4 + p]);
				}
			}
		}
		__m256 sv = hsum8x8(acc);
		if (full < hd) {
			float t[8];
			_mm256_storeu_ps(t, sv);
			for (int x = 0; x < 8; x++)
				t[x] = dot_tail(t[x], q[x / np], k[x % np], full, hd, kt);
			sv = _mm256_loadu_ps(t);
		}
		sv = _mm256_mul_ps(sv, _mm256_set1_ps(scale));
		if (nq == 1) {
			_mm256_storeu_ps(s[0] + j, sv);
		} else {
			_mm_storeu_ps(s[0] + j, _mm256_castps256_ps128(sv));
			_mm_storeu_ps(s[1] + j, _mm256_extractf128_ps(sv, 1));
		}
	}
	for (; j < cnt; j++) {
		const char *k = kbase + (size_t)rows[j] * stride;
		for (int a = 0; a < nq; a++) {
			__m256 acc = _mm256_setzero_ps();
			for (int i = 0; i < full; i += 8)
				acc = _mm256_fmadd_ps(_mm256_loadu_ps(q[a] + i), load_kv(k, i, kt),
				                      acc);
			s[a][j] = scale * dot_tail(hsum_tree(acc), q[a], k, full, hd, kt);
		}
	}
}

/* s[0, cnt) = e_j = exp(s_j - m), m the maximum; l = the tree sum
 * (hsum_tree) of ((e[0, 8) + e[8, 16)) + e[16, 24)) + ..., lanes past cnt
 * zero. */
AVX2_INLINE void attn_softmax(float *s, int cnt, float *m, float *l)
{
	const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
	const __m256 ninf = _mm256_set1_ps(-INFINITY);
	int nv = (cnt + 7) / 8;
	__m256 mv = ninf, lv = _mm256_setzero_ps();

	for (int v = 0; v < nv; v++) {
		__m256 live =
		    _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(cnt - 8 * v), lane));
		__m256 sv = _mm256_blendv_ps(ninf, _mm256_load_ps(s + 8 * v), live);
		_mm256_store_ps(s + 8 * v, sv);
		mv = _mm256_max_ps(mv, sv);
	}
	__m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
	m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
	m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
	*m = _mm_cvtss_f32(m4);
	__m256 mm = _mm256_set1_ps(*m);
	for (int v = 0; v < nv; v++) {
		__m256 sv = _mm256_load_ps(s + 8 * v);
		__m256 dead = _mm256_cmp_ps(sv, ninf, _CMP_EQ_OQ);
		__m256 e = _mm256_andnot_ps(dead, exp8(_mm256_sub_ps(sv, mm)));
		_mm256_store_ps(s + 8 * v, e);
		lv = v ? _mm256_add_ps(lv, e) : e;
	}
	*l = hsum_tree(lv);
}

/* For each of nq queries a: o[a][d0, d0 + 8 nv) from acc = sum over j <
 * cnt, in order, of e[a][j] v_j, from zero (v_j laid out like k_j): o = acc
 * where ab[a] is NULL, otherwise o = acc * ab[a][1] + o * ab[a][0], one
 * fused multiply-add of a product. The strip is in registers; each load of
 * v serves the nq queries. */
AVX2_INLINE void attn_accum_strip(const int nq, float *const *o, const char *vbase, size_t stride,
                                  const int64_t *rows, const float *const *e, int cnt,
                                  const enum lp_dtype kt, const float *const *ab, int d0,
                                  const int nv)
{
	__m256 acc[2][8];

#pragma GCC unroll 2
	for (int a = 0; a < nq; a++)
#pragma GCC unroll 8
		for (int v = 0; v < nv; v++)
			acc[a][v] = _mm256_setzero_ps();
	for (int j = 0; j < cnt; j++) {
		const char *row = vbase + (size_t)rows[j] * stride;
		__m256 ev[2];
#pragma GCC unroll 2
		for (int a = 0; a < nq; a++)
			ev[a] = _mm256_set1_ps(e[a][j]);
#pragma GCC unroll 8
		for (int v = 0; v < nv; v++) {
			__m256 x = load_kv(row, d0 + 8 * v, kt);
			if (nq > 1)
				x = in_reg(x);
#pragma GCC unroll 2
			for (int a = 0; a < nq; a++)
				acc[a][v] = _mm256_fmadd_ps(ev[a], x, acc[a][v]);
		}
	}
#pragma GCC unroll 2
	for (int a = 0; a < nq; a++) {
		if (ab[a]) {
			__m256 fa = _mm256_set1_ps(ab[a][0]), fb = _mm256_set1_ps(ab[a][1]);
#pragma GCC unroll 8
			for (int v = 0; v < nv; v++)
				acc[a][v] = _mm256_fmadd_ps(
				    acc[a][v], fb,
				    _mm256_mul_ps(_mm256_loadu_ps(o[a] + d0 + 8 * v), fa));
		}
#pragma GCC unroll 8
		for (int v = 0; v < nv; v++)
			_mm256_storeu_ps(o[a] + d0 + 8 * v, acc[a][v]);
	}
}

/* attn_accum_strip over all hd dimensions: strips of 8 / nq vectors, then
 * the dimensions past the last multiple of 8 one by one. */
AVX2_INLINE void attn_accum(const int nq, float *const *o, const char *vbase, size_t stride,
                            const int64_t *rows, const float *const *e, int cnt, int hd,
                            const enum lp_dtype kt, const float *const *ab)
{
	const int w = 8 / nq;
	int d0 = 0;

	for (; d0 + 8 * w <= hd; d0 += 8 * w)
		attn_accum_strip(nq, o, vbase, stride, rows, e, cnt, kt, ab, d0, w);
	switch ((hd - d0) / 8) {
	case 7:
		attn_accum_strip(nq, o, vbase, stride, rows, e, cnt, kt, ab, d0, 7);
		break;
	case 6:
		attn_accum_strip(nq, o, vbase, stride, rows, e, cnt, kt, ab, d0, 6);
		break;
	case 5:
		attn_accum_strip(nq, o, vbase, stride, rows, e, cnt, kt, ab, d0, 5);
		break;
	case 4:
		attn_accum_strip(nq, o, vbase, stride, rows, e, cnt, kt, ab, d0, 4);
		break;
	case 3:
		attn_accum_strip(nq, o, vbase, stride, rows, e, cnt, kt, ab, d0, 3);
		break;
	case 2:
		attn_accum_strip(nq, o, vbase, stride, rows, e, cnt, kt, ab, d0, 2);
		break;
	case 1:
		attn_accum_strip(nq, o, vbase, stride, rows, e, cnt, kt, ab, d0, 1);
		break;
	default:
		break;
	}
	for (int a = 0; a < nq; a++) {
		for (int i = hd / 8 * 8; i < hd; i++) {
			float acc = 0.0f;
			for (int j = 0; j < cnt; j++)
				acc = fmaf(e[a][j], kv_at(vbase + (size_t)rows[j] * stride, i, kt),
				           acc);
			o[a][i] = ab[a] ? fmaf(acc, ab[a][1], o[a][i] * ab[a][0]) : acc;
		}
	}
}

/* The scalar half of a fold (attention.c): ml = (M, L) of a row, (m, l) a
 * chunk's; the result (A, B) goes to ab. The only code either fold uses for it. */
AVX2_INLINE void fold_ml(float *ml, float m, float l, float ab[2])
{
	float mn = m > ml[0] ? m : ml[0];
	__m256 x = exp8(_mm256_setr_ps(ml[0] - mn, m - mn, 0, 0, 0, 0, 0, 0));

	ab[0] = _mm256_cvtss_f32(x);
	ab[1] = _mm256_cvtss_f32(_mm256_permute_ps(x, 1));
	ml[1] = fmaf(l, ab[1], ml[1] * ab[0]);
	ml[0] = mn;
}

/* One chunk of nq rows (lp_cpu_attn_chunk_kv_avx2). */
AVX2_INLINE void attn_chunk(const int nq, const float *const *q, const char *kbase,
                            const char *vbase, size_t stride, const enum lp_dtype kt,
                            const int64_t *rows, int cnt, int hd, float scale, float *const *o,
                            float *const *ml, float *const *part)
{
	float s[2][LP_CPU_ATTN_CHUNK] __attribute__((aligned(32)));
	float ab[2][2], *dst[2];
	const float *e[2], *abp[2];

	attn_scores(nq, q, kbase, stride, rows, cnt, hd, kt, scale, s);
	for (int a = 0; a < nq; a++) {
		float m, l;

		attn_softmax(s[a], cnt, &m, &l);
		e[a] = s[a];
		if (part[a]) {
			part[a][hd] = m;
			part[a][hd + 1] = l;
			dst[a] = part[a];
			abp[a] = NULL;
		} else {
			fold_ml(ml[a], m, l, ab[a]);
			dst[a] = o[a];
			abp[a] = ab[a];
		}
	}
	attn_accum(nq, dst, vbase, stride, rows, e, cnt, hd, kt, abp);
}

/* attn_chunk with the loops of the common head sizes unrolled (the same
 * operations, fewer of their overheads). */
AVX2_INLINE void attn_chunk_hd(const int nq, const float *const *q, const char *kbase,
                               const char *vbase, size_t stride, const enum lp_dtype kt,
                               const int64_t *rows, int cnt, int hd, float scale, float *const *o,
                               float *const *ml, float *const *part)
{
	if (hd == 64)
		attn_chunk(nq, q, kbase, vbase, stride, kt, rows, cnt, 64, scale, o, ml, part);
	else if (hd == 128)
		attn_chunk(nq, q, kbase, vbase, stride, kt, rows, cnt, 128, scale, o, ml, part);
	else
		attn_chunk(nq, q, kbase, vbase, stride, kt, rows, cnt, hd, scale, o, ml, part);
}

/* attn_chunk_hd compiled for each row count and cache type. */
AVX2 void lp_cpu_attn_chunk_kv_avx2(int nq, const float *const q[], const char *kbase,
                                    const char *vbase, size_t stride, enum lp_dtype kt,
                                    const int64_t *rows, int cnt, int hd, float scale,
                                    float *const o[], float *const ml[], float *const part[])
{
#define ATTN_CHUNK_CASE(NQ, KT)                                                                    \
	attn_chunk_hd(NQ, q, kbase, vbase, stride, KT, rows, cnt, hd, scale, o, ml, part)
	if (nq == 2 && kt == LP_DTYPE_F16)
		ATTN_CHUNK_CASE(2, LP_DTYPE_F16);
	else if (nq == 2 && kt == LP_DTYPE_BF16)
		ATTN_CHUNK_CASE(2, LP_DTYPE_BF16);
	else if (nq == 2)
		ATTN_CHUNK_CASE(2, LP_DTYPE_F32);
	else if (kt == LP_DTYPE_F16)
		ATTN_CHUNK_CASE(1, LP_DTYPE_F16);
	else if (kt == LP_DTYPE_BF16)
		ATTN_CHUNK_CASE(1, LP_DTYPE_BF16);
	else
		ATTN_CHUNK_CASE(1, LP_DTYPE_F32);
#undef ATTN_CHUNK_CASE
}

/* Per element the same operations as attn_chunk's fold (fold_ml, then the
 * fold in attn_accum_strip and the tail of attn_accum). */
AVX2 void lp_cpu_attn_fold_avx2(float *o, float *ml, const float *part, int hd)
{
	float ab[2];
	int i = 0;

	fold_ml(ml, part[hd], part[hd + 1], ab);
	__m256 a = _mm256_set1_ps(ab[0]), b = _mm256_set1_ps(ab[1]);
	for (; i + 8 <= hd; i += 8)
		_mm256_storeu_ps(o + i, _mm256_fmadd_ps(_mm256_loadu_ps(part + i), b,
		                                        _mm256_mul_ps(_mm256_loadu_ps(o + i), a)));
	for (; i < hd; i++)
		o[i] = fmaf(part[i], ab[1], o[i] * ab[0]);
}

AVX2_INLINE void attn_gather(float *dst, const char *base, size_t stride, const int64_t *rows,
                             int cnt, int hd, const enum lp_dtype kt)
{
	for (int j = 0; j < cnt; j++) {
		const char *row = base + (size_t)rows[j] * stride;
		float *d = dst + (size_t)j * hd;
		int i = 0;

		for (; i + 8 <= hd; i += 8)
			_mm256_storeu_ps(d + i, load_kv(row, i, kt));
		for (; i < hd; i++)
			d[i] = kv_at(row, i, kt);
	}
}

AVX2 void lp_cpu_attn_gather_kv_avx2(float *dst, const char *base, size_t stride,
                                     const int64_t *rows, int cnt, int hd, enum lp_dtype kt)
{
	if (kt == LP_DTYPE_F16)
		attn_gather(dst, base, stride, rows, cnt, hd, LP_DTYPE_F16);
	else if (kt == LP_DTYPE_BF16)
		attn_gather(dst, base, stride, rows, cnt, hd, LP_DTYPE_BF16);
	else
		attn_gather(dst, base, stride, rows, cnt, hd, LP_DTYPE_F32);
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
