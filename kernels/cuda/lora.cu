/* LoRA on CUDA: the slot arenas, their fill on the side stream, and the op
 * (SGMV for prefill, BGMV for decode). Semantics: kernels/backend.h
 * (struct lp_lora_args, lora_fill); the CPU backend's kernels/cpu/lora.c is
 * the reference.
 *
 * Slots. reserve allocates, once, one device region per slot big enough
 * for max_lora_rank on every target of every layer, in lim->lora_type, and
 * a device table per slot: a "filled" word, then per (layer, target) the
 * rank, the target's first row in its group's stacked A, and where its A
 * and B^T start in the region. A fill packs the adapter tightly into the
 * region (the table says where everything is), per layer and group: the
 * group's A stacked [rank_total, in], then each target's B^T [rank, out]
 * row-major (the host's panels undone), all converted to the arena type on
 * the host into pinned staging (one slot's worth, allocated at reserve) and
 * uploaded with two copies on cu->side; a fill that finds the staging
 * still read by the previous fill's copies waits for them first.
 * The side stream first waits for what cu->stream has queued (earlier
 * steps may still read the slot); the next op on cu->stream that touches a
 * slot (the op, a clear) waits for the fill's event. A stream that
 * captures a graph does not wait: backend-cuda.cu's begin_step makes the
 * stream wait for the side stream before a graph step.
 *
 * The op, per group of targets sharing x, in two launches:
 *   shrink  tmp[row, k] = x[row] . A_stack[k], k < the slot's rank_total
 *   expand  out_t[row, o] += sum_k tmp[row, k0_t + k] * B_t[k, o]
 * SGMV (prefill) takes the rows by segment: blockIdx.x is a tile of a
 * segment's rows (the grid covers ceil(n / rows per tile) + n_segs tiles,
 * the most the segments can cut n rows into; a block finds its segment by
 * walking the segment table); BGMV (decode) takes one row per block and its
 * slot from tok_slot, so its launch shape depends on n and the limits only
 * and a CUDA Graph can replay it.
 *
 * Arithmetic: f32 throughout, weights widened in registers. A dot product
 * of the shrink is summed by one warp, lane j taking elements j, j + 32, ...
 * in order with fused multiply-adds, then a butterfly over the lanes; an
 * output of the expand is one fused multiply-add chain over k in order,
 * added to out at the end. Both kernels do exactly this for every row
 * whatever the tile, so SGMV and BGMV give the same bits, and a row's
 * result does not depend on the other rows.
 *
 * A slot read from device memory that is outside the reserved slots or
 * empty, or a segment reaching outside the rows, is skipped and flagged
 * with LP_CUDA_BAD_LORA_SLOT; tok_slot -1 is a row without an adapter. */
#include "kernels/cuda/ops.cuh"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define SHRINK_THREADS 128                               /* 4 warps */
#define SHRINK_KW      4                                 /* ks per warp */
#define SHRINK_KB      (SHRINK_KW * SHRINK_THREADS / 32) /* ks per block */
#define SHRINK_ROWS    4                                 /* rows per SGMV tile */
#define EXPAND_THREADS 128                               /* output columns per block */
#define EXPAND_ROWS    16                                /* rows per SGMV tile */
#define EXPAND_KC      64   /* ranks of tmp staged in shared memory at a time */
#define MAX_RANK       4096 /* what the engine accepts (--max-lora-rank) */

/* One (layer, target) of a slot's table; entry 0 of a slot is its header
 * (rank 1: filled). */
struct lora_ent {
	int32_t rank;  /* 0: the adapter has no such target on this layer */
	int32_t k0;    /* the target's first row in the group's stacked A */
	int64_t a_off; /* elements from the slot's region to the group's stacked A */
	int64_t b_off; /* elements from the slot's region to the target's B^T */
};

