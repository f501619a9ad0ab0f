/* Automatic prefix caching (agent/engine/kv-cache.c, engine.c).
 *
 * The block allocator against a plain model of it (references, the digest
 * table, LRU eviction only when no free block is left); then the engine
 * over the tiny model and its adapters with blocks of 4 positions, against
 * the goldens of transformers + peft (tests/fixtures/goldens/
 * lora-tiny-mixed.json): every request run twice gives the golden tokens
 * both times, the second time from cached blocks; a request that extends
 * an earlier one's whole output reuses the blocks its decode wrote; two
 * adapters (and the base model) with the same prompt share nothing; after
 * an in-place reload no block of the old version is found; a cache so
 * small that sequences are preempted gives the same tokens with caching on
 * and off; and caching off finds nothing. */
#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "agent/engine/engine.h"
#include "agent/engine/model.h"
#include "tests/test.h"

#define N_GREEDY 32
#define MAX_REQ  64
#define BS       4

struct req {
	const char *adapter; /* NULL: base */
	char adapter_buf[64];
	int32_t ids[512];
	int n_ids;
	int32_t greedy[N_GREEDY];
};

static struct lp_backend *be;
static struct lp_model *tiny;
static struct req reqs[MAX_REQ];
static int n_reqs;

/* ---- the block allocator ---- */

static void digest_of(struct lp_kv_cache *kv, struct lp_kv_digest *d, int32_t a, int32_t b)
{
	int32_t toks[2] = {a, b};
	CHECK(lp_kv_cache_digest(kv, d, NULL, 0, toks, 2));
}

static void test_allocator(void)
{
	struct lp_kv_cache kv;
	struct lp_err err = {0};
	struct lp_kv_digest d[8];
	int32_t ids[8];

	CHECK_OK(lp_kv_cache_init(&kv, be, 1, 8, 2, 8, LP_DTYPE_F32, &err), &err);
	for (int i = 0; i < 8; i++)
		digest_of(&kv, &d[i], i, 100 + i);
	/* the digest depends on the key and the parent */
	{
		struct lp_kv_digest x, y;
		int32_t t[2] = {0, 100};
		CHECK(lp_kv_cache_digest(&kv, &x, NULL, 7, t, 2));
		CHECK(memcmp(x.b, d[0].b, sizeof(x.b)));
		CHECK(lp_kv_cache_digest(&kv, &y, &d[1], 0, t, 2));
		CHECK(memcmp(y.b, d[0].b, sizeof(y.b)) && memcmp(y.b, x.b, sizeof(y.b)));
	}
	for (int i = 0; i < 8; i++) {
		ids[i] = lp_kv_cache_alloc(&kv);
		CHECK(ids[i] >= 0);
	}
	CHECK_EQ_INT(lp_kv_cache_alloc(&kv), -1);
	/* publish 0..5, then release everything: 6 cached, 2 free */
	for (int i = 0; i < 6; i++)
		lp_kv_cache_publish(&kv, ids[i], &d[i]);
	/* a second block with a published digest is not published */
	lp_kv_cache_publish(&kv, ids[6], &d[0]);
	CHECK(!kv.blocks[ids[6]].published);
	for (int i = 0; i < 8; i++)
		lp_kv_cache_free(&kv, ids[i]);
	CHECK_EQ_INT(kv.n_free, 2);
	CHECK_EQ_INT(kv.n_cached, 6);
	CHECK_EQ_INT(lp_kv_cache_available(&kv), 8);
	/* lookups find them, with a reference, off the LRU list */
	CHECK_EQ_INT(lp_kv_cache_lookup(&kv, &d[2]), ids[2]);
	CHECK_EQ_INT(lp_kv_cache_lookup(&kv, &d[2]), ids[2]);
	CHECK_EQ_INT(kv.blocks[ids[2]].refs, 2);
	CHECK_EQ_INT(kv.n_cached, 5);
	CHECK_EQ_INT(lp_kv_cache_lookup(&kv, &d[6]), -1);
	/* allocation takes the free blocks first, then the least recently
	 * released cached ones: 0, 1, 3, 4, 5 in that order */
	int32_t a = lp_kv_cache_alloc(&kv), b = lp_kv_cache_alloc(&kv);
	CHECK(a >= 0 && b >= 0 && !kv.blocks[a].published && !kv.blocks[b].published);
	CHECK_EQ_INT(kv.n_cached, 5);
	CHECK_EQ_INT(lp_kv_cache_alloc(&kv), ids[0]);
	CHECK_EQ_INT(lp_kv_cache_lookup(&kv, &d[0]), -1);
	CHECK_EQ_INT(lp_kv_cache_alloc(&kv), ids[1]);
	CHECK_EQ_INT(lp_kv_cache_alloc(&kv), ids[3]);
	/* 4 and 5 are still found after the others were taken (the table
	 * keeps its probe chains whole) */
	CHECK_EQ_INT(lp_kv_cache_lookup(&kv, &d[5]), ids[5]);
	CHECK_EQ_INT(lp_kv_cache_lookup(&kv, &d[4]), ids[4]);
	CHECK_EQ_INT(kv.evictions, 3);
	CHECK_EQ_INT(lp_kv_cache_alloc(&kv), -1);
	/* block 2 is still held twice: one release keeps it held */
	lp_kv_cache_free(&kv, ids[2]);
	CHECK_EQ_INT(kv.n_cached, 0);
	lp_kv_cache_free(&kv, ids[2]);
	CHECK_EQ_INT(kv.n_cached, 1);
	lp_kv_cache_release(&kv);
}

