/* Sliding-window attention end to end, against transformers: the tiny models
 * of hack/make-window-goldens.py give the reference's greedy tokens and
 * last-position logits alone, in a batch, with chunked prefill, with
 * preemption and through the prefix cache; and when every layer slides, a
 * sequence holds the cache blocks of its window only (the others go back
 * to the cache as it moves on).
 *
 *   tiny-mistral-window: sliding_window 24 on both layers, so blocks are
 *                        released
 *   tiny-qwen2-window:   layer 0 full, layer 1 windowed (per-layer windows;
 *                        nothing can be released)
 *
 * Every prompt but the first is longer than the window, and the 32 tokens
 * generated take each past it. config.json variants show which layers
 * slide as transformers reads the keys. */
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/engine/engine.h"
#include "agent/engine/model.h"
#include "tests/test.h"
#include "tests/unit/golden-run.h"

#define WINDOW 24
#define BS     16 /* the engine's default block size */

struct window_case {
	const char *name; /* tests/fixtures/<name>, goldens/<name>.json */
	int layer_window[2];
	bool releases; /* every layer slides */
};

static const struct window_case cases[] = {
    {"tiny-mistral-window", {WINDOW, WINDOW}, true},
    {"tiny-qwen2-window", {0, WINDOW}, false},
};

static struct lp_backend *be;
static const struct window_case *cur;
static struct lp_model *model;
static struct golden gold;

/* The window is read from config.json, per layer, and does not cap the
 * context. */
static void test_config(void)
{
	const struct lp_model_config *c = &model->cfg;

	CHECK_EQ_INT(c->n_layers, 2);
	CHECK_EQ_INT(c->sliding_window, WINDOW);
	CHECK_EQ_INT(c->max_pos, 256);
	for (int l = 0; l < 2; l++)
		CHECK_EQ_INT(lp_model_layer_window(c, l), cur->layer_window[l]);
	CHECK_EQ_INT(json_integer_value(json_object_get(gold.root, "sliding_window")), WINDOW);
}

static void test_alone_matches_reference(void)
{
	char why[600];

	CHECK_MSG(golden_check_alone(model, gold.prompts, gold.n_prompts, NULL, cur->name, why,
	                             sizeof(why)) == 0,
	          "%s", why);
}

static void check_batch(const struct lp_engine_config *ec, bool preempt, const char *what)
{
	struct golden_prompt *ps[GOLDEN_MAX_PROMPTS];
	char why[600];

	CHECK(gold.n_batch >= 8);
	for (int i = 0; i < gold.n_batch; i++)
		ps[i] = &gold.batch[i];
	CHECK_MSG(golden_check_batch(model, ec, ps, gold.n_batch, NULL, preempt, what, why,
	                             sizeof(why)) == 0,
	          "%s", why);
}

/* All batch prompts at once give what each gave alone. */
static void test_batch_equals_alone(void)
{
	struct lp_engine_config ec;

	golden_engine_config(&ec);
	check_batch(&ec, false, "batch");
}

/* The same with prefill in chunks of 7 tokens (a chunk's first token sees
 * positions computed in earlier steps, some of them in released blocks'
 * place) and of 40 (longer than the window), mixed with decodes. */
static void test_batch_chunked_prefill(void)
{
	struct lp_engine_config ec;

	golden_engine_config(&ec);
	ec.max_num_seqs = 4;
	ec.max_batched_tokens = 7;
	check_batch(&ec, false, "chunks of 7");
	ec.max_num_seqs = 3;
	ec.max_batched_tokens = 40;
	check_batch(&ec, false, "chunks of 40");
}

/* And with a cache of 16 blocks (one sequence of 256 positions) for 8
 * sequences: sequences are preempted and recomputed from their tokens. */
static void test_batch_preemption(void)
{
	struct lp_engine_config ec;
	const struct lp_model_config *c = &model->cfg;

	golden_engine_config(&ec);
	ec.kv_cache_bytes =
	    lp_kv_cache_block_bytes(c->n_layers, c->n_kv_heads * c->head_dim, BS, LP_DTYPE_F32) *
	    16;
	check_batch(&ec, true, "preemption");
}

/* The longest prompt (160 tokens) alone, 32 tokens, the prefill in one
 * step or in chunks of chunk tokens; after every step the cache blocks in
 * use are counted. When every layer slides, no more are held than the
 * window's positions can touch (24 positions over blocks of 16: at most 3)
 * while the sequence's table grows to 12 blocks; otherwise every block
 * stays. The tokens are the reference's either way. */
