/* make bench: speed and memory of the engine on one model, with the
 * machine's memory read bandwidth measured in the same run, so that the
 * batch-1 decode speed can be set against its roofline (bandwidth / bytes of
 * weights read per token), and decode throughput at batches 1 to 32 (the
 * sweep). Prints `bench: NAME VALUE UNIT` lines. --only crossover times
 * the CPU's matrix-vector path against its GEMM per weight type (where
 * kernels/cpu/matmul.c's crossover table comes from); --only prefill stops
 * after the 512-token prompt figure (hack/bench-llamacpp.py); --only
 * grammar times constrained decoding (a json_schema grammar per sequence)
 * against the same requests unconstrained, and the compilation of a
 * 50-property schema. */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "agent/adapters/lora.h"
#include "agent/engine/engine.h"
#include "agent/engine/grammar.h"
#include "agent/engine/json-schema.h"
#include "agent/engine/model.h"
#include "agent/engine/tokenizer.h"
#include "common/err.h"
#include "kernels/cpu/cpu.h"

#define BW_BYTES ((size_t)512 << 20)

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

struct bw_task {
	const unsigned char *p;
	size_t n;
	double sum;
	pthread_barrier_t *bar;
};

/* Reads the slice with 256-bit loads; the sum keeps the loads alive. */
__attribute__((target("avx2"))) static double sum_avx2(const unsigned char *p, size_t n)
{
	typedef long long v4 __attribute__((vector_size(32)));
	v4 a = {0}, b = {0}, c = {0}, d = {0};
	const v4 *q = (const v4 *)p;

	for (size_t i = 0; i + 4 <= n / 32; i += 4) {
		a += q[i];
		b += q[i + 1];
		c += q[i + 2];
		d += q[i + 3];
	}
	a += b + c + d;
	return (double)(a[0] + a[1] + a[2] + a[3]);
}

static double sum_scalar(const unsigned char *p, size_t n)
{
	const unsigned long long *q = (const unsigned long long *)p;
	unsigned long long s = 0;

	for (size_t i = 0; i < n / 8; i++)
		s += q[i];
	return (double)s;
}

static void *bw_worker(void *arg)
{
	struct bw_task *t = arg;

	pthread_barrier_wait(t->bar);
	t->sum = __builtin_cpu_supports("avx2") ? sum_avx2(t->p, t->n) : sum_scalar(t->p, t->n);
	return NULL;
}

/* Best of 5 multi-threaded passes over a buffer far larger than the caches. */
static double measure_bandwidth(int n_threads)
{
	unsigned char *buf = aligned_alloc(64, BW_BYTES);
	pthread_t th[256];
	struct bw_task tasks[256];
	pthread_barrier_t bar;
	double best = 0, sink = 0;

	if (!buf)
		return 0;
	memset(buf, 1, BW_BYTES);
	if (n_threads > 256)
		n_threads = 256;
	for (int rep = 0; rep < 5; rep++) {
		size_t slice = BW_BYTES / (size_t)n_threads / 128 * 128;
		pthread_barrier_init(&bar, NULL, (unsigned)n_threads + 1);
		for (int i = 0; i < n_threads; i++) {
			tasks[i] = (struct bw_task){buf + (size_t)i * slice, slice, 0, &bar};
			pthread_create(&th[i], NULL, bw_worker, &tasks[i]);
		}
		double t0 = now_s();
		pthread_barrier_wait(&bar);
		for (int i = 0; i < n_threads; i++) {
			pthread_join(th[i], NULL);
			sink += tasks[i].sum;
		}
		double dt = now_s() - t0;
		pthread_barrier_destroy(&bar);
		double gbs = (double)slice * n_threads / dt / 1e9;
		if (gbs > best)
			best = gbs;
	}
	free(buf);
	if (sink == 42)
		fputc(' ', stderr);
	return best;
}

/* In a child process, so that its buffer does not count in peak RSS. */
static double measure_bandwidth_isolated(int n_threads)
{
	int fds[2];
	double bw = 0;
	pid_t pid;

	if (pipe(fds) < 0)
		return 0;
	pid = fork();
	if (pid == 0) {
		bw = measure_bandwidth(n_threads);
		if (write(fds[1], &bw, sizeof(bw)) != sizeof(bw))
			_exit(1);
		_exit(0);
	}
	close(fds[1]);
	if (pid < 0 || read(fds[0], &bw, sizeof(bw)) != sizeof(bw))
		bw = 0;
	close(fds[0]);
	if (pid > 0)
		waitpid(pid, NULL, 0);
	return bw;
}

static int add_greedy(struct lp_engine *e, const int32_t *ids, size_t n, int max_tokens,
                      struct lp_seq **out, struct lp_err *err)
{
	struct lp_seq_params p = {0};

	p.prompt = ids;
	p.n_prompt = n;
	p.max_tokens = max_tokens;
	p.ignore_eos = true;
	lp_sampling_params_default(&p.sampling);
	p.sampling.temperature = 0;
	return lp_engine_add(e, &p, out, err);
}

static int run_all(struct lp_engine *e, struct lp_err *err)
{
	const struct lp_step_output *outs;
	int n;

	while (lp_engine_has_work(e))
		if (lp_engine_step(e, &outs, &n, err))
			return -1;
	return 0;
}

/* The largest decode batch measured: the engine runs this many sequences. */
#define SWEEP_MAX 32

/* Time per token of decode with batch (<= SWEEP_MAX) greedy sequences
 * running, each constrained by g (NULL: none): the prompts are prefilled
 * first, then n_steps decode steps are timed (no sequence may end in
 * them). */
