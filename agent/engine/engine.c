/* The engine: scheduler, batched forward pass and sampling; see engine.h.
 *
 * A step, top to bottom:
 *   schedule()   pick tokens: decodes first, then prefill chunks, under the
 *                token budget; grow block tables, preempting if needed
 *   forward()    embeddings -> n_layers x (attention, MLP) -> final norm
 *                -> logits for the last token of each finished sequence
 *   sample       per sequence, on the host, from the downloaded logits */
#include "agent/engine/engine.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_KV_BYTES ((size_t)512 << 20)
/* Columns of the LoRA scratch: the stacked ranks of the largest group
 * (q, k and v). */
#define LORA_TMP_COLS(e) ((size_t)3 * (size_t)(e)->cfg.max_lora_rank)

/* Device tensors and host staging for one step, sized for the maxima. */
struct step_bufs {
	/* i32 device arrays */
	struct lp_buffer ids, pos, tok_seq, slots, out_rows, block_tables;
	/* f32 activations */
	struct lp_buffer x, xn, q, k, v, att, gate, up, h, logits;
	struct lp_buffer lora_tmp; /* f32 [max_batched_tokens, 3 * max_lora_rank] */
};

/* Rows of a step that share one adapter. */
struct step_seg {
	int row0, rows;
	struct lp_adapter *adapter;
};

struct lp_engine {
	struct lp_model *model;
	struct lp_backend *be;
	struct lp_engine_config cfg;
	struct lp_kv_cache kv;
	int max_blocks_per_seq;
	uint64_t next_id;

	struct lp_seq *waiting; /* FIFO */
	struct lp_seq *running; /* in admission order */
	int n_running, n_waiting;

	struct step_bufs d;
	/* host staging [max_batched_tokens] or [max_num_seqs] */
	int32_t *h_ids, *h_pos, *h_tok_seq, *h_slots, *h_out_rows, *h_block_tables;
	struct lp_seq **step_seqs;   /* scheduled this step */
	int *step_take;              /* tokens each computes this step */
	struct lp_seq **sample_seqs; /* sampled this step */
	float *h_logits;             /* [max_num_seqs, vocab] raw */
	float *h_scratch;            /* [vocab] for the sampler */
	struct lp_step_output *outs;

	struct lp_lora_cache *loras;
	struct step_seg *segs; /* [max_num_seqs] this step's adapter segments */
	int n_segs;
	struct lp_lora_seg *op_segs; /* [max_num_seqs] for one LoRA op */
	struct lp_tensor lora_tmp;

	struct lp_engine_stats stats;
};

static struct lp_tensor view(struct lp_buffer *b, enum lp_dtype t, int64_t rows, int64_t cols)
{
	return (struct lp_tensor){b->data, t, rows, cols};
}

void lp_engine_config_default(struct lp_engine_config *c)
{
	c->max_num_seqs = 32;
	c->max_model_len = 0;
	c->max_batched_tokens = 512;
	c->kv_cache_bytes = DEFAULT_KV_BYTES;
	c->block_size = 16;
	c->max_loras = 8;
	c->max_cpu_loras = 16;
	c->max_lora_rank = 64;
	c->base_names = NULL;
	c->allow_base_mismatch = false;
}

const struct lp_model *lp_engine_model(const struct lp_engine *e)
{
	return e->model;
}

struct lp_lora_cache *lp_engine_loras(struct lp_engine *e)
{
	return e->loras;
}

const struct lp_engine_config *lp_engine_config(const struct lp_engine *e)
{
	return &e->cfg;
}

/* ---- lists ---- */

static void list_remove(struct lp_seq **head, struct lp_seq *s)
{
	for (struct lp_seq **p = head; *p; p = &(*p)->next)
		if (*p == s) {
			*p = s->next;
			s->next = NULL;
			return;
		}
}

static void list_append(struct lp_seq **head, struct lp_seq *s)
{
	struct lp_seq **p = head;

	while (*p)
		p = &(*p)->next;
	s->next = NULL;
	*p = s;
}

static void list_push_front(struct lp_seq **head, struct lp_seq *s)
{
	s->next = *head;
	*head = s;
}

/* ---- creation ---- */

static int alloc_dev(struct lp_engine *e, struct lp_buffer *b, size_t bytes, struct lp_err *err)
{
	return lp_backend_alloc(e->be, bytes ? bytes : 4, b, err);
}

