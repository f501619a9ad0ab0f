/* The worker's bounded submit queue (what the API answers with 429
 * queue_full): a submit beyond the capacity is refused with -EAGAIN and a
 * message, the requests it accepted lose nothing, and the queue takes
 * requests again once the engine has drained it.
 *
 * To fill the queue the engine thread must stay inside a step. The test
 * gives the model a backend that is the CPU backend with one op wrapped: a
 * step's logits download waits while the test holds a gate shut, with the
 * engine thread inside the step, so requests submitted meanwhile stay in
 * the queue. */
#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <time.h>

#include "agent/engine/worker.h"
#include "tests/test.h"

#define CAPACITY   2
#define MAX_TOKENS 8
#define N_PROMPTS  8

/* ---- a backend whose downloads wait at a gate ---- */

static struct lp_backend *g_cpu;
static struct lp_backend_ops g_gated_ops;
static struct lp_backend g_gated;

static struct {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	bool shut;    /* downloads wait at the gate */
	int arrivals; /* downloads that reached it since it was shut */
	int passes;   /* of those, how many may go on */
} g_gate = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false, 0, 0};

static void gated_download(void *ctx, void *dst, const void *src, size_t n)
{
	pthread_mutex_lock(&g_gate.mu);
	if (g_gate.shut) {
		int me = ++g_gate.arrivals;

		pthread_cond_broadcast(&g_gate.cv);
		while (g_gate.shut && me > g_gate.passes)
			pthread_cond_wait(&g_gate.cv, &g_gate.mu);
	}
	pthread_mutex_unlock(&g_gate.mu);
	g_cpu->ops->download(ctx, dst, src, n);
}

static void gate_shut(void)
{
	pthread_mutex_lock(&g_gate.mu);
	g_gate.shut = true;
	g_gate.arrivals = 0;
	g_gate.passes = 0;
	pthread_mutex_unlock(&g_gate.mu);
}

/* Lets the step waiting at the gate finish; the next one waits again. */
static void gate_let_one_pass(void)
{
	pthread_mutex_lock(&g_gate.mu);
	g_gate.passes++;
	pthread_cond_broadcast(&g_gate.cv);
	pthread_mutex_unlock(&g_gate.mu);
}

static void gate_open(void)
{
	pthread_mutex_lock(&g_gate.mu);
	g_gate.shut = false;
	pthread_cond_broadcast(&g_gate.cv);
	pthread_mutex_unlock(&g_gate.mu);
}

/* Waits up to 30 s until n steps have reached the shut gate. */
static bool gate_wait_arrivals(int n)
{
	struct timespec deadline;
	bool arrived;

	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += 30;
	pthread_mutex_lock(&g_gate.mu);
	while (g_gate.arrivals < n &&
	       pthread_cond_timedwait(&g_gate.cv, &g_gate.mu, &deadline) != ETIMEDOUT)
		;
	arrived = g_gate.arrivals >= n;
	pthread_mutex_unlock(&g_gate.mu);
	return arrived;
}

/* ---- the model and the tokens each prompt gives alone ---- */

static struct lp_model *g_model;
static int32_t g_prompt[N_PROMPTS][128];
static int g_prompt_len[N_PROMPTS];
static int32_t g_greedy[N_PROMPTS][MAX_TOKENS];

static int read_goldens(void)
{
	char path[512];
	json_error_t jerr;
	json_t *root, *list;
	int rc = -1;

	snprintf(path, sizeof(path), "%s/goldens/tiny-llama.json", test_fixtures_dir());
	root = json_load_file(path, 0, &jerr);
	if (!root)
		return -1;
	list = json_object_get(json_object_get(root, "batch"), "prompts");
	if (json_array_size(list) < N_PROMPTS)
		goto out;
	for (int i = 0; i < N_PROMPTS; i++) {
		json_t *p = json_array_get(list, (size_t)i);
		json_t *ids = json_object_get(p, "ids"), *greedy = json_object_get(p, "greedy");
		size_t n = json_array_size(ids);

		if (n == 0 || n > 128 || json_array_size(greedy) < MAX_TOKENS)
			goto out;
		for (size_t k = 0; k < n; k++)
			g_prompt[i][k] = (int32_t)json_integer_value(json_array_get(ids, k));
		g_prompt_len[i] = (int)n;
		for (int k = 0; k < MAX_TOKENS; k++)
			g_greedy[i][k] = (int32_t)json_integer_value(json_array_get(greedy, k));
	}
	rc = 0;
out:
	json_decref(root);
	return rc;
}

