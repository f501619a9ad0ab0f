/* The CUDA emulation layer: runs the unmodified kernels of kernels/cuda/ on
 * the CPU, compiled by g++ with -DLP_CUDA_EMU, and provides the subset of
 * the CUDA runtime API that the backend uses. cuda.cuh includes this header
 * instead of <cuda_runtime.h>; docs/cuda-emulation.md explains the design.
 *
 * How a launch runs: LP_LAUNCH(grid, block, smem, stream, kernel)(args...)
 * copies the arguments (by value, as CUDA does) and runs the grid at once on
 * the calling OS thread, one block after another; every GPU thread of a
 * block is a fiber (own stack, hand-written context switch) that runs until
 * it waits at __syncthreads, in a warp collective, or ends. Streams execute
 * their work synchronously at enqueue time, in order, unless the stream
 * captures a graph, in which case the work is recorded for cudaGraphLaunch.
 *
 * What it checks: launch configurations as the runtime does; barriers that
 * cannot complete (a thread exited while others wait, threads waiting at
 * __syncthreads while others wait in a warp collective); warp collectives
 * whose mask names an exited lane, or lanes that name each other with
 * different masks or in different collectives (a deadlock: lanes meet when
 * they name the same mask in the same collective, so disjoint and nested
 * groups work as on a GPU); kernel pointer arguments that are neither NULL
 * nor inside a cudaMalloc / cudaMallocHost allocation (LP_EMU_NO_PTR_CHECK=1
 * turns that off). Such a launch fails with cudaErrorLaunchFailure (or
 * cudaErrorIllegalAddress for pointers), reported by cudaGetLastError and
 * the next synchronising call, with a line on stderr naming the kernel; the
 * next launch works again (unlike a real GPU, the error is not sticky).
 *
 * Built-ins: threadIdx, blockIdx, blockDim, gridDim and warpSize as in CUDA;
 * __CUDA_ARCH__ stays undefined, so kernels take their portable path. */
#ifndef LP_KERNELS_CUDA_EMU_EMU_H
#define LP_KERNELS_CUDA_EMU_EMU_H

#ifndef __cplusplus
#error "kernels/cuda/emu/emu.h is C++ (the kernels build with g++ -x c++)"
#endif
#if !defined(__x86_64__)
#error "the CUDA emulation's fibers are written for x86-64"
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

/* CUDA's own headers: host_defines.h (via vector_types.h) defines __host__,
 * __device__, __global__, __shared__ ... as nothing under g++ unless they are
 * already defined; we let it, then redefine the ones that need a meaning. */
#include <vector_types.h>
#include <vector_functions.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#undef __shared__
/* Blocks run one at a time per OS thread and all fibers of a block share
 * that OS thread, so a thread-local static is exactly per-block storage. */
#define __shared__ static thread_local
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __grid_constant__
#define __grid_constant__
#endif

/* ------------------------------------------------------------------------
 * Runtime API. cuda_fp16.h brings CUDA's own cuda_runtime_api.h (through
 * vector_functions.h), so the emulation implements those very declarations
 * (names, types, error codes, default arguments) in runtime.cc: code that
 * compiles here compiles with nvcc. Only a subset is implemented; calling
 * one that is not fails to link. What the emulation does differently:
 *
 *   cudaGetDeviceCount   1 device; LP_EMU_NO_DEVICE=1 makes it (and
 *                        cudaSetDevice, cudaMalloc, ...) fail with
 *                        cudaErrorNoDevice
 *   cudaGetDeviceProperties  "loraplane CUDA emulation", sm_90, 8 SMs,
 *                        totalGlobalMem = LP_EMU_MEMORY (bytes, K/M/G
 *                        suffix) or 8 GiB
 *   cudaMalloc           host memory, 256-byte aligned, filled with 0xff
 *                        bytes (NaNs for kernels that read what nobody
 *                        wrote; above 64 MiB: lazily mapped zero pages),
 *                        counted against totalGlobalMem
 *   cudaMallocHost       host memory that kernels may be given pointers to
 *   copies and memsets   the device side must lie inside an allocation
 *                        (else cudaErrorInvalidValue)
 *   streams, events      work runs at enqueue, in order; events complete
 *                        when recorded
 *   capture, graphs      a capturing stream records launches, copies,
 *                        memsets and host functions (arguments by value;
 *                        a copy reads its source when replayed);
 *                        cudaGraphLaunch replays them; calls that CUDA
 *                        forbids during capture fail as in CUDA
 *   cudaGraphGetNodes    counts only (nodes must be NULL)
 * ------------------------------------------------------------------------ */

