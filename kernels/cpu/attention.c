/* Paged attention on the CPU; see struct lp_attention_args in backend.h.
 *
 * What a row (one token, one query head) computes depends on its own query
 * and context alone, never on the other tokens of the call, the thread
 * count or the way the work is cut, so that it comes out bit for bit the
 * same in any batch. Its positions f .. n - 1 (f = 0, or with a sliding
 * window the window's first position) go in chunks of ATTN_CHUNK aligned to
 * multiples of it: [0, 64), [64, 128), ...; chunks wholly before f are
 * skipped (their block-table entries are never read) and the chunk holding
 * f starts its rows at f. The rows of a chunk are the cache rows of its
 * positions, in order, leaving out positions whose block-table entry points
 * outside the cache (recorded in the backend's sticky status: the engine
 * never hands out such a block). A padding row (tok_seq < 0) attends to no
 * position. A row without positions comes out zero. The cache holds f32,
 * f16 or bf16; its elements are read as the f32 they are exactly, so the
 * three types take the same arithmetic. A chunk of k >= 1 rows gives
 *
 *   s_j = scale * q . k_j,  m = max s_j,  e_j = exp(s_j - m),
 *   l = sum of the e_j,  o = e_0 v_0 + e_1 v_1 + ...  (in j order, from 0)
 *
 * and the chunks are folded, in position order, into the row's state (M,
 * L, O), which starts at (-inf, 0, 0):
 *
 *   M' = max(M, m),  A = exp(M - M'),  B = exp(m - M'),
 *   L = L A + l B,  O = o B + O A (per element),
 *
 * and the output is O times 1 / L. Each kernel set takes these steps in one
 * fixed order of its own: the portable C below sums q . k and l in order;
 * AVX2 (vec-avx2.c) sums q . k in 8 lanes added as a tree, l as a tree of
 * 8-lane sums, and fuses the multiply-adds. The two sets round differently
 * from each other, never from one call to the next.
 *
 * Three ways to cut the work, chosen from the shapes for speed alone (none
 * changes a result):
 *
 *   tokens (default): a unit is one token's query heads of one kv group.
 *     The heads go through the context together, chunk by chunk, so that
 *     each chunk's block-table lookups are done once and its K and V rows,
 *     read from memory for the first head, come from cache for the others;
 *     the next chunk's rows are prefetched meanwhile. O lives in the
 *     output row.
 *   split (few tokens, as in decode): too few units for the threads, and
 *     the K and V rows of a long context are the bulk of the memory read.
 *     A unit then also takes only ATTN_PART positions and writes the (o, m,
 *     l) of each of its chunks to the backend's scratch; each row then
 *     folds its chunks as above.
 *   runs (prefill: the tokens of a sequence come in runs of two or more on
 *     average): a unit is a block of ATTN_TILE consecutive tokens, each run
 *     of one sequence in it going through its context once: a chunk's K
 *     and V rows, copied to scratch (16-bit ones converted to f32), serve
 *     every token and head of the run from cache, each token taking the
 *     rows of the positions it attends to.
 *
 * In every mode, two rows that take the same cache rows go through the
 * kernel together, sharing its loads. Chunks of the pool take every n-th
 * unit, so that each gets early and late tokens of a prefill alike. */
#include "kernels/cpu/cpu.h"

#include <assert.h>
#include <errno.h>
#include <math.h>

/* Positions per chunk: the step of every row's arithmetic (above). */
#define ATTN_CHUNK LP_CPU_ATTN_CHUNK

/* Most heads of a kv group handled together (more are split into runs of
 * this many). */
#define ATTN_MAX_GROUP 16
/* With fewer (token, kv group) pairs than this, units also split the
 * context into parts of ATTN_PART positions (whole chunks). */
#define ATTN_SPLIT_UNITS 16
#define ATTN_PART        64
/* Floats of cpu->xsum (see cpu.h). */
#define ATTN_XSUM_FLOATS LP_CPU_XSUM_FLOATS
/* Tokens per unit in runs mode. */
#define ATTN_TILE 32

_Static_assert(ATTN_PART % ATTN_CHUNK == 0, "parts are whole chunks");

enum attention_mode {
	ATTENTION_TOKENS,
	ATTENTION_SPLIT,
	ATTENTION_RUNS,
};

