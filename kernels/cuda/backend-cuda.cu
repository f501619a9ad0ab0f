/* The CUDA backend's ops table (struct lp_backend_ops of kernels/backend.h
 * over struct lp_cuda): device memory and transfers, the sticky status,
 * reserve(), and CUDA Graphs for decode steps. The op entries live in
 * their own files (ops.cuh); this file wraps each one so that a step can
 * be recorded, captured and replayed.
 *
 * Graphs (docs/cuda.md has the rule the engine follows). begin_step pads
 * a decode step's token count to a bucket; (bucket, lora on/off) is the
 * step's key. The first decode step of a key runs eagerly and its op
 * calls are recorded by value; end_step captures them into a CUDA Graph
 * (the calls are issued again on the capturing stream, so a capture that
 * fails costs nothing: the step already ran). A later step with the same
 * key enqueues nothing while its ops come: each call is compared with the
 * captured one, and end_step launches the graph. A call that differs, a
 * transfer after the step's first op, or a LoRA fill inside the step
 * makes the step run eagerly from its recorded calls and the key is never
 * captured again: correctness never depends on the engine keeping the
 * rule, only speed does. Prefill steps always run eagerly.
 *
 * The shared object exports lp_cuda_backend_open and
 * lp_cuda_backend_counters (kernels/cuda-loader.h); everything else is
 * hidden (-fvisibility=hidden). */
#include "kernels/cuda/ops.cuh"
#include "kernels/cuda-loader.h"

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef LP_CUDA_EMU
#define LP_CUDA_BACKEND_NAME "cuda-emu"
#else
#define LP_CUDA_BACKEND_NAME "cuda"
#endif
#define LP_EXPORT __attribute__((visibility("default")))

#define STAGING_BYTES ((size_t)64 << 20) /* pinned, for import_weight */
#define OPS_PER_LAYER 64                 /* op calls a step may make per layer */
#define MIB(x)        ((double)(x) / (1 << 20))

/* The op calls of a step, by value. Every field is 64 bits wide, so the
 * struct has no padding and memcmp over its first OP_CMP_BYTES compares
 * the arguments exactly; loose holds arguments a replay may differ in
 * (the LoRA segments of a decode step, which the op ignores then). */
enum step_op_kind {
	OP_NONE,
	OP_GET_ROWS,
	OP_RMSNORM,
	OP_MATMUL,
	OP_ADD_BIAS,
	OP_ADD,
	OP_SILU_MUL,
	OP_ROPE,
	OP_KV_STORE,
	OP_ATTENTION,
	OP_LORA,
	OP_SAMPLE,
	OP_GELU_MUL,
	OP_SCALE,
	OP_MASK_LOGITS,
	OP_COUNT
};

static const char *const op_names[OP_COUNT] = {
    "none",     "get_rows",  "rmsnorm", "matmul", "add_bias", "add",   "silu_mul",    "rope",
    "kv_store", "attention", "lora",    "sample", "gelu_mul", "scale", "mask_logits",
};

/* Bit i set: tensor argument i must be given. */
static const unsigned op_required[OP_COUNT] = {
    0, 0x3, 0x7, 0x7, 0x3, 0x3, 0x7, 0x3, 0xf, 0xf, 0x13, 0x1, 0x7, 0x1, 0x1,
};

struct op_tensor {
	uint64_t data;
	int64_t type, rows, cols;
};

struct step_op {
	int64_t kind;
	uint64_t present; /* bit i: t[i] was given */
	struct op_tensor t[5];
	int64_t i[9];  /* integers, and floats as their bits */
	uint64_t p[5]; /* device pointers */
	int64_t loose[2];
};
#define OP_CMP_BYTES offsetof(struct step_op, loose)

/* One key's graph. */
struct step_graph {
	cudaGraphExec_t exec; /* NULL until captured */
	struct step_op *ops;  /* the captured calls [n_ops] */
	int n_ops;
	uint64_t kernels;  /* kernels inside the graph */
	bool uncapturable; /* runs eagerly for good */
};

enum step_mode {
	STEP_NONE,   /* outside begin_step .. end_step: ops run eagerly */
	STEP_EAGER,  /* a step that is not captured */
	STEP_RECORD, /* first step of a key: eager, and recorded for capture */
	STEP_REPLAY, /* calls compared with the graph's; nothing enqueued */
};

struct cuda_backend {
	struct lp_cuda cu;     /* first: ctx is a struct lp_cuda for the op entries */
	void *staging;         /* pinned, STAGING_BYTES, allocated at the first import_weight */
	unsigned *host_bad;    /* pinned copy of *cu.bad */
	cudaEvent_t side_done; /* side stream's work before a graph step */
	bool graphs_on;        /* LORAPLANE_CUDA_GRAPHS=0 turns graphs off */
	double peak_bandwidth; /* bytes/s, 0 when the device does not say */

	int n_buckets;
	struct step_graph *graphs; /* [n_buckets * 2]: (bucket, lora) */
	struct step_op *log;       /* this step's calls [log_cap] */
	int log_cap, n_log;
	enum step_mode mode;
	struct step_graph *cur; /* this step's key while recording or replaying */
	bool in_step;
	struct lp_cuda_counters counters;
};

static struct cuda_backend *backend_of(void *ctx)
{
	return (struct cuda_backend *)ctx;
}

/* Buckets: 1, 2, 4, 8, then each power of two from 16 and the size half
 * way to the next (16, 24, 32, 48, 64, 96, ...), so that from 16 rows on
 * padding adds less than half of the step; max_tokens is the last. */
static int bucket_size(int i)
{
	int k;

	if (i < 4)
		return 1 << i;
	k = (i - 4) / 2 + 4;
	if (k > 29)
		return 1 << 30;
	return (i - 4) % 2 == 0 ? 1 << k : 3 << (k - 1);
}

/* The bucket of n tokens (1 <= n <= max_tokens) and its size. */
static int bucket_of(int n, int max_tokens, int *size)
{
	int i = 0;

	while (bucket_size(i) < n && bucket_size(i) < max_tokens)
		i++;
	*size = bucket_size(i) < max_tokens ? bucket_size(i) : max_tokens;
	return i;
}

static int bucket_count(int max_tokens)
{
	int size;

	return bucket_of(max_tokens, max_tokens, &size) + 1;
}

