/* What the files of the CUDA emulation share among themselves (not for
 * kernels: they see emu.h only). */
#ifndef LP_KERNELS_CUDA_EMU_INTERNAL_H
#define LP_KERNELS_CUDA_EMU_INTERNAL_H

#include "kernels/cuda/emu/emu.h"

#include <atomic>

#if defined(__SANITIZE_ADDRESS__)
#define LP_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LP_EMU_ASAN 1
#endif
#endif

/* Dynamic shared memory a launch may ask for: 48 KiB unless the kernel's
 * cudaFuncAttributeMaxDynamicSharedMemorySize was raised, 227 KiB at most
 * (sm_90's opt-in limit). */
#define LP_EMU_SMEM_DEFAULT (48u << 10)
#define LP_EMU_SMEM_OPTIN   (227u << 10)

struct lp_emu_atomic_counters {
	std::atomic<uint64_t> launches, blocks, threads, switches, graph_launches;
	std::atomic<uint64_t> h2d_bytes, d2h_bytes, d2d_bytes, memset_bytes;
};
extern struct lp_emu_atomic_counters lp_emu_ctr;

/* exec.cc: runs every block of the grid on the calling OS thread; on a
 * failure (a wait that cannot complete, __trap) returns
 * cudaErrorLaunchFailure with the reason in msg. The configuration was
 * validated. */
cudaError_t lp_emu_run_grid(dim3 grid, dim3 block, size_t smem, lp_emu_kernel *k, char *msg,
                            size_t msg_size);

/* symbols.cc: the kernel's (demangled) name, or its address in hex. */
void lp_emu_kernel_name(const void *fn, char *buf, size_t size);

/* runtime.cc: whether p lies in (or one past the end of) a cudaMalloc'd or
 * pinned host allocation, which kernels may dereference. */
bool lp_emu_device_accessible(const void *p);

#endif