static void free_step_bufs(struct lp_engine *e)
{
	struct lp_buffer *all[] = {
	    &e->d.ids,  &e->d.pos, &e->d.tok_seq, &e->d.slots,  &e->d.out_rows, &e->d.block_tables,
	    &e->d.x,    &e->d.xn,  &e->d.q,       &e->d.k,      &e->d.v,        &e->d.att,
	    &e->d.gate, &e->d.up,  &e->d.h,       &e->d.logits, &e->d.lora_tmp};

	for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
		lp_backend_free(e->be, all[i]);
}

static int check_config(struct lp_engine_config *c, const struct lp_model *m, struct lp_err *err)
{
	if (c->max_model_len <= 0)
		c->max_model_len = m->cfg.max_pos;
	if (c->max_model_len < 2 || c->max_model_len > (1 << 24))
		return lp_errf(err, -EINVAL, "max-model-len %d out of range", c->max_model_len);
	if (c->max_num_seqs < 1 || c->max_num_seqs > 4096)
		return lp_errf(err, -EINVAL, "max-num-seqs %d out of range (1..4096)",
		               c->max_num_seqs);
	if (c->max_batched_tokens < c->max_num_seqs || c->max_batched_tokens > (1 << 20))
		return lp_errf(
		    err, -EINVAL,
		    "max-batched-tokens %d must be at least max-num-seqs (%d) and at most %d",
		    c->max_batched_tokens, c->max_num_seqs, 1 << 20);
	if (c->block_size < 1 || c->block_size > 1024)
		return lp_errf(err, -EINVAL, "block size %d out of range", c->block_size);
	if (c->max_loras < 1 || c->max_cpu_loras < c->max_loras)
		return lp_errf(err, -EINVAL,
		               "max-loras (%d) must be at least 1 and at most max-cpu-loras (%d)",
		               c->max_loras, c->max_cpu_loras);
	if (c->max_lora_rank < 1 || c->max_lora_rank > 4096)
		return lp_errf(err, -EINVAL, "max-lora-rank %d out of range (1..4096)",
		               c->max_lora_rank);
	return 0;
}

