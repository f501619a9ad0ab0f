/* The adapter cache (disk, host and device tiers); see lora-cache.h. */
#include "agent/engine/lora-cache.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct lp_lora_cache {
	struct lp_backend *be;
	struct lp_lora_shape shape;
	char **base_names; /* owned copies, NULL-terminated */
	int max_loras, max_cpu_loras;
	struct lp_adapter *all;    /* every live version, registered or retired */
	struct lp_adapter **slots; /* [max_loras] */
	uint64_t clock;
	uint64_t versions; /* the last lp_adapter.version handed out */
	struct lp_lora_cache_stats stats;
};

int32_t lp_lora_id(const char *name)
{
	uint32_t h = 2166136261u; /* FNV-1a */

	for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
		h ^= *p;
		h *= 16777619u;
	}
	h &= 0x7fffffffu;
	return h ? (int32_t)h : 1;
}

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

int lp_lora_cache_new(struct lp_lora_cache **out, struct lp_backend *be,
                      const struct lp_lora_shape *shape, int max_loras, int max_cpu_loras,
                      struct lp_err *err)
{
	struct lp_lora_cache *c;
	size_t n = 0;

	*out = NULL;
	if (max_loras < 1 || max_cpu_loras < max_loras)
		return lp_errf(err, -EINVAL,
		               "max-loras (%d) must be at least 1 and at most max-cpu-loras (%d)",
		               max_loras, max_cpu_loras);
	c = calloc(1, sizeof(*c));
	if (!c)
		return lp_errf(err, -ENOMEM, "out of memory");
	c->be = be;
	c->shape = *shape;
	c->max_loras = max_loras;
	c->max_cpu_loras = max_cpu_loras;
	while (shape->base_names && shape->base_names[n])
		n++;
	c->base_names = calloc(n + 1, sizeof(char *));
	c->slots = calloc((size_t)max_loras, sizeof(*c->slots));
	if (!c->base_names || !c->slots)
		goto oom;
	for (size_t i = 0; i < n; i++)
		if (!(c->base_names[i] = strdup(shape->base_names[i])))
			goto oom;
	c->shape.base_names = (const char *const *)c->base_names;
	*out = c;
	return 0;
oom:
	lp_lora_cache_free(c);
	return lp_errf(err, -ENOMEM, "out of memory");
}

static void drop_slot(struct lp_lora_cache *c, struct lp_adapter *a)
{
	if (a->slot < 0)
		return;
	c->be->ops->lora_clear(c->be->ctx, a->slot);
	c->slots[a->slot] = NULL;
	a->slot = -1;
}

static void adapter_free(struct lp_lora_cache *c, struct lp_adapter *a)
{
	drop_slot(c, a);
	lp_lora_free(a->w);
	free(a->name);
	free(a->path);
	free(a->root);
	free(a->source);
	free(a->sha256);
	free(a);
}

void lp_lora_cache_free(struct lp_lora_cache *c)
{
	struct lp_adapter *a, *next;

	if (!c)
		return;
	for (a = c->all; a; a = next) {
		next = a->next;
		adapter_free(c, a);
	}
	for (size_t i = 0; c->base_names && c->base_names[i]; i++)
		free(c->base_names[i]);
	free(c->base_names);
	free(c->slots);
	free(c);
}

const struct lp_lora_shape *lp_lora_cache_shape(const struct lp_lora_cache *c)
{
	return &c->shape;
}

int lp_lora_cache_max_loras(const struct lp_lora_cache *c)
{
	return c->max_loras;
}

static void unlink_adapter(struct lp_lora_cache *c, struct lp_adapter *a)
{
	for (struct lp_adapter **p = &c->all; *p; p = &(*p)->next)
		if (*p == a) {
			*p = a->next;
			return;
		}
}

/* Frees a retired version once nothing uses it. */
static void maybe_free(struct lp_lora_cache *c, struct lp_adapter *a)
{
	if (!a->registered && a->seq_refs == 0) {
		unlink_adapter(c, a);
		adapter_free(c, a);
	}
}

struct lp_adapter *lp_lora_cache_find(struct lp_lora_cache *c, const char *name)
{
	for (struct lp_adapter *a = c->all; a; a = a->next)
		if (a->registered && !strcmp(a->name, name))
			return a;
	return NULL;
}

