/* JSON Schema to grammar text; see json-schema.h and docs/api.md
 * ("Structured output: the JSON Schema subset").
 *
 * Each schema node (memoised by its json_t, so that $ref targets and
 * recursion get one rule each) becomes one rule "<prefix>n<id>", the root
 * "<prefix>root". Objects get auxiliary rules per property so that commas
 * come out right whichever optional properties are present; string
 * patterns and formats go through a small regex translator that emits
 * the decoded string's characters in their JSON-escaped form. Shared
 * helpers (whitespace, strings, numbers, any value) are emitted once at
 * the end, as needed. */
#include "agent/engine/json-schema.h"
#include "common/hex.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PATH_CAP       256      /* bytes of a JSON pointer kept for messages */
#define LEN_INF        LONG_MAX /* an unbounded length */
#define RX_MAX_DEPTH   32       /* groups nested in a pattern */
#define ENUM_MAX_DEPTH 64       /* nesting of an enum or const value */

enum {
	T_OBJECT = 1,
	T_ARRAY = 2,
	T_STRING = 4,
	T_INTEGER = 8,
	T_NUMBER = 16,
	T_BOOLEAN = 32,
	T_NULL = 64,
};

enum {
	H_WS = 1,
	H_CHAR = 2,
	H_STRING = 4,
	H_INTEGER = 8,
	H_NUMBER = 16,
	H_VALUE = 32,
};

struct node {
	const json_t *schema; /* borrowed */
	int32_t *edges;       /* nodes this one's rule starts with (anyOf, $ref) */
	size_t n_edges, cap_edges;
	char path[PATH_CAP];
};

struct ctx {
	const json_t *root;
	const char *prefix;
	struct lp_err *err;
	struct node *nodes;
	size_t n_nodes, cap_nodes;
	char path[PATH_CAP]; /* where the schema being compiled is */
	size_t path_len;
	unsigned helpers;
	int depth;
	size_t max; /* cap of the rule buffers */
	struct lp_buf *out;
};

static const char *const annotations[] = {
    "title",      "description", "default",   "examples",      "$schema", "$id",         "$comment",
    "deprecated", "readOnly",    "writeOnly", "discriminator", "$defs",   "definitions", NULL,
};

/* Keywords that constrain a value of some type (the combinators apart). */
static const char *const structural[] = {
    "type",      "properties",       "required",         "additionalProperties",
    "items",     "minItems",         "maxItems",         "minLength",
    "maxLength", "pattern",          "format",           "minimum",
    "maximum",   "exclusiveMinimum", "exclusiveMaximum", NULL,
};

static const char *const combinators[] = {
    "$ref", "anyOf", "oneOf", "allOf", "enum", "const", NULL,
};

static bool in_list(const char *const *l, const char *k)
{
	for (; *l; l++)
		if (!strcmp(*l, k))
			return true;
	return false;
}

static const char *where(const struct ctx *c)
{
	return c->path[0] ? c->path : "/";
}

/* Appends "/seg" (escaped as a JSON pointer) to the path; returns the old
 * length for path_pop. A path too long for the buffer ends in "...". */
static size_t path_push(struct ctx *c, const char *seg)
{
	size_t old = c->path_len, n = old;
	const size_t room = PATH_CAP - 4; /* keeps space for "..." */

	if (n < room)
		c->path[n++] = '/';
	for (const char *s = seg; *s && n < room; s++) {
		if (*s == '~' || *s == '/') {
			c->path[n++] = '~';
			if (n < room)
				c->path[n++] = *s == '~' ? '0' : '1';
		} else {
			c->path[n++] = *s;
		}
	}
	if (n >= room) {
		memcpy(c->path + room, "...", 3);
		n = PATH_CAP - 1;
	}
	c->path[n] = '\0';
	c->path_len = n;
	return old;
}

static size_t path_push_index(struct ctx *c, size_t i)
{
	char seg[32];

	snprintf(seg, sizeof(seg), "%zu", i);
	return path_push(c, seg);
}

static void path_pop(struct ctx *c, size_t old)
{
	c->path_len = old;
	c->path[old] = '\0';
}

static int put(struct ctx *c, struct lp_buf *b, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int put(struct ctx *c, struct lp_buf *b, const char *fmt, ...)
{
	char small[256];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(small, sizeof(small), fmt, ap);
	va_end(ap);
	if (n < 0)
		return lp_errf(c->err, -EINVAL, "bad format");
	if ((size_t)n < sizeof(small))
		return lp_buf_append(b, small, (size_t)n, c->err);
	{
		char *big = malloc((size_t)n + 1);
		int rc;
		if (!big)
			return lp_errf(c->err, -ENOMEM, "out of memory");
		va_start(ap, fmt);
		vsnprintf(big, (size_t)n + 1, fmt, ap);
		va_end(ap);
		rc = lp_buf_append(b, big, (size_t)n, c->err);
		free(big);
		return rc;
	}
}

static int put_buf(struct ctx *c, struct lp_buf *b, const struct lp_buf *src)
{
	return lp_buf_append(b, src->data ? src->data : "", src->len, c->err);
}

static int put_name(struct ctx *c, struct lp_buf *b, int32_t id)
{
	if (id == 0)
		return put(c, b, "%sroot", c->prefix);
	return put(c, b, "%sn%d", c->prefix, (int)id);
}

static int add_edge(struct ctx *c, int32_t from, int32_t to)
{
	struct node *n = &c->nodes[from];

	if (n->n_edges == n->cap_edges) {
		size_t cap = n->cap_edges ? 2 * n->cap_edges : 4;
		int32_t *e = realloc(n->edges, cap * sizeof(*e));
		if (!e)
			return lp_errf(c->err, -ENOMEM, "out of memory");
		n->edges = e;
		n->cap_edges = cap;
	}
	n->edges[n->n_edges++] = to;
	return 0;
}

/* ---- UTF-8 and literals ---- */

/* Decodes one UTF-8 character of s[0..n) into *cp; its length, or -1. */
static int utf8_next(const unsigned char *s, size_t n, uint32_t *cp)
{
	int k;
	uint32_t v;

	if (!n)
		return -1;
	if (s[0] < 0x80) {
		*cp = s[0];
		return 1;
	}
	k = (s[0] & 0xe0) == 0xc0 ? 2 : (s[0] & 0xf0) == 0xe0 ? 3 : (s[0] & 0xf8) == 0xf0 ? 4 : 0;
	if (!k || n < (size_t)k)
		return -1;
	v = s[0] & (0x7f >> k);
	for (int i = 1; i < k; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return -1;
		v = v << 6 | (s[i] & 0x3f);
	}
	if ((k == 2 && v < 0x80) || (k == 3 && v < 0x800) || (k == 4 && v < 0x10000) ||
	    v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff))
		return -1;
	*cp = v;
	return k;
}

