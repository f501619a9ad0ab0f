/* The CPU backend: host memory, a persistent thread pool, and the ops of
 * backend.h run synchronously on the calling thread and the pool's workers
 * (the "stream" is program order, so synchronize has nothing to wait for).
 *
 * Kernels use AVX2 + FMA + F16C when the CPU has them and LP_CPU_NO_AVX2 is
 * not set to a non-empty value other than "0", portable C otherwise.
 *
 * Ops return nothing; failures go to the sticky status (backend.h): an
 * index read from "device" memory that would reach outside a buffer (a
 * get_rows id, a rope position, a kv_store slot, an attention block id, a
 * LoRA slot) is skipped, its output left zero, and recorded. Shape
 * mismatches are caller bugs and assert. */
#include "kernels/cpu/cpu.h"

#include <assert.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define LP_CPU_MAX_THREADS 512
#define LP_CPU_ALIGN       64

void lp_cpu_parallel(struct lp_cpu *cpu, int64_t work, int64_t units, lp_threadpool_fn fn,
                     void *arg)
{
	int64_t max_chunks = (int64_t)LP_CPU_CHUNKS_PER_THREAD * cpu->n_threads;

	if (work < LP_CPU_SERIAL_WORK || cpu->n_threads == 1 || units <= 1)
		fn(arg, 0, 1, 0);
	else
		lp_threadpool_run(cpu->pool, fn, arg,
		                  (int)(units < max_chunks ? units : max_chunks));
}

void lp_cpu_fail(struct lp_cpu *cpu, int code, const char *fmt, ...)
{
	int zero = 0;
	va_list ap;

	/* -EBUSY marks "being written" so that readers see the message whole */
	if (!atomic_compare_exchange_strong(&cpu->status, &zero, -EBUSY))
		return;
	va_start(ap, fmt);
	vsnprintf(cpu->status_msg, sizeof(cpu->status_msg), fmt, ap);
	va_end(ap);
	atomic_store(&cpu->status, code ? code : -EIO);
}

static int cpu_status(void *ctx, struct lp_err *err)
{
	struct lp_cpu *cpu = ctx;
	int st = atomic_load(&cpu->status);

	if (!st || st == -EBUSY) /* ops run on the caller's thread: never seen busy */
		return 0;
	return lp_errf(err, st, "cpu backend: %s", cpu->status_msg);
}

static size_t meminfo_bytes(const char *key)
{
	char line[256];
	size_t len = strlen(key), kb = 0;
	FILE *f = fopen("/proc/meminfo", "re");

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, key, len) && line[len] == ':') {
			kb = strtoull(line + len + 1, NULL, 10);
			break;
		}
	fclose(f);
	return kb * 1024;
}

static void cpu_info(void *ctx, struct lp_backend_info *out)
{
	struct lp_cpu *cpu = ctx;

	memset(out, 0, sizeof(*out));
	snprintf(out->name, sizeof(out->name), "cpu");
	snprintf(out->device, sizeof(out->device), "%d threads, %s", cpu->n_threads,
	         cpu->avx2 ? "AVX2 + FMA + F16C" : "portable C");
	out->total_bytes = meminfo_bytes("MemTotal");
	out->free_bytes = meminfo_bytes("MemAvailable");
	out->kv_type = LP_DTYPE_F32;
	out->lora_type = LP_DTYPE_F32;
	for (int t = 0; t < LP_DTYPE_COUNT; t++)
		if (t != LP_DTYPE_I32)
			out->weight_types |= 1u << t;
	out->host_memory = true;
	out->token_buckets = 0;
}

static int cpu_reserve(void *ctx, const struct lp_backend_limits *lim, size_t *bytes,
                       struct lp_err *err)
{
	struct lp_cpu *cpu = ctx;
	int rc;

	*bytes = 0;
	if (!lim) {
		lp_cpu_sample_release(cpu);
		free(cpu->slots);
		cpu->slots = NULL;
		cpu->n_slots = 0;
		return 0;
	}
	if (cpu->slots)
		return lp_errf(err, -EBUSY, "cpu backend: another engine holds its reservation");
	if (lim->max_loras < 0 || lim->max_loras > 1 << 16)
		return lp_errf(err, -EINVAL, "cpu backend: %d LoRA slots", lim->max_loras);
	cpu->slots = calloc((size_t)(lim->max_loras ? lim->max_loras : 1), sizeof(*cpu->slots));
	if (!cpu->slots)
		return lp_errf(err, -ENOMEM, "out of memory for %d LoRA slots", lim->max_loras);
	cpu->n_slots = lim->max_loras;
	rc = lp_cpu_sample_reserve(cpu, lim, err);
	if (rc)
		return rc;
	*bytes = (size_t)cpu->n_slots * sizeof(*cpu->slots);
	return 0;
}

