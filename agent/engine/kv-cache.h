/* The paged key/value cache: per layer, one K and one V tensor of
 * n_blocks * block_size rows in backend memory, and a host-side allocator
 * of blocks. Sequences own blocks through their block tables (see
 * engine.c); block ids index the cache's rows in units of block_size. */
#ifndef LP_ENGINE_KV_CACHE_H
#define LP_ENGINE_KV_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "common/err.h"
#include "kernels/backend.h"

struct lp_kv_cache {
	struct lp_backend *be; /* borrowed */
	int n_layers;
	int block_size; /* positions per block */
	int n_blocks;
	int kv_dim;           /* n_kv_heads * head_dim */
	enum lp_dtype type;   /* f32, f16 or bf16 */
	struct lp_buffer buf; /* all layers' K and V */
	struct lp_tensor *k;  /* [n_layers] views [n_blocks * block_size, kv_dim] */
	struct lp_tensor *v;  /* [n_layers] likewise */
	int32_t *free_ids;    /* stack of free block ids */
	int n_free;
};

/* Bytes one block takes over all layers. */
size_t lp_kv_cache_block_bytes(int n_layers, int kv_dim, int block_size, enum lp_dtype type);

/* Allocates n_blocks blocks in be. Release with lp_kv_cache_release(). */
int lp_kv_cache_init(struct lp_kv_cache *kv, struct lp_backend *be, int n_layers, int kv_dim,
                     int block_size, int n_blocks, enum lp_dtype type, struct lp_err *err);
void lp_kv_cache_release(struct lp_kv_cache *kv);

/* A free block id, or -1 when none is left. */
int32_t lp_kv_cache_alloc(struct lp_kv_cache *kv);
void lp_kv_cache_free(struct lp_kv_cache *kv, int32_t id);

#endif
