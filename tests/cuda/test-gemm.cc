/* CUDA matmul (gemm.cu) and weight conversion (convert.cu), run through the
 * emulation layer (or a real device): products against a reference of the
 * same half-precision inputs and against the CPU backend, batch
 * invariance bit for bit, accumulate, the workspace contract, and the
 * conversion of every source type bit for bit against lp_dequantize_row
 * plus round to nearest even. */
#include "kernels/cuda/ops.cuh"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tests/test.h"

static struct lp_cuda cu;
static struct lp_backend *cpu;

/* device buffers between canaries */

#define CANARY      256
#define CANARY_BYTE 0xa5

struct dev {
	char *base;
	size_t bytes;
	void *p;
};

static bool dev_alloc(struct dev *d, size_t bytes)
{
	memset(d, 0, sizeof(*d));
	if (cudaMalloc((void **)&d->base, bytes + 2 * CANARY) != cudaSuccess ||
	    cudaMemset(d->base, CANARY_BYTE, bytes + 2 * CANARY) != cudaSuccess ||
	    cudaDeviceSynchronize() != cudaSuccess)
		return false;
	d->bytes = bytes;
	d->p = d->base + CANARY;
	return true;
}

static void dev_free(struct dev *d)
{
	if (d->base)
		cudaFree(d->base);
	memset(d, 0, sizeof(*d));
}

/* Synchronizes the device after the copy: ops run on cu.stream, a
 * non-blocking stream that does not wait for the legacy stream's copies. */
static bool dev_put(struct dev *d, const void *host)
{
	return cudaMemcpy(d->p, host, d->bytes, cudaMemcpyHostToDevice) == cudaSuccess &&
	       cudaDeviceSynchronize() == cudaSuccess;
}

static bool dev_get_at(const struct dev *d, size_t off, void *host, size_t n)
{
	return cudaStreamSynchronize(cu.stream) == cudaSuccess &&
	       cudaMemcpy(host, (char *)d->p + off, n, cudaMemcpyDeviceToHost) == cudaSuccess;
}

static bool dev_get(const struct dev *d, void *host)
{
	return dev_get_at(d, 0, host, d->bytes);
}

static bool dev_canaries_ok(const struct dev *d)
{
	size_t total = d->bytes + 2 * CANARY;
	unsigned char *h = (unsigned char *)malloc(total);
	bool ok = h != NULL && cudaStreamSynchronize(cu.stream) == cudaSuccess &&
	          cudaMemcpy(h, d->base, total, cudaMemcpyDeviceToHost) == cudaSuccess;

	for (size_t i = 0; ok && i < total; i++)
		if ((i < CANARY || i >= CANARY + d->bytes) && h[i] != CANARY_BYTE)
			ok = false;
	free(h);
	return ok;
}

static struct lp_tensor tensor(void *p, enum lp_dtype t, int64_t rows, int64_t cols)
{
	struct lp_tensor v = {p, t, rows, cols};
	return v;
}

static void reset_context(void)
{
	cudaDeviceSynchronize();
	cu.status = 0;
	cu.status_msg[0] = 0;
}

static uint64_t rng_state = 0x2545f4914f6cdd1dull;

static uint32_t rng_u32(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return (uint32_t)(rng_state >> 16);
}

static float rng_float(float a)
{
	return ((float)(rng_u32() & 0xffffff) / (float)0x1000000 * 2.0f - 1.0f) * a;
}

static float *random_floats(size_t n, float a)
{
	float *v = (float *)malloc(n * sizeof(float) + 1);

	for (size_t i = 0; i < n; i++)
		v[i] = rng_float(a);
	return v;
}

static uint16_t to_half(enum lp_dtype t, float f)
{
	return t == LP_DTYPE_BF16 ? lp_f32_to_bf16(f) : lp_f32_to_f16(f);
}

static float from_half(enum lp_dtype t, uint16_t h)
{
	return t == LP_DTYPE_BF16 ? lp_bf16_to_f32(h) : lp_f16_to_f32(h);
}

/* matmul */

/* The limits the workspace is sized for: x up to 300 rows of up to 1024
 * columns. */
static struct lp_backend_limits limits(void)
{
	struct lp_backend_limits lim;

	memset(&lim, 0, sizeof(lim));
	lim.dim = 256;
	lim.ffn_dim = 1024;
	lim.n_heads = 4;
	lim.n_kv_heads = 2;
	lim.head_dim = 64;
	lim.vocab = 500;
	lim.max_tokens = 300;
	return lim;
}