static void cpu_destroy(void *ctx)
{
	struct lp_cpu *cpu = ctx;

	if (!cpu)
		return;
	lp_cpu_sample_release(cpu);
	free(cpu->slots);
	lp_threadpool_free(cpu->pool);
	free(cpu->scratch);
	free(cpu->scratch_mem);
	free(cpu);
}

static int cpu_alloc(void *ctx, size_t size, struct lp_buffer *out, struct lp_err *err)
{
	size_t padded = (size + LP_CPU_ALIGN - 1) / LP_CPU_ALIGN * LP_CPU_ALIGN;
	void *p;

	memset(out, 0, sizeof(*out));
	if (padded < size)
		return lp_errf(err, -ENOMEM, "buffer of %zu bytes is too large", size);
	if (padded == 0)
		padded = LP_CPU_ALIGN;
	p = aligned_alloc(LP_CPU_ALIGN, padded);
	if (!p)
		return lp_errf(err, -ENOMEM, "out of memory allocating %zu bytes", size);
	memset(p, 0, padded);
	out->data = p;
	out->size = size;
	out->owned = true;
	return 0;
}

static int cpu_import(void *ctx, const void *host, size_t size, struct lp_buffer *out,
                      struct lp_err *err)
{
	memset(out, 0, sizeof(*out));
	if (!host && size > 0)
		return lp_errf(err, -EINVAL, "cannot import a null host pointer");
	out->data = (void *)host;
	out->size = size;
	out->owned = false;
	return 0;
}

/* Weights stay in their file's format, aliased like import. */
static int cpu_import_weight(void *ctx, const void *host, enum lp_dtype type, int64_t rows,
                             int64_t cols, struct lp_tensor *out, struct lp_buffer *buf,
                             struct lp_err *err)
{
	size_t row = lp_dtype_row_bytes(type, cols);
	int rc;

	if (type >= LP_DTYPE_COUNT || type == LP_DTYPE_I32 || rows < 0 || !row)
		return lp_errf(err, -EINVAL, "cannot keep a [%lld, %lld] %s weight",
		               (long long)rows, (long long)cols, lp_dtype_name(type));
	rc = cpu_import(ctx, host, (size_t)rows * row, buf, err);
	if (rc)
		return rc;
	*out = (struct lp_tensor){buf->data, type, rows, cols};
	return 0;
}

static void cpu_free(void *ctx, struct lp_buffer *buf)
{
	if (buf->owned)
		free(buf->data);
}

static int cpu_host_alloc(void *ctx, size_t size, void **out, struct lp_err *err)
{
	size_t padded = (size + LP_CPU_ALIGN - 1) / LP_CPU_ALIGN * LP_CPU_ALIGN;

	*out = NULL;
	if (padded < size)
		return lp_errf(err, -ENOMEM, "host buffer of %zu bytes is too large", size);
	*out = aligned_alloc(LP_CPU_ALIGN, padded ? padded : LP_CPU_ALIGN);
	return *out ? 0 : lp_errf(err, -ENOMEM, "out of memory allocating %zu bytes", size);
}

static void cpu_host_free(void *ctx, void *p)
{
	free(p);
}

static int cpu_begin_step(void *ctx, const struct lp_step_shape *shape)
{
	return shape->n_tokens;
}

static void cpu_end_step(void *ctx)
{
}

static int cpu_lora_fill(void *ctx, int slot, const struct lp_lora_weights *w, struct lp_err *err)
{
	return lp_cpu_lora_fill(ctx, slot, w, err);
}

static void cpu_lora_clear(void *ctx, int slot)
{
	lp_cpu_lora_clear(ctx, slot);
}

static void cpu_copy(void *ctx, void *dst, const void *src, size_t n)
{
	if (n > 0 && dst != src)
		memmove(dst, src, n);
}

static void cpu_synchronize(void *ctx)
{
}

/* get_rows */