int lp_engine_new(struct lp_engine **out, struct lp_model *model,
                  const struct lp_engine_config *cfg, struct lp_err *err)
{
	const struct lp_model_config *mc = &model->cfg;
	struct lp_engine *e;
	size_t block_bytes, n_blocks;
	int T, S, rc;
	int qdim = mc->n_heads * mc->head_dim, kvdim = mc->n_kv_heads * mc->head_dim;

	*out = NULL;
	e = calloc(1, sizeof(*e));
	if (!e)
		return lp_errf(err, -ENOMEM, "out of memory");
	e->model = model;
	e->be = model->be;
	e->cfg = *cfg;
	e->next_id = 1;
	rc = check_config(&e->cfg, model, err);
	if (rc)
		goto fail;
	T = e->cfg.max_batched_tokens;
	S = e->cfg.max_num_seqs;
	e->max_blocks_per_seq = (e->cfg.max_model_len + e->cfg.block_size - 1) / e->cfg.block_size;
	block_bytes = lp_kv_cache_block_bytes(mc->n_layers, kvdim, e->cfg.block_size, LP_DTYPE_F32);
	n_blocks = e->cfg.kv_cache_bytes / block_bytes;
	if (n_blocks < (size_t)e->max_blocks_per_seq) {
		rc = lp_errf(err, -EINVAL,
		             "kv-cache-bytes %zu holds %zu tokens, fewer than max-model-len %d "
		             "(needs %zu bytes)",
		             e->cfg.kv_cache_bytes, n_blocks * (size_t)e->cfg.block_size,
		             e->cfg.max_model_len, (size_t)e->max_blocks_per_seq * block_bytes);
		goto fail;
	}
	if (n_blocks > INT32_MAX / (size_t)e->cfg.block_size)
		n_blocks = INT32_MAX / (size_t)e->cfg.block_size;
	rc = lp_kv_cache_init(&e->kv, e->be, mc->n_layers, kvdim, e->cfg.block_size, (int)n_blocks,
	                      LP_DTYPE_F32, err);
	if (rc)
		goto fail;

	e->h_ids = calloc((size_t)T, sizeof(int32_t));
	e->h_pos = calloc((size_t)T, sizeof(int32_t));
	e->h_tok_seq = calloc((size_t)T, sizeof(int32_t));
	e->h_slots = calloc((size_t)T, sizeof(int32_t));
	e->h_out_rows = calloc((size_t)S, sizeof(int32_t));
	e->h_block_tables = calloc((size_t)S * (size_t)e->max_blocks_per_seq, sizeof(int32_t));
	e->step_seqs = calloc((size_t)S, sizeof(*e->step_seqs));
	e->step_take = calloc((size_t)S, sizeof(*e->step_take));
	e->sample_seqs = calloc((size_t)S, sizeof(*e->sample_seqs));
	e->h_logits = calloc((size_t)S * (size_t)mc->vocab_size, sizeof(float));
	e->h_scratch = calloc((size_t)mc->vocab_size, sizeof(float));
	e->outs = calloc((size_t)S, sizeof(*e->outs));
	e->segs = calloc((size_t)S, sizeof(*e->segs));
	e->op_segs = calloc((size_t)S, sizeof(*e->op_segs));
	if (!e->h_ids || !e->h_pos || !e->h_tok_seq || !e->h_slots || !e->h_out_rows ||
	    !e->h_block_tables || !e->step_seqs || !e->step_take || !e->sample_seqs ||
	    !e->h_logits || !e->h_scratch || !e->outs || !e->segs || !e->op_segs) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto fail;
	}
	size_t f = sizeof(float), i4 = sizeof(int32_t);
	if ((rc = alloc_dev(e, &e->d.ids, (size_t)T * i4, err)) ||
	    (rc = alloc_dev(e, &e->d.pos, (size_t)T * i4, err)) ||
	    (rc = alloc_dev(e, &e->d.tok_seq, (size_t)T * i4, err)) ||
	    (rc = alloc_dev(e, &e->d.slots, (size_t)T * i4, err)) ||
	    (rc = alloc_dev(e, &e->d.out_rows, (size_t)S * i4, err)) ||
	    (rc = alloc_dev(e, &e->d.block_tables, (size_t)S * e->max_blocks_per_seq * i4, err)) ||
	    (rc = alloc_dev(e, &e->d.x, (size_t)T * mc->dim * f, err)) ||
	    (rc = alloc_dev(e, &e->d.xn, (size_t)T * mc->dim * f, err)) ||
	    (rc = alloc_dev(e, &e->d.q, (size_t)T * qdim * f, err)) ||
	    (rc = alloc_dev(e, &e->d.k, (size_t)T * kvdim * f, err)) ||
	    (rc = alloc_dev(e, &e->d.v, (size_t)T * kvdim * f, err)) ||
	    (rc = alloc_dev(e, &e->d.att, (size_t)T * qdim * f, err)) ||
	    (rc = alloc_dev(e, &e->d.gate, (size_t)T * mc->ffn_dim * f, err)) ||
	    (rc = alloc_dev(e, &e->d.up, (size_t)T * mc->ffn_dim * f, err)) ||
	    (rc = alloc_dev(e, &e->d.h, (size_t)S * mc->dim * f, err)) ||
	    (rc = alloc_dev(e, &e->d.logits, (size_t)S * mc->vocab_size * f, err)) ||
	    (rc = alloc_dev(e, &e->d.lora_tmp, (size_t)T * LORA_TMP_COLS(e) * f, err)))
		goto fail;
	e->lora_tmp = view(&e->d.lora_tmp, LP_DTYPE_F32, T, LORA_TMP_COLS(e));
	{
		const char *names[64];
		size_t n = 0;
		names[n++] = model->name;
		for (size_t i = 0; e->cfg.base_names && e->cfg.base_names[i] && n < 63; i++)
			names[n++] = e->cfg.base_names[i];
		names[n] = NULL;
		struct lp_lora_shape shape = {
		    .n_layers = mc->n_layers,
		    .dim = mc->dim,
		    .q_dim = qdim,
		    .kv_dim = kvdim,
		    .ffn_dim = mc->ffn_dim,
		    .max_rank = e->cfg.max_lora_rank,
		    .base_names = names,
		    .allow_base_mismatch = e->cfg.allow_base_mismatch,
		};
		rc = lp_lora_cache_new(&e->loras, e->be, &shape, e->cfg.max_loras,
		                       e->cfg.max_cpu_loras, err);
		if (rc)
			goto fail;
	}
	e->stats.kv_blocks_total = e->kv.n_blocks;
	*out = e;
	return 0;
