/* Chat templates of the supported model families, rendered in C: the
 * family is detected from the model's Jinja template string (or named by
 * flag), and its fixed format reproduces what the template renders with
 * transformers' apply_chat_template. */
#ifndef LP_ENGINE_CHAT_TEMPLATE_H
#define LP_ENGINE_CHAT_TEMPLATE_H

#include <stdbool.h>
#include <stddef.h>

#include "common/buf.h"
#include "common/err.h"

enum lp_chat_style {
	LP_CHAT_CHATML,  /* <|im_start|>role\n...<|im_end|>\n (SmolLM2, Qwen) */
	LP_CHAT_LLAMA3,  /* <|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|> */
	LP_CHAT_LLAMA2,  /* <s>[INST] <<SYS>>\n...\n<</SYS>>\n\n... [/INST] ... </s> */
	LP_CHAT_MISTRAL, /* <s>[INST] ... [/INST]...</s> (system folded into first user turn) */
	LP_CHAT_QWEN3,   /* ChatML; assistant turns after the last user query keep a
	                    <think> block, earlier ones lose theirs (Qwen3) */
	LP_CHAT_GEMMA,   /* <bos><start_of_turn>user\n...<end_of_turn>\n, assistant
	                    turns as "model", system prompt opening the first user
	                    turn (Gemma 3) */
};

struct lp_chat_template {
	enum lp_chat_style style;
	char *default_system; /* system prompt the template adds when none is
	                         given (SmolLM2's, Qwen2.5's), or NULL; owned */
	char *bos;            /* BOS text the template writes, or NULL; owned */
	char *eos;            /* EOS text the template writes, or NULL; owned */
};

struct lp_chat_message {
	const char *role; /* "system", "user" or "assistant" */
	const char *content;
};

/* Detects the family of a Jinja template string; -ENOTSUP with a clear
 * message when it matches none. bos/eos are the tokenizer's special token
 * texts (may be NULL). Release with lp_chat_template_release(). */
int lp_chat_template_detect(struct lp_chat_template *ct, const char *jinja, const char *bos,
                            const char *eos, struct lp_err *err);
/* Picks a family by name: chatml, llama3, llama2, mistral, qwen3, gemma. */
int lp_chat_template_from_name(struct lp_chat_template *ct, const char *name, const char *bos,
                               const char *eos, struct lp_err *err);
void lp_chat_template_release(struct lp_chat_template *ct);

/* Renders messages (appending to out) as the template does with
 * add_generation_prompt. -EINVAL for an unknown role or an order the
 * family's template rejects (Llama 2/Mistral need user/assistant to
 * alternate). */
int lp_chat_template_render(const struct lp_chat_template *ct, const struct lp_chat_message *msgs,
                            size_t n, bool add_generation_prompt, struct lp_buf *out,
                            struct lp_err *err);

#endif