template <class T>
static inline cudaError_t cudaFuncSetAttribute(T *entry, enum cudaFuncAttribute attr, int value)
{
	return cudaFuncSetAttribute((const void *)entry, attr, value);
}
template <class T>
static inline cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes *attr, T *entry)
{
	return cudaFuncGetAttributes(attr, (const void *)entry);
}
template <class T>
static inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int *numBlocks, T *func,
                                                                        int blockSize,
                                                                        size_t dynamicSMemSize)
{
	return cudaOccupancyMaxActiveBlocksPerMultiprocessor(numBlocks, (const void *)func,
	                                                     blockSize, dynamicSMemSize);
}
/* __constant__ and __device__ variables are plain globals here. */
template <class T>
static inline cudaError_t cudaMemcpyToSymbol(const T &symbol, const void *src, size_t count,
                                             size_t offset = 0,
                                             enum cudaMemcpyKind kind = cudaMemcpyHostToDevice)
{
	if (offset + count > sizeof(T) ||
	    (kind != cudaMemcpyHostToDevice && kind != cudaMemcpyDeviceToDevice &&
	     kind != cudaMemcpyDefault))
		return cudaErrorInvalidValue;
	memcpy((char *)&symbol + offset, src, count);
	return cudaSuccess;
}

/* Counters for benchmarks, since start or the last reset (all threads). */
struct lp_emu_counters {
	uint64_t launches;       /* kernel launches that ran (graph nodes included) */
	uint64_t blocks;         /* blocks run */
	uint64_t threads;        /* GPU threads run */
	uint64_t switches;       /* fiber context switches */
	uint64_t graph_launches; /* cudaGraphLaunch calls */
	uint64_t h2d_bytes;      /* bytes copied host -> device */
	uint64_t d2h_bytes;      /* bytes copied device -> host */
	uint64_t d2d_bytes;      /* bytes copied device -> device */
	uint64_t memset_bytes;   /* bytes set by cudaMemset* */
};
struct lp_emu_counters lp_emu_stats(void);
void lp_emu_stats_reset(void);

/* ------------------------------------------------------------------------
 * Built-in variables. The current GPU thread's are read through per-OS-
 * thread pointers that the scheduler sets on every fiber switch.
 * ------------------------------------------------------------------------ */

extern __thread const uint3 *lp_emu_thread_idx;
extern __thread uint3 lp_emu_block_idx;
extern __thread uint3 lp_emu_block_dim;
extern __thread uint3 lp_emu_grid_dim;

#define threadIdx (*lp_emu_thread_idx)
#define blockIdx  ((const uint3 &)lp_emu_block_idx)
#define blockDim  ((const uint3 &)lp_emu_block_dim) /* dim3 converts from it */
#define gridDim   ((const uint3 &)lp_emu_grid_dim)
static constexpr int warpSize = 32;

/* The dynamic shared memory of the running block (LP_DYN_SHARED): the size
 * the launch asked for, 16-byte aligned; filled with 0xff bytes at the start
 * of every block; under AddressSanitizer the bytes past the size are
 * poisoned. */
void *lp_emu_dyn_shared(void);

/* ------------------------------------------------------------------------
 * Synchronisation and warp collectives (exec.cc). A thread that waits here
 * lets the others of its block run; a wait that cannot complete fails the
 * launch.
 * ------------------------------------------------------------------------ */

enum lp_emu_bar_op { LP_EMU_BAR_SYNC, LP_EMU_BAR_COUNT, LP_EMU_BAR_AND, LP_EMU_BAR_OR };
int lp_emu_barrier(enum lp_emu_bar_op op, int pred);

enum lp_emu_warp_op {
	LP_EMU_WARP_SYNC,
	LP_EMU_WARP_SHFL_IDX,
	LP_EMU_WARP_SHFL_UP,
	LP_EMU_WARP_SHFL_DOWN,
	LP_EMU_WARP_SHFL_XOR,
	LP_EMU_WARP_BALLOT,
	LP_EMU_WARP_ANY,
	LP_EMU_WARP_ALL,
	LP_EMU_WARP_REDUCE_ADD,
	LP_EMU_WARP_REDUCE_MIN_U,
	LP_EMU_WARP_REDUCE_MAX_U,
	LP_EMU_WARP_REDUCE_MIN_S,
	LP_EMU_WARP_REDUCE_MAX_S,
	LP_EMU_WARP_REDUCE_AND,
	LP_EMU_WARP_REDUCE_OR,
	LP_EMU_WARP_REDUCE_XOR,
	LP_EMU_WARP_MATCH_ANY,
	LP_EMU_WARP_MATCH_ALL,
	LP_EMU_WARP_OP_COUNT
};
/* The lane's result of collective `op` over the lanes of `mask` (each lane
 * gives `value`; `param` is the source lane / delta / lane mask of a shuffle
 * and `width` its segment width). A shuffle from a lane outside the mask or
 * past a partial warp's end yields all-ones bytes (NaN for floats). */
uint64_t lp_emu_warp(enum lp_emu_warp_op op, unsigned mask, uint64_t value, int param, int width);
/* The lanes of the caller's warp that have not exited. */
unsigned lp_emu_active_mask(void);
/* Ends the launch with cudaErrorLaunchFailure and `why` on stderr. */
[[noreturn]] void lp_emu_trap(const char *why);

