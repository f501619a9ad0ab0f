/* loraplane-agent: loads a base model, serves the OpenAI API on one port
 * and adapter management, metrics and health on another, and loads LoRA
 * adapters from --lora-modules, --lora-dir (optionally watched) and the
 * admin API at run time (docs/api.md).
 *
 * Every flag can also come from the environment: LORAPLANE_<FLAG> (upper
 * case, '-' as '_'), plus the names docs/api.md lists (NIM_*, VLLM_*).
 * Flags win over the environment. Exit status: 0 after a clean shutdown
 * (SIGTERM or SIGINT), 1 on a startup error, 2 for bad usage. */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "agent/adapters/source.h"
#include "agent/adapters/watcher.h"
#include "agent/api/gate.h"
#include "agent/api/loras.h"
#include "agent/api/registry.h"
#include "agent/api/server.h"
#include "agent/engine/chat-template.h"
#include "agent/engine/engine.h"
#include "agent/engine/model.h"
#include "agent/engine/tokenizer.h"
#include "agent/engine/worker.h"
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
	const char *roots[MAX_ROOTS];
	int n_roots;
	int threads;
	const char *api_key_file;
	const char *admin_token_file;
	bool allow_runtime_lora_updating;
	const char *tls_cert;
	const char *tls_key;
	const char *log_format;
	const char *log_level;
	const char *chat_template;
	int http_threads;
	double http_header_timeout_s;
	double http_body_timeout_s;
	int http_max_connections;
	double drain_s;
	long max_request_bytes;
	int max_queued; /* 0: the worker's default */
	struct lp_engine_config ec;
	/* storage for values split out of lists */
	char *owned[MAX_LORA_MODULES + MAX_ROOTS + 8];
	int n_owned;
};

enum {
	OPT_MODEL = 256,
	OPT_SERVED_NAME,
	OPT_DEVICE,
	OPT_HOST,
	OPT_PORT,
	OPT_ADMIN_PORT,
	OPT_LORA_DIR,
	OPT_REFRESH,
	OPT_MAX_LORAS,
	OPT_MAX_CPU_LORAS,
	OPT_MAX_LORA_RANK,
	OPT_LORA_MODULES,
	OPT_LORA_CACHE_DIR,
	OPT_ALLOWED_ROOTS,
	OPT_MAX_NUM_SEQS,
	OPT_MAX_MODEL_LEN,
	OPT_MAX_BATCHED,
	OPT_KV_BYTES,
	OPT_GPU_MEM_UTIL,
	OPT_KV_DTYPE,
	OPT_THREADS,
	OPT_API_KEY_FILE,
	OPT_ADMIN_TOKEN_FILE,
	OPT_ALLOW_RUNTIME,
	OPT_TLS_CERT,
	OPT_TLS_KEY,
	OPT_LOG_FORMAT,
	OPT_LOG_LEVEL,
	OPT_CHAT_TEMPLATE,
	OPT_HTTP_THREADS,
	OPT_HTTP_HEADER_TIMEOUT,
	OPT_HTTP_BODY_TIMEOUT,
	OPT_HTTP_MAX_CONNECTIONS,
	OPT_DRAIN,
	OPT_MAX_REQUEST_BYTES,
	OPT_MAX_QUEUED,
	OPT_ALLOW_BASE_MISMATCH,
	OPT_LORA_CACHE_MAX_BYTES,
	OPT_ALLOW_INSECURE_SOURCE_ENDPOINTS,
	OPT_HELP,
};

/* Each option, with the environment variables that may set it (besides
 * LORAPLANE_<NAME>), in the order they are tried. */
struct opt_spec {
	const char *name;
	int has_arg;
	int id;
	const char *env[3];
};

