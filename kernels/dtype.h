/* Element and block formats of tensors, shared by every backend.
 *
 * Quantized formats store rows as a sequence of blocks of lp_dtype_block(t)
 * weights; a row of n weights takes n / block * block_bytes bytes, and n must
 * be a multiple of the block size. Layouts follow ggml's. Blocks of 32:
 *   Q8_0: f16 d, int8 q[32];                   w = d * q
 *   Q4_0: f16 d, u8 qs[16];                    w = d * (q - 8)
 *   Q4_1: f16 d, f16 m, u8 qs[16];             w = d * q + m
 *   Q5_0: f16 d, u8 qh[4], u8 qs[16];          w = d * (q - 16)
 *   Q5_1: f16 d, f16 m, u8 qh[4], u8 qs[16];   w = d * q + m
 * where byte j of qs holds the low four bits of weight j in its low nibble and
 * those of weight j + 16 in its high nibble; for Q5_x bit j of qh (read as a
 * little-endian u32) is bit 4 of weight j.
 *
 * K-quants, blocks ("super-blocks") of 256 with sub-block scales:
 *   Q4_K: f16 d, f16 dmin, u8 scales[12], u8 qs[128]
 *         8 sub-blocks of 32, each with a 6-bit scale sc and minimum m
 *         (lp_q4_k_scale_min); w = (d * sc) * q - (dmin * m). Sub-blocks
 *         2i and 2i + 1 are the low and high nibbles of qs[32i .. 32i + 32).
 *   Q5_K: Q4_K's fields, then u8 qh[32] before qs; bit s of qh[l] is bit 4
 *         of element l of sub-block s.
 *   Q6_K: u8 ql[128], u8 qh[64], int8 scales[16], f16 d
 *         16 groups of 16 with scale d * scales[g]; w = (d * sc) * (q - 32),
 *         q of 6 bits: in each half h of 128, element 32t + l (t < 4,
 *         l < 32) has the low four bits in nibble t / 2 of ql[64h + 32(t % 2)
 *         + l] and the high two in bits 2t, 2t + 1 of qh[32h + l].
 * Products and sums are f32 in the order written (each a separate rounding),
 * which is what the gguf package's numpy dequantisation computes. */
#ifndef LP_KERNELS_DTYPE_H
#define LP_KERNELS_DTYPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#define _Static_assert static_assert
#endif

enum lp_dtype {
	LP_DTYPE_F32,
	LP_DTYPE_F16,
	LP_DTYPE_BF16,
	LP_DTYPE_Q8_0,
	LP_DTYPE_Q4_0,
	LP_DTYPE_Q4_1,
	LP_DTYPE_Q5_0,
	LP_DTYPE_Q5_1,
	LP_DTYPE_Q4_K,
	LP_DTYPE_Q5_K,
	LP_DTYPE_Q6_K,
	LP_DTYPE_I32,
	LP_DTYPE_COUNT
};

#define LP_QK   32  /* weights per block of the Q formats */
#define LP_QK_K 256 /* weights per block of the K-quants */

struct lp_block_q8_0 {
	uint16_t d;
	int8_t qs[LP_QK];
};

struct lp_block_q4_0 {
	uint16_t d;
	uint8_t qs[LP_QK / 2];
};

struct lp_block_q4_1 {
	uint16_t d;
	uint16_t m;
	uint8_t qs[LP_QK / 2];
};

struct lp_block_q5_0 {
	uint16_t d;
	uint8_t qh[4];
	uint8_t qs[LP_QK / 2];
};

struct lp_block_q5_1 {
	uint16_t d;
	uint16_t m;
	uint8_t qh[4];
	uint8_t qs[LP_QK / 2];
};

struct lp_block_q4_k {
	uint16_t d;
	uint16_t dmin;
	uint8_t scales[12];
	uint8_t qs[LP_QK_K / 2];
};

struct lp_block_q5_k {
	uint16_t d;
	uint16_t dmin;
	uint8_t scales[12];
	uint8_t qh[LP_QK_K / 8];
	uint8_t qs[LP_QK_K / 2];
};

struct lp_block_q6_k {
	uint8_t ql[LP_QK_K / 2];
	uint8_t qh[LP_QK_K / 4];
	int8_t scales[LP_QK_K / 16];
	uint16_t d;
};

