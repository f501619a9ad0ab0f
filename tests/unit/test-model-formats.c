/* Every weight format the model loader claims, end to end, on the tiny
 * random Llama (GQA, untied embeddings, llama3 rope scaling):
 *
 *  - GGUF files tests/fixtures/tiny-gguf/tiny-llama-<type>.gguf for F32,
 *    F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1, written as llama.cpp's
 *    converter writes a Llama (Q/K rows permuted, llama3 scaling as a
 *    rope_freqs tensor, tokenizer in the metadata) by
 *    hack/make-gguf-fixtures.py. Each must give
 *    the config of the HF model, the reference prompt ids from its metadata
 *    tokenizer, and the reference greedy tokens and first logits
 *    (tests/fixtures/goldens/tiny-gguf-<type>.json, a float64 forward pass
 *    over the dequantized weights).
 *  - The Q and K matrices the loader builds from a GGUF file equal the HF
 *    model's rows exactly (the permutation is undone, not just close).
 *  - Single-file HF directories in F32 and F16, written here into a
 *    temporary directory from the bf16 shards of tests/fixtures/tiny-llama,
 *    reproduce that model's goldens. */
#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "agent/engine/engine.h"
#include "agent/engine/model.h"
#include "agent/formats/safetensors.h"
#include "agent/engine/tokenizer.h"
#include "common/buf.h"
#include "kernels/dtype.h"
#include "tests/test.h"

#define N_GREEDY    32
#define MAX_PROMPTS 16
#define MAX_IDS     512
#define TINY_VOCAB  512

/* vsnprintf for messages and paths; true when the result fit. (Through a
 * va_list the compiler does not flag every message that could be cut.) */
static bool fmt(char *out, size_t n, const char *f, ...) __attribute__((format(printf, 3, 4)));

static bool fmt(char *out, size_t n, const char *f, ...)
{
	va_list ap;
	int len;

	va_start(ap, f);
	len = vsnprintf(out, n, f, ap);
	va_end(ap);
	return len >= 0 && (size_t)len < n;
}

/* ---- reference outputs ---- */

struct ref_prompt {
	const char *text; /* owned by the goldens' JSON */
	int32_t ids[MAX_IDS];
	int n_ids;
	int32_t greedy[N_GREEDY];
	float *logits; /* [vocab] */
	float range;   /* logit_max - logit_min */
};

struct ref {
	json_t *root;
	struct ref_prompt p[MAX_PROMPTS];
	int n;
};

static void ref_release(struct ref *r)
{
	for (int i = 0; i < r->n; i++)
		free(r->p[i].logits);
	json_decref(r->root);
	memset(r, 0, sizeof(*r));
}

static int read_ref_prompt(json_t *o, struct ref_prompt *p, int vocab, char *why, size_t why_len)
{
	json_t *ids = json_object_get(o, "ids"), *greedy = json_object_get(o, "greedy"), *v;
	const char *lf = json_string_value(json_object_get(o, "logits_file"));
	char path[512];
	struct lp_buf b;
	struct lp_err err = {0};
	size_t i;

	p->text = json_string_value(json_object_get(o, "text"));
	if (!p->text || !json_is_array(ids) || json_array_size(ids) < 1 ||
	    json_array_size(ids) > MAX_IDS || !json_is_array(greedy) ||
	    json_array_size(greedy) != N_GREEDY || !lf) {
		fmt(why, why_len, "a prompt lacks text, ids, %d greedy tokens or logits_file",
		    N_GREEDY);
		return -1;
	}
	json_array_foreach(ids, i, v) p->ids[i] = (int32_t)json_integer_value(v);
	p->n_ids = (int)json_array_size(ids);
	json_array_foreach(greedy, i, v) p->greedy[i] = (int32_t)json_integer_value(v);
	p->range = (float)(json_number_value(json_object_get(o, "logit_max")) -
	                   json_number_value(json_object_get(o, "logit_min")));
	fmt(path, sizeof(path), "%s/goldens/%s", test_fixtures_dir(), lf);
	lp_buf_init(&b, (size_t)vocab * sizeof(float));
	if (lp_buf_read_file(&b, path, (size_t)vocab * sizeof(float), &err) ||
	    b.len != (size_t)vocab * sizeof(float)) {
		fmt(why, why_len, "'%s': %s", path,
		    err.msg[0] ? err.msg : "not vocab_size float32 values");
		lp_buf_release(&b);
		return -1;
	}
	p->logits = (float *)lp_buf_detach(&b, NULL);
	return p->range > 0 ? 0 : (fmt(why, why_len, "'%s': empty logit range", lf), -1);
}