struct lora_state {
	int n_slots, n_layers, max_rank;
	enum lp_dtype type;
	size_t esize;
	struct lp_lora_dims dims;
	int ents;             /* table entries per slot: 1 + n_layers * LP_LORA_N_TARGETS */
	size_t slot_elems;    /* of a slot's region */
	void *arena;          /* device [n_slots][slot_elems] */
	struct lora_ent *tab; /* device [n_slots][ents] */
	void *staging;        /* pinned: a region, then a table */
	size_t staging_bytes;
	cudaEvent_t main_done; /* cu->stream's work queued before a fill */
	cudaEvent_t fill_done; /* the last fill's copies */
	bool fill_pending;     /* cu->stream has not waited for fill_done */
	bool staging_busy;     /* the host has not waited for fill_done */
};

/* What the kernels need, by value. */
struct lora_kargs {
	const float *x;
	int64_t ldx;
	int in;
	float *tmp;
	int64_t ldt;
	float *out[LP_LORA_MAX_OUTS];
	int64_t ldo[LP_LORA_MAX_OUTS];
	int out_cols[LP_LORA_MAX_OUTS];
	int col_tiles[LP_LORA_MAX_OUTS]; /* expand blocks of each target */
	int n_targets;
	const struct lora_ent *tab;
	int ents;
	int ent0; /* entry of (layer, first target of the group) within a slot */
	const void *arena;
	int64_t slot_elems;
	int n_slots;
	int n_rows;
	const struct lp_lora_seg *segs;
	int n_segs;
	const int32_t *tok_slot;
	unsigned *bad;
};

/* ---- kernels ---- */

/* The rows [*row0, *row0 + *nr) and slot of block tile `tile`: SGMV walks
 * the segments, BGMV takes row `tile`. False when the block has nothing to
 * do. With report, flags what is bad: SGMV then walks every segment (one
 * thread of the shrink does, once per op). */
static __device__ bool lora_unit(const struct lora_kargs &a, bool sgmv, int rows_per_tile, int tile,
                                 bool report, int *row0, int *nr, int *slot)
{
	if (!sgmv) {
		int s = a.tok_slot[tile];

		if (s == -1)
			return false;
		if (s < 0 || s >= a.n_slots || a.tab[(int64_t)s * a.ents].rank != 1) {
			if (report && a.bad)
				atomicOr(a.bad, LP_CUDA_BAD_LORA_SLOT);
			return false;
		}
		*row0 = tile;
		*nr = 1;
		*slot = s;
		return true;
	}
	bool found = false;
	for (int i = 0; i < a.n_segs; i++) {
		struct lp_lora_seg g = a.segs[i];
		bool ok = g.slot >= 0 && g.slot < a.n_slots && g.row0 >= 0 && g.rows >= 0 &&
		          (int64_t)g.row0 + g.rows <= a.n_rows &&
		          a.tab[(int64_t)g.slot * a.ents].rank == 1;
		int tiles = ok ? (g.rows + rows_per_tile - 1) / rows_per_tile : 0;

		if (!ok && report && a.bad)
			atomicOr(a.bad, LP_CUDA_BAD_LORA_SLOT);
		if (!found && tile < tiles) {
			*row0 = g.row0 + tile * rows_per_tile;
			*nr = min(rows_per_tile, g.rows - tile * rows_per_tile);
			*slot = g.slot;
			found = true;
			if (!report)
				break;
		}
		tile -= found ? 0 : tiles;
	}
	return found;
}

/* tmp[row, k] = x[row] . A_stack[k] for the rows of the tile and the block's
 * SHRINK_KB ks; NR rows at most (SHRINK_ROWS for SGMV, 1 for BGMV). */
