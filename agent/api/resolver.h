/* Adapters resolved on demand (--lora-resolver, docs/adapter-sources.md
 * "Resolved on demand"): a completion or chat request whose model is
 * neither the base model nor a loaded adapter, but is a valid adapter
 * name, loads <prefix>/<name> through lp_api_lora_load (loras.h) on the
 * HTTP thread that asked, then is served. The adapter is an ordinary one
 * afterwards: listed, evictable from the tiers, unloadable.
 *
 * Concurrent requests for the same name share one load (single flight:
 * the first loads, the others wait for its outcome without holding any
 * engine lock). Names that do not resolve (404) or that hold no usable
 * adapter (422) are remembered for negative_ttl_s, so that repeated
 * requests for them reach the source once per that time.
 *
 * Thread-safe (one mutex and one condition variable). */
#ifndef LP_API_RESOLVER_H
#define LP_API_RESOLVER_H

#include "agent/api/errors.h"
#include "agent/api/server.h"
#include "common/err.h"

/* Names remembered as misses at once; past it the one expiring first is
 * forgotten. */
#define LP_RESOLVER_MISSES_MAX 4096
/* --lora-resolver-negative-ttl's default, in seconds. */
#define LP_RESOLVER_NEGATIVE_TTL_DEFAULT 30.0

struct lp_resolver_config {
	/* file:///dir (below one of allowed_roots), s3://bucket[/prefix] or
	 * hf://org; copied */
	const char *prefix;
	/* how long a miss is remembered, in seconds; 0: not at all */
	double negative_ttl_s;
	/* --allowed-local-roots (NULL-terminated, borrowed for the call): a
	 * file:// prefix must lie below one, after resolving links */
	const char *const *allowed_roots;
	/* tests only (LORAPLANE_TEST_RESOLVER_DELAY_MS): a load waits this
	 * long before it starts, so that concurrent first requests surely
	 * overlap it */
	long test_delay_ms;
};

struct lp_resolver;

/* Checks the prefix without touching the network: its scheme, its form,
 * and for file:// that the directory exists below an allowed root.
 * -EINVAL or -ENOENT with a message naming the flag. Free with
 * lp_resolver_free(). */
int lp_resolver_new(struct lp_resolver **out, const struct lp_resolver_config *cfg,
                    struct lp_err *err);
/* NULL-safe. No lp_resolver_resolve may be running. */
void lp_resolver_free(struct lp_resolver *r);

/* The prefix as configured, without trailing '/'. */
const char *lp_resolver_prefix(const struct lp_resolver *r);

/* Makes model (borrowed) servable on s: call it for a model that is
 * neither s's base model nor in s->loras. 0 once the adapter is loaded
 * (by this call or by the one it waited for). Otherwise -status with e:
 * 404 model_not_found when r is NULL (no resolver), for a name that is no
 * valid adapter name (nothing is fetched then), and for one that does not
 * resolve; the other statuses of lp_api_lora_load for a source that holds
 * something it cannot load (422), that failed or refused the agent (502),
 * or no room (507), busy (429). request_id (may be NULL) goes into the
 * log lines. Blocks for the duration of the load. */
int lp_resolver_resolve(struct lp_resolver *r, struct lp_server *s, const char *model,
                        const char *request_id, struct lp_api_error *e);

#endif
