/* The engine against the reference implementation: for the tiny random
 * Llama (HF format: sharded bf16 safetensors, GQA, untied embeddings, llama3
 * rope scaling) and for SmolLM2 (Q4_1/Q8_0 GGUF), greedy tokens and
 * last-position logits equal transformers' (tests/fixtures/goldens, made by
 * hack/make-goldens.py); a batch gives the same tokens as each prompt alone,
 * also with chunked prefill and with preemption. */
#include <errno.h>
#include <jansson.h>

#include "agent/engine/engine.h"
#include "agent/engine/model.h"
#include "agent/engine/tokenizer.h"
#include "common/buf.h"
#include "tests/test.h"

#define N_GREEDY 32

struct golden_prompt {
	const char *text;
	int32_t ids[4096];
	int n_ids;
	int32_t greedy[N_GREEDY];
	float *logits; /* [vocab] or NULL */
	float range;
};

struct golden {
	json_t *root;
	struct golden_prompt prompts[16];
	int n_prompts;
	struct golden_prompt batch[16];
	int n_batch;
};

static struct lp_backend *be;

static int read_prompt(json_t *p, struct golden_prompt *g, const char *dir, int vocab)
{
	json_t *ids = json_object_get(p, "ids"), *greedy = json_object_get(p, "greedy");
	const char *lf = json_string_value(json_object_get(p, "logits_file"));
	size_t i;
	json_t *v;

	memset(g, 0, sizeof(*g));
	g->text = json_string_value(json_object_get(p, "text"));
	if (!json_is_array(ids) || json_array_size(ids) > 4096 || !json_is_array(greedy) ||
	    json_array_size(greedy) != N_GREEDY)
		return -1;
	json_array_foreach(ids, i, v) g->ids[i] = (int32_t)json_integer_value(v);
	g->n_ids = (int)json_array_size(ids);
	json_array_foreach(greedy, i, v) g->greedy[i] = (int32_t)json_integer_value(v);
	if (lf) {
		char path[512];
		struct lp_buf b;
		struct lp_err err;
		lp_buf_init(&b, 64u << 20);
		snprintf(path, sizeof(path), "%s/goldens/%s", dir, lf);
		if (lp_buf_read_file(&b, path, 64u << 20, &err) ||
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

static void golden_free(struct golden *g)
{
	for (int i = 0; i < g->n_prompts; i++)
		free(g->prompts[i].logits);
	json_decref(g->root);
	memset(g, 0, sizeof(*g));
}

static int golden_load(struct golden *g, const char *name, int vocab)
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
		if (i >= 16 || read_prompt(v, &g->prompts[i], test_fixtures_dir(), vocab))
			return -1;
		g->n_prompts++;
	}
	arr = json_object_get(json_object_get(g->root, "batch"), "prompts");
	json_array_foreach(arr, i, v)
	{
		if (i >= 16 || read_prompt(v, &g->batch[i], test_fixtures_dir(), vocab))
			return -1;
		g->n_batch++;
	}
	return g->n_prompts > 0 ? 0 : -1;
}

/* Runs prompts[0..n) as one batch, greedy, N_GREEDY tokens each; fills
 * out[i][..] and, for each prompt, its first logits row into first[i]
 * (when first is non-NULL). Returns 0 or a negative code. */
static int run_batch(struct lp_model *m, const struct lp_engine_config *ec,
                     struct golden_prompt *const *prompts, int n, int32_t (*out)[N_GREEDY],
                     float **first, int *preemptions, struct lp_err *err)
{
	struct lp_engine *e;
	struct lp_seq *seqs[16];
	int counts[16] = {0};
	int rc;

	rc = lp_engine_new(&e, m, ec, err);
	if (rc)
		return rc;
	for (int i = 0; i < n; i++) {
		struct lp_seq_params p = {0};
		p.prompt = prompts[i]->ids;
		p.n_prompt = (size_t)prompts[i]->n_ids;
		p.max_tokens = N_GREEDY;
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
			if (counts[i] < N_GREEDY)
				out[i][counts[i]++] = outs[k].token;
		}
	}
	for (int i = 0; i < n; i++)
		if (counts[i] != N_GREEDY) {
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

static struct lp_model *model;
static struct golden gold;
static const char *model_label;

static void small_config(struct lp_engine_config *ec)
{
	lp_engine_config_default(ec);
	ec->max_model_len = 256;
	ec->kv_cache_bytes = 64u << 20;
}

/* Each golden prompt alone: logits and 32 greedy tokens. */
static void test_alone_matches_reference(void)
{
	struct lp_engine_config ec;
	struct lp_err err = {0};
	int vocab = model->cfg.vocab_size;
	float *first = malloc((size_t)vocab * sizeof(float));

	CHECK(first);
	small_config(&ec);
	for (int i = 0; i < gold.n_prompts; i++) {
		struct golden_prompt *g = &gold.prompts[i];
		int32_t toks[1][N_GREEDY];
		float *firsts[1] = {first};
		double worst = 0;
		int worst_at = 0;

		if (run_batch(model, &ec, &g, 1, toks, firsts, NULL, &err)) {
			free(first);
			CHECK_MSG(0, "%s prompt %d: %s", model_label, i, err.msg);
		}
		for (int t = 0; t < vocab && g->logits; t++) {
			double d = fabs((double)first[t] - (double)g->logits[t]);
			if (d > worst) {
				worst = d;
				worst_at = t;
			}
		}
		printf("  %s prompt %d: %d prompt tokens, max |logit - reference| = %.2e (%.2e of "
		       "the range, token %d)\n",
		       model_label, i, g->n_ids, worst, worst / g->range, worst_at);
		if (g->logits && worst > 1e-3 * g->range) {
			free(first);
			CHECK_MSG(
			    0,
			    "%s prompt %d: logit %d differs by %g, more than 1e-3 of the range %g",
			    model_label, i, worst_at, worst, g->range);
		}
		for (int t = 0; t < N_GREEDY; t++)
			if (toks[0][t] != g->greedy[t]) {
				free(first);
				CHECK_MSG(0, "%s prompt %d: greedy token %d is %d, reference %d",
				          model_label, i, t, toks[0][t], g->greedy[t]);
			}
	}
	free(first);
}

static void check_batch(const struct lp_engine_config *ec, bool want_preemption)
{
	struct golden_prompt *ps[16];
	int32_t toks[16][N_GREEDY];
	struct lp_err err = {0};
	int preemptions = 0;

	CHECK(gold.n_batch >= 8);
	for (int i = 0; i < gold.n_batch; i++)
		ps[i] = &gold.batch[i];
	CHECK_OK(run_batch(model, ec, ps, gold.n_batch, toks, NULL, &preemptions, &err), &err);
	for (int i = 0; i < gold.n_batch; i++)
		for (int t = 0; t < N_GREEDY; t++)
			CHECK_MSG(toks[i][t] == gold.batch[i].greedy[t],
			          "%s batch prompt %d token %d: %d, alone %d", model_label, i, t,
			          toks[i][t], gold.batch[i].greedy[t]);
	if (want_preemption)
		CHECK_MSG(preemptions > 0, "the small cache caused no preemption");
}

/* All batch prompts at once give what each gave alone. */
static void test_batch_equals_alone(void)
{
	struct lp_engine_config ec;

	small_config(&ec);
	check_batch(&ec, false);
}

/* The same with prefill split into chunks of 7 tokens mixed with decodes. */
static void test_batch_chunked_prefill(void)
{
	struct lp_engine_config ec;

	small_config(&ec);
	ec.max_num_seqs = 4;
	ec.max_batched_tokens = 7;
	check_batch(&ec, false);
}

/* And with a cache so small that sequences are preempted and recomputed. */
static void test_batch_preemption(void)
{
	struct lp_engine_config ec;
	const struct lp_model_config *c = &model->cfg;
	size_t block =
	    lp_kv_cache_block_bytes(c->n_layers, c->n_kv_heads * c->head_dim, 16, LP_DTYPE_F32);

	small_config(&ec);
	ec.max_model_len = 128;
	ec.kv_cache_bytes = block * 10; /* 160 positions for 8 sequences */
	check_batch(&ec, true);
}

/* The tokenizer gives the reference prompt ids from the prompt text. */
static void test_prompt_ids_from_text(void)
{
	struct lp_err err = {0};

	for (int i = 0; i < gold.n_prompts; i++) {
		struct lp_tokens ids = {0};
		const struct golden_prompt *g = &gold.prompts[i];
		if (!g->text)
			continue;
		CHECK_OK(lp_tokenizer_encode(model->tok, g->text, strlen(g->text),
		                             LP_ENCODE_ADD_SPECIAL | LP_ENCODE_PARSE_SPECIAL, &ids,
		                             &err),
		         &err);
		bool same =
		    ids.n == (size_t)g->n_ids && !memcmp(ids.ids, g->ids, ids.n * sizeof(int32_t));
		lp_tokens_release(&ids);
		CHECK_MSG(same, "%s prompt %d: token ids differ from the reference", model_label,
		          i);
	}
}

static int run_model(const char *label, const char *path, const char *golden_name)
{
	struct lp_err err = {0};

	model_label = label;
	if (lp_model_load(&model, path, be, &err)) {
		printf("FAIL test-model:load_%s: %s\n", label, err.msg);
		return 1;
	}
	if (golden_load(&gold, golden_name, model->cfg.vocab_size)) {
		printf("FAIL test-model:goldens_%s: cannot read %s/goldens/%s.json\n", label,
		       test_fixtures_dir(), golden_name);
		lp_model_free(model);
		return 1;
	}
	RUN(test_prompt_ids_from_text);
	RUN(test_alone_matches_reference);
	RUN(test_batch_equals_alone);
	RUN(test_batch_chunked_prefill);
	RUN(test_batch_preemption);
	golden_free(&gold);
	lp_model_free(model);
	model = NULL;
	return 0;
}

int main(void)
{
	struct lp_err err = {0};
	const char *smol = getenv("MODEL");
	char tiny[512];
	int bad = 0;

	TEST_MAIN_BEGIN("test-model");
	if (lp_backend_cpu_new(&be, 0, &err)) {
		printf("FAIL test-model:backend: %s\n", err.msg);
		return 1;
	}
	snprintf(tiny, sizeof(tiny), "%s/tiny-llama", test_fixtures_dir());
	bad += run_model("tiny-llama", tiny, "tiny-llama");
	bad +=
	    run_model("smollm2", smol ? smol : "models/smollm2-135m-instruct-q4_1.gguf", "smollm2");
	lp_backend_destroy(be);
	return bad || test_failed_count ? 1 : 0;
}
