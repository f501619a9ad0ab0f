/* The compute backend interface: device buffers, transfers and the ops of
 * one forward pass. The CPU backend (kernels/cpu/) is the reference; the
 * CUDA backend (kernels/cuda/, loaded at run time by kernels/cuda-loader.c)
 * implements the same table.
 *
 * Everything the engine and scheduler hold is a device address inside a
 * buffer (struct lp_tensor.data); they never dereference it. Host data
 * crosses only through upload / download (and the imports and the LoRA
 * slot fill).
 *
 * Ops are queued in order on the backend's one stream and may run
 * asynchronously; download and synchronize wait for everything queued before
 * them. Ops never allocate: reserve() sizes every workspace once.
 *
 * Errors are sticky: an op or transfer that fails (a CUDA error, an index
 * from device memory that would reach outside a buffer) records the first
 * failure, with the statement, file and line where it has them, and the
 * backend does no more work; status() reports it. The engine checks once per
 * step and fails the step's requests; nothing ever crashes or continues on
 * garbage.
 *
 * Shapes are given as [rows, cols] with cols contiguous. Activations are f32.
 * "i32" arguments are device arrays of int32_t. */
#ifndef LP_KERNELS_BACKEND_H
#define LP_KERNELS_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/err.h"
#include "kernels/dtype.h"
#include "kernels/lora-layout.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A 2-D tensor view in device memory: rows x cols of type, rows contiguous
 * (row r starts at data + r * lp_dtype_row_bytes(type, cols)). */
struct lp_tensor {
	void *data; /* device address */
	enum lp_dtype type;
	int64_t rows;
	int64_t cols;
};

/* A block of device memory. */
struct lp_buffer {
	void *data; /* device address */
	size_t size;
	bool owned; /* false when it aliases host memory (lp_backend_import) */
};

/* What a backend is and has. */
struct lp_backend_info {
	char name[16];           /* "cpu", "cuda", "cuda-emu" */
	char device[128];        /* "NVIDIA H100 80GB HBM3 (sm_90, device 0)", "16 threads, AVX2" */
	size_t total_bytes;      /* device memory (host RAM for the CPU) */
	size_t free_bytes;       /* free now */
	enum lp_dtype kv_type;   /* preferred KV cache type */
	enum lp_dtype lora_type; /* what the LoRA slots hold (F32 on the CPU: the
	                            adapter's own precision, aliased) */
	uint32_t weight_types;   /* 1u << t for each t import_weight keeps as it is */
	bool host_memory;        /* device addresses are host addresses */
	int token_buckets;       /* > 0: begin_step pads token counts to buckets */
	double peak_bandwidth;   /* bytes/s the device memory moves at best; 0: unknown */
	/* counters since creation, for make bench: kernels launched (a graph
	 * replay counts its kernels), bytes uploaded, steps replayed from a
	 * captured graph */
	uint64_t launches, upload_bytes, graph_replays;
};

/* Everything a step can ask for, given once to reserve(). */
struct lp_backend_limits {
	int n_layers, dim, n_heads, n_kv_heads, head_dim, ffn_dim, vocab;
	int max_tokens;          /* rows of a step (padding included) */
	int max_seqs;            /* sequences of a step */
	int max_out;             /* rows of logits of a step */
	int block_size;          /* KV positions per block */
	int max_blocks_per_seq;  /* block-table columns at most */
	enum lp_dtype kv_type;   /* f32, f16 or bf16 */
	int max_loras;           /* LoRA slots */
	int max_lora_rank;       /* largest rank of any target of a slot */
	enum lp_dtype lora_type; /* what a device backend's slots hold (f32, f16
	                            or bf16; usually info.lora_type); the CPU
	                            keeps each adapter's own precision */
	int max_logprobs;        /* top-N of the sample op at most */
	int max_penalties;       /* sample op: pen entries of a call at most */
};

/* One step's shape, for begin_step. */
struct lp_step_shape {
	int n_tokens; /* rows before padding */
	int n_seqs;
	int n_out;
	bool decode; /* every sequence computes one token */
	bool lora;   /* some row uses an adapter */
};

