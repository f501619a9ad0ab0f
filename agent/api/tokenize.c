/* POST /tokenize and POST /detokenize; see tokenize.h. */
#include "agent/api/tokenize.h"

#include <stdlib.h>
#include <string.h>

#include "agent/api/registry.h"
#include "agent/api/request.h"
#include "agent/api/resolver.h"

/* A boolean field, def when absent or null. */
static int get_flag(json_t *body, const char *key, bool def, bool *out, struct lp_api_error *e)
{
	json_t *v = json_object_get(body, key);

	*out = def;
	if (!v || json_is_null(v))
		return 0;
	if (!json_is_boolean(v))
		return lp_api_errorf(e, 400, "invalid_type", key, "'%s' must be a boolean", key);
	*out = json_is_true(v);
	return 0;
}

/* Checks `model` as generation does: absent means the base model (vLLM's
 * tokenizer endpoints make it optional); a name that is neither the base
 * model nor a loaded adapter is 404, unless --lora-resolver loads it. */
static int check_model(struct lp_call *c, json_t *body, struct lp_api_error *e)
{
	struct lp_server *s = c->s;
	json_t *jm = json_object_get(body, "model");
	const char *name;

	if (!jm || json_is_null(jm)) {
		snprintf(c->model, sizeof(c->model), "%s", s->cfg.served_name);
		return 0;
	}
	if (!json_is_string(jm))
		return lp_api_errorf(e, 400, "invalid_type", "model", "'model' must be a string");
	if (json_string_length(jm) == 0 || json_string_length(jm) > LP_GEN_MAX_MODEL)
		return lp_api_errorf(e, 400, "invalid_value", "model",
		                     "'model' must be 1 to %d bytes long", LP_GEN_MAX_MODEL);
	name = json_string_value(jm);
	if (strcmp(name, s->cfg.served_name) && !lp_registry_get(s->loras, name, NULL, 0)) {
		int rc = lp_resolver_resolve(s->resolver, s, name, c->id, e);
		if (rc)
			return rc;
	}
	snprintf(c->model, sizeof(c->model), "%s", name);
	return 0;
}

/* The request's body once the server is ready, with its model checked;
 * NULL after an error was sent. */
static json_t *begin(struct lp_call *c)
{
	struct lp_api_error e;
	json_t *body = NULL;

	if (!atomic_load(&c->s->ready)) {
		lp_call_errorf(c, 503, "not_ready", NULL, "the model is not ready yet");
		return NULL;
	}
	if (lp_call_read_json(c, &body, &e) || check_model(c, body, &e)) {
		json_decref(body);
		lp_call_send_error(c, &e);
		return NULL;
	}
	return body;
}

/* The vocabulary texts of ids, as JSON strings (bytes that are not UTF-8
 * become '?'; tokenizer.json vocabularies are UTF-8 anyway). */
static json_t *token_strs(const struct lp_tokenizer *tok, const struct lp_tokens *ids)
{
	json_t *a = json_array();

	for (size_t i = 0; a && i < ids->n; i++) {
		size_t len;
		const char *t = lp_tokenizer_token_text(tok, ids->ids[i], &len);
		json_t *js = t ? json_stringn(t, len) : json_string("");

		if (!js && t) {
			char *copy = strndup(t, len);
			if (copy) {
				lp_api_utf8_sanitize(copy);
				js = json_string(copy);
				free(copy);
			}
		}
		if (!js || json_array_append_new(a, js)) {
			json_decref(a);
			return NULL;
		}
	}
	return a;
}

