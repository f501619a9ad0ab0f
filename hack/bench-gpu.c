/* make bench-gpu: the engine on a CUDA device.
 *
 *   decode tokens/s at batch 1, 16, 64 and 256, on the default model and on
 *     a Llama-3-8B-shaped model with random f16 weights (no download);
 *   the same at batch 64 over 8 and 64 rank-16 adapters, and its ratio to
 *     the base model (target >= 0.9);
 *   batch-1 decode's effective memory bandwidth (weights and KV read per
 *     token over the time per token) as a fraction of the device's peak
 *     (target >= 0.7);
 *   prefill tokens/s of one 2048-token prompt;
 *   kernel launches and bytes uploaded per decode step.
 *
 * Without a device it prints "no GPU: <why>" and exits 0. --emulated runs
 * the CUDA backend through our emulation on the CPU instead (make bench
 * does, on the tiny model): only the launch and upload counts mean
 * anything there. */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "agent/adapters/lora.h"
#include "agent/engine/engine.h"
#include "agent/engine/model.h"

#define MAX_BATCH    256
#define DECODE_STEPS 32
#define PROMPT_LEN   32

int lp_backend_cuda_emu_new(struct lp_backend **out, struct lp_err *err);

static double now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* A rank-r adapter on every target of every layer, random f16 weights. */
static struct lp_lora *random_lora(const struct lp_lora_shape *sh, int r, uint64_t seed)
{
	struct lp_lora *l = calloc(1, sizeof(*l));
	size_t per_layer = 0, off = 0;
	uint64_t st = seed;

	if (!l)
		return NULL;
	for (int t = 0; t < LP_LORA_N_TARGETS; t++) {
		int in, out;
		lp_lora_target_dims(sh, (enum lp_lora_target)t, &in, &out);
		per_layer += (size_t)r * (size_t)(in + out);
	}
	l->n_layers = sh->n_layers;
	l->max_rank = r;
	l->targets = (1u << LP_LORA_N_TARGETS) - 1;
	l->format = "random";
	l->pairs = calloc((size_t)sh->n_layers * LP_LORA_N_TARGETS, sizeof(*l->pairs));
	l->stacks = calloc((size_t)sh->n_layers * LP_LORA_N_GROUPS, sizeof(*l->stacks));
	l->data_bytes = per_layer * sh->n_layers * sizeof(uint16_t);
	l->data = malloc(l->data_bytes);
	if (!l->pairs || !l->stacks || !l->data) {
		lp_lora_free(l);
		return NULL;
	}
	for (size_t i = 0; i < l->data_bytes / 2; i++) {
		st = st * 6364136223846793005ull + 1442695040888963407ull;
		((uint16_t *)l->data)[i] =
		    lp_f32_to_f16(((float)(st >> 40) / 16777216.0f - 0.5f) * 0.02f);
	}
	for (int layer = 0; layer < sh->n_layers; layer++) {
		/* A of every target first, in target order, so that a group's
		 * A are one stacked matrix; then the B */
		for (int t = 0; t < LP_LORA_N_TARGETS; t++) {
			struct lp_lora_pair *p = lp_lora_pair_at(l, layer, (enum lp_lora_target)t);
			int in, out;
			lp_lora_target_dims(sh, (enum lp_lora_target)t, &in, &out);
			p->rank = r;
			p->a = (uint16_t *)l->data + off;
			p->a_type = LP_DTYPE_F16;
			off += (size_t)r * in;
		}
		for (int t = 0; t < LP_LORA_N_TARGETS; t++) {
			struct lp_lora_pair *p = lp_lora_pair_at(l, layer, (enum lp_lora_target)t);
			int in, out;
			lp_lora_target_dims(sh, (enum lp_lora_target)t, &in, &out);
			p->b = (uint16_t *)l->data + off;
			p->b_type = LP_DTYPE_F16;
			off += (size_t)r * out;
		}
		for (int g = 0; g < LP_LORA_N_GROUPS; g++) {
			struct lp_lora_stack *s = lp_lora_stack_at(l, layer, (enum lp_lora_group)g);
			int first, count;
			lp_lora_group_targets((enum lp_lora_group)g, &first, &count);
			s->rank = r * count;
			s->a = lp_lora_pair_at(l, layer, (enum lp_lora_target)first)->a;
			s->type = LP_DTYPE_F16;
		}
	}
	return l;
}

