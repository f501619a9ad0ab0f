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
#include "tests/unit/golden-run.h"

static struct lp_backend *be;

static struct lp_model *model;
static struct golden gold;
static const char *model_label;

/* Each golden prompt alone: logits and 32 greedy tokens. */
static void test_alone_matches_reference(void)
{
	char why[600];

	CHECK_MSG(golden_check_alone(model, gold.prompts, gold.n_prompts, NULL, model_label, why,
	                             sizeof(why)) == 0,
	          "%s", why);
}

static void check_batch(const struct lp_engine_config *ec, bool want_preemption)
{
	struct golden_prompt *ps[GOLDEN_MAX_PROMPTS];
	char why[600];

	CHECK(gold.n_batch >= 8);
	for (int i = 0; i < gold.n_batch; i++)
		ps[i] = &gold.batch[i];
	CHECK_MSG(golden_check_batch(model, ec, ps, gold.n_batch, NULL, want_preemption,
	                             model_label, why, sizeof(why)) == 0,
	          "%s", why);
}

/* All batch prompts at once give what each gave alone. */
static void test_batch_equals_alone(void)
{
	struct lp_engine_config ec;

	golden_engine_config(&ec);
	check_batch(&ec, false);
}

/* The same with prefill split into chunks of 7 tokens mixed with decodes. */
static void test_batch_chunked_prefill(void)
{
	struct lp_engine_config ec;

	golden_engine_config(&ec);
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

	golden_engine_config(&ec);
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
