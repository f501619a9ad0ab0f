/* The CUDA backend's context: device, streams and the sticky status; see
 * cuda.cuh. */
#include "kernels/cuda/cuda.cuh"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int lp_cuda_fail(struct lp_cuda *cu, int code, const char *fmt, ...)
{
	va_list ap;

	if (cu->status)
		return code;
	cu->status = code ? code : -EIO;
	va_start(ap, fmt);
	vsnprintf(cu->status_msg, sizeof(cu->status_msg), fmt, ap);
	va_end(ap);
	return code;
}

bool lp_cuda_check(struct lp_cuda *cu, cudaError_t e, const char *stmt, const char *file, int line)
{
	const char *base;

	if (e == cudaSuccess)
		return false;
	base = strrchr(file, '/');
	lp_cuda_fail(cu, e == cudaErrorMemoryAllocation ? -ENOMEM : -EIO, "%s (%s) in %s at %s:%d",
	             cudaGetErrorName(e), cudaGetErrorString(e), stmt, base ? base + 1 : file,
	             line);
	return true;
}

int lp_cuda_init(struct lp_cuda *cu, int device, struct lp_err *err)
{
	struct cudaDeviceProp prop;
	size_t free_bytes = 0, total = 0;
	int n = 0;
	cudaError_t e;

	memset(cu, 0, sizeof(*cu));
	cu->device = device;
	e = cudaGetDeviceCount(&n);
	if (e != cudaSuccess)
		return lp_errf(err, -ENODEV, "no usable CUDA device: %s (%s)", cudaGetErrorName(e),
		               cudaGetErrorString(e));
	if (device < 0 || device >= n)
		return lp_errf(err, -ENODEV, "no CUDA device %d: this node has %d", device, n);
	if ((e = cudaSetDevice(device)) != cudaSuccess ||
	    (e = cudaGetDeviceProperties(&prop, device)) != cudaSuccess ||
	    (e = cudaMemGetInfo(&free_bytes, &total)) != cudaSuccess)
		return lp_errf(err, -ENODEV, "CUDA device %d: %s (%s)", device, cudaGetErrorName(e),
		               cudaGetErrorString(e));
	snprintf(cu->name, sizeof(cu->name), "%.127s", prop.name);
	cu->cc_major = prop.major;
	cu->cc_minor = prop.minor;
	cu->sm_count = prop.multiProcessorCount;
	cu->total_bytes = total;
	if ((e = cudaStreamCreateWithFlags(&cu->stream, cudaStreamNonBlocking)) != cudaSuccess ||
	    (e = cudaStreamCreateWithFlags(&cu->side, cudaStreamNonBlocking)) != cudaSuccess) {
		lp_cuda_release(cu);
		return lp_errf(err, -ENODEV, "CUDA device %d: cannot create streams: %s", device,
		               cudaGetErrorString(e));
	}
	return 0;
}

void lp_cuda_release(struct lp_cuda *cu)
{
	if (cu->stream)
		cudaStreamDestroy(cu->stream);
	if (cu->side)
		cudaStreamDestroy(cu->side);
	cu->stream = NULL;
	cu->side = NULL;
}
