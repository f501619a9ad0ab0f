/* The engine against a reference's goldens (tests/fixtures/goldens/<name>.json,
 * written by hack/make-goldens.py, make-arch-goldens.py and the like): read
 * the prompts, run them through an engine (alone or as one batch, with or
 * without a LoRA adapter), compare greedy tokens and first logits. Shared by
 * the test programs of the model families (test-model.c, test-archs.c);
 * header-only like tests/test.h. */
#ifndef LP_TESTS_GOLDEN_RUN_H
#define LP_TESTS_GOLDEN_RUN_H

#include <errno.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "agent/engine/engine.h"
#include "agent/engine/model.h"
#include "common/buf.h"
#include "tests/test.h"

#define GOLDEN_N_GREEDY    32
#define GOLDEN_MAX_PROMPTS 16
#define GOLDEN_MAX_IDS     4096
/* the name an adapter of golden_run is loaded under */
#define GOLDEN_ADAPTER "golden-adapter"

struct golden_prompt {
	const char *text; /* borrowed from the golden's JSON */
	int32_t ids[GOLDEN_MAX_IDS];
	int n_ids;
	int32_t greedy[GOLDEN_N_GREEDY];
	float *logits;     /* [vocab] first-step logits, or NULL; owned */
	float range;       /* logit_max - logit_min */
	bool nfc_changes;  /* the text is not in Unicode NFC */
	bool with_adapter; /* golden_run applies the adapter to this prompt */
};

struct golden {
	json_t *root;
	struct golden_prompt prompts[GOLDEN_MAX_PROMPTS];
	int n_prompts;
	struct golden_prompt batch[GOLDEN_MAX_PROMPTS]; /* the "batch" prompts, if any */
	int n_batch;
};

static inline int golden_read_prompt(json_t *p, struct golden_prompt *g, int vocab)
{
	json_t *ids = json_object_get(p, "ids"), *greedy = json_object_get(p, "greedy");
	const char *lf = json_string_value(json_object_get(p, "logits_file"));
	size_t i;
	json_t *v;

	memset(g, 0, sizeof(*g));
	g->text = json_string_value(json_object_get(p, "text"));
	g->nfc_changes = json_is_true(json_object_get(p, "nfc_changes"));
	if (!json_is_array(ids) || json_array_size(ids) > GOLDEN_MAX_IDS ||
	    !json_is_array(greedy) || json_array_size(greedy) != GOLDEN_N_GREEDY)
		return -1;
	json_array_foreach(ids, i, v) g->ids[i] = (int32_t)json_integer_value(v);
	g->n_ids = (int)json_array_size(ids);
	json_array_foreach(greedy, i, v) g->greedy[i] = (int32_t)json_integer_value(v);
	if (lf) {
		char path[512];
		struct lp_buf b;
		lp_buf_init(&b, 64u << 20);
		snprintf(path, sizeof(path), "%s/goldens/%s", test_fixtures_dir(), lf);
		if (lp_buf_read_file(&b, path, 64u << 20, NULL) ||
		    b.len != (size_t)vocab * sizeof(float)) {
			lp_buf_release(&b);
			return -1;
		}
		g->logits = (float *)lp_buf_detach(&b, NULL);
		g->range = (float)(json_number_value(json_object_get(p, "logit_max")) -
		                   json_number_value(json_object_get(p, "logit_min")));
	}
	return 0;
}

static inline void golden_free(struct golden *g)
{
	for (int i = 0; i < g->n_prompts; i++)
		free(g->prompts[i].logits);
	for (int i = 0; i < g->n_batch; i++)
		free(g->batch[i].logits);
	json_decref(g->root);
	memset(g, 0, sizeof(*g));
}

/* Reads <fixtures>/goldens/<name>.json for a model of vocab logits.
 * Returns 0, or -1 (g freed) when the file is missing or malformed. */
