/* loraplane-agent: loads a base model, serves the OpenAI API on one port
 * and adapter management, metrics and health on another, and loads LoRA
 * adapters from --lora-modules, --lora-dir (optionally watched) and the
 * admin API at run time (docs/api.md).
 *
 * The flags are in one table shared with loraplane-generate
 * (agent/options.c, docs/cli.md). Every flag can also come from the
 * environment: LORAPLANE_<FLAG> (upper case, '-' as '_'), plus the names
 * the table lists (NIM_*, VLLM_*); flags win over the environment. Exit
 * status: 0 after a clean shutdown (SIGTERM or SIGINT), 1 on a startup
 * error, 2 for bad usage. `loraplane-agent fetch URI DEST` is another
 * program in the same binary (agent/fetch.c). */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "agent/adapters/source.h"
#include "agent/adapters/watcher.h"
#include "agent/api/gate.h"
#include "agent/api/loras.h"
#include "agent/api/registry.h"
#include "agent/api/resolver.h"
#include "agent/api/server.h"
#include "agent/engine/chat-template.h"
#include "agent/engine/engine.h"
#include "agent/engine/model.h"
#include "agent/engine/tokenizer.h"
#include "agent/engine/worker.h"
#include "agent/fetch.h"
#include "agent/options.h"
#include "common/buf.h"
#include "common/err.h"
#include "common/log.h"
#include "kernels/cuda-loader.h"
#include "kernels/fault.h"

#define PROG             "loraplane-agent"
#define MAX_LORA_MODULES 256
#define MAX_ROOTS        64
#define MAX_KEY_BYTES    4096

struct options {
	const char *model;
	const char *served_name;
	const char *device;
	const char *host;
	int port;
	int admin_port;
	const char *lora_dir;
	double refresh_s;
	const char *lora_modules[MAX_LORA_MODULES]; /* NAME=URI */
	int n_lora_modules;
	const char *lora_cache_dir;
	long lora_cache_max_bytes; /* 0: the sources' default */
	bool allow_insecure_source_endpoints;
	const char *lora_resolver;      /* URI prefix, or NULL */
	double resolver_negative_ttl_s; /* LP_RESOLVER_NEGATIVE_TTL_DEFAULT */
	bool resolver_negative_ttl_given;
	const char *roots[MAX_ROOTS];
	int n_roots;
	int threads;
	const char *api_key_file;
	const char *admin_token_file;
	bool allow_runtime_lora_updating;
	const char *tls_cert;
	const char *tls_key;
	enum lp_log_format log_format;
	enum lp_log_level log_level;
	const char *chat_template;
	int http_threads;
	double http_header_timeout_s;
	double http_body_timeout_s;
	int http_max_connections;
	double drain_s;
	long max_request_bytes;
	int max_queued; /* 0: the worker's default */
	struct lp_engine_config ec;
	struct lp_options cli; /* what the strings above may point into */
};

static int add_lora_module(struct options *o, const char *v, struct lp_err *err)
{
	if (o->n_lora_modules == MAX_LORA_MODULES ||
	    (v[0] != '{' && (!strchr(v, '=') || v[0] == '=')))
		return lp_errf(err, -EINVAL,
		               "'--lora-modules' needs NAME=URI or {\"name\": ..., \"path\": ...} "
		               "(at most %d), got '%s'",
		               MAX_LORA_MODULES, v);
	o->lora_modules[o->n_lora_modules++] = v;
	return 0;
}

/* Stores one option's value (agent/options.h has checked its type and
 * range); v->text lives until lp_options_release(&o->cli). */
static int set_option(void *ctx, enum lp_opt id, const struct lp_option_value *v,
                      struct lp_err *err)
{
	struct options *o = ctx;

