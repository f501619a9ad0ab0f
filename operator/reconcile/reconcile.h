/* The LoraAdapter controller (docs/operator.md, Reconcile): informers on LoraAdapters and
 * agent Pods feed a rate-limited work queue keyed by namespace/name;
 * workers reconcile one resource at a time — finalizer first, then make
 * every running agent pod of the base model hold the adapter (bounded
 * parallel loads with timeouts, verified with GET /v1/loras on resync),
 * then status, Events, and the per-adapter Service + EndpointSlices; on
 * deletion, unload everywhere and remove the finalizer. */
#ifndef LP_OPERATOR_RECONCILE_RECONCILE_H
#define LP_OPERATOR_RECONCILE_RECONCILE_H

#include <stdbool.h>

#include "common/buf.h"
#include "common/err.h"
#include "operator/kube/client.h"

struct reconciler_config {
	struct kube_client *client; /* borrowed; outlives the reconciler */
	const char *ns;             /* namespace to watch; NULL or "" = all */
	int workers;                /* reconcile workers (default 2) */
	int max_concurrent_loads;   /* agent loads in flight at once (default 4) */
	double resync;              /* seconds between verifications (default 60) */
	double load_timeout;        /* POST /v1/loras timeout, seconds (default 300) */
	double agent_timeout;       /* other agent calls, seconds (default 5) */
	const char *agent_token;    /* bearer token for the agents' admin API, or NULL */
	const char *identity;       /* reportingInstance of Events */
	int delete_attempts;        /* unload attempts before giving up (default 5) */
	double retry_max_delay;     /* cap of the per-resource retry backoff (default 30) */
	int watch_timeout_min;      /* watch timeoutSeconds range (default 300..600) */
	int watch_timeout_max;
	/* log sink, called from any thread; level is "info", "warn" or "error" */
	void (*log)(void *user, const char *level, const char *msg);
	void *log_user;
};

struct reconciler;

/* Strings in cfg are copied. */
int reconciler_new(struct reconciler **out, const struct reconciler_config *cfg,
                   struct lp_err *err);
/* Starts the informers, the workers and the resync timer. */
int reconciler_start(struct reconciler *r, struct lp_err *err);
/* Stops everything and waits; in-flight agent calls finish first (they
 * are bounded by their timeouts). */
void reconciler_stop(struct reconciler *r);
void reconciler_free(struct reconciler *r);

/* True once both informers have listed. */
bool reconciler_synced(struct reconciler *r);

/* Appends Prometheus text for the controller's counters to out. */
int reconciler_metrics(struct reconciler *r, struct lp_buf *out, struct lp_err *err);

#endif
