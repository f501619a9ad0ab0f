/* Tests for the safetensors reader, on files written here in a temp dir:
 * a valid file of every dtype, sharded and single-file model directories,
 * and many kinds of broken file or index (each must be a clean error). */
#include <errno.h>
#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/formats/safetensors.h"
#include "kernels/dtype.h"
#include "tests/test.h"

static char tmp_dir[64];

static void path_in(char *out, size_t outsz, const char *rel)
{
	snprintf(out, outsz, "%s/%s", tmp_dir, rel);
}

static int write_raw(const char *rel, const void *d, size_t len)
{
	char path[512];
	FILE *f;

	path_in(path, sizeof(path), rel);
	f = fopen(path, "wb");
	if (!f)
		return -1;
	if (len && fwrite(d, 1, len, f) != len) {
		fclose(f);
		return -1;
	}
	return fclose(f) == 0 ? 0 : -1;
}

/* JSON written with ' for " to keep the C strings readable. */
static char *dq(const char *s)
{
	char *o = strdup(s);
	if (!o)
		abort();
	for (char *p = o; *p; p++)
		if (*p == '\'')
			*p = '"';
	return o;
}

/* Builds u64 length + header (padded with spaces to pad) + data into a
 * malloc'd buffer. */
static unsigned char *st_bytes(const char *header_q, size_t pad, const void *data, size_t dlen,
                               size_t *len)
{
	char *h = dq(header_q);
	size_t hl = strlen(h), padded = pad ? (hl + pad - 1) / pad * pad : hl;
	unsigned char *b = malloc(8 + padded + dlen + 1);

	if (!b)
		abort();
	for (int i = 0; i < 8; i++)
		b[i] = (unsigned char)((uint64_t)padded >> (8 * i));
	memcpy(b + 8, h, hl);
	memset(b + 8 + hl, ' ', padded - hl);
	if (dlen)
		memcpy(b + 8 + padded, data, dlen);
	*len = 8 + padded + dlen;
	free(h);
	return b;
}

static int write_st(const char *rel, const char *header_q, const void *data, size_t dlen)
{
	size_t len;
	unsigned char *b = st_bytes(header_q, 8, data, dlen, &len);
	int rc = write_raw(rel, b, len);
	free(b);
	return rc;
}

static int mkdir_in(const char *rel)
{
	char path[512];
	path_in(path, sizeof(path), rel);
	return mkdir(path, 0755) == 0 || errno == EEXIST ? 0 : -1;
}

static int rm_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void)sb;
	(void)flag;
	(void)ftw;
	return remove(path);
}

/* Opening must fail with a message containing want (and naming what). */
#define CHECK_FILE_FAILS(rel, want)                                                                \
	do {                                                                                       \
		struct lp_safetensors *s_ = (struct lp_safetensors *)1;                            \
		struct lp_err e_ = {0};                                                            \
		char p_[512];                                                                      \
		path_in(p_, sizeof(p_), (rel));                                                    \
		int r_ = lp_safetensors_open_file(&s_, p_, &e_);                                   \
		CHECK_MSG(r_ < 0, "opening '%s' returned %d", p_, r_);                             \
		CHECK(s_ == NULL);                                                                 \
		CHECK_EQ_INT(e_.code, r_);                                                         \
		CHECK_MSG(strstr(e_.msg, p_) != NULL, "message does not name the file: %s",        \
		          e_.msg);                                                                 \
		CHECK_MSG(strstr(e_.msg, (want)) != NULL, "message '%s' lacks '%s'", e_.msg,       \
		          (want));                                                                 \
	} while (0)

#define CHECK_DIR_FAILS(rel, want)                                                                 \
	do {                                                                                       \
		struct lp_safetensors *s_ = (struct lp_safetensors *)1;                            \
		struct lp_err e_ = {0};                                                            \
		char p_[512];                                                                      \
		path_in(p_, sizeof(p_), (rel));                                                    \
		int r_ = lp_safetensors_open_dir(&s_, p_, &e_);                                    \
		CHECK_MSG(r_ < 0, "opening dir '%s' returned %d", p_, r_);                         \
		CHECK(s_ == NULL);                                                                 \
		CHECK_EQ_INT(e_.code, r_);                                                         \
		CHECK_MSG(strstr(e_.msg, p_) != NULL, "message does not name the dir: %s",         \
		          e_.msg);                                                                 \
		CHECK_MSG(strstr(e_.msg, (want)) != NULL, "message '%s' lacks '%s'", e_.msg,       \
		          (want));                                                                 \
	} while (0)

/* ---- the valid file ---- */

