/* Model loading from GGUF files and HF directories; see model.h.
 *
 * The loader validates the hyper-parameters, then checks every weight's
 * presence, type and shape against them before any of it reaches the
 * backend, so a bad file fails with its name and the reason. */
#include "agent/engine/model.h"

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "agent/formats/gguf.h"
#include "agent/formats/safetensors.h"
#include "agent/engine/tokenizer.h"
#include "common/buf.h"

#define CONFIG_MAX_BYTES    (1u << 20)
#define TOKENIZER_MAX_BYTES (64u << 20)
#define MAX_LAYERS          LP_MAX_LAYERS
#define MAX_DIM             (1 << 16)
#define MAX_VOCAB           (1 << 22)

/* Everything the model owns besides its tensors' descriptions. */
struct lp_model_res {
	struct lp_gguf *gguf;
	struct lp_safetensors *st;
	struct lp_buffer *bufs; /* one per weight, freed on the model's backend */
	size_t n_bufs, cap_bufs;
	void **host; /* converted copies the buffers may alias */
	size_t n_host, cap_host;
};

/* A weight as found in the file, before it goes to the backend. */
struct raw_weight {
	const char *name; /* for messages */
	const void *data;
	enum lp_dtype type;
	int64_t rows, cols;
};

static int res_push_buf(struct lp_model_res *r, struct lp_buffer b, struct lp_err *err)
{
	if (r->n_bufs == r->cap_bufs) {
		size_t cap = r->cap_bufs ? r->cap_bufs * 2 : 64;
		struct lp_buffer *p = realloc(r->bufs, cap * sizeof(*p));
		if (!p)
			return lp_errf(err, -ENOMEM, "out of memory");
		r->bufs = p;
		r->cap_bufs = cap;
	}
	r->bufs[r->n_bufs++] = b;
	return 0;
}

/* Takes ownership of p (freed with the model, or now on failure). */
static int res_push_host(struct lp_model_res *r, void *p, struct lp_err *err)
{
	if (r->n_host == r->cap_host) {
		size_t cap = r->cap_host ? r->cap_host * 2 : 64;
		void **q = realloc(r->host, cap * sizeof(*q));
		if (!q) {
			free(p);
			return lp_errf(err, -ENOMEM, "out of memory");
		}
		r->host = q;
		r->cap_host = cap;
	}
	r->host[r->n_host++] = p;
	return 0;
}

/* Hands bytes to the backend as tensor t of the given shape and type. */
static int place_tensor(struct lp_model *m, const void *data, enum lp_dtype type, int64_t rows,
                        int64_t cols, struct lp_tensor *t, struct lp_err *err)
{
	struct lp_buffer b;
	size_t bytes = (size_t)rows * lp_dtype_row_bytes(type, cols);
	int rc;

	rc = lp_backend_import(m->be, data, bytes, &b, err);
	if (rc)
		return rc;
	rc = res_push_buf(m->res, b, err);
	if (rc) {
		lp_backend_free(m->be, &b);
		return rc;
	}
	t->data = b.data;
	t->type = type;
	t->rows = rows;
	t->cols = cols;
	m->weight_bytes += bytes;
	return 0;
}

static int check_shape(const struct raw_weight *w, int64_t rows, int64_t cols, struct lp_err *err)
{
	if (w->rows != rows || w->cols != cols)
		return lp_errf(err, -EINVAL,
		               "tensor '%s' has shape [%lld, %lld], expected [%lld, %lld]", w->name,
		               (long long)w->rows, (long long)w->cols, (long long)rows,
		               (long long)cols);
	return 0;
}

/* Hands a weight matrix to the backend, which stores it in the format it
 * chooses (import_weight); host stays alive with the model. */
static int place_weight(struct lp_model *m, const void *host, enum lp_dtype type, int64_t rows,
                        int64_t cols, struct lp_tensor *t, struct lp_err *err)
{
	struct lp_buffer b;
	int rc;

	rc = m->be->ops->import_weight(m->be->ctx, host, type, rows, cols, t, &b, err);
	if (rc)
		return rc;
	rc = res_push_buf(m->res, b, err);
	if (rc) {
		lp_backend_free(m->be, &b);
		return rc;
	}
	m->weight_bytes += lp_tensor_bytes(t);
	return 0;
}

/* A matrix weight. */
static int load_matrix(struct lp_model *m, const struct raw_weight *w, int64_t rows, int64_t cols,
                       struct lp_tensor *t, struct lp_err *err)
{
	int rc = check_shape(w, rows, cols, err);

	if (rc)
		return rc;
	if (w->type == LP_DTYPE_I32)
		return lp_errf(err, -EINVAL, "tensor '%s' has integer type", w->name);
	if (!lp_dtype_row_bytes(w->type, cols))
		return lp_errf(err, -EINVAL,
		               "tensor '%s': %lld columns is not a multiple of the %s block",
		               w->name, (long long)cols, lp_dtype_name(w->type));
	return place_weight(m, w->data, w->type, rows, cols, t, err);
}

/* A vector (norm weight or bias), converted to f32. */
static int load_vector(struct lp_model *m, const struct raw_weight *w, int64_t n,
                       struct lp_tensor *t, struct lp_err *err)
{
	float *f;
	int rc = check_shape(w, 1, n, err);

	if (rc)
		return rc;
	if (w->type == LP_DTYPE_F32)
		return place_tensor(m, w->data, LP_DTYPE_F32, 1, n, t, err);
	if (!lp_dtype_row_bytes(w->type, n) || w->type == LP_DTYPE_I32)
		return lp_errf(err, -EINVAL, "tensor '%s' has unusable type %s", w->name,
		               lp_dtype_name(w->type));
	f = malloc((size_t)n * sizeof(float));
	if (!f)
		return lp_errf(err, -ENOMEM, "out of memory");
	lp_dequantize_row(w->type, w->data, f, n);
	rc = res_push_host(m->res, f, err);
	if (rc)
		return rc;
	return place_tensor(m, f, LP_DTYPE_F32, 1, n, t, err);
}

/* A Gemma RMSNorm weight w, which scales by (1 + w): stored as 1 + w in
 * f32 (the sum transformers computes), so that the rmsnorm op applies it
 * as any other. */
static int load_norm_plus1(struct lp_model *m, const struct raw_weight *w, int64_t n,
                           struct lp_tensor *t, struct lp_err *err)
{
	float *f;
	int rc = check_shape(w, 1, n, err);

	if (rc)
		return rc;
	if (!lp_dtype_row_bytes(w->type, n) || w->type == LP_DTYPE_I32)
		return lp_errf(err, -EINVAL, "tensor '%s' has unusable type %s", w->name,
		               lp_dtype_name(w->type));
	f = malloc((size_t)n * sizeof(float));
	if (!f)
		return lp_errf(err, -ENOMEM, "out of memory");
	lp_dequantize_row(w->type, w->data, f, n);
	for (int64_t i = 0; i < n; i++)
		f[i] += 1.0f;
	rc = res_push_host(m->res, f, err);
	if (rc)
		return rc;
	return place_tensor(m, f, LP_DTYPE_F32, 1, n, t, err);
}

/* Q or K in llama.cpp's GGUF layout: row 2i + j of each head holds HF row
 * j * head_dim / 2 + i. Copies the matrix back into HF order. */
static int load_unpermuted(struct lp_model *m, const struct raw_weight *w, int n_heads,
                           int64_t cols, struct lp_tensor *t, struct lp_err *err)
{
	int hd = m->cfg.head_dim, half = hd / 2;
	int64_t rows = (int64_t)n_heads * hd;
	size_t row_bytes;
	unsigned char *dst;
	int rc = check_shape(w, rows, cols, err);

	if (rc)
		return rc;
	row_bytes = lp_dtype_row_bytes(w->type, cols);
	if (!row_bytes || w->type == LP_DTYPE_I32)
		return lp_errf(err, -EINVAL, "tensor '%s' has unusable type %s", w->name,
		               lp_dtype_name(w->type));
	dst = malloc((size_t)rows * row_bytes);
	if (!dst)
		return lp_errf(err, -ENOMEM, "out of memory");
	for (int h = 0; h < n_heads; h++)
		for (int i = 0; i < half; i++)
			for (int j = 0; j < 2; j++) {
				size_t from = (size_t)h * hd + 2 * i + j;
				size_t to = (size_t)h * hd + j * half + i;
				memcpy(dst + to * row_bytes,
				       (const unsigned char *)w->data + from * row_bytes,
				       row_bytes);
			}
	rc = res_push_host(m->res, dst, err);
	if (rc)
		return rc;
	return place_weight(m, dst, w->type, rows, cols, t, err);
}

