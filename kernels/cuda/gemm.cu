/* matmul on CUDA: out[n, m] (+)= x[n, k] . w[m, k]^T with x and out f32
 * and w f16 or bf16 as import_weight stored it (convert.cu).
 *
 * x is first converted to w's type (round to nearest even) in the matmul
 * workspace; then
 *   real build   cuBLASLt, f32 output, CUBLAS_COMPUTE_32F, beta 1 to
 *                accumulate, one algorithm per weight shape (below);
 *   LP_CUDA_EMU  a reference kernel: per output element an f32 fmaf loop
 *                over k in order, so emulated numerics are those of half
 *                inputs with f32 accumulation.
 *
 * Batch invariance (backend.h: row i of out does not depend on the other
 * rows of x). A GEMM kernel computes out[i, j] from row i of x and row j of
 * w alone; what can change its bits is how the sum over k is cut up, and
 * that is fixed by the algorithm (tile shape, stages, split-K). cuBLASLt's
 * heuristic, asked per call, picks algorithms by n, so a row could get
 * different bits in a batch of 1 and of 300. Here each (m, k, type,
 * alignment) gets its algorithm once, chosen for n = lim.max_tokens, with
 * split-K forced to 1 and no reduction scheme (one CTA sums all of k for an
 * element, in the kernel's fixed order), checked to run for n from 1 to
 * max_tokens, and used for every n. Where this could fail: a kernel that
 * divides k among CTAs by the grid's size without calling it split-K (a
 * stream-K schedule), or a cuBLAS version whose kernel for one algorithm
 * descriptor changes with n; the GPU run of tests/cuda/test-gemm.cc checks
 * row equality bit for bit and would show it. */
#include "kernels/cuda/elementwise.cuh"
#include "kernels/cuda/gemm.cuh"
#include "kernels/cuda/ops.cuh"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* The part of the matmul workspace cuBLASLt may use (the rest holds x in
 * half precision). */
#define LP_GEMM_CUBLAS_WS ((size_t)32 << 20)
#define LP_GEMM_WS_ALIGN  256

static size_t round_up(size_t v, size_t a)
{
	return (v + a - 1) / a * a;
}

size_t lp_cuda_matmul_workspace(const struct lp_backend_limits *lim)
{
	int64_t widest = lim->dim;

	if (lim->ffn_dim > widest)
		widest = lim->ffn_dim;
	if ((int64_t)lim->n_heads * lim->head_dim > widest)
		widest = (int64_t)lim->n_heads * lim->head_dim;
	if (widest < 0 || lim->max_tokens <= 0)
		widest = 0;
	return round_up((size_t)(lim->max_tokens > 0 ? lim->max_tokens : 0) * (size_t)widest * 2,
	                LP_GEMM_WS_ALIGN) +
	       LP_GEMM_CUBLAS_WS;
}

/* f32 -> f16/bf16, n contiguous elements: a grid-stride loop of 4-element
 * steps (the last one partial) or of single elements. */
// lp: hot
template <typename T, int VEC>
__global__ void to_half_kernel(T *__restrict__ dst, const float *__restrict__ src, int64_t n)
{
	const int64_t stride = (int64_t)gridDim.x * blockDim.x * VEC;

	for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < n;
	     i += stride) {
		if (VEC == 4 && i + 4 <= n) {
			lp_cuda_store4(dst, i, lp_cuda_load4(src, i));
		} else {
			for (int64_t j = i; j < i + VEC && j < n; j++)
				lp_cuda_store(dst, j, src[j]);
		}
	}
}

template <typename T>
static cudaError_t to_half_launch(const struct lp_cuda *cu, T *dst, const float *src, int64_t n)
{
	bool vec = lp_cuda_aligned4(dst, sizeof(T)) && lp_cuda_aligned4(src, sizeof(float));
	unsigned blocks = lp_cuda_stride_blocks(cu, vec ? (n + 3) / 4 : n, LP_CUDA_EW_THREADS);

	auto kernel = vec ? to_half_kernel<T, 4> : to_half_kernel<T, 1>;

	LP_LAUNCH(blocks, LP_CUDA_EW_THREADS, 0, cu->stream, kernel)(dst, src, n);
	return cudaGetLastError();
}

