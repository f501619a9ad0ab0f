/* LoRA adapters: format detection, the shared plan → lp_lora step (one
 * allocation, f32 conversion, finiteness, scale folding) and the checks
 * every format shares (dtype, shape, rank, base model name); see lora.h and
 * lora-internal.h. The format readers live in peft.c, trtllm.c and nemo.c. */
#include "agent/adapters/lora.h"

#include <errno.h>
#define PCRE2_CODE_UNIT_WIDTH 8
#include <ctype.h>
#include <math.h>
#include <pcre2.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "agent/adapters/lora-internal.h"
#include "common/file.h"
#include "kernels/backend.h"
#include "kernels/dtype.h"

static const char *const target_names[LP_LORA_N_TARGETS] = {
    [LP_LORA_Q] = "q_proj",       [LP_LORA_K] = "k_proj",       [LP_LORA_V] = "v_proj",
    [LP_LORA_O] = "o_proj",       [LP_LORA_GATE] = "gate_proj", [LP_LORA_UP] = "up_proj",
    [LP_LORA_DOWN] = "down_proj",
};

const char *lp_lora_target_name(enum lp_lora_target t)
{
	return (unsigned)t < LP_LORA_N_TARGETS ? target_names[t] : "invalid";
}

void lp_lora_target_dims(const struct lp_lora_shape *s, enum lp_lora_target t, int *in, int *out)
{
	switch (t) {
	case LP_LORA_Q:
		*in = s->dim, *out = s->q_dim;
		break;
	case LP_LORA_K:
	case LP_LORA_V:
		*in = s->dim, *out = s->kv_dim;
		break;
	case LP_LORA_O:
		*in = s->q_dim, *out = s->dim;
		break;
	case LP_LORA_GATE:
	case LP_LORA_UP:
		*in = s->dim, *out = s->ffn_dim;
		break;
	case LP_LORA_DOWN:
		*in = s->ffn_dim, *out = s->dim;
		break;
	default:
		*in = 0, *out = 0;
		break;
	}
}

void lp_lora_absent_add(struct lp_lora_absent *a, int layer, enum lp_lora_target t)
{
	a->n++;
	if (layer >= 0 && layer < LP_LORA_ABSENT_LAYERS && (unsigned)t < LP_LORA_N_TARGETS)
		a->layers[t][layer / 64] |= (uint64_t)1 << (layer % 64);
}

bool lp_lora_absent_has(const struct lp_lora_absent *a, int layer, enum lp_lora_target t)
{
	return layer >= 0 && layer < LP_LORA_ABSENT_LAYERS && (unsigned)t < LP_LORA_N_TARGETS &&
	       (a->layers[t][layer / 64] >> (layer % 64) & 1);
}

/* Appends to buf (len bytes used of cap); false once the text no longer
 * fits, then buf ends in "..." where room allows. */