struct run {
	double decode_tps;    /* decode tokens/s */
	double step_s;        /* seconds per decode step */
	double launches;      /* per decode step */
	double upload_bytes;  /* per decode step */
	double graph_replays; /* per decode step */
};

/* batch sequences decoding together over n_adapters rank-16 adapters (0:
 * the base model): prefill first, then DECODE_STEPS timed steps. */
static int run_decode(struct lp_model *m, int batch, int n_adapters, struct run *out,
                      struct lp_err *err)
{
	struct lp_engine_config ec;
	struct lp_engine *e = NULL;
	struct lp_seq *seqs[MAX_BATCH] = {0};
	struct lp_backend_info a, b;
	int32_t prompt[PROMPT_LEN];
	char names[64][16];
	int rc, started = 0, steps = 0, tokens = 0;
	double t0 = 0;

	lp_engine_config_default(&ec);
	ec.max_model_len = 1024;
	ec.max_num_seqs = batch;
	ec.max_batched_tokens = batch * PROMPT_LEN > 2048 ? batch * PROMPT_LEN : 2048;
	ec.max_loras = n_adapters > 8 ? n_adapters : 8;
	ec.max_cpu_loras = ec.max_loras;
	ec.max_lora_rank = 16;
	if ((rc = lp_engine_new(&e, m, &ec, err)))
		return rc;
	for (int i = 0; i < n_adapters; i++) {
		struct lp_lora *l =
		    random_lora(lp_lora_cache_shape(lp_engine_loras(e)), 16, (uint64_t)i + 1);
		bool already;
		snprintf(names[i], sizeof(names[i]), "r16-%d", i);
		if (!l) {
			rc = lp_errf(err, -ENOMEM, "out of memory for adapter %d", i);
			goto out;
		}
		if ((rc = lp_lora_cache_install(lp_engine_loras(e), names[i], "", NULL, NULL, NULL,
		                                l, 0, false, &already, err)))
			goto out;
	}
	for (int i = 0; i < PROMPT_LEN; i++)
		prompt[i] = (int32_t)((i * 7919 + 11) % m->cfg.vocab_size);
	for (int i = 0; i < batch; i++) {
		struct lp_seq_params p;
		memset(&p, 0, sizeof(p));
		p.adapter = n_adapters ? names[i % n_adapters] : NULL;
		p.prompt = prompt;
		p.n_prompt = PROMPT_LEN;
		p.max_tokens = DECODE_STEPS + 2;
		p.ignore_eos = true;
		lp_sampling_params_default(&p.sampling);
		p.sampling.temperature = 0;
		if ((rc = lp_engine_add(e, &p, &seqs[i], err)))
			goto out;
	}
	while (lp_engine_has_work(e) && steps < DECODE_STEPS) {
		const struct lp_step_output *o;
		int n_o;
		if ((rc = lp_engine_step(e, &o, &n_o, err)))
			goto out;
		if (started < batch) {
			for (int k = 0; k < n_o; k++)
				started += o[k].seq->n_tokens == o[k].seq->n_prompt + 1;
			if (started == batch) {
				/* every sequence decodes from here on */
				t0 = now_s();
				lp_engine_model(e)->be->ops->info(lp_engine_model(e)->be->ctx, &a);
			}
			continue;
		}
		steps++;
		tokens += n_o;
	}
	{
		double dt = now_s() - t0;
		lp_engine_model(e)->be->ops->info(lp_engine_model(e)->be->ctx, &b);
		out->decode_tps = tokens / dt;
		out->step_s = dt / (steps ? steps : 1);
		out->launches = (double)(b.launches - a.launches) / (steps ? steps : 1);
		out->upload_bytes = (double)(b.upload_bytes - a.upload_bytes) / (steps ? steps : 1);
		out->graph_replays =
		    (double)(b.graph_replays - a.graph_replays) / (steps ? steps : 1);
	}
out:
	for (int i = 0; i < batch; i++)
		if (seqs[i])
			lp_engine_release(e, seqs[i]);
	lp_engine_free(e);
	return rc;
}

