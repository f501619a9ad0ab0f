/* The engine thread; see worker.h.
 *
 * Locks, always taken in this order:
 *   w->lock    the engine (held by the engine thread for a step, by
 *              loaders for an install, by readers of adapter lists/stats)
 *   w->qmu     the submit queue, the active list's membership flags, and
 *              the wake-up condition of the engine thread
 *   r->mu      one request's channel and flags
 */
#include "agent/engine/worker.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "agent/adapters/lora.h"

struct lp_request {
	uint64_t id;
	struct lp_worker *w;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct lp_event *ring; /* capacity cap + 1: the last slot is kept for the end */
	int cap, head, count;
	bool final_pushed; /* END or ERROR is in the ring */
	bool final_read;   /* ... and was read */
	bool cancel;       /* asked by the reader */
	int refs;          /* reader + engine side */
	/* engine side: what lp_engine_add takes, by pointer, over the
	 * request's own copies of the adapter name and the prompt */
	char *adapter;
	int32_t *prompt;
	struct lp_seq_params params;
	int logprobs;
	double t_queued; /* CLOCK_MONOTONIC seconds it was submitted */
	struct lp_seq *seq;
	int n_generated;
	struct lp_request *next; /* queue or active list */
};

struct lp_worker {
	struct lp_engine *e;
	struct lp_worker_config cfg;
	pthread_t thread;
	bool thread_started;
	pthread_mutex_t lock;    /* the engine */
	atomic_int lock_waiters; /* threads other than the engine's waiting for it */
	pthread_mutex_t qmu;
	pthread_cond_t qcv;     /* engine thread waits: work, cancel, stop */
	pthread_cond_t idle_cv; /* drain waits: nothing queued or active */
	struct lp_request *q_head, *q_tail;
	int q_len;
	struct lp_request *active; /* in the engine (engine thread only) */
	int n_active;              /* under qmu */
	bool closing, stopping;
	bool wake; /* a cancel or submit since the last look */
	uint64_t next_id;
	atomic_uint_fast64_t next_group;
	struct lp_err failure; /* under qmu: the engine failed (code != 0) */
};

void lp_worker_config_default(struct lp_worker_config *c)
{
	c->queue_capacity = 1024;
	c->channel_capacity = 4096;
	c->test_step_delay_ms = 0;
}

static void cond_init_monotonic(pthread_cond_t *cv)
{
	pthread_condattr_t a;

	pthread_condattr_init(&a);
	pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
	pthread_cond_init(cv, &a);
	pthread_condattr_destroy(&a);
}

static double now_seconds(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Takes the engine's lock from a thread other than the engine's. */
static void lock_engine(struct lp_worker *w)
{
	atomic_fetch_add(&w->lock_waiters, 1);
	pthread_mutex_lock(&w->lock);
	atomic_fetch_sub(&w->lock_waiters, 1);
}

/* The CLOCK_MONOTONIC time ms milliseconds from now. */
static struct timespec deadline_after(int ms)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	t.tv_sec += ms / 1000;
	t.tv_nsec += (long)(ms % 1000) * 1000000L;
	if (t.tv_nsec >= 1000000000L) {
		t.tv_sec++;
		t.tv_nsec -= 1000000000L;
	}
	return t;
}

/* ---- requests ---- */

static void request_unref(struct lp_request *r)
{
	bool last;

	pthread_mutex_lock(&r->mu);
	last = --r->refs == 0;
	pthread_mutex_unlock(&r->mu);
	if (!last)
		return;
	pthread_mutex_destroy(&r->mu);
	pthread_cond_destroy(&r->cv);
	free(r->ring);
	free(r->adapter);
	free(r->prompt);
	lp_grammar_unref(r->params.grammar);
	free(r);
}

/* Pushes an event; the final one always fits. False when a token does not
 * fit (the reader is too slow). */
static bool request_push(struct lp_request *r, const struct lp_event *ev)
{
	bool final = ev->kind != LP_EVENT_TOKEN, ok = true;

	pthread_mutex_lock(&r->mu);
	if (r->final_pushed || (!final && r->count >= r->cap)) {
		ok = false;
	} else {
		r->ring[(r->head + r->count) % (r->cap + 1)] = *ev;
		r->count++;
		r->final_pushed = final;
		pthread_cond_broadcast(&r->cv);
	}
	pthread_mutex_unlock(&r->mu);
	return ok;
}

