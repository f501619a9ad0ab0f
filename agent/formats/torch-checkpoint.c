/* PyTorch zip checkpoints without Python; see torch-checkpoint.h. The zip
 * container is zip.c's, the pickle machine pickle.c's; this file finds
 * <archive>/data.pkl, runs it and turns the dict it yields into tensors
 * over the zip entries their storages name. */
#include "agent/formats/torch-checkpoint.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent/formats/pickle.h"
#include "agent/formats/zip.h"
#include "common/mapped-file.h"

#define PKL_MAX_BYTES    (64u << 20)
#define CKPT_MAX_TENSORS 1000000u

struct lp_torch_ckpt {
	struct lp_mapped_file mf; /* when opened from a path */
	char *label;
	const unsigned char *bytes;
	size_t size;
	struct lp_zip zip;
	struct lp_fmt_tensor *tensors;
	size_t n_tensors;
};

/* Turns a LP_PICKLE_TENSOR node into a tensor over the zip entry its
 * storage names. */
static int make_tensor(struct lp_torch_ckpt *c, const struct lp_pickle *pk, uint32_t node,
                       const char *prefix, size_t plen, struct lp_fmt_tensor *t, struct lp_err *err)
{
	const struct lp_pickle_node *args = &pk->nodes[pk->nodes[node].i];
	const struct lp_pickle_node *st = &pk->nodes[args->kids[0]];
	const struct lp_pickle_node *size = &pk->nodes[args->kids[2]];
	const struct lp_pickle_node *stride = &pk->nodes[args->kids[3]];
	int64_t offset = pk->nodes[args->kids[1]].i;
	uint64_t numel = 1, expect = 1, esize;
	char ename[160];
	struct lp_zip_entry *e;
	int rc, w;

	t->type = (enum lp_fmt_type)st->dtype;
	t->n_dims = (int)size->len;
	t->file = c->label;
	esize = lp_fmt_type_size(t->type);
	for (int d = 0; d < t->n_dims; d++) {
		int64_t v = pk->nodes[size->kids[d]].i;
		if (v < 0 || v > (int64_t)1 << 40)
			return lp_errf(err, -EINVAL, "'%s': tensor '%s' has a bad size", c->label,
			               t->name);
		t->shape[d] = v;
		if (v && numel > UINT64_MAX / (uint64_t)v)
			return lp_errf(err, -EINVAL, "'%s': tensor '%s' is too large", c->label,
			               t->name);
		numel *= (uint64_t)v;
	}
	for (int d = t->n_dims - 1; d >= 0; d--) {
		int64_t sv = pk->nodes[stride->kids[d]].i;
		if (t->shape[d] != 1 && (uint64_t)sv != expect && numel)
			return lp_errf(
			    err, -EINVAL,
			    "'%s': tensor '%s' is not contiguous (stride %lld in dimension "
			    "%d, expected %llu); save it with .contiguous()",
			    c->label, t->name, (long long)sv, d, (unsigned long long)expect);
		expect *= (uint64_t)t->shape[d];
	}
	if (offset < 0 || (uint64_t)offset > (uint64_t)st->i || numel > (uint64_t)st->i - offset)
		return lp_errf(err, -EINVAL,
		               "'%s': tensor '%s' (offset %lld, %llu elements) lies outside its "
		               "storage of %lld elements",
		               c->label, t->name, (long long)offset, (unsigned long long)numel,
		               (long long)st->i);
	w = snprintf(ename, sizeof(ename), "%.*s/data/%.*s", (int)plen, prefix, (int)st->len,
	             st->s);
	if (w < 0 || (size_t)w >= sizeof(ename))
		return lp_errf(err, -EINVAL, "'%s': storage key too long", c->label);
	e = lp_zip_find(&c->zip, ename, (size_t)w);
	if (!e)
		return lp_errf(err, -EINVAL, "'%s': tensor '%s': storage '%s' is missing", c->label,
		               t->name, ename);
	if ((uint64_t)st->i > UINT64_MAX / esize || e->size < (uint64_t)st->i * esize)
		return lp_errf(err, -EINVAL,
		               "'%s': storage '%s' holds %llu bytes, %lld elements of %s need more",
		               c->label, ename, (unsigned long long)e->size, (long long)st->i,
		               lp_fmt_type_name(t->type));
	rc = lp_zip_verify(&c->zip, e, err);
	if (rc)
		return rc;
	t->data = e->data + (uint64_t)offset * esize;
	t->nbytes = (size_t)(numel * esize);
	return 0;
}

