/* The OpenAI-compatible endpoints; see openai.h.
 *
 * A completion request becomes one engine request per choice (prompts x
 * n). The HTTP thread submits them, waits for each one's first event (so
 * that an error such as an unknown adapter still gets its own status),
 * then reads every channel in turn: tokens are detokenized, run through
 * the stop-string matcher and either written as SSE chunks at once or
 * gathered into the final JSON. A failed write means the client left:
 * every request of the call is cancelled, which frees its KV blocks. */
#include "agent/api/openai.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent/api/metrics.h"
#include "agent/api/registry.h"
#include "agent/api/request.h"
#include "agent/api/resolver.h"
#include "agent/engine/unicode-utf8.h"

#include "common/log.h"

/* How long one wait on a channel lasts before the loop looks at the
 * shutdown flags again. */
#define POLL_MS 50

struct choice {
	struct lp_request *req;
	size_t index;  /* in the response */
	size_t prompt; /* index into the request's prompts */
	struct lp_detok detok;
	struct lp_stop_matcher stop;
	bool stop_ready;
	struct lp_buf text; /* whole text (non-streaming) */
	size_t chars;       /* characters of text so far, for text_offset */
	int tokens;         /* generated tokens taken */
	bool done;
	bool stopped; /* a stop string matched */
	bool cancelled;
	bool failed; /* the engine failed under it (failure says why) */
	struct lp_err failure;
	bool role_sent;
	bool has_pending; /* pending holds the first event */
	struct lp_event pending;
	enum lp_finish_reason finish;
	json_t *lp; /* logprobs gathered (non-streaming) */
	/* chat with tools (tool_choice other than "none"): the output is read
	 * for tool calls (agent/api/tools.h); its content events are what
	 * goes out as content */
	struct lp_tool_parser *tp;
	int cached; /* prompt tokens the prefix cache held (the end event's) */
	/* lp_now() seconds, for the metrics: entered the submit queue, first
	 * ran in the engine (0: not yet), first and last token, done */
	double t_queued, t_scheduled, t_first, t_last, t_done;
};

struct gen {
	struct lp_call *c;
	struct lp_server *s;
	struct lp_gen_request req;
	const char *adapter; /* NULL: the base model */
	struct choice *ch;
	size_t n_ch;
	char id[96];
	long long created;
	long prompt_tokens;
	bool stream;
	bool gone; /* the client went away */
};

/* ---- small helpers ---- */

static size_t utf8_chars(const char *s, size_t n)
{
	size_t c = 0;

	for (size_t i = 0; i < n; i++)
		c += ((unsigned char)s[i] & 0xc0) != 0x80;
	return c;
}

static json_t *jreal(double v)
{
	return json_real(isfinite(v) ? v : -9999.0);
}

/* The string of a token in logprobs: each byte escaped at most. */
#define TOKEN_TEXT_MAX (4 * LP_TOKEN_BYTES_MAX + 1)

/* One token for logprobs, special tokens included and no leading-space
 * stripping. bytes (LP_TOKEN_BYTES_MAX) gets the token's own bytes, part
 * of a UTF-8 character included, so that the bytes of a reply's tokens
 * join into its text, as OpenAI's contract says; out (TOKEN_TEXT_MAX) gets
 * them as a string, where each byte that is not part of a whole character
 * is written as the escape \xNN (lowercase hex), as OpenAI writes such
 * tokens. */
static void token_text(const struct lp_model *m, int32_t id, char *out, unsigned char *bytes,
                       size_t *n_bytes)
{
	int n = lp_detok_token_bytes(m->tok, id, bytes, LP_TOKEN_BYTES_MAX);
	size_t o = 0;

	*n_bytes = n > 0 ? (size_t)n : 0;
	for (size_t i = 0; i < *n_bytes;) {
		size_t len = (size_t)lp_utf8_seq_len(bytes[i]);

		if (len && i + len <= *n_bytes && lp_utf8_valid((const char *)bytes + i, len)) {
			memcpy(out + o, bytes + i, len);
			o += len;
			i += len;
		} else {
			o += (size_t)snprintf(out + o, 5, "\\x%02x", bytes[i]);
			i++;
		}
	}
	out[o] = '\0';
}

static const char *finish_name(const struct choice *ch)
{
	if (ch->tp && lp_tool_parser_n_calls(ch->tp) > 0 && !ch->cancelled &&
	    (ch->stopped || ch->finish != LP_FINISH_LENGTH))
		return "tool_calls";
	if (ch->stopped)
		return "stop";
	if (ch->cancelled)
		return "abort";
	switch (ch->finish) {
	case LP_FINISH_STOP:
		return "stop";
	case LP_FINISH_LENGTH:
		return "length";
	default:
		return "abort";
	}
}

