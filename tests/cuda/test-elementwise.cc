/* The element-wise CUDA ops (elementwise.cu, rope.cu, kv-store.cu) run
 * through the emulation layer (or a real device) and compared with the CPU
 * backend, and for rope and kv_store also with the contract of backend.h
 * written out here.
 *
 * Every device buffer sits between two canary zones that are checked after
 * the op: nothing outside a buffer is written. Shapes cover 1 and 300 rows,
 * odd widths (the scalar route), widths that take the 4-wide route, and
 * views shifted by one element (aligned widths on the scalar route). */
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

#define CANARY      256 /* bytes each side; keeps the payload 256-aligned */
#define CANARY_BYTE 0xa5

struct dev {
	char *base;
	size_t bytes;  /* payload */
	size_t offset; /* shift of the payload past the canary (misaligns it) */
	void *p;
};

static bool dev_alloc(struct dev *d, size_t bytes, size_t offset)
{
	size_t total = bytes + offset + 2 * CANARY;

	memset(d, 0, sizeof(*d));
	if (cudaMalloc((void **)&d->base, total) != cudaSuccess)
		return false;
	if (cudaMemset(d->base, CANARY_BYTE, total) != cudaSuccess ||
	    cudaDeviceSynchronize() != cudaSuccess)
		return false;
	d->bytes = bytes;
	d->offset = offset;
	d->p = d->base + CANARY + offset;
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

/* Waits for the op stream, then copies the payload back. */
static bool dev_get(const struct dev *d, void *host)
{
	return cudaStreamSynchronize(cu.stream) == cudaSuccess &&
	       cudaMemcpy(host, d->p, d->bytes, cudaMemcpyDeviceToHost) == cudaSuccess;
}

/* True when both canary zones are intact. */
static bool dev_canaries_ok(const struct dev *d)
{
	size_t total = d->bytes + d->offset + 2 * CANARY, head = CANARY + d->offset;
	unsigned char *h = (unsigned char *)malloc(total);
	bool ok = h != NULL;

	ok = ok && cudaStreamSynchronize(cu.stream) == cudaSuccess &&
	     cudaMemcpy(h, d->base, total, cudaMemcpyDeviceToHost) == cudaSuccess;
	for (size_t i = 0; ok && i < total; i++)
		if ((i < head || i >= head + d->bytes) && h[i] != CANARY_BYTE)
			ok = false;
	free(h);
	return ok;
}

static struct lp_tensor tensor(void *p, enum lp_dtype t, int64_t rows, int64_t cols)
{
	struct lp_tensor v = {p, t, rows, cols};
	return v;
}

/* context state between tests */

static unsigned bad_bits(void)
{
	unsigned v = ~0u;

	cudaStreamSynchronize(cu.stream);
	cudaMemcpy(&v, cu.bad, sizeof(v), cudaMemcpyDeviceToHost);
	return v;
}

static void reset_context(void)
{
	unsigned zero = 0;

	cudaStreamSynchronize(cu.stream);
	cudaMemcpy(cu.bad, &zero, sizeof(zero), cudaMemcpyHostToDevice);
	cudaDeviceSynchronize();
	cu.status = 0;
	cu.status_msg[0] = 0;
}

/* deterministic data */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint32_t rng_u32(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return (uint32_t)(rng_state >> 16);
}

/* uniform in [-a, a) */
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

/* a table of rows x cols f32 values stored as type (f32, f16 or bf16),
 * with the exact f32 values it holds in *values */
static void *make_table(enum lp_dtype type, int64_t rows, int64_t cols, float **values)
{
	size_t n = (size_t)(rows * cols);
	float *v = random_floats(n, 3.0f);
	void *t;

	if (type == LP_DTYPE_F32) {
		*values = v;
		return memcpy(malloc(n * 4 + 1), v, n * 4);
	}
	uint16_t *h = (uint16_t *)malloc(n * 2 + 1);
	for (size_t i = 0; i < n; i++) {
		h[i] = type == LP_DTYPE_F16 ? lp_f32_to_f16(v[i]) : lp_f32_to_bf16(v[i]);
		v[i] = type == LP_DTYPE_F16 ? lp_f16_to_f32(h[i]) : lp_bf16_to_f32(h[i]);
	}
	t = h;
	*values = v;
	return t;
}

/* get_rows */

/* Gathers n rows of a table of `type` with some ids outside it, on CUDA
 * and on the CPU: the same bits (widening is exact), zero rows for the bad
 * ids, the flag set exactly when there was one, output rows past n and
 * everything outside the buffers untouched. */
static void check_get_rows(enum lp_dtype type, int64_t table_rows, int64_t cols, int n,
                           size_t shift, bool with_bad)
{
	size_t esz = lp_dtype_block_bytes(type);
	float *values;
	void *table_h = make_table(type, table_rows, cols, &values);
	int32_t *ids = (int32_t *)malloc((size_t)n * sizeof(int32_t) + 1);
	int out_rows = n + 2; /* two rows past n must stay as they were */
	float *got = (float *)malloc((size_t)out_rows * cols * 4 + 1);
	float *want = (float *)malloc((size_t)out_rows * cols * 4 + 1);
	struct dev table, out, idd;
	bool any_bad = false;

	for (int i = 0; i < n; i++) {
		ids[i] = (int32_t)(rng_u32() % table_rows);
		if (with_bad && i % 5 == 2) {
			const int32_t bad[] = {-1, (int32_t)table_rows, INT32_MIN, INT32_MAX};
			ids[i] = bad[(i / 5) % 4];
			any_bad = true;
		}
	}
	CHECK(dev_alloc(&table, (size_t)(table_rows * cols) * esz, shift ? esz : 0));
	CHECK(dev_alloc(&out, (size_t)out_rows * cols * 4, shift ? 4 : 0));
	CHECK(dev_alloc(&idd, (size_t)n * 4, 0));
	CHECK(dev_put(&table, table_h) && dev_put(&idd, ids));
	reset_context();

	struct lp_tensor t_dev = tensor(table.p, type, table_rows, cols);
	struct lp_tensor o_dev = tensor(out.p, LP_DTYPE_F32, out_rows, cols);
	lp_cuda_get_rows(&cu, &o_dev, &t_dev, (const int32_t *)idd.p, n);
	CHECK_MSG(!lp_cuda_failed(&cu), "get_rows failed: %s", cu.status_msg);
	CHECK(dev_get(&out, got));

	struct lp_tensor t_cpu = tensor(table_h, type, table_rows, cols);
	struct lp_tensor o_cpu = tensor(want, LP_DTYPE_F32, out_rows, cols);
	memset(want, CANARY_BYTE, (size_t)out_rows * cols * 4);
	cpu->ops->get_rows(cpu->ctx, &o_cpu, &t_cpu, ids, n);

	for (int i = 0; i < n; i++)
		for (int64_t c = 0; c < cols; c++) {
			float g = got[i * cols + c];
			float w =
			    ids[i] >= 0 && ids[i] < table_rows ? values[ids[i] * cols + c] : 0.0f;
			CHECK_MSG(memcmp(&g, &want[i * cols + c], 4) == 0 && memcmp(&g, &w, 4) == 0,
			          "%s row %d (id %d) col %lld: %g, cpu %g, table %g",
			          lp_dtype_name(type), i, ids[i], (long long)c, g,
			          want[i * cols + c], w);
		}
	for (size_t b = (size_t)n * cols * 4; b < (size_t)out_rows * cols * 4; b++)
		CHECK_MSG(((unsigned char *)got)[b] == CANARY_BYTE,
		          "row past n written at byte %zu", b);
	CHECK_EQ_INT(bad_bits(), any_bad ? LP_CUDA_BAD_ID : 0);
	CHECK(dev_canaries_ok(&table) && dev_canaries_ok(&out) && dev_canaries_ok(&idd));
	dev_free(&table);
	dev_free(&out);
	dev_free(&idd);
	free(table_h);
	free(values);
	free(ids);
	free(got);
	free(want);
}

static void test_get_rows(void)
{
	const enum lp_dtype types[] = {LP_DTYPE_F32, LP_DTYPE_F16, LP_DTYPE_BF16};

	for (int t = 0; t < 3; t++) {
		check_get_rows(types[t], 50, 64, 300, 0, false);
		if (test_current_failed)
			return;
		check_get_rows(types[t], 50, 64, 1, 0, false);
		if (test_current_failed)
			return;
		check_get_rows(types[t], 17, 7, 300, 0, true);
		if (test_current_failed)
			return;
		check_get_rows(types[t], 9, 132, 40, 1, true);
		if (test_current_failed)
			return;
		check_get_rows(types[t], 3, 1, 5, 0, true);
		if (test_current_failed)
			return;
	}
}

/* rmsnorm */

/* Tolerance: the CPU sums squares in double, CUDA in f32 along a fixed
 * tree (relative error about log2(cols) * 2^-24 < 1e-6 for these widths);
 * rsqrtf is within 2 ulp; the final two products round once each. So the
 * results agree to ~2e-6 relative; 1e-5 relative leaves a margin without
 * hiding a wrong formula (eps or mean mistakes are > 1e-4 here). */
static void check_rmsnorm(int64_t rows, int64_t cols, bool in_place, size_t shift)
{
	size_t n = (size_t)(rows * cols);
	float *x = random_floats(n, 2.0f), *w = random_floats((size_t)cols, 1.5f);
	float *got = (float *)malloc(n * 4 + 1), *want = (float *)malloc(n * 4 + 1);
	struct dev xd, wd, od;
	const float eps = 1e-5f;

	CHECK(dev_alloc(&xd, n * 4, shift) && dev_alloc(&wd, (size_t)cols * 4, shift));
	CHECK(in_place || dev_alloc(&od, n * 4, shift));
	CHECK(dev_put(&xd, x) && dev_put(&wd, w));
	reset_context();

	struct lp_tensor xt = tensor(xd.p, LP_DTYPE_F32, rows, cols);
	struct lp_tensor wt = tensor(wd.p, LP_DTYPE_F32, 1, cols);
	struct lp_tensor ot = tensor(in_place ? xd.p : od.p, LP_DTYPE_F32, rows, cols);
	lp_cuda_rmsnorm(&cu, &ot, &xt, &wt, eps);
	CHECK_MSG(!lp_cuda_failed(&cu), "rmsnorm failed: %s", cu.status_msg);
	CHECK(dev_get(in_place ? &xd : &od, got));

	struct lp_tensor xc = tensor(x, LP_DTYPE_F32, rows, cols),
	                 wc = tensor(w, LP_DTYPE_F32, 1, cols);
	struct lp_tensor oc = tensor(want, LP_DTYPE_F32, rows, cols);
	cpu->ops->rmsnorm(cpu->ctx, &oc, &xc, &wc, eps);
	for (size_t i = 0; i < n; i++)
		CHECK_MSG(fabsf(got[i] - want[i]) <= 1e-5f * fabsf(want[i]) + 1e-7f,
		          "rmsnorm %lldx%lld%s at %zu: %.9g, cpu %.9g", (long long)rows,
		          (long long)cols, in_place ? " in place" : "", i, got[i], want[i]);
	CHECK(dev_canaries_ok(&xd) && dev_canaries_ok(&wd) && (in_place || dev_canaries_ok(&od)));
	dev_free(&xd);
	dev_free(&wd);
	if (!in_place)
		dev_free(&od);
	free(x);
	free(w);
	free(got);
	free(want);
}

static void test_rmsnorm(void)
{
	/* warp per row up to 1024 columns, a block per row above; {2048, 128}:
	 * Qwen3's q/k norm, one row per head (128 tokens of 16 heads) */
	const int64_t shapes[][2] = {{1, 7},    {300, 64}, {3, 128},   {300, 1000},
	                             {2, 1024}, {5, 1025}, {1, 4096},  {300, 896},
	                             {4, 5003}, {7, 1},    {2048, 128}};

	for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
		for (int mode = 0; mode < 3; mode++) {
			check_rmsnorm(shapes[s][0], shapes[s][1], mode == 1, mode == 2 ? 4 : 0);
			if (test_current_failed)
				return;
		}
	}
}

