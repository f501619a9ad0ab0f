/* Admin endpoints: adapters, vLLM's runtime LoRA endpoints, metrics,
 * health and readiness; see admin.h. */
#include "agent/api/admin.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent/api/loras.h"
#include "agent/api/metrics.h"
#include "agent/api/registry.h"
#include "common/credentials.h"
#include "common/log.h"

/* ---- health, readiness, metrics ---- */

int lp_admin_health(struct lp_call *c)
{
	return lp_call_send_json(c, 200, json_pack("{s:s}", "status", "ok"));
}

int lp_admin_ready(struct lp_call *c)
{
	if (atomic_load(&c->s->draining))
		return lp_call_send_json(
		    c, 503,
		    json_pack("{s:s, s:s}", "status", "not_ready", "reason", "shutting down"));
	if (!atomic_load(&c->s->ready))
		return lp_call_send_json(c, 503,
		                         json_pack("{s:s, s:s}", "status", "not_ready", "reason",
		                                   "the model is loading"));
	{
		struct lp_err err;
		if (lp_worker_failure(c->s->w, &err))
			return lp_call_send_json(c, 503,
			                         json_pack("{s:s, s:s+}", "status", "not_ready",
			                                   "reason",
			                                   "the engine failed: ", err.msg));
	}
	return lp_call_send_json(c, 200, json_pack("{s:s}", "status", "ready"));
}

/* On both ports: the admin port's, and the public port's, where the
 * Gateway API Inference Extension's endpoint picker scrapes a pool's
 * model servers (unauthenticated there, as vLLM's; docs/api.md). */
int lp_admin_metrics(struct lp_call *c)
{
	struct lp_worker_stats ws;
	struct lp_buf b;
	struct lp_err err;
	int status;

	memset(&ws, 0, sizeof(ws));
	if (atomic_load(&c->s->ready))
		lp_worker_stats(c->s->w, &ws);
	lp_buf_init(&b, 64u << 20);
	if (lp_metrics_render(c->s->metrics, &ws,
	                      atomic_load(&c->s->ready) && !atomic_load(&c->s->draining),
	                      c->s->cfg.served_name, &b, &err))
		status = lp_call_errorf(c, 500, NULL, NULL, "%s", err.msg);
	else
		status = lp_call_send(c, 200, "text/plain; version=0.0.4; charset=utf-8", b.data,
		                      b.len, NULL);
	lp_buf_release(&b);
	return status;
}

/* ---- /v1/loras ---- */

/* Adapter routes need the engine: 503 while the model loads. */
static bool not_ready(struct lp_call *c)
{
	if (atomic_load(&c->s->ready))
		return false;
	lp_call_errorf(c, 503, "not_ready", NULL, "the model is not ready yet");
	return true;
}

static void log_loaded(const struct lp_call *c, const struct lp_adapter_summary *a, bool replaced)
{
	lp_log(LP_LOG_INFO, c->id, "%s adapter '%s' from '%s': %s, rank %d, lora_id %d, %.1f ms",
	       replaced ? "reloaded" : "loaded", a->name, a->source, a->format ? a->format : "?",
	       a->rank, (int)a->lora_id, a->load_ms);
}

/* source.credentials: an object of the variables a Secret of the
 * operator's spec.source.secretRef holds, each a string. */
/* source.credentials into *cr; *given says whether there were any. */
static int read_credentials(json_t *src, struct lp_source_credentials *cr, bool *given,
                            struct lp_api_error *e)
{
	json_t *obj = json_object_get(src, "credentials"), *v;
	const char *key;