/* Recording an op call. */

static void op_init(struct step_op *op, enum step_op_kind kind)
{
	memset(op, 0, sizeof(*op));
	op->kind = kind;
}

static void op_tensor(struct step_op *op, int k, const struct lp_tensor *t)
{
	if (!t)
		return;
	op->present |= 1u << k;
	op->t[k].data = (uint64_t)(uintptr_t)t->data;
	op->t[k].type = t->type;
	op->t[k].rows = t->rows;
	op->t[k].cols = t->cols;
}

static struct lp_tensor *op_tensor_get(const struct step_op *op, int k, struct lp_tensor *tmp)
{
	if (!(op->present & (1u << k)))
		return NULL;
	tmp->data = (void *)(uintptr_t)op->t[k].data;
	tmp->type = (enum lp_dtype)op->t[k].type;
	tmp->rows = op->t[k].rows;
	tmp->cols = op->t[k].cols;
	return tmp;
}

static int64_t float_bits(float f)
{
	uint32_t u;

	memcpy(&u, &f, sizeof(u));
	return u;
}

static float bits_float(int64_t v)
{
	uint32_t u = (uint32_t)v;
	float f;

	memcpy(&f, &u, sizeof(f));
	return f;
}

#define PTR(x) ((uint64_t)(uintptr_t)(x))

/* Calls the op entry that op records. */
static void run_op(struct lp_cuda *cu, const struct step_op *op)
{
	struct lp_tensor t[5];
	const int64_t *i = op->i;
	const uint64_t *p = op->p;

#define T(k) op_tensor_get(op, k, &t[k])
	switch (op->kind) {
	case OP_GET_ROWS:
		lp_cuda_get_rows(cu, T(0), T(1), (const int32_t *)(uintptr_t)p[0], (int)i[0]);
		break;
	case OP_RMSNORM:
		lp_cuda_rmsnorm(cu, T(0), T(1), T(2), bits_float(i[0]));
		break;
	case OP_MATMUL:
		lp_cuda_matmul(cu, T(0), T(1), T(2), i[0] != 0);
		break;
	case OP_ADD_BIAS:
		lp_cuda_add_bias(cu, T(0), T(1));
		break;
	case OP_ADD:
		lp_cuda_add(cu, T(0), T(1));
		break;
	case OP_SILU_MUL:
		lp_cuda_silu_mul(cu, T(0), T(1), T(2));
		break;
	case OP_GELU_MUL:
		lp_cuda_gelu_mul(cu, T(0), T(1), T(2));
		break;
	case OP_SCALE:
		lp_cuda_scale(cu, T(0), bits_float(i[0]));
		break;
	case OP_ROPE:
		lp_cuda_rope(cu, T(0), (int)i[0], (int)i[1], (const int32_t *)(uintptr_t)p[0],
		             T(1));
		break;
	case OP_KV_STORE:
		lp_cuda_kv_store(cu, T(0), T(1), T(2), T(3), (const int32_t *)(uintptr_t)p[0]);
		break;
	case OP_ATTENTION: {
		struct lp_attention_args a;

		memset(&a, 0, sizeof(a));
		a.n_tokens = (int)i[0];
		a.n_heads = (int)i[1];
		a.n_kv_heads = (int)i[2];
		a.head_dim = (int)i[3];
		a.block_size = (int)i[4];
		a.max_blocks_per_seq = (int)i[5];
		a.max_context = (int)i[6];
		a.scale = bits_float(i[7]);
		a.window = (int)i[8];
		a.q = T(0);
		a.k_cache = T(1);
		a.v_cache = T(2);
		a.out = T(3);
		a.tok_seq = (const int32_t *)(uintptr_t)p[0];
		a.tok_pos = (const int32_t *)(uintptr_t)p[1];
		a.block_tables = (const int32_t *)(uintptr_t)p[2];
		lp_cuda_attention(cu, &a);
		break;
	}
	case OP_LORA: {
		struct lp_lora_args a;

		memset(&a, 0, sizeof(a));
		a.layer = (int)i[0];
		a.group = (enum lp_lora_group)i[1];
		a.decode = i[3] != 0;
		a.x = T(0);
		for (int k = 0; k < LP_LORA_MAX_OUTS; k++)
			a.out[k] = T(1 + k);
		a.tmp = T(4);
		a.n_segs = (int)op->loose[0];
		a.segs = (const struct lp_lora_seg *)(uintptr_t)op->loose[1];
		a.tok_slot = (const int32_t *)(uintptr_t)p[1];
		lp_cuda_lora(cu, &a);
		break;
	}
	case OP_SAMPLE: {
		struct lp_sample_args a;

		memset(&a, 0, sizeof(a));
		a.logits = T(0);
		a.n = (int)i[0];
		a.max_logprobs = (int)i[1];
		a.pen = (const struct lp_sample_penalty *)(uintptr_t)i[2];
		a.rows = (const struct lp_sample_row *)(uintptr_t)p[0];
		a.tokens = (int32_t *)(uintptr_t)p[1];
		a.logprob = (float *)(uintptr_t)p[2];
		a.top_ids = (int32_t *)(uintptr_t)p[3];
		a.top_logprobs = (float *)(uintptr_t)p[4];
		lp_cuda_sample(cu, &a);
		break;
	}
	case OP_MASK_LOGITS: {
		struct lp_mask_args a;

		memset(&a, 0, sizeof(a));
		a.logits = T(0);
		a.n = (int)i[0];
		a.n_masks = (int)i[1];
		a.words = (int)i[2];
		a.mask = (const uint32_t *)(uintptr_t)p[0];
		a.row_mask = (const int32_t *)(uintptr_t)p[1];
		lp_cuda_mask_logits(cu, &a);
		break;
	}
	default:
		break;
	}
#undef T
}

/* Steps and graphs. */

static void graph_drop(struct step_graph *g)
{
	if (g->exec)
		cudaGraphExecDestroy(g->exec); /* freed once a launch in flight ends */
	free(g->ops);
	g->exec = NULL;
	g->ops = NULL;
	g->n_ops = 0;
}

/* The key of the step being recorded will not be captured: why says why. */
static void record_give_up(struct cuda_backend *b, const char *why)
{
	b->cur->uncapturable = true;
	b->counters.capture_failures++;
	snprintf(b->counters.capture_error, sizeof(b->counters.capture_error), "%s", why);
	b->mode = STEP_EAGER;
}

