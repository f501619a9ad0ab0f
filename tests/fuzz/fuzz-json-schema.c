/* libFuzzer target: a JSON schema (response_format json_schema, tool
 * parameters) compiled to grammar text (agent/engine/json-schema.c). What
 * the compiler accepts must parse as a grammar (only the grammar's size
 * limit may refuse it), the refused ones carry a message, and the grammar
 * is matched against a few texts. */
#include "tests/fuzz/fuzz.h"

#include <errno.h>
#include <jansson.h>

#include "agent/engine/grammar.h"
#include "agent/engine/json-schema.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const char *const texts[] = {
	    "{}",     "[]",   "\"a\"", "0",
	    "-1.5e3", "null", "true",  "{\"a\": [1, {\"b\": \"\\u00e9\"}]}",
	    "{\"a\""};
	json_t *schema = json_loadb((const char *)data, size, JSON_DECODE_ANY, NULL);
	struct lp_grammar *g = NULL;
	struct lp_buf text;
	struct lp_err err = {0};
	int rc;

	if (!schema)
		return 0;
	lp_buf_init(&text, (size_t)1 << 20);
	FUZZ_ASSERT(!lp_buf_append(&text, "root ::= s-root\n", 16, &err));
	rc = lp_json_schema_grammar(schema, "s-", &text, &err);
	if (rc) {
		FUZZ_ASSERT(rc == -EINVAL || rc == -E2BIG || rc == -ENOMEM);
		FUZZ_ASSERT(err.msg[0] != '\0');
		FUZZ_ASSERT(text.len == 16); /* unchanged on failure */
		goto out;
	}
	rc = lp_grammar_parse(&g, text.data, text.len, &err);
	if (rc) {
		/* only the grammar's size limit may refuse what the compiler wrote */
		bool size_limit = rc == -ENOMEM || strstr(err.msg, "elements");
		if (!size_limit)
			fprintf(stderr, "fuzz: grammar refused: %s\n%s\n", err.msg, text.data);
		FUZZ_ASSERT(size_limit);
		goto out;
	}
	for (size_t i = 0; i < sizeof(texts) / sizeof(*texts); i++) {
		int m = lp_grammar_match(g, texts[i], strlen(texts[i]));
		FUZZ_ASSERT(m >= -1 && m <= 1);
	}
	/* the input itself, when it is a JSON text */
	(void)lp_grammar_match(g, data, size);
out:
	lp_grammar_unref(g);
	lp_buf_release(&text);
	json_decref(schema);
	return 0;
}
