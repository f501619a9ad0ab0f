/* The adapter cache of one engine, in three tiers: a registry of named
 * adapters over the disk tier (an adapter evicted from host memory is read
 * again from its path when a request needs it), the host tier (parsed
 * weights, at most max_cpu_loras resident, LRU) and the device tier (the
 * backend's max_loras LoRA slots, filled with lora_fill, LRU).
 *
 * Pinning: an adapter needed by a waiting or running request stays in host
 * memory; one used by a running request keeps its device slot. A name maps
 * to its newest version; replacing it in place retires the old version,
 * which lives on until the requests using it finish, and is never handed to
 * a new request.
 *
 * Owned by the engine's thread; nothing here is thread-safe. */
#ifndef LP_ENGINE_LORA_CACHE_H
#define LP_ENGINE_LORA_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "agent/adapters/lora.h"
#include "common/err.h"
#include "kernels/backend.h"

/* One loaded version of a named adapter. */
struct lp_adapter {
	char *name;
	char *path;      /* local file or directory its weights are read from */
	char *root;      /* every file of path is opened below it ("" for none) */
	char *source;    /* as the user named it (uri); defaults to path */
	char *sha256;    /* hex digest the user pinned, or "" */
	int32_t lora_id; /* lp_lora_id(name) */
	/* this version's number: unique per install in this process, never
	 * reused; the prefix cache keys blocks by it, so that a replaced
	 * version's blocks are never found again */
	uint64_t version;
	int rank;                     /* largest rank */
	unsigned targets;             /* bitmask of enum lp_lora_target */
	struct lp_lora_absent absent; /* targeted modules the file has no weights for */
	const char *format;
	double load_ms;                 /* time the last parse took */
	struct lp_lora *w;              /* host tier; NULL when evicted to disk */
	int slot;                       /* the backend's LoRA slot, or -1 */
	int seq_refs;                   /* waiting or running requests using this version */
	int running_refs;               /* running requests (pin the slot) */
	bool registered;                /* the current version of its name */
	uint64_t host_stamp, dev_stamp; /* LRU clocks */
	struct lp_adapter *next;
};

enum lp_adapter_tier { LP_TIER_DISK, LP_TIER_HOST, LP_TIER_DEVICE };

struct lp_lora_cache_stats {
	uint64_t loads, unloads;
	uint64_t host_evictions, device_evictions;
	uint64_t host_hits, host_misses;     /* acquire found weights resident or not */
	uint64_t device_hits, device_misses; /* pin found a slot or took one */
	int on_device, on_host, on_disk;
};

struct lp_lora_cache;

/* The stable lora_id of an adapter name: a positive 31-bit hash, the same
 * on every pod. */
int32_t lp_lora_id(const char *name);

/* shape is copied (base_names too). max_loras >= 1, max_cpu_loras >=
 * max_loras. */
int lp_lora_cache_new(struct lp_lora_cache **out, struct lp_backend *be,
                      const struct lp_lora_shape *shape, int max_loras, int max_cpu_loras,
                      struct lp_err *err);
void lp_lora_cache_free(struct lp_lora_cache *c);
const struct lp_lora_shape *lp_lora_cache_shape(const struct lp_lora_cache *c);

/* Registers w (taken, even on failure) under name; path (read again below
 * root, NULL for none, when the weights were evicted from host memory),
 * source and sha256 are copied. If name is registered
 * from the same source and digest, nothing changes and *already is set. If
 * it is registered from another source: -EEXIST unless inplace, which
 * retires the old version. -ENOSPC when the host tier is full of adapters
 * that requests need. */
int lp_lora_cache_install(struct lp_lora_cache *c, const char *name, const char *path,
                          const char *root, const char *source, const char *sha256,
                          struct lp_lora *w, double load_ms, bool inplace, bool *already,
                          struct lp_err *err);
/* Parses path (lp_lora_load) and installs it. */
int lp_lora_cache_load(struct lp_lora_cache *c, const char *name, const char *path,
                       const char *source, const char *sha256, bool inplace, bool *already,
                       struct lp_err *err);
/* Unregisters name (-ENOENT if unknown); requests using it finish on it. */
int lp_lora_cache_unload(struct lp_lora_cache *c, const char *name, struct lp_err *err);

/* The registered version of name, or NULL. */
struct lp_adapter *lp_lora_cache_find(struct lp_lora_cache *c, const char *name);
/* For a new request: the current version of name with its weights in host
 * memory (read again from disk if they were evicted), counted as used.
 * -ENOENT for an unknown name; -EAGAIN when the host tier is full of
 * adapters that waiting or running requests need. */
int lp_lora_cache_acquire(struct lp_lora_cache *c, const char *name, struct lp_adapter **out,
                          struct lp_err *err);
/* Ends a request's use; retired versions are freed with their last use. */
void lp_lora_cache_release(struct lp_lora_cache *c, struct lp_adapter *a);
/* Gives a (acquired) a device slot for a running request, evicting the
 * least recently used slot no running request needs; false when every slot
 * is pinned. */
bool lp_lora_cache_pin(struct lp_lora_cache *c, struct lp_adapter *a);
void lp_lora_cache_unpin(struct lp_lora_cache *c, struct lp_adapter *a);

enum lp_adapter_tier lp_adapter_tier(const struct lp_adapter *a);
const char *lp_adapter_tier_name(enum lp_adapter_tier t);

/* Registered adapters, in load order: call with a NULL cursor first. */
struct lp_adapter *lp_lora_cache_next(struct lp_lora_cache *c, struct lp_adapter *cursor);
void lp_lora_cache_stats(const struct lp_lora_cache *c, struct lp_lora_cache_stats *out);
int lp_lora_cache_max_loras(const struct lp_lora_cache *c);

#endif
