/* Chat template tests: each family is detected from its real Jinja
 * template and renders byte for byte what jinja2 rendered for the same
 * messages (tests/fixtures/chat/goldens.json, written by
 * hack/make-tokenizer-fixtures.py), including the conversations the
 * template rejects; unknown roles and templates are errors. The families
 * with a tool format render tools, tool calls and tool results as
 * transformers does (tests/fixtures/chat/tool-goldens.json, written by
 * hack/make-tool-goldens.py); the others refuse them, and render them in
 * the generic tool format when asked. */
#include <errno.h>
#include <jansson.h>
#include <stdbool.h>
#include <time.h>

#include "agent/engine/chat-template.h"
#include "common/buf.h"
#include "tests/test.h"

#define MAX_MSGS  16
#define MAX_CALLS 4

static json_t *load_fixture(const char *name)
{
	char path[512];
	json_error_t jerr;
	json_t *g;

	snprintf(path, sizeof(path), "%s/chat/%s", test_fixtures_dir(), name);
	g = json_load_file(path, 0, &jerr);
	if (!g)
		printf("# %s: %s\n", path, jerr.text);
	return g;
}

static json_t *goldens(void)
{
	static json_t *g;

	if (!g)
		g = load_fixture("goldens.json");
	return g;
}

static json_t *tool_goldens(void)
{
	static json_t *g;

	if (!g)
		g = load_fixture("tool-goldens.json");
	return g;
}

static const json_t *family(const char *name)
{
	return json_object_get(json_object_get(goldens(), "templates"), name);
}

static const char *family_template(const char *name)
{
	return json_string_value(json_object_get(family(name), "template"));
}

/* A conversation as the API layer hands it over, read from the fixtures'
 * OpenAI-style messages (borrowing their strings). */
struct conv {
	struct lp_chat_message m[MAX_MSGS];
	struct lp_chat_tool_call calls[MAX_MSGS][MAX_CALLS];
	size_t n;
};

static void conv_load(struct conv *c, const json_t *msgs)
{
	const json_t *mj, *cj;
	size_t k, j;

	memset(c, 0, sizeof(*c));
	json_array_foreach(msgs, k, mj)
	{
		struct lp_chat_message *m = &c->m[k];

		if (k == MAX_MSGS)
			break;
		m->role = json_string_value(json_object_get(mj, "role"));
		m->content = json_string_value(json_object_get(mj, "content"));
		m->tool_call_id = json_string_value(json_object_get(mj, "tool_call_id"));
		m->name = json_string_value(json_object_get(mj, "name"));
		json_array_foreach(json_object_get(mj, "tool_calls"), j, cj)
		{
			const json_t *fn = json_object_get(cj, "function");

			if (j == MAX_CALLS)
				break;
			c->calls[k][j].id = json_string_value(json_object_get(cj, "id"));
			c->calls[k][j].name = json_string_value(json_object_get(fn, "name"));
			c->calls[k][j].arguments =
			    json_string_value(json_object_get(fn, "arguments"));
			m->tool_calls = c->calls[k];
			m->n_tool_calls = j + 1;
		}
		c->n = k + 1;
	}
}

static enum lp_chat_style style_of(const char *name)
{
	if (strcmp(name, "chatml") == 0)
		return LP_CHAT_CHATML;
	if (strcmp(name, "llama3") == 0)
		return LP_CHAT_LLAMA3;
	if (strcmp(name, "llama3.1") == 0)
		return LP_CHAT_LLAMA31;
	if (strcmp(name, "llama2") == 0)
		return LP_CHAT_LLAMA2;
	if (strcmp(name, "qwen3") == 0)
		return LP_CHAT_QWEN3;
	if (strcmp(name, "mistral-v0.3") == 0)
		return LP_CHAT_MISTRAL_V3;
	return LP_CHAT_MISTRAL;
}

static void test_goldens_cover_every_family(void)
{
	const json_t *cases;
	size_t i, errors = 0;
	int seen[8] = {0};

	CHECK(goldens());
	cases = json_object_get(goldens(), "cases");
	CHECK(json_array_size(cases) >= 40);
	for (i = 0; i < json_array_size(cases); i++) {
		const json_t *c = json_array_get(cases, i);

		seen[style_of(json_string_value(json_object_get(c, "style")))]++;
		if (!json_is_null(json_object_get(c, "error")))
			errors++;
	}
	CHECK(seen[LP_CHAT_CHATML] && seen[LP_CHAT_LLAMA3] && seen[LP_CHAT_LLAMA2] &&
	      seen[LP_CHAT_MISTRAL] && seen[LP_CHAT_QWEN3] && seen[LP_CHAT_LLAMA31] &&
	      seen[LP_CHAT_MISTRAL_V3]);
	CHECK(errors >= 4);
}