static const struct opt_spec specs[] = {
    {"model", required_argument, OPT_MODEL, {NULL}},
    {"served-model-name", required_argument, OPT_SERVED_NAME, {NULL}},
    {"device", required_argument, OPT_DEVICE, {NULL}},
    {"host", required_argument, OPT_HOST, {NULL}},
    {"port", required_argument, OPT_PORT, {NULL}},
    {"admin-port", required_argument, OPT_ADMIN_PORT, {NULL}},
    {"lora-dir", required_argument, OPT_LORA_DIR, {"NIM_PEFT_SOURCE", NULL}},
    {"lora-refresh-interval", required_argument, OPT_REFRESH, {"NIM_PEFT_REFRESH_INTERVAL", NULL}},
    {"max-loras", required_argument, OPT_MAX_LORAS, {"NIM_MAX_GPU_LORAS", NULL}},
    {"max-cpu-loras", required_argument, OPT_MAX_CPU_LORAS, {"NIM_MAX_CPU_LORAS", NULL}},
    {"max-lora-rank", required_argument, OPT_MAX_LORA_RANK, {"NIM_MAX_LORA_RANK", NULL}},
    {"lora-modules", required_argument, OPT_LORA_MODULES, {NULL}},
    {"lora-cache-dir", required_argument, OPT_LORA_CACHE_DIR, {"LORAPLANE_LORA_CACHE", NULL}},
    {"allowed-local-roots", required_argument, OPT_ALLOWED_ROOTS, {NULL}},
    {"max-num-seqs", required_argument, OPT_MAX_NUM_SEQS, {NULL}},
    {"max-model-len", required_argument, OPT_MAX_MODEL_LEN, {NULL}},
    {"max-batched-tokens", required_argument, OPT_MAX_BATCHED, {NULL}},
    {"kv-cache-bytes", required_argument, OPT_KV_BYTES, {NULL}},
    {"gpu-memory-utilization", required_argument, OPT_GPU_MEM_UTIL, {NULL}},
    {"kv-cache-dtype", required_argument, OPT_KV_DTYPE, {NULL}},
    {"threads", required_argument, OPT_THREADS, {NULL}},
    {"api-key-file", required_argument, OPT_API_KEY_FILE, {NULL}},
    {"admin-token-file", required_argument, OPT_ADMIN_TOKEN_FILE, {NULL}},
    {"allow-runtime-lora-updating",
     no_argument,
     OPT_ALLOW_RUNTIME,
     {"VLLM_ALLOW_RUNTIME_LORA_UPDATING", NULL}},
    {"tls-cert", required_argument, OPT_TLS_CERT, {NULL}},
    {"tls-key", required_argument, OPT_TLS_KEY, {NULL}},
    {"log-format", required_argument, OPT_LOG_FORMAT, {NULL}},
    {"log-level", required_argument, OPT_LOG_LEVEL, {NULL}},
    {"chat-template", required_argument, OPT_CHAT_TEMPLATE, {NULL}},
    {"http-threads", required_argument, OPT_HTTP_THREADS, {NULL}},
    {"http-header-timeout", required_argument, OPT_HTTP_HEADER_TIMEOUT, {NULL}},
    {"http-body-timeout", required_argument, OPT_HTTP_BODY_TIMEOUT, {NULL}},
    {"http-max-connections", required_argument, OPT_HTTP_MAX_CONNECTIONS, {NULL}},
    {"drain-timeout", required_argument, OPT_DRAIN, {NULL}},
    {"max-request-bytes", required_argument, OPT_MAX_REQUEST_BYTES, {NULL}},
    {"max-queued-requests", required_argument, OPT_MAX_QUEUED, {NULL}},
    {"allow-base-mismatch", no_argument, OPT_ALLOW_BASE_MISMATCH, {NULL}},
    {"lora-cache-max-bytes", required_argument, OPT_LORA_CACHE_MAX_BYTES, {NULL}},
    {"allow-insecure-source-endpoints", no_argument, OPT_ALLOW_INSECURE_SOURCE_ENDPOINTS, {NULL}},
    {"help", no_argument, OPT_HELP, {NULL}},
};
#define N_SPECS (sizeof(specs) / sizeof(specs[0]))