	if (lp_options_set_engine(&o->ec, id, v))
		return 0;
	switch (id) {
	case LP_OPT_MODEL:
		o->model = v->text;
		break;
	case LP_OPT_SERVED_MODEL_NAME:
		o->served_name = v->text;
		break;
	case LP_OPT_DEVICE: {
		enum lp_device_kind kind;
		int dev;
		if (lp_device_parse(v->text, &kind, &dev, err))
			return lp_err_prefix(err, "'--device'");
		o->device = v->text;
		break;
	}
	case LP_OPT_HOST:
		o->host = v->text;
		break;
	case LP_OPT_PORT:
		o->port = (int)v->i;
		break;
	case LP_OPT_ADMIN_PORT:
		o->admin_port = (int)v->i;
		break;
	case LP_OPT_LORA_DIR:
		o->lora_dir = v->text;
		break;
	case LP_OPT_LORA_REFRESH_INTERVAL:
		o->refresh_s = v->d;
		break;
	case LP_OPT_LORA_MODULES:
		return add_lora_module(o, v->text, err);
	case LP_OPT_LORA_CACHE_DIR:
		o->lora_cache_dir = v->text;
		break;
	case LP_OPT_LORA_CACHE_MAX_BYTES:
		o->lora_cache_max_bytes = (long)v->i;
		break;
	case LP_OPT_ALLOW_INSECURE_SOURCE_ENDPOINTS:
		o->allow_insecure_source_endpoints = v->b;
		break;
	case LP_OPT_LORA_RESOLVER:
		if (o->lora_resolver)
			return lp_errf(err, -EINVAL,
			               "'--lora-resolver' takes one uri prefix, got '%s' and '%s'",
			               o->lora_resolver, v->text);
		o->lora_resolver = v->text;
		break;
	case LP_OPT_LORA_RESOLVER_NEGATIVE_TTL:
		o->resolver_negative_ttl_s = v->d;
		o->resolver_negative_ttl_given = true;
		break;
	case LP_OPT_ALLOWED_LOCAL_ROOTS:
		if (o->n_roots == MAX_ROOTS)
			return lp_errf(err, -EINVAL, "at most %d '--allowed-local-roots'",
			               MAX_ROOTS);
		o->roots[o->n_roots++] = v->text;
		break;
	case LP_OPT_THREADS:
		o->threads = (int)v->i;
		break;
	case LP_OPT_API_KEY_FILE:
		o->api_key_file = v->text;
		break;
	case LP_OPT_ADMIN_TOKEN_FILE:
		o->admin_token_file = v->text;
		break;
	case LP_OPT_ALLOW_RUNTIME_LORA_UPDATING:
		o->allow_runtime_lora_updating = v->b;
		break;
	case LP_OPT_TLS_CERT:
		o->tls_cert = v->text;
		break;
	case LP_OPT_TLS_KEY:
		o->tls_key = v->text;
		break;
	case LP_OPT_LOG_FORMAT:
		lp_log_parse_format(v->text, &o->log_format);
		break;
	case LP_OPT_LOG_LEVEL:
		lp_log_parse_level(v->text, &o->log_level);
		break;
	case LP_OPT_CHAT_TEMPLATE:
		o->chat_template = v->text;
		break;
	case LP_OPT_HTTP_THREADS:
		o->http_threads = (int)v->i;
		break;
	case LP_OPT_HTTP_HEADER_TIMEOUT:
		o->http_header_timeout_s = v->d;
		break;
	case LP_OPT_HTTP_BODY_TIMEOUT:
		o->http_body_timeout_s = v->d;
		break;
	case LP_OPT_HTTP_MAX_CONNECTIONS:
		o->http_max_connections = (int)v->i;
		break;
	case LP_OPT_DRAIN_TIMEOUT:
		o->drain_s = v->d;
		break;
	case LP_OPT_MAX_REQUEST_BYTES:
		o->max_request_bytes = (long)v->i;
		break;
	case LP_OPT_MAX_QUEUED_REQUESTS:
		o->max_queued = (int)v->i;
		break;
	default:
		/* the table lets no other option through for the agent */
		return lp_errf(err, -EINVAL, "'--%s' is not an option of " PROG,
		               lp_options_table()[id].name);
	}
	return 0;
}

/* Returns 0 to run, 1 after printing --help, --help-json or --version,
 * -1 after printing a usage error. */
