/* GGUF reader: maps the file and parses header, metadata and tensor infos
 * with every read bounded by the bytes left in the file; see gguf.h.
 *
 * Layout (all little-endian):
 *   "GGUF" u32 version u64 tensor_count u64 kv_count
 *   kv_count  x { string key, u32 type, value }
 *   tensor_count x { string name, u32 n_dims, u64 dims[n_dims], u32 type,
 *                    u64 offset }
 *   padding to general.alignment, then the data section (offsets are
 *   relative to its start). */
#include "agent/formats/gguf.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent/formats/le.h"
#include "common/mapped-file.h"

#define GGUF_MAGIC             "GGUF"
#define GGUF_DEFAULT_ALIGNMENT 32
/* Smallest encodings, used to bound counts before allocating:
 * a kv is a key length, a type and at least one value byte; a tensor info is
 * a name length, n_dims, one dim, a type and an offset. */
#define GGUF_MIN_KV_BYTES     (8 + 4 + 1)
#define GGUF_MIN_TENSOR_BYTES (8 + 4 + 8 + 4 + 8)
#define GGUF_STR_LEN_BYTES    8

struct lp_gguf {
	struct lp_mapped_file mf;
	uint32_t version;
	uint64_t alignment;
	uint64_t data_offset; /* start of the data section in the file */
	size_t n_kv;
	struct lp_gguf_kv *kvs; /* n_kv */
	size_t n_tensors;
	struct lp_fmt_tensor *tensors;    /* n_tensors */
	struct lp_gguf_str *tensor_names; /* n_tensors: as in the file, indexed */
	char *name_buf;                   /* the tensors' NUL-terminated names */
	/* open-addressing tables of indices + 1 (0 = empty), sizes powers of 2 */
	uint32_t *kv_index;
	size_t kv_index_size;
	uint32_t *tensor_index;
	size_t tensor_index_size;
};

/* Cursor over the mapping; every read checks the bytes left. */
struct rd {
	const unsigned char *p;
	size_t size;
	size_t pos;
	const char *path;
	struct lp_err *err;
	char ctx[160]; /* what is being read, for messages */
};

static int rd_need(struct rd *r, size_t n, const char *what)
{
	if (r->size - r->pos >= n)
		return 0;
	return lp_errf(r->err, -EINVAL,
	               "'%s': %s%sfile ends at byte %zu while reading %s (%zu bytes needed)",
	               r->path, r->ctx, r->ctx[0] ? ": " : "", r->size, what, n);
}

static int rd_u32(struct rd *r, uint32_t *v, const char *what)
{
	int rc = rd_need(r, 4, what);
	if (rc)
		return rc;
	*v = lp_le32(r->p + r->pos);
	r->pos += 4;
	return 0;
}

static int rd_u64(struct rd *r, uint64_t *v, const char *what)
{
	int rc = rd_need(r, 8, what);
	if (rc)
		return rc;
	*v = lp_le64(r->p + r->pos);
	r->pos += 8;
	return 0;
}

static int rd_str(struct rd *r, struct lp_gguf_str *s, const char *what)
{
	uint64_t len;
	int rc;

	rc = rd_need(r, GGUF_STR_LEN_BYTES, what);
	if (rc)
		return rc;
	len = lp_le64(r->p + r->pos);
	if (len > r->size - r->pos - GGUF_STR_LEN_BYTES)
		return lp_errf(r->err, -EINVAL,
		               "'%s': %s%s%s has length %llu but only %zu bytes are left in "
		               "the file",
		               r->path, r->ctx, r->ctx[0] ? ": " : "", what,
		               (unsigned long long)len, r->size - r->pos - GGUF_STR_LEN_BYTES);
	r->pos += GGUF_STR_LEN_BYTES;
	s->s = (const char *)(r->p + r->pos);
	s->len = len;
	r->pos += (size_t)len;
	return 0;
}

/* Size of one value of a fixed-size type, 0 for STRING, ARRAY and unknown. */
static size_t type_size(uint32_t t)
{
	switch (t) {
	case LP_GGUF_U8:
	case LP_GGUF_I8:
	case LP_GGUF_BOOL:
		return 1;
	case LP_GGUF_U16:
	case LP_GGUF_I16:
		return 2;
	case LP_GGUF_U32:
	case LP_GGUF_I32:
	case LP_GGUF_F32:
		return 4;
	case LP_GGUF_U64:
	case LP_GGUF_I64:
	case LP_GGUF_F64:
		return 8;
	default:
		return 0;
	}
}

