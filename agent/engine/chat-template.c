/* Chat templates: each supported family's Jinja template re-written as C
 * that renders the same bytes as transformers' apply_chat_template
 * (jinja2 with trim_blocks and lstrip_blocks). The family is recognised by
 * the markers its template writes; a ChatML default system prompt
 * (SmolLM2's, Qwen2.5's) is read out of its template text.
 * tests/fixtures/chat/goldens.json holds the real templates' output for
 * every family. The families with a tool format (Qwen2.5 and Qwen3's
 * Hermes style, Llama 3.1, Mistral v0.3) also render tools, tool calls and
 * tool results, writing JSON as the templates' tojson (Python's json.dumps)
 * does (tests/fixtures/chat/tool-goldens.json); any template can render
 * them in loraplane's generic format. */
#include "agent/engine/chat-template.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "agent/engine/unicode-utf8.h"

#define CHAT_MAX_SYSTEM 4096 /* longest default system prompt read from a template */

static char *dup_str(const char *s)
{
	size_t n;
	char *p;

	if (!s)
		return NULL;
	n = strlen(s);
	p = malloc(n + 1);
	if (p)
		memcpy(p, s, n + 1);
	return p;
}

void lp_chat_template_release(struct lp_chat_template *ct)
{
	free(ct->default_system);
	free(ct->bos);
	free(ct->eos);
	ct->default_system = NULL;
	ct->bos = NULL;
	ct->eos = NULL;
}

/* Fills bos/eos with the tokenizer's texts, or the family's usual ones. */
static int set_markers(struct lp_chat_template *ct, const char *bos, const char *eos,
                       struct lp_err *err)
{
	const char *b = NULL, *e = NULL;

	switch (ct->style) {
	case LP_CHAT_CHATML:
	case LP_CHAT_QWEN3:
		/* no BOS; each turn ends with <|im_end|> */
		e = "<|im_end|>";
		break;
	case LP_CHAT_LLAMA3:
	case LP_CHAT_LLAMA31:
		b = bos ? bos : "<|begin_of_text|>";
		e = "<|eot_id|>";
		break;
	case LP_CHAT_LLAMA2:
	case LP_CHAT_MISTRAL:
	case LP_CHAT_MISTRAL_V3:
		b = bos ? bos : "<s>";
		e = eos ? eos : "</s>";
		break;
	case LP_CHAT_GEMMA:
		b = bos ? bos : "<bos>";
		e = "<end_of_turn>";
		break;
	}
	if ((b && !(ct->bos = dup_str(b))) || (e && !(ct->eos = dup_str(e)))) {
		lp_chat_template_release(ct);
		return lp_errf(err, -ENOMEM, "out of memory");
	}
	return 0;
}

/* The text of a Jinja string literal between p and end, with its escapes
 * undone; NULL if it holds anything a literal cannot (quotes, code). */
static char *unescape_literal(const char *p, const char *end)
{
	char *out, *o;

	if (end - p > CHAT_MAX_SYSTEM)
		return NULL;
	out = malloc((size_t)(end - p) + 1);
	if (!out)
		return NULL;
	for (o = out; p < end; p++) {
		if (*p == '\'' || *p == '"' || *p == '{' || *p == '}')
			goto bad;
		if (*p != '\\') {
			*o++ = *p;
			continue;
		}
		if (++p == end)
			goto bad;
		switch (*p) {
		case 'n':
			*o++ = '\n';
			break;
		case 't':
			*o++ = '\t';
			break;
		case '\\':
		case '\'':
		case '"':
			*o++ = *p;
			break;
		default:
			goto bad;
		}
	}
	*o = '\0';
	return out;
bad:
	free(out);
	return NULL;
}

/* A ChatML template that adds a system turn of its own when the
 * conversation has none writes it as one literal:
 * '<|im_start|>system\n...<|im_end|>'. */
static char *default_system(const char *jinja)
{
	static const char open[] = "<|im_start|>system";
	const char *p = jinja;

	while ((p = strstr(p, open))) {
		const char *body = p + sizeof(open) - 1, *end;
		char *text;

		p = body;
		if (*body == '\n')
			body++;
		else if (body[0] == '\\' && body[1] == 'n')
			body += 2;
		else
			continue;
		end = strstr(body, "<|im_end|>");
		if (!end)
			break;
		if ((text = unescape_literal(body, end)))
			return text;
	}
	return NULL;
}

/* Qwen2.5's and Qwen3's tool section: <tools> in the system turn, calls in
 * <tool_call> blocks, results in <tool_response> blocks. */
static bool hermes_tools(const char *jinja)
{
	return strstr(jinja, "You may call one or more functions to assist with the user query.") &&
	       strstr(jinja, "<tool_call>") && strstr(jinja, "<tool_response>") &&
	       strstr(jinja, "tool_call.arguments");
}

int lp_chat_template_detect(struct lp_chat_template *ct, const char *jinja, const char *bos,
                            const char *eos, struct lp_err *err)
{
	memset(ct, 0, sizeof(*ct));
	if (!jinja || !*jinja)
		return lp_errf(err, -EINVAL, "the model has no chat template");
	if (strstr(jinja, "<|im_start|>") && strstr(jinja, "</think>") &&
	    strstr(jinja, "last_query_index")) {
		/* Qwen3's reasoning rules; no default system prompt */
		ct->style = LP_CHAT_QWEN3;
		ct->tools = hermes_tools(jinja) ? LP_CHAT_TOOLS_HERMES : LP_CHAT_TOOLS_NONE;
	} else if (strstr(jinja, "<|im_start|>")) {
		ct->style = LP_CHAT_CHATML;
		ct->tools = hermes_tools(jinja) ? LP_CHAT_TOOLS_HERMES : LP_CHAT_TOOLS_NONE;
		ct->default_system = default_system(jinja);
	} else if (strstr(jinja, "<|start_header_id|>") && strstr(jinja, "<|eot_id|>") &&
	           strstr(jinja, "Environment: ipython") &&
	           strstr(jinja, "Cutting Knowledge Date: December 2023") &&
	           strstr(jinja, "set tools_in_user_message = true") &&
	           strstr(jinja, "<|start_header_id|>ipython<|end_header_id|>")) {
		/* Llama 3.1/3.3 (date fixed), 3.2 (date of the day) */
		ct->style = LP_CHAT_LLAMA31;
		ct->tools = LP_CHAT_TOOLS_LLAMA31;
		ct->date_today = strstr(jinja, "strftime_now") != NULL;
	} else if (strstr(jinja, "<|start_header_id|>") && strstr(jinja, "<|eot_id|>")) {
		ct->style = LP_CHAT_LLAMA3;
	} else if (strstr(jinja, "\"[AVAILABLE_TOOLS] [\"") &&
	           strstr(jinja, "\"[TOOL_CALLS] [\"") &&
	           strstr(jinja, "[TOOL_RESULTS] {\"content\": ") &&
	           strstr(jinja, "\"[INST] \" + system_message") &&
	           strstr(jinja, "message[\"content\"]|trim")) {
		/* Mistral 7B Instruct v0.3 (tokenizer v3) */
		ct->style = LP_CHAT_MISTRAL_V3;
		ct->tools = LP_CHAT_TOOLS_MISTRAL;
	} else if (strstr(jinja, "<<SYS>>") && strstr(jinja, "[INST]")) {
		ct->style = LP_CHAT_LLAMA2;
	} else if (strstr(jinja, "' [INST] '") && strstr(jinja, "' [/INST]'") &&
	           strstr(jinja, "loop.first and system_message")) {
		/* Mistral 7B Instruct v0.2 / Mixtral: the system prompt goes
		 * in the first user turn */
		ct->style = LP_CHAT_MISTRAL;
	} else if (strstr(jinja, "<start_of_turn>") && strstr(jinja, "<end_of_turn>") &&
	           strstr(jinja, "first_user_prefix")) {
		/* Gemma 3: the system prompt opens the first user turn */
		ct->style = LP_CHAT_GEMMA;
	} else if (strstr(jinja, "[INST]")) {
		return lp_errf(err, -ENOTSUP,
		               "chat template is an [INST] template of a variant that is not "
		               "supported (known: llama2, mistral as in Mistral 7B Instruct v0.2, "
		               "mistral-v0.3)");
	} else {
		return lp_errf(err, -ENOTSUP,
		               "chat template matches no supported family (chatml, llama3, "
		               "llama3.1, llama2, mistral, mistral-v0.3, qwen3, gemma)");
	}
	return set_markers(ct, bos, eos, err);
}

