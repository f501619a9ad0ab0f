/* Watches: the streaming body of `GET ...?watch=1` is one JSON object per
 * line, {"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": {...}}.
 * The splitter turns arbitrary chunks into lines; the parser turns a line
 * into an event; kube_watch runs one watch request to its end. */
#ifndef LP_OPERATOR_KUBE_WATCH_H
#define LP_OPERATOR_KUBE_WATCH_H

#include <stdatomic.h>
#include <stdbool.h>

#include <jansson.h>

#include "common/buf.h"
#include "common/err.h"
#include "operator/kube/client.h"

#define KUBE_WATCH_LINE_MAX (16u << 20) /* one event; Kubernetes objects are < 1.5 MiB */

enum kube_event_type {
	KUBE_EVENT_ADDED,
	KUBE_EVENT_MODIFIED,
	KUBE_EVENT_DELETED,
	KUBE_EVENT_BOOKMARK,
	KUBE_EVENT_ERROR,
};

const char *kube_event_type_name(enum kube_event_type t);

/* Splits a byte stream into '\n'-terminated lines (a trailing '\r' is
 * dropped, empty lines are skipped). */
struct kube_line_splitter {
	struct lp_buf partial; /* bytes of a line not yet terminated */
};

typedef int (*kube_line_fn)(void *user, const char *line, size_t len);

void kube_line_splitter_init(struct kube_line_splitter *s, size_t max_line);
void kube_line_splitter_release(struct kube_line_splitter *s);
/* Feeds a chunk; calls fn for each completed line, stopping at (and
 * returning) the first non-zero value. -E2BIG with err when one line
 * grows past max_line. */
int kube_line_splitter_feed(struct kube_line_splitter *s, const char *data, size_t len,
                            kube_line_fn fn, void *user, struct lp_err *err);

/* Parses one watch line. *object receives a new reference (the caller
 * decrefs it). For ERROR events the object is the metav1.Status; its
 * code is in *error_code (0 otherwise). -EBADMSG with err on a line that
 * is not a watch event. */
int kube_watch_parse_line(const char *line, size_t len, enum kube_event_type *type, json_t **object,
                          long *error_code, struct lp_err *err);

/* Called for each event; the object is borrowed for the call. Return
 * non-zero to end the watch (kube_watch then returns -ECANCELED). */
typedef int (*kube_watch_fn)(void *user, enum kube_event_type type, json_t *object);

struct kube_watch_opts {
	const char *path;           /* collection path, no query */
	const char *label_selector; /* may be NULL */
	const char *resource_version;
	int timeout_seconds; /* server-side watch timeout */
	bool bookmarks;      /* allowWatchBookmarks */
};

/* Runs one watch until the server ends it (returns 0), the version is too
 * old (-ESTALE: HTTP 410 or an ERROR event with code 410 — relist), an
 * error, or *stop (-ECANCELED). ERROR events other than 410 end the watch
 * with -EIO. */
int kube_watch(struct kube_client *c, const struct kube_watch_opts *o, kube_watch_fn fn, void *user,
               const atomic_bool *stop, struct lp_err *err);

/* Builds the watch URL for o into b (exposed for tests). */
int kube_watch_url(struct lp_buf *b, const struct kube_watch_opts *o, struct lp_err *err);

#endif