/* Many random operations against a plain model: every published digest
 * maps to its block until that block is evicted, never to another. */
static void test_allocator_random(void)
{
	enum { NB = 64, ND = 200 };
	struct lp_kv_cache kv;
	struct lp_err err = {0};
	struct lp_kv_digest d[ND];
	int32_t owner[ND]; /* block published under digest i, or -1 */
	int32_t held[4 * NB];
	int n_held = 0;
	uint64_t x = 88172645463325252ull;

	CHECK_OK(lp_kv_cache_init(&kv, be, 1, 4, 1, NB, LP_DTYPE_F32, &err), &err);
	for (int i = 0; i < ND; i++) {
		digest_of(&kv, &d[i], i, -i);
		owner[i] = -1;
	}
	for (int step = 0; step < 20000; step++) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		int op = (int)(x % 4), k = (int)((x >> 8) % ND);
		if (op == 0 && n_held < 4 * NB) {
			int32_t id = lp_kv_cache_alloc(&kv);
			if (id >= 0) {
				for (int i = 0; i < ND; i++)
					if (owner[i] == id)
						owner[i] = -1; /* evicted */
				held[n_held++] = id;
			}
		} else if (op == 1 && n_held) {
			int j = (int)((x >> 20) % (uint64_t)n_held);
			lp_kv_cache_free(&kv, held[j]);
			held[j] = held[--n_held];
		} else if (op == 2 && n_held) {
			int32_t id = held[(x >> 20) % (uint64_t)n_held];
			bool free_digest = owner[k] < 0, block_unpublished = true;
			for (int i = 0; i < ND; i++)
				if (owner[i] == id)
					block_unpublished = false;
			lp_kv_cache_publish(&kv, id, &d[k]);
			if (free_digest && block_unpublished)
				owner[k] = id;
		} else if (op == 3 && n_held < 4 * NB) {
			int32_t id = lp_kv_cache_lookup(&kv, &d[k]);
			CHECK_MSG(id == owner[k], "step %d: digest %d found block %d, expected %d",
			          step, k, id, owner[k]);
			if (id >= 0)
				held[n_held++] = id;
		}
		CHECK(kv.n_free + kv.n_cached <= NB);
	}
	lp_kv_cache_release(&kv);
}

/* ---- the engine ---- */

static int read_reqs(void)
{
	char path[512];
	json_error_t jerr;
	json_t *root, *arr, *v;
	size_t i;

	snprintf(path, sizeof(path), "%s/goldens/lora-tiny-mixed.json", test_fixtures_dir());
	root = json_load_file(path, 0, &jerr);
	if (!root)
		return -1;
	arr = json_object_get(root, "requests");
	json_array_foreach(arr, i, v)
	{
		struct req *r = &reqs[n_reqs];
		json_t *ids = json_object_get(v, "ids"), *g = json_object_get(v, "greedy"), *t;
		const char *a = json_string_value(json_object_get(v, "adapter"));
		size_t j;
		if (n_reqs == MAX_REQ || json_array_size(ids) > 400 ||
		    json_array_size(g) != N_GREEDY)
			break;
		json_array_foreach(ids, j, t) r->ids[j] = (int32_t)json_integer_value(t);
		r->n_ids = (int)json_array_size(ids);
		json_array_foreach(g, j, t) r->greedy[j] = (int32_t)json_integer_value(t);
		if (a) {
			snprintf(r->adapter_buf, sizeof(r->adapter_buf), "%s", a);
			r->adapter = r->adapter_buf;
		}
		n_reqs++;
	}
	json_decref(root);
	return n_reqs >= 24 ? 0 : -1;
}

