/* Adapters resolved on demand: prefix checks, single-flight loads and the
 * negative cache; see resolver.h. */
#include "agent/api/resolver.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "agent/adapters/source.h"
#include "agent/api/loras.h"
#include "agent/api/registry.h"
#include "common/log.h"

enum resolver_scheme { RESOLVER_FILE, RESOLVER_S3, RESOLVER_HF };

/* One load in progress: the first request for a name loads it, the others
 * wait on the resolver's condition variable until done. Freed by whoever
 * drops refs to 0. */
struct flight {
	char name[LP_LORA_NAME_MAX + 1];
	bool done;
	int refs;                    /* the loader and every waiter */
	struct lp_api_error outcome; /* status 0: loaded */
	struct flight *next;
};

/* A name that did not resolve, answered from here until `until`. */
struct miss {
	char name[LP_LORA_NAME_MAX + 1];
	double until; /* lp_now() */
	struct lp_api_error e;
};

struct lp_resolver {
	enum resolver_scheme scheme;
	char prefix[LP_SOURCE_URI_MAX]; /* no trailing '/'; file: file://<real path> */
	char dir[PATH_MAX];             /* file: the prefix's real path */
	double negative_ttl_s;
	long test_delay_ms;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct flight *flights; /* under mu */
	struct miss *misses;    /* under mu: n_misses of cap_misses */
	size_t n_misses, cap_misses;
};

/* ---- the prefix ---- */

static bool below(const char *path, const char *root)
{
	size_t n = strlen(root);

	if (!strcmp(root, "/"))
		return true;
	return !strncmp(path, root, n) && (path[n] == '\0' || path[n] == '/');
}

static int check_file_prefix(struct lp_resolver *r, const char *given, const char *const *roots,
                             struct lp_err *err)
{
	const char *path = given + strlen("file://");
	struct stat st;
	int n_roots = 0;

	if (path[0] != '/')
		return lp_errf(err, -EINVAL, "'--lora-resolver %.200s' is not file:///absolute/dir",
		               given);
	if (!realpath(path, r->dir))
		return lp_errf(err, -ENOENT,
		               "'--lora-resolver %.200s': cannot resolve '%.200s': %s", given, path,
		               strerror(errno));
	if (stat(r->dir, &st) < 0 || !S_ISDIR(st.st_mode))
		return lp_errf(err, -EINVAL,
		               "'--lora-resolver %.200s': '%.200s' is not a directory", given,
		               path);
	for (int i = 0; roots && roots[i]; i++) {
		char real[PATH_MAX];
		n_roots++;
		if (realpath(roots[i], real) && below(r->dir, real))
			goto out_ok;
	}
	if (!n_roots)
		return lp_errf(err, -EINVAL,
		               "'--lora-resolver %.200s' needs '--allowed-local-roots' holding its "
		               "directory: the adapters it resolves load as through the API",
		               given);
	return lp_errf(err, -EINVAL,
	               "'--lora-resolver %.200s' is not below any of the '--allowed-local-roots' "
	               "(after resolving '..' and links)",
	               given);
out_ok:
	if (strlen(r->dir) + strlen("file://") >= sizeof(r->prefix))
		return lp_errf(err, -EINVAL, "'--lora-resolver %.200s' is too long", given);
	snprintf(r->prefix, sizeof(r->prefix), "file://%s", strcmp(r->dir, "/") ? r->dir : "");
	return 0;
}

/* s3://bucket[/prefix] and hf://org, parsed as the sources parse them. */
static int check_remote_prefix(struct lp_resolver *r, const char *given, struct lp_err *err)
{
	char entry[64];
	size_t n = strlen(given);

	while (n > 5 && given[n - 1] == '/')
		n--;
	if (n >= sizeof(r->prefix) - LP_LORA_NAME_MAX - 2)
		return lp_errf(err, -EINVAL, "'--lora-resolver %.200s' is too long", given);
	memcpy(r->prefix, given, n);
	r->prefix[n] = '\0';
	if (r->scheme == RESOLVER_HF && strpbrk(r->prefix + 5, "/@"))
		return lp_errf(err, -EINVAL,
		               "'--lora-resolver %.200s' must be hf://ORG: an adapter 'NAME' is "
		               "the repository ORG/NAME",
		               given);
	if (lp_source_cache_name(r->prefix, entry, sizeof(entry), err))
		return lp_err_prefix(err, "'--lora-resolver %.200s'", given);
	return 0;
}

