/* Helpers of the x86 kernels (vec-avx2.c, vec-avx512.c): AVX2 + FMA + F16C
 * inline functions, which the AVX-512 kernels use too (an AVX-512 target
 * includes these). Include only from x86 code (LP_CPU_X86). */
#ifndef LP_KERNELS_CPU_VEC_X86_H
#define LP_KERNELS_CPU_VEC_X86_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define AVX2        __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE static inline __attribute__((target("avx2,fma,f16c"), always_inline))

AVX2_INLINE float hsum(__m256 v)
{
	__m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
	s = _mm_add_ps(s, _mm_movehl_ps(s, s));
	s = _mm_add_ss(s, _mm_movehdup_ps(s));
	return _mm_cvtss_f32(s);
}

AVX2_INLINE uint32_t load_u32(const void *p)
{
	uint32_t v;
	memcpy(&v, p, sizeof(v));
	return v;
}

/* The sub-block factors of a Q4_K / Q5_K block at p: D[s] = d * sc[s] and
 * M[s] = dmin * m[s] for its 8 sub-blocks, the f32 products of the
 * reference. The 12 scale bytes are three words a, b, c: scales 0-3 are the
 * low six bits of a's bytes, minimums 0-3 those of b's; scales 4-7 the low
 * nibbles of c's bytes with the top two bits of a's, minimums 4-7 the high
 * nibbles of c's with the top two bits of b's. With the block's first 16
 * bytes [dm a b c] in one register, [a c b c] >> [0 0 0 4] masked gives
 * the low bits of [sc0-3 sc4-7 m0-3 m4-7], [. a . b] >> 2 their top bits. */
AVX2_INLINE void k4_scales(const uint8_t *p, __m256 *D, __m256 *M)
{
	__m128i x = _mm_loadu_si128((const __m128i *)p);
	__m128 dm = _mm_cvtph_ps(x);
	__m128i lo = _mm_srlv_epi32(_mm_shuffle_epi32(x, _MM_SHUFFLE(3, 2, 3, 1)),
	                            _mm_setr_epi32(0, 0, 0, 4));
	__m128i hi = _mm_srli_epi32(_mm_shuffle_epi32(x, _MM_SHUFFLE(2, 0, 1, 0)), 2);
	__m128i sm = _mm_or_si128(
	    _mm_and_si128(lo, _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f)),
	    _mm_and_si128(hi, _mm_setr_epi32(0, 0x30303030, 0, 0x30303030)));

	*D = _mm256_mul_ps(_mm256_broadcastss_ps(dm), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm)));
	*M = _mm256_mul_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dm)),
	                   _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(sm, sm))));
}

/* The 32 bytes for k_bytes: the low (side 0) or high (side 1) nibbles of the
 * 32 bytes v, with bits b .. b + nb - 1 of the 32 bytes h (the bytes of qh
 * that pair with them) above, as bits 4 .. 3 + nb of each byte. 16-bit
 * shifts move bits across bytes, which the byte masks drop. */
AVX2_INLINE __m256i k_assemble(__m256i v, __m256i h, const int side, const int b, const int nb)
{
	const __m256i lo = _mm256_set1_epi8(0x0f), hm = _mm256_set1_epi8(nb == 2 ? 0x30 : 0x10);
	__m256i n = _mm256_and_si256(side ? _mm256_srli_epi16(v, 4) : v, lo);
	__m256i hb = b <= 4 ? _mm256_slli_epi16(h, 4 - b) : _mm256_srli_epi16(h, b - 4);

	return _mm256_or_si256(n, _mm256_and_si256(hb, hm));
}

/* [v[a] x 4, v[b] x 4] */
AVX2_INLINE __m256 pair_bcast(__m256 v, const int a, const int b)
{
	return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(a, a, a, a, b, b, b, b));
}

/* Software prefetch of the weights, which stream from memory once per
 * product: the hardware prefetcher stops at each 4 KiB page and starts
 * each chunk of rows cold. One prefetch per cache line of [p, p + len). */
static inline void lp_cpu_prefetch_lines(const uint8_t *p, size_t len)
{
	for (size_t off = 0; off < len; off += 64)
		_mm_prefetch((const char *)p + off, _MM_HINT_T0);
}

/* Before rows [r0, r1): the first LP_CPU_MATVEC_PREFETCH bytes; before
 * each row, the row that far ahead, within the rows' span. */
static inline void lp_cpu_prefetch_head(const void *w, size_t w_stride, int64_t r0, int64_t r1)
{
	size_t span = (size_t)(r1 - r0) * w_stride;

	if (LP_CPU_MATVEC_PREFETCH > 0)
		lp_cpu_prefetch_lines((const uint8_t *)w + (size_t)r0 * w_stride,
		                      span < LP_CPU_MATVEC_PREFETCH ? span
		                                                    : LP_CPU_MATVEC_PREFETCH);
}

static inline void lp_cpu_prefetch_row(const uint8_t *row, size_t w_stride, const uint8_t *end)
{
	const uint8_t *p = row + LP_CPU_MATVEC_PREFETCH;

	if (LP_CPU_MATVEC_PREFETCH > 0 && p < end)
		lp_cpu_prefetch_lines(p,
		                      (size_t)(end - p) < w_stride ? (size_t)(end - p) : w_stride);
}

#endif
