/* The compute backend interface: device buffers, transfers and the ops of
 * one forward pass. The CPU backend (kernels/cpu/) is the reference; the CUDA
 * backend implements the same table.
 *
 * Everything the engine and scheduler hold is a device address inside a
 * buffer (struct lp_tensor.data); they never dereference it. Host data
 * crosses only through lp_backend_upload() / lp_backend_download().
 *
 * Ops are queued in order on the backend's one stream and may run
 * asynchronously; lp_backend_download() and lp_backend_synchronize() wait
 * for everything queued before them. Ops never allocate.
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

/* Paged attention for a flattened batch of tokens. Token t belongs to the
 * sequence whose block table is row tok_seq[t] of block_tables, sits at
 * position tok_pos[t] and attends to positions 0..tok_pos[t] of that
 * sequence, whose keys and values are already in the cache (the step stores
 * the batch's own K/V with kv_store first, so one op serves prefill, chunked
 * prefill and decode). Position p of a sequence lives in cache row
 * block_tables[s][p / block_size] * block_size + p % block_size. */
struct lp_attention_args {
	int n_tokens;
	int n_heads, n_kv_heads, head_dim;
	int block_size;
	int max_blocks_per_seq;          /* columns of block_tables */
	float scale;                     /* usually 1 / sqrt(head_dim) */
	const struct lp_tensor *q;       /* f32 [n_tokens, n_heads * head_dim] */
	const struct lp_tensor *k_cache; /* [n_blocks * block_size, n_kv_heads * head_dim] */
	const struct lp_tensor *v_cache; /* same shape as k_cache */
	const int32_t *tok_seq;          /* i32 [n_tokens] */
	const int32_t *tok_pos;          /* i32 [n_tokens] */
	const int32_t *block_tables;     /* i32 [n_seqs, max_blocks_per_seq] */
	struct lp_tensor *out;           /* f32 [n_tokens, n_heads * head_dim] */
};

/* LoRA (SGMV): for the targets that read one input x (q, k and v; gate and
 * up; o; down), rows [row0, row0 + rows) of the batch that use an adapter
 * get out_i[row] += (x[row] . A_i^T) . B_i^T for every target i the adapter
 * has, with the adapter's scale already folded into B_i.
 *
 * a holds the A of the adapter's targets stacked in target order, f32, f16
 * or bf16 (the adapter file's precision) [sum of their ranks, in]; b[i]
 * holds B_i transposed, f32, or half when the scale folds in exactly,
 * [rank_i, out_i]
 * (rows = rank, cols = out), cut into panels of LP_LORA_PANEL output
 * columns stored one after another, each row-major [rank_i, width]; the
 * last panel is narrower when out_i is not a multiple of the panel (see
 * lp_lora_b_index). b[i] is NULL where the adapter leaves target i out.
 * Segments do not overlap; rows in no segment get nothing. Ranks may differ
 * between segments and targets. */
#define LP_LORA_MAX_OUTS 3
#define LP_LORA_PANEL    64

struct lp_lora_seg {
	int32_t row0;
	int32_t rows;
	const struct lp_tensor *a;
	const struct lp_tensor *b[LP_LORA_MAX_OUTS];
};

struct lp_lora_args {
	const struct lp_tensor *x;               /* f32 [n, in] */
	int n_outs;                              /* 1 .. LP_LORA_MAX_OUTS */
	struct lp_tensor *out[LP_LORA_MAX_OUTS]; /* f32 [n, out_i], added to */
	struct lp_tensor *tmp;                   /* f32 [n, >= every segment's a->rows] */
	const struct lp_lora_seg *segs;          /* host metadata; tensors in device memory */
	int n_segs;
};

/* Index of element (k, o) of a B transposed [rank, out] in panel layout. */
static inline size_t lp_lora_b_index(int rank, int out, int k, int o)
{
	int p0 = o / LP_LORA_PANEL * LP_LORA_PANEL;
	int width = out - p0 < LP_LORA_PANEL ? out - p0 : LP_LORA_PANEL;

	return (size_t)p0 * (size_t)rank + (size_t)k * (size_t)width + (size_t)(o - p0);
}