static int check_config(const struct lp_model_config *c, struct lp_err *err)
{
	if (c->n_layers < 1 || c->n_layers > MAX_LAYERS)
		return lp_errf(err, -EINVAL, "layer count %d out of range", c->n_layers);
	if (c->dim < 1 || c->dim > MAX_DIM || c->ffn_dim < 1 || c->ffn_dim > 8 * MAX_DIM)
		return lp_errf(err, -EINVAL, "hidden size %d or intermediate size %d out of range",
		               c->dim, c->ffn_dim);
	if (c->n_heads < 1 || c->n_kv_heads < 1 || c->n_heads % c->n_kv_heads)
		return lp_errf(
		    err, -EINVAL,
		    "head counts %d and %d: attention heads must be a multiple of key/value heads",
		    c->n_heads, c->n_kv_heads);
	if (c->head_dim < 2 || c->head_dim % 2 || c->head_dim > 1024)
		return lp_errf(err, -EINVAL, "head dimension %d out of range", c->head_dim);
	if (c->vocab_size < 1 || c->vocab_size > MAX_VOCAB)
		return lp_errf(err, -EINVAL, "vocabulary size %d out of range", c->vocab_size);
	if (!(c->rms_eps > 0) || !(c->rope_theta > 0))
		return lp_errf(err, -EINVAL, "rms_norm_eps and rope_theta must be positive");
	if (!(c->rope_local_theta >= 0) || !(c->embed_scale >= 0) || !(c->attn_scale >= 0) ||
	    !isfinite(c->embed_scale) || !isfinite(c->attn_scale))
		return lp_errf(err, -EINVAL,
		               "the local rope base, the embedding scale and the attention scale "
		               "must be finite and not negative");
	if (c->max_pos < 1)
		return lp_errf(err, -EINVAL, "context length %d out of range", c->max_pos);
	if (c->rope_scaling != LP_ROPE_NONE && !(c->rope_factor > 0))
		return lp_errf(err, -EINVAL, "rope scaling factor must be positive");
	if (c->rope_scaling == LP_ROPE_LLAMA3 &&
	    (!(c->rope_low_freq_factor > 0) ||
	     !(c->rope_high_freq_factor > c->rope_low_freq_factor) || c->rope_orig_max_pos < 1))
		return lp_errf(err, -EINVAL, "invalid llama3 rope scaling parameters");
	for (int i = 0; i < c->n_eos; i++)
		if (c->eos_ids[i] < 0 || c->eos_ids[i] >= c->vocab_size)
			return lp_errf(err, -EINVAL, "eos token id %d out of range", c->eos_ids[i]);
	if (c->bos_id >= c->vocab_size)
		return lp_errf(err, -EINVAL, "bos token id %d out of range", c->bos_id);
	return 0;
}

static int alloc_layers(struct lp_model *m, struct lp_err *err)
{
	m->layers = calloc((size_t)m->cfg.n_layers, sizeof(*m->layers));
	return m->layers ? 0 : lp_errf(err, -ENOMEM, "out of memory");
}

/* The frequencies of the local layers: rope_local_theta^(-2i/head_dim),
 * no scaling (Gemma 3 scales only the global layers' RoPE). */
static int make_local_inv_freq(struct lp_model *m, struct lp_err *err)
{
	const struct lp_model_config *c = &m->cfg;
	int half = c->head_dim / 2;
	float *f;

	if (!(c->rope_local_theta > 0))
		return 0;
	f = malloc((size_t)half * sizeof(float));
	if (!f)
		return lp_errf(err, -ENOMEM, "out of memory");
	for (int i = 0; i < half; i++)
		f[i] = 1.0f / powf(c->rope_local_theta, (float)(2 * i) / (float)c->head_dim);
	m->rope_local_inv_freq = f;
	return res_push_host(m->res, f, err);
}

/* inv_freq[i] = theta^(-2i/head_dim), computed in f32 as transformers does,
 * with the configured scaling; freq_divisors (GGUF rope_freqs, may be NULL)
 * divide each frequency. Then the local layers' own (make_local_inv_freq). */
static int make_inv_freq(struct lp_model *m, const float *freq_divisors, struct lp_err *err)
{
	const struct lp_model_config *c = &m->cfg;
	int half = c->head_dim / 2;
	float *f = malloc((size_t)half * sizeof(float));
	int rc;

	if (!f)
		return lp_errf(err, -ENOMEM, "out of memory");
	if ((rc = make_local_inv_freq(m, err))) {
		free(f);
		return rc;
	}
	for (int i = 0; i < half; i++) {
		float e = (float)(2 * i) / (float)c->head_dim;
		float inv = 1.0f / powf(c->rope_theta, e);
		if (c->rope_scaling == LP_ROPE_LINEAR) {
			inv /= c->rope_factor;
		} else if (c->rope_scaling == LP_ROPE_LLAMA3) {
			float low_wavelen = (float)c->rope_orig_max_pos / c->rope_low_freq_factor;
			float high_wavelen = (float)c->rope_orig_max_pos / c->rope_high_freq_factor;
			float wavelen = 2.0f * (float)M_PI / inv;
			if (wavelen > low_wavelen) {
				inv /= c->rope_factor;
			} else if (wavelen >= high_wavelen) {
				float smooth = ((float)c->rope_orig_max_pos / wavelen -
				                c->rope_low_freq_factor) /
				               (c->rope_high_freq_factor - c->rope_low_freq_factor);
				inv = (1 - smooth) * inv / c->rope_factor + smooth * inv;
			}
		}
		if (freq_divisors)
			inv /= freq_divisors[i];
		f[i] = inv;
	}
	rc = res_push_host(m->res, f, err);
	if (rc)
		return rc;
	m->rope_inv_freq = f;
	return place_tensor(m, f, LP_DTYPE_F32, 1, half, &m->inv_freq, err);
}

void lp_model_rope_table(const struct lp_model *m, bool local, int n_pos, float *out)
{
	int hd = m->cfg.head_dim, half = hd / 2;
	const float *inv_freq = local ? m->rope_local_inv_freq : m->rope_inv_freq;

	for (int p = 0; p < n_pos; p++) {
		float *row = out + (size_t)p * hd;

		for (int i = 0; i < half; i++) {
			/* the angle rounded to f32 first, as the forward pass
			 * computed it before the table existed */
			float angle = (float)p * inv_freq[i];

			row[i] = cosf(angle);
			row[half + i] = sinf(angle);
		}
	}
}

/* Tokens that end a chat turn but that configs do not always list as EOS
 * tokens: Gemma's <end_of_turn>, and Llama 3.x's <|eot_id|> and
 * <|eom_id|> (the latter ends a turn that called a tool). They end
 * generation too, as llama.cpp and vLLM's generation configs have it. */
static int add_turn_end_eos(struct lp_model *m, struct lp_err *err)
{
	static const char *const ends[] = {"<end_of_turn>", "<|eot_id|>", "<|eom_id|>"};
	struct lp_model_config *c = &m->cfg;

	for (size_t i = 0; i < sizeof(ends) / sizeof(ends[0]); i++) {
		int32_t id;
		if (i == 0 && c->arch != LP_ARCH_GEMMA3)
			continue;
		/* Llama 3's markers only where both are in the vocabulary */
		if (i > 0 && (lp_tokenizer_find(m->tok, "<|eot_id|>") < 0 ||
		              lp_tokenizer_find(m->tok, "<|eom_id|>") < 0))
			continue;
		id = lp_tokenizer_find(m->tok, ends[i]);
		if (id < 0 || id >= c->vocab_size || lp_model_is_eos(m, id))
			continue;
		if (c->n_eos == LP_MAX_EOS)
			return lp_errf(err, -EINVAL, "more than %d EOS tokens", LP_MAX_EOS);
		c->eos_ids[c->n_eos++] = id;
	}
	return 0;
}

/* ---- GGUF ---- */

static int gguf_dtype(enum lp_fmt_type t, enum lp_dtype *out)
{
	switch (t) {
	case LP_FMT_F32:
		*out = LP_DTYPE_F32;
		return 0;
	case LP_FMT_F16:
		*out = LP_DTYPE_F16;
		return 0;
	case LP_FMT_BF16:
		*out = LP_DTYPE_BF16;
		return 0;
	case LP_FMT_Q8_0:
		*out = LP_DTYPE_Q8_0;
		return 0;
	case LP_FMT_Q4_0:
		*out = LP_DTYPE_Q4_0;
		return 0;
	case LP_FMT_Q4_1:
		*out = LP_DTYPE_Q4_1;
		return 0;
	case LP_FMT_Q5_0:
		*out = LP_DTYPE_Q5_0;
		return 0;
	case LP_FMT_Q5_1:
		*out = LP_DTYPE_Q5_1;
		return 0;
	case LP_FMT_Q4_K:
		*out = LP_DTYPE_Q4_K;
		return 0;
	case LP_FMT_Q5_K:
		*out = LP_DTYPE_Q5_K;
		return 0;
	case LP_FMT_Q6_K:
		*out = LP_DTYPE_Q6_K;
		return 0;
	default:
		return -ENOTSUP;
	}
}

static int gguf_weight(struct lp_gguf *g, const char *name, bool optional, struct raw_weight *w,
                       struct lp_err *err)
{
	const struct lp_fmt_tensor *t = lp_gguf_find_tensor(g, name);

