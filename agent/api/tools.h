/* The tool calling of a chat request: the request fields (`tools`,
 * `tool_choice`, `parallel_tool_calls`), the grammar that forces a call
 * when the choice is "required" or a named function, and the parser that
 * turns the model's output into content and calls, incrementally for
 * streaming (docs/api.md, "Tool calling: the request and the response").
 *
 * The model writes calls in its chat template's format:
 *
 *   HERMES   <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>
 *            one block per call, "\n" between blocks; content may come
 *            before the first block
 *   LLAMA31  {"name": "f", "parameters": {...}}   (the whole output; one
 *            call; "arguments" accepted too)
 *   MISTRAL  [TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]
 *   NONE     (a template without a tool format; "required" and named
 *            choices only) [{"name": "f", "arguments": {...}}, ...]
 *
 * Runs on the HTTP thread; nothing here touches the engine. */
#ifndef LP_API_TOOLS_H
#define LP_API_TOOLS_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "agent/api/errors.h"
#include "agent/engine/chat-template.h"
#include "common/buf.h"
#include "common/err.h"

#define LP_TOOLS_MAX         128                /* function definitions in one request */
#define LP_TOOL_NAME_MAX     64                 /* bytes of a function name, [a-zA-Z0-9_-] */
#define LP_TOOLS_MAX_CALLS   64                 /* calls the parser takes from one output */
#define LP_TOOLS_GRAMMAR_MAX ((size_t)4 << 20)  /* bytes of a grammar text */
#define LP_TOOLS_TEXT_MAX    ((size_t)64 << 20) /* bytes of output a parser holds */
#define LP_TOOL_ID_MAX       32                 /* bytes of a call id with its NUL */

enum lp_tool_choice {
	LP_TOOL_CHOICE_NONE,     /* no calls: the output is content */
	LP_TOOL_CHOICE_AUTO,     /* the model chooses; its output is parsed */
	LP_TOOL_CHOICE_REQUIRED, /* at least one call, forced by a grammar */
	LP_TOOL_CHOICE_NAMED,    /* one call of tools[named], forced by a grammar */
};

struct lp_tool {
	char name[LP_TOOL_NAME_MAX + 1];
	json_t *parameters; /* the JSON Schema (a reference, owned); never NULL:
	                       {"type": "object", "properties": {}} when absent */
	bool strict;        /* as sent; the grammar is exact either way */
};

struct lp_tools {
	struct lp_tool *tools; /* [n], owned */
	size_t n;
	json_t *json; /* the request's "tools" array (a reference, owned),
	                 for the chat template; NULL without tools */
	enum lp_tool_choice choice;
	size_t named;           /* LP_TOOL_CHOICE_NAMED: the index in tools */
	bool parallel;          /* more than one call allowed (parallel_tool_calls,
	                           always false for LLAMA31) */
	enum lp_chat_tools fmt; /* the template's format the request was parsed for */
	char *grammar;          /* REQUIRED and NAMED: lp_tools_grammar's text, NUL-
	                           terminated (owned); NULL otherwise */
	size_t grammar_len;
};

/* Reads `tools`, `tool_choice` and `parallel_tool_calls` of a chat request
 * body (borrowed) for a template whose tool format is fmt, into out
 * (zeroed first; release it with lp_tools_release, after an error too).
 * Defaults as OpenAI's: "auto" with tools, "none" without; an empty
 * `tools` array is no tools. For "required" and a named function the
 * grammar is built (out->grammar). The legacy `functions` and
 * `function_call` are refused. Returns 0, or a negative status with e
 * filled (400 naming the field in param, e.g. "tools[2].function.name";
 * 500 out of memory). */
int lp_tools_parse(json_t *body, enum lp_chat_tools fmt, struct lp_tools *out,
                   struct lp_api_error *e);
void lp_tools_release(struct lp_tools *t);

/* Appends to out a complete grammar (agent/engine/grammar.h, with `root`)
 * for t's choice (REQUIRED or NAMED) in format fmt: the format's syntax,
 * a name among the allowed ones, arguments valid against that function's
 * parameters (agent/engine/json-schema.h), at least one call, exactly one
 * unless t->parallel and the choice is REQUIRED. -EINVAL when a schema is
 * refused: err's message starts with "tools[i].function.parameters: ".
 * -EINVAL too for another choice. -E2BIG past LP_TOOLS_GRAMMAR_MAX. The
 * [TOOL_CALLS] marker of MISTRAL is a special token, which no grammar
 * can produce: MISTRAL's grammar is the bare JSON array. */
