/* Adapter loads and unloads with HTTP outcomes; see loras.h. */
#include "agent/api/loras.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "agent/adapters/lora.h"
#include "agent/adapters/source.h"
#include "agent/api/registry.h"
#include "common/log.h"

bool lp_lora_name_valid(const char *name, struct lp_err *err)
{
	size_t n = strlen(name);

	if (n == 0 || n > LP_LORA_NAME_MAX) {
		lp_errf(err, -EINVAL, "an adapter name must be 1 to %d characters long, got %zu",
		        LP_LORA_NAME_MAX, n);
		return false;
	}
	for (size_t i = 0; i < n; i++) {
		char c = name[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '.' || c == '_' || c == ':' || c == '/' || c == '-')) {
			lp_errf(err, -EINVAL,
			        "adapter name '%.130s' has a character outside [A-Za-z0-9._:/-] at "
			        "position %zu",
			        name, i);
			return false;
		}
	}
	if (strstr(name, "..")) {
		lp_errf(err, -EINVAL, "adapter name '%s' must not contain '..'", name);
		return false;
	}
	if (name[0] == '/') {
		lp_errf(err, -EINVAL, "adapter name '%s' must not start with '/'", name);
		return false;
	}
	return true;
}

static int map_source_error(const struct lp_err *err, struct lp_api_error *e)
{
	switch (err->code) {
	case -EINVAL:
		return lp_api_error_from(e, 400, "invalid_source", "source.uri", err);
	case -ENOENT:
		return lp_api_error_from(e, 404, "source_not_found", "source.uri", err);
	case -EACCES:
		return lp_api_error_from(e, 403, "source_refused", "source.uri", err);
	case -EBADMSG:
		return lp_api_error_from(e, 422, "digest_mismatch", "source.sha256", err);
	case -EFBIG:
		return lp_api_error_from(e, 422, "adapter_too_large", "source.uri", err);
	case -EIO:
		return lp_api_error_from(e, 502, "source_failed", "source.uri", err);
	case -ENOSPC: /* over --lora-cache-max-bytes with every other entry in use */
		return lp_api_error_from(e, 507, "no_room", "source.uri", err);
	default:
		return lp_api_error_from(e, 500, NULL, NULL, err);
	}
}

bool lp_api_source_in_use(void *server, const char *entry_name)
{
	struct lp_server *s = server;
	struct lp_adapter_summary *a = NULL;
	size_t n = 0, cap = 16;
	bool used = false;

	if (!s->w)
		return false;
	for (;;) {
		struct lp_adapter_summary *grown = realloc(a, cap * sizeof(*a));
		if (!grown) {
			free(a);
			return true; /* out of memory: keep the entry */
		}
		a = grown;
		n = lp_worker_lora_list(s->w, a, cap);
		if (n <= cap)
			break;
		cap = n + 16;
	}
	for (size_t i = 0; i < n && !used; i++) {
		char name[64];
		used = lp_source_cache_name(a[i].source, name, sizeof(name), NULL) == 0 &&
		       strcmp(name, entry_name) == 0;
	}
	free(a);
	return used;
}

static int map_load_error(const struct lp_err *err, struct lp_api_error *e)
{
	switch (err->code) {
	case -EEXIST:
		return lp_api_error_from(e, 409, "adapter_conflict", "lora_name", err);
	case -ENOSPC:
	case -ENOMEM:
		return lp_api_error_from(e, 507, "no_room", NULL, err);
	case -ENOENT:
		return lp_api_error_from(e, 404, "source_not_found", "source.uri", err);
	case -EINVAL:
	case -E2BIG: /* a file of the adapter over its format's size limit */
		return lp_api_error_from(e, 422, "invalid_adapter", "source.uri", err);
	case -EACCES: /* a file of the adapter leads outside its root */
		return lp_api_error_from(e, 403, "source_refused", "source.uri", err);
	case -EAGAIN:
		lp_api_error_from(e, 429, "adapter_tier_full", NULL, err);
		e->retry_after = 1;
		return -429;
	default:
		return lp_api_error_from(e, 500, NULL, NULL, err);
	}
}

int lp_api_lora_load(struct lp_server *s, const struct lp_lora_load_args *a, bool *already,
                     struct lp_adapter_summary *out, struct lp_api_error *e)
{
	struct lp_adapter_summary cur, scratch;
	struct lp_source_result res;
	char path[PATH_MAX], pin[65];
	const char *digest;
	struct lp_err err;
	int rc;

