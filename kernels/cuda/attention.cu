/* Paged attention on CUDA. What a row (one token, one query head) computes
 * is struct lp_attention_args in backend.h; the CPU backend's attention.c
 * is the reference: softmax(scale * q . k_p) weighted sum of v_p over the
 * positions p = f .. tok_pos[t] of the token's sequence (f = 0, or with a
 * sliding window max(0, tok_pos[t] - window + 1)), read through its block
 * table, leaving out positions whose block is outside the cache (they set
 * LP_CUDA_BAD_BLOCK); a padding row (tok_seq < 0) or a row without
 * positions comes out zero. Tiles start at the one holding the run's
 * lowest f (entries of the block table before it are never read), and a
 * row masks the positions of its tiles outside its own range.
 *
 * Both kernels share one block-level routine (att_run): a run of nt tokens
 * of one sequence times the heads of one kv head (gb <= 8 of them) makes R
 * = nt * gb rows, which go through the context in tiles of 32 positions.
 * Each tile's K and V rows are read from the cache once into shared memory
 * (in the cache's type, converted to f32 where read) and serve all R rows:
 * the GQA group's heads and, in prefill, the run's tokens. Lane j of a warp
 * scores position j of the tile against the warp's rows (q in shared
 * memory, broadcast); the warp keeps each row's running maximum and sum
 * (online softmax, f32, in base 2 with log2(e) folded into the scale) and
 * its weighted sum of V, each lane a slice of the head dimension. Warps own
 * rows, so only the tile loads need block barriers.
 *
 *   decode kernel   a block per (token, kv head, head chunk, partition):
 *                   one token's rows; with few tokens the context is cut
 *                   into partitions (split-K) whose states (max, sum,
 *                   weighted V) go to the workspace, and a reduce kernel
 *                   folds them into the output rows
 *   prefill kernel  a block per (tile of bm tokens, kv head, head chunk):
 *                   each run of two or more tokens of one sequence inside
 *                   the tile goes through the context once for all its
 *                   rows, causal per row (row t stops at tok_pos[t])
 *
 * Which kernel serves a token is decided on the device, the same way by
 * both: the prefill kernel takes the tokens that have a neighbour of the
 * same sequence inside their tile, the decode kernel all others (decode
 * rows, lone tokens, padding). So any mix of decode and prefill rows in one
 * call is right, and the grids depend only on n_tokens, the head counts,
 * head_dim, block_size, max_blocks_per_seq, max_context and window (CUDA
 * Graph replay with new positions and tables stays correct). The cost of not
 * knowing the batch's shape on the host: in a pure decode step the prefill
 * grid's blocks find no run and return, and in a prefill step the decode
 * grid's do; decode rows that share a prefill tile with a run are still
 * served by the decode grid. Groups of more than 8 query heads per kv head
 * are cut into head chunks, each reading the K/V tiles once.
 *
 *   q, out     f32 [n_tokens, n_heads * head_dim]
 *   caches     f32, f16 or bf16 [rows, n_kv_heads * head_dim]
 *   workspace  f32 [n_tokens][n_heads][parts][head_dim] weighted V, then
 *              f32 [n_tokens][n_heads][parts][2] (max in base 2, sum)
 *
 * head_dim is any multiple of 8 up to 256; kernels are compiled for head
 * dims up to 64, 128 and 256. No tensor cores: the plain FMA path serves
 * the emulation and the GPU alike. */
#include "kernels/cuda/ops.cuh"

#include <errno.h>
#include <limits.h>
#include <math.h>

#define ATT_TK           32 /* cache positions per tile: one per lane */
#define ATT_MAX_GROUP    8  /* query heads per block at most */
#define ATT_DEC_WARPS    4  /* decode block: 128 threads, rows = heads (<= 8) */
#define ATT_DEC_ROWS     ATT_MAX_GROUP
#define ATT_PRE_WARPS    8    /* prefill block: 256 threads */
#define ATT_SPLIT_BLOCKS 1024 /* decode grids smaller than this split the context */
#define ATT_PART_MIN     256  /* positions per partition at least */
#define ATT_LOG2E        1.4426950408889634f

/* Rows of a prefill block: its shared memory holds their queries. */
static __host__ __device__ constexpr int att_pre_rows(int hdmax)
{
	return hdmax <= 128 ? 64 : 16;
}

