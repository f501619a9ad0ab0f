/* The whole engine on the CUDA backend, run through our CUDA emulation on
 * the CPU (GEMMs by the reference route), against the CPU backend: the
 * tiny Llama, SmolLM2 and the tiny Qwen3 (per-head q/k norms, head_dim
 * 32 with hidden 64), with and without adapters, alone and in mixed
 * batches.
 *
 * What must hold, and why:
 *   - CUDA alone vs the CPU. CUDA keeps weights in f16 (bf16 for bf16
 *     files), feeds GEMMs half-precision activations and keeps the KV cache
 *     in f16, where the CPU keeps the file's blocks and f32 throughout, so
 *     the logits differ by more than the CPU goldens' 1e-3 of their range:
 *     TOL_REL of the range is allowed (the figures measured are printed).
 *     Greedy tokens must be equal up to the first position where the CPU's
 *     top-2 logit margin is below TOL_REL of the range (there a rounding
 *     difference may legitimately flip the argmax); from there on the two
 *     runs follow different texts and are not compared.
 *   - CUDA mixed batch vs CUDA alone: exactly the same tokens and logits,
 *     bit for bit (same kernels, every row's arithmetic independent of the
 *     other rows).
 *   - The CPU with an f16 KV cache (the CUDA cache type) is compared too,
 *     to show how much of the difference the cache type alone makes. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdint.h>

extern "C" {
#include "agent/engine/engine.h"
#include "agent/engine/grammar.h"
#include "agent/engine/sampler.h"
#include "agent/engine/tokenizer.h"
#include "agent/engine/model.h"
int lp_backend_cuda_emu_new(struct lp_backend **out, struct lp_err *err);
}
#include "tests/test.h"

#define TOL_REL   3e-2
#define N_STEPS   16
#define MAX_REQ   24
#define MAX_VOCAB 49152

struct req {
	char adapter[64]; /* "" for the base model */
	int32_t ids[256];
	int n_ids;
};

struct result {
	int32_t tokens[N_STEPS];
	float *logits; /* [N_STEPS][vocab] */
	int n;
};

static struct lp_backend *g_cpu, *g_cuda;
static struct lp_model *g_tiny_cpu, *g_tiny_cuda, *g_smol_cpu, *g_smol_cuda;
static struct req g_reqs[MAX_REQ];
static int g_n_reqs;

static void config(struct lp_engine_config *ec, enum lp_dtype kv)
{
	lp_engine_config_default(ec);
	ec->max_model_len = 256;
	ec->kv_cache_bytes = 32u << 20;
	ec->max_num_seqs = 32;
	ec->max_batched_tokens = 512;
	ec->max_loras = 8;
	ec->kv_type = kv;
	ec->lora_type = LP_DTYPE_F32;
	ec->return_logits = true;
}

static int load_adapters(struct lp_engine *e, const char *dir, struct req *reqs, int n,
                         struct lp_err *err)
{
	for (int i = 0; i < n; i++) {
		char path[512];
		bool already;
		int rc;

		if (!reqs[i].adapter[0])
			continue;
		snprintf(path, sizeof(path), "%s/lora/%s/%s", test_fixtures_dir(), dir,
		         reqs[i].adapter);
		rc = lp_lora_cache_load(lp_engine_loras(e), reqs[i].adapter, path, NULL, NULL,
		                        false, &already, err);
		if (rc)
			return rc;
	}
	return 0;
}

/* Runs reqs[0..n) as one batch, greedy, N_STEPS tokens each; res[i] gets
 * tokens and the logits of every step. */
static int run(struct lp_model *m, enum lp_dtype kv, const char *lora_dir, struct req *reqs, int n,
               struct result *res, struct lp_err *err)
{
	struct lp_engine_config ec;
	struct lp_engine *e = NULL;
	struct lp_seq *seqs[MAX_REQ] = {0};
	int vocab = m->cfg.vocab_size, rc;

