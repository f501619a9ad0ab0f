/* The architectures beyond Llama against transformers and peft: for each
 * tiny random model of tests/fixtures/tiny-<arch> (hack/make-arch-goldens.py)
 * and its GGUF variant, the hyper-parameters read, the weights of both
 * formats equal, greedy tokens and last-position logits equal the
 * reference alone, in a batch, with chunked prefill and with preemption,
 * and the same over a PEFT adapter; the chat template is detected from the
 * model's own; config.json's sliding-window settings window the layers
 * transformers windows, and only those (the context is not capped).
 *
 *   qwen2: Qwen2/Qwen2.5 (q/k/v biases, tied embeddings, GQA)
 *   qwen3: Qwen3 dense (q/k RMSNorm per head, head_dim 32 with hidden 64)
 *   gemma3: Gemma 3 text (hack/make-gemma3-goldens.py: (1 + w) norms,
 *           post-attention and post-MLP norms, q/k norm, GeGLU, scaled
 *           embeddings and queries, local/global layers with their own
 *           RoPE bases and a window shorter than the prompts) */
#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/engine/chat-template.h"
#include "agent/engine/engine.h"
#include "agent/engine/model.h"
#include "agent/engine/tokenizer.h"
#include "common/buf.h"
#include "tests/test.h"
#include "tests/unit/golden-run.h"

/* what each tiny model is (hack/make-arch-goldens.py) */
struct arch_case {
	const char *name; /* "qwen2": tests/fixtures/tiny-qwen2, goldens tiny-qwen2*.json */
	enum lp_arch arch;
	int head_dim, ffn_dim;
	bool attn_bias, qk_norm, tied;
	enum lp_chat_style chat;
	bool default_system;
	int n_layers;
	bool gemma; /* Gemma 3's extras; no NFC normalizer */
};

static const struct arch_case cases[] = {
    {"qwen2", LP_ARCH_QWEN2, 16, 160, true, false, true, LP_CHAT_CHATML, true, 2, false},
    {"qwen3", LP_ARCH_QWEN3, 32, 128, false, true, false, LP_CHAT_QWEN3, false, 2, false},
    {"gemma3", LP_ARCH_GEMMA3, 32, 128, false, true, true, LP_CHAT_GEMMA, false, 3, true},
};

static struct lp_backend *be;
static const struct arch_case *cur;
static struct lp_model *hf, *gg; /* the HF directory and the GGUF file */
static struct golden gold, lora;
static char adapter[512];

/* ---- hyper-parameters and weights ---- */

