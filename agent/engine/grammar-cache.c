/* Parsed grammars by their text; see grammar-cache.h. A handful of
 * entries: a linear scan by hash, then by text, under one mutex; parsing
 * happens outside it (two threads may parse the same text at once; the
 * second keeps the first's). */
#include "agent/engine/grammar-cache.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct entry {
	uint64_t hash;
	char *text;
	size_t len;
	struct lp_grammar *g;
	uint64_t used; /* the clock when last looked up */
};

struct lp_grammar_cache {
	pthread_mutex_t mu;
	struct entry *e; /* [cap] */
	int n, cap;
	uint64_t clock;
};

static uint64_t text_hash(const char *s, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a */

	for (size_t i = 0; i < n; i++) {
		h ^= (unsigned char)s[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

int lp_grammar_cache_new(struct lp_grammar_cache **out, int capacity, struct lp_err *err)
{
	struct lp_grammar_cache *c;

	*out = NULL;
	if (capacity < 1)
		return lp_errf(err, -EINVAL, "a grammar cache needs room for one grammar");
	if (!(c = calloc(1, sizeof(*c))) || !(c->e = calloc((size_t)capacity, sizeof(*c->e)))) {
		free(c);
		return lp_errf(err, -ENOMEM, "out of memory");
	}
	pthread_mutex_init(&c->mu, NULL);
	c->cap = capacity;
	*out = c;
	return 0;
}

void lp_grammar_cache_free(struct lp_grammar_cache *c)
{
	if (!c)
		return;
	for (int i = 0; i < c->n; i++) {
		free(c->e[i].text);
		lp_grammar_unref(c->e[i].g);
	}
	pthread_mutex_destroy(&c->mu);
	free(c->e);
	free(c);
}

/* The entry holding text, or NULL; under mu. */
static struct entry *find(struct lp_grammar_cache *c, uint64_t h, const char *text, size_t len)
{
	for (int i = 0; i < c->n; i++)
		if (c->e[i].hash == h && c->e[i].len == len && !memcmp(c->e[i].text, text, len))
			return &c->e[i];
	return NULL;
}

int lp_grammar_cache_get(struct lp_grammar_cache *c, const char *text, size_t len,
                         struct lp_grammar **out, struct lp_err *err)
{
	uint64_t h = text_hash(text, len);
	struct lp_grammar *g = NULL;
	struct entry *hit;
	char *copy;
	int rc;

	*out = NULL;
	if (!c)
		return lp_grammar_parse(out, text, len, err);
	pthread_mutex_lock(&c->mu);
	if ((hit = find(c, h, text, len))) {
		hit->used = ++c->clock;
		*out = lp_grammar_ref(hit->g);
	}
	pthread_mutex_unlock(&c->mu);
	if (*out)
		return 0;
	if ((rc = lp_grammar_parse(&g, text, len, err)))
		return rc;
	if (!(copy = malloc(len + 1))) {
		*out = g; /* served, just not kept */
		return 0;
	}
	memcpy(copy, text, len);
	copy[len] = 0;
	pthread_mutex_lock(&c->mu);
	if ((hit = find(c, h, text, len))) {
		/* another thread parsed it meanwhile: share theirs */
		hit->used = ++c->clock;
		*out = lp_grammar_ref(hit->g);
		pthread_mutex_unlock(&c->mu);
		free(copy);
		lp_grammar_unref(g);
		return 0;
	}
	if (c->n == c->cap) {
		int old = 0;
		for (int i = 1; i < c->n; i++)
			if (c->e[i].used < c->e[old].used)
				old = i;
		free(c->e[old].text);
		lp_grammar_unref(c->e[old].g);
		c->e[old] = c->e[--c->n];
	}
	c->e[c->n++] = (struct entry){h, copy, len, lp_grammar_ref(g), ++c->clock};
	pthread_mutex_unlock(&c->mu);
	*out = g;
	return 0;
}
