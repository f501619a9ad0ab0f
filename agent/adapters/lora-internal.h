/* What the LoRA format readers share: a plan of where each pair's A and B
 * live in the mapped files, and the one step that turns a plan into a
 * struct lp_lora (rank and shape checks, one allocation, f32 conversion
 * with a finiteness check, the scale folded into B).
 *
 * Each format reader (peft.c, trtllm.c, nemo.c) fills a plan from its
 * files, validates what only it knows (names, configs), and calls
 * lora_plan_finish() while its files are still mapped. */
#ifndef LP_ADAPTERS_LORA_INTERNAL_H
#define LP_ADAPTERS_LORA_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "agent/adapters/lora.h"
#include "agent/formats/tensor.h"
#include "common/err.h"

/* Largest rank any format may declare, whatever --max-lora-rank says, so
 * that sizes computed from ranks cannot overflow. */
#define LORA_RANK_LIMIT 65536

/* Largest scale * |B|_F * |A|_F (an upper bound of the spectral norm of
 * the update scale * B·A) of any pair: far above every real adapter
 * measured (docs/lora-formats.md), far below weights like 1e18 that load
 * as finite numbers and push activations towards overflow. */
#define LORA_NORM_LIMIT 1e5

/* A run of values in a file: f32, f16 or bf16, row-major. How many values
 * it holds follows from the pair's rank and the target's dims. */
struct lora_src {
	const void *data;
	enum lp_fmt_type dtype;
	const char *name; /* tensor it comes from, for messages; borrowed */
};

struct lora_plan_pair {
	int rank;          /* 0: no adapter here */
	struct lora_src a; /* [rank, in] */
	struct lora_src b; /* [out, rank], unscaled */
	double scale;      /* folded into b as (float)scale */
};

struct lora_plan {
	int n_layers;
	struct lora_plan_pair *pairs; /* [n_layers * LP_LORA_N_TARGETS] */
	/* modules the config targets without weights in the file: their
	 * pairs keep rank 0 (they add nothing, as in PEFT) */
	struct lp_lora_absent absent;
};

int lora_plan_init(struct lora_plan *p, int n_layers, struct lp_err *err);
void lora_plan_release(struct lora_plan *p);

static inline struct lora_plan_pair *lora_plan_at(struct lora_plan *p, int layer,
                                                  enum lp_lora_target t)
{
	return &p->pairs[(size_t)layer * LP_LORA_N_TARGETS + t];
}

/* Checks every pair's rank against s->max_rank, allocates the adapter,
 * converts every A and B to f32 (rejecting NaN and inf, and pairs whose
 * scale * |B|_F * |A|_F exceeds LORA_NORM_LIMIT) and folds each
 * pair's scale into B, and copies p->absent. Borrows p, format (a string
 * literal) and base_model (copied). On success *out is the caller's
 * (lp_lora_free). */
int lora_plan_finish(struct lp_lora **out, const struct lora_plan *p, const struct lp_lora_shape *s,
                     const char *format, const char *base_model, struct lp_err *err);

/* dst[i] = src[i] as f32 for n values of a float dtype (f32, f16, bf16). */
void lora_to_f32(float *dst, const void *src, enum lp_fmt_type dtype, size_t n);

/* -EINVAL naming name and the [row, col] of the first NaN or inf among the
 * rows × cols values at x. */
int lora_check_finite(const float *x, size_t rows, size_t cols, const char *name,
                      struct lp_err *err);

/* -EINVAL unless t holds f32, f16 or bf16 values. */
int lora_check_float(const struct lp_fmt_tensor *t, struct lp_err *err);

/* Checks that t is 2-D with the given shape; the message names t and both
 * shapes. */
int lora_check_shape(const struct lp_fmt_tensor *t, int64_t rows, int64_t cols, struct lp_err *err);

/* Checks the adapter's base model name against s->base_names (see lora.h);
 * a NULL or empty base, or no base names, passes. */
int lora_check_base_model(const char *base, const struct lp_lora_shape *s, struct lp_err *err);

/* "q_proj" ... as text to put in messages listing what is supported. */
#define LORA_SUPPORTED_TEXT "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"

/* The format readers. dir or file is the adapter's path; every file they
 * read is opened below root (NULL or "" for none; common/file.h). Each
 * returns 0 with *out set, or a negative code with err set. */
int lora_load_peft(struct lp_lora **out, const char *root, const char *dir,
                   const struct lp_lora_shape *s, struct lp_err *err);
int lora_load_trtllm(struct lp_lora **out, const char *root, const char *dir,
                     const struct lp_lora_shape *s, struct lp_err *err);
int lora_load_nemo(struct lp_lora **out, const char *root, const char *file,
                   const struct lp_lora_shape *s, struct lp_err *err);

#endif