template <typename T, int NR>
__global__ void __launch_bounds__(SHRINK_THREADS) lora_shrink_kernel(struct lora_kargs a)
{
	const int lane = threadIdx.x & 31;
	const int k = blockIdx.y * SHRINK_KB + (threadIdx.x >> 5) * SHRINK_KW;
	/* one thread per op reports bad segments; per row for tok_slot */
	const bool report = threadIdx.x == 0 && blockIdx.y == 0 && (NR == 1 || blockIdx.x == 0);
	int row0, nr, slot, k_total = 0;

	if (!lora_unit(a, NR > 1, NR, blockIdx.x, report, &row0, &nr, &slot))
		return;
	const struct lora_ent *e = a.tab + (int64_t)slot * a.ents + a.ent0;
	for (int t = 0; t < a.n_targets; t++)
		k_total += e[t].rank;
	if (k >= k_total)
		return;

	const T *A = (const T *)a.arena + slot * a.slot_elems + e[0].a_off + (int64_t)k * a.in;
	const float *x = a.x + (int64_t)row0 * a.ldx;
	float acc[NR][SHRINK_KW];

#pragma unroll
	for (int r = 0; r < NR; r++)
#pragma unroll
		for (int j = 0; j < SHRINK_KW; j++)
			acc[r][j] = 0.0f;
	for (int i = lane; i < a.in; i += 32) {
		float av[SHRINK_KW], xv[NR];

#pragma unroll
		for (int j = 0; j < SHRINK_KW; j++)
			av[j] = k + j < k_total ? lp_cuda_load(A, (size_t)j * a.in + i) : 0.0f;
#pragma unroll
		for (int r = 0; r < NR; r++)
			xv[r] = r < nr ? x[(int64_t)r * a.ldx + i] : 0.0f;
#pragma unroll
		for (int r = 0; r < NR; r++)
#pragma unroll
			for (int j = 0; j < SHRINK_KW; j++)
				acc[r][j] = fmaf(xv[r], av[j], acc[r][j]);
	}
#pragma unroll
	for (int r = 0; r < NR; r++)
#pragma unroll
		for (int j = 0; j < SHRINK_KW; j++) {
			float v = acc[r][j];

#pragma unroll
			for (int d = 16; d > 0; d >>= 1)
				v += __shfl_xor_sync(0xffffffffu, v, d);
			if (lane == r * SHRINK_KW + j && r < nr && k + j < k_total)
				a.tmp[(int64_t)(row0 + r) * a.ldt + k + j] = v;
		}
}

/* out_t[row, o] += sum_k tmp[row, k0_t + k] * B_t[k, o] for the tile's rows
 * (NR at most: EXPAND_ROWS for SGMV, 1 for BGMV) and EXPAND_THREADS
 * columns of one target; tmp comes through shared memory EXPAND_KC ranks
 * at a time, the sum runs over k in order whatever the chunks. */
template <typename T, int NR>
__global__ void __launch_bounds__(EXPAND_THREADS) lora_expand_kernel(struct lora_kargs a)
{
	__shared__ float ts[NR * EXPAND_KC];
	int col_tile = blockIdx.y, t = 0, row0, nr, slot, out_cols = 0;
	float *out = NULL;
	int64_t ldo = 0;

	/* the target of this column tile; unrolled, so that the parameter
	 * arrays are never indexed at run time (which would copy them to
	 * local memory) */
#pragma unroll
	for (int i = 0; i < LP_LORA_MAX_OUTS; i++)
		if (i < a.n_targets && t == i) {
			if (i + 1 < a.n_targets && col_tile >= a.col_tiles[i]) {
				col_tile -= a.col_tiles[i];
				t = i + 1;
			} else {
				out = a.out[i];
				ldo = a.ldo[i];
				out_cols = a.out_cols[i];
			}
		}
	if (!lora_unit(a, NR > 1, NR, blockIdx.x, false, &row0, &nr, &slot))
		return;
	const struct lora_ent e = a.tab[(int64_t)slot * a.ents + a.ent0 + t];
	if (e.rank == 0)
		return;

	const int o = col_tile * EXPAND_THREADS + threadIdx.x;
	const T *B = (const T *)a.arena + slot * a.slot_elems + e.b_off + o;
	float acc[NR];

#pragma unroll
	for (int r = 0; r < NR; r++)
		acc[r] = 0.0f;
	for (int k0 = 0; k0 < e.rank; k0 += EXPAND_KC) {
		const int kn = min(EXPAND_KC, e.rank - k0);

		__syncthreads(); /* the previous chunk is used up */
		for (int i = threadIdx.x; i < nr * kn; i += EXPAND_THREADS) {
			int r = i / kn, k = i - r * kn;
			ts[r * EXPAND_KC + k] = a.tmp[(int64_t)(row0 + r) * a.ldt + e.k0 + k0 + k];
		}
		__syncthreads();
		if (o >= out_cols)
			continue;
		for (int k = 0; k < kn; k++) {
			float b = lp_cuda_load(B, (size_t)(k0 + k) * out_cols);

#pragma unroll
			for (int r = 0; r < NR; r++)
				if (r < nr)
					acc[r] = fmaf(ts[r * EXPAND_KC + k], b, acc[r]);
		}
	}
	if (o >= out_cols)
		return;
	out += (int64_t)row0 * ldo + o;
#pragma unroll
	for (int r = 0; r < NR; r++)
		if (r < nr)
			out[(int64_t)r * ldo] += acc[r];
}

