/* Chat templates of the supported model families, rendered in C: the
 * family is detected from the model's Jinja template string (or named by
 * flag), and its fixed format reproduces what the template renders with
 * transformers' apply_chat_template. */
#ifndef LP_ENGINE_CHAT_TEMPLATE_H
#define LP_ENGINE_CHAT_TEMPLATE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "common/buf.h"
#include "common/err.h"

enum lp_chat_style {
	LP_CHAT_CHATML,     /* <|im_start|>role\n...<|im_end|>\n (SmolLM2, Qwen) */
	LP_CHAT_LLAMA3,     /* <|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|> */
	LP_CHAT_LLAMA2,     /* <s>[INST] <<SYS>>\n...\n<</SYS>>\n\n... [/INST] ... </s> */
	LP_CHAT_MISTRAL,    /* <s>[INST] ... [/INST]...</s> (system folded into first user turn) */
	LP_CHAT_QWEN3,      /* ChatML; assistant turns after the last user query keep a
	                       <think> block, earlier ones lose theirs (Qwen3) */
	LP_CHAT_GEMMA,      /* <bos><start_of_turn>user\n...<end_of_turn>\n, assistant
	                       turns as "model", system prompt opening the first user
	                       turn (Gemma 3) */
	LP_CHAT_LLAMA31,    /* Llama 3 headers after a system turn that always
	                       carries "Cutting Knowledge Date" and "Today Date"
	                       (Llama 3.1, 3.2, 3.3) */
	LP_CHAT_MISTRAL_V3, /* <s>[INST] ...[/INST] ...</s>, system prompt in the
	                       last user turn (Mistral 7B Instruct v0.3) */
};

/* How a template writes tool definitions, tool calls and tool results
 * (docs/api.md, "Tool calling: templates"). */
enum lp_chat_tools {
	LP_CHAT_TOOLS_NONE,    /* the template has none */
	LP_CHAT_TOOLS_HERMES,  /* Qwen2.5, Qwen3: <tools> in the system turn,
	                          <tool_call> blocks, <tool_response> user turns */
	LP_CHAT_TOOLS_LLAMA31, /* "Environment: ipython", tools as JSON in the
	                          first user turn, {"name", "parameters"} calls,
	                          results as ipython turns */
	LP_CHAT_TOOLS_MISTRAL, /* [AVAILABLE_TOOLS], [TOOL_CALLS], [TOOL_RESULTS] */
};

struct lp_chat_template {
	enum lp_chat_style style;
	enum lp_chat_tools tools;
	bool date_today;      /* LP_CHAT_LLAMA31: "Today Date" is the day of the
	                         render (Llama 3.2's strftime_now), not the
	                         template's fixed 26 Jul 2024 (Llama 3.1's) */
	char *default_system; /* system prompt the template adds when none is
	                         given (SmolLM2's, Qwen2.5's), or NULL; owned */
	char *bos;            /* BOS text the template writes, or NULL; owned */
	char *eos;            /* EOS text the template writes, or NULL; owned */
};

/* One call an assistant message made, as OpenAI's tool_calls[] entry holds
 * it: {"id", "type": "function", "function": {"name", "arguments"}}. */
struct lp_chat_tool_call {
	const char *id;        /* may be NULL (Mistral's template needs one) */
	const char *name;      /* the function's name */
	const char *arguments; /* JSON text of an object, as OpenAI sends it */
};

/* All pointers borrowed. */
struct lp_chat_message {
	const char *role;                           /* "system", "user", "assistant" or "tool" */
	const char *content;                        /* may be NULL for an assistant turn that only
	                                               calls tools */
	const struct lp_chat_tool_call *tool_calls; /* assistant only */
	size_t n_tool_calls;                        /* 0: no tool calls */
	const char *tool_call_id;                   /* tool: the call this is the result of */
	const char *name;                           /* tool: the function's name, or NULL */
};

/* Detects the family of a Jinja template string; -ENOTSUP with a clear
 * message when it matches none. bos/eos are the tokenizer's special token
 * texts (may be NULL). Release with lp_chat_template_release(). */
int lp_chat_template_detect(struct lp_chat_template *ct, const char *jinja, const char *bos,
                            const char *eos, struct lp_err *err);
/* Picks a family by name: chatml, llama3, llama2, mistral, qwen3, gemma,
 * llama3.1, mistral-v0.3 (the last three with their tool formats). */
int lp_chat_template_from_name(struct lp_chat_template *ct, const char *name, const char *bos,
                               const char *eos, struct lp_err *err);
void lp_chat_template_release(struct lp_chat_template *ct);

/* Renders messages (appending to out) as the template does with
 * add_generation_prompt, with tools (the request's "tools" array, as OpenAI
 * sends it: [{"type": "function", "function": {"name", "description",
 * "parameters"}}]; borrowed; NULL or empty: no tools). A tool call's
 * arguments are parsed and written again the way the template's tojson
 * writes them (Python's json.dumps), except by Qwen3's template, which
 * writes them as given. Errors leave out as it was:
 * -EINVAL for an unknown role, a malformed tool or tool call, or an order
 * or value the family's template rejects (Llama 2/Mistral need
 * user/assistant to alternate; Llama 3.1 takes one call per message;
 * Mistral v0.3 needs 9-character call ids); -ENOTSUP when tools, tool
 * calls or tool results meet a template without a tool format
 * (LP_CHAT_TOOLS_NONE). */
int lp_chat_template_render(const struct lp_chat_template *ct, const struct lp_chat_message *msgs,
                            size_t n, const json_t *tools, bool add_generation_prompt,
                            struct lp_buf *out, struct lp_err *err);

/* Renders with loraplane's generic tool format, for any template (meant for
 * those with LP_CHAT_TOOLS_NONE): the functions and the call syntax go into
 * the system message as text, tool calls into assistant turns as the JSON
 * array the model is asked to answer with, [{"name": ..., "arguments":
 * {...}}, ...], and tool results into user turns ("Result of NAME (call
 * ID): CONTENT"); then the conversation is rendered by the template without
 * tools. Arguments and errors as lp_chat_template_render (never -ENOTSUP). */
int lp_chat_template_render_generic_tools(const struct lp_chat_template *ct,
                                          const struct lp_chat_message *msgs, size_t n,
                                          const json_t *tools, bool add_generation_prompt,
                                          struct lp_buf *out, struct lp_err *err);

/* Appends v as Python's json.dumps(v, ensure_ascii=False) writes it (what
 * transformers' tojson filter gives): ", " and ": " between items, or with
 * indent > 0 one item per line ("," and ": "); keys in the object's order;
 * floats as Python's repr (0.5, 1e-07, 1e+16, 100.0). */
int lp_chat_tojson(const json_t *v, int indent, struct lp_buf *out, struct lp_err *err);

#endif