static inline void __syncthreads(void)
{
	lp_emu_barrier(LP_EMU_BAR_SYNC, 0);
}
static inline int __syncthreads_count(int pred)
{
	return lp_emu_barrier(LP_EMU_BAR_COUNT, pred);
}
static inline int __syncthreads_and(int pred)
{
	return lp_emu_barrier(LP_EMU_BAR_AND, pred);
}
static inline int __syncthreads_or(int pred)
{
	return lp_emu_barrier(LP_EMU_BAR_OR, pred);
}
static inline void __syncwarp(unsigned mask = 0xffffffffu)
{
	lp_emu_warp(LP_EMU_WARP_SYNC, mask, 0, 0, 32);
}
static inline void __threadfence(void)
{
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
}
static inline void __threadfence_block(void)
{
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
}
static inline void __threadfence_system(void)
{
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
}
static inline unsigned __activemask(void)
{
	return lp_emu_active_mask();
}
[[noreturn]] static inline void __trap(void)
{
	lp_emu_trap("__trap() called");
}
static inline void __nanosleep(unsigned ns)
{
	(void)ns;
}
static inline long long clock64(void)
{
	return (long long)__builtin_ia32_rdtsc();
}

/* The types a warp collective moves: CUDA's overloads (at most 8 bytes). */
template <class T>
struct lp_emu_warp_type
    : std::integral_constant<bool, std::is_arithmetic<T>::value || std::is_same<T, __half>::value ||
                                       std::is_same<T, __half2>::value ||
                                       std::is_same<T, __nv_bfloat16>::value ||
                                       std::is_same<T, __nv_bfloat162>::value> {
};

template <class T> static inline uint64_t lp_emu_to_bits(const T &v)
{
	static_assert(lp_emu_warp_type<T>::value && sizeof(T) <= 8,
	              "warp shuffles move 1- to 8-byte arithmetic or half types");
	uint64_t u = 0;
	memcpy(&u, (const void *)&v, sizeof(T));
	return u;
}
template <class T> static inline T lp_emu_from_bits(uint64_t u)
{
	T v;
	memcpy((void *)&v, &u, sizeof(T));
	return v;
}

template <class T>
static inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize)
{
	return lp_emu_from_bits<T>(
	    lp_emu_warp(LP_EMU_WARP_SHFL_IDX, mask, lp_emu_to_bits(var), srcLane, width));
}
template <class T>
static inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize)
{
	return lp_emu_from_bits<T>(
	    lp_emu_warp(LP_EMU_WARP_SHFL_UP, mask, lp_emu_to_bits(var), (int)delta, width));
}
template <class T>
static inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize)
{
	return lp_emu_from_bits<T>(
	    lp_emu_warp(LP_EMU_WARP_SHFL_DOWN, mask, lp_emu_to_bits(var), (int)delta, width));
}
template <class T>
static inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize)
{
	return lp_emu_from_bits<T>(
	    lp_emu_warp(LP_EMU_WARP_SHFL_XOR, mask, lp_emu_to_bits(var), laneMask, width));
}
static inline unsigned __ballot_sync(unsigned mask, int pred)
{
	return (unsigned)lp_emu_warp(LP_EMU_WARP_BALLOT, mask, pred != 0, 0, 32);
}
static inline int __any_sync(unsigned mask, int pred)
{
	return (int)lp_emu_warp(LP_EMU_WARP_ANY, mask, pred != 0, 0, 32);
}
static inline int __all_sync(unsigned mask, int pred)
{
	return (int)lp_emu_warp(LP_EMU_WARP_ALL, mask, pred != 0, 0, 32);
}
static inline unsigned __reduce_add_sync(unsigned mask, unsigned value)
{
	return (unsigned)lp_emu_warp(LP_EMU_WARP_REDUCE_ADD, mask, value, 0, 32);
}
static inline int __reduce_add_sync(unsigned mask, int value)
{
	return (int)(unsigned)lp_emu_warp(LP_EMU_WARP_REDUCE_ADD, mask, (unsigned)value, 0, 32);
}
static inline unsigned __reduce_min_sync(unsigned mask, unsigned value)
{
	return (unsigned)lp_emu_warp(LP_EMU_WARP_REDUCE_MIN_U, mask, value, 0, 32);
}
static inline int __reduce_min_sync(unsigned mask, int value)
{
	return (int)(unsigned)lp_emu_warp(LP_EMU_WARP_REDUCE_MIN_S, mask, (unsigned)value, 0, 32);
}
static inline unsigned __reduce_max_sync(unsigned mask, unsigned value)
{
	return (unsigned)lp_emu_warp(LP_EMU_WARP_REDUCE_MAX_U, mask, value, 0, 32);
}
static inline int __reduce_max_sync(unsigned mask, int value)
{
	return (int)(unsigned)lp_emu_warp(LP_EMU_WARP_REDUCE_MAX_S, mask, (unsigned)value, 0, 32);
}
static inline unsigned __reduce_and_sync(unsigned mask, unsigned value)
{
	return (unsigned)lp_emu_warp(LP_EMU_WARP_REDUCE_AND, mask, value, 0, 32);
}
static inline unsigned __reduce_or_sync(unsigned mask, unsigned value)
{
	return (unsigned)lp_emu_warp(LP_EMU_WARP_REDUCE_OR, mask, value, 0, 32);
}
static inline unsigned __reduce_xor_sync(unsigned mask, unsigned value)
{
	return (unsigned)lp_emu_warp(LP_EMU_WARP_REDUCE_XOR, mask, value, 0, 32);
}
template <class T> static inline unsigned __match_any_sync(unsigned mask, T value)
{
	static_assert(std::is_integral<T>::value || std::is_floating_point<T>::value,
	              "__match_any_sync takes 4- or 8-byte scalars");
	return (unsigned)lp_emu_warp(LP_EMU_WARP_MATCH_ANY, mask, lp_emu_to_bits(value), 0, 32);
}
template <class T> static inline unsigned __match_all_sync(unsigned mask, T value, int *pred)
{
	static_assert(std::is_integral<T>::value || std::is_floating_point<T>::value,
	              "__match_all_sync takes 4- or 8-byte scalars");
	unsigned r =
	    (unsigned)lp_emu_warp(LP_EMU_WARP_MATCH_ALL, mask, lp_emu_to_bits(value), 0, 32);
	*pred = r != 0;
	return r;
}