static void usage(FILE *f)
{
	fputs(
	    "usage: " PROG " --model PATH [options]\n"
	    "  --model PATH                  GGUF file or HF model directory ($LORAPLANE_MODEL)\n"
	    "  --served-model-name NAME      the base model's name in the API (default: file or\n"
	    "                                directory stem)\n"
	    "  --device cpu|cuda[:N]|auto    auto: CUDA when usable, else the CPU (default auto)\n"
	    "  --host ADDR                   address to listen on (default: every interface)\n"
	    "  --port N                      OpenAI API port (default 8000; 0: any free port)\n"
	    "  --admin-port N                management, metrics, health (default 8001; 0: any)\n"
	    "  --lora-dir DIR                each subdirectory is an adapter named after it\n"
	    "  --lora-refresh-interval S     rescan --lora-dir every S seconds (default: never)\n"
	    "  --lora-modules NAME=URI ...   static adapters (file://, /abs, s3://, hf://, "
	    "https://)\n"
	    "  --lora-cache-dir DIR          where downloaded adapters go (this user's alone;\n"
	    "                                default $TMPDIR/loraplane-lora-cache-<uid>, 0700)\n"
	    "  --lora-cache-max-bytes N      bytes of downloaded adapters kept; least recently\n"
	    "                                used ones not loaded are evicted (default 32 GiB)\n"
	    "  --allow-insecure-source-endpoints  accept http:// AWS_ENDPOINT_URL / HF_ENDPOINT\n"
	    "                                in a load request's credentials (trusted networks)\n"
	    "  --allowed-local-roots DIRS    file:// loads through the API only below these\n"
	    "                                (comma or colon separated, repeatable)\n"
	    "  --max-loras N --max-cpu-loras N --max-lora-rank R   adapter tiers and limit\n"
	    "  --max-num-seqs N --max-model-len N --max-batched-tokens N --kv-cache-bytes N\n"
	    "  --gpu-memory-utilization F    on a GPU, the KV cache takes what F of its memory\n"
	    "                                leaves after weights, LoRA slots and workspaces "
	    "(0.9)\n"
	    "  --kv-cache-dtype auto|float32|float16|bfloat16   (auto: f32 on the CPU, f16 on "
	    "CUDA)\n"
	    "  --threads N                   compute threads (default: every CPU)\n"
	    "  --api-key-file F              bearer token required on the public /v1/ routes\n"
	    "  --admin-token-file F          bearer token required on the admin port\n"
	    "  --allow-runtime-lora-updating vLLM's load/unload endpoints on the public port too\n"
	    "  --tls-cert F --tls-key F      HTTPS on both ports\n"
	    "  --log-format text|json        (default text)  --log-level debug|info|warn|error\n"
	    "  --chat-template NAME          chatml, llama3, llama2 or mistral instead of "
	    "detecting\n"
	    "  --http-threads N              HTTP worker threads per port (default 64)\n"
	    "  --http-header-timeout S       time to receive a request head (default 5)\n"
	    "  --http-body-timeout S         time to receive a body after its head (default 30)\n"
	    "  --http-max-connections N      open connections per port (default 1024)\n"
	    "  --drain-timeout S             on SIGTERM, wait this long for running requests\n"
	    "                                (default 30)\n"
	    "  --max-request-bytes N         largest request body (default 4194304)\n"
	    "  --max-queued-requests N       requests waiting to enter the engine before 429\n"
	    "                                queue_full (default 1024)\n"
	    "  --allow-base-mismatch         accept adapters trained for another base model\n"
	    "Every flag may also be set as LORAPLANE_<FLAG> in the environment.\n",
	    f);
}

static int parse_long(const char *name, const char *s, long lo, long hi, long *out)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < lo || v > hi) {
		fprintf(stderr, PROG ": '--%s' needs an integer in [%ld, %ld], got '%s'\n", name,
		        lo, hi, s);
		return -1;
	}
	*out = v;
	return 0;
}

static int parse_double(const char *name, const char *s, double lo, double hi, double *out)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s || *end || !(v >= lo && v <= hi)) {
		fprintf(stderr, PROG ": '--%s' needs a number in [%g, %g], got '%s'\n", name, lo,
		        hi, s);
		return -1;
	}
	*out = v;
	return 0;
}

static bool env_true(const char *v)
{
	return !strcasecmp(v, "1") || !strcasecmp(v, "true") || !strcasecmp(v, "yes") ||
	       !strcasecmp(v, "on");
}

static char *keep(struct options *o, char *s)
{
	if (!s || o->n_owned == (int)(sizeof(o->owned) / sizeof(o->owned[0]))) {
		free(s);
		return NULL;
	}
	o->owned[o->n_owned++] = s;
	return s;
}

