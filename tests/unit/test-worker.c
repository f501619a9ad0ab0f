/* The engine thread and its doors: concurrent submitters get the tokens
 * each prompt gives alone, cancellation and slow readers free the cache,
 * engine errors arrive as events, logprobs are a distribution, and shutdown
 * drains. */
#include <errno.h>
#include <jansson.h>
#include <pthread.h>

#include "agent/engine/worker.h"
#include "tests/test.h"

#define N_GREEDY 32

static struct lp_backend *be;
static struct lp_model *model;
static int32_t prompts[8][128];
static int n_ids[8];
static int32_t greedy[8][N_GREEDY];
static int n_prompts;

static int load_goldens(void)
{
	char path[512];
	json_error_t jerr;
	json_t *root, *arr, *v;
	size_t i;

	snprintf(path, sizeof(path), "%s/goldens/tiny-llama.json", test_fixtures_dir());
	root = json_load_file(path, 0, &jerr);
	if (!root)
		return -1;
	arr = json_object_get(json_object_get(root, "batch"), "prompts");
	json_array_foreach(arr, i, v)
	{
		json_t *ids = json_object_get(v, "ids"), *g = json_object_get(v, "greedy"), *x;
		size_t k;
		if (i >= 8 || json_array_size(ids) > 128)
			break;
		json_array_foreach(ids, k, x) prompts[i][k] = (int32_t)json_integer_value(x);
		n_ids[i] = (int)json_array_size(ids);
		json_array_foreach(g, k, x) if (k < N_GREEDY) greedy[i][k] =
		    (int32_t)json_integer_value(x);
		n_prompts++;
	}
	json_decref(root);
	return n_prompts == 8 ? 0 : -1;
}

static struct lp_worker *start(int channel_cap, struct lp_err *err)
{
	struct lp_engine_config ec;
	struct lp_worker_config wc;
	struct lp_engine *e;
	struct lp_worker *w;

	lp_engine_config_default(&ec);
	ec.max_model_len = 256;
	ec.kv_cache_bytes = 32u << 20;
	if (lp_engine_new(&e, model, &ec, err))
		return NULL;
	lp_worker_config_default(&wc);
	wc.channel_capacity = channel_cap;
	if (lp_worker_start(&w, e, &wc, err)) {
		lp_engine_free(e);
		return NULL;
	}
	return w;
}

static void params(struct lp_request_params *p, int i, int max_tokens)
{
	memset(p, 0, sizeof(*p));
	p->prompt = prompts[i];
	p->n_prompt = (size_t)n_ids[i];
	p->max_tokens = max_tokens;
	p->ignore_eos = true;
	p->logprobs = -1;
	lp_sampling_params_default(&p->sampling);
	p->sampling.temperature = 0;
}

struct client {
	struct lp_worker *w;
	int i;
	int32_t toks[N_GREEDY];
	int n;
	int rc;
	struct lp_event end;
};

static void *client_main(void *arg)
{
	struct client *c = arg;
	struct lp_request_params p;
	struct lp_request *r;
	struct lp_event ev;
	struct lp_err err;

	params(&p, c->i, N_GREEDY);
	c->rc = lp_worker_submit(c->w, &p, &r, &err);
	if (c->rc)
		return NULL;
	while ((c->rc = lp_request_next(r, &ev, 60000)) == 0) {
		if (ev.kind == LP_EVENT_TOKEN) {
			if (c->n < N_GREEDY)
				c->toks[c->n++] = ev.token;
		} else {
			c->end = ev;
			break;
		}
	}
	lp_request_free(r);
	return NULL;
}