/* One code point in a grammar literal or class. */
static int put_cp(struct ctx *c, struct lp_buf *b, uint32_t cp, bool in_class)
{
	bool plain =
	    (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') || (cp >= '0' && cp <= '9');

	if (!in_class && cp >= 0x20 && cp < 0x7f && cp != '"' && cp != '\\')
		plain = true;
	if (plain)
		return put(c, b, "%c", (char)cp);
	if (!in_class && (cp == '"' || cp == '\\'))
		return put(c, b, "\\%c", (char)cp);
	if (cp < 0x100)
		return put(c, b, "\\x%02x", (unsigned)cp);
	if (cp < 0x10000)
		return put(c, b, "\\u%04x", (unsigned)cp);
	return put(c, b, "\\U%08x", (unsigned)cp);
}

/* The UTF-8 text s[0..n) as one grammar literal. */
static int put_lit(struct ctx *c, struct lp_buf *b, const char *s, size_t n)
{
	const unsigned char *p = (const unsigned char *)s;
	int rc = put(c, b, "\"");

	while (!rc && n) {
		uint32_t cp;
		int k = utf8_next(p, n, &cp);
		if (k < 0)
			return lp_errf(c->err, -EINVAL, "invalid UTF-8 in a string at %s",
			               where(c));
		rc = put_cp(c, b, cp, false);
		p += k;
		n -= (size_t)k;
	}
	return rc ? rc : put(c, b, "\"");
}

/* ---- canonical compact JSON (enum, const, property names) ---- */

static int json_string_text(struct ctx *c, struct lp_buf *b, const char *s, size_t n)
{
	const unsigned char *p = (const unsigned char *)s;
	int rc = put(c, b, "\"");

	for (size_t i = 0; i < n && !rc; i++) {
		unsigned char ch = p[i];
		if (ch == '"' || ch == '\\')
			rc = put(c, b, "\\%c", ch);
		else if (ch == '\n')
			rc = put(c, b, "\\n");
		else if (ch == '\r')
			rc = put(c, b, "\\r");
		else if (ch == '\t')
			rc = put(c, b, "\\t");
		else if (ch == '\b')
			rc = put(c, b, "\\b");
		else if (ch == '\f')
			rc = put(c, b, "\\f");
		else if (ch < 0x20)
			rc = put(c, b, "\\u%04x", ch);
		else
			rc = lp_buf_append(b, &p[i], 1, c->err);
	}
	return rc ? rc : put(c, b, "\"");
}

static int json_text(struct ctx *c, struct lp_buf *b, const json_t *v, int depth)
{
	int rc = 0;

	if (depth > ENUM_MAX_DEPTH)
		return lp_errf(c->err, -EINVAL,
		               "an 'enum' or 'const' value nested too deeply at %s", where(c));
	switch (json_typeof(v)) {
	case JSON_NULL:
		return put(c, b, "null");
	case JSON_TRUE:
		return put(c, b, "true");
	case JSON_FALSE:
		return put(c, b, "false");
	case JSON_INTEGER:
		return put(c, b, "%lld", (long long)json_integer_value(v));
	case JSON_REAL: {
		/* the shortest text that reads back as the same double */
		double d = json_real_value(v);
		char t[40];
		for (int prec = 15; prec <= 17; prec++) {
			snprintf(t, sizeof(t), "%.*g", prec, d);
			if (strtod(t, NULL) == d)
				break;
		}
		return put(c, b, "%s", t);
	}
	case JSON_STRING:
		return json_string_text(c, b, json_string_value(v), json_string_length(v));
	case JSON_ARRAY: {
		size_t i;
		const json_t *e;
		rc = put(c, b, "[");
		json_array_foreach(v, i, e)
		{
			if (!rc && i)
				rc = put(c, b, ",");
			if (!rc)
				rc = json_text(c, b, e, depth + 1);
		}
		return rc ? rc : put(c, b, "]");
	}
	case JSON_OBJECT: {
		const char *k;
		const json_t *e;
		bool first = true;
		rc = put(c, b, "{");
		json_object_foreach((json_t *)v, k, e)
		{
			if (!rc && !first)
				rc = put(c, b, ",");
			first = false;
			if (!rc)
				rc = json_string_text(c, b, k, strlen(k));
			if (!rc)
				rc = put(c, b, ":");
			if (!rc)
				rc = json_text(c, b, e, depth + 1);
		}
		return rc ? rc : put(c, b, "}");
	}
	}
	return lp_errf(c->err, -EINVAL, "unknown JSON value at %s", where(c));
}

/* The canonical text of v as a grammar literal. */
static int put_json_lit(struct ctx *c, struct lp_buf *b, const json_t *v)
{
	struct lp_buf t;
	int rc;

	lp_buf_init(&t, c->max);
	rc = json_text(c, &t, v, 0);
	if (!rc)
		rc = put_lit(c, b, t.data ? t.data : "", t.len);
	lp_buf_release(&t);
	return rc;
}

/* ---- character sets and the pattern translator ---- */

struct range {
	uint32_t lo, hi;
};

struct cset {
	struct range *r;
	size_t n, cap;
};

static int cset_add(struct ctx *c, struct cset *s, uint32_t lo, uint32_t hi)
{
	if (s->n == s->cap) {
		size_t cap = s->cap ? 2 * s->cap : 8;
		struct range *r = realloc(s->r, cap * sizeof(*r));
		if (!r)
			return lp_errf(c->err, -ENOMEM, "out of memory");
		s->r = r;
		s->cap = cap;
	}
	s->r[s->n++] = (struct range){lo, hi};
	return 0;
}

static int cmp_range(const void *a, const void *b)
{
	const struct range *x = a, *y = b;
	return x->lo < y->lo ? -1 : x->lo > y->lo;
}

/* Sorts and merges the ranges. */
static void cset_norm(struct cset *s)
{
	size_t j = 0;

	if (!s->n)
		return;
	qsort(s->r, s->n, sizeof(*s->r), cmp_range);
	for (size_t i = 1; i < s->n; i++) {
		if (s->r[i].lo <= s->r[j].hi + 1) {
			if (s->r[i].hi > s->r[j].hi)
				s->r[j].hi = s->r[i].hi;
		} else {
			s->r[++j] = s->r[i];
		}
	}
	s->n = j + 1;
}

/* The complement in U+0000..U+10FFFF (s normalised). */
static int cset_negate(struct ctx *c, struct cset *s)
{
	struct cset o = {0};
	uint32_t next = 0;
	int rc = 0;

	for (size_t i = 0; i < s->n && !rc; i++) {
		if (s->r[i].lo > next)
			rc = cset_add(c, &o, next, s->r[i].lo - 1);
		next = s->r[i].hi + 1;
	}
	if (!rc && next <= 0x10ffff)
		rc = cset_add(c, &o, next, 0x10ffff);
	free(s->r);
	*s = o;
	return rc;
}

static bool cset_has(const struct cset *s, uint32_t cp)
{
	for (size_t i = 0; i < s->n; i++)
		if (cp >= s->r[i].lo && cp <= s->r[i].hi)
			return true;
	return false;
}

static const struct range digit_ranges[] = {{'0', '9'}};
static const struct range word_ranges[] = {{'0', '9'}, {'A', 'Z'}, {'_', '_'}, {'a', 'z'}};
static const struct range space_ranges[] = {
    {0x09, 0x0d},     {0x20, 0x20},     {0xa0, 0xa0},     {0x1680, 0x1680}, {0x2000, 0x200a},
    {0x2028, 0x2029}, {0x202f, 0x202f}, {0x205f, 0x205f}, {0x3000, 0x3000}, {0xfeff, 0xfeff},
};
static const struct range dot_excluded[] = {{0x0a, 0x0a}, {0x0d, 0x0d}, {0x2028, 0x2029}};
/* What a JSON string holds unescaped (surrogates are not characters). */
static const struct range raw_ranges[] = {
    {0x20, 0x21}, {0x23, 0x5b}, {0x5d, 0xd7ff}, {0xe000, 0x10ffff}};

/* Adds the class escape's set (d, w, s; negated for D, W, S). */
static int cset_add_class(struct ctx *c, struct cset *s, char e)
{
	const struct range *r;
	size_t n;
	struct cset t = {0};
	int rc = 0;

	switch (e | 0x20) {
	case 'd':
		r = digit_ranges, n = sizeof(digit_ranges) / sizeof(*r);
		break;
	case 'w':
		r = word_ranges, n = sizeof(word_ranges) / sizeof(*r);
		break;
	default:
		r = space_ranges, n = sizeof(space_ranges) / sizeof(*r);
		break;
	}
	for (size_t i = 0; i < n && !rc; i++)
		rc = cset_add(c, &t, r[i].lo, r[i].hi);
	if (!rc && e >= 'A' && e <= 'Z') {
		cset_norm(&t);
		rc = cset_negate(c, &t);
	}
	for (size_t i = 0; i < t.n && !rc; i++)
		rc = cset_add(c, s, t.r[i].lo, t.r[i].hi);
	free(t.r);
	return rc;
}

/* The grammar items matching one character of s written inside a JSON
 * string: raw where JSON allows it, escaped where JSON requires (", \,
 * controls; U+0000 never). s is normalised. */
static int cset_emit(struct ctx *c, const struct cset *s, struct lp_buf *b, const char *what)
{
	struct lp_buf t;
	int parts = 0, rc = 0;
	size_t n_raw = 0;
	uint32_t single = 0;
	static const char shorts[] = "\b\t\n\f\r";
	static const char short_names[] = "btnfr";
	char esc[8];
	size_t n_esc = 0;
	bool all_ctl = true;

	lp_buf_init(&t, c->max);
	/* raw characters */
	for (size_t i = 0; i < s->n; i++)
		for (size_t k = 0; k < sizeof(raw_ranges) / sizeof(*raw_ranges); k++) {
			uint32_t lo = s->r[i].lo > raw_ranges[k].lo ? s->r[i].lo : raw_ranges[k].lo;
			uint32_t hi = s->r[i].hi < raw_ranges[k].hi ? s->r[i].hi : raw_ranges[k].hi;
			if (lo <= hi)
				n_raw += hi - lo + 1, single = lo;
		}
	if (n_raw == 1) {
		rc = put(c, &t, "\"");
		if (!rc)
			rc = put_cp(c, &t, single, false);
		if (!rc)
			rc = put(c, &t, "\"");
		parts++;
	} else if (n_raw > 1) {
		rc = put(c, &t, "[");
		for (size_t i = 0; i < s->n && !rc; i++)
			for (size_t k = 0; k < sizeof(raw_ranges) / sizeof(*raw_ranges) && !rc;
			     k++) {
				uint32_t lo =
				    s->r[i].lo > raw_ranges[k].lo ? s->r[i].lo : raw_ranges[k].lo;
				uint32_t hi =
				    s->r[i].hi < raw_ranges[k].hi ? s->r[i].hi : raw_ranges[k].hi;
				if (lo > hi)
					continue;
				rc = put_cp(c, &t, lo, true);
				if (!rc && hi > lo)
					rc = put(c, &t, "-");
				if (!rc && hi > lo)
					rc = put_cp(c, &t, hi, true);
			}
		if (!rc)
			rc = put(c, &t, "]");
		parts++;
	}
	if (!rc && cset_has(s, '"'))
		rc = put(c, &t, "%s\"\\\\\\\"\"", parts++ ? " | " : "");
	if (!rc && cset_has(s, '\\'))
		rc = put(c, &t, "%s\"\\\\\\\\\"", parts++ ? " | " : "");
	/* controls: \b \t \n \f \r, the others as \u00XX */
	for (uint32_t cp = 1; cp < 0x20; cp++)
		if (!cset_has(s, cp))
			all_ctl = false;
	for (int i = 0; shorts[i]; i++)
		if (cset_has(s, (unsigned char)shorts[i]))
			esc[n_esc++] = short_names[i];
	esc[n_esc] = '\0';
	if (!rc && n_esc)
		rc = put(c, &t, "%s\"\\\\\" [%s]", parts++ ? " | " : "", esc);
	if (!rc && all_ctl)
		rc = put(c, &t, "%s\"\\\\u00\" ( \"0\" [1-9a-fA-F] | \"1\" [0-9a-fA-F] )",
		         parts++ ? " | " : "");
	for (uint32_t cp = 1; cp < 0x20 && !rc && !all_ctl; cp++)
		if (cset_has(s, cp) && !strchr(shorts, (int)cp))
			rc = put(c, &t, "%s\"\\\\u%04x\"", parts++ ? " | " : "", (unsigned)cp);
	if (!rc && !parts)
		rc = lp_errf(c->err, -EINVAL,
		             "%s at %s needs a character that a JSON string cannot hold here", what,
		             where(c));
	if (!rc)
		rc = put(c, b, parts > 1 ? "( %s )" : "%s", t.data);
	lp_buf_release(&t);
	return rc;
}

struct rx {
	struct ctx *c;
	const char *what; /* "'pattern'" or "format 'date'", for messages */
	const unsigned char *start, *p, *end;
	int depth;
	int in_rep;  /* inside groups repeated more than once */
	long n_unb;  /* unbounded repetitions met (*, +, {m,}, unanchored sides) */
	bool nested; /* one of them is inside another repetition */
	bool budget; /* bound each unbounded repetition to share characters */
	long share;
};

static int rx_fail(struct rx *x, const char *msg)
{
	return lp_errf(x->c->err, -EINVAL, "%s at %s: %s (at offset %zu of the pattern)", x->what,
	               where(x->c), msg, (size_t)(x->p - x->start));
}

static long len_add(long a, long b)
{
	return a == LEN_INF || b == LEN_INF || a > LEN_INF - b ? LEN_INF : a + b;
}

static long len_mul(long a, long n)
{
	if (a == 0 || n == 0)
		return 0;
	if (a == LEN_INF || n == LEN_INF || a > LEN_INF / n)
		return LEN_INF;
	return a * n;
}

/* n hex digits at x->p into *v. */
static int rx_hex(struct rx *x, int n, uint32_t *v)
{
	*v = 0;
	for (int i = 0; i < n; i++) {
		int h = x->p < x->end ? lp_hex_digit(*x->p) : -1;
		if (h < 0)
			return rx_fail(x, "bad hexadecimal escape");
		*v = *v << 4 | (uint32_t)h;
		x->p++;
	}
	return 0;
}

/* An escape after the backslash at x->p: a set (*is_set, added to set) or
 * one character (*cp). */
static int rx_escape(struct rx *x, bool in_class, struct cset *set, bool *is_set, uint32_t *cp)
{
	unsigned char e;
	int k;

	*is_set = false;
	if (x->p >= x->end)
		return rx_fail(x, "a pattern ending in '\\'");
	e = *x->p++;
	switch (e) {
	case 'd':
	case 'D':
	case 'w':
	case 'W':
	case 's':
	case 'S':
		*is_set = true;
		return cset_add_class(x->c, set, (char)e);
	case 'n':
		*cp = '\n';
		return 0;
	case 'r':
		*cp = '\r';
		return 0;
	case 't':
		*cp = '\t';
		return 0;
	case 'f':
		*cp = '\f';
		return 0;
	case 'v':
		*cp = '\v';
		return 0;
	case '0':
		if (x->p < x->end && *x->p >= '0' && *x->p <= '9')
			return rx_fail(x, "octal escapes are not supported");
		*cp = 0;
		return 0;
	case 'b':
		if (in_class) {
			*cp = '\b';
			return 0;
		}
		return rx_fail(x, "word boundaries ('\\b') are not supported");
	case 'B':
		return rx_fail(x, "word boundaries ('\\B') are not supported");
	case 'c':
		if (x->p < x->end && ((*x->p | 0x20) >= 'a' && (*x->p | 0x20) <= 'z')) {
			*cp = *x->p++ % 32;
			return 0;
		}
		return rx_fail(x, "'\\c' needs a letter");
	case 'x':
		return rx_hex(x, 2, cp);
	case 'u':
		if (x->p < x->end && *x->p == '{') {
			uint32_t v = 0;
			int n = 0;
			x->p++;
			while (x->p < x->end && *x->p != '}') {
				int h = lp_hex_digit(*x->p);
				if (h < 0 || ++n > 6)
					return rx_fail(x, "bad '\\u{...}' escape");
				v = v << 4 | (uint32_t)h;
				x->p++;
			}
			if (x->p >= x->end || !n || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff))
				return rx_fail(x, "bad '\\u{...}' escape");
			x->p++;
			*cp = v;
			return 0;
		}
		if ((k = rx_hex(x, 4, cp)))
			return k;
		if (*cp >= 0xd800 && *cp <= 0xdbff && x->end - x->p >= 6 && x->p[0] == '\\' &&
		    x->p[1] == 'u') {
			uint32_t lo;
			x->p += 2;
			if ((k = rx_hex(x, 4, &lo)))
				return k;
			if (lo < 0xdc00 || lo > 0xdfff)
				return rx_fail(x, "a lone surrogate escape");
			*cp = 0x10000 + ((*cp - 0xd800) << 10) + (lo - 0xdc00);
			return 0;
		}
		if (*cp >= 0xd800 && *cp <= 0xdfff)
			return rx_fail(x, "a lone surrogate escape");
		return 0;
	case 'p':
	case 'P':
		return rx_fail(x, "Unicode property escapes ('\\p') are not supported");
	case 'k':
		return rx_fail(x, "backreferences are not supported");
	default:
		break;
	}
	if (e >= '1' && e <= '9')
		return rx_fail(x, "backreferences are not supported");
	if ((e >= 'a' && e <= 'z') || (e >= 'A' && e <= 'Z'))
		return rx_fail(x, "unknown escape");
	x->p--;
	k = utf8_next(x->p, (size_t)(x->end - x->p), cp);
	if (k < 0)
		return rx_fail(x, "invalid UTF-8");
	x->p += k;
	return 0;
}