static void check_blocks(int chunk)
{
	struct lp_engine_config ec;
	struct lp_engine *e = NULL;
	struct lp_seq *s = NULL;
	struct lp_seq_params p = {0};
	struct lp_err err = {0};
	struct golden_prompt *g = &gold.prompts[gold.n_prompts - 1];
	int most = 0, n = 0, limit = cur->releases ? (WINDOW + BS - 1) / BS + 1 : 1000;
	int table = 0, released = 0, bad_count = 0, bad_token = -1;

	golden_engine_config(&ec);
	ec.max_batched_tokens = chunk;
	ec.max_num_seqs = 1;
	CHECK_OK(lp_engine_new(&e, model, &ec, &err), &err);
	p.prompt = g->ids;
	p.n_prompt = (size_t)g->n_ids;
	p.max_tokens = GOLDEN_N_GREEDY;
	p.ignore_eos = true;
	lp_sampling_params_default(&p.sampling);
	p.sampling.temperature = 0;
	if (lp_engine_add(e, &p, &s, &err))
		goto out;
	while (lp_engine_has_work(e)) {
		const struct lp_step_output *outs;
		struct lp_engine_stats st;
		int n_outs;

		if (lp_engine_step(e, &outs, &n_outs, &err))
			goto out;
		for (int k = 0; k < n_outs && n < GOLDEN_N_GREEDY; k++, n++)
			if (outs[k].token != g->greedy[n] && bad_token < 0)
				bad_token = n;
		lp_engine_stats(e, &st);
		most = st.kv_blocks_used > most ? st.kv_blocks_used : most;
		if (s->state == LP_SEQ_FINISHED)
			continue;
		/* the sequence's table: released entries and live blocks */
		table = s->n_blocks;
		released = s->n_released;
		bad_count += st.kv_blocks_used != s->n_blocks - s->n_released;
	}
	printf("  %s, prefill chunks of %d: table of %d blocks, %d released, at most %d in use "
	       "after a step\n",
	       cur->name, chunk, table, released, most);
out:
	lp_engine_release(e, s);
	lp_engine_free(e);
	CHECK_MSG(!err.code, "chunk %d: %s", chunk, err.msg);
	CHECK_MSG(bad_token < 0, "chunk %d: token %d differs from the reference", chunk, bad_token);
	CHECK_EQ_INT(n, GOLDEN_N_GREEDY);
	CHECK_EQ_INT(bad_count, 0);
	/* the table reaches the last position computed: 160 + 31 */
	CHECK_EQ_INT(table, (g->n_ids + GOLDEN_N_GREEDY - 1 + BS - 1) / BS);
	if (cur->releases) {
		CHECK_MSG(most <= limit, "chunk %d: %d blocks in use, more than %d", chunk, most,
		          limit);
		CHECK(released >= table - limit);
	} else {
		CHECK_EQ_INT(released, 0);
		CHECK_EQ_INT(most, table);
	}
}

/* When every layer slides, a cache smaller than max-model-len but holding
 * the window's blocks (24 positions over blocks of 16: 2, and 2 more)
 * starts and gives the reference's tokens for the longest prompt (160
 * positions and 32 more) in one sequence; one block fewer is refused with a
 * message naming the window. A model with a full layer needs the whole
 * context. */
static void test_small_cache(void)
{
	const struct lp_model_config *c = &model->cfg;
	size_t block =
	    lp_kv_cache_block_bytes(c->n_layers, c->n_kv_heads * c->head_dim, BS, LP_DTYPE_F32);
	struct golden_prompt *g = &gold.prompts[gold.n_prompts - 1];
	struct lp_engine_config ec;
	struct lp_engine *e = NULL;
	struct lp_err err = {0};
	int32_t got[1][GOLDEN_N_GREEDY];

	golden_engine_config(&ec);
	ec.max_model_len = 256;
	ec.max_num_seqs = 1;
	ec.kv_cache_bytes = block * 3;
	CHECK_EQ_INT(lp_engine_new(&e, model, &ec, &err), -EINVAL);
	CHECK(e == NULL);
	CHECK_MSG(strstr(err.msg, cur->releases ? "sliding window of 24 positions"
	                                        : "fewer than max-model-len 256"),
	          "message: %s", err.msg);
	if (!cur->releases)
		return;
	ec.kv_cache_bytes = block * 4;
	CHECK_OK(golden_run(model, &ec, &g, 1, NULL, got, NULL, NULL, &err), &err);
	for (int i = 0; i < GOLDEN_N_GREEDY; i++)
		CHECK_MSG(got[0][i] == g->greedy[i], "token %d: %d, reference %d", i, got[0][i],
		          g->greedy[i]);
}

