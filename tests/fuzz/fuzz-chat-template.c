/* libFuzzer target: chat templates. The input is NUL-separated fields: a
 * Jinja template string (or a family name: chatml, llama3, llama2,
 * mistral), then role and content pairs of the messages to render. */
#include "tests/fuzz/fuzz.h"

#include "agent/engine/chat-template.h"

#define MAX_MESSAGES 64

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct lp_chat_message msgs[MAX_MESSAGES];
	struct lp_chat_template ct = {0};
	const char *field[1 + 2 * MAX_MESSAGES];
	size_t n_fields = 0, n;
	struct lp_err err;
	struct lp_buf out;
	char *s = fuzz_strndup(data, size), *p = s;

	while (n_fields < sizeof(field) / sizeof(field[0])) {
		field[n_fields++] = p;
		p += strlen(p);
		if (p == s + size)
			break;
		p++;
	}
	if (lp_chat_template_from_name(&ct, field[0], "<s>", "</s>", &err) &&
	    lp_chat_template_detect(&ct, field[0], size % 2 ? NULL : "<s>", "</s>", &err))
		goto out;
	n = (n_fields - 1) / 2;
	for (size_t i = 0; i < n; i++)
		msgs[i] = (struct lp_chat_message){field[1 + 2 * i], field[2 + 2 * i]};
	lp_buf_init(&out, 1 << 20);
	for (int gen = 0; gen < 2; gen++) {
		lp_buf_reset(&out);
		if (lp_chat_template_render(&ct, msgs, n, gen, &out, &err) == 0)
			fuzz_touch(out.data, out.len);
	}
	lp_buf_release(&out);
	lp_chat_template_release(&ct);
out:
	free(s);
	return 0;
}
