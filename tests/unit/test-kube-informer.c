/* Informer and leader election against a scripted API server.
 * Informer: the first list fills the cache; watch events update it in
 * order; a bookmark moves the version the next watch starts from; a 410
 * makes it relist, and the relist's differences reach the handlers as
 * updates and deletes. Leases: one of two candidates leads; the standby
 * takes over at once when the leader releases, and after the lease
 * duration when a holder stops renewing; transitions are counted. The
 * electors run on a fake clock the test advances, and every wait is for
 * a condition (with a generous deadline against hangs), so nothing here
 * depends on how fast the machine is. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <curl/curl.h>

#include "operator/kube/clock.h"
#include "operator/kube/encoding.h"
#include "operator/kube/informer.h"
#include "operator/kube/lease.h"
#include "tests/test.h"
#include "tests/unit/kube-fake-server.h"

/* Hang guard for waits on other threads: far longer than any of them
 * takes, even on a loaded machine; reaching it is a failure. */
#define WAIT_S 60.0

static bool wait_for(bool (*cond)(void *), void *arg)
{
	double end = kube_now_mono() + WAIT_S;

	while (!cond(arg)) {
		if (kube_now_mono() > end)
			return false;
		usleep(2000);
	}
	return true;
}

static struct kube_client *local_client(int port)
{
	struct kube_config cfg;
	struct kube_client *c = NULL;
	char url[64];

	memset(&cfg, 0, sizeof(cfg));
	snprintf(url, sizeof(url), "http://127.0.0.1:%d", port);
	cfg.server = strdup(url);
	kube_client_new(&c, &cfg, NULL);
	return c;
}

/* --- informer --- */

struct iscript {
	pthread_mutex_t lock;
	int lists, watches;
	char watch_rv[4][32];
	atomic_bool stop;
};

static void ihandler(int fd, const struct fake_request *req, void *user)
{
	struct iscript *s = user;
	int w;

	if (!strstr(req->path, "watch=1")) {
		pthread_mutex_lock(&s->lock);
		s->lists++;
		pthread_mutex_unlock(&s->lock);
		if (s->lists == 1)
			fake_respond(fd, 200,
			             "{\"metadata\":{\"resourceVersion\":\"10\"},\"items\":["
			             "{\"metadata\":{\"name\":\"a\",\"namespace\":\"n\","
			             "\"resourceVersion\":\"1\"}},"
			             "{\"metadata\":{\"name\":\"b\",\"namespace\":\"n\","
			             "\"resourceVersion\":\"2\"}}]}");
		else
			fake_respond(fd, 200,
			             "{\"metadata\":{\"resourceVersion\":\"40\"},\"items\":["
			             "{\"metadata\":{\"name\":\"a\",\"namespace\":\"n\","
			             "\"resourceVersion\":\"11\"}},"
			             "{\"metadata\":{\"name\":\"d\",\"namespace\":\"n\","
			             "\"resourceVersion\":\"31\"}}]}");
		return;
	}
	pthread_mutex_lock(&s->lock);
	w = s->watches++;
	if (w < 4) {
		const char *rv = strstr(req->path, "resourceVersion=");

		snprintf(s->watch_rv[w], sizeof(s->watch_rv[w]), "%.*s",
		         rv ? (int)strcspn(rv + 16, "&") : 0, rv ? rv + 16 : "");
	}
	pthread_mutex_unlock(&s->lock);
	fake_stream_begin(fd);
	if (w == 0) {
		fake_stream_chunk(fd,
		                  "{\"type\":\"MODIFIED\",\"object\":{\"metadata\":{\"name\":\"a\","
		                  "\"namespace\":\"n\",\"resourceVersion\":\"11\"}}}\n"
		                  "{\"type\":\"ADDED\",\"object\":{\"metadata\":{\"name\":\"c\","
		                  "\"namespace\":\"n\",\"resourceVersion\":\"12\"}}}\n"
		                  "{\"type\":\"DELETED\",\"object\":{\"metadata\":{\"name\":\"b\","
		                  "\"namespace\":\"n\",\"resourceVersion\":\"13\"}}}\n"
		                  "{\"type\":\"BOOKMARK\",\"object\":{\"metadata\":"
		                  "{\"resourceVersion\":\"20\"}}}\n");
		fake_stream_end(fd);
	} else if (w == 1) {
		fake_stream_chunk(fd, "{\"type\":\"ERROR\",\"object\":{\"kind\":\"Status\","
		                      "\"code\":410,\"message\":\"too old resource version\"}}\n");
		fake_stream_end(fd);
	} else {
		while (!atomic_load(&s->stop)) /* idle until the test ends */
			usleep(10000);
	}
}

