/* The engine: scheduler, step staging and sampling; see engine.h.
 *
 * A step, top to bottom:
 *   schedule()        pick tokens: decodes first, then prefill chunks, under
 *                     the token budget; grow block tables, preempting if
 *                     needed
 *   stage             the step's metadata (token ids, positions, sequence of
 *                     each row, cache slots, LoRA slot of each row, output
 *                     rows, adapter segments, block tables) into one host
 *                     buffer, uploaded in one copy (struct step_layout)
 *   lp_engine_forward embeddings -> layers -> logits (forward.c), between
 *                     the backend's begin_step and end_step
 *   sample            per sequence, on the host, from the downloaded logits;
 *                     then the backend's sticky status is checked once */
#include "agent/engine/engine-internal.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DEFAULT_KV_BYTES ((size_t)512 << 20)
/* Penalty entries a step can send to a device's sample op (4 MiB); rows
 * beyond it take the host sampler. */
#define SAMPLE_PEN_CAP ((size_t)1 << 18)

void lp_engine_config_default(struct lp_engine_config *c)
{
	c->max_num_seqs = 32;
	c->max_model_len = 0;
	c->max_batched_tokens = 512;
	c->kv_cache_bytes = 0;
	c->gpu_memory_utilization = 0.9;
	c->kv_type = LP_DTYPE_COUNT;
	c->lora_type = LP_DTYPE_COUNT;
	c->block_size = 16;
	c->max_loras = 8;
	c->max_cpu_loras = 16;
	c->max_lora_rank = 64;
	c->base_names = NULL;
	c->allow_base_mismatch = false;
	c->prefix_caching = true;
	c->return_logits = false;
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

const struct lp_engine_memory *lp_engine_memory(const struct lp_engine *e)
{
	return &e->mem;
}

const struct lp_backend_info *lp_engine_backend_info(const struct lp_engine *e)
{
	return &e->info;
}

static double now_seconds(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
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
	int rc = lp_backend_alloc(e->be, bytes ? bytes : 4, b, err);

	if (!rc)
		e->mem.activations += b->size;
	return rc;
}

static void free_step_bufs(struct lp_engine *e)
{
	struct lp_buffer *all[] = {&e->d_meta, &e->d_x,      &e->d_xn,     &e->d_q,
	                           &e->d_k,    &e->d_v,      &e->d_att,    &e->d_gate,
	                           &e->d_up,   &e->d_h,      &e->d_logits, &e->d_lora_tmp,
	                           &e->d_rope, &e->d_sample, &e->d_mask};

	for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
		lp_backend_free(e->be, all[i]);
}

static int check_config(struct lp_engine_config *c, const struct lp_model *m,
                        const struct lp_backend_info *info, struct lp_err *err)
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
	if (!(c->gpu_memory_utilization > 0 && c->gpu_memory_utilization <= 1))
		return lp_errf(err, -EINVAL, "gpu-memory-utilization %g must be in (0, 1]",
		               c->gpu_memory_utilization);
	if (c->kv_type == LP_DTYPE_COUNT)
		c->kv_type = info->kv_type;
	if (c->kv_type != LP_DTYPE_F32 && c->kv_type != LP_DTYPE_F16 && c->kv_type != LP_DTYPE_BF16)
		return lp_errf(err, -EINVAL, "kv cache type must be f32, f16 or bf16, not %s",
		               lp_dtype_name(c->kv_type));
	if (c->lora_type == LP_DTYPE_COUNT)
		c->lora_type = info->lora_type;
	if (c->lora_type != LP_DTYPE_F32 && c->lora_type != LP_DTYPE_F16 &&
	    c->lora_type != LP_DTYPE_BF16)
		return lp_errf(err, -EINVAL, "lora slot type must be f32, f16 or bf16, not %s",
		               lp_dtype_name(c->lora_type));
	return 0;
}

/* The step metadata's regions for a step of n rows (padding included) whose
 * block tables are `width` wide: each region n long (segments 3n), 16-byte
 * aligned, the block tables last. The same n gives the same offsets, so a
 * captured decode step of a bucket finds its data where it left it. */
static void plan_layout(struct step_layout *L, int n, int n_bt_rows, int width)
{
	size_t r = ((size_t)n + 3) & ~(size_t)3;

	L->ids = 0;
	L->pos = r;
	L->tok_seq = 2 * r;
	L->slots = 3 * r;
	L->tok_slot = 4 * r;
	L->out_rows = 5 * r;
	L->segs = 6 * r;
	L->block_tables = 9 * r;
	L->total = 9 * r + (size_t)n_bt_rows * (size_t)width;
}

/* The cache blocks one sequence must be able to hold to run to
 * max-model-len alone: all of its blocks, or, when every layer slides,
 * those its window can touch and one to grow into (the blocks before the
 * window go back to the cache as it moves on, and the scheduler cuts a
 * prefill into chunks that fit). */
static size_t seq_blocks_needed(const struct lp_engine *e)
{
	size_t all = (size_t)e->max_blocks_per_seq, bs = (size_t)e->cfg.block_size;
	size_t win = ((size_t)e->release_window + bs - 1) / bs + 2;

	return e->release_window && win < all ? win : all;
}

/* The KV cache in what is left: its own setting, 512 MiB on the CPU, or
 * gpu_memory_utilization of the device less what is in use now. */
