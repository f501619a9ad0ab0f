/* Rate-limited, deduplicating work queue; see workqueue.h.
 *
 * Every key the queue knows has one item in a chained hash table. The
 * FIFO and the delayed list hold pointers to items; an item is freed once
 * nothing refers to it and it has no failures to remember. */
#include "operator/kube/workqueue.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "operator/kube/clock.h"

#define NBUCKETS 1024

struct wq_item {
	struct wq_item *next; /* hash chain */
	char *key;
	bool dirty;      /* wants processing (queued, or re-queued after done) */
	bool processing; /* handed to a worker */
	bool queued;     /* in the FIFO */
	double ready_at; /* > 0: waiting in the delayed list until then (monotonic) */
	int failures;
};

struct workqueue {
	struct workqueue_config cfg;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct wq_item *buckets[NBUCKETS];
	struct wq_item **fifo; /* ring buffer */
	size_t fifo_head, fifo_len, fifo_cap;
	struct wq_item **delayed;
	size_t ndelayed, delayed_cap;
	double tokens, tokens_at;
	bool shutdown;
};

double workqueue_backoff_delay(const struct workqueue_config *cfg, int failures)
{
	double d;

	if (failures < 0)
		failures = 0;
	if (failures > 62)
		return cfg->max_delay;
	d = cfg->base_delay * ldexp(1.0, failures);
	return d > cfg->max_delay ? cfg->max_delay : d;
}

int workqueue_new(struct workqueue **out, const struct workqueue_config *cfg, struct lp_err *err)
{
	struct workqueue *q;
	pthread_condattr_t ca;

	*out = NULL;
	q = calloc(1, sizeof(*q));
	if (!q)
		return lp_errf(err, -ENOMEM, "out of memory");
	if (cfg)
		q->cfg = *cfg;
	if (q->cfg.base_delay <= 0)
		q->cfg.base_delay = 0.1;
	if (q->cfg.max_delay <= 0)
		q->cfg.max_delay = 60;
	if (q->cfg.qps <= 0)
		q->cfg.qps = 10;
	if (q->cfg.burst <= 0)
		q->cfg.burst = 100;
	q->tokens = q->cfg.burst;
	q->tokens_at = kube_clock_mono(q->cfg.clock);
	pthread_mutex_init(&q->lock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&q->cond, &ca);
	pthread_condattr_destroy(&ca);
	*out = q;
	return 0;
}

void workqueue_free(struct workqueue *q)
{
	size_t i;

	if (!q)
		return;
	for (i = 0; i < NBUCKETS; i++) {
		struct wq_item *it = q->buckets[i];

		while (it) {
			struct wq_item *next = it->next;

			free(it->key);
			free(it);
			it = next;
		}
	}
	free(q->fifo);
	free(q->delayed);
	pthread_cond_destroy(&q->cond);
	pthread_mutex_destroy(&q->lock);
	free(q);
}

static uint32_t hash_key(const char *s)
{
	uint32_t h = 2166136261u;

	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 16777619u;
	return h;
}

static struct wq_item *find(struct workqueue *q, const char *key, bool create)
{
	uint32_t b = hash_key(key) % NBUCKETS;
	struct wq_item *it;

	for (it = q->buckets[b]; it; it = it->next)
		if (strcmp(it->key, key) == 0)
			return it;
	if (!create)
		return NULL;
	it = calloc(1, sizeof(*it));
	if (!it)
		return NULL;
	it->key = strdup(key);
	if (!it->key) {
		free(it);
		return NULL;
	}
	it->next = q->buckets[b];
	q->buckets[b] = it;
	return it;
}

/* Frees it when nothing refers to it any more. */
static void maybe_drop(struct workqueue *q, struct wq_item *it)
{
	struct wq_item **pp;

	if (it->dirty || it->processing || it->queued || it->ready_at > 0 || it->failures > 0)
		return;
	for (pp = &q->buckets[hash_key(it->key) % NBUCKETS]; *pp; pp = &(*pp)->next) {
		if (*pp == it) {
			*pp = it->next;
			free(it->key);
			free(it);
			return;
		}
	}
}