struct ilog {
	pthread_mutex_t lock;
	char text[1024];
};

static void ilog_add(struct ilog *l, const char *what, json_t *obj)
{
	char key[128];

	kube_object_key(obj, key, sizeof(key));
	pthread_mutex_lock(&l->lock);
	snprintf(l->text + strlen(l->text), sizeof(l->text) - strlen(l->text), "%s %s@%s;", what,
	         key,
	         json_string_value(
	             json_object_get(json_object_get(obj, "metadata"), "resourceVersion")));
	pthread_mutex_unlock(&l->lock);
}

static void on_add(void *u, json_t *o)
{
	ilog_add(u, "add", o);
}

static void on_update(void *u, json_t *old, json_t *o)
{
	ilog_add(u, "update", o);
}

static void on_delete(void *u, json_t *o)
{
	ilog_add(u, "delete", o);
}

struct iwait {
	struct iscript *s;
	struct ilog *log;
	const char *want;
};

/* the third watch is open and every event before it was handled */
static bool informer_settled(void *arg)
{
	struct iwait *w = arg;
	bool done;

	pthread_mutex_lock(&w->s->lock);
	done = w->s->watches >= 3;
	pthread_mutex_unlock(&w->s->lock);
	pthread_mutex_lock(&w->log->lock);
	done = done && strcmp(w->log->text, w->want) == 0;
	pthread_mutex_unlock(&w->log->lock);
	return done;
}

static void test_informer_list_watch_relist(void)
{
	struct iscript s = {.lock = PTHREAD_MUTEX_INITIALIZER};
	struct ilog log = {.lock = PTHREAD_MUTEX_INITIALIZER};
	struct kube_informer_handlers h = {on_add, on_update, on_delete, NULL, &log};
	struct kube_informer_opts o = {
	    .gvr = &KUBE_GVR_PODS, .ns = "n", .watch_timeout_min = 300, .watch_timeout_max = 300};
	struct kube_informer *inf;
	struct kube_informer_stats st;
	struct fake_server srv;
	struct kube_client *c;
	struct lp_err err = {0};
	json_t *all, *obj;
	const char *want = "add n/a@1;add n/b@2;"
	                   "update n/a@11;add n/c@12;delete n/b@13;"
	                   "add n/d@31;delete n/c@12;";
	struct iwait iw = {&s, &log, want};

	CHECK(fake_server_start(&srv, ihandler, &s) == 0);
	c = local_client(srv.port);
	CHECK_OK(kube_informer_new(&inf, c, &o, &h, &err), &err);
	CHECK(!kube_informer_synced(inf));
	CHECK_OK(kube_informer_start(inf, &err), &err);
	CHECK(wait_for(informer_settled, &iw));
	CHECK(kube_informer_synced(inf));
	CHECK_EQ_STR(log.text, want);
	CHECK_EQ_STR(s.watch_rv[0], "10"); /* from the list */
	CHECK_EQ_STR(s.watch_rv[1], "20"); /* from the bookmark */
	CHECK_EQ_STR(s.watch_rv[2], "40"); /* from the relist */
	obj = kube_informer_get(inf, "n", "d");
	CHECK(obj != NULL);
	json_decref(obj);
	CHECK(kube_informer_get(inf, "n", "b") == NULL);
	all = kube_informer_list(inf);
	CHECK_EQ_INT(json_array_size(all), 2);
	json_decref(all);
	kube_informer_stats(inf, &st);
	CHECK_EQ_INT(st.lists, 2);
	CHECK_EQ_INT(st.expired, 1);
	atomic_store(&s.stop, true);
	kube_informer_free(inf); /* cancels the hanging watch */
	kube_client_free(c);
	fake_server_stop(&srv);
}