	memset(w, 0, sizeof(*w));
	if (!t) {
		if (optional)
			return 0;
		return lp_errf(err, -EINVAL, "tensor '%s' is missing", name);
	}
	if (t->n_dims > 2)
		return lp_errf(err, -EINVAL, "tensor '%s' has %d dimensions, expected at most 2",
		               name, t->n_dims);
	if (gguf_dtype(t->type, &w->type))
		return lp_errf(err, -ENOTSUP,
		               "tensor '%s' has type %s, which loraplane does not load (supported: "
		               "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)",
		               name, lp_fmt_type_name(t->type));
	w->name = name;
	w->data = t->data;
	/* shape is row-major: [rows, cols] or [cols] */
	w->cols = t->shape[t->n_dims - 1];
	w->rows = t->n_dims == 2 ? t->shape[0] : 1;
	return 0;
}

static int gguf_int(struct lp_gguf *g, const char *key, int *out, bool optional, int dflt,
                    struct lp_err *err)
{
	uint32_t v;
	int rc = lp_gguf_get_u32(g, key, &v, err);

	if (rc == -ENOENT && optional) {
		*out = dflt;
		return 0;
	}
	if (rc)
		return rc;
	if (v > INT_MAX)
		return lp_errf(err, -EINVAL, "'%s' = %u out of range", key, v);
	*out = (int)v;
	return 0;
}

static int gguf_float(struct lp_gguf *g, const char *key, float *out, float dflt,
                      struct lp_err *err)
{
	int rc = lp_gguf_get_f32(g, key, out, err);

	if (rc == -ENOENT) {
		*out = dflt;
		return 0;
	}
	return rc;
}

/* The GGUF metadata key "<arch>.<name>" into key (cap bytes). */
static const char *arch_key(char *key, size_t cap, enum lp_arch arch, const char *name)
{
	snprintf(key, cap, "%s.%s", lp_arch_name(arch), name);
	return key;
}

/* What llama.cpp's gemma3 architecture fixes rather than reads: a sliding
 * window on every layer but each sliding_window_pattern-th (6; the key may
 * also be an array of booleans, true for each sliding layer), the local
 * layers' RoPE base 10000 without scaling, embeddings scaled by
 * sqrt(embedding_length), queries by 1 / sqrt(key_length) (27B, the
 * 62-layer model: 1 / sqrt(embedding_length / head_count)) unless the file
 * has gemma3.attention.scale. The file's norm weights already hold Gemma's
 * 1 + w. */
static int gguf_gemma3_config(struct lp_model_config *c, struct lp_gguf *g, struct lp_err *err)
{
	static const char pattern_key[] = "gemma3.attention.sliding_window_pattern";
	const struct lp_gguf_kv *kv = lp_gguf_find(g, pattern_key), *layers = NULL;
	int window, pattern = 6, rc;

	if ((rc = gguf_int(g, "gemma3.attention.sliding_window", &window, false, 0, err)))
		return rc;
	if (kv && kv->type == LP_GGUF_ARRAY) {
		if ((rc = lp_gguf_get_arr(g, pattern_key, LP_GGUF_BOOL, &layers, err)))
			return rc;
		if (layers->arr_len != (uint64_t)c->n_layers)
			return lp_errf(err, -EINVAL, "'%s' has %llu entries, not %d", pattern_key,
			               (unsigned long long)layers->arr_len, c->n_layers);
	} else if ((rc = gguf_int(g, pattern_key, &pattern, true, 6, err))) {
		return rc;
	}
	if (window < 1 || pattern < 1)
		return lp_errf(err, -EINVAL,
		               "gemma3.attention.sliding_window %d and its pattern %d must be "
		               "positive",
		               window, pattern);
	memset(c->sliding_layers, 0, sizeof(c->sliding_layers));
	c->sliding_window = 0;
	for (int l = 0; l < c->n_layers && l < MAX_LAYERS; l++) {
		bool slides =
		    layers ? ((const uint8_t *)layers->arr_data)[l] != 0 : (l + 1) % pattern != 0;

		if (slides) {
			c->sliding_layers[l / 64] |= (uint64_t)1 << (l % 64);
			c->sliding_window = window;
		}
	}
	c->rope_local_theta = 10000.0f;
	c->qk_norm = true;
	c->post_norms = true;
	c->act = LP_ACT_GELU_TANH;
	c->embed_scale = sqrtf((float)c->dim);
	c->attn_scale = c->n_layers == 62 ? 1.0f / sqrtf((float)(c->dim / c->n_heads))
	                                  : 1.0f / sqrtf((float)c->head_dim);
	if ((rc = gguf_float(g, "gemma3.attention.scale", &c->attn_scale, c->attn_scale, err)))
		return rc;
	if (!(c->attn_scale > 0) || !isfinite(c->attn_scale))
		return lp_errf(err, -EINVAL, "gemma3.attention.scale must be positive");
	return 0;
}

static int load_gguf_config(struct lp_model *m, struct lp_gguf *g, struct lp_err *err)
{
	struct lp_model_config *c = &m->cfg;
	struct lp_gguf_str arch, scaling;
	const struct lp_fmt_tensor *emb;
	int rot_dim, key_len, val_len, vocab, eos, bos, rc;
	bool has_key_len;
	char k[96];

	rc = lp_gguf_get_str(g, "general.architecture", &arch, err);
	if (rc)
		return rc;
	if (arch.len == 5 && !memcmp(arch.s, "llama", 5))
		c->arch = LP_ARCH_LLAMA;
	else if (arch.len == 5 && !memcmp(arch.s, "qwen2", 5))
		c->arch = LP_ARCH_QWEN2;
	else if (arch.len == 5 && !memcmp(arch.s, "qwen3", 5))
		c->arch = LP_ARCH_QWEN3;
	else if (arch.len == 6 && !memcmp(arch.s, "gemma3", 6))
		c->arch = LP_ARCH_GEMMA3;
	else
		return lp_errf(err, -ENOTSUP,
		               "architecture '%.*s' is not supported (llama, qwen2, qwen3, gemma3)",
		               (int)(arch.len > 64 ? 64 : arch.len), arch.s);
#define KEY(name) arch_key(k, sizeof(k), c->arch, name)
	if ((rc = gguf_int(g, KEY("block_count"), &c->n_layers, false, 0, err)) ||
	    (rc = gguf_int(g, KEY("embedding_length"), &c->dim, false, 0, err)) ||
	    (rc = gguf_int(g, KEY("feed_forward_length"), &c->ffn_dim, false, 0, err)) ||
	    (rc = gguf_int(g, KEY("attention.head_count"), &c->n_heads, false, 0, err)) ||
	    (rc = gguf_int(g, KEY("attention.head_count_kv"), &c->n_kv_heads, true, c->n_heads,
	                   err)) ||
	    (rc = gguf_int(g, KEY("context_length"), &c->max_pos, true, 4096, err)) ||
	    (rc =
	         gguf_float(g, KEY("attention.layer_norm_rms_epsilon"), &c->rms_eps, 1e-5f, err)) ||
	    (rc = gguf_float(g, KEY("rope.freq_base"), &c->rope_theta, 10000.0f, err)))
		return rc;
	if (c->n_heads < 1)
		return lp_errf(err, -EINVAL, "'%s' must be positive", KEY("attention.head_count"));
	/* the head size is the key length when the file gives one (Qwen3's is
	 * not embedding / heads), else embedding / heads */
	has_key_len = lp_gguf_find(g, KEY("attention.key_length")) != NULL;
	if (!has_key_len && c->dim % c->n_heads)
		return lp_errf(err, -EINVAL, "embedding length %d is not a multiple of %d heads",
		               c->dim, c->n_heads);
	if ((rc = gguf_int(g, KEY("attention.key_length"), &key_len, true, c->dim / c->n_heads,
	                   err)) ||
	    (rc = gguf_int(g, KEY("rope.dimension_count"), &rot_dim, true, key_len, err)))
		return rc;
	c->head_dim = key_len;
	if ((rc = gguf_int(g, KEY("attention.value_length"), &val_len, true, key_len, err)))
		return rc;
	if (val_len != key_len)
		return lp_errf(err, -ENOTSUP, "value length %d differs from key length %d", val_len,
		               key_len);
	if (rot_dim != key_len)
		return lp_errf(err, -ENOTSUP,
		               "partial rotary embeddings (%d of %d dimensions) are not supported",
		               rot_dim, key_len);
	c->rope_scaling = LP_ROPE_NONE;
	rc = lp_gguf_get_str(g, KEY("rope.scaling.type"), &scaling, err);
	if (rc == 0) {
		if (scaling.len == 6 && !memcmp(scaling.s, "linear", 6)) {
			c->rope_scaling = LP_ROPE_LINEAR;
			rc = gguf_float(g, KEY("rope.scaling.factor"), &c->rope_factor, 1.0f, err);
			if (rc)
				return rc;
		} else if (!(scaling.len == 4 && !memcmp(scaling.s, "none", 4))) {
			return lp_errf(err, -ENOTSUP, "rope scaling type '%.*s' is not supported",
			               (int)(scaling.len > 64 ? 64 : scaling.len), scaling.s);
		}
	} else if (rc != -ENOENT) {
		return rc;
	}
	emb = lp_gguf_find_tensor(g, "token_embd.weight");
	if (!emb || emb->n_dims != 2)
		return lp_errf(err, -EINVAL,
		               "tensor 'token_embd.weight' is missing or not a matrix");
	if (emb->shape[0] > MAX_VOCAB) /* [vocab, dim] */
		return lp_errf(err, -EINVAL, "vocabulary size %llu out of range",
		               (unsigned long long)emb->shape[0]);
	c->vocab_size = (int)emb->shape[0];
	if ((rc = gguf_int(g, KEY("vocab_size"), &vocab, true, c->vocab_size, err)))
		return rc;
	if (vocab != c->vocab_size)
		return lp_errf(err, -EINVAL,
		               "%s %d differs from the %d rows of 'token_embd.weight'",
		               KEY("vocab_size"), vocab, c->vocab_size);
#undef KEY
	c->tied_embeddings = lp_gguf_find_tensor(g, "output.weight") == NULL;
	c->attn_bias = lp_gguf_find_tensor(g, "blk.0.attn_q.bias") != NULL;
	c->attn_out_bias = lp_gguf_find_tensor(g, "blk.0.attn_output.bias") != NULL;
	c->qk_norm = c->arch == LP_ARCH_QWEN3;
	if (c->arch == LP_ARCH_GEMMA3 && (rc = gguf_gemma3_config(c, g, err)))
		return rc;
	if (c->arch == LP_ARCH_QWEN2 && !c->attn_bias)
		return lp_errf(err, -EINVAL,
		               "tensor 'blk.0.attn_q.bias' is missing (qwen2 has "
		               "biases on q, k and v)");
	if ((rc = gguf_int(g, "tokenizer.ggml.bos_token_id", &bos, true, -1, err)) ||
	    (rc = gguf_int(g, "tokenizer.ggml.eos_token_id", &eos, true, -1, err)))
		return rc;
	c->bos_id = bos;
	c->n_eos = 0;
	if (eos >= 0)
		c->eos_ids[c->n_eos++] = eos;
	return 0;
}