/* Adds every element of a comma/colon/space separated list. */
static int add_roots(struct options *o, const char *list)
{
	char *copy = keep(o, strdup(list)), *save = NULL, *t;

	if (!copy)
		return -1;
	for (t = strtok_r(copy, ",: \t", &save); t; t = strtok_r(NULL, ",: \t", &save)) {
		if (o->n_roots == MAX_ROOTS) {
			fprintf(stderr, PROG ": at most %d '--allowed-local-roots'\n", MAX_ROOTS);
			return -1;
		}
		o->roots[o->n_roots++] = t;
	}
	return 0;
}

static int add_lora_module(struct options *o, const char *v)
{
	if (o->n_lora_modules == MAX_LORA_MODULES ||
	    (v[0] != '{' && (!strchr(v, '=') || v[0] == '='))) {
		fprintf(stderr,
		        PROG ": '--lora-modules' needs NAME=URI or {\"name\": ..., \"path\": ...} "
		             "(at most %d), got '%s'\n",
		        MAX_LORA_MODULES, v);
		return -1;
	}
	o->lora_modules[o->n_lora_modules++] = v;
	return 0;
}

/* Sets option id from value (from a flag or the environment). */
static int apply(struct options *o, int id, const char *v, bool from_env)
{
	long n;
	double d;

	switch (id) {
	case OPT_MODEL:
		o->model = v;
		break;
	case OPT_SERVED_NAME:
		o->served_name = v;
		break;
	case OPT_DEVICE:
		o->device = v;
		break;
	case OPT_HOST:
		o->host = v;
		break;
	case OPT_PORT:
	case OPT_ADMIN_PORT:
		if (parse_long(id == OPT_PORT ? "port" : "admin-port", v, 0, 65535, &n))
			return -1;
		*(id == OPT_PORT ? &o->port : &o->admin_port) = (int)n;
		break;
	case OPT_LORA_DIR:
		o->lora_dir = v;
		break;
	case OPT_REFRESH:
		if (parse_double("lora-refresh-interval", v, 0, 86400, &o->refresh_s))
			return -1;
		break;
	case OPT_MAX_LORAS:
		if (parse_long("max-loras", v, 1, 4096, &n))
			return -1;
		o->ec.max_loras = (int)n;
		break;
	case OPT_MAX_CPU_LORAS:
		if (parse_long("max-cpu-loras", v, 1, 1 << 20, &n))
			return -1;
		o->ec.max_cpu_loras = (int)n;
		break;
	case OPT_MAX_LORA_RANK:
		if (parse_long("max-lora-rank", v, 1, 4096, &n))
			return -1;
		o->ec.max_lora_rank = (int)n;
		break;
	case OPT_LORA_MODULES:
		if (from_env) {
			/* a space separated list */
			char *copy = keep(o, strdup(v)), *save = NULL, *t;
			if (!copy)
				return -1;
			for (t = strtok_r(copy, " \t\n", &save); t;
			     t = strtok_r(NULL, " \t\n", &save))
				if (add_lora_module(o, t))
					return -1;
			break;
		}
		return add_lora_module(o, v);
	case OPT_LORA_CACHE_DIR:
		o->lora_cache_dir = v;
		break;
	case OPT_ALLOWED_ROOTS:
		return add_roots(o, v);
	case OPT_MAX_NUM_SEQS:
		if (parse_long("max-num-seqs", v, 1, 4096, &n))
			return -1;
		o->ec.max_num_seqs = (int)n;
		break;
	case OPT_MAX_MODEL_LEN:
		if (parse_long("max-model-len", v, 2, 1 << 24, &n))
			return -1;
		o->ec.max_model_len = (int)n;
		break;
	case OPT_MAX_BATCHED:
		if (parse_long("max-batched-tokens", v, 1, 1 << 20, &n))
			return -1;
		o->ec.max_batched_tokens = (int)n;
		break;
	case OPT_KV_BYTES:
		if (parse_long("kv-cache-bytes", v, 1, LONG_MAX, &n))
			return -1;
		o->ec.kv_cache_bytes = (size_t)n;
		break;
	case OPT_GPU_MEM_UTIL:
		if (parse_double("gpu-memory-utilization", v, 0.01, 1,
		                 &o->ec.gpu_memory_utilization))
			return -1;
		break;
	case OPT_KV_DTYPE:
		/* vLLM's values; "auto" is the device's preferred type */
		if (!strcmp(v, "auto")) {
			o->ec.kv_type = LP_DTYPE_COUNT;
		} else if (!strcmp(v, "float32") || !strcmp(v, "f32")) {
			o->ec.kv_type = LP_DTYPE_F32;
		} else if (!strcmp(v, "float16") || !strcmp(v, "f16") || !strcmp(v, "half")) {
			o->ec.kv_type = LP_DTYPE_F16;
		} else if (!strcmp(v, "bfloat16") || !strcmp(v, "bf16")) {
			o->ec.kv_type = LP_DTYPE_BF16;
		} else {
			fprintf(stderr,
			        PROG
			        ": '--kv-cache-dtype' must be auto, float32, float16 or bfloat16, "
			        "got '%s'\n",
			        v);
			return -1;
		}
		break;
	case OPT_THREADS:
		if (parse_long("threads", v, 0, 4096, &n))
			return -1;
		o->threads = (int)n;
		break;
	case OPT_API_KEY_FILE:
		o->api_key_file = v;
		break;
	case OPT_ADMIN_TOKEN_FILE:
		o->admin_token_file = v;
		break;
	case OPT_ALLOW_RUNTIME:
		o->allow_runtime_lora_updating = !from_env || env_true(v);
		break;
	case OPT_TLS_CERT:
		o->tls_cert = v;
		break;
	case OPT_TLS_KEY:
		o->tls_key = v;
		break;
	case OPT_LOG_FORMAT:
		o->log_format = v;
		break;
	case OPT_LOG_LEVEL:
		o->log_level = v;
		break;
	case OPT_CHAT_TEMPLATE:
		o->chat_template = v;
		break;
	case OPT_HTTP_THREADS:
		if (parse_long("http-threads", v, 2, 1024, &n))
			return -1;
		o->http_threads = (int)n;
		break;
	case OPT_HTTP_HEADER_TIMEOUT:
		if (parse_double("http-header-timeout", v, 0.1, 3600, &d))
			return -1;
		o->http_header_timeout_s = d;
		break;
	case OPT_HTTP_BODY_TIMEOUT:
		if (parse_double("http-body-timeout", v, 0.1, 86400, &d))
			return -1;
		o->http_body_timeout_s = d;
		break;
	case OPT_HTTP_MAX_CONNECTIONS:
		if (parse_long("http-max-connections", v, 4, 1 << 20, &n))
			return -1;
		o->http_max_connections = (int)n;
		break;
	case OPT_DRAIN:
		if (parse_double("drain-timeout", v, 0, 3600, &d))
			return -1;
		o->drain_s = d;
		break;
	case OPT_MAX_REQUEST_BYTES:
		if (parse_long("max-request-bytes", v, 1024, 1L << 30, &n))
			return -1;
		o->max_request_bytes = n;
		break;
	case OPT_MAX_QUEUED:
		if (parse_long("max-queued-requests", v, 1, 1 << 20, &n))
			return -1;
		o->max_queued = (int)n;
		break;
	case OPT_LORA_CACHE_MAX_BYTES:
		if (parse_long("lora-cache-max-bytes", v, 1, LONG_MAX, &n))
			return -1;
		o->lora_cache_max_bytes = n;
		break;
	case OPT_ALLOW_INSECURE_SOURCE_ENDPOINTS:
		o->allow_insecure_source_endpoints = !from_env || env_true(v);
		break;
	case OPT_ALLOW_BASE_MISMATCH:
		o->ec.allow_base_mismatch = !from_env || env_true(v);
		break;
	default:
		return -1;
	}
	return 0;
}

