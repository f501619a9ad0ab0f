/* `loraplane-operator cleanup` (see cleanup.h and docs/operator.md,
 * "Uninstalling"): delete every LoraAdapter in scope, wait for the running
 * operator to unload each from its agents and remove its finalizer, and
 * when it does not within --timeout, remove the finalizer here.
 *
 * The set of adapters left is kept from one list and then from a watch
 * started at the list's resourceVersion (relisting only after a 410), so
 * waiting costs one open request, not polling. The watch ends early when
 * an adapter needs something done (a new one to delete, a finalizer to
 * remove); the work is done between watches, so the watch handler never
 * calls the API. A timer thread raises the stop flag that every watch and
 * backoff sleep checks when the phase's time is up or a signal arrives. */
#include "operator/cleanup.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <curl/curl.h>
#include <jansson.h>

#include "common/buf.h"
#include "operator/kube/backoff.h"
#include "operator/kube/client.h"
#include "operator/kube/clock.h"
#include "operator/kube/config.h"
#include "operator/kube/encoding.h"
#include "operator/kube/patch.h"
#include "operator/kube/watch.h"

#define FINALIZER         "loraplane.io/unload"
#define PATCH_TRIES       10  /* conflicts in a row on one finalizer removal */
#define WATCH_TIMEOUT_S   240 /* server-side; the timer thread ends it sooner */
#define REQUEST_TIMEOUT_S 30.0
#define PROG              "loraplane-operator cleanup"

struct options {
	const char *kubeconfig;
	const char *context;
	const char *ns; /* NULL or "" = all namespaces */
	double timeout;
	double force_timeout;
};

/* One LoraAdapter still in scope. */
struct entry {
	char *key;        /* "namespace/name" */
	char *ns, *name;  /* owned */
	json_t *obj;      /* the latest copy seen (owned reference) */
	bool delete_sent; /* DELETE accepted (or 404) for this uid */
	bool strip_done;  /* our finalizer removed (or no longer there) */
	bool warned;      /* the finalizer-removal warning was logged */
};

struct cleanup {
	const struct options *o;
	struct kube_client *client;
	struct lp_buf path; /* the collection's path */
	struct entry *v;
	size_t n, cap;
	char *rv;           /* the version to watch from (malloc'ed) */
	bool listed;        /* false: list (again) before watching */
	bool ever_listed;   /* a list succeeded once */
	const char *scope;  /* "all namespaces" or "namespace 'x'", for logs */
	bool force;         /* the second phase: remove finalizers */
	bool crd_missing;   /* the list answered 404 */
	bool handler_ended; /* the last watch was ended by on_event */
	size_t deleted;     /* DELETEs accepted */
	size_t gone;        /* adapters seen disappear */
	size_t forced;      /* finalizers removed here */
	atomic_bool stop;   /* the phase's time is up, or a signal came */
	struct lp_err last; /* the last error retried, for the final report */
};

static atomic_bool signalled;