static int parse_args(int argc, char **argv, struct options *o)
{
	enum lp_options_action action;
	struct lp_err err = {0};

	memset(o, 0, sizeof(*o));
	o->device = "auto";
	o->port = 8000;
	o->admin_port = 8001;
	o->drain_s = 30;
	o->http_threads = 64;
	o->http_header_timeout_s = LP_GATE_HEADER_TIMEOUT_DEFAULT;
	o->http_body_timeout_s = LP_GATE_BODY_TIMEOUT_DEFAULT;
	o->http_max_connections = LP_GATE_MAX_CONNS_DEFAULT;
	o->max_request_bytes = LP_API_MAX_BODY_DEFAULT;
	o->log_format = LP_LOG_TEXT;
	o->log_level = LP_LOG_INFO;
	o->resolver_negative_ttl_s = LP_RESOLVER_NEGATIVE_TTL_DEFAULT;
	lp_engine_config_default(&o->ec);

	if (lp_options_parse(&o->cli, LP_PROG_AGENT, argc, argv, set_option, o, &action, &err)) {
		fprintf(stderr, PROG ": %s\n", err.msg);
		return -1;
	}
	if (action != LP_OPTIONS_RUN)
		return lp_options_answer(LP_PROG_AGENT, action) ? -1 : 1;
	if (!o->model || !*o->model) {
		fprintf(stderr, PROG ": '--model' is required\n%s",
		        lp_options_usage(LP_PROG_AGENT));
		return -1;
	}
	if (o->refresh_s > 0 && !o->lora_dir) {
		fprintf(stderr, PROG ": '--lora-refresh-interval' needs '--lora-dir'\n");
		return -1;
	}
	if (o->resolver_negative_ttl_given && !o->lora_resolver) {
		fprintf(stderr, PROG ": '--lora-resolver-negative-ttl' needs '--lora-resolver'\n");
		return -1;
	}
	if (!!o->tls_cert != !!o->tls_key) {
		fprintf(stderr, PROG ": '--tls-cert' and '--tls-key' go together\n");
		return -1;
	}
	return 0;
}

/* Reads a token file: its first line, without surrounding white space. */
static int read_token(const char *path, char **out, struct lp_err *err)
{
	struct lp_buf b;
	char *s, *end;
	int rc;

	lp_buf_init(&b, MAX_KEY_BYTES);
	rc = lp_buf_read_file(&b, path, MAX_KEY_BYTES, err);
	if (rc) {
		lp_buf_release(&b);
		return rc;
	}
	s = b.data ? b.data : (char *)"";
	while (*s == ' ' || *s == '\t' || *s == '\r' || *s == '\n')
		s++;
	end = s + strcspn(s, "\r\n");
	while (end > s && (end[-1] == ' ' || end[-1] == '\t'))
		end--;
	if (end == s) {
		lp_buf_release(&b);
		return lp_errf(err, -EINVAL, "token file '%s' is empty", path);
	}
	*out = strndup(s, (size_t)(end - s));
	lp_buf_release(&b);
	return *out ? 0 : lp_errf(err, -ENOMEM, "out of memory");
}

/* ---- chat template ---- */

static void token_string(const struct lp_model *m, int32_t id, char *out, size_t cap)
{
	struct lp_detok d;
	int n;

	out[0] = '\0';
	if (id < 0)
		return;
	lp_detok_init(&d, false);
	n = lp_detok_piece(m->tok, &d, id, out, cap - 1);
	out[n > 0 ? n : 0] = '\0';
}

static int setup_chat(const struct options *o, const struct lp_model *m,
                      struct lp_chat_template *ct, struct lp_err *err)
{
	const char *tmpl = lp_tokenizer_chat_template(m->tok);
	char bos[256], eos[256];

	token_string(m, lp_tokenizer_bos(m->tok), bos, sizeof(bos));
	token_string(m, lp_tokenizer_eos(m->tok), eos, sizeof(eos));
	if (o->chat_template)
		return lp_chat_template_from_name(ct, o->chat_template, bos, eos, err);
	if (!tmpl)
		return lp_errf(err, -ENOENT, "the model has no chat template");
	return lp_chat_template_detect(ct, tmpl, bos, eos, err);
}

/* ---- adapters at startup and from the watcher ---- */

static void uri_of_dir(const char *dir, char *out, size_t cap)
{
	snprintf(out, cap, "file://%s", dir);
}

/* The source uri of a lora-dir subdirectory: the directory itself, or the
 * one .nemo file inside it (NIM's layout for NeMo adapters). */