/* add_bias, add, silu_mul */

/* add and add_bias are one f32 addition per element: bit-equal to the CPU. */
static void check_add(int64_t rows, int64_t cols, size_t shift)
{
	size_t n = (size_t)(rows * cols);
	float *y = random_floats(n, 4.0f), *x = random_floats(n, 4.0f);
	float *b = random_floats((size_t)cols, 4.0f);
	float *got = (float *)malloc(n * 4 + 1);
	struct dev yd, xd, bd;

	CHECK(dev_alloc(&yd, n * 4, shift) && dev_alloc(&xd, n * 4, 0) &&
	      dev_alloc(&bd, (size_t)cols * 4, shift));
	CHECK(dev_put(&yd, y) && dev_put(&xd, x) && dev_put(&bd, b));
	reset_context();

	struct lp_tensor yt = tensor(yd.p, LP_DTYPE_F32, rows, cols);
	struct lp_tensor xt = tensor(xd.p, LP_DTYPE_F32, rows, cols);
	struct lp_tensor bt = tensor(bd.p, LP_DTYPE_F32, 1, cols);
	lp_cuda_add(&cu, &yt, &xt);
	lp_cuda_add_bias(&cu, &yt, &bt);
	CHECK_MSG(!lp_cuda_failed(&cu), "add failed: %s", cu.status_msg);
	CHECK(dev_get(&yd, got));

	struct lp_tensor yc = tensor(y, LP_DTYPE_F32, rows, cols),
	                 xc = tensor(x, LP_DTYPE_F32, rows, cols);
	struct lp_tensor bc = tensor(b, LP_DTYPE_F32, 1, cols);
	cpu->ops->add(cpu->ctx, &yc, &xc);
	cpu->ops->add_bias(cpu->ctx, &yc, &bc);
	for (size_t i = 0; i < n; i++)
		CHECK_MSG(memcmp(&got[i], &y[i], 4) == 0, "add %lldx%lld at %zu: %g, cpu %g",
		          (long long)rows, (long long)cols, i, got[i], y[i]);
	CHECK(dev_canaries_ok(&yd) && dev_canaries_ok(&xd) && dev_canaries_ok(&bd));
	dev_free(&yd);
	dev_free(&xd);
	dev_free(&bd);
	free(y);
	free(x);
	free(b);
	free(got);
}

