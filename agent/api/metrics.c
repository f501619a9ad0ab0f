/* Prometheus metrics; see metrics.h. */
#include "agent/api/metrics.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* loraplane_'s own histograms */
static const double ttft_bounds[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                     1,     2.5,  5,     10,   30,  60};
static const double itl_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                    0.1,   0.25,   0.5,   1,    2.5};
/* vLLM's buckets, so that quantiles compare with a vLLM pool's */
static const double vllm_ttft_bounds[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,
                                          0.25,  0.5,   0.75, 1.0,  2.5,  5.0,  7.5,  10.0,
                                          20.0,  40.0,  80.0, 160,  640,  2560};
static const double vllm_itl_bounds[] = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,  0.3,  0.4, 0.5,
                                         0.75, 1.0,   2.5,  5.0,   7.5, 10.0, 20.0, 40.0, 80.0};
static const double vllm_request_bounds[] = {0.3,  0.5,  0.8,  1.0,  1.5,  2.0,  2.5,
                                             5.0,  10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                                             60.0, 120,  240,  480,  960,  1920, 7680};
#define N_OF(a)    (sizeof(a) / sizeof((a)[0]))
#define MAX_BOUNDS 24

/* vLLM's finished_reason label values */
static const char *const finish_names[LP_METRICS_N_FINISH] = {"stop", "length", "abort", "error"};

struct histogram {
	const double *bounds;
	size_t n_bounds;
	uint64_t buckets[MAX_BOUNDS + 1]; /* [n_bounds + 1]: the last is +Inf */
	uint64_t count;
	double sum;
};

struct series {
	char model[136];
	int status;
	uint64_t requests;
	uint64_t prompt_tokens;
	uint64_t generated_tokens;
};

/* What vLLM's request metrics count (one series: the base model's name). */
struct vllm_counts {
	struct histogram ttft, itl, e2e, queue, prefill, decode;
	uint64_t finished[LP_METRICS_N_FINISH];
	uint64_t prompt_tokens, generation_tokens;
};

struct lp_metrics {
	pthread_mutex_t mu;
	struct series *series; /* [LP_METRICS_MAX_SERIES] */
	size_t n_series;
	struct histogram ttft, itl;
	uint64_t disconnects;
	struct vllm_counts v;
};

static void histogram_init(struct histogram *h, const double *bounds, size_t n)
{
	h->bounds = bounds;
	h->n_bounds = n;
}

int lp_metrics_new(struct lp_metrics **out, struct lp_err *err)
{
	struct lp_metrics *m = calloc(1, sizeof(*m));

	*out = NULL;
	if (!m)
		return lp_errf(err, -ENOMEM, "out of memory");
	m->series = calloc(LP_METRICS_MAX_SERIES, sizeof(*m->series));
	if (!m->series) {
		free(m);
		return lp_errf(err, -ENOMEM, "out of memory");
	}
	pthread_mutex_init(&m->mu, NULL);
	histogram_init(&m->ttft, ttft_bounds, N_OF(ttft_bounds));
	histogram_init(&m->itl, itl_bounds, N_OF(itl_bounds));
	histogram_init(&m->v.ttft, vllm_ttft_bounds, N_OF(vllm_ttft_bounds));
	histogram_init(&m->v.itl, vllm_itl_bounds, N_OF(vllm_itl_bounds));
	histogram_init(&m->v.e2e, vllm_request_bounds, N_OF(vllm_request_bounds));
	histogram_init(&m->v.queue, vllm_request_bounds, N_OF(vllm_request_bounds));
	histogram_init(&m->v.prefill, vllm_request_bounds, N_OF(vllm_request_bounds));
	histogram_init(&m->v.decode, vllm_request_bounds, N_OF(vllm_request_bounds));
	*out = m;
	return 0;
}

void lp_metrics_free(struct lp_metrics *m)
{
	if (!m)
		return;
	pthread_mutex_destroy(&m->mu);
	free(m->series);
	free(m);
}

/* The series of (model, status), created if there is room. The last
 * slots are kept for "other", which collects models past the limit. mu
 * held. */
