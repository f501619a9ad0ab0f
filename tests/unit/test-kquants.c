/* The block formats of issue 13 (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K):
 *  - dequantisation bit for bit against the gguf package's numpy reference,
 *    on random blocks with edge-case scales and on rows of a real Q4_K_M
 *    file (tests/fixtures/kquants/, made by hack/make-kquant-fixtures.py;
 *    the older Q8_0, Q4_0 and Q4_1 are checked the same way), by the
 *    portable C (lp_dequantize_row) and by the AVX2 expansion the GEMM packs
 *    panels with;
 *  - the CPU backend's matmul of every new type, on the AVX2 path (3 threads
 *    and 1) and the portable one, against dequantise-then-double-dot on
 *    random matrices: batches 1 to 17 (matrix-vector and GEMM), row counts
 *    that are not multiples of 8 or 16, with and without accumulation, held
 *    to the relative error the older quantized types are held to in
 *    test-backend-cpu; the matrix-vector kernel also directly, whatever the
 *    crossover to the GEMM;
 *  - the same bits from 1 and 3 threads, and get_rows equal to the
 *    dequantized table. */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/cpu/cpu.h"
#include "tests/test.h"

static const enum lp_dtype new_types[] = {LP_DTYPE_Q5_0, LP_DTYPE_Q5_1, LP_DTYPE_Q4_K,
                                          LP_DTYPE_Q5_K, LP_DTYPE_Q6_K};
#define N_NEW (int)(sizeof(new_types) / sizeof(new_types[0]))

#define N_BACKENDS 3
static struct lp_backend *g_be[N_BACKENDS];
static const char *g_be_name[N_BACKENDS] = {"avx2x3", "scalar-x3", "avx2x1"};

static uint64_t rng_state = 0x6b71756174730001ULL;

static uint64_t rng_next(void)
{
	return test_splitmix64(&rng_state);
}

static float frand(float lo, float hi)
{
	return lo + (hi - lo) * (float)((rng_next() >> 40) * (1.0 / 16777216.0));
}

static void *read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	char *buf = NULL;
	long n;

	*len = 0;
	if (!f)
		return NULL;
	if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0) {
		buf = malloc((size_t)n + 1);
		if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
			free(buf);
			buf = NULL;
		}
		*len = (size_t)n;
	}
	fclose(f);
	return buf;
}

static uint32_t bits(float f)
{
	uint32_t u;
	memcpy(&u, &f, sizeof(u));
	return u;
}

static void test_sizes(void)
{
	static const struct {
		enum lp_dtype t;
		const char *name;
		int block;
		size_t bytes;
	} want[] = {
	    {LP_DTYPE_Q5_0, "q5_0", 32, 22},   {LP_DTYPE_Q5_1, "q5_1", 32, 24},
	    {LP_DTYPE_Q4_K, "q4_k", 256, 144}, {LP_DTYPE_Q5_K, "q5_k", 256, 176},
	    {LP_DTYPE_Q6_K, "q6_k", 256, 210},
	};

	for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
		CHECK_EQ_STR(lp_dtype_name(want[i].t), want[i].name);
		CHECK_EQ_INT(lp_dtype_block(want[i].t), want[i].block);
		CHECK_EQ_INT(lp_dtype_block_bytes(want[i].t), want[i].bytes);
		CHECK_EQ_INT(lp_dtype_row_bytes(want[i].t, 10 * want[i].block), 10 * want[i].bytes);
		/* a row must be whole blocks: Gemma 3 270M's 640 columns are not
		 * whole K-quant blocks */
		CHECK_EQ_INT(lp_dtype_row_bytes(want[i].t, want[i].block + 16), 0);
		CHECK_EQ_INT(lp_dtype_row_bytes(want[i].t, 640),
		             want[i].block == 32 ? 20 * want[i].bytes : 0);
	}
}