static void logmsg(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logmsg(const char *level, const char *fmt, ...)
{
	struct timespec ts;
	char when[40];
	va_list ap;

	clock_gettime(CLOCK_REALTIME, &ts);
	kube_time_format(&ts, true, when, sizeof(when));
	fprintf(stderr, "%s %-5s ", when, level);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	fflush(stderr);
}

static void usage(FILE *f)
{
	fprintf(f, "usage: loraplane-operator cleanup [options]\n"
	           "\n"
	           "Deletes every LoraAdapter (in --namespace, or in all namespaces) and waits\n"
	           "until the running operator has unloaded each from its agents and let it go.\n"
	           "After --timeout, removes the 'loraplane.io/unload' finalizer itself (the\n"
	           "agents may then still hold the adapter). Run it before the operator is\n"
	           "removed, e.g. as a Helm pre-delete hook.\n"
	           "\n"
	           "  --kubeconfig PATH        kubeconfig (default: in-cluster, $KUBECONFIG, "
	           "~/.kube/config)\n"
	           "  --context NAME           kubeconfig context (default: current-context)\n"
	           "  --namespace NS           only LoraAdapters in NS (default: all namespaces)\n"
	           "  --timeout DURATION       how long to wait for the operator (default 300s)\n"
	           "  --force-timeout DURATION how long to wait for the adapters to go after\n"
	           "                           removing their finalizers (default 30s)\n"
	           "  --help\n"
	           "\n"
	           "Durations are seconds, optionally with a unit: 500ms, 30s, 5m, 1h.\n"
	           "Exit status: 0 no LoraAdapter left, 1 some left or an error, 2 bad usage.\n");
}

/* Returns 0 to run, 1 to exit 0 (--help), -1 on bad usage (reported). */
static int parse_args(int argc, char **argv, struct options *o)
{
	static const char *const str_flags[] = {"--kubeconfig", "--context", "--namespace"};
	static const char *const dur_flags[] = {"--timeout", "--force-timeout"};
	const char **str_dst[] = {&o->kubeconfig, &o->context, &o->ns};
	double *dur_dst[] = {&o->timeout, &o->force_timeout};
	int i;

	for (i = 1; i < argc; i++) {
		const char *a = argv[i], *v, *eq, *name = NULL;
		const char **sdst = NULL;
		double *ddst = NULL;
		size_t n, k;

		if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
			usage(stdout);
			return 1;
		}
		if (strncmp(a, "--", 2) != 0) {
			fprintf(stderr, PROG ": unexpected argument '%s'\n", a);
			return -1;
		}
		eq = strchr(a, '=');
		n = eq ? (size_t)(eq - a) : strlen(a);
		for (k = 0; k < sizeof(str_flags) / sizeof(str_flags[0]); k++)
			if (strlen(str_flags[k]) == n && strncmp(str_flags[k], a, n) == 0) {
				name = str_flags[k];
				sdst = str_dst[k];
			}
		for (k = 0; k < sizeof(dur_flags) / sizeof(dur_flags[0]); k++)
			if (strlen(dur_flags[k]) == n && strncmp(dur_flags[k], a, n) == 0) {
				name = dur_flags[k];
				ddst = dur_dst[k];
			}
		if (!name) {
			fprintf(stderr, PROG ": unknown flag '%.*s' (see --help)\n", (int)n, a);
			return -1;
		}
		if (eq) {
			v = eq + 1;
		} else if (i + 1 < argc) {
			v = argv[++i];
		} else {
			fprintf(stderr, PROG ": flag '%s' needs a value\n", name);
			return -1;
		}
		if (sdst) {
			*sdst = v;
		} else if (kube_parse_duration(v, ddst)) {
			fprintf(stderr, PROG ": invalid duration '%s' for '%s'\n", v, name);
			return -1;
		}
	}
	return 0;
}

static void on_signal(int sig)
{
	atomic_store(&signalled, true);
}

/* ---- the timer that ends a phase ---- */

struct timer {
	pthread_t thread;
	double deadline; /* kube_now_mono() time */
	atomic_bool *stop;
	atomic_bool quit;
};

static void *timer_run(void *arg)
{
	struct timer *t = arg;

	while (!atomic_load(&t->quit)) {
		if (kube_now_mono() >= t->deadline || atomic_load(&signalled)) {
			atomic_store(t->stop, true);
			break;
		}
		kube_sleep(0.05, &t->quit);
	}
	return NULL;
}

/* ---- the adapters left ---- */

static const char *meta_str(json_t *obj, const char *field)
{
	return json_string_value(json_object_get(json_object_get(obj, "metadata"), field));
}

static bool is_deleting(json_t *obj)
{
	return meta_str(obj, "deletionTimestamp") != NULL;
}

static void entry_release(struct entry *e)
{
	free(e->key);
	free(e->ns);
	free(e->name);
	json_decref(e->obj);
	memset(e, 0, sizeof(*e));
}

static struct entry *find(struct cleanup *c, const char *ns, const char *name)
{
	size_t i;

