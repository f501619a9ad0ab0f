/* JSON Schema -> grammar (agent/engine/json-schema.c): every keyword of the
 * subset compiled, parsed by the grammar parser and matched against texts
 * that must be accepted (1), be a valid prefix (0) or be rejected (-1);
 * every refused keyword's message. */
#include "tests/test.h"

#include <errno.h>
#include <time.h>

#include "agent/engine/grammar.h"
#include "agent/engine/json-schema.h"

struct tcase {
	int want; /* 1 complete, 0 a valid prefix, -1 rejected */
	const char *text;
};

/* Compiles schema (JSON text) with prefix "s-" under `root ::= s-root`;
 * the grammar, or NULL with the message in err. */
static struct lp_grammar *build(const char *schema, struct lp_buf *text, struct lp_err *err)
{
	json_error_t je;
	json_t *s = json_loads(schema, JSON_DECODE_ANY, &je);
	struct lp_grammar *g = NULL;

	lp_buf_init(text, LP_GRAMMAR_MAX_TEXT);
	if (!s) {
		lp_errf(err, -EINVAL, "test schema is not JSON: %s", je.text);
		return NULL;
	}
	if (!lp_buf_append(text, "root ::= s-root\n", 16, err) &&
	    !lp_json_schema_grammar(s, "s-", text, err))
		lp_grammar_parse(&g, text->data, text->len, err);
	json_decref(s);
	return g;
}

static int match(const struct lp_grammar *g, const char *s)
{
	return lp_grammar_match(g, s, strlen(s));
}

static void expect_cases(const char *schema, const struct tcase *cases)
{
	struct lp_buf text;
	struct lp_err err = {0};
	struct lp_grammar *g = build(schema, &text, &err);

	if (!g) {
		TEST_FAIL("schema %s: %s", schema, err.msg);
		lp_buf_release(&text);
		return;
	}
	for (const struct tcase *c = cases; c->text; c++) {
		int got = match(g, c->text);
		if (got != c->want) {
			TEST_FAIL("schema %s: '%s' gave %d, expected %d; grammar:\n%s", schema,
			          c->text, got, c->want, text.data);
			break;
		}
	}
	lp_grammar_unref(g);
	lp_buf_release(&text);
}

#define EXPECT(schema, ...) expect_cases(schema, (const struct tcase[]){__VA_ARGS__, {0, NULL}})

/* The schema is refused with a message containing want. */
static void expect_error(const char *schema, const char *want)
{
	struct lp_buf text;
	struct lp_err err = {0};
	struct lp_grammar *g = build(schema, &text, &err);

	if (g)
		TEST_FAIL("schema %s was accepted, expected an error with '%s'", schema, want);
	else if (!strstr(err.msg, want))
		TEST_FAIL("schema %s: error '%s', expected one with '%s'", schema, err.msg, want);
	else if (text.len != 16)
		TEST_FAIL("schema %s: the buffer was changed by a failed call", schema);
	lp_grammar_unref(g);
	lp_buf_release(&text);
}

static void test_primitive_types(void)
{
	EXPECT("{\"type\": \"string\"}", {1, "\"\""}, {1, "\"abc\""}, {0, "\"ab"}, {-1, "abc"},
	       {-1, "1"}, {-1, " \"a\""}, {-1, "\"a\" "});
	EXPECT("{\"type\": \"integer\"}", {1, "0"}, {1, "-12"}, {1, "1234567890123456"},
	       {-1, "12345678901234567"}, {-1, "01"}, {-1, "1.5"}, {-1, "1e3"}, {0, "-"},
	       {-1, "\"1\""});
	EXPECT("{\"type\": \"number\"}", {1, "0"}, {1, "-0.25"}, {1, "1.5e10"}, {1, "1E+3"},
	       {1, "12.0000000000000001"}, {-1, "1.00000000000000001"}, {-1, "1e1234"}, {-1, ".5"},
	       {0, "1."}, {-1, "+1"}, {-1, "NaN"});
	EXPECT("{\"type\": \"boolean\"}", {1, "true"}, {1, "false"}, {0, "tr"}, {-1, "null"},
	       {-1, "1"});
	EXPECT("{\"type\": \"null\"}", {1, "null"}, {0, "nul"}, {-1, "nulll"}, {-1, "false"});
	EXPECT("{\"type\": [\"string\", \"null\"]}", {1, "\"x\""}, {1, "null"}, {-1, "1"});
	EXPECT("{\"type\": [\"integer\", \"number\"]}", {1, "1"}, {1, "1.5"});
}

static void test_any_value(void)
{
	static const char *const schemas[] = {"{}", "true", "{\"title\": \"anything\"}"};
	for (int i = 0; i < 3; i++)
		EXPECT(schemas[i], {1, "1"}, {1, "\"s\""}, {1, "null"}, {1, "[1, {\"a\": [true]}]"},
		       {1, "{\"a\":{\"b\":[]}}"}, {1, "{\n  \"a\": 1\n}"}, {0, "{\"a\""},
		       {-1, "{a: 1}"}, {-1, "[1,]"});
	expect_error("false", "schema false at / matches nothing");
	expect_error("{\"properties\": {\"a\": false}}", "at /properties/a");
}

