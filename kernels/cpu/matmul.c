/* out (+)= x . w^T on the CPU for every weight dtype.
 *
 * Work is split over output columns (rows of w), so each thread streams its
 * own slice of the weights once and every output element is computed by
 * the same sequence of operations whatever the thread count.
 *
 *   n <= cpu->matvec_batch[type] (decode): matrix-vector, weights expanded in
 *     registers block by block and multiplied into up to
 *     LP_CPU_MATVEC_MAX_N rows of x at a time (vec-avx2.c); for 4- to 6-bit
 *     weights x is first copied, reordered and scaled, into the layout the
 *     kernel wants (lp_cpu_matvec_prep_avx2).
 *   larger n (prefill): per thread, panels of LP_CPU_NR weight rows by
 *     LP_CPU_KC columns are dequantized into the thread's scratch and
 *     multiplied into every row of x by a register-blocked micro-kernel.
 *   no AVX2: each weight row is dequantized LP_CPU_KC columns at a time into
 *     scratch and dotted with every row of x in plain C. */
#include "kernels/cpu/cpu.h"

#include <assert.h>

struct matmul_task {
	struct lp_cpu *cpu;
	float *out;     /* [n, m] */
	const float *x; /* [n, k] */
	const void *w;  /* [m, k] of type */
	enum lp_dtype type;
	bool avx512;     /* the matrix-vector product by lp_cpu_matvec_avx512 */
	size_t w_stride; /* bytes per row of w */
	int64_t n, k, m;
	bool accumulate;
};

static void matmul_scalar_thread(void *arg, int chunk, int n_chunks, int thread)
{
	const struct matmul_task *t = arg;
	float *row = t->cpu->scratch[thread].rows;
	int64_t r0, r1;

	lp_cpu_split(t->m, chunk, n_chunks, &r0, &r1);
	for (int64_t r = r0; r < r1; r++) {
		const char *wr = (const char *)t->w + (size_t)r * t->w_stride;

		for (int64_t k0 = 0; k0 < t->k; k0 += LP_CPU_KC) {
			int64_t kc = t->k - k0 < LP_CPU_KC ? t->k - k0 : LP_CPU_KC;

			lp_dequantize_row(t->type, wr + lp_dtype_row_bytes(t->type, k0), row, kc);
			for (int64_t i = 0; i < t->n; i++) {
				const float *xi = t->x + i * t->k + k0;
				float *o = t->out + i * t->m + r;
				float s = (k0 > 0 || t->accumulate) ? *o : 0.0f;

				for (int64_t kk = 0; kk < kc; kk++)
					s += xi[kk] * row[kk];
				*o = s;
			}
		}
	}
}

#if LP_CPU_X86
static void matvec_avx2_thread(void *arg, int chunk, int n_chunks, int thread)
{
	const struct matmul_task *t = arg;
	int64_t r0, r1;

	lp_cpu_split(t->m, chunk, n_chunks, &r0, &r1);
	for (int64_t c0 = r0; c0 < r1; c0 += LP_CPU_MATVEC_ROW_CHUNK) {
		int64_t c1 = r1 - c0 < LP_CPU_MATVEC_ROW_CHUNK ? r1 : c0 + LP_CPU_MATVEC_ROW_CHUNK;

		if (t->avx512) {
			/* groups of equal size: 16 rows as 8 + 8, not 12 + 4 */
			int64_t groups =
			    (t->n + LP_CPU_MATVEC512_MAX_N - 1) / LP_CPU_MATVEC512_MAX_N;
			for (int64_t i = 0; i < groups; i++) {
				int64_t g = t->n * i / groups, rows = t->n * (i + 1) / groups - g;
				lp_cpu_matvec_avx512(t->type, t->w, t->w_stride, c0, c1, t->k,
				                     (int)rows,
				                     t->cpu->xsum + g * LP_CPU_PREP_ROW_FLOATS,
				                     t->out + g * t->m, t->m, t->accumulate);
			}
			continue;
		}
		for (int64_t g = 0; g < t->n; g += LP_CPU_MATVEC_MAX_N) {
			int rows =
			    (int)(t->n - g < LP_CPU_MATVEC_MAX_N ? t->n - g : LP_CPU_MATVEC_MAX_N);

			lp_cpu_matvec_avx2(t->type, t->w, t->w_stride, c0, c1, t->k,
			                   t->x + g * t->k, rows,
			                   t->cpu->xsum + g * LP_CPU_PREP_ROW_FLOATS,
			                   t->out + g * t->m, t->m, t->accumulate);
		}
	}
}

