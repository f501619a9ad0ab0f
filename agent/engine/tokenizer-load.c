/* Building a tokenizer: from an HF tokenizer.json (+ tokenizer_config.json)
 * or from the tokenizer.ggml.* metadata of a GGUF file. Every component the
 * file names is either reproduced exactly or refused with -ENOTSUP naming
 * it, so that a tokenizer that loads encodes the way HF `tokenizers` does. */
#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "agent/formats/gguf.h"
#include "agent/engine/tokenizer-internal.h"
#include "agent/engine/unicode-utf8.h"

/* GPT-2's pre-tokenizer regex (HF ByteLevel with use_regex). */
static const char RE_GPT2[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|"
                              "\\s+(?!\\S)|\\s+";
/* Llama 3's Split regex. */
static const char RE_LLAMA3[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
                                "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
                                "\\s+(?!\\S)|\\s+";
/* Qwen 2's Split regex: Llama 3's with single digits. */
static const char RE_QWEN2[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
                               "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
                               "\\s+(?!\\S)|\\s+";
/* A word character, for added tokens that match only as a whole word. */
static const char RE_WORD[] = "[\\p{L}\\p{N}_]";
static const char METASPACE[] = "\xe2\x96\x81"; /* U+2581 */

static int compile_re(pcre2_code **out, const char *pat, size_t len, bool literal,
                      struct lp_err *err);

/* ---- tables ---- */

static uint32_t hash_bytes(const char *s, size_t len)
{
	uint32_t h = 2166136261u;
	size_t i;

	for (i = 0; i < len; i++) {
		h ^= (unsigned char)s[i];
		h *= 16777619u;
	}
	return h;
}

static uint32_t hash_pair(uint64_t key)
{
	key ^= key >> 33;
	key *= 0xff51afd7ed558ccdULL;
	key ^= key >> 33;
	return (uint32_t)key;
}

static uint32_t table_size(size_t n)
{
	uint32_t size = 16;

	while (size < 2 * n)
		size *= 2;
	return size;
}

int32_t tok_lookup(const struct lp_tokenizer *t, const char *s, size_t len)
{
	uint32_t i;

	if (!t->vocab.slots)
		return -1;
	for (i = hash_bytes(s, len) & t->vocab.mask;; i = (i + 1) & t->vocab.mask) {
		int32_t id = t->vocab.slots[i];

		if (id < 0)
			return -1;
		if (t->tok_len[id] == len && memcmp(t->strtab + t->tok_off[id], s, len) == 0)
			return id;
	}
}

uint32_t tok_merge_rank(const struct lp_tokenizer *t, int32_t a, int32_t b, int32_t *new_id)
{
	uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
	uint32_t i;

	if (!t->merges.keys)
		return UINT32_MAX;
	for (i = hash_pair(key) & t->merges.mask;; i = (i + 1) & t->merges.mask) {
		if (t->merges.keys[i] == UINT64_MAX)
			return UINT32_MAX;
		if (t->merges.keys[i] == key) {
			*new_id = t->merges.new_ids[i];
			return t->merges.ranks[i];
		}
	}
}

void tok_byte_table(struct lp_tokenizer *t)
{
	int b, n = 0;

	for (b = 0; b < 324; b++)
		t->cp_byte[b] = -1;
	for (b = 0; b < 256; b++) {
		bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;

		t->byte_cp[b] = (uint16_t)(printable ? b : 256 + n++);
		t->cp_byte[t->byte_cp[b]] = (int16_t)b;
	}
}

static int strmap_insert(struct lp_tokenizer *t, int32_t id)
{
	const char *s = t->strtab + t->tok_off[id];
	size_t len = t->tok_len[id];
	uint32_t i;

	for (i = hash_bytes(s, len) & t->vocab.mask;; i = (i + 1) & t->vocab.mask) {
		int32_t o = t->vocab.slots[i];

		if (o < 0) {
			t->vocab.slots[i] = id;
			return 1;
		}
		if (t->tok_len[o] == len && memcmp(t->strtab + t->tok_off[o], s, len) == 0)
			return 0; /* the first id with this text wins */
	}
}

static int merge_insert(struct lp_tokenizer *t, int32_t a, int32_t b, uint32_t rank, int32_t id)
{
	uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
	uint32_t i;

	for (i = hash_pair(key) & t->merges.mask;; i = (i + 1) & t->merges.mask) {
		if (t->merges.keys[i] == UINT64_MAX || t->merges.keys[i] == key) {
			/* a repeated pair keeps its last rank, as HF's map does */
			t->merges.keys[i] = key;
			t->merges.ranks[i] = rank;
			t->merges.new_ids[i] = id;
			return 0;
		}
	}
}

/* ---- vocabulary ---- */

static int vocab_alloc(struct lp_tokenizer *t, size_t n, struct lp_err *err)
{
	size_t i;

	if (n == 0)
		return lp_errf(err, -EINVAL, "the vocabulary is empty");
	if (n > TOK_MAX_VOCAB)
		return lp_errf(err, -E2BIG, "vocabulary of %zu tokens is larger than %d", n,
		               TOK_MAX_VOCAB);
	t->n_vocab = (int32_t)n;
	t->tok_off = malloc(n * sizeof(*t->tok_off));
	t->tok_len = malloc(n * sizeof(*t->tok_len));
	t->tok_flags = calloc(n, 1);
	if (!t->tok_off || !t->tok_len || !t->tok_flags)
		return lp_errf(err, -ENOMEM, "out of memory for %zu tokens", n);
	for (i = 0; i < n; i++)
		t->tok_len[i] = UINT32_MAX;
	return 0;
}

static int strtab_add(struct lp_tokenizer *t, size_t *cap, const char *s, size_t len, uint32_t *off,
                      struct lp_err *err)
{
	if (t->strtab_len + len + 1 > *cap) {
		size_t ncap = *cap ? *cap : 1 << 16;
		char *p;

		while (ncap < t->strtab_len + len + 1)
			ncap *= 2;
		if (ncap > UINT32_MAX)
			return lp_errf(err, -E2BIG, "token texts exceed 4 GiB");
		p = realloc(t->strtab, ncap);
		if (!p)
			return lp_errf(err, -ENOMEM, "out of memory for token texts");
		t->strtab = p;
		*cap = ncap;
	}
	*off = (uint32_t)t->strtab_len;
	if (len)
		memcpy(t->strtab + t->strtab_len, s, len);
	t->strtab[t->strtab_len + len] = '\0';
	t->strtab_len += len + 1;
	return 0;
}

static int vocab_set(struct lp_tokenizer *t, size_t *cap, int64_t id, const char *s, size_t len,
                     bool replace, struct lp_err *err)
{
	if (id < 0 || id >= t->n_vocab)
		return lp_errf(err, -EINVAL, "token '%.64s' has id %lld outside 0..%d", s,
		               (long long)id, t->n_vocab - 1);
	if (len > TOK_MAX_TOKEN_BYTES)
		return lp_errf(err, -E2BIG, "token %lld is %zu bytes long (at most %d)",
		               (long long)id, len, TOK_MAX_TOKEN_BYTES);
	if (!lp_utf8_valid(s, len))
		return lp_errf(err, -EINVAL, "token %lld is not valid utf-8", (long long)id);
	if (t->tok_len[id] != UINT32_MAX) {
		if (!replace)
			return lp_errf(err, -EINVAL,
			               "token id %lld appears twice in the vocabulary",
			               (long long)id);
		if (t->tok_len[id] == len && memcmp(t->strtab + t->tok_off[id], s, len) == 0)
			return 0;
	}
	t->tok_len[id] = (uint32_t)len;
	return strtab_add(t, cap, s, len, &t->tok_off[id], err);
}

/* Checks every id has a text and builds the text -> id map; added tokens
 * go in first so that their ids win (HF's added vocabulary does). */
static int vocab_finish(struct lp_tokenizer *t, struct lp_err *err)
{
	uint32_t size = table_size((size_t)t->n_vocab);
	int32_t id;
	int i;

	for (id = 0; id < t->n_vocab; id++)
		if (t->tok_len[id] == UINT32_MAX)
			return lp_errf(err, -EINVAL, "the vocabulary has no token with id %d", id);
	t->vocab.slots = malloc((size_t)size * sizeof(*t->vocab.slots));
	if (!t->vocab.slots)
		return lp_errf(err, -ENOMEM, "out of memory for the vocabulary map");
	memset(t->vocab.slots, 0xff, (size_t)size * sizeof(*t->vocab.slots));
	t->vocab.mask = size - 1;
	for (i = 0; i < t->n_added; i++)
		strmap_insert(t, t->added[i].id);
	for (id = 0; id < t->n_vocab; id++)
		strmap_insert(t, id);
	return 0;
}

static int merges_alloc(struct lp_tokenizer *t, size_t n, struct lp_err *err)
{
	uint32_t size;

	if (n > TOK_MAX_MERGES)
		return lp_errf(err, -E2BIG, "%zu merges is more than %d", n, TOK_MAX_MERGES);
	size = table_size(n);
	t->merges.keys = malloc((size_t)size * sizeof(*t->merges.keys));
	t->merges.ranks = malloc((size_t)size * sizeof(*t->merges.ranks));
	t->merges.new_ids = malloc((size_t)size * sizeof(*t->merges.new_ids));
	if (!t->merges.keys || !t->merges.ranks || !t->merges.new_ids)
		return lp_errf(err, -ENOMEM, "out of memory for %zu merges", n);
	memset(t->merges.keys, 0xff, (size_t)size * sizeof(*t->merges.keys));
	t->merges.mask = size - 1;
	return 0;
}

static int merge_add(struct lp_tokenizer *t, const char *a, size_t alen, const char *b, size_t blen,
                     uint32_t rank, struct lp_err *err)
{
	char cat[2 * TOK_MAX_TOKEN_BYTES];
	int32_t ia, ib, ic;

	ia = tok_lookup(t, a, alen);
	ib = tok_lookup(t, b, blen);
	if (ia < 0 || ib < 0) {
		const char *bad = ia < 0 ? a : b;
		int badlen = (int)(ia < 0 ? alen : blen);

		return lp_errf(err, -EINVAL, "merge %u ('%.*s %.*s') names unknown token '%.*s'",
		               rank, (int)alen, a, (int)blen, b, badlen, bad);
	}
	if (alen + blen > sizeof(cat))
		return lp_errf(err, -EINVAL, "merge %u is too long", rank);
	memcpy(cat, a, alen);
	memcpy(cat + alen, b, blen);
	ic = tok_lookup(t, cat, alen + blen);
	if (ic < 0)
		return lp_errf(err, -EINVAL,
		               "merge %u ('%.*s %.*s') makes '%.*s', not in the vocabulary", rank,
		               (int)alen, a, (int)blen, b, (int)(alen + blen), cat);
	return merge_insert(t, ia, ib, rank, ic);
}

/* "a b" with exactly one space, as HF splits merge strings */
static int merge_add_line(struct lp_tokenizer *t, const char *s, size_t len, uint32_t rank,
                          struct lp_err *err)
{
	const char *sp = memchr(s, ' ', len);

	if (!sp || memchr(sp + 1, ' ', len - (size_t)(sp + 1 - s)))
		return lp_errf(err, -EINVAL,
		               "merge %u ('%.*s') is not two tokens separated by a space", rank,
		               (int)(len > 64 ? 64 : len), s);
	return merge_add(t, s, (size_t)(sp - s), sp + 1, len - (size_t)(sp + 1 - s), rank, err);
}

/* Added tokens sorted by first byte, then longest first (leftmost-longest
 * matching tries them in this order). */
static int cmp_added(const void *pa, const void *pb)
{
	const struct tok_added *a = pa, *b = pb;

	if (a->first != b->first)
		return a->first < b->first ? -1 : 1;
	if (a->len != b->len)
		return a->len > b->len ? -1 : 1;
	return a->id < b->id ? -1 : a->id > b->id;
}

static int index_added(struct lp_tokenizer *t, size_t *cap, struct lp_err *err)
{
	int i, b, rc;

	/* normalized tokens match the normalized text: match their content
	 * normalized the same way */
	for (i = 0; i < t->n_added; i++) {
		struct tok_added *a = &t->added[i];
		char *norm;
		size_t len;

		if (!a->normalized || t->n_norm == 0)
			continue;
		if ((rc = tok_normalize(t, t->strtab + a->off, a->len, &norm, &len, err)))
			return rc;
		rc = len ? strtab_add(t, cap, norm, len, &a->off, err) : 0;
		a->len = (uint32_t)len;
		free(norm);
		if (rc)
			return rc;
		/* HF also decodes such a token as its normalized text */
		if (!t->dec_off) {
			t->dec_off = calloc((size_t)t->n_vocab, sizeof(*t->dec_off));
			t->dec_len = calloc((size_t)t->n_vocab, sizeof(*t->dec_len));
			if (!t->dec_off || !t->dec_len)
				return lp_errf(err, -ENOMEM, "out of memory");
		}
		t->dec_off[a->id] = a->off;
		t->dec_len[a->id] = a->len;
		t->tok_flags[a->id] |= TOK_F_NORM;
	}
	/* an empty text never matches */
	for (i = 0, b = 0; i < t->n_added; i++)
		if (t->added[i].len)
			t->added[b++] = t->added[i];
	t->n_added = b;

	for (i = 0; i < t->n_added; i++)
		t->added[i].first = (unsigned char)t->strtab[t->added[i].off];
	if (t->n_added > 1)
		qsort(t->added, (size_t)t->n_added, sizeof(*t->added), cmp_added);
	i = 0;
	for (b = 0; b < 256; b++) {
		t->added_bucket[b] = (uint32_t)i;
		while (i < t->n_added && t->added[i].first == b)
			i++;
	}
	t->added_bucket[256] = (uint32_t)t->n_added;
	for (i = 0; i < t->n_added; i++)
		if (t->added[i].single_word && !t->word_re)
			return compile_re(&t->word_re, RE_WORD, strlen(RE_WORD), false, err);
	return 0;
}

static void find_byte_tokens(struct lp_tokenizer *t)
{
	int b;

	for (b = 0; b < 256; b++) {
		char name[8];

		snprintf(name, sizeof(name), "<0x%02X>", b);
		t->byte_id[b] = tok_lookup(t, name, 6);
		if (t->byte_level) {
			unsigned char u[4];
			size_t n = lp_utf8_encode(t->byte_cp[b], u);

			t->byte_char_id[b] = tok_lookup(t, (const char *)u, n);
		} else {
			t->byte_char_id[b] = -1;
		}
	}
}

/* ---- components ---- */

static int compile_re(pcre2_code **out, const char *pat, size_t len, bool literal,
                      struct lp_err *err)
{
	int code;
	PCRE2_SIZE off;
	pcre2_code *re;

	re = pcre2_compile((PCRE2_SPTR)pat, len, PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP),
	                   &code, &off, NULL);
	if (!re) {
		PCRE2_UCHAR msg[160];

		pcre2_get_error_message(code, msg, sizeof(msg));
		return lp_errf(err, -EINVAL, "bad regex '%.80s' at offset %zu: %s", pat,
		               (size_t)off, (const char *)msg);
	}
	/* JIT is an optimisation; the interpreter gives the same matches */
	pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
	*out = re;
	return 0;
}

static int dup_text(char **out, size_t *out_len, const char *s, size_t len, struct lp_err *err)
{
	char *p = malloc(len + 1);

	if (!p)
		return lp_errf(err, -ENOMEM, "out of memory");
	memcpy(p, s, len);
	p[len] = '\0';
	*out = p;
	if (out_len)
		*out_len = len;
	return 0;
}

static const char *jstr(const json_t *o, const char *key, size_t *len)
{
	const json_t *v = json_object_get(o, key);

	if (!json_is_string(v))
		return NULL;
	if (len)
		*len = json_string_length(v);
	return json_string_value(v);
}

static bool jbool(const json_t *o, const char *key, bool def)
{
	const json_t *v = json_object_get(o, key);

	return json_is_boolean(v) ? json_is_true(v) : def;
}

/* {"String": s} or {"Regex": s} */
static int parse_pattern(const json_t *p, const char *what, pcre2_code **re, const char **lit,
                         size_t *lit_len, struct lp_err *err)
{
	const char *s;
	size_t len;

	if ((s = jstr(p, "String", &len))) {
		if (lit) {
			*lit = s;
			*lit_len = len;
		}
		return re ? compile_re(re, s, len, true, err) : 0;
	}
	if ((s = jstr(p, "Regex", &len))) {
		if (!re)
			return lp_errf(err, -ENOTSUP, "%s with a regex pattern is not supported",
			               what);
		return compile_re(re, s, len, false, err);
	}
	return lp_errf(err, -EINVAL, "%s has no 'String' or 'Regex' pattern", what);
}

static int parse_normalizer(struct lp_tokenizer *t, const json_t *j, int depth, struct lp_err *err)
{
	const char *type = jstr(j, "type", NULL);
	struct tok_norm *n;
	const char *s;
	size_t len;
	int rc;

	if (!j || json_is_null(j))
		return 0;
	if (!type)
		return lp_errf(err, -EINVAL, "normalizer without a 'type'");
	if (strcmp(type, "Sequence") == 0) {
		const json_t *arr = json_object_get(j, "normalizers");
		size_t i;

		if (!json_is_array(arr))
			return lp_errf(err, -EINVAL, "normalizer 'Sequence' without 'normalizers'");
		if (depth >= TOK_MAX_NESTING)
			return lp_errf(err, -EINVAL, "normalizers nested too deep");
		for (i = 0; i < json_array_size(arr); i++)
			if ((rc = parse_normalizer(t, json_array_get(arr, i), depth + 1, err)))
				return rc;
		return 0;
	}
	if (t->n_norm >= TOK_MAX_STEPS)
		return lp_errf(err, -E2BIG, "more than %d normalizers", TOK_MAX_STEPS);
	n = &t->norm[t->n_norm];
	if (strcmp(type, "Prepend") == 0) {
		if (!(s = jstr(j, "prepend", &len)))
			return lp_errf(err, -EINVAL, "normalizer 'Prepend' without 'prepend'");
		n->type = NORM_PREPEND;
		if ((rc = dup_text(&n->text, &n->text_len, s, len, err)))
			return rc;
		t->n_norm++;
		return 0;
	}
	if (strcmp(type, "Replace") == 0) {
		n->type = NORM_REPLACE;
		if (!(s = jstr(j, "content", &len)))
			return lp_errf(err, -EINVAL, "normalizer 'Replace' without 'content'");
		if ((rc = dup_text(&n->text, &n->text_len, s, len, err)))
			return rc;
		t->n_norm++; /* owned from here on, freed with the tokenizer */
		return parse_pattern(json_object_get(j, "pattern"), "normalizer 'Replace'", &n->re,
		                     NULL, NULL, err);
	}
	if (strcmp(type, "NFC") == 0) {
		n->type = NORM_NFC;
		t->n_norm++;
		return 0;
	}
	if (strcmp(type, "NFD") == 0 || strcmp(type, "NFKC") == 0 || strcmp(type, "NFKD") == 0 ||
	    strcmp(type, "Lowercase") == 0 || strcmp(type, "Strip") == 0 ||
	    strcmp(type, "StripAccents") == 0 || strcmp(type, "BertNormalizer") == 0 ||
	    strcmp(type, "Precompiled") == 0 || strcmp(type, "Nmt") == 0 ||
	    strcmp(type, "ByteLevel") == 0)
		return lp_errf(err, -ENOTSUP, "normalizer '%s' is not supported", type);
	return lp_errf(err, -EINVAL, "unknown normalizer type '%s'", type);
}

static int parse_behavior(const char *s, enum tok_split_behavior *b, struct lp_err *err)
{
	static const struct {
		const char *name;
		enum tok_split_behavior b;
	} names[] = {
	    {"Removed", SPLIT_REMOVED},
	    {"Isolated", SPLIT_ISOLATED},
	    {"MergedWithPrevious", SPLIT_MERGED_PREV},
	    {"MergedWithNext", SPLIT_MERGED_NEXT},
	    {"Contiguous", SPLIT_CONTIGUOUS},
	};
	size_t i;

	for (i = 0; s && i < sizeof(names) / sizeof(names[0]); i++) {
		if (strcmp(s, names[i].name) == 0) {
			*b = names[i].b;
			return 0;
		}
	}
	return lp_errf(err, -EINVAL, "unknown split behavior '%s'", s ? s : "(none)");
}

static int parse_prepend_scheme(const json_t *j, enum tok_prepend *p, struct lp_err *err)
{
	const char *s = jstr(j, "prepend_scheme", NULL);

	if (!s) {
		/* older files: add_prefix_space */
		*p = jbool(j, "add_prefix_space", true) ? PREPEND_ALWAYS : PREPEND_NEVER;
		return 0;
	}
	if (strcmp(s, "always") == 0)
		*p = PREPEND_ALWAYS;
	else if (strcmp(s, "first") == 0)
		*p = PREPEND_FIRST;
	else if (strcmp(s, "never") == 0)
		*p = PREPEND_NEVER;
	else
		return lp_errf(err, -EINVAL, "unknown prepend_scheme '%s'", s);
	return 0;
}

static int parse_replacement(const json_t *j, char out[8], size_t *len, struct lp_err *err)
{
	size_t n;
	const char *s = jstr(j, "replacement", &n);

	if (!s) {
		s = METASPACE;
		n = 3;
	}
	if (n == 0 || n > 4)
		return lp_errf(err, -EINVAL, "Metaspace replacement '%s' is not one character", s);
	memcpy(out, s, n);
	out[n] = '\0';
	*len = n;
	return 0;
}

static int add_pre_split(struct lp_tokenizer *t, const char *pat, size_t len, bool literal,
                         enum tok_split_behavior b, bool invert, struct lp_err *err)
{
	struct tok_pre *p;
	int rc;

	if (t->n_pre >= TOK_MAX_STEPS)
		return lp_errf(err, -E2BIG, "more than %d pre-tokenizers", TOK_MAX_STEPS);
	p = &t->pre[t->n_pre];
	memset(p, 0, sizeof(*p));
	p->type = PRE_SPLIT;
	p->behavior = b;
	p->invert = invert;
	if ((rc = compile_re(&p->re, pat, len, literal, err)))
		return rc;
	t->n_pre++;
	return 0;
}

static int add_pre_byte_level(struct lp_tokenizer *t, bool add_prefix_space, bool use_regex,
                              struct lp_err *err)
{
	struct tok_pre *p;
	int rc;

	if (t->n_pre >= TOK_MAX_STEPS)
		return lp_errf(err, -E2BIG, "more than %d pre-tokenizers", TOK_MAX_STEPS);
	p = &t->pre[t->n_pre];
	memset(p, 0, sizeof(*p));
	p->type = PRE_BYTE_LEVEL;
	p->add_prefix_space = add_prefix_space;
	p->behavior = SPLIT_ISOLATED;
	if (use_regex && (rc = compile_re(&p->re, RE_GPT2, strlen(RE_GPT2), false, err)))
		return rc;
	t->n_pre++;
	t->byte_level = true;
	return 0;
}

static int parse_pre(struct lp_tokenizer *t, const json_t *j, int depth, struct lp_err *err)
{
	const char *type = jstr(j, "type", NULL);
	int rc;

	if (!j || json_is_null(j))
		return 0;
	if (!type)
		return lp_errf(err, -EINVAL, "pre_tokenizer without a 'type'");
	if (strcmp(type, "Sequence") == 0) {
		const json_t *arr = json_object_get(j, "pretokenizers");
		size_t i;

		if (!json_is_array(arr))
			return lp_errf(err, -EINVAL,
			               "pre_tokenizer 'Sequence' without 'pretokenizers'");
		if (depth >= TOK_MAX_NESTING)
			return lp_errf(err, -EINVAL, "pre_tokenizers nested too deep");
		for (i = 0; i < json_array_size(arr); i++)
			if ((rc = parse_pre(t, json_array_get(arr, i), depth + 1, err)))
				return rc;
		return 0;
	}
	if (t->byte_level)
		return lp_errf(err, -ENOTSUP,
		               "pre_tokenizer '%s' after 'ByteLevel' is not supported", type);
	if (strcmp(type, "ByteLevel") == 0)
		return add_pre_byte_level(t, jbool(j, "add_prefix_space", true),
		                          jbool(j, "use_regex", true), err);
	if (strcmp(type, "Digits") == 0) {
		/* HF's char::is_numeric is Unicode Nd, Nl and No: \p{N} */
		bool one = jbool(j, "individual_digits", false);

		return add_pre_split(t, one ? "\\p{N}" : "\\p{N}+", one ? 5 : 6, false,
		                     SPLIT_ISOLATED, false, err);
	}
	if (strcmp(type, "Split") == 0) {
		const json_t *pat = json_object_get(j, "pattern");
		enum tok_split_behavior b = SPLIT_ISOLATED;
		const char *s;
		size_t len;
		bool literal = true;

		if ((rc = parse_behavior(jstr(j, "behavior", NULL), &b, err)))
			return rc;
		if (!(s = jstr(pat, "String", &len))) {
			literal = false;
			if (!(s = jstr(pat, "Regex", &len)))
				return lp_errf(
				    err, -EINVAL,
				    "pre_tokenizer 'Split' has no 'String' or 'Regex' pattern");
		}
		return add_pre_split(t, s, len, literal, b, jbool(j, "invert", false), err);
	}
	if (strcmp(type, "Metaspace") == 0) {
		struct tok_pre *p;

		if (t->n_pre >= TOK_MAX_STEPS)
			return lp_errf(err, -E2BIG, "more than %d pre-tokenizers", TOK_MAX_STEPS);
		p = &t->pre[t->n_pre];
		memset(p, 0, sizeof(*p));
		p->type = PRE_METASPACE;
		p->behavior = SPLIT_MERGED_NEXT;
		if ((rc = parse_replacement(j, p->repl, &p->repl_len, err)) ||
		    (rc = parse_prepend_scheme(j, &p->prepend, err)))
			return rc;
		if (jbool(j, "split", true) &&
		    (rc = compile_re(&p->re, p->repl, p->repl_len, true, err)))
			return rc;
		t->n_pre++;
		return 0;
	}
	if (strcmp(type, "Whitespace") == 0 || strcmp(type, "WhitespaceSplit") == 0 ||
	    strcmp(type, "BertPreTokenizer") == 0 || strcmp(type, "Punctuation") == 0 ||
	    strcmp(type, "UnicodeScripts") == 0 || strcmp(type, "CharDelimiterSplit") == 0 ||
	    strcmp(type, "FixedLength") == 0)
		return lp_errf(err, -ENOTSUP, "pre_tokenizer '%s' is not supported", type);
	return lp_errf(err, -EINVAL, "unknown pre_tokenizer type '%s'", type);
}

static int parse_decoder(struct lp_tokenizer *t, const json_t *j, int depth, bool *fused,
                         struct lp_err *err)
{
	const char *type = jstr(j, "type", NULL);
	struct tok_dec *d;
	const char *s;
	size_t len;
	int rc;

	if (!j || json_is_null(j))
		return 0;
	if (!type)
		return lp_errf(err, -EINVAL, "decoder without a 'type'");
	if (strcmp(type, "Sequence") == 0) {
		const json_t *arr = json_object_get(j, "decoders");
		size_t i;

		if (!json_is_array(arr))
			return lp_errf(err, -EINVAL, "decoder 'Sequence' without 'decoders'");
		if (depth >= TOK_MAX_NESTING)
			return lp_errf(err, -EINVAL, "decoders nested too deep");
		for (i = 0; i < json_array_size(arr); i++)
			if ((rc = parse_decoder(t, json_array_get(arr, i), depth + 1, fused, err)))
				return rc;
		return 0;
	}
	if (t->n_dec >= TOK_MAX_STEPS)
		return lp_errf(err, -E2BIG, "more than %d decoders", TOK_MAX_STEPS);
	d = &t->dec[t->n_dec];
	memset(d, 0, sizeof(*d));
	if (strcmp(type, "ByteLevel") == 0) {
		d->type = DEC_BYTE_LEVEL;
	} else if (strcmp(type, "ByteFallback") == 0) {
		d->type = DEC_BYTE_FALLBACK;
		t->dec_per_byte_invalid = true;
	} else if (strcmp(type, "Fuse") == 0) {
		d->type = DEC_FUSE;
		*fused = true;
	} else if (strcmp(type, "Replace") == 0) {
		const char *p;
		size_t plen;

		d->type = DEC_REPLACE;
		if ((rc = parse_pattern(json_object_get(j, "pattern"), "decoder 'Replace'", NULL,
		                        &p, &plen, err)))
			return rc;
		if (plen == 0)
			return lp_errf(err, -EINVAL, "decoder 'Replace' with an empty pattern");
		if (!(s = jstr(j, "content", &len)))
			return lp_errf(err, -EINVAL, "decoder 'Replace' without 'content'");
		if ((rc = dup_text(&d->pattern, &d->pattern_len, p, plen, err)))
			return rc;
		if ((rc = dup_text(&d->content, &d->content_len, s, len, err))) {
			free(d->pattern);
			return rc;
		}
	} else if (strcmp(type, "Strip") == 0) {
		json_int_t start = json_integer_value(json_object_get(j, "start"));
		json_int_t stop = json_integer_value(json_object_get(j, "stop"));

		d->type = DEC_STRIP;
		if (!(s = jstr(j, "content", &len)) || len == 0 || len > 4)
			return lp_errf(err, -EINVAL,
			               "decoder 'Strip' needs one 'content' character");
		if (start < 0 || stop < 0 || start > 64 || stop > 64)
			return lp_errf(err, -EINVAL, "decoder 'Strip' start/stop out of range");
		d->start = (int)start;
		d->stop = (int)stop;
		d->after_fuse = *fused;
		if (d->after_fuse) {
			/* a stream can lose its first characters, never its last */
			if (stop > 0)
				return lp_errf(
				    err, -ENOTSUP,
				    "decoder 'Strip' with stop > 0 after 'Fuse' is not supported");
			if (t->dec_stream_strip)
				return lp_errf(
				    err, -ENOTSUP,
				    "two 'Strip' decoders after 'Fuse' are not supported");
			t->dec_stream_strip = true;
			memcpy(t->dec_strip_char, s, len);
			t->dec_strip_len = len;
			t->dec_strip_start = (int)start;
		}
		if ((rc = dup_text(&d->content, &d->content_len, s, len, err)))
			return rc;
	} else if (strcmp(type, "Metaspace") == 0) {
		enum tok_prepend p;
		char repl[8];
		size_t rlen;

		d->type = DEC_METASPACE;
		if ((rc = parse_replacement(j, repl, &rlen, err)) ||
		    (rc = parse_prepend_scheme(j, &p, err)))
			return rc;
		d->prepend = p != PREPEND_NEVER;
		if ((rc = dup_text(&d->pattern, &d->pattern_len, repl, rlen, err)))
			return rc;
	} else if (strcmp(type, "WordPiece") == 0 || strcmp(type, "BPEDecoder") == 0 ||
	           strcmp(type, "CTC") == 0) {
		return lp_errf(err, -ENOTSUP, "decoder '%s' is not supported", type);
	} else {
		return lp_errf(err, -EINVAL, "unknown decoder type '%s'", type);
	}
	t->n_dec++;
	return 0;
}

static int push_special(int32_t *arr, int *n, int32_t id, struct lp_err *err)
{
	if (*n >= TOK_MAX_SPECIALS)
		return lp_errf(err, -E2BIG, "the post_processor adds more than %d tokens",
		               TOK_MAX_SPECIALS);
	arr[(*n)++] = id;
	return 0;
}

/* ["<s>", 1] of BertProcessing / RobertaProcessing */
static int pair_id(struct lp_tokenizer *t, const json_t *pair, const char *what, int32_t *id,
                   struct lp_err *err)
{
	const json_t *v = json_array_get(pair, 1);

	if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= t->n_vocab)
		return lp_errf(err, -EINVAL, "post_processor '%s' token is not [text, id]", what);
	*id = (int32_t)json_integer_value(v);
	return 0;
}

static int parse_template(struct lp_tokenizer *t, const json_t *j, struct lp_err *err)
{
	const json_t *single = json_object_get(j, "single");
	const json_t *specials = json_object_get(j, "special_tokens");
	bool seen_seq = false;
	size_t i, k;
	int rc;

	if (!json_is_array(single))
		return lp_errf(err, -EINVAL,
		               "post_processor 'TemplateProcessing' without 'single'");
	for (i = 0; i < json_array_size(single); i++) {
		const json_t *item = json_array_get(single, i);
		const json_t *sp = json_object_get(item, "SpecialToken");
		const json_t *ids;
		const char *name;

		if (json_object_get(item, "Sequence")) {
			seen_seq = true;
			continue;
		}
		if (!sp || !(name = jstr(sp, "id", NULL)))
			return lp_errf(err, -EINVAL,
			               "post_processor template item %zu is not understood", i);
		ids = json_object_get(json_object_get(specials, name), "ids");
		if (!json_is_array(ids) || json_array_size(ids) == 0)
			return lp_errf(err, -EINVAL, "post_processor special token '%s' has no ids",
			               name);
		for (k = 0; k < json_array_size(ids); k++) {
			const json_t *v = json_array_get(ids, k);

			if (!json_is_integer(v) || json_integer_value(v) < 0 ||
			    json_integer_value(v) >= t->n_vocab)
				return lp_errf(err, -EINVAL,
				               "post_processor special token '%s' has a bad id",
				               name);
			rc = seen_seq ? push_special(t->suffix, &t->n_suffix,
			                             (int32_t)json_integer_value(v), err)
			              : push_special(t->prefix, &t->n_prefix,
			                             (int32_t)json_integer_value(v), err);
			if (rc)
				return rc;
		}
	}
	return 0;
}

static int parse_post(struct lp_tokenizer *t, const json_t *j, int depth, struct lp_err *err)
{
	const char *type = jstr(j, "type", NULL);
	int rc;

	if (!j || json_is_null(j))
		return 0;
	if (!type)
		return lp_errf(err, -EINVAL, "post_processor without a 'type'");
	if (strcmp(type, "Sequence") == 0) {
		const json_t *arr = json_object_get(j, "processors");
		size_t i;

		if (!json_is_array(arr))
			return lp_errf(err, -EINVAL,
			               "post_processor 'Sequence' without 'processors'");
		if (depth >= TOK_MAX_NESTING)
			return lp_errf(err, -EINVAL, "post_processors nested too deep");
		for (i = 0; i < json_array_size(arr); i++)
			if ((rc = parse_post(t, json_array_get(arr, i), depth + 1, err)))
				return rc;
		return 0;
	}
	if (strcmp(type, "ByteLevel") == 0)
		return 0; /* only changes offsets */
	if (strcmp(type, "TemplateProcessing") == 0)
		return parse_template(t, j, err);
	if (strcmp(type, "BertProcessing") == 0 || strcmp(type, "RobertaProcessing") == 0) {
		int32_t cls, sep;

		if ((rc = pair_id(t, json_object_get(j, "cls"), type, &cls, err)) ||
		    (rc = pair_id(t, json_object_get(j, "sep"), type, &sep, err)))
			return rc;
		if ((rc = push_special(t->prefix, &t->n_prefix, cls, err)))
			return rc;
		return push_special(t->suffix, &t->n_suffix, sep, err);
	}
	return lp_errf(err, -EINVAL, "unknown post_processor type '%s'", type);
}

/* ---- tokenizer.json ---- */

static int parse_vocab(struct lp_tokenizer *t, const json_t *vocab, const json_t *added,
                       size_t *cap, struct lp_err *err)
{
	int64_t max_id = -1;
	const char *key;
	json_t *val;
	size_t i, n_added = json_array_size(added);
	int rc;

	if (json_object_size(vocab) > TOK_MAX_VOCAB)
		return lp_errf(err, -E2BIG, "vocabulary of %zu tokens is larger than %d",
		               json_object_size(vocab), TOK_MAX_VOCAB);
	if (n_added > TOK_MAX_ADDED)
		return lp_errf(err, -E2BIG, "%zu added tokens is more than %d", n_added,
		               TOK_MAX_ADDED);
	json_object_foreach((json_t *)vocab, key, val)
	{
		if (!json_is_integer(val) || json_integer_value(val) < 0 ||
		    json_integer_value(val) >= TOK_MAX_VOCAB)
			return lp_errf(err, -EINVAL, "vocabulary entry '%.64s' has a bad id", key);
		if (json_integer_value(val) > max_id)
			max_id = json_integer_value(val);
	}
	for (i = 0; i < n_added; i++) {
		const json_t *id = json_object_get(json_array_get(added, i), "id");

		if (!json_is_integer(id) || json_integer_value(id) < 0 ||
		    json_integer_value(id) >= TOK_MAX_VOCAB)
			return lp_errf(err, -EINVAL, "added token %zu has a bad 'id'", i);
		if (json_integer_value(id) > max_id)
			max_id = json_integer_value(id);
	}
	if ((rc = vocab_alloc(t, (size_t)(max_id + 1), err)))
		return rc;
	json_object_foreach((json_t *)vocab, key, val)
	{
		if ((rc = vocab_set(t, cap, json_integer_value(val), key, strlen(key), false, err)))
			return rc;
	}
	if (n_added) {
		t->added = calloc(n_added, sizeof(*t->added));
		if (!t->added)
			return lp_errf(err, -ENOMEM, "out of memory for added tokens");
	}
	for (i = 0; i < n_added; i++) {
		const json_t *a = json_array_get(added, i);
		struct tok_added *ad = &t->added[i];
		const char *s;
		size_t len;

		if (!(s = jstr(a, "content", &len)) || len == 0)
			return lp_errf(err, -EINVAL, "added token %zu has no 'content'", i);
		ad->id = (int32_t)json_integer_value(json_object_get(a, "id"));
		ad->special = jbool(a, "special", false);
		ad->lstrip = jbool(a, "lstrip", false);
		ad->rstrip = jbool(a, "rstrip", false);
		ad->single_word = jbool(a, "single_word", false);
		ad->normalized = jbool(a, "normalized", !ad->special);
		if ((rc = vocab_set(t, cap, ad->id, s, len, true, err)))
			return rc;
		ad->off = t->tok_off[ad->id];
		ad->len = (uint32_t)len;
		t->tok_flags[ad->id] |= TOK_F_ADDED | (ad->special ? TOK_F_SPECIAL : 0);
		if (ad->normalized)
			t->any_normalized_added = true;
		t->n_added++;
	}
	return vocab_finish(t, err);
}

static int parse_merges(struct lp_tokenizer *t, const json_t *merges, struct lp_err *err)
{
	size_t i, n = json_array_size(merges);
	int rc;

	if (merges && !json_is_array(merges))
		return lp_errf(err, -EINVAL, "model 'merges' is not an array");
	if ((rc = merges_alloc(t, n, err)))
		return rc;
	for (i = 0; i < n; i++) {
		const json_t *m = json_array_get(merges, i);

		if (json_is_string(m)) {
			rc = merge_add_line(t, json_string_value(m), json_string_length(m),
			                    (uint32_t)i, err);
		} else if (json_is_array(m) && json_array_size(m) == 2 &&
		           json_is_string(json_array_get(m, 0)) &&
		           json_is_string(json_array_get(m, 1))) {
			const json_t *a = json_array_get(m, 0), *b = json_array_get(m, 1);

			rc = merge_add(t, json_string_value(a), json_string_length(a),
			               json_string_value(b), json_string_length(b), (uint32_t)i,
			               err);
		} else {
			rc = lp_errf(err, -EINVAL, "merge %zu is neither \"a b\" nor [a, b]", i);
		}
		if (rc)
			return rc;
	}
	return 0;
}

static int parse_model(struct lp_tokenizer *t, const json_t *root, size_t *cap, struct lp_err *err)
{
	const json_t *model = json_object_get(root, "model");
	const json_t *v;
	const char *type, *unk;
	size_t len;
	int rc;

	if (!json_is_object(model))
		return lp_errf(err, -EINVAL, "no 'model' object");
	type = jstr(model, "type", NULL);
	if (!type && json_object_get(model, "merges"))
		type = "BPE"; /* files from before 'type' was written */
	if (!type)
		return lp_errf(err, -EINVAL, "model without a 'type'");
	if (strcmp(type, "WordPiece") == 0 || strcmp(type, "Unigram") == 0 ||
	    strcmp(type, "WordLevel") == 0)
		return lp_errf(err, -ENOTSUP, "model type '%s' is not supported (only 'BPE')",
		               type);
	if (strcmp(type, "BPE") != 0)
		return lp_errf(err, -EINVAL, "unknown model type '%s'", type);
	t->model = TOK_MODEL_BPE;
	if (!json_is_object(json_object_get(model, "vocab")))
		return lp_errf(err, -EINVAL, "model has no 'vocab' object");
	v = json_object_get(model, "dropout");
	if (v && !json_is_null(v) && json_number_value(v) > 0.0)
		return lp_errf(err, -ENOTSUP, "BPE dropout is not supported");
	if (jstr(model, "continuing_subword_prefix", &len) && len)
		return lp_errf(err, -ENOTSUP, "BPE continuing_subword_prefix is not supported");
	if (jstr(model, "end_of_word_suffix", &len) && len)
		return lp_errf(err, -ENOTSUP, "BPE end_of_word_suffix is not supported");
	t->byte_fallback = jbool(model, "byte_fallback", false);
	t->fuse_unk = jbool(model, "fuse_unk", false);
	t->ignore_merges = jbool(model, "ignore_merges", false);
	if ((rc = parse_vocab(t, json_object_get(model, "vocab"),
	                      json_object_get(root, "added_tokens"), cap, err)))
		return rc;
	t->unk = -1;
	if ((unk = jstr(model, "unk_token", &len))) {
		t->unk = tok_lookup(t, unk, len);
		if (t->unk < 0)
			return lp_errf(err, -EINVAL, "unk_token '%s' is not in the vocabulary",
			               unk);
	}
	return parse_merges(t, json_object_get(model, "merges"), err);
}

/* "bos_token": "<s>" or {"content": "<s>", ...} */
static int config_token(const struct lp_tokenizer *t, const json_t *cfg, const char *key,
                        int32_t *id, struct lp_err *err)
{
	const json_t *v = json_object_get(cfg, key);
	const char *s;
	size_t len;

	if (!v || json_is_null(v))
		return 0;
	if (json_is_object(v))
		v = json_object_get(v, "content");
	if (!json_is_string(v))
		return lp_errf(err, -EINVAL, "tokenizer_config.json: '%s' is not a string", key);
	s = json_string_value(v);
	len = json_string_length(v);
	*id = tok_lookup(t, s, len);
	if (*id < 0)
		return lp_errf(err, -EINVAL,
		               "tokenizer_config.json: %s '%s' is not in the vocabulary", key, s);
	return 0;
}

static int parse_config(struct lp_tokenizer *t, const char *text, size_t len, struct lp_err *err)
{
	json_error_t jerr;
	json_t *cfg, *v;
	int rc;

	cfg = json_loadb(text, len, 0, &jerr);
	if (!cfg)
		return lp_errf(err, -EINVAL, "tokenizer_config.json: invalid json at line %d: %s",
		               jerr.line, jerr.text);
	if (!json_is_object(cfg)) {
		rc = lp_errf(err, -EINVAL, "tokenizer_config.json: not a json object");
		goto out_free;
	}
	if ((rc = config_token(t, cfg, "bos_token", &t->bos, err)) ||
	    (rc = config_token(t, cfg, "eos_token", &t->eos, err)))
		goto out_free;
	/* transformers' Llama tokenizers rebuild the post-processor from these */
	v = json_object_get(cfg, "add_bos_token");
	if (json_is_boolean(v)) {
		t->n_prefix = 0;
		if (json_is_true(v)) {
			if (t->bos < 0) {
				rc = lp_errf(
				    err, -EINVAL,
				    "tokenizer_config.json: add_bos_token without a bos_token");
				goto out_free;
			}
			t->prefix[t->n_prefix++] = t->bos;
		}
	}
	v = json_object_get(cfg, "add_eos_token");
	if (json_is_boolean(v)) {
		t->n_suffix = 0;
		if (json_is_true(v)) {
			if (t->eos < 0) {
				rc = lp_errf(
				    err, -EINVAL,
				    "tokenizer_config.json: add_eos_token without an eos_token");
				goto out_free;
			}
			t->suffix[t->n_suffix++] = t->eos;
		}
	}
	v = json_object_get(cfg, "chat_template");
	if (json_is_array(v)) {
		/* a list of named templates: take "default" */
		size_t i;
		const json_t *pick = NULL;

		for (i = 0; i < json_array_size(v); i++) {
			const char *name = jstr(json_array_get(v, i), "name", NULL);

			if (name && strcmp(name, "default") == 0)
				pick = json_object_get(json_array_get(v, i), "template");
		}
		v = (json_t *)pick;
	}
	if (json_is_string(v) && (rc = dup_text(&t->chat_template, NULL, json_string_value(v),
	                                        json_string_length(v), err)))
		goto out_free;
	rc = 0;
out_free:
	json_decref(cfg);
	return rc;
}

static struct lp_tokenizer *tok_new(void)
{
	struct lp_tokenizer *t = calloc(1, sizeof(*t));

	if (!t)
		return NULL;
	t->unk = -1;
	t->bos = -1;
	t->eos = -1;
	tok_byte_table(t);
	return t;
}

int lp_tokenizer_from_json(struct lp_tokenizer **out, const char *json, size_t len,
                           const char *config_json, size_t config_len, struct lp_err *err)
{
	struct lp_tokenizer *t;
	json_error_t jerr;
	json_t *root;
	bool fused = false;
	size_t cap = 0;
	int rc;

	*out = NULL;
	root = json_loadb(json, len, 0, &jerr);
	if (!root)
		return lp_errf(err, -EINVAL, "tokenizer.json: invalid json at line %d: %s",
		               jerr.line, jerr.text);
	t = tok_new();
	if (!t) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out_root;
	}
	if (!json_is_object(root)) {
		rc = lp_errf(err, -EINVAL, "tokenizer.json: not a json object");
		goto out_free;
	}
	if ((rc = parse_model(t, root, &cap, err)) ||
	    (rc = parse_normalizer(t, json_object_get(root, "normalizer"), 0, err)) ||
	    (rc = parse_pre(t, json_object_get(root, "pre_tokenizer"), 0, err)) ||
	    (rc = parse_decoder(t, json_object_get(root, "decoder"), 0, &fused, err)) ||
	    (rc = parse_post(t, json_object_get(root, "post_processor"), 0, err)))
		goto out_prefix;
	find_byte_tokens(t);
	if ((rc = index_added(t, &cap, err)))
		goto out_free;
	if (t->n_prefix == 1)
		t->bos = t->prefix[0];
	if (config_json && (rc = parse_config(t, config_json, config_len, err)))
		goto out_free;
	json_decref(root);
	*out = t;
	return 0;
out_prefix:
	lp_err_prefix(err, "tokenizer.json");
out_free:
	lp_tokenizer_free(t);
out_root:
	json_decref(root);
	return rc;
}