static void test_object_required_optional(void)
{
	/* optional, required, optional: every combination's commas */
	const char *s = "{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"},"
	                " \"b\": {\"type\": \"integer\"}, \"c\": {\"type\": \"integer\"}},"
	                " \"required\": [\"b\"], \"additionalProperties\": false}";
	EXPECT(s, {1, "{\"b\":1}"}, {1, "{\"a\":1,\"b\":2}"}, {1, "{\"b\":1,\"c\":3}"},
	       {1, "{\"a\":1,\"b\":2,\"c\":3}"}, {1, "{ \"a\": 1, \"b\": 2 }"}, {0, "{\"a\": 1"},
	       {0, "{\"a\":1,"}, {-1, "{}"}, {-1, "{\"a\":1}"}, {-1, "{\"a\":1,\"c\":3}"},
	       {-1, "{\"b\":1,}"}, {-1, "{,\"b\":1}"}, {-1, "{\"b\":1\"c\":3}"},
	       {-1, "{\"b\":2,\"a\":1}"}, {-1, "{\"b\":1,\"d\":1}"}, {-1, "{\"b\":1,\"b\":1}"});
	/* all optional */
	s = "{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"},"
	    " \"b\": {\"type\": \"integer\"}, \"c\": {\"type\": \"integer\"}}}";
	EXPECT(s, {1, "{}"}, {1, "{ }"}, {1, "{\"a\":1}"}, {1, "{\"b\":1}"}, {1, "{\"c\":1}"},
	       {1, "{\"a\":1,\"c\":1}"}, {1, "{\"b\":1,\"c\":1}"}, {1, "{\"a\":1,\"b\":1,\"c\":1}"},
	       {-1, "{,}"}, {-1, "{\"a\":1,}"}, {-1, "{,\"a\":1}"}, {-1, "{\"c\":1,\"a\":1}"});
	/* all required, required first and last */
	s = "{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"},"
	    " \"b\": {\"type\": \"integer\"}, \"c\": {\"type\": \"integer\"}},"
	    " \"required\": [\"c\", \"a\"]}";
	EXPECT(s, {1, "{\"a\":1,\"c\":1}"}, {1, "{\"a\":1,\"b\":1,\"c\":1}"}, {-1, "{\"a\":1}"},
	       {-1, "{\"c\":1}"}, {-1, "{\"b\":1,\"c\":1}"});
	/* nothing listed: any object */
	EXPECT("{\"type\": \"object\"}", {1, "{}"}, {1, "{\"x\": [1], \"y\": {}}"}, {-1, "[]"});
	EXPECT("{\"type\": \"object\", \"properties\": {}}", {1, "{}"}, {-1, "{\"x\":1}"});
	expect_error("{\"type\": \"object\", \"properties\": {\"a\": {}}, \"required\": [\"b\"]}",
	             "required property 'b' at / is not in 'properties'");
	expect_error("{\"type\": \"object\", \"properties\": []}", "'properties' at / must be");
}

static void test_object_nested_and_keys(void)
{
	/* keys that need escapes, a nested object */
	const char *s =
	    "{\"type\": \"object\", \"properties\": {\"q\\\"k\\\\\": {\"type\": \"object\","
	    " \"properties\": {\"\\u00e9\": {\"type\": \"null\"}}, \"required\": [\"\\u00e9\"]}},"
	    " \"required\": [\"q\\\"k\\\\\"]}";
	EXPECT(s, {1, "{\"q\\\"k\\\\\": {\"\xc3\xa9\": null}}"}, {-1, "{\"q\\\"k\\\\\": {}}"},
	       {-1, "{\"q\\\"k\\\\\": {\"\\u00e9\": null}}"});
}

static void test_additional_properties(void)
{
	const char *s = "{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"}},"
	                " \"additionalProperties\": {\"type\": \"string\"}}";
	EXPECT(s, {1, "{}"}, {1, "{\"a\":1}"}, {1, "{\"x\":\"y\"}"},
	       {1, "{\"a\":1,\"x\":\"y\",\"z\":\"\"}"}, {-1, "{\"x\":1}"},
	       {-1, "{\"x\":\"y\",\"a\":1}"},
	       /* an extra property never takes a listed name, however spelled */
	       {-1, "{\"a\":\"x\"}"}, {-1, "{\"a\":1,\"a\":\"x\"}"}, {-1, "{\"\\u0061\":\"x\"}"},
	       {1, "{\"ab\":\"x\",\"\":\"\",\"x\\u0062\":\"\",\"\\n\":\"\"}"},
	       {-1, "{\"\\u0062\":\"\"}"});
	s = "{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"}},"
	    " \"additionalProperties\": true, \"required\": [\"a\", \"must\"]}";
	EXPECT(s, {1, "{\"a\":1,\"must\":[1]}"}, {1, "{\"a\":1,\"must\":null,\"more\":{}}"},
	       {-1, "{\"a\":1}"}, {-1, "{\"a\":1,\"other\":1}"});
	EXPECT("{\"type\": \"object\", \"additionalProperties\": {\"type\": \"integer\"}}",
	       {1, "{}"}, {1, "{\"k\": 1, \"l\": 2}"}, {-1, "{\"k\": \"1\"}"});
	expect_error("{\"type\": \"object\", \"additionalProperties\": 1}",
	             "'additionalProperties' at / must be");
}

static void test_arrays(void)
{
	EXPECT("{\"type\": \"array\", \"items\": {\"type\": \"integer\"}, \"minItems\": 2,"
	       " \"maxItems\": 3}",
	       {1, "[1,2]"}, {1, "[1, 2, 3]"}, {1, "[\n  1,\n  2\n]"}, {0, "[1,"}, {0, "[1"},
	       {-1, "[1]"}, {-1, "[]"}, {-1, "[1,2,3,4]"}, {-1, "[1,\"2\"]"}, {-1, "[1,2,]"});
	EXPECT("{\"type\": \"array\", \"items\": {\"type\": \"boolean\"}}", {1, "[]"},
	       {1, "[true]"}, {1, "[true,false,true,false,true]"}, {-1, "[1]"});
	EXPECT("{\"type\": \"array\"}", {1, "[]"}, {1, "[1, \"a\", [null]]"});
	EXPECT("{\"type\": \"array\", \"maxItems\": 0}", {1, "[]"}, {-1, "[1]"});
	EXPECT("{\"type\": \"array\", \"minItems\": 1}", {1, "[{}]"}, {-1, "[]"});
	EXPECT("{\"type\": \"array\", \"items\": false}", {1, "[]"}, {-1, "[1]"});
	EXPECT("{\"type\": \"array\", \"minItems\": 1000, \"items\": {\"const\": 1}}",
	       {-1, "[1,1]"}, {0, "[1,1"});
	expect_error("{\"type\": \"array\", \"maxItems\": 5000}",
	             "'maxItems' 5000 at / is more than 1000");
	expect_error("{\"type\": \"array\", \"minItems\": 3, \"maxItems\": 2}",
	             "'minItems' 3 is more than 'maxItems' 2 at /");
	expect_error("{\"type\": \"array\", \"minItems\": -1}", "'minItems' at / must be");
	expect_error("{\"type\": \"array\", \"items\": [{}]}", "'items' as a list");
	expect_error("{\"type\": \"array\", \"prefixItems\": [{}]}",
	             "unsupported keyword 'prefixItems' at /");
}

