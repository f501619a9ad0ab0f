/* The CPU backend's LoRA slots and LoRA op against a double-precision
 * reference written here.
 *
 * Adapters are built as agent/adapters/ lays them out (struct
 * lp_lora_weights: per layer and target a pair, A stacked per group, B
 * transposed in panels), filled into slots, and driven by segments. Every
 * case runs on three backends: AVX2 with three threads, the portable C path
 * with three threads, and AVX2 on one thread.
 *
 * Tolerance: 1e-5 of the sum of the magnitudes of the terms (x . A^T
 * products in f32 with f32 accumulation, rank <= 64, inputs in [-1, 1]:
 * a few ulp of float per term). Where a row's result must not depend on the
 * rest of the batch or on how the rows are grouped, the test asks for the
 * same bits. */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "kernels/cpu/cpu.h"
#include "tests/test.h"

#define N_BACKENDS 3
#define N_SLOTS    4
#define MAX_RANK   64
#define MAX_SEGS   320

static struct lp_backend *g_be[N_BACKENDS];
static const char *g_be_name[N_BACKENDS] = {"avx2x3", "scalar-x3", "avx2x1"};

static uint64_t rng_state = 0x10a4cafe5eedULL;

static uint64_t rng_next(void)
{
	return test_splitmix64(&rng_state);
}

static float frand(float lo, float hi)
{
	return lo + (hi - lo) * (float)((rng_next() >> 40) * (1.0 / 16777216.0));
}

/* ---- adapters as agent/adapters/ lays them out ---- */

#define MAX_LAYERS 3

struct adapter {
	struct lp_lora_weights w;
	struct lp_lora_pair pairs[MAX_LAYERS * LP_LORA_N_TARGETS];
	struct lp_lora_stack stacks[MAX_LAYERS * LP_LORA_N_GROUPS];
	void *stack_mem[MAX_LAYERS][LP_LORA_N_GROUPS]; /* the group's A, stacked */
	void *b_mem[MAX_LAYERS][LP_LORA_N_TARGETS];    /* B transposed, panels */
	/* the values stored, as f32: A [rank, in], B transposed [rank, out]
	 * row-major (not in panels) */
	float *a[MAX_LAYERS][LP_LORA_N_TARGETS];
	float *b[MAX_LAYERS][LP_LORA_N_TARGETS];
};

static size_t type_size(enum lp_dtype t)
{
	return t == LP_DTYPE_F32 ? 4 : 2;
}

/* Stores v as type t at dst[i] and returns the value stored. */
static float store(void *dst, size_t i, enum lp_dtype t, float v)
{
	uint16_t h;

	if (t == LP_DTYPE_F32) {
		((float *)dst)[i] = v;
		return v;
	}
	h = t == LP_DTYPE_F16 ? lp_f32_to_f16(v) : lp_f32_to_bf16(v);
	((uint16_t *)dst)[i] = h;
	return t == LP_DTYPE_F16 ? lp_f16_to_f32(h) : lp_bf16_to_f32(h);
}

/* ranks[l][t]: 0 leaves target t out of layer l. With src, the values are
 * src's (converted to the new types), else random. */