int lp_resolver_new(struct lp_resolver **out, const struct lp_resolver_config *cfg,
                    struct lp_err *err)
{
	struct lp_resolver *r;
	const char *p = cfg->prefix;
	int rc;

	*out = NULL;
	if (!p || !*p)
		return lp_errf(err, -EINVAL, "'--lora-resolver' needs a uri prefix");
	if (!(cfg->negative_ttl_s >= 0))
		return lp_errf(err, -EINVAL, "'--lora-resolver-negative-ttl' must be 0 or more");
	r = calloc(1, sizeof(*r));
	if (!r)
		return lp_errf(err, -ENOMEM, "out of memory");
	r->negative_ttl_s = cfg->negative_ttl_s;
	r->test_delay_ms = cfg->test_delay_ms;
	if (!strncmp(p, "file://", 7)) {
		r->scheme = RESOLVER_FILE;
		rc = check_file_prefix(r, p, cfg->allowed_roots, err);
	} else if (!strncmp(p, "s3://", 5)) {
		r->scheme = RESOLVER_S3;
		rc = check_remote_prefix(r, p, err);
	} else if (!strncmp(p, "hf://", 5)) {
		r->scheme = RESOLVER_HF;
		rc = check_remote_prefix(r, p, err);
	} else {
		rc = lp_errf(
		    err, -EINVAL,
		    "'--lora-resolver' needs file:///DIR, s3://BUCKET[/PREFIX] or hf://ORG, "
		    "got '%.200s'",
		    p);
	}
	if (rc)
		goto out_free;
	if (pthread_mutex_init(&r->mu, NULL)) {
		rc = lp_errf(err, -ENOMEM, "cannot create a mutex");
		goto out_free;
	}
	if (pthread_cond_init(&r->cv, NULL)) {
		pthread_mutex_destroy(&r->mu);
		rc = lp_errf(err, -ENOMEM, "cannot create a condition variable");
		goto out_free;
	}
	*out = r;
	return 0;
out_free:
	free(r);
	return rc;
}

void lp_resolver_free(struct lp_resolver *r)
{
	if (!r)
		return;
	pthread_cond_destroy(&r->cv);
	pthread_mutex_destroy(&r->mu);
	free(r->misses);
	free(r);
}

const char *lp_resolver_prefix(const struct lp_resolver *r)
{
	return r->prefix;
}

/* ---- names ---- */

static int not_found(struct lp_api_error *e, const char *model, const char *why)
{
	return lp_api_errorf(e, 404, "model_not_found", "model",
	                     "the model '%s' does not exist%s%s%s", model, why ? " (" : "",
	                     why ? why : "", why ? ")" : "");
}

/* Whether name can stand for <prefix>/<name>: every '/'-separated segment
 * is non-empty and does not start with '.' (no hidden entries, no "."),
 * and an hf:// name is one repository name. */
static bool resolvable(const struct lp_resolver *r, const char *name)
{
	const char *seg = name;

	if (r->scheme == RESOLVER_HF && strpbrk(name, "/:"))
		return false;
	for (;;) {
		size_t n = strcspn(seg, "/");
		if (n == 0 || seg[0] == '.')
			return false;
		if (!seg[n])
			return true;
		seg += n + 1;
	}
}

/* ---- the negative cache (under mu) ---- */

static struct miss *miss_find(struct lp_resolver *r, const char *name, double now)
{
	for (size_t i = 0; i < r->n_misses; i++)
		if (r->misses[i].until > now && !strcmp(r->misses[i].name, name))
			return &r->misses[i];
	return NULL;
}