static int size_kv(struct lp_engine *e, size_t block_bytes, size_t *n_blocks, struct lp_err *err)
{
	size_t bytes = e->cfg.kv_cache_bytes, need = seq_blocks_needed(e);

	if (!bytes && e->info.host_memory) {
		bytes = DEFAULT_KV_BYTES;
	} else if (!bytes) {
		struct lp_backend_info now;
		double budget;

		e->be->ops->info(e->be->ctx, &now);
		budget = e->cfg.gpu_memory_utilization * (double)now.total_bytes -
		         (double)(now.total_bytes - now.free_bytes);
		if (budget < (double)block_bytes * (double)need)
			return lp_errf(
			    err, -ENOMEM,
			    "no room for the KV cache: %.2f of %.1f GiB is allowed "
			    "(gpu-memory-utilization), %.1f GiB is in use (weights "
			    "%.1f GiB, LoRA slots and workspaces %.1f GiB, activations "
			    "%.2f GiB), and one sequence of max-model-len %d needs %.2f GiB%s",
			    e->cfg.gpu_memory_utilization, now.total_bytes / 1073741824.0,
			    (now.total_bytes - now.free_bytes) / 1073741824.0,
			    e->mem.weights / 1073741824.0, e->mem.workspaces / 1073741824.0,
			    e->mem.activations / 1073741824.0, e->cfg.max_model_len,
			    (double)block_bytes * (double)need / 1073741824.0,
			    e->release_window ? " (its sliding window's blocks)" : "");
		bytes = (size_t)budget;
	}
	*n_blocks = bytes / block_bytes;
	if (*n_blocks < need && e->release_window)
		return lp_errf(err, -EINVAL,
		               "kv-cache-bytes %zu holds %zu tokens, fewer than one sequence's "
		               "sliding window of %d positions needs (%zu blocks of %d, %zu bytes)",
		               bytes, *n_blocks * (size_t)e->cfg.block_size, e->release_window,
		               need, e->cfg.block_size, need * block_bytes);
	if (*n_blocks < need)
		return lp_errf(err, -EINVAL,
		               "kv-cache-bytes %zu holds %zu tokens, fewer than max-model-len %d "
		               "(needs %zu bytes)",
		               bytes, *n_blocks * (size_t)e->cfg.block_size, e->cfg.max_model_len,
		               need * block_bytes);
	if (*n_blocks > INT32_MAX / (size_t)e->cfg.block_size)
		*n_blocks = INT32_MAX / (size_t)e->cfg.block_size;
	return 0;
}

