/* The CUDA emulation layer (kernels/cuda/emu/): kernels written as for
 * nvcc run on the CPU with CUDA's semantics for barriers, warps, shared
 * memory, atomics, launches, streams, events and graphs, and the mistakes
 * a GPU punishes (skipped barriers, bad configurations, host pointers) are
 * reported as launch errors instead of hangs. Integer results are compared
 * exactly; half and bf16 results bit for bit against an exact integer
 * reference (the GPU rounds them once). */
#include "kernels/cuda/cuda.cuh"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "tests/test.h"

/* ---- helpers ---- */

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

template <class T> static T *dev_alloc(size_t n)
{
	void *p = NULL;
	if (cudaMalloc(&p, n * sizeof(T)) != cudaSuccess)
		return NULL;
	return (T *)p;
}

/* Runs fn with stderr sent to a temporary file; returns what was written. */
template <class F> static std::string capture_stderr(F fn)
{
	fflush(stderr);
	int saved = dup(2);
	FILE *tmp = tmpfile();
	dup2(fileno(tmp), 2);
	fn();
	fflush(stderr);
	dup2(saved, 2);
	close(saved);
	std::string out;
	char buf[512];
	rewind(tmp);
	size_t n;
	while ((n = fread(buf, 1, sizeof(buf), tmp)) > 0)
		out.append(buf, n);
	fclose(tmp);
	return out;
}

/* ---- kernels ---- */

/* out[block] = sum of in over the block's 256 elements, by a tree in
 * shared memory. */
static __global__ void block_sum_kernel(const float *in, float *out)
{
	__shared__ float buf[256];
	int t = threadIdx.x;
	buf[t] = in[blockIdx.x * 256 + t];
	__syncthreads();
	for (int s = 128; s > 0; s >>= 1) {
		if (t < s)
			buf[t] += buf[t + s];
		__syncthreads();
	}
	if (t == 0)
		out[blockIdx.x] = buf[0];
}

/* Per warp: the xor-butterfly sum, the shfl_down sum (lane 0), the
 * inclusive prefix sum by shfl_up, a broadcast of lane 5 within segments
 * of 8 (lane 5 of each segment), and a rotation by shfl_sync. */
static __global__ void warp_kernel(const int *in, int *xor_sum, int *down_sum, int *scan,
                                   int *bcast, int *rot)
{
	int i = blockIdx.x * blockDim.x + threadIdx.x;
	int lane = threadIdx.x % 32;
	int v = in[i];

	int s = v;
	for (int o = 16; o > 0; o >>= 1)
		s += __shfl_xor_sync(0xffffffffu, s, o);
	xor_sum[i] = s;

	int d = v;
	for (int o = 16; o > 0; o >>= 1)
		d += __shfl_down_sync(0xffffffffu, d, o);
	down_sum[i] = d;

	int p = v;
	for (int o = 1; o < 32; o <<= 1) {
		int up = __shfl_up_sync(0xffffffffu, p, o);
		if (lane >= o)
			p += up;
	}
	scan[i] = p;

	bcast[i] = __shfl_sync(0xffffffffu, v, 5, 8);
	rot[i] = __shfl_sync(0xffffffffu, v, lane + 1);
}

static __global__ void vote_kernel(const int *pred, unsigned *ballot, int *any, int *all,
                                   unsigned *active)
{
	int i = blockIdx.x * blockDim.x + threadIdx.x;
	ballot[i] = __ballot_sync(0xffffffffu, pred[i]);
	any[i] = __any_sync(0xffffffffu, pred[i]);
	all[i] = __all_sync(0xffffffffu, pred[i]);
	active[i] = __activemask();
}

/* blockDim 48: warp 1 has 16 lanes. */
static __global__ void partial_warp_kernel(float *sum, unsigned *ballot, unsigned *active,
                                           float *beyond)
{
	int t = threadIdx.x;
	float v = (float)(t + 1);
	for (int o = 8; o > 0; o >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, o, 16);
	sum[t] = v;
	ballot[t] = __ballot_sync(0xffffffffu, 1);
	active[t] = __activemask();
	/* lanes 8..15 of warp 1 read lanes 16..23, which do not exist */
	beyond[t] = __shfl_down_sync(0xffffffffu, (float)t, 8);
}

static __global__ void atomics_kernel(int *isum, float *fsum, double *dsum,
                                      unsigned long long *usum, int *imax, int *imin,
                                      unsigned *bits_or, unsigned *bits_and, int *cas_count,
                                      unsigned *wrap)
{
	int i = blockIdx.x * blockDim.x + threadIdx.x;
	atomicAdd(isum, 1);
	atomicAdd(fsum, 0.5f);
	atomicAdd(dsum, 0.25);
	atomicAdd(usum, 1ull << 33);
	atomicMax(imax, i);
	atomicMin(imin, -i);
	atomicOr(bits_or, 1u << (i % 32));
	atomicAnd(bits_and, ~(1u << (i % 7)));
	int old = *cas_count, seen;
	while ((seen = atomicCAS(cas_count, old, old + 2)) != old)
		old = seen;
	atomicInc(wrap, 9);
}

static __global__ void dyn_smem_kernel(float *out, int n)
{
	LP_DYN_SHARED(float, s);
	for (int i = threadIdx.x; i < n; i += blockDim.x)
		s[i] = (float)(i & 63); /* small integers: sums stay exact */
	__syncthreads();
	float acc = 0;
	for (int i = threadIdx.x; i < n; i += blockDim.x)
		acc += s[n - 1 - i];
	atomicAdd(out, acc);
}

template <typename T, int N> static __global__ void scale_kernel(T *x, T factor, int n)
{
	int i = blockIdx.x * blockDim.x + threadIdx.x;
#pragma unroll
	for (int k = 0; k < N; k++)
		if (i * N + k < n)
			x[i * N + k] *= factor;
}

/* Threads past `live` return before the barrier the others wait at. */
static __global__ void barrier_skip_kernel(float *x, int live)
{
	if ((int)threadIdx.x >= live)
		return;
	x[threadIdx.x] = 1;
	__syncthreads();
	float next = x[(threadIdx.x + 1) % live];
	__syncthreads();
	x[threadIdx.x] += next;
}

/* Half a warp waits at __syncthreads, the other half in a shuffle that
 * names the first half. */
static __global__ void mixed_wait_kernel(int *x)
{
	if (threadIdx.x < 16)
		__syncthreads();
	else
		x[threadIdx.x] = __shfl_sync(0xffffffffu, (int)threadIdx.x, 0);
}

/* Lanes 16..31 exit while lanes 0..15 shuffle with a full mask. */
static __global__ void lane_exit_kernel(int *x)
{
	if (threadIdx.x >= 16)
		return;
	x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}

static __global__ void mask_mismatch_kernel(int *x)
{
	unsigned mask = threadIdx.x < 2 ? 0x3u : 0xffffffffu;
	x[threadIdx.x] = __shfl_xor_sync(mask, (int)threadIdx.x, 1);
}

/* Two half-warps shuffle as independent groups; then the sm_80 reductions
 * and __match_any_sync over the whole warp. */
static __global__ void warp_groups_kernel(int *half_sum, unsigned *red, unsigned *match)
{
	int lane = threadIdx.x % 32;
	unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
	int v = lane;
	for (int o = 8; o > 0; o >>= 1)
		v += __shfl_xor_sync(mask, v, o);
	__syncwarp(mask);
	half_sum[threadIdx.x] = v;
	__syncwarp();
	red[threadIdx.x * 4 + 0] = __reduce_add_sync(0xffffffffu, (unsigned)lane);
	red[threadIdx.x * 4 + 1] = __reduce_max_sync(0xffffffffu, (unsigned)(lane * 7 % 32));
	red[threadIdx.x * 4 + 2] = (unsigned)__reduce_min_sync(0xffffffffu, 5 - lane);
	red[threadIdx.x * 4 + 3] = __reduce_xor_sync(0xffffffffu, 1u << lane);
	match[threadIdx.x] = __match_any_sync(0xffffffffu, lane % 3);
}

