/* The CUDA backend's op entries, one file each (the signatures of
 * struct lp_backend_ops in kernels/backend.h, ctx being a struct lp_cuda),
 * and what reserve() asks of them. backend-cuda.cu puts the entries in the
 * ops table.
 *
 *   elementwise.cu  get_rows, rmsnorm, add, add_bias, silu_mul, gelu_mul, scale
 *   rope.cu         rope (one cos/sin table)
 *   kv-store.cu     kv_store (f32, f16, bf16 caches)
 *   attention.cu    attention: paged decode (each K/V block read once per
 *                   GQA group, online softmax, split-K for long contexts)
 *                   and paged prefill (tiled, causal, over the cache)
 *   gemm.cu         matmul: cuBLAS(Lt), f16/bf16 in, f32 accumulate, fixed
 *                   algorithm per shape; the reference route under emulation
 *   convert.cu      weight conversion at import (GGUF blocks -> f16/bf16)
 *   lora.cu         LoRA slot arenas, their fill on the side stream, SGMV
 *                   shrink/expand and BGMV
 *   sample.cu       sample
 *   mask.cu         mask_logits (constrained decoding's token masks) */
#ifndef LP_KERNELS_CUDA_OPS_CUH
#define LP_KERNELS_CUDA_OPS_CUH

#include "kernels/cuda/cuda.cuh"

void lp_cuda_get_rows(void *ctx, struct lp_tensor *out, const struct lp_tensor *table,
                      const int32_t *ids, int n);
void lp_cuda_rmsnorm(void *ctx, struct lp_tensor *out, const struct lp_tensor *x,
                     const struct lp_tensor *w, float eps);
void lp_cuda_add_bias(void *ctx, struct lp_tensor *x, const struct lp_tensor *bias);
void lp_cuda_add(void *ctx, struct lp_tensor *y, const struct lp_tensor *x);
void lp_cuda_silu_mul(void *ctx, struct lp_tensor *out, const struct lp_tensor *gate,
                      const struct lp_tensor *up);
void lp_cuda_gelu_mul(void *ctx, struct lp_tensor *out, const struct lp_tensor *gate,
                      const struct lp_tensor *up);
void lp_cuda_scale(void *ctx, struct lp_tensor *x, float s);
void lp_cuda_rope(void *ctx, struct lp_tensor *x, int n_heads, int head_dim, const int32_t *pos,
                  const struct lp_tensor *cos_sin);
void lp_cuda_kv_store(void *ctx, struct lp_tensor *k_cache, struct lp_tensor *v_cache,
                      const struct lp_tensor *k, const struct lp_tensor *v, const int32_t *slots);

void lp_cuda_attention(void *ctx, const struct lp_attention_args *args);
size_t lp_cuda_attention_workspace(const struct lp_backend_limits *lim);

void lp_cuda_matmul(void *ctx, struct lp_tensor *out, const struct lp_tensor *x,
                    const struct lp_tensor *w, bool accumulate);
size_t lp_cuda_matmul_workspace(const struct lp_backend_limits *lim);
int lp_cuda_matmul_init(struct lp_cuda *cu, struct lp_err *err); /* cu->matmul */
void lp_cuda_matmul_release(struct lp_cuda *cu);

/* The stored type import_weight picks for a source type (f16, or bf16 for
 * bf16 and f32 sources), and the conversion of rows x cols host weights of
 * type src into dst (device memory of that type): dequantized on the host
 * into staging (pinned, staging_bytes) and uploaded piece by piece. */
enum lp_dtype lp_cuda_weight_type(enum lp_dtype src);
int lp_cuda_convert_weight(struct lp_cuda *cu, void *dst, const void *host, enum lp_dtype src,
                           int64_t rows, int64_t cols, void *staging, size_t staging_bytes,
                           struct lp_err *err);

/* LoRA: reserve allocates max_loras slots of max_lora_rank per target of
 * every layer, in lim->lora_type (cu->lora). */
int lp_cuda_lora_reserve(struct lp_cuda *cu, const struct lp_backend_limits *lim, size_t *bytes,
                         struct lp_err *err);
void lp_cuda_lora_release(struct lp_cuda *cu);
int lp_cuda_lora_fill(void *ctx, int slot, const struct lp_lora_weights *w, struct lp_err *err);
void lp_cuda_lora_clear(void *ctx, int slot);
void lp_cuda_lora(void *ctx, const struct lp_lora_args *args);

void lp_cuda_sample(void *ctx, const struct lp_sample_args *args);
size_t lp_cuda_sample_workspace(const struct lp_backend_limits *lim);

void lp_cuda_mask_logits(void *ctx, const struct lp_mask_args *args);

#endif