static bool type_known(uint32_t t)
{
	return t <= LP_GGUF_F64;
}

static const char *type_name(uint32_t t)
{
	static const char *names[] = {"u8",   "i8",     "u16",   "i16", "u32", "i32", "f32",
	                              "bool", "string", "array", "u64", "i64", "f64"};
	return t < sizeof(names) / sizeof(names[0]) ? names[t] : "unknown";
}

/* Decodes one fixed-size value at p into kv->v. */
static void decode_scalar(struct lp_gguf_kv *kv, uint32_t t, const unsigned char *p)
{
	uint32_t u32;
	uint64_t u64;
	float f32;
	double f64;

	switch (t) {
	case LP_GGUF_U8:
		kv->v.u = p[0];
		break;
	case LP_GGUF_BOOL:
		kv->v.u = p[0] != 0;
		break;
	case LP_GGUF_I8:
		kv->v.i = (int8_t)p[0];
		break;
	case LP_GGUF_U16:
		kv->v.u = lp_le16(p);
		break;
	case LP_GGUF_I16:
		kv->v.i = (int16_t)lp_le16(p);
		break;
	case LP_GGUF_U32:
		kv->v.u = lp_le32(p);
		break;
	case LP_GGUF_I32:
		kv->v.i = (int32_t)lp_le32(p);
		break;
	case LP_GGUF_F32:
		u32 = lp_le32(p);
		memcpy(&f32, &u32, sizeof(f32));
		kv->v.f = f32;
		break;
	case LP_GGUF_U64:
		kv->v.u = lp_le64(p);
		break;
	case LP_GGUF_I64:
		kv->v.i = (int64_t)lp_le64(p);
		break;
	case LP_GGUF_F64:
		u64 = lp_le64(p);
		memcpy(&f64, &u64, sizeof(f64));
		kv->v.f = f64;
		break;
	default:
		break;
	}
}

static bool is_unsigned_type(uint32_t t)
{
	return t == LP_GGUF_U8 || t == LP_GGUF_U16 || t == LP_GGUF_U32 || t == LP_GGUF_U64;
}

static bool is_signed_type(uint32_t t)
{
	return t == LP_GGUF_I8 || t == LP_GGUF_I16 || t == LP_GGUF_I32 || t == LP_GGUF_I64;
}

static bool is_float_type(uint32_t t)
{
	return t == LP_GGUF_F32 || t == LP_GGUF_F64;
}

/* The tensor type a ggml type code stands for; false if unknown. */
static bool ggml_type(uint32_t code, enum lp_fmt_type *out)
{
	static const struct {
		uint32_t code;
		enum lp_fmt_type type;
	} map[] = {
	    {LP_GGML_F32, LP_FMT_F32},   {LP_GGML_F16, LP_FMT_F16},   {LP_GGML_BF16, LP_FMT_BF16},
	    {LP_GGML_Q4_0, LP_FMT_Q4_0}, {LP_GGML_Q4_1, LP_FMT_Q4_1}, {LP_GGML_Q5_0, LP_FMT_Q5_0},
	    {LP_GGML_Q5_1, LP_FMT_Q5_1}, {LP_GGML_Q8_0, LP_FMT_Q8_0}, {LP_GGML_Q8_1, LP_FMT_Q8_1},
	    {LP_GGML_Q2_K, LP_FMT_Q2_K}, {LP_GGML_Q3_K, LP_FMT_Q3_K}, {LP_GGML_Q4_K, LP_FMT_Q4_K},
	    {LP_GGML_Q5_K, LP_FMT_Q5_K}, {LP_GGML_Q6_K, LP_FMT_Q6_K}, {LP_GGML_Q8_K, LP_FMT_Q8_K},
	};
	for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++) {
		if (map[i].code == code) {
			*out = map[i].type;
			return true;
		}
	}
	return false;
}

static uint64_t hash_str(const char *s, size_t len)
{
	uint64_t h = 1469598103934665603ull; /* FNV-1a */
	for (size_t i = 0; i < len; i++) {
		h ^= (unsigned char)s[i];
		h *= 1099511628211ull;
	}
	return h;
}

