/* The sample op on CUDA: one token per row of logits, one block per row.
 * Semantics: kernels/backend.h above struct lp_sample_row; the arithmetic
 * (values, rank keys, e^x, fixed-point masses) is kernels/sample-math.h,
 * shared with the CPU op (kernels/cpu/sample.c), so that for the same u
 * both return the same token, bit for bit the same cuts and draw.
 *
 * Nothing is sorted. Every cut is a selection in rank order: the candidate
 * at which a running weight (1 per candidate for top-k and the top-N
 * logprobs, the fixed-point p for top-p and the draw) first reaches a
 * target. A selection is a radix select over the 32-bit value keys, 11,
 * 11 and 10 bits per pass: each pass histograms, in shared memory, the
 * count and weight of the candidates under the prefix found so far, and a
 * block scan over the bins (better first) finds the bin where the running
 * weight crosses the target. Candidates of equal value weigh the same, so
 * how many of them the target needs is a division; they rank by id, and
 * the lowest id (kept per bin in the last pass) is usually the answer,
 * else a scan over the row in id order finds it. The weights are integers,
 * so the histogram's atomics add up to the same sums in any order and the
 * result does not depend on scheduling.
 *
 * Per row: a pass for the argmax and the best logit, one for the
 * log-softmax normaliser, then per selection three passes (top-N, top-k,
 * top-p, the draw, as asked) and one for each mass (top-p's base, the
 * kept mass). The values are recomputed (logit / temperature) in every
 * pass.
 *
 * Logit bias and penalties: once the passes over the raw row (argmax,
 * normaliser, top-N) are done, the threads take the row's entries in
 * parallel (distinct tokens, so no two write one logit) and bias and
 * penalise the logits in place (lp_sample_penalise, the CPU's and the
 * host sampler's arithmetic); a pass finds the new best, and greedy and
 * the draw read the penalised row. The chosen token's logprob wants its
 * raw logit, which a bias or penalty may have overwritten: before
 * writing, each entry's raw logit goes to the workspace at the entry's
 * own index (pen_off + j: the workspace holds limits.max_penalties
 * floats, and rows' slices do not overlap; a row may have up to vocab
 * entries, more than registers or shared memory could hold), and a last
 * pass over the entries finds the chosen token's.
 * Without entries the row is only read.
 *
 * A row with parameters, penalties or entries out of range gets token 0
 * and flags LP_CUDA_BAD_SAMPLE. */
#include "kernels/cuda/ops.cuh"
#include "kernels/sample-math.h"

/* The token must be the CPU op's: approximate division would change the
 * values. */
#if defined(__CUDACC__) && defined(__USE_FAST_MATH__)
#error "sample.cu must not be built with --use_fast_math"
#endif

#include <errno.h>

#define SAMPLE_THREADS 512
#define SAMPLE_WARPS   (SAMPLE_THREADS / 32)
#define RADIX_BINS     2048       /* 11 bits, the widest pass */
#define MAX_LOGPROBS   RADIX_BINS /* the top-N gather reuses the weight bins */

struct sample_smem {
	unsigned cnt[RADIX_BINS];
	unsigned long long w[RADIX_BINS];
	unsigned min_id[RADIX_BINS];
	unsigned long long scan[SAMPLE_WARPS];
	float fscan[SAMPLE_WARPS];
	int best_bin;
	unsigned long long base;
	unsigned tie_id, n_gathered;
	int raw_at; /* the entry of the chosen token, -1: none */
};

/* The row and the candidates a selection walks: rank >= lo, and p >=
 * min_p where min-p applies. */
struct sample_view {
	const float *l;
	int vocab;
	float t;     /* 1 for the raw logits (logprobs) */
	float m;     /* best value */
	float min_p; /* 0: off */
};

/* ---- block-wide helpers (every thread of the block calls them) ---- */

