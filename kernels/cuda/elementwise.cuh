/* Helpers shared by the row-wise kernels of elementwise.cu, rope.cu,
 * kv-store.cu and gemm.cu: four consecutive elements of f32, f16 or bf16
 * loaded as one 16- or 8-byte access and widened to f32, stored back with
 * round to nearest even, and the launch geometry those kernels use.
 *
 * A kernel takes the 4-wide route (VEC = 4) only when the launcher has
 * checked that every row it touches starts on a 4-element boundary of an
 * aligned address (lp_cuda_aligned4); else it runs the scalar route
 * (VEC = 1), so every size and every view is correct. */
#ifndef LP_KERNELS_CUDA_ELEMENTWISE_CUH
#define LP_KERNELS_CUDA_ELEMENTWISE_CUH

#include "kernels/cuda/cuda.cuh"

/* Threads per block of the element-wise kernels. */
#define LP_CUDA_EW_THREADS 256

static __device__ __forceinline__ float4 lp_cuda_load4(const float *p, size_t i)
{
	return *reinterpret_cast<const float4 *>(p + i);
}

static __device__ __forceinline__ float4 lp_cuda_load4(const __half *p, size_t i)
{
	uint2 u = *reinterpret_cast<const uint2 *>(p + i);

	return make_float4(__half2float(__ushort_as_half((unsigned short)(u.x & 0xffffu))),
	                   __half2float(__ushort_as_half((unsigned short)(u.x >> 16))),
	                   __half2float(__ushort_as_half((unsigned short)(u.y & 0xffffu))),
	                   __half2float(__ushort_as_half((unsigned short)(u.y >> 16))));
}

static __device__ __forceinline__ float4 lp_cuda_load4(const __nv_bfloat16 *p, size_t i)
{
	uint2 u = *reinterpret_cast<const uint2 *>(p + i);

	/* bf16 is the high half of an f32: widening is a shift */
	return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u),
	                   __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u));
}

static __device__ __forceinline__ void lp_cuda_store4(float *p, size_t i, float4 v)
{
	*reinterpret_cast<float4 *>(p + i) = v;
}

static __device__ __forceinline__ unsigned lp_cuda_pack2(__half, float a, float b)
{
	return (unsigned)__half_as_ushort(__float2half_rn(a)) |
	       ((unsigned)__half_as_ushort(__float2half_rn(b)) << 16);
}

static __device__ __forceinline__ unsigned lp_cuda_pack2(__nv_bfloat16, float a, float b)
{
	return (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(a)) |
	       ((unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(b)) << 16);
}

template <typename T>
static __device__ __forceinline__ void lp_cuda_store4(T *p, size_t i, float4 v)
{
	uint2 u;

	u.x = lp_cuda_pack2(T(), v.x, v.y);
	u.y = lp_cuda_pack2(T(), v.z, v.w);
	*reinterpret_cast<uint2 *>(p + i) = u;
}

/* Records an index read from device memory that is out of range (bad is
 * struct lp_cuda.bad; NULL in a context that has none). */
static __device__ __forceinline__ void lp_cuda_flag(unsigned *bad, unsigned bit)
{
	if (bad)
		atomicOr(bad, bit);
}

/* True when 4-element accesses at p + 4j are aligned for every j: p on a
 * 4-element boundary (16 bytes for f32, 8 for the halves). */
static inline bool lp_cuda_aligned4(const void *p, size_t elem_bytes)
{
	return (uintptr_t)p % (4 * elem_bytes) == 0;
}

/* Threads for a block that walks `work` items of one row: whole warps, at
 * most LP_CUDA_EW_THREADS. Depends on the row width only, never on the
 * row count, so a row's arithmetic is the same in any batch. */
static inline int lp_cuda_row_threads(int64_t work)
{
	int64_t warps = (work + 31) / 32;

	if (warps < 1)
		warps = 1;
	return warps * 32 < LP_CUDA_EW_THREADS ? (int)warps * 32 : LP_CUDA_EW_THREADS;
}

/* Blocks for a grid-stride loop over `work` items of `threads` each:
 * enough to fill the device a few times over, no more. */
static inline unsigned lp_cuda_stride_blocks(const struct lp_cuda *cu, int64_t work, int threads)
{
	int64_t want = (work + threads - 1) / threads;
	int64_t cap = (int64_t)(cu->sm_count > 0 ? cu->sm_count : 1) * 32;

	if (want < 1)
		want = 1;
	return (unsigned)(want < cap ? want : cap);
}

#endif
