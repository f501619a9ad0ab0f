/* The CUDA backend's context and the habits every file of kernels/cuda/
 * shares (not a public header; the public contract is kernels/backend.h).
 *
 * Each op lives in its own .cu file in three layers, as ggml's CUDA backend
 * does: the __global__ kernel; a launcher that takes a stream and plain
 * pointers and returns cudaGetLastError(); and the op entry, with the
 * signature of the backend.h op, which checks shapes, records a failure in
 * the context's sticky status (never asserts, never exits) and calls the
 * launcher. ops.cuh declares the entries.
 *
 * The same sources build two ways:
 *   nvcc                the real backend (libloraplane-cuda.so), every
 *                       kernel for every CUDA_ARCHS target
 *   g++ -DLP_CUDA_EMU   the emulated backend: kernels/cuda/emu/ runs every
 *                       kernel on the CPU (a fiber per GPU thread) and
 *                       provides the part of the CUDA runtime we use; GEMMs
 *                       take the reference route (gemm.cu)
 * so kernels launch with LP_LAUNCH, never with <<< >>>, and declare dynamic
 * shared memory with LP_DYN_SHARED. */
#ifndef LP_KERNELS_CUDA_CUDA_CUH
#define LP_KERNELS_CUDA_CUDA_CUH

#ifdef LP_CUDA_EMU
#include "kernels/cuda/emu/emu.h"
#else
#include <cuda_runtime.h>
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stddef.h>
#include <stdint.h>

#include "common/err.h"
#include "kernels/backend.h"

/* kernel<<<grid, block, smem, stream>>>(args...) is written
 * LP_LAUNCH(grid, block, smem, stream, kernel)(args...); the kernel comes
 * last so that template arguments with commas need no parentheses. */
#ifdef LP_CUDA_EMU
#define LP_LAUNCH(grid, block, smem, stream, ...)                                                  \
	lp_emu_launch((grid), (block), (smem), (stream), __VA_ARGS__)
#define LP_DYN_SHARED(type, name) type *name = (type *)lp_emu_dyn_shared()
#else
#define LP_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
#define LP_DYN_SHARED(type, name)                 extern __shared__ type name[]
#endif

/* Workspaces that reserve() sizes once (lp_cuda_*_workspace in ops.cuh). */
enum lp_cuda_ws {
	LP_CUDA_WS_MATMUL,    /* activations converted to half, GEMM workspace */
	LP_CUDA_WS_ATTENTION, /* split-K partial states */
	LP_CUDA_WS_SAMPLE,    /* per-row candidate scratch */
	LP_CUDA_WS_COUNT
};

struct lp_cuda {
	int device;
	char name[128]; /* device name */
	int cc_major, cc_minor;
	int sm_count;
	size_t total_bytes;
	cudaStream_t stream; /* every op, in order */
	cudaStream_t side;   /* LoRA slot uploads, overlapping compute */

	/* sticky status: the first failure (0 while none) */
	int status;
	char status_msg[LP_ERR_MSG_MAX];
	/* One device word that kernels OR LP_CUDA_BAD_* into when an index
	 * read from device memory is out of range (they skip that element);
	 * the backend reads it back at every synchronizing call (download,
	 * synchronize, status) and turns it into the sticky status. */
	unsigned *bad;

	struct lp_backend_limits lim; /* valid once reserved */
	bool reserved;
	void *ws[LP_CUDA_WS_COUNT]; /* device workspaces */
	size_t ws_bytes[LP_CUDA_WS_COUNT];

	void *matmul; /* gemm.cu's state (cuBLAS handles, chosen algorithms) */
	void *lora;   /* lora.cu's state (slot arenas, their tables) */
	void *graphs; /* backend-cuda.cu's captured decode steps */

	/* counters for make bench (launches and bytes uploaded per step) */
	uint64_t launches;
	uint64_t upload_bytes;
};

/* Bits of *lp_cuda.bad. */
#define LP_CUDA_BAD_ID        1u  /* get_rows: id outside the table */
#define LP_CUDA_BAD_POS       2u  /* rope: position outside the table */
#define LP_CUDA_BAD_SLOT      4u  /* kv_store: cache slot outside the cache */
#define LP_CUDA_BAD_BLOCK     8u  /* attention: block id outside the cache */
#define LP_CUDA_BAD_LORA_SLOT 16u /* lora: slot outside 0 .. max_loras - 1 */
#define LP_CUDA_BAD_SAMPLE    32u /* sample: bad row parameters */
#define LP_CUDA_BAD_MASK      64u /* mask_logits: mask row outside the mask */

/* Records the first failure (later ones are dropped) and returns code. */
int lp_cuda_fail(struct lp_cuda *cu, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Records a CUDA error of stmt at file:line; true when e was an error. */
bool lp_cuda_check(struct lp_cuda *cu, cudaError_t e, const char *stmt, const char *file, int line);
/* True once a failure was recorded: op entries return at once then. */
static inline bool lp_cuda_failed(const struct lp_cuda *cu)
{
	return cu->status != 0;
}

/* LP_CUDA_CHECK(cu, cudaMemcpyAsync(...)): false (and the failure recorded,
 * naming the statement, file and line) when the call failed. */
#define LP_CUDA_CHECK(cu, stmt) (!lp_cuda_check((cu), (stmt), #stmt, __FILE__, __LINE__))

/* Shape checks of op entries: records "<op>: <what>" and returns from the
 * (void) op entry when cond is false. */
#define LP_CUDA_REQUIRE(cu, cond, op)                                                              \
	do {                                                                                       \
		if (!(cond)) {                                                                     \
			lp_cuda_fail((cu), -EINVAL, "%s: %s does not hold (%s:%d)", (op), #cond,   \
			             __FILE__, __LINE__);                                          \
			return;                                                                    \
		}                                                                                  \
	} while (0)

/* Opens device `device` (streams, properties); -ENODEV with the runtime's
 * reason when there is no driver or no such device. */
int lp_cuda_init(struct lp_cuda *cu, int device, struct lp_err *err);
void lp_cuda_release(struct lp_cuda *cu);

/* Element conversions used across files. */
static __device__ __forceinline__ float lp_cuda_load(const float *p, size_t i)
{
	return p[i];
}
static __device__ __forceinline__ float lp_cuda_load(const __half *p, size_t i)
{
	return __half2float(p[i]);
}
static __device__ __forceinline__ float lp_cuda_load(const __nv_bfloat16 *p, size_t i)
{
	return __bfloat162float(p[i]);
}
static __device__ __forceinline__ void lp_cuda_store(float *p, size_t i, float v)
{
	p[i] = v;
}
static __device__ __forceinline__ void lp_cuda_store(__half *p, size_t i, float v)
{
	p[i] = __float2half_rn(v);
}
static __device__ __forceinline__ void lp_cuda_store(__nv_bfloat16 *p, size_t i, float v)
{
	p[i] = __float2bfloat16_rn(v);
}

#endif