/* ---- GET /v1/models ---- */

static json_t *model_card(const char *id, long long created, const char *root, const char *parent,
                          int max_len)
{
	return json_pack("{s:s, s:s, s:I, s:s, s:s, s:o, s:i}", "id", id, "object", "model",
	                 "created", (json_int_t)created, "owned_by", "loraplane", "root", root,
	                 "parent", parent ? json_string(parent) : json_null(), "max_model_len",
	                 max_len);
}

int lp_openai_models(struct lp_call *c)
{
	struct lp_server *s = c->s;
	struct lp_registry_entry *a;
	json_t *data;
	size_t n = 0;

	if (!atomic_load(&s->ready))
		return lp_call_errorf(c, 503, "not_ready", NULL, "the model is not ready yet");
	data = json_array();
	a = lp_registry_list(s->loras, &n);
	if (!data) {
		free(a);
		return lp_call_errorf(c, 500, NULL, NULL, "out of memory");
	}
	json_array_append_new(data, model_card(s->cfg.served_name, s->created, s->cfg.model_source,
	                                       NULL, s->max_model_len));
	for (size_t i = 0; i < n; i++) {
		lp_api_utf8_sanitize(a[i].source);
		json_array_append_new(data, model_card(a[i].name, s->created, a[i].source,
		                                       s->cfg.served_name, s->max_model_len));
	}
	free(a);
	return lp_call_send_json(c, 200, json_pack("{s:s, s:o}", "object", "list", "data", data));
}

/* ---- GET /v1/models/{id} ---- */

int lp_openai_model(struct lp_call *c)
{
	struct lp_server *s = c->s;
	/* the whole rest of the path: adapter names may hold '/' */
	const char *id = c->path + strlen("/v1/models/");
	char source[sizeof(((struct lp_registry_entry *)0)->source)];
	char shown[LP_GEN_MAX_MODEL + 8];

	if (!atomic_load(&s->ready))
		return lp_call_errorf(c, 503, "not_ready", NULL, "the model is not ready yet");
	if (!strcmp(id, s->cfg.served_name))
		return lp_call_send_json(c, 200,
		                         model_card(s->cfg.served_name, s->created,
		                                    s->cfg.model_source, NULL, s->max_model_len));
	if (strlen(id) <= LP_GEN_MAX_MODEL &&
	    lp_registry_get(s->loras, id, source, sizeof(source))) {
		lp_api_utf8_sanitize(source);
		return lp_call_send_json(
		    c, 200,
		    model_card(id, s->created, source, s->cfg.served_name, s->max_model_len));
	}
	snprintf(shown, sizeof(shown), "%.*s%s", LP_GEN_MAX_MODEL, id,
	         strlen(id) > LP_GEN_MAX_MODEL ? "..." : "");
	lp_api_utf8_sanitize(shown);
	return lp_call_errorf(c, 404, "model_not_found", "model", "the model '%s' does not exist",
	                      shown);
}

/* ---- generation ---- */

static int map_engine_error(struct gen *g, const struct lp_err *err, struct lp_api_error *e)
{
	switch (err->code) {
	case -ENOENT:
		return lp_api_errorf(e, 404, "model_not_found", "model",
		                     "the model '%s' does not exist: %s", g->req.model, err->msg);
	case -EAGAIN:
		lp_api_error_from(e, 429, "adapter_tier_full", NULL, err);
		e->retry_after = 1;
		return -429;
	case -ESHUTDOWN:
		lp_api_error_from(e, 503, "shutting_down", NULL, err);
		e->retry_after = 1;
		return -503;
	case -EINVAL:
		return lp_api_error_from(e, 400, "invalid_request",
		                         g->req.chat ? "messages" : "prompt", err);
	default:
		return lp_api_error_from(e, 500, NULL, NULL, err);
	}
}

static void gen_release(struct gen *g)
{
	for (size_t i = 0; i < g->n_ch; i++) {
		struct choice *ch = &g->ch[i];
		lp_request_free(ch->req);
		if (ch->stop_ready)
			lp_stop_matcher_release(&ch->stop);
		lp_buf_release(&ch->text);
		json_decref(ch->lp);
		lp_tool_parser_free(ch->tp);
	}
	free(g->ch);
	lp_gen_request_release(&g->req);
}

static void cancel_all(struct gen *g)
{
	for (size_t i = 0; i < g->n_ch; i++)
		if (g->ch[i].req && !g->ch[i].done)
			lp_request_cancel(g->ch[i].req);
}