static void uri_of_adapter_dir(const char *dir, char *out, size_t cap)
{
	char nemo[NAME_MAX + 1] = "";
	int n_nemo = 0, n_other = 0;
	struct dirent *de;
	DIR *d = opendir(dir);

	uri_of_dir(dir, out, cap);
	if (!d)
		return;
	while ((de = readdir(d))) {
		size_t len = strlen(de->d_name);
		if (de->d_name[0] == '.')
			continue;
		if (len > 5 && !strcmp(de->d_name + len - 5, ".nemo")) {
			n_nemo++;
			snprintf(nemo, sizeof(nemo), "%s", de->d_name);
		} else if (!strcmp(de->d_name, "adapter_config.json") ||
		           !strcmp(de->d_name, "model.lora_config.npy")) {
			n_other++;
		}
	}
	closedir(d);
	if (n_nemo == 1 && n_other == 0)
		snprintf(out, cap, "file://%s/%s", dir, nemo);
}

static int watch_load(void *ctx, const char *name, const char *dir, bool inplace,
                      struct lp_err *err)
{
	struct lp_server *s = ctx;
	struct lp_lora_load_args a = {0};
	struct lp_api_error e;
	char uri[PATH_MAX + NAME_MAX + 16], root[PATH_MAX];
	const char *slash = strrchr(dir, '/');
	bool already;

	uri_of_adapter_dir(dir, uri, sizeof(uri));
	a.name = name;
	a.uri = uri;
	a.inplace = inplace;
	a.from_api = false;
	/* the adapter's files stay in the lora directory (dir's parent) */
	if (slash && (size_t)(slash - dir) < sizeof(root)) {
		snprintf(root, sizeof(root), "%.*s", slash == dir ? 1 : (int)(slash - dir), dir);
		a.root = root;
	}
	if (lp_api_lora_load(s, &a, &already, NULL, &e))
		return lp_errf(err, -EINVAL, "%s", e.message);
	return 0;
}

static int watch_unload(void *ctx, const char *name, struct lp_err *err)
{
	struct lp_api_error e;

	if (lp_api_lora_unload(ctx, name, &e))
		return lp_errf(err, -EINVAL, "%s", e.message);
	return 0;
}

static enum lp_watch_state watch_state(void *ctx, const char *name, const char *dir)
{
	struct lp_server *s = ctx;
	char uri[PATH_MAX + 8], source[1024];

	if (!lp_registry_get(s->loras, name, source, sizeof(source)))
		return LP_WATCH_ABSENT;
	uri_of_dir(dir, uri, sizeof(uri));
	size_t n = strlen(uri);
	if (!strncmp(source, uri, n) && (source[n] == '\0' || source[n] == '/'))
		return LP_WATCH_FROM_DIR;
	return LP_WATCH_FROM_ELSEWHERE;
}

static void watch_report(void *ctx, enum lp_watch_event ev, const char *name, const char *dir,
                         const struct lp_err *err)
{
	struct lp_server *s = ctx;
	struct lp_adapter_summary sum;

	switch (ev) {
	case LP_WATCH_LOADED:
	case LP_WATCH_RELOADED:
		if (lp_worker_lora_get(s->w, name, &sum) == 0)
			lp_log_info("%s adapter '%s' from '%s': %s, rank %d, lora_id %d, %.1f ms",
			            ev == LP_WATCH_LOADED ? "loaded" : "reloaded", name, sum.source,
			            sum.format ? sum.format : "?", sum.rank, (int)sum.lora_id,
			            sum.load_ms);
		break;
	case LP_WATCH_UNLOADED:
		lp_log_info("unloaded adapter '%s': its directory '%s' is gone", name, dir);
		break;
	case LP_WATCH_SKIPPED:
		lp_log_warn("skipped adapter '%s' ('%s'): %s", name, dir,
		            err ? err->msg : "unknown reason");
		break;
	case LP_WATCH_FAILED:
		lp_log_warn("cannot scan the lora directory: %s",
		            err ? err->msg : "unknown reason");
		break;
	}
}

