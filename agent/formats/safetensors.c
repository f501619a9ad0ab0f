/* safetensors reader: maps each file, checks its JSON header against the
 * file, and collects the tensors of one file or of every shard of a model
 * directory into one set; see safetensors.h.
 *
 * File layout: u64 little-endian header length N, N bytes of JSON
 *   {"name": {"dtype": "F16", "shape": [..], "data_offsets": [begin, end]},
 *    "__metadata__": {...}}
 * then the data section; offsets are relative to its first byte. */
#include "agent/formats/safetensors.h"

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/mapped-file.h"

/* The header is JSON parsed into memory: cap it before anything else. */
#define ST_MAX_HEADER_BYTES 100000000ull
#define ST_MAX_INDEX_BYTES  (64u << 20)
#define ST_INDEX_NAME       "model.safetensors.index.json"
#define ST_SINGLE_NAME      "model.safetensors"

struct lp_safetensors {
	size_t n_files;
	struct lp_mapped_file *files; /* n_files; each path is stable */
	size_t n;
	size_t cap;
	struct lp_fmt_tensor *tensors; /* n; names strdup'd */
	uint64_t *begins;              /* n; data offset of each, for sorting */
	uint32_t *index;               /* open addressing, index + 1, 0 = empty */
	size_t index_size;
};

/* The dtypes a safetensors header may name (all plain types). */
static const enum lp_fmt_type dtypes[] = {
    LP_FMT_F64, LP_FMT_F32, LP_FMT_F16, LP_FMT_BF16, LP_FMT_I64,
    LP_FMT_I32, LP_FMT_I16, LP_FMT_I8,  LP_FMT_U8,   LP_FMT_BOOL,
};

static int dtype_from_name(const char *s, enum lp_fmt_type *out)
{
	for (size_t i = 0; i < sizeof(dtypes) / sizeof(dtypes[0]); i++) {
		if (strcmp(s, lp_fmt_type_name(dtypes[i])) == 0) {
			*out = dtypes[i];
			return 0;
		}
	}
	return -1;
}

static uint64_t hash_name(const char *s)
{
	uint64_t h = 1469598103934665603ull; /* FNV-1a */
	for (; *s; s++) {
		h ^= (unsigned char)*s;
		h *= 1099511628211ull;
	}
	return h;
}

static void set_free(struct lp_safetensors *st)
{
	if (!st)
		return;
	for (size_t i = 0; i < st->n; i++)
		free((char *)st->tensors[i].name);
	free(st->tensors);
	free(st->begins);
	free(st->index);
	for (size_t i = 0; i < st->n_files; i++)
		lp_mapped_file_release(&st->files[i]);
	free(st->files);
	free(st);
}

void lp_safetensors_free(struct lp_safetensors *st)
{
	set_free(st);
}

static int grow_tensors(struct lp_safetensors *st, size_t extra, struct lp_err *err)
{
	struct lp_fmt_tensor *t;
	uint64_t *b;
	size_t cap = st->cap ? st->cap : 64;

	if (st->n + extra <= st->cap)
		return 0;
	while (cap < st->n + extra)
		cap *= 2;
	t = realloc(st->tensors, cap * sizeof(*t));
	if (!t)
		return lp_errf(err, -ENOMEM, "out of memory for %zu tensors", cap);
	st->tensors = t;
	b = realloc(st->begins, cap * sizeof(*b));
	if (!b)
		return lp_errf(err, -ENOMEM, "out of memory for %zu tensors", cap);
	st->begins = b;
	st->cap = cap;
	return 0;
}

/* Reads a non-negative JSON integer. */
static bool json_nonneg(const json_t *v, uint64_t *out)
{
	json_int_t i;

	if (!json_is_integer(v))
		return false;
	i = json_integer_value(v);
	if (i < 0)
		return false;
	*out = (uint64_t)i;
	return true;
}

/* Checks one header entry and fills t (except name and file). */
static int parse_entry(const char *path, const char *name, json_t *e, uint64_t data_size,
                       struct lp_fmt_tensor *t, uint64_t *begin_out, struct lp_err *err)
{
	json_t *dtype, *shape, *offs, *v;
	uint64_t numel = 1, begin, end, dim, nbytes;
	size_t i;