/* Submits one engine request per choice. */
static int submit_all(struct gen *g, struct lp_api_error *e)
{
	struct lp_gen_request *r = &g->req;
	struct lp_err err;
	uint64_t group = 0;

	g->n_ch = r->n_prompts * (size_t)r->n;
	g->ch = calloc(g->n_ch, sizeof(*g->ch));
	if (!g->ch)
		return lp_api_errorf(e, 500, NULL, NULL, "out of memory");
	/* the choices are one request in the engine's request counts */
	if (g->n_ch > 1)
		group = lp_worker_new_group(g->s->w);
	for (size_t i = 0; i < g->n_ch; i++) {
		struct choice *ch = &g->ch[i];
		struct lp_request_params p;

		ch->index = i;
		ch->prompt = i / (size_t)r->n;
		lp_buf_init(&ch->text, 64u << 20);
		lp_detok_init(&ch->detok, r->skip_special);
		if (lp_stop_matcher_init(&ch->stop, (const char *const *)r->stops, r->n_stops,
		                         &err))
			return lp_api_error_from(e, 400, "invalid_value", "stop", &err);
		ch->stop_ready = true;
		if (r->chat && r->tools.choice != LP_TOOL_CHOICE_NONE &&
		    lp_tool_parser_new(&ch->tp, &r->tools, &err))
			return lp_api_error_from(e, 500, NULL, NULL, &err);
		memset(&p, 0, sizeof(p));
		p.adapter = g->adapter;
		p.prompt = r->prompts[ch->prompt].ids.ids;
		p.n_prompt = r->prompts[ch->prompt].ids.n;
		p.max_tokens = r->max_tokens;
		p.ignore_eos = r->ignore_eos;
		p.sampling = r->sampling;
		/* the choices of one prompt differ even with a seed */
		if (p.sampling.has_seed)
			p.sampling.seed += i % (size_t)r->n;
		p.logprobs = r->logprobs;
		p.group = group;
		p.grammar = r->grammar;
		if (lp_worker_submit(g->s->w, &p, &ch->req, &err)) {
			if (err.code == -EAGAIN) {
				lp_api_errorf(e, 429, "queue_full", NULL,
				              "the server is overloaded (%s): retry later",
				              err.msg);
				e->retry_after = 1;
				return -429;
			}
			return map_engine_error(g, &err, e);
		}
	}
	return 0;
}

/* Waits for every choice's first event; an error event ends the call. */
static int wait_first(struct gen *g, struct lp_api_error *e)
{
	for (size_t i = 0; i < g->n_ch; i++) {
		struct choice *ch = &g->ch[i];
		for (;;) {
			if (atomic_load(&g->s->aborting)) {
				lp_api_errorf(e, 503, "shutting_down", NULL,
				              "the server is shutting down");
				e->retry_after = 1;
				return -503;
			}
			if (lp_request_next(ch->req, &ch->pending, POLL_MS) == 0)
				break;
		}
		ch->has_pending = true;
		if (ch->pending.kind == LP_EVENT_ERROR)
			return map_engine_error(g, &ch->pending.err, e);
	}
	return 0;
}

/* ---- chunks ---- */

static json_t *logprobs_entry_chat(const struct lp_model *m, const struct lp_event *ev)
{
	char text[TOKEN_TEXT_MAX], t2[TOKEN_TEXT_MAX];
	unsigned char bytes[LP_TOKEN_BYTES_MAX], b2[LP_TOKEN_BYTES_MAX];
	size_t nb;
	json_t *top = json_array(), *jb = json_array();

	token_text(m, ev->token, text, bytes, &nb);
	for (size_t i = 0; i < nb; i++)
		json_array_append_new(jb, json_integer(bytes[i]));
	for (int k = 0; k < ev->n_top; k++) {
		size_t n2;
		json_t *jb2 = json_array();
		token_text(m, ev->top_ids[k], t2, b2, &n2);
		for (size_t i = 0; i < n2; i++)
			json_array_append_new(jb2, json_integer(b2[i]));
		json_array_append_new(top, json_pack("{s:s, s:o, s:o}", "token", t2, "logprob",
		                                     jreal(ev->top_logprobs[k]), "bytes", jb2));
	}
	return json_pack("{s:s, s:o, s:o, s:o}", "token", text, "logprob", jreal(ev->logprob),
	                 "bytes", jb, "top_logprobs", top);
}

