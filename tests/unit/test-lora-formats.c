/* Tests for LoRA adapter loading in every format: the committed fixtures
 * (PEFT adapters made with the real peft library and their converted
 * variants, tests/fixtures/lora/), adapters written here in a temp dir
 * (safetensors, torch zip checkpoints, .npy, .nemo tars, each built byte by
 * byte), every kind of invalid adapter with its message, truncation and
 * corruption of each container format, and the load time of a SmolLM2-sized
 * adapter. */
#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "agent/adapters/lora.h"
#include "agent/formats/npy.h"
#include "agent/formats/tar.h"
#include "agent/formats/torch-checkpoint.h"
#include "agent/formats/safetensors.h"
#include "common/buf.h"
#include "kernels/dtype.h"
#include "tests/test.h"

#define BUF_MAX (256u << 20)

/* Element i, in the file's [out, rank] order, of a pair's B (stored
 * transposed, [rank, out], in panels). */
static float b_at(const struct lp_lora_pair *p, int out, size_t i)
{
	return lp_lora_b_at(p, out, (int)(i % (size_t)p->rank), (int)(i / (size_t)p->rank));
}

/* Value i of a pair's A or of its stored B, in storage order, as f32. */
static float stored(const void *w, enum lp_dtype t, size_t i)
{
	uint16_t h;

	if (t == LP_DTYPE_F32)
		return ((const float *)w)[i];
	memcpy(&h, (const uint16_t *)w + i, 2);
	return t == LP_DTYPE_F16 ? lp_f16_to_f32(h) : lp_bf16_to_f32(h);
}
#define A_VAL(p, i) stored((p)->a, (p)->a_type, (i))
#define B_VAL(p, i) stored((p)->b, (p)->b_type, (i))

static char tmp_root[64];
static int tmp_seq;

/* ---- files ---- */

static void new_dir(char *out, size_t cap)
{
	snprintf(out, cap, "%s/d%d", tmp_root, tmp_seq++);
	if (mkdir(out, 0755) != 0)
		abort();
}

static int write_file(const char *dir, const char *name, const void *d, size_t n)
{
	char path[512];
	FILE *f;

	if (name)
		snprintf(path, sizeof(path), "%s/%s", dir, name);
	else
		snprintf(path, sizeof(path), "%s", dir);
	f = fopen(path, "wb");
	if (!f)
		return -1;
	if (n && fwrite(d, 1, n, f) != n) {
		fclose(f);
		return -1;
	}
	return fclose(f) == 0 ? 0 : -1;
}

static unsigned char *read_all(const char *path, size_t *n)
{
	struct lp_buf b;

	lp_buf_init(&b, BUF_MAX);
	if (lp_buf_read_file(&b, path, BUF_MAX, NULL) != 0) {
		lp_buf_release(&b);
		return NULL;
	}
	return (unsigned char *)lp_buf_detach(&b, n);
}

static int copy_file(const char *src, const char *dir, const char *name, size_t cut)
{
	size_t n;
	unsigned char *d = read_all(src, &n);
	int rc;

	if (!d)
		return -1;
	rc = write_file(dir, name, d, cut < n ? cut : n);
	free(d);
	return rc;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st, (void)flag, (void)ftw;
	return remove(path);
}

static void fixture(char *out, size_t cap, const char *rel)
{
	if (snprintf(out, cap, "%s/lora/%s", test_fixtures_dir(), rel) >= (int)cap)
		abort();
}

static bool exists(const char *path)
{
	struct stat st;
	return stat(path, &st) == 0;
}

static void put(struct lp_buf *b, const void *p, size_t n)
{
	if (lp_buf_append(b, p, n, NULL) != 0)
		abort();
}

static void put_u16(struct lp_buf *b, unsigned v)
{
	unsigned char x[2] = {(unsigned char)v, (unsigned char)(v >> 8)};
	put(b, x, 2);
}

static void put_u32(struct lp_buf *b, uint32_t v)
{
	unsigned char x[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
	                      (unsigned char)(v >> 24)};
	put(b, x, 4);
}

static void put_u64(struct lp_buf *b, uint64_t v)
{
	put_u32(b, (uint32_t)v);
	put_u32(b, (uint32_t)(v >> 32));
}

/* ---- shapes ---- */

static struct lp_lora_shape tiny_shape(int max_rank)
{
	return (struct lp_lora_shape){2, 64, 64, 32, 160, max_rank, NULL, false};
}

static struct lp_lora_shape smol_shape(int max_rank)
{
	return (struct lp_lora_shape){30, 576, 576, 192, 1536, max_rank, NULL, false};
}

static const char *const module_path[LP_LORA_N_TARGETS] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj",
};

/* ---- tensors and safetensors files ---- */

struct tensor {
	char name[200];
	char dtype[8]; /* safetensors name: F32, F16, BF16, I32 */
	int64_t rows, cols;
	unsigned char *data;
	size_t nbytes;
};

struct tensors {
	struct tensor t[512];
	size_t n;
};

static uint32_t rng(uint32_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 17;
	*s ^= *s << 5;
	return *s;
}

static float rnd(uint32_t *s)
{
	return ((float)(rng(s) >> 8) / 16777216.0f - 0.5f) * 0.5f;
}

static size_t dtype_size(const char *d)
{
	return !strcmp(d, "F32") || !strcmp(d, "I32") ? 4 : 2;
}

static struct tensor *add_tensor(struct tensors *l, const char *name, const char *dtype,
                                 int64_t rows, int64_t cols, uint32_t *seed)
{
	struct tensor *t = &l->t[l->n++];

	if (l->n > sizeof(l->t) / sizeof(l->t[0]))
		abort();
	snprintf(t->name, sizeof(t->name), "%s", name);
	snprintf(t->dtype, sizeof(t->dtype), "%s", dtype);
	t->rows = rows;
	t->cols = cols;
	t->nbytes = (size_t)(rows * cols) * dtype_size(dtype);
	t->data = calloc(1, t->nbytes ? t->nbytes : 1);
	if (!t->data)
		abort();
	for (size_t i = 0; seed && i < (size_t)(rows * cols); i++) {
		float f = rnd(seed);
		if (!strcmp(dtype, "F32")) {
			memcpy(t->data + 4 * i, &f, 4);
		} else if (!strcmp(dtype, "F16")) {
			uint16_t h = lp_f32_to_f16(f);
			memcpy(t->data + 2 * i, &h, 2);
		} else if (!strcmp(dtype, "BF16")) {
			uint16_t h = lp_f32_to_bf16(f);
			memcpy(t->data + 2 * i, &h, 2);
		} else {
			int32_t v = (int32_t)(rng(seed) % 100);
			memcpy(t->data + 4 * i, &v, 4);
		}
	}
	return t;
}

static struct tensor *find_tensor(struct tensors *l, const char *name)
{
	for (size_t i = 0; i < l->n; i++)
		if (!strcmp(l->t[i].name, name))
			return &l->t[i];
	return NULL;
}

static void remove_tensor(struct tensors *l, const char *name)
{
	struct tensor *t = find_tensor(l, name);
	if (!t)
		abort();
	free(t->data);
	*t = l->t[--l->n];
}

static void tensors_free(struct tensors *l)
{
	for (size_t i = 0; i < l->n; i++)
		free(l->t[i].data);
	l->n = 0;
}

static void set_f32(struct tensor *t, size_t i, float v)
{
	memcpy(t->data + 4 * i, &v, 4);
}

static float get_f32(const struct tensor *t, size_t i)
{
	float v;
	memcpy(&v, t->data + 4 * i, 4);
	return v;
}

static int write_safetensors(const char *path, const struct tensors *l)
{
	struct lp_buf h, out;
	size_t off = 0;
	int rc;

	lp_buf_init(&h, BUF_MAX);
	lp_buf_init(&out, BUF_MAX);
	put(&h, "{", 1);
	for (size_t i = 0; i < l->n; i++) {
		const struct tensor *t = &l->t[i];
		if (lp_buf_appendf(&h, NULL,
		                   "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[%lld,%lld],"
		                   "\"data_offsets\":[%zu,%zu]}",
		                   i ? "," : "", t->name, t->dtype, (long long)t->rows,
		                   (long long)t->cols, off, off + t->nbytes))
			abort();
		off += t->nbytes;
	}
	put(&h, "}", 1);
	while (h.len % 8)
		put(&h, " ", 1);
	put_u64(&out, h.len);
	put(&out, h.data, h.len);
	for (size_t i = 0; i < l->n; i++)
		put(&out, l->t[i].data, l->t[i].nbytes);
	rc = write_file(path, NULL, out.data, out.len);
	lp_buf_release(&h);
	lp_buf_release(&out);
	return rc;
}

/* lora_A / lora_B of every layer and target in mask, f32 random, named as
 * PEFT saves them (infix "" or e.g. ".default"). */
static void add_pairs(struct tensors *l, const struct lp_lora_shape *s, unsigned mask,
                      unsigned layer_mask, int rank, const char *infix, uint32_t *seed)
{
	for (int layer = 0; layer < s->n_layers; layer++) {
		if (!(layer_mask & (1u << layer)))
			continue;
		for (int t = 0; t < LP_LORA_N_TARGETS; t++) {
			char name[200];
			int in, out;

			if (!(mask & (1u << t)))
				continue;
			lp_lora_target_dims(s, (enum lp_lora_target)t, &in, &out);
			snprintf(name, sizeof(name),
			         "base_model.model.model.layers.%d.%s.lora_A%s.weight", layer,
			         module_path[t], infix);
			add_tensor(l, name, "F32", rank, in, seed);
			snprintf(name, sizeof(name),
			         "base_model.model.model.layers.%d.%s.lora_B%s.weight", layer,
			         module_path[t], infix);
			add_tensor(l, name, "F32", out, rank, seed);
		}
	}
}

static const char base_config[] =
    "{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 16, \"target_modules\": [\"q_proj\", "
    "\"v_proj\"], \"bias\": \"none\", \"use_dora\": false, \"fan_in_fan_out\": false, "
    "\"modules_to_save\": null, \"use_rslora\": false, \"rank_pattern\": {}, "
    "\"alpha_pattern\": {}, \"layers_to_transform\": null, \"layers_pattern\": null, "
    "\"base_model_name_or_path\": \"tests/fixtures/tiny-llama\", \"task_type\": "
    "\"CAUSAL_LM\"}";

/* Writes adapter_config.json: base_config with the keys of override (JSON
 * text with ' for ") replaced; a value "DELETE" removes the key. */
static int write_config(const char *dir, const char *override)
{
	json_t *root = json_loads(base_config, 0, NULL), *ov = NULL, *v;
	const char *key;
	char *text, *q;
	int rc;

	if (!root)
		abort();
	if (override) {
		q = strdup(override);
		for (char *p = q; *p; p++)
			if (*p == '\'')
				*p = '"';
		ov = json_loads(q, 0, NULL);
		free(q);
		if (!ov)
			abort();
		json_object_foreach(ov, key, v)
		{
			if (json_is_string(v) && !strcmp(json_string_value(v), "DELETE"))
				json_object_del(root, key);
			else
				json_object_set(root, key, v);
		}
		json_decref(ov);
	}
	text = json_dumps(root, JSON_PRESERVE_ORDER | JSON_INDENT(1));
	rc = write_file(dir, "adapter_config.json", text, strlen(text));
	free(text);
	json_decref(root);
	return rc;
}

/* A tiny PEFT adapter in a new dir: rank 8 q and v in both layers, the
 * config overridden by override. The tensors stay in l for the caller to
 * change before write_peft(). */
static void tiny_tensors(struct tensors *l, unsigned mask, int rank)
{
	struct lp_lora_shape s = tiny_shape(64);
	uint32_t seed = 12345;
	add_pairs(l, &s, mask, 3, rank, "", &seed);
}

static int write_peft(char *dir, size_t cap, const struct tensors *l, const char *override)
{
	char path[600];

	new_dir(dir, cap);
	snprintf(path, sizeof(path), "%s/adapter_model.safetensors", dir);
	if (write_safetensors(path, l))
		return -1;
	return write_config(dir, override);
}

#define QV_MASK (1u << LP_LORA_Q | 1u << LP_LORA_V)

/* Loads path and expects failure with code and a message containing want. */
#define CHECK_FAILS(path, shape, code, want)                                                       \
	do {                                                                                       \
		struct lp_lora *l_ = (struct lp_lora *)&tmp_seq;                                   \
		struct lp_err e_ = {0};                                                            \
		int rc_ = lp_lora_load(&l_, (path), (shape), &e_);                                 \
		CHECK_MSG(rc_ == (code) && !l_ && strstr(e_.msg, (want)),                          \
		          "load '%s' gave %d '%s', expected %d with '%s'", (path), rc_, e_.msg,    \
		          (code), (want));                                                         \
		CHECK_MSG(e_.msg[0] && e_.msg[strlen(e_.msg) - 1] != '.',                          \
		          "message '%s' is empty or ends with a period", e_.msg);                  \
	} while (0)

#define CHECK_LOADS(out, path, shape)                                                              \
	do {                                                                                       \
		struct lp_err e_ = {0};                                                            \
		int rc_ = lp_lora_load(&(out), (path), (shape), &e_);                              \
		CHECK_MSG(rc_ == 0 && (out), "load '%s' failed: %d %s", (path), rc_, e_.msg);      \
	} while (0)

/* ---- comparing adapters ---- */

/* Largest |a - b| / max(|b|, floor) over every value of every pair, or
 * INFINITY when ranks or layer counts differ; *why says where. */
static double lora_diff(const struct lp_lora *x, const struct lp_lora *y,
                        const struct lp_lora_shape *s, double floor, char *why, size_t cap)
{
	double worst = 0;

	if (x->n_layers != y->n_layers || x->targets != y->targets) {
		snprintf(why, cap, "layers %d/%d targets %x/%x", x->n_layers, y->n_layers,
		         x->targets, y->targets);
		return INFINITY;
	}
	for (int l = 0; l < x->n_layers; l++) {
		for (int t = 0; t < LP_LORA_N_TARGETS; t++) {
			const struct lp_lora_pair *a =
			    lp_lora_pair_at(x, l, (enum lp_lora_target)t);
			const struct lp_lora_pair *b =
			    lp_lora_pair_at(y, l, (enum lp_lora_target)t);
			int in, out;

			if (a->rank != b->rank) {
				snprintf(why, cap, "layer %d %s: rank %d vs %d", l,
				         lp_lora_target_name((enum lp_lora_target)t), a->rank,
				         b->rank);
				return INFINITY;
			}
			lp_lora_target_dims(s, (enum lp_lora_target)t, &in, &out);
			/* A then B, both in their stored order */
			for (size_t i = 0; i < (size_t)a->rank * (size_t)(in + out); i++) {
				float u = i < (size_t)a->rank * in
				              ? A_VAL(a, i)
				              : B_VAL(a, i - (size_t)a->rank * in);
				float v = i < (size_t)a->rank * in
				              ? A_VAL(b, i)
				              : B_VAL(b, i - (size_t)a->rank * in);
				double d = fabs((double)u - v) / fmax(fabs((double)v), floor);
				if (!(d <= worst)) {
					worst = d;
					snprintf(why, cap, "layer %d %s value %zu: %.9g vs %.9g", l,
					         lp_lora_target_name((enum lp_lora_target)t), i, u,
					         v);
				}
			}
		}
	}
	return worst;
}

static size_t type_size(enum lp_dtype t)
{
	return t == LP_DTYPE_F32 ? 4 : 2;
}

/* Every pair's A and B lie inside the used part of data and do not
 * overlap, padding between them stays under 64 bytes a matrix, each
 * group's stacked A covers its targets' A in order, and every value is
 * finite. */
static bool layout_ok(const struct lp_lora *l, const struct lp_lora_shape *s)
{
	const char *base = l->data, *end = base + l->data_bytes, *prev_end = base;
	size_t used = 0, matrices = 0;

	for (int layer = 0; layer < l->n_layers; layer++) {
		/* the As in target order, then the Bs: ascending addresses */
		for (int ab = 0; ab < 2; ab++)
			for (int t = 0; t < LP_LORA_N_TARGETS; t++) {
				const struct lp_lora_pair *p = lp_lora_pair_at(l, layer, t);
				int in, out;
				if (!p->rank)
					continue;
				lp_lora_target_dims(s, t, &in, &out);
				const char *m = ab ? p->b : p->a;
				size_t n = (size_t)p->rank * (size_t)(ab ? out : in);
				size_t bytes = n * type_size(ab ? p->b_type : p->a_type);
				if (m < prev_end || m + bytes > end)
					return false;
				prev_end = m + bytes;
				used += bytes;
				matrices++;
				for (size_t i = 0; i < n; i++)
					if (!isfinite(ab ? B_VAL(p, i) : A_VAL(p, i)))
						return false;
			}
		/* a group's A are one stacked matrix */
		for (int g = 0; g < LP_LORA_N_GROUPS; g++) {
			const struct lp_lora_stack *st = lp_lora_stack_at(l, layer, g);
			int first, count, in, out, rank = 0;
			lp_lora_group_targets(g, &first, &count);
			lp_lora_target_dims(s, first, &in, &out);
			for (int t = first; t < first + count; t++) {
				const struct lp_lora_pair *p = lp_lora_pair_at(l, layer, t);
				if (p->rank && ((const char *)p->a !=
				                    (const char *)st->a +
				                        (size_t)rank * in * type_size(st->type) ||
				                p->a_type != st->type))
					return false;
				rank += p->rank;
			}
			if (rank != st->rank || (rank == 0) != (st->a == NULL))
				return false;
		}
	}
	return used <= l->data_bytes && l->data_bytes < used + 64 * matrices;
}

