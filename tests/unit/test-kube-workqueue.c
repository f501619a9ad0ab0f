/* The operator's work queue: a key added many times is processed once;
 * a key is never processed by two workers at once and is processed again
 * when it was added meanwhile; failures back off exponentially per key
 * and forget resets them; the token bucket spreads bursts; delayed adds
 * wait; shutdown wakes every worker. Delays run on a fake clock that the
 * tests advance: nothing here depends on how fast the machine is. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "operator/kube/clock.h"
#include "operator/kube/workqueue.h"
#include "tests/test.h"

static void test_dedup(void)
{
	struct workqueue *q;
	char *key;

	CHECK_OK(workqueue_new(&q, NULL, NULL), &(struct lp_err){0});
	workqueue_add(q, "ns/a");
	workqueue_add(q, "ns/a");
	workqueue_add(q, "ns/b");
	workqueue_add(q, "ns/a");
	CHECK_EQ_INT(workqueue_len(q), 2);
	CHECK_EQ_INT(workqueue_get(q, 0, &key), 0);
	CHECK_EQ_STR(key, "ns/a"); /* first in, first out */
	workqueue_done(q, key);
	free(key);
	CHECK_EQ_INT(workqueue_get(q, 0, &key), 0);
	CHECK_EQ_STR(key, "ns/b");
	workqueue_done(q, key);
	free(key);
	CHECK_EQ_INT(workqueue_get(q, 0, &key), -ETIMEDOUT);
	workqueue_free(q);
}

static void test_dirty_while_processing(void)
{
	struct workqueue *q;
	char *key, *key2;

	CHECK_OK(workqueue_new(&q, NULL, NULL), &(struct lp_err){0});
	workqueue_add(q, "a");
	CHECK_EQ_INT(workqueue_get(q, 0, &key), 0);
	workqueue_add(q, "a"); /* changed while being reconciled */
	workqueue_add(q, "a");
	CHECK_EQ_INT(workqueue_len(q), 0); /* not handed to a second worker */
	CHECK_EQ_INT(workqueue_get(q, 0, &key2), -ETIMEDOUT);
	workqueue_done(q, key);
	free(key);
	CHECK_EQ_INT(workqueue_len(q), 1); /* processed once more, once */
	CHECK_EQ_INT(workqueue_get(q, 0, &key), 0);
	CHECK_EQ_STR(key, "a");
	workqueue_done(q, key);
	free(key);
	CHECK_EQ_INT(workqueue_len(q), 0);
	workqueue_free(q);
}

static void test_backoff_delays(void)
{
	struct workqueue_config cfg = {.base_delay = 0.1, .max_delay = 5};

	CHECK_NEAR(workqueue_backoff_delay(&cfg, 0), 0.1, 1e-9);
	CHECK_NEAR(workqueue_backoff_delay(&cfg, 1), 0.2, 1e-9);
	CHECK_NEAR(workqueue_backoff_delay(&cfg, 3), 0.8, 1e-9);
	CHECK_NEAR(workqueue_backoff_delay(&cfg, 6), 5, 1e-9);
	CHECK_NEAR(workqueue_backoff_delay(&cfg, 1000), 5, 1e-9);
}

static void test_rate_limited_and_forget(void)
{
	struct kube_fake_clock fc;
	struct workqueue_config cfg = {
	    .base_delay = 0.05, .max_delay = 10, .qps = 1000, .burst = 100, .clock = &fc.clock};
	struct workqueue *q;
	char *key;

	kube_fake_clock_init(&fc, 1700000000);
	CHECK_OK(workqueue_new(&q, &cfg, NULL), &(struct lp_err){0});
	CHECK_NEAR(workqueue_add_rate_limited(q, "x"), 0.05, 1e-9);
	CHECK_EQ_INT(workqueue_failures(q, "x"), 1);
	CHECK_EQ_INT(workqueue_len(q), 0);
	CHECK_EQ_INT(workqueue_delayed(q), 1);
	CHECK_EQ_INT(workqueue_get(q, 0, &key), -ETIMEDOUT); /* not before its delay */
	kube_fake_clock_advance(&fc, 0.049);
	CHECK_EQ_INT(workqueue_get(q, 0, &key), -ETIMEDOUT);
	kube_fake_clock_advance(&fc, 0.002);
	CHECK_EQ_INT(workqueue_get(q, 0, &key), 0);
	CHECK_EQ_STR(key, "x");
	workqueue_done(q, key);
	free(key);
	CHECK_NEAR(workqueue_add_rate_limited(q, "x"), 0.1, 1e-9);
	CHECK_NEAR(workqueue_add_rate_limited(q, "x"), 0.2, 1e-9);
	CHECK_EQ_INT(workqueue_failures(q, "x"), 3);
	/* the earlier of two delayed adds wins: only one entry, due at 0.1 */
	CHECK_EQ_INT(workqueue_delayed(q), 1);
	kube_fake_clock_advance(&fc, 0.099);
	CHECK_EQ_INT(workqueue_len(q), 0);
	kube_fake_clock_advance(&fc, 0.002);
	CHECK_EQ_INT(workqueue_len(q), 1);
	workqueue_forget(q, "x");
	CHECK_EQ_INT(workqueue_failures(q, "x"), 0);
	CHECK_NEAR(workqueue_add_rate_limited(q, "y"), 0.05, 1e-9);
	workqueue_free(q);
	kube_fake_clock_release(&fc);
}