static void test_add(void)
{
	const int64_t shapes[][2] = {{1, 7}, {300, 64}, {300, 1001}, {3, 3}, {1, 4096}, {7, 1}};

	for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
		for (size_t shift = 0; shift <= 4; shift += 4) {
			check_add(shapes[s][0], shapes[s][1], shift);
			if (test_current_failed)
				return;
		}
}

/* Tolerance: both compute g / (1 + exp(-g)) * u in f32; CUDA's expf is
 * within 2 ulp, the CPU's AVX2 exp polynomial within ~1e-7 relative, and
 * the division and product round once each: 1e-5 relative (plus 1e-7
 * absolute near zero) covers it with a margin. */
static void check_silu_mul(int64_t rows, int64_t cols, bool in_place, size_t shift)
{
	size_t n = (size_t)(rows * cols);
	float *g = random_floats(n, 12.0f), *u = random_floats(n, 3.0f);
	float *got = (float *)malloc(n * 4 + 1), *want = (float *)malloc(n * 4 + 1);
	struct dev gd, ud, od;

	CHECK(dev_alloc(&gd, n * 4, shift) && dev_alloc(&ud, n * 4, 0));
	CHECK(in_place || dev_alloc(&od, n * 4, 0));
	CHECK(dev_put(&gd, g) && dev_put(&ud, u));
	reset_context();

	struct lp_tensor gt = tensor(gd.p, LP_DTYPE_F32, rows, cols);
	struct lp_tensor ut = tensor(ud.p, LP_DTYPE_F32, rows, cols);
	struct lp_tensor ot = tensor(in_place ? gd.p : od.p, LP_DTYPE_F32, rows, cols);
	lp_cuda_silu_mul(&cu, &ot, &gt, &ut);
	CHECK_MSG(!lp_cuda_failed(&cu), "silu_mul failed: %s", cu.status_msg);
	CHECK(dev_get(in_place ? &gd : &od, got));

	struct lp_tensor gc = tensor(g, LP_DTYPE_F32, rows, cols),
	                 uc = tensor(u, LP_DTYPE_F32, rows, cols);
	struct lp_tensor oc = tensor(want, LP_DTYPE_F32, rows, cols);
	cpu->ops->silu_mul(cpu->ctx, &oc, &gc, &uc);
	for (size_t i = 0; i < n; i++)
		CHECK_MSG(fabsf(got[i] - want[i]) <= 1e-5f * fabsf(want[i]) + 1e-7f,
		          "silu_mul at %zu: g %g u %g: %.9g, cpu %.9g", i, g[i], u[i], got[i],
		          want[i]);
	CHECK(dev_canaries_ok(&gd) && dev_canaries_ok(&ud) && (in_place || dev_canaries_ok(&od)));
	dev_free(&gd);
	dev_free(&ud);
	if (!in_place)
		dev_free(&od);
	free(g);
	free(u);
	free(got);
	free(want);
}

