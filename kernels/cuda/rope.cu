/* Rotary position embedding on CUDA, in place, "rotate half" layout, from
 * one precomputed table (kernels/backend.h, rope):
 *
 *   x        f32 [n, >= n_heads * head_dim]
 *   pos      i32 [n]
 *   cos_sin  f32 [n_pos, head_dim]: cos of the head_dim/2 angles of a
 *            position, then their sin
 *
 * Element i < head_dim/2 of each head pairs with i + head_dim/2. One block
 * per row; a thread rotates VEC neighbouring pairs of one head (VEC = 2:
 * float2 accesses when the row, the half-width and the table allow). A
 * position outside the table leaves the row as it is and sets
 * LP_CUDA_BAD_POS. */
#include "kernels/cuda/elementwise.cuh"
#include "kernels/cuda/ops.cuh"

#include <errno.h>

// lp: hot
template <int VEC>
__global__ void rope_kernel(float *__restrict__ x, int64_t cols, int n_heads, int half,
                            const int32_t *__restrict__ pos, const float *__restrict__ cos_sin,
                            int64_t n_pos, unsigned *bad)
{
	const int64_t r = blockIdx.x;
	const int32_t p = pos[r];
	const int steps = half / VEC; /* per head */

	if (p < 0 || p >= n_pos) {
		if (threadIdx.x == 0)
			lp_cuda_flag(bad, LP_CUDA_BAD_POS);
		return;
	}
	const float *cs = cos_sin + (int64_t)p * 2 * half;
	float *row = x + r * cols;

	for (int j = threadIdx.x; j < n_heads * steps; j += blockDim.x) {
		const int h = j / steps, i = j % steps * VEC;
		float *v = row + (int64_t)h * 2 * half;

		if (VEC == 2) {
			float2 c = *reinterpret_cast<const float2 *>(cs + i);
			float2 s = *reinterpret_cast<const float2 *>(cs + half + i);
			float2 a = *reinterpret_cast<const float2 *>(v + i);
			float2 b = *reinterpret_cast<const float2 *>(v + half + i);

			*reinterpret_cast<float2 *>(v + i) =
			    make_float2(a.x * c.x - b.x * s.x, a.y * c.y - b.y * s.y);
			*reinterpret_cast<float2 *>(v + half + i) =
			    make_float2(b.x * c.x + a.x * s.x, b.y * c.y + a.y * s.y);
		} else {
			float c = cs[i], s = cs[half + i], a = v[i], b = v[half + i];

			v[i] = a * c - b * s;
			v[half + i] = b * c + a * s;
		}
	}
}

static cudaError_t rope_launch(cudaStream_t stream, float *x, int64_t rows, int64_t cols,
                               int n_heads, int head_dim, const int32_t *pos, const float *cos_sin,
                               int64_t n_pos, unsigned *bad)
{
	int half = head_dim / 2;
	/* float2 at x + r*cols + h*head_dim + i and + half: every offset even */
	bool vec =
	    half % 2 == 0 && cols % 2 == 0 && (uintptr_t)x % 8 == 0 && (uintptr_t)cos_sin % 8 == 0;
	int threads = lp_cuda_row_threads((int64_t)n_heads * (vec ? half / 2 : half));

	auto kernel = vec ? rope_kernel<2> : rope_kernel<1>;

	LP_LAUNCH((unsigned)rows, threads, 0, stream, kernel)
	(x, cols, n_heads, half, pos, cos_sin, n_pos, bad);
	return cudaGetLastError();
}

void lp_cuda_rope(void *ctx, struct lp_tensor *x, int n_heads, int head_dim, const int32_t *pos,
                  const struct lp_tensor *cos_sin)
{
	struct lp_cuda *cu = (struct lp_cuda *)ctx;

	if (lp_cuda_failed(cu))
		return;
	LP_CUDA_REQUIRE(cu, x->type == LP_DTYPE_F32 && cos_sin->type == LP_DTYPE_F32, "rope");
	LP_CUDA_REQUIRE(cu, head_dim > 0 && head_dim % 2 == 0 && n_heads >= 0, "rope");
	LP_CUDA_REQUIRE(cu, (int64_t)n_heads * head_dim <= x->cols, "rope");
	LP_CUDA_REQUIRE(cu, cos_sin->cols == head_dim, "rope");
	LP_CUDA_REQUIRE(cu, x->rows < (int64_t)1 << 31, "rope");
	if (x->rows == 0 || n_heads == 0)
		return;
	cudaError_t e =
	    rope_launch(cu->stream, (float *)x->data, x->rows, x->cols, n_heads, head_dim, pos,
	                (const float *)cos_sin->data, cos_sin->rows, cu->bad);
	cu->launches++;
	LP_CUDA_CHECK(cu, e);
}
