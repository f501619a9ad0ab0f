/* Tokenizer tests: ids and decoded text equal to HF `tokenizers` on the
 * committed corpus (hack/make-tokenizer-fixtures.py wrote the goldens) for
 * SmolLM2's byte-level BPE and a SentencePiece-style BPE, loaded from
 * tokenizer.json and from GGUF metadata; pipeline variants (Metaspace,
 * Split behaviours, added-token options, ignore_merges, Llama 3's regex);
 * the streaming decoder; bad files; and encoding speed. */
#include <errno.h>
#include <jansson.h>
#include <stdint.h>

#include "agent/formats/gguf.h"
#include "agent/engine/tokenizer.h"
#include "agent/engine/unicode-utf8.h"
#include "common/buf.h"
#include "tests/test.h"

#define FIXTURE_MAX (64u << 20)

static char *read_fixture(const char *rel, size_t *len)
{
	char path[512];
	struct lp_buf b;
	struct lp_err err = {0};
	char *data;

	snprintf(path, sizeof(path), "%s/%s", test_fixtures_dir(), rel);
	lp_buf_init(&b, FIXTURE_MAX);
	if (lp_buf_read_file(&b, path, FIXTURE_MAX, &err)) {
		printf("# cannot read %s: %s\n", path, err.msg);
		lp_buf_release(&b);
		return NULL;
	}
	data = lp_buf_detach(&b, len);
	return data;
}

static json_t *read_json(const char *rel)
{
	size_t len;
	char *text = read_fixture(rel, &len);
	json_error_t jerr;
	json_t *j;

	if (!text)
		return NULL;
	j = json_loadb(text, len, 0, &jerr);
	if (!j)
		printf("# %s: %s\n", rel, jerr.text);
	free(text);
	return j;
}

/* tokenizer.json (+ tokenizer_config.json) of fixture directory name */
static struct lp_tokenizer *load_json_tok(const char *name, struct lp_err *err)
{
	char rel[256];
	size_t len, clen;
	char *json, *cfg;
	struct lp_tokenizer *tok = NULL;

	snprintf(rel, sizeof(rel), "tokenizer/%s/tokenizer.json", name);
	json = read_fixture(rel, &len);
	snprintf(rel, sizeof(rel), "tokenizer/%s/tokenizer_config.json", name);
	cfg = read_fixture(rel, &clen);
	if (json && cfg)
		lp_tokenizer_from_json(&tok, json, len, cfg, clen, err);
	else
		lp_errf(err, -ENOENT, "fixture '%s' missing", name);
	free(json);
	free(cfg);
	return tok;
}

static const char *model_path(void)
{
	const char *m = getenv("MODEL");

	return m && *m ? m : "models/smollm2-135m-instruct-q4_1.gguf";
}

static struct lp_tokenizer *load_gguf_tok(const char *path, struct lp_err *err)
{
	struct lp_gguf *g = NULL;
	struct lp_tokenizer *tok = NULL;

	if (lp_gguf_open(&g, path, err))
		return NULL;
	lp_tokenizer_from_gguf(&tok, g, err);
	lp_gguf_free(g);
	return tok;
}

/* ---- comparing ---- */

static bool ids_equal(const struct lp_tokens *t, const json_t *arr, size_t *at)
{
	size_t i, n = json_array_size(arr);

	for (i = 0; i < n && i < t->n; i++)
		if (t->ids[i] != (int32_t)json_integer_value(json_array_get(arr, i)))
			break;
	*at = i;
	return i == n && n == t->n;
}

static void ids_from_json(const json_t *arr, struct lp_tokens *t)
{
	size_t i;

	t->n = 0;
	for (i = 0; i < json_array_size(arr); i++)
		lp_tokens_push(t, (int32_t)json_integer_value(json_array_get(arr, i)), NULL);
}

/* Decodes ids one at a time into out; false if a piece was not whole UTF-8
 * or the decoder failed. */