static void test_silu_mul(void)
{
	const int64_t shapes[][2] = {{1, 7}, {300, 64}, {300, 1001}, {1, 4096}, {2, 3}};

	for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
		for (int mode = 0; mode < 3; mode++) {
			check_silu_mul(shapes[s][0], shapes[s][1], mode == 1, mode == 2 ? 4 : 0);
			if (test_current_failed)
				return;
		}
}

/* gelu_mul: against PyTorch's formula in double and against the CPU
 * backend. Both backends evaluate the same f32 expression with tanhf:
 * 1e-5 relative plus 1e-6 absolute covers the libraries' tanhf (a few
 * ulp); the double formula within 1e-5 relative of max(|g u|, 1e-3). */
static void check_gelu_mul(int64_t rows, int64_t cols, bool in_place, size_t shift)
{
	size_t n = (size_t)(rows * cols);
	float *g = random_floats(n, 12.0f), *u = random_floats(n, 3.0f);
	float *got = (float *)malloc(n * 4 + 1), *want = (float *)malloc(n * 4 + 1);
	struct dev gd, ud, od;

	CHECK(dev_alloc(&gd, n * 4, shift) && dev_alloc(&ud, n * 4, 0));
	CHECK(in_place || dev_alloc(&od, n * 4, 0));
	CHECK(dev_put(&gd, g) && dev_put(&ud, u));
	reset_context();

	struct lp_tensor gt = tensor(gd.p, LP_DTYPE_F32, rows, cols);
	struct lp_tensor ut = tensor(ud.p, LP_DTYPE_F32, rows, cols);
	struct lp_tensor ot = tensor(in_place ? gd.p : od.p, LP_DTYPE_F32, rows, cols);
	lp_cuda_gelu_mul(&cu, &ot, &gt, &ut);
	CHECK_MSG(!lp_cuda_failed(&cu), "gelu_mul failed: %s", cu.status_msg);
	CHECK(dev_get(in_place ? &gd : &od, got));

	struct lp_tensor gc = tensor(g, LP_DTYPE_F32, rows, cols),
	                 uc = tensor(u, LP_DTYPE_F32, rows, cols);
	struct lp_tensor oc = tensor(want, LP_DTYPE_F32, rows, cols);
	cpu->ops->gelu_mul(cpu->ctx, &oc, &gc, &uc);
	for (size_t i = 0; i < n; i++) {
		double x = g[i];
		double ref =
		    0.5 * x * (1.0 + tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x))) * u[i];
		double mag = fmax(fabs(x * u[i]), 1e-3);

		CHECK_MSG(fabsf(got[i] - want[i]) <= 1e-5f * fabsf(want[i]) + 1e-6f,
		          "gelu_mul at %zu: g %g u %g: %.9g, cpu %.9g", i, g[i], u[i], got[i],
		          want[i]);
		CHECK_MSG(fabs(want[i] - ref) <= 1e-5 * mag,
		          "cpu gelu_mul at %zu: g %g u %g: %.9g, formula %.9g", i, g[i], u[i],
		          want[i], ref);
		if (test_current_failed)
			break;
	}
	CHECK(dev_canaries_ok(&gd) && dev_canaries_ok(&ud) && (in_place || dev_canaries_ok(&od)));
	dev_free(&gd);
	dev_free(&ud);
	if (!in_place)
		dev_free(&od);
	free(g);
	free(u);
	free(got);
	free(want);
}