static inline int golden_load(struct golden *g, const char *name, int vocab)
{
	char path[512];
	json_error_t jerr;
	json_t *arr, *v;
	size_t i;

	memset(g, 0, sizeof(*g));
	snprintf(path, sizeof(path), "%s/goldens/%s.json", test_fixtures_dir(), name);
	g->root = json_load_file(path, 0, &jerr);
	if (!g->root)
		return -1;
	arr = json_object_get(g->root, "prompts");
	json_array_foreach(arr, i, v)
	{
		if (i >= GOLDEN_MAX_PROMPTS || golden_read_prompt(v, &g->prompts[i], vocab))
			goto fail;
		g->n_prompts++;
	}
	arr = json_object_get(json_object_get(g->root, "batch"), "prompts");
	json_array_foreach(arr, i, v)
	{
		if (i >= GOLDEN_MAX_PROMPTS || golden_read_prompt(v, &g->batch[i], vocab))
			goto fail;
		g->n_batch++;
	}
	if (g->n_prompts > 0)
		return 0;
fail:
	golden_free(g);
	return -1;
}

/* A small engine configuration for the tiny models. */
static inline void golden_engine_config(struct lp_engine_config *ec)
{
	lp_engine_config_default(ec);
	ec->max_model_len = 256;
	ec->kv_cache_bytes = 64u << 20;
}

/* Runs prompts[0..n) as one batch on a new engine, greedy, GOLDEN_N_GREEDY
 * tokens each, the prompts marked with_adapter over the adapter at
 * adapter_path (may be NULL when none is). Fills out[i], and first[i] with
 * prompt i's first logits row where first and first[i] are non-NULL, and
 * *preemptions (may be NULL). Returns 0 or a negative code with err set. */
static inline int golden_run(struct lp_model *m, const struct lp_engine_config *ec,
                             struct golden_prompt *const *prompts, int n, const char *adapter_path,
                             int32_t (*out)[GOLDEN_N_GREEDY], float **first, int *preemptions,
                             struct lp_err *err)
{
	struct lp_engine *e;
	struct lp_seq *seqs[2 * GOLDEN_MAX_PROMPTS] = {0};
	int counts[2 * GOLDEN_MAX_PROMPTS] = {0};
	bool already;
	int rc;

	if (n > 2 * GOLDEN_MAX_PROMPTS)
		return lp_errf(err, -EINVAL, "%d prompts in one batch, at most %d", n,
		               2 * GOLDEN_MAX_PROMPTS);
	rc = lp_engine_new(&e, m, ec, err);
	if (rc)
		return rc;
	if (adapter_path &&
	    (rc = lp_lora_cache_load(lp_engine_loras(e), GOLDEN_ADAPTER, adapter_path, NULL, NULL,
	                             false, &already, err)))
		goto out;
	for (int i = 0; i < n; i++) {
		struct lp_seq_params p = {0};
		p.adapter = prompts[i]->with_adapter ? GOLDEN_ADAPTER : NULL;
		p.prompt = prompts[i]->ids;
		p.n_prompt = (size_t)prompts[i]->n_ids;
		p.max_tokens = GOLDEN_N_GREEDY;
		p.ignore_eos = true;
		lp_sampling_params_default(&p.sampling);
		p.sampling.temperature = 0;
		rc = lp_engine_add(e, &p, &seqs[i], err);
		if (rc)
			goto out;
		seqs[i]->user = (void *)(intptr_t)i;
	}
	while (lp_engine_has_work(e)) {
		const struct lp_step_output *outs;
		int n_outs;
		rc = lp_engine_step(e, &outs, &n_outs, err);
		if (rc)
			goto out;
		for (int k = 0; k < n_outs; k++) {
			int i = (int)(intptr_t)outs[k].seq->user;
			if (counts[i] == 0 && first && first[i])
				memcpy(first[i], outs[k].logits,
				       (size_t)m->cfg.vocab_size * sizeof(float));
			if (counts[i] < GOLDEN_N_GREEDY)
				out[i][counts[i]++] = outs[k].token;
		}
	}
	for (int i = 0; i < n; i++)
		if (counts[i] != GOLDEN_N_GREEDY) {
			rc = lp_errf(err, -EIO, "prompt %d produced %d tokens", i, counts[i]);
			goto out;
		}
	if (preemptions) {
		struct lp_engine_stats st;
		lp_engine_stats(e, &st);
		*preemptions = (int)st.preemptions;
	}
out:
	for (int i = 0; i < n; i++)
		if (seqs[i])
			lp_engine_release(e, seqs[i]);
	lp_engine_free(e);
	return rc;
}