struct problem {
	enum lp_dtype type;
	int64_t n, m, k;
	float *x;    /* [n, k] f32 */
	uint16_t *w; /* [m, k] of type */
	double *ref; /* [n, m]: sum of half(x) * w in double */
	double *mag; /* [n, m]: sum of |half(x) * w| */
	double *cpu_mag;
	struct dev xd, wd;
};

static void problem_init(struct problem *p, enum lp_dtype type, int64_t n, int64_t m, int64_t k)
{
	p->type = type;
	p->n = n, p->m = m, p->k = k;
	p->x = random_floats((size_t)(n * k), 2.0f);
	p->w = (uint16_t *)malloc((size_t)(m * k) * 2 + 1);
	for (int64_t i = 0; i < m * k; i++)
		p->w[i] = to_half(type, rng_float(1.0f));
	p->ref = (double *)malloc((size_t)(n * m) * sizeof(double) + 1);
	p->mag = (double *)malloc((size_t)(n * m) * sizeof(double) + 1);
	for (int64_t i = 0; i < n; i++)
		for (int64_t j = 0; j < m; j++) {
			double s = 0, a = 0;
			for (int64_t l = 0; l < k; l++) {
				double xv = from_half(type, to_half(type, p->x[i * k + l]));
				double t = xv * from_half(type, p->w[j * k + l]);
				s += t;
				a += fabs(t);
			}
			p->ref[i * m + j] = s;
			p->mag[i * m + j] = a;
		}
	dev_alloc(&p->xd, (size_t)(n * k) * 4);
	dev_alloc(&p->wd, (size_t)(m * k) * 2);
	dev_put(&p->xd, p->x);
	dev_put(&p->wd, p->w);
}

static void problem_free(struct problem *p)
{
	free(p->x);
	free(p->w);
	free(p->ref);
	free(p->mag);
	dev_free(&p->xd);
	dev_free(&p->wd);
}

/* Tolerance against the reference of the same half inputs: f32
 * accumulation over k terms errs by at most about k * 2^-24 of the sum of
 * magnitudes (sequential sum bound); twice that, plus 1e-6 for tiny sums.
 * Against the CPU backend, which multiplies the f32 x by the same weights,
 * add x's rounding to half: 2^-11 (f16) or 2^-8 (bf16) of the magnitudes. */
static double tol_ref(const struct problem *p, int64_t i, int64_t j)
{
	return (double)p->k * ldexp(1.0, -23) * p->mag[i * p->m + j] + 1e-6;
}

static double tol_cpu(const struct problem *p, int64_t i, int64_t j)
{
	double xr = p->type == LP_DTYPE_BF16 ? ldexp(1.0, -8) : ldexp(1.0, -11);

	return tol_ref(p, i, j) + xr * p->mag[i * p->m + j] * 1.01;
}

/* Runs rows [row0, row0 + n) of p on CUDA into a fresh buffer; *out is
 * malloc'd [n, m]. */
static bool run_rows(struct problem *p, int64_t row0, int64_t n, float **out)
{
	struct dev od;
	bool ok;

	*out = (float *)malloc((size_t)(n * p->m) * 4 + 1);
	if (!dev_alloc(&od, (size_t)(n * p->m) * 4))
		return false;
	struct lp_tensor x = tensor((float *)p->xd.p + row0 * p->k, LP_DTYPE_F32, n, p->k);
	struct lp_tensor w = tensor(p->wd.p, p->type, p->m, p->k);
	struct lp_tensor o = tensor(od.p, LP_DTYPE_F32, n, p->m);
	lp_cuda_matmul(&cu, &o, &x, &w, false);
	ok = !lp_cuda_failed(&cu) && dev_get(&od, *out) && dev_canaries_ok(&od);
	dev_free(&od);
	return ok;
}

