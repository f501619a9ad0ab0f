/* loraplane-agent fetch URI DEST: downloads a base model into the
 * directory DEST with the adapter sources' code in model mode
 * (agent/adapters/source.h, lp_source_fetch_model), for a Kubernetes init
 * container that fills a volume before the agent starts with
 * --model DEST. Progress and messages go to stderr, the final line to
 * stdout. Exit status 0 on success, 1 when the fetch failed, 2 for bad
 * usage. See docs/model-fetch.md. */
#include "agent/fetch.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "agent/adapters/source.h"
#include "common/err.h"

#define PROG "loraplane-agent fetch"
/* the sources report at most this often; a model takes minutes */
#define PROGRESS_INTERVAL_MS 5000

struct fetch_options {
	const char *sha256;
	uint64_t max_file_bytes;  /* 0: the default */
	uint64_t max_total_bytes; /* 0: the default */
	long long max_files;      /* 0: the default */
	bool allow_insecure;
	bool quiet;
	const char *uri;
	const char *dest;
};

static const char usage_text[] =
    "usage: " PROG " [options] URI DEST\n"
    "Downloads the base model URI into the directory DEST; the agent then runs\n"
    "with --model DEST. DEST is created when missing; it must otherwise be empty\n"
    "or hold an earlier fetch, which is reused when it is of the same URI and\n"
    "intact.\n"
    "\n"
    "URI:\n"
    "  s3://bucket/prefix             every object under the prefix\n"
    "  s3://bucket/dir/model.gguf     one object\n"
    "  hf://org/repo[@rev]            the repo's model files (config.json,\n"
    "                                 tokenizer files, *.safetensors)\n"
    "  hf://org/repo[@rev]/path/x.gguf  one file of the repo\n"
    "  https://host/dir/              config.json, tokenizer files and the\n"
    "                                 safetensors weights (sharded too)\n"
    "  https://host/model.gguf        one file\n"
    "  file:///path                   a local .gguf file or model directory, copied\n"
    "\n"
    "options:\n"
    "  --sha256 HEX                   the .gguf file must have this SHA-256 (single-file\n"
    "                                 models only)\n"
    "  --max-file-bytes N             largest file (default 274877906944, 256 GiB)\n"
    "  --max-total-bytes N            largest model (default 1099511627776, 1 TiB)\n"
    "  --max-files N                  most files (default 4096)\n"
    "  --allow-insecure-source-endpoints\n"
    "                                 also fetch plain http:// URIs\n"
    "                                 ($LORAPLANE_ALLOW_INSECURE_SOURCE_ENDPOINTS)\n"
    "  --quiet                        no progress lines\n"
    "  --help                         this text\n"
    "\n"
    "environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,\n"
    "AWS_REGION, AWS_ENDPOINT_URL(_S3), AWS_CA_BUNDLE, HF_TOKEN, HF_ENDPOINT,\n"
    "CURL_CA_BUNDLE (docs/adapter-sources.md). Exit status: 0 done, 1 the fetch\n"
    "failed, 2 bad usage.\n";

static int __attribute__((format(printf, 1, 2))) usage_error(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, PROG ": ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\nusage: " PROG " [options] URI DEST (--help for more)\n");
	return 2;
}

static bool env_true(const char *v)
{
	return v && (!strcasecmp(v, "1") || !strcasecmp(v, "true") || !strcasecmp(v, "yes") ||
	             !strcasecmp(v, "on"));
}

static bool env_false(const char *v)
{
	return !v || !v[0] || !strcasecmp(v, "0") || !strcasecmp(v, "false") ||
	       !strcasecmp(v, "no") || !strcasecmp(v, "off");
}

/* A positive decimal integer of at most max. */
static bool parse_count(const char *s, unsigned long long max, unsigned long long *out)
{
	char *end;
	unsigned long long v;

	if (!s || s[0] < '0' || s[0] > '9')
		return false;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || *end || v == 0 || v > max)
		return false;
	*out = v;
	return true;
}

static bool is_hex64(const char *s)
{
	return strlen(s) == 64 && strspn(s, "0123456789abcdefABCDEF") == 64;
}

static bool ends_with_gguf(const char *s)
{
	size_t n = strlen(s);
	return n > 5 && strcasecmp(s + n - 5, ".gguf") == 0;
}

/* Parses argv; returns 0 to run, 1 after --help, 2 for bad usage (with
 * the message printed). */
