/* Grammars: the text's syntax and its errors, matching bytes, and token
 * masks checked against brute force (every token's bytes matched after the
 * output so far) on the tiny model's vocabulary and SmolLM2's. */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "agent/engine/grammar-cache.h"
#include "agent/engine/grammar.h"
#include "agent/engine/json-schema.h"
#include "agent/engine/tokenizer.h"
#include "common/buf.h"
#include "tests/test.h"

static struct lp_grammar *parse(const char *text)
{
	struct lp_grammar *g = NULL;
	struct lp_err err = {0};

	if (lp_grammar_parse(&g, text, strlen(text), &err))
		printf("# grammar: %s\n", err.msg);
	return g;
}

static int match(const struct lp_grammar *g, const char *s)
{
	return lp_grammar_match(g, s, strlen(s));
}

/* A refusal whose message holds want. */
static bool refused(const char *text, const char *want)
{
	struct lp_grammar *g = NULL;
	struct lp_err err = {0};
	int rc = lp_grammar_parse(&g, text, strlen(text), &err);

	lp_grammar_unref(g);
	if (rc != -EINVAL || !strstr(err.msg, want)) {
		printf("# '%s': rc %d, '%s' (want '%s')\n", text, rc, err.msg, want);
		return false;
	}
	return true;
}

static void test_errors(void)
{
	CHECK(refused("a ::= \"x\"", "no rule named 'root'"));
	CHECK(refused("root ::= x", "'x' is used but not defined"));
	CHECK(refused("root ::= root \"a\" | \"b\"", "left recursion"));
	CHECK(refused("root ::= a\na ::= b \"x\"\nb ::= \"\" | a", "left recursion"));
	CHECK(refused("root ::= (\"a\"?)*", "left recursion"));
	CHECK(refused("root ::= \"a\"{3,2}", "n < m"));
	CHECK(refused("root ::= \"a\"{1001}", "above 1000"));
	CHECK(refused("root ::= \"\\q\"", "unknown escape"));
	CHECK(refused("root ::= \"\\ud800\"", "not a Unicode scalar value"));
	CHECK(refused("root ::= [z-a]", "backwards"));
	CHECK(refused("root ::= \"a\"\nroot ::= \"b\"", "defined twice"));
	CHECK(refused("root ::= (\"a\"", "')' expected"));
	CHECK(refused("root ::= \"a\"?*", "two quantifiers"));
	CHECK(refused("root ::= \"abc", "unterminated"));
	CHECK(refused("root = \"a\"", "'::=' expected"));
}

static void test_match_basics(void)
{
	struct lp_grammar *g = parse("# a comment\n"
	                             "root ::= greet \" \" name (\"!\" | \"?\")?\n"
	                             "greet ::= \"hi\" | \"hello\"\n"
	                             "name ::= [A-Z] [a-z]{1,3}\n");
	CHECK(g);
	CHECK_EQ_INT(match(g, "hi Bob"), 1);
	CHECK_EQ_INT(match(g, "hello Anna!"), 1);
	CHECK_EQ_INT(match(g, "hello Ann?"), 1);
	CHECK_EQ_INT(match(g, "hell"), 0);
	CHECK_EQ_INT(match(g, ""), 0);
	CHECK_EQ_INT(match(g, "hi B"), 0);
	CHECK_EQ_INT(match(g, "hi Bobby"), -1); /* 5 lower-case letters */
	CHECK_EQ_INT(match(g, "hi bob"), -1);
	CHECK_EQ_INT(match(g, "hi Bob!!"), -1);
	lp_grammar_unref(g);

	g = parse("root ::= \"a\"* \"b\"+ \"c\"{2} \"d\"{1,} \"e\"{0,2}");
	CHECK(g);
	CHECK_EQ_INT(match(g, "bccd"), 1);
	CHECK_EQ_INT(match(g, "aaabbccddee"), 1);
	CHECK_EQ_INT(match(g, "aaabbccddeee"), -1);
	CHECK_EQ_INT(match(g, "ccd"), -1);
	CHECK_EQ_INT(match(g, "bcd"), -1);
	lp_grammar_unref(g);
}