fail:
	lp_engine_free(e);
	return rc;
}

static void seq_free(struct lp_seq *s)
{
	lp_sampler_release(&s->sampler);
	free(s->tokens);
	free(s->blocks);
	free(s);
}

void lp_engine_free(struct lp_engine *e)
{
	struct lp_seq *s, *next;

	if (!e)
		return;
	for (s = e->running; s; s = next) {
		next = s->next;
		seq_free(s);
	}
	for (s = e->waiting; s; s = next) {
		next = s->next;
		seq_free(s);
	}
	if (e->be)
		free_step_bufs(e);
	lp_kv_cache_release(&e->kv);
	lp_lora_cache_free(e->loras);
	free(e->segs);
	free(e->op_segs);
	free(e->h_ids);
	free(e->h_pos);
	free(e->h_tok_seq);
	free(e->h_slots);
	free(e->h_out_rows);
	free(e->h_block_tables);
	free(e->step_seqs);
	free(e->step_take);
	free(e->sample_seqs);
	free(e->h_logits);
	free(e->h_scratch);
	free(e->outs);
	free(e);
}

/* ---- sequences ---- */

int lp_engine_add(struct lp_engine *e, const struct lp_seq_params *p, struct lp_seq **out,
                  struct lp_err *err)
{
	int vocab = e->model->cfg.vocab_size;
	struct lp_seq *s;
	int rc;

	*out = NULL;
	if (p->n_prompt == 0)
		return lp_errf(err, -EINVAL, "the prompt is empty");
	if (p->n_prompt >= (size_t)e->cfg.max_model_len)
		return lp_errf(err, -EINVAL,
		               "the prompt has %zu tokens, which leaves no room under the maximum "
		               "model length of %d",
		               p->n_prompt, e->cfg.max_model_len);
	for (size_t i = 0; i < p->n_prompt; i++)
		if (p->prompt[i] < 0 || p->prompt[i] >= vocab)
			return lp_errf(
			    err, -EINVAL,
			    "token id %d at position %zu is out of range (vocabulary %d)",
			    p->prompt[i], i, vocab);
	rc = lp_sampling_params_check(&p->sampling, err);
	if (rc)
		return rc;
	s = calloc(1, sizeof(*s));
	if (!s)
		return lp_errf(err, -ENOMEM, "out of memory");
	s->tokens = malloc((size_t)e->cfg.max_model_len * sizeof(int32_t));
	s->blocks = malloc((size_t)e->max_blocks_per_seq * sizeof(int32_t));
	if (!s->tokens || !s->blocks) {
		seq_free(s);
		return lp_errf(err, -ENOMEM, "out of memory");
	}
	rc = lp_sampler_init(&s->sampler, &p->sampling, vocab, err);
	if (rc) {
		seq_free(s);
		return rc;
	}
	if (p->adapter && *p->adapter) {
		rc = lp_lora_cache_acquire(e->loras, p->adapter, &s->adapter, err);
		if (rc) {
			seq_free(s);
			return rc;
		}
	}
	lp_sampler_set_prompt(&s->sampler, p->prompt, p->n_prompt);
	memcpy(s->tokens, p->prompt, p->n_prompt * sizeof(int32_t));
	s->n_prompt = (int)p->n_prompt;
	s->n_tokens = (int)p->n_prompt;
	s->max_tokens = p->max_tokens;
	s->ignore_eos = p->ignore_eos;
	s->id = e->next_id++;
	s->state = LP_SEQ_WAITING;
	list_append(&e->waiting, s);
	e->n_waiting++;
	*out = s;
	return 0;
}

static void seq_drop_blocks(struct lp_engine *e, struct lp_seq *s)
{
	for (int i = 0; i < s->n_blocks; i++)
		lp_kv_cache_free(&e->kv, s->blocks[i]);
	s->n_blocks = 0;
	s->n_computed = 0;
}

