/* Sampling of the next token from a row of logits, per request: logit bias,
 * penalties, temperature, top-k, top-p, min-p, greedy, and a seeded
 * generator (the same seed gives the same tokens). All scratch memory is allocated by
 * lp_sampler_init(); sampling itself never allocates. */
#ifndef LP_ENGINE_SAMPLER_H
#define LP_ENGINE_SAMPLER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/err.h"
#include "kernels/backend.h"

/* OpenAI's logit_bias: at most this many tokens, each bias in
 * [-LP_LOGIT_BIAS_MAX, LP_LOGIT_BIAS_MAX]. */
#define LP_MAX_LOGIT_BIAS 300
#define LP_LOGIT_BIAS_MAX 100.0f

struct lp_logit_bias {
	int32_t token;
	float bias; /* added to the token's logit */
};

struct lp_sampling_params {
	float temperature;        /* 0 = greedy */
	float top_p;              /* 1 = off */
	int top_k;                /* 0 or -1 = off */
	float min_p;              /* 0 = off */
	float presence_penalty;   /* OpenAI semantics, on generated tokens */
	float frequency_penalty;  /* OpenAI semantics, on generated tokens */
	float repetition_penalty; /* HF/vLLM semantics, prompt and generated; 1 = off */
	bool has_seed;
	uint64_t seed;
	/* Added to the logits before everything else (the penalties too, as
	 * vLLM does); distinct tokens. Logprobs stay those of the raw logits. */
	int n_logit_bias;
	struct lp_logit_bias logit_bias[LP_MAX_LOGIT_BIAS];
};

/* Defaults: temperature 1, top_p 1, top_k off, min_p 0, penalties off,
 * no logit bias, no seed. */
void lp_sampling_params_default(struct lp_sampling_params *p);
/* -EINVAL with the offending field named for values out of range
 * (temperature < 0, top_p not in (0, 1], min_p not in [0, 1],
 * penalties outside [-2, 2], repetition_penalty <= 0; more than
 * LP_MAX_LOGIT_BIAS bias entries, a negative or repeated token, a bias
 * outside [-100, 100]). */
int lp_sampling_params_check(const struct lp_sampling_params *p, struct lp_err *err);

struct lp_sampler {
	struct lp_sampling_params p;
	int vocab;
	uint64_t rng[4];    /* xoshiro256** state */
	int32_t *counts;    /* [vocab] occurrences in the generated tokens */
	uint8_t *in_prompt; /* [vocab] 1 if the token occurs in the prompt */
	int32_t *seen;      /* [vocab] the distinct tokens of prompt and output */
	int n_seen;
	int32_t *idx; /* [vocab] scratch */
	float *probs; /* [vocab] scratch */
	float *bias;  /* [vocab] each token's logit bias, or NULL without any */
};

/* Allocates scratch for a vocabulary of vocab tokens and seeds the
 * generator (from p->seed, or from the clock when !p->has_seed).
 * -EINVAL for parameters out of range, a logit bias token outside the
 * vocabulary included. */
int lp_sampler_init(struct lp_sampler *s, const struct lp_sampling_params *p, int vocab,
                    struct lp_err *err);
void lp_sampler_release(struct lp_sampler *s);
/* Records the prompt, for the repetition penalty. */
void lp_sampler_set_prompt(struct lp_sampler *s, const int32_t *ids, size_t n);
/* Records a generated token, for the penalties. */
void lp_sampler_accept(struct lp_sampler *s, int32_t id);
/* Picks the next token; logits [vocab] are modified in place. */
int32_t lp_sampler_sample(struct lp_sampler *s, float *logits);
/* True when the request has penalties or a logit bias: a device's sample
 * op then needs the request's entries (lp_sampler_penalty_entries). */
bool lp_sampler_has_penalties(const struct lp_sampler *s);
/* The entries a device's sample op takes to apply this request's
 * penalties and logit bias (kernels/backend.h, struct lp_sample_penalty;
 * one per distinct token), at most cap: how many, or -1 when more than
 * cap are needed. */
int lp_sampler_penalty_entries(const struct lp_sampler *s, struct lp_sample_penalty *out, int cap);
/* The uniform number in [0, 1) that lp_sampler_sample would draw next
 * (advancing the generator), for a device's sample op. */
double lp_sampler_uniform(struct lp_sampler *s);
/* The log-softmax of logits[tok] and the n (<= the arrays' size) most
 * likely tokens, best first (ties: lower id), with theirs. */
void lp_logprobs(const float *logits, int vocab, int32_t tok, int n, float *logprob,
                 int32_t *top_ids, float *top_logprobs, int *n_top);

/* Stop strings over streamed text: feed the generated text piece by piece;
 * the matcher says how much of it can be emitted now (text that may be the
 * start of a stop string is held back) and whether a stop string matched
 * (the emitted text then ends just before it, as OpenAI's API does). */
struct lp_stop_matcher {
	char **stops; /* owned copies */
	size_t n_stops;
	size_t max_len;
	char *held; /* text not yet emitted, at most max_len bytes + one piece */
	size_t held_len, held_cap;
	bool matched;
};

int lp_stop_matcher_init(struct lp_stop_matcher *m, const char *const *stops, size_t n,
                         struct lp_err *err);
void lp_stop_matcher_release(struct lp_stop_matcher *m);
/* Adds piece; writes to *emit and *emit_len the text that may now be sent (a
 * pointer into the matcher's memory, valid until the next call). Returns
 * true when a stop string matched; no more text should be fed then. */
bool lp_stop_matcher_feed(struct lp_stop_matcher *m, const char *piece, size_t len,
                          const char **emit, size_t *emit_len);
/* At the end of generation: the held text that can still be sent. */
void lp_stop_matcher_finish(struct lp_stop_matcher *m, const char **emit, size_t *emit_len);

#endif