static void test_unicode(void)
{
	struct lp_grammar *g =
	    parse("root ::= \"\\u00e9t\\u00E9 \" [\\u4e00-\\u9fff]+ \" \" . \" \" "
	          "[^a-z\\x00-\\x1f]");
	CHECK(g);
	CHECK_EQ_INT(match(g, "été 中文 😀 Z"), 1);
	CHECK_EQ_INT(match(g, "été 中 x é"), 1);
	CHECK_EQ_INT(match(g, "été 中 x z"), -1);
	CHECK_EQ_INT(match(g, "été abc x Z"), -1);
	/* a character's bytes one by one: its first byte alone is a prefix */
	CHECK_EQ_INT(match(g, "été \xe4"), 0);
	CHECK_EQ_INT(match(g, "été \xe4\xb8"), 0);
	CHECK_EQ_INT(match(g, "été \xe4\x41"), -1);
	/* overlong forms and surrogates are not characters */
	CHECK_EQ_INT(match(g, "été 中 \xc0\xaf Z"), -1);
	CHECK_EQ_INT(match(g, "été 中 \xed\xa0\x80 Z"), -1);
	CHECK_EQ_INT(match(g, "été 中 \xf4\x90\x80\x80 Z"), -1);
	lp_grammar_unref(g);

	/* literal characters written in UTF-8 and classes of every length */
	g = parse("root ::= \"→\" [é-ü𝄞] [\\U0001F600-\\U0001F64F]");
	CHECK(g);
	CHECK_EQ_INT(match(g, "→é😀"), 1);
	CHECK_EQ_INT(match(g, "→𝄞🙏"), 1);
	CHECK_EQ_INT(match(g, "→ÿ😀"), -1);
	lp_grammar_unref(g);
}

/* A long repetition runs in constant stack depth (tail calls). */
static void test_long_repetition(void)
{
	struct lp_grammar *g = parse("root ::= \"[\" item (\",\" item)* \"]\"\nitem ::= [0-9]+");
	size_t n = 199999; /* odd: the last item is a digit */
	char *s = malloc(n + 3);

	CHECK(g && s);
	s[0] = '[';
	for (size_t i = 1; i <= n; i++)
		s[i] = i % 2 ? '7' : ',';
	s[n + 1] = ']';
	s[n + 2] = 0;
	CHECK_EQ_INT(lp_grammar_match(g, s, n + 2), 1);
	free(s);
	lp_grammar_unref(g);
}

static const char *JSON_GRAMMAR =
    "root   ::= object\n"
    "value  ::= object | array | string | number | (\"true\" | \"false\" | \"null\")\n"
    "object ::= \"{\" ws ( string \":\" ws value (\",\" ws string \":\" ws value)* )? \"}\"\n"
    "array  ::= \"[\" ws ( value (\",\" ws value)* )? \"]\"\n"
    "string ::= \"\\\"\" ( [^\"\\\\\\x00-\\x1f] | \"\\\\\" ([\"\\\\/bfnrt] | \"u\" "
    "[0-9a-fA-F]{4}) )* \"\\\"\" ws\n"
    "number ::= (\"-\"? ([0-9] | [1-9] [0-9]{1,15})) (\".\" [0-9]{1,16})? ([eE] [-+]? "
    "[0-9]{1,3})? ws\n"
    "ws     ::= | \" \" | \"\\n\" \" \"{0,20}\n";

