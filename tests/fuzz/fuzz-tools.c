/* libFuzzer target: tool calling (agent/api/tools.c). The first byte picks
 * the template's tool format (bits 0-1) and the tool choice (bits 2-3:
 * auto, required, the named function get_time, required without parallel
 * calls). When the rest is a request body, a 0x01 byte and an output, the
 * body's tools are parsed; otherwise two fixed tools are used and the
 * rest is the model's output. The output goes through the parser whole,
 * cut in two, and byte by byte: the results must agree, the events must
 * join to the parser's final answer, "auto" output without calls must be
 * all content, and an output the grammar accepts must parse into calls. */
#include "tests/fuzz/fuzz.h"

#include <jansson.h>

#include "agent/api/tools.h"
#include "agent/engine/grammar.h"

#define MAX_OUT   4096 /* output bytes fed byte by byte */
#define MAX_CALLS LP_TOOLS_MAX_CALLS

struct result {
	struct lp_buf content;
	size_t n_calls;
	char id[MAX_CALLS][LP_TOOL_ID_MAX];
	const char *name[MAX_CALLS];
	struct lp_buf args[MAX_CALLS];
};

static void result_init(struct result *r)
{
	memset(r, 0, sizeof(*r));
	lp_buf_init(&r->content, LP_TOOLS_TEXT_MAX);
	for (size_t i = 0; i < MAX_CALLS; i++)
		lp_buf_init(&r->args[i], LP_TOOLS_TEXT_MAX);
}

static void result_release(struct result *r)
{
	lp_buf_release(&r->content);
	for (size_t i = 0; i < MAX_CALLS; i++)
		lp_buf_release(&r->args[i]);
}

static void take(struct result *r, const struct lp_tool_event *ev, size_t n)
{
	json_t *j;

	for (size_t i = 0; i < n; i++) {
		switch (ev[i].type) {
		case LP_TOOL_EVENT_CONTENT:
			FUZZ_ASSERT(ev[i].len > 0);
			FUZZ_ASSERT(!lp_buf_append(&r->content, ev[i].text, ev[i].len, NULL));
			break;
		case LP_TOOL_EVENT_CALL_BEGIN:
			FUZZ_ASSERT(ev[i].index == r->n_calls && r->n_calls < MAX_CALLS);
			j = lp_tool_event_json(&ev[i]);
			FUZZ_ASSERT(j != NULL);
			json_decref(j);
			snprintf(r->id[r->n_calls], LP_TOOL_ID_MAX, "%s", ev[i].id);
			r->name[r->n_calls++] = ev[i].name;
			break;
		case LP_TOOL_EVENT_ARGUMENTS:
			FUZZ_ASSERT(r->n_calls > 0 && ev[i].index == r->n_calls - 1);
			j = lp_tool_event_json(&ev[i]);
			FUZZ_ASSERT(j != NULL);
			json_decref(j);
			FUZZ_ASSERT(
			    !lp_buf_append(&r->args[ev[i].index], ev[i].text, ev[i].len, NULL));
			break;
		}
	}
}

static bool same_buf(const struct lp_buf *b, const char *s, size_t n)
{
	return b->len == n && (n == 0 || !memcmp(b->data, s, n));
}

/* Feeds out[0..n): first `first` bytes (maybe none), then pieces of
 * `step` (>= 1) bytes. */
static void run(const struct lp_tools *t, const char *out, size_t n, size_t first, size_t step,
                struct result *r)
{
	struct lp_tool_parser *p;
	const struct lp_tool_event *ev;
	size_t n_ev, off = 0, clen;
	struct lp_err err;
	const char *content;
	json_t *calls;

	result_init(r);
	FUZZ_ASSERT(lp_tool_parser_new(&p, t, &err) == 0);
	for (bool start = true; start || off < n; start = false) {
		size_t k = start ? first : step;
		if (k > n - off)
			k = n - off;
		FUZZ_ASSERT(lp_tool_parser_feed(p, out + off, k, &ev, &n_ev, &err) == 0);
		take(r, ev, n_ev);
		off += k;
	}
	FUZZ_ASSERT(lp_tool_parser_finish(p, &ev, &n_ev, &err) == 0);
	take(r, ev, n_ev);
	content = lp_tool_parser_content(p, &clen);
	FUZZ_ASSERT(same_buf(&r->content, content, clen));
	FUZZ_ASSERT(lp_tool_parser_n_calls(p) == r->n_calls);
	calls = lp_tool_parser_calls_json(p);
	FUZZ_ASSERT(json_array_size(calls) == r->n_calls);
	json_decref(calls);
	for (size_t i = 0; i < r->n_calls; i++) {
		const char *id, *name, *args;
		size_t alen;
		lp_tool_parser_call(p, i, &id, &name, &args, &alen);
		FUZZ_ASSERT(!strcmp(id, r->id[i]) && name == r->name[i]);
		FUZZ_ASSERT(same_buf(&r->args[i], args, alen));
		FUZZ_ASSERT(strlen(id) == (t->fmt == LP_CHAT_TOOLS_MISTRAL ? 9u : 29u));
	}
	lp_tool_parser_free(p);
}