static void gemm_avx2_thread(void *arg, int chunk, int n_chunks, int thread)
{
	const struct matmul_task *t = arg;
	struct lp_cpu_scratch *s = &t->cpu->scratch[thread];
	int64_t n_panels = (t->m + LP_CPU_NR - 1) / LP_CPU_NR;
	int64_t p0, p1;

	lp_cpu_split(n_panels, chunk, n_chunks, &p0, &p1);
	for (int64_t k0 = 0; k0 < t->k; k0 += LP_CPU_KC) {
		int64_t kc = t->k - k0 < LP_CPU_KC ? t->k - k0 : LP_CPU_KC;

		for (int64_t p = p0; p < p1; p++) {
			int64_t c0 = p * LP_CPU_NR;
			int ncols = (int)(t->m - c0 < LP_CPU_NR ? t->m - c0 : LP_CPU_NR);

			lp_cpu_pack_panel_avx2(t->type, t->w, t->w_stride, c0, ncols, k0, kc,
			                       s->panel, s->rows, t->cpu->avx512);
			if (t->cpu->avx512 && p + 1 < p1) {
				/* two panels at a time: each row's broadcasts serve 32
				 * columns */
				int nc2 =
				    (int)(t->m - c0 - LP_CPU_NR < LP_CPU_NR ? t->m - c0 - LP_CPU_NR
				                                            : LP_CPU_NR);
				lp_cpu_pack_panel_avx2(t->type, t->w, t->w_stride, c0 + LP_CPU_NR,
				                       nc2, k0, kc, s->panel2, s->rows, true);
				lp_cpu_gemm_panels_avx512((int)t->n, kc, t->x + k0, t->k, s->panel,
				                          s->panel2, t->out + c0, t->m, nc2,
				                          k0 > 0 || t->accumulate);
				p++;
				continue;
			}
			(t->cpu->avx512 ? lp_cpu_gemm_panel_avx512 : lp_cpu_gemm_panel_avx2)(
			    (int)t->n, kc, t->x + k0, t->k, s->panel, t->out + c0, t->m, ncols,
			    k0 > 0 || t->accumulate);
		}
	}
}
#endif

/* Up to these batches the matrix-vector path (one pass over the weights,
 * expanded again for every group of rows) beats the GEMM (panels
 * dequantized once, then reused by every row), per weight type and set of
 * kernels: measured with `bench --only crossover` (the matrices of a decode
 * step of SmolLM2-135M in each type, 2 threads; docs/benchmarks.md, "Decode
 * batch sweep"). Both paths give a row the same result whatever the other
 * rows, but not the same as each other. */
int lp_cpu_matvec_batch_default(enum lp_dtype t, bool avx512)
{
	if (avx512) {
		switch (t) {
		case LP_DTYPE_F32:
			return 8;
		case LP_DTYPE_F16:
		case LP_DTYPE_BF16:
			return 12;
		case LP_DTYPE_Q5_0:
		case LP_DTYPE_Q5_1:
			return 14;
		case LP_DTYPE_Q4_0:
		case LP_DTYPE_Q4_1:
			return 16;
		case LP_DTYPE_Q4_K:
			return 20;
		case LP_DTYPE_Q8_0:
			return 24;
		default: /* Q5_K, Q6_K: the matrix-vector path up to 32 */
			return 32;
		}
	}
	switch (t) {
	case LP_DTYPE_F32:
		return 8;
	case LP_DTYPE_Q8_0:
	case LP_DTYPE_BF16:
	case LP_DTYPE_Q5_0:
	case LP_DTYPE_Q5_1:
		return 14;
	case LP_DTYPE_Q6_K:
		return 32;
	default: /* F16, Q4_0, Q4_1, Q4_K, Q5_K */
		return 16;
	}
}

void lp_cpu_matmul(struct lp_cpu *cpu, struct lp_tensor *out, const struct lp_tensor *x,
                   const struct lp_tensor *w, bool accumulate)
{
	struct matmul_task t = {
	    .cpu = cpu,
	    .out = out->data,
	    .x = x->data,
	    .w = w->data,
	    .type = w->type,
	    .w_stride = lp_dtype_row_bytes(w->type, w->cols),
	    .n = x->rows,
	    .k = x->cols,
	    .m = w->rows,
	    .accumulate = accumulate,
	};

	assert(x->type == LP_DTYPE_F32 && out->type == LP_DTYPE_F32);
	assert(w->cols == x->cols && out->rows == x->rows && out->cols == w->rows);
	assert(t.w_stride > 0 && w->type != LP_DTYPE_I32);
	if (t.n == 0 || t.m == 0)
		return;
	if (t.k == 0) {
		if (!accumulate)
			memset(t.out, 0, (size_t)(t.n * t.m) * sizeof(float));
		return;
	}
#if LP_CPU_X86
	if (cpu->avx2) {
		int64_t work = t.n * t.m * t.k;
		if (t.n <= cpu->matvec_batch[t.type] && t.k / LP_QK <= LP_CPU_MATVEC_MAX_BLOCKS) {
			t.avx512 = cpu->avx512 && lp_cpu_matvec512(t.type);
			if (t.avx512)
				lp_cpu_matvec_prep_avx512(t.type, t.x, (int)t.n, t.k, cpu->xsum);
			else if (lp_cpu_matvec_prepped(t.type))
				lp_cpu_matvec_prep_avx2(t.type, t.x, (int)t.n, t.k, cpu->xsum);
			lp_cpu_parallel(cpu, work, t.m / 16, matvec_avx2_thread, &t);
		} else {
			lp_cpu_parallel(cpu, work, (t.m + LP_CPU_NR - 1) / LP_CPU_NR,
			                gemm_avx2_thread, &t);
		}
		return;
	}
#endif
	lp_cpu_parallel(cpu, t.n * t.m * t.k, t.m, matmul_scalar_thread, &t);
}
