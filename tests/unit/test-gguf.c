/* Tests for the GGUF reader: the real default model, small files built here
 * in memory, and many kinds of corrupted file (each must be a clean error). */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/formats/gguf.h"
#include "kernels/dtype.h"
#include "tests/test.h"

static char tmp_dir[64];

static const char *model_path(void)
{
	const char *m = getenv("MODEL");
	return m && *m ? m : "models/smollm2-135m-instruct-q4_1.gguf";
}

/* ---- a tiny GGUF writer ---- */

struct gb {
	unsigned char *d;
	size_t len, cap;
};

static void gb_put(struct gb *b, const void *p, size_t n)
{
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? b->cap : 256;
		while (cap < b->len + n)
			cap *= 2;
		unsigned char *d = realloc(b->d, cap);
		if (!d)
			abort();
		b->d = d;
		b->cap = cap;
	}
	memcpy(b->d + b->len, p, n);
	b->len += n;
}

static void gb_u8(struct gb *b, uint8_t v)
{
	gb_put(b, &v, 1);
}

static void gb_u16(struct gb *b, uint16_t v)
{
	unsigned char x[2] = {(unsigned char)v, (unsigned char)(v >> 8)};
	gb_put(b, x, 2);
}

static void gb_u32(struct gb *b, uint32_t v)
{
	unsigned char x[4];
	for (int i = 0; i < 4; i++)
		x[i] = (unsigned char)(v >> (8 * i));
	gb_put(b, x, 4);
}

static void gb_u64(struct gb *b, uint64_t v)
{
	unsigned char x[8];
	for (int i = 0; i < 8; i++)
		x[i] = (unsigned char)(v >> (8 * i));
	gb_put(b, x, 8);
}

static void gb_f32(struct gb *b, float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	gb_u32(b, u);
}

static void gb_f64(struct gb *b, double f)
{
	uint64_t u;
	memcpy(&u, &f, 8);
	gb_u64(b, u);
}

static void gb_str(struct gb *b, const char *s)
{
	gb_u64(b, strlen(s));
	gb_put(b, s, strlen(s));
}

static void gb_key(struct gb *b, const char *key, uint32_t type)
{
	gb_str(b, key);
	gb_u32(b, type);
}

static void gb_pad(struct gb *b, uint64_t align)
{
	while (b->len % align)
		gb_u8(b, 0);
}

static void patch_u32(struct gb *b, size_t pos, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		b->d[pos + (size_t)i] = (unsigned char)(v >> (8 * i));
}

static void patch_u64(struct gb *b, size_t pos, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		b->d[pos + (size_t)i] = (unsigned char)(v >> (8 * i));
}

struct opts {
	uint32_t alignment; /* written as general.alignment when non-zero */
	int no_tensors;
	uint32_t t0_ndims; /* 0 means the default [4, 3] */
	uint64_t t0_dims[5];
	int t0_ndims_zero; /* write n_dims 0 */
};

/* Byte positions of fields that the corruption tests patch. */
struct marks {
	size_t version, tensor_count, kv_count;
	size_t first_key_len;
	size_t u8_type;       /* value type field of "t.u8" */
	size_t i8_key;        /* first byte of the key text "t.i8" */
	size_t arr_elem_type; /* element type of "t.arr_i32" */
	size_t arr_len;       /* length of "t.arr_i32" */
	size_t str_len;       /* length of the string value of "t.str" */
	size_t align_value;
	size_t t0_ndims, t0_dim0, t0_type, t0_offset;
	size_t t1_name, t1_dim0, t1_type, t1_offset;
	uint64_t t1_offset_value;
	size_t data_start;
};

#define N_KVS_NO_ALIGN 19

/* Builds a valid file: 19 (20 with general.alignment) kvs covering every
 * value type, then two tensors:
 *   tok.weight  F32  dims [4, 3]  values i * 0.5
 *   out.weight  Q8_0 dims [32, 2] two blocks, d = 0.5, q = j - 16
 * The file ends exactly at the end of the second tensor's data. */
