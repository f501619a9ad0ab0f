/* The element-wise and row-wise ops of a forward pass on CUDA: get_rows
 * (embedding lookup and the gather of rows for the logits), rmsnorm,
 * add_bias, add, silu_mul, gelu_mul and scale. Semantics: kernels/backend.h; the CPU
 * backend (kernels/cpu/backend-cpu.c) is the reference.
 *
 * Every kernel computes a row (or an element) from that row alone, with a
 * launch geometry that depends on the row width and never on the row
 * count, so a row's result is the same in a batch of any size. */
#include "kernels/cuda/elementwise.cuh"
#include "kernels/cuda/ops.cuh"

#include <errno.h>

/* get_rows */

/* out [n, cols] f32 = table [rows, cols] (f32, f16 or bf16) gathered by
 * ids; one block per output row. An id outside the table gives a zero row
 * and LP_CUDA_BAD_ID. */
// lp: hot
template <typename T, int VEC>
__global__ void get_rows_kernel(float *__restrict__ out, const T *__restrict__ table,
                                int64_t table_rows, int64_t cols, const int32_t *__restrict__ ids,
                                unsigned *bad)
{
	const int64_t r = blockIdx.x;
	const int32_t id = ids[r];
	float *o = out + r * cols;

	if (id < 0 || id >= table_rows) {
		if (threadIdx.x == 0)
			lp_cuda_flag(bad, LP_CUDA_BAD_ID);
		for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
			o[c] = 0.0f;
		return;
	}
	const T *src = table + (int64_t)id * cols;
	if (VEC == 4) {
		for (int64_t c = (int64_t)threadIdx.x * 4; c < cols; c += (int64_t)blockDim.x * 4)
			lp_cuda_store4(o, c, lp_cuda_load4(src, c));
	} else {
		for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
			o[c] = lp_cuda_load(src, c);
	}
}

template <typename T>
static cudaError_t get_rows_launch(cudaStream_t stream, float *out, const T *table,
                                   int64_t table_rows, int64_t cols, const int32_t *ids, int n,
                                   unsigned *bad)
{
	bool vec = cols % 4 == 0 && lp_cuda_aligned4(out, sizeof(float)) &&
	           lp_cuda_aligned4(table, sizeof(T));
	int threads = lp_cuda_row_threads(vec ? cols / 4 : cols);

	auto kernel = vec ? get_rows_kernel<T, 4> : get_rows_kernel<T, 1>;

	LP_LAUNCH(n, threads, 0, stream, kernel)(out, table, table_rows, cols, ids, bad);
	return cudaGetLastError();
}

void lp_cuda_get_rows(void *ctx, struct lp_tensor *out, const struct lp_tensor *table,
                      const int32_t *ids, int n)
{
	struct lp_cuda *cu = (struct lp_cuda *)ctx;
	cudaError_t e;

	if (lp_cuda_failed(cu))
		return;
	LP_CUDA_REQUIRE(cu, out->type == LP_DTYPE_F32, "get_rows");
	LP_CUDA_REQUIRE(cu,
	                table->type == LP_DTYPE_F32 || table->type == LP_DTYPE_F16 ||
	                    table->type == LP_DTYPE_BF16,
	                "get_rows");
	LP_CUDA_REQUIRE(cu, out->cols == table->cols, "get_rows");
	LP_CUDA_REQUIRE(cu, n >= 0 && out->rows >= n, "get_rows");
	if (n == 0 || out->cols == 0)
		return;
	switch (table->type) {
	case LP_DTYPE_F16:
		e = get_rows_launch(cu->stream, (float *)out->data, (const __half *)table->data,
		                    table->rows, table->cols, ids, n, cu->bad);
		break;
	case LP_DTYPE_BF16:
		e = get_rows_launch(cu->stream, (float *)out->data,
		                    (const __nv_bfloat16 *)table->data, table->rows, table->cols,
		                    ids, n, cu->bad);
		break;
	default:
		e = get_rows_launch(cu->stream, (float *)out->data, (const float *)table->data,
		                    table->rows, table->cols, ids, n, cu->bad);
		break;
	}
	cu->launches++;
	LP_CUDA_CHECK(cu, e);
}