static void test_detects_each_family(void)
{
	static const char *families[] = {"smollm2", "llama3", "llama2",   "mistral",
	                                 "qwen2.5", "qwen3",  "llama3.1", "mistral-v0.3"};
	static const enum lp_chat_style styles[] = {
	    LP_CHAT_CHATML, LP_CHAT_LLAMA3, LP_CHAT_LLAMA2,  LP_CHAT_MISTRAL,
	    LP_CHAT_CHATML, LP_CHAT_QWEN3,  LP_CHAT_LLAMA31, LP_CHAT_MISTRAL_V3};
	static const enum lp_chat_tools tools[] = {LP_CHAT_TOOLS_NONE,    LP_CHAT_TOOLS_NONE,
	                                           LP_CHAT_TOOLS_NONE,    LP_CHAT_TOOLS_NONE,
	                                           LP_CHAT_TOOLS_HERMES,  LP_CHAT_TOOLS_HERMES,
	                                           LP_CHAT_TOOLS_LLAMA31, LP_CHAT_TOOLS_MISTRAL};
	struct lp_chat_template ct;
	struct lp_err err = {0};
	size_t i;

	CHECK(goldens());
	for (i = 0; i < sizeof(families) / sizeof(families[0]); i++) {
		const char *t = family_template(families[i]);

		CHECK_MSG(t, "no template for %s", families[i]);
		CHECK_OK(lp_chat_template_detect(&ct, t, NULL, NULL, &err), &err);
		CHECK_MSG(ct.style == styles[i], "%s detected as %d", families[i], (int)ct.style);
		CHECK_MSG(ct.tools == tools[i], "%s: tool format %d", families[i], (int)ct.tools);
		CHECK(!ct.date_today);
		if (i == 0)
			CHECK_EQ_STR(
			    ct.default_system,
			    "You are a helpful AI assistant named SmolLM, trained by Hugging "
			    "Face");
		else if (i == 4)
			CHECK_EQ_STR(
			    ct.default_system,
			    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.");
		else
			CHECK(ct.default_system == NULL);
		lp_chat_template_release(&ct);
	}
}

/* Renders every case of a goldens file: the output, or the error the
 * template raises (-EINVAL, out untouched). */
static void check_cases(const json_t *cases, bool with_tools)
{
	struct lp_buf out;
	struct conv *cv = malloc(sizeof(*cv));
	size_t i;

	CHECK(cv);
	lp_buf_init(&out, 1 << 20);
	for (i = 0; i < json_array_size(cases); i++) {
		const json_t *c = json_array_get(cases, i);
		const char *name = json_string_value(json_object_get(c, "name"));
		const json_t *fam = family(json_string_value(json_object_get(c, "family")));
		const json_t *rendered = json_object_get(c, "rendered");
		struct lp_chat_template ct;
		struct lp_err err = {0};
		int rc;

		conv_load(cv, json_object_get(c, "messages"));
		rc = lp_chat_template_detect(&ct,
		                             json_string_value(json_object_get(fam, "template")),
		                             json_string_value(json_object_get(fam, "bos")),
		                             json_string_value(json_object_get(fam, "eos")), &err);
		if (rc) {
			lp_buf_release(&out);
			free(cv);
			CHECK_MSG(0, "%s: detect: %s", name, err.msg);
		}
		lp_buf_reset(&out);
		lp_buf_append(&out, "prefix:", 7, NULL);
		rc = lp_chat_template_render(
		    &ct, cv->m, cv->n, with_tools ? json_object_get(c, "tools") : NULL,
		    json_is_true(json_object_get(c, "add_generation_prompt")), &out, &err);
		lp_chat_template_release(&ct);
		if (json_is_null(rendered)) {
			/* the template raises: an error, and out is untouched */
			if (rc != -EINVAL || out.len != 7 || !err.msg[0]) {
				lp_buf_release(&out);
				free(cv);
				CHECK_MSG(0, "%s: rendered (rc %d) where the template raises", name,
				          rc);
			}
			continue;
		}
		if (rc || out.len != 7 + json_string_length(rendered) ||
		    memcmp(out.data + 7, json_string_value(rendered), out.len - 7) != 0) {
			printf("# got:      '%s'\n# expected: '%s'\n", rc ? err.msg : out.data + 7,
			       json_string_value(rendered));
			lp_buf_release(&out);
			free(cv);
			CHECK_MSG(0, "%s: rendering differs (rc %d)", name, rc);
		}
	}
	lp_buf_release(&out);
	free(cv);
}

static void test_renders_like_jinja(void)
{
	CHECK(goldens());
	check_cases(json_object_get(goldens(), "cases"), false);
}

/* Every family with a tool format, with tools, one and two calls, results,
 * system prompts, unicode and floats, and what each template raises on. */
static void test_renders_tools_like_transformers(void)
{
	const json_t *cases, *c;
	size_t i, errors = 0, with_calls = 0;

	CHECK(goldens() && tool_goldens());
	cases = json_object_get(tool_goldens(), "cases");
	CHECK(json_array_size(cases) >= 40);
	json_array_foreach(cases, i, c)
	{
		const json_t *m;
		size_t k;

		errors += json_is_null(json_object_get(c, "rendered"));
		json_array_foreach(json_object_get(c, "messages"), k, m)
		{
			with_calls += json_array_size(json_object_get(m, "tool_calls")) == 2;
		}
	}
	/* parallel calls in each of the four families, some rendered */
	CHECK(errors >= 4 && with_calls >= 8);
	check_cases(cases, true);
}

static void test_unknown_role_is_an_error(void)
{
	static const char *names[] = {"chatml", "llama3", "llama2",   "mistral",
	                              "qwen3",  "gemma",  "llama3.1", "mistral-v0.3"};
	struct lp_chat_message m[2] = {{.role = "user", .content = "hi"},
	                               {.role = "robot", .content = "{}"}};
	struct lp_buf out;
	size_t i;

	lp_buf_init(&out, 1 << 16);
	for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		struct lp_chat_template ct;
		struct lp_err err = {0};

		CHECK_OK(lp_chat_template_from_name(&ct, names[i], NULL, NULL, &err), &err);
		CHECK_EQ_INT(lp_chat_template_render(&ct, m, 2, NULL, true, &out, &err), -EINVAL);
		CHECK_MSG(strstr(err.msg, "unknown role 'robot'"), "%s: '%s'", names[i], err.msg);
		CHECK_EQ_INT(out.len, 0);
		m[1].role = NULL;
		CHECK_EQ_INT(lp_chat_template_render(&ct, m, 2, NULL, true, &out, &err), -EINVAL);
		m[1].role = "robot";
		lp_chat_template_release(&ct);
	}
	lp_buf_release(&out);
}