/* ------------------------------------------------------------------------
 * Atomics: real atomic read-modify-writes (a block runs on one OS thread,
 * but host threads may launch concurrently on different streams).
 * ------------------------------------------------------------------------ */

/* The integer overloads CUDA has, and no others (so that what compiles
 * here compiles with nvcc): every operation for int and unsigned; all but
 * atomicSub for unsigned long long; atomicMin/Max for long long. */
#define LP_EMU_ATOMIC_MINMAX(T)                                                                    \
	static inline T atomicMax(T *p, T v)                                                       \
	{                                                                                          \
		T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                      \
		while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, \
		                                               __ATOMIC_RELAXED)) {                \
		}                                                                                  \
		return old;                                                                        \
	}                                                                                          \
	static inline T atomicMin(T *p, T v)                                                       \
	{                                                                                          \
		T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                      \
		while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, \
		                                               __ATOMIC_RELAXED)) {                \
		}                                                                                  \
		return old;                                                                        \
	}
#define LP_EMU_ATOMIC_RMW(T)                                                                       \
	static inline T atomicAdd(T *p, T v)                                                       \
	{                                                                                          \
		return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);                                 \
	}                                                                                          \
	static inline T atomicExch(T *p, T v)                                                      \
	{                                                                                          \
		return __atomic_exchange_n(p, v, __ATOMIC_RELAXED);                                \
	}                                                                                          \
	static inline T atomicCAS(T *p, T compare, T v)                                            \
	{                                                                                          \
		__atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_RELAXED,               \
		                            __ATOMIC_RELAXED);                                     \
		return compare;                                                                    \
	}                                                                                          \
	static inline T atomicAnd(T *p, T v)                                                       \
	{                                                                                          \
		return __atomic_fetch_and(p, v, __ATOMIC_RELAXED);                                 \
	}                                                                                          \
	static inline T atomicOr(T *p, T v)                                                        \
	{                                                                                          \
		return __atomic_fetch_or(p, v, __ATOMIC_RELAXED);                                  \
	}                                                                                          \
	static inline T atomicXor(T *p, T v)                                                       \
	{                                                                                          \
		return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED);                                 \
	}                                                                                          \
	LP_EMU_ATOMIC_MINMAX(T)
LP_EMU_ATOMIC_RMW(int)
LP_EMU_ATOMIC_RMW(unsigned int)
LP_EMU_ATOMIC_RMW(unsigned long long)
LP_EMU_ATOMIC_MINMAX(long long)
static inline int atomicSub(int *p, int v)
{
	return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED);
}
static inline unsigned int atomicSub(unsigned int *p, unsigned int v)
{
	return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED);
}
#undef LP_EMU_ATOMIC_RMW
#undef LP_EMU_ATOMIC_MINMAX