/* Remembers e for name; when full, the entry expiring first makes room
 * (an expired one if any). Out of memory: not remembered. */
static void miss_add(struct lp_resolver *r, const char *name, const struct lp_api_error *e,
                     double now)
{
	struct miss *m = NULL;

	for (size_t i = 0; i < r->n_misses; i++) {
		struct miss *x = &r->misses[i];
		if (!strcmp(x->name, name) || x->until <= now) {
			m = x;
			break;
		}
	}
	if (!m && r->n_misses == r->cap_misses && r->cap_misses < LP_RESOLVER_MISSES_MAX) {
		size_t cap = r->cap_misses ? r->cap_misses * 2 : 64;
		struct miss *grown;
		if (cap > LP_RESOLVER_MISSES_MAX)
			cap = LP_RESOLVER_MISSES_MAX;
		grown = realloc(r->misses, cap * sizeof(*grown));
		if (grown) {
			r->misses = grown;
			r->cap_misses = cap;
		}
	}
	if (!m && r->n_misses < r->cap_misses)
		m = &r->misses[r->n_misses++];
	if (!m && r->n_misses == 0)
		return;
	if (!m) {
		m = &r->misses[0];
		for (size_t i = 1; i < r->n_misses; i++)
			if (r->misses[i].until < m->until)
				m = &r->misses[i];
	}
	snprintf(m->name, sizeof(m->name), "%s", name);
	m->until = now + r->negative_ttl_s;
	m->e = *e;
}

/* Misses that depend on what the source holds: no adapter there (404), or
 * one that cannot be loaded (422). Failures of the network, the source's
 * refusal, a full cache or tier may pass: they are tried again at once. */
static bool cacheable(int status)
{
	return status == 404 || status == 422;
}

/* ---- the load ---- */

/* Loads name from uri: 0, or -status with e as lp_api_lora_load fills it. */
static int fetch(struct lp_resolver *r, struct lp_server *s, const char *name, const char *uri,
                 const char *request_id, struct lp_api_error *e)
{
	struct lp_lora_load_args a = {0};
	struct lp_adapter_summary sum;
	bool already;

	if (r->scheme == RESOLVER_FILE) {
		char real[PATH_MAX], path[PATH_MAX];
		/* the adapter stays in the resolver's directory: a link inside
		 * may not lead elsewhere, even below another allowed root */
		if ((size_t)snprintf(path, sizeof(path), "%s/%s", r->dir, name) >= sizeof(path))
			return lp_api_errorf(e, 400, "invalid_source", NULL,
			                     "the path is too long");
		if (!realpath(path, real)) {
			if (errno == ENOENT || errno == ENOTDIR)
				return lp_api_errorf(e, 404, "source_not_found", NULL,
				                     "'%.300s' does not exist", path);
		} else if (!below(real, r->dir)) {
			return lp_api_errorf(e, 404, "source_not_found", NULL,
			                     "'%.300s' leads outside '%.300s'", path, r->dir);
		}
	}
	a.name = name;
	a.uri = uri;
	a.from_api = r->scheme == RESOLVER_FILE;
	if (lp_api_lora_load(s, &a, &already, &sum, e))
		return -e->status;
	if (!already)
		lp_log(LP_LOG_INFO, request_id,
		       "resolved adapter '%s' from '%s': %s, rank %d, lora_id %d, %.1f ms", name,
		       sum.source, sum.format ? sum.format : "?", sum.rank, (int)sum.lora_id,
		       sum.load_ms);
	return 0;
}

/* Loads name from the prefix (the flight's leader, no lock held); the
 * outcome as the client gets it. */