static void test_json(void)
{
	struct lp_grammar *g = parse(JSON_GRAMMAR);

	CHECK(g);
	CHECK_EQ_INT(match(g, "{}"), 1);
	CHECK_EQ_INT(match(g, "{\"a\": [1, 2.5e-3, {\"b\": null}], \"c\": \"\\u00e9\\n\"}"), 1);
	CHECK_EQ_INT(match(g, "{\"a\":\"é\"}"), 1);
	CHECK_EQ_INT(match(g, "{\"a\": 01}"), -1);
	CHECK_EQ_INT(match(g, "{\"a\": \"x\ny\"}"), -1);
	CHECK_EQ_INT(match(g, "{\"a\": \"\\x\"}"), -1);
	CHECK_EQ_INT(match(g, "{\"a\": [1, 2"), 0);
	CHECK_EQ_INT(match(g, "{\"a\":  1}"), -1); /* whitespace is bounded */
	CHECK_EQ_INT(match(g, "{\n    \"a\": 1}"), 1);
	lp_grammar_unref(g);
}

/* ---- masks against brute force ---- */

static char *read_fixture(const char *rel, size_t *len)
{
	char path[512];
	struct lp_buf b;

	snprintf(path, sizeof(path), "tests/fixtures/%s", rel);
	lp_buf_init(&b, (size_t)64 << 20);
	if (lp_buf_read_file(&b, path, (size_t)64 << 20, NULL)) {
		lp_buf_release(&b);
		return NULL;
	}
	return lp_buf_detach(&b, len);
}

static struct lp_tokenizer *load_tok(const char *dir)
{
	char rel[256], *json, *cfg;
	size_t len = 0, clen = 0;
	struct lp_tokenizer *tok = NULL;
	struct lp_err err = {0};

	snprintf(rel, sizeof(rel), "%s/tokenizer.json", dir);
	json = read_fixture(rel, &len);
	snprintf(rel, sizeof(rel), "%s/tokenizer_config.json", dir);
	cfg = read_fixture(rel, &clen);
	if (json && lp_tokenizer_from_json(&tok, json, len, cfg, clen, &err))
		printf("# %s: %s\n", dir, err.msg);
	free(json);
	free(cfg);
	return tok;
}

/* The mask after out[0..n) equals, token by token, what matching the
 * output plus the token's bytes says; eos passes exactly at an end. */
static bool mask_is_exact(const struct lp_grammar *g, struct lp_grammar_matcher *m,
                          const struct lp_grammar_vocab *v, const struct lp_tokenizer *tok,
                          int32_t n_vocab, int32_t eos, const char *out, size_t n, uint32_t *mask)
{
	unsigned char *buf = malloc(n + LP_TOKEN_BYTES_MAX);
	struct lp_err err = {0};
	bool ok = true;

	if (!buf || lp_grammar_matcher_fill_mask(m, v, mask, &err)) {
		printf("# fill_mask: %s\n", err.msg);
		free(buf);
		return false;
	}
	memcpy(buf, out, n);
	for (int32_t t = 0; t < n_vocab && ok; t++) {
		bool bit = mask[t >> 5] >> (t & 31) & 1, want;
		int k;
		if (t == eos) {
			want = lp_grammar_match(g, out, n) == 1;
		} else if (t >= lp_tokenizer_vocab_size(tok) || lp_tokenizer_is_special(tok, t)) {
			want = false;
		} else {
			k = lp_detok_token_bytes(tok, t, buf + n, LP_TOKEN_BYTES_MAX);
			want = k > 0 && lp_grammar_match(g, buf, n + (size_t)k) >= 0;
		}
		if (bit != want) {
			size_t tl = 0;
			const char *tt = lp_tokenizer_token_text(tok, t, &tl);
			printf("# after '%.*s': token %d '%.*s' is %s by the mask\n", (int)n, out,
			       t, (int)tl, tt ? tt : "", bit ? "allowed" : "forbidden");
			ok = false;
		}
	}
	free(buf);
	return ok;
}

/* Random walks through g over the tokenizer's vocabulary: at each step the
 * mask is checked against brute force, then a random allowed token is
 * taken (eos only when it is the one left). */