	config(&ec, kv);
	if ((rc = lp_engine_new(&e, m, &ec, err)))
		return rc;
	if ((rc = load_adapters(e, lora_dir, reqs, n, err)))
		goto out;
	for (int i = 0; i < n; i++) {
		struct lp_seq_params p;

		memset(&p, 0, sizeof(p));
		p.adapter = reqs[i].adapter[0] ? reqs[i].adapter : NULL;
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
		int n_o;

		if ((rc = lp_engine_step(e, &o, &n_o, err)))
			goto out;
		for (int k = 0; k < n_o; k++) {
			struct result *r = &res[(intptr_t)o[k].seq->user];
			if (r->n < N_STEPS) {
				if (!o[k].logits) {
					rc = lp_errf(err, -EINVAL, "no logits with return_logits");
					goto out;
				}
				memcpy(r->logits + (size_t)r->n * vocab, o[k].logits,
				       (size_t)vocab * sizeof(float));
				r->tokens[r->n++] = o[k].token;
			}
		}
	}
out:
	for (int i = 0; i < n; i++)
		if (seqs[i])
			lp_engine_release(e, seqs[i]);
	lp_engine_free(e);
	return rc;
}

/* The CPU run is the reference: largest logit difference relative to the
 * reference's range over the steps both runs share (up to the first
 * divergence allowed by the margin rule); false (with the reason printed)
 * when a token differs where the reference's top-2 margin is clear. */
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
			return true; /* the argmax may flip here: stop comparing */
		if (ref->tokens[s] != got->tokens[s]) {
			printf("  %s: step %d: token %d, the CPU's %d (margin %.3g of the range)\n",
			       what, s, got->tokens[s], ref->tokens[s], (top1 - top2) / (hi - lo));
			return false;
		}
	}
	return true;
}

static int read_requests(void)
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
		const char *a = json_string_value(json_object_get(v, "adapter"));
		json_t *ids = json_object_get(v, "ids"), *x;
		size_t j;
		struct req *r = &g_reqs[g_n_reqs];

		if (g_n_reqs == MAX_REQ || json_array_size(ids) > 256)
			break;
		memset(r, 0, sizeof(*r));
		snprintf(r->adapter, sizeof(r->adapter), "%s", a ? a : "");
		json_array_foreach(ids, j, x) r->ids[j] = (int32_t)json_integer_value(x);
		r->n_ids = (int)json_array_size(ids);
		g_n_reqs++;
	}
	json_decref(root);
	return g_n_reqs >= 8 ? 0 : -1;
}

static void free_results(struct result *r, int n)
{
	for (int i = 0; i < n; i++) {
		free(r[i].logits);
		r[i].logits = NULL;
	}
}

/* The tiny model, every request alone on both backends (with its
 * adapter, or none). */
static void test_tiny_alone_matches_cpu(void)
{
	static struct result cpu[MAX_REQ], cuda[MAX_REQ], cpu16[MAX_REQ];
	struct lp_err err = {};
	double worst = 0, worst16 = 0, w;
	bool ok = true;
	int vocab = g_tiny_cpu->cfg.vocab_size;

	for (int i = 0; i < g_n_reqs && ok; i++) {
		CHECK_OK(run(g_tiny_cpu, LP_DTYPE_F32, "tiny", &g_reqs[i], 1, &cpu[i], &err), &err);
		CHECK_OK(run(g_tiny_cpu, LP_DTYPE_F16, "tiny", &g_reqs[i], 1, &cpu16[i], &err),
		         &err);
		CHECK_OK(run(g_tiny_cuda, LP_DTYPE_F16, "tiny", &g_reqs[i], 1, &cuda[i], &err),
		         &err);
		ok &= compare(g_reqs[i].adapter[0] ? g_reqs[i].adapter : "base", &cpu[i], &cuda[i],
		              vocab, &w);
		worst = fmax(worst, w);
		compare("cpu f16 kv", &cpu[i], &cpu16[i], vocab, &w);
		worst16 = fmax(worst16, w);
	}
	printf("  tiny, %d requests alone: CUDA (emulated) vs CPU: max |logit diff| = %.3g of the "
	       "range; the CPU with an f16 KV cache alone: %.3g\n",
	       g_n_reqs, worst, worst16);
	free_results(cpu, g_n_reqs);
	free_results(cuda, g_n_reqs);
	free_results(cpu16, g_n_reqs);
	CHECK_MSG(ok, "a greedy token differs where the CPU's margin is clear");
	CHECK_MSG(worst <= TOL_REL, "logits differ by %.3g of the range (tolerance %g)", worst,
	          TOL_REL);
}