static int read_pickle(struct lp_torch_ckpt *c, struct lp_err *err)
{
	struct lp_zip_entry *pkl = NULL, *bo;
	struct lp_pickle pk;
	const struct lp_pickle_node *root;
	size_t plen = 0, n_items;
	char name[160];
	int rc;

	for (size_t i = 0; i < c->zip.n_entries; i++) {
		const struct lp_zip_entry *e = &c->zip.entries[i];
		const char *slash = memchr(e->name, '/', e->name_len);
		if (slash && (size_t)(slash - e->name) + 1 + 8 == e->name_len &&
		    memcmp(slash + 1, "data.pkl", 8) == 0) {
			if (pkl)
				return lp_errf(err, -EINVAL,
				               "'%s': more than one data.pkl in the archive",
				               c->label);
			pkl = &c->zip.entries[i];
			plen = (size_t)(slash - e->name);
		}
	}
	if (!pkl || plen > 100)
		return lp_errf(err, -EINVAL,
		               "'%s': not a pytorch checkpoint (no <archive>/data.pkl entry)",
		               c->label);
	snprintf(name, sizeof(name), "%.*s/byteorder", (int)plen, pkl->name);
	bo = lp_zip_find(&c->zip, name, strlen(name));
	if (bo && !(bo->size == 6 && memcmp(bo->data, "little", 6) == 0))
		return lp_errf(err, -EINVAL, "'%s': big-endian checkpoints are not supported",
		               c->label);
	if (pkl->size > PKL_MAX_BYTES)
		return lp_errf(err, -EINVAL, "'%s': data.pkl of %llu bytes is over the limit of %u",
		               c->label, (unsigned long long)pkl->size, PKL_MAX_BYTES);
	rc = lp_zip_verify(&c->zip, pkl, err);
	if (rc)
		return rc;

	rc = lp_pickle_read(&pk, pkl->data, (size_t)pkl->size, c->label, "data.pkl", err);
	if (rc)
		return rc;
	root = &pk.nodes[pk.root];
	if (root->kind != LP_PICKLE_DICT) {
		rc = lp_errf(err, -EINVAL, "'%s': data.pkl does not hold a dict of tensors",
		             c->label);
		goto out;
	}
	n_items = root->len / 2;
	if (n_items > CKPT_MAX_TENSORS) {
		rc =
		    lp_errf(err, -EINVAL, "'%s': %zu entries is over the limit", c->label, n_items);
		goto out;
	}
	c->tensors = calloc(n_items ? n_items : 1, sizeof(*c->tensors));
	if (!c->tensors) {
		rc = lp_errf(err, -ENOMEM, "'%s': out of memory", c->label);
		goto out;
	}
	for (size_t i = 0; i < n_items; i++) {
		const struct lp_pickle_node *k = &pk.nodes[root->kids[2 * i]];
		uint32_t v = root->kids[2 * i + 1];
		struct lp_fmt_tensor *t = &c->tensors[c->n_tensors];
		char *nm;

		if (k->kind != LP_PICKLE_STR || memchr(k->s, '\0', k->len)) {
			rc = lp_errf(err, -EINVAL, "'%s': a key of the state dict is not a string",
			             c->label);
			goto out;
		}
		if (pk.nodes[v].kind == LP_PICKLE_NONE)
			continue;
		if (pk.nodes[v].kind != LP_PICKLE_TENSOR) {
			rc = lp_errf(err, -EINVAL, "'%s': entry '%.*s' is not a tensor", c->label,
			             (int)(k->len > 200 ? 200 : k->len), k->s);
			goto out;
		}
		nm = malloc((size_t)k->len + 1);
		if (!nm) {
			rc = lp_errf(err, -ENOMEM, "'%s': out of memory", c->label);
			goto out;
		}
		memcpy(nm, k->s, k->len);
		nm[k->len] = '\0';
		t->name = nm;
		c->n_tensors++;
		rc = make_tensor(c, &pk, v, pkl->name, plen, t, err);
		if (rc)
			goto out;
	}
out:
	lp_pickle_release(&pk);
	return rc;
}