static bool walks_are_exact(const char *grammar, const struct lp_tokenizer *tok, int walks,
                            int steps, uint64_t seed)
{
	int32_t n_vocab = lp_tokenizer_vocab_size(tok) + 3, eos = lp_tokenizer_eos(tok);
	struct lp_grammar_vocab *v = NULL;
	struct lp_grammar *g = parse(grammar);
	struct lp_err err = {0};
	uint32_t *mask = NULL;
	char *out = malloc((size_t)steps * LP_TOKEN_BYTES_MAX + 1);
	bool ok = g && out;

	if (ok && lp_grammar_vocab_new(&v, tok, n_vocab, &eos, 1, &err)) {
		printf("# vocab: %s\n", err.msg);
		ok = false;
	}
	if (ok)
		ok = (mask = calloc(lp_grammar_vocab_mask_words(v), sizeof(uint32_t))) != NULL;
	for (int w = 0; w < walks && ok; w++) {
		struct lp_grammar_matcher *m = NULL;
		size_t n = 0;
		if (lp_grammar_matcher_new(&m, g, &err)) {
			ok = false;
			break;
		}
		for (int s = 0; s < steps && ok; s++) {
			int32_t allowed = 0, pick, t = -1;
			int k;
			ok = mask_is_exact(g, m, v, tok, n_vocab, eos, out, n, mask);
			for (int32_t i = 0; i < n_vocab; i++)
				allowed += (mask[i >> 5] >> (i & 31) & 1) && i != eos;
			if (!ok || allowed == 0)
				break;
			pick = (int32_t)(test_splitmix64(&seed) % (uint64_t)allowed);
			for (int32_t i = 0; i < n_vocab && t < 0; i++)
				if ((mask[i >> 5] >> (i & 31) & 1) && i != eos && pick-- == 0)
					t = i;
			if (lp_grammar_matcher_accept_token(m, v, t, &err)) {
				printf("# accept %d: %s\n", t, err.msg);
				ok = false;
				break;
			}
			k = lp_detok_token_bytes(tok, t, (unsigned char *)out + n,
			                         LP_TOKEN_BYTES_MAX);
			n += (size_t)k;
		}
		if (ok && lp_grammar_matcher_can_end(m) != (lp_grammar_match(g, out, n) == 1))
			ok = false;
		lp_grammar_matcher_free(m);
	}
	free(mask);
	free(out);
	lp_grammar_vocab_free(v);
	lp_grammar_unref(g);
	return ok;
}

static const char *SMALL_GRAMMARS[] = {
    "root ::= \"{\\\"name\\\": \\\"\" [a-zA-Z ]{1,12} \"\\\", \\\"age\\\": \" [1-9] [0-9]? \"}\"",
    "root ::= (\"yes\" | \"no\" | \"maybe so\") \".\"",
    "root ::= [0-9]+ (\" + \" [0-9]+)* \" = \" [0-9]+",
    NULL,
};

/* A grammar the JSON Schema compiler writes (nested object, enum, array
 * with bounds, anyOf, a pattern), as response_format makes them. */
static char *schema_grammar(void)
{
	static const char *SCHEMA =
	    "{\"type\": \"object\", \"properties\": {\"name\": {\"type\": \"string\"}, "
	    "\"role\": {\"enum\": [\"admin\", \"user\"]}, \"tags\": {\"type\": \"array\", "
	    "\"items\": {\"type\": \"string\", \"pattern\": \"^[a-z]{1,8}$\"}, \"maxItems\": 3}, "
	    "\"home\": {\"anyOf\": [{\"type\": \"null\"}, {\"type\": \"object\", "
	    "\"properties\": {\"zip\": {\"type\": \"integer\"}}, \"required\": [\"zip\"]}]}}, "
	    "\"required\": [\"name\", \"role\", \"tags\", \"home\"]}";
	json_t *j = json_loads(SCHEMA, 0, NULL);
	struct lp_err err = {0};
	struct lp_buf b;

	lp_buf_init(&b, 1 << 20);
	if (!j || lp_buf_append(&b, "root ::= s-root\n", 16, &err) ||
	    lp_json_schema_grammar(j, "s-", &b, &err)) {
		printf("# schema: %s\n", err.msg);
		lp_buf_release(&b);
		json_decref(j);
		return NULL;
	}
	json_decref(j);
	return lp_buf_detach(&b, NULL);
}

