/* What engine.c (scheduling, staging, sampling) and forward.c (the forward
 * pass) share; not a public header. */
#ifndef LP_ENGINE_ENGINE_INTERNAL_H
#define LP_ENGINE_ENGINE_INTERNAL_H

#include "agent/engine/engine.h"

/* A step's metadata travels in one upload: one host staging buffer
 * (host_alloc: pinned on CUDA) copied into one device buffer, as long as
 * the step needs: regions as long as the step's rows (the same for every
 * step of a bucket, so that a captured decode step finds them where it left
 * them), the block tables last at the width the step uses. Offsets in
 * int32 units (plan_layout in engine.c). */
struct step_layout {
	size_t ids, pos, tok_seq, slots, tok_slot, out_rows; /* [rows] each */
	size_t segs;                                         /* struct lp_lora_seg [rows] */
	size_t block_tables;                                 /* [n_seqs, width] */
	size_t total;                                        /* int32s of the largest step */
};

/* What forward() runs over, staged by lp_engine_step. */
struct step_plan {
	int n_tok;    /* rows, padding included */
	int n_out;    /* logits rows */
	int bt_width; /* block-table columns this step */
	int max_context;
	bool decode;
	int n_segs; /* adapter segments (0: no LoRA this step) */
};

struct lp_engine {
	struct lp_model *model;
	struct lp_backend *be;
	struct lp_backend_info info;
	struct lp_engine_config cfg;
	struct lp_engine_memory mem;
	struct lp_kv_cache kv;
	int max_blocks_per_seq;
	/* when every layer slides, the largest window: a sequence's blocks
	 * wholly before the window of its next position are released; 0 when
	 * some layer attends to everything */
	int release_window;
	uint64_t next_id;
	struct lp_err failure; /* the backend's sticky error, once seen */
	bool reserved;         /* holds the backend's reservation */
	int mem_max_out;       /* rows of d_h and d_logits */

	struct lp_seq *waiting; /* FIFO */
	struct lp_seq *running; /* in admission order */
	int n_running, n_waiting;

	/* device tensors, sized for the maxima */
	struct lp_buffer d_meta; /* step metadata, struct step_layout */
	struct lp_buffer d_x, d_xn, d_q, d_k, d_v, d_att, d_gate, d_up, d_h, d_logits;
	struct lp_buffer d_lora_tmp; /* f32 [max_tokens, 3 * max_lora_rank] */
	struct lp_buffer d_rope;     /* f32 [max_model_len, head_dim] cos/sin, then
	                                the local layers' when they have their own */
	struct lp_buffer d_sample;   /* sample op: rows, penalty entries (at
	                                sample_pen), then (at sample_out)
	                                tokens, logprobs, top ids, top logprobs */
	char *h_sample;              /* host_alloc'd, the same layout */
	size_t sample_pen, sample_pen_cap, sample_out;
	bool *host_row; /* [max out] rows the host samples */
	struct lp_tensor rope;
	struct lp_tensor rope_local; /* the local layers' table (rope when none) */
	float *h_rope;               /* host copy (the CPU aliases it) */

	struct step_layout lay;      /* this step's */
	size_t meta_cap;             /* int32s of h_meta and d_meta */
	int32_t *h_meta;             /* host_alloc'd staging */
	struct lp_seq **step_seqs;   /* scheduled this step */
	int *step_take;              /* tokens each computes this step */
	struct lp_seq **sample_seqs; /* sampled this step */
	float *h_logits;             /* [max_num_seqs, vocab] raw */
	float *h_scratch;            /* [vocab] for the sampler */
	/* constrained decoding: the model's tokens as bytes (built with the
	 * first sequence that has a grammar) and one mask row per output row */
	struct lp_grammar_vocab *gvocab;
	uint32_t *h_mask;        /* [max out, mask words], then i32 [max out] mask rows */
	struct lp_buffer d_mask; /* a device's copy, for its mask_logits op */
	struct lp_step_output *outs;

	struct lp_lora_cache *loras;

	struct lp_engine_stats stats;
};

static inline struct lp_tensor lp_engine_view(struct lp_buffer *b, enum lp_dtype t, int64_t rows,
                                              int64_t cols)
{
	return (struct lp_tensor){b->data, t, rows, cols};
}

/* Device address of region off of the step metadata. */
static inline int32_t *lp_engine_meta(struct lp_engine *e, size_t off)
{
	return (int32_t *)e->d_meta.data + off;
}

/* Queues the forward pass over the staged step on the backend, leaving
 * plan->n_out rows of logits in d_logits (forward.c). */
void lp_engine_forward(struct lp_engine *e, const struct step_plan *plan);

#endif