/* Reads tests/fixtures/goldens/<name>.json and its logits files. */
static int ref_load(struct ref *r, const char *name, int vocab, char *why, size_t why_len)
{
	char path[512];
	json_error_t jerr;
	json_t *arr, *v;
	size_t i;

	memset(r, 0, sizeof(*r));
	fmt(path, sizeof(path), "%s/goldens/%s.json", test_fixtures_dir(), name);
	r->root = json_load_file(path, 0, &jerr);
	if (!r->root) {
		fmt(why, why_len, "'%s': %s", path, jerr.text);
		return -1;
	}
	if (json_integer_value(json_object_get(r->root, "vocab_size")) != vocab) {
		fmt(why, why_len, "'%s': vocab_size is not %d", path, vocab);
		return -1;
	}
	arr = json_object_get(r->root, "prompts");
	json_array_foreach(arr, i, v)
	{
		if (i >= MAX_PROMPTS)
			break;
		if (read_ref_prompt(v, &r->p[i], vocab, why, why_len))
			return -1;
		r->n++;
	}
	if (r->n < 3) {
		fmt(why, why_len, "'%s': %d prompts, expected at least 3", path, r->n);
		return -1;
	}
	return 0;
}

/* ---- running the engine ---- */

/* Decodes one prompt alone (batch size 1) on e: N_GREEDY argmax tokens into
 * toks and the logits the first one was taken from into first. */
static int decode_alone(struct lp_engine *e, const struct ref_prompt *p, int vocab, int32_t *toks,
                        float *first, struct lp_err *err)
{
	struct lp_seq_params sp = {0};
	struct lp_seq *s;
	int n = 0, rc;

	sp.prompt = p->ids;
	sp.n_prompt = (size_t)p->n_ids;
	sp.max_tokens = N_GREEDY;
	sp.ignore_eos = true;
	lp_sampling_params_default(&sp.sampling);
	sp.sampling.temperature = 0;
	rc = lp_engine_add(e, &sp, &s, err);
	if (rc)
		return rc;
	while (!rc && lp_engine_has_work(e)) {
		const struct lp_step_output *outs;
		int n_outs;
		rc = lp_engine_step(e, &outs, &n_outs, err);
		for (int k = 0; !rc && k < n_outs; k++) {
			if (outs[k].seq != s || n >= N_GREEDY)
				continue;
			if (n == 0)
				memcpy(first, outs[k].logits, (size_t)vocab * sizeof(float));
			toks[n++] = outs[k].token;
		}
	}
	lp_engine_release(e, s);
	if (!rc && n != N_GREEDY)
		rc = lp_errf(err, -EIO, "the engine gave %d tokens, expected %d", n, N_GREEDY);
	return rc;
}

/* Every reference prompt alone through m: greedy tokens equal, first logits
 * within 1e-3 of the range. Prints the largest logit error. */
static void check_against_reference(const char *label, struct lp_model *m, const struct ref *r)
{
	struct lp_engine_config ec;
	struct lp_engine *e = NULL;
	struct lp_err err = {0};
	int vocab = m->cfg.vocab_size;
	float *first = malloc((size_t)vocab * sizeof(float));
	double worst_rel = 0, worst_abs = 0;
	char fail[256] = "";

	CHECK(first);
	lp_engine_config_default(&ec);
	ec.max_model_len = 256;
	ec.kv_cache_bytes = 4u << 20;
	if (lp_engine_new(&e, m, &ec, &err)) {
		free(first);
		CHECK_MSG(0, "%s: %s", label, err.msg);
	}
	for (int i = 0; i < r->n && !fail[0]; i++) {
		const struct ref_prompt *p = &r->p[i];
		int32_t toks[N_GREEDY];
		double worst = 0;
		int at = 0;

		if (decode_alone(e, p, vocab, toks, first, &err)) {
			fmt(fail, sizeof(fail), "prompt %d: %s", i, err.msg);
			break;
		}
		for (int t = 0; t < vocab; t++) {
			double d = fabs((double)first[t] - (double)p->logits[t]);
			if (d > worst) {
				worst = d;
				at = t;
			}
		}
		if (worst / p->range > worst_rel)
			worst_rel = worst / p->range;
		if (worst > worst_abs)
			worst_abs = worst;
		if (worst > 1e-3 * p->range)
			fmt(fail, sizeof(fail),
			    "prompt %d: logit %d differs from the reference by %g, more than "
			    "1e-3 of the range %g",
			    i, at, worst, p->range);
		for (int t = 0; t < N_GREEDY && !fail[0]; t++)
			if (toks[t] != p->greedy[t])
				fmt(fail, sizeof(fail),
				    "prompt %d: greedy token %d is %d, the reference %d", i, t,
				    toks[t], p->greedy[t]);
	}
	lp_engine_free(e);
	free(first);
	printf("  %-16s %d prompts, max |logit - reference| = %.2e (%.2e of the range)\n", label,
	       r->n, worst_abs, worst_rel);
	CHECK_MSG(!fail[0], "%s %s", label, fail);
}