struct attention_task {
	struct lp_cpu *cpu;
	const struct lp_attention_args *a;
	enum attention_mode mode;
	int grain;           /* heads per unit, all of one kv group */
	int units_per_token; /* n_heads / grain */
	int64_t n_parts;     /* split: parts of the context per (token, head run) */
	int64_t n_chunks;    /* split: chunk states per (token, head) */
	int64_t n_units;
	float *parts; /* split: [n_tokens][n_heads][n_chunks][head_dim + 2] */
	bool gather;  /* a chunk's rows copied (16-bit: converted) to scratch */
	float *gbuf;  /* that scratch: NULL for the threads' own, else gbuf + thread * gstride */
	size_t gstride;
};

/* Where a kv group's K and V rows are: row r at k + r * stride and v + r *
 * stride, of type F32, F16 or BF16. */
struct attention_kv {
	const char *k, *v;
	size_t stride;
	enum lp_dtype type;
};

/* ---- the portable kernels: the steps of lp_cpu_attn_chunk_kv_avx2
 * (cpu.h) and lp_cpu_attn_fold_avx2 (cpu.h) in C, l summed in
 * order ---- */

static void scores_c(const float *q, const char *kbase, size_t stride, const int64_t *rows, int cnt,
                     int hd, enum lp_dtype kt, float scale, float *s)
{
	for (int j = 0; j < cnt; j++) {
		const char *k = kbase + (size_t)rows[j] * stride;
		float acc = 0.0f;

		if (kt == LP_DTYPE_F16) {
			for (int i = 0; i < hd; i++)
				acc += q[i] * lp_f16_to_f32(((const uint16_t *)k)[i]);
		} else if (kt == LP_DTYPE_BF16) {
			for (int i = 0; i < hd; i++)
				acc += q[i] * lp_bf16_to_f32(((const uint16_t *)k)[i]);
		} else {
			for (int i = 0; i < hd; i++)
				acc += q[i] * ((const float *)k)[i];
		}
		s[j] = scale * acc;
	}
}

/* Dimensions per strip of accum_c's sums. */
#define ACCUM_STRIP 64

/* acc = sum over j of e[j] v_j from zero; o = acc (ab NULL) or acc * ab[1]
 * + o * ab[0]. */
static void accum_c(float *o, const char *vbase, size_t stride, const int64_t *rows, const float *e,
                    int cnt, int hd, enum lp_dtype kt, const float *ab)
{
	float acc[ACCUM_STRIP];

	for (int d0 = 0; d0 < hd; d0 += ACCUM_STRIP) {
		int w = hd - d0 < ACCUM_STRIP ? hd - d0 : ACCUM_STRIP;

		memset(acc, 0, sizeof(acc));
		for (int j = 0; j < cnt; j++) {
			const char *v = vbase + (size_t)rows[j] * stride;

			if (kt == LP_DTYPE_F16) {
				const uint16_t *vh = (const uint16_t *)v + d0;
				for (int i = 0; i < w; i++)
					acc[i] += e[j] * lp_f16_to_f32(vh[i]);
			} else if (kt == LP_DTYPE_BF16) {
				const uint16_t *vh = (const uint16_t *)v + d0;
				for (int i = 0; i < w; i++)
					acc[i] += e[j] * lp_bf16_to_f32(vh[i]);
			} else {
				const float *vf = (const float *)v + d0;
				for (int i = 0; i < w; i++)
					acc[i] += e[j] * vf[i];
			}
		}
		for (int i = 0; i < w; i++)
			o[d0 + i] = ab ? acc[i] * ab[1] + o[d0 + i] * ab[0] : acc[i];
	}
}

/* The scalar half of both folds. */
static void fold_ml_c(float *ml, float m, float l, float ab[2])
{
	float mn = m > ml[0] ? m : ml[0];

	ab[0] = expf(ml[0] - mn);
	ab[1] = expf(m - mn);
	ml[1] = l * ab[1] + ml[1] * ab[0];
	ml[0] = mn;
}

