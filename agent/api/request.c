/* Completion and chat request bodies; see request.h. */
#include "agent/api/request.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent/engine/json-schema.h"
#include "common/buf.h"

/* Longest rendered chat prompt, in bytes, before tokenization. */
#define MAX_PROMPT_TEXT (16u << 20)

/* ---- typed fields ---- */

static json_t *field(json_t *body, const char *key)
{
	json_t *v = json_object_get(body, key);

	return v && !json_is_null(v) ? v : NULL;
}

static int get_bool(json_t *body, const char *key, bool *out, struct lp_api_error *e)
{
	json_t *v = field(body, key);

	if (!v)
		return 0;
	if (!json_is_boolean(v))
		return lp_api_errorf(e, 400, "invalid_type", key, "'%s' must be a boolean", key);
	*out = json_is_true(v);
	return 0;
}

/* An integer in [lo, hi]; *given says whether the field was there. */
static int get_int(json_t *body, const char *key, long long lo, long long hi, bool *given,
                   long long *out, struct lp_api_error *e)
{
	json_t *v = field(body, key);
	long long x;

	if (given)
		*given = false;
	if (!v)
		return 0;
	if (!json_is_integer(v))
		return lp_api_errorf(e, 400, "invalid_type", key, "'%s' must be an integer", key);
	x = json_integer_value(v);
	if (x < lo)
		return lp_api_errorf(e, 400, "invalid_value", key,
		                     "'%s' must be at least %lld, got %lld", key, lo, x);
	if (x > hi)
		return lp_api_errorf(e, 400, "invalid_value", key,
		                     "'%s' must be at most %lld, got %lld", key, hi, x);
	*out = x;
	if (given)
		*given = true;
	return 0;
}

/* A finite number in [lo, hi] (lo excluded when lo_open). */
static int get_num(json_t *body, const char *key, double lo, double hi, bool lo_open, float *out,
                   struct lp_api_error *e)
{
	json_t *v = field(body, key);
	double x;

	if (!v)
		return 0;
	if (!json_is_number(v))
		return lp_api_errorf(e, 400, "invalid_type", key, "'%s' must be a number", key);
	x = json_number_value(v);
	if (!isfinite(x) || x > hi || (lo_open ? x <= lo : x < lo))
		return lp_api_errorf(e, 400, "invalid_value", key,
		                     "'%s' must be in %c%g, %g], got %g", key, lo_open ? '(' : '[',
		                     lo, hi, x);
	*out = (float)x;
	return 0;
}

static int refuse_if_set(json_t *body, const char *key, const char *why, struct lp_api_error *e)
{
	json_t *v = field(body, key);

	if (!v)
		return 0;
	if ((json_is_object(v) && json_object_size(v) == 0) ||
	    (json_is_array(v) && json_array_size(v) == 0) ||
	    (json_is_string(v) && json_string_length(v) == 0) || json_is_false(v))
		return 0;
	return lp_api_errorf(e, 400, "unsupported_parameter", key, "'%s' is not supported: %s", key,
	                     why);
}

/* ---- logit bias ---- */

/* OpenAI's logit_bias: an object of token id (a decimal string) to a bias
 * in [-100, 100], at most LP_MAX_LOGIT_BIAS of them, each id in the
 * vocabulary and named once. */
static int parse_logit_bias(struct lp_sampling_params *sp, json_t *body,
                            const struct lp_gen_limits *lim, struct lp_api_error *e)
{
	json_t *v = field(body, "logit_bias"), *val;
	int32_t vocab = lim->model->cfg.vocab_size;
	const char *key;

	if (!v)
		return 0;
	if (!json_is_object(v))
		return lp_api_errorf(e, 400, "invalid_type", "logit_bias",
		                     "'logit_bias' must be an object of token ids to numbers");
	if (json_object_size(v) > LP_MAX_LOGIT_BIAS)
		return lp_api_errorf(e, 400, "invalid_value", "logit_bias",
		                     "'logit_bias' has %zu entries, at most %d are allowed",
		                     json_object_size(v), LP_MAX_LOGIT_BIAS);
	json_object_foreach(v, key, val)
	{
		char shown[40];
		long long id = 0;
		size_t n = strlen(key);
		double b;

		snprintf(shown, sizeof(shown), "%.32s%s", key, n > 32 ? "..." : "");
		lp_api_utf8_sanitize(shown);
		if (n == 0 || n > 10 || strspn(key, "0123456789") != n)
			return lp_api_errorf(e, 400, "invalid_value", "logit_bias",
			                     "'logit_bias' key '%s' is not a token id (a decimal "
			                     "integer)",
			                     shown);
		for (size_t i = 0; i < n; i++)
			id = id * 10 + (key[i] - '0');
		if (id >= vocab)
			return lp_api_errorf(e, 400, "invalid_value", "logit_bias",
			                     "'logit_bias' token id %lld is outside the vocabulary "
			                     "(0 to %d)",
			                     id, vocab - 1);
		if (!json_is_number(val))
			return lp_api_errorf(e, 400, "invalid_type", "logit_bias",
			                     "'logit_bias' of token %lld must be a number", id);
		b = json_number_value(val);
		if (!(b >= -LP_LOGIT_BIAS_MAX && b <= LP_LOGIT_BIAS_MAX))
			return lp_api_errorf(
			    e, 400, "invalid_value", "logit_bias",
			    "'logit_bias' of token %lld must be in [-100, 100], got %g", id, b);
		for (int i = 0; i < sp->n_logit_bias; i++)
			if (sp->logit_bias[i].token == id)
				return lp_api_errorf(e, 400, "invalid_value", "logit_bias",
				                     "'logit_bias' names token %lld twice", id);
		sp->logit_bias[sp->n_logit_bias++] = (struct lp_logit_bias){(int32_t)id, (float)b};
	}
	return 0;
}