int lp_chat_template_from_name(struct lp_chat_template *ct, const char *name, const char *bos,
                               const char *eos, struct lp_err *err)
{
	static const struct {
		const char *name;
		enum lp_chat_style style;
		enum lp_chat_tools tools;
	} names[] = {
	    {"chatml", LP_CHAT_CHATML, LP_CHAT_TOOLS_NONE},
	    {"llama3", LP_CHAT_LLAMA3, LP_CHAT_TOOLS_NONE},
	    {"llama2", LP_CHAT_LLAMA2, LP_CHAT_TOOLS_NONE},
	    {"mistral", LP_CHAT_MISTRAL, LP_CHAT_TOOLS_NONE},
	    {"qwen3", LP_CHAT_QWEN3, LP_CHAT_TOOLS_HERMES},
	    {"gemma", LP_CHAT_GEMMA, LP_CHAT_TOOLS_NONE},
	    {"llama3.1", LP_CHAT_LLAMA31, LP_CHAT_TOOLS_LLAMA31},
	    {"mistral-v0.3", LP_CHAT_MISTRAL_V3, LP_CHAT_TOOLS_MISTRAL},
	};
	size_t i;

	memset(ct, 0, sizeof(*ct));
	for (i = 0; name && i < sizeof(names) / sizeof(names[0]); i++) {
		if (strcmp(name, names[i].name) == 0) {
			ct->style = names[i].style;
			ct->tools = names[i].tools;
			return set_markers(ct, bos, eos, err);
		}
	}
	return lp_errf(err, -EINVAL,
	               "unknown chat template '%s' (known: chatml, llama3, llama3.1, llama2, "
	               "mistral, mistral-v0.3, qwen3, gemma)",
	               name ? name : "");
}

/* ---- output helpers ---- */

static int put(struct lp_buf *out, const char *s, struct lp_err *err)
{
	return s ? lp_buf_append(out, s, strlen(s), err) : 0;
}

/* s with Python's str.strip() (Jinja's trim filter) applied */
static int put_stripped(struct lp_buf *out, const char *s, struct lp_err *err)
{
	size_t len = strlen(s);
	const char *p = lp_utf8_py_strip(s, &len);

	return lp_buf_append(out, p, len, err);
}

/* ---- JSON as transformers' tojson filter writes it ---- */

/* Python's json.dumps string with ensure_ascii=False: only '"', '\\' and
 * the control characters are escaped, the rest is written as it is. */
static int py_string(struct lp_buf *out, const char *s, size_t len, struct lp_err *err)
{
	static const char hex[] = "0123456789abcdef";
	const char *end = s + len, *run = s;
	int rc;

	if ((rc = lp_buf_append(out, "\"", 1, err)))
		return rc;
	for (; s < end; s++) {
		unsigned char c = (unsigned char)*s;
		char esc[6] = {'\\', 0};
		size_t n = 2;

		if (c >= 0x20 && c != '"' && c != '\\')
			continue;
		switch (c) {
		case '"':
		case '\\':
			esc[1] = (char)c;
			break;
		case '\n':
			esc[1] = 'n';
			break;
		case '\r':
			esc[1] = 'r';
			break;
		case '\t':
			esc[1] = 't';
			break;
		case '\b':
			esc[1] = 'b';
			break;
		case '\f':
			esc[1] = 'f';
			break;
		default:
			memcpy(esc + 1, "u00", 3);
			esc[4] = hex[c >> 4];
			esc[5] = hex[c & 15];
			n = 6;
			break;
		}
		if ((rc = lp_buf_append(out, run, (size_t)(s - run), err)) ||
		    (rc = lp_buf_append(out, esc, n, err)))
			return rc;
		run = s + 1;
	}
	if ((rc = lp_buf_append(out, run, (size_t)(end - run), err)))
		return rc;
	return lp_buf_append(out, "\"", 1, err);
}

/* Python's repr() of a float: the fewest significant digits that read back
 * as the same double (the correctly rounded ones, as %.*e gives them),
 * positional for decimal exponents -4 to 15 (with ".0" when whole), else
 * d.ddde+XX with at least two exponent digits. */
static int py_float(struct lp_buf *out, double d, struct lp_err *err)
{
	char sci[40], digits[24], txt[64];
	const char *p;
	size_t nd = 0, k = 0;
	int prec, exp10, decpt;

	for (prec = 0;; prec++) {
		snprintf(sci, sizeof(sci), "%.*e", prec, d);
		if (prec >= 16 || strtod(sci, NULL) == d)
			break;
	}
	p = sci; /* [-]d[.ddd]e(+|-)XX */
	if (*p == '-')
		txt[k++] = *p++;
	for (; *p && *p != 'e'; p++)
		if (*p >= '0' && *p <= '9' && nd < sizeof(digits))
			digits[nd++] = *p;
	exp10 = *p ? (int)strtol(p + 1, NULL, 10) : 0;
	if (exp10 < -4 || exp10 >= 16) {
		txt[k++] = digits[0];
		if (nd > 1) {
			txt[k++] = '.';
			memcpy(txt + k, digits + 1, nd - 1);
			k += nd - 1;
		}
		k += (size_t)snprintf(txt + k, sizeof(txt) - k, "e%c%02d", exp10 < 0 ? '-' : '+',
		                      exp10 < 0 ? -exp10 : exp10);
		return lp_buf_append(out, txt, k, err);
	}
	decpt = exp10 + 1; /* digits before the point */
	if (decpt <= 0) {
		memcpy(txt + k, "0.", 2);
		k += 2;
		memset(txt + k, '0', (size_t)-decpt);
		k += (size_t)-decpt;
		memcpy(txt + k, digits, nd);
		k += nd;
	} else if ((size_t)decpt >= nd) {
		memcpy(txt + k, digits, nd);
		k += nd;
		memset(txt + k, '0', (size_t)decpt - nd);
		k += (size_t)decpt - nd;
		memcpy(txt + k, ".0", 2);
		k += 2;
	} else {
		memcpy(txt + k, digits, (size_t)decpt);
		k += (size_t)decpt;
		txt[k++] = '.';
		memcpy(txt + k, digits + decpt, nd - (size_t)decpt);
		k += nd - (size_t)decpt;
	}
	return lp_buf_append(out, txt, k, err);
}

