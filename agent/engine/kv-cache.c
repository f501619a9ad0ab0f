/* Paged key/value cache; see kv-cache.h. */
#include "agent/engine/kv-cache.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

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
	kv->k = calloc((size_t)n_layers, sizeof(*kv->k));
	kv->v = calloc((size_t)n_layers, sizeof(*kv->v));
	kv->free_ids = malloc((size_t)n_blocks * sizeof(*kv->free_ids));
	if (!kv->k || !kv->v || !kv->free_ids) {
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
	memset(kv, 0, sizeof(*kv));
}

int32_t lp_kv_cache_alloc(struct lp_kv_cache *kv)
{
	return kv->n_free ? kv->free_ids[--kv->n_free] : -1;
}

void lp_kv_cache_free(struct lp_kv_cache *kv, int32_t id)
{
	kv->free_ids[kv->n_free++] = id;
}
