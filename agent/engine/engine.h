/* The engine: a model, its paged KV cache and a continuous-batching
 * scheduler (engine.c), and the forward pass it runs on the backend
 * (forward.c). Each lp_engine_step() decodes one token for every running
 * sequence and spends the rest of max_batched_tokens on (chunked) prefill of
 * the others, runs one batched forward pass on the backend, and samples one
 * token for every sequence whose known tokens are all computed. When the
 * cache runs out of blocks, the most recently admitted sequence is preempted
 * and later recomputed.
 *
 * Single-threaded: one thread owns the engine and everything it returns.
 * Every buffer a step uses is allocated by lp_engine_new(); sequences
 * allocate their token and block arrays once, in lp_engine_add(). */
#ifndef LP_ENGINE_ENGINE_H
#define LP_ENGINE_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "agent/engine/grammar.h"
#include "agent/engine/kv-cache.h"
#include "agent/engine/lora-cache.h"
#include "agent/engine/model.h"
#include "agent/engine/sampler.h"
#include "common/err.h"

/* Most top logprobs a step returns per token. */
#define LP_ENGINE_MAX_LOGPROBS 20

struct lp_engine_config {
	int max_num_seqs;       /* sequences running at once (default 32) */
	int max_model_len;      /* prompt + output tokens (default: the model's context) */
	int max_batched_tokens; /* tokens per step (default 512) */
	/* KV cache size; 0 (the default): 512 MiB on the CPU, and on a device
	 * what gpu_memory_utilization of its memory leaves after the weights,
	 * the LoRA slots, the workspaces and the activations (vLLM's rule) */
	size_t kv_cache_bytes;
	double gpu_memory_utilization; /* fraction of device memory (default 0.9) */
	enum lp_dtype kv_type;         /* f32, f16 or bf16; LP_DTYPE_COUNT (default): the
	                                  backend's preferred (f32 on the CPU) */
	enum lp_dtype lora_type;       /* device LoRA slots; LP_DTYPE_COUNT: the backend's */
	int block_size;                /* default 16 */
	int max_loras;     /* device slots = distinct adapters running at once (default 8) */
	int max_cpu_loras; /* adapters kept in host memory (default 16) */
	int max_lora_rank; /* largest rank accepted (default 64) */
	/* names the base model answers to, for adapters' base_model_name_or_path
	 * (NULL-terminated, may be NULL; the model's file or directory stem is
	 * always one) */
	const char *const *base_names;
	bool allow_base_mismatch;
	/* automatic prefix caching (default on): full blocks are kept after
	 * their sequence and reused by a sequence of the same adapter version
	 * whose tokens start the same (kv-cache.h) */
	bool prefix_caching;
	/* A device backend samples on the device (its sample op) and downloads
	 * only the tokens and the logprobs asked for; with return_logits every
	 * step output also has its raw logits (tests, debugging). The CPU
	 * always returns them, and samples on the host. */
	bool return_logits;
};

void lp_engine_config_default(struct lp_engine_config *c);

enum lp_seq_state {
	LP_SEQ_WAITING,
	LP_SEQ_RUNNING,
	LP_SEQ_FINISHED,
};

enum lp_finish_reason {
	LP_FINISH_NONE,
	LP_FINISH_STOP,   /* an end-of-sequence token */
	LP_FINISH_LENGTH, /* max_tokens or the model length */
	LP_FINISH_ABORT,  /* lp_engine_finish() by the caller */
};

struct lp_seq_params {
	const char *adapter;   /* adapter name, or NULL for the base model */
	const int32_t *prompt; /* borrowed; copied */
	size_t n_prompt;
	int max_tokens; /* new tokens at most; <= 0: up to the model length */
	bool ignore_eos;
	struct lp_sampling_params sampling;
	/* each step output carries the chosen token's logprob and
	 * top_logprobs (<= LP_ENGINE_MAX_LOGPROBS) alternatives */
	bool logprobs;
	int top_logprobs;
	/* the caller's request this sequence belongs to (n > 1 makes several
	 * sequences of one request): the stats count requests by it; 0 for a
	 * request of its own */
	uint64_t group;
	/* constrained decoding (agent/engine/grammar.h): every token keeps
	 * the output a valid prefix of the grammar, eos only where it may
	 * end, and the sequence stops (LP_FINISH_STOP) once nothing but the
	 * end can follow. Borrowed; the sequence takes its own reference.
	 * NULL: unconstrained. */
	struct lp_grammar *grammar;
};

struct lp_seq {
	uint64_t id; /* increasing in order of lp_engine_add */
	enum lp_seq_state state;
	enum lp_finish_reason finish;
	int32_t *tokens; /* [max_model_len] prompt, then generated */
	int n_prompt;
	int n_tokens;
	int n_computed; /* tokens whose K/V are in the cache */
	int max_tokens;
	bool ignore_eos;
	struct lp_sampler sampler;
	struct lp_grammar_matcher *matcher; /* NULL: unconstrained */
	bool logprobs;                      /* as asked in lp_seq_params */
	int top_logprobs;
	int32_t *blocks; /* [max_blocks_per_seq] block table */
	int n_blocks;
	/* leading blocks given back because no later token can attend to
	 * them (every layer of the model slides); their entries are -1 */
	int n_released;
	int n_preempted; /* times its cache was dropped for recompute */
	uint64_t group;  /* as in lp_seq_params */
	/* prefix caching: digests of its first n_digests full blocks, and how
	 * many leading blocks of its table were offered to the cache */
	struct lp_kv_digest *digests; /* [max_blocks_per_seq], NULL when off */
	int n_digests;
	int n_published;
	double t_scheduled;         /* CLOCK_MONOTONIC seconds it first ran; 0: not yet */
	int n_cached;               /* prompt tokens the prefix cache held when it first ran */
	struct lp_adapter *adapter; /* the version it was admitted with, or NULL */
	void *user;                 /* the caller's */
	struct lp_seq *next;        /* in the engine's waiting or running list */
};