/* 8 threads submit at once; each gets its prompt's solo tokens. */
static void test_concurrent_clients(void)
{
	struct lp_err err = {0};
	struct lp_worker *w = start(4096, &err);
	pthread_t th[8];
	struct client c[8];

	CHECK_MSG(w, "%s", err.msg);
	for (int i = 0; i < 8; i++) {
		c[i] = (struct client){.w = w, .i = i};
		pthread_create(&th[i], NULL, client_main, &c[i]);
	}
	for (int i = 0; i < 8; i++)
		pthread_join(th[i], NULL);
	lp_worker_free(w, 1000);
	for (int i = 0; i < 8; i++) {
		CHECK_MSG(c[i].rc == 0, "client %d: %d", i, c[i].rc);
		CHECK_EQ_INT(c[i].n, N_GREEDY);
		CHECK_EQ_INT(c[i].end.kind, LP_EVENT_END);
		CHECK_EQ_INT(c[i].end.finish, LP_FINISH_LENGTH);
		CHECK_EQ_INT(c[i].end.completion_tokens, N_GREEDY);
		CHECK_EQ_INT(c[i].end.prompt_tokens, n_ids[i]);
		CHECK_MSG(!memcmp(c[i].toks, greedy[i], sizeof(c[i].toks)),
		          "client %d: tokens differ from the prompt alone", i);
	}
}

static int kv_used(struct lp_worker *w)
{
	struct lp_worker_stats st;
	lp_worker_stats(w, &st);
	return st.engine.kv_blocks_used;
}

/* A cancelled request ends with cancelled set and its blocks are freed. */
static void test_cancel_frees_blocks(void)
{
	struct lp_err err = {0};
	struct lp_worker *w = start(4096, &err);
	struct lp_request_params p;
	struct lp_event ev;
	bool caught = false;

	CHECK_MSG(w, "%s", err.msg);
	/* the tiny model may finish a request before the cancel lands; try
	 * until one is cancelled while running */
	for (int attempt = 0; attempt < 20 && !caught; attempt++) {
		struct lp_request *r;
		int tokens = 0;

		params(&p, 5, 200);
		CHECK_OK(lp_worker_submit(w, &p, &r, &err), &err);
		while (tokens < 3 && lp_request_next(r, &ev, 10000) == 0 &&
		       ev.kind == LP_EVENT_TOKEN)
			tokens++;
		lp_request_cancel(r);
		while (lp_request_next(r, &ev, 10000) == 0 && ev.kind == LP_EVENT_TOKEN)
			;
		CHECK_EQ_INT(ev.kind, LP_EVENT_END);
		caught = ev.cancelled;
		if (caught)
			CHECK(ev.completion_tokens < 200);
		/* over, cancelled or not: no block is held */
		CHECK_EQ_INT(kv_used(w), 0);
		CHECK_EQ_INT(lp_request_next(r, &ev, 0), -ENODATA);
		lp_request_free(r);
	}
	CHECK_MSG(caught, "no request was cancelled while running in 20 tries");
	lp_worker_free(w, 1000);
}

/* A reader that does not read is cut off when its channel fills; the
 * engine goes on for the others. */
static void test_slow_reader_cancelled(void)
{
	struct lp_err err = {0};
	struct lp_worker *w = start(4, &err);
	struct lp_request_params p;
	struct lp_request *slow;
	struct client c = {0};
	pthread_t th;
	struct lp_event ev;
	int tokens = 0;

	CHECK_MSG(w, "%s", err.msg);
	params(&p, 2, 100);
	CHECK_OK(lp_worker_submit(w, &p, &slow, &err), &err);
	/* a normal client next to it: its channel is 4 too, so it must keep up */
	c.w = w;
	c.i = 1;
	pthread_create(&th, NULL, client_main, &c);
	pthread_join(th, NULL);
	/* by now the slow one's channel has long been full */
	while (lp_request_next(slow, &ev, 10000) == 0 && ev.kind == LP_EVENT_TOKEN)
		tokens++;
	CHECK_EQ_INT(ev.kind, LP_EVENT_END);
	CHECK(ev.cancelled);
	CHECK_MSG(tokens <= 5, "a reader that did not read got %d tokens", tokens);
	lp_request_free(slow);
	lp_worker_free(w, 1000);
	CHECK_MSG((c.n == N_GREEDY && !memcmp(c.toks, greedy[1], sizeof(c.toks))) ||
	              c.end.cancelled,
	          "the other client got %d tokens", c.n);
}