static bool str_eq(const struct lp_gguf_str *a, const char *s, size_t len)
{
	return a->len == len && (len == 0 || memcmp(a->s, s, len) == 0);
}

/* Table size for n entries: a power of two at least 2n (n is bounded by the
 * file size, so this cannot overflow on any file that maps). */
static size_t index_size_for(size_t n)
{
	size_t sz = 16;
	while (sz < 2 * n)
		sz *= 2;
	return sz;
}

static const struct lp_gguf_str *kv_name(const void *items, size_t i)
{
	return &((const struct lp_gguf_kv *)items)[i].key;
}

static const struct lp_gguf_str *tensor_name(const void *items, size_t i)
{
	return &((const struct lp_gguf_str *)items)[i];
}

/* Looks name up; returns the item index or SIZE_MAX. */
static size_t index_find(const uint32_t *tab, size_t size, const void *items,
                         const struct lp_gguf_str *(*name_of)(const void *, size_t), const char *s,
                         size_t len)
{
	size_t mask = size - 1;
	size_t h;

	if (!tab)
		return SIZE_MAX;
	h = (size_t)hash_str(s, len) & mask;
	while (tab[h]) {
		size_t i = tab[h] - 1;
		if (str_eq(name_of(items, i), s, len))
			return i;
		h = (h + 1) & mask;
	}
	return SIZE_MAX;
}

/* Inserts item i; returns the index of an earlier item with the same name,
 * or SIZE_MAX when inserted. */
static size_t index_insert(uint32_t *tab, size_t size, const void *items,
                           const struct lp_gguf_str *(*name_of)(const void *, size_t), size_t i)
{
	const struct lp_gguf_str *n = name_of(items, i);
	size_t mask = size - 1;
	size_t h = (size_t)hash_str(n->s, (size_t)n->len) & mask;

	while (tab[h]) {
		size_t j = tab[h] - 1;
		if (str_eq(name_of(items, j), n->s, (size_t)n->len))
			return j;
		h = (h + 1) & mask;
	}
	tab[h] = (uint32_t)(i + 1);
	return SIZE_MAX;
}

/* Prints at most 64 bytes of a file string into buf for messages. */
static const char *show(char *buf, size_t bufsz, const struct lp_gguf_str *s)
{
	size_t n = s->len < 64 ? (size_t)s->len : 64;
	size_t j = 0;

	for (size_t i = 0; i < n && j + 1 < bufsz; i++) {
		unsigned char c = (unsigned char)s->s[i];
		buf[j++] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
	}
	if (s->len > n && j + 3 < bufsz) {
		memcpy(buf + j, "...", 3);
		j += 3;
	}
	buf[j] = '\0';
	return buf;
}

static int parse_kv(struct rd *r, struct lp_gguf_kv *kv, size_t idx)
{
	char name[80];
	uint32_t type, elem;
	uint64_t len;
	size_t esz;
	int rc;

	snprintf(r->ctx, sizeof(r->ctx), "metadata entry %zu", idx);
	rc = rd_str(r, &kv->key, "the key");
	if (rc)
		return rc;
	snprintf(r->ctx, sizeof(r->ctx), "metadata entry %zu ('%s')", idx,
	         show(name, sizeof(name), &kv->key));
	rc = rd_u32(r, &type, "the value type");
	if (rc)
		return rc;
	if (!type_known(type))
		return lp_errf(r->err, -EINVAL, "'%s': %s: unknown value type %u", r->path, r->ctx,
		               type);
	kv->type = (enum lp_gguf_type)type;
	if (type == LP_GGUF_STRING)
		return rd_str(r, &kv->str, "the string value");
	if (type != LP_GGUF_ARRAY) {
		esz = type_size(type);
		rc = rd_need(r, esz, "the value");
		if (rc)
			return rc;
		decode_scalar(kv, type, r->p + r->pos);
		r->pos += esz;
		return 0;
	}

	rc = rd_u32(r, &elem, "the array element type");
	if (rc)
		return rc;
	if (elem == LP_GGUF_ARRAY)
		return lp_errf(r->err, -EINVAL, "'%s': %s: nested arrays are not supported",
		               r->path, r->ctx);
	if (!type_known(elem))
		return lp_errf(r->err, -EINVAL, "'%s': %s: unknown array element type %u", r->path,
		               r->ctx, elem);
	rc = rd_u64(r, &len, "the array length");
	if (rc)
		return rc;
	kv->arr_type = (enum lp_gguf_type)elem;
	esz = elem == LP_GGUF_STRING ? GGUF_STR_LEN_BYTES : type_size(elem);
	if (len > (r->size - r->pos) / esz)
		return lp_errf(r->err, -EINVAL,
		               "'%s': %s: array of %llu %s elements does not fit in the %zu bytes "
		               "left in the file",
		               r->path, r->ctx, (unsigned long long)len, type_name(elem),
		               r->size - r->pos);
	kv->arr_len = len;
	if (elem != LP_GGUF_STRING) {
		kv->arr_data = r->p + r->pos;
		r->pos += (size_t)len * esz;
		return 0;
	}
	if (len == 0)
		return 0;
	/* len <= file size / 8, so this allocation is bounded by 2x the file */
	kv->arr_strs = calloc((size_t)len, sizeof(*kv->arr_strs));
	if (!kv->arr_strs)
		return lp_errf(r->err, -ENOMEM, "'%s': %s: out of memory for %llu strings", r->path,
		               r->ctx, (unsigned long long)len);
	for (uint64_t i = 0; i < len; i++) {
		rc = rd_str(r, &kv->arr_strs[i], "an array string");
		if (rc)
			return rc;
	}
	return 0;
}

