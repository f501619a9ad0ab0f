/* Sliding-window models on the whole engine with the CUDA backend, run
 * through our CUDA emulation, against the CPU backend: the tiny models of
 * hack/make-window-goldens.py (tiny-mistral-window: every layer windowed,
 * so the engine releases blocks and leaves -1 in their table entries, also
 * in the block tables of captured decode steps; tiny-qwen2-window: layer 0
 * full, layer 1 windowed).
 *
 * As in test-engine-cuda: CUDA keeps f16 weights, activations and KV cache
 * where the CPU keeps f32, so logits may differ by TOL_REL of their range
 * and greedy tokens must agree up to the first step where the CPU's top-2
 * margin is below that; a batch of all prompts on CUDA gives the bits of
 * each prompt alone on CUDA; and with every layer windowed a sequence
 * holds the blocks of its window only. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdint.h>

extern "C" {
#include "agent/engine/engine.h"
#include "agent/engine/model.h"
#include "agent/engine/sampler.h"
int lp_backend_cuda_emu_new(struct lp_backend **out, struct lp_err *err);
}
#include "tests/test.h"

#define TOL_REL 3e-2
#define N_STEPS 32
#define MAX_REQ 8
#define MAX_IDS 256

struct req {
	int32_t ids[MAX_IDS];
	int n_ids;
};

struct result {
	int32_t tokens[N_STEPS];
	float *logits; /* [N_STEPS][vocab] */
	int n;
	int most_blocks; /* largest kv_blocks_used after a step */
};

static struct lp_backend *g_cpu, *g_cuda;
static struct req g_reqs[MAX_REQ];
static int g_n_reqs;

/* Runs reqs[0..n) as one batch on m, greedy, N_STEPS tokens each. */
static int run(struct lp_model *m, enum lp_dtype kv, struct req *reqs, int n, struct result *res,
               struct lp_err *err)
{
	struct lp_engine_config ec;
	struct lp_engine *e = NULL;
	struct lp_seq *seqs[MAX_REQ] = {0};
	int vocab = m->cfg.vocab_size, rc, most = 0;

	lp_engine_config_default(&ec);
	ec.max_model_len = 256;
	ec.kv_cache_bytes = 32u << 20;
	ec.kv_type = kv;
	ec.return_logits = true;
	if ((rc = lp_engine_new(&e, m, &ec, err)))
		return rc;
	for (int i = 0; i < n; i++) {
		struct lp_seq_params p;

		memset(&p, 0, sizeof(p));
		p.prompt = reqs[i].ids;
		p.n_prompt = (size_t)reqs[i].n_ids;
		p.max_tokens = N_STEPS;
		p.ignore_eos = true;
		lp_sampling_params_default(&p.sampling);
		p.sampling.temperature = 0;
		res[i].n = 0;
		if (!res[i].logits)
			res[i].logits = (float *)calloc((size_t)N_STEPS * vocab, sizeof(float));
		if (!res[i].logits) {
			rc = lp_errf(err, -ENOMEM, "out of memory");
			goto out;
		}
		if ((rc = lp_engine_add(e, &p, &seqs[i], err)))
			goto out;
		seqs[i]->user = (void *)(intptr_t)i;
	}
	while (lp_engine_has_work(e)) {
		const struct lp_step_output *o;
		struct lp_engine_stats st;
		int n_o;

		if ((rc = lp_engine_step(e, &o, &n_o, err)))
			goto out;
		for (int k = 0; k < n_o; k++) {
			struct result *r = &res[(intptr_t)o[k].seq->user];
			if (r->n < N_STEPS && o[k].logits) {
				memcpy(r->logits + (size_t)r->n * vocab, o[k].logits,
				       (size_t)vocab * sizeof(float));
				r->tokens[r->n++] = o[k].token;
			}
		}
		lp_engine_stats(e, &st);
		most = st.kv_blocks_used > most ? st.kv_blocks_used : most;
	}
	for (int i = 0; i < n; i++)
		res[i].most_blocks = most;
out:
	for (int i = 0; i < n; i++)
		if (seqs[i])
			lp_engine_release(e, seqs[i]);
	lp_engine_free(e);
	return rc;
}

/* As test-engine-cuda's: false (reason printed) when a token differs where
 * the CPU's top-2 margin is clear; *worst_rel the largest logit difference
 * over the steps compared, relative to the CPU's range. */
static bool compare(const char *what, const struct result *ref, const struct result *got, int vocab,
                    double *worst_rel)
{
	*worst_rel = 0;
	for (int s = 0; s < ref->n && s < got->n; s++) {
		const float *a = ref->logits + (size_t)s * vocab,
		            *b = got->logits + (size_t)s * vocab;
		float lo = INFINITY, hi = -INFINITY, top1 = -INFINITY, top2 = -INFINITY;
		double d = 0;

		for (int t = 0; t < vocab; t++) {
			lo = fminf(lo, a[t]);
			hi = fmaxf(hi, a[t]);
			d = fmax(d, fabs((double)a[t] - (double)b[t]));
			if (a[t] > top1) {
				top2 = top1;
				top1 = a[t];
			} else if (a[t] > top2) {
				top2 = a[t];
			}
		}
		if (d / (hi - lo) > *worst_rel)
			*worst_rel = d / (hi - lo);
		if (top1 - top2 < TOL_REL * (hi - lo))
			return true;
		if (ref->tokens[s] != got->tokens[s]) {
			printf("  %s: step %d: token %d, the CPU's %d (margin %.3g of the range)\n",
			       what, s, got->tokens[s], ref->tokens[s], (top1 - top2) / (hi - lo));
			return false;
		}
	}
	return true;
}