int lp_engine_new(struct lp_engine **out, struct lp_model *model,
                  const struct lp_engine_config *cfg, struct lp_err *err)
{
	const struct lp_model_config *mc = &model->cfg;
	struct lp_engine *e;
	struct lp_backend_limits lim;
	size_t block_bytes, n_blocks = 0, f = sizeof(float);
	int T, S, O, n_rope, rc;
	int qdim = mc->n_heads * mc->head_dim, kvdim = mc->n_kv_heads * mc->head_dim;

	*out = NULL;
	e = calloc(1, sizeof(*e));
	if (!e)
		return lp_errf(err, -ENOMEM, "out of memory");
	e->model = model;
	e->be = model->be;
	e->cfg = *cfg;
	e->next_id = 1;
	e->be->ops->info(e->be->ctx, &e->info);
	e->mem.total = e->info.total_bytes;
	e->mem.weights = model->weight_bytes;
	rc = check_config(&e->cfg, model, &e->info, err);
	if (rc)
		goto fail;
	T = e->cfg.max_batched_tokens;
	S = e->cfg.max_num_seqs;
	/* a padded decode step at most doubles its rows (backend.h) */
	O = e->info.token_buckets ? (2 * S < T ? 2 * S : T) : S;
	e->mem_max_out = O;
	e->max_blocks_per_seq = (e->cfg.max_model_len + e->cfg.block_size - 1) / e->cfg.block_size;
	for (int l = 0; l < mc->n_layers; l++) {
		int w = lp_model_layer_window(mc, l);

		if (!w) {
			e->release_window = 0;
			break;
		}
		e->release_window = w > e->release_window ? w : e->release_window;
	}

	lim = (struct lp_backend_limits){
	    .n_layers = mc->n_layers,
	    .dim = mc->dim,
	    .n_heads = mc->n_heads,
	    .n_kv_heads = mc->n_kv_heads,
	    .head_dim = mc->head_dim,
	    .ffn_dim = mc->ffn_dim,
	    .vocab = mc->vocab_size,
	    .max_tokens = T,
	    .max_seqs = S,
	    .max_out = O,
	    .block_size = e->cfg.block_size,
	    .max_blocks_per_seq = e->max_blocks_per_seq,
	    .kv_type = e->cfg.kv_type,
	    .max_loras = e->cfg.max_loras,
	    .max_lora_rank = e->cfg.max_lora_rank,
	    .lora_type = e->cfg.lora_type,
	    .max_logprobs = LP_ENGINE_MAX_LOGPROBS,
	    .max_penalties = (int)SAMPLE_PEN_CAP,
	};
	rc = e->be->ops->reserve(e->be->ctx, &lim, &e->mem.workspaces, err);
	if (rc)
		goto fail;
	e->reserved = true;

	/* the largest step: every row, and block tables for as many rows
	 * as a padded decode step may have */
	plan_layout(&e->lay, T, O > S ? O : S, e->max_blocks_per_seq);
	e->meta_cap = e->lay.total;
	rc = e->be->ops->host_alloc(e->be->ctx, e->meta_cap * sizeof(int32_t), (void **)&e->h_meta,
	                            err);
	if (rc)
		goto fail;
	memset(e->h_meta, 0, e->meta_cap * sizeof(int32_t));
	e->step_seqs = calloc((size_t)S, sizeof(*e->step_seqs));
	e->step_take = calloc((size_t)S, sizeof(*e->step_take));
	e->sample_seqs = calloc((size_t)S, sizeof(*e->sample_seqs));
	e->h_logits = calloc((size_t)S * (size_t)mc->vocab_size, sizeof(float));
	e->h_scratch = calloc((size_t)mc->vocab_size, sizeof(float));
	e->outs = calloc((size_t)S, sizeof(*e->outs));
	/* one RoPE table, or two when the local layers have their own base */
	n_rope = model->rope_local_inv_freq ? 2 : 1;
	e->h_rope = malloc((size_t)n_rope * (size_t)e->cfg.max_model_len * (size_t)mc->head_dim *
	                   sizeof(float));
	if (!e->step_seqs || !e->step_take || !e->sample_seqs || !e->h_logits || !e->h_scratch ||
	    !e->outs || !e->h_rope) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto fail;
	}
	lp_model_rope_table(model, false, e->cfg.max_model_len, e->h_rope);
	if (n_rope == 2)
		lp_model_rope_table(model, true, e->cfg.max_model_len,
		                    e->h_rope +
		                        (size_t)e->cfg.max_model_len * (size_t)mc->head_dim);
	rc = lp_backend_import(e->be, e->h_rope,
	                       (size_t)n_rope * (size_t)e->cfg.max_model_len *
	                           (size_t)mc->head_dim * f,
	                       &e->d_rope, err);
	if (rc)
		goto fail;
	e->mem.activations += e->d_rope.size;
	{
		struct lp_tensor all = lp_engine_view(
		    &e->d_rope, LP_DTYPE_F32, (int64_t)n_rope * e->cfg.max_model_len, mc->head_dim);

		e->rope = lp_tensor_rows(&all, 0, e->cfg.max_model_len);
		e->rope_local = lp_tensor_rows(&all, (int64_t)(n_rope - 1) * e->cfg.max_model_len,
		                               e->cfg.max_model_len);
	}
	if ((rc = alloc_dev(e, &e->d_meta, e->meta_cap * sizeof(int32_t), err)) ||
	    (rc = alloc_dev(e, &e->d_x, (size_t)T * mc->dim * f, err)) ||
	    (rc = alloc_dev(e, &e->d_xn, (size_t)T * mc->dim * f, err)) ||
	    (rc = alloc_dev(e, &e->d_q, (size_t)T * qdim * f, err)) ||
	    (rc = alloc_dev(e, &e->d_k, (size_t)T * kvdim * f, err)) ||
	    (rc = alloc_dev(e, &e->d_v, (size_t)T * kvdim * f, err)) ||
	    (rc = alloc_dev(e, &e->d_att, (size_t)T * qdim * f, err)) ||
	    (rc = alloc_dev(e, &e->d_gate, (size_t)T * mc->ffn_dim * f, err)) ||
	    (rc = alloc_dev(e, &e->d_up, (size_t)T * mc->ffn_dim * f, err)) ||
	    (rc = alloc_dev(e, &e->d_h, (size_t)O * mc->dim * f, err)) ||
	    (rc = alloc_dev(e, &e->d_logits, (size_t)O * mc->vocab_size * f, err)) ||
	    (rc = alloc_dev(e, &e->d_lora_tmp,
	                    (size_t)T * LP_LORA_MAX_OUTS * (size_t)e->cfg.max_lora_rank * f, err)))
		goto fail;
	if (!e->info.host_memory) {
		size_t bytes;

		/* rows, penalty entries (up to SAMPLE_PEN_CAP), results */
		e->sample_pen = ((size_t)O * sizeof(struct lp_sample_row) + 63) & ~(size_t)63;
		e->sample_pen_cap = SAMPLE_PEN_CAP;
		e->sample_out =
		    e->sample_pen + e->sample_pen_cap * sizeof(struct lp_sample_penalty);
		bytes =
		    e->sample_out + (2 + 2 * (size_t)LP_ENGINE_MAX_LOGPROBS) * O * sizeof(int32_t);
		e->host_row = calloc((size_t)O, sizeof(*e->host_row));
		if (!e->host_row) {
			rc = lp_errf(err, -ENOMEM, "out of memory");
			goto fail;
		}
		if ((rc = alloc_dev(e, &e->d_sample, bytes, err)) ||
		    (rc = e->be->ops->host_alloc(e->be->ctx, bytes, (void **)&e->h_sample, err)))
			goto fail;
	}

	block_bytes =
	    lp_kv_cache_block_bytes(mc->n_layers, kvdim, e->cfg.block_size, e->cfg.kv_type);
	rc = size_kv(e, block_bytes, &n_blocks, err);
	if (rc)
		goto fail;
	rc = lp_kv_cache_init(&e->kv, e->be, mc->n_layers, kvdim, e->cfg.block_size, (int)n_blocks,
	                      e->cfg.kv_type, err);
	if (rc)
		goto fail;
	e->mem.kv = n_blocks * block_bytes;
	e->mem.kv_blocks = (int)n_blocks;
	e->mem.kv_tokens = (int)n_blocks * e->cfg.block_size;
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
	lp_grammar_matcher_free(s->matcher);
	free(s->tokens);
	free(s->blocks);
	free(s->digests);
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
	/* adapters leave their slots before the reservation goes */
	lp_lora_cache_free(e->loras);
	if (e->be) {
		free_step_bufs(e);
		lp_kv_cache_release(&e->kv);
		if (e->h_meta)
			e->be->ops->host_free(e->be->ctx, e->h_meta);
		if (e->h_sample)
			e->be->ops->host_free(e->be->ctx, e->h_sample);
		if (e->reserved) {
			size_t none;
			e->be->ops->reserve(e->be->ctx, NULL, &none, NULL);
		}
	}
	free(e->step_seqs);
	free(e->step_take);
	free(e->sample_seqs);
	free(e->h_logits);
	free(e->h_scratch);
	free(e->h_mask);
	lp_grammar_vocab_free(e->gvocab);
	free(e->h_rope);
	free(e->host_row);
	free(e->outs);
	free(e);
}