static void test_token_bucket(void)
{
	struct kube_fake_clock fc;
	struct workqueue_config cfg = {
	    .base_delay = 0.001, .max_delay = 1, .qps = 10, .burst = 2, .clock = &fc.clock};
	struct workqueue *q;

	kube_fake_clock_init(&fc, 1700000000);
	CHECK_OK(workqueue_new(&q, &cfg, NULL), &(struct lp_err){0});
	CHECK_NEAR(workqueue_add_rate_limited(q, "a"), 0.001, 1e-9);
	CHECK_NEAR(workqueue_add_rate_limited(q, "b"), 0.001, 1e-9);
	/* the burst is spent: one token per 1/qps */
	CHECK_NEAR(workqueue_add_rate_limited(q, "c"), 0.1, 1e-9);
	CHECK_NEAR(workqueue_add_rate_limited(q, "d"), 0.2, 1e-9);
	/* 0.4 s bring four tokens: the two owed and a full burst again */
	kube_fake_clock_advance(&fc, 0.4);
	CHECK_NEAR(workqueue_add_rate_limited(q, "e"), 0.001, 1e-9);
	CHECK_NEAR(workqueue_add_rate_limited(q, "f"), 0.001, 1e-9);
	CHECK_NEAR(workqueue_add_rate_limited(q, "g"), 0.1, 1e-9);
	workqueue_free(q);
	kube_fake_clock_release(&fc);
}

struct getter {
	struct workqueue *q;
	char *key;
	int rc;
};

static void *getter_main(void *arg)
{
	struct getter *g = arg;

	g->rc = workqueue_get(g->q, -1, &g->key);
	return NULL;
}

static void test_add_after(void)
{
	struct kube_fake_clock fc;
	struct workqueue_config cfg = {.clock = &fc.clock};
	struct workqueue *q;
	struct getter g = {0};
	pthread_t th;
	char *key;

	kube_fake_clock_init(&fc, 1700000000);
	CHECK_OK(workqueue_new(&q, &cfg, NULL), &(struct lp_err){0});
	workqueue_add_after(q, "later", 0.15);
	workqueue_add_after(q, "sooner", 0.05);
	CHECK_EQ_INT(workqueue_len(q), 0);
	CHECK_EQ_INT(workqueue_get(q, 0, &key), -ETIMEDOUT);
	kube_fake_clock_advance(&fc, 0.05);
	CHECK_EQ_INT(workqueue_get(q, 0, &key), 0);
	CHECK_EQ_STR(key, "sooner");
	workqueue_done(q, key);
	free(key);
	CHECK_EQ_INT(workqueue_get(q, 0, &key), -ETIMEDOUT); /* 'later' is not due yet */
	kube_fake_clock_advance(&fc, 0.1);
	CHECK_EQ_INT(workqueue_get(q, 0, &key), 0);
	CHECK_EQ_STR(key, "later");
	workqueue_done(q, key);
	free(key);
	/* a worker blocked in get wakes when the clock reaches a delayed key */
	workqueue_add_after(q, "t", 30);
	g.q = q;
	pthread_create(&th, NULL, getter_main, &g);
	kube_fake_clock_advance(&fc, 30);
	pthread_join(th, NULL);
	CHECK_EQ_INT(g.rc, 0);
	CHECK_EQ_STR(g.key, "t");
	workqueue_done(q, g.key);
	free(g.key);
	/* a plain add of a delayed key queues it now */
	workqueue_add_after(q, "k", 30);
	workqueue_add(q, "k");
	CHECK_EQ_INT(workqueue_len(q), 1);
	workqueue_free(q);
	kube_fake_clock_release(&fc);
}

struct stress {
	struct workqueue *q;
	atomic_int busy[8];
	atomic_int overlaps;
	atomic_int processed;
};

static void *stress_worker(void *arg)
{
	struct stress *s = arg;
	char *key;

	while (workqueue_get(s->q, -1, &key) == 0) {
		int i = key[0] - 'a';

		if (atomic_fetch_add(&s->busy[i], 1) != 0)
			atomic_fetch_add(&s->overlaps, 1);
		workqueue_add(s->q, key); /* re-added while processing */
		atomic_fetch_sub(&s->busy[i], 1);
		atomic_fetch_add(&s->processed, 1);
		workqueue_done(s->q, key);
		free(key);
	}
	return NULL;
}

static void test_workers_never_share_a_key(void)
{
	struct stress s;
	pthread_t th[4];
	int i;

	memset(&s, 0, sizeof(s));
	CHECK_OK(workqueue_new(&s.q, NULL, NULL), &(struct lp_err){0});
	for (i = 0; i < 4; i++)
		pthread_create(&th[i], NULL, stress_worker, &s);
	for (i = 0; i < 8; i++) {
		char key[2] = {(char)('a' + i), 0};

		workqueue_add(s.q, key);
	}
	while (atomic_load(&s.processed) < 2000)
		nanosleep(&(struct timespec){0, 1000000}, NULL);
	workqueue_shutdown(s.q); /* wakes the workers */
	for (i = 0; i < 4; i++)
		pthread_join(th[i], NULL);
	CHECK_EQ_INT(atomic_load(&s.overlaps), 0);
	{
		char *key;

		CHECK_EQ_INT(workqueue_get(s.q, -1, &key), -ESHUTDOWN);
	}
	workqueue_free(s.q);
}

int main(void)
{
	TEST_MAIN_BEGIN("test-kube-workqueue");
	RUN(test_dedup);
	RUN(test_dirty_while_processing);
	RUN(test_backoff_delays);
	RUN(test_rate_limited_and_forget);
	RUN(test_token_bucket);
	RUN(test_add_after);
	RUN(test_workers_never_share_a_key);
	TEST_MAIN_END();
}