/* Lanes 1 and 2 meet first, then lanes 0 and 1: lane 0 waits for lane 1
 * while lane 1 is in the other group, as a GPU allows. */
static __global__ void nested_groups_kernel(int *x)
{
	int lane = threadIdx.x, v = lane;
	if (lane >= 1)
		v += __shfl_xor_sync(0x6u, v, 3);
	if (lane <= 1)
		v += __shfl_xor_sync(0x3u, v, 1);
	x[lane] = v;
}

/* Two lanes name each other in different collectives. */
static __global__ void op_mismatch_kernel(int *x)
{
	if (threadIdx.x == 0)
		x[0] = __shfl_sync(0x3u, 1, 1);
	else if (threadIdx.x == 1)
		x[1] = (int)__ballot_sync(0x3u, 1);
}

static __global__ void trap_kernel(int *x)
{
	if (threadIdx.x == 3)
		__trap();
	x[threadIdx.x] = 1;
}

static __global__ void index_kernel(unsigned *out)
{
	unsigned bx = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
	unsigned tx = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
	unsigned nt = blockDim.x * blockDim.y * blockDim.z;
	out[bx * nt + tx] = (threadIdx.x << 0) | (threadIdx.y << 4) | (threadIdx.z << 8) |
	                    (blockIdx.x << 12) | (blockIdx.y << 16) | (blockIdx.z << 20);
}

static __global__ void hfma2_kernel(const __half2 *a, const __half2 *b, const __half2 *c,
                                    __half2 *out, int n)
{
	int i = blockIdx.x * blockDim.x + threadIdx.x;
	if (i < n)
		out[i] = __hfma2(a[i], b[i], c[i]);
}

static __global__ void bf16_fma_kernel(const __nv_bfloat162 *a, const __nv_bfloat162 *b,
                                       const __nv_bfloat162 *c, __nv_bfloat162 *out, int n)
{
	int i = blockIdx.x * blockDim.x + threadIdx.x;
	if (i < n)
		out[i] = __hfma2(a[i], b[i], c[i]);
}

static __global__ void affine_kernel(const float *x, float *y, float a, float b, int n)
{
	int i = blockIdx.x * blockDim.x + threadIdx.x;
	if (i < n)
		y[i] = a * x[i] + b;
}

static __global__ void sync_count_kernel(int *out)
{
	int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
	int c = __syncthreads_count(t % 3 == 0);
	int a = __syncthreads_and(t < 1000);
	int o = __syncthreads_or(t == 77);
	int z = __syncthreads_and(t != 5);
	if (t == 0) {
		out[0] = c;
		out[1] = a;
		out[2] = o;
		out[3] = z;
	}
}

struct params {
	int n;
	float bias[3];
};

/* Modifies its by-value parameters: each thread has its own copy. */
static __global__ void by_value_kernel(params p, int *out, int k)
{
	k += threadIdx.x;
	p.n += k;
	out[threadIdx.x] = p.n + (int)p.bias[2];
}

static __global__ void sync_many_kernel(int *out, int rounds)
{
	__shared__ int s[1024];
	int t = threadIdx.x;
	s[t] = t;
	for (int r = 0; r < rounds; r++) {
		__syncthreads();
		int v = s[(t + 1) % blockDim.x];
		__syncthreads();
		s[t] = v;
	}
	__syncthreads();
	if (t == 0)
		out[blockIdx.x] = s[0];
}

static __global__ void empty_kernel(int *out)
{
	if (threadIdx.x == 0 && blockIdx.x == 0)
		out[0] = 1;
}

static void host_fn_mark(void *p)
{
	*(int *)p += 1;
}

/* ---- tests ---- */

static void test_context(void)
{
	struct lp_cuda cu;
	struct lp_err err;
	CHECK_OK(lp_cuda_init(&cu, 0, &err), &err);
	CHECK_EQ_STR(cu.name, "loraplane CUDA emulation");
	CHECK_EQ_INT(cu.cc_major, 9);
	CHECK_EQ_INT(cu.cc_minor, 0);
	CHECK_EQ_INT(cu.sm_count, 8);
	CHECK(cu.stream != NULL && cu.side != NULL && cu.stream != cu.side);
	lp_cuda_release(&cu);

	setenv("LP_EMU_NO_DEVICE", "1", 1);
	int n = 7;
	cudaError_t e = cudaGetDeviceCount(&n);
	int rc = lp_cuda_init(&cu, 0, &err);
	unsetenv("LP_EMU_NO_DEVICE");
	CHECK_EQ_INT(e, cudaErrorNoDevice);
	CHECK_EQ_INT(n, 0);
	CHECK_EQ_INT(rc, -ENODEV);
	CHECK_MSG(strstr(err.msg, "cudaErrorNoDevice") != NULL, "message: %s", err.msg);
	(void)cudaGetLastError();
	CHECK_EQ_INT(cudaGetDeviceCount(&n), cudaSuccess);
	CHECK_EQ_INT(n, 1);
	CHECK_EQ_INT(lp_cuda_init(&cu, 1, &err), -ENODEV);
	struct cudaDeviceProp prop;
	CHECK_EQ_INT(cudaGetDeviceProperties(&prop, 0), cudaSuccess);
	CHECK_EQ_INT(prop.warpSize, 32);
	CHECK_EQ_INT(prop.sharedMemPerBlock, 48 << 10);
	CHECK_EQ_INT(prop.sharedMemPerBlockOptin, 227 << 10);
	CHECK_EQ_INT(prop.maxThreadsPerBlock, 1024);
	int v = 0;
	CHECK_EQ_INT(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0),
	             cudaSuccess);
	CHECK_EQ_INT(v, 227 << 10);
}