/* A replayed step turned out not to match its graph: the calls held back
 * so far run now, the rest of the step runs eagerly, and the key's graph
 * goes. */
static void replay_abandon(struct cuda_backend *b, const char *why)
{
	b->mode = STEP_EAGER;
	for (int k = 0; k < b->n_log; k++)
		run_op(&b->cu, &b->log[k]);
	graph_drop(b->cur);
	b->counters.graphs--;
	b->cur->uncapturable = true;
	b->counters.mismatches++;
	snprintf(b->counters.capture_error, sizeof(b->counters.capture_error), "%s", why);
}

/* A call that is not an op inside a recorded or replayed step: a graph
 * cannot hold it, so the step runs eagerly. Before the step's first op a
 * transfer is harmless (the graph runs after it either way: this is where
 * the engine uploads metadata built for the padded row count); a LoRA
 * fill is not, as a replayed graph would not wait for it. */
static void step_break(struct cuda_backend *b, const char *what, bool before_ops_ok)
{
	char why[128];

	if (b->mode != STEP_RECORD && b->mode != STEP_REPLAY)
		return;
	if (before_ops_ok && b->n_log == 0)
		return;
	snprintf(why, sizeof(why), "%s inside a decode step", what);
	if (b->mode == STEP_RECORD)
		record_give_up(b, why);
	else
		replay_abandon(b, why);
}

static void step_submit(void *ctx, const struct step_op *op)
{
	struct cuda_backend *b = backend_of(ctx);
	struct lp_cuda *cu = &b->cu;
	unsigned need = op_required[op->kind];

	if (lp_cuda_failed(cu))
		return;
	if ((op->present & need) != need) {
		lp_cuda_fail(cu, -EINVAL, "%s: a tensor argument is NULL", op_names[op->kind]);
		return;
	}
	switch (b->mode) {
	case STEP_RECORD:
		if (b->n_log < b->log_cap)
			b->log[b->n_log++] = *op;
		else
			record_give_up(b, "a decode step made more op calls than the log holds");
		break;
	case STEP_REPLAY:
		if (b->n_log < b->cur->n_ops && !memcmp(op, &b->cur->ops[b->n_log], OP_CMP_BYTES)) {
			b->log[b->n_log++] = *op;
			return;
		}
		{
			char why[128];

			snprintf(why, sizeof(why), "call %d (%s) differs from the captured step",
			         b->n_log, op_names[op->kind]);
			replay_abandon(b, why);
		}
		break;
	default:
		break;
	}
	run_op(cu, op);
}

/* Captures the recorded calls of the step that just ran into the key's
 * graph. The step's results are already computed: whatever fails here
 * only leaves the key uncaptured, and the sticky status as it was. */
static void graph_capture(struct cuda_backend *b)
{
	struct lp_cuda *cu = &b->cu;
	struct step_graph *g = b->cur;
	uint64_t launches = cu->launches;
	cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
	cudaGraph_t graph = NULL;
	cudaGraphExec_t exec = NULL;
	struct step_op *ops = NULL;
	char why[160];
	cudaError_t e;

	if (b->n_log == 0) {
		record_give_up(b, "a decode step without ops");
		return;
	}
	ops = (struct step_op *)malloc((size_t)b->n_log * sizeof(*ops));
	if (!ops) {
		record_give_up(b, "out of host memory for a graph");
		return;
	}
	e = cudaStreamBeginCapture(cu->stream, cudaStreamCaptureModeThreadLocal);
	if (e != cudaSuccess) {
		snprintf(why, sizeof(why), "cudaStreamBeginCapture: %s", cudaGetErrorName(e));
		goto fail;
	}
	for (int k = 0; k < b->n_log; k++)
		run_op(cu, &b->log[k]);
	e = cudaStreamEndCapture(cu->stream, &graph);
	if (cu->status) {
		snprintf(why, sizeof(why), "%.150s", cu->status_msg);
		goto fail;
	}
	if (e != cudaSuccess) {
		snprintf(why, sizeof(why), "cudaStreamEndCapture: %s", cudaGetErrorName(e));
		goto fail;
	}
	e = cudaGraphInstantiate(&exec, graph, 0);
	if (e != cudaSuccess) {
		snprintf(why, sizeof(why), "cudaGraphInstantiate: %s", cudaGetErrorName(e));
		goto fail;
	}
	cudaGraphDestroy(graph);
	memcpy(ops, b->log, (size_t)b->n_log * sizeof(*ops));
	g->exec = exec;
	g->ops = ops;
	g->n_ops = b->n_log;
	g->kernels = cu->launches - launches;
	cu->launches = launches;
	b->counters.captures++;
	b->counters.graphs++;
	return;

fail:
	if (cudaStreamIsCapturing(cu->stream, &cs) == cudaSuccess &&
	    cs != cudaStreamCaptureStatusNone) {
		cudaGraph_t partial = NULL;

		if (cudaStreamEndCapture(cu->stream, &partial) == cudaSuccess && partial)
			cudaGraphDestroy(partial);
	}
	if (graph)
		cudaGraphDestroy(graph);
	(void)cudaGetLastError();
	cu->status = 0;
	cu->status_msg[0] = '\0';
	cu->launches = launches;
	free(ops);
	record_give_up(b, why);
}

static int cuda_begin_step(void *ctx, const struct lp_step_shape *shape)
{
	struct cuda_backend *b = backend_of(ctx);
	struct lp_cuda *cu = &b->cu;
	struct step_graph *g;
	int n = shape->n_tokens, size, i;

	/* a step that never ended ends here, eagerly */
	step_break(b, "begin_step", false);
	b->in_step = true;
	b->mode = STEP_EAGER;
	b->n_log = 0;
	b->cur = NULL;
	if (!shape->decode || !cu->reserved || n <= 0) {
		b->counters.eager_steps++;
		return n;
	}
	if (n > cu->lim.max_tokens) {
		lp_cuda_fail(cu, -EINVAL, "begin_step: %d tokens, more than max_tokens %d", n,
		             cu->lim.max_tokens);
		return n;
	}
	i = bucket_of(n, cu->lim.max_tokens, &size);
	g = &b->graphs[i * 2 + (shape->lora ? 1 : 0)];
	if (!b->graphs_on || g->uncapturable || lp_cuda_failed(cu)) {
		b->counters.eager_steps++;
		return size;
	}
	/* LoRA slots filled on the side stream before this step are complete
	 * before any of its ops run: a graph holds no waits of its own on
	 * those fills (an op skips them while the stream captures) */
	if (!LP_CUDA_CHECK(cu, cudaEventRecord(b->side_done, cu->side)) ||
	    !LP_CUDA_CHECK(cu, cudaStreamWaitEvent(cu->stream, b->side_done, 0)))
		return size;
	b->cur = g;
	b->mode = g->exec ? STEP_REPLAY : STEP_RECORD;
	if (b->mode == STEP_RECORD)
		b->counters.eager_steps++;
	return size;
}