/* dequantisation of fixture <stem>-<type> by C and AVX2, bit for bit */
static void check_fixture(const char *stem, enum lp_dtype t)
{
	char path[256];
	size_t nb, nf;
	void *blocks;
	float *want, *got;
	int64_t n, block = lp_dtype_block(t);

	snprintf(path, sizeof(path), "%s/kquants/%s-%s.bin", test_fixtures_dir(), stem,
	         lp_dtype_name(t));
	blocks = read_file(path, &nb);
	snprintf(path, sizeof(path), "%s/kquants/%s-%s.f32", test_fixtures_dir(), stem,
	         lp_dtype_name(t));
	want = read_file(path, &nf);
	if (!blocks || !want) {
		free(blocks);
		free(want);
		TEST_FAIL("cannot read %s and its .bin (hack/make-kquant-fixtures.py)", path);
		return;
	}
	n = (int64_t)(nb / lp_dtype_block_bytes(t)) * block;
	got = malloc((size_t)n * sizeof(float) + 1);
	if (nb % lp_dtype_block_bytes(t) || nf != (size_t)n * sizeof(float) || n == 0) {
		TEST_FAIL("%s: %zu bytes of blocks, %zu of floats", path, nb, nf);
		goto out;
	}
	for (int pass = 0; pass < 3; pass++) {
		const char *how = pass == 0 ? "lp_dequantize_row" : "lp_cpu_dequant_avx2";
		int64_t k0 = pass == 2 ? block : 0, len = pass == 2 ? n - 2 * block : n;

		if (pass > 0 && !lp_cpu_has_avx2())
			break;
		memset(got, 0xff, (size_t)n * sizeof(float));
		if (pass == 0)
			lp_dequantize_row(t, blocks, got, n);
#if LP_CPU_X86
		else
			lp_cpu_dequant_avx2(t, blocks, k0, len, got + k0);
#endif
		for (int64_t i = k0; i < k0 + len; i++) {
			if (bits(got[i]) != bits(want[i])) {
				TEST_FAIL(
				    "%s %s: weight %lld (block %lld) is %.9g (0x%08x), gguf says "
				    "%.9g (0x%08x)",
				    how, path, (long long)i, (long long)(i / block), got[i],
				    bits(got[i]), want[i], bits(want[i]));
				goto out;
			}
		}
	}
out:
	free(blocks);
	free(want);
	free(got);
}

static void test_dequant_random(void)
{
	static const enum lp_dtype types[] = {LP_DTYPE_Q5_0, LP_DTYPE_Q5_1, LP_DTYPE_Q4_K,
	                                      LP_DTYPE_Q5_K, LP_DTYPE_Q6_K, LP_DTYPE_Q8_0,
	                                      LP_DTYPE_Q4_0, LP_DTYPE_Q4_1};

	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]) && !test_current_failed; i++)
		check_fixture("random", types[i]);
}

/* rows of Gemma 3 270M Q4_K_M: the types that file holds */
static void test_dequant_real(void)
{
	static const enum lp_dtype types[] = {LP_DTYPE_Q4_K, LP_DTYPE_Q6_K, LP_DTYPE_Q5_0,
	                                      LP_DTYPE_Q8_0};

	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]) && !test_current_failed; i++)
		check_fixture("real", types[i]);
}

/* Random [m, k] weights of type t: random bytes with every f16 scale set
 * to a moderate value of either sign (d in [2e-3, 2e-2], m and dmin in
 * [1e-2, 1e-1]), so that products stay well inside f32. *deq gets the
 * dequantized values. Both malloc'd. */
static void make_weights(enum lp_dtype t, int64_t m, int64_t k, uint8_t **bytes, float **deq)
{
	size_t rb = lp_dtype_row_bytes(t, k), bb = lp_dtype_block_bytes(t);
	size_t total = rb * (size_t)m;

	*bytes = malloc(total + 1);
	*deq = malloc((size_t)(m * k) * sizeof(float) + 1);
	for (size_t i = 0; i < total; i++)
		(*bytes)[i] = (uint8_t)rng_next();
	for (size_t b = 0; b < total / bb; b++) {
		uint8_t *p = *bytes + b * bb;
		float sign = (rng_next() & 1) ? 1.0f : -1.0f;
		uint16_t d = lp_f32_to_f16(sign * frand(2e-3f, 2e-2f));
		uint16_t mm = lp_f32_to_f16(frand(-1e-1f, 1e-1f));

		if (t == LP_DTYPE_Q6_K) {
			memcpy(p + 208, &d, 2);
			continue;
		}
		memcpy(p, &d, 2);
		if (t == LP_DTYPE_Q5_1 || t == LP_DTYPE_Q4_K || t == LP_DTYPE_Q5_K)
			memcpy(p + 2, &mm, 2);
	}
	for (int64_t r = 0; r < m; r++)
		lp_dequantize_row(t, *bytes + rb * (size_t)r, *deq + r * k, k);
}