static __device__ __forceinline__ unsigned long long warp_sum(unsigned long long v)
{
#pragma unroll
	for (int d = 16; d > 0; d >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, d);
	return v;
}

static __device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
	for (int d = 16; d > 0; d >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, d);
	return v;
}

static __device__ __forceinline__ unsigned long long warp_max(unsigned long long v)
{
#pragma unroll
	for (int d = 16; d > 0; d >>= 1) {
		unsigned long long o = __shfl_xor_sync(0xffffffffu, v, d);
		v = o > v ? o : v;
	}
	return v;
}

static __device__ unsigned long long block_sum(struct sample_smem &sm, unsigned long long v)
{
	unsigned long long r = 0;

	v = warp_sum(v);
	if ((threadIdx.x & 31) == 0)
		sm.scan[threadIdx.x >> 5] = v;
	__syncthreads();
	for (int w = 0; w < SAMPLE_WARPS; w++)
		r += sm.scan[w];
	__syncthreads();
	return r;
}

/* The same order of additions on every run: lanes by butterfly, then the
 * warps in order. */
static __device__ float block_sum(struct sample_smem &sm, float v)
{
	float r = 0.0f;

	v = warp_sum(v);
	if ((threadIdx.x & 31) == 0)
		sm.fscan[threadIdx.x >> 5] = v;
	__syncthreads();
	for (int w = 0; w < SAMPLE_WARPS; w++)
		r += sm.fscan[w];
	__syncthreads();
	return r;
}

static __device__ unsigned long long block_max(struct sample_smem &sm, unsigned long long v)
{
	unsigned long long r = 0;

	v = warp_max(v);
	if ((threadIdx.x & 31) == 0)
		sm.scan[threadIdx.x >> 5] = v;
	__syncthreads();
	for (int w = 0; w < SAMPLE_WARPS; w++)
		r = sm.scan[w] > r ? sm.scan[w] : r;
	__syncthreads();
	return r;
}

/* Sum of v over the threads before this one. */
static __device__ unsigned long long block_exclusive(struct sample_smem &sm, unsigned long long v)
{
	const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
	unsigned long long x = v, off = 0;

#pragma unroll
	for (int d = 1; d < 32; d <<= 1) {
		unsigned long long y = __shfl_up_sync(0xffffffffu, x, d);
		if (lane >= d)
			x += y;
	}
	if (lane == 31)
		sm.scan[warp] = x;
	__syncthreads();
	for (int w = 0; w < warp; w++)
		off += sm.scan[w];
	__syncthreads();
	return off + x - v;
}

/* ---- candidates ---- */

static __device__ __forceinline__ float value_at(const struct sample_view &v, int i)
{
	return lp_sample_value(v.l[i], v.t);
}

/* Whether candidate i (value x, key k) is in the walk, and its weight. */
static __device__ __forceinline__ bool candidate(const struct sample_view &v, int i, float x,
                                                 uint32_t k, unsigned long long lo, bool mass,
                                                 unsigned long long *weight)
{
	if (lp_sample_rank(k, i) < lo)
		return false;
	if (!mass && v.min_p <= 0.0f) {
		*weight = 1;
		return true;
	}
	float p = lp_sample_exp(x - v.m);
	if (p < v.min_p)
		return false;
	*weight = mass ? lp_sample_weight(p) : 1;
	return true;
}

/* Total weight of the candidates (1 each, or p in fixed point). */
static __device__ unsigned long long
walk_weight(struct sample_smem &sm, const struct sample_view &v, unsigned long long lo, bool mass)
{
	unsigned long long s = 0, w;

	for (int i = threadIdx.x; i < v.vocab; i += SAMPLE_THREADS) {
		float x = value_at(v, i);

		if (candidate(v, i, x, lp_sample_key(x), lo, mass, &w))
			s += w;
	}
	return block_sum(sm, s);
}

/* The rank key of the candidate at which the running weight, walking the
 * candidates in rank order, first reaches target (strict: exceeds it). The
 * caller makes sure there is one. */
