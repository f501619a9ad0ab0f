/* Paged attention on the CPU; see struct lp_attention_args in backend.h.
 *
 * Three ways to cut the work, chosen from the shapes alone (never from the
 * thread count, so results are the same on any number of threads):
 *
 *   default: a unit is one token's query heads of one kv group. The
 *     group's heads go through the context together, chunk by chunk, so
 *     that each chunk's block-table lookups are done once and its K and V
 *     rows, read from memory for the first head, come from cache for the
 *     others. Each head runs an online softmax over its positions in chunks
 *     of ATTN_CHUNK: the chunk's scores are kept on the stack, the running
 *     maximum and denominator are rescaled when the maximum grows, and the
 *     weighted values accumulate straight into the output row, which is
 *     divided by the denominator at the end.
 *   few tokens (decode): too few units for the threads, and the K and V
 *     rows of a long context are the bulk of the memory read. A unit then
 *     also takes only ATTN_PART positions and writes its unnormalized state
 *     (weighted values, maximum, denominator) to the backend's scratch; the
 *     parts are merged in order afterwards.
 *   prefill (runs of tokens of one sequence): a unit is a block of
 *     ATTN_TILE tokens, each run of one sequence in it a tile that goes
 *     through the context once for all its tokens (vec-avx2.c keeps the
 *     tokens in the lanes of its registers).
 *
 * Chunks of the pool take every n-th unit, so that each gets early and late
 * tokens of a prefill alike. Positions whose block-table entry points
 * outside the cache are skipped. */
#include "kernels/cpu/cpu.h"

#include <assert.h>
#include <math.h>

#define ATTN_CHUNK 32

/* Most heads of a kv group handled together (more are split into runs of
 * this many). */
#define ATTN_MAX_GROUP 16
/* With fewer (token, kv group) pairs than this, units also split the
 * context into parts of ATTN_PART positions. */
#define ATTN_SPLIT_UNITS 16
#define ATTN_PART        64

/* Prefill tiles (vec-avx2.c): ATTN_TILE tokens of a sequence against each
 * chunk of its context, up to ATTN_TILE_HEADS heads of a kv group at once,
 * with their queries, states and (f16 caches) converted rows in the
 * thread's scratch. */
#define ATTN_TILE       8
#define ATTN_TILE_HEADS 4

struct attention_task {
	struct lp_cpu *cpu;
	const struct lp_attention_args *a;
	int grain;           /* heads per unit, all of one kv group */
	int units_per_token; /* n_heads / grain */
	int64_t n_parts;     /* parts of the context per unit */
	int64_t n_units;     /* n_tokens * units_per_token * n_parts, or tiles */
	float *parts;        /* [n_tokens][n_heads][n_parts][head_dim + 2] */
	bool tiles;          /* units are blocks of ATTN_TILE tokens */
};

/* s[j] = scale * q . k_j */
static void scores_c(const float *q, const char *kbase, size_t stride, const int64_t *rows, int cnt,
                     int hd, bool f16, float scale, float *s)
{
	for (int j = 0; j < cnt; j++) {
		const char *k = kbase + (size_t)rows[j] * stride;
		float acc = 0.0f;

		if (f16) {
			for (int i = 0; i < hd; i++)
				acc += q[i] * lp_f16_to_f32(((const uint16_t *)k)[i]);
		} else {
			for (int i = 0; i < hd; i++)
				acc += q[i] * ((const float *)k)[i];
		}
		s[j] = scale * acc;
	}
}

/* o = corr * o + sum_j e[j] v_j */
static void accum_c(float *o, const char *vbase, size_t stride, const int64_t *rows, const float *e,
                    int cnt, int hd, bool f16, float corr)
{
	for (int i = 0; i < hd; i++)
		o[i] *= corr;
	for (int j = 0; j < cnt; j++) {
		const char *v = vbase + (size_t)rows[j] * stride;

		if (f16) {
			for (int i = 0; i < hd; i++)
				o[i] += e[j] * lp_f16_to_f32(((const uint16_t *)v)[i]);
		} else {
			for (int i = 0; i < hd; i++)
				o[i] += e[j] * ((const float *)v)[i];
		}
	}
}