/* Paged attention for a flattened batch of tokens. Token t belongs to the
 * sequence whose block table is row tok_seq[t] of block_tables (tok_seq[t] <
 * 0: a padding row, whose output is zero), sits at position tok_pos[t] and
 * attends to positions 0..tok_pos[t] of that sequence, whose keys and values
 * are already in the cache (the step stores the batch's own K/V with
 * kv_store first, so one op serves prefill, chunked prefill and decode).
 * Position p of a sequence lives in cache row
 * block_tables[s][p / block_size] * block_size + p % block_size.
 *
 * With a sliding window (window > 0) token t attends to positions
 * max(0, tok_pos[t] - window + 1) .. tok_pos[t] only: the window newest
 * positions, its own included (transformers' sliding-window mask: key k is
 * seen from query q when q - window < k <= q). The entries of a
 * sequence's block table for blocks wholly before the window of its
 * lowest position in the call are never read: the engine may release
 * those blocks and leave anything in their entries. */
struct lp_attention_args {
	int n_tokens;
	int n_heads, n_kv_heads, head_dim;
	int block_size;
	int max_blocks_per_seq;          /* columns of block_tables this step */
	int max_context;                 /* no tok_pos exceeds max_context - 1 */
	int window;                      /* positions a token sees; 0: all before it */
	float scale;                     /* usually 1 / sqrt(head_dim) */
	const struct lp_tensor *q;       /* f32 [n_tokens, n_heads * head_dim] */
	const struct lp_tensor *k_cache; /* [n_blocks * block_size, n_kv_heads * head_dim] */
	const struct lp_tensor *v_cache; /* same shape and type as k_cache */
	const int32_t *tok_seq;          /* i32 [n_tokens] */
	const int32_t *tok_pos;          /* i32 [n_tokens] */
	const int32_t *block_tables;     /* i32 [n_seqs, max_blocks_per_seq] */
	struct lp_tensor *out;           /* f32 [n_tokens, n_heads * head_dim] */
};

/* LoRA of one group of targets (enum lp_lora_group: q, k and v; o; gate
 * and up; down) in one layer: rows of the batch that use the adapter in
 * slot s get out_i[row] += (x[row] . A_i^T) . B_i^T for every target i of
 * the group the adapter has on that layer (scale folded into B).
 *
 * Which rows use which slot comes twice, in device memory, and the backend
 * picks the form it runs best: segs, the rows grouped by adapter (SGMV,
 * segments do not overlap, empty ones allowed), and tok_slot, the slot of
 * every row (BGMV). Rows in no segment (tok_slot -1) get nothing. A row's
 * result does not depend on the other rows. */
struct lp_lora_seg {
	int32_t row0;
	int32_t rows;
	int32_t slot;
};

struct lp_lora_args {
	int layer;
	enum lp_lora_group group;
	const struct lp_tensor *x;               /* f32 [n, in] */
	struct lp_tensor *out[LP_LORA_MAX_OUTS]; /* f32 [n, out_i], the group's targets in order */
	struct lp_tensor *tmp;                   /* f32 [n, >= LP_LORA_MAX_OUTS * max_lora_rank] */
	const struct lp_lora_seg *segs;          /* device [n_segs] */
	int n_segs;
	const int32_t *tok_slot; /* device i32 [n] */
	bool decode;             /* one row per sequence (BGMV suits) */
};

/* Sampling of one token per row of logits, on the device, with the host
 * sampler's distribution (agent/engine/sampler.c). The row's logit bias
 * and penalties first (struct lp_sample_row). Then candidates rank by logit, ties to the
 * lower id; temperature 0 is greedy (the first in rank). Else the logits
 * are divided by the
 * temperature, p_i = exp(l_i - l_max), and the candidates are cut by top-k
 * (the k first), then top-p (the shortest prefix of the ranking whose mass
 * reaches top_p times the mass of what top-k left), then min-p (p_i >=
 * min_p); the token is the first candidate in rank order at which the
 * running sum of p_i exceeds u times the kept candidates' sum. The CPU
 * backend's sample op computes exactly this, and is what device kernels are
 * compared with. logprobs are log-softmax of the logits as given, before
 * the bias and the penalties (what the host path returns too). */
struct lp_sample_row {
	float temperature;  /* 0: greedy */
	float top_p;        /* 1: off */
	float min_p;        /* 0: off */
	int32_t top_k;      /* <= 0: off */
	float u;            /* uniform in [0, 1) */
	int32_t n_logprobs; /* top-N wanted, 0 .. max_logprobs */
	/* Logit bias and penalties, applied to the row's logits before
	 * everything else, as the host sampler applies them: for each entry
	 * of pen[pen_off .. pen_off + pen_n), with c = its count, the logit
	 * gains the entry's bias (OpenAI's logit_bias; 0 = none), then the
	 * repetition penalty (HF / vLLM; 1 = off) divides a positive logit
	 * and multiplies a negative one when c > 0 or in_prompt, and when
	 * c > 0 the logit loses c * frequency_penalty + presence_penalty
	 * (OpenAI; 0 = off). Tokens without an entry are left alone. */
	float repetition_penalty;
	float frequency_penalty;
	float presence_penalty;
	int32_t pen_off, pen_n;
};

