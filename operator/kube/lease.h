/* Leader election on a coordination.k8s.io/v1 Lease, as client-go does
 * it: a candidate takes the Lease when it is free or its holder has not
 * renewed it for leaseDurationSeconds (measured on our own clock from
 * when we last saw the record change, so clocks need not agree); the
 * leader renews every retry period and gives up when it could not renew
 * for the renew deadline. Writes are updates with resourceVersion, so two
 * candidates never both win. */
#ifndef LP_OPERATOR_KUBE_LEASE_H
#define LP_OPERATOR_KUBE_LEASE_H

#include <stdatomic.h>
#include <stdbool.h>

#include <jansson.h>

#include "common/err.h"
#include "operator/kube/client.h"
#include "operator/kube/clock.h"

struct kube_lease_config {
	const char *ns;        /* namespace of the Lease */
	const char *name;      /* name of the Lease */
	const char *identity;  /* this candidate, unique (hostname_pid) */
	double lease_duration; /* default 15 s */
	double renew_deadline; /* default 10 s */
	double retry_period;   /* default 2 s */
	/* borrowed, outlives the elector; the timings above and the Lease's
	 * times run on it (NULL: the real clock). API calls keep real
	 * timeouts. */
	struct kube_clock *clock;
};

struct kube_elector_callbacks {
	void (*started_leading)(void *user);
	/* leadership lost (renewal failed) — the process should stop its
	 * controllers; not called on kube_elector_stop */
	void (*stopped_leading)(void *user);
	void (*new_leader)(void *user, const char *identity); /* may be NULL */
	void (*on_log)(void *user, const char *msg);
	void *user;
};

struct kube_elector;

/* client borrowed; cfg strings copied. */
int kube_elector_new(struct kube_elector **out, struct kube_client *c,
                     const struct kube_lease_config *cfg, const struct kube_elector_callbacks *cb,
                     struct lp_err *err);
int kube_elector_start(struct kube_elector *e, struct lp_err *err);
/* Stops the loop; a leader releases the Lease (empty holder) so that a
 * standby takes over at once. */
void kube_elector_stop(struct kube_elector *e);
void kube_elector_free(struct kube_elector *e);
bool kube_elector_is_leader(struct kube_elector *e);

/* One acquire-or-renew attempt against the Lease (exposed for tests and
 * the loop). Returns 0 and sets *leader to whether we hold it now. */
int kube_elector_try(struct kube_elector *e, bool *leader, struct lp_err *err);

#endif