static int load_gguf(struct lp_model *m, const char *path, struct lp_err *err)
{
	struct lp_model_config *c = &m->cfg;
	struct raw_weight w, freqs;
	char name[96];
	int rc, kv_dim, q_dim;

	rc = lp_gguf_open(&m->res->gguf, path, err);
	if (rc)
		return rc;
	struct lp_gguf *g = m->res->gguf;
	rc = load_gguf_config(m, g, err);
	if (!rc)
		rc = check_config(c, err);
	if (!rc)
		rc = alloc_layers(m, err);
	if (rc)
		return rc;
	kv_dim = c->n_kv_heads * c->head_dim;
	q_dim = c->n_heads * c->head_dim;

	if ((rc = gguf_weight(g, "token_embd.weight", false, &w, err)) ||
	    (rc = load_matrix(m, &w, c->vocab_size, c->dim, &m->tok_embd, err)) ||
	    (rc = gguf_weight(g, "output_norm.weight", false, &w, err)) ||
	    (rc = load_vector(m, &w, c->dim, &m->out_norm, err)))
		return rc;
	if (c->tied_embeddings) {
		m->output = m->tok_embd;
	} else if ((rc = gguf_weight(g, "output.weight", false, &w, err)) ||
	           (rc = load_matrix(m, &w, c->vocab_size, c->dim, &m->output, err))) {
		return rc;
	}
	if (c->arch == LP_ARCH_LLAMA && c->attn_bias)
		/* llama.cpp permutes the Q and K biases of llama like their rows */
		return lp_errf(err, -ENOTSUP,
		               "attention biases in GGUF files of the llama architecture are not "
		               "supported");
	for (int l = 0; l < c->n_layers; l++) {
		struct lp_layer_weights *L = &m->layers[l];
		/* only llama's Q and K rows are permuted; qwen2 and qwen3 use
		 * llama.cpp's NEOX rope, which has the HF layout */
		bool permuted = c->arch == LP_ARCH_LLAMA;
#define W(suffix, optional)                                                                        \
	(snprintf(name, sizeof(name), "blk.%d.%s", l, suffix),                                     \
	 gguf_weight(g, name, optional, &w, err))
		if ((rc = W("attn_norm.weight", false)) ||
		    (rc = load_vector(m, &w, c->dim, &L->attn_norm, err)) ||
		    (rc = W("attn_q.weight", false)) ||
		    (rc = permuted ? load_unpermuted(m, &w, c->n_heads, c->dim, &L->wq, err)
		                   : load_matrix(m, &w, q_dim, c->dim, &L->wq, err)) ||
		    (rc = W("attn_k.weight", false)) ||
		    (rc = permuted ? load_unpermuted(m, &w, c->n_kv_heads, c->dim, &L->wk, err)
		                   : load_matrix(m, &w, kv_dim, c->dim, &L->wk, err)) ||
		    (rc = W("attn_v.weight", false)) ||
		    (rc = load_matrix(m, &w, kv_dim, c->dim, &L->wv, err)) ||
		    (rc = W("attn_output.weight", false)) ||
		    (rc = load_matrix(m, &w, c->dim, q_dim, &L->wo, err)) ||
		    (rc = W("ffn_norm.weight", false)) ||
		    (rc = load_vector(m, &w, c->dim, &L->ffn_norm, err)) ||
		    (rc = W("ffn_gate.weight", false)) ||
		    (rc = load_matrix(m, &w, c->ffn_dim, c->dim, &L->w_gate, err)) ||
		    (rc = W("ffn_up.weight", false)) ||
		    (rc = load_matrix(m, &w, c->ffn_dim, c->dim, &L->w_up, err)) ||
		    (rc = W("ffn_down.weight", false)) ||
		    (rc = load_matrix(m, &w, c->dim, c->ffn_dim, &L->w_down, err)))
			return rc;
		if (c->attn_bias && ((rc = W("attn_q.bias", false)) ||
		                     (rc = load_vector(m, &w, q_dim, &L->bq, err)) ||
		                     (rc = W("attn_k.bias", false)) ||
		                     (rc = load_vector(m, &w, kv_dim, &L->bk, err)) ||
		                     (rc = W("attn_v.bias", false)) ||
		                     (rc = load_vector(m, &w, kv_dim, &L->bv, err))))
			return rc;
		if (c->attn_out_bias && ((rc = W("attn_output.bias", false)) ||
		                         (rc = load_vector(m, &w, c->dim, &L->bo, err))))
			return rc;
		if (c->qk_norm && ((rc = W("attn_q_norm.weight", false)) ||
		                   (rc = load_vector(m, &w, c->head_dim, &L->q_norm, err)) ||
		                   (rc = W("attn_k_norm.weight", false)) ||
		                   (rc = load_vector(m, &w, c->head_dim, &L->k_norm, err))))
			return rc;
		if (c->post_norms && ((rc = W("post_attention_norm.weight", false)) ||
		                      (rc = load_vector(m, &w, c->dim, &L->post_attn_norm, err)) ||
		                      (rc = W("post_ffw_norm.weight", false)) ||
		                      (rc = load_vector(m, &w, c->dim, &L->post_ffn_norm, err))))
			return rc;
#undef W
	}
	if ((rc = gguf_weight(g, "rope_freqs.weight", true, &freqs, err)))
		return rc;
	if (freqs.data) {
		float *div;
		if ((rc = check_shape(&freqs, 1, c->head_dim / 2, err)))
			return rc;
		div = malloc((size_t)(c->head_dim / 2) * sizeof(float));
		if (!div)
			return lp_errf(err, -ENOMEM, "out of memory");
		lp_dequantize_row(freqs.type, freqs.data, div, c->head_dim / 2);
		rc = make_inv_freq(m, div, err);
		free(div);
		if (rc)
			return rc;
	} else if ((rc = make_inv_freq(m, NULL, err))) {
		return rc;
	}
	if ((rc = lp_tokenizer_from_gguf(&m->tok, g, err)))
		return rc;
	return add_turn_end_eos(m, err);
}

/* ---- HF directory ---- */

static int json_int(json_t *o, const char *key, int *out, bool optional, int dflt,
                    struct lp_err *err)
{
	json_t *v = json_object_get(o, key);

	if (!v || json_is_null(v)) {
		if (!optional)
			return lp_errf(err, -EINVAL, "config.json: '%s' is missing", key);
		*out = dflt;
		return 0;
	}
	if (!json_is_integer(v) || json_integer_value(v) < INT_MIN ||
	    json_integer_value(v) > INT_MAX)
		return lp_errf(err, -EINVAL, "config.json: '%s' must be an integer", key);
	*out = (int)json_integer_value(v);
	return 0;
}