static bool stream_decode(const struct lp_tokenizer *tok, const int32_t *ids, size_t n,
                          bool skip_special, struct lp_buf *out)
{
	struct lp_detok d;
	char piece[256];
	size_t i;
	int len;

	lp_buf_reset(out);
	lp_detok_init(&d, skip_special);
	for (i = 0; i < n; i++) {
		len = lp_detok_piece(tok, &d, ids[i], piece, sizeof(piece));
		if (len < 0 || !lp_utf8_valid(piece, (size_t)len))
			return false;
		if (lp_buf_append(out, piece, (size_t)len, NULL))
			return false;
	}
	len = lp_detok_flush(tok, &d, piece, sizeof(piece));
	if (len < 0 || lp_buf_append(out, piece, (size_t)len, NULL))
		return false;
	return lp_buf_append(out, "", 0, NULL) == 0; /* data non-NULL for "" */
}

static bool str_equal(const struct lp_buf *b, const json_t *s)
{
	return b->len == json_string_length(s) &&
	       memcmp(b->data, json_string_value(s), b->len) == 0;
}

/* Prints a short, escaped form of s for failure messages. */
static const char *show(const char *s)
{
	static char buf[96];
	size_t i, n = 0;

	for (i = 0; s[i] && n + 5 < sizeof(buf); i++) {
		unsigned char c = (unsigned char)s[i];

		if (c < 0x20 || c == 0x7f)
			n += (size_t)snprintf(buf + n, sizeof(buf) - n, "\\x%02x", c);
		else
			buf[n++] = (char)c;
	}
	buf[n] = '\0';
	return buf;
}

struct golden_stats {
	size_t strings, ids, round_trips;
};

/* Checks every corpus case of goldens against tok; returns a message on
 * the first mismatch (static buffer) or NULL. */
static const char *check_goldens(const struct lp_tokenizer *tok, const json_t *goldens,
                                 bool check_split_special, struct golden_stats *st)
{
	static char msg[1024];
	const json_t *cases = json_object_get(goldens, "cases");
	struct lp_tokens t = {0};
	struct lp_buf dec;
	struct lp_err err = {0};
	const char *fail = NULL;
	size_t i, at;

	lp_buf_init(&dec, 1 << 24);
	memset(st, 0, sizeof(*st));
	for (i = 0; i < json_array_size(cases) && !fail; i++) {
		const json_t *c = json_array_get(cases, i);
		const json_t *text = json_object_get(c, "text");
		const char *s = json_string_value(text);
		size_t len = json_string_length(text);
		static const struct {
			const char *key;
			unsigned flags;
		} modes[] = {
		    {"ids", LP_ENCODE_PARSE_SPECIAL},
		    {"ids_special", LP_ENCODE_PARSE_SPECIAL | LP_ENCODE_ADD_SPECIAL},
		    {"ids_split_special", 0},
		};
		size_t m;

		/* (variants leave out what equals ids / text / decoded) */
		const json_t *decoded = json_object_get(c, "decoded");
		const json_t *decoded_skip = json_object_get(c, "decoded_skip");

		if (!decoded)
			decoded = text;
		if (!decoded_skip)
			decoded_skip = decoded;
		for (m = 0; m < 3 && !fail; m++) {
			const json_t *want = json_object_get(c, modes[m].key);

			if (m == 2 && !check_split_special)
				continue;
			if (!want)
				want = json_object_get(c, "ids");
			t.n = 0;
			if (lp_tokenizer_encode(tok, s, len, modes[m].flags, &t, &err)) {
				snprintf(msg, sizeof(msg), "case %zu ('%s'): encode failed: %s", i,
				         show(s), err.msg);
				fail = msg;
			} else if (!ids_equal(&t, want, &at)) {
				snprintf(
				    msg, sizeof(msg),
				    "case %zu ('%s'): %s differ at index %zu (got %d of %zu ids, "
				    "expected %lld of %zu)",
				    i, show(s), modes[m].key, at, at < t.n ? t.ids[at] : -1, t.n,
				    (long long)json_integer_value(json_array_get(want, at)),
				    json_array_size(want));
				fail = msg;
			}
		}
		if (fail)
			break;
		ids_from_json(json_object_get(c, "ids"), &t);
		st->strings++;
		st->ids += t.n;
		if (!stream_decode(tok, t.ids, t.n, false, &dec) || !str_equal(&dec, decoded)) {
			snprintf(msg, sizeof(msg), "case %zu ('%s'): decoded differs", i, show(s));
			fail = msg;
			break;
		}
		if (dec.len == len && memcmp(dec.data, s, len) == 0)
			st->round_trips++;
		if (!stream_decode(tok, t.ids, t.n, true, &dec) || !str_equal(&dec, decoded_skip)) {
			snprintf(msg, sizeof(msg), "case %zu ('%s'): decoded_skip differs", i,
			         show(s));
			fail = msg;
		}
	}
	lp_tokens_release(&t);
	lp_buf_release(&dec);
	return fail;
}