/* Before an item: the separator after the one before it, and with indent
 * a new line indented to depth. */
static int py_item(struct lp_buf *out, int indent, int depth, bool first, struct lp_err *err)
{
	int rc = 0;

	if (!first)
		rc = indent ? put(out, ",", err) : put(out, ", ", err);
	for (int i = -1; !rc && indent && i < indent * depth; i++)
		rc = lp_buf_append(out, i < 0 ? "\n" : " ", 1, err);
	return rc;
}

static int py_dump(const json_t *v, int indent, int depth, struct lp_buf *out, struct lp_err *err)
{
	json_t *obj = (json_t *)v; /* jansson's iterators take no const */
	char num[32];
	const char *key;
	json_t *item;
	size_t i;
	int rc = 0;

	switch (json_typeof(v)) {
	case JSON_OBJECT:
		if (json_object_size(v) == 0)
			return put(out, "{}", err);
		if ((rc = put(out, "{", err)))
			return rc;
		i = 0;
		json_object_foreach(obj, key, item)
		{
			if ((rc = py_item(out, indent, depth + 1, i++ == 0, err)) ||
			    (rc = py_string(out, key, strlen(key), err)) ||
			    (rc = put(out, ": ", err)) ||
			    (rc = py_dump(item, indent, depth + 1, out, err)))
				return rc;
		}
		if ((rc = py_item(out, indent, depth, true, err)))
			return rc;
		return put(out, "}", err);
	case JSON_ARRAY:
		if (json_array_size(v) == 0)
			return put(out, "[]", err);
		if ((rc = put(out, "[", err)))
			return rc;
		json_array_foreach(obj, i, item)
		{
			if ((rc = py_item(out, indent, depth + 1, i == 0, err)) ||
			    (rc = py_dump(item, indent, depth + 1, out, err)))
				return rc;
		}
		if ((rc = py_item(out, indent, depth, true, err)))
			return rc;
		return put(out, "]", err);
	case JSON_STRING:
		return py_string(out, json_string_value(v), json_string_length(v), err);
	case JSON_INTEGER:
		snprintf(num, sizeof(num), "%" JSON_INTEGER_FORMAT, json_integer_value(v));
		return put(out, num, err);
	case JSON_REAL:
		return py_float(out, json_real_value(v), err);
	case JSON_TRUE:
		return put(out, "true", err);
	case JSON_FALSE:
		return put(out, "false", err);
	case JSON_NULL:
		return put(out, "null", err);
	}
	return lp_errf(err, -EINVAL, "a JSON value of unknown type");
}

int lp_chat_tojson(const json_t *v, int indent, struct lp_buf *out, struct lp_err *err)
{
	size_t len0 = out->len;
	int rc;

	if (!v)
		return lp_errf(err, -EINVAL, "no JSON value");
	if ((rc = py_dump(v, indent > 0 ? indent : 0, 0, out, err))) {
		out->len = len0;
		if (out->data)
			out->data[len0] = '\0';
	}
	return rc;
}

/* ---- what a render works on ---- */

struct render {
	const struct lp_chat_template *ct;
	const struct lp_chat_message *msgs;
	size_t n;
	const json_t *tools; /* a non-empty array of tools, or NULL */
	json_t *args;        /* per message, the parsed arguments of its tool calls */
	bool gen;
	struct lp_buf *out;
	struct lp_err *err;
};

static bool is_role(const struct lp_chat_message *m, const char *role)
{
	return strcmp(m->role, role) == 0;
}

static int check_messages(const struct lp_chat_message *msgs, size_t n, struct lp_err *err)
{
	size_t i, k;

	for (i = 0; i < n; i++) {
		const struct lp_chat_message *m = &msgs[i];

		if (!m->role)
			return lp_errf(err, -EINVAL, "message %zu has no role", i);
		if (!is_role(m, "system") && !is_role(m, "user") && !is_role(m, "assistant") &&
		    !is_role(m, "tool"))
			return lp_errf(
			    err, -EINVAL,
			    "unknown role '%.64s' in message %zu (system, user, assistant "
			    "or tool)",
			    m->role, i);
		if (m->n_tool_calls && (!is_role(m, "assistant") || !m->tool_calls))
			return lp_errf(err, -EINVAL,
			               "message %zu: only assistant messages carry tool calls", i);
		if (!m->content && !m->n_tool_calls)
			return lp_errf(err, -EINVAL, "message %zu has no content", i);
		for (k = 0; k < m->n_tool_calls; k++)
			if (!m->tool_calls[k].name || !m->tool_calls[k].name[0] ||
			    !m->tool_calls[k].arguments)
				return lp_errf(
				    err, -EINVAL,
				    "message %zu: tool call %zu has no function name or no "
				    "arguments",
				    i, k);
	}
	return 0;
}

/* tools: NULL, or an array of {"type": "function", "function": {"name",
 * ...}} */
static int check_tools(const json_t *tools, struct lp_err *err)
{
	const json_t *t;
	size_t i;

	if (!tools || json_is_null(tools))
		return 0;
	if (!json_is_array(tools))
		return lp_errf(err, -EINVAL, "'tools' must be an array of tools");
	json_array_foreach(tools, i, t)
	{
		const json_t *fn = json_object_get(t, "function");
		const char *type = json_string_value(json_object_get(t, "type"));
		const char *name = json_string_value(json_object_get(fn, "name"));

		if (!type || strcmp(type, "function") || !json_is_object(fn) || !name || !name[0])
			return lp_errf(err, -EINVAL,
			               "tools[%zu] must be {\"type\": \"function\", \"function\": "
			               "{\"name\": ..., ...}}",
			               i);
	}
	return 0;
}

/* Parses every tool call's arguments into r->args (an array per message). */
static int parse_arguments(struct render *r)
{
	size_t i, k;

	if (!(r->args = json_array()))
		return lp_errf(r->err, -ENOMEM, "out of memory");
	for (i = 0; i < r->n; i++) {
		json_t *calls = json_array();

		if (!calls || json_array_append_new(r->args, calls))
			return lp_errf(r->err, -ENOMEM, "out of memory");
		for (k = 0; k < r->msgs[i].n_tool_calls; k++) {
			const char *text = r->msgs[i].tool_calls[k].arguments;
			json_error_t jerr;
			json_t *a = json_loads(text, 0, &jerr);

			if (!json_is_object(a)) {
				json_decref(a);
				return lp_errf(
				    r->err, -EINVAL,
				    "message %zu: the arguments of tool call %zu are not a "
				    "JSON object%s%s",
				    i, k, a ? "" : ": ", a ? "" : jerr.text);
			}
			if (json_array_append_new(calls, a))
				return lp_errf(r->err, -ENOMEM, "out of memory");
		}
	}
	return 0;
}