/* Reads one tensor info into t (name aside: *raw_name is the file's). The
 * file's dims go into t->shape reversed; a dim above INT64_MAX makes
 * nbytes larger than any file, which parse() then rejects. */
static int parse_tensor_info(struct rd *r, struct lp_fmt_tensor *t, struct lp_gguf_str *raw_name,
                             size_t idx, uint64_t *offset)
{
	char name[80];
	uint64_t block, bytes, ne = 1, dims[4];
	uint32_t n_dims, code;
	int rc;

	snprintf(r->ctx, sizeof(r->ctx), "tensor info %zu", idx);
	rc = rd_str(r, raw_name, "the tensor name");
	if (rc)
		return rc;
	snprintf(r->ctx, sizeof(r->ctx), "tensor '%s'", show(name, sizeof(name), raw_name));
	rc = rd_u32(r, &n_dims, "the dimension count");
	if (rc)
		return rc;
	if (n_dims < 1 || n_dims > 4)
		return lp_errf(r->err, -EINVAL, "'%s': %s: %u dimensions (must be 1 to 4)", r->path,
		               r->ctx, n_dims);
	for (uint32_t d = 0; d < n_dims; d++) {
		rc = rd_u64(r, &dims[d], "a dimension");
		if (rc)
			return rc;
		if (dims[d] == 0)
			return lp_errf(r->err, -EINVAL, "'%s': %s: dimension %u is 0", r->path,
			               r->ctx, d);
		if (dims[d] > UINT64_MAX / ne)
			return lp_errf(r->err, -EINVAL, "'%s': %s: element count overflows",
			               r->path, r->ctx);
		ne *= dims[d];
	}
	rc = rd_u32(r, &code, "the tensor type");
	if (rc)
		return rc;
	if (!ggml_type(code, &t->type))
		return lp_errf(r->err, -EINVAL, "'%s': %s: unknown ggml type %u", r->path, r->ctx,
		               code);
	block = lp_fmt_type_block(t->type);
	bytes = lp_fmt_type_size(t->type);
	if (dims[0] % block)
		return lp_errf(r->err, -EINVAL,
		               "'%s': %s: first dimension %llu is not a multiple of the %s block "
		               "size %llu",
		               r->path, r->ctx, (unsigned long long)dims[0],
		               lp_fmt_type_name(t->type), (unsigned long long)block);
	if (ne / block > UINT64_MAX / bytes)
		return lp_errf(r->err, -EINVAL, "'%s': %s: byte size overflows", r->path, r->ctx);
	t->n_dims = (int)n_dims;
	for (uint32_t d = 0; d < n_dims; d++)
		t->shape[n_dims - 1 - d] = (int64_t)dims[d];
	t->nbytes = (size_t)(ne / block * bytes);
	return rd_u64(r, offset, "the data offset");
}

/* Gives every tensor a NUL-terminated copy of its name, all in one block
 * (the names' total length is bounded by the file size). */