/* Floating-point and half atomics: a compare-and-swap loop on the bits. */
template <class T, class U> static inline T lp_emu_atomic_update(T *p, T v, T (*f)(T, T))
{
	static_assert(sizeof(T) == sizeof(U), "same size");
	U *q = reinterpret_cast<U *>(p);
	U old = __atomic_load_n(q, __ATOMIC_RELAXED), want;
	T ov, nv;
	do {
		memcpy((void *)&ov, &old, sizeof(T));
		nv = f(ov, v);
		memcpy(&want, (const void *)&nv, sizeof(T));
	} while (
	    !__atomic_compare_exchange_n(q, &old, want, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
	return ov;
}
static inline float atomicAdd(float *p, float v)
{
	return lp_emu_atomic_update<float, uint32_t>(p, v, [](float a, float b) { return a + b; });
}
static inline double atomicAdd(double *p, double v)
{
	return lp_emu_atomic_update<double, uint64_t>(p, v,
	                                              [](double a, double b) { return a + b; });
}
static inline __half atomicAdd(__half *p, __half v)
{
	return lp_emu_atomic_update<__half, uint16_t>(
	    p, v, [](__half a, __half b) { return __hadd(a, b); });
}
static inline __half2 atomicAdd(__half2 *p, __half2 v)
{
	return lp_emu_atomic_update<__half2, uint32_t>(
	    p, v, [](__half2 a, __half2 b) { return __hadd2(a, b); });
}
static inline __nv_bfloat16 atomicAdd(__nv_bfloat16 *p, __nv_bfloat16 v)
{
	return lp_emu_atomic_update<__nv_bfloat16, uint16_t>(
	    p, v, [](__nv_bfloat16 a, __nv_bfloat16 b) { return __hadd(a, b); });
}
static inline __nv_bfloat162 atomicAdd(__nv_bfloat162 *p, __nv_bfloat162 v)
{
	return lp_emu_atomic_update<__nv_bfloat162, uint32_t>(
	    p, v, [](__nv_bfloat162 a, __nv_bfloat162 b) { return __hadd2(a, b); });
}
static inline float atomicExch(float *p, float v)
{
	return lp_emu_atomic_update<float, uint32_t>(p, v, [](float, float b) { return b; });
}
static inline unsigned short atomicCAS(unsigned short *p, unsigned short compare, unsigned short v)
{
	__atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
	return compare;
}
/* ((old >= limit) ? 0 : old + 1) and ((old == 0 || old > limit) ? limit : old - 1) */
static inline unsigned atomicInc(unsigned *p, unsigned limit)
{
	unsigned old = __atomic_load_n(p, __ATOMIC_RELAXED);
	while (!__atomic_compare_exchange_n(p, &old, old >= limit ? 0 : old + 1, true,
	                                    __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
	}
	return old;
}
static inline unsigned atomicDec(unsigned *p, unsigned limit)
{
	unsigned old = __atomic_load_n(p, __ATOMIC_RELAXED);
	while (!__atomic_compare_exchange_n(p, &old, (old == 0 || old > limit) ? limit : old - 1,
	                                    true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
	}
	return old;
}

/* ------------------------------------------------------------------------
 * Integer and float intrinsics.
 * ------------------------------------------------------------------------ */

template <class T> static inline T __ldg(const T *p)
{
	return *p;
}
template <class T> static inline T __ldcs(const T *p)
{
	return *p;
}
template <class T> static inline T __ldcg(const T *p)
{
	return *p;
}
template <class T> static inline void __stcs(T *p, T v)
{
	*p = v;
}
template <class T> static inline void __stcg(T *p, T v)
{
	*p = v;
}

/* CUDA's device min/max overloads (math_functions.hpp has the same set). */
#define LP_EMU_MINMAX(R, A, B)                                                                     \
	static inline R min(A a, B b)                                                              \
	{                                                                                          \
		return (R)a < (R)b ? (R)a : (R)b;                                                  \
	}                                                                                          \
	static inline R max(A a, B b)                                                              \
	{                                                                                          \
		return (R)a > (R)b ? (R)a : (R)b;                                                  \
	}
LP_EMU_MINMAX(int, int, int)
LP_EMU_MINMAX(unsigned int, unsigned int, unsigned int)
LP_EMU_MINMAX(unsigned int, int, unsigned int)
LP_EMU_MINMAX(unsigned int, unsigned int, int)
LP_EMU_MINMAX(long, long, long)
LP_EMU_MINMAX(unsigned long, unsigned long, unsigned long)
LP_EMU_MINMAX(unsigned long, long, unsigned long)
LP_EMU_MINMAX(unsigned long, unsigned long, long)
LP_EMU_MINMAX(long long, long long, long long)
LP_EMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
LP_EMU_MINMAX(unsigned long long, long long, unsigned long long)
LP_EMU_MINMAX(unsigned long long, unsigned long long, long long)
#undef LP_EMU_MINMAX
static inline float min(float a, float b)
{
	return fminf(a, b);
}
static inline float max(float a, float b)
{
	return fmaxf(a, b);
}
static inline double min(double a, double b)
{
	return fmin(a, b);
}
static inline double max(double a, double b)
{
	return fmax(a, b);
}
static inline double min(float a, double b)
{
	return fmin(a, b);
}
static inline double max(float a, double b)
{
	return fmax(a, b);
}
static inline double min(double a, float b)
{
	return fmin(a, b);
}
static inline double max(double a, float b)
{
	return fmax(a, b);
}

static inline int __float_as_int(float x)
{
	int i;
	memcpy(&i, &x, 4);
	return i;
}
static inline float __int_as_float(int i)
{
	float x;
	memcpy(&x, &i, 4);
	return x;
}
static inline unsigned __float_as_uint(float x)
{
	unsigned i;
	memcpy(&i, &x, 4);
	return i;
}
static inline float __uint_as_float(unsigned i)
{
	float x;
	memcpy(&x, &i, 4);
	return x;
}
static inline long long __double_as_longlong(double x)
{
	long long i;
	memcpy(&i, &x, 8);
	return i;
}
static inline double __longlong_as_double(long long i)
{
	double x;
	memcpy(&x, &i, 8);
	return x;
}

static inline int __clz(int x)
{
	return x ? __builtin_clz((unsigned)x) : 32;
}
static inline int __clzll(long long x)
{
	return x ? __builtin_clzll((unsigned long long)x) : 64;
}
static inline int __popc(unsigned x)
{
	return __builtin_popcount(x);
}
static inline int __popcll(unsigned long long x)
{
	return __builtin_popcountll(x);
}
static inline int __ffs(int x)
{
	return __builtin_ffs(x);
}
static inline int __ffsll(long long x)
{
	return __builtin_ffsll(x);
}
static inline unsigned __brev(unsigned x)
{
	x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
	x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
	x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
	return __builtin_bswap32(x);
}
static inline unsigned long long __brevll(unsigned long long x)
{
	return ((unsigned long long)__brev((unsigned)x) << 32) | __brev((unsigned)(x >> 32));
}
static inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s)
{
	uint64_t v = ((uint64_t)y << 32) | x;
	unsigned r = 0;
	for (int i = 0; i < 4; i++)
		r |= (unsigned)((v >> (((s >> (4 * i)) & 7) * 8)) & 0xff) << (8 * i);
	return r;
}
static inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift)
{
	uint64_t v = ((uint64_t)hi << 32) | lo;
	return (unsigned)((v << (shift & 31)) >> 32);
}
static inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift)
{
	uint64_t v = ((uint64_t)hi << 32) | lo;
	return (unsigned)(v >> (shift & 31));
}
static inline int __mulhi(int a, int b)
{
	return (int)(((long long)a * b) >> 32);
}
static inline unsigned __umulhi(unsigned a, unsigned b)
{
	return (unsigned)(((unsigned long long)a * b) >> 32);
}
static inline long long __mul64hi(long long a, long long b)
{
	return (long long)(((__int128)a * b) >> 64);
}
static inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b)
{
	return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}