static void adapter_make(struct adapter *ad, const struct lp_lora_dims *d,
                         const int ranks[][LP_LORA_N_TARGETS], enum lp_dtype at, enum lp_dtype bt,
                         const struct adapter *src)
{
	memset(ad, 0, sizeof(*ad));
	ad->w.n_layers = d->n_layers;
	ad->w.pairs = ad->pairs;
	ad->w.stacks = ad->stacks;
	for (int l = 0; l < d->n_layers; l++) {
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
				ad->a[l][t] = malloc((size_t)r * (size_t)in * sizeof(float));
				ad->b[l][t] = malloc((size_t)r * (size_t)out * sizeof(float));
				for (size_t i = 0; i < (size_t)r * (size_t)in; i++)
					ad->a[l][t][i] =
					    store(p->a, i, at,
					          src ? src->a[l][t][i] : frand(-0.5f, 0.5f));
				for (int k = 0; k < r; k++)
					for (int o = 0; o < out; o++) {
						size_t i = (size_t)k * (size_t)out + (size_t)o;
						ad->b[l][t][i] = store(
						    p->b, lp_lora_b_index(r, out, k, o), bt,
						    src ? src->b[l][t][i] : frand(-0.5f, 0.5f));
					}
				rows += r;
			}
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

/* Every target of every layer at rank r. */
static void uniform_ranks(int ranks[][LP_LORA_N_TARGETS], int n_layers, int r)
{
	for (int l = 0; l < n_layers; l++)
		for (int t = 0; t < LP_LORA_N_TARGETS; t++)
			ranks[l][t] = r;
}

/* ---- one op call ---- */

struct step {
	int layer;
	enum lp_lora_group group;
	int n; /* rows */
	int n_segs;
	struct lp_lora_seg segs[MAX_SEGS];
};

struct io {
	float *x;                      /* [n, in] */
	float *out0[LP_LORA_MAX_OUTS]; /* [n, out_i]: what the outputs hold before */
	int in, outs[LP_LORA_MAX_OUTS], n_outs;
};

static void io_make(struct io *io, const struct lp_lora_dims *d, enum lp_lora_group g, int n)
{
	int first, out;

	memset(io, 0, sizeof(*io));
	lp_lora_group_targets(g, &first, &io->n_outs);
	lp_lora_dims_of(d, (enum lp_lora_target)first, &io->in, &out);
	io->x = malloc((size_t)n * (size_t)io->in * sizeof(float));
	for (size_t i = 0; i < (size_t)n * (size_t)io->in; i++)
		io->x[i] = frand(-1, 1);
	for (int i = 0; i < io->n_outs; i++) {
		int in;

		lp_lora_dims_of(d, (enum lp_lora_target)(first + i), &in, &io->outs[i]);
		io->out0[i] = malloc((size_t)n * (size_t)io->outs[i] * sizeof(float));
		for (size_t e = 0; e < (size_t)n * (size_t)io->outs[i]; e++)
			io->out0[i][e] = frand(-1, 1);
	}
}

static void io_free(struct io *io)
{
	free(io->x);
	for (int i = 0; i < LP_LORA_MAX_OUTS; i++)
		free(io->out0[i]);
}

static size_t io_out_total(const struct io *io, int n)
{
	size_t total = 0;

	for (int i = 0; i < io->n_outs; i++)
		total += (size_t)n * (size_t)io->outs[i];
	return total;
}

/* Device buffer holding n host bytes (NULL: zeroed). */
static void *dev(struct lp_backend *be, struct lp_buffer *buf, const void *host, size_t n)
{
	struct lp_err err = {0};

	if (lp_backend_alloc(be, n ? n : 4, buf, &err))
		return NULL;
	if (host && n)
		lp_backend_upload(be, buf->data, host, n);
	return buf->data;
}

/* Runs the op once and returns the outputs, one after another (malloc'd),
 * or NULL when a buffer could not be made. */
static float *run_step(struct lp_backend *be, const struct step *st, const struct io *io)
{
	struct lp_buffer bx = {0}, btmp = {0}, bsegs = {0}, bslot = {0},
	                 bout[LP_LORA_MAX_OUTS] = {0};
	struct lp_tensor tx, ttmp, tout[LP_LORA_MAX_OUTS];
	struct lp_lora_args args = {.layer = st->layer, .group = st->group, .n_segs = st->n_segs};
	int32_t *tok_slot = malloc((size_t)st->n * sizeof(int32_t) + 4);
	float *res = malloc(io_out_total(io, st->n) * sizeof(float) + 4);
	size_t at = 0;
	bool ok = true;

	for (int r = 0; r < st->n; r++)
		tok_slot[r] = -1;
	/* a segment reaching outside the rows has no rows in tok_slot */
	for (int s = 0; s < st->n_segs; s++)
		if (st->segs[s].row0 >= 0 && st->segs[s].row0 + st->segs[s].rows <= st->n)
			for (int r = 0; r < st->segs[s].rows; r++)
				tok_slot[st->segs[s].row0 + r] = st->segs[s].slot;
	tx = (struct lp_tensor){dev(be, &bx, io->x, (size_t)st->n * io->in * sizeof(float)),
	                        LP_DTYPE_F32, st->n, io->in};
	ttmp =
	    (struct lp_tensor){dev(be, &btmp, NULL, (size_t)st->n * 3 * MAX_RANK * sizeof(float)),
	                       LP_DTYPE_F32, st->n, 3 * MAX_RANK};
	args.segs = dev(be, &bsegs, st->segs, (size_t)st->n_segs * sizeof(st->segs[0]));
	args.tok_slot = dev(be, &bslot, tok_slot, (size_t)st->n * sizeof(int32_t));
	ok = tx.data && ttmp.data && args.segs && args.tok_slot;
	args.x = &tx;
	args.tmp = &ttmp;
	for (int i = 0; i < io->n_outs; i++) {
		size_t bytes = (size_t)st->n * (size_t)io->outs[i] * sizeof(float);
		tout[i] = (struct lp_tensor){dev(be, &bout[i], io->out0[i], bytes), LP_DTYPE_F32,
		                             st->n, io->outs[i]};
		ok = ok && tout[i].data;
		args.out[i] = &tout[i];
	}
	if (ok) {
		be->ops->lora(be->ctx, &args);
		for (int i = 0; i < io->n_outs; i++) {
			size_t cnt = (size_t)st->n * (size_t)io->outs[i];
			lp_backend_download(be, res + at, tout[i].data, cnt * sizeof(float));
			at += cnt;
		}
	}
	lp_backend_free(be, &bx);
	lp_backend_free(be, &btmp);
	lp_backend_free(be, &bsegs);
	lp_backend_free(be, &bslot);
	for (int i = 0; i < LP_LORA_MAX_OUTS; i++)
		lp_backend_free(be, &bout[i]);
	free(tok_slot);
	if (!ok) {
		free(res);
		return NULL;
	}
	return res;
}

/* Largest error of got against the double reference, relative to the sum
 * of the magnitudes of each element's terms (|x_c a_kc| summed, times
 * |b_ko|); *where names it. */
static double check_ref(const float *got, const struct step *st, const struct io *io,
                        struct adapter *const slots[], char *where, size_t where_len)
{
	int first, cnt;
	size_t at = 0;
	double worst = 0, tk[MAX_RANK], tmag[MAX_RANK];

	lp_lora_group_targets(st->group, &first, &cnt);
	for (int i = 0; i < io->n_outs; i++) {
		int t = first + i, out = io->outs[i];

		for (int r = 0; r < st->n; r++) {
			const struct adapter *ad = NULL;
			int rank = 0;

			for (int s = 0; s < st->n_segs; s++)
				if (r >= st->segs[s].row0 &&
				    r < st->segs[s].row0 + st->segs[s].rows)
					ad = slots[st->segs[s].slot];
			if (ad && st->layer < ad->w.n_layers)
				rank = ad->pairs[st->layer * LP_LORA_N_TARGETS + t].rank;
			/* x . A^T once per row and rank, and its magnitude */
			for (int k = 0; k < rank; k++) {
				tk[k] = tmag[k] = 0;
				for (int c = 0; c < io->in; c++) {
					double v = (double)io->x[(size_t)r * io->in + c] *
					           ad->a[st->layer][t][(size_t)k * io->in + c];
					tk[k] += v;
					tmag[k] += fabs(v);
				}
			}
			for (int o = 0; o < out; o++) {
				double want = io->out0[i][(size_t)r * out + o], mag = fabs(want), e;

				for (int k = 0; k < rank; k++) {
					double b = ad->b[st->layer][t][(size_t)k * out + o];
					want += tk[k] * b;
					mag += tmag[k] * fabs(b);
				}
				e = fabs(got[at + (size_t)r * out + o] - want) / (mag + 1e-6);
				if (!(e <= worst)) {
					worst = e;
					snprintf(where, where_len,
					         "output %d row %d col %d: %g, want %g", i, r, o,
					         (double)got[at + (size_t)r * out + o], want);
					if (isnan(e))
						return INFINITY;
				}
			}
		}
		at += (size_t)st->n * (size_t)out;
	}
	return worst;
}

/* The same rows, each in a segment of its own. */
static void per_row(const struct step *st, struct step *one)
{
	*one = *st;
	one->n_segs = 0;
	for (int s = 0; s < st->n_segs; s++)
		for (int r = 0; r < st->segs[s].rows && one->n_segs < MAX_SEGS; r++)
			one->segs[one->n_segs++] =
			    (struct lp_lora_seg){st->segs[s].row0 + r, 1, st->segs[s].slot};
}

static int status_of(struct lp_backend *be, char *msg, size_t len)
{
	struct lp_err err = {0};
	int rc = be->ops->status(be->ctx, &err);

	snprintf(msg, len, "%s", err.msg);
	return rc;
}

/* Fills slots[s] into slot s, runs st on backend b, compares with the
 * reference; then the rows each in their own segment, and each segment's
 * first row alone, must give the same bits. */
static int check_step(int b, const char *what, const struct step *st,
                      struct adapter *const slots[N_SLOTS], const struct lp_lora_dims *d)
{
	struct lp_backend *be = g_be[b];
	struct lp_err err = {0};
	struct io io;
	struct step *one = malloc(sizeof(*one));
	float *got = NULL, *got1 = NULL;
	char where[LP_ERR_MSG_MAX] = "";
	double worst;
	int ok = 0;

	io_make(&io, d, st->group, st->n);
	for (int s = 0; s < N_SLOTS; s++) {
		if (!slots[s]) {
			be->ops->lora_clear(be->ctx, s);
			continue;
		}
		if (be->ops->lora_fill(be->ctx, s, &slots[s]->w, &err)) {
			TEST_FAIL("%s %s: fill of slot %d: %s", g_be_name[b], what, s, err.msg);
			goto out;
		}
	}
	got = run_step(be, st, &io);
	if (!got) {
		TEST_FAIL("%s %s: allocation failed", g_be_name[b], what);
		goto out;
	}
	if (status_of(be, where, sizeof(where))) {
		TEST_FAIL("%s %s: backend status: %s", g_be_name[b], what, where);
		goto out;
	}
	worst = check_ref(got, st, &io, slots, where, sizeof(where));
	if (worst > 1e-5) {
		TEST_FAIL("%s %s: error %g at %s", g_be_name[b], what, worst, where);
		goto out;
	}
	per_row(st, one);
	got1 = run_step(be, one, &io);
	if (!got1 || memcmp(got1, got, io_out_total(&io, st->n) * sizeof(float))) {
		TEST_FAIL("%s %s: one segment per row differs from the grouped segments",
		          g_be_name[b], what);
		goto out;
	}
	for (int s = 0; s < st->n_segs; s++) {
		size_t off = 0;
		float *alone;

		if (!st->segs[s].rows)
			continue;
		*one = *st;
		one->n_segs = 1;
		one->segs[0] = (struct lp_lora_seg){st->segs[s].row0, 1, st->segs[s].slot};
		alone = run_step(be, one, &io);
		for (int i = 0; alone && i < io.n_outs; i++) {
			size_t row = off + (size_t)st->segs[s].row0 * io.outs[i];
			if (memcmp(alone + row, got + row, (size_t)io.outs[i] * sizeof(float))) {
				TEST_FAIL("%s %s: row %d of output %d differs alone", g_be_name[b],
				          what, st->segs[s].row0, i);
				free(alone);
				goto out;
			}
			off += (size_t)st->n * (size_t)io.outs[i];
		}
		free(alone);
	}
	ok = 1;
out:
	free(got);
	free(got1);
	free(one);
	io_free(&io);
	return ok;
}

/* ---- the cases ---- */

static const struct lp_lora_dims smol = {2, 576, 576, 192, 1536};
static const struct lp_lora_dims tiny = {2, 40, 24, 8, 72};
static const struct lp_lora_dims odd = {2, 33, 21, 7, 70}; /* nothing a multiple of 8 */

/* Segments with gaps between them and after them, an empty one, ranks
 * that differ between slots and targets (rank 0 leaves a target out), on
 * every group of three model shapes. */
static void test_groups_and_shapes(void)
{
	const struct lp_lora_dims *dims[] = {&tiny, &odd, &smol};
	static const int r0[2][LP_LORA_N_TARGETS] = {{4, 4, 4, 4, 4, 4, 4}, {8, 0, 8, 3, 5, 0, 2}};
	static const int r1[2][LP_LORA_N_TARGETS] = {{16, 7, 0, 1, 0, 9, 16},
	                                             {5, 7, 3, 16, 16, 16, 16}};
	static const int r2[2][LP_LORA_N_TARGETS] = {{1, 1, 1, 1, 1, 1, 1}, {0, 0, 0, 0, 0, 0, 0}};

	for (size_t di = 0; di < sizeof(dims) / sizeof(dims[0]); di++) {
		struct adapter a0, a1, a2;
		struct adapter *slots[N_SLOTS] = {&a0, &a1, NULL, &a2};

		adapter_make(&a0, dims[di], r0, LP_DTYPE_F32, LP_DTYPE_F32, NULL);
		adapter_make(&a1, dims[di], r1, LP_DTYPE_F32, LP_DTYPE_F32, NULL);
		adapter_make(&a2, dims[di], r2, LP_DTYPE_F32, LP_DTYPE_F32, NULL);
		for (int b = 0; b < N_BACKENDS; b++)
			for (int layer = 0; layer < 2; layer++)
				for (int g = 0; g < LP_LORA_N_GROUPS; g++) {
					struct step st = {
					    layer,
					    (enum lp_lora_group)g,
					    23,
					    4,
					    {{0, 5, 1}, {6, 0, 0}, {7, 9, 0}, {17, 4, 3}}};
					char what[64];
					int ok;

					snprintf(what, sizeof(what), "dims %zu layer %d group %d",
					         di, layer, g);
					ok = check_step(b, what, &st, slots, dims[di]);
					if (!ok) {
						adapter_free(&a0);
						adapter_free(&a1);
						adapter_free(&a2);
						return;
					}
				}
		adapter_free(&a0);
		adapter_free(&a1);
		adapter_free(&a2);
	}
}

/* Rank 1 and rank 64 (the largest the slots take) side by side in one
 * step, with a slot of mixed ranks between them. */
static void test_rank_1_and_64(void)
{
	int ra[2][LP_LORA_N_TARGETS], rb[2][LP_LORA_N_TARGETS];
	static const int rc[2][LP_LORA_N_TARGETS] = {{64, 1, 32, 64, 1, 64, 13},
	                                             {2, 64, 64, 1, 64, 1, 64}};
	struct adapter a, bb, c;
	struct adapter *slots[N_SLOTS] = {&a, &bb, &c, NULL};

	uniform_ranks(ra, 2, 1);
	uniform_ranks(rb, 2, 64);
	adapter_make(&a, &smol, ra, LP_DTYPE_F32, LP_DTYPE_F32, NULL);
	adapter_make(&bb, &smol, rb, LP_DTYPE_BF16, LP_DTYPE_BF16, NULL);
	adapter_make(&c, &smol, rc, LP_DTYPE_F16, LP_DTYPE_F32, NULL);
	for (int b = 0; b < N_BACKENDS; b++)
		for (int g = 0; g < LP_LORA_N_GROUPS; g++) {
			struct step st = {g & 1,
			                  (enum lp_lora_group)g,
			                  13,
			                  3,
			                  {{0, 4, 0}, {4, 6, 1}, {10, 3, 2}}};
			char what[64];

			snprintf(what, sizeof(what), "ranks 1/64 group %d", g);
			if (!check_step(b, what, &st, slots, &smol))
				goto out;
		}
out:
	adapter_free(&a);
	adapter_free(&bb);
	adapter_free(&c);
}

/* Half-precision weights (the adapter file's) are converted in registers,
 * exactly: they give the same bits as the same values stored in f32. */
static void test_half_weights_exact(void)
{
	static const struct {
		enum lp_dtype a, b;
	} types[] = {{LP_DTYPE_BF16, LP_DTYPE_BF16},
	             {LP_DTYPE_F16, LP_DTYPE_F16},
	             {LP_DTYPE_BF16, LP_DTYPE_F32},
	             {LP_DTYPE_F16, LP_DTYPE_BF16}};
	static const int ranks[2][LP_LORA_N_TARGETS] = {{16, 8, 3, 16, 16, 5, 9},
	                                                {7, 0, 16, 2, 0, 16, 16}};

	for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
		struct adapter h, f;
		struct adapter *hs[N_SLOTS] = {&h, NULL, NULL, NULL};
		struct adapter *fs[N_SLOTS] = {NULL, NULL, &f, NULL};
		const struct lp_lora_dims *d = ti & 1 ? &odd : &smol;

		adapter_make(&h, d, ranks, types[ti].a, types[ti].b, NULL);
		adapter_make(&f, d, ranks, LP_DTYPE_F32, LP_DTYPE_F32, &h);
		for (int b = 0; b < N_BACKENDS; b++)
			for (int g = 0; g < LP_LORA_N_GROUPS; g++) {
				struct step sh = {
				    0, (enum lp_lora_group)g, 9, 2, {{0, 4, 0}, {5, 4, 0}}};
				struct step sf = {
				    0, (enum lp_lora_group)g, 9, 2, {{0, 4, 2}, {5, 4, 2}}};
				struct io io;
				float *gh = NULL, *gf = NULL;
				char what[64];
				int same;

				snprintf(what, sizeof(what), "types %zu group %d", ti, g);
				if (!check_step(b, what, &sh, hs, d) ||
				    !check_step(b, what, &sf, fs, d))
					goto out;
				io_make(&io, d, (enum lp_lora_group)g, 9);
				struct lp_err err = {0};
				CHECK_OK(g_be[b]->ops->lora_fill(g_be[b]->ctx, 0, &h.w, &err),
				         &err);
				CHECK_OK(g_be[b]->ops->lora_fill(g_be[b]->ctx, 2, &f.w, &err),
				         &err);
				gh = run_step(g_be[b], &sh, &io);
				gf = run_step(g_be[b], &sf, &io);
				same = gh && gf &&
				       !memcmp(gh, gf, io_out_total(&io, 9) * sizeof(float));
				free(gh);
				free(gf);
				io_free(&io);
				if (!same) {
					TEST_FAIL(
					    "%s %s: half weights differ from their values in f32",
					    g_be_name[b], what);
					goto out;
				}
			}
	out:
		adapter_free(&h);
		adapter_free(&f);
		if (test_current_failed)
			return;
	}
}