/* ---- sampling and the other common fields ---- */

static int parse_common(struct lp_gen_request *r, json_t *body, const struct lp_gen_limits *lim,
                        struct lp_api_error *e)
{
	struct lp_sampling_params *sp = &r->sampling;
	long long v;
	bool given;
	json_t *j;
	int rc;

	lp_sampling_params_default(sp);
	if ((rc = get_num(body, "temperature", 0, 2, false, &sp->temperature, e)) ||
	    (rc = get_num(body, "top_p", 0, 1, true, &sp->top_p, e)) ||
	    (rc = get_num(body, "min_p", 0, 1, false, &sp->min_p, e)) ||
	    (rc = get_num(body, "presence_penalty", -2, 2, false, &sp->presence_penalty, e)) ||
	    (rc = get_num(body, "frequency_penalty", -2, 2, false, &sp->frequency_penalty, e)) ||
	    (rc = get_num(body, "repetition_penalty", 0, 10, true, &sp->repetition_penalty, e)))
		return rc;
	if ((rc = get_int(body, "top_k", -1, INT_MAX, &given, &v, e)))
		return rc;
	if (given)
		sp->top_k = (int)v;
	if ((rc = get_int(body, "seed", LLONG_MIN, LLONG_MAX, &given, &v, e)))
		return rc;
	if (given) {
		sp->has_seed = true;
		sp->seed = (uint64_t)v;
	}
	r->n = 1;
	if ((rc = get_int(body, "n", 1, LP_GEN_MAX_N, &given, &v, e)))
		return rc;
	if (given)
		r->n = (int)v;
	if ((rc = get_int(body, "best_of", 1, LP_GEN_MAX_N, &given, &v, e)))
		return rc;
	if (given && v != r->n && v != 1)
		return lp_api_errorf(e, 400, "unsupported_parameter", "best_of",
		                     "'best_of' other than 'n' is not supported");
	if ((rc = get_bool(body, "stream", &r->stream, e)))
		return rc;
	j = field(body, "stream_options");
	if (j) {
		if (!json_is_object(j))
			return lp_api_errorf(e, 400, "invalid_type", "stream_options",
			                     "'stream_options' must be an object");
		if (!r->stream)
			return lp_api_errorf(
			    e, 400, "invalid_value", "stream_options",
			    "'stream_options' is only allowed with 'stream': true");
		json_t *iu = json_object_get(j, "include_usage");
		if (iu && !json_is_null(iu) && !json_is_boolean(iu))
			return lp_api_errorf(e, 400, "invalid_type", "stream_options.include_usage",
			                     "'stream_options.include_usage' must be a boolean");
		r->include_usage = json_is_true(iu);
	}
	if ((rc = get_bool(body, "ignore_eos", &r->ignore_eos, e)))
		return rc;
	r->skip_special = true;
	if ((rc = get_bool(body, "skip_special_tokens", &r->skip_special, e)))
		return rc;
	j = field(body, "user");
	if (j && !json_is_string(j))
		return lp_api_errorf(e, 400, "invalid_type", "user", "'user' must be a string");
	if ((rc = parse_logit_bias(sp, body, lim, e)))
		return rc;

	/* stop: a string or an array of strings */
	j = field(body, "stop");
	if (j) {
		json_t *items[LP_GEN_MAX_STOPS];
		size_t n = 0;
		if (json_is_string(j)) {
			items[n++] = j;
		} else if (json_is_array(j)) {
			if (json_array_size(j) > LP_GEN_MAX_STOPS)
				return lp_api_errorf(
				    e, 400, "invalid_value", "stop",
				    "'stop' has %zu strings, at most %d are allowed",
				    json_array_size(j), LP_GEN_MAX_STOPS);
			for (size_t i = 0; i < json_array_size(j); i++)
				items[n++] = json_array_get(j, i);
		} else {
			return lp_api_errorf(e, 400, "invalid_type", "stop",
			                     "'stop' must be a string or an array of strings");
		}
		for (size_t i = 0; i < n; i++) {
			if (!json_is_string(items[i]))
				return lp_api_errorf(e, 400, "invalid_type", "stop",
				                     "'stop' item %zu is not a string", i);
			size_t len = json_string_length(items[i]);
			if (len == 0 || len > 512)
				return lp_api_errorf(
				    e, 400, "invalid_value", "stop",
				    "'stop' item %zu must be 1 to 512 bytes long, it is %zu", i,
				    len);
			if (memchr(json_string_value(items[i]), '\0', len))
				return lp_api_errorf(e, 400, "invalid_value", "stop",
				                     "'stop' item %zu contains a NUL character", i);
			r->stops[r->n_stops] = strdup(json_string_value(items[i]));
			if (!r->stops[r->n_stops])
				return lp_api_errorf(e, 500, NULL, NULL, "out of memory");
			r->n_stops++;
		}
	}
	return 0;
}