int lp_tokenize(struct lp_call *c)
{
	struct lp_server *s = c->s;
	struct lp_gen_limits lim = {s->model, s->chat, s->max_model_len, NULL};
	json_t *body, *prompt, *messages, *tokens, *out;
	struct lp_gen_prompt p;
	struct lp_api_error e;
	bool chat, add_special, add_gen, cont, strs;
	int rc;

	memset(&p, 0, sizeof(p));
	if (!(body = begin(c)))
		return c->status;
	prompt = json_object_get(body, "prompt");
	messages = json_object_get(body, "messages");
	chat = messages && !json_is_null(messages);
	if (chat && prompt && !json_is_null(prompt)) {
		rc = lp_api_errorf(&e, 400, "invalid_request", "prompt",
		                   "give either 'prompt' or 'messages', not both");
		goto fail;
	}
	if ((rc = get_flag(body, "add_special_tokens", !chat, &add_special, &e)) ||
	    (rc = get_flag(body, "add_generation_prompt", true, &add_gen, &e)) ||
	    (rc = get_flag(body, "continue_final_message", false, &cont, &e)) ||
	    (rc = get_flag(body, "return_token_strs", false, &strs, &e)))
		goto fail;
	if (cont) {
		rc = lp_api_errorf(&e, 400, "unsupported_parameter", "continue_final_message",
		                   "'continue_final_message' is not supported");
		goto fail;
	}
	if (chat) {
		rc = lp_gen_prompt_messages(&p, messages, &lim, NULL, add_gen, add_special, &e);
	} else if (!prompt || json_is_null(prompt)) {
		rc = lp_api_errorf(&e, 400, "missing_required_parameter", "prompt",
		                   "'prompt' (a string) or 'messages' is required");
	} else if (!json_is_string(prompt)) {
		rc = lp_api_errorf(&e, 400, "invalid_type", "prompt", "'prompt' must be a string");
	} else {
		rc = lp_gen_prompt_text(&p, &lim, json_string_value(prompt),
		                        json_string_length(prompt), add_special, "prompt", &e);
	}
	if (rc)
		goto fail;
	tokens = json_array();
	for (size_t i = 0; tokens && i < p.ids.n; i++) {
		if (json_array_append_new(tokens, json_integer(p.ids.ids[i]))) {
			json_decref(tokens);
			tokens = NULL;
		}
	}
	out = !tokens ? NULL
	              : json_pack("{s:I, s:i, s:o}", "count", (json_int_t)p.ids.n, "max_model_len",
	                          s->max_model_len, "tokens", tokens);
	if (out && strs &&
	    json_object_set_new(out, "token_strs", token_strs(s->model->tok, &p.ids))) {
		json_decref(out);
		out = NULL;
	}
	lp_gen_prompt_release(&p);
	json_decref(body);
	if (!out)
		return lp_call_errorf(c, 500, NULL, NULL, "out of memory");
	return lp_call_send_json(c, 200, out);
fail:
	lp_gen_prompt_release(&p);
	json_decref(body);
	return lp_call_send_error(c, &e);
}

int lp_detokenize(struct lp_call *c)
{
	struct lp_server *s = c->s;
	struct lp_gen_limits lim = {s->model, s->chat, s->max_model_len, NULL};
	struct lp_gen_prompt p;
	struct lp_api_error e;
	json_t *body, *tokens, *out;

	memset(&p, 0, sizeof(p));
	if (!(body = begin(c)))
		return c->status;
	tokens = json_object_get(body, "tokens");
	if (!tokens || json_is_null(tokens)) {
		lp_api_errorf(&e, 400, "missing_required_parameter", "tokens",
		              "'tokens' is required");
		goto fail;
	}
	/* special tokens written out, as vLLM's (HF's) decode does */
	if (lp_gen_prompt_ids(&p, tokens, &lim, false, "tokens", &e))
		goto fail;
	out = json_pack("{s:s%}", "prompt", p.text ? p.text : "", p.text_len);
	lp_gen_prompt_release(&p);
	json_decref(body);
	if (!out)
		return lp_call_errorf(c, 500, NULL, NULL, "cannot encode the text");
	return lp_call_send_json(c, 200, out);
fail:
	lp_gen_prompt_release(&p);
	json_decref(body);
	return lp_call_send_error(c, &e);
}