/* Completions logprobs of one token, appended to the four arrays of lp. */
static void logprobs_add_completion(const struct lp_model *m, json_t *lp, const struct lp_event *ev,
                                    size_t offset)
{
	char text[TOKEN_TEXT_MAX], t2[TOKEN_TEXT_MAX];
	unsigned char bytes[LP_TOKEN_BYTES_MAX], b2[LP_TOKEN_BYTES_MAX];
	size_t nb;
	json_t *top = json_object();

	token_text(m, ev->token, text, bytes, &nb);
	for (int k = 0; k < ev->n_top; k++) {
		size_t n2;
		token_text(m, ev->top_ids[k], t2, b2, &n2);
		if (!json_object_get(top, t2))
			json_object_set_new(top, t2, jreal(ev->top_logprobs[k]));
	}
	json_array_append_new(json_object_get(lp, "tokens"), json_string(text));
	json_array_append_new(json_object_get(lp, "token_logprobs"), jreal(ev->logprob));
	json_array_append_new(json_object_get(lp, "top_logprobs"), top);
	json_array_append_new(json_object_get(lp, "text_offset"), json_integer((json_int_t)offset));
}

static json_t *new_completion_logprobs(void)
{
	return json_pack("{s:[], s:[], s:[], s:[]}", "tokens", "token_logprobs", "top_logprobs",
	                 "text_offset");
}

static int send_chunk(struct gen *g, json_t *chunk)
{
	char *text;
	struct lp_buf b;
	int rc = 0;

	if (g->gone) {
		json_decref(chunk);
		return -EPIPE;
	}
	if (g->req.include_usage && !json_object_get(chunk, "usage"))
		json_object_set_new(chunk, "usage", json_null());
	text = json_dumps(chunk, JSON_COMPACT);
	json_decref(chunk);
	if (!text)
		return 0;
	lp_buf_init(&b, strlen(text) + 16);
	if (!lp_buf_appendf(&b, NULL, "data: %s\n\n", text))
		rc = lp_call_stream_write(g->c, b.data, b.len);
	lp_buf_release(&b);
	free(text);
	if (rc) {
		g->gone = true;
		lp_metrics_disconnect(g->s->metrics);
		lp_log(LP_LOG_INFO, g->c->id, "client went away: cancelling %zu sequence(s)",
		       g->n_ch);
		cancel_all(g);
	}
	return rc;
}

/* One streamed chunk for ch: text (may be empty), logprobs (may be NULL,
 * taken), finish reason (NULL while running). */
static int stream_choice(struct gen *g, struct choice *ch, const char *text, size_t len, json_t *lp,
                         const char *finish)
{
	json_t *choice;
	json_t *t = json_stringn(text, len);

	if (!t)
		t = json_string("");
	if (g->req.chat) {
		json_t *delta = json_object();
		if (!ch->role_sent) {
			json_object_set_new(delta, "role", json_string("assistant"));
			ch->role_sent = true;
		}
		if (len || !finish)
			json_object_set_new(delta, "content", t);
		else
			json_decref(t);
		choice = json_pack("{s:I, s:o, s:o, s:o}", "index", (json_int_t)ch->index, "delta",
		                   delta, "logprobs",
		                   lp ? json_pack("{s:o}", "content", lp) : json_null(),
		                   "finish_reason", finish ? json_string(finish) : json_null());
	} else {
		choice = json_pack("{s:I, s:o, s:o, s:o}", "index", (json_int_t)ch->index, "text",
		                   t, "logprobs", lp ? lp : json_null(), "finish_reason",
		                   finish ? json_string(finish) : json_null());
	}
	return send_chunk(g, json_pack("{s:s, s:s, s:I, s:s, s:[o]}", "id", g->id, "object",
	                               g->req.chat ? "chat.completion.chunk" : "text_completion",
	                               "created", (json_int_t)g->created, "model", g->req.model,
	                               "choices", choice));
}

/* A streamed chunk whose delta holds one tool call event (entry, taken). */
static int stream_tool_call(struct gen *g, struct choice *ch, json_t *entry)
{
	json_t *delta = json_object();

	if (!ch->role_sent) {
		json_object_set_new(delta, "role", json_string("assistant"));
		ch->role_sent = true;
	}
	json_object_set_new(delta, "tool_calls", json_pack("[o]", entry));
	return send_chunk(g, json_pack("{s:s, s:s, s:I, s:s, s:[{s:I, s:o, s:n, s:n}]}", "id",
	                               g->id, "object", "chat.completion.chunk", "created",
	                               (json_int_t)g->created, "model", g->req.model, "choices",
	                               "index", (json_int_t)ch->index, "delta", delta, "logprobs",
	                               "finish_reason"));
}