static void test_block_reduction(void)
{
	const int blocks = 37;
	std::vector<float> h(blocks * 256), out(blocks);
	for (size_t i = 0; i < h.size(); i++)
		h[i] = (float)((i * 7919) % 1000); /* integers: every order sums exactly */
	float *din = dev_alloc<float>(h.size()), *dout = dev_alloc<float>(blocks);
	CHECK(din && dout);
	CHECK_EQ_INT(cudaMemcpy(din, h.data(), h.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
	LP_LAUNCH(blocks, 256, 0, 0, block_sum_kernel)(din, dout);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	CHECK_EQ_INT(cudaMemcpy(out.data(), dout, blocks * 4, cudaMemcpyDeviceToHost), cudaSuccess);
	for (int b = 0; b < blocks; b++) {
		double want = 0;
		for (int t = 0; t < 256; t++)
			want += h[b * 256 + t];
		CHECK_MSG(out[b] == (float)want, "block %d: %g, expected %g", b, out[b], want);
	}
	cudaFree(din);
	cudaFree(dout);
}

static void test_warp_shuffles(void)
{
	const int n = 128; /* 2 blocks of 64: 4 warps */
	std::vector<int> h(n), xs(n), ds(n), sc(n), bc(n), rot(n);
	for (int i = 0; i < n; i++)
		h[i] = (i * 37) % 101 - 50;
	int *din = dev_alloc<int>(n), *dx = dev_alloc<int>(n), *dd = dev_alloc<int>(n),
	    *dsc = dev_alloc<int>(n), *dbc = dev_alloc<int>(n), *drot = dev_alloc<int>(n);
	CHECK(din && dx && dd && dsc && dbc && drot);
	cudaMemcpy(din, h.data(), n * 4, cudaMemcpyHostToDevice);
	LP_LAUNCH(2, 64, 0, 0, warp_kernel)(din, dx, dd, dsc, dbc, drot);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	cudaMemcpy(xs.data(), dx, n * 4, cudaMemcpyDeviceToHost);
	cudaMemcpy(ds.data(), dd, n * 4, cudaMemcpyDeviceToHost);
	cudaMemcpy(sc.data(), dsc, n * 4, cudaMemcpyDeviceToHost);
	cudaMemcpy(bc.data(), dbc, n * 4, cudaMemcpyDeviceToHost);
	cudaMemcpy(rot.data(), drot, n * 4, cudaMemcpyDeviceToHost);
	for (int w = 0; w < n / 32; w++) {
		int total = 0, prefix = 0;
		for (int l = 0; l < 32; l++)
			total += h[w * 32 + l];
		for (int l = 0; l < 32; l++) {
			int i = w * 32 + l;
			prefix += h[i];
			CHECK_MSG(xs[i] == total, "xor sum lane %d of warp %d: %d != %d", l, w,
			          xs[i], total);
			/* shfl_down keeps the lane's own value past the end: only
			 * lane 0 holds the whole sum */
			if (l == 0)
				CHECK_EQ_INT(ds[i], total);
			CHECK_MSG(sc[i] == prefix, "scan lane %d of warp %d: %d != %d", l, w, sc[i],
			          prefix);
			CHECK_EQ_INT(bc[i], h[w * 32 + (l / 8) * 8 + 5]);
			CHECK_EQ_INT(rot[i], h[w * 32 + (l + 1) % 32]);
		}
	}
	cudaFree(din);
	cudaFree(dx);
	cudaFree(dd);
	cudaFree(dsc);
	cudaFree(dbc);
	cudaFree(drot);
}

static void test_votes(void)
{
	const int n = 96;
	std::vector<int> pred(n), any(n), all(n);
	std::vector<unsigned> ballot(n), active(n);
	for (int i = 0; i < n; i++)
		pred[i] = i < 32 ? (i % 3 == 0) : (i < 64 ? 0 : 1); /* mixed, none, all */
	int *dp = dev_alloc<int>(n), *dany = dev_alloc<int>(n), *dall = dev_alloc<int>(n);
	unsigned *db = dev_alloc<unsigned>(n), *da = dev_alloc<unsigned>(n);
	cudaMemcpy(dp, pred.data(), n * 4, cudaMemcpyHostToDevice);
	LP_LAUNCH(1, n, 0, 0, vote_kernel)(dp, db, dany, dall, da);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	cudaMemcpy(ballot.data(), db, n * 4, cudaMemcpyDeviceToHost);
	cudaMemcpy(any.data(), dany, n * 4, cudaMemcpyDeviceToHost);
	cudaMemcpy(all.data(), dall, n * 4, cudaMemcpyDeviceToHost);
	cudaMemcpy(active.data(), da, n * 4, cudaMemcpyDeviceToHost);
	for (int i = 0; i < n; i++) {
		int w = i / 32;
		CHECK_EQ_INT(ballot[i], w == 0 ? 0x49249249u : (w == 1 ? 0u : 0xffffffffu));
		CHECK_EQ_INT(any[i], w != 1);
		CHECK_EQ_INT(all[i], w == 2);
		CHECK_EQ_INT(active[i], 0xffffffffu);
	}
	cudaFree(dp);
	cudaFree(dany);
	cudaFree(dall);
	cudaFree(db);
	cudaFree(da);
}

static void test_partial_warp(void)
{
	const int n = 48;
	std::vector<float> sum(n), beyond(n);
	std::vector<unsigned> ballot(n), active(n);
	float *ds = dev_alloc<float>(n), *dbeyond = dev_alloc<float>(n);
	unsigned *db = dev_alloc<unsigned>(n), *da = dev_alloc<unsigned>(n);
	LP_LAUNCH(1, n, 0, 0, partial_warp_kernel)(ds, db, da, dbeyond);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	cudaMemcpy(sum.data(), ds, n * 4, cudaMemcpyDeviceToHost);
	cudaMemcpy(beyond.data(), dbeyond, n * 4, cudaMemcpyDeviceToHost);
	cudaMemcpy(ballot.data(), db, n * 4, cudaMemcpyDeviceToHost);
	cudaMemcpy(active.data(), da, n * 4, cudaMemcpyDeviceToHost);
	for (int t = 0; t < n; t++) {
		/* segments of 16 lanes: the sum of t + 1 over the segment */
		int seg = t / 16 * 16;
		float want = 0;
		for (int k = seg; k < seg + 16; k++)
			want += (float)(k + 1);
		CHECK_MSG(sum[t] == want, "thread %d: sum %g, expected %g", t, sum[t], want);
		CHECK_EQ_INT(ballot[t], t < 32 ? 0xffffffffu : 0xffffu);
		CHECK_EQ_INT(active[t], t < 32 ? 0xffffffffu : 0xffffu);
		int lane = t % 32;
		if (t < 32)
			CHECK_EQ_INT(beyond[t], lane + 8 < 32 ? t + 8 : t);
		else if (lane < 8)
			CHECK_EQ_INT(beyond[t], t + 8);
		else /* past the partial warp's end: the emulation's poison */
			CHECK_MSG(isnan(beyond[t]), "thread %d read %g from a missing lane", t,
			          beyond[t]);
	}
	cudaFree(ds);
	cudaFree(dbeyond);
	cudaFree(db);
	cudaFree(da);
}

static void test_warp_groups(void)
{
	int *hs = dev_alloc<int>(32);
	unsigned *red = dev_alloc<unsigned>(128), *match = dev_alloc<unsigned>(32);
	LP_LAUNCH(1, 32, 0, 0, warp_groups_kernel)(hs, red, match);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	int h[32];
	unsigned r[128], m[32];
	cudaMemcpy(h, hs, sizeof(h), cudaMemcpyDeviceToHost);
	cudaMemcpy(r, red, sizeof(r), cudaMemcpyDeviceToHost);
	cudaMemcpy(m, match, sizeof(m), cudaMemcpyDeviceToHost);
	for (int l = 0; l < 32; l++) {
		CHECK_EQ_INT(h[l], l < 16 ? 120 : 376); /* 0+..+15, 16+..+31 */
		CHECK_EQ_INT(r[l * 4 + 0], 496);
		CHECK_EQ_INT(r[l * 4 + 1], 31);
		CHECK_EQ_INT((int)r[l * 4 + 2], 5 - 31);
		CHECK_EQ_INT(r[l * 4 + 3], 0xffffffffu);
		CHECK_EQ_INT(m[l],
		             l % 3 == 0 ? 0x49249249u : (l % 3 == 1 ? 0x92492492u : 0x24924924u));
	}
	LP_LAUNCH(1, 3, 0, 0, nested_groups_kernel)(hs);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	cudaMemcpy(h, hs, 3 * sizeof(int), cudaMemcpyDeviceToHost);
	CHECK(h[0] == 3 && h[1] == 3 && h[2] == 3);
	cudaFree(hs);
	cudaFree(red);
	cudaFree(match);
}

static void test_atomics(void)
{
	const int blocks = 13, threads = 96, n = blocks * threads;
	int *isum = dev_alloc<int>(1), *imax = dev_alloc<int>(1), *imin = dev_alloc<int>(1),
	    *cas = dev_alloc<int>(1);
	float *fsum = dev_alloc<float>(1);
	double *dsum = dev_alloc<double>(1);
	unsigned long long *usum = dev_alloc<unsigned long long>(1);
	unsigned *bor = dev_alloc<unsigned>(1), *band = dev_alloc<unsigned>(1),
	         *wrap = dev_alloc<unsigned>(1);
	cudaMemset(isum, 0, 4);
	cudaMemset(fsum, 0, 4);
	cudaMemset(dsum, 0, 8);
	cudaMemset(usum, 0, 8);
	cudaMemset(imax, 0x80, 4); /* very negative */
	cudaMemset(imin, 0x7f, 4); /* very positive */
	cudaMemset(bor, 0, 4);
	cudaMemset(band, 0xff, 4);
	cudaMemset(cas, 0, 4);
	cudaMemset(wrap, 0, 4);
	LP_LAUNCH(blocks, threads, 0, 0, atomics_kernel)
	(isum, fsum, dsum, usum, imax, imin, bor, band, cas, wrap);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	int hi[4];
	float hf;
	double hd;
	unsigned long long hu;
	unsigned hb[3];
	cudaMemcpy(&hi[0], isum, 4, cudaMemcpyDeviceToHost);
	cudaMemcpy(&hi[1], imax, 4, cudaMemcpyDeviceToHost);
	cudaMemcpy(&hi[2], imin, 4, cudaMemcpyDeviceToHost);
	cudaMemcpy(&hi[3], cas, 4, cudaMemcpyDeviceToHost);
	cudaMemcpy(&hf, fsum, 4, cudaMemcpyDeviceToHost);
	cudaMemcpy(&hd, dsum, 8, cudaMemcpyDeviceToHost);
	cudaMemcpy(&hu, usum, 8, cudaMemcpyDeviceToHost);
	cudaMemcpy(&hb[0], bor, 4, cudaMemcpyDeviceToHost);
	cudaMemcpy(&hb[1], band, 4, cudaMemcpyDeviceToHost);
	cudaMemcpy(&hb[2], wrap, 4, cudaMemcpyDeviceToHost);
	CHECK_EQ_INT(hi[0], n);
	CHECK_EQ_INT(hi[1], n - 1);
	CHECK_EQ_INT(hi[2], -(n - 1));
	CHECK_EQ_INT(hi[3], 2 * n);
	CHECK(hf == 0.5f * n);
	CHECK(hd == 0.25 * n);
	CHECK_EQ_INT(hu, (unsigned long long)n << 33);
	CHECK_EQ_INT(hb[0], 0xffffffffu);
	CHECK_EQ_INT(hb[1], 0xffffff80u);
	CHECK_EQ_INT(hb[2], (unsigned)(n % 10));
	cudaFree(isum);
	cudaFree(imax);
	cudaFree(imin);
	cudaFree(cas);
	cudaFree(fsum);
	cudaFree(dsum);
	cudaFree(usum);
	cudaFree(bor);
	cudaFree(band);
	cudaFree(wrap);
}

static void test_dynamic_shared_memory(void)
{
	float *out = dev_alloc<float>(1), h;
	CHECK(out);
	const int small = (48 << 10) / 4, big = (100 << 10) / 4;

	cudaMemset(out, 0, 4);
	LP_LAUNCH(1, 128, small * 4, 0, dyn_smem_kernel)(out, small);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	cudaMemcpy(&h, out, 4, cudaMemcpyDeviceToHost);
	CHECK(h == (float)(small / 64 * 2016));

	/* above 48 KiB without the attribute: refused, nothing runs */
	cudaMemset(out, 0, 4);
	LP_LAUNCH(1, 128, big * 4, 0, dyn_smem_kernel)(out, big);
	CHECK_EQ_INT(cudaGetLastError(), cudaErrorInvalidValue);
	cudaMemcpy(&h, out, 4, cudaMemcpyDeviceToHost);
	CHECK(h == 0);

	CHECK_EQ_INT(cudaFuncSetAttribute(dyn_smem_kernel,
	                                  cudaFuncAttributeMaxDynamicSharedMemorySize, 228 << 10),
	             cudaErrorInvalidValue);
	(void)cudaGetLastError();
	CHECK_EQ_INT(cudaFuncSetAttribute(dyn_smem_kernel,
	                                  cudaFuncAttributeMaxDynamicSharedMemorySize, big * 4),
	             cudaSuccess);
	LP_LAUNCH(2, 128, big * 4, 0, dyn_smem_kernel)(out, big);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	cudaMemcpy(&h, out, 4, cudaMemcpyDeviceToHost);
	CHECK(h == (float)(2 * big / 64 * 2016)); /* two blocks */

	/* the attribute is a limit: one byte more is refused */
	LP_LAUNCH(1, 128, big * 4 + 1, 0, dyn_smem_kernel)(out, big);
	CHECK_EQ_INT(cudaGetLastError(), cudaErrorInvalidValue);
	cudaFree(out);
}

static void test_template_launch(void)
{
	const int n = 1000;
	std::vector<float> h(n);
	for (int i = 0; i < n; i++)
		h[i] = (float)i;
	float *d = dev_alloc<float>(n);
	cudaStream_t s;
	CHECK_EQ_INT(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
	cudaMemcpyAsync(d, h.data(), n * 4, cudaMemcpyHostToDevice, s);
	LP_LAUNCH((n + 4 * 64 - 1) / (4 * 64), 64, 0, s, scale_kernel<float, 4>)(d, 3.0f, n);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	/* the arguments convert as in a call: a double factor, a size_t n */
	LP_LAUNCH(dim3((n + 63) / 64), dim3(64), 0, s, scale_kernel<float, 1>)(d, 0.5, (size_t)n);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	cudaMemcpyAsync(h.data(), d, n * 4, cudaMemcpyDeviceToHost, s);
	CHECK_EQ_INT(cudaStreamSynchronize(s), cudaSuccess);
	for (int i = 0; i < n; i++)
		CHECK_MSG(h[i] == 1.5f * i, "x[%d] = %g", i, h[i]);
	cudaStreamDestroy(s);
	cudaFree(d);
}

static void test_skipped_barrier_is_an_error(void)
{
	float *x = dev_alloc<float>(64);
	int *y = dev_alloc<int>(64);
	CHECK(x && y);
	std::string err = capture_stderr([&] {
		LP_LAUNCH(3, 64, 0, 0, barrier_skip_kernel)
		(x, 40);
	});
	CHECK_EQ_INT(cudaGetLastError(), cudaErrorLaunchFailure);
	CHECK_MSG(err.find("barrier_skip_kernel") != std::string::npos &&
	              err.find("__syncthreads") != std::string::npos,
	          "stderr: %s", err.c_str());
	/* reported once: the next call sees a clean slate */
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	CHECK_EQ_INT(cudaDeviceSynchronize(), cudaSuccess);

	/* the error also reaches the next synchronising call */
	capture_stderr([&] { LP_LAUNCH(1, 64, 0, 0, barrier_skip_kernel)(x, 63); });
	CHECK_EQ_INT(cudaDeviceSynchronize(), cudaErrorLaunchFailure);
	(void)cudaGetLastError();

	/* a launch that does not skip works, with the same fibers */
	LP_LAUNCH(3, 64, 0, 0, barrier_skip_kernel)(x, 64);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	float h[64];
	cudaMemcpy(h, x, sizeof(h), cudaMemcpyDeviceToHost);
	for (int i = 0; i < 64; i++)
		CHECK(h[i] == 2);

	err = capture_stderr([&] { LP_LAUNCH(1, 32, 0, 0, mixed_wait_kernel)(y); });
	CHECK_EQ_INT(cudaGetLastError(), cudaErrorLaunchFailure);
	CHECK_MSG(err.find("mixed_wait_kernel") != std::string::npos &&
	              err.find("deadlock") != std::string::npos,
	          "stderr: %s", err.c_str());

	err = capture_stderr([&] { LP_LAUNCH(1, 32, 0, 0, lane_exit_kernel)(y); });
	CHECK_EQ_INT(cudaGetLastError(), cudaErrorLaunchFailure);
	CHECK_MSG(err.find("exited") != std::string::npos, "stderr: %s", err.c_str());

	err = capture_stderr([&] { LP_LAUNCH(1, 32, 0, 0, mask_mismatch_kernel)(y); });
	CHECK_EQ_INT(cudaGetLastError(), cudaErrorLaunchFailure);
	CHECK_MSG(err.find("mask") != std::string::npos, "stderr: %s", err.c_str());

	err = capture_stderr([&] { LP_LAUNCH(1, 32, 0, 0, op_mismatch_kernel)(y); });
	CHECK_EQ_INT(cudaGetLastError(), cudaErrorLaunchFailure);
	CHECK_MSG(err.find("deadlock") != std::string::npos &&
	              err.find("__shfl_sync") != std::string::npos,
	          "stderr: %s", err.c_str());

	err = capture_stderr([&] { LP_LAUNCH(2, 32, 0, 0, trap_kernel)(y); });
	CHECK_EQ_INT(cudaGetLastError(), cudaErrorLaunchFailure);
	CHECK_MSG(err.find("__trap") != std::string::npos, "stderr: %s", err.c_str());

	/* a host pointer given to a kernel */
	std::vector<int> host(32);
	err = capture_stderr([&] { LP_LAUNCH(1, 32, 0, 0, empty_kernel)(host.data()); });
	CHECK_EQ_INT(cudaGetLastError(), cudaErrorIllegalAddress);
	CHECK_MSG(err.find("empty_kernel") != std::string::npos &&
	              err.find("argument 1") != std::string::npos,
	          "stderr: %s", err.c_str());

	LP_LAUNCH(1, 32, 0, 0, empty_kernel)(y);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	cudaFree(x);
	cudaFree(y);
}

static void test_bad_launch_config(void)
{
	int *y = dev_alloc<int>(1);
	const dim3 bad_blocks[] = {dim3(1025), dim3(32, 33), dim3(1, 1, 65), dim3(0)};
	const dim3 bad_grids[] = {dim3(0), dim3(1, 65536), dim3(1, 1, 65536)};
	for (const dim3 &b : bad_blocks) {
		LP_LAUNCH(1, b, 0, 0, empty_kernel)(y);
		CHECK_MSG(cudaGetLastError() == cudaErrorInvalidConfiguration, "block (%u,%u,%u)",
		          b.x, b.y, b.z);
	}
	for (const dim3 &g : bad_grids) {
		LP_LAUNCH(g, 32, 0, 0, empty_kernel)(y);
		CHECK_MSG(cudaGetLastError() == cudaErrorInvalidConfiguration, "grid (%u,%u,%u)",
		          g.x, g.y, g.z);
	}
	cudaStream_t s;
	cudaStreamCreate(&s);
	cudaStreamDestroy(s);
	LP_LAUNCH(1, 32, 0, s, empty_kernel)(y);
	CHECK_EQ_INT(cudaGetLastError(), cudaErrorInvalidResourceHandle);
	LP_LAUNCH(dim3(1, 65535, 1), dim3(1024), 0, 0, empty_kernel)(y);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	cudaFree(y);
}

static void test_grids_and_blocks_in_3d(void)
{
	const dim3 grid(3, 4, 2), block(4, 3, 2);
	const int n = 3 * 4 * 2 * 4 * 3 * 2;
	unsigned *d = dev_alloc<unsigned>(n);
	std::vector<unsigned> h(n);
	cudaMemset(d, 0xff, n * 4);
	LP_LAUNCH(grid, block, 0, 0, index_kernel)(d);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	cudaMemcpy(h.data(), d, n * 4, cudaMemcpyDeviceToHost);
	for (unsigned bz = 0; bz < 2; bz++)
		for (unsigned by = 0; by < 4; by++)
			for (unsigned bx = 0; bx < 3; bx++)
				for (unsigned tz = 0; tz < 2; tz++)
					for (unsigned ty = 0; ty < 3; ty++)
						for (unsigned tx = 0; tx < 4; tx++) {
							unsigned b = bx + 3 * (by + 4 * bz);
							unsigned t = tx + 4 * (ty + 3 * tz);
							unsigned want = tx | ty << 4 | tz << 8 |
							                bx << 12 | by << 16 |
							                bz << 20;
							CHECK_EQ_INT(h[b * 24 + t], want);
						}
	cudaFree(d);
}

/* The exact a * b + c of three halves (bf16 when bf16), rounded once to
 * nearest even: integer arithmetic on significands, independent of the
 * emulation's floating-point route. Inputs are finite; returns the bits. */
static uint16_t exact_fma_bits(uint16_t a, uint16_t b, uint16_t c, bool bf16)
{
	const int mant = bf16 ? 7 : 10, ebits = bf16 ? 8 : 5, bias = bf16 ? 127 : 15;
	/* value = sig * 2^exp with integer sig */
	auto decode = [&](uint16_t h, __int128 *sig, int *exp) {
		int e = (h >> mant) & ((1 << ebits) - 1);
		int m = h & ((1 << mant) - 1);
		int s = h >> 15 ? -1 : 1;
		if (e == 0) {
			*sig = s * m;
			*exp = 1 - bias - mant;
		} else {
			*sig = s * (m | (1 << mant));
			*exp = e - bias - mant;
		}
	};
	__int128 sa, sb, sc;
	int ea, eb, ec;
	decode(a, &sa, &ea);
	decode(b, &sb, &eb);
	decode(c, &sc, &ec);
	__int128 sp = sa * sb;
	int ep = ea + eb;
	int e0 = ep < ec ? ep : ec;
	__int128 v = sp * ((__int128)1 << (ep - e0)) + sc * ((__int128)1 << (ec - e0));
	/* value = v * 2^e0 */
	bool neg = v < 0;
	if (neg)
		v = -v;
	if (v == 0) {
		/* exact zero: +0 unless both terms are -0 or negative-zero sums */
		bool pneg = (sp < 0) || (sp == 0 && ((a ^ b) >> 15));
		bool cneg = c >> 15;
		return (uint16_t)((pneg && cneg) ? 0x8000 : 0);
	}
	int top = 127;
	while (!((v >> top) & 1))
		top--;
	int lead = top + e0; /* exponent of the leading bit */
	int emin = 1 - bias;
	int q = (lead < emin ? emin : lead) - mant; /* exponent of the last kept bit */
	__int128 m;
	if (q > e0) {
		int sh = q - e0;
		__int128 rem = v & (((__int128)1 << sh) - 1), half = (__int128)1 << (sh - 1);
		m = v >> sh;
		if (rem > half || (rem == half && (m & 1)))
			m++;
	} else {
		m = v << (e0 - q);
	}
	/* m * 2^q, m < 2^(mant+2) */
	if (m >> (mant + 1)) {
		m >>= 1;
		q++;
	}
	uint16_t sign = neg ? 0x8000 : 0;
	int biased = (m >> mant) ? q + mant + bias : 0;
	if (biased >= (1 << ebits) - 1)
		return sign | (uint16_t)(((1 << ebits) - 1) << mant); /* infinity */
	return sign | (uint16_t)(biased << mant) | (uint16_t)(m & ((1 << mant) - 1));
}

static uint16_t rand_bits(uint64_t *state, bool bf16)
{
	*state = *state * 6364136223846793005ull + 1442695040888963407ull;
	uint16_t r = (uint16_t)(*state >> 41);
	if (bf16) {
		/* exponents within +-20 keep the integer reference in 128 bits */
		int e = 127 - 20 + (int)((*state >> 20) % 41);
		return (uint16_t)((r & 0x807f) | (e << 7));
	}
	if (((r >> 10) & 0x1f) == 0x1f)
		r &= ~0x4000; /* no inf or NaN inputs */
	return r;
}

static void test_half_fma_rounding(void)
{
	const int n = 20000;
	uint64_t st = 12345;
	std::vector<__half2> a(n), b(n), c(n), out(n);
	std::vector<uint16_t> ab(2 * n), bb(2 * n), cb(2 * n);
	for (int i = 0; i < 2 * n; i++) {
		ab[i] = rand_bits(&st, false);
		bb[i] = rand_bits(&st, false);
		cb[i] = rand_bits(&st, false);
	}
	/* hand-made cases: a tie of the product broken by a tiny addend
	 * (where rounding to float first and then to half goes wrong), and
	 * overflow to infinity */
	ab[0] = 0x3e00; /* 1.5 */
	bb[0] = 0x3c03; /* 1 + 3 * 2^-10: the product is a tie, 1.5 + 2^-8 + 2^-11 */
	cb[0] = 0x0001; /* +2^-24 breaks it upwards */
	ab[1] = 0x3e00; /* 1.5 */
	bb[1] = 0x3c01; /* 1 + 2^-10: the product is a tie, 1.5 + 2^-10 + 2^-11 */
	cb[1] = 0x8001; /* -2^-24 breaks it downwards */
	ab[2] = 0x7bff; /* 65504 */
	bb[2] = 0x3c01;
	cb[2] = 0;
	memcpy((void *)a.data(), ab.data(), 4 * n);
	memcpy((void *)b.data(), bb.data(), 4 * n);
	memcpy((void *)c.data(), cb.data(), 4 * n);
	__half2 *da = dev_alloc<__half2>(n), *db = dev_alloc<__half2>(n),
	        *dc = dev_alloc<__half2>(n), *dout = dev_alloc<__half2>(n);
	cudaMemcpy(da, a.data(), 4 * n, cudaMemcpyHostToDevice);
	cudaMemcpy(db, b.data(), 4 * n, cudaMemcpyHostToDevice);
	cudaMemcpy(dc, c.data(), 4 * n, cudaMemcpyHostToDevice);
	LP_LAUNCH((n + 255) / 256, 256, 0, 0, hfma2_kernel)(da, db, dc, dout, n);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	cudaMemcpy(out.data(), dout, 4 * n, cudaMemcpyDeviceToHost);
	std::vector<uint16_t> ob(2 * n);
	memcpy((void *)ob.data(), out.data(), 4 * n);
	int float_route_differs = 0;
	for (int i = 0; i < 2 * n; i++) {
		uint16_t want = exact_fma_bits(ab[i], bb[i], cb[i], false);
		CHECK_MSG(ob[i] == want, "hfma(0x%04x, 0x%04x, 0x%04x) = 0x%04x, expected 0x%04x",
		          ab[i], bb[i], cb[i], ob[i], want);
		/* the naive reference: fused in float, then rounded */
		float f = fmaf(__half2float(__ushort_as_half(ab[i])),
		               __half2float(__ushort_as_half(bb[i])),
		               __half2float(__ushort_as_half(cb[i])));
		float_route_differs += __half_as_ushort(__float2half_rn(f)) != want;
	}
	CHECK_EQ_INT(ob[0], 0x3e05); /* round to even would give 0x3e04 */
	CHECK_EQ_INT(ob[1], 0x3e01); /* round to even would give 0x3e02 */
	CHECK_EQ_INT(ob[2], 0x7c00); /* 65504 * (1 + 2^-10) overflows */
	CHECK_MSG(float_route_differs >= 2 && float_route_differs < 50,
	          "float-then-half differs in %d cases", float_route_differs);

	/* bf16: the same check with 8-bit significands */
	std::vector<__nv_bfloat162> x(n), y(n), z(n), r(n);
	for (int i = 0; i < 2 * n; i++) {
		ab[i] = rand_bits(&st, true);
		bb[i] = rand_bits(&st, true);
		cb[i] = rand_bits(&st, true);
	}
	memcpy((void *)x.data(), ab.data(), 4 * n);
	memcpy((void *)y.data(), bb.data(), 4 * n);
	memcpy((void *)z.data(), cb.data(), 4 * n);
	__nv_bfloat162 *dx = dev_alloc<__nv_bfloat162>(n), *dy = dev_alloc<__nv_bfloat162>(n),
	               *dz = dev_alloc<__nv_bfloat162>(n), *dr = dev_alloc<__nv_bfloat162>(n);
	cudaMemcpy(dx, x.data(), 4 * n, cudaMemcpyHostToDevice);
	cudaMemcpy(dy, y.data(), 4 * n, cudaMemcpyHostToDevice);
	cudaMemcpy(dz, z.data(), 4 * n, cudaMemcpyHostToDevice);
	LP_LAUNCH((n + 255) / 256, 256, 0, 0, bf16_fma_kernel)(dx, dy, dz, dr, n);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	cudaMemcpy(r.data(), dr, 4 * n, cudaMemcpyDeviceToHost);
	memcpy((void *)ob.data(), r.data(), 4 * n);
	for (int i = 0; i < 2 * n; i++) {
		uint16_t want = exact_fma_bits(ab[i], bb[i], cb[i], true);
		CHECK_MSG(ob[i] == want,
		          "bf16 fma(0x%04x, 0x%04x, 0x%04x) = 0x%04x, expected 0x%04x", ab[i],
		          bb[i], cb[i], ob[i], want);
	}
	cudaFree(da);
	cudaFree(db);
	cudaFree(dc);
	cudaFree(dout);
	cudaFree(dx);
	cudaFree(dy);
	cudaFree(dz);
	cudaFree(dr);
}

static void test_graph_capture_and_replay(void)
{
	const int n = 300;
	float *hin, *hout;
	CHECK_EQ_INT(cudaMallocHost((void **)&hin, n * 4), cudaSuccess);
	CHECK_EQ_INT(cudaMallocHost((void **)&hout, n * 4), cudaSuccess);
	float *dx = dev_alloc<float>(n), *dy = dev_alloc<float>(n), *dz = dev_alloc<float>(n);
	int *marks = NULL;
	CHECK_EQ_INT(cudaMallocHost((void **)&marks, 4), cudaSuccess);
	*marks = 0;
	cudaStream_t s;
	cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
	for (int i = 0; i < n; i++) {
		hin[i] = (float)i;
		hout[i] = -1;
	}

	struct lp_emu_counters before = lp_emu_stats();
	CHECK_EQ_INT(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal), cudaSuccess);
	enum cudaStreamCaptureStatus st;
	CHECK_EQ_INT(cudaStreamIsCapturing(s, &st), cudaSuccess);
	CHECK_EQ_INT(st, cudaStreamCaptureStatusActive);
	cudaMemcpyAsync(dx, hin, n * 4, cudaMemcpyHostToDevice, s);
	LP_LAUNCH((n + 127) / 128, 128, 0, s, affine_kernel)(dx, dy, 2.0f, 1.0f, n);
	LP_LAUNCH((n + 127) / 128, 128, 0, s, affine_kernel)(dy, dz, 1.0f, -3.0f, n);
	cudaMemcpyAsync(hout, dz, n * 4, cudaMemcpyDeviceToHost, s);
	cudaLaunchHostFunc(s, host_fn_mark, marks);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	cudaGraph_t g;
	CHECK_EQ_INT(cudaStreamEndCapture(s, &g), cudaSuccess);
	/* nothing ran while capturing */
	CHECK(hout[7] == -1 && *marks == 0);
	CHECK_EQ_INT(lp_emu_stats().launches, before.launches);
	size_t nodes = 0;
	CHECK_EQ_INT(cudaGraphGetNodes(g, NULL, &nodes), cudaSuccess);
	CHECK_EQ_INT(nodes, 5);
	cudaGraphExec_t ge;
	CHECK_EQ_INT(cudaGraphInstantiate(&ge, g, 0), cudaSuccess);
	CHECK_EQ_INT(cudaGraphDestroy(g), cudaSuccess); /* the exec is independent */

	for (int round = 0; round < 3; round++) {
		for (int i = 0; i < n; i++)
			hin[i] = (float)(i * (round + 1));
		CHECK_EQ_INT(cudaGraphLaunch(ge, s), cudaSuccess);
		CHECK_EQ_INT(cudaStreamSynchronize(s), cudaSuccess);
		for (int i = 0; i < n; i++)
			CHECK_MSG(hout[i] == 2.0f * i * (round + 1) - 2.0f,
			          "round %d: out[%d] = %g", round, i, hout[i]);
		CHECK_EQ_INT(*marks, round + 1);
	}
	struct lp_emu_counters after = lp_emu_stats();
	CHECK_EQ_INT(after.launches - before.launches, 6);
	CHECK_EQ_INT(after.graph_launches - before.graph_launches, 3);
	CHECK(after.h2d_bytes - before.h2d_bytes >= 3u * n * 4);
	CHECK(after.d2h_bytes - before.d2h_bytes >= 3u * n * 4);
	CHECK_EQ_INT(cudaGraphExecDestroy(ge), cudaSuccess);

	/* calls CUDA forbids during a capture fail and spoil it */
	CHECK_EQ_INT(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal), cudaSuccess);
	void *p = NULL;
	CHECK_EQ_INT(cudaMalloc(&p, 16), cudaErrorStreamCaptureUnsupported);
	CHECK_EQ_INT(cudaMemcpy(dx, hin, 4, cudaMemcpyHostToDevice),
	             cudaErrorStreamCaptureUnsupported);
	CHECK_EQ_INT(cudaStreamIsCapturing(s, &st), cudaSuccess);
	CHECK_EQ_INT(st, cudaStreamCaptureStatusInvalidated);
	CHECK_EQ_INT(cudaStreamEndCapture(s, &g), cudaErrorStreamCaptureInvalidated);
	CHECK(g == NULL);
	(void)cudaGetLastError();

	CHECK_EQ_INT(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal), cudaSuccess);
	CHECK_EQ_INT(cudaStreamSynchronize(s), cudaErrorStreamCaptureUnsupported);
	CHECK_EQ_INT(cudaStreamEndCapture(s, &g), cudaErrorStreamCaptureInvalidated);
	(void)cudaGetLastError();

	/* relaxed mode allows cudaMalloc; the legacy stream cannot capture */
	CHECK_EQ_INT(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed), cudaSuccess);
	CHECK_EQ_INT(cudaMalloc(&p, 16), cudaSuccess);
	CHECK_EQ_INT(cudaStreamEndCapture(s, &g), cudaSuccess);
	CHECK_EQ_INT(cudaGraphDestroy(g), cudaSuccess);
	CHECK_EQ_INT(cudaFree(p), cudaSuccess);
	CHECK_EQ_INT(cudaStreamBeginCapture(0, cudaStreamCaptureModeGlobal),
	             cudaErrorStreamCaptureUnsupported);
	CHECK_EQ_INT(cudaStreamEndCapture(s, &g), cudaErrorIllegalState);
	(void)cudaGetLastError();

	cudaStreamDestroy(s);
	cudaFree(dx);
	cudaFree(dy);
	cudaFree(dz);
	cudaFreeHost(hin);
	cudaFreeHost(hout);
	cudaFreeHost(marks);
}

