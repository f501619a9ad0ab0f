/* LoRA shrink and expand over adapter segments (SGMV) on the CPU.
 *
 * shrink: tmp[row, r] = x[row] . a[r]        for the rows of each segment
 * expand: out[row, o] += sum over k of tmp[row, k] * b[k, o]   (b = B transposed)
 *
 * Work is cut into (segment, output range) units so that a decode step with
 * one row per adapter still spreads over every thread. Each output element
 * is one dot product in a fixed order, so a row's result does not depend on
 * what else is in the batch. */
#include <math.h>
#include <string.h>

#include "kernels/cpu/cpu.h"

#if LP_CPU_X86
#include <immintrin.h>

__attribute__((target("avx2,fma"))) static float dot_avx2(const float *a, const float *b, int64_t n)
{
	__m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
	int64_t i = 0;
	float tail = 0, lanes[8];

	for (; i + 16 <= n; i += 16) {
		s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
		s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
	}
	for (; i + 8 <= n; i += 8)
		s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
	for (; i < n; i++)
		tail += a[i] * b[i];
	_mm256_storeu_ps(lanes, _mm256_add_ps(s0, s1));
	return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
	       ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail;
}

/* o[0..n) += sum over k < rank of t[k] * b[k * ldb + 0..n): rank rows of
 * b scaled and added, 64 outputs at a time kept in registers. */
__attribute__((target("avx2,fma"))) static void
axpy_rows_avx2(const float *t, const float *b, int64_t ldb, int rank, float *o, int64_t n)
{
	int64_t c = 0;

	for (; c + 64 <= n; c += 64) {
		__m256 acc[8];
		for (int i = 0; i < 8; i++)
			acc[i] = _mm256_loadu_ps(o + c + 8 * i);
		for (int k = 0; k < rank; k++) {
			__m256 tk = _mm256_broadcast_ss(t + k);
			const float *bk = b + (size_t)k * (size_t)ldb + c;
			for (int i = 0; i < 8; i++)
				acc[i] = _mm256_fmadd_ps(tk, _mm256_loadu_ps(bk + 8 * i), acc[i]);
		}
		for (int i = 0; i < 8; i++)
			_mm256_storeu_ps(o + c + 8 * i, acc[i]);
	}
	for (; c + 8 <= n; c += 8) {
		__m256 acc = _mm256_loadu_ps(o + c);
		for (int k = 0; k < rank; k++)
			acc =
			    _mm256_fmadd_ps(_mm256_broadcast_ss(t + k),
			                    _mm256_loadu_ps(b + (size_t)k * (size_t)ldb + c), acc);
		_mm256_storeu_ps(o + c, acc);
	}
	for (; c < n; c++) {
		float acc = o[c];
		for (int k = 0; k < rank; k++)
			acc = fmaf(t[k], b[(size_t)k * (size_t)ldb + c], acc);
		o[c] = acc;
	}
}
#endif

/* Outputs per expand work unit. */
#define EXPAND_COLS 64

static float dot_scalar(const float *a, const float *b, int64_t n)
{
	float s[8] = {0};
	int64_t i = 0;
	float tail = 0;

	for (; i + 8 <= n; i += 8)
		for (int j = 0; j < 8; j++)
			s[j] += a[i + j] * b[i + j];
	for (; i < n; i++)
		tail += a[i] * b[i];
	return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + tail;
}

struct lora_job {
	struct lp_cpu *cpu;
	const struct lp_lora_seg *segs;
	int n_segs;
	const struct lp_tensor *in; /* x (shrink) or tmp (expand) */
	struct lp_tensor *out;      /* tmp (shrink) or out (expand) */
	bool expand;
	int64_t per_seg; /* output units per segment */
};

static void lora_chunk(void *arg, int chunk, int n_chunks, int thread)
{
	const struct lora_job *j = arg;
	int64_t total = (int64_t)j->n_segs * j->per_seg, begin, end;
	float (*dot)(const float *, const float *, int64_t) = dot_scalar;

	(void)thread;
#if LP_CPU_X86
	if (j->cpu->avx2)
		dot = dot_avx2;
#endif
	lp_cpu_split(total, chunk, n_chunks, &begin, &end);
	for (int64_t u = begin; u < end; u++) {
		const struct lp_lora_seg *g = &j->segs[u / j->per_seg];
		int64_t o = u % j->per_seg;
		const float *in_base = j->in->data;
		float *out_base = j->out->data;
		int64_t ld_in = j->in->cols, ld_out = j->out->cols;

		if (!j->expand) {
			/* units are rank rows; segments of lower rank skip the rest */
			if (o >= g->a->rows)
				continue;
			const float *a = (const float *)g->a->data + o * g->a->cols;
			for (int32_t r = g->row0; r < g->row0 + g->rows; r++)
				out_base[r * ld_out + o] = dot(in_base + r * ld_in, a, g->a->cols);
		} else {
			/* units are ranges of EXPAND_COLS outputs; that slice of b
			 * stays in cache across the segment's rows */
			int64_t o0 = o * EXPAND_COLS, o1 = o0 + EXPAND_COLS;
			int rank = (int)g->b->rows;
			int64_t ldb = g->b->cols;
			const float *bm = (const float *)g->b->data + o0;
			if (o1 > ldb)
				o1 = ldb;
			for (int32_t r = g->row0; r < g->row0 + g->rows; r++) {
				const float *t = in_base + r * ld_in;
				float *orow = out_base + r * ld_out + o0;
#if LP_CPU_X86
				if (j->cpu->avx2) {
					axpy_rows_avx2(t, bm, ldb, rank, orow, o1 - o0);
					continue;
				}
#endif
				for (int64_t c = 0; c < o1 - o0; c++) {
					float acc = orow[c];
					for (int k = 0; k < rank; k++)
						acc = fmaf(t[k], bm[(size_t)k * (size_t)ldb + c],
						           acc);
					orow[c] = acc;
				}
			}
		}
	}
}

static void lora_run(struct lp_cpu *cpu, struct lora_job *j)
{
	int64_t work = 0;

	if (j->n_segs <= 0)
		return;
	for (int i = 0; i < j->n_segs; i++)
		work += (int64_t)j->segs[i].rows * j->segs[i].a->rows *
		        (j->expand ? j->segs[i].b->cols : j->segs[i].a->cols);
	lp_cpu_parallel(cpu, work, (int64_t)j->n_segs * j->per_seg, lora_chunk, j);
}

void lp_cpu_lora_shrink(struct lp_cpu *cpu, struct lp_tensor *tmp, const struct lp_tensor *x,
                        const struct lp_lora_seg *segs, int n_segs)
{
	struct lora_job j = {cpu, segs, n_segs, x, tmp, false, 0};

	for (int i = 0; i < n_segs; i++)
		if (segs[i].a->rows > j.per_seg)
			j.per_seg = segs[i].a->rows;
	lora_run(cpu, &j);
}

void lp_cpu_lora_expand(struct lp_cpu *cpu, struct lp_tensor *out, const struct lp_tensor *tmp,
                        const struct lp_lora_seg *segs, int n_segs)
{
	struct lora_job j = {
	    cpu, segs, n_segs, tmp, out, true, (out->cols + EXPAND_COLS - 1) / EXPAND_COLS};

	lora_run(cpu, &j);
}