/* One prompt of n tokens: prefill tokens/s. */
static int run_prefill(struct lp_model *m, int n, double *tps, struct lp_err *err)
{
	struct lp_engine_config ec;
	struct lp_engine *e = NULL;
	struct lp_seq *s = NULL;
	struct lp_seq_params p;
	int32_t *prompt = malloc((size_t)n * sizeof(int32_t));
	double t0;
	int rc;

	if (!prompt)
		return lp_errf(err, -ENOMEM, "out of memory");
	lp_engine_config_default(&ec);
	ec.max_model_len = n + 16;
	ec.max_num_seqs = 1;
	ec.max_batched_tokens = n;
	if ((rc = lp_engine_new(&e, m, &ec, err))) {
		free(prompt);
		return rc;
	}
	for (int i = 0; i < n; i++)
		prompt[i] = (int32_t)((i * 7919 + 11) % m->cfg.vocab_size);
	memset(&p, 0, sizeof(p));
	p.prompt = prompt;
	p.n_prompt = (size_t)n;
	p.max_tokens = 1;
	p.ignore_eos = true;
	lp_sampling_params_default(&p.sampling);
	p.sampling.temperature = 0;
	/* once for warm-up (first-use costs), once timed */
	for (int round = 0; round < 2 && !rc; round++) {
		if ((rc = lp_engine_add(e, &p, &s, err)))
			break;
		t0 = now_s();
		while (lp_engine_has_work(e) && !rc) {
			const struct lp_step_output *o;
			int n_o;
			rc = lp_engine_step(e, &o, &n_o, err);
		}
		*tps = n / (now_s() - t0);
		lp_engine_release(e, s);
	}
	lp_engine_free(e);
	free(prompt);
	return rc;
}

static void llama3_8b(struct lp_model_config *c)
{
	memset(c, 0, sizeof(*c));
	c->n_layers = 32;
	c->dim = 4096;
	c->n_heads = 32;
	c->n_kv_heads = 8;
	c->head_dim = 128;
	c->ffn_dim = 14336;
	c->vocab_size = 128256;
	c->max_pos = 8192;
	c->rms_eps = 1e-5f;
	c->rope_theta = 500000.0f;
	c->bos_id = 128000;
	c->eos_ids[0] = 128001;
	c->n_eos = 1;
}