/* Everything a kernel reads, passed by value. */
struct att_params {
	const float *q;
	float *out;
	const void *k, *v;      /* cache bases */
	const int32_t *tok_seq; /* [n_tokens] */
	const int32_t *tok_pos; /* [n_tokens] */
	const int32_t *tables;  /* [n_seqs][max_blocks] */
	float *ws_o;            /* split: weighted V of each partition */
	float *ws_ml;           /* split: (max, sum) of each partition */
	unsigned *bad;
	int64_t q_cols, out_cols, kv_cols;
	int cache_rows;
	int n_tokens, n_heads, hd;
	int group;   /* query heads per kv head */
	int gb;      /* heads per block */
	int hchunks; /* blocks per kv head: ceil(group / gb) */
	int bs, max_blocks;
	int cap;   /* max_blocks * bs: the table's reach */
	int bm;    /* tokens per prefill tile */
	int parts; /* partitions of the decode grid (1: no split), from the
	              first tile of each token's range */
	int part_len;
	int window;   /* sliding window (0: none) */
	float scale2; /* scale * log2(e) */
};

/* Elements from one K/V row of a tile to the next in shared memory (es
 * bytes each): the row's 16-byte units plus one or two, an odd number in
 * all, so that the lanes' 16-byte reads of 8 consecutive rows (one per
 * lane) fall in different banks. */
static __host__ __device__ int att_kv_stride(int hd, int es)
{
	int units = hd * es / 16;

	return (units + (units % 2 ? 2 : 1)) * 16 / es;
}

/* Where att_run's shared memory goes; sized by att_smem_bytes. The K and V
 * tiles keep the cache's type (half the room of f32 for 16-bit caches,
 * which lets more blocks share an SM), converted where they are read. */
struct att_smem {
	float *q;    /* [rmax][hd] */
	char *k, *v; /* [ATT_TK][att_kv_stride] of the cache's type */
	float *pr;   /* [rmax][ATT_TK]: the tile's weights of each row */
	int *valid;  /* [ATT_TK]: position has a cache row */
	int *row_lo; /* [rmax]: first position of each row's token (read where
	                used: registers are what the prefill kernel runs short of) */
	int *tok_n;  /* [bmax]: end of the positions of each token of the run */
	int *seq;    /* [bmax]: prefill: the tile's tok_seq */
	int *runs;   /* [bmax][2]: prefill: (first token, count) of each run */
	int *n_runs;
};

static __host__ __device__ size_t att_smem_bytes(int hd, int es, int rmax, int bmax)
{
	return sizeof(float) * ((size_t)rmax * hd + (size_t)rmax * ATT_TK) +
	       2 * (size_t)ATT_TK * att_kv_stride(hd, es) * es +
	       sizeof(int) * ((size_t)ATT_TK + (size_t)rmax + 4 * (size_t)bmax + 1);
}

static __device__ __forceinline__ att_smem att_smem_carve(void *base, int hd, int es, int rmax,
                                                          int bmax)
{
	att_smem s;
	size_t tile = (size_t)ATT_TK * att_kv_stride(hd, es) * es;

	s.q = (float *)base;
	s.k = (char *)(s.q + (size_t)rmax * hd);
	s.v = s.k + tile;
	s.pr = (float *)(s.v + tile);
	s.valid = (int *)(s.pr + (size_t)rmax * ATT_TK);
	s.row_lo = s.valid + ATT_TK;
	s.tok_n = s.row_lo + rmax;
	s.seq = s.tok_n + bmax;
	s.runs = s.seq + bmax;
	s.n_runs = s.runs + 2 * bmax;
	return s;
}

static __device__ __forceinline__ float att_warp_max(float x)
{
#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
		x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
	return x;
}

/* Every lane gets the same sum (each step adds the same two values). */
static __device__ __forceinline__ float att_warp_sum(float x)
{
#pragma unroll
	for (int o = 16; o > 0; o >>= 1)
		x += __shfl_xor_sync(0xffffffffu, x, o);
	return x;
}

/* Positions token t attends to: 0 .. tok_pos[t], at most the table's
 * reach; none for a padding row (as attention.c). */
static __device__ __forceinline__ int att_positions(const att_params &p, int t)
{
	int64_t n = (int64_t)p.tok_pos[t] + 1;

	if (p.tok_seq[t] < 0 || n < 0)
		return 0;
	return n < p.cap ? (int)n : p.cap;
}

/* The first position token t attends to: 0, or its window's first. */
static __device__ __forceinline__ int att_first(const att_params &p, int t)
{
	return p.window > 0 ? max(p.tok_pos[t] - p.window + 1, 0) : 0;
}

/* True when the prefill kernel serves token t: a neighbour inside its tile
 * of bm tokens belongs to the same sequence. */
static __device__ __forceinline__ bool att_in_run(const att_params &p, int t)
{
	int s = p.tok_seq[t], ts = t / p.bm * p.bm, te = min(ts + p.bm, p.n_tokens);

	return s >= 0 &&
	       ((t > ts && p.tok_seq[t - 1] == s) || (t + 1 < te && p.tok_seq[t + 1] == s));
}