static int copy_names(struct lp_gguf *g, struct lp_err *err)
{
	size_t total = 0;
	char *p;

	for (size_t i = 0; i < g->n_tensors; i++)
		total += (size_t)g->tensor_names[i].len + 1;
	g->name_buf = malloc(total);
	if (!g->name_buf)
		return lp_errf(err, -ENOMEM, "'%s': out of memory", g->mf.path);
	p = g->name_buf;
	for (size_t i = 0; i < g->n_tensors; i++) {
		size_t len = (size_t)g->tensor_names[i].len;

		memcpy(p, g->tensor_names[i].s, len);
		p[len] = '\0';
		g->tensors[i].name = p;
		g->tensors[i].file = g->mf.path;
		p += len + 1;
	}
	return 0;
}

/* Checks the general.alignment entry, if any. */
static int read_alignment(struct lp_gguf *g, struct lp_err *err)
{
	const struct lp_gguf_kv *kv = lp_gguf_find(g, "general.alignment");
	long long shown;
	uint64_t a;

	g->alignment = GGUF_DEFAULT_ALIGNMENT;
	if (!kv)
		return 0;
	if (is_unsigned_type(kv->type)) {
		a = kv->v.u;
		shown = (long long)a;
	} else if (is_signed_type(kv->type)) {
		a = kv->v.i > 0 ? (uint64_t)kv->v.i : 0;
		shown = (long long)kv->v.i;
	} else {
		return lp_errf(err, -EINVAL,
		               "'%s': general.alignment has type %s (want an integer)", g->mf.path,
		               type_name(kv->type));
	}
	if (a == 0 || (a & (a - 1)) != 0)
		return lp_errf(err, -EINVAL,
		               "'%s': general.alignment %lld is not a positive power of two",
		               g->mf.path, shown);
	g->alignment = a;
	return 0;
}

static int cmp_by_offset(const void *a, const void *b)
{
	const struct lp_fmt_tensor *x = *(const struct lp_fmt_tensor *const *)a;
	const struct lp_fmt_tensor *y = *(const struct lp_fmt_tensor *const *)b;
	const unsigned char *px = x->data, *py = y->data;
	return px < py ? -1 : px > py;
}

/* Tensor data must not overlap: a writer lays tensors out one after the
 * other, and overlapping data means a corrupted offset. */
static int check_overlap(struct lp_gguf *g, struct lp_err *err)
{
	const struct lp_fmt_tensor **sorted;
	char n1[80], n2[80];
	int rc = 0;

	if (g->n_tensors < 2)
		return 0;
	sorted = malloc(g->n_tensors * sizeof(*sorted));
	if (!sorted)
		return lp_errf(err, -ENOMEM, "'%s': out of memory", g->mf.path);
	for (size_t i = 0; i < g->n_tensors; i++)
		sorted[i] = &g->tensors[i];
	qsort(sorted, g->n_tensors, sizeof(*sorted), cmp_by_offset);
	for (size_t i = 1; i < g->n_tensors; i++) {
		const unsigned char *prev_end =
		    (const unsigned char *)sorted[i - 1]->data + sorted[i - 1]->nbytes;
		if ((const unsigned char *)sorted[i]->data < prev_end) {
			rc = lp_errf(
			    err, -EINVAL, "'%s': tensors '%s' and '%s' overlap", g->mf.path,
			    show(n1, sizeof(n1), &g->tensor_names[sorted[i - 1] - g->tensors]),
			    show(n2, sizeof(n2), &g->tensor_names[sorted[i] - g->tensors]));
			break;
		}
	}
	free(sorted);
	return rc;
}