/* ---- sequences ---- */

/* The vocabulary of masks and their rows, made with the first sequence
 * that has a grammar. */
static int grammar_ready(struct lp_engine *e, struct lp_err *err)
{
	const struct lp_model_config *c = &e->model->cfg;
	size_t bytes;
	int rc;

	if (e->gvocab)
		return 0;
	if (!e->model->tok)
		return lp_errf(err, -EINVAL, "the model has no tokenizer: no constrained decoding");
	if ((rc = lp_grammar_vocab_new(&e->gvocab, e->model->tok, c->vocab_size, c->eos_ids,
	                               c->n_eos, err)))
		return rc;
	bytes = (size_t)e->mem_max_out * (lp_grammar_vocab_mask_words(e->gvocab) + 1) *
	        sizeof(uint32_t);
	if (!(e->h_mask = malloc(bytes)))
		rc = lp_errf(err, -ENOMEM, "out of memory");
	else if (!e->info.host_memory)
		rc = alloc_dev(e, &e->d_mask, bytes, err);
	if (rc) {
		free(e->h_mask);
		e->h_mask = NULL;
		lp_grammar_vocab_free(e->gvocab);
		e->gvocab = NULL;
	}
	return rc;
}

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
	if (p->top_logprobs < 0 || p->top_logprobs > LP_ENGINE_MAX_LOGPROBS)
		return lp_errf(err, -EINVAL, "top logprobs %d out of range (0..%d)",
		               p->top_logprobs, LP_ENGINE_MAX_LOGPROBS);
	s = calloc(1, sizeof(*s));
	if (!s)
		return lp_errf(err, -ENOMEM, "out of memory");
	s->tokens = malloc((size_t)e->cfg.max_model_len * sizeof(int32_t));
	s->blocks = malloc((size_t)e->max_blocks_per_seq * sizeof(int32_t));
	if (e->cfg.prefix_caching)
		s->digests = malloc((size_t)e->max_blocks_per_seq * sizeof(*s->digests));
	if (!s->tokens || !s->blocks || (e->cfg.prefix_caching && !s->digests)) {
		seq_free(s);
		return lp_errf(err, -ENOMEM, "out of memory");
	}
	rc = lp_sampler_init(&s->sampler, &p->sampling, vocab, err);
	if (!rc && p->grammar && !(rc = grammar_ready(e, err)))
		rc = lp_grammar_matcher_new(&s->matcher, p->grammar, err);
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
	s->logprobs = p->logprobs;
	s->top_logprobs = p->logprobs ? p->top_logprobs : 0;
	s->group = p->group;
	s->id = e->next_id++;
	s->state = LP_SEQ_WAITING;
	list_append(&e->waiting, s);
	e->n_waiting++;
	*out = s;
	return 0;
}

static void seq_drop_blocks(struct lp_engine *e, struct lp_seq *s)
{
	for (int i = s->n_released; i < s->n_blocks; i++)
		lp_kv_cache_free(&e->kv, s->blocks[i]);
	s->n_blocks = 0;
	s->n_released = 0;
	s->n_computed = 0;
	s->n_published = 0;
}

/* Sliding windows: when every layer slides, the tokens s computes from now
 * on attend to positions from n_computed - release_window + 1 on, so the
 * blocks wholly before that position go back to the cache (a published
 * one stays findable by its digest). Their entries become -1; the
 * attention never reads them (backend.h). */
static void seq_release_outside_window(struct lp_engine *e, struct lp_seq *s)
{
	int first = s->n_computed - e->release_window + 1;
	int keep = first > 0 ? first / e->cfg.block_size : 0;

	if (!e->release_window)
		return;
	for (; s->n_released < keep && s->n_released < s->n_blocks; s->n_released++) {
		lp_kv_cache_free(&e->kv, s->blocks[s->n_released]);
		s->blocks[s->n_released] = -1;
	}
}

/* ---- prefix caching ---- */

/* Digests of s's first n full blocks (its tokens only ever grow, so the
 * ones computed before stay true); false if one cannot be computed. */
static bool seq_digests(struct lp_engine *e, struct lp_seq *s, int n)
{
	int bs = e->cfg.block_size;
	uint64_t key = s->adapter ? s->adapter->version : 0;

	for (; s->n_digests < n; s->n_digests++) {
		int i = s->n_digests;
		if (!lp_kv_cache_digest(&e->kv, &s->digests[i], i ? &s->digests[i - 1] : NULL, key,
		                        s->tokens + (size_t)i * bs, bs))
			return false;
	}
	return true;
}

/* A sequence about to run with an empty cache takes every leading block of
 * its tokens that the cache holds, leaving at least its last token to
 * compute (its logits are needed). */
