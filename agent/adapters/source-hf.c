/* hf://org/repo[@revision] sources: the repo's file list from
 * {endpoint}/api/models/{repo}/revision/{rev} (siblings[].rfilename), then
 * the adapter files (in model mode the model files, or the one file the
 * uri names, without a listing) from {endpoint}/{repo}/resolve/{rev}/{file}, following
 * redirects (the hub sends large files to a CDN). HF_TOKEN goes in an
 * Authorization header; curl drops it when a redirect leaves the host. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "agent/adapters/source-internal.h"

#define API_BODY_MAX (8u << 20)

/* The hub answers errors as {"error": "..."} and in X-Error-Message. */
static void hf_error_detail(const struct lp_http_result *res, char *out, size_t cap)
{
	json_t *j;
	const char *e;

	if (res->error_header[0]) {
		snprintf(out, cap, "%s", res->error_header);
		return;
	}
	j = json_loads(res->error_body, 0, NULL);
	e = json_string_value(json_object_get(j, "error"));
	snprintf(out, cap, "%.300s", e ? e : res->error_body);
	json_decref(j);
}

struct hf_pick {
	const char *name;
	uint64_t size; /* 0 when the listing gives none */
};

static bool has(json_t *siblings, const char *name, uint64_t *size)
{
	size_t i;
	json_t *s;

	json_array_foreach(siblings, i, s)
	{
		const char *n = json_string_value(json_object_get(s, "rfilename"));
		if (n && strcmp(n, name) == 0) {
			json_t *sz = json_object_get(s, "size");
			*size = json_is_integer(sz) && json_integer_value(sz) > 0
			            ? (uint64_t)json_integer_value(sz)
			            : 0;
			return true;
		}
	}
	return false;
}

/* Chooses the files of one adapter format: PEFT (config + safetensors,
 * else .bin), TensorRT-LLM (.npy pair) or a single top-level .nemo. */
static int hf_choose(struct src_download *d, json_t *siblings, struct hf_pick *pick, int *n,
                     struct lp_err *err)
{
	const struct src_uri *u = d->u;
	uint64_t sz;
	size_t i;
	json_t *s;
	int nemo = 0;

	*n = 0;
	if (has(siblings, "adapter_config.json", &sz)) {
		pick[(*n)++] = (struct hf_pick){"adapter_config.json", sz};
		if (has(siblings, "adapter_model.safetensors", &sz))
			pick[(*n)++] = (struct hf_pick){"adapter_model.safetensors", sz};
		else if (has(siblings, "adapter_model.bin", &sz))
			pick[(*n)++] = (struct hf_pick){"adapter_model.bin", sz};
		else
			return lp_errf(err, -ENOENT,
			               "hf://%s@%s has adapter_config.json but no "
			               "adapter_model.safetensors or adapter_model.bin",
			               u->repo, u->revision);
		return 0;
	}
	if (has(siblings, "model.lora_config.npy", &sz)) {
		pick[(*n)++] = (struct hf_pick){"model.lora_config.npy", sz};
		if (!has(siblings, "model.lora_weights.npy", &sz))
			return lp_errf(err, -ENOENT,
			               "hf://%s@%s has model.lora_config.npy but no "
			               "model.lora_weights.npy",
			               u->repo, u->revision);
		pick[(*n)++] = (struct hf_pick){"model.lora_weights.npy", sz};
		return 0;
	}
	json_array_foreach(siblings, i, s)
	{
		const char *name = json_string_value(json_object_get(s, "rfilename"));
		size_t len = name ? strlen(name) : 0;
		if (len > 5 && !strchr(name, '/') && strcmp(name + len - 5, ".nemo") == 0) {
			json_t *jsz = json_object_get(s, "size");
			nemo++;
			pick[0] = (struct hf_pick){name, json_is_integer(jsz) &&
			                                         json_integer_value(jsz) > 0
			                                     ? (uint64_t)json_integer_value(jsz)
			                                     : 0};
		}
	}
	if (nemo > 1)
		return lp_errf(err, -EINVAL,
		               "hf://%s@%s has %d .nemo files; cannot tell which is "
		               "the adapter",
		               u->repo, u->revision, nemo);
	if (nemo == 1) {
		*n = 1;
		return 0;
	}
	return lp_errf(err, -ENOENT,
	               "hf://%s@%s has no adapter files (adapter_config.json, "
	               "model.lora_config.npy or a .nemo file)",
	               u->repo, u->revision);
}

/* Model mode: the model files among the repo's top-level files. */
static int hf_choose_model(struct src_download *d, json_t *siblings, struct hf_pick *pick, int *n,
                           struct lp_err *err)
{
	size_t ns = json_array_size(siblings), i;
	const char **names = calloc(ns ? ns : 1, sizeof(*names));
	uint64_t *sizes = calloc(ns ? ns : 1, sizeof(*sizes));
	int *chosen = calloc(ns ? ns : 1, sizeof(*chosen));
	char what[600];
	int k = 0, n_chosen = 0, rc;
	json_t *s;