static int load_modules(const struct options *o, struct lp_server *s, struct lp_err *err)
{
	for (int i = 0; i < o->n_lora_modules; i++) {
		const char *spec = o->lora_modules[i], *path;
		char name[LP_LORA_NAME_MAX + 2], where[PATH_MAX], uri[PATH_MAX + 8];
		struct lp_lora_load_args a = {0};
		struct lp_adapter_summary sum;
		struct lp_api_error e;
		bool already;

		if (spec[0] == '{') {
			/* vLLM's JSON form: {"name": ..., "path": ...} */
			json_error_t je;
			json_t *j = json_loads(spec, 0, &je);
			json_t *jn = json_object_get(j, "name"), *jp = json_object_get(j, "path");
			if (!json_is_string(jn) || !json_is_string(jp) ||
			    json_string_length(jn) >= sizeof(name) ||
			    json_string_length(jp) >= sizeof(where)) {
				json_decref(j);
				return lp_errf(
				    err, -EINVAL,
				    "'--lora-modules %.200s' needs string fields 'name' and "
				    "'path'",
				    spec);
			}
			snprintf(name, sizeof(name), "%s", json_string_value(jn));
			snprintf(where, sizeof(where), "%s", json_string_value(jp));
			json_decref(j);
		} else {
			const char *eq = strchr(spec, '=');
			size_t len = (size_t)(eq - spec);
			if (len >= sizeof(name))
				return lp_errf(err, -EINVAL, "adapter name '%.40s...' is too long",
				               spec);
			memcpy(name, spec, len);
			name[len] = '\0';
			snprintf(where, sizeof(where), "%s", eq + 1);
		}
		path = where;
		/* a plain path (relative to the working directory or absolute)
		 * becomes file://<real path> */
		if (!strstr(path, "://")) {
			char real[PATH_MAX];
			if (!realpath(path, real))
				return lp_errf(err, -ENOENT, "adapter '%s': '%s' does not exist",
				               name, path);
			uri_of_dir(real, uri, sizeof(uri));
		} else {
			snprintf(uri, sizeof(uri), "%s", path);
		}
		a.name = name;
		a.uri = uri;
		if (lp_api_lora_load(s, &a, &already, &sum, &e))
			return lp_errf(err, -EINVAL, "adapter '%s' from '%s': %s (HTTP %d)", name,
			               uri, e.message, e.status);
		lp_log_info("loaded adapter '%s' from '%s': %s, rank %d, lora_id %d, %.1f ms", name,
		            uri, sum.format ? sum.format : "?", sum.rank, (int)sum.lora_id,
		            sum.load_ms);
	}
	return 0;
}

/* ---- shutdown ---- */

static void sleep_ms(long ms)
{
	struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

	nanosleep(&ts, NULL);
}

/* Long downloads log their progress every few seconds. */
static void log_download_progress(void *arg, const char *uri, uint64_t done, uint64_t total)
{
	(void)arg;
	if (total)
		lp_log_info("downloading '%s': %.1f of %.1f MiB", uri, (double)done / (1 << 20),
		            (double)total / (1 << 20));
	else
		lp_log_info("downloading '%s': %.1f MiB", uri, (double)done / (1 << 20));
}