static void build(struct gb *b, struct marks *m, const struct opts *o)
{
	uint64_t align = o->alignment ? o->alignment : 32;
	uint32_t n_kv = N_KVS_NO_ALIGN + (o->alignment ? 1 : 0);
	uint64_t t1_off = (48 + align - 1) / align * align;

	memset(b, 0, sizeof(*b));
	memset(m, 0, sizeof(*m));
	gb_put(b, "GGUF", 4);
	m->version = b->len;
	gb_u32(b, 3);
	m->tensor_count = b->len;
	gb_u64(b, o->no_tensors ? 0 : 2);
	m->kv_count = b->len;
	gb_u64(b, n_kv);

	m->first_key_len = b->len;
	gb_key(b, "general.architecture", LP_GGUF_STRING);
	gb_str(b, "test");
	gb_str(b, "t.u8");
	m->u8_type = b->len;
	gb_u32(b, LP_GGUF_U8);
	gb_u8(b, 200);
	m->i8_key = b->len + 8;
	gb_key(b, "t.i8", LP_GGUF_I8);
	gb_u8(b, (uint8_t)-5);
	gb_key(b, "t.u16", LP_GGUF_U16);
	gb_u16(b, 60000);
	gb_key(b, "t.i16", LP_GGUF_I16);
	gb_u16(b, (uint16_t)-30000);
	gb_key(b, "t.u32", LP_GGUF_U32);
	gb_u32(b, 4000000000u);
	gb_key(b, "t.i32", LP_GGUF_I32);
	gb_u32(b, (uint32_t)-123456);
	gb_key(b, "t.f32", LP_GGUF_F32);
	gb_f32(b, 1.5f);
	gb_key(b, "t.bool", LP_GGUF_BOOL);
	gb_u8(b, 1);
	gb_key(b, "t.str", LP_GGUF_STRING);
	m->str_len = b->len;
	gb_str(b, "hello");
	gb_key(b, "t.u64", LP_GGUF_U64);
	gb_u64(b, 1ull << 40);
	gb_key(b, "t.i64", LP_GGUF_I64);
	gb_u64(b, (uint64_t) - (1ll << 40));
	gb_key(b, "t.i64small", LP_GGUF_I64);
	gb_u64(b, 77);
	gb_key(b, "t.f64", LP_GGUF_F64);
	gb_f64(b, 2.25);
	gb_key(b, "t.arr_i32", LP_GGUF_ARRAY);
	m->arr_elem_type = b->len;
	gb_u32(b, LP_GGUF_I32);
	m->arr_len = b->len;
	gb_u64(b, 3);
	gb_u32(b, 1);
	gb_u32(b, (uint32_t)-2);
	gb_u32(b, 3);
	gb_key(b, "t.arr_f32", LP_GGUF_ARRAY);
	gb_u32(b, LP_GGUF_F32);
	gb_u64(b, 2);
	gb_f32(b, 0.5f);
	gb_f32(b, -1.25f);
	gb_key(b, "t.arr_str", LP_GGUF_ARRAY);
	gb_u32(b, LP_GGUF_STRING);
	gb_u64(b, 3);
	gb_str(b, "a");
	gb_str(b, "bc");
	gb_str(b, "");
	gb_key(b, "t.arr_empty", LP_GGUF_ARRAY);
	gb_u32(b, LP_GGUF_U8);
	gb_u64(b, 0);
	gb_key(b, "t.bool_false", LP_GGUF_BOOL);
	gb_u8(b, 0);
	if (o->alignment) {
		gb_key(b, "general.alignment", LP_GGUF_U32);
		m->align_value = b->len;
		gb_u32(b, o->alignment);
	}

	if (o->no_tensors)
		return;
	gb_str(b, "tok.weight");
	m->t0_ndims = b->len;
	if (o->t0_ndims_zero) {
		gb_u32(b, 0);
	} else if (o->t0_ndims) {
		gb_u32(b, o->t0_ndims);
		for (uint32_t d = 0; d < o->t0_ndims; d++)
			gb_u64(b, o->t0_dims[d]);
	} else {
		gb_u32(b, 2);
		m->t0_dim0 = b->len;
		gb_u64(b, 4);
		gb_u64(b, 3);
	}
	m->t0_type = b->len;
	gb_u32(b, LP_GGML_F32);
	m->t0_offset = b->len;
	gb_u64(b, 0);
	m->t1_name = b->len + 8;
	gb_str(b, "out.weight");
	gb_u32(b, 2);
	m->t1_dim0 = b->len;
	gb_u64(b, 32);
	gb_u64(b, 2);
	m->t1_type = b->len;
	gb_u32(b, LP_GGML_Q8_0);
	m->t1_offset = b->len;
	m->t1_offset_value = t1_off;
	gb_u64(b, t1_off);
	gb_pad(b, align);

	m->data_start = b->len;
	for (int i = 0; i < 12; i++)
		gb_f32(b, (float)i * 0.5f);
	while (b->len < m->data_start + t1_off)
		gb_u8(b, 0xee);
	for (int blk = 0; blk < 2; blk++) {
		gb_u16(b, lp_f32_to_f16(0.5f));
		for (int j = 0; j < 32; j++)
			gb_u8(b, (uint8_t)(int8_t)(j - 16 + blk));
	}
}

static void gb_free(struct gb *b)
{
	free(b->d);
	memset(b, 0, sizeof(*b));
}

/* Writes len bytes to tmp_dir/name; the path goes to path. */
static int write_file(char *path, size_t pathsz, const char *name, const void *d, size_t len)
{
	FILE *f;

	snprintf(path, pathsz, "%s/%s", tmp_dir, name);
	f = fopen(path, "wb");
	if (!f)
		return -1;
	if (len && fwrite(d, 1, len, f) != len) {
		fclose(f);
		return -1;
	}
	return fclose(f) == 0 ? 0 : -1;
}

/* Opens bytes written to a file; returns lp_gguf_open's result (freeing any
 * handle) and leaves the message in err. */
static int open_bytes(const void *d, size_t len, struct lp_err *err, char *path, size_t pathsz)
{
	struct lp_gguf *g = (struct lp_gguf *)1;
	int rc;

	lp_err_clear(err);
	if (write_file(path, pathsz, "case.gguf", d, len) != 0)
		return -999;
	rc = lp_gguf_open(&g, path, err);
	if (rc == 0)
		lp_gguf_free(g);
	else if (g != NULL)
		return -998; /* *out must be NULL on failure */
	return rc;
}

/* The file must fail to open with a message naming it and containing want. */
#define CHECK_FAILS(b, want)                                                                       \
	do {                                                                                       \
		struct lp_err e_;                                                                  \
		char p_[256], q_[300];                                                             \
		int r_ = open_bytes((b)->d, (b)->len, &e_, p_, sizeof(p_));                        \
		CHECK_MSG(r_<0 && r_> - 998, "open returned %d (%s)", r_, e_.msg);                 \
		CHECK_EQ_INT(e_.code, r_);                                                         \
		snprintf(q_, sizeof(q_), "'%s'", p_);                                              \
		CHECK_MSG(strstr(e_.msg, q_) != NULL, "message does not name the file: %s",        \
		          e_.msg);                                                                 \
		CHECK_MSG(strstr(e_.msg, (want)) != NULL, "message '%s' lacks '%s'", e_.msg,       \
		          (want));                                                                 \
	} while (0)

static bool str_is(struct lp_gguf_str s, const char *want)
{
	return s.len == strlen(want) && memcmp(s.s, want, s.len) == 0;
}

/* ---- the real model ---- */

static void test_model_header(void)
{
	struct lp_gguf *g;
	struct lp_err err;

	CHECK_OK(lp_gguf_open(&g, model_path(), &err), &err);
	CHECK_EQ_INT(lp_gguf_version(g), 3);
	CHECK_EQ_INT(lp_gguf_tensor_count(g), 272);
	CHECK_EQ_INT(lp_gguf_kv_count(g), 33);
	CHECK_EQ_STR(lp_gguf_path(g), model_path());
	CHECK(str_is(lp_gguf_kv_at(g, 0)->key, "general.architecture"));
	CHECK(lp_gguf_kv_at(g, 33) == NULL);
	CHECK(lp_gguf_tensor_at(g, 272) == NULL);
	lp_gguf_free(g);
}