void lp_engine_finish(struct lp_engine *e, struct lp_seq *s)
{
	if (s->state == LP_SEQ_FINISHED)
		return;
	if (s->state == LP_SEQ_RUNNING) {
		list_remove(&e->running, s);
		e->n_running--;
	} else {
		list_remove(&e->waiting, s);
		e->n_waiting--;
	}
	if (s->adapter) {
		if (s->state == LP_SEQ_RUNNING)
			lp_lora_cache_unpin(e->loras, s->adapter);
		lp_lora_cache_release(e->loras, s->adapter);
		s->adapter = NULL;
	}
	seq_drop_blocks(e, s);
	s->state = LP_SEQ_FINISHED;
	if (s->finish == LP_FINISH_NONE)
		s->finish = LP_FINISH_ABORT;
}

void lp_engine_release(struct lp_engine *e, struct lp_seq *s)
{
	if (!s)
		return;
	lp_engine_finish(e, s);
	seq_free(s);
}

bool lp_engine_has_work(const struct lp_engine *e)
{
	return e->running || e->waiting;
}

void lp_engine_stats(const struct lp_engine *e, struct lp_engine_stats *out)
{
	*out = e->stats;
	out->kv_blocks_used = e->kv.n_blocks - e->kv.n_free;
	out->running = e->n_running;
	out->waiting = e->n_waiting;
}

/* ---- scheduling ---- */

/* Gives s blocks for positions [0, n_positions); false if the cache ran out
 * (the blocks it did get stay with s). */
static bool ensure_blocks(struct lp_engine *e, struct lp_seq *s, int n_positions)
{
	int need = (n_positions + e->cfg.block_size - 1) / e->cfg.block_size;

	while (s->n_blocks < need) {
		int32_t b = lp_kv_cache_alloc(&e->kv);
		if (b < 0)
			return false;
		s->blocks[s->n_blocks++] = b;
	}
	return true;
}

/* Drops s's cache and puts it back at the head of the queue, to be
 * recomputed from its tokens (prompt and generated so far). */
static void preempt(struct lp_engine *e, struct lp_seq *s)
{
	list_remove(&e->running, s);
	e->n_running--;
	if (s->adapter)
		lp_lora_cache_unpin(e->loras, s->adapter);
	seq_drop_blocks(e, s);
	s->state = LP_SEQ_WAITING;
	s->n_preempted++;
	list_push_front(&e->waiting, s);
	e->n_waiting++;
	e->stats.preemptions++;
}

static bool is_scheduled(const struct lp_engine *e, int n, const struct lp_seq *s)
{
	for (int i = 0; i < n; i++)
		if (e->step_seqs[i] == s)
			return true;
	return false;
}

/* The most recently admitted running sequence not yet scheduled this step,
 * other than keep; NULL if none. */
static struct lp_seq *pick_victim(struct lp_engine *e, int n_sched, const struct lp_seq *keep)
{
	struct lp_seq *victim = NULL;

	for (struct lp_seq *s = e->running; s; s = s->next)
		if (s != keep && !is_scheduled(e, n_sched, s))
			victim = s;
	return victim;
}

/* Fills step_seqs/step_take; returns how many sequences were scheduled. */
static int schedule(struct lp_engine *e)
{
	int budget = e->cfg.max_batched_tokens, n = 0;
	struct lp_seq *s, *next;

	/* 1. one token for every running sequence in the decode phase */
	for (s = e->running; s && budget > 0; s = next) {
		next = s->next;
		if (s->n_tokens - s->n_computed != 1)
			continue;
		while (!ensure_blocks(e, s, s->n_computed + 1)) {
			struct lp_seq *victim = pick_victim(e, n, s);
			if (!victim)
				break;
			if (victim == next)
				next = victim->next;
			preempt(e, victim);
		}
		if (s->n_blocks * e->cfg.block_size < s->n_computed + 1) {
			next = s->next;
			preempt(e, s);
			continue;
		}
		e->step_seqs[n] = s;
		e->step_take[n++] = 1;
		budget--;
	}
	/* 2. prefill chunks: running sequences part-way through, then new ones */
	for (int pass = 0; pass < 2; pass++) {
		for (s = pass ? e->waiting : e->running; s && budget > 0; s = next) {
			next = s->next;
			int want = s->n_tokens - s->n_computed;
			if (pass == 0 && want <= 1)
				continue;
			if (pass == 1 && e->n_running >= e->cfg.max_num_seqs)
				break;
			/* every device slot held by running requests: let others by */
			if (pass == 1 && s->adapter && !lp_lora_cache_pin(e->loras, s->adapter))
				continue;
			int take = want < budget ? want : budget;
			int fit;
			ensure_blocks(e, s, s->n_computed + take);
			fit = s->n_blocks * e->cfg.block_size - s->n_computed;
			if (fit < take)
				take = fit;
			if (take <= 0) {
				if (pass == 1 && s->adapter)
					lp_lora_cache_unpin(e->loras, s->adapter);
				goto out;
			}
			if (pass == 1) {
				list_remove(&e->waiting, s);
				e->n_waiting--;
				list_append(&e->running, s);
				e->n_running++;
				s->state = LP_SEQ_RUNNING;
			}
			e->step_seqs[n] = s;
			e->step_take[n++] = take;
			budget -= take;
		}
	}
out:
	/* Nothing fits although work is waiting: part-prefilled sequences hold
	 * the cache. Free the newest one's so that the others can go on. */
	if (n == 0 && e->n_running > 1) {
		preempt(e, pick_victim(e, 0, NULL));
		return schedule(e);
	}
	return n;
}

