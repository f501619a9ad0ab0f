/* TensorRT-LLM LoRA adapters: a directory with
 *   model.lora_config.npy   int32 [1, N, 3] (or [N, 3]): rows of
 *                           (module id, layer, rank); newer runtimes add a
 *                           fourth column, is_dora, which must be 0
 *   model.lora_weights.npy  f32 or f16 [1, N, max_row] (or [N, max_row]):
 *                           row i is A [rank, in] flattened, then B [out,
 *                           rank] flattened, then zeros
 * Module ids are TensorRT-LLM's: 0 attn_qkv (B rows q, then k, then v, one
 * A for all three), 1 attn_q, 2 attn_k, 3 attn_v, 4 attn_dense (o_proj),
 * 5 mlp_h_to_4h (gate_proj), 6 mlp_4h_to_h (down_proj), 7 mlp_gate
 * (up_proj). Converters fold the scale into B, so the scale here is 1. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent/adapters/lora-internal.h"
#include "agent/formats/npy.h"
#include "common/mapped-file.h"
#include "kernels/dtype.h"

#define ROW_NAME_LEN 80

static const char *const module_names[] = {
    "attn_qkv",   "attn_q",      "attn_k",      "attn_v",
    "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate",
};

/* The targets a module id feeds, with the first B row of each. */
static int module_targets(int id, const struct lp_lora_shape *s, enum lp_lora_target *t, int *row0,
                          int *in, int *out)
{
	static const enum lp_lora_target single[] = {
	    LP_LORA_Q, LP_LORA_Q,    LP_LORA_K,    LP_LORA_V,
	    LP_LORA_O, LP_LORA_GATE, LP_LORA_DOWN, LP_LORA_UP,
	};
	int o;

	if (id == 0) {
		t[0] = LP_LORA_Q, t[1] = LP_LORA_K, t[2] = LP_LORA_V;
		row0[0] = 0, row0[1] = s->q_dim, row0[2] = s->q_dim + s->kv_dim;
		*in = s->dim;
		*out = s->q_dim + 2 * s->kv_dim;
		return 3;
	}
	t[0] = single[id];
	row0[0] = 0;
	lp_lora_target_dims(s, t[0], in, &o);
	*out = o;
	return 1;
}

static int64_t config_value(const struct lp_fmt_tensor *c, size_t i)
{
	const unsigned char *p = (const unsigned char *)c->data;

	if (c->type == LP_FMT_I32) {
		int32_t v;
		memcpy(&v, p + 4 * i, 4);
		return v;
	}
	int64_t v;
	memcpy(&v, p + 8 * i, 8);
	return v;
}

static bool is_zero(const struct lp_fmt_tensor *w, const unsigned char *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		float f;
		if (w->type == LP_FMT_F32) {
			memcpy(&f, p + 4 * i, 4);
		} else {
			uint16_t h;
			memcpy(&h, p + 2 * i, 2);
			f = lp_f16_to_f32(h);
		}
		if (f != 0.0f)
			return false;
	}
	return true;
}

/* Rows and row length of a [1, N, M] or [N, M] array. */
static bool rows_of(const struct lp_fmt_tensor *a, int64_t *rows, int64_t *cols)
{
	if (a->n_dims == 3 && a->shape[0] == 1) {
		*rows = a->shape[1];
		*cols = a->shape[2];
		return true;
	}
	if (a->n_dims == 2) {
		*rows = a->shape[0];
		*cols = a->shape[1];
		return true;
	}
	return false;
}

