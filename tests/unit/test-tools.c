/* Tool calling (agent/api/tools.c): the request fields and each refusal,
 * the grammars of "required" and named choices (compiled with the
 * grammar engine and matched against right and wrong outputs), and the
 * output parser over whole texts and the same texts cut at every byte. */
#include "tests/test.h"

#include <errno.h>
#include <jansson.h>

#include "agent/api/tools.h"
#include "agent/engine/grammar.h"

/* parse() must return 0; prints the 400's message otherwise */
#define CHECK_PARSE(call)                                                                          \
	do {                                                                                       \
		if ((call) != 0) {                                                                 \
			TEST_FAIL("%s failed: %s", #call, e.message);                              \
			return;                                                                    \
		}                                                                                  \
	} while (0)

#define WEATHER                                                                                    \
	"{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": "     \
	"\"The weather\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": "      \
	"{\"type\": \"string\"}}, \"required\": [\"city\"], \"additionalProperties\": false}}}"
#define TIME "{\"type\": \"function\", \"function\": {\"name\": \"get_time\"}}"

/* Parses body (JSON text) for fmt; returns lp_tools_parse's result. */
static int parse(const char *body, enum lp_chat_tools fmt, struct lp_tools *t,
                 struct lp_api_error *e)
{
	json_error_t je;
	json_t *j = json_loads(body, 0, &je);
	int rc;

	if (!j) {
		printf("bad test JSON: %s: %s\n", body, je.text);
		exit(2);
	}
	rc = lp_tools_parse(j, fmt, t, e);
	json_decref(j);
	return rc;
}

/* ---- request fields ---- */

static const struct {
	const char *body;
	enum lp_chat_tools fmt;
	const char *param; /* the 400's param */
	const char *words; /* in its message */
} refusals[] = {
    {"{\"tools\": {}}", LP_CHAT_TOOLS_HERMES, "tools", "must be an array"},
    {"{\"tools\": [" WEATHER ", 3]}", LP_CHAT_TOOLS_HERMES, "tools[1]", "must be an object"},
    {"{\"tools\": [{\"function\": {\"name\": \"f\"}}]}", LP_CHAT_TOOLS_HERMES, "tools[0].type",
     "is required"},
    {"{\"tools\": [{\"type\": \"retrieval\", \"function\": {\"name\": \"f\"}}]}",
     LP_CHAT_TOOLS_HERMES, "tools[0].type", "must be 'function'"},
    {"{\"tools\": [{\"type\": \"function\"}]}", LP_CHAT_TOOLS_HERMES, "tools[0].function",
     "is required"},
    {"{\"tools\": [{\"type\": \"function\", \"function\": \"f\"}]}", LP_CHAT_TOOLS_HERMES,
     "tools[0].function", "must be an object"},
    {"{\"tools\": [{\"type\": \"function\", \"function\": {}}]}", LP_CHAT_TOOLS_HERMES,
     "tools[0].function.name", "is required"},
    {"{\"tools\": [{\"type\": \"function\", \"function\": {\"name\": 7}}]}", LP_CHAT_TOOLS_HERMES,
     "tools[0].function.name", "must be a string"},
    {"{\"tools\": [" TIME ", {\"type\": \"function\", \"function\": {\"name\": \"get "
     "weather\"}}]}",
     LP_CHAT_TOOLS_HERMES, "tools[1].function.name", "'get weather'"},
    {"{\"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"\"}}]}",
     LP_CHAT_TOOLS_HERMES, "tools[0].function.name", "1 to 64 characters"},
    {"{\"tools\": [{\"type\": \"function\", \"function\": {\"name\": "
     "\"a123456789a123456789a123456789a123456789a123456789a123456789abcde\"}}]}",
     LP_CHAT_TOOLS_HERMES, "tools[0].function.name", "1 to 64 characters"},
    {"{\"tools\": [" TIME ", " TIME "]}", LP_CHAT_TOOLS_HERMES, "tools[1].function.name",
     "names must differ"},
    {"{\"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\", \"description\": "
     "1}}]}",
     LP_CHAT_TOOLS_HERMES, "tools[0].function.description", "must be a string"},
    {"{\"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": "
     "[]}}]}",
     LP_CHAT_TOOLS_HERMES, "tools[0].function.parameters", "JSON Schema object"},
    {"{\"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\", \"strict\": "
     "\"yes\"}}]}",
     LP_CHAT_TOOLS_HERMES, "tools[0].function.strict", "must be a boolean"},
    {"{\"tools\": [" WEATHER "], \"tool_choice\": \"any\"}", LP_CHAT_TOOLS_HERMES, "tool_choice",
     "'required'"},
    {"{\"tools\": [" WEATHER "], \"tool_choice\": 1}", LP_CHAT_TOOLS_HERMES, "tool_choice",
     "a string or an object"},
    {"{\"tools\": [" WEATHER "], \"tool_choice\": {\"type\": \"tool\"}}", LP_CHAT_TOOLS_HERMES,
     "tool_choice.type", "must be 'function'"},
    {"{\"tools\": [" WEATHER "], \"tool_choice\": {\"type\": \"function\"}}", LP_CHAT_TOOLS_HERMES,
     "tool_choice.function.name", "the name of a tool"},
    {"{\"tools\": [" WEATHER "], \"tool_choice\": {\"type\": \"function\", \"function\": "
     "{\"name\": \"get_time\"}}}",
     LP_CHAT_TOOLS_HERMES, "tool_choice.function.name", "'get_time', which is not in 'tools'"},
    {"{\"tool_choice\": \"auto\"}", LP_CHAT_TOOLS_HERMES, "tool_choice", "needs 'tools'"},
    {"{\"tools\": [], \"tool_choice\": \"required\"}", LP_CHAT_TOOLS_HERMES, "tool_choice",
     "needs 'tools'"},
    {"{\"tools\": [" WEATHER "], \"parallel_tool_calls\": \"no\"}", LP_CHAT_TOOLS_HERMES,
     "parallel_tool_calls", "must be a boolean"},
    {"{\"parallel_tool_calls\": false}", LP_CHAT_TOOLS_HERMES, "parallel_tool_calls",
     "only allowed with 'tools'"},
    {"{\"functions\": [{\"name\": \"f\"}]}", LP_CHAT_TOOLS_HERMES, "functions", "use 'tools'"},
    {"{\"function_call\": \"auto\"}", LP_CHAT_TOOLS_HERMES, "function_call", "use 'tool_choice'"},
    {"{\"tools\": [" WEATHER "]}", LP_CHAT_TOOLS_NONE, "tool_choice", "no tool format"},
    {"{\"tools\": [" WEATHER "], \"tool_choice\": \"auto\"}", LP_CHAT_TOOLS_NONE, "tool_choice",
     "a model whose chat template defines tools"},
};

static void test_refusals(void)
{
	for (size_t i = 0; i < sizeof(refusals) / sizeof(refusals[0]); i++) {
		struct lp_tools t;
		struct lp_api_error e;
		int rc = parse(refusals[i].body, refusals[i].fmt, &t, &e);
		lp_tools_release(&t);
		CHECK_MSG(rc == -400 && e.status == 400, "%s: rc %d, expected a 400",
		          refusals[i].body, rc);
		CHECK_MSG(!strcmp(e.param, refusals[i].param), "%s: param '%s', expected '%s'",
		          refusals[i].body, e.param, refusals[i].param);
		CHECK_MSG(strstr(e.message, refusals[i].words), "%s: message '%s' lacks '%s'",
		          refusals[i].body, e.message, refusals[i].words);
	}
}

static void test_too_many_tools(void)
{
	struct lp_buf b;
	struct lp_tools t;
	struct lp_api_error e;
	int rc;

	lp_buf_init(&b, 1 << 20);
	lp_buf_appendf(&b, NULL, "{\"tools\": [");
	for (int i = 0; i <= LP_TOOLS_MAX; i++)
		lp_buf_appendf(&b, NULL,
		               "%s{\"type\": \"function\", \"function\": {\"name\": \"f%d\"}}",
		               i ? ", " : "", i);
	lp_buf_appendf(&b, NULL, "]}");
	rc = parse(b.data, LP_CHAT_TOOLS_HERMES, &t, &e);
	lp_buf_release(&b);
	lp_tools_release(&t);
	CHECK_EQ_INT(rc, -400);
	CHECK_EQ_STR(e.param, "tools");
	CHECK(strstr(e.message, "at most 128") != NULL);
}

static void test_schema_refused(void)
{
	struct lp_tools t;
	struct lp_api_error e;
	/* a keyword the schema compiler does not support: refused, named by
	 * the tool's place */
	int rc = parse("{\"tools\": [" TIME ", {\"type\": \"function\", \"function\": {\"name\": "
	               "\"f\", \"parameters\": {\"type\": \"object\", \"properties\": {\"a\": "
	               "{\"type\": \"string\"}}, \"patternProperties\": {\"^x\": {}}}}}], "
	               "\"tool_choice\": \"required\"}",
	               LP_CHAT_TOOLS_HERMES, &t, &e);

	lp_tools_release(&t);
	CHECK_EQ_INT(rc, -400);
	CHECK_EQ_STR(e.param, "tools[1].function.parameters");
	CHECK_MSG(strstr(e.message, "patternProperties") != NULL, "message: %s", e.message);
}

static void test_defaults(void)
{
	struct lp_tools t;
	struct lp_api_error e;

	CHECK_PARSE(parse("{\"tools\": [" WEATHER ", " TIME "]}", LP_CHAT_TOOLS_HERMES, &t, &e));
	CHECK_EQ_INT(t.choice, LP_TOOL_CHOICE_AUTO);
	CHECK_EQ_INT(t.n, 2);
	CHECK(t.parallel);
	CHECK(t.grammar == NULL);
	CHECK(json_is_array(t.json));
	CHECK_EQ_STR(t.tools[1].name, "get_time");
	/* absent parameters: an object with no properties */
	CHECK_EQ_STR(json_string_value(json_object_get(t.tools[1].parameters, "type")), "object");
	CHECK(json_is_object(json_object_get(t.tools[1].parameters, "properties")));
	lp_tools_release(&t);

	/* Llama 3.1's template renders one call */
	CHECK_PARSE(parse("{\"tools\": [" WEATHER "], \"parallel_tool_calls\": true}",
	                  LP_CHAT_TOOLS_LLAMA31, &t, &e));
	CHECK(!t.parallel);
	lp_tools_release(&t);

	/* none without tools, no tools at all, an empty array: no tool calling */
	CHECK_PARSE(parse("{\"tool_choice\": \"none\"}", LP_CHAT_TOOLS_NONE, &t, &e));
	CHECK_EQ_INT(t.choice, LP_TOOL_CHOICE_NONE);
	lp_tools_release(&t);
	CHECK_PARSE(parse("{\"tools\": [], \"tool_choice\": null}", LP_CHAT_TOOLS_NONE, &t, &e));
	CHECK_EQ_INT(t.choice, LP_TOOL_CHOICE_NONE);
	CHECK_EQ_INT(t.n, 0);
	lp_tools_release(&t);
	/* none with tools: fine even without a tool format */
	CHECK_PARSE(parse("{\"tools\": [" WEATHER "], \"tool_choice\": \"none\"}",
	                  LP_CHAT_TOOLS_NONE, &t, &e));
	CHECK_EQ_INT(t.choice, LP_TOOL_CHOICE_NONE);
	CHECK(t.grammar == NULL);
	lp_tools_release(&t);

	/* named and required build their grammar; required works without a
	 * tool format */
	CHECK_PARSE(parse("{\"tools\": [" WEATHER ", " TIME "], \"tool_choice\": {\"type\": "
	                  "\"function\", \"function\": {\"name\": \"get_time\"}}}",
	                  LP_CHAT_TOOLS_MISTRAL, &t, &e));
	CHECK_EQ_INT(t.choice, LP_TOOL_CHOICE_NAMED);
	CHECK_EQ_INT(t.named, 1);
	CHECK(t.grammar != NULL && t.grammar_len == strlen(t.grammar));
	lp_tools_release(&t);
	CHECK_PARSE(parse("{\"tools\": [" WEATHER "], \"tool_choice\": \"required\", "
	                  "\"parallel_tool_calls\": false}",
	                  LP_CHAT_TOOLS_NONE, &t, &e));
	CHECK_EQ_INT(t.choice, LP_TOOL_CHOICE_REQUIRED);
	CHECK(!t.parallel);
	CHECK(t.grammar != NULL);
	lp_tools_release(&t);
}

/* ---- grammars ---- */

struct gcase {
	const char *text;
	int want; /* 1 complete, 0 a prefix only, -1 neither */
};

/* Builds the grammar of body for fmt and matches every case. */
static int check_grammar(const char *body, enum lp_chat_tools fmt, const struct gcase *cases,
                         size_t n, char *why, size_t why_len)
{
	struct lp_tools t;
	struct lp_api_error e;
	struct lp_grammar *g = NULL;
	struct lp_err err;
	int bad = 0;

	if (parse(body, fmt, &t, &e)) {
		snprintf(why, why_len, "parse: %s", e.message);
		return -1;
	}
	if (lp_grammar_parse(&g, t.grammar, t.grammar_len, &err)) {
		snprintf(why, why_len, "grammar: %s\n%s", err.msg, t.grammar);
		lp_tools_release(&t);
		return -1;
	}
	for (size_t i = 0; i < n && !bad; i++) {
		int got = lp_grammar_match(g, cases[i].text, strlen(cases[i].text));
		if (got != cases[i].want) {
			snprintf(why, why_len, "'%s' matched %d, expected %d; grammar:\n%s",
			         cases[i].text, got, cases[i].want, t.grammar);
			bad = 1;
		}
	}
	lp_grammar_unref(g);
	lp_tools_release(&t);
	return bad ? -1 : 0;
}

#define CALL_W "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"
#define CALL_T "{\"name\": \"get_time\", \"arguments\": {}}"
#define HB(x)  "<tool_call>\n" x "\n</tool_call>"

static void test_grammar_hermes(void)
{
	static const struct gcase cases[] = {
	    {HB(CALL_W), 1},
	    {HB(CALL_T), 1},
	    {HB(CALL_W) "\n" HB(CALL_T), 1},
	    {HB(CALL_W) "\n" HB(CALL_T) "\n" HB(CALL_W), 1},
	    {"<tool_call>\n{\"name\": \"get_wea", 0},
	    {"", 0},
	    {"Sure! " HB(CALL_W), -1}, /* no content in required mode */
	    {HB("{\"name\": \"get_news\", \"arguments\": {}}"), -1},
	    {HB("{\"name\": \"get_weather\", \"arguments\": {\"city\": 3}}"), -1},
	    {HB("{\"name\": \"get_weather\", \"arguments\": {\"town\": \"Paris\"}}"), -1},
	    {HB("{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}"), -1},
	    {HB(CALL_W) "\n", 0},
	    {HB(CALL_W) " ", -1},
	};
	char why[8192];

	CHECK_MSG(!check_grammar("{\"tools\": [" WEATHER ", " TIME "], \"tool_choice\": "
	                         "\"required\"}",
	                         LP_CHAT_TOOLS_HERMES, cases, sizeof(cases) / sizeof(cases[0]), why,
	                         sizeof(why)),
	          "%s", why);
}

static void test_grammar_one_call(void)
{
	/* parallel_tool_calls false, and a named function: exactly one call */
	static const struct gcase one[] = {
	    {HB(CALL_W), 1},
	    {HB(CALL_T), 1},
	    {HB(CALL_W) "\n" HB(CALL_T), -1},
	    {HB(CALL_W) "\n", -1},
	};
	static const struct gcase named[] = {
	    {HB(CALL_T), 1},
	    {HB(CALL_W), -1},
	    {HB(CALL_T) "\n" HB(CALL_T), -1},
	};
	char why[8192];

	CHECK_MSG(!check_grammar("{\"tools\": [" WEATHER ", " TIME "], \"tool_choice\": "
	                         "\"required\", \"parallel_tool_calls\": false}",
	                         LP_CHAT_TOOLS_HERMES, one, sizeof(one) / sizeof(one[0]), why,
	                         sizeof(why)),
	          "%s", why);
	CHECK_MSG(
	    !check_grammar("{\"tools\": [" WEATHER ", " TIME "], \"tool_choice\": "
	                   "{\"type\": \"function\", \"function\": {\"name\": \"get_time\"}}}",
	                   LP_CHAT_TOOLS_HERMES, named, sizeof(named) / sizeof(named[0]), why,
	                   sizeof(why)),
	    "%s", why);
}

static void test_grammar_llama_mistral_generic(void)
{
	static const struct gcase llama[] = {
	    {"{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}", 1},
	    {"{\"name\": \"get_time\", \"parameters\": {}}", 1},
	    {"{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}", -1},
	    {"{\"name\": \"get_time\", \"parameters\": {}}{", -1},
	    {"{\"name\": \"get_weather\", \"parameters\": {\"city\": 1}}", -1},
	};
	static const struct gcase array[] = {
	    {"[" CALL_W "]", 1},
	    {"[" CALL_W ", " CALL_T "]", 1},
	    {"[" CALL_T ", " CALL_T ", " CALL_W "]", 1},
	    {"[]", -1},
	    {"[TOOL_CALLS] [" CALL_W "]", -1},
	    {"[{\"name\": \"get_news\", \"arguments\": {}}]", -1},
	    {"[" CALL_W ",", 0},
	};
	static const struct gcase array_one[] = {
	    {"[" CALL_W "]", 1},
	    {"[" CALL_W ", " CALL_T "]", -1},
	};
	char why[8192];

	CHECK_MSG(!check_grammar("{\"tools\": [" WEATHER ", " TIME "], \"tool_choice\": "
	                         "\"required\"}",
	                         LP_CHAT_TOOLS_LLAMA31, llama, sizeof(llama) / sizeof(llama[0]),
	                         why, sizeof(why)),
	          "%s", why);
	CHECK_MSG(!check_grammar("{\"tools\": [" WEATHER ", " TIME "], \"tool_choice\": "
	                         "\"required\"}",
	                         LP_CHAT_TOOLS_MISTRAL, array, sizeof(array) / sizeof(array[0]),
	                         why, sizeof(why)),
	          "%s", why);
	CHECK_MSG(!check_grammar("{\"tools\": [" WEATHER ", " TIME "], \"tool_choice\": "
	                         "\"required\"}",
	                         LP_CHAT_TOOLS_NONE, array, sizeof(array) / sizeof(array[0]), why,
	                         sizeof(why)),
	          "%s", why);
	CHECK_MSG(!check_grammar("{\"tools\": [" WEATHER ", " TIME "], \"tool_choice\": "
	                         "\"required\", \"parallel_tool_calls\": false}",
	                         LP_CHAT_TOOLS_NONE, array_one,
	                         sizeof(array_one) / sizeof(array_one[0]), why, sizeof(why)),
	          "%s", why);
}

static void test_grammar_bad_choice(void)
{
	struct lp_tools t;
	struct lp_api_error e;
	struct lp_buf b;
	struct lp_err err;

	CHECK_PARSE(parse("{\"tools\": [" WEATHER "]}", LP_CHAT_TOOLS_HERMES, &t, &e));
	lp_buf_init(&b, 1 << 20);
	CHECK_EQ_INT(lp_tools_grammar(&t, LP_CHAT_TOOLS_HERMES, &b, &err), -EINVAL);
	lp_buf_release(&b);
	lp_tools_release(&t);
}

/* ---- the parser ---- */

struct result {
	char content[4096];
	size_t content_len;
	size_t n_calls;
	char id[LP_TOOLS_MAX_CALLS][LP_TOOL_ID_MAX];
	char name[LP_TOOLS_MAX_CALLS][LP_TOOL_NAME_MAX + 1];
	char args[LP_TOOLS_MAX_CALLS][2048];
	bool begun_early; /* a CALL_BEGIN came before the last byte was fed */
};

static void append(char *dst, size_t cap, size_t *len, const char *s, size_t n)
{
	if (*len + n < cap) {
		memcpy(dst + *len, s, n);
		*len += n;
		dst[*len] = '\0';
	}
}

/* Adds events to r; -1 when they break the contract (a call's events
 * out of order). */
static int take(struct result *r, const struct lp_tool_event *ev, size_t n, bool last_feed)
{
	for (size_t i = 0; i < n; i++) {
		const struct lp_tool_event *x = &ev[i];
		size_t len;
		switch (x->type) {
		case LP_TOOL_EVENT_CONTENT:
			append(r->content, sizeof(r->content), &r->content_len, x->text, x->len);
			break;
		case LP_TOOL_EVENT_CALL_BEGIN:
			if (x->index != r->n_calls || x->index >= LP_TOOLS_MAX_CALLS)
				return -1;
			snprintf(r->id[x->index], LP_TOOL_ID_MAX, "%s", x->id);
			snprintf(r->name[x->index], LP_TOOL_NAME_MAX + 1, "%s", x->name);
			r->args[x->index][0] = '\0';
			r->n_calls++;
			if (!last_feed)
				r->begun_early = true;
			break;
		case LP_TOOL_EVENT_ARGUMENTS:
			if (x->index + 1 != r->n_calls)
				return -1;
			len = strlen(r->args[x->index]);
			append(r->args[x->index], sizeof(r->args[0]), &len, x->text, x->len);
			break;
		}
	}
	return 0;
}

/* Runs text through a parser in pieces cut at the offsets cuts[0..n_cuts)
 * (increasing); fills r from the events and checks that they agree with
 * the parser's final answer. */
static int run(const struct lp_tools *t, const char *text, const size_t *cuts, size_t n_cuts,
               struct result *r, char *why, size_t why_len)
{
	struct lp_tool_parser *p;
	const struct lp_tool_event *ev;
	size_t n, len = strlen(text), from = 0, clen;
	struct lp_err err;
	const char *content;
	int rc = -1;

	memset(r, 0, sizeof(*r));
	if (lp_tool_parser_new(&p, t, &err)) {
		snprintf(why, why_len, "new: %s", err.msg);
		return -1;
	}
	for (size_t k = 0; k <= n_cuts; k++) {
		size_t to = k < n_cuts ? cuts[k] : len;
		if (lp_tool_parser_feed(p, text + from, to - from, &ev, &n, &err)) {
			snprintf(why, why_len, "feed: %s", err.msg);
			goto out;
		}
		if (take(r, ev, n, to == len)) {
			snprintf(why, why_len, "events out of order");
			goto out;
		}
		from = to;
	}
	if (lp_tool_parser_finish(p, &ev, &n, &err) || take(r, ev, n, true)) {
		snprintf(why, why_len, "finish failed");
		goto out;
	}
	content = lp_tool_parser_content(p, &clen);
	if (clen != r->content_len || memcmp(content, r->content, clen)) {
		snprintf(why, why_len, "the content events '%s' are not the content '%.*s'",
		         r->content, (int)clen, content);
		goto out;
	}
	if (lp_tool_parser_n_calls(p) != r->n_calls) {
		snprintf(why, why_len, "%zu calls went out, the parser has %zu", r->n_calls,
		         lp_tool_parser_n_calls(p));
		goto out;
	}
	for (size_t i = 0; i < r->n_calls; i++) {
		const char *id, *name, *args;
		size_t alen;
		lp_tool_parser_call(p, i, &id, &name, &args, &alen);
		if (strcmp(id, r->id[i]) || strcmp(name, r->name[i]) ||
		    strlen(r->args[i]) != alen || memcmp(args, r->args[i], alen)) {
			snprintf(why, why_len, "call %zu's events differ from the parser's", i);
			goto out;
		}
	}
	rc = 0;
out:
	lp_tool_parser_free(p);
	return rc;
}

struct pcase {
	const char *text;
	const char *content;
	size_t n_calls;
	const char *calls[3][2]; /* name, arguments */
};

/* The case whole, cut at every byte, and byte by byte: the same result. */
static int check_parser(const struct lp_tools *t, const struct pcase *c, char *why, size_t why_len)
{
	size_t len = strlen(c->text), cuts[2048];
	struct result first, r;

	if (run(t, c->text, NULL, 0, &first, why, why_len))
		return -1;
	if (strcmp(first.content, c->content) || first.n_calls != c->n_calls) {
		snprintf(why, why_len, "'%s': content '%s' and %zu calls, expected '%s' and %zu",
		         c->text, first.content, first.n_calls, c->content, c->n_calls);
		return -1;
	}
	for (size_t i = 0; i < c->n_calls; i++) {
		bool mistral = t->fmt == LP_CHAT_TOOLS_MISTRAL;
		const char *id = first.id[i] + (mistral ? 0 : 5);
		if (strcmp(first.name[i], c->calls[i][0]) ||
		    strcmp(first.args[i], c->calls[i][1])) {
			snprintf(why, why_len, "'%s': call %zu is %s(%s), expected %s(%s)", c->text,
			         i, first.name[i], first.args[i], c->calls[i][0], c->calls[i][1]);
			return -1;
		}
		if ((!mistral && strncmp(first.id[i], "call_", 5)) ||
		    strlen(id) != (mistral ? 9u : 24u) ||
		    strspn(id, "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
		               "abcdefghijklmnopqrstuvwxyz"
		               "0123456789") != strlen(id) ||
		    (i > 0 && !strcmp(first.id[i], first.id[i - 1]))) {
			snprintf(why, why_len, "'%s': bad id '%s'", c->text, first.id[i]);
			return -1;
		}
	}
	for (size_t k = 0; k <= len; k++) {
		cuts[0] = k;
		if (run(t, c->text, cuts, 1, &r, why, why_len))
			return -1;
		if (strcmp(r.content, first.content) || r.n_calls != first.n_calls) {
			snprintf(why, why_len, "'%s' cut at %zu: content '%s', %zu calls", c->text,
			         k, r.content, r.n_calls);
			return -1;
		}
		for (size_t i = 0; i < r.n_calls; i++)
			if (strcmp(r.name[i], first.name[i]) || strcmp(r.args[i], first.args[i])) {
				snprintf(why, why_len, "'%s' cut at %zu: call %zu is %s(%s)",
				         c->text, k, i, r.name[i], r.args[i]);
				return -1;
			}
	}
	for (size_t k = 0; k < len && k < 2048; k++)
		cuts[k] = k + 1;
	if (len < 2048) {
		if (run(t, c->text, cuts, len, &r, why, why_len))
			return -1;
		if (strcmp(r.content, first.content) || r.n_calls != first.n_calls) {
			snprintf(why, why_len, "'%s' byte by byte: content '%s', %zu calls",
			         c->text, r.content, r.n_calls);
			return -1;
		}
		for (size_t i = 0; i < r.n_calls; i++)
			if (strcmp(r.args[i], first.args[i])) {
				snprintf(why, why_len, "'%s' byte by byte: call %zu args %s",
				         c->text, i, r.args[i]);
				return -1;
			}
	}
	return 0;
}

static int check_parser_cases(const char *body, enum lp_chat_tools fmt, const struct pcase *c,
                              size_t n, char *why, size_t why_len)
{
	struct lp_tools t;
	struct lp_api_error e;
	int rc = 0;

	if (parse(body, fmt, &t, &e)) {
		snprintf(why, why_len, "parse: %s", e.message);
		return -1;
	}
	for (size_t i = 0; i < n && !rc; i++)
		rc = check_parser(&t, &c[i], why, why_len);
	lp_tools_release(&t);
	return rc;
}

#define ARGS_W "{\"city\": \"Paris\"}"
#define TOOLS2 "{\"tools\": [" WEATHER ", " TIME "]"

static void test_parser_hermes_auto(void)
{
	static const struct pcase cases[] = {
	    {"Hello world", "Hello world", 0, {{0}}},
	    {"", "", 0, {{0}}},
	    {"  \n", "  \n", 0, {{0}}},
	    {HB(CALL_W), "", 1, {{"get_weather", ARGS_W}}},
	    {"\n" HB(CALL_W) "\n", "", 1, {{"get_weather", ARGS_W}}},
	    /* content before the call stays content */
	    {"Let me check.\n" HB(CALL_W), "Let me check.\n", 1, {{"get_weather", ARGS_W}}},
	    {HB(CALL_W) "\n" HB(CALL_T), "", 2, {{"get_weather", ARGS_W}, {"get_time", "{}"}}},
	    /* text after the calls is content too */
	    {HB(CALL_T) "\nDone.", "\nDone.", 1, {{"get_time", "{}"}}},
	    /* a closing tag the model left out */
	    {"<tool_call>\n" CALL_W, "", 1, {{"get_weather", ARGS_W}}},
	    {"<tool_call>\n" CALL_W "\n</tool_", "", 1, {{"get_weather", ARGS_W}}},
	    /* arguments holding the markers, braces and escapes */
	    {HB("{\"name\": \"get_weather\", \"arguments\": {\"city\": "
	        "\"a}]\\\"</tool_call>\\u00e9\", "
	        "\"n\": [1, -2.5e+3, true, null, {\"x\": false}]}}"),
	     "",
	     1,
	     {{"get_weather",
	       "{\"city\": \"a}]\\\"</tool_call>\\u00e9\", \"n\": [1, -2.5e+3, true, "
	       "null, {\"x\": false}]}"}}},
	    /* members in another order, a "type" member, no arguments */
	    {HB("{\"arguments\": {\"city\": \"Oslo\"}, \"name\": \"get_weather\"}"),
	     "",
	     1,
	     {{"get_weather", "{\"city\": \"Oslo\"}"}}},
	    {HB("{\"type\": \"function\", \"name\": \"get_time\", \"arguments\": {}}"),
	     "",
	     1,
	     {{"get_time", "{}"}}},
	    {HB("{\"name\": \"get_time\"}"), "", 1, {{"get_time", "{}"}}},
	    /* not calls: all content */
	    {"<tool_call>\nnot json\n</tool_call>",
	     "<tool_call>\nnot json\n</tool_call>",
	     0,
	     {{0}}},
	    {HB("{\"name\": \"get_news\", \"arguments\": {}}"),
	     HB("{\"name\": \"get_news\", \"arguments\": {}}"),
	     0,
	     {{0}}},
	    {HB("{\"name\": \"get_time\", \"arguments\": {}, \"extra\": 1}"),
	     HB("{\"name\": \"get_time\", \"arguments\": {}, \"extra\": 1}"),
	     0,
	     {{0}}},
	    {HB("{\"name\": \"get_time\", \"arguments\": \"{}\"}"),
	     HB("{\"name\": \"get_time\", \"arguments\": \"{}\"}"),
	     0,
	     {{0}}},
	    {HB("{\"name\": \"get_time\", \"arguments\": {]}"),
	     HB("{\"name\": \"get_time\", \"arguments\": {]}"),
	     0,
	     {{0}}},
	    {"<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"a\": 01}}",
	     "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"a\": 01}}",
	     0,
	     {{0}}},
	    {"<tool_call>\n" CALL_T "\n</tool_callx>",
	     "<tool_call>\n" CALL_T "\n</tool_callx>",
	     0,
	     {{0}}},
	    {"<tool_call>\n{\"name\": \"get_ti", "<tool_call>\n{\"name\": \"get_ti", 0, {{0}}},
	    /* the start of a marker that is not one */
	    {"a < b <tool_callx", "a < b <tool_callx", 0, {{0}}},
	    {"<tool", "<tool", 0, {{0}}},
	    /* a bad block after a good one: it and what follows are content */
	    {HB(CALL_T) "\n<tool_call>\nbad</tool_call>\n" HB(CALL_T),
	     "\n<tool_call>\nbad</tool_call>\n" HB(CALL_T),
	     1,
	     {{"get_time", "{}"}}},
	};
	char why[8192];

	CHECK_MSG(!check_parser_cases(TOOLS2 "}", LP_CHAT_TOOLS_HERMES, cases,
	                              sizeof(cases) / sizeof(cases[0]), why, sizeof(why)),
	          "%s", why);
}

static void test_parser_not_parallel(void)
{
	static const struct pcase cases[] = {
	    {HB(CALL_W) "\n" HB(CALL_T), "\n" HB(CALL_T), 1, {{"get_weather", ARGS_W}}},
	};
	char why[8192];

	CHECK_MSG(!check_parser_cases(TOOLS2 ", \"parallel_tool_calls\": false}",
	                              LP_CHAT_TOOLS_HERMES, cases, 1, why, sizeof(why)),
	          "%s", why);
}

static void test_parser_llama_auto(void)
{
	static const struct pcase cases[] = {
	    {"{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
	     "",
	     1,
	     {{"get_weather", ARGS_W}}},
	    {"\n\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n",
	     "",
	     1,
	     {{"get_weather", ARGS_W}}},
	    {"The weather is fine.", "The weather is fine.", 0, {{0}}},
	    {" {\"name\": \"Bob\", \"parameters\": {}}",
	     " {\"name\": \"Bob\", \"parameters\": {}}",
	     0,
	     {{0}}},
	    /* no marker: a call needs its parameters member */
	    {"{\"name\": \"get_time\"}", "{\"name\": \"get_time\"}", 0, {{0}}},
	    {"{\"name\": \"get_time\", \"parameters\": {}} and more",
	     " and more",
	     1,
	     {{"get_time", "{}"}}},
	    /* one call only */
	    {"{\"name\": \"get_time\", \"parameters\": {}}; {\"name\": \"get_time\", "
	     "\"parameters\": {}}",
	     "; {\"name\": \"get_time\", \"parameters\": {}}",
	     1,
	     {{"get_time", "{}"}}},
	    /* <|python_tag|>, when the decoder keeps special tokens */
	    {"<|python_tag|>{\"name\": \"get_time\", \"parameters\": {}}",
	     "",
	     1,
	     {{"get_time", "{}"}}},
	    {"<|python_tag|>{\"name\": \"get_time\"}", "", 1, {{"get_time", "{}"}}},
	    {"a <|python_tag|", "a <|python_tag|", 0, {{0}}},
	    {"Sure: {\"name\": \"get_time\", \"parameters\": {}}",
	     "Sure: {\"name\": \"get_time\", \"parameters\": {}}",
	     0,
	     {{0}}},
	};
	char why[8192];

	CHECK_MSG(!check_parser_cases(TOOLS2 "}", LP_CHAT_TOOLS_LLAMA31, cases,
	                              sizeof(cases) / sizeof(cases[0]), why, sizeof(why)),
	          "%s", why);
}

static void test_parser_mistral_auto(void)
{
	static const struct pcase cases[] = {
	    {"[TOOL_CALLS] [" CALL_W ", " CALL_T "]",
	     "",
	     2,
	     {{"get_weather", ARGS_W}, {"get_time", "{}"}}},
	    {"[TOOL_CALLS][" CALL_T "]", "", 1, {{"get_time", "{}"}}},
	    /* the id the template writes in earlier calls: ours replaces it */
	    {"[TOOL_CALLS] [{\"name\": \"get_time\", \"arguments\": {}, \"id\": \"abc123XYZ\"}]",
	     "",
	     1,
	     {{"get_time", "{}"}}},
	    /* the marker skipped by the decoder: the bare array */
	    {" [" CALL_W "]", "", 1, {{"get_weather", ARGS_W}}},
	    {"I will call it. [TOOL_CALLS] [" CALL_T "]",
	     "I will call it. ",
	     1,
	     {{"get_time", "{}"}}},
	    {"[TOOL_CALLS] garbage", "[TOOL_CALLS] garbage", 0, {{0}}},
	    {"[1, 2]", "[1, 2]", 0, {{0}}},
	    {"[]", "[]", 0, {{0}}},
	    {"[TOOL", "[TOOL", 0, {{0}}},
	    {"[", "[", 0, {{0}}},
	    {"[x]", "[x]", 0, {{0}}},
	    {"[TOOL_CALLS] [" CALL_T ", {\"name\": \"nope\", \"arguments\": {}}]",
	     "[TOOL_CALLS] [" CALL_T ", {\"name\": \"nope\", \"arguments\": {}}]",
	     0,
	     {{0}}},
	    {"Text [" CALL_T "]", "Text [" CALL_T "]", 0, {{0}}},
	};
	char why[8192];

	CHECK_MSG(!check_parser_cases(TOOLS2 "}", LP_CHAT_TOOLS_MISTRAL, cases,
	                              sizeof(cases) / sizeof(cases[0]), why, sizeof(why)),
	          "%s", why);
}

static void test_parser_required(void)
{
	static const struct pcase hermes[] = {
	    {HB(CALL_W) "\n" HB(CALL_T), "", 2, {{"get_weather", ARGS_W}, {"get_time", "{}"}}},
	    /* cut by max_tokens inside the arguments: kept as generated */
	    {"<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa",
	     "",
	     1,
	     {{"get_weather", "{\"city\": \"Pa"}}},
	    {"<tool_call>\n{\"name\": \"get_weather\", \"argu", "", 1, {{"get_weather", ""}}},
	    /* cut before the name is whole: content */
	    {"<tool_call>\n{\"name\": \"get_wea", "<tool_call>\n{\"name\": \"get_wea", 0, {{0}}},
	};
	static const struct pcase generic[] = {
	    {"[" CALL_W ", " CALL_T "]", "", 2, {{"get_weather", ARGS_W}, {"get_time", "{}"}}},
	    {"[" CALL_W ", {\"name\": \"get_time\", \"arguments\": {\"a\": [",
	     "",
	     2,
	     {{"get_weather", ARGS_W}, {"get_time", "{\"a\": ["}}},
	};
	static const struct pcase named[] = {
	    {"[" CALL_T "]", "", 1, {{"get_time", "{}"}}},
	    /* not the named function (a grammar never lets this through) */
	    {"[" CALL_W "]", "[" CALL_W "]", 0, {{0}}},
	};
	char why[8192];

	CHECK_MSG(!check_parser_cases(TOOLS2 ", \"tool_choice\": \"required\"}",
	                              LP_CHAT_TOOLS_HERMES, hermes,
	                              sizeof(hermes) / sizeof(hermes[0]), why, sizeof(why)),
	          "%s", why);
	CHECK_MSG(!check_parser_cases(TOOLS2 ", \"tool_choice\": \"required\"}", LP_CHAT_TOOLS_NONE,
	                              generic, sizeof(generic) / sizeof(generic[0]), why,
	                              sizeof(why)),
	          "%s", why);
	CHECK_MSG(!check_parser_cases(TOOLS2 ", \"tool_choice\": {\"type\": \"function\", "
	                                     "\"function\": {\"name\": \"get_time\"}}}",
	                              LP_CHAT_TOOLS_MISTRAL, named,
	                              sizeof(named) / sizeof(named[0]), why, sizeof(why)),
	          "%s", why);
}

/* With a grammar the call goes out as it is generated: its begin before
 * the end of the text, its arguments in pieces; with auto, only whole. */
static void test_parser_streams(void)
{
	static const char text[] = HB(CALL_W);
	struct lp_tools t;
	struct lp_api_error e;
	struct result r;
	size_t cuts[sizeof(text)];
	char why[512];

	for (size_t k = 0; k + 1 < sizeof(text); k++)
		cuts[k] = k + 1;
	CHECK_PARSE(parse(TOOLS2 ", \"tool_choice\": \"required\"}", LP_CHAT_TOOLS_HERMES, &t, &e));
	CHECK_MSG(!run(&t, text, cuts, sizeof(text) - 2, &r, why, sizeof(why)), "%s", why);
	lp_tools_release(&t);
	CHECK(r.begun_early);
	CHECK_EQ_STR(r.args[0], ARGS_W);

	CHECK_PARSE(parse(TOOLS2 "}", LP_CHAT_TOOLS_HERMES, &t, &e));
	/* auto: the whole block is read before the call goes out */
	CHECK_MSG(!run(&t, text, cuts, sizeof(text) - 2, &r, why, sizeof(why)), "%s", why);
	lp_tools_release(&t);
	CHECK(!r.begun_early);
	CHECK_EQ_INT(r.n_calls, 1);
}

static void test_parser_choice_none(void)
{
	struct lp_tools t;
	struct lp_api_error e;
	struct result r;
	char why[512];

	CHECK_PARSE(parse(TOOLS2 ", \"tool_choice\": \"none\"}", LP_CHAT_TOOLS_HERMES, &t, &e));
	CHECK_MSG(!run(&t, HB(CALL_T), NULL, 0, &r, why, sizeof(why)), "%s", why);
	lp_tools_release(&t);
	CHECK_EQ_INT(r.n_calls, 0);
	CHECK_EQ_STR(r.content, HB(CALL_T));
}

/* Random outputs each grammar accepts (a random walk through the grammar,
 * byte by byte) read back as calls and nothing else, with arguments that
 * are JSON objects holding what the schema requires. */
static size_t random_output(struct lp_grammar *g, uint64_t *rng, char *out, size_t cap,
                            bool *complete)
{
	static const char cand[] = "{}[]\",: \nabcdefghijklmnopqrstuvwxyz_<>/0123456789-";
	struct lp_grammar_matcher *m;
	struct lp_err err;
	size_t n = 0;

	*complete = false;
	if (lp_grammar_matcher_new(&m, g, &err))
		return 0;
	while (n + 1 < cap && !lp_grammar_matcher_must_end(m)) {
		size_t start = test_splitmix64(rng) % (sizeof(cand) - 1);
		bool ok = false;
		if (lp_grammar_matcher_can_end(m) && test_splitmix64(rng) % 4 == 0)
			break;
		for (size_t k = 0; k < sizeof(cand) - 1 && !ok; k++) {
			char c = cand[(start + k) % (sizeof(cand) - 1)];
			if ((ok = lp_grammar_matcher_accept_bytes(m, &c, 1)))
				out[n++] = c;
		}
		for (int c = 0x20; c < 0x7f && !ok; c++) {
			char b = (char)c;
			if ((ok = lp_grammar_matcher_accept_bytes(m, &b, 1)))
				out[n++] = b;
		}
		if (!ok)
			break;
	}
	*complete = lp_grammar_matcher_can_end(m);
	lp_grammar_matcher_free(m);
	out[n] = '\0';
	return n;
}

static void test_grammar_round_trip(void)
{
	static const struct {
		enum lp_chat_tools fmt;
		const char *choice;
	} modes[] = {
	    {LP_CHAT_TOOLS_HERMES, "\"required\""},
	    {LP_CHAT_TOOLS_HERMES, "{\"type\": \"function\", \"function\": {\"name\": "
	                           "\"get_weather\"}}"},
	    {LP_CHAT_TOOLS_LLAMA31, "\"required\""},
	    {LP_CHAT_TOOLS_MISTRAL, "\"required\""},
	    {LP_CHAT_TOOLS_NONE, "\"required\""},
	};
	uint64_t rng = 14;
	char body[1024], out[4096], why[512];
	int complete_outputs = 0;

	for (size_t mi = 0; mi < sizeof(modes) / sizeof(modes[0]); mi++) {
		struct lp_tools t;
		struct lp_api_error e;
		struct lp_grammar *g;
		struct lp_err err;
		snprintf(body, sizeof(body), TOOLS2 ", \"tool_choice\": %s}", modes[mi].choice);
		CHECK_PARSE(parse(body, modes[mi].fmt, &t, &e));
		if (lp_grammar_parse(&g, t.grammar, t.grammar_len, &err)) {
			lp_tools_release(&t);
			CHECK_MSG(0, "grammar: %s", err.msg);
		}
		for (int k = 0; k < 40; k++) {
			bool complete;
			size_t n = random_output(g, &rng, out, sizeof(out), &complete), cut;
			struct result r;
			if (!complete)
				continue;
			complete_outputs++;
			cut = n ? test_splitmix64(&rng) % n : 0;
			if (run(&t, out, &cut, 1, &r, why, sizeof(why)) || r.content_len ||
			    r.n_calls == 0) {
				lp_grammar_unref(g);
				lp_tools_release(&t);
				CHECK_MSG(0, "'%s': %zu calls, content '%s' %s", out, r.n_calls,
				          r.content, why);
			}
			for (size_t i = 0; i < r.n_calls; i++) {
				json_t *a = json_loads(r.args[i], 0, NULL);
				bool ok = json_is_object(a) &&
				          (strcmp(r.name[i], "get_weather") ||
				           json_is_string(json_object_get(a, "city")));
				json_decref(a);
				if (!ok) {
					lp_grammar_unref(g);
					lp_tools_release(&t);
					CHECK_MSG(0, "'%s': call %zu's arguments '%s'", out, i,
					          r.args[i]);
				}
			}
		}
		lp_grammar_unref(g);
		lp_tools_release(&t);
	}
	CHECK_MSG(complete_outputs >= 100, "only %d complete outputs", complete_outputs);
}

/* The JSON the response and its stream are written with. */
static void test_json(void)
{
	static const char text[] =
	    "Hi " HB(CALL_W) "\n" HB("{\"name\": \"get_time\", \"arguments\": {\"tz\": \"\xff\"}}");
	struct lp_tools t;
	struct lp_api_error e;
	struct lp_tool_parser *p;
	const struct lp_tool_event *ev;
	size_t n;
	struct lp_err err;
	json_t *j;
	char *s;

	CHECK_PARSE(parse(TOOLS2 "}", LP_CHAT_TOOLS_HERMES, &t, &e));
	CHECK_OK(lp_tool_parser_new(&p, &t, &err), &err);
	CHECK_OK(lp_tool_parser_feed(p, text, strlen(text), &ev, &n, &err), &err);
	/* content, then call 0's begin and arguments, then call 1's */
	CHECK_EQ_INT(n, 5);
	CHECK(lp_tool_event_json(&ev[0]) == NULL);
	j = lp_tool_event_json(&ev[1]);
	json_object_set_new(j, "id", json_string("X"));
	s = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
	json_decref(j);
	CHECK_EQ_STR(s, "{\"function\":{\"arguments\":\"\",\"name\":\"get_weather\"},\"id\":"
	                "\"X\",\"index\":0,\"type\":\"function\"}");
	free(s);
	j = lp_tool_event_json(&ev[4]);
	s = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
	json_decref(j);
	CHECK_EQ_STR(s, "{\"function\":{\"arguments\":\"{\\\"tz\\\": \\\"?\\\"}\"},\"index\":1}");
	free(s);
	CHECK_OK(lp_tool_parser_finish(p, &ev, &n, &err), &err);
	j = lp_tool_parser_calls_json(p);
	CHECK_EQ_INT(json_array_size(j), 2);
	CHECK_EQ_STR(json_string_value(json_object_get(json_array_get(j, 0), "type")), "function");
	CHECK(!strncmp(json_string_value(json_object_get(json_array_get(j, 1), "id")), "call_", 5));
	CHECK_EQ_STR(json_string_value(json_object_get(
	                 json_object_get(json_array_get(j, 0), "function"), "arguments")),
	             ARGS_W);
	CHECK_EQ_STR(json_string_value(json_object_get(
	                 json_object_get(json_array_get(j, 1), "function"), "name")),
	             "get_time");
	json_decref(j);
	lp_tool_parser_free(p);
	lp_tools_release(&t);
}

int main(void)
{
	TEST_MAIN_BEGIN("test-tools");
	RUN(test_refusals);
	RUN(test_too_many_tools);
	RUN(test_schema_refused);
	RUN(test_defaults);
	RUN(test_grammar_hermes);
	RUN(test_grammar_one_call);
	RUN(test_grammar_llama_mistral_generic);
	RUN(test_grammar_bad_choice);
	RUN(test_grammar_round_trip);
	RUN(test_parser_hermes_auto);
	RUN(test_parser_not_parallel);
	RUN(test_parser_llama_auto);
	RUN(test_parser_mistral_auto);
	RUN(test_parser_required);
	RUN(test_parser_streams);
	RUN(test_parser_choice_none);
	RUN(test_json);
	TEST_MAIN_END();
}