static double decode_tps_with(struct lp_engine *e, const int32_t *prompt, int batch, int n_steps,
                              struct lp_grammar *g, struct lp_err *err)
{
	struct lp_seq *seqs[SWEEP_MAX];
	const struct lp_step_output *outs;
	int n;
	double t0, dt;

	for (int i = 0; i < batch; i++) {
		struct lp_seq_params p = {0};
		p.prompt = prompt + i;
		p.n_prompt = 8;
		p.max_tokens = n_steps + 1;
		p.ignore_eos = true;
		p.grammar = g;
		lp_sampling_params_default(&p.sampling);
		p.sampling.temperature = 0;
		if (lp_engine_add(e, &p, &seqs[i], err))
			return -1;
	}
	/* prefill, and the first token of each */
	if (lp_engine_step(e, &outs, &n, err) || n != batch) {
		lp_errf(err, -EIO, "prefill did not finish in one step");
		return -1;
	}
	t0 = now_s();
	for (int s = 0; s < n_steps; s++)
		if (lp_engine_step(e, &outs, &n, err))
			return -1;
	dt = now_s() - t0;
	for (int i = 0; i < batch; i++) {
		if (seqs[i]->n_tokens - seqs[i]->n_prompt != n_steps + 1) {
			lp_errf(err, -EIO, "a sequence ended before the timed steps did");
			return -1;
		}
		lp_engine_release(e, seqs[i]);
	}
	return (double)batch * n_steps / dt;
}

static double decode_tps(struct lp_engine *e, const int32_t *prompt, int batch, int n_steps,
                         struct lp_err *err)
{
	return decode_tps_with(e, prompt, batch, n_steps, NULL, err);
}

/* Prompt tokens per second of one 512-token prefill (one engine step),
 * best of rounds. */
static double prefill_tps(struct lp_engine *e, const int32_t *prompt, int rounds,
                          struct lp_err *err)
{
	double best = 0;

	for (int rep = 0; rep < rounds; rep++) {
		const struct lp_step_output *outs;
		struct lp_seq *seq;
		int n;

		if (add_greedy(e, prompt, 512, 1, &seq, err))
			return -1;
		double t0 = now_s();
		if (lp_engine_step(e, &outs, &n, err))
			return -1;
		double pp = 512 / (now_s() - t0);
		best = pp > best ? pp : best;
		if (run_all(e, err))
			return -1;
		lp_engine_release(e, seq);
	}
	return best;
}

/* ---- decode batch sweep ---- */

static const int sweep_batches[] = {1, 2, 3, 4, 5, 6, 8, 12, 16, 24, SWEEP_MAX};
#define N_SWEEP ((int)(sizeof(sweep_batches) / sizeof(sweep_batches[0])))

/* Decode tokens/s at each batch of sweep_batches, the best of rounds
 * rounds, a round running every batch once (so that the machine's other
 * load falls on all of them alike); 32 timed steps per batch. Prints one
 * line per batch and whether the throughput rises at every step. */
static int bench_sweep(struct lp_engine *e, const int32_t *prompt, int rounds, struct lp_err *err)
{
	double best[N_SWEEP] = {0};
	bool rising = true;

	for (int r = 0; r < rounds; r++) {
		for (int i = 0; i < N_SWEEP; i++) {
			double tps = decode_tps(e, prompt, sweep_batches[i], 32, err);
			if (tps < 0)
				return -1;
			if (tps > best[i])
				best[i] = tps;
		}
	}
	for (int i = 0; i < N_SWEEP; i++) {
		printf("bench: decode_sweep_batch%d_tokens_per_s %.1f tokens/s\n", sweep_batches[i],
		       best[i]);
		rising &= i == 0 || best[i] > best[i - 1];
	}
	printf("bench: decode_sweep_rising %d bool\n", rising);
	fflush(stdout);
	return 0;
}

/* ---- the matrix-vector / GEMM crossover ---- */

/* The matrices of one decode step of model m, whatever their type. */
struct step_mat {
	int64_t k, m;
};

static int step_mats(const struct lp_model *m, struct step_mat *out, int cap)
{
	const struct lp_model_config *c = &m->cfg;
	int64_t q = (int64_t)c->n_heads * c->head_dim, kv = (int64_t)c->n_kv_heads * c->head_dim;
	const struct step_mat layer[7] = {
	    {c->dim, q},          {c->dim, kv},         {c->dim, kv},        {q, c->dim},
	    {c->dim, c->ffn_dim}, {c->dim, c->ffn_dim}, {c->ffn_dim, c->dim}};
	int n = 0;

	for (int l = 0; l < c->n_layers && n + 8 <= cap; l++)
		for (int i = 0; i < 7; i++)
			out[n++] = layer[i];
	out[n++] = (struct step_mat){c->dim, c->vocab_size};
	return n;
}

/* Bytes that dequantize to small finite weights in type t: a constant
 * pattern, block scales of about 1e-3 (f16 0x1111). */
static void fill_mat(enum lp_dtype t, unsigned char *p, size_t bytes)
{
	memset(p, t == LP_DTYPE_F16 ? 0x20 : t == LP_DTYPE_BF16 ? 0x3b : 0x11, bytes);
	if (t == LP_DTYPE_F32)
		for (size_t i = 0; i + 4 <= bytes; i += 4)
			memcpy(p + i, &(float){0.01f}, 4);
}

/* For each weight type the CPU has a measured crossover for, the matmuls
 * of one decode step of model m's shapes (synthetic weights of that type)
 * at n rows, on a backend forced to the matrix-vector path and on one
 * forced to the GEMM (LP_CPU_MATVEC_BATCH), interleaved, best of rounds;
 * in rows of x per second (decode tokens/s without the other ops). */