static void chunk_c(const float *q, const char *kbase, const char *vbase, size_t stride,
                    enum lp_dtype kt, const int64_t *rows, int cnt, int hd, float scale, float *o,
                    float *ml, float *part)
{
	float s[LP_CPU_ATTN_CHUNK], m = -INFINITY, l = 0.0f, ab[2];

	scores_c(q, kbase, stride, rows, cnt, hd, kt, scale, s);
	for (int j = 0; j < cnt; j++)
		m = s[j] > m ? s[j] : m;
	for (int j = 0; j < cnt; j++) {
		s[j] = expf(s[j] - m);
		l += s[j];
	}
	if (part) {
		accum_c(part, vbase, stride, rows, s, cnt, hd, kt, NULL);
		part[hd] = m;
		part[hd + 1] = l;
		return;
	}
	fold_ml_c(ml, m, l, ab);
	accum_c(o, vbase, stride, rows, s, cnt, hd, kt, ab);
}

static void fold_c(float *o, float *ml, const float *part, int hd)
{
	float ab[2];

	fold_ml_c(ml, part[hd], part[hd + 1], ab);
	for (int i = 0; i < hd; i++)
		o[i] = part[i] * ab[1] + o[i] * ab[0];
}

static void gather_c(float *dst, const char *base, size_t stride, const int64_t *rows, int cnt,
                     int hd, enum lp_dtype kt)
{
	for (int j = 0; j < cnt; j++) {
		const char *row = base + (size_t)rows[j] * stride;
		const uint16_t *h = (const uint16_t *)row;
		float *d = dst + (size_t)j * hd;

		if (kt == LP_DTYPE_F16) {
			for (int i = 0; i < hd; i++)
				d[i] = lp_f16_to_f32(h[i]);
		} else if (kt == LP_DTYPE_BF16) {
			for (int i = 0; i < hd; i++)
				d[i] = lp_bf16_to_f32(h[i]);
		} else {
			memcpy(d, row, (size_t)hd * sizeof(float));
		}
	}
}

/* ---- the backend's kernel set ---- */

/* One chunk of nq (1 or 2) rows against the same rows (see
 * lp_cpu_attn_chunk_kv_avx2). */
static void k_chunk(bool avx2, int nq, const float *const q[], const struct attention_kv *kv,
                    const int64_t *rows, int cnt, int hd, float scale, float *const o[],
                    float *const ml[], float *const part[])
{
#if LP_CPU_X86
	if (avx2) {
		lp_cpu_attn_chunk_kv_avx2(nq, q, kv->k, kv->v, kv->stride, kv->type, rows, cnt, hd,
		                          scale, o, ml, part);
		return;
	}
#endif
	for (int x = 0; x < nq; x++)
		chunk_c(q[x], kv->k, kv->v, kv->stride, kv->type, rows, cnt, hd, scale, o[x], ml[x],
		        part[x]);
}

static void k_fold(bool avx2, float *o, float *ml, const float *part, int hd)
{
#if LP_CPU_X86
	if (avx2) {
		lp_cpu_attn_fold_avx2(o, ml, part, hd);
		return;
	}
#endif
	fold_c(o, ml, part, hd);
}

/* dst[j * hd + i] = element i of cache row rows[j] as f32. */
static void k_gather(bool avx2, float *dst, const char *base, size_t stride, const int64_t *rows,
                     int cnt, int hd, enum lp_dtype kt)
{
#if LP_CPU_X86
	if (avx2) {
		lp_cpu_attn_gather_kv_avx2(dst, base, stride, rows, cnt, hd, kt);
		return;
	}
#endif
	gather_c(dst, base, stride, rows, cnt, hd, kt);
}

/* out row = O / L, or zero (as it stands) when the row saw no position. */
static void attention_finish(float *o, float l, int hd)
{
	if (l > 0.0f) {
		float inv = 1.0f / l;
		for (int d = 0; d < hd; d++)
			o[d] *= inv;
	}
}

/* Positions token t attends to: attention_first(a, t) .. this - 1, at most
 * the block table's reach; none for a padding row. */
static int64_t attention_positions(const struct lp_attention_args *a, int t)
{
	int64_t n = (int64_t)a->tok_pos[t] + 1,
	        cap = (int64_t)a->max_blocks_per_seq * a->block_size;

	if (a->tok_seq[t] < 0 || n < 0)
		return 0;
	return n < cap ? n : cap;
}

/* The first position token t attends to: 0, or the first of its sliding
 * window. */
static int64_t attention_first(const struct lp_attention_args *a, int t)
{
	int64_t f = a->window > 0 ? (int64_t)a->tok_pos[t] - a->window + 1 : 0;

	return f > 0 ? f : 0;
}

/* The first position of the chunk holding attention_first(a, t): where the
 * token's chunks start. */