static void test_model_metadata(void)
{
	struct lp_gguf *g;
	struct lp_err err;
	struct lp_gguf_str s;
	const struct lp_gguf_kv *kv;
	uint32_t u;
	float f;
	bool b;

	CHECK_OK(lp_gguf_open(&g, model_path(), &err), &err);
	CHECK_OK(lp_gguf_get_str(g, "general.architecture", &s, &err), &err);
	CHECK(str_is(s, "llama"));
	CHECK_OK(lp_gguf_get_u32(g, "llama.block_count", &u, &err), &err);
	CHECK_EQ_INT(u, 30);
	CHECK_OK(lp_gguf_get_u32(g, "llama.embedding_length", &u, &err), &err);
	CHECK_EQ_INT(u, 576);
	CHECK_OK(lp_gguf_get_u32(g, "llama.attention.head_count_kv", &u, &err), &err);
	CHECK_EQ_INT(u, 3);
	CHECK_OK(lp_gguf_get_f32(g, "llama.rope.freq_base", &f, &err), &err);
	CHECK_NEAR(f, 100000.0, 0.0);
	CHECK_OK(lp_gguf_get_f32(g, "llama.attention.layer_norm_rms_epsilon", &f, &err), &err);
	CHECK_NEAR(f, 1e-5, 1e-9);
	/* an integer converts to f32 */
	CHECK_OK(lp_gguf_get_f32(g, "llama.block_count", &f, &err), &err);
	CHECK_NEAR(f, 30.0, 0.0);
	CHECK_OK(lp_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &b, &err), &err);
	CHECK(!b);
	CHECK_OK(lp_gguf_get_str(g, "tokenizer.ggml.pre", &s, &err), &err);
	CHECK(str_is(s, "smollm"));

	CHECK_OK(lp_gguf_get_arr(g, "tokenizer.ggml.tokens", LP_GGUF_STRING, &kv, &err), &err);
	CHECK_EQ_INT(kv->arr_len, 49152);
	CHECK(str_is(kv->arr_strs[0], "<|endoftext|>"));
	CHECK(str_is(kv->arr_strs[1], "<|im_start|>"));
	CHECK(str_is(kv->arr_strs[2], "<|im_end|>"));
	CHECK_OK(lp_gguf_get_arr(g, "tokenizer.ggml.token_type", LP_GGUF_I32, &kv, &err), &err);
	CHECK_EQ_INT(kv->arr_len, 49152);
	CHECK_EQ_INT(lp_gguf_arr_i32(kv, 0), 3);
	CHECK_OK(lp_gguf_get_arr(g, "tokenizer.ggml.merges", LP_GGUF_STRING, &kv, &err), &err);
	CHECK_EQ_INT(kv->arr_len, 48900);
	CHECK(str_is(kv->arr_strs[2], "i n"));
	CHECK_OK(lp_gguf_get_str(g, "tokenizer.chat_template", &s, &err), &err);
	CHECK(s.len > 100);

	/* conversions that do not work */
	CHECK_EQ_INT(lp_gguf_get_u32(g, "general.architecture", &u, &err), -EINVAL);
	CHECK(strstr(err.msg, "'general.architecture'") != NULL);
	CHECK(strstr(err.msg, "string") != NULL);
	CHECK_EQ_INT(lp_gguf_get_u32(g, "llama.rope.freq_base", &u, &err), -EINVAL);
	CHECK_EQ_INT(lp_gguf_get_bool(g, "llama.block_count", &b, &err), -EINVAL);
	CHECK_EQ_INT(lp_gguf_get_str(g, "llama.block_count", &s, &err), -EINVAL);
	CHECK_EQ_INT(lp_gguf_get_f32(g, "tokenizer.ggml.tokens", &f, &err), -EINVAL);
	CHECK_EQ_INT(lp_gguf_get_arr(g, "tokenizer.ggml.tokens", LP_GGUF_I32, &kv, &err), -EINVAL);
	CHECK(strstr(err.msg, "array of string") != NULL);
	CHECK_EQ_INT(lp_gguf_get_arr(g, "llama.block_count", LP_GGUF_I32, &kv, &err), -EINVAL);
	CHECK_EQ_INT(lp_gguf_get_u32(g, "llama.no_such_key", &u, &err), -ENOENT);
	CHECK(strstr(err.msg, "'llama.no_such_key' not found") != NULL);
	CHECK(lp_gguf_find(g, "llama.no_such_key") == NULL);
	CHECK(lp_gguf_find(g, "llama.block_coun") == NULL);
	lp_gguf_free(g);
}