static void test_enum_const(void)
{
	EXPECT("{\"enum\": [\"a\\\"b\", \"\\u00e9\", \"tab\\t\", 1, 2.5, null, true,"
	       " {\"k\": [1, \"x\"]}]}",
	       {1, "\"a\\\"b\""}, {1, "\"\xc3\xa9\""}, {1, "\"tab\\t\""}, {1, "1"}, {1, "2.5"},
	       {1, "null"}, {1, "true"}, {1, "{\"k\":[1,\"x\"]}"}, {0, "\"a"}, {-1, "\"a\""},
	       {-1, "3"}, {-1, "false"}, {-1, "\"\\u00e9\""});
	EXPECT("{\"const\": \"only\"}", {1, "\"only\""}, {-1, "\"other\""});
	EXPECT("{\"const\": 0.1}", {1, "0.1"}, {-1, "0.10000000000000001"});
	/* type filters the values */
	EXPECT("{\"type\": \"string\", \"enum\": [\"a\", 1, null]}", {1, "\"a\""}, {-1, "1"},
	       {-1, "null"});
	EXPECT("{\"type\": \"integer\", \"enum\": [1.0, 1.5, 2]}", {1, "1"}, {1, "2"}, {-1, "1.5"});
	expect_error("{\"type\": \"string\", \"enum\": [1]}", "no value of 'enum' at /");
	expect_error("{\"enum\": []}", "'enum' at / must be a non-empty array");
	expect_error("{\"enum\": [\"abc\"], \"maxLength\": 2}",
	             "'maxLength' together with 'enum' at / is not supported");
}

static void test_any_of(void)
{
	const char *s = "{\"anyOf\": [{\"type\": \"string\"}, {\"type\": \"integer\"},"
	                " {\"type\": \"array\", \"items\": {\"type\": \"boolean\"}}]}";
	EXPECT(s, {1, "\"a\""}, {1, "12"}, {1, "[true]"}, {-1, "[1]"}, {-1, "null"}, {-1, "1.5"});
	EXPECT("{\"oneOf\": [{\"type\": \"null\"}, {\"const\": 3}], \"title\": \"x\"}", {1, "null"},
	       {1, "3"}, {-1, "4"});
	EXPECT("{\"allOf\": [{\"type\": \"integer\"}]}", {1, "3"}, {-1, "\"3\""});
	expect_error("{\"allOf\": [{\"type\": \"integer\"}, {\"minimum\": 0}]}",
	             "'allOf' with more than one schema at / is not supported");
	expect_error("{\"anyOf\": []}", "'anyOf' at / must be a non-empty array");
	expect_error("{\"type\": \"object\", \"anyOf\": [{}]}",
	             "'anyOf' together with 'type' at / is not supported");
	expect_error("{\"anyOf\": [{\"type\": \"string\"}, {\"type\": \"strung\"}]}",
	             "unknown type 'strung' at /anyOf/1");
}

static void test_refs_and_recursion(void)
{
	const char *tree =
	    "{\"$ref\": \"#/$defs/node\", \"$defs\": {\"node\": {\"type\": \"object\","
	    " \"properties\": {\"name\": {\"type\": \"string\"}, \"children\":"
	    " {\"type\": \"array\", \"items\": {\"$ref\": \"#/$defs/node\"}}},"
	    " \"required\": [\"name\", \"children\"]}}}";
	EXPECT(tree, {1, "{\"name\":\"a\",\"children\":[]}"},
	       {1, "{\"name\":\"a\",\"children\":[{\"name\":\"b\",\"children\":[{\"name\":\"c\","
	           "\"children\":[]}]},{\"name\":\"d\",\"children\":[]}]}"},
	       {0, "{\"name\":\"a\",\"children\":[{\"name\":\"b\",\"children\":[{"},
	       {-1, "{\"name\":\"a\",\"children\":[{\"name\":\"b\"}]}"});
	/* "#" recursion, definitions, pointer escapes */
	EXPECT("{\"type\": \"object\", \"properties\": {\"next\": {\"anyOf\": [{\"$ref\": \"#\"},"
	       " {\"type\": \"null\"}]}}, \"required\": [\"next\"]}",
	       {1, "{\"next\":null}"}, {1, "{\"next\":{\"next\":{\"next\":null}}}"},
	       {-1, "{\"next\":{}}"});
	EXPECT("{\"definitions\": {\"a/b~c\": {\"type\": \"integer\"}},"
	       " \"type\": \"array\", \"items\": {\"$ref\": \"#/definitions/a~1b~0c\"}}",
	       {1, "[1,2]"}, {-1, "[\"1\"]"});
	EXPECT("{\"$defs\": {\"x y\": {\"const\": 1}}, \"$ref\": \"#/$defs/x%20y\","
	       " \"description\": \"d\"}",
	       {1, "1"}, {-1, "2"});
	expect_error("{\"type\": \"array\", \"items\": {\"$ref\": \"#/$defs/x\"}}",
	             "'$ref' '#/$defs/x' not found at /items");
	expect_error("{\"$ref\": \"#\"}", "refers to itself");
	expect_error("{\"anyOf\": [{\"$ref\": \"#\"}, {\"type\": \"null\"}]}", "refers to itself");
	expect_error(
	    "{\"$defs\": {\"a\": {\"$ref\": \"#/$defs/b\"}, \"b\": {\"$ref\": \"#/$defs/a\"}},"
	    " \"$ref\": \"#/$defs/a\"}",
	    "refers to itself");
	expect_error("{\"$ref\": \"http://example.com/s.json\"}",
	             "only local references ('#...') are supported");
	expect_error("{\"$ref\": \"#/$defs/a\", \"type\": \"string\", \"$defs\": {\"a\": {}}}",
	             "'$ref' together with 'type' at / is not supported");
}

