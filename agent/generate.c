/* loraplane-generate: loads a model and generates text for one prompt, or
 * for every line of a file as one batch, on the engine the agent uses.
 *
 * stdout: the completion (streamed as it is generated) or, with
 * --prompts-file, one JSON object per prompt and line. stderr: load time,
 * prompt and generation speed. Exit status 0, 1 on any error, 2 for bad
 * usage. */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "agent/engine/chat-template.h"
#include "agent/engine/engine.h"
#include "agent/engine/model.h"
#include "agent/engine/sampler.h"
#include "agent/engine/tokenizer.h"
#include "agent/options.h"
#include "common/buf.h"
#include "common/err.h"
#include "kernels/cuda-loader.h"

#define PROG             "loraplane-generate"
#define MAX_STOPS        16
#define MAX_LORAS        256
#define MAX_PROMPTS_FILE (64u << 20)

struct options {
	const char *model;
	const char *prompt;
	const char *prompts_file;
	const char *system;
	const char *chat_template;
	const char *stops[MAX_STOPS];
	int n_stops;
	bool chat;
	bool ignore_eos;
	int max_tokens;
	int threads;
	const char *loras[MAX_LORAS]; /* NAME=PATH */
	int n_loras;
	const char *adapter;
	const char *device;
	struct lp_sampling_params sp;
	struct lp_engine_config ec;
	struct lp_options cli; /* what the strings above may point into */
};

/* One prompt's generation. */
struct job {
	const char *prompt;
	const char *adapter; /* NULL: the base model */
	struct lp_seq *seq;
	struct lp_detok detok;
	struct lp_stop_matcher stop;
	struct lp_buf text;
	bool stopped; /* a stop string matched */
	bool done;
	int n_generated;
};

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Stores one option's value (agent/options.h has checked its type and
 * range); v->text lives until lp_options_release(&o->cli). */
static int set_option(void *ctx, enum lp_opt id, const struct lp_option_value *v,
                      struct lp_err *err)
{
	struct options *o = ctx;

	if (lp_options_set_engine(&o->ec, id, v))
		return 0;
	switch (id) {
	case LP_OPT_MODEL:
		o->model = v->text;
		break;
	case LP_OPT_PROMPT:
		o->prompt = v->text;
		break;
	case LP_OPT_PROMPTS_FILE:
		o->prompts_file = v->text;
		break;
	case LP_OPT_CHAT:
		o->chat = v->b;
		break;
	case LP_OPT_SYSTEM:
		o->system = v->text;
		break;
	case LP_OPT_CHAT_TEMPLATE:
		o->chat_template = v->text;
		break;
	case LP_OPT_IGNORE_EOS:
		o->ignore_eos = v->b;
		break;
	case LP_OPT_MAX_TOKENS:
		o->max_tokens = (int)v->i;
		break;
	case LP_OPT_TEMPERATURE:
		o->sp.temperature = (float)v->d;
		break;
	case LP_OPT_TOP_P:
		o->sp.top_p = (float)v->d;
		break;
	case LP_OPT_TOP_K:
		o->sp.top_k = (int)v->i;
		break;
	case LP_OPT_MIN_P:
		o->sp.min_p = (float)v->d;
		break;
	case LP_OPT_PRESENCE_PENALTY:
		o->sp.presence_penalty = (float)v->d;
		break;
	case LP_OPT_FREQUENCY_PENALTY:
		o->sp.frequency_penalty = (float)v->d;
		break;
	case LP_OPT_REPETITION_PENALTY:
		o->sp.repetition_penalty = (float)v->d;
		break;
	case LP_OPT_SEED:
		o->sp.seed = (uint64_t)v->i;
		o->sp.has_seed = true;
		break;
	case LP_OPT_STOP:
		if (o->n_stops == MAX_STOPS)
			return lp_errf(err, -EINVAL, "at most %d '--stop' strings", MAX_STOPS);
		o->stops[o->n_stops++] = v->text;
		break;
	case LP_OPT_THREADS:
		o->threads = (int)v->i;
		break;
	case LP_OPT_LORA:
		if (o->n_loras == MAX_LORAS || !strchr(v->text, '=') || v->text[0] == '=')
			return lp_errf(err, -EINVAL,
			               "'--lora' needs NAME=PATH (at most %d), got '%s'", MAX_LORAS,
			               v->text);
		o->loras[o->n_loras++] = v->text;
		break;
	case LP_OPT_ADAPTER:
		o->adapter = v->text;
		break;
	case LP_OPT_DEVICE: {
		enum lp_device_kind kind;
		int dev;
		if (lp_device_parse(v->text, &kind, &dev, err))
			return lp_err_prefix(err, "'--device'");
		o->device = v->text;
		break;
	}
	default:
		/* the table lets no other option through for generate */
		return lp_errf(err, -EINVAL, "'--%s' is not an option of " PROG,
		               lp_options_table()[id].name);
	}
	return 0;
}