/* Every request in one batch, base and adapters mixed, on CUDA: the same
 * bits as each one alone on CUDA. */
static void test_tiny_mixed_equals_alone(void)
{
	static struct result alone[MAX_REQ], mixed[MAX_REQ];
	struct lp_err err = {};
	int vocab = g_tiny_cuda->cfg.vocab_size, bad = -1;

	for (int i = 0; i < g_n_reqs; i++)
		CHECK_OK(run(g_tiny_cuda, LP_DTYPE_F16, "tiny", &g_reqs[i], 1, &alone[i], &err),
		         &err);
	CHECK_OK(run(g_tiny_cuda, LP_DTYPE_F16, "tiny", g_reqs, g_n_reqs, mixed, &err), &err);
	for (int i = 0; i < g_n_reqs && bad < 0; i++)
		if (alone[i].n != mixed[i].n ||
		    memcmp(alone[i].tokens, mixed[i].tokens, sizeof(alone[i].tokens)) ||
		    memcmp(alone[i].logits, mixed[i].logits,
		           (size_t)alone[i].n * vocab * sizeof(float)))
			bad = i;
	free_results(alone, g_n_reqs);
	free_results(mixed, g_n_reqs);
	CHECK_MSG(bad < 0, "request %d (adapter '%s') differs between alone and mixed", bad,
	          bad >= 0 ? g_reqs[bad].adapter : "");
}

/* SmolLM2 (Q4_1 blocks dequantized to f16 on CUDA), base and one adapter,
 * two short prompts each. */
static void test_smollm2_matches_cpu(void)
{
	static struct result cpu[4], cuda[4];
	struct req reqs[4];
	struct lp_err err = {};
	int vocab = g_smol_cpu->cfg.vocab_size;
	double worst = 0, w;
	bool ok = true;
	static const int32_t p0[] = {1, 9690, 42, 6121, 282, 253, 2354, 30};
	static const int32_t p1[] = {504, 3575, 282, 4649, 314, 2114};

	memset(reqs, 0, sizeof(reqs));
	for (int i = 0; i < 4; i++) {
		const int32_t *p = i % 2 ? p1 : p0;
		int n = i % 2 ? 6 : 8;
		memcpy(reqs[i].ids, p, (size_t)n * sizeof(int32_t));
		reqs[i].n_ids = n;
		if (i >= 2)
			snprintf(reqs[i].adapter, sizeof(reqs[i].adapter), "r4-qv");
	}
	CHECK_OK(run(g_smol_cpu, LP_DTYPE_F32, "smollm2", reqs, 4, cpu, &err), &err);
	CHECK_OK(run(g_smol_cuda, LP_DTYPE_F16, "smollm2", reqs, 4, cuda, &err), &err);
	for (int i = 0; i < 4; i++) {
		ok &= compare(i >= 2 ? "smollm2 r4-qv" : "smollm2", &cpu[i], &cuda[i], vocab, &w);
		worst = fmax(worst, w);
	}
	printf("  smollm2, 4 requests in one batch: CUDA (emulated) vs CPU: max |logit diff| = "
	       "%.3g of the range\n",
	       worst);
	free_results(cpu, 4);
	free_results(cuda, 4);
	CHECK_MSG(ok, "a greedy token differs where the CPU's margin is clear");
	CHECK_MSG(worst <= TOL_REL, "logits differ by %.3g of the range (tolerance %g)", worst,
	          TOL_REL);
}