static void test_string_escapes(void)
{
	EXPECT("{\"type\": \"string\"}", {1, "\"\\\" \\\\ \\/ \\b \\f \\n \\r \\t\""},
	       {1, "\"\\u00e9\""}, {1, "\"\xc3\xa9\""}, {1, "\"\\ud83d\\ude00\""},
	       {1, "\"\xf0\x9f\x98\x80\""}, {1, "\"\\uD83D\\uDE00\""}, {-1, "\"\\ud83d\""},
	       {-1, "\"\\ude00\""}, {-1, "\"\\u0000\""}, {-1, "\"\x01\""}, {-1, "\"\n\""},
	       {-1, "\"\\x41\""}, {-1, "\"\\u12\""}, {0, "\"\\u12"});
	EXPECT("{\"type\": \"string\", \"minLength\": 2, \"maxLength\": 3}", {1, "\"ab\""},
	       {1, "\"\\u00e9\xc3\xa9\\n\""}, {1, "\"\\ud83d\\ude00x\""}, {-1, "\"a\""},
	       {-1, "\"abcd\""});
	EXPECT("{\"type\": \"string\", \"minLength\": 1}", {1, "\"a\""}, {-1, "\"\""});
	expect_error("{\"type\": \"string\", \"maxLength\": 1001}", "'maxLength' 1001 at /");
	expect_error("{\"type\": \"string\", \"minLength\": 3, \"maxLength\": 2}",
	             "'minLength' 3 is more than 'maxLength' 2");
}

static void test_patterns(void)
{
	EXPECT("{\"type\": \"string\", \"pattern\": \"^[a-z]+\\\\d{2}$\"}", {1, "\"abc12\""},
	       {-1, "\"abc1\""}, {-1, "\"ABC12\""}, {-1, "\"abc123\""});
	/* unanchored: a search */
	EXPECT("{\"pattern\": \"fo+\"}", {1, "\"xxfoooyy\""}, {1, "\"fo\""}, {-1, "\"f\""});
	EXPECT("{\"pattern\": \"^ab\"}", {1, "\"abzz\""}, {-1, "\"zab\""});
	EXPECT("{\"pattern\": \"ab$\"}", {1, "\"zzab\""}, {-1, "\"abz\""});
	EXPECT("{\"pattern\": \"^(cat|dog)s?$\"}", {1, "\"cat\""}, {1, "\"dogs\""},
	       {-1, "\"cow\""});
	EXPECT("{\"pattern\": \"^(?:[A-F]|\\\\.){2,3}$\"}", {1, "\"A.\""}, {1, "\"FFF\""},
	       {-1, "\"A\""}, {-1, "\"ABCD\""});
	/* what JSON must escape comes out escaped */
	EXPECT("{\"pattern\": \"^a\\\"b\\\\\\\\c\\\\n$\"}", {1, "\"a\\\"b\\\\c\\n\""},
	       {-1, "\"a\"b\""});
	EXPECT("{\"pattern\": \"^[^a]$\"}", {1, "\"\\n\""}, {1, "\"\\u0001\""}, {1, "\"\\\"\""},
	       {1, "\"\xc3\xa9\""}, {-1, "\"a\""}, {-1, "\"\\u0000\""});
	EXPECT("{\"pattern\": \"^.\\\\S\\\\s\\\\W\\\\w\\\\D$\"}", {1, "\"xy\\t-_a\""},
	       {-1, "\"\\nx y-_a\""}, {-1, "\"xy y-_1\""});
	EXPECT("{\"pattern\": \"^\\\\u00e9\\\\x41[\\\\-x]{1,}?$\"}",
	       {1, "\"\xc3\xa9"
	           "A-x\""},
	       {-1, "\"\xc3\xa9"
	            "A\""});
	EXPECT("{\"pattern\": \"^a{2}b{1,}c{0,1}$\"}", {1, "\"aab\""}, {1, "\"aabbbc\""},
	       {-1, "\"ab\""});
	EXPECT("{\"pattern\": \"^x|y$\"}", {1, "\"xzz\""}, {1, "\"zzy\""}, {-1, "\"zxz\""});
	expect_error("{\"pattern\": \"(?=a)\"}", "lookaround");
	expect_error("{\"pattern\": \"(a)\\\\1\"}", "backreferences are not supported");
	expect_error("{\"pattern\": \"\\\\bword\"}", "word boundaries");
	expect_error("{\"pattern\": \"\\\\p{L}\"}", "Unicode property escapes");
	expect_error("{\"pattern\": \"a**\"}", "nothing to repeat");
	expect_error("{\"pattern\": \"(a\"}", "')' expected");
	expect_error("{\"pattern\": \"a)\"}", "unmatched ')'");
	expect_error("{\"pattern\": \"[z-a]\"}", "a range out of order");
	expect_error("{\"pattern\": \"a^b\"}", "anchors");
	expect_error("{\"pattern\": \"(a?)*\"}", "can match the empty string");
	expect_error("{\"pattern\": \"a{2000}\"}", "a repetition count above 1000");
	expect_error("{\"properties\": {\"p\": {\"pattern\": \"[a\"}}}",
	             "'pattern' at /properties/p: an unterminated character class");
	/* lengths only where the pattern implies them */
	EXPECT("{\"pattern\": \"^\\\\d{5}$\", \"maxLength\": 5, \"minLength\": 5}",
	       {1, "\"12345\""});
	/* maxLength bounds the unbounded repetitions, each to an equal share */
	EXPECT("{\"pattern\": \"^\\\\d+$\", \"maxLength\": 5}", {1, "\"1\""}, {1, "\"12345\""},
	       {-1, "\"123456\""});
	EXPECT("{\"pattern\": \"abc\", \"maxLength\": 5}", {1, "\"xabcx\""}, {1, "\"abc\""},
	       {-1, "\"xxabc\""});
	expect_error("{\"pattern\": \"^(?:a+b)+$\", \"maxLength\": 5}",
	             "'maxLength' together with 'pattern' at / is not supported");
	expect_error("{\"pattern\": \"^\\\\d+$\", \"minLength\": 3}",
	             "'minLength' together with 'pattern' at / is not supported");
	expect_error("{\"pattern\": \"^\\\\d{3}x+$\", \"maxLength\": 3}",
	             "'maxLength' together with 'pattern' at / is not supported");
}