/* ---- prompts ---- */

static struct lp_gen_prompt *add_prompt(struct lp_gen_request *r, struct lp_api_error *e)
{
	struct lp_gen_prompt *p = realloc(r->prompts, (r->n_prompts + 1) * sizeof(*p));

	if (!p) {
		lp_api_errorf(e, 500, NULL, NULL, "out of memory");
		return NULL;
	}
	r->prompts = p;
	p = &r->prompts[r->n_prompts++];
	memset(p, 0, sizeof(*p));
	return p;
}

static int set_text(struct lp_gen_prompt *p, const char *s, size_t len, struct lp_api_error *e)
{
	free(p->text);
	p->text = malloc(len + 1);
	if (!p->text)
		return lp_api_errorf(e, 500, NULL, NULL, "out of memory");
	memcpy(p->text, s, len);
	p->text[len] = '\0';
	p->text_len = len;
	return 0;
}

void lp_gen_prompt_release(struct lp_gen_prompt *p)
{
	lp_tokens_release(&p->ids);
	free(p->text);
	memset(p, 0, sizeof(*p));
}

int lp_gen_prompt_text(struct lp_gen_prompt *p, const struct lp_gen_limits *lim, const char *s,
                       size_t len, bool add_special, const char *param, struct lp_api_error *e)
{
	unsigned flags = LP_ENCODE_PARSE_SPECIAL | (add_special ? LP_ENCODE_ADD_SPECIAL : 0);
	struct lp_err err;
	int rc;

	if ((rc = set_text(p, s, len, e)))
		return rc;
	if (lp_tokenizer_encode(lim->model->tok, s, len, flags, &p->ids, &err))
		return lp_api_error_from(e, 400, "invalid_prompt", param, &err);
	return 0;
}

static int prompt_from_text(struct lp_gen_request *r, const struct lp_gen_limits *lim,
                            const char *s, size_t len, const char *param, struct lp_api_error *e)
{
	struct lp_gen_prompt *p = add_prompt(r, e);

	if (!p)
		return -500;
	return lp_gen_prompt_text(p, lim, s, len, true, param, e);
}

int lp_gen_prompt_ids(struct lp_gen_prompt *p, json_t *a, const struct lp_gen_limits *lim,
                      bool skip_special, const char *param, struct lp_api_error *e)
{
	int32_t vocab = lim->model->cfg.vocab_size;
	struct lp_detok d;
	struct lp_buf text;
	char piece[512];
	struct lp_err err;
	int n, rc = 0;

	if (!json_is_array(a))
		return lp_api_errorf(e, 400, "invalid_type", param,
		                     "'%s' must be an array of token ids", param);
	lp_buf_init(&text, MAX_PROMPT_TEXT);
	lp_detok_init(&d, skip_special);
	for (size_t i = 0; i < json_array_size(a); i++) {
		json_t *t = json_array_get(a, i);
		json_int_t id;
		if (!json_is_integer(t)) {
			rc = lp_api_errorf(e, 400, "invalid_type", param,
			                   "token id %zu of '%s' is not an integer", i, param);
			goto out;
		}
		id = json_integer_value(t);
		if (id < 0 || id >= vocab) {
			rc = lp_api_errorf(e, 400, "invalid_value", param,
			                   "token id %lld at %zu of '%s' is outside the vocabulary "
			                   "(0 to %d)",
			                   (long long)id, i, param, vocab - 1);
			goto out;
		}
		if (lp_tokens_push(&p->ids, (int32_t)id, &err)) {
			rc = lp_api_error_from(e, 500, NULL, NULL, &err);
			goto out;
		}
		n = lp_detok_piece(lim->model->tok, &d, (int32_t)id, piece, sizeof(piece));
		if (n > 0 && lp_buf_append(&text, piece, (size_t)n, &err)) {
			rc = lp_api_error_from(e, 400, "invalid_prompt", param, &err);
			goto out;
		}
	}
	n = lp_detok_flush(lim->model->tok, &d, piece, sizeof(piece));
	if (n > 0)
		lp_buf_append(&text, piece, (size_t)n, NULL);
	rc = set_text(p, text.data ? text.data : "", text.len, e);
out:
	lp_buf_release(&text);
	return rc;
}

