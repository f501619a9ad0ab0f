/* Element and block formats of tensors, shared by every backend.
 *
 * Quantized formats store rows as a sequence of blocks of LP_DTYPE_BLOCK(t)
 * weights; a row of n weights takes n / block * block_bytes bytes, and n must
 * be a multiple of the block size. Layouts follow ggml's:
 *   Q8_0: f16 d, int8 q[32];            w = d * q
 *   Q4_0: f16 d, u8 qs[16];             w = d * (nibble - 8)
 *   Q4_1: f16 d, f16 m, u8 qs[16];      w = d * nibble + m
 * where byte j holds weight j in its low nibble and weight j + 16 in its high
 * nibble. */
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
	LP_DTYPE_I32,
	LP_DTYPE_COUNT
};

#define LP_QK 32 /* weights per block of the Q formats */

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

_Static_assert(sizeof(struct lp_block_q8_0) == 34, "q8_0 block size");
_Static_assert(sizeof(struct lp_block_q4_0) == 18, "q4_0 block size");
_Static_assert(sizeof(struct lp_block_q4_1) == 20, "q4_1 block size");

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