/* Cache elements to f32: 16 bytes (4 f32 or 8 f16/bf16 elements, VL of
 * them), or N (2 or 4) elements with one load. bf16 is the top half of an
 * f32, so its conversion is a shift. */
template <typename T> struct att_vec {
	static constexpr int VL = 16 / (int)sizeof(T);
};

static __device__ __forceinline__ float att_f16(unsigned bits)
{
	return __half2float(__ushort_as_half((unsigned short)bits));
}

static __device__ __forceinline__ void att_unpack2(unsigned w, float *f, const __half *)
{
	f[0] = att_f16(w & 0xffffu);
	f[1] = att_f16(w >> 16);
}

static __device__ __forceinline__ void att_unpack2(unsigned w, float *f, const __nv_bfloat16 *)
{
	f[0] = __uint_as_float(w << 16);
	f[1] = __uint_as_float(w & 0xffff0000u);
}

template <typename T> static __device__ __forceinline__ void att_unpack16(const T *src, float *f)
{
	if constexpr (sizeof(T) == 4) {
		float4 x = *(const float4 *)src;
		f[0] = x.x;
		f[1] = x.y;
		f[2] = x.z;
		f[3] = x.w;
	} else {
		uint4 u = *(const uint4 *)src;
		att_unpack2(u.x, f, src);
		att_unpack2(u.y, f + 2, src);
		att_unpack2(u.z, f + 4, src);
		att_unpack2(u.w, f + 6, src);
	}
}

template <int N, typename T>
static __device__ __forceinline__ void att_unpack_n(const T *src, float *f)
{
	if constexpr (sizeof(T) == 4 && N == 4) {
		float4 x = *(const float4 *)src;
		f[0] = x.x;
		f[1] = x.y;
		f[2] = x.z;
		f[3] = x.w;
	} else if constexpr (sizeof(T) == 4) {
		float2 x = *(const float2 *)src;
		f[0] = x.x;
		f[1] = x.y;
	} else if constexpr (N == 4) {
		uint2 u = *(const uint2 *)src;
		att_unpack2(u.x, f, src);
		att_unpack2(u.y, f + 2, src);
	} else {
		att_unpack2(*(const unsigned *)src, f, src);
	}
}

/* One run: tokens [ta, ta + nt) of one sequence (block table `table`;
 * NULL when no token has positions) times heads [h0, h0 + gbe) of kv head
 * kvh, over positions [pb, pe) of the context (pb a multiple of ATT_TK),
 * each row over its own token's range (att_first .. att_positions), the
 * tiles from the one holding the lowest first position on. Without split
 * the rows go to out (zero where a row saw no position); with split each
 * row's state goes to partition `part` of the workspace. Every thread of
 * the block calls it (barriers inside).
 *
 * Lane dims: lane l holds dims (l + 32 i) * VEC + [0, VEC) of its rows'
 * weighted V, i < NV. Rows: warp w owns rows w, w + NW, ... (RPW of them). */