/* A literal character of the pattern at x->p. */
static int rx_char(struct rx *x, uint32_t *cp)
{
	int k = utf8_next(x->p, (size_t)(x->end - x->p), cp);

	if (k < 0)
		return rx_fail(x, "invalid UTF-8");
	x->p += k;
	return 0;
}

/* [...] after the '['. */
static int rx_class(struct rx *x, struct cset *s)
{
	bool neg = false;
	int rc = 0;

	if (x->p < x->end && *x->p == '^') {
		neg = true;
		x->p++;
	}
	for (;;) {
		uint32_t lo, hi;
		bool is_set;
		if (x->p >= x->end)
			return rx_fail(x, "an unterminated character class");
		if (*x->p == ']') {
			x->p++;
			break;
		}
		if (*x->p == '\\') {
			x->p++;
			rc = rx_escape(x, true, s, &is_set, &lo);
		} else {
			is_set = false;
			rc = rx_char(x, &lo);
		}
		if (rc)
			return rc;
		if (is_set)
			continue;
		if (x->end - x->p >= 2 && x->p[0] == '-' && x->p[1] != ']') {
			x->p++;
			if (*x->p == '\\') {
				x->p++;
				struct cset tmp = {0};
				rc = rx_escape(x, true, &tmp, &is_set, &hi);
				free(tmp.r);
				if (!rc && is_set)
					return rx_fail(x, "a range ending in a class escape");
			} else {
				rc = rx_char(x, &hi);
			}
			if (rc)
				return rc;
			if (hi < lo)
				return rx_fail(x, "a range out of order");
		} else {
			hi = lo;
		}
		if ((rc = cset_add(x->c, s, lo, hi)))
			return rc;
	}
	cset_norm(s);
	return neg ? cset_negate(x->c, s) : 0;
}

static bool rx_at_braces(const struct rx *x);

/* Whether the group whose contents start at x->p is followed by a
 * quantifier that repeats it more than once. */
static bool rx_group_repeated(const struct rx *x)
{
	struct rx y = *x;
	int depth = 1;

	while (y.p < y.end) {
		unsigned char ch = *y.p++;
		if (ch == '\\') {
			if (y.p < y.end)
				y.p++;
		} else if (ch == '[') {
			while (y.p < y.end && *y.p != ']')
				y.p += *y.p == '\\' && y.p + 1 < y.end ? 2 : 1;
			if (y.p < y.end)
				y.p++;
		} else if (ch == '(') {
			depth++;
		} else if (ch == ')' && --depth == 0) {
			if (y.p >= y.end)
				return false;
			if (*y.p == '*' || *y.p == '+')
				return true;
			if (!rx_at_braces(&y))
				return false;
			{
				long m = 0, n;
				for (y.p++; *y.p >= '0' && *y.p <= '9'; y.p++)
					m = m < 100000 ? m * 10 + (*y.p - '0') : m;
				if (*y.p != ',')
					return m > 1;
				if (*++y.p == '}')
					return true;
				for (n = 0; *y.p >= '0' && *y.p <= '9'; y.p++)
					n = n < 100000 ? n * 10 + (*y.p - '0') : n;
				return n > 1;
			}
		}
	}
	return false;
}

/* Whether x->p starts a {m}, {m,} or {m,n} quantifier. */
static bool rx_at_braces(const struct rx *x)
{
	const unsigned char *p = x->p;

	if (p >= x->end || *p != '{')
		return false;
	p++;
	if (p >= x->end || *p < '0' || *p > '9')
		return false;
	while (p < x->end && *p >= '0' && *p <= '9')
		p++;
	if (p < x->end && *p == ',') {
		p++;
		while (p < x->end && *p >= '0' && *p <= '9')
			p++;
	}
	return p < x->end && *p == '}';
}

static int rx_count(struct rx *x, long *v)
{
	long n = 0;

	while (x->p < x->end && *x->p >= '0' && *x->p <= '9') {
		n = n * 10 + (*x->p++ - '0');
		if (n > LP_JSON_SCHEMA_MAX_COUNT)
			return rx_fail(x, "a repetition count above 1000");
	}
	*v = n;
	return 0;
}

static int rx_alt(struct rx *x, struct lp_buf *b, long *mn, long *mx, bool top);

/* One atom (without its quantifier) into b. */
static int rx_atom(struct rx *x, struct lp_buf *b, long *mn, long *mx)
{
	struct cset s = {0};
	uint32_t cp;
	bool is_set = false;
	int rc = 0;
	unsigned char ch = *x->p;

	*mn = *mx = 1;
	switch (ch) {
	case '(':
		x->p++;
		if (x->end - x->p >= 2 && x->p[0] == '?' && x->p[1] == ':') {
			x->p += 2;
		} else if (x->end - x->p >= 3 && x->p[0] == '?' && x->p[1] == '<' &&
		           x->p[2] != '=' && x->p[2] != '!') {
			/* a named group: the name does not matter here */
			while (x->p < x->end && *x->p != '>')
				x->p++;
			if (x->p >= x->end)
				return rx_fail(x, "an unterminated group name");
			x->p++;
		} else if (x->p < x->end && *x->p == '?') {
			return rx_fail(x, "lookaround and inline flags ('(?') are not supported");
		}
		if (++x->depth > RX_MAX_DEPTH)
			return rx_fail(x, "groups nested too deeply");
		{
			bool repeated = rx_group_repeated(x);
			x->in_rep += repeated;
			if ((rc = rx_alt(x, b, mn, mx, false)))
				return rc;
			x->in_rep -= repeated;
		}
		x->depth--;
		if (x->p >= x->end || *x->p != ')')
			return rx_fail(x, "')' expected");
		x->p++;
		return 0;
	case ')':
		return rx_fail(x, "an unmatched ')'");
	case '*':
	case '+':
	case '?':
		return rx_fail(x, "nothing to repeat");
	case '^':
	case '$':
		return rx_fail(x, "anchors are supported only at the start and end of the pattern");
	case '{':
		if (rx_at_braces(x))
			return rx_fail(x, "nothing to repeat");
		x->p++;
		rc = cset_add(x->c, &s, '{', '{');
		break;
	case '[':
		x->p++;
		rc = rx_class(x, &s);
		break;
	case '.':
		x->p++;
		for (size_t i = 0; i < sizeof(dot_excluded) / sizeof(*dot_excluded) && !rc; i++)
			rc = cset_add(x->c, &s, dot_excluded[i].lo, dot_excluded[i].hi);
		if (!rc) {
			cset_norm(&s);
			rc = cset_negate(x->c, &s);
		}
		break;
	case '\\':
		x->p++;
		rc = rx_escape(x, false, &s, &is_set, &cp);
		if (!rc && !is_set)
			rc = cset_add(x->c, &s, cp, cp);
		break;
	default:
		rc = rx_char(x, &cp);
		if (!rc)
			rc = cset_add(x->c, &s, cp, cp);
		break;
	}
	if (!rc) {
		cset_norm(&s);
		rc = cset_emit(x->c, &s, b, x->what);
	}
	free(s.r);
	return rc;
}

/* A sequence up to '|', ')' or the end. At the top, a leading '^' and a
 * trailing '$' set *a_start and *a_end. */