/* Orders the step's sequences so that those sharing an adapter are
 * adjacent (base-model ones first), keeping their order otherwise. */
static void group_by_adapter(struct lp_engine *e, int n)
{
	for (int i = 1; i < n; i++) {
		struct lp_seq *s = e->step_seqs[i];
		int take = e->step_take[i], key = s->adapter ? s->adapter->slot : -1, j = i;
		while (j > 0 && (e->step_seqs[j - 1]->adapter ? e->step_seqs[j - 1]->adapter->slot
		                                              : -1) > key) {
			e->step_seqs[j] = e->step_seqs[j - 1];
			e->step_take[j] = e->step_take[j - 1];
			j--;
		}
		e->step_seqs[j] = s;
		e->step_take[j] = take;
	}
}

/* out += LoRA(x) for target t of layer l, per adapter segment. */
/* The LoRA of group g of layer l: outs are the group's targets' outputs in
 * target order, x their common input. */
static void apply_lora(struct lp_engine *e, int l, enum lp_lora_group g, const struct lp_tensor *x,
                       struct lp_tensor *out0, struct lp_tensor *out1, struct lp_tensor *out2)
{
	struct lp_lora_args args = {.x = x, .out = {out0, out1, out2}, .segs = e->op_segs};
	struct lp_tensor tmp = e->lora_tmp;
	int first, count;

	lp_lora_group_targets(g, &first, &count);
	args.n_outs = count;
	for (int i = 0; i < e->n_segs; i++) {
		const struct step_seg *sg = &e->segs[i];
		const struct lp_tensor *a =
		    &sg->adapter->a[(size_t)l * LP_LORA_N_GROUPS + (size_t)g];
		struct lp_lora_seg *o = &e->op_segs[args.n_segs];
		if (!a->rows)
			continue;
		*o = (struct lp_lora_seg){sg->row0, sg->rows, a, {NULL, NULL, NULL}};
		for (int t = 0; t < count; t++) {
			const struct lp_tensor *b =
			    &sg->adapter->b[(size_t)l * LP_LORA_N_TARGETS + (size_t)(first + t)];
			o->b[t] = b->rows ? b : NULL;
		}
		args.n_segs++;
	}
	if (!args.n_segs)
		return;
	tmp.rows = x->rows;
	args.tmp = &tmp;
	e->be->ops->lora(e->be->ctx, &args);
}

/* ---- forward pass ---- */

/* Runs the model over the n_tok staged tokens and leaves the logits of the
 * n_out staged output rows in d.logits. */