static int load_adapter(struct lp_engine *e, const char *name, const char *dir, bool inplace,
                        struct lp_err *err)
{
	char path[512];
	bool already;

	snprintf(path, sizeof(path), "%s/lora/tiny/%s", test_fixtures_dir(), dir);
	return lp_lora_cache_load(lp_engine_loras(e), name, path, NULL, NULL, inplace, &already,
	                          err);
}

static struct lp_engine *new_engine(bool caching, int max_len, size_t kv_bytes, struct lp_err *err)
{
	struct lp_engine_config ec;
	struct lp_engine *e;

	lp_engine_config_default(&ec);
	ec.max_model_len = max_len;
	ec.kv_cache_bytes = kv_bytes;
	ec.block_size = BS;
	ec.prefix_caching = caching;
	if (lp_engine_new(&e, tiny, &ec, err))
		return NULL;
	for (int i = 0; i < n_reqs; i++)
		if (reqs[i].adapter && !lp_lora_cache_find(lp_engine_loras(e), reqs[i].adapter) &&
		    load_adapter(e, reqs[i].adapter, reqs[i].adapter, false, err)) {
			lp_engine_free(e);
			return NULL;
		}
	return e;
}

/* Runs n prompts as one batch, greedy; out[i] gets up to N_GREEDY tokens
 * of each (max_tokens[i] of them). Returns 0 or a negative code. */
static int run(struct lp_engine *e, const char *const *adapters, const int32_t *const *ids,
               const int *n_ids, const int *max_tokens, int n, int32_t (*out)[N_GREEDY],
               struct lp_err *err)
{
	struct lp_seq *seqs[MAX_REQ] = {0};
	int counts[MAX_REQ] = {0}, rc = 0;

	for (int i = 0; i < n; i++) {
		struct lp_seq_params p = {0};
		p.adapter = adapters[i];
		p.prompt = ids[i];
		p.n_prompt = (size_t)n_ids[i];
		p.max_tokens = max_tokens[i];
		p.ignore_eos = true;
		lp_sampling_params_default(&p.sampling);
		p.sampling.temperature = 0;
		if ((rc = lp_engine_add(e, &p, &seqs[i], err)))
			goto out;
		seqs[i]->user = (void *)(intptr_t)i;
	}
	while (lp_engine_has_work(e)) {
		const struct lp_step_output *o;
		int n_o;
		if ((rc = lp_engine_step(e, &o, &n_o, err)))
			goto out;
		for (int k = 0; k < n_o; k++) {
			int i = (int)(intptr_t)o[k].seq->user;
			if (counts[i] < N_GREEDY)
				out[i][counts[i]++] = o[k].token;
		}
	}
out:
	for (int i = 0; i < n; i++)
		lp_engine_release(e, seqs[i]);
	return rc;
}

static int run_req(struct lp_engine *e, const struct req *r, const char *adapter,
                   int32_t out[N_GREEDY], struct lp_err *err)
{
	const int32_t *ids = r->ids;
	int n_ids = r->n_ids, max = N_GREEDY;

	return run(e, &adapter, &ids, &n_ids, &max, 1, (int32_t(*)[N_GREEDY])out, err);
}

static uint64_t hits(struct lp_engine *e)
{
	struct lp_engine_stats st;
	lp_engine_stats(e, &st);
	return st.prefix_hits;
}

/* Every golden request twice in one engine: the golden tokens both times;
 * the second run of a prompt of at least two blocks finds its blocks. */
static void test_requests_twice(void)
{
	struct lp_err err = {0};
	struct lp_engine *e = new_engine(true, 256, 8u << 20, &err);
	int reused = 0;

	CHECK_MSG(e, "%s", err.msg);
	for (int i = 0; i < n_reqs; i++) {
		for (int round = 0; round < 2; round++) {
			int32_t toks[N_GREEDY];
			uint64_t before = hits(e);
			CHECK_OK(run_req(e, &reqs[i], reqs[i].adapter, toks, &err), &err);
			CHECK_MSG(!memcmp(toks, reqs[i].greedy, sizeof(toks)),
			          "request %d (%s), round %d: tokens differ from the golden", i,
			          reqs[i].adapter ? reqs[i].adapter : "base", round);
			uint64_t got = hits(e) - before;
			/* the first round may find what an earlier request left; the
			 * second finds at least every full block of the prompt but
			 * the last token */
			if (round == 1) {
				uint64_t want = (uint64_t)((reqs[i].n_ids - 1) / BS * BS);
				CHECK_MSG(got >= want,
				          "request %d, round 2: %llu cached tokens, expected %llu",
				          i, (unsigned long long)got, (unsigned long long)want);
				reused += got > 0;
			}
		}
	}
	CHECK_MSG(reused >= n_reqs / 2, "only %d of %d requests reused blocks", reused, n_reqs);
	lp_engine_free(e);
}