static __device__ unsigned long long select_rank(struct sample_smem &sm,
                                                 const struct sample_view &v, unsigned long long lo,
                                                 bool mass, bool strict, unsigned long long target)
{
	const int shifts[3] = {21, 10, 0}, widths[3] = {11, 11, 10};
	uint32_t prefix = 0;
	unsigned long long base = 0, w;
	int bin = 0;

#pragma unroll
	for (int level = 0; level < 3; level++) {
		const int shift = shifts[level], bins = 1 << widths[level];
		const int per = bins / SAMPLE_THREADS; /* bins per thread: 4 or 2 */
		const uint32_t above = level ? prefix >> (shift + widths[level]) : 0;
		const bool last = level == 2;
		int hi = bins - 1 - (int)threadIdx.x * per, mine = -1;
		unsigned long long local = 0, cum, mine_base = 0;

		for (int b = threadIdx.x; b < bins; b += SAMPLE_THREADS) {
			sm.cnt[b] = 0;
			sm.w[b] = 0;
			sm.min_id[b] = 0xffffffffu;
		}
		__syncthreads();
		for (int i = threadIdx.x; i < v.vocab; i += SAMPLE_THREADS) {
			float x = value_at(v, i);
			uint32_t k = lp_sample_key(x);

			if (level && k >> (shift + widths[level]) != above)
				continue;
			if (!candidate(v, i, x, k, lo, mass, &w))
				continue;
			int b = (int)((k >> shift) & (uint32_t)(bins - 1));
			atomicAdd(&sm.cnt[b], 1u);
			if (mass)
				atomicAdd(&sm.w[b], w);
			if (last)
				atomicMin(&sm.min_id[b], (unsigned)i);
		}
		__syncthreads();
		/* this thread's bins, best first: hi, hi - 1, ... */
		for (int j = 0; j < per; j++)
			local += mass ? sm.w[hi - j] : sm.cnt[hi - j];
		cum = base + block_exclusive(sm, local);
		for (int j = 0; j < per && mine < 0; j++) {
			unsigned long long before = cum;

			cum += mass ? sm.w[hi - j] : sm.cnt[hi - j];
			if (sm.cnt[hi - j] && (strict ? cum > target : cum >= target)) {
				mine = hi - j;
				mine_base = before;
			}
		}
		/* the crossing bin is the best of the bins that cross */
		if (threadIdx.x == 0)
			sm.best_bin = -1;
		__syncthreads();
		if (mine >= 0)
			atomicMax(&sm.best_bin, mine);
		__syncthreads();
		bin = sm.best_bin < 0 ? 0 : sm.best_bin;
		if (mine == bin)
			sm.base = mine_base;
		__syncthreads();
		base = sm.base;
		prefix |= (uint32_t)bin << shift;
	}

	/* prefix is the value; its candidates weigh the same: how many of
	 * them, in id order, the target needs */
	unsigned n_v = sm.cnt[bin], id = sm.min_id[bin];
	unsigned long long each = mass ? sm.w[bin] / (n_v ? n_v : 1) : 1, c = 1;

	if (each && target > base)
		c = strict ? (target - base) / each + 1 : (target - base + each - 1) / each;
	else if (strict && each)
		c = 1;
	if (c > n_v)
		c = n_v ? n_v : 1;
	__syncthreads();
	if (c > 1) {
		/* the c-th lowest id among them: a scan of the row in id order,
		 * each thread over one contiguous chunk */
		const int chunk = (v.vocab + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
		const int i0 = (int)threadIdx.x * chunk;
		const int i1 = i0 + chunk < v.vocab ? i0 + chunk : v.vocab;
		unsigned long long n = 0, before;

		for (int i = i0; i < i1; i++) {
			float x = value_at(v, i);
			uint32_t k = lp_sample_key(x);

			n += k == prefix && candidate(v, i, x, k, lo, mass, &w);
		}
		before = block_exclusive(sm, n);
		if (before < c && c <= before + n) {
			for (int i = i0; i < i1; i++) {
				float x = value_at(v, i);
				uint32_t k = lp_sample_key(x);

				if (k == prefix && candidate(v, i, x, k, lo, mass, &w) &&
				    ++before == c) {
					sm.tie_id = (unsigned)i;
					break;
				}
			}
		}
		__syncthreads();
		id = sm.tie_id;
		__syncthreads();
	}
	return lp_sample_rank(prefix, (int32_t)id);
}

/* ---- the kernel ---- */

/* The row is refused: token 0, LP_CUDA_BAD_SAMPLE. */
static __device__ void refuse_row(int row, int32_t *tokens, float *logprob, unsigned *bad)
{
	if (threadIdx.x == 0) {
		if (bad)
			atomicOr(bad, LP_CUDA_BAD_SAMPLE);
		tokens[row] = 0;
		if (logprob)
			logprob[row] = -INFINITY;
	}
}

/* pen and stash: NULL when no row has entries; stash has stash_cap
 * floats, one per entry of pen. The logits of rows with entries are
 * overwritten. */
__global__ void __launch_bounds__(SAMPLE_THREADS, 1)
    sample_kernel(float *__restrict__ logits, int64_t ld, int vocab,
                  const struct lp_sample_row *__restrict__ rows,
                  const struct lp_sample_penalty *__restrict__ pen, float *__restrict__ stash,
                  int64_t stash_cap, int max_logprobs, int32_t *tokens, float *logprob,
                  int32_t *top_ids, float *top_logprobs, unsigned *bad)
{
	__shared__ struct sample_smem sm;
	const int row = blockIdx.x;
	const struct lp_sample_row r = rows[row];
	float *l = logits + (int64_t)row * ld;
	struct sample_view v = {l, vocab, 1.0f, 0.0f, 0.0f};
	unsigned long long best = 0, n_max = 0;
	float m_raw, sum = 0.0f;
	int32_t token;
	int n_top;

	for (int j = threadIdx.x; j < max_logprobs; j += SAMPLE_THREADS) {
		if (top_ids)
			top_ids[(int64_t)row * max_logprobs + j] = -1;
		if (top_logprobs)
			top_logprobs[(int64_t)row * max_logprobs + j] = -INFINITY;
	}
	/* r is the block's: every thread returns, or none */
	if (!lp_sample_row_ok(&r, max_logprobs) || !lp_sample_penalties_ok(&r, vocab) ||
	    (r.pen_n > 0 && (!pen || !stash || (int64_t)r.pen_off + r.pen_n > stash_cap))) {
		refuse_row(row, tokens, logprob, bad);
		return;
	}
	/* (the row's entries and stash are pen + r.pen_off and stash +
	 * r.pen_off, computed where used: nothing of them stays live through the
	 * passes) */
	if (r.pen_n > 0) {
		const struct lp_sample_penalty *const ent = pen + r.pen_off;
		bool wrong = false;

		for (int j = threadIdx.x; j < r.pen_n; j += SAMPLE_THREADS)
			wrong |= !lp_sample_entry_ok(&ent[j], vocab);
		if (__syncthreads_or(wrong)) {
			refuse_row(row, tokens, logprob, bad);
			return;
		}
	}

	/* the raw row: argmax, and the log-softmax normaliser; with an
	 * infinite best, the candidates equal to it share the mass */
	for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
		unsigned long long k = lp_sample_rank(lp_sample_key(l[i]), i);
		best = k > best ? k : best;
	}
	best = block_max(sm, best);
	token = lp_sample_rank_id(best);
	const uint32_t raw_key = (uint32_t)(best >> 32);
	m_raw = lp_sample_key_value(raw_key);
	if (isfinite(m_raw)) {
		for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS)
			if (l[i] == l[i])
				sum += lp_sample_exp(l[i] - m_raw);
		sum = block_sum(sm, sum);
	} else {
		for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS)
			n_max += lp_sample_key(l[i]) == raw_key;
		n_max = block_sum(sm, n_max);
	}
	const double log_z = isfinite(m_raw) ? log((double)sum) : 0.0;
	/* of a raw logit x */