static const char *valid_header =
    "{'__metadata__': {'format': 'pt', 'note': 'x'},"
    " 'w.f32': {'dtype': 'F32', 'shape': [2, 3], 'data_offsets': [0, 24]},"
    " 'w.f16': {'dtype': 'F16', 'shape': [4], 'data_offsets': [24, 32]},"
    " 'w.bf16': {'dtype': 'BF16', 'shape': [2, 2], 'data_offsets': [32, 40]},"
    " 'w.i64': {'dtype': 'I64', 'shape': [], 'data_offsets': [40, 48]},"
    " 'w.u8': {'dtype': 'U8', 'shape': [3], 'data_offsets': [48, 51]},"
    " 'w.bool': {'dtype': 'BOOL', 'shape': [1], 'data_offsets': [51, 52]},"
    " 'w.empty': {'dtype': 'F32', 'shape': [0, 4], 'data_offsets': [52, 52]},"
    " 'w.i32': {'dtype': 'I32', 'shape': [1, 1, 1, 1, 1, 1, 1, 2], 'data_offsets': [52, 60]},"
    " 'w.f64': {'dtype': 'F64', 'shape': [1], 'data_offsets': [64, 72]},"
    " 'w.i16': {'dtype': 'I16', 'shape': [2], 'data_offsets': [72, 76]},"
    " 'w.i8': {'dtype': 'I8', 'shape': [2], 'data_offsets': [76, 78]}}";

#define VALID_DATA_LEN 78

static void valid_data(unsigned char *d)
{
	memset(d, 0xcc, VALID_DATA_LEN);
	for (int i = 0; i < 6; i++) {
		float f = (float)i * 1.5f;
		memcpy(d + 4 * i, &f, 4);
	}
	for (int i = 0; i < 4; i++) {
		uint16_t h = lp_f32_to_f16((float)i - 1.5f);
		memcpy(d + 24 + 2 * i, &h, 2);
	}
	for (int i = 0; i < 4; i++) {
		uint16_t h = lp_f32_to_bf16((float)i * 256.0f);
		memcpy(d + 32 + 2 * i, &h, 2);
	}
	{
		int64_t v = -7;
		memcpy(d + 40, &v, 8);
	}
	d[48] = 1;
	d[49] = 2;
	d[50] = 255;
	d[51] = 1;
	{
		int32_t v[2] = {-100000, 42};
		memcpy(d + 52, v, 8);
	}
	{
		double v = 3.25;
		memcpy(d + 64, &v, 8);
	}
	{
		int16_t v[2] = {-300, 300};
		memcpy(d + 72, v, 4);
	}
	d[76] = (unsigned char)(int8_t)-3;
	d[77] = 9;
}

static const struct lp_fmt_tensor *find_checked(const struct lp_safetensors *st, const char *name,
                                                enum lp_fmt_type dtype, int n_dims, size_t nbytes)
{
	const struct lp_fmt_tensor *t = lp_safetensors_find(st, name);
	if (!t || t->type != dtype || t->n_dims != n_dims || t->nbytes != nbytes ||
	    strcmp(t->name, name) != 0)
		return NULL;
	return t;
}

static void check_valid_set(const struct lp_safetensors *st, const char *path)
{
	const struct lp_fmt_tensor *t;
	float f;
	double d;
	int64_t i64;
	int32_t i32;
	int16_t i16;
	uint16_t h;

	CHECK_EQ_INT(lp_safetensors_count(st), 11);
	CHECK(lp_safetensors_find(st, "__metadata__") == NULL);
	CHECK(lp_safetensors_find(st, "w.nope") == NULL);
	CHECK(lp_safetensors_find(st, "w.f3") == NULL);
	CHECK(lp_safetensors_at(st, 11) == NULL);
	for (size_t i = 0; i < lp_safetensors_count(st); i++) {
		t = lp_safetensors_at(st, i);
		CHECK(t != NULL);
		CHECK(lp_safetensors_find(st, t->name) == t);
		CHECK_EQ_STR(t->file, path);
	}

	t = find_checked(st, "w.f32", LP_FMT_F32, 2, 24);
	CHECK(t != NULL);
	CHECK_EQ_INT(t->shape[0], 2);
	CHECK_EQ_INT(t->shape[1], 3);
	for (int i = 0; i < 6; i++) {
		memcpy(&f, (const char *)t->data + 4 * i, 4);
		CHECK_NEAR(f, i * 1.5, 0.0);
	}
	t = find_checked(st, "w.f16", LP_FMT_F16, 1, 8);
	CHECK(t != NULL);
	CHECK_EQ_INT(t->shape[0], 4);
	for (int i = 0; i < 4; i++) {
		memcpy(&h, (const char *)t->data + 2 * i, 2);
		CHECK_NEAR(lp_f16_to_f32(h), i - 1.5, 0.0);
	}
	t = find_checked(st, "w.bf16", LP_FMT_BF16, 2, 8);
	CHECK(t != NULL);
	memcpy(&h, (const char *)t->data + 6, 2);
	CHECK_NEAR(lp_bf16_to_f32(h), 768.0, 0.0);
	t = find_checked(st, "w.i64", LP_FMT_I64, 0, 8); /* a 0-dim scalar */
	CHECK(t != NULL);
	memcpy(&i64, t->data, 8);
	CHECK_EQ_INT(i64, -7);
	t = find_checked(st, "w.u8", LP_FMT_U8, 1, 3);
	CHECK(t != NULL);
	CHECK_EQ_INT(((const unsigned char *)t->data)[2], 255);
	t = find_checked(st, "w.bool", LP_FMT_BOOL, 1, 1);
	CHECK(t != NULL);
	CHECK_EQ_INT(((const unsigned char *)t->data)[0], 1);
	t = find_checked(st, "w.empty", LP_FMT_F32, 2, 0);
	CHECK(t != NULL);
	CHECK_EQ_INT(t->shape[0], 0);
	CHECK_EQ_INT(t->shape[1], 4);
	t = find_checked(st, "w.i32", LP_FMT_I32, 8, 8);
	CHECK(t != NULL);
	CHECK_EQ_INT(t->shape[7], 2);
	memcpy(&i32, t->data, 4);
	CHECK_EQ_INT(i32, -100000);
	memcpy(&i32, (const char *)t->data + 4, 4);
	CHECK_EQ_INT(i32, 42);
	t = find_checked(st, "w.f64", LP_FMT_F64, 1, 8);
	CHECK(t != NULL);
	memcpy(&d, t->data, 8);
	CHECK_NEAR(d, 3.25, 0.0);
	t = find_checked(st, "w.i16", LP_FMT_I16, 1, 4);
	CHECK(t != NULL);
	memcpy(&i16, (const char *)t->data + 2, 2);
	CHECK_EQ_INT(i16, 300);
	t = find_checked(st, "w.i8", LP_FMT_I8, 1, 2);
	CHECK(t != NULL);
	CHECK_EQ_INT(((const int8_t *)t->data)[0], -3);
}