static void test_model_tensors(void)
{
	struct lp_gguf *g;
	struct lp_err err;
	const struct lp_fmt_tensor *emb, *q, *norm, *t;
	const unsigned char *lo = NULL, *hi = NULL;

	CHECK_OK(lp_gguf_open(&g, model_path(), &err), &err);
	emb = lp_gguf_find_tensor(g, "token_embd.weight");
	CHECK(emb != NULL);
	CHECK_EQ_INT(emb->type, LP_FMT_Q8_0);
	CHECK_EQ_INT(emb->n_dims, 2);
	CHECK_EQ_INT(emb->shape[0], 49152); /* row-major: the file's dims reversed */
	CHECK_EQ_INT(emb->shape[1], 576);
	CHECK_EQ_STR(emb->name, "token_embd.weight");
	CHECK_EQ_STR(emb->file, model_path());
	CHECK_EQ_INT(emb->nbytes, 576ull * 49152 / 32 * 34);
	q = lp_gguf_find_tensor(g, "blk.0.attn_q.weight");
	CHECK(q != NULL);
	CHECK_EQ_INT(q->type, LP_FMT_Q4_1);
	CHECK_EQ_INT(q->n_dims, 2);
	CHECK_EQ_INT(q->shape[0], 576);
	CHECK_EQ_INT(q->shape[1], 576);
	CHECK_EQ_INT(q->nbytes, 576ull * 576 / 32 * 20);
	norm = lp_gguf_find_tensor(g, "blk.0.attn_norm.weight");
	CHECK(norm != NULL);
	CHECK_EQ_INT(norm->type, LP_FMT_F32);
	CHECK_EQ_INT(norm->n_dims, 1);
	CHECK_EQ_INT(norm->shape[0], 576);
	CHECK_EQ_INT(norm->shape[1], 0);
	/* the embedding is first in the data section, the norm right after */
	CHECK((const unsigned char *)norm->data - (const unsigned char *)emb->data ==
	      (ptrdiff_t)emb->nbytes);
	CHECK(lp_gguf_find_tensor(g, "blk.29.ffn_down.weight") != NULL);
	CHECK(lp_gguf_find_tensor(g, "output_norm.weight") != NULL);
	CHECK(lp_gguf_find_tensor(g, "output.weight") == NULL); /* tied embeddings */
	CHECK(lp_gguf_find_tensor(g, "blk.30.ffn_down.weight") == NULL);

	/* every tensor's data lies in one 32-aligned span ending at the file end */
	for (size_t i = 0; i < lp_gguf_tensor_count(g); i++) {
		t = lp_gguf_tensor_at(g, i);
		CHECK(t->nbytes > 0);
		CHECK(((const unsigned char *)t->data - (const unsigned char *)emb->data) % 32 ==
		      0);
		if (!lo || (const unsigned char *)t->data < lo)
			lo = t->data;
		if (!hi || (const unsigned char *)t->data + t->nbytes > hi)
			hi = (const unsigned char *)t->data + t->nbytes;
		CHECK(lp_gguf_find_tensor(g, "blk.0.attn_q.weight") == q);
	}
	CHECK(lo == emb->data);
	{
		struct stat st;
		CHECK(stat(model_path(), &st) == 0);
		CHECK(hi - lo <= (ptrdiff_t)st.st_size);
	}
	/* the first norm weights are ordinary numbers */
	{
		float w;
		memcpy(&w, norm->data, sizeof(w));
		CHECK(w > -100.0f && w < 100.0f && w != 0.0f);
	}
	lp_gguf_free(g);
}

/* ---- small files built here ---- */