static int dev_tensor(struct lp_backend *be, struct lp_buffer *buf, struct lp_tensor *t,
                      enum lp_dtype type, int64_t rows, int64_t cols, const void *host)
{
	struct lp_err err = {0};
	size_t n = lp_dtype_row_bytes(type, cols) * (size_t)rows;
	int rc = lp_backend_alloc(be, n, buf, &err);

	if (rc)
		return rc;
	if (host)
		lp_backend_upload(be, buf->data, host, n);
	*t = (struct lp_tensor){buf->data, type, rows, cols};
	return 0;
}

struct shape {
	int n, k, m;
};

/* want[i, r] = (acc ? out0 : 0) + x[i] . w[r] in double, scale the sum of
 * the magnitudes: the reference of test-backend-cpu's check_matmul */
static void reference(const float *x, const float *wdeq, const float *out0, struct shape s,
                      bool acc, double *want, double *scale)
{
	for (int i = 0; i < s.n; i++) {
		for (int r = 0; r < s.m; r++) {
			double a = acc ? out0[i * s.m + r] : 0.0,
			       mag = acc ? fabs(out0[i * s.m + r]) : 0;
			for (int kk = 0; kk < s.k; kk++) {
				double p = (double)x[i * s.k + kk] * wdeq[(size_t)r * s.k + kk];
				a += p;
				mag += fabs(p);
			}
			want[i * s.m + r] = a;
			scale[i * s.m + r] = mag + 1e-6;
		}
	}
}

/* the index of the worst relative error over n values, and the error */
static double worst(const float *got, const double *want, const double *scale, int n, int *where)
{
	double e = 0.0;

	*where = 0;
	for (int i = 0; i < n; i++) {
		double d = fabs((double)got[i] - want[i]) / scale[i];
		if (!(d <= e)) {
			e = d;
			*where = i;
			if (isnan(d))
				return INFINITY;
		}
	}
	return e;
}

#define REL_TOL 1e-5

static bool check_matmul(int b, enum lp_dtype t, struct shape s, bool acc)
{
	struct lp_backend *be = g_be[b];
	struct lp_buffer bx = {0}, bw = {0}, bo = {0};
	struct lp_tensor tx, tw, to;
	uint8_t *wbytes;
	float *wdeq, *x = malloc((size_t)(s.n * s.k) * sizeof(float));
	float *out0 = malloc((size_t)(s.n * s.m) * sizeof(float));
	double *want = malloc((size_t)(s.n * s.m) * sizeof(double));
	double *scale = malloc((size_t)(s.n * s.m) * sizeof(double));
	bool ok = false;
	int where;

	make_weights(t, s.m, s.k, &wbytes, &wdeq);
	for (int i = 0; i < s.n * s.k; i++)
		x[i] = frand(-1.0f, 1.0f);
	for (int i = 0; i < s.n * s.m; i++)
		out0[i] = frand(-2.0f, 2.0f);
	reference(x, wdeq, out0, s, acc, want, scale);
	if (dev_tensor(be, &bx, &tx, LP_DTYPE_F32, s.n, s.k, x) ||
	    dev_tensor(be, &bw, &tw, t, s.m, s.k, wbytes) ||
	    dev_tensor(be, &bo, &to, LP_DTYPE_F32, s.n, s.m, out0)) {
		TEST_FAIL("allocation failed");
		goto out;
	}
	be->ops->matmul(be->ctx, &to, &tx, &tw, acc);
	be->ops->synchronize(be->ctx);
	double e = worst(bo.data, want, scale, s.n * s.m, &where);
	if (e > REL_TOL)
		TEST_FAIL("%s matmul %s n=%d k=%d m=%d acc=%d: relative error %g at [%d, %d] (got "
		          "%.9g, want %.9g)",
		          g_be_name[b], lp_dtype_name(t), s.n, s.k, s.m, acc, e, where / s.m,
		          where % s.m, ((float *)bo.data)[where], want[where]);
	else
		ok = true;
out:
	lp_backend_free(be, &bx);
	lp_backend_free(be, &bw);
	lp_backend_free(be, &bo);
	free(wbytes);
	free(wdeq);
	free(x);
	free(out0);
	free(want);
	free(scale);
	return ok;
}