/* Returns 0 to run, 1 after printing --help, --help-json or --version,
 * -1 after printing a usage error. */
static int parse_args(int argc, char **argv, struct options *o)
{
	enum lp_options_action action;
	struct lp_err err = {0};

	memset(o, 0, sizeof(*o));
	o->max_tokens = 128;
	o->device = "cpu";
	lp_sampling_params_default(&o->sp);
	o->sp.temperature = 0;
	lp_engine_config_default(&o->ec);
	if (lp_options_parse(&o->cli, LP_PROG_GENERATE, argc, argv, set_option, o, &action, &err)) {
		fprintf(stderr, PROG ": %s\n", err.msg);
		return -1;
	}
	if (action != LP_OPTIONS_RUN)
		return lp_options_answer(LP_PROG_GENERATE, action) ? -1 : 1;
	if (!o->model || !*o->model || (!o->prompt == !o->prompts_file)) {
		fprintf(stderr,
		        PROG ": need '--model' and one of '--prompt' or '--prompts-file'\n%s",
		        lp_options_usage(LP_PROG_GENERATE));
		return -1;
	}
	return 0;
}

/* Splits the prompts file into lines (empty lines skipped); the strings
 * point into buf, whose newlines become NULs. */
static int read_prompts(const char *path, struct lp_buf *buf, char ***out, size_t *n,
                        struct lp_err *err)
{
	char **lines = NULL, *p, *nl;
	size_t count = 0, cap = 0;
	int rc;

	rc = lp_buf_read_file(buf, path, MAX_PROMPTS_FILE, err);
	if (rc)
		return rc;
	for (p = buf->data; p < buf->data + buf->len; p = nl + 1) {
		nl = memchr(p, '\n', (size_t)(buf->data + buf->len - p));
		if (!nl)
			nl = buf->data + buf->len;
		*nl = '\0';
		if (nl > p && nl[-1] == '\r')
			nl[-1] = '\0';
		if (!*p)
			continue;
		if (count == cap) {
			cap = cap ? cap * 2 : 16;
			char **q = realloc(lines, cap * sizeof(*q));
			if (!q) {
				free(lines);
				return lp_errf(err, -ENOMEM, "out of memory");
			}
			lines = q;
		}
		lines[count++] = p;
	}
	if (count == 0) {
		free(lines);
		return lp_errf(err, -EINVAL, "'%s' holds no prompt", path);
	}
	*out = lines;
	*n = count;
	return 0;
}

static int encode_prompt(const struct options *o, struct lp_model *m,
                         const struct lp_chat_template *ct, const char *prompt,
                         struct lp_tokens *ids, struct lp_err *err)
{
	struct lp_buf text;
	int rc;