static void test_streams_and_events(void)
{
	const int n = 256;
	float *dx = dev_alloc<float>(n), *dy = dev_alloc<float>(n), *dz = dev_alloc<float>(n);
	std::vector<float> h(n);
	for (int i = 0; i < n; i++)
		h[i] = (float)i;
	cudaStream_t a, b;
	cudaEvent_t e0, e1, e2, nt;
	cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking);
	cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking);
	cudaEventCreate(&e0);
	cudaEventCreate(&e1);
	cudaEventCreateWithFlags(&e2, cudaEventDisableTiming);
	cudaEventCreateWithFlags(&nt, cudaEventDisableTiming);
	int marks = 0;

	CHECK_EQ_INT(cudaEventRecord(e0, a), cudaSuccess);
	cudaMemcpyAsync(dx, h.data(), n * 4, cudaMemcpyHostToDevice, a);
	LP_LAUNCH(2, 128, 0, a, affine_kernel)(dx, dy, 3.0f, 0.0f, n);
	CHECK_EQ_INT(cudaEventRecord(e2, a), cudaSuccess);
	CHECK_EQ_INT(cudaStreamWaitEvent(b, e2, 0), cudaSuccess);
	LP_LAUNCH(2, 128, 0, b, affine_kernel)(dy, dz, 1.0f, 1.0f, n);
	cudaLaunchHostFunc(b, host_fn_mark, &marks);
	cudaMemcpyAsync(h.data(), dz, n * 4, cudaMemcpyDeviceToHost, b);
	CHECK_EQ_INT(cudaEventRecord(e1, b), cudaSuccess);
	CHECK_EQ_INT(cudaEventSynchronize(e1), cudaSuccess);
	CHECK_EQ_INT(cudaEventQuery(e1), cudaSuccess);
	CHECK_EQ_INT(cudaStreamQuery(a), cudaSuccess);
	CHECK_EQ_INT(marks, 1);
	for (int i = 0; i < n; i++)
		CHECK(h[i] == 3.0f * i + 1);
	float ms = -1;
	CHECK_EQ_INT(cudaEventElapsedTime(&ms, e0, e1), cudaSuccess);
	CHECK(ms >= 0);
	CHECK_EQ_INT(cudaEventElapsedTime(&ms, e0, e2), cudaErrorInvalidResourceHandle);
	CHECK_EQ_INT(cudaEventElapsedTime(&ms, e0, nt), cudaErrorInvalidResourceHandle);
	(void)cudaGetLastError();

	/* a fork to b and a join back to a inside a capture */
	CHECK_EQ_INT(cudaStreamBeginCapture(a, cudaStreamCaptureModeThreadLocal), cudaSuccess);
	LP_LAUNCH(2, 128, 0, a, affine_kernel)(dx, dy, 1.0f, 5.0f, n);
	cudaEventRecord(e2, a);
	cudaStreamWaitEvent(b, e2, 0);
	LP_LAUNCH(2, 128, 0, b, affine_kernel)(dy, dz, 2.0f, 0.0f, n);
	cudaEventRecord(nt, b);
	cudaStreamWaitEvent(a, nt, 0);
	cudaGraph_t g;
	CHECK_EQ_INT(cudaStreamEndCapture(a, &g), cudaSuccess);
	enum cudaStreamCaptureStatus st;
	CHECK_EQ_INT(cudaStreamIsCapturing(b, &st), cudaSuccess);
	CHECK_EQ_INT(st, cudaStreamCaptureStatusNone);
	cudaGraphExec_t ge;
	CHECK_EQ_INT(cudaGraphInstantiate(&ge, g, 0), cudaSuccess);
	CHECK_EQ_INT(cudaGraphLaunch(ge, b), cudaSuccess);
	cudaMemcpyAsync(h.data(), dz, n * 4, cudaMemcpyDeviceToHost, b);
	cudaStreamSynchronize(b);
	for (int i = 0; i < n; i++)
		CHECK(h[i] == 2.0f * (i + 5));
	cudaGraphExecDestroy(ge);
	cudaGraphDestroy(g);

	/* a fork that is never joined */
	CHECK_EQ_INT(cudaStreamBeginCapture(a, cudaStreamCaptureModeGlobal), cudaSuccess);
	cudaEventRecord(e2, a);
	cudaStreamWaitEvent(b, e2, 0);
	LP_LAUNCH(1, 32, 0, b, empty_kernel)((int *)dz);
	CHECK_EQ_INT(cudaStreamEndCapture(a, &g), cudaErrorStreamCaptureUnjoined);
	CHECK_EQ_INT(cudaStreamIsCapturing(b, &st), cudaSuccess);
	CHECK_EQ_INT(st, cudaStreamCaptureStatusNone);
	(void)cudaGetLastError();

	cudaEventDestroy(e0);
	cudaEventDestroy(e1);
	cudaEventDestroy(e2);
	cudaEventDestroy(nt);
	CHECK_EQ_INT(cudaEventDestroy(nt), cudaErrorInvalidResourceHandle);
	(void)cudaGetLastError();
	cudaStreamDestroy(a);
	cudaStreamDestroy(b);
	cudaFree(dx);
	cudaFree(dy);
	cudaFree(dz);
}