/* The columns of a shape for type t: K-quant rows are 256-weight blocks,
 * Q5 rows 32; k_k and k_5 are the two choices. */
static int cols_for(enum lp_dtype t, int k_k, int k_5)
{
	return lp_dtype_block(t) == LP_QK_K ? k_k : k_5;
}

static void test_matmul(void)
{
	/* every batch from 1 to 17 on one shape (Gemma 3 270M's 640 columns
	 * for Q5_x), then shapes with other row and column counts */
	static const struct {
		int n, k_k, k_5, m;
	} shapes[] = {
	    {1, 256, 32, 1},  {4, 1024, 640, 100}, {17, 2048, 2048, 13}, {3, 768, 96, 130},
	    {9, 256, 640, 8}, {6, 512, 160, 33},   {33, 512, 96, 47},    {2, 2304, 1152, 21},
	};

	for (int b = 0; b < N_BACKENDS; b++) {
		for (int ti = 0; ti < N_NEW; ti++) {
			enum lp_dtype t = new_types[ti];
			for (int n = 1; n <= 17; n++)
				if (!check_matmul(
				        b, t, (struct shape){n, cols_for(t, 512, 640), 37}, n % 2))
					return;
			for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++)
				for (int acc = 0; acc < 2; acc++)
					if (!check_matmul(b, t,
					                  (struct shape){shapes[si].n,
					                                 cols_for(t, shapes[si].k_k,
					                                          shapes[si].k_5),
					                                 shapes[si].m},
					                  acc))
						return;
		}
	}
}

/* The AVX2 matrix-vector kernel itself, for 1 to 4 rows of x and a slice of
 * weight rows (whatever n the backend sends it), and the batch invariance
 * it gives: a row of x gets the same bits whatever the other rows. */
static void test_matvec_kernel(void)
{
#if LP_CPU_X86
	const int k_k = 1280, k_5 = 1440, m = 29, r0 = 3, r1 = 26;
	float *prep, *single;

	if (!lp_cpu_has_avx2()) {
		printf("note: no AVX2 on this CPU; the matrix-vector kernel is not run\n");
		return;
	}
	prep = aligned_alloc(32, (size_t)4 * LP_CPU_PREP_ROW_FLOATS * sizeof(float));
	single = malloc((size_t)m * sizeof(float));
	CHECK(prep && single);
	for (int ti = 0; ti < N_NEW && !test_current_failed; ti++) {
		enum lp_dtype t = new_types[ti];
		int k = cols_for(t, k_k, k_5);
		struct shape s = {4, k, m};
		uint8_t *w;
		float *wdeq, *x = malloc((size_t)(4 * k) * sizeof(float)), out[4 * 29];
		double want[4 * 29], scale[4 * 29];
		size_t stride = lp_dtype_row_bytes(t, k);

		make_weights(t, m, k, &w, &wdeq);
		for (int i = 0; i < 4 * k; i++)
			x[i] = frand(-1.0f, 1.0f);
		reference(x, wdeq, NULL, s, false, want, scale);
		for (int n = 1; n <= 4 && !test_current_failed; n++) {
			int where;

			for (int i = 0; i < 4 * m; i++)
				out[i] = 12345.0f;
			lp_cpu_matvec_prep_avx2(t, x, n, k, prep);
			lp_cpu_matvec_avx2(t, w, stride, r0, r1, k, x, n, prep, out, m, false);
			for (int j = 0; j < n; j++) {
				for (int r = 0; r < m; r++) {
					bool inside = r >= r0 && r < r1;
					if (!inside && out[j * m + r] != 12345.0f)
						TEST_FAIL(
						    "%s n=%d: row %d outside [%d, %d) written",
						    lp_dtype_name(t), n, r, r0, r1);
					if (!inside)
						out[j * m + r] = (float)want[j * m + r];
				}
			}
			double e = worst(out, want, scale, n * m, &where);
			if (e > REL_TOL)
				TEST_FAIL("%s matvec n=%d k=%d: relative error %g at [%d, %d]",
				          lp_dtype_name(t), n, k, e, where / m, where % m);
			/* row 0 alone gives the bits it gets beside others */
			if (n == 1) {
				memcpy(single, out, (size_t)m * sizeof(float));
			} else {
				for (int r = r0; r < r1; r++)
					if (bits(out[r]) != bits(single[r]))
						TEST_FAIL("%s matvec: row 0 differs with n=%d",
						          lp_dtype_name(t), n);
			}
		}
		free(w);
		free(wdeq);
		free(x);
	}
	free(prep);
	free(single);
#else
	printf("note: not x86; the AVX2 matrix-vector kernel is not built\n");
#endif
}