static int host_resident(const struct lp_lora_cache *c)
{
	int n = 0;

	for (struct lp_adapter *a = c->all; a; a = a->next)
		n += a->w != NULL;
	return n;
}

/* Makes room for one more adapter in host memory, evicting the least
 * recently used one that no request needs; except is never evicted. */
static bool make_host_room(struct lp_lora_cache *c, const struct lp_adapter *except)
{
	while (host_resident(c) >= c->max_cpu_loras) {
		struct lp_adapter *victim = NULL;
		for (struct lp_adapter *a = c->all; a; a = a->next)
			if (a->w && a != except && a->seq_refs == 0 &&
			    (!victim || a->host_stamp < victim->host_stamp))
				victim = a;
		if (!victim)
			return false;
		drop_slot(c, victim);
		lp_lora_free(victim->w);
		victim->w = NULL;
		c->stats.host_evictions++;
		if (!victim->registered) {
			unlink_adapter(c, victim);
			adapter_free(c, victim);
		}
	}
	return true;
}

static char *dup_or_empty(const char *s)
{
	return strdup(s ? s : "");
}

int lp_lora_cache_install(struct lp_lora_cache *c, const char *name, const char *path,
                          const char *root, const char *source, const char *sha256,
                          struct lp_lora *w, double load_ms, bool inplace, bool *already,
                          struct lp_err *err)
{
	struct lp_adapter *old = lp_lora_cache_find(c, name), *a;

	*already = false;
	if (!source)
		source = path;
	if (!sha256)
		sha256 = "";
	if (old && !strcmp(old->source, source) && !strcmp(old->sha256, sha256) && !inplace) {
		lp_lora_free(w);
		*already = true;
		return 0;
	}
	if (old && !inplace) {
		lp_lora_free(w);
		return lp_errf(
		    err, -EEXIST,
		    "adapter '%s' is already loaded from '%s'; set load_inplace to replace it",
		    name, old->source);
	}
	if (!make_host_room(c, NULL)) {
		lp_lora_free(w);
		return lp_errf(
		    err, -ENOSPC,
		    "no room for adapter '%s': all %d host slots hold adapters that requests need",
		    name, c->max_cpu_loras);
	}
	a = calloc(1, sizeof(*a));
	if (!a) {
		lp_lora_free(w);
		return lp_errf(err, -ENOMEM, "out of memory");
	}
	a->slot = -1;
	a->w = w;
	a->name = strdup(name);
	a->path = strdup(path);
	a->root = dup_or_empty(root);
	a->source = dup_or_empty(source);
	a->sha256 = dup_or_empty(sha256);
	if (!a->name || !a->path || !a->root || !a->source || !a->sha256) {
		adapter_free(c, a);
		return lp_errf(err, -ENOMEM, "out of memory");
	}
	a->lora_id = lp_lora_id(name);
	a->version = ++c->versions;
	a->rank = w->max_rank;
	a->targets = w->targets;
	a->absent = w->absent;
	a->format = w->format;
	a->load_ms = load_ms;
	a->registered = true;
	a->host_stamp = ++c->clock;
	if (old) {
		old->registered = false;
		maybe_free(c, old);
	}
	/* append, so that listing follows load order */
	struct lp_adapter **p = &c->all;
	while (*p)
		p = &(*p)->next;
	*p = a;
	c->stats.loads++;
	return 0;
}

int lp_lora_cache_load(struct lp_lora_cache *c, const char *name, const char *path,
                       const char *source, const char *sha256, bool inplace, bool *already,
                       struct lp_err *err)
{
	struct lp_adapter *old = lp_lora_cache_find(c, name);
	struct lp_lora *w;
	double t0;
	int rc;

	*already = false;
	if (old && !inplace && !strcmp(old->source, source ? source : path) &&
	    !strcmp(old->sha256, sha256 ? sha256 : "")) {
		*already = true;
		return 0;
	}
	t0 = now_ms();
	rc = lp_lora_load(&w, path, &c->shape, err);
	if (rc)
		return rc;
	return lp_lora_cache_install(c, name, path, NULL, source, sha256, w, now_ms() - t0, inplace,
	                             already, err);
}

int lp_lora_cache_unload(struct lp_lora_cache *c, const char *name, struct lp_err *err)
{
	struct lp_adapter *a = lp_lora_cache_find(c, name);

	if (!a)
		return lp_errf(err, -ENOENT, "adapter '%s' is not loaded", name);
	a->registered = false;
	c->stats.unloads++;
	maybe_free(c, a);
	return 0;
}