static int json_float(json_t *o, const char *key, float *out, float dflt, struct lp_err *err)
{
	json_t *v = json_object_get(o, key);

	if (!v || json_is_null(v)) {
		*out = dflt;
		return 0;
	}
	if (!json_is_number(v))
		return lp_errf(err, -EINVAL, "config.json: '%s' must be a number", key);
	*out = (float)json_number_value(v);
	return 0;
}

static int hf_rope_scaling(struct lp_model_config *c, json_t *rs, struct lp_err *err)
{
	const char *type;
	int rc;

	c->rope_scaling = LP_ROPE_NONE;
	if (!rs || json_is_null(rs))
		return 0;
	if (!json_is_object(rs))
		return lp_errf(err, -EINVAL, "config.json: 'rope_scaling' must be an object");
	type = json_string_value(json_object_get(rs, "rope_type"));
	if (!type)
		type = json_string_value(json_object_get(rs, "type"));
	if (!type)
		return lp_errf(err, -EINVAL, "config.json: 'rope_scaling' has no 'rope_type'");
	if (!strcmp(type, "default"))
		return 0;
	if ((rc = json_float(rs, "factor", &c->rope_factor, 0, err)))
		return rc;
	if (!strcmp(type, "linear")) {
		c->rope_scaling = LP_ROPE_LINEAR;
		return 0;
	}
	if (!strcmp(type, "llama3")) {
		c->rope_scaling = LP_ROPE_LLAMA3;
		if ((rc = json_float(rs, "low_freq_factor", &c->rope_low_freq_factor, 0, err)) ||
		    (rc = json_float(rs, "high_freq_factor", &c->rope_high_freq_factor, 0, err)) ||
		    (rc = json_int(rs, "original_max_position_embeddings", &c->rope_orig_max_pos,
		                   false, 0, err)))
			return rc;
		return 0;
	}
	return lp_errf(err, -ENOTSUP,
	               "config.json: rope scaling type '%s' is not supported (supported: default, "
	               "linear, llama3)",
	               type);
}

/* rope_theta and the scaling: hub configs write "rope_theta" and
 * "rope_scaling"; transformers 5 writes both into "rope_parameters". */
static int hf_rope(struct lp_model_config *c, json_t *root, struct lp_err *err)
{
	json_t *rp = json_object_get(root, "rope_parameters");
	int rc;

	if ((rc = json_float(root, "rope_theta", &c->rope_theta, 10000.0f, err)))
		return rc;
	if (!rp || json_is_null(rp))
		return hf_rope_scaling(c, json_object_get(root, "rope_scaling"), err);
	if (!json_is_object(rp))
		return lp_errf(err, -EINVAL, "config.json: 'rope_parameters' must be an object");
	if ((rc = json_float(rp, "rope_theta", &c->rope_theta, c->rope_theta, err)))
		return rc;
	return hf_rope_scaling(c, rp, err);
}

/* Which layers slide and how far, as transformers reads the config
 * (mistral: "sliding_window", 4096 when absent, null for none, applies to
 * every layer; qwen2/qwen3: only with "use_sliding_window", the layers
 * "layer_types" marks "sliding_attention", or without it those from
 * "max_window_layers" on; llama: never). The attention of those layers is
 * windowed (lp_model_layer_window). */
static int hf_sliding_window(struct lp_model_config *c, json_t *root, const char *type,
                             struct lp_err *err)
{
	json_t *v = json_object_get(root, "sliding_window"), *types;
	int window = 4096, from_layer = 0, rc;

	memset(c->sliding_layers, 0, sizeof(c->sliding_layers));
	c->sliding_window = 0;
	if (c->n_layers < 1 || c->n_layers > MAX_LAYERS)
		return 0; /* check_config refuses it */
	if (v && !json_is_null(v) &&
	    (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > INT_MAX))
		return lp_errf(err, -EINVAL,
		               "config.json: 'sliding_window' must be a positive integer or null");
	if (v)
		window = json_is_null(v) ? 0 : (int)json_integer_value(v);
	if (!strcmp(type, "llama") || window == 0)
		return 0;
	if (!strcmp(type, "mistral")) {
		for (int l = 0; l < c->n_layers; l++)
			c->sliding_layers[l / 64] |= (uint64_t)1 << (l % 64);
		c->sliding_window = window;
		return 0;
	}
	if (!json_is_true(json_object_get(root, "use_sliding_window")))
		return 0;
	types = json_object_get(root, "layer_types");
	if (types && !json_is_null(types)) {
		if (!json_is_array(types) || json_array_size(types) != (size_t)c->n_layers)
			return lp_errf(err, -EINVAL,
			               "config.json: 'layer_types' must list %d layer types",
			               c->n_layers);
		for (int l = 0; l < c->n_layers; l++) {
			const char *t = json_string_value(json_array_get(types, (size_t)l));

			if (t && !strcmp(t, "sliding_attention"))
				c->sliding_layers[l / 64] |= (uint64_t)1 << (l % 64);
			else if (!t || strcmp(t, "full_attention"))
				return lp_errf(err, -ENOTSUP,
				               "config.json: layer type '%s' of layer %d is not "
				               "supported (full_attention, sliding_attention)",
				               t ? t : "(not a string)", l);
		}
	} else {
		if ((rc = json_int(root, "max_window_layers", &from_layer, true, 28, err)))
			return rc;
		for (int l = from_layer > 0 ? from_layer : 0; l < c->n_layers; l++)
			c->sliding_layers[l / 64] |= (uint64_t)1 << (l % 64);
	}
	for (int l = 0; l < c->n_layers; l++)
		if (c->sliding_layers[l / 64] >> (l % 64) & 1)
			c->sliding_window = window;
	return 0;
}

/* Gemma 3's RoPE: the global layers' base and scaling, the local
 * (sliding) layers' base without scaling. transformers 5 writes
 * "rope_parameters": {"full_attention": {...}, "sliding_attention": {...}};
 * hub configs "rope_theta", "rope_scaling" (global) and
 * "rope_local_base_freq". */
static int hf_gemma3_rope(struct lp_model_config *c, json_t *root, struct lp_err *err)
{
	json_t *rp = json_object_get(root, "rope_parameters"), *full, *local;
	const char *local_type;
	int rc;

	if ((rc = json_float(root, "rope_theta", &c->rope_theta, 1000000.0f, err)) ||
	    (rc = json_float(root, "rope_local_base_freq", &c->rope_local_theta, 10000.0f, err)))
		return rc;
	if (!rp || json_is_null(rp))
		return hf_rope_scaling(c, json_object_get(root, "rope_scaling"), err);
	full = json_object_get(rp, "full_attention");
	local = json_object_get(rp, "sliding_attention");
	if (!json_is_object(rp) || (full && !json_is_object(full)) ||
	    (local && !json_is_object(local)))
		return lp_errf(err, -EINVAL,
		               "config.json: 'rope_parameters' must be an object (of objects per "
		               "layer type)");
	if (!full && !local) /* one set for all layer types: the global one */
		full = rp;
	if (full && ((rc = json_float(full, "rope_theta", &c->rope_theta, c->rope_theta, err)) ||
	             (rc = hf_rope_scaling(c, full, err))))
		return rc;
	if (local) {
		local_type = json_string_value(json_object_get(local, "rope_type"));
		if (local_type && strcmp(local_type, "default"))
			return lp_errf(err, -ENOTSUP,
			               "config.json: rope type '%s' of the sliding layers is not "
			               "supported (default)",
			               local_type);
		if ((rc = json_float(local, "rope_theta", &c->rope_local_theta, c->rope_local_theta,
		                     err)))
			return rc;
	}
	return 0;
}

/* Gemma 3's attention: sliding_window (4096 when absent), the sliding
 * layers from "layer_types" or every layer but each
 * sliding_window_pattern-th (6), the query scale query_pre_attn_scalar^-0.5
 * (256), no logit soft-capping, causal. */