/* One token a sequence has seen (in its prompt, or generated count times)
 * or biases. */
struct lp_sample_penalty {
	int32_t token;
	int32_t count;     /* times generated */
	int32_t in_prompt; /* 0 or 1 */
	float bias;        /* added to the logit first; finite; 0: none */
};

struct lp_sample_args {
	const struct lp_tensor *logits;   /* f32 [n, vocab]; may be overwritten */
	const struct lp_sample_row *rows; /* device [n] */
	int n;
	int max_logprobs; /* columns of top_ids / top_logprobs */
	/* device [<= limits.max_penalties]: the rows' entries, one slice per
	 * row, slices of rows with different logits not overlapping (NULL
	 * when every pen_n is 0) */
	const struct lp_sample_penalty *pen;
	int32_t *tokens;     /* device i32 [n] */
	float *logprob;      /* device f32 [n]: log-softmax of the chosen token */
	int32_t *top_ids;    /* device i32 [n, max_logprobs], best first */
	float *top_logprobs; /* device f32 [n, max_logprobs] */
};

/* Constrained decoding (agent/engine/grammar.h): row r < n of logits
 * becomes exactly -inf at every token that mask row row_mask[r] forbids,
 * so that the sample op that follows gives those tokens no weight and its
 * logprobs are those of the constrained distribution. Token t is allowed
 * when bit t % 32 of word t / 32 of the mask row is set (bits past the
 * vocabulary are ignored); allowed tokens keep their logit, NaN included.
 * row_mask[r] == -1 leaves row r alone (unconstrained rows, padding rows);
 * a value outside -1 .. n_masks - 1 is an error and leaves the row alone.
 * A mask that allows nothing leaves the row all -inf: the caller must not
 * ask for that. The op touches the masked rows only.
 *
 * In decode steps (begin_step) n is the padded n_out, as sample's, and
 * n_masks and words are fixed (the capacity of the engine's mask buffer,
 * its row stride): call it every decode step, with every row_mask -1 when
 * no sequence is constrained, so that the step's calls stay the same. */
struct lp_mask_args {
	const struct lp_tensor *logits; /* f32 [>= n, vocab]; masked in place */
	/* device u32 [n_masks, words], words >= (vocab + 31) / 32 */
	const uint32_t *mask;
	const int32_t *row_mask; /* device i32 [n]: the mask row of each logits row, or -1 */
	int n;
	int n_masks;
	int words;
};

struct lp_backend_ops {
	const char *name;
	void (*destroy)(void *ctx);
	void (*info)(void *ctx, struct lp_backend_info *out);
	/* 0, or the first error recorded (sticky), with err filled. */
	int (*status)(void *ctx, struct lp_err *err);
	/* Sizes and allocates every workspace and the LoRA slots for steps
	 * within lim, before the first op; *bytes: what it took. The engine
	 * holds the reservation: one at a time per backend (-EBUSY while
	 * another holds it); reserve(NULL) releases it. */
	int (*reserve)(void *ctx, const struct lp_backend_limits *lim, size_t *bytes,
	               struct lp_err *err);

	/* Memory. alloc returns zeroed memory. import returns a buffer holding
	 * the given host bytes as they are: the CPU backend aliases them (the
	 * caller keeps them alive and unchanged until the buffer is freed), a
	 * device backend allocates and copies. */
	int (*alloc)(void *ctx, size_t size, struct lp_buffer *out, struct lp_err *err);
	int (*import)(void *ctx, const void *host, size_t size, struct lp_buffer *out,
	              struct lp_err *err);
	/* A weight matrix, rows x cols of type in host memory, stored in the
	 * format the backend chooses (the CPU keeps the type and aliases the
	 * host bytes like import; CUDA keeps f16, or bf16 for bf16 sources,
	 * on the device). *out describes it, *buf owns it. */
	int (*import_weight)(void *ctx, const void *host, enum lp_dtype type, int64_t rows,
	                     int64_t cols, struct lp_tensor *out, struct lp_buffer *buf,
	                     struct lp_err *err);
	void (*free)(void *ctx, struct lp_buffer *buf);
	/* Host memory that transfers run from fastest (pinned on CUDA). */
	int (*host_alloc)(void *ctx, size_t size, void **out, struct lp_err *err);
	void (*host_free)(void *ctx, void *p);
	/* upload from host_alloc memory may return before the copy is done:
	 * the source stays unchanged until the next download or synchronize. */
	void (*upload)(void *ctx, void *dst, const void *src, size_t n);
	void (*download)(void *ctx, void *dst, const void *src, size_t n);
	void (*synchronize)(void *ctx);