static int64_t attention_chunk0(const struct lp_attention_args *a, int t)
{
	return attention_first(a, t) / ATTN_CHUNK * ATTN_CHUNK;
}

/* Asks for the K and V rows (bytes each) of positions [p0, p1) to be
 * brought to the L2 cache: issued a chunk ahead, while the current one is
 * worked on, they hide the memory's latency where the rows come from
 * memory (decode steps, whose caches the other layers have pushed out). */
static void attention_prefetch(const struct attention_kv *kv, const int32_t *table, int bs,
                               int64_t cache_rows, int64_t p0, int64_t p1, size_t bytes)
{
	int64_t blk = p0 / bs, off = p0 % bs;

	for (int64_t p = p0; p < p1; p++) {
		int64_t row = (int64_t)table[blk] * bs + off;

		if (table[blk] >= 0 && row < cache_rows) {
			for (size_t b = 0; b < bytes; b += 64) {
				__builtin_prefetch(kv->k + (size_t)row * kv->stride + b, 0, 2);
				__builtin_prefetch(kv->v + (size_t)row * kv->stride + b, 0, 2);
			}
		}
		if (++off == bs) {
			off = 0;
			blk++;
		}
	}
}

/* One unit: tokens [t0, t0 + nt) of one sequence (nt <= ATTN_TILE), heads
 * [h0, h0 + nh) of one kv group, over positions [pb, pe) of the context (pb
 * a multiple of ATTN_CHUNK), each token over those of its own range
 * (attention_first .. attention_positions).
 *
 * With part NULL the rows' results go to out. Otherwise (nt = 1, split
 * mode) the state of the token's c-th chunk (counted from
 * attention_chunk0) goes to part + c * (hd + 2), part_stride floats from
 * one head's chunks to the next's; a chunk without rows gets l = 0. buf,
 * when not NULL, holds 2 * ATTN_CHUNK * hd floats of scratch:
 * each chunk's K and V rows are copied there (16-bit ones converted to
 * f32, the same values), read from the cache once for all the unit's
 * rows. */