#ifdef LP_CUDA_EMU

/* The reference GEMM of the emulated build: one thread per element of
 * out, the sum over k in order with fused multiply-adds. */
template <typename T>
__global__ void gemm_ref_kernel(float *__restrict__ out, const T *__restrict__ x,
                                const T *__restrict__ w, int64_t n, int64_t m, int64_t k,
                                bool accumulate)
{
	const int64_t stride = (int64_t)gridDim.x * blockDim.x;

	for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n * m; e += stride) {
		const T *xr = x + e / m * k, *wr = w + e % m * k;
		float acc = 0.0f;

		for (int64_t i = 0; i < k; i++)
			acc = fmaf(lp_cuda_load(xr, i), lp_cuda_load(wr, i), acc);
		out[e] = accumulate ? out[e] + acc : acc;
	}
}

/* out (+)= xh . w^T with xh the converted x; the reference kernel. */
static cudaError_t gemm_run(struct lp_cuda *cu, float *out, const void *xh,
                            const struct lp_tensor *w, int64_t n, int64_t m, int64_t k,
                            bool accumulate, void *cublas_ws, size_t cublas_ws_bytes)
{
	unsigned blocks = lp_cuda_stride_blocks(cu, n * m, LP_CUDA_EW_THREADS);

	if (w->type == LP_DTYPE_BF16) {
		LP_LAUNCH(blocks, LP_CUDA_EW_THREADS, 0, cu->stream, gemm_ref_kernel<__nv_bfloat16>)
		(out, (const __nv_bfloat16 *)xh, (const __nv_bfloat16 *)w->data, n, m, k,
		 accumulate);
	} else {
		LP_LAUNCH(blocks, LP_CUDA_EW_THREADS, 0, cu->stream, gemm_ref_kernel<__half>)
		(out, (const __half *)xh, (const __half *)w->data, n, m, k, accumulate);
	}
	cu->launches++;
	return cudaGetLastError();
}

int lp_cuda_matmul_init(struct lp_cuda *cu, struct lp_err *err)
{
	cu->matmul = NULL; /* the reference route keeps no state */
	return 0;
}

void lp_cuda_matmul_release(struct lp_cuda *cu)
{
	cu->matmul = NULL;
}

#else /* cuBLASLt */

/* Weight shapes (x type x alignment) a backend meets: a model has about
 * six, in one or two types. */
#define LP_GEMM_MAX_ALGOS  64
/* Heuristic candidates examined for one shape. */
#define LP_GEMM_CANDIDATES 16
/* n to choose algorithms for when no limits are known. */
#define LP_GEMM_DEFAULT_N  512

struct gemm_algo {
	int64_t m, k;
	enum lp_dtype type;
	uint32_t align; /* bytes every pointer of the product is aligned to */
	cublasLtMatmulAlgo_t algo;
};

struct gemm_state {
	cublasLtHandle_t lt;
	cublasLtMatmulDescOpaque_t op; /* D = A^T B, f32 compute and scale */
	int n_algos;
	struct gemm_algo algos[LP_GEMM_MAX_ALGOS];
};

bool lp_cublas_check(struct lp_cuda *cu, cublasStatus_t s, const char *stmt, const char *file,
                     int line)
{
	const char *base;

	if (s == CUBLAS_STATUS_SUCCESS)
		return false;
	base = strrchr(file, '/');
	lp_cuda_fail(cu, s == CUBLAS_STATUS_ALLOC_FAILED ? -ENOMEM : -EIO, "%s (%s) in %s at %s:%d",
	             cublasLtGetStatusName(s), cublasLtGetStatusString(s), stmt,
	             base ? base + 1 : file, line);
	return true;
}

static cudaDataType_t cuda_type(enum lp_dtype t)
{
	return t == LP_DTYPE_BF16 ? CUDA_R_16BF : CUDA_R_16F;
}

/* The largest power of two (up to 256) that p is a multiple of. */
static uint32_t align_of(const void *p)
{
	uintptr_t v = (uintptr_t)p, low = v & (~v + 1);

	return low == 0 || low > 256 ? 256 : (uint32_t)low;
}

/* Column-major views of the row-major operands: A = w as k x m (used
 * transposed), B = x as k x n, C = D = out as m x n. */