/* A tiny model of test-archs (tests/fixtures/tiny-<arch>), two golden
 * prompts bare and two with its adapter, in one batch on both backends. */
static void arch_matches_cpu(const char *arch)
{
	static struct result cpu[4], cuda[4];
	char name[64];
	struct lp_backend *bes[2] = {g_cpu, g_cuda};
	struct lp_model *m[2] = {NULL, NULL};
	struct req reqs[4];
	struct lp_err err = {};
	char path[512];
	json_error_t jerr;
	json_t *root;
	double worst = 0, w;
	bool ok = true;

	snprintf(path, sizeof(path), "%s/goldens/tiny-%s-lora.json", test_fixtures_dir(), arch);
	root = json_load_file(path, 0, &jerr);
	CHECK_MSG(root, "%s: %s", path, jerr.text);
	memset(reqs, 0, sizeof(reqs));
	for (int i = 0; i < 4; i++) {
		json_t *ids = json_object_get(
		           json_array_get(json_object_get(root, "prompts"), i / 2), "ids"),
		       *x;
		size_t j;

		json_array_foreach(ids, j, x) if (j < 256) reqs[i].ids[j] =
		    (int32_t)json_integer_value(x);
		reqs[i].n_ids = (int)(json_array_size(ids) < 256 ? json_array_size(ids) : 256);
		if (i % 2)
			snprintf(reqs[i].adapter, sizeof(reqs[i].adapter), "r8-all");
	}
	json_decref(root);
	CHECK(reqs[0].n_ids > 0 && reqs[2].n_ids > 0);
	snprintf(path, sizeof(path), "%s/tiny-%s", test_fixtures_dir(), arch);
	for (int b = 0; b < 2; b++)
		if (lp_model_load(&m[b], path, bes[b], &err)) {
			lp_model_free(m[0]);
			CHECK_MSG(0, "%s", err.msg);
		}
	snprintf(name, sizeof(name), "tiny-%s", arch);
	if (run(m[0], LP_DTYPE_F32, name, reqs, 4, cpu, &err) ||
	    run(m[1], LP_DTYPE_F16, name, reqs, 4, cuda, &err)) {
		lp_model_free(m[0]);
		lp_model_free(m[1]);
		free_results(cpu, 4);
		free_results(cuda, 4);
		CHECK_MSG(0, "%s", err.msg);
	}
	for (int i = 0; i < 4; i++) {
		ok &= compare(i % 2 ? "with r8-all" : "bare", &cpu[i], &cuda[i],
		              m[0]->cfg.vocab_size, &w);
		worst = fmax(worst, w);
	}
	printf("  tiny-%s, 4 requests in one batch: CUDA (emulated) vs CPU: max |logit diff| = "
	       "%.3g of the range\n",
	       arch, worst);
	lp_model_free(m[0]);
	lp_model_free(m[1]);
	free_results(cpu, 4);
	free_results(cuda, 4);
	CHECK_MSG(ok, "a greedy token differs where the CPU's margin is clear");
	CHECK_MSG(worst <= TOL_REL, "logits differ by %.3g of the range (tolerance %g)", worst,
	          TOL_REL);
}

/* Qwen3: q/k RMSNorm over one row per head */
static void test_qwen3_matches_cpu(void)
{
	arch_matches_cpu("qwen3");
}

/* Gemma 3: GeGLU, the embedding scale, post norms, the local layers' RoPE
 * table and a window shorter than the prompts */
static void test_gemma3_matches_cpu(void)
{
	arch_matches_cpu("gemma3");
}

/* The device's sample op through the engine: greedy with every penalty
 * (and, with bias, a logit bias: alone on the first sequence, with
 * penalties on the others, +100 forcing a token on the last) gives, at
 * each step, the argmax of the raw logits (returned by return_logits)
 * biased and penalised by the host sampler's rule; the logprobs asked for
 * equal those of the raw logits. */