	*already = false;
	if (!out)
		out = &scratch;
	if (!lp_lora_name_valid(a->name, &err))
		return lp_api_error_from(e, 400, "invalid_name", "lora_name", &err);
	if (s->cfg.served_name && !strcmp(a->name, s->cfg.served_name))
		return lp_api_errorf(e, 400, "invalid_name", "lora_name",
		                     "'%s' is the base model's name; an adapter needs another one",
		                     a->name);
	if (!a->uri || !a->uri[0])
		return lp_api_errorf(e, 400, "invalid_source", "source.uri",
		                     "the adapter source uri is empty");
	if (strlen(a->uri) >= LP_SOURCE_URI_MAX || strlen(a->uri) >= sizeof(cur.source))
		return lp_api_errorf(e, 400, "invalid_source", "source.uri",
		                     "the adapter source uri is longer than %zu bytes",
		                     sizeof(cur.source) - 1);
	if (a->sha256) {
		if (strlen(a->sha256) != 64 || strspn(a->sha256, "0123456789abcdefABCDEF") != 64)
			return lp_api_errorf(e, 400, "invalid_sha256", "source.sha256",
			                     "'sha256' must be 64 hex characters");
		for (int i = 0; i < 64; i++)
			pin[i] = (char)(a->sha256[i] | 0x20); /* lowercase hex */
		pin[64] = '\0';
	}
	/* the same name from the same uri (and pin) is already there: 200 */
	if (!a->inplace && lp_worker_lora_get(s->w, a->name, &cur) == 0 &&
	    !strcmp(cur.source, a->uri) && (!a->sha256 || !strcasecmp(cur.sha256, pin))) {
		*already = true;
		*out = cur;
		return 0;
	}
	if (a->creds && lp_source_credentials_check(s->sources, a->creds, &err))
		return lp_api_error_from(e, 400, "invalid_credentials", "source.credentials", &err);
	if (a->inplace) /* fresh weights: a remote source is downloaded again */
		lp_source_evict(s->sources, a->uri, NULL);
	if (lp_source_fetch(s->sources, a->uri, a->sha256 ? pin : NULL, a->from_api, a->creds, path,
	                    sizeof(path), &res, &err))
		return map_source_error(&err, e);
	digest = a->sha256 ? pin : res.sha256;
	rc = lp_worker_lora_load(s->w, a->name, path, res.root[0] ? res.root : a->root, a->uri,
	                         digest, a->inplace, already, out, &err);
	/* a download that is no adapter leaves no cache entry behind (unless
	 * it is in use); a busy tier or a name conflict says nothing of it */
	if (res.held)
		lp_source_release(s->sources, a->uri,
		                  rc < 0 && err.code != -EAGAIN && err.code != -EEXIST);
	if (rc)
		return map_load_error(&err, e);
	if (!*already && out->absent.n) {
		char what[512];
		lp_lora_absent_format(&out->absent, what, sizeof(what));
		lp_log_warn(
		    "adapter '%s' from '%s' has no weights for %d of the modules its config "
		    "targets (they add nothing, as in peft): %s",
		    a->name, out->source, out->absent.n, what);
	}
	if (lp_registry_put(s->loras, a->name, out->source, &err))
		return lp_api_error_from(e, 500, NULL, NULL, &err);
	return 0;
}

int lp_api_lora_unload(struct lp_server *s, const char *name, struct lp_api_error *e)
{
	struct lp_err err;

	if (!lp_lora_name_valid(name, &err))
		return lp_api_error_from(e, 400, "invalid_name", "lora_name", &err);
	if (lp_worker_lora_unload(s->w, name, &err)) {
		if (err.code == -ENOENT)
			return lp_api_error_from(e, 404, "adapter_not_found", "lora_name", &err);
		return lp_api_error_from(e, 500, NULL, NULL, &err);
	}
	lp_registry_remove(s->loras, name);
	return 0;
}

/* {"q_proj": [1, 3], ...}: per target, the layers the config targets that
 * the file holds no weights for; {} when there are none. */
static json_t *absent_json(const struct lp_lora_absent *ab)
{
	json_t *obj = json_object();

	for (int t = 0; obj && ab->n && t < LP_LORA_N_TARGETS; t++) {
		json_t *layers = NULL;
		for (int l = 0; l < LP_LORA_ABSENT_LAYERS; l++) {
			if (!lp_lora_absent_has(ab, l, (enum lp_lora_target)t))
				continue;
			if (!layers)
				layers = json_array();
			json_array_append_new(layers, json_integer(l));
		}
		if (layers)
			json_object_set_new(obj, lp_lora_target_name((enum lp_lora_target)t),
			                    layers);
	}
	return obj;
}

json_t *lp_api_lora_json(const struct lp_adapter_summary *a)
{
	json_t *mods = json_array(), *out;
	char source[sizeof(a->source)];

	for (int t = 0; t < LP_LORA_N_TARGETS; t++)
		if (a->targets & (1u << t))
			json_array_append_new(
			    mods, json_string(lp_lora_target_name((enum lp_lora_target)t)));
	memcpy(source, a->source, sizeof(source));
	source[sizeof(source) - 1] = '\0';
	lp_api_utf8_sanitize(source);
	out = json_pack("{s:s, s:i, s:s, s:s, s:i, s:o, s:s, s:s, s:i, s:f}", "lora_name", a->name,
	                "lora_id", (int)a->lora_id, "source", source, "sha256", a->sha256, "rank",
	                a->rank, "modules", mods, "format", a->format ? a->format : "", "tier",
	                a->tier ? a->tier : "", "requests_running", a->requests_running, "load_ms",
	                round(a->load_ms * 1000.0) / 1000.0);
	if (out)
		json_object_set_new(out, "absent_modules", absent_json(&a->absent));
	return out;
}