static void check_matmul(enum lp_dtype type, int64_t n, int64_t m, int64_t k)
{
	struct problem p;
	float *got = NULL, *want = NULL;

	problem_init(&p, type, n, m, k);
	reset_context();
	CHECK_MSG(run_rows(&p, 0, n, &got), "matmul %lldx%lldx%lld %s: %s", (long long)n,
	          (long long)m, (long long)k, lp_dtype_name(type), cu.status_msg);
	for (int64_t i = 0; i < n; i++)
		for (int64_t j = 0; j < m; j++)
			CHECK_MSG(fabs(got[i * m + j] - p.ref[i * m + j]) <= tol_ref(&p, i, j),
			          "%s n %lld m %lld k %lld [%lld, %lld]: %.9g, reference %.9g",
			          lp_dtype_name(type), (long long)n, (long long)m, (long long)k,
			          (long long)i, (long long)j, got[i * m + j], p.ref[i * m + j]);

	/* the CPU backend on the same weights and the f32 x */
	want = (float *)malloc((size_t)(n * m) * 4 + 1);
	struct lp_tensor xc = tensor(p.x, LP_DTYPE_F32, n, k), wc = tensor(p.w, type, m, k);
	struct lp_tensor oc = tensor(want, LP_DTYPE_F32, n, m);
	cpu->ops->matmul(cpu->ctx, &oc, &xc, &wc, false);
	for (int64_t i = 0; i < n; i++)
		for (int64_t j = 0; j < m; j++)
			CHECK_MSG(fabs(got[i * m + j] - want[i * m + j]) <= tol_cpu(&p, i, j),
			          "%s n %lld [%lld, %lld]: %.9g, cpu %.9g", lp_dtype_name(type),
			          (long long)n, (long long)i, (long long)j, got[i * m + j],
			          want[i * m + j]);
	CHECK(dev_canaries_ok(&p.xd) && dev_canaries_ok(&p.wd));
	free(got);
	free(want);
	problem_free(&p);
}

static void test_matmul(void)
{
	const enum lp_dtype types[] = {LP_DTYPE_F16, LP_DTYPE_BF16};
	const int64_t ns[] = {1, 7, 64, 300};
	const int64_t mk[][2] = {{96, 256}, {33, 64}, {130, 7}, {8, 1024}};

	for (int t = 0; t < 2; t++)
		for (size_t a = 0; a < sizeof(ns) / sizeof(ns[0]); a++)
			for (size_t b = 0; b < sizeof(mk) / sizeof(mk[0]); b++) {
				check_matmul(types[t], ns[a], mk[b][0], mk[b][1]);
				if (test_current_failed)
					return;
			}
}

/* Row i of a 300-row product has the same bits as the same row computed
 * alone, or in a batch of 7 or 64 at another place (backend.h's matmul
 * contract; gemm.cu explains how cuBLASLt is held to it). */
static void check_batch_invariance(enum lp_dtype type, int64_t m, int64_t k)
{
	struct problem p;
	float *all = NULL, *part = NULL;
	const int64_t singles[] = {0, 1, 2, 150, 298, 299};
	const int64_t groups[][2] = {{3, 7}, {200, 64}, {0, 64}, {293, 7}};

	problem_init(&p, type, 300, m, k);
	reset_context();
	CHECK_MSG(run_rows(&p, 0, 300, &all), "matmul: %s", cu.status_msg);
	for (size_t s = 0; s < sizeof(singles) / sizeof(singles[0]); s++) {
		CHECK_MSG(run_rows(&p, singles[s], 1, &part), "matmul: %s", cu.status_msg);
		CHECK_MSG(memcmp(part, all + singles[s] * m, (size_t)m * 4) == 0,
		          "%s %lldx%lld: row %lld alone differs from the same row of 300",
		          lp_dtype_name(type), (long long)m, (long long)k, (long long)singles[s]);
		free(part);
		part = NULL;
	}
	for (size_t g = 0; g < sizeof(groups) / sizeof(groups[0]); g++) {
		CHECK_MSG(run_rows(&p, groups[g][0], groups[g][1], &part), "matmul: %s",
		          cu.status_msg);
		CHECK_MSG(
		    memcmp(part, all + groups[g][0] * m, (size_t)(groups[g][1] * m) * 4) == 0,
		    "%s %lldx%lld: rows %lld..+%lld in a batch of %lld differ from a batch of 300",
		    lp_dtype_name(type), (long long)m, (long long)k, (long long)groups[g][0],
		    (long long)groups[g][1], (long long)groups[g][1]);
		free(part);
		part = NULL;
	}
	free(all);
	problem_free(&p);
}

static void test_batch_invariance(void)
{
	check_batch_invariance(LP_DTYPE_F16, 96, 256);
	if (!test_current_failed)
		check_batch_invariance(LP_DTYPE_BF16, 130, 1024);
	if (!test_current_failed)
		check_batch_invariance(LP_DTYPE_F16, 33, 7);
}