static void request_params(struct lp_request_params *p, int i)
{
	memset(p, 0, sizeof(*p));
	p->prompt = g_prompt[i];
	p->n_prompt = (size_t)g_prompt_len[i];
	p->max_tokens = MAX_TOKENS;
	p->ignore_eos = true;
	p->logprobs = -1;
	lp_sampling_params_default(&p->sampling);
	p->sampling.temperature = 0;
}

static struct lp_worker *start_worker(struct lp_err *err)
{
	struct lp_engine_config ec;
	struct lp_worker_config wc;
	struct lp_engine *e;
	struct lp_worker *w;

	lp_engine_config_default(&ec);
	ec.max_model_len = 256;
	ec.kv_cache_bytes = 32u << 20;
	if (lp_engine_new(&e, g_model, &ec, err))
		return NULL;
	lp_worker_config_default(&wc);
	wc.queue_capacity = CAPACITY;
	wc.channel_capacity = 64;
	if (lp_worker_start(&w, e, &wc, err)) {
		lp_engine_free(e);
		return NULL;
	}
	return w;
}

/* Reads r to its end: all MAX_TOKENS greedy tokens of prompt i, then a
 * normal end. */
static void expect_complete(struct lp_request *r, int i)
{
	struct lp_event ev;
	int32_t toks[MAX_TOKENS];
	int n = 0, rc;

	while ((rc = lp_request_next(r, &ev, 30000)) == 0 && ev.kind == LP_EVENT_TOKEN) {
		CHECK_MSG(n < MAX_TOKENS, "prompt %d: more than %d tokens", i, MAX_TOKENS);
		toks[n++] = ev.token;
	}
	CHECK_MSG(rc == 0, "prompt %d: no end after %d tokens (%d)", i, n, rc);
	CHECK_MSG(ev.kind == LP_EVENT_END, "prompt %d: ended with event %d: %s", i, (int)ev.kind,
	          ev.err.msg);
	CHECK(!ev.cancelled);
	CHECK_EQ_INT(ev.finish, LP_FINISH_LENGTH);
	CHECK_EQ_INT(ev.completion_tokens, MAX_TOKENS);
	CHECK_EQ_INT(ev.prompt_tokens, g_prompt_len[i]);
	CHECK_EQ_INT(n, MAX_TOKENS);
	CHECK_MSG(!memcmp(toks, g_greedy[i], sizeof(toks)),
	          "prompt %d: tokens differ from the prompt alone", i);
}

/* With the gate shut: one request into the engine's step, CAPACITY more
 * into the queue, then refusals. r[0 .. CAPACITY] get the accepted ones. */
static void fill_queue(struct lp_worker *w, int first, struct lp_request **r)
{
	struct lp_request_params p;
	struct lp_request *extra = NULL;
	struct lp_err err = {0};
	char want[64];

	request_params(&p, first);
	CHECK_OK(lp_worker_submit(w, &p, &r[0], &err), &err);
	CHECK_MSG(gate_wait_arrivals(1), "the engine did not start a step in 30 s");
	/* the engine thread is inside a step: these wait in the queue */
	for (int k = 1; k <= CAPACITY; k++) {
		request_params(&p, first + k);
		CHECK_OK(lp_worker_submit(w, &p, &r[k], &err), &err);
	}
	/* one more is refused, again and again, and gets no request */
	snprintf(want, sizeof(want), "%d requests are already queued", CAPACITY);
	for (int k = 0; k < 3; k++) {
		lp_err_clear(&err);
		request_params(&p, first + CAPACITY + 1);
		CHECK_EQ_INT(lp_worker_submit(w, &p, &extra, &err), -EAGAIN);
		CHECK(extra == NULL);
		CHECK_EQ_INT(err.code, -EAGAIN);
		CHECK_EQ_STR(err.msg, want);
	}
	/* a bad request is still told what is wrong with it, full queue or not */
	request_params(&p, first);
	p.max_tokens = 0;
	CHECK_EQ_INT(lp_worker_submit(w, &p, &extra, &err), -EINVAL);
	CHECK(extra == NULL);
}

/* Two rounds on one worker: fill the queue while the engine is held in a
 * step, let it go, read everything. The second round shows the queue's
 * places all came back. */