static int hf_gemma3_attention(struct lp_model_config *c, json_t *root, struct lp_err *err)
{
	json_t *types = json_object_get(root, "layer_types"), *v;
	int window, pattern, scalar, rc;
	static const char *const off[] = {"final_logit_softcapping", "attn_logit_softcapping",
	                                  "use_bidirectional_attention"};

	for (size_t i = 0; i < sizeof(off) / sizeof(off[0]); i++) {
		v = json_object_get(root, off[i]);
		if (v && !json_is_null(v) && !json_is_false(v))
			return lp_errf(err, -ENOTSUP, "config.json: '%s' is not supported", off[i]);
	}
	if ((rc = json_int(root, "sliding_window", &window, true, 4096, err)) ||
	    (rc = json_int(root, "sliding_window_pattern", &pattern, true, 6, err)) ||
	    (rc = json_int(root, "query_pre_attn_scalar", &scalar, true, 256, err)))
		return rc;
	if (window < 1)
		return lp_errf(err, -EINVAL, "config.json: 'sliding_window' must be positive");
	if (pattern < 1)
		return lp_errf(err, -EINVAL,
		               "config.json: 'sliding_window_pattern' must be positive");
	if (scalar < 1)
		return lp_errf(err, -EINVAL,
		               "config.json: 'query_pre_attn_scalar' must be positive");
	c->attn_scale = (float)pow((double)scalar, -0.5);
	memset(c->sliding_layers, 0, sizeof(c->sliding_layers));
	c->sliding_window = 0;
	if (c->n_layers < 1 || c->n_layers > MAX_LAYERS)
		return 0; /* check_config refuses it */
	if (types && !json_is_null(types) &&
	    (!json_is_array(types) || json_array_size(types) != (size_t)c->n_layers))
		return lp_errf(err, -EINVAL, "config.json: 'layer_types' must list %d layer types",
		               c->n_layers);
	for (int l = 0; l < c->n_layers; l++) {
		bool slides = (l + 1) % pattern != 0;

		if (types && !json_is_null(types)) {
			const char *t = json_string_value(json_array_get(types, (size_t)l));

			if (!t || (strcmp(t, "sliding_attention") && strcmp(t, "full_attention")))
				return lp_errf(err, -ENOTSUP,
				               "config.json: layer type '%s' of layer %d is not "
				               "supported (full_attention, sliding_attention)",
				               t ? t : "(not a string)", l);
			slides = !strcmp(t, "sliding_attention");
		}
		if (slides) {
			c->sliding_layers[l / 64] |= (uint64_t)1 << (l % 64);
			c->sliding_window = window;
		}
	}
	return 0;
}

static int load_hf_config(struct lp_model *m, const char *dir, struct lp_err *err)
{
	struct lp_model_config *c = &m->cfg;
	char path[4096];
	struct lp_buf b;
	json_error_t jerr;
	json_t *root = NULL, *v;
	const char *type, *act;
	bool qwen, gemma;
	int rc;

	snprintf(path, sizeof(path), "%s/config.json", dir);
	lp_buf_init(&b, CONFIG_MAX_BYTES);
	rc = lp_buf_read_file(&b, path, CONFIG_MAX_BYTES, err);
	if (rc)
		goto out;
	root = json_loadb(b.data, b.len, 0, &jerr);
	if (!root || !json_is_object(root)) {
		rc = lp_errf(err, -EINVAL, "'%s': invalid JSON: %s (line %d)", path,
		             root ? "not an object" : jerr.text, jerr.line);
		goto out;
	}
	type = json_string_value(json_object_get(root, "model_type"));
	if (type && (!strcmp(type, "llama") || !strcmp(type, "mistral"))) {
		c->arch = LP_ARCH_LLAMA;
	} else if (type && !strcmp(type, "qwen2")) {
		c->arch = LP_ARCH_QWEN2;
	} else if (type && !strcmp(type, "qwen3")) {
		c->arch = LP_ARCH_QWEN3;
	} else if (type && !strcmp(type, "gemma3_text")) {
		c->arch = LP_ARCH_GEMMA3;
	} else if (type && !strcmp(type, "gemma3")) {
		rc =
		    lp_errf(err, -ENOTSUP,
		            "'%s': model_type 'gemma3' (text and vision) is not supported: use the "
		            "text-only model (model_type 'gemma3_text', Gemma3ForCausalLM)",
		            path);
		goto out;
	} else {
		rc =
		    lp_errf(err, -ENOTSUP,
		            "'%s': model_type '%s' is not supported (llama, mistral, qwen2, qwen3, "
		            "gemma3_text)",
		            path, type ? type : "(missing)");
		goto out;
	}
	gemma = c->arch == LP_ARCH_GEMMA3;
	/* missing keys take the defaults of transformers' config classes */
	qwen = c->arch == LP_ARCH_QWEN2 || c->arch == LP_ARCH_QWEN3;
	if ((rc = json_int(root, "num_hidden_layers", &c->n_layers, false, 0, err)) ||
	    (rc = json_int(root, "hidden_size", &c->dim, false, 0, err)) ||
	    (rc = json_int(root, "intermediate_size", &c->ffn_dim, false, 0, err)) ||
	    (rc = json_int(root, "num_attention_heads", &c->n_heads, false, 0, err)) ||
	    (rc = json_int(root, "num_key_value_heads", &c->n_kv_heads, true, c->n_heads, err)) ||
	    (rc = json_int(root, "vocab_size", &c->vocab_size, false, 0, err)) ||
	    (rc = json_int(root, "max_position_embeddings", &c->max_pos, true,
	                   gemma  ? 131072
	                   : qwen ? 32768
	                          : 4096,
	                   err)) ||
	    (rc = json_float(root, "rms_norm_eps", &c->rms_eps, 1e-6f, err)) ||
	    (rc = gemma ? hf_gemma3_rope(c, root, err) : hf_rope(c, root, err)))
		goto out_prefix;
	if (c->n_heads < 1) {
		rc = lp_errf(err, -EINVAL, "num_attention_heads must be positive");
		goto out_prefix;
	}
	if ((rc = json_int(root, "head_dim", &c->head_dim, true,
	                   c->arch == LP_ARCH_QWEN3 ? 128
	                   : gemma                  ? 256
	                                            : c->dim / c->n_heads,
	                   err)))
		goto out_prefix;
	if (gemma) {
		/* Gemma3TextConfig reads hidden_activation */
		act = json_string_value(json_object_get(root, "hidden_activation"));
		if (!act)
			act = json_string_value(json_object_get(root, "hidden_act"));
		if (act && strcmp(act, "gelu_pytorch_tanh")) {
			rc = lp_errf(err, -ENOTSUP,
			             "hidden_activation '%s' is not supported (gelu_pytorch_tanh)",
			             act);
			goto out_prefix;
		}
		c->act = LP_ACT_GELU_TANH;
	} else {
		act = json_string_value(json_object_get(root, "hidden_act"));
		if (act && strcmp(act, "silu")) {
			rc = lp_errf(err, -ENOTSUP, "hidden_act '%s' is not supported (silu)", act);
			goto out_prefix;
		}
		c->act = LP_ACT_SILU;
	}
	if (json_is_true(json_object_get(root, "mlp_bias"))) {
		rc = lp_errf(err, -ENOTSUP, "'mlp_bias' is not supported");
		goto out_prefix;
	}
	/* Gemma3TextConfig ties by default */
	v = json_object_get(root, "tie_word_embeddings");
	c->tied_embeddings = json_is_true(v) || (gemma && !v);
	if (c->arch == LP_ARCH_QWEN2) {
		/* Qwen2's q, k and v always have a bias, its o_proj never */
		c->attn_bias = true;
		c->attn_out_bias = false;
	} else {
		/* attention_bias gives q, k, v and o_proj a bias */
		c->attn_bias = json_is_true(json_object_get(root, "attention_bias"));
		c->attn_out_bias = c->attn_bias;
	}
	c->qk_norm = c->arch == LP_ARCH_QWEN3 || gemma;
	c->post_norms = gemma;
	c->embed_scale = gemma ? (float)sqrt((double)c->dim) : 0;
	if ((rc =
	         gemma ? hf_gemma3_attention(c, root, err) : hf_sliding_window(c, root, type, err)))
		goto out_prefix;
	if ((rc = json_int(root, "bos_token_id", &c->bos_id, true, gemma ? 2 : -1, err)))
		goto out_prefix;
	c->n_eos = 0;
	v = json_object_get(root, "eos_token_id");
	if (gemma && !v)
		c->eos_ids[c->n_eos++] = 1;
	if (json_is_integer(v)) {
		c->eos_ids[c->n_eos++] = (int32_t)json_integer_value(v);
	} else if (json_is_array(v)) {
		size_t i;
		json_t *e;
		json_array_foreach(v, i, e)
		{
			if (!json_is_integer(e) || c->n_eos == LP_MAX_EOS) {
				rc = lp_errf(err, -EINVAL,
				             "'eos_token_id' must hold at most %d integers",
				             LP_MAX_EOS);
				goto out_prefix;
			}
			c->eos_ids[c->n_eos++] = (int32_t)json_integer_value(e);
		}
	}
	rc = 0;
	goto out;
out_prefix:
	lp_err_prefix(err, "'%s'", path);
out:
	json_decref(root);
	lp_buf_release(&b);
	return rc;
}

static int st_weight(struct lp_safetensors *st, const char *name, struct raw_weight *w,
                     struct lp_err *err)
{
	const struct lp_fmt_tensor *t = lp_safetensors_find(st, name);

	memset(w, 0, sizeof(*w));
	if (!t)
		return lp_errf(err, -EINVAL, "tensor '%s' is missing", name);
	switch (t->type) {
	case LP_FMT_F32:
		w->type = LP_DTYPE_F32;
		break;
	case LP_FMT_F16:
		w->type = LP_DTYPE_F16;
		break;
	case LP_FMT_BF16:
		w->type = LP_DTYPE_BF16;
		break;
	default:
		return lp_errf(err, -ENOTSUP,
		               "tensor '%s' in '%s' has dtype %s (supported: F32, F16, BF16)", name,
		               t->file, lp_fmt_type_name(t->type));
	}
	if (t->n_dims < 1 || t->n_dims > 2)
		return lp_errf(err, -EINVAL, "tensor '%s' has %d dimensions, expected 1 or 2", name,
		               t->n_dims);
	w->name = t->name;
	w->data = t->data;
	w->rows = t->n_dims == 2 ? t->shape[0] : 1;
	w->cols = t->shape[t->n_dims - 1];
	return 0;
}