static void test_blocks_bounded(void)
{
	check_blocks(512);
	check_blocks(16);
	check_blocks(5);
}

/* A prompt run twice on one engine: the second run finds its leading blocks
 * in the prefix cache (published before the first run released them),
 * releases those before its window at once, and gives the same tokens. */
static void test_prefix_cache(void)
{
	struct lp_engine_config ec;
	struct golden_prompt *g = &gold.prompts[gold.n_prompts - 1];
	struct lp_engine *e = NULL;
	struct lp_err err = {0};
	uint64_t hits[2] = {0, 0};

	int bad_token[2] = {-1, -1}, n[2] = {0, 0};

	golden_engine_config(&ec);
	CHECK_OK(lp_engine_new(&e, model, &ec, &err), &err);
	for (int run = 0; run < 2 && !err.code; run++) {
		struct lp_seq *s = NULL;
		struct lp_seq_params p = {0};
		struct lp_engine_stats st;

		p.prompt = g->ids;
		p.n_prompt = (size_t)g->n_ids;
		p.max_tokens = GOLDEN_N_GREEDY;
		p.ignore_eos = true;
		lp_sampling_params_default(&p.sampling);
		p.sampling.temperature = 0;
		if (lp_engine_add(e, &p, &s, &err))
			break;
		while (lp_engine_has_work(e)) {
			const struct lp_step_output *outs;
			int n_outs;

			if (lp_engine_step(e, &outs, &n_outs, &err))
				break;
			for (int k = 0; k < n_outs && n[run] < GOLDEN_N_GREEDY; k++, n[run]++)
				if (outs[k].token != g->greedy[n[run]] && bad_token[run] < 0)
					bad_token[run] = n[run];
		}
		lp_engine_stats(e, &st);
		hits[run] = st.prefix_hits;
		lp_engine_release(e, s);
	}
	lp_engine_free(e);
	CHECK_MSG(!err.code, "%s", err.msg);
	for (int run = 0; run < 2; run++) {
		CHECK_EQ_INT(n[run], GOLDEN_N_GREEDY);
		CHECK_MSG(bad_token[run] < 0, "run %d: token %d differs from the reference", run,
		          bad_token[run]);
	}
	/* the second run found the 9 full blocks before the last prompt token */
	CHECK_EQ_INT(hits[0], 0);
	CHECK_EQ_INT(hits[1], (uint64_t)(g->n_ids - 1) / BS * BS);
}

/* ---- config.json variants, in a temporary copy of a model ---- */

static char tmpdir[256];
static const char *const variant_files[] = {"model.safetensors", "tokenizer.json",
                                            "tokenizer_config.json", "config.json"};

static void variant_clean(void)
{
	char p[512];

	for (size_t i = 0; i < 4; i++) {
		snprintf(p, sizeof(p), "%s/%s", tmpdir, variant_files[i]);
		unlink(p);
	}
}

/* tmpdir: the files of tests/fixtures/<name> linked, config.json with the
 * keys of patch (a JSON object) set and key del removed. Returns 0 or -1. */
static int variant(const char *name, const char *patch, const char *del)
{
	char src[512], dst[768], abs[PATH_MAX];
	json_error_t jerr;
	json_t *cfg, *pj;
	int rc;

	variant_clean();
	for (size_t i = 0; i < 3; i++) {
		snprintf(src, sizeof(src), "%s/%s/%s", test_fixtures_dir(), name, variant_files[i]);
		snprintf(dst, sizeof(dst), "%s/%s", tmpdir, variant_files[i]);
		if (!realpath(src, abs) || symlink(abs, dst))
			return -1;
	}
	snprintf(src, sizeof(src), "%s/%s/config.json", test_fixtures_dir(), name);
	cfg = json_load_file(src, 0, &jerr);
	pj = json_loads(patch, 0, &jerr);
	if (!cfg || !pj || json_object_update(cfg, pj)) {
		json_decref(cfg);
		json_decref(pj);
		return -1;
	}
	if (del)
		json_object_del(cfg, del);
	snprintf(dst, sizeof(dst), "%s/config.json", tmpdir);
	rc = json_dump_file(cfg, dst, 0);
	json_decref(cfg);
	json_decref(pj);
	return rc;
}

/* What each variant gives: the windows of layers 0 and 1, or the error
 * code and a word of its message. */
