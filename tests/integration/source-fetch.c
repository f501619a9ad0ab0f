/* Test driver for the adapter sources: fetches each URI given (optionally
 * from several threads at once) and prints one JSON object per fetch on
 * its own line, for tests/integration/test-sources.py.
 *
 *   source-fetch --cache DIR [--root DIR]... [--api] [--sha256 HEX]
 *                [--max-file-bytes N] [--max-total-bytes N] [--max-files N]
 *                [--attempts N] [--backoff-ms N] [--backoff-max-ms N] [--page N]
 *                [--threads N] [--cred KEY=VALUE]... [--cred-thread0 KEY=VALUE]...
 *                [--max-cache-bytes N] [--allow-insecure-endpoints] [--hold]
 *                [--discard] [--evict] URI...
 *
 * --cred gives every fetch credentials of its own (struct
 * lp_source_credentials; KEY is the environment variable it replaces);
 * --cred-thread0 gives thread 0 other ones. After each fetch its hold on
 * the cache entry ends (lp_source_release), as after an adapter load;
 * --hold keeps it (a loaded adapter uses the entry), --discard ends it
 * with discard (the adapter failed to load).
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "agent/adapters/source.h"

#define MAX_THREADS 64

struct progress {
	pthread_mutex_t lock;
	int calls;
	uint64_t last_done;
	uint64_t last_total;
	bool monotonic;
};

static struct progress prog = {PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, true};

static void on_progress(void *arg, const char *uri, uint64_t done, uint64_t total)
{
	(void)arg;
	(void)uri;
	pthread_mutex_lock(&prog.lock);
	if (done < prog.last_done)
		prog.monotonic = false;
	prog.calls++;
	prog.last_done = done;
	prog.last_total = total;
	pthread_mutex_unlock(&prog.lock);
}

struct job {
	struct lp_source_cache *cache;
	const char *uri;
	const char *pin;
	bool api;
	const struct lp_source_credentials *creds;
	pthread_barrier_t *start;
	int rc;
	char path[PATH_MAX];
	struct lp_source_result res;
	struct lp_err err;
};

static void *run_job(void *arg)
{
	struct job *j = arg;

	if (j->start)
		pthread_barrier_wait(j->start);
	j->rc = lp_source_fetch(j->cache, j->uri, j->pin, j->api, j->creds, j->path,
	                        sizeof(j->path), &j->res, &j->err);
	return NULL;
}

static const char *code_name(int rc)
{
	switch (-rc) {
	case 0:
		return "OK";
	case ENOENT:
		return "ENOENT";
	case EACCES:
		return "EACCES";
	case EINVAL:
		return "EINVAL";
	case EIO:
		return "EIO";
	case EFBIG:
		return "EFBIG";
	case EBADMSG:
		return "EBADMSG";
	case ENAMETOOLONG:
		return "ENAMETOOLONG";
	case ENOSPC:
		return "ENOSPC";
	default:
		return "OTHER";
	}
}

static void print_job(const struct job *j)
{
	json_t *o = json_pack(
	    "{s:s, s:i, s:s, s:s, s:s, s:s, s:I, s:I, s:i, s:b, s:b, s:i}", "uri", j->uri, "rc",
	    j->rc, "code", code_name(j->rc), "error", j->rc ? j->err.msg : "", "path", j->path,
	    "sha256", j->res.sha256, "bytes_downloaded", (json_int_t)j->res.bytes_downloaded,
	    "bytes_total", (json_int_t)j->res.bytes_total, "files", j->res.files, "from_cache",
	    j->res.from_cache, "joined", j->res.joined, "http_status", j->res.http_status);
	char *s;

	pthread_mutex_lock(&prog.lock);
	json_object_set_new(o, "progress_calls", json_integer(prog.calls));
	json_object_set_new(o, "progress_done", json_integer((json_int_t)prog.last_done));
	json_object_set_new(o, "progress_total", json_integer((json_int_t)prog.last_total));
	json_object_set_new(o, "progress_monotonic", json_boolean(prog.monotonic));
	pthread_mutex_unlock(&prog.lock);
	s = json_dumps(o, JSON_COMPACT);
	printf("%s\n", s);
	fflush(stdout);
	free(s);
	json_decref(o);
}

static long long num_arg(const char *flag, const char *v)
{
	char *end;
	long long n;

	errno = 0;
	n = strtoll(v ? v : "", &end, 10);
	if (!v || errno || *end || n < 0) {
		fprintf(stderr, "source-fetch: %s needs a non-negative number\n", flag);
		exit(2);
	}
	return n;
}

/* Sets the field of c that KEY=VALUE names; exits on an unknown KEY. */
static void set_cred(struct lp_source_credentials *c, char *kv)
{
	char *eq = kv ? strchr(kv, '=') : NULL;

	if (eq) {
		*eq = '\0';
		if (lp_source_credentials_set(c, kv, eq + 1) == 0)
			return;
		*eq = '=';
	}
	fprintf(stderr, "source-fetch: --cred needs KEY=VALUE with a known KEY, got '%s'\n",
	        kv ? kv : "");
	exit(2);
}

