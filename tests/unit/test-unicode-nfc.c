/* NFC against Python's unicodedata.normalize("NFC", ...): every
 * decomposable character and its decomposed form, random mixes of starters
 * and combining marks, Hangul jamo runs (tests/fixtures/tokenizer/nfc.json,
 * hack/make-unicode-nfc.py); and the tokenizer's "NFC" normalizer runs it. */
#include <errno.h>
#include <jansson.h>

#include "agent/engine/tokenizer.h"
#include "agent/engine/unicode-nfc.h"
#include "tests/test.h"

static void test_matches_python(void)
{
	char path[512];
	json_error_t jerr;
	json_t *root;
	const char *in, *want;
	size_t in_len, want_len, got_len, lines = 0, line_start = 0;
	struct lp_err err = {0};
	char *got = NULL;

	snprintf(path, sizeof(path), "%s/tokenizer/nfc.json", test_fixtures_dir());
	root = json_load_file(path, 0, &jerr);
	CHECK_MSG(root, "%s: %s", path, jerr.text);
	in = json_string_value(json_object_get(root, "input"));
	want = json_string_value(json_object_get(root, "nfc"));
	in_len = json_string_length(json_object_get(root, "input"));
	want_len = json_string_length(json_object_get(root, "nfc"));
	if (!in || !want || lp_utf8_nfc(in, in_len, &got, &got_len, &err)) {
		json_decref(root);
		CHECK_MSG(0, "no cases or normalization failed: %s", err.msg);
	}
	if (got_len != want_len || memcmp(got, want, want_len)) {
		/* the first line that differs */
		size_t i = 0;
		while (i < got_len && i < want_len && got[i] == want[i]) {
			if (got[i] == '\n') {
				lines++;
				line_start = i + 1;
			}
			i++;
		}
		printf("# line %zu: got '%.40s', expected '%.40s'\n", lines, got + line_start,
		       want + line_start);
		free(got);
		json_decref(root);
		CHECK_MSG(0, "NFC differs from Python's at line %zu", lines);
	}
	printf("  %lld lines, %zu bytes in, %zu out, Unicode %s\n",
	       (long long)json_integer_value(json_object_get(root, "lines")), in_len, got_len,
	       json_string_value(json_object_get(root, "unicode")));
	free(got);
	json_decref(root);
}

static void test_quick_check(void)
{
	CHECK(lp_utf8_nfc_quick("plain text, caf\xc3\xa9 \xc3\xbf", 19));
	CHECK(!lp_utf8_nfc_quick("e\xcc\x81", 3));        /* U+0301 */
	CHECK(!lp_utf8_nfc_quick("\xea\xb0\x80", 3));     /* U+AC00 */
	CHECK(!lp_utf8_nfc_quick("\xf0\x9f\x9a\x80", 4)); /* U+1F680 */
}

/* A tokenizer.json with the NFC normalizer: decomposed and composed text
 * give the same ids. */
static void test_tokenizer_normalizer(void)
{
	static const char json[] = "{\"normalizer\": {\"type\": \"NFC\"}, \"pre_tokenizer\": null,"
	                           " \"model\": {\"type\": \"BPE\", \"vocab\": {\"e\": 0, "
	                           "\"\xc3\xa9\": 1, \"\xcc\x81\": 2},"
	                           " \"merges\": []}}";
	struct lp_tokenizer *tok;
	struct lp_tokens a = {0}, b = {0};
	struct lp_err err = {0};
	bool same;

	CHECK_OK(lp_tokenizer_from_json(&tok, json, sizeof(json) - 1, NULL, 0, &err), &err);
	CHECK_OK(lp_tokenizer_encode(tok, "e\xcc\x81", 3, 0, &a, &err), &err);
	CHECK_OK(lp_tokenizer_encode(tok, "\xc3\xa9", 2, 0, &b, &err), &err);
	same = a.n == 1 && b.n == 1 && a.ids[0] == 1 && b.ids[0] == 1;
	lp_tokens_release(&a);
	lp_tokens_release(&b);
	lp_tokenizer_free(tok);
	CHECK_MSG(same, "decomposed and composed text tokenize differently");
}

int main(void)
{
	TEST_MAIN_BEGIN("test-unicode-nfc");
	RUN(test_matches_python);
	RUN(test_quick_check);
	RUN(test_tokenizer_normalizer);
	TEST_MAIN_END();
}
