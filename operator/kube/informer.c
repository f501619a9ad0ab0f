/* List + watch into a local cache; see informer.h. */
#include "operator/kube/informer.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "operator/kube/backoff.h"
#include "operator/kube/clock.h"
#include "operator/kube/encoding.h"
#include "operator/kube/watch.h"

struct kube_informer {
	struct kube_client *client;
	struct kube_informer_handlers h;
	const struct kube_gvr *gvr;
	char *ns;
	char *selector;
	char *path; /* collection path */
	int timeout_min, timeout_max, page_size;
	struct kube_clock *clock; /* borrowed; NULL: the real one */

	pthread_mutex_t lock; /* guards cache */
	json_t *cache;        /* key -> object */
	atomic_bool synced;
	atomic_bool stop;
	pthread_t thread;
	bool running;

	char *rv; /* version to watch from; informer thread only */
	atomic_ulong n_lists, n_watches, n_events, n_errors, n_expired;
};

bool kube_object_key(json_t *obj, char *key, size_t size)
{
	json_t *meta = json_object_get(obj, "metadata");
	const char *ns = json_string_value(json_object_get(meta, "namespace"));
	const char *name = json_string_value(json_object_get(meta, "name"));
	int n;

	if (!name || !*name)
		return false;
	n = ns && *ns ? snprintf(key, size, "%s/%s", ns, name) : snprintf(key, size, "%s", name);
	return n > 0 && (size_t)n < size;
}

static const char *object_rv(json_t *obj)
{
	return json_string_value(
	    json_object_get(json_object_get(obj, "metadata"), "resourceVersion"));
}

