/* Weight conversion at import: a host matrix of any lp_dtype becomes f16
 * (or bf16 for bf16 sources) in device memory. The host dequantizes
 * (kernels/dtype.c's lp_dequantize_row) and rounds to nearest even into
 * the caller's pinned staging buffer, which is cut in two halves: while
 * one half is being copied to the device, the host fills the other.
 *
 * A matrix's rows are contiguous and each is a whole number of blocks, so
 * the source is one run of blocks and the target one run of halves; the
 * conversion walks it in pieces of whole blocks, ignoring row edges. */
#include "kernels/cuda/ops.cuh"

#include <errno.h>
#include <math.h>
#include <string.h>

enum lp_dtype lp_cuda_weight_type(enum lp_dtype src)
{
	/* bf16 keeps its range; everything else fits f16's precision (the
	 * quantized formats' scales are f16 already) */
	return src == LP_DTYPE_BF16 ? LP_DTYPE_BF16 : LP_DTYPE_F16;
}

/* Weights expanded to f32 at a time on the host (a multiple of every
 * block size, the K-quants' 256 included). */
#define LP_CONVERT_CHUNK 1024
static_assert(LP_CONVERT_CHUNK % LP_QK_K == 0, "conversion chunks must be whole blocks");

/* Converts n weights (a multiple of the source block) starting at source
 * block offset `src` into dst, in dst_type. Returns the index of the first
 * finite weight that became infinite in f16, or -1. */
static int64_t convert_piece(enum lp_dtype src_type, const char *src, uint16_t *dst,
                             enum lp_dtype dst_type, int64_t n)
{
	float buf[LP_CONVERT_CHUNK];
	int block = lp_dtype_block(src_type);
	int64_t overflow = -1;

	if (src_type == dst_type) { /* f16 -> f16, bf16 -> bf16: the bits as they are */
		memcpy(dst, src, (size_t)n * sizeof(uint16_t));
		return -1;
	}
	for (int64_t i0 = 0; i0 < n; i0 += LP_CONVERT_CHUNK) {
		int64_t m = n - i0 < LP_CONVERT_CHUNK ? n - i0 : LP_CONVERT_CHUNK;

		lp_dequantize_row(
		    src_type, src + (size_t)(i0 / block) * lp_dtype_block_bytes(src_type), buf, m);
		for (int64_t i = 0; i < m; i++) {
			uint16_t h = lp_f32_to_f16(buf[i]);

			if ((h & 0x7fff) == 0x7c00 && isfinite(buf[i]) && overflow < 0)
				overflow = i0 + i;
			dst[i0 + i] = h;
		}
	}
	return overflow;
}

int lp_cuda_convert_weight(struct lp_cuda *cu, void *dst, const void *host, enum lp_dtype src,
                           int64_t rows, int64_t cols, void *staging, size_t staging_bytes,
                           struct lp_err *err)
{
	enum lp_dtype target = lp_cuda_weight_type(src);
	cudaEvent_t done[2] = {NULL, NULL};
	int64_t block, total, piece, overflow = -1;
	int rc = 0;

	if (lp_cuda_failed(cu))
		return lp_errf(err, cu->status, "%s", cu->status_msg);
	if (src == LP_DTYPE_I32 || (unsigned)src >= LP_DTYPE_COUNT)
		return lp_errf(err, -EINVAL, "cannot import a weight of type %d", (int)src);
	if (rows < 0 || cols < 0 || (cols > 0 && lp_dtype_row_bytes(src, cols) == 0))
		return lp_errf(err, -EINVAL, "weight of %lld x %lld %s: bad shape", (long long)rows,
		               (long long)cols, lp_dtype_name(src));
	block = lp_dtype_block(src);
	total = rows * cols;
	/* whole source blocks per half of the staging */
	piece = (int64_t)(staging_bytes / 2 / sizeof(uint16_t)) / block * block;
	if (total == 0)
		return 0;
	if (piece < block)
		return lp_errf(err, -EINVAL, "staging of %zu bytes cannot hold a %s block",
		               staging_bytes, lp_dtype_name(src));
	for (int i = 0; i < 2; i++) {
		if (!LP_CUDA_CHECK(cu,
		                   cudaEventCreateWithFlags(&done[i], cudaEventDisableTiming))) {
			rc = lp_errf(err, cu->status, "%s", cu->status_msg);
			goto out_events;
		}
	}
	for (int64_t i0 = 0, k = 0; i0 < total; i0 += piece, k++) {
		int64_t n = total - i0 < piece ? total - i0 : piece;
		uint16_t *half =
		    (uint16_t *)staging + (k % 2) * (staging_bytes / 2 / sizeof(uint16_t));
		int64_t bad;

		/* the copy that last read this half must be done */
		if (k >= 2 && !LP_CUDA_CHECK(cu, cudaEventSynchronize(done[k % 2]))) {
			rc = lp_errf(err, cu->status, "%s", cu->status_msg);
			goto out_sync;
		}
		bad = convert_piece(
		    src, (const char *)host + (size_t)(i0 / block) * lp_dtype_block_bytes(src),
		    half, target, n);
		if (bad >= 0 && overflow < 0)
			overflow = i0 + bad;
		if (!LP_CUDA_CHECK(cu, cudaMemcpyAsync((uint16_t *)dst + i0, half,
		                                       (size_t)n * sizeof(uint16_t),
		                                       cudaMemcpyHostToDevice, cu->stream)) ||
		    !LP_CUDA_CHECK(cu, cudaEventRecord(done[k % 2], cu->stream))) {
			rc = lp_errf(err, cu->status, "%s", cu->status_msg);
			goto out_sync;
		}
	}
	if (overflow >= 0) {
		float v[LP_QK_K]; /* one block of the largest block size */
		int64_t b0 = overflow / block * block;

		lp_dequantize_row(
		    src, (const char *)host + (size_t)(b0 / block) * lp_dtype_block_bytes(src), v,
		    block);
		rc = lp_errf(
		    err, -ERANGE,
		    "weight [%lld, %lld] = %g is outside f16's range (65504); %lld x %lld %s",
		    (long long)(overflow / cols), (long long)(overflow % cols),
		    (double)v[overflow - b0], (long long)rows, (long long)cols, lp_dtype_name(src));
	}
out_sync:
	/* the caller may reuse staging and free host when this returns */
	if (!LP_CUDA_CHECK(cu, cudaStreamSynchronize(cu->stream)) && rc == 0)
		rc = lp_errf(err, cu->status, "%s", cu->status_msg);
out_events:
	for (int i = 0; i < 2; i++)
		if (done[i])
			cudaEventDestroy(done[i]);
	return rc;
}
