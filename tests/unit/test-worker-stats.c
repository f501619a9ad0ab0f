/* The worker's request counts and adapter lists (what /metrics shows as
 * vllm:num_requests_running, _waiting and lora_requests_info): the
 * choices of one request (one group) count once whether they run, wait in
 * the engine or still sit in the submit queue, requests of their own each
 * count, and queued requests' adapters are in the waiting list. Every
 * event carries the request's queue and first-run times.
 *
 * The engine pauses 300 ms after each step (the test hook
 * test_step_delay_ms), so requests submitted right after a step mostly
 * stay in the submit queue until the stats are read; the expected counts
 * are the same wherever each request is, so the test does not depend on
 * that timing. */
#include <errno.h>
#include <time.h>

#include "agent/engine/worker.h"
#include "tests/test.h"

static struct lp_backend *be;
static struct lp_model *model;
static const int32_t prompt[] = {1, 17, 42, 99, 7};

static double now_seconds(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static struct lp_worker *start(struct lp_err *err)
{
	struct lp_engine_config ec;
	struct lp_worker_config wc;
	struct lp_engine *e;
	struct lp_worker *w;

	lp_engine_config_default(&ec);
	ec.max_model_len = 256;
	ec.kv_cache_bytes = 8u << 20;
	ec.max_num_seqs = 1;
	if (lp_engine_new(&e, model, &ec, err))
		return NULL;
	lp_worker_config_default(&wc);
	wc.test_step_delay_ms = 300;
	if (lp_worker_start(&w, e, &wc, err)) {
		lp_engine_free(e);
		return NULL;
	}
	return w;
}

static int submit(struct lp_worker *w, const char *adapter, uint64_t group, struct lp_request **r,
                  struct lp_err *err)
{
	struct lp_request_params p;

	memset(&p, 0, sizeof(p));
	p.adapter = adapter;
	p.prompt = prompt;
	p.n_prompt = sizeof(prompt) / sizeof(prompt[0]);
	p.max_tokens = 200;
	p.ignore_eos = true;
	p.logprobs = -1;
	p.group = group;
	lp_sampling_params_default(&p.sampling);
	return lp_worker_submit(w, &p, r, err);
}

/* True when name is one of the comma-separated list's names. */
static bool listed(const char *list, const char *name)
{
	size_t n = strlen(name);

	for (const char *p = list; *p;) {
		size_t l = strcspn(p, ",");
		if (l == n && !strncmp(p, name, n))
			return true;
		p += l + (p[l] == ',');
	}
	return false;
}

static void test_groups_count_once_wherever_they_are(void)
{
	struct lp_err err = {0};
	struct lp_worker *w = start(&err);
	struct lp_request *r[5] = {NULL};
	struct lp_worker_stats *ws = calloc(1, sizeof(*ws));
	struct lp_event ev;
	char path[512];
	bool already;
	double t0;
	uint64_t g, h;

	CHECK_MSG(w && ws, "%s", err.msg);
	snprintf(path, sizeof(path), "%s/lora/tiny/r8-all", test_fixtures_dir());
	CHECK_OK(lp_worker_lora_load(w, "x", path, NULL, NULL, NULL, false, &already, NULL, &err),
	         &err);
	snprintf(path, sizeof(path), "%s/lora/tiny/r4-qv", test_fixtures_dir());
	CHECK_OK(lp_worker_lora_load(w, "y", path, NULL, NULL, NULL, false, &already, NULL, &err),
	         &err);
	g = lp_worker_new_group(w);
	h = lp_worker_new_group(w);
	CHECK(g != 0 && h != 0 && g != h);

	/* one choice of request g runs (the only sequence slot) */
	t0 = now_seconds();
	CHECK_OK(submit(w, NULL, g, &r[0], &err), &err);
	CHECK_EQ_INT(lp_request_next(r[0], &ev, 60000), 0);
	CHECK_EQ_INT(ev.kind, LP_EVENT_TOKEN);
	CHECK(ev.t_queued >= t0 && ev.t_scheduled >= ev.t_queued &&
	      ev.t_scheduled <= now_seconds());

	/* right after a step: the engine pauses, these stay queued */
	CHECK_OK(submit(w, "x", g, &r[1], &err), &err);  /* g's second choice */
	CHECK_OK(submit(w, "y", 0, &r[2], &err), &err);  /* a request of its own */
	CHECK_OK(submit(w, NULL, h, &r[3], &err), &err); /* request h, two choices */
	CHECK_OK(submit(w, NULL, h, &r[4], &err), &err);
	lp_worker_stats(w, ws);
	printf("     (%d of 4 requests were still in the submit queue)\n", ws->queued);
	CHECK_EQ_INT(ws->engine.running, 1);
	CHECK_EQ_INT(ws->running_requests, 1);
	CHECK_EQ_INT(ws->waiting_requests, 2);
	CHECK_EQ_INT(ws->engine.waiting + ws->queued, 4);
	CHECK_EQ_STR(ws->running_adapters, "");
	CHECK(listed(ws->waiting_adapters, "x") && listed(ws->waiting_adapters, "y"));
	CHECK(!ws->adapters_truncated);
	CHECK_EQ_INT(ws->config.max_num_seqs, 1);
	CHECK(ws->engine.kv_blocks_used > 0);

	/* cancelled, every request ends with its times on the end event */
	for (int i = 0; i < 5; i++)
		lp_request_cancel(r[i]);
	for (int i = 0; i < 5; i++) {
		while (lp_request_next(r[i], &ev, 60000) == 0 && ev.kind == LP_EVENT_TOKEN)
			;
		CHECK_EQ_INT(ev.kind, LP_EVENT_END);
		CHECK(ev.cancelled && ev.t_queued >= t0);
		CHECK(i != 0 || ev.t_scheduled >= ev.t_queued);
	}
	lp_worker_stats(w, ws);
	CHECK_EQ_INT(ws->running_requests, 0);
	CHECK_EQ_INT(ws->waiting_requests, 0);
	CHECK_EQ_STR(ws->waiting_adapters, "");
	CHECK_EQ_INT(ws->engine.kv_blocks_used, 0);
	for (int i = 0; i < 5; i++)
		lp_request_free(r[i]);
	lp_worker_free(w, 0);
	free(ws);
}

static void test_step_delay_checked(void)
{
	struct lp_worker_config wc;
	struct lp_engine_config ec;
	struct lp_engine *e;
	struct lp_worker *w = NULL;
	struct lp_err err = {0};

	lp_engine_config_default(&ec);
	ec.max_model_len = 64;
	ec.kv_cache_bytes = 1u << 20;
	CHECK_OK(lp_engine_new(&e, model, &ec, &err), &err);
	lp_worker_config_default(&wc);
	CHECK_EQ_INT(wc.test_step_delay_ms, 0);
	wc.test_step_delay_ms = -1;
	CHECK_EQ_INT(lp_worker_start(&w, e, &wc, &err), -EINVAL);
	CHECK(w == NULL && strstr(err.msg, "step delay"));
	lp_engine_free(e);
}

int main(void)
{
	struct lp_err err = {0};
	char path[512];

	TEST_MAIN_BEGIN("test-worker-stats");
	snprintf(path, sizeof(path), "%s/tiny-llama", test_fixtures_dir());
	if (lp_backend_cpu_new(&be, 0, &err) || lp_model_load(&model, path, be, &err)) {
		printf("FAIL test-worker-stats:setup: %s\n", err.msg);
		return 1;
	}
	RUN(test_groups_count_once_wherever_they_are);
	RUN(test_step_delay_checked);
	lp_model_free(model);
	lp_backend_destroy(be);
	TEST_MAIN_END();
}