static void check_device_sampling(bool bias)
{
	struct lp_engine_config ec;
	struct lp_engine *e = NULL;
	struct lp_seq *seqs[4] = {0};
	struct lp_sampler ref[4];
	struct lp_err err = {};
	int vocab = g_tiny_cuda->cfg.vocab_size, steps = 0, bad_tok = -1, bad_lp = -1;

	config(&ec, LP_DTYPE_F16);
	CHECK_OK(lp_engine_new(&e, g_tiny_cuda, &ec, &err), &err);
	for (int i = 0; i < 4; i++) {
		struct lp_seq_params p;

		memset(&p, 0, sizeof(p));
		p.prompt = g_reqs[i].ids;
		p.n_prompt = (size_t)g_reqs[i].n_ids;
		p.max_tokens = 24;
		p.ignore_eos = true;
		p.logprobs = true;
		p.top_logprobs = 5;
		lp_sampling_params_default(&p.sampling);
		p.sampling.temperature = 0;
		p.sampling.repetition_penalty = i & 1 ? 1.5f : 1.0f;
		p.sampling.frequency_penalty = i & 2 ? 0.7f : 0.0f;
		p.sampling.presence_penalty = i == 3 ? -0.4f : 0.5f;
		if (bias) {
			struct lp_logit_bias *b = p.sampling.logit_bias;

			if (i == 0) /* the bias alone */
				p.sampling.presence_penalty = 0.0f;
			b[0] = lp_logit_bias{(7 * i + 3) % vocab, 3.5f};
			b[1] = lp_logit_bias{g_reqs[i].ids[0], -100.0f};
			b[2] = lp_logit_bias{(100 + i) % vocab, i == 3 ? 100.0f : -2.0f};
			p.sampling.n_logit_bias = 3;
		}
		CHECK_OK(lp_engine_add(e, &p, &seqs[i], &err), &err);
		seqs[i]->user = (void *)(intptr_t)i;
		CHECK_OK(lp_sampler_init(&ref[i], &p.sampling, vocab, &err), &err);
		lp_sampler_set_prompt(&ref[i], p.prompt, p.n_prompt);
	}
	float *row = (float *)malloc((size_t)vocab * sizeof(float));
	CHECK(row != NULL);
	while (lp_engine_has_work(e) && bad_tok < 0 && bad_lp < 0) {
		const struct lp_step_output *o;
		int n_o;

		CHECK_OK(lp_engine_step(e, &o, &n_o, &err), &err);
		for (int k = 0; k < n_o; k++) {
			int i = (int)(intptr_t)o[k].seq->user;
			float lp, tlp[5];
			int32_t tid[5];
			int nt;

			memcpy(row, o[k].logits, (size_t)vocab * sizeof(float));
			lp_logprobs(row, vocab, o[k].token, 5, &lp, tid, tlp, &nt);
			if (fabsf(lp - o[k].logprob) > 1e-5f || nt != o[k].n_top ||
			    memcmp(tid, o[k].top_ids, sizeof(tid)))
				bad_lp = steps;
			if (lp_sampler_sample(&ref[i], row) != o[k].token)
				bad_tok = steps;
			lp_sampler_accept(&ref[i], o[k].token);
		}
		steps++;
	}
	for (int i = 0; i < 4; i++) {
		lp_engine_release(e, seqs[i]);
		lp_sampler_release(&ref[i]);
	}
	lp_engine_free(e);
	free(row);
	CHECK_MSG(bad_tok < 0, "step %d: the device's token is not the penalised argmax", bad_tok);
	CHECK_MSG(bad_lp < 0, "step %d: logprobs differ from the raw logits'", bad_lp);
}

static void test_device_sampling_with_penalties(void)
{
	check_device_sampling(false);
}

static void test_device_sampling_with_logit_bias(void)
{
	check_device_sampling(true);
}