static int load(struct lp_resolver *r, struct lp_server *s, const char *name,
                const char *request_id, struct lp_api_error *e)
{
	char uri[LP_SOURCE_URI_MAX], why[LP_ERR_MSG_MAX + 32];

	if ((size_t)snprintf(uri, sizeof(uri), "%s/%s", r->prefix, name) >= sizeof(uri))
		return not_found(e, name, "too long for the resolver's prefix");
	lp_log(LP_LOG_INFO, request_id, "resolving adapter '%s' from '%s'", name, uri);
	if (r->test_delay_ms > 0) {
		struct timespec ts = {r->test_delay_ms / 1000,
		                      (r->test_delay_ms % 1000) * 1000000L};
		nanosleep(&ts, NULL);
	}
	if (fetch(r, s, name, uri, request_id, e) == 0)
		return 0;
	/* loaded meanwhile through the admin API (a 409 from its source) */
	if (lp_registry_get(s->loras, name, NULL, 0))
		return 0;
	snprintf(why, sizeof(why), "%s (HTTP %d)", e->message, e->status);
	switch (e->status) {
	case 400: /* invalid_source: the name makes no uri of that scheme */
	case 404:
		not_found(e, name, "no adapter of that name");
		break;
	case 401:
	case 403:
		/* the hub answers 401 for a repository that does not exist (or
		 * that the agent may not read); elsewhere the source refused the
		 * agent, which is not the client's doing */
		if (r->scheme == RESOLVER_HF) {
			not_found(e, name, "no adapter of that name");
		} else {
			e->status = 502;
			e->type = NULL;
			e->code = "source_failed";
		}
		break;
	default:
		break;
	}
	lp_log(LP_LOG_INFO, request_id, "cannot resolve adapter '%s' from '%s': %s%s", name, uri,
	       why, cacheable(e->status) && r->negative_ttl_s > 0 ? "; remembered" : "");
	return -e->status;
}

int lp_resolver_resolve(struct lp_resolver *r, struct lp_server *s, const char *model,
                        const char *request_id, struct lp_api_error *e)
{
	struct lp_err err;
	struct flight *f;
	struct miss *m;
	int rc;

	if (!r)
		return not_found(e, model, NULL);
	if (!lp_lora_name_valid(model, &err) || !resolvable(r, model))
		return not_found(e, model, NULL);

	pthread_mutex_lock(&r->mu);
	m = r->negative_ttl_s > 0 ? miss_find(r, model, lp_now()) : NULL;
	if (m) {
		*e = m->e;
		pthread_mutex_unlock(&r->mu);
		return -e->status;
	}
	for (f = r->flights; f && strcmp(f->name, model); f = f->next)
		;
	if (f) {
		/* another request is loading it: wait for its outcome */
		f->refs++;
		while (!f->done)
			pthread_cond_wait(&r->cv, &r->mu);
		*e = f->outcome;
		rc = -e->status;
		if (--f->refs == 0)
			free(f);
		pthread_mutex_unlock(&r->mu);
		return rc;
	}
	f = calloc(1, sizeof(*f));
	if (!f) {
		pthread_mutex_unlock(&r->mu);
		return lp_api_errorf(e, 500, NULL, NULL, "out of memory");
	}
	snprintf(f->name, sizeof(f->name), "%s", model);
	f->refs = 1;
	f->next = r->flights;
	r->flights = f;
	pthread_mutex_unlock(&r->mu);

	/* a load that ended between the caller's look and the lock */
	rc = lp_registry_get(s->loras, model, NULL, 0) ? 0 : load(r, s, model, request_id, e);

	pthread_mutex_lock(&r->mu);
	if (rc && cacheable(e->status) && r->negative_ttl_s > 0)
		miss_add(r, model, e, lp_now());
	for (struct flight **p = &r->flights; *p; p = &(*p)->next) {
		if (*p == f) {
			*p = f->next;
			break;
		}
	}
	if (rc)
		f->outcome = *e;
	else
		memset(&f->outcome, 0, sizeof(f->outcome));
	f->done = true;
	pthread_cond_broadcast(&r->cv);
	if (--f->refs == 0)
		free(f);
	pthread_mutex_unlock(&r->mu);
	return rc;
}
