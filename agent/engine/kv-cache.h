/* The paged key/value cache: per layer, one K and one V tensor of
 * n_blocks * block_size rows in backend memory, and a host-side allocator
 * of blocks. Sequences own blocks through their block tables (see
 * engine.c); block ids index the cache's rows in units of block_size.
 *
 * Blocks are reference-counted, so that sequences can share them, and the
 * allocator is also the automatic prefix cache: a full block whose K/V are
 * computed can be published under its digest (lp_kv_cache_digest: the
 * sequence's key -- which adapter version computed it -- the block's
 * tokens and, through the previous block's digest, every token before
 * them). A published block outlives its sequences: when its last
 * reference goes it is kept, unreferenced, on an LRU list, and a later
 * lookup of its digest takes it back. Only when no plain free block is
 * left does alloc take the least recently released cached one, whose
 * digest is then forgotten. Digests are SHA-256, compared in full: a
 * prompt cannot be crafted to reach another prompt's blocks. */
#ifndef LP_ENGINE_KV_CACHE_H
#define LP_ENGINE_KV_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/err.h"
#include "kernels/backend.h"

#define LP_KV_DIGEST_BYTES 32

struct lp_kv_digest {
	uint8_t b[LP_KV_DIGEST_BYTES];
};

/* Host-side state of one block. */
struct lp_kv_block {
	struct lp_kv_digest digest; /* valid when published */
	int32_t refs;               /* sequences holding it */
	int32_t lru_prev, lru_next; /* on the cached list when published and refs == 0 */
	bool published;             /* in the digest table */
};

struct lp_kv_cache {
	struct lp_backend *be; /* borrowed */
	int n_layers;
	int block_size; /* positions per block */
	int n_blocks;
	int kv_dim;                 /* n_kv_heads * head_dim */
	enum lp_dtype type;         /* f32, f16 or bf16 */
	struct lp_buffer buf;       /* all layers' K and V */
	struct lp_tensor *k;        /* [n_layers] views [n_blocks * block_size, kv_dim] */
	struct lp_tensor *v;        /* [n_layers] likewise */
	struct lp_kv_block *blocks; /* [n_blocks] */
	int32_t *free_ids;          /* stack of free, unpublished block ids */
	int n_free;
	int32_t lru_head, lru_tail; /* cached blocks, least recently released first; -1: none */
	int n_cached;
	int32_t *table; /* [table_cap] published block ids by digest, -1 empty */
	size_t table_cap;
	uint64_t evictions;       /* cached blocks taken by alloc */
	struct evp_md_ctx_st *md; /* SHA-256 of lp_kv_cache_digest */
};

/* Bytes one block takes over all layers. */
size_t lp_kv_cache_block_bytes(int n_layers, int kv_dim, int block_size, enum lp_dtype type);

/* Allocates n_blocks blocks in be. Release with lp_kv_cache_release(). */
int lp_kv_cache_init(struct lp_kv_cache *kv, struct lp_backend *be, int n_layers, int kv_dim,
                     int block_size, int n_blocks, enum lp_dtype type, struct lp_err *err);
void lp_kv_cache_release(struct lp_kv_cache *kv);

/* A block with one reference: a free one, else the least recently
 * released cached one (unpublished first); -1 when every block is held. */
int32_t lp_kv_cache_alloc(struct lp_kv_cache *kv);
/* Drops one reference; at none the block becomes free, or cached when it
 * is published. */
void lp_kv_cache_free(struct lp_kv_cache *kv, int32_t id);
/* Blocks alloc can still hand out (free and cached). */
static inline int lp_kv_cache_available(const struct lp_kv_cache *kv)
{
	return kv->n_free + kv->n_cached;
}

/* The digest of a block of tokens (block_size of them) after parent (the
 * previous block's digest; NULL for the first block), for key (0 for the
 * base model, else the adapter version that computes it). False only when
 * libcrypto fails: then there is no digest, and nothing is looked up or
 * published. */
bool lp_kv_cache_digest(struct lp_kv_cache *kv, struct lp_kv_digest *out,
                        const struct lp_kv_digest *parent, uint64_t key, const int32_t *tokens,
                        int n_tokens);
/* The published block with digest d, with a new reference; -1 if none. */
int32_t lp_kv_cache_lookup(struct lp_kv_cache *kv, const struct lp_kv_digest *d);
/* Publishes block id (held, full, its K/V computed) under d, unless a
 * block with that digest is published already (then id stays as it is). */
void lp_kv_cache_publish(struct lp_kv_cache *kv, int32_t id, const struct lp_kv_digest *d);

#endif