/* rmsnorm */

/* Sum of v over the 32 lanes of a warp, in the same butterfly order on
 * every lane (so every lane holds the same bits). */
static __device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
	for (int off = 16; off > 0; off >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, off);
	return v;
}

/* Sum of squares of one row by `lanes` threads (a warp or a block): each
 * thread sums its own elements in order, then the threads' partial sums
 * meet in a fixed tree. */
template <int VEC>
static __device__ __forceinline__ float row_sum_squares(const float *x, int64_t cols, int lane,
                                                        int lanes)
{
	float ss = 0.0f;

	if (VEC == 4) {
		for (int64_t c = (int64_t)lane * 4; c < cols; c += (int64_t)lanes * 4) {
			float4 v = lp_cuda_load4(x, c);
			ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
		}
	} else {
		for (int64_t c = lane; c < cols; c += lanes)
			ss += x[c] * x[c];
	}
	return ss;
}

template <int VEC>
static __device__ __forceinline__ void row_scale(float *o, const float *x, const float *w,
                                                 int64_t cols, float inv, int lane, int lanes)
{
	if (VEC == 4) {
		for (int64_t c = (int64_t)lane * 4; c < cols; c += (int64_t)lanes * 4) {
			float4 v = lp_cuda_load4(x, c), g = lp_cuda_load4(w, c);
			lp_cuda_store4(o, c,
			               make_float4(g.x * (v.x * inv), g.y * (v.y * inv),
			                           g.z * (v.z * inv), g.w * (v.w * inv)));
		}
	} else {
		for (int64_t c = lane; c < cols; c += lanes)
			o[c] = w[c] * (x[c] * inv);
	}
}

/* Narrow rows (cols <= LP_RMSNORM_WARP_COLS, e.g. per-head q/k norms):
 * a warp per row, LP_RMSNORM_WARP_ROWS rows per block. out may equal x:
 * each lane rewrites only the elements it read. */
#define LP_RMSNORM_WARP_COLS 1024
#define LP_RMSNORM_WARP_ROWS 4

// lp: hot
template <int VEC>
__global__ void rmsnorm_warp_kernel(float *out, const float *x, const float *__restrict__ w,
                                    int64_t rows, int64_t cols, float eps)
{
	const int64_t r = (int64_t)blockIdx.x * LP_RMSNORM_WARP_ROWS + threadIdx.x / 32;
	const int lane = threadIdx.x % 32;

	if (r >= rows)
		return; /* the whole warp leaves: no lane of it is in a shuffle */
	float ss = warp_sum(row_sum_squares<VEC>(x + r * cols, cols, lane, 32));
	float inv = rsqrtf(ss / (float)cols + eps);
	row_scale<VEC>(out + r * cols, x + r * cols, w, cols, inv, lane, 32);
}

/* Wide rows: a block per row; warps reduce by shuffles, then the first
 * warp reduces the warps' sums. */
#define LP_RMSNORM_BLOCK 256

// lp: hot
template <int VEC>
__global__ void __launch_bounds__(LP_RMSNORM_BLOCK)
    rmsnorm_block_kernel(float *out, const float *x, const float *__restrict__ w, int64_t cols,
                         float eps)
{
	__shared__ float partial[LP_RMSNORM_BLOCK / 32];
	__shared__ float total;
	const int64_t r = blockIdx.x;
	const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

	float ss = warp_sum(row_sum_squares<VEC>(x + r * cols, cols, threadIdx.x, blockDim.x));
	if (lane == 0)
		partial[warp] = ss;
	__syncthreads();
	if (warp == 0) {
		ss = warp_sum(lane < LP_RMSNORM_BLOCK / 32 ? partial[lane] : 0.0f);
		if (lane == 0)
			total = ss;
	}
	__syncthreads();
	float inv = rsqrtf(total / (float)cols + eps);
	row_scale<VEC>(out + r * cols, x + r * cols, w, cols, inv, threadIdx.x, blockDim.x);
}