#define LOGPROB(x)                                                                                 \
	(isfinite(m_raw) ? ((x) == (x) ? (float)((double)(x) - (double)m_raw - log_z) : -INFINITY) \
	                 : (lp_sample_key(x) == raw_key ? (float)-log((double)n_max) : -INFINITY))

	/* top-N by the raw logits: the N best gathered, then placed by rank */
	n_top = r.n_logprobs < vocab ? r.n_logprobs : vocab;
	if (n_top > 0) {
		unsigned long long thr =
		    select_rank(sm, v, 0, false, false, (unsigned long long)n_top);

		if (threadIdx.x == 0)
			sm.n_gathered = 0;
		__syncthreads();
		for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
			unsigned long long k = lp_sample_rank(lp_sample_key(l[i]), i);

			if (k >= thr)
				sm.w[atomicAdd(&sm.n_gathered, 1u)] = k;
		}
		__syncthreads();
		for (int j = threadIdx.x; j < n_top; j += SAMPLE_THREADS) {
			unsigned long long k = sm.w[j];
			int pos = 0;
			int32_t id = lp_sample_rank_id(k);

			for (int q = 0; q < n_top; q++)
				pos += sm.w[q] > k;
			if (top_ids)
				top_ids[(int64_t)row * max_logprobs + pos] = id;
			if (top_logprobs)
				top_logprobs[(int64_t)row * max_logprobs + pos] = LOGPROB(l[id]);
		}
		__syncthreads();
	}

	/* the penalties, in place: every raw logit they change is stashed
	 * before any is written (so that even repeated tokens, which the
	 * contract rules out, read raw logits), then the new best */
	float m_best = m_raw;
	if (r.pen_n > 0) {
		const struct lp_sample_penalty *const ent = pen + r.pen_off;
		float *const raw = stash + r.pen_off;

		__syncthreads(); /* the raw passes have read the row */
		for (int j = threadIdx.x; j < r.pen_n; j += SAMPLE_THREADS)
			raw[j] = l[ent[j].token];
		__syncthreads();
		for (int j = threadIdx.x; j < r.pen_n; j += SAMPLE_THREADS) {
			const struct lp_sample_penalty e = ent[j];

			l[e.token] = lp_sample_penalise(raw[j], &r, &e);
		}
		__syncthreads();
		best = 0;
		for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
			unsigned long long k = lp_sample_rank(lp_sample_key(l[i]), i);
			best = k > best ? k : best;
		}
		best = block_max(sm, best);
		token = lp_sample_rank_id(best);
		m_best = lp_sample_key_value((uint32_t)(best >> 32));
	}

	if (r.temperature > 0.0f) {
		v.t = r.temperature;
		/* division is monotone: the best value is the best logit's */
		v.m = lp_sample_value(m_best, r.temperature);
		if (!isfinite(v.m)) {
			/* +inf takes all the mass (ties to the lower id); all -inf
			 * has none to share */
			unsigned long long top = 0;

			for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
				unsigned long long k =
				    lp_sample_rank(lp_sample_key(value_at(v, i)), i);
				top = k > top ? k : top;
			}
			token = lp_sample_rank_id(block_max(sm, top));
		} else {
			const int k = r.top_k > 0 && r.top_k < vocab ? r.top_k : 0;
			unsigned long long lo = 0, mass;

			if (k)
				lo = select_rank(sm, v, 0, false, false, (unsigned long long)k);
			if (r.top_p < 1.0f) {
				mass = walk_weight(sm, v, lo, true);
				lo = select_rank(sm, v, lo, true, false,
				                 lp_sample_fraction(r.top_p, mass));
			}
			v.min_p = r.min_p;
			mass = walk_weight(sm, v, lo, true);
			token = lp_sample_rank_id(
			    select_rank(sm, v, lo, true, true, lp_sample_fraction(r.u, mass)));
		}
	}
	/* the chosen token's raw logit: stashed if an entry penalised it */
	float x = 0.0f;
	if (logprob && r.pen_n > 0) {
		const struct lp_sample_penalty *const ent = pen + r.pen_off;
		const float *const raw = stash + r.pen_off;

		if (threadIdx.x == 0)
			sm.raw_at = -1;
		__syncthreads();
		for (int j = threadIdx.x; j < r.pen_n; j += SAMPLE_THREADS)
			if (ent[j].token == token)
				sm.raw_at = j;
		__syncthreads();
		x = sm.raw_at >= 0 ? raw[sm.raw_at] : l[token];
	} else if (logprob) {
		x = l[token];
	}
	if (threadIdx.x == 0) {
		tokens[row] = token;
		if (logprob)
			logprob[row] = LOGPROB(x);
	}