static json_t *weather_tools(void)
{
	return json_loads("[{\"type\": \"function\", \"function\": {\"name\": "
	                  "\"get_weather\", \"parameters\": {\"type\": \"object\"}}}]",
	                  0, NULL);
}

/* Tools, tool calls and tool results need a template with a tool format:
 * -ENOTSUP saying so, and out untouched. */
static void test_no_tool_format_is_not_supported(void)
{
	static const char *names[] = {"chatml", "llama3", "llama2", "mistral", "gemma"};
	const struct lp_chat_tool_call call = {"a1B2c3D4e", "get_weather", "{\"city\": \"Paris\"}"};
	const struct lp_chat_message plain[] = {{.role = "user", .content = "hi"}};
	const struct lp_chat_message calls[] = {
	    {.role = "user", .content = "hi"},
	    {.role = "assistant", .tool_calls = &call, .n_tool_calls = 1}};
	const struct lp_chat_message result[] = {
	    {.role = "user", .content = "hi"},
	    {.role = "tool", .content = "18", .tool_call_id = "a1B2c3D4e"}};
	json_t *tools = weather_tools(), *empty = json_array();
	struct lp_buf out;
	size_t i;

	CHECK(tools && empty);
	lp_buf_init(&out, 1 << 16);
	for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		struct lp_chat_template ct;
		struct lp_err err = {0};

		CHECK_OK(lp_chat_template_from_name(&ct, names[i], NULL, NULL, &err), &err);
		CHECK_EQ_INT(ct.tools, LP_CHAT_TOOLS_NONE);
		CHECK_EQ_INT(lp_chat_template_render(&ct, plain, 1, tools, true, &out, &err),
		             -ENOTSUP);
		CHECK_MSG(strstr(err.msg, "no tool format"), "%s: '%s'", names[i], err.msg);
		CHECK_EQ_INT(lp_chat_template_render(&ct, calls, 2, NULL, true, &out, &err),
		             -ENOTSUP);
		CHECK_EQ_INT(lp_chat_template_render(&ct, result, 2, NULL, true, &out, &err),
		             -ENOTSUP);
		CHECK_EQ_INT(out.len, 0);
		/* an empty tools array is no tools */
		CHECK_OK(lp_chat_template_render(&ct, plain, 1, empty, true, &out, &err), &err);
		lp_chat_template_release(&ct);
		lp_buf_reset(&out);
	}
	lp_buf_release(&out);
	json_decref(tools);
	json_decref(empty);
}

