/* The CPU backend's AVX-512 kernels (kernels/cpu/vec-avx512.c) give the
 * same bits as the AVX2 ones they stand in for: every weight type, batches
 * 1 to 40 (the matrix-vector path and the GEMM, each forced too), weight
 * row counts that fill no whole panel, with and without accumulation, on 1
 * and 3 threads. On a CPU without AVX-512 the test says so and checks that
 * the backend does not claim it. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/cpu/cpu.h"
#include "tests/test.h"

static const enum lp_dtype types[] = {LP_DTYPE_F32,  LP_DTYPE_F16,  LP_DTYPE_BF16, LP_DTYPE_Q8_0,
                                      LP_DTYPE_Q4_0, LP_DTYPE_Q4_1, LP_DTYPE_Q5_0, LP_DTYPE_Q5_1,
                                      LP_DTYPE_Q4_K, LP_DTYPE_Q5_K, LP_DTYPE_Q6_K};
#define N_TYPES (int)(sizeof(types) / sizeof(types[0]))

static uint64_t rng_state = 0x617678353132ULL;

static uint64_t rng_next(void)
{
	return test_splitmix64(&rng_state);
}

static float frand(float lo, float hi)
{
	return lo + (hi - lo) * (float)(rng_next() >> 40) / (float)(1 << 24);
}

/* Random blocks with finite scales of either sign (random bytes, then the
 * f16 scale fields overwritten); plain types random in [-1, 1]. */
static void *make_weights(enum lp_dtype t, int64_t m, int64_t k)
{
	size_t total = lp_dtype_row_bytes(t, k) * (size_t)m;
	uint8_t *p = malloc(total + 1);

	if (lp_dtype_block(t) == 1) {
		for (int64_t i = 0; i < m * k; i++) {
			float v = frand(-1, 1);
			if (t == LP_DTYPE_F32)
				memcpy(p + 4 * i, &v, 4);
			else {
				uint16_t h =
				    t == LP_DTYPE_F16 ? lp_f32_to_f16(v) : lp_f32_to_bf16(v);
				memcpy(p + 2 * i, &h, 2);
			}
		}
		return p;
	}
	size_t bb = lp_dtype_block_bytes(t);
	for (size_t i = 0; i < total; i++)
		p[i] = (uint8_t)rng_next();
	for (size_t b = 0; b < total / bb; b++) {
		uint8_t *q = p + b * bb;
		uint16_t d = lp_f32_to_f16(((rng_next() & 1) ? 1 : -1) * frand(2e-3f, 2e-2f));
		uint16_t mm = lp_f32_to_f16(frand(-1e-1f, 1e-1f));

		if (t == LP_DTYPE_Q6_K) {
			memcpy(q + 208, &d, 2);
			continue;
		}
		memcpy(q, &d, 2);
		if (t == LP_DTYPE_Q4_1 || t == LP_DTYPE_Q5_1 || t == LP_DTYPE_Q4_K ||
		    t == LP_DTYPE_Q5_K)
			memcpy(q + 2, &mm, 2);
	}
	return p;
}

static struct lp_backend *make_backend(int threads, bool avx512, const char *batch)
{
	struct lp_err err = {0};
	struct lp_backend *be = NULL;

	if (!avx512)
		setenv("LP_CPU_NO_AVX512", "1", 1);
	if (batch)
		setenv("LP_CPU_MATVEC_BATCH", batch, 1);
	int rc = lp_backend_cpu_new(&be, threads, &err);
	unsetenv("LP_CPU_NO_AVX512");
	unsetenv("LP_CPU_MATVEC_BATCH");
	if (rc)
		TEST_FAIL("lp_backend_cpu_new: %s", err.msg);
	return rc ? NULL : be;
}

/* out = x . w^T on backend be (host memory: the CPU backend's is). */
static void product(struct lp_backend *be, enum lp_dtype t, const void *w, const float *x,
                    float *out, int n, int64_t k, int64_t m, bool acc)
{
	struct lp_tensor tx = {(void *)x, LP_DTYPE_F32, n, k};
	struct lp_tensor tw = {(void *)w, t, m, k};
	struct lp_tensor to = {out, LP_DTYPE_F32, n, m};

	be->ops->matmul(be->ctx, &to, &tx, &tw, acc);
}

