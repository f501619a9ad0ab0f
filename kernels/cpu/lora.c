/* LoRA over adapter segments (SGMV) on the CPU, and its slots; the
 * contract is in kernels/backend.h (struct lp_lora_args, lora_fill).
 *
 * A slot is what lora_fill recorded: the adapter's struct lp_lora_weights by
 * value, its pointers aliasing the host weights (nothing is copied). The op
 * reads, for each segment, its slot's stacked A and pairs for (layer,
 * group); a segment naming a slot outside the range or an empty one, or
 * rows outside the step, is skipped and recorded in the sticky status.
 *
 * Each segment's rows are cut into units of at most LORA_MR rows. When there
 * are at least as many units as threads, a unit is the work of one thread
 * from start to end: shrink (tmp rows = x rows . A^T, every target at once
 * from the stacked A) then expand into every output, so each adapter's
 * weights stream through one core once per step and no thread waits for
 * another between the two. With fewer units (one sequence decoding alone)
 * the shrink is split over blocks of A rows and the expand over panels of
 * B, in two runs on the pool.
 *
 * Both paths compute every element the same way: tmp[row, k] is one dot
 * product in a fixed order, and out[row, o] adds tmp[row, k] * b[k, o] for k
 * in order with fused multiply-adds. So a row's result depends neither on
 * the path nor on the other rows of its unit or batch. */
#include <errno.h>
#include <math.h>
#include <string.h>

#include "kernels/cpu/cpu.h"
#include "kernels/dtype.h"

/* Rows of a unit: the micro-kernels keep LORA_MR rows' accumulators in
 * registers and reuse every weight they load that many times. */
#define LORA_MR 4
/* A rows per shrink item, and B panels per expand item, on the split path. */
#define SPLIT_K      8
#define SPLIT_PANELS 2

/* ---- micro-kernels: nr (<= LORA_MR) rows at a time ---- */

/* Element i of weights of type t (f32, f16 or bf16), as f32: exact. */
static inline float elem(const void *w, size_t i, enum lp_dtype t)
{
	uint16_t h;

	if (t == LP_DTYPE_F32)
		return ((const float *)w)[i];
	memcpy(&h, (const uint16_t *)w + i, sizeof(h));
	return t == LP_DTYPE_F16 ? lp_f16_to_f32(h) : lp_bf16_to_f32(h);
}

/* Row k of a matrix of type t with `cols` columns. */
static inline const void *row_at(const void *w, int64_t k, int64_t cols, enum lp_dtype t)
{
	return (const char *)w + (size_t)k * (size_t)cols * (t == LP_DTYPE_F32 ? 4 : 2);
}

static float dot_scalar(const float *x, const void *a, enum lp_dtype at, int64_t n)
{
	float s[8] = {0};
	int64_t i = 0;
	float tail = 0;

	for (; i + 8 <= n; i += 8)
		for (int j = 0; j < 8; j++)
			s[j] += x[i + j] * elem(a, (size_t)(i + j), at);
	for (; i < n; i++)
		tail += x[i] * elem(a, (size_t)i, at);
	return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + tail;
}

/* t[r, k] = x[r] . a[k] for r < nr, k0 <= k < k1. */
static void shrink_scalar(const float *x, int64_t ldx, int nr, const void *a, enum lp_dtype at,
                          int64_t in, int k0, int k1, float *t, int64_t ldt)
{
	for (int k = k0; k < k1; k++)
		for (int r = 0; r < nr; r++)
			t[r * ldt + k] = dot_scalar(x + r * ldx, row_at(a, k, in, at), at, in);
}

/* o[r, p0 .. p1) += t[r, 0 .. rank) . b over the panels starting at
 * columns p0 .. p1 (multiples of LP_LORA_PANEL, p1 capped at out). */