template <typename T, int HDMAX, int NW, int RPW>
static __device__ __forceinline__ void
att_run(const att_params &p, const att_smem &sm, const int32_t *table, int ta, int nt, int kvh,
        int h0, int gbe, int pb, int pe, bool split, int part)
{
	constexpr int NT = NW * 32;
	constexpr int VEC = HDMAX <= 64 ? 2 : 4;
	constexpr int NV = HDMAX / (32 * VEC);
	constexpr int VL = att_vec<T>::VL;
	const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, hd = p.hd;
	const int ks = att_kv_stride(hd, (int)sizeof(T)), R = nt * gbe, cpr = hd / VL;
	const T *kbase = (const T *)p.k + (size_t)kvh * hd;
	const T *vbase = (const T *)p.v + (size_t)kvh * hd;

	/* the previous run's readers of tok_n, q and the tiles are done */
	__syncthreads();
	for (int tt = threadIdx.x; tt < nt; tt += NT)
		sm.tok_n[tt] = min(att_positions(p, ta + tt), pe);
	for (int r = threadIdx.x; r < R; r += NT)
		sm.row_lo[r] = att_first(p, ta + r / gbe);
	for (int idx = threadIdx.x; idx < R * (hd / 4); idx += NT) {
		int r = idx / (hd / 4), c = idx - r * (hd / 4);
		const float *src =
		    p.q + (size_t)(ta + r / gbe) * p.q_cols + (size_t)(h0 + r % gbe) * hd + 4 * c;

		*(float4 *)(sm.q + (size_t)r * hd + 4 * c) = *(const float4 *)src;
	}
	__syncthreads();

	int end = pb, lo = INT_MAX;
	for (int tt = 0; tt < nt; tt++) {
		end = max(end, sm.tok_n[tt]);
		lo = min(lo, sm.row_lo[tt * gbe]);
	}
	lo = min(lo, end); /* a row past the table's reach: nothing to read */

	float m[RPW], lp[RPW], acc[RPW][NV][VEC];
	int nrow[RPW];
	bool dim_on[NV];
#pragma unroll
	for (int j = 0; j < RPW; j++) {
		int r = warp + NW * j;

		m[j] = -INFINITY;
		lp[j] = 0.0f;
		nrow[j] = r < R ? sm.tok_n[r / gbe] : 0;
#pragma unroll
		for (int i = 0; i < NV; i++)
#pragma unroll
			for (int v = 0; v < VEC; v++)
				acc[j][i][v] = 0.0f;
	}
#pragma unroll
	for (int i = 0; i < NV; i++)
		dim_on[i] = (lane + 32 * i) * VEC < hd;

	for (int p0 = max(pb, lo / ATT_TK * ATT_TK); p0 < end; p0 += ATT_TK) {
		/* everyone is done with the previous tile */
		__syncthreads();
		for (int idx = threadIdx.x; idx < ATT_TK * cpr; idx += NT) {
			int j = idx / cpr, c = idx - j * cpr, pos = p0 + j;
			int64_t row = -1;

			/* lo <= pos < end, in one comparison (registers) */
			if ((unsigned)(pos - lo) < (unsigned)(end - lo)) {
				int32_t b = table[pos / p.bs];
				int64_t rr = (int64_t)b * p.bs + pos % p.bs;

				if (b >= 0 && rr < p.cache_rows)
					row = rr;
				else if (c == 0 && p.bad)
					atomicOr(p.bad, LP_CUDA_BAD_BLOCK);
			}
			if (c == 0)
				sm.valid[j] = row >= 0;
			uint4 *kd = (uint4 *)((T *)sm.k + (size_t)j * ks + (size_t)c * VL);
			uint4 *vd = (uint4 *)((T *)sm.v + (size_t)j * ks + (size_t)c * VL);
			if (row >= 0) {
				*kd = *(const uint4 *)(kbase + (size_t)row * p.kv_cols +
				                       (size_t)c * VL);
				*vd = *(const uint4 *)(vbase + (size_t)row * p.kv_cols +
				                       (size_t)c * VL);
			} else {
				/* zero V: a masked position's weight is 0, and 0 * garbage
				 * could be NaN */
				*kd = make_uint4(0, 0, 0, 0);
				*vd = make_uint4(0, 0, 0, 0);
			}
		}
		__syncthreads();

		/* scores: lane = position p0 + lane, against each of the warp's rows */
		bool live[RPW];
		float dot[RPW];
#pragma unroll
		for (int j = 0; j < RPW; j++) {
			live[j] = warp + NW * j < R && p0 < nrow[j];
			dot[j] = 0.0f;
		}
		const T *krow = (const T *)sm.k + (size_t)lane * ks;
		for (int d = 0; d < hd; d += VL) {
			float kk[VL];

			att_unpack16(krow + d, kk);
#pragma unroll
			for (int j = 0; j < RPW; j++) {
				if (!live[j])
					continue;
#pragma unroll
				for (int u = 0; u < VL; u += 4) {
					float4 qq =
					    *(const float4 *)(sm.q + (size_t)(warp + NW * j) * hd +
					                      d + u);
					dot[j] = fmaf(qq.x, kk[u], dot[j]);
					dot[j] = fmaf(qq.y, kk[u + 1], dot[j]);
					dot[j] = fmaf(qq.z, kk[u + 2], dot[j]);
					dot[j] = fmaf(qq.w, kk[u + 3], dot[j]);
				}
			}
		}
		/* online softmax: fold the tile into each row's (max, sum) */
		const bool pos_ok = sm.valid[lane] != 0;
#pragma unroll
		for (int j = 0; j < RPW; j++) {
			if (!live[j])
				continue;
			float s =
			    pos_ok && p0 + lane < nrow[j] && p0 + lane >= sm.row_lo[warp + NW * j]
			        ? dot[j] * p.scale2
			        : -INFINITY;
			float tmax = att_warp_max(s);

			if (tmax == -INFINITY) { /* nothing of this row in the tile */
				live[j] = false;
				continue;
			}
			float mn = fmaxf(m[j], tmax);
			float alpha = exp2f(m[j] - mn); /* 0 while m was -inf */
			float e = exp2f(s - mn);

			lp[j] = fmaf(lp[j], alpha, e);
			m[j] = mn;
			sm.pr[(size_t)(warp + NW * j) * ATT_TK + lane] = e;
#pragma unroll
			for (int i = 0; i < NV; i++)
#pragma unroll
				for (int v = 0; v < VEC; v++)
					acc[j][i][v] *= alpha;
		}
		__syncwarp();
		/* weighted V: each lane its dims, the tile's positions in order */
		for (int jj = 0; jj < ATT_TK; jj += 4) {
			float vv[4][NV][VEC];
#pragma unroll
			for (int u = 0; u < 4; u++) {
#pragma unroll
				for (int i = 0; i < NV; i++) {
					const T *src = (const T *)sm.v + (size_t)(jj + u) * ks +
					               (lane + 32 * i) * VEC;

					if (dim_on[i]) {
						att_unpack_n<VEC>(src, vv[u][i]);
					} else {
#pragma unroll
						for (int v = 0; v < VEC; v++)
							vv[u][i][v] = 0.0f;
					}
				}
			}
#pragma unroll
			for (int j = 0; j < RPW; j++) {
				if (!live[j])
					continue;
				float4 pp = *(
				    const float4 *)(sm.pr + (size_t)(warp + NW * j) * ATT_TK + jj);
#pragma unroll
				for (int i = 0; i < NV; i++) {
#pragma unroll
					for (int v = 0; v < VEC; v++) {
						float a = acc[j][i][v];
						a = fmaf(pp.x, vv[0][i][v], a);
						a = fmaf(pp.y, vv[1][i][v], a);
						a = fmaf(pp.z, vv[2][i][v], a);
						a = fmaf(pp.w, vv[3][i][v], a);
						acc[j][i][v] = a;
					}
				}
			}
		}
	}

	/* the rows out: O / L, or the partition's state */
#pragma unroll
	for (int j = 0; j < RPW; j++) {
		int r = warp + NW * j;

		if (r >= R)
			break;
		float l = att_warp_sum(lp[j]);
		int t = ta + r / gbe, h = h0 + r % gbe;

		if (split) {
			size_t row = ((size_t)t * p.n_heads + h) * p.parts + part;
			float *o = p.ws_o + row * hd;
#pragma unroll
			for (int i = 0; i < NV; i++)
				if (dim_on[i])
#pragma unroll
					for (int v = 0; v < VEC; v++)
						o[(lane + 32 * i) * VEC + v] = acc[j][i][v];
			if (lane == 0) {
				p.ws_ml[2 * row] = m[j];
				p.ws_ml[2 * row + 1] = l;
			}
		} else {
			float inv = l > 0.0f ? 1.0f / l : 0.0f;
			float *o = p.out + (size_t)t * p.out_cols + (size_t)h * hd;
#pragma unroll
			for (int i = 0; i < NV; i++)
				if (dim_on[i])
#pragma unroll
					for (int v = 0; v < VEC; v++)
						o[(lane + 32 * i) * VEC + v] = acc[j][i][v] * inv;
		}
	}
}