/* Token ids from a JSON array; the text (for echo) is their decoding. */
static int prompt_from_ids(struct lp_gen_request *r, const struct lp_gen_limits *lim, json_t *a,
                           const char *param, struct lp_api_error *e)
{
	struct lp_gen_prompt *p = add_prompt(r, e);

	if (!p)
		return -500;
	if (json_array_size(a) == 0)
		return lp_api_errorf(e, 400, "invalid_prompt", param, "a token id prompt is empty");
	return lp_gen_prompt_ids(p, a, lim, r->skip_special, param, e);
}

static int parse_prompt(struct lp_gen_request *r, json_t *body, const struct lp_gen_limits *lim,
                        struct lp_api_error *e)
{
	json_t *v = field(body, "prompt"), *first;
	int rc;

	if (!v)
		return lp_api_errorf(e, 400, "missing_required_parameter", "prompt",
		                     "'prompt' is required");
	if (json_is_string(v))
		return prompt_from_text(r, lim, json_string_value(v), json_string_length(v),
		                        "prompt", e);
	if (!json_is_array(v))
		goto bad_type;
	if (json_array_size(v) == 0)
		return lp_api_errorf(e, 400, "invalid_value", "prompt",
		                     "'prompt' is an empty array");
	first = json_array_get(v, 0);
	if (json_is_integer(first))
		return prompt_from_ids(r, lim, v, "prompt", e);
	if (json_array_size(v) > LP_GEN_MAX_PROMPTS)
		return lp_api_errorf(e, 400, "invalid_value", "prompt",
		                     "'prompt' has %zu prompts, at most %d are allowed",
		                     json_array_size(v), LP_GEN_MAX_PROMPTS);
	for (size_t i = 0; i < json_array_size(v); i++) {
		json_t *item = json_array_get(v, i);
		if (json_is_string(item) && json_is_string(first))
			rc = prompt_from_text(r, lim, json_string_value(item),
			                      json_string_length(item), "prompt", e);
		else if (json_is_array(item) && json_is_array(first))
			rc = prompt_from_ids(r, lim, item, "prompt", e);
		else
			goto bad_type;
		if (rc)
			return rc;
	}
	return 0;
bad_type:
	return lp_api_errorf(e, 400, "invalid_type", "prompt",
	                     "'prompt' must be a string, an array of strings, an array of token "
	                     "ids or an array of arrays of token ids");
}

/* The text of one message's content: a string, or an array of text parts
 * joined with newlines (written to *owned when joined). */
static int message_content(json_t *msg, size_t i, bool assistant, const char **out, char **owned,
                           struct lp_api_error *e)
{
	json_t *c = json_object_get(msg, "content");
	char param[48];
	struct lp_buf b;
	int rc = 0;

	snprintf(param, sizeof(param), "messages[%zu].content", i);
	*owned = NULL;
	if (!c || json_is_null(c)) {
		if (assistant) {
			*out = "";
			return 0;
		}
		return lp_api_errorf(e, 400, "missing_required_parameter", param,
		                     "'%s' is required", param);
	}
	if (json_is_string(c)) {
		if (memchr(json_string_value(c), '\0', json_string_length(c)))
			return lp_api_errorf(e, 400, "invalid_value", param,
			                     "'%s' contains a NUL character", param);
		*out = json_string_value(c);
		return 0;
	}
	if (!json_is_array(c))
		return lp_api_errorf(e, 400, "invalid_type", param,
		                     "'%s' must be a string or an array of text parts", param);
	lp_buf_init(&b, MAX_PROMPT_TEXT);
	for (size_t k = 0; k < json_array_size(c); k++) {
		json_t *part = json_array_get(c, k), *type, *text;
		if (!json_is_object(part)) {
			rc = lp_api_errorf(e, 400, "invalid_type", param,
			                   "part %zu of '%s' must be an object", k, param);
			break;
		}
		type = json_object_get(part, "type");
		text = json_object_get(part, "text");
		if (!json_is_string(type) || strcmp(json_string_value(type), "text")) {
			rc = lp_api_errorf(e, 400, "unsupported_content", param,
			                   "part %zu of '%s' has type '%s': only 'text' parts are "
			                   "supported",
			                   k, param,
			                   json_is_string(type) ? json_string_value(type) : "?");
			break;
		}
		if (!json_is_string(text) ||
		    memchr(json_string_value(text), '\0', json_string_length(text))) {
			rc = lp_api_errorf(e, 400, "invalid_type", param,
			                   "part %zu of '%s' needs a string 'text'", k, param);
			break;
		}
		if ((k && lp_buf_append(&b, "\n", 1, NULL)) ||
		    lp_buf_append(&b, json_string_value(text), json_string_length(text), NULL)) {
			rc = lp_api_errorf(e, 400, "invalid_value", param, "'%s' is too long",
			                   param);
			break;
		}
	}
	if (rc) {
		lp_buf_release(&b);
		return rc;
	}
	if (!b.data && lp_buf_append(&b, "", 0, NULL)) {
		lp_buf_release(&b);
		return lp_api_errorf(e, 500, NULL, NULL, "out of memory");
	}
	*owned = lp_buf_detach(&b, NULL);
	*out = *owned;
	return 0;
}