static int load_hf_tokenizer(struct lp_model *m, const char *dir, struct lp_err *err)
{
	char path[4096];
	struct lp_buf tj, tc;
	int rc;

	lp_buf_init(&tj, TOKENIZER_MAX_BYTES);
	lp_buf_init(&tc, CONFIG_MAX_BYTES);
	snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
	rc = lp_buf_read_file(&tj, path, TOKENIZER_MAX_BYTES, err);
	if (rc)
		goto out;
	snprintf(path, sizeof(path), "%s/tokenizer_config.json", dir);
	if (lp_buf_read_file(&tc, path, CONFIG_MAX_BYTES, NULL))
		lp_buf_release(&tc); /* optional */
	rc = lp_tokenizer_from_json(&m->tok, tj.data, tj.len, tc.data, tc.len, err);
	if (rc)
		lp_err_prefix(err, "'%s/tokenizer.json'", dir);
out:
	lp_buf_release(&tj);
	lp_buf_release(&tc);
	return rc;
}

static int load_hf(struct lp_model *m, const char *dir, struct lp_err *err)
{
	struct lp_model_config *c = &m->cfg;
	struct raw_weight w;
	char name[128];
	int rc, kv_dim, q_dim;
	int (*norm)(struct lp_model *, const struct raw_weight *, int64_t, struct lp_tensor *,
	            struct lp_err *);

	rc = load_hf_config(m, dir, err);
	if (!rc)
		rc = check_config(c, err);
	if (!rc)
		rc = alloc_layers(m, err);
	if (rc)
		return rc;
	rc = lp_safetensors_open_dir(&m->res->st, dir, err);
	if (rc)
		return rc;
	struct lp_safetensors *st = m->res->st;
	kv_dim = c->n_kv_heads * c->head_dim;
	q_dim = c->n_heads * c->head_dim;
	/* Gemma's RMSNorm weights w scale by 1 + w */
	norm = c->arch == LP_ARCH_GEMMA3 ? load_norm_plus1 : load_vector;
	if ((rc = st_weight(st, "model.embed_tokens.weight", &w, err)) ||
	    (rc = load_matrix(m, &w, c->vocab_size, c->dim, &m->tok_embd, err)) ||
	    (rc = st_weight(st, "model.norm.weight", &w, err)) ||
	    (rc = norm(m, &w, c->dim, &m->out_norm, err)))
		return rc;
	if (c->tied_embeddings && !lp_safetensors_find(st, "lm_head.weight")) {
		m->output = m->tok_embd;
	} else if ((rc = st_weight(st, "lm_head.weight", &w, err)) ||
	           (rc = load_matrix(m, &w, c->vocab_size, c->dim, &m->output, err))) {
		return rc;
	}
	for (int l = 0; l < c->n_layers; l++) {
		struct lp_layer_weights *L = &m->layers[l];
#define W(suffix)                                                                                  \
	(snprintf(name, sizeof(name), "model.layers.%d.%s", l, suffix),                            \
	 st_weight(st, name, &w, err))
		if ((rc = W("input_layernorm.weight")) ||
		    (rc = norm(m, &w, c->dim, &L->attn_norm, err)) ||
		    (rc = W("self_attn.q_proj.weight")) ||
		    (rc = load_matrix(m, &w, q_dim, c->dim, &L->wq, err)) ||
		    (rc = W("self_attn.k_proj.weight")) ||
		    (rc = load_matrix(m, &w, kv_dim, c->dim, &L->wk, err)) ||
		    (rc = W("self_attn.v_proj.weight")) ||
		    (rc = load_matrix(m, &w, kv_dim, c->dim, &L->wv, err)) ||
		    (rc = W("self_attn.o_proj.weight")) ||
		    (rc = load_matrix(m, &w, c->dim, q_dim, &L->wo, err)) ||
		    (rc = W(c->post_norms ? "pre_feedforward_layernorm.weight"
		                          : "post_attention_layernorm.weight")) ||
		    (rc = norm(m, &w, c->dim, &L->ffn_norm, err)) ||
		    (rc = W("mlp.gate_proj.weight")) ||
		    (rc = load_matrix(m, &w, c->ffn_dim, c->dim, &L->w_gate, err)) ||
		    (rc = W("mlp.up_proj.weight")) ||
		    (rc = load_matrix(m, &w, c->ffn_dim, c->dim, &L->w_up, err)) ||
		    (rc = W("mlp.down_proj.weight")) ||
		    (rc = load_matrix(m, &w, c->dim, c->ffn_dim, &L->w_down, err)))
			return rc;
		if (c->attn_bias && ((rc = W("self_attn.q_proj.bias")) ||
		                     (rc = load_vector(m, &w, q_dim, &L->bq, err)) ||
		                     (rc = W("self_attn.k_proj.bias")) ||
		                     (rc = load_vector(m, &w, kv_dim, &L->bk, err)) ||
		                     (rc = W("self_attn.v_proj.bias")) ||
		                     (rc = load_vector(m, &w, kv_dim, &L->bv, err))))
			return rc;
		if (c->attn_out_bias && ((rc = W("self_attn.o_proj.bias")) ||
		                         (rc = load_vector(m, &w, c->dim, &L->bo, err))))
			return rc;
		if (c->qk_norm && ((rc = W("self_attn.q_norm.weight")) ||
		                   (rc = norm(m, &w, c->head_dim, &L->q_norm, err)) ||
		                   (rc = W("self_attn.k_norm.weight")) ||
		                   (rc = norm(m, &w, c->head_dim, &L->k_norm, err))))
			return rc;
		/* Gemma 3: post_attention_layernorm normalizes the attention's
		 * output (pre_feedforward_layernorm is the MLP's input norm) */
		if (c->post_norms && ((rc = W("post_attention_layernorm.weight")) ||
		                      (rc = norm(m, &w, c->dim, &L->post_attn_norm, err)) ||
		                      (rc = W("post_feedforward_layernorm.weight")) ||
		                      (rc = norm(m, &w, c->dim, &L->post_ffn_norm, err))))
			return rc;
#undef W
	}
	if ((rc = make_inv_freq(m, NULL, err)) || (rc = load_hf_tokenizer(m, dir, err)))
		return rc;
	return add_turn_end_eos(m, err);
}

static char *path_stem(const char *path)
{
	size_t len = strlen(path);
	const char *base;

	while (len > 1 && path[len - 1] == '/')
		len--;
	base = path;
	for (size_t i = 0; i < len; i++)
		if (path[i] == '/' && i + 1 < len)
			base = path + i + 1;
	len -= (size_t)(base - path);
	if (len > 5 && !memcmp(base + len - 5, ".gguf", 5))
		len -= 5;
	return strndup(base, len);
}

/* A directory without config.json that holds one .gguf file (what
 * loraplane-agent fetch leaves for a single-file model) stands for that
 * file. Returns 1 with its path in out (cap bytes), 0 to load dir as an
 * HF directory, -EINVAL when it holds several .gguf files (err lists
 * them). */
static int dir_gguf(const char *dir, char *out, size_t cap, struct lp_err *err)
{
	char path[PATH_MAX], list[400] = "";
	struct dirent *e;
	struct stat st;
	size_t used = 0;
	int n = 0;
	DIR *d;

	if (snprintf(path, sizeof(path), "%s/config.json", dir) >= (int)sizeof(path) ||
	    stat(path, &st) == 0 || !(d = opendir(dir)))
		return 0;
	while ((e = readdir(d))) {
		size_t len = strlen(e->d_name);
		if (e->d_name[0] == '.' || len <= 5 || strcasecmp(e->d_name + len - 5, ".gguf") ||
		    snprintf(path, sizeof(path), "%s/%s", dir, e->d_name) >= (int)sizeof(path) ||
		    stat(path, &st) < 0 || !S_ISREG(st.st_mode))
			continue;
		if (n == 0 && snprintf(out, cap, "%s", path) >= (int)cap)
			out[0] = '\0';
		if (used < sizeof(list))
			used += (size_t)snprintf(list + used, sizeof(list) - used, "%s'%s'",
			                         n ? ", " : "", e->d_name);
		n++;
	}
	closedir(d);
	if (n > 1)
		return lp_errf(err, -EINVAL,
		               "model directory '%s' has no config.json and %d .gguf files (%s); "
		               "give one of them with --model",
		               dir, n, list);
	if (n == 1 && !out[0])
		return lp_errf(err, -ENAMETOOLONG, "path of the .gguf file in '%s' is too long",
		               dir);
	return n;
}

int lp_model_load(struct lp_model **out, const char *path, struct lp_backend *be,
                  struct lp_err *err)
{
	char gguf[PATH_MAX];
	struct lp_model *m;
	struct stat st;
	bool is_dir;
	int rc;