static void check_small(struct lp_gguf *g, uint64_t align)
{
	const struct lp_gguf_kv *kv;
	const struct lp_fmt_tensor *t0, *t1;
	struct lp_err err;
	struct lp_gguf_str s;
	uint32_t u;
	float f;
	bool b;

	(void)align;
	CHECK_OK(lp_gguf_get_str(g, "general.architecture", &s, &err), &err);
	CHECK(str_is(s, "test"));
	kv = lp_gguf_find(g, "t.u8");
	CHECK(kv && kv->type == LP_GGUF_U8 && kv->v.u == 200);
	kv = lp_gguf_find(g, "t.i8");
	CHECK(kv && kv->type == LP_GGUF_I8 && kv->v.i == -5);
	kv = lp_gguf_find(g, "t.u16");
	CHECK(kv && kv->type == LP_GGUF_U16 && kv->v.u == 60000);
	kv = lp_gguf_find(g, "t.i16");
	CHECK(kv && kv->type == LP_GGUF_I16 && kv->v.i == -30000);
	kv = lp_gguf_find(g, "t.u32");
	CHECK(kv && kv->type == LP_GGUF_U32 && kv->v.u == 4000000000u);
	kv = lp_gguf_find(g, "t.i32");
	CHECK(kv && kv->type == LP_GGUF_I32 && kv->v.i == -123456);
	kv = lp_gguf_find(g, "t.f32");
	CHECK(kv && kv->type == LP_GGUF_F32 && kv->v.f == 1.5);
	kv = lp_gguf_find(g, "t.bool");
	CHECK(kv && kv->type == LP_GGUF_BOOL && kv->v.u == 1);
	kv = lp_gguf_find(g, "t.u64");
	CHECK(kv && kv->type == LP_GGUF_U64 && kv->v.u == 1ull << 40);
	kv = lp_gguf_find(g, "t.i64");
	CHECK(kv && kv->type == LP_GGUF_I64 && kv->v.i == -(1ll << 40));
	kv = lp_gguf_find(g, "t.f64");
	CHECK(kv && kv->type == LP_GGUF_F64 && kv->v.f == 2.25);
	kv = lp_gguf_find(g, "t.str");
	CHECK(kv && kv->type == LP_GGUF_STRING && str_is(kv->str, "hello"));

	CHECK_OK(lp_gguf_get_arr(g, "t.arr_i32", LP_GGUF_I32, &kv, &err), &err);
	CHECK_EQ_INT(kv->arr_len, 3);
	CHECK_EQ_INT(lp_gguf_arr_i32(kv, 0), 1);
	CHECK_EQ_INT(lp_gguf_arr_i32(kv, 1), -2);
	CHECK_EQ_INT(lp_gguf_arr_i32(kv, 2), 3);
	CHECK_NEAR(lp_gguf_arr_f32(kv, 1), -2.0, 0.0);
	CHECK_OK(lp_gguf_get_arr(g, "t.arr_f32", LP_GGUF_F32, &kv, &err), &err);
	CHECK_EQ_INT(kv->arr_len, 2);
	CHECK_NEAR(lp_gguf_arr_f32(kv, 0), 0.5, 0.0);
	CHECK_NEAR(lp_gguf_arr_f32(kv, 1), -1.25, 0.0);
	CHECK_OK(lp_gguf_get_arr(g, "t.arr_str", LP_GGUF_STRING, &kv, &err), &err);
	CHECK_EQ_INT(kv->arr_len, 3);
	CHECK(str_is(kv->arr_strs[0], "a"));
	CHECK(str_is(kv->arr_strs[1], "bc"));
	CHECK(str_is(kv->arr_strs[2], ""));
	CHECK_OK(lp_gguf_get_arr(g, "t.arr_empty", LP_GGUF_U8, &kv, &err), &err);
	CHECK_EQ_INT(kv->arr_len, 0);

	/* typed getters: conversions in range work, others are -EINVAL */
	CHECK_OK(lp_gguf_get_u32(g, "t.u8", &u, &err), &err);
	CHECK_EQ_INT(u, 200);
	CHECK_OK(lp_gguf_get_u32(g, "t.u16", &u, &err), &err);
	CHECK_EQ_INT(u, 60000);
	CHECK_OK(lp_gguf_get_u32(g, "t.u32", &u, &err), &err);
	CHECK_EQ_INT(u, 4000000000u);
	CHECK_OK(lp_gguf_get_u32(g, "t.i64small", &u, &err), &err);
	CHECK_EQ_INT(u, 77);
	CHECK_EQ_INT(lp_gguf_get_u32(g, "t.i8", &u, &err), -EINVAL);
	CHECK(strstr(err.msg, "-5 is out of range") != NULL);
	CHECK_EQ_INT(lp_gguf_get_u32(g, "t.u64", &u, &err), -EINVAL);
	CHECK(strstr(err.msg, "1099511627776 is out of range") != NULL);
	CHECK_EQ_INT(lp_gguf_get_u32(g, "t.i64", &u, &err), -EINVAL);
	CHECK_EQ_INT(lp_gguf_get_u32(g, "t.f32", &u, &err), -EINVAL);
	CHECK_EQ_INT(lp_gguf_get_u32(g, "t.bool", &u, &err), -EINVAL);
	CHECK_OK(lp_gguf_get_f32(g, "t.i16", &f, &err), &err);
	CHECK_NEAR(f, -30000.0, 0.0);
	CHECK_OK(lp_gguf_get_f32(g, "t.f64", &f, &err), &err);
	CHECK_NEAR(f, 2.25, 0.0);
	CHECK_OK(lp_gguf_get_f32(g, "t.u64", &f, &err), &err);
	CHECK_NEAR(f, 1099511627776.0, 0.0);
	CHECK_EQ_INT(lp_gguf_get_f32(g, "t.str", &f, &err), -EINVAL);
	CHECK_EQ_INT(lp_gguf_get_f32(g, "t.bool", &f, &err), -EINVAL);
	CHECK_OK(lp_gguf_get_bool(g, "t.bool", &b, &err), &err);
	CHECK(b);
	CHECK_OK(lp_gguf_get_bool(g, "t.bool_false", &b, &err), &err);
	CHECK(!b);
	CHECK_EQ_INT(lp_gguf_get_bool(g, "t.u8", &b, &err), -EINVAL);
	CHECK_EQ_INT(lp_gguf_get_str(g, "t.arr_str", &s, &err), -EINVAL);
	CHECK_EQ_INT(lp_gguf_get_arr(g, "t.arr_f32", LP_GGUF_I32, &kv, &err), -EINVAL);
	CHECK_EQ_INT(lp_gguf_get_str(g, "t.missing", &s, &err), -ENOENT);
	CHECK_EQ_INT(lp_gguf_get_bool(g, "t.missing", &b, &err), -ENOENT);
	CHECK_EQ_INT(lp_gguf_get_arr(g, "t.missing", LP_GGUF_U8, &kv, &err), -ENOENT);

	CHECK_EQ_INT(lp_gguf_tensor_count(g), 2);
	t0 = lp_gguf_find_tensor(g, "tok.weight");
	t1 = lp_gguf_find_tensor(g, "out.weight");
	CHECK(t0 && t1 && t0 == lp_gguf_tensor_at(g, 0) && t1 == lp_gguf_tensor_at(g, 1));
	CHECK_EQ_INT(t0->type, LP_FMT_F32);
	CHECK_EQ_INT(t0->n_dims, 2);
	CHECK_EQ_INT(t0->shape[0], 3); /* the file's dims [4, 3], dims[0] fastest */
	CHECK_EQ_INT(t0->shape[1], 4);
	CHECK_EQ_INT(t0->shape[2], 0);
	CHECK_EQ_STR(t0->name, "tok.weight");
	CHECK_EQ_INT(t0->nbytes, 48);
	for (int i = 0; i < 12; i++) {
		float w;
		memcpy(&w, (const char *)t0->data + 4 * i, 4);
		CHECK_NEAR(w, i * 0.5, 0.0);
	}
	CHECK_EQ_INT(t1->type, LP_FMT_Q8_0);
	CHECK_EQ_INT(t1->nbytes, 68);
	{
		float row[64];
		lp_dequantize_row(LP_DTYPE_Q8_0, t1->data, row, 64);
		CHECK_NEAR(row[0], -8.0, 0.0);
		CHECK_NEAR(row[31], 7.5, 0.0);
		CHECK_NEAR(row[32], -7.5, 0.0);
		CHECK_NEAR(row[63], 8.0, 0.0);
	}
}

static void test_small_file(void)
{
	struct gb b;
	struct marks m;
	struct opts o = {.alignment = 32};
	struct lp_gguf *g;
	struct lp_err err;
	char path[256];

	build(&b, &m, &o);
	CHECK(write_file(path, sizeof(path), "small.gguf", b.d, b.len) == 0);
	gb_free(&b);
	CHECK_OK(lp_gguf_open(&g, path, &err), &err);
	CHECK_EQ_INT(lp_gguf_kv_count(g), N_KVS_NO_ALIGN + 1);
	check_small(g, 32);
	lp_gguf_free(g);
}

