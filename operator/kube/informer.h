/* An informer keeps a local cache of one kind of object in sync with the
 * API server — list (paginated), then watch from the list's version with
 * bookmarks, re-watch after a clean end, relist after 410, back off with
 * jitter after errors — and calls handlers for every change, in order,
 * from its own thread.
 *
 * Cached objects are shared, immutable json_t: get/list hand out new
 * references that stay valid after the cache moves on. */
#ifndef LP_OPERATOR_KUBE_INFORMER_H
#define LP_OPERATOR_KUBE_INFORMER_H

#include <stdbool.h>

#include <jansson.h>

#include "common/err.h"
#include "operator/kube/client.h"
#include "operator/kube/clock.h"

/* Called from the informer's thread with borrowed objects (incref to
 * keep). Any may be NULL. Handlers may call kube_informer_get/list. */
struct kube_informer_handlers {
	void (*on_add)(void *user, json_t *obj);
	void (*on_update)(void *user, json_t *old_obj, json_t *new_obj);
	void (*on_delete)(void *user, json_t *obj);
	/* errors and relists worth a log line; msg is borrowed */
	void (*on_log)(void *user, const char *msg);
	void *user;
};

struct kube_informer_opts {
	const struct kube_gvr *gvr;
	const char *ns;             /* NULL or "" = all namespaces */
	const char *label_selector; /* may be NULL */
	int watch_timeout_min;      /* seconds; default 300 */
	int watch_timeout_max;      /* seconds; default 600 */
	int page_size;              /* default 500 */
	/* borrowed, outlives the informer; backoff after errors runs on it
	 * (NULL: the real clock) */
	struct kube_clock *clock;
};

struct kube_informer_stats {
	unsigned long lists, watches, events, errors, expired;
};

struct kube_informer;

/* The client is borrowed and must outlive the informer; opts' strings
 * are copied. */
int kube_informer_new(struct kube_informer **out, struct kube_client *c,
                      const struct kube_informer_opts *opts, const struct kube_informer_handlers *h,
                      struct lp_err *err);
int kube_informer_start(struct kube_informer *inf, struct lp_err *err);
/* Asks the thread to stop without waiting (to stop several at once). */
void kube_informer_request_stop(struct kube_informer *inf);
/* Stops the thread (cancelling a watch in progress) and waits for it. */
void kube_informer_stop(struct kube_informer *inf);
void kube_informer_free(struct kube_informer *inf);

/* True once the first list has been applied to the cache. */
bool kube_informer_synced(struct kube_informer *inf);

/* The cached object ns/name (ns NULL for cluster-scoped), a new
 * reference, or NULL. */
json_t *kube_informer_get(struct kube_informer *inf, const char *ns, const char *name);

/* A new array holding (references to) every cached object. */
json_t *kube_informer_list(struct kube_informer *inf);

void kube_informer_stats(struct kube_informer *inf, struct kube_informer_stats *out);

/* "ns/name" (or "name") of obj into key; false when obj has no name. */
bool kube_object_key(json_t *obj, char *key, size_t size);

#endif