/* ---- launchers ---- */

template <typename T>
static cudaError_t lora_launch(cudaStream_t stream, const struct lora_kargs &a, bool sgmv,
                               int max_rank)
{
	int k_blocks = (a.n_targets * max_rank + SHRINK_KB - 1) / SHRINK_KB, col_tiles = 0;

	for (int t = 0; t < a.n_targets; t++)
		col_tiles += a.col_tiles[t];
	if (sgmv) {
		unsigned shrink_tiles =
		    (unsigned)((a.n_rows + SHRINK_ROWS - 1) / SHRINK_ROWS + a.n_segs);
		unsigned expand_tiles =
		    (unsigned)((a.n_rows + EXPAND_ROWS - 1) / EXPAND_ROWS + a.n_segs);

		LP_LAUNCH(dim3(shrink_tiles, k_blocks), SHRINK_THREADS, 0, stream,
		          lora_shrink_kernel<T, SHRINK_ROWS>)
		(a);
		LP_LAUNCH(dim3(expand_tiles, col_tiles), EXPAND_THREADS, 0, stream,
		          lora_expand_kernel<T, EXPAND_ROWS>)
		(a);
	} else {
		LP_LAUNCH(dim3(a.n_rows, k_blocks), SHRINK_THREADS, 0, stream,
		          lora_shrink_kernel<T, 1>)
		(a);
		LP_LAUNCH(dim3(a.n_rows, col_tiles), EXPAND_THREADS, 0, stream,
		          lora_expand_kernel<T, 1>)
		(a);
	}
	return cudaGetLastError();
}

/* ---- slots ---- */

static bool lora_type_ok(enum lp_dtype t)
{
	return t == LP_DTYPE_F32 || t == LP_DTYPE_F16 || t == LP_DTYPE_BF16;
}

static void lora_dims(const struct lp_backend_limits *lim, struct lp_lora_dims *d)
{
	d->n_layers = lim->n_layers;
	d->dim = lim->dim;
	d->q_dim = lim->n_heads * lim->head_dim;
	d->kv_dim = lim->n_kv_heads * lim->head_dim;
	d->ffn_dim = lim->ffn_dim;
}

int lp_cuda_lora_reserve(struct lp_cuda *cu, const struct lp_backend_limits *lim, size_t *bytes,
                         struct lp_err *err)
{
	struct lora_state *s;
	size_t per_layer = 0, arena_bytes, tab_bytes;
	int rc;

