/* What the operator believes each agent pod holds, keyed by pod UID: the
 * adapters it loaded there (source and digest), the base model its agent
 * reported, the container restart count that belief was built under, and
 * when it was last verified with GET /v1/loras. A restart (new count) or
 * a verification that disagrees replaces the belief, so an agent that
 * came back empty is reloaded. Thread-safe. */
#ifndef LP_OPERATOR_RECONCILE_HOLDINGS_H
#define LP_OPERATOR_RECONCILE_HOLDINGS_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

#include "common/err.h"
#include "operator/reconcile/agents.h"

struct holdings;

int holdings_new(struct holdings **out, struct lp_err *err);
void holdings_free(struct holdings *h);

/* Records the pod's restart count; when it differs from the one known,
 * everything known about the pod is dropped and true is returned. */
bool holdings_observe_restarts(struct holdings *h, const char *uid, int restarts);

/* True (and *out filled) when the pod is believed to hold name. */
bool holdings_get(struct holdings *h, const char *uid, const char *name, struct agent_lora *out);
void holdings_set(struct holdings *h, const char *uid, const char *name,
                  const struct agent_lora *l);
void holdings_forget(struct holdings *h, const char *uid, const char *name);
void holdings_forget_pod(struct holdings *h, const char *uid);

/* The base model the pod's agent reported, if known (into base). */
bool holdings_base(struct holdings *h, const char *uid, char *base, size_t size);
void holdings_set_base(struct holdings *h, const char *uid, const char *base);

/* True when the pod was verified less than max_age seconds ago. */
bool holdings_verified_within(struct holdings *h, const char *uid, double max_age);
/* A mark to take just before asking an agent for its list, for
 * holdings_set_verified(). */
long long holdings_verify_begin(struct holdings *h, const char *uid);
/* Replaces the belief about the pod's adapters with loras (borrowed;
 * GET /v1/loras's object) and stamps the time; names set or forgotten since
 * begin (other workers' loads and unloads that may have raced with the
 * list) keep what those writes said. */
void holdings_set_verified(struct holdings *h, const char *uid, json_t *loras, long long begin);

/* Drops pods whose UID is not a key of live (an object uid -> anything). */
void holdings_prune(struct holdings *h, json_t *live);

size_t holdings_pods(struct holdings *h);

#endif