/* One unit: heads [h0, h0 + nh) of token t, all of one kv group, over
 * positions [pb, pe) of its context. Each chunk of positions is looked up
 * once, and its K and V rows, read for the first head, are in cache for
 * the others; each head's arithmetic is the same as if it ran alone.
 *
 * With part NULL the heads' rows of out are the result. Otherwise the
 * unnormalized state goes to part, per head hd + 2 floats, part_stride
 * apart: the weighted values, the running maximum and the denominator. */
static void attention_unit(const struct attention_task *task, int t, int h0, int nh, int64_t pb,
                           int64_t pe, float *part, size_t part_stride)
{
	const struct lp_attention_args *a = task->a;
#if LP_CPU_X86
	bool avx2 = task->cpu->avx2;
#endif
	int hd = a->head_dim, bs = a->block_size;
	int kvh = h0 / (a->n_heads / a->n_kv_heads);
	bool f16 = a->k_cache->type == LP_DTYPE_F16;
	size_t es = f16 ? sizeof(uint16_t) : sizeof(float);
	size_t stride = lp_dtype_row_bytes(a->k_cache->type, a->k_cache->cols);
	int64_t cache_rows = a->k_cache->rows;
	const char *kbase = (const char *)a->k_cache->data + (size_t)kvh * hd * es;
	const char *vbase = (const char *)a->v_cache->data + (size_t)kvh * hd * es;
	const float *q0 = (const float *)a->q->data + (size_t)t * a->q->cols + (size_t)h0 * hd;
	float *o0 =
	    part ? part : (float *)a->out->data + (size_t)t * a->out->cols + (size_t)h0 * hd;
	size_t ostride = part ? part_stride : (size_t)hd;
	const int32_t *table = a->block_tables + (size_t)a->tok_seq[t] * a->max_blocks_per_seq;
	float mx[ATTN_MAX_GROUP], l[ATTN_MAX_GROUP];
	float s[ATTN_CHUNK];
	int64_t rows[ATTN_CHUNK];

	for (int i = 0; i < nh; i++) {
		mx[i] = -INFINITY;
		l[i] = 0.0f;
		memset(o0 + i * ostride, 0, (size_t)hd * sizeof(float));
	}
	for (int64_t p0 = pb; p0 < pe; p0 += ATTN_CHUNK) {
		int64_t p1 = pe - p0 < ATTN_CHUNK ? pe : p0 + ATTN_CHUNK;
		int cnt = 0;

		/* cache rows of the chunk's positions, leaving out bad ones
		 * (one division per chunk, not per position) */
		int64_t blk = p0 / bs, off = p0 % bs;
		for (int64_t p = p0; p < p1; p++) {
			int64_t row = (int64_t)table[blk] * bs + off;

			if (table[blk] >= 0 && row < cache_rows)
				rows[cnt++] = row;
			if (++off == bs) {
				off = 0;
				blk++;
			}
		}
		if (cnt == 0)
			continue;
		for (int i = 0; i < nh; i++) {
			const float *q = q0 + (size_t)i * hd;
			float *o = o0 + i * ostride;
			float cmax = -INFINITY, corr = 1.0f;

#if LP_CPU_X86
			if (avx2)
				lp_cpu_attn_scores_avx2(q, kbase, stride, rows, cnt, hd, f16,
				                        a->scale, s);
			else
#endif
				scores_c(q, kbase, stride, rows, cnt, hd, f16, a->scale, s);
			for (int j = 0; j < cnt; j++)
				cmax = s[j] > cmax ? s[j] : cmax;
			if (cmax > mx[i]) {
				corr = l[i] > 0.0f ? expf(mx[i] - cmax) : 0.0f;
				l[i] *= corr;
				mx[i] = cmax;
			}
			for (int j = 0; j < cnt; j++)
				s[j] -= mx[i];
#if LP_CPU_X86
			if (avx2) {
				lp_cpu_exp_avx2(s, cnt);
			} else
#endif
			{
				for (int j = 0; j < cnt; j++)
					s[j] = expf(s[j]);
			}
			for (int j = 0; j < cnt; j++)
				l[i] += s[j];
#if LP_CPU_X86
			if (avx2)
				lp_cpu_attn_accum_avx2(o, vbase, stride, rows, s, cnt, hd, f16,
				                       corr);
			else
#endif
				accum_c(o, vbase, stride, rows, s, cnt, hd, f16, corr);
		}
	}
	for (int i = 0; i < nh; i++) {
		float *o = o0 + i * ostride;

		if (part) {
			o[hd] = mx[i];
			o[hd + 1] = l[i];
		} else if (l[i] > 0.0f) {
			float inv = 1.0f / l[i];
			for (int d = 0; d < hd; d++)
				o[d] *= inv;
		}
	}
}