static const json_t *call_args(const struct render *r, size_t i, size_t k)
{
	return json_array_get(json_array_get(r->args, i), k);
}

static bool uses_tools(const struct render *r)
{
	size_t i;

	if (r->tools)
		return true;
	for (i = 0; i < r->n; i++)
		if (is_role(&r->msgs[i], "tool") || r->msgs[i].n_tool_calls)
			return true;
	return false;
}

static int put_dump(const struct render *r, const json_t *v, int indent)
{
	return py_dump(v, indent, 0, r->out, r->err);
}

/* ---- Hermes tools (Qwen2.5, Qwen3) ---- */

/* The tool section of the system turn, after its text. */
static int put_hermes_tools(const struct render *r)
{
	const json_t *t;
	size_t i;
	int rc;

	if ((rc = put(r->out,
	              "# Tools\n\nYou may call one or more functions to assist with the user "
	              "query.\n\nYou are provided with function signatures within <tools></tools> "
	              "XML tags:\n<tools>",
	              r->err)))
		return rc;
	json_array_foreach(r->tools, i, t)
	{
		if ((rc = put(r->out, "\n", r->err)) || (rc = put_dump(r, t, 0)))
			return rc;
	}
	return put(
	    r->out,
	    "\n</tools>\n\nFor each function call, return a json object with function name "
	    "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
	    "<function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n",
	    r->err);
}

/* One call; Qwen3 writes the arguments as the client sent them, Qwen2.5
 * through tojson. */
static int put_hermes_call(const struct render *r, size_t i, size_t k, bool as_given)
{
	const struct lp_chat_tool_call *c = &r->msgs[i].tool_calls[k];
	int rc;

	if ((rc = put(r->out, "<tool_call>\n{\"name\": \"", r->err)) ||
	    (rc = put(r->out, c->name, r->err)) ||
	    (rc = put(r->out, "\", \"arguments\": ", r->err)))
		return rc;
	rc = as_given ? put(r->out, c->arguments, r->err) : put_dump(r, call_args(r, i, k), 0);
	return rc ? rc : put(r->out, "}\n</tool_call>", r->err);
}

/* A tool result: consecutive ones share one user turn. */
static int put_hermes_result(const struct render *r, size_t i)
{
	int rc;

	if ((i == 0 || !is_role(&r->msgs[i - 1], "tool")) &&
	    (rc = put(r->out, "<|im_start|>user", r->err)))
		return rc;
	if ((rc = put(r->out, "\n<tool_response>\n", r->err)) ||
	    (rc = put(r->out, r->msgs[i].content, r->err)) ||
	    (rc = put(r->out, "\n</tool_response>", r->err)))
		return rc;
	if (i + 1 == r->n || !is_role(&r->msgs[i + 1], "tool"))
		return put(r->out, "<|im_end|>\n", r->err);
	return 0;
}

static int render_chatml(const struct render *r)
{
	const struct lp_chat_template *ct = r->ct;
	const struct lp_chat_message *msgs = r->msgs;
	struct lp_buf *out = r->out;
	struct lp_err *err = r->err;
	bool sys = r->n > 0 && is_role(&msgs[0], "system");
	size_t i = 0, k;
	int rc = 0;

	if (r->tools) {
		/* Qwen2.5: the system text (or the default one), then the tools */
		if ((rc = put(out, "<|im_start|>system\n", err)) ||
		    (rc = put(out, sys ? msgs[0].content : ct->default_system, err)) ||
		    (rc = put(out, "\n\n", err)) || (rc = put_hermes_tools(r)))
			return rc;
		i = sys ? 1 : 0;
	}
	for (; i < r->n && !rc; i++) {
		const struct lp_chat_message *m = &msgs[i];

		if (i == 0 && !sys && !r->tools && ct->default_system) {
			if ((rc = put(out, "<|im_start|>system\n", err)) ||
			    (rc = put(out, ct->default_system, err)) ||
			    (rc = put(out, "<|im_end|>\n", err)))
				break;
		}
		if (is_role(m, "tool")) {
			rc = put_hermes_result(r, i);
			continue;
		}
		if (m->n_tool_calls) {
			if ((rc = put(out, "<|im_start|>assistant", err)))
				break;
			if (m->content && m->content[0] &&
			    ((rc = put(out, "\n", err)) || (rc = put(out, m->content, err))))
				break;
			for (k = 0; k < m->n_tool_calls && !rc; k++)
				if (!(rc = put(out, "\n", err)))
					rc = put_hermes_call(r, i, k, false);
			if (!rc)
				rc = put(out, "<|im_end|>\n", err);
			continue;
		}
		if ((rc = put(out, "<|im_start|>", err)) || (rc = put(out, m->role, err)) ||
		    (rc = put(out, "\n", err)) || (rc = put(out, m->content, err)))
			break;
		rc = put(out, "<|im_end|>\n", err);
	}
	if (!rc && r->gen)
		rc = put(out, "<|im_start|>assistant\n", err);
	return rc;
}

/* Qwen3's template is ChatML with rules for reasoning in assistant turns
 * (Python string semantics spelled out): a turn whose content holds
 * "</think>" is split into the reasoning (before the first "</think>",
 * trailing newlines dropped, after the last "<think>" before it, leading
 * newlines dropped) and the answer (after the last "</think>", leading
 * newlines dropped). Turns after the last user query keep the reasoning in a
 * <think> block when they have some or are the last message; every other
 * turn keeps only the answer. A user message wrapped in <tool_response> is
 * not a query. */

static bool starts_with(const char *s, const char *prefix)
{
	return strncmp(s, prefix, strlen(prefix)) == 0;
}

static bool ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), m = strlen(suffix);

	return n >= m && memcmp(s + n - m, suffix, m) == 0;
}

/* The last occurrence of needle that ends at or before end, or NULL. */
static const char *last_before(const char *s, const char *end, const char *needle)
{
	size_t m = strlen(needle);
	const char *found = NULL;

	for (const char *p = s; (p = strstr(p, needle)) && p + m <= end; p++)
		found = p;
	return found;
}

static int put_span(struct lp_buf *out, const char *p, const char *end, struct lp_err *err)
{
	return lp_buf_append(out, p, (size_t)(end - p), err);
}

/* An assistant turn's reasoning [r, r_end) and answer [a, a_end). */
struct qwen3_turn {
	const char *r, *r_end, *a, *a_end;
};

static void qwen3_split(const char *content, struct qwen3_turn *t)
{
	const char *close = strstr(content, "</think>"), *open;

	t->a = content;
	t->a_end = content + strlen(content);
	t->r = t->r_end = t->a_end;
	if (!close)
		return;
	t->r_end = close;
	while (t->r_end > content && t->r_end[-1] == '\n')
		t->r_end--;
	open = last_before(content, t->r_end, "<think>");
	t->r = open ? open + strlen("<think>") : content;
	while (t->r < t->r_end && *t->r == '\n')
		t->r++;
	t->a = last_before(content, t->a_end, "</think>") + strlen("</think>");
	while (*t->a == '\n')
		t->a++;
}