/* An assistant message's tool_calls (OpenAI's [{"id", "type": "function",
 * "function": {"name", "arguments"}}]) into *out (calloc'd; strings
 * borrowed from the message, arguments sent as an object written to
 * owned texts). */
static int message_tool_calls(json_t *m, size_t i, struct lp_chat_tool_call **out, size_t *n_out,
                              char ***owned_args, struct lp_api_error *e)
{
	json_t *tc = json_object_get(m, "tool_calls");
	char param[64];
	size_t n;
	int rc;

	*out = NULL;
	*n_out = 0;
	*owned_args = NULL;
	if (!tc || json_is_null(tc))
		return 0;
	snprintf(param, sizeof(param), "messages[%zu].tool_calls", i);
	if (!json_is_array(tc))
		return lp_api_errorf(e, 400, "invalid_type", param, "'%s' must be an array", param);
	if ((n = json_array_size(tc)) == 0)
		return 0;
	if (n > LP_TOOLS_MAX_CALLS)
		return lp_api_errorf(e, 400, "invalid_value", param,
		                     "'%s' holds more than %d calls", param, LP_TOOLS_MAX_CALLS);
	*out = calloc(n, sizeof(**out));
	*owned_args = calloc(n, sizeof(char *));
	if (!*out || !*owned_args) {
		rc = lp_api_errorf(e, 500, NULL, NULL, "out of memory");
		goto fail;
	}
	for (size_t k = 0; k < n; k++) {
		json_t *c = json_array_get(tc, k), *f, *id, *name, *args;
		snprintf(param, sizeof(param), "messages[%zu].tool_calls[%zu]", i, k);
		f = json_is_object(c) ? json_object_get(c, "function") : NULL;
		id = json_is_object(c) ? json_object_get(c, "id") : NULL;
		name = json_is_object(f) ? json_object_get(f, "name") : NULL;
		args = json_is_object(f) ? json_object_get(f, "arguments") : NULL;
		if (!json_is_string(id) || !json_is_string(name)) {
			rc = lp_api_errorf(e, 400, "invalid_type", param,
			                   "'%s' needs a string 'id' and 'function.name'", param);
			goto fail;
		}
		(*out)[k].id = json_string_value(id);
		(*out)[k].name = json_string_value(name);
		if (json_is_string(args)) {
			(*out)[k].arguments = json_string_value(args);
		} else if (json_is_object(args)) {
			if (!((*owned_args)[k] =
			          json_dumps(args, JSON_COMPACT | JSON_PRESERVE_ORDER))) {
				rc = lp_api_errorf(e, 500, NULL, NULL, "out of memory");
				goto fail;
			}
			(*out)[k].arguments = (*owned_args)[k];
		} else if (!args || json_is_null(args)) {
			(*out)[k].arguments = "{}";
		} else {
			rc = lp_api_errorf(e, 400, "invalid_type", param,
			                   "'%s.function.arguments' must be a JSON string", param);
			goto fail;
		}
	}
	*n_out = n;
	return 0;
fail:
	for (size_t k = 0; *owned_args && k < n; k++)
		free((*owned_args)[k]);
	free(*owned_args);
	free(*out);
	*owned_args = NULL;
	*out = NULL;
	return rc;
}

