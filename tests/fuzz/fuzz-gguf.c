/* libFuzzer target: a GGUF file (header, metadata, tensor infos) and the
 * tokenizer and chat template built from its metadata. The input is
 * written to a private file, as the reader maps a path. */
#include "tests/fuzz/fuzz.h"

#include "agent/engine/chat-template.h"
#include "agent/formats/gguf.h"

static void try_chat_template(const struct lp_tokenizer *tok)
{
	const char *jinja = lp_tokenizer_chat_template(tok);
	struct lp_chat_message msgs[] = {{.role = "system", .content = "s"},
	                                 {.role = "user", .content = "u"},
	                                 {.role = "assistant", .content = "a"},
	                                 {.role = "user", .content = "v"}};
	struct lp_chat_template ct = {0};
	struct lp_err err;
	struct lp_buf out;

	if (!jinja || lp_chat_template_detect(&ct, jinja, "<s>", "</s>", &err))
		return;
	lp_buf_init(&out, 1 << 20);
	(void)lp_chat_template_render(&ct, msgs, 4, NULL, true, &out, &err);
	lp_buf_release(&out);
	lp_chat_template_release(&ct);
}

/* Every view the reader hands out must lie inside the file. */
static void touch_all(const struct lp_gguf *g)
{
	struct lp_gguf_str str;
	uint32_t u;
	float f;
	struct lp_err err;

	for (size_t i = 0; i < lp_gguf_kv_count(g); i++) {
		const struct lp_gguf_kv *kv = lp_gguf_kv_at(g, i);
		fuzz_touch(kv->key.s, kv->key.len);
		if (kv->type == LP_GGUF_STRING)
			fuzz_touch(kv->str.s, kv->str.len);
		if (kv->type == LP_GGUF_ARRAY && kv->arr_strs)
			for (uint64_t k = 0; k < kv->arr_len; k++)
				fuzz_touch(kv->arr_strs[k].s, kv->arr_strs[k].len);
	}
	for (size_t i = 0; i < lp_gguf_tensor_count(g); i++) {
		const struct lp_fmt_tensor *t = lp_gguf_tensor_at(g, i);
		FUZZ_ASSERT(t->n_dims >= 1 && t->n_dims <= 4);
		fuzz_check_tensor(t);
		(void)lp_fmt_type_name(t->type);
	}
	(void)lp_gguf_get_str(g, "general.architecture", &str, &err);
	(void)lp_gguf_get_u32(g, "llama.block_count", &u, &err);
	(void)lp_gguf_get_f32(g, "llama.rope.freq_base", &f, &err);
	(void)lp_gguf_find_tensor(g, "token_embd.weight");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct lp_tokenizer *tok = NULL;
	struct lp_gguf *g = NULL;
	struct lp_err err;
	char path[128];

	fuzz_write_file(fuzz_path(path, sizeof(path), "model.gguf"), data, size);
	if (lp_gguf_open(&g, path, &err))
		return 0;
	touch_all(g);
	if (lp_tokenizer_from_gguf(&tok, g, &err) == 0) {
		fuzz_tokenizer_round_trip(tok, NULL, 0);
		try_chat_template(tok);
		lp_tokenizer_free(tok);
	}
	lp_gguf_free(g);
	return 0;
}
