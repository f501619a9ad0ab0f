/* Grammars for constrained decoding: a context-free grammar over bytes,
 * written in a small GBNF-like text, a matcher that follows one output
 * through it, and the token masks that keep a sequence's output a valid
 * prefix of the grammar's language.
 *
 * The text (docs/api.md, "Grammars"):
 *
 *   # a comment runs to the end of the line
 *   root   ::= "{" ws pair ( "," ws pair )* "}"
 *   pair   ::= string ws ":" ws [0-9]+
 *   string ::= "\"" ( [^"\\\x00-\x1f] | "\\" ["\\/bfnrt] )* "\""
 *   ws     ::= " "?
 *
 * - A rule is `name ::= alternatives`; names are [A-Za-z0-9_-]+; the
 *   grammar's language is that of the rule named `root`. A definition may
 *   span lines; the next one starts where a name is followed by `::=`.
 * - Alternatives are separated by `|`; each is a sequence of items (an
 *   empty sequence matches the empty string).
 * - Items: "literal", [class], [^class], `.` (any character), a rule name,
 *   ( group ); each may be followed by ?, *, +, {m}, {m,} or {m,n}
 *   (n <= LP_GRAMMAR_MAX_REPEAT).
 * - Literals and classes are Unicode code points matched as their UTF-8
 *   bytes; escapes: \" \\ \] \[ \- \^ \/ \n \r \t \b \f, \xHH (U+00HH),
 *   \uHHHH and \UHHHHHHHH (a surrogate is an error). `.` and negated
 *   classes match any scalar value (U+0000..U+10FFFF less the
 *   surrogates) the class leaves.
 * - Refused with a message naming the place: undefined rules, a missing
 *   root, left recursion (a rule that can reach itself without matching
 *   a byte, `x*` with an x that matches "" included), more than
 *   LP_GRAMMAR_MAX_ELEMENTS elements once repetitions are expanded.
 *
 * Matching keeps a set of stacks (a pushdown automaton, as llama.cpp's
 * grammar sampler does); the stacks of an accepted output are cut
 * to the live ones after each token.
 *
 * Masks (lp_grammar_matcher_fill_mask) follow xgrammar's split: for each
 * grammar position that can be the top of a stack, the tokens are sorted
 * by their bytes and walked once, sharing prefixes, from that position
 * alone; a token is then accepted whatever lies below the top, rejected
 * whatever lies below, or uncertain (it leaves the position's rule, so
 * what follows depends on the rest of the stack). The first two are a
 * cached bitset; only the uncertain ones are walked again, with the full
 * stacks, when a mask is asked for.
 *
 * Threads: a grammar is immutable once parsed except for its mask cache,
 * which only the thread that fills masks (the engine thread) touches;
 * lp_grammar_match and matchers used without masks may run anywhere. */
#ifndef LP_ENGINE_GRAMMAR_H
#define LP_ENGINE_GRAMMAR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/err.h"

struct lp_tokenizer;

#define LP_GRAMMAR_MAX_TEXT     ((size_t)4 << 20) /* bytes of grammar text */
#define LP_GRAMMAR_MAX_ELEMENTS (1 << 20)
#define LP_GRAMMAR_MAX_REPEAT   1000
/* Stacks a matcher may hold at once; more fails the match (an ambiguous
 * grammar) rather than growing without bound. */
#define LP_GRAMMAR_MAX_STACKS 4096
/* Bytes of masks a grammar keeps (its cache); positions met past it get
 * their mask built each time. */
#define LP_GRAMMAR_CACHE_BYTES ((size_t)32 << 20)

struct lp_grammar;

/* Parses text[0..len) (borrowed). *out has one reference; drop it with
 * lp_grammar_unref. -EINVAL with the line and what is wrong. */
int lp_grammar_parse(struct lp_grammar **out, const char *text, size_t len, struct lp_err *err);
/* Another reference to g (the engine's sequences hold one each). */
struct lp_grammar *lp_grammar_ref(struct lp_grammar *g);
/* Drops a reference; frees g with the last. NULL is fine. */
void lp_grammar_unref(struct lp_grammar *g);

/* Whether s[0..n) is in g's language: 1 it is (complete), 0 it is a
 * proper prefix of a string that is, -1 neither. For tests and tools. */
int lp_grammar_match(const struct lp_grammar *g, const void *s, size_t n);

/* The model's tokens as byte strings, sorted, for masks: one per model
 * (the tokenizer's bytes of each id, lp_detok_token_bytes). Special tokens
 * and ids past the tokenizer's vocabulary never pass a mask; the eos ids
 * pass exactly where the grammar may end. */
struct lp_grammar_vocab;

/* n_vocab: the model's logit rows (may exceed the tokenizer's). tok and
 * eos are borrowed; tok must outlive the vocabulary. */
int lp_grammar_vocab_new(struct lp_grammar_vocab **out, const struct lp_tokenizer *tok,
                         int32_t n_vocab, const int32_t *eos, int n_eos, struct lp_err *err);
void lp_grammar_vocab_free(struct lp_grammar_vocab *v);
/* 32-bit words of a mask: (n_vocab + 31) / 32. Bit t % 32 of word t / 32
 * is token t. */
size_t lp_grammar_vocab_mask_words(const struct lp_grammar_vocab *v);

/* One output's place in a grammar. */
struct lp_grammar_matcher;

/* A matcher at the start of g (holds a reference to g). */
int lp_grammar_matcher_new(struct lp_grammar_matcher **out, struct lp_grammar *g,
                           struct lp_err *err);
void lp_grammar_matcher_free(struct lp_grammar_matcher *m);
/* Feeds bytes: true and advanced when s[0..n) keeps the output a valid
 * prefix; false and unchanged when not (or when the stacks would exceed
 * LP_GRAMMAR_MAX_STACKS). */
bool lp_grammar_matcher_accept_bytes(struct lp_grammar_matcher *m, const void *s, size_t n);
/* True when the output so far is a complete string of the language. */
bool lp_grammar_matcher_can_end(const struct lp_grammar_matcher *m);
/* True when nothing but the end can follow (only eos passes a mask), or
 * when a mask found that no token spells what must come next (a
 * vocabulary without some character: the output ends there). */
bool lp_grammar_matcher_must_end(const struct lp_grammar_matcher *m);

/* The tokens that may come next: mask[lp_grammar_vocab_mask_words(v)]
 * gets bit t set when token t's bytes keep the output a valid prefix, and
 * the eos bits when the output may end (or when no token can continue:
 * then only eos, and lp_grammar_matcher_must_end says so). Never allocates once the
 * grammar's cache holds every position it meets (the first time a
 * position is met, its entry is built). -ENOMEM, or -EINVAL when v is not
 * the vocabulary the grammar's cache was built for. */
int lp_grammar_matcher_fill_mask(struct lp_grammar_matcher *m, const struct lp_grammar_vocab *v,
                                 uint32_t *mask, struct lp_err *err);
/* Advances by token t (an eos id is accepted when the output may end and
 * changes nothing). -EINVAL when t does not pass the mask. */
int lp_grammar_matcher_accept_token(struct lp_grammar_matcher *m, const struct lp_grammar_vocab *v,
                                    int32_t t, struct lp_err *err);

#endif