/* Positions token t attends to: 0 .. its position, at most the block
 * table's reach. */
static int64_t attention_positions(const struct lp_attention_args *a, int t)
{
	int64_t n = (int64_t)a->tok_pos[t] + 1,
	        cap = (int64_t)a->max_blocks_per_seq * a->block_size;

	return n < cap ? n : cap;
}

/* Scratch floats of a tile of nh heads. */
static size_t attention_tile_scratch(int nh, int hd, bool f16)
{
	return (size_t)nh * ((size_t)hd * 8 + LP_CPU_TILE_STATE(hd)) +
	       (f16 ? 2 * (size_t)LP_CPU_TILE_ROWS * hd : 0);
}

#if LP_CPU_X86
/* Tokens [t0, t0 + nt) of one sequence (2 <= nt <= ATTN_TILE), heads [h0,
 * h0 + nh) of one kv group, as one tile, in scratch. */
static void attention_tile(const struct attention_task *task, int t0, int nt, int h0, int nh,
                           float *scratch)
{
	const struct lp_attention_args *a = task->a;
	int hd = a->head_dim, bs = a->block_size;
	int kvh = h0 / (a->n_heads / a->n_kv_heads);
	bool f16 = a->k_cache->type == LP_DTYPE_F16;
	size_t es = f16 ? sizeof(uint16_t) : sizeof(float);
	size_t stride = lp_dtype_row_bytes(a->k_cache->type, a->k_cache->cols);
	int64_t cache_rows = a->k_cache->rows;
	const char *kbase = (const char *)a->k_cache->data + (size_t)kvh * hd * es;
	const char *vbase = (const char *)a->v_cache->data + (size_t)kvh * hd * es;
	const int32_t *table = a->block_tables + (size_t)a->tok_seq[t0] * a->max_blocks_per_seq;
	float *qt = scratch, *state = qt + (size_t)nh * hd * 8;
	float *kvbuf = state + (size_t)nh * LP_CPU_TILE_STATE(hd);
	int32_t tpos[ATTN_TILE];
	int64_t rows[LP_CPU_TILE_ROWS], ppos[LP_CPU_TILE_ROWS], n_pos = 0;

	for (int t = 0; t < ATTN_TILE; t++) {
		tpos[t] = t < nt ? a->tok_pos[t0 + t] : -1;
		if (t < nt && attention_positions(a, t0 + t) > n_pos)
			n_pos = attention_positions(a, t0 + t);
	}
	for (int i = 0; i < nh; i++)
		lp_cpu_attn_tile_begin_avx2((const float *)a->q->data + (size_t)t0 * a->q->cols +
		                                (size_t)(h0 + i) * hd,
		                            (size_t)a->q->cols, nt, hd, qt + (size_t)i * hd * 8,
		                            state + (size_t)i * LP_CPU_TILE_STATE(hd));
	for (int64_t p0 = 0; p0 < n_pos; p0 += LP_CPU_TILE_ROWS) {
		int64_t p1 = n_pos - p0 < LP_CPU_TILE_ROWS ? n_pos : p0 + LP_CPU_TILE_ROWS;
		int64_t blk = p0 / bs, off = p0 % bs;
		int cnt = 0;

		for (int64_t p = p0; p < p1; p++) {
			int64_t row = (int64_t)table[blk] * bs + off;

			if (table[blk] >= 0 && row < cache_rows) {
				rows[cnt] = row;
				ppos[cnt++] = p;
			}
			if (++off == bs) {
				off = 0;
				blk++;
			}
		}
		if (cnt > 0)
			lp_cpu_attn_tile_chunk_avx2(qt, state, nh, hd, kbase, vbase, stride, f16,
			                            rows, ppos, cnt, tpos, a->scale, kvbuf);
	}
	for (int i = 0; i < nh; i++)
		lp_cpu_attn_tile_end_avx2(state + (size_t)i * LP_CPU_TILE_STATE(hd), nt, hd,
		                          (float *)a->out->data + (size_t)t0 * a->out->cols +
		                              (size_t)(h0 + i) * hd,
		                          (size_t)a->out->cols);
}
#endif