/* ---- GGUF ---- */

static int gguf_id(const struct lp_gguf *g, const char *key, int32_t n, int32_t *id,
                   struct lp_err *err)
{
	uint32_t v;
	int rc = lp_gguf_get_u32(g, key, &v, err);

	if (rc == -ENOENT) {
		lp_err_clear(err);
		return 0;
	}
	if (rc)
		return rc;
	if (v >= (uint32_t)n)
		return lp_errf(err, -EINVAL, "%s %u is outside the vocabulary", key, v);
	*id = (int32_t)v;
	return 0;
}

static int gguf_bool(const struct lp_gguf *g, const char *key, bool def, bool *out,
                     struct lp_err *err)
{
	int rc = lp_gguf_get_bool(g, key, out, err);

	if (rc == -ENOENT) {
		lp_err_clear(err);
		*out = def;
		return 0;
	}
	return rc;
}

/* the pre-tokenizer a GGUF `tokenizer.ggml.pre` name stands for */
static int gguf_pre(struct lp_tokenizer *t, const struct lp_gguf *g, struct lp_err *err)
{
	struct lp_gguf_str pre;
	char name[64];
	int rc;

	rc = lp_gguf_get_str(g, "tokenizer.ggml.pre", &pre, err);
	if (rc == -ENOENT) {
		lp_err_clear(err);
		pre.s = "default";
		pre.len = 7;
	} else if (rc) {
		return rc;
	}
	snprintf(name, sizeof(name), "%.*s", (int)(pre.len < 60 ? pre.len : 60), pre.s);
	if (strcmp(name, "smollm") == 0) {
		if ((rc = add_pre_split(t, "\\p{N}", 5, false, SPLIT_ISOLATED, false, err)))
			return rc;
		return add_pre_byte_level(t, false, true, err);
	}
	if (strcmp(name, "default") == 0 || strcmp(name, "gpt2") == 0 || strcmp(name, "gpt-2") == 0)
		return add_pre_byte_level(t, false, true, err);
	if (strcmp(name, "llama-bpe") == 0 || strcmp(name, "llama3") == 0 ||
	    strcmp(name, "llama-v3") == 0) {
		if ((rc = add_pre_split(t, RE_LLAMA3, strlen(RE_LLAMA3), false, SPLIT_ISOLATED,
		                        false, err)))
			return rc;
		return add_pre_byte_level(t, false, false, err);
	}
	if (strcmp(name, "qwen2") == 0) {
		if ((rc = add_pre_split(t, RE_QWEN2, strlen(RE_QWEN2), false, SPLIT_ISOLATED, false,
		                        err)))
			return rc;
		return add_pre_byte_level(t, false, false, err);
	}
	return lp_errf(err, -ENOTSUP, "pre-tokenizer 'tokenizer.ggml.pre' = '%s' is not supported",
	               name);
}