/* ---- detection ---- */

static void test_missing_path(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	char path[200];

	snprintf(path, sizeof(path), "%s/no-such-adapter", tmp_root);
	CHECK_FAILS(path, &s, -ENOENT, "adapter path '");
	CHECK_FAILS(path, &s, -ENOENT, "no-such-adapter' does not exist");
}

static void test_dir_matching_nothing(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	char dir[200];

	new_dir(dir, sizeof(dir));
	CHECK(write_file(dir, "README.md", "hi", 2) == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "expected adapter_config.json");
	CHECK_FAILS(dir, &s, -EINVAL, "model.lora_config.npy and model.lora_weights.npy");
}

static void test_half_trtllm_dir(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	char dir[200], src[300];

	new_dir(dir, sizeof(dir));
	fixture(src, sizeof(src), "tiny/r8-all-trtllm/model.lora_config.npy");
	CHECK(copy_file(src, dir, "model.lora_config.npy", SIZE_MAX) == 0);
	CHECK_FAILS(dir, &s, -ENOENT, "model.lora_weights.npy' does not exist");
}

static void test_plain_file_not_nemo(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	char dir[200], path[300];

	new_dir(dir, sizeof(dir));
	CHECK(write_file(dir, "adapter.tar", "x", 1) == 0);
	snprintf(path, sizeof(path), "%s/adapter.tar", dir);
	CHECK_FAILS(path, &s, -EINVAL, "expected a directory (HF PEFT or TensorRT-LLM) or a .nemo");
}

static void test_peft_without_weights(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	char dir[200];

	new_dir(dir, sizeof(dir));
	CHECK(write_config(dir, NULL) == 0);
	CHECK_FAILS(dir, &s, -ENOENT, "no adapter_model.safetensors or adapter_model.bin");
}

/* ---- the committed fixtures ---- */

static const char *expect_format(const char *name)
{
	size_t n = strlen(name);
	if (n > 4 && !strcmp(name + n - 4, "-bin"))
		return "peft-bin";
	if (n > 7 && !strcmp(name + n - 7, "-trtllm"))
		return "trtllm";
	if (n > 5 && !strcmp(name + n - 5, ".nemo"))
		return "nemo";
	return "peft";
}

static void test_fixtures_all_load(void)
{
	static const char *const bases[] = {"tiny", "smollm2"};
	static const char *const tiny_names[] = {"served-tiny", "/models/tiny-llama", NULL};
	static const char *const smol_names[] = {"smollm2", "smollm2-135m-instruct-q4_1", NULL};

	for (int b = 0; b < 2; b++) {
		struct lp_lora_shape s = b ? smol_shape(64) : tiny_shape(64);
		char dir[300], path[600];
		struct dirent *de;
		DIR *d;
		int n = 0;

		s.base_names = b ? smol_names : tiny_names;
		fixture(dir, sizeof(dir), bases[b]);
		d = opendir(dir);
		CHECK_MSG(d, "cannot open fixture directory '%s'", dir);
		while ((de = readdir(d))) {
			struct lp_lora *l = NULL;
			struct lp_err e = {0};
			int rc;

			if (de->d_name[0] == '.')
				continue;
			snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
			rc = lp_lora_load(&l, path, &s, &e);
			if (rc) {
				closedir(d);
				CHECK_MSG(0, "fixture '%s': %s", path, e.msg);
			}
			n++;
			if (strcmp(l->format, expect_format(de->d_name)) || !layout_ok(l, &s) ||
			    l->max_rank <= 0 || !l->targets) {
				closedir(d);
				lp_lora_free(l);
				CHECK_MSG(0, "fixture '%s': format %s, bad layout or no pairs",
				          path, l->format);
			}
			lp_lora_free(l);
		}
		closedir(d);
		CHECK_MSG(n >= 3, "only %d adapters under '%s'", n, dir);
		printf("  %d %s adapters load\n", n, bases[b]);
	}
}

struct scale_case {
	const char *base, *name;
	int r;
	double alpha;
	bool rslora;
	unsigned layer_mask; /* layers with weights */
	unsigned targets;
};

/* (rank, alpha) of a target in the r8-pattern fixture: rank_pattern
 * {q_proj: 4, down_proj: 16}, alpha_pattern {k_proj: 32}. */
static void pattern_rank(const struct scale_case *c, int t, int *r, double *alpha)
{
	*r = c->r;
	*alpha = c->alpha;
	if (strcmp(c->name, "r8-pattern"))
		return;
	if (t == LP_LORA_Q)
		*r = 4;
	if (t == LP_LORA_DOWN)
		*r = 16;
	if (t == LP_LORA_K)
		*alpha = 32;
}

/* Each PEFT fixture's A is the file's lora_A and its B the file's lora_B
 * times alpha / r (alpha / sqrt(r) with rsLoRA), per module, rounded to
 * float once. */
static void test_fixture_scales(void)
{
	static const struct scale_case cases[] = {
	    {"tiny", "r4-qv", 4, 8, false, 3, QV_MASK},
	    {"tiny", "r8-all", 8, 16, false, 3, 0x7f},
	    {"tiny", "r16-attn", 16, 16, false, 3, 0xf},
	    {"tiny", "r64-mlp", 64, 32, false, 3, 0x70},
	    {"tiny", "r8-rslora", 8, 16, true, 3, 0x7f},
	    {"tiny", "r8-pattern", 8, 16, false, 3, 0x7f},
	    {"tiny", "r4-layers", 4, 8, false, 2, QV_MASK | 1u << LP_LORA_DOWN},
	    {"smollm2", "r4-qv", 4, 8, false, 0x3fffffff, QV_MASK},
	    {"smollm2", "r8-od", 8, 16, false, 0x02108421, 1u << LP_LORA_O | 1u << LP_LORA_DOWN},
	    {"smollm2", "r16-k", 16, 32, false, 0x22222222, 1u << LP_LORA_K},
	};
	int checked = 0;

	for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
		const struct scale_case *k = &cases[c];
		struct lp_lora_shape s = strcmp(k->base, "tiny") ? smol_shape(64) : tiny_shape(64);
		struct lp_safetensors *st = NULL;
		struct lp_lora *l = NULL;
		char dir[300], path[400];
		struct lp_err e = {0};

		snprintf(path, sizeof(path), "%s/%s", k->base, k->name);
		fixture(dir, sizeof(dir), path);
		if (!exists(dir))
			continue;
		CHECK_LOADS(l, dir, &s);
		snprintf(path, sizeof(path), "%s/adapter_model.safetensors", dir);
		if (lp_safetensors_open_file(&st, path, &e)) {
			lp_lora_free(l);
			CHECK_MSG(0, "%s", e.msg);
		}
		CHECK_EQ_INT(l->targets, k->targets);
		for (int layer = 0; layer < s.n_layers; layer++) {
			for (int t = 0; t < LP_LORA_N_TARGETS; t++) {
				const struct lp_lora_pair *p = lp_lora_pair_at(l, layer, t);
				bool want = (k->layer_mask >> layer & 1) && (k->targets >> t & 1);
				const struct lp_fmt_tensor *a, *b;
				char name[200];
				int r, in, out;
				double alpha;
				float scale;
				size_t bad = SIZE_MAX;

				if (!want) {
					if (p->rank)
						bad = 0;
					goto next;
				}
				pattern_rank(k, t, &r, &alpha);
				scale = (float)(k->rslora ? alpha / sqrt(r) : alpha / r);
				lp_lora_target_dims(&s, t, &in, &out);
				snprintf(name, sizeof(name),
				         "base_model.model.model.layers.%d.%s.lora_A.weight", layer,
				         module_path[t]);
				a = lp_safetensors_find(st, name);
				name[strlen(name) - 8] = 'B';
				b = lp_safetensors_find(st, name);
				if (p->rank != r || !a || !b) {
					bad = 1;
					goto next;
				}
				for (size_t i = 0; i < (size_t)r * in && bad == SIZE_MAX; i++) {
					float raw, got = A_VAL(p, i);
					memcpy(&raw, (const float *)a->data + i, 4);
					if (p->a_type != LP_DTYPE_F32 || memcmp(&got, &raw, 4))
						bad = 2;
				}
				for (size_t i = 0; i < (size_t)r * out && bad == SIZE_MAX; i++) {
					float raw;
					memcpy(&raw, (const float *)b->data + i, 4);
					if (b_at(p, out, i) != raw * scale)
						bad = 3;
				}
			next:
				if (bad != SIZE_MAX) {
					lp_safetensors_free(st);
					lp_lora_free(l);
					CHECK_MSG(0, "%s/%s layer %d %s: check %zu failed", k->base,
					          k->name, layer, lp_lora_target_name(t), bad);
				}
			}
		}
		checked++;
		lp_safetensors_free(st);
		lp_lora_free(l);
	}
	CHECK_MSG(checked >= 5, "only %d fixtures checked", checked);
}

/* Every converted variant (<name>-bin, <name>-trtllm, <name>.nemo) holds the
 * same values as its PEFT original: bitwise when it is float32. */
static void test_converted_variants_match(void)
{
	static const char *const bases[] = {"tiny", "smollm2"};
	static const char *const suffixes[] = {"-bin", "-trtllm", ".nemo"};
	int counts[3] = {0};

	for (int b = 0; b < 2; b++) {
		struct lp_lora_shape s = b ? smol_shape(64) : tiny_shape(64);
		char dir[300], path[600], orig[600], why[200];
		struct dirent *de;
		DIR *d;

		fixture(dir, sizeof(dir), bases[b]);
		d = opendir(dir);
		CHECK(d);
		while ((de = readdir(d))) {
			size_t n = strlen(de->d_name);
			struct lp_lora *x = NULL, *y = NULL;
			struct lp_err e = {0};
			double tol = 0, diff;

			for (int k = 0; k < 3; k++) {
				size_t m = strlen(suffixes[k]);
				if (n <= m || strcmp(de->d_name + n - m, suffixes[k]))
					continue;
				snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
				snprintf(orig, sizeof(orig), "%s/%.*s", dir, (int)(n - m),
				         de->d_name);
				if (k == 1) { /* a float16 conversion rounds once */
					char w[700];
					struct lp_npy npy;
					size_t len;
					unsigned char *bytes;

					snprintf(w, sizeof(w), "%s/model.lora_weights.npy", path);
					bytes = read_all(w, &len);
					if (bytes && !lp_npy_parse(&npy, bytes, len, w, NULL) &&
					    npy.t.type == LP_FMT_F16)
						tol = 1.0 / 1024;
					free(bytes);
				}
				if (lp_lora_load(&x, orig, &s, &e) ||
				    lp_lora_load(&y, path, &s, &e)) {
					lp_lora_free(x);
					closedir(d);
					CHECK_MSG(0, "%s: %s", path, e.msg);
				}
				diff = lora_diff(y, x, &s, 1e-3, why, sizeof(why));
				lp_lora_free(x);
				lp_lora_free(y);
				if (!(diff <= tol)) {
					closedir(d);
					CHECK_MSG(0, "%s differs from %s: %s", path, orig, why);
				}
				counts[k]++;
			}
		}
		closedir(d);
	}
	CHECK_MSG(counts[0] && counts[1] && counts[2], "variants found: %d bin, %d trtllm, %d nemo",
	          counts[0], counts[1], counts[2]);
	printf("  %d bin, %d trtllm, %d nemo variants match their originals\n", counts[0],
	       counts[1], counts[2]);
}

/* ---- PEFT: what is accepted ---- */

/* A tiny q/v adapter written from tensors l with config override loads, and
 * each pair's B is the file's B times scale(layer, target). */
static int check_scaled(const struct lp_lora *lo, struct tensors *l, const struct lp_lora_shape *s,
                        double (*scale)(int layer, int t), char *why, size_t cap)
{
	for (int layer = 0; layer < s->n_layers; layer++) {
		for (int t = 0; t < LP_LORA_N_TARGETS; t++) {
			const struct lp_lora_pair *p = lp_lora_pair_at(lo, layer, t);
			struct tensor *a, *b;
			char name[200];
			int in, out;

			snprintf(name, sizeof(name),
			         "base_model.model.model.layers.%d.%s.lora_A.weight", layer,
			         module_path[t]);
			a = find_tensor(l, name);
			name[strlen(name) - 8] = 'B';
			b = find_tensor(l, name);
			if (!a != !p->rank || (a && a->rows != p->rank)) {
				snprintf(why, cap, "layer %d %s: rank %d", layer,
				         lp_lora_target_name(t), p->rank);
				return -1;
			}
			if (!a)
				continue;
			lp_lora_target_dims(s, t, &in, &out);
			if (memcmp(p->a, a->data, a->nbytes)) {
				snprintf(why, cap, "layer %d %s: A differs", layer,
				         lp_lora_target_name(t));
				return -1;
			}
			for (size_t i = 0; i < (size_t)out * p->rank; i++) {
				if (b_at(p, out, i) != get_f32(b, i) * (float)scale(layer, t)) {
					snprintf(why, cap,
					         "layer %d %s: B[%zu] %g, expected %g * %g", layer,
					         lp_lora_target_name(t), i, b_at(p, out, i),
					         get_f32(b, i), scale(layer, t));
					return -1;
				}
			}
		}
	}
	return 0;
}

static double scale_2(int layer, int t)
{
	return 2.0;
}

static void test_peft_name_variants(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	struct lp_lora *lo = NULL;
	char dir[200], why[200];
	uint32_t seed = 7;
	int rc;

	/* "lora_A.default.weight", as older PEFT saved, loads the same */
	add_pairs(&l, &s, QV_MASK, 3, 8, ".default", &seed);
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_LOADS(lo, dir, &s);
	CHECK_EQ_STR(lo->format, "peft");
	CHECK_EQ_INT(lo->targets, QV_MASK);
	CHECK_EQ_INT(lo->max_rank, 8);
	CHECK_EQ_STR(lo->base_model, "tests/fixtures/tiny-llama");
	lp_lora_free(lo);
	/* two adapter names in one file */
	snprintf(l.t[0].name, sizeof(l.t[0].name),
	         "base_model.model.model.layers.0.self_attn.q_proj.lora_A.other.weight");
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "one adapter per file");
	tensors_free(&l);

	tiny_tensors(&l, QV_MASK, 8);
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_LOADS(lo, dir, &s);
	rc = check_scaled(lo, &l, &s, scale_2, why, sizeof(why));
	lp_lora_free(lo);
	tensors_free(&l);
	CHECK_MSG(rc == 0, "%s", why);
}

static double scale_rslora(int layer, int t)
{
	return 16 / sqrt(8.0);
}

static void test_peft_rslora(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	struct lp_lora *lo = NULL;
	char dir[200], why[200];
	int rc;

	tiny_tensors(&l, QV_MASK, 8);
	CHECK(write_peft(dir, sizeof(dir), &l, "{'use_rslora': true}") == 0);
	CHECK_LOADS(lo, dir, &s);
	rc = check_scaled(lo, &l, &s, scale_rslora, why, sizeof(why));
	lp_lora_free(lo);
	tensors_free(&l);
	CHECK_MSG(rc == 0, "%s", why);
}

/* rank_pattern / alpha_pattern keys are regexes matched against the end of
 * the module name at a '.' boundary, the first key in file order winning. */
static double scale_pattern(int layer, int t)
{
	if (t == LP_LORA_Q)
		return 16.0 / 4; /* rank 4 from 'q_proj', before 'layers.1.self_attn.q_proj' */
	if (layer == 1 && t == LP_LORA_V)
		return 48.0 / 8; /* alpha 48 from 'model\.layers\.1\..*v_proj' */
	return 16.0 / 8;
}

static void test_peft_rank_alpha_patterns(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	struct lp_lora *lo = NULL;
	struct lp_lora_shape ss = s;
	char dir[200], why[200];
	uint32_t seed = 99;
	int rc;

	add_pairs(&l, &s, 1u << LP_LORA_Q, 3, 4, "", &seed);
	add_pairs(&l, &s, 1u << LP_LORA_V, 3, 8, "", &seed);
	CHECK(write_peft(dir, sizeof(dir), &l,
	                 "{'rank_pattern': {'q_proj': 4, 'layers.1.self_attn.q_proj': 2}, "
	                 "'alpha_pattern': {'model\\\\.layers\\\\.1\\\\..*v_proj': 48, "
	                 "'_proj': 1}}") == 0);
	CHECK_LOADS(lo, dir, &s);
	rc = check_scaled(lo, &l, &s, scale_pattern, why, sizeof(why));
	lp_lora_free(lo);
	CHECK_MSG(rc == 0, "%s", why);
	/* a key must match whole components: 'proj' matches no module, so the
	 * default r applies and q's rank 4 tensors are rejected */
	CHECK(write_peft(dir, sizeof(dir), &l, "{'rank_pattern': {'proj': 4}}") == 0);
	CHECK_FAILS(dir, &ss, -EINVAL,
	            "adapter_config.json gives 'model.layers.0.self_attn.q_proj' "
	            "rank 8");
	CHECK(write_peft(dir, sizeof(dir), &l, "{'rank_pattern': {'q_proj[': 4}}") == 0);
	CHECK_FAILS(dir, &ss, -EINVAL, "is not a valid regular expression");
	tensors_free(&l);
}