static void check_config_of(const struct lp_model *m, const char *fmt)
{
	const struct lp_model_config *c = &m->cfg;

	CHECK_MSG(c->arch == cur->arch, "%s %s: arch %s", cur->name, fmt, lp_arch_name(c->arch));
	CHECK_EQ_STR(lp_arch_name(c->arch), cur->name);
	CHECK_EQ_INT(c->n_layers, cur->n_layers);
	CHECK_EQ_INT(c->dim, 64);
	CHECK_EQ_INT(c->n_heads, 4);
	CHECK_EQ_INT(c->n_kv_heads, 2);
	CHECK_EQ_INT(c->head_dim, cur->head_dim);
	CHECK_EQ_INT(c->ffn_dim, cur->ffn_dim);
	CHECK_EQ_INT(c->vocab_size, 512);
	CHECK_EQ_INT(c->max_pos, 256); /* qwen2's 48-token window is off */
	CHECK_EQ_INT(c->sliding_window, cur->gemma ? 16 : 0);
	CHECK_NEAR(c->rope_theta, 1e6, 1e-3);
	CHECK_EQ_INT(c->post_norms, cur->gemma);
	CHECK_EQ_INT(c->act, cur->gemma ? LP_ACT_GELU_TANH : LP_ACT_SILU);
	if (cur->gemma) {
		/* layers sliding, full, sliding; the local ones rotate by 1e4 */
		CHECK_EQ_INT(lp_model_layer_window(c, 0), 16);
		CHECK_EQ_INT(lp_model_layer_window(c, 1), 0);
		CHECK_EQ_INT(lp_model_layer_window(c, 2), 16);
		CHECK(lp_model_layer_local_rope(c, 0) && !lp_model_layer_local_rope(c, 1));
		CHECK_NEAR(c->rope_local_theta, 1e4, 1e-3);
		CHECK_NEAR(c->embed_scale, 8.0, 1e-6);           /* sqrt(64) */
		CHECK_NEAR(c->attn_scale, 1 / sqrt(24.0), 1e-7); /* query_pre_attn_scalar */
		CHECK(m->rope_local_inv_freq != NULL);
		/* <end_of_turn> ends generation besides <eos> */
		CHECK(lp_model_is_eos(m, lp_tokenizer_find(m->tok, "<end_of_turn>")));
	} else {
		CHECK(m->rope_local_inv_freq == NULL);
	}
	CHECK_EQ_INT(c->rope_scaling, LP_ROPE_NONE);
	CHECK_NEAR(c->rms_eps, 1e-6, 1e-12);
	CHECK_EQ_INT(c->attn_bias, cur->attn_bias);
	CHECK_EQ_INT(c->attn_out_bias, false);
	CHECK_EQ_INT(c->qk_norm, cur->qk_norm);
	CHECK_EQ_INT(c->tied_embeddings, cur->tied);
	CHECK_MSG(c->n_eos >= 1 && c->eos_ids[0] == json_integer_value(
	                                                json_object_get(gold.root, "eos_token_id")),
	          "%s %s: eos", cur->name, fmt);
	for (int l = 0; l < c->n_layers; l++) {
		const struct lp_layer_weights *L = &m->layers[l];
		CHECK_EQ_INT(L->wq.rows, c->n_heads * c->head_dim);
		CHECK_EQ_INT(L->wo.cols, c->n_heads * c->head_dim);
		CHECK_EQ_INT(L->bq.data != NULL, cur->attn_bias);
		CHECK_EQ_INT(L->bv.data != NULL, cur->attn_bias);
		CHECK_EQ_INT(L->q_norm.data != NULL, cur->qk_norm);
		CHECK_EQ_INT(L->k_norm.data != NULL, cur->qk_norm);
		CHECK(L->bo.data == NULL);
		CHECK_EQ_INT(L->post_attn_norm.data != NULL, cur->gemma);
		CHECK_EQ_INT(L->post_ffn_norm.data != NULL, cur->gemma);
		if (cur->qk_norm)
			CHECK_EQ_INT(L->q_norm.cols, c->head_dim);
	}
	CHECK_EQ_INT(m->output.data == m->tok_embd.data, cur->tied);
}

static void test_config(void)
{
	check_config_of(hf, "hf");
	if (!test_current_failed)
		check_config_of(gg, "gguf");
}

static bool same_tensor(const struct lp_tensor *a, const struct lp_tensor *b)
{
	if (!a->data || !b->data)
		return a->data == b->data;
	/* the CPU backend's tensors are host memory */
	return a->type == b->type && a->rows == b->rows && a->cols == b->cols &&
	       !memcmp(a->data, b->data, lp_tensor_bytes(a));
}

/* The GGUF file holds the HF weights in the HF row order: llama.cpp permutes
 * no Q/K rows for these architectures, and the loader undoes none. */
static void test_gguf_weights_equal_hf(void)
{
	CHECK(same_tensor(&hf->tok_embd, &gg->tok_embd));
	CHECK(same_tensor(&hf->output, &gg->output));
	CHECK(same_tensor(&hf->out_norm, &gg->out_norm));
	CHECK(same_tensor(&hf->inv_freq, &gg->inv_freq));
	for (int l = 0; l < hf->cfg.n_layers; l++) {
		const struct lp_layer_weights *a = &hf->layers[l], *b = &gg->layers[l];
		const struct lp_tensor *ta[] = {
		    &a->attn_norm,    &a->wq,     &a->wk,     &a->wv,     &a->bq,
		    &a->bk,           &a->bv,     &a->q_norm, &a->k_norm, &a->wo,
		    &a->ffn_norm,     &a->w_gate, &a->w_up,   &a->w_down, &a->post_attn_norm,
		    &a->post_ffn_norm};
		const struct lp_tensor *tb[] = {
		    &b->attn_norm,    &b->wq,     &b->wk,     &b->wv,     &b->bq,
		    &b->bk,           &b->bv,     &b->q_norm, &b->k_norm, &b->wo,
		    &b->ffn_norm,     &b->w_gate, &b->w_up,   &b->w_down, &b->post_attn_norm,
		    &b->post_ffn_norm};
		for (size_t i = 0; i < sizeof(ta) / sizeof(ta[0]); i++)
			CHECK_MSG(same_tensor(ta[i], tb[i]), "%s layer %d: tensor %zu differs",
			          cur->name, l, i);
	}
}