/* 1 and 3 threads give the same bits, on both paths. */
static void test_thread_invariant(void)
{
	static const struct shape shapes[] = {{1, 0, 517}, {3, 0, 37}, {21, 0, 53}};

	for (int path = 0; path < 2; path++) {
		struct lp_backend *many = g_be[path], *one = NULL;
		struct lp_err err = {0};

		if (path == 1)
			setenv("LP_CPU_NO_AVX2", "1", 1);
		int rc = lp_backend_cpu_new(&one, 1, &err);
		unsetenv("LP_CPU_NO_AVX2");
		CHECK_OK(rc, &err);
		for (int ti = 0; ti < N_NEW; ti++) {
			enum lp_dtype t = new_types[ti];
			for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
				struct shape s = shapes[si];
				struct lp_buffer bx = {0}, bw = {0}, bo1 = {0}, bo2 = {0};
				struct lp_tensor tx, tw, to1, to2;
				uint8_t *wbytes;
				float *wdeq, *x;
				bool same = false;

				s.k = cols_for(t, 768, 640);
				x = malloc((size_t)(s.n * s.k) * sizeof(float));
				for (int i = 0; i < s.n * s.k; i++)
					x[i] = frand(-1.0f, 1.0f);
				make_weights(t, s.m, s.k, &wbytes, &wdeq);
				if (!dev_tensor(many, &bx, &tx, LP_DTYPE_F32, s.n, s.k, x) &&
				    !dev_tensor(many, &bw, &tw, t, s.m, s.k, wbytes) &&
				    !dev_tensor(many, &bo1, &to1, LP_DTYPE_F32, s.n, s.m, NULL) &&
				    !dev_tensor(many, &bo2, &to2, LP_DTYPE_F32, s.n, s.m, NULL)) {
					one->ops->matmul(one->ctx, &to1, &tx, &tw, false);
					many->ops->matmul(many->ctx, &to2, &tx, &tw, false);
					many->ops->synchronize(many->ctx);
					same =
					    memcmp(bo1.data, bo2.data, lp_tensor_bytes(&to1)) == 0;
				}
				lp_backend_free(many, &bx);
				lp_backend_free(many, &bw);
				lp_backend_free(many, &bo1);
				lp_backend_free(many, &bo2);
				free(wbytes);
				free(wdeq);
				free(x);
				if (!same) {
					lp_backend_destroy(one);
					CHECK_MSG(0, "%s %s n=%d k=%d m=%d: 1 and 3 threads differ",
					          g_be_name[path], lp_dtype_name(t), s.n, s.k, s.m);
				}
			}
		}
		lp_backend_destroy(one);
	}
}