static int parse(struct lp_gguf *g, struct lp_err *err)
{
	struct rd r = {.p = g->mf.data, .size = g->mf.size, .path = g->mf.path, .err = err};
	uint64_t n_tensors, n_kv, *offsets = NULL;
	char name[80];
	size_t dup;
	int rc;

	if (g->mf.size < 4 || memcmp(g->mf.data, GGUF_MAGIC, 4) != 0)
		return lp_errf(err, -EINVAL, "'%s': not a gguf file (bad magic)", g->mf.path);
	r.pos = 4;
	rc = rd_u32(&r, &g->version, "the version");
	if (rc)
		return rc;
	if (g->version != 2 && g->version != 3)
		return lp_errf(err, -EINVAL, "'%s': unsupported gguf version %u (want 2 or 3)",
		               g->mf.path, g->version);
	rc = rd_u64(&r, &n_tensors, "the tensor count");
	if (rc)
		return rc;
	rc = rd_u64(&r, &n_kv, "the metadata count");
	if (rc)
		return rc;
	if (n_kv > (r.size - r.pos) / GGUF_MIN_KV_BYTES || n_kv > UINT32_MAX - 1)
		return lp_errf(err, -EINVAL,
		               "'%s': metadata count %llu is more than the file can hold",
		               g->mf.path, (unsigned long long)n_kv);
	if (n_tensors > (r.size - r.pos) / GGUF_MIN_TENSOR_BYTES || n_tensors > UINT32_MAX - 1)
		return lp_errf(err, -EINVAL,
		               "'%s': tensor count %llu is more than the file can hold", g->mf.path,
		               (unsigned long long)n_tensors);

	g->n_kv = (size_t)n_kv;
	if (n_kv) {
		g->kvs = calloc(g->n_kv, sizeof(*g->kvs));
		g->kv_index_size = index_size_for(g->n_kv);
		g->kv_index = calloc(g->kv_index_size, sizeof(*g->kv_index));
		if (!g->kvs || !g->kv_index)
			return lp_errf(err, -ENOMEM, "'%s': out of memory", g->mf.path);
	}
	for (size_t i = 0; i < g->n_kv; i++) {
		rc = parse_kv(&r, &g->kvs[i], i);
		if (rc)
			return rc;
		dup = index_insert(g->kv_index, g->kv_index_size, g->kvs, kv_name, i);
		if (dup != SIZE_MAX)
			return lp_errf(err, -EINVAL, "'%s': duplicate metadata key '%s'",
			               g->mf.path, show(name, sizeof(name), &g->kvs[i].key));
	}
	r.ctx[0] = '\0';
	rc = read_alignment(g, err);
	if (rc)
		return rc;

	if (n_tensors > (r.size - r.pos) / GGUF_MIN_TENSOR_BYTES)
		return lp_errf(err, -EINVAL,
		               "'%s': tensor count %llu is more than the file can hold", g->mf.path,
		               (unsigned long long)n_tensors);
	g->n_tensors = (size_t)n_tensors;
	if (!n_tensors)
		return 0;
	g->tensors = calloc(g->n_tensors, sizeof(*g->tensors));
	g->tensor_names = calloc(g->n_tensors, sizeof(*g->tensor_names));
	offsets = calloc(g->n_tensors, sizeof(*offsets));
	g->tensor_index_size = index_size_for(g->n_tensors);
	g->tensor_index = calloc(g->tensor_index_size, sizeof(*g->tensor_index));
	if (!g->tensors || !g->tensor_names || !offsets || !g->tensor_index) {
		rc = lp_errf(err, -ENOMEM, "'%s': out of memory", g->mf.path);
		goto out_free_offsets;
	}
	for (size_t i = 0; i < g->n_tensors; i++) {
		rc = parse_tensor_info(&r, &g->tensors[i], &g->tensor_names[i], i, &offsets[i]);
		if (rc)
			goto out_free_offsets;
		dup = index_insert(g->tensor_index, g->tensor_index_size, g->tensor_names,
		                   tensor_name, i);
		if (dup != SIZE_MAX) {
			rc = lp_errf(err, -EINVAL, "'%s': duplicate tensor name '%s'", g->mf.path,
			             show(name, sizeof(name), &g->tensor_names[i]));
			goto out_free_offsets;
		}
	}
	rc = copy_names(g, err);
	if (rc)
		goto out_free_offsets;

	/* r.pos <= size, and alignment is a power of two that may be huge */
	g->data_offset = ((uint64_t)r.pos + g->alignment - 1) & ~(g->alignment - 1);
	if (g->data_offset < r.pos || g->data_offset > r.size) {
		rc =
		    lp_errf(err, -EINVAL,
		            "'%s': data section (at byte %llu after alignment to %llu) starts past "
		            "the end of the file (size %zu)",
		            g->mf.path, (unsigned long long)g->data_offset,
		            (unsigned long long)g->alignment, r.size);
		goto out_free_offsets;
	}
	for (size_t i = 0; i < g->n_tensors; i++) {
		struct lp_fmt_tensor *t = &g->tensors[i];
		uint64_t avail = r.size - g->data_offset;

		if (offsets[i] % g->alignment) {
			rc = lp_errf(err, -EINVAL,
			             "'%s': tensor '%s' data offset %llu is not a multiple of the "
			             "alignment %llu",
			             g->mf.path, show(name, sizeof(name), &g->tensor_names[i]),
			             (unsigned long long)offsets[i],
			             (unsigned long long)g->alignment);
			goto out_free_offsets;
		}
		if (offsets[i] > avail || t->nbytes > avail - offsets[i]) {
			rc = lp_errf(
			    err, -EINVAL,
			    "'%s': tensor '%s' data (offset %llu, %llu bytes) runs past the "
			    "end of the file (size %zu)",
			    g->mf.path, show(name, sizeof(name), &g->tensor_names[i]),
			    (unsigned long long)offsets[i], (unsigned long long)t->nbytes, r.size);
			goto out_free_offsets;
		}
		t->data = g->mf.data + g->data_offset + offsets[i];
	}
	rc = check_overlap(g, err);
out_free_offsets:
	free(offsets);
	return rc;
}