/* ---- tokenizer and chat template ---- */

static void check_ids_from_text(const struct lp_model *m, const char *fmt)
{
	struct lp_err err = {0};
	int checked = 0;

	for (int i = 0; i < gold.n_prompts; i++) {
		const struct golden_prompt *g = &gold.prompts[i];
		struct lp_tokens ids = {0};
		bool same;

		/* llama.cpp's GGUF tokenizer does not normalize to NFC, the
		 * HF one does (the reference ids) */
		if (m == gg && g->nfc_changes)
			continue;
		CHECK_OK(lp_tokenizer_encode(m->tok, g->text, strlen(g->text),
		                             LP_ENCODE_ADD_SPECIAL | LP_ENCODE_PARSE_SPECIAL, &ids,
		                             &err),
		         &err);
		same =
		    ids.n == (size_t)g->n_ids && !memcmp(ids.ids, g->ids, ids.n * sizeof(int32_t));
		lp_tokens_release(&ids);
		CHECK_MSG(same, "%s %s prompt %d: token ids differ from the reference", cur->name,
		          fmt, i);
		checked++;
	}
	CHECK(checked >= gold.n_prompts - 1);
}

static void test_prompt_ids_from_text(void)
{
	bool nfc = false;

	for (int i = 0; i < gold.n_prompts; i++)
		nfc |= gold.prompts[i].nfc_changes;
	/* Gemma's tokenizer has no NFC normalizer */
	CHECK_MSG(nfc || cur->gemma, "no golden prompt exercises the NFC normalizer");
	check_ids_from_text(hf, "hf");
	if (!test_current_failed)
		check_ids_from_text(gg, "gguf");
}

static void test_chat_template_detected(void)
{
	const struct lp_model *ms[] = {hf, gg};

	for (int k = 0; k < 2; k++) {
		struct lp_chat_template ct;
		struct lp_err err = {0};

		CHECK_OK(lp_chat_template_detect(&ct, lp_tokenizer_chat_template(ms[k]->tok), NULL,
		                                 NULL, &err),
		         &err);
		CHECK_EQ_INT(ct.style, cur->chat);
		if (cur->default_system)
			CHECK_EQ_STR(ct.default_system, "You are Qwen, created by Alibaba Cloud. "
			                                "You are a helpful assistant.");
		else
			CHECK(ct.default_system == NULL);
		lp_chat_template_release(&ct);
	}
}

/* Gemma 3's template rendered in C equals transformers' rendering of each
 * conversation of the goldens; roles that do not alternate are refused. */
static void test_chat_render_gemma(void)
{
	json_t *chats = json_object_get(gold.root, "chat"), *c;
	struct lp_chat_template ct;
	struct lp_err err = {0};
	size_t i;

	if (!cur->gemma)
		return;
	CHECK(json_array_size(chats) >= 5);
	CHECK_OK(lp_chat_template_detect(&ct, lp_tokenizer_chat_template(hf->tok), "<bos>", "<eos>",
	                                 &err),
	         &err);
	json_array_foreach(chats, i, c)
	{
		json_t *msgs = json_object_get(c, "messages"), *mj;
		struct lp_chat_message ms[8] = {{0}};
		struct lp_buf out;
		size_t k;
		const char *want = json_string_value(json_object_get(c, "text"));

		CHECK(json_array_size(msgs) <= 8 && want);
		json_array_foreach(msgs, k, mj)
		{
			ms[k].role = json_string_value(json_object_get(mj, "role"));
			ms[k].content = json_string_value(json_object_get(mj, "content"));
		}
		lp_buf_init(&out, 1 << 16);
		CHECK_OK(lp_chat_template_render(
		             &ct, ms, json_array_size(msgs), NULL,
		             json_is_true(json_object_get(c, "add_generation_prompt")), &out, &err),
		         &err);
		CHECK_MSG(out.data && want && !strcmp(out.data, want),
		          "chat %zu: '%s', reference '%s'", i, out.data ? out.data : "",
		          want ? want : "");
		lp_buf_release(&out);
	}
	{
		struct lp_chat_message two[] = {{.role = "user", .content = "a"},
		                                {.role = "user", .content = "b"}};
		struct lp_buf out;

		lp_buf_init(&out, 1 << 16);
		CHECK_EQ_INT(lp_chat_template_render(&ct, two, 2, NULL, true, &out, &err), -EINVAL);
		CHECK_MSG(strstr(err.msg, "alternate"), "%s", err.msg);
		lp_buf_release(&out);
	}
	lp_chat_template_release(&ct);
}