static void test_formats(void)
{
	EXPECT("{\"type\": \"string\", \"format\": \"date\"}", {1, "\"2024-02-29\""},
	       {1, "\"1999-12-31\""}, {-1, "\"2024-13-01\""}, {-1, "\"2024-04-31\""},
	       {-1, "\"2024-02-30\""}, {-1, "\"2024-1-01\""});
	EXPECT("{\"format\": \"time\"}", {1, "\"12:30:00Z\""}, {1, "\"23:59:59.123+02:00\""},
	       {-1, "\"24:00:00Z\""}, {-1, "\"12:30:00\""});
	EXPECT("{\"format\": \"date-time\"}", {1, "\"2024-01-02T03:04:05.123Z\""},
	       {1, "\"2024-01-02T03:04:05-01:30\""}, {-1, "\"2024-01-02 03:04:05Z\""});
	EXPECT("{\"format\": \"uuid\"}", {1, "\"123e4567-e89b-12d3-a456-426614174000\""},
	       {-1, "\"123e4567e89b12d3a456426614174000\""});
	EXPECT("{\"format\": \"email\"}", {1, "\"a.b+c@ex-ample.co.uk\""}, {-1, "\"a@b\""},
	       {-1, "\"@b.c\""}, {-1, "\"a@-b.c\""});
	EXPECT("{\"format\": \"hostname\"}", {1, "\"localhost\""}, {1, "\"a-1.example.com\""},
	       {-1, "\"-a.com\""}, {-1, "\"a..b\""});
	EXPECT("{\"format\": \"ipv4\"}", {1, "\"192.168.0.1\""}, {1, "\"0.0.0.0\""},
	       {1, "\"255.255.255.255\""}, {-1, "\"256.1.1.1\""}, {-1, "\"01.1.1.1\""},
	       {-1, "\"1.1.1\""});
	EXPECT("{\"format\": \"ipv6\"}", {1, "\"::1\""}, {1, "\"::\""}, {1, "\"fe80::\""},
	       {1, "\"2001:db8::ff00:42:8329\""}, {1, "\"1:2:3:4:5:6:7:8\""},
	       {-1, "\"1:2:3:4:5:6:7:8:9\""}, {-1, "\":::\""}, {-1, "\"1::2::3\""});
	EXPECT("{\"format\": \"uri\"}", {1, "\"https://example.com/a?b=c#d\""},
	       {1, "\"urn:isbn:0451450523\""}, {1, "\"http://[::1]/%20\""}, {-1, "\"no\""},
	       {-1, "\"http://a b\""}, {-1, "\"http://%zz\""});
	expect_error("{\"type\": \"string\", \"format\": \"duration\"}",
	             "unsupported format 'duration' at /");
	expect_error("{\"format\": \"date\", \"pattern\": \"x\"}",
	             "'pattern' together with 'format' at / is not supported");
	/* pydantic's HttpUrl and AnyUrl */
	EXPECT("{\"format\": \"uri\", \"maxLength\": 2083, \"minLength\": 1}",
	       {1, "\"https://example.com/a?b=c#d\""}, {-1, "\"no\""});
	EXPECT("{\"format\": \"uri\", \"maxLength\": 10}", {1, "\"ab:c\""}, {-1, "\"abcd:c\""});
	expect_error("{\"format\": \"email\", \"maxLength\": 100}",
	             "'maxLength' together with 'format' at / is not supported");
	EXPECT("{\"format\": \"uuid\", \"maxLength\": 36}",
	       {1, "\"123e4567-e89b-12d3-a456-426614174000\""});
}

/* Every integer in [-2000, 2000] against the bounds. */
static void check_int_range(const char *bounds, long long lo, long long hi)
{
	char schema[256], text[32];
	struct lp_buf buf;
	struct lp_err err = {0};
	struct lp_grammar *g;

	snprintf(schema, sizeof(schema), "{\"type\": \"integer\", %s}", bounds);
	g = build(schema, &buf, &err);
	CHECK_MSG(g, "schema %s: %s", schema, err.msg);
	for (long long v = -2000; v <= 2000; v++) {
		int want = v >= lo && v <= hi ? 1 : -1, got;
		snprintf(text, sizeof(text), "%lld", v);
		got = match(g, text);
		if (got == 0 && want == -1)
			got = -1; /* a prefix of a larger one in range */
		if (got != want) {
			TEST_FAIL("schema %s: %s gave %d, expected %d; grammar:\n%s", schema, text,
			          got, want, buf.data);
			break;
		}
	}
	lp_grammar_unref(g);
	lp_buf_release(&buf);
}