/* --- leases: a tiny store with resourceVersion checks --- */

struct lstore {
	pthread_mutex_t lock;
	json_t *lease;
	int rv;
	int conflicts;
};

static void lhandler(int fd, const struct fake_request *req, void *user)
{
	struct lstore *s = user;
	json_t *body;
	char *out;

	pthread_mutex_lock(&s->lock);
	if (strcmp(req->method, "GET") == 0) {
		if (!s->lease) {
			fake_respond(fd, 404,
			             "{\"kind\":\"Status\",\"reason\":\"NotFound\",\"code\":404}");
		} else {
			out = json_dumps(s->lease, JSON_COMPACT);
			fake_respond(fd, 200, out);
			free(out);
		}
		goto out;
	}
	body = json_loads(req->body, 0, NULL);
	if (strcmp(req->method, "POST") == 0 && s->lease) {
		fake_respond(fd, 409,
		             "{\"kind\":\"Status\",\"reason\":\"AlreadyExists\",\"code\":409}");
	} else if (strcmp(req->method, "PUT") == 0 &&
	           strcmp(json_string_value(json_object_get(json_object_get(body, "metadata"),
	                                                    "resourceVersion")),
	                  json_string_value(json_object_get(json_object_get(s->lease, "metadata"),
	                                                    "resourceVersion"))) != 0) {
		s->conflicts++;
		fake_respond(fd, 409, "{\"kind\":\"Status\",\"reason\":\"Conflict\",\"code\":409}");
	} else {
		char rv[16];

		snprintf(rv, sizeof(rv), "%d", ++s->rv);
		json_object_set_new(json_object_get(body, "metadata"), "resourceVersion",
		                    json_string(rv));
		json_decref(s->lease);
		s->lease = json_incref(body);
		out = json_dumps(body, JSON_COMPACT);
		fake_respond(fd, strcmp(req->method, "POST") == 0 ? 201 : 200, out);
		free(out);
	}
	json_decref(body);
out:
	pthread_mutex_unlock(&s->lock);
}

static const char *holder(struct lstore *s)
{
	static char h[64];

	pthread_mutex_lock(&s->lock);
	snprintf(h, sizeof(h), "%s",
	         s->lease ? json_string_value(json_object_get(json_object_get(s->lease, "spec"),
	                                                      "holderIdentity"))
	                  : "(none)");
	pthread_mutex_unlock(&s->lock);
	return h;
}

static int transitions(struct lstore *s)
{
	int n;

	pthread_mutex_lock(&s->lock);
	n = (int)json_integer_value(
	    json_object_get(json_object_get(s->lease, "spec"), "leaseTransitions"));
	pthread_mutex_unlock(&s->lock);
	return n;
}

static bool is_leader(void *e)
{
	return kube_elector_is_leader(e);
}

struct clock_wait {
	struct kube_fake_clock *fc;
	int n;
};

static bool parked(void *arg)
{
	struct clock_wait *w = arg;

	return kube_fake_clock_waiters(w->fc) == w->n;
}

/* Advances the clock by seconds, then waits until the n elector threads
 * have done what that woke them for and sleep again. */
static bool step(struct kube_fake_clock *fc, double seconds, int n)
{
	struct clock_wait w = {fc, n};

	kube_fake_clock_advance(fc, seconds);
	return wait_for(parked, &w);
}