	for (i = 0; i < c->n; i++)
		if (strcmp(c->v[i].ns, ns) == 0 && strcmp(c->v[i].name, name) == 0)
			return &c->v[i];
	return NULL;
}

static void remove_at(struct cleanup *c, size_t i, bool log)
{
	if (log)
		logmsg("info", "LoraAdapter %s is gone", c->v[i].key);
	c->gone++;
	entry_release(&c->v[i]);
	c->v[i] = c->v[--c->n];
}

/* Records obj (borrowed) as the latest copy of its adapter, adding an
 * entry when it is new. A new uid under a known name starts afresh. */
static int upsert(struct cleanup *c, json_t *obj, struct entry **out, struct lp_err *err)
{
	const char *ns = meta_str(obj, "namespace"), *name = meta_str(obj, "name");
	const char *uid = meta_str(obj, "uid");
	struct entry *e;
	size_t n;

	if (!ns || !name)
		return lp_errf(err, -EBADMSG, "a LoraAdapter without metadata.namespace/name");
	e = find(c, ns, name);
	if (e) {
		const char *old_uid = meta_str(e->obj, "uid");

		if (uid && old_uid && strcmp(uid, old_uid) != 0)
			e->delete_sent = e->strip_done = e->warned = false;
		json_decref(e->obj);
		e->obj = json_incref(obj);
		*out = e;
		return 0;
	}
	if (c->n == c->cap) {
		size_t cap = c->cap ? c->cap * 2 : 16;
		struct entry *v = realloc(c->v, cap * sizeof(*v));

		if (!v)
			return lp_errf(err, -ENOMEM, "out of memory");
		c->v = v;
		c->cap = cap;
	}
	e = &c->v[c->n];
	memset(e, 0, sizeof(*e));
	n = strlen(ns) + strlen(name) + 2;
	e->key = malloc(n);
	e->ns = strdup(ns);
	e->name = strdup(name);
	if (!e->key || !e->ns || !e->name) {
		entry_release(e);
		return lp_errf(err, -ENOMEM, "out of memory");
	}
	snprintf(e->key, n, "%s/%s", ns, name);
	e->obj = json_incref(obj);
	c->n++;
	*out = e;
	return 0;
}

static void set_rv(struct cleanup *c, const char *rv)
{
	char *copy;

	if (!rv || !*rv)
		return;
	copy = strdup(rv);
	if (!copy)
		return; /* keep the older version: the watch repeats some events */
	free(c->rv);
	c->rv = copy;
}

/* Whether e needs a call: a DELETE, or (second phase) the finalizer
 * removed. */
static bool needs_action(const struct cleanup *c, const struct entry *e)
{
	bool deleting = is_deleting(e->obj);

	if (!deleting && !e->delete_sent)
		return true;
	return c->force && deleting && !e->strip_done && kube_has_finalizer(e->obj, FINALIZER);
}

/* True when adapters are left but the operator has let go of every one
 * (each is being deleted and none carries our finalizer): only other
 * finalizers hold them, so waiting longer for the operator is pointless. */
static bool only_foreign(const struct cleanup *c)
{
	size_t i;

	if (c->n == 0)
		return false;
	for (i = 0; i < c->n; i++)
		if (!is_deleting(c->v[i].obj) || kube_has_finalizer(c->v[i].obj, FINALIZER))
			return false;
	return true;
}

/* Lists the scope and makes the entries match it: entries not listed are
 * gone, listed ones are added or refreshed (keeping what was done for the
 * same uid). */