#undef LOGPROB
}

/* ---- launcher and op entry ---- */

static cudaError_t sample_launch(cudaStream_t stream, float *logits, int64_t ld, int vocab, int n,
                                 const struct lp_sample_row *rows,
                                 const struct lp_sample_penalty *pen, float *stash,
                                 int64_t stash_cap, int max_logprobs, int32_t *tokens,
                                 float *logprob, int32_t *top_ids, float *top_logprobs,
                                 unsigned *bad)
{
	LP_LAUNCH(n, SAMPLE_THREADS, 0, stream, sample_kernel)
	(logits, ld, vocab, rows, pen, stash, stash_cap, max_logprobs, tokens, logprob, top_ids,
	 top_logprobs, bad);
	return cudaGetLastError();
}

/* The selections keep their state in shared memory; the workspace holds
 * the raw logits the penalties overwrite, one per entry. */
size_t lp_cuda_sample_workspace(const struct lp_backend_limits *lim)
{
	if (lim->max_penalties <= 0)
		return 0;
	return (size_t)lim->max_penalties * sizeof(float);
}

void lp_cuda_sample(void *ctx, const struct lp_sample_args *args)
{
	struct lp_cuda *cu = (struct lp_cuda *)ctx;
	const struct lp_tensor *lg = args->logits;

	if (lp_cuda_failed(cu))
		return;
	LP_CUDA_REQUIRE(cu, lg && lg->type == LP_DTYPE_F32, "sample");
	LP_CUDA_REQUIRE(cu, lg->cols >= 1 && lg->cols <= (1 << 24), "sample");
	LP_CUDA_REQUIRE(cu, args->n >= 0 && args->n <= lg->rows, "sample");
	LP_CUDA_REQUIRE(cu, args->max_logprobs >= 0 && args->max_logprobs <= MAX_LOGPROBS,
	                "sample");
	LP_CUDA_REQUIRE(cu, args->rows && args->tokens, "sample");
	if (args->n == 0)
		return;
	/* entries need the workspace for their raw logits (a slice beyond it
	 * refuses its row) */
	LP_CUDA_REQUIRE(cu, !args->pen || cu->ws[LP_CUDA_WS_SAMPLE], "sample");
	cu->launches++;
	LP_CUDA_CHECK(cu, sample_launch(cu->stream, (float *)lg->data, lg->cols, (int)lg->cols,
	                                args->n, args->rows, args->pen,
	                                args->pen ? (float *)cu->ws[LP_CUDA_WS_SAMPLE] : NULL,
	                                (int64_t)(cu->ws_bytes[LP_CUDA_WS_SAMPLE] / sizeof(float)),
	                                args->max_logprobs, args->tokens, args->logprob,
	                                args->top_ids, args->top_logprobs, cu->bad));
}