static void test_lease_failover(void)
{
	struct lstore s = {.lock = PTHREAD_MUTEX_INITIALIZER};
	struct kube_fake_clock fc;
	struct fake_server srv;
	struct kube_client *c;
	struct kube_elector *a, *b, *g;
	struct lp_err err = {0};
	/* the operator's defaults: 15 s lease, 10 s renew deadline, 2 s retry */
	struct kube_lease_config ca = {
	    .ns = "sys", .name = "op", .identity = "a", .clock = &fc.clock};
	struct kube_lease_config cb = ca, cg = ca;
	struct clock_wait one = {&fc, 1}, two = {&fc, 2};
	bool leader;
	int i;

	cb.identity = "b";
	cg.identity = "g";
	kube_fake_clock_init(&fc, 1700000000);
	CHECK(fake_server_start(&srv, lhandler, &s) == 0);
	c = local_client(srv.port);
	CHECK_OK(kube_elector_new(&a, c, &ca, NULL, &err), &err);
	CHECK_OK(kube_elector_new(&b, c, &cb, NULL, &err), &err);
	CHECK_OK(kube_elector_start(a, &err), &err);
	CHECK(wait_for(is_leader, a));
	CHECK(wait_for(parked, &one)); /* a waits to renew */
	CHECK_EQ_STR(holder(&s), "a");
	CHECK_OK(kube_elector_start(b, &err), &err);
	CHECK(wait_for(parked, &two)); /* b tried once and waits to retry */
	/* a keeps renewing every retry period: b does not take over even
	 * after well over the lease duration */
	for (i = 0; i < 12; i++) {
		CHECK(step(&fc, 2.0, 2));
		CHECK(!kube_elector_is_leader(b));
		CHECK(kube_elector_is_leader(a));
	}
	CHECK_EQ_STR(holder(&s), "a");

	/* a leaves and releases: b takes over at its next retry (at most
	 * 2 s * 2.2 of jitter), long before the 15 s lease would expire */
	kube_elector_stop(a);
	CHECK(!kube_elector_is_leader(a));
	for (i = 0; i < 3 && !kube_elector_is_leader(b); i++)
		CHECK(step(&fc, 2.0, 1));
	CHECK_MSG(kube_elector_is_leader(b), "b did not take over within %d retry periods", i);
	CHECK_EQ_STR(holder(&s), "b");

	/* b stops renewing without releasing (stop the thread by hand): a new
	 * candidate must wait out the lease duration, then wins */
	CHECK_OK(kube_elector_new(&g, c, &cg, NULL, &err), &err);
	kube_elector_free(b); /* releases: put b's record back as if it crashed */
	pthread_mutex_lock(&s.lock);
	json_object_set_new(json_object_get(s.lease, "spec"), "holderIdentity", json_string("b"));
	json_object_set_new(json_object_get(s.lease, "spec"), "leaseDurationSeconds",
	                    json_integer(15));
	pthread_mutex_unlock(&s.lock);
	CHECK_OK(kube_elector_try(g, &leader, &err), &err);
	CHECK(!leader);
	kube_fake_clock_advance(&fc, 10);
	CHECK_OK(kube_elector_try(g, &leader, &err), &err);
	CHECK(!leader); /* 10 s of 15 */
	kube_fake_clock_advance(&fc, 4.9);
	CHECK_OK(kube_elector_try(g, &leader, &err), &err);
	CHECK(!leader); /* 14.9 s of 15 */
	kube_fake_clock_advance(&fc, 0.2);
	CHECK_OK(kube_elector_try(g, &leader, &err), &err);
	CHECK(leader);
	CHECK_EQ_STR(holder(&s), "g");
	CHECK_EQ_INT(transitions(&s), 2); /* a -> b -> g */
	kube_elector_free(g);
	kube_elector_free(a);
	json_decref(s.lease);
	kube_client_free(c);
	fake_server_stop(&srv);
	kube_fake_clock_release(&fc);
}

static void test_lease_config_checked(void)
{
	struct kube_elector *e;
	struct lp_err err = {0};
	struct kube_lease_config bad = {.ns = "sys",
	                                .name = "op",
	                                .identity = "a",
	                                .lease_duration = 5,
	                                .renew_deadline = 10,
	                                .retry_period = 2};

	CHECK_EQ_INT(kube_elector_new(&e, NULL, &bad, NULL, &err), -EINVAL);
	CHECK(strstr(err.msg, "must exceed the renew deadline") != NULL);
	bad.identity = "";
	CHECK_EQ_INT(kube_elector_new(&e, NULL, &bad, NULL, &err), -EINVAL);
}

int main(void)
{
	TEST_MAIN_BEGIN("test-kube-informer");
	curl_global_init(CURL_GLOBAL_ALL);
	RUN(test_informer_list_watch_relist);
	RUN(test_lease_failover);
	RUN(test_lease_config_checked);
	curl_global_cleanup();
	TEST_MAIN_END();
}