static int list_all(struct cleanup *c, struct lp_err *err)
{
	json_t *items = NULL, *item;
	char *rv = NULL;
	size_t i, k;
	bool *seen = NULL;
	int rc;

	rc = kube_list(c->client, c->path.data, NULL, 500, &items, &rv, err);
	if (rc)
		return rc;
	seen = calloc(json_array_size(items) + c->n + 1, sizeof(*seen));
	if (!seen) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	json_array_foreach(items, k, item)
	{
		struct entry *e;

		rc = upsert(c, item, &e, err);
		if (rc)
			goto out;
		seen[e - c->v] = true;
	}
	for (i = c->n; i-- > 0;)
		if (!seen[i])
			remove_at(c, i, true);
	set_rv(c, rv);
	c->listed = true;
	if (!c->ever_listed) {
		size_t deleting = 0;

		for (i = 0; i < c->n; i++)
			deleting += is_deleting(c->v[i].obj);
		logmsg("info", "%zu LoraAdapter(s) in %s (%zu already being deleted)", c->n,
		       c->scope, deleting);
		c->ever_listed = true;
	}
out:
	free(seen);
	free(rv);
	json_decref(items);
	return rc;
}

static int object_path(struct lp_buf *b, const struct entry *e, struct lp_err *err)
{
	lp_buf_reset(b);
	return kube_path(b, &KUBE_GVR_LORAADAPTERS, e->ns, e->name, NULL, err);
}

/* A response that is the object (not a Status) replaces e's copy. */
static void take_copy(struct entry *e, json_t *out)
{
	if (json_is_object(out) && json_is_object(json_object_get(out, "metadata")) &&
	    meta_str(out, "name")) {
		json_decref(e->obj);
		e->obj = json_incref(out);
	}
}

static int delete_one(struct cleanup *c, struct entry *e, struct lp_err *err)
{
	struct lp_buf path;
	json_t *opts, *out = NULL;
	int rc;

	lp_buf_init(&path, 8192);
	rc = object_path(&path, e, err);
	if (rc)
		goto out;
	opts = json_pack("{s:s, s:s, s:s}", "kind", "DeleteOptions", "apiVersion", "v1",
	                 "propagationPolicy", "Background");
	if (!opts) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	rc = kube_call_json(c->client, "DELETE", path.data, "application/json", opts,
	                    REQUEST_TIMEOUT_S, &out, err);
	json_decref(opts);
	if (rc == -ENOENT) {
		/* gone already: the watch reports it */
		e->delete_sent = true;
		rc = 0;
		goto out;
	}
	if (rc)
		goto out;
	e->delete_sent = true;
	c->deleted++;
	take_copy(e, out);
	if (!c->force && is_deleting(e->obj) && kube_has_finalizer(e->obj, FINALIZER))
		logmsg("info", "deleted LoraAdapter %s; waiting for the operator to unload it",
		       e->key);
	else
		logmsg("info", "deleted LoraAdapter %s", e->key);
out:
	json_decref(out);
	lp_buf_release(&path);
	return rc;
}

/* Removes our finalizer from e with a JSON patch guarded by test ops; on
 * a conflict (409, or 422 from a failed test) re-reads and tries again. */
static int strip_one(struct cleanup *c, struct entry *e, struct lp_err *err)
{
	struct lp_buf path;
	json_t *patch = NULL, *out = NULL;
	int rc, tries;

	lp_buf_init(&path, 8192);
	rc = object_path(&path, e, err);
	if (rc)
		goto out;
	for (tries = 0; tries < PATCH_TRIES; tries++) {
		patch = kube_patch_remove_finalizer(e->obj, FINALIZER);
		if (!patch) {
			if (kube_has_finalizer(e->obj, FINALIZER)) {
				rc = lp_errf(err, -ENOMEM, "out of memory");
				goto out;
			}
			e->strip_done = true; /* someone else removed it */
			goto out;
		}
		if (!e->warned) {
			logmsg("warn",
			       "LoraAdapter %s: the operator did not unload it within %gs; "
			       "removing its finalizer '%s' (agents may still hold the adapter "
			       "until they restart)",
			       e->key, c->o->timeout, FINALIZER);
			e->warned = true;
		}
		rc = kube_patch(c->client, path.data, KUBE_PATCH_JSON, patch, &out, err);
		json_decref(patch);
		patch = NULL;
		if (rc == 0 || rc == -ENOENT) {
			if (rc == 0) {
				take_copy(e, out);
				c->forced++;
			}
			e->strip_done = true;
			rc = 0;
			goto out;
		}
		if (rc != -EBUSY && rc != -EINVAL)
			goto out;
		json_decref(out);
		out = NULL;
		rc = kube_get(c->client, path.data, &out, err);
		if (rc == -ENOENT) {
			e->strip_done = true;
			rc = 0;
			goto out;
		}
		if (rc)
			goto out;
		take_copy(e, out);
		json_decref(out);
		out = NULL;
	}
	rc = lp_errf(err, -EBUSY, "LoraAdapter %s: its finalizers kept changing (%d conflicts)",
	             e->key, PATCH_TRIES);
out:
	json_decref(patch);
	json_decref(out);
	lp_buf_release(&path);
	return rc;
}