static void test_gelu_mul(void)
{
	const int64_t shapes[][2] = {{1, 7}, {300, 64}, {300, 1001}, {1, 4096}, {2, 3}};

	for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
		for (int mode = 0; mode < 3; mode++) {
			check_gelu_mul(shapes[s][0], shapes[s][1], mode == 1, mode == 2 ? 4 : 0);
			if (test_current_failed)
				return;
		}
}

/* scale: exact (one f32 product per element) on both backends */
static void test_scale(void)
{
	const int64_t shapes[][2] = {{1, 7}, {300, 64}, {2, 3}, {1, 4096}};

	for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
		for (int shift = 0; shift <= 4; shift += 4) {
			int64_t rows = shapes[s][0], cols = shapes[s][1];
			size_t n = (size_t)(rows * cols);
			float *x = random_floats(n, 5.0f), *got = (float *)malloc(n * 4 + 1);
			const float k = 25.298221281347036f;
			struct dev xd;

			CHECK(dev_alloc(&xd, n * 4, (size_t)shift) && dev_put(&xd, x));
			reset_context();
			struct lp_tensor xt = tensor(xd.p, LP_DTYPE_F32, rows, cols);
			lp_cuda_scale(&cu, &xt, k);
			CHECK_MSG(!lp_cuda_failed(&cu), "scale failed: %s", cu.status_msg);
			CHECK(dev_get(&xd, got));
			struct lp_tensor xc = tensor(x, LP_DTYPE_F32, rows, cols);
			float x0 = x[0];
			cpu->ops->scale(cpu->ctx, &xc, k);
			CHECK(x[0] == x0 * k);
			for (size_t i = 0; i < n && !test_current_failed; i++)
				CHECK_MSG(got[i] == x[i], "scale at %zu: %.9g, cpu %.9g", i, got[i],
				          x[i]);
			CHECK(dev_canaries_ok(&xd));
			dev_free(&xd);
			free(x);
			free(got);
			if (test_current_failed)
				return;
		}
}

/* rope: against the contract written out here and against the CPU
 * backend */

static float *rope_table(int n_pos, int head_dim)
{
	int half = head_dim / 2;
	float *t = (float *)malloc((size_t)n_pos * head_dim * 4 + 1);

	for (int p = 0; p < n_pos; p++)
		for (int i = 0; i < half; i++) {
			double a = p * pow(10000.0, -2.0 * i / head_dim);
			t[p * head_dim + i] = (float)cos(a);
			t[p * head_dim + half + i] = (float)sin(a);
		}
	return t;
}

/* the contract of backend.h, written out */
static void rope_ref(float *x, int64_t rows, int64_t cols, int n_heads, int head_dim,
                     const int32_t *pos, const float *cs, int n_pos)
{
	int half = head_dim / 2;

	for (int64_t r = 0; r < rows; r++) {
		if (pos[r] < 0 || pos[r] >= n_pos)
			continue;
		for (int h = 0; h < n_heads; h++) {
			float *v = x + r * cols + (int64_t)h * head_dim;
			const float *t = cs + (int64_t)pos[r] * head_dim;
			for (int i = 0; i < half; i++) {
				float a = v[i], b = v[i + half], c = t[i], s = t[half + i];
				v[i] = a * c - b * s;
				v[i + half] = b * c + a * s;
			}
		}
	}
}

/* Tolerance: each output is a*c - b*s with |a|, |b| <= 2 and |c|, |s| <=
 * 1; whether the compiler fuses a product into an FMA changes the result
 * by at most an ulp of the products, ~5e-7; 2e-6 absolute. Columns past
 * n_heads * head_dim and rows with a bad position stay bit for bit. */
