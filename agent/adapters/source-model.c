/* Model mode of the sources (loraplane-agent fetch): which files make a
 * model, the shards a safetensors index names, and file:// models, which
 * are copied into the destination like a download. See source.h
 * (lp_source_fetch_model) and docs/model-fetch.md. */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include <jansson.h>

#include "agent/adapters/source-internal.h"

/* An index lists every tensor; a large model's is a few MiB. */
#define INDEX_MAX_BYTES (64u << 20)
/* .gguf names listed in the error for a directory holding several */
#define LIST_MAX 8

const char *const src_model_extra_names[] = {
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "model.safetensors.index.json",
    NULL,
};

static bool ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), k = strlen(suffix);
	return n > k && strcasecmp(s + n - k, suffix) == 0;
}

bool src_is_gguf(const char *name)
{
	return ends_with(name, ".gguf");
}

static bool is_extra(const char *name)
{
	for (const char *const *e = src_model_extra_names; *e; e++)
		if (strcmp(name, *e) == 0)
			return true;
	return false;
}

int src_model_pick(const char *const *names, int n, int *pick, int *n_pick, const char *what,
                   struct lp_err *err)
{
	int config = -1, safetensors = 0, gguf = 0, last_gguf = -1;
	char list[600] = "";
	size_t used = 0;

	*n_pick = 0;
	for (int i = 0; i < n; i++) {
		if (strcmp(names[i], "config.json") == 0)
			config = i;
		else if (ends_with(names[i], ".safetensors"))
			safetensors++;
		else if (src_is_gguf(names[i])) {
			if (gguf < LIST_MAX && used < sizeof(list))
				used += (size_t)snprintf(list + used, sizeof(list) - used,
				                         "%s'%.60s'", gguf ? ", " : "", names[i]);
			gguf++;
			last_gguf = i;
		}
	}
	if (config >= 0 && safetensors > 0) {
		for (int i = 0; i < n; i++)
			if (i == config || ends_with(names[i], ".safetensors") ||
			    is_extra(names[i]))
				pick[(*n_pick)++] = i;
		return 0;
	}
	if (gguf == 1) {
		pick[(*n_pick)++] = last_gguf;
		return 0;
	}
	if (gguf > 1)
		return lp_errf(err, -EINVAL,
		               "%s holds %d .gguf files (%s%s) and no config.json with safetensors "
		               "weights; name one of them in the uri",
		               what, gguf, list, gguf > LIST_MAX ? ", ..." : "");
	if (config >= 0)
		return lp_errf(err, -ENOENT, "%s has config.json but no .safetensors weights",
		               what);
	return lp_errf(err, -ENOENT,
	               "%s holds no model (config.json with .safetensors weights, or a .gguf "
	               "file)",
	               what);
}

void src_names_free(char **names, int n)
{
	for (int i = 0; i < n; i++)
		free(names[i]);
	free(names);
}

int src_model_index_shards(struct src_download *d, const char *index_name, char ***names, int *n,
                           struct lp_err *err)
{
	char path[PATH_MAX];
	struct lp_buf text;
	json_t *root = NULL, *map, *v;
	const char *key;
	char **out = NULL;
	int k = 0, rc = 0;

	*names = NULL;
	*n = 0;
	lp_buf_init(&text, INDEX_MAX_BYTES);
	if ((size_t)snprintf(path, sizeof(path), "%s/%s", d->dir, index_name) >= sizeof(path)) {
		rc = lp_errf(err, -ENAMETOOLONG, "index path is too long");
		goto out;
	}
	if ((rc = lp_buf_read_file_in(&text, d->dir, path, INDEX_MAX_BYTES, err)) < 0)
		goto out;
	root = json_loadb(text.data ? text.data : "", text.len, 0, NULL);
	map = json_object_get(root, "weight_map");
	if (!json_is_object(map) || json_object_size(map) == 0) {
		rc = lp_errf(err, -EINVAL, "'%s' has no weight_map object", index_name);
		goto out;
	}
	if (!(out = calloc(json_object_size(map), sizeof(*out)))) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	json_object_foreach(map, key, v)
	{
		const char *s = json_string_value(v);
		bool seen = false;
		if (!s || !src_name_ok(s) || strchr(s, '/') || !ends_with(s, ".safetensors")) {
			rc = lp_errf(err, -EINVAL,
			             "'%s' maps a tensor to '%.200s', which is not a .safetensors "
			             "file beside it",
			             index_name, s ? s : "(not a string)");
			goto out;
		}
		for (int i = 0; i < k && !seen; i++)
			seen = strcmp(out[i], s) == 0;
		if (seen)
			continue;
		if (!(out[k] = strdup(s))) {
			rc = lp_errf(err, -ENOMEM, "out of memory");
			goto out;
		}
		k++;
	}
	*names = out;
	*n = k;
	out = NULL;
out:
	if (out)
		src_names_free(out, k);
	json_decref(root);
	lp_buf_release(&text);
	return rc;
}