	*out = NULL;
	if (stat(path, &st) < 0)
		return lp_errf(err, -errno, "cannot open model '%s': %s", path, strerror(errno));
	is_dir = S_ISDIR(st.st_mode);
	if (is_dir && (rc = dir_gguf(path, gguf, sizeof(gguf), err)) != 0) {
		if (rc < 0)
			return rc;
		is_dir = false;
	}
	m = calloc(1, sizeof(*m));
	if (!m)
		return lp_errf(err, -ENOMEM, "out of memory");
	m->be = be;
	m->res = calloc(1, sizeof(*m->res));
	m->path = strdup(path);
	m->name = path_stem(path);
	if (!m->res || !m->path || !m->name) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto fail;
	}
	rc = is_dir ? load_hf(m, path, err) : load_gguf(m, S_ISDIR(st.st_mode) ? gguf : path, err);
	if (rc)
		goto fail_prefix;
	if (lp_tokenizer_vocab_size(m->tok) > m->cfg.vocab_size) {
		rc = lp_errf(err, -EINVAL, "the tokenizer has %d tokens but the model only %d",
		             lp_tokenizer_vocab_size(m->tok), m->cfg.vocab_size);
		goto fail_prefix;
	}
	if (m->cfg.n_eos == 0 && lp_tokenizer_eos(m->tok) >= 0)
		m->cfg.eos_ids[m->cfg.n_eos++] = lp_tokenizer_eos(m->tok);
	*out = m;
	return 0;
fail_prefix:
	/* errors from the format readers already name the file */
	if (!strstr(err->msg, path))
		lp_err_prefix(err, "model '%s'", path);
fail:
	lp_model_free(m);
	return rc;
}

/* ---- random weights ---- */

/* n f16 values uniform in [-scale, scale), from a splitmix64 stream. */
static void random_f16(uint16_t *out, size_t n, float scale, uint64_t *state)
{
	for (size_t i = 0; i < n; i += 4) {
		uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
		z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
		z ^= z >> 31;
		for (size_t j = 0; j < 4 && i + j < n; j++) {
			float u = (float)((z >> (16 * j)) & 0xffff) / 32768.0f - 1.0f;
			out[i + j] = lp_f32_to_f16(u * scale);
		}
	}
}

/* A random f16 matrix (or an f32 vector of ones) handed to the backend;
 * the host copy stays only where the backend aliases it. */
static int random_weight(struct lp_model *m, bool keep_host, int64_t rows, int64_t cols,
                         bool vector, uint64_t *state, struct lp_tensor *t, struct lp_err *err)
{
	size_t n = (size_t)rows * (size_t)cols;
	void *host = malloc(n * (vector ? sizeof(float) : sizeof(uint16_t)));
	int rc;

	if (!host)
		return lp_errf(err, -ENOMEM, "out of memory for a [%lld, %lld] weight",
		               (long long)rows, (long long)cols);
	if (vector) {
		for (size_t i = 0; i < n; i++)
			((float *)host)[i] = 1.0f;
		rc = place_tensor(m, host, LP_DTYPE_F32, rows, cols, t, err);
	} else {
		random_f16(host, n, 1.0f / sqrtf((float)cols), state);
		rc = place_weight(m, host, LP_DTYPE_F16, rows, cols, t, err);
	}
	if (rc || !keep_host) {
		free(host);
		return rc;
	}
	return res_push_host(m->res, host, err);
}

int lp_model_random(struct lp_model **out, const struct lp_model_config *cfg, uint64_t seed,
                    struct lp_backend *be, struct lp_err *err)
{
	struct lp_backend_info info;
	struct lp_model *m;
	uint64_t st = seed;
	int rc, q, kv;

	*out = NULL;
	be->ops->info(be->ctx, &info);
	m = calloc(1, sizeof(*m));
	if (!m)
		return lp_errf(err, -ENOMEM, "out of memory");
	m->be = be;
	m->cfg = *cfg;
	m->res = calloc(1, sizeof(*m->res));
	m->path = strdup("random");
	m->name = strdup("random");
	if (!m->res || !m->path || !m->name) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto fail;
	}
	if ((rc = check_config(&m->cfg, err)) || (rc = alloc_layers(m, err)))
		goto fail;
	q = m->cfg.n_heads * m->cfg.head_dim;
	kv = m->cfg.n_kv_heads * m->cfg.head_dim;
	if ((rc = random_weight(m, info.host_memory, m->cfg.vocab_size, m->cfg.dim, false, &st,
	                        &m->tok_embd, err)) ||
	    (rc = random_weight(m, true, 1, m->cfg.dim, true, &st, &m->out_norm, err)) ||
	    (rc = random_weight(m, info.host_memory, m->cfg.vocab_size, m->cfg.dim, false, &st,
	                        &m->output, err)) ||
	    (rc = make_inv_freq(m, NULL, err)))
		goto fail;
	for (int l = 0; l < m->cfg.n_layers; l++) {
		struct lp_layer_weights *L = &m->layers[l];
		bool h = info.host_memory;

		if ((rc = random_weight(m, true, 1, m->cfg.dim, true, &st, &L->attn_norm, err)) ||
		    (rc = random_weight(m, true, 1, m->cfg.dim, true, &st, &L->ffn_norm, err)) ||
		    (rc = random_weight(m, h, q, m->cfg.dim, false, &st, &L->wq, err)) ||
		    (rc = random_weight(m, h, kv, m->cfg.dim, false, &st, &L->wk, err)) ||
		    (rc = random_weight(m, h, kv, m->cfg.dim, false, &st, &L->wv, err)) ||
		    (rc = random_weight(m, h, m->cfg.dim, q, false, &st, &L->wo, err)) ||
		    (rc = random_weight(m, h, m->cfg.ffn_dim, m->cfg.dim, false, &st, &L->w_gate,
		                        err)) ||
		    (rc = random_weight(m, h, m->cfg.ffn_dim, m->cfg.dim, false, &st, &L->w_up,
		                        err)) ||
		    (rc = random_weight(m, h, m->cfg.dim, m->cfg.ffn_dim, false, &st, &L->w_down,
		                        err)))
			goto fail;
		if (m->cfg.attn_bias &&
		    ((rc = random_weight(m, true, 1, q, true, &st, &L->bq, err)) ||
		     (rc = random_weight(m, true, 1, kv, true, &st, &L->bk, err)) ||
		     (rc = random_weight(m, true, 1, kv, true, &st, &L->bv, err))))
			goto fail;
		if (m->cfg.attn_out_bias &&
		    (rc = random_weight(m, true, 1, m->cfg.dim, true, &st, &L->bo, err)))
			goto fail;
		if (m->cfg.qk_norm &&
		    ((rc =
		          random_weight(m, true, 1, m->cfg.head_dim, true, &st, &L->q_norm, err)) ||
		     (rc = random_weight(m, true, 1, m->cfg.head_dim, true, &st, &L->k_norm, err))))
			goto fail;
		if (m->cfg.post_norms && ((rc = random_weight(m, true, 1, m->cfg.dim, true, &st,
		                                              &L->post_attn_norm, err)) ||
		                          (rc = random_weight(m, true, 1, m->cfg.dim, true, &st,
		                                              &L->post_ffn_norm, err))))
			goto fail;
	}
	*out = m;
	return 0;
fail:
	lp_model_free(m);
	return rc;
}

void lp_model_free(struct lp_model *m)
{
	if (!m)
		return;
	if (m->res) {
		for (size_t i = 0; i < m->res->n_bufs; i++)
			lp_backend_free(m->be, &m->res->bufs[i]);
		free(m->res->bufs);
		for (size_t i = 0; i < m->res->n_host; i++)
			free(m->res->host[i]);
		free(m->res->host);
		lp_gguf_free(m->res->gguf);
		lp_safetensors_free(m->res->st);
		free(m->res);
	}
	lp_tokenizer_free(m->tok);
	free(m->layers);
	free(m->path);
	free(m->name);
	free(m);
}

const char *lp_arch_name(enum lp_arch arch)
{
	switch (arch) {
	case LP_ARCH_QWEN2:
		return "qwen2";
	case LP_ARCH_QWEN3:
		return "qwen3";
	case LP_ARCH_GEMMA3:
		return "gemma3";
	case LP_ARCH_LLAMA:
	default:
		return "llama";
	}
}

bool lp_model_is_eos(const struct lp_model *m, int32_t id)
{
	for (int i = 0; i < m->cfg.n_eos; i++)
		if (m->cfg.eos_ids[i] == id)
			return true;
	return false;
}

size_t lp_model_bytes_per_token(const struct lp_model *m)
{
	/* every matrix is read once per step; the embedding lookup reads one
	 * row, except that tied embeddings are read whole for the logits */
	size_t total = m->weight_bytes;

	if (!m->cfg.tied_embeddings)
		total -= lp_tensor_bytes(&m->tok_embd);
	return total;
}