static bool fifo_push(struct workqueue *q, struct wq_item *it)
{
	if (q->fifo_len == q->fifo_cap) {
		size_t cap = q->fifo_cap ? q->fifo_cap * 2 : 64, i;
		struct wq_item **n = malloc(cap * sizeof(*n));

		if (!n)
			return false;
		for (i = 0; i < q->fifo_len; i++)
			n[i] = q->fifo[(q->fifo_head + i) % q->fifo_cap];
		free(q->fifo);
		q->fifo = n;
		q->fifo_cap = cap;
		q->fifo_head = 0;
	}
	q->fifo[(q->fifo_head + q->fifo_len) % q->fifo_cap] = it;
	q->fifo_len++;
	it->queued = true;
	return true;
}

static void add_locked(struct workqueue *q, struct wq_item *it)
{
	if (q->shutdown || it->dirty)
		return;
	it->dirty = true;
	if (it->processing)
		return; /* done() will queue it */
	if (fifo_push(q, it))
		pthread_cond_signal(&q->cond);
	else
		it->dirty = false;
}

void workqueue_add(struct workqueue *q, const char *key)
{
	struct wq_item *it;

	pthread_mutex_lock(&q->lock);
	it = q->shutdown ? NULL : find(q, key, true);
	if (it)
		add_locked(q, it);
	pthread_mutex_unlock(&q->lock);
}

static void add_after_locked(struct workqueue *q, struct wq_item *it, double seconds)
{
	double at;

	if (seconds <= 0) {
		add_locked(q, it);
		return;
	}
	at = kube_clock_mono(q->cfg.clock) + seconds;
	if (it->ready_at > 0) {
		if (at < it->ready_at)
			it->ready_at = at; /* the earlier wish wins */
		pthread_cond_broadcast(&q->cond);
		return;
	}
	if (q->ndelayed == q->delayed_cap) {
		size_t cap = q->delayed_cap ? q->delayed_cap * 2 : 64;
		struct wq_item **n = realloc(q->delayed, cap * sizeof(*n));

		if (!n) {
			add_locked(q, it); /* better early than never */
			return;
		}
		q->delayed = n;
		q->delayed_cap = cap;
	}
	it->ready_at = at;
	q->delayed[q->ndelayed++] = it;
	pthread_cond_broadcast(&q->cond);
}

void workqueue_add_after(struct workqueue *q, const char *key, double seconds)
{
	struct wq_item *it;

	pthread_mutex_lock(&q->lock);
	it = q->shutdown ? NULL : find(q, key, true);
	if (it)
		add_after_locked(q, it, seconds);
	pthread_mutex_unlock(&q->lock);
}

/* Takes one token, possibly borrowed from the future; returns how long
 * until it would have been there. */
static double bucket_delay(struct workqueue *q)
{
	double now = kube_clock_mono(q->cfg.clock);

	q->tokens += (now - q->tokens_at) * q->cfg.qps;
	if (q->tokens > q->cfg.burst)
		q->tokens = q->cfg.burst;
	q->tokens_at = now;
	q->tokens -= 1.0;
	return q->tokens >= 0 ? 0.0 : -q->tokens / q->cfg.qps;
}

double workqueue_add_rate_limited(struct workqueue *q, const char *key)
{
	struct wq_item *it;
	double d = 0, b;

	pthread_mutex_lock(&q->lock);
	it = q->shutdown ? NULL : find(q, key, true);
	if (it) {
		d = workqueue_backoff_delay(&q->cfg, it->failures);
		if (it->failures < 1000)
			it->failures++;
		b = bucket_delay(q);
		if (b > d)
			d = b;
		add_after_locked(q, it, d);
	}
	pthread_mutex_unlock(&q->lock);
	return d;
}