static void prefix_match(struct lp_engine *e, struct lp_seq *s)
{
	int bs = e->cfg.block_size, max = (s->n_tokens - 1) / bs;

	if (!e->cfg.prefix_caching || s->n_blocks || !seq_digests(e, s, max))
		return;
	while (s->n_blocks < max) {
		int32_t id = lp_kv_cache_lookup(&e->kv, &s->digests[s->n_blocks]);
		if (id < 0)
			break;
		s->blocks[s->n_blocks++] = id;
	}
	s->n_computed = s->n_blocks * bs;
	s->n_published = s->n_blocks;
	seq_release_outside_window(e, s);
}

/* Offers the cache every block of s that is full and computed now. */
static void prefix_publish(struct lp_engine *e, struct lp_seq *s)
{
	int full = s->n_computed / e->cfg.block_size;

	if (s->n_published < s->n_released)
		s->n_published = s->n_released; /* gone: nothing to offer */
	if (!e->cfg.prefix_caching || s->n_published >= full || !seq_digests(e, s, full))
		return;
	for (; s->n_published < full; s->n_published++)
		lp_kv_cache_publish(&e->kv, s->blocks[s->n_published], &s->digests[s->n_published]);
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

/* True when a sequence of s's request comes before s in the list from
 * head (a request of its own, group 0, never does). */
static bool group_seen(const struct lp_seq *head, const struct lp_seq *s)
{
	if (!s->group)
		return false;
	for (; head != s; head = head->next)
		if (head->group == s->group)
			return true;
	return false;
}

void lp_engine_stats(const struct lp_engine *e, struct lp_engine_stats *out)
{
	*out = e->stats;
	out->kv_blocks_total = e->kv.n_blocks;
	out->kv_blocks_used = e->kv.n_blocks - lp_kv_cache_available(&e->kv);
	out->kv_blocks_cached = e->kv.n_cached;
	out->running = e->n_running;
	out->waiting = e->n_waiting;
	out->running_requests = 0;
	out->waiting_requests = 0;
	for (const struct lp_seq *s = e->running; s; s = s->next)
		out->running_requests += !group_seen(e->running, s);
	for (const struct lp_seq *s = e->waiting; s; s = s->next) {
		bool runs = false;
		if (s->group)
			for (const struct lp_seq *r = e->running; r && !runs; r = r->next)
				runs = r->group == s->group;
		out->waiting_requests += !runs && !group_seen(e->waiting, s);
	}
}

/* Appends name to the comma-separated list in buf (len bytes used) unless
 * it is there already; false when it does not fit. */
static bool list_add_name(char *buf, size_t cap, size_t *len, const char *name)
{
	size_t n = strlen(name);

	for (const char *p = buf; *p;) {
		const char *end = strchr(p, ',');
		size_t l = end ? (size_t)(end - p) : strlen(p);
		if (l == n && !memcmp(p, name, n))
			return true;
		p += l + (end != NULL);
	}
	if (*len + (*len > 0) + n + 1 > cap)
		return false;
	if (*len)
		buf[(*len)++] = ',';
	memcpy(buf + *len, name, n + 1);
	*len += n;
	return true;
}

static bool adapter_list(const struct lp_seq *head, char *buf, size_t cap)
{
	size_t len = 0;
	bool whole = true;

	if (!cap)
		return false;
	buf[0] = 0;
	for (const struct lp_seq *s = head; s; s = s->next)
		if (s->adapter && !list_add_name(buf, cap, &len, s->adapter->name))
			whole = false;
	return whole;
}

bool lp_engine_adapter_lists(const struct lp_engine *e, char *running, size_t running_cap,
                             char *waiting, size_t waiting_cap)
{
	bool a = adapter_list(e->running, running, running_cap);
	bool b = adapter_list(e->waiting, waiting, waiting_cap);

	return a && b;
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
			if (pass == 1) {
				prefix_match(e, s);
				want = s->n_tokens - s->n_computed;
			}
			int take = want < budget ? want : budget;
			int fit;
			ensure_blocks(e, s, s->n_computed + take);
			fit = s->n_blocks * e->cfg.block_size - s->n_computed;
			if (fit < take)
				take = fit;
			if (take <= 0) {
				if (pass == 1) {
					/* a waiting sequence holds no blocks */
					seq_drop_blocks(e, s);
					if (s->adapter)
						lp_lora_cache_unpin(e->loras, s->adapter);
				}
				goto out;
			}
			if (pass == 1) {
				if (!s->t_scheduled) {
					s->t_scheduled = now_seconds();
					s->n_cached = s->n_computed < s->n_prompt ? s->n_computed
					                                          : s->n_prompt;
				}
				if (e->cfg.prefix_caching) {
					e->stats.prefix_queries += (uint64_t)s->n_tokens;
					e->stats.prefix_hits += (uint64_t)s->n_computed;
				}
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

/* The backend's sticky status, checked once per step: once it reports a
 * failure the engine stops running steps and every later step reports
 * it too. */
static int check_backend(struct lp_engine *e, struct lp_err *err)
{
	if (!e->failure.code && !lp_backend_status(e->be, &e->failure))
		return 0;
	if (!e->failure.code)
		e->failure.code = -EIO;
	return lp_errf(err, e->failure.code, "%s", e->failure.msg);
}

/* Stages the step's rows (n_pad of them, padding included) into h_meta;
 * fills plan. */
static void stage(struct lp_engine *e, int n_seqs, int n_pad, bool graphable,
                  struct step_plan *plan)
{
	const struct step_layout *L = &e->lay;
	int32_t *ids, *pos, *tok_seq, *slots, *tok_slot, *out_rows, *bt;
	struct lp_lora_seg *segs;
	int bs = e->cfg.block_size, n_tok = 0, n_out = 0, width = 0, max_ctx = 1;

	plan->n_segs = 0;
	for (int j = 0; j < n_seqs; j++)
		if (e->step_seqs[j]->n_blocks > width)
			width = e->step_seqs[j]->n_blocks;
	if (graphable)
		width = e->max_blocks_per_seq;
	plan_layout(&e->lay, n_pad, graphable ? n_pad : n_seqs, width);
	ids = e->h_meta + L->ids;
	pos = e->h_meta + L->pos;
	tok_seq = e->h_meta + L->tok_seq;
	slots = e->h_meta + L->slots;
	tok_slot = e->h_meta + L->tok_slot;
	out_rows = e->h_meta + L->out_rows;
	segs = (struct lp_lora_seg *)(e->h_meta + L->segs);
	bt = e->h_meta + L->block_tables;
	for (int j = 0; j < n_seqs; j++) {
		struct lp_seq *s = e->step_seqs[j];
		int take = e->step_take[j], lslot = s->adapter ? s->adapter->slot : -1;

		/* rows are ordered by slot (group_by_adapter), and a slot holds
		 * one adapter: each slot's rows are one segment */
		if (s->adapter) {
			struct lp_lora_seg *g = plan->n_segs ? &segs[plan->n_segs - 1] : NULL;
			if (!g || g->slot != lslot) {
				g = &segs[plan->n_segs++];
				*g = (struct lp_lora_seg){n_tok, 0, lslot};
			}
			g->rows += take;
		}
		memcpy(bt + (size_t)j * width, s->blocks, (size_t)s->n_blocks * sizeof(int32_t));
		memset(bt + (size_t)j * width + s->n_blocks, 0,
		       (size_t)(width - s->n_blocks) * sizeof(int32_t));
		for (int t = 0; t < take; t++) {
			int p = s->n_computed + t;
			ids[n_tok] = s->tokens[p];
			pos[n_tok] = p;
			tok_seq[n_tok] = j;
			slots[n_tok] = s->blocks[p / bs] * bs + p % bs;
			tok_slot[n_tok] = lslot;
			if (p < s->n_prompt)
				e->stats.prompt_tokens++;
			if (p + 1 > max_ctx)
				max_ctx = p + 1;
			n_tok++;
		}
		s->n_computed += take;
		prefix_publish(e, s);
		/* this step still reads the blocks released here (the table
		 * above keeps their ids); none is handed out again before the
		 * next step's schedule */
		seq_release_outside_window(e, s);
		if (s->n_computed == s->n_tokens) {
			out_rows[n_out] = n_tok - 1;
			e->sample_seqs[n_out++] = s;
		}
	}
	plan->n_out = n_out;
	/* padding rows: token 0 at position 0 of no sequence, stored nowhere */
	for (int r = n_tok; r < n_pad; r++) {
		ids[r] = 0;
		pos[r] = 0;
		tok_seq[r] = -1;
		slots[r] = -1;
		tok_slot[r] = -1;
	}
	if (graphable) {
		/* every padding row has a logits row too, and a block-table
		 * row, so that the step's shapes are those of its bucket */
		for (int r = n_tok; r < n_pad; r++) {
			out_rows[r] = r;
			memset(bt + (size_t)r * width, 0, (size_t)width * sizeof(int32_t));
		}
		plan->n_out = n_pad;
		max_ctx = e->cfg.max_model_len;
	}
	plan->n_tok = n_pad;
	plan->bt_width = width;
	plan->max_context = max_ctx;
}

/* ---- sampling ---- */

/* Mask row i (e->h_mask) for sample_seqs[i]'s grammar. A failure (out
 * of memory) fails the step's requests, as a backend failure would. */
static int fill_mask(struct lp_engine *e, int i, struct lp_err *err)
{
	size_t words = lp_grammar_vocab_mask_words(e->gvocab);

	return lp_grammar_matcher_fill_mask(e->sample_seqs[i]->matcher, e->gvocab,
	                                    e->h_mask + (size_t)i * words, err);
}

/* -inf for the tokens row's mask leaves out. */
static void apply_mask(const uint32_t *mask, float *row, int vocab)
{
	for (int w = 0; w * 32 < vocab; w++) {
		uint32_t m = mask[w];
		if (m == 0xffffffffu)
			continue;
		for (int b = 0; b < 32 && w * 32 + b < vocab; b++)
			if (!(m >> b & 1))
				row[w * 32 + b] = -INFINITY;
	}
}

/* Row i of h_logits into outs[i] with the host sampler (its grammar's
 * mask applied first, so that the logprobs are the constrained ones). */
static int host_sample_row(struct lp_engine *e, int i, bool mask_ready, struct lp_err *err)
{
	int vocab = e->model->cfg.vocab_size;
	struct lp_seq *s = e->sample_seqs[i];
	float *row = e->h_logits + (size_t)i * vocab;
	struct lp_step_output *o = &e->outs[i];
	int rc;

	if (s->matcher) {
		if (!mask_ready && (rc = fill_mask(e, i, err)))
			return rc;
		apply_mask(e->h_mask + (size_t)i * lp_grammar_vocab_mask_words(e->gvocab), row,
		           vocab);
	}
	memcpy(e->h_scratch, row, (size_t)vocab * sizeof(float));
	o->token = lp_sampler_sample(&s->sampler, e->h_scratch);
	o->logits = row;
	o->n_top = 0;
	o->logprob = 0;
	if (s->logprobs)
		lp_logprobs(row, vocab, o->token, s->top_logprobs, &o->logprob, o->top_ids,
		            o->top_logprobs, &o->n_top);
	return 0;
}

/* The CPU: the logits are in host memory already (download is a copy). */
static int sample_on_host(struct lp_engine *e, int n, struct lp_err *err)
{
	int rc;

	lp_backend_download(e->be, e->h_logits, e->d_logits.data,
	                    (size_t)n * e->model->cfg.vocab_size * sizeof(float));
	if ((rc = check_backend(e, err)))
		return rc;
	for (int i = 0; i < n; i++)
		if ((rc = host_sample_row(e, i, false, err)))
			return rc;
	return 0;
}

/* A device: the masks of the rows whose sequence has a grammar, uploaded
 * with each row's mask index, and the backend's mask_logits op over the
 * rows' logits (before the sample op and before any row comes back to the
 * host). Nothing when no row is constrained. *masked: it ran. */
static int mask_on_device(struct lp_engine *e, int n, bool *masked, struct lp_err *err)
{
	size_t words, O = (size_t)e->mem_max_out;
	int32_t *row_mask;
	int rc, any = 0;

	*masked = false;
	for (int i = 0; i < n; i++)
		any |= e->sample_seqs[i]->matcher != NULL;
	if (!any)
		return 0;
	words = lp_grammar_vocab_mask_words(e->gvocab);
	row_mask = (int32_t *)(e->h_mask + O * words);
	for (int i = 0; i < n; i++) {
		row_mask[i] = -1;
		if (e->sample_seqs[i]->matcher) {
			if ((rc = fill_mask(e, i, err)))
				return rc;
			row_mask[i] = i;
		}
	}
	lp_backend_upload(e->be, e->d_mask.data, e->h_mask, (size_t)n * words * sizeof(uint32_t));
	lp_backend_upload(e->be, (uint32_t *)e->d_mask.data + O * words, row_mask,
	                  (size_t)n * sizeof(int32_t));
	{
		struct lp_tensor lg =
		    lp_engine_view(&e->d_logits, LP_DTYPE_F32, n, e->model->cfg.vocab_size);
		struct lp_mask_args a = {
		    .logits = &lg,
		    .mask = e->d_mask.data,
		    .row_mask = (const int32_t *)((uint32_t *)e->d_mask.data + O * words),
		    .n = n,
		    .n_masks = (int)O,
		    .words = (int)words,
		};
		e->be->ops->mask_logits(e->be->ctx, &a);
	}
	*masked = true;
	return 0;
}

/* A device: its sample op picks the tokens (penalties and logit bias
 * included: each row brings its sequence's seen and biased tokens,
 * struct lp_sample_penalty) and computes
 * the logprobs, and a few bytes per row come back. Rows whose penalty
 * entries do not fit what is left of the step's room, and every row with
 * cfg.return_logits, also bring their logits back; the former take the
 * host sampler. */
static int sample_on_device(struct lp_engine *e, int n, struct lp_err *err)
{
	int vocab = e->model->cfg.vocab_size, M = LP_ENGINE_MAX_LOGPROBS, max_top = 0, rc;
	int O = e->mem_max_out, n_pen = 0;
	struct lp_sample_row *rows = (struct lp_sample_row *)e->h_sample;
	struct lp_sample_penalty *pen = (struct lp_sample_penalty *)(e->h_sample + e->sample_pen);
	char *d = e->d_sample.data;
	int32_t *h_tok = (int32_t *)(e->h_sample + e->sample_out);
	float *h_lp = (float *)(h_tok + O);
	int32_t *h_ids = (int32_t *)(h_lp + O);
	float *h_tlp = (float *)(h_ids + (size_t)O * M);
	bool host_rows = false, masked = false;
	struct lp_tensor logits = lp_engine_view(&e->d_logits, LP_DTYPE_F32, n, vocab);

	for (int i = 0; i < n; i++) {
		struct lp_seq *s = e->sample_seqs[i];
		const struct lp_sampling_params *p = &s->sampler.p;
		int k = 0;

		e->host_row[i] = false;
		if (lp_sampler_has_penalties(&s->sampler)) {
			k = lp_sampler_penalty_entries(&s->sampler, pen + n_pen,
			                               (int)(e->sample_pen_cap - (size_t)n_pen));
			e->host_row[i] = k < 0;
			host_rows |= k < 0;
			if (k < 0)
				k = 0;
		}
		rows[i] = (struct lp_sample_row){
		    .temperature = e->host_row[i] ? 0.0f : p->temperature,
		    .top_p = p->top_p,
		    .min_p = p->min_p,
		    .top_k = p->top_k,
		    .u = !e->host_row[i] && p->temperature > 0
		             ? (float)lp_sampler_uniform(&s->sampler)
		             : 0.0f,
		    .n_logprobs = s->top_logprobs,
		    .repetition_penalty = k ? p->repetition_penalty : 1.0f,
		    .frequency_penalty = k ? p->frequency_penalty : 0.0f,
		    .presence_penalty = k ? p->presence_penalty : 0.0f,
		    .pen_off = n_pen,
		    .pen_n = k,
		};
		n_pen += k;
		if (s->top_logprobs > max_top)
			max_top = s->top_logprobs;
	}
	if ((rc = mask_on_device(e, n, &masked, err)))
		return rc;
	if (host_rows || e->cfg.return_logits)
		/* before the sample op, which may overwrite them */
		lp_backend_download(e->be, e->h_logits, e->d_logits.data,
		                    (size_t)n * vocab * sizeof(float));
	/* the rows and their penalty entries in one copy */
	lp_backend_upload(e->be, d, e->h_sample,
	                  n_pen ? e->sample_pen + (size_t)n_pen * sizeof(*pen)
	                        : (size_t)n * sizeof(*rows));
	{
		struct lp_sample_args a = {
		    .logits = &logits,
		    .rows = (const struct lp_sample_row *)d,
		    .n = n,
		    .max_logprobs = M,
		    .pen = n_pen ? (const struct lp_sample_penalty *)(d + e->sample_pen) : NULL,
		    .tokens = (int32_t *)(d + e->sample_out),
		    .logprob = (float *)(d + e->sample_out) + O,
		    .top_ids = (int32_t *)(d + e->sample_out) + 2 * (size_t)O,
		    .top_logprobs = (float *)(d + e->sample_out) + 2 * (size_t)O + (size_t)O * M,
		};
		e->be->ops->sample(e->be->ctx, &a);
	}
	/* tokens and logprobs; the alternatives only when asked for */
	lp_backend_download(e->be, h_tok, d + e->sample_out,
	                    (max_top ? (2 + 2 * (size_t)M) * O : 2 * (size_t)O) * sizeof(int32_t));
	if ((rc = check_backend(e, err)))
		return rc;
	for (int i = 0; i < n; i++) {
		struct lp_seq *s = e->sample_seqs[i];
		struct lp_step_output *o = &e->outs[i];

		if (e->host_row[i]) {
			if ((rc = host_sample_row(e, i, masked, err)))
				return rc;
			continue;
		}
		o->token = h_tok[i];
		o->logits = e->cfg.return_logits ? e->h_logits + (size_t)i * vocab : NULL;
		o->logprob = s->logprobs ? h_lp[i] : 0;
		o->n_top = s->top_logprobs;
		for (int k = 0; k < o->n_top; k++) {
			o->top_ids[k] = h_ids[(size_t)i * M + k];
			o->top_logprobs[k] = h_tlp[(size_t)i * M + k];
		}
		if (o->token < 0 || o->token >= vocab)
			return lp_errf(err, -EIO,
			               "the device sampled token %d, outside the vocabulary",
			               o->token);
	}
	return 0;
}

int lp_engine_step(struct lp_engine *e, const struct lp_step_output **outs, int *n_outs,
                   struct lp_err *err)
{
	int n_seqs, n_tok = 0, n_pad, n_real_out, rc;
	struct lp_step_shape shape;
	struct step_plan plan = {0};
	bool graphable;

	*outs = e->outs;
	*n_outs = 0;
	if ((rc = check_backend(e, err)))
		return rc;
	n_seqs = schedule(e);
	if (n_seqs == 0)
		return 0;
	group_by_adapter(e, n_seqs);
	for (int j = 0; j < n_seqs; j++)
		n_tok += e->step_take[j];

	shape = (struct lp_step_shape){
	    .n_tokens = n_tok,
	    .n_seqs = n_seqs,
	    .n_out = 0,
	    .decode = n_tok == n_seqs,
	    .lora = false,
	};
	for (int j = 0; j < n_seqs; j++) {
		struct lp_seq *s = e->step_seqs[j];
		shape.lora |= s->adapter != NULL;
		shape.n_out += s->n_computed + e->step_take[j] == s->n_tokens;
	}
	graphable = e->info.token_buckets > 0 && shape.decode;
	n_pad = e->be->ops->begin_step(e->be->ctx, &shape);
	if (n_pad < n_tok || n_pad > e->cfg.max_batched_tokens ||
	    (graphable && n_pad > e->mem_max_out))
		n_pad = n_tok; /* a backend bug; never pad past the buffers */
	stage(e, n_seqs, n_pad, graphable, &plan);
	plan.decode = shape.decode;
	n_real_out = graphable ? n_seqs : plan.n_out;
	e->be->ops->upload(e->be->ctx, e->d_meta.data, e->h_meta, e->lay.total * sizeof(int32_t));
	lp_engine_forward(e, &plan);
	e->be->ops->end_step(e->be->ctx);
	e->stats.steps++;
	if (n_real_out == 0) {
		/* only prefill chunks: no logits needed yet */
		e->be->ops->synchronize(e->be->ctx);
		return check_backend(e, err);
	}
	if (e->info.host_memory)
		rc = sample_on_host(e, n_real_out, err);
	else
		rc = sample_on_device(e, n_real_out, err);
	if (rc)
		return rc;
	for (int i = 0; i < n_real_out; i++) {
		struct lp_seq *s = e->sample_seqs[i];
		struct lp_step_output *o = &e->outs[i];

		lp_sampler_accept(&s->sampler, o->token);
		s->tokens[s->n_tokens++] = o->token;
		e->stats.generated_tokens++;
		o->seq = s;
		o->finished = seq_done(e, s, o->token);
		if (!o->finished && s->matcher &&
		    (rc = lp_grammar_matcher_accept_token(s->matcher, e->gvocab, o->token, err)))
			return rc;
		if (!o->finished && s->matcher && lp_grammar_matcher_must_end(s->matcher)) {
			/* nothing but the end can follow: stop without a step
			 * that could only sample eos */
			s->finish = LP_FINISH_STOP;
			o->finished = true;
		}
		if (o->finished) {
			enum lp_finish_reason why = s->finish;
			lp_engine_finish(e, s);
			s->finish = why;
		}
	}
	*n_outs = n_real_out;
	return 0;
}
