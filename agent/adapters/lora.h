/* A LoRA adapter's weights in host memory, in one layout whatever the file
 * format: per layer and target module, A [rank, in] and B [out, rank] in
 * f32 or the file's half precision (see struct lp_lora_pair), with the scale (alpha / r, or alpha /
 * sqrt(r) with rsLoRA, per module with rank_pattern / alpha_pattern) folded into B once at load.
 *
 * The layout is the one the backends' LoRA op reads (kernels/lora-layout.h):
 * per layer, the A of every target in target order, so that the A of the
 * targets sharing an input (a group) form one stacked matrix, then the B of
 * every target, transposed ([rank, out]) and cut into panels of
 * LP_LORA_PANEL output columns.
 *
 * Formats, detected from what the path holds:
 *   HF PEFT     dir with adapter_config.json + adapter_model.safetensors
 *               (or adapter_model.bin, PyTorch's zip checkpoint)
 *   TensorRT-LLM dir with model.lora_config.npy + model.lora_weights.npy
 *   NeMo        a .nemo tar file with model_config.yaml and model_weights.ckpt
 *
 * Every size and offset read from a file is checked before use; every
 * rejection has its own message. */
#ifndef LP_ADAPTERS_LORA_H
#define LP_ADAPTERS_LORA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/err.h"
#include "kernels/dtype.h"
#include "kernels/lora-layout.h"

/* "q_proj", "k_proj", ... as HF names them. */
const char *lp_lora_target_name(enum lp_lora_target t);

/* What the base model looks like, for validation. */
struct lp_lora_shape {
	int n_layers;
	int dim;      /* hidden size: in of q/k/v/gate/up, out of o/down */
	int q_dim;    /* n_heads * head_dim */
	int kv_dim;   /* n_kv_heads * head_dim */
	int ffn_dim;  /* intermediate size */
	int max_rank; /* largest rank accepted (--max-lora-rank) */
	/* Names the base model answers to (served name, file or directory
	 * stem, config _name_or_path), NULL-terminated, may be NULL. An
	 * adapter whose base_model_name_or_path matches none is rejected
	 * unless allow_base_mismatch. Matching compares the last path
	 * component, case-insensitively, ignoring a quantization suffix
	 * (-q4_1, .Q8_0, -f16, -gguf ...). */
	const char *const *base_names;
	bool allow_base_mismatch;
};

/* Input and output sizes of a target in a model of the given shape. */
void lp_lora_target_dims(const struct lp_lora_shape *s, enum lp_lora_target t, int *in, int *out);

/* The modules an adapter's config targets that its file holds no weights
 * for. PEFT loads such a file and leaves those modules at their initial
 * B = 0, so they add nothing; loraplane does the same and says which they
 * are. n counts them all; bit l % 64 of layers[t][l / 64] is set for each
 * absent (layer l, target t) with l < LP_LORA_ABSENT_LAYERS (the engine's
 * model loader takes no more layers than that). Plain data: copy it by
 * value. */
#define LP_LORA_ABSENT_LAYERS 1024
struct lp_lora_absent {
	int n;
	uint64_t layers[LP_LORA_N_TARGETS][LP_LORA_ABSENT_LAYERS / 64];
};

/* Marks (layer, t) absent: counts it, and sets its bit when it has one. */
void lp_lora_absent_add(struct lp_lora_absent *a, int layer, enum lp_lora_target t);
bool lp_lora_absent_has(const struct lp_lora_absent *a, int layer, enum lp_lora_target t);

/* Writes a's modules as text for messages and logs, per target with the
 * layers in runs: "q_proj in layers 0-3, 7; down_proj in layer 1" ("" when
 * none). Always NUL-terminated; cut short with "..." when cap is too
 * small. buf is the caller's. */
void lp_lora_absent_format(const struct lp_lora_absent *a, char *buf, size_t cap);

struct lp_lora {
	int n_layers;
	int max_rank;                 /* largest rank of any pair */
	unsigned targets;             /* bit t set when some layer has target t */
	struct lp_lora_pair *pairs;   /* [n_layers * LP_LORA_N_TARGETS], index
	                                 layer * LP_LORA_N_TARGETS + target */
	struct lp_lora_stack *stacks; /* [n_layers * LP_LORA_N_GROUPS] */
	void *data;                   /* one allocation holding every a and b */
	size_t data_bytes;            /* the part of it the weights use */
	char *base_model;             /* base_model_name_or_path, or NULL */
	const char *format;           /* "peft", "peft-bin", "trtllm" or "nemo" */
	struct lp_lora_absent absent; /* targeted modules without weights */
};

/* Loads and validates the adapter at path for a model of shape s. Errors:
 * -ENOENT when path (or the files a format needs) does not exist, -EINVAL
 * for an invalid adapter (the message says exactly what; a file that is a
 * FIFO, socket, device or directory is one), -ENOMEM. Free with
 * lp_lora_free().
 *
 * lp_lora_load_in() opens every file of the adapter below root (borrowed:
 * the allowed root of an API file:// load, the cache directory of a remote
 * source, the --lora-dir of its adapters) with lp_file_open()
 * (common/file.h): a path or symbolic link that leads outside root is
 * -EACCES, and no message quotes a file outside root. root NULL or ""
 * (lp_lora_load: adapters the operator names) means no root. */
int lp_lora_load(struct lp_lora **out, const char *path, const struct lp_lora_shape *s,
                 struct lp_err *err);
int lp_lora_load_in(struct lp_lora **out, const char *root, const char *path,
                    const struct lp_lora_shape *s, struct lp_err *err);
void lp_lora_free(struct lp_lora *l);

static inline struct lp_lora_pair *lp_lora_pair_at(const struct lp_lora *l, int layer,
                                                   enum lp_lora_target t)
{
	return &l->pairs[(size_t)layer * LP_LORA_N_TARGETS + t];
}

static inline struct lp_lora_stack *lp_lora_stack_at(const struct lp_lora *l, int layer,
                                                     enum lp_lora_group g)
{
	return &l->stacks[(size_t)layer * LP_LORA_N_GROUPS + g];
}

/* Element (k, i) of a pair's A and (k, o) of its B transposed, as f32. */
float lp_lora_a_at(const struct lp_lora_pair *p, int in, int k, int i);
float lp_lora_b_at(const struct lp_lora_pair *p, int out, int k, int o);

#endif