static int parse(int argc, char **argv, struct fetch_options *o)
{
	const char *env = getenv("LORAPLANE_ALLOW_INSECURE_SOURCE_ENDPOINTS");
	const char *pos[2];
	int n_pos = 0;
	bool flags_done = false;

	memset(o, 0, sizeof(*o));
	if (env && !env_true(env) && !env_false(env))
		return usage_error(
		    "LORAPLANE_ALLOW_INSECURE_SOURCE_ENDPOINTS must be 1, true, yes, "
		    "on, 0, false, no or off, not '%s'",
		    env);
	o->allow_insecure = env_true(env);
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = NULL, *eq;
		char name[64];
		unsigned long long n;

		if (flags_done || a[0] != '-' || strcmp(a, "-") == 0) {
			if (n_pos == 2)
				return usage_error("unexpected argument '%s'", a);
			pos[n_pos++] = a;
			continue;
		}
		if (strcmp(a, "--") == 0) {
			flags_done = true;
			continue;
		}
		if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
			fputs(usage_text, stdout);
			return 1;
		}
		/* --name=value or --name value */
		eq = strchr(a, '=');
		if (strncmp(a, "--", 2) != 0 || (eq ? (size_t)(eq - a) : strlen(a)) >= sizeof(name))
			return usage_error("unknown option '%s'", a);
		snprintf(name, sizeof(name), "%.*s", (int)(eq ? eq - a : (long)strlen(a)), a);
		if (strcmp(name, "--quiet") == 0 ||
		    strcmp(name, "--allow-insecure-source-endpoints") == 0) {
			if (eq)
				return usage_error("'%s' takes no value", name);
			if (name[2] == 'q')
				o->quiet = true;
			else
				o->allow_insecure = true;
			continue;
		}
		if (strcmp(name, "--sha256") != 0 && strcmp(name, "--max-file-bytes") != 0 &&
		    strcmp(name, "--max-total-bytes") != 0 && strcmp(name, "--max-files") != 0)
			return usage_error("unknown option '%s'", a);
		if (eq)
			v = eq + 1;
		else if (i + 1 < argc)
			v = argv[++i];
		else
			return usage_error("'%s' needs a value", name);
		if (strcmp(name, "--sha256") == 0) {
			if (!is_hex64(v))
				return usage_error("'--sha256' needs 64 hex characters, got '%s'",
				                   v);
			o->sha256 = v;
		} else if (strcmp(name, "--max-files") == 0) {
			if (!parse_count(v, INT_MAX, &n))
				return usage_error(
				    "'--max-files' needs an integer in [1, 2147483647], "
				    "got '%s'",
				    v);
			o->max_files = (long long)n;
		} else {
			if (!parse_count(v, UINT64_MAX, &n))
				return usage_error(
				    strcmp(name, "--max-file-bytes") == 0
				        ? "'--max-file-bytes' needs a positive number "
				          "of bytes, got '%s'"
				        : "'--max-total-bytes' needs a positive number "
				          "of bytes, got '%s'",
				    v);
			if (strcmp(name, "--max-file-bytes") == 0)
				o->max_file_bytes = n;
			else
				o->max_total_bytes = n;
		}
	}
	if (n_pos < 2)
		return usage_error("%s", n_pos == 0 ? "missing URI and DEST" : "missing DEST");
	o->uri = pos[0];
	o->dest = pos[1];
	if (!o->dest[0])
		return usage_error("%s", "DEST is empty");
	/* only a single file has one digest to pin */
	if (o->sha256 && !ends_with_gguf(o->uri))
		return usage_error("'--sha256' pins a single-file model, a URI ending in .gguf; "
		                   "'%s' names a directory model",
		                   o->uri);
	return 0;
}

/* "1.5 GiB" */
static void human(uint64_t b, char *out, size_t cap)
{
	static const char *const units[] = {"bytes", "KiB", "MiB", "GiB", "TiB"};
	double v = (double)b;
	int u = 0;

	while (v >= 1024 && u < 4) {
		v /= 1024;
		u++;
	}
	if (u == 0)
		snprintf(out, cap, "%" PRIu64 " bytes", b);
	else
		snprintf(out, cap, "%.1f %s", v, units[u]);
}

static void on_progress(void *arg, const char *uri, uint64_t done, uint64_t total)
{
	char d[32], t[32];

	(void)arg;
	human(done, d, sizeof(d));
	if (total > 0) {
		human(total, t, sizeof(t));
		fprintf(stderr, PROG ": '%s': %s of %s (%d%%)\n", uri, d, t,
		        (int)(done >= total ? 100 : done * 100 / total));
	} else {
		fprintf(stderr, PROG ": '%s': %s so far\n", uri, d);
	}
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int lp_fetch_main(int argc, char **argv)
{
	struct fetch_options o;
	struct lp_source_config cfg;
	struct lp_source_cache *c = NULL;
	struct lp_source_result res;
	struct lp_err err = {0};
	char path[4096], size[32];
	double t0;
	int rc;

	rc = parse(argc, argv, &o);
	if (rc)
		return rc == 1 ? 0 : rc;
	memset(&cfg, 0, sizeof(cfg));
	cfg.model = true;
	cfg.max_file_bytes = o.max_file_bytes;
	cfg.max_total_bytes = o.max_total_bytes;
	cfg.max_files = (int)o.max_files;
	cfg.allow_insecure_endpoints = o.allow_insecure;
	cfg.progress = o.quiet ? NULL : on_progress;
	cfg.progress_interval_ms = PROGRESS_INTERVAL_MS;
	if ((rc = lp_source_cache_new(&c, &cfg, &err)) < 0) {
		fprintf(stderr, PROG ": %s\n", err.msg);
		return 1;
	}
	if (!o.quiet)
		fprintf(stderr, PROG ": fetching '%s' into '%s'\n", o.uri, o.dest);
	t0 = now_s();
	rc = lp_source_fetch_model(c, o.uri, o.sha256, o.dest, path, sizeof(path), &res, &err);
	lp_source_cache_free(c);
	if (rc < 0) {
		fprintf(stderr, PROG ": %s\n", err.msg);
		fprintf(stderr, PROG ": '%s' was not changed\n", o.dest);
		return 1;
	}
	human(res.bytes_total, size, sizeof(size));
	if (res.from_cache)
		fprintf(stderr,
		        PROG ": '%s' already holds '%s' (every file checked); nothing "
		             "downloaded\n",
		        o.dest, o.uri);
	else if (!o.quiet)
		fprintf(stderr, PROG ": %s in %.1f s\n", size, now_s() - t0);
	if (res.sha256[0])
		printf(PROG ": model at '%s': %" PRIu64 " bytes (%s), sha256 %s\n", path,
		       res.bytes_total, size, res.sha256);
	else
		printf(PROG ": model at '%s': %d files, %" PRIu64 " bytes (%s), "
		            "sha256 of each in %s/.loraplane-source.json\n",
		       path, res.files, res.bytes_total, size, path);
	fflush(stdout);
	return 0;
}