static void test_config_variants(void)
{
	static const struct {
		const char *model, *patch, *del;
		int rc, w0, w1;
		const char *msg;
	} cases[] = {
	    /* transformers' MistralConfig default */
	    {"tiny-mistral-window", "{}", "sliding_window", 0, 4096, 4096, NULL},
	    {"tiny-mistral-window", "{\"sliding_window\": null}", NULL, 0, 0, 0, NULL},
	    {"tiny-mistral-window", "{\"sliding_window\": 1}", NULL, 0, 1, 1, NULL},
	    /* LlamaConfig has no window */
	    {"tiny-mistral-window", "{\"model_type\": \"llama\"}", NULL, 0, 0, 0, NULL},
	    {"tiny-mistral-window", "{\"sliding_window\": 0}", NULL, -EINVAL, 0, 0,
	     "sliding_window"},
	    /* layer_types wins over max_window_layers */
	    {"tiny-qwen2-window", "{\"layer_types\": [\"sliding_attention\", \"full_attention\"]}",
	     NULL, 0, 24, 0, NULL},
	    {"tiny-qwen2-window", "{\"max_window_layers\": 0}", NULL, 0, 24, 24, NULL},
	    {"tiny-qwen2-window", "{\"use_sliding_window\": false}", NULL, 0, 0, 0, NULL},
	    /* Qwen2Config's default window */
	    {"tiny-qwen2-window", "{}", "sliding_window", 0, 0, 4096, NULL},
	    {"tiny-qwen2-window", "{\"layer_types\": [\"full_attention\", \"chunked_attention\"]}",
	     NULL, -ENOTSUP, 0, 0, "chunked_attention"},
	    {"tiny-qwen2-window", "{\"layer_types\": [\"full_attention\"]}", NULL, -EINVAL, 0, 0,
	     "layer_types"},
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct lp_model *m = NULL;
		struct lp_err err = {0};
		int rc;

		CHECK_MSG(variant(cases[i].model, cases[i].patch, cases[i].del) == 0,
		          "case %zu: cannot write the variant", i);
		rc = lp_model_load(&m, tmpdir, be, &err);
		CHECK_MSG(rc == cases[i].rc, "case %zu: load returned %d (%s), expected %d", i, rc,
		          err.msg, cases[i].rc);
		if (rc) {
			CHECK_MSG(strstr(err.msg, cases[i].msg), "case %zu: %s", i, err.msg);
			continue;
		}
		CHECK_MSG(
		    lp_model_layer_window(&m->cfg, 0) == cases[i].w0 &&
		        lp_model_layer_window(&m->cfg, 1) == cases[i].w1 && m->cfg.max_pos == 256,
		    "case %zu: windows %d %d, context %d", i, lp_model_layer_window(&m->cfg, 0),
		    lp_model_layer_window(&m->cfg, 1), m->cfg.max_pos);
		lp_model_free(m);
	}
}

static int run_case(const struct window_case *wc)
{
	static char program[64];
	char path[512];
	struct lp_err err = {0};

	cur = wc;
	snprintf(path, sizeof(path), "%s/%s", test_fixtures_dir(), wc->name);
	if (lp_model_load(&model, path, be, &err)) {
		printf("FAIL test-window:load_%s: %s\n", wc->name, err.msg);
		return 1;
	}
	if (golden_load(&gold, wc->name, model->cfg.vocab_size)) {
		printf("FAIL test-window:goldens_%s: cannot read %s/goldens/%s.json\n", wc->name,
		       test_fixtures_dir(), wc->name);
		lp_model_free(model);
		return 1;
	}
	snprintf(program, sizeof(program), "test-window-%s", wc->name + 5);
	test_program = program;
	RUN(test_config);
	RUN(test_alone_matches_reference);
	RUN(test_batch_equals_alone);
	RUN(test_batch_chunked_prefill);
	RUN(test_batch_preemption);
	RUN(test_blocks_bounded);
	RUN(test_small_cache);
	RUN(test_prefix_cache);
	test_program = "test-window";
	golden_free(&gold);
	lp_model_free(model);
	model = NULL;
	return 0;
}

int main(void)
{
	struct lp_err err = {0};
	int bad = 0;

	TEST_MAIN_BEGIN("test-window");
	if (lp_backend_cpu_new(&be, 0, &err)) {
		printf("FAIL test-window:backend: %s\n", err.msg);
		return 1;
	}
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		bad += run_case(&cases[i]);
	snprintf(tmpdir, sizeof(tmpdir), "%s/lp-test-window-XXXXXX",
	         getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
	if (!mkdtemp(tmpdir)) {
		printf("FAIL test-window:tmpdir: %s\n", strerror(errno));
		bad++;
	} else {
		RUN(test_config_variants);
		variant_clean();
		rmdir(tmpdir);
	}
	lp_backend_destroy(be);
	if (bad)
		test_failed_count += bad;
	TEST_MAIN_END();
}
