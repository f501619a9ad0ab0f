/* NeMo LoRA adapters: a .nemo file, an uncompressed tar holding
 *   model_config.yaml   the model's config with a 'peft' section:
 *                       peft.peft_scheme: lora, peft.lora_tuning:
 *                       {adapter_dim, alpha, target_modules, layer_selection,
 *                       variant} (the keys may also sit in 'peft' itself),
 *                       and the shape keys num_layers, hidden_size,
 *                       ffn_hidden_size, num_attention_heads,
 *                       num_query_groups, kv_channels
 *   model_weights.ckpt  torch.save of the adapter's state dict
 * Keys (0-based layers): model.decoder.layers.N.<adapter>.linear_in.weight
 * [adapter_dim, in] and ...linear_out.weight [out, adapter_dim] (legacy
 * models: model.language_model.encoder.layers.N...), adapters:
 *   self_attention.adapter_layer.lora_kqv_adapter          attention_qkv
 *   self_attention.adapter_layer.lora_dense_attention_adapter  attention_dense
 *   mlp.adapter_layer.lora_hto4h_adapter                  mlp_fc1
 *   mlp.adapter_layer.lora_4htoh_adapter                  mlp_fc2
 * Megatron fuses q, k and v: linear_out's rows go per query group g: the
 * group's n_heads / n_groups query heads, then key head g, then value head
 * g (head_dim rows each). mlp_fc1 fuses gate (first) and up. Each fused part
 * becomes its own pair: its rows of linear_out and linear_in, less the rank
 * columns whose linear_out entries are all zero for that part (exact: a zero
 * column adds nothing). With a dense shared linear_in every part keeps the
 * whole of it. Scale alpha / adapter_dim. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

#include "agent/adapters/lora-internal.h"
#include "agent/formats/tar.h"
#include "agent/formats/torch-checkpoint.h"
#include "common/mapped-file.h"

#define YAML_MAX_BYTES (4u << 20)
#define INTERP_DEPTH   8
/* libyaml's loader costs the square of the nesting depth (100k levels take
 * half a minute), so deeper documents are refused while streaming events,
 * before anything is built; a NeMo config nests a few levels. */
#define YAML_MAX_DEPTH 64
/* Mapping entries that key lookups may visit in all (an alias that puts a
 * large mapping inside itself would make every interpolation walk it again
 * and again). */
#define YAML_MAX_VISITS (1u << 24)

enum nemo_kind { NK_QKV, NK_DENSE, NK_FC1, NK_FC2, NK_N };

static const struct {
	const char *key;
	const char *target;
} kinds[NK_N] = {
    [NK_QKV] = {"self_attention.adapter_layer.lora_kqv_adapter", "attention_qkv"},
    [NK_DENSE] = {"self_attention.adapter_layer.lora_dense_attention_adapter", "attention_dense"},
    [NK_FC1] = {"mlp.adapter_layer.lora_hto4h_adapter", "mlp_fc1"},
    [NK_FC2] = {"mlp.adapter_layer.lora_4htoh_adapter", "mlp_fc2"},
};

struct nemo {
	const char *path;
	yaml_document_t doc;
	bool doc_ok;
	yaml_node_t *root, *lora;
	int adapter_dim;
	double alpha;
	unsigned targets; /* bit per enum nemo_kind */
	bool has_layer_sel;
	bool *layer_sel; /* [n_layers], 0-based */
	int heads, groups, head_dim;
	const char *base_model; /* inside doc */
	size_t visits;          /* mapping entries map_get has looked at */
	float **scratch;        /* converted and split matrices */
	size_t n_scratch, cap_scratch;
};

/* ---- model_config.yaml ---- */

static yaml_node_t *map_get(struct nemo *x, yaml_node_t *map, const char *key)
{
	if (!map || map->type != YAML_MAPPING_NODE)
		return NULL;
	for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top;
	     p++) {
		yaml_node_t *k;

		if (++x->visits > YAML_MAX_VISITS)
			return NULL; /* reported by lora_load_nemo */
		k = yaml_document_get_node(&x->doc, p->key);
		if (k && k->type == YAML_SCALAR_NODE &&
		    !strcmp((const char *)k->data.scalar.value, key))
			return yaml_document_get_node(&x->doc, p->value);
	}
	return NULL;
}