static void test_small_default_and_wide_alignment(void)
{
	static const uint32_t aligns[] = {0, 1, 64, 4096};
	struct gb b;
	struct marks m;
	struct lp_gguf *g;
	struct lp_err err;
	char path[256];

	for (size_t i = 0; i < sizeof(aligns) / sizeof(aligns[0]); i++) {
		struct opts o = {.alignment = aligns[i]};
		const struct lp_fmt_tensor *t1;
		build(&b, &m, &o);
		CHECK(write_file(path, sizeof(path), "align.gguf", b.d, b.len) == 0);
		gb_free(&b);
		CHECK_OK(lp_gguf_open(&g, path, &err), &err);
		CHECK_EQ_INT(lp_gguf_kv_count(g), N_KVS_NO_ALIGN + (aligns[i] ? 1 : 0));
		check_small(g, aligns[i] ? aligns[i] : 32);
		t1 = lp_gguf_tensor_at(g, 1);
		CHECK((const char *)t1->data - (const char *)lp_gguf_tensor_at(g, 0)->data ==
		      (ptrdiff_t)m.t1_offset_value);
		lp_gguf_free(g);
		if (test_current_failed)
			return;
	}
}

static void test_version_2_and_no_tensors(void)
{
	struct gb b;
	struct marks m;
	struct opts o = {0};
	struct lp_gguf *g;
	struct lp_err err;
	char path[256];

	build(&b, &m, &o);
	patch_u32(&b, m.version, 2);
	CHECK(write_file(path, sizeof(path), "v2.gguf", b.d, b.len) == 0);
	gb_free(&b);
	CHECK_OK(lp_gguf_open(&g, path, &err), &err);
	CHECK_EQ_INT(lp_gguf_version(g), 2);
	CHECK_EQ_INT(lp_gguf_tensor_count(g), 2);
	lp_gguf_free(g);

	o.no_tensors = 1;
	build(&b, &m, &o);
	CHECK(write_file(path, sizeof(path), "empty.gguf", b.d, b.len) == 0);
	gb_free(&b);
	CHECK_OK(lp_gguf_open(&g, path, &err), &err);
	CHECK_EQ_INT(lp_gguf_tensor_count(g), 0);
	CHECK(lp_gguf_find_tensor(g, "tok.weight") == NULL);
	CHECK(lp_gguf_tensor_at(g, 0) == NULL);
	lp_gguf_free(g);
}

/* ---- corruption: each must be a clean error ---- */

static void test_truncated_every_prefix(void)
{
	struct gb b;
	struct marks m;
	struct opts o = {.alignment = 32};
	struct lp_err err;
	char path[256];
	size_t full;

	build(&b, &m, &o);
	full = b.len;
	for (size_t n = 0; n < full; n++) {
		int rc = open_bytes(b.d, n, &err, path, sizeof(path));
		CHECK_MSG(rc < 0 && rc > -998, "prefix of %zu of %zu bytes: rc %d", n, full, rc);
		CHECK_MSG(err.msg[0] != '\0' && strstr(err.msg, path) != NULL,
		          "prefix of %zu bytes: message '%s'", n, err.msg);
	}
	CHECK_EQ_INT(open_bytes(b.d, full, &err, path, sizeof(path)), 0);
	/* a cut in the tensor infos says what it was reading */
	CHECK(open_bytes(b.d, m.t1_offset + 4, &err, path, sizeof(path)) < 0);
	CHECK_MSG(strstr(err.msg, "tensor 'out.weight': file ends at byte") &&
	              strstr(err.msg, "while reading the data offset"),
	          "%s", err.msg);
	gb_free(&b);
}

static void test_bad_magic(void)
{
	struct gb b;
	struct marks m;
	struct opts o = {0};

	build(&b, &m, &o);
	memcpy(b.d, "GGML", 4);
	CHECK_FAILS(&b, "not a gguf file");
	gb_free(&b);
}

static void test_bad_versions(void)
{
	static const uint32_t bad[] = {0, 1, 4, 99, 0xffffffffu};
	struct gb b;
	struct marks m;
	struct opts o = {0};

	build(&b, &m, &o);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		patch_u32(&b, m.version, bad[i]);
		CHECK_FAILS(&b, "unsupported gguf version");
	}
	gb_free(&b);
}

static void test_huge_counts(void)
{
	struct gb b;
	struct marks m;
	struct opts o = {0};

	build(&b, &m, &o);
	patch_u64(&b, m.tensor_count, 1ull << 62);
	CHECK_FAILS(&b, "tensor count 4611686018427387904 is more than the file can hold");
	patch_u64(&b, m.tensor_count, 3); /* plausible: the third info is read from padding */
	CHECK_FAILS(&b, "tensor '': 0 dimensions");
	patch_u64(&b, m.tensor_count, 2);
	patch_u64(&b, m.kv_count, UINT64_MAX);
	CHECK_FAILS(&b, "metadata count 18446744073709551615 is more than the file can hold");
	gb_free(&b);
}

static void test_huge_string_length(void)
{
	struct gb b;
	struct marks m;
	struct opts o = {0};

	build(&b, &m, &o);
	patch_u64(&b, m.first_key_len, 1ull << 60);
	CHECK_FAILS(&b, "has length 1152921504606846976");
	patch_u64(&b, m.first_key_len, UINT64_MAX);
	CHECK_FAILS(&b, "metadata entry 0");
	gb_free(&b);
	build(&b, &m, &o);
	patch_u64(&b, m.str_len, UINT64_MAX - 3);
	CHECK_FAILS(&b, "'t.str'");
	gb_free(&b);
}

static void test_huge_array_length(void)
{
	struct gb b;
	struct marks m;
	struct opts o = {0};

	build(&b, &m, &o);
	patch_u64(&b, m.arr_len, 1ull << 61);
	CHECK_FAILS(&b, "array of 2305843009213693952 i32 elements does not fit");
	patch_u64(&b, m.arr_len, UINT64_MAX);
	CHECK_FAILS(&b, "does not fit");
	gb_free(&b);
}

static void test_unknown_and_nested_types(void)
{
	struct gb b;
	struct marks m;
	struct opts o = {0};

	build(&b, &m, &o);
	patch_u32(&b, m.u8_type, 13);
	CHECK_FAILS(&b, "('t.u8'): unknown value type 13");
	patch_u32(&b, m.u8_type, 0x80000000u);
	CHECK_FAILS(&b, "unknown value type");
	patch_u32(&b, m.u8_type, LP_GGUF_U8);
	patch_u32(&b, m.arr_elem_type, LP_GGUF_ARRAY);
	CHECK_FAILS(&b, "('t.arr_i32'): nested arrays are not supported");
	patch_u32(&b, m.arr_elem_type, 77);
	CHECK_FAILS(&b, "unknown array element type 77");
	gb_free(&b);
}