int lp_gen_prompt_messages(struct lp_gen_prompt *p, json_t *v, const struct lp_gen_limits *lim,
                           const struct lp_tools *tools, bool add_generation_prompt,
                           bool add_special, struct lp_api_error *e)
{
	unsigned flags = LP_ENCODE_PARSE_SPECIAL | (add_special ? LP_ENCODE_ADD_SPECIAL : 0);
	struct lp_chat_message *msgs = NULL;
	struct lp_chat_tool_call **calls = NULL;
	char **owned = NULL, ***owned_args = NULL;
	const json_t *tj = tools ? tools->json : NULL;
	bool tool_turns = false, forced;
	struct lp_buf text;
	struct lp_err err;
	size_t n = 0;
	int rc = 0;

	if (!v || json_is_null(v))
		return lp_api_errorf(e, 400, "missing_required_parameter", "messages",
		                     "'messages' is required");
	if (!json_is_array(v))
		return lp_api_errorf(e, 400, "invalid_type", "messages",
		                     "'messages' must be an array of messages");
	n = json_array_size(v);
	if (n == 0 || n > LP_GEN_MAX_MESSAGES)
		return lp_api_errorf(e, 400, "invalid_value", "messages",
		                     "'messages' must hold 1 to %d messages, it holds %zu",
		                     LP_GEN_MAX_MESSAGES, n);
	if (!lim->chat)
		return lp_api_errorf(e, 400, "no_chat_template", "messages",
		                     "the model '%s' has no chat template: use /v1/completions",
		                     lim->model->name ? lim->model->name : "");
	msgs = calloc(n, sizeof(*msgs));
	owned = calloc(n, sizeof(*owned));
	calls = calloc(n, sizeof(*calls));
	owned_args = calloc(n, sizeof(*owned_args));
	lp_buf_init(&text, MAX_PROMPT_TEXT);
	if (!msgs || !owned || !calls || !owned_args) {
		rc = lp_api_errorf(e, 500, NULL, NULL, "out of memory");
		goto out;
	}
	for (size_t i = 0; i < n; i++) {
		json_t *m = json_array_get(v, i), *role;
		char param[48];
		const char *rs;

		snprintf(param, sizeof(param), "messages[%zu]", i);
		if (!json_is_object(m)) {
			rc = lp_api_errorf(e, 400, "invalid_type", param, "'%s' must be an object",
			                   param);
			goto out;
		}
		role = json_object_get(m, "role");
		snprintf(param, sizeof(param), "messages[%zu].role", i);
		if (!json_is_string(role)) {
			rc = lp_api_errorf(e, 400, "invalid_type", param, "'%s' must be a string",
			                   param);
			goto out;
		}
		rs = json_string_value(role);
		if (!strcmp(rs, "developer"))
			rs = "system";
		if (strcmp(rs, "system") && strcmp(rs, "user") && strcmp(rs, "assistant") &&
		    strcmp(rs, "tool")) {
			rc = lp_api_errorf(e, 400, "invalid_value", param,
			                   "'%s' is '%s': only 'system', 'developer', 'user', "
			                   "'assistant' and 'tool' are supported",
			                   param, rs);
			goto out;
		}
		msgs[i].role = rs;
		if ((rc = message_content(m, i, !strcmp(rs, "assistant"), &msgs[i].content,
		                          &owned[i], e)))
			goto out;
		if (!strcmp(rs, "assistant")) {
			if ((rc = message_tool_calls(m, i, &calls[i], &msgs[i].n_tool_calls,
			                             &owned_args[i], e)))
				goto out;
			msgs[i].tool_calls = calls[i];
			tool_turns |= msgs[i].n_tool_calls > 0;
		} else if (!strcmp(rs, "tool")) {
			json_t *id = json_object_get(m, "tool_call_id"),
			       *name = json_object_get(m, "name");
			snprintf(param, sizeof(param), "messages[%zu].tool_call_id", i);
			if (!json_is_string(id)) {
				rc = lp_api_errorf(e, 400, "invalid_type", param,
				                   "'%s' must be the id of the call answered",
				                   param);
				goto out;
			}
			msgs[i].tool_call_id = json_string_value(id);
			msgs[i].name = json_is_string(name) ? json_string_value(name) : NULL;
			tool_turns = true;
		}
	}
	/* a template without a tool format renders tools and tool turns in
	 * loraplane's generic format when a call is forced or the
	 * conversation holds tool turns; otherwise tools it cannot show are
	 * left out (tool_choice "none") */
	forced = tools && (tools->choice == LP_TOOL_CHOICE_REQUIRED ||
	                   tools->choice == LP_TOOL_CHOICE_NAMED);
	if (lim->chat->tools == LP_CHAT_TOOLS_NONE && (forced || tool_turns))
		rc = lp_chat_template_render_generic_tools(lim->chat, msgs, n, forced ? tj : NULL,
		                                           add_generation_prompt, &text, &err);
	else
		rc = lp_chat_template_render(lim->chat, msgs, n,
		                             lim->chat->tools == LP_CHAT_TOOLS_NONE ? NULL : tj,
		                             add_generation_prompt, &text, &err);
	if (rc) {
		rc = lp_api_error_from(e, err.code == -ENOMEM ? 500 : 400, "invalid_messages",
		                       "messages", &err);
		goto out;
	}
	if ((rc = set_text(p, text.data ? text.data : "", text.len, e)))
		goto out;
	if (lp_tokenizer_encode(lim->model->tok, p->text, p->text_len, flags, &p->ids, &err))
		rc = lp_api_error_from(e, 400, "invalid_messages", "messages", &err);
out:
	for (size_t i = 0; i < n; i++) {
		if (owned)
			free(owned[i]);
		if (owned_args && owned_args[i]) {
			for (size_t k = 0; calls && k < msgs[i].n_tool_calls; k++)
				free(owned_args[i][k]);
			free(owned_args[i]);
		}
		if (calls)
			free(calls[i]);
	}
	free(owned);
	free(owned_args);
	free(calls);
	free(msgs);
	lp_buf_release(&text);
	return rc;
}

static int parse_messages(struct lp_gen_request *r, json_t *body, const struct lp_gen_limits *lim,
                          struct lp_api_error *e)
{
	struct lp_gen_prompt *p;
	int rc;

	if (lim->chat && (rc = lp_tools_parse(body, lim->chat->tools, &r->tools, e)))
		return rc;
	if (!(p = add_prompt(r, e)))
		return -500;
	/* the chat template writes the special tokens itself */
	return lp_gen_prompt_messages(p, field(body, "messages"), lim, &r->tools, true, false, e);
}

/* ---- response_format: constrained decoding ---- */

#define GRAMMAR_TEXT_MAX ((size_t)4 << 20)