	*bytes = 0;
	if (cu->lora)
		return lp_errf(err, -EBUSY, "cuda lora: the slots are reserved already");
	if (!lora_type_ok(lim->lora_type))
		return lp_errf(err, -EINVAL, "cuda lora: slots of %s are not supported",
		               lp_dtype_name(lim->lora_type));
	if (lim->max_loras < 0 || lim->max_loras > (1 << 16) || lim->max_lora_rank < 0 ||
	    lim->max_lora_rank > MAX_RANK || lim->n_layers < 1 || lim->dim < 1 ||
	    lim->n_heads < 1 || lim->n_kv_heads < 1 || lim->head_dim < 1 || lim->ffn_dim < 1)
		return lp_errf(err, -EINVAL,
		               "cuda lora: %d slots of rank %d (at most %d) over %d layers",
		               lim->max_loras, lim->max_lora_rank, MAX_RANK, lim->n_layers);
	s = (struct lora_state *)calloc(1, sizeof(*s));
	if (!s)
		return lp_errf(err, -ENOMEM, "cuda lora: out of host memory");
	s->n_slots = lim->max_loras;
	s->n_layers = lim->n_layers;
	s->max_rank = lim->max_lora_rank;
	s->type = lim->lora_type;
	s->esize = lp_dtype_row_bytes(s->type, 1);
	lora_dims(lim, &s->dims);
	s->ents = 1 + lim->n_layers * LP_LORA_N_TARGETS;
	for (int t = 0; t < LP_LORA_N_TARGETS; t++) {
		int in, out;

		lp_lora_dims_of(&s->dims, (enum lp_lora_target)t, &in, &out);
		per_layer += (size_t)s->max_rank * ((size_t)in + (size_t)out);
	}
	s->slot_elems = per_layer * (size_t)s->n_layers;
	arena_bytes = s->slot_elems * s->esize * (size_t)s->n_slots;
	tab_bytes = (size_t)s->ents * sizeof(struct lora_ent) * (size_t)s->n_slots;
	/* a region rounded to 256 bytes so that the table after it is aligned */
	s->staging_bytes = (s->slot_elems * s->esize + 255) / 256 * 256 +
	                   (size_t)s->ents * sizeof(struct lora_ent);
	cu->lora = s;
	if (!LP_CUDA_CHECK(cu, cudaEventCreateWithFlags(&s->main_done, cudaEventDisableTiming)) ||
	    !LP_CUDA_CHECK(cu, cudaEventCreateWithFlags(&s->fill_done, cudaEventDisableTiming)))
		goto out_cuda;
	if (s->n_slots == 0)
		return 0;
	if (!LP_CUDA_CHECK(cu, cudaMalloc(&s->arena, arena_bytes ? arena_bytes : 256)) ||
	    !LP_CUDA_CHECK(cu, cudaMalloc((void **)&s->tab, tab_bytes)) ||
	    !LP_CUDA_CHECK(cu, cudaMemset(s->tab, 0, tab_bytes)) ||
	    !LP_CUDA_CHECK(cu, cudaMallocHost(&s->staging, s->staging_bytes)) ||
	    !LP_CUDA_CHECK(cu, cudaDeviceSynchronize()))
		goto out_cuda;
	*bytes = arena_bytes + tab_bytes;
	return 0;

out_cuda:
	/* the failure goes to the caller, not to the sticky status */
	rc = lp_errf(err, cu->status ? cu->status : -EIO, "cuda lora: %s", cu->status_msg);
	cu->status = 0;
	cu->status_msg[0] = '\0';
	(void)cudaGetLastError();
	lp_cuda_lora_release(cu);
	return rc;
}

void lp_cuda_lora_release(struct lp_cuda *cu)
{
	struct lora_state *s = (struct lora_state *)cu->lora;

	if (!s)
		return;
	if (s->staging_busy)
		cudaEventSynchronize(s->fill_done);
	if (s->arena)
		cudaFree(s->arena);
	if (s->tab)
		cudaFree(s->tab);
	if (s->staging)
		cudaFreeHost(s->staging);
	if (s->main_done)
		cudaEventDestroy(s->main_done);
	if (s->fill_done)
		cudaEventDestroy(s->fill_done);
	free(s);
	cu->lora = NULL;
}

/* Element i of host weights of type t, as f32. */
static float host_elem(const void *p, size_t i, enum lp_dtype t)
{
	if (t == LP_DTYPE_F32)
		return ((const float *)p)[i];
	return t == LP_DTYPE_F16 ? lp_f16_to_f32(((const uint16_t *)p)[i])
	                         : lp_bf16_to_f32(((const uint16_t *)p)[i]);
}

static void host_put(void *p, size_t i, enum lp_dtype t, float v)
{
	if (t == LP_DTYPE_F32)
		((float *)p)[i] = v;
	else
		((uint16_t *)p)[i] = t == LP_DTYPE_F16 ? lp_f32_to_f16(v) : lp_f32_to_bf16(v);
}