	if (!json_is_object(e))
		return lp_errf(err, -EINVAL, "'%s': tensor '%s': entry is not an object", path,
		               name);
	dtype = json_object_get(e, "dtype");
	shape = json_object_get(e, "shape");
	offs = json_object_get(e, "data_offsets");
	if (!json_is_string(dtype))
		return lp_errf(err, -EINVAL, "'%s': tensor '%s': missing or non-string 'dtype'",
		               path, name);
	if (dtype_from_name(json_string_value(dtype), &t->type) != 0)
		return lp_errf(err, -EINVAL, "'%s': tensor '%s': unknown dtype '%.32s'", path, name,
		               json_string_value(dtype));
	if (!json_is_array(shape))
		return lp_errf(err, -EINVAL, "'%s': tensor '%s': missing or non-array 'shape'",
		               path, name);
	if (json_array_size(shape) > LP_FMT_MAX_DIMS)
		return lp_errf(err, -EINVAL, "'%s': tensor '%s': %zu dimensions (at most %d)", path,
		               name, json_array_size(shape), LP_FMT_MAX_DIMS);
	t->n_dims = (int)json_array_size(shape);
	json_array_foreach(shape, i, v)
	{
		if (!json_nonneg(v, &dim))
			return lp_errf(err, -EINVAL,
			               "'%s': tensor '%s': dimension %zu is not a non-negative "
			               "integer",
			               path, name, i);
		t->shape[i] = (int64_t)dim;
		if (dim && numel > UINT64_MAX / dim)
			return lp_errf(err, -EINVAL, "'%s': tensor '%s': element count overflows",
			               path, name);
		numel *= dim;
	}
	for (i = (size_t)t->n_dims; i < LP_FMT_MAX_DIMS; i++)
		t->shape[i] = 0;
	if (!json_is_array(offs) || json_array_size(offs) != 2 ||
	    !json_nonneg(json_array_get(offs, 0), &begin) ||
	    !json_nonneg(json_array_get(offs, 1), &end))
		return lp_errf(err, -EINVAL,
		               "'%s': tensor '%s': 'data_offsets' is not two non-negative integers",
		               path, name);
	if (begin > end)
		return lp_errf(err, -EINVAL,
		               "'%s': tensor '%s': data_offsets [%llu, %llu] end before they begin",
		               path, name, (unsigned long long)begin, (unsigned long long)end);
	if (numel > UINT64_MAX / lp_fmt_type_size(t->type))
		return lp_errf(err, -EINVAL, "'%s': tensor '%s': byte size overflows", path, name);
	nbytes = numel * lp_fmt_type_size(t->type);
	if (end - begin != nbytes)
		return lp_errf(err, -EINVAL,
		               "'%s': tensor '%s': data_offsets [%llu, %llu] hold %llu bytes but "
		               "%llu elements of %s need %llu",
		               path, name, (unsigned long long)begin, (unsigned long long)end,
		               (unsigned long long)(end - begin), (unsigned long long)numel,
		               lp_fmt_type_name(t->type), (unsigned long long)nbytes);
	if (end > data_size)
		return lp_errf(err, -EINVAL,
		               "'%s': tensor '%s': data_offsets [%llu, %llu] run past the end of "
		               "the data (%llu bytes)",
		               path, name, (unsigned long long)begin, (unsigned long long)end,
		               (unsigned long long)data_size);
	t->nbytes = (size_t)nbytes;
	*begin_out = begin;
	return 0;
}

struct span {
	uint64_t begin, end;
	size_t idx;
};

static int cmp_span(const void *a, const void *b)
{
	const struct span *x = a, *y = b;
	if (x->begin != y->begin)
		return x->begin < y->begin ? -1 : 1;
	return x->end < y->end ? -1 : x->end > y->end;
}

/* Tensors [first, st->n) come from one file: none may overlap another
 * (empty tensors hold no bytes and overlap nothing). */
static int check_overlap(struct lp_safetensors *st, size_t first, const char *path,
                         struct lp_err *err)
{
	size_t n = st->n - first, m = 0;
	struct span *spans;
	int rc = 0;