/* Text that ch may show now, to the stream or to its buffer. */
static int emit_text(struct gen *g, struct choice *ch, const char *s, size_t n, json_t *lp)
{
	if (!g->stream) {
		json_decref(lp);
		return n ? lp_buf_append(&ch->text, s, n, NULL) : 0;
	}
	if (!n && !lp)
		return 0;
	return stream_choice(g, ch, s, n, lp, NULL);
}

/* The events of ch's tool parser: content goes out as text, calls as
 * tool_calls deltas when streaming (a whole response takes the parser's
 * calls at the end). lp (taken) rides on the first chunk. */
static int emit_events(struct gen *g, struct choice *ch, const struct lp_tool_event *ev,
                       size_t n_ev, json_t *lp)
{
	for (size_t i = 0; i < n_ev; i++) {
		if (ev[i].type == LP_TOOL_EVENT_CONTENT) {
			if (emit_text(g, ch, ev[i].text, ev[i].len, lp))
				return -EPIPE;
			lp = NULL;
		} else if (g->stream) {
			json_t *entry = lp_tool_event_json(&ev[i]);
			if (entry && stream_tool_call(g, ch, entry)) {
				json_decref(lp);
				return -EPIPE;
			}
		}
	}
	return lp ? emit_text(g, ch, "", 0, lp) : 0;
}

/* Text that ch may show now: through its tool parser when it has one. */
static int emit(struct gen *g, struct choice *ch, const char *s, size_t n, json_t *lp)
{
	const struct lp_tool_event *ev;
	struct lp_err err;
	size_t n_ev;

	if (!ch->tp)
		return emit_text(g, ch, s, n, lp);
	if (lp_tool_parser_feed(ch->tp, s, n, &ev, &n_ev, &err)) {
		/* the parser's cap: what is left goes out as it is */
		lp_tool_parser_free(ch->tp);
		ch->tp = NULL;
		return emit_text(g, ch, s, n, lp);
	}
	return emit_events(g, ch, ev, n_ev, lp);
}

/* At the end of ch's output: the tool parser's last events. */
static int emit_finish(struct gen *g, struct choice *ch)
{
	const struct lp_tool_event *ev;
	struct lp_err err;
	size_t n_ev;

	if (!ch->tp || lp_tool_parser_finish(ch->tp, &ev, &n_ev, &err))
		return 0;
	return emit_events(g, ch, ev, n_ev, NULL);
}

/* The special token that opens Mistral's tool calls ([TOOL_CALLS]), which
 * the decoder leaves out of the text: its text for the tool parser. */
static int tool_marker(const struct gen *g, const struct choice *ch, int32_t id, char *piece,
                       size_t cap)
{
	const struct lp_tokenizer *tok = g->s->model->tok;
	const char *t;
	size_t len;

	if (!ch->tp || g->req.tools.fmt != LP_CHAT_TOOLS_MISTRAL ||
	    !lp_tokenizer_is_special(tok, id))
		return 0;
	t = lp_tokenizer_token_text(tok, id, &len);
	if (!t || len != 12 || memcmp(t, "[TOOL_CALLS]", 12) || cap < len)
		return 0;
	memcpy(piece, t, len);
	return (int)len;
}

