/* The tokenizer's internal layout, shared by tokenizer.c (encoding),
 * tokenizer-load.c (building it from tokenizer.json or GGUF metadata) and
 * tokenizer-decode.c (the streaming decoder). Not a public header.
 *
 * A tokenizer is the HF `tokenizers` pipeline reduced to the components
 * that the supported models use:
 *   added tokens -> normalizers -> pre-tokenizers -> model -> post-processor
 * and for decoding a chain of per-token decoder steps. */
#ifndef LP_ENGINE_TOKENIZER_INTERNAL_H
#define LP_ENGINE_TOKENIZER_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8

#include <pcre2.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "agent/engine/tokenizer.h"

#define TOK_MAX_VOCAB       (1 << 22) /* ids fit in 22 bits */
#define TOK_MAX_MERGES      (1 << 22)
#define TOK_MAX_ADDED       65536
#define TOK_MAX_TOKEN_BYTES 1024 /* longest token text accepted */
#define TOK_MAX_STEPS       16   /* normalizer / pre-tokenizer / decoder steps */
#define TOK_MAX_SPECIALS    8    /* ids the post-processor adds on each side */
#define TOK_MAX_NESTING     4    /* Sequence inside Sequence */

/* token flags */
#define TOK_F_SPECIAL 1u /* an added token marked special */
#define TOK_F_ADDED   2u /* an added token */
#define TOK_F_NORM    4u /* decodes as its normalized content (dec_off/dec_len) */

enum tok_model {
	TOK_MODEL_BPE, /* merges ranked by their order (tokenizer.json, GGUF gpt2) */
	TOK_MODEL_SPM, /* SentencePiece BPE: pairs ranked by token score (GGUF llama) */
};

struct tok_added {
	int32_t id;
	uint32_t off, len;   /* text matched, in strtab: the content, normalized
	                        for a `normalized` token (HF's normalized trie) */
	unsigned char first; /* its first byte */
	bool special, lstrip, rstrip, normalized, single_word;
};

enum tok_norm_type {
	NORM_PREPEND, /* text: the prefix */
	NORM_REPLACE, /* re (literal or regex) -> text */
	NORM_NFC,     /* Unicode Normalization Form C (unicode-nfc.c) */
};

struct tok_norm {
	enum tok_norm_type type;
	pcre2_code *re;
	char *text;
	size_t text_len;
};

enum tok_split_behavior {
	SPLIT_REMOVED,
	SPLIT_ISOLATED,
	SPLIT_MERGED_PREV,
	SPLIT_MERGED_NEXT,
	SPLIT_CONTIGUOUS,
};

enum tok_pre_type {
	PRE_SPLIT,      /* re with behavior/invert (Split, Digits) */
	PRE_BYTE_LEVEL, /* optional space prefix, then re (GPT-2 regex) if any */
	PRE_METASPACE,  /* ' ' -> repl, prepend repl, split before repl (re) */
};

enum tok_prepend {
	PREPEND_NEVER,
	PREPEND_FIRST,
	PREPEND_ALWAYS,
};

struct tok_pre {
	enum tok_pre_type type;
	pcre2_code *re; /* NULL: no split */
	enum tok_split_behavior behavior;
	bool invert;
	bool add_prefix_space;
	char repl[8]; /* Metaspace replacement, UTF-8 */
	size_t repl_len;
	enum tok_prepend prepend;
};

enum tok_dec_type {
	DEC_REPLACE,       /* pattern -> content in each token */
	DEC_BYTE_LEVEL,    /* GPT-2 code points back to bytes */
	DEC_BYTE_FALLBACK, /* "<0xNN>" tokens to the byte */
	DEC_FUSE,          /* tokens form one string from here on */
	DEC_STRIP,         /* strip content: per token, or at the stream start after Fuse */
	DEC_METASPACE,     /* repl -> ' ', dropped in the first token */
};