/* grid (n_tokens, n_kv_heads * hchunks, parts), ATT_DEC_WARPS warps. */
template <typename T, int HDMAX>
__global__ void __launch_bounds__(ATT_DEC_WARPS * 32, 4) att_decode_kernel(const att_params p)
{
	LP_DYN_SHARED(float4, smem_raw);
	const int t = blockIdx.x, kvh = blockIdx.y / p.hchunks, hc = blockIdx.y % p.hchunks;
	const int part = blockIdx.z;

	if (att_in_run(p, t))
		return;
	const int h0 = kvh * p.group + hc * p.gb, gbe = min(p.gb, p.group - hc * p.gb);
	const int n = att_positions(p, t);
	const bool split = p.parts > 1;
	/* partitions count from the tile holding the token's first position */
	const int pb = split ? att_first(p, t) / ATT_TK * ATT_TK + part * p.part_len : 0;
	const int pe = split && part + 1 < p.parts ? pb + p.part_len : INT_MAX;

	/* the reduce kernel reads only the partitions below n (none: zeros) */
	if (split && pb >= n)
		return;
	const att_smem sm = att_smem_carve(smem_raw, p.hd, (int)sizeof(T), ATT_DEC_ROWS, 1);
	const int32_t *table =
	    n > 0 ? p.tables + (size_t)p.tok_seq[t] * p.max_blocks : (const int32_t *)0;

	att_run<T, HDMAX, ATT_DEC_WARPS, ATT_DEC_ROWS / ATT_DEC_WARPS>(p, sm, table, t, 1, kvh, h0,
	                                                               gbe, pb, pe, split, part);
}