/* Constrained decoding on the device: the engine uploads each constrained
 * row's mask and runs mask_logits before the sample op. Four sequences on
 * the emulated CUDA engine (greedy, sampled, greedy with penalties, and
 * one unconstrained): at every step the returned logits are -inf exactly where
 * a reference matcher's mask forbids, a greedy row's token is the host
 * sampler's pick from that row (penalties included) and a sampled row's
 * an allowed one, the logprob is the constrained one, and every finished
 * output is in the grammar. */
static void test_device_constrained_decoding(void)
{
	static const char *G = "root ::= \"{\\\"a\\\": \" [0-9]{1,3} \", \\\"b\\\": \\\"\" "
	                       "[a-z ]{0,12} \"\\\"}\"";
	struct lp_model *m = g_tiny_cuda;
	int vocab = m->cfg.vocab_size, steps = 0, bad = -1;
	const char *why = "";
	struct lp_grammar *g = NULL, *g_ref = NULL; /* a grammar's masks serve one vocabulary */
	struct lp_grammar_vocab *v = NULL;
	struct lp_grammar_matcher *ref_m[4] = {0};
	struct lp_sampler ref_s[4];
	struct lp_seq *seqs[4] = {0};
	struct lp_engine_config ec;
	struct lp_engine *e = NULL;
	struct lp_err err = {};
	uint32_t *mask = NULL;
	float *row = (float *)malloc((size_t)vocab * sizeof(float));
	char out[4][1024];
	size_t out_n[4] = {0};

	CHECK(row != NULL);
	CHECK_OK(lp_grammar_parse(&g, G, strlen(G), &err), &err);
	CHECK_OK(lp_grammar_parse(&g_ref, G, strlen(G), &err), &err);
	CHECK_OK(lp_grammar_vocab_new(&v, m->tok, vocab, m->cfg.eos_ids, m->cfg.n_eos, &err), &err);
	mask = (uint32_t *)calloc(lp_grammar_vocab_mask_words(v), sizeof(uint32_t));
	CHECK(mask != NULL);
	config(&ec, LP_DTYPE_F16);
	CHECK_OK(lp_engine_new(&e, m, &ec, &err), &err);
	for (int i = 0; i < 4; i++) {
		struct lp_seq_params p;

		memset(&p, 0, sizeof(p));
		p.prompt = g_reqs[i].ids;
		p.n_prompt = (size_t)g_reqs[i].n_ids;
		p.max_tokens = 48;
		p.logprobs = true;
		p.top_logprobs = 3;
		p.grammar = i < 3 ? g : NULL;
		lp_sampling_params_default(&p.sampling);
		p.sampling.temperature = i == 1 ? 0.9f : 0.0f;
		p.sampling.has_seed = true;
		p.sampling.seed = 40 + (uint64_t)i;
		if (i == 2) {
			p.sampling.frequency_penalty = 0.5f;
			p.sampling.repetition_penalty = 1.3f;
		}
		CHECK_OK(lp_engine_add(e, &p, &seqs[i], &err), &err);
		seqs[i]->user = (void *)(intptr_t)i;
		CHECK_OK(lp_sampler_init(&ref_s[i], &p.sampling, vocab, &err), &err);
		lp_sampler_set_prompt(&ref_s[i], p.prompt, p.n_prompt);
		if (i < 3)
			CHECK_OK(lp_grammar_matcher_new(&ref_m[i], g_ref, &err), &err);
	}
	while (lp_engine_has_work(e) && bad < 0) {
		const struct lp_step_output *o;
		int n_o;

		CHECK_OK(lp_engine_step(e, &o, &n_o, &err), &err);
		for (int k = 0; k < n_o && bad < 0; k++) {
			int i = (int)(intptr_t)o[k].seq->user;
			float lp, tlp[3];
			int32_t tid[3];
			int nt, nb;

			if (i < 3) {
				CHECK_OK(lp_grammar_matcher_fill_mask(ref_m[i], v, mask, &err),
				         &err);
				for (int t = 0; t < vocab; t++)
					if (((mask[t >> 5] >> (t & 31)) & 1) !=
					    (o[k].logits[t] != -INFINITY)) {
						bad = steps;
						why = "the row's -inf are not the mask's zeros";
					}
			}
			memcpy(row, o[k].logits, (size_t)vocab * sizeof(float));
			lp_logprobs(row, vocab, o[k].token, 3, &lp, tid, tlp, &nt);
			if (fabsf(lp - o[k].logprob) > 1e-5f) {
				bad = steps;
				why = "the logprob is not the constrained one";
			}
			/* greedy rows: the host sampler's pick; the sampled one
			 * (the device's fixed-point draw) an allowed token */
			if (i != 1 && lp_sampler_sample(&ref_s[i], row) != o[k].token) {
				bad = steps;
				why = "the token is not the host sampler's";
			}
			if (row[o[k].token] == -INFINITY) {
				bad = steps;
				why = "a forbidden token was sampled";
			}
			lp_sampler_accept(&ref_s[i], o[k].token);
			if (i < 3 && !lp_model_is_eos(m, o[k].token)) {
				CHECK_OK(
				    lp_grammar_matcher_accept_token(ref_m[i], v, o[k].token, &err),
				    &err);
				nb = lp_detok_token_bytes(m->tok, o[k].token,
				                          (unsigned char *)out[i] + out_n[i],
				                          sizeof(out[i]) - out_n[i]);
				CHECK(nb >= 0);
				out_n[i] += (size_t)nb;
			}
			if (i < 3 && o[k].finished && o[k].seq->finish == LP_FINISH_STOP &&
			    lp_grammar_match(g, out[i], out_n[i]) != 1) {
				bad = steps;
				why = "a finished output is not in the grammar";
			}
		}
		steps++;
	}
	for (int i = 0; i < 4; i++) {
		lp_engine_release(e, seqs[i]);
		lp_sampler_release(&ref_s[i]);
		lp_grammar_matcher_free(ref_m[i]);
	}
	lp_engine_free(e);
	lp_grammar_vocab_free(v);
	lp_grammar_unref(g);
	lp_grammar_unref(g_ref);
	free(mask);
	free(row);
	CHECK_MSG(bad < 0, "step %d: %s", bad, why);
	CHECK(steps > 4);
}