static void expand_scalar(const float *t, int64_t ldt, int nr, const void *b, enum lp_dtype bt,
                          int rank, int out, int p0, int p1, float *o, int64_t ldo)
{
	for (int p = p0; p < p1 && p < out; p += LP_LORA_PANEL) {
		int w = out - p < LP_LORA_PANEL ? out - p : LP_LORA_PANEL;
		const void *bp = row_at(b, p, rank, bt); /* panel p starts at p * rank */
		for (int r = 0; r < nr; r++)
			for (int c = 0; c < w; c++) {
				float acc = o[r * ldo + p + c];
				for (int k = 0; k < rank; k++)
					acc = fmaf(t[r * ldt + k],
					           elem(bp, (size_t)k * (size_t)w + (size_t)c, bt),
					           acc);
				o[r * ldo + p + c] = acc;
			}
	}
}

#if LP_CPU_X86
#include <immintrin.h>

#define AVX2        __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) static inline

AVX2_INLINE float hsum(__m256 v)
{
	float l[8];

	_mm256_storeu_ps(l, v);
	return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
}

/* Eight weights from element i of w, type t, as f32 (exact). */
AVX2_INLINE __m256 load8(const void *w, int64_t i, const enum lp_dtype t)
{
	if (t == LP_DTYPE_F32)
		return _mm256_loadu_ps((const float *)w + i);
	__m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
	if (t == LP_DTYPE_F16)
		return _mm256_cvtph_ps(h);
	return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* One dot product per (row, k), eight lanes over i then the lanes summed
 * in a fixed order, then the tail: the same for any nr and either k of a
 * pair. */
AVX2_INLINE void shrink_avx2_nr(const float *x, int64_t ldx, const int nr, const void *a,
                                const enum lp_dtype at, int64_t in, int k0, int k1, float *t,
                                int64_t ldt)
{
	int64_t in8 = in / 8 * 8;

	for (int k = k0; k < k1; k += 2) {
		const bool two = k + 1 < k1;
		const void *a0 = row_at(a, k, in, at), *a1 = two ? row_at(a, k + 1, in, at) : a0;
		__m256 s0[LORA_MR], s1[LORA_MR];

#pragma GCC unroll 4
		for (int r = 0; r < nr; r++)
			s0[r] = s1[r] = _mm256_setzero_ps();
		for (int64_t i = 0; i < in8; i += 8) {
			__m256 va0 = load8(a0, i, at), va1 = load8(a1, i, at);
#pragma GCC unroll 4
			for (int r = 0; r < nr; r++) {
				__m256 vx = _mm256_loadu_ps(x + r * ldx + i);
				s0[r] = _mm256_fmadd_ps(va0, vx, s0[r]);
				s1[r] = _mm256_fmadd_ps(va1, vx, s1[r]);
			}
		}
#pragma GCC unroll 4
		for (int r = 0; r < nr; r++) {
			const float *xr = x + r * ldx;
			float tail0 = 0, tail1 = 0;
			for (int64_t i = in8; i < in; i++) {
				tail0 += xr[i] * elem(a0, (size_t)i, at);
				tail1 += xr[i] * elem(a1, (size_t)i, at);
			}
			t[r * ldt + k] = hsum(s0[r]) + tail0;
			if (two)
				t[r * ldt + k + 1] = hsum(s1[r]) + tail1;
		}
	}
}

/* Columns [c, c + 16) of one panel (bp, width w) for nr rows. */
AVX2_INLINE void expand16_avx2_nr(const float *t, int64_t ldt, const int nr, const void *bp,
                                  const enum lp_dtype bt, int rank, int w, int c, float *o,
                                  int64_t ldo)
{
	__m256 acc0[LORA_MR], acc1[LORA_MR];

#pragma GCC unroll 4
	for (int r = 0; r < nr; r++) {
		acc0[r] = _mm256_loadu_ps(o + r * ldo + c);
		acc1[r] = _mm256_loadu_ps(o + r * ldo + c + 8);
	}
	for (int k = 0; k < rank; k++) {
		int64_t at = (int64_t)k * w + c;
		__m256 b0 = load8(bp, at, bt), b1 = load8(bp, at + 8, bt);
#pragma GCC unroll 4
		for (int r = 0; r < nr; r++) {
			__m256 tk = _mm256_broadcast_ss(t + r * ldt + k);
			acc0[r] = _mm256_fmadd_ps(tk, b0, acc0[r]);
			acc1[r] = _mm256_fmadd_ps(tk, b1, acc1[r]);
		}
	}
#pragma GCC unroll 4
	for (int r = 0; r < nr; r++) {
		_mm256_storeu_ps(o + r * ldo + c, acc0[r]);
		_mm256_storeu_ps(o + r * ldo + c + 8, acc1[r]);
	}
}

AVX2_INLINE void expand_avx2_nr(const float *t, int64_t ldt, const int nr, const void *b,
                                const enum lp_dtype bt, int rank, int out, int p0, int p1, float *o,
                                int64_t ldo)
{
	for (int p = p0; p < p1 && p < out; p += LP_LORA_PANEL) {
		int w = out - p < LP_LORA_PANEL ? out - p : LP_LORA_PANEL, c = 0;
		const void *bp = row_at(b, p, rank, bt); /* panel p starts at p * rank */
		float *op = o + p;

		for (; c + 16 <= w; c += 16)
			expand16_avx2_nr(t, ldt, nr, bp, bt, rank, w, c, op, ldo);
		for (int r = 0; r < nr; r++)
			for (int cc = c; cc < w; cc++) {
				float acc = op[r * ldo + cc];
				for (int k = 0; k < rank; k++)
					acc = fmaf(t[r * ldt + k],
					           elem(bp, (size_t)k * (size_t)w + (size_t)cc, bt),
					           acc);
				op[r * ldo + cc] = acc;
			}
	}
}

/* nr and the weights' type as constants in each case, so that the
 * accumulators live in registers and the loads convert in place. */
#define LORA_BY_NR(call)                                                                           \
	switch (nr) {                                                                              \
	case 4:                                                                                    \
		call(4);                                                                           \
		break;                                                                             \
	case 3:                                                                                    \
		call(3);                                                                           \
		break;                                                                             \
	case 2:                                                                                    \
		call(2);                                                                           \
		break;                                                                             \
	default:                                                                                   \
		call(1);                                                                           \
	}

#define SHRINK_F32(n)  shrink_avx2_nr(x, ldx, n, a, LP_DTYPE_F32, in, k0, k1, t, ldt)
#define SHRINK_F16(n)  shrink_avx2_nr(x, ldx, n, a, LP_DTYPE_F16, in, k0, k1, t, ldt)
#define SHRINK_BF16(n) shrink_avx2_nr(x, ldx, n, a, LP_DTYPE_BF16, in, k0, k1, t, ldt)

AVX2 static void shrink_avx2(const float *x, int64_t ldx, int nr, const void *a, enum lp_dtype at,
                             int64_t in, int k0, int k1, float *t, int64_t ldt)
{
	if (at == LP_DTYPE_F16) {
		LORA_BY_NR(SHRINK_F16)
	} else if (at == LP_DTYPE_BF16) {
		LORA_BY_NR(SHRINK_BF16)
	} else {
		LORA_BY_NR(SHRINK_F32)
	}
}

#define EXPAND_F32(n)  expand_avx2_nr(t, ldt, n, b, LP_DTYPE_F32, rank, out, p0, p1, o, ldo)
#define EXPAND_F16(n)  expand_avx2_nr(t, ldt, n, b, LP_DTYPE_F16, rank, out, p0, p1, o, ldo)
#define EXPAND_BF16(n) expand_avx2_nr(t, ldt, n, b, LP_DTYPE_BF16, rank, out, p0, p1, o, ldo)

AVX2 static void expand_avx2(const float *t, int64_t ldt, int nr, const void *b, enum lp_dtype bt,
                             int rank, int out, int p0, int p1, float *o, int64_t ldo)
{
	if (bt == LP_DTYPE_F16) {
		LORA_BY_NR(EXPAND_F16)
	} else if (bt == LP_DTYPE_BF16) {
		LORA_BY_NR(EXPAND_BF16)
	} else {
		LORA_BY_NR(EXPAND_F32)
	}
}
#endif

/* ---- slots ---- */

static bool lora_type_ok(enum lp_dtype t)
{
	return t == LP_DTYPE_F32 || t == LP_DTYPE_F16 || t == LP_DTYPE_BF16;
}

int lp_cpu_lora_fill(struct lp_cpu *cpu, int slot, const struct lp_lora_weights *w,
                     struct lp_err *err)
{
	if (slot < 0 || slot >= cpu->n_slots)
		return lp_errf(err, -EINVAL, "lora slot %d is outside 0 .. %d", slot,
		               cpu->n_slots - 1);
	if (!w || w->n_layers <= 0 || !w->pairs || !w->stacks)
		return lp_errf(err, -EINVAL, "lora slot %d: the adapter has no layers", slot);
	/* The op trusts what it reads from a slot, so everything it relies on
	 * is checked here once. */
	for (int l = 0; l < w->n_layers; l++) {
		for (int g = 0; g < LP_LORA_N_GROUPS; g++) {
			const struct lp_lora_stack *st =
			    &w->stacks[(size_t)l * LP_LORA_N_GROUPS + g];
			int first, count, sum = 0;

			lp_lora_group_targets((enum lp_lora_group)g, &first, &count);
			for (int t = first; t < first + count; t++) {
				const struct lp_lora_pair *pr =
				    &w->pairs[(size_t)l * LP_LORA_N_TARGETS + t];

				if (pr->rank < 0 || (pr->rank > 0 && (!pr->a || !pr->b ||
				                                      !lora_type_ok(pr->a_type) ||
				                                      !lora_type_ok(pr->b_type))))
					return lp_errf(
					    err, -EINVAL,
					    "lora slot %d: layer %d target %d has a bad pair "
					    "(rank %d)",
					    slot, l, t, pr->rank);
				sum += pr->rank;
			}
			if (st->rank != sum || (sum > 0 && (!st->a || !lora_type_ok(st->type))))
				return lp_errf(
				    err, -EINVAL,
				    "lora slot %d: layer %d group %d stacks %d rows of A, its "
				    "targets' ranks add up to %d",
				    slot, l, g, st->rank, sum);
		}
	}
	cpu->slots[slot] = *w;
	return 0;
}

void lp_cpu_lora_clear(struct lp_cpu *cpu, int slot)
{
	if (slot >= 0 && slot < cpu->n_slots)
		memset(&cpu->slots[slot], 0, sizeof(cpu->slots[slot]));
}

/* ---- segments ---- */

/* What segment s asks of this layer and group, resolved from its slot. */
struct seg_view {
	int32_t row0, rows;
	const struct lp_lora_stack *stack;                 /* the group's A, [rank, in] */
	const struct lp_lora_pair *pair[LP_LORA_MAX_OUTS]; /* NULL: target absent */
};

struct lora_job {
	struct lp_cpu *cpu;
	const struct lp_lora_args *args;
	int n_outs;
	bool avx2;
	int phase; /* 0: whole units; 1: split shrink; 2: split expand */
	int n_items;
};

/* Resolves segment s into *v: 1 when it has work, 0 when it adds nothing
 * (no rows, or no target of the group on this layer), or a negative code
 * after recording the failure when report (the op runs the check once,
 * serially, then again without report from the workers). */
static int seg_resolve(const struct lora_job *j, int s, struct seg_view *v, bool report)
{
	const struct lp_lora_args *p = j->args;
	const struct lp_lora_seg *g = &p->segs[s];
	const struct lp_lora_weights *w;
	int first, count;
	int64_t n = p->x->rows < p->tmp->rows ? p->x->rows : p->tmp->rows;

	memset(v, 0, sizeof(*v));
	if (g->slot < 0 || g->slot >= j->cpu->n_slots) {
		if (report)
			lp_cpu_fail(j->cpu, -EIO, "lora: segment %d names slot %d, outside 0 .. %d",
			            s, g->slot, j->cpu->n_slots - 1);
		return -EIO;
	}
	w = &j->cpu->slots[g->slot];
	if (!w->pairs) {
		if (report)
			lp_cpu_fail(j->cpu, -EIO, "lora: segment %d names slot %d, which is empty",
			            s, g->slot);
		return -EIO;
	}
	for (int i = 0; i < j->n_outs; i++)
		if (p->out[i] && p->out[i]->rows < n)
			n = p->out[i]->rows;
	if (g->row0 < 0 || g->rows < 0 || (int64_t)g->row0 + g->rows > n) {
		if (report)
			lp_cpu_fail(
			    j->cpu, -EIO,
			    "lora: segment %d covers rows %d .. %lld, outside the %lld rows of "
			    "the step",
			    s, g->row0, (long long)g->row0 + g->rows - 1, (long long)n);
		return -EIO;
	}
	if (g->rows == 0 || p->layer >= w->n_layers)
		return 0;
	v->row0 = g->row0;
	v->rows = g->rows;
	v->stack = &w->stacks[(size_t)p->layer * LP_LORA_N_GROUPS + p->group];
	if (v->stack->rank == 0)
		return 0;
	if (v->stack->rank > p->tmp->cols) {
		if (report)
			lp_cpu_fail(j->cpu, -EINVAL,
			            "lora: slot %d stacks %d rows of A, tmp has %lld columns",
			            g->slot, v->stack->rank, (long long)p->tmp->cols);
		return -EINVAL;
	}
	lp_lora_group_targets(p->group, &first, &count);
	for (int i = 0; i < count; i++) {
		const struct lp_lora_pair *pr =
		    &w->pairs[(size_t)p->layer * LP_LORA_N_TARGETS + first + i];

		if (pr->rank == 0)
			continue;
		if (!p->out[i]) {
			if (report)
				lp_cpu_fail(
				    j->cpu, -EINVAL,
				    "lora: slot %d has target %d of the group, its output is "
				    "missing",
				    g->slot, first + i);
			return -EINVAL;
		}
		v->pair[i] = pr;
	}
	return 1;
}

/* Rows [*row0, *row0 + *nr) of unit u, and its segment in *v. */
static bool unit_at(const struct lora_job *j, int u, struct seg_view *v, int32_t *row0, int *nr)
{
	for (int s = 0; s < j->args->n_segs; s++) {
		int n;

		if (seg_resolve(j, s, v, false) <= 0)
			continue;
		n = (v->rows + LORA_MR - 1) / LORA_MR;
		if (u < n) {
			*row0 = v->row0 + u * LORA_MR;
			*nr = v->rows - u * LORA_MR < LORA_MR ? v->rows - u * LORA_MR : LORA_MR;
			return true;
		}
		u -= n;
	}
	return false;
}

static void do_shrink(const struct lora_job *j, const struct seg_view *v, int32_t row0, int nr,
                      int k0, int k1)
{
	const struct lp_lora_args *p = j->args;
	const float *x = (const float *)p->x->data + (int64_t)row0 * p->x->cols;
	float *t = (float *)p->tmp->data + (int64_t)row0 * p->tmp->cols;

#if LP_CPU_X86
	if (j->avx2) {
		shrink_avx2(x, p->x->cols, nr, v->stack->a, v->stack->type, p->x->cols, k0, k1, t,
		            p->tmp->cols);
		return;
	}
#endif
	shrink_scalar(x, p->x->cols, nr, v->stack->a, v->stack->type, p->x->cols, k0, k1, t,
	              p->tmp->cols);
}

/* Output i of the segment, panels at columns [p0, p1); k_off is where its
 * rank's columns start in tmp. */
static void do_expand(const struct lora_job *j, const struct seg_view *v, int32_t row0, int nr,
                      int i, int k_off, int p0, int p1)
{
	const struct lp_lora_args *p = j->args;
	const struct lp_lora_pair *b = v->pair[i];
	const float *t = (const float *)p->tmp->data + (int64_t)row0 * p->tmp->cols + k_off;
	float *o = (float *)p->out[i]->data + (int64_t)row0 * p->out[i]->cols;
	int out = (int)p->out[i]->cols;

#if LP_CPU_X86
	if (j->avx2) {
		expand_avx2(t, p->tmp->cols, nr, b->b, b->b_type, b->rank, out, p0, p1, o,
		            p->out[i]->cols);
		return;
	}
#endif
	expand_scalar(t, p->tmp->cols, nr, b->b, b->b_type, b->rank, out, p0, p1, o,
	              p->out[i]->cols);
}

static void whole_unit(const struct lora_job *j, int u)
{
	struct seg_view v;
	int32_t row0;
	int nr, k_off = 0;

	if (!unit_at(j, u, &v, &row0, &nr))
		return;
	do_shrink(j, &v, row0, nr, 0, v.stack->rank);
	for (int i = 0; i < j->n_outs; i++) {
		if (!v.pair[i])
			continue;
		do_expand(j, &v, row0, nr, i, k_off, 0, (int)j->args->out[i]->cols);
		k_off += v.pair[i]->rank;
	}
}

/* Split path items: shrink item (unit, block of SPLIT_K A rows); expand
 * item (unit, output, SPLIT_PANELS panels). Walks the units in order and
 * runs item number `item` when it finds it. */
static void split_item(const struct lora_job *j, int item)
{
	const struct lp_lora_args *p = j->args;
	struct seg_view v;
	int32_t row0;
	int nr;

	for (int u = 0; unit_at(j, u, &v, &row0, &nr); u++) {
		int rows_a = v.stack->rank, k_off = 0;

		if (j->phase == 1) {
			int n = (rows_a + SPLIT_K - 1) / SPLIT_K;
			if (item < n) {
				int k0 = item * SPLIT_K;
				do_shrink(j, &v, row0, nr, k0,
				          k0 + SPLIT_K < rows_a ? k0 + SPLIT_K : rows_a);
				return;
			}
			item -= n;
			continue;
		}
		for (int i = 0; i < j->n_outs; i++) {
			const int span = SPLIT_PANELS * LP_LORA_PANEL;
			int n;
			if (!v.pair[i])
				continue;
			n = ((int)p->out[i]->cols + span - 1) / span;
			if (item < n) {
				do_expand(j, &v, row0, nr, i, k_off, item * span,
				          item * span + span);
				return;
			}
			item -= n;
			k_off += v.pair[i]->rank;
		}
	}
}

static void lora_chunk(void *arg, int chunk, int n_chunks, int thread)
{
	const struct lora_job *j = arg;
	int64_t begin, end;

	(void)thread;
	lp_cpu_split(j->n_items, chunk, n_chunks, &begin, &end);
	for (int64_t u = begin; u < end; u++) {
		if (j->phase == 0)
			whole_unit(j, (int)u);
		else
			split_item(j, (int)u);
	}
}

/* The segments drive the work; tok_slot says the same per row and is not
 * read (a row's result is the same either way). */
void lp_cpu_lora(struct lp_cpu *cpu, const struct lp_lora_args *p)
{
	struct lora_job j = {cpu, p, 0, cpu->avx2, 0, 0};
	int64_t work = 0;
	int first, n_shrink = 0, n_expand = 0;

	if (p->layer < 0 || (unsigned)p->group >= LP_LORA_N_GROUPS || p->n_segs < 0 ||
	    (p->n_segs > 0 && !p->segs)) {
		lp_cpu_fail(cpu, -EINVAL, "lora: layer %d, group %d, %d segments", p->layer,
		            (int)p->group, p->n_segs);
		return;
	}
	lp_lora_group_targets(p->group, &first, &j.n_outs);
	for (int s = 0; s < p->n_segs; s++) {
		struct seg_view v;
		int units;

		if (seg_resolve(&j, s, &v, true) <= 0)
			continue;
		units = (v.rows + LORA_MR - 1) / LORA_MR;
		work += (int64_t)v.rows * v.stack->rank * p->x->cols;
		j.n_items += units;
		n_shrink += units * ((v.stack->rank + SPLIT_K - 1) / SPLIT_K);
		for (int i = 0; i < j.n_outs; i++) {
			const int span = SPLIT_PANELS * LP_LORA_PANEL;
			if (!v.pair[i])
				continue;
			work += (int64_t)v.rows * v.pair[i]->rank * p->out[i]->cols;
			n_expand += units * (int)((p->out[i]->cols + span - 1) / span);
		}
	}
	if (j.n_items == 0)
		return;
	if (j.n_items >= cpu->n_threads || work < LP_CPU_SERIAL_WORK) {
		lp_cpu_parallel(cpu, work, j.n_items, lora_chunk, &j);
		return;
	}
	j.phase = 1;
	j.n_items = n_shrink;
	lp_cpu_parallel(cpu, work, n_shrink, lora_chunk, &j);
	j.phase = 2;
	j.n_items = n_expand;
	lp_cpu_parallel(cpu, work, n_expand, lora_chunk, &j);
}