int lp_gguf_open(struct lp_gguf **out, const char *path, struct lp_err *err)
{
	struct lp_gguf *g;
	int rc;

	*out = NULL;
	g = calloc(1, sizeof(*g));
	if (!g)
		return lp_errf(err, -ENOMEM, "'%s': out of memory", path);
	rc = lp_mapped_file_open(&g->mf, path, err);
	if (rc) {
		free(g);
		return rc;
	}
	rc = parse(g, err);
	if (rc) {
		lp_gguf_free(g);
		return rc;
	}
	*out = g;
	return 0;
}

void lp_gguf_free(struct lp_gguf *g)
{
	if (!g)
		return;
	for (size_t i = 0; i < g->n_kv; i++)
		free(g->kvs ? g->kvs[i].arr_strs : NULL);
	free(g->kvs);
	free(g->kv_index);
	free(g->tensors);
	free(g->tensor_names);
	free(g->name_buf);
	free(g->tensor_index);
	lp_mapped_file_release(&g->mf);
	free(g);
}

const char *lp_gguf_path(const struct lp_gguf *g)
{
	return g->mf.path;
}

uint32_t lp_gguf_version(const struct lp_gguf *g)
{
	return g->version;
}

size_t lp_gguf_kv_count(const struct lp_gguf *g)
{
	return g->n_kv;
}

const struct lp_gguf_kv *lp_gguf_kv_at(const struct lp_gguf *g, size_t i)
{
	return i < g->n_kv ? &g->kvs[i] : NULL;
}

const struct lp_gguf_kv *lp_gguf_find(const struct lp_gguf *g, const char *key)
{
	size_t i = index_find(g->kv_index, g->kv_index_size, g->kvs, kv_name, key, strlen(key));
	return i == SIZE_MAX ? NULL : &g->kvs[i];
}

size_t lp_gguf_tensor_count(const struct lp_gguf *g)
{
	return g->n_tensors;
}

const struct lp_fmt_tensor *lp_gguf_tensor_at(const struct lp_gguf *g, size_t i)
{
	return i < g->n_tensors ? &g->tensors[i] : NULL;
}

const struct lp_fmt_tensor *lp_gguf_find_tensor(const struct lp_gguf *g, const char *name)
{
	size_t i = index_find(g->tensor_index, g->tensor_index_size, g->tensor_names, tensor_name,
	                      name, strlen(name));
	return i == SIZE_MAX ? NULL : &g->tensors[i];
}

static int find_typed(const struct lp_gguf *g, const char *key, const struct lp_gguf_kv **kv,
                      struct lp_err *err)
{
	*kv = lp_gguf_find(g, key);
	if (!*kv)
		return lp_errf(err, -ENOENT, "'%s': metadata key '%s' not found", g->mf.path, key);
	return 0;
}

static int wrong_type(const struct lp_gguf *g, const char *key, const struct lp_gguf_kv *kv,
                      const char *want, struct lp_err *err)
{
	return lp_errf(err, -EINVAL, "'%s': metadata key '%s' has type %s, not %s", g->mf.path, key,
	               type_name(kv->type), want);
}