int lp_lora_cache_acquire(struct lp_lora_cache *c, const char *name, struct lp_adapter **out,
                          struct lp_err *err)
{
	struct lp_adapter *a = lp_lora_cache_find(c, name);
	int rc;

	*out = NULL;
	if (!a)
		return lp_errf(err, -ENOENT, "adapter '%s' is not loaded", name);
	if (a->w) {
		c->stats.host_hits++;
	} else {
		struct lp_lora *w;
		double t0;

		c->stats.host_misses++;
		if (!make_host_room(c, a))
			return lp_errf(err, -EAGAIN,
			               "adapter '%s' must be read from disk, but all %d host slots "
			               "hold adapters that requests need",
			               name, c->max_cpu_loras);
		t0 = now_ms();
		rc = lp_lora_load_in(&w, a->root, a->path, &c->shape, err);
		if (rc)
			return lp_err_prefix(err, "reloading adapter '%s'", name);
		a->w = w;
		a->load_ms = now_ms() - t0;
	}
	a->host_stamp = ++c->clock;
	a->seq_refs++;
	*out = a;
	return 0;
}

void lp_lora_cache_release(struct lp_lora_cache *c, struct lp_adapter *a)
{
	if (!a)
		return;
	a->seq_refs--;
	maybe_free(c, a);
}

/* Puts a's weights into slot s of the device tier: the backend copies them
 * (a device) or records where they are (the CPU, whose slot then aliases
 * a->w until drop_slot, which comes before any free of a->w). */
static bool fill_slot(struct lp_lora_cache *c, struct lp_adapter *a, int s)
{
	const struct lp_lora *w = a->w;
	struct lp_lora_weights lw = {w->n_layers, w->pairs, w->stacks};
	struct lp_err err;

	if (c->be->ops->lora_fill(c->be->ctx, s, &lw, &err))
		return false;
	a->slot = s;
	c->slots[s] = a;
	return true;
}

bool lp_lora_cache_pin(struct lp_lora_cache *c, struct lp_adapter *a)
{
	int s = -1;

	if (a->slot >= 0) {
		c->stats.device_hits++;
	} else {
		for (int i = 0; i < c->max_loras && s < 0; i++)
			if (!c->slots[i])
				s = i;
		if (s < 0) {
			struct lp_adapter *victim = NULL;
			for (int i = 0; i < c->max_loras; i++) {
				struct lp_adapter *v = c->slots[i];
				if (v->running_refs == 0 &&
				    (!victim || v->dev_stamp < victim->dev_stamp))
					victim = v;
			}
			if (!victim)
				return false;
			s = victim->slot;
			drop_slot(c, victim);
			c->stats.device_evictions++;
		}
		if (!fill_slot(c, a, s))
			return false;
		c->stats.device_misses++;
	}
	a->dev_stamp = ++c->clock;
	a->running_refs++;
	return true;
}

void lp_lora_cache_unpin(struct lp_lora_cache *c, struct lp_adapter *a)
{
	a->running_refs--;
}

enum lp_adapter_tier lp_adapter_tier(const struct lp_adapter *a)
{
	if (a->slot >= 0)
		return LP_TIER_DEVICE;
	return a->w ? LP_TIER_HOST : LP_TIER_DISK;
}

const char *lp_adapter_tier_name(enum lp_adapter_tier t)
{
	switch (t) {
	case LP_TIER_DEVICE:
		return "device";
	case LP_TIER_HOST:
		return "host";
	default:
		return "disk";
	}
}

struct lp_adapter *lp_lora_cache_next(struct lp_lora_cache *c, struct lp_adapter *cursor)
{
	struct lp_adapter *a = cursor ? cursor->next : c->all;

	while (a && !a->registered)
		a = a->next;
	return a;
}

void lp_lora_cache_stats(const struct lp_lora_cache *c, struct lp_lora_cache_stats *out)
{
	*out = c->stats;
	out->on_device = out->on_host = out->on_disk = 0;
	for (struct lp_adapter *a = c->all; a; a = a->next) {
		if (!a->registered)
			continue;
		switch (lp_adapter_tier(a)) {
		case LP_TIER_DEVICE:
			out->on_device++;
			break;
		case LP_TIER_HOST:
			out->on_host++;
			break;
		default:
			out->on_disk++;
		}
	}
}