	if (n < 2)
		return 0;
	spans = malloc(n * sizeof(*spans));
	if (!spans)
		return lp_errf(err, -ENOMEM, "'%s': out of memory", path);
	for (size_t i = first; i < st->n; i++) {
		if (!st->tensors[i].nbytes)
			continue;
		spans[m].begin = st->begins[i];
		spans[m].end = st->begins[i] + st->tensors[i].nbytes;
		spans[m].idx = i;
		m++;
	}
	qsort(spans, m, sizeof(*spans), cmp_span);
	for (size_t i = 1; i < m; i++) {
		if (spans[i - 1].end > spans[i].begin) {
			rc = lp_errf(err, -EINVAL, "'%s': tensors '%s' and '%s' overlap", path,
			             st->tensors[spans[i - 1].idx].name,
			             st->tensors[spans[i].idx].name);
			break;
		}
	}
	free(spans);
	return rc;
}

/* Maps path (below base unless base is NULL) and appends its tensors to st. */
static int add_file(struct lp_safetensors *st, const char *base, const char *path,
                    struct lp_err *err)
{
	struct lp_mapped_file *mf, *files;
	json_error_t jerr;
	json_t *root = NULL, *e;
	const char *name, *fpath;
	uint64_t hlen, data_size;
	size_t first = st->n;
	int rc;

	files = realloc(st->files, (st->n_files + 1) * sizeof(*files));
	if (!files)
		return lp_errf(err, -ENOMEM, "out of memory");
	st->files = files;
	mf = &st->files[st->n_files];
	rc = lp_mapped_file_open_in(mf, base, path, err);
	if (rc)
		return rc;
	st->n_files++;
	fpath = mf->path;

	if (mf->size < 8)
		return lp_errf(err, -EINVAL,
		               "'%s': file of %zu bytes is too small for a safetensors header",
		               fpath, mf->size);
	hlen = 0;
	for (int i = 7; i >= 0; i--)
		hlen = (hlen << 8) | mf->data[i];
	if (hlen > ST_MAX_HEADER_BYTES)
		return lp_errf(err, -EINVAL,
		               "'%s': header length %llu is over the limit of %llu bytes", fpath,
		               (unsigned long long)hlen, ST_MAX_HEADER_BYTES);
	if (hlen > mf->size - 8)
		return lp_errf(err, -EINVAL,
		               "'%s': header length %llu runs past the end of the file (size %zu)",
		               fpath, (unsigned long long)hlen, mf->size);
	data_size = mf->size - 8 - hlen;

	root = json_loadb((const char *)mf->data + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
	if (!root)
		return lp_errf(err, -EINVAL,
		               "'%s': header is not valid json: %s (line %d column %d)", fpath,
		               jerr.text, jerr.line, jerr.column);
	if (!json_is_object(root)) {
		rc = lp_errf(err, -EINVAL, "'%s': header is not a json object", fpath);
		goto out_decref;
	}
	rc = grow_tensors(st, json_object_size(root), err);
	if (rc) {
		lp_err_prefix(err, "'%s'", fpath);
		goto out_decref;
	}
	json_object_foreach(root, name, e)
	{
		struct lp_fmt_tensor *t = &st->tensors[st->n];

		if (strcmp(name, "__metadata__") == 0)
			continue;
		memset(t, 0, sizeof(*t));
		rc = parse_entry(fpath, name, e, data_size, t, &st->begins[st->n], err);
		if (rc)
			goto out_decref;
		t->name = strdup(name);
		if (!t->name) {
			rc = lp_errf(err, -ENOMEM, "'%s': out of memory", fpath);
			goto out_decref;
		}
		t->data = mf->data + 8 + hlen + st->begins[st->n];
		t->file = fpath;
		st->n++;
	}
	rc = check_overlap(st, first, fpath, err);
out_decref:
	json_decref(root);
	return rc;
}

/* Builds the name index; a name held twice (in two shards) is an error. */
static int build_index(struct lp_safetensors *st, struct lp_err *err)
{
	size_t size = 16, mask;

	if (st->n > UINT32_MAX / 4)
		return lp_errf(err, -EINVAL, "too many tensors (%zu)", st->n);
	while (size < 2 * st->n)
		size *= 2;
	st->index = calloc(size, sizeof(*st->index));
	if (!st->index)
		return lp_errf(err, -ENOMEM, "out of memory");
	st->index_size = size;
	mask = size - 1;
	for (size_t i = 0; i < st->n; i++) {
		size_t h = (size_t)hash_name(st->tensors[i].name) & mask;
		while (st->index[h]) {
			const struct lp_fmt_tensor *o = &st->tensors[st->index[h] - 1];
			if (strcmp(o->name, st->tensors[i].name) == 0)
				return lp_errf(err, -EINVAL, "tensor '%s' is in both '%s' and '%s'",
				               o->name, o->file, st->tensors[i].file);
			h = (h + 1) & mask;
		}
		st->index[h] = (uint32_t)(i + 1);
	}
	return 0;
}

int lp_safetensors_open_file(struct lp_safetensors **out, const char *path, struct lp_err *err)
{
	return lp_safetensors_open_file_in(out, NULL, path, err);
}

int lp_safetensors_open_file_in(struct lp_safetensors **out, const char *root, const char *path,
                                struct lp_err *err)
{
	struct lp_safetensors *st;
	int rc;