static bool appendf(char *buf, size_t cap, size_t *len, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static bool appendf(char *buf, size_t cap, size_t *len, const char *fmt, ...)
{
	va_list ap;
	int w;

	va_start(ap, fmt);
	w = vsnprintf(buf + *len, cap - *len, fmt, ap);
	va_end(ap);
	if (w >= 0 && (size_t)w < cap - *len) {
		*len += (size_t)w;
		return true;
	}
	if (cap >= 4)
		memcpy(buf + cap - 4, "...", 4);
	*len = cap - 1;
	return false;
}

void lp_lora_absent_format(const struct lp_lora_absent *a, char *buf, size_t cap)
{
	size_t len = 0;
	bool any = false;

	if (!cap)
		return;
	buf[0] = '\0';
	for (int t = 0; t < LP_LORA_N_TARGETS; t++) {
		enum lp_lora_target tt = (enum lp_lora_target)t;
		int n = 0, runs = 0;

		for (int l = 0; l < LP_LORA_ABSENT_LAYERS; l++)
			n += lp_lora_absent_has(a, l, tt);
		if (!n)
			continue;
		if (!appendf(buf, cap, &len, "%s%s in layer%s", any ? "; " : "", target_names[t],
		             n > 1 ? "s" : ""))
			return;
		any = true;
		for (int l = 0; l < LP_LORA_ABSENT_LAYERS; l++) {
			int end = l;
			bool ok;

			if (!lp_lora_absent_has(a, l, tt))
				continue;
			while (end + 1 < LP_LORA_ABSENT_LAYERS &&
			       lp_lora_absent_has(a, end + 1, tt))
				end++;
			if (end > l)
				ok = appendf(buf, cap, &len, "%s %d-%d", runs ? "," : "", l, end);
			else
				ok = appendf(buf, cap, &len, "%s %d", runs ? "," : "", l);
			if (!ok)
				return;
			runs++;
			l = end;
		}
	}
}

static float from_half(uint16_t h, enum lp_dtype t)
{
	return t == LP_DTYPE_F16 ? lp_f16_to_f32(h) : lp_bf16_to_f32(h);
}

static float value_at(const void *w, size_t i, enum lp_dtype t)
{
	uint16_t h;

	if (t == LP_DTYPE_F32)
		return ((const float *)w)[i];
	memcpy(&h, (const uint16_t *)w + i, 2);
	return from_half(h, t);
}

float lp_lora_a_at(const struct lp_lora_pair *p, int in, int k, int i)
{
	return value_at(p->a, (size_t)k * (size_t)in + (size_t)i, p->a_type);
}

float lp_lora_b_at(const struct lp_lora_pair *p, int out, int k, int o)
{
	return value_at(p->b, lp_lora_b_index(p->rank, out, k, o), p->b_type);
}

/* Adapter weights are read whole once per step by every step that uses the
 * adapter: large ones go on huge pages where the kernel offers them, which
 * saves the TLB misses of a stream through many 4 KiB pages. */
#define HUGE_PAGE ((size_t)2 << 20)

static float *alloc_weights(size_t bytes)
{
	void *p;

	if (bytes < HUGE_PAGE)
		return malloc(bytes);
	bytes = (bytes + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
	if (posix_memalign(&p, HUGE_PAGE, bytes))
		return NULL;
#ifdef MADV_HUGEPAGE
	/* advice only: without huge pages the memory works the same */
	(void)madvise(p, bytes, MADV_HUGEPAGE);
#endif
	return p;
}

void lp_lora_free(struct lp_lora *l)
{
	if (!l)
		return;
	free(l->pairs);
	free(l->stacks);
	free(l->data);
	free(l->base_model);
	free(l);
}

int lora_plan_init(struct lora_plan *p, int n_layers, struct lp_err *err)
{
	p->n_layers = n_layers;
	memset(&p->absent, 0, sizeof(p->absent));
	p->pairs = calloc((size_t)n_layers * LP_LORA_N_TARGETS, sizeof(*p->pairs));
	if (!p->pairs)
		return lp_errf(err, -ENOMEM, "out of memory for %d layers of lora pairs", n_layers);
	return 0;
}

void lora_plan_release(struct lora_plan *p)
{
	free(p->pairs);
	p->pairs = NULL;
}

int lora_check_float(const struct lp_fmt_tensor *t, struct lp_err *err)
{
	if (t->type == LP_FMT_F32 || t->type == LP_FMT_F16 || t->type == LP_FMT_BF16)
		return 0;
	return lp_errf(err, -EINVAL, "'%s' has dtype %s; lora weights must be F32, F16 or BF16",
	               t->name, lp_fmt_type_name(t->type));
}

static void format_shape(char *buf, size_t cap, const int64_t *shape, int n)
{
	size_t len = 0;
	int w;

	buf[0] = '\0';
	w = snprintf(buf, cap, "[");
	len = w > 0 ? (size_t)w : 0;
	for (int i = 0; i < n && len < cap; i++) {
		w = snprintf(buf + len, cap - len, "%s%lld", i ? ", " : "", (long long)shape[i]);
		if (w < 0)
			return;
		len += (size_t)w;
	}
	if (len < cap)
		snprintf(buf + len, cap - len, "]");
}

int lora_check_shape(const struct lp_fmt_tensor *t, int64_t rows, int64_t cols, struct lp_err *err)
{
	char have[128], need[64];
	int64_t want[2] = {rows, cols};

	if (t->n_dims == 2 && t->shape[0] == rows && t->shape[1] == cols)
		return 0;
	format_shape(have, sizeof(have), t->shape, t->n_dims);
	format_shape(need, sizeof(need), want, 2);
	return lp_errf(err, -EINVAL, "'%s' has shape %s, the base model needs %s", t->name, have,
	               need);
}

/* Element size of the three float dtypes. */
static size_t float_size(enum lp_fmt_type dt)
{
	return dt == LP_FMT_F32 ? 4 : 2;
}

/* dst[i] = src[i] * scale for n values of dtype dt. */
static void convert(float *dst, const void *src, enum lp_fmt_type dt, size_t n, float scale)
{
	const unsigned char *p = src;

	if (dt == LP_FMT_F32) {
		memcpy(dst, src, n * sizeof(float));
		if (scale != 1.0f) {
			for (size_t i = 0; i < n; i++)
				dst[i] *= scale;
		}
		return;
	}
	for (size_t i = 0; i < n; i++) {
		uint16_t h;
		memcpy(&h, p + 2 * i, 2);
		dst[i] = (dt == LP_FMT_F16 ? lp_f16_to_f32(h) : lp_bf16_to_f32(h)) * scale;
	}
}

/* Index of the first NaN or inf in x[0, n), or n. */
static size_t first_nonfinite(const float *x, size_t n)
{
	const size_t chunk = 4096;

	for (size_t i = 0; i < n; i += chunk) {
		size_t m = n - i < chunk ? n - i : chunk;
		unsigned bad = 0;

		for (size_t j = 0; j < m; j++) {
			uint32_t b;
			memcpy(&b, &x[i + j], 4);
			bad |= (b & 0x7f800000u) == 0x7f800000u;
		}
		if (!bad)
			continue;
		for (size_t j = 0; j < m; j++) {
			if (!isfinite(x[i + j]))
				return i + j;
		}
	}
	return n;
}

void lora_to_f32(float *dst, const void *src, enum lp_fmt_type dtype, size_t n)
{
	convert(dst, src, dtype, n, 1.0f);
}

int lora_check_finite(const float *x, size_t rows, size_t cols, const char *name,
                      struct lp_err *err)
{
	size_t n = rows * cols, bad = first_nonfinite(x, n);

	if (bad == n)
		return 0;
	return lp_errf(err, -EINVAL, "'%s' holds a non-finite value (%s) at [%zu, %zu]", name,
	               isnan(x[bad]) ? "nan"
	               : x[bad] > 0  ? "inf"
	                             : "-inf",
	               bad / cols, bad % cols);
}

/* The value at index i of src, before scaling, as f32. */
static float source_value(const struct lora_src *src, size_t i)
{
	float f;
	convert(&f, (const unsigned char *)src->data + i * float_size(src->dtype), src->dtype, 1,
	        1.0f);
	return f;
}

/* Converts one matrix of rows × cols from src into dst, scaled, and rejects
 * non-finite values with the tensor's name and the element's position. */
static int convert_checked(float *dst, const struct lora_src *src, int64_t rows, int64_t cols,
                           float scale, struct lp_err *err)
{
	size_t n = (size_t)rows * (size_t)cols, bad;
	float v;

	convert(dst, src->data, src->dtype, n, scale);
	bad = first_nonfinite(dst, n);
	if (bad == n)
		return 0;
	v = source_value(src, bad);
	if (!isfinite(v))
		return lp_errf(err, -EINVAL, "'%s' holds a non-finite value (%s) at [%zu, %zu]",
		               src->name,
		               isnan(v) ? "nan"
		               : v > 0  ? "inf"
		                        : "-inf",
		               bad / (size_t)cols, bad % (size_t)cols);
	return lp_errf(err, -EINVAL,
	               "'%s' scaled by %g overflows to a non-finite value at [%zu, %zu]", src->name,
	               (double)scale, bad / (size_t)cols, bad % (size_t)cols);
}

/* Sum of squares of x[0, n), in double: f32 values up to 3.4e38 square
 * without overflow. */
static double sum_squares(const float *x, size_t n)
{
	double s = 0;

	for (size_t i = 0; i < n; i++)
		s += (double)x[i] * (double)x[i];
	return s;
}

/* The storage type of values of source dtype dt: its own when half. */
static enum lp_dtype half_type(enum lp_fmt_type dt)
{
	return dt == LP_FMT_F16 ? LP_DTYPE_F16 : dt == LP_FMT_BF16 ? LP_DTYPE_BF16 : LP_DTYPE_F32;
}

static uint16_t to_half(float v, enum lp_dtype t)
{
	return t == LP_DTYPE_F16 ? lp_f32_to_f16(v) : lp_f32_to_bf16(v);
}

/* The type B is kept in: the file's half type when the scale folds into
 * every value exactly in it (a power of two, bar overflow and underflow),
 * else f32, so that folding never rounds. */
static enum lp_dtype b_type(const struct lora_src *src, size_t n, float scale)
{
	enum lp_dtype t = half_type(src->dtype);
	const unsigned char *p = src->data;

	if (t == LP_DTYPE_F32 || scale == 1.0f)
		return t;
	for (size_t i = 0; i < n; i++) {
		uint16_t h;
		memcpy(&h, p + 2 * i, 2);
		float v = from_half(h, t) * scale;
		if (!isfinite(v) || from_half(to_half(v, t), t) != v)
			return LP_DTYPE_F32;
	}
	return t;
}

/* The type a group's stacked A is kept in: the file's half type when every
 * A of the group has it, else f32. */
static enum lp_dtype group_a_type(const struct lora_plan *p, int layer, enum lp_lora_group g)
{
	int first, count;
	enum lp_dtype t = LP_DTYPE_COUNT;

	lp_lora_group_targets(g, &first, &count);
	for (int i = first; i < first + count; i++) {
		const struct lora_plan_pair *pp = &p->pairs[(size_t)layer * LP_LORA_N_TARGETS + i];
		if (!pp->rank)
			continue;
		if (t != LP_DTYPE_COUNT && t != half_type(pp->a.dtype))
			return LP_DTYPE_F32;
		t = half_type(pp->a.dtype);
	}
	return t == LP_DTYPE_COUNT ? LP_DTYPE_F32 : t;
}

/* Matrices start on 64-byte boundaries inside data. */
static size_t matrix_bytes(size_t n, enum lp_dtype t)
{
	return (n * (t == LP_DTYPE_F32 ? 4 : 2) + 63) / 64 * 64;
}

static enum lp_lora_group target_group(int t)
{
	int g = 0, first, count;

	for (; g + 1 < LP_LORA_N_GROUPS; g++) {
		lp_lora_group_targets((enum lp_lora_group)g, &first, &count);
		if (t < first + count)
			break;
	}
	return (enum lp_lora_group)g;
}

int lora_plan_finish(struct lp_lora **out, const struct lora_plan *p, const struct lp_lora_shape *s,
                     const char *format, const char *base_model, struct lp_err *err)
{
	size_t n_pairs = (size_t)p->n_layers * LP_LORA_N_TARGETS;
	size_t n_stacks = (size_t)p->n_layers * LP_LORA_N_GROUPS;
	size_t total = 0, off = 0, max_a = 0, max_b = 0;
	float *a_tmp = NULL, *b_tmp = NULL;
	double a_norm[LP_LORA_N_TARGETS] = {0}, norm; /* |A|_F of the layer's pairs */
	struct lp_lora *l;
	int rc;

	*out = NULL;
	for (size_t i = 0; i < n_pairs; i++) {
		const struct lora_plan_pair *pp = &p->pairs[i];
		enum lp_lora_target t = (enum lp_lora_target)(i % LP_LORA_N_TARGETS);
		int in, o;

		if (!pp->rank)
			continue;
		if (pp->rank < 0 || pp->rank > LORA_RANK_LIMIT)
			return lp_errf(err, -EINVAL, "rank %d of '%s' in layer %zu is invalid",
			               pp->rank, target_names[t], i / LP_LORA_N_TARGETS);
		if (pp->rank > s->max_rank)
			return lp_errf(
			    err, -EINVAL, "rank %d of '%s' exceeds --max-lora-rank %d (layer %zu)",
			    pp->rank, target_names[t], s->max_rank, i / LP_LORA_N_TARGETS);
		if (!isfinite(pp->scale) || !isfinite((float)pp->scale))
			return lp_errf(err, -EINVAL, "scale %g of '%s' in layer %zu is not finite",
			               pp->scale, target_names[t], i / LP_LORA_N_TARGETS);
		lp_lora_target_dims(s, t, &in, &o);
		total += (size_t)pp->rank * ((size_t)in + (size_t)o);
		if ((size_t)pp->rank * (size_t)in > max_a)
			max_a = (size_t)pp->rank * (size_t)in;
		if ((size_t)pp->rank * (size_t)o > max_b)
			max_b = (size_t)pp->rank * (size_t)o;
	}
	if (!total && p->absent.n)
		return lp_errf(err, -EINVAL,
		               "adapter holds no lora weights for any of the %d modules its config "
		               "targets",
		               p->absent.n);
	if (!total)
		return lp_errf(err, -EINVAL, "adapter holds no lora weights");
	if (total > SIZE_MAX / sizeof(float) / 2)
		return lp_errf(err, -EINVAL, "adapter is too large");

	l = calloc(1, sizeof(*l));
	if (!l)
		return lp_errf(err, -ENOMEM, "out of memory");
	l->n_layers = p->n_layers;
	l->format = format;
	l->absent = p->absent;
	l->pairs = calloc(n_pairs, sizeof(*l->pairs));
	l->stacks = calloc(n_stacks, sizeof(*l->stacks));
	a_tmp = malloc(max_a * sizeof(float));
	b_tmp = malloc(max_b * sizeof(float));
	if (!l->pairs || !l->stacks || !a_tmp || !b_tmp) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out_free;
	}
	/* the types first (a half B only where its scale folds exactly), and
	 * with them the size */
	total = 0;
	for (int layer = 0; layer < p->n_layers; layer++) {
		for (int g = 0; g < LP_LORA_N_GROUPS; g++)
			lp_lora_stack_at(l, layer, g)->type = group_a_type(p, layer, g);
		for (int t = 0; t < LP_LORA_N_TARGETS; t++) {
			size_t i = (size_t)layer * LP_LORA_N_TARGETS + (size_t)t;
			const struct lora_plan_pair *pp = &p->pairs[i];
			struct lp_lora_pair *lp = &l->pairs[i];
			int in, o;
			if (!pp->rank)
				continue;
			lp_lora_target_dims(s, (enum lp_lora_target)t, &in, &o);
			lp->rank = pp->rank;
			lp->a_type = lp_lora_stack_at(l, layer, target_group(t))->type;
			lp->b_type = b_type(&pp->b, (size_t)pp->rank * (size_t)o, (float)pp->scale);
			total += matrix_bytes((size_t)pp->rank * (size_t)in, lp->a_type) +
			         matrix_bytes((size_t)pp->rank * (size_t)o, lp->b_type);
		}
	}
	l->data_bytes = total;
	l->data = alloc_weights(l->data_bytes);
	if (!l->data) {
		rc = lp_errf(err, -ENOMEM, "out of memory for %zu bytes of lora weights",
		             l->data_bytes);
		goto out_free;
	}
	memset(l->data, 0, l->data_bytes);
	if (base_model && *base_model) {
		l->base_model = strdup(base_model);
		if (!l->base_model) {
			rc = lp_errf(err, -ENOMEM, "out of memory");
			goto out_free;
		}
	}
	/* per layer: every A in target order, a group's A packed one after
	 * another (one stacked matrix: they share a type) from a 64-byte
	 * boundary, then every B; total above is an upper bound of this */
	for (int layer = 0; layer < p->n_layers; layer++) {
		for (int t = 0; t < LP_LORA_N_TARGETS; t++) {
			size_t i = (size_t)layer * LP_LORA_N_TARGETS + (size_t)t;
			const struct lora_plan_pair *pp = &p->pairs[i];
			struct lp_lora_pair *lp = &l->pairs[i];
			struct lp_lora_stack *st = lp_lora_stack_at(l, layer, target_group(t));
			size_t n;
			int in, o;
			if (!pp->rank)
				continue;
			lp_lora_target_dims(s, (enum lp_lora_target)t, &in, &o);
			n = (size_t)pp->rank * (size_t)in;
			if (!st->a) /* the group starts on a 64-byte boundary */
				off = (off + 63) / 64 * 64;
			lp->a = (char *)l->data + off;
			off += n * (lp->a_type == LP_DTYPE_F32 ? 4 : 2);
			rc = convert_checked(a_tmp, &pp->a, pp->rank, in, 1.0f, err);
			if (rc)
				goto out_free;
			a_norm[t] = sqrt(sum_squares(a_tmp, n));
			if (lp->a_type == LP_DTYPE_F32)
				memcpy(lp->a, a_tmp, n * sizeof(float));
			else /* the file's own values */
				memcpy(lp->a, pp->a.data, n * 2);
			if (!st->a)
				st->a = lp->a;
			st->rank += pp->rank;
			if (pp->rank > l->max_rank)
				l->max_rank = pp->rank;
			l->targets |= 1u << t;
		}
		off = (off + 63) / 64 * 64;
		for (int t = 0; t < LP_LORA_N_TARGETS; t++) {
			size_t i = (size_t)layer * LP_LORA_N_TARGETS + (size_t)t;
			const struct lora_plan_pair *pp = &p->pairs[i];
			struct lp_lora_pair *lp = &l->pairs[i];
			int in, o;
			if (!pp->rank)
				continue;
			lp_lora_target_dims(s, (enum lp_lora_target)t, &in, &o);
			lp->b = (char *)l->data + off;
			off += matrix_bytes((size_t)o * (size_t)pp->rank, lp->b_type);
			rc = convert_checked(b_tmp, &pp->b, o, pp->rank, (float)pp->scale, err);
			if (rc)
				goto out_free;
			/* scale * |B|_F * |A|_F bounds the update's spectral norm */
			norm = sqrt(sum_squares(b_tmp, (size_t)o * (size_t)pp->rank)) * a_norm[t];
			if (norm > LORA_NORM_LIMIT) {
				rc = lp_errf(err, -EINVAL,
				             "layer %d '%s': scale * |B| * |A| (Frobenius norms of "
				             "'%s' and '%s') is %.3g, over the limit of %g: the "
				             "weights are absurd",
				             layer, target_names[t], pp->b.name ? pp->b.name : "?",
				             pp->a.name ? pp->a.name : "?", norm, LORA_NORM_LIMIT);
				goto out_free;
			}
			/* transposed, [rank, out], in panels; a half type holds every
			 * scaled value exactly (b_type) */
			for (int oo = 0; oo < o; oo++)
				for (int k = 0; k < pp->rank; k++) {
					float v = b_tmp[(size_t)oo * (size_t)pp->rank + (size_t)k];
					size_t at = lp_lora_b_index(pp->rank, o, k, oo);
					if (lp->b_type == LP_DTYPE_F32) {
						((float *)lp->b)[at] = v;
					} else {
						uint16_t h = to_half(v, lp->b_type);
						memcpy((uint16_t *)lp->b + at, &h, 2);
					}
				}
		}
	}
	l->data_bytes = off;
	free(a_tmp);
	free(b_tmp);
	*out = l;
	return 0;
out_free:
	free(a_tmp);
	free(b_tmp);
	lp_lora_free(l);
	return rc;
}

/* Base model names: the last path component, lowercased, without a
 * trailing quantization or file-type suffix. */
#define NAME_MAX_LEN 256

static const char quant_suffix_re[] =
    "^(.+?)(?:[-._](?:q[0-9]+(?:_[a-z0-9]+)*|iq[0-9]+(?:_[a-z0-9]+)*|f16|f32|bf16|fp16|fp32|"
    "fp8|int4|int8|gguf|ggml|safetensors|nemo|awq|gptq))*$";

static void normalize_name(const pcre2_code *re, pcre2_match_data *md, const char *in, char *out,
                           size_t cap)
{
	size_t end = strlen(in), start, n;

	while (end > 0 && in[end - 1] == '/')
		end--;
	start = end;
	while (start > 0 && in[start - 1] != '/')
		start--;
	n = end - start;
	if (n >= cap)
		n = cap - 1;
	for (size_t i = 0; i < n; i++)
		out[i] = (char)tolower((unsigned char)in[start + i]);
	out[n] = '\0';
	if (re && pcre2_match(re, (PCRE2_SPTR)out, n, 0, 0, md, NULL) >= 2) {
		PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
		out[ov[3]] = '\0';
	}
}

/* Whether names[i] equals one of names[0 .. i). */
static bool listed(const char *const *names, size_t i)
{
	for (size_t j = 0; j < i; j++) {
		if (!strcmp(names[j], names[i]))
			return true;
	}
	return false;
}

int lora_check_base_model(const char *base, const struct lp_lora_shape *s, struct lp_err *err)
{
	char want[NAME_MAX_LEN], have[NAME_MAX_LEN], list[384];
	pcre2_code *re;
	pcre2_match_data *md = NULL;
	size_t len = 0;
	int ec, rc = 0;
	PCRE2_SIZE eo;

	if (!base || !*base || !s->base_names || !s->base_names[0] || s->allow_base_mismatch)
		return 0;
	re = pcre2_compile((PCRE2_SPTR)quant_suffix_re, PCRE2_ZERO_TERMINATED, 0, &ec, &eo, NULL);
	if (re)
		md = pcre2_match_data_create_from_pattern(re, NULL);
	if (!re || !md) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	normalize_name(re, md, base, want, sizeof(want));
	list[0] = '\0';
	for (size_t i = 0; s->base_names[i]; i++) {
		normalize_name(re, md, s->base_names[i], have, sizeof(have));
		if (strcmp(want, have) == 0)
			goto out;
		if (listed(s->base_names, i)) /* the served name is often the stem too */
			continue;
		if (len < sizeof(list)) {
			int w = snprintf(list + len, sizeof(list) - len, "%s'%s'", i ? ", " : "",
			                 s->base_names[i]);
			len += w > 0 ? (size_t)w : 0;
		}
	}
	rc = lp_errf(err, -EINVAL,
	             "adapter was trained on base model '%s', which does not match the served "
	             "model (%s)",
	             base, list);
out:
	pcre2_match_data_free(md);
	pcre2_code_free(re);
	return rc;
}

static bool is_file(const char *dir, const char *name)
{
	char path[4096];
	struct stat st;

	if (snprintf(path, sizeof(path), "%s/%s", dir, name) >= (int)sizeof(path))
		return false;
	return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static bool ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), m = strlen(suffix);
	return n >= m && strcmp(s + n - m, suffix) == 0;
}

