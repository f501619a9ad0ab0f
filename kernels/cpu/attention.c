/* Paged attention on the CPU; see struct lp_attention_args in backend.h.
 *
 * Work is split over (token, head) pairs, a kv group's heads kept together
 * when there are enough groups; chunks take every n-th unit, so that each
 * gets early and late tokens of a prefill alike. Each pair runs an online
 * softmax over its positions in chunks of ATTN_CHUNK: the chunk's scores are
 * kept on the stack, the running maximum and denominator are rescaled when the maximum
 * grows, and the weighted values accumulate straight into the output row,
 * which is divided by the denominator at the end. No scratch grows with the
 * context length. Positions whose block-table entry points outside the
 * cache are skipped. */
#include "kernels/cpu/cpu.h"

#include <assert.h>
#include <math.h>

#define ATTN_CHUNK 32

struct attention_task {
	struct lp_cpu *cpu;
	const struct lp_attention_args *a;
	int64_t n_pairs;
	int64_t grain; /* consecutive pairs that stay together */
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

static void attention_pair(const struct attention_task *task, int64_t pair)
{
	const struct lp_attention_args *a = task->a;
	bool avx2 = task->cpu->avx2;
	int t = (int)(pair / a->n_heads), h = (int)(pair % a->n_heads);
	int hd = a->head_dim, bs = a->block_size;
	int kvh = h / (a->n_heads / a->n_kv_heads);
	bool f16 = a->k_cache->type == LP_DTYPE_F16;
	size_t es = f16 ? sizeof(uint16_t) : sizeof(float);
	size_t stride = lp_dtype_row_bytes(a->k_cache->type, a->k_cache->cols);
	int64_t cache_rows = a->k_cache->rows;
	const char *kbase = (const char *)a->k_cache->data + (size_t)kvh * hd * es;
	const char *vbase = (const char *)a->v_cache->data + (size_t)kvh * hd * es;
	const float *q = (const float *)a->q->data + (size_t)t * a->q->cols + (size_t)h * hd;
	float *o = (float *)a->out->data + (size_t)t * a->out->cols + (size_t)h * hd;
	const int32_t *table = a->block_tables + (size_t)a->tok_seq[t] * a->max_blocks_per_seq;
	int64_t n_pos = (int64_t)a->tok_pos[t] + 1;
	float mx = -INFINITY, l = 0.0f;
	float s[ATTN_CHUNK];
	int64_t rows[ATTN_CHUNK];

	if (n_pos > (int64_t)a->max_blocks_per_seq * bs)
		n_pos = (int64_t)a->max_blocks_per_seq * bs;
	memset(o, 0, (size_t)hd * sizeof(float));
	for (int64_t p0 = 0; p0 < n_pos; p0 += ATTN_CHUNK) {
		int64_t p1 = n_pos - p0 < ATTN_CHUNK ? n_pos : p0 + ATTN_CHUNK;
		float cmax = -INFINITY, corr = 1.0f;
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
#if LP_CPU_X86
		if (avx2)
			lp_cpu_attn_scores_avx2(q, kbase, stride, rows, cnt, hd, f16, a->scale, s);
		else
#endif
			scores_c(q, kbase, stride, rows, cnt, hd, f16, a->scale, s);
		for (int j = 0; j < cnt; j++)
			cmax = s[j] > cmax ? s[j] : cmax;
		if (cmax > mx) {
			corr = l > 0.0f ? expf(mx - cmax) : 0.0f;
			l *= corr;
			mx = cmax;
		}
		for (int j = 0; j < cnt; j++)
			s[j] -= mx;
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
			l += s[j];
#if LP_CPU_X86
		if (avx2)
			lp_cpu_attn_accum_avx2(o, vbase, stride, rows, s, cnt, hd, f16, corr);
		else
#endif
			accum_c(o, vbase, stride, rows, s, cnt, hd, f16, corr);
	}
	if (l > 0.0f) {
		float inv = 1.0f / l;
		for (int i = 0; i < hd; i++)
			o[i] *= inv;
	}
}

static void attention_thread(void *arg, int chunk, int n_chunks, int thread)
{
	const struct attention_task *task = arg;
	int64_t n_units = (task->n_pairs + task->grain - 1) / task->grain;

	/* strided, so that every chunk gets early and late tokens alike */
	for (int64_t u = chunk; u < n_units; u += n_chunks)
		for (int64_t pair = u * task->grain;
		     pair < (u + 1) * task->grain && pair < task->n_pairs; pair++)
			attention_pair(task, pair);
}

void lp_cpu_attention(struct lp_cpu *cpu, const struct lp_attention_args *args)
{
	struct attention_task task = {.cpu = cpu, .a = args};
	int64_t work = 0;

	assert(args->n_heads > 0 && args->n_kv_heads > 0 && args->head_dim > 0);
	assert(args->n_heads % args->n_kv_heads == 0 && args->block_size > 0);
	assert(args->k_cache->type == args->v_cache->type);
	assert(args->k_cache->type == LP_DTYPE_F32 || args->k_cache->type == LP_DTYPE_F16);
	assert(args->k_cache->cols == (int64_t)args->n_kv_heads * args->head_dim);
	assert(args->q->cols == (int64_t)args->n_heads * args->head_dim);
	assert(args->out->cols == args->q->cols && args->out->data != args->q->data);
	task.n_pairs = (int64_t)args->n_tokens * args->n_heads;
	/* The heads of a kv group read the same cache rows: one thread taking
	 * the whole group finds them in its cache. With too few groups to go
	 * round, balance comes first. */
	task.grain = 1;
	if ((int64_t)args->n_tokens * args->n_kv_heads >= 4 * cpu->n_threads)
		task.grain = args->n_heads / args->n_kv_heads;
	for (int t = 0; t < args->n_tokens; t++)
		work += ((int64_t)args->tok_pos[t] + 1) * args->n_heads * args->head_dim;
	lp_cpu_parallel(cpu, work, (task.n_pairs + task.grain - 1) / task.grain, attention_thread,
	                &task);
}