static void test_integer_bounds(void)
{
	uint64_t seed = 14;

	check_int_range("\"minimum\": 0, \"maximum\": 100", 0, 100);
	check_int_range("\"minimum\": -150, \"maximum\": 1234", -150, 1234);
	check_int_range("\"minimum\": -123, \"maximum\": -7", -123, -7);
	check_int_range("\"exclusiveMinimum\": -5, \"exclusiveMaximum\": 5", -4, 4);
	check_int_range("\"minimum\": 1.5, \"maximum\": 9.5", 2, 9);
	check_int_range("\"exclusiveMinimum\": 1.5, \"exclusiveMaximum\": 9.0", 2, 8);
	check_int_range("\"minimum\": 1", 1, 1LL << 60);
	check_int_range("\"maximum\": -1", -(1LL << 60), -1);
	for (int i = 0; i < 12; i++) {
		char b[96];
		long long lo = (long long)(test_splitmix64(&seed) % 3001) - 1500;
		long long hi = lo + (long long)(test_splitmix64(&seed) % 2000);
		snprintf(b, sizeof(b), "\"minimum\": %lld, \"maximum\": %lld", lo, hi);
		check_int_range(b, lo, hi);
	}
	EXPECT("{\"type\": \"integer\", \"minimum\": 0}", {1, "9999999999999999"},
	       {-1, "10000000000000000"}, {-1, "-1"}, {-1, "-"});
	EXPECT("{\"type\": \"integer\", \"maximum\": 1e19}", {1, "5"});
	expect_error("{\"type\": \"integer\", \"minimum\": 5, \"maximum\": 4}",
	             "no integer of at most 16 digits lies within the bounds at /");
	expect_error("{\"type\": \"integer\", \"minimum\": \"1\"}",
	             "'minimum' at / must be a number");
	expect_error("{\"type\": \"number\", \"minimum\": 0}",
	             "unsupported keyword 'minimum' at / (bounds are supported for integers");
	expect_error("{\"properties\": {\"p\": {\"type\": [\"integer\", \"number\"],"
	             " \"maximum\": 0}}}",
	             "unsupported keyword 'maximum' at /properties/p");
}

static void test_whitespace(void)
{
	char deep[64], over[64];
	const char *s = "{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"array\"}},"
	                " \"required\": [\"a\"]}";

	snprintf(deep, sizeof(deep), "{\n%20s\"a\": []}", "");
	snprintf(over, sizeof(over), "{\n%21s\"a\": []}", "");
	EXPECT(s, {1, "{\"a\":[]}"}, {1, "{ \"a\" : [ ] }"}, {1, "{\n  \"a\": [\n    1\n  ]\n}"},
	       {1, deep}, {-1, over}, {-1, "{  \"a\":[]}"}, {-1, "{\t\"a\":[]}"},
	       {-1, "{\n\n\"a\":[]}"}, {-1, " {\"a\":[]}"}, {-1, "{\"a\":[]} "},
	       {-1, "{\"a\":[]}\n"});
}

static void test_unsupported_keywords(void)
{
	static const char *const kws[] = {"not",
	                                  "if",
	                                  "then",
	                                  "else",
	                                  "patternProperties",
	                                  "multipleOf",
	                                  "uniqueItems",
	                                  "contains",
	                                  "minProperties",
	                                  "maxProperties",
	                                  "dependentRequired",
	                                  "propertyNames",
	                                  "unevaluatedProperties",
	                                  "nullable",
	                                  "$anchor",
	                                  "strict",
	                                  "contentEncoding"};
	for (size_t i = 0; i < sizeof(kws) / sizeof(*kws); i++) {
		char schema[256], want[128];
		snprintf(schema, sizeof(schema),
		         "{\"type\": \"object\", \"properties\": {\"a/b\": {\"type\": \"string\","
		         " \"%s\": {}}}}",
		         kws[i]);
		snprintf(want, sizeof(want), "unsupported keyword '%s' at /properties/a~1b",
		         kws[i]);
		expect_error(schema, want);
		if (test_current_failed)
			return;
	}
	expect_error("{\"type\": \"array\", \"items\": {\"not\": {}}}",
	             "unsupported keyword 'not' at /items");
	expect_error("[1]", "a schema must be an object or a boolean");
	expect_error("{\"type\": 3}", "'type' at / must be a string or a list");
	expect_error("{\"type\": []}", "'type' at / is an empty list");
}

/* Nesting, long names and many alternatives stay within bounds. */
static void test_limits(void)
{
	char deep[2048], longkey[1024];
	size_t n = 0;

	for (int i = 0; i < 70; i++)
		n += (size_t)snprintf(deep + n, sizeof(deep) - n,
		                      "{\"type\": \"array\", \"items\": ");
	n += (size_t)snprintf(deep + n, sizeof(deep) - n, "{}");
	for (int i = 0; i < 70; i++)
		deep[n++] = '}';
	deep[n] = '\0';
	expect_error(deep, "schema nested deeper than 64 levels at /items/items/");
	/* a 600-byte property name: the pointer in the message is cut short */
	n = (size_t)snprintf(longkey, sizeof(longkey), "{\"properties\": {\"");
	memset(longkey + n, 'k', 600);
	n += 600;
	snprintf(longkey + n, sizeof(longkey) - n, "\": {\"not\": {}}}}");
	expect_error(longkey, "unsupported keyword 'not' at /properties/kkkk");
	expect_error(longkey, "...");
	/* mutual recursion through anyOf and items */
	EXPECT("{\"$defs\": {\"a\": {\"anyOf\": [{\"$ref\": \"#/$defs/b\"}, {\"$ref\": "
	       "\"#/$defs/b\"}]},"
	       " \"b\": {\"type\": \"array\", \"items\": {\"$ref\": \"#/$defs/a\"}}},"
	       " \"$ref\": \"#/$defs/a\"}",
	       {1, "[]"}, {1, "[[],[[[]]]]"}, {-1, "[1]"});
}