	*n = 0;
	if (!names || !sizes || !chosen) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	json_array_foreach(siblings, i, s)
	{
		const char *name = json_string_value(json_object_get(s, "rfilename"));
		json_t *sz = json_object_get(s, "size");
		if (!name || strchr(name, '/'))
			continue;
		names[k] = name;
		sizes[k] = json_is_integer(sz) && json_integer_value(sz) > 0
		               ? (uint64_t)json_integer_value(sz)
		               : 0;
		k++;
	}
	snprintf(what, sizeof(what), "hf://%s@%s", d->u->repo, d->u->revision);
	if ((rc = src_model_pick(names, k, chosen, &n_chosen, what, err)) < 0)
		goto out;
	for (int j = 0; j < n_chosen; j++)
		pick[(*n)++] = (struct hf_pick){names[chosen[j]], sizes[chosen[j]]};
out:
	free(names);
	free(sizes);
	free(chosen);
	return rc;
}

/* GETs {endpoint}/{repo}/resolve/{rev}/{remote} into the file name. */
static int hf_get(struct src_download *d, const char *const *headers, const char *remote,
                  const char *name, uint64_t size, struct lp_http_result *res, struct lp_err *err)
{
	const struct src_uri *u = d->u;
	struct lp_buf url;
	int rc;

	lp_buf_init(&url, 16384);
	rc = lp_buf_appendf(&url, err, "%s/%s/resolve/", d->env->hf_endpoint, u->repo);
	if (rc == 0)
		rc = src_url_append(&url, u->revision, false, err);
	if (rc == 0)
		rc = lp_buf_append(&url, "/", 1, err);
	if (rc == 0)
		rc = src_url_append(&url, remote, true, err);
	if (rc < 0)
		goto out;
	struct lp_http_get g = {.url = url.data, .headers = headers, .follow_redirects = true};
	if ((rc = src_get_file(d, &g, name, size, res, err)) < 0) {
		lp_err_prefix(err, "hf://%s@%s", u->repo, u->revision);
		goto out;
	}
	if (res->status < 200 || res->status >= 300) {
		char detail[400];
		hf_error_detail(res, detail, sizeof(detail));
		rc = src_http_error(d, res->status, detail, err, "hf://%s@%s: GET '%s' failed",
		                    u->repo, u->revision, remote);
	}
out:
	lp_buf_release(&url);
	return rc;
}

int src_hf_fetch(struct src_download *d, struct lp_err *err)
{
	const struct src_uri *u = d->u;
	const struct src_env *env = d->env;
	struct lp_buf url, body, auth;
	struct lp_http_result *res = malloc(sizeof(*res));
	const char *headers[2] = {NULL, NULL};
	struct hf_pick *pick = NULL;
	json_t *root = NULL, *siblings;
	json_error_t jerr;
	uint64_t total = 0;
	bool sizes_known = true;
	size_t ns;
	int n = 0, rc;

	if (!res)
		return lp_errf(err, -ENOMEM, "out of memory");
	lp_buf_init(&url, 16384);
	lp_buf_init(&body, API_BODY_MAX);
	lp_buf_init(&auth, 16384);
	if (env->hf_token) {
		if ((rc = lp_buf_appendf(&auth, err, "Authorization: Bearer %s", env->hf_token)) <
		    0)
			goto out;
		headers[0] = auth.data;
	}
	if (d->cache->model && u->file[0]) { /* one file: no listing needed */
		const char *base = strrchr(u->file, '/');
		rc = hf_get(d, headers, u->file, base ? base + 1 : u->file, 0, res, err);
		goto out;
	}
	rc = lp_buf_appendf(&url, err, "%s/api/models/%s/revision/", env->hf_endpoint, u->repo);
	if (rc == 0)
		rc = src_url_append(&url, u->revision, false, err);
	if (rc < 0)
		goto out;
	{
		struct lp_http_get g = {
		    .url = url.data, .headers = headers, .follow_redirects = true};
		if ((rc = src_get_memory(d, &g, &body, res, err)) < 0) {
			lp_err_prefix(err, "hf://%s@%s", u->repo, u->revision);
			goto out;
		}
	}
	if (res->status != 200) {
		char detail[400];
		hf_error_detail(res, detail, sizeof(detail));
		rc =
		    src_http_error(d, res->status, detail, err, "hf://%s@%s", u->repo, u->revision);
		goto out;
	}
	root = json_loadb(body.data ? body.data : "", body.len, 0, &jerr);
	siblings = json_object_get(root, "siblings");
	if (!json_is_array(siblings)) {
		rc = lp_errf(err, -EIO, "hf://%s@%s: the hub's answer has no 'siblings' list%s%s",
		             u->repo, u->revision, root ? "" : ": ", root ? "" : jerr.text);
		goto out;
	}
	ns = json_array_size(siblings);
	if (!(pick = calloc(ns > 2 ? ns : 2, sizeof(*pick)))) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	rc = d->cache->model ? hf_choose_model(d, siblings, pick, &n, err)
	                     : hf_choose(d, siblings, pick, &n, err);
	if (rc < 0)
		goto out;
	for (int i = 0; i < n; i++) {
		total += pick[i].size;
		sizes_known = sizes_known && pick[i].size > 0;
	}
	d->announced = sizes_known ? total : 0;
	for (int i = 0; i < n && rc == 0; i++)
		rc = hf_get(d, headers, pick[i].name, pick[i].name, pick[i].size, res, err);
out:
	json_decref(root);
	if (auth.data)
		memset(auth.data, 0, auth.len);
	lp_buf_release(&auth);
	lp_buf_release(&url);
	lp_buf_release(&body);
	free(pick);
	free(res);
	return rc;
}