static void cuda_end_step(void *ctx)
{
	struct cuda_backend *b = backend_of(ctx);
	struct lp_cuda *cu = &b->cu;

	if (!b->in_step)
		return;
	if (b->mode == STEP_RECORD && !lp_cuda_failed(cu)) {
		graph_capture(b);
	} else if (b->mode == STEP_REPLAY) {
		if (b->n_log != b->cur->n_ops) {
			char why[128];

			snprintf(why, sizeof(why), "a step of %d calls, its graph has %d", b->n_log,
			         b->cur->n_ops);
			replay_abandon(b, why);
		} else if (!lp_cuda_failed(cu) &&
		           LP_CUDA_CHECK(cu, cudaGraphLaunch(b->cur->exec, cu->stream))) {
			b->counters.graph_launches++;
			b->counters.graph_kernels += b->cur->kernels;
		}
	}
	b->in_step = false;
	b->mode = STEP_NONE;
	b->cur = NULL;
	b->n_log = 0;
}

/* The ops: each records its call and hands it to step_submit. */

static void cuda_get_rows(void *ctx, struct lp_tensor *out, const struct lp_tensor *table,
                          const int32_t *ids, int n)
{
	struct step_op op;

	op_init(&op, OP_GET_ROWS);
	op_tensor(&op, 0, out);
	op_tensor(&op, 1, table);
	op.p[0] = PTR(ids);
	op.i[0] = n;
	step_submit(ctx, &op);
}

static void cuda_rmsnorm(void *ctx, struct lp_tensor *out, const struct lp_tensor *x,
                         const struct lp_tensor *w, float eps)
{
	struct step_op op;

	op_init(&op, OP_RMSNORM);
	op_tensor(&op, 0, out);
	op_tensor(&op, 1, x);
	op_tensor(&op, 2, w);
	op.i[0] = float_bits(eps);
	step_submit(ctx, &op);
}

static void cuda_matmul(void *ctx, struct lp_tensor *out, const struct lp_tensor *x,
                        const struct lp_tensor *w, bool accumulate)
{
	struct step_op op;

	op_init(&op, OP_MATMUL);
	op_tensor(&op, 0, out);
	op_tensor(&op, 1, x);
	op_tensor(&op, 2, w);
	op.i[0] = accumulate;
	step_submit(ctx, &op);
}

static void cuda_add_bias(void *ctx, struct lp_tensor *x, const struct lp_tensor *bias)
{
	struct step_op op;

	op_init(&op, OP_ADD_BIAS);
	op_tensor(&op, 0, x);
	op_tensor(&op, 1, bias);
	step_submit(ctx, &op);
}

static void cuda_add(void *ctx, struct lp_tensor *y, const struct lp_tensor *x)
{
	struct step_op op;

	op_init(&op, OP_ADD);
	op_tensor(&op, 0, y);
	op_tensor(&op, 1, x);
	step_submit(ctx, &op);
}

static void cuda_silu_mul(void *ctx, struct lp_tensor *out, const struct lp_tensor *gate,
                          const struct lp_tensor *up)
{
	struct step_op op;

	op_init(&op, OP_SILU_MUL);
	op_tensor(&op, 0, out);
	op_tensor(&op, 1, gate);
	op_tensor(&op, 2, up);
	step_submit(ctx, &op);
}

static void cuda_gelu_mul(void *ctx, struct lp_tensor *out, const struct lp_tensor *gate,
                          const struct lp_tensor *up)
{
	struct step_op op;

	op_init(&op, OP_GELU_MUL);
	op_tensor(&op, 0, out);
	op_tensor(&op, 1, gate);
	op_tensor(&op, 2, up);
	step_submit(ctx, &op);
}

static void cuda_scale(void *ctx, struct lp_tensor *x, float s)
{
	struct step_op op;

	op_init(&op, OP_SCALE);
	op_tensor(&op, 0, x);
	op.i[0] = float_bits(s);
	step_submit(ctx, &op);
}

static void cuda_rope(void *ctx, struct lp_tensor *x, int n_heads, int head_dim, const int32_t *pos,
                      const struct lp_tensor *cos_sin)
{
	struct step_op op;

	op_init(&op, OP_ROPE);
	op_tensor(&op, 0, x);
	op_tensor(&op, 1, cos_sin);
	op.i[0] = n_heads;
	op.i[1] = head_dim;
	op.p[0] = PTR(pos);
	step_submit(ctx, &op);
}

static void cuda_kv_store(void *ctx, struct lp_tensor *k_cache, struct lp_tensor *v_cache,
                          const struct lp_tensor *k, const struct lp_tensor *v,
                          const int32_t *slots)
{
	struct step_op op;

	op_init(&op, OP_KV_STORE);
	op_tensor(&op, 0, k_cache);
	op_tensor(&op, 1, v_cache);
	op_tensor(&op, 2, k);
	op_tensor(&op, 3, v);
	op.p[0] = PTR(slots);
	step_submit(ctx, &op);
}

static void cuda_attention(void *ctx, const struct lp_attention_args *a)
{
	struct step_op op;

	op_init(&op, OP_ATTENTION);
	op_tensor(&op, 0, a->q);
	op_tensor(&op, 1, a->k_cache);
	op_tensor(&op, 2, a->v_cache);
	op_tensor(&op, 3, a->out);
	op.i[0] = a->n_tokens;
	op.i[1] = a->n_heads;
	op.i[2] = a->n_kv_heads;
	op.i[3] = a->head_dim;
	op.i[4] = a->block_size;
	op.i[5] = a->max_blocks_per_seq;
	op.i[6] = a->max_context;
	op.i[7] = float_bits(a->scale);
	op.i[8] = a->window;
	op.p[0] = PTR(a->tok_seq);
	op.p[1] = PTR(a->tok_pos);
	op.p[2] = PTR(a->block_tables);
	step_submit(ctx, &op);
}