/* Tile mode: tokens [t0, t1), heads [h0, h0 + nh); each run of tokens of
 * one sequence is a tile, a lone token goes alone. */
static void attention_block(const struct attention_task *task, int t0, int t1, int h0, int nh,
                            int thread)
{
	const struct lp_attention_args *a = task->a;

	while (t0 < t1) {
		int t = t0 + 1;
		while (t < t1 && a->tok_seq[t] == a->tok_seq[t0])
			t++;
#if LP_CPU_X86
		if (t - t0 > 1) {
			/* panel and rows: LP_CPU_THREAD_SCRATCH floats in a row */
			attention_tile(task, t0, t - t0, h0, nh, task->cpu->scratch[thread].panel);
			t0 = t;
			continue;
		}
#endif
		attention_unit(task, t0, h0, nh, 0, attention_positions(a, t0), NULL, 0);
		t0 = t;
	}
}

static void attention_thread(void *arg, int chunk, int n_chunks, int thread)
{
	const struct attention_task *task = arg;
	const struct lp_attention_args *a = task->a;
	int hd = a->head_dim;

	/* strided, so that every chunk gets early and late tokens alike */
	for (int64_t u = chunk; u < task->n_units; u += n_chunks) {
		if (task->tiles) {
			int64_t blk = u / task->units_per_token;
			int t0 = (int)(blk * ATTN_TILE);
			int t1 = t0 + ATTN_TILE < a->n_tokens ? t0 + ATTN_TILE : a->n_tokens;
			int h0 = (int)(u % task->units_per_token) * task->grain;

			attention_block(task, t0, t1, h0, task->grain, thread);
			continue;
		}
		int64_t part = u % task->n_parts, v = u / task->n_parts;
		int t = (int)(v / task->units_per_token);
		int h0 = (int)(v % task->units_per_token) * task->grain;
		int64_t n_pos = attention_positions(a, t);
		int64_t pb = part * ATTN_PART, pe = pb + ATTN_PART < n_pos ? pb + ATTN_PART : n_pos;

		if (task->n_parts == 1) {
			attention_unit(task, t, h0, task->grain, 0, n_pos, NULL, 0);
		} else if (pb < n_pos) {
			size_t ps = (size_t)hd + 2;
			float *dst = task->parts +
			             (((size_t)t * a->n_heads + h0) * task->n_parts + part) * ps;
			attention_unit(task, t, h0, task->grain, pb, pe, dst, ps * task->n_parts);
		}
	}
}

/* out = the parts of each (token, head) merged in order: sum_p o_p e^(m_p -
 * M) / sum_p l_p e^(m_p - M), M the largest m_p. */
static void attention_merge(const struct attention_task *task)
{
	const struct lp_attention_args *a = task->a;
	int hd = a->head_dim;
	size_t ps = (size_t)hd + 2;

	for (int t = 0; t < a->n_tokens; t++) {
		int64_t np = (attention_positions(a, t) + ATTN_PART - 1) / ATTN_PART;

		for (int h = 0; h < a->n_heads; h++) {
			const float *part =
			    task->parts + ((size_t)t * a->n_heads + h) * task->n_parts * ps;
			float *o =
			    (float *)a->out->data + (size_t)t * a->out->cols + (size_t)h * hd;
			float m = -INFINITY, l = 0.0f;

			for (int64_t p = 0; p < np; p++)
				m = part[p * ps + hd] > m ? part[p * ps + hd] : m;
			memset(o, 0, (size_t)hd * sizeof(float));
			for (int64_t p = 0; p < np; p++) {
				const float *pp = part + p * ps;
				if (pp[hd + 1] <= 0.0f)
					continue;
				float c = expf(pp[hd] - m);
				l += pp[hd + 1] * c;
				for (int d = 0; d < hd; d++)
					o[d] += pp[d] * c;
			}
			if (l > 0.0f) {
				float inv = 1.0f / l;
				for (int d = 0; d < hd; d++)
					o[d] *= inv;
			}
		}
	}
}