	/* LoRA slots (reserve made max_loras of them). fill copies an
	 * adapter's weights into a slot, converting them to info.lora_type;
	 * ops queued after it that use the slot see them. A device backend
	 * copies on a side stream, so that the upload overlaps compute, and w
	 * may be freed when fill returns; the CPU backend aliases w, which then
	 * stays alive and unchanged until the slot is cleared or refilled. */
	int (*lora_fill)(void *ctx, int slot, const struct lp_lora_weights *w, struct lp_err *err);
	void (*lora_clear)(void *ctx, int slot);

	/* The ops of one forward pass come between begin_step and end_step.
	 * begin_step returns the row count the step's tensors must have: the
	 * token count padded to a bucket when info.token_buckets (so that a
	 * device backend can capture a decode step in a graph once and replay
	 * it), else n_tokens. Padding rows carry id 0, position 0, tok_seq -1,
	 * slot -1 and LoRA slot -1.
	 *
	 * A captured decode step replays every op with the arguments it was
	 * captured with; only device memory may differ. So in decode steps
	 * every argument passed by value must follow from (padded n_tokens,
	 * lora) alone: the step's metadata (ids, positions, tok_seq, slots,
	 * block tables, tok_slot, sample rows) and outputs sit in fixed device
	 * buffers at fixed addresses; views have the padded row count; n of
	 * get_rows and sample (n_out) is the padded n_tokens; attention's
	 * max_blocks_per_seq and max_context are the engine's maxima, not this
	 * step's; lora runs with decode set and reads tok_slot only (segs and
	 * n_segs may vary); max_logprobs is fixed. Transfers come before the
	 * step's first op (the metadata of the padded rows may go up right
	 * after begin_step) or after end_step: from the first op on, only ops
	 * (no upload, download, synchronize, status, alloc or free), and no
	 * lora_fill/clear anywhere inside the step. A step that breaks the
	 * rule still computes the right thing (the CUDA backend compares each
	 * call with the captured one and runs such a step eagerly), but its
	 * key is never replayed again. docs/cuda.md. */
	int (*begin_step)(void *ctx, const struct lp_step_shape *shape);
	void (*end_step)(void *ctx);