static void cuda_lora(void *ctx, const struct lp_lora_args *a)
{
	struct step_op op;

	op_init(&op, OP_LORA);
	op_tensor(&op, 0, a->x);
	for (int k = 0; k < LP_LORA_MAX_OUTS; k++)
		op_tensor(&op, 1 + k, a->out[k]);
	op_tensor(&op, 4, a->tmp);
	op.i[0] = a->layer;
	op.i[1] = a->group;
	op.i[3] = a->decode;
	op.p[1] = PTR(a->tok_slot);
	/* decode: the op reads tok_slot only, so the segments (whose count
	 * follows the batch) do not tell steps apart */
	if (!a->decode) {
		op.i[2] = a->n_segs;
		op.p[0] = PTR(a->segs);
	}
	op.loose[0] = a->n_segs;
	op.loose[1] = (int64_t)PTR(a->segs);
	step_submit(ctx, &op);
}

static void cuda_sample(void *ctx, const struct lp_sample_args *a)
{
	struct step_op op;

	op_init(&op, OP_SAMPLE);
	op_tensor(&op, 0, a->logits);
	op.i[0] = a->n;
	op.i[1] = a->max_logprobs;
	/* NULL or not from step to step: compared on replay like the counts */
	op.i[2] = (int64_t)PTR(a->pen);
	op.p[0] = PTR(a->rows);
	op.p[1] = PTR(a->tokens);
	op.p[2] = PTR(a->logprob);
	op.p[3] = PTR(a->top_ids);
	op.p[4] = PTR(a->top_logprobs);
	step_submit(ctx, &op);
}

static void cuda_mask_logits(void *ctx, const struct lp_mask_args *a)
{
	struct step_op op;

	op_init(&op, OP_MASK_LOGITS);
	op_tensor(&op, 0, a->logits);
	op.i[0] = a->n;
	op.i[1] = a->n_masks;
	op.i[2] = a->words;
	op.p[0] = PTR(a->mask);
	op.p[1] = PTR(a->row_mask);
	step_submit(ctx, &op);
}

/* Status. */

static const struct {
	unsigned bit;
	const char *msg;
} bad_msgs[] = {
    {LP_CUDA_BAD_ID, "get_rows: an id read from device memory is outside the table"},
    {LP_CUDA_BAD_POS, "rope: a position read from device memory is outside the cos/sin table"},
    {LP_CUDA_BAD_SLOT, "kv_store: a cache slot read from device memory is outside the cache"},
    {LP_CUDA_BAD_BLOCK, "attention: a block id in the block tables is outside the cache"},
    {LP_CUDA_BAD_LORA_SLOT, "lora: a slot read from device memory is outside the reserved slots"},
    {LP_CUDA_BAD_SAMPLE, "sample: a row's sampling parameters are invalid"},
    {LP_CUDA_BAD_MASK, "mask_logits: a mask row read from device memory is outside the mask"},
};

/* Waits for the stream, reading the device's bad word on the way, and
 * turns a set bit into the sticky status. */
static void sync_stream(struct cuda_backend *b)
{
	struct lp_cuda *cu = &b->cu;
	bool read_bad = false;

	if (!lp_cuda_failed(cu))
		read_bad = LP_CUDA_CHECK(cu, cudaMemcpyAsync(b->host_bad, cu->bad, sizeof(unsigned),
		                                             cudaMemcpyDeviceToHost, cu->stream));
	if (!LP_CUDA_CHECK(cu, cudaStreamSynchronize(cu->stream)) || !read_bad || !*b->host_bad)
		return;
	for (size_t k = 0; k < sizeof(bad_msgs) / sizeof(bad_msgs[0]); k++)
		if (*b->host_bad & bad_msgs[k].bit) {
			lp_cuda_fail(cu, -EIO, "%s", bad_msgs[k].msg);
			return;
		}
	lp_cuda_fail(cu, -EIO, "a kernel reported an unknown check (0x%x)", *b->host_bad);
}

static int failed_err(struct lp_cuda *cu, struct lp_err *err)
{
	return lp_errf(err, cu->status, "cuda backend: %s", cu->status_msg);
}

static int cuda_status(void *ctx, struct lp_err *err)
{
	struct cuda_backend *b = backend_of(ctx);

	step_break(b, "status", true);
	sync_stream(b);
	return b->cu.status ? failed_err(&b->cu, err) : 0;
}

static void cuda_synchronize(void *ctx)
{
	struct cuda_backend *b = backend_of(ctx);

	step_break(b, "synchronize", true);
	sync_stream(b);
}

/* Memory. */

static int device_alloc(struct cuda_backend *b, size_t size, void **p, struct lp_err *err)
{
	size_t free_bytes = 0, total = 0;
	cudaError_t e;

	*p = NULL;
	e = cudaMalloc(p, size ? size : 1);
	if (e == cudaSuccess)
		return 0;
	*p = NULL;
	(void)cudaGetLastError(); /* a failed allocation leaves the context usable */
	cudaMemGetInfo(&free_bytes, &total);
	(void)cudaGetLastError();
	if (e == cudaErrorMemoryAllocation)
		return lp_errf(
		    err, -ENOMEM,
		    "cuda device %d: out of memory allocating %.1f MiB (%.1f MiB free of "
		    "%.1f MiB)",
		    b->cu.device, MIB(size), MIB(free_bytes), MIB(total));
	return lp_errf(err, -EIO, "cuda device %d: cudaMalloc of %zu bytes: %s (%s)", b->cu.device,
	               size, cudaGetErrorName(e), cudaGetErrorString(e));
}

static int cuda_alloc(void *ctx, size_t size, struct lp_buffer *out, struct lp_err *err)
{
	struct cuda_backend *b = backend_of(ctx);
	struct lp_cuda *cu = &b->cu;
	void *p;
	int rc;

	memset(out, 0, sizeof(*out));
	step_break(b, "alloc", true);
	if (lp_cuda_failed(cu))
		return failed_err(cu, err);
	if ((rc = device_alloc(b, size, &p, err)))
		return rc;
	/* on the stream, so that ops queued after this see zeros */
	if (!LP_CUDA_CHECK(cu, cudaMemsetAsync(p, 0, size ? size : 1, cu->stream))) {
		cudaFree(p);
		return failed_err(cu, err);
	}
	out->data = p;
	out->size = size;
	out->owned = true;
	return 0;
}