int main(void)
{
	struct lp_err err = {};
	char path[512];
	const char *smol = getenv("MODEL");

	TEST_MAIN_BEGIN("test-engine-cuda");
	snprintf(path, sizeof(path), "%s/tiny-llama", test_fixtures_dir());
	if (lp_backend_cpu_new(&g_cpu, 0, &err) || lp_backend_cuda_emu_new(&g_cuda, &err) ||
	    lp_model_load(&g_tiny_cpu, path, g_cpu, &err) ||
	    lp_model_load(&g_tiny_cuda, path, g_cuda, &err) ||
	    lp_model_load(&g_smol_cpu, smol ? smol : "models/smollm2-135m-instruct-q4_1.gguf",
	                  g_cpu, &err) ||
	    lp_model_load(&g_smol_cuda, smol ? smol : "models/smollm2-135m-instruct-q4_1.gguf",
	                  g_cuda, &err)) {
		printf("FAIL test-engine-cuda:setup: %s\n", err.msg);
		return 1;
	}
	if (read_requests()) {
		printf("FAIL test-engine-cuda:setup: cannot read lora-tiny-mixed.json\n");
		return 1;
	}
	RUN(test_tiny_alone_matches_cpu);
	RUN(test_tiny_mixed_equals_alone);
	RUN(test_smollm2_matches_cpu);
	RUN(test_qwen3_matches_cpu);
	RUN(test_gemma3_matches_cpu);
	RUN(test_device_sampling_with_penalties);
	RUN(test_device_sampling_with_logit_bias);
	RUN(test_device_constrained_decoding);
	lp_model_free(g_tiny_cpu);
	lp_model_free(g_tiny_cuda);
	lp_model_free(g_smol_cpu);
	lp_model_free(g_smol_cuda);
	lp_backend_destroy(g_cpu);
	lp_backend_destroy(g_cuda);
	TEST_MAIN_END();
}