/* The regular files (links followed, as in a Hugging Face cache snapshot)
 * at the top of dir, skipping hidden ones. */
static int list_dir(const char *dir, char ***names, int *n, int max, struct lp_err *err)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	char **out = NULL, **grown;
	int k = 0, rc = 0;

	*names = NULL;
	*n = 0;
	if (!d) {
		int e = errno;
		return lp_errf(err, e == ENOENT ? -ENOENT : -EIO, "cannot read '%.200s': %s", dir,
		               strerror(e));
	}
	while ((e = readdir(d))) {
		char path[PATH_MAX];
		struct stat st;
		if (e->d_name[0] == '.' ||
		    (size_t)snprintf(path, sizeof(path), "%s/%s", dir, e->d_name) >= sizeof(path) ||
		    stat(path, &st) < 0 || !S_ISREG(st.st_mode))
			continue;
		/* a directory of many files is no model; stop counting early */
		if (k >= max + 64) {
			rc = lp_errf(err, -EFBIG, "'%.200s' holds more than %d files", dir,
			             max + 64);
			goto out;
		}
		if (!(grown = realloc(out, (size_t)(k + 1) * sizeof(*out))) ||
		    !(grown[k] = strdup(e->d_name))) {
			if (grown)
				out = grown;
			rc = lp_errf(err, -ENOMEM, "out of memory");
			goto out;
		}
		out = grown;
		k++;
	}
out:
	closedir(d);
	if (rc < 0) {
		src_names_free(out, k);
		return rc;
	}
	*names = out;
	*n = k;
	return 0;
}

int src_file_model_fetch(struct src_download *d, struct lp_err *err)
{
	const char *path = d->u->path;
	char **names = NULL, src[PATH_MAX];
	int *pick = NULL, n = 0, n_pick = 0, rc;
	struct stat st;

	if (stat(path, &st) < 0) {
		int e = errno;
		if (e == ENOENT || e == ENOTDIR)
			return lp_errf(err, -ENOENT, "'%.200s' does not exist", path);
		return lp_errf(err, e == EACCES ? -EACCES : -EIO, "cannot stat '%.200s': %s", path,
		               strerror(e));
	}
	if (S_ISREG(st.st_mode)) {
		const char *base = strrchr(path, '/') + 1;
		if (!src_is_gguf(base))
			return lp_errf(
			    err, -EINVAL,
			    "'%.200s' is a file but not a .gguf model; give a .gguf file "
			    "or a model directory",
			    path);
		d->announced = (uint64_t)st.st_size;
		return src_copy_file(d, path, base, err);
	}
	if (!S_ISDIR(st.st_mode))
		return lp_errf(err, -EINVAL, "'%.200s' is neither a directory nor a file", path);
	if ((rc = list_dir(path, &names, &n, d->cache->max_files, err)) < 0)
		return rc;
	if (n > 0 && !(pick = calloc((size_t)n, sizeof(*pick)))) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	{
		char what[256];
		snprintf(what, sizeof(what), "'%.200s'", path);
		if ((rc = src_model_pick((const char *const *)names, n, pick, &n_pick, what, err)) <
		    0)
			goto out;
	}
	for (int pass = 0; pass < 2 && rc == 0; pass++) {
		/* the first pass only adds up the sizes, for progress */
		for (int i = 0; i < n_pick && rc == 0; i++) {
			if ((size_t)snprintf(src, sizeof(src), "%s/%s", path, names[pick[i]]) >=
			    sizeof(src)) {
				rc = lp_errf(err, -ENAMETOOLONG, "path of '%.200s' is too long",
				             names[pick[i]]);
			} else if (pass == 1) {
				rc = src_copy_file(d, src, names[pick[i]], err);
			} else if (stat(src, &st) == 0) {
				d->announced += (uint64_t)st.st_size;
			}
		}
	}
out:
	free(pick);
	src_names_free(names, n);
	return rc;
}