/* ---- what every variant of the tiny model shares ---- */

/* The llama3 frequencies of the tiny model (theta 10000, head_dim 16,
 * factor 4, low/high frequency factors 1/4, original context 64), from the
 * formula in double precision. */
static double llama3_inv_freq(int i)
{
	const double theta = 10000, factor = 4, low = 1, high = 4, orig = 64;
	double inv = pow(theta, -2.0 * i / 16), wavelen = 2 * M_PI / inv;

	if (wavelen < orig / high)
		return inv;
	if (wavelen > orig / low)
		return inv / factor;
	double smooth = (orig / wavelen - low) / (high - low);
	return (1 - smooth) * inv / factor + smooth * inv;
}

/* Hyper-parameters, rope frequencies and weight types of a tiny-model
 * variant; matrices of type mat, norms f32. */
static void check_tiny_config(const struct lp_model *m, bool from_gguf, enum lp_dtype mat)
{
	const struct lp_model_config *c = &m->cfg;
	float inv[8];
	bool eos2 = false;

	CHECK_EQ_INT(c->n_layers, 2);
	CHECK_EQ_INT(c->dim, 64);
	CHECK_EQ_INT(c->n_heads, 4);
	CHECK_EQ_INT(c->n_kv_heads, 2);
	CHECK_EQ_INT(c->head_dim, 16);
	CHECK_EQ_INT(c->ffn_dim, 160);
	CHECK_EQ_INT(c->vocab_size, TINY_VOCAB);
	CHECK_EQ_INT(c->max_pos, 256);
	CHECK_EQ_INT(c->tied_embeddings, false);
	CHECK_EQ_INT(c->attn_bias, false);
	CHECK_NEAR(c->rms_eps, 1e-5, 1e-9);
	CHECK_NEAR(c->rope_theta, 10000, 1e-3);
	CHECK_EQ_INT(c->bos_id, 1);
	for (int i = 0; i < c->n_eos; i++)
		eos2 |= c->eos_ids[i] == 2;
	CHECK_MSG(eos2, "token 2 is not an end-of-sequence token");
	/* llama.cpp files carry llama3 scaling as rope_freqs, not as a key */
	CHECK_EQ_INT(c->rope_scaling, from_gguf ? LP_ROPE_NONE : LP_ROPE_LLAMA3);
	CHECK_EQ_INT(m->inv_freq.rows, 1);
	CHECK_EQ_INT(m->inv_freq.cols, 8);
	CHECK_EQ_INT(m->inv_freq.type, LP_DTYPE_F32);
	lp_backend_download(m->be, inv, m->inv_freq.data, sizeof(inv));
	for (int i = 0; i < 8; i++) {
		double want = llama3_inv_freq(i);
		CHECK_MSG(fabs(inv[i] - want) <= 2e-6 * want,
		          "inv_freq[%d] = %.9g, the llama3 formula gives %.9g", i, inv[i], want);
	}
	CHECK_EQ_INT(m->tok_embd.type, mat);
	CHECK_EQ_INT(m->output.type, mat);
	CHECK_MSG(m->output.data != m->tok_embd.data, "the output matrix aliases the embeddings");
	CHECK_EQ_INT(m->out_norm.type, LP_DTYPE_F32);
	for (int l = 0; l < 2; l++) {
		const struct lp_layer_weights *L = &m->layers[l];
		const struct lp_tensor *mats[] = {&L->wq,     &L->wk,   &L->wv,    &L->wo,
		                                  &L->w_gate, &L->w_up, &L->w_down};
		for (size_t i = 0; i < sizeof(mats) / sizeof(mats[0]); i++)
			CHECK_MSG(mats[i]->type == mat,
			          "layer %d matrix %zu has type %s, expected %s", l, i,
			          lp_dtype_name(mats[i]->type), lp_dtype_name(mat));
		CHECK_EQ_INT(L->attn_norm.type, LP_DTYPE_F32);
		CHECK_EQ_INT(L->ffn_norm.type, LP_DTYPE_F32);
	}
}