static void check_rope(int64_t rows, int n_heads, int head_dim, int64_t extra_cols, size_t shift,
                       bool with_bad)
{
	int64_t cols = (int64_t)n_heads * head_dim + extra_cols;
	size_t n = (size_t)(rows * cols);
	const int n_pos = 700;
	float *x = random_floats(n, 2.0f), *cs = rope_table(n_pos, head_dim);
	float *got = (float *)malloc(n * 4 + 1);
	int32_t *pos = (int32_t *)malloc((size_t)rows * 4 + 1);
	struct dev xd, cd, pd;
	bool any_bad = false;

	for (int64_t r = 0; r < rows; r++) {
		pos[r] = (int32_t)(rng_u32() % n_pos);
		if (with_bad && r % 7 == 3) {
			pos[r] = r % 2 ? n_pos : -1;
			any_bad = true;
		}
	}
	CHECK(dev_alloc(&xd, n * 4, shift) && dev_alloc(&cd, (size_t)n_pos * head_dim * 4, 0) &&
	      dev_alloc(&pd, (size_t)rows * 4, 0));
	CHECK(dev_put(&xd, x) && dev_put(&cd, cs) && dev_put(&pd, pos));
	reset_context();

	struct lp_tensor xt = tensor(xd.p, LP_DTYPE_F32, rows, cols);
	struct lp_tensor ct = tensor(cd.p, LP_DTYPE_F32, n_pos, head_dim);
	lp_cuda_rope(&cu, &xt, n_heads, head_dim, (const int32_t *)pd.p, &ct);
	CHECK_MSG(!lp_cuda_failed(&cu), "rope failed: %s", cu.status_msg);
	CHECK(dev_get(&xd, got));

	float *want = (float *)memcpy(malloc(n * 4 + 1), x, n * 4);
	float *cpu_x = (float *)memcpy(malloc(n * 4 + 1), x, n * 4);
	rope_ref(want, rows, cols, n_heads, head_dim, pos, cs, n_pos);
	struct lp_tensor xc = tensor(cpu_x, LP_DTYPE_F32, rows, cols);
	struct lp_tensor cc = tensor(cs, LP_DTYPE_F32, n_pos, head_dim);
	cpu->ops->rope(cpu->ctx, &xc, n_heads, head_dim, pos, &cc);
	for (int64_t r = 0; r < rows; r++)
		for (int64_t c = 0; c < cols; c++) {
			size_t i = (size_t)(r * cols + c);
			bool same =
			    c >= (int64_t)n_heads * head_dim || pos[r] < 0 || pos[r] >= n_pos;

			if (same)
				CHECK_MSG(memcmp(&got[i], &x[i], 4) == 0,
				          "rope changed row %lld col %lld (pos %d)", (long long)r,
				          (long long)c, pos[r]);
			else
				CHECK_MSG(fabsf(got[i] - want[i]) <= 2e-6f &&
				              fabsf(got[i] - cpu_x[i]) <= 2e-6f,
				          "rope hd %d row %lld col %lld pos %d: %.9g, want %.9g, "
				          "cpu %.9g",
				          head_dim, (long long)r, (long long)c, pos[r], got[i],
				          want[i], cpu_x[i]);
		}
	CHECK_EQ_INT(bad_bits(), any_bad ? LP_CUDA_BAD_POS : 0);
	CHECK(dev_canaries_ok(&xd) && dev_canaries_ok(&cd) && dev_canaries_ok(&pd));
	dev_free(&xd);
	dev_free(&cd);
	dev_free(&pd);
	free(x);
	free(cs);
	free(got);
	free(want);
	free(cpu_x);
	free(pos);
}

static void test_rope(void)
{
	check_rope(300, 4, 64, 0, 0, false);
	if (!test_current_failed)
		check_rope(1, 32, 128, 0, 0, false);
	if (!test_current_failed)
		check_rope(300, 3, 128, 64, 0,
		           true); /* q of a fused qkv row: k/v columns untouched */
	if (!test_current_failed)
		check_rope(5, 2, 64, 1, 0, true); /* odd row width: scalar route */
	if (!test_current_failed)
		check_rope(9, 2, 128, 0, 4, true); /* misaligned view: scalar route */
	if (!test_current_failed)
		check_rope(4, 3, 6, 0, 0, true); /* odd half width */
}

/* kv_store */

/* Cache rows get k/v converted with round to nearest even: the same bits as
 * dtype.h's conversions and as the CPU backend's kv_store. Slots -1 are skipped without a flag;
 * slots outside the cache are skipped with LP_CUDA_BAD_SLOT; rows of the cache no slot names keep
 * their bits. */
