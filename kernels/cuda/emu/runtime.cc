/* The CUDA runtime API subset of the emulation: errors, the one device,
 * memory, streams, events, graph capture and replay, launches.
 *
 * Streams run their work when it is enqueued, on the calling thread, so
 * every stream is always idle and events complete when recorded. A stream
 * that captures records the work instead (cloning kernel arguments), and
 * cudaGraphLaunch replays the recording on its stream: replay really runs
 * the kernels and copies again, reading the copies' sources anew. */
#include "kernels/cuda/emu/internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

struct lp_emu_atomic_counters lp_emu_ctr;

namespace
{

/* Allocations above this are mapped lazily (zero pages) instead of being
 * filled with the 0xff pattern, so that a large reservation does not touch
 * every page of host memory. */
const size_t POISON_MAX = (size_t)64 << 20;

thread_local cudaError_t last_error = cudaSuccess;
/* a launch failure not yet reported by a synchronising call */
std::atomic<int> pending_error{cudaSuccess};

cudaError_t ret(cudaError_t e)
{
	if (e != cudaSuccess && e != cudaErrorNotReady)
		last_error = e;
	return e;
}

bool no_device()
{
	const char *v = getenv("LP_EMU_NO_DEVICE");
	return v && *v && strcmp(v, "0") != 0;
}

size_t total_memory()
{
	const char *v = getenv("LP_EMU_MEMORY");
	if (!v || !*v)
		return (size_t)8 << 30;
	char *end;
	unsigned long long n = strtoull(v, &end, 10);
	switch (*end) {
	case 'k':
	case 'K':
		n <<= 10;
		break;
	case 'm':
	case 'M':
		n <<= 20;
		break;
	case 'g':
	case 'G':
		n <<= 30;
		break;
	default:
		break;
	}
	return n ? (size_t)n : (size_t)8 << 30;
}

struct alloc {
	size_t size;
	bool device; /* cudaMalloc (else pinned host memory) */
	bool mapped; /* mmap'd (large), else posix_memalign */
};

/* ---- streams, events, graphs ---- */

enum node_kind { NODE_KERNEL, NODE_COPY, NODE_SET, NODE_HOST };

struct node {
	node_kind kind;
	/* kernel */
	dim3 grid, block;
	size_t smem;
	lp_emu_kernel *k; /* owned in graphs, borrowed while being enqueued */
	/* copy (2-D: height rows of width bytes) and set */
	void *dst;
	const void *src;
	size_t dpitch, spitch, width, height;
	enum cudaMemcpyKind dir;
	int value;
	/* host function */
	cudaHostFn_t fn;
	void *user;
};

struct graph_nodes {
	std::vector<node> nodes;
	graph_nodes()
	{
	}
	graph_nodes(const graph_nodes &) = delete;
	~graph_nodes()
	{
		for (node &n : nodes)
			if (n.kind == NODE_KERNEL)
				delete n.k;
	}
	void add(const node &n)
	{
		nodes.push_back(n);
		if (n.kind == NODE_KERNEL)
			nodes.back().k = n.k->clone();
	}
};

struct capture;

} // namespace

struct CUstream_st {
	unsigned flags;
	capture *cap;  /* the capture it takes part in */
	bool unjoined; /* a forked stream with work the origin has not joined */
};

struct CUevent_st {
	unsigned flags;
	bool recorded;
	std::chrono::steady_clock::time_point t;
	capture *cap;       /* recorded into this capture (fork/join) */
	CUstream_st *where; /* the stream it was recorded on */
};

struct CUgraph_st : graph_nodes {
};
struct CUgraphExec_st : graph_nodes {
};