/* ---- outputs against the reference ---- */

static void test_alone_matches_reference(void)
{
	char why[600], label[64];

	snprintf(label, sizeof(label), "%s hf", cur->name);
	CHECK_MSG(golden_check_alone(hf, gold.prompts, gold.n_prompts, NULL, label, why,
	                             sizeof(why)) == 0,
	          "%s", why);
	snprintf(label, sizeof(label), "%s gguf", cur->name);
	CHECK_MSG(golden_check_alone(gg, gold.prompts, gold.n_prompts, NULL, label, why,
	                             sizeof(why)) == 0,
	          "%s", why);
}

static void check_batch(struct lp_model *m, const struct lp_engine_config *ec, bool preempt,
                        const char *what)
{
	struct golden_prompt *ps[GOLDEN_MAX_PROMPTS];
	char why[600];

	CHECK(gold.n_batch >= 8);
	for (int i = 0; i < gold.n_batch; i++)
		ps[i] = &gold.batch[i];
	CHECK_MSG(
	    golden_check_batch(m, ec, ps, gold.n_batch, NULL, preempt, what, why, sizeof(why)) == 0,
	    "%s", why);
}

/* All batch prompts at once give what each gave alone. */
static void test_batch_equals_alone(void)
{
	struct lp_engine_config ec;

	golden_engine_config(&ec);
	check_batch(hf, &ec, false, "hf");
	if (!test_current_failed)
		check_batch(gg, &ec, false, "gguf");
}

/* The same with prefill split into chunks of 7 tokens mixed with decodes. */
static void test_batch_chunked_prefill(void)
{
	struct lp_engine_config ec;

	golden_engine_config(&ec);
	ec.max_num_seqs = 4;
	ec.max_batched_tokens = 7;
	check_batch(hf, &ec, false, "hf chunked");
}

/* And with a cache so small that sequences are preempted and recomputed. */
static void test_batch_preemption(void)
{
	struct lp_engine_config ec;
	const struct lp_model_config *c = &hf->cfg;
	size_t block =
	    lp_kv_cache_block_bytes(c->n_layers, c->n_kv_heads * c->head_dim, 16, LP_DTYPE_F32);

	golden_engine_config(&ec);
	ec.max_model_len = 128;
	ec.kv_cache_bytes = block * 10; /* 160 positions for 8 sequences */
	check_batch(hf, &ec, true, "hf preemption");
}

/* Every adapter prompt alone gives peft's tokens and logits, on both
 * formats of the base. */
static void test_lora_matches_peft(void)
{
	char why[600], label[64];

	CHECK(lora.n_prompts >= 4);
	snprintf(label, sizeof(label), "%s hf + lora", cur->name);
	CHECK_MSG(golden_check_alone(hf, lora.prompts, lora.n_prompts, adapter, label, why,
	                             sizeof(why)) == 0,
	          "%s", why);
	snprintf(label, sizeof(label), "%s gguf + lora", cur->name);
	CHECK_MSG(golden_check_alone(gg, lora.prompts, lora.n_prompts, adapter, label, why,
	                             sizeof(why)) == 0,
	          "%s", why);
}

/* The adapter's prompts and the base prompts in one batch, plain and with
 * chunked prefill and few sequences at a time: each gives its solo tokens. */