struct get_rows_task {
	struct lp_cpu *cpu;
	float *out;
	const struct lp_tensor *table;
	const int32_t *ids;
	int n;
};

static void get_rows_thread(void *arg, int chunk, int n_chunks, int thread)
{
	const struct get_rows_task *t = arg;
	int64_t cols = t->table->cols, i0, i1;
	size_t stride = lp_dtype_row_bytes(t->table->type, cols);

	lp_cpu_split(t->n, chunk, n_chunks, &i0, &i1);
	for (int64_t i = i0; i < i1; i++) {
		float *o = t->out + i * cols;
		int32_t id = t->ids[i];
		const char *src;

		if (id < 0 || id >= t->table->rows) {
			memset(o, 0, (size_t)cols * sizeof(float));
			lp_cpu_fail(t->cpu, -EIO,
			            "get_rows: id %d of row %lld is outside the table of %lld rows",
			            id, (long long)i, (long long)t->table->rows);
			continue;
		}
		src = (const char *)t->table->data + (size_t)id * stride;
#if LP_CPU_X86
		if (t->cpu->avx2) {
			lp_cpu_dequant_avx2(t->table->type, src, 0, cols, o);
			continue;
		}
#endif
		lp_dequantize_row(t->table->type, src, o, cols);
	}
}

static void cpu_get_rows(void *ctx, struct lp_tensor *out, const struct lp_tensor *table,
                         const int32_t *ids, int n)
{
	struct get_rows_task t = {ctx, out->data, table, ids, n};

	assert(out->type == LP_DTYPE_F32 && out->cols == table->cols && out->rows >= n);
	lp_cpu_parallel(ctx, (int64_t)n * table->cols, n, get_rows_thread, &t);
}

/* rmsnorm */

struct rows_task {
	bool avx2;
	float *out;
	const float *a, *b;
	int64_t rows, cols;
	float eps;
};

static void rmsnorm_thread(void *arg, int chunk, int n_chunks, int thread)
{
	const struct rows_task *t = arg;
	int64_t r0, r1;

	lp_cpu_split(t->rows, chunk, n_chunks, &r0, &r1);
	for (int64_t r = r0; r < r1; r++) {
		const float *x = t->a + r * t->cols;
		float *o = t->out + r * t->cols;
		double ss = 0.0;

		for (int64_t i = 0; i < t->cols; i++)
			ss += (double)x[i] * x[i];
		float inv = 1.0f / sqrtf((float)(ss / (double)t->cols) + t->eps);
		for (int64_t i = 0; i < t->cols; i++)
			o[i] = t->b[i] * (x[i] * inv);
	}
}

static void cpu_rmsnorm(void *ctx, struct lp_tensor *out, const struct lp_tensor *x,
                        const struct lp_tensor *w, float eps)
{
	struct rows_task t = {.out = out->data,
	                      .a = x->data,
	                      .b = w->data,
	                      .rows = x->rows,
	                      .cols = x->cols,
	                      .eps = eps};

	assert(out->rows == x->rows && out->cols == x->cols && w->cols == x->cols);
	assert(x->type == LP_DTYPE_F32 && w->type == LP_DTYPE_F32 && out->type == LP_DTYPE_F32);
	if (x->cols > 0)
		lp_cpu_parallel(ctx, x->rows * x->cols, x->rows, rmsnorm_thread, &t);
}

/* add, add_bias, silu_mul: element-wise over [rows, cols] */

static void add_bias_thread(void *arg, int chunk, int n_chunks, int thread)
{
	const struct rows_task *t = arg;
	int64_t r0, r1;

	lp_cpu_split(t->rows, chunk, n_chunks, &r0, &r1);
	for (int64_t r = r0; r < r1; r++) {
		float *y = t->out + r * t->cols;
		for (int64_t i = 0; i < t->cols; i++)
			y[i] += t->b[i];
	}
}

static void cpu_add_bias(void *ctx, struct lp_tensor *x, const struct lp_tensor *bias)
{
	struct rows_task t = {.out = x->data, .b = bias->data, .rows = x->rows, .cols = x->cols};

	assert(bias->cols == x->cols && x->type == LP_DTYPE_F32 && bias->type == LP_DTYPE_F32);
	lp_cpu_parallel(ctx, x->rows * x->cols, x->rows, add_bias_thread, &t);
}