/* dst[0 .. n) of type dt = src[0 .. n) of type st. */
static void host_convert(void *dst, enum lp_dtype dt, const void *src, enum lp_dtype st, size_t n)
{
	if (dt == st) {
		memcpy(dst, src, n * lp_dtype_row_bytes(dt, 1));
		return;
	}
	for (size_t i = 0; i < n; i++)
		host_put(dst, i, dt, host_elem(src, i, st));
}

/* Makes cu->stream wait for the last fill's copies (outside a capture,
 * where backend-cuda.cu's begin_step has done it). */
static bool wait_fills(struct lp_cuda *cu, struct lora_state *s)
{
	enum cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;

	if (!s->fill_pending)
		return true;
	if (!LP_CUDA_CHECK(cu, cudaStreamIsCapturing(cu->stream, &cs)))
		return false;
	if (cs != cudaStreamCaptureStatusNone)
		return true;
	if (!LP_CUDA_CHECK(cu, cudaStreamWaitEvent(cu->stream, s->fill_done, 0)))
		return false;
	s->fill_pending = false;
	return true;
}

static int check_weights(const struct lora_state *s, int slot, const struct lp_lora_weights *w,
                         struct lp_err *err)
{
	if (slot < 0 || slot >= s->n_slots)
		return lp_errf(err, -EINVAL, "lora slot %d is outside 0 .. %d", slot,
		               s->n_slots - 1);
	if (!w || w->n_layers <= 0 || w->n_layers > s->n_layers || !w->pairs || !w->stacks)
		return lp_errf(err, -EINVAL,
		               "lora slot %d: the adapter has %d layers, the model %d", slot,
		               w ? w->n_layers : 0, s->n_layers);
	for (int l = 0; l < w->n_layers; l++)
		for (int g = 0; g < LP_LORA_N_GROUPS; g++) {
			int first, count, sum = 0;

			lp_lora_group_targets((enum lp_lora_group)g, &first, &count);
			for (int t = first; t < first + count; t++) {
				const struct lp_lora_pair *p =
				    &w->pairs[(size_t)l * LP_LORA_N_TARGETS + t];

				if (p->rank < 0 || p->rank > s->max_rank)
					return lp_errf(
					    err, -EINVAL,
					    "lora slot %d: layer %d target %d has rank %d, the "
					    "slots take %d at most",
					    slot, l, t, p->rank, s->max_rank);
				if (p->rank > 0 && (!p->a || !p->b || !lora_type_ok(p->a_type) ||
				                    !lora_type_ok(p->b_type)))
					return lp_errf(
					    err, -EINVAL,
					    "lora slot %d: layer %d target %d has no weights or "
					    "weights of an unsupported type",
					    slot, l, t);
				sum += p->rank;
			}
			if (w->stacks[(size_t)l * LP_LORA_N_GROUPS + g].rank != sum)
				return lp_errf(
				    err, -EINVAL,
				    "lora slot %d: layer %d group %d stacks %d rows of A, its "
				    "targets' ranks add up to %d",
				    slot, l, g, w->stacks[(size_t)l * LP_LORA_N_GROUPS + g].rank,
				    sum);
		}
	return 0;
}

