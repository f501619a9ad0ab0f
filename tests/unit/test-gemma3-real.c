/* The real Gemma 3 270M (Q4_K_M GGUF: Q4_K, Q5_0, Q6_K and Q8_0 matrices;
 * models/gemma-3-270m-q4_k_m.gguf from make deps, or $GEMMA3_MODEL)
 * against transformers reading the same file
 * (hack/make-gemma3-real-goldens.py): the file's metadata read as Gemma 3,
 * prompt ids from the file's tokenizer, the last prompt position's logits
 * at the stored tokens within 1e-3 of the logit range, and the greedy
 * tokens, alone and all prompts in one batch. */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>

#include "agent/engine/engine.h"
#include "agent/engine/model.h"
#include "agent/engine/tokenizer.h"
#include "tests/test.h"
#include "tests/unit/golden-run.h"

#define MODEL_PATH "models/gemma-3-270m-q4_k_m.gguf"

static struct lp_backend *be;
static struct lp_model *m;
static json_t *doc;
static struct golden_prompt prompts[GOLDEN_MAX_PROMPTS];
static int n_prompts;

static void test_config(void)
{
	const struct lp_model_config *c = &m->cfg;

	CHECK_EQ_INT(c->arch, LP_ARCH_GEMMA3);
	CHECK_EQ_INT(c->n_layers, 18);
	CHECK_EQ_INT(c->dim, 640);
	CHECK_EQ_INT(c->n_heads, 4);
	CHECK_EQ_INT(c->n_kv_heads, 1);
	CHECK_EQ_INT(c->head_dim, 256);
	CHECK_EQ_INT(c->vocab_size, 262144);
	CHECK_EQ_INT(c->sliding_window, 512);
	CHECK_EQ_INT(c->act, LP_ACT_GELU_TANH);
	CHECK(c->qk_norm && c->post_norms && c->tied_embeddings);
	CHECK_NEAR(c->rope_theta, 1e6, 1e-3);
	CHECK_NEAR(c->rope_local_theta, 1e4, 1e-3);
	CHECK_NEAR(c->attn_scale, 1 / 16.0, 1e-9);
	CHECK_NEAR(c->embed_scale, sqrt(640.0), 1e-5);
	/* every sixth layer is global */
	for (int l = 0; l < c->n_layers; l++)
		CHECK_EQ_INT(lp_model_layer_window(c, l), (l + 1) % 6 ? 512 : 0);
	CHECK_EQ_INT(c->bos_id, 2);
	CHECK(lp_model_is_eos(m, 1));
	CHECK(lp_model_is_eos(m, 106)); /* <end_of_turn> */
}

static void test_prompt_ids(void)
{
	for (int i = 0; i < n_prompts; i++) {
		struct lp_tokens ids = {0};
		struct lp_err err = {0};
		const struct golden_prompt *g = &prompts[i];

		CHECK_OK(lp_tokenizer_encode(m->tok, g->text, strlen(g->text),
		                             LP_ENCODE_ADD_SPECIAL | LP_ENCODE_PARSE_SPECIAL, &ids,
		                             &err),
		         &err);
		CHECK_MSG(ids.n == (size_t)g->n_ids &&
		              !memcmp(ids.ids, g->ids, ids.n * sizeof(int32_t)),
		          "prompt %d: %zu ids, reference %d", i, ids.n, g->n_ids);
		lp_tokens_release(&ids);
	}
}

static void test_alone(void)
{
	struct lp_engine_config ec;
	int vocab = m->cfg.vocab_size;
	float *first = malloc((size_t)vocab * sizeof(float));

	CHECK(first != NULL);
	golden_engine_config(&ec);
	for (int i = 0; i < n_prompts && first && !test_current_failed; i++) {
		json_t *p = json_array_get(json_object_get(doc, "prompts"), (size_t)i);
		json_t *ref = json_object_get(p, "logits"), *v;
		struct golden_prompt *g = &prompts[i];
		int32_t toks[1][GOLDEN_N_GREEDY];
		float *firsts[1] = {first};
		struct lp_err err = {0};
		const char *key;
		double worst = 0, range = json_number_value(json_object_get(p, "logit_max")) -
		                          json_number_value(json_object_get(p, "logit_min"));
		int n = 0;

		CHECK_OK(golden_run(m, &ec, &g, 1, NULL, toks, firsts, NULL, &err), &err);
		json_object_foreach(ref, key, v)
		{
			int id = (int)strtol(key, NULL, 10);
			CHECK(id >= 0 && id < vocab);
			if (id >= 0 && id < vocab)
				worst = fmax(worst, fabs(first[id] - json_number_value(v)));
			n++;
		}
		printf(
		    "  prompt %d: %d ids, max |logit - reference| over %d tokens = %.3g (%.2e of "
		    "the range)\n",
		    i, g->n_ids, n, worst, worst / range);
		CHECK(n >= 64);
		CHECK_MSG(worst <= 1e-3 * range, "prompt %d: logits differ by %g of the range", i,
		          worst / range);
		for (int t = 0; t < GOLDEN_N_GREEDY; t++)
			CHECK_MSG(toks[0][t] == g->greedy[t],
			          "prompt %d: greedy token %d is %d, reference %d", i, t,
			          toks[0][t], g->greedy[t]);
	}
	free(first);
}

static void test_batch(void)
{
	struct golden_prompt *ps[GOLDEN_MAX_PROMPTS];
	struct lp_engine_config ec;
	char why[600];

	for (int i = 0; i < n_prompts; i++)
		ps[i] = &prompts[i];
	golden_engine_config(&ec);
	ec.max_num_seqs = 4; /* chunked prefill mixed with decodes too */
	ec.max_batched_tokens = 16;
	CHECK_MSG(
	    golden_check_batch(m, &ec, ps, n_prompts, NULL, false, "batch", why, sizeof(why)) == 0,
	    "%s", why);
}

int main(void)
{
	const char *path = getenv("GEMMA3_MODEL") ? getenv("GEMMA3_MODEL") : MODEL_PATH;
	char golden[512];
	struct lp_err err = {0};
	json_error_t jerr;
	size_t i;
	json_t *p;

	TEST_MAIN_BEGIN("test-gemma3-real");
	if (lp_backend_cpu_new(&be, 0, &err)) {
		printf("FAIL test-gemma3-real:backend: %s\n", err.msg);
		return 1;
	}
	if (lp_model_load(&m, path, be, &err)) {
		printf("FAIL test-gemma3-real:load: %s (make deps fetches it)\n", err.msg);
		return 1;
	}
	snprintf(golden, sizeof(golden), "%s/goldens/gemma-3-270m-q4_k_m.json",
	         test_fixtures_dir());
	doc = json_load_file(golden, 0, &jerr);
	if (!doc) {
		printf("FAIL test-gemma3-real:goldens: %s: %s\n", golden, jerr.text);
		return 1;
	}
	json_array_foreach(json_object_get(doc, "prompts"), i, p)
	{
		if (i >= GOLDEN_MAX_PROMPTS || golden_read_prompt(p, &prompts[i], 0)) {
			printf("FAIL test-gemma3-real:goldens: prompt %zu unreadable\n", i);
			return 1;
		}
		n_prompts++;
	}
	RUN(test_config);
	RUN(test_prompt_ids);
	RUN(test_alone);
	RUN(test_batch);
	for (int k = 0; k < n_prompts; k++)
		free(prompts[k].logits);
	json_decref(doc);
	lp_model_free(m);
	lp_backend_destroy(be);
	return test_failed_count ? 1 : 0;
}
