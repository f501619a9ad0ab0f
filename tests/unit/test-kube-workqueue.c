/* The operator's work queue: a key added many times is processed once;
 * a key is never processed by two workers at once and is processed again
 * when it was added meanwhile; failures back off exponentially per key
 * and forget resets them; the token bucket spreads bursts; delayed adds
 * wait; shutdown wakes every worker. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "operator/kube/encoding.h"
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
	CHECK_EQ_INT(workqueue_get(q, 0.05, &key2), -ETIMEDOUT);
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
	struct workqueue_config cfg = {
	    .base_delay = 0.05, .max_delay = 10, .qps = 1000, .burst = 100};
	struct workqueue *q;
	double t0, d;
	char *key;

	CHECK_OK(workqueue_new(&q, &cfg, NULL), &(struct lp_err){0});
	CHECK_NEAR(workqueue_add_rate_limited(q, "x"), 0.05, 1e-9);
	CHECK_EQ_INT(workqueue_failures(q, "x"), 1);
	CHECK_EQ_INT(workqueue_len(q), 0);
	CHECK_EQ_INT(workqueue_delayed(q), 1);
	t0 = kube_now_mono();
	CHECK_EQ_INT(workqueue_get(q, 2, &key), 0);
	d = kube_now_mono() - t0;
	CHECK_MSG(d >= 0.045 && d < 0.5, "waited %.3fs for a 0.05s delay", d);
	workqueue_done(q, key);
	free(key);
	CHECK_NEAR(workqueue_add_rate_limited(q, "x"), 0.1, 1e-9);
	CHECK_NEAR(workqueue_add_rate_limited(q, "x"), 0.2, 1e-9);
	CHECK_EQ_INT(workqueue_failures(q, "x"), 3);
	/* the earlier of two delayed adds wins: only one entry */
	CHECK_EQ_INT(workqueue_delayed(q), 1);
	workqueue_forget(q, "x");
	CHECK_EQ_INT(workqueue_failures(q, "x"), 0);
	CHECK_NEAR(workqueue_add_rate_limited(q, "y"), 0.05, 1e-9);
	workqueue_free(q);
}

static void test_token_bucket(void)
{
	struct workqueue_config cfg = {.base_delay = 0.001, .max_delay = 1, .qps = 10, .burst = 2};
	struct workqueue *q;
	double d1, d2, d3;

	CHECK_OK(workqueue_new(&q, &cfg, NULL), &(struct lp_err){0});
	d1 = workqueue_add_rate_limited(q, "a");
	d2 = workqueue_add_rate_limited(q, "b");
	d3 = workqueue_add_rate_limited(q, "c");
	CHECK_NEAR(d1, 0.001, 1e-6);
	CHECK_NEAR(d2, 0.001, 1e-6);
	CHECK_NEAR(d3, 0.1, 0.01); /* the burst is spent: one token per 1/qps */
	workqueue_free(q);
}

static void test_add_after(void)
{
	struct workqueue *q;
	double t0, d;
	char *key;

	CHECK_OK(workqueue_new(&q, NULL, NULL), &(struct lp_err){0});
	workqueue_add_after(q, "later", 0.15);
	workqueue_add_after(q, "sooner", 0.05);
	CHECK_EQ_INT(workqueue_len(q), 0);
	t0 = kube_now_mono();
	CHECK_EQ_INT(workqueue_get(q, 2, &key), 0);
	CHECK_EQ_STR(key, "sooner");
	workqueue_done(q, key);
	free(key);
	CHECK_EQ_INT(workqueue_get(q, 2, &key), 0);
	d = kube_now_mono() - t0;
	CHECK_EQ_STR(key, "later");
	CHECK_MSG(d >= 0.14 && d < 1.0, "'later' came after %.3fs", d);
	workqueue_done(q, key);
	free(key);
	/* a plain add of a delayed key queues it now */
	workqueue_add_after(q, "k", 30);
	workqueue_add(q, "k");
	CHECK_EQ_INT(workqueue_len(q), 1);
	workqueue_free(q);
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