static void test_get_rows(void)
{
	for (int b = 0; b < N_BACKENDS; b++) {
		struct lp_backend *be = g_be[b];
		for (int ti = 0; ti < N_NEW; ti++) {
			enum lp_dtype t = new_types[ti];
			int64_t rows = 50, cols = cols_for(t, 768, 640);
			int32_t ids[7] = {3, 0, 49, 3, 17, 49, 0};
			struct lp_buffer bt = {0}, bo = {0}, bi = {0};
			struct lp_tensor tt, to, ti32;
			uint8_t *bytes;
			float *deq;
			int bad = -1;
			bool ran = false;

			make_weights(t, rows, cols, &bytes, &deq);
			if (!dev_tensor(be, &bt, &tt, t, rows, cols, bytes) &&
			    !dev_tensor(be, &bo, &to, LP_DTYPE_F32, 7, cols, NULL) &&
			    !dev_tensor(be, &bi, &ti32, LP_DTYPE_I32, 1, 7, ids)) {
				memset(bo.data, 0x7f, bo.size);
				be->ops->get_rows(be->ctx, &to, &tt, ti32.data, 7);
				be->ops->synchronize(be->ctx);
				ran = true;
				for (int i = 0; i < 7 && bad < 0; i++)
					if (memcmp((float *)bo.data + i * cols, deq + ids[i] * cols,
					           (size_t)cols * sizeof(float)))
						bad = i;
			}
			lp_backend_free(be, &bt);
			lp_backend_free(be, &bo);
			lp_backend_free(be, &bi);
			free(bytes);
			free(deq);
			CHECK_MSG(ran, "allocation failed");
			CHECK_MSG(bad < 0,
			          "%s get_rows %s: row %d differs from the dequantized table",
			          g_be_name[b], lp_dtype_name(t), bad);
		}
	}
}

/* The CPU backend keeps every new type as it is; a width that is not whole
 * blocks is refused. */
static void test_import(void)
{
	struct lp_backend_info info;
	struct lp_err err = {0};
	struct lp_tensor t;
	struct lp_buffer b = {0};
	static uint8_t w[4 * 210];

	g_be[0]->ops->info(g_be[0]->ctx, &info);
	for (int ti = 0; ti < N_NEW; ti++) {
		enum lp_dtype ty = new_types[ti];
		int64_t cols = lp_dtype_block(ty);

		CHECK_MSG(info.weight_types & (1u << ty), "%s not in weight_types",
		          lp_dtype_name(ty));
		CHECK_OK(g_be[0]->ops->import_weight(g_be[0]->ctx, w, ty, 2, cols, &t, &b, &err),
		         &err);
		CHECK(t.data == (void *)w && t.type == ty && t.rows == 2 && t.cols == cols);
		lp_backend_free(g_be[0], &b);
		CHECK_EQ_INT(
		    g_be[0]->ops->import_weight(g_be[0]->ctx, w, ty, 1, cols + 16, &t, &b, &err),
		    -EINVAL);
	}
}

int main(void)
{
	struct lp_err err = {0};

	TEST_MAIN_BEGIN("test-kquants");
	unsetenv("LP_CPU_NO_AVX2");
	if (lp_backend_cpu_new(&g_be[0], 3, &err) || lp_backend_cpu_new(&g_be[2], 1, &err)) {
		printf("FAIL test-kquants:setup: %s\n", err.msg);
		return 1;
	}
	setenv("LP_CPU_NO_AVX2", "1", 1);
	if (lp_backend_cpu_new(&g_be[1], 3, &err)) {
		printf("FAIL test-kquants:setup: %s\n", err.msg);
		return 1;
	}
	unsetenv("LP_CPU_NO_AVX2");

	RUN(test_sizes);
	RUN(test_dequant_random);
	RUN(test_dequant_real);
	RUN(test_matmul);
	RUN(test_matvec_kernel);
	RUN(test_thread_invariant);
	RUN(test_get_rows);
	RUN(test_import);

	for (int b = 0; b < N_BACKENDS; b++)
		lp_backend_destroy(g_be[b]);
	TEST_MAIN_END();
}
