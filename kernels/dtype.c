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
	case LP_DTYPE_I32:
		for (i = 0; i < n; i++)
			dst[i] = (float)((const int32_t *)src)[i];
		break;
	default:
		break;
	}
}