static const char *check_decode_cases(const struct lp_tokenizer *tok, const json_t *goldens)
{
	static char msg[256];
	const json_t *cases = json_object_get(goldens, "decode_cases");
	struct lp_tokens t = {0};
	struct lp_buf dec;
	const char *fail = NULL;
	size_t i;

	lp_buf_init(&dec, 1 << 20);
	if (json_array_size(cases) == 0)
		fail = "no decode cases";
	for (i = 0; i < json_array_size(cases) && !fail; i++) {
		const json_t *c = json_array_get(cases, i);

		ids_from_json(json_object_get(c, "ids"), &t);
		if (!stream_decode(tok, t.ids, t.n, false, &dec) ||
		    !str_equal(&dec, json_object_get(c, "decoded"))) {
			snprintf(msg, sizeof(msg), "decode case %zu: got '%s', expected '%s'", i,
			         dec.data ? dec.data : "",
			         json_string_value(json_object_get(c, "decoded")));
			fail = msg;
		} else if (!stream_decode(tok, t.ids, t.n, true, &dec) ||
		           !str_equal(&dec, json_object_get(c, "decoded_skip"))) {
			snprintf(msg, sizeof(msg), "decode case %zu: skip-special text differs", i);
			fail = msg;
		}
	}
	lp_tokens_release(&t);
	lp_buf_release(&dec);
	return fail;
}

/* ---- shared fixtures, loaded once ---- */

static struct lp_tokenizer *smol_json, *sp_json;
static json_t *smol_goldens, *sp_goldens;

static struct lp_tokenizer *smol(void)
{
	struct lp_err err = {0};

	if (!smol_json && !(smol_json = load_json_tok("smollm2", &err)))
		printf("# smollm2 tokenizer.json: %s\n", err.msg);
	return smol_json;
}

static struct lp_tokenizer *sp(void)
{
	struct lp_err err = {0};

	if (!sp_json && !(sp_json = load_json_tok("spbpe", &err)))
		printf("# spbpe tokenizer.json: %s\n", err.msg);
	return sp_json;
}

static json_t *goldens(const char *name)
{
	json_t **slot = strcmp(name, "smollm2") == 0 ? &smol_goldens : &sp_goldens;
	char rel[128];

	snprintf(rel, sizeof(rel), "tokenizer/%s/goldens.json", name);
	if (!*slot)
		*slot = read_json(rel);
	return *slot;
}

/* ---- tests ---- */

static void test_corpus_is_large(void)
{
	json_t *corpus = read_json("tokenizer/corpus.json");
	json_t *g = goldens("smollm2");

	CHECK(corpus && g);
	CHECK(json_array_size(corpus) >= 300);
	CHECK_EQ_INT(json_array_size(json_object_get(g, "cases")), json_array_size(corpus));
	json_decref(corpus);
}

static void test_smollm2_json_matches_hf(void)
{
	struct golden_stats st;
	const char *fail;

	CHECK(smol() && goldens("smollm2"));
	fail = check_goldens(smol(), goldens("smollm2"), true, &st);
	CHECK_MSG(!fail, "%s", fail);
	/* byte-level BPE is lossless */
	CHECK_EQ_INT(st.round_trips, st.strings);
	printf("# smollm2 tokenizer.json: %zu strings, %zu ids identical to HF\n", st.strings,
	       st.ids);
}

static void test_spbpe_json_matches_hf(void)
{
	struct golden_stats st;
	const char *fail;
	size_t lossy = 0, i;
	const json_t *cases;

	CHECK(sp() && goldens("spbpe"));
	fail = check_goldens(sp(), goldens("spbpe"), true, &st);
	CHECK_MSG(!fail, "%s", fail);
	/* text comes back except where special tokens written in the text
	 * split it (the normalizer prepends U+2581 to each stretch), exactly
	 * where HF's decode does not give it back either */
	cases = json_object_get(goldens("spbpe"), "cases");
	for (i = 0; i < json_array_size(cases); i++) {
		const json_t *c = json_array_get(cases, i);

		if (!json_equal(json_object_get(c, "text"), json_object_get(c, "decoded")))
			lossy++;
	}
	CHECK_EQ_INT(st.round_trips, st.strings - lossy);
	CHECK(lossy < 20);
}