static struct series *find_series(struct lp_metrics *m, const char *model, int status)
{
	struct series *s;

	for (int pass = 0; pass < 2; pass++) {
		for (size_t i = 0; i < m->n_series; i++) {
			s = &m->series[i];
			if (s->status == status && !strcmp(s->model, model))
				return s;
		}
		if (m->n_series < LP_METRICS_MAX_SERIES - 16)
			break;
		model = "other";
	}
	if (m->n_series == LP_METRICS_MAX_SERIES)
		return &m->series[LP_METRICS_MAX_SERIES - 1];
	s = &m->series[m->n_series++];
	snprintf(s->model, sizeof(s->model), "%s", model);
	s->status = status;
	return s;
}

void lp_metrics_request(struct lp_metrics *m, const char *model, int status, long prompt_tokens,
                        long generated_tokens)
{
	struct series *s;

	pthread_mutex_lock(&m->mu);
	s = find_series(m, model && *model ? model : "unknown", status);
	s->requests++;
	if (prompt_tokens > 0)
		s->prompt_tokens += (uint64_t)prompt_tokens;
	if (generated_tokens > 0)
		s->generated_tokens += (uint64_t)generated_tokens;
	pthread_mutex_unlock(&m->mu);
}

void lp_metrics_prompt(struct lp_metrics *m, long prompt_tokens)
{
	if (prompt_tokens <= 0)
		return;
	pthread_mutex_lock(&m->mu);
	m->v.prompt_tokens += (uint64_t)prompt_tokens;
	pthread_mutex_unlock(&m->mu);
}

static void observe(struct histogram *h, double v)
{
	size_t i = 0;

	if (v < 0) /* clocks read on different threads: never below zero */
		v = 0;
	while (i < h->n_bounds && v > h->bounds[i])
		i++;
	h->buckets[i]++;
	h->count++;
	h->sum += v;
}

void lp_metrics_ttft(struct lp_metrics *m, double seconds)
{
	pthread_mutex_lock(&m->mu);
	observe(&m->ttft, seconds);
	observe(&m->v.ttft, seconds);
	m->v.generation_tokens++;
	pthread_mutex_unlock(&m->mu);
}

void lp_metrics_inter_token(struct lp_metrics *m, double seconds)
{
	pthread_mutex_lock(&m->mu);
	observe(&m->itl, seconds);
	observe(&m->v.itl, seconds);
	m->v.generation_tokens++;
	pthread_mutex_unlock(&m->mu);
}

void lp_metrics_disconnect(struct lp_metrics *m)
{
	pthread_mutex_lock(&m->mu);
	m->disconnects++;
	pthread_mutex_unlock(&m->mu);
}

void lp_metrics_seq_finished(struct lp_metrics *m, const struct lp_metrics_seq *s)
{
	unsigned f = (unsigned)s->finish < LP_METRICS_N_FINISH ? s->finish : LP_METRICS_ABORT;

	pthread_mutex_lock(&m->mu);
	m->v.finished[f]++;
	observe(&m->v.e2e, s->end - s->arrival);
	/* each phase lasts until the next began, or until the end when it
	 * was the last one the sequence reached */
	observe(&m->v.queue, (s->scheduled > 0 ? s->scheduled : s->end) - s->queued);
	if (s->scheduled > 0)
		observe(&m->v.prefill,
		        (s->first_token > 0 ? s->first_token : s->end) - s->scheduled);
	if (s->first_token > 0)
		observe(&m->v.decode, s->last_token - s->first_token);
	pthread_mutex_unlock(&m->mu);
}

/* ---- rendering ---- */

/* Appends v as a label value: backslash, quote and newline escaped. */
static int append_label(struct lp_buf *out, const char *v, struct lp_err *err)
{
	for (; *v; v++) {
		const char *esc = *v == '\\'   ? "\\\\"
		                  : *v == '"'  ? "\\\""
		                  : *v == '\n' ? "\\n"
		                               : NULL;
		int rc = esc ? lp_buf_append(out, esc, 2, err) : lp_buf_append(out, v, 1, err);
		if (rc)
			return rc;
	}
	return 0;
}