/* Malformed tools and tool calls are -EINVAL with a message. */
static void test_bad_tool_input_is_an_error(void)
{
	static const char *bad_tools[] = {
	    "{\"type\": \"function\"}",
	    "[{\"type\": \"function\"}]",
	    "[{\"type\": \"code\", \"function\": {\"name\": \"f\"}}]",
	    "[{\"type\": \"function\", \"function\": {\"name\": \"\"}}]",
	};
	struct lp_chat_tool_call call = {"a1B2c3D4e", "get_weather", "[1, 2]"};
	struct lp_chat_message calls[] = {
	    {.role = "user", .content = "hi"},
	    {.role = "assistant", .tool_calls = &call, .n_tool_calls = 1}};
	struct lp_chat_template ct;
	struct lp_err err = {0};
	struct lp_buf out;
	size_t i;

	lp_buf_init(&out, 1 << 16);
	CHECK_OK(lp_chat_template_from_name(&ct, "qwen3", NULL, NULL, &err), &err);
	for (i = 0; i < sizeof(bad_tools) / sizeof(bad_tools[0]); i++) {
		json_t *t = json_loads(bad_tools[i], JSON_DECODE_ANY, NULL);
		int rc = lp_chat_template_render(&ct, calls, 1, t, true, &out, &err);

		json_decref(t);
		CHECK_MSG(rc == -EINVAL && strstr(err.msg, "tools"), "tools %zu: rc %d '%s'", i, rc,
		          err.msg);
	}
	/* arguments that are not a JSON object */
	CHECK_EQ_INT(lp_chat_template_render(&ct, calls, 2, NULL, true, &out, &err), -EINVAL);
	CHECK_MSG(strstr(err.msg, "not a JSON object"), "'%s'", err.msg);
	call.arguments = "{\"city\": ";
	CHECK_EQ_INT(lp_chat_template_render(&ct, calls, 2, NULL, true, &out, &err), -EINVAL);
	call.arguments = NULL;
	CHECK_EQ_INT(lp_chat_template_render(&ct, calls, 2, NULL, true, &out, &err), -EINVAL);
	call.arguments = "{}";
	/* calls only on assistant messages; content only absent with calls */
	calls[0].tool_calls = &call;
	calls[0].n_tool_calls = 1;
	CHECK_EQ_INT(lp_chat_template_render(&ct, calls, 2, NULL, true, &out, &err), -EINVAL);
	CHECK_MSG(strstr(err.msg, "only assistant messages"), "'%s'", err.msg);
	calls[0].n_tool_calls = 0;
	calls[1].n_tool_calls = 0;
	CHECK_EQ_INT(lp_chat_template_render(&ct, calls, 2, NULL, true, &out, &err), -EINVAL);
	CHECK_MSG(strstr(err.msg, "no content"), "'%s'", err.msg);
	CHECK_EQ_INT(out.len, 0);
	lp_chat_template_release(&ct);
	/* Mistral v0.3 needs 9-character ids, Llama 3.1 one call per message */
	calls[1].n_tool_calls = 1;
	call.id = "call_1";
	CHECK_OK(lp_chat_template_from_name(&ct, "mistral-v0.3", NULL, NULL, &err), &err);
	CHECK_EQ_INT(lp_chat_template_render(&ct, calls, 2, NULL, true, &out, &err), -EINVAL);
	CHECK_MSG(strstr(err.msg, "9 characters") && strstr(err.msg, "'call_1'"), "'%s'", err.msg);
	call.id = "ab\u00e7defghi"; /* 9 characters, 10 bytes */
	CHECK_OK(lp_chat_template_render(&ct, calls, 2, NULL, true, &out, &err), &err);
	lp_chat_template_release(&ct);
	CHECK_EQ_STR(out.data, "<s>[INST] hi[/INST][TOOL_CALLS] [{\"name\": \"get_weather\", "
	                       "\"arguments\": {}, \"id\": \"ab\u00e7defghi\"}]</s>");
	lp_buf_release(&out);
}

