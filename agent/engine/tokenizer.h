/* Tokenizer: byte-level BPE (GPT-2 style, with the pre-tokenizer regex of
 * the model's tokenizer.json or GGUF `tokenizer.ggml.pre`) and
 * SentencePiece-style BPE with byte fallback (Llama 2, Mistral), built from
 * an HF tokenizer.json or from the tokenizer stored in GGUF metadata.
 * Added/special tokens are matched before the model runs. Output equals HF
 * `tokenizers` on the committed corpus (tests/fixtures/tokenizer/). */
#ifndef LP_ENGINE_TOKENIZER_H
#define LP_ENGINE_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/err.h"

struct lp_gguf;
struct lp_tokenizer;

/* A growable array of token ids owned by the caller. */
struct lp_tokens {
	int32_t *ids;
	size_t n;
	size_t cap;
};

void lp_tokens_release(struct lp_tokens *t);
int lp_tokens_push(struct lp_tokens *t, int32_t id, struct lp_err *err);

/* Builds a tokenizer from the text of a tokenizer.json (borrowed; not kept)
 * and, optionally, the text of tokenizer_config.json (may be NULL; used for
 * add_bos_token / add_eos_token / bos, eos token names and chat_template).
 * Free with lp_tokenizer_free(). */
int lp_tokenizer_from_json(struct lp_tokenizer **out, const char *json, size_t len,
                           const char *config_json, size_t config_len, struct lp_err *err);
/* Builds a tokenizer from GGUF metadata (tokenizer.ggml.*). */
int lp_tokenizer_from_gguf(struct lp_tokenizer **out, const struct lp_gguf *g, struct lp_err *err);
void lp_tokenizer_free(struct lp_tokenizer *tok);

enum lp_encode_flags {
	/* add BOS/EOS as the model's post-processor does (HF add_special_tokens) */
	LP_ENCODE_ADD_SPECIAL = 1 << 0,
	/* recognise special added tokens written in the text (HF always does
	 * this; without the flag, special tokens in text are encoded as text) */
	LP_ENCODE_PARSE_SPECIAL = 1 << 1,
};

/* Appends the ids of text[0..len) to out. Invalid UTF-8 is encoded as
 * U+FFFD the way HF does, never an error. */
int lp_tokenizer_encode(const struct lp_tokenizer *tok, const char *text, size_t len,
                        unsigned flags, struct lp_tokens *out, struct lp_err *err);

int32_t lp_tokenizer_vocab_size(const struct lp_tokenizer *tok);
int32_t lp_tokenizer_bos(const struct lp_tokenizer *tok); /* -1 if none */
int32_t lp_tokenizer_eos(const struct lp_tokenizer *tok); /* -1 if none */
bool lp_tokenizer_is_special(const struct lp_tokenizer *tok, int32_t id);
/* Id of the token whose text is exactly s, or -1. */
int32_t lp_tokenizer_find(const struct lp_tokenizer *tok, const char *s);
/* The chat template string from the file (tokenizer_config.json or GGUF
 * tokenizer.chat_template), or NULL. Owned by the tokenizer. */
const char *lp_tokenizer_chat_template(const struct lp_tokenizer *tok);

/* Streaming decoder: feed ids one at a time, get back only complete UTF-8.
 * Initialise with lp_detok_init(); no allocation. */
struct lp_detok {
	unsigned char pending[8]; /* bytes of an incomplete UTF-8 sequence */
	int n_pending;
	bool started;      /* a piece was already emitted */
	bool skip_special; /* special tokens produce no text */
};

void lp_detok_init(struct lp_detok *d, bool skip_special);
/* Writes the text that id completes to out (at most cap bytes; cap >= 256
 * is always enough for one id) and returns its length, or a negative code
 * for an id out of range. Bytes that cannot form valid UTF-8 come out as
 * U+FFFD, as HF's decode does. */
int lp_detok_piece(const struct lp_tokenizer *tok, struct lp_detok *d, int32_t id, char *out,
                   size_t cap);
/* Flushes an incomplete sequence at the end (as U+FFFD). */
int lp_detok_flush(const struct lp_tokenizer *tok, struct lp_detok *d, char *out, size_t cap);

/* The bytes of id alone, as the decoder chain gives them before UTF-8
 * assembly (special tokens included, not in first position): a token
 * that holds part of a character gives that part, not U+FFFD. Writes at
 * most cap bytes (LP_TOKEN_BYTES_MAX is always enough) and returns how
 * many, or -EINVAL for an id out of range. */
#define LP_TOKEN_BYTES_MAX 4112
int lp_detok_token_bytes(const struct lp_tokenizer *tok, int32_t id, unsigned char *out,
                         size_t cap);
/* The text of id in the vocabulary (HF's convert_ids_to_tokens: "Ġthe",
 * "<0x0A>"), not NUL-terminated, its length in *len; borrowed from tok.
 * NULL for an id out of range. */
const char *lp_tokenizer_token_text(const struct lp_tokenizer *tok, int32_t id, size_t *len);

#endif