/* accumulate adds the product to what out holds. */
static void test_accumulate(void)
{
	const int64_t n = 64, m = 96, k = 256;
	struct problem p;
	struct dev od;
	float *init = random_floats((size_t)(n * m), 10.0f);
	float *got = (float *)malloc((size_t)(n * m) * 4);

	problem_init(&p, LP_DTYPE_F16, n, m, k);
	CHECK(dev_alloc(&od, (size_t)(n * m) * 4) && dev_put(&od, init));
	reset_context();
	struct lp_tensor x = tensor(p.xd.p, LP_DTYPE_F32, n, k), w = tensor(p.wd.p, p.type, m, k);
	struct lp_tensor o = tensor(od.p, LP_DTYPE_F32, n, m);
	lp_cuda_matmul(&cu, &o, &x, &w, true);
	CHECK_MSG(!lp_cuda_failed(&cu), "matmul: %s", cu.status_msg);
	CHECK(dev_get(&od, got));
	for (int64_t i = 0; i < n; i++)
		for (int64_t j = 0; j < m; j++) {
			double want = init[i * m + j] + p.ref[i * m + j];
			/* one more rounding, of the sum with out */
			double tol = tol_ref(&p, i, j) + fabs(want) * ldexp(1.0, -23);
			CHECK_MSG(fabs(got[i * m + j] - want) <= tol,
			          "[%lld, %lld]: %.9g, want %.9g", (long long)i, (long long)j,
			          got[i * m + j], want);
		}
	CHECK(dev_canaries_ok(&od));
	dev_free(&od);
	free(init);
	free(got);
	problem_free(&p);
}

/* k = 0: out becomes zero, or stays as it is with accumulate; n = 0 or
 * m = 0 launch nothing. */
static void test_matmul_edges(void)
{
	struct dev od, xd, wd;
	float init[12], got[12];
	uint64_t before;

	for (int i = 0; i < 12; i++)
		init[i] = (float)i + 0.5f;
	CHECK(dev_alloc(&od, sizeof(init)) && dev_alloc(&xd, 64) && dev_alloc(&wd, 64));
	CHECK(dev_put(&od, init));
	reset_context();
	struct lp_tensor x0 = tensor(xd.p, LP_DTYPE_F32, 3, 0),
	                 w0 = tensor(wd.p, LP_DTYPE_F16, 4, 0);
	struct lp_tensor o = tensor(od.p, LP_DTYPE_F32, 3, 4);
	lp_cuda_matmul(&cu, &o, &x0, &w0, true);
	CHECK(dev_get(&od, got) && memcmp(got, init, sizeof(init)) == 0);
	lp_cuda_matmul(&cu, &o, &x0, &w0, false);
	CHECK(dev_get(&od, got));
	for (int i = 0; i < 12; i++)
		CHECK(got[i] == 0.0f);

	before = cu.launches;
	struct lp_tensor xn = tensor(xd.p, LP_DTYPE_F32, 0, 8),
	                 wn = tensor(wd.p, LP_DTYPE_F16, 4, 8);
	struct lp_tensor on = tensor(od.p, LP_DTYPE_F32, 0, 4);
	lp_cuda_matmul(&cu, &on, &xn, &wn, false);
	CHECK_EQ_INT(cu.launches, before);
	CHECK_MSG(!lp_cuda_failed(&cu), "%s", cu.status_msg);
	CHECK(dev_canaries_ok(&od));
	dev_free(&od);
	dev_free(&xd);
	dev_free(&wd);
}

/* A product larger than the workspace reserve() sized is a recorded
 * failure naming matmul, not a write past the workspace; so are mismatched
 * shapes and an f32 weight. */