struct lp_backend_ops {
	const char *name;
	void (*destroy)(void *ctx);

	/* Memory. alloc returns zeroed memory. import returns a buffer holding
	 * the given host bytes: the CPU backend aliases them (the caller keeps
	 * them alive and unchanged until the buffer is freed), a device
	 * backend allocates and copies. */
	int (*alloc)(void *ctx, size_t size, struct lp_buffer *out, struct lp_err *err);
	int (*import)(void *ctx, const void *host, size_t size, struct lp_buffer *out,
	              struct lp_err *err);
	void (*free)(void *ctx, struct lp_buffer *buf);
	void (*upload)(void *ctx, void *dst, const void *src, size_t n);
	void (*download)(void *ctx, void *dst, const void *src, size_t n);
	void (*synchronize)(void *ctx);

	/* out[i, :] = f32(table[ids[i], :]) for i < n; table of any dtype.
	 * Serves the embedding lookup and gathering rows for the logits. */
	void (*get_rows)(void *ctx, struct lp_tensor *out, const struct lp_tensor *table,
	                 const int32_t *ids, int n);
	/* out = x / sqrt(mean(x^2) + eps) * w, row by row; w f32 [1, cols].
	 * out may equal x. */
	void (*rmsnorm)(void *ctx, struct lp_tensor *out, const struct lp_tensor *x,
	                const struct lp_tensor *w, float eps);
	/* out (+)= x . w^T: x f32 [n, k], w [m, k] of any dtype, out f32
	 * [n, m]. With accumulate the product is added to out. */
	void (*matmul)(void *ctx, struct lp_tensor *out, const struct lp_tensor *x,
	               const struct lp_tensor *w, bool accumulate);
	/* x[i, :] += bias[0, :]; bias f32 [1, cols]. */
	void (*add_bias)(void *ctx, struct lp_tensor *x, const struct lp_tensor *bias);
	/* y += x, element-wise, same shapes. */
	void (*add)(void *ctx, struct lp_tensor *y, const struct lp_tensor *x);
	/* out = silu(gate) * up, element-wise; out may equal gate. */
	void (*silu_mul)(void *ctx, struct lp_tensor *out, const struct lp_tensor *gate,
	                 const struct lp_tensor *up);
	/* Rotary embedding in place, "rotate half" layout: within each head of
	 * head_dim, element i (i < head_dim/2) pairs with i + head_dim/2 and
	 * rotates by angle pos[t] * inv_freq[i]. x f32 [n, n_heads * head_dim];
	 * inv_freq f32 [1, head_dim / 2]; pos i32 [n]. */
	void (*rope)(void *ctx, struct lp_tensor *x, int n_heads, int head_dim, const int32_t *pos,
	             const struct lp_tensor *inv_freq);
	/* cache row slots[t] of k_cache/v_cache = row t of k/v, t < k->rows. */
	void (*kv_store)(void *ctx, struct lp_tensor *k_cache, struct lp_tensor *v_cache,
	                 const struct lp_tensor *k, const struct lp_tensor *v,
	                 const int32_t *slots);
	void (*attention)(void *ctx, const struct lp_attention_args *args);
	/* The LoRA of one input for every segment (see struct lp_lora_args);
	 * tmp is scratch. A row's result does not depend on the other rows. */
	void (*lora)(void *ctx, const struct lp_lora_args *args);
};

struct lp_backend {
	const struct lp_backend_ops *ops;
	void *ctx;
};

/* The CPU backend with n_threads compute threads (0 = one per online CPU).
 * Free with lp_backend_destroy(). */
int lp_backend_cpu_new(struct lp_backend **out, int n_threads, struct lp_err *err);

/* Frees the backend; every buffer must have been freed before. NULL-safe. */
void lp_backend_destroy(struct lp_backend *be);

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

#endif