/* Handles one event of ch. */
static int choice_event(struct gen *g, struct choice *ch, const struct lp_event *ev)
{
	const struct lp_model *m = g->s->model;
	char piece[1024];
	const char *out;
	size_t out_len;
	json_t *lp = NULL;
	int n;

	if (ev->kind == LP_EVENT_ERROR) {
		/* after the first event: the engine failed (its device) */
		ch->t_done = lp_now();
		ch->done = true;
		ch->failed = true;
		ch->failure = ev->err;
		return 0;
	}
	ch->t_queued = ev->t_queued;
	if (ev->t_scheduled > 0)
		ch->t_scheduled = ev->t_scheduled;
	if (ev->kind == LP_EVENT_END) {
		ch->t_done = lp_now();
		ch->done = true;
		ch->finish = ev->finish;
		ch->cancelled = ev->cancelled;
		ch->cached = ev->cached_tokens;
		n = lp_detok_flush(m->tok, &ch->detok, piece, sizeof(piece));
		if (n > 0 && lp_stop_matcher_feed(&ch->stop, piece, (size_t)n, &out, &out_len)) {
			ch->stopped = true;
		} else {
			if (n > 0 && emit(g, ch, out, out_len, NULL))
				return -EPIPE;
			lp_stop_matcher_finish(&ch->stop, &out, &out_len);
		}
		if (ch->tp) {
			if (emit(g, ch, out, out_len, NULL) || emit_finish(g, ch))
				return -EPIPE;
			return g->stream ? stream_choice(g, ch, "", 0, NULL, finish_name(ch)) : 0;
		}
		if (!g->stream)
			return emit(g, ch, out, out_len, NULL);
		return stream_choice(g, ch, out, out_len, NULL, finish_name(ch));
	}

	/* a token */
	double now = lp_now();
	if (ch->tokens == 0) {
		lp_metrics_ttft(g->s->metrics, now - g->c->t0);
		ch->t_first = now;
	} else {
		lp_metrics_inter_token(g->s->metrics, now - ch->t_last);
	}
	ch->t_last = now;
	ch->tokens++;
	n = lp_detok_piece(m->tok, &ch->detok, ev->token, piece, sizeof(piece));
	if (n <= 0)
		n = tool_marker(g, ch, ev->token, piece, sizeof(piece));
	if (g->req.logprobs >= 0) {
		if (g->req.chat) {
			json_t *entry = logprobs_entry_chat(m, ev);
			if (g->stream)
				lp = json_pack("[o]", entry);
			else
				json_array_append_new(ch->lp, entry);
		} else {
			json_t *target = g->stream ? (lp = new_completion_logprobs()) : ch->lp;
			logprobs_add_completion(m, target, ev, ch->chars);
		}
	}
	ch->chars += utf8_chars(piece, (size_t)n);
	if (lp_stop_matcher_feed(&ch->stop, piece, (size_t)n, &out, &out_len)) {
		ch->t_done = now;
		ch->stopped = true;
		ch->done = true;
		lp_request_cancel(ch->req);
		if (ch->tp) {
			if (emit(g, ch, out, out_len, lp) || emit_finish(g, ch))
				return -EPIPE;
			return g->stream ? stream_choice(g, ch, "", 0, NULL, finish_name(ch)) : 0;
		}
		if (!g->stream) {
			json_decref(lp);
			return emit(g, ch, out, out_len, NULL);
		}
		return stream_choice(g, ch, out, out_len, lp, finish_name(ch));
	}
	return emit(g, ch, out, out_len, lp);
}

/* Reads every channel until every choice is done. -EPIPE when the client
 * went away (everything is cancelled then). */
static int pump(struct gen *g)
{
	size_t undone = g->n_ch;
	struct lp_event ev;
	bool aborted = false;

	for (size_t i = 0; i < g->n_ch; i++) {
		struct choice *ch = &g->ch[i];
		if (ch->has_pending) {
			ch->has_pending = false;
			if (choice_event(g, ch, &ch->pending))
				return -EPIPE;
		}
	}
	while (undone) {
		bool progressed = false;
		struct choice *wait_on = NULL;

		if (!aborted && atomic_load(&g->s->aborting)) {
			aborted = true;
			cancel_all(g);
		}
		undone = 0;
		for (size_t i = 0; i < g->n_ch; i++) {
			struct choice *ch = &g->ch[i];
			while (!ch->done && lp_request_next(ch->req, &ev, 0) == 0) {
				progressed = true;
				if (choice_event(g, ch, &ev))
					return -EPIPE;
			}
			if (!ch->done) {
				undone++;
				if (!wait_on)
					wait_on = ch;
			}
		}
		if (wait_on && !progressed) {
			int rc = lp_request_next(wait_on->req, &ev, POLL_MS);
			if (rc == 0 && choice_event(g, wait_on, &ev))
				return -EPIPE;
			if (rc == -ENODATA)
				wait_on->done = true;
		}
	}
	return 0;
}

/* Prompt tokens found in the prefix cache: per prompt, the most any of its
 * choices found (they share the prompt, which counts once in usage). */
static long cached_tokens(const struct gen *g)
{
	long n = 0;

	for (size_t p = 0; p < g->req.n_prompts; p++) {
		int best = 0;
		for (size_t i = 0; i < g->n_ch; i++)
			if (g->ch[i].prompt == p && g->ch[i].cached > best)
				best = g->ch[i].cached;
		n += best;
	}
	return n;
}

static json_t *usage_json(struct gen *g, long completion)
{
	return json_pack("{s:I, s:I, s:I, s:{s:I}}", "prompt_tokens", (json_int_t)g->prompt_tokens,
	                 "completion_tokens", (json_int_t)completion, "total_tokens",
	                 (json_int_t)(g->prompt_tokens + completion), "prompt_tokens_details",
	                 "cached_tokens", (json_int_t)cached_tokens(g));
}