static void test_masks_tiny(void)
{
	struct lp_tokenizer *tok = load_tok("tiny-llama");

	CHECK(tok);
	for (int i = 0; SMALL_GRAMMARS[i]; i++)
		CHECK_MSG(walks_are_exact(SMALL_GRAMMARS[i], tok, 6, 12, 1000 + (uint64_t)i),
		          "grammar %d", i);
	CHECK(walks_are_exact(JSON_GRAMMAR, tok, 6, 24, 77));
	{
		char *sg = schema_grammar();
		CHECK(sg);
		CHECK(walks_are_exact(sg, tok, 4, 30, 78));
		free(sg);
	}
	lp_tokenizer_free(tok);
}

static void test_masks_smollm2(void)
{
	struct lp_tokenizer *tok = load_tok("tokenizer/smollm2");
	char *sg = schema_grammar();

	CHECK(tok && sg);
	CHECK(walks_are_exact(SMALL_GRAMMARS[0], tok, 2, 6, 5));
	CHECK(walks_are_exact(JSON_GRAMMAR, tok, 2, 10, 9));
	CHECK(walks_are_exact(sg, tok, 2, 16, 21));
	free(sg);
	lp_tokenizer_free(tok);
}

/* Past the cache's byte budget masks are built each time and still
 * right: a 7,000-character literal has a position (and a mask) per
 * character, more than LP_GRAMMAR_CACHE_BYTES holds for SmolLM2's
 * vocabulary. */
static void test_masks_past_the_cache_budget(void)
{
	enum { N = 7000 };
	struct lp_tokenizer *tok = load_tok("tokenizer/smollm2");
	int32_t n_vocab, eos, x, y;
	struct lp_grammar_vocab *v = NULL;
	struct lp_grammar_matcher *m = NULL;
	struct lp_grammar *g = NULL;
	struct lp_err err = {0};
	uint32_t *mask = NULL;
	char *text = malloc(N + 32);
	int bad = -1;

	CHECK(tok && text);
	n_vocab = lp_tokenizer_vocab_size(tok);
	eos = lp_tokenizer_eos(tok);
	x = lp_tokenizer_find(tok, "x");
	y = lp_tokenizer_find(tok, "y");
	CHECK(x >= 0 && y >= 0);
	memcpy(text, "root ::= \"", 10);
	memset(text + 10, 'x', N);
	memcpy(text + 10 + N, "\"", 2);
	CHECK_OK(lp_grammar_parse(&g, text, strlen(text), &err), &err);
	CHECK((size_t)N * ((size_t)n_vocab / 8) > LP_GRAMMAR_CACHE_BYTES);
	CHECK_OK(lp_grammar_vocab_new(&v, tok, n_vocab, &eos, 1, &err), &err);
	CHECK_OK(lp_grammar_matcher_new(&m, g, &err), &err);
	mask = calloc(lp_grammar_vocab_mask_words(v), sizeof(uint32_t));
	CHECK(mask);
	for (int i = 0; i < N && bad < 0; i++) {
		CHECK_OK(lp_grammar_matcher_fill_mask(m, v, mask, &err), &err);
		if (!(mask[x >> 5] >> (x & 31) & 1) || (mask[y >> 5] >> (y & 31) & 1) ||
		    (mask[eos >> 5] >> (eos & 31) & 1))
			bad = i;
		CHECK(lp_grammar_matcher_accept_bytes(m, "x", 1));
	}
	CHECK_MSG(bad < 0, "the mask at character %d is wrong", bad);
	CHECK_OK(lp_grammar_matcher_fill_mask(m, v, mask, &err), &err);
	CHECK(mask[eos >> 5] >> (eos & 31) & 1);
	CHECK(lp_grammar_matcher_must_end(m));
	free(mask);
	free(text);
	lp_grammar_matcher_free(m);
	lp_grammar_vocab_free(v);
	lp_grammar_unref(g);
	lp_tokenizer_free(tok);
}