/* lp_chat_tojson writes what Python's json.dumps(ensure_ascii=False) does */
static void test_tojson_is_python_json_dumps(void)
{
	static const char in[] =
	    "{\"f\": [0.5, 1e-07, 1e16, 1e15, 100.0, -0.0, 0.30000000000000004, 1.5e300, "
	    "5e-324, 123456.789, 0.0001, 0.00012, 1e-05, 2.5e-05, 1234567890123456.0, 1e+22, "
	    "0.1, 3.14159], \"i\": [0, -7, 9007199254740993, -9223372036854775808], \"s\": "
	    "\"\u00e9\\\"\\\\\\n\\r\\t\\b\\f\\u0001\\u001f\\u007f\\u2028 \U0001F326\", \"e\": {}, "
	    "\"a\": [], \"n\": null, \"b\": [true, false], \"o\": {\"z\": 1, \"a\": {\"k\": "
	    "[]}}}";
	static const char want[] =
	    "{\"f\": [0.5, 1e-07, 1e+16, 1000000000000000.0, 100.0, -0.0, 0.30000000000000004, "
	    "1.5e+300, 5e-324, 123456.789, 0.0001, 0.00012, 1e-05, 2.5e-05, 1234567890123456.0, "
	    "1e+22, 0.1, 3.14159], \"i\": [0, -7, 9007199254740993, -9223372036854775808], "
	    "\"s\": \"\u00e9\\\"\\\\\\n\\r\\t\\b\\f\\u0001\\u001f\x7f"
	    "\u2028 \U0001F326\", \"e\": {}, \"a\": [], \"n\": null, \"b\": [true, false], "
	    "\"o\": {\"z\": 1, \"a\": {\"k\": []}}}";
	static const char want_indented[] =
	    "{\n    \"o\": {\n        \"z\": 1,\n        \"a\": {\n            \"k\": []\n  "
	    "      }\n    },\n    \"e\": {},\n    \"a\": [\n        1,\n        [\n         "
	    "   2,\n            {}\n        ]\n    ]\n}";
	json_error_t jerr;
	json_t *v = json_loads(in, 0, &jerr), *w;
	struct lp_err err = {0};
	struct lp_buf out;

	CHECK_MSG(v, "%s", jerr.text);
	lp_buf_init(&out, 1 << 16);
	CHECK_OK(lp_chat_tojson(v, 0, &out, &err), &err);
	CHECK_EQ_STR(out.data, want);
	lp_buf_reset(&out);
	w = json_loads("{\"o\": {\"z\": 1, \"a\": {\"k\": []}}, \"e\": {}, \"a\": [1, [2, {}]]}", 0,
	               NULL);
	CHECK_OK(lp_chat_tojson(w, 4, &out, &err), &err);
	CHECK_EQ_STR(out.data, want_indented);
	json_decref(v);
	json_decref(w);
	lp_buf_release(&out);
}

/* Llama 3.2's template writes the day of the render as "Today Date". */
static void test_llama32_writes_today(void)
{
	const char *t = family_template("llama3.1");
	struct lp_chat_message m[] = {{.role = "user", .content = "hi"}};
	struct lp_chat_template ct;
	struct lp_err err = {0};
	struct lp_buf out, tmpl;
	char before[32], after[32], *date;
	time_t now = time(NULL);

	CHECK(t);
	lp_buf_init(&tmpl, 1 << 16);
	lp_buf_init(&out, 1 << 16);
	lp_buf_appendf(&tmpl, NULL, "%s{#- strftime_now(\"%%d %%b %%Y\") #}", t);
	CHECK_OK(lp_chat_template_detect(&ct, tmpl.data, NULL, NULL, &err), &err);
	CHECK(ct.date_today && ct.style == LP_CHAT_LLAMA31);
	strftime(before, sizeof(before), "%d %b %Y", localtime(&now));
	CHECK_OK(lp_chat_template_render(&ct, m, 1, NULL, true, &out, &err), &err);
	now = time(NULL);
	strftime(after, sizeof(after), "%d %b %Y", localtime(&now));
	date = strstr(out.data, "Today Date: ");
	CHECK(date);
	date += strlen("Today Date: ");
	CHECK_MSG(!strncmp(date, before, strlen(before)) || !strncmp(date, after, strlen(after)),
	          "'%.20s', expected '%s'", date, before);
	lp_chat_template_release(&ct);
	lp_buf_release(&out);
	lp_buf_release(&tmpl);
}