/* A request whose prompt is an earlier request's prompt and output reuses
 * the blocks decode wrote, and continues as the golden does. */
static void test_extend_output(void)
{
	struct lp_err err = {0};
	struct lp_engine *e = new_engine(true, 256, 8u << 20, &err);
	int tested = 0;

	CHECK_MSG(e, "%s", err.msg);
	for (int i = 0; i < n_reqs; i++) {
		const struct req *r = &reqs[i];
		int32_t first[N_GREEDY], rest[N_GREEDY], ids[600];
		const int32_t *pid = ids;
		int k = 20, n_ids = r->n_ids + k, max = N_GREEDY - k;
		CHECK_OK(run_req(e, r, r->adapter, first, &err), &err);
		memcpy(ids, r->ids, (size_t)r->n_ids * sizeof(int32_t));
		memcpy(ids + r->n_ids, r->greedy, (size_t)k * sizeof(int32_t));
		uint64_t before = hits(e);
		CHECK_OK(run(e, &r->adapter, &pid, &n_ids, &max, 1, &rest, &err), &err);
		CHECK_MSG(!memcmp(rest, r->greedy + k, (size_t)max * sizeof(int32_t)),
		          "request %d extended: tokens differ from the golden's continuation", i);
		/* its prompt's blocks and those of the 20 generated tokens but the
		 * last (whose K/V the first run never computed) */
		uint64_t want = (uint64_t)((n_ids - 1) / BS * BS);
		CHECK_MSG(hits(e) - before >= want,
		          "request %d extended: %llu cached, expected %llu", i,
		          (unsigned long long)(hits(e) - before), (unsigned long long)want);
		tested++;
	}
	CHECK(tested == n_reqs);
	lp_engine_free(e);
}

/* The same prompt over the base model and two adapters: each finds only
 * its own blocks, and gives its own golden tokens. */
static void test_adapters_share_nothing(void)
{
	struct lp_err err = {0};
	struct lp_engine *e = new_engine(true, 256, 8u << 20, &err);
	const struct req *r = NULL;

	CHECK_MSG(e, "%s", err.msg);
	/* a prompt the goldens give for r64-mlp and r8-pattern */
	for (int i = 0; i < n_reqs && !r; i++)
		for (int j = 0; j < n_reqs; j++)
			if (reqs[i].adapter && reqs[j].adapter &&
			    strcmp(reqs[i].adapter, reqs[j].adapter) && reqs[i].n_ids >= 3 * BS &&
			    reqs[i].n_ids == reqs[j].n_ids &&
			    !memcmp(reqs[i].ids, reqs[j].ids, (size_t)reqs[i].n_ids * 4)) {
				r = &reqs[i];
				const struct req *o = &reqs[j];
				int32_t a[N_GREEDY], b[N_GREEDY], base[N_GREEDY];
				uint64_t h0 = hits(e);
				CHECK_OK(run_req(e, r, r->adapter, a, &err), &err);
				CHECK_OK(run_req(e, o, o->adapter, b, &err), &err);
				CHECK_OK(run_req(e, r, NULL, base, &err), &err);
				CHECK_MSG(hits(e) == h0, "%llu tokens were shared across adapters",
				          (unsigned long long)(hits(e) - h0));
				CHECK(!memcmp(a, r->greedy, sizeof(a)));
				CHECK(!memcmp(b, o->greedy, sizeof(b)));
				/* and each finds its own the second time */
				CHECK_OK(run_req(e, o, o->adapter, b, &err), &err);
				CHECK(hits(e) > h0);
				CHECK(!memcmp(b, o->greedy, sizeof(b)));
				break;
			}
	CHECK_MSG(r, "the mixed golden has no prompt shared by two adapters");
	lp_engine_free(e);
}

/* After load_inplace the old version's blocks are never found: the new
 * weights' request computes everything and gives the new golden tokens. */