namespace
{

struct capture {
	CUgraph_st *graph;
	enum cudaStreamCaptureMode mode;
	std::thread::id owner;
	bool invalidated;
	CUstream_st *origin;
	std::vector<CUstream_st *> streams; /* origin first, then forks */
};

std::mutex mu; /* everything below */
std::map<uintptr_t, alloc> allocs;
size_t used_bytes;
std::set<const void *> handles; /* live streams, events, graphs, execs */
std::set<CUevent_st *> events;  /* live events (also in handles) */
std::map<const void *, int> max_dyn_smem;
std::vector<capture *> captures;
CUstream_st legacy_stream;
thread_local CUstream_st per_thread_stream;
thread_local enum cudaStreamCaptureMode thread_mode = cudaStreamCaptureModeGlobal;

/* The stream a handle names; NULL when the handle is not a live stream. */
CUstream_st *stream_of(cudaStream_t s)
{
	if (s == NULL || s == cudaStreamLegacy)
		return &legacy_stream;
	if (s == cudaStreamPerThread)
		return &per_thread_stream;
	std::lock_guard<std::mutex> g(mu);
	return handles.count(s) ? s : NULL;
}

bool live(const void *h)
{
	std::lock_guard<std::mutex> g(mu);
	return h && handles.count(h);
}

/* The allocation holding [p, p + n), if any (mu held). */
const alloc *find_range(const void *p, size_t n)
{
	uintptr_t a = (uintptr_t)p;
	auto it = allocs.upper_bound(a);
	if (it == allocs.begin())
		return NULL;
	--it;
	if (a - it->first > it->second.size || n > it->second.size - (a - it->first))
		return NULL;
	return &it->second;
}

/* A call the capture mode forbids while a capture is under way (cudaMalloc,
 * synchronous copies, device synchronisation): fails the call with
 * cudaErrorStreamCaptureUnsupported and invalidates the captures that
 * forbid it, as CUDA does. */
bool capture_forbids()
{
	std::lock_guard<std::mutex> g(mu);
	bool forbid = false;
	if (thread_mode == cudaStreamCaptureModeRelaxed || captures.empty())
		return false;
	for (capture *c : captures) {
		if (c->mode == cudaStreamCaptureModeGlobal ||
		    (c->mode == cudaStreamCaptureModeThreadLocal &&
		     c->owner == std::this_thread::get_id())) {
			c->invalidated = true;
			forbid = true;
		}
	}
	return forbid;
}

void report_launch_failure(cudaError_t e, const lp_emu_kernel *k, dim3 grid, dim3 block,
                           size_t smem, const char *msg)
{
	char name[256];
	lp_emu_kernel_name(k->fn, name, sizeof(name));
	fprintf(stderr, "lp-emu: kernel '%s' <<<(%u,%u,%u), (%u,%u,%u), %zu>>> failed: %s: %s\n",
	        name, grid.x, grid.y, grid.z, block.x, block.y, block.z, smem, cudaGetErrorName(e),
	        msg);
	last_error = e;
	pending_error = e;
}

cudaError_t run_kernel(const node &n)
{
	char msg[600];
	static const bool check_ptrs =
	    !getenv("LP_EMU_NO_PTR_CHECK") || strcmp(getenv("LP_EMU_NO_PTR_CHECK"), "0") == 0;

	if (check_ptrs) {
		for (int i = 0; i < n.k->n_args; i++) {
			const void *p = n.k->pointer_arg(i);
			if (p && !lp_emu_device_accessible(p)) {
				snprintf(msg, sizeof(msg),
				         "argument %d is %p, which is not device memory (not from "
				         "cudaMalloc or cudaMallocHost)",
				         i + 1, p);
				report_launch_failure(cudaErrorIllegalAddress, n.k, n.grid, n.block,
				                      n.smem, msg);
				return cudaErrorIllegalAddress;
			}
		}
	}
	lp_emu_ctr.launches++;
	cudaError_t e = lp_emu_run_grid(n.grid, n.block, n.smem, n.k, msg, sizeof(msg));
	if (e != cudaSuccess)
		report_launch_failure(e, n.k, n.grid, n.block, n.smem, msg);
	return e;
}

enum cudaMemcpyKind infer_kind(const void *dst, const void *src)
{
	std::lock_guard<std::mutex> g(mu);
	const alloc *d = find_range(dst, 1), *s = find_range(src, 1);
	bool dd = d && d->device, sd = s && s->device;
	return dd ? (sd ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
	          : (sd ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
}

/* Device sides of a copy must lie inside a device-accessible allocation. */
cudaError_t check_copy(const node &n)
{
	if (n.dir < cudaMemcpyHostToHost || n.dir > cudaMemcpyDefault)
		return cudaErrorInvalidMemcpyDirection;
	if (n.width > n.dpitch || n.width > n.spitch)
		return cudaErrorInvalidPitchValue;
	if (n.width == 0 || n.height == 0)
		return cudaSuccess;
	if (!n.dst || !n.src)
		return cudaErrorInvalidValue;
	enum cudaMemcpyKind dir = n.dir == cudaMemcpyDefault ? infer_kind(n.dst, n.src) : n.dir;
	size_t dspan = n.dpitch * (n.height - 1) + n.width;
	size_t sspan = n.spitch * (n.height - 1) + n.width;
	std::lock_guard<std::mutex> g(mu);
	if ((dir == cudaMemcpyHostToDevice || dir == cudaMemcpyDeviceToDevice) &&
	    !find_range(n.dst, dspan))
		return cudaErrorInvalidValue;
	if ((dir == cudaMemcpyDeviceToHost || dir == cudaMemcpyDeviceToDevice) &&
	    !find_range(n.src, sspan))
		return cudaErrorInvalidValue;
	return cudaSuccess;
}

cudaError_t run_copy(const node &n)
{
	cudaError_t e = check_copy(n);
	if (e != cudaSuccess || n.width == 0 || n.height == 0)
		return e;
	for (size_t r = 0; r < n.height; r++)
		memmove((char *)n.dst + r * n.dpitch, (const char *)n.src + r * n.spitch, n.width);
	uint64_t bytes = (uint64_t)n.width * n.height;
	switch (n.dir == cudaMemcpyDefault ? infer_kind(n.dst, n.src) : n.dir) {
	case cudaMemcpyHostToDevice:
		lp_emu_ctr.h2d_bytes += bytes;
		break;
	case cudaMemcpyDeviceToHost:
		lp_emu_ctr.d2h_bytes += bytes;
		break;
	case cudaMemcpyDeviceToDevice:
		lp_emu_ctr.d2d_bytes += bytes;
		break;
	default:
		break;
	}
	return cudaSuccess;
}

cudaError_t check_set(const node &n)
{
	if (n.width == 0)
		return cudaSuccess;
	std::lock_guard<std::mutex> g(mu);
	return find_range(n.dst, n.width) ? cudaSuccess : cudaErrorInvalidValue;
}

cudaError_t run_node(const node &n)
{
	cudaError_t e;
	switch (n.kind) {
	case NODE_KERNEL:
		return run_kernel(n);
	case NODE_COPY:
		return run_copy(n);
	case NODE_SET:
		if ((e = check_set(n)) != cudaSuccess)
			return e;
		memset(n.dst, n.value, n.width);
		lp_emu_ctr.memset_bytes += n.width;
		return cudaSuccess;
	case NODE_HOST:
		n.fn(n.user);
		return cudaSuccess;
	}
	return cudaErrorInvalidValue;
}

/* Runs n now, or records it when the stream captures. */
cudaError_t enqueue(CUstream_st *s, const node &n)
{
	if (s == &legacy_stream) {
		/* the legacy stream would wait for blocking streams that capture */
		std::lock_guard<std::mutex> g(mu);
		bool implicit = false;
		for (capture *c : captures)
			for (CUstream_st *o : c->streams)
				if (!(o->flags & cudaStreamNonBlocking)) {
					c->invalidated = true;
					implicit = true;
				}
		if (implicit)
			return cudaErrorStreamCaptureImplicit;
	}
	if (s->cap) {
		std::lock_guard<std::mutex> g(mu);
		if (s->cap->invalidated)
			return cudaErrorStreamCaptureInvalidated;
		s->cap->graph->add(n);
		if (s != s->cap->origin)
			s->unjoined = true;
		return cudaSuccess;
	}
	return run_node(n);
}

void invalidate(CUstream_st *s)
{
	std::lock_guard<std::mutex> g(mu);
	if (s->cap)
		s->cap->invalidated = true;
}

cudaError_t take_pending()
{
	int e = pending_error.exchange(cudaSuccess);
	return (cudaError_t)e;
}

node copy_node(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width,
               size_t height, enum cudaMemcpyKind kind)
{
	node n = {};
	n.kind = NODE_COPY;
	n.dst = dst;
	n.src = src;
	n.dpitch = dpitch;
	n.spitch = spitch;
	n.width = width;
	n.height = height;
	n.dir = kind;
	return n;
}

cudaError_t free_alloc(void *ptr, bool device)
{
	if (!ptr)
		return cudaSuccess;
	alloc a;
	{
		std::lock_guard<std::mutex> g(mu);
		auto it = allocs.find((uintptr_t)ptr);
		if (it == allocs.end() || it->second.device != device)
			return device ? cudaErrorInvalidDevicePointer : cudaErrorInvalidValue;
		a = it->second;
		allocs.erase(it);
		if (device)
			used_bytes -= (a.size + 255) & ~(size_t)255;
	}
	if (a.mapped)
		munmap(ptr, a.size);
	else
		free(ptr);
	return cudaSuccess;
}

cudaError_t new_alloc(void **ptr, size_t size, bool device)
{
	if (!ptr)
		return cudaErrorInvalidValue;
	*ptr = NULL;
	if (size == 0)
		return cudaSuccess;
	size_t rounded = (size + 255) & ~(size_t)255;
	if (device) {
		std::lock_guard<std::mutex> g(mu);
		if (rounded > total_memory() - used_bytes)
			return cudaErrorMemoryAllocation;
		used_bytes += rounded; /* reserved now, so that threads cannot overcommit */
	}
	void *p = NULL;
	bool mapped = size > POISON_MAX;
	if (mapped) {
		p = mmap(NULL, size, PROT_READ | PROT_WRITE,
		         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (p == MAP_FAILED)
			p = NULL;
	} else if (posix_memalign(&p, 256, size) == 0) {
		memset(p, 0xff, size);
	} else {
		p = NULL;
	}
	std::lock_guard<std::mutex> g(mu);
	if (!p) {
		if (device)
			used_bytes -= rounded;
		return cudaErrorMemoryAllocation;
	}
	allocs[(uintptr_t)p] = alloc{size, device, mapped};
	*ptr = p;
	return cudaSuccess;
}

} // namespace

bool lp_emu_device_accessible(const void *p)
{
	std::lock_guard<std::mutex> g(mu);
	return find_range(p, 0) != NULL;
}

/* ---- errors ---- */

extern "C" {

const char *cudaGetErrorName(cudaError_t e)
{
	switch (e) {
#define NAME(x)                                                                                    \
	case x:                                                                                    \
		return #x;
		NAME(cudaSuccess)
		NAME(cudaErrorInvalidValue)
		NAME(cudaErrorMemoryAllocation)
		NAME(cudaErrorInitializationError)
		NAME(cudaErrorInvalidConfiguration)
		NAME(cudaErrorInvalidPitchValue)
		NAME(cudaErrorInvalidSymbol)
		NAME(cudaErrorInvalidDevicePointer)
		NAME(cudaErrorInvalidMemcpyDirection)
		NAME(cudaErrorInvalidDeviceFunction)
		NAME(cudaErrorNoDevice)
		NAME(cudaErrorInvalidDevice)
		NAME(cudaErrorInvalidResourceHandle)
		NAME(cudaErrorIllegalState)
		NAME(cudaErrorNotReady)
		NAME(cudaErrorIllegalAddress)
		NAME(cudaErrorLaunchOutOfResources)
		NAME(cudaErrorAssert)
		NAME(cudaErrorLaunchFailure)
		NAME(cudaErrorNotPermitted)
		NAME(cudaErrorNotSupported)
		NAME(cudaErrorStreamCaptureUnsupported)
		NAME(cudaErrorStreamCaptureInvalidated)
		NAME(cudaErrorStreamCaptureMerge)
		NAME(cudaErrorStreamCaptureUnmatched)
		NAME(cudaErrorStreamCaptureUnjoined)
		NAME(cudaErrorStreamCaptureIsolation)
		NAME(cudaErrorStreamCaptureImplicit)
		NAME(cudaErrorCapturedEvent)
		NAME(cudaErrorStreamCaptureWrongThread)
		NAME(cudaErrorUnknown)
#undef NAME
	default:
		break;
	}
	return "cudaErrorUnknown";
}

const char *cudaGetErrorString(cudaError_t e)
{
	switch (e) {
	case cudaSuccess:
		return "no error";
	case cudaErrorInvalidValue:
		return "invalid argument";
	case cudaErrorMemoryAllocation:
		return "out of memory";
	case cudaErrorInitializationError:
		return "initialization error";
	case cudaErrorInvalidConfiguration:
		return "invalid configuration argument";
	case cudaErrorInvalidPitchValue:
		return "invalid pitch argument";
	case cudaErrorInvalidSymbol:
		return "invalid device symbol";
	case cudaErrorInvalidDevicePointer:
		return "invalid device pointer";
	case cudaErrorInvalidMemcpyDirection:
		return "invalid copy direction for memcpy";
	case cudaErrorInvalidDeviceFunction:
		return "invalid device function";
	case cudaErrorNoDevice:
		return "no CUDA-capable device is detected";
	case cudaErrorInvalidDevice:
		return "invalid device ordinal";
	case cudaErrorInvalidResourceHandle:
		return "invalid resource handle";
	case cudaErrorIllegalState:
		return "the operation cannot be performed in the present state";
	case cudaErrorNotReady:
		return "device not ready";
	case cudaErrorIllegalAddress:
		return "an illegal memory access was encountered";
	case cudaErrorLaunchOutOfResources:
		return "too many resources requested for launch";
	case cudaErrorAssert:
		return "device-side assert triggered";
	case cudaErrorLaunchFailure:
		return "unspecified launch failure";
	case cudaErrorNotPermitted:
		return "operation not permitted";
	case cudaErrorNotSupported:
		return "operation not supported";
	case cudaErrorStreamCaptureUnsupported:
		return "operation not permitted when stream is capturing";
	case cudaErrorStreamCaptureInvalidated:
		return "operation failed due to a previous error during capture";
	case cudaErrorStreamCaptureMerge:
		return "operation would result in a merge of separate capture sequences";
	case cudaErrorStreamCaptureUnmatched:
		return "capture was not ended in the same stream as it began";
	case cudaErrorStreamCaptureUnjoined:
		return "capturing stream has unjoined work";
	case cudaErrorStreamCaptureIsolation:
		return "dependency created on uncaptured work in another stream";
	case cudaErrorStreamCaptureImplicit:
		return "operation would make the legacy stream depend on a capturing blocking "
		       "stream";
	case cudaErrorCapturedEvent:
		return "operation not permitted on an event last recorded in a capturing stream";
	case cudaErrorStreamCaptureWrongThread:
		return "attempt to terminate a thread-local capture sequence from another thread";
	case cudaErrorUnknown:
		return "unknown error";
	default:
		break;
	}
	return "unrecognized error code";
}

cudaError_t cudaGetLastError(void)
{
	cudaError_t e = last_error;
	last_error = cudaSuccess;
	if (e == cudaSuccess)
		e = take_pending();
	else if (pending_error == e)
		pending_error = cudaSuccess;
	return e;
}

cudaError_t cudaPeekAtLastError(void)
{
	return last_error != cudaSuccess ? last_error : (cudaError_t)pending_error.load();
}

/* ---- device ---- */

cudaError_t cudaGetDeviceCount(int *count)
{
	if (!count)
		return ret(cudaErrorInvalidValue);
	*count = no_device() ? 0 : 1;
	return ret(*count ? cudaSuccess : cudaErrorNoDevice);
}

cudaError_t cudaSetDevice(int device)
{
	if (no_device())
		return ret(cudaErrorNoDevice);
	return ret(device == 0 ? cudaSuccess : cudaErrorInvalidDevice);
}

cudaError_t cudaGetDevice(int *device)
{
	if (!device)
		return ret(cudaErrorInvalidValue);
	*device = 0;
	return no_device() ? ret(cudaErrorNoDevice) : cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int device)
{
	if (!p)
		return ret(cudaErrorInvalidValue);
	if (no_device())
		return ret(cudaErrorNoDevice);
	if (device != 0)
		return ret(cudaErrorInvalidDevice);
	memset(p, 0, sizeof(*p));
	snprintf(p->name, sizeof(p->name), "loraplane CUDA emulation");
	p->totalGlobalMem = total_memory();
	p->sharedMemPerBlock = LP_EMU_SMEM_DEFAULT;
	p->sharedMemPerBlockOptin = LP_EMU_SMEM_OPTIN;
	p->sharedMemPerMultiprocessor = 228u << 10;
	p->reservedSharedMemPerBlock = 1024;
	p->regsPerBlock = 65536;
	p->regsPerMultiprocessor = 65536;
	p->warpSize = 32;
	p->memPitch = (size_t)2147483647;
	p->maxThreadsPerBlock = 1024;
	p->maxThreadsDim[0] = 1024;
	p->maxThreadsDim[1] = 1024;
	p->maxThreadsDim[2] = 64;
	p->maxGridSize[0] = 2147483647;
	p->maxGridSize[1] = 65535;
	p->maxGridSize[2] = 65535;
	p->totalConstMem = 65536;
	p->major = 9;
	p->minor = 0;
	p->multiProcessorCount = 8;
	p->canMapHostMemory = 1;
	p->concurrentKernels = 1;
	p->asyncEngineCount = 2;
	p->unifiedAddressing = 1;
	p->memoryBusWidth = 5120;
	p->l2CacheSize = 50 << 20;
	p->persistingL2CacheMaxSize = 0;
	p->maxThreadsPerMultiProcessor = 2048;
	p->maxBlocksPerMultiProcessor = 32;
	p->managedMemory = 0;
	p->memoryPoolsSupported = 1;
	return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int *value, enum cudaDeviceAttr attr, int device)
{
	struct cudaDeviceProp p;
	cudaError_t e;

	if (!value)
		return ret(cudaErrorInvalidValue);
	if ((e = cudaGetDeviceProperties(&p, device)) != cudaSuccess)
		return e;
	switch (attr) {
	case cudaDevAttrMaxThreadsPerBlock:
		*value = p.maxThreadsPerBlock;
		break;
	case cudaDevAttrMaxBlockDimX:
	case cudaDevAttrMaxBlockDimY:
	case cudaDevAttrMaxBlockDimZ:
		*value = p.maxThreadsDim[attr - cudaDevAttrMaxBlockDimX];
		break;
	case cudaDevAttrMaxGridDimX:
	case cudaDevAttrMaxGridDimY:
	case cudaDevAttrMaxGridDimZ:
		*value = p.maxGridSize[attr - cudaDevAttrMaxGridDimX];
		break;
	case cudaDevAttrMaxSharedMemoryPerBlock:
		*value = (int)p.sharedMemPerBlock;
		break;
	case cudaDevAttrTotalConstantMemory:
		*value = (int)p.totalConstMem;
		break;
	case cudaDevAttrWarpSize:
		*value = p.warpSize;
		break;
	case cudaDevAttrMaxRegistersPerBlock:
		*value = p.regsPerBlock;
		break;
	case cudaDevAttrClockRate:
		*value = 1755000; /* kHz */
		break;
	case cudaDevAttrMultiProcessorCount:
		*value = p.multiProcessorCount;
		break;
	case cudaDevAttrIntegrated:
		*value = 0;
		break;
	case cudaDevAttrConcurrentKernels:
		*value = 1;
		break;
	case cudaDevAttrMemoryClockRate:
		*value = 2619000; /* kHz */
		break;
	case cudaDevAttrGlobalMemoryBusWidth:
		*value = p.memoryBusWidth;
		break;
	case cudaDevAttrL2CacheSize:
		*value = p.l2CacheSize;
		break;
	case cudaDevAttrMaxThreadsPerMultiProcessor:
		*value = p.maxThreadsPerMultiProcessor;
		break;
	case cudaDevAttrAsyncEngineCount:
		*value = p.asyncEngineCount;
		break;
	case cudaDevAttrUnifiedAddressing:
		*value = 1;
		break;
	case cudaDevAttrComputeCapabilityMajor:
		*value = p.major;
		break;
	case cudaDevAttrComputeCapabilityMinor:
		*value = p.minor;
		break;
	case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
		*value = (int)p.sharedMemPerMultiprocessor;
		break;
	case cudaDevAttrMaxRegistersPerMultiprocessor:
		*value = p.regsPerMultiprocessor;
		break;
	case cudaDevAttrMaxSharedMemoryPerBlockOptin:
		*value = (int)p.sharedMemPerBlockOptin;
		break;
	case cudaDevAttrMaxBlocksPerMultiprocessor:
		*value = p.maxBlocksPerMultiProcessor;
		break;
	case cudaDevAttrMaxPersistingL2CacheSize:
		*value = p.persistingL2CacheMaxSize;
		break;
	case cudaDevAttrMemoryPoolsSupported:
		*value = 1;
		break;
	default:
		return ret(cudaErrorInvalidValue);
	}
	return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void)
{
	if (capture_forbids())
		return ret(cudaErrorStreamCaptureUnsupported);
	return ret(take_pending());
}

cudaError_t cudaDeviceReset(void)
{
	return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes)
{
	if (no_device())
		return ret(cudaErrorNoDevice);
	size_t total = total_memory();
	std::lock_guard<std::mutex> g(mu);
	if (free_bytes)
		*free_bytes = total > used_bytes ? total - used_bytes : 0;
	if (total_bytes)
		*total_bytes = total;
	return cudaSuccess;
}

/* ---- memory ---- */

cudaError_t cudaMalloc(void **ptr, size_t size)
{
	if (no_device())
		return ret(cudaErrorNoDevice);
	if (capture_forbids())
		return ret(cudaErrorStreamCaptureUnsupported);
	return ret(new_alloc(ptr, size, true));
}

cudaError_t cudaFree(void *ptr)
{
	if (capture_forbids())
		return ret(cudaErrorStreamCaptureUnsupported);
	return ret(free_alloc(ptr, true));
}

cudaError_t cudaMallocAsync(void **ptr, size_t size, cudaStream_t stream)
{
	CUstream_st *s = stream_of(stream);
	if (!s)
		return ret(cudaErrorInvalidResourceHandle);
	if (s->cap) {
		invalidate(s);
		return ret(cudaErrorNotSupported); /* no memory nodes in emulated graphs */
	}
	return ret(new_alloc(ptr, size, true));
}

cudaError_t cudaFreeAsync(void *ptr, cudaStream_t stream)
{
	CUstream_st *s = stream_of(stream);
	if (!s)
		return ret(cudaErrorInvalidResourceHandle);
	if (s->cap) {
		invalidate(s);
		return ret(cudaErrorNotSupported);
	}
	return ret(free_alloc(ptr, true));
}

cudaError_t cudaMallocHost(void **ptr, size_t size)
{
	if (capture_forbids())
		return ret(cudaErrorStreamCaptureUnsupported);
	return ret(new_alloc(ptr, size, false));
}

cudaError_t cudaHostAlloc(void **ptr, size_t size, unsigned int flags)
{
	if (flags &
	    ~(unsigned)(cudaHostAllocPortable | cudaHostAllocMapped | cudaHostAllocWriteCombined))
		return ret(cudaErrorInvalidValue);
	return cudaMallocHost(ptr, size);
}

cudaError_t cudaFreeHost(void *ptr)
{
	if (capture_forbids())
		return ret(cudaErrorStreamCaptureUnsupported);
	return ret(free_alloc(ptr, false));
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind)
{
	if (capture_forbids())
		return ret(cudaErrorStreamCaptureUnsupported);
	cudaError_t e = take_pending();
	if (e != cudaSuccess)
		return ret(e);
	return ret(enqueue(&legacy_stream, copy_node(dst, count, src, count, count, 1, kind)));
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind,
                            cudaStream_t stream)
{
	CUstream_st *s = stream_of(stream);
	if (!s)
		return ret(cudaErrorInvalidResourceHandle);
	node n = copy_node(dst, count, src, count, count, 1, kind);
	cudaError_t e = check_copy(n);
	if (e != cudaSuccess)
		return ret(e);
	return ret(enqueue(s, n));
}

cudaError_t cudaMemcpy2D(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width,
                         size_t height, enum cudaMemcpyKind kind)
{
	if (capture_forbids())
		return ret(cudaErrorStreamCaptureUnsupported);
	return ret(
	    enqueue(&legacy_stream, copy_node(dst, dpitch, src, spitch, width, height, kind)));
}

cudaError_t cudaMemcpy2DAsync(void *dst, size_t dpitch, const void *src, size_t spitch,
                              size_t width, size_t height, enum cudaMemcpyKind kind,
                              cudaStream_t stream)
{
	CUstream_st *s = stream_of(stream);
	if (!s)
		return ret(cudaErrorInvalidResourceHandle);
	node n = copy_node(dst, dpitch, src, spitch, width, height, kind);
	cudaError_t e = check_copy(n);
	if (e != cudaSuccess)
		return ret(e);
	return ret(enqueue(s, n));
}

cudaError_t cudaMemset(void *ptr, int value, size_t count)
{
	if (capture_forbids())
		return ret(cudaErrorStreamCaptureUnsupported);
	return cudaMemsetAsync(ptr, value, count, cudaStreamLegacy);
}

cudaError_t cudaMemsetAsync(void *ptr, int value, size_t count, cudaStream_t stream)
{
	CUstream_st *s = stream_of(stream);
	if (!s)
		return ret(cudaErrorInvalidResourceHandle);
	node n = {};
	n.kind = NODE_SET;
	n.dst = ptr;
	n.value = value;
	n.width = count;
	cudaError_t e = check_set(n);
	if (e != cudaSuccess)
		return ret(e);
	return ret(enqueue(s, n));
}

/* ---- streams ---- */

cudaError_t cudaStreamCreate(cudaStream_t *stream)
{
	return cudaStreamCreateWithFlags(stream, cudaStreamDefault);
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned int flags)
{
	if (!stream || (flags & ~(unsigned)cudaStreamNonBlocking))
		return ret(cudaErrorInvalidValue);
	if (no_device())
		return ret(cudaErrorNoDevice);
	CUstream_st *s = new CUstream_st();
	s->flags = flags;
	std::lock_guard<std::mutex> g(mu);
	handles.insert(s);
	*stream = s;
	return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream)
{
	if (stream == NULL || stream == cudaStreamLegacy || stream == cudaStreamPerThread)
		return ret(cudaErrorInvalidResourceHandle);
	std::lock_guard<std::mutex> g(mu);
	if (!handles.erase(stream))
		return ret(cudaErrorInvalidResourceHandle);
	if (stream->cap) {
		capture *c = stream->cap;
		c->invalidated = true;
		for (auto it = c->streams.begin(); it != c->streams.end(); ++it)
			if (*it == stream) {
				c->streams.erase(it);
				break;
			}
		if (c->origin == stream)
			c->origin = NULL;
	}
	delete stream;
	return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream)
{
	CUstream_st *s = stream_of(stream);
	if (!s)
		return ret(cudaErrorInvalidResourceHandle);
	if (s->cap) {
		invalidate(s);
		return ret(cudaErrorStreamCaptureUnsupported);
	}
	return ret(take_pending());
}

cudaError_t cudaStreamQuery(cudaStream_t stream)
{
	CUstream_st *s = stream_of(stream);
	if (!s)
		return ret(cudaErrorInvalidResourceHandle);
	if (s->cap) {
		invalidate(s);
		return ret(cudaErrorStreamCaptureUnsupported);
	}
	return cudaSuccess;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags)
{
	CUstream_st *s = stream_of(stream);
	if (!s || !live(event))
		return ret(cudaErrorInvalidResourceHandle);
	if (flags != 0)
		return ret(cudaErrorInvalidValue);
	std::lock_guard<std::mutex> g(mu);
	capture *c = event->cap;
	if (!c)
		return cudaSuccess; /* the event's work is done: work runs at enqueue */
	if (s->cap == c) {
		/* a join: the origin now depends on the fork's work so far */
		if (s == c->origin && event->where && event->where != s)
			event->where->unjoined = false;
		return cudaSuccess;
	}
	if (s->cap) {
		s->cap->invalidated = true;
		c->invalidated = true;
		return ret(cudaErrorStreamCaptureMerge);
	}
	/* a fork: s joins the capture */
	s->cap = c;
	s->unjoined = false;
	c->streams.push_back(s);
	return cudaSuccess;
}

cudaError_t cudaLaunchHostFunc(cudaStream_t stream, cudaHostFn_t fn, void *userData)
{
	CUstream_st *s = stream_of(stream);
	if (!s)
		return ret(cudaErrorInvalidResourceHandle);
	if (!fn)
		return ret(cudaErrorInvalidValue);
	node n = {};
	n.kind = NODE_HOST;
	n.fn = fn;
	n.user = userData;
	return ret(enqueue(s, n));
}

/* ---- events ---- */

cudaError_t cudaEventCreate(cudaEvent_t *event)
{
	return cudaEventCreateWithFlags(event, cudaEventDefault);
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned int flags)
{
	if (!event || (flags & ~(unsigned)(cudaEventBlockingSync | cudaEventDisableTiming | 0x4)))
		return ret(cudaErrorInvalidValue);
	CUevent_st *e = new CUevent_st();
	e->flags = flags;
	std::lock_guard<std::mutex> g(mu);
	handles.insert(e);
	events.insert(e);
	*event = e;
	return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream)
{
	CUstream_st *s = stream_of(stream);
	if (!s || !live(event))
		return ret(cudaErrorInvalidResourceHandle);
	std::lock_guard<std::mutex> g(mu);
	if (s->cap) {
		if (s->cap->invalidated)
			return ret(cudaErrorStreamCaptureInvalidated);
		event->cap = s->cap;
		event->where = s;
		return cudaSuccess;
	}
	event->cap = NULL;
	event->where = s;
	event->recorded = true;
	event->t = std::chrono::steady_clock::now();
	return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event)
{
	if (!live(event))
		return ret(cudaErrorInvalidResourceHandle);
	if (event->cap)
		return ret(cudaErrorCapturedEvent);
	return ret(take_pending());
}

cudaError_t cudaEventQuery(cudaEvent_t event)
{
	if (!live(event))
		return ret(cudaErrorInvalidResourceHandle);
	if (event->cap)
		return ret(cudaErrorCapturedEvent);
	return cudaSuccess;
}

cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end)
{
	if (!ms)
		return ret(cudaErrorInvalidValue);
	if (!live(start) || !live(end))
		return ret(cudaErrorInvalidResourceHandle);
	if ((start->flags | end->flags) & cudaEventDisableTiming)
		return ret(cudaErrorInvalidResourceHandle);
	if (start->cap || end->cap)
		return ret(cudaErrorCapturedEvent);
	if (!start->recorded || !end->recorded)
		return ret(cudaErrorInvalidResourceHandle);
	*ms = std::chrono::duration<float, std::milli>(end->t - start->t).count();
	return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t event)
{
	std::lock_guard<std::mutex> g(mu);
	if (!event || !handles.erase(event))
		return ret(cudaErrorInvalidResourceHandle);
	events.erase(event);
	delete event;
	return cudaSuccess;
}

/* ---- graphs ---- */

cudaError_t cudaStreamBeginCapture(cudaStream_t stream, enum cudaStreamCaptureMode mode)
{
	if (stream == NULL || stream == cudaStreamLegacy)
		return ret(cudaErrorStreamCaptureUnsupported);
	if (mode < cudaStreamCaptureModeGlobal || mode > cudaStreamCaptureModeRelaxed)
		return ret(cudaErrorInvalidValue);
	CUstream_st *s = stream_of(stream);
	if (!s)
		return ret(cudaErrorInvalidResourceHandle);
	std::lock_guard<std::mutex> g(mu);
	if (s->cap)
		return ret(cudaErrorIllegalState);
	capture *c = new capture();
	c->graph = new CUgraph_st();
	c->mode = mode;
	c->owner = std::this_thread::get_id();
	c->invalidated = false;
	c->origin = s;
	c->streams.push_back(s);
	captures.push_back(c);
	s->cap = c;
	s->unjoined = false;
	return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t *graph)
{
	CUstream_st *s = stream_of(stream);
	if (!s)
		return ret(cudaErrorInvalidResourceHandle);
	if (!graph)
		return ret(cudaErrorInvalidValue);
	std::lock_guard<std::mutex> g(mu);
	capture *c = s->cap;
	if (!c)
		return ret(cudaErrorIllegalState);
	if (c->origin != s)
		return ret(cudaErrorStreamCaptureUnmatched);
	if (c->mode != cudaStreamCaptureModeRelaxed && c->owner != std::this_thread::get_id())
		return ret(cudaErrorStreamCaptureWrongThread);
	bool unjoined = false;
	for (CUstream_st *o : c->streams) {
		unjoined |= o->unjoined;
		o->cap = NULL;
		o->unjoined = false;
	}
	for (auto it = captures.begin(); it != captures.end(); ++it)
		if (*it == c) {
			captures.erase(it);
			break;
		}
	/* an event last recorded in the capture is, outside it, unrecorded */
	for (CUevent_st *ev : events)
		if (ev->cap == c) {
			ev->cap = NULL;
			ev->where = NULL;
			ev->recorded = false;
		}
	cudaError_t e = c->invalidated ? cudaErrorStreamCaptureInvalidated
	                               : (unjoined ? cudaErrorStreamCaptureUnjoined : cudaSuccess);
	if (e == cudaSuccess) {
		*graph = c->graph;
		handles.insert(c->graph);
	} else {
		*graph = NULL;
		delete c->graph;
	}
	delete c;
	return ret(e);
}

cudaError_t cudaStreamIsCapturing(cudaStream_t stream, enum cudaStreamCaptureStatus *status)
{
	CUstream_st *s = stream_of(stream);
	if (!s)
		return ret(cudaErrorInvalidResourceHandle);
	if (!status)
		return ret(cudaErrorInvalidValue);
	std::lock_guard<std::mutex> g(mu);
	*status = !s->cap ? cudaStreamCaptureStatusNone
	                  : (s->cap->invalidated ? cudaStreamCaptureStatusInvalidated
	                                         : cudaStreamCaptureStatusActive);
	return cudaSuccess;
}

cudaError_t cudaThreadExchangeStreamCaptureMode(enum cudaStreamCaptureMode *mode)
{
	if (!mode || *mode < cudaStreamCaptureModeGlobal || *mode > cudaStreamCaptureModeRelaxed)
		return ret(cudaErrorInvalidValue);
	enum cudaStreamCaptureMode old = thread_mode;
	thread_mode = *mode;
	*mode = old;
	return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long flags)
{
	(void)flags;
	if (!exec || !live(graph))
		return ret(cudaErrorInvalidValue);
	CUgraphExec_st *x = new CUgraphExec_st();
	for (const node &n : graph->nodes)
		x->add(n);
	std::lock_guard<std::mutex> g(mu);
	handles.insert(x);
	*exec = x;
	return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream)
{
	CUstream_st *s = stream_of(stream);
	if (!s)
		return ret(cudaErrorInvalidResourceHandle);
	if (!live(exec))
		return ret(cudaErrorInvalidValue);
	lp_emu_ctr.graph_launches++;
	for (const node &n : exec->nodes) {
		cudaError_t e = enqueue(s, n);
		if (e != cudaSuccess)
			return ret(e);
	}
	return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec)
{
	{
		std::lock_guard<std::mutex> g(mu);
		if (!exec || !handles.erase(exec))
			return ret(cudaErrorInvalidValue);
	}
	delete exec;
	return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph)
{
	{
		std::lock_guard<std::mutex> g(mu);
		if (!graph || !handles.erase(graph))
			return ret(cudaErrorInvalidValue);
	}
	delete graph;
	return cudaSuccess;
}

cudaError_t cudaGraphGetNodes(cudaGraph_t graph, cudaGraphNode_t *nodes, size_t *numNodes)
{
	if (!live(graph) || !numNodes || nodes)
		return ret(cudaErrorInvalidValue);
	*numNodes = graph->nodes.size();
	return cudaSuccess;
}

/* ---- kernels ---- */

cudaError_t cudaFuncSetAttribute(const void *func, enum cudaFuncAttribute attr, int value)
{
	if (!func)
		return ret(cudaErrorInvalidDeviceFunction);
	switch (attr) {
	case cudaFuncAttributeMaxDynamicSharedMemorySize:
		if (value < 0 || (unsigned)value > LP_EMU_SMEM_OPTIN)
			return ret(cudaErrorInvalidValue);
		{
			std::lock_guard<std::mutex> g(mu);
			max_dyn_smem[func] = value;
		}
		return cudaSuccess;
	case cudaFuncAttributePreferredSharedMemoryCarveout:
		return value >= -1 && value <= 100 ? cudaSuccess : ret(cudaErrorInvalidValue);
	default:
		break;
	}
	return ret(cudaErrorInvalidValue);
}

cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes *attr, const void *func)
{
	if (!attr)
		return ret(cudaErrorInvalidValue);
	if (!func)
		return ret(cudaErrorInvalidDeviceFunction);
	memset(attr, 0, sizeof(*attr));
	attr->maxThreadsPerBlock = 1024;
	attr->numRegs = 32;
	attr->ptxVersion = 90;
	attr->binaryVersion = 90;
	std::lock_guard<std::mutex> g(mu);
	auto it = max_dyn_smem.find(func);
	attr->maxDynamicSharedSizeBytes =
	    it != max_dyn_smem.end() ? it->second : (int)LP_EMU_SMEM_DEFAULT;
	attr->preferredShmemCarveout = -1;
	return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int *numBlocks, const void *func,
                                                          int blockSize, size_t dynamicSMemSize)
{
	if (!numBlocks || blockSize <= 0 || blockSize > 1024)
		return ret(cudaErrorInvalidValue);
	if (!func)
		return ret(cudaErrorInvalidDeviceFunction);
	int warps = (blockSize + 31) / 32;
	int n = 64 / warps; /* 64 resident warps per SM */
	if (n > 32)
		n = 32;
	if (dynamicSMemSize) {
		int by_smem = (int)((228u << 10) / (dynamicSMemSize + 1024));
		if (by_smem < n)
			n = by_smem;
	}
	*numBlocks = n;
	return cudaSuccess;
}

} /* extern "C" */

void lp_emu_submit(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, lp_emu_kernel *k)
{
	cudaError_t e = cudaSuccess;
	CUstream_st *s = stream_of(stream);
	uint64_t threads = (uint64_t)block.x * block.y * block.z;

	if (!s) {
		e = cudaErrorInvalidResourceHandle;
	} else if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 ||
	           block.y > 1024 || block.z > 64 || threads > 1024 || grid.x == 0 || grid.y == 0 ||
	           grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
		e = cudaErrorInvalidConfiguration;
	} else if (smem > LP_EMU_SMEM_DEFAULT) {
		std::lock_guard<std::mutex> g(mu);
		auto it = max_dyn_smem.find(k->fn);
		if (it == max_dyn_smem.end() || smem > (size_t)it->second)
			e = cudaErrorInvalidValue;
	}
	if (e != cudaSuccess) {
		if (s)
			invalidate(s);
		ret(e);
		return;
	}
	node n = {};
	n.kind = NODE_KERNEL;
	n.grid = grid;
	n.block = block;
	n.smem = smem;
	n.k = k;
	e = enqueue(s, n);
	if (e != cudaSuccess)
		ret(e);
}

struct lp_emu_counters lp_emu_stats(void)
{
	struct lp_emu_counters c;
	c.launches = lp_emu_ctr.launches;
	c.blocks = lp_emu_ctr.blocks;
	c.threads = lp_emu_ctr.threads;
	c.switches = lp_emu_ctr.switches;
	c.graph_launches = lp_emu_ctr.graph_launches;
	c.h2d_bytes = lp_emu_ctr.h2d_bytes;
	c.d2h_bytes = lp_emu_ctr.d2h_bytes;
	c.d2d_bytes = lp_emu_ctr.d2d_bytes;
	c.memset_bytes = lp_emu_ctr.memset_bytes;
	return c;
}

void lp_emu_stats_reset(void)
{
	lp_emu_ctr.launches = 0;
	lp_emu_ctr.blocks = 0;
	lp_emu_ctr.threads = 0;
	lp_emu_ctr.switches = 0;
	lp_emu_ctr.graph_launches = 0;
	lp_emu_ctr.h2d_bytes = 0;
	lp_emu_ctr.d2h_bytes = 0;
	lp_emu_ctr.d2d_bytes = 0;
	lp_emu_ctr.memset_bytes = 0;
}