_Static_assert(sizeof(struct lp_block_q8_0) == 34, "q8_0 block size");
_Static_assert(sizeof(struct lp_block_q4_0) == 18, "q4_0 block size");
_Static_assert(sizeof(struct lp_block_q4_1) == 20, "q4_1 block size");
_Static_assert(sizeof(struct lp_block_q5_0) == 22, "q5_0 block size");
_Static_assert(sizeof(struct lp_block_q5_1) == 24, "q5_1 block size");
_Static_assert(sizeof(struct lp_block_q4_k) == 144, "q4_k block size");
_Static_assert(sizeof(struct lp_block_q5_k) == 176, "q5_k block size");
_Static_assert(sizeof(struct lp_block_q6_k) == 210, "q6_k block size");

/* The 6-bit scale and minimum of sub-block j (< 8) of a Q4_K or Q5_K block
 * from its 12 scale bytes: j < 4 in the low six bits of bytes j and j + 4;
 * j >= 4 in the nibbles of byte j + 4 (scale low, minimum high) with the two
 * high bits from the top of bytes j - 4 and j. */
static inline void lp_q4_k_scale_min(const uint8_t *scales, int j, uint8_t *sc, uint8_t *m)
{
	if (j < 4) {
		*sc = scales[j] & 63;
		*m = scales[j + 4] & 63;
	} else {
		*sc = (uint8_t)((scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4));
		*m = (uint8_t)((scales[j + 4] >> 4) | ((scales[j] >> 6) << 4));
	}
}

/* Weights per block (1 for plain formats). */
int lp_dtype_block(enum lp_dtype t);
/* Bytes per block (element size for plain formats). */
size_t lp_dtype_block_bytes(enum lp_dtype t);
const char *lp_dtype_name(enum lp_dtype t);
/* Bytes of a row of n weights, or 0 if n is not a multiple of the block. */
size_t lp_dtype_row_bytes(enum lp_dtype t, int64_t n);

static inline float lp_f16_to_f32(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000) << 16;
	uint32_t exp = (h >> 10) & 0x1f;
	uint32_t mant = h & 0x3ff;
	uint32_t bits;
	float f;

	if (exp == 0) {
		if (mant == 0) {
			bits = sign;
		} else { /* subnormal: normalise */
			exp = 127 - 15 + 1;
			while (!(mant & 0x400)) {
				mant <<= 1;
				exp--;
			}
			mant &= 0x3ff;
			bits = sign | (exp << 23) | (mant << 13);
		}
	} else if (exp == 31) {
		bits = sign | 0x7f800000 | (mant << 13);
	} else {
		bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
	}
	memcpy(&f, &bits, sizeof(f));
	return f;
}

/* Round to nearest even. */
static inline uint16_t lp_f32_to_f16(float f)
{
	uint32_t x;
	memcpy(&x, &f, sizeof(x));
	uint32_t sign = (x >> 16) & 0x8000;
	int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
	uint32_t mant = x & 0x7fffff;

	if (((x >> 23) & 0xff) == 0xff) /* inf or nan */
		return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
	if (exp >= 31)
		return (uint16_t)(sign | 0x7c00);
	if (exp <= 0) {
		if (exp < -10)
			return (uint16_t)sign;
		mant |= 0x800000;
		uint32_t shift = (uint32_t)(14 - exp);
		uint32_t half = 1u << (shift - 1);
		uint32_t r = mant >> shift;
		uint32_t rem = mant & ((1u << shift) - 1);
		if (rem > half || (rem == half && (r & 1)))
			r++;
		return (uint16_t)(sign | r);
	}
	uint32_t r = (sign | ((uint32_t)exp << 10) | (mant >> 13));
	uint32_t rem = mant & 0x1fff;
	if (rem > 0x1000 || (rem == 0x1000 && (r & 1)))
		r++;
	return (uint16_t)r;
}

static inline float lp_bf16_to_f32(uint16_t h)
{
	uint32_t bits = (uint32_t)h << 16;
	float f;
	memcpy(&f, &bits, sizeof(f));
	return f;
}

static inline uint16_t lp_f32_to_bf16(float f)
{
	uint32_t x;
	memcpy(&x, &f, sizeof(x));
	if ((x & 0x7fffffff) > 0x7f800000) /* nan stays nan */
		return (uint16_t)((x >> 16) | 0x40);
	x += 0x7fff + ((x >> 16) & 1);
	return (uint16_t)(x >> 16);
}

/* Expands n weights (a multiple of the block size) of type t to f32. */
void lp_dequantize_row(enum lp_dtype t, const void *src, float *dst, int64_t n);

#ifdef __cplusplus
#undef _Static_assert
}
#endif

#endif