static long completion_tokens(const struct gen *g)
{
	long n = 0;

	for (size_t i = 0; i < g->n_ch; i++)
		n += g->ch[i].tokens;
	return n;
}

/* The first choice the engine failed under, or NULL. */
static const struct choice *failed_choice(const struct gen *g)
{
	for (size_t i = 0; i < g->n_ch; i++)
		if (g->ch[i].failed)
			return &g->ch[i];
	return NULL;
}

static int respond_stream(struct gen *g)
{
	const struct choice *bad;
	int rc;

	if (lp_call_stream_start(g->c))
		return -EPIPE;
	if (g->req.echo) {
		for (size_t i = 0; i < g->n_ch; i++) {
			const struct lp_gen_prompt *p = &g->req.prompts[g->ch[i].prompt];
			g->ch[i].chars = utf8_chars(p->text, p->text_len);
			if (stream_choice(g, &g->ch[i], p->text, p->text_len, NULL, NULL))
				return -EPIPE;
		}
	}
	if (g->req.chat) {
		/* the role comes first, in a chunk of its own */
		for (size_t i = 0; i < g->n_ch; i++)
			if (stream_choice(g, &g->ch[i], "", 0, NULL, NULL))
				return -EPIPE;
	}
	rc = pump(g);
	if (rc)
		return rc;
	if ((bad = failed_choice(g))) {
		/* the stream has begun: the error goes in it, as vLLM does */
		cancel_all(g);
		if (send_chunk(g,
		               json_pack("{s:{s:s, s:s, s:i}}", "error", "message",
		                         bad->failure.msg, "type", "internal_error", "code", 500)))
			return -EPIPE;
	} else if (g->req.include_usage &&
	           send_chunk(g,
	                      json_pack("{s:s, s:s, s:I, s:s, s:[], s:o}", "id", g->id, "object",
	                                g->req.chat ? "chat.completion.chunk" : "text_completion",
	                                "created", (json_int_t)g->created, "model", g->req.model,
	                                "choices", "usage", usage_json(g, completion_tokens(g)))))
		return -EPIPE;
	if (lp_call_stream_write(g->c, "data: [DONE]\n\n", 14) || lp_call_stream_end(g->c)) {
		g->gone = true;
		return -EPIPE;
	}
	return 0;
}

static int respond_whole(struct gen *g)
{
	json_t *choices = json_array();
	int rc;

	for (size_t i = 0; i < g->n_ch; i++) {
		struct choice *ch = &g->ch[i];
		if (g->req.logprobs >= 0)
			ch->lp = g->req.chat ? json_array() : new_completion_logprobs();
		if (g->req.echo) {
			const struct lp_gen_prompt *p = &g->req.prompts[ch->prompt];
			lp_buf_append(&ch->text, p->text, p->text_len, NULL);
			ch->chars = utf8_chars(p->text, p->text_len);
		}
	}
	rc = pump(g);
	if (rc) {
		json_decref(choices);
		return rc;
	}
	if (failed_choice(g)) {
		struct lp_api_error e;

		json_decref(choices);
		cancel_all(g);
		lp_api_error_from(&e, 500, "internal_error", NULL, &failed_choice(g)->failure);
		lp_call_send_error(g->c, &e);
		return 0;
	}
	for (size_t i = 0; i < g->n_ch; i++) {
		struct choice *ch = &g->ch[i];
		json_t *text = json_stringn(ch->text.data ? ch->text.data : "", ch->text.len);
		json_t *lp = ch->lp ? ch->lp : json_null();

		ch->lp = NULL;
		if (!text)
			text = json_string("");
		if (g->req.chat) {
			json_t *msg = json_pack("{s:s, s:o}", "role", "assistant", "content", text);
			if (ch->tp && lp_tool_parser_n_calls(ch->tp) > 0) {
				json_t *calls = lp_tool_parser_calls_json(ch->tp);
				/* OpenAI: content null when the reply is only calls */
				if (ch->text.len == 0)
					json_object_set_new(msg, "content", json_null());
				if (calls)
					json_object_set_new(msg, "tool_calls", calls);
			}
			json_array_append_new(
			    choices,
			    json_pack("{s:I, s:o, s:o, s:s}", "index", (json_int_t)ch->index,
			              "message", msg, "logprobs",
			              json_is_null(lp) ? lp : json_pack("{s:o}", "content", lp),
			              "finish_reason", finish_name(ch)));
		} else {
			json_array_append_new(choices, json_pack("{s:I, s:o, s:o, s:s}", "index",
			                                         (json_int_t)ch->index, "text",
			                                         text, "logprobs", lp,
			                                         "finish_reason", finish_name(ch)));
		}
	}
	lp_call_send_json(g->c, 200,
	                  json_pack("{s:s, s:s, s:I, s:s, s:o, s:o}", "id", g->id, "object",
	                            g->req.chat ? "chat.completion" : "text_completion", "created",
	                            (json_int_t)g->created, "model", g->req.model, "choices",
	                            choices, "usage", usage_json(g, completion_tokens(g))));
	return 0;
}