static void check_kv_store(enum lp_dtype type, int64_t rows, int64_t cols, int64_t n_slots,
                           size_t shift, bool with_bad)
{
	size_t esz = lp_dtype_block_bytes(type);
	size_t cache_bytes = (size_t)(n_slots * cols) * esz, n = (size_t)(rows * cols);
	float *k = random_floats(n, 5.0f), *v = random_floats(n, 5.0f);
	int32_t *slots = (int32_t *)malloc((size_t)rows * 4 + 1);
	unsigned char *init = (unsigned char *)malloc(cache_bytes + 1);
	unsigned char *got_k = (unsigned char *)malloc(cache_bytes + 1);
	unsigned char *got_v = (unsigned char *)malloc(cache_bytes + 1);
	int64_t *writer = (int64_t *)malloc((size_t)n_slots * sizeof(int64_t) + 1);
	struct dev kc, vc, kd, vd, sd;
	bool any_bad = false;

	CHECK(rows <= n_slots);
	for (size_t i = 0; i < cache_bytes; i++)
		init[i] = (unsigned char)rng_u32();
	for (int64_t s = 0; s < n_slots; s++)
		writer[s] = -1;
	/* distinct slots: a shuffled prefix of 0 .. n_slots - 1 */
	int64_t *perm = (int64_t *)malloc((size_t)n_slots * sizeof(int64_t) + 1);
	for (int64_t s = 0; s < n_slots; s++)
		perm[s] = s;
	for (int64_t s = n_slots - 1; s > 0; s--) {
		int64_t j = rng_u32() % (s + 1), t = perm[s];
		perm[s] = perm[j];
		perm[j] = t;
	}
	for (int64_t r = 0; r < rows; r++) {
		slots[r] = (int32_t)perm[r];
		if (r % 6 == 1)
			slots[r] = -1;
		else if (with_bad && r % 6 == 4) {
			slots[r] = r % 4 ? (int32_t)n_slots : -2;
			any_bad = true;
		}
		if (slots[r] >= 0 && slots[r] < n_slots)
			writer[slots[r]] = r;
	}
	CHECK(dev_alloc(&kc, cache_bytes, shift ? esz : 0) &&
	      dev_alloc(&vc, cache_bytes, shift ? esz : 0));
	CHECK(dev_alloc(&kd, n * 4, shift ? 4 : 0) && dev_alloc(&vd, n * 4, 0) &&
	      dev_alloc(&sd, (size_t)rows * 4, 0));
	CHECK(dev_put(&kc, init) && dev_put(&vc, init) && dev_put(&kd, k) && dev_put(&vd, v) &&
	      dev_put(&sd, slots));
	reset_context();

	struct lp_tensor kct = tensor(kc.p, type, n_slots, cols),
	                 vct = tensor(vc.p, type, n_slots, cols);
	struct lp_tensor kt = tensor(kd.p, LP_DTYPE_F32, rows, cols),
	                 vt = tensor(vd.p, LP_DTYPE_F32, rows, cols);
	lp_cuda_kv_store(&cu, &kct, &vct, &kt, &vt, (const int32_t *)sd.p);
	CHECK_MSG(!lp_cuda_failed(&cu), "kv_store failed: %s", cu.status_msg);
	CHECK(dev_get(&kc, got_k) && dev_get(&vc, got_v));

	for (int64_t s = 0; s < n_slots; s++)
		for (int64_t c = 0; c < cols; c++) {
			size_t off = (size_t)(s * cols + c) * esz;
			for (int which = 0; which < 2; which++) {
				const unsigned char *got = which ? got_v : got_k;
				unsigned char want[4];

				if (writer[s] < 0) {
					memcpy(want, init + off, esz);
				} else {
					float f = (which ? v : k)[writer[s] * cols + c];
					uint16_t h = type == LP_DTYPE_F16 ? lp_f32_to_f16(f)
					                                  : lp_f32_to_bf16(f);
					if (type == LP_DTYPE_F32)
						memcpy(want, &f, 4);
					else
						memcpy(want, &h, 2);
				}
				CHECK_MSG(memcmp(got + off, want, esz) == 0,
				          "%s %s cache slot %lld col %lld (row %lld) differs",
				          lp_dtype_name(type), which ? "v" : "k", (long long)s,
				          (long long)c, (long long)writer[s]);
			}
		}
	CHECK_EQ_INT(bad_bits(), any_bad ? LP_CUDA_BAD_SLOT : 0);

	/* the CPU backend's kv_store writes the same bytes */
	unsigned char *cpu_k = (unsigned char *)memcpy(malloc(cache_bytes + 1), init, cache_bytes);
	unsigned char *cpu_v = (unsigned char *)memcpy(malloc(cache_bytes + 1), init, cache_bytes);
	struct lp_tensor kcc = tensor(cpu_k, type, n_slots, cols);
	struct lp_tensor vcc = tensor(cpu_v, type, n_slots, cols);
	struct lp_tensor kc2 = tensor(k, LP_DTYPE_F32, rows, cols);
	struct lp_tensor vc2 = tensor(v, LP_DTYPE_F32, rows, cols);
	cpu->ops->kv_store(cpu->ctx, &kcc, &vcc, &kc2, &vc2, slots);
	bool same =
	    memcmp(cpu_k, got_k, cache_bytes) == 0 && memcmp(cpu_v, got_v, cache_bytes) == 0;
	free(cpu_k);
	free(cpu_v);
	CHECK_MSG(same, "%s caches differ from the cpu backend's", lp_dtype_name(type));
	CHECK(dev_canaries_ok(&kc) && dev_canaries_ok(&vc) && dev_canaries_ok(&kd) &&
	      dev_canaries_ok(&vd) && dev_canaries_ok(&sd));
	dev_free(&kc);
	dev_free(&vc);
	dev_free(&kd);
	dev_free(&vd);
	dev_free(&sd);
	free(k);
	free(v);
	free(slots);
	free(init);
	free(got_k);
	free(got_v);
	free(writer);
	free(perm);
}

static void test_kv_store(void)
{
	const enum lp_dtype types[] = {LP_DTYPE_F32, LP_DTYPE_F16, LP_DTYPE_BF16};

	for (int t = 0; t < 3; t++) {
		check_kv_store(types[t], 300, 128, 512, 0, false); /* 2 kv heads of 64 */
		if (!test_current_failed)
			check_kv_store(types[t], 1, 128, 16, 0, false);
		if (!test_current_failed)
			check_kv_store(types[t], 300, 7, 301, 0, true);
		if (!test_current_failed)
			check_kv_store(types[t], 37, 256, 64, 1, true); /* misaligned views */
		if (test_current_failed)
			return;
	}
}