static void free_results(struct result *r, int n)
{
	for (int i = 0; i < n; i++) {
		free(r[i].logits);
		r[i].logits = NULL;
	}
}

/* The batch prompts of goldens/<name>.json. */
static int read_requests(const char *name)
{
	char path[512];
	json_error_t jerr;
	json_t *root, *arr, *v;
	size_t i;

	g_n_reqs = 0;
	snprintf(path, sizeof(path), "%s/goldens/%s.json", test_fixtures_dir(), name);
	root = json_load_file(path, 0, &jerr);
	if (!root)
		return -1;
	arr = json_object_get(json_object_get(root, "batch"), "prompts");
	json_array_foreach(arr, i, v)
	{
		json_t *ids = json_object_get(v, "ids"), *x;
		size_t j;
		struct req *r = &g_reqs[g_n_reqs];

		if (g_n_reqs == MAX_REQ || json_array_size(ids) > MAX_IDS)
			break;
		json_array_foreach(ids, j, x) r->ids[j] = (int32_t)json_integer_value(x);
		r->n_ids = (int)json_array_size(ids);
		g_n_reqs++;
	}
	json_decref(root);
	return g_n_reqs == MAX_REQ ? 0 : -1;
}

/* Every prompt alone on both backends, then all of them in one batch on
 * CUDA. releases: every layer slides, so the longest prompt alone (160
 * tokens, 12 blocks by its end) holds at most 3 blocks after a step. */
static void check_model(const char *name, bool releases)
{
	static struct result cpu[MAX_REQ], cuda[MAX_REQ], mixed[MAX_REQ];
	struct lp_model *m[2] = {NULL, NULL};
	struct lp_backend *bes[2] = {g_cpu, g_cuda};
	struct lp_err err = {};
	char path[512];
	double worst = 0, w;
	bool ok = true;
	int bad = -1, vocab, longest = 0;

	CHECK_MSG(read_requests(name) == 0, "cannot read the batch prompts of %s", name);
	snprintf(path, sizeof(path), "%s/%s", test_fixtures_dir(), name);
	for (int b = 0; b < 2; b++)
		if (lp_model_load(&m[b], path, bes[b], &err)) {
			lp_model_free(m[0]);
			CHECK_MSG(0, "%s", err.msg);
		}
	vocab = m[0]->cfg.vocab_size;
	for (int i = 0; i < g_n_reqs && !err.code; i++) {
		if (run(m[0], LP_DTYPE_F32, &g_reqs[i], 1, &cpu[i], &err) ||
		    run(m[1], LP_DTYPE_F16, &g_reqs[i], 1, &cuda[i], &err))
			break;
		ok &= compare(name, &cpu[i], &cuda[i], vocab, &w);
		worst = fmax(worst, w);
		if (g_reqs[i].n_ids > g_reqs[longest].n_ids)
			longest = i;
	}
	if (!err.code)
		run(m[1], LP_DTYPE_F16, g_reqs, g_n_reqs, mixed, &err);
	for (int i = 0; i < g_n_reqs && bad < 0 && !err.code; i++)
		if (cuda[i].n != N_STEPS || mixed[i].n != N_STEPS ||
		    memcmp(cuda[i].tokens, mixed[i].tokens, sizeof(cuda[i].tokens)) ||
		    memcmp(cuda[i].logits, mixed[i].logits,
		           (size_t)N_STEPS * vocab * sizeof(float)))
			bad = i;
	printf("  %s, %d prompts alone: CUDA (emulated) vs CPU: max |logit diff| = %.3g of the "
	       "range; the %d-token prompt alone held at most %d blocks on CUDA, %d on the CPU\n",
	       name, g_n_reqs, worst, g_reqs[longest].n_ids, cuda[longest].most_blocks,
	       cpu[longest].most_blocks);
	int most = cuda[longest].most_blocks, most_cpu = cpu[longest].most_blocks;
	int table = (g_reqs[longest].n_ids + N_STEPS - 1 + 15) / 16;
	lp_model_free(m[0]);
	lp_model_free(m[1]);
	free_results(cpu, g_n_reqs);
	free_results(cuda, g_n_reqs);
	free_results(mixed, g_n_reqs);
	CHECK_MSG(!err.code, "%s", err.msg);
	CHECK_MSG(ok, "a greedy token differs where the CPU's margin is clear");
	CHECK_MSG(worst <= TOL_REL, "logits differ by %.3g of the range (tolerance %g)", worst,
	          TOL_REL);
	CHECK_MSG(bad < 0, "prompt %d differs between alone and the batch on CUDA", bad);
	CHECK_EQ_INT(most, most_cpu);
	if (releases)
		CHECK_MSG(most <= 3, "%d blocks held", most);
	else
		CHECK_EQ_INT(most, table);
}

static void test_mistral_window(void)
{
	check_model("tiny-mistral-window", true);
}

static void test_qwen2_window(void)
{
	check_model("tiny-qwen2-window", false);
}

int main(void)
{
	struct lp_err err = {};

	TEST_MAIN_BEGIN("test-cuda-attention-window");
	if (lp_backend_cpu_new(&g_cpu, 0, &err) || lp_backend_cuda_emu_new(&g_cuda, &err)) {
		printf("FAIL test-cuda-attention-window:setup: %s\n", err.msg);
		return 1;
	}
	RUN(test_mistral_window);
	RUN(test_qwen2_window);
	lp_backend_destroy(g_cpu);
	lp_backend_destroy(g_cuda);
	TEST_MAIN_END();
}