static int gguf_vocab(struct lp_tokenizer *t, const struct lp_gguf *g, bool spm, size_t *cap,
                      struct lp_err *err)
{
	const struct lp_gguf_kv *toks, *types = NULL;
	size_t n_special = 0;
	uint64_t i;
	int rc;

	if ((rc = lp_gguf_get_arr(g, "tokenizer.ggml.tokens", LP_GGUF_STRING, &toks, err)))
		return rc;
	if ((rc = vocab_alloc(t, toks->arr_len, err)))
		return rc;
	rc = lp_gguf_get_arr(g, "tokenizer.ggml.token_type", LP_GGUF_I32, &types, err);
	if (rc == -ENOENT) {
		lp_err_clear(err);
		types = NULL;
	} else if (rc) {
		return rc;
	} else if (types->arr_len != toks->arr_len) {
		return lp_errf(err, -EINVAL, "tokenizer.ggml.token_type has %llu entries, not %llu",
		               (unsigned long long)types->arr_len,
		               (unsigned long long)toks->arr_len);
	}
	for (i = 0; i < toks->arr_len; i++) {
		if ((rc = vocab_set(t, cap, (int64_t)i, toks->arr_strs[i].s,
		                    (size_t)toks->arr_strs[i].len, false, err)))
			return rc;
	}
	/* control (3), user-defined (4) and for SentencePiece unknown (2)
	 * tokens are matched in the text before the model runs */
	for (i = 0; types && i < types->arr_len; i++) {
		int32_t ty = lp_gguf_arr_i32(types, i);

		if (ty == 3 || ty == 4 || (spm && ty == 2))
			n_special++;
	}
	if (n_special > TOK_MAX_ADDED)
		return lp_errf(err, -E2BIG, "%zu control tokens is more than %d", n_special,
		               TOK_MAX_ADDED);
	if (n_special) {
		t->added = calloc(n_special, sizeof(*t->added));
		if (!t->added)
			return lp_errf(err, -ENOMEM, "out of memory for added tokens");
	}
	for (i = 0; types && i < types->arr_len; i++) {
		int32_t ty = lp_gguf_arr_i32(types, i);
		struct tok_added *ad;

		if (!(ty == 3 || ty == 4 || (spm && ty == 2)) || t->tok_len[i] == 0)
			continue;
		ad = &t->added[t->n_added++];
		ad->id = (int32_t)i;
		ad->off = t->tok_off[i];
		ad->len = t->tok_len[i];
		ad->special = ty != 4;
		t->tok_flags[i] |= TOK_F_ADDED | (ad->special ? TOK_F_SPECIAL : 0);
	}
	return vocab_finish(t, err);
}

