/* A small Kubernetes REST client over libcurl and jansson.
 *
 * One struct kube_client per process, shared by every thread: requests
 * borrow a curl handle from an internal pool (so connections are reused)
 * and the bearer token is re-read from its file every minute and after a
 * 401. Error responses are never thrown away: the body is parsed as a
 * metav1.Status, kept in the response, and summarised in the lp_err.
 *
 * HTTP errors map to negative errno codes:
 *   400 -EBADMSG  401 -EACCES  403 -EPERM  404 -ENOENT  405 -ENOTSUP
 *   409 -EEXIST (AlreadyExists) / -EBUSY (Conflict)  410 -ESTALE
 *   413 -E2BIG  415 -EPROTO  422 -EINVAL  429 -EAGAIN  5xx -EIO
 *   connect failure -ECONNREFUSED  timeout -ETIMEDOUT  other transport -EIO */
#ifndef LP_OPERATOR_KUBE_CLIENT_H
#define LP_OPERATOR_KUBE_CLIENT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "common/buf.h"
#include "common/err.h"
#include "operator/kube/config.h"

#define KUBE_BODY_MAX (64u << 20) /* cap on any response body */

/* A resource type: group ("" = core), version and plural. */
struct kube_gvr {
	const char *group;
	const char *version;
	const char *plural;
	const char *kind;
};

extern const struct kube_gvr KUBE_GVR_PODS;
extern const struct kube_gvr KUBE_GVR_SERVICES;
extern const struct kube_gvr KUBE_GVR_EVENTS;
extern const struct kube_gvr KUBE_GVR_SECRETS;
extern const struct kube_gvr KUBE_GVR_ENDPOINTSLICES;
extern const struct kube_gvr KUBE_GVR_LEASES;
extern const struct kube_gvr KUBE_GVR_LORAADAPTERS;

/* The parts of a metav1.Status that callers act on. */
struct kube_status {
	long code;       /* HTTP code from the body, else from the response */
	char reason[64]; /* "Conflict", "AlreadyExists", "Expired", "NotFound", ... */
	char message[384];
};

struct kube_response {
	long http_status;          /* 0 when no response arrived */
	struct lp_buf body;        /* the whole body, error bodies too */
	struct kube_status status; /* filled for non-2xx responses */
};

enum kube_patch_type {
	KUBE_PATCH_MERGE, /* application/merge-patch+json */
	KUBE_PATCH_JSON,  /* application/json-patch+json */
};

struct kube_client;

/* Creates a client. Takes ownership of everything in *cfg (cfg is zeroed).
 * *out is freed with kube_client_free. */
int kube_client_new(struct kube_client **out, struct kube_config *cfg, struct lp_err *err);
void kube_client_free(struct kube_client *c);

/* The config the client uses (borrowed; valid until kube_client_free). */
const struct kube_config *kube_client_config(const struct kube_client *c);

/* Counters for /metrics: requests by class (2xx, 4xx, 5xx, failed
 * transport). */
struct kube_client_stats {
	unsigned long ok, client_errors, server_errors, transport_errors, token_reloads;
};
void kube_client_stats(struct kube_client *c, struct kube_client_stats *out);

void kube_response_init(struct kube_response *r);
void kube_response_release(struct kube_response *r);

/* Sends method path (a server-relative path with query) with an optional
 * body of content_type. resp (initialised by the caller) receives the
 * status and the body. Returns 0 for 2xx, else the code from the table
 * above with err naming the method, path, code, reason and message. */
int kube_request(struct kube_client *c, const char *method, const char *path,
                 const char *content_type, const char *body, struct kube_response *resp,
                 struct lp_err *err);

/* Parses a metav1.Status body (or a plain-text one) into st. http is the
 * response code, used when the body has none. Never fails: what cannot
 * be parsed becomes the message. */
void kube_status_parse(const char *body, size_t len, long http, struct kube_status *st);

/* The errno for an HTTP code (and a Status reason, which may be NULL). */
int kube_http_errno(long http, const char *reason);

/* Writes the API path of gvr into b: the collection when name is NULL,
 * else the object, else its subresource when sub is not NULL. ns NULL or
 * "" means all namespaces (collections) or a cluster-scoped object. */
int kube_path(struct lp_buf *b, const struct kube_gvr *gvr, const char *ns, const char *name,
              const char *sub, struct lp_err *err);

/* JSON helpers over kube_request. out (may be NULL) receives the decoded
 * response object, a new reference the caller json_decref's. obj and
 * patch are borrowed. */
int kube_get(struct kube_client *c, const char *path, json_t **out, struct lp_err *err);
int kube_create(struct kube_client *c, const char *path, json_t *obj, json_t **out,
                struct lp_err *err);
int kube_update(struct kube_client *c, const char *path, json_t *obj, json_t **out,
                struct lp_err *err);
int kube_patch(struct kube_client *c, const char *path, enum kube_patch_type type, json_t *patch,
               json_t **out, struct lp_err *err);
/* Any JSON call: body (may be NULL) is encoded and sent with
 * content_type; timeout_s bounds the whole request (<= 0: 30 s). */
int kube_call_json(struct kube_client *c, const char *method, const char *path,
                   const char *content_type, json_t *body, double timeout_s, json_t **out,
                   struct lp_err *err);
/* A 404 is returned as -ENOENT like any other error; callers that treat
 * "already gone" as success check for it. */
int kube_delete(struct kube_client *c, const char *path, struct lp_err *err);

/* Lists the collection at path (no query) with label_selector (may be
 * NULL), page by page with limit/continue. *items is a new array of every
 * item; *resource_version (malloc'ed) is the list's version, to watch
 * from. A continue token that expires mid-way (410) restarts the list
 * once from the beginning. */
int kube_list(struct kube_client *c, const char *path, const char *label_selector, int limit,
              json_t **items, char **resource_version, struct lp_err *err);

/* Streaming GET for watches: calls on_data for every chunk of the body of
 * a 2xx response; a non-2xx body is collected and reported like any
 * error. Stops with -ECANCELED when *stop becomes true or on_data returns
 * non-zero. timeout_s bounds the whole transfer. */
typedef int (*kube_stream_fn)(void *user, const char *data, size_t len);
int kube_stream(struct kube_client *c, const char *path, long timeout_s, kube_stream_fn on_data,
                void *user, const atomic_bool *stop, struct kube_response *resp,
                struct lp_err *err);

#endif