static void test_valid_file(void)
{
	unsigned char data[VALID_DATA_LEN];
	struct lp_safetensors *st;
	struct lp_err err;
	char path[512];

	valid_data(data);
	CHECK(write_st("valid.safetensors", valid_header, data, sizeof(data)) == 0);
	path_in(path, sizeof(path), "valid.safetensors");
	CHECK_OK(lp_safetensors_open_file(&st, path, &err), &err);
	check_valid_set(st, path);
	lp_safetensors_free(st);
	if (test_current_failed)
		return;

	/* the same without header padding */
	{
		size_t len;
		unsigned char *b = st_bytes(valid_header, 0, data, sizeof(data), &len);
		CHECK(write_raw("unpadded.safetensors", b, len) == 0);
		free(b);
	}
	path_in(path, sizeof(path), "unpadded.safetensors");
	CHECK_OK(lp_safetensors_open_file(&st, path, &err), &err);
	check_valid_set(st, path);
	lp_safetensors_free(st);
}

static void test_dtype_table(void)
{
	CHECK_EQ_INT(lp_fmt_type_size(LP_FMT_F64), 8);
	CHECK_EQ_INT(lp_fmt_type_size(LP_FMT_F32), 4);
	CHECK_EQ_INT(lp_fmt_type_size(LP_FMT_BF16), 2);
	CHECK_EQ_INT(lp_fmt_type_size(LP_FMT_I16), 2);
	CHECK_EQ_INT(lp_fmt_type_size(LP_FMT_BOOL), 1);
	CHECK_EQ_STR(lp_fmt_type_name(LP_FMT_BF16), "BF16");
	CHECK_EQ_STR(lp_fmt_type_name(LP_FMT_U8), "U8");
	CHECK_EQ_INT(lp_fmt_type_size((enum lp_fmt_type)99), 0);
	CHECK_EQ_STR(lp_fmt_type_name((enum lp_fmt_type)99), "invalid");
}

static void test_empty_header_object(void)
{
	struct lp_safetensors *st;
	struct lp_err err;
	char path[512];

	CHECK(write_st("none.safetensors", "{}", NULL, 0) == 0);
	path_in(path, sizeof(path), "none.safetensors");
	CHECK_OK(lp_safetensors_open_file(&st, path, &err), &err);
	CHECK_EQ_INT(lp_safetensors_count(st), 0);
	CHECK(lp_safetensors_find(st, "x") == NULL);
	lp_safetensors_free(st);
}

/* ---- model directories ---- */

static int write_shards(const char *dir)
{
	char rel[256];
	float d1[4] = {1, 1, 2, 2}, d2[2] = {3, 3};

	if (mkdir_in(dir))
		return -1;
	snprintf(rel, sizeof(rel), "%s/model-00001-of-00002.safetensors", dir);
	if (write_st(rel,
	             "{'a.weight': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]},"
	             " 'b.weight': {'dtype': 'F32', 'shape': [2], 'data_offsets': [8, 16]}}",
	             d1, sizeof(d1)))
		return -1;
	snprintf(rel, sizeof(rel), "%s/model-00002-of-00002.safetensors", dir);
	return write_st(rel,
	                "{'c.weight': {'dtype': 'F32', 'shape': [1, 2], 'data_offsets': [0, 8]}}",
	                d2, sizeof(d2));
}

