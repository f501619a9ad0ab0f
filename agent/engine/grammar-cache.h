/* Parsed grammars by their text, so that requests with the same schema
 * share one grammar and with it the masks its positions have met (a
 * grammar's mask cache is what makes constrained decoding cheap; building
 * it again for every request would cost each one a few milliseconds per
 * position). The least recently used grammar goes first beyond the
 * capacity. Thread-safe: HTTP threads look grammars up while the engine
 * thread fills their masks (grammar.h says who touches what). */
#ifndef LP_ENGINE_GRAMMAR_CACHE_H
#define LP_ENGINE_GRAMMAR_CACHE_H

#include <stddef.h>

#include "agent/engine/grammar.h"
#include "common/err.h"

struct lp_grammar_cache;

/* capacity: grammars kept (>= 1). */
int lp_grammar_cache_new(struct lp_grammar_cache **out, int capacity, struct lp_err *err);
/* Drops the cache's references; grammars in use live on. NULL is fine. */
void lp_grammar_cache_free(struct lp_grammar_cache *c);
/* The grammar of text[0..len) (borrowed): the cached one, or a newly
 * parsed one (then cached). *out holds a reference for the caller
 * (lp_grammar_unref). Errors are lp_grammar_parse's, never cached. c may
 * be NULL: then every call parses. */
int lp_grammar_cache_get(struct lp_grammar_cache *c, const char *text, size_t len,
                         struct lp_grammar **out, struct lp_err *err);

#endif