int main(int argc, char **argv)
{
	struct lp_source_credentials creds = {0}, creds0 = {0};
	bool have_creds = false, have_creds0 = false;
	struct lp_source_config cfg = {.progress = on_progress, .progress_interval_ms = 1};
	const char *roots[16] = {NULL};
	const char *pin = NULL;
	struct lp_source_cache *cache = NULL;
	struct lp_err err = {0};
	int n_roots = 0, threads = 1, first_uri = argc;
	bool api = false, evict = false, hold = false, discard = false;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (strcmp(a, "--cache") == 0 && v) {
			cfg.cache_dir = v;
			i++;
		} else if (strcmp(a, "--root") == 0 && v && n_roots < 15) {
			roots[n_roots++] = v;
			i++;
		} else if (strcmp(a, "--api") == 0) {
			api = true;
		} else if (strcmp(a, "--evict") == 0) {
			evict = true;
		} else if (strcmp(a, "--hold") == 0) {
			hold = true;
		} else if (strcmp(a, "--discard") == 0) {
			discard = true;
		} else if (strcmp(a, "--allow-insecure-endpoints") == 0) {
			cfg.allow_insecure_endpoints = true;
		} else if (strcmp(a, "--max-cache-bytes") == 0) {
			cfg.max_cache_bytes = (uint64_t)num_arg(a, v);
			i++;
		} else if (strcmp(a, "--sha256") == 0 && v) {
			pin = v;
			i++;
		} else if (strcmp(a, "--max-file-bytes") == 0) {
			cfg.max_file_bytes = (uint64_t)num_arg(a, v);
			i++;
		} else if (strcmp(a, "--max-total-bytes") == 0) {
			cfg.max_total_bytes = (uint64_t)num_arg(a, v);
			i++;
		} else if (strcmp(a, "--max-files") == 0) {
			cfg.max_files = (int)num_arg(a, v);
			i++;
		} else if (strcmp(a, "--attempts") == 0) {
			cfg.max_attempts = (int)num_arg(a, v);
			i++;
		} else if (strcmp(a, "--backoff-ms") == 0) {
			cfg.backoff_initial_ms = (long)num_arg(a, v);
			cfg.backoff_max_ms = 4 * cfg.backoff_initial_ms;
			i++;
		} else if (strcmp(a, "--backoff-max-ms") == 0) {
			cfg.backoff_max_ms = (long)num_arg(a, v);
			i++;
		} else if (strcmp(a, "--page") == 0) {
			cfg.s3_list_page_size = (int)num_arg(a, v);
			i++;
		} else if (strcmp(a, "--cred") == 0) {
			set_cred(&creds, i + 1 < argc ? argv[i + 1] : NULL);
			have_creds = true;
			i++;
		} else if (strcmp(a, "--cred-thread0") == 0) {
			set_cred(&creds0, i + 1 < argc ? argv[i + 1] : NULL);
			have_creds0 = true;
			i++;
		} else if (strcmp(a, "--threads") == 0) {
			threads = (int)num_arg(a, v);
			if (threads < 1 || threads > MAX_THREADS)
				threads = 1;
			i++;
		} else if (strncmp(a, "--", 2) == 0) {
			fprintf(stderr, "source-fetch: unknown or incomplete option '%s'\n", a);
			return 2;
		} else {
			first_uri = i;
			break;
		}
	}
	cfg.allowed_roots = roots;
	if (lp_source_cache_new(&cache, &cfg, &err) < 0) {
		fprintf(stderr, "source-fetch: %s\n", err.msg);
		return 2;
	}
	for (int u = first_uri; u < argc; u++) {
		struct job jobs[MAX_THREADS];
		pthread_t tid[MAX_THREADS];
		pthread_barrier_t start;

		if (evict && lp_source_evict(cache, argv[u], &err) < 0)
			fprintf(stderr, "source-fetch: evict: %s\n", err.msg);
		pthread_barrier_init(&start, NULL, (unsigned)threads);
		for (int t = 0; t < threads; t++) {
			memset(&jobs[t], 0, sizeof(jobs[t]));
			jobs[t].cache = cache;
			jobs[t].uri = argv[u];
			jobs[t].pin = pin;
			jobs[t].api = api;
			jobs[t].creds = t == 0 && have_creds0 ? &creds0
			                : have_creds          ? &creds
			                                      : NULL;
			jobs[t].start = threads > 1 ? &start : NULL;
			if (threads == 1)
				run_job(&jobs[t]);
			else
				pthread_create(&tid[t], NULL, run_job, &jobs[t]);
		}
		for (int t = 0; t < threads; t++) {
			if (threads > 1)
				pthread_join(tid[t], NULL);
			print_job(&jobs[t]);
			if (jobs[t].res.held && !hold)
				lp_source_release(cache, argv[u], discard);
		}
		pthread_barrier_destroy(&start);
	}
	lp_source_cache_free(cache);
	return 0;
}
