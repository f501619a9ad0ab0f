/* Prometheus metrics; see metrics.h. */
#include "agent/api/metrics.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const double ttft_bounds[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                     1,     2.5,  5,     10,   30,  60};
static const double itl_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                    0.1,   0.25,   0.5,   1,    2.5};
#define TTFT_N (sizeof(ttft_bounds) / sizeof(ttft_bounds[0]))
#define ITL_N  (sizeof(itl_bounds) / sizeof(itl_bounds[0]))

struct histogram {
	const double *bounds;
	size_t n_bounds;
	uint64_t buckets[16]; /* [n_bounds + 1]: the last is +Inf */
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

struct lp_metrics {
	pthread_mutex_t mu;
	struct series *series; /* [LP_METRICS_MAX_SERIES] */
	size_t n_series;
	struct histogram ttft, itl;
	uint64_t disconnects;
};

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
	m->ttft.bounds = ttft_bounds;
	m->ttft.n_bounds = TTFT_N;
	m->itl.bounds = itl_bounds;
	m->itl.n_bounds = ITL_N;
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

static void observe(struct histogram *h, double v)
{
	size_t i = 0;

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
	pthread_mutex_unlock(&m->mu);
}

void lp_metrics_inter_token(struct lp_metrics *m, double seconds)
{
	pthread_mutex_lock(&m->mu);
	observe(&m->itl, seconds);
	pthread_mutex_unlock(&m->mu);
}

void lp_metrics_disconnect(struct lp_metrics *m)
{
	pthread_mutex_lock(&m->mu);
	m->disconnects++;
	pthread_mutex_unlock(&m->mu);
}

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

static int render_histogram(struct lp_buf *out, const char *name, const char *help,
                            const struct histogram *h, struct lp_err *err)
{
	uint64_t cum = 0;
	int rc;

	rc = lp_buf_appendf(out, err, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
	for (size_t i = 0; !rc && i < h->n_bounds; i++) {
		cum += h->buckets[i];
		rc = lp_buf_appendf(out, err, "%s_bucket{le=\"%g\"} %llu\n", name, h->bounds[i],
		                    (unsigned long long)cum);
	}
	if (!rc)
		rc = lp_buf_appendf(
		    out, err, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name,
		    (unsigned long long)h->count, name, h->sum, name, (unsigned long long)h->count);
	return rc;
}

/* A per-model counter family from the series table. field: 0 requests,
 * 1 prompt tokens, 2 generated tokens (summed over statuses). mu held. */
static int render_series(struct lp_metrics *m, struct lp_buf *out, const char *name,
                         const char *help, int field, struct lp_err *err)
{
	int rc = lp_buf_appendf(out, err, "# HELP %s %s\n# TYPE %s counter\n", name, help, name);

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

#define GAUGE(name, help, fmt, v)                                                                  \
	lp_buf_appendf(out, err,                                                                   \
	               "# HELP " name " " help "\n# TYPE " name " gauge\n" name " " fmt "\n", v)
#define COUNTER(name, help, v)                                                                     \
	lp_buf_appendf(out, err,                                                                   \
	               "# HELP " name " " help "\n# TYPE " name " counter\n" name " %llu\n",       \
	               (unsigned long long)(v))

int lp_metrics_render(struct lp_metrics *m, const struct lp_worker_stats *ws, bool ready,
                      struct lp_buf *out, struct lp_err *err)
{
	const struct lp_lora_cache_stats *ls = &ws->loras;
	int rc;

	pthread_mutex_lock(&m->mu);
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
		                      "Time from a request's arrival to its first token.", &m->ttft,
		                      err);
	if (!rc)
		rc = render_histogram(out, "loraplane_inter_token_latency_seconds",
		                      "Time between consecutive tokens of a sequence.", &m->itl,
		                      err);
	if (!rc)
		rc = COUNTER("loraplane_client_disconnects_total",
		             "Responses cut short because the client went away.", m->disconnects);
	pthread_mutex_unlock(&m->mu);
	if (!rc)
		rc = GAUGE("loraplane_ready", "1 when the model is loaded and requests are served.",
		           "%d", ready ? 1 : 0);
	if (!rc)
		rc = GAUGE("loraplane_requests_running", "Sequences in the running batch.", "%d",
		           ws->engine.running);
	if (!rc)
		rc = GAUGE("loraplane_requests_waiting",
		           "Requests waiting: in the engine's queue or the submit queue.", "%d",
		           ws->engine.waiting + ws->queued);
	if (!rc)
		rc = GAUGE("loraplane_kv_blocks_used", "KV cache blocks in use.", "%d",
		           ws->engine.kv_blocks_used);
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