static int write_index(const char *dir, const char *json_q)
{
	char rel[256], *j = dq(json_q);
	int rc;

	snprintf(rel, sizeof(rel), "%s/model.safetensors.index.json", dir);
	rc = write_raw(rel, j, strlen(j));
	free(j);
	return rc;
}

static const char *good_index = "{'metadata': {'total_size': 24}, 'weight_map': {"
                                "'a.weight': 'model-00001-of-00002.safetensors',"
                                "'c.weight': 'model-00002-of-00002.safetensors',"
                                "'b.weight': 'model-00001-of-00002.safetensors'}}";

static void test_sharded_dir(void)
{
	struct lp_safetensors *st;
	struct lp_err err;
	const struct lp_fmt_tensor *a, *b, *c;
	char dir[512];
	float f;

	CHECK(write_shards("sharded") == 0);
	CHECK(write_index("sharded", good_index) == 0);
	path_in(dir, sizeof(dir), "sharded");
	CHECK_OK(lp_safetensors_open_dir(&st, dir, &err), &err);
	CHECK_EQ_INT(lp_safetensors_count(st), 3);
	a = lp_safetensors_find(st, "a.weight");
	b = lp_safetensors_find(st, "b.weight");
	c = lp_safetensors_find(st, "c.weight");
	CHECK(a && b && c);
	CHECK(strstr(a->file, "/sharded/model-00001-of-00002.safetensors") != NULL);
	CHECK(a->file == b->file); /* the shard is opened once */
	CHECK(strstr(c->file, "/sharded/model-00002-of-00002.safetensors") != NULL);
	memcpy(&f, b->data, 4);
	CHECK_NEAR(f, 2.0, 0.0);
	memcpy(&f, c->data, 4);
	CHECK_NEAR(f, 3.0, 0.0);
	CHECK_EQ_INT(c->n_dims, 2);
	CHECK_EQ_INT(c->shape[1], 2);
	lp_safetensors_free(st);
}

static void test_single_file_dirs(void)
{
	struct lp_safetensors *st;
	struct lp_err err;
	unsigned char data[VALID_DATA_LEN];
	char dir[512];

	valid_data(data);
	/* model.safetensors wins over other files when there is no index */
	CHECK(mkdir_in("single") == 0);
	CHECK(write_st("single/model.safetensors", valid_header, data, sizeof(data)) == 0);
	CHECK(write_st("single/other.safetensors", "{}", NULL, 0) == 0);
	path_in(dir, sizeof(dir), "single");
	CHECK_OK(lp_safetensors_open_dir(&st, dir, &err), &err);
	CHECK_EQ_INT(lp_safetensors_count(st), 11);
	CHECK(strstr(lp_safetensors_at(st, 0)->file, "/single/model.safetensors") != NULL);
	lp_safetensors_free(st);

	/* else the only *.safetensors file (an adapter, say) */
	CHECK(mkdir_in("adapter") == 0);
	CHECK(write_st("adapter/adapter_model.safetensors", valid_header, data, sizeof(data)) == 0);
	CHECK(write_raw("adapter/adapter_config.json", "{}", 2) == 0);
	path_in(dir, sizeof(dir), "adapter");
	CHECK_OK(lp_safetensors_open_dir(&st, dir, &err), &err);
	CHECK_EQ_INT(lp_safetensors_count(st), 11);
	CHECK(lp_safetensors_find(st, "w.i8") != NULL);
	lp_safetensors_free(st);

	/* two without an index: which one is meant is unknown */
	CHECK(write_st("adapter/second.safetensors", "{}", NULL, 0) == 0);
	CHECK_DIR_FAILS("adapter", "has 2 .safetensors files and no model.safetensors.index.json");

	CHECK(mkdir_in("nothing") == 0);
	CHECK_DIR_FAILS("nothing", "no .safetensors file in");
	CHECK_DIR_FAILS("no-such-dir", "cannot open directory");
}

/* ---- broken files ---- */