int lp_tools_grammar(const struct lp_tools *t, enum lp_chat_tools fmt, struct lp_buf *out,
                     struct lp_err *err);

/* ---- the output parser ---- */

enum lp_tool_event_type {
	LP_TOOL_EVENT_CONTENT,    /* text: content that can go out now */
	LP_TOOL_EVENT_CALL_BEGIN, /* index, id, name: a new call, with no arguments yet */
	LP_TOOL_EVENT_ARGUMENTS,  /* index, text: the next piece of that call's arguments */
};

struct lp_tool_event {
	enum lp_tool_event_type type;
	size_t index;     /* CALL_BEGIN, ARGUMENTS: the call's index, from 0 */
	const char *id;   /* CALL_BEGIN: NUL-terminated */
	const char *name; /* CALL_BEGIN: NUL-terminated */
	const char *text; /* CONTENT, ARGUMENTS: text[0..len), not NUL-terminated */
	size_t len;
};

/* One output's text turned into content and calls. Calls are read one
 * after another; text that starts a call but is not a valid one (bad
 * JSON, an unknown function, an unknown member, a second call when
 * parallel calls are off) is content, with all the text after it; calls
 * read before it stay. With "auto" a call's events go out once its
 * whole block has been read (so that an invalid block can still become
 * content); with "required" and a named function (whose grammar
 * guarantees a valid output) CALL_BEGIN goes out as soon as the name is
 * read and the arguments as they are generated. Whitespace around and
 * between calls is dropped. */
struct lp_tool_parser;

/* A parser for the output of a request whose tools t (borrowed; must
 * outlive the parser) were parsed by lp_tools_parse. With t->choice NONE
 * every text is content. Call ids come from getrandom(). *out is freed
 * with lp_tool_parser_free. */
int lp_tool_parser_new(struct lp_tool_parser **out, const struct lp_tools *t, struct lp_err *err);
void lp_tool_parser_free(struct lp_tool_parser *p);

/* Feeds the next piece of text (text[0..len), borrowed; pieces may cut
 * anywhere, even inside a UTF-8 character); *ev and *n_ev get the events
 * it produced, in order (the parser's memory, valid until the next feed
 * or finish; texts point into the parser). An event's text ends where a
 * piece ends or next to an ASCII byte of the call syntax, so pieces of
 * whole UTF-8 characters give events of whole characters. -E2BIG past
 * LP_TOOLS_TEXT_MAX bytes in all, -ENOMEM; the parser is unusable after
 * an error. */
int lp_tool_parser_feed(struct lp_tool_parser *p, const char *text, size_t len,
                        const struct lp_tool_event **ev, size_t *n_ev, struct lp_err *err);
/* At the end of the output: the last events. Held text goes out (as
 * content, except whitespace after a call); a call block cut short by the
 * end is content with "auto", except one whose JSON is complete (Hermes'
 * closing tag may be missing); with a grammar a call whose name was read
 * is kept with the arguments generated so far (finish_reason "length"). */
int lp_tool_parser_finish(struct lp_tool_parser *p, const struct lp_tool_event **ev, size_t *n_ev,
                          struct lp_err *err);

/* After finish (or during, for what went out so far): the calls made
 * (finish_reason "tool_calls" when there is one), call i's id, name and
 * arguments (the JSON text as generated, not reformatted; "{}" for a call
 * without arguments), and all the content as one text. Pointers into the
 * parser, valid until it is freed; content may be "" (never NULL). */
size_t lp_tool_parser_n_calls(const struct lp_tool_parser *p);
void lp_tool_parser_call(const struct lp_tool_parser *p, size_t i, const char **id,
                         const char **name, const char **args, size_t *args_len);
const char *lp_tool_parser_content(const struct lp_tool_parser *p, size_t *len);

/* The message's "tool_calls" after finish: [{"id", "type": "function",
 * "function": {"name", "arguments"}}, ...] (a new reference, the caller
 * decrefs; NULL when out of memory). Bytes of the arguments that are not
 * UTF-8 become '?'. */
json_t *lp_tool_parser_calls_json(const struct lp_tool_parser *p);
/* The entry of a streamed delta's "tool_calls" for a CALL_BEGIN event,
 * {"index", "id", "type": "function", "function": {"name", "arguments":
 * ""}}, or an ARGUMENTS event, {"index", "function": {"arguments": TEXT}}
 * (a new reference, the caller decrefs); NULL for CONTENT or out of
 * memory. */
json_t *lp_tool_event_json(const struct lp_tool_event *ev);

#endif