static int render_qwen3(const struct render *r)
{
	const struct lp_chat_message *msgs = r->msgs;
	struct lp_buf *out = r->out;
	struct lp_err *err = r->err;
	size_t n = r->n, i, k, last_query = n ? n - 1 : 0;
	bool sys = n > 0 && is_role(&msgs[0], "system");
	int rc = 0;

	if (r->tools) {
		/* the system text and a blank line, then the tools */
		if ((rc = put(out, "<|im_start|>system\n", err)) ||
		    (sys &&
		     ((rc = put(out, msgs[0].content, err)) || (rc = put(out, "\n\n", err)))) ||
		    (rc = put_hermes_tools(r)))
			return rc;
	} else if (sys && ((rc = put(out, "<|im_start|>system\n", err)) ||
	                   (rc = put(out, msgs[0].content, err)) ||
	                   (rc = put(out, "<|im_end|>\n", err)))) {
		return rc;
	}
	for (i = n; i-- > 0;) {
		if (is_role(&msgs[i], "user") &&
		    !(starts_with(msgs[i].content, "<tool_response>") &&
		      ends_with(msgs[i].content, "</tool_response>"))) {
			last_query = i;
			break;
		}
	}
	for (i = sys ? 1 : 0; i < n && !rc; i++) {
		const struct lp_chat_message *m = &msgs[i];
		struct qwen3_turn t;
		bool think, has_content;

		if (is_role(m, "tool")) {
			rc = put_hermes_result(r, i);
			continue;
		}
		if (!is_role(m, "assistant")) {
			/* user or a later system message: plain ChatML */
			if ((rc = put(out, "<|im_start|>", err)) || (rc = put(out, m->role, err)) ||
			    (rc = put(out, "\n", err)) || (rc = put(out, m->content, err)))
				break;
			rc = put(out, "<|im_end|>\n", err);
			continue;
		}
		qwen3_split(m->content ? m->content : "", &t);
		has_content = t.a < t.a_end;
		think = i > last_query && (i == n - 1 || t.r < t.r_end);
		if ((rc = put(out, "<|im_start|>assistant\n", err)))
			break;
		if (think &&
		    ((rc = put(out, "<think>\n", err)) || (rc = put_span(out, t.r, t.r_end, err)) ||
		     (rc = put(out, "\n</think>\n\n", err))))
			break;
		while (think && *t.a == '\n')
			t.a++; /* the answer after a <think> block loses its leading newlines */
		if ((rc = put_span(out, t.a, t.a_end, err)))
			break;
		/* calls follow the answer on a new line, or open the turn */
		for (k = 0; k < m->n_tool_calls && !rc; k++)
			if (!((k > 0 || has_content) && (rc = put(out, "\n", err))))
				rc = put_hermes_call(r, i, k, true);
		if (!rc)
			rc = put(out, "<|im_end|>\n", err);
	}
	if (!rc && r->gen)
		rc = put(out, "<|im_start|>assistant\n", err);
	return rc;
}

static int render_llama3(const struct lp_chat_template *ct, const struct lp_chat_message *msgs,
                         size_t n, bool gen, struct lp_buf *out, struct lp_err *err)
{
	size_t i;
	int rc = 0;

	for (i = 0; i < n && !rc; i++) {
		if (i == 0 && (rc = put(out, ct->bos, err)))
			break;
		if ((rc = put(out, "<|start_header_id|>", err)) ||
		    (rc = put(out, msgs[i].role, err)) ||
		    (rc = put(out, "<|end_header_id|>\n\n", err)) ||
		    (rc = put_stripped(out, msgs[i].content, err)))
			break;
		rc = put(out, "<|eot_id|>", err);
	}
	if (!rc && gen)
		rc = put(out, "<|start_header_id|>assistant<|end_header_id|>\n\n", err);
	return rc;
}

/* Llama 2 and Mistral: an optional system message first, then turns that
 * must go user, assistant, user, ... */
static int check_alternating(const struct lp_chat_message *loop, size_t n, struct lp_err *err)
{
	size_t j;

	for (j = 0; j < n; j++)
		if (is_role(&loop[j], "user") != (j % 2 == 0))
			return lp_errf(err, -EINVAL,
			               "conversation roles must alternate user/assistant/user/... "
			               "after an optional system message (message %zu is '%s')",
			               j, loop[j].role);
	return 0;
}

static int render_llama2(const struct lp_chat_template *ct, const struct lp_chat_message *msgs,
                         size_t n, struct lp_buf *out, struct lp_err *err)
{
	const struct lp_chat_message *loop = msgs;
	const char *sys = NULL;
	struct lp_buf content;
	size_t j;
	int rc;

	if (n == 0)
		return lp_errf(err, -EINVAL, "the llama2 template needs at least one message");
	if (is_role(&msgs[0], "system")) {
		sys = msgs[0].content;
		loop++;
		n--;
	}
	if ((rc = check_alternating(loop, n, err)))
		return rc;
	lp_buf_init(&content, out->max);
	for (j = 0; j < n && !rc; j++) {
		const char *text;

		/* the system prompt is part of the first turn's text, which
		 * the template strips as a whole */
		lp_buf_reset(&content);
		if (j == 0 && sys &&
		    ((rc = put(&content, "<<SYS>>\n", err)) || (rc = put(&content, sys, err)) ||
		     (rc = put(&content, "\n<</SYS>>\n\n", err))))
			break;
		if ((rc = put(&content, loop[j].content, err)))
			break;
		text = content.data ? content.data : "";
		if (is_role(&loop[j], "user")) {
			if ((rc = put(out, ct->bos, err)) || (rc = put(out, "[INST] ", err)) ||
			    (rc = put_stripped(out, text, err)))
				break;
			rc = put(out, " [/INST]", err);
		} else if (is_role(&loop[j], "assistant")) {
			if ((rc = put(out, " ", err)) || (rc = put_stripped(out, text, err)) ||
			    (rc = put(out, " ", err)))
				break;
			rc = put(out, ct->eos, err);
		}
	}
	lp_buf_release(&content);
	return rc;
}

static int render_mistral(const struct lp_chat_template *ct, const struct lp_chat_message *msgs,
                          size_t n, struct lp_buf *out, struct lp_err *err)
{
	const struct lp_chat_message *loop = msgs;
	const char *sys = NULL;
	size_t j;
	int rc;

	if (n == 0)
		return lp_errf(err, -EINVAL, "the mistral template needs at least one message");
	if (is_role(&msgs[0], "system")) {
		sys = msgs[0].content;
		loop++;
		n--;
	}
	if ((rc = check_alternating(loop, n, err)) || (rc = put(out, ct->bos, err)))
		return rc;
	for (j = 0; j < n; j++) {
		if (is_role(&loop[j], "user")) {
			if ((rc = put(out, " [INST] ", err)))
				return rc;
			if (j == 0 && sys &&
			    ((rc = put(out, sys, err)) || (rc = put(out, "\n\n", err))))
				return rc;
			if ((rc = put(out, loop[j].content, err)) ||
			    (rc = put(out, " [/INST]", err)))
				return rc;
		} else if (is_role(&loop[j], "assistant")) {
			if ((rc = put(out, " ", err)) || (rc = put(out, loop[j].content, err)) ||
			    (rc = put(out, ct->eos, err)))
				return rc;
		} else {
			return lp_errf(err, -EINVAL,
			               "the mistral template takes a system message only first "
			               "(message %zu)",
			               j + (sys ? 1 : 0));
		}
	}
	return 0;
}