void lp_cpu_attention(struct lp_cpu *cpu, const struct lp_attention_args *args)
{
	struct attention_task task = {.cpu = cpu, .a = args, .n_parts = 1};
	int64_t work = 0, longest = 0;

	assert(args->n_heads > 0 && args->n_kv_heads > 0 && args->head_dim > 0);
	assert(args->n_heads % args->n_kv_heads == 0 && args->block_size > 0);
	assert(args->k_cache->type == args->v_cache->type);
	assert(args->k_cache->type == LP_DTYPE_F32 || args->k_cache->type == LP_DTYPE_F16);
	assert(args->k_cache->cols == (int64_t)args->n_kv_heads * args->head_dim);
	assert(args->q->cols == (int64_t)args->n_heads * args->head_dim);
	assert(args->out->cols == args->q->cols && args->out->data != args->q->data);
	for (int t = 0; t < args->n_tokens; t++) {
		int64_t n = attention_positions(args, t);
		work += n * args->n_heads * args->head_dim;
		longest = n > longest ? n : longest;
	}
	/* A unit is a token's heads of one kv group, or part of them when the
	 * group is larger than ATTN_MAX_GROUP or when there are too few
	 * groups to go round the threads (which changes no result). */
	int group = args->n_heads / args->n_kv_heads;
	task.grain = group;
	while (task.grain > ATTN_MAX_GROUP ||
	       ((int64_t)args->n_tokens * (args->n_heads / task.grain) < 2 * cpu->n_threads &&
	        task.grain > 1)) {
		int g = task.grain - 1;
		while (group % g)
			g--;
		task.grain = g;
	}
	/* Few tokens (decode): each unit also takes only ATTN_PART positions,
	 * its state kept apart and merged afterwards, so that all threads
	 * share one long context. Decided from the shapes alone, so that the
	 * result does not depend on the thread count. */
	int64_t n_parts = (longest + ATTN_PART - 1) / ATTN_PART;
	if ((int64_t)args->n_tokens * args->n_kv_heads < ATTN_SPLIT_UNITS && n_parts > 1 &&
	    (size_t)args->n_tokens * args->n_heads * n_parts * (args->head_dim + 2) <=
	        (size_t)LP_CPU_MATVEC_BATCH * LP_CPU_XSUM_MAX_BLOCKS * 4) {
		task.grain = group <= ATTN_MAX_GROUP ? group : task.grain;
		task.n_parts = n_parts;
		task.parts = cpu->xsum;
	}
	/* Prefill (tokens of a sequence come in runs, two or more on
	 * average): units are blocks of ATTN_TILE tokens, their runs tiles. */
	int64_t runs = args->n_tokens > 0;
	for (int t = 1; t < args->n_tokens; t++)
		runs += args->tok_seq[t] != args->tok_seq[t - 1];
	bool f16 = args->k_cache->type == LP_DTYPE_F16;
	int g = group < ATTN_TILE_HEADS ? group : ATTN_TILE_HEADS;
	while (g > 1 && (group % g ||
	                 attention_tile_scratch(g, args->head_dim, f16) > LP_CPU_THREAD_SCRATCH))
		g--;
	if (LP_CPU_X86 && cpu->avx2 && task.n_parts == 1 &&
	    attention_tile_scratch(g, args->head_dim, f16) <= LP_CPU_THREAD_SCRATCH &&
	    2 * runs <= args->n_tokens) {
		task.tiles = true;
		task.grain = g;
		task.units_per_token = args->n_heads / g;
		task.n_units = (args->n_tokens + ATTN_TILE - 1) / ATTN_TILE * task.units_per_token;
		lp_cpu_parallel(cpu, work, task.n_units, attention_thread, &task);
		return;
	}
	task.units_per_token = args->n_heads / task.grain;
	task.n_units = (int64_t)args->n_tokens * task.units_per_token * task.n_parts;
	lp_cpu_parallel(cpu, work, task.n_units, attention_thread, &task);
	if (task.n_parts > 1)
		attention_merge(&task);
}