/* Ops on zero rows launch nothing and fail nothing. */
static void test_empty(void)
{
	struct dev d;
	uint64_t before;

	CHECK(dev_alloc(&d, 4096, 0));
	reset_context();
	before = cu.launches;

	struct lp_tensor t0 = tensor(d.p, LP_DTYPE_F32, 0, 64),
	                 w = tensor(d.p, LP_DTYPE_F32, 1, 64);
	lp_cuda_rmsnorm(&cu, &t0, &t0, &w, 1e-6f);
	lp_cuda_add(&cu, &t0, &t0);
	lp_cuda_add_bias(&cu, &t0, &w);
	lp_cuda_silu_mul(&cu, &t0, &t0, &t0);
	lp_cuda_get_rows(&cu, &t0, &w, (const int32_t *)d.p, 0);
	lp_cuda_rope(&cu, &t0, 1, 64, (const int32_t *)d.p, &w);
	lp_cuda_kv_store(&cu, &w, &w, &t0, &t0, (const int32_t *)d.p);
	CHECK_MSG(!lp_cuda_failed(&cu), "an empty op failed: %s", cu.status_msg);
	CHECK_EQ_INT(cu.launches, before);
	CHECK(dev_canaries_ok(&d));
	dev_free(&d);
}

/* A shape mismatch records a sticky failure naming the op; later ops do
 * nothing until the status is cleared. */
static void test_shape_errors(void)
{
	struct dev a, b;
	float ones[64], got[64];

	for (int i = 0; i < 64; i++)
		ones[i] = 1.0f;
	CHECK(dev_alloc(&a, sizeof(ones), 0) && dev_alloc(&b, sizeof(ones), 0));
	CHECK(dev_put(&a, ones) && dev_put(&b, ones));
	reset_context();

	struct lp_tensor y = tensor(a.p, LP_DTYPE_F32, 2, 32), x = tensor(b.p, LP_DTYPE_F32, 4, 16);
	lp_cuda_add(&cu, &y, &x);
	CHECK(lp_cuda_failed(&cu) && cu.status == -EINVAL);
	CHECK_MSG(strstr(cu.status_msg, "add:") != NULL, "message: %s", cu.status_msg);

	struct lp_tensor x2 = tensor(b.p, LP_DTYPE_F32, 2, 32);
	lp_cuda_add(&cu, &y, &x2); /* valid, but the backend has failed */
	CHECK(dev_get(&a, got));
	CHECK(memcmp(got, ones, sizeof(ones)) == 0);

	reset_context();
	struct lp_tensor h = tensor(b.p, LP_DTYPE_F16, 2, 32);
	lp_cuda_rmsnorm(&cu, &y, &h, &x2, 1e-6f);
	CHECK_MSG(strstr(cu.status_msg, "rmsnorm:") != NULL, "message: %s", cu.status_msg);
	reset_context();
	struct lp_tensor cs = tensor(b.p, LP_DTYPE_F32, 1, 32);
	lp_cuda_rope(&cu, &y, 1, 31, (const int32_t *)a.p, &cs); /* odd head_dim */
	CHECK_MSG(strstr(cu.status_msg, "rope:") != NULL, "message: %s", cu.status_msg);
	reset_context();
	struct lp_tensor q = tensor(b.p, LP_DTYPE_Q8_0, 1, 32);
	lp_cuda_get_rows(&cu, &y, &q, (const int32_t *)a.p, 1);
	CHECK_MSG(strstr(cu.status_msg, "get_rows:") != NULL, "message: %s", cu.status_msg);
	reset_context();
	struct lp_tensor c16 = tensor(a.p, LP_DTYPE_F16, 2, 32);
	lp_cuda_kv_store(&cu, &c16, &y, &x2, &x2, (const int32_t *)a.p); /* mixed cache types */
	CHECK_MSG(strstr(cu.status_msg, "kv_store:") != NULL, "message: %s", cu.status_msg);
	reset_context();
	dev_free(&a);
	dev_free(&b);
}

int main(void)
{
	struct lp_err err;

	TEST_MAIN_BEGIN("test-elementwise");
	if (lp_cuda_init(&cu, 0, &err) != 0) {
		printf("FAIL test-elementwise:init: %s\n", err.msg);
		return 1;
	}
	if (lp_backend_cpu_new(&cpu, 2, &err) != 0) {
		printf("FAIL test-elementwise:init: %s\n", err.msg);
		return 1;
	}
	if (cudaMalloc((void **)&cu.bad, sizeof(unsigned)) != cudaSuccess) {
		printf("FAIL test-elementwise:init: cannot allocate the flag word\n");
		return 1;
	}
	RUN(test_get_rows);
	RUN(test_rmsnorm);
	RUN(test_add);
	RUN(test_silu_mul);
	RUN(test_gelu_mul);
	RUN(test_scale);
	RUN(test_rope);
	RUN(test_kv_store);
	RUN(test_empty);
	RUN(test_shape_errors);
	cudaFree(cu.bad);
	lp_cuda_release(&cu);
	lp_backend_destroy(cpu);
	TEST_MAIN_END();
}