/* LORAPLANE_LORA_DIR for "lora-dir". */
static void env_name(const char *opt, char *out, size_t cap)
{
	size_t n = (size_t)snprintf(out, cap, "LORAPLANE_");

	for (; *opt && n + 1 < cap; opt++)
		out[n++] =
		    *opt == '-' ? '_' : (char)(*opt >= 'a' && *opt <= 'z' ? *opt - 32 : *opt);
	out[n] = '\0';
}

static int parse_args(int argc, char **argv, struct options *o)
{
	struct option longopts[N_SPECS + 1];
	int c;

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
	lp_engine_config_default(&o->ec);

	/* the environment first: flags override it */
	for (size_t i = 0; i < N_SPECS; i++) {
		char name[96];
		const char *v;
		if (specs[i].id == OPT_HELP)
			continue;
		env_name(specs[i].name, name, sizeof(name));
		v = getenv(name);
		for (int k = 0; (!v || !*v) && k < 3 && specs[i].env[k]; k++)
			v = getenv(specs[i].env[k]);
		if (v && *v && apply(o, specs[i].id, v, true)) {
			fprintf(stderr, PROG ": (from the environment variable for '--%s')\n",
			        specs[i].name);
			return -1;
		}
	}
	/* flags given on the command line replace lists from the environment */
	bool modules_from_flags = false, roots_from_flags = false;
	for (size_t i = 0; i < N_SPECS; i++) {
		longopts[i].name = specs[i].name;
		longopts[i].has_arg = specs[i].has_arg;
		longopts[i].flag = NULL;
		longopts[i].val = specs[i].id;
	}
	memset(&longopts[N_SPECS], 0, sizeof(longopts[N_SPECS]));
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		if (c == OPT_HELP) {
			usage(stdout);
			exit(0);
		}
		if (c == '?' || c == ':') {
			usage(stderr);
			return -1;
		}
		if (c == OPT_LORA_MODULES && !modules_from_flags) {
			o->n_lora_modules = 0;
			modules_from_flags = true;
		}
		if (c == OPT_ALLOWED_ROOTS && !roots_from_flags) {
			o->n_roots = 0;
			roots_from_flags = true;
		}
		if (apply(o, c, optarg ? optarg : "", false))
			return -1;
		/* like vLLM: --lora-modules a=x b=y takes every following word */
		if (c == OPT_LORA_MODULES || c == OPT_ALLOWED_ROOTS) {
			while (optind < argc && argv[optind][0] != '-') {
				if (apply(o, c, argv[optind], false))
					return -1;
				optind++;
			}
		}
	}
	if (optind < argc) {
		fprintf(stderr, PROG ": unexpected argument '%s'\n", argv[optind]);
		return -1;
	}
	if (!o->model || !*o->model) {
		fprintf(stderr, PROG ": '--model' is required\n");
		usage(stderr);
		return -1;
	}
	if (o->log_format) {
		enum lp_log_format f;
		if (!lp_log_parse_format(o->log_format, &f)) {
			fprintf(stderr,
			        PROG ": '--log-format' must be 'text' or 'json', got '%s'\n",
			        o->log_format);
			return -1;
		}
	}
	if (o->log_level) {
		enum lp_log_level l;
		if (!lp_log_parse_level(o->log_level, &l)) {
			fprintf(stderr,
			        PROG
			        ": '--log-level' must be debug, info, warn or error, got '%s'\n",
			        o->log_level);
			return -1;
		}
	}
	if (o->refresh_s > 0 && !o->lora_dir) {
		fprintf(stderr, PROG ": '--lora-refresh-interval' needs '--lora-dir'\n");
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
	int status = 1, sig = 0;
	double t0;

	if (parse_args(argc, argv, &o)) {
		for (int i = 0; i < o.n_owned; i++)
			free(o.owned[i]);
		return 2;
	}
	{
		enum lp_log_format f = LP_LOG_TEXT;
		enum lp_log_level l = LP_LOG_INFO;
		if (o.log_format)
			lp_log_parse_format(o.log_format, &f);
		if (o.log_level)
			lp_log_parse_level(o.log_level, &l);
		lp_log_setup(f, l);
	}

	/* signals are taken by sigwait() in this thread; every thread
	 * created from here on inherits the mask */
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);
	signal(SIGPIPE, SIG_IGN);

	/* the backend opens before the ports: a device that cannot be used
	 * is a startup error (or, under auto, the CPU with the reason) */
	{
		char note[LP_ERR_MSG_MAX + 64];
		struct lp_backend_info bi;
		enum lp_device_kind kind;
		int dev;

		if (lp_device_parse(o.device, &kind, &dev, &err)) {
			fprintf(stderr, PROG ": '--device': %s\n", err.msg);
			status = 2;
			goto out;
		}
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
	for (int i = 0; i < o.n_roots; i++)
		roots[i] = o.roots[i];
	roots[o.n_roots] = NULL;
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
	if (have_ct)
		lp_chat_template_release(&ct);
	lp_model_free(m);
	lp_backend_destroy(be);
	free(api_key);
	free(admin_token);
	for (int i = 0; i < o.n_owned; i++)
		free(o.owned[i]);
	return status;
}