static void test_truncated_and_empty(void)
{
	unsigned char data[VALID_DATA_LEN], *b;
	struct lp_safetensors *st;
	struct lp_err err;
	char path[512];
	size_t len;

	CHECK(write_raw("empty.safetensors", "", 0) == 0);
	CHECK_FILE_FAILS("empty.safetensors", "file of 0 bytes is too small");
	CHECK(write_raw("short.safetensors", "\x10\0\0\0\0", 5) == 0);
	CHECK_FILE_FAILS("short.safetensors", "file of 5 bytes is too small");

	/* every proper prefix of a valid file fails, the whole file opens */
	valid_data(data);
	b = st_bytes(valid_header, 8, data, sizeof(data), &len);
	path_in(path, sizeof(path), "prefix.safetensors");
	for (size_t n = 0; n <= len; n++) {
		int rc;
		CHECK(write_raw("prefix.safetensors", b, n) == 0);
		st = (struct lp_safetensors *)1;
		rc = lp_safetensors_open_file(&st, path, &err);
		if (n < len) {
			CHECK_MSG(rc < 0 && st == NULL, "prefix of %zu/%zu bytes opened", n, len);
			CHECK_MSG(strstr(err.msg, path) != NULL, "prefix %zu: %s", n, err.msg);
		} else {
			CHECK_MSG(rc == 0, "the full file failed: %s", err.msg);
			lp_safetensors_free(st);
		}
	}
	free(b);
}

static void test_header_length(void)
{
	unsigned char b[64] = {0};
	uint64_t n;

	/* past the end of the file */
	n = 100;
	memcpy(b, &n, 8);
	memcpy(b + 8, "{}", 2);
	CHECK(write_raw("hl.safetensors", b, 16) == 0);
	CHECK_FILE_FAILS("hl.safetensors",
	                 "header length 100 runs past the end of the file (size 16)");
	/* enormous: refused before anything is allocated */
	n = 1ull << 62;
	memcpy(b, &n, 8);
	CHECK(write_raw("hl.safetensors", b, 64) == 0);
	CHECK_FILE_FAILS("hl.safetensors", "header length 4611686018427387904 is over the limit");
	n = UINT64_MAX;
	memcpy(b, &n, 8);
	CHECK(write_raw("hl.safetensors", b, 64) == 0);
	CHECK_FILE_FAILS("hl.safetensors", "is over the limit");
	/* zero-length header: empty JSON text */
	n = 0;
	memcpy(b, &n, 8);
	CHECK(write_raw("hl.safetensors", b, 8) == 0);
	CHECK_FILE_FAILS("hl.safetensors", "not valid json");
}

static void test_bad_json(void)
{
	CHECK(write_st("j.safetensors", "{'a': {'dtype': 'F32', ", NULL, 0) == 0);
	CHECK_FILE_FAILS("j.safetensors", "header is not valid json");
	CHECK(write_st("j.safetensors", "[1, 2]", NULL, 0) == 0);
	CHECK_FILE_FAILS("j.safetensors", "header is not a json object");
	CHECK(write_st("j.safetensors", "'just a string'", NULL, 0) == 0);
	CHECK_FILE_FAILS("j.safetensors", "header is not valid json");
	CHECK(write_st("j.safetensors", "{} trailing", NULL, 0) == 0);
	CHECK_FILE_FAILS("j.safetensors", "not valid json");
	/* the same tensor twice in one header */
	CHECK(write_st("j.safetensors",
	               "{'a': {'dtype': 'U8', 'shape': [1], 'data_offsets': [0, 1]},"
	               " 'a': {'dtype': 'U8', 'shape': [1], 'data_offsets': [1, 2]}}",
	               "xy", 2) == 0);
	CHECK_FILE_FAILS("j.safetensors", "duplicate");
	CHECK(write_st("j.safetensors", "{'a': 5}", NULL, 0) == 0);
	CHECK_FILE_FAILS("j.safetensors", "tensor 'a': entry is not an object");
	CHECK(write_st("j.safetensors", "{'a': {'shape': [1], 'data_offsets': [0, 1]}}", "x", 1) ==
	      0);
	CHECK_FILE_FAILS("j.safetensors", "tensor 'a': missing or non-string 'dtype'");
	CHECK(write_st("j.safetensors", "{'a': {'dtype': 'U8', 'data_offsets': [0, 1]}}", "x", 1) ==
	      0);
	CHECK_FILE_FAILS("j.safetensors", "tensor 'a': missing or non-array 'shape'");
	CHECK(write_st("j.safetensors", "{'a': {'dtype': 'U8', 'shape': [1]}}", "x", 1) == 0);
	CHECK_FILE_FAILS("j.safetensors", "'data_offsets' is not two non-negative integers");
	CHECK(write_st("j.safetensors", "{'a': {'dtype': 'U8', 'shape': [1], 'data_offsets': [0]}}",
	               "x", 1) == 0);
	CHECK_FILE_FAILS("j.safetensors", "'data_offsets' is not two non-negative integers");
}