static void test_matmul_errors(void)
{
	struct dev xd, wd, od;
	const int64_t n = 301, k = 1024 * 2, m = 4; /* more than max_tokens x widest halves */

	CHECK(dev_alloc(&xd, (size_t)(n * k) * 4) && dev_alloc(&wd, (size_t)(m * k) * 4) &&
	      dev_alloc(&od, (size_t)(n * m) * 4));
	cudaMemset(xd.p, 0, xd.bytes);
	cudaMemset(wd.p, 0, wd.bytes);
	reset_context();
	struct lp_tensor x = tensor(xd.p, LP_DTYPE_F32, n, k), w = tensor(wd.p, LP_DTYPE_F16, m, k);
	struct lp_tensor o = tensor(od.p, LP_DTYPE_F32, n, m);
	lp_cuda_matmul(&cu, &o, &x, &w, false);
	CHECK(lp_cuda_failed(&cu));
	CHECK_MSG(strstr(cu.status_msg, "matmul:") && strstr(cu.status_msg, "ws_bytes"),
	          "message: %s", cu.status_msg);

	reset_context();
	struct lp_tensor wf = tensor(wd.p, LP_DTYPE_F32, m, k);
	struct lp_tensor x1 = tensor(xd.p, LP_DTYPE_F32, 1, k),
	                 o1 = tensor(od.p, LP_DTYPE_F32, 1, m);
	lp_cuda_matmul(&cu, &o1, &x1, &wf, false);
	CHECK_MSG(lp_cuda_failed(&cu) && strstr(cu.status_msg, "matmul:"), "message: %s",
	          cu.status_msg);
	reset_context();
	struct lp_tensor o2 = tensor(od.p, LP_DTYPE_F32, 1, m + 1);
	lp_cuda_matmul(&cu, &o2, &x1, &w, false);
	CHECK_MSG(lp_cuda_failed(&cu) && strstr(cu.status_msg, "matmul:"), "message: %s",
	          cu.status_msg);
	reset_context();
	CHECK(dev_canaries_ok(&od));
	dev_free(&xd);
	dev_free(&wd);
	dev_free(&od);
}

static void test_matmul_workspace(void)
{
	struct lp_backend_limits lim = limits();
	size_t cublas = lp_cuda_matmul_workspace(&lim) - (size_t)300 * 1024 * 2;

	/* max_tokens x the widest input in halves, plus a fixed cuBLAS part */
	CHECK(cublas >= (size_t)4 << 20);
	lim.ffn_dim = 4096;
	CHECK_EQ_INT(lp_cuda_matmul_workspace(&lim), (size_t)300 * 4096 * 2 + cublas);
	lim.n_heads = 64;
	lim.head_dim = 128;
	CHECK_EQ_INT(lp_cuda_matmul_workspace(&lim), (size_t)300 * 8192 * 2 + cublas);
	lim.max_tokens = 0;
	CHECK_EQ_INT(lp_cuda_matmul_workspace(&lim), cublas);
}

/* convert */

/* rows x cols host weights of type t, random but finite */
static void *make_weights(enum lp_dtype t, int64_t rows, int64_t cols, float scale)
{
	size_t bytes = (size_t)rows * lp_dtype_row_bytes(t, cols);
	unsigned char *b = (unsigned char *)malloc(bytes + 1);
	int64_t n = rows * cols;

	switch (t) {
	case LP_DTYPE_F32:
		for (int64_t i = 0; i < n; i++)
			((float *)b)[i] = rng_float(scale);
		break;
	case LP_DTYPE_F16:
	case LP_DTYPE_BF16:
		for (int64_t i = 0; i < n; i++)
			((uint16_t *)b)[i] = to_half(t, rng_float(scale));
		break;
	default: /* quantized: random quants, scales (and minimums) as f16 */
		for (size_t i = 0; i < bytes; i++)
			b[i] = (unsigned char)rng_u32();
		for (int64_t blk = 0; blk < n / lp_dtype_block(t); blk++) {
			unsigned char *p = b + blk * lp_dtype_block_bytes(t);
			/* the K-quants multiply d by a sub-block scale of up to 63
			 * (Q6_K: 128) */
			float ds =
			    lp_dtype_block(t) == LP_QK_K ? scale / 8.0f / 128.0f : scale / 8.0f;
			uint16_t d = lp_f32_to_f16(rng_float(ds)),
			         m = lp_f32_to_f16(rng_float(scale));
			if (t == LP_DTYPE_Q6_K) { /* d last */
				memcpy(p + 208, &d, 2);
				continue;
			}
			memcpy(p, &d, 2);
			if (t == LP_DTYPE_Q4_1 || t == LP_DTYPE_Q5_1)
				memcpy(p + 2, &m, 2);
			if (t == LP_DTYPE_Q4_K || t == LP_DTYPE_Q5_K) { /* dmin, also scaled */
				m = lp_f32_to_f16(rng_float(ds));
				memcpy(p + 2, &m, 2);
			}
		}
		break;
	}
	return b;
}

/* what convert must produce: the source's own bits for f16 and bf16, else
 * lp_dequantize_row then round to nearest even f16 */