static cudaError_t rmsnorm_launch(cudaStream_t stream, float *out, const float *x, const float *w,
                                  int64_t rows, int64_t cols, float eps)
{
	bool vec = cols % 4 == 0 && lp_cuda_aligned4(out, sizeof(float)) &&
	           lp_cuda_aligned4(x, sizeof(float)) && lp_cuda_aligned4(w, sizeof(float));

	if (cols <= LP_RMSNORM_WARP_COLS) {
		unsigned blocks =
		    (unsigned)((rows + LP_RMSNORM_WARP_ROWS - 1) / LP_RMSNORM_WARP_ROWS);
		auto kernel = vec ? rmsnorm_warp_kernel<4> : rmsnorm_warp_kernel<1>;

		LP_LAUNCH(blocks, 32 * LP_RMSNORM_WARP_ROWS, 0, stream, kernel)
		(out, x, w, rows, cols, eps);
	} else {
		auto kernel = vec ? rmsnorm_block_kernel<4> : rmsnorm_block_kernel<1>;

		LP_LAUNCH((unsigned)rows, LP_RMSNORM_BLOCK, 0, stream, kernel)
		(out, x, w, cols, eps);
	}
	return cudaGetLastError();
}

void lp_cuda_rmsnorm(void *ctx, struct lp_tensor *out, const struct lp_tensor *x,
                     const struct lp_tensor *w, float eps)
{
	struct lp_cuda *cu = (struct lp_cuda *)ctx;

	if (lp_cuda_failed(cu))
		return;
	LP_CUDA_REQUIRE(
	    cu, out->type == LP_DTYPE_F32 && x->type == LP_DTYPE_F32 && w->type == LP_DTYPE_F32,
	    "rmsnorm");
	LP_CUDA_REQUIRE(cu, out->rows == x->rows && out->cols == x->cols, "rmsnorm");
	LP_CUDA_REQUIRE(cu, w->cols == x->cols && w->rows >= 1, "rmsnorm");
	/* one block per row in the wide case: grid.x holds 2^31 - 1 */
	LP_CUDA_REQUIRE(cu, x->rows < (int64_t)1 << 31, "rmsnorm");
	if (x->rows == 0 || x->cols == 0)
		return;
	cudaError_t e = rmsnorm_launch(cu->stream, (float *)out->data, (const float *)x->data,
	                               (const float *)w->data, x->rows, x->cols, eps);
	cu->launches++;
	LP_CUDA_CHECK(cu, e);
}

/* add_bias: x [rows, cols] += bias [cols]. Blocks of a row's columns
 * (grid.x) by rows (grid.y, striding when there are more rows than
 * grid.y holds). */
// lp: hot
template <int VEC>
__global__ void add_bias_kernel(float *__restrict__ x, const float *__restrict__ bias, int64_t rows,
                                int64_t cols)
{
	const int64_t c = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC;

	if (c >= cols)
		return;
	if (VEC == 4) {
		float4 b = lp_cuda_load4(bias, c);
		for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
			float4 v = lp_cuda_load4(x, r * cols + c);
			lp_cuda_store4(x, r * cols + c,
			               make_float4(v.x + b.x, v.y + b.y, v.z + b.z, v.w + b.w));
		}
	} else {
		float b = bias[c];
		for (int64_t r = blockIdx.y; r < rows; r += gridDim.y)
			x[r * cols + c] += b;
	}
}

void lp_cuda_add_bias(void *ctx, struct lp_tensor *x, const struct lp_tensor *bias)
{
	struct lp_cuda *cu = (struct lp_cuda *)ctx;

	if (lp_cuda_failed(cu))
		return;
	LP_CUDA_REQUIRE(cu, x->type == LP_DTYPE_F32 && bias->type == LP_DTYPE_F32, "add_bias");
	LP_CUDA_REQUIRE(cu, bias->cols == x->cols && bias->rows >= 1, "add_bias");
	if (x->rows == 0 || x->cols == 0)
		return;

	float *xp = (float *)x->data;
	const float *bp = (const float *)bias->data;
	int64_t rows = x->rows, cols = x->cols;
	bool vec = cols % 4 == 0 && lp_cuda_aligned4(xp, sizeof(float)) &&
	           lp_cuda_aligned4(bp, sizeof(float));
	int64_t per_row = vec ? cols / 4 : cols;
	int threads = lp_cuda_row_threads(per_row);
	dim3 grid((unsigned)((per_row + threads - 1) / threads),
	          (unsigned)(rows < 65535 ? rows : 65535));

	LP_CUDA_REQUIRE(cu, per_row / threads < (int64_t)1 << 31, "add_bias");
	auto kernel = vec ? add_bias_kernel<4> : add_bias_kernel<1>;

	LP_LAUNCH(grid, threads, 0, cu->stream, kernel)(xp, bp, rows, cols);
	cu->launches++;
	LP_CUDA_CHECK(cu, cudaGetLastError());
}