static void test_annotations_ignored(void)
{
	EXPECT("{\"$schema\": \"https://json-schema.org/draft/2020-12/schema\", \"$id\": \"x\","
	       " \"$comment\": \"c\", \"title\": \"T\", \"description\": \"D\", \"default\": 3,"
	       " \"examples\": [1], \"deprecated\": false, \"readOnly\": true,"
	       " \"writeOnly\": false, \"type\": \"integer\"}",
	       {1, "3"}, {-1, "\"3\""});
}

/* What pydantic v2's model_json_schema() and the openai client's
 * to_strict_json_schema() emit for a model (generated with pydantic
 * 2.13 and openai 3.63). */
static void test_pydantic_schemas(void)
{
	static const char person[] =
	    "{\"$defs\": {\"Address\": {\"properties\": {\"street\": {\"title\": \"Street\", "
	    "\"type\":"
	    " \"string\"}, \"zip\": {\"pattern\": \"^\\\\d{5}$\", \"title\": \"Zip\", \"type\":"
	    " \"string\"}}, \"required\": [\"street\", \"zip\"], \"title\": \"Address\", \"type\":"
	    " \"object\", \"additionalProperties\": false}, \"Color\": {\"enum\": [\"red\","
	    " \"green\"], \"title\": \"Color\", \"type\": \"string\"}}, \"description\": \"A"
	    " person.\", \"properties\": {\"name\": {\"description\": \"full name\", \"maxLength\":"
	    " 50, \"minLength\": 1, \"title\": \"Name\", \"type\": \"string\"}, \"age\":"
	    " {\"anyOf\": [{\"maximum\": 150, \"minimum\": 0, \"type\": \"integer\"}, {\"type\":"
	    " \"null\"}], \"default\": null, \"title\": \"Age\"}, \"color\": {\"$ref\":"
	    " \"#/$defs/Color\"}, \"kind\": {\"enum\": [\"a\", \"b\"], \"title\": \"Kind\", "
	    "\"type\":"
	    " \"string\"}, \"tag\": {\"const\": \"x\", \"title\": \"Tag\", \"type\": \"string\"},"
	    " \"when\": {\"format\": \"date\", \"title\": \"When\", \"type\": \"string\"}, \"id\":"
	    " {\"format\": \"uuid\", \"title\": \"Id\", \"type\": \"string\"}, \"addresses\":"
	    " {\"default\": [], \"items\": {\"$ref\": \"#/$defs/Address\"}, \"title\":"
	    " \"Addresses\", \"type\": \"array\"}, \"extra\": {\"additionalProperties\": {\"type\":"
	    " \"integer\"}, \"default\": {}, \"title\": \"Extra\", \"type\": \"object\"},"
	    " \"anything\": {\"default\": null, \"title\": \"Anything\"}, \"score\": {\"title\":"
	    " \"Score\", \"type\": \"number\"}, \"u\": {\"anyOf\": [{\"type\": \"integer\"},"
	    " {\"type\": \"string\"}], \"title\": \"U\"}}, \"required\": [\"name\", \"color\","
	    " \"kind\", \"tag\", \"when\", \"id\", \"score\", \"u\"], \"title\": \"Person\", "
	    "\"type\":"
	    " \"object\"}";
	static const char strict_node[] =
	    "{\"$defs\": {\"Node\": {\"properties\": {\"name\": {\"title\": \"Name\", \"type\":"
	    " \"string\"}, \"children\": {\"default\": [], \"items\": {\"$ref\": \"#/$defs/Node\"},"
	    " \"title\": \"Children\", \"type\": \"array\"}}, \"required\": [\"name\","
	    " \"children\"], \"title\": \"Node\", \"type\": \"object\", \"additionalProperties\":"
	    " false}}, \"properties\": {\"name\": {\"title\": \"Name\", \"type\": \"string\"},"
	    " \"children\": {\"default\": [], \"items\": {\"$ref\": \"#/$defs/Node\"}, \"title\":"
	    " \"Children\", \"type\": \"array\"}}, \"required\": [\"name\", \"children\"],"
	    " \"title\": \"Node\", \"type\": \"object\", \"additionalProperties\": false}";

	EXPECT(person,
	       {1, "{\"name\":\"Al\",\"color\":\"red\",\"kind\":\"a\",\"tag\":\"x\",\"when\":"
	           "\"2024-02-29\",\"id\":\"123e4567-e89b-12d3-a456-426614174000\",\"score\":1.5,"
	           "\"u\":3}"},
	       {1, "{\"name\": \"Al\", \"age\": 150, \"color\": \"green\", \"kind\": \"b\","
	           " \"tag\": \"x\", \"when\": \"2024-02-29\", \"id\":"
	           " \"123e4567-e89b-12d3-a456-426614174000\", \"addresses\": [{\"street\": \"a\","
	           " \"zip\": \"12345\"}], \"extra\": {\"k\": 1}, \"anything\": [1, {}],"
	           " \"score\": -2e5, \"u\": \"s\"}"},
	       {-1, "{\"name\":\"Al\",\"age\":151,"}, {-1, "{\"name\":\"\","});
	EXPECT(strict_node, {1, "{\"name\":\"a\",\"children\":[{\"name\":\"b\",\"children\":[]}]}"},
	       {-1, "{\"name\":\"a\"}"});
}

