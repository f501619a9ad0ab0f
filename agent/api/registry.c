/* The HTTP side's list of loaded adapters; see registry.h. */
#include "agent/api/registry.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct lp_registry {
	pthread_mutex_t mu;
	struct lp_registry_entry *e;
	size_t n, cap;
};

int lp_registry_new(struct lp_registry **out, struct lp_err *err)
{
	struct lp_registry *r = calloc(1, sizeof(*r));

	*out = NULL;
	if (!r)
		return lp_errf(err, -ENOMEM, "out of memory");
	pthread_mutex_init(&r->mu, NULL);
	*out = r;
	return 0;
}

void lp_registry_free(struct lp_registry *r)
{
	if (!r)
		return;
	pthread_mutex_destroy(&r->mu);
	free(r->e);
	free(r);
}

/* Index of name, or n. mu held. */
static size_t find(const struct lp_registry *r, const char *name)
{
	size_t i = 0;

	while (i < r->n && strcmp(r->e[i].name, name))
		i++;
	return i;
}

int lp_registry_put(struct lp_registry *r, const char *name, const char *source, struct lp_err *err)
{
	size_t i;
	int rc = 0;

	if (strlen(name) >= sizeof(r->e[0].name) || strlen(source) >= sizeof(r->e[0].source))
		return lp_errf(err, -ENAMETOOLONG, "adapter name or source too long");
	pthread_mutex_lock(&r->mu);
	i = find(r, name);
	if (i == r->n) {
		if (r->n == r->cap) {
			size_t cap = r->cap ? r->cap * 2 : 16;
			struct lp_registry_entry *e = realloc(r->e, cap * sizeof(*e));
			if (!e) {
				rc = lp_errf(err, -ENOMEM, "out of memory");
				goto out;
			}
			r->e = e;
			r->cap = cap;
		}
		r->n++;
		snprintf(r->e[i].name, sizeof(r->e[i].name), "%s", name);
	}
	snprintf(r->e[i].source, sizeof(r->e[i].source), "%s", source);
out:
	pthread_mutex_unlock(&r->mu);
	return rc;
}

void lp_registry_remove(struct lp_registry *r, const char *name)
{
	size_t i;

	pthread_mutex_lock(&r->mu);
	i = find(r, name);
	if (i < r->n) {
		memmove(&r->e[i], &r->e[i + 1], (r->n - i - 1) * sizeof(r->e[0]));
		r->n--;
	}
	pthread_mutex_unlock(&r->mu);
}

bool lp_registry_get(struct lp_registry *r, const char *name, char *source, size_t cap)
{
	size_t i;
	bool found;

	pthread_mutex_lock(&r->mu);
	i = find(r, name);
	found = i < r->n;
	if (found && source)
		snprintf(source, cap, "%s", r->e[i].source);
	pthread_mutex_unlock(&r->mu);
	return found;
}

struct lp_registry_entry *lp_registry_list(struct lp_registry *r, size_t *n)
{
	struct lp_registry_entry *copy = NULL;

	pthread_mutex_lock(&r->mu);
	*n = 0;
	if (r->n && (copy = malloc(r->n * sizeof(*copy)))) {
		memcpy(copy, r->e, r->n * sizeof(*copy));
		*n = r->n;
	}
	pthread_mutex_unlock(&r->mu);
	return copy;
}