static int cuda_import(void *ctx, const void *host, size_t size, struct lp_buffer *out,
                       struct lp_err *err)
{
	struct cuda_backend *b = backend_of(ctx);
	struct lp_cuda *cu = &b->cu;
	void *p;
	int rc;

	memset(out, 0, sizeof(*out));
	step_break(b, "import", true);
	if (lp_cuda_failed(cu))
		return failed_err(cu, err);
	if (!host && size > 0)
		return lp_errf(err, -EINVAL, "cuda: cannot import a null host pointer");
	if ((rc = device_alloc(b, size, &p, err)))
		return rc;
	/* complete before returning: the caller may free host afterwards */
	if ((size > 0 && !LP_CUDA_CHECK(cu, cudaMemcpyAsync(p, host, size, cudaMemcpyHostToDevice,
	                                                    cu->stream))) ||
	    !LP_CUDA_CHECK(cu, cudaStreamSynchronize(cu->stream))) {
		cudaFree(p);
		return failed_err(cu, err);
	}
	out->data = p;
	out->size = size;
	out->owned = true;
	return 0;
}

static int cuda_import_weight(void *ctx, const void *host, enum lp_dtype type, int64_t rows,
                              int64_t cols, struct lp_tensor *out, struct lp_buffer *buf,
                              struct lp_err *err)
{
	struct cuda_backend *b = backend_of(ctx);
	struct lp_cuda *cu = &b->cu;
	enum lp_dtype dst;
	size_t row_bytes;
	void *p;
	int rc;

	memset(out, 0, sizeof(*out));
	memset(buf, 0, sizeof(*buf));
	step_break(b, "import_weight", true);
	if (lp_cuda_failed(cu))
		return failed_err(cu, err);
	if ((int)type < 0 || type >= LP_DTYPE_COUNT || type == LP_DTYPE_I32)
		return lp_errf(err, -EINVAL, "cuda: cannot import weights of type %d", (int)type);
	if (!host || rows <= 0 || cols <= 0 || !lp_dtype_row_bytes(type, cols))
		return lp_errf(err, -EINVAL, "cuda: cannot import a %lld x %lld %s weight",
		               (long long)rows, (long long)cols, lp_dtype_name(type));
	dst = lp_cuda_weight_type(type);
	row_bytes = lp_dtype_row_bytes(dst, cols);
	if (!row_bytes || (size_t)rows > SIZE_MAX / row_bytes)
		return lp_errf(err, -EINVAL, "cuda: a %lld x %lld weight is too large",
		               (long long)rows, (long long)cols);
	if (!b->staging) {
		cudaError_t e = cudaMallocHost(&b->staging, STAGING_BYTES);

		if (e != cudaSuccess) {
			b->staging = NULL;
			(void)cudaGetLastError();
			return lp_errf(
			    err, -ENOMEM,
			    "cuda: cannot pin %.0f MiB of host memory for weight uploads: %s",
			    MIB(STAGING_BYTES), cudaGetErrorString(e));
		}
	}
	if ((rc = device_alloc(b, (size_t)rows * row_bytes, &p, err)))
		return rc;
	rc = lp_cuda_convert_weight(cu, p, host, type, rows, cols, b->staging, STAGING_BYTES, err);
	if (rc) {
		cudaFree(p);
		return rc;
	}
	out->data = p;
	out->type = dst;
	out->rows = rows;
	out->cols = cols;
	buf->data = p;
	buf->size = (size_t)rows * row_bytes;
	buf->owned = true;
	return 0;
}

static void cuda_free(void *ctx, struct lp_buffer *buf)
{
	struct cuda_backend *b = backend_of(ctx);

	step_break(b, "free", true);
	if (buf->owned && buf->data)
		LP_CUDA_CHECK(&b->cu, cudaFree(buf->data));
}

static int cuda_host_alloc(void *ctx, size_t size, void **out, struct lp_err *err)
{
	cudaError_t e = cudaMallocHost(out, size ? size : 1);

	if (e == cudaSuccess)
		return 0;
	*out = NULL;
	(void)cudaGetLastError();
	return lp_errf(err, -ENOMEM, "cuda: cannot pin %.1f MiB of host memory: %s", MIB(size),
	               cudaGetErrorString(e));
}

static void cuda_host_free(void *ctx, void *p)
{
	if (p)
		cudaFreeHost(p);
}

static void cuda_upload(void *ctx, void *dst, const void *src, size_t n)
{
	struct cuda_backend *b = backend_of(ctx);
	struct lp_cuda *cu = &b->cu;

	step_break(b, "upload", true);
	if (lp_cuda_failed(cu) || n == 0)
		return;
	if (LP_CUDA_CHECK(cu, cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, cu->stream)))
		cu->upload_bytes += n;
}

/* After a failure nothing is copied: check status() before using dst. */
static void cuda_download(void *ctx, void *dst, const void *src, size_t n)
{
	struct cuda_backend *b = backend_of(ctx);
	struct lp_cuda *cu = &b->cu;

	step_break(b, "download", true);
	if (!lp_cuda_failed(cu) && n > 0)
		LP_CUDA_CHECK(cu, cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, cu->stream));
	sync_stream(b);
}

static int cuda_lora_fill(void *ctx, int slot, const struct lp_lora_weights *w, struct lp_err *err)
{
	step_break(backend_of(ctx), "lora_fill", false);
	return lp_cuda_lora_fill(ctx, slot, w, err);
}

static void cuda_lora_clear(void *ctx, int slot)
{
	step_break(backend_of(ctx), "lora_clear", false);
	lp_cuda_lora_clear(ctx, slot);
}

/* Info and reserve. */