int lp_gguf_get_u32(const struct lp_gguf *g, const char *key, uint32_t *out, struct lp_err *err)
{
	const struct lp_gguf_kv *kv;
	int rc = find_typed(g, key, &kv, err);

	if (rc)
		return rc;
	if (is_unsigned_type(kv->type) && kv->v.u <= UINT32_MAX) {
		*out = (uint32_t)kv->v.u;
		return 0;
	}
	if (is_signed_type(kv->type) && kv->v.i >= 0 && kv->v.i <= (int64_t)UINT32_MAX) {
		*out = (uint32_t)kv->v.i;
		return 0;
	}
	if (is_unsigned_type(kv->type))
		return lp_errf(err, -EINVAL,
		               "'%s': metadata key '%s' value %llu is out of range "
		               "for u32",
		               g->mf.path, key, (unsigned long long)kv->v.u);
	if (is_signed_type(kv->type))
		return lp_errf(err, -EINVAL,
		               "'%s': metadata key '%s' value %lld is out of range for u32",
		               g->mf.path, key, (long long)kv->v.i);
	return wrong_type(g, key, kv, "an integer", err);
}

int lp_gguf_get_f32(const struct lp_gguf *g, const char *key, float *out, struct lp_err *err)
{
	const struct lp_gguf_kv *kv;
	int rc = find_typed(g, key, &kv, err);

	if (rc)
		return rc;
	if (is_float_type(kv->type))
		*out = (float)kv->v.f;
	else if (is_unsigned_type(kv->type))
		*out = (float)kv->v.u;
	else if (is_signed_type(kv->type))
		*out = (float)kv->v.i;
	else
		return wrong_type(g, key, kv, "a number", err);
	return 0;
}

int lp_gguf_get_bool(const struct lp_gguf *g, const char *key, bool *out, struct lp_err *err)
{
	const struct lp_gguf_kv *kv;
	int rc = find_typed(g, key, &kv, err);

	if (rc)
		return rc;
	if (kv->type != LP_GGUF_BOOL)
		return wrong_type(g, key, kv, "bool", err);
	*out = kv->v.u != 0;
	return 0;
}

int lp_gguf_get_str(const struct lp_gguf *g, const char *key, struct lp_gguf_str *out,
                    struct lp_err *err)
{
	const struct lp_gguf_kv *kv;
	int rc = find_typed(g, key, &kv, err);

	if (rc)
		return rc;
	if (kv->type != LP_GGUF_STRING)
		return wrong_type(g, key, kv, "string", err);
	*out = kv->str;
	return 0;
}

int lp_gguf_get_arr(const struct lp_gguf *g, const char *key, enum lp_gguf_type elem,
                    const struct lp_gguf_kv **out, struct lp_err *err)
{
	const struct lp_gguf_kv *kv;
	int rc = find_typed(g, key, &kv, err);

	if (rc)
		return rc;
	if (kv->type != LP_GGUF_ARRAY)
		return wrong_type(g, key, kv, "array", err);
	if (kv->arr_type != elem)
		return lp_errf(err, -EINVAL, "'%s': metadata key '%s' is an array of %s, not of %s",
		               g->mf.path, key, type_name(kv->arr_type), type_name(elem));
	*out = kv;
	return 0;
}

/* Element i of a fixed-size array decoded through a scratch kv. */
static struct lp_gguf_kv arr_elem(const struct lp_gguf_kv *kv, uint64_t i)
{
	struct lp_gguf_kv e = {0};
	size_t esz = type_size(kv->arr_type);

	if (esz && i < kv->arr_len)
		decode_scalar(&e, kv->arr_type, (const unsigned char *)kv->arr_data + i * esz);
	return e;
}

int32_t lp_gguf_arr_i32(const struct lp_gguf_kv *kv, uint64_t i)
{
	struct lp_gguf_kv e = arr_elem(kv, i);

	if (is_float_type(kv->arr_type)) {
		if (!(e.v.f > (double)INT32_MIN - 1.0 && e.v.f < (double)INT32_MAX + 1.0))
			return e.v.f > 0 ? INT32_MAX : INT32_MIN; /* NaN too */
		return (int32_t)e.v.f;
	}
	if (is_signed_type(kv->arr_type))
		return (int32_t)e.v.i;
	return (int32_t)e.v.u;
}

float lp_gguf_arr_f32(const struct lp_gguf_kv *kv, uint64_t i)
{
	struct lp_gguf_kv e = arr_elem(kv, i);

	if (is_float_type(kv->arr_type))
		return (float)e.v.f;
	if (is_signed_type(kv->arr_type))
		return (float)e.v.i;
	return (float)e.v.u;
}