/* A slot whose adapter has the group on layer 0 only: on layer 1 its rows
 * get nothing while another slot's rows still do. */
static void test_group_missing_on_layer(void)
{
	static const int ra[2][LP_LORA_N_TARGETS] = {{8, 8, 8, 8, 8, 8, 8}, {0, 0, 0, 8, 0, 0, 8}};
	static const int rb[2][LP_LORA_N_TARGETS] = {{4, 4, 4, 4, 4, 4, 4}, {4, 4, 4, 4, 4, 4, 4}};
	struct adapter a, bb;
	struct adapter *slots[N_SLOTS] = {&a, &bb, NULL, NULL};

	adapter_make(&a, &tiny, ra, LP_DTYPE_F32, LP_DTYPE_F32, NULL);
	adapter_make(&bb, &tiny, rb, LP_DTYPE_F32, LP_DTYPE_F32, NULL);
	for (int b = 0; b < N_BACKENDS; b++) {
		static const enum lp_lora_group gs[] = {LP_LORA_GROUP_QKV, LP_LORA_GROUP_GATE_UP};

		for (int i = 0; i < 2; i++) {
			struct step st = {1, gs[i], 8, 2, {{0, 3, 0}, {3, 5, 1}}};
			struct io io;
			float *got;
			int unchanged = 1;

			if (!check_step(b, "group missing", &st, slots, &tiny))
				goto out;
			/* the reference says so too; check it directly as well */
			io_make(&io, &tiny, gs[i], 8);
			got = run_step(g_be[b], &st, &io);
			for (int r = 0; got && r < 3; r++)
				unchanged &= !memcmp(got + (size_t)r * io.outs[0],
				                     io.out0[0] + (size_t)r * io.outs[0],
				                     (size_t)io.outs[0] * sizeof(float));
			free(got);
			io_free(&io);
			if (!unchanged) {
				TEST_FAIL("%s: rows of a slot without the group changed",
				          g_be_name[b]);
				goto out;
			}
		}
	}
out:
	adapter_free(&a);
	adapter_free(&bb);
}

