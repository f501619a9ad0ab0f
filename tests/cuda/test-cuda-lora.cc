/* The CUDA LoRA slots and op (lora.cu), run through the emulation layer (or
 * a real device), against the CPU backend's op (kernels/cpu/lora.c) on the
 * same adapters.
 *
 * Tolerances. The device sums in another order than the CPU (a warp's
 * lanes, then a butterfly; the CPU's 8-lane vectors), so results agree to
 * 1e-5 of the sum of the magnitudes of an element's terms when both read
 * the same weight values: an f32 arena, or an arena of the adapter's own
 * half type, or the CPU given the adapter's values rounded to the arena
 * type (what fill stores). Against the CPU on the unrounded f32 weights, an
 * f16 arena is within 2e-3 and a bf16 arena within 1.6e-2: A and B each
 * rounded once, 2^-11 (f16) and 2^-8 (bf16) relative, twice that for the
 * product, with margin for the sum of terms of both signs.
 *
 * SGMV (prefill) and BGMV (decode) compute every element with the same
 * operations in the same order, so they must give the same bits, as must a
 * row alone and in a batch. */
#include "kernels/cuda/ops.cuh"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tests/test.h"

#define N_SLOTS    4
#define MAX_RANK   64  /* of the slots, unless a test reserves more */
#define BIG_RANK   200 /* the most any test reserves */
#define MAX_LAYERS 2
#define MAX_SEGS   320
#define MAX_ROWS   320

static struct lp_cuda cu;
static int g_max_rank = MAX_RANK; /* what the slots were reserved for */
static struct lp_backend *cpu;

static uint64_t rng_state = 0x1ace0ff5eedULL;