static int rx_seq(struct rx *x, struct lp_buf *b, long *mn, long *mx, bool top, bool *a_start,
                  bool *a_end)
{
	struct lp_buf atom;
	int rc = 0;
	bool empty = true;

	*mn = *mx = 0;
	if (top && x->p < x->end && *x->p == '^') {
		*a_start = true;
		x->p++;
	}
	lp_buf_init(&atom, x->c->max);
	while (!rc && x->p < x->end && *x->p != '|' && *x->p != ')') {
		long amn, amx, lo, hi;
		if (top && *x->p == '$' && (x->p + 1 == x->end || x->p[1] == '|')) {
			*a_end = true;
			x->p++;
			break;
		}
		lp_buf_reset(&atom);
		if ((rc = rx_atom(x, &atom, &amn, &amx)))
			break;
		lo = hi = 1;
		if (x->p < x->end && (*x->p == '*' || *x->p == '+' || *x->p == '?')) {
			lo = *x->p == '+';
			hi = *x->p == '?' ? 1 : LEN_INF;
			x->p++;
		} else if (rx_at_braces(x)) {
			x->p++;
			if ((rc = rx_count(x, &lo)))
				break;
			hi = lo;
			if (*x->p == ',') {
				x->p++;
				hi = LEN_INF;
				if (*x->p != '}' && (rc = rx_count(x, &hi)))
					break;
			}
			x->p++;
			if (hi < lo) {
				rc = rx_fail(x, "a repetition {m,n} with n < m");
				break;
			}
		}
		if (lo != 1 || hi != 1) {
			if (x->p < x->end && *x->p == '?')
				x->p++; /* lazy: the same language */
			if (x->p < x->end &&
			    (*x->p == '*' || *x->p == '+' || *x->p == '?' || rx_at_braces(x))) {
				rc = rx_fail(x, "nothing to repeat");
				break;
			}
			if (amn == 0 && hi == LEN_INF) {
				rc = rx_fail(x, "a repeated group that can match the empty string");
				break;
			}
			if (hi == LEN_INF && !x->budget) {
				x->n_unb++;
				x->nested = x->nested || x->in_rep || amx == LEN_INF;
			} else if (hi == LEN_INF) {
				hi = lo + x->share / amx;
				if (hi > LP_JSON_SCHEMA_MAX_COUNT)
					hi = LP_JSON_SCHEMA_MAX_COUNT > lo
					         ? LP_JSON_SCHEMA_MAX_COUNT
					         : lo;
			}
			rc = put(x->c, b, "( %s )", atom.data);
			if (!rc && hi == LEN_INF)
				rc = lo == 0   ? put(x->c, b, "* ")
				     : lo == 1 ? put(x->c, b, "+ ")
				               : put(x->c, b, "{%ld,} ", lo);
			else if (!rc)
				rc = lo == hi ? put(x->c, b, "{%ld} ", lo)
				              : put(x->c, b, "{%ld,%ld} ", lo, hi);
			*mn = len_add(*mn, len_mul(amn, lo));
			*mx = len_add(*mx, hi == LEN_INF ? (amx ? LEN_INF : 0) : len_mul(amx, hi));
		} else {
			rc = put(x->c, b, "%s ", atom.data);
			*mn = len_add(*mn, amn);
			*mx = len_add(*mx, amx);
		}
		empty = false;
	}
	if (!rc && empty)
		rc = put(x->c, b, "\"\" ");
	lp_buf_release(&atom);
	return rc;
}

/* Alternatives; at the top each may be anchored or not (an unanchored
 * side lets any characters come before or after: a pattern is a search). */
/* The characters an unanchored side lets in: any number, or in budget
 * mode up to the share; *len their most. */
static int rx_side(struct rx *x, struct lp_buf *b, long *len)
{
	if (!x->budget) {
		x->n_unb++;
		*len = LEN_INF;
		return put(x->c, b, "%schar* ", x->c->prefix);
	}
	*len = x->share < LP_JSON_SCHEMA_MAX_COUNT ? x->share : LP_JSON_SCHEMA_MAX_COUNT;
	return *len ? put(x->c, b, "%schar{0,%ld} ", x->c->prefix, *len) : 0;
}

static int rx_alt(struct rx *x, struct lp_buf *b, long *mn, long *mx, bool top)
{
	int rc = put(x->c, b, "( ");
	bool first = true;

	*mn = LEN_INF;
	*mx = 0;
	while (!rc) {
		long smn, smx;
		bool a_start = false, a_end = false;
		if (!first)
			rc = put(x->c, b, "| ");
		long before = 0, after = 0;
		/* any characters before, unless anchored */
		if (!rc && top && !(x->p < x->end && *x->p == '^'))
			rc = rx_side(x, b, &before);
		if (!rc)
			rc = rx_seq(x, b, &smn, &smx, top, &a_start, &a_end);
		if (!rc && top && !a_end)
			rc = rx_side(x, b, &after);
		if (rc)
			break;
		smx = len_add(smx, len_add(before, after));
		if (smn < *mn)
			*mn = smn;
		if (smx > *mx)
			*mx = smx;
		first = false;
		if (x->p < x->end && *x->p == '|') {
			x->p++;
			continue;
		}
		break;
	}
	if (!rc && top && x->p < x->end)
		rc = rx_fail(x, "an unmatched ')'");
	if (!rc && top)
		x->c->helpers |= H_CHAR;
	return rc ? rc : put(x->c, b, ")");
}

static int rx_run(struct rx *x, struct lp_buf *b, long *mn, long *mx)
{
	int rc = put(x->c, b, "\"\\\"\" ");

	if (!rc)
		rc = rx_alt(x, b, mn, mx, true);
	return rc ? rc : put(x->c, b, " \"\\\"\"");
}

/* The grammar items of a JSON string (quotes included) whose decoded
 * text the pattern pat[0..n) (ECMAScript syntax, a search) matches;
 * *mn and *mx: the lengths in characters it allows (LEN_INF: no bound).
 * With maxlen >= 0 and a pattern that allows longer strings, each
 * unbounded repetition (none nested in another) gets an equal share of
 * what maxlen leaves, so that *mx <= maxlen; where that cannot be done,
 * *mx stays above maxlen. */
static int rx_compile(struct ctx *c, const char *what, const char *pat, size_t n, struct lp_buf *b,
                      long maxlen, long *mn, long *mx)
{
	const unsigned char *p = (const unsigned char *)pat;
	struct rx x = {.c = c, .what = what, .start = p, .p = p, .end = p + n};
	size_t start = b->len;
	long base, unb, mn2;
	int rc = rx_run(&x, b, mn, mx);

	if (rc || maxlen < 0 || *mx <= maxlen || x.nested || !x.n_unb)
		return rc;
	unb = x.n_unb;
	/* first with no share: the most the rest allows */
	b->len = start;
	x = (struct rx){.c = c, .what = what, .start = p, .p = p, .end = p + n, .budget = true};
	if ((rc = rx_run(&x, b, &mn2, &base)))
		return rc;
	if (base > maxlen) {
		*mx = base;
		return 0;
	}
	b->len = start;
	x = (struct rx){.c = c,
	                .what = what,
	                .start = p,
	                .p = p,
	                .end = p + n,
	                .budget = true,
	                .share = (maxlen - base) / unb};
	return rx_run(&x, b, &mn2, mx);
}

/* ---- formats, as anchored patterns ---- */

#define FMT_DATE                                                                                   \
	"[0-9]{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]["  \
	"0-9]|30)"                                                                                 \
	"|02-(?:0[1-9]|1[0-9]|2[0-9]))"
#define FMT_TIME                                                                                   \
	"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]{1,9})?(?:Z|[+\\-](?:[01][0-9]|2[0-" \
	"3]):[0-5][0-9])"
#define FMT_LABEL "[A-Za-z0-9](?:[A-Za-z0-9\\-]{0,61}[A-Za-z0-9])?"
#define FMT_OCTET "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
#define FMT_H16   "[0-9a-fA-F]{1,4}"
#define FMT_ATOM  "[A-Za-z0-9!#$%&'*+/=?^_`{|}~\\-]+"

static const struct {
	const char *name, *pattern;
} formats[] = {
    {"date", "^" FMT_DATE "$"},
    {"time", "^" FMT_TIME "$"},
    {"date-time", "^" FMT_DATE "T" FMT_TIME "$"},
    {"uuid", "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"},
    {"email", "^" FMT_ATOM "(?:\\." FMT_ATOM ")*@" FMT_LABEL "(?:\\." FMT_LABEL ")+$"},
    {"hostname", "^" FMT_LABEL "(?:\\." FMT_LABEL ")*$"},
    {"ipv4", "^" FMT_OCTET "\\." FMT_OCTET "\\." FMT_OCTET "\\." FMT_OCTET "$"},
    {"ipv6",
     "^(?:(?:" FMT_H16 ":){7}" FMT_H16 "|(?:" FMT_H16 ":){1,7}:|(?:" FMT_H16 ":){1,6}:" FMT_H16
     "|(?:" FMT_H16 ":){1,5}(?::" FMT_H16 "){1,2}|(?:" FMT_H16 ":){1,4}(?::" FMT_H16
     "){1,3}|(?:" FMT_H16 ":){1,3}(?::" FMT_H16 "){1,4}|(?:" FMT_H16 ":){1,2}(?::" FMT_H16
     "){1,5}|" FMT_H16 ":(?::" FMT_H16 "){1,6}|:(?:(?::" FMT_H16 "){1,7}|:))$"},
    {"uri",
     "^[A-Za-z][A-Za-z0-9+.\\-]*:(?:[A-Za-z0-9._~:/?#@!$&'()*+,;=\\-\\[\\]]|%[0-9A-Fa-f]{2})+$"},
};

/* ---- integers in a range ---- */

#define INT_MAX_VALUE 9999999999999999LL /* LP_JSON_SCHEMA_INT_DIGITS nines */

/* Decimal strings x <= y of the same length n: their range as items. */
static int digits_range(struct ctx *c, struct lp_buf *b, const char *x, const char *y, size_t n)
{
	size_t i = 0;
	int rc = 0;
	bool x_zeros = true, y_nines = true;

	while (i < n && x[i] == y[i])
		i++;
	if (i > 0) {
		rc = put(c, b, "\"%.*s\" ", (int)i, x);
		if (rc || i == n)
			return rc;
	}
	x += i, y += i, n -= i;
	/* x[0] < y[0] from here */
	for (size_t k = 1; k < n; k++) {
		x_zeros = x_zeros && x[k] == '0';
		y_nines = y_nines && y[k] == '9';
	}
	if (n == 1)
		return put(c, b, "[%c-%c] ", x[0], y[0]);
	rc = put(c, b, "( ");
	{
		char lo = x_zeros ? x[0] : (char)(x[0] + 1);
		char hi = y_nines ? y[0] : (char)(y[0] - 1);
		bool any = false;
		char nines[LP_JSON_SCHEMA_INT_DIGITS + 1], zeros[LP_JSON_SCHEMA_INT_DIGITS + 1];
		memset(nines, '9', n - 1);
		memset(zeros, '0', n - 1);
		if (!rc && !x_zeros) {
			rc = put(c, b, "\"%c\" ", x[0]);
			if (!rc)
				rc = digits_range(c, b, x + 1, nines, n - 1);
			any = true;
		}
		if (!rc && lo <= hi) {
			rc = put(c, b, "%s[%c-%c] [0-9]{%zu} ", any ? "| " : "", lo, hi, n - 1);
			any = true;
		}
		if (!rc && !y_nines) {
			rc = put(c, b, "%s\"%c\" ", any ? "| " : "", y[0]);
			if (!rc)
				rc = digits_range(c, b, zeros, y + 1, n - 1);
		}
	}
	return rc ? rc : put(c, b, ") ");
}