/* The generic format: the tools in the system message, calls as the JSON
 * array, results (and the user message after them) in one user turn. */
static void test_generic_tools(void)
{
	static const char want[] =
	    "<|im_start|>system\nBe brief.\n\nYou can call the following functions, each given "
	    "as a JSON object with its name, description and parameters (a JSON Schema):\n"
	    "{\"name\": \"get_weather\", \"parameters\": {\"type\": \"object\"}}\nTo call "
	    "functions, answer with only a JSON array holding one object per call: [{\"name\": "
	    "\"<function name>\", \"arguments\": {<argument name>: <value>, ...}}]<|im_end|>\n"
	    "<|im_start|>user\nWeather in Paris and Lyon?<|im_end|>\n"
	    "<|im_start|>assistant\nLet me see.\n[{\"name\": \"get_weather\", \"arguments\": "
	    "{\"city\": \"Paris\"}}, {\"name\": \"get_weather\", \"arguments\": {\"city\": "
	    "\"Lyon\", \"n\": 0.5}}]<|im_end|>\n"
	    "<|im_start|>user\nResult of get_weather (call c1): 18 C\n\nResult of get_time (call "
	    "c9): 09:30\n\nResult: none\n\nThanks<|im_end|>\n<|im_start|>assistant\n";
	const struct lp_chat_tool_call calls[] = {
	    {"c1", "get_weather", "{\"city\":\"Paris\"}"},
	    {"c2", "get_weather", "{\"city\": \"Lyon\", \"n\": 5e-1}"}};
	const struct lp_chat_message m[] = {
	    {.role = "system", .content = "Be brief."},
	    {.role = "user", .content = "Weather in Paris and Lyon?"},
	    {.role = "assistant", .content = "Let me see.", .tool_calls = calls, .n_tool_calls = 2},
	    {.role = "tool", .content = "18 C", .tool_call_id = "c1"},
	    {.role = "tool", .content = "09:30", .tool_call_id = "c9", .name = "get_time"},
	    {.role = "tool", .content = "none"},
	    {.role = "user", .content = "Thanks"},
	    {.role = "assistant", .content = "You're welcome."},
	    {.role = "user", .content = "Bye"}};
	static const char *names[] = {"llama3", "llama2",   "mistral",     "gemma",
	                              "qwen3",  "llama3.1", "mistral-v0.3"};
	json_t *tools = weather_tools();
	struct lp_chat_template ct;
	struct lp_err err = {0};
	struct lp_buf out;
	size_t i;

	CHECK(tools);
	lp_buf_init(&out, 1 << 16);
	CHECK_OK(lp_chat_template_from_name(&ct, "chatml", NULL, NULL, &err), &err);
	CHECK_OK(lp_chat_template_render_generic_tools(&ct, m, 7, tools, true, &out, &err), &err);
	CHECK_EQ_STR(out.data, want);
	lp_chat_template_release(&ct);
	/* the turns alternate, so every family takes the conversation */
	for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		lp_buf_reset(&out);
		CHECK_OK(lp_chat_template_from_name(&ct, names[i], NULL, NULL, &err), &err);
		CHECK_OK(lp_chat_template_render_generic_tools(&ct, m, 9, tools, true, &out, &err),
		         &err);
		CHECK_MSG(strstr(out.data, "You can call the following functions") &&
		              strstr(out.data, "Result of get_time (call c9): 09:30"),
		          "%s: '%s'", names[i], out.data);
		lp_chat_template_release(&ct);
	}
	/* without a system message, the template's default one comes first */
	lp_buf_reset(&out);
	CHECK_OK(lp_chat_template_detect(&ct, family_template("smollm2"), NULL, NULL, &err), &err);
	CHECK_OK(lp_chat_template_render_generic_tools(&ct, m + 1, 1, tools, true, &out, &err),
	         &err);
	CHECK_MSG(strstr(out.data, "<|im_start|>system\nYou are a helpful AI assistant named "
	                           "SmolLM, trained by Hugging Face\n\nYou can call"),
	          "'%s'", out.data);
	lp_chat_template_release(&ct);
	lp_buf_release(&out);
	json_decref(tools);
}