/* Gemma 3: BOS, then turns that alternate user, model, user, ... after an
 * optional system message, whose text and a blank line open the first
 * turn; each turn's content stripped, "<start_of_turn>ROLE\n...<end_of_turn>\n"
 * with assistant written "model". */
static int render_gemma(const struct lp_chat_template *ct, const struct lp_chat_message *msgs,
                        size_t n, bool gen, struct lp_buf *out, struct lp_err *err)
{
	const struct lp_chat_message *loop = msgs;
	const char *sys = NULL;
	size_t j;
	int rc;

	if (n > 0 && is_role(&msgs[0], "system")) {
		sys = msgs[0].content;
		loop++;
		n--;
	}
	if ((rc = check_alternating(loop, n, err)) || (rc = put(out, ct->bos, err)))
		return rc;
	for (j = 0; j < n; j++) {
		if ((rc = put(out, "<start_of_turn>", err)) ||
		    (rc = put(out, is_role(&loop[j], "assistant") ? "model" : loop[j].role, err)) ||
		    (rc = put(out, "\n", err)))
			return rc;
		if (j == 0 && sys && ((rc = put(out, sys, err)) || (rc = put(out, "\n\n", err))))
			return rc;
		if ((rc = put_stripped(out, loop[j].content, err)) ||
		    (rc = put(out, "<end_of_turn>\n", err)))
			return rc;
	}
	return gen ? put(out, "<start_of_turn>model\n", err) : 0;
}

/* ---- Llama 3.1 ---- */

/* "26 Jul 2024" for today, as Llama 3.2's template gets it from
 * strftime_now("%d %b %Y") (local time, English month names). */
static void today(char *buf, size_t size)
{
	static const char *const months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
	                                     "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
	time_t now = time(NULL);
	struct tm tm;

	if (!localtime_r(&now, &tm) || tm.tm_mon < 0 || tm.tm_mon > 11) {
		snprintf(buf, size, "26 Jul 2024");
		return;
	}
	snprintf(buf, size, "%02d %s %04d", tm.tm_mday, months[tm.tm_mon], tm.tm_year + 1900);
}

/* Llama 3.1: BOS, a system turn with the dates (and "Environment:
 * ipython" with tools) and the system message stripped; with tools, the
 * first message after it becomes a user turn that lists them; then Llama 3
 * turns, tool calls as {"name": ..., "parameters": ...} (one per message),
 * tool results as ipython turns holding the content as a JSON string. */
static int render_llama31(const struct render *r)
{
	const struct lp_chat_message *msgs = r->msgs;
	struct lp_buf *out = r->out;
	struct lp_err *err = r->err;
	size_t i = 0, ti, n = r->n;
	const json_t *t;
	char date[32];
	int rc;

	if (r->ct->date_today)
		today(date, sizeof(date));
	else
		snprintf(date, sizeof(date), "26 Jul 2024");
	if ((rc = put(out, r->ct->bos, err)) ||
	    (rc = put(out, "<|start_header_id|>system<|end_header_id|>\n\n", err)) ||
	    (r->tools && (rc = put(out, "Environment: ipython\n", err))) ||
	    (rc = put(out, "Cutting Knowledge Date: December 2023\nToday Date: ", err)) ||
	    (rc = put(out, date, err)) || (rc = put(out, "\n\n", err)))
		return rc;
	if (n > 0 && is_role(&msgs[0], "system") &&
	    (rc = put_stripped(out, msgs[i++].content, err)))
		return rc;
	if ((rc = put(out, "<|eot_id|>", err)))
		return rc;
	if (r->tools) {
		if (i == n || !msgs[i].content)
			return lp_errf(
			    err, -EINVAL,
			    "the llama3.1 chat template puts the tools in the first message "
			    "after the system message, and there is %s",
			    i == n ? "none" : "one without content");
		if ((rc = put(
		         out,
		         "<|start_header_id|>user<|end_header_id|>\n\nGiven the following "
		         "functions, please respond with a JSON for a function call with its "
		         "proper arguments that best answers the given prompt.\n\nRespond in the "
		         "format {\"name\": function name, \"parameters\": dictionary of argument "
		         "name and its value}.Do not use variables.\n\n",
		         err)))
			return rc;
		json_array_foreach(r->tools, ti, t)
		{
			if ((rc = put_dump(r, t, 4)) || (rc = put(out, "\n\n", err)))
				return rc;
		}
		if ((rc = put_stripped(out, msgs[i++].content, err)) ||
		    (rc = put(out, "<|eot_id|>", err)))
			return rc;
	}
	for (; i < n; i++) {
		const struct lp_chat_message *m = &msgs[i];

		if (is_role(m, "tool")) {
			rc = put(out, "<|start_header_id|>ipython<|end_header_id|>\n\n", err);
			if (!rc)
				rc = py_string(out, m->content, strlen(m->content), err);
		} else if (m->n_tool_calls) {
			if (m->n_tool_calls != 1)
				return lp_errf(err, -EINVAL,
				               "the llama3.1 chat template takes one tool call per "
				               "assistant message (message %zu has %zu)",
				               i, m->n_tool_calls);
			if ((rc = put(
			         out,
			         "<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"",
			         err)) ||
			    (rc = put(out, m->tool_calls[0].name, err)) ||
			    (rc = put(out, "\", \"parameters\": ", err)) ||
			    (rc = put_dump(r, call_args(r, i, 0), 0)))
				return rc;
			rc = put(out, "}", err);
		} else {
			if ((rc = put(out, "<|start_header_id|>", err)) ||
			    (rc = put(out, m->role, err)) ||
			    (rc = put(out, "<|end_header_id|>\n\n", err)))
				return rc;
			rc = put_stripped(out, m->content, err);
		}
		if (rc || (rc = put(out, "<|eot_id|>", err)))
			return rc;
	}
	return r->gen ? put(out, "<|start_header_id|>assistant<|end_header_id|>\n\n", err) : 0;
}

/* ---- Mistral v0.3 ---- */

/* Mistral's template checks only the length of a call id (in characters),
 * though its message asks for alphanumerics. */
static int check_mistral_id(const char *id, size_t i, struct lp_err *err)
{
	size_t chars = 0;

	for (const char *p = id; p && *p; p++)
		chars += ((unsigned char)*p & 0xC0) != 0x80;
	if (!id || chars != 9)
		return lp_errf(err, -EINVAL,
		               "message %zu: the mistral-v0.3 chat template needs tool call ids of "
		               "9 characters, e.g. 'a1B2c3D4e' (it raises 'Tool call IDs should be "
		               "alphanumeric strings with length 9!'); got '%.64s'",
		               i, id ? id : "");
	return 0;
}

/* Python's == on two user message dicts */
static bool same_user_message(const struct lp_chat_message *a, const struct lp_chat_message *b)
{
	return a == b || (strcmp(a->content, b->content) == 0 &&
	                  (a->name ? b->name && strcmp(a->name, b->name) == 0 : !b->name));
}

/* [AVAILABLE_TOOLS] [...][/AVAILABLE_TOOLS]: each tool's function object
 * without "return", string values written between quotes as they are
 * (the template does not escape them), the others through tojson. */