	*given = obj && !json_is_null(obj);
	if (!*given)
		return 0;
	if (!json_is_object(obj))
		return lp_api_errorf(e, 400, "invalid_type", "source.credentials",
		                     "'source.credentials' must be an object of strings");
	json_object_foreach(obj, key, v)
	{
		if (lp_source_credentials_set(cr, key, json_string_value(v)) < 0)
			return lp_api_errorf(e, 400, "invalid_credentials", "source.credentials",
			                     "'source.credentials' has '%.64s'; known: %s", key,
			                     LP_CREDENTIAL_KEYS_TEXT);
		if (!json_is_string(v))
			return lp_api_errorf(e, 400, "invalid_type", "source.credentials",
			                     "'source.credentials.%s' must be a string", key);
	}
	if ((cr->aws_access_key_id == NULL) != (cr->aws_secret_access_key == NULL) ||
	    (cr->aws_session_token && !cr->aws_access_key_id))
		return lp_api_errorf(e, 400, "invalid_credentials", "source.credentials",
		                     "'source.credentials' needs AWS_ACCESS_KEY_ID and "
		                     "AWS_SECRET_ACCESS_KEY together (and them with "
		                     "AWS_SESSION_TOKEN)");
	return 0;
}

int lp_admin_loras_parse(json_t *body, struct lp_lora_load_args *a,
                         struct lp_source_credentials *cr, struct lp_api_error *e)
{
	json_t *v, *src;
	bool has_creds;

	memset(a, 0, sizeof(*a));
	v = json_object_get(body, "lora_name");
	if (!json_is_string(v)) {
		lp_api_errorf(e, 400, v ? "invalid_type" : "missing_required_parameter",
		              "lora_name", "'lora_name' %s",
		              v ? "must be a string" : "is required");
		return -e->status;
	}
	a->name = json_string_value(v);
	src = json_object_get(body, "source");
	if (!json_is_object(src)) {
		lp_api_errorf(e, 400, src ? "invalid_type" : "missing_required_parameter", "source",
		              "'source' %s",
		              src ? "must be an object {\"uri\", \"sha256\"?}" : "is required");
		return -e->status;
	}
	v = json_object_get(src, "uri");
	if (!json_is_string(v)) {
		lp_api_errorf(e, 400, v ? "invalid_type" : "missing_required_parameter",
		              "source.uri", "'source.uri' %s",
		              v ? "must be a string" : "is required");
		return -e->status;
	}
	a->uri = json_string_value(v);
	v = json_object_get(src, "sha256");
	if (v && !json_is_null(v)) {
		if (!json_is_string(v)) {
			lp_api_errorf(e, 400, "invalid_type", "source.sha256",
			              "'source.sha256' must be a string");
			return -e->status;
		}
		a->sha256 = json_string_value(v);
	}
	v = json_object_get(body, "load_inplace");
	if (v && !json_is_null(v) && !json_is_boolean(v)) {
		lp_api_errorf(e, 400, "invalid_type", "load_inplace",
		              "'load_inplace' must be a boolean");
		return -e->status;
	}
	a->inplace = json_is_true(v);
	a->from_api = true;
	if (read_credentials(src, cr, &has_creds, e))
		return -e->status;
	if (has_creds)
		a->creds = cr;
	return 0;
}

int lp_admin_loras_load(struct lp_call *c)
{
	struct lp_source_credentials creds = {0};
	struct lp_lora_load_args args;
	struct lp_adapter_summary sum;
	struct lp_api_error e;
	json_t *body = NULL, *out;
	bool already = false, existed;

	if (not_ready(c))
		return c->status;
	memset(&args, 0, sizeof(args));
	if (lp_call_read_json(c, &body, &e))
		goto fail;
	if (lp_admin_loras_parse(body, &args, &creds, &e))
		goto fail;
	existed = lp_registry_get(c->s->loras, args.name, NULL, 0);
	if (lp_api_lora_load(c->s, &args, &already, &sum, &e)) {
		lp_log(LP_LOG_WARN, c->id, "cannot load adapter '%.130s' from '%.300s': %s",
		       args.name, args.uri, e.message);
		goto fail;
	}
	if (!already)
		log_loaded(c, &sum, existed);
	out = lp_api_lora_json(&sum);
	json_object_set_new(out, "status", json_string("success"));
	json_decref(body);
	return lp_call_send_json(c, already ? 200 : 201, out);
fail:
	json_decref(body);
	return lp_call_send_error(c, &e);
}

