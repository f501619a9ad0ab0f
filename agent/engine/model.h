/* A loaded base model: hyper-parameters, weights in backend memory, and the
 * tokenizer. Loads the Llama family (Llama 2/3, SmolLM2, TinyLlama, Mistral),
 * the Qwen family (Qwen2, Qwen2.5, Qwen3 dense) and Gemma 3 (text; its
 * (1 + w) norm weights are stored as 1 + w) from an HF directory
 * (config.json, single or sharded safetensors of f32/f16/bf16,
 * tokenizer.json) or from a GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
 * Q5_0, Q5_1, Q4_K, Q5_K, Q6_K).
 *
 * One layout for Q and K: the HF "rotate half" one. GGUF files from
 * llama.cpp interleave the rotary halves of each head's rows for the llama
 * architecture; the loader undoes that permutation, so HF LoRA weights
 * apply unchanged (qwen2 and qwen3 files keep the HF order). */
#ifndef LP_ENGINE_MODEL_H
#define LP_ENGINE_MODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "common/err.h"
#include "kernels/backend.h"

struct lp_tokenizer;

enum lp_rope_scaling {
	LP_ROPE_NONE,
	LP_ROPE_LINEAR, /* positions divided by factor */
	LP_ROPE_LLAMA3, /* Llama 3.1 frequency-dependent scaling */
};

/* What varies between the supported decoders; everything else (pre-norm
 * RMSNorm, rotary embeddings over the whole head, SwiGLU, grouped-query
 * attention) is shared. */
enum lp_arch {
	LP_ARCH_LLAMA, /* Llama 2/3, SmolLM2, TinyLlama, Mistral */
	LP_ARCH_QWEN2, /* Qwen2, Qwen2.5: biases on q, k and v */
	LP_ARCH_QWEN3, /* Qwen3 dense: RMSNorm over each head of q and k */
	/* Gemma 3 (text): q/k norm, norms after attention and after the MLP
	 * too, GeGLU, scaled embeddings and queries, local layers with their
	 * own RoPE base */
	LP_ARCH_GEMMA3,
};

/* The MLP's activation: act(gate) * up. */
enum lp_act {
	LP_ACT_SILU,      /* SwiGLU */
	LP_ACT_GELU_TANH, /* GeGLU, gelu_pytorch_tanh */
};

#define LP_MAX_EOS 8
/* Layers a model may have. */
#define LP_MAX_LAYERS 1024

struct lp_model_config {
	enum lp_arch arch;
	int n_layers;
	int dim; /* hidden size */
	int n_heads;
	int n_kv_heads;
	int head_dim;
	int ffn_dim; /* intermediate size */
	int vocab_size;
	int max_pos; /* context length the model was trained for */
	float rms_eps;
	float rope_theta;
	enum lp_rope_scaling rope_scaling;
	float rope_factor;
	float rope_low_freq_factor;  /* llama3 */
	float rope_high_freq_factor; /* llama3 */
	int rope_orig_max_pos;       /* llama3 */
	bool tied_embeddings;
	bool attn_bias;     /* q/k/v projections carry a bias */
	bool attn_out_bias; /* the output projection (o_proj) carries a bias */
	bool qk_norm;       /* RMSNorm over each head of q and k before RoPE */
	/* RMSNorm of the attention's and of the MLP's output before each is
	 * added to the residual stream (Gemma 3) */
	bool post_norms;
	enum lp_act act;
	float embed_scale; /* embeddings are multiplied by it; 0 or 1: none */
	float attn_scale;  /* of q.k; 0: 1 / sqrt(head_dim) */
	/* RoPE base of the sliding layers, without scaling (Gemma 3's
	 * rope_local_base_freq); 0: every layer uses rope_theta and the
	 * scaling */
	float rope_local_theta;
	/* The attention window of the config's sliding layers, 0 when no layer
	 * slides: a token of a sliding layer attends to the sliding_window
	 * newest positions, its own included. Which layers slide: bit l % 64 of
	 * sliding_layers[l / 64] (lp_model_layer_window). */
	int sliding_window;
	uint64_t sliding_layers[LP_MAX_LAYERS / 64];
	int32_t bos_id;              /* -1 if none */
	int32_t eos_ids[LP_MAX_EOS]; /* tokens that end generation */
	int n_eos;
};