static void test_queue_full(void)
{
	struct lp_err err = {0};
	struct lp_worker *w = start_worker(&err);

	CHECK_MSG(w, "%s", err.msg);
	for (int round = 0; round < 2 && !test_current_failed; round++) {
		struct lp_request *r[CAPACITY + 1] = {NULL};
		int first = round * (CAPACITY + 2);

		gate_shut();
		fill_queue(w, first, r);
		gate_open();
		for (int k = 0; k <= CAPACITY && !test_current_failed; k++)
			if (r[k])
				expect_complete(r[k], first + k);
		for (int k = 0; k <= CAPACITY; k++)
			lp_request_free(r[k]);
	}
	if (!test_current_failed) {
		/* the queue has drained: the request refused before now runs */
		struct lp_request_params p;
		struct lp_request *r = NULL;

		request_params(&p, CAPACITY + 1);
		if (lp_worker_submit(w, &p, &r, &err) != 0)
			TEST_FAIL("a submit after the queue drained: %s", err.msg);
		else
			expect_complete(r, CAPACITY + 1);
		lp_request_free(r);
	}
	lp_worker_free(w, 10000);
}

/* Submits prompt i into *r; a refusal fails the test. */
static void submit_ok(struct lp_worker *w, int i, struct lp_request **r)
{
	struct lp_request_params p;
	struct lp_err err = {0};

	request_params(&p, i);
	if (lp_worker_submit(w, &p, r, &err))
		TEST_FAIL("submitting prompt %d: %s", i, err.msg);
}

/* Only requests waiting for the engine count against the capacity: with
 * three requests running in a held step and the queue empty, CAPACITY more
 * are accepted, and the one after is refused. */
static void check_running_not_counted(struct lp_worker *w, struct lp_request **r)
{
	struct lp_request_params p;
	struct lp_request *extra = NULL;
	struct lp_err err = {0};

	submit_ok(w, 0, &r[0]);
	CHECK_MSG(gate_wait_arrivals(1), "the engine did not start a step in 30 s");
	submit_ok(w, 1, &r[1]);
	submit_ok(w, 2, &r[2]);
	if (test_current_failed)
		return;
	/* the next step takes 1 and 2 out of the queue and runs all three */
	gate_let_one_pass();
	CHECK_MSG(gate_wait_arrivals(2), "the engine did not start a second step in 30 s");
	submit_ok(w, 3, &r[3]);
	submit_ok(w, 4, &r[4]);
	if (test_current_failed)
		return;
	request_params(&p, 5);
	CHECK_EQ_INT(lp_worker_submit(w, &p, &extra, &err), -EAGAIN);
	CHECK(extra == NULL);
}

static void test_running_requests_not_counted(void)
{
	struct lp_err err = {0};
	struct lp_worker *w = start_worker(&err);
	struct lp_request *r[2 * CAPACITY + 1] = {NULL};

	CHECK_MSG(w, "%s", err.msg);
	gate_shut();
	check_running_not_counted(w, r);
	gate_open();
	for (int k = 0; k <= 2 * CAPACITY && !test_current_failed; k++)
		if (r[k])
			expect_complete(r[k], k);
	for (int k = 0; k <= 2 * CAPACITY; k++)
		lp_request_free(r[k]);
	lp_worker_free(w, 10000);
}

int main(void)
{
	struct lp_err err = {0};
	char path[512];

	TEST_MAIN_BEGIN("test-worker-queue");
	if (lp_backend_cpu_new(&g_cpu, 0, &err)) {
		printf("FAIL test-worker-queue:setup: %s\n", err.msg);
		return 1;
	}
	g_gated_ops = *g_cpu->ops;
	g_gated_ops.name = "cpu-gated";
	g_gated_ops.download = gated_download;
	g_gated.ops = &g_gated_ops;
	g_gated.ctx = g_cpu->ctx;
	snprintf(path, sizeof(path), "%s/tiny-llama", test_fixtures_dir());
	if (lp_model_load(&g_model, path, &g_gated, &err) || read_goldens()) {
		printf("FAIL test-worker-queue:setup: %s\n",
		       err.msg[0] ? err.msg : "cannot read goldens/tiny-llama.json");
		lp_model_free(g_model);
		lp_backend_destroy(g_cpu);
		return 1;
	}
	RUN(test_queue_full);
	RUN(test_running_requests_not_counted);
	lp_model_free(g_model);
	/* g_gated shares g_cpu's context: only g_cpu is destroyed */
	lp_backend_destroy(g_cpu);
	TEST_MAIN_END();
}
