/* JSON Schema to grammar text: the rules (agent/engine/grammar.h's
 * syntax) of a grammar whose language is the JSON texts that a schema
 * accepts, for response_format json_schema / json_object and tool
 * arguments. The subset and its choices are in docs/api.md, "Structured
 * output: the JSON Schema subset". Every keyword outside the subset is an
 * error that names it and where it is (a JSON pointer such as
 * /properties/age), never a silent ignore.
 *
 * What the rules generate:
 * - whitespace between tokens is nothing, one space, or one newline and
 *   up to LP_JSON_SCHEMA_MAX_INDENT spaces; none before or after the value;
 * - numbers have at most LP_JSON_SCHEMA_INT_DIGITS integer digits,
 *   LP_JSON_SCHEMA_FRAC_DIGITS fraction digits, LP_JSON_SCHEMA_EXP_DIGITS
 *   exponent digits;
 * - properties in the schema's order; additionalProperties absent is
 *   taken as false where properties are listed (any object where none
 *   are); extra property names never equal a listed one;
 * - strings never hold \u0000 or a lone surrogate escape.
 *
 * Rule names all start with the caller's prefix, so that several schemas
 * (tools) can share one grammar. Pure functions: thread-safe. */
#ifndef LP_ENGINE_JSON_SCHEMA_H
#define LP_ENGINE_JSON_SCHEMA_H

#include <jansson.h>

#include "common/buf.h"
#include "common/err.h"

#define LP_JSON_SCHEMA_MAX_INDENT  20
#define LP_JSON_SCHEMA_INT_DIGITS  16
#define LP_JSON_SCHEMA_FRAC_DIGITS 16
#define LP_JSON_SCHEMA_EXP_DIGITS  3
/* Schemas nested deeper than this (through properties, items, anyOf,
 * $ref, ...) are refused. */
#define LP_JSON_SCHEMA_MAX_DEPTH 64
/* minItems, maxItems, minLength, maxLength and pattern repetition counts
 * above this are refused (the grammar's LP_GRAMMAR_MAX_REPEAT). */
#define LP_JSON_SCHEMA_MAX_COUNT 1000
/* Longest rule-name prefix. */
#define LP_JSON_SCHEMA_MAX_PREFIX 64

/* Appends to out the rules of a grammar for the JSON texts valid against
 * schema (borrowed; a JSON object or true/false). The rule names all start
 * with prefix ([A-Za-z0-9_-]*, at most LP_JSON_SCHEMA_MAX_PREFIX bytes),
 * and the value's rule is "<prefix>root". Does not define "root": the
 * caller writes `root ::= <prefix>root` (so that one grammar can embed
 * several schemas with different prefixes).
 * -EINVAL with err naming the keyword and where it is as a JSON pointer
 * ("unsupported keyword 'not' at /properties/age", "'$ref' '#/$defs/x' not
 * found at /items"); -E2BIG when out's cap is reached; -ENOMEM. On failure
 * out is as it was before the call. */
int lp_json_schema_grammar(const json_t *schema, const char *prefix, struct lp_buf *out,
                           struct lp_err *err);

/* The same for any JSON object (response_format json_object): the rule
 * "<prefix>root" and its helpers. */
int lp_json_object_grammar(const char *prefix, struct lp_buf *out, struct lp_err *err);

/* The same for any JSON value. */
int lp_json_value_grammar(const char *prefix, struct lp_buf *out, struct lp_err *err);

#endif