static void attention_unit(const struct attention_task *task, int t0, int nt, int h0, int nh,
                           int64_t pb, int64_t pe, float *part, size_t part_stride, float *buf)
{
	const struct lp_attention_args *a = task->a;
	bool avx2 = task->cpu->avx2;
	int hd = a->head_dim, bs = a->block_size;
	int kvh = h0 / (a->n_heads / a->n_kv_heads);
	enum lp_dtype kt = a->k_cache->type;
	size_t es = kt == LP_DTYPE_F32 ? sizeof(float) : sizeof(uint16_t);
	int64_t cache_rows = a->k_cache->rows;
	const struct attention_kv cache = {
	    .k = (const char *)a->k_cache->data + (size_t)kvh * hd * es,
	    .v = (const char *)a->v_cache->data + (size_t)kvh * hd * es,
	    .stride = lp_dtype_row_bytes(a->k_cache->type, a->k_cache->cols),
	    .type = kt,
	};
	const struct attention_kv wide = {
	    .k = (const char *)buf,
	    .v = (const char *)(buf + (size_t)ATTN_CHUNK * hd),
	    .stride = (size_t)hd * sizeof(float),
	    .type = LP_DTYPE_F32,
	};
	/* a padding row has no table; it attends to nothing (end stays pb) */
	const int32_t *table =
	    a->tok_seq[t0] < 0 ? NULL
	                       : a->block_tables + (size_t)a->tok_seq[t0] * a->max_blocks_per_seq;
	bool reported = false;
	float ml[ATTN_TILE][ATTN_MAX_GROUP][2]; /* rows' (M, L) */
	int64_t rows[ATTN_CHUNK], ppos[ATTN_CHUNK], idx[ATTN_CHUNK], n[ATTN_TILE], end = pb;
	int64_t lo[ATTN_TILE], lo_min = INT64_MAX, start;
	int c[ATTN_TILE], b[ATTN_TILE];

	assert(nt >= 1 && nt <= ATTN_TILE && nh >= 1 && nh <= ATTN_MAX_GROUP);
	assert(pb % ATTN_CHUNK == 0 && (!part || nt == 1));
	for (int j = 0; j < ATTN_CHUNK; j++)
		idx[j] = j;
	for (int tt = 0; tt < nt; tt++) {
		n[tt] = attention_positions(a, t0 + tt);
		n[tt] = n[tt] < pe ? n[tt] : pe;
		end = n[tt] > end ? n[tt] : end;
		lo[tt] = attention_first(a, t0 + tt);
		lo_min = lo[tt] < lo_min ? lo[tt] : lo_min;
		for (int i = 0; i < nh; i++) {
			ml[tt][i][0] = -INFINITY;
			ml[tt][i][1] = 0.0f;
			if (!part)
				memset((float *)a->out->data + (size_t)(t0 + tt) * a->out->cols +
				           (size_t)(h0 + i) * hd,
				       0, (size_t)hd * sizeof(float));
		}
	}
	/* the chunks before the one holding the earliest window's first
	 * position are skipped; in that chunk the rows start there */
	start = lo_min / ATTN_CHUNK * ATTN_CHUNK;
	for (int64_t p0 = pb > start ? pb : start; p0 < end; p0 += ATTN_CHUNK) {
		int64_t p1 = end - p0 < ATTN_CHUNK ? end : p0 + ATTN_CHUNK;
		int64_t q0 = p0 > lo_min ? p0 : lo_min;
		size_t pidx = (size_t)((p0 - start) / ATTN_CHUNK) * (hd + 2);
		const struct attention_kv *kv = &cache;
		const int64_t *r = rows;
		int cnt = 0;

		/* cache rows of the chunk's positions, leaving out bad ones
		 * (one division per chunk, not per position) */
		int64_t blk = q0 / bs, off = q0 % bs;
		for (int64_t p = q0; p < p1; p++) {
			int64_t row = (int64_t)table[blk] * bs + off;

			if (table[blk] >= 0 && row < cache_rows) {
				rows[cnt] = row;
				ppos[cnt++] = p;
			} else if (!reported) {
				lp_cpu_fail(task->cpu, -EIO,
				            "attention: block %d of sequence %d (position %lld) is "
				            "outside the cache of %lld rows",
				            table[blk], a->tok_seq[t0], (long long)p,
				            (long long)cache_rows);
				reported = true;
			}
			if (++off == bs) {
				off = 0;
				blk++;
			}
		}
		if (!buf && p1 < end)
			attention_prefetch(&cache, table, bs, cache_rows, p1,
			                   end - p1 < ATTN_CHUNK ? end : p1 + ATTN_CHUNK,
			                   (size_t)hd * es);
		if (part && cnt == 0) {
			for (int i = 0; i < nh; i++)
				part[i * part_stride + pidx + hd + 1] = 0.0f;
			continue;
		}
		if (cnt == 0)
			continue;
		if (buf) {
			k_gather(avx2, (float *)wide.k, cache.k, cache.stride, rows, cnt, hd, kt);
			k_gather(avx2, (float *)wide.v, cache.v, cache.stride, rows, cnt, hd, kt);
			kv = &wide;
			r = idx;
		}
		/* each token takes the rows of the positions it attends to:
		 * rows b .. c - 1 */
		for (int tt = 0; tt < nt; tt++) {
			c[tt] = cnt;
			while (c[tt] > 0 && ppos[c[tt] - 1] >= n[tt])
				c[tt]--;
			b[tt] = 0;
			while (b[tt] < c[tt] && ppos[b[tt]] < lo[tt])
				b[tt]++;
		}
		if (part && c[0] == b[0]) {
			for (int i = 0; i < nh; i++)
				part[i * part_stride + pidx + hd + 1] = 0.0f;
			continue;
		}
		/* the (token, head) rows in order, two in one call where they
		 * take the same rows */
		for (int tt = 0, i = 0; tt < nt;) {
			int rt[2] = {tt, i + 1 < nh ? tt : tt + 1},
			    ri[2] = {i, i + 1 < nh ? i + 1 : 0};
			int nq = rt[1] < nt && c[rt[1]] == c[tt] && b[rt[1]] == b[tt] ? 2 : 1;
			const float *q[2];
			float *o[2], *m[2], *pp[2];

			if (c[tt] == b[tt]) {
				tt++;
				i = 0;
				continue;
			}
			for (int y = 0; y < nq; y++) {
				size_t ty = (size_t)t0 + rt[y], hy = (size_t)h0 + ri[y];

				q[y] = (const float *)a->q->data + ty * a->q->cols + hy * hd;
				o[y] = (float *)a->out->data + ty * a->out->cols + hy * hd;
				m[y] = ml[rt[y]][ri[y]];
				pp[y] = part ? part + (size_t)ri[y] * part_stride + pidx : NULL;
			}
			k_chunk(avx2, nq, q, kv, r + b[tt], c[tt] - b[tt], hd, a->scale, o, m, pp);
			tt = rt[nq - 1];
			i = ri[nq - 1] + 1;
			if (i == nh) {
				i = 0;
				tt++;
			}
		}
	}
	if (part)
		return;
	for (int tt = 0; tt < nt; tt++)
		for (int i = 0; i < nh; i++)
			attention_finish((float *)a->out->data + (size_t)(t0 + tt) * a->out->cols +
			                     (size_t)(h0 + i) * hd,
			                 ml[tt][i][1], hd);
}