	*out = NULL;
	st = calloc(1, sizeof(*st));
	if (!st)
		return lp_errf(err, -ENOMEM, "out of memory");
	rc = add_file(st, root, path, err);
	if (!rc)
		rc = build_index(st, err);
	if (rc) {
		set_free(st);
		return rc;
	}
	*out = st;
	return 0;
}

static char *join_path(const char *dir, const char *name)
{
	size_t a = strlen(dir), b = strlen(name);
	char *p = malloc(a + b + 2);

	if (!p)
		return NULL;
	memcpy(p, dir, a);
	p[a] = '/';
	memcpy(p + a + 1, name, b + 1);
	return p;
}

static bool is_regular(const char *path)
{
	struct stat sb;
	return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

static bool path_exists(const char *path)
{
	struct stat sb;
	return stat(path, &sb) == 0;
}

/* A shard named in an index must be a plain file name inside the directory. */
static bool plain_file_name(const char *s)
{
	return s[0] != '\0' && !strchr(s, '/') && !strstr(s, "..") && strcmp(s, ".") != 0;
}

struct index_entry {
	const char *tensor; /* borrowed from the json */
	const char *shard;
	size_t file; /* index into st->files once opened */
};

static int cmp_shard(const void *a, const void *b)
{
	return strcmp(((const struct index_entry *)a)->shard,
	              ((const struct index_entry *)b)->shard);
}

static int open_index(struct lp_safetensors *st, const char *dir, const char *index_path,
                      struct lp_err *err)
{
	struct lp_mapped_file mf;
	struct index_entry *entries = NULL;
	json_error_t jerr;
	json_t *root = NULL, *map, *v;
	const char *key;
	size_t n = 0;
	int rc;

	rc = lp_mapped_file_open(&mf, index_path, err);
	if (rc)
		return rc;
	if (mf.size > ST_MAX_INDEX_BYTES) {
		rc = lp_errf(err, -EINVAL, "'%s': index of %zu bytes is over the limit of %u",
		             index_path, mf.size, ST_MAX_INDEX_BYTES);
		goto out_release;
	}
	root = json_loadb((const char *)mf.data, mf.size, JSON_REJECT_DUPLICATES, &jerr);
	if (!root) {
		rc = lp_errf(err, -EINVAL, "'%s': not valid json: %s (line %d column %d)",
		             index_path, jerr.text, jerr.line, jerr.column);
		goto out_release;
	}
	map = json_object_get(root, "weight_map");
	if (!json_is_object(map)) {
		rc = lp_errf(err, -EINVAL, "'%s': missing or non-object 'weight_map'", index_path);
		goto out_decref;
	}
	if (json_object_size(map) == 0) {
		rc = lp_errf(err, -EINVAL, "'%s': 'weight_map' is empty", index_path);
		goto out_decref;
	}
	entries = calloc(json_object_size(map), sizeof(*entries));
	if (!entries) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out_decref;
	}
	json_object_foreach(map, key, v)
	{
		if (!json_is_string(v)) {
			rc = lp_errf(err, -EINVAL, "'%s': shard of tensor '%s' is not a string",
			             index_path, key);
			goto out_free;
		}
		if (!plain_file_name(json_string_value(v))) {
			rc = lp_errf(err, -EINVAL,
			             "'%s': shard '%.200s' of tensor '%s' is not a plain file name",
			             index_path, json_string_value(v), key);
			goto out_free;
		}
		entries[n].tensor = key;
		entries[n].shard = json_string_value(v);
		n++;
	}
	qsort(entries, n, sizeof(*entries), cmp_shard);
	for (size_t i = 0; i < n; i++) {
		char *path;

		if (i > 0 && strcmp(entries[i].shard, entries[i - 1].shard) == 0) {
			entries[i].file = entries[i - 1].file;
			continue;
		}
		path = join_path(dir, entries[i].shard);
		if (!path) {
			rc = lp_errf(err, -ENOMEM, "out of memory");
			goto out_free;
		}
		rc = add_file(st, NULL, path, err);
		free(path);
		if (rc) {
			lp_err_prefix(err, "'%s'", index_path);
			goto out_free;
		}
		entries[i].file = st->n_files - 1;
	}
	rc = build_index(st, err);
	if (rc)
		goto out_free;
	for (size_t i = 0; i < n; i++) {
		const struct lp_fmt_tensor *t = lp_safetensors_find(st, entries[i].tensor);
		const char *shard_path = st->files[entries[i].file].path;

		if (!t || t->file != shard_path) {
			rc = lp_errf(err, -EINVAL, "'%s': tensor '%s' is not in its shard '%s'",
			             index_path, entries[i].tensor, shard_path);
			goto out_free;
		}
	}
	rc = 0;
out_free:
	free(entries);
out_decref:
	json_decref(root);
out_release:
	lp_mapped_file_release(&mf);
	return rc;
}

/* The only *.safetensors file in dir, as a joined path in *out. */
static int find_single(const char *dir, char **out, struct lp_err *err)
{
	DIR *d = opendir(dir);
	struct dirent *de;
	char *found = NULL;
	size_t count = 0;
	int rc = 0;

	*out = NULL;
	if (!d)
		return lp_errf(err, -errno, "cannot open directory '%s': %s", dir, strerror(errno));
	while ((de = readdir(d)) != NULL) {
		size_t len = strlen(de->d_name);
		char *path;

		if (len <= 12 || strcmp(de->d_name + len - 12, ".safetensors") != 0)
			continue;
		path = join_path(dir, de->d_name);
		if (!path) {
			rc = lp_errf(err, -ENOMEM, "out of memory");
			break;
		}
		if (!is_regular(path)) {
			free(path);
			continue;
		}
		count++;
		if (!found)
			found = path;
		else
			free(path);
	}
	closedir(d);
	if (rc) {
		free(found);
		return rc;
	}
	if (count == 0)
		return lp_errf(err, -ENOENT, "no .safetensors file in '%s'", dir);
	if (count > 1) {
		free(found);
		return lp_errf(err, -EINVAL,
		               "'%s' has %zu .safetensors files and no " ST_INDEX_NAME
		               " to say which to use",
		               dir, count);
	}
	*out = found;
	return 0;
}

int lp_safetensors_open_dir(struct lp_safetensors **out, const char *dir, struct lp_err *err)
{
	struct lp_safetensors *st;
	char *index_path, *single = NULL;
	int rc;

	*out = NULL;
	st = calloc(1, sizeof(*st));
	index_path = join_path(dir, ST_INDEX_NAME);
	if (!st || !index_path) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out_free;
	}
	if (path_exists(index_path)) {
		rc = open_index(st, dir, index_path, err);
		goto out_free;
	}
	single = join_path(dir, ST_SINGLE_NAME);
	if (!single) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out_free;
	}
	if (!path_exists(single)) {
		free(single);
		rc = find_single(dir, &single, err);
		if (rc)
			goto out_free;
	}
	rc = add_file(st, NULL, single, err);
	if (!rc)
		rc = build_index(st, err);
out_free:
	free(single);
	free(index_path);
	if (rc) {
		set_free(st);
		return rc;
	}
	*out = st;
	return 0;
}

size_t lp_safetensors_count(const struct lp_safetensors *st)
{
	return st->n;
}

const struct lp_fmt_tensor *lp_safetensors_at(const struct lp_safetensors *st, size_t i)
{
	return i < st->n ? &st->tensors[i] : NULL;
}

const struct lp_fmt_tensor *lp_safetensors_find(const struct lp_safetensors *st, const char *name)
{
	size_t mask, h;

	if (!st->index)
		return NULL;
	mask = st->index_size - 1;
	h = (size_t)hash_name(name) & mask;
	while (st->index[h]) {
		const struct lp_fmt_tensor *t = &st->tensors[st->index[h] - 1];
		if (strcmp(t->name, name) == 0)
			return t;
		h = (h + 1) & mask;
	}
	return NULL;
}