static uint16_t *expected_halves(enum lp_dtype t, const void *host, int64_t rows, int64_t cols)
{
	uint16_t *h = (uint16_t *)malloc((size_t)(rows * cols) * 2 + 1);
	float *row = (float *)malloc((size_t)cols * 4 + 1);

	for (int64_t r = 0; r < rows; r++) {
		const char *src = (const char *)host + (size_t)r * lp_dtype_row_bytes(t, cols);
		if (t == LP_DTYPE_F16 || t == LP_DTYPE_BF16) {
			memcpy(h + r * cols, src, (size_t)cols * 2);
			continue;
		}
		lp_dequantize_row(t, src, row, cols);
		for (int64_t c = 0; c < cols; c++)
			h[r * cols + c] = lp_f32_to_f16(row[c]);
	}
	free(row);
	return h;
}

static void check_convert(enum lp_dtype t, int64_t rows, int64_t cols, size_t staging_bytes)
{
	void *host = make_weights(t, rows, cols, 4.0f);
	uint16_t *want = expected_halves(t, host, rows, cols);
	uint16_t *got = (uint16_t *)malloc((size_t)(rows * cols) * 2 + 1);
	void *staging = NULL;
	struct dev dd;
	struct lp_err err;

	CHECK(cudaMallocHost(&staging, staging_bytes) == cudaSuccess);
	CHECK(dev_alloc(&dd, (size_t)(rows * cols) * 2));
	reset_context();
	CHECK_OK(
	    lp_cuda_convert_weight(&cu, dd.p, host, t, rows, cols, staging, staging_bytes, &err),
	    &err);
	CHECK(dev_get(&dd, got));
	for (int64_t i = 0; i < rows * cols; i++)
		CHECK_MSG(got[i] == want[i],
		          "%s %lldx%lld staging %zu: element %lld is 0x%04x, want 0x%04x",
		          lp_dtype_name(t), (long long)rows, (long long)cols, staging_bytes,
		          (long long)i, got[i], want[i]);
	CHECK(dev_canaries_ok(&dd));
	CHECK(!lp_cuda_failed(&cu));
	cudaFreeHost(staging);
	dev_free(&dd);
	free(host);
	free(want);
	free(got);
}

static void test_convert(void)
{
	const enum lp_dtype types[] = {LP_DTYPE_F32,  LP_DTYPE_F16,  LP_DTYPE_BF16, LP_DTYPE_Q8_0,
	                               LP_DTYPE_Q4_0, LP_DTYPE_Q4_1, LP_DTYPE_Q5_0, LP_DTYPE_Q5_1};
	const enum lp_dtype k_types[] = {LP_DTYPE_Q4_K, LP_DTYPE_Q5_K, LP_DTYPE_Q6_K};

	/* K-quants, blocks of 256: 1024 bytes of staging hold one block per
	 * half; with 2048, pieces of 512 weights cut 768-wide rows */
	for (size_t t = 0; t < sizeof(k_types) / sizeof(k_types[0]); t++) {
		CHECK_EQ_INT(lp_cuda_weight_type(k_types[t]), LP_DTYPE_F16);
		check_convert(k_types[t], 37, 512, 1024);
		if (!test_current_failed)
			check_convert(k_types[t], 37, 512, (size_t)1 << 20);
		if (!test_current_failed)
			check_convert(k_types[t], 1, 256, 4096);
		if (!test_current_failed)
			check_convert(k_types[t], 30, 768, 2048);
		if (test_current_failed)
			return;
	}
	for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
		CHECK_EQ_INT(lp_cuda_weight_type(types[t]),
		             types[t] == LP_DTYPE_BF16 ? LP_DTYPE_BF16 : LP_DTYPE_F16);
		/* 128 bytes of staging: one 32-weight block per half, many pieces */
		check_convert(types[t], 37, 96, 128);
		if (!test_current_failed)
			check_convert(types[t], 37, 96, (size_t)1 << 20);
		if (!test_current_failed)
			check_convert(types[t], 1, 32, 4096);
		if (!test_current_failed)
			check_convert(types[t], 300, 64, 1000); /* pieces cut rows in the middle */
		if (test_current_failed)
			return;
	}
}

/* Bad input is an error returned, never a sticky device failure: a value
 * outside f16's range, a width that is not whole blocks, staging smaller
 * than a block, an i32 "weight". */
