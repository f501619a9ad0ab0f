/* Paged key/value cache and its prefix cache; see kv-cache.h. */
#include "agent/engine/kv-cache.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

size_t lp_kv_cache_block_bytes(int n_layers, int kv_dim, int block_size, enum lp_dtype type)
{
	return 2 * (size_t)n_layers * (size_t)block_size * lp_dtype_row_bytes(type, kv_dim);
}

int lp_kv_cache_init(struct lp_kv_cache *kv, struct lp_backend *be, int n_layers, int kv_dim,
                     int block_size, int n_blocks, enum lp_dtype type, struct lp_err *err)
{
	size_t rows, layer_bytes;
	int rc;

	memset(kv, 0, sizeof(*kv));
	kv->lru_head = kv->lru_tail = -1;
	if (type != LP_DTYPE_F32 && type != LP_DTYPE_F16 && type != LP_DTYPE_BF16)
		return lp_errf(err, -EINVAL, "kv cache type must be f32, f16 or bf16");
	if (n_blocks < 1 || block_size < 1 || n_layers < 1 || kv_dim < 1)
		return lp_errf(err, -EINVAL, "kv cache needs at least one block");
	kv->be = be;
	kv->n_layers = n_layers;
	kv->block_size = block_size;
	kv->n_blocks = n_blocks;
	kv->kv_dim = kv_dim;
	kv->type = type;
	rows = (size_t)n_blocks * (size_t)block_size;
	layer_bytes = rows * lp_dtype_row_bytes(type, kv_dim);
	/* a table at most half full */
	kv->table_cap = 16;
	while (kv->table_cap < 2 * (size_t)n_blocks)
		kv->table_cap *= 2;
	kv->k = calloc((size_t)n_layers, sizeof(*kv->k));
	kv->v = calloc((size_t)n_layers, sizeof(*kv->v));
	kv->free_ids = malloc((size_t)n_blocks * sizeof(*kv->free_ids));
	kv->blocks = calloc((size_t)n_blocks, sizeof(*kv->blocks));
	kv->table = malloc(kv->table_cap * sizeof(*kv->table));
	kv->md = EVP_MD_CTX_new();
	if (!kv->k || !kv->v || !kv->free_ids || !kv->blocks || !kv->table || !kv->md) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto fail;
	}
	rc = lp_backend_alloc(be, 2 * (size_t)n_layers * layer_bytes, &kv->buf, err);
	if (rc)
		goto fail;
	for (int l = 0; l < n_layers; l++) {
		char *base = (char *)kv->buf.data + 2 * (size_t)l * layer_bytes;
		kv->k[l] = (struct lp_tensor){base, type, (int64_t)rows, kv_dim};
		kv->v[l] = (struct lp_tensor){base + layer_bytes, type, (int64_t)rows, kv_dim};
	}
	for (size_t i = 0; i < kv->table_cap; i++)
		kv->table[i] = -1;
	for (int i = 0; i < n_blocks; i++)
		kv->blocks[i].lru_prev = kv->blocks[i].lru_next = -1;
	/* hand out low ids first */
	for (int i = 0; i < n_blocks; i++)
		kv->free_ids[i] = n_blocks - 1 - i;
	kv->n_free = n_blocks;
	return 0;
fail:
	lp_kv_cache_release(kv);
	return rc;
}

void lp_kv_cache_release(struct lp_kv_cache *kv)
{
	if (kv->be)
		lp_backend_free(kv->be, &kv->buf);
	free(kv->k);
	free(kv->v);
	free(kv->free_ids);
	free(kv->blocks);
	free(kv->table);
	EVP_MD_CTX_free(kv->md);
	memset(kv, 0, sizeof(*kv));
	kv->lru_head = kv->lru_tail = -1;
}

/* ---- the digest table: open addressing, linear probing ---- */

static size_t table_home(const struct lp_kv_cache *kv, const struct lp_kv_digest *d)
{
	uint64_t h;

	memcpy(&h, d->b, sizeof(h));
	return (size_t)h & (kv->table_cap - 1);
}

/* The table index holding d, or of the empty entry where it would go. */
static size_t table_find(const struct lp_kv_cache *kv, const struct lp_kv_digest *d)
{
	size_t i = table_home(kv, d);

	while (kv->table[i] >= 0 &&
	       memcmp(kv->blocks[kv->table[i]].digest.b, d->b, LP_KV_DIGEST_BYTES))
		i = (i + 1) & (kv->table_cap - 1);
	return i;
}

