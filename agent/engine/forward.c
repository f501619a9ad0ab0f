/* The forward pass of one step: embeddings -> n_layers x (attention, MLP)
 * -> final norm -> logits for the rows the step samples from. Every op is
 * queued on the backend (kernels/backend.h); nothing here touches device
 * memory. The LoRA of each group of targets (q/k/v, o, gate/up, down) is
 * added right after the base projections that share its input, before
 * their biases. The architectures differ only in optional steps: q/k/v
 * biases (Qwen2), an output-projection bias, RMSNorm over each head of q
 * and k before RoPE (Qwen3, Gemma 3), and Gemma 3's scaled embeddings,
 * query scale, local layers' own RoPE table, GeGLU and RMSNorm of the
 * attention's and the MLP's outputs before they join the residual stream
 * (computed in xn, then added to x). */
#include <math.h>

#include "agent/engine/engine-internal.h"

/* out += LoRA(x) for group g of layer l, over the step's adapter segments
 * (or, in a decode step, the slot of each row). */
static void apply_lora(struct lp_engine *e, const struct step_plan *plan, int l,
                       enum lp_lora_group g, const struct lp_tensor *x, struct lp_tensor *out0,
                       struct lp_tensor *out1, struct lp_tensor *out2)
{
	struct lp_tensor tmp = lp_engine_view(&e->d_lora_tmp, LP_DTYPE_F32, plan->n_tok,
	                                      (int64_t)LP_LORA_MAX_OUTS * e->cfg.max_lora_rank);
	struct lp_lora_args args = {
	    .layer = l,
	    .group = g,
	    .x = x,
	    .out = {out0, out1, out2},
	    .tmp = &tmp,
	    .segs = (const struct lp_lora_seg *)lp_engine_meta(e, e->lay.segs),
	    .n_segs = plan->n_segs,
	    .tok_slot = lp_engine_meta(e, e->lay.tok_slot),
	    .decode = plan->decode,
	};

	e->be->ops->lora(e->be->ctx, &args);
}