static void test_unknown_dtype(void)
{
	CHECK(write_st("d.safetensors",
	               "{'a': {'dtype': 'F8_E4M3', 'shape': [1], 'data_offsets': [0, 1]}}", "x",
	               1) == 0);
	CHECK_FILE_FAILS("d.safetensors", "tensor 'a': unknown dtype 'F8_E4M3'");
	CHECK(write_st("d.safetensors",
	               "{'a': {'dtype': 'f32', 'shape': [1], 'data_offsets': [0, 4]}}", "xxxx",
	               4) == 0);
	CHECK_FILE_FAILS("d.safetensors", "unknown dtype 'f32'");
	CHECK(write_st("d.safetensors", "{'a': {'dtype': 4, 'shape': [1], 'data_offsets': [0, 4]}}",
	               "xxxx", 4) == 0);
	CHECK_FILE_FAILS("d.safetensors", "non-string 'dtype'");
}

static void test_bad_shapes(void)
{
	CHECK(write_st("s.safetensors",
	               "{'a': {'dtype': 'F32', 'shape': [-2, 2], 'data_offsets': [0, 16]}}",
	               "0123456789abcdef", 16) == 0);
	CHECK_FILE_FAILS("s.safetensors", "tensor 'a': dimension 0 is not a non-negative integer");
	CHECK(write_st("s.safetensors",
	               "{'a': {'dtype': 'F32', 'shape': [2, 2.5], 'data_offsets': [0, 16]}}",
	               "0123456789abcdef", 16) == 0);
	CHECK_FILE_FAILS("s.safetensors", "dimension 1 is not a non-negative integer");
	CHECK(write_st("s.safetensors",
	               "{'a': {'dtype': 'F32', 'shape': [2, '2'], 'data_offsets': [0, 16]}}",
	               "0123456789abcdef", 16) == 0);
	CHECK_FILE_FAILS("s.safetensors", "dimension 1 is not a non-negative integer");
	CHECK(
	    write_st("s.safetensors",
	             "{'a': {'dtype': 'U8', 'shape': [1,1,1,1,1,1,1,1,1], 'data_offsets': [0, 1]}}",
	             "x", 1) == 0);
	CHECK_FILE_FAILS("s.safetensors", "9 dimensions (at most 8)");
	/* 2^32 * 2^32 elements overflow 64 bits */
	CHECK(write_st("s.safetensors",
	               "{'a': {'dtype': 'U8', 'shape': [4294967296, 4294967296], "
	               "'data_offsets': [0, 0]}}",
	               NULL, 0) == 0);
	CHECK_FILE_FAILS("s.safetensors", "element count overflows");
	/* 2^62 F32 elements: the byte size overflows */
	CHECK(write_st("s.safetensors",
	               "{'a': {'dtype': 'F32', 'shape': [4611686018427387904], "
	               "'data_offsets': [0, 0]}}",
	               NULL, 0) == 0);
	CHECK_FILE_FAILS("s.safetensors", "byte size overflows");
}

static void test_offset_mismatch(void)
{
	CHECK(write_st("o.safetensors",
	               "{'a': {'dtype': 'F32', 'shape': [2, 2], 'data_offsets': [0, 12]}}",
	               "0123456789abcdef", 16) == 0);
	CHECK_FILE_FAILS("o.safetensors", "tensor 'a': data_offsets [0, 12] hold 12 bytes but 4 "
	                                  "elements of F32 need 16");
	CHECK(write_st("o.safetensors",
	               "{'a': {'dtype': 'U8', 'shape': [2], 'data_offsets': [4, 2]}}",
	               "0123456789abcdef", 16) == 0);
	CHECK_FILE_FAILS("o.safetensors", "data_offsets [4, 2] end before they begin");
	CHECK(write_st("o.safetensors",
	               "{'a': {'dtype': 'U8', 'shape': [2], 'data_offsets': [-2, 0]}}",
	               "0123456789abcdef", 16) == 0);
	CHECK_FILE_FAILS("o.safetensors", "not two non-negative integers");
}

static void test_offsets_past_end(void)
{
	CHECK(write_st("p.safetensors",
	               "{'a': {'dtype': 'F32', 'shape': [4], 'data_offsets': [0, 16]}}", "01234567",
	               8) == 0);
	CHECK_FILE_FAILS("p.safetensors",
	                 "tensor 'a': data_offsets [0, 16] run past the end of the "
	                 "data (8 bytes)");
	CHECK(write_st("p.safetensors",
	               "{'a': {'dtype': 'U8', 'shape': [0], 'data_offsets': [9, 9]}}", "01234567",
	               8) == 0);
	CHECK_FILE_FAILS("p.safetensors", "run past the end of the data");
	CHECK(write_st("p.safetensors",
	               "{'a': {'dtype': 'U8', 'shape': [2], "
	               "'data_offsets': [9223372036854775805, 9223372036854775807]}}",
	               "01234567", 8) == 0);
	CHECK_FILE_FAILS("p.safetensors", "run past the end of the data");
}