static void attention_thread(void *arg, int chunk, int n_chunks, int thread)
{
	const struct attention_task *task = arg;
	const struct lp_attention_args *a = task->a;
	int hd = a->head_dim;
	float *buf = !task->gather ? NULL
	             : task->gbuf  ? task->gbuf + (size_t)thread * task->gstride
	                           : task->cpu->scratch[thread].panel;

	/* strided, so that every chunk gets early and late tokens alike */
	for (int64_t u = chunk; u < task->n_units; u += n_chunks) {
		int h0 = (int)(u % task->units_per_token) * task->grain;

		if (task->mode == ATTENTION_RUNS) {
			/* a block of tokens, cut into runs of one sequence */
			int t = (int)(u / task->units_per_token * ATTN_TILE);
			int t1 = a->n_tokens - t < ATTN_TILE ? a->n_tokens : t + ATTN_TILE;

			while (t < t1) {
				int te = t + 1;
				while (te < t1 && a->tok_seq[te] == a->tok_seq[t])
					te++;
				attention_unit(task, t, te - t, h0, task->grain, 0, INT64_MAX, NULL,
				               0, buf);
				t = te;
			}
			continue;
		}
		if (task->mode == ATTENTION_TOKENS) {
			attention_unit(task, (int)(u / task->units_per_token), 1, h0, task->grain,
			               0, INT64_MAX, NULL, 0, buf);
			continue;
		}
		int64_t part = u / task->units_per_token % task->n_parts;
		int t = (int)(u / task->units_per_token / task->n_parts);
		int64_t pb = attention_chunk0(a, t) + part * ATTN_PART;
		size_t ps = (size_t)hd + 2;

		if (pb < attention_positions(a, t))
			attention_unit(task, t, 1, h0, task->grain, pb, pb + ATTN_PART,
			               task->parts +
			                   ((size_t)t * a->n_heads + h0) * task->n_chunks * ps,
			               ps * task->n_chunks, buf);
	}
}

/* Split mode's rows: each folds its chunks' states in order, the same
 * operations as a unit's fold. */
static void attention_merge_thread(void *arg, int chunk, int n_chunks, int thread)
{
	const struct attention_task *task = arg;
	const struct lp_attention_args *a = task->a;
	int hd = a->head_dim;
	size_t ps = (size_t)hd + 2;

	for (int64_t u = chunk; u < (int64_t)a->n_tokens * a->n_heads; u += n_chunks) {
		int t = (int)(u / a->n_heads), h = (int)(u % a->n_heads);
		int64_t nc = (attention_positions(a, t) - attention_chunk0(a, t) + ATTN_CHUNK - 1) /
		             ATTN_CHUNK;
		const float *part = task->parts + (size_t)u * task->n_chunks * ps;
		float *o = (float *)a->out->data + (size_t)t * a->out->cols + (size_t)h * hd;
		float ml[2] = {-INFINITY, 0.0f};

		memset(o, 0, (size_t)hd * sizeof(float));
		for (int64_t c = 0; c < nc; c++) {
			const float *pp = part + c * ps;

			if (!(pp[hd + 1] > 0.0f))
				continue;
			k_fold(task->cpu->avx2, o, ml, pp, hd);
		}
		attention_finish(o, ml[1], hd);
	}
}