/* One sampled token of a step. */
struct lp_step_output {
	struct lp_seq *seq;
	int32_t token;
	/* [vocab] raw logits it was sampled from, valid until the next step;
	 * NULL when a device sampled it and cfg.return_logits is off */
	const float *logits;
	bool finished; /* seq->finish says why */
	/* when seq->logprobs: log-softmax of the raw logits (of the masked
	 * logits for a sequence with a grammar: the constrained distribution) */
	float logprob;
	int n_top;
	int32_t top_ids[LP_ENGINE_MAX_LOGPROBS];
	float top_logprobs[LP_ENGINE_MAX_LOGPROBS];
};

/* Where the device memory went, measured at lp_engine_new. */
struct lp_engine_memory {
	size_t total;       /* device (host RAM on the CPU) */
	size_t weights;     /* the model's weights as stored */
	size_t workspaces;  /* the backend's reserve: LoRA slots, op workspaces */
	size_t activations; /* the step's tensors and metadata */
	size_t kv;          /* the KV cache */
	int kv_blocks;
	int kv_tokens; /* kv_blocks * block_size */
};

struct lp_engine;

/* Creates an engine over model (borrowed; must outlive it). */
int lp_engine_new(struct lp_engine **out, struct lp_model *model,
                  const struct lp_engine_config *cfg, struct lp_err *err);
void lp_engine_free(struct lp_engine *e);
const struct lp_engine_config *lp_engine_config(const struct lp_engine *e);
const struct lp_model *lp_engine_model(const struct lp_engine *e);
const struct lp_engine_memory *lp_engine_memory(const struct lp_engine *e);
const struct lp_backend_info *lp_engine_backend_info(const struct lp_engine *e);

/* Queues a new sequence. -EINVAL (with the reason) for an empty prompt, a
 * token id out of range, a prompt that leaves no room under max_model_len,
 * or bad sampling parameters; -ENOENT for an adapter that is not loaded;
 * -EAGAIN when the adapter must come back from disk but the host tier is
 * full of adapters that waiting or running requests need (retry later).
 * The sequence belongs to the engine; release
 * it with lp_engine_release() once done with it. */
int lp_engine_add(struct lp_engine *e, const struct lp_seq_params *p, struct lp_seq **out,
                  struct lp_err *err);
/* Stops a sequence now (LP_FINISH_ABORT unless already finished) and frees
 * its cache blocks; its tokens stay readable until release. */
void lp_engine_finish(struct lp_engine *e, struct lp_seq *s);
/* Finishes s if needed and frees it. */
void lp_engine_release(struct lp_engine *e, struct lp_seq *s);

/* True while any sequence is waiting or running. */
bool lp_engine_has_work(const struct lp_engine *e);

/* Runs one step. *outs (owned by the engine, valid until the next step)
 * lists the sampled tokens, *n_outs of them. When the backend reports an
 * error (its sticky status, checked once per step) the step fails with it,
 * and so does every later step: the engine is broken and the caller fails
 * its requests. */
int lp_engine_step(struct lp_engine *e, const struct lp_step_output **outs, int *n_outs,
                   struct lp_err *err);

/* The engine's adapter cache: load, unload and list adapters between
 * steps (lora-cache.h). */
struct lp_lora_cache *lp_engine_loras(struct lp_engine *e);

struct lp_engine_stats {
	uint64_t steps;
	uint64_t prompt_tokens;    /* tokens computed in prefill */
	uint64_t generated_tokens; /* tokens sampled */
	uint64_t preemptions;
	/* automatic prefix caching, in tokens (vLLM's prefix_cache_queries
	 * and _hits): prompt tokens looked up when a sequence was admitted,
	 * and those found in the cache (their prefill was skipped) */
	uint64_t prefix_queries;
	uint64_t prefix_hits;
	int kv_blocks_total;
	int kv_blocks_used;   /* held by waiting or running sequences */
	int kv_blocks_cached; /* free, but holding a reusable prefix */
	int running;          /* sequences */
	int waiting;
	int running_requests; /* distinct requests (lp_seq_params.group) with a running sequence */
	int waiting_requests; /* ... with none running and one waiting */
};

void lp_engine_stats(const struct lp_engine *e, struct lp_engine_stats *out);

/* The adapters of the running and of the waiting sequences, each name
 * once, comma-separated, in list order (the labels of vLLM's
 * lora_requests_info); an adapter may be in both. A list that would not
 * fit its cap (bytes, with the NUL) ends at the last name that does, and
 * the function returns false. */
bool lp_engine_adapter_lists(const struct lp_engine *e, char *running, size_t running_cap,
                             char *waiting, size_t waiting_cap);

#endif