static int put_mistral_tools(const struct render *r)
{
	const json_t *t, *val;
	const char *key;
	size_t i;
	int rc;

	if ((rc = put(r->out, "[AVAILABLE_TOOLS] [", r->err)))
		return rc;
	json_array_foreach(r->tools, i, t)
	{
		json_t *fn = json_object_get(t, "function");
		bool first = true;

		if (i > 0 && (rc = put(r->out, ", ", r->err)))
			return rc;
		if ((rc = put(r->out, "{\"type\": \"function\", \"function\": {", r->err)))
			return rc;
		json_object_foreach(fn, key, val)
		{
			if (strcmp(key, "return") == 0)
				continue;
			if ((!first && (rc = put(r->out, ", ", r->err))) ||
			    (rc = put(r->out, "\"", r->err)) || (rc = put(r->out, key, r->err)) ||
			    (rc = put(r->out, "\": ", r->err)))
				return rc;
			first = false;
			if (!json_is_string(val))
				rc = put_dump(r, val, 0);
			else if (!(rc = put(r->out, "\"", r->err)) &&
			         !(rc = lp_buf_append(r->out, json_string_value(val),
			                              json_string_length(val), r->err)))
				rc = put(r->out, "\"", r->err);
			if (rc)
				return rc;
		}
		if ((rc = put(r->out, "}}", r->err)))
			return rc;
	}
	return put(r->out, "][/AVAILABLE_TOOLS]", r->err);
}

/* Mistral v0.3: BOS; turns alternate user/assistant after an optional
 * system message, not counting tool calls and results; the tools go before
 * the last user message (and before any equal to it), the system message
 * into the last message if it is a user one; tool calls as [TOOL_CALLS]
 * [{"name", "arguments", "id"}, ...] and EOS; results as
 * [TOOL_RESULTS] {"content": CONTENT, "call_id": "ID"}[/TOOL_RESULTS] with
 * the content written as it is. No generation prompt. */
static int render_mistral_v3(const struct render *r)
{
	const struct lp_chat_message *loop = r->msgs, *last_user = NULL;
	struct lp_buf *out = r->out;
	struct lp_err *err = r->err;
	const char *sys = NULL;
	size_t n = r->n, j, k, turn = 0, base = 0;
	int rc;

	if (n == 0)
		return lp_errf(err, -EINVAL,
		               "the mistral-v0.3 template needs at least one message");
	if (is_role(&loop[0], "system")) {
		sys = loop[0].content;
		loop++;
		n--;
		base = 1;
	}
	for (j = 0; j < n; j++) {
		if (is_role(&loop[j], "tool") || loop[j].n_tool_calls)
			continue;
		if (is_role(&loop[j], "user") != (turn++ % 2 == 0))
			return lp_errf(
			    err, -EINVAL,
			    "conversation roles must alternate user/assistant/user/... "
			    "after an optional system message, tool calls and results aside "
			    "(message %zu is '%s')",
			    j + base, loop[j].role);
		if (is_role(&loop[j], "user"))
			last_user = &loop[j];
	}
	if ((rc = put(out, r->ct->bos, err)))
		return rc;
	for (j = 0; j < n; j++) {
		const struct lp_chat_message *m = &loop[j];

		if (is_role(m, "user")) {
			if (r->tools && same_user_message(m, last_user) &&
			    (rc = put_mistral_tools(r)))
				return rc;
			if ((rc = put(out, "[INST] ", err)) ||
			    (j == n - 1 && sys &&
			     ((rc = put(out, sys, err)) || (rc = put(out, "\n\n", err)))) ||
			    (rc = put(out, m->content, err)) || (rc = put(out, "[/INST]", err)))
				return rc;
		} else if (m->n_tool_calls) {
			if ((rc = put(out, "[TOOL_CALLS] [", err)))
				return rc;
			for (k = 0; k < m->n_tool_calls; k++) {
				const struct lp_chat_tool_call *c = &m->tool_calls[k];

				if ((rc = put(out, "{\"name\": ", err)) ||
				    (rc = py_string(out, c->name, strlen(c->name), err)) ||
				    (rc = put(out, ", \"arguments\": ", err)) ||
				    (rc = put_dump(r, call_args(r, j + base, k), 0)) ||
				    (rc = check_mistral_id(c->id, j + base, err)) ||
				    (rc = put(out, ", \"id\": \"", err)) ||
				    (rc = put(out, c->id, err)) || (rc = put(out, "\"}", err)))
					return rc;
				if (k + 1 < m->n_tool_calls)
					rc = put(out, ", ", err);
				else if (!(rc = put(out, "]", err)))
					rc = put(out, r->ct->eos, err);
				if (rc)
					return rc;
			}
		} else if (is_role(m, "assistant")) {
			if ((rc = put(out, " ", err)) ||
			    (rc = put_stripped(out, m->content, err)) ||
			    (rc = put(out, r->ct->eos, err)))
				return rc;
		} else if (is_role(m, "tool")) {
			if ((rc = put(out, "[TOOL_RESULTS] {\"content\": ", err)) ||
			    (rc = put(out, m->content, err)) || (rc = put(out, ", ", err)) ||
			    (rc = check_mistral_id(m->tool_call_id, j + base, err)) ||
			    (rc = put(out, "\"call_id\": \"", err)) ||
			    (rc = put(out, m->tool_call_id, err)) ||
			    (rc = put(out, "\"}[/TOOL_RESULTS]", err)))
				return rc;
		} else {
			return lp_errf(
			    err, -EINVAL,
			    "the mistral-v0.3 template takes a system message only first "
			    "(message %zu)",
			    j + base);
		}
	}
	return 0;
}

/* ---- rendering ---- */

/* Renders r's conversation with the template's own format. */
static int render_native(const struct render *r)
{
	const struct lp_chat_template *ct = r->ct;

	switch (ct->style) {
	case LP_CHAT_CHATML:
		return render_chatml(r);
	case LP_CHAT_LLAMA3:
		return render_llama3(ct, r->msgs, r->n, r->gen, r->out, r->err);
	case LP_CHAT_LLAMA31:
		return render_llama31(r);
	case LP_CHAT_LLAMA2:
		/* the template has no generation prompt: it ends with [/INST] */
		return render_llama2(ct, r->msgs, r->n, r->out, r->err);
	case LP_CHAT_MISTRAL:
		return render_mistral(ct, r->msgs, r->n, r->out, r->err);
	case LP_CHAT_MISTRAL_V3:
		return render_mistral_v3(r);
	case LP_CHAT_QWEN3:
		return render_qwen3(r);
	case LP_CHAT_GEMMA:
		return render_gemma(ct, r->msgs, r->n, r->gen, r->out, r->err);
	}
	return lp_errf(r->err, -EINVAL, "chat template style %d is unknown", (int)ct->style);
}

/* Checks the messages and tools and parses the tool calls' arguments. */
static int render_begin(struct render *r, const struct lp_chat_template *ct,
                        const struct lp_chat_message *msgs, size_t n, const json_t *tools, bool gen,
                        struct lp_buf *out, struct lp_err *err)
{
	int rc;