static struct lp_adapter_summary *all_adapters(struct lp_worker *w, size_t *n)
{
	size_t cap = 16;

	for (;;) {
		struct lp_adapter_summary *a = calloc(cap, sizeof(*a));
		if (!a)
			return NULL;
		*n = lp_worker_lora_list(w, a, cap);
		if (*n <= cap)
			return a;
		free(a);
		cap = *n + 16;
	}
}

int lp_admin_loras_list(struct lp_call *c)
{
	struct lp_adapter_summary *a;
	json_t *loras;
	size_t n = 0;

	if (not_ready(c))
		return c->status;
	loras = json_object();
	a = all_adapters(c->s->w, &n);
	if (!a || !loras) {
		free(a);
		json_decref(loras);
		return lp_call_errorf(c, 500, NULL, NULL, "out of memory");
	}
	for (size_t i = 0; i < n; i++) {
		json_t *j = lp_api_lora_json(&a[i]);
		json_object_del(j, "lora_name");
		json_object_set_new(loras, a[i].name, j);
	}
	free(a);
	return lp_call_send_json(c, 200,
	                         json_pack("{s:s, s:o, s:I}", "status", "success", "loras", loras,
	                                   "count", (json_int_t)n));
}

/* The {name} of /v1/loras/{name}; the path is already percent-decoded. */
static const char *path_name(const struct lp_call *c)
{
	return c->path + strlen("/v1/loras/");
}

int lp_admin_loras_get(struct lp_call *c)
{
	const char *name = path_name(c);
	struct lp_adapter_summary sum;
	struct lp_err err;
	json_t *out;

	if (not_ready(c))
		return c->status;
	if (!lp_lora_name_valid(name, &err))
		return lp_call_errorf(c, 400, "invalid_name", "lora_name", "%s", err.msg);
	if (lp_worker_lora_get(c->s->w, name, &sum))
		return lp_call_errorf(c, 404, "adapter_not_found", "lora_name",
		                      "adapter '%s' is not loaded", name);
	out = lp_api_lora_json(&sum);
	json_object_set_new(out, "status", json_string("success"));
	return lp_call_send_json(c, 200, out);
}

int lp_admin_loras_delete(struct lp_call *c)
{
	const char *name = path_name(c);
	struct lp_api_error e;

	if (not_ready(c))
		return c->status;
	if (lp_api_lora_unload(c->s, name, &e))
		return lp_call_send_error(c, &e);
	lp_log(LP_LOG_INFO, c->id, "unloaded adapter '%s'", name);
	return lp_call_send_json(c, 200,
	                         json_pack("{s:s, s:s}", "status", "success", "lora_name", name));
}

/* ---- vLLM's endpoints ---- */