/* The grammar text of gb (borrowed) parsed into r->grammar. */
static int set_grammar(struct lp_gen_request *r, const struct lp_gen_limits *lim, struct lp_buf *gb,
                       const char *param, struct lp_api_error *e)
{
	struct lp_err err;

	if (lp_grammar_cache_get(lim->grammars, gb->data, gb->len, &r->grammar, &err))
		return lp_api_error_from(e, err.code == -ENOMEM ? 500 : 400, "invalid_value", param,
		                         &err);
	return 0;
}

/* {"type": "text"}, {"type": "json_object"} or {"type": "json_schema",
 * "json_schema": {"name", "schema", "strict", "description"}} (OpenAI's
 * response_format); docs/api.md lists the schema subset. */
static int parse_response_format(struct lp_gen_request *r, json_t *body,
                                 const struct lp_gen_limits *lim, struct lp_api_error *e)
{
	json_t *rf = field(body, "response_format"), *t, *js, *schema, *name, *strict;
	struct lp_buf gb;
	struct lp_err err;
	const char *ts;
	int rc;

	if (!rf)
		return 0;
	if (!json_is_object(rf))
		return lp_api_errorf(e, 400, "invalid_type", "response_format",
		                     "'response_format' must be an object");
	t = json_object_get(rf, "type");
	if (!json_is_string(t))
		return lp_api_errorf(e, 400, "invalid_type", "response_format.type",
		                     "'response_format.type' must be a string");
	ts = json_string_value(t);
	if (!strcmp(ts, "text"))
		return 0;
	lp_buf_init(&gb, GRAMMAR_TEXT_MAX);
	if (!strcmp(ts, "json_object")) {
		if (lp_buf_append(&gb, "root ::= r-root\n", 16, &err) ||
		    lp_json_object_grammar("r-", &gb, &err)) {
			lp_buf_release(&gb);
			return lp_api_error_from(e, 500, NULL, NULL, &err);
		}
		rc = set_grammar(r, lim, &gb, "response_format", e);
		lp_buf_release(&gb);
		return rc;
	}
	if (strcmp(ts, "json_schema")) {
		lp_buf_release(&gb);
		return lp_api_errorf(e, 400, "invalid_value", "response_format.type",
		                     "'response_format.type' is '%s': it must be 'text', "
		                     "'json_object' or 'json_schema'",
		                     ts);
	}
	js = json_object_get(rf, "json_schema");
	if (!json_is_object(js)) {
		lp_buf_release(&gb);
		return lp_api_errorf(e, 400, "invalid_type", "response_format.json_schema",
		                     "'response_format.json_schema' must be an object");
	}
	name = json_object_get(js, "name");
	if (name && !json_is_string(name)) {
		lp_buf_release(&gb);
		return lp_api_errorf(e, 400, "invalid_type", "response_format.json_schema.name",
		                     "'response_format.json_schema.name' must be a string");
	}
	strict = json_object_get(js, "strict");
	if (strict && !json_is_boolean(strict) && !json_is_null(strict)) {
		lp_buf_release(&gb);
		return lp_api_errorf(e, 400, "invalid_type", "response_format.json_schema.strict",
		                     "'response_format.json_schema.strict' must be a boolean");
	}
	schema = json_object_get(js, "schema");
	/* OpenAI allows the schema to be left out: any JSON object */
	if (!schema || json_is_null(schema)) {
		rc = lp_buf_append(&gb, "root ::= r-root\n", 16, &err) ||
		     lp_json_object_grammar("r-", &gb, &err);
		if (rc) {
			lp_buf_release(&gb);
			return lp_api_error_from(e, 500, NULL, NULL, &err);
		}
	} else {
		if (!json_is_object(schema) && !json_is_boolean(schema)) {
			lp_buf_release(&gb);
			return lp_api_errorf(
			    e, 400, "invalid_type", "response_format.json_schema.schema",
			    "'response_format.json_schema.schema' must be an object");
		}
		if (lp_buf_append(&gb, "root ::= r-root\n", 16, &err) ||
		    (rc = lp_json_schema_grammar(schema, "r-", &gb, &err))) {
			lp_buf_release(&gb);
			return lp_api_error_from(e, err.code == -ENOMEM ? 500 : 400,
			                         "invalid_value",
			                         "response_format.json_schema.schema", &err);
		}
	}
	rc = set_grammar(r, lim, &gb, "response_format.json_schema.schema", e);
	lp_buf_release(&gb);
	return rc;
}

/* ---- the whole request ---- */

