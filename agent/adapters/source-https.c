/* https:// sources: a directory of files, probed by the known adapter file
 * names (a web server gives no listing to rely on), or one .nemo file; in
 * model mode the known model file names, or one .gguf file (and plain
 * http:// where allowed).
 * Redirects are followed, never from https to http. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent/adapters/source-internal.h"

/* GETs dir + name into the download. *found is false on 404/410, the only
 * statuses that mean "try the next name"; other failures are errors. */
static int get_one(struct src_download *d, const char *dir, const char *name, bool *found,
                   struct lp_err *err)
{
	struct lp_http_result *res = malloc(sizeof(*res));
	struct lp_buf url;
	int rc;

	*found = false;
	if (!res)
		return lp_errf(err, -ENOMEM, "out of memory");
	lp_buf_init(&url, LP_SOURCE_URI_MAX + SRC_NAME_MAX * 3);
	if ((rc = lp_buf_appendf(&url, err, "%s", dir)) < 0 ||
	    (name && (rc = src_url_append(&url, name, true, err)) < 0))
		goto out;
	{
		const char *file = name;
		if (!file) { /* the url is the file: store it under its last segment */
			file = strrchr(dir, '/') + 1;
		}
		struct lp_http_get g = {.url = url.data, .follow_redirects = true};
		if ((rc = src_get_file(d, &g, file, 0, res, err)) < 0)
			goto out;
	}
	if (res->status >= 200 && res->status < 300) {
		*found = true;
	} else if (res->status != 404 && res->status != 410) {
		char detail[300];
		snprintf(detail, sizeof(detail), "%.200s", res->error_body);
		for (char *p = detail; *p; p++)
			if (*p == '\n' || *p == '\r')
				*p = ' ';
		rc = src_http_error(d, res->status, detail, err, "GET '%s' failed", url.data);
	} else {
		d->http_status = (int)res->status;
	}
out:
	lp_buf_release(&url);
	free(res);
	return rc;
}

/* The uri is one file (.nemo, or .gguf in model mode). */
static int get_single(struct src_download *d, const char *uri, struct lp_err *err)
{
	const char *base = strrchr(uri, '/') + 1;
	bool found;
	int rc;

	if (!src_name_ok(base))
		return lp_errf(err, -EINVAL, "'%.200s' does not end in a usable file name", uri);
	if ((rc = get_one(d, uri, NULL, &found, err)) < 0)
		return rc;
	if (!found)
		return lp_errf(err, -ENOENT, "'%.200s' does not exist (%d)", uri, d->http_status);
	return 0;
}

/* Model mode, a directory: config.json, the optional files, then
 * model.safetensors or the index and every shard it names. */
static int get_model_dir(struct src_download *d, const char *dir, struct lp_err *err)
{
	static const char index[] = "model.safetensors.index.json";
	char **shards = NULL;
	int n_shards = 0, rc;
	bool found;

	if ((rc = get_one(d, dir, "config.json", &found, err)) < 0)
		return rc;
	if (!found)
		return lp_errf(err, -ENOENT, "no model at '%.200s' (no config.json there)", dir);
	for (const char *const *e = src_model_extra_names; *e; e++)
		if (strcmp(*e, index) != 0 && (rc = get_one(d, dir, *e, &found, err)) < 0)
			return rc;
	if ((rc = get_one(d, dir, "model.safetensors", &found, err)) < 0 || found)
		goto out;
	if ((rc = get_one(d, dir, index, &found, err)) < 0)
		goto out;
	if (!found) {
		rc = lp_errf(err, -ENOENT,
		             "'%.200s' has config.json but neither model.safetensors nor %s", dir,
		             index);
		goto out;
	}
	if ((rc = src_model_index_shards(d, index, &shards, &n_shards, err)) < 0)
		goto out;
	for (int i = 0; i < n_shards && rc == 0; i++) {
		if ((rc = get_one(d, dir, shards[i], &found, err)) == 0 && !found)
			rc = lp_errf(err, -ENOENT, "'%.200s%s' is named by %s but does not exist",
			             dir, shards[i], index);
	}
out:
	if (rc == 0)
		d->http_status = 0; /* the 404s of optional files were no error */
	src_names_free(shards, n_shards);
	return rc;
}

int src_https_fetch(struct src_download *d, struct lp_err *err)
{
	const char *uri = d->u->url;
	char dir[LP_SOURCE_URI_MAX + 1];
	size_t n = strlen(uri);
	bool found;
	int rc;

	if (d->cache->model ? d->u->gguf : d->u->single_file)
		return get_single(d, uri, err);
	memcpy(dir, uri, n + 1);
	if (n == 0 || dir[n - 1] != '/') {
		dir[n] = '/';
		dir[n + 1] = '\0';
	}
	if (d->cache->model)
		return get_model_dir(d, dir, err);
	if ((rc = get_one(d, dir, "adapter_config.json", &found, err)) < 0)
		return rc;
	if (found) {
		if ((rc = get_one(d, dir, "adapter_model.safetensors", &found, err)) < 0)
			return rc;
		if (!found && (rc = get_one(d, dir, "adapter_model.bin", &found, err)) < 0)
			return rc;
		if (!found)
			return lp_errf(err, -ENOENT,
			               "'%.200s' has adapter_config.json but no "
			               "adapter_model.safetensors or adapter_model.bin",
			               dir);
		return 0;
	}
	if ((rc = get_one(d, dir, "model.lora_config.npy", &found, err)) < 0)
		return rc;
	if (!found)
		return lp_errf(err, -ENOENT,
		               "no adapter at '%.200s' (neither adapter_config.json nor "
		               "model.lora_config.npy exists there)",
		               dir);
	if ((rc = get_one(d, dir, "model.lora_weights.npy", &found, err)) < 0)
		return rc;
	if (!found)
		return lp_errf(err, -ENOENT,
		               "'%.200s' has model.lora_config.npy but no "
		               "model.lora_weights.npy",
		               dir);
	return 0;
}