/* A row's result is the same bits alone as in a batch of 300 rows of four
 * adapters (whole units on the pool) and in a batch of one (split path). */
static void test_row_alone_vs_300(void)
{
	static const int r0[2][LP_LORA_N_TARGETS] = {{16, 16, 16, 16, 16, 16, 16},
	                                             {16, 16, 16, 16, 16, 16, 16}};
	static const int r1[2][LP_LORA_N_TARGETS] = {{8, 4, 2, 1, 64, 3, 5},
	                                             {8, 4, 2, 1, 64, 3, 5}};
	struct adapter a, c, d, e;
	struct adapter *slots[N_SLOTS] = {&a, &c, &d, &e};

	adapter_make(&a, &smol, r0, LP_DTYPE_BF16, LP_DTYPE_BF16, NULL);
	adapter_make(&c, &smol, r1, LP_DTYPE_F32, LP_DTYPE_F32, NULL);
	adapter_make(&d, &smol, r0, LP_DTYPE_F16, LP_DTYPE_F16, NULL);
	adapter_make(&e, &smol, r1, LP_DTYPE_F16, LP_DTYPE_F32, NULL);
	for (int b = 0; b < N_BACKENDS; b++) {
		struct step st = {
		    0,
		    LP_LORA_GROUP_QKV,
		    300,
		    5,
		    {{0, 77, 2}, {77, 100, 0}, {180, 1, 3}, {190, 60, 1}, {250, 50, 3}}};

		if (!check_step(b, "300 rows", &st, slots, &smol))
			break;
	}
	adapter_free(&a);
	adapter_free(&c);
	adapter_free(&d);
	adapter_free(&e);
}