static void cuda_info(void *ctx, struct lp_backend_info *out)
{
	struct cuda_backend *b = backend_of(ctx);
	struct lp_cuda *cu = &b->cu;
	size_t free_bytes = 0, total = 0;

	memset(out, 0, sizeof(*out));
	snprintf(out->name, sizeof(out->name), "%s", LP_CUDA_BACKEND_NAME);
	snprintf(out->device, sizeof(out->device), "%.96s (sm_%d%d, device %d)", cu->name,
	         cu->cc_major, cu->cc_minor, cu->device);
	if (cudaMemGetInfo(&free_bytes, &total) != cudaSuccess) {
		(void)cudaGetLastError();
		total = cu->total_bytes;
		free_bytes = 0;
	}
	out->total_bytes = total;
	out->free_bytes = free_bytes;
	out->kv_type = LP_DTYPE_F16;
	out->lora_type = LP_DTYPE_F16;
	out->weight_types = 1u << LP_DTYPE_F16 | 1u << LP_DTYPE_BF16;
	out->host_memory = false;
	out->token_buckets = b->n_buckets ? b->n_buckets : bucket_count(1 << 16);
	out->peak_bandwidth = b->peak_bandwidth;
	out->launches = cu->launches + b->counters.graph_kernels;
	out->upload_bytes = cu->upload_bytes;
	out->graph_replays = b->counters.graph_launches;
}

/* Undoes reserve (whatever part of it was done). */
static void release_reserved(struct cuda_backend *b)
{
	struct lp_cuda *cu = &b->cu;

	if (b->graphs)
		for (int k = 0; k < b->n_buckets * 2; k++)
			graph_drop(&b->graphs[k]);
	free(b->graphs);
	free(b->log);
	b->graphs = NULL;
	b->log = NULL;
	b->n_buckets = 0;
	b->log_cap = 0;
	b->counters.graphs = 0;
	cu->graphs = NULL;
	if (cu->lora)
		lp_cuda_lora_release(cu);
	if (cu->matmul)
		lp_cuda_matmul_release(cu);
	for (int k = 0; k < LP_CUDA_WS_COUNT; k++) {
		if (cu->ws[k])
			cudaFree(cu->ws[k]);
		cu->ws[k] = NULL;
		cu->ws_bytes[k] = 0;
	}
	cu->reserved = false;
}

static int cuda_reserve(void *ctx, const struct lp_backend_limits *lim, size_t *bytes,
                        struct lp_err *err)
{
	static const char *const ws_names[LP_CUDA_WS_COUNT] = {"matmul", "attention", "sample"};
	struct cuda_backend *b = backend_of(ctx);
	struct lp_cuda *cu = &b->cu;
	size_t ws_total = 0, lora_bytes = 0, free_bytes = 0, total = 0;
	int rc;

	*bytes = 0;
	if (!lim) {
		/* the engine lets go: nothing of its may still be running */
		if (cu->reserved) {
			(void)cudaStreamSynchronize(cu->side);
			(void)cudaStreamSynchronize(cu->stream);
			release_reserved(b);
		}
		return 0;
	}
	if (cu->reserved)
		return lp_errf(err, -EBUSY,
		               "cuda: another engine holds this backend's reservation");
	if (lp_cuda_failed(cu))
		return failed_err(cu, err);
	if (lim->n_layers < 1 || lim->max_tokens < 1 || lim->max_seqs < 1 || lim->max_out < 0 ||
	    lim->max_loras < 0 || lim->max_lora_rank < 0 || lim->max_logprobs < 0)
		return lp_errf(err, -EINVAL,
		               "cuda: reserve: limits out of range (layers %d, "
		               "max_tokens %d, max_seqs %d)",
		               lim->n_layers, lim->max_tokens, lim->max_seqs);
	cu->lim = *lim;
	cu->ws_bytes[LP_CUDA_WS_MATMUL] = lp_cuda_matmul_workspace(lim);
	cu->ws_bytes[LP_CUDA_WS_ATTENTION] = lp_cuda_attention_workspace(lim);
	cu->ws_bytes[LP_CUDA_WS_SAMPLE] = lp_cuda_sample_workspace(lim);
	for (int k = 0; k < LP_CUDA_WS_COUNT; k++)
		ws_total += cu->ws_bytes[k];
	if (cudaMemGetInfo(&free_bytes, &total) == cudaSuccess && ws_total > free_bytes) {
		rc = lp_errf(err, -ENOMEM,
		             "cuda device %d: the workspaces need %.1f MiB (matmul %.1f, attention "
		             "%.1f, sample %.1f) and %.1f MiB of %.1f MiB are free",
		             cu->device, MIB(ws_total), MIB(cu->ws_bytes[LP_CUDA_WS_MATMUL]),
		             MIB(cu->ws_bytes[LP_CUDA_WS_ATTENTION]),
		             MIB(cu->ws_bytes[LP_CUDA_WS_SAMPLE]), MIB(free_bytes), MIB(total));
		goto out_release;
	}
	(void)cudaGetLastError();
	for (int k = 0; k < LP_CUDA_WS_COUNT; k++) {
		if (!cu->ws_bytes[k])
			continue;
		if ((rc = device_alloc(b, cu->ws_bytes[k], &cu->ws[k], err))) {
			lp_err_prefix(err, "cuda: the %s workspace", ws_names[k]);
			goto out_release;
		}
	}
	if ((rc = lp_cuda_matmul_init(cu, err)))
		goto out_release;
	if ((rc = lp_cuda_lora_reserve(cu, lim, &lora_bytes, err))) {
		if (rc == -ENOMEM && cudaMemGetInfo(&free_bytes, &total) == cudaSuccess)
			lp_err_prefix(err, "cuda device %d: lora slots (%.1f MiB free of %.1f MiB)",
			              cu->device, MIB(free_bytes), MIB(total));
		(void)cudaGetLastError();
		goto out_release;
	}
	b->n_buckets = bucket_count(lim->max_tokens);
	b->log_cap = lim->n_layers * OPS_PER_LAYER + 64;
	b->graphs = (struct step_graph *)calloc((size_t)b->n_buckets * 2, sizeof(*b->graphs));
	b->log = (struct step_op *)calloc((size_t)b->log_cap, sizeof(*b->log));
	if (!b->graphs || !b->log) {
		rc = lp_errf(err, -ENOMEM, "cuda: out of host memory for the graph tables");
		goto out_release;
	}
	cu->graphs = b->graphs;
	cu->reserved = true;
	*bytes = ws_total + lora_bytes;
	return 0;

out_release:
	release_reserved(b);
	return rc;
}