/* add and silu_mul: element-wise over n contiguous floats, a grid-stride
 * loop of 4-element steps (the last one partial) or of single elements. */

// lp: hot
template <int VEC> __global__ void add_kernel(float *y, const float *x, int64_t n)
{
	const int64_t stride = (int64_t)gridDim.x * blockDim.x * VEC;

	for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < n;
	     i += stride) {
		if (VEC == 4 && i + 4 <= n) {
			float4 a = lp_cuda_load4(y, i), b = lp_cuda_load4(x, i);
			lp_cuda_store4(y, i,
			               make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w));
		} else {
			for (int64_t j = i; j < i + VEC && j < n; j++)
				y[j] += x[j];
		}
	}
}

void lp_cuda_add(void *ctx, struct lp_tensor *y, const struct lp_tensor *x)
{
	struct lp_cuda *cu = (struct lp_cuda *)ctx;

	if (lp_cuda_failed(cu))
		return;
	LP_CUDA_REQUIRE(cu, x->type == LP_DTYPE_F32 && y->type == LP_DTYPE_F32, "add");
	LP_CUDA_REQUIRE(cu, y->rows == x->rows && y->cols == x->cols, "add");

	int64_t n = y->rows * y->cols;
	float *yp = (float *)y->data;
	const float *xp = (const float *)x->data;

	if (n == 0)
		return;
	bool vec = lp_cuda_aligned4(yp, sizeof(float)) && lp_cuda_aligned4(xp, sizeof(float));
	unsigned blocks = lp_cuda_stride_blocks(cu, vec ? (n + 3) / 4 : n, LP_CUDA_EW_THREADS);

	auto kernel = vec ? add_kernel<4> : add_kernel<1>;

	LP_LAUNCH(blocks, LP_CUDA_EW_THREADS, 0, cu->stream, kernel)(yp, xp, n);
	cu->launches++;
	LP_CUDA_CHECK(cu, cudaGetLastError());
}

/* silu(g) * u = g / (1 + e^-g) * u, as the CPU writes it; expf (not
 * __expf) for its ~2 ulp accuracy over the whole range. */
static __device__ __forceinline__ float silu_mul1(float g, float u)
{
	return g / (1.0f + expf(-g)) * u;
}

/* gelu_tanh(g) * u as the CPU writes it (PyTorch's approximate="tanh");
 * tanhf (not a fast approximation) for the same accuracy. */
static __device__ __forceinline__ float gelu_mul1(float g, float u)
{
	const float beta = 0.7978845608028654f; /* sqrt(2 / pi) */
	float inner = beta * (g + 0.044715f * g * g * g);

	return 0.5f * g * (1.0f + tanhf(inner)) * u;
}

enum glu_act { GLU_SILU, GLU_GELU_TANH };

template <int ACT> static __device__ __forceinline__ float glu1(float g, float u)
{
	return ACT == GLU_SILU ? silu_mul1(g, u) : gelu_mul1(g, u);
}

/* act(gate) * up element-wise. out may equal gate: each element is read
 * before it is written, by the same thread. */
// lp: hot
template <int ACT, int VEC>
__global__ void glu_mul_kernel(float *out, const float *gate, const float *__restrict__ up,
                               int64_t n)
{
	const int64_t stride = (int64_t)gridDim.x * blockDim.x * VEC;

	for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < n;
	     i += stride) {
		if (VEC == 4 && i + 4 <= n) {
			float4 g = lp_cuda_load4(gate, i), u = lp_cuda_load4(up, i);
			lp_cuda_store4(out, i,
			               make_float4(glu1<ACT>(g.x, u.x), glu1<ACT>(g.y, u.y),
			                           glu1<ACT>(g.z, u.z), glu1<ACT>(g.w, u.w)));
		} else {
			for (int64_t j = i; j < i + VEC && j < n; j++)
				out[j] = glu1<ACT>(gate[j], up[j]);
		}
	}
}