	*r = (struct render){.ct = ct, .msgs = msgs, .n = n, .gen = gen, .out = out, .err = err};
	if ((rc = check_messages(msgs, n, err)) || (rc = check_tools(tools, err)))
		return rc;
	r->tools = json_array_size(tools) > 0 ? tools : NULL;
	return parse_arguments(r);
}

int lp_chat_template_render(const struct lp_chat_template *ct, const struct lp_chat_message *msgs,
                            size_t n, const json_t *tools, bool add_generation_prompt,
                            struct lp_buf *out, struct lp_err *err)
{
	size_t len0 = out->len;
	struct render r;
	int rc;

	rc = render_begin(&r, ct, msgs, n, tools, add_generation_prompt, out, err);
	if (!rc && ct->tools == LP_CHAT_TOOLS_NONE && uses_tools(&r))
		rc = lp_errf(err, -ENOTSUP,
		             "the model's chat template has no tool format: it cannot render "
		             "tools, tool calls or tool results (templates with one: Qwen2.5, "
		             "Qwen3, Llama 3.1, Mistral 7B Instruct v0.3)");
	if (!rc)
		rc = render_native(&r);
	json_decref(r.args);
	if (rc) {
		/* leave out as it was */
		out->len = len0;
		if (out->data)
			out->data[len0] = '\0';
	}
	return rc;
}

/* ---- the generic tool format ---- */

/* "Result of NAME (call ID): CONTENT", the name from the message or from
 * the call it answers. */
static int put_generic_result(const struct render *r, size_t i, struct lp_buf *b)
{
	const struct lp_chat_message *m = &r->msgs[i];
	const char *name = m->name;
	int rc;

	for (size_t j = i; !name && m->tool_call_id && j-- > 0;)
		for (size_t k = 0; k < r->msgs[j].n_tool_calls; k++)
			if (r->msgs[j].tool_calls[k].id &&
			    strcmp(r->msgs[j].tool_calls[k].id, m->tool_call_id) == 0) {
				name = r->msgs[j].tool_calls[k].name;
				break;
			}
	if ((rc = put(b, "Result", r->err)))
		return rc;
	if (name && ((rc = put(b, " of ", r->err)) || (rc = put(b, name, r->err))))
		return rc;
	if (m->tool_call_id &&
	    ((rc = put(b, name ? " (call " : " of call ", r->err)) ||
	     (rc = put(b, m->tool_call_id, r->err)) || (rc = put(b, name ? ")" : "", r->err))))
		return rc;
	if ((rc = put(b, ": ", r->err)))
		return rc;
	return put(b, m->content, r->err);
}

/* [{"name": ..., "arguments": {...}}, ...] */
static int put_generic_calls(const struct render *r, size_t i, struct lp_buf *b)
{
	const struct lp_chat_message *m = &r->msgs[i];
	int rc;

	if ((rc = put(b, "[", r->err)))
		return rc;
	for (size_t k = 0; k < m->n_tool_calls; k++) {
		const char *name = m->tool_calls[k].name;

		if ((k > 0 && (rc = put(b, ", ", r->err))) ||
		    (rc = put(b, "{\"name\": ", r->err)) ||
		    (rc = py_string(b, name, strlen(name), r->err)) ||
		    (rc = put(b, ", \"arguments\": ", r->err)) ||
		    (rc = py_dump(call_args(r, i, k), 0, 0, b, r->err)) ||
		    (rc = put(b, "}", r->err)))
			return rc;
	}
	return put(b, "]", r->err);
}

/* The system message's paragraph on the tools. */
static int put_generic_tools(const struct render *r, struct lp_buf *b)
{
	const json_t *t;
	size_t i;
	int rc;

	if ((rc = put(b,
	              "You can call the following functions, each given as a JSON object with "
	              "its name, description and parameters (a JSON Schema):\n",
	              r->err)))
		return rc;
	json_array_foreach(r->tools, i, t)
	{
		if ((rc = py_dump(json_object_get(t, "function"), 0, 0, b, r->err)) ||
		    (rc = put(b, "\n", r->err)))
			return rc;
	}
	return put(b,
	           "To call functions, answer with only a JSON array holding one object per call: "
	           "[{\"name\": \"<function name>\", \"arguments\": {<argument name>: <value>, "
	           "...}}]",
	           r->err);
}

/* Hands the text b holds to the message being built. */
static void keep_text(struct lp_buf *b, char **owned, const char **text)
{
	*owned = lp_buf_detach(b, NULL);
	*text = *owned ? *owned : "";
}

int lp_chat_template_render_generic_tools(const struct lp_chat_template *ct,
                                          const struct lp_chat_message *msgs, size_t n,
                                          const json_t *tools, bool add_generation_prompt,
                                          struct lp_buf *out, struct lp_err *err)
{
	struct lp_chat_message *conv = NULL;
	char **owned = NULL;
	struct lp_buf b;
	struct render r;
	size_t i = 0, m = 0;
	int rc;

	lp_buf_init(&b, out->max);
	if ((rc = render_begin(&r, ct, msgs, n, tools, add_generation_prompt, out, err)))
		goto out;
	conv = calloc(n + 1, sizeof(*conv));
	owned = calloc(n + 1, sizeof(*owned));
	if (!conv || !owned) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	if (r.tools) {
		/* the system message (or the template's default one), then the
		 * paragraph on the tools */
		bool sys = n > 0 && is_role(&msgs[0], "system");
		const char *text = sys ? msgs[0].content : ct->default_system;

		if ((text && text[0] &&
		     ((rc = put(&b, text, err)) || (rc = put(&b, "\n\n", err)))) ||
		    (rc = put_generic_tools(&r, &b)))
			goto out;
		keep_text(&b, &owned[m], &conv[m].content);
		conv[m++].role = "system";
		i = sys ? 1 : 0;
	}
	while (i < n) {
		const struct lp_chat_message *msg = &msgs[i];

		lp_buf_reset(&b);
		if (is_role(msg, "tool")) {
			/* results, and a user message right after them, make one
			 * user turn */
			for (; i < n && is_role(&msgs[i], "tool"); i++)
				if ((b.len && (rc = put(&b, "\n\n", err))) ||
				    (rc = put_generic_result(&r, i, &b)))
					goto out;
			if (i < n && is_role(&msgs[i], "user") &&
			    ((rc = put(&b, "\n\n", err)) || (rc = put(&b, msgs[i++].content, err))))
				goto out;
			conv[m].role = "user";
		} else if (msg->n_tool_calls) {
			if ((msg->content && msg->content[0] &&
			     ((rc = put(&b, msg->content, err)) || (rc = put(&b, "\n", err)))) ||
			    (rc = put_generic_calls(&r, i, &b)))
				goto out;
			conv[m].role = "assistant";
			i++;
		} else {
			conv[m].role = msg->role;
			conv[m++].content = msg->content;
			i++;
			continue;
		}
		keep_text(&b, &owned[m], &conv[m].content);
		m++;
	}
	rc = lp_chat_template_render(ct, conv, m, NULL, add_generation_prompt, out, err);
out:
	json_decref(r.args);
	for (i = 0; owned && i <= n; i++)
		free(owned[i]);
	free(owned);
	free(conv);
	lp_buf_release(&b);
	return rc;
}