int lp_cuda_lora_fill(void *ctx, int slot, const struct lp_lora_weights *w, struct lp_err *err)
{
	struct lp_cuda *cu = (struct lp_cuda *)ctx;
	struct lora_state *s = (struct lora_state *)cu->lora;
	size_t at = 0, region, tab_bytes;
	struct lora_ent *tab;
	char *data;
	int rc;

	if (!s)
		return lp_errf(err, -EINVAL, "lora fill: the backend was not reserved");
	if ((rc = check_weights(s, slot, w, err)))
		return rc;
	if (lp_cuda_failed(cu))
		return lp_errf(err, cu->status, "lora fill: %s", cu->status_msg);
	/* the previous fill's copies may still read the staging */
	if (s->staging_busy && !LP_CUDA_CHECK(cu, cudaEventSynchronize(s->fill_done)))
		goto out_failed;
	s->staging_busy = false;

	data = (char *)s->staging;
	region = (s->slot_elems * s->esize + 255) / 256 * 256;
	tab = (struct lora_ent *)(data + region);
	tab_bytes = (size_t)s->ents * sizeof(struct lora_ent);
	memset(tab, 0, tab_bytes);
	tab[0].rank = 1;
	for (int l = 0; l < w->n_layers; l++)
		for (int g = 0; g < LP_LORA_N_GROUPS; g++) {
			int first, count, k0 = 0, in, out;
			size_t a_off = at;

			lp_lora_group_targets((enum lp_lora_group)g, &first, &count);
			lp_lora_dims_of(&s->dims, (enum lp_lora_target)first, &in, &out);
			for (int t = first; t < first + count; t++) {
				const struct lp_lora_pair *p =
				    &w->pairs[(size_t)l * LP_LORA_N_TARGETS + t];
				struct lora_ent *e = &tab[1 + l * LP_LORA_N_TARGETS + t];

				e->rank = p->rank;
				e->k0 = k0;
				e->a_off = (int64_t)a_off;
				if (p->rank)
					host_convert(data + at * s->esize, s->type, p->a, p->a_type,
					             (size_t)p->rank * (size_t)in);
				at += (size_t)p->rank * (size_t)in;
				k0 += p->rank;
			}
			for (int t = first; t < first + count; t++) {
				const struct lp_lora_pair *p =
				    &w->pairs[(size_t)l * LP_LORA_N_TARGETS + t];
				struct lora_ent *e = &tab[1 + l * LP_LORA_N_TARGETS + t];

				lp_lora_dims_of(&s->dims, (enum lp_lora_target)t, &in, &out);
				e->b_off = (int64_t)at;
				/* B^T [rank, out] row-major from the host's panels */
				for (int k = 0; k < p->rank; k++)
					for (int p0 = 0; p0 < out; p0 += LP_LORA_PANEL) {
						size_t src = lp_lora_b_index(p->rank, out, k, p0);
						size_t dst =
						    at + (size_t)k * (size_t)out + (size_t)p0;
						int width = out - p0 < LP_LORA_PANEL
						                ? out - p0
						                : LP_LORA_PANEL;

						host_convert(
						    data + dst * s->esize, s->type,
						    (const char *)p->b +
						        src * lp_dtype_row_bytes(p->b_type, 1),
						    p->b_type, (size_t)width);
					}
				at += (size_t)p->rank * (size_t)out;
			}
		}

	/* the side stream waits for the steps queued so far, which may still
	 * read the slot's old contents */
	if (!LP_CUDA_CHECK(cu, cudaEventRecord(s->main_done, cu->stream)) ||
	    !LP_CUDA_CHECK(cu, cudaStreamWaitEvent(cu->side, s->main_done, 0)) ||
	    (at &&
	     !LP_CUDA_CHECK(
	         cu, cudaMemcpyAsync((char *)s->arena + (size_t)slot * s->slot_elems * s->esize,
	                             data, at * s->esize, cudaMemcpyHostToDevice, cu->side))) ||
	    !LP_CUDA_CHECK(cu, cudaMemcpyAsync(s->tab + (size_t)slot * s->ents, tab, tab_bytes,
	                                       cudaMemcpyHostToDevice, cu->side)) ||
	    !LP_CUDA_CHECK(cu, cudaEventRecord(s->fill_done, cu->side)))
		goto out_failed;
	s->fill_pending = true;
	s->staging_busy = true;
	cu->upload_bytes += at * s->esize + tab_bytes;
	return 0;

out_failed:
	return lp_errf(err, cu->status, "lora fill: %s", cu->status_msg);
}

void lp_cuda_lora_clear(void *ctx, int slot)
{
	struct lp_cuda *cu = (struct lp_cuda *)ctx;
	struct lora_state *s = (struct lora_state *)cu->lora;
	size_t tab_bytes;

	if (!s || slot < 0 || slot >= s->n_slots || lp_cuda_failed(cu))
		return;
	tab_bytes = (size_t)s->ents * sizeof(struct lora_ent);
	if (wait_fills(cu, s))
		LP_CUDA_CHECK(
		    cu, cudaMemsetAsync(s->tab + (size_t)slot * s->ents, 0, tab_bytes, cu->stream));
}