static void test_decode_random_ids_matches_hf(void)
{
	const char *fail;

	CHECK(smol() && sp());
	fail = check_decode_cases(smol(), goldens("smollm2"));
	CHECK_MSG(!fail, "smollm2: %s", fail);
	fail = check_decode_cases(sp(), goldens("spbpe"));
	CHECK_MSG(!fail, "spbpe: %s", fail);
}

static void test_smollm2_gguf_matches_hf(void)
{
	struct lp_err err = {0};
	struct lp_tokenizer *tok = load_gguf_tok(model_path(), &err);
	struct golden_stats st;
	const char *fail;

	CHECK_MSG(tok, "%s: %s (run make deps)", model_path(), err.msg);
	fail = check_goldens(tok, goldens("smollm2"), true, &st);
	if (!fail)
		fail = check_decode_cases(tok, goldens("smollm2"));
	if (!fail && (lp_tokenizer_vocab_size(tok) != 49152 || lp_tokenizer_bos(tok) != 1 ||
	              lp_tokenizer_eos(tok) != 2))
		fail = "vocabulary size or bos/eos ids differ from the model's";
	if (!fail &&
	    (!lp_tokenizer_chat_template(tok) ||
	     strcmp(lp_tokenizer_chat_template(tok), lp_tokenizer_chat_template(smol())) != 0))
		fail = "chat template differs from tokenizer_config.json's";
	lp_tokenizer_free(tok);
	CHECK_MSG(!fail, "%s", fail);
}

static void test_spbpe_gguf_matches_hf(void)
{
	struct lp_err err = {0};
	char path[512];
	struct lp_tokenizer *tok;
	struct golden_stats st;
	const char *fail;

	snprintf(path, sizeof(path), "%s/tokenizer/gguf/spbpe.gguf", test_fixtures_dir());
	tok = load_gguf_tok(path, &err);
	CHECK_MSG(tok, "%s", err.msg);
	/* SentencePiece merging by score gives the same ids as HF's merges */
	fail = check_goldens(tok, goldens("spbpe"), true, &st);
	if (!fail)
		fail = check_decode_cases(tok, goldens("spbpe"));
	if (!fail && (lp_tokenizer_bos(tok) != 1 || lp_tokenizer_eos(tok) != 2 ||
	              !lp_tokenizer_is_special(tok, 0) || lp_tokenizer_is_special(tok, 3)))
		fail = "bos/eos or special flags differ";
	lp_tokenizer_free(tok);
	CHECK_MSG(!fail, "%s", fail);
}

static void test_accessors(void)
{
	CHECK(smol() && sp());
	CHECK_EQ_INT(lp_tokenizer_vocab_size(smol()), 49152);
	CHECK_EQ_INT(lp_tokenizer_bos(smol()), 1);
	CHECK_EQ_INT(lp_tokenizer_eos(smol()), 2);
	CHECK_EQ_INT(lp_tokenizer_find(smol(), "<|im_end|>"), 2);
	CHECK_EQ_INT(lp_tokenizer_find(smol(), "\xc4\xa0the"), 260); /* "Ġthe" */
	CHECK_EQ_INT(lp_tokenizer_find(smol(), "no such token here"), -1);
	CHECK(lp_tokenizer_is_special(smol(), 0));
	CHECK(lp_tokenizer_is_special(smol(), 16));
	CHECK(!lp_tokenizer_is_special(smol(), 17));
	CHECK(!lp_tokenizer_is_special(smol(), -1));
	CHECK(!lp_tokenizer_is_special(smol(), 49152));
	CHECK(strstr(lp_tokenizer_chat_template(smol()), "named SmolLM") != NULL);
	CHECK_EQ_INT(lp_tokenizer_vocab_size(sp()), 512);
	CHECK_EQ_INT(lp_tokenizer_bos(sp()), 1);
	CHECK_EQ_INT(lp_tokenizer_eos(sp()), 2);
	CHECK_EQ_INT(lp_tokenizer_find(sp(), "<0x0A>"), 13);
	CHECK(strstr(lp_tokenizer_chat_template(sp()), "<<SYS>>") != NULL);
}