void lp_engine_forward(struct lp_engine *e, const struct step_plan *plan)
{
	const struct lp_model *m = e->model;
	const struct lp_model_config *c = &m->cfg;
	const struct lp_backend_ops *ops = e->be->ops;
	void *ctx = e->be->ctx;
	int n = plan->n_tok, n_out = plan->n_out;
	int qdim = c->n_heads * c->head_dim, kvdim = c->n_kv_heads * c->head_dim;
	struct lp_tensor x = lp_engine_view(&e->d_x, LP_DTYPE_F32, n, c->dim);
	struct lp_tensor xn = lp_engine_view(&e->d_xn, LP_DTYPE_F32, n, c->dim);
	struct lp_tensor q = lp_engine_view(&e->d_q, LP_DTYPE_F32, n, qdim);
	struct lp_tensor k = lp_engine_view(&e->d_k, LP_DTYPE_F32, n, kvdim);
	struct lp_tensor v = lp_engine_view(&e->d_v, LP_DTYPE_F32, n, kvdim);
	/* q and k with one row per head: [n * heads, head_dim] */
	struct lp_tensor qh =
	    lp_engine_view(&e->d_q, LP_DTYPE_F32, (int64_t)n * c->n_heads, c->head_dim);
	struct lp_tensor kh =
	    lp_engine_view(&e->d_k, LP_DTYPE_F32, (int64_t)n * c->n_kv_heads, c->head_dim);
	struct lp_tensor att = lp_engine_view(&e->d_att, LP_DTYPE_F32, n, qdim);
	struct lp_tensor gate = lp_engine_view(&e->d_gate, LP_DTYPE_F32, n, c->ffn_dim);
	struct lp_tensor up = lp_engine_view(&e->d_up, LP_DTYPE_F32, n, c->ffn_dim);
	struct lp_tensor h = lp_engine_view(&e->d_h, LP_DTYPE_F32, n_out, c->dim);
	struct lp_tensor logits = lp_engine_view(&e->d_logits, LP_DTYPE_F32, n_out, c->vocab_size);
	const int32_t *ids = lp_engine_meta(e, e->lay.ids), *pos = lp_engine_meta(e, e->lay.pos);
	bool lora = plan->n_segs > 0;
	struct lp_attention_args aa = {
	    .n_tokens = n,
	    .n_heads = c->n_heads,
	    .n_kv_heads = c->n_kv_heads,
	    .head_dim = c->head_dim,
	    .block_size = e->cfg.block_size,
	    .max_blocks_per_seq = plan->bt_width,
	    .max_context = plan->max_context,
	    .scale = c->attn_scale > 0 ? c->attn_scale : 1.0f / sqrtf((float)c->head_dim),
	    .q = &q,
	    .tok_seq = lp_engine_meta(e, e->lay.tok_seq),
	    .tok_pos = pos,
	    .block_tables = lp_engine_meta(e, e->lay.block_tables),
	    .out = &att,
	};

	ops->get_rows(ctx, &x, &m->tok_embd, ids, n);
	if (c->embed_scale > 0 && c->embed_scale != 1.0f)
		ops->scale(ctx, &x, c->embed_scale);
	for (int l = 0; l < c->n_layers; l++) {
		const struct lp_layer_weights *L = &m->layers[l];
		const struct lp_tensor *rope =
		    lp_model_layer_local_rope(c, l) ? &e->rope_local : &e->rope;
		/* where the attention's and the MLP's outputs go: x, or xn to be
		 * normalized and then added to x */
		struct lp_tensor *res = c->post_norms ? &xn : &x;

		ops->rmsnorm(ctx, &xn, &x, &L->attn_norm, c->rms_eps);
		ops->matmul(ctx, &q, &xn, &L->wq, false);
		ops->matmul(ctx, &k, &xn, &L->wk, false);
		ops->matmul(ctx, &v, &xn, &L->wv, false);
		if (lora)
			apply_lora(e, plan, l, LP_LORA_GROUP_QKV, &xn, &q, &k, &v);
		if (c->attn_bias) {
			ops->add_bias(ctx, &q, &L->bq);
			ops->add_bias(ctx, &k, &L->bk);
			ops->add_bias(ctx, &v, &L->bv);
		}
		if (c->qk_norm) {
			/* Qwen3, Gemma 3: RMSNorm over each head, q and k
			 * viewed as one row per head */
			ops->rmsnorm(ctx, &qh, &qh, &L->q_norm, c->rms_eps);
			ops->rmsnorm(ctx, &kh, &kh, &L->k_norm, c->rms_eps);
		}
		ops->rope(ctx, &q, c->n_heads, c->head_dim, pos, rope);
		ops->rope(ctx, &k, c->n_kv_heads, c->head_dim, pos, rope);
		ops->kv_store(ctx, &e->kv.k[l], &e->kv.v[l], &k, &v,
		              lp_engine_meta(e, e->lay.slots));
		aa.k_cache = &e->kv.k[l];
		aa.v_cache = &e->kv.v[l];
		aa.window = lp_model_layer_window(c, l);
		ops->attention(ctx, &aa);
		ops->matmul(ctx, res, &att, &L->wo, !c->post_norms);
		if (lora)
			apply_lora(e, plan, l, LP_LORA_GROUP_O, &att, res, NULL, NULL);
		if (c->attn_out_bias)
			ops->add_bias(ctx, res, &L->bo);
		if (c->post_norms) {
			ops->rmsnorm(ctx, &xn, &xn, &L->post_attn_norm, c->rms_eps);
			ops->add(ctx, &x, &xn);
		}

		ops->rmsnorm(ctx, &xn, &x, &L->ffn_norm, c->rms_eps);
		ops->matmul(ctx, &gate, &xn, &L->w_gate, false);
		ops->matmul(ctx, &up, &xn, &L->w_up, false);
		if (lora)
			apply_lora(e, plan, l, LP_LORA_GROUP_GATE_UP, &xn, &gate, &up, NULL);
		if (c->act == LP_ACT_GELU_TANH)
			ops->gelu_mul(ctx, &gate, &gate, &up);
		else
			ops->silu_mul(ctx, &gate, &gate, &up);
		if (c->post_norms) {
			ops->matmul(ctx, &xn, &gate, &L->w_down, false);
			if (lora)
				apply_lora(e, plan, l, LP_LORA_GROUP_DOWN, &gate, &xn, NULL, NULL);
			ops->rmsnorm(ctx, &xn, &xn, &L->post_ffn_norm, c->rms_eps);
			ops->add(ctx, &x, &xn);
			continue;
		}
		if (lora)
			apply_lora(e, plan, l, LP_LORA_GROUP_DOWN, &gate, &x, NULL, NULL);
		ops->matmul(ctx, &x, &gate, &L->w_down, true);
	}
	if (n_out == 0)
		return;
	ops->get_rows(ctx, &h, &x, lp_engine_meta(e, e->lay.out_rows), n_out);
	ops->rmsnorm(ctx, &h, &h, &m->out_norm, c->rms_eps);
	ops->matmul(ctx, &logits, &h, &m->output, false);
}