static int bench_crossover(const struct lp_model *model, int threads, int rounds,
                           struct lp_err *err)
{
	static const enum lp_dtype types[] = {LP_DTYPE_F32,  LP_DTYPE_F16,  LP_DTYPE_BF16,
	                                      LP_DTYPE_Q8_0, LP_DTYPE_Q4_0, LP_DTYPE_Q4_1,
	                                      LP_DTYPE_Q5_0, LP_DTYPE_Q5_1, LP_DTYPE_Q4_K,
	                                      LP_DTYPE_Q5_K, LP_DTYPE_Q6_K};
	static const int ns[] = {4, 5, 8, 12, 14, 16, 18, 20, 24, 32};
	int cap = model->cfg.n_layers * 7 + 1;
	struct step_mat *mats = malloc((size_t)cap * sizeof(*mats));
	int n_mats = mats ? step_mats(model, mats, cap) : 0;
	struct lp_backend *be[2] = {NULL, NULL}; /* GEMM, matrix-vector */
	int64_t max_k = 0, max_m = 0;
	float *x = NULL, *o = NULL;
	void **w = calloc((size_t)cap, sizeof(void *));
	int rc = -1;

	/* room for rows padded to whole K-quant blocks */
	for (int i = 0; i < n_mats; i++) {
		int64_t kp = (mats[i].k + LP_QK_K - 1) / LP_QK_K * LP_QK_K;
		max_k = kp > max_k ? kp : max_k;
		max_m = mats[i].m > max_m ? mats[i].m : max_m;
	}
	x = calloc((size_t)(SWEEP_MAX * max_k), sizeof(float));
	o = malloc((size_t)(SWEEP_MAX * max_m) * sizeof(float));
	if (!mats || !w || !x || !o) {
		lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	for (int64_t i = 0; i < SWEEP_MAX * max_k; i++)
		x[i] = (float)(i % 13) * 0.1f - 0.6f;
	setenv("LP_CPU_MATVEC_BATCH", "0", 1);
	rc = lp_backend_cpu_new(&be[0], threads, err);
	setenv("LP_CPU_MATVEC_BATCH", "32", 1);
	if (!rc)
		rc = lp_backend_cpu_new(&be[1], threads, err);
	unsetenv("LP_CPU_MATVEC_BATCH");
	if (rc)
		goto out;
	for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
		enum lp_dtype t = types[ti];
		int last_win = 0;
		bool wins = true;

		/* a row length that is no whole number of blocks of t (576 for
		 * a K-quant) is rounded up to one */
		int64_t blk = lp_dtype_block(t);
#define KPAD(i) ((mats[i].k + blk - 1) / blk * blk)
		for (int i = 0; i < n_mats; i++) {
			size_t b = lp_dtype_row_bytes(t, KPAD(i)) * (size_t)mats[i].m;
			w[i] = malloc(b);
			if (!w[i]) {
				rc = lp_errf(err, -ENOMEM, "out of memory");
				goto out;
			}
			fill_mat(t, w[i], b);
		}
		for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++) {
			double best[2] = {1e30, 1e30};
			int n = ns[ni];

			for (int r = 0; r < rounds; r++) {
				for (int p = 0; p < 2; p++) {
					double t0 = now_s();
					for (int i = 0; i < n_mats; i++) {
						struct lp_tensor tw = {w[i], t, mats[i].m, KPAD(i)};
						struct lp_tensor tx = {x, LP_DTYPE_F32, n, KPAD(i)};
						struct lp_tensor to = {o, LP_DTYPE_F32, n,
						                       mats[i].m};
						be[p]->ops->matmul(be[p]->ctx, &to, &tx, &tw,
						                   false);
					}
					double dt = now_s() - t0;
					best[p] = dt < best[p] ? dt : best[p];
				}
			}
			printf("bench: crossover_%s_n%d matvec %.1f gemm %.1f rows/s\n",
			       lp_dtype_name(t), n, n / best[1], n / best[0]);
			if (best[1] > best[0])
				wins = false;
			if (wins)
				last_win = n;
		}
		printf("bench: crossover_%s %d rows (largest n up to which the matrix-vector path "
		       "wins; the table says %d)\n",
		       lp_dtype_name(t), last_win,
		       lp_cpu_matvec_batch_default(t, lp_backend_cpu_uses_avx512(be[1])));
#undef KPAD
		for (int i = 0; i < n_mats; i++) {
			free(w[i]);
			w[i] = NULL;
		}
		fflush(stdout);
	}
	rc = 0;
out:
	for (int i = 0; w && i < n_mats; i++)
		free(w[i]);
	free(w);
	free(mats);
	free(x);
	free(o);
	lp_backend_destroy(be[0]);
	lp_backend_destroy(be[1]);
	return rc;
}

/* ---- multi-LoRA ---- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static float frand(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return (float)((rng_state >> 40) & 0xffffff) / 16777216.0f - 0.5f;
}

/* Writes a PEFT adapter of the given rank on all seven modules of model m,
 * with random weights in f32 or bf16, to dir (created). */