static bool request_cancelled(struct lp_request *r)
{
	bool c;

	pthread_mutex_lock(&r->mu);
	c = r->cancel;
	pthread_mutex_unlock(&r->mu);
	return c;
}

int lp_request_next(struct lp_request *r, struct lp_event *ev, int timeout_ms)
{
	struct timespec deadline;
	int rc = 0;

	if (timeout_ms >= 0) {
		deadline = deadline_after(timeout_ms);
	}
	pthread_mutex_lock(&r->mu);
	while (r->count == 0 && !r->final_read) {
		if (timeout_ms < 0) {
			pthread_cond_wait(&r->cv, &r->mu);
		} else if (pthread_cond_timedwait(&r->cv, &r->mu, &deadline) == ETIMEDOUT) {
			rc = -ETIMEDOUT;
			break;
		}
	}
	if (!rc && r->count == 0) {
		rc = -ENODATA;
	} else if (!rc) {
		*ev = r->ring[r->head];
		r->head = (r->head + 1) % (r->cap + 1);
		r->count--;
		if (ev->kind != LP_EVENT_TOKEN)
			r->final_read = true;
	}
	pthread_mutex_unlock(&r->mu);
	return rc;
}

void lp_request_cancel(struct lp_request *r)
{
	struct lp_worker *w = r->w;
	bool engine_holds;

	pthread_mutex_lock(&r->mu);
	r->cancel = true;
	engine_holds = r->refs > 1;
	pthread_mutex_unlock(&r->mu);
	/* once the engine has let go (the request is over, or the worker is
	 * gone), there is no one to wake */
	if (!engine_holds)
		return;
	pthread_mutex_lock(&w->qmu);
	w->wake = true;
	pthread_cond_signal(&w->qcv);
	pthread_mutex_unlock(&w->qmu);
}

void lp_request_free(struct lp_request *r)
{
	if (!r)
		return;
	lp_request_cancel(r);
	request_unref(r);
}

uint64_t lp_request_id(const struct lp_request *r)
{
	return r->id;
}

int lp_worker_failure(struct lp_worker *w, struct lp_err *err)
{
	int rc = 0;

	pthread_mutex_lock(&w->qmu);
	if (w->failure.code)
		rc = lp_errf(err, w->failure.code, "%s", w->failure.msg);
	pthread_mutex_unlock(&w->qmu);
	return rc;
}

int lp_worker_submit(struct lp_worker *w, const struct lp_request_params *p,
                     struct lp_request **out, struct lp_err *err)
{
	struct lp_request *r;
	int rc;

	*out = NULL;
	if (p->n_prompt == 0 || p->max_tokens < 1)
		return lp_errf(err, -EINVAL, "a request needs a prompt and max_tokens >= 1");
	if (p->logprobs > LP_MAX_TOP_LOGPROBS)
		return lp_errf(err, -EINVAL, "'logprobs' must be at most %d", LP_MAX_TOP_LOGPROBS);
	rc = lp_sampling_params_check(&p->sampling, err);
	if (rc)
		return rc;
	r = calloc(1, sizeof(*r));
	if (!r)
		return lp_errf(err, -ENOMEM, "out of memory");
	r->w = w;
	r->cap = w->cfg.channel_capacity;
	r->ring = malloc((size_t)(r->cap + 1) * sizeof(*r->ring));
	r->prompt = malloc(p->n_prompt * sizeof(int32_t));
	r->adapter = p->adapter && *p->adapter ? strdup(p->adapter) : NULL;
	if (!r->ring || !r->prompt || (p->adapter && *p->adapter && !r->adapter)) {
		free(r->ring);
		free(r->prompt);
		free(r->adapter);
		free(r);
		return lp_errf(err, -ENOMEM, "out of memory");
	}
	pthread_mutex_init(&r->mu, NULL);
	cond_init_monotonic(&r->cv);
	memcpy(r->prompt, p->prompt, p->n_prompt * sizeof(int32_t));
	r->params = (struct lp_seq_params){
	    .adapter = r->adapter,
	    .prompt = r->prompt,
	    .n_prompt = p->n_prompt,
	    .max_tokens = p->max_tokens,
	    .ignore_eos = p->ignore_eos,
	    .sampling = p->sampling,
	    .logprobs = p->logprobs >= 0,
	    .top_logprobs = p->logprobs > 0 ? p->logprobs : 0,
	    .group = p->group,
	    .grammar = p->grammar ? lp_grammar_ref(p->grammar) : NULL,
	};
	r->logprobs = p->logprobs;
	r->t_queued = now_seconds();
	r->refs = 2;