void workqueue_forget(struct workqueue *q, const char *key)
{
	struct wq_item *it;

	pthread_mutex_lock(&q->lock);
	it = find(q, key, false);
	if (it) {
		it->failures = 0;
		maybe_drop(q, it);
	}
	pthread_mutex_unlock(&q->lock);
}

int workqueue_failures(struct workqueue *q, const char *key)
{
	struct wq_item *it;
	int n = 0;

	pthread_mutex_lock(&q->lock);
	it = find(q, key, false);
	if (it)
		n = it->failures;
	pthread_mutex_unlock(&q->lock);
	return n;
}

/* Moves delayed items whose time has come to the FIFO; returns the
 * earliest remaining ready time, or 0 when none is left. */
static double promote_due(struct workqueue *q)
{
	double now = kube_clock_mono(q->cfg.clock), next = 0;
	size_t i = 0;

	while (i < q->ndelayed) {
		struct wq_item *it = q->delayed[i];

		if (it->ready_at <= now) {
			q->delayed[i] = q->delayed[--q->ndelayed];
			it->ready_at = 0;
			add_locked(q, it);
			maybe_drop(q, it);
			continue;
		}
		if (next == 0 || it->ready_at < next)
			next = it->ready_at;
		i++;
	}
	return next;
}

int workqueue_get(struct workqueue *q, double timeout_s, char **key)
{
	double deadline = timeout_s >= 0 ? kube_clock_mono(q->cfg.clock) + timeout_s : 0;
	int rc = 0;

	*key = NULL;
	pthread_mutex_lock(&q->lock);
	for (;;) {
		double next, until;

		if (q->shutdown) {
			rc = -ESHUTDOWN;
			break;
		}
		next = promote_due(q);
		if (q->fifo_len > 0) {
			struct wq_item *it = q->fifo[q->fifo_head];

			*key = strdup(it->key);
			if (!*key) {
				rc = -ENOMEM;
				break;
			}
			q->fifo_head = (q->fifo_head + 1) % q->fifo_cap;
			q->fifo_len--;
			it->queued = false;
			it->dirty = false;
			it->processing = true;
			break;
		}
		until = next;
		if (deadline > 0 && (until == 0 || deadline < until))
			until = deadline;
		if (timeout_s >= 0 && kube_clock_mono(q->cfg.clock) >= deadline) {
			rc = -ETIMEDOUT;
			break;
		}
		if (until == 0) {
			pthread_cond_wait(&q->cond, &q->lock);
			continue;
		}
		kube_clock_cond_wait_until(q->cfg.clock, &q->cond, &q->lock, until);
	}
	pthread_mutex_unlock(&q->lock);
	return rc;
}

void workqueue_done(struct workqueue *q, const char *key)
{
	struct wq_item *it;

	pthread_mutex_lock(&q->lock);
	it = find(q, key, false);
	if (it && it->processing) {
		it->processing = false;
		if (it->dirty && !q->shutdown) {
			if (fifo_push(q, it))
				pthread_cond_signal(&q->cond);
			else
				it->dirty = false;
		}
		maybe_drop(q, it);
	}
	pthread_mutex_unlock(&q->lock);
}

void workqueue_shutdown(struct workqueue *q)
{
	pthread_mutex_lock(&q->lock);
	q->shutdown = true;
	pthread_cond_broadcast(&q->cond);
	pthread_mutex_unlock(&q->lock);
}

size_t workqueue_len(struct workqueue *q)
{
	size_t n;

	pthread_mutex_lock(&q->lock);
	promote_due(q);
	n = q->fifo_len;
	pthread_mutex_unlock(&q->lock);
	return n;
}

size_t workqueue_delayed(struct workqueue *q)
{
	size_t n;

	pthread_mutex_lock(&q->lock);
	n = q->ndelayed;
	pthread_mutex_unlock(&q->lock);
	return n;
}