static int gguf_add_norm(struct lp_tokenizer *t, enum tok_norm_type type, const char *pat,
                         const char *text, struct lp_err *err)
{
	struct tok_norm *n = &t->norm[t->n_norm];
	int rc;

	n->type = type;
	if ((rc = dup_text(&n->text, &n->text_len, text, strlen(text), err)))
		return rc;
	t->n_norm++;
	if (pat)
		return compile_re(&n->re, pat, strlen(pat), true, err);
	return 0;
}

static int gguf_add_dec(struct lp_tokenizer *t, enum tok_dec_type type, const char *pattern,
                        const char *content, struct lp_err *err)
{
	struct tok_dec *d = &t->dec[t->n_dec];
	int rc;

	memset(d, 0, sizeof(*d));
	d->type = type;
	t->n_dec++;
	if (pattern && (rc = dup_text(&d->pattern, &d->pattern_len, pattern, strlen(pattern), err)))
		return rc;
	if (content && (rc = dup_text(&d->content, &d->content_len, content, strlen(content), err)))
		return rc;
	return 0;
}

static int gguf_spm(struct lp_tokenizer *t, const struct lp_gguf *g, struct lp_err *err)
{
	const struct lp_gguf_kv *scores;
	bool space_prefix;
	uint64_t i;
	int rc;

	if ((rc = lp_gguf_get_arr(g, "tokenizer.ggml.scores", LP_GGUF_F32, &scores, err)))
		return rc;
	if (scores->arr_len != (uint64_t)t->n_vocab)
		return lp_errf(err, -EINVAL, "tokenizer.ggml.scores has %llu entries, not %d",
		               (unsigned long long)scores->arr_len, t->n_vocab);
	t->scores = malloc((size_t)t->n_vocab * sizeof(*t->scores));
	if (!t->scores)
		return lp_errf(err, -ENOMEM, "out of memory for token scores");
	for (i = 0; i < scores->arr_len; i++)
		t->scores[i] = lp_gguf_arr_f32(scores, i);
	t->model = TOK_MODEL_SPM;
	t->byte_fallback = true;
	if ((rc = gguf_bool(g, "tokenizer.ggml.add_space_prefix", true, &space_prefix, err)))
		return rc;
	/* what HF's converted Llama tokenizer.json does: a normalizer that
	 * prepends and replaces spaces with U+2581; the decoder undoes it */
	if (space_prefix && (rc = gguf_add_norm(t, NORM_PREPEND, NULL, METASPACE, err)))
		return rc;
	if ((rc = gguf_add_norm(t, NORM_REPLACE, " ", METASPACE, err)))
		return rc;
	if ((rc = gguf_add_dec(t, DEC_REPLACE, METASPACE, " ", err)) ||
	    (rc = gguf_add_dec(t, DEC_BYTE_FALLBACK, NULL, NULL, err)) ||
	    (rc = gguf_add_dec(t, DEC_FUSE, NULL, NULL, err)))
		return rc;
	t->dec_per_byte_invalid = true;
	if (space_prefix) {
		if ((rc = gguf_add_dec(t, DEC_STRIP, NULL, " ", err)))
			return rc;
		t->dec[t->n_dec - 1].start = 1;
		t->dec[t->n_dec - 1].after_fuse = true;
		t->dec_stream_strip = true;
		t->dec_strip_char[0] = ' ';
		t->dec_strip_len = 1;
		t->dec_strip_start = 1;
	}
	return 0;
}