static void test_overlap(void)
{
	struct lp_safetensors *st;
	struct lp_err err;
	char path[512];

	CHECK(write_st("ov.safetensors",
	               "{'a': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]},"
	               " 'b': {'dtype': 'F32', 'shape': [2], 'data_offsets': [4, 12]}}",
	               "0123456789abcdef", 16) == 0);
	CHECK_FILE_FAILS("ov.safetensors", "tensors 'a' and 'b' overlap");
	/* listed out of order, the later-starting one first */
	CHECK(write_st("ov.safetensors",
	               "{'b': {'dtype': 'U8', 'shape': [8], 'data_offsets': [8, 16]},"
	               " 'c': {'dtype': 'U8', 'shape': [1], 'data_offsets': [2, 3]},"
	               " 'a': {'dtype': 'U8', 'shape': [9], 'data_offsets': [0, 9]}}",
	               "0123456789abcdef", 16) == 0);
	CHECK_FILE_FAILS("ov.safetensors", "overlap");
	/* the same range twice */
	CHECK(write_st("ov.safetensors",
	               "{'a': {'dtype': 'U8', 'shape': [4], 'data_offsets': [0, 4]},"
	               " 'b': {'dtype': 'I32', 'shape': [1], 'data_offsets': [0, 4]}}",
	               "0123", 4) == 0);
	CHECK_FILE_FAILS("ov.safetensors", "overlap");

	/* adjacent tensors, gaps, and empty tensors anywhere are fine */
	CHECK(write_st("ov.safetensors",
	               "{'a': {'dtype': 'U8', 'shape': [4], 'data_offsets': [0, 4]},"
	               " 'e': {'dtype': 'F32', 'shape': [0], 'data_offsets': [2, 2]},"
	               " 'b': {'dtype': 'U8', 'shape': [4], 'data_offsets': [4, 8]},"
	               " 'c': {'dtype': 'U8', 'shape': [4], 'data_offsets': [12, 16]}}",
	               "0123456789abcdef", 16) == 0);
	path_in(path, sizeof(path), "ov.safetensors");
	CHECK_OK(lp_safetensors_open_file(&st, path, &err), &err);
	CHECK_EQ_INT(lp_safetensors_count(st), 4);
	CHECK(memcmp(lp_safetensors_find(st, "c")->data, "cdef", 4) == 0);
	lp_safetensors_free(st);
}

static void test_not_files(void)
{
	struct lp_safetensors *st = (struct lp_safetensors *)1;
	struct lp_err err;
	char path[512];

	path_in(path, sizeof(path), "");
	CHECK(lp_safetensors_open_file(&st, path, &err) < 0);
	CHECK(st == NULL);
	CHECK_MSG(strstr(err.msg, "not a regular file") != NULL, "%s", err.msg);
	CHECK_FILE_FAILS("missing.safetensors", "No such file");
}

/* ---- broken indexes ---- */

static void test_index_missing_shard(void)
{
	CHECK(write_shards("ix1") == 0);
	CHECK(write_index("ix1", "{'weight_map': {'a.weight': 'model-00001-of-00002.safetensors',"
	                         " 'z.weight': 'model-00003-of-00003.safetensors'}}") == 0);
	CHECK_DIR_FAILS("ix1", "model-00003-of-00003.safetensors");
	CHECK_DIR_FAILS("ix1", "No such file");
}

static void test_index_tensor_not_in_shard(void)
{
	CHECK(write_shards("ix2") == 0);
	/* c.weight lives in shard 2, the index says shard 1 */
	CHECK(write_index("ix2", "{'weight_map': {'a.weight': 'model-00001-of-00002.safetensors',"
	                         " 'c.weight': 'model-00001-of-00002.safetensors',"
	                         " 'b.weight': 'model-00002-of-00002.safetensors'}}") == 0);
	CHECK_DIR_FAILS("ix2", "is not in its shard");
	CHECK(write_index("ix2", "{'weight_map': {'a.weight': 'model-00001-of-00002.safetensors',"
	                         " 'q.weight': 'model-00002-of-00002.safetensors'}}") == 0);
	CHECK_DIR_FAILS("ix2", "tensor 'q.weight' is not in its shard");
}

static void test_index_bad_shard_names(void)
{
	CHECK(write_shards("ix3") == 0);
	CHECK(write_st("escape.safetensors",
	               "{'a.weight': {'dtype': 'U8', 'shape': [1], 'data_offsets': [0, 1]}}", "x",
	               1) == 0);
	CHECK(write_index("ix3", "{'weight_map': {'a.weight': '../escape.safetensors'}}") == 0);
	CHECK_DIR_FAILS("ix3", "shard '../escape.safetensors' of tensor 'a.weight' is not a plain "
	                       "file name");
	CHECK(write_index("ix3", "{'weight_map': {'a.weight': '/etc/passwd'}}") == 0);
	CHECK_DIR_FAILS("ix3", "not a plain file name");
	CHECK(write_index("ix3", "{'weight_map': {'a.weight': 'sub/x.safetensors'}}") == 0);
	CHECK_DIR_FAILS("ix3", "not a plain file name");
	CHECK(write_index("ix3", "{'weight_map': {'a.weight': '..'}}") == 0);
	CHECK_DIR_FAILS("ix3", "not a plain file name");
	CHECK(write_index("ix3", "{'weight_map': {'a.weight': ''}}") == 0);
	CHECK_DIR_FAILS("ix3", "not a plain file name");
	CHECK(write_index("ix3", "{'weight_map': {'a.weight': 7}}") == 0);
	CHECK_DIR_FAILS("ix3", "shard of tensor 'a.weight' is not a string");
}

