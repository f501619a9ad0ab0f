/* The layout of LoRA adapter weights that every backend's LoRA op reads:
 * target modules, the groups of targets sharing an input, and one pair of
 * (A, B transposed in panels) per layer and target. Kernel-level contract,
 * with no dependence on the adapter file formats (agent/adapters/ fills
 * it). */
#ifndef LP_KERNELS_LORA_LAYOUT_H
#define LP_KERNELS_LORA_LAYOUT_H

#include <stddef.h>

#include "kernels/dtype.h"

enum lp_lora_target {
	LP_LORA_Q,
	LP_LORA_K,
	LP_LORA_V,
	LP_LORA_O,
	LP_LORA_GATE,
	LP_LORA_UP,
	LP_LORA_DOWN,
	LP_LORA_N_TARGETS
};

/* Targets that read the same input: q, k and v; o; gate and up; down. */
enum lp_lora_group {
	LP_LORA_GROUP_QKV,
	LP_LORA_GROUP_O,
	LP_LORA_GROUP_GATE_UP,
	LP_LORA_GROUP_DOWN,
	LP_LORA_N_GROUPS
};

#define LP_LORA_MAX_OUTS 3  /* targets of the largest group */
#define LP_LORA_PANEL    64 /* output columns of a panel of B transposed */

/* Group g is targets *first .. *first + *count - 1. */
static inline void lp_lora_group_targets(enum lp_lora_group g, int *first, int *count)
{
	static const int firsts[LP_LORA_N_GROUPS] = {LP_LORA_Q, LP_LORA_O, LP_LORA_GATE,
	                                             LP_LORA_DOWN};
	static const int counts[LP_LORA_N_GROUPS] = {3, 1, 2, 1};

	*first = firsts[g];
	*count = counts[g];
}

/* Model sizes that give each target its input and output widths. */
struct lp_lora_dims {
	int n_layers;
	int dim;     /* hidden size: in of q/k/v/gate/up, out of o/down */
	int q_dim;   /* n_heads * head_dim */
	int kv_dim;  /* n_kv_heads * head_dim */
	int ffn_dim; /* intermediate size */
};

static inline void lp_lora_dims_of(const struct lp_lora_dims *d, enum lp_lora_target t, int *in,
                                   int *out)
{
	switch (t) {
	case LP_LORA_Q:
		*in = d->dim, *out = d->q_dim;
		break;
	case LP_LORA_K:
	case LP_LORA_V:
		*in = d->dim, *out = d->kv_dim;
		break;
	case LP_LORA_O:
		*in = d->q_dim, *out = d->dim;
		break;
	case LP_LORA_GATE:
	case LP_LORA_UP:
		*in = d->dim, *out = d->ffn_dim;
		break;
	case LP_LORA_DOWN:
		*in = d->ffn_dim, *out = d->dim;
		break;
	default:
		*in = 0, *out = 0;
		break;
	}
}

/* One layer's adapter on one target. Weights keep the file's half
 * precision (f16 or bf16) where it has one: A always, B when the scale
 * folds into it exactly (a power of two); else they are f32. The scale is
 * already folded into B. */
struct lp_lora_pair {
	int rank;                     /* 0: no adapter on this layer and module */
	void *a;                      /* [rank, in] */
	void *b;                      /* B transposed, [rank, out] in panels, scaled */
	enum lp_dtype a_type, b_type; /* f32, f16 or bf16 */
};

/* The A of a group's targets in one layer, stacked: rows are the targets'
 * ranks in target order (the pairs' a, one after another in memory). */
struct lp_lora_stack {
	int rank;           /* sum of the ranks; 0: the adapter has none of the group here */
	void *a;            /* [rank, in] */
	enum lp_dtype type; /* of every A in it */
};

/* An adapter's weights in host memory, as a backend's slot fill takes them. */
struct lp_lora_weights {
	int n_layers;
	const struct lp_lora_pair *pairs;   /* [n_layers * LP_LORA_N_TARGETS] */
	const struct lp_lora_stack *stacks; /* [n_layers * LP_LORA_N_GROUPS] */
};

/* Index of element (k, o) of a B transposed [rank, out] in panel layout:
 * panels of LP_LORA_PANEL output columns stored one after another, each
 * row-major [rank, width]; the last panel is narrower when out is not a
 * multiple of the panel. */
static inline size_t lp_lora_b_index(int rank, int out, int k, int o)
{
	int p0 = o / LP_LORA_PANEL * LP_LORA_PANEL;
	int width = out - p0 < LP_LORA_PANEL ? out - p0 : LP_LORA_PANEL;

	return (size_t)p0 * (size_t)rank + (size_t)k * (size_t)width + (size_t)(o - p0);
}

#endif