/* Does what every entry needs; stops at the first failure. */
static int act(struct cleanup *c, struct lp_err *err)
{
	size_t i;
	int rc;

	for (i = 0; i < c->n && !atomic_load(&c->stop); i++) {
		struct entry *e = &c->v[i];

		if (!is_deleting(e->obj) && !e->delete_sent) {
			rc = delete_one(c, e, err);
			if (rc)
				return rc;
		}
		if (c->force && is_deleting(e->obj) && !e->strip_done &&
		    kube_has_finalizer(e->obj, FINALIZER)) {
			rc = strip_one(c, e, err);
			if (rc)
				return rc;
		}
	}
	return 0;
}

static int on_event(void *user, enum kube_event_type type, json_t *obj)
{
	struct cleanup *c = user;
	struct entry *e;
	const char *ns, *name;
	struct lp_err err = {0};

	set_rv(c, meta_str(obj, "resourceVersion"));
	if (type == KUBE_EVENT_BOOKMARK)
		return 0;
	ns = meta_str(obj, "namespace");
	name = meta_str(obj, "name");
	if (!ns || !name)
		return 0;
	if (type == KUBE_EVENT_DELETED) {
		e = find(c, ns, name);
		if (e)
			remove_at(c, (size_t)(e - c->v), true);
		if (c->n == 0) {
			c->handler_ended = true;
			return 1;
		}
		return 0;
	}
	if (upsert(c, obj, &e, &err)) {
		/* out of memory: relist later rather than lose track */
		c->listed = false;
		c->handler_ended = true;
		return 1;
	}
	if (needs_action(c, e) || (!c->force && only_foreign(c))) {
		c->handler_ended = true;
		return 1;
	}
	return 0;
}

static int watch_once(struct cleanup *c, struct lp_err *err)
{
	struct kube_watch_opts wo = {
	    .path = c->path.data,
	    .resource_version = c->rv,
	    .timeout_seconds = WATCH_TIMEOUT_S,
	    .bookmarks = true,
	};

	c->handler_ended = false;
	return kube_watch(c->client, &wo, on_event, c, &c->stop, err);
}

static bool retryable(int rc)
{
	return rc == -EIO || rc == -EAGAIN || rc == -ECONNREFUSED || rc == -ETIMEDOUT ||
	       rc == -EBUSY || rc == -ESTALE;
}

/* A watch is retried after anything but a refusal (credentials, RBAC, a
 * server that cannot watch): a cut or garbled stream heals by watching
 * again. */
static bool watch_retryable(int rc)
{
	return rc != -EACCES && rc != -EPERM && rc != -ENOTSUP && rc != -ENOMEM;
}

/* Sleeps the next backoff delay after a retryable failure; false when the
 * phase ended meanwhile. */
static bool retry_later(struct cleanup *c, struct kube_backoff *bo, const char *what,
                        const struct lp_err *err)
{
	double d = kube_backoff_next(bo);

	c->last = *err;
	logmsg("warn", "%s: %s; retrying in %.1fs", what, err->msg, d);
	return kube_sleep(d, &c->stop);
}

static int stopped(struct cleanup *c, struct lp_err *err)
{
	return atomic_load(&signalled) ? lp_errf(err, -EINTR, "interrupted")
	                               : lp_errf(err, -ETIMEDOUT, "time is up");
}