static void add_thread(void *arg, int chunk, int n_chunks, int thread)
{
	const struct rows_task *t = arg;
	int64_t i0, i1;

	lp_cpu_split(t->rows * t->cols, chunk, n_chunks, &i0, &i1);
	for (int64_t i = i0; i < i1; i++)
		t->out[i] += t->a[i];
}

static void cpu_add(void *ctx, struct lp_tensor *y, const struct lp_tensor *x)
{
	struct rows_task t = {.out = y->data, .a = x->data, .rows = y->rows, .cols = y->cols};

	assert(y->rows == x->rows && y->cols == x->cols);
	assert(x->type == LP_DTYPE_F32 && y->type == LP_DTYPE_F32);
	lp_cpu_parallel(ctx, y->rows * y->cols, y->rows * y->cols / 1024, add_thread, &t);
}

static void silu_mul_thread(void *arg, int chunk, int n_chunks, int thread)
{
	const struct rows_task *t = arg;
	int64_t i0, i1;

	lp_cpu_split(t->rows * t->cols, chunk, n_chunks, &i0, &i1);
#if LP_CPU_X86
	if (t->avx2) {
		lp_cpu_silu_mul_avx2(t->out + i0, t->a + i0, t->b + i0, i1 - i0);
		return;
	}
#endif
	for (int64_t i = i0; i < i1; i++) {
		float g = t->a[i];
		t->out[i] = g / (1.0f + expf(-g)) * t->b[i];
	}
}

static void cpu_silu_mul(void *ctx, struct lp_tensor *out, const struct lp_tensor *gate,
                         const struct lp_tensor *up)
{
	struct rows_task t = {.avx2 = ((struct lp_cpu *)ctx)->avx2,
	                      .out = out->data,
	                      .a = gate->data,
	                      .b = up->data,
	                      .rows = gate->rows,
	                      .cols = gate->cols};

	assert(out->rows == gate->rows && out->cols == gate->cols);
	assert(up->rows == gate->rows && up->cols == gate->cols);
	lp_cpu_parallel(ctx, gate->rows * gate->cols, gate->rows * gate->cols / 1024,
	                silu_mul_thread, &t);
}

/* gelu_tanh(g) * u as PyTorch computes gelu(approximate="tanh") */
static float gelu_mul1(float g, float u)
{
	const float beta = 0.7978845608028654f; /* sqrt(2 / pi) */
	float inner = beta * (g + 0.044715f * g * g * g);

	return 0.5f * g * (1.0f + tanhf(inner)) * u;
}

static void gelu_mul_thread(void *arg, int chunk, int n_chunks, int thread)
{
	const struct rows_task *t = arg;
	int64_t i0, i1;

	lp_cpu_split(t->rows * t->cols, chunk, n_chunks, &i0, &i1);
	for (int64_t i = i0; i < i1; i++)
		t->out[i] = gelu_mul1(t->a[i], t->b[i]);
}

static void cpu_gelu_mul(void *ctx, struct lp_tensor *out, const struct lp_tensor *gate,
                         const struct lp_tensor *up)
{
	struct rows_task t = {.out = out->data,
	                      .a = gate->data,
	                      .b = up->data,
	                      .rows = gate->rows,
	                      .cols = gate->cols};

	assert(out->rows == gate->rows && out->cols == gate->cols);
	assert(up->rows == gate->rows && up->cols == gate->cols);
	assert(out->type == LP_DTYPE_F32 && gate->type == LP_DTYPE_F32 && up->type == LP_DTYPE_F32);
	lp_cpu_parallel(ctx, gate->rows * gate->cols, gate->rows * gate->cols / 256,
	                gelu_mul_thread, &t);
}

static void scale_thread(void *arg, int chunk, int n_chunks, int thread)
{
	const struct rows_task *t = arg;
	int64_t i0, i1;

	lp_cpu_split(t->rows * t->cols, chunk, n_chunks, &i0, &i1);
	for (int64_t i = i0; i < i1; i++)
		t->out[i] *= t->eps;
}

static void cpu_scale(void *ctx, struct lp_tensor *x, float s)
{
	struct rows_task t = {.out = x->data, .rows = x->rows, .cols = x->cols, .eps = s};

	assert(x->type == LP_DTYPE_F32);
	lp_cpu_parallel(ctx, x->rows * x->cols, x->rows * x->cols / 1024, scale_thread, &t);
}

/* rope */