static void test_memory_accounting(void)
{
	size_t free0, total0, free1, total1;
	CHECK_EQ_INT(cudaMemGetInfo(&free0, &total0), cudaSuccess);
	CHECK_EQ_INT(total0, (size_t)8 << 30);
	void *p = NULL;
	CHECK_EQ_INT(cudaMalloc(&p, 1000000), cudaSuccess);
	CHECK_EQ_INT(cudaMemGetInfo(&free1, &total1), cudaSuccess);
	CHECK(free0 - free1 >= 1000000 && free0 - free1 < 1000000 + 4096);
	/* new memory reads as NaN */
	float f;
	cudaMemcpy(&f, p, 4, cudaMemcpyDeviceToHost);
	CHECK(isnan(f));
	/* copies past the end of an allocation are refused */
	std::vector<char> h(1000001);
	CHECK_EQ_INT(cudaMemcpy(p, h.data(), 1000001, cudaMemcpyHostToDevice),
	             cudaErrorInvalidValue);
	CHECK_EQ_INT(cudaMemcpy(h.data(), (char *)p + 1, 1000000, cudaMemcpyDeviceToHost),
	             cudaErrorInvalidValue);
	CHECK_EQ_INT(cudaMemset((char *)p + 999999, 0, 2), cudaErrorInvalidValue);
	CHECK_EQ_INT(cudaMemcpy(h.data(), p, 1000000, cudaMemcpyDefault), cudaSuccess);
	CHECK_EQ_INT(cudaGetLastError(), cudaErrorInvalidValue);
	CHECK_EQ_INT(cudaFree(p), cudaSuccess);
	CHECK_EQ_INT(cudaFree(p), cudaErrorInvalidDevicePointer);
	(void)cudaGetLastError();
	CHECK_EQ_INT(cudaMemGetInfo(&free1, &total1), cudaSuccess);
	CHECK_EQ_INT(free1, free0);

	setenv("LP_EMU_MEMORY", "64M", 1);
	CHECK_EQ_INT(cudaMemGetInfo(&free1, &total1), cudaSuccess);
	CHECK_EQ_INT(total1, 64 << 20);
	void *q = NULL;
	CHECK_EQ_INT(cudaMalloc(&p, 40 << 20), cudaSuccess);
	CHECK_EQ_INT(cudaMalloc(&q, 40 << 20), cudaErrorMemoryAllocation);
	CHECK(q == NULL);
	CHECK_EQ_INT(cudaGetLastError(), cudaErrorMemoryAllocation);
	CHECK_EQ_INT(cudaFree(p), cudaSuccess);
	CHECK_EQ_INT(cudaMalloc(&q, 40 << 20), cudaSuccess);
	CHECK_EQ_INT(cudaFree(q), cudaSuccess);
	unsetenv("LP_EMU_MEMORY");

	/* 2-D copies: rows of width bytes between pitched buffers */
	char *d2 = dev_alloc<char>(8 * 16);
	char src[8 * 10], back[8 * 10];
	for (int i = 0; i < 80; i++)
		src[i] = (char)i;
	CHECK_EQ_INT(cudaMemcpy2DAsync(d2, 16, src, 10, 10, 8, cudaMemcpyHostToDevice, 0),
	             cudaSuccess);
	CHECK_EQ_INT(cudaMemcpy2DAsync(back, 10, d2, 16, 10, 8, cudaMemcpyDeviceToHost, 0),
	             cudaSuccess);
	CHECK(memcmp(src, back, 80) == 0);
	CHECK_EQ_INT(cudaMemcpy2DAsync(d2, 8, src, 10, 10, 8, cudaMemcpyHostToDevice, 0),
	             cudaErrorInvalidPitchValue);
	(void)cudaGetLastError();
	cudaFree(d2);
}