/* Non-negative integers lo..hi (canonical decimal) as one group. */
static int uint_range(struct ctx *c, struct lp_buf *b, long long lo, long long hi)
{
	int rc = put(c, b, "( ");
	bool first = true;
	long long p = 1;

	for (int d = 1; d <= LP_JSON_SCHEMA_INT_DIGITS && !rc; d++, p *= 10) {
		long long dlo = d == 1 ? 0 : p, dhi = p * 10 - 1;
		char xs[32], ys[32];
		if (dlo < lo)
			dlo = lo;
		if (dhi > hi)
			dhi = hi;
		if (dlo > dhi)
			continue;
		snprintf(xs, sizeof(xs), "%lld", dlo);
		snprintf(ys, sizeof(ys), "%lld", dhi);
		if (!first)
			rc = put(c, b, "| ");
		if (!rc)
			rc = digits_range(c, b, xs, ys, (size_t)d);
		first = false;
	}
	return rc ? rc : put(c, b, ")");
}

/* A bound keyword as an integer bound; *set false when absent. */
static int int_bound(struct ctx *c, const json_t *s, const char *kw, bool upper, long long *v,
                     bool *set)
{
	const json_t *j = json_object_get(s, kw);
	bool exclusive = kw[0] == 'e';
	double d;

	*set = false;
	if (!j)
		return 0;
	if (!json_is_number(j))
		return lp_errf(c->err, -EINVAL, "'%s' at %s must be a number", kw, where(c));
	if (json_is_integer(j)) {
		long long i = json_integer_value(j);
		if (exclusive)
			i = upper ? (i == LLONG_MIN ? i : i - 1) : (i == LLONG_MAX ? i : i + 1);
		*v = i;
	} else {
		d = json_real_value(j);
		if (upper)
			d = exclusive ? ceil(d) - 1 : floor(d);
		else
			d = exclusive ? floor(d) + 1 : ceil(d);
		*v = d > 1e17 ? INT_MAX_VALUE + 1 : d < -1e17 ? -INT_MAX_VALUE - 1 : (long long)d;
	}
	*set = true;
	return 0;
}

/* An integer with minimum/maximum/exclusiveMinimum/exclusiveMaximum. */
static int compile_integer(struct ctx *c, const json_t *s, struct lp_buf *b)
{
	static const char *const kws[] = {"minimum", "exclusiveMinimum", "maximum",
	                                  "exclusiveMaximum"};
	long long lo = -INT_MAX_VALUE, hi = INT_MAX_VALUE;
	bool any = false;
	int rc = 0;

	for (int i = 0; i < 4; i++) {
		long long v;
		bool set;
		if ((rc = int_bound(c, s, kws[i], i >= 2, &v, &set)))
			return rc;
		if (!set)
			continue;
		any = true;
		if (i < 2 && v > lo)
			lo = v;
		if (i >= 2 && v < hi)
			hi = v;
	}
	if (!any) {
		c->helpers |= H_INTEGER;
		return put(c, b, "%sinteger", c->prefix);
	}
	if (lo > hi)
		return lp_errf(c->err, -EINVAL,
		               "no integer of at most %d digits lies within the bounds at %s",
		               LP_JSON_SCHEMA_INT_DIGITS, where(c));
	rc = put(c, b, "( ");
	if (!rc && lo < 0) {
		rc = put(c, b, "\"-\" ");
		if (!rc)
			rc = uint_range(c, b, hi < 0 ? -hi : 1, -lo);
		if (!rc && hi >= 0)
			rc = put(c, b, " | ");
	}
	if (!rc && hi >= 0)
		rc = uint_range(c, b, lo > 0 ? lo : 0, hi);
	return rc ? rc : put(c, b, " )");
}

/* ---- schemas ---- */

static int compile(struct ctx *c, const json_t *s, int32_t *id_out);

static int count_kw(struct ctx *c, const json_t *s, const char *kw, bool *set, long *v)
{
	const json_t *j = json_object_get(s, kw);

	*set = false;
	if (!j)
		return 0;
	if (!json_is_integer(j) || json_integer_value(j) < 0)
		return lp_errf(c->err, -EINVAL, "'%s' at %s must be a non-negative integer", kw,
		               where(c));
	*v = json_integer_value(j) > LONG_MAX / 2 ? LONG_MAX / 2 : (long)json_integer_value(j);
	*set = true;
	return 0;
}

static int too_big(struct ctx *c, const char *kw, long v)
{
	return lp_errf(c->err, -EINVAL, "'%s' %ld at %s is more than %d", kw, v, where(c),
	               LP_JSON_SCHEMA_MAX_COUNT);
}

/* `unit{lo,hi}` (hi < 0: unbounded) in the grammar's syntax. */
static int put_repeat(struct ctx *c, struct lp_buf *b, const char *unit, long lo, long hi)
{
	if (hi == 0)
		return 0;
	if (hi < 0)
		return lo == 0   ? put(c, b, "%s* ", unit)
		       : lo == 1 ? put(c, b, "%s+ ", unit)
		                 : put(c, b, "%s{%ld,} ", unit, lo);
	if (lo == hi)
		return lo == 1 ? put(c, b, "%s ", unit) : put(c, b, "%s{%ld} ", unit, lo);
	return lo == 0 && hi == 1 ? put(c, b, "%s? ", unit)
	                          : put(c, b, "%s{%ld,%ld} ", unit, lo, hi);
}

static int compile_string(struct ctx *c, const json_t *s, struct lp_buf *b)
{
	const json_t *fmt = json_object_get(s, "format"), *pat = json_object_get(s, "pattern");
	bool has_min, has_max;
	long lmin = 0, lmax = 0, pmn, pmx;
	const char *what = "'pattern'", *text;
	char fwhat[96];
	size_t n;
	int rc;

	if ((rc = count_kw(c, s, "minLength", &has_min, &lmin)) ||
	    (rc = count_kw(c, s, "maxLength", &has_max, &lmax)))
		return rc;
	if (has_min && has_max && lmin > lmax)
		return lp_errf(c->err, -EINVAL,
		               "'minLength' %ld is more than 'maxLength' %ld at %s", lmin, lmax,
		               where(c));
	if (fmt && pat)
		return lp_errf(c->err, -EINVAL,
		               "'pattern' together with 'format' at %s is not supported", where(c));
	if (!fmt && !pat) {
		if (has_min && lmin > LP_JSON_SCHEMA_MAX_COUNT)
			return too_big(c, "minLength", lmin);
		if (has_max && lmax > LP_JSON_SCHEMA_MAX_COUNT)
			return too_big(c, "maxLength", lmax);
		if (!has_min && !has_max) {
			c->helpers |= H_STRING;
			return put(c, b, "%sstring", c->prefix);
		}
		c->helpers |= H_CHAR;
		if ((rc = put(c, b, "\"\\\"\" ")))
			return rc;
		{
			char unit[LP_JSON_SCHEMA_MAX_PREFIX + 8];
			snprintf(unit, sizeof(unit), "%schar", c->prefix);
			rc = put_repeat(c, b, unit, has_min ? lmin : 0, has_max ? lmax : -1);
		}
		return rc ? rc : put(c, b, "\"\\\"\"");
	}
	if (fmt) {
		size_t i;
		if (!json_is_string(fmt))
			return lp_errf(c->err, -EINVAL, "'format' at %s must be a string",
			               where(c));
		for (i = 0; i < sizeof(formats) / sizeof(*formats); i++)
			if (!strcmp(formats[i].name, json_string_value(fmt)))
				break;
		if (i == sizeof(formats) / sizeof(*formats))
			return lp_errf(c->err, -EINVAL, "unsupported format '%.64s' at %s",
			               json_string_value(fmt), where(c));
		snprintf(fwhat, sizeof(fwhat), "format '%s'", formats[i].name);
		what = fwhat;
		text = formats[i].pattern;
		n = strlen(text);
	} else {
		if (!json_is_string(pat))
			return lp_errf(c->err, -EINVAL, "'pattern' at %s must be a string",
			               where(c));
		text = json_string_value(pat);
		n = json_string_length(pat);
	}
	if ((rc = rx_compile(c, what, text, n, b, has_max ? lmax : -1, &pmn, &pmx)))
		return rc;
	/* lengths only where the pattern or format already implies them */
	if ((has_min && lmin > pmn) || (has_max && lmax < pmx))
		return lp_errf(c->err, -EINVAL,
		               "'%s' together with '%s' at %s is not supported (only where "
		               "the %s implies it)",
		               has_min && lmin > pmn ? "minLength" : "maxLength",
		               fmt ? "format" : "pattern", where(c), fmt ? "format" : "pattern");
	return 0;
}

static int compile_array(struct ctx *c, const json_t *s, int32_t id, struct lp_buf *b)
{
	const json_t *items = json_object_get(s, "items");
	bool has_min, has_max;
	long mn = 0, mx = -1;
	char item[LP_JSON_SCHEMA_MAX_PREFIX + 32], rep[LP_JSON_SCHEMA_MAX_PREFIX + 32];
	int rc;

	if ((rc = count_kw(c, s, "minItems", &has_min, &mn)) ||
	    (rc = count_kw(c, s, "maxItems", &has_max, &mx)))
		return rc;
	if (!has_min)
		mn = 0;
	if (!has_max)
		mx = -1;
	if (has_max && mn > mx)
		return lp_errf(c->err, -EINVAL, "'minItems' %ld is more than 'maxItems' %ld at %s",
		               mn, mx, where(c));
	if (mn > LP_JSON_SCHEMA_MAX_COUNT)
		return too_big(c, "minItems", mn);
	if (mx > LP_JSON_SCHEMA_MAX_COUNT)
		return too_big(c, "maxItems", mx);
	c->helpers |= H_WS;
	if (json_is_false(items)) {
		if (mn > 0)
			return lp_errf(c->err, -EINVAL, "'items' false with 'minItems' %ld at %s",
			               mn, where(c));
		mx = 0;
	}
	if (mx == 0)
		return put(c, b, "\"[\" %sws \"]\"", c->prefix);
	if (!items || json_is_true(items)) {
		c->helpers |= H_VALUE;
		snprintf(item, sizeof(item), "%svalue", c->prefix);
	} else if (json_is_array(items)) {
		return lp_errf(c->err, -EINVAL,
		               "'items' as a list (tuple validation) at %s is not supported",
		               where(c));
	} else {
		int32_t child;
		size_t old = path_push(c, "items");
		struct lp_buf nb;
		rc = compile(c, items, &child);
		path_pop(c, old);
		if (rc)
			return rc;
		lp_buf_init(&nb, sizeof(item));
		rc = put_name(c, &nb, child);
		snprintf(item, sizeof(item), "%s", nb.data ? nb.data : "");
		lp_buf_release(&nb);
		if (rc)
			return rc;
	}
	/* rep ::= ws "," ws item */
	snprintf(rep, sizeof(rep), "%sn%d-r", c->prefix, (int)id);
	if ((rc = put(c, c->out, "%s ::= %sws \",\" %sws %s\n", rep, c->prefix, c->prefix, item)))
		return rc;
	if (mn == 0) {
		rc = put(c, b, "\"[\" %sws ( %s ", c->prefix, item);
		if (!rc)
			rc = put_repeat(c, b, rep, 0, mx < 0 ? -1 : mx - 1);
		return rc ? rc : put(c, b, "%sws )? \"]\"", c->prefix);
	}
	rc = put(c, b, "\"[\" %sws %s ", c->prefix, item);
	if (!rc)
		rc = put_repeat(c, b, rep, mn - 1, mx < 0 ? -1 : mx - 1);
	return rc ? rc : put(c, b, "%sws \"]\"", c->prefix);
}

