/* The HTTP side's list of loaded adapters (name and source uri), kept in
 * step with the engine's registry by the only code that loads and unloads
 * adapters (agent/api/loras.c).
 *
 * Why a copy: asking the engine (lp_worker_lora_get/list) takes the
 * engine's lock, which its thread holds for every step and re-takes right
 * after releasing it; under continuous generation a caller can wait for
 * seconds. Routing a request to its adapter, /v1/models and the lora-dir
 * watcher read this list instead. The engine stays the authority: a
 * request for a name unloaded a moment ago still gets its 404 from the
 * engine.
 *
 * Thread-safe (one mutex). */
#ifndef LP_API_REGISTRY_H
#define LP_API_REGISTRY_H

#include <stdbool.h>
#include <stddef.h>

#include "common/err.h"

struct lp_registry_entry {
	char name[136];
	char source[1024];
};

struct lp_registry;

int lp_registry_new(struct lp_registry **out, struct lp_err *err);
void lp_registry_free(struct lp_registry *r);

/* Adds name (at the end) or updates its source in place. */
int lp_registry_put(struct lp_registry *r, const char *name, const char *source,
                    struct lp_err *err);
void lp_registry_remove(struct lp_registry *r, const char *name);
/* True when name is listed; its source is copied to source (cap bytes)
 * when source is not NULL. */
bool lp_registry_get(struct lp_registry *r, const char *name, char *source, size_t cap);
/* A copy of every entry in load order (free() it); *n gets the count.
 * NULL with *n = 0 when empty or out of memory. */
struct lp_registry_entry *lp_registry_list(struct lp_registry *r, size_t *n);

#endif