static void test_barrier_reductions_and_by_value(void)
{
	int *d = dev_alloc<int>(64), h[64];
	LP_LAUNCH(1, dim3(10, 10, 3), 0, 0, sync_count_kernel)(d);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	cudaMemcpy(h, d, 16, cudaMemcpyDeviceToHost);
	CHECK_EQ_INT(h[0], 100);
	CHECK_EQ_INT(h[1], 1);
	CHECK_EQ_INT(h[2], 1);
	CHECK_EQ_INT(h[3], 0);

	params p = {10, {0.5f, 1.5f, 7.0f}};
	LP_LAUNCH(1, 64, 0, 0, by_value_kernel)(p, d, 100);
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	cudaMemcpy(h, d, sizeof(h), cudaMemcpyDeviceToHost);
	for (int t = 0; t < 64; t++)
		CHECK_EQ_INT(h[t], 10 + 100 + t + 7);
	cudaFree(d);
}

/* Sanitizers slow fibers down 10 to 100 times: fewer rounds there. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
static const int speed_scale = 20;
#else
static const int speed_scale = 1;
#endif

static void test_speed(void)
{
	const int rounds = 1000 / speed_scale, blocks = 1000 / speed_scale;
	int *d = dev_alloc<int>(1000);
	/* context switches: one block of 1024 threads, 2000 barriers */
	struct lp_emu_counters c0 = lp_emu_stats();
	double t0 = now_s();
	LP_LAUNCH(1, 1024, 0, 0, sync_many_kernel)(d, rounds);
	double t1 = now_s();
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	int h = -1;
	cudaMemcpy(&h, d, 4, cudaMemcpyDeviceToHost);
	CHECK_EQ_INT(h, rounds % 1024);
	struct lp_emu_counters c1 = lp_emu_stats();
	double sw = (double)(c1.switches - c0.switches);
	CHECK(sw >= 2.0 * rounds * 1023);

	/* 256 threads, 16 barriers, 1000 blocks */
	double t2 = now_s();
	LP_LAUNCH(blocks, 256, 0, 0, sync_many_kernel)(d, 8);
	double t3 = now_s();
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);

	/* no barriers: threads run back to back on one fiber */
	struct lp_emu_counters c2 = lp_emu_stats();
	double t4 = now_s();
	LP_LAUNCH(blocks, 256, 0, 0, empty_kernel)(d);
	double t5 = now_s();
	CHECK_EQ_INT(cudaGetLastError(), cudaSuccess);
	struct lp_emu_counters c3 = lp_emu_stats();
	CHECK(c3.switches - c2.switches <= 2);

	printf("     emu speed: %.1f M switches/s (%.1f ns each); %d blocks x 256 threads x 16 "
	       "__syncthreads: %.1f ms; %d x 256 threads without barriers: %.1f ms%s\n",
	       sw / (t1 - t0) * 1e-6, (t1 - t0) / sw * 1e9, blocks, (t3 - t2) * 1e3, blocks,
	       (t5 - t4) * 1e3, speed_scale > 1 ? " (sanitizer build, scaled down)" : "");
	cudaFree(d);
}

int main(void)
{
	TEST_MAIN_BEGIN("test-emu");
	RUN(test_context);
	RUN(test_block_reduction);
	RUN(test_warp_shuffles);
	RUN(test_votes);
	RUN(test_partial_warp);
	RUN(test_warp_groups);
	RUN(test_atomics);
	RUN(test_dynamic_shared_memory);
	RUN(test_template_launch);
	RUN(test_skipped_barrier_is_an_error);
	RUN(test_bad_launch_config);
	RUN(test_grids_and_blocks_in_3d);
	RUN(test_half_fma_rounding);
	RUN(test_graph_capture_and_replay);
	RUN(test_streams_and_events);
	RUN(test_memory_accounting);
	RUN(test_barrier_reductions_and_by_value);
	RUN(test_speed);
	TEST_MAIN_END();
}