int lora_load_trtllm(struct lp_lora **out, const char *root, const char *dir,
                     const struct lp_lora_shape *s, struct lp_err *err)
{
	char cpath[4096], wpath[4096];
	struct lp_mapped_file cf = {0}, wf = {0};
	struct lp_npy cfg, w;
	struct lora_plan plan = {0};
	int64_t n_rows, ncol, w_rows, row_len;
	size_t esize;
	char *names = NULL;
	int *owner = NULL;
	int rc;

	*out = NULL;
	if (snprintf(cpath, sizeof(cpath), "%s/model.lora_config.npy", dir) >= (int)sizeof(cpath) ||
	    snprintf(wpath, sizeof(wpath), "%s/model.lora_weights.npy", dir) >= (int)sizeof(wpath))
		return lp_errf(err, -ENAMETOOLONG, "adapter path '%.100s...' is too long", dir);
	if ((rc = lp_mapped_file_open_in(&cf, root, cpath, err)) ||
	    (rc = lp_mapped_file_open_in(&wf, root, wpath, err)))
		goto out;
	if ((rc = lp_npy_parse(&cfg, cf.data, cf.size, cpath, err)) ||
	    (rc = lp_npy_parse(&w, wf.data, wf.size, wpath, err)))
		goto out;
	if ((cfg.t.type != LP_FMT_I32 && cfg.t.type != LP_FMT_I64) ||
	    !rows_of(&cfg.t, &n_rows, &ncol) || (ncol != 3 && ncol != 4)) {
		rc = lp_errf(err, -EINVAL,
		             "'%s' must be an int32 array of shape [1, N, 3] (module id, layer, "
		             "rank), not %s with %d dimensions",
		             cpath, cfg.descr, cfg.t.n_dims);
		goto out;
	}
	if (w.t.type != LP_FMT_F32 && w.t.type != LP_FMT_F16) {
		rc = lp_errf(err, -EINVAL,
		             "'%s' has dtype '%s'; lora weights must be float32 or float16", wpath,
		             w.descr);
		goto out;
	}
	if (!rows_of(&w.t, &w_rows, &row_len) || w_rows != n_rows) {
		rc = lp_errf(err, -EINVAL, "'%s' must have shape [1, %lld, max_row] to match '%s'",
		             wpath, (long long)n_rows, cpath);
		goto out;
	}
	if (n_rows == 0 || n_rows > (int64_t)s->n_layers * 8) {
		rc = lp_errf(err, -EINVAL, "'%s' has %lld rows; a %d-layer model takes 1 to %d",
		             cpath, (long long)n_rows, s->n_layers, s->n_layers * 8);
		goto out;
	}
	esize = w.t.type == LP_FMT_F32 ? 4 : 2;
	names = calloc((size_t)n_rows, ROW_NAME_LEN);
	owner = calloc((size_t)s->n_layers * LP_LORA_N_TARGETS, sizeof(*owner));
	if (!names || !owner) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	if ((rc = lora_plan_init(&plan, s->n_layers, err)))
		goto out;
	for (int64_t i = 0; i < n_rows; i++) {
		size_t c0 = (size_t)i * (size_t)ncol;
		int64_t id = config_value(&cfg.t, c0), layer = config_value(&cfg.t, c0 + 1),
		        rank = config_value(&cfg.t, c0 + 2);
		const unsigned char *row =
		    (const unsigned char *)w.t.data + (size_t)i * (size_t)row_len * esize;
		enum lp_lora_target t[3];
		int row0[3], in, o, n;
		int64_t need;
		char *name = names + (size_t)i * ROW_NAME_LEN;

		if (id < 0 || id > 7) {
			rc = lp_errf(err, -EINVAL,
			             "'%s' row %lld: module id %lld is not supported (0 attn_qkv, "
			             "1 attn_q, 2 attn_k, 3 attn_v, 4 attn_dense, 5 mlp_h_to_4h, "
			             "6 mlp_4h_to_h, 7 mlp_gate)",
			             cpath, (long long)i, (long long)id);
			goto out;
		}
		if (ncol == 4 && config_value(&cfg.t, c0 + 3) != 0) {
			rc = lp_errf(err, -EINVAL,
			             "'%s' row %lld (%s): DoRA rows (is_dora 1) are not supported",
			             cpath, (long long)i, module_names[id]);
			goto out;
		}
		if (layer < 0 || layer >= s->n_layers) {
			rc = lp_errf(
			    err, -EINVAL,
			    "layer %lld of '%s' row %lld (%s) is out of range (the base model "
			    "has %d layers)",
			    (long long)layer, cpath, (long long)i, module_names[id], s->n_layers);
			goto out;
		}
		if (rank <= 0 || rank > LORA_RANK_LIMIT) {
			rc = lp_errf(err, -EINVAL,
			             "'%s' row %lld (%s, layer %lld): rank %lld is invalid", cpath,
			             (long long)i, module_names[id], (long long)layer,
			             (long long)rank);
			goto out;
		}
		n = module_targets((int)id, s, t, row0, &in, &o);
		if (rank > s->max_rank) {
			rc = lp_errf(err, -EINVAL,
			             "rank %lld of '%s' exceeds --max-lora-rank %d (layer "
			             "%lld)",
			             (long long)rank, lp_lora_target_name(t[0]), s->max_rank,
			             (long long)layer);
			goto out;
		}
		need = rank * ((int64_t)in + o);
		if (need > row_len) {
			rc = lp_errf(
			    err, -EINVAL,
			    "'%s' row %lld (%s, layer %lld, rank %lld) needs %lld values for "
			    "the base model's dims, but rows hold %lld",
			    wpath, (long long)i, module_names[id], (long long)layer,
			    (long long)rank, (long long)need, (long long)row_len);
			goto out;
		}
		if (!is_zero(&w.t, row + (size_t)need * esize, (size_t)(row_len - need))) {
			rc = lp_errf(
			    err, -EINVAL,
			    "'%s' row %lld (%s, layer %lld, rank %lld): values past the %lld "
			    "the base model's dims need are not zero (an adapter for another "
			    "model?)",
			    wpath, (long long)i, module_names[id], (long long)layer,
			    (long long)rank, (long long)need);
			goto out;
		}
		snprintf(name, ROW_NAME_LEN, "model.lora_weights.npy row %lld (%s, layer %lld)",
		         (long long)i, module_names[id], (long long)layer);
		for (int k = 0; k < n; k++) {
			struct lora_plan_pair *pp = lora_plan_at(&plan, (int)layer, t[k]);
			int *own = &owner[(size_t)layer * LP_LORA_N_TARGETS + t[k]];

			if (pp->rank) {
				rc = lp_errf(err, -EINVAL,
				             "'%s' rows %d and %lld both adapt '%s' of layer %lld",
				             cpath, *own, (long long)i, lp_lora_target_name(t[k]),
				             (long long)layer);
				goto out;
			}
			*own = (int)i;
			pp->rank = (int)rank;
			pp->a = (struct lora_src){row, w.t.type, name};
			pp->b = (struct lora_src){
			    row + ((size_t)rank * (size_t)in + (size_t)row0[k] * (size_t)rank) *
			              esize,
			    w.t.type, name};
			pp->scale = 1.0;
		}
	}
	rc = lora_plan_finish(out, &plan, s, "trtllm", NULL, err);
out:
	lora_plan_release(&plan);
	free(names);
	free(owner);
	lp_mapped_file_release(&cf);
	lp_mapped_file_release(&wf);
	return rc;
}