static int write_adapter(const char *dir, const struct lp_model *m, int rank, bool bf16,
                         struct lp_err *err)
{
	static const char *mods[7] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
	                              "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
	                              "mlp.down_proj"};
	const struct lp_model_config *c = &m->cfg;
	int qd = c->n_heads * c->head_dim, kvd = c->n_kv_heads * c->head_dim;
	int ins[7] = {c->dim, c->dim, c->dim, qd, c->dim, c->dim, c->ffn_dim};
	int outs[7] = {qd, kvd, kvd, c->dim, c->ffn_dim, c->ffn_dim, c->dim};
	char path[4096];
	FILE *f;
	size_t off = 0, hdr_cap = 1 << 20, hl = 0;
	char *hdr = malloc(hdr_cap);

	if (!hdr || (mkdir(dir, 0755) && errno != EEXIST))
		return lp_errf(err, -EIO, "cannot create '%s'", dir);
	snprintf(path, sizeof(path), "%s/adapter_config.json", dir);
	f = fopen(path, "w");
	if (!f) {
		free(hdr);
		return lp_errf(err, -EIO, "cannot write '%s'", path);
	}
	fprintf(f,
	        "{\"peft_type\": \"LORA\", \"r\": %d, \"lora_alpha\": %d, \"bias\": \"none\", "
	        "\"target_modules\": [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", "
	        "\"gate_proj\", \"up_proj\", \"down_proj\"], \"base_model_name_or_path\": "
	        "\"%s\"}\n",
	        rank, 2 * rank, m->name);
	fclose(f);
	hl += (size_t)snprintf(hdr + hl, hdr_cap - hl, "{");
	for (int l = 0; l < c->n_layers; l++)
		for (int t = 0; t < 7; t++)
			for (int ab = 0; ab < 2; ab++) {
				size_t n =
				    (size_t)rank * (size_t)(ab ? outs[t] : ins[t]) * (bf16 ? 2 : 4);
				hl += (size_t)snprintf(
				    hdr + hl, hdr_cap - hl,
				    "%s\"base_model.model.model.layers.%d.%s.lora_%c.weight\": "
				    "{\"dtype\": \"%s\", \"shape\": [%d, %d], \"data_offsets\": "
				    "[%zu, %zu]}",
				    hl > 1 ? ", " : "", l, mods[t], ab ? 'B' : 'A',
				    bf16 ? "BF16" : "F32", ab ? outs[t] : rank, ab ? rank : ins[t],
				    off, off + n);
				off += n;
			}
	hl += (size_t)snprintf(hdr + hl, hdr_cap - hl, "}");
	while (hl % 8)
		hdr[hl++] = ' ';
	snprintf(path, sizeof(path), "%s/adapter_model.safetensors", dir);
	f = fopen(path, "wb");
	if (!f) {
		free(hdr);
		return lp_errf(err, -EIO, "cannot write '%s'", path);
	}
	uint64_t hl64 = hl;
	fwrite(&hl64, 8, 1, f);
	fwrite(hdr, 1, hl, f);
	for (size_t i = 0; i < off / (bf16 ? 2 : 4); i++) {
		float v = frand() * 0.05f;
		uint16_t h = lp_f32_to_bf16(v);
		fwrite(bf16 ? (const void *)&h : (const void *)&v, bf16 ? 2 : 4, 1, f);
	}
	fclose(f);
	free(hdr);
	return 0;
}

/* One multi-LoRA load: 32 sequences x 64 tokens spread round-robin over
 * n_adapters adapters (0: all on the base model), on an engine of its own. */
#define LORA_SEQS  32
#define LORA_STEPS 64

struct lora_run {
	struct lp_engine *e;
	struct lp_seq *seqs[LORA_SEQS];
	int n_seqs;
	size_t adapter_bytes; /* adapter weights one decode step reads */
	double step_s[LORA_STEPS * 100];
	int n_steps;
};

static int lora_run_start(struct lora_run *r, struct lp_model *m, int n_adapters, char names[][32],
                          int max_loras, const int32_t *prompt, struct lp_err *err)
{
	struct lp_engine_config ec;
	const struct lp_step_output *outs;
	int n;
	char *dir = getenv("LP_BENCH_ADAPTERS");

	lp_engine_config_default(&ec);
	ec.max_model_len = 512;
	ec.max_num_seqs = LORA_SEQS;
	ec.max_batched_tokens = 512;
	ec.kv_cache_bytes = 256u << 20;
	ec.max_loras = max_loras;
	ec.max_cpu_loras = max_loras > 32 ? max_loras : 32;
	r->n_seqs = 0;
	if (lp_engine_new(&r->e, m, &ec, err))
		return -1;
	r->adapter_bytes = 0;
	for (int i = 0; i < n_adapters; i++) {
		char path[1024];
		bool already;
		if (snprintf(path, sizeof(path), "%s/%s", dir, names[i]) >= (int)sizeof(path))
			return lp_errf(err, -ENAMETOOLONG, "adapter path too long");
		if (lp_lora_cache_load(lp_engine_loras(r->e), names[i], path, NULL, NULL, false,
		                       &already, err))
			return -1;
		r->adapter_bytes +=
		    lp_lora_cache_find(lp_engine_loras(r->e), names[i])->w->data_bytes;
	}
	for (int i = 0; i < LORA_SEQS; i++) {
		struct lp_seq_params p = {0};
		p.adapter = n_adapters ? names[i % n_adapters] : NULL;
		p.prompt = prompt + i;
		p.n_prompt = 16;
		p.max_tokens = LORA_STEPS;
		p.ignore_eos = true;
		lp_sampling_params_default(&p.sampling);
		p.sampling.temperature = 0;
		if (lp_engine_add(r->e, &p, &r->seqs[i], err))
			return -1;
		r->n_seqs++;
	}
	/* the prefill of all (one step of 512 tokens) is not timed */
	return lp_engine_step(r->e, &outs, &n, err);
}

/* Times one decode step; 1 when it ran, 0 when the load is done. */
static int lora_run_step(struct lora_run *r, struct lp_err *err)
{
	const struct lp_step_output *outs;
	int n;
	double t0;

	if (!lp_engine_has_work(r->e))
		return 0;
	t0 = now_s();
	if (lp_engine_step(r->e, &outs, &n, err))
		return -1;
	if (n != LORA_SEQS)
		return lp_errf(err, -EIO, "a decode step gave %d tokens, not %d", n, LORA_SEQS);
	if (r->n_steps < (int)(sizeof(r->step_s) / sizeof(r->step_s[0])))
		r->step_s[r->n_steps++] = now_s() - t0;
	return 1;
}