static uint64_t rng_next(void)
{
	uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static float frand(float lo, float hi)
{
	return lo + (hi - lo) * (float)((rng_next() >> 40) * (1.0 / 16777216.0));
}

/* ---- model shapes (struct lp_backend_limits and the dims they give) ---- */

struct shape {
	const char *name;
	int dim, n_heads, n_kv_heads, head_dim, ffn;
};

static const struct shape smol = {"smol", 576, 9, 3, 64, 1536};
static const struct shape odd = {"odd", 33, 3, 1, 7, 70}; /* nothing a multiple of 8 */

static struct lp_lora_dims dims_of(const struct shape *s)
{
	struct lp_lora_dims d = {MAX_LAYERS, s->dim, s->n_heads * s->head_dim,
	                         s->n_kv_heads * s->head_dim, s->ffn};
	return d;
}

/* (Re)reserves the device slots for shape s with arenas of type t, and
 * ranks up to max_rank. */
static int reserve_rank(const struct shape *s, enum lp_dtype t, int max_rank, struct lp_err *err)
{
	struct lp_backend_limits lim;
	size_t bytes;

	lp_cuda_lora_release(&cu);
	memset(&lim, 0, sizeof(lim));
	lim.n_layers = MAX_LAYERS;
	lim.dim = s->dim;
	lim.n_heads = s->n_heads;
	lim.n_kv_heads = s->n_kv_heads;
	lim.head_dim = s->head_dim;
	lim.ffn_dim = s->ffn;
	lim.vocab = 100;
	lim.max_tokens = MAX_ROWS;
	lim.max_seqs = MAX_ROWS;
	lim.max_loras = N_SLOTS;
	lim.max_lora_rank = max_rank;
	lim.lora_type = t;
	cu.lim = lim;
	g_max_rank = max_rank;
	return lp_cuda_lora_reserve(&cu, &lim, &bytes, err);
}

static int reserve(const struct shape *s, enum lp_dtype t, struct lp_err *err)
{
	return reserve_rank(s, t, MAX_RANK, err);
}

/* ---- adapters as agent/adapters/ lays them out ---- */

struct adapter {
	struct lp_lora_weights w;
	struct lp_lora_pair pairs[MAX_LAYERS * LP_LORA_N_TARGETS];
	struct lp_lora_stack stacks[MAX_LAYERS * LP_LORA_N_GROUPS];
	void *stack_mem[MAX_LAYERS][LP_LORA_N_GROUPS];
	void *b_mem[MAX_LAYERS][LP_LORA_N_TARGETS];
	float *a[MAX_LAYERS][LP_LORA_N_TARGETS]; /* values stored, [rank, in] */
	float *b[MAX_LAYERS][LP_LORA_N_TARGETS]; /* values stored, [rank, out] */
};

static size_t type_size(enum lp_dtype t)
{
	return t == LP_DTYPE_F32 ? 4 : 2;
}

static float round_to(enum lp_dtype t, float v)
{
	if (t == LP_DTYPE_F16)
		return lp_f16_to_f32(lp_f32_to_f16(v));
	if (t == LP_DTYPE_BF16)
		return lp_bf16_to_f32(lp_f32_to_bf16(v));
	return v;
}

static float store(void *dst, size_t i, enum lp_dtype t, float v)
{
	if (t == LP_DTYPE_F32) {
		((float *)dst)[i] = v;
		return v;
	}
	((uint16_t *)dst)[i] = t == LP_DTYPE_F16 ? lp_f32_to_f16(v) : lp_f32_to_bf16(v);
	return round_to(t, v);
}

/* ranks[l][t] (0: target absent). With src, src's values rounded to
 * `through` and stored as at / bt; else random values. */
static void adapter_make(struct adapter *ad, const struct lp_lora_dims *d,
                         const int ranks[][LP_LORA_N_TARGETS], enum lp_dtype at, enum lp_dtype bt,
                         const struct adapter *src, enum lp_dtype through)
{
	memset(ad, 0, sizeof(*ad));
	ad->w.n_layers = d->n_layers;
	ad->w.pairs = ad->pairs;
	ad->w.stacks = ad->stacks;
	for (int l = 0; l < d->n_layers; l++)
		for (int g = 0; g < LP_LORA_N_GROUPS; g++) {
			struct lp_lora_stack *st = &ad->stacks[l * LP_LORA_N_GROUPS + g];
			int first, count, in, out, rows = 0;

			lp_lora_group_targets((enum lp_lora_group)g, &first, &count);
			lp_lora_dims_of(d, (enum lp_lora_target)first, &in, &out);
			for (int t = first; t < first + count; t++)
				rows += ranks[l][t];
			st->rank = rows;
			st->type = at;
			st->a = rows ? malloc((size_t)rows * (size_t)in * type_size(at)) : NULL;
			ad->stack_mem[l][g] = st->a;
			rows = 0;
			for (int t = first; t < first + count; t++) {
				struct lp_lora_pair *p = &ad->pairs[l * LP_LORA_N_TARGETS + t];
				int r = ranks[l][t];

				lp_lora_dims_of(d, (enum lp_lora_target)t, &in, &out);
				p->rank = r;
				p->a_type = at;
				p->b_type = bt;
				if (!r)
					continue;
				p->a = (char *)st->a + (size_t)rows * (size_t)in * type_size(at);
				p->b = malloc((size_t)r * (size_t)out * type_size(bt));
				ad->b_mem[l][t] = p->b;
				ad->a[l][t] =
				    (float *)malloc((size_t)r * (size_t)in * sizeof(float));
				ad->b[l][t] =
				    (float *)malloc((size_t)r * (size_t)out * sizeof(float));
				for (size_t i = 0; i < (size_t)r * (size_t)in; i++)
					ad->a[l][t][i] =
					    store(p->a, i, at,
					          src ? round_to(through, src->a[l][t][i])
					              : frand(-0.5f, 0.5f));
				for (int k = 0; k < r; k++)
					for (int o = 0; o < out; o++) {
						size_t i = (size_t)k * (size_t)out + (size_t)o;
						ad->b[l][t][i] =
						    store(p->b, lp_lora_b_index(r, out, k, o), bt,
						          src ? round_to(through, src->b[l][t][i])
						              : frand(-0.5f, 0.5f));
					}
				rows += r;
			}
		}
}

static void adapter_free(struct adapter *ad)
{
	for (int l = 0; l < MAX_LAYERS; l++) {
		for (int g = 0; g < LP_LORA_N_GROUPS; g++)
			free(ad->stack_mem[l][g]);
		for (int t = 0; t < LP_LORA_N_TARGETS; t++) {
			free(ad->b_mem[l][t]);
			free(ad->a[l][t]);
			free(ad->b[l][t]);
		}
	}
	memset(ad, 0, sizeof(*ad));
}

static void uniform_ranks(int ranks[][LP_LORA_N_TARGETS], int r)
{
	for (int l = 0; l < MAX_LAYERS; l++)
		for (int t = 0; t < LP_LORA_N_TARGETS; t++)
			ranks[l][t] = r;
}

/* ---- steps ---- */

struct step {
	int layer;
	enum lp_lora_group group;
	int n;
	int n_segs;
	struct lp_lora_seg segs[MAX_SEGS];
};

static struct step make_step(int layer, int group, int n, int n_segs,
                             const struct lp_lora_seg *segs)
{
	struct step st;

	memset(&st, 0, sizeof(st));
	st.layer = layer;
	st.group = (enum lp_lora_group)group;
	st.n = n;
	st.n_segs = n_segs;
	memcpy(st.segs, segs, (size_t)n_segs * sizeof(segs[0]));
	return st;
}

struct io {
	float *x;
	float *out0[LP_LORA_MAX_OUTS];
	int in, outs[LP_LORA_MAX_OUTS], n_outs;
	size_t total; /* output elements, every target */
};

static void io_make(struct io *io, const struct lp_lora_dims *d, enum lp_lora_group g, int n)
{
	int first, out;

	memset(io, 0, sizeof(*io));
	lp_lora_group_targets(g, &first, &io->n_outs);
	lp_lora_dims_of(d, (enum lp_lora_target)first, &io->in, &out);
	io->x = (float *)malloc((size_t)n * (size_t)io->in * sizeof(float));
	for (size_t i = 0; i < (size_t)n * (size_t)io->in; i++)
		io->x[i] = frand(-1, 1);
	for (int i = 0; i < io->n_outs; i++) {
		int in;

		lp_lora_dims_of(d, (enum lp_lora_target)(first + i), &in, &io->outs[i]);
		io->out0[i] = (float *)malloc((size_t)n * (size_t)io->outs[i] * sizeof(float));
		for (size_t e = 0; e < (size_t)n * (size_t)io->outs[i]; e++)
			io->out0[i][e] = frand(-1, 1);
		io->total += (size_t)n * (size_t)io->outs[i];
	}
}

static void io_free(struct io *io)
{
	free(io->x);
	for (int i = 0; i < LP_LORA_MAX_OUTS; i++)
		free(io->out0[i]);
}

static void tok_slots(const struct step *st, int32_t *ts)
{
	for (int r = 0; r < st->n; r++)
		ts[r] = -1;
	/* a segment reaching outside the rows has no rows in tok_slot */
	for (int s = 0; s < st->n_segs; s++)
		if (st->segs[s].row0 >= 0 && st->segs[s].row0 + st->segs[s].rows <= st->n)
			for (int r = 0; r < st->segs[s].rows; r++)
				ts[st->segs[s].row0 + r] = st->segs[s].slot;
}

/* The CPU backend's op on the same step; the slots given are filled first
 * (aliased). */
static float *run_cpu(const struct step *st, const struct io *io, struct adapter *const slots[])
{
	struct lp_err err;
	struct lp_buffer bx, btmp, bsegs, bts, bout[LP_LORA_MAX_OUTS];
	struct lp_tensor tx, ttmp, tout[LP_LORA_MAX_OUTS];
	struct lp_lora_args args;
	int32_t ts[MAX_ROWS];
	float *res = (float *)malloc(io->total * sizeof(float));
	size_t at = 0;

	for (int s = 0; s < N_SLOTS; s++) {
		if (!slots[s])
			cpu->ops->lora_clear(cpu->ctx, s);
		else if (cpu->ops->lora_fill(cpu->ctx, s, &slots[s]->w, &err))
			return NULL;
	}
	tok_slots(st, ts);
	memset(&args, 0, sizeof(args));
	lp_backend_alloc(cpu, (size_t)st->n * io->in * 4, &bx, &err);
	lp_backend_alloc(cpu, (size_t)st->n * 3 * g_max_rank * 4, &btmp, &err);
	lp_backend_alloc(cpu, sizeof(st->segs), &bsegs, &err);
	lp_backend_alloc(cpu, sizeof(ts), &bts, &err);
	memcpy(bx.data, io->x, (size_t)st->n * io->in * 4);
	memcpy(bsegs.data, st->segs, sizeof(st->segs));
	memcpy(bts.data, ts, sizeof(ts));
	tx = lp_tensor{bx.data, LP_DTYPE_F32, st->n, io->in};
	ttmp = lp_tensor{btmp.data, LP_DTYPE_F32, st->n, 3 * g_max_rank};
	for (int i = 0; i < io->n_outs; i++) {
		size_t bytes = (size_t)st->n * io->outs[i] * 4;
		lp_backend_alloc(cpu, bytes, &bout[i], &err);
		memcpy(bout[i].data, io->out0[i], bytes);
		tout[i] = lp_tensor{bout[i].data, LP_DTYPE_F32, st->n, io->outs[i]};
		args.out[i] = &tout[i];
	}
	args.layer = st->layer;
	args.group = st->group;
	args.x = &tx;
	args.tmp = &ttmp;
	args.segs = (const struct lp_lora_seg *)bsegs.data;
	args.n_segs = st->n_segs;
	args.tok_slot = (const int32_t *)bts.data;
	cpu->ops->lora(cpu->ctx, &args);
	for (int i = 0; i < io->n_outs; i++) {
		size_t cnt = (size_t)st->n * io->outs[i];
		memcpy(res + at, bout[i].data, cnt * 4);
		at += cnt;
		lp_backend_free(cpu, &bout[i]);
	}
	lp_backend_free(cpu, &bx);
	lp_backend_free(cpu, &btmp);
	lp_backend_free(cpu, &bsegs);
	lp_backend_free(cpu, &bts);
	return res;
}

struct dev_step {
	float *x, *tmp, *out[LP_LORA_MAX_OUTS];
	struct lp_lora_seg *segs;
	int32_t *ts;
	struct lp_tensor tx, ttmp, tout[LP_LORA_MAX_OUTS];
	struct lp_lora_args args;
};

/* Device buffers for the step, outputs holding io->out0. */
static bool dev_step_make(struct dev_step *d, const struct step *st, const struct io *io,
                          bool decode)
{
	int32_t ts[MAX_ROWS];
	bool ok;

	memset(d, 0, sizeof(*d));
	tok_slots(st, ts);
	ok = cudaMalloc((void **)&d->x, (size_t)st->n * io->in * 4) == cudaSuccess &&
	     cudaMalloc((void **)&d->tmp, (size_t)st->n * 3 * g_max_rank * 4) == cudaSuccess &&
	     cudaMalloc((void **)&d->segs, sizeof(st->segs)) == cudaSuccess &&
	     cudaMalloc((void **)&d->ts, sizeof(ts)) == cudaSuccess &&
	     cudaMemcpy(d->x, io->x, (size_t)st->n * io->in * 4, cudaMemcpyHostToDevice) ==
	         cudaSuccess &&
	     cudaMemcpy(d->segs, st->segs, sizeof(st->segs), cudaMemcpyHostToDevice) ==
	         cudaSuccess &&
	     cudaMemcpy(d->ts, ts, sizeof(ts), cudaMemcpyHostToDevice) == cudaSuccess;
	for (int i = 0; ok && i < io->n_outs; i++) {
		size_t bytes = (size_t)st->n * io->outs[i] * 4;
		ok = cudaMalloc((void **)&d->out[i], bytes) == cudaSuccess &&
		     cudaMemcpy(d->out[i], io->out0[i], bytes, cudaMemcpyHostToDevice) ==
		         cudaSuccess;
		d->tout[i] = lp_tensor{d->out[i], LP_DTYPE_F32, st->n, io->outs[i]};
		d->args.out[i] = &d->tout[i];
	}
	ok = ok && cudaDeviceSynchronize() == cudaSuccess;
	d->tx = lp_tensor{d->x, LP_DTYPE_F32, st->n, io->in};
	d->ttmp = lp_tensor{d->tmp, LP_DTYPE_F32, st->n, 3 * g_max_rank};
	d->args.layer = st->layer;
	d->args.group = st->group;
	d->args.x = &d->tx;
	d->args.tmp = &d->ttmp;
	d->args.segs = d->segs;
	d->args.n_segs = st->n_segs;
	d->args.tok_slot = d->ts;
	d->args.decode = decode;
	return ok;
}

static float *dev_step_result(struct dev_step *d, const struct io *io, int n)
{
	float *res = (float *)malloc(io->total * sizeof(float));
	size_t at = 0;

	if (cudaStreamSynchronize(cu.stream) != cudaSuccess) {
		free(res);
		return NULL;
	}
	for (int i = 0; i < io->n_outs; i++) {
		size_t cnt = (size_t)n * io->outs[i];
		if (cudaMemcpy(res + at, d->out[i], cnt * 4, cudaMemcpyDeviceToHost) !=
		    cudaSuccess) {
			free(res);
			return NULL;
		}
		at += cnt;
	}
	return res;
}

static void dev_step_free(struct dev_step *d)
{
	cudaFree(d->x);
	cudaFree(d->tmp);
	cudaFree(d->segs);
	cudaFree(d->ts);
	for (int i = 0; i < LP_LORA_MAX_OUTS; i++)
		if (d->out[i])
			cudaFree(d->out[i]);
}

/* The device op once (fills done by the caller). */
static float *run_cuda(const struct step *st, const struct io *io, bool decode)
{
	struct dev_step d;
	float *res = NULL;

	if (dev_step_make(&d, st, io, decode)) {
		lp_cuda_lora(&cu, &d.args);
		res = dev_step_result(&d, io, st->n);
	}
	dev_step_free(&d);
	return res;
}

static int fill_cuda(struct adapter *const slots[], struct lp_err *err)
{
	for (int s = 0; s < N_SLOTS; s++) {
		int rc;

		if (!slots[s]) {
			lp_cuda_lora_clear(&cu, s);
			continue;
		}
		if ((rc = lp_cuda_lora_fill(&cu, s, &slots[s]->w, err)))
			return rc;
	}
	return 0;
}

static unsigned bad_flags(bool reset)
{
	unsigned v = 0;

	cudaStreamSynchronize(cu.stream);
	cudaMemcpy(&v, cu.bad, sizeof(v), cudaMemcpyDeviceToHost);
	if (reset) {
		unsigned zero = 0;
		cudaMemcpy(cu.bad, &zero, sizeof(zero), cudaMemcpyHostToDevice);
		cudaDeviceSynchronize();
	}
	return v;
}

static void reset_context(void)
{
	cudaDeviceSynchronize();
	cu.status = 0;
	cu.status_msg[0] = 0;
	bad_flags(true);
}

/* Largest |got - want| relative to the sum of magnitudes of the terms,
 * computed in double from the reference adapters (ref[s]: the values the
 * CPU was given). */
static double rel_err(const float *got, const float *want, const struct step *st,
                      const struct io *io, struct adapter *const ref[], char *where, size_t len)
{
	int first, cnt;
	size_t at = 0;
	double worst = 0;

	lp_lora_group_targets(st->group, &first, &cnt);
	for (int i = 0; i < io->n_outs; i++) {
		int t = first + i, out = io->outs[i];

		for (int r = 0; r < st->n; r++) {
			const struct adapter *ad = NULL;
			int rank = 0;
			double tk[BIG_RANK];

			for (int s = 0; s < st->n_segs; s++)
				if (r >= st->segs[s].row0 &&
				    r < st->segs[s].row0 + st->segs[s].rows &&
				    st->segs[s].slot >= 0 && st->segs[s].slot < N_SLOTS)
					ad = ref[st->segs[s].slot];
			if (ad)
				rank = ad->pairs[st->layer * LP_LORA_N_TARGETS + t].rank;
			for (int k = 0; k < rank; k++) {
				tk[k] = 0;
				for (int c = 0; c < io->in; c++)
					tk[k] += fabs((double)io->x[(size_t)r * io->in + c] *
					              ad->a[st->layer][t][(size_t)k * io->in + c]);
			}
			for (int o = 0; o < out; o++) {
				double mag = fabs(io->out0[i][(size_t)r * out + o]), e;
				size_t j = at + (size_t)r * out + o;

				for (int k = 0; k < rank; k++)
					mag +=
					    tk[k] * fabs(ad->b[st->layer][t][(size_t)k * out + o]);
				e = fabs((double)got[j] - want[j]) / (mag + 1e-6);
				if (!(e <= worst)) {
					worst = e;
					snprintf(where, len, "output %d row %d col %d: %g vs %g", i,
					         r, o, (double)got[j], (double)want[j]);
					if (isnan(e))
						return INFINITY;
				}
			}
		}
		at += (size_t)st->n * (size_t)out;
	}
	return worst;
}

/* Runs st on the device (SGMV and BGMV) and on the CPU with cpu_slots
 * (values the device holds, or the unrounded ones) and compares within
 * tol; SGMV and BGMV must agree bit for bit. */
static int check(const char *what, const struct step *st, const struct lp_lora_dims *d,
                 struct adapter *const dev_slots[], struct adapter *const cpu_slots[], double tol)
{
	struct lp_err err;
	struct io io;
	float *sg = NULL, *bg = NULL, *want = NULL;
	char where[256] = "";
	double e;
	int ok = 0;

	reset_context();
	io_make(&io, d, st->group, st->n);
	if (fill_cuda(dev_slots, &err)) {
		TEST_FAIL("%s: fill: %s", what, err.msg);
		goto out;
	}
	sg = run_cuda(st, &io, false);
	bg = run_cuda(st, &io, true);
	want = run_cpu(st, &io, cpu_slots);
	if (!sg || !bg || !want) {
		TEST_FAIL("%s: a run failed", what);
		goto out;
	}
	if (cu.status || bad_flags(false)) {
		TEST_FAIL("%s: status %d (%s), bad %#x", what, cu.status, cu.status_msg,
		          bad_flags(false));
		goto out;
	}
	e = rel_err(sg, want, st, &io, cpu_slots, where, sizeof(where));
	if (e > tol) {
		TEST_FAIL("%s: error %g (tolerance %g) at %s", what, e, tol, where);
		goto out;
	}
	if (memcmp(sg, bg, io.total * sizeof(float))) {
		size_t i = 0;
		while (sg[i] == bg[i])
			i++;
		TEST_FAIL("%s: SGMV and BGMV differ at element %zu: %.9g vs %.9g", what, i,
		          (double)sg[i], (double)bg[i]);
		goto out;
	}
	ok = 1;
out:
	free(sg);
	free(bg);
	free(want);
	io_free(&io);
	return ok;
}

/* ---- the cases ---- */

/* Every group on both layers of two model shapes, f32 arenas: segments
 * with gaps and an empty one, ranks that differ between slots and
 * targets (0: the target absent), an empty slot. */
static void test_groups_f32(void)
{
	const struct shape *shapes[] = {&odd, &smol};
	static const int r0[2][LP_LORA_N_TARGETS] = {{4, 4, 4, 4, 4, 4, 4}, {8, 0, 8, 3, 5, 0, 2}};
	static const int r1[2][LP_LORA_N_TARGETS] = {{16, 7, 0, 1, 0, 9, 16},
	                                             {5, 7, 3, 16, 16, 16, 16}};
	static const int r3[2][LP_LORA_N_TARGETS] = {{1, 1, 1, 1, 1, 1, 1}, {0, 0, 0, 0, 0, 0, 0}};
	const struct lp_lora_seg segs[] = {{0, 5, 1}, {6, 0, 0}, {7, 9, 0}, {17, 4, 3}};
	struct lp_err err;

	for (int si = 0; si < 2; si++) {
		struct lp_lora_dims d = dims_of(shapes[si]);
		struct adapter a0, a1, a3;
		struct adapter *slots[N_SLOTS] = {&a0, &a1, NULL, &a3};

		CHECK_OK(reserve(shapes[si], LP_DTYPE_F32, &err), &err);
		adapter_make(&a0, &d, r0, LP_DTYPE_F32, LP_DTYPE_F32, NULL, LP_DTYPE_F32);
		adapter_make(&a1, &d, r1, LP_DTYPE_F32, LP_DTYPE_F32, NULL, LP_DTYPE_F32);
		adapter_make(&a3, &d, r3, LP_DTYPE_F32, LP_DTYPE_F32, NULL, LP_DTYPE_F32);
		for (int layer = 0; layer < MAX_LAYERS && !test_current_failed; layer++)
			for (int g = 0; g < LP_LORA_N_GROUPS && !test_current_failed; g++) {
				struct step st = make_step(layer, g, 23, 4, segs);
				char what[80];

				snprintf(what, sizeof(what), "%s layer %d group %d",
				         shapes[si]->name, layer, g);
				check(what, &st, &d, slots, slots, 1e-5);
			}
		adapter_free(&a0);
		adapter_free(&a1);
		adapter_free(&a3);
		if (test_current_failed)
			return;
	}
}

/* Rank 1 and rank 64 side by side with a slot of mixed ranks, adapters of
 * every weight type, into arenas of every type. */
static void test_types_and_ranks(void)
{
	static const enum lp_dtype arenas[] = {LP_DTYPE_F32, LP_DTYPE_F16, LP_DTYPE_BF16};
	static const double loose[] = {1e-5, 2e-3, 1.6e-2};
	static const int rc[2][LP_LORA_N_TARGETS] = {{64, 1, 32, 64, 1, 64, 13},
	                                             {2, 64, 64, 1, 64, 1, 64}};
	const struct lp_lora_seg segs[] = {{0, 4, 0}, {4, 6, 1}, {10, 3, 2}, {13, 0, 1}};
	struct lp_lora_dims d = dims_of(&smol);
	int ra[2][LP_LORA_N_TARGETS], rb[2][LP_LORA_N_TARGETS];
	struct lp_err err;
	struct adapter a, b, c;

	uniform_ranks(ra, 1);
	uniform_ranks(rb, 64);
	adapter_make(&a, &d, ra, LP_DTYPE_F32, LP_DTYPE_F32, NULL, LP_DTYPE_F32);
	adapter_make(&b, &d, rb, LP_DTYPE_BF16, LP_DTYPE_BF16, NULL, LP_DTYPE_F32);
	adapter_make(&c, &d, rc, LP_DTYPE_F16, LP_DTYPE_F32, NULL, LP_DTYPE_F32);
	for (int ai = 0; ai < 3 && !test_current_failed; ai++) {
		struct adapter ar, br, cr; /* the values an arena of this type holds */
		struct adapter *dev[N_SLOTS] = {&a, &b, &c, NULL};
		struct adapter *held[N_SLOTS] = {&ar, &br, &cr, NULL};

		CHECK_OK(reserve(&smol, arenas[ai], &err), &err);
		adapter_make(&ar, &d, ra, LP_DTYPE_F32, LP_DTYPE_F32, &a, arenas[ai]);
		adapter_make(&br, &d, rb, LP_DTYPE_F32, LP_DTYPE_F32, &b, arenas[ai]);
		adapter_make(&cr, &d, rc, LP_DTYPE_F32, LP_DTYPE_F32, &c, arenas[ai]);
		for (int g = 0; g < LP_LORA_N_GROUPS && !test_current_failed; g++) {
			struct step st = make_step(g & 1, g, 13, 4, segs);
			char what[80];

			snprintf(what, sizeof(what), "arena %s group %d (held values)",
			         lp_dtype_name(arenas[ai]), g);
			if (!check(what, &st, &d, dev, held, 1e-5))
				break;
			snprintf(what, sizeof(what), "arena %s group %d (adapter's values)",
			         lp_dtype_name(arenas[ai]), g);
			check(what, &st, &d, dev, dev, loose[ai]);
		}
		adapter_free(&ar);
		adapter_free(&br);
		adapter_free(&cr);
	}
	adapter_free(&a);
	adapter_free(&b);
	adapter_free(&c);
}

/* Ranks above what the expand stages in shared memory at a time (64):
 * 130 and 200 in one step, SGMV and BGMV alike. */
static void test_big_ranks(void)
{
	struct lp_lora_dims d = dims_of(&smol);
	static const int ra[2][LP_LORA_N_TARGETS] = {{130, 65, 200, 129, 1, 200, 64},
	                                             {200, 200, 200, 200, 200, 200, 200}};
	int rb[2][LP_LORA_N_TARGETS];
	const struct lp_lora_seg segs[] = {{0, 17, 0}, {17, 3, 2}, {21, 1, 0}};
	struct lp_err err;
	struct adapter a, b;
	struct adapter *slots[N_SLOTS] = {&a, NULL, &b, NULL};

	uniform_ranks(rb, 3);
	CHECK_OK(reserve_rank(&smol, LP_DTYPE_BF16, BIG_RANK, &err), &err);
	adapter_make(&a, &d, ra, LP_DTYPE_BF16, LP_DTYPE_BF16, NULL, LP_DTYPE_F32);
	adapter_make(&b, &d, rb, LP_DTYPE_BF16, LP_DTYPE_BF16, NULL, LP_DTYPE_F32);
	for (int layer = 0; layer < MAX_LAYERS && !test_current_failed; layer++)
		for (int g = 0; g < LP_LORA_N_GROUPS && !test_current_failed; g++) {
			struct step st = make_step(layer, g, 24, 3, segs);
			char what[80];

			snprintf(what, sizeof(what), "big ranks layer %d group %d", layer, g);
			check(what, &st, &d, slots, slots, 1e-5);
		}
	adapter_free(&a);
	adapter_free(&b);
	reserve(&smol, LP_DTYPE_F32, &err);
}

/* One row; 300 rows of four adapters with a row in a segment of its own:
 * each segment's first row gives the same bits alone (SGMV and BGMV). */
static void test_one_and_300_rows(void)
{
	static const int r0[2][LP_LORA_N_TARGETS] = {{16, 16, 16, 16, 16, 16, 16},
	                                             {16, 16, 16, 16, 16, 16, 16}};
	static const int r1[2][LP_LORA_N_TARGETS] = {{8, 4, 2, 1, 64, 3, 5},
	                                             {8, 4, 2, 1, 64, 3, 5}};
	const struct lp_lora_seg big[] = {
	    {0, 77, 2}, {77, 100, 0}, {180, 1, 3}, {190, 60, 1}, {250, 50, 3}};
	const struct lp_lora_seg one[] = {{0, 1, 1}};
	struct lp_lora_dims d = dims_of(&smol);
	struct lp_err err;
	struct adapter a, b, c, e;
	struct adapter *slots[N_SLOTS] = {&a, &b, &c, &e};
	struct step st = make_step(0, LP_LORA_GROUP_QKV, 300, 5, big);
	struct step st1 = make_step(1, LP_LORA_GROUP_GATE_UP, 1, 1, one);
	struct io io;
	float *all = NULL;

	CHECK_OK(reserve(&smol, LP_DTYPE_BF16, &err), &err);
	adapter_make(&a, &d, r0, LP_DTYPE_BF16, LP_DTYPE_BF16, NULL, LP_DTYPE_F32);
	adapter_make(&b, &d, r1, LP_DTYPE_BF16, LP_DTYPE_BF16, NULL, LP_DTYPE_F32);
	adapter_make(&c, &d, r0, LP_DTYPE_BF16, LP_DTYPE_BF16, NULL, LP_DTYPE_F32);
	adapter_make(&e, &d, r1, LP_DTYPE_BF16, LP_DTYPE_BF16, NULL, LP_DTYPE_F32);
	if (!check("one row", &st1, &d, slots, slots, 1e-5) ||
	    !check("300 rows", &st, &d, slots, slots, 1e-5))
		goto out;
	io_make(&io, &d, st.group, st.n);
	all = run_cuda(&st, &io, false);
	for (int s = 0; s < st.n_segs && all && !test_current_failed; s++) {
		for (int decode = 0; decode < 2; decode++) {
			struct step alone = st;
			float *got;
			size_t off = 0;

			alone.n_segs = 1;
			alone.segs[0].row0 = st.segs[s].row0;
			alone.segs[0].rows = 1;
			alone.segs[0].slot = st.segs[s].slot;
			got = run_cuda(&alone, &io, decode != 0);
			for (int i = 0; got && i < io.n_outs; i++) {
				size_t row = off + (size_t)st.segs[s].row0 * io.outs[i];
				if (memcmp(got + row, all + row, (size_t)io.outs[i] * 4)) {
					TEST_FAIL("row %d of output %d differs alone (%s)",
					          st.segs[s].row0, i, decode ? "BGMV" : "SGMV");
					break;
				}
				off += (size_t)st.n * io.outs[i];
			}
			free(got);
		}
	}
	free(all);
	io_free(&io);
out:
	adapter_free(&a);
	adapter_free(&b);
	adapter_free(&c);
	adapter_free(&e);
}

/* A slot refilled with another adapter between steps serves the new one,
 * even when the host weights are freed as soon as fill returns, and fills
 * queued back to back (the second waits for the first's staging) leave the
 * last one. An op queued before a fill sees the slot's old adapter. */
static void test_refill_and_ordering(void)
{
	struct lp_lora_dims d = dims_of(&odd);
	int r4[2][LP_LORA_N_TARGETS], r9[2][LP_LORA_N_TARGETS];
	const struct lp_lora_seg segs[] = {{1, 4, 2}};
	struct step st = make_step(1, LP_LORA_GROUP_DOWN, 6, 1, segs);
	struct adapter a, b, tmp;
	struct adapter *first[N_SLOTS] = {NULL, NULL, &a, NULL};
	struct adapter *second[N_SLOTS] = {NULL, NULL, &b, NULL};
	struct lp_err err;
	struct io io;
	struct dev_step ds;
	float *before = NULL, *got = NULL, *want = NULL;
	char where[256];

	uniform_ranks(r4, 4);
	uniform_ranks(r9, 9);
	CHECK_OK(reserve(&odd, LP_DTYPE_F16, &err), &err);
	adapter_make(&a, &d, r4, LP_DTYPE_F16, LP_DTYPE_F16, NULL, LP_DTYPE_F32);
	adapter_make(&b, &d, r9, LP_DTYPE_F16, LP_DTYPE_F16, NULL, LP_DTYPE_F32);
	if (!check("first adapter", &st, &d, first, first, 1e-5) ||
	    !check("refilled", &st, &d, second, second, 1e-5))
		goto out;

	/* queued: op with a, fill with b, op again; a copy of b's host
	 * weights is freed right after fill returns */
	io_make(&io, &d, st.group, st.n);
	CHECK_OK(lp_cuda_lora_fill(&cu, 2, &a.w, &err), &err);
	CHECK(dev_step_make(&ds, &st, &io, false));
	lp_cuda_lora(&cu, &ds.args);
	adapter_make(&tmp, &d, r9, LP_DTYPE_F16, LP_DTYPE_F16, &b, LP_DTYPE_F32);
	CHECK_OK(lp_cuda_lora_fill(&cu, 2, &tmp.w, &err), &err);
	adapter_free(&tmp);
	before = dev_step_result(&ds, &io, st.n);
	dev_step_free(&ds);
	want = run_cpu(&st, &io, first);
	CHECK(before && want);
	CHECK_MSG(rel_err(before, want, &st, &io, first, where, sizeof(where)) <= 1e-5,
	          "the op queued before the fill saw the new adapter: %s", where);
	got = run_cuda(&st, &io, true);
	free(want);
	want = run_cpu(&st, &io, second);
	CHECK(got && want);
	CHECK_MSG(rel_err(got, want, &st, &io, second, where, sizeof(where)) <= 1e-5,
	          "the op after the fill did not see it: %s", where);

	/* back to back: a, then b; b stays */
	CHECK_OK(lp_cuda_lora_fill(&cu, 2, &a.w, &err), &err);
	CHECK_OK(lp_cuda_lora_fill(&cu, 2, &b.w, &err), &err);
	free(got);
	got = run_cuda(&st, &io, false);
	CHECK(got);
	CHECK_MSG(rel_err(got, want, &st, &io, second, where, sizeof(where)) <= 1e-5,
	          "back-to-back fills: %s", where);
	CHECK_EQ_INT(cu.status, 0);
	io_free(&io);
out:
	free(before);
	free(got);
	free(want);
	adapter_free(&a);
	adapter_free(&b);
}

/* Decode captured in a CUDA Graph and replayed with other slots per row:
 * the launch shape depends on nothing the device holds. */
static void test_graph_replay(void)
{
	struct lp_lora_dims d = dims_of(&smol);
	int r8[2][LP_LORA_N_TARGETS], r3[2][LP_LORA_N_TARGETS];
	struct adapter a, b;
	struct adapter *slots[N_SLOTS] = {&a, NULL, &b, NULL};
	const struct lp_lora_seg segs1[] = {{0, 2, 0}, {3, 2, 2}};
	const struct lp_lora_seg segs2[] = {{0, 1, 2}, {1, 3, 0}, {4, 1, 2}};
	struct step s1 = make_step(0, LP_LORA_GROUP_O, 6, 2, segs1);
	struct step s2 = make_step(0, LP_LORA_GROUP_O, 6, 3, segs2);
	struct lp_err err;
	struct io io;
	struct dev_step ds;
	cudaGraph_t graph = NULL;
	cudaGraphExec_t exec = NULL;
	int32_t ts[MAX_ROWS];
	float *got = NULL, *want = NULL;
	char where[256];

	uniform_ranks(r8, 8);
	uniform_ranks(r3, 3);
	CHECK_OK(reserve(&smol, LP_DTYPE_F16, &err), &err);
	adapter_make(&a, &d, r8, LP_DTYPE_F16, LP_DTYPE_F16, NULL, LP_DTYPE_F32);
	adapter_make(&b, &d, r3, LP_DTYPE_F16, LP_DTYPE_F16, NULL, LP_DTYPE_F32);
	CHECK_OK(fill_cuda(slots, &err), &err);
	io_make(&io, &d, s1.group, s1.n);
	CHECK(dev_step_make(&ds, &s1, &io, true));
	/* the fills are waited for before capture, as begin_step does */
	lp_cuda_lora(&cu, &ds.args);
	CHECK(cudaStreamSynchronize(cu.stream) == cudaSuccess);
	CHECK(cudaStreamBeginCapture(cu.stream, cudaStreamCaptureModeGlobal) == cudaSuccess);
	lp_cuda_lora(&cu, &ds.args);
	CHECK(cudaStreamEndCapture(cu.stream, &graph) == cudaSuccess);
	CHECK(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
	CHECK_EQ_INT(cu.status, 0);
	/* new step: other slots per row, outputs reset */
	tok_slots(&s2, ts);
	CHECK(cudaMemcpy(ds.ts, ts, sizeof(ts), cudaMemcpyHostToDevice) == cudaSuccess);
	for (int i = 0; i < io.n_outs; i++)
		CHECK(cudaMemcpy(ds.out[i], io.out0[i], (size_t)s2.n * io.outs[i] * 4,
		                 cudaMemcpyHostToDevice) == cudaSuccess);
	CHECK(cudaDeviceSynchronize() == cudaSuccess);
	CHECK(cudaGraphLaunch(exec, cu.stream) == cudaSuccess);
	got = dev_step_result(&ds, &io, s2.n);
	want = run_cpu(&s2, &io, slots);
	CHECK(got && want);
	CHECK_MSG(rel_err(got, want, &s2, &io, slots, where, sizeof(where)) <= 1e-5,
	          "replayed graph: %s", where);
	free(got);
	free(want);
	cudaGraphExecDestroy(exec);
	cudaGraphDestroy(graph);
	dev_step_free(&ds);
	io_free(&io);
	adapter_free(&a);
	adapter_free(&b);
}

/* Bad input. Fill refuses a slot outside the range, a rank above the
 * limit, inconsistent weights. The op skips a segment (or a row's
 * tok_slot) naming a slot outside the range or an empty one, or reaching
 * outside the rows, flags LP_CUDA_BAD_LORA_SLOT, and applies the rest. */
static void test_bad_slots(void)
{
	struct lp_lora_dims d = dims_of(&odd);
	int r4[2][LP_LORA_N_TARGETS], r65[2][LP_LORA_N_TARGETS];
	struct adapter a, big;
	struct adapter *slots[N_SLOTS] = {&a, NULL, NULL, NULL};
	const struct lp_lora_seg segs[] = {{0, 2, 7}, {2, 2, 1}, {8, 5, 0}, {4, 3, 0}, {7, 1, -1}};
	const struct lp_lora_seg good_segs[] = {{4, 3, 0}};
	struct step st = make_step(0, LP_LORA_GROUP_QKV, 10, 5, segs);
	struct step good = make_step(0, LP_LORA_GROUP_QKV, 10, 1, good_segs);
	struct lp_err err;
	struct io io;
	float *want = NULL;
	char where[256];

	uniform_ranks(r4, 4);
	uniform_ranks(r65, 65);
	CHECK_OK(reserve(&odd, LP_DTYPE_F32, &err), &err);
	adapter_make(&a, &d, r4, LP_DTYPE_F32, LP_DTYPE_F32, NULL, LP_DTYPE_F32);
	adapter_make(&big, &d, r65, LP_DTYPE_F32, LP_DTYPE_F32, NULL, LP_DTYPE_F32);
	CHECK_EQ_INT(lp_cuda_lora_fill(&cu, N_SLOTS, &a.w, &err), -EINVAL);
	CHECK_EQ_INT(lp_cuda_lora_fill(&cu, -1, &a.w, &err), -EINVAL);
	CHECK_EQ_INT(lp_cuda_lora_fill(&cu, 0, &big.w, &err), -EINVAL);
	CHECK_MSG(strstr(err.msg, "rank 65"), "the message names the rank: %s", err.msg);
	a.stacks[LP_LORA_GROUP_O].rank = 5;
	CHECK_EQ_INT(lp_cuda_lora_fill(&cu, 0, &a.w, &err), -EINVAL);
	a.stacks[LP_LORA_GROUP_O].rank = 4;
	adapter_free(&big);
	CHECK_EQ_INT(cu.status, 0);

	/* slot 1 was filled, then cleared: empty */
	CHECK_OK(lp_cuda_lora_fill(&cu, 1, &a.w, &err), &err);
	lp_cuda_lora_clear(&cu, 1);
	CHECK_OK(lp_cuda_lora_fill(&cu, 0, &a.w, &err), &err);
	reset_context();
	io_make(&io, &d, st.group, st.n);
	want = run_cpu(&good, &io, slots);
	for (int decode = 0; decode < 2 && want; decode++) {
		float *got = run_cuda(&st, &io, decode != 0);
		unsigned bad = bad_flags(true);

		CHECK(got);
		CHECK_MSG(bad == LP_CUDA_BAD_LORA_SLOT, "%s: bad flags %#x",
		          decode ? "BGMV" : "SGMV", bad);
		CHECK_MSG(rel_err(got, want, &good, &io, slots, where, sizeof(where)) <= 1e-5,
		          "%s: %s", decode ? "BGMV" : "SGMV", where);
		CHECK_EQ_INT(cu.status, 0);
		free(got);
	}
	/* tok_slot -1 alone is no error */
	{
		const struct lp_lora_seg none[] = {{0, 0, 0}};
		struct step st0 = make_step(0, LP_LORA_GROUP_QKV, 10, 1, none);
		float *got = run_cuda(&st0, &io, true);

		CHECK(got);
		CHECK_EQ_INT(bad_flags(true), 0);
		CHECK(!memcmp(got, io.out0[0], (size_t)st0.n * io.outs[0] * 4));
		free(got);
	}
	free(want);
	io_free(&io);
	adapter_free(&a);
}

/* Shapes the op refuses go to the sticky status. */
static void test_shape_errors(void)
{
	struct lp_lora_dims d = dims_of(&odd);
	const struct lp_lora_seg segs[] = {{0, 2, 0}};
	struct step st = make_step(0, LP_LORA_GROUP_QKV, 4, 1, segs);
	struct lp_err err;
	struct io io;
	struct dev_step ds;

	CHECK_OK(reserve(&odd, LP_DTYPE_F32, &err), &err);
	reset_context();
	io_make(&io, &d, st.group, st.n);
	CHECK(dev_step_make(&ds, &st, &io, false));
	ds.ttmp.cols = 3 * MAX_RANK - 1; /* too narrow for three targets */
	lp_cuda_lora(&cu, &ds.args);
	CHECK_EQ_INT(cu.status, -EINVAL);
	CHECK_MSG(strstr(cu.status_msg, "lora"), "status names the op: %s", cu.status_msg);
	reset_context();
	ds.ttmp.cols = 3 * MAX_RANK;
	ds.args.layer = MAX_LAYERS;
	lp_cuda_lora(&cu, &ds.args);
	CHECK_EQ_INT(cu.status, -EINVAL);
	reset_context();
	dev_step_free(&ds);
	io_free(&io);
}

int main(void)
{
	struct lp_err err;
	struct lp_backend_limits lim;
	size_t bytes;

	TEST_MAIN_BEGIN("test-cuda-lora");
	if (lp_cuda_init(&cu, 0, &err) != 0) {
		printf("FAIL test-cuda-lora:init: %s\n", err.msg);
		return 1;
	}
	memset(&lim, 0, sizeof(lim));
	lim.max_loras = N_SLOTS;
	lim.max_lora_rank = BIG_RANK;
	if (lp_backend_cpu_new(&cpu, 2, &err) != 0 ||
	    cpu->ops->reserve(cpu->ctx, &lim, &bytes, &err) != 0) {
		printf("FAIL test-cuda-lora:init: %s\n", err.msg);
		return 1;
	}
	if (cudaMalloc((void **)&cu.bad, sizeof(unsigned)) != cudaSuccess) {
		printf("FAIL test-cuda-lora:init: cannot allocate the flag word\n");
		return 1;
	}
	reset_context();
	RUN(test_groups_f32);
	RUN(test_types_and_ranks);
	RUN(test_big_ranks);
	RUN(test_one_and_300_rows);
	RUN(test_refill_and_ordering);
	RUN(test_graph_replay);
	RUN(test_bad_slots);
	RUN(test_shape_errors);
	lp_cuda_lora_release(&cu);
	cudaFree(cu.bad);
	lp_cuda_release(&cu);
	lp_backend_destroy(cpu);
	TEST_MAIN_END();
}