static int open_common(struct lp_torch_ckpt *c, struct lp_err *err)
{
	int rc;

	if (c->size >= 2 && c->bytes[0] == 0x80 && c->bytes[1] <= 5)
		return lp_errf(
		    err, -EINVAL,
		    "'%s': legacy (non-zip) torch checkpoints are not supported; re-save "
		    "it with torch 1.6 or later",
		    c->label);
	if (c->size < 4 || memcmp(c->bytes, "PK\x03\x04", 4) != 0)
		return lp_errf(err, -EINVAL,
		               "'%s': not a pytorch zip checkpoint (no zip signature)", c->label);
	rc = lp_zip_read(&c->zip, c->bytes, c->size, c->label, err);
	if (rc)
		return rc;
	return read_pickle(c, err);
}

int lp_torch_ckpt_open_mem(struct lp_torch_ckpt **out, const void *data, size_t size,
                           const char *label, struct lp_err *err)
{
	struct lp_torch_ckpt *c;
	int rc;

	*out = NULL;
	c = calloc(1, sizeof(*c));
	if (!c)
		return lp_errf(err, -ENOMEM, "out of memory");
	c->label = strdup(label);
	if (!c->label) {
		free(c);
		return lp_errf(err, -ENOMEM, "out of memory");
	}
	c->bytes = data;
	c->size = size;
	rc = open_common(c, err);
	if (rc) {
		lp_torch_ckpt_free(c);
		return rc;
	}
	*out = c;
	return 0;
}

int lp_torch_ckpt_open(struct lp_torch_ckpt **out, const char *path, struct lp_err *err)
{
	return lp_torch_ckpt_open_in(out, NULL, path, err);
}

int lp_torch_ckpt_open_in(struct lp_torch_ckpt **out, const char *root, const char *path,
                          struct lp_err *err)
{
	struct lp_torch_ckpt *c;
	int rc;

	*out = NULL;
	c = calloc(1, sizeof(*c));
	if (!c)
		return lp_errf(err, -ENOMEM, "out of memory");
	rc = lp_mapped_file_open_in(&c->mf, root, path, err);
	if (rc) {
		free(c);
		return rc;
	}
	c->label = strdup(path);
	if (!c->label) {
		lp_torch_ckpt_free(c);
		return lp_errf(err, -ENOMEM, "out of memory");
	}
	c->bytes = c->mf.data;
	c->size = c->mf.size;
	rc = open_common(c, err);
	if (rc) {
		lp_torch_ckpt_free(c);
		return rc;
	}
	*out = c;
	return 0;
}

void lp_torch_ckpt_free(struct lp_torch_ckpt *c)
{
	if (!c)
		return;
	for (size_t i = 0; i < c->n_tensors; i++)
		free((char *)c->tensors[i].name);
	free(c->tensors);
	lp_zip_release(&c->zip);
	free(c->label);
	lp_mapped_file_release(&c->mf);
	free(c);
}

size_t lp_torch_ckpt_count(const struct lp_torch_ckpt *c)
{
	return c->n_tensors;
}

const struct lp_fmt_tensor *lp_torch_ckpt_at(const struct lp_torch_ckpt *c, size_t i)
{
	return i < c->n_tensors ? &c->tensors[i] : NULL;
}

const char *lp_torch_ckpt_label(const struct lp_torch_ckpt *c)
{
	return c->label;
}
