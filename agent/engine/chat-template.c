/* Chat templates: each supported family's Jinja template re-written as C
 * that renders the same bytes as transformers' apply_chat_template
 * (jinja2 with trim_blocks and lstrip_blocks). The family is recognised by
 * the markers its template writes; a ChatML default system prompt
 * (SmolLM2's, Qwen2.5's) is read out of its template text.
 * tests/fixtures/chat/goldens.json holds the real templates' output for
 * every family. */
#include "agent/engine/chat-template.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

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
		b = bos ? bos : "<|begin_of_text|>";
		e = "<|eot_id|>";
		break;
	case LP_CHAT_LLAMA2:
	case LP_CHAT_MISTRAL:
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
	} else if (strstr(jinja, "<|im_start|>")) {
		ct->style = LP_CHAT_CHATML;
		ct->default_system = default_system(jinja);
	} else if (strstr(jinja, "<|start_header_id|>") && strstr(jinja, "<|eot_id|>")) {
		ct->style = LP_CHAT_LLAMA3;
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
		               "supported (known: llama2, mistral as in Mistral 7B Instruct v0.2)");
	} else {
		return lp_errf(err, -ENOTSUP,
		               "chat template matches no supported family (chatml, llama3, llama2, "
		               "mistral, qwen3, gemma)");
	}
	return set_markers(ct, bos, eos, err);
}

int lp_chat_template_from_name(struct lp_chat_template *ct, const char *name, const char *bos,
                               const char *eos, struct lp_err *err)
{
	static const struct {
		const char *name;
		enum lp_chat_style style;
	} names[] = {
	    {"chatml", LP_CHAT_CHATML},   {"llama3", LP_CHAT_LLAMA3}, {"llama2", LP_CHAT_LLAMA2},
	    {"mistral", LP_CHAT_MISTRAL}, {"qwen3", LP_CHAT_QWEN3},   {"gemma", LP_CHAT_GEMMA},
	};
	size_t i;

	memset(ct, 0, sizeof(*ct));
	for (i = 0; name && i < sizeof(names) / sizeof(names[0]); i++) {
		if (strcmp(name, names[i].name) == 0) {
			ct->style = names[i].style;
			return set_markers(ct, bos, eos, err);
		}
	}
	return lp_errf(err, -EINVAL,
	               "unknown chat template '%s' (known: chatml, llama3, llama2, mistral, qwen3, "
	               "gemma)",
	               name ? name : "");
}

/* ---- rendering ---- */

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

static bool is_role(const struct lp_chat_message *m, const char *role)
{
	return strcmp(m->role, role) == 0;
}

static int check_messages(const struct lp_chat_message *msgs, size_t n, struct lp_err *err)
{
	size_t i;

	for (i = 0; i < n; i++) {
		if (!msgs[i].role || !msgs[i].content)
			return lp_errf(err, -EINVAL, "message %zu has no role or no content", i);
		if (!is_role(&msgs[i], "system") && !is_role(&msgs[i], "user") &&
		    !is_role(&msgs[i], "assistant"))
			return lp_errf(
			    err, -EINVAL,
			    "unknown role '%.64s' in message %zu (system, user or assistant)",
			    msgs[i].role, i);
	}
	return 0;
}

static int render_chatml(const struct lp_chat_template *ct, const struct lp_chat_message *msgs,
                         size_t n, bool gen, struct lp_buf *out, struct lp_err *err)
{
	size_t i;
	int rc = 0;

	for (i = 0; i < n && !rc; i++) {
		if (i == 0 && !is_role(&msgs[0], "system") && ct->default_system) {
			if ((rc = put(out, "<|im_start|>system\n", err)) ||
			    (rc = put(out, ct->default_system, err)) ||
			    (rc = put(out, "<|im_end|>\n", err)))
				break;
		}
		if ((rc = put(out, "<|im_start|>", err)) || (rc = put(out, msgs[i].role, err)) ||
		    (rc = put(out, "\n", err)) || (rc = put(out, msgs[i].content, err)))
			break;
		rc = put(out, "<|im_end|>\n", err);
	}
	if (!rc && gen)
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

static int render_qwen3(const struct lp_chat_message *msgs, size_t n, bool gen, struct lp_buf *out,
                        struct lp_err *err)
{
	size_t i, last_query = n ? n - 1 : 0;
	int rc = 0;

	for (i = n; i-- > 0;) {
		if (is_role(&msgs[i], "user") &&
		    !(starts_with(msgs[i].content, "<tool_response>") &&
		      ends_with(msgs[i].content, "</tool_response>"))) {
			last_query = i;
			break;
		}
	}
	for (i = 0; i < n && !rc; i++) {
		struct qwen3_turn t;
		bool think;

		if (!is_role(&msgs[i], "assistant")) {
			/* user or system: plain ChatML */
			if ((rc = put(out, "<|im_start|>", err)) ||
			    (rc = put(out, msgs[i].role, err)) || (rc = put(out, "\n", err)) ||
			    (rc = put(out, msgs[i].content, err)))
				break;
			rc = put(out, "<|im_end|>\n", err);
			continue;
		}
		qwen3_split(msgs[i].content, &t);
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
		rc = put(out, "<|im_end|>\n", err);
	}
	if (!rc && gen)
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

int lp_chat_template_render(const struct lp_chat_template *ct, const struct lp_chat_message *msgs,
                            size_t n, bool add_generation_prompt, struct lp_buf *out,
                            struct lp_err *err)
{
	size_t len0 = out->len;
	int rc;

	if ((rc = check_messages(msgs, n, err)))
		return rc;
	switch (ct->style) {
	case LP_CHAT_CHATML:
		rc = render_chatml(ct, msgs, n, add_generation_prompt, out, err);
		break;
	case LP_CHAT_LLAMA3:
		rc = render_llama3(ct, msgs, n, add_generation_prompt, out, err);
		break;
	case LP_CHAT_LLAMA2:
		/* the template has no generation prompt: it ends with [/INST] */
		rc = render_llama2(ct, msgs, n, out, err);
		break;
	case LP_CHAT_MISTRAL:
		rc = render_mistral(ct, msgs, n, out, err);
		break;
	case LP_CHAT_QWEN3:
		rc = render_qwen3(msgs, n, add_generation_prompt, out, err);
		break;
	case LP_CHAT_GEMMA:
		rc = render_gemma(ct, msgs, n, add_generation_prompt, out, err);
		break;
	default:
		rc = lp_errf(err, -EINVAL, "chat template style %d is unknown", (int)ct->style);
		break;
	}
	if (rc) {
		/* leave out as it was */
		out->len = len0;
		if (out->data)
			out->data[len0] = '\0';
	}
	return rc;
}