static void lora_run_end(struct lora_run *r)
{
	for (int i = 0; i < r->n_seqs; i++)
		lp_engine_release(r->e, r->seqs[i]);
	r->n_seqs = 0;
	lp_engine_free(r->e);
	r->e = NULL;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

/* Generation tokens/s from the median decode step: a burst of work from a
 * neighbour on a shared machine moves a few steps, not the median. */
static double lora_run_tps(struct lora_run *r)
{
	qsort(r->step_s, (size_t)r->n_steps, sizeof(double), cmp_double);
	return LORA_SEQS / r->step_s[r->n_steps / 2];
}

/* The four loads run side by side, each engine on a backend and a model of
 * its own (a backend serves one engine's reservation at a time; the
 * model's weights are the same mapped file). */
static int bench_lora(struct lp_model *m, const char *model_path, int threads,
                      const int32_t *prompt, int reps, struct lp_err *err)
{
	struct lp_backend *bes[4] = {0};
	struct lp_model *ms[4] = {0};
	char tmpl[] = "/tmp/loraplane-bench-XXXXXX";
	char names[40][32]; /* 32 in f32, then 8 in bf16 */
	char path[2048];
	size_t bytes_b, bytes_c, bytes_d;
	int rc = -1;

	if (!mkdtemp(tmpl))
		return lp_errf(err, -EIO, "cannot make a temporary directory");
	setenv("LP_BENCH_ADAPTERS", tmpl, 1);
	for (int i = 0; i < 40; i++) {
		snprintf(names[i], sizeof(names[i]), i < 32 ? "r16-%02d" : "r16-bf16-%02d", i);
		snprintf(path, sizeof(path), "%s/%s", tmpl, names[i]);
		if (write_adapter(path, m, 16, i >= 32, err))
			goto out;
	}
	/* load time of one rank-16 adapter, best of 5, from the page cache */
	{
		struct lp_lora_shape shape = {m->cfg.n_layers,
		                              m->cfg.dim,
		                              m->cfg.n_heads * m->cfg.head_dim,
		                              m->cfg.n_kv_heads * m->cfg.head_dim,
		                              m->cfg.ffn_dim,
		                              64,
		                              NULL,
		                              true};
		double best = 1e9;
		for (int rep = 0; rep < 5; rep++) {
			struct lp_lora *l;
			double t0 = now_s();
			snprintf(path, sizeof(path), "%s/%s", tmpl, names[rep]);
			if (lp_lora_load(&l, path, &shape, err))
				goto out;
			double ms = (now_s() - t0) * 1e3;
			if (ms < best)
				best = ms;
			lp_lora_free(l);
		}
		printf("bench: lora_load_ms %.2f ms\n", best);
		fflush(stdout);
	}
	/* the loads run side by side, one decode step of each in turn, so that
	 * whatever else the machine does falls on all alike; reps rounds, each
	 * with fresh engines. The fourth is the second with adapters saved in
	 * bf16, which stay bf16 in memory. */
	static struct lora_run runs[4];
	const int n_ad[4] = {0, 8, 32, 8}, max_l[4] = {8, 8, 32, 8}, first[4] = {0, 0, 0, 32};
	for (int i = 0; i < 4; i++) {
		runs[i].n_steps = 0;
		if (lp_backend_cpu_new(&bes[i], threads, err) ||
		    lp_model_load(&ms[i], model_path, bes[i], err))
			goto out;
	}
	for (int rep = 0; rep < reps; rep++) {
		int any = 1, failed = 0;
		for (int i = 0; i < 4 && !failed; i++)
			failed = lora_run_start(&runs[i], ms[i], n_ad[i], names + first[i],
			                        max_l[i], prompt, err);
		while (any && !failed) {
			any = 0;
			for (int i = 0; i < 4 && !failed; i++) {
				int rc = lora_run_step(&runs[i], err);
				failed = rc < 0;
				any |= rc > 0;
			}
		}
		for (int i = 0; i < 4; i++)
			lora_run_end(&runs[i]);
		if (failed)
			goto out;
	}
	bytes_b = runs[1].adapter_bytes;
	bytes_c = runs[2].adapter_bytes;
	bytes_d = runs[3].adapter_bytes;
	double a = lora_run_tps(&runs[0]), b = lora_run_tps(&runs[1]), c = lora_run_tps(&runs[2]),
	       d = lora_run_tps(&runs[3]);
	printf("bench: lora_rounds %d count\n", reps);
	printf("bench: lora_base_32seq_tokens_per_s %.1f tokens/s\n", a);
	printf("bench: lora_8x_r16_32seq_tokens_per_s %.1f tokens/s\n", b);
	printf("bench: lora_8x_adapter_bytes_per_step %.1f MB\n", (double)bytes_b / 1e6);
	printf("bench: lora_32x_r16_32seq_tokens_per_s %.1f tokens/s\n", c);
	printf("bench: lora_32x_adapter_bytes_per_step %.1f MB\n", (double)bytes_c / 1e6);
	printf("bench: lora_8x_r16_bf16_32seq_tokens_per_s %.1f tokens/s\n", d);
	printf("bench: lora_8x_bf16_adapter_bytes_per_step %.1f MB\n", (double)bytes_d / 1e6);
	printf("bench: lora_ratio_8x_to_base %.3f ratio\n", b / a);
	printf("bench: lora_ratio_32x_to_base %.3f ratio\n", c / a);
	printf("bench: lora_ratio_8x_bf16_to_base %.3f ratio\n", d / a);
	rc = 0;
out:
	for (int i = 0; i < 4; i++) {
		lp_model_free(ms[i]);
		if (bes[i])
			lp_backend_destroy(bes[i]);
	}
	snprintf(path, sizeof(path), "rm -rf '%s'", tmpl);
	if (system(path) != 0)
		fprintf(stderr, "bench: could not remove %s\n", tmpl);
	return rc;
}

/* Tokenizer speed on the model's own tokenizer: the committed test corpus
 * (mixed scripts, code, numbers, special tokens), and one long "word" of
 * letters (a single BPE piece) at two lengths, timed in turn, whose ratio
 * shows how encoding scales: about 4 when linear, 16 when quadratic. */
static int bench_tokenizer(const struct lp_model *m, const char *corpus_path, struct lp_err *err)
{
	json_error_t jerr;
	json_t *corpus = json_load_file(corpus_path, 0, &jerr);
	struct lp_tokens t = {0};
	size_t n_long = 200000, bytes = 0;
	char *word = NULL;
	double best = 1e30, best_w[2] = {1e30, 1e30};
	int rc = -EINVAL;

	if (!json_is_array(corpus)) {
		lp_errf(err, -EINVAL, "tokenizer corpus %s: %s", corpus_path,
		        corpus ? "not a JSON array" : jerr.text);
		goto out;
	}
	for (int rep = 0; rep < 5; rep++) {
		double t0 = now_s();
		bytes = 0;
		for (size_t i = 0; i < json_array_size(corpus); i++) {
			const json_t *s = json_array_get(corpus, i);
			t.n = 0;
			if ((rc = lp_tokenizer_encode(m->tok, json_string_value(s),
			                              json_string_length(s),
			                              LP_ENCODE_PARSE_SPECIAL, &t, err)))
				goto out;
			bytes += json_string_length(s);
		}
		if (now_s() - t0 < best)
			best = now_s() - t0;
	}
	word = malloc(n_long);
	if (!word) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	for (size_t i = 0; i < n_long; i++)
		word[i] = (char)('a' + (i * 7 + i / 13) % 26);
	for (int rep = 0; rep < 3; rep++) {
		for (int k = 0; k < 2; k++) {
			double t0 = now_s();
			t.n = 0;
			if ((rc = lp_tokenizer_encode(m->tok, word, k ? n_long : n_long / 4, 0, &t,
			                              err)))
				goto out;
			if (now_s() - t0 < best_w[k])
				best_w[k] = now_s() - t0;
		}
	}
	printf("bench: tokenizer_corpus_mb_per_s %.2f MB/s\n", (double)bytes / 1e6 / best);
	printf("bench: tokenizer_long_word_200k_ms %.2f ms\n", best_w[1] * 1e3);
	printf("bench: tokenizer_long_word_scaling_4x %.2f ratio\n", best_w[1] / best_w[0]);
	fflush(stdout);
	rc = 0;
out:
	free(word);
	lp_tokens_release(&t);
	json_decref(corpus);
	return rc;
}

/* ---- the AVX-512 kernels against the AVX2 ones ---- */

/* The model at path on a backend with the AVX-512 kernels (i = 0) and on
 * one without (LP_CPU_NO_AVX512, i = 1), an engine each as main makes it;
 * rounds alternate the two: 512-token prefill and decode at batches 1, 8
 * and 32, best of rounds, and the ratios AVX-512 / AVX2. */
static int bench_isa(const char *path, int threads, const struct lp_engine_config *ec,
                     const int32_t *prompt, int rounds, struct lp_err *err)
{
	static const int batches[] = {1, 8, SWEEP_MAX};
	struct lp_backend *be[2] = {NULL, NULL};
	struct lp_model *m[2] = {NULL, NULL};
	struct lp_engine *e[2] = {NULL, NULL};
	double best[2][4] = {{0}};
	int rc = -1;

	if (!lp_cpu_has_avx512()) {
		printf("bench: isa skipped: this CPU has no AVX-512\n");
		return 0;
	}
	for (int i = 0; i < 2; i++) {
		if (i)
			setenv("LP_CPU_NO_AVX512", "1", 1);
		rc = lp_backend_cpu_new(&be[i], threads, err);
		unsetenv("LP_CPU_NO_AVX512");
		if (rc || (rc = lp_model_load(&m[i], path, be[i], err)) ||
		    (rc = lp_engine_new(&e[i], m[i], ec, err)))
			goto out;
	}
	rc = -1;
	for (int r = 0; r < rounds; r++) {
		for (int i = 0; i < 2; i++) {
			double v = prefill_tps(e[i], prompt, 1, err);
			if (v < 0)
				goto out;
			best[i][0] = v > best[i][0] ? v : best[i][0];
			for (int b = 0; b < 3; b++) {
				v = decode_tps(e[i], prompt, batches[b], 32, err);
				if (v < 0)
					goto out;
				best[i][b + 1] = v > best[i][b + 1] ? v : best[i][b + 1];
			}
		}
	}
	for (int f = 0; f < 4; f++) {
		char name[32];
		if (f == 0)
			snprintf(name, sizeof(name), "prefill512");
		else
			snprintf(name, sizeof(name), "decode_batch%d", batches[f - 1]);
		printf("bench: isa_%s_avx512 %.1f tokens/s\n", name, best[0][f]);
		printf("bench: isa_%s_avx2 %.1f tokens/s\n", name, best[1][f]);
		printf("bench: isa_%s_ratio %.3f ratio\n", name, best[0][f] / best[1][f]);
	}
	fflush(stdout);
	rc = 0;
out:
	for (int i = 0; i < 2; i++) {
		lp_engine_free(e[i]);
		lp_model_free(m[i]);
		lp_backend_destroy(be[i]);
	}
	return rc;
}

/* ---- constrained decoding ---- */

/* A schema of n properties of every kind (strings, integers, numbers,
 * booleans, enums, arrays, a nested object), all required. */
static json_t *wide_schema(int n)
{
	json_t *props = json_object(), *req = json_array();

	for (int i = 0; i < n; i++) {
		char name[32];
		json_t *p;
		snprintf(name, sizeof(name), "field_%02d", i);
		switch (i % 6) {
		case 0:
			p = json_pack("{s:s}", "type", "string");
			break;
		case 1:
			p = json_pack("{s:s}", "type", "integer");
			break;
		case 2:
			p = json_pack("{s:s}", "type", "number");
			break;
		case 3:
			p = json_pack("{s:[s,s,s]}", "enum", "low", "medium", "high");
			break;
		case 4:
			p = json_pack("{s:s,s:{s:s},s:i}", "type", "array", "items", "type",
			              "string", "maxItems", 4);
			break;
		default:
			p = json_pack("{s:s,s:{s:{s:s},s:{s:s}},s:[s,s],s:b}", "type", "object",
			              "properties", "city", "type", "string", "zip", "type",
			              "string", "required", "city", "zip", "additionalProperties",
			              0);
			break;
		}
		json_object_set_new(props, name, p);
		json_array_append_new(req, json_string(name));
	}
	return json_pack("{s:s,s:o,s:o,s:b}", "type", "object", "properties", props, "required",
	                 req, "additionalProperties", 0);
}

static int compile_schema(json_t *schema, struct lp_grammar **g, struct lp_err *err)
{
	struct lp_buf b;
	int rc;

	lp_buf_init(&b, (size_t)4 << 20);
	if (!(rc = lp_buf_append(&b, "root ::= s-root\n", 16, err)) &&
	    !(rc = lp_json_schema_grammar(schema, "s-", &b, err)))
		rc = lp_grammar_parse(g, b.data, b.len, err);
	lp_buf_release(&b);
	return rc;
}

static int bench_grammar(struct lp_engine *e, const int32_t *prompt, int rounds, struct lp_err *err)
{
	static const char *LIST = "{\"type\": \"object\", \"properties\": {\"notes\": {\"type\": "
	                          "\"array\", \"minItems\": 400, \"items\": {\"type\": "
	                          "\"string\"}}}, \"required\": [\"notes\"]}";
	static const int batches[] = {1, 8};
	json_t *wide = wide_schema(50), *list = json_loads(LIST, 0, NULL);
	struct lp_grammar *g = NULL;
	double best = 1e30;
	int rc = -1;

	if (!wide || !list) {
		lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	/* compilation: schema -> grammar text -> parsed grammar, best of 20 */
	for (int i = 0; i < 20; i++) {
		double t0 = now_s();
		if (compile_schema(wide, &g, err))
			goto out;
		double dt = now_s() - t0;
		best = dt < best ? dt : best;
		lp_grammar_unref(g);
		g = NULL;
	}
	printf("bench: grammar_compile_50_properties %.3f ms\n", best * 1e3);
	fflush(stdout);
	if (compile_schema(list, &g, err))
		goto out;
	/* the first run fills the grammar's mask cache: a warm-up */
	if (decode_tps_with(e, prompt, 1, 32, g, err) < 0)
		goto out;
	for (size_t b = 0; b < sizeof(batches) / sizeof(batches[0]); b++) {
		double on = 0, off = 0;
		/* rounds alternate, best of each */
		for (int r = 0; r < rounds; r++) {
			double x = decode_tps_with(e, prompt, batches[b], 64, NULL, err);
			double y = x < 0 ? -1 : decode_tps_with(e, prompt, batches[b], 64, g, err);
			if (x < 0 || y < 0)
				goto out;
			off = x > off ? x : off;
			on = y > on ? y : on;
		}
		printf("bench: grammar_decode_batch%d_unconstrained %.1f tokens/s\n", batches[b],
		       off);
		printf("bench: grammar_decode_batch%d_json_schema %.1f tokens/s\n", batches[b], on);
		printf("bench: grammar_decode_batch%d_ratio %.3f ratio\n", batches[b], on / off);
		fflush(stdout);
	}
	/* the 50-property schema at batch 1: with a grammar parsed afresh
	 * (every mask it meets is built during the run, as for the first
	 * request of a schema), then again with the same grammar (what later
	 * requests with that schema get from the agent's grammar cache) */
	{
		double off = 0, cold = 0, warm = 0;
		struct lp_grammar *w = NULL;
		for (int r = 0; r < rounds; r++) {
			double x = decode_tps_with(e, prompt, 1, 64, NULL, err), y, z;
			lp_grammar_unref(w);
			w = NULL;
			if (x < 0 || compile_schema(wide, &w, err))
				goto out_w;
			y = decode_tps_with(e, prompt, 1, 64, w, err);
			z = y < 0 ? -1 : decode_tps_with(e, prompt, 1, 64, w, err);
			if (y < 0 || z < 0)
				goto out_w;
			off = x > off ? x : off;
			cold = y > cold ? y : cold;
			warm = z > warm ? z : warm;
		}
		printf("bench: grammar_wide_batch1_first_request_ratio %.3f ratio\n", cold / off);
		printf("bench: grammar_wide_batch1_cached_ratio %.3f ratio\n", warm / off);
		fflush(stdout);
		rc = 0;
	out_w:
		lp_grammar_unref(w);
		if (rc)
			goto out;
	}
	rc = 0;
out:
	lp_grammar_unref(g);
	json_decref(wide);
	json_decref(list);
	return rc;
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
	    {"model", required_argument, NULL, 'm'},  {"threads", required_argument, NULL, 't'},
	    {"only", required_argument, NULL, 'o'},   {"rounds", required_argument, NULL, 'r'},
	    {"corpus", required_argument, NULL, 'c'}, {NULL, 0, NULL, 0},
	};
	const char *path = "models/smollm2-135m-instruct-q4_1.gguf";
	struct lp_err err = {0};
	struct lp_backend *be = NULL;
	struct lp_model *m = NULL;
	struct lp_engine *e = NULL;
	struct lp_engine_config ec;
	struct lp_tokens ids = {0};
	struct rusage ru;
	int threads = 0, c, status = 1, rounds = 3;
	const char *only = NULL, *corpus = "tests/fixtures/tokenizer/corpus.json";
	double t0;

	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		if (c == 'm')
			path = optarg;
		else if (c == 't')
			threads = (int)strtol(optarg, NULL, 10);
		else if (c == 'o')
			only = optarg;
		else if (c == 'r')
			rounds = (int)strtol(optarg, NULL, 10);
		else if (c == 'c')
			corpus = optarg;
		else
			return 2;
	}
	if (threads <= 0)
		threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
	if ((only && strcmp(only, "lora") != 0 && strcmp(only, "tokenizer") != 0 &&
	     strcmp(only, "sweep") != 0 && strcmp(only, "crossover") != 0 &&
	     strcmp(only, "prefill") != 0 && strcmp(only, "isa") != 0 &&
	     strcmp(only, "decode") != 0 && strcmp(only, "grammar") != 0) ||
	    rounds < 1 || rounds > 100) {
		fprintf(stderr,
		        "usage: bench [--model PATH] [--threads N] "
		        "[--only lora|tokenizer|sweep|crossover|prefill|decode|isa|grammar] "
		        "[--rounds N (1-100)] [--corpus JSON]\n");
		return 2;
	}

	double bw = measure_bandwidth_isolated(threads);
	printf("bench: memory_read_bandwidth %.2f GB/s\n", bw);
	fflush(stdout);

	t0 = now_s();
	if (lp_backend_cpu_new(&be, threads, &err) || lp_model_load(&m, path, be, &err))
		goto fail;
	printf("bench: load_time %.3f s\n", now_s() - t0);
	printf("bench: threads %d count\n", threads);
	lp_engine_config_default(&ec);
	ec.max_model_len = 1024;
	ec.max_num_seqs = SWEEP_MAX;
	/* the prefill figure is the computation: repeats of the same prompt
	 * would otherwise come from the prefix cache */
	ec.prefix_caching = false;
	ec.max_batched_tokens = 512;
	ec.kv_cache_bytes = 256u << 20;
	if (lp_engine_new(&e, m, &ec, &err))
		goto fail;

	/* a 512-token prompt made of real text */
	const char *text = "Kubernetes is an open-source system for automating deployment, "
	                   "scaling, and management of containerized applications. ";
	while (ids.n < 600)
		if (lp_tokenizer_encode(m->tok, text, strlen(text), 0, &ids, &err))
			goto fail;
	if (only && strcmp(only, "prefill") != 0 && strcmp(only, "decode") != 0) {
		if (strcmp(only, "lora") == 0 ? bench_lora(m, path, threads, ids.ids, rounds, &err)
		    : strcmp(only, "sweep") == 0     ? bench_sweep(e, ids.ids, rounds, &err)
		    : strcmp(only, "crossover") == 0 ? bench_crossover(m, threads, rounds, &err)
		    : strcmp(only, "grammar") == 0   ? bench_grammar(e, ids.ids, rounds, &err)
		    : strcmp(only, "isa") == 0
		        ? bench_isa(path, threads, &ec, ids.ids, rounds, &err)
		        : bench_tokenizer(m, corpus, &err))
			goto fail;
		status = 0;
		goto out;
	}

	/* prompt throughput: one 512-token prefill, best of 3 */
	double best_pp = prefill_tps(e, ids.ids, 3, &err);
	if (best_pp < 0)
		goto fail;
	printf("bench: prompt_tokens_per_s %.1f tokens/s\n", best_pp);
	fflush(stdout);
	if (only && strcmp(only, "decode") != 0) { /* --only prefill */
		status = 0;
		goto out;
	}

	double b1 = decode_tps(e, ids.ids, 1, 128, &err);
	if (b1 < 0)
		goto fail;
	printf("bench: decode_batch1_tokens_per_s %.1f tokens/s\n", b1);
	fflush(stdout);
	double b16 = decode_tps(e, ids.ids, 16, 64, &err);
	if (b16 < 0)
		goto fail;
	printf("bench: decode_batch16_tokens_per_s %.1f tokens/s\n", b16);

	size_t bpt = lp_model_bytes_per_token(m);
	double roofline = bw * 1e9 / (double)bpt;
	printf("bench: weight_bytes_per_token %.1f MB\n", (double)bpt / 1e6);
	printf("bench: decode_batch1_roofline %.1f tokens/s\n", roofline);
	printf("bench: decode_batch1_roofline_ratio %.3f ratio\n", b1 / roofline);
	fflush(stdout);
	if (only) { /* --only decode */
		status = 0;
		goto out;
	}
	if (bench_sweep(e, ids.ids, rounds, &err))
		goto fail;
	if (bench_tokenizer(m, corpus, &err))
		goto fail;
	getrusage(RUSAGE_SELF, &ru);
	printf("bench: peak_rss %.1f MiB\n", (double)ru.ru_maxrss / 1024.0);
	fflush(stdout);
	if (bench_lora(m, path, threads, ids.ids, rounds, &err))
		goto fail;
	status = 0;
	goto out;
fail:
	fprintf(stderr, "bench: %s\n", err.msg);
out:
	lp_tokens_release(&ids);
	lp_engine_free(e);
	lp_model_free(m);
	lp_backend_destroy(be);
	return status;
}