/* grid (ceil(n_tokens / bm), n_kv_heads * hchunks), ATT_PRE_WARPS warps. */
template <typename T, int HDMAX>
__global__ void __launch_bounds__(ATT_PRE_WARPS * 32, 1) att_prefill_kernel(const att_params p)
{
	constexpr int RMAX = att_pre_rows(HDMAX);
	LP_DYN_SHARED(float4, smem_raw);
	const int ts = blockIdx.x * p.bm, te = min(ts + p.bm, p.n_tokens);
	const int kvh = blockIdx.y / p.hchunks, hc = blockIdx.y % p.hchunks;
	const int h0 = kvh * p.group + hc * p.gb, gbe = min(p.gb, p.group - hc * p.gb);
	const att_smem sm = att_smem_carve(smem_raw, p.hd, (int)sizeof(T), RMAX, RMAX);

	for (int t = ts + threadIdx.x; t < te; t += blockDim.x)
		sm.seq[t - ts] = p.tok_seq[t];
	__syncthreads();
	/* the tile's runs of two or more tokens of one sequence (the same rule
	 * as att_in_run) */
	if (threadIdx.x == 0) {
		int nr = 0;

		for (int t = ts; t < te;) {
			int u = t + 1;

			while (u < te && sm.seq[u - ts] == sm.seq[t - ts])
				u++;
			if (u - t >= 2 && sm.seq[t - ts] >= 0) {
				sm.runs[2 * nr] = t;
				sm.runs[2 * nr + 1] = u - t;
				nr++;
			}
			t = u;
		}
		*sm.n_runs = nr;
	}
	__syncthreads();
	const int nr = *sm.n_runs;
	for (int i = 0; i < nr; i++) {
		const int ta = sm.runs[2 * i], nt = sm.runs[2 * i + 1];
		const int32_t *table = p.tables + (size_t)p.tok_seq[ta] * p.max_blocks;

		att_run<T, HDMAX, ATT_PRE_WARPS, RMAX / ATT_PRE_WARPS>(
		    p, sm, table, ta, nt, kvh, h0, gbe, 0, INT_MAX, false, 0);
	}
}

/* Folds the partitions of each decode token's rows: grid (n_tokens). */
__global__ void __launch_bounds__(128) att_reduce_kernel(const att_params p)
{
	const int t = blockIdx.x;

	if (att_in_run(p, t))
		return;
	const int n = att_positions(p, t) - att_first(p, t) / ATT_TK * ATT_TK;
	const int np = min(p.parts, (n + p.part_len - 1) / p.part_len);

	for (int e = threadIdx.x; e < p.n_heads * p.hd; e += blockDim.x) {
		const int h = e / p.hd, d = e - h * p.hd;
		const size_t row = ((size_t)t * p.n_heads + h) * p.parts;
		const float *ml = p.ws_ml + 2 * row;
		float mx = -INFINITY, l = 0.0f, o = 0.0f;

		for (int i = 0; i < np; i++)
			if (ml[2 * i + 1] > 0.0f)
				mx = fmaxf(mx, ml[2 * i]);
		for (int i = 0; i < np; i++) {
			if (!(ml[2 * i + 1] > 0.0f))
				continue;
			float w = exp2f(ml[2 * i] - mx);
			l = fmaf(ml[2 * i + 1], w, l);
			o = fmaf(p.ws_o[(row + i) * p.hd + d], w, o);
		}
		p.out[(size_t)t * p.out_cols + (size_t)h * p.hd + d] = l > 0.0f ? o / l : 0.0f;
	}
}

/* ---- host side ---- */

/* The launch shapes of a call, from its sizes alone. */
struct att_plan {
	int hdmax;
	int gb, hchunks;
	int bm;
	int parts, part_len;
};

static att_plan att_make_plan(int n_tokens, int n_heads, int n_kv_heads, int hd, int cap,
                              int max_context, int window)
{
	att_plan pl;
	int group = n_heads / n_kv_heads;
	int ctx = max_context > 0 && max_context < cap ? max_context : cap;
	int64_t units;

	/* with a window, a token's range spans at most window + ATT_TK - 1
	 * positions from the start of its first tile */
	if (window > 0 && window <= ctx - ATT_TK + 1)
		ctx = window + ATT_TK - 1;

	pl.hdmax = hd <= 64 ? 64 : hd <= 128 ? 128 : 256;
	pl.hchunks = (group + ATT_MAX_GROUP - 1) / ATT_MAX_GROUP;
	pl.gb = (group + pl.hchunks - 1) / pl.hchunks;
	pl.bm = att_pre_rows(pl.hdmax) / pl.gb;
	pl.parts = 1;
	pl.part_len = ctx > 0 ? ctx : 1;
	/* Few blocks (decode of few sequences): cut the context so that the
	 * grid has about ATT_SPLIT_BLOCKS blocks, in partitions of whole tiles
	 * of at least ATT_PART_MIN positions. The last partition runs to the
	 * end of each context, so a position past max_context (which the
	 * contract rules out) would still be counted. */
	units = (int64_t)n_tokens * n_kv_heads * pl.hchunks;
	if (units > 0 && units < ATT_SPLIT_BLOCKS && ctx > ATT_PART_MIN) {
		int64_t want = (ATT_SPLIT_BLOCKS + units - 1) / units;
		int64_t len = (ctx + want - 1) / want;

		len = (len + ATT_TK - 1) / ATT_TK * ATT_TK;
		if (len < ATT_PART_MIN)
			len = ATT_PART_MIN;
		pl.part_len = (int)len;
		pl.parts = (int)((ctx + len - 1) / len);
	}
	return pl;
}

