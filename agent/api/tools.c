/* Tool calling of chat requests; see tools.h.
 *
 * The parser is a byte-at-a-time state machine, so that text cut at any
 * place gives the same events. Outside a call it looks for the format's
 * marker (holding back text that may be its start, as the stop matcher
 * does); inside it reads the call's JSON with a small validating scanner
 * that reports where the members of each call object begin and end. */
#include "agent/api/tools.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "agent/engine/json-schema.h"

/* ---- request fields ---- */

static json_t *field(json_t *obj, const char *key)
{
	json_t *v = json_object_get(obj, key);

	return v && !json_is_null(v) ? v : NULL;
}

static bool name_ok(const char *s, size_t n)
{
	if (n == 0 || n > LP_TOOL_NAME_MAX)
		return false;
	for (size_t i = 0; i < n; i++) {
		char c = s[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '_' || c == '-'))
			return false;
	}
	return true;
}

static int find_tool(const struct lp_tools *t, const char *s, size_t n)
{
	for (size_t i = 0; i < t->n; i++)
		if (strlen(t->tools[i].name) == n && !memcmp(t->tools[i].name, s, n))
			return (int)i;
	return -1;
}

static int parse_tool(struct lp_tools *out, json_t *item, size_t i, struct lp_api_error *e)
{
	struct lp_tool *tool = &out->tools[i];
	json_t *type, *fn, *name, *v;
	char p[LP_API_PARAM_MAX];

	snprintf(p, sizeof(p), "tools[%zu]", i);
	if (!json_is_object(item))
		return lp_api_errorf(e, 400, "invalid_type", p, "'%s' must be an object", p);
	snprintf(p, sizeof(p), "tools[%zu].type", i);
	type = field(item, "type");
	if (!type)
		return lp_api_errorf(e, 400, "missing_required_parameter", p, "'%s' is required",
		                     p);
	if (!json_is_string(type) || strcmp(json_string_value(type), "function"))
		return lp_api_errorf(e, 400, "invalid_value", p,
		                     "'%s' must be 'function', the only tool type supported", p);
	snprintf(p, sizeof(p), "tools[%zu].function", i);
	fn = field(item, "function");
	if (!fn)
		return lp_api_errorf(e, 400, "missing_required_parameter", p, "'%s' is required",
		                     p);
	if (!json_is_object(fn))
		return lp_api_errorf(e, 400, "invalid_type", p, "'%s' must be an object", p);
	snprintf(p, sizeof(p), "tools[%zu].function.name", i);
	name = field(fn, "name");
	if (!name)
		return lp_api_errorf(e, 400, "missing_required_parameter", p, "'%s' is required",
		                     p);
	if (!json_is_string(name))
		return lp_api_errorf(e, 400, "invalid_type", p, "'%s' must be a string", p);
	if (!name_ok(json_string_value(name), json_string_length(name))) {
		char shown[LP_TOOL_NAME_MAX + 8];
		snprintf(shown, sizeof(shown), "%.*s%s", LP_TOOL_NAME_MAX, json_string_value(name),
		         json_string_length(name) > LP_TOOL_NAME_MAX ? "..." : "");
		lp_api_utf8_sanitize(shown);
		return lp_api_errorf(e, 400, "invalid_value", p,
		                     "'%s' is '%s': a name is 1 to %d characters a-z, A-Z, "
		                     "0-9, '_' or '-'",
		                     p, shown, LP_TOOL_NAME_MAX);
	}
	if (find_tool(out, json_string_value(name), json_string_length(name)) >= 0)
		return lp_api_errorf(e, 400, "invalid_value", p,
		                     "'%s' is '%s', the name of an earlier tool: names must differ",
		                     p, json_string_value(name));
	snprintf(p, sizeof(p), "tools[%zu].function.description", i);
	v = field(fn, "description");
	if (v && !json_is_string(v))
		return lp_api_errorf(e, 400, "invalid_type", p, "'%s' must be a string", p);
	snprintf(p, sizeof(p), "tools[%zu].function.strict", i);
	v = field(fn, "strict");
	if (v && !json_is_boolean(v))
		return lp_api_errorf(e, 400, "invalid_type", p, "'%s' must be a boolean", p);
	tool->strict = json_is_true(v);
	snprintf(p, sizeof(p), "tools[%zu].function.parameters", i);
	v = field(fn, "parameters");
	if (v && !json_is_object(v))
		return lp_api_errorf(e, 400, "invalid_type", p, "'%s' must be a JSON Schema object",
		                     p);
	tool->parameters =
	    v ? json_incref(v) : json_pack("{s:s, s:{}}", "type", "object", "properties");
	if (!tool->parameters)
		return lp_api_errorf(e, 500, NULL, NULL, "out of memory");
	snprintf(tool->name, sizeof(tool->name), "%s", json_string_value(name));
	out->n = i + 1;
	return 0;
}