/* One phase: works until no adapter is left (0), the phase's time is up
 * (-ETIMEDOUT) or a signal came (-EINTR), or a failure that retrying
 * cannot fix (with err). The first phase also ends (1) once only other
 * finalizers than ours hold what is left. */
static int run_phase(struct cleanup *c, struct lp_err *err)
{
	struct kube_backoff bo;
	double started;
	int rc;

	kube_backoff_init(&bo);
	bo.initial = bo.next = 0.5;
	bo.max = 10;
	for (;;) {
		if (atomic_load(&c->stop))
			return stopped(c, err);
		if (!c->listed) {
			rc = list_all(c, err);
			if (rc == -ENOENT && !c->ever_listed) {
				c->crd_missing = true;
				return 0;
			}
			if (rc == -ENOENT) {
				/* the CRD went away meanwhile, and every adapter with it */
				while (c->n > 0)
					remove_at(c, c->n - 1, true);
				return 0;
			}
			if (rc && !retryable(rc))
				return lp_err_prefix(err, "cannot list LoraAdapters");
			if (rc) {
				retry_later(c, &bo, "list LoraAdapters", err);
				continue;
			}
			kube_backoff_reset(&bo);
		}
		rc = act(c, err);
		if (rc && !retryable(rc))
			return rc;
		if (rc) {
			retry_later(c, &bo, "LoraAdapter call", err);
			continue;
		}
		if (c->n == 0)
			return 0;
		if (!c->force && only_foreign(c))
			return 1;
		if (atomic_load(&c->stop))
			return stopped(c, err);
		started = kube_now_mono();
		rc = watch_once(c, err);
		if (c->handler_ended || (rc == 0 && c->n == 0)) {
			kube_backoff_reset(&bo);
			continue; /* something to do, or nothing left */
		}
		if (atomic_load(&c->stop))
			return stopped(c, err);
		if (rc == 0 && kube_now_mono() - started >= 1) {
			kube_backoff_reset(&bo); /* the server ended it: watch on */
		} else if (rc == 0) {
			/* ended at once: do not spin on a server that does that */
			kube_sleep(kube_backoff_next(&bo), &c->stop);
		} else if (rc == -ESTALE || rc == -ENOENT) {
			/* too old (410), or the CRD is gone: relist, after a pause
			 * should the relisted version be too old as well */
			c->listed = false;
			retry_later(c, &bo, "watch LoraAdapters", err);
		} else if (watch_retryable(rc)) {
			retry_later(c, &bo, "watch LoraAdapters", err);
		} else {
			return lp_err_prefix(err, "cannot watch LoraAdapters");
		}
	}
}

/* Runs a phase under a timer that raises c->stop after seconds. */
static int timed_phase(struct cleanup *c, double seconds, struct lp_err *err)
{
	struct timer t = {.deadline = kube_now_mono() + seconds, .stop = &c->stop};
	int rc;

	atomic_store(&c->stop, false);
	atomic_store(&t.quit, false);
	if (pthread_create(&t.thread, NULL, timer_run, &t))
		return lp_errf(err, -EAGAIN, "cannot start a thread");
	rc = run_phase(c, err);
	atomic_store(&t.quit, true);
	pthread_join(t.thread, NULL);
	return rc;
}

/* Logs what is left and why it stays. */
static void report_left(struct cleanup *c)
{
	size_t i;

	for (i = 0; i < c->n; i++) {
		json_t *fins =
		    json_object_get(json_object_get(c->v[i].obj, "metadata"), "finalizers");
		char *list = json_array_size(fins) ? json_dumps(fins, JSON_COMPACT) : NULL;

		logmsg("error", "LoraAdapter %s is still there (%s, finalizers %s)", c->v[i].key,
		       is_deleting(c->v[i].obj) ? "being deleted" : "not deleted",
		       list ? list : "none");
		free(list);
	}
}