int lp_gen_request_parse(struct lp_gen_request *r, json_t *body, bool chat,
                         const struct lp_gen_limits *lim, struct lp_api_error *e)
{
	const char *mt_key = "max_tokens";
	const char *prompt_param = chat ? "messages" : "prompt";
	size_t longest = 0;
	long long v;
	bool given;
	json_t *j;
	int rc;

	memset(r, 0, sizeof(*r));
	r->chat = chat;
	r->logprobs = -1;
	j = json_object_get(body, "model");
	if (!j || json_is_null(j))
		return lp_api_errorf(e, 400, "missing_required_parameter", "model",
		                     "'model' is required");
	if (!json_is_string(j))
		return lp_api_errorf(e, 400, "invalid_type", "model", "'model' must be a string");
	if (json_string_length(j) == 0 || json_string_length(j) > LP_GEN_MAX_MODEL)
		return lp_api_errorf(e, 400, "invalid_value", "model",
		                     "'model' must be 1 to %d bytes long", LP_GEN_MAX_MODEL);
	snprintf(r->model, sizeof(r->model), "%s", json_string_value(j));

	if ((rc = parse_common(r, body, lim, e)))
		return rc;
	if (chat) {
		bool lp = false;
		if ((rc = get_bool(body, "logprobs", &lp, e)))
			return rc;
		if ((rc = get_int(body, "top_logprobs", 0, LP_MAX_TOP_LOGPROBS, &given, &v, e)))
			return rc;
		if (given && !lp)
			return lp_api_errorf(e, 400, "invalid_value", "top_logprobs",
			                     "'top_logprobs' needs 'logprobs': true");
		r->logprobs = lp ? (given ? (int)v : 0) : -1;
		if (field(body, "max_completion_tokens"))
			mt_key = "max_completion_tokens";
	} else {
		if ((rc = get_int(body, "logprobs", 0, LP_MAX_TOP_LOGPROBS, &given, &v, e)))
			return rc;
		if (given)
			r->logprobs = (int)v;
		if ((rc = get_bool(body, "echo", &r->echo, e)))
			return rc;
		if (r->echo && r->logprobs >= 0)
			return lp_api_errorf(e, 400, "unsupported_parameter", "echo",
			                     "'echo' together with 'logprobs' is not supported (no "
			                     "prompt logprobs)");
		if ((rc = refuse_if_set(body, "suffix", "no insertion in this server", e)))
			return rc;
	}
	if ((rc = get_int(body, mt_key, 1, LLONG_MAX, &given, &v, e)))
		return rc;
	if (given && v > lim->max_model_len)
		return lp_api_errorf(
		    e, 400, "invalid_value", mt_key,
		    "'%s' is %lld, more than the model's context length of %d tokens", mt_key, v,
		    lim->max_model_len);

	rc = chat ? parse_messages(r, body, lim, e) : parse_prompt(r, body, lim, e);
	if (rc || (rc = parse_response_format(r, body, lim, e)))
		return rc;
	if (r->grammar && r->tools.choice != LP_TOOL_CHOICE_NONE)
		return lp_api_errorf(
		    e, 400, "invalid_value", "response_format",
		    "'response_format' constrains the whole output, which leaves no "
		    "room for tool calls: send it with 'tool_choice' \"none\" or "
		    "without 'tools'");
	if (r->tools.grammar) {
		struct lp_err err;
		if (lp_grammar_cache_get(lim->grammars, r->tools.grammar, r->tools.grammar_len,
		                         &r->grammar, &err))
			return lp_api_error_from(e, err.code == -ENOMEM ? 500 : 400,
			                         "invalid_value", "tools", &err);
	}
	if (r->n_prompts * (size_t)r->n > LP_GEN_MAX_CHOICES)
		return lp_api_errorf(e, 400, "invalid_value", "n",
		                     "%zu prompts times 'n' %d is more than %d choices",
		                     r->n_prompts, r->n, LP_GEN_MAX_CHOICES);
	for (size_t i = 0; i < r->n_prompts; i++) {
		size_t len = r->prompts[i].ids.n;
		if (len == 0)
			return lp_api_errorf(e, 400, "invalid_prompt", prompt_param,
			                     "the prompt is empty (no tokens)");
		if (len >= (size_t)lim->max_model_len)
			return lp_api_errorf(
			    e, 400, "context_length_exceeded", prompt_param,
			    "the prompt is %zu tokens, but the model's context length "
			    "is %d tokens (including at least one new token)",
			    len, lim->max_model_len);
		if (len > longest)
			longest = len;
	}
	if (!given) {
		long room = (long)lim->max_model_len - (long)longest;
		v = chat ? room : (room < 16 ? room : 16);
	} else if ((long long)longest + v > lim->max_model_len) {
		return lp_api_errorf(e, 400, "context_length_exceeded", mt_key,
		                     "the model's context length is %d tokens; the prompt is %zu "
		                     "tokens and '%s' asks for %lld more",
		                     lim->max_model_len, longest, mt_key, v);
	}
	r->max_tokens = (int)v;
	return 0;
}

void lp_gen_request_release(struct lp_gen_request *r)
{
	for (size_t i = 0; i < r->n_prompts; i++)
		lp_gen_prompt_release(&r->prompts[i]);
	free(r->prompts);
	for (size_t i = 0; i < r->n_stops; i++)
		free(r->stops[i]);
	lp_grammar_unref(r->grammar);
	lp_tools_release(&r->tools);
	memset(r, 0, sizeof(*r));
}