/* Each of prompts[0..n) alone: its greedy tokens must equal the golden's and
 * its first logits (where the golden has them) be within 1e-3 of the logit
 * range. Prints one line per prompt. Returns 0, or -1 with why filled. */
static inline int golden_check_alone(struct lp_model *m, struct golden_prompt *prompts, int n,
                                     const char *adapter_path, const char *label, char *why,
                                     size_t cap)
{
	struct lp_engine_config ec;
	int vocab = m->cfg.vocab_size, rc = 0;
	float *first = malloc((size_t)vocab * sizeof(float));

	if (!first) {
		snprintf(why, cap, "out of memory");
		return -1;
	}
	golden_engine_config(&ec);
	for (int i = 0; i < n && !rc; i++) {
		struct golden_prompt *g = &prompts[i];
		int32_t toks[1][GOLDEN_N_GREEDY];
		float *firsts[1] = {first};
		struct lp_err err = {0};
		double worst = 0;
		int worst_at = 0;

		if (golden_run(m, &ec, &g, 1, adapter_path, toks, firsts, NULL, &err)) {
			snprintf(why, cap, "%s prompt %d: %s", label, i, err.msg);
			rc = -1;
			break;
		}
		for (int t = 0; t < vocab && g->logits; t++) {
			double d = fabs((double)first[t] - (double)g->logits[t]);
			if (d > worst) {
				worst = d;
				worst_at = t;
			}
		}
		if (g->logits)
			printf("  %s prompt %d: %d prompt tokens, max |logit - reference| = %.2e "
			       "(%.2e of the range, token %d)\n",
			       label, i, g->n_ids, worst, worst / g->range, worst_at);
		if (g->logits && worst > 1e-3 * g->range) {
			snprintf(
			    why, cap,
			    "%s prompt %d: logit %d differs by %g, more than 1e-3 of the range %g",
			    label, i, worst_at, worst, g->range);
			rc = -1;
		}
		for (int t = 0; t < GOLDEN_N_GREEDY && !rc; t++)
			if (toks[0][t] != g->greedy[t]) {
				snprintf(why, cap,
				         "%s prompt %d: greedy token %d is %d, reference %d", label,
				         i, t, toks[0][t], g->greedy[t]);
				rc = -1;
			}
	}
	free(first);
	return rc;
}

/* prompts[0..n) as one batch under ec must give each prompt's golden
 * tokens; with want_preemption, the engine must also have preempted a
 * sequence. Returns 0, or -1 with why filled. */
static inline int golden_check_batch(struct lp_model *m, const struct lp_engine_config *ec,
                                     struct golden_prompt *const *prompts, int n,
                                     const char *adapter_path, bool want_preemption,
                                     const char *label, char *why, size_t cap)
{
	int32_t toks[2 * GOLDEN_MAX_PROMPTS][GOLDEN_N_GREEDY];
	struct lp_err err = {0};
	int preemptions = 0;

	if (golden_run(m, ec, prompts, n, adapter_path, toks, NULL, &preemptions, &err)) {
		snprintf(why, cap, "%s: %s", label, err.msg);
		return -1;
	}
	for (int i = 0; i < n; i++)
		for (int t = 0; t < GOLDEN_N_GREEDY; t++)
			if (toks[i][t] != prompts[i]->greedy[t]) {
				snprintf(why, cap, "%s batch prompt %d token %d: %d, alone %d",
				         label, i, t, toks[i][t], prompts[i]->greedy[t]);
				return -1;
			}
	if (want_preemption && preemptions == 0) {
		snprintf(why, cap, "%s: the small cache caused no preemption", label);
		return -1;
	}
	return 0;
}

#endif