/* The model's own tokenizer turns each prompt text into the reference ids. */
static void check_prompt_ids(const char *label, const struct lp_model *m, const struct ref *r)
{
	struct lp_err err = {0};

	for (int i = 0; i < r->n; i++) {
		const struct ref_prompt *p = &r->p[i];
		struct lp_tokens ids = {0};
		bool same;

		CHECK_OK(lp_tokenizer_encode(m->tok, p->text, strlen(p->text),
		                             LP_ENCODE_ADD_SPECIAL | LP_ENCODE_PARSE_SPECIAL, &ids,
		                             &err),
		         &err);
		same = ids.n == (size_t)p->n_ids &&
		       !memcmp(ids.ids, p->ids, (size_t)p->n_ids * sizeof(int32_t));
		lp_tokens_release(&ids);
		CHECK_MSG(same, "%s prompt %d (\"%.30s\"): token ids differ from the reference",
		          label, i, p->text);
	}
}

/* ---- GGUF variants ---- */

static struct lp_backend *be;

static void check_gguf_variant(const char *type, enum lp_dtype mat)
{
	char path[512], golden[64], label[32], why[1024];
	struct lp_model *m = NULL;
	struct lp_err err = {0};
	struct ref r;

	fmt(path, sizeof(path), "%s/tiny-gguf/tiny-llama-%s.gguf", test_fixtures_dir(), type);
	fmt(golden, sizeof(golden), "tiny-gguf-%s", type);
	fmt(label, sizeof(label), "gguf %s", type);
	CHECK_OK(lp_model_load(&m, path, be, &err), &err);
	if (ref_load(&r, golden, m->cfg.vocab_size, why, sizeof(why))) {
		lp_model_free(m);
		ref_release(&r);
		CHECK_MSG(0, "%s", why);
	}
	check_tiny_config(m, true, mat);
	if (!test_current_failed)
		check_prompt_ids(label, m, &r);
	if (!test_current_failed)
		check_against_reference(label, m, &r);
	ref_release(&r);
	lp_model_free(m);
}

static void test_gguf_f32(void)
{
	check_gguf_variant("f32", LP_DTYPE_F32);
}

static void test_gguf_f16(void)
{
	check_gguf_variant("f16", LP_DTYPE_F16);
}

static void test_gguf_bf16(void)
{
	check_gguf_variant("bf16", LP_DTYPE_BF16);
}

static void test_gguf_q8_0(void)
{
	check_gguf_variant("q8_0", LP_DTYPE_Q8_0);
}

static void test_gguf_q4_0(void)
{
	check_gguf_variant("q4_0", LP_DTYPE_Q4_0);
}

static void test_gguf_q4_1(void)
{
	check_gguf_variant("q4_1", LP_DTYPE_Q4_1);
}

static void test_gguf_q5_0(void)
{
	check_gguf_variant("q5_0", LP_DTYPE_Q5_0);
}

static void test_gguf_q5_1(void)
{
	check_gguf_variant("q5_1", LP_DTYPE_Q5_1);
}

/* Row r of t as f32. */
static void tensor_row_f32(struct lp_backend *b, const struct lp_tensor *t, int64_t r, float *out,
                           void *scratch)
{
	size_t rb = lp_dtype_row_bytes(t->type, t->cols);

	lp_backend_download(b, scratch, (const char *)t->data + (size_t)r * rb, rb);
	lp_dequantize_row(t->type, scratch, out, t->cols);
}

/* Every element of a and b equal (after conversion to f32); names the first
 * difference in why. */