static void test_peft_target_regex(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	struct lp_lora *lo = NULL;
	char dir[200];

	tiny_tensors(&l, QV_MASK, 8);
	CHECK(write_peft(dir, sizeof(dir), &l, "{'target_modules': '.*\\\\.(q|v)_proj'}") == 0);
	CHECK_LOADS(lo, dir, &s);
	CHECK_EQ_INT(lo->targets, QV_MASK);
	lp_lora_free(lo);
	/* a string is a full match: 'q_proj' alone selects nothing */
	CHECK(write_peft(dir, sizeof(dir), &l, "{'target_modules': 'q_proj'}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "target_modules 'q_proj' selects no module");
	/* selecting k too, without k tensors */
	CHECK(write_peft(
	          dir, sizeof(dir), &l,
	          "{'target_modules': '.*layers\\\\.\\\\d+\\\\.self_attn\\\\.[qkv]_proj'}") == 0);
	CHECK_LOADS(lo, dir, &s);
	CHECK_EQ_INT(lo->targets, QV_MASK);
	CHECK_EQ_INT(lo->absent.n, 2);
	CHECK(lp_lora_absent_has(&lo->absent, 0, LP_LORA_K));
	CHECK(lp_lora_absent_has(&lo->absent, 1, LP_LORA_K));
	CHECK(!lp_lora_absent_has(&lo->absent, 0, LP_LORA_Q));
	lp_lora_free(lo);
	CHECK(write_peft(dir, sizeof(dir), &l, "{'target_modules': '.*(q_proj|v_proj|lm_head)'}") ==
	      0);
	CHECK_FAILS(dir, &s, -EINVAL, "module 'lm_head' is not supported");
	/* exclude_modules takes layer 1's v away */
	remove_tensor(&l, "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight");
	remove_tensor(&l, "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight");
	CHECK(write_peft(dir, sizeof(dir), &l,
	                 "{'exclude_modules': ['layers.1.self_attn.v_proj']}") == 0);
	CHECK_LOADS(lo, dir, &s);
	CHECK_EQ_INT(lp_lora_pair_at(lo, 1, LP_LORA_V)->rank, 0);
	CHECK_EQ_INT(lp_lora_pair_at(lo, 0, LP_LORA_V)->rank, 8);
	lp_lora_free(lo);
	tensors_free(&l);

	/* "all-linear": every projection */
	tiny_tensors(&l, 0x7f, 4);
	CHECK(write_peft(dir, sizeof(dir), &l, "{'r': 4, 'target_modules': 'all-linear'}") == 0);
	CHECK_LOADS(lo, dir, &s);
	CHECK_EQ_INT(lo->targets, 0x7f);
	lp_lora_free(lo);
	tensors_free(&l);
}

static void test_peft_layers_to_transform(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	struct lp_lora *lo = NULL;
	char dir[200];
	uint32_t seed = 3;

	add_pairs(&l, &s, QV_MASK, 2, 8, "", &seed);
	CHECK(write_peft(dir, sizeof(dir), &l, "{'layers_to_transform': 1}") == 0);
	CHECK_LOADS(lo, dir, &s);
	CHECK_EQ_INT(lp_lora_pair_at(lo, 0, LP_LORA_Q)->rank, 0);
	CHECK_EQ_INT(lp_lora_pair_at(lo, 1, LP_LORA_Q)->rank, 8);
	lp_lora_free(lo);
	CHECK(write_peft(dir, sizeof(dir), &l,
	                 "{'layers_to_transform': [1], 'layers_pattern': 'layers'}") == 0);
	CHECK_LOADS(lo, dir, &s);
	lp_lora_free(lo);
	/* a layers_pattern that is not in the names selects nothing */
	CHECK(write_peft(dir, sizeof(dir), &l,
	                 "{'layers_to_transform': [1], 'layers_pattern': ['h']}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL,
	            "which target_modules in adapter_config.json does not select");
	/* layer 0's tensors are absent when every layer is targeted: it loads
	 * as PEFT does, without them */
	CHECK(write_peft(dir, sizeof(dir), &l, "{'layers_to_transform': []}") == 0);
	CHECK_LOADS(lo, dir, &s);
	CHECK_EQ_INT(lp_lora_pair_at(lo, 0, LP_LORA_Q)->rank, 0);
	CHECK_EQ_INT(lp_lora_pair_at(lo, 1, LP_LORA_Q)->rank, 8);
	CHECK_EQ_INT(lo->absent.n, 2);
	CHECK(lp_lora_absent_has(&lo->absent, 0, LP_LORA_Q));
	CHECK(lp_lora_absent_has(&lo->absent, 0, LP_LORA_V));
	lp_lora_free(lo);
	CHECK(write_peft(dir, sizeof(dir), &l, "{'layers_to_transform': [1, 7]}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL,
	            "layers_to_transform names layer 7, but the base model has 2");
	tensors_free(&l);
}

/* A file without the weights of some modules its config targets loads as
 * PEFT loads it: those modules add nothing (their B stays 0), every other
 * pair is the file's, and the adapter says which are absent. */
static void test_peft_absent_modules(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct lp_lora *part = NULL, *whole = NULL;
	struct lp_lora_absent ab = {0};
	struct tensors l = {0};
	char dir[300], text[200];
	int bad = 0;

	/* the committed fixture: r8-all less layer 0's down_proj and layer 1's
	 * attention (hack/make-lora-interop.py) */
	fixture(dir, sizeof(dir), "tiny/r8-all-partial");
	CHECK_LOADS(part, dir, &s);
	fixture(dir, sizeof(dir), "tiny/r8-all");
	CHECK_LOADS(whole, dir, &s);
	for (int layer = 0; layer < 2; layer++) {
		for (int t = 0; t < LP_LORA_N_TARGETS; t++) {
			const struct lp_lora_pair *p = lp_lora_pair_at(part, layer, t);
			const struct lp_lora_pair *w = lp_lora_pair_at(whole, layer, t);
			bool gone =
			    (layer == 0 && t == LP_LORA_DOWN) || (layer == 1 && t <= LP_LORA_O);
			int in, out;

			lp_lora_target_dims(&s, (enum lp_lora_target)t, &in, &out);
			if (gone) {
				bad |= p->rank != 0 || !lp_lora_absent_has(&part->absent, layer, t);
				continue;
			}
			bad |= p->rank != 8 || lp_lora_absent_has(&part->absent, layer, t);
			for (size_t i = 0; !bad && i < (size_t)8 * (size_t)in; i++)
				bad |= A_VAL(p, i) != A_VAL(w, i);
			for (size_t i = 0; !bad && i < (size_t)8 * (size_t)out; i++)
				bad |= B_VAL(p, i) != B_VAL(w, i);
		}
	}
	CHECK_MSG(!bad, "the partial adapter's pairs differ from r8-all's or are not absent");
	CHECK_EQ_INT(part->absent.n, 5);
	CHECK_EQ_INT(whole->absent.n, 0);
	CHECK_EQ_INT(part->targets, 0x7f);
	lp_lora_absent_format(&part->absent, text, sizeof(text));
	CHECK_EQ_STR(text, "q_proj in layer 1; k_proj in layer 1; v_proj in layer 1; o_proj in "
	                   "layer 1; down_proj in layer 0");
	lp_lora_free(part);
	lp_lora_free(whole);

	/* the text: runs of layers, cut short with "..." */
	for (int layer = 0; layer < 4; layer++)
		lp_lora_absent_add(&ab, layer, LP_LORA_Q);
	lp_lora_absent_add(&ab, 7, LP_LORA_Q);
	lp_lora_absent_add(&ab, 9, LP_LORA_Q);
	lp_lora_absent_add(&ab, 10, LP_LORA_Q);
	lp_lora_absent_add(&ab, 1023, LP_LORA_UP);
	lp_lora_absent_add(&ab, 5000, LP_LORA_UP); /* counted, no bit */
	CHECK_EQ_INT(ab.n, 9);
	CHECK(!lp_lora_absent_has(&ab, 5000, LP_LORA_UP));
	lp_lora_absent_format(&ab, text, sizeof(text));
	CHECK_EQ_STR(text, "q_proj in layers 0-3, 7, 9-10; up_proj in layer 1023");
	lp_lora_absent_format(&ab, text, 20);
	CHECK_EQ_STR(text, "q_proj in layers...");

	/* a whole layer absent, and a module absent from every layer */
	tiny_tensors(&l, QV_MASK, 8);
	remove_tensor(&l, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
	remove_tensor(&l, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight");
	remove_tensor(&l, "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight");
	remove_tensor(&l, "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight");
	CHECK(write_peft(dir, sizeof(dir), &l,
	                 "{'target_modules': ['q_proj', 'v_proj', 'o_proj']}") == 0);
	CHECK_LOADS(part, dir, &s);
	lp_lora_absent_format(&part->absent, text, sizeof(text));
	CHECK_EQ_STR(text, "q_proj in layer 0; v_proj in layer 0; o_proj in layers 0-1");
	CHECK_EQ_INT(part->targets, QV_MASK);
	lp_lora_free(part);
	tensors_free(&l);

	/* no weights for any targeted module: still an error */
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_FAILS(dir, &s, -EINVAL,
	            "holds no lora weights for any of the 4 modules adapter_config.json targets");
	tiny_tensors(&l, 1u << LP_LORA_K, 8);
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_FAILS(dir, &s, -EINVAL,
	            "is for module 'model.layers.0.self_attn.k_proj', which target_modules in "
	            "adapter_config.json does not select");
	tensors_free(&l);
}

/* ---- PEFT: every rejection ---- */

static void test_reject_rank_over_max(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	char dir[300];

	fixture(dir, sizeof(dir), "tiny/r64-mlp");
	CHECK_FAILS(dir, &s, -EINVAL, "rank 64 of 'gate_proj' exceeds --max-lora-rank 16");
}

static void test_reject_unsupported_module(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	char dir[200];
	uint32_t seed = 5;

	tiny_tensors(&l, QV_MASK, 8);
	CHECK(write_peft(dir, sizeof(dir), &l,
	                 "{'target_modules': ['q_proj', 'v_proj', 'lm_head']}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "module 'lm_head' is not supported");
	add_tensor(&l, "base_model.model.lm_head.lora_A.weight", "F32", 8, 64, &seed);
	add_tensor(&l, "base_model.model.lm_head.lora_B.weight", "F32", 512, 8, &seed);
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "module 'lm_head' is not supported");
	tensors_free(&l);
	tiny_tensors(&l, QV_MASK, 8);
	add_tensor(&l, "base_model.model.model.embed_tokens.lora_embedding_A", "F32", 8, 512,
	           &seed);
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "module 'model.embed_tokens' is not supported");
	tensors_free(&l);
}

static void test_reject_shape_mismatch(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	struct tensor *b;
	char dir[200];

	tiny_tensors(&l, QV_MASK, 8);
	b = find_tensor(&l, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight");
	b->rows = 32;
	b->nbytes = 32 * 8 * 4;
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_FAILS(dir, &s, -EINVAL,
	            "'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight' has shape "
	            "[32, 8], the base model needs [64, 8]");
	tensors_free(&l);
	/* an adapter for SmolLM2 on the tiny model */
	{
		char src[300];
		fixture(src, sizeof(src), "smollm2/r16-k");
		s.max_rank = 64;
		s.n_layers = 30;
		CHECK_FAILS(src, &s, -EINVAL, "has shape [16, 576], the base model needs [16, 64]");
	}
}

static void test_reject_layer_out_of_range(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	char dir[200];

	tiny_tensors(&l, QV_MASK, 8);
	snprintf(l.t[0].name, sizeof(l.t[0].name),
	         "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight");
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_FAILS(dir, &s, -EINVAL,
	            "layer 5 of 'base_model.model.model.layers.5.self_attn.q_proj");
	CHECK_FAILS(dir, &s, -EINVAL, "is out of range (the base model has 2 layers)");
	tensors_free(&l);
}

static void test_reject_dora(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	char dir[200];
	uint32_t seed = 1;

	tiny_tensors(&l, QV_MASK, 8);
	CHECK(write_peft(dir, sizeof(dir), &l, "{'use_dora': true}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "use_dora is set: DoRA adapters are not supported");
	add_tensor(&l, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
	           "F32", 1, 64, &seed);
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "is a DoRA magnitude vector");
	tensors_free(&l);
}

static void test_reject_bias(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	char dir[200];
	uint32_t seed = 1;

	struct lp_lora *none = NULL, *lo = NULL;
	char why[200];

	tiny_tensors(&l, QV_MASK, 8);
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_LOADS(none, dir, &s);
	/* "lora_only" and "all" without a bias in the file are "none" */
	CHECK(write_peft(dir, sizeof(dir), &l, "{'bias': 'all'}") == 0);
	CHECK_LOADS(lo, dir, &s);
	CHECK(lora_diff(lo, none, &s, 1e-30, why, sizeof(why)) == 0);
	lp_lora_free(lo);
	CHECK(write_peft(dir, sizeof(dir), &l, "{'bias': 'lora_only'}") == 0);
	CHECK_LOADS(lo, dir, &s);
	CHECK(lora_diff(lo, none, &s, 1e-30, why, sizeof(why)) == 0);
	lp_lora_free(lo);
	lp_lora_free(none);
	CHECK(write_peft(dir, sizeof(dir), &l, "{'bias': 'some'}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "bias 'some' is not supported (only 'none')");
	CHECK(write_peft(dir, sizeof(dir), &l, "{'lora_bias': true}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "lora_bias is set");
	add_tensor(&l, "base_model.model.model.layers.0.self_attn.q_proj.bias", "F32", 1, 64,
	           &seed);
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "q_proj.bias' in");
	CHECK_FAILS(dir, &s, -EINVAL, "is a bias; adapters that train biases are not supported");
	/* with a bias in the file, "all" and "lora_only" are refused as before */
	CHECK(write_peft(dir, sizeof(dir), &l, "{'bias': 'all'}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL,
	            "bias 'all' is not supported (only 'none'): the adapter trains the base "
	            "model's biases");
	CHECK_FAILS(dir, &s, -EINVAL,
	            "('base_model.model.model.layers.0.self_attn.q_proj.bias' in");
	CHECK(write_peft(dir, sizeof(dir), &l, "{'bias': 'lora_only'}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "bias 'lora_only' is not supported (only 'none')");
	tensors_free(&l);

	/* the committed fixture peft saved with bias="all": r4-qv's weights */
	{
		char a[300], b[300];
		fixture(a, sizeof(a), "tiny/r4-qv-bias-all");
		fixture(b, sizeof(b), "tiny/r4-qv");
		CHECK_LOADS(lo, a, &s);
		CHECK_LOADS(none, b, &s);
		CHECK_MSG(lora_diff(lo, none, &s, 1e-30, why, sizeof(why)) == 0, "%s", why);
		lp_lora_free(lo);
		lp_lora_free(none);
	}
}

static void test_reject_modules_to_save(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	char dir[200];
	uint32_t seed = 1;

	tiny_tensors(&l, QV_MASK, 8);
	CHECK(write_peft(dir, sizeof(dir), &l, "{'modules_to_save': ['lm_head']}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "modules_to_save ('lm_head'...) is not supported");
	add_tensor(&l, "base_model.model.lm_head.weight", "F32", 512, 64, &seed);
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "unexpected tensor 'base_model.model.lm_head.weight'");
	tensors_free(&l);
}

static void test_reject_fan_in_fan_out(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	char dir[200];

	tiny_tensors(&l, QV_MASK, 8);
	CHECK(write_peft(dir, sizeof(dir), &l, "{'fan_in_fan_out': true}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "fan_in_fan_out is set");
	tensors_free(&l);
}

static void test_base_model_names(void)
{
	static const char *const other[] = {"smollm2", "smollm2-135m-instruct-q4_1", NULL};
	static const char *const twice[] = {"smollm2", "smollm2", "other", "smollm2", NULL};
	static const char *const same[] = {"served", "/models/Tiny-Llama-Q8_0.gguf", NULL};
	static const char *const smol[] = {"/models/SmolLM2-135M-Instruct-Q4_1.gguf", NULL};
	struct lp_lora_shape s = tiny_shape(16);
	struct lp_lora *lo = NULL;
	char dir[300];

	fixture(dir, sizeof(dir), "tiny/r4-qv");
	s.base_names = other;
	CHECK_FAILS(dir, &s, -EINVAL,
	            "adapter was trained on base model 'tests/fixtures/tiny-llama', which does not "
	            "match the served model ('smollm2', 'smollm2-135m-instruct-q4_1')");
	/* the served name is the model's name when --served-model-name is not
	 * given: it is listed once */
	s.base_names = twice;
	CHECK_FAILS(dir, &s, -EINVAL, "does not match the served model ('smollm2', 'other')");
	s.base_names = other;
	s.allow_base_mismatch = true;
	CHECK_LOADS(lo, dir, &s);
	lp_lora_free(lo);
	/* the last component, any case, without a quantization suffix */
	s.allow_base_mismatch = false;
	s.base_names = same;
	CHECK_LOADS(lo, dir, &s);
	lp_lora_free(lo);
	fixture(dir, sizeof(dir), "smollm2/r4-qv");
	s = smol_shape(16);
	s.base_names = smol;
	CHECK_LOADS(lo, dir, &s);
	CHECK_EQ_STR(lo->base_model, "HuggingFaceTB/SmolLM2-135M-Instruct");
	lp_lora_free(lo);
}

static void test_reject_missing_config_keys(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	char dir[200];

	tiny_tensors(&l, QV_MASK, 8);
	CHECK(write_peft(dir, sizeof(dir), &l, "{'r': 'DELETE'}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "adapter_config.json': missing 'r'");
	CHECK(write_peft(dir, sizeof(dir), &l, "{'lora_alpha': 'DELETE'}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "missing 'lora_alpha'");
	CHECK(write_peft(dir, sizeof(dir), &l, "{'target_modules': null}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "missing 'target_modules'");
	CHECK(write_peft(dir, sizeof(dir), &l, "{'r': 0}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "'r' must be a positive integer");
	CHECK(write_peft(dir, sizeof(dir), &l, "{'peft_type': 'IA3'}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "peft_type 'IA3' is not supported");
	CHECK(write_peft(dir, sizeof(dir), &l, "{'task_type': 'SEQ_CLS'}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "task_type 'SEQ_CLS' is not supported");
	CHECK(write_file(dir, "adapter_config.json", "{\"r\": 8,", 8) == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "adapter_config.json': not valid json");
	tensors_free(&l);
}

static void test_reject_bad_safetensors(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	char dir[200], path[300];
	size_t n;
	unsigned char *d;

	tiny_tensors(&l, QV_MASK, 8);
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	snprintf(path, sizeof(path), "%s/adapter_model.safetensors", dir);
	d = read_all(path, &n);
	CHECK(d);
	/* cut in the data, in the header, in the length */
	for (size_t cut = n - 1; cut > 0; cut = cut > 1000 ? cut - 997 : cut / 2) {
		CHECK(write_file(dir, "adapter_model.safetensors", d, cut) == 0);
		CHECK_FAILS(dir, &s, -EINVAL, "adapter_model.safetensors'");
	}
	free(d);
	tensors_free(&l);
}

static void test_reject_missing_half_of_pair(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	char dir[200];

	tiny_tensors(&l, QV_MASK, 8);
	remove_tensor(&l, "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight");
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_FAILS(dir, &s, -EINVAL,
	            "'base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight' has no "
	            "matching lora_B");
	tensors_free(&l);
	tiny_tensors(&l, QV_MASK, 8);
	remove_tensor(&l, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "has no matching lora_A");
	tensors_free(&l);
}

/* Rewrites every tensor of l in half type t ("F16" or "BF16"). */
static void tensors_to_half(struct tensors *l, const char *t)
{
	for (size_t i = 0; i < l->n; i++) {
		struct tensor *x = &l->t[i];
		for (size_t k = 0; k < (size_t)(x->rows * x->cols); k++) {
			float v = get_f32(x, k);
			uint16_t h = t[0] == 'F' ? lp_f32_to_f16(v) : lp_f32_to_bf16(v);
			memcpy(x->data + 2 * k, &h, 2);
		}
		snprintf(x->dtype, sizeof(x->dtype), "%s", t);
		x->nbytes /= 2;
	}
}

/* An adapter saved in f16 or bf16 stays in that type in memory (half the
 * bytes of f32), its values exactly the file's; B too when the scale is a
 * power of two and folds in exactly; with another scale B is kept in f32,
 * scaled, so that folding never rounds. */
static void test_half_weights_stay_half(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	static const char *types[2] = {"F16", "BF16"};
	static const enum lp_dtype want[2] = {LP_DTYPE_F16, LP_DTYPE_BF16};

	for (int ti = 0; ti < 2; ti++) {
		struct tensors l = {0};
		struct lp_lora *lo = NULL, *odd = NULL;
		uint32_t seed = 77;
		char dir[200];
		size_t f32_bytes = 0;
		int bad = 0;

		add_pairs(&l, &s, 0x7f, 3, 8, "", &seed);
		tensors_to_half(&l, types[ti]);
		/* alpha 16, r 8: scale 2 */
		CHECK(write_peft(dir, sizeof(dir), &l,
		                 "{'target_modules': ['q_proj', 'k_proj', 'v_proj', 'o_proj', "
		                 "'gate_proj', 'up_proj', 'down_proj']}") == 0);
		CHECK_LOADS(lo, dir, &s);
		CHECK(layout_ok(lo, &s));
		for (int layer = 0; layer < s.n_layers; layer++)
			for (int t = 0; t < LP_LORA_N_TARGETS; t++) {
				const struct lp_lora_pair *p = lp_lora_pair_at(lo, layer, t);
				char name[200];
				int in, out;
				lp_lora_target_dims(&s, t, &in, &out);
				f32_bytes += (size_t)p->rank * (size_t)(in + out) * 4;
				bad |= p->a_type != want[ti] || p->b_type != want[ti];
				snprintf(name, sizeof(name),
				         "base_model.model.model.layers.%d.%s.lora_A.weight", layer,
				         module_path[t]);
				const struct tensor *a = find_tensor(&l, name);
				name[strlen(name) - 8] = 'B';
				const struct tensor *b = find_tensor(&l, name);
				for (int k = 0; k < p->rank && !bad; k++) {
					for (int i = 0; i < in; i++)
						bad |= memcmp((const uint16_t *)p->a +
						                  (size_t)k * in + i,
						              a->data + 2 * ((size_t)k * in + i),
						              2) != 0;
					for (int o = 0; o < out; o++) {
						uint16_t h;
						memcpy(&h, b->data + 2 * ((size_t)o * p->rank + k),
						       2);
						float v = ti ? lp_bf16_to_f32(h) : lp_f16_to_f32(h);
						bad |= lp_lora_b_at(p, out, k, o) != 2.0f * v;
					}
				}
			}
		CHECK_MSG(!bad, "%s adapter: types or values differ", types[ti]);
		CHECK_MSG(lo->data_bytes * 2 < f32_bytes + 64 * 2 * 7 * 3 * 2,
		          "%s adapter takes %zu bytes, f32 would take %zu", types[ti],
		          lo->data_bytes, f32_bytes);

		/* alpha 24, r 8: scale 3 does not fold exactly: B in f32, A half */
		CHECK(write_peft(dir, sizeof(dir), &l,
		                 "{'lora_alpha': 24, 'target_modules': ['q_proj', 'k_proj', "
		                 "'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']}") == 0);
		CHECK_LOADS(odd, dir, &s);
		CHECK(layout_ok(odd, &s));
		for (int layer = 0; layer < s.n_layers && !bad; layer++)
			for (int t = 0; t < LP_LORA_N_TARGETS && !bad; t++) {
				const struct lp_lora_pair *p = lp_lora_pair_at(odd, layer, t);
				const struct lp_lora_pair *q = lp_lora_pair_at(lo, layer, t);
				int in, out;
				lp_lora_target_dims(&s, t, &in, &out);
				bad |= p->a_type != want[ti] || p->b_type != LP_DTYPE_F32;
				for (int k = 0; k < p->rank && !bad; k++)
					for (int o = 0; o < out; o++)
						bad |= lp_lora_b_at(p, out, k, o) !=
						       lp_lora_b_at(q, out, k, o) / 2.0f * 3.0f;
			}
		CHECK_MSG(!bad, "%s adapter with scale 3: types or values differ", types[ti]);
		lp_lora_free(lo);
		lp_lora_free(odd);
		tensors_free(&l);
	}
}

static void test_reject_non_finite(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	struct tensor *t;
	char dir[200];
	uint32_t seed = 4;
	uint16_t inf16 = 0x7c00;

	tiny_tensors(&l, QV_MASK, 8);
	t = find_tensor(&l, "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight");
	set_f32(t, 3 * 64 + 5, NAN);
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_FAILS(dir, &s, -EINVAL,
	            "'base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight' holds a "
	            "non-finite value (nan) at [3, 5]");
	tensors_free(&l);

	add_pairs(&l, &s, QV_MASK, 3, 8, "", &seed);
	for (size_t i = 0; i < l.n; i++) { /* the same adapter in f16 */
		struct tensor *x = &l.t[i];
		for (size_t k = 0; k < (size_t)(x->rows * x->cols); k++) {
			uint16_t h = lp_f32_to_f16(get_f32(x, k));
			memcpy(x->data + 2 * k, &h, 2);
		}
		snprintf(x->dtype, sizeof(x->dtype), "F16");
		x->nbytes /= 2;
	}
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	{
		struct lp_lora *lo = NULL;
		CHECK_LOADS(lo, dir, &s);
		CHECK(A_VAL(lp_lora_pair_at(lo, 0, LP_LORA_Q), 1) ==
		      lp_f16_to_f32(((uint16_t *)(void *)l.t[0].data)[1]));
		lp_lora_free(lo);
	}
	memcpy(find_tensor(&l, "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight")
	               ->data +
	           2 * 9,
	       &inf16, 2);
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_FAILS(dir, &s, -EINVAL,
	            "v_proj.lora_B.weight' holds a non-finite value (inf) at [1, 1]");
	tensors_free(&l);
}

static void test_reject_non_float(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	char dir[200];
	uint32_t seed = 8;

	tiny_tensors(&l, QV_MASK, 8);
	remove_tensor(&l, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
	add_tensor(&l, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "I32", 8,
	           64, &seed);
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_FAILS(dir, &s, -EINVAL,
	            "q_proj.lora_A.weight' has dtype I32; lora weights must be "
	            "F32, F16 or BF16");
	tensors_free(&l);
}

static void test_reject_unselected_tensor(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	char dir[200];

	tiny_tensors(&l, QV_MASK | 1u << LP_LORA_K, 8);
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_FAILS(dir, &s, -EINVAL,
	            "is for module 'model.layers.0.self_attn.k_proj', which target_modules in "
	            "adapter_config.json does not select");
	tensors_free(&l);
}

/* ---- torch zip checkpoints, written here ---- */

static uint32_t crc32_bytes(const unsigned char *p, size_t n)
{
	uint32_t c = 0xffffffffu;
	for (size_t i = 0; i < n; i++) {
		c ^= p[i];
		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
	}
	return c ^ 0xffffffffu;
}

struct zent {
	char name[128];
	const unsigned char *data;
	size_t n;
	unsigned method;
};

/* A zip of stored entries as torch writes it; with zip64, every size and
 * offset goes through zip64 extra fields and the zip64 end records. */
static void zip_write(struct lp_buf *out, const struct zent *e, size_t n, bool zip64)
{
	size_t offs[64], cd_off, cd_size;
	uint32_t sat = 0xffffffffu;

	if (n > 64)
		abort();
	for (size_t i = 0; i < n; i++) {
		size_t nl = strlen(e[i].name);
		uint32_t crc = crc32_bytes(e[i].data, e[i].n);

		offs[i] = out->len;
		put_u32(out, 0x04034b50u);
		put_u16(out, zip64 ? 45 : 20);
		put_u16(out, 0);
		put_u16(out, e[i].method);
		put_u32(out, 0);
		put_u32(out, crc);
		put_u32(out, zip64 ? sat : (uint32_t)e[i].n);
		put_u32(out, zip64 ? sat : (uint32_t)e[i].n);
		put_u16(out, (unsigned)nl);
		put_u16(out, zip64 ? 20 : 0);
		put(out, e[i].name, nl);
		if (zip64) {
			put_u16(out, 1);
			put_u16(out, 16);
			put_u64(out, e[i].n);
			put_u64(out, e[i].n);
		}
		put(out, e[i].data, e[i].n);
	}
	cd_off = out->len;
	for (size_t i = 0; i < n; i++) {
		size_t nl = strlen(e[i].name);

		put_u32(out, 0x02014b50u);
		put_u16(out, 45);
		put_u16(out, zip64 ? 45 : 20);
		put_u16(out, 0);
		put_u16(out, e[i].method);
		put_u32(out, 0);
		put_u32(out, crc32_bytes(e[i].data, e[i].n));
		put_u32(out, zip64 ? sat : (uint32_t)e[i].n);
		put_u32(out, zip64 ? sat : (uint32_t)e[i].n);
		put_u16(out, (unsigned)nl);
		put_u16(out, zip64 ? 28 : 0);
		put_u16(out, 0);
		put_u16(out, 0);
		put_u16(out, 0);
		put_u32(out, 0);
		put_u32(out, zip64 ? sat : (uint32_t)offs[i]);
		put(out, e[i].name, nl);
		if (zip64) {
			put_u16(out, 1);
			put_u16(out, 24);
			put_u64(out, e[i].n);
			put_u64(out, e[i].n);
			put_u64(out, offs[i]);
		}
	}
	cd_size = out->len - cd_off;
	if (zip64) {
		size_t z = out->len;
		put_u32(out, 0x06064b50u);
		put_u64(out, 44);
		put_u16(out, 45);
		put_u16(out, 45);
		put_u32(out, 0);
		put_u32(out, 0);
		put_u64(out, n);
		put_u64(out, n);
		put_u64(out, cd_size);
		put_u64(out, cd_off);
		put_u32(out, 0x07064b50u);
		put_u32(out, 0);
		put_u64(out, z);
		put_u32(out, 1);
	}
	put_u32(out, 0x06054b50u);
	put_u16(out, 0);
	put_u16(out, 0);
	put_u16(out, zip64 ? 0xffff : (unsigned)n);
	put_u16(out, zip64 ? 0xffff : (unsigned)n);
	put_u32(out, zip64 ? sat : (uint32_t)cd_size);
	put_u32(out, zip64 ? sat : (uint32_t)cd_off);
	put_u16(out, 0);
}

static void pk(struct lp_buf *b, unsigned op)
{
	unsigned char c = (unsigned char)op;
	put(b, &c, 1);
}

static void pk_str(struct lp_buf *b, const char *s)
{
	pk(b, 'X');
	put_u32(b, (uint32_t)strlen(s));
	put(b, s, strlen(s));
}

static void pk_global(struct lp_buf *b, const char *mod, const char *name)
{
	pk(b, 'c');
	put(b, mod, strlen(mod));
	put(b, "\n", 1);
	put(b, name, strlen(name));
	put(b, "\n", 1);
}

static void pk_int(struct lp_buf *b, long v)
{
	if (v >= 0 && v < 256) {
		pk(b, 'K');
		pk(b, (unsigned)v);
	} else if (v >= 0 && v < 65536) {
		pk(b, 'M');
		put_u16(b, (unsigned)v);
	} else {
		pk(b, 'J');
		put_u32(b, (uint32_t)v);
	}
}

/* torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False,
 * OrderedDict()) over the storage ('storage', torch.<cls>, key, 'cpu',
 * numel), as torch.save pickles a tensor. */
static void pk_tensor(struct lp_buf *b, const char *cls, const char *key, long numel, long offset,
                      long rows, long cols, long s0, long s1)
{
	pk_global(b, "torch._utils", "_rebuild_tensor_v2");
	pk(b, '(');
	pk(b, '(');
	pk_str(b, "storage");
	pk_global(b, "torch", cls);
	pk_str(b, key);
	pk_str(b, "cpu");
	pk_int(b, numel);
	pk(b, 't');
	pk(b, 'Q');
	pk_int(b, offset);
	pk_int(b, rows);
	pk_int(b, cols);
	pk(b, 0x86);
	pk_int(b, s0);
	pk_int(b, s1);
	pk(b, 0x86);
	pk(b, 0x89);
	pk_global(b, "collections", "OrderedDict");
	pk(b, ')');
	pk(b, 'R');
	pk(b, 't');
	pk(b, 'R');
}

static const char *storage_class(const char *dtype)
{
	return !strcmp(dtype, "F32")    ? "FloatStorage"
	       : !strcmp(dtype, "F16")  ? "HalfStorage"
	       : !strcmp(dtype, "BF16") ? "BFloat16Storage"
	                                : "IntStorage";
}

/* The state dict {name: tensor} of l as an OrderedDict with _metadata, the
 * way torch.save writes module.state_dict(), memoizing as it goes. */
static void pk_state_dict(struct lp_buf *b, const struct tensors *l)
{
	pk(b, 0x80);
	pk(b, 2);
	pk_global(b, "collections", "OrderedDict");
	pk(b, 'q');
	pk(b, 0);
	pk(b, ')');
	pk(b, 'R');
	pk(b, '(');
	for (size_t i = 0; i < l->n; i++) {
		char key[24];
		snprintf(key, sizeof(key), "%zu", i);
		pk_str(b, l->t[i].name);
		pk_tensor(b, storage_class(l->t[i].dtype), key, (long)(l->t[i].rows * l->t[i].cols),
		          0, (long)l->t[i].rows, (long)l->t[i].cols, (long)l->t[i].cols, 1);
	}
	pk(b, 'u');
	pk(b, '}');
	pk_str(b, "_metadata");
	pk(b, '}');
	pk_str(b, "");
	pk(b, '}');
	pk_str(b, "version");
	pk_int(b, 1);
	pk(b, 's');
	pk(b, 's');
	pk(b, 's');
	pk(b, 'b');
	pk(b, '.');
}

/* The checkpoint bytes: archive/data.pkl = pickle, archive/data/<i> = the
 * bytes of l's tensors, archive/byteorder, archive/version. */
static void ckpt_write(struct lp_buf *out, const struct lp_buf *pickle, const struct tensors *l,
                       bool zip64)
{
	struct zent e[64];
	size_t n = 0;

	snprintf(e[n].name, sizeof(e[n].name), "archive/data.pkl");
	e[n].data = (const unsigned char *)pickle->data;
	e[n].n = pickle->len;
	e[n++].method = 0;
	snprintf(e[n].name, sizeof(e[n].name), "archive/byteorder");
	e[n].data = (const unsigned char *)"little";
	e[n].n = 6;
	e[n++].method = 0;
	for (size_t i = 0; l && i < l->n; i++) {
		snprintf(e[n].name, sizeof(e[n].name), "archive/data/%zu", i);
		e[n].data = l->t[i].data;
		e[n].n = l->t[i].nbytes;
		e[n++].method = 0;
	}
	snprintf(e[n].name, sizeof(e[n].name), "archive/version");
	e[n].data = (const unsigned char *)"3\n";
	e[n].n = 2;
	e[n++].method = 0;
	zip_write(out, e, n, zip64);
}

/* A PEFT dir with adapter_model.bin made from the pickle and l. */
static int write_bin_adapter(char *dir, size_t cap, const struct lp_buf *pickle,
                             const struct tensors *l, bool zip64)
{
	struct lp_buf z;
	int rc;

	new_dir(dir, cap);
	lp_buf_init(&z, BUF_MAX);
	ckpt_write(&z, pickle, l, zip64);
	rc = write_file(dir, "adapter_model.bin", z.data, z.len);
	lp_buf_release(&z);
	return rc ? rc : write_config(dir, NULL);
}

static void std_pickle(struct lp_buf *b, const struct tensors *l)
{
	pk_state_dict(b, l);
}

static void test_bin_round_trip(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	struct lp_lora *x = NULL, *y = NULL;
	struct lp_buf p;
	char dir[200], sdir[200], why[200];
	double d;

	tiny_tensors(&l, QV_MASK, 8);
	/* one tensor in bf16, one in f16: the storage class gives the dtype */
	for (int k = 0; k < 2; k++) {
		struct tensor *t = &l.t[k];
		for (size_t i = 0; i < (size_t)(t->rows * t->cols); i++) {
			float f = get_f32(t, i);
			uint16_t h = k ? lp_f32_to_f16(f) : lp_f32_to_bf16(f);
			memcpy(t->data + 2 * i, &h, 2);
		}
		snprintf(t->dtype, sizeof(t->dtype), "%s", k ? "F16" : "BF16");
		t->nbytes /= 2;
	}
	CHECK(write_peft(sdir, sizeof(sdir), &l, NULL) == 0);
	CHECK_LOADS(x, sdir, &s);
	for (int zip64 = 0; zip64 < 2; zip64++) {
		lp_buf_init(&p, BUF_MAX);
		std_pickle(&p, &l);
		CHECK(write_bin_adapter(dir, sizeof(dir), &p, &l, zip64) == 0);
		lp_buf_release(&p);
		{
			struct lp_err e = {0};
			int rc = lp_lora_load(&y, dir, &s, &e);
			if (rc)
				lp_lora_free(x);
			CHECK_MSG(rc == 0, "zip64 %d: %s", zip64, e.msg);
		}
		d = lora_diff(y, x, &s, 1e-30, why, sizeof(why));
		CHECK_EQ_STR(y->format, "peft-bin");
		lp_lora_free(y);
		y = NULL;
		if (d != 0)
			lp_lora_free(x);
		CHECK_MSG(d == 0, "zip64 %d: %s", zip64, why);
	}
	lp_lora_free(x);
	tensors_free(&l);
}

/* Two tensors viewing one storage at different offsets, and the memo
 * reused through BINGET, as torch writes views. */
static void test_bin_shared_storage(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0}, one = {0};
	struct lp_lora *x = NULL;
	struct lp_buf p;
	char dir[200];
	uint32_t seed = 77;
	struct tensor *big;
	float a0, b5;

	/* layer 0 and 1 q and v: A [8, 64] and B [64 or 32, 8], all in storage 0 */
	big = add_tensor(&one, "all", "F32", 1, 2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8), &seed);
	(void)big;
	lp_buf_init(&p, BUF_MAX);
	pk(&p, 0x80);
	pk(&p, 2);
	pk(&p, '}');
	pk(&p, '(');
	{
		long off = 0, numel = (long)one.t[0].cols;
		for (int layer = 0; layer < 2; layer++) {
			for (int t = 0; t < 2; t++) {
				int out = t ? 32 : 64;
				char name[160];
				snprintf(name, sizeof(name),
				         "base_model.model.model.layers.%d.self_attn.%s_proj.lora_"
				         "A.weight",
				         layer, t ? "v" : "q");
				pk_str(&p, name);
				pk_tensor(&p, "FloatStorage", "0", numel, off, 8, 64, 64, 1);
				off += 8 * 64;
				name[strlen(name) - 8] = 'B';
				pk_str(&p, name);
				pk_tensor(&p, "FloatStorage", "0", numel, off, out, 8, 8, 1);
				off += out * 8;
			}
		}
	}
	pk(&p, 'u');
	pk(&p, '.');
	CHECK(write_bin_adapter(dir, sizeof(dir), &p, &one, true) == 0);
	lp_buf_release(&p);
	CHECK_LOADS(x, dir, &s);
	a0 = A_VAL(lp_lora_pair_at(x, 0, LP_LORA_V), 0);
	b5 = b_at(lp_lora_pair_at(x, 1, LP_LORA_V), s.kv_dim, 5);
	lp_lora_free(x);
	CHECK(a0 == get_f32(&one.t[0], 8 * 64 + 64 * 8));
	CHECK(b5 == 2.0f * get_f32(&one.t[0], (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8) + 8 * 64 +
	                                          64 * 8 + 8 * 64 + 5));
	tensors_free(&one);
	tensors_free(&l);
}

/* Writes a one-tensor checkpoint whose pickle is built by fn and expects
 * want in the error. */
static int bin_case(void (*fn)(struct lp_buf *p), const struct tensors *l, const char *want,
                    char *msg, size_t cap)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct lp_lora *x = NULL;
	struct lp_buf p;
	struct lp_err e = {0};
	char dir[200];
	int rc;

	lp_buf_init(&p, BUF_MAX);
	fn(&p);
	rc = write_bin_adapter(dir, sizeof(dir), &p, l, false);
	lp_buf_release(&p);
	if (rc)
		return -1;
	rc = lp_lora_load(&x, dir, &s, &e);
	lp_lora_free(x);
	if (rc != -EINVAL || !strstr(e.msg, want) || !strstr(e.msg, "adapter_model.bin")) {
		snprintf(msg, cap, "got %d '%s', expected '%s'", rc, e.msg, want);
		return -1;
	}
	return 0;
}

#define QA "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

static void pk_begin(struct lp_buf *p)
{
	pk(p, 0x80);
	pk(p, 2);
	pk(p, '}');
	pk(p, '(');
	pk_str(p, QA);
}

static void pk_end(struct lp_buf *p)
{
	pk(p, 'u');
	pk(p, '.');
}

static void case_strided(struct lp_buf *p)
{
	pk_begin(p);
	pk_tensor(p, "FloatStorage", "0", 512, 0, 8, 64, 1, 8);
	pk_end(p);
}

static void case_global(struct lp_buf *p)
{
	pk_begin(p);
	pk_global(p, "os", "system");
	pk_end(p);
}

static void case_missing_storage(struct lp_buf *p)
{
	pk_begin(p);
	pk_tensor(p, "FloatStorage", "9", 512, 0, 8, 64, 64, 1);
	pk_end(p);
}

static void case_outside_storage(struct lp_buf *p)
{
	pk_begin(p);
	pk_tensor(p, "FloatStorage", "0", 512, 8, 8, 64, 64, 1);
	pk_end(p);
}

static void case_storage_short(struct lp_buf *p)
{
	pk_begin(p);
	pk_tensor(p, "FloatStorage", "0", 1024, 0, 8, 64, 64, 1);
	pk_end(p);
}

static void case_long(struct lp_buf *p)
{
	pk_begin(p);
	pk_tensor(p, "LongStorage", "0", 256, 0, 4, 64, 64, 1);
	pk_end(p);
}

static void case_opcode(struct lp_buf *p)
{
	pk_begin(p);
	pk(p, 0x81); /* NEWOBJ */
	pk_end(p);
}

static void case_truncated(struct lp_buf *p)
{
	pk_begin(p);
	pk_tensor(p, "FloatStorage", "0", 512, 0, 8, 64, 64, 1);
}

static void case_memo(struct lp_buf *p)
{
	pk_begin(p);
	pk(p, 'h');
	pk(p, 7);
	pk_end(p);
}

static void case_list(struct lp_buf *p)
{
	pk(p, 0x80);
	pk(p, 2);
	pk(p, ']');
	pk(p, '.');
}

static void case_not_tensor(struct lp_buf *p)
{
	pk_begin(p);
	pk_int(p, 5);
	pk_end(p);
}

static void case_marks(struct lp_buf *p)
{
	pk_begin(p);
	for (int i = 0; i < 5000; i++)
		pk(p, '(');
	pk_end(p);
}

static void case_unbalanced(struct lp_buf *p)
{
	pk_begin(p);
	pk_tensor(p, "FloatStorage", "0", 512, 0, 8, 64, 64, 1);
	pk(p, 'u');
	pk_int(p, 1);
	pk(p, '.');
}

static void case_persid(struct lp_buf *p)
{
	pk_begin(p);
	pk_str(p, "not a tuple");
	pk(p, 'Q');
	pk_end(p);
}

static void test_bin_rejections(void)
{
	static const struct {
		void (*fn)(struct lp_buf *p);
		const char *want;
	} cases[] = {
	    {case_strided, "is not contiguous (stride 8 in dimension 1, expected 1)"},
	    {case_global, "unsupported global 'os.system'"},
	    {case_missing_storage, "storage 'archive/data/9' is missing"},
	    {case_outside_storage, "lies outside its storage of 512 elements"},
	    {case_storage_short, "holds 2048 bytes, 1024 elements of F32 need more"},
	    {case_long, "has dtype I64; lora weights must be F32, F16 or BF16"},
	    {case_opcode, "unsupported pickle opcode 0x81"},
	    {case_truncated, "truncated pickle"},
	    {case_memo, "memo key not set"},
	    {case_list, "does not hold a dict of tensors"},
	    {case_not_tensor, "is not a tensor"},
	    {case_marks, "marks nested too deep"},
	    {case_unbalanced, "STOP with an unbalanced stack"},
	    {case_persid, "persistent id is not a 5-tuple"},
	};
	struct tensors l = {0};
	char msg[700];
	uint32_t seed = 2;

	add_tensor(&l, QA, "F32", 8, 64, &seed);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		if (bin_case(cases[i].fn, &l, cases[i].want, msg, sizeof(msg))) {
			tensors_free(&l);
			CHECK_MSG(0, "case %zu: %s", i, msg);
		}
	}
	tensors_free(&l);
}

static void test_bin_container_rejections(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	struct lp_buf p, z;
	struct zent e[2];
	char dir[200], path[300];
	unsigned char legacy[64] = {0x80, 0x02, 0x8a, 0x0a};
	uint32_t seed = 11;
	size_t n;
	unsigned char *d;

	tiny_tensors(&l, QV_MASK, 8);
	lp_buf_init(&p, BUF_MAX);
	std_pickle(&p, &l);
	/* a flipped byte in a storage: the entry's CRC-32 catches it */
	CHECK(write_bin_adapter(dir, sizeof(dir), &p, &l, false) == 0);
	snprintf(path, sizeof(path), "%s/adapter_model.bin", dir);
	d = read_all(path, &n);
	CHECK(d);
	d[p.len + 200] ^= 0x40;
	CHECK(write_file(path, NULL, d, n) == 0);
	free(d);
	CHECK_FAILS(dir, &s, -EINVAL, "entry 'archive/data/0' is corrupted (crc-32");
	lp_buf_release(&p);

	/* the pre-1.6 format: a bare pickle */
	CHECK(write_file(path, NULL, legacy, sizeof(legacy)) == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "legacy (non-zip) torch checkpoints are not supported");
	memcpy(legacy, "PK\x03\x04", 4); /* a zip's first bytes, then nothing zip-like */
	CHECK(write_file(path, NULL, legacy, sizeof(legacy)) == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "no zip end-of-central-directory record");

	/* a deflated entry, and an archive without data.pkl */
	snprintf(e[0].name, sizeof(e[0].name), "archive/data.pkl");
	e[0].data = (const unsigned char *)"\x80\x02}.";
	e[0].n = 4;
	e[0].method = 8;
	snprintf(e[1].name, sizeof(e[1].name), "archive/other");
	e[1].data = (const unsigned char *)"x";
	e[1].n = 1;
	e[1].method = 0;
	lp_buf_init(&z, BUF_MAX);
	zip_write(&z, e, 2, false);
	CHECK(write_file(path, NULL, z.data, z.len) == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "entry 'archive/data.pkl' is compressed (method 8)");
	lp_buf_reset(&z);
	zip_write(&z, e + 1, 1, true);
	CHECK(write_file(path, NULL, z.data, z.len) == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "not a pytorch checkpoint (no <archive>/data.pkl entry)");
	lp_buf_release(&z);
	(void)seed;
	tensors_free(&l);
}

/* Every cut of a real torch.save file fails cleanly; so does (or loads)
 * every single-byte change. */
static void test_bin_truncated_and_corrupted(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	char src[300], cfg[300], dir[200], path[300];
	unsigned char *d;
	size_t n, cuts = 0;
	uint32_t seed = 2024;
	int ok = 0;

	fixture(src, sizeof(src), "tiny/r8-all-bin/adapter_model.bin");
	fixture(cfg, sizeof(cfg), "tiny/r8-all-bin/adapter_config.json");
	d = read_all(src, &n);
	CHECK_MSG(d, "cannot read '%s'", src);
	new_dir(dir, sizeof(dir));
	snprintf(path, sizeof(path), "%s/adapter_model.bin", dir);
	CHECK(copy_file(cfg, dir, "adapter_config.json", SIZE_MAX) == 0);
	for (size_t cut = 0; cut < n; cut += cut + 200 < n ? 1 + n / 211 : 1) {
		struct lp_lora *x = NULL;
		struct lp_err e = {0};
		int rc;

		CHECK(write_file(path, NULL, d, cut) == 0);
		rc = lp_lora_load(&x, dir, &s, &e);
		lp_lora_free(x);
		if (rc != -EINVAL || !strstr(e.msg, "adapter_model.bin"))
			free(d);
		CHECK_MSG(rc == -EINVAL && strstr(e.msg, "adapter_model.bin"),
		          "cut at %zu of %zu: %d '%s'", cut, n, rc, e.msg);
		cuts++;
	}
	for (int i = 0; i < 600; i++) {
		struct lp_lora *x = NULL;
		size_t at = rng(&seed) % n;
		unsigned char old = d[at];

		d[at] ^= (unsigned char)(1u << (rng(&seed) % 8));
		CHECK(write_file(path, NULL, d, n) == 0);
		if (!lp_lora_load(&x, dir, &s, NULL))
			ok++;
		lp_lora_free(x);
		d[at] = old;
	}
	free(d);
	printf("  %zu cuts rejected; %d of 600 one-bit changes were in bytes no reader uses\n",
	       cuts, ok);
}

/* ---- .npy and TensorRT-LLM ---- */

/* A .npy of the given version: the header dict padded so the data starts at
 * a multiple of 64, as numpy writes it. */
static void npy_bytes(struct lp_buf *b, int version, const char *dict, const void *data, size_t n)
{
	size_t pre = version == 1 ? 10 : 12, hl = strlen(dict) + 1;

	while ((pre + hl) % 64)
		hl++;
	put(b, "\x93NUMPY", 6);
	pk(b, (unsigned)version);
	pk(b, 0);
	if (version == 1)
		put_u16(b, (unsigned)hl);
	else
		put_u32(b, (uint32_t)hl);
	put(b, dict, strlen(dict));
	for (size_t i = strlen(dict) + 1; i < hl; i++)
		put(b, " ", 1);
	put(b, "\n", 1);
	put(b, data, n);
}

static int npy_case(int version, const char *dict, size_t data_bytes, const char *want,
                    struct lp_npy *out, char *msg, size_t cap)
{
	static const float vals[6] = {1, 2, 3, 4, 5, 6};
	struct lp_buf b;
	struct lp_err e = {0};
	int rc;

	lp_buf_init(&b, BUF_MAX);
	npy_bytes(&b, version, dict, vals, data_bytes);
	rc = lp_npy_parse(out, b.data, b.len, "x.npy", &e);
	if (want ? rc != -EINVAL || !strstr(e.msg, want) : rc != 0) {
		if (snprintf(msg, cap, "'%s': got %d '%s', expected '%s'", dict, rc, e.msg,
		             want ? want : "success") < 0)
			msg[0] = '\0';
		rc = -1;
	} else {
		rc = 0;
	}
	if (!want && !rc && memcmp(out->t.data, vals, out->t.nbytes))
		rc = -1;
	lp_buf_release(&b);
	return rc;
}

static void test_npy_headers(void)
{
	static const struct {
		int version;
		const char *dict;
		size_t bytes;
		const char *want;
	} cases[] = {
	    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 24, NULL},
	    {2, "{'descr': '<f4', 'fortran_order': False, 'shape': (6,), }", 24, NULL},
	    {3, "{\"descr\": \"<f2\", \"fortran_order\": False, \"shape\": (3, 2)}", 12, NULL},
	    {1, "{'shape': (), 'fortran_order': False, 'descr': '<i4'}", 4, NULL},
	    {1, "{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }", 24, "(big-endian)"},
	    {1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", 24, "fortran-order"},
	    {1, "{'descr': '<c8', 'fortran_order': False, 'shape': (3,), }", 24, "dtype '<c8'"},
	    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, }", 24, "malformed"},
	    {1, "{'descr': '<f4', 'shape': (2, 3), }", 24, "lacks 'fortran_order'"},
	    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1}", 24,
	     "unexpected key 'x'"},
	    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 20, "truncated"},
	    {1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 9999999999999999), }", 24,
	     "malformed"},
	    {4, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 24, "version 4.0"},
	};
	struct lp_npy npy;
	char msg[400];

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		int rc = npy_case(cases[i].version, cases[i].dict, cases[i].bytes, cases[i].want,
		                  &npy, msg, sizeof(msg));
		CHECK_MSG(rc == 0, "case %zu: %s", i, msg);
	}
	CHECK_EQ_INT(npy_case(1, cases[0].dict, 24, NULL, &npy, msg, sizeof(msg)), 0);
	CHECK_EQ_INT(npy.t.n_dims, 2);
	CHECK_EQ_INT(npy.t.shape[1], 3);
	CHECK_EQ_INT(npy.t.type, LP_FMT_F32);
	CHECK(lp_npy_parse(&npy, "\x93NUMPY\x01", 7, "x.npy", NULL) == -EINVAL);
}

struct trt_row {
	int module, layer, rank, in, out;
	const float *a, *b;
};

static int write_trtllm(const char *dir, const struct trt_row *r, size_t n, bool f16,
                        int64_t row_len, const char *config_descr)
{
	struct lp_buf b;
	char dict[200];
	size_t max_row = 0, es = f16 ? 2 : 4;
	unsigned char *w;
	int32_t *cfg;
	int rc;

	for (size_t i = 0; i < n; i++) {
		size_t need = (size_t)r[i].rank * (size_t)(r[i].in + r[i].out);
		if (need > max_row)
			max_row = need;
	}
	if (row_len > 0)
		max_row = (size_t)row_len;
	w = calloc(n * max_row, es);
	cfg = calloc(n * 3, sizeof(int32_t));
	if (!w || !cfg)
		abort();
	for (size_t i = 0; i < n; i++) {
		size_t na = (size_t)r[i].rank * r[i].in, nb = (size_t)r[i].rank * r[i].out;
		for (size_t k = 0; k < na + nb && k < max_row; k++) {
			float f = k < na ? r[i].a[k] : r[i].b[k - na];
			if (f16) {
				uint16_t h = lp_f32_to_f16(f);
				memcpy(w + (i * max_row + k) * 2, &h, 2);
			} else {
				memcpy(w + (i * max_row + k) * 4, &f, 4);
			}
		}
		cfg[3 * i] = r[i].module;
		cfg[3 * i + 1] = r[i].layer;
		cfg[3 * i + 2] = r[i].rank;
	}
	lp_buf_init(&b, BUF_MAX);
	snprintf(dict, sizeof(dict),
	         "{'descr': '%s', 'fortran_order': False, 'shape': (1, %zu, %zu), }",
	         f16 ? "<f2" : "<f4", n, max_row);
	npy_bytes(&b, 1, dict, w, n * max_row * es);
	rc = write_file(dir, "model.lora_weights.npy", b.data, b.len);
	lp_buf_reset(&b);
	snprintf(dict, sizeof(dict),
	         "{'descr': '%s', 'fortran_order': False, 'shape': (1, %zu, 3), }",
	         config_descr ? config_descr : "<i4", n);
	npy_bytes(&b, 1, dict, cfg, n * 3 * 4);
	rc = rc ? rc : write_file(dir, "model.lora_config.npy", b.data, b.len);
	lp_buf_release(&b);
	free(w);
	free(cfg);
	return rc;
}

static float *rand_floats(size_t n, uint32_t *seed)
{
	float *f = malloc(n * sizeof(float));
	if (!f)
		abort();
	for (size_t i = 0; i < n; i++)
		f[i] = rnd(seed);
	return f;
}

static float f16_round(float f)
{
	return lp_f16_to_f32(lp_f32_to_f16(f));
}

/* A float16 adapter with TensorRT-LLM's fused qkv module in layer 0 and
 * separate modules (ids 1 and 4 to 7) in layer 1. */
static void test_trtllm_f16_and_fused_qkv(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	uint32_t seed = 31;
	float *a0 = rand_floats(8 * 64, &seed), *b0 = rand_floats(128 * 8, &seed);
	float *a1 = rand_floats(4 * 160, &seed), *b1 = rand_floats(160 * 4, &seed);
	struct trt_row rows[] = {
	    {0, 0, 8, 64, 128, a0, b0}, {1, 1, 4, 64, 64, a1, b1},  {4, 1, 4, 64, 64, a1, b1},
	    {5, 1, 4, 64, 160, a1, b1}, {6, 1, 4, 160, 64, a1, b1}, {7, 1, 2, 64, 160, b1, a1},
	};
	struct lp_lora *x = NULL;
	char dir[200];
	int bad = 0;

	new_dir(dir, sizeof(dir));
	CHECK(write_trtllm(dir, rows, 6, true, 0, NULL) == 0);
	{
		struct lp_err e = {0};
		int rc = lp_lora_load(&x, dir, &s, &e);
		if (rc)
			free(a0), free(b0), free(a1), free(b1);
		CHECK_MSG(rc == 0, "%s", e.msg);
	}
	for (int t = 0; t < 3; t++) {
		const struct lp_lora_pair *p = lp_lora_pair_at(x, 0, t);
		int row0 = t == 0 ? 0 : t == 1 ? 64 : 96, out = t ? 32 : 64;
		bad |= p->rank != 8;
		for (int i = 0; !bad && i < 8 * 64; i++)
			bad |= A_VAL(p, i) != f16_round(a0[i]);
		for (int i = 0; !bad && i < out * 8; i++)
			bad |= b_at(p, out, (size_t)i) != f16_round(b0[row0 * 8 + i]);
	}
	bad |= b_at(lp_lora_pair_at(x, 1, LP_LORA_GATE), 160, 3) != f16_round(b1[3]);
	bad |= A_VAL(lp_lora_pair_at(x, 1, LP_LORA_DOWN), 159) != f16_round(a1[159]);
	bad |= lp_lora_pair_at(x, 1, LP_LORA_UP)->rank != 2 ||
	       A_VAL(lp_lora_pair_at(x, 1, LP_LORA_UP), 5) != f16_round(b1[5]);
	bad |= lp_lora_pair_at(x, 0, LP_LORA_O)->rank != 0 || x->targets != 0x7f;
	bad |= strcmp(x->format, "trtllm") != 0 || x->base_model != NULL;
	lp_lora_free(x);
	free(a0), free(b0), free(a1), free(b1);
	CHECK_MSG(!bad, "values of the fused or f16 adapter differ");
}

static void test_trtllm_rejections(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	uint32_t seed = 5;
	float *a = rand_floats(32 * 160, &seed), *b = rand_floats(160 * 32, &seed);
	static const struct {
		struct trt_row r[2];
		size_t n;
		int64_t row_len;
		const char *descr, *want;
	} cases[] = {
	    {{{9, 0, 4, 64, 64, NULL, NULL}}, 1, 0, NULL, "module id 9 is not supported"},
	    {{{1, 2, 4, 64, 64, NULL, NULL}},
	     1,
	     0,
	     NULL,
	     "layer 2 of '%s/model.lora_config.npy' row 0 (attn_q) is out of range (the base model "
	     "has 2 layers)"},
	    {{{1, 0, 4, 64, 64, NULL, NULL}},
	     1,
	     500,
	     NULL,
	     "row 0 (attn_q, layer 0, rank 4) needs 512 values for the base model's dims, but rows "
	     "hold 500"},
	    {{{3, 0, 4, 64, 64, NULL, NULL}},
	     1,
	     0,
	     NULL,
	     "are not zero (an adapter for another "
	     "model?)"},
	    {{{0, 1, 4, 64, 128, NULL, NULL}, {3, 1, 4, 64, 32, NULL, NULL}},
	     2,
	     0,
	     NULL,
	     "rows 0 and 1 both adapt 'v_proj' of layer 1"},
	    {{{1, 0, 32, 64, 64, NULL, NULL}},
	     1,
	     0,
	     NULL,
	     "rank 32 of 'q_proj' exceeds --max-lora-rank 16"},
	    {{{1, 0, 0, 64, 64, NULL, NULL}}, 1, 16, NULL, "rank 0 is invalid"},
	    {{{1, 0, 4, 64, 64, NULL, NULL}},
	     1,
	     0,
	     "<f4",
	     "must be an int32 array of shape [1, N, 3]"},
	};
	char dir[200], want[300];

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct trt_row r[2];
		for (size_t k = 0; k < cases[i].n; k++) {
			r[k] = cases[i].r[k];
			r[k].a = a;
			r[k].b = b;
		}
		new_dir(dir, sizeof(dir));
		CHECK(write_trtllm(dir, r, cases[i].n, false, cases[i].row_len, cases[i].descr) ==
		      0);
		snprintf(want, sizeof(want), cases[i].want, dir);
		CHECK_FAILS(dir, &s, -EINVAL, want);
	}
	free(a);
	free(b);
}

/* Newer TensorRT-LLM runtimes add a fourth config column, is_dora. */
static void test_trtllm_four_columns(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	char src[300], dir[200], dict[160];
	struct lp_npy cfg;
	struct lp_lora *x = NULL, *y = NULL;
	struct lp_buf b;
	unsigned char *d;
	int32_t rows[64][4];
	size_t n;
	double diff;

	fixture(src, sizeof(src), "tiny/r8-all-trtllm/model.lora_config.npy");
	d = read_all(src, &n);
	CHECK(d && lp_npy_parse(&cfg, d, n, src, NULL) == 0 && cfg.t.shape[1] <= 64);
	for (int64_t i = 0; i < cfg.t.shape[1]; i++) {
		memcpy(rows[i], (const int32_t *)cfg.t.data + 3 * i, 12);
		rows[i][3] = 0;
	}
	new_dir(dir, sizeof(dir));
	fixture(src, sizeof(src), "tiny/r8-all-trtllm/model.lora_weights.npy");
	CHECK(copy_file(src, dir, "model.lora_weights.npy", SIZE_MAX) == 0);
	snprintf(dict, sizeof(dict),
	         "{'descr': '<i4', 'fortran_order': False, 'shape': (1, %lld, 4), }",
	         (long long)cfg.t.shape[1]);
	for (int dora = 0; dora < 2; dora++) {
		rows[3][3] = dora;
		lp_buf_init(&b, BUF_MAX);
		npy_bytes(&b, 1, dict, rows, (size_t)cfg.t.shape[1] * 16);
		CHECK(write_file(dir, "model.lora_config.npy", b.data, b.len) == 0);
		lp_buf_release(&b);
		if (dora)
			CHECK_FAILS(dir, &s, -EINVAL,
			            "row 3 (attn_k): DoRA rows (is_dora 1) are not "
			            "supported");
	}
	rows[3][3] = 0;
	lp_buf_init(&b, BUF_MAX);
	npy_bytes(&b, 1, dict, rows, (size_t)cfg.t.shape[1] * 16);
	CHECK(write_file(dir, "model.lora_config.npy", b.data, b.len) == 0);
	lp_buf_release(&b);
	free(d);
	CHECK_LOADS(x, dir, &s);
	fixture(src, sizeof(src), "tiny/r8-all-trtllm");
	CHECK_LOADS(y, src, &s);
	{
		char why[200];
		diff = lora_diff(x, y, &s, 1e-30, why, sizeof(why));
	}
	lp_lora_free(x);
	lp_lora_free(y);
	CHECK(diff == 0);
}

/* Every cut of either .npy fails cleanly. */
static void test_trtllm_truncated(void)
{
	static const char *const files[] = {"model.lora_weights.npy", "model.lora_config.npy"};
	struct lp_lora_shape s = tiny_shape(16);
	char src[300], dir[200], path[400];
	size_t cuts = 0;

	for (int f = 0; f < 2; f++) {
		unsigned char *d;
		size_t n;

		new_dir(dir, sizeof(dir));
		for (int k = 0; k < 2; k++) {
			snprintf(path, sizeof(path), "tiny/r8-all-trtllm/%s", files[k]);
			fixture(src, sizeof(src), path);
			CHECK(copy_file(src, dir, files[k], SIZE_MAX) == 0);
		}
		snprintf(path, sizeof(path), "%s/%s", dir, files[f]);
		d = read_all(path, &n);
		CHECK(d);
		for (size_t cut = 0; cut < n; cut += cut < 200 || cut + 200 > n ? 1 : 97) {
			struct lp_lora *x = NULL;
			struct lp_err e = {0};
			int rc;

			CHECK(write_file(path, NULL, d, cut) == 0);
			rc = lp_lora_load(&x, dir, &s, &e);
			lp_lora_free(x);
			if (rc != -EINVAL || !strstr(e.msg, files[f]))
				free(d);
			CHECK_MSG(rc == -EINVAL && strstr(e.msg, files[f]),
			          "%s cut at %zu: %d '%s'", files[f], cut, rc, e.msg);
			cuts++;
		}
		free(d);
	}
	printf("  %zu cuts rejected\n", cuts);
}

/* ---- NeMo ---- */

static void tar_add(struct lp_buf *b, const char *name, char type, const void *data, size_t n)
{
	unsigned char h[512] = {0};
	unsigned sum = 0;
	static const unsigned char zeros[512];

	snprintf((char *)h, 100, "%s", name);
	memcpy(h + 100, "0000644", 8);
	memcpy(h + 108, "0000000", 8);
	memcpy(h + 116, "0000000", 8);
	snprintf((char *)h + 124, 12, "%011zo", n);
	memcpy(h + 136, "00000000000", 12);
	h[156] = (unsigned char)type;
	memcpy(h + 257,
	       "ustar\0"
	       "00",
	       8);
	memset(h + 148, ' ', 8);
	for (int i = 0; i < 512; i++)
		sum += h[i];
	snprintf((char *)h + 148, 8, "%06o", sum);
	put(b, h, 512);
	put(b, data, n);
	put(b, zeros, (512 - n % 512) % 512);
}

static void tar_end(struct lp_buf *b)
{
	static const unsigned char zeros[1024];
	put(b, zeros, sizeof(zeros));
}

struct nemo_cfg {
	const char *scheme, *variant, *targets, *adapter_dim, *alpha, *layer_sel;
	int hidden;
	bool no_peft;
};

static const struct nemo_cfg nemo_default = {
    "lora", "nemo", "attention_qkv, attention_dense, mlp_fc1", "4", "8", "null", 64, false,
};

/* A .nemo at path: model_config.yaml from c, model_weights.ckpt from l. */
static int write_nemo(const char *path, const struct nemo_cfg *c, const struct tensors *l,
                      bool with_yaml, bool with_ckpt, bool gz)
{
	struct lp_buf yaml, pick, ckpt, tar;
	int rc;

	lp_buf_init(&yaml, BUF_MAX);
	lp_buf_init(&pick, BUF_MAX);
	lp_buf_init(&ckpt, BUF_MAX);
	lp_buf_init(&tar, BUF_MAX);
	if (lp_buf_appendf(&yaml, NULL,
	                   "mcore_gpt: true\nrestore_from_path: /models/tiny-llama.nemo\n"
	                   "tensor_model_parallel_size: 1\npipeline_model_parallel_size: 1\n"
	                   "num_layers: 2\nhidden_size: %d\nffn_hidden_size: 160\n"
	                   "num_attention_heads: 4\nnum_query_groups: 2\nkv_channels: null\n",
	                   c->hidden))
		abort();
	if (!c->no_peft &&
	    lp_buf_appendf(&yaml, NULL,
	                   "peft:\n  peft_scheme: %s\n  lora_tuning:\n    variant: %s\n"
	                   "    target_modules: [%s]\n    adapter_dim: %s\n    alpha: %s\n"
	                   "    adapter_dropout: 0.0\n    layer_selection: %s\n"
	                   "    weight_tying: false\n",
	                   c->scheme, c->variant, c->targets, c->adapter_dim, c->alpha,
	                   c->layer_sel))
		abort();
	pk_state_dict(&pick, l);
	ckpt_write(&ckpt, &pick, l, true);
	tar_add(&tar, "./", '5', NULL, 0);
	if (with_yaml)
		tar_add(&tar, "./model_config.yaml", '0', yaml.data, yaml.len);
	if (with_ckpt)
		tar_add(&tar, "./model_weights.ckpt", '0', ckpt.data, ckpt.len);
	tar_end(&tar);
	if (gz)
		memcpy(tar.data, "\x1f\x8b", 2);
	rc = write_file(path, NULL, tar.data, tar.len);
	lp_buf_release(&yaml);
	lp_buf_release(&pick);
	lp_buf_release(&ckpt);
	lp_buf_release(&tar);
	return rc;
}

#define NEMO_L0 "model.decoder.layers.0."
#define NEMO_L1 "model.decoder.layers.1."
#define KQV     "self_attention.adapter_layer.lora_kqv_adapter"
#define DENSE   "self_attention.adapter_layer.lora_dense_attention_adapter"
#define FC1     "mlp.adapter_layer.lora_hto4h_adapter"

/* Layer 0: a fused qkv adapter and a fused gate/up adapter, each with a
 * dense shared linear_in (as NeMo trains them); layer 1: a dense adapter
 * whose linear_out has an all-zero column. */
static void nemo_tensors(struct tensors *l)
{
	uint32_t seed = 555;
	struct tensor *t;

	add_tensor(l, NEMO_L0 KQV ".linear_in.weight", "F32", 4, 64, &seed);
	add_tensor(l, NEMO_L0 KQV ".linear_out.weight", "F32", 128, 4, &seed);
	add_tensor(l, NEMO_L0 FC1 ".linear_in.weight", "F32", 4, 64, &seed);
	add_tensor(l, NEMO_L0 FC1 ".linear_out.weight", "F32", 320, 4, &seed);
	add_tensor(l, NEMO_L1 DENSE ".linear_in.weight", "F32", 4, 64, &seed);
	t = add_tensor(l, NEMO_L1 DENSE ".linear_out.weight", "F32", 64, 4, &seed);
	for (int i = 0; i < 64; i++)
		set_f32(t, (size_t)i * 4 + 2, 0.0f);
}

/* linear_out row of q/k/v row j in Megatron's layout for 4 heads, 2 query
 * groups, head_dim 16: per group, 2 q heads, then k, then v. */
static int megatron_row(int part, int j)
{
	if (part == 0)
		return j / 32 * 64 + j % 32;
	return j / 16 * 64 + (part == 1 ? 32 : 48) + j % 16;
}

static void test_nemo_fused_split(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	struct nemo_cfg c = nemo_default;
	struct lp_lora *x = NULL;
	char dir[200], path[300];
	int bad = 0;

	nemo_tensors(&l);
	new_dir(dir, sizeof(dir));
	snprintf(path, sizeof(path), "%s/a.nemo", dir);
	CHECK(write_nemo(path, &c, &l, true, true, false) == 0);
	{
		struct lp_err e = {0};
		int rc = lp_lora_load(&x, path, &s, &e);
		if (rc)
			tensors_free(&l);
		CHECK_MSG(rc == 0, "%s", e.msg);
	}
	/* q, k, v: each all of linear_in, its own rows of linear_out, scale 8 / 4 */
	for (int t = 0; t < 3; t++) {
		const struct lp_lora_pair *p = lp_lora_pair_at(x, 0, t);
		int out = t ? 32 : 64;
		bad |= p->rank != 4 || memcmp(p->a, l.t[0].data, 4 * 64 * 4);
		for (int i = 0; !bad && i < out; i++)
			for (int k = 0; k < 4; k++)
				bad |= b_at(p, out, (size_t)i * 4 + (size_t)k) !=
				       2.0f * get_f32(&l.t[1], megatron_row(t, i) * 4 + k);
	}
	CHECK_MSG(!bad, "q/k/v split differs");
	/* gate: rows 0..159, up: rows 160..319 */
	for (int t = 0; t < 2; t++) {
		const struct lp_lora_pair *p = lp_lora_pair_at(x, 0, LP_LORA_GATE + t);
		bad |= p->rank != 4 || memcmp(p->a, l.t[2].data, 4 * 64 * 4);
		for (int i = 0; !bad && i < 160 * 4; i++)
			bad |=
			    b_at(p, 160, (size_t)i) != 2.0f * get_f32(&l.t[3], (size_t)t * 640 + i);
	}
	CHECK_MSG(!bad, "gate/up split differs");
	/* o: the zero column and its linear_in row are dropped: rank 3 */
	{
		const struct lp_lora_pair *p = lp_lora_pair_at(x, 1, LP_LORA_O);
		static const int keep[3] = {0, 1, 3};
		bad |= p->rank != 3;
		for (int k = 0; !bad && k < 3; k++) {
			bad |= memcmp((const float *)p->a + k * 64, l.t[4].data + keep[k] * 64 * 4,
			              64 * 4) != 0;
			for (int i = 0; i < 64; i++)
				bad |= b_at(p, 64, (size_t)i * 3 + (size_t)k) !=
				       2.0f * get_f32(&l.t[5], (size_t)i * 4 + keep[k]);
		}
	}
	CHECK_MSG(!bad, "dense adapter differs");
	CHECK_EQ_INT(x->targets, 0x3f & ~0u);
	/* targeted without weights: layer 0's dense, layer 1's qkv and fc1 */
	CHECK_EQ_INT(x->absent.n, 6);
	CHECK(lp_lora_absent_has(&x->absent, 0, LP_LORA_O));
	CHECK(!lp_lora_absent_has(&x->absent, 0, LP_LORA_Q));
	CHECK(lp_lora_absent_has(&x->absent, 1, LP_LORA_V));
	CHECK(lp_lora_absent_has(&x->absent, 1, LP_LORA_UP));
	CHECK(!lp_lora_absent_has(&x->absent, 1, LP_LORA_DOWN));
	CHECK_EQ_INT(x->max_rank, 4);
	CHECK_EQ_STR(x->format, "nemo");
	CHECK_EQ_STR(x->base_model, "/models/tiny-llama.nemo");
	lp_lora_free(x);

	/* alpha by OmegaConf interpolation: scale 1 */
	c.alpha = "${peft.lora_tuning.adapter_dim}";
	CHECK(write_nemo(path, &c, &l, true, true, false) == 0);
	CHECK_LOADS(x, path, &s);
	bad = b_at(lp_lora_pair_at(x, 0, LP_LORA_V), 32, 0) !=
	      get_f32(&l.t[1], megatron_row(2, 0) * 4);
	lp_lora_free(x);
	tensors_free(&l);
	CHECK_MSG(!bad, "alpha interpolation");
}

static void test_nemo_rejections(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	struct nemo_cfg c;
	char dir[200], path[300];
	uint32_t seed = 9;

	nemo_tensors(&l);
	new_dir(dir, sizeof(dir));
	snprintf(path, sizeof(path), "%s/a.nemo", dir);
#define NEMO_FAILS(cfg, yaml, ckpt, gz, code, want)                                                \
	do {                                                                                       \
		c = nemo_default;                                                                  \
		cfg;                                                                               \
		CHECK(write_nemo(path, &c, &l, yaml, ckpt, gz) == 0);                              \
		CHECK_FAILS(path, &s, code, want);                                                 \
	} while (0)
	NEMO_FAILS((void)0, false, true, false, -ENOENT, "holds no model_config.yaml");
	NEMO_FAILS((void)0, true, false, false, -ENOENT, "holds no model_weights.ckpt");
	NEMO_FAILS((void)0, true, true, true, -EINVAL,
	           "is gzip-compressed; only uncompressed tar archives are read");
	NEMO_FAILS(c.no_peft = true, true, true, false, -EINVAL, "has no 'peft' section");
	NEMO_FAILS(c.scheme = "adapter", true, true, false, -EINVAL,
	           "peft_scheme 'adapter' is not supported");
	NEMO_FAILS(c.variant = "canonical", true, true, false, -EINVAL,
	           "lora variant 'canonical' is not supported");
	NEMO_FAILS(c.targets = "attention_qkv, lm_head", true, true, false, -EINVAL,
	           "module 'lm_head' is not supported");
	NEMO_FAILS(c.targets = "attention_qkv, mlp_fc1", true, true, false, -EINVAL,
	           "is for 'attention_dense', which target_modules in model_config.yaml does not "
	           "list");
	NEMO_FAILS(c.adapter_dim = "null", true, true, false, -EINVAL, "missing 'adapter_dim'");
	NEMO_FAILS(c.alpha = "null", true, true, false, -EINVAL, "missing 'alpha'");
	NEMO_FAILS(c.adapter_dim = "8", true, true, false, -EINVAL,
	           "linear_in.weight' has shape [4, 64], the base model needs [8, 64]");
	NEMO_FAILS(c.hidden = 576, true, true, false, -EINVAL,
	           "model_config.yaml describes hidden_size 576, the base model has 64");
	NEMO_FAILS(c.layer_sel = "[2]", true, true, false, -EINVAL,
	           "is for layer 1 (1-based), which layer_selection does not list");
	NEMO_FAILS(c.layer_sel = "[3]", true, true, false, -EINVAL,
	           "layer_selection names layer 3 (1-based), but the base model has 2 layers");
	NEMO_FAILS(c.alpha = "[1, 2", true, true, false, -EINVAL, "model_config.yaml: ");

	remove_tensor(&l, NEMO_L1 DENSE ".linear_out.weight");
	NEMO_FAILS((void)0, true, true, false, -EINVAL,
	           DENSE ".linear_in.weight' has no matching linear_out");
	add_tensor(&l, "model.decoder.layers.5." DENSE ".linear_out.weight", "F32", 64, 4, &seed);
	NEMO_FAILS((void)0, true, true, false, -EINVAL,
	           "layer 5 of 'model.decoder.layers.5.self_attention");
	remove_tensor(&l, "model.decoder.layers.5." DENSE ".linear_out.weight");
	add_tensor(&l, "model.decoder.layers.1.self_attention.linear_proj.weight", "F32", 64, 64,
	           &seed);
	NEMO_FAILS((void)0, true, true, false, -EINVAL,
	           "unexpected tensor 'model.decoder.layers.1.self_attention.linear_proj.weight'");
	tensors_free(&l);

	nemo_tensors(&l);
	set_f32(&l.t[1], 17, INFINITY);
	NEMO_FAILS((void)0, true, true, false, -EINVAL,
	           KQV ".linear_out.weight' holds a non-finite value (inf) at [4, 1]");
	tensors_free(&l);

	/* rank above the limit: a dense 32-wide adapter */
	add_tensor(&l, NEMO_L0 KQV ".linear_in.weight", "F32", 32, 64, &seed);
	add_tensor(&l, NEMO_L0 KQV ".linear_out.weight", "F32", 128, 32, &seed);
	NEMO_FAILS(c.adapter_dim = "32", true, true, false, -EINVAL,
	           "rank 32 of 'q_proj' exceeds --max-lora-rank 16");
	tensors_free(&l);
#undef NEMO_FAILS
}

/* Offset just past a tar's end-of-archive block. */
static size_t tar_content_end(const unsigned char *d, size_t n)
{
	size_t off = 0;
	while (off + 512 <= n) {
		size_t size = 0;
		bool zero = true;
		for (int i = 0; i < 512; i++)
			zero &= d[off + i] == 0;
		if (zero)
			return off + 512;
		for (int i = 124; i < 135 && d[off + i] >= '0'; i++)
			size = size * 8 + (size_t)(d[off + i] - '0');
		off += 512 + (size + 511) / 512 * 512;
	}
	return n + 1;
}

static void test_nemo_truncated_and_corrupted(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	char src[300], dir[200], path[300];
	unsigned char *d;
	size_t n, end, cuts = 0;
	uint32_t seed = 77;
	int ok = 0;

	fixture(src, sizeof(src), "tiny/r8-all.nemo");
	d = read_all(src, &n);
	CHECK_MSG(d, "cannot read '%s'", src);
	end = tar_content_end(d, n);
	new_dir(dir, sizeof(dir));
	snprintf(path, sizeof(path), "%s/r8-all.nemo", dir);
	for (size_t cut = 0; cut < n; cut += cut < 1100 ? 1 : 1 + n / 307) {
		struct lp_lora *x = NULL;
		struct lp_err e = {0};
		int rc;

		CHECK(write_file(path, NULL, d, cut) == 0);
		rc = lp_lora_load(&x, path, &s, &e);
		lp_lora_free(x);
		if (cut >= end) /* only the record padding after the end block was cut */
			continue;
		if (rc != -EINVAL || !strstr(e.msg, "r8-all.nemo"))
			free(d);
		CHECK_MSG(rc == -EINVAL && strstr(e.msg, "r8-all.nemo"),
		          "cut at %zu of %zu: %d '%s'", cut, n, rc, e.msg);
		cuts++;
	}
	for (int i = 0; i < 600; i++) {
		struct lp_lora *x = NULL;
		size_t at = rng(&seed) % end;
		unsigned char old = d[at];

		d[at] ^= (unsigned char)(1u << (rng(&seed) % 8));
		CHECK(write_file(path, NULL, d, n) == 0);
		if (!lp_lora_load(&x, path, &s, NULL))
			ok++;
		lp_lora_free(x);
		d[at] = old;
	}
	free(d);
	printf("  %zu cuts rejected; %d of 600 one-bit changes were in bytes no reader uses\n",
	       cuts, ok);
}

static void test_tar_reader(void)
{
	struct lp_buf b;
	struct lp_tar t;
	struct lp_err e = {0};
	char long_name[200], pax[300];
	const struct lp_tar_member *m;
	int rc;

	memset(long_name, 'n', sizeof(long_name));
	memcpy(long_name + 150, "/model_weights.ckpt", 20);
	lp_buf_init(&b, BUF_MAX);
	tar_add(&b, "././@LongLink", 'L', long_name, 170);
	tar_add(&b, "truncated-name", '0', "abc", 3);
	snprintf(pax, sizeof(pax), "29 path=./dir/pax-named.yaml\n");
	tar_add(&b, "PaxHeader", 'x', pax, strlen(pax));
	tar_add(&b, "short", '0', "hello", 5);
	tar_add(&b, "dir/", '5', NULL, 0); /* skipped; links are refused */
	tar_add(&b, "./model_config.yaml", '0', "x: 1\n", 5);
	tar_end(&b);
	rc = lp_tar_read(&t, b.data, b.len, "t.tar", &e);
	CHECK_MSG(rc == 0, "%s", e.msg);
	CHECK_EQ_INT(t.n, 3);
	CHECK_EQ_INT(strlen(t.members[0].name), 169);
	CHECK_EQ_INT(t.members[0].size, 3);
	CHECK_EQ_STR(t.members[1].name, "dir/pax-named.yaml");
	m = lp_tar_find(&t, "model_config.yaml");
	CHECK(m && m->size == 5 && !memcmp(m->data, "x: 1\n", 5));
	lp_tar_release(&t);

	b.data[512 * 2 + 3] ^= 1; /* inside "truncated-name"'s header */
	rc = lp_tar_read(&t, b.data, b.len, "t.tar", &e);
	lp_tar_release(&t);
	CHECK(rc == -EINVAL && strstr(e.msg, "tar header at offset 1024 has a bad checksum"));
	b.data[512 * 2 + 3] ^= 1;
	rc = lp_tar_read(&t, b.data, b.len - 1024, "t.tar", &e);
	lp_tar_release(&t);
	CHECK(rc == -EINVAL && strstr(e.msg, "no end-of-archive block"));
	lp_buf_reset(&b);
	tar_add(&b, "sparse", 'S', "abc", 3);
	tar_end(&b);
	rc = lp_tar_read(&t, b.data, b.len, "t.tar", &e);
	lp_tar_release(&t);
	lp_buf_release(&b);
	CHECK(rc == -EINVAL && strstr(e.msg, "tar member type 'S' at offset 0 is not supported"));
}

/* ---- hostile adapter contents (issue 9: findings 6, 8, 11, 12) ---- */

/* A .nemo at path holding model_config.yaml (the text yaml, under the
 * member name cfg_name with tar type cfg_type) and model_weights.ckpt of l. */
static int write_nemo_raw(const char *path, const char *cfg_name, char cfg_type, const char *yaml,
                          const struct tensors *l)
{
	struct lp_buf pick, ckpt, tar;
	int rc;

	lp_buf_init(&pick, BUF_MAX);
	lp_buf_init(&ckpt, BUF_MAX);
	lp_buf_init(&tar, BUF_MAX);
	pk_state_dict(&pick, l);
	ckpt_write(&ckpt, &pick, l, true);
	tar_add(&tar, cfg_name, cfg_type, yaml, cfg_type == '0' ? strlen(yaml) : 0);
	tar_add(&tar, "./model_weights.ckpt", '0', ckpt.data, ckpt.len);
	tar_end(&tar);
	rc = write_file(path, NULL, tar.data, tar.len);
	lp_buf_release(&pick);
	lp_buf_release(&ckpt);
	lp_buf_release(&tar);
	return rc;
}

static const char nemo_yaml[] =
    "restore_from_path: /models/tiny-llama.nemo\nnum_layers: 2\nhidden_size: 64\n"
    "ffn_hidden_size: 160\nnum_attention_heads: 4\nnum_query_groups: 2\n"
    "peft:\n  peft_scheme: lora\n  lora_tuning:\n    variant: nemo\n"
    "    target_modules: [attention_qkv, attention_dense, mlp_fc1]\n"
    "    adapter_dim: 4\n    alpha: 8\n";

/* nemo_yaml followed by extra. */
static char *yaml_with(const char *extra)
{
	size_t n = strlen(nemo_yaml) + strlen(extra) + 1;
	char *y = malloc(n);

	if (!y)
		abort();
	snprintf(y, n, "%s%s", nemo_yaml, extra);
	return y;
}

/* "key: " + depth '[' + depth ']' + "\n" */
static char *nested(const char *key, size_t depth)
{
	size_t k = strlen(key), n = k + 2 + 2 * depth + 2;
	char *s = malloc(n);

	if (!s)
		abort();
	memcpy(s, key, k);
	memcpy(s + k, ": ", 2);
	memset(s + k + 2, '[', depth);
	memset(s + k + 2 + depth, ']', depth);
	memcpy(s + k + 2 + 2 * depth, "\n", 2);
	return s;
}

/* A deeply nested model_config.yaml is refused while it is streamed, at
 * level 65 (libyaml's loader would take minutes over 2M levels); 64 levels
 * (the root mapping and 63 lists) still load. */
static void test_nemo_yaml_depth(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	struct lp_lora *x = NULL;
	char dir[200], path[300], *deep, *y;

	nemo_tensors(&l);
	new_dir(dir, sizeof(dir));
	snprintf(path, sizeof(path), "%s/a.nemo", dir);
	deep = nested("deep", 63);
	y = yaml_with(deep);
	CHECK(write_nemo_raw(path, "./model_config.yaml", '0', y, &l) == 0);
	CHECK_LOADS(x, path, &s);
	lp_lora_free(x);
	free(deep);
	free(y);
	deep = nested("deep", 64);
	y = yaml_with(deep);
	CHECK(write_nemo_raw(path, "./model_config.yaml", '0', y, &l) == 0);
	CHECK_FAILS(path, &s, -EINVAL, "model_config.yaml nests deeper than 64 levels (line 14)");
	free(deep);
	free(y);
	deep = nested("deep", 1000000);
	y = yaml_with(deep);
	CHECK(write_nemo_raw(path, "./model_config.yaml", '0', y, &l) == 0);
	CHECK_FAILS(path, &s, -EINVAL, "model_config.yaml nests deeper than 64 levels");
	free(deep);
	free(y);
	tensors_free(&l);
}

/* A mapping that holds itself through an alias makes every interpolation
 * walk it again per path component: the lookups are bounded in all. */
static void test_nemo_yaml_alias_loop(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	struct lp_buf y;
	char dir[200], path[300], ref[300];
	size_t n = 0;

	nemo_tensors(&l);
	new_dir(dir, sizeof(dir));
	snprintf(path, sizeof(path), "%s/a.nemo", dir);
	n += (size_t)snprintf(ref + n, sizeof(ref) - n, "${big");
	for (int i = 0; i < 120; i++)
		n += (size_t)snprintf(ref + n, sizeof(ref) - n, ".a");
	snprintf(ref + n, sizeof(ref) - n, ".v}");
	lp_buf_init(&y, BUF_MAX);
	if (lp_buf_appendf(&y, NULL, "big: &r\n") < 0)
		abort();
	for (int i = 0; i < 60000; i++)
		if (lp_buf_appendf(&y, NULL, "  k%d: 0\n", i) < 0)
			abort();
	if (lp_buf_appendf(&y, NULL,
	                   "  a: *r\npeft:\n  peft_scheme: '%s'\n  lora_tuning:\n"
	                   "    variant: '%s'\n    adapter_dim: '%s'\n    alpha: 8\n"
	                   "    target_modules: [all]\n",
	                   ref, ref, ref) < 0)
		abort();
	CHECK(write_nemo_raw(path, "./model_config.yaml", '0', y.data, &l) == 0);
	CHECK_FAILS(path, &s, -EINVAL,
	            "model_config.yaml: key lookups visit more than 16777216 mapping entries");
	lp_buf_release(&y);
	tensors_free(&l);
}

/* .nemo members that leave the archive, and links or devices that could
 * stand in for model_config.yaml, are invalid adapters (-EINVAL: 422), not
 * a missing file (-ENOENT: 404). */
static void test_nemo_unsafe_members(void)
{
	struct lp_lora_shape s = tiny_shape(16);
	struct tensors l = {0};
	char dir[200], path[300];

	nemo_tensors(&l);
	new_dir(dir, sizeof(dir));
	snprintf(path, sizeof(path), "%s/a.nemo", dir);
	CHECK(write_nemo_raw(path, "../model_config.yaml", '0', nemo_yaml, &l) == 0);
	CHECK_FAILS(path, &s, -EINVAL,
	            "tar member '../model_config.yaml' is an absolute path or leads out of the "
	            "archive with '..'");
	CHECK(write_nemo_raw(path, "./a/../../model_config.yaml", '0', nemo_yaml, &l) == 0);
	CHECK_FAILS(path, &s, -EINVAL, "tar member 'a/../../model_config.yaml' is an absolute");
	CHECK(write_nemo_raw(path, "/etc/model_config.yaml", '0', nemo_yaml, &l) == 0);
	CHECK_FAILS(path, &s, -EINVAL, "tar member '/etc/model_config.yaml' is an absolute");
	CHECK(write_nemo_raw(path, "../x/", '5', nemo_yaml, &l) == 0);
	CHECK_FAILS(path, &s, -EINVAL, "tar member '../x' is an absolute path");
	CHECK(write_nemo_raw(path, "./model_config.yaml", '2', nemo_yaml, &l) == 0);
	CHECK_FAILS(path, &s, -EINVAL,
	            "tar member 'model_config.yaml' is a symbolic link; a .nemo holds regular "
	            "files and directories only");
	CHECK(write_nemo_raw(path, "model_config.yaml", '1', nemo_yaml, &l) == 0);
	CHECK_FAILS(path, &s, -EINVAL, "tar member 'model_config.yaml' is a hard link");
	CHECK(write_nemo_raw(path, "model_config.yaml", '6', nemo_yaml, &l) == 0);
	CHECK_FAILS(path, &s, -EINVAL, "tar member 'model_config.yaml' is a fifo");
	/* names with dots that stay inside are fine */
	CHECK(write_nemo_raw(path, "./..model_config.yaml", '0', nemo_yaml, &l) == 0);
	CHECK_FAILS(path, &s, -ENOENT, "holds no model_config.yaml");
	tensors_free(&l);
}

/* Regular expressions in adapter_config.json run under PCRE2 match limits:
 * a catastrophic one is refused naming its key, not run for seconds per
 * module; the number of keys and entries is capped. */
static void test_peft_regex_limits(void)
{
	struct lp_lora_shape s = tiny_shape(64);
	struct tensors l = {0};
	struct lp_buf cfg;
	char dir[200];

	tiny_tensors(&l, QV_MASK, 8);
	CHECK(write_peft(dir, sizeof(dir), &l,
	                 "{'target_modules': '(([a-z_.0-9])+)+[A-Z]|.*[.][qv]_proj'}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL,
	            "target_modules '(([a-z_.0-9])+)+[A-Z]|.*[.][qv]_proj' is too costly to match "
	            "against '");
	CHECK_FAILS(dir, &s, -EINVAL, "(match limit exceeded): simplify the regular expression");
	CHECK(write_config(dir, "{'rank_pattern': {'q_proj': 8, '(([a-z_.0-9])+)+[A-Z]': 4}}") ==
	      0);
	CHECK_FAILS(dir, &s, -EINVAL,
	            "rank_pattern '(([a-z_.0-9])+)+[A-Z]' is too costly to match against "
	            "'model.layers.0.self_attn.v_proj'");
	CHECK(write_config(dir, "{'alpha_pattern': {'(([a-z_.0-9])+)+[A-Z]': 4}}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "alpha_pattern '(([a-z_.0-9])+)+[A-Z]' is too costly");
	CHECK(write_config(dir, "{'exclude_modules': '(([a-z_.0-9])+)+[A-Z]'}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "exclude_modules '(([a-z_.0-9])+)+[A-Z]' is too costly");
	CHECK(write_config(dir, "{'layers_to_transform': [0, 1], 'layers_pattern': "
	                        "'(([a-z_.0-9])+)+[A-Z]'}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "layers_pattern '(([a-z_.0-9])+)+[A-Z]' is too costly");

	/* 256 keys load; 257 do not */
	lp_buf_init(&cfg, BUF_MAX);
	for (int n = 256; n <= 257; n++) {
		lp_buf_reset(&cfg);
		if (lp_buf_appendf(&cfg, NULL, "{'rank_pattern': {") < 0)
			abort();
		for (int i = 0; i < n; i++)
			if (lp_buf_appendf(&cfg, NULL, "%s'layers.%d.self_attn.q_proj': 8",
			                   i ? ", " : "", i + 2) < 0)
				abort();
		if (lp_buf_appendf(&cfg, NULL, "}}") < 0)
			abort();
		CHECK(write_config(dir, cfg.data) == 0);
		if (n == 256) {
			struct lp_lora *x = NULL;
			CHECK_LOADS(x, dir, &s);
			lp_lora_free(x);
		} else {
			CHECK_FAILS(dir, &s, -EINVAL, "'rank_pattern' has 257 keys, more than 256");
		}
	}
	lp_buf_reset(&cfg);
	if (lp_buf_appendf(&cfg, NULL, "{'target_modules': [") < 0)
		abort();
	for (int i = 0; i < 1025; i++)
		if (lp_buf_appendf(&cfg, NULL, "%s'q_proj'", i ? ", " : "") < 0)
			abort();
	if (lp_buf_appendf(&cfg, NULL, "]}") < 0)
		abort();
	CHECK(write_config(dir, cfg.data) == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "'target_modules' has 1025 entries, more than 1024");
	CHECK(write_config(dir, "{'layers_to_transform': [0], 'layers_pattern': ['a', 'b', 'c', "
	                        "'d', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm', 'n', 'o', 'p', "
	                        "'q']}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "'layers_pattern' has 17 entries, more than 16");
	lp_buf_release(&cfg);
	tensors_free(&l);
}

/* An adapter_config.json over 1 MiB is an invalid adapter (-EINVAL, which
 * the API maps to 422), not -E2BIG (a 500). */
static void test_peft_config_too_large(void)
{
	struct lp_lora_shape s = tiny_shape(64);
	struct tensors l = {0};
	char dir[200];
	size_t n = (1u << 20) + 1;
	char *big = malloc(n);

	CHECK(big != NULL);
	tiny_tensors(&l, QV_MASK, 8);
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	memset(big, ' ', n);
	memcpy(big, base_config, strlen(base_config));
	CHECK(write_file(dir, "adapter_config.json", big, n) == 0);
	CHECK_FAILS(dir, &s, -EINVAL,
	            "adapter_config.json' is larger than the limit of 1048576 bytes");
	/* exactly 1 MiB still loads */
	CHECK(write_file(dir, "adapter_config.json", big, n - 1) == 0);
	{
		struct lp_lora *x = NULL;
		CHECK_LOADS(x, dir, &s);
		lp_lora_free(x);
	}
	free(big);
	tensors_free(&l);
}

/* Finite but absurd weights (1e18 in B, 1e30 in A) are refused naming the
 * layer, the module and the value; so is a huge alpha. */
static void test_reject_absurd_weights(void)
{
	struct lp_lora_shape s = tiny_shape(64);
	struct tensors l = {0};
	struct tensor *t;
	char dir[200];

	tiny_tensors(&l, QV_MASK, 8);
	t = find_tensor(&l, "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight");
	for (size_t i = 0; i < (size_t)(t->rows * t->cols); i++)
		set_f32(t, i, 1e18f);
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_FAILS(dir, &s, -EINVAL,
	            "layer 1 'v_proj': scale * |B| * |A| (Frobenius norms of "
	            "'base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight' and "
	            "'base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight') is ");
	CHECK_FAILS(dir, &s, -EINVAL, "over the limit of 100000: the weights are absurd");
	tensors_free(&l);

	tiny_tensors(&l, QV_MASK, 8);
	set_f32(find_tensor(&l, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
	        5, 1e30f);
	CHECK(write_peft(dir, sizeof(dir), &l, NULL) == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "layer 0 'q_proj': scale * |B| * |A|");
	/* the scale counts: lora_alpha 1e7 on weights that load with 16 */
	tensors_free(&l);
	tiny_tensors(&l, QV_MASK, 8);
	CHECK(write_peft(dir, sizeof(dir), &l, "{'lora_alpha': 1e7}") == 0);
	CHECK_FAILS(dir, &s, -EINVAL, "layer 0 'q_proj': scale * |B| * |A|");
	/* and the same weights with lora_alpha 16 load */
	CHECK(write_config(dir, NULL) == 0);
	{
		struct lp_lora *x = NULL;
		CHECK_LOADS(x, dir, &s);
		lp_lora_free(x);
	}
	tensors_free(&l);
}

/* ---- size ---- */

/* A rank-16 adapter on all seven modules of every SmolLM2 layer (about
 * 20 MB of f32) loads, again and again, into exactly the memory its
 * weights need. How fast it loads is make bench's figure, not a test's:
 * timings flake on a shared machine. */
static void test_load_smollm2_r16(void)
{
	struct lp_lora_shape s = smol_shape(16);
	struct tensors l = {0};
	struct lp_lora *x = NULL;
	char dir[200];
	uint32_t seed = 1;

	add_pairs(&l, &s, 0x7f, 0x3fffffff, 16, "", &seed);
	CHECK(write_peft(dir, sizeof(dir), &l,
	                 "{'r': 16, 'lora_alpha': 32, 'target_modules': ['q_proj', 'k_proj', "
	                 "'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], "
	                 "'base_model_name_or_path': 'HuggingFaceTB/SmolLM2-135M-Instruct'}") == 0);
	tensors_free(&l);
	for (int i = 0; i < 3; i++) {
		CHECK_LOADS(x, dir, &s);
		if (!x)
			return;
		CHECK_EQ_INT(x->data_bytes,
		             30 * 16 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536)) * 4);
		lp_lora_free(x);
		x = NULL;
	}
}

int main(void)
{
	TEST_MAIN_BEGIN("test-lora-formats");
	snprintf(tmp_root, sizeof(tmp_root), "/tmp/lp-lora-test-XXXXXX");
	if (!mkdtemp(tmp_root)) {
		printf("FAIL test-lora-formats:setup: mkdtemp: %s\n", strerror(errno));
		return 1;
	}
	RUN(test_missing_path);
	RUN(test_dir_matching_nothing);
	RUN(test_half_trtllm_dir);
	RUN(test_plain_file_not_nemo);
	RUN(test_peft_without_weights);
	RUN(test_fixtures_all_load);
	RUN(test_fixture_scales);
	RUN(test_converted_variants_match);
	RUN(test_peft_name_variants);
	RUN(test_peft_rslora);
	RUN(test_peft_rank_alpha_patterns);
	RUN(test_peft_target_regex);
	RUN(test_peft_layers_to_transform);
	RUN(test_peft_absent_modules);
	RUN(test_reject_rank_over_max);
	RUN(test_reject_unsupported_module);
	RUN(test_reject_shape_mismatch);
	RUN(test_reject_layer_out_of_range);
	RUN(test_reject_dora);
	RUN(test_reject_bias);
	RUN(test_reject_modules_to_save);
	RUN(test_reject_fan_in_fan_out);
	RUN(test_base_model_names);
	RUN(test_reject_missing_config_keys);
	RUN(test_reject_bad_safetensors);
	RUN(test_reject_missing_half_of_pair);
	RUN(test_reject_non_finite);
	RUN(test_half_weights_stay_half);
	RUN(test_reject_non_float);
	RUN(test_reject_unselected_tensor);
	RUN(test_bin_round_trip);
	RUN(test_bin_shared_storage);
	RUN(test_bin_rejections);
	RUN(test_bin_container_rejections);
	RUN(test_bin_truncated_and_corrupted);
	RUN(test_npy_headers);
	RUN(test_trtllm_f16_and_fused_qkv);
	RUN(test_trtllm_rejections);
	RUN(test_trtllm_four_columns);
	RUN(test_trtllm_truncated);
	RUN(test_nemo_fused_split);
	RUN(test_nemo_rejections);
	RUN(test_nemo_truncated_and_corrupted);
	RUN(test_tar_reader);
	RUN(test_nemo_yaml_depth);
	RUN(test_nemo_yaml_alias_loop);
	RUN(test_nemo_unsafe_members);
	RUN(test_peft_regex_limits);
	RUN(test_peft_config_too_large);
	RUN(test_reject_absurd_weights);
	RUN(test_load_smollm2_r16);
	nftw(tmp_root, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
	TEST_MAIN_END();
}