/* A rejected token leaves the matcher as it was; eos only at an end. */
static void test_matcher_accept(void)
{
	struct lp_grammar *g = parse("root ::= \"ab\" \"c\"?");
	struct lp_grammar_matcher *m = NULL;
	struct lp_err err = {0};

	CHECK(g);
	CHECK_OK(lp_grammar_matcher_new(&m, g, &err), &err);
	CHECK(!lp_grammar_matcher_can_end(m));
	CHECK(!lp_grammar_matcher_accept_bytes(m, "ax", 2));
	CHECK(lp_grammar_matcher_accept_bytes(m, "a", 1));
	CHECK(!lp_grammar_matcher_accept_bytes(m, "bd", 2));
	CHECK(lp_grammar_matcher_accept_bytes(m, "b", 1));
	CHECK(lp_grammar_matcher_can_end(m));
	CHECK(!lp_grammar_matcher_must_end(m));
	CHECK(lp_grammar_matcher_accept_bytes(m, "c", 1));
	CHECK(lp_grammar_matcher_must_end(m));
	CHECK(!lp_grammar_matcher_accept_bytes(m, "c", 1));
	lp_grammar_matcher_free(m);
	lp_grammar_unref(g);
}

/* The cache hands out one grammar per text, keeps the most recently used,
 * and never caches a refusal. */
static void test_cache(void)
{
	static const char *A = "root ::= \"a\"", *B = "root ::= \"b\"", *C = "root ::= \"c\"";
	struct lp_grammar_cache *c = NULL;
	struct lp_grammar *a1 = NULL, *a2 = NULL, *b = NULL, *c1 = NULL, *a3 = NULL, *x = NULL;
	struct lp_err err = {0};

	CHECK_OK(lp_grammar_cache_new(&c, 2, &err), &err);
	CHECK_OK(lp_grammar_cache_get(c, A, strlen(A), &a1, &err), &err);
	CHECK_OK(lp_grammar_cache_get(c, A, strlen(A), &a2, &err), &err);
	CHECK(a1 == a2);
	CHECK_OK(lp_grammar_cache_get(c, B, strlen(B), &b, &err), &err);
	CHECK(b != a1);
	/* A was used last before B: C evicts nothing but the oldest, A */
	CHECK_OK(lp_grammar_cache_get(c, C, strlen(C), &c1, &err), &err);
	CHECK_OK(lp_grammar_cache_get(c, A, strlen(A), &a3, &err), &err);
	CHECK(a3 != a1);                 /* parsed again */
	CHECK_EQ_INT(match(a1, "a"), 1); /* the evicted one lives on for its users */
	CHECK(lp_grammar_cache_get(c, "root ::= x", 10, &x, &err) == -EINVAL && !x);
	CHECK(lp_grammar_cache_get(c, "root ::= x", 10, &x, &err) == -EINVAL && !x);
	lp_grammar_cache_free(c);
	CHECK_EQ_INT(match(b, "b"), 1);
	lp_grammar_unref(a1);
	lp_grammar_unref(a2);
	lp_grammar_unref(b);
	lp_grammar_unref(c1);
	lp_grammar_unref(a3);
}

int main(void)
{
	TEST_MAIN_BEGIN("test-grammar");
	RUN(test_errors);
	RUN(test_match_basics);
	RUN(test_unicode);
	RUN(test_long_repetition);
	RUN(test_json);
	RUN(test_matcher_accept);
	RUN(test_cache);
	RUN(test_masks_tiny);
	RUN(test_masks_smollm2);
	RUN(test_masks_past_the_cache_budget);
	TEST_MAIN_END();
}