static bool same_matrix(const struct lp_tensor *a, const struct lp_tensor *b, char *why,
                        size_t why_len)
{
	float ra[256], rb[256];
	unsigned char scratch[1024];

	if (a->rows != b->rows || a->cols != b->cols || a->cols > 256) {
		fmt(why, why_len, "shapes [%lld, %lld] and [%lld, %lld]", (long long)a->rows,
		    (long long)a->cols, (long long)b->rows, (long long)b->cols);
		return false;
	}
	for (int64_t r = 0; r < a->rows; r++) {
		tensor_row_f32(be, a, r, ra, scratch);
		tensor_row_f32(be, b, r, rb, scratch);
		for (int64_t c = 0; c < a->cols; c++)
			if (ra[c] != rb[c]) {
				fmt(why, why_len, "row %lld column %lld: %g and %g", (long long)r,
				    (long long)c, ra[c], rb[c]);
				return false;
			}
	}
	return true;
}

/* The F32 and BF16 GGUF files hold exactly the bf16 HF weights; after
 * loading, every Q and K row (and every other matrix) is the HF one. */
static void test_gguf_qk_rows_equal_hf(void)
{
	static const char *const types[] = {"f32", "bf16"};
	char path[512], why[1024];
	struct lp_model *hf = NULL;
	struct lp_err err = {0};

	fmt(path, sizeof(path), "%s/tiny-llama", test_fixtures_dir());
	CHECK_OK(lp_model_load(&hf, path, be, &err), &err);
	for (size_t v = 0; v < 2 && !test_current_failed; v++) {
		struct lp_model *g = NULL;
		fmt(path, sizeof(path), "%s/tiny-gguf/tiny-llama-%s.gguf", test_fixtures_dir(),
		    types[v]);
		if (lp_model_load(&g, path, be, &err)) {
			TEST_FAIL("%s", err.msg);
			break;
		}
		for (int l = 0; l < 2 && !test_current_failed; l++) {
			const struct lp_layer_weights *a = &hf->layers[l], *b = &g->layers[l];
			const struct lp_tensor *pairs[][2] = {
			    {&a->wq, &b->wq},         {&a->wk, &b->wk},
			    {&a->wv, &b->wv},         {&a->wo, &b->wo},
			    {&a->w_gate, &b->w_gate}, {&a->w_up, &b->w_up},
			    {&a->w_down, &b->w_down},
			};
			static const char *const names[] = {"wq",     "wk",   "wv",    "wo",
			                                    "w_gate", "w_up", "w_down"};
			for (size_t i = 0; i < 7; i++)
				if (!same_matrix(pairs[i][0], pairs[i][1], why, sizeof(why))) {
					TEST_FAIL("%s layer %d %s differs from the HF model: %s",
					          types[v], l, names[i], why);
					break;
				}
		}
		if (!test_current_failed &&
		    !same_matrix(&hf->tok_embd, &g->tok_embd, why, sizeof(why)))
			TEST_FAIL("%s embeddings differ from the HF model: %s", types[v], why);
		if (!test_current_failed && !same_matrix(&hf->output, &g->output, why, sizeof(why)))
			TEST_FAIL("%s output matrix differs from the HF model: %s", types[v], why);
		lp_model_free(g);
	}
	lp_model_free(hf);
}

/* ---- single-file HF directories written here ---- */

static float st_elem_f32(const struct lp_fmt_tensor *t, size_t i)
{
	uint16_t h;
	float f;

	switch (t->type) {
	case LP_FMT_F32:
		memcpy(&f, (const char *)t->data + 4 * i, 4);
		return f;
	case LP_FMT_F16:
		memcpy(&h, (const char *)t->data + 2 * i, 2);
		return lp_f16_to_f32(h);
	default: /* BF16, checked by the caller */
		memcpy(&h, (const char *)t->data + 2 * i, 2);
		return lp_bf16_to_f32(h);
	}
}

static int by_name(const void *a, const void *b)
{
	const struct lp_fmt_tensor *const *x = a, *const *y = b;
	return strcmp((*x)->name, (*y)->name);
}

struct f16_stats {
	size_t values, inexact, flushed;
	double max_err;
};

/* Writes path as one safetensors file holding every tensor of src converted
 * to F32 (to_f16 false) or F16, in name order, with the 8-byte aligned
 * header safetensors writes. For F16, stats counts the values F16 cannot
 * hold exactly. */