static void test_add_special_adds_bos(void)
{
	struct lp_tokens t = {0};
	struct lp_err err = {0};

	CHECK(smol() && sp());
	CHECK_OK(lp_tokenizer_encode(sp(), "hi", 2, LP_ENCODE_ADD_SPECIAL, &t, &err), &err);
	CHECK(t.n >= 2 && t.ids[0] == 1);
	t.n = 0;
	/* SmolLM2 adds nothing (add_bos_token false) */
	CHECK_OK(lp_tokenizer_encode(smol(), "hi", 2, LP_ENCODE_ADD_SPECIAL, &t, &err), &err);
	CHECK_EQ_INT(t.n, 1);
	CHECK_EQ_INT(t.ids[0], 6004);
	/* encode appends */
	CHECK_OK(lp_tokenizer_encode(smol(), "hi", 2, 0, &t, &err), &err);
	CHECK_EQ_INT(t.n, 2);
	CHECK_EQ_INT(t.ids[1], 6004);
	lp_tokens_release(&t);
	CHECK(t.ids == NULL && t.n == 0);
}

static void test_special_tokens_only_with_flag(void)
{
	static const char text[] = "<|im_start|>user";
	struct lp_tokens t = {0};
	struct lp_err err = {0};
	size_t i;

	CHECK(smol());
	CHECK_OK(lp_tokenizer_encode(smol(), text, strlen(text), LP_ENCODE_PARSE_SPECIAL, &t, &err),
	         &err);
	CHECK_EQ_INT(t.n, 2);
	CHECK_EQ_INT(t.ids[0], 1);
	t.n = 0;
	CHECK_OK(lp_tokenizer_encode(smol(), text, strlen(text), 0, &t, &err), &err);
	CHECK(t.n > 2);
	for (i = 0; i < t.n; i++)
		CHECK(!lp_tokenizer_is_special(smol(), t.ids[i]));
	lp_tokens_release(&t);
}

static void test_invalid_utf8_is_replacement_char(void)
{
	struct lp_tokens a = {0}, b = {0};
	struct lp_err err = {0};

	CHECK(smol());
	/* a lone continuation byte, a truncated 3-byte sequence, an overlong */
	CHECK_OK(lp_tokenizer_encode(smol(), "a\x80z\xe6\x97!\xc0\xaf", 9, 0, &a, &err), &err);
	CHECK_OK(lp_tokenizer_encode(smol(), "a\xef\xbf\xbdz\xef\xbf\xbd!\xef\xbf\xbd\xef\xbf\xbd",
	                             16, 0, &b, &err),
	         &err);
	CHECK_EQ_INT(a.n, b.n);
	CHECK(memcmp(a.ids, b.ids, a.n * sizeof(int32_t)) == 0);
	lp_tokens_release(&a);
	lp_tokens_release(&b);
}

static void test_detok_streams_whole_characters(void)
{
	/* U+1F916 is four bytes spread over byte-level tokens */
	static const char text[] = "\xf0\x9f\xa4\x96 \xe6\x97\xa5\xe6\x9c\xac";
	struct lp_tokens t = {0};
	struct lp_err err = {0};
	struct lp_detok d;
	char piece[256], all[64];
	size_t i, n = 0, empty = 0;
	int len;

	CHECK(smol());
	CHECK_OK(lp_tokenizer_encode(smol(), text, strlen(text), 0, &t, &err), &err);
	lp_detok_init(&d, false);
	for (i = 0; i < t.n; i++) {
		len = lp_detok_piece(smol(), &d, t.ids[i], piece, sizeof(piece));
		CHECK(len >= 0);
		CHECK(lp_utf8_valid(piece, (size_t)len));
		if (len == 0)
			empty++;
		CHECK((size_t)len + n < sizeof(all));
		memcpy(all + n, piece, (size_t)len);
		n += (size_t)len;
	}
	CHECK(empty > 0); /* some ids ended inside a character */
	CHECK_EQ_INT(lp_detok_flush(smol(), &d, piece, sizeof(piece)), 0);
	CHECK_EQ_INT(n, strlen(text));
	CHECK(memcmp(all, text, n) == 0);
	/* an id out of range is an error, and the state is kept */
	CHECK(lp_detok_piece(smol(), &d, 49152, piece, sizeof(piece)) < 0);
	CHECK(lp_detok_piece(smol(), &d, -1, piece, sizeof(piece)) < 0);
	/* too small a buffer is -ENOBUFS, nothing consumed */
	len = lp_detok_piece(smol(), &d, lp_tokenizer_find(smol(), "\xc4\xa0the"), piece, 2);
	CHECK_EQ_INT(len, -ENOBUFS);
	CHECK_EQ_INT(lp_detok_piece(smol(), &d, lp_tokenizer_find(smol(), "\xc4\xa0the"), piece,
	                            sizeof(piece)),
	             4);
	CHECK(memcmp(piece, " the", 4) == 0);
	/* a dangling lead byte comes out as U+FFFD at the flush */
	lp_detok_init(&d, false);
	CHECK_EQ_INT(
	    lp_detok_piece(smol(), &d, lp_tokenizer_find(smol(), "\xc3\xa6"), piece, sizeof(piece)),
	    0);
	CHECK_EQ_INT(lp_detok_flush(smol(), &d, piece, sizeof(piece)), 3);
	CHECK(memcmp(piece, "\xef\xbf\xbd", 3) == 0);
	lp_tokens_release(&t);
}