static void cleanup_release(struct cleanup *c)
{
	size_t i;

	for (i = 0; i < c->n; i++)
		entry_release(&c->v[i]);
	free(c->v);
	free(c->rv);
	lp_buf_release(&c->path);
	kube_client_free(c->client);
}

int lp_cleanup_main(int argc, char **argv)
{
	struct options o = {.timeout = 300, .force_timeout = 30};
	struct cleanup c = {.o = &o};
	struct kube_config cfg;
	struct lp_err err = {0};
	struct sigaction sa;
	const char *scope;
	char scope_buf[300];
	int rc, status = 1;

	rc = parse_args(argc, argv, &o);
	if (rc)
		return rc > 0 ? 0 : 2;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	curl_global_init(CURL_GLOBAL_ALL);
	json_object_seed(0);
	lp_buf_init(&c.path, 8192);

	if (o.ns && *o.ns)
		snprintf(scope_buf, sizeof(scope_buf), "namespace '%s'", o.ns);
	else
		snprintf(scope_buf, sizeof(scope_buf), "all namespaces");
	scope = c.scope = scope_buf;
	if (kube_config_auto(&cfg, o.kubeconfig, o.context, &err)) {
		logmsg("error", "%s", err.msg);
		goto out;
	}
	logmsg("info",
	       "cleanup: API server %s, LoraAdapters in %s; waiting up to %gs for the operator",
	       cfg.server, scope, o.timeout);
	if (kube_client_new(&c.client, &cfg, &err)) {
		logmsg("error", "%s", err.msg);
		kube_config_release(&cfg);
		goto out;
	}
	if (kube_path(&c.path, &KUBE_GVR_LORAADAPTERS, o.ns, NULL, NULL, &err)) {
		logmsg("error", "%s", err.msg);
		goto out;
	}

	rc = timed_phase(&c, o.timeout, &err);
	if (rc == 0 && c.crd_missing) {
		logmsg("info", "the LoraAdapter API is not served (the CRD is not installed): "
		               "nothing to clean up");
		status = 0;
		goto out;
	}
	if (rc == 0) {
		logmsg("info", "no LoraAdapter left in %s (%zu deleted, %zu gone)", scope,
		       c.deleted, c.gone);
		status = 0;
		goto out;
	}
	if (rc != -ETIMEDOUT && rc != 1) {
		logmsg("error", "%s", err.msg);
		report_left(&c);
		goto out;
	}
	if (rc == 1) {
		logmsg("info",
		       "%zu LoraAdapter(s) left, released by the operator but held by other "
		       "finalizers; waiting up to %gs",
		       c.n, o.force_timeout);
	} else if (!c.ever_listed && o.timeout == 0) {
		logmsg("info", "--timeout 0: removing finalizers without waiting for the operator");
	} else if (!c.ever_listed) {
		logmsg("warn", "could not list LoraAdapters within %gs (%s); trying %gs more",
		       o.timeout, c.last.msg[0] ? c.last.msg : "no answer", o.force_timeout);
	} else {
		logmsg("warn",
		       "%zu LoraAdapter(s) left after %gs: the operator did not unload them; "
		       "removing their finalizers",
		       c.n, o.timeout);
	}
	c.force = true;
	rc = timed_phase(&c, o.force_timeout, &err);
	if (rc == 0) {
		logmsg("info",
		       "no LoraAdapter left in %s (%zu deleted, %zu gone, %zu finalizers removed "
		       "without an unload)",
		       scope, c.deleted, c.gone, c.forced);
		status = 0;
		goto out;
	}
	if (rc == -ETIMEDOUT && !c.ever_listed)
		logmsg("error", "cannot list LoraAdapters: %s",
		       c.last.msg[0] ? c.last.msg : "no answer");
	else if (rc == -ETIMEDOUT)
		logmsg("error", "%zu LoraAdapter(s) still there after --force-timeout %gs", c.n,
		       o.force_timeout);
	else
		logmsg("error", "%s", err.msg);
	report_left(&c);
out:
	cleanup_release(&c);
	curl_global_cleanup();
	return status;
}