static void test_convert_errors(void)
{
	float w[64];
	void *staging = NULL;
	struct dev dd;
	struct lp_err err;

	for (int i = 0; i < 64; i++)
		w[i] = (float)i;
	w[37] = 70000.0f;
	CHECK(cudaMallocHost(&staging, 4096) == cudaSuccess);
	CHECK(dev_alloc(&dd, 128));
	reset_context();
	CHECK_EQ_INT(lp_cuda_convert_weight(&cu, dd.p, w, LP_DTYPE_F32, 2, 32, staging, 4096, &err),
	             -ERANGE);
	CHECK_MSG(strstr(err.msg, "[1, 5]") && strstr(err.msg, "70000"), "message: %s", err.msg);
	CHECK_EQ_INT(
	    lp_cuda_convert_weight(&cu, dd.p, w, LP_DTYPE_Q4_0, 1, 33, staging, 4096, &err),
	    -EINVAL);
	CHECK_EQ_INT(lp_cuda_convert_weight(&cu, dd.p, w, LP_DTYPE_Q8_0, 1, 32, staging, 100, &err),
	             -EINVAL);
	CHECK_EQ_INT(lp_cuda_convert_weight(&cu, dd.p, w, LP_DTYPE_I32, 1, 8, staging, 4096, &err),
	             -EINVAL);
	/* K-quants: rows of whole 256-weight blocks, staging for a block */
	CHECK_EQ_INT(
	    lp_cuda_convert_weight(&cu, dd.p, w, LP_DTYPE_Q4_K, 1, 288, staging, 4096, &err),
	    -EINVAL);
	CHECK_EQ_INT(
	    lp_cuda_convert_weight(&cu, dd.p, w, LP_DTYPE_Q6_K, 1, 256, staging, 1000, &err),
	    -EINVAL);
	CHECK_MSG(strstr(err.msg, "q6_k block") != NULL, "message: %s", err.msg);
	CHECK(!lp_cuda_failed(&cu));
	CHECK(dev_canaries_ok(&dd));
	cudaFreeHost(staging);
	dev_free(&dd);
}

/* A K-quant weight beyond f16's range is reported with its position and
 * value, read back from its 256-weight block: d = 65504, every sub-block
 * scale 63 and every 4-bit value 15 give 65504 * 63 * 15 - dmin * m. */
static void test_convert_k_overflow(void)
{
	struct lp_block_q4_k blk[2];
	void *staging = NULL;
	struct dev dd;
	struct lp_err err;

	memset(blk, 0, sizeof(blk));
	blk[1].d = lp_f32_to_f16(65504.0f);
	memset(blk[1].scales, 0x3f, 8); /* scales and minimums 0-3: 63; 4-7: 0 */
	memset(blk[1].qs, 0xff, sizeof(blk[1].qs));
	CHECK(cudaMallocHost(&staging, 4096) == cudaSuccess);
	CHECK(dev_alloc(&dd, 512 * 2));
	reset_context();
	CHECK_EQ_INT(
	    lp_cuda_convert_weight(&cu, dd.p, blk, LP_DTYPE_Q4_K, 1, 512, staging, 4096, &err),
	    -ERANGE);
	CHECK_MSG(strstr(err.msg, "[0, 256]") && strstr(err.msg, "6.19") && strstr(err.msg, "q4_k"),
	          "message: %s", err.msg);
	CHECK(!lp_cuda_failed(&cu));
	CHECK(dev_canaries_ok(&dd));
	cudaFreeHost(staging);
	dev_free(&dd);
}

/* Quantized weights converted to f16 and multiplied on CUDA agree with the
 * CPU backend multiplying the quantized weights themselves: the weights'
 * rounding to f16 (2^-11) and x's (2^-11) on top of the accumulation. */