/* A slot refilled with another adapter serves the new one; the CPU aliases
 * the host weights. */
static void test_refill(void)
{
	int r4[2][LP_LORA_N_TARGETS], r9[2][LP_LORA_N_TARGETS];
	struct adapter a, c;
	struct adapter *first[N_SLOTS] = {&a, NULL, NULL, NULL};
	struct adapter *second[N_SLOTS] = {&c, NULL, NULL, NULL};

	uniform_ranks(r4, 2, 4);
	uniform_ranks(r9, 2, 9);
	adapter_make(&a, &tiny, r4, LP_DTYPE_F32, LP_DTYPE_F32, NULL);
	adapter_make(&c, &tiny, r9, LP_DTYPE_BF16, LP_DTYPE_F32, NULL);
	for (int b = 0; b < N_BACKENDS; b++) {
		struct step st = {1, LP_LORA_GROUP_DOWN, 6, 1, {{1, 4, 0}}};

		if (!check_step(b, "before refill", &st, first, &tiny) ||
		    !check_step(b, "after refill", &st, second, &tiny))
			break;
	}
	adapter_free(&a);
	adapter_free(&c);
}

/* Bad input: fill refuses a slot outside the range and inconsistent
 * weights; the op skips a segment naming a slot outside the range or an
 * empty one, or rows outside the step, applies the others, and the backend
 * reports the first failure from then on. */