static void test_index_malformed(void)
{
	CHECK(write_shards("ix4") == 0);
	CHECK(write_index("ix4", "{'weight_map': ") == 0);
	CHECK_DIR_FAILS("ix4", "not valid json");
	CHECK(write_index("ix4", "{'metadata': {}}") == 0);
	CHECK_DIR_FAILS("ix4", "missing or non-object 'weight_map'");
	CHECK(write_index("ix4", "{'weight_map': []}") == 0);
	CHECK_DIR_FAILS("ix4", "missing or non-object 'weight_map'");
	CHECK(write_index("ix4", "{'weight_map': {}}") == 0);
	CHECK_DIR_FAILS("ix4", "'weight_map' is empty");
	CHECK(write_index("ix4", "") == 0);
	CHECK_DIR_FAILS("ix4", "not valid json");
}

static void test_duplicate_across_shards(void)
{
	float d[2] = {5, 5};

	CHECK(write_shards("ix5") == 0);
	/* shard 2 also holds a.weight */
	CHECK(write_st("ix5/model-00002-of-00002.safetensors",
	               "{'c.weight': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0, 4]},"
	               " 'a.weight': {'dtype': 'F32', 'shape': [1], 'data_offsets': [4, 8]}}",
	               d, sizeof(d)) == 0);
	CHECK(write_index("ix5", good_index) == 0);
	CHECK_DIR_FAILS("ix5", "tensor 'a.weight' is in both");
}

static void test_bad_shard_file(void)
{
	CHECK(write_shards("ix6") == 0);
	CHECK(write_raw("ix6/model-00002-of-00002.safetensors", "\xff\xff", 2) == 0);
	CHECK(write_index("ix6", good_index) == 0);
	CHECK_DIR_FAILS("ix6", "model-00002-of-00002.safetensors': file of 2 bytes is too small");
}

/* Single-byte changes anywhere in the header must open or fail cleanly. */
static void test_byte_flips(void)
{
	unsigned char data[VALID_DATA_LEN], *b;
	struct lp_safetensors *st;
	struct lp_err err;
	char path[512];
	size_t len, hlen;
	int fails = 0, oks = 0;

	valid_data(data);
	b = st_bytes(valid_header, 8, data, sizeof(data), &len);
	hlen = len - sizeof(data);
	path_in(path, sizeof(path), "flip.safetensors");
	for (size_t i = 0; i < hlen; i++) {
		static const unsigned char vals[] = {'9', '-', ']', 0x00, 0xff};
		unsigned char keep = b[i];
		for (size_t v = 0; v < sizeof(vals); v++) {
			int rc;
			b[i] = vals[v];
			CHECK(write_raw("flip.safetensors", b, len) == 0);
			rc = lp_safetensors_open_file(&st, path, &err);
			if (rc == 0) {
				oks++;
				lp_safetensors_free(st);
			} else {
				fails++;
				CHECK_MSG(st == NULL && err.msg[0], "byte %zu: bad failure", i);
			}
		}
		b[i] = keep;
	}
	free(b);
	CHECK(fails > 100);
	CHECK(oks > 0);
}

int main(void)
{
	TEST_MAIN_BEGIN("test-safetensors");
	snprintf(tmp_dir, sizeof(tmp_dir), "/tmp/lp-test-st-XXXXXX");
	if (!mkdtemp(tmp_dir)) {
		printf("FAIL test-safetensors:setup: mkdtemp failed\n");
		return 1;
	}
	RUN(test_valid_file);
	RUN(test_dtype_table);
	RUN(test_empty_header_object);
	RUN(test_sharded_dir);
	RUN(test_single_file_dirs);
	RUN(test_truncated_and_empty);
	RUN(test_header_length);
	RUN(test_bad_json);
	RUN(test_unknown_dtype);
	RUN(test_bad_shapes);
	RUN(test_offset_mismatch);
	RUN(test_offsets_past_end);
	RUN(test_overlap);
	RUN(test_not_files);
	RUN(test_index_missing_shard);
	RUN(test_index_tensor_not_in_shard);
	RUN(test_index_bad_shard_names);
	RUN(test_index_malformed);
	RUN(test_duplicate_across_shards);
	RUN(test_bad_shard_file);
	RUN(test_byte_flips);
	nftw(tmp_dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
	TEST_MAIN_END();
}