/* vLLM's error reply: {"error": {message, type, param, code: status}}. */
static int vllm_error(struct lp_call *c, int status, const char *type, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int vllm_error(struct lp_call *c, int status, const char *type, const char *fmt, ...)
{
	char msg[LP_ERR_MSG_MAX];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	lp_api_utf8_sanitize(msg);
	return lp_call_send_json(c, status,
	                         json_pack("{s:{s:s, s:s, s:n, s:i}}", "error", "message", msg,
	                                   "type", type, "param", "code", status));
}

static int vllm_text(struct lp_call *c, const char *fmt, const char *name)
{
	char msg[512];
	int n = snprintf(msg, sizeof(msg), fmt, name);

	return lp_call_send(c, 200, "text/plain; charset=utf-8", msg,
	                    n > 0 && (size_t)n < sizeof(msg) ? (size_t)n : strlen(msg), NULL);
}

int lp_admin_vllm_load_parse(json_t *body, struct lp_lora_load_args *a, struct lp_api_error *e)
{
	json_t *name = json_object_get(body, "lora_name"),
	       *path = json_object_get(body, "lora_path");
	json_t *inplace = json_object_get(body, "load_inplace");

	memset(a, 0, sizeof(*a));
	if (!json_is_string(name) || !json_is_string(path) || !json_string_length(name) ||
	    !json_string_length(path))
		return lp_api_errorf(e, 400, NULL, NULL,
		                     "Both 'lora_name' and 'lora_path' must be provided.");
	if (inplace && !json_is_null(inplace) && !json_is_boolean(inplace))
		return lp_api_errorf(e, 400, NULL, NULL, "'load_inplace' must be a boolean");
	a->name = json_string_value(name);
	a->uri = json_string_value(path);
	a->inplace = json_is_true(inplace);
	a->from_api = true;
	return 0;
}

int lp_admin_vllm_load(struct lp_call *c)
{
	struct lp_lora_load_args args;
	struct lp_adapter_summary sum;
	struct lp_api_error e;
	json_t *body = NULL;
	bool already;
	int status;

	if (not_ready(c))
		return c->status;
	if (lp_call_read_json(c, &body, &e))
		return lp_call_send_error(c, &e);
	if (lp_admin_vllm_load_parse(body, &args, &e)) {
		json_decref(body);
		return vllm_error(c, 400, "InvalidUserInput", "%s", e.message);
	}
	if (!args.inplace && lp_registry_get(c->s->loras, args.name, NULL, 0)) {
		status =
		    vllm_error(c, 400, "InvalidUserInput",
		               "The lora adapter '%.130s' has already been loaded. If you want "
		               "to load the adapter in place, set 'load_inplace' to true.",
		               args.name);
		json_decref(body);
		return status;
	}
	if (lp_api_lora_load(c->s, &args, &already, &sum, &e)) {
		lp_log(LP_LOG_WARN, c->id, "cannot load adapter '%.130s' from '%.300s': %s",
		       args.name, args.uri, e.message);
		if (e.status == 404)
			status = vllm_error(c, 404, "NotFoundError", "%s", e.message);
		else if (e.status >= 500 || e.status == 429)
			status = vllm_error(c, e.status, "InternalServerError", "%s", e.message);
		else
			status = vllm_error(c, 400, "BadRequestError", "%s", e.message);
		json_decref(body);
		return status;
	}
	log_loaded(c, &sum, args.inplace);
	status = vllm_text(c, "Success: LoRA adapter '%s' added successfully.", args.name);
	json_decref(body);
	return status;
}

int lp_admin_vllm_unload(struct lp_call *c)
{
	struct lp_api_error e;
	json_t *body = NULL, *name, *id;
	char found[256] = "";
	int status;

	if (not_ready(c))
		return c->status;
	if (lp_call_read_json(c, &body, &e))
		return lp_call_send_error(c, &e);
	name = json_object_get(body, "lora_name");
	id = json_object_get(body, "lora_int_id");
	if (json_is_string(name) && json_string_length(name)) {
		snprintf(found, sizeof(found), "%s", json_string_value(name));
	} else if (json_is_integer(id)) {
		size_t n = 0;
		struct lp_adapter_summary *a = all_adapters(c->s->w, &n);
		for (size_t i = 0; a && i < n; i++)
			if (a[i].lora_id == json_integer_value(id))
				snprintf(found, sizeof(found), "%s", a[i].name);
		free(a);
		if (!found[0]) {
			status = vllm_error(c, 404, "NotFoundError",
			                    "The lora adapter with id %lld cannot be found.",
			                    (long long)json_integer_value(id));
			json_decref(body);
			return status;
		}
	} else {
		json_decref(body);
		return vllm_error(c, 400, "InvalidUserInput",
		                  "either 'lora_name' and 'lora_int_id' needs to be provided.");
	}
	json_decref(body);
	if (lp_api_lora_unload(c->s, found, &e)) {
		if (e.status == 404)
			return vllm_error(c, 404, "NotFoundError",
			                  "The lora adapter '%s' cannot be found.", found);
		return vllm_error(c, e.status, "InvalidUserInput", "%s", e.message);
	}
	lp_log(LP_LOG_INFO, c->id, "unloaded adapter '%s'", found);
	return vllm_text(c, "Success: LoRA adapter '%s' removed successfully.", found);
}