int main(int argc, char **argv)
{
	struct options o;
	struct lp_err err = {0};
	struct lp_backend *be = NULL;
	struct lp_model *m = NULL;
	struct lp_engine *e = NULL;
	struct lp_worker *w = NULL;
	struct lp_source_cache *sources = NULL;
	struct lp_watcher *watcher = NULL;
	struct lp_resolver *resolver = NULL;
	struct lp_chat_template ct;
	bool have_ct = false, server_inited = false, server_started = false;
	struct lp_server srv;
	struct lp_server_config sc;
	struct lp_worker_config wc;
	struct lp_engine_stats es;
	char *api_key = NULL, *admin_token = NULL, cache_dir[PATH_MAX];
	const char *base_names[2] = {NULL, NULL};
	const char *roots[MAX_ROOTS + 1];
	sigset_t sigs;
	int status = 1, sig = 0, rc;
	double t0;

	/* loraplane-agent fetch URI DEST: agent/fetch.c */
	if (argc > 1 && !strcmp(argv[1], "fetch"))
		return lp_fetch_main(argc - 1, argv + 1);
	rc = parse_args(argc, argv, &o);
	if (rc) {
		lp_options_release(&o.cli);
		return rc > 0 ? 0 : 2;
	}
	lp_log_setup(o.log_format, o.log_level);

	/* signals are taken by sigwait() in this thread; every thread
	 * created from here on inherits the mask */
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);
	signal(SIGPIPE, SIG_IGN);

	for (int i = 0; i < o.n_roots; i++)
		roots[i] = o.roots[i];
	roots[o.n_roots] = NULL;
	if (o.lora_resolver) {
		/* checked before the device and the model load: a bad prefix fails at once */
		struct lp_resolver_config rc_cfg = {o.lora_resolver, o.resolver_negative_ttl_s,
		                                    roots, 0};
		const char *delay = getenv("LORAPLANE_TEST_RESOLVER_DELAY_MS");
		if (delay && *delay) {
			char *end;
			rc_cfg.test_delay_ms = strtol(delay, &end, 10);
			if (*end || rc_cfg.test_delay_ms < 0 || rc_cfg.test_delay_ms > 60000) {
				lp_errf(&err, -EINVAL,
				        "LORAPLANE_TEST_RESOLVER_DELAY_MS='%s' must be 0 to 60000",
				        delay);
				goto fail;
			}
			lp_log_warn("test hook: each adapter resolution waits %ld ms first",
			            rc_cfg.test_delay_ms);
		}
		if (lp_resolver_new(&resolver, &rc_cfg, &err))
			goto fail;
	}
	/* the backend opens before the ports: a device that cannot be used
	 * is a startup error (or, under auto, the CPU with the reason) */
	{
		char note[LP_ERR_MSG_MAX + 64];
		struct lp_backend_info bi;

		if (lp_backend_open(o.device, o.threads, &be, note, sizeof(note), &err)) {
			char why[LP_ERR_MSG_MAX];

			snprintf(why, sizeof(why), "%s", err.msg);
			lp_errf(&err, err.code, "'--device %s': %s%s", o.device, why,
			        err.code == -ENODEV ? " ('--device cpu' or 'auto' runs on the CPU)"
			                            : "");
			goto fail;
		}
		be->ops->info(be->ctx, &bi);
		lp_log_info("device: %s, %s%s%s%s", bi.name, bi.device, note[0] ? " (" : "", note,
		            note[0] ? ")" : "");
	}
	{
		/* the tests' way to make a device fail (kernels/fault.h) */
		const char *v = getenv("LORAPLANE_TEST_BACKEND_FAIL_AFTER");
		if (v && *v) {
			char *end;
			long n = strtol(v, &end, 10);
			if (*end || lp_backend_fault_wrap(be, n, &err)) {
				lp_errf(&err, -EINVAL,
				        "LORAPLANE_TEST_BACKEND_FAIL_AFTER='%s' must be a "
				        "step count",
				        v);
				goto fail;
			}
			lp_log_warn("test hook: the backend fails after %ld steps", n);
		}
	}
	if (o.api_key_file && read_token(o.api_key_file, &api_key, &err))
		goto fail;
	if (o.admin_token_file && read_token(o.admin_token_file, &admin_token, &err))
		goto fail;

	/* the ports open first: /health answers and /ready says 503 while
	 * the model loads */
	memset(&sc, 0, sizeof(sc));
	sc.host = o.host;
	sc.port = o.port;
	sc.admin_port = o.admin_port;
	sc.tls_cert = o.tls_cert;
	sc.tls_key = o.tls_key;
	sc.api_key = api_key;
	sc.admin_token = admin_token;
	sc.allow_runtime_lora_updating = o.allow_runtime_lora_updating;
	sc.served_name = o.served_name;
	sc.model_source = o.model;
	sc.max_body = (size_t)o.max_request_bytes;
	sc.http_threads = o.http_threads;
	sc.http_header_timeout_s = o.http_header_timeout_s;
	sc.http_body_timeout_s = o.http_body_timeout_s;
	sc.http_max_connections = o.http_max_connections;
	server_inited = true; /* release is safe after a partial init */
	if (lp_server_init(&srv, &sc, &err))
		goto fail;
	if (lp_server_start(&srv, &err))
		goto fail;
	server_started = true;
	{
		const char *scheme = o.tls_cert ? "https" : "http";
		const char *host = o.host && *o.host ? o.host : "0.0.0.0";
		lp_log_info(
		    "listening: api %s://%s:%d, admin %s://%s:%d%s%s%s", scheme, host, srv.pub_port,
		    scheme, host, srv.adm_port, api_key ? " (api key required)" : "",
		    o.allow_runtime_lora_updating ? " (runtime lora updating on the api port)" : "",
		    o.n_roots ? "" : " (file:// adapter loads through the API are refused)");
	}
	if (!admin_token)
		lp_log_warn("the admin port has no token ('--admin-token-file'): anyone who can "
		            "reach port %d can load and unload adapters",
		            srv.adm_port);
	t0 = lp_now();
	if (lp_model_load(&m, o.model, be, &err))
		goto fail;
	if (!o.served_name)
		o.served_name = m->name;
	lp_log_info("loaded model '%s' as '%s' in %.2f s: %d layers, dim %d, vocab %d, %.1f MiB "
	            "of weights, %ld compute threads",
	            o.model, o.served_name, lp_now() - t0, m->cfg.n_layers, m->cfg.dim,
	            m->cfg.vocab_size, (double)m->weight_bytes / (1 << 20),
	            o.threads ? (long)o.threads : sysconf(_SC_NPROCESSORS_ONLN));
	if (setup_chat(&o, m, &ct, &err) == 0) {
		have_ct = true;
	} else {
		if (o.chat_template)
			goto fail;
		lp_log_warn("chat completions are off: %s", err.msg);
	}

	base_names[0] = o.served_name;
	o.ec.base_names = base_names;
	if (lp_engine_new(&e, m, &o.ec, &err))
		goto fail;
	lp_engine_stats(e, &es);
	const struct lp_engine_config *eff = lp_engine_config(e);
	const struct lp_engine_memory *mem = lp_engine_memory(e);
	lp_log_info("memory on %s (%.1f GiB): weights %.1f MiB, LoRA slots and workspaces %.1f "
	            "MiB, activations %.1f MiB, kv cache %.1f MiB (%s, %d blocks of %d tokens = "
	            "%d tokens)",
	            lp_engine_backend_info(e)->name, mem->total / 1073741824.0,
	            mem->weights / 1048576.0, mem->workspaces / 1048576.0,
	            mem->activations / 1048576.0, mem->kv / 1048576.0, lp_dtype_name(eff->kv_type),
	            mem->kv_blocks, eff->block_size, mem->kv_tokens);
	lp_log_info("limits: max-model-len %d, max-num-seqs %d, max-batched-tokens %d; adapters: "
	            "%d device slots, %d in host memory, rank <= %d",
	            eff->max_model_len, eff->max_num_seqs, eff->max_batched_tokens, eff->max_loras,
	            eff->max_cpu_loras, eff->max_lora_rank);
	int max_model_len = eff->max_model_len;
	lp_worker_config_default(&wc);
	if (o.max_queued)
		wc.queue_capacity = o.max_queued;
	if (wc.channel_capacity > max_model_len + 1)
		wc.channel_capacity = max_model_len + 1;
	{
		/* the tests' way to watch requests run and wait (worker.h) */
		const char *v = getenv("LORAPLANE_TEST_STEP_DELAY_MS");
		if (v && *v) {
			char *end;
			long ms = strtol(v, &end, 10);
			if (*end || ms < 1 || ms > 10000) {
				lp_errf(&err, -EINVAL,
				        "LORAPLANE_TEST_STEP_DELAY_MS='%s' must be 1 to 10000", v);
				goto fail;
			}
			wc.test_step_delay_ms = (int)ms;
			lp_log_warn("test hook: every engine step takes %ld ms more", ms);
		}
	}
	if (lp_worker_start(&w, e, &wc, &err))
		goto fail;
	e = NULL; /* the worker owns it */

	/* adapter sources */
	if (o.lora_cache_dir) {
		snprintf(cache_dir, sizeof(cache_dir), "%s", o.lora_cache_dir);
	} else {
		const char *tmp = getenv("TMPDIR");
		snprintf(cache_dir, sizeof(cache_dir), "%s/loraplane-lora-cache-%ld",
		         tmp && *tmp ? tmp : "/tmp", (long)getuid());
	}
	{
		struct lp_source_config scfg;
		memset(&scfg, 0, sizeof(scfg));
		scfg.cache_dir = cache_dir;
		scfg.allowed_roots = roots;
		scfg.progress = log_download_progress;
		scfg.progress_interval_ms = 5000;
		scfg.max_cache_bytes = (uint64_t)o.lora_cache_max_bytes;
		scfg.allow_insecure_endpoints = o.allow_insecure_source_endpoints;
		scfg.in_use = lp_api_source_in_use;
		scfg.in_use_arg = &srv;
		if (lp_source_cache_new(&sources, &scfg, &err)) {
			lp_err_prefix(&err, "adapter sources");
			goto fail;
		}
	}

	srv.cfg.served_name = o.served_name;
	srv.w = w;
	srv.model = m;
	srv.chat = have_ct ? &ct : NULL;
	srv.sources = sources;
	srv.max_model_len = max_model_len;
	srv.resolver = resolver;
	if (resolver)
		lp_log_info("adapters resolved on demand from '%s/NAME' (misses remembered %g s)",
		            lp_resolver_prefix(resolver), o.resolver_negative_ttl_s);

	/* static adapters */
	if (load_modules(&o, &srv, &err))
		goto fail;
	if (o.lora_dir) {
		struct lp_watcher_ops ops = {watch_load, watch_unload, watch_state, watch_report};
		int n;
		if (lp_watcher_new(&watcher, o.lora_dir, &ops, &srv, &err))
			goto fail;
		n = lp_watcher_scan(watcher, &err);
		if (n < 0)
			goto fail;
		lp_log_info("lora directory '%s': %d adapter(s) loaded%s", o.lora_dir, n,
		            o.refresh_s > 0 ? "; watching it" : "");
	}

	if (watcher && o.refresh_s > 0 && lp_watcher_start(watcher, o.refresh_s, &err))
		goto fail;
	atomic_store(&srv.ready, true);
	lp_log_info("ready");

	while (sigwait(&sigs, &sig) != 0 || (sig != SIGTERM && sig != SIGINT))
		;
	/* refuse new work first: once the line below is out, no request is
	 * accepted (tests and operators read it that way) */
	atomic_store(&srv.draining, true);
	lp_log_info("received %s: stopping (waiting up to %.0f s for running requests)",
	            sig == SIGTERM ? "SIGTERM" : "SIGINT", o.drain_s);
	lp_watcher_free(watcher);
	watcher = NULL;
	lp_worker_close(w);
	{
		/* civetweb fails every write once it is told to stop, so the
		 * ports stay open (answering 503) until the running requests are
		 * done; then they close */
		double deadline = lp_now() + o.drain_s;
		while (atomic_load(&srv.in_flight) > 0 && lp_now() < deadline)
			sleep_ms(20);
		if (atomic_load(&srv.in_flight) > 0) {
			lp_log_warn("%d request(s) still running after %.0f s: cancelling them",
			            atomic_load(&srv.in_flight), o.drain_s);
			atomic_store(&srv.aborting, true);
			deadline = lp_now() + 10;
			while (atomic_load(&srv.in_flight) > 0 && lp_now() < deadline)
				sleep_ms(20);
		}
		lp_server_stop(&srv);
	}
	server_started = false;
	lp_log_info("stopped");
	status = 0;
	goto out;

fail:
	lp_log_error("%s", err.msg[0] ? err.msg : "startup failed");
	status = 1;
out:
	if (server_started) {
		atomic_store(&srv.aborting, true);
		lp_server_stop(&srv);
	}
	lp_watcher_free(watcher);
	lp_worker_free(w, 0);
	lp_engine_free(e);
	if (server_inited)
		lp_server_release(&srv);
	lp_source_cache_free(sources);
	lp_resolver_free(resolver);
	if (have_ct)
		lp_chat_template_release(&ct);
	lp_model_free(m);
	lp_backend_destroy(be);
	free(api_key);
	free(admin_token);
	lp_options_release(&o.cli);
	return status;
}