struct lp_layer_weights {
	struct lp_tensor attn_norm;      /* f32 [1, dim] */
	struct lp_tensor wq;             /* [n_heads * head_dim, dim] */
	struct lp_tensor wk;             /* [n_kv_heads * head_dim, dim] */
	struct lp_tensor wv;             /* [n_kv_heads * head_dim, dim] */
	struct lp_tensor bq, bk, bv;     /* f32 [1, out] when attn_bias, else data NULL */
	struct lp_tensor q_norm;         /* f32 [1, head_dim] when qk_norm, else data NULL */
	struct lp_tensor k_norm;         /* f32 [1, head_dim] when qk_norm, else data NULL */
	struct lp_tensor wo;             /* [dim, n_heads * head_dim] */
	struct lp_tensor bo;             /* f32 [1, dim] when attn_out_bias, else data NULL */
	struct lp_tensor post_attn_norm; /* f32 [1, dim] when post_norms, else data NULL */
	struct lp_tensor ffn_norm;       /* f32 [1, dim] */
	struct lp_tensor w_gate;         /* [ffn_dim, dim] */
	struct lp_tensor w_up;           /* [ffn_dim, dim] */
	struct lp_tensor w_down;         /* [dim, ffn_dim] */
	struct lp_tensor post_ffn_norm;  /* f32 [1, dim] when post_norms, else data NULL */
};

struct lp_model {
	struct lp_model_config cfg;
	char *path;                 /* as given to lp_model_load */
	char *name;                 /* file or directory stem */
	struct lp_backend *be;      /* borrowed */
	struct lp_tensor tok_embd;  /* [vocab, dim] */
	struct lp_tensor out_norm;  /* f32 [1, dim] */
	struct lp_tensor output;    /* [vocab, dim]; aliases tok_embd when tied */
	struct lp_tensor inv_freq;  /* f32 [1, head_dim / 2], scaling applied */
	const float *rope_inv_freq; /* the same in host memory */
	/* rope_local_theta's frequencies in host memory; NULL when 0 */
	const float *rope_local_inv_freq;
	struct lp_layer_weights *layers; /* [n_layers] */
	struct lp_tokenizer *tok;
	size_t weight_bytes;      /* bytes of all weights, each counted once */
	struct lp_model_res *res; /* buffers, mappings, host copies */
};

/* Loads the model at path (a .gguf file or an HF directory) onto be, which
 * must outlive the model. A directory without config.json that holds
 * exactly one .gguf file (loraplane-agent fetch of a single-file model)
 * loads that file; one with several is an error listing them. On failure
 * *out is NULL and err names the file and the reason. Free with
 * lp_model_free(). */
int lp_model_load(struct lp_model **out, const char *path, struct lp_backend *be,
                  struct lp_err *err);
void lp_model_free(struct lp_model *m);
/* A model of the given shape (cfg as a config.json would give it) with
 * random f16 weights (norm weights and biases: ones) and no tokenizer, for
 * benchmarks of shapes whose weights are not at hand (make bench-gpu's
 * Llama-3-8B). */
int lp_model_random(struct lp_model **out, const struct lp_model_config *cfg, uint64_t seed,
                    struct lp_backend *be, struct lp_err *err);

bool lp_model_is_eos(const struct lp_model *m, int32_t id);
/* The attention window of layer l (0 <= l < n_layers): positions a token
 * attends to, its own included; 0 for full attention. */
static inline int lp_model_layer_window(const struct lp_model_config *c, int l)
{
	return c->sliding_layers[l / 64] >> (l % 64) & 1 ? c->sliding_window : 0;
}
/* Whether layer l rotates by rope_local_theta (lp_model_rope_table's
 * local table). */
static inline bool lp_model_layer_local_rope(const struct lp_model_config *c, int l)
{
	return c->rope_local_theta > 0 && lp_model_layer_window(c, l) > 0;
}
/* "llama", "qwen2", "qwen3", "gemma3": the architecture's name (static). */
const char *lp_arch_name(enum lp_arch arch);
/* The rotary table of positions 0 .. n_pos - 1 that the rope op reads:
 * row p holds cos of p * inv_freq[i] for i < head_dim / 2, then their sin
 * (out: [n_pos, head_dim] floats); with local, the table of the local
 * layers (rope_local_inv_freq, which must exist). */
void lp_model_rope_table(const struct lp_model *m, bool local, int n_pos, float *out);
/* Bytes of weights one token's forward pass reads (every matrix once). */
size_t lp_model_bytes_per_token(const struct lp_model *m);

#endif