/* Open and close. */

static void cuda_destroy(void *ctx)
{
	struct cuda_backend *b = backend_of(ctx);
	struct lp_cuda *cu;

	if (!b)
		return;
	cu = &b->cu;
	if (cu->stream)
		cudaStreamSynchronize(cu->stream);
	if (cu->side)
		cudaStreamSynchronize(cu->side);
	release_reserved(b);
	if (b->staging)
		cudaFreeHost(b->staging);
	if (b->host_bad)
		cudaFreeHost(b->host_bad);
	if (cu->bad)
		cudaFree(cu->bad);
	if (b->side_done)
		cudaEventDestroy(b->side_done);
	lp_cuda_release(cu);
	(void)cudaGetLastError();
	free(b);
}

static const struct lp_backend_ops cuda_ops = {
    .name = LP_CUDA_BACKEND_NAME,
    .destroy = cuda_destroy,
    .info = cuda_info,
    .status = cuda_status,
    .reserve = cuda_reserve,
    .alloc = cuda_alloc,
    .import = cuda_import,
    .import_weight = cuda_import_weight,
    .free = cuda_free,
    .host_alloc = cuda_host_alloc,
    .host_free = cuda_host_free,
    .upload = cuda_upload,
    .download = cuda_download,
    .synchronize = cuda_synchronize,
    .lora_fill = cuda_lora_fill,
    .lora_clear = cuda_lora_clear,
    .begin_step = cuda_begin_step,
    .end_step = cuda_end_step,
    .get_rows = cuda_get_rows,
    .rmsnorm = cuda_rmsnorm,
    .matmul = cuda_matmul,
    .add_bias = cuda_add_bias,
    .add = cuda_add,
    .silu_mul = cuda_silu_mul,
    .gelu_mul = cuda_gelu_mul,
    .scale = cuda_scale,
    .rope = cuda_rope,
    .kv_store = cuda_kv_store,
    .attention = cuda_attention,
    .lora = cuda_lora,
    .sample = cuda_sample,
    .mask_logits = cuda_mask_logits,
};

/* The runtime's answer when CUDA does not initialise, as a user reads it. */
static int init_error(cudaError_t e, struct lp_err *err)
{
	const char *name = cudaGetErrorName(e), *what = cudaGetErrorString(e);

	switch (e) {
	case cudaErrorNoDevice:
		return lp_errf(err, -ENODEV, "no CUDA device: %s (%s)", name, what);
#ifndef LP_CUDA_EMU /* the emulation has a device, or none */
	case cudaErrorInsufficientDriver:
		return lp_errf(err, -ENODEV,
		               "no usable NVIDIA driver: %s (%s); the CUDA backend needs a driver "
		               "for CUDA %d.%d or newer",
		               name, what, CUDART_VERSION / 1000, CUDART_VERSION % 1000 / 10);
	case cudaErrorStubLibrary:
		return lp_errf(err, -ENODEV,
		               "no NVIDIA driver: the libcuda.so found is CUDA's stub (%s: %s)",
		               name, what);
#endif
	default:
		return lp_errf(err, -ENODEV, "CUDA does not initialise: %s (%s)", name, what);
	}
}

LP_EXPORT int lp_cuda_backend_open(int device, struct lp_backend **out, struct lp_err *err)
{
	struct lp_backend *be = NULL;
	struct cuda_backend *b = NULL;
	const char *graphs = getenv("LORAPLANE_CUDA_GRAPHS");
	cudaError_t e;
	int n = 0, rc;

	*out = NULL;
	if ((e = cudaGetDeviceCount(&n)) != cudaSuccess) {
		(void)cudaGetLastError();
		return init_error(e, err);
	}
	if (device < 0 || device >= n)
		return lp_errf(err, -ENODEV, "no CUDA device %d: this machine has %d (0..%d)",
		               device, n, n - 1);
	be = (struct lp_backend *)calloc(1, sizeof(*be));
	b = (struct cuda_backend *)calloc(1, sizeof(*b));
	if (!be || !b) {
		free(be);
		free(b);
		return lp_errf(err, -ENOMEM, "out of memory for the cuda backend");
	}
	if ((rc = lp_cuda_init(&b->cu, device, err))) {
		free(be);
		free(b);
		return rc;
	}
	if ((e = cudaMalloc((void **)&b->cu.bad, sizeof(unsigned))) != cudaSuccess ||
	    (e = cudaMemset(b->cu.bad, 0, sizeof(unsigned))) != cudaSuccess ||
	    (e = cudaMallocHost((void **)&b->host_bad, sizeof(unsigned))) != cudaSuccess ||
	    (e = cudaEventCreateWithFlags(&b->side_done, cudaEventDisableTiming)) != cudaSuccess ||
	    (e = cudaDeviceSynchronize()) != cudaSuccess) {
		rc = lp_errf(err, -ENODEV, "cuda device %d: %s (%s) while opening", device,
		             cudaGetErrorName(e), cudaGetErrorString(e));
		cuda_destroy(b);
		free(be);
		return rc;
	}
	b->graphs_on = !(graphs && !strcmp(graphs, "0"));
	{
		/* double data rate: two transfers per memory clock (kHz) */
		int khz = 0, bits = 0;

		if (cudaDeviceGetAttribute(&khz, cudaDevAttrMemoryClockRate, device) ==
		        cudaSuccess &&
		    cudaDeviceGetAttribute(&bits, cudaDevAttrGlobalMemoryBusWidth, device) ==
		        cudaSuccess)
			b->peak_bandwidth = 2.0 * khz * 1e3 * bits / 8;
		(void)cudaGetLastError();
	}
	be->ops = &cuda_ops;
	be->ctx = &b->cu;
	*out = be;
	return 0;
}

LP_EXPORT int lp_cuda_backend_counters(const struct lp_backend *be, struct lp_cuda_counters *out)
{
	const struct cuda_backend *b;

	if (!be || be->ops != &cuda_ops)
		return -ENOTSUP;
	b = backend_of(be->ctx);
	*out = b->counters;
	out->launches = b->cu.launches;
	out->upload_bytes = b->cu.upload_bytes;
	return 0;
}

int lp_backend_cuda_emu_new(struct lp_backend **out, struct lp_err *err)
{
	return lp_cuda_backend_open(0, out, err);
}