struct gemm_layouts {
	cublasLtMatrixLayoutOpaque_t a, b, c;
};

static bool gemm_layouts_init(struct lp_cuda *cu, struct gemm_layouts *l, enum lp_dtype type,
                              int64_t n, int64_t m, int64_t k)
{
	return LP_CUBLAS_CHECK(cu, cublasLtMatrixLayoutInit(&l->a, cuda_type(type), (uint64_t)k,
	                                                    (uint64_t)m, k)) &&
	       LP_CUBLAS_CHECK(cu, cublasLtMatrixLayoutInit(&l->b, cuda_type(type), (uint64_t)k,
	                                                    (uint64_t)n, k)) &&
	       LP_CUBLAS_CHECK(
	           cu, cublasLtMatrixLayoutInit(&l->c, CUDA_R_32F, (uint64_t)m, (uint64_t)n, m));
}

/* True when algo has no split of k, and runs (cublasLtMatmulAlgoCheck)
 * within the workspace for n = 1 .. n_ref, probed at a few n. */
static bool gemm_algo_usable(struct lp_cuda *cu, struct gemm_state *st,
                             const cublasLtMatmulAlgo_t *algo, enum lp_dtype type, int64_t n_ref,
                             int64_t m, int64_t k)
{
	const int64_t probes[] = {1, 2, 3, 7, 8, 64, n_ref};
	int32_t splits = 0;
	uint32_t scheme = ~0u;
	size_t written = 0;

	if (cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits,
	                                         sizeof(splits),
	                                         &written) != CUBLAS_STATUS_SUCCESS ||
	    cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME,
	                                         &scheme, sizeof(scheme),
	                                         &written) != CUBLAS_STATUS_SUCCESS)
		return false;
	if (splits > 1 || scheme != CUBLASLT_REDUCTION_SCHEME_NONE)
		return false;
	for (size_t i = 0; i < sizeof(probes) / sizeof(probes[0]); i++) {
		cublasLtMatmulHeuristicResult_t r;
		struct gemm_layouts l;

		if (probes[i] > n_ref)
			continue;
		memset(&r, 0, sizeof(r));
		if (!gemm_layouts_init(cu, &l, type, probes[i], m, k))
			return false;
		if (cublasLtMatmulAlgoCheck(st->lt, &st->op, &l.a, &l.b, &l.c, &l.c, algo, &r) !=
		        CUBLAS_STATUS_SUCCESS ||
		    r.workspaceSize > LP_GEMM_CUBLAS_WS)
			return false;
	}
	return true;
}

/* The algorithm of (type, m, k, align): from the table, or chosen now and
 * added. NULL with the failure recorded when there is none. */