static void test_spbpe_strips_first_space_only(void)
{
	struct lp_detok d;
	char piece[64];
	int32_t sp_hello[2];

	CHECK(sp());
	sp_hello[0] = lp_tokenizer_find(sp(), "\xe2\x96\x81");
	sp_hello[1] = lp_tokenizer_find(sp(), "\xe2\x96\x81the");
	CHECK(sp_hello[0] >= 0 && sp_hello[1] >= 0);
	lp_detok_init(&d, true);
	/* BOS is skipped and does not count as the first piece */
	CHECK_EQ_INT(lp_detok_piece(sp(), &d, 1, piece, sizeof(piece)), 0);
	CHECK_EQ_INT(lp_detok_piece(sp(), &d, sp_hello[1], piece, sizeof(piece)), 3);
	CHECK(memcmp(piece, "the", 3) == 0);
	CHECK_EQ_INT(lp_detok_piece(sp(), &d, sp_hello[1], piece, sizeof(piece)), 4);
	CHECK(memcmp(piece, " the", 4) == 0);
	CHECK_EQ_INT(lp_detok_piece(sp(), &d, sp_hello[0], piece, sizeof(piece)), 1);
}

/* Variants: a base tokenizer.json with some parts replaced. */
static const char *check_variant(const json_t *v, struct lp_tokenizer **out)
{
	static char msg[1200];
	const char *base = json_string_value(json_object_get(v, "base"));
	const char *name = json_string_value(json_object_get(v, "name"));
	const json_t *patch = json_object_get(v, "patch");
	const json_t *model_patch = json_object_get(v, "model_patch");
	struct lp_err err = {0};
	char rel[128], *text, *fail = NULL;
	json_t *root;
	struct golden_stats st;
	const char *f;

	*out = NULL;
	snprintf(rel, sizeof(rel), "tokenizer/%s/tokenizer.json", base ? base : "?");
	if (!(root = read_json(rel)))
		return "cannot read the base tokenizer";
	json_object_update(root, (json_t *)patch);
	if (model_patch)
		json_object_update(json_object_get(root, "model"), (json_t *)model_patch);
	text = json_dumps(root, JSON_COMPACT);
	json_decref(root);
	if (!text)
		return "cannot write the variant";
	if (lp_tokenizer_from_json(out, text, strlen(text), NULL, 0, &err)) {
		snprintf(msg, sizeof(msg), "variant %s: %s", name, err.msg);
		fail = msg;
	} else if ((f = check_goldens(*out, v, false, &st))) {
		snprintf(msg, sizeof(msg), "variant %s: %s", name, f);
		fail = msg;
	}
	free(text);
	return fail;
}

static void test_pipeline_variants_match_hf(void)
{
	json_t *vs = read_json("tokenizer/variants.json");
	size_t i;

	CHECK(vs && json_array_size(vs) >= 10);
	for (i = 0; i < json_array_size(vs); i++) {
		struct lp_tokenizer *tok;
		const char *fail = check_variant(json_array_get(vs, i), &tok);

		lp_tokenizer_free(tok);
		if (fail) {
			json_decref(vs);
			CHECK_MSG(0, "%s", fail);
		}
	}
	json_decref(vs);
}

