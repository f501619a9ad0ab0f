/* The mask_logits op on CUDA: constrained decoding's token masks applied
 * to the rows of logits before the sample op. Semantics: kernels/backend.h
 * above struct lp_mask_args; the CPU op (kernels/cpu/backend-cpu.c) is the
 * reference.
 *
 * A grid over (row, 1024 columns): a block reads its row's mask row index
 * once and leaves at once when the row has none, so the op costs one pass
 * over the masked rows only. Each thread takes four columns 256 apart:
 * the 32 lanes of a warp cover one mask word (a broadcast load) and 32
 * consecutive logits (coalesced stores), and only forbidden tokens are
 * written. The geometry depends on the vocabulary and n alone, so the op
 * captures into a decode step's graph like the others. */
#include "kernels/cuda/elementwise.cuh"
#include "kernels/cuda/ops.cuh"

#include <errno.h>

#define MASK_THREADS  256
#define MASK_PER      4                         /* columns per thread */
#define MASK_COLS     (MASK_THREADS * MASK_PER) /* columns per block */
#define MASK_MAX_Y    65535                     /* blocks of a grid's y */
#define MASK_MAX_COLS ((int64_t)MASK_MAX_Y * MASK_COLS)

/* logits [n, vocab] (n = gridDim.x); mask [n_masks, words]. A mask row
 * outside the mask leaves the row alone and flags LP_CUDA_BAD_MASK. */
// lp: hot
__global__ void __launch_bounds__(MASK_THREADS)
    mask_kernel(float *__restrict__ logits, int64_t vocab, const uint32_t *__restrict__ mask,
                int64_t words, const int32_t *__restrict__ row_mask, int n_masks, unsigned *bad)
{
	const int64_t row = blockIdx.x;
	const int32_t m = row_mask[row];

	if (m == -1)
		return;
	if (m < 0 || m >= n_masks) {
		if (blockIdx.y == 0 && threadIdx.x == 0)
			lp_cuda_flag(bad, LP_CUDA_BAD_MASK);
		return;
	}
	const uint32_t *bits = mask + (int64_t)m * words;
	float *l = logits + row * vocab;
	const int64_t c0 = (int64_t)blockIdx.y * MASK_COLS + threadIdx.x;

#pragma unroll
	for (int k = 0; k < MASK_PER; k++) {
		const int64_t c = c0 + k * MASK_THREADS;

		if (c < vocab && !((bits[c >> 5] >> (c & 31)) & 1u))
			l[c] = -INFINITY;
	}
}

static cudaError_t mask_launch(cudaStream_t stream, float *logits, int64_t vocab, int n,
                               const uint32_t *mask, int64_t words, const int32_t *row_mask,
                               int n_masks, unsigned *bad)
{
	const dim3 grid((unsigned)n, (unsigned)((vocab + MASK_COLS - 1) / MASK_COLS));

	LP_LAUNCH(grid, MASK_THREADS, 0, stream, mask_kernel)
	(logits, vocab, mask, words, row_mask, n_masks, bad);
	return cudaGetLastError();
}

void lp_cuda_mask_logits(void *ctx, const struct lp_mask_args *args)
{
	struct lp_cuda *cu = (struct lp_cuda *)ctx;
	const struct lp_tensor *lg = args->logits;

	if (lp_cuda_failed(cu))
		return;
	LP_CUDA_REQUIRE(cu, lg && lg->type == LP_DTYPE_F32, "mask_logits");
	LP_CUDA_REQUIRE(cu, lg->cols >= 1 && lg->cols <= MASK_MAX_COLS, "mask_logits");
	LP_CUDA_REQUIRE(cu, args->n >= 0 && args->n <= lg->rows, "mask_logits");
	LP_CUDA_REQUIRE(cu, args->n_masks >= 0 && (int64_t)args->words * 32 >= lg->cols,
	                "mask_logits");
	if (args->n == 0)
		return;
	LP_CUDA_REQUIRE(cu, args->row_mask && (args->mask || args->n_masks == 0), "mask_logits");
	cu->launches++;
	LP_CUDA_CHECK(cu, mask_launch(cu->stream, (float *)lg->data, lg->cols, args->n, args->mask,
	                              args->words, args->row_mask, args->n_masks, cu->bad));
}
