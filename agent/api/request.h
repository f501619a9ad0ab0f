/* Parsing and validation of the bodies of POST /v1/completions and
 * POST /v1/chat/completions into one request description, with the
 * prompt(s) tokenized (and the prompt builders POST /tokenize shares). Every field is type- and
 * range-checked; a bad one is a 400 naming it in `param`. Unknown fields are ignored, as OpenAI
 * clients send extras. Runs on the HTTP thread; reads the model's
 * tokenizer and chat template, which are immutable. */
#ifndef LP_API_REQUEST_H
#define LP_API_REQUEST_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "agent/api/errors.h"
#include "agent/api/tools.h"
#include "agent/engine/chat-template.h"
#include "agent/engine/grammar-cache.h"
#include "agent/engine/grammar.h"
#include "agent/engine/model.h"
#include "agent/engine/sampler.h"
#include "agent/engine/tokenizer.h"
#include "agent/engine/worker.h"

#define LP_GEN_MAX_PROMPTS  64  /* prompts in one completions request */
#define LP_GEN_MAX_N        16  /* choices per prompt */
#define LP_GEN_MAX_CHOICES  128 /* prompts x n */
#define LP_GEN_MAX_STOPS    16
#define LP_GEN_MAX_MESSAGES 4096
#define LP_GEN_MAX_MODEL    255 /* bytes of a model name */

struct lp_gen_prompt {
	struct lp_tokens ids; /* what the engine runs */
	char *text;           /* the prompt as text, for echo (owned) */
	size_t text_len;
};

struct lp_gen_request {
	bool chat;
	char model[LP_GEN_MAX_MODEL + 1];
	struct lp_gen_prompt *prompts; /* [n_prompts], owned */
	size_t n_prompts;
	int max_tokens; /* new tokens per choice, >= 1 */
	int n;          /* choices per prompt */
	bool stream;
	bool include_usage;            /* stream_options.include_usage */
	int logprobs;                  /* -1: none; else alternatives per token (0..20) */
	bool echo;                     /* completions: prompt text before the completion */
	char *stops[LP_GEN_MAX_STOPS]; /* owned */
	size_t n_stops;
	struct lp_sampling_params sampling;
	bool ignore_eos;
	bool skip_special; /* special tokens produce no text (default true) */
	/* constrained decoding from response_format (json_object,
	 * json_schema) or a forced tool call, or NULL; owned (one reference) */
	struct lp_grammar *grammar;
	struct lp_tools tools; /* chat: tools, tool_choice, parallel_tool_calls */
};

/* Context the parser needs: the model (tokenizer, vocabulary), its chat
 * template (NULL: chat requests are refused) and the context length. */
struct lp_gen_limits {
	const struct lp_model *model;
	const struct lp_chat_template *chat;
	int max_model_len;
	/* parsed grammars shared between requests (NULL: parse each time) */
	struct lp_grammar_cache *grammars;
};

/* Parses body (borrowed) into r (released first by the caller with
 * lp_gen_request_release, or zeroed). Returns 0, or a negative status
 * with e filled (400 for a bad field). */
int lp_gen_request_parse(struct lp_gen_request *r, json_t *body, bool chat,
                         const struct lp_gen_limits *lim, struct lp_api_error *e);
void lp_gen_request_release(struct lp_gen_request *r);

/* One prompt built alone (POST /tokenize and /detokenize, tokenize.c), the
 * way the parser above builds those of completion and chat requests. p
 * starts zeroed; free it with lp_gen_prompt_release, after an error too.
 * Each returns 0, or a negative status with e filled (400 naming param). */

/* s[0..len) (borrowed) as a completions prompt: special tokens written in
 * it are recognised; the model's BOS/EOS are added when add_special (HF's
 * add_special_tokens; completions always do). */
int lp_gen_prompt_text(struct lp_gen_prompt *p, const struct lp_gen_limits *lim, const char *s,
                       size_t len, bool add_special, const char *param, struct lp_api_error *e);
/* messages (a JSON array of chat messages, borrowed; NULL: missing; roles
 * system/developer/user/assistant (with tool_calls)/tool) and tools
 * (borrowed; NULL: none) rendered with lim->chat (a template without a
 * tool format uses the generic one when a call is forced or tool turns
 * come), ending with the assistant's header when
 * add_generation_prompt (chat completions always do), then tokenized with
 * BOS/EOS added on top of the template's own when add_special (chat
 * completions never do). */
int lp_gen_prompt_messages(struct lp_gen_prompt *p, json_t *messages,
                           const struct lp_gen_limits *lim, const struct lp_tools *tools,
                           bool add_generation_prompt, bool add_special, struct lp_api_error *e);
/* ids (a JSON array of token ids, borrowed), each in the vocabulary; the
 * text is their decoding, special tokens written out unless skip_special.
 * An empty array is an empty prompt. */
int lp_gen_prompt_ids(struct lp_gen_prompt *p, json_t *ids, const struct lp_gen_limits *lim,
                      bool skip_special, const char *param, struct lp_api_error *e);
void lp_gen_prompt_release(struct lp_gen_prompt *p);

#endif
