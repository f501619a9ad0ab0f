/* libFuzzer target: grammar text (agent/engine/grammar.h). The input is
 * the grammar, then, after the first NUL byte, bytes to match: a grammar
 * that parses must match them without crashing, and byte-by-byte feeding
 * through a matcher must agree with lp_grammar_match. */
#include "tests/fuzz/fuzz.h"

#include "agent/engine/grammar.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const uint8_t *nul = memchr(data, 0, size);
	size_t glen = nul ? (size_t)(nul - data) : size;
	const uint8_t *s = nul ? nul + 1 : data + size;
	size_t n = (size_t)(data + size - s);
	struct lp_grammar_matcher *m = NULL;
	struct lp_grammar *g = NULL;
	struct lp_err err;
	int whole;

	if (lp_grammar_parse(&g, (const char *)data, glen, &err))
		return 0;
	whole = lp_grammar_match(g, s, n);
	if (!lp_grammar_matcher_new(&m, g, &err)) {
		size_t i = 0;
		while (i < n && lp_grammar_matcher_accept_bytes(m, s + i, 1))
			i++;
		/* a byte the matcher refuses (or a stack limit it hits) is
		 * where matching the whole fails too */
		FUZZ_ASSERT(i == n ? whole >= 0 : whole == -1);
		if (i == n && whole >= 0)
			FUZZ_ASSERT(lp_grammar_matcher_can_end(m) == (whole == 1));
		lp_grammar_matcher_free(m);
	}
	lp_grammar_unref(g);
	return 0;
}