/* A 50-property schema compiles to a grammar of reasonable size, quickly. */
static void test_fifty_properties(void)
{
	struct lp_buf s, text, inst;
	struct lp_err err = {0};
	struct lp_grammar *g = NULL;
	struct timespec t0, t1;
	double ms;
	static const char *const types[] = {
	    "{\"type\": \"string\"}", "{\"type\": \"integer\", \"minimum\": 0}",
	    "{\"type\": \"boolean\"}", "{\"enum\": [\"x\", \"y\"]}",
	    "{\"type\": \"array\", \"items\": {\"type\": \"number\"}}"};
	static const char *const values[] = {"\"v\"", "7", "true", "\"y\"", "[1.5]"};
	json_t *j;

	lp_buf_init(&s, 1 << 20);
	lp_buf_init(&text, LP_GRAMMAR_MAX_TEXT);
	lp_buf_init(&inst, 1 << 20);
	lp_buf_appendf(&s, &err, "{\"type\": \"object\", \"properties\": {");
	lp_buf_appendf(&inst, &err, "{");
	for (int i = 0; i < 50; i++) {
		lp_buf_appendf(&s, &err, "%s\"field_%d\": %s", i ? ", " : "", i, types[i % 5]);
		if (i % 3)
			lp_buf_appendf(&inst, &err, "%s\"field_%d\": %s", inst.len > 1 ? ", " : "",
			               i, values[i % 5]);
	}
	lp_buf_appendf(&s, &err, "}, \"required\": [\"field_1\", \"field_49\"]}");
	lp_buf_appendf(&inst, &err, "}");
	j = json_loads(s.data, 0, NULL);
	CHECK(j);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	lp_buf_appendf(&text, &err, "root ::= s-root\n");
	CHECK_OK(lp_json_schema_grammar(j, "s-", &text, &err), &err);
	CHECK_OK(lp_grammar_parse(&g, text.data, text.len, &err), &err);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
	printf("  50 properties: %zu bytes of grammar, compiled and parsed in %.2f ms\n", text.len,
	       ms);
	CHECK_MSG(text.len < 32 * 1024, "grammar of %zu bytes", text.len);
	CHECK_MSG(match(g, inst.data) == 1, "instance %s not accepted", inst.data);
	CHECK(match(g, "{\"field_0\": \"v\"}") == -1); /* field_1 is required */
	lp_grammar_unref(g);
	json_decref(j);
	lp_buf_release(&s);
	lp_buf_release(&text);
	lp_buf_release(&inst);
}

static void test_object_and_value_grammars(void)
{
	struct lp_buf text;
	struct lp_err err = {0};
	struct lp_grammar *g;

	lp_buf_init(&text, LP_GRAMMAR_MAX_TEXT);
	lp_buf_appendf(&text, &err, "root ::= o-root\n");
	CHECK_OK(lp_json_object_grammar("o-", &text, &err), &err);
	CHECK_OK(lp_grammar_parse(&g, text.data, text.len, &err), &err);
	CHECK(match(g, "{\"a\": [1, {\"b\": null}], \"c\": \"\\u00e9\"}") == 1);
	CHECK(match(g, "{}") == 1);
	CHECK(match(g, "{\"a\"") == 0);
	CHECK(match(g, "[1]") == -1);
	CHECK(match(g, "1") == -1);
	lp_grammar_unref(g);

	lp_buf_reset(&text);
	lp_buf_appendf(&text, &err, "root ::= v-root\n");
	CHECK_OK(lp_json_value_grammar("v-", &text, &err), &err);
	CHECK_OK(lp_grammar_parse(&g, text.data, text.len, &err), &err);
	CHECK(match(g, "[1, -2.5e-3, true, false, null, \"s\", {}]") == 1);
	CHECK(match(g, "\"x\"") == 1);
	lp_grammar_unref(g);
	lp_buf_release(&text);
}

/* Two schemas in one grammar (tool calling), and bad prefixes. */
static void test_prefixes(void)
{
	struct lp_buf text;
	struct lp_err err = {0};
	struct lp_grammar *g;
	json_t *a = json_loads("{\"type\": \"object\", \"properties\": {\"x\": {\"type\":"
	                       " \"integer\"}}, \"required\": [\"x\"]}",
	                       0, NULL);
	json_t *b = json_loads("{\"type\": \"array\", \"items\": {\"$ref\": \"#/$defs/s\"},"
	                       " \"$defs\": {\"s\": {\"type\": \"string\"}}}",
	                       0, NULL);

	CHECK(a && b);
	lp_buf_init(&text, LP_GRAMMAR_MAX_TEXT);
	lp_buf_appendf(&text, &err, "root ::= \"A\" t0-root | \"B\" t1-root\n");
	CHECK_OK(lp_json_schema_grammar(a, "t0-", &text, &err), &err);
	CHECK_OK(lp_json_schema_grammar(b, "t1-", &text, &err), &err);
	CHECK_OK(lp_grammar_parse(&g, text.data, text.len, &err), &err);
	CHECK(match(g, "A{\"x\":1}") == 1);
	CHECK(match(g, "B[\"q\"]") == 1);
	CHECK(match(g, "A[\"q\"]") == -1);
	lp_grammar_unref(g);
	CHECK(lp_json_schema_grammar(a, "bad prefix", &text, &err) == -EINVAL);
	CHECK(strstr(err.msg, "rule prefix 'bad prefix'"));
	/* a small cap: -E2BIG, and the buffer is left as it was */
	{
		struct lp_buf small;
		lp_buf_init(&small, 64);
		lp_buf_appendf(&small, &err, "x");
		CHECK(lp_json_schema_grammar(a, "t0-", &small, &err) == -E2BIG);
		CHECK(small.len == 1 && !strcmp(small.data, "x"));
		lp_buf_release(&small);
	}
	json_decref(a);
	json_decref(b);
	lp_buf_release(&text);
}

int main(void)
{
	TEST_MAIN_BEGIN("test-json-schema");
	RUN(test_primitive_types);
	RUN(test_any_value);
	RUN(test_object_required_optional);
	RUN(test_object_nested_and_keys);
	RUN(test_additional_properties);
	RUN(test_arrays);
	RUN(test_enum_const);
	RUN(test_any_of);
	RUN(test_refs_and_recursion);
	RUN(test_string_escapes);
	RUN(test_patterns);
	RUN(test_formats);
	RUN(test_integer_bounds);
	RUN(test_whitespace);
	RUN(test_unsupported_keywords);
	RUN(test_limits);
	RUN(test_annotations_ignored);
	RUN(test_pydantic_schemas);
	RUN(test_fifty_properties);
	RUN(test_object_and_value_grammars);
	RUN(test_prefixes);
	TEST_MAIN_END();
}