static int parse_choice(struct lp_tools *out, json_t *tc, struct lp_api_error *e)
{
	json_t *type, *fn, *name;
	int k;

	if (json_is_string(tc)) {
		const char *s = json_string_value(tc);
		if (!strcmp(s, "none"))
			out->choice = LP_TOOL_CHOICE_NONE;
		else if (!strcmp(s, "auto"))
			out->choice = LP_TOOL_CHOICE_AUTO;
		else if (!strcmp(s, "required"))
			out->choice = LP_TOOL_CHOICE_REQUIRED;
		else
			return lp_api_errorf(e, 400, "invalid_value", "tool_choice",
			                     "'tool_choice' must be 'none', 'auto', 'required' or "
			                     "{\"type\": \"function\", \"function\": {\"name\": "
			                     "...}}");
		return 0;
	}
	if (!json_is_object(tc))
		return lp_api_errorf(e, 400, "invalid_type", "tool_choice",
		                     "'tool_choice' must be a string or an object");
	type = field(tc, "type");
	if (!json_is_string(type) || strcmp(json_string_value(type), "function"))
		return lp_api_errorf(e, 400, "invalid_value", "tool_choice.type",
		                     "'tool_choice.type' must be 'function'");
	fn = field(tc, "function");
	name = json_is_object(fn) ? field(fn, "name") : NULL;
	if (!json_is_string(name))
		return lp_api_errorf(e, 400, "invalid_value", "tool_choice.function.name",
		                     "'tool_choice.function.name' must be the name of a tool");
	k = find_tool(out, json_string_value(name), json_string_length(name));
	if (k < 0) {
		char shown[LP_TOOL_NAME_MAX + 8];
		snprintf(shown, sizeof(shown), "%.*s%s", LP_TOOL_NAME_MAX, json_string_value(name),
		         json_string_length(name) > LP_TOOL_NAME_MAX ? "..." : "");
		lp_api_utf8_sanitize(shown);
		return lp_api_errorf(e, 400, "invalid_value", "tool_choice.function.name",
		                     "'tool_choice.function.name' is '%s', which is not in "
		                     "'tools'",
		                     shown);
	}
	out->choice = LP_TOOL_CHOICE_NAMED;
	out->named = (size_t)k;
	return 0;
}

static int build_grammar(const struct lp_tools *t, enum lp_chat_tools fmt, struct lp_buf *out,
                         size_t *bad, struct lp_err *err);

int lp_tools_parse(json_t *body, enum lp_chat_tools fmt, struct lp_tools *out,
                   struct lp_api_error *e)
{
	json_t *tools, *tc, *pt;
	struct lp_buf g;
	struct lp_err err;
	size_t bad = 0;
	int rc;

	memset(out, 0, sizeof(*out));
	out->fmt = fmt;
	out->choice = LP_TOOL_CHOICE_NONE;
	if (field(body, "functions"))
		return lp_api_errorf(e, 400, "unsupported_parameter", "functions",
		                     "'functions' (deprecated by OpenAI) is not supported: use "
		                     "'tools'");
	if (field(body, "function_call"))
		return lp_api_errorf(e, 400, "unsupported_parameter", "function_call",
		                     "'function_call' (deprecated by OpenAI) is not supported: use "
		                     "'tool_choice'");
	tools = field(body, "tools");
	tc = field(body, "tool_choice");
	pt = field(body, "parallel_tool_calls");
	if (tools && !json_is_array(tools))
		return lp_api_errorf(e, 400, "invalid_type", "tools",
		                     "'tools' must be an array of tools");
	if (tools && json_array_size(tools) > LP_TOOLS_MAX)
		return lp_api_errorf(e, 400, "invalid_value", "tools",
		                     "'tools' has %zu tools, at most %d are allowed",
		                     json_array_size(tools), LP_TOOLS_MAX);
	if (pt && !json_is_boolean(pt))
		return lp_api_errorf(e, 400, "invalid_type", "parallel_tool_calls",
		                     "'parallel_tool_calls' must be a boolean");
	if (!tools || json_array_size(tools) == 0) {
		if (tc && !(json_is_string(tc) && !strcmp(json_string_value(tc), "none")))
			return lp_api_errorf(e, 400, "invalid_value", "tool_choice",
			                     "'tool_choice' other than 'none' needs 'tools'");
		if (pt)
			return lp_api_errorf(e, 400, "invalid_value", "parallel_tool_calls",
			                     "'parallel_tool_calls' is only allowed with 'tools'");
		return 0;
	}
	out->tools = calloc(json_array_size(tools), sizeof(*out->tools));
	if (!out->tools)
		return lp_api_errorf(e, 500, NULL, NULL, "out of memory");
	for (size_t i = 0; i < json_array_size(tools); i++)
		if ((rc = parse_tool(out, json_array_get(tools, i), i, e)))
			return rc;
	out->json = json_incref(tools);
	out->choice = LP_TOOL_CHOICE_AUTO;
	if (tc && (rc = parse_choice(out, tc, e)))
		return rc;
	out->parallel = pt ? json_is_true(pt) : true;
	if (fmt == LP_CHAT_TOOLS_LLAMA31)
		out->parallel = false; /* the template renders one call */
	if (out->choice == LP_TOOL_CHOICE_AUTO && fmt == LP_CHAT_TOOLS_NONE)
		return lp_api_errorf(e, 400, "unsupported_value", "tool_choice",
		                     "the model's chat template has no tool format, so its tool "
		                     "calls cannot be read with 'tool_choice' 'auto' (the default "
		                     "with 'tools'): use 'tool_choice' 'required' or a named "
		                     "function, or a model whose chat template defines tools");
	if (out->choice != LP_TOOL_CHOICE_REQUIRED && out->choice != LP_TOOL_CHOICE_NAMED)
		return 0;
	lp_buf_init(&g, LP_TOOLS_GRAMMAR_MAX);
	if ((rc = build_grammar(out, fmt, &g, &bad, &err))) {
		char p[LP_API_PARAM_MAX];
		lp_buf_release(&g);
		if (rc == -E2BIG)
			return lp_api_errorf(e, 400, "invalid_value", "tools",
			                     "the tools' grammar is over %zu bytes: too many or "
			                     "too large tools",
			                     LP_TOOLS_GRAMMAR_MAX);
		if (rc != -EINVAL)
			return lp_api_error_from(e, 500, NULL, NULL, &err);
		snprintf(p, sizeof(p), "tools[%zu].function.parameters", bad);
		return lp_api_error_from(e, 400, "invalid_value", p, &err);
	}
	out->grammar_len = g.len;
	out->grammar = lp_buf_detach(&g, NULL);
	return 0;
}

