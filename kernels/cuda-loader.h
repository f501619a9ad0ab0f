/* Picking a backend by name, and the CUDA backend loaded at run time.
 *
 * The CUDA backend lives in libloraplane-cuda.so (kernels/cuda/, built
 * with nvcc when the build has CUDA; docs/cuda.md). The programs never
 * link against CUDA: kernels/cuda-loader.c dlopen()s the shared object
 * when a CUDA device is asked for, so they start on machines without
 * CUDA's libraries or an NVIDIA driver. lp_backend_cuda_new is declared
 * in kernels/backend.h. */
#ifndef LP_KERNELS_CUDA_LOADER_H
#define LP_KERNELS_CUDA_LOADER_H

#include <stddef.h>
#include <stdint.h>

#include "common/err.h"
#include "kernels/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The shared object's file name, and the environment variable that names
 * it in full (checked first; then the program's directory, then
 * ../lib/loraplane/ from there). */
#define LP_CUDA_LIB_NAME "libloraplane-cuda.so"
#define LP_CUDA_LIB_ENV  "LORAPLANE_CUDA_LIB"

enum lp_device_kind {
	LP_DEVICE_CPU,
	LP_DEVICE_CUDA,
	LP_DEVICE_AUTO, /* CUDA device 0 when it opens, else the CPU */
};

/* Parses a --device value: "cpu", "cuda" (device 0), "cuda:N" (N
 * decimal digits, at most 1023) or "auto". -EINVAL with a message naming
 * the value otherwise. *cuda_device is the CUDA device (0 for auto, -1
 * for cpu). */
int lp_device_parse(const char *spec, enum lp_device_kind *kind, int *cuda_device,
                    struct lp_err *err);

/* Opens the backend that spec names (see lp_device_parse) with n_threads
 * compute threads for the CPU (0: one per online CPU). With "auto" a CUDA
 * device that does not open is no error: the CPU backend is opened and
 * note (note_len bytes, may be NULL) says why; note is "" otherwise.
 * Errors: -EINVAL for a bad spec, -ENODEV with the reason when the CUDA
 * backend cannot be used, or what the backend's constructor returned.
 * Free *out with lp_backend_destroy(). */
int lp_backend_open(const char *spec, int n_threads, struct lp_backend **out, char *note,
                    size_t note_len, struct lp_err *err);

/* What the CUDA backend counted since it opened, for benchmarks and to
 * see whether decode steps replay their CUDA Graphs (docs/cuda.md). */
struct lp_cuda_counters {
	uint64_t launches;         /* kernels launched one by one (eager ops) */
	uint64_t graph_launches;   /* steps replayed with one cudaGraphLaunch */
	uint64_t graph_kernels;    /* kernels inside those replayed graphs */
	uint64_t captures;         /* graphs captured (one per step key at most) */
	uint64_t capture_failures; /* keys whose capture failed: they run eagerly */
	uint64_t mismatches;       /* replays abandoned: the step differed from its graph */
	uint64_t eager_steps;      /* steps that ran op by op (prefill, first of a key, ...) */
	uint64_t upload_bytes;     /* host -> device through upload() */
	int graphs;                /* graphs held now */
	char capture_error[160];   /* why the last capture failed, "" if none did */
};

/* The counters of a backend that lp_backend_cuda_new opened (tests of the
 * emulated build call lp_cuda_backend_counters directly): -ENOTSUP for any
 * other backend. Call it from the thread that runs the steps. */
int lp_backend_cuda_counters(const struct lp_backend *be, struct lp_cuda_counters *out);

/* What libloraplane-cuda.so exports (the only symbols it exports) and the
 * loader looks up by name. lp_cuda_backend_open returns -ENODEV with the
 * reason when there is no driver or no such device. */
int lp_cuda_backend_open(int device, struct lp_backend **out, struct lp_err *err);
int lp_cuda_backend_counters(const struct lp_backend *be, struct lp_cuda_counters *out);

/* For tests linked with the CUDA objects themselves (the emulated build,
 * libloraplane-cuda-emu.a, or the nvcc objects for make test-gpu): the
 * backend on device 0, without the loader. */
int lp_backend_cuda_emu_new(struct lp_backend **out, struct lp_err *err);

#ifdef __cplusplus
}
#endif

#endif