static void test_unknown_tensor_type(void)
{
	static const uint32_t bad[] = {4, 5, 16, 29, 31, 1000};
	struct gb b;
	struct marks m;
	struct opts o = {0};

	build(&b, &m, &o);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		patch_u32(&b, m.t0_type, bad[i]);
		CHECK_FAILS(&b, "tensor 'tok.weight': unknown ggml type");
	}
	gb_free(&b);
}

static void test_bad_dims(void)
{
	struct gb b;
	struct marks m;
	struct opts o = {.t0_ndims_zero = 1};

	build(&b, &m, &o);
	CHECK_FAILS(&b, "tensor 'tok.weight': 0 dimensions (must be 1 to 4)");
	gb_free(&b);

	o = (struct opts){.t0_ndims = 5, .t0_dims = {4, 3, 1, 1, 1}};
	build(&b, &m, &o);
	CHECK_FAILS(&b, "5 dimensions");
	gb_free(&b);

	o = (struct opts){0};
	build(&b, &m, &o);
	patch_u64(&b, m.t0_dim0, 0);
	CHECK_FAILS(&b, "dimension 0 is 0");
	gb_free(&b);

	/* 32 * 2^21 * 2^21 * 2^21 elements overflows 64 bits */
	o = (struct opts){.t0_ndims = 4, .t0_dims = {32, 1u << 21, 1u << 21, 1u << 21}};
	build(&b, &m, &o);
	CHECK_FAILS(&b, "element count overflows");
	gb_free(&b);

	/* fits in 64 bits as elements, but the byte size is past any file */
	o = (struct opts){.t0_ndims = 4, .t0_dims = {4, 1u << 20, 1u << 20, 1u << 10}};
	build(&b, &m, &o);
	CHECK_FAILS(&b, "runs past the end of the file");
	gb_free(&b);
}

static void test_dims_not_multiple_of_block(void)
{
	struct gb b;
	struct marks m;
	struct opts o = {0};

	build(&b, &m, &o);
	patch_u64(&b, m.t1_dim0, 33);
	CHECK_FAILS(&b, "tensor 'out.weight': first dimension 33 is not a multiple of the Q8_0 "
	                "block size 32");
	gb_free(&b);
	build(&b, &m, &o);
	patch_u32(&b, m.t0_type, LP_GGML_Q4_K); /* dims[0] 4 */
	CHECK_FAILS(&b, "not a multiple of the Q4_K block size 256");
	gb_free(&b);
}

/* The block formats issue 13 added to the engine (Q5_0, Q5_1, Q4_K, Q5_K,
 * Q6_K): out.weight retyped as each, two rows of two blocks, reports its type
 * and exact size; one byte less of data, or a row that is not whole blocks,
 * is refused. */
static void test_block_types(void)
{
	static const struct {
		uint32_t code;
		enum lp_fmt_type type;
		const char *name;
		uint64_t block, bytes;
	} k[] = {
	    {LP_GGML_Q5_0, LP_FMT_Q5_0, "Q5_0", 32, 22},
	    {LP_GGML_Q5_1, LP_FMT_Q5_1, "Q5_1", 32, 24},
	    {LP_GGML_Q4_K, LP_FMT_Q4_K, "Q4_K", 256, 144},
	    {LP_GGML_Q5_K, LP_FMT_Q5_K, "Q5_K", 256, 176},
	    {LP_GGML_Q6_K, LP_FMT_Q6_K, "Q6_K", 256, 210},
	};

	for (size_t i = 0; i < sizeof(k) / sizeof(k[0]); i++) {
		struct gb b;
		struct marks m;
		struct opts o = {0};
		struct lp_gguf *g;
		struct lp_err err;
		const struct lp_fmt_tensor *t;
		char path[256], want[128];
		size_t end;

		build(&b, &m, &o);
		patch_u32(&b, m.t1_type, k[i].code);
		patch_u64(&b, m.t1_dim0, 2 * k[i].block);
		end = m.data_start + (size_t)m.t1_offset_value + 4 * (size_t)k[i].bytes;
		while (b.len < end - 1)
			gb_u8(&b, 0x5a);
		b.len = end - 1;
		CHECK_FAILS(&b, "runs past the end of the file");
		gb_u8(&b, 0x5a);
		CHECK(write_file(path, sizeof(path), "case.gguf", b.d, b.len) == 0);
		CHECK_OK(lp_gguf_open(&g, path, &err), &err);
		t = lp_gguf_find_tensor(g, "out.weight");
		CHECK(t != NULL);
		CHECK_EQ_INT(t->type, k[i].type);
		CHECK_EQ_STR(lp_fmt_type_name(t->type), k[i].name);
		CHECK_EQ_INT(t->shape[0], 2);
		CHECK_EQ_INT(t->shape[1], 2 * k[i].block);
		CHECK_EQ_INT(t->nbytes, 4 * k[i].bytes);
		lp_gguf_free(g);
		patch_u64(&b, m.t1_dim0, k[i].block + 16);
		snprintf(want, sizeof(want),
		         "first dimension %llu is not a multiple of the %s block size %llu",
		         (unsigned long long)k[i].block + 16, k[i].name,
		         (unsigned long long)k[i].block);
		CHECK_FAILS(&b, want);
		gb_free(&b);
	}
}

static void test_offset_past_end(void)
{
	struct gb b;
	struct marks m;
	struct opts o = {0};
	char want[160];

	build(&b, &m, &o);
	patch_u64(&b, m.t1_offset, 1u << 20);
	snprintf(want, sizeof(want),
	         "tensor 'out.weight' data (offset 1048576, 68 bytes) runs past the end of the "
	         "file (size %zu)",
	         b.len);
	CHECK_FAILS(&b, want);
	patch_u64(&b, m.t1_offset, UINT64_MAX - 31); /* aligned; offset + size overflows */
	CHECK_FAILS(&b, "runs past the end of the file");
	patch_u64(&b, m.t1_offset, m.t1_offset_value + 32); /* one block too far */
	CHECK_FAILS(&b, "runs past the end of the file");
	gb_free(&b);
}

