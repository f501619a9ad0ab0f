/* libFuzzer target: a tokenizer.json, then an encode/decode round trip of
 * a fixed text and of the input itself; every id must decode to
 * well-formed UTF-8. */
#include "tests/fuzz/fuzz.h"

#include "agent/engine/tokenizer.h"

static const char config[] = "{\"add_bos_token\": true, \"bos_token\": \"<s>\", "
                             "\"eos_token\": \"</s>\", \"chat_template\": \"{{ x }}\"}";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct lp_tokenizer *tok = NULL;
	struct lp_err err;
	const char *json = (const char *)data; /* not NUL-terminated: len is the bound */

	/* odd sizes also read a tokenizer_config.json */
	if (lp_tokenizer_from_json(&tok, json, size, size % 2 ? config : NULL,
	                           size % 2 ? sizeof(config) - 1 : 0, &err) == 0) {
		fuzz_tokenizer_round_trip(tok, json, size < 4096 ? size : 4096);
		lp_tokenizer_free(tok);
	}
	return 0;
}