static const struct gemm_algo *gemm_algo_for(struct lp_cuda *cu, struct gemm_state *st,
                                             enum lp_dtype type, int64_t m, int64_t k,
                                             uint32_t align)
{
	cublasLtMatmulPreferenceOpaque_t pref;
	cublasLtMatmulHeuristicResult_t res[LP_GEMM_CANDIDATES];
	uint64_t max_ws = LP_GEMM_CUBLAS_WS;
	uint32_t no_reduction = CUBLASLT_REDUCTION_SCHEME_NONE;
	int64_t n_ref = cu->lim.max_tokens > 0 ? cu->lim.max_tokens : LP_GEMM_DEFAULT_N;
	struct gemm_layouts l;
	int got = 0;

	for (int i = 0; i < st->n_algos; i++) {
		const struct gemm_algo *a = &st->algos[i];
		if (a->m == m && a->k == k && a->type == type && a->align == align)
			return a;
	}
	if (st->n_algos == LP_GEMM_MAX_ALGOS) {
		lp_cuda_fail(cu, -ENOSPC, "matmul: more than %d weight shapes (%lld x %lld %s)",
		             LP_GEMM_MAX_ALGOS, (long long)m, (long long)k, lp_dtype_name(type));
		return NULL;
	}
	if (!LP_CUBLAS_CHECK(cu, cublasLtMatmulPreferenceInit(&pref)) ||
	    !LP_CUBLAS_CHECK(cu, cublasLtMatmulPreferenceSetAttribute(
	                             &pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_ws,
	                             sizeof(max_ws))) ||
	    !LP_CUBLAS_CHECK(cu, cublasLtMatmulPreferenceSetAttribute(
	                             &pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
	                             &no_reduction, sizeof(no_reduction))))
		return NULL;
	{
		const cublasLtMatmulPreferenceAttributes_t aligns[] = {
		    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
		    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
		    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
		    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
		for (size_t i = 0; i < sizeof(aligns) / sizeof(aligns[0]); i++)
			if (!LP_CUBLAS_CHECK(cu, cublasLtMatmulPreferenceSetAttribute(
			                             &pref, aligns[i], &align, sizeof(align))))
				return NULL;
	}
	if (!gemm_layouts_init(cu, &l, type, n_ref, m, k) ||
	    !LP_CUBLAS_CHECK(cu,
	                     cublasLtMatmulAlgoGetHeuristic(st->lt, &st->op, &l.a, &l.b, &l.c, &l.c,
	                                                    &pref, LP_GEMM_CANDIDATES, res, &got)))
		return NULL;
	for (int i = 0; i < got; i++) {
		struct gemm_algo *a = &st->algos[st->n_algos];

		if (res[i].state != CUBLAS_STATUS_SUCCESS ||
		    !gemm_algo_usable(cu, st, &res[i].algo, type, n_ref, m, k))
			continue;
		a->m = m;
		a->k = k;
		a->type = type;
		a->align = align;
		a->algo = res[i].algo;
		st->n_algos++;
		return a;
	}
	lp_cuda_fail(cu, -ENOTSUP,
	             "matmul: cuBLASLt has no single-pass algorithm for %lld x %lld %s weights "
	             "(%d candidates, %u-byte alignment)",
	             (long long)m, (long long)k, lp_dtype_name(type), got, align);
	return NULL;
}

/* out (+)= xh . w^T with xh the converted x, by cuBLASLt with the shape's
 * one algorithm. */
static cudaError_t gemm_run(struct lp_cuda *cu, float *out, const void *xh,
                            const struct lp_tensor *w, int64_t n, int64_t m, int64_t k,
                            bool accumulate, void *cublas_ws, size_t cublas_ws_bytes)
{
	struct gemm_state *st = (struct gemm_state *)cu->matmul;
	uint32_t align = align_of(w->data);
	const struct gemm_algo *algo;
	struct gemm_layouts l;
	float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;

	if (align_of(out) < align)
		align = align_of(out);
	if (align_of(xh) < align)
		align = align_of(xh);
	if (!(algo = gemm_algo_for(cu, st, w->type, m, k, align)) ||
	    !gemm_layouts_init(cu, &l, w->type, n, m, k))
		return cudaSuccess; /* the failure is recorded */
	if (LP_CUBLAS_CHECK(cu, cublasLtMatmul(st->lt, &st->op, &alpha, w->data, &l.a, xh, &l.b,
	                                       &beta, out, &l.c, out, &l.c, &algo->algo, cublas_ws,
	                                       cublas_ws_bytes, cu->stream)))
		cu->launches++;
	return cudaGetLastError();
}

int lp_cuda_matmul_init(struct lp_cuda *cu, struct lp_err *err)
{
	struct gemm_state *st;
	const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
	const struct lp_backend_limits *lim = &cu->lim;
	int64_t q_dim = (int64_t)lim->n_heads * lim->head_dim;
	int64_t kv_dim = (int64_t)lim->n_kv_heads * lim->head_dim;
	/* the weight shapes of a transformer layer and the output head, as
	 * (m, k): chosen now so that steps meet a full table */
	const int64_t shapes[][2] = {{q_dim, lim->dim},        {kv_dim, lim->dim},
	                             {lim->dim, q_dim},        {lim->ffn_dim, lim->dim},
	                             {lim->dim, lim->ffn_dim}, {lim->vocab, lim->dim}};
	const enum lp_dtype types[] = {LP_DTYPE_F16, LP_DTYPE_BF16};
	cublasStatus_t s;

	lp_cuda_matmul_release(cu); /* a second reserve() starts afresh */
	st = (struct gemm_state *)calloc(1, sizeof(*st));
	if (!st)
		return lp_errf(err, -ENOMEM, "out of memory for the matmul state");
	if ((s = cublasLtCreate(&st->lt)) != CUBLAS_STATUS_SUCCESS) {
		free(st);
		return lp_errf(err, -ENODEV, "cublasLtCreate: %s (%s)", cublasLtGetStatusName(s),
		               cublasLtGetStatusString(s));
	}
	cu->matmul = st;
	if (!LP_CUBLAS_CHECK(cu, cublasLtMatmulDescInit(&st->op, CUBLAS_COMPUTE_32F, CUDA_R_32F)) ||
	    !LP_CUBLAS_CHECK(cu,
	                     cublasLtMatmulDescSetAttribute(&st->op, CUBLASLT_MATMUL_DESC_TRANSA,
	                                                    &trans_a, sizeof(trans_a))) ||
	    !LP_CUBLAS_CHECK(cu,
	                     cublasLtMatmulDescSetAttribute(&st->op, CUBLASLT_MATMUL_DESC_TRANSB,
	                                                    &trans_b, sizeof(trans_b))))
		return lp_errf(err, cu->status, "%s", cu->status_msg);
	if (lim->max_tokens <= 0)
		return 0;
	for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++)
		for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++)
			if (shapes[i][0] > 0 && shapes[i][1] > 0 &&
			    !gemm_algo_for(cu, st, types[t], shapes[i][0], shapes[i][1], 256))
				return lp_errf(err, cu->status, "%s", cu->status_msg);
	return 0;
}