/* Engine errors come back as the request's only event. */
static void test_errors_as_events(void)
{
	struct lp_err err = {0};
	struct lp_worker *w = start(64, &err);
	struct lp_request_params p;
	struct lp_request *r;
	struct lp_event ev;

	CHECK_MSG(w, "%s", err.msg);
	params(&p, 0, 4);
	p.adapter = "nope";
	CHECK_OK(lp_worker_submit(w, &p, &r, &err), &err);
	CHECK_OK(lp_request_next(r, &ev, 10000), &err);
	CHECK_EQ_INT(ev.kind, LP_EVENT_ERROR);
	CHECK_EQ_INT(ev.err.code, -ENOENT);
	CHECK(strstr(ev.err.msg, "nope"));
	lp_request_free(r);
	/* parameters are checked at the door */
	params(&p, 0, 0);
	CHECK_EQ_INT(lp_worker_submit(w, &p, &r, &err), -EINVAL);
	params(&p, 0, 4);
	p.sampling.top_p = 2;
	CHECK_EQ_INT(lp_worker_submit(w, &p, &r, &err), -EINVAL);
	CHECK(strstr(err.msg, "top_p"));
	lp_worker_close(w);
	params(&p, 0, 4);
	CHECK_EQ_INT(lp_worker_submit(w, &p, &r, &err), -ESHUTDOWN);
	lp_worker_free(w, 1000);
}

/* Logprobs: the greedy token is the most likely one, alternatives are
 * sorted, and probabilities sum to at most 1. */
static void test_logprobs(void)
{
	struct lp_err err = {0};
	struct lp_worker *w = start(64, &err);
	struct lp_request_params p;
	struct lp_request *r;
	struct lp_event ev;
	int n = 0;

	CHECK_MSG(w, "%s", err.msg);
	params(&p, 3, 8);
	p.logprobs = 5;
	CHECK_OK(lp_worker_submit(w, &p, &r, &err), &err);
	while (lp_request_next(r, &ev, 10000) == 0 && ev.kind == LP_EVENT_TOKEN) {
		double total = 0;
		CHECK_EQ_INT(ev.n_top, 5);
		CHECK_EQ_INT(ev.top_ids[0], ev.token);
		CHECK_NEAR(ev.top_logprobs[0], ev.logprob, 1e-6);
		CHECK(ev.logprob <= 0);
		for (int k = 0; k < 5; k++) {
			total += exp(ev.top_logprobs[k]);
			if (k)
				CHECK(ev.top_logprobs[k] <= ev.top_logprobs[k - 1]);
		}
		CHECK(total <= 1.0 + 1e-5);
		CHECK_EQ_INT(ev.token, greedy[3][n]);
		n++;
	}
	CHECK_EQ_INT(n, 8);
	lp_request_free(r);
	lp_worker_free(w, 1000);
}

/* Shutting down lets running requests finish within the drain time. */
static void test_drain_on_free(void)
{
	struct lp_err err = {0};
	struct lp_worker *w = start(4096, &err);
	struct lp_request_params p;
	struct lp_request *r;
	struct lp_event ev;
	int tokens = 0;

	CHECK_MSG(w, "%s", err.msg);
	params(&p, 4, 16);
	CHECK_OK(lp_worker_submit(w, &p, &r, &err), &err);
	lp_worker_free(w, 30000);
	while (lp_request_next(r, &ev, 1000) == 0 && ev.kind == LP_EVENT_TOKEN)
		tokens++;
	CHECK_EQ_INT(tokens, 16);
	CHECK_EQ_INT(ev.kind, LP_EVENT_END);
	CHECK(!ev.cancelled);
	lp_request_free(r);
}

int main(void)
{
	struct lp_err err = {0};
	char path[512];

	TEST_MAIN_BEGIN("test-worker");
	snprintf(path, sizeof(path), "%s/tiny-llama", test_fixtures_dir());
	if (lp_backend_cpu_new(&be, 0, &err) || lp_model_load(&model, path, be, &err) ||
	    load_goldens()) {
		printf("FAIL test-worker:setup: %s\n", err.msg);
		return 1;
	}
	RUN(test_concurrent_clients);
	RUN(test_cancel_frees_blocks);
	RUN(test_slow_reader_cancelled);
	RUN(test_errors_as_events);
	RUN(test_logprobs);
	RUN(test_drain_on_free);
	lp_model_free(model);
	lp_backend_destroy(be);
	TEST_MAIN_END();
}