static void forward(struct lp_engine *e, int n_tok, int n_seqs, int n_out)
{
	const struct lp_model *m = e->model;
	const struct lp_model_config *c = &m->cfg;
	const struct lp_backend_ops *ops = e->be->ops;
	void *ctx = e->be->ctx;
	int qdim = c->n_heads * c->head_dim, kvdim = c->n_kv_heads * c->head_dim;
	struct lp_tensor x = view(&e->d.x, LP_DTYPE_F32, n_tok, c->dim);
	struct lp_tensor xn = view(&e->d.xn, LP_DTYPE_F32, n_tok, c->dim);
	struct lp_tensor q = view(&e->d.q, LP_DTYPE_F32, n_tok, qdim);
	struct lp_tensor k = view(&e->d.k, LP_DTYPE_F32, n_tok, kvdim);
	struct lp_tensor v = view(&e->d.v, LP_DTYPE_F32, n_tok, kvdim);
	struct lp_tensor att = view(&e->d.att, LP_DTYPE_F32, n_tok, qdim);
	struct lp_tensor gate = view(&e->d.gate, LP_DTYPE_F32, n_tok, c->ffn_dim);
	struct lp_tensor up = view(&e->d.up, LP_DTYPE_F32, n_tok, c->ffn_dim);
	struct lp_tensor h = view(&e->d.h, LP_DTYPE_F32, n_out, c->dim);
	struct lp_tensor logits = view(&e->d.logits, LP_DTYPE_F32, n_out, c->vocab_size);
	const int32_t *ids = e->d.ids.data, *pos = e->d.pos.data;
	struct lp_attention_args aa = {
	    .n_tokens = n_tok,
	    .n_heads = c->n_heads,
	    .n_kv_heads = c->n_kv_heads,
	    .head_dim = c->head_dim,
	    .block_size = e->cfg.block_size,
	    .max_blocks_per_seq = e->max_blocks_per_seq,
	    .scale = 1.0f / sqrtf((float)c->head_dim),
	    .q = &q,
	    .tok_seq = e->d.tok_seq.data,
	    .tok_pos = pos,
	    .block_tables = e->d.block_tables.data,
	    .out = &att,
	};
	(void)n_seqs;

	ops->get_rows(ctx, &x, &m->tok_embd, ids, n_tok);
	for (int l = 0; l < c->n_layers; l++) {
		const struct lp_layer_weights *L = &m->layers[l];

		ops->rmsnorm(ctx, &xn, &x, &L->attn_norm, c->rms_eps);
		ops->matmul(ctx, &q, &xn, &L->wq, false);
		ops->matmul(ctx, &k, &xn, &L->wk, false);
		ops->matmul(ctx, &v, &xn, &L->wv, false);
		if (e->n_segs) {
			apply_lora(e, l, LP_LORA_GROUP_QKV, &xn, &q, &k, &v);
		}
		if (c->attn_bias) {
			ops->add_bias(ctx, &q, &L->bq);
			ops->add_bias(ctx, &k, &L->bk);
			ops->add_bias(ctx, &v, &L->bv);
		}
		ops->rope(ctx, &q, c->n_heads, c->head_dim, pos, &m->inv_freq);
		ops->rope(ctx, &k, c->n_kv_heads, c->head_dim, pos, &m->inv_freq);
		ops->kv_store(ctx, &e->kv.k[l], &e->kv.v[l], &k, &v, e->d.slots.data);
		aa.k_cache = &e->kv.k[l];
		aa.v_cache = &e->kv.v[l];
		ops->attention(ctx, &aa);
		ops->matmul(ctx, &x, &att, &L->wo, true);
		if (e->n_segs)
			apply_lora(e, l, LP_LORA_GROUP_O, &att, &x, NULL, NULL);

		ops->rmsnorm(ctx, &xn, &x, &L->ffn_norm, c->rms_eps);
		ops->matmul(ctx, &gate, &xn, &L->w_gate, false);
		ops->matmul(ctx, &up, &xn, &L->w_up, false);
		if (e->n_segs) {
			apply_lora(e, l, LP_LORA_GROUP_GATE_UP, &xn, &gate, &up, NULL);
		}
		ops->silu_mul(ctx, &gate, &gate, &up);
		if (e->n_segs)
			apply_lora(e, l, LP_LORA_GROUP_DOWN, &gate, &x, NULL, NULL);
		ops->matmul(ctx, &x, &gate, &L->w_down, true);
	}
	if (n_out == 0)
		return;
	ops->get_rows(ctx, &h, &x, e->d.out_rows.data, n_out);
	ops->rmsnorm(ctx, &h, &h, &m->out_norm, c->rms_eps);
	ops->matmul(ctx, &logits, &h, &m->output, false);
}