/* ---- names of extra properties ---- */

struct name {
	const char *s;
	size_t n;
};

static int cmp_name(const void *a, const void *b)
{
	const struct name *x = a, *y = b;
	int r = memcmp(x->s, y->s, x->n < y->n ? x->n : y->n);
	return r ? r : x->n < y->n ? -1 : x->n > y->n;
}

/* A trie node of the excluded names: names[lo..hi) share their first d
 * bytes; its rule is "<prefix>n<id>-e<rule>". */
struct trie_node {
	size_t lo, hi, d;
	int rule;
};

/* Rules for a property name (a JSON string, quotes included) that is none
 * of the listed names, as "<prefix>n<id>-ek": the names' trie, where a
 * character that leaves it (or the end, where no name ends) frees the
 * rest. Inside the trie a character may only be spelled the canonical way
 * (no \u escapes, no escape of a character the trie goes on with), so a
 * different spelling cannot sneak a listed name through. */
static int emit_name_exclusion(struct ctx *c, int32_t id, struct name *names, size_t n)
{
	static const char esc_letters[] = "\"\\/bfnrt";
	static const char esc_values[] = "\"\\/\b\f\n\r\t";
	const char *P = c->prefix;
	struct trie_node *stack = NULL;
	size_t top = 0, cap = 0, k = 0;
	int rules = 1, rc = 0;

	c->helpers |= H_CHAR;
	if (n)
		qsort(names, n, sizeof(*names), cmp_name);
	for (size_t i = 0; i < n; i++) /* dedupe */
		if (!k || cmp_name(&names[k - 1], &names[i]))
			names[k++] = names[i];
	n = k;
	rc = put(c, c->out, "%sn%d-ek ::= \"\\\"\" %sn%d-e0\n", P, (int)id, P, (int)id);
	if (!rc && !(stack = malloc(16 * sizeof(*stack))))
		rc = lp_errf(c->err, -ENOMEM, "out of memory");
	cap = 16;
	if (!rc)
		stack[top++] = (struct trie_node){0, n, 0, 0};
	while (top && !rc) {
		struct trie_node t = stack[--top];
		size_t i = t.lo;
		bool ends = false;
		struct lp_buf cls, kids;
		char escs[sizeof(esc_letters)];
		size_t n_esc = 0;

		lp_buf_init(&cls, c->max);
		lp_buf_init(&kids, c->max);
		if (i < t.hi && names[i].n == t.d) {
			ends = true;
			i++;
		}
		rc = put(c, c->out, "%sn%d-e%d ::= ", P, (int)id, t.rule);
		while (i < t.hi && !rc) {
			uint32_t cp;
			const unsigned char *at = (const unsigned char *)names[i].s + t.d;
			int len = utf8_next(at, names[i].n - t.d, &cp);
			size_t j = i + 1;
			struct lp_buf sp;
			if (len < 0) {
				rc = lp_errf(c->err, -EINVAL,
				             "invalid UTF-8 in a property name at %s", where(c));
				break;
			}
			while (j < t.hi && names[j].n >= t.d + (size_t)len &&
			       !memcmp(names[j].s + t.d, at, (size_t)len))
				j++;
			if (top == cap) {
				struct trie_node *ns = realloc(stack, 2 * cap * sizeof(*ns));
				if (!ns) {
					rc = lp_errf(c->err, -ENOMEM, "out of memory");
					break;
				}
				stack = ns;
				cap *= 2;
			}
			stack[top++] = (struct trie_node){i, j, t.d + (size_t)len, rules};
			/* the child: its canonical spelling */
			lp_buf_init(&sp, c->max);
			rc = json_string_text(c, &sp, (const char *)at, (size_t)len);
			if (!rc)
				rc = put(c, &kids, "%s", kids.len ? " | " : "");
			if (!rc)
				rc = put_lit(c, &kids, sp.data + 1, sp.len - 2);
			lp_buf_release(&sp);
			if (!rc)
				rc = put(c, &kids, " %sn%d-e%d", P, (int)id, rules++);
			if (!rc && cp >= 0x20 && cp != '"' && cp != '\\')
				rc = put_cp(c, &cls, cp, true);
			i = j;
		}
		for (int e = 0; esc_letters[e]; e++) {
			bool kid = false;
			for (size_t q = t.lo; q < t.hi; q++)
				if (names[q].n > t.d && names[q].s[t.d] == esc_values[e])
					kid = true;
			if (!kid)
				escs[n_esc++] = esc_letters[e];
		}
		escs[n_esc] = '\0';
		if (!rc)
			rc = put(c, c->out, "%s%s[^\"\\\\\\x00-\\x1f%s] %schar* \"\\\"\"",
			         kids.len ? kids.data : "", kids.len ? " | " : "",
			         cls.len ? cls.data : "", P);
		if (!rc && n_esc) {
			struct lp_buf e;
			lp_buf_init(&e, 64);
			for (size_t q = 0; q < n_esc && !rc; q++)
				rc = put_cp(c, &e, (unsigned char)escs[q], true);
			if (!rc)
				rc = put(c, c->out, " | \"\\\\\" [%s] %schar* \"\\\"\"", e.data, P);
			lp_buf_release(&e);
		}
		if (!rc && !ends)
			rc = put(c, c->out, " | \"\\\"\"");
		if (!rc)
			rc = put(c, c->out, "\n");
		lp_buf_release(&cls);
		lp_buf_release(&kids);
	}
	free(stack);
	return rc;
}

static int compile_object(struct ctx *c, const json_t *s, int32_t id, struct lp_buf *b)
{
	const json_t *props = json_object_get(s, "properties");
	const json_t *req = json_object_get(s, "required");
	const json_t *addl = json_object_get(s, "additionalProperties");
	const char *key;
	const json_t *v;
	size_t n = 0, cap = 0, i;
	struct prop {
		const char *name;
		const json_t *schema;
		bool required;
		int32_t id;
	} *ps = NULL;
	bool extras = false;
	int32_t extra_id = -1;
	const char *P = c->prefix;
	int rc = 0;

	c->helpers |= H_WS;
	if (props && !json_is_object(props))
		return lp_errf(c->err, -EINVAL, "'properties' at %s must be an object", where(c));
	if (req && !json_is_array(req))
		return lp_errf(c->err, -EINVAL, "'required' at %s must be an array", where(c));
	if (addl && !json_is_boolean(addl) && !json_is_object(addl))
		return lp_errf(c->err, -EINVAL,
		               "'additionalProperties' at %s must be a boolean or a schema",
		               where(c));
	/* absent: false where properties are listed (generation only: fewer
	 * properties still validate), any object where none are */
	extras = addl ? !json_is_false(addl) : !props;
	cap = (props ? json_object_size(props) : 0) + (req ? json_array_size(req) : 0);
	if (cap && !(ps = calloc(cap, sizeof(*ps))))
		return lp_errf(c->err, -ENOMEM, "out of memory");
	if (props) {
		json_object_foreach((json_t *)props, key, v)
		{
			ps[n++] = (struct prop){key, v, false, -1};
		}
	}
	for (i = 0; req && i < json_array_size(req); i++) {
		const json_t *r = json_array_get(req, i);
		size_t k;
		if (!json_is_string(r)) {
			rc = lp_errf(c->err, -EINVAL, "'required' at %s must hold strings",
			             where(c));
			goto out;
		}
		for (k = 0; k < n; k++)
			if (!strcmp(ps[k].name, json_string_value(r)))
				break;
		if (k == n) {
			if (!extras) {
				rc = lp_errf(
				    c->err, -EINVAL,
				    "required property '%.64s' at %s is not in 'properties'",
				    json_string_value(r), where(c));
				goto out;
			}
			/* named by required only: an extra property that must be there */
			ps[n++] = (struct prop){json_string_value(r), addl, false, -1};
		}
		ps[k].required = true;
	}
	/* the values' rules */
	for (i = 0; i < n; i++) {
		size_t old;
		if (ps[i].schema == addl && (!props || !json_object_get(props, ps[i].name))) {
			old = path_push(c, "additionalProperties");
		} else {
			old = path_push(c, "properties");
			path_push(c, ps[i].name);
		}
		rc = compile(c, ps[i].schema, &ps[i].id);
		path_pop(c, old);
		if (rc)
			goto out;
	}
	if (extras && json_is_object(addl)) {
		size_t old = path_push(c, "additionalProperties");
		rc = compile(c, addl, &extra_id);
		path_pop(c, old);
		if (rc)
			goto out;
	}
	/* k<i> ::= "\"name\"" ws ":" ws value */
	for (i = 0; i < n && !rc; i++) {
		struct lp_buf t;
		lp_buf_init(&t, c->max);
		rc = json_string_text(c, &t, ps[i].name, strlen(ps[i].name));
		if (!rc)
			rc = put(c, c->out, "%sn%d-k%zu ::= ", P, (int)id, i);
		if (!rc)
			rc = put_lit(c, c->out, t.data, t.len);
		if (!rc)
			rc = put(c, c->out, " %sws \":\" %sws ", P, P);
		if (!rc)
			rc = put_name(c, c->out, ps[i].id);
		if (!rc)
			rc = put(c, c->out, "\n");
		lp_buf_release(&t);
	}
	if (!rc && extras) {
		c->helpers |= H_STRING;
		struct name *names = n ? malloc(n * sizeof(*names)) : NULL;
		if (n && !names)
			rc = lp_errf(c->err, -ENOMEM, "out of memory");
		for (i = 0; i < n && !rc; i++)
			names[i] = (struct name){ps[i].name, strlen(ps[i].name)};
		if (!rc && n)
			rc = emit_name_exclusion(c, id, names, n);
		free(names);
		if (!rc && n)
			rc = put(c, c->out, "%sn%d-x ::= %sn%d-ek %sws \":\" %sws ", P, (int)id, P,
			         (int)id, P, P);
		else if (!rc)
			rc = put(c, c->out, "%sn%d-x ::= %sstring %sws \":\" %sws ", P, (int)id, P,
			         P, P);
		if (!rc && extra_id >= 0)
			rc = put_name(c, c->out, extra_id);
		else if (!rc)
			rc = put(c, c->out, "%svalue", P), c->helpers |= H_VALUE;
		if (!rc)
			rc = put(c, c->out, "\n");
	}
	/* a<i>: the rest from property i once one property is out (each
	 * present one after a comma); a<n> exists only with extras */
	for (i = n + 1; i-- > 0 && !rc;) {
		if (i == 0 && n > 0)
			break; /* a0 is never used: b0 starts with a property */
		if (i == n) {
			if (extras)
				rc = put(c, c->out, "%sn%d-a%zu ::= ( %sws \",\" %sws %sn%d-x )*\n",
				         P, (int)id, i, P, P, P, (int)id);
			continue;
		}
		rc = put(c, c->out, "%sn%d-a%zu ::= %s%sws \",\" %sws %sn%d-k%zu%s", P, (int)id, i,
		         ps[i].required ? "" : "( ", P, P, P, (int)id, i,
		         ps[i].required ? "" : " )?");
		if (!rc && (i + 1 < n || extras))
			rc = put(c, c->out, " %sn%d-a%zu", P, (int)id, i + 1);
		if (!rc)
			rc = put(c, c->out, "\n");
	}
	/* b<i>: from property i with none out yet (at least one comes) */
	for (i = 0; i <= n && !rc; i++) {
		bool last;
		if (i == n) {
			if (extras)
				rc = put(c, c->out, "%sn%d-b%zu ::= %sn%d-x %sn%d-a%zu\n", P,
				         (int)id, i, P, (int)id, P, (int)id, i);
			break;
		}
		last = ps[i].required || (i + 1 == n && !extras);
		rc = put(c, c->out, "%sn%d-b%zu ::= %sn%d-k%zu", P, (int)id, i, P, (int)id, i);
		if (!rc && (i + 1 < n || extras))
			rc = put(c, c->out, " %sn%d-a%zu", P, (int)id, i + 1);
		if (!rc && !last)
			rc = put(c, c->out, " | %sn%d-b%zu", P, (int)id, i + 1);
		if (!rc)
			rc = put(c, c->out, "\n");
		if (last)
			break;
	}
	if (rc)
		goto out;
	if (n == 0 && !extras) {
		rc = put(c, b, "\"{\" %sws \"}\"", P);
	} else {
		bool any_required = false;
		for (i = 0; i < n; i++)
			any_required = any_required || ps[i].required;
		rc = put(c, b, "\"{\" %sws %s%sn%d-b0 %sws %s\"}\"", P, any_required ? "" : "( ", P,
		         (int)id, P, any_required ? "" : ")? ");
	}
out:
	free(ps);
	return rc;
}