/* Removes published block id from the table (backward-shift deletion, so
 * that no probe sequence is broken). */
static void table_remove(struct lp_kv_cache *kv, int32_t id)
{
	size_t mask = kv->table_cap - 1, i = table_find(kv, &kv->blocks[id].digest);

	kv->table[i] = -1;
	for (size_t j = (i + 1) & mask; kv->table[j] >= 0; j = (j + 1) & mask) {
		size_t home = table_home(kv, &kv->blocks[kv->table[j]].digest);
		/* move j back into the hole at i when its home is not in (i, j] */
		if (((j - home) & mask) >= ((j - i) & mask)) {
			kv->table[i] = kv->table[j];
			kv->table[j] = -1;
			i = j;
		}
	}
	kv->blocks[id].published = false;
}

/* ---- the LRU list of cached blocks ---- */

static void lru_unlink(struct lp_kv_cache *kv, int32_t id)
{
	struct lp_kv_block *b = &kv->blocks[id];

	if (b->lru_prev >= 0)
		kv->blocks[b->lru_prev].lru_next = b->lru_next;
	else
		kv->lru_head = b->lru_next;
	if (b->lru_next >= 0)
		kv->blocks[b->lru_next].lru_prev = b->lru_prev;
	else
		kv->lru_tail = b->lru_prev;
	b->lru_prev = b->lru_next = -1;
	kv->n_cached--;
}

static void lru_append(struct lp_kv_cache *kv, int32_t id)
{
	struct lp_kv_block *b = &kv->blocks[id];

	b->lru_prev = kv->lru_tail;
	b->lru_next = -1;
	if (kv->lru_tail >= 0)
		kv->blocks[kv->lru_tail].lru_next = id;
	else
		kv->lru_head = id;
	kv->lru_tail = id;
	kv->n_cached++;
}

/* ---- blocks ---- */

int32_t lp_kv_cache_alloc(struct lp_kv_cache *kv)
{
	int32_t id;

	if (kv->n_free) {
		id = kv->free_ids[--kv->n_free];
	} else if (kv->lru_head >= 0) {
		id = kv->lru_head;
		lru_unlink(kv, id);
		table_remove(kv, id);
		kv->evictions++;
	} else {
		return -1;
	}
	kv->blocks[id].refs = 1;
	return id;
}

void lp_kv_cache_free(struct lp_kv_cache *kv, int32_t id)
{
	struct lp_kv_block *b = &kv->blocks[id];

	if (--b->refs > 0)
		return;
	if (b->published)
		lru_append(kv, id);
	else
		kv->free_ids[kv->n_free++] = id;
}

bool lp_kv_cache_digest(struct lp_kv_cache *kv, struct lp_kv_digest *out,
                        const struct lp_kv_digest *parent, uint64_t key, const int32_t *tokens,
                        int n_tokens)
{
	uint8_t k[8];
	unsigned int len = 0;

	for (int i = 0; i < 8; i++)
		k[i] = (uint8_t)(key >> (8 * i));
	/* one context, made at init, reset by each EVP_DigestInit_ex */
	return kv->md && EVP_DigestInit_ex(kv->md, EVP_sha256(), NULL) == 1 &&
	       (!parent || EVP_DigestUpdate(kv->md, parent->b, sizeof(parent->b)) == 1) &&
	       EVP_DigestUpdate(kv->md, k, sizeof(k)) == 1 &&
	       EVP_DigestUpdate(kv->md, tokens, (size_t)n_tokens * sizeof(*tokens)) == 1 &&
	       EVP_DigestFinal_ex(kv->md, out->b, &len) == 1 && len == LP_KV_DIGEST_BYTES;
}

int32_t lp_kv_cache_lookup(struct lp_kv_cache *kv, const struct lp_kv_digest *d)
{
	int32_t id = kv->table[table_find(kv, d)];

	if (id < 0)
		return -1;
	if (kv->blocks[id].refs++ == 0)
		lru_unlink(kv, id);
	return id;
}

void lp_kv_cache_publish(struct lp_kv_cache *kv, int32_t id, const struct lp_kv_digest *d)
{
	size_t i = table_find(kv, d);

	if (kv->table[i] >= 0 || kv->blocks[id].published)
		return;
	kv->blocks[id].digest = *d;
	kv->blocks[id].published = true;
	kv->table[i] = id;
}