	/* out[i, :] = f32(table[ids[i], :]) for i < n; table of any dtype.
	 * Serves the embedding lookup and gathering rows for the logits. An id
	 * outside the table is an error. */
	void (*get_rows)(void *ctx, struct lp_tensor *out, const struct lp_tensor *table,
	                 const int32_t *ids, int n);
	/* out = x / sqrt(mean(x^2) + eps) * w, row by row; w f32 [1, cols].
	 * out may equal x. */
	void (*rmsnorm)(void *ctx, struct lp_tensor *out, const struct lp_tensor *x,
	                const struct lp_tensor *w, float eps);
	/* out (+)= x . w^T: x f32 [n, k], w [m, k] as import_weight stored it,
	 * out f32 [n, m]. With accumulate the product is added to out. Row i of
	 * out does not depend on the other rows of x. */
	void (*matmul)(void *ctx, struct lp_tensor *out, const struct lp_tensor *x,
	               const struct lp_tensor *w, bool accumulate);
	/* x[i, :] += bias[0, :]; bias f32 [1, cols]. */
	void (*add_bias)(void *ctx, struct lp_tensor *x, const struct lp_tensor *bias);
	/* y += x, element-wise, same shapes. */
	void (*add)(void *ctx, struct lp_tensor *y, const struct lp_tensor *x);
	/* out = silu(gate) * up, element-wise; out may equal gate. */
	void (*silu_mul)(void *ctx, struct lp_tensor *out, const struct lp_tensor *gate,
	                 const struct lp_tensor *up);
	/* out = gelu_tanh(gate) * up, element-wise (GeGLU, Gemma): gelu_tanh(g)
	 * = 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))), PyTorch's
	 * approximate="tanh". out may equal gate. */
	void (*gelu_mul)(void *ctx, struct lp_tensor *out, const struct lp_tensor *gate,
	                 const struct lp_tensor *up);
	/* x *= s, element-wise (Gemma's embedding scale). */
	void (*scale)(void *ctx, struct lp_tensor *x, float s);
	/* Rotary embedding in place, "rotate half" layout: within each head of
	 * head_dim, element i (i < head_dim/2) pairs with i + head_dim/2 and
	 * rotates by the angle of position pos[t]: cos_sin f32 [n_pos,
	 * head_dim] holds cos of the head_dim/2 angles, then their sin, per
	 * position. x f32 [n, n_heads * head_dim]; pos i32 [n]. A position
	 * outside the table is an error. */
	void (*rope)(void *ctx, struct lp_tensor *x, int n_heads, int head_dim, const int32_t *pos,
	             const struct lp_tensor *cos_sin);
	/* cache row slots[t] of k_cache/v_cache = row t of k/v (converted to
	 * the cache's type: f32, f16 or bf16), t < k->rows; slot -1 is
	 * padding and skipped, any other slot outside the cache an error. */
	void (*kv_store)(void *ctx, struct lp_tensor *k_cache, struct lp_tensor *v_cache,
	                 const struct lp_tensor *k, const struct lp_tensor *v,
	                 const int32_t *slots);
	void (*attention)(void *ctx, const struct lp_attention_args *args);
	/* The LoRA of one group (see struct lp_lora_args); tmp is scratch. */
	void (*lora)(void *ctx, const struct lp_lora_args *args);
	/* One token per row (see struct lp_sample_args). */
	void (*sample)(void *ctx, const struct lp_sample_args *args);
	/* -inf at the tokens each row's mask forbids (see struct
	 * lp_mask_args); comes right before sample. */
	void (*mask_logits)(void *ctx, const struct lp_mask_args *args);
};

struct lp_backend {
	const struct lp_backend_ops *ops;
	void *ctx;
};

/* The CPU backend with n_threads compute threads (0 = one per online CPU).
 * Free with lp_backend_destroy(). */
int lp_backend_cpu_new(struct lp_backend **out, int n_threads, struct lp_err *err);

/* The CUDA backend on device `device`, from the shared object loaded at
 * run time (kernels/cuda-loader.c): -ENODEV with the reason (no shared
 * object, missing CUDA libraries, no driver, no such device). */
int lp_backend_cuda_new(struct lp_backend **out, int device, struct lp_err *err);

/* Frees the backend; every buffer must have been freed before. NULL-safe. */
void lp_backend_destroy(struct lp_backend *be);

static inline int lp_backend_status(struct lp_backend *be, struct lp_err *err)
{
	return be->ops->status(be->ctx, err);
}

static inline int lp_backend_alloc(struct lp_backend *be, size_t size, struct lp_buffer *out,
                                   struct lp_err *err)
{
	return be->ops->alloc(be->ctx, size, out, err);
}

static inline int lp_backend_import(struct lp_backend *be, const void *host, size_t size,
                                    struct lp_buffer *out, struct lp_err *err)
{
	return be->ops->import(be->ctx, host, size, out, err);
}

/* NULL-safe on a zeroed buffer; the buffer is zeroed afterwards. */
static inline void lp_backend_free(struct lp_backend *be, struct lp_buffer *buf)
{
	if (buf->data)
		be->ops->free(be->ctx, buf);
	buf->data = NULL;
	buf->size = 0;
}

static inline void lp_backend_upload(struct lp_backend *be, void *dst, const void *src, size_t n)
{
	be->ops->upload(be->ctx, dst, src, n);
}

static inline void lp_backend_download(struct lp_backend *be, void *dst, const void *src, size_t n)
{
	be->ops->download(be->ctx, dst, src, n);
}

/* A view of rows [row0, row0 + rows) of t. */
static inline struct lp_tensor lp_tensor_rows(const struct lp_tensor *t, int64_t row0, int64_t rows)
{
	struct lp_tensor v = *t;

	v.data = (char *)t->data + (size_t)row0 * lp_dtype_row_bytes(t->type, t->cols);
	v.rows = rows;
	return v;
}

static inline size_t lp_tensor_bytes(const struct lp_tensor *t)
{
	return (size_t)t->rows * lp_dtype_row_bytes(t->type, t->cols);
}

#ifdef __cplusplus
}
#endif

#endif