static void test_quantized_matmul_matches_cpu(void)
{
	const enum lp_dtype types[] = {LP_DTYPE_Q8_0, LP_DTYPE_Q4_0, LP_DTYPE_Q4_1, LP_DTYPE_Q5_0,
	                               LP_DTYPE_Q5_1, LP_DTYPE_Q4_K, LP_DTYPE_Q5_K, LP_DTYPE_Q6_K};
	const int64_t n = 7, m = 40, k = 256;

	for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
		void *host = make_weights(types[t], m, k, 1.0f);
		float *x = random_floats((size_t)(n * k), 2.0f);
		float *want = (float *)malloc((size_t)(n * m) * 4),
		      *got = (float *)malloc((size_t)(n * m) * 4);
		float *wf = (float *)malloc((size_t)(m * k) * 4);
		void *staging = NULL;
		struct dev wd, xd, od;
		struct lp_err err;

		CHECK(cudaMallocHost(&staging, 4096) == cudaSuccess);
		CHECK(dev_alloc(&wd, (size_t)(m * k) * 2) && dev_alloc(&xd, (size_t)(n * k) * 4) &&
		      dev_alloc(&od, (size_t)(n * m) * 4) && dev_put(&xd, x));
		reset_context();
		CHECK_OK(
		    lp_cuda_convert_weight(&cu, wd.p, host, types[t], m, k, staging, 4096, &err),
		    &err);
		struct lp_tensor xt = tensor(xd.p, LP_DTYPE_F32, n, k);
		struct lp_tensor wt = tensor(wd.p, lp_cuda_weight_type(types[t]), m, k);
		struct lp_tensor ot = tensor(od.p, LP_DTYPE_F32, n, m);
		lp_cuda_matmul(&cu, &ot, &xt, &wt, false);
		CHECK_MSG(!lp_cuda_failed(&cu), "%s", cu.status_msg);
		CHECK(dev_get(&od, got));

		struct lp_tensor xc = tensor(x, LP_DTYPE_F32, n, k),
		                 wc = tensor(host, types[t], m, k);
		struct lp_tensor oc = tensor(want, LP_DTYPE_F32, n, m);
		cpu->ops->matmul(cpu->ctx, &oc, &xc, &wc, false);
		for (int64_t r = 0; r < m; r++)
			lp_dequantize_row(types[t],
			                  (const char *)host + r * lp_dtype_row_bytes(types[t], k),
			                  wf + r * k, k);
		for (int64_t i = 0; i < n; i++)
			for (int64_t j = 0; j < m; j++) {
				double mag = 0;
				for (int64_t l = 0; l < k; l++)
					mag += fabs((double)x[i * k + l] * wf[j * k + l]);
				double tol =
				    mag * (2 * ldexp(1.0, -11) + 2 * k * ldexp(1.0, -24)) + 1e-6;
				CHECK_MSG(fabs(got[i * m + j] - want[i * m + j]) <= tol,
				          "%s [%lld, %lld]: %.9g, cpu %.9g (tolerance %g)",
				          lp_dtype_name(types[t]), (long long)i, (long long)j,
				          got[i * m + j], want[i * m + j], tol);
			}
		cudaFreeHost(staging);
		dev_free(&wd);
		dev_free(&xd);
		dev_free(&od);
		free(host);
		free(x);
		free(want);
		free(got);
		free(wf);
	}
}

int main(void)
{
	struct lp_err err;
	size_t ws_bytes;

	TEST_MAIN_BEGIN("test-gemm");
	if (lp_cuda_init(&cu, 0, &err) != 0 || lp_backend_cpu_new(&cpu, 2, &err) != 0) {
		printf("FAIL test-gemm:init: %s\n", err.msg);
		return 1;
	}
	/* what reserve() does for the matmul (backend-cuda.cu) */
	cu.lim = limits();
	ws_bytes = lp_cuda_matmul_workspace(&cu.lim);
	if (cudaMalloc(&cu.ws[LP_CUDA_WS_MATMUL], ws_bytes) != cudaSuccess) {
		printf("FAIL test-gemm:init: cannot allocate the %zu-byte workspace\n", ws_bytes);
		return 1;
	}
	cu.ws_bytes[LP_CUDA_WS_MATMUL] = ws_bytes;
	if (lp_cuda_matmul_init(&cu, &err) != 0) {
		printf("FAIL test-gemm:init: %s\n", err.msg);
		return 1;
	}
	cu.reserved = true;
	RUN(test_matmul);
	RUN(test_batch_invariance);
	RUN(test_accumulate);
	RUN(test_matmul_edges);
	RUN(test_matmul_errors);
	RUN(test_matmul_workspace);
	RUN(test_convert);
	RUN(test_convert_errors);
	RUN(test_convert_k_overflow);
	RUN(test_quantized_matmul_matches_cpu);
	lp_cuda_matmul_release(&cu);
	cudaFree(cu.ws[LP_CUDA_WS_MATMUL]);
	lp_cuda_release(&cu);
	lp_backend_destroy(cpu);
	TEST_MAIN_END();
}
