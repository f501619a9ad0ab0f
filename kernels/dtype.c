/* Element and block formats; see dtype.h. */
#include "kernels/dtype.h"

static const struct {
	const char *name;
	int block;
	size_t bytes;
} dtype_info[LP_DTYPE_COUNT] = {
    [LP_DTYPE_F32] = {"f32", 1, 4},
    [LP_DTYPE_F16] = {"f16", 1, 2},
    [LP_DTYPE_BF16] = {"bf16", 1, 2},
    [LP_DTYPE_Q8_0] = {"q8_0", LP_QK, sizeof(struct lp_block_q8_0)},
    [LP_DTYPE_Q4_0] = {"q4_0", LP_QK, sizeof(struct lp_block_q4_0)},
    [LP_DTYPE_Q4_1] = {"q4_1", LP_QK, sizeof(struct lp_block_q4_1)},
    [LP_DTYPE_Q5_0] = {"q5_0", LP_QK, sizeof(struct lp_block_q5_0)},
    [LP_DTYPE_Q5_1] = {"q5_1", LP_QK, sizeof(struct lp_block_q5_1)},
    [LP_DTYPE_Q4_K] = {"q4_k", LP_QK_K, sizeof(struct lp_block_q4_k)},
    [LP_DTYPE_Q5_K] = {"q5_k", LP_QK_K, sizeof(struct lp_block_q5_k)},
    [LP_DTYPE_Q6_K] = {"q6_k", LP_QK_K, sizeof(struct lp_block_q6_k)},
    [LP_DTYPE_I32] = {"i32", 1, 4},
};

int lp_dtype_block(enum lp_dtype t)
{
	return dtype_info[t].block;
}

size_t lp_dtype_block_bytes(enum lp_dtype t)
{
	return dtype_info[t].bytes;
}

const char *lp_dtype_name(enum lp_dtype t)
{
	return (unsigned)t < LP_DTYPE_COUNT ? dtype_info[t].name : "invalid";
}

size_t lp_dtype_row_bytes(enum lp_dtype t, int64_t n)
{
	int64_t blk = dtype_info[t].block;

	if (n < 0 || n % blk)
		return 0;
	return (size_t)(n / blk) * dtype_info[t].bytes;
}