	pthread_mutex_lock(&w->qmu);
	if (w->closing) {
		rc = lp_errf(err, -ESHUTDOWN, "the server is shutting down");
	} else if (w->failure.code) {
		rc = lp_errf(err, w->failure.code, "%s", w->failure.msg);
	} else if (w->q_len >= w->cfg.queue_capacity) {
		rc = lp_errf(err, -EAGAIN, "%d request%s already queued", w->q_len,
		             w->q_len == 1 ? " is" : "s are");
	} else {
		r->id = ++w->next_id;
		if (w->q_tail)
			w->q_tail->next = r;
		else
			w->q_head = r;
		w->q_tail = r;
		w->q_len++;
		w->wake = true;
		pthread_cond_signal(&w->qcv);
		rc = 0;
	}
	pthread_mutex_unlock(&w->qmu);
	if (rc) {
		r->refs = 1;
		request_unref(r);
		return rc;
	}
	*out = r;
	return 0;
}

uint64_t lp_worker_new_group(struct lp_worker *w)
{
	return atomic_fetch_add(&w->next_group, 1) + 1;
}

/* ---- the engine thread ---- */

static void push_end(struct lp_request *r, bool cancelled)
{
	struct lp_event ev;

	memset(&ev, 0, sizeof(ev));
	ev.kind = LP_EVENT_END;
	ev.finish = r->seq ? r->seq->finish : LP_FINISH_ABORT;
	ev.cancelled = cancelled;
	ev.prompt_tokens = (int)r->params.n_prompt;
	ev.completion_tokens = r->n_generated;
	ev.cached_tokens = r->seq ? r->seq->n_cached : 0;
	ev.t_queued = r->t_queued;
	ev.t_scheduled = r->seq ? r->seq->t_scheduled : 0;
	request_push(r, &ev);
}

/* Removes r from the engine: frees its sequence and the engine's ref. */
static void retire(struct lp_worker *w, struct lp_request *r, struct lp_request **prev_next)
{
	*prev_next = r->next;
	r->next = NULL;
	if (r->seq) {
		lp_engine_release(w->e, r->seq);
		r->seq = NULL;
	}
	pthread_mutex_lock(&w->qmu);
	w->n_active--;
	if (w->n_active == 0 && w->q_len == 0)
		pthread_cond_broadcast(&w->idle_cv);
	pthread_mutex_unlock(&w->qmu);
	request_unref(r);
}

/* Moves queued requests into the engine; engine lock held. */
static void admit(struct lp_worker *w, struct lp_request *batch)
{
	while (batch) {
		struct lp_request *r = batch;
		struct lp_event ev;

		batch = r->next;
		r->next = NULL;
		memset(&ev, 0, sizeof(ev));
		if (request_cancelled(r)) {
			push_end(r, true);
		} else if (w->failure.code) {
			ev.kind = LP_EVENT_ERROR;
			lp_errf(&ev.err, w->failure.code, "%s", w->failure.msg);
			request_push(r, &ev);
		} else if (lp_engine_add(w->e, &r->params, &r->seq, &ev.err)) {
			ev.kind = LP_EVENT_ERROR;
			request_push(r, &ev);
		} else {
			r->seq->user = r;
			r->next = w->active;
			w->active = r;
			continue;
		}
		pthread_mutex_lock(&w->qmu);
		w->n_active--;
		if (w->n_active == 0 && w->q_len == 0)
			pthread_cond_broadcast(&w->idle_cv);
		pthread_mutex_unlock(&w->qmu);
		request_unref(r);
	}
}

/* The engine failed (its backend's sticky error): every request in it
 * ends with that error, and so will every later one (admit). */