static int write_safetensors(const char *path, const struct lp_safetensors *src, bool to_f16,
                             struct f16_stats *stats, char *why, size_t why_len)
{
	size_t n = lp_safetensors_count(src), off = 0, esize = to_f16 ? 2 : 4;
	const struct lp_fmt_tensor **ts = calloc(n ? n : 1, sizeof(*ts));
	json_t *hdr = json_object(), *meta = json_object();
	char *text = NULL;
	FILE *f = NULL;
	int rc = -1;

	memset(stats, 0, sizeof(*stats));
	if (!ts || !hdr || !meta) {
		fmt(why, why_len, "out of memory");
		json_decref(meta);
		goto out;
	}
	json_object_set_new(meta, "format", json_string("pt"));
	json_object_set_new(hdr, "__metadata__", meta);
	for (size_t i = 0; i < n; i++)
		ts[i] = lp_safetensors_at(src, i);
	qsort(ts, n, sizeof(*ts), by_name);
	for (size_t i = 0; i < n; i++) {
		const struct lp_fmt_tensor *t = ts[i];
		json_t *shape = json_array(), *desc = json_object();
		size_t count = t->nbytes / lp_fmt_type_size(t->type);

		if (t->type != LP_FMT_BF16 && t->type != LP_FMT_F16 && t->type != LP_FMT_F32) {
			fmt(why, why_len, "tensor '%s' has dtype %s", t->name,
			    lp_fmt_type_name(t->type));
			json_decref(shape);
			json_decref(desc);
			goto out;
		}
		for (int d = 0; d < t->n_dims; d++)
			json_array_append_new(shape, json_integer(t->shape[d]));
		json_object_set_new(desc, "dtype", json_string(to_f16 ? "F16" : "F32"));
		json_object_set_new(desc, "shape", shape);
		json_object_set_new(
		    desc, "data_offsets",
		    json_pack("[II]", (json_int_t)off, (json_int_t)(off + count * esize)));
		json_object_set_new(hdr, t->name, desc);
		off += count * esize;
	}
	text = json_dumps(hdr, JSON_COMPACT);
	f = fopen(path, "wb");
	if (!text || !f) {
		fmt(why, why_len, "cannot write '%s': %s", path, strerror(errno));
		goto out;
	}
	{
		size_t len = strlen(text), padded = (len + 7) / 8 * 8;
		unsigned char le[8];
		for (int b = 0; b < 8; b++)
			le[b] = (unsigned char)((uint64_t)padded >> (8 * b));
		fwrite(le, 1, 8, f);
		fwrite(text, 1, len, f);
		for (size_t i = len; i < padded; i++)
			fputc(' ', f);
	}
	for (size_t i = 0; i < n; i++) {
		const struct lp_fmt_tensor *t = ts[i];
		size_t count = t->nbytes / lp_fmt_type_size(t->type);
		for (size_t k = 0; k < count; k++) {
			float v = st_elem_f32(t, k);
			if (to_f16) {
				uint16_t h = lp_f32_to_f16(v);
				float back = lp_f16_to_f32(h);
				stats->values++;
				if (back != v) {
					stats->inexact++;
					stats->flushed += back == 0;
					if (fabs((double)back - v) > stats->max_err)
						stats->max_err = fabs((double)back - v);
				}
				fwrite(&h, 2, 1, f);
			} else {
				fwrite(&v, 4, 1, f);
			}
		}
	}
	if (ferror(f)) {
		fmt(why, why_len, "cannot write '%s'", path);
		goto out;
	}
	rc = 0;
out:
	if (f && fclose(f) && !rc) {
		fmt(why, why_len, "cannot write '%s': %s", path, strerror(errno));
		rc = -1;
	}
	free(text);
	json_decref(hdr);
	free(ts);
	return rc;
}

static int copy_file(const char *from, const char *to, char *why, size_t why_len)
{
	struct lp_buf b;
	struct lp_err err = {0};
	FILE *f;
	int rc = -1;

	lp_buf_init(&b, 16u << 20);
	if (lp_buf_read_file(&b, from, 16u << 20, &err)) {
		fmt(why, why_len, "%s", err.msg);
		goto out;
	}
	f = fopen(to, "wb");
	if (!f || fwrite(b.data, 1, b.len, f) != b.len) {
		fmt(why, why_len, "cannot write '%s'", to);
		if (f)
			fclose(f);
		goto out;
	}
	rc = fclose(f) ? -1 : 0;
	if (rc)
		fmt(why, why_len, "cannot write '%s'", to);
out:
	lp_buf_release(&b);
	return rc;
}