static void same(const struct result *a, const struct result *b)
{
	FUZZ_ASSERT(same_buf(&a->content, b->content.data, b->content.len));
	FUZZ_ASSERT(a->n_calls == b->n_calls);
	for (size_t i = 0; i < a->n_calls; i++) {
		FUZZ_ASSERT(a->name[i] == b->name[i]);
		FUZZ_ASSERT(same_buf(&a->args[i], b->args[i].data, b->args[i].len));
	}
}

static const char *const choices[4] = {
    "",
    ", \"tool_choice\": \"required\"",
    ", \"tool_choice\": {\"type\": \"function\", \"function\": {\"name\": \"get_time\"}}",
    ", \"tool_choice\": \"required\", \"parallel_tool_calls\": false",
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	enum lp_chat_tools fmt;
	const char *out, *sep;
	size_t n;
	char body[1024];
	json_t *j;
	json_error_t je;
	struct lp_tools t;
	struct lp_api_error e;
	struct result whole, cut, bytes;
	bool fixed;
	int rc;

	if (size < 1)
		return 0;
	fmt = (enum lp_chat_tools)(data[0] & 3);
	out = (const char *)data + 1;
	n = size - 1;
	sep = n && out[0] == '{' ? memchr(out, 0x01, n) : NULL;
	fixed = sep == NULL;
	if (fixed) {
		snprintf(body, sizeof(body),
		         "{\"tools\": [{\"type\": \"function\", \"function\": {\"name\": "
		         "\"get_weather\", \"parameters\": {\"type\": \"object\", \"properties\": "
		         "{\"city\": {\"type\": \"string\"}, \"days\": {\"type\": \"integer\"}}, "
		         "\"required\": [\"city\"]}}}, {\"type\": \"function\", \"function\": "
		         "{\"name\": \"get_time\"}}]%s}",
		         choices[(data[0] >> 2) & 3]);
		j = json_loads(body, 0, &je);
	} else {
		j = json_loadb(out, (size_t)(sep - out), 0, &je);
		n -= (size_t)(sep - out) + 1;
		out = sep + 1;
		if (!j)
			return 0;
	}
	FUZZ_ASSERT(j != NULL);
	rc = lp_tools_parse(j, fmt, &t, &e);
	json_decref(j);
	if (rc) {
		FUZZ_ASSERT(rc < 0 && e.status >= 400 && e.status < 600 && e.message[0]);
		FUZZ_ASSERT(e.status != 400 || e.param[0]);
		FUZZ_ASSERT(!fixed || fmt == LP_CHAT_TOOLS_NONE);
		lp_tools_release(&t);
		return 0;
	}
	FUZZ_ASSERT((t.grammar != NULL) ==
	            (t.choice == LP_TOOL_CHOICE_REQUIRED || t.choice == LP_TOOL_CHOICE_NAMED));

	run(&t, out, n, n, n, &whole);
	run(&t, out, n, (size > 1 ? data[size - 1] : 0) % (n + 1), n, &cut);
	same(&whole, &cut);
	if (n <= MAX_OUT) {
		run(&t, out, n, 1, 1, &bytes);
		same(&whole, &bytes);
		result_release(&bytes);
	}
	/* text that is no call is content, byte for byte */
	if (whole.n_calls == 0)
		FUZZ_ASSERT(same_buf(&whole.content, out, n));
	if (t.grammar && fixed) {
		/* the grammar's text is always a grammar, and what it accepts
		 * parses into calls and nothing else */
		struct lp_grammar *g;
		struct lp_err err;
		FUZZ_ASSERT(lp_grammar_parse(&g, t.grammar, t.grammar_len, &err) == 0);
		if (lp_grammar_match(g, out, n) == 1) {
			FUZZ_ASSERT(whole.n_calls >= 1 && whole.content.len == 0);
			FUZZ_ASSERT(t.parallel || whole.n_calls == 1);
		}
		lp_grammar_unref(g);
	}
	result_release(&whole);
	result_release(&cut);
	lp_tools_release(&t);
	return 0;
}