static size_t att_ws_bytes(int n_tokens, int n_heads, int hd, int parts)
{
	return parts > 1 ? (size_t)n_tokens * n_heads * parts * (hd + 2) * sizeof(float) : 0;
}

size_t lp_cuda_attention_workspace(const struct lp_backend_limits *lim)
{
	size_t worst = 0;
	int64_t cap = (int64_t)lim->max_blocks_per_seq * lim->block_size;

	if (lim->n_heads <= 0 || lim->n_kv_heads <= 0 || lim->n_heads % lim->n_kv_heads ||
	    lim->head_dim <= 0 || cap <= 0 || cap > INT_MAX)
		return 0;
	/* the split grids are those below ATT_SPLIT_BLOCKS blocks */
	for (int n = 1; n <= lim->max_tokens && n <= ATT_SPLIT_BLOCKS; n++) {
		att_plan pl = att_make_plan(n, lim->n_heads, lim->n_kv_heads, lim->head_dim,
		                            (int)cap, (int)cap, 0);
		size_t b = att_ws_bytes(n, lim->n_heads, lim->head_dim, pl.parts);

		worst = b > worst ? b : worst;
	}
	return worst;
}

template <typename T, int HDMAX>
static cudaError_t att_launch(cudaStream_t stream, const att_params &p, int n_kv_heads,
                              uint64_t *launches)
{
	const size_t big = 48 * 1024;
	const dim3 heads((unsigned)n_kv_heads * p.hchunks);
	size_t dec = att_smem_bytes(p.hd, (int)sizeof(T), ATT_DEC_ROWS, 1);
	size_t pre = att_smem_bytes(p.hd, (int)sizeof(T), att_pre_rows(HDMAX), att_pre_rows(HDMAX));
	cudaError_t e;

	if (dec > big && (e = cudaFuncSetAttribute(att_decode_kernel<T, HDMAX>,
	                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
	                                           (int)dec)) != cudaSuccess)
		return e;
	LP_LAUNCH(dim3((unsigned)p.n_tokens, heads.x, (unsigned)p.parts), ATT_DEC_WARPS * 32, dec,
	          stream, att_decode_kernel<T, HDMAX>)
	(p);
	(*launches)++;
	if ((e = cudaGetLastError()) != cudaSuccess)
		return e;
	if (p.parts > 1) {
		LP_LAUNCH((unsigned)p.n_tokens, 128, 0, stream, att_reduce_kernel)(p);
		(*launches)++;
		if ((e = cudaGetLastError()) != cudaSuccess)
			return e;
	}
	/* a lone token has no run to be part of */
	if (p.n_tokens < 2)
		return cudaSuccess;
	if (pre > big && (e = cudaFuncSetAttribute(att_prefill_kernel<T, HDMAX>,
	                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
	                                           (int)pre)) != cudaSuccess)
		return e;
	LP_LAUNCH(dim3((unsigned)((p.n_tokens + p.bm - 1) / p.bm), heads.x), ATT_PRE_WARPS * 32,
	          pre, stream, att_prefill_kernel<T, HDMAX>)
	(p);
	(*launches)++;
	return cudaGetLastError();
}

template <typename T>
static cudaError_t att_launch_hd(cudaStream_t stream, const att_params &p, int hdmax,
                                 int n_kv_heads, uint64_t *launches)
{
	if (hdmax == 64)
		return att_launch<T, 64>(stream, p, n_kv_heads, launches);
	if (hdmax == 128)
		return att_launch<T, 128>(stream, p, n_kv_heads, launches);
	return att_launch<T, 256>(stream, p, n_kv_heads, launches);
}

static bool att_aligned16(const void *ptr)
{
	return ((uintptr_t)ptr & 15u) == 0;
}

