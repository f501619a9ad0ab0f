/* Chat template tests: each family is detected from its real Jinja
 * template and renders byte for byte what jinja2 rendered for the same
 * messages (tests/fixtures/chat/goldens.json, written by
 * hack/make-tokenizer-fixtures.py), including the conversations the
 * template rejects; unknown roles and templates are errors. */
#include <errno.h>
#include <jansson.h>

#include "agent/engine/chat-template.h"
#include "common/buf.h"
#include "tests/test.h"

#define MAX_MSGS 16

static json_t *goldens(void)
{
	static json_t *g;
	char path[512];
	json_error_t jerr;

	if (!g) {
		snprintf(path, sizeof(path), "%s/chat/goldens.json", test_fixtures_dir());
		g = json_load_file(path, 0, &jerr);
		if (!g)
			printf("# %s: %s\n", path, jerr.text);
	}
	return g;
}

static const char *family_template(const char *family)
{
	return json_string_value(json_object_get(
	    json_object_get(json_object_get(goldens(), "templates"), family), "template"));
}

static enum lp_chat_style style_of(const char *name)
{
	if (strcmp(name, "chatml") == 0)
		return LP_CHAT_CHATML;
	if (strcmp(name, "llama3") == 0)
		return LP_CHAT_LLAMA3;
	if (strcmp(name, "llama2") == 0)
		return LP_CHAT_LLAMA2;
	if (strcmp(name, "qwen3") == 0)
		return LP_CHAT_QWEN3;
	return LP_CHAT_MISTRAL;
}

static void test_goldens_cover_every_family(void)
{
	const json_t *cases;
	size_t i, errors = 0;
	int seen[5] = {0};

	CHECK(goldens());
	cases = json_object_get(goldens(), "cases");
	CHECK(json_array_size(cases) >= 40);
	for (i = 0; i < json_array_size(cases); i++) {
		const json_t *c = json_array_get(cases, i);

		seen[style_of(json_string_value(json_object_get(c, "style")))]++;
		if (!json_is_null(json_object_get(c, "error")))
			errors++;
	}
	CHECK(seen[0] && seen[1] && seen[2] && seen[3] && seen[4]);
	CHECK(errors >= 4);
}

static void test_detects_each_family(void)
{
	static const char *families[] = {"smollm2", "llama3",  "llama2",
	                                 "mistral", "qwen2.5", "qwen3"};
	static const enum lp_chat_style styles[] = {LP_CHAT_CHATML,  LP_CHAT_LLAMA3, LP_CHAT_LLAMA2,
	                                            LP_CHAT_MISTRAL, LP_CHAT_CHATML, LP_CHAT_QWEN3};
	struct lp_chat_template ct;
	struct lp_err err = {0};
	size_t i;

	CHECK(goldens());
	for (i = 0; i < 6; i++) {
		const char *t = family_template(families[i]);

		CHECK_MSG(t, "no template for %s", families[i]);
		CHECK_OK(lp_chat_template_detect(&ct, t, NULL, NULL, &err), &err);
		CHECK_MSG(ct.style == styles[i], "%s detected as %d", families[i], (int)ct.style);
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

static void test_renders_like_jinja(void)
{
	const json_t *cases;
	struct lp_buf out;
	size_t i;

	CHECK(goldens());
	cases = json_object_get(goldens(), "cases");
	lp_buf_init(&out, 1 << 20);
	for (i = 0; i < json_array_size(cases); i++) {
		const json_t *c = json_array_get(cases, i);
		const char *name = json_string_value(json_object_get(c, "name"));
		const json_t *msgs = json_object_get(c, "messages");
		const json_t *rendered = json_object_get(c, "rendered");
		struct lp_chat_message m[MAX_MSGS];
		struct lp_chat_template ct;
		struct lp_err err = {0};
		size_t k, n = json_array_size(msgs);
		int rc;

		if (n > MAX_MSGS)
			n = MAX_MSGS;
		for (k = 0; k < n; k++) {
			m[k].role =
			    json_string_value(json_object_get(json_array_get(msgs, k), "role"));
			m[k].content =
			    json_string_value(json_object_get(json_array_get(msgs, k), "content"));
		}
		rc = lp_chat_template_detect(
		    &ct, family_template(json_string_value(json_object_get(c, "family"))),
		    json_string_value(json_object_get(c, "bos")),
		    json_string_value(json_object_get(c, "eos")), &err);
		if (rc) {
			lp_buf_release(&out);
			CHECK_MSG(0, "%s: detect: %s", name, err.msg);
		}
		lp_buf_reset(&out);
		lp_buf_append(&out, "prefix:", 7, NULL);
		rc = lp_chat_template_render(
		    &ct, m, n, json_is_true(json_object_get(c, "add_generation_prompt")), &out,
		    &err);
		lp_chat_template_release(&ct);
		if (json_is_null(rendered)) {
			/* the template raises: an error, and out is untouched */
			if (rc != -EINVAL || out.len != 7 || !err.msg[0]) {
				lp_buf_release(&out);
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
			CHECK_MSG(0, "%s: rendering differs (rc %d)", name, rc);
		}
	}
	lp_buf_release(&out);
}

static void test_unknown_role_is_an_error(void)
{
	static const char *names[] = {"chatml", "llama3", "llama2", "mistral", "qwen3"};
	struct lp_chat_message m[2] = {{"user", "hi"}, {"tool", "{}"}};
	struct lp_buf out;
	size_t i;

	lp_buf_init(&out, 1 << 16);
	for (i = 0; i < 5; i++) {
		struct lp_chat_template ct;
		struct lp_err err = {0};

		CHECK_OK(lp_chat_template_from_name(&ct, names[i], NULL, NULL, &err), &err);
		CHECK_EQ_INT(lp_chat_template_render(&ct, m, 2, true, &out, &err), -EINVAL);
		CHECK_MSG(strstr(err.msg, "unknown role 'tool'"), "%s: '%s'", names[i], err.msg);
		CHECK_EQ_INT(out.len, 0);
		m[1].role = NULL;
		CHECK_EQ_INT(lp_chat_template_render(&ct, m, 2, true, &out, &err), -EINVAL);
		m[1].role = "tool";
		lp_chat_template_release(&ct);
	}
	lp_buf_release(&out);
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
	struct lp_chat_message m[2] = {{"user", "hi"}, {"assistant", "yo"}};
	struct lp_err err = {0};
	struct lp_buf out;

	lp_buf_init(&out, 1 << 16);
	CHECK_OK(lp_chat_template_from_name(&ct, "mistral", "<BOS>", "<EOS>", &err), &err);
	CHECK_OK(lp_chat_template_render(&ct, m, 2, true, &out, &err), &err);
	CHECK_EQ_STR(out.data, "<BOS> [INST] hi [/INST] yo<EOS>");
	lp_chat_template_release(&ct);
	lp_buf_reset(&out);
	/* chatml by name has no default system prompt */
	CHECK_OK(lp_chat_template_from_name(&ct, "chatml", NULL, NULL, &err), &err);
	CHECK(ct.default_system == NULL);
	CHECK_OK(lp_chat_template_render(&ct, m, 1, true, &out, &err), &err);
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
	RUN(test_unknown_role_is_an_error);
	RUN(test_undetectable_template_is_an_error);
	RUN(test_markers_follow_the_tokenizer);
	RUN(test_chatml_default_system_escaped);
	json_decref(goldens());
	TEST_MAIN_END();
}