struct rope_task {
	struct lp_cpu *cpu;
	float *x;
	int64_t rows, cols;
	int n_heads, head_dim;
	const int32_t *pos;
	const float *cos_sin; /* [n_pos, head_dim]: cos, then sin */
	int64_t n_pos;
};

static void rope_thread(void *arg, int chunk, int n_chunks, int thread)
{
	const struct rope_task *t = arg;
	int half = t->head_dim / 2;
	int64_t r0, r1;

	lp_cpu_split(t->rows, chunk, n_chunks, &r0, &r1);
	for (int64_t r = r0; r < r1; r++) {
		float *row = t->x + r * t->cols;
		int32_t p = t->pos[r];
		const float *cs;

		if (p < 0 || p >= t->n_pos) {
			lp_cpu_fail(t->cpu, -EIO,
			            "rope: position %d of row %lld is outside the table of %lld", p,
			            (long long)r, (long long)t->n_pos);
			continue;
		}
		cs = t->cos_sin + (int64_t)p * t->head_dim;
		for (int i = 0; i < half; i++) {
			float c = cs[i], s = cs[half + i];

			for (int h = 0; h < t->n_heads; h++) {
				float *v = row + (int64_t)h * t->head_dim;
				float x0 = v[i], x1 = v[i + half];

				v[i] = x0 * c - x1 * s;
				v[i + half] = x1 * c + x0 * s;
			}
		}
	}
}

static void cpu_rope(void *ctx, struct lp_tensor *x, int n_heads, int head_dim, const int32_t *pos,
                     const struct lp_tensor *cos_sin)
{
	struct rope_task t = {ctx,      x->data, x->rows,       x->cols,      n_heads,
	                      head_dim, pos,     cos_sin->data, cos_sin->rows};

	assert(x->type == LP_DTYPE_F32 && head_dim % 2 == 0);
	assert((int64_t)n_heads * head_dim <= x->cols && cos_sin->cols == head_dim);
	lp_cpu_parallel(ctx, x->rows * n_heads * head_dim, x->rows, rope_thread, &t);
}

/* kv_store */

struct kv_store_task {
	struct lp_cpu *cpu;
	struct lp_tensor *cache[2];
	const struct lp_tensor *src[2];
	const int32_t *slots;
};

static void store_row(bool avx2, enum lp_dtype t, void *dst, const float *src, int64_t n)
{
	if (t == LP_DTYPE_F32) {
		memcpy(dst, src, (size_t)n * sizeof(float));
		return;
	}
	if (t == LP_DTYPE_BF16) {
		for (int64_t i = 0; i < n; i++)
			((uint16_t *)dst)[i] = lp_f32_to_bf16(src[i]);
		return;
	}
#if LP_CPU_X86
	if (avx2) {
		lp_cpu_f32_to_f16_avx2(dst, src, n);
		return;
	}
#endif
	for (int64_t i = 0; i < n; i++)
		((uint16_t *)dst)[i] = lp_f32_to_f16(src[i]);
}

static void kv_store_thread(void *arg, int chunk, int n_chunks, int thread)
{
	const struct kv_store_task *t = arg;
	int64_t r0, r1;

	lp_cpu_split(t->src[0]->rows, chunk, n_chunks, &r0, &r1);
	for (int c = 0; c < 2; c++) {
		struct lp_tensor *cache = t->cache[c];
		const struct lp_tensor *src = t->src[c];
		size_t stride = lp_dtype_row_bytes(cache->type, cache->cols);

		for (int64_t r = r0; r < r1; r++) {
			int32_t slot = t->slots[r];

			if (slot == -1) /* padding */
				continue;
			if (slot < 0 || slot >= cache->rows) {
				lp_cpu_fail(t->cpu, -EIO,
				            "kv_store: slot %d of row %lld is outside the cache of "
				            "%lld rows",
				            slot, (long long)r, (long long)cache->rows);
				continue;
			}
			store_row(t->cpu->avx2, cache->type,
			          (char *)cache->data + (size_t)slot * stride,
			          (const float *)src->data + r * src->cols, src->cols);
		}
	}
}