static void test_lora_mixed_batch(void)
{
	struct golden_prompt *ps[2 * GOLDEN_MAX_PROMPTS];
	struct lp_engine_config ec;
	char why[600];
	int n = 0;

	for (int i = 0; i < lora.n_prompts; i++)
		ps[n++] = &lora.prompts[i];
	for (int i = 0; i < gold.n_batch; i++)
		ps[n++] = &gold.batch[i];
	golden_engine_config(&ec);
	CHECK_MSG(
	    golden_check_batch(hf, &ec, ps, n, adapter, false, "hf mixed", why, sizeof(why)) == 0,
	    "%s", why);
	ec.max_num_seqs = 4;
	ec.max_batched_tokens = 7;
	CHECK_MSG(golden_check_batch(gg, &ec, ps, n, adapter, false, "gguf mixed chunked", why,
	                             sizeof(why)) == 0,
	          "%s", why);
}

/* ---- config.json variants, in a temporary copy of the model ---- */

static char tmpdir[256];

/* tmpdir/m: the files of tests/fixtures/tiny-<name> linked, config.json
 * rewritten by edit. Returns 0 or -1. */
static int variant_dir(const char *name, void (*edit)(json_t *cfg, void *arg), void *arg, char *out,
                       size_t cap)
{
	static const char *files[] = {"model.safetensors", "tokenizer.json",
	                              "tokenizer_config.json"};
	char src[512], dst[768], path[512];
	json_error_t jerr;
	json_t *cfg;
	int rc;

	snprintf(out, cap, "%s/m", tmpdir);
	snprintf(path, sizeof(path), "%s/config.json", out);
	unlink(path);
	for (size_t i = 0; i < 3; i++) {
		snprintf(dst, sizeof(dst), "%s/%s", out, files[i]);
		unlink(dst);
	}
	rmdir(out);
	if (mkdir(out, 0755))
		return -1;
	for (size_t i = 0; i < 3; i++) {
		char abs[512];
		snprintf(src, sizeof(src), "%s/tiny-%s/%s", test_fixtures_dir(), name, files[i]);
		if (!realpath(src, abs))
			return -1;
		snprintf(dst, sizeof(dst), "%s/%s", out, files[i]);
		if (symlink(abs, dst))
			return -1;
	}
	snprintf(src, sizeof(src), "%s/tiny-%s/config.json", test_fixtures_dir(), name);
	cfg = json_load_file(src, 0, &jerr);
	if (!cfg)
		return -1;
	edit(cfg, arg);
	rc = json_dump_file(cfg, path, 0);
	json_decref(cfg);
	return rc;
}

struct window_edit {
	bool use;
	int window, from_layer;
};

static void edit_window(json_t *cfg, void *arg)
{
	const struct window_edit *w = arg;

	json_object_set_new(cfg, "use_sliding_window", json_boolean(w->use));
	json_object_set_new(cfg, "sliding_window", json_integer(w->window));
	json_object_set_new(cfg, "max_window_layers", json_integer(w->from_layer));
}

/* Qwen2 slides only with use_sliding_window and only in layers from
 * max_window_layers on; the context stays the model's (sliding layers get
 * windowed attention). */
static void test_sliding_window_layers(void)
{
	static const struct {
		struct window_edit e;
		int window, layer0, layer1;
	} want[] = {
	    {{true, 64, 1}, 64, 0, 64},          /* layer 1 slides */
	    {{true, 64, 0}, 64, 64, 64},         /* both slide */
	    {{true, 64, 2}, 0, 0, 0},            /* no layer from 2 on: none slides */
	    {{false, 64, 0}, 0, 0, 0},           /* off */
	    {{true, 1000, 0}, 1000, 1000, 1000}, /* wider than the context */
	};
	char dir[300];

	for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
		struct window_edit e = want[i].e;
		struct lp_err err = {0};
		struct lp_model *m;

		CHECK(variant_dir("qwen2", edit_window, &e, dir, sizeof(dir)) == 0);
		CHECK_OK(lp_model_load(&m, dir, be, &err), &err);
		CHECK_MSG(m->cfg.max_pos == 256 && m->cfg.sliding_window == want[i].window &&
		              lp_model_layer_window(&m->cfg, 0) == want[i].layer0 &&
		              lp_model_layer_window(&m->cfg, 1) == want[i].layer1,
		          "case %zu: max_pos %d, window %d, layers %d %d", i, m->cfg.max_pos,
		          m->cfg.sliding_window, lp_model_layer_window(&m->cfg, 0),
		          lp_model_layer_window(&m->cfg, 1));
		lp_model_free(m);
	}
}