/* Every type and batch on backends a (AVX-512) and b (AVX2) of the same
 * crossover: the same bits. */
static bool same_bits(struct lp_backend *a, struct lp_backend *b, const char *label)
{
	static const int ns[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16, 17, 24, 31, 32, 33, 40};

	for (int ti = 0; ti < N_TYPES; ti++) {
		enum lp_dtype t = types[ti];
		int64_t k = lp_dtype_block(t) == LP_QK_K ? 768 : lp_dtype_block(t) == 1 ? 584 : 576;
		int64_t m = 45;
		void *w = make_weights(t, m, k);
		float *x = malloc(sizeof(float) * 40 * (size_t)k);
		float *o1 = malloc(sizeof(float) * 40 * (size_t)m);
		float *o2 = malloc(sizeof(float) * 40 * (size_t)m);
		bool ok = true;

		for (int64_t i = 0; i < 40 * k; i++)
			x[i] = frand(-2, 2);
		for (size_t ni = 0; ok && ni < sizeof(ns) / sizeof(ns[0]); ni++) {
			int n = ns[ni];
			bool acc = ni % 3 == 1;
			for (int64_t i = 0; i < n * m; i++)
				o1[i] = o2[i] = frand(-1, 1);
			product(a, t, w, x, o1, n, k, m, acc);
			product(b, t, w, x, o2, n, k, m, acc);
			for (int64_t i = 0; i < n * m && ok; i++) {
				if (memcmp(&o1[i], &o2[i], 4) != 0) {
					TEST_FAIL(
					    "%s %s n=%d acc=%d: [%d, %d] AVX-512 %.9g, AVX2 %.9g",
					    label, lp_dtype_name(t), n, acc, (int)(i / m),
					    (int)(i % m), o1[i], o2[i]);
					ok = false;
				}
			}
		}
		free(w);
		free(x);
		free(o1);
		free(o2);
		if (!ok)
			return false;
	}
	return true;
}

static void test_same_bits(void)
{
	/* one crossover for both (their measured tables differ), then each
	 * path forced */
	static const char *const batches[] = {"8", "32", "0"};
	static const char *const labels[] = {"crossover-8", "matvec-forced", "gemm-forced"};

	for (int threads = 1; threads <= 3; threads += 2) {
		for (int i = 0; i < 3; i++) {
			struct lp_backend *a = make_backend(threads, true, batches[i]);
			struct lp_backend *b = make_backend(threads, false, batches[i]);
			char label[64];

			snprintf(label, sizeof(label), "%s x%d", labels[i], threads);
			if (a && b) {
				CHECK(lp_backend_cpu_uses_avx512(a) &&
				      !lp_backend_cpu_uses_avx512(b));
				CHECK(lp_backend_cpu_uses_avx2(b));
			}
			bool ok = a && b && same_bits(a, b, label);
			lp_backend_destroy(a);
			lp_backend_destroy(b);
			if (!ok)
				return;
		}
	}
}

static void test_switches(void)
{
	struct lp_backend *be = make_backend(1, true, NULL);

	if (!be)
		return;
	CHECK(lp_backend_cpu_uses_avx512(be) == lp_cpu_has_avx512());
	lp_backend_destroy(be);
	setenv("LP_CPU_NO_AVX2", "1", 1);
	be = make_backend(1, true, NULL);
	unsetenv("LP_CPU_NO_AVX2");
	if (be)
		CHECK(!lp_backend_cpu_uses_avx512(be) && !lp_backend_cpu_uses_avx2(be));
	lp_backend_destroy(be);
}

int main(void)
{
	TEST_MAIN_BEGIN("test-avx512");
	unsetenv("LP_CPU_NO_AVX2");
	RUN(test_switches);
	if (lp_cpu_has_avx512())
		RUN(test_same_bits);
	else
		printf("note: this CPU has no AVX-512; only the switches were checked\n");
	TEST_MAIN_END();
}