void lp_tools_release(struct lp_tools *t)
{
	if (t->tools)
		for (size_t i = 0; i < t->n; i++)
			json_decref(t->tools[i].parameters);
	free(t->tools);
	json_decref(t->json);
	free(t->grammar);
	memset(t, 0, sizeof(*t));
}

/* ---- grammar ---- */

static int build_grammar(const struct lp_tools *t, enum lp_chat_tools fmt, struct lp_buf *out,
                         size_t *bad, struct lp_err *err)
{
	bool named = t->choice == LP_TOOL_CHOICE_NAMED;
	bool many =
	    t->choice == LP_TOOL_CHOICE_REQUIRED && t->parallel && fmt != LP_CHAT_TOOLS_LLAMA31;
	size_t lo = named ? t->named : 0, hi = named ? t->named + 1 : t->n;
	const char *args = fmt == LP_CHAT_TOOLS_LLAMA31 ? "parameters" : "arguments";
	int rc;

	if ((t->choice != LP_TOOL_CHOICE_REQUIRED && !named) || lo >= hi || hi > t->n)
		return lp_errf(err, -EINVAL,
		               "a tool grammar needs tool_choice 'required' or a "
		               "named function");
	rc = lp_buf_appendf(out, err, "# tool calls, %s\n",
	                    named  ? "one of the named function"
	                    : many ? "one or more"
	                           : "one");
	if (rc)
		return rc;
	switch (fmt) {
	case LP_CHAT_TOOLS_HERMES:
		rc = lp_buf_appendf(
		    out, err,
		    "root ::= tools-call%s\n"
		    "tools-call ::= \"<tool_call>\\n\" tools-fn \"\\n</tool_call>\"\n",
		    many ? " ( \"\\n\" tools-call )*" : "");
		break;
	case LP_CHAT_TOOLS_LLAMA31:
		rc = lp_buf_appendf(out, err, "root ::= tools-fn\n");
		break;
	default: /* MISTRAL (its [TOOL_CALLS] is a special token), NONE */
		rc = lp_buf_appendf(out, err, "root ::= \"[\" tools-fn%s \"]\"\n",
		                    many ? " ( \", \" tools-fn )*" : "");
		break;
	}
	if (rc || (rc = lp_buf_appendf(out, err, "tools-fn ::=")))
		return rc;
	for (size_t i = lo; i < hi; i++)
		if ((rc = lp_buf_appendf(out, err, "%s tools-fn-%zu", i > lo ? " |" : "", i)))
			return rc;
	if ((rc = lp_buf_appendf(out, err, "\n")))
		return rc;
	for (size_t i = lo; i < hi; i++) {
		char prefix[32];
		rc = lp_buf_appendf(out, err,
		                    "tools-fn-%zu ::= \"{\\\"name\\\": \\\"%s\\\", \\\"%s\\\": \" "
		                    "tools-%zu-root \"}\"\n",
		                    i, t->tools[i].name, args, i);
		if (rc)
			return rc;
		snprintf(prefix, sizeof(prefix), "tools-%zu-", i);
		rc = lp_json_schema_grammar(t->tools[i].parameters, prefix, out, err);
		if (rc) {
			if (rc == -EINVAL) {
				*bad = i;
				lp_err_prefix(err, "tools[%zu].function.parameters", i);
			}
			return rc;
		}
	}
	return 0;
}

int lp_tools_grammar(const struct lp_tools *t, enum lp_chat_tools fmt, struct lp_buf *out,
                     struct lp_err *err)
{
	size_t bad;

	return build_grammar(t, fmt, out, &bad, err);
}

/* ---- the output parser ---- */

enum mode {
	M_CONTENT, /* outside calls: looking for the marker */
	M_BLOCK,   /* inside a call block */
	M_TEXT,    /* all that is left is content */
};

enum block {
	B_BEFORE, /* after the marker: whitespace, then the JSON */
	B_JSON,   /* in the JSON */
	B_CLOSE,  /* after the JSON: whitespace, then the closing marker */
};

/* The JSON scanner's states */
enum js {
	J_VALUE,     /* a value (after ':' or ',' in an array) */
	J_ARR_FIRST, /* after '[': a value or ']' */
	J_OBJ_FIRST, /* after '{': a key or '}' */
	J_KEY,       /* after ',' in an object: a key */
	J_KEYSTR,    /* in a key */
	J_COLON,     /* after a key */
	J_AFTER,     /* after a value in a container: ',' or the close */
	J_STR,       /* in a string value */
	J_NUM,       /* in a number */
	J_LIT,       /* in true, false or null */
	J_DONE,      /* the top value is complete */
};