/* dir/config.json: the tiny model's, with torch_dtype naming the new type. */
static int write_config(const char *src_dir, const char *dir, const char *dtype, char *why,
                        size_t why_len)
{
	char from[512], to[512];
	json_error_t jerr;
	json_t *cfg;
	int rc;

	fmt(from, sizeof(from), "%s/config.json", src_dir);
	fmt(to, sizeof(to), "%s/config.json", dir);
	cfg = json_load_file(from, 0, &jerr);
	if (!cfg) {
		fmt(why, why_len, "'%s': %s", from, jerr.text);
		return -1;
	}
	json_object_set_new(cfg, "torch_dtype", json_string(dtype));
	rc = json_dump_file(cfg, to, JSON_INDENT(1));
	json_decref(cfg);
	if (rc)
		fmt(why, why_len, "cannot write '%s'", to);
	return rc ? -1 : 0;
}

static const char *const hf_files[] = {"model.safetensors", "config.json", "tokenizer.json",
                                       "tokenizer_config.json"};

/* Builds dir (made by mkdtemp) as a single-file copy of tiny-llama. */
static int make_single_file_dir(const char *dir, bool to_f16, struct f16_stats *stats, char *why,
                                size_t why_len)
{
	char src_dir[512], from[512], to[512];
	struct lp_safetensors *st = NULL;
	struct lp_err err = {0};
	int rc;

	fmt(src_dir, sizeof(src_dir), "%s/tiny-llama", test_fixtures_dir());
	if (lp_safetensors_open_dir(&st, src_dir, &err)) {
		fmt(why, why_len, "%s", err.msg);
		return -1;
	}
	fmt(to, sizeof(to), "%s/model.safetensors", dir);
	rc = write_safetensors(to, st, to_f16, stats, why, why_len);
	lp_safetensors_free(st);
	if (!rc)
		rc = write_config(src_dir, dir, to_f16 ? "float16" : "float32", why, why_len);
	for (size_t i = 2; !rc && i < 4; i++) {
		fmt(from, sizeof(from), "%s/%s", src_dir, hf_files[i]);
		fmt(to, sizeof(to), "%s/%s", dir, hf_files[i]);
		rc = copy_file(from, to, why, why_len);
	}
	return rc;
}

static void remove_dir(const char *dir)
{
	char path[512];

	for (size_t i = 0; i < 4; i++) {
		fmt(path, sizeof(path), "%s/%s", dir, hf_files[i]);
		unlink(path);
	}
	rmdir(dir);
}

static void check_single_file_in(char *dir, bool to_f16)
{
	const char *label = to_f16 ? "hf single f16" : "hf single f32";
	struct f16_stats stats;
	struct lp_model *m = NULL;
	struct lp_err err = {0};
	struct ref r = {0};
	char why[1024];

	CHECK_MSG(!make_single_file_dir(dir, to_f16, &stats, why, sizeof(why)), "%s", why);
	if (to_f16)
		printf("  %-16s %zu of %zu bf16 values not exact in f16 (%zu flushed to zero), "
		       "max error %.2e\n",
		       label, stats.inexact, stats.values, stats.flushed, stats.max_err);
	CHECK_OK(lp_model_load(&m, dir, be, &err), &err);
	if (ref_load(&r, "tiny-llama", m->cfg.vocab_size, why, sizeof(why))) {
		lp_model_free(m);
		ref_release(&r);
		CHECK_MSG(0, "%s", why);
	}
	check_tiny_config(m, false, to_f16 ? LP_DTYPE_F16 : LP_DTYPE_F32);
	if (!test_current_failed)
		check_prompt_ids(label, m, &r);
	if (!test_current_failed)
		check_against_reference(label, m, &r);
	ref_release(&r);
	lp_model_free(m);
}

static void check_single_file(bool to_f16)
{
	char dir[] = "/tmp/lp-model-formats-XXXXXX";

	CHECK_MSG(mkdtemp(dir), "mkdtemp: %s", strerror(errno));
	check_single_file_in(dir, to_f16);
	remove_dir(dir);
}