/* "type" as a set of T_* bits (0: absent). */
static int type_bits(struct ctx *c, const json_t *s, unsigned *bits)
{
	static const char *const names[] = {"object", "array",   "string", "integer",
	                                    "number", "boolean", "null"};
	const json_t *t = json_object_get(s, "type");
	size_t n = 1;

	*bits = 0;
	if (!t)
		return 0;
	if (json_is_array(t)) {
		n = json_array_size(t);
		if (!n)
			return lp_errf(c->err, -EINVAL, "'type' at %s is an empty list", where(c));
	} else if (!json_is_string(t)) {
		return lp_errf(c->err, -EINVAL,
		               "'type' at %s must be a string or a list of strings", where(c));
	}
	for (size_t i = 0; i < n; i++) {
		const json_t *e = json_is_array(t) ? json_array_get(t, i) : t;
		int k;
		if (!json_is_string(e))
			return lp_errf(c->err, -EINVAL, "'type' at %s must hold strings", where(c));
		for (k = 0; k < 7; k++)
			if (!strcmp(names[k], json_string_value(e)))
				break;
		if (k == 7)
			return lp_errf(c->err, -EINVAL, "unknown type '%.64s' at %s",
			               json_string_value(e), where(c));
		*bits |= 1u << k;
	}
	return 0;
}

static unsigned value_bits(const json_t *v)
{
	switch (json_typeof(v)) {
	case JSON_OBJECT:
		return T_OBJECT;
	case JSON_ARRAY:
		return T_ARRAY;
	case JSON_STRING:
		return T_STRING;
	case JSON_INTEGER:
		return T_INTEGER | T_NUMBER;
	case JSON_REAL:
		return T_NUMBER | (json_real_value(v) == floor(json_real_value(v)) ? T_INTEGER : 0);
	case JSON_TRUE:
	case JSON_FALSE:
		return T_BOOLEAN;
	case JSON_NULL:
		return T_NULL;
	}
	return 0;
}

static int compile_enum(struct ctx *c, const json_t *s, struct lp_buf *b)
{
	const json_t *en = json_object_get(s, "enum"), *cn = json_object_get(s, "const");
	const char *kw = cn ? "const" : "enum";
	unsigned bits;
	size_t n, kept = 0;
	const char *key;
	const json_t *v;
	int rc;

	if (en && cn)
		return lp_errf(c->err, -EINVAL,
		               "'enum' together with 'const' at %s is not supported", where(c));
	json_object_foreach((json_t *)s, key, v)
	{
		if (strcmp(key, "type") && in_list(structural, key))
			return lp_errf(c->err, -EINVAL,
			               "'%s' together with '%s' at %s is not supported", key, kw,
			               where(c));
	}
	if ((rc = type_bits(c, s, &bits)))
		return rc;
	if (en && (!json_is_array(en) || !json_array_size(en)))
		return lp_errf(c->err, -EINVAL, "'enum' at %s must be a non-empty array", where(c));
	n = cn ? 1 : json_array_size(en);
	for (size_t i = 0; i < n && !rc; i++) {
		v = cn ? cn : json_array_get(en, i);
		if (bits && !(value_bits(v) & bits))
			continue;
		if (kept++)
			rc = put(c, b, " | ");
		if (!rc)
			rc = put_json_lit(c, b, v);
	}
	if (!rc && !kept)
		rc = lp_errf(c->err, -EINVAL, "no value of '%s' at %s has the schema's 'type'", kw,
		             where(c));
	return rc;
}

/* Resolves a local reference ("#", "#/a/b~1c", percent-escapes undone). */
static int resolve(struct ctx *c, const char *ref, const json_t **out)
{
	const json_t *n = c->root;
	const char *p = ref;

	if (p[0] != '#')
		return lp_errf(
		    c->err, -EINVAL,
		    "'$ref' '%.100s' at %s: only local references ('#...') are supported", ref,
		    where(c));
	p++;
	if (*p && *p != '/')
		return lp_errf(c->err, -EINVAL,
		               "'$ref' '%.100s' at %s: only JSON pointers ('#/...') are supported",
		               ref, where(c));
	while (*p == '/') {
		char seg[512];
		size_t k = 0;
		p++;
		while (*p && *p != '/') {
			char ch = *p++;
			if (ch == '~' && (*p == '0' || *p == '1'))
				ch = *p++ == '0' ? '~' : '/';
			else if (ch == '%' && lp_hex_digit((unsigned char)p[0]) >= 0 &&
			         lp_hex_digit((unsigned char)p[1]) >= 0) {
				ch = (char)(lp_hex_digit((unsigned char)p[0]) << 4 |
				            lp_hex_digit((unsigned char)p[1]));
				p += 2;
			}
			if (!ch || k + 1 >= sizeof(seg))
				goto not_found;
			seg[k++] = ch;
		}
		seg[k] = '\0';
		if (json_is_object(n)) {
			n = json_object_get(n, seg);
		} else if (json_is_array(n)) {
			char *e;
			unsigned long idx;
			if (!k || (seg[0] == '0' && k > 1) || seg[0] < '0' || seg[0] > '9')
				goto not_found;
			idx = strtoul(seg, &e, 10);
			n = *e ? NULL : json_array_get(n, idx);
		} else {
			n = NULL;
		}
		if (!n)
			goto not_found;
	}
	*out = n;
	return 0;
not_found:
	return lp_errf(c->err, -EINVAL, "'$ref' '%.100s' not found at %s", ref, where(c));
}

static int compile_ref(struct ctx *c, const json_t *ref, int32_t id, struct lp_buf *b)
{
	const json_t *t = NULL;
	char saved[PATH_CAP];
	size_t saved_len = c->path_len;
	int32_t child;
	int rc;

	if (!json_is_string(ref))
		return lp_errf(c->err, -EINVAL, "'$ref' at %s must be a string", where(c));
	if ((rc = resolve(c, json_string_value(ref), &t)))
		return rc;
	/* messages inside the target name its own place */
	memcpy(saved, c->path, sizeof(saved));
	snprintf(c->path, sizeof(c->path), "%s", json_string_value(ref) + 1);
	c->path_len = strlen(c->path);
	rc = compile(c, t, &child);
	memcpy(c->path, saved, sizeof(saved));
	c->path_len = saved_len;
	if (!rc)
		rc = put_name(c, b, child);
	return rc ? rc : add_edge(c, id, child);
}

static int compile_body(struct ctx *c, const json_t *s, int32_t id, struct lp_buf *b)
{
	static const char *const comb_arrays[] = {"anyOf", "oneOf", "allOf"};
	const char *key;
	const json_t *v, *arr = NULL;
	const char *comb = NULL;
	unsigned bits;
	int rc = 0, alts = 0;

	if (json_is_true(s)) {
		c->helpers |= H_VALUE;
		return put(c, b, "%svalue", c->prefix);
	}
	if (json_is_false(s))
		return lp_errf(c->err, -EINVAL, "schema false at %s matches nothing", where(c));
	if (!json_is_object(s))
		return lp_errf(c->err, -EINVAL, "a schema must be an object or a boolean, at %s",
		               where(c));
	json_object_foreach((json_t *)s, key, v)
	{
		if (in_list(annotations, key)) {
			if ((!strcmp(key, "$defs") || !strcmp(key, "definitions")) &&
			    !json_is_object(v))
				return lp_errf(c->err, -EINVAL, "'%s' at %s must be an object", key,
				               where(c));
			continue;
		}
		if (!in_list(structural, key) && !in_list(combinators, key))
			return lp_errf(c->err, -EINVAL, "unsupported keyword '%.64s' at %s", key,
			               where(c));
		if (!strcmp(key, "$ref") || !strcmp(key, "anyOf") || !strcmp(key, "oneOf") ||
		    !strcmp(key, "allOf")) {
			if (comb)
				return lp_errf(c->err, -EINVAL,
				               "'%s' together with '%s' at %s is not supported",
				               comb, key, where(c));
			comb = key;
		}
	}
	if (comb) {
		json_object_foreach((json_t *)s, key, v)
		{
			if (strcmp(key, comb) && !in_list(annotations, key))
				return lp_errf(c->err, -EINVAL,
				               "'%s' together with '%s' at %s is not supported",
				               comb, key, where(c));
		}
		if (!strcmp(comb, "$ref"))
			return compile_ref(c, json_object_get(s, "$ref"), id, b);
		for (int k = 0; k < 3; k++)
			if (!strcmp(comb, comb_arrays[k]))
				arr = json_object_get(s, comb);
		if (!json_is_array(arr) || !json_array_size(arr))
			return lp_errf(c->err, -EINVAL, "'%s' at %s must be a non-empty array",
			               comb, where(c));
		if (!strcmp(comb, "allOf") && json_array_size(arr) > 1)
			return lp_errf(c->err, -EINVAL,
			               "'allOf' with more than one schema at %s is not supported",
			               where(c));
		for (size_t i = 0; i < json_array_size(arr) && !rc; i++) {
			int32_t child;
			size_t old = path_push(c, comb);
			path_push_index(c, i);
			rc = compile(c, json_array_get(arr, i), &child);
			path_pop(c, old);
			if (!rc && i)
				rc = put(c, b, " | ");
			if (!rc)
				rc = put_name(c, b, child);
			if (!rc)
				rc = add_edge(c, id, child);
		}
		return rc;
	}
	if (json_object_get(s, "enum") || json_object_get(s, "const"))
		return compile_enum(c, s, b);
	if ((rc = type_bits(c, s, &bits)))
		return rc;
	if (!bits) {
		/* no type: what the keywords imply, else any value */
		static const char *const obj[] = {"properties", "required", "additionalProperties",
		                                  NULL};
		static const char *const ary[] = {"items", "minItems", "maxItems", NULL};
		static const char *const str[] = {"minLength", "maxLength", "pattern", "format",
		                                  NULL};
		static const char *const num[] = {"minimum", "maximum", "exclusiveMinimum",
		                                  "exclusiveMaximum", NULL};
		json_object_foreach((json_t *)s, key, v)
		{
			bits |= in_list(obj, key)   ? T_OBJECT
			        : in_list(ary, key) ? T_ARRAY
			        : in_list(str, key) ? T_STRING
			        : in_list(num, key) ? T_NUMBER
			                            : 0;
		}
		if (!bits) {
			c->helpers |= H_VALUE;
			return put(c, b, "%svalue", c->prefix);
		}
	}
	if (bits & T_NUMBER) {
		static const char *const num[] = {"minimum", "maximum", "exclusiveMinimum",
		                                  "exclusiveMaximum"};
		bits &= ~(unsigned)T_INTEGER;
		for (int k = 0; k < 4; k++)
			if (json_object_get(s, num[k]))
				return lp_errf(
				    c->err, -EINVAL,
				    "unsupported keyword '%s' at %s (bounds are supported for "
				    "integers, not numbers)",
				    num[k], where(c));
	}
	for (unsigned t = 1; t <= T_NULL && !rc; t <<= 1) {
		if (!(bits & t))
			continue;
		if (alts++)
			rc = put(c, b, " | ");
		if (rc)
			break;
		switch (t) {
		case T_OBJECT:
			rc = compile_object(c, s, id, b);
			break;
		case T_ARRAY:
			rc = compile_array(c, s, id, b);
			break;
		case T_STRING:
			rc = compile_string(c, s, b);
			break;
		case T_INTEGER:
			rc = compile_integer(c, s, b);
			break;
		case T_NUMBER:
			c->helpers |= H_NUMBER;
			rc = put(c, b, "%snumber", c->prefix);
			break;
		case T_BOOLEAN:
			rc = put(c, b, "\"true\" | \"false\"");
			break;
		case T_NULL:
			rc = put(c, b, "\"null\"");
			break;
		}
	}
	return rc;
}