/* Fast-math intrinsics: computed accurately here (the GPU's approximations
 * differ by a few ulp; tests compare with tolerances). */
/* glibc's math.h already declares __expf, __logf, __sinf ... (its own
 * aliases of expf ...), so these are function-like macros. */
#define __expf(x)          expf(x)
#define __exp10f(x)        exp10f(x)
#define __logf(x)          logf(x)
#define __log2f(x)         log2f(x)
#define __log10f(x)        log10f(x)
#define __powf(x, y)       powf(x, y)
#define __sinf(x)          sinf(x)
#define __cosf(x)          cosf(x)
#define __tanf(x)          tanf(x)
#define __tanhf(x)         tanhf(x)
#define __sincosf(x, s, c) sincosf(x, s, c)
/* glibc also declares names that nvcc does not know in device code: keep
 * them from compiling here too (use exp2f, sqrtf, fabsf). */
#define __exp2f(x) lp_emu_nvcc_has_no___exp2f(x)
#define __sqrtf(x) lp_emu_nvcc_has_no___sqrtf(x)
#define __fabsf(x) lp_emu_nvcc_has_no___fabsf(x)
static inline float __fdividef(float a, float b)
{
	return a / b;
}
static inline float rsqrtf(float x)
{
	return 1.0f / sqrtf(x);
}
static inline double rsqrt(double x)
{
	return 1.0 / sqrt(x);
}
static inline float __saturatef(float x)
{
	return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); /* NaN -> 0 */
}
/* The _rn arithmetic intrinsics are never contracted by nvcc: the empty asm
 * hides each result from g++'s -ffp-contract=fast. */
static inline float lp_emu_opaque(float x)
{
	__asm__("" : "+x"(x));
	return x;
}
static inline double lp_emu_opaque(double x)
{
	__asm__("" : "+x"(x));
	return x;
}
static inline float __fadd_rn(float a, float b)
{
	return lp_emu_opaque(lp_emu_opaque(a) + lp_emu_opaque(b));
}
static inline float __fsub_rn(float a, float b)
{
	return lp_emu_opaque(lp_emu_opaque(a) - lp_emu_opaque(b));
}
static inline float __fmul_rn(float a, float b)
{
	return lp_emu_opaque(lp_emu_opaque(a) * lp_emu_opaque(b));
}
static inline float __fdiv_rn(float a, float b)
{
	return lp_emu_opaque(a / b);
}
static inline float __frcp_rn(float x)
{
	return lp_emu_opaque(1.0f / x);
}
static inline float __fsqrt_rn(float x)
{
	return sqrtf(x);
}
static inline float __frsqrt_rn(float x)
{
	return 1.0f / sqrtf(x);
}
static inline float __fmaf_rn(float a, float b, float c)
{
	return fmaf(a, b, c);
}
static inline double __dadd_rn(double a, double b)
{
	return lp_emu_opaque(lp_emu_opaque(a) + lp_emu_opaque(b));
}
static inline double __dmul_rn(double a, double b)
{
	return lp_emu_opaque(lp_emu_opaque(a) * lp_emu_opaque(b));
}
static inline double __fma_rn(double a, double b, double c)
{
	return fma(a, b, c);
}
static inline int __float2int_rn(float x)
{
	return (int)nearbyintf(x);
}
static inline int __float2int_rz(float x)
{
	return (int)x;
}
static inline int __float2int_rd(float x)
{
	return (int)floorf(x);
}
static inline int __float2int_ru(float x)
{
	return (int)ceilf(x);
}
static inline unsigned __float2uint_rn(float x)
{
	return (unsigned)nearbyintf(x);
}
static inline unsigned __float2uint_rz(float x)
{
	return (unsigned)x;
}
static inline float __int2float_rn(int x)
{
	return (float)x;
}
static inline float __uint2float_rn(unsigned x)
{
	return (float)x;
}
static inline long long __float2ll_rn(float x)
{
	return (long long)nearbyintf(x);
}