static void fail_all(struct lp_worker *w, const struct lp_err *err)
{
	pthread_mutex_lock(&w->qmu);
	if (!w->failure.code)
		w->failure = *err;
	pthread_mutex_unlock(&w->qmu);
	for (struct lp_request **pp = &w->active; *pp;) {
		struct lp_request *r = *pp;
		struct lp_event ev;

		memset(&ev, 0, sizeof(ev));
		ev.kind = LP_EVENT_ERROR;
		ev.err = *err;
		request_push(r, &ev);
		lp_engine_finish(w->e, r->seq);
		retire(w, r, pp);
	}
}

/* One round: cancellations, then a step; engine lock held. */
static int run_step(struct lp_worker *w)
{
	const struct lp_step_output *outs;
	int n_outs;
	struct lp_err err;

	for (struct lp_request **pp = &w->active; *pp;) {
		struct lp_request *r = *pp;
		if (request_cancelled(r)) {
			lp_engine_finish(w->e, r->seq);
			push_end(r, true);
			retire(w, r, pp);
		} else {
			pp = &r->next;
		}
	}
	if (!lp_engine_has_work(w->e))
		return 0;
	if (lp_engine_step(w->e, &outs, &n_outs, &err)) {
		fail_all(w, &err);
		return -1;
	}
	for (int i = 0; i < n_outs; i++) {
		struct lp_request *r = outs[i].seq->user;
		struct lp_event ev;

		/* all but err, the last field, which a token leaves unset */
		memset(&ev, 0, offsetof(struct lp_event, err));
		ev.kind = LP_EVENT_TOKEN;
		ev.token = outs[i].token;
		ev.t_queued = r->t_queued;
		ev.t_scheduled = outs[i].seq->t_scheduled;
		ev.n_top = outs[i].n_top;
		ev.logprob = outs[i].logprob;
		memcpy(ev.top_ids, outs[i].top_ids, (size_t)ev.n_top * sizeof(ev.top_ids[0]));
		memcpy(ev.top_logprobs, outs[i].top_logprobs,
		       (size_t)ev.n_top * sizeof(ev.top_logprobs[0]));
		r->n_generated++;
		if (!request_push(r, &ev)) {
			/* the reader fell a whole channel behind: stop this one */
			pthread_mutex_lock(&r->mu);
			r->cancel = true;
			pthread_mutex_unlock(&r->mu);
		}
	}
	/* finished ones leave the engine */
	for (struct lp_request **pp = &w->active; *pp;) {
		struct lp_request *r = *pp;
		if (r->seq->state == LP_SEQ_FINISHED) {
			push_end(r, false);
			retire(w, r, pp);
		} else {
			pp = &r->next;
		}
	}
	return n_outs;
}

static void *engine_thread(void *arg)
{
	struct lp_worker *w = arg;

	for (;;) {
		struct lp_request *batch = NULL;
		bool stop;

		pthread_mutex_lock(&w->qmu);
		while (!w->q_head && !w->active && !w->stopping)
			pthread_cond_wait(&w->qcv, &w->qmu);
		pthread_mutex_unlock(&w->qmu);

		/* the queue is emptied into the engine under the engine's
		 * lock, so that lp_worker_stats (which holds it) finds every
		 * request in one place or the other */
		pthread_mutex_lock(&w->lock);
		pthread_mutex_lock(&w->qmu);
		stop = w->stopping;
		batch = w->q_head;
		w->n_active += w->q_len;
		w->q_head = w->q_tail = NULL;
		w->q_len = 0;
		w->wake = false;
		pthread_mutex_unlock(&w->qmu);
		admit(w, batch);
		if (stop) {
			for (struct lp_request *r = w->active; r; r = r->next) {
				pthread_mutex_lock(&r->mu);
				r->cancel = true;
				pthread_mutex_unlock(&r->mu);
			}
		}
		int n = run_step(w);
		pthread_mutex_unlock(&w->lock);
		/* mutexes are not fair: let a loader or reader that waits for
		 * the engine take it before the next step does */
		while (atomic_load(&w->lock_waiters) > 0)
			sched_yield();
		if (stop && !w->active)
			break;
		if (w->cfg.test_step_delay_ms > 0 && (n > 0 || w->active)) {
			struct timespec d = {w->cfg.test_step_delay_ms / 1000,
			                     (long)(w->cfg.test_step_delay_ms % 1000) * 1000000L};
			nanosleep(&d, NULL);
		}
		if (n <= 0 && w->active) {
			/* nothing could run (waiting for a slot): doze until poked */
			struct timespec ts = deadline_after(2);
			pthread_mutex_lock(&w->qmu);
			if (!w->wake && !w->stopping)
				pthread_cond_timedwait(&w->qcv, &w->qmu, &ts);
			pthread_mutex_unlock(&w->qmu);
		}
	}
	return NULL;
}