void lp_cuda_attention(void *ctx, const struct lp_attention_args *a)
{
	struct lp_cuda *cu = (struct lp_cuda *)ctx;
	const struct lp_tensor *k = a->k_cache, *v = a->v_cache;
	int64_t cap = (int64_t)a->max_blocks_per_seq * a->block_size;
	att_params p;
	att_plan pl;
	cudaError_t e;

	if (lp_cuda_failed(cu))
		return;
	LP_CUDA_REQUIRE(cu, a->n_tokens >= 0, "attention");
	LP_CUDA_REQUIRE(cu, a->n_heads > 0 && a->n_kv_heads > 0, "attention");
	LP_CUDA_REQUIRE(cu, a->n_heads % a->n_kv_heads == 0, "attention");
	LP_CUDA_REQUIRE(cu, a->head_dim > 0 && a->head_dim % 8 == 0 && a->head_dim <= 256,
	                "attention");
	LP_CUDA_REQUIRE(cu, a->block_size > 0 && a->max_blocks_per_seq > 0 && cap <= INT_MAX,
	                "attention");
	LP_CUDA_REQUIRE(cu, a->window >= 0, "attention");
	LP_CUDA_REQUIRE(cu, k->type == v->type, "attention");
	LP_CUDA_REQUIRE(
	    cu, k->type == LP_DTYPE_F32 || k->type == LP_DTYPE_F16 || k->type == LP_DTYPE_BF16,
	    "attention");
	LP_CUDA_REQUIRE(cu, k->cols == (int64_t)a->n_kv_heads * a->head_dim, "attention");
	LP_CUDA_REQUIRE(cu, v->cols == k->cols && v->rows == k->rows, "attention");
	LP_CUDA_REQUIRE(cu, k->rows <= INT_MAX, "attention");
	LP_CUDA_REQUIRE(cu, a->q->type == LP_DTYPE_F32 && a->out->type == LP_DTYPE_F32,
	                "attention");
	LP_CUDA_REQUIRE(cu, a->q->cols == (int64_t)a->n_heads * a->head_dim, "attention");
	LP_CUDA_REQUIRE(cu, a->out->cols == a->q->cols, "attention");
	LP_CUDA_REQUIRE(cu, a->q->rows >= a->n_tokens && a->out->rows >= a->n_tokens, "attention");
	LP_CUDA_REQUIRE(cu, a->out->data != a->q->data, "attention");
	/* 16-byte loads of q, K and V rows */
	LP_CUDA_REQUIRE(cu,
	                att_aligned16(a->q->data) && att_aligned16(a->out->data) &&
	                    att_aligned16(k->data) && att_aligned16(v->data),
	                "attention");
	if (a->n_tokens == 0)
		return;

	pl = att_make_plan(a->n_tokens, a->n_heads, a->n_kv_heads, a->head_dim, (int)cap,
	                   a->max_context, a->window);
	/* without the workspace reserve() sized, one partition (still right) */
	size_t need = att_ws_bytes(a->n_tokens, a->n_heads, a->head_dim, pl.parts);
	if (pl.parts > 1 &&
	    (!cu->ws[LP_CUDA_WS_ATTENTION] || cu->ws_bytes[LP_CUDA_WS_ATTENTION] < need)) {
		pl.parts = 1;
		pl.part_len = (int)cap;
	}

	p.q = (const float *)a->q->data;
	p.out = (float *)a->out->data;
	p.k = k->data;
	p.v = v->data;
	p.tok_seq = a->tok_seq;
	p.tok_pos = a->tok_pos;
	p.tables = a->block_tables;
	p.ws_o = pl.parts > 1 ? (float *)cu->ws[LP_CUDA_WS_ATTENTION] : NULL;
	p.ws_ml = pl.parts > 1 ? p.ws_o + (size_t)a->n_tokens * a->n_heads * pl.parts * a->head_dim
	                       : NULL;
	p.bad = cu->bad;
	p.q_cols = a->q->cols;
	p.out_cols = a->out->cols;
	p.kv_cols = k->cols;
	p.cache_rows = (int)k->rows;
	p.n_tokens = a->n_tokens;
	p.n_heads = a->n_heads;
	p.hd = a->head_dim;
	p.group = a->n_heads / a->n_kv_heads;
	p.gb = pl.gb;
	p.hchunks = pl.hchunks;
	p.bs = a->block_size;
	p.max_blocks = a->max_blocks_per_seq;
	p.cap = (int)cap;
	p.bm = pl.bm;
	p.parts = pl.parts;
	p.part_len = pl.part_len;
	p.window = a->window;
	p.scale2 = a->scale * ATT_LOG2E;

	switch (k->type) {
	case LP_DTYPE_F16:
		e = att_launch_hd<__half>(cu->stream, p, pl.hdmax, a->n_kv_heads, &cu->launches);
		break;
	case LP_DTYPE_BF16:
		e = att_launch_hd<__nv_bfloat16>(cu->stream, p, pl.hdmax, a->n_kv_heads,
		                                 &cu->launches);
		break;
	default:
		e = att_launch_hd<float>(cu->stream, p, pl.hdmax, a->n_kv_heads, &cu->launches);
		break;
	}
	LP_CUDA_CHECK(cu, e);
}