	if (!o->chat)
		return lp_tokenizer_encode(m->tok, prompt, strlen(prompt),
		                           LP_ENCODE_ADD_SPECIAL | LP_ENCODE_PARSE_SPECIAL, ids,
		                           err);
	struct lp_chat_message msgs[2];
	size_t n = 0;
	if (o->system)
		msgs[n++] = (struct lp_chat_message){.role = "system", .content = o->system};
	msgs[n++] = (struct lp_chat_message){.role = "user", .content = prompt};
	lp_buf_init(&text, 16u << 20);
	rc = lp_chat_template_render(ct, msgs, n, NULL, true, &text, err);
	if (!rc)
		rc = lp_tokenizer_encode(m->tok, text.data, text.len, LP_ENCODE_PARSE_SPECIAL, ids,
		                         err);
	lp_buf_release(&text);
	return rc;
}

static const char *finish_name(const struct job *j)
{
	if (j->stopped)
		return "stop";
	switch (j->seq->finish) {
	case LP_FINISH_STOP:
		return "stop";
	case LP_FINISH_LENGTH:
		return "length";
	default:
		return "abort";
	}
}

/* Appends text a job may emit; streams it when stream is set. */
static int job_emit(struct job *j, const char *s, size_t n, bool stream, struct lp_err *err)
{
	if (!n)
		return 0;
	if (stream) {
		fwrite(s, 1, n, stdout);
		fflush(stdout);
	}
	return lp_buf_append(&j->text, s, n, err);
}

/* Handles one sampled token of job j. */
static int job_token(struct lp_engine *e, struct lp_model *m, struct job *j, int32_t tok,
                     bool finished, bool stream, struct lp_err *err)
{
	char piece[512];
	const char *emit;
	size_t emit_len;
	int n, rc;

	j->n_generated++;
	n = lp_detok_piece(m->tok, &j->detok, tok, piece, sizeof(piece));
	if (n < 0)
		return lp_errf(err, n, "cannot decode token %d", tok);
	if (finished) {
		int f = lp_detok_flush(m->tok, &j->detok, piece + n, sizeof(piece) - (size_t)n);
		if (f > 0)
			n += f;
	}
	if (lp_stop_matcher_feed(&j->stop, piece, (size_t)n, &emit, &emit_len)) {
		j->stopped = true;
		rc = job_emit(j, emit, emit_len, stream, err);
		lp_engine_finish(e, j->seq);
		j->done = true;
		return rc;
	}
	rc = job_emit(j, emit, emit_len, stream, err);
	if (rc)
		return rc;
	if (finished) {
		lp_stop_matcher_finish(&j->stop, &emit, &emit_len);
		rc = job_emit(j, emit, emit_len, stream, err);
		j->done = true;
	}
	return rc;
}

static int print_json_result(size_t index, const struct job *j)
{
	json_t *o = json_pack("{s:I, s:s?, s:s, s:s%, s:i, s:i, s:s}", "index", (json_int_t)index,
	                      "adapter", j->adapter, "prompt", j->prompt, "completion",
	                      j->text.data ? j->text.data : "", j->text.len, "prompt_tokens",
	                      j->seq->n_prompt, "completion_tokens", j->n_generated,
	                      "finish_reason", finish_name(j));
	json_t *ids = json_array();
	char *s;

	if (!o || !ids) {
		json_decref(o);
		json_decref(ids);
		return -1;
	}
	for (int i = j->seq->n_prompt; i < j->seq->n_tokens; i++)
		json_array_append_new(ids, json_integer(j->seq->tokens[i]));
	json_object_set_new(o, "completion_ids", ids);
	s = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII);
	json_decref(o);
	if (!s)
		return -1;
	puts(s);
	free(s);
	return 0;
}