/* vLLM's request metrics: one finished sequence per choice. */
static void metrics_choices(struct gen *g)
{
	double now = lp_now();

	for (size_t i = 0; i < g->n_ch; i++) {
		const struct choice *ch = &g->ch[i];
		struct lp_metrics_seq ms = {
		    .finish = ch->failed                       ? LP_METRICS_ERROR
		              : ch->stopped                    ? LP_METRICS_STOP
		              : !ch->done || ch->cancelled     ? LP_METRICS_ABORT
		              : ch->finish == LP_FINISH_STOP   ? LP_METRICS_STOP
		              : ch->finish == LP_FINISH_LENGTH ? LP_METRICS_LENGTH
		                                               : LP_METRICS_ABORT,
		    .arrival = g->c->t0,
		    .queued = ch->t_queued > 0 ? ch->t_queued : g->c->t0,
		    .scheduled = ch->t_scheduled,
		    .first_token = ch->t_first,
		    .last_token = ch->t_last,
		    .end = ch->done && ch->t_done > 0 ? ch->t_done : now,
		};
		lp_metrics_seq_finished(g->s->metrics, &ms);
	}
}

static int generate(struct lp_call *c, bool chat)
{
	struct lp_server *s = c->s;
	struct lp_gen_limits lim = {s->model, s->chat, s->max_model_len, s->grammars};
	struct lp_api_error e;
	struct gen g;
	json_t *body = NULL;
	int status;

	memset(&g, 0, sizeof(g));
	g.c = c;
	g.s = s;
	atomic_fetch_add(&s->in_flight, 1);
	if (atomic_load(&s->draining) || !atomic_load(&s->ready)) {
		lp_api_errorf(&e, 503, "not_ready", NULL,
		              atomic_load(&s->draining) ? "the server is shutting down"
		                                        : "the model is not ready yet");
		e.retry_after = 1;
		goto fail;
	}
	if (lp_call_read_json(c, &body, &e))
		goto fail;
	/* the model first: an unknown one is a 404 whatever else is wrong */
	json_t *jm = json_object_get(body, "model");
	if (json_is_string(jm) && json_string_length(jm) <= LP_GEN_MAX_MODEL) {
		const char *name = json_string_value(jm);
		/* an unknown name may be an adapter --lora-resolver loads now */
		if (strcmp(name, s->cfg.served_name) && !lp_registry_get(s->loras, name, NULL, 0) &&
		    lp_resolver_resolve(s->resolver, s, name, c->id, &e))
			goto fail;
		snprintf(c->model, sizeof(c->model), "%s", name);
	}
	if (lp_gen_request_parse(&g.req, body, chat, &lim, &e))
		goto fail;
	if (strcmp(g.req.model, s->cfg.served_name))
		g.adapter = g.req.model;
	snprintf(g.id, sizeof(g.id), "%s-%s", chat ? "chatcmpl" : "cmpl", c->id);
	g.created = (long long)time(NULL);
	g.stream = g.req.stream;
	for (size_t i = 0; i < g.req.n_prompts; i++)
		g.prompt_tokens += (long)g.req.prompts[i].ids.n;
	if (submit_all(&g, &e) || wait_first(&g, &e))
		goto fail;
	lp_metrics_prompt(s->metrics, g.prompt_tokens);
	if (g.stream)
		respond_stream(&g);
	else
		respond_whole(&g);
	metrics_choices(&g);
	status = g.gone ? 499 : failed_choice(&g) ? 500 : 200;
	lp_metrics_request(s->metrics, g.req.model, status, g.prompt_tokens, completion_tokens(&g));
	gen_release(&g);
	json_decref(body);
	atomic_fetch_sub(&s->in_flight, 1);
	return c->status;
fail:
	lp_metrics_request(s->metrics, c->model, e.status, 0, 0);
	gen_release(&g);
	json_decref(body);
	lp_call_send_error(c, &e);
	atomic_fetch_sub(&s->in_flight, 1);
	return c->status;
}

int lp_openai_completions(struct lp_call *c)
{
	return generate(c, false);
}

int lp_openai_chat(struct lp_call *c)
{
	return generate(c, true);
}