static void test_undetectable_template_is_an_error(void)
{
	static const char *bad[] = {
	    "{% for m in messages %}{{ m['content'] }}{% endfor %}",
	    "<start_of_turn>user\n{{ content }}<end_of_turn>",
	    /* Mistral v0.3 puts the system prompt in the last user turn */
	    "{%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message "
	    "+ '\\n\\n' + message['content'] + '[/INST]' }}",
	    "",
	};
	struct lp_chat_template ct;
	struct lp_err err = {0};
	size_t i;

	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		int rc = lp_chat_template_detect(&ct, bad[i], NULL, NULL, &err);

		CHECK_MSG(rc == (i == 3 ? -EINVAL : -ENOTSUP), "template %zu: rc %d", i, rc);
		CHECK(err.msg[0]);
		CHECK(ct.bos == NULL && ct.eos == NULL && ct.default_system == NULL);
	}
	CHECK_EQ_INT(lp_chat_template_detect(&ct, NULL, NULL, NULL, &err), -EINVAL);
	CHECK_EQ_INT(lp_chat_template_from_name(&ct, "vicuna", NULL, NULL, &err), -EINVAL);
	CHECK(strstr(err.msg, "'vicuna'") != NULL);
}

static void test_markers_follow_the_tokenizer(void)
{
	struct lp_chat_template ct;
	struct lp_chat_message m[2] = {{.role = "user", .content = "hi"},
	                               {.role = "assistant", .content = "yo"}};
	struct lp_err err = {0};
	struct lp_buf out;

	lp_buf_init(&out, 1 << 16);
	CHECK_OK(lp_chat_template_from_name(&ct, "mistral", "<BOS>", "<EOS>", &err), &err);
	CHECK_OK(lp_chat_template_render(&ct, m, 2, NULL, true, &out, &err), &err);
	CHECK_EQ_STR(out.data, "<BOS> [INST] hi [/INST] yo<EOS>");
	lp_chat_template_release(&ct);
	lp_buf_reset(&out);
	/* chatml by name has no default system prompt */
	CHECK_OK(lp_chat_template_from_name(&ct, "chatml", NULL, NULL, &err), &err);
	CHECK(ct.default_system == NULL);
	CHECK_OK(lp_chat_template_render(&ct, m, 1, NULL, true, &out, &err), &err);
	CHECK_EQ_STR(out.data, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
	lp_chat_template_release(&ct);
	lp_buf_release(&out);
}

static void test_chatml_default_system_escaped(void)
{
	/* the literal may also be written with escapes (\n, \') */
	static const char tmpl[] = "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system"
	                           "\\nYou\\'re helpful.\\nBe brief.<|im_end|>\\n' }}{% endif %}";
	struct lp_chat_template ct;
	struct lp_err err = {0};

	CHECK_OK(lp_chat_template_detect(&ct, tmpl, NULL, NULL, &err), &err);
	CHECK_EQ_INT(ct.style, LP_CHAT_CHATML);
	CHECK_EQ_STR(ct.default_system, "You're helpful.\nBe brief.");
	lp_chat_template_release(&ct);
}

int main(void)
{
	TEST_MAIN_BEGIN("test-chat-template");
	RUN(test_goldens_cover_every_family);
	RUN(test_detects_each_family);
	RUN(test_renders_like_jinja);
	RUN(test_renders_tools_like_transformers);
	RUN(test_unknown_role_is_an_error);
	RUN(test_no_tool_format_is_not_supported);
	RUN(test_bad_tool_input_is_an_error);
	RUN(test_tojson_is_python_json_dumps);
	RUN(test_llama32_writes_today);
	RUN(test_generic_tools);
	RUN(test_undetectable_template_is_an_error);
	RUN(test_markers_follow_the_tokenizer);
	RUN(test_chatml_default_system_escaped);
	json_decref(goldens());
	json_decref(tool_goldens());
	TEST_MAIN_END();
}