static void test_misaligned_offset(void)
{
	struct gb b;
	struct marks m;
	struct opts o = {0};

	build(&b, &m, &o);
	patch_u64(&b, m.t1_offset, m.t1_offset_value - 4);
	CHECK_FAILS(&b, "tensor 'out.weight' data offset 60 is not a multiple of the alignment 32");
	gb_free(&b);
}

static void test_overlap_and_duplicates(void)
{
	struct gb b;
	struct marks m;
	struct opts o = {0};

	build(&b, &m, &o);
	patch_u64(&b, m.t1_offset, 0);
	CHECK_FAILS(&b, "overlap");
	gb_free(&b);

	build(&b, &m, &o);
	memcpy(b.d + m.t1_name, "tok", 3);
	CHECK_FAILS(&b, "duplicate tensor name 'tok.weight'");
	gb_free(&b);

	build(&b, &m, &o);
	memcpy(b.d + m.i8_key, "t.u8", 4);
	CHECK_FAILS(&b, "duplicate metadata key 't.u8'");
	gb_free(&b);
}

static void test_bad_alignment(void)
{
	static const uint32_t bad[] = {0, 3, 48, 0xffffffffu};
	struct gb b;
	struct marks m;
	struct opts o = {.alignment = 32};

	build(&b, &m, &o);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		patch_u32(&b, m.align_value, bad[i]);
		CHECK_FAILS(&b, "is not a positive power of two");
	}
	/* a power of two, but larger than the file: the data section is past the end */
	patch_u32(&b, m.align_value, 1u << 31);
	CHECK_FAILS(&b, "data section");
	/* the wrong value type */
	patch_u32(&b, m.align_value - 4, LP_GGUF_F32);
	CHECK_FAILS(&b, "general.alignment has type f32");
	gb_free(&b);
}

static void test_not_a_file(void)
{
	struct lp_gguf *g = (struct lp_gguf *)1;
	struct lp_err err;
	char path[256];

	CHECK(open_bytes("", 0, &err, path, sizeof(path)) < 0);
	CHECK_MSG(strstr(err.msg, "not a gguf file") != NULL, "%s", err.msg);
	CHECK(open_bytes("GGU", 3, &err, path, sizeof(path)) < 0);
	CHECK(open_bytes("GGUF\3\0", 6, &err, path, sizeof(path)) < 0);
	CHECK_MSG(strstr(err.msg, "file ends") != NULL, "%s", err.msg);

	CHECK(lp_gguf_open(&g, tmp_dir, &err) < 0);
	CHECK(g == NULL);
	CHECK_MSG(strstr(err.msg, "not a regular file") != NULL, "%s", err.msg);

	snprintf(path, sizeof(path), "%s/no-such.gguf", tmp_dir);
	g = (struct lp_gguf *)1;
	CHECK_EQ_INT(lp_gguf_open(&g, path, &err), -ENOENT);
	CHECK(g == NULL);
	CHECK(strstr(err.msg, "no-such.gguf") != NULL);
}

/* Every single-byte change to the header and infos must either open or fail
 * cleanly (run under the sanitizers, this finds unchecked reads). */
static void test_byte_flips(void)
{
	struct gb b;
	struct marks m;
	struct opts o = {.alignment = 32};
	struct lp_err err;
	char path[256];
	int failures = 0;

	build(&b, &m, &o);
	for (size_t i = 0; i < m.data_start; i++) {
		static const unsigned char vals[] = {0x00, 0xff, 0x80, 0x41};
		unsigned char keep = b.d[i];
		for (size_t v = 0; v < sizeof(vals); v++) {
			int rc;
			b.d[i] = vals[v];
			rc = open_bytes(b.d, b.len, &err, path, sizeof(path));
			CHECK_MSG(rc <= 0 && rc > -998, "byte %zu = %#x: rc %d", i, vals[v], rc);
			if (rc < 0) {
				failures++;
				CHECK_MSG(err.msg[0] != '\0', "byte %zu: empty message", i);
			}
		}
		b.d[i] = keep;
	}
	CHECK(failures > 100);
	gb_free(&b);
}

int main(void)
{
	TEST_MAIN_BEGIN("test-gguf");
	snprintf(tmp_dir, sizeof(tmp_dir), "/tmp/lp-test-gguf-XXXXXX");
	if (!mkdtemp(tmp_dir)) {
		printf("FAIL test-gguf:setup: mkdtemp failed\n");
		return 1;
	}
	RUN(test_model_header);
	RUN(test_model_metadata);
	RUN(test_model_tensors);
	RUN(test_small_file);
	RUN(test_small_default_and_wide_alignment);
	RUN(test_version_2_and_no_tensors);
	RUN(test_truncated_every_prefix);
	RUN(test_bad_magic);
	RUN(test_bad_versions);
	RUN(test_huge_counts);
	RUN(test_huge_string_length);
	RUN(test_huge_array_length);
	RUN(test_unknown_and_nested_types);
	RUN(test_unknown_tensor_type);
	RUN(test_bad_dims);
	RUN(test_dims_not_multiple_of_block);
	RUN(test_block_types);
	RUN(test_offset_past_end);
	RUN(test_misaligned_offset);
	RUN(test_overlap_and_duplicates);
	RUN(test_bad_alignment);
	RUN(test_not_a_file);
	RUN(test_byte_flips);
	{
		static const char *names[] = {"small.gguf", "align.gguf", "v2.gguf", "empty.gguf",
		                              "case.gguf"};
		char p[256];
		for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
			snprintf(p, sizeof(p), "%s/%s", tmp_dir, names[i]);
			unlink(p);
		}
		rmdir(tmp_dir);
	}
	TEST_MAIN_END();
}