static void test_inplace_reload_forgets(void)
{
	struct lp_err err = {0};
	struct lp_engine *e = new_engine(true, 256, 8u << 20, &err);
	const struct req *old_r = NULL, *new_r = NULL;

	CHECK_MSG(e, "%s", err.msg);
	for (int i = 0; i < n_reqs; i++)
		for (int j = 0; j < n_reqs; j++)
			if (!old_r && reqs[i].adapter && reqs[j].adapter &&
			    !strcmp(reqs[i].adapter, "r16-attn") &&
			    !strcmp(reqs[j].adapter, "r8-all") && reqs[i].n_ids >= 2 * BS &&
			    reqs[j].n_ids >= 2 * BS) {
				old_r = &reqs[i];
				new_r = &reqs[j];
			}
	CHECK_MSG(old_r, "the mixed golden needs r16-attn and r8-all requests");
	int32_t t[N_GREEDY];
	CHECK_OK(load_adapter(e, "x", "r16-attn", false, &err), &err);
	/* both prompts computed on the old weights, cached under "x" */
	CHECK_OK(run_req(e, old_r, "x", t, &err), &err);
	CHECK(!memcmp(t, old_r->greedy, sizeof(t)));
	CHECK_OK(run_req(e, new_r, "x", t, &err), &err);
	CHECK_OK(load_adapter(e, "x", "r8-all", true, &err), &err);
	uint64_t h0 = hits(e);
	CHECK_OK(run_req(e, new_r, "x", t, &err), &err);
	CHECK_MSG(hits(e) == h0, "the new version found %llu tokens of the old one",
	          (unsigned long long)(hits(e) - h0));
	CHECK_MSG(!memcmp(t, new_r->greedy, sizeof(t)), "the reloaded adapter gave old tokens");
	lp_engine_free(e);
}

/* A cache of 40 blocks (160 positions) for the whole batch: sequences are preempted,
 * recomputed (from cached blocks where they survived), and every one still
 * gives its golden tokens; caching off gives the same and finds nothing. */
static void test_preemption(void)
{
	const struct lp_model_config *c = &tiny->cfg;
	size_t block =
	    lp_kv_cache_block_bytes(c->n_layers, c->n_kv_heads * c->head_dim, BS, LP_DTYPE_F32);
	const char *adapters[MAX_REQ];
	const int32_t *ids[MAX_REQ];
	int n_ids[MAX_REQ], max[MAX_REQ];
	static int32_t out[2][MAX_REQ][N_GREEDY];

	for (int i = 0; i < n_reqs; i++) {
		adapters[i] = reqs[i].adapter;
		ids[i] = reqs[i].ids;
		n_ids[i] = reqs[i].n_ids;
		max[i] = N_GREEDY;
	}
	for (int on = 0; on < 2; on++) {
		struct lp_err err = {0};
		struct lp_engine *e = new_engine(on, 96, block * 40, &err);
		struct lp_engine_stats st;
		CHECK_MSG(e, "%s", err.msg);
		CHECK_OK(run(e, adapters, ids, n_ids, max, n_reqs, out[on], &err), &err);
		lp_engine_stats(e, &st);
		CHECK_MSG(st.preemptions > 0, "caching %s: no preemption", on ? "on" : "off");
		if (!on)
			CHECK_EQ_INT(st.prefix_hits, 0);
		lp_engine_free(e);
		for (int i = 0; i < n_reqs; i++)
			CHECK_MSG(!memcmp(out[on][i], reqs[i].greedy, sizeof(out[on][i])),
			          "caching %s: request %d differs from its golden",
			          on ? "on" : "off", i);
	}
}

int main(void)
{
	struct lp_err err = {0};
	char path[512];

	TEST_MAIN_BEGIN("test-prefix-cache");
	if (lp_backend_cpu_new(&be, 0, &err)) {
		printf("FAIL test-prefix-cache:backend: %s\n", err.msg);
		return 1;
	}
	snprintf(path, sizeof(path), "%s/tiny-llama", test_fixtures_dir());
	if (lp_model_load(&tiny, path, be, &err)) {
		printf("FAIL test-prefix-cache:model: %s\n", err.msg);
		return 1;
	}
	if (read_reqs()) {
		printf("FAIL test-prefix-cache:goldens: cannot read lora-tiny-mixed.json\n");
		return 1;
	}
	RUN(test_allocator);
	RUN(test_allocator_random);
	RUN(test_requests_twice);
	RUN(test_extend_output);
	RUN(test_adapters_share_nothing);
	RUN(test_inplace_reload_forgets);
	RUN(test_preemption);
	lp_model_free(tiny);
	lp_backend_destroy(be);
	TEST_MAIN_END();
}