static void test_bad_slots(void)
{
	int r4[2][LP_LORA_N_TARGETS];
	struct adapter a;
	struct lp_err err = {0};
	struct lp_backend *be = NULL;
	struct lp_backend_limits lim = {
	    .n_layers = 2, .dim = 40, .vocab = 0, .max_loras = 2, .max_lora_rank = MAX_RANK};
	size_t bytes;
	struct io io;
	float *got = NULL;
	char msg[LP_ERR_MSG_MAX];

	uniform_ranks(r4, 2, 4);
	adapter_make(&a, &tiny, r4, LP_DTYPE_F32, LP_DTYPE_F32, NULL);
	io_make(&io, &tiny, LP_LORA_GROUP_O, 10);
	CHECK_OK(lp_backend_cpu_new(&be, 2, &err), &err);
	CHECK_OK(be->ops->reserve(be->ctx, &lim, &bytes, &err), &err);
	CHECK_EQ_INT(be->ops->lora_fill(be->ctx, 2, &a.w, &err), -EINVAL);
	CHECK_EQ_INT(be->ops->lora_fill(be->ctx, -1, &a.w, &err), -EINVAL);
	a.stacks[LP_LORA_GROUP_O].rank = 5; /* one more than its pair */
	CHECK_EQ_INT(be->ops->lora_fill(be->ctx, 0, &a.w, &err), -EINVAL);
	a.stacks[LP_LORA_GROUP_O].rank = 4;
	CHECK_OK(be->ops->lora_fill(be->ctx, 0, &a.w, &err), &err);
	CHECK_EQ_INT(status_of(be, msg, sizeof(msg)), 0);

	{
		struct step st = {
		    0, LP_LORA_GROUP_O, 10, 4, {{0, 2, 7}, {2, 2, 1}, {8, 5, 0}, {4, 3, 0}}};
		struct adapter *slots[N_SLOTS] = {&a, NULL, NULL, NULL};
		struct step good = {0, LP_LORA_GROUP_O, 10, 1, {{4, 3, 0}}};
		got = run_step(be, &st, &io);
		CHECK(got);
		CHECK_EQ_INT(status_of(be, msg, sizeof(msg)), -EIO);
		CHECK_MSG(strstr(msg, "slot 7"), "status names the first bad slot: %s", msg);
		/* the good segment was applied, the bad ones left their rows alone */
		CHECK(check_ref(got, &good, &io, slots, msg, sizeof(msg)) <= 1e-5);
		/* sticky: a later good op leaves the status as it was */
		free(got);
		got = run_step(be, &good, &io);
		CHECK_EQ_INT(status_of(be, msg, sizeof(msg)), -EIO);
		CHECK_MSG(strstr(msg, "slot 7"), "status kept the first failure: %s", msg);
	}
	free(got);
	got = NULL;
	lp_backend_destroy(be);
	be = NULL;

	/* a cleared slot is empty: naming it is an error too */
	CHECK_OK(lp_backend_cpu_new(&be, 1, &err), &err);
	CHECK_OK(be->ops->reserve(be->ctx, &lim, &bytes, &err), &err);
	CHECK_OK(be->ops->lora_fill(be->ctx, 1, &a.w, &err), &err);
	be->ops->lora_clear(be->ctx, 1);
	{
		struct step st = {0, LP_LORA_GROUP_O, 10, 1, {{0, 2, 1}}};
		got = run_step(be, &st, &io);
		CHECK(got);
		CHECK(!memcmp(got, io.out0[0], 2 * (size_t)io.outs[0] * sizeof(float)));
		CHECK_EQ_INT(status_of(be, msg, sizeof(msg)), -EIO);
		CHECK_MSG(strstr(msg, "empty"), "status says the slot is empty: %s", msg);
	}
	free(got);
	lp_backend_destroy(be);
	be = NULL;
	io_free(&io);
	adapter_free(&a);
}