static void logf_(struct kube_informer *inf, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void logf_(struct kube_informer *inf, const char *fmt, ...)
{
	char msg[768];
	va_list ap;

	if (!inf->h.on_log)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	inf->h.on_log(inf->h.user, msg);
}

static void set_rv(struct kube_informer *inf, const char *rv)
{
	char *copy;

	if (!rv || !*rv)
		return;
	copy = strdup(rv);
	if (!copy)
		return;
	free(inf->rv);
	inf->rv = copy;
}

int kube_informer_new(struct kube_informer **out, struct kube_client *c,
                      const struct kube_informer_opts *opts, const struct kube_informer_handlers *h,
                      struct lp_err *err)
{
	struct kube_informer *inf;
	struct lp_buf path;
	int rc;

	*out = NULL;
	inf = calloc(1, sizeof(*inf));
	if (!inf)
		return lp_errf(err, -ENOMEM, "out of memory");
	inf->client = c;
	if (h)
		inf->h = *h;
	inf->gvr = opts->gvr;
	inf->clock = opts->clock;
	inf->timeout_min = opts->watch_timeout_min > 0 ? opts->watch_timeout_min : 300;
	inf->timeout_max = opts->watch_timeout_max >= inf->timeout_min ? opts->watch_timeout_max
	                                                               : inf->timeout_min * 2;
	inf->page_size = opts->page_size > 0 ? opts->page_size : 500;
	inf->ns = opts->ns && *opts->ns ? strdup(opts->ns) : NULL;
	inf->selector =
	    opts->label_selector && *opts->label_selector ? strdup(opts->label_selector) : NULL;
	pthread_mutex_init(&inf->lock, NULL);
	inf->cache = json_object();
	lp_buf_init(&path, 4096);
	rc = kube_path(&path, opts->gvr, inf->ns, NULL, NULL, err);
	inf->path = lp_buf_detach(&path, NULL);
	if (!rc && (!inf->cache || !inf->path || (opts->ns && *opts->ns && !inf->ns) ||
	            (opts->label_selector && *opts->label_selector && !inf->selector)))
		rc = lp_errf(err, -ENOMEM, "out of memory");
	if (rc) {
		kube_informer_free(inf);
		return rc;
	}
	*out = inf;
	return 0;
}

/* Replaces the cache with a fresh list and tells the handlers what
 * changed: adds, updates (different resourceVersion), deletes. */
static void apply_list(struct kube_informer *inf, json_t *items)
{
	json_t *fresh = json_object(), *old, *obj, *v;
	const char *key;
	char k[512];
	size_t i;

	if (!fresh)
		return;
	json_array_foreach(items, i, obj)
	{
		if (kube_object_key(obj, k, sizeof(k)))
			json_object_set(fresh, k, obj);
	}
	pthread_mutex_lock(&inf->lock);
	old = inf->cache;
	inf->cache = fresh;
	pthread_mutex_unlock(&inf->lock);

	json_object_foreach(fresh, key, obj)
	{
		json_t *prev = json_object_get(old, key);
		const char *a = object_rv(prev), *b = object_rv(obj);

		if (!prev) {
			if (inf->h.on_add)
				inf->h.on_add(inf->h.user, obj);
		} else if (!a || !b || strcmp(a, b) != 0) {
			if (inf->h.on_update)
				inf->h.on_update(inf->h.user, prev, obj);
		}
	}
	json_object_foreach(old, key, v)
	{
		if (!json_object_get(fresh, key) && inf->h.on_delete)
			inf->h.on_delete(inf->h.user, v);
	}
	json_decref(old);
}

static int on_event(void *user, enum kube_event_type type, json_t *obj)
{
	struct kube_informer *inf = user;
	json_t *prev;
	char key[512];

	atomic_fetch_add(&inf->n_events, 1);
	set_rv(inf, object_rv(obj));
	if (type == KUBE_EVENT_BOOKMARK)
		return 0;
	if (!kube_object_key(obj, key, sizeof(key)))
		return 0;
	pthread_mutex_lock(&inf->lock);
	prev = json_incref(json_object_get(inf->cache, key));
	if (type == KUBE_EVENT_DELETED)
		json_object_del(inf->cache, key);
	else
		json_object_set(inf->cache, key, obj);
	pthread_mutex_unlock(&inf->lock);

	if (type == KUBE_EVENT_DELETED) {
		if (inf->h.on_delete)
			inf->h.on_delete(inf->h.user, obj);
	} else if (prev) {
		if (inf->h.on_update)
			inf->h.on_update(inf->h.user, prev, obj);
	} else if (inf->h.on_add) {
		inf->h.on_add(inf->h.user, obj);
	}
	json_decref(prev);
	return 0;
}

static void *informer_main(void *arg)
{
	struct kube_informer *inf = arg;
	struct kube_backoff bo;
	bool need_list = true;

	kube_backoff_init(&bo);
	while (!atomic_load(&inf->stop)) {
		struct kube_watch_opts wo;
		struct lp_err err = {0};
		unsigned long before;
		double started, d;
		int rc;

		if (need_list) {
			json_t *items = NULL;
			char *rv = NULL;

			atomic_fetch_add(&inf->n_lists, 1);
			rc = kube_list(inf->client, inf->path, inf->selector, inf->page_size,
			               &items, &rv, &err);
			if (rc) {
				d = kube_backoff_next(&bo);
				atomic_fetch_add(&inf->n_errors, 1);
				logf_(inf, "list %s failed, retrying in %.1fs: %s",
				      inf->gvr->plural, d, err.msg);
				kube_clock_sleep(inf->clock, d, &inf->stop);
				continue;
			}
			apply_list(inf, items);
			json_decref(items);
			kube_backoff_reset(&bo);
			free(inf->rv);
			inf->rv = rv;
			need_list = false;
			atomic_store(&inf->synced, true);
		}
		memset(&wo, 0, sizeof(wo));
		wo.path = inf->path;
		wo.label_selector = inf->selector;
		wo.resource_version = inf->rv;
		wo.bookmarks = true;
		wo.timeout_seconds =
		    inf->timeout_min +
		    (int)(kube_random() * (double)(inf->timeout_max - inf->timeout_min + 1));
		if (wo.timeout_seconds > inf->timeout_max)
			wo.timeout_seconds = inf->timeout_max;
		atomic_fetch_add(&inf->n_watches, 1);
		before = atomic_load(&inf->n_events);
		started = kube_clock_mono(inf->clock);
		rc = kube_watch(inf->client, &wo, on_event, inf, &inf->stop, &err);
		if (atomic_load(&inf->stop))
			break;
		/* a stream that delivered something, or stayed up, worked */
		if (atomic_load(&inf->n_events) != before ||
		    kube_clock_mono(inf->clock) - started > 30)
			kube_backoff_reset(&bo);
		if (rc == 0)
			continue; /* clean end: watch again from the last version */
		if (rc == -ESTALE) {
			atomic_fetch_add(&inf->n_expired, 1);
			logf_(inf, "watch of %s: version %s expired, relisting", inf->gvr->plural,
			      inf->rv ? inf->rv : "?");
			need_list = true;
			continue;
		}
		atomic_fetch_add(&inf->n_errors, 1);
		d = kube_backoff_next(&bo);
		logf_(inf, "watch %s failed, retrying in %.1fs: %s", inf->gvr->plural, d, err.msg);
		kube_clock_sleep(inf->clock, d, &inf->stop);
	}
	return NULL;
}

int kube_informer_start(struct kube_informer *inf, struct lp_err *err)
{
	int rc;

	if (inf->running)
		return 0;
	atomic_store(&inf->stop, false);
	rc = pthread_create(&inf->thread, NULL, informer_main, inf);
	if (rc)
		return lp_errf(err, -rc, "cannot start the %s informer thread", inf->gvr->plural);
	inf->running = true;
	return 0;
}

void kube_informer_request_stop(struct kube_informer *inf)
{
	if (inf)
		atomic_store(&inf->stop, true);
}

void kube_informer_stop(struct kube_informer *inf)
{
	if (!inf || !inf->running)
		return;
	atomic_store(&inf->stop, true);
	pthread_join(inf->thread, NULL);
	inf->running = false;
}

void kube_informer_free(struct kube_informer *inf)
{
	if (!inf)
		return;
	kube_informer_stop(inf);
	json_decref(inf->cache);
	pthread_mutex_destroy(&inf->lock);
	free(inf->ns);
	free(inf->selector);
	free(inf->path);
	free(inf->rv);
	free(inf);
}

bool kube_informer_synced(struct kube_informer *inf)
{
	return atomic_load(&inf->synced);
}

json_t *kube_informer_get(struct kube_informer *inf, const char *ns, const char *name)
{
	char key[512];
	json_t *obj;
	int n;

	n = ns && *ns ? snprintf(key, sizeof(key), "%s/%s", ns, name)
	              : snprintf(key, sizeof(key), "%s", name);
	if (n < 0 || (size_t)n >= sizeof(key))
		return NULL;
	pthread_mutex_lock(&inf->lock);
	obj = json_incref(json_object_get(inf->cache, key));
	pthread_mutex_unlock(&inf->lock);
	return obj;
}

json_t *kube_informer_list(struct kube_informer *inf)
{
	json_t *arr = json_array(), *obj;
	const char *key;

	if (!arr)
		return NULL;
	pthread_mutex_lock(&inf->lock);
	json_object_foreach(inf->cache, key, obj)
	{
		json_array_append(arr, obj);
	}
	pthread_mutex_unlock(&inf->lock);
	return arr;
}

void kube_informer_stats(struct kube_informer *inf, struct kube_informer_stats *out)
{
	out->lists = atomic_load(&inf->n_lists);
	out->watches = atomic_load(&inf->n_watches);
	out->events = atomic_load(&inf->n_events);
	out->errors = atomic_load(&inf->n_errors);
	out->expired = atomic_load(&inf->n_expired);
}