static void cpu_kv_store(void *ctx, struct lp_tensor *k_cache, struct lp_tensor *v_cache,
                         const struct lp_tensor *k, const struct lp_tensor *v, const int32_t *slots)
{
	struct kv_store_task t = {ctx, {k_cache, v_cache}, {k, v}, slots};

	assert(k->cols == k_cache->cols && v->cols == v_cache->cols && k->rows == v->rows);
	assert(k_cache->type == LP_DTYPE_F32 || k_cache->type == LP_DTYPE_F16 ||
	       k_cache->type == LP_DTYPE_BF16);
	assert(v_cache->type == k_cache->type);
	assert(k->type == LP_DTYPE_F32 && v->type == LP_DTYPE_F32);
	lp_cpu_parallel(ctx, 2 * k->rows * k->cols, k->rows, kv_store_thread, &t);
}

static void cpu_attention(void *ctx, const struct lp_attention_args *args)
{
	lp_cpu_attention(ctx, args);
}

static void cpu_matmul(void *ctx, struct lp_tensor *out, const struct lp_tensor *x,
                       const struct lp_tensor *w, bool accumulate)
{
	lp_cpu_matmul(ctx, out, x, w, accumulate);
}

static void cpu_lora(void *ctx, const struct lp_lora_args *args)
{
	lp_cpu_lora(ctx, args);
}

static void cpu_sample(void *ctx, const struct lp_sample_args *args)
{
	lp_cpu_sample(ctx, args);
}

/* mask_logits */

struct mask_task {
	struct lp_cpu *cpu;
	const struct lp_mask_args *a;
};

static void mask_thread(void *arg, int chunk, int n_chunks, int thread)
{
	const struct mask_task *t = arg;
	const struct lp_mask_args *a = t->a;
	const int64_t vocab = a->logits->cols;
	int64_t r0, r1;

	lp_cpu_split(a->n, chunk, n_chunks, &r0, &r1);
	for (int64_t r = r0; r < r1; r++) {
		int32_t m = a->row_mask[r];
		float *row = (float *)a->logits->data + r * vocab;
		const uint32_t *bits;

		if (m == -1)
			continue;
		if (m < 0 || m >= a->n_masks) {
			lp_cpu_fail(t->cpu, -EIO,
			            "mask_logits: mask row %d of logits row %lld is outside the "
			            "%d mask rows",
			            m, (long long)r, a->n_masks);
			continue;
		}
		bits = a->mask + (int64_t)m * a->words;
		for (int64_t w = 0; w * 32 < vocab; w++) {
			uint32_t forbid = ~bits[w];
			int64_t base = w * 32;

			/* one bit at a time, lowest first: a word that allows
			 * everything costs one test */
			while (forbid) {
				int64_t c = base + __builtin_ctz(forbid);

				if (c >= vocab)
					break;
				row[c] = -INFINITY;
				forbid &= forbid - 1;
			}
		}
	}
}

static void cpu_mask_logits(void *ctx, const struct lp_mask_args *args)
{
	struct mask_task t = {ctx, args};
	const struct lp_tensor *lg = args->logits;

	assert(lg && lg->type == LP_DTYPE_F32);
	assert(args->n >= 0 && args->n <= lg->rows);
	assert(args->n_masks >= 0 && (int64_t)args->words * 32 >= lg->cols);
	if (args->n == 0)
		return;
	assert(args->row_mask && (args->mask || args->n_masks == 0));
	lp_cpu_parallel(ctx, (int64_t)args->n * lg->cols, args->n, mask_thread, &t);
}

static const struct lp_backend_ops cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .info = cpu_info,
    .status = cpu_status,
    .reserve = cpu_reserve,
    .alloc = cpu_alloc,
    .import = cpu_import,
    .import_weight = cpu_import_weight,
    .free = cpu_free,
    .host_alloc = cpu_host_alloc,
    .host_free = cpu_host_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .synchronize = cpu_synchronize,
    .lora_fill = cpu_lora_fill,
    .lora_clear = cpu_lora_clear,
    .begin_step = cpu_begin_step,
    .end_step = cpu_end_step,
    .get_rows = cpu_get_rows,
    .rmsnorm = cpu_rmsnorm,
    .matmul = cpu_matmul,
    .add_bias = cpu_add_bias,
    .add = cpu_add,
    .silu_mul = cpu_silu_mul,
    .gelu_mul = cpu_gelu_mul,
    .scale = cpu_scale,
    .rope = cpu_rope,
    .kv_store = cpu_kv_store,
    .attention = cpu_attention,
    .lora = cpu_lora,
    .sample = cpu_sample,
    .mask_logits = cpu_mask_logits,
};