static bool seq_done(const struct lp_engine *e, struct lp_seq *s, int32_t tok)
{
	if (!s->ignore_eos && lp_model_is_eos(e->model, tok)) {
		s->finish = LP_FINISH_STOP;
		return true;
	}
	if ((s->max_tokens > 0 && s->n_tokens - s->n_prompt >= s->max_tokens) ||
	    s->n_tokens >= e->cfg.max_model_len) {
		s->finish = LP_FINISH_LENGTH;
		return true;
	}
	return false;
}

int lp_engine_step(struct lp_engine *e, const struct lp_step_output **outs, int *n_outs,
                   struct lp_err *err)
{
	int vocab = e->model->cfg.vocab_size, mb = e->max_blocks_per_seq, bs = e->cfg.block_size;
	int n_seqs, n_tok = 0, n_out = 0;

	*outs = e->outs;
	*n_outs = 0;
	n_seqs = schedule(e);
	if (n_seqs == 0)
		return 0;
	group_by_adapter(e, n_seqs);

	/* stage the step's tokens, positions, cache slots and block tables */
	e->n_segs = 0;
	for (int j = 0; j < n_seqs; j++) {
		struct lp_seq *s = e->step_seqs[j];
		int take = e->step_take[j];

		if (s->adapter) {
			struct step_seg *g = e->n_segs ? &e->segs[e->n_segs - 1] : NULL;
			if (!g || g->adapter != s->adapter) {
				g = &e->segs[e->n_segs++];
				g->row0 = n_tok;
				g->rows = 0;
				g->adapter = s->adapter;
			}
			g->rows += take;
		}
		memcpy(e->h_block_tables + (size_t)j * mb, s->blocks,
		       (size_t)s->n_blocks * sizeof(int32_t));
		for (int t = 0; t < take; t++) {
			int p = s->n_computed + t;
			e->h_ids[n_tok] = s->tokens[p];
			e->h_pos[n_tok] = p;
			e->h_tok_seq[n_tok] = j;
			e->h_slots[n_tok] = s->blocks[p / bs] * bs + p % bs;
			if (p < s->n_prompt)
				e->stats.prompt_tokens++;
			n_tok++;
		}
		s->n_computed += take;
		if (s->n_computed == s->n_tokens) {
			e->h_out_rows[n_out] = n_tok - 1;
			e->sample_seqs[n_out++] = s;
		}
	}
	lp_backend_upload(e->be, e->d.ids.data, e->h_ids, (size_t)n_tok * 4);
	lp_backend_upload(e->be, e->d.pos.data, e->h_pos, (size_t)n_tok * 4);
	lp_backend_upload(e->be, e->d.tok_seq.data, e->h_tok_seq, (size_t)n_tok * 4);
	lp_backend_upload(e->be, e->d.slots.data, e->h_slots, (size_t)n_tok * 4);
	lp_backend_upload(e->be, e->d.block_tables.data, e->h_block_tables,
	                  (size_t)n_seqs * mb * 4);
	lp_backend_upload(e->be, e->d.out_rows.data, e->h_out_rows, (size_t)n_out * 4);

	if (n_out == 0) {
		/* only prefill chunks: no logits needed yet */
		forward(e, n_tok, n_seqs, 0);
		e->be->ops->synchronize(e->be->ctx);
		e->stats.steps++;
		return 0;
	}
	forward(e, n_tok, n_seqs, n_out);
	lp_backend_download(e->be, e->h_logits, e->d.logits.data,
	                    (size_t)n_out * vocab * sizeof(float));
	e->stats.steps++;

	for (int i = 0; i < n_out; i++) {
		struct lp_seq *s = e->sample_seqs[i];
		const float *row = e->h_logits + (size_t)i * vocab;
		struct lp_step_output *o = &e->outs[i];
		int32_t tok;

		memcpy(e->h_scratch, row, (size_t)vocab * sizeof(float));
		tok = lp_sampler_sample(&s->sampler, e->h_scratch);
		lp_sampler_accept(&s->sampler, tok);
		s->tokens[s->n_tokens++] = tok;
		e->stats.generated_tokens++;
		o->seq = s;
		o->token = tok;
		o->logits = row;
		o->finished = seq_done(e, s, tok);
		if (o->finished) {
			enum lp_finish_reason why = s->finish;
			lp_engine_finish(e, s);
			s->finish = why;
		}
	}
	*n_outs = n_out;
	(void)err;
	return 0;
}