static void test_hf_single_file_f32(void)
{
	check_single_file(false);
}

static void test_hf_single_file_f16(void)
{
	check_single_file(true);
}

/* Llama 3.x ends a turn with <|eot_id|>, and a turn that called a tool
 * with <|eom_id|>: where a vocabulary holds both, both end generation,
 * whatever the config lists (here tiny-llama with the two as added tokens
 * in place of its last two pieces, whose merges go too). */
static void test_llama3_turn_ends_are_eos(void)
{
	char dir[] = "/tmp/lp-model-formats-XXXXXX", path[600], why[1024];
	struct lp_model *m = NULL;
	struct lp_err err = {0};
	struct f16_stats stats;
	json_t *tok, *added;
	int32_t eot, eom;

	CHECK_MSG(mkdtemp(dir), "mkdtemp: %s", strerror(errno));
	if (make_single_file_dir(dir, false, &stats, why, sizeof(why))) {
		remove_dir(dir);
		CHECK_MSG(0, "%s", why);
	}
	fmt(path, sizeof(path), "%s/tokenizer.json", dir);
	tok = json_load_file(path, 0, NULL);
	added = tok ? json_object_get(tok, "added_tokens") : NULL;
	if (json_is_array(added)) {
		/* the pieces 510 and 511 and the merges that make them go */
		json_t *model = json_object_get(tok, "model");
		json_t *vocab = json_object_get(model, "vocab"),
		       *merges = json_object_get(model, "merges");
		json_object_del(vocab, "\u2581made");
		json_object_del(vocab, "ine");
		json_object_set_new(vocab, "<|eot_id|>", json_integer(510));
		json_object_set_new(vocab, "<|eom_id|>", json_integer(511));
		for (size_t i = json_array_size(merges); i-- > 0;) {
			const char *mg = json_string_value(json_array_get(merges, i));
			if (mg && (!strcmp(mg, "\u2581m ade") || !strcmp(mg, "in e")))
				json_array_remove(merges, i);
		}
		json_array_append_new(added,
		                      json_pack("{s:i, s:s, s:b, s:b, s:b, s:b, s:b}", "id", 510,
		                                "content", "<|eot_id|>", "single_word", 0, "lstrip",
		                                0, "rstrip", 0, "normalized", 0, "special", 1));
		json_array_append_new(added,
		                      json_pack("{s:i, s:s, s:b, s:b, s:b, s:b, s:b}", "id", 511,
		                                "content", "<|eom_id|>", "single_word", 0, "lstrip",
		                                0, "rstrip", 0, "normalized", 0, "special", 1));
	}
	if (!json_is_array(added) || json_dump_file(tok, path, 0)) {
		json_decref(tok);
		remove_dir(dir);
		CHECK_MSG(0, "cannot rewrite %s", path);
	}
	json_decref(tok);
	if (lp_model_load(&m, dir, be, &err)) {
		remove_dir(dir);
		CHECK_MSG(0, "%s", err.msg);
	}
	remove_dir(dir);
	eot = lp_tokenizer_find(m->tok, "<|eot_id|>");
	eom = lp_tokenizer_find(m->tok, "<|eom_id|>");
	CHECK(eot == 510 && eom == 511);
	CHECK(lp_model_is_eos(m, 2) && lp_model_is_eos(m, eot) && lp_model_is_eos(m, eom));
	CHECK_EQ_INT(m->cfg.n_eos, 3);
	lp_model_free(m);
}

int main(void)
{
	struct lp_err err = {0};

	TEST_MAIN_BEGIN("test-model-formats");
	if (lp_backend_cpu_new(&be, 0, &err)) {
		printf("FAIL test-model-formats:backend: %s\n", err.msg);
		return 1;
	}
	RUN(test_gguf_f32);
	RUN(test_gguf_f16);
	RUN(test_gguf_bf16);
	RUN(test_gguf_q8_0);
	RUN(test_gguf_q4_0);
	RUN(test_gguf_q4_1);
	RUN(test_gguf_q5_0);
	RUN(test_gguf_q5_1);
	RUN(test_gguf_qk_rows_equal_hf);
	RUN(test_hf_single_file_f32);
	RUN(test_hf_single_file_f16);
	RUN(test_llama3_turn_ends_are_eos);
	lp_backend_destroy(be);
	TEST_MAIN_END();
}