static void edit_as_qwen3(json_t *cfg, void *arg)
{
	(void)arg;
	json_object_set_new(cfg, "model_type", json_string("qwen3"));
	json_object_set_new(cfg, "head_dim", json_integer(16));
}

static void edit_bad_window(json_t *cfg, void *arg)
{
	(void)arg;
	json_object_set_new(cfg, "sliding_window", json_string("4096"));
}

static void edit_rope_parameters(json_t *cfg, void *arg)
{
	json_t *rp = json_object();

	(void)arg;
	json_object_del(cfg, "rope_theta");
	json_object_set_new(rp, "rope_type", json_string("default"));
	json_object_set_new(rp, "rope_theta", json_real(5e5));
	json_object_set_new(cfg, "rope_parameters", rp);
}

static void edit_gemma_key(json_t *cfg, void *arg)
{
	const char *const *kv = arg; /* key, JSON value */

	json_object_set_new(cfg, kv[0], json_loads(kv[1], JSON_DECODE_ANY, NULL));
}

static void edit_gemma_rope_parameters(json_t *cfg, void *arg)
{
	(void)arg;
	json_object_del(cfg, "rope_theta");
	json_object_del(cfg, "rope_local_base_freq");
	json_object_set_new(cfg, "rope_parameters",
	                    json_pack("{s:{s:s,s:f},s:{s:s,s:f}}", "full_attention", "rope_type",
	                              "default", "rope_theta", 5e5, "sliding_attention",
	                              "rope_type", "default", "rope_theta", 2e4));
	json_object_del(cfg, "layer_types");
	json_object_set_new(cfg, "sliding_window_pattern", json_integer(2));
}

/* Gemma 3 configs: what loraplane does not run is refused with the key
 * named; transformers 5's per-layer-type rope_parameters and
 * sliding_window_pattern are read. */
static void test_gemma3_config_variants(void)
{
	static const char *const bad[][3] = {
	    {"final_logit_softcapping", "30.0", "final_logit_softcapping"},
	    {"attn_logit_softcapping", "50.0", "attn_logit_softcapping"},
	    {"use_bidirectional_attention", "true", "use_bidirectional_attention"},
	    {"hidden_activation", "\"gelu\"", "gelu_pytorch_tanh"},
	    {"model_type", "\"gemma3\"", "gemma3_text"},
	    {"query_pre_attn_scalar", "0", "query_pre_attn_scalar"},
	};
	struct lp_err err = {0};
	struct lp_model *m = NULL;
	char dir[300];

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		CHECK(variant_dir("gemma3", edit_gemma_key, (void *)bad[i], dir, sizeof(dir)) == 0);
		CHECK_MSG(lp_model_load(&m, dir, be, &err) < 0 && strstr(err.msg, bad[i][2]),
		          "%s: %s", bad[i][0], err.msg);
	}
	CHECK(variant_dir("gemma3", edit_gemma_rope_parameters, NULL, dir, sizeof(dir)) == 0);
	CHECK_OK(lp_model_load(&m, dir, be, &err), &err);
	CHECK_NEAR(m->cfg.rope_theta, 5e5, 1e-3);
	CHECK_NEAR(m->cfg.rope_local_theta, 2e4, 1e-3);
	/* every second layer global: sliding, full, sliding */
	CHECK(lp_model_layer_window(&m->cfg, 0) == 16 && lp_model_layer_window(&m->cfg, 1) == 0 &&
	      lp_model_layer_window(&m->cfg, 2) == 16);
	lp_model_free(m);
}

/* Files that do not fit their config are refused with the reason; the
 * transformers 5 form of the rope settings is read. */
static void test_config_variants(void)
{
	struct lp_err err = {0};
	struct lp_model *m = NULL;
	char dir[300];

	/* Qwen2's files described as Qwen3: the per-head norms are missing */
	CHECK(variant_dir("qwen2", edit_as_qwen3, NULL, dir, sizeof(dir)) == 0);
	CHECK_EQ_INT(lp_model_load(&m, dir, be, &err), -EINVAL);
	CHECK_MSG(strstr(err.msg, "self_attn.q_norm.weight' is missing"), "%s", err.msg);
	CHECK(variant_dir("qwen2", edit_bad_window, NULL, dir, sizeof(dir)) == 0);
	CHECK_EQ_INT(lp_model_load(&m, dir, be, &err), -EINVAL);
	CHECK_MSG(strstr(err.msg, "sliding_window"), "%s", err.msg);
	CHECK(variant_dir("qwen3", edit_rope_parameters, NULL, dir, sizeof(dir)) == 0);
	CHECK_OK(lp_model_load(&m, dir, be, &err), &err);
	CHECK_NEAR(m->cfg.rope_theta, 5e5, 1e-3);
	lp_model_free(m);
}