static int bench_model(struct lp_model *m, const char *label, bool emulated, struct lp_err *err)
{
	static const int batches[] = {1, 16, 64, 256};
	struct lp_backend_info info;
	struct run base[4], ad8, ad64;
	double prefill = 0;
	int rc;

	m->be->ops->info(m->be->ctx, &info);
	printf("\n%s on %s\n", label, info.device);
	printf("  %-28s %12s %12s %12s %12s\n", "decode", "tokens/s", "ms/step", "launches/step",
	       "bytes up/step");
	for (int i = 0; i < (emulated ? 1 : 4); i++) {
		if ((rc = run_decode(m, batches[i], 0, &base[i], err)))
			return rc;
		printf("  batch %-22d %12.1f %12.3f %12.0f %12.0f%s\n", batches[i],
		       base[i].decode_tps, base[i].step_s * 1e3, base[i].launches,
		       base[i].upload_bytes,
		       base[i].graph_replays > 0.5 ? "  (graph replays)" : "");
	}
	if (emulated)
		return 0;
	if ((rc = run_decode(m, 64, 8, &ad8, err)) || (rc = run_decode(m, 64, 64, &ad64, err)))
		return rc;
	printf("  batch 64, 8 rank-16 adapters %10.1f %12.3f %12.0f %12.0f   ratio to base %.2f "
	       "(target >= 0.9)\n",
	       ad8.decode_tps, ad8.step_s * 1e3, ad8.launches, ad8.upload_bytes,
	       ad8.decode_tps / base[2].decode_tps);
	printf("  batch 64, 64 rank-16 adapters %9.1f %12.3f %12.0f %12.0f   ratio to base %.2f "
	       "(target >= 0.9)\n",
	       ad64.decode_tps, ad64.step_s * 1e3, ad64.launches, ad64.upload_bytes,
	       ad64.decode_tps / base[2].decode_tps);
	{
		/* batch 1: the weights once per token, plus the KV of ~PROMPT_LEN +
		 * DECODE_STEPS / 2 positions */
		double kv = 2.0 * m->cfg.n_layers * m->cfg.n_kv_heads * m->cfg.head_dim * 2.0 *
		            (PROMPT_LEN + DECODE_STEPS / 2);
		double bytes = (double)lp_model_bytes_per_token(m) + kv;
		double bw = bytes / base[0].step_s;
		if (info.peak_bandwidth > 0)
			printf("  batch-1 effective bandwidth %.0f GB/s = %.2f of the device's "
			       "%.0f GB/s "
			       "(target >= 0.7)\n",
			       bw / 1e9, bw / info.peak_bandwidth, info.peak_bandwidth / 1e9);
		else
			printf("  batch-1 effective bandwidth %.0f GB/s (the device's peak is "
			       "unknown)\n",
			       bw / 1e9);
	}
	if ((rc = run_prefill(m, 2048, &prefill, err)))
		return rc;
	printf("  prefill, one 2048-token prompt: %.0f tokens/s\n", prefill);
	return 0;
}

int main(int argc, char **argv)
{
	const char *model = "models/smollm2-135m-instruct-q4_1.gguf";
	bool emulated = false, no_8b = false;
	struct lp_backend *be = NULL;
	struct lp_model *m = NULL;
	struct lp_err err = {0};
	int c, rc;
	static const struct option opts[] = {{"model", required_argument, NULL, 'm'},
	                                     {"emulated", no_argument, NULL, 'e'},
	                                     {"no-8b", no_argument, NULL, 'n'},
	                                     {NULL, 0, NULL, 0}};

	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		if (c == 'm')
			model = optarg;
		else if (c == 'e')
			emulated = true;
		else if (c == 'n')
			no_8b = true;
		else {
			fprintf(stderr, "usage: bench-gpu [--model PATH] [--emulated] [--no-8b]\n");
			return 2;
		}
	}
	rc = emulated ? lp_backend_cuda_emu_new(&be, &err) : lp_backend_cuda_new(&be, 0, &err);
	if (rc) {
		printf("no GPU: %s\n", err.msg);
		return 0;
	}
	if ((rc = lp_model_load(&m, model, be, &err)) ||
	    (rc = bench_model(m, model, emulated, &err)))
		goto fail;
	lp_model_free(m);
	m = NULL;
	if (!emulated && !no_8b) {
		struct lp_model_config cfg;
		llama3_8b(&cfg);
		if ((rc = lp_model_random(&m, &cfg, 1, be, &err)) ||
		    (rc = bench_model(m, "Llama-3-8B shape, random f16 weights", false, &err)))
			goto fail;
		lp_model_free(m);
	}
	lp_backend_destroy(be);
	return 0;
fail:
	fprintf(stderr, "bench-gpu: %s\n", err.msg);
	lp_model_free(m);
	lp_backend_destroy(be);
	return 1;
}