int main(int argc, char **argv)
{
	struct options o;
	struct lp_err err = {0};
	struct lp_backend *be = NULL;
	struct lp_model *m = NULL;
	struct lp_engine *e = NULL;
	struct lp_chat_template ct;
	bool have_ct = false;
	struct lp_buf prompts_buf;
	char **prompts = NULL;
	const char *single[1] = {NULL};
	size_t n_prompts = 0;
	struct job *jobs = NULL;
	struct lp_tokens ids = {0};
	double t0, t_loaded, t_first = 0, t_end;
	size_t total_prompt = 0, total_gen = 0;
	char note[LP_ERR_MSG_MAX + 64];
	int status = 1, rc;

	rc = parse_args(argc, argv, &o);
	if (rc) {
		lp_options_release(&o.cli);
		return rc > 0 ? 0 : 2;
	}
	lp_buf_init(&prompts_buf, MAX_PROMPTS_FILE);
	if (o.prompts_file) {
		if (read_prompts(o.prompts_file, &prompts_buf, &prompts, &n_prompts, &err))
			goto fail;
	} else {
		single[0] = o.prompt;
		n_prompts = 1;
	}
	t0 = now_s();
	if ((rc = lp_backend_open(o.device, o.threads, &be, note, sizeof(note), &err))) {
		lp_err_prefix(&err, "'--device %s'", o.device);
		goto fail;
	}
	if (strcmp(o.device, "cpu")) {
		struct lp_backend_info bi;

		be->ops->info(be->ctx, &bi);
		fprintf(stderr, "device: %s, %s%s%s%s\n", bi.name, bi.device, note[0] ? " (" : "",
		        note, note[0] ? ")" : "");
	}
	if ((rc = lp_model_load(&m, o.model, be, &err)))
		goto fail;
	if (o.chat) {
		const char *tmpl = lp_tokenizer_chat_template(m->tok);
		int32_t bos = lp_tokenizer_bos(m->tok), eos = lp_tokenizer_eos(m->tok);
		char bos_s[256] = "", eos_s[256] = "";
		struct lp_detok d;
		if (bos >= 0) {
			lp_detok_init(&d, false);
			int n = lp_detok_piece(m->tok, &d, bos, bos_s, sizeof(bos_s) - 1);
			bos_s[n > 0 ? n : 0] = '\0';
		}
		if (eos >= 0) {
			lp_detok_init(&d, false);
			int n = lp_detok_piece(m->tok, &d, eos, eos_s, sizeof(eos_s) - 1);
			eos_s[n > 0 ? n : 0] = '\0';
		}
		if (o.chat_template)
			rc = lp_chat_template_from_name(&ct, o.chat_template, bos_s, eos_s, &err);
		else if (tmpl)
			rc = lp_chat_template_detect(&ct, tmpl, bos_s, eos_s, &err);
		else
			rc = lp_errf(
			    &err, -EINVAL,
			    "the model has no chat template: name one with '--chat-template'");
		if (rc)
			goto fail;
		have_ct = true;
	}
	if ((rc = lp_engine_new(&e, m, &o.ec, &err)))
		goto fail;
	for (int i = 0; i < o.n_loras; i++) {
		char name[256];
		const char *eq = strchr(o.loras[i], '=');
		size_t len = (size_t)(eq - o.loras[i]);
		struct lp_adapter *a;
		bool already;
		if (len >= sizeof(name)) {
			lp_errf(&err, -EINVAL, "adapter name '%.40s...' is too long", o.loras[i]);
			goto fail;
		}
		memcpy(name, o.loras[i], len);
		name[len] = '\0';
		if ((rc = lp_lora_cache_load(lp_engine_loras(e), name, eq + 1, NULL, NULL, false,
		                             &already, &err))) {
			lp_err_prefix(&err, "adapter '%s'", name);
			goto fail;
		}
		a = lp_lora_cache_find(lp_engine_loras(e), name);
		fprintf(stderr, "loaded adapter '%s' from '%s': %s, rank %d, in %.1f ms\n", name,
		        eq + 1, a->format, a->rank, a->load_ms);
	}
	t_loaded = now_s();
	fprintf(stderr, "loaded '%s' in %.2f s: %d layers, dim %d, vocab %d, %.1f MiB of weights\n",
	        o.model, t_loaded - t0, m->cfg.n_layers, m->cfg.dim, m->cfg.vocab_size,
	        (double)m->weight_bytes / (1 << 20));

	jobs = calloc(n_prompts, sizeof(*jobs));
	if (!jobs) {
		lp_errf(&err, -ENOMEM, "out of memory");
		goto fail;
	}
	for (size_t i = 0; i < n_prompts; i++) {
		struct job *j = &jobs[i];
		struct lp_seq_params sp = {0};

		j->prompt = prompts ? prompts[i] : single[0];
		j->adapter = o.adapter;
		if (prompts) {
			/* NAME<TAB>prompt picks an adapter ('-' = the base model) */
			char *tab = strchr(prompts[i], '\t');
			if (tab) {
				*tab = '\0';
				j->adapter = strcmp(prompts[i], "-") ? prompts[i] : NULL;
				j->prompt = tab + 1;
			}
		}
		lp_buf_init(&j->text, 64u << 20);
		lp_detok_init(&j->detok, true);
		if ((rc = lp_stop_matcher_init(&j->stop, o.stops, (size_t)o.n_stops, &err)))
			goto fail;
		ids.n = 0;
		if ((rc = encode_prompt(&o, m, have_ct ? &ct : NULL, j->prompt, &ids, &err)))
			goto fail;
		sp.prompt = ids.ids;
		sp.n_prompt = ids.n;
		sp.max_tokens = o.max_tokens;
		sp.ignore_eos = o.ignore_eos;
		sp.sampling = o.sp;
		sp.adapter = j->adapter;
		if ((rc = lp_engine_add(e, &sp, &j->seq, &err))) {
			lp_err_prefix(&err, "prompt %zu", i + 1);
			goto fail;
		}
		j->seq->user = j;
		total_prompt += ids.n;
	}

	size_t n_started = 0;
	bool stream = n_prompts == 1 && !o.prompts_file;
	while (lp_engine_has_work(e)) {
		const struct lp_step_output *outs;
		int n_outs;
		if ((rc = lp_engine_step(e, &outs, &n_outs, &err)))
			goto fail;
		for (int i = 0; i < n_outs; i++) {
			struct job *j = outs[i].seq->user;
			if (j->n_generated == 0 && ++n_started == n_prompts)
				t_first = now_s();
			if ((rc =
			         job_token(e, m, j, outs[i].token, outs[i].finished, stream, &err)))
				goto fail;
		}
	}
	t_end = now_s();
	if (stream) {
		/* end the completion's line before the statistics on stderr */
		fputc('\n', stdout);
		fflush(stdout);
	}
	for (size_t i = 0; i < n_prompts; i++) {
		total_gen += (size_t)jobs[i].n_generated;
		if (!stream && print_json_result(i, &jobs[i])) {
			lp_errf(&err, -ENOMEM, "cannot encode the result");
			goto fail;
		}
	}
	if (!t_first)
		t_first = t_end;
	fprintf(stderr, "prompt: %zu tokens in %.3f s, %.1f tokens/s\n", total_prompt,
	        t_first - t_loaded, (double)total_prompt / (t_first - t_loaded));
	if (total_gen > n_prompts)
		fprintf(stderr, "generation: %zu tokens in %.3f s, %.1f tokens/s (%zu sequences)\n",
		        total_gen - n_prompts, t_end - t_first,
		        (double)(total_gen - n_prompts) / (t_end - t_first), n_prompts);
	status = 0;
	goto out;
fail:
	fprintf(stderr, "loraplane-generate: %s\n", err.msg);
out:
	if (jobs) {
		for (size_t i = 0; i < n_prompts; i++) {
			if (jobs[i].seq)
				lp_engine_release(e, jobs[i].seq);
			lp_stop_matcher_release(&jobs[i].stop);
			lp_buf_release(&jobs[i].text);
		}
		free(jobs);
	}
	lp_tokens_release(&ids);
	if (have_ct)
		lp_chat_template_release(&ct);
	lp_engine_free(e);
	lp_model_free(m);
	lp_backend_destroy(be);
	free(prompts);
	lp_buf_release(&prompts_buf);
	lp_options_release(&o.cli);
	return status;
}