struct tok_dec {
	enum tok_dec_type type;
	char *pattern;
	size_t pattern_len;
	char *content;
	size_t content_len;
	int start, stop; /* Strip */
	bool after_fuse; /* Strip */
	bool prepend;    /* Metaspace: the first token loses its replacement */
};

struct tok_strmap {     /* open addressing: string -> id */
	int32_t *slots; /* id, or -1 when empty */
	uint32_t mask;
};

struct tok_mergemap {   /* open addressing: (left id, right id) -> rank, new id */
	uint64_t *keys; /* left << 32 | right, or UINT64_MAX when empty */
	uint32_t *ranks;
	int32_t *new_ids;
	uint32_t mask;
};

struct lp_tokenizer {
	enum tok_model model;
	int32_t n_vocab;
	char *strtab; /* every token's text, NUL-terminated */
	size_t strtab_len;
	uint32_t *tok_off;  /* (n_vocab) */
	uint32_t *tok_len;  /* (n_vocab) */
	uint8_t *tok_flags; /* (n_vocab) TOK_F_* */
	uint32_t *dec_off;  /* (n_vocab) or NULL: text decoded for TOK_F_NORM ids */
	uint32_t *dec_len;
	float *scores; /* (n_vocab) TOK_MODEL_SPM only */
	struct tok_strmap vocab;
	struct tok_mergemap merges;

	bool byte_level; /* the model sees bytes through the GPT-2 table */
	bool byte_fallback, fuse_unk, ignore_merges;
	int32_t unk;               /* -1 if none */
	int32_t byte_id[256];      /* "<0xNN>" tokens, -1 if absent */
	int32_t byte_char_id[256]; /* byte-level: token of the byte's code point */
	uint16_t byte_cp[256];     /* GPT-2 bytes-to-unicode table */
	int16_t cp_byte[324];      /* its inverse (-1: no byte) */

	struct tok_norm norm[TOK_MAX_STEPS];
	int n_norm;
	struct tok_pre pre[TOK_MAX_STEPS];
	int n_pre;
	struct tok_dec dec[TOK_MAX_STEPS];
	int n_dec;
	bool dec_stream_strip; /* a Strip after Fuse: strip the first token's start */
	char dec_strip_char[8];
	size_t dec_strip_len;
	int dec_strip_start;
	bool dec_per_byte_invalid; /* ByteFallback: one U+FFFD per bad byte */

	struct tok_added *added; /* sorted by first byte, then longest first */
	int n_added;
	uint32_t added_bucket[257]; /* added[bucket[b]..bucket[b+1]) start with byte b */
	bool any_normalized_added;
	pcre2_code *word_re; /* a word character, when a token is single_word */

	int32_t prefix[TOK_MAX_SPECIALS]; /* ids added before the text */
	int n_prefix;
	int32_t suffix[TOK_MAX_SPECIALS]; /* ids added after the text */
	int n_suffix;
	int32_t bos, eos;
	char *chat_template;
};

/* The text of token id (valid id). */
static inline const char *tok_text(const struct lp_tokenizer *t, int32_t id, size_t *len)
{
	*len = t->tok_len[id];
	return t->strtab + t->tok_off[id];
}

/* Runs the normalizers on s[0..len); *out (malloc'd, caller frees) gets the
 * result. */
int tok_normalize(const struct lp_tokenizer *t, const char *s, size_t len, char **out,
                  size_t *out_len, struct lp_err *err);

/* String -> id lookup; -1 when absent. */
int32_t tok_lookup(const struct lp_tokenizer *t, const char *s, size_t len);
/* Merge of (a, b): returns its rank and sets *new_id, or returns UINT32_MAX. */
uint32_t tok_merge_rank(const struct lp_tokenizer *t, int32_t a, int32_t b, int32_t *new_id);

/* Fills t->byte_cp and t->cp_byte (GPT-2's bytes-to-unicode table). */
void tok_byte_table(struct lp_tokenizer *t);

#endif