/* Loading must fail with a message, never crash. */
static void expect_json_error(const char *json, int code, const char *needle)
{
	struct lp_tokenizer *tok = (struct lp_tokenizer *)1;
	struct lp_err err = {0};
	int rc = lp_tokenizer_from_json(&tok, json, strlen(json), NULL, 0, &err);

	CHECK_MSG(rc < 0, "'%s' loaded", show(json));
	CHECK(tok == NULL);
	if (code)
		CHECK_MSG(rc == code, "'%s': rc %d, expected %d (%s)", show(json), rc, code,
		          err.msg);
	CHECK_MSG(strstr(err.msg, needle) != NULL, "'%s' not in '%s'", needle, err.msg);
}

#define TINY_VOCAB "\"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}"

static void test_bad_tokenizer_json(void)
{
	size_t len, cut;
	char *json = read_fixture("tokenizer/spbpe/tokenizer.json", &len);
	struct lp_err err = {0};

	CHECK(json);
	/* truncated anywhere */
	for (cut = 0; cut < len; cut += len / 37 + 1) {
		struct lp_tokenizer *tok = NULL;

		CHECK_MSG(lp_tokenizer_from_json(&tok, json, cut, NULL, 0, &err) < 0,
		          "truncated at %zu loaded", cut);
		CHECK(tok == NULL && err.msg[0]);
	}
	free(json);
	expect_json_error("[1, 2]", -EINVAL, "not a json object");
	expect_json_error("{}", -EINVAL, "no 'model'");
	expect_json_error("{\"model\": {\"type\": \"Magic\", " TINY_VOCAB "}}", -EINVAL,
	                  "unknown model type 'Magic'");
	expect_json_error("{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}", -ENOTSUP,
	                  "'Unigram'");
	expect_json_error("{\"model\": {\"type\": \"BPE\", " TINY_VOCAB ", \"merges\": [\"a c\"]}}",
	                  -EINVAL, "unknown token 'c'");
	expect_json_error("{\"model\": {\"type\": \"BPE\", " TINY_VOCAB
	                  ", \"merges\": [[\"zz\", \"b\"]]}}",
	                  -EINVAL, "unknown token 'zz'");
	expect_json_error("{\"model\": {\"type\": \"BPE\", " TINY_VOCAB
	                  ", \"merges\": [\"a b c\"]}}",
	                  -EINVAL, "separated by a space");
	expect_json_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, "
	                  "\"merges\": [\"a b\"]}}",
	                  -EINVAL, "not in the vocabulary");
	expect_json_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 0}}}",
	                  -EINVAL, "twice");
	expect_json_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 2}}}",
	                  -EINVAL, "no token with id 1");
	expect_json_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -4}}}", -EINVAL,
	                  "bad id");
	expect_json_error("{\"model\": {\"type\": \"BPE\", " TINY_VOCAB
	                  ", \"unk_token\": \"<unk>\"}}",
	                  -EINVAL, "unk_token '<unk>'");
	expect_json_error(
	    "{\"normalizer\": {\"type\": \"NFKC\"}, \"model\": {\"type\": \"BPE\", " TINY_VOCAB
	    "}}",
	    -ENOTSUP, "normalizer 'NFKC' is not supported");
	expect_json_error("{\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": "
	                  "\"(unclosed\"}, \"behavior\": \"Isolated\"}, \"model\": {\"type\": "
	                  "\"BPE\", " TINY_VOCAB "}}",
	                  -EINVAL, "bad regex");
	expect_json_error(
	    "{\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": "
	    "\"a\"}, \"behavior\": \"Sideways\"}, \"model\": {\"type\": \"BPE\", " TINY_VOCAB "}}",
	    -EINVAL, "'Sideways'");
	expect_json_error("{\"pre_tokenizer\": {\"type\": \"Whitespace\"}, \"model\": {\"type\": "
	                  "\"BPE\", " TINY_VOCAB "}}",
	                  -ENOTSUP, "'Whitespace'");
	expect_json_error(
	    "{\"decoder\": {\"type\": \"WordPiece\"}, \"model\": {\"type\": \"BPE\", " TINY_VOCAB
	    "}}",
	    -ENOTSUP, "'WordPiece'");
	expect_json_error("{\"added_tokens\": [{\"id\": 7, \"content\": \"<x>\"}], \"model\": "
	                  "{\"type\": \"BPE\", " TINY_VOCAB "}}",
	                  -EINVAL, "no token with id 3");
}