static int check_shape_arg(const struct lp_lora_shape *s, struct lp_err *err)
{
	if (s->n_layers <= 0 || s->dim <= 0 || s->q_dim <= 0 || s->kv_dim <= 0 || s->ffn_dim <= 0 ||
	    s->max_rank <= 0 || s->n_layers > 100000 || s->dim > 1000000 || s->q_dim > 1000000 ||
	    s->kv_dim > 1000000 || s->ffn_dim > 10000000)
		return lp_errf(
		    err, -EINVAL,
		    "invalid base model shape (%d layers, dims %d/%d/%d/%d, max rank %d)",
		    s->n_layers, s->dim, s->q_dim, s->kv_dim, s->ffn_dim, s->max_rank);
	return 0;
}

int lp_lora_load(struct lp_lora **out, const char *path, const struct lp_lora_shape *s,
                 struct lp_err *err)
{
	return lp_lora_load_in(out, NULL, path, s, err);
}

int lp_lora_load_in(struct lp_lora **out, const char *root, const char *path,
                    const struct lp_lora_shape *s, struct lp_err *err)
{
	struct stat st;
	bool has_cfg, has_w;
	int rc;

	*out = NULL;
	rc = check_shape_arg(s, err);
	if (rc)
		return rc;
	if (stat(path, &st) != 0) {
		if (errno == ENOENT || errno == ENOTDIR)
			return lp_errf(err, -ENOENT, "adapter path '%s' does not exist", path);
		return lp_errf(err, -errno, "cannot access adapter path '%s': %s", path,
		               strerror(errno));
	}
	if (!lp_file_below(root, path))
		return lp_errf(err, -EACCES, "adapter path '%s' is not below '%s'", path, root);
	if (S_ISDIR(st.st_mode)) {
		if (is_file(path, "adapter_config.json"))
			return lora_load_peft(out, root, path, s, err);
		has_cfg = is_file(path, "model.lora_config.npy");
		has_w = is_file(path, "model.lora_weights.npy");
		if (has_cfg && has_w)
			return lora_load_trtllm(out, root, path, s, err);
		if (has_cfg || has_w)
			return lp_errf(
			    err, -ENOENT,
			    "'%s/%s' does not exist (a TensorRT-LLM adapter needs "
			    "model.lora_config.npy and model.lora_weights.npy)",
			    path, has_cfg ? "model.lora_weights.npy" : "model.lora_config.npy");
		return lp_errf(err, -EINVAL,
		               "'%s' is not a lora adapter: expected adapter_config.json with "
		               "adapter_model.safetensors or adapter_model.bin (HF PEFT), or "
		               "model.lora_config.npy and model.lora_weights.npy (TensorRT-LLM)",
		               path);
	}
	if (S_ISREG(st.st_mode) && ends_with(path, ".nemo"))
		return lora_load_nemo(out, root, path, s, err);
	return lp_errf(err, -EINVAL,
	               "'%s' is not a lora adapter: expected a directory (HF PEFT or "
	               "TensorRT-LLM) or a .nemo file",
	               path);
}