/* J_STR and J_KEYSTR: sub is 0, ESC after a backslash, or 1..4 hex
 * digits to go after \u (as ESC + n) */
#define S_ESC 8
/* J_NUM's sub */
enum { N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP };

enum member { MB_NONE, MB_NAME, MB_ARGS, MB_TYPE, MB_ID };

#define MAX_DEPTH 128

struct fmt_info {
	const char *marker; /* starts a block, or NULL */
	const char *closer; /* ends a block after the JSON, or NULL */
	char opener;        /* the JSON's first byte: '{' one call, '[' an array of them */
	bool bare;          /* the opener at the start of the output starts a block */
};

struct lp_tool_parser {
	const struct lp_tools *t;
	struct fmt_info fi;
	bool eager;            /* calls go out as they are read (a grammar made them) */
	struct lp_buf text;    /* everything fed */
	struct lp_buf content; /* everything sent as content */
	struct lp_tool_call_rec {
		char id[LP_TOOL_ID_MAX];
		int tool;                  /* index in t->tools */
		size_t args_off, args_end; /* the arguments' bytes in text */
		bool has_args, args_ended;
		bool empty_sent;  /* no arguments member: "{}" went out */
		bool begun;       /* CALL_BEGIN went out */
		size_t args_sent; /* ARGUMENTS went out up to here (eager) */
	} calls[LP_TOOLS_MAX_CALLS];
	size_t n_calls; /* the current one included */
	size_t n_done;  /* calls of completed blocks (or begun, when eager) */
	struct lp_tool_event *ev;
	size_t n_ev, cap_ev;
	int error; /* sticky: -ENOMEM */
	uint64_t rng;

	enum mode mode;
	enum block block;
	size_t done;      /* text before this went out or was consumed */
	size_t blk_calls; /* n_calls when the block started */
	size_t mpos;      /* marker (or closer) bytes matched */
	size_t mstart;    /* where the marker's match started */
	bool after_call, at_start;
	bool blk_marked; /* the block started with the marker */

	/* the JSON scanner */
	uint8_t stack[MAX_DEPTH];
	int depth;
	enum js js;
	int sub;
	const char *lit;
	char key[16];
	size_t key_len;
	bool key_long;
	enum member member;
	unsigned seen;  /* members of the current call object (1 << member) */
	bool in_call;   /* inside a call object */
	size_t val_off; /* where the current member's value started */
	int call_depth; /* depth of the call objects: 0, or 1 in an array */
};