static void test_bad_config(void)
{
	static const char tj[] = "{\"model\": {\"type\": \"BPE\", " TINY_VOCAB "}}";
	static const char *cfgs[] = {
	    "{\"bos_token\": \"<s>\"}",
	    "{\"eos_token\": 5}",
	    "{\"add_bos_token\": true}",
	    "{\"chat_template\": ",
	};
	static const char *needles[] = {"'<s>' is not in the vocabulary", "not a string",
	                                "without a bos_token", "invalid json"};
	struct lp_tokenizer *tok = NULL;
	struct lp_err err = {0};
	size_t i;

	for (i = 0; i < 4; i++) {
		CHECK(lp_tokenizer_from_json(&tok, tj, strlen(tj), cfgs[i], strlen(cfgs[i]), &err) <
		      0);
		CHECK(tok == NULL);
		CHECK_MSG(strstr(err.msg, needles[i]) != NULL, "'%s' not in '%s'", needles[i],
		          err.msg);
	}
	/* the same file loads without a config */
	CHECK_OK(lp_tokenizer_from_json(&tok, tj, strlen(tj), NULL, 0, &err), &err);
	CHECK_EQ_INT(lp_tokenizer_bos(tok), -1);
	CHECK(lp_tokenizer_chat_template(tok) == NULL);
	lp_tokenizer_free(tok);
}

static void test_bad_gguf_tokenizers(void)
{
	static const char *files[] = {"bad-pre.gguf", "bad-model.gguf", "bad-merge.gguf"};
	static const char *needles[] = {"'made-up-pre'", "'bert'", "unknown token 'zz'"};
	static const int codes[] = {-ENOTSUP, -ENOTSUP, -EINVAL};
	size_t i;

	for (i = 0; i < 3; i++) {
		char path[512];
		struct lp_gguf *g = NULL;
		struct lp_tokenizer *tok = (struct lp_tokenizer *)1;
		struct lp_err err = {0};
		int rc;

		snprintf(path, sizeof(path), "%s/tokenizer/gguf/%s", test_fixtures_dir(), files[i]);
		CHECK_OK(lp_gguf_open(&g, path, &err), &err);
		rc = lp_tokenizer_from_gguf(&tok, g, &err);
		lp_gguf_free(g);
		CHECK(tok == NULL);
		CHECK_MSG(rc == codes[i], "%s: rc %d (%s)", files[i], rc, err.msg);
		CHECK_MSG(strstr(err.msg, needles[i]) != NULL, "'%s' not in '%s'", needles[i],
		          err.msg);
	}
}

/* One 200 kB "word" of varied letters, a single BPE piece, encodes into a
 * plausible number of tokens. How its time scales with its length is make
 * bench's figure (tokenizer_long_word_scaling_4x), not a timed test's. */
static void test_long_word(void)
{
	size_t n = 200000, i;
	char *s = malloc(n);
	struct lp_tokens t = {0};
	struct lp_err err = {0};

	CHECK(s && smol());
	for (i = 0; i < n; i++)
		s[i] = (char)('a' + (i * 7 + i / 13) % 26);
	CHECK_OK(lp_tokenizer_encode(smol(), s, n, 0, &t, &err), &err);
	CHECK(t.n > n / 8 && t.n < n);
	free(s);
	lp_tokens_release(&t);
}

int main(void)
{
	TEST_MAIN_BEGIN("test-tokenizer");
	RUN(test_corpus_is_large);
	RUN(test_smollm2_json_matches_hf);
	RUN(test_spbpe_json_matches_hf);
	RUN(test_decode_random_ids_matches_hf);
	RUN(test_smollm2_gguf_matches_hf);
	RUN(test_spbpe_gguf_matches_hf);
	RUN(test_accessors);
	RUN(test_add_special_adds_bos);
	RUN(test_special_tokens_only_with_flag);
	RUN(test_invalid_utf8_is_replacement_char);
	RUN(test_detok_streams_whole_characters);
	RUN(test_spbpe_strips_first_space_only);
	RUN(test_pipeline_variants_match_hf);
	RUN(test_bad_tokenizer_json);
	RUN(test_bad_config);
	RUN(test_bad_gguf_tokenizers);
	RUN(test_long_word);
	lp_tokenizer_free(smol_json);
	lp_tokenizer_free(sp_json);
	json_decref(smol_goldens);
	json_decref(sp_goldens);
	TEST_MAIN_END();
}