/* ---- driver ---- */

static int run_arch(const struct arch_case *ac)
{
	static char program[64];
	char path[512], name[64];
	struct lp_err err = {0};
	int bad = 0;

	cur = ac;
	snprintf(path, sizeof(path), "%s/tiny-%s", test_fixtures_dir(), ac->name);
	if (lp_model_load(&hf, path, be, &err)) {
		printf("FAIL test-archs:load_%s_hf: %s\n", ac->name, err.msg);
		return 1;
	}
	snprintf(path, sizeof(path), "%s/tiny-gguf/tiny-%s-bf16.gguf", test_fixtures_dir(),
	         ac->name);
	if (lp_model_load(&gg, path, be, &err)) {
		printf("FAIL test-archs:load_%s_gguf: %s\n", ac->name, err.msg);
		lp_model_free(hf);
		return 1;
	}
	snprintf(name, sizeof(name), "tiny-%s", ac->name);
	if (golden_load(&gold, name, hf->cfg.vocab_size)) {
		printf("FAIL test-archs:goldens_%s: cannot read %s/goldens/%s.json\n", ac->name,
		       test_fixtures_dir(), name);
		bad = 1;
		goto out;
	}
	snprintf(name, sizeof(name), "tiny-%s-lora", ac->name);
	if (golden_load(&lora, name, hf->cfg.vocab_size)) {
		printf("FAIL test-archs:goldens_%s: cannot read %s/goldens/%s.json\n", ac->name,
		       test_fixtures_dir(), name);
		bad = 1;
		goto out;
	}
	for (int i = 0; i < lora.n_prompts; i++)
		lora.prompts[i].with_adapter = true;
	snprintf(adapter, sizeof(adapter), "%s/lora/tiny-%s/r8-all", test_fixtures_dir(), ac->name);
	/* PASS test-archs-qwen2:test_config, ... */
	snprintf(program, sizeof(program), "test-archs-%s", ac->name);
	test_program = program;
	RUN(test_config);
	RUN(test_gguf_weights_equal_hf);
	RUN(test_prompt_ids_from_text);
	RUN(test_chat_template_detected);
	RUN(test_chat_render_gemma);
	RUN(test_alone_matches_reference);
	RUN(test_batch_equals_alone);
	RUN(test_batch_chunked_prefill);
	RUN(test_batch_preemption);
	RUN(test_lora_matches_peft);
	RUN(test_lora_mixed_batch);
	test_program = "test-archs";
out:
	golden_free(&gold);
	golden_free(&lora);
	lp_model_free(hf);
	lp_model_free(gg);
	hf = gg = NULL;
	return bad;
}

int main(void)
{
	struct lp_err err = {0};
	int bad = 0;

	TEST_MAIN_BEGIN("test-archs");
	if (lp_backend_cpu_new(&be, 0, &err)) {
		printf("FAIL test-archs:backend: %s\n", err.msg);
		return 1;
	}
	snprintf(tmpdir, sizeof(tmpdir), "%s/lp-test-archs-XXXXXX",
	         getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
	if (!mkdtemp(tmpdir)) {
		printf("FAIL test-archs:tmpdir: %s\n", strerror(errno));
		return 1;
	}
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		bad += run_arch(&cases[i]);
	RUN(test_sliding_window_layers);
	RUN(test_config_variants);
	RUN(test_gemma3_config_variants);
	{
		char p[512];
		static const char *files[] = {"config.json", "model.safetensors", "tokenizer.json",
		                              "tokenizer_config.json"};
		for (size_t i = 0; i < 4; i++) {
			snprintf(p, sizeof(p), "%s/m/%s", tmpdir, files[i]);
			unlink(p);
		}
		snprintf(p, sizeof(p), "%s/m", tmpdir);
		rmdir(p);
		rmdir(tmpdir);
	}
	lp_backend_destroy(be);
	return bad || test_failed_count ? 1 : 0;
}