static int gguf_bpe(struct lp_tokenizer *t, const struct lp_gguf *g, struct lp_err *err)
{
	const struct lp_gguf_kv *merges;
	uint64_t i;
	int rc;

	if ((rc = lp_gguf_get_arr(g, "tokenizer.ggml.merges", LP_GGUF_STRING, &merges, err)))
		return rc;
	if ((rc = merges_alloc(t, merges->arr_len, err)))
		return rc;
	for (i = 0; i < merges->arr_len; i++)
		if ((rc = merge_add_line(t, merges->arr_strs[i].s, (size_t)merges->arr_strs[i].len,
		                         (uint32_t)i, err)))
			return rc;
	t->model = TOK_MODEL_BPE;
	if ((rc = gguf_pre(t, g, err)))
		return rc;
	return gguf_add_dec(t, DEC_BYTE_LEVEL, NULL, NULL, err);
}

int lp_tokenizer_from_gguf(struct lp_tokenizer **out, const struct lp_gguf *g, struct lp_err *err)
{
	struct lp_tokenizer *t;
	struct lp_gguf_str model, tmpl;
	bool spm, add_bos, add_eos;
	size_t cap = 0;
	int rc;

	*out = NULL;
	if ((rc = lp_gguf_get_str(g, "tokenizer.ggml.model", &model, err)))
		return rc;
	if (model.len == 4 && memcmp(model.s, "gpt2", 4) == 0)
		spm = false;
	else if (model.len == 5 && memcmp(model.s, "llama", 5) == 0)
		spm = true;
	else
		return lp_errf(err, -ENOTSUP, "tokenizer model '%.*s' is not supported",
		               (int)(model.len < 64 ? model.len : 64), model.s);
	t = tok_new();
	if (!t)
		return lp_errf(err, -ENOMEM, "out of memory");
	if ((rc = gguf_vocab(t, g, spm, &cap, err)) ||
	    (rc = spm ? gguf_spm(t, g, err) : gguf_bpe(t, g, err)))
		goto out_free;
	if ((rc = gguf_id(g, "tokenizer.ggml.bos_token_id", t->n_vocab, &t->bos, err)) ||
	    (rc = gguf_id(g, "tokenizer.ggml.eos_token_id", t->n_vocab, &t->eos, err)) ||
	    (rc = gguf_id(g, "tokenizer.ggml.unknown_token_id", t->n_vocab, &t->unk, err)) ||
	    (rc = gguf_bool(g, "tokenizer.ggml.add_bos_token", spm, &add_bos, err)) ||
	    (rc = gguf_bool(g, "tokenizer.ggml.add_eos_token", false, &add_eos, err)))
		goto out_free;
	if (!spm)
		t->unk = -1; /* byte-level: every byte has a token */
	if (add_bos && t->bos >= 0)
		t->prefix[t->n_prefix++] = t->bos;
	if (add_eos && t->eos >= 0)
		t->suffix[t->n_suffix++] = t->eos;
	rc = lp_gguf_get_str(g, "tokenizer.chat_template", &tmpl, err);
	if (rc == 0) {
		if ((rc = dup_text(&t->chat_template, NULL, tmpl.s, (size_t)tmpl.len, err)))
			goto out_free;
	} else if (rc == -ENOENT) {
		lp_err_clear(err);
	} else {
		goto out_free;
	}
	find_byte_tokens(t);
	if ((rc = index_added(t, &cap, err)))
		goto out_free;
	*out = t;
	return 0;
out_free:
	lp_tokenizer_free(t);
	return rc;
}

void lp_tokenizer_free(struct lp_tokenizer *t)
{
	int i;

	if (!t)
		return;
	for (i = 0; i < t->n_norm; i++) {
		pcre2_code_free(t->norm[i].re);
		free(t->norm[i].text);
	}
	for (i = 0; i < t->n_pre; i++)
		pcre2_code_free(t->pre[i].re);
	for (i = 0; i < t->n_dec; i++) {
		free(t->dec[i].pattern);
		free(t->dec[i].content);
	}
	free(t->strtab);
	free(t->tok_off);
	free(t->tok_len);
	free(t->tok_flags);
	free(t->dec_off);
	free(t->dec_len);
	free(t->scores);
	free(t->vocab.slots);
	free(t->merges.keys);
	free(t->merges.ranks);
	free(t->merges.new_ids);
	free(t->added);
	pcre2_code_free(t->word_re);
	free(t->chat_template);
	free(t);
}
