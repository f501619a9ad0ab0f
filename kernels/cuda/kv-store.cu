/* kv_store on CUDA: row t of k and v (f32) goes to cache row slots[t] of
 * k_cache and v_cache, converted to the caches' type (f32, f16 or bf16,
 * round to nearest even). Slot -1 is a padding row and is skipped; any
 * other slot outside a cache skips that row and sets LP_CUDA_BAD_SLOT.
 * One block per row of k/v writes both caches.
 *
 *   k, v              f32 [n, kv_cols]
 *   k_cache, v_cache  [n_slots, kv_cols] of one type */
#include "kernels/cuda/elementwise.cuh"
#include "kernels/cuda/ops.cuh"

#include <errno.h>

template <typename T, int VEC>
static __device__ __forceinline__ void store_row(T *dst, const float *src, int64_t cols)
{
	if (VEC == 4) {
		for (int64_t c = (int64_t)threadIdx.x * 4; c < cols; c += (int64_t)blockDim.x * 4)
			lp_cuda_store4(dst, c, lp_cuda_load4(src, c));
	} else {
		for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
			lp_cuda_store(dst, c, src[c]);
	}
}

// lp: hot
template <typename T, int VEC>
__global__ void kv_store_kernel(T *__restrict__ k_cache, int64_t k_slots, int64_t k_cols,
                                T *__restrict__ v_cache, int64_t v_slots, int64_t v_cols,
                                const float *__restrict__ k, const float *__restrict__ v,
                                const int32_t *__restrict__ slots, unsigned *bad)
{
	const int64_t t = blockIdx.x;
	const int32_t slot = slots[t];

	if (slot == -1)
		return;
	if (slot < 0 || slot >= k_slots || slot >= v_slots) {
		if (threadIdx.x == 0)
			lp_cuda_flag(bad, LP_CUDA_BAD_SLOT);
		return;
	}
	store_row<T, VEC>(k_cache + (int64_t)slot * k_cols, k + t * k_cols, k_cols);
	store_row<T, VEC>(v_cache + (int64_t)slot * v_cols, v + t * v_cols, v_cols);
}

template <typename T>
static cudaError_t kv_store_launch(cudaStream_t stream, T *k_cache, int64_t k_slots, int64_t k_cols,
                                   T *v_cache, int64_t v_slots, int64_t v_cols, const float *k,
                                   const float *v, const int32_t *slots, int64_t n, unsigned *bad)
{
	bool vec = k_cols % 4 == 0 && v_cols % 4 == 0 && lp_cuda_aligned4(k_cache, sizeof(T)) &&
	           lp_cuda_aligned4(v_cache, sizeof(T)) && lp_cuda_aligned4(k, sizeof(float)) &&
	           lp_cuda_aligned4(v, sizeof(float));
	int64_t widest = k_cols > v_cols ? k_cols : v_cols;
	int threads = lp_cuda_row_threads(vec ? widest / 4 : widest);

	auto kernel = vec ? kv_store_kernel<T, 4> : kv_store_kernel<T, 1>;

	LP_LAUNCH((unsigned)n, threads, 0, stream, kernel)
	(k_cache, k_slots, k_cols, v_cache, v_slots, v_cols, k, v, slots, bad);
	return cudaGetLastError();
}

void lp_cuda_kv_store(void *ctx, struct lp_tensor *k_cache, struct lp_tensor *v_cache,
                      const struct lp_tensor *k, const struct lp_tensor *v, const int32_t *slots)
{
	struct lp_cuda *cu = (struct lp_cuda *)ctx;
	cudaError_t e;

	if (lp_cuda_failed(cu))
		return;
	LP_CUDA_REQUIRE(cu, k->type == LP_DTYPE_F32 && v->type == LP_DTYPE_F32, "kv_store");
	/* one cache type per backend (lp_backend_limits.kv_type) */
	LP_CUDA_REQUIRE(cu, k_cache->type == v_cache->type, "kv_store");
	LP_CUDA_REQUIRE(cu,
	                k_cache->type == LP_DTYPE_F32 || k_cache->type == LP_DTYPE_F16 ||
	                    k_cache->type == LP_DTYPE_BF16,
	                "kv_store");
	LP_CUDA_REQUIRE(cu, k->cols == k_cache->cols && v->cols == v_cache->cols, "kv_store");
	LP_CUDA_REQUIRE(cu, k->rows == v->rows && k->rows < (int64_t)1 << 31, "kv_store");
	if (k->rows == 0)
		return;
	switch (k_cache->type) {
	case LP_DTYPE_F16:
		e = kv_store_launch(cu->stream, (__half *)k_cache->data, k_cache->rows,
		                    k_cache->cols, (__half *)v_cache->data, v_cache->rows,
		                    v_cache->cols, (const float *)k->data, (const float *)v->data,
		                    slots, k->rows, cu->bad);
		break;
	case LP_DTYPE_BF16:
		e = kv_store_launch(cu->stream, (__nv_bfloat16 *)k_cache->data, k_cache->rows,
		                    k_cache->cols, (__nv_bfloat16 *)v_cache->data, v_cache->rows,
		                    v_cache->cols, (const float *)k->data, (const float *)v->data,
		                    slots, k->rows, cu->bad);
		break;
	default:
		e = kv_store_launch(cu->stream, (float *)k_cache->data, k_cache->rows,
		                    k_cache->cols, (float *)v_cache->data, v_cache->rows,
		                    v_cache->cols, (const float *)k->data, (const float *)v->data,
		                    slots, k->rows, cu->bad);
		break;
	}
	cu->launches++;
	LP_CUDA_CHECK(cu, e);
}