/* Follows OmegaConf's "${a.b.c}" interpolation from the root. */
static yaml_node_t *resolve(struct nemo *x, yaml_node_t *n)
{
	for (int depth = 0; n && n->type == YAML_SCALAR_NODE && depth < INTERP_DEPTH; depth++) {
		const char *v = (const char *)n->data.scalar.value;
		size_t len = n->data.scalar.length;
		char path[256], *save = NULL, *tok;
		yaml_node_t *cur = x->root;

		if (len < 4 || strncmp(v, "${", 2) || v[len - 1] != '}' || len - 3 >= sizeof(path))
			return n;
		memcpy(path, v + 2, len - 3);
		path[len - 3] = '\0';
		for (tok = strtok_r(path, ".", &save); tok && cur; tok = strtok_r(NULL, ".", &save))
			cur = map_get(x, cur, tok);
		n = cur;
	}
	return n;
}

static bool is_null(const yaml_node_t *n)
{
	const char *v;

	if (!n)
		return true;
	if (n->type != YAML_SCALAR_NODE || n->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
		return false;
	v = (const char *)n->data.scalar.value;
	return !*v || !strcmp(v, "null") || !strcmp(v, "~") || !strcmp(v, "Null") ||
	       !strcmp(v, "NULL");
}

static const char *scalar(const yaml_node_t *n)
{
	return n && n->type == YAML_SCALAR_NODE ? (const char *)n->data.scalar.value : NULL;
}

static bool to_int(const yaml_node_t *n, long long *out)
{
	const char *v = scalar(n);
	char *end;

	if (!v || !*v)
		return false;
	errno = 0;
	*out = strtoll(v, &end, 10);
	return !*end && !errno;
}

static bool to_num(const yaml_node_t *n, double *out)
{
	const char *v = scalar(n);
	char *end;

	if (!v || !*v)
		return false;
	*out = strtod(v, &end);
	return !*end && isfinite(*out);
}

static bool is_true(const yaml_node_t *n)
{
	const char *v = scalar(n);
	return v && (!strcmp(v, "true") || !strcmp(v, "True") || !strcmp(v, "TRUE"));
}

/* An optional positive integer key of map; 0 when null or absent. */
static int opt_int(struct nemo *x, yaml_node_t *map, const char *key, long long max, long long *out,
                   struct lp_err *err)
{
	yaml_node_t *n = resolve(x, map_get(x, map, key));

	*out = 0;
	if (is_null(n))
		return 0;
	if (!to_int(n, out) || *out <= 0 || *out > max)
		return lp_errf(err, -EINVAL,
		               "'%s': model_config.yaml: '%s' must be a positive integer", x->path,
		               key);
	return 0;
}

static int read_targets(struct nemo *x, yaml_node_t *seq, struct lp_err *err)
{
	if (is_null(seq))
		return lp_errf(err, -EINVAL, "'%s': model_config.yaml: missing 'target_modules'",
		               x->path);
	if (seq->type != YAML_SEQUENCE_NODE)
		return lp_errf(err, -EINVAL,
		               "'%s': model_config.yaml: 'target_modules' must be a list", x->path);
	for (yaml_node_item_t *i = seq->data.sequence.items.start; i < seq->data.sequence.items.top;
	     i++) {
		const char *v = scalar(yaml_document_get_node(&x->doc, *i));
		unsigned bits = 0;

		for (int k = 0; v && k < NK_N; k++) {
			if (!strcmp(v, kinds[k].target))
				bits = 1u << k;
		}
		if (v && !strcmp(v, "attention"))
			bits = 1u << NK_QKV | 1u << NK_DENSE;
		if (v && !strcmp(v, "mlp"))
			bits = 1u << NK_FC1 | 1u << NK_FC2;
		if (v && !strcmp(v, "all"))
			bits = (1u << NK_N) - 1;
		if (!bits)
			return lp_errf(
			    err, -EINVAL,
			    "module '%.64s' is not supported (nemo lora targets: "
			    "attention_qkv, attention_dense, mlp_fc1, mlp_fc2, attention, mlp, "
			    "all)",
			    v ? v : "?");
		x->targets |= bits;
	}
	return 0;
}

/* Streams the first document's events and refuses nesting deeper than
 * YAML_MAX_DEPTH (libyaml stops at the first bad level, so this costs
 * little whatever the file holds). Syntax errors are reported here too. */
static int check_yaml_depth(struct nemo *x, const struct lp_tar_member *m, struct lp_err *err)
{
	yaml_parser_t parser;
	yaml_event_t ev;
	int depth = 0, rc = 0;
	bool done = false;

	if (!yaml_parser_initialize(&parser))
		return lp_errf(err, -ENOMEM, "out of memory");
	yaml_parser_set_input_string(&parser, m->data, m->size);
	while (!done && !rc) {
		if (!yaml_parser_parse(&parser, &ev)) {
			rc = lp_errf(err, -EINVAL, "'%s': model_config.yaml: %s at line %zu",
			             x->path, parser.problem ? parser.problem : "invalid yaml",
			             parser.problem_mark.line + 1);
			break;
		}
		switch (ev.type) {
		case YAML_SEQUENCE_START_EVENT:
		case YAML_MAPPING_START_EVENT:
			if (++depth > YAML_MAX_DEPTH)
				rc = lp_errf(err, -EINVAL,
				             "'%s': model_config.yaml nests deeper than %d levels "
				             "(line %zu)",
				             x->path, YAML_MAX_DEPTH, ev.start_mark.line + 1);
			break;
		case YAML_SEQUENCE_END_EVENT:
		case YAML_MAPPING_END_EVENT:
			depth--;
			break;
		case YAML_DOCUMENT_END_EVENT:
		case YAML_STREAM_END_EVENT:
			done = true;
			break;
		default:
			break;
		}
		yaml_event_delete(&ev);
	}
	yaml_parser_delete(&parser);
	return rc;
}

static int read_config(struct nemo *x, const struct lp_tar_member *m, const struct lp_lora_shape *s,
                       struct lp_err *err)
{
	yaml_parser_t parser;
	yaml_node_t *peft, *n;
	long long v, hidden, ffn, layers, tp, pp;
	const char *scheme, *variant;
	int rc;

	if (m->size > YAML_MAX_BYTES)
		return lp_errf(err, -EINVAL, "'%s': model_config.yaml of %zu bytes is too large",
		               x->path, m->size);
	if ((rc = check_yaml_depth(x, m, err)))
		return rc;
	if (!yaml_parser_initialize(&parser))
		return lp_errf(err, -ENOMEM, "out of memory");
	yaml_parser_set_input_string(&parser, m->data, m->size);
	if (!yaml_parser_load(&parser, &x->doc)) {
		rc = lp_errf(err, -EINVAL, "'%s': model_config.yaml: %s at line %zu", x->path,
		             parser.problem ? parser.problem : "invalid yaml",
		             parser.problem_mark.line + 1);
		yaml_parser_delete(&parser);
		return rc;
	}
	yaml_parser_delete(&parser);
	x->doc_ok = true;
	x->root = yaml_document_get_root_node(&x->doc);
	if (!x->root || x->root->type != YAML_MAPPING_NODE)
		return lp_errf(err, -EINVAL, "'%s': model_config.yaml is not a mapping", x->path);

	peft = map_get(x, x->root, "peft");
	if (!peft || peft->type != YAML_MAPPING_NODE)
		return lp_errf(err, -EINVAL,
		               "'%s': model_config.yaml has no 'peft' section (not a peft adapter)",
		               x->path);
	scheme = scalar(resolve(x, map_get(x, peft, "peft_scheme")));
	if (scheme && strcasecmp(scheme, "lora"))
		return lp_errf(err, -EINVAL,
		               "'%s': peft_scheme '%.32s' is not supported (only lora)", x->path,
		               scheme);
	x->lora = map_get(x, peft, "lora_tuning");
	if (!x->lora || x->lora->type != YAML_MAPPING_NODE)
		x->lora = peft;
	variant = scalar(resolve(x, map_get(x, x->lora, "variant")));
	if (variant && strcmp(variant, "nemo"))
		return lp_errf(
		    err, -EINVAL,
		    "'%s': lora variant '%.32s' is not supported (only 'nemo', the fused "
		    "layout)",
		    x->path, variant);
	n = resolve(x, map_get(x, x->lora, "adapter_dim"));
	if (is_null(n))
		return lp_errf(err, -EINVAL, "'%s': model_config.yaml: missing 'adapter_dim'",
		               x->path);
	if (!to_int(n, &v) || v <= 0 || v > LORA_RANK_LIMIT)
		return lp_errf(err, -EINVAL,
		               "'%s': model_config.yaml: 'adapter_dim' must be a positive integer",
		               x->path);
	x->adapter_dim = (int)v;
	n = resolve(x, map_get(x, x->lora, "alpha"));
	if (is_null(n))
		return lp_errf(err, -EINVAL, "'%s': model_config.yaml: missing 'alpha'", x->path);
	if (!to_num(n, &x->alpha))
		return lp_errf(err, -EINVAL, "'%s': model_config.yaml: 'alpha' must be a number",
		               x->path);
	if (is_true(resolve(x, map_get(x, x->lora, "weight_tying"))))
		return lp_errf(err, -EINVAL, "'%s': weight_tying is set: not supported", x->path);
	if (!is_null(resolve(x, map_get(x, x->lora, "position_embedding_strategy"))))
		return lp_errf(err, -EINVAL, "'%s': position_embedding_strategy is not supported",
		               x->path);
	rc = read_targets(x, resolve(x, map_get(x, x->lora, "target_modules")), err);
	if (rc)
		return rc;

	n = resolve(x, map_get(x, x->lora, "layer_selection"));
	if (!is_null(n)) {
		if (n->type != YAML_SEQUENCE_NODE)
			return lp_errf(err, -EINVAL,
			               "'%s': model_config.yaml: 'layer_selection' must be a list",
			               x->path);
		x->has_layer_sel = true;
		for (yaml_node_item_t *i = n->data.sequence.items.start;
		     i < n->data.sequence.items.top; i++) {
			if (!to_int(yaml_document_get_node(&x->doc, *i), &v))
				return lp_errf(err, -EINVAL,
				               "'%s': model_config.yaml: 'layer_selection' holds a "
				               "non-integer",
				               x->path);
			if (v < 1 || v > s->n_layers)
				return lp_errf(
				    err, -EINVAL,
				    "'%s': layer_selection names layer %lld (1-based), but the "
				    "base model has %d layers",
				    x->path, v, s->n_layers);
			x->layer_sel[v - 1] = true;
		}
	}

	if ((rc = opt_int(x, x->root, "tensor_model_parallel_size", 1 << 20, &tp, err)) ||
	    (rc = opt_int(x, x->root, "pipeline_model_parallel_size", 1 << 20, &pp, err)))
		return rc;
	if (tp > 1 || pp > 1)
		return lp_errf(
		    err, -EINVAL,
		    "'%s': tensor or pipeline parallel checkpoints (%lld x %lld) are not "
		    "supported",
		    x->path, tp, pp);
	if ((rc = opt_int(x, x->root, "num_layers", 1 << 20, &layers, err)) ||
	    (rc = opt_int(x, x->root, "hidden_size", 1 << 24, &hidden, err)) ||
	    (rc = opt_int(x, x->root, "ffn_hidden_size", 1 << 26, &ffn, err)))
		return rc;
	if (layers && layers != s->n_layers)
		return lp_errf(
		    err, -EINVAL,
		    "'%s': model_config.yaml describes %lld layers, the base model has %d", x->path,
		    layers, s->n_layers);
	if (hidden && hidden != s->dim)
		return lp_errf(err, -EINVAL,
		               "'%s': model_config.yaml describes hidden_size %lld, the base model "
		               "has %d",
		               x->path, hidden, s->dim);
	if (ffn && ffn != s->ffn_dim)
		return lp_errf(err, -EINVAL,
		               "'%s': model_config.yaml describes ffn_hidden_size %lld, the base "
		               "model has %d",
		               x->path, ffn, s->ffn_dim);
	if ((rc = opt_int(x, x->root, "num_attention_heads", 1 << 20, &v, err)))
		return rc;
	x->heads = (int)v;
	if ((rc = opt_int(x, x->root, "num_query_groups", 1 << 20, &v, err)))
		return rc;
	x->groups = v ? (int)v : x->heads;
	if ((rc = opt_int(x, x->root, "kv_channels", 1 << 20, &v, err)))
		return rc;
	x->head_dim = v ? (int)v : x->heads && hidden ? (int)(hidden / x->heads) : 0;
	n = resolve(x, map_get(x, x->root, "restore_from_path"));
	x->base_model = is_null(n) ? NULL : scalar(n);
	return 0;
}

/* ---- weights ---- */

static float *scratch_alloc(struct nemo *x, size_t n, struct lp_err *err)
{
	float *p;

	if (x->n_scratch == x->cap_scratch) {
		size_t cap = x->cap_scratch ? x->cap_scratch * 2 : 32;
		float **s = realloc(x->scratch, cap * sizeof(*s));
		if (!s) {
			lp_errf(err, -ENOMEM, "out of memory");
			return NULL;
		}
		x->scratch = s;
		x->cap_scratch = cap;
	}
	p = malloc((n ? n : 1) * sizeof(float));
	if (!p) {
		lp_errf(err, -ENOMEM, "out of memory for %zu lora values", n);
		return NULL;
	}
	x->scratch[x->n_scratch++] = p;
	return p;
}

/* Parses "<prefix>N.<adapter key>.linear_{in,out}.weight". */
static int parse_key(const char *name, int *layer, int *kind, int *is_out)
{
	static const char *const prefixes[] = {"model.decoder.layers.",
	                                       "model.language_model.encoder.layers."};
	const char *p = NULL;
	char *end;
	long v;

	for (size_t i = 0; i < 2 && !p; i++) {
		if (!strncmp(name, prefixes[i], strlen(prefixes[i])))
			p = name + strlen(prefixes[i]);
	}
	if (!p || *p < '0' || *p > '9' || strspn(p, "0123456789") > 9)
		return -1;
	v = strtol(p, &end, 10);
	if (*end != '.')
		return -1;
	p = end + 1;
	for (int k = 0; k < NK_N; k++) {
		size_t n = strlen(kinds[k].key);
		if (strncmp(p, kinds[k].key, n))
			continue;
		if (!strcmp(p + n, ".linear_in.weight"))
			*is_out = 0;
		else if (!strcmp(p + n, ".linear_out.weight"))
			*is_out = 1;
		else
			return -1;
		*layer = (int)v;
		*kind = k;
		return 0;
	}
	return -1;
}

/* linear_out row (in Megatron's order) of row j of q, k or v. */
static int qkv_row(const struct nemo *x, int part, int j)
{
	int per = x->heads / x->groups, hd = x->head_dim, block = (per + 2) * hd;

	if (part == 0)
		return j / (per * hd) * block + j % (per * hd);
	return j / hd * block + (per + part - 1) * hd + j % hd;
}

/* Adds the pair for one part of a fused adapter: rows [out] of lout (each
 * given by row_of), with the rank columns that are non-zero there. */
static int add_part(struct nemo *x, struct lora_plan *plan, int layer, enum lp_lora_target t,
                    const float *lin, const float *lout, const struct lp_fmt_tensor *tin,
                    const struct lp_fmt_tensor *tout, int in, int out, int kind, int part,
                    int row_base, struct lp_err *err)
{
	int d = x->adapter_dim, r = 0;
	int *keep, *rows;
	float *a, *b;
	struct lora_plan_pair *pp;
	int rc = 0;

	keep = malloc((size_t)d * sizeof(int));
	rows = malloc((size_t)out * sizeof(int));
	if (!keep || !rows) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	for (int i = 0; i < out; i++)
		rows[i] = kind == NK_QKV ? qkv_row(x, part, i) : row_base + i;
	for (int j = 0; j < d; j++) {
		bool nz = false;
		for (int i = 0; i < out && !nz; i++)
			nz = lout[(size_t)rows[i] * d + j] != 0.0f;
		if (nz)
			keep[r++] = j;
	}
	if (!r)
		goto out;
	a = scratch_alloc(x, (size_t)r * in, err);
	b = a ? scratch_alloc(x, (size_t)out * r, err) : NULL;
	if (!b) {
		rc = err->code;
		goto out;
	}
	for (int k = 0; k < r; k++)
		memcpy(a + (size_t)k * in, lin + (size_t)keep[k] * in, (size_t)in * sizeof(float));
	for (int i = 0; i < out; i++)
		for (int k = 0; k < r; k++)
			b[(size_t)i * r + k] = lout[(size_t)rows[i] * d + keep[k]];
	pp = lora_plan_at(plan, layer, t);
	pp->rank = r;
	pp->a = (struct lora_src){a, LP_FMT_F32, tin->name};
	pp->b = (struct lora_src){b, LP_FMT_F32, tout->name};
	pp->scale = x->alpha / (double)d;
out:
	free(keep);
	free(rows);
	return rc;
}

static int check_tensor(const struct lp_fmt_tensor *t, int64_t rows, int64_t cols,
                        struct lp_err *err)
{
	int rc = lora_check_float(t, err);

	return rc ? rc : lora_check_shape(t, rows, cols, err);
}

static int add_adapter(struct nemo *x, struct lora_plan *plan, const struct lp_lora_shape *s,
                       int layer, int kind, const struct lp_fmt_tensor *tin,
                       const struct lp_fmt_tensor *tout, struct lp_err *err)
{
	int d = x->adapter_dim, in, out, rc;
	float *lin, *lout;

	switch (kind) {
	case NK_QKV:
		in = s->dim, out = s->q_dim + 2 * s->kv_dim;
		break;
	case NK_DENSE:
		in = s->q_dim, out = s->dim;
		break;
	case NK_FC1:
		in = s->dim, out = 2 * s->ffn_dim;
		break;
	default:
		in = s->ffn_dim, out = s->dim;
		break;
	}
	if ((rc = check_tensor(tin, d, in, err)) || (rc = check_tensor(tout, out, d, err)))
		return rc;
	lin = scratch_alloc(x, (size_t)d * in, err);
	lout = lin ? scratch_alloc(x, (size_t)out * d, err) : NULL;
	if (!lout)
		return err->code;
	lora_to_f32(lin, tin->data, tin->type, (size_t)d * in);
	lora_to_f32(lout, tout->data, tout->type, (size_t)out * d);
	if ((rc = lora_check_finite(lin, (size_t)d, (size_t)in, tin->name, err)) ||
	    (rc = lora_check_finite(lout, (size_t)out, (size_t)d, tout->name, err)))
		return rc;
	switch (kind) {
	case NK_QKV:
		if ((rc = add_part(x, plan, layer, LP_LORA_Q, lin, lout, tin, tout, in, s->q_dim,
		                   kind, 0, 0, err)) ||
		    (rc = add_part(x, plan, layer, LP_LORA_K, lin, lout, tin, tout, in, s->kv_dim,
		                   kind, 1, 0, err)))
			return rc;
		return add_part(x, plan, layer, LP_LORA_V, lin, lout, tin, tout, in, s->kv_dim,
		                kind, 2, 0, err);
	case NK_DENSE:
		return add_part(x, plan, layer, LP_LORA_O, lin, lout, tin, tout, in, out, kind, 0,
		                0, err);
	case NK_FC1:
		if ((rc = add_part(x, plan, layer, LP_LORA_GATE, lin, lout, tin, tout, in,
		                   s->ffn_dim, kind, 0, 0, err)))
			return rc;
		return add_part(x, plan, layer, LP_LORA_UP, lin, lout, tin, tout, in, s->ffn_dim,
		                kind, 0, s->ffn_dim, err);
	default:
		return add_part(x, plan, layer, LP_LORA_DOWN, lin, lout, tin, tout, in, out, kind,
		                0, 0, err);
	}
}

/* A module the config targets in a layer the file holds no adapter for:
 * every loraplane target it covers is absent. */
static void mark_absent(struct lora_plan *plan, int layer, enum nemo_kind kind)
{
	static const enum lp_lora_target parts[NK_N][3] = {
	    [NK_QKV] = {LP_LORA_Q, LP_LORA_K, LP_LORA_V},
	    [NK_DENSE] = {LP_LORA_O, LP_LORA_O, LP_LORA_O},
	    [NK_FC1] = {LP_LORA_GATE, LP_LORA_UP, LP_LORA_UP},
	    [NK_FC2] = {LP_LORA_DOWN, LP_LORA_DOWN, LP_LORA_DOWN},
	};
	static const int n_parts[NK_N] = {[NK_QKV] = 3, [NK_DENSE] = 1, [NK_FC1] = 2, [NK_FC2] = 1};

	for (int i = 0; i < n_parts[kind]; i++)
		lp_lora_absent_add(&plan->absent, layer, parts[kind][i]);
}

static int build_plan(struct nemo *x, const struct lp_torch_ckpt *ck, const struct lp_lora_shape *s,
                      struct lora_plan *plan, struct lp_err *err)
{
	size_t n_slots = (size_t)s->n_layers * NK_N * 2;
	const struct lp_fmt_tensor **slots;
	int rc = 0;

	slots = calloc(n_slots, sizeof(*slots));
	if (!slots)
		return lp_errf(err, -ENOMEM, "out of memory");
	for (size_t i = 0; i < lp_torch_ckpt_count(ck); i++) {
		const struct lp_fmt_tensor *t = lp_torch_ckpt_at(ck, i);
		int layer, kind, is_out;
		const struct lp_fmt_tensor **slot;

		if (parse_key(t->name, &layer, &kind, &is_out)) {
			rc = lp_errf(
			    err, -EINVAL,
			    "unexpected tensor '%s' in '%s' (not a lora linear_in or linear_out "
			    "of attention_qkv, attention_dense, mlp_fc1 or mlp_fc2)",
			    t->name, x->path);
			goto out;
		}
		if (layer >= s->n_layers) {
			rc = lp_errf(
			    err, -EINVAL,
			    "layer %d of '%s' is out of range (the base model has %d layers)",
			    layer, t->name, s->n_layers);
			goto out;
		}
		if (!(x->targets & (1u << kind))) {
			rc = lp_errf(
			    err, -EINVAL,
			    "'%s' is for '%s', which target_modules in model_config.yaml does "
			    "not list",
			    t->name, kinds[kind].target);
			goto out;
		}
		if (x->has_layer_sel && !x->layer_sel[layer]) {
			rc = lp_errf(
			    err, -EINVAL,
			    "'%s' is for layer %d (1-based), which layer_selection does not "
			    "list",
			    t->name, layer + 1);
			goto out;
		}
		slot = &slots[((size_t)layer * NK_N + kind) * 2 + is_out];
		if (*slot) {
			rc = lp_errf(err, -EINVAL, "'%s' and '%s' are the same weight",
			             (*slot)->name, t->name);
			goto out;
		}
		*slot = t;
	}
	for (int l = 0; l < s->n_layers; l++) {
		for (int k = 0; k < NK_N; k++) {
			const struct lp_fmt_tensor *tin = slots[((size_t)l * NK_N + k) * 2];
			const struct lp_fmt_tensor *tout = slots[((size_t)l * NK_N + k) * 2 + 1];

			if (!tin && !tout) {
				if ((x->targets & (1u << k)) &&
				    (!x->has_layer_sel || x->layer_sel[l]))
					mark_absent(plan, l, (enum nemo_kind)k);
				continue;
			}
			if (!tin || !tout) {
				rc = lp_errf(err, -EINVAL, "'%s' has no matching linear_%s in '%s'",
				             (tin ? tin : tout)->name, tin ? "out" : "in", x->path);
				goto out;
			}
			if (k == NK_QKV &&
			    (x->heads <= 0 || x->groups <= 0 || x->head_dim <= 0 ||
			     x->heads % x->groups || x->heads * x->head_dim != s->q_dim ||
			     x->groups * x->head_dim != s->kv_dim)) {
				rc = lp_errf(
				    err, -EINVAL,
				    "'%s': model_config.yaml's num_attention_heads %d, "
				    "num_query_groups %d and kv_channels %d do not fit the base "
				    "model (q %d, kv %d), and the fused qkv adapter needs them",
				    x->path, x->heads, x->groups, x->head_dim, s->q_dim, s->kv_dim);
				goto out;
			}
			rc = add_adapter(x, plan, s, l, k, tin, tout, err);
			if (rc)
				goto out;
		}
	}
out:
	free(slots);
	return rc;
}

int lora_load_nemo(struct lp_lora **out, const char *root, const char *file,
                   const struct lp_lora_shape *s, struct lp_err *err)
{
	struct lp_mapped_file mf = {0};
	struct lp_tar tar = {0};
	struct lp_torch_ckpt *ck = NULL;
	struct lora_plan plan = {0};
	struct nemo x = {.path = file};
	const struct lp_tar_member *cfg, *w;
	char label[4200];
	int rc;

	*out = NULL;
	x.layer_sel = calloc((size_t)s->n_layers, sizeof(bool));
	if (!x.layer_sel)
		return lp_errf(err, -ENOMEM, "out of memory");
	if ((rc = lp_mapped_file_open_in(&mf, root, file, err)) ||
	    (rc = lp_tar_read(&tar, mf.data, mf.size, file, err)))
		goto out;
	cfg = lp_tar_find(&tar, "model_config.yaml");
	w = lp_tar_find(&tar, "model_weights.ckpt");
	if (!w)
		w = lp_tar_find(&tar, "mp_rank_00/model_weights.ckpt");
	if (!cfg) {
		rc = lp_errf(err, -ENOENT, "'%s' holds no model_config.yaml", file);
		goto out;
	}
	if (!w) {
		for (size_t i = 0; i < tar.n; i++) {
			if (!strncmp(tar.members[i].name, "model_weights/", 14)) {
				rc = lp_errf(
				    err, -EINVAL,
				    "'%s' holds a distributed checkpoint (model_weights/), which "
				    "is not supported",
				    file);
				goto out;
			}
		}
		rc = lp_errf(err, -ENOENT, "'%s' holds no model_weights.ckpt", file);
		goto out;
	}
	rc = read_config(&x, cfg, s, err);
	if (x.visits > YAML_MAX_VISITS) /* whatever read_config concluded without them */
		rc = lp_errf(err, -EINVAL,
		             "'%s': model_config.yaml: key lookups visit more than %u mapping "
		             "entries (an alias loop?)",
		             file, YAML_MAX_VISITS);
	if (rc)
		goto out;
	if ((rc = lora_check_base_model(x.base_model, s, err)))
		goto out;
	snprintf(label, sizeof(label), "%s: model_weights.ckpt", file);
	if ((rc = lp_torch_ckpt_open_mem(&ck, w->data, w->size, label, err)) ||
	    (rc = lora_plan_init(&plan, s->n_layers, err)) ||
	    (rc = build_plan(&x, ck, s, &plan, err)))
		goto out;
	rc = lora_plan_finish(out, &plan, s, "nemo", x.base_model, err);
out:
	lora_plan_release(&plan);
	lp_torch_ckpt_free(ck);
	for (size_t i = 0; i < x.n_scratch; i++)
		free(x.scratch[i]);
	free(x.scratch);
	free(x.layer_sel);
	if (x.doc_ok)
		yaml_document_delete(&x.doc);
	lp_tar_release(&tar);
	lp_mapped_file_release(&mf);
	return rc;
}