static const char alnum[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

static uint64_t next_rand(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static void make_id(struct lp_tool_parser *p, char *id)
{
	bool mistral = p->t->fmt == LP_CHAT_TOOLS_MISTRAL;
	size_t n = mistral ? 9 : 24, o = 0;

	if (!mistral) {
		memcpy(id, "call_", 5);
		o = 5;
	}
	for (size_t i = 0; i < n; i++)
		id[o++] = alnum[next_rand(&p->rng) % (sizeof(alnum) - 1)];
	id[o] = '\0';
}

static void add_event(struct lp_tool_parser *p, enum lp_tool_event_type type, size_t index,
                      const char *text, size_t len)
{
	struct lp_tool_event *last = p->n_ev ? &p->ev[p->n_ev - 1] : NULL;

	if (p->error)
		return;
	if (type != LP_TOOL_EVENT_CALL_BEGIN && len == 0)
		return;
	if (last && type != LP_TOOL_EVENT_CALL_BEGIN && last->type == type &&
	    last->index == index && last->text + last->len == text) {
		last->len += len;
		return;
	}
	if (p->n_ev == p->cap_ev) {
		size_t cap = p->cap_ev ? p->cap_ev * 2 : 16;
		struct lp_tool_event *ev = realloc(p->ev, cap * sizeof(*ev));
		if (!ev) {
			p->error = -ENOMEM;
			return;
		}
		p->ev = ev;
		p->cap_ev = cap;
	}
	p->ev[p->n_ev++] =
	    (struct lp_tool_event){.type = type, .index = index, .text = text, .len = len};
}

/* Sends text[from, to) as content. */
static void emit_content(struct lp_tool_parser *p, size_t from, size_t to)
{
	if (to <= from)
		return;
	if (lp_buf_append(&p->content, p->text.data + from, to - from, NULL)) {
		p->error = -ENOMEM;
		return;
	}
	add_event(p, LP_TOOL_EVENT_CONTENT, 0, p->text.data + from, to - from);
}

static void emit_begin(struct lp_tool_parser *p, size_t i)
{
	struct lp_tool_call_rec *c = &p->calls[i];

	add_event(p, LP_TOOL_EVENT_CALL_BEGIN, i, NULL, 0);
	if (!p->error) {
		p->ev[p->n_ev - 1].id = c->id;
		p->ev[p->n_ev - 1].name = p->t->tools[c->tool].name;
	}
	c->begun = true;
}

/* The whole arguments of a complete call i (after its begin). */
static void emit_all_args(struct lp_tool_parser *p, size_t i)
{
	struct lp_tool_call_rec *c = &p->calls[i];

	if (c->has_args)
		add_event(p, LP_TOOL_EVENT_ARGUMENTS, i, p->text.data + c->args_off,
		          c->args_end - c->args_off);
	else
		add_event(p, LP_TOOL_EVENT_ARGUMENTS, i, "{}", 2);
	c->args_sent = c->args_end;
	c->empty_sent = !c->has_args;
}

static bool is_ws(char c)
{
	return c == ' ' || c == '\n' || c == '\t' || c == '\r';
}

/* The text from done to upto (the end of the byte read) cannot be a
 * call: it is content, and so is all that follows. Calls that went out
 * (eager) stay. */
static void fail(struct lp_tool_parser *p, size_t upto)
{
	p->n_calls = p->n_done;
	emit_content(p, p->done, upto);
	p->done = upto;
	p->mode = M_TEXT;
	p->in_call = false;
}

static void start_block(struct lp_tool_parser *p, size_t start, bool marked)
{
	p->mode = M_BLOCK;
	p->blk_marked = marked;
	p->block = B_BEFORE;
	p->done = start;
	p->blk_calls = p->n_calls;
	p->depth = 0;
	p->js = J_VALUE;
	p->in_call = false;
	p->mpos = 0;
}

/* The block is complete up to end. */
static void block_done(struct lp_tool_parser *p, size_t end)
{
	if (p->n_calls == p->blk_calls) {
		fail(p, end); /* "[]": no call */
		return;
	}
	for (size_t i = p->n_done; i < p->n_calls; i++) {
		if (!p->calls[i].begun) {
			emit_begin(p, i);
			emit_all_args(p, i);
		}
	}
	p->n_done = p->n_calls;
	p->done = end;
	p->mode = M_CONTENT;
	p->after_call = true;
	p->at_start = false;
	p->mpos = 0;
}

static void commit(struct lp_tool_parser *p)
{
	size_t i = p->n_calls - 1;
	struct lp_tool_call_rec *c = &p->calls[i];

	emit_begin(p, i);
	if (c->has_args && c->args_ended)
		emit_all_args(p, i);
	p->n_done = p->n_calls;
}

/* ---- the scanner's hooks: false ends the block ---- */

static bool on_value_begin(struct lp_tool_parser *p, size_t off, char c)
{
	int d = p->depth;
	struct lp_tool_call_rec *cur;

	if (d == p->call_depth) {
		if (c != '{' || p->n_calls == LP_TOOLS_MAX_CALLS ||
		    (!p->t->parallel && p->n_calls > 0))
			return false;
		cur = &p->calls[p->n_calls++];
		memset(cur, 0, sizeof(*cur));
		cur->tool = -1;
		make_id(p, cur->id);
		p->in_call = true;
		p->seen = 0;
		return true;
	}
	if (d != p->call_depth + 1 || !p->in_call)
		return true;
	cur = &p->calls[p->n_calls - 1];
	p->val_off = off;
	switch (p->member) {
	case MB_NAME:
	case MB_TYPE:
	case MB_ID:
		return c == '"';
	case MB_ARGS:
		if (c != '{')
			return false;
		cur->has_args = true;
		cur->args_off = off;
		cur->args_sent = off;
		return true;
	default:
		return false;
	}
}

static bool on_key(struct lp_tool_parser *p)
{
	enum member m = MB_NONE;

	if (p->depth != p->call_depth + 1 || !p->in_call)
		return true;
	if (!p->key_long) {
		p->key[p->key_len] = '\0';
		if (!strcmp(p->key, "name"))
			m = MB_NAME;
		else if (!strcmp(p->key, "arguments") ||
		         (p->t->fmt == LP_CHAT_TOOLS_LLAMA31 && !strcmp(p->key, "parameters")))
			m = MB_ARGS;
		else if (!strcmp(p->key, "type"))
			m = MB_TYPE;
		else if (!strcmp(p->key, "id"))
			m = MB_ID; /* Mistral's calls may carry one: ours replaces it */
	}
	if (m == MB_NONE || (p->seen & (1u << m)))
		return false;
	p->seen |= 1u << m;
	p->member = m;
	return true;
}

static bool on_value_end(struct lp_tool_parser *p, size_t end)
{
	int d = p->depth;
	struct lp_tool_call_rec *cur;

	if (!p->in_call || (d != p->call_depth && d != p->call_depth + 1))
		return true;
	cur = &p->calls[p->n_calls - 1];
	if (d == p->call_depth) {
		/* the call object ends */
		p->in_call = false;
		if (cur->tool < 0)
			return false;
		/* a block without a marker needs the arguments member to be a call */
		if (!cur->has_args && !p->blk_marked)
			return false;
		if (p->eager) {
			if (!cur->has_args)
				emit_all_args(p, p->n_calls - 1);
			p->done = end;
		}
		return true;
	}
	switch (p->member) {
	case MB_NAME: {
		const char *s = p->text.data + p->val_off + 1;
		size_t n = end - p->val_off - 2;
		int k;
		if (!name_ok(s, n) || (k = find_tool(p->t, s, n)) < 0)
			return false;
		if (p->t->choice == LP_TOOL_CHOICE_NAMED && (size_t)k != p->t->named)
			return false;
		cur->tool = k;
		if (p->eager) {
			commit(p);
			p->done = end;
		}
		return true;
	}
	case MB_TYPE:
		return end - p->val_off == 10 &&
		       !memcmp(p->text.data + p->val_off, "\"function\"", 10);
	case MB_ARGS:
		cur->args_end = end;
		cur->args_ended = true;
		return true;
	case MB_ID:
		return true;
	default:
		return false;
	}
}

/* ---- the JSON scanner ---- */

static bool value_done(struct lp_tool_parser *p, size_t end)
{
	if (!on_value_end(p, end))
		return false;
	p->js = p->depth == 0 ? J_DONE : J_AFTER;
	return true;
}

/* Whether c can start a value; begins it. */
static bool begin_value(struct lp_tool_parser *p, size_t off, char c)
{
	if (!on_value_begin(p, off, c))
		return false;
	switch (c) {
	case '{':
	case '[':
		if (p->depth == MAX_DEPTH)
			return false;
		p->stack[p->depth++] = (uint8_t)c;
		p->js = c == '{' ? J_OBJ_FIRST : J_ARR_FIRST;
		return true;
	case '"':
		p->js = J_STR;
		p->sub = 0;
		return true;
	case '-':
		p->js = J_NUM;
		p->sub = N_MINUS;
		return true;
	case 't':
		p->lit = "true";
		break;
	case 'f':
		p->lit = "false";
		break;
	case 'n':
		p->lit = "null";
		break;
	default:
		if (c >= '0' && c <= '9') {
			p->js = J_NUM;
			p->sub = c == '0' ? N_ZERO : N_INT;
			return true;
		}
		return false;
	}
	p->js = J_LIT;
	p->sub = 1;
	return true;
}

static bool close_container(struct lp_tool_parser *p, size_t off, char c)
{
	if (p->depth == 0 || p->stack[p->depth - 1] != (c == '}' ? '{' : '['))
		return false;
	p->depth--;
	return value_done(p, off + 1);
}

static bool hex(char c)
{
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* The string byte c: 1 the string ends, 0 it goes on, -1 invalid. */
static int string_byte(struct lp_tool_parser *p, char c)
{
	if (p->sub == S_ESC) {
		if (c == 'u') {
			p->sub = S_ESC + 4;
			return 0;
		}
		if (!strchr("\"\\/bfnrt", c) || c == '\0')
			return -1;
		p->sub = 0;
		return 0;
	}
	if (p->sub > S_ESC) {
		if (!hex(c))
			return -1;
		p->sub = p->sub == S_ESC + 1 ? 0 : p->sub - 1;
		return 0;
	}
	if (c == '"')
		return 1;
	if (c == '\\') {
		p->sub = S_ESC;
		return 0;
	}
	return (unsigned char)c < 0x20 ? -1 : 0;
}

/* Whether c goes on the number (advancing); false: the number ends
 * before c (or is invalid, which the caller sees from the state). */
static bool number_byte(struct lp_tool_parser *p, char c)
{
	bool digit = c >= '0' && c <= '9';

	switch (p->sub) {
	case N_MINUS:
		if (!digit)
			return false;
		p->sub = c == '0' ? N_ZERO : N_INT;
		return true;
	case N_ZERO:
	case N_INT:
		if (digit && p->sub == N_INT)
			return true;
		if (c == '.') {
			p->sub = N_DOT;
			return true;
		}
		if (c == 'e' || c == 'E') {
			p->sub = N_E;
			return true;
		}
		return false;
	case N_DOT:
	case N_FRAC:
		if (digit) {
			p->sub = N_FRAC;
			return true;
		}
		if (p->sub == N_FRAC && (c == 'e' || c == 'E')) {
			p->sub = N_E;
			return true;
		}
		return false;
	case N_E:
		if (c == '+' || c == '-') {
			p->sub = N_ESIGN;
			return true;
		}
		/* fall through */
	case N_ESIGN:
	case N_EXP:
		if (digit) {
			p->sub = N_EXP;
			return true;
		}
		return false;
	}
	return false;
}

/* The byte at off: 1 the top value is complete, 0 it goes on, -1 the
 * text is not JSON (or not a call). */
static int json_byte(struct lp_tool_parser *p, size_t off)
{
	char c = p->text.data[off];
	int r;

	switch (p->js) {
	case J_NUM:
		if (number_byte(p, c))
			return 0;
		if (p->sub != N_ZERO && p->sub != N_INT && p->sub != N_FRAC && p->sub != N_EXP)
			return -1;
		if (!value_done(p, off))
			return -1;
		return json_byte(p, off); /* c after the number */
	case J_LIT:
		if (c != p->lit[p->sub])
			return -1;
		if (p->lit[++p->sub] == '\0' && !value_done(p, off + 1))
			return -1;
		break;
	case J_STR:
		r = string_byte(p, c);
		if (r < 0 || (r > 0 && !value_done(p, off + 1)))
			return -1;
		break;
	case J_KEYSTR:
		if (p->sub == 0 && c != '"' && c != '\\' && (unsigned char)c >= 0x20) {
			if (p->key_len + 1 < sizeof(p->key))
				p->key[p->key_len++] = c;
			else
				p->key_long = true;
		} else if (p->sub != 0 || c == '\\') {
			p->key_long = true; /* an escaped key is no call member */
		}
		r = string_byte(p, c);
		if (r < 0)
			return -1;
		if (r > 0)
			p->js = J_COLON;
		break;
	case J_COLON:
		if (is_ws(c))
			break;
		if (c != ':' || !on_key(p))
			return -1;
		p->js = J_VALUE;
		break;
	case J_OBJ_FIRST:
	case J_KEY:
		if (is_ws(c))
			break;
		if (c == '}' && p->js == J_OBJ_FIRST)
			return close_container(p, off, c) ? (p->js == J_DONE) : -1;
		if (c != '"')
			return -1;
		p->js = J_KEYSTR;
		p->sub = 0;
		p->key_len = 0;
		p->key_long = false;
		break;
	case J_ARR_FIRST:
		if (is_ws(c))
			break;
		if (c == ']')
			return close_container(p, off, c) ? (p->js == J_DONE) : -1;
		return begin_value(p, off, c) ? 0 : -1;
	case J_VALUE:
		if (is_ws(c))
			break;
		return begin_value(p, off, c) ? 0 : -1;
	case J_AFTER:
		if (is_ws(c))
			break;
		if (c == ',') {
			p->js = p->stack[p->depth - 1] == '{' ? J_KEY : J_VALUE;
			break;
		}
		if (c == '}' || c == ']')
			return close_container(p, off, c) ? (p->js == J_DONE) : -1;
		return -1;
	case J_DONE:
		return -1;
	}
	return p->js == J_DONE;
}

/* ---- the parser's steps ---- */

static void block_byte(struct lp_tool_parser *p, size_t off);

static void content_byte(struct lp_tool_parser *p, size_t off)
{
	const char *m = p->fi.marker;
	char c = p->text.data[off];

	if (p->mpos > 0) {
		if (c == m[p->mpos]) {
			if (m[++p->mpos] == '\0')
				start_block(p, p->done, true);
			return;
		}
		/* "[" then not "TOOL_CALLS]": MISTRAL's bare array */
		if (p->at_start && p->fi.bare && p->mpos == 1 && m[0] == p->fi.opener) {
			start_block(p, p->done, false);
			block_byte(p, p->mstart);
			block_byte(p, off);
			return;
		}
		/* what was held is content; c starts afresh */
		p->mpos = 0;
		emit_content(p, p->done, off);
		p->done = off;
		p->after_call = p->at_start = false;
	}
	if (is_ws(c) && (p->after_call || p->at_start))
		return; /* held */
	if (m && c == m[0]) {
		p->mpos = 1;
		p->mstart = off;
		return;
	}
	if (p->at_start && p->fi.bare && c == p->fi.opener) {
		start_block(p, p->done, false);
		block_byte(p, off);
		return;
	}
	emit_content(p, p->done, off + 1);
	p->done = off + 1;
	p->after_call = p->at_start = false;
}

static void block_byte(struct lp_tool_parser *p, size_t off)
{
	char c = p->text.data[off];
	int r;

	switch (p->block) {
	case B_BEFORE:
		if (is_ws(c))
			return;
		if (c != p->fi.opener) {
			fail(p, off + 1);
			return;
		}
		p->block = B_JSON;
		p->call_depth = c == '[' ? 1 : 0;
		/* fall through */
	case B_JSON:
		r = json_byte(p, off);
		if (r < 0) {
			fail(p, off + 1);
			return;
		}
		if (p->eager && p->n_calls) {
			/* the arguments of the call that went out, as they come */
			struct lp_tool_call_rec *cur = &p->calls[p->n_calls - 1];
			if (cur->begun && cur->has_args && off >= cur->args_off &&
			    (!cur->args_ended || off < cur->args_end)) {
				add_event(p, LP_TOOL_EVENT_ARGUMENTS, p->n_calls - 1,
				          p->text.data + off, 1);
				cur->args_sent = off + 1;
				p->done = off + 1;
			}
		}
		if (r == 0)
			return;
		if (!p->fi.closer) {
			block_done(p, off + 1);
			return;
		}
		p->block = B_CLOSE;
		p->mpos = 0;
		return;
	case B_CLOSE:
		if (p->mpos == 0 && is_ws(c))
			return;
		if (c != p->fi.closer[p->mpos]) {
			fail(p, off + 1);
			return;
		}
		if (p->fi.closer[++p->mpos] == '\0')
			block_done(p, off + 1);
		return;
	}
}

static void step(struct lp_tool_parser *p, size_t off)
{
	switch (p->mode) {
	case M_CONTENT:
		content_byte(p, off);
		break;
	case M_BLOCK:
		block_byte(p, off);
		break;
	case M_TEXT:
		emit_content(p, off, off + 1);
		p->done = off + 1;
		break;
	}
}

int lp_tool_parser_new(struct lp_tool_parser **out, const struct lp_tools *t, struct lp_err *err)
{
	struct lp_tool_parser *p = calloc(1, sizeof(*p));

	*out = NULL;
	if (!p)
		return lp_errf(err, -ENOMEM, "out of memory");
	p->t = t;
	lp_buf_init(&p->text, LP_TOOLS_TEXT_MAX);
	lp_buf_init(&p->content, LP_TOOLS_TEXT_MAX);
	if (getrandom(&p->rng, sizeof(p->rng), 0) != (ssize_t)sizeof(p->rng))
		p->rng = (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)p;
	p->eager = t->choice == LP_TOOL_CHOICE_REQUIRED || t->choice == LP_TOOL_CHOICE_NAMED;
	p->mode = M_CONTENT;
	p->at_start = true;
	switch (t->fmt) {
	case LP_CHAT_TOOLS_HERMES:
		p->fi = (struct fmt_info){"<tool_call>", "</tool_call>", '{', false};
		break;
	case LP_CHAT_TOOLS_LLAMA31:
		/* <|python_tag|> is a special token: only there when the
		 * decoder keeps those */
		p->fi = (struct fmt_info){"<|python_tag|>", NULL, '{', true};
		break;
	case LP_CHAT_TOOLS_MISTRAL:
		p->fi = (struct fmt_info){"[TOOL_CALLS]", NULL, '[', true};
		break;
	default:
		p->fi = (struct fmt_info){NULL, NULL, '[', true};
		/* no syntax of its own: only a grammar's output is read */
		if (!p->eager)
			p->mode = M_TEXT;
		break;
	}
	if (t->choice == LP_TOOL_CHOICE_NONE || t->n == 0)
		p->mode = M_TEXT;
	*out = p;
	return 0;
}

void lp_tool_parser_free(struct lp_tool_parser *p)
{
	if (!p)
		return;
	lp_buf_release(&p->text);
	lp_buf_release(&p->content);
	free(p->ev);
	free(p);
}

static int events_out(struct lp_tool_parser *p, const struct lp_tool_event **ev, size_t *n_ev,
                      struct lp_err *err)
{
	*ev = p->ev;
	*n_ev = p->n_ev;
	if (p->error) {
		*n_ev = 0;
		return lp_errf(err, p->error, "out of memory");
	}
	return 0;
}

int lp_tool_parser_feed(struct lp_tool_parser *p, const char *text, size_t len,
                        const struct lp_tool_event **ev, size_t *n_ev, struct lp_err *err)
{
	size_t from = p->text.len;
	int rc;

	p->n_ev = 0;
	*ev = NULL;
	*n_ev = 0;
	if (p->error)
		return lp_errf(err, p->error, "the tool call parser failed before");
	if ((rc = lp_buf_append(&p->text, text, len, err))) {
		p->error = rc;
		return rc;
	}
	for (size_t off = from; off < p->text.len && !p->error; off++)
		step(p, off);
	return events_out(p, ev, n_ev, err);
}

int lp_tool_parser_finish(struct lp_tool_parser *p, const struct lp_tool_event **ev, size_t *n_ev,
                          struct lp_err *err)
{
	size_t end = p->text.len;

	p->n_ev = 0;
	*ev = NULL;
	*n_ev = 0;
	if (p->error)
		return lp_errf(err, p->error, "the tool call parser failed before");
	switch (p->mode) {
	case M_CONTENT:
		/* whitespace after a call is dropped; anything else held is content */
		if (p->mpos == 0 && p->after_call)
			p->done = end;
		emit_content(p, p->done, end);
		break;
	case M_BLOCK:
		if (p->block == B_CLOSE) {
			block_done(p, end); /* the closing marker is missing */
		} else if (p->eager && p->n_done > p->blk_calls) {
			/* cut short by the end: the calls that went out stay as
			 * they went, the rest of the block is dropped */
			p->n_calls = p->n_done;
		} else {
			fail(p, end);
		}
		break;
	case M_TEXT:
		break;
	}
	p->done = end;
	p->mode = M_TEXT;
	return events_out(p, ev, n_ev, err);
}

size_t lp_tool_parser_n_calls(const struct lp_tool_parser *p)
{
	return p->n_done;
}

void lp_tool_parser_call(const struct lp_tool_parser *p, size_t i, const char **id,
                         const char **name, const char **args, size_t *args_len)
{
	const struct lp_tool_call_rec *c = &p->calls[i];

	*id = c->id;
	*name = p->t->tools[c->tool].name;
	if (c->has_args) {
		*args = p->text.data + c->args_off;
		*args_len = c->args_sent - c->args_off;
	} else {
		*args = c->empty_sent ? "{}" : "";
		*args_len = c->empty_sent ? 2 : 0;
	}
}

const char *lp_tool_parser_content(const struct lp_tool_parser *p, size_t *len)
{
	*len = p->content.len;
	return p->content.data ? p->content.data : "";
}

/* text[0..len) as a JSON string; bytes that are not UTF-8 become '?'. */
static json_t *jstring(const char *text, size_t len)
{
	json_t *j = json_stringn(text, len);
	char *copy;

	if (j || !(copy = malloc(len + 1)))
		return j;
	memcpy(copy, text, len);
	copy[len] = '\0';
	for (size_t i = 0; i < len; i++)
		if (copy[i] == '\0')
			copy[i] = '?';
	lp_api_utf8_sanitize(copy);
	j = json_stringn(copy, len);
	free(copy);
	return j;
}

json_t *lp_tool_parser_calls_json(const struct lp_tool_parser *p)
{
	json_t *a = json_array();

	for (size_t i = 0; a && i < lp_tool_parser_n_calls(p); i++) {
		const char *id, *name, *args;
		size_t len;
		lp_tool_parser_call(p, i, &id, &name, &args, &len);
		if (json_array_append_new(a, json_pack("{s:s, s:s, s:{s:s, s:o}}", "id", id, "type",
		                                       "function", "function", "name", name,
		                                       "arguments", jstring(args, len)))) {
			json_decref(a);
			return NULL;
		}
	}
	return a;
}

json_t *lp_tool_event_json(const struct lp_tool_event *ev)
{
	switch (ev->type) {
	case LP_TOOL_EVENT_CALL_BEGIN:
		return json_pack("{s:I, s:s, s:s, s:{s:s, s:s}}", "index", (json_int_t)ev->index,
		                 "id", ev->id, "type", "function", "function", "name", ev->name,
		                 "arguments", "");
	case LP_TOOL_EVENT_ARGUMENTS:
		return json_pack("{s:I, s:{s:o}}", "index", (json_int_t)ev->index, "function",
		                 "arguments", jstring(ev->text, ev->len));
	default:
		return NULL;
	}
}