void lp_cpu_attention(struct lp_cpu *cpu, const struct lp_attention_args *args)
{
	struct attention_task task = {.cpu = cpu, .a = args, .mode = ATTENTION_TOKENS};
	int64_t work = 0, longest = 0, units;

	assert(args->n_heads > 0 && args->n_kv_heads > 0 && args->head_dim > 0);
	assert(args->n_heads % args->n_kv_heads == 0 && args->block_size > 0);
	assert(args->k_cache->type == args->v_cache->type);
	assert(args->k_cache->type == LP_DTYPE_F32 || args->k_cache->type == LP_DTYPE_F16 ||
	       args->k_cache->type == LP_DTYPE_BF16);
	assert(args->v_cache->rows == args->k_cache->rows &&
	       args->v_cache->cols == args->k_cache->cols);
	assert(args->k_cache->cols == (int64_t)args->n_kv_heads * args->head_dim);
	assert(args->q->cols == (int64_t)args->n_heads * args->head_dim);
	assert(args->out->cols == args->q->cols && args->out->data != args->q->data);
	/* a token's span: its positions from the start of its first chunk */
	for (int t = 0; t < args->n_tokens; t++) {
		int64_t n = attention_positions(args, t) - attention_chunk0(args, t);
		n = n > 0 ? n : 0;
		work += n * args->n_heads * args->head_dim;
		longest = n > longest ? n : longest;
	}
	/* Prefill (the tokens of a sequence come in runs, two or more on
	 * average): units are blocks of ATTN_TILE tokens. */
	int64_t runs = args->n_tokens > 0;
	for (int t = 1; t < args->n_tokens; t++)
		runs += args->tok_seq[t] != args->tok_seq[t - 1];
	if (2 * runs <= args->n_tokens)
		task.mode = ATTENTION_RUNS;
	/* Few tokens (decode): units also take only ATTN_PART positions each,
	 * so that all threads share one long context. */
	int64_t n_parts = (longest + ATTN_PART - 1) / ATTN_PART;
	int64_t n_chunks = (longest + ATTN_CHUNK - 1) / ATTN_CHUNK;
	if ((int64_t)args->n_tokens * args->n_kv_heads < ATTN_SPLIT_UNITS && n_parts > 1 &&
	    (size_t)args->n_tokens * args->n_heads * n_chunks * (args->head_dim + 2) <=
	        ATTN_XSUM_FLOATS) {
		task.mode = ATTENTION_SPLIT;
		task.n_parts = n_parts;
		task.n_chunks = n_chunks;
		task.parts = cpu->xsum;
	}
	/* A unit takes a kv group's heads, or part of them when the group is
	 * larger than ATTN_MAX_GROUP or when there are too few units to go
	 * round the threads. */
	units = task.mode == ATTENTION_RUNS ? (args->n_tokens + ATTN_TILE - 1) / ATTN_TILE
	                                    : args->n_tokens;
	int group = args->n_heads / args->n_kv_heads;
	task.grain = group;
	while (task.grain > ATTN_MAX_GROUP ||
	       (task.mode != ATTENTION_SPLIT &&
	        units * (args->n_heads / task.grain) < 2 * cpu->n_threads && task.grain > 1)) {
		int g = task.grain - 1;
		while (group % g)
			g--;
		task.grain = g;
	}
	task.units_per_token = args->n_heads / task.grain;
	task.n_units = units * task.units_per_token * (task.mode == ATTENTION_SPLIT ? n_parts : 1);
	/* A chunk's K and V rows are copied together first (16-bit ones
	 * converted) where several rows read them: in runs mode, and on the
	 * portable kernels for f16 caches, whose conversion is slow (bf16's
	 * is a shift). They go
	 * to the thread's scratch or, when they do not fit there, to a slice
	 * of xsum (unused outside split mode). */
	size_t need = 2 * (size_t)ATTN_CHUNK * args->head_dim;
	if (task.mode == ATTENTION_RUNS ||
	    (!cpu->avx2 && args->k_cache->type == LP_DTYPE_F16 && task.grain > 1)) {
		if (need <= LP_CPU_THREAD_SCRATCH) {
			task.gather = true;
		} else if (task.mode != ATTENTION_SPLIT &&
		           need * cpu->n_threads <= ATTN_XSUM_FLOATS) {
			task.gather = true;
			task.gbuf = cpu->xsum;
			task.gstride = need;
		}
	}
	lp_cpu_parallel(cpu, work, task.n_units, attention_thread, &task);
	if (task.mode == ATTENTION_SPLIT)
		lp_cpu_parallel(
		    cpu, (int64_t)args->n_tokens * args->n_heads * n_chunks * args->head_dim,
		    (int64_t)args->n_tokens * args->n_heads, attention_merge_thread, &task);
}