int main(void)
{
	struct lp_err err = {0};
	struct lp_backend_limits lim = {
	    .n_layers = 2, .dim = 576, .vocab = 0, .max_loras = N_SLOTS, .max_lora_rank = MAX_RANK};
	size_t bytes;

	TEST_MAIN_BEGIN("test-cpu-lora");
	unsetenv("LP_CPU_NO_AVX2");
	if (lp_backend_cpu_new(&g_be[0], 3, &err) || lp_backend_cpu_new(&g_be[2], 1, &err)) {
		printf("FAIL test-cpu-lora:setup: %s\n", err.msg);
		return 1;
	}
	setenv("LP_CPU_NO_AVX2", "1", 1);
	if (lp_backend_cpu_new(&g_be[1], 3, &err)) {
		printf("FAIL test-cpu-lora:setup: %s\n", err.msg);
		return 1;
	}
	unsetenv("LP_CPU_NO_AVX2");
	for (int b = 0; b < N_BACKENDS; b++)
		if (g_be[b]->ops->reserve(g_be[b]->ctx, &lim, &bytes, &err)) {
			printf("FAIL test-cpu-lora:setup: %s\n", err.msg);
			return 1;
		}

	RUN(test_groups_and_shapes);
	RUN(test_rank_1_and_64);
	RUN(test_half_weights_exact);
	RUN(test_group_missing_on_layer);
	RUN(test_row_alone_vs_300);
	RUN(test_refill);
	RUN(test_bad_slots);

	for (int b = 0; b < N_BACKENDS; b++)
		lp_backend_destroy(g_be[b]);
	TEST_MAIN_END();
}