/* A bucket bound as Prometheus' own clients print it: "0.25", "1.0". */
static void format_bound(char *buf, size_t cap, double v)
{
	snprintf(buf, cap, "%g", v);
	if (!strpbrk(buf, ".e"))
		snprintf(buf + strlen(buf), cap - strlen(buf), ".0");
}

static int family(struct lp_buf *out, const char *name, const char *type, const char *help,
                  struct lp_err *err)
{
	return lp_buf_appendf(out, err, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A histogram family of one series; labels ("" or `k="v",...`, escaped)
 * go on every sample. */
static int render_histogram(struct lp_buf *out, const char *name, const char *help,
                            const char *labels, const struct histogram *h, struct lp_err *err)
{
	const char *sep = *labels ? "," : "";
	uint64_t cum = 0;
	char le[32];
	int rc;

	rc = family(out, name, "histogram", help, err);
	for (size_t i = 0; !rc && i < h->n_bounds; i++) {
		cum += h->buckets[i];
		format_bound(le, sizeof(le), h->bounds[i]);
		rc = lp_buf_appendf(out, err, "%s_bucket{%s%sle=\"%s\"} %llu\n", name, labels, sep,
		                    le, (unsigned long long)cum);
	}
	if (!rc)
		rc = lp_buf_appendf(out, err, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels,
		                    sep, (unsigned long long)h->count);
	if (!rc)
		rc = lp_buf_appendf(out, err, "%s_sum%s%s%s %.6f\n%s_count%s%s%s %llu\n", name,
		                    *labels ? "{" : "", labels, *labels ? "}" : "", h->sum, name,
		                    *labels ? "{" : "", labels, *labels ? "}" : "",
		                    (unsigned long long)h->count);
	return rc;
}

/* A per-model counter family from the series table. field: 0 requests,
 * 1 prompt tokens, 2 generated tokens (summed over statuses). mu held. */
static int render_series(struct lp_metrics *m, struct lp_buf *out, const char *name,
                         const char *help, int field, struct lp_err *err)
{
	int rc = family(out, name, "counter", help, err);

	for (size_t i = 0; !rc && i < m->n_series; i++) {
		const struct series *s = &m->series[i];
		uint64_t v;

		if (field == 0) {
			rc = lp_buf_appendf(out, err, "%s{model=\"", name);
			if (!rc)
				rc = append_label(out, s->model, err);
			if (!rc)
				rc = lp_buf_appendf(out, err, "\",status=\"%d\"} %llu\n", s->status,
				                    (unsigned long long)s->requests);
			continue;
		}
		/* tokens: one line per model, summing its statuses; skip
		 * models already printed */
		bool seen = false;
		for (size_t j = 0; j < i && !seen; j++)
			seen = !strcmp(m->series[j].model, s->model);
		if (seen)
			continue;
		v = 0;
		for (size_t j = i; j < m->n_series; j++)
			if (!strcmp(m->series[j].model, s->model))
				v += field == 1 ? m->series[j].prompt_tokens
				                : m->series[j].generated_tokens;
		rc = lp_buf_appendf(out, err, "%s{model=\"", name);
		if (!rc)
			rc = append_label(out, s->model, err);
		if (!rc)
			rc = lp_buf_appendf(out, err, "\"} %llu\n", (unsigned long long)v);
	}
	return rc;
}

/* One family of one series. */
static int one_gauge(struct lp_buf *out, const char *name, const char *help, const char *labels,
                     double v, struct lp_err *err)
{
	int rc = family(out, name, "gauge", help, err);

	if (!rc)
		rc = lp_buf_appendf(out, err, "%s%s%s%s %.9g\n", name, *labels ? "{" : "", labels,
		                    *labels ? "}" : "", v);
	return rc;
}

static int one_counter(struct lp_buf *out, const char *name, const char *help, const char *labels,
                       uint64_t v, struct lp_err *err)
{
	int rc = family(out, name, "counter", help, err);

	if (!rc)
		rc = lp_buf_appendf(out, err, "%s%s%s%s %llu\n", name, *labels ? "{" : "", labels,
		                    *labels ? "}" : "", (unsigned long long)v);
	return rc;
}

/* The KV cache's element type as vLLM's cache_dtype names it. */
static const char *cache_dtype(enum lp_dtype t)
{
	switch (t) {
	case LP_DTYPE_F32:
		return "float32";
	case LP_DTYPE_F16:
		return "float16";
	case LP_DTYPE_BF16:
		return "bfloat16";
	default:
		return lp_dtype_name(t);
	}
}

/* The vLLM metrics: the endpoint picker's (scheduler state, KV use,
 * cache config, LoRA), then the request metrics. labels is the escaped
 * `model_name="...",engine="0"`. mu held. */
static int render_vllm(struct lp_metrics *m, const struct lp_worker_stats *ws, const char *labels,
                       struct lp_buf *out, struct lp_err *err)
{
	const struct lp_engine_stats *es = &ws->engine;
	const struct vllm_counts *v = &m->v;
	bool engine = ws->config.block_size > 0;
	int rc;

	rc = one_gauge(out, "vllm:num_requests_running",
	               "Requests with a sequence in the running batch (n > 1 counts once).", labels,
	               ws->running_requests, err);
	if (!rc)
		rc =
		    one_gauge(out, "vllm:num_requests_waiting",
		              "Requests waiting to run: in the engine's queue or the submit queue.",
		              labels, ws->waiting_requests, err);
	if (!rc)
		rc = one_gauge(out, "vllm:kv_cache_usage_perc",
		               "Fraction of KV cache blocks held by requests (0 to 1).", labels,
		               es->kv_blocks_total > 0
		                   ? (double)es->kv_blocks_used / (double)es->kv_blocks_total
		                   : 0.0,
		               err);
	if (!rc && engine) {
		const struct lp_engine_config *c = &ws->config;

		rc = family(out, "vllm:cache_config_info", "gauge",
		            "The KV cache's configuration, in the labels (value 1).", err);
		if (!rc)
			rc = lp_buf_appendf(
			    out, err,
			    "vllm:cache_config_info{block_size=\"%d\",cache_dtype=\"%s\","
			    "enable_prefix_caching=\"%s\",gpu_memory_utilization=\"%g\","
			    "num_gpu_blocks=\"%d\",engine=\"0\"} 1\n",
			    c->block_size, cache_dtype(c->kv_type),
			    c->prefix_caching ? "True" : "False", c->gpu_memory_utilization,
			    es->kv_blocks_total);
	}
	if (!rc && engine) {
		struct timespec now;

		clock_gettime(CLOCK_REALTIME, &now);
		rc = family(out, "vllm:lora_requests_info", "gauge",
		            "Adapters of running and of waiting requests, in the labels; the value "
		            "is the Unix time they were read.",
		            err);
		if (!rc)
			rc = lp_buf_appendf(out, err,
			                    "vllm:lora_requests_info{max_lora=\"%d\","
			                    "waiting_lora_adapters=\"",
			                    ws->config.max_loras);
		/* adapter names hold no quote, backslash or newline, but escape
		 * anyway */
		if (!rc)
			rc = append_label(out, ws->waiting_adapters, err);
		if (!rc)
			rc = lp_buf_appendf(out, err, "\",running_lora_adapters=\"");
		if (!rc)
			rc = append_label(out, ws->running_adapters, err);
		if (!rc)
			rc = lp_buf_appendf(out, err, "\"} %.3f\n",
			                    (double)now.tv_sec + (double)now.tv_nsec * 1e-9);
	}
	if (!rc)
		rc = one_counter(out, "vllm:num_preemptions_total",
		                 "Sequences preempted (their KV cache dropped, to be recomputed).",
		                 labels, es->preemptions, err);
	if (!rc)
		rc = one_counter(out, "vllm:prefix_cache_queries_total",
		                 "Prompt tokens looked up in the prefix cache.", labels,
		                 es->prefix_queries, err);
	if (!rc)
		rc = one_counter(out, "vllm:prefix_cache_hits_total",
		                 "Prompt tokens found in the prefix cache (their prefill skipped).",
		                 labels, es->prefix_hits, err);
	if (!rc)
		rc = one_counter(out, "vllm:prompt_tokens_total",
		                 "Prompt tokens of requests whose prefill is done, as their usage "
		                 "counts them.",
		                 labels, v->prompt_tokens, err);
	if (!rc)
		rc = one_counter(out, "vllm:generation_tokens_total",
		                 "Generated tokens delivered to requests.", labels,
		                 v->generation_tokens, err);
	if (!rc)
		rc = family(out, "vllm:request_success_total", "counter",
		            "Finished sequences (choices) by why they finished.", err);
	for (int f = 0; !rc && f < LP_METRICS_N_FINISH; f++)
		rc = lp_buf_appendf(out, err,
		                    "vllm:request_success_total{%s,finished_reason=\"%s\"} %llu\n",
		                    labels, finish_names[f], (unsigned long long)v->finished[f]);
	if (!rc)
		rc = render_histogram(
		    out, "vllm:time_to_first_token_seconds",
		    "Seconds from a request's arrival to a sequence's first token.", labels,
		    &v->ttft, err);
	if (!rc)
		rc = render_histogram(out, "vllm:inter_token_latency_seconds",
		                      "Seconds between consecutive tokens of a sequence.", labels,
		                      &v->itl, err);
	if (!rc)
		rc = render_histogram(out, "vllm:e2e_request_latency_seconds",
		                      "Seconds from a request's arrival to the end of a sequence.",
		                      labels, &v->e2e, err);
	if (!rc)
		rc = render_histogram(out, "vllm:request_queue_time_seconds",
		                      "Seconds a sequence waited before it first ran.", labels,
		                      &v->queue, err);
	if (!rc)
		rc = render_histogram(out, "vllm:request_prefill_time_seconds",
		                      "Seconds from a sequence's first run to its first token.",
		                      labels, &v->prefill, err);
	if (!rc)
		rc = render_histogram(out, "vllm:request_decode_time_seconds",
		                      "Seconds from a sequence's first token to its last.", labels,
		                      &v->decode, err);
	return rc;
}

#define GAUGE(name, help, fmt, v)                                                                  \
	lp_buf_appendf(out, err,                                                                   \
	               "# HELP " name " " help "\n# TYPE " name " gauge\n" name " " fmt "\n", v)
#define COUNTER(name, help, v)                                                                     \
	lp_buf_appendf(out, err,                                                                   \
	               "# HELP " name " " help "\n# TYPE " name " counter\n" name " %llu\n",       \
	               (unsigned long long)(v))

int lp_metrics_render(struct lp_metrics *m, const struct lp_worker_stats *ws, bool ready,
                      const char *model_name, struct lp_buf *out, struct lp_err *err)
{
	const struct lp_lora_cache_stats *ls = &ws->loras;
	struct lp_buf labels;
	int rc;

	lp_buf_init(&labels, 4096);
	rc = lp_buf_appendf(&labels, err, "model_name=\"");
	if (!rc)
		rc = append_label(&labels, model_name ? model_name : "", err);
	if (!rc)
		rc = lp_buf_appendf(&labels, err, "\",engine=\"0\"");
	if (rc) {
		lp_buf_release(&labels);
		return rc;
	}

	pthread_mutex_lock(&m->mu);
	rc = render_vllm(m, ws, labels.data, out, err);
	if (!rc)
		rc = render_series(m, out, "loraplane_requests_total",
		                   "Generation requests by model and HTTP status.", 0, err);
	if (!rc)
		rc = render_series(m, out, "loraplane_prompt_tokens_total",
		                   "Prompt tokens of finished requests, by model.", 1, err);
	if (!rc)
		rc = render_series(m, out, "loraplane_generation_tokens_total",
		                   "Generated tokens of finished requests, by model.", 2, err);
	if (!rc)
		rc = render_histogram(out, "loraplane_time_to_first_token_seconds",
		                      "Time from a request's arrival to its first token.", "",
		                      &m->ttft, err);
	if (!rc)
		rc = render_histogram(out, "loraplane_inter_token_latency_seconds",
		                      "Time between consecutive tokens of a sequence.", "", &m->itl,
		                      err);
	if (!rc)
		rc = COUNTER("loraplane_client_disconnects_total",
		             "Responses cut short because the client went away.", m->disconnects);
	pthread_mutex_unlock(&m->mu);
	lp_buf_release(&labels);
	if (!rc)
		rc = GAUGE("loraplane_ready", "1 when the model is loaded and requests are served.",
		           "%d", ready ? 1 : 0);
	if (!rc)
		rc = GAUGE("loraplane_requests_running", "Sequences in the running batch.", "%d",
		           ws->engine.running);
	if (!rc)
		rc = GAUGE("loraplane_requests_waiting",
		           "Sequences waiting: in the engine's queue or the submit queue.", "%d",
		           ws->engine.waiting + ws->queued);
	if (!rc)
		rc = GAUGE("loraplane_kv_blocks_used", "KV cache blocks held by requests.", "%d",
		           ws->engine.kv_blocks_used);
	if (!rc)
		rc = GAUGE("loraplane_kv_blocks_cached",
		           "KV cache blocks no request holds that keep a reusable prefix.", "%d",
		           ws->engine.kv_blocks_cached);
	if (!rc)
		rc = GAUGE("loraplane_kv_blocks_total", "KV cache blocks in all.", "%d",
		           ws->engine.kv_blocks_total);
	if (!rc)
		rc = COUNTER("loraplane_engine_steps_total", "Engine steps run.", ws->engine.steps);
	if (!rc)
		rc = COUNTER("loraplane_engine_preemptions_total",
		             "Sequences preempted for recompute.", ws->engine.preemptions);
	if (!rc)
		rc = COUNTER("loraplane_engine_prompt_tokens_total",
		             "Prompt tokens the engine computed (prefill, recompute included).",
		             ws->engine.prompt_tokens);
	if (!rc)
		rc = COUNTER("loraplane_engine_generated_tokens_total",
		             "Tokens the engine sampled, whether or not a client read them.",
		             ws->engine.generated_tokens);
	if (!rc)
		rc = COUNTER("loraplane_adapter_loads_total", "Adapters loaded (installed).",
		             ls->loads);
	if (!rc)
		rc = COUNTER("loraplane_adapter_unloads_total", "Adapters unloaded.", ls->unloads);
	if (!rc)
		rc = lp_buf_appendf(
		    out, err,
		    "# HELP loraplane_adapter_evictions_total Adapters evicted from a tier.\n"
		    "# TYPE loraplane_adapter_evictions_total counter\n"
		    "loraplane_adapter_evictions_total{tier=\"host\"} %llu\n"
		    "loraplane_adapter_evictions_total{tier=\"device\"} %llu\n"
		    "# HELP loraplane_adapter_cache_hits_total Adapter lookups that found the "
		    "adapter resident in a tier.\n"
		    "# TYPE loraplane_adapter_cache_hits_total counter\n"
		    "loraplane_adapter_cache_hits_total{tier=\"host\"} %llu\n"
		    "loraplane_adapter_cache_hits_total{tier=\"device\"} %llu\n"
		    "# HELP loraplane_adapter_cache_misses_total Adapter lookups that had to bring "
		    "the adapter into a tier.\n"
		    "# TYPE loraplane_adapter_cache_misses_total counter\n"
		    "loraplane_adapter_cache_misses_total{tier=\"host\"} %llu\n"
		    "loraplane_adapter_cache_misses_total{tier=\"device\"} %llu\n"
		    "# HELP loraplane_adapters Registered adapters by the tier holding them.\n"
		    "# TYPE loraplane_adapters gauge\n"
		    "loraplane_adapters{tier=\"device\"} %d\n"
		    "loraplane_adapters{tier=\"host\"} %d\n"
		    "loraplane_adapters{tier=\"disk\"} %d\n",
		    (unsigned long long)ls->host_evictions,
		    (unsigned long long)ls->device_evictions, (unsigned long long)ls->host_hits,
		    (unsigned long long)ls->device_hits, (unsigned long long)ls->host_misses,
		    (unsigned long long)ls->device_misses, ls->on_device, ls->on_host, ls->on_disk);
	return rc;
}