/* Q5_0 (m NULL) or Q5_1: 32 weights from d, m, qh and qs. */
static void dequant_q5(float d, const float *m, const uint8_t *qh4, const uint8_t *qs, float *dst)
{
	uint32_t qh = (uint32_t)qh4[0] | (uint32_t)qh4[1] << 8 | (uint32_t)qh4[2] << 16 |
	              (uint32_t)qh4[3] << 24;

	for (int j = 0; j < LP_QK / 2; j++) {
		int lo = (qs[j] & 0x0f) | ((qh >> j) & 1) << 4;
		int hi = (qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4;
		if (m) {
			dst[j] = d * (float)lo + *m;
			dst[j + 16] = d * (float)hi + *m;
		} else {
			dst[j] = d * (float)(lo - 16);
			dst[j + 16] = d * (float)(hi - 16);
		}
	}
}

/* Q4_K (qh NULL) or Q5_K: the 256 weights of one block. */
static void dequant_q45_k(uint16_t dh, uint16_t dminh, const uint8_t *scales, const uint8_t *qh,
                          const uint8_t *qs, float *dst)
{
	float d = lp_f16_to_f32(dh), dmin = lp_f16_to_f32(dminh);

	for (int s = 0; s < 8; s++) {
		const uint8_t *q = qs + 32 * (s / 2);
		int shift = 4 * (s % 2);
		uint8_t sc, mn;

		lp_q4_k_scale_min(scales, s, &sc, &mn);
		float ds = d * (float)sc, ms = dmin * (float)mn;
		for (int l = 0; l < 32; l++) {
			int v = (q[l] >> shift) & 0x0f;
			if (qh)
				v |= ((qh[l] >> s) & 1) << 4;
			dst[32 * s + l] = ds * (float)v - ms;
		}
	}
}

static void dequant_q6_k(const struct lp_block_q6_k *b, float *dst)
{
	float d = lp_f16_to_f32(b->d);

	for (int e = 0; e < LP_QK_K; e++) {
		int h = e / 128, t = (e % 128) / 32, l = e % 32;
		int lo = (b->ql[64 * h + 32 * (t % 2) + l] >> (4 * (t / 2))) & 0x0f;
		int hi = (b->qh[32 * h + l] >> (2 * t)) & 3;
		float ds = d * (float)b->scales[e / 16];
		dst[e] = ds * (float)((lo | hi << 4) - 32);
	}
}

void lp_dequantize_row(enum lp_dtype t, const void *src, float *dst, int64_t n)
{
	int64_t i, b, j;

	switch (t) {
	case LP_DTYPE_F32:
		memcpy(dst, src, (size_t)n * sizeof(float));
		break;
	case LP_DTYPE_F16:
		for (i = 0; i < n; i++)
			dst[i] = lp_f16_to_f32(((const uint16_t *)src)[i]);
		break;
	case LP_DTYPE_BF16:
		for (i = 0; i < n; i++)
			dst[i] = lp_bf16_to_f32(((const uint16_t *)src)[i]);
		break;
	case LP_DTYPE_Q8_0:
		for (b = 0; b < n / LP_QK; b++) {
			const struct lp_block_q8_0 *blk = (const struct lp_block_q8_0 *)src + b;
			float d = lp_f16_to_f32(blk->d);
			for (j = 0; j < LP_QK; j++)
				dst[b * LP_QK + j] = d * (float)blk->qs[j];
		}
		break;
	case LP_DTYPE_Q4_0:
		for (b = 0; b < n / LP_QK; b++) {
			const struct lp_block_q4_0 *blk = (const struct lp_block_q4_0 *)src + b;
			float d = lp_f16_to_f32(blk->d);
			for (j = 0; j < LP_QK / 2; j++) {
				dst[b * LP_QK + j] = d * (float)((blk->qs[j] & 0x0f) - 8);
				dst[b * LP_QK + j + 16] = d * (float)((blk->qs[j] >> 4) - 8);
			}
		}
		break;
	case LP_DTYPE_Q4_1:
		for (b = 0; b < n / LP_QK; b++) {
			const struct lp_block_q4_1 *blk = (const struct lp_block_q4_1 *)src + b;
			float d = lp_f16_to_f32(blk->d), m = lp_f16_to_f32(blk->m);
			for (j = 0; j < LP_QK / 2; j++) {
				dst[b * LP_QK + j] = d * (float)(blk->qs[j] & 0x0f) + m;
				dst[b * LP_QK + j + 16] = d * (float)(blk->qs[j] >> 4) + m;
			}
		}
		break;
	case LP_DTYPE_Q5_0:
		for (b = 0; b < n / LP_QK; b++) {
			const struct lp_block_q5_0 *blk = (const struct lp_block_q5_0 *)src + b;
			dequant_q5(lp_f16_to_f32(blk->d), NULL, blk->qh, blk->qs, dst + b * LP_QK);
		}
		break;
	case LP_DTYPE_Q5_1:
		for (b = 0; b < n / LP_QK; b++) {
			const struct lp_block_q5_1 *blk = (const struct lp_block_q5_1 *)src + b;
			float m = lp_f16_to_f32(blk->m);
			dequant_q5(lp_f16_to_f32(blk->d), &m, blk->qh, blk->qs, dst + b * LP_QK);
		}
		break;
	case LP_DTYPE_Q4_K:
		for (b = 0; b < n / LP_QK_K; b++) {
			const struct lp_block_q4_k *blk = (const struct lp_block_q4_k *)src + b;
			dequant_q45_k(blk->d, blk->dmin, blk->scales, NULL, blk->qs,
			              dst + b * LP_QK_K);
		}
		break;
	case LP_DTYPE_Q5_K:
		for (b = 0; b < n / LP_QK_K; b++) {
			const struct lp_block_q5_k *blk = (const struct lp_block_q5_k *)src + b;
			dequant_q45_k(blk->d, blk->dmin, blk->scales, blk->qh, blk->qs,
			              dst + b * LP_QK_K);
		}
		break;
	case LP_DTYPE_Q6_K:
		for (b = 0; b < n / LP_QK_K; b++)
			dequant_q6_k((const struct lp_block_q6_k *)src + b, dst + b * LP_QK_K);
		break;
	case LP_DTYPE_I32:
		for (i = 0; i < n; i++)
			dst[i] = (float)((const int32_t *)src)[i];
		break;
	default:
		break;
	}
}