static int compile(struct ctx *c, const json_t *s, int32_t *id_out)
{
	struct lp_buf body;
	int32_t id;
	int rc;

	for (size_t i = 0; i < c->n_nodes; i++)
		if (c->nodes[i].schema == s) {
			*id_out = (int32_t)i;
			return 0;
		}
	if (c->depth >= LP_JSON_SCHEMA_MAX_DEPTH)
		return lp_errf(c->err, -EINVAL, "schema nested deeper than %d levels at %s",
		               LP_JSON_SCHEMA_MAX_DEPTH, where(c));
	if (c->n_nodes == c->cap_nodes) {
		size_t cap = c->cap_nodes ? 2 * c->cap_nodes : 16;
		struct node *n;
		if (c->n_nodes >= INT32_MAX / 2 || !(n = realloc(c->nodes, cap * sizeof(*n))))
			return lp_errf(c->err, -ENOMEM, "out of memory");
		c->nodes = n;
		c->cap_nodes = cap;
	}
	id = (int32_t)c->n_nodes++;
	memset(&c->nodes[id], 0, sizeof(c->nodes[id]));
	c->nodes[id].schema = s;
	memcpy(c->nodes[id].path, c->path, sizeof(c->path));
	*id_out = id;
	lp_buf_init(&body, c->max);
	c->depth++;
	rc = compile_body(c, s, id, &body);
	c->depth--;
	if (!rc)
		rc = put_name(c, c->out, id);
	if (!rc)
		rc = put(c, c->out, " ::= ");
	if (!rc)
		rc = put_buf(c, c->out, &body);
	if (!rc)
		rc = put(c, c->out, "\n");
	lp_buf_release(&body);
	return rc;
}

/* A rule that reaches itself through $ref/anyOf edges alone would be
 * left recursion (no byte in between): refuse it by the schema's place. */
static int check_loops(struct ctx *c)
{
	unsigned char *color = calloc(c->n_nodes ? c->n_nodes : 1, 1);
	struct frame {
		int32_t node;
		size_t edge;
	} *stack = malloc((c->n_nodes ? c->n_nodes : 1) * sizeof(*stack));
	int rc = 0;

	if (!color || !stack) {
		rc = lp_errf(c->err, -ENOMEM, "out of memory");
		goto out;
	}
	for (size_t start = 0; start < c->n_nodes && !rc; start++) {
		size_t top = 0;
		if (color[start])
			continue;
		stack[top++] = (struct frame){(int32_t)start, 0};
		color[start] = 1;
		while (top && !rc) {
			struct frame *f = &stack[top - 1];
			struct node *n = &c->nodes[f->node];
			int32_t to;
			if (f->edge == n->n_edges) {
				color[f->node] = 2;
				top--;
				continue;
			}
			to = n->edges[f->edge++];
			if (color[to] == 1)
				rc = lp_errf(c->err, -EINVAL,
				             "the schema at %s refers to itself through '$ref' or "
				             "'anyOf' before any value starts",
				             c->nodes[to].path[0] ? c->nodes[to].path : "/");
			else if (!color[to]) {
				color[to] = 1;
				stack[top++] = (struct frame){to, 0};
			}
		}
	}
out:
	free(color);
	free(stack);
	return rc;
}

static int check_prefix(const char *prefix, struct lp_err *err)
{
	size_t n = strlen(prefix);

	if (n > LP_JSON_SCHEMA_MAX_PREFIX)
		return lp_errf(err, -EINVAL, "a rule prefix longer than %d bytes",
		               LP_JSON_SCHEMA_MAX_PREFIX);
	for (size_t i = 0; i < n; i++) {
		char ch = prefix[i];
		if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
		      (ch >= '0' && ch <= '9') || ch == '_' || ch == '-'))
			return lp_errf(err, -EINVAL,
			               "rule prefix '%.64s' has a character outside "
			               "[A-Za-z0-9_-]",
			               prefix);
	}
	return 0;
}

/* The shared rules the compiled ones use. */
static int emit_helpers(struct ctx *c)
{
	const char *P = c->prefix;
	unsigned h = c->helpers;
	int rc = 0;

	if (h & H_VALUE)
		h |= H_WS | H_STRING | H_NUMBER;
	if (h & H_STRING)
		h |= H_CHAR;
	if (h & H_NUMBER)
		h |= H_INTEGER;
	if (h & H_WS)
		rc = put(c, c->out, "%sws ::= ( \" \" | \"\\n\" \" \"{0,%d} )?\n", P,
		         LP_JSON_SCHEMA_MAX_INDENT);
	if (!rc && (h & H_CHAR))
		rc = put(
		    c, c->out,
		    "%schar ::= [^\"\\\\\\x00-\\x1f] | \"\\\\\" ( [\"\\\\/bfnrt] | \"u\" %su4 )\n"
		    "%su4 ::= \"00\" ( \"0\" [1-9a-fA-F] | [1-9a-fA-F] [0-9a-fA-F] )"
		    " | \"0\" [1-9a-fA-F] [0-9a-fA-F]{2} | [1-9a-cA-CeEfF] [0-9a-fA-F]{3}"
		    " | [dD] [0-7] [0-9a-fA-F]{2}"
		    " | [dD] [89abAB] [0-9a-fA-F]{2} \"\\\\u\" [dD] [c-fC-F] [0-9a-fA-F]{2}\n",
		    P, P, P);
	if (!rc && (h & H_STRING))
		rc = put(c, c->out, "%sstring ::= \"\\\"\" %schar* \"\\\"\"\n", P, P);
	if (!rc && (h & H_INTEGER))
		rc = put(c, c->out, "%sinteger ::= \"-\"? ( \"0\" | [1-9] [0-9]{0,%d} )\n", P,
		         LP_JSON_SCHEMA_INT_DIGITS - 1);
	if (!rc && (h & H_NUMBER))
		rc = put(
		    c, c->out,
		    "%snumber ::= %sinteger ( \".\" [0-9]{1,%d} )? ( [eE] [+\\-]? [0-9]{1,%d} )?\n",
		    P, P, LP_JSON_SCHEMA_FRAC_DIGITS, LP_JSON_SCHEMA_EXP_DIGITS);
	if (!rc && (h & H_VALUE))
		rc = put(
		    c, c->out,
		    "%svalue ::= %sobject | %sarray | %sstring | %snumber | \"true\" | \"false\""
		    " | \"null\"\n"
		    "%sobject ::= \"{\" %sws ( %smember ( %sws \",\" %sws %smember )* %sws )? "
		    "\"}\"\n"
		    "%smember ::= %sstring %sws \":\" %sws %svalue\n"
		    "%sarray ::= \"[\" %sws ( %svalue ( %sws \",\" %sws %svalue )* %sws )? \"]\"\n",
		    P, P, P, P, P, P, P, P, P, P, P, P, P, P, P, P, P, P, P, P, P, P, P, P);
	return rc;
}

static int run(const json_t *schema, const char *prefix, int any, struct lp_buf *out,
               struct lp_err *err)
{
	struct ctx c = {0};
	size_t start = out->len;
	int32_t root;
	int rc;

	if ((rc = check_prefix(prefix, err)))
		return rc;
	c.root = schema;
	c.prefix = prefix;
	c.err = err;
	c.out = out;
	c.max = out->max;
	if (any == 1) {
		c.helpers = H_VALUE;
		rc = put(&c, out, "%sroot ::= %sobject\n", prefix, prefix);
	} else if (any == 2) {
		c.helpers = H_VALUE;
		rc = put(&c, out, "%sroot ::= %svalue\n", prefix, prefix);
	} else if (!schema) {
		rc = lp_errf(err, -EINVAL, "no schema");
	} else {
		rc = compile(&c, schema, &root);
		if (!rc)
			rc = check_loops(&c);
	}
	if (!rc)
		rc = emit_helpers(&c);
	for (size_t i = 0; i < c.n_nodes; i++)
		free(c.nodes[i].edges);
	free(c.nodes);
	if (rc) {
		out->len = start;
		if (out->data)
			out->data[start] = '\0';
	}
	return rc;
}

int lp_json_schema_grammar(const json_t *schema, const char *prefix, struct lp_buf *out,
                           struct lp_err *err)
{
	return run(schema, prefix, 0, out, err);
}

int lp_json_object_grammar(const char *prefix, struct lp_buf *out, struct lp_err *err)
{
	return run(NULL, prefix, 1, out, err);
}

int lp_json_value_grammar(const char *prefix, struct lp_buf *out, struct lp_err *err)
{
	return run(NULL, prefix, 2, out, err);
}