bool lp_backend_cpu_uses_avx2(const struct lp_backend *be)
{
	return be->ops == &cpu_ops && ((const struct lp_cpu *)be->ctx)->avx2;
}

bool lp_backend_cpu_uses_avx512(const struct lp_backend *be)
{
	return be->ops == &cpu_ops && ((const struct lp_cpu *)be->ctx)->avx512;
}

static bool env_set(const char *name)
{
	const char *v = getenv(name);

	return v && v[0] && strcmp(v, "0") != 0;
}

/* Each weight type's matrix-vector crossover: the measured one, or
 * LP_CPU_MATVEC_BATCH from the environment for every type (measurements). */
static int read_matvec_batch(struct lp_cpu *cpu, struct lp_err *err)
{
	const char *v = getenv("LP_CPU_MATVEC_BATCH");
	long n = -1;
	char *end;

	if (v && v[0]) {
		errno = 0;
		n = strtol(v, &end, 10);
		if (errno || *end || n < 0 || n > LP_CPU_MATVEC_BATCH_MAX)
			return lp_errf(err, -EINVAL,
			               "LP_CPU_MATVEC_BATCH='%.32s' is not an integer in [0, %d]",
			               v, LP_CPU_MATVEC_BATCH_MAX);
	}
	for (int t = 0; t < LP_DTYPE_COUNT; t++) {
		int d = lp_cpu_matvec_batch_default((enum lp_dtype)t, cpu->avx512);
		cpu->matvec_batch[t] = n >= 0 ? (int)n : d;
	}
	return 0;
}

int lp_backend_cpu_new(struct lp_backend **out, int n_threads, struct lp_err *err)
{
	struct lp_backend *be = NULL;
	struct lp_cpu *cpu = NULL;
	size_t per_thread = LP_CPU_THREAD_SCRATCH;
	size_t total;
	int rc;

	*out = NULL;
	if (n_threads < 0 || n_threads > LP_CPU_MAX_THREADS)
		return lp_errf(err, -EINVAL, "thread count %d is outside 0..%d", n_threads,
		               LP_CPU_MAX_THREADS);
	if (n_threads == 0) {
		long n = sysconf(_SC_NPROCESSORS_ONLN);
		n_threads = n < 1 ? 1 : n > LP_CPU_MAX_THREADS ? LP_CPU_MAX_THREADS : (int)n;
	}
	be = calloc(1, sizeof(*be));
	cpu = calloc(1, sizeof(*cpu));
	if (!be || !cpu) {
		rc = lp_errf(err, -ENOMEM, "out of memory for the cpu backend");
		goto out_free;
	}
	cpu->n_threads = n_threads;
	cpu->avx2 = lp_cpu_has_avx2() && !env_set("LP_CPU_NO_AVX2");
	cpu->avx512 = cpu->avx2 && lp_cpu_has_avx512() && !env_set("LP_CPU_NO_AVX512");
	cpu->scratch = calloc((size_t)n_threads, sizeof(*cpu->scratch));
	rc = read_matvec_batch(cpu, err);
	if (rc)
		goto out_free;
	total = LP_CPU_XSUM_FLOATS + per_thread * n_threads;
	cpu->scratch_mem = aligned_alloc(LP_CPU_ALIGN, total * sizeof(float));
	if (!cpu->scratch || !cpu->scratch_mem) {
		rc = lp_errf(err, -ENOMEM, "out of memory for the cpu backend's scratch");
		goto out_free;
	}
	memset(cpu->scratch_mem, 0, total * sizeof(float));
	cpu->xsum = cpu->scratch_mem;
	for (int i = 0; i < n_threads; i++) {
		float *base = cpu->scratch_mem + LP_CPU_XSUM_FLOATS + per_thread * i;
		cpu->scratch[i].panel = base;
		cpu->scratch[i].rows = base + LP_CPU_KC * LP_CPU_NR;
		cpu->scratch[i].panel2 = cpu->scratch[i].rows + LP_CPU_ROWS_STRIDE * LP_CPU_NR;
	}
	rc = lp_threadpool_new(&cpu->pool, n_threads, err);
	if (rc)
		goto out_free;
	be->ops = &cpu_ops;
	be->ctx = cpu;
	*out = be;
	return 0;

out_free:
	cpu_destroy(cpu);
	free(be);
	return rc;
}
