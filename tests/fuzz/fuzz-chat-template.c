/* libFuzzer target: chat templates. The input is NUL-separated fields: a
 * Jinja template string (or a family name: chatml, llama3, llama2,
 * mistral, ...), then role and content pairs of the messages to render.
 * An assistant message whose content starts with '{' is also a tool call
 * with that content as its arguments, and a tool message answers it; each
 * conversation is rendered without tools, with a tool, and in the generic
 * tool format. */
#include "tests/fuzz/fuzz.h"

#include "agent/engine/chat-template.h"

#define MAX_MESSAGES 64

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct lp_chat_message msgs[MAX_MESSAGES];
	struct lp_chat_tool_call calls[MAX_MESSAGES];
	json_t *tools = json_loads("[{\"type\": \"function\", \"function\": {\"name\": \"f\", "
	                           "\"parameters\": {\"type\": \"object\"}}}]",
	                           0, NULL);
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
	for (size_t i = 0; i < n; i++) {
		msgs[i] = (struct lp_chat_message){.role = field[1 + 2 * i],
		                                   .content = field[2 + 2 * i],
		                                   .tool_call_id = "a1B2c3D4e"};
		calls[i] = (struct lp_chat_tool_call){
		    .id = "a1B2c3D4e", .name = "f", .arguments = field[2 + 2 * i]};
		if (field[2 + 2 * i][0] == '{') {
			msgs[i].tool_calls = &calls[i];
			msgs[i].n_tool_calls = 1;
		}
	}
	lp_buf_init(&out, 1 << 20);
	for (int gen = 0; gen < 6; gen++) {
		lp_buf_reset(&out);
		if ((gen < 4 ? lp_chat_template_render(&ct, msgs, n, gen < 2 ? NULL : tools,
		                                       gen % 2, &out, &err)
		             : lp_chat_template_render_generic_tools(&ct, msgs, n, tools, gen % 2,
		                                                     &out, &err)) == 0)
			fuzz_touch(out.data, out.len);
	}
	lp_buf_release(&out);
	lp_chat_template_release(&ct);
out:
	json_decref(tools);
	free(s);
	return 0;
}