/* ------------------------------------------------------------------------
 * Half and bfloat16 intrinsics that cuda_fp16.h / cuda_bf16.h declare for
 * device code only (their host side already has conversions, add, mul,
 * min/max, comparisons). Each rounds once, to nearest even, as the GPU
 * does: the fused ones are computed exactly and rounded once.
 * ------------------------------------------------------------------------ */

/* a * b + c rounded once to half (bf16 when bf16 is true); exact product in
 * double, the sum rounded to odd so that the final rounding is correct. */
float lp_emu_fma_round(float a, float b, float c, bool bf16);

static inline __half __hfma(__half a, __half b, __half c)
{
	return __float2half_rn(
	    lp_emu_fma_round(__half2float(a), __half2float(b), __half2float(c), false));
}
static inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c)
{
	return __float2bfloat16_rn(
	    lp_emu_fma_round(__bfloat162float(a), __bfloat162float(b), __bfloat162float(c), true));
}
static inline __half2 __hfma2(__half2 a, __half2 b, __half2 c)
{
	return __halves2half2(__hfma(__low2half(a), __low2half(b), __low2half(c)),
	                      __hfma(__high2half(a), __high2half(b), __high2half(c)));
}
static inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c)
{
	return __halves2bfloat162(
	    __hfma(__low2bfloat16(a), __low2bfloat16(b), __low2bfloat16(c)),
	    __hfma(__high2bfloat16(a), __high2bfloat16(b), __high2bfloat16(c)));
}
static inline __half lp_emu_relu(__half x)
{
	return __hisnan(x) ? x : (__half2float(x) < 0.0f ? __float2half_rn(0.0f) : x);
}
static inline __nv_bfloat16 lp_emu_relu(__nv_bfloat16 x)
{
	return __hisnan(x) ? x : (__bfloat162float(x) < 0.0f ? __float2bfloat16_rn(0.0f) : x);
}
static inline __half __hfma_relu(__half a, __half b, __half c)
{
	return lp_emu_relu(__hfma(a, b, c));
}
static inline __nv_bfloat16 __hfma_relu(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c)
{
	return lp_emu_relu(__hfma(a, b, c));
}
static inline __half2 __hfma2_relu(__half2 a, __half2 b, __half2 c)
{
	__half2 r = __hfma2(a, b, c);
	return __halves2half2(lp_emu_relu(__low2half(r)), lp_emu_relu(__high2half(r)));
}
static inline __nv_bfloat162 __hfma2_relu(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c)
{
	__nv_bfloat162 r = __hfma2(a, b, c);
	return __halves2bfloat162(lp_emu_relu(__low2bfloat16(r)), lp_emu_relu(__high2bfloat16(r)));
}
static inline __half __hfma_sat(__half a, __half b, __half c)
{
	return __float2half_rn(__saturatef(__half2float(__hfma(a, b, c))));
}
static inline __half2 __hfma2_sat(__half2 a, __half2 b, __half2 c)
{
	return __halves2half2(__hfma_sat(__low2half(a), __low2half(b), __low2half(c)),
	                      __hfma_sat(__high2half(a), __high2half(b), __high2half(c)));
}

/* Half math: evaluated in float, rounded once (the GPU's versions are
 * approximations within an ulp or so of this). */
#define LP_EMU_HALF_MATH(name, name2, fn)                                                          \
	static inline __half name(__half x)                                                        \
	{                                                                                          \
		return __float2half_rn(fn(__half2float(x)));                                       \
	}                                                                                          \
	static inline __nv_bfloat16 name(__nv_bfloat16 x)                                          \
	{                                                                                          \
		return __float2bfloat16_rn(fn(__bfloat162float(x)));                               \
	}                                                                                          \
	static inline __half2 name2(__half2 x)                                                     \
	{                                                                                          \
		return __halves2half2(name(__low2half(x)), name(__high2half(x)));                  \
	}                                                                                          \
	static inline __nv_bfloat162 name2(__nv_bfloat162 x)                                       \
	{                                                                                          \
		return __halves2bfloat162(name(__low2bfloat16(x)), name(__high2bfloat16(x)));      \
	}