int lp_worker_start(struct lp_worker **out, struct lp_engine *e, const struct lp_worker_config *cfg,
                    struct lp_err *err)
{
	struct lp_worker *w;

	*out = NULL;
	if (cfg->queue_capacity < 1 || cfg->channel_capacity < 1)
		return lp_errf(err, -EINVAL, "queue and channel capacities must be positive");
	if (cfg->test_step_delay_ms < 0 || cfg->test_step_delay_ms > 10000)
		return lp_errf(err, -EINVAL, "the step delay must be 0 to 10000 ms, not %d",
		               cfg->test_step_delay_ms);
	w = calloc(1, sizeof(*w));
	if (!w)
		return lp_errf(err, -ENOMEM, "out of memory");
	w->e = e;
	w->cfg = *cfg;
	atomic_init(&w->next_group, 0);
	pthread_mutex_init(&w->lock, NULL);
	pthread_mutex_init(&w->qmu, NULL);
	cond_init_monotonic(&w->qcv);
	cond_init_monotonic(&w->idle_cv);
	if (pthread_create(&w->thread, NULL, engine_thread, w)) {
		free(w);
		return lp_errf(err, -EAGAIN, "cannot start the engine thread");
	}
	w->thread_started = true;
	*out = w;
	return 0;
}

void lp_worker_close(struct lp_worker *w)
{
	pthread_mutex_lock(&w->qmu);
	w->closing = true;
	pthread_mutex_unlock(&w->qmu);
}

void lp_worker_free(struct lp_worker *w, int drain_ms)
{
	struct timespec deadline;

	if (!w)
		return;
	lp_worker_close(w);
	deadline = deadline_after(drain_ms);
	pthread_mutex_lock(&w->qmu);
	while ((w->n_active > 0 || w->q_len > 0) &&
	       pthread_cond_timedwait(&w->idle_cv, &w->qmu, &deadline) != ETIMEDOUT)
		;
	w->stopping = true;
	pthread_cond_signal(&w->qcv);
	pthread_mutex_unlock(&w->qmu);
	if (w->thread_started)
		pthread_join(w->thread, NULL);
	lp_engine_free(w->e);
	pthread_mutex_destroy(&w->lock);
	pthread_mutex_destroy(&w->qmu);
	pthread_cond_destroy(&w->qcv);
	pthread_cond_destroy(&w->idle_cv);
	free(w);
}

/* ---- adapters and stats ---- */

static void summarize(const struct lp_adapter *a, struct lp_adapter_summary *s)
{
	memset(s, 0, sizeof(*s));
	snprintf(s->name, sizeof(s->name), "%s", a->name);
	snprintf(s->source, sizeof(s->source), "%s", a->source);
	snprintf(s->sha256, sizeof(s->sha256), "%s", a->sha256);
	s->lora_id = a->lora_id;
	s->rank = a->rank;
	s->targets = a->targets;
	s->absent = a->absent;
	s->format = a->format;
	s->tier = lp_adapter_tier_name(lp_adapter_tier(a));
	s->requests_running = a->running_refs;
	s->load_ms = a->load_ms;
}

int lp_worker_lora_load(struct lp_worker *w, const char *name, const char *path, const char *root,
                        const char *source, const char *sha256, bool inplace, bool *already,
                        struct lp_adapter_summary *out, struct lp_err *err)
{
	struct lp_lora_cache *c = lp_engine_loras(w->e);
	struct lp_adapter *a;
	struct lp_lora *l;
	struct timespec t0, t1;
	int rc;

	*already = false;
	if (!source)
		source = path;
	if (!sha256)
		sha256 = "";
	lock_engine(w);
	a = lp_lora_cache_find(c, name);
	if (a && !inplace && !strcmp(a->source, source) && !strcmp(a->sha256, sha256)) {
		*already = true;
		if (out)
			summarize(a, out);
		pthread_mutex_unlock(&w->lock);
		return 0;
	}
	pthread_mutex_unlock(&w->lock);

