/* libFuzzer target: the bodies of POST /v1/completions and
 * POST /v1/chat/completions (agent/api/request.c), parsed as the server
 * does (json_loadb, an object required) and checked against the tiny test
 * model's tokenizer (tests/fixtures/tiny-llama). A body with "messages"
 * is a chat request, one without a completions request; one with neither
 * is tried as both. */
#include "tests/fuzz/fuzz.h"

#include <jansson.h>

#include "agent/api/request.h"

static struct lp_model model;
/* the tokenizer's (Llama 2), chatml, qwen3 (Hermes tool calls) */
static struct lp_chat_template templates[3];

int LLVMFuzzerInitialize(int *argc, char ***argv);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	size_t n, cn;
	char *json = fuzz_read_fixture("tiny-llama/tokenizer.json", &n);
	char *cfg = fuzz_read_fixture("tiny-llama/tokenizer_config.json", &cn);
	struct lp_err err;

	(void)argc;
	(void)argv;
	if (lp_tokenizer_from_json(&model.tok, json, n, cfg, cn, &err) ||
	    lp_chat_template_detect(&templates[0], lp_tokenizer_chat_template(model.tok), "<s>",
	                            "</s>", &err) ||
	    lp_chat_template_from_name(&templates[1], "chatml", "<s>", "</s>", &err) ||
	    lp_chat_template_from_name(&templates[2], "qwen3", "<s>", "</s>", &err)) {
		fprintf(stderr, "fuzz: %s\n", err.msg);
		abort();
	}
	model.cfg.vocab_size = lp_tokenizer_vocab_size(model.tok);
	model.name = "tiny-llama";
	free(json);
	free(cfg);
	return 0;
}

static void parse(json_t *body, bool chat, size_t size)
{
	const struct lp_gen_limits lim = {&model, &templates[size % 3], 256, NULL};
	struct lp_gen_request r;
	struct lp_api_error e;
	int rc;

	memset(&r, 0, sizeof(r));
	rc = lp_gen_request_parse(&r, body, chat, &lim, &e);
	if (rc == 0) {
		FUZZ_ASSERT(r.n_prompts >= 1 && r.n_prompts <= LP_GEN_MAX_PROMPTS);
		FUZZ_ASSERT(r.n >= 1 && r.n <= LP_GEN_MAX_N && r.max_tokens >= 1);
		FUZZ_ASSERT(r.n_stops <= LP_GEN_MAX_STOPS);
		for (size_t i = 0; i < r.n_prompts; i++) {
			FUZZ_ASSERT(r.prompts[i].ids.n < (size_t)lim.max_model_len);
			for (size_t k = 0; k < r.prompts[i].ids.n; k++)
				FUZZ_ASSERT(r.prompts[i].ids.ids[k] >= 0 &&
				            r.prompts[i].ids.ids[k] < model.cfg.vocab_size);
		}
	} else {
		FUZZ_ASSERT(rc < 0 && e.status >= 400 && e.status < 600);
	}
	lp_gen_request_release(&r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	json_error_t je;
	json_t *body = json_loadb((const char *)data, size, 0, &je);

	if (!body)
		return 0;
	if (json_is_object(body)) {
		bool has_messages = json_object_get(body, "messages") != NULL;
		bool has_prompt = json_object_get(body, "prompt") != NULL;
		if (has_messages || !has_prompt)
			parse(body, true, size);
		if (!has_messages)
			parse(body, false, size);
	}
	json_decref(body);
	return 0;
}