static inline float lp_emu_rcpf(float x)
{
	return 1.0f / x;
}
static inline float lp_emu_rsqrtf(float x)
{
	return 1.0f / sqrtf(x);
}
LP_EMU_HALF_MATH(hexp, h2exp, expf)
LP_EMU_HALF_MATH(hexp2, h2exp2, exp2f)
LP_EMU_HALF_MATH(hexp10, h2exp10, exp10f)
LP_EMU_HALF_MATH(hlog, h2log, logf)
LP_EMU_HALF_MATH(hlog2, h2log2, log2f)
LP_EMU_HALF_MATH(hlog10, h2log10, log10f)
LP_EMU_HALF_MATH(hsqrt, h2sqrt, sqrtf)
LP_EMU_HALF_MATH(hrsqrt, h2rsqrt, lp_emu_rsqrtf)
LP_EMU_HALF_MATH(hrcp, h2rcp, lp_emu_rcpf)
LP_EMU_HALF_MATH(hsin, h2sin, sinf)
LP_EMU_HALF_MATH(hcos, h2cos, cosf)
LP_EMU_HALF_MATH(htanh, h2tanh, tanhf)
LP_EMU_HALF_MATH(hceil, h2ceil, ceilf)
LP_EMU_HALF_MATH(hfloor, h2floor, floorf)
LP_EMU_HALF_MATH(htrunc, h2trunc, truncf)
LP_EMU_HALF_MATH(hrint, h2rint, rintf)
#undef LP_EMU_HALF_MATH

static inline int __half2int_rn(__half x)
{
	return (int)nearbyintf(__half2float(x));
}
static inline int __bfloat162int_rn(__nv_bfloat16 x)
{
	return (int)nearbyintf(__bfloat162float(x));
}

/* ------------------------------------------------------------------------
 * Launch (LP_LAUNCH in cuda.cuh).
 * ------------------------------------------------------------------------ */

/* One launch's kernel and arguments, type-erased for the scheduler. */
struct lp_emu_kernel {
	const void *fn; /* the kernel (its name in messages, its attributes) */
	int n_args;
	virtual ~lp_emu_kernel()
	{
	}
	/* runs the body for the current GPU thread */
	virtual void run() = 0;
	/* a heap copy (graph capture); the caller deletes it */
	virtual lp_emu_kernel *clone() const = 0;
	/* argument i when it is a pointer, else NULL (pointer checks) */
	virtual const void *pointer_arg(int i) const = 0;
};

template <class... P> struct lp_emu_call final : lp_emu_kernel {
	typedef void (*fn_t)(P...);
	std::tuple<typename std::decay<P>::type...> args;

	lp_emu_call(fn_t f, const typename std::decay<P>::type &...a) : args(a...)
	{
		fn = (const void *)f;
		n_args = (int)sizeof...(P);
	}
	void run() override
	{
		invoke(std::index_sequence_for<P...>());
	}
	template <size_t... I> void invoke(std::index_sequence<I...>)
	{
		/* every GPU thread gets its own copy of the arguments, as on the
		 * GPU where a kernel may modify its parameters */
		((fn_t)fn)(std::get<I>(args)...);
	}
	lp_emu_kernel *clone() const override
	{
		return new lp_emu_call(*this);
	}
	const void *pointer_arg(int i) const override
	{
		const void *out = NULL;
		pointer_at(i, out, std::index_sequence_for<P...>());
		return out;
	}
	template <size_t... I>
	void pointer_at(int i, const void *&out, std::index_sequence<I...>) const
	{
		(void)i;
		(void)out;
		(void)std::initializer_list<int>{
		    (pointer_of(i == (int)I, std::get<I>(args), out), 0)...};
	}
	template <class T> static void pointer_of(bool pick, const T &v, const void *&out)
	{
		if constexpr (std::is_pointer<T>::value) {
			if (pick)
				out = (const void *)v;
		} else {
			(void)pick;
			(void)v;
			(void)out;
		}
	}
};

/* Runs (or, on a capturing stream, records) one launch; a bad configuration
 * or a failed launch sets the error cudaGetLastError returns. k is
 * borrowed. */
void lp_emu_submit(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, lp_emu_kernel *k);

template <class... P> struct lp_emu_launcher {
	dim3 grid, block;
	size_t smem;
	cudaStream_t stream;
	void (*fn)(P...);

	/* the arguments convert to the parameter types as in a call */
	void operator()(typename std::decay<P>::type... a) const
	{
		lp_emu_call<P...> call(fn, a...);
		lp_emu_submit(grid, block, smem, stream, &call);
	}
};

template <class... P>
static inline lp_emu_launcher<P...> lp_emu_launch(dim3 grid, dim3 block, size_t smem,
                                                  cudaStream_t stream, void (*fn)(P...))
{
	return lp_emu_launcher<P...>{grid, block, smem, stream, fn};
}

#endif