	/* the slow part, outside the engine's lock */
	clock_gettime(CLOCK_MONOTONIC, &t0);
	rc = lp_lora_load_in(&l, root, path, lp_lora_cache_shape(c), err);
	if (rc)
		return rc;
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double ms =
	    (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-6;

	lock_engine(w);
	rc = lp_lora_cache_install(c, name, path, root, source, sha256, l, ms, inplace, already,
	                           err);
	if (!rc && out)
		summarize(lp_lora_cache_find(c, name), out);
	pthread_mutex_unlock(&w->lock);
	return rc;
}

int lp_worker_lora_unload(struct lp_worker *w, const char *name, struct lp_err *err)
{
	int rc;

	lock_engine(w);
	rc = lp_lora_cache_unload(lp_engine_loras(w->e), name, err);
	pthread_mutex_unlock(&w->lock);
	return rc;
}

size_t lp_worker_lora_list(struct lp_worker *w, struct lp_adapter_summary *out, size_t cap)
{
	struct lp_lora_cache *c = lp_engine_loras(w->e);
	size_t n = 0;

	lock_engine(w);
	for (struct lp_adapter *a = lp_lora_cache_next(c, NULL); a; a = lp_lora_cache_next(c, a)) {
		if (n < cap)
			summarize(a, &out[n]);
		n++;
	}
	pthread_mutex_unlock(&w->lock);
	return n;
}

int lp_worker_lora_get(struct lp_worker *w, const char *name, struct lp_adapter_summary *out)
{
	struct lp_adapter *a;
	int rc = -ENOENT;

	lock_engine(w);
	a = lp_lora_cache_find(lp_engine_loras(w->e), name);
	if (a) {
		summarize(a, out);
		rc = 0;
	}
	pthread_mutex_unlock(&w->lock);
	return rc;
}

/* Appends name to the comma-separated list in buf unless it is there
 * already; false when it does not fit (buf unchanged). */
static bool list_add(char *buf, size_t cap, const char *name)
{
	size_t n = strlen(name), len = strlen(buf);

	for (const char *p = buf; *p;) {
		size_t l = strcspn(p, ",");
		if (l == n && !memcmp(p, name, n))
			return true;
		p += l + (p[l] == ',');
	}
	if (len + (len > 0) + n + 1 > cap)
		return false;
	if (len)
		buf[len++] = ',';
	memcpy(buf + len, name, n + 1);
	return true;
}

/* True when a request of group g (not 0) is in the engine, or in the
 * queue before stop. Engine and queue locks held. */
static bool group_counted(const struct lp_worker *w, uint64_t g, const struct lp_request *stop)
{
	for (const struct lp_request *r = w->active; r; r = r->next)
		if (r->params.group == g)
			return true;
	for (const struct lp_request *r = w->q_head; r != stop; r = r->next)
		if (r->params.group == g)
			return true;
	return false;
}

void lp_worker_stats(struct lp_worker *w, struct lp_worker_stats *out)
{
	bool whole;

	lock_engine(w);
	lp_engine_stats(w->e, &out->engine);
	lp_lora_cache_stats(lp_engine_loras(w->e), &out->loras);
	out->config = *lp_engine_config(w->e);
	whole = lp_engine_adapter_lists(w->e, out->running_adapters, sizeof(out->running_adapters),
	                                out->waiting_adapters, sizeof(out->waiting_adapters));
	out->running_requests = out->engine.running_requests;
	out->waiting_requests = out->engine.waiting_requests;
	/* requests not yet in the engine wait too; a choice of a request
	 * already counted (in the engine, or earlier in the queue) does not
	 * make another */
	pthread_mutex_lock(&w->qmu);
	out->queued = w->q_len;
	for (const struct lp_request *r = w->q_head; r; r = r->next) {
		if (!r->params.group || !group_counted(w, r->params.group, r))
			out->waiting_requests++;
		if (r->adapter &&
		    !list_add(out->waiting_adapters, sizeof(out->waiting_adapters), r->adapter))
			whole = false;
	}
	pthread_mutex_unlock(&w->qmu);
	pthread_mutex_unlock(&w->lock);
	out->adapters_truncated = !whole;
}

const struct lp_model *lp_worker_model(const struct lp_worker *w)
{
	return lp_engine_model(w->e);
}