void lp_cuda_matmul_release(struct lp_cuda *cu)
{
	struct gemm_state *st = (struct gemm_state *)cu->matmul;

	if (!st)
		return;
	cublasLtDestroy(st->lt);
	free(st);
	cu->matmul = NULL;
}

#endif /* LP_CUDA_EMU */

void lp_cuda_matmul(void *ctx, struct lp_tensor *out, const struct lp_tensor *x,
                    const struct lp_tensor *w, bool accumulate)
{
	struct lp_cuda *cu = (struct lp_cuda *)ctx;
	int64_t n = x->rows, k = x->cols, m = w->rows;
	size_t ws_bytes = cu->ws_bytes[LP_CUDA_WS_MATMUL];
	size_t x_bytes, cublas_off;
	void *ws = cu->ws[LP_CUDA_WS_MATMUL];
	cudaError_t e;

	if (lp_cuda_failed(cu))
		return;
	LP_CUDA_REQUIRE(cu, x->type == LP_DTYPE_F32 && out->type == LP_DTYPE_F32, "matmul");
	LP_CUDA_REQUIRE(cu, w->type == LP_DTYPE_F16 || w->type == LP_DTYPE_BF16, "matmul");
	LP_CUDA_REQUIRE(cu, w->cols == k && out->rows == n && out->cols == m, "matmul");
	if (n == 0 || m == 0)
		return;
	if (k == 0) {
		if (!accumulate)
			LP_CUDA_CHECK(cu,
			              cudaMemsetAsync(out->data, 0, (size_t)(n * m) * sizeof(float),
			                              cu->stream));
		return;
	}
	x_bytes = round_up((size_t)(n * k) * 2, LP_GEMM_WS_ALIGN);
	/* x in half precision, then cuBLASLt's part at the end */
	LP_CUDA_REQUIRE(cu, ws && ws_bytes >= LP_GEMM_CUBLAS_WS + x_bytes, "matmul");
#ifndef LP_CUDA_EMU
	LP_CUDA_REQUIRE(cu, cu->matmul != NULL, "matmul");
#endif
	if (w->type == LP_DTYPE_BF16)
		e = to_half_launch(cu, (__nv_bfloat16 *)ws, (const float *)x->data, n * k);
	else
		e = to_half_launch(cu, (__half *)ws, (const float *)x->data, n * k);
	cu->launches++;
	if (!LP_CUDA_CHECK(cu, e))
		return;
	cublas_off = (ws_bytes - LP_GEMM_CUBLAS_WS) / LP_GEMM_WS_ALIGN * LP_GEMM_WS_ALIGN;
	e = gemm_run(cu, (float *)out->data, ws, w, n, m, k, accumulate, (char *)ws + cublas_off,
	             ws_bytes - cublas_off);
	LP_CUDA_CHECK(cu, e);
}