/* ---- the op ---- */

void lp_cuda_lora(void *ctx, const struct lp_lora_args *args)
{
	struct lp_cuda *cu = (struct lp_cuda *)ctx;
	struct lora_state *s = (struct lora_state *)cu->lora;
	struct lora_kargs a;
	int first, in, out;
	cudaError_t e;

	if (lp_cuda_failed(cu))
		return;
	LP_CUDA_REQUIRE(cu, s != NULL, "lora");
	LP_CUDA_REQUIRE(cu, args->layer >= 0 && args->layer < s->n_layers, "lora");
	LP_CUDA_REQUIRE(cu, (unsigned)args->group < LP_LORA_N_GROUPS, "lora");
	memset(&a, 0, sizeof(a));
	lp_lora_group_targets(args->group, &first, &a.n_targets);
	lp_lora_dims_of(&s->dims, (enum lp_lora_target)first, &in, &out);
	LP_CUDA_REQUIRE(cu, args->x && args->x->type == LP_DTYPE_F32 && args->x->cols == in,
	                "lora");
	LP_CUDA_REQUIRE(cu, args->x->rows <= INT32_MAX, "lora");
	a.n_rows = (int)args->x->rows;
	LP_CUDA_REQUIRE(cu,
	                args->tmp && args->tmp->type == LP_DTYPE_F32 &&
	                    args->tmp->rows >= a.n_rows &&
	                    args->tmp->cols >= (int64_t)a.n_targets * s->max_rank,
	                "lora");
	for (int t = 0; t < a.n_targets; t++) {
		const struct lp_tensor *o = args->out[t];

		lp_lora_dims_of(&s->dims, (enum lp_lora_target)(first + t), &in, &out);
		LP_CUDA_REQUIRE(cu, o && o->type == LP_DTYPE_F32 && o->cols == out, "lora");
		LP_CUDA_REQUIRE(cu, o->rows >= a.n_rows, "lora");
		a.out[t] = (float *)o->data;
		a.ldo[t] = o->cols;
		a.out_cols[t] = out;
		a.col_tiles[t] = (out + EXPAND_THREADS - 1) / EXPAND_THREADS;
	}
	LP_CUDA_REQUIRE(cu,
	                args->decode ? args->tok_slot != NULL
	                             : (args->n_segs >= 0 && (args->segs || !args->n_segs)),
	                "lora");
	if (a.n_rows == 0 || s->n_slots == 0 || s->max_rank == 0 ||
	    (!args->decode && args->n_segs == 0))
		return;
	if (!wait_fills(cu, s))
		return;
	a.x = (const float *)args->x->data;
	a.ldx = args->x->cols;
	a.in = (int)args->x->cols;
	a.tmp = (float *)args->tmp->data;
	a.ldt = args->tmp->cols;
	a.tab = s->tab;
	a.ents = s->ents;
	a.ent0 = 1 + args->layer * LP_LORA_N_TARGETS + first;
	a.arena = s->arena;
	a.slot_elems = (int64_t)s->slot_elems;
	a.n_slots = s->n_slots;
	a.segs = args->decode ? NULL : args->segs;
	a.n_segs = args->decode ? 0 : args->n_segs;
	a.tok_slot = args->tok_slot;
	a.bad = cu->bad;
	switch (s->type) {
	case LP_DTYPE_F32:
		e = lora_launch<float>(cu->stream, a, !args->decode, s->max_rank);
		break;
	case LP_DTYPE_F16:
		e = lora_launch<__half>(cu->stream, a, !args->decode, s->max_rank);
		break;
	default:
		e = lora_launch<__nv_bfloat16>(cu->stream, a, !args->decode, s->max_rank);
		break;
	}
	cu->launches += 2;
	LP_CUDA_CHECK(cu, e);
}