/* The op entry of silu_mul and gelu_mul: shapes, then the kernel. */
template <int ACT>
static void glu_mul(void *ctx, struct lp_tensor *out, const struct lp_tensor *gate,
                    const struct lp_tensor *up, const char *name)
{
	struct lp_cuda *cu = (struct lp_cuda *)ctx;

	if (lp_cuda_failed(cu))
		return;
	LP_CUDA_REQUIRE(
	    cu, out->type == LP_DTYPE_F32 && gate->type == LP_DTYPE_F32 && up->type == LP_DTYPE_F32,
	    name);
	LP_CUDA_REQUIRE(cu, out->rows == gate->rows && out->cols == gate->cols, name);
	LP_CUDA_REQUIRE(cu, up->rows == gate->rows && up->cols == gate->cols, name);

	int64_t n = gate->rows * gate->cols;
	float *op = (float *)out->data;
	const float *gp = (const float *)gate->data, *upp = (const float *)up->data;

	if (n == 0)
		return;
	bool vec = lp_cuda_aligned4(op, sizeof(float)) && lp_cuda_aligned4(gp, sizeof(float)) &&
	           lp_cuda_aligned4(upp, sizeof(float));
	unsigned blocks = lp_cuda_stride_blocks(cu, vec ? (n + 3) / 4 : n, LP_CUDA_EW_THREADS);

	auto kernel = vec ? glu_mul_kernel<ACT, 4> : glu_mul_kernel<ACT, 1>;

	LP_LAUNCH(blocks, LP_CUDA_EW_THREADS, 0, cu->stream, kernel)(op, gp, upp, n);
	cu->launches++;
	LP_CUDA_CHECK(cu, cudaGetLastError());
}

void lp_cuda_silu_mul(void *ctx, struct lp_tensor *out, const struct lp_tensor *gate,
                      const struct lp_tensor *up)
{
	glu_mul<GLU_SILU>(ctx, out, gate, up, "silu_mul");
}

void lp_cuda_gelu_mul(void *ctx, struct lp_tensor *out, const struct lp_tensor *gate,
                      const struct lp_tensor *up)
{
	glu_mul<GLU_GELU_TANH>(ctx, out, gate, up, "gelu_mul");
}

/* x *= s */
// lp: hot
template <int VEC> __global__ void scale_kernel(float *x, float s, int64_t n)
{
	const int64_t stride = (int64_t)gridDim.x * blockDim.x * VEC;

	for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < n;
	     i += stride) {
		if (VEC == 4 && i + 4 <= n) {
			float4 a = lp_cuda_load4(x, i);
			lp_cuda_store4(x, i, make_float4(a.x * s, a.y * s, a.z * s, a.w * s));
		} else {
			for (int64_t j = i; j < i + VEC && j < n; j++)
				x[j] *= s;
		}
	}
}

void lp_cuda_scale(void *ctx, struct lp_tensor *x, float s)
{
	struct lp_cuda *cu = (struct lp_cuda *)ctx;

	if (lp_cuda_failed(cu))
		return;
	LP_CUDA_REQUIRE(cu, x->type == LP_DTYPE_F32, "scale");

	int64_t n = x->rows * x->cols;
	float *xp = (float *)x->data;

	if (n == 0)
		return;
	bool vec = lp_cuda_aligned4(xp, sizeof(float));
	unsigned blocks = lp_cuda_stride_blocks(cu, vec ? (n + 3) / 4 : n, LP_CUDA_EW_THREADS);

	auto kernel = vec ? scale_kernel<4> : scale_kernel<1>;

	LP_LAUNCH(blocks, LP_CUDA_EW_THREADS, 0, cu->stream, kernel)(xp, s, n);
	cu->launches++;
	LP_CUDA_CHECK(cu, cudaGetLastError());
}
