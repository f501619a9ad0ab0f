/* Grammars for constrained decoding; see grammar.h for the text, the
 * matching and the masks.
 *
 * A parsed grammar is a flat array of elements: each rule's alternatives
 * are runs of SET (one byte out of a 256-bit set) and REF (another rule)
 * elements, each run closed by END. Repetitions and groups become
 * auxiliary rules; classes become a SET, or an auxiliary rule over the
 * UTF-8 byte sequences of their code points.
 *
 * A stack is a chain of frames (position, parent) in an arena; frames are
 * hash-consed, so equal stacks are the same index and a state (a set of
 * stack tops) dedups by index. Every top of a state points at a SET: a
 * REF is expanded into its alternatives as soon as it is reached, and an
 * END pops. A REF that closes its alternative does not keep its
 * continuation (a tail call), so `x*` runs in constant stack depth. */
#include "agent/engine/grammar.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "agent/engine/tokenizer.h"
#include "common/hex.h"

enum { EL_SET, EL_REF, EL_END };

struct element {
	uint8_t kind;
	int32_t arg; /* SET: index of the byte set; REF: the rule */
};

struct byteset {
	uint32_t w[8];
};

/* A mask cache key: the positions of a stack's top frames, top first, as
 * many as can be left without matching a byte more (KEY_MAX at most);
 * bottom when they are the whole stack. */
#define KEY_MAX 8

struct mask_key {
	int32_t pos[KEY_MAX];
	int32_t n;
	bool bottom;
};

struct mask_entry {
	struct mask_key key;
	uint32_t *accepted; /* [words] accepted whatever lies below the key */
	int32_t *unc;       /* [n_unc] sorted-vocabulary indices of the uncertain tokens */
	int32_t *unc_lcp;   /* [n_unc] bytes shared with the previous uncertain token */
	int32_t n_unc;
};

struct lp_grammar {
	int refs;
	struct element *el; /* [n_el] */
	int32_t n_el;
	struct byteset *sets; /* [n_sets] */
	int32_t n_sets;
	int32_t n_rules;
	int32_t *rule_alt;  /* [n_rules + 1]: rule r's alternatives are alt_start[rule_alt[r] ..
	                       rule_alt[r+1]) */
	int32_t *alt_start; /* element index of each alternative's first element */
	int32_t root;
	bool *nullable_from; /* [n_el]: the elements from here to END can match "" */
	/* masks, built as keys are met (the engine thread only): an open
	 * addressing table */
	const struct lp_grammar_vocab *vocab;
	struct mask_entry **cache; /* [cache_cap], NULL: free */
	size_t cache_cap, cache_n;
	size_t cache_bytes; /* of the entries' masks and lists, up to LP_GRAMMAR_CACHE_BYTES */
};

/* ---- the parser ---- */

struct evec {
	struct element *v;
	size_t n, cap;
};

struct prule {
	char *name; /* NULL for auxiliary rules */
	int line;
	bool defined;
	int32_t first_alt; /* index in the parser's alt list, chained */
};

struct palt {
	int32_t rule;
	struct evec e;
};

struct parser {
	const char *s, *p, *end;
	int line;
	struct lp_err *err;
	struct prule *rules;
	size_t n_rules, cap_rules;
	struct palt *alts;
	size_t n_alts, cap_alts;
	struct byteset *sets;
	size_t n_sets, cap_sets;
	int32_t single[256]; /* set index of each one-byte set, or -1 */
	size_t n_elements;   /* over all alternatives, for the cap */
	int depth;           /* nesting of groups */
};

#define MAX_DEPTH 200
#define MAX_NAME  128

static int perr(struct parser *ps, const char *fmt, const char *what)
{
	return lp_errf(ps->err, -EINVAL, fmt, ps->line, what);
}

static int grow(void **p, size_t *cap, size_t need, size_t size)
{
	size_t c = *cap ? *cap : 16;
	void *q;

	if (need <= *cap)
		return 0;
	while (c < need)
		c *= 2;
	if (!(q = realloc(*p, c * size)))
		return -ENOMEM;
	*p = q;
	*cap = c;
	return 0;
}

static int evec_push(struct parser *ps, struct evec *v, int kind, int32_t arg)
{
	if (++ps->n_elements > LP_GRAMMAR_MAX_ELEMENTS)
		return lp_errf(
		    ps->err, -EINVAL,
		    "the grammar has more than %d elements once repetitions are expanded",
		    LP_GRAMMAR_MAX_ELEMENTS);
	if (grow((void **)&v->v, &v->cap, v->n + 1, sizeof(*v->v)))
		return lp_errf(ps->err, -ENOMEM, "out of memory");
	v->v[v->n++] = (struct element){(uint8_t)kind, arg};
	return 0;
}

static int evec_append(struct parser *ps, struct evec *v, const struct element *e, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		int rc = evec_push(ps, v, e[i].kind, e[i].arg);
		if (rc)
			return rc;
	}
	return 0;
}

static int32_t new_rule(struct parser *ps, const char *name, size_t len)
{
	struct prule *r;

	if (grow((void **)&ps->rules, &ps->cap_rules, ps->n_rules + 1, sizeof(*ps->rules)))
		return -1;
	r = &ps->rules[ps->n_rules];
	*r = (struct prule){NULL, ps->line, false, -1};
	if (name) {
		if (!(r->name = malloc(len + 1)))
			return -1;
		memcpy(r->name, name, len);
		r->name[len] = 0;
	}
	return (int32_t)ps->n_rules++;
}

static int32_t find_rule(struct parser *ps, const char *name, size_t len)
{
	for (size_t i = 0; i < ps->n_rules; i++)
		if (ps->rules[i].name && strlen(ps->rules[i].name) == len &&
		    !memcmp(ps->rules[i].name, name, len))
			return (int32_t)i;
	return new_rule(ps, name, len);
}

/* Adds alternative e (taken) to rule r. */
static int add_alt(struct parser *ps, int32_t r, struct evec *e)
{
	if (grow((void **)&ps->alts, &ps->cap_alts, ps->n_alts + 1, sizeof(*ps->alts))) {
		free(e->v);
		return lp_errf(ps->err, -ENOMEM, "out of memory");
	}
	ps->alts[ps->n_alts++] = (struct palt){r, *e};
	*e = (struct evec){0};
	return 0;
}

static int32_t add_set(struct parser *ps, const struct byteset *b)
{
	int n = 0, only = -1;

	for (int c = 0; c < 256; c++)
		if (b->w[c >> 5] >> (c & 31) & 1) {
			n++;
			only = c;
		}
	if (n == 1 && ps->single[only] >= 0)
		return ps->single[only];
	for (size_t i = 0; i < ps->n_sets; i++)
		if (!memcmp(&ps->sets[i], b, sizeof(*b)))
			return (int32_t)i;
	if (grow((void **)&ps->sets, &ps->cap_sets, ps->n_sets + 1, sizeof(*ps->sets)))
		return -1;
	ps->sets[ps->n_sets] = *b;
	if (n == 1)
		ps->single[only] = (int32_t)ps->n_sets;
	return (int32_t)ps->n_sets++;
}

static void set_range(struct byteset *b, unsigned lo, unsigned hi)
{
	for (unsigned c = lo; c <= hi; c++)
		b->w[c >> 5] |= 1u << (c & 31);
}

static int push_byte(struct parser *ps, struct evec *v, unsigned c)
{
	struct byteset b = {{0}};
	int32_t s;

	set_range(&b, c, c);
	if ((s = add_set(ps, &b)) < 0)
		return lp_errf(ps->err, -ENOMEM, "out of memory");
	return evec_push(ps, v, EL_SET, s);
}

static int utf8_encode(uint32_t cp, unsigned char *o)
{
	if (cp < 0x80) {
		o[0] = (unsigned char)cp;
		return 1;
	}
	if (cp < 0x800) {
		o[0] = (unsigned char)(0xc0 | cp >> 6);
		o[1] = (unsigned char)(0x80 | (cp & 0x3f));
		return 2;
	}
	if (cp < 0x10000) {
		o[0] = (unsigned char)(0xe0 | cp >> 12);
		o[1] = (unsigned char)(0x80 | (cp >> 6 & 0x3f));
		o[2] = (unsigned char)(0x80 | (cp & 0x3f));
		return 3;
	}
	o[0] = (unsigned char)(0xf0 | cp >> 18);
	o[1] = (unsigned char)(0x80 | (cp >> 12 & 0x3f));
	o[2] = (unsigned char)(0x80 | (cp >> 6 & 0x3f));
	o[3] = (unsigned char)(0x80 | (cp & 0x3f));
	return 4;
}

static void skip_space(struct parser *ps, bool newlines)
{
	while (ps->p < ps->end) {
		char c = *ps->p;
		if (c == '#') {
			while (ps->p < ps->end && *ps->p != '\n')
				ps->p++;
		} else if (c == '\n' && newlines) {
			ps->line++;
			ps->p++;
		} else if (c == ' ' || c == '\t' || c == '\r') {
			ps->p++;
		} else {
			break;
		}
	}
}

static bool is_name_char(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
	       c == '_' || c == '-';
}

/* One character of a literal or class at ps->p (escapes undone) into *cp. */
static int read_char(struct parser *ps, uint32_t *cp)
{
	const unsigned char *p = (const unsigned char *)ps->p;
	const unsigned char *end = (const unsigned char *)ps->end;

	if (p >= end)
		return perr(ps, "line %d: %s", "unterminated literal or class");
	if (*p == '\\') {
		int digits = 0;
		if (p + 1 >= end)
			return perr(ps, "line %d: %s", "unterminated escape");
		switch (p[1]) {
		case 'n':
			*cp = '\n';
			break;
		case 'r':
			*cp = '\r';
			break;
		case 't':
			*cp = '\t';
			break;
		case 'b':
			*cp = '\b';
			break;
		case 'f':
			*cp = '\f';
			break;
		case 'x':
			digits = 2;
			break;
		case 'u':
			digits = 4;
			break;
		case 'U':
			digits = 8;
			break;
		case '"':
		case '\\':
		case ']':
		case '[':
		case '-':
		case '^':
		case '/':
			*cp = p[1];
			break;
		default:
			return perr(ps, "line %d: unknown escape '\\%s'",
			            (const char[]){(char)p[1], 0});
		}
		if (digits) {
			uint32_t v = 0;
			if (end - p < 2 + digits)
				return perr(ps, "line %d: %s", "short hexadecimal escape");
			for (int i = 0; i < digits; i++) {
				int h = lp_hex_digit((char)p[2 + i]);
				if (h < 0)
					return perr(ps, "line %d: %s", "bad hexadecimal escape");
				v = v << 4 | (uint32_t)h;
			}
			if (v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff))
				return perr(ps, "line %d: %s",
				            "an escape that is not a Unicode scalar value");
			*cp = v;
		}
		ps->p += 2 + digits;
		return 0;
	}
	if (*p == '\n')
		return perr(ps, "line %d: %s", "a line break inside a literal or class");
	{
		/* one UTF-8 character of the grammar text */
		int n = *p < 0x80             ? 1
		        : (*p & 0xe0) == 0xc0 ? 2
		        : (*p & 0xf0) == 0xe0 ? 3
		        : (*p & 0xf8) == 0xf0 ? 4
		                              : 0;
		uint32_t v;
		if (!n || end - p < n)
			return perr(ps, "line %d: %s", "invalid UTF-8 in the grammar");
		v = n == 1 ? *p : (uint32_t)(*p & (0x7f >> n));
		for (int i = 1; i < n; i++) {
			if ((p[i] & 0xc0) != 0x80)
				return perr(ps, "line %d: %s", "invalid UTF-8 in the grammar");
			v = v << 6 | (p[i] & 0x3f);
		}
		if ((n == 2 && v < 0x80) || (n == 3 && v < 0x800) || (n == 4 && v < 0x10000) ||
		    v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff))
			return perr(ps, "line %d: %s", "invalid UTF-8 in the grammar");
		*cp = v;
		ps->p += n;
	}
	return 0;
}

/* ---- classes: code point ranges to UTF-8 byte sequences ---- */

struct cprange {
	uint32_t lo, hi;
};

static int cmp_range(const void *a, const void *b)
{
	const struct cprange *x = a, *y = b;
	return x->lo < y->lo ? -1 : x->lo > y->lo;
}

/* A sequence of 1..4 byte ranges. */
struct bseq {
	int n;
	uint8_t lo[4], hi[4];
};

struct bseqs {
	struct bseq *v;
	size_t n, cap;
};

static int add_bseq(struct bseqs *o, uint32_t lo, uint32_t hi)
{
	unsigned char a[4], b[4];
	int n = utf8_encode(lo, a);
	struct bseq s = {.n = n};

	utf8_encode(hi, b);
	for (int i = 0; i < n; i++) {
		s.lo[i] = a[i];
		s.hi[i] = b[i];
	}
	if (grow((void **)&o->v, &o->cap, o->n + 1, sizeof(*o->v)))
		return -ENOMEM;
	o->v[o->n++] = s;
	return 0;
}

/* Splits [lo, hi] (no surrogates inside) into ranges whose UTF-8
 * encodings are byte-wise rectangles: same length, and every byte
 * between the bounds' bytes. */
static int split_utf8(struct bseqs *o, uint32_t lo, uint32_t hi)
{
	static const uint32_t len_max[] = {0x7f, 0x7ff, 0xffff, 0x10ffff};

	for (int i = 0; i < 3; i++)
		if (lo <= len_max[i] && hi > len_max[i]) {
			int rc = split_utf8(o, lo, len_max[i]);
			return rc ? rc : split_utf8(o, len_max[i] + 1, hi);
		}
	if (hi < 0x80)
		return add_bseq(o, lo, hi);
	for (int i = 1; i < 4; i++) {
		uint32_t m = (1u << (6 * i)) - 1;
		if ((lo & ~m) != (hi & ~m)) {
			if (lo & m) {
				int rc = split_utf8(o, lo, lo | m);
				return rc ? rc : split_utf8(o, (lo | m) + 1, hi);
			}
			if ((hi & m) != m) {
				int rc = split_utf8(o, lo, (hi & ~m) - 1);
				return rc ? rc : split_utf8(o, hi & ~m, hi);
			}
		}
	}
	return add_bseq(o, lo, hi);
}

/* The items matching one character out of the ranges (sorted, merged):
 * a single SET when every range is ASCII, else a REF to an auxiliary
 * rule with one alternative per byte sequence shape (sequences with the
 * same tail share one alternative, their first bytes merged). */
static int class_items(struct parser *ps, struct cprange *r, size_t n, struct evec *out)
{
	struct bseqs q = {0};
	int32_t rule;
	int rc = 0;

	for (size_t i = 0; i < n && !rc; i++) {
		uint32_t lo = r[i].lo, hi = r[i].hi;
		/* surrogates are not characters */
		if (lo < 0xd800 && hi >= 0xd800) {
			if (hi > 0xdfff)
				rc = split_utf8(&q, 0xe000, hi);
			hi = 0xd7ff;
		} else if (lo >= 0xd800 && lo <= 0xdfff) {
			lo = 0xe000;
		}
		if (!rc && lo <= hi)
			rc = split_utf8(&q, lo, hi);
	}
	if (rc) {
		free(q.v);
		return lp_errf(ps->err, -ENOMEM, "out of memory");
	}
	{
		struct byteset ascii = {{0}};
		bool all_ascii = true, any_ascii = false;
		for (size_t i = 0; i < q.n; i++) {
			if (q.v[i].n == 1) {
				set_range(&ascii, q.v[i].lo[0], q.v[i].hi[0]);
				any_ascii = true;
			} else {
				all_ascii = false;
			}
		}
		if (all_ascii) {
			int32_t s = add_set(ps, &ascii);
			free(q.v);
			if (s < 0)
				return lp_errf(ps->err, -ENOMEM, "out of memory");
			return evec_push(ps, out, EL_SET, s);
		}
		if ((rule = new_rule(ps, NULL, 0)) < 0) {
			free(q.v);
			return lp_errf(ps->err, -ENOMEM, "out of memory");
		}
		if (any_ascii) {
			struct evec a = {0};
			int32_t s = add_set(ps, &ascii);
			if (s < 0 || (rc = evec_push(ps, &a, EL_SET, s)) ||
			    (rc = add_alt(ps, rule, &a))) {
				free(a.v);
				free(q.v);
				return rc ? rc : lp_errf(ps->err, -ENOMEM, "out of memory");
			}
		}
	}
	for (size_t i = 0; i < q.n && !rc; i++) {
		struct byteset first = {{0}};
		struct evec a = {0};
		if (q.v[i].n == 1)
			continue;
		/* merge the first bytes of later sequences with the same tail */
		for (size_t j = i; j < q.n; j++) {
			if (q.v[j].n != q.v[i].n ||
			    memcmp(q.v[j].lo + 1, q.v[i].lo + 1, (size_t)q.v[i].n - 1) ||
			    memcmp(q.v[j].hi + 1, q.v[i].hi + 1, (size_t)q.v[i].n - 1))
				continue;
			set_range(&first, q.v[j].lo[0], q.v[j].hi[0]);
			if (j > i)
				q.v[j].n = 1; /* taken */
		}
		for (int k = 0; k < q.v[i].n && !rc; k++) {
			struct byteset b = {{0}};
			int32_t s;
			if (k == 0)
				b = first;
			else
				set_range(&b, q.v[i].lo[k], q.v[i].hi[k]);
			if ((s = add_set(ps, &b)) < 0)
				rc = lp_errf(ps->err, -ENOMEM, "out of memory");
			else
				rc = evec_push(ps, &a, EL_SET, s);
		}
		if (!rc)
			rc = add_alt(ps, rule, &a);
		free(a.v);
	}
	free(q.v);
	return rc ? rc : evec_push(ps, out, EL_REF, rule);
}

/* [class] or [^class] at ps->p (after the '['), or `.` when dot. */
static int parse_class(struct parser *ps, bool dot, struct evec *out)
{
	struct cprange *r = NULL, *m = NULL;
	size_t n = 0, cap = 0, k = 0;
	bool neg = false;
	int rc = 0;

	if (dot) {
		neg = true;
	} else {
		if (ps->p < ps->end && *ps->p == '^') {
			neg = true;
			ps->p++;
		}
		while (!rc) {
			uint32_t lo, hi;
			if (ps->p >= ps->end) {
				rc = perr(ps, "line %d: %s", "unterminated class");
				break;
			}
			if (*ps->p == ']') {
				ps->p++;
				break;
			}
			if ((rc = read_char(ps, &lo)))
				break;
			hi = lo;
			if (ps->end - ps->p >= 2 && ps->p[0] == '-' && ps->p[1] != ']') {
				ps->p++;
				if ((rc = read_char(ps, &hi)))
					break;
				if (hi < lo) {
					rc = perr(ps, "line %d: %s",
					          "a class range that runs backwards");
					break;
				}
			}
			if (grow((void **)&r, &cap, n + 1, sizeof(*r)))
				rc = lp_errf(ps->err, -ENOMEM, "out of memory");
			else
				r[n++] = (struct cprange){lo, hi};
		}
	}
	if (rc)
		goto out;
	if (n)
		qsort(r, n, sizeof(*r), cmp_range);
	/* merge, then complement when negated */
	if (!(m = malloc((n + 1) * sizeof(*m)))) {
		rc = lp_errf(ps->err, -ENOMEM, "out of memory");
		goto out;
	}
	for (size_t i = 0; i < n; i++) {
		if (k && r[i].lo <= m[k - 1].hi + 1) {
			if (r[i].hi > m[k - 1].hi)
				m[k - 1].hi = r[i].hi;
		} else {
			m[k++] = r[i];
		}
	}
	if (neg) {
		size_t j = 0;
		uint32_t next = 0;
		struct cprange *c = malloc((k + 1) * sizeof(*c));
		if (!c) {
			rc = lp_errf(ps->err, -ENOMEM, "out of memory");
			goto out;
		}
		for (size_t i = 0; i < k; i++) {
			if (m[i].lo > next)
				c[j++] = (struct cprange){next, m[i].lo - 1};
			next = m[i].hi + 1;
		}
		if (next <= 0x10ffff)
			c[j++] = (struct cprange){next, 0x10ffff};
		free(m);
		m = c;
		k = j;
	}
	rc = class_items(ps, m, k, out);
out:
	free(r);
	free(m);
	return rc;
}

static int parse_alternatives(struct parser *ps, int32_t rule);

/* x? x* x+ x{m} x{m,} x{m,n} applied to the items unit[0..n) at the
 * end of out (they are moved into auxiliary rules as needed). */
static int repeat(struct parser *ps, struct evec *out, size_t from, long lo, long hi)
{
	struct element *unit = NULL;
	size_t n = out->n - from;
	int32_t tail = -1;
	int rc = 0;

	if (n == 0)
		return 0;
	if (!(unit = malloc(n * sizeof(*unit))))
		return lp_errf(ps->err, -ENOMEM, "out of memory");
	memcpy(unit, out->v + from, n * sizeof(*unit));
	out->n = from;
	ps->n_elements -= n;
	for (long i = 0; i < lo && !rc; i++)
		rc = evec_append(ps, out, unit, n);
	if (!rc && hi < 0) {
		/* star ::= unit star | "" */
		struct evec a = {0}, e = {0};
		if ((tail = new_rule(ps, NULL, 0)) < 0)
			rc = lp_errf(ps->err, -ENOMEM, "out of memory");
		if (!rc && !(rc = evec_append(ps, &a, unit, n)) &&
		    !(rc = evec_push(ps, &a, EL_REF, tail)) && !(rc = add_alt(ps, tail, &a)))
			rc = add_alt(ps, tail, &e);
		free(a.v);
		if (!rc)
			rc = evec_push(ps, out, EL_REF, tail);
	} else if (!rc && hi > lo) {
		/* opt_k ::= unit opt_{k-1} | "", nested hi - lo deep */
		for (long k = 0; k < hi - lo && !rc; k++) {
			struct evec a = {0}, e = {0};
			int32_t r = new_rule(ps, NULL, 0);
			if (r < 0) {
				rc = lp_errf(ps->err, -ENOMEM, "out of memory");
				break;
			}
			if (!(rc = evec_append(ps, &a, unit, n)) &&
			    (tail < 0 || !(rc = evec_push(ps, &a, EL_REF, tail))) &&
			    !(rc = add_alt(ps, r, &a)))
				rc = add_alt(ps, r, &e);
			free(a.v);
			tail = r;
		}
		if (!rc)
			rc = evec_push(ps, out, EL_REF, tail);
	}
	free(unit);
	return rc;
}

static int parse_number(struct parser *ps, long *v)
{
	long x = 0;
	const char *start = ps->p;

	while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') {
		x = x * 10 + (*ps->p - '0');
		if (x > LP_GRAMMAR_MAX_REPEAT)
			return lp_errf(ps->err, -EINVAL, "line %d: a repetition count above %d",
			               ps->line, LP_GRAMMAR_MAX_REPEAT);
		ps->p++;
	}
	if (ps->p == start)
		return perr(ps, "line %d: %s", "a repetition count expected");
	*v = x;
	return 0;
}

/* True when the text at p is `name ::=` (a new definition starts). */
static bool at_definition(const struct parser *ps)
{
	const char *p = ps->p;

	while (p < ps->end && is_name_char(*p))
		p++;
	if (p == ps->p)
		return false;
	while (p < ps->end && (*p == ' ' || *p == '\t'))
		p++;
	return ps->end - p >= 3 && !memcmp(p, "::=", 3);
}

/* One sequence of items, up to '|', ')' or the next definition. */
static int parse_sequence(struct parser *ps, struct evec *out)
{
	int rc = 0;

	for (;;) {
		size_t from = out->n;
		skip_space(ps, true);
		if (ps->p >= ps->end || *ps->p == '|' || *ps->p == ')' || at_definition(ps))
			return 0;
		if (*ps->p == '"') {
			ps->p++;
			while (!rc) {
				uint32_t cp;
				unsigned char u[4];
				int k;
				if (ps->p < ps->end && *ps->p == '"') {
					ps->p++;
					break;
				}
				if ((rc = read_char(ps, &cp)))
					break;
				k = utf8_encode(cp, u);
				for (int i = 0; i < k && !rc; i++)
					rc = push_byte(ps, out, u[i]);
			}
		} else if (*ps->p == '[') {
			ps->p++;
			rc = parse_class(ps, false, out);
		} else if (*ps->p == '.') {
			ps->p++;
			rc = parse_class(ps, true, out);
		} else if (*ps->p == '(') {
			int32_t g;
			ps->p++;
			if (++ps->depth > MAX_DEPTH)
				return perr(ps, "line %d: %s", "groups nested too deep");
			if ((g = new_rule(ps, NULL, 0)) < 0)
				return lp_errf(ps->err, -ENOMEM, "out of memory");
			if ((rc = parse_alternatives(ps, g)))
				return rc;
			ps->depth--;
			skip_space(ps, true);
			if (ps->p >= ps->end || *ps->p != ')')
				return perr(ps, "line %d: %s", "')' expected");
			ps->p++;
			rc = evec_push(ps, out, EL_REF, g);
		} else if (is_name_char(*ps->p)) {
			const char *n = ps->p;
			int32_t r;
			while (ps->p < ps->end && is_name_char(*ps->p))
				ps->p++;
			if (ps->p - n > MAX_NAME)
				return perr(ps, "line %d: %s", "a rule name longer than 128 bytes");
			if ((r = find_rule(ps, n, (size_t)(ps->p - n))) < 0)
				return lp_errf(ps->err, -ENOMEM, "out of memory");
			rc = evec_push(ps, out, EL_REF, r);
		} else {
			return perr(ps, "line %d: unexpected '%s'", (const char[]){*ps->p, 0});
		}
		if (rc)
			return rc;
		/* quantifiers */
		skip_space(ps, false);
		if (ps->p < ps->end && *ps->p && strchr("?*+{", *ps->p)) {
			char q = *ps->p++;
			long lo = 0, hi = 0;
			if (q == '?')
				hi = 1;
			else if (q == '*')
				hi = -1;
			else if (q == '+') {
				lo = 1;
				hi = -1;
			} else {
				if ((rc = parse_number(ps, &lo)))
					return rc;
				hi = lo;
				if (ps->p < ps->end && *ps->p == ',') {
					ps->p++;
					if (ps->p < ps->end && *ps->p == '}')
						hi = -1;
					else if ((rc = parse_number(ps, &hi)))
						return rc;
				}
				if (ps->p >= ps->end || *ps->p != '}')
					return perr(ps, "line %d: %s", "'}' expected");
				ps->p++;
				if (hi >= 0 && hi < lo)
					return perr(ps, "line %d: %s",
					            "a repetition {m,n} with n < m");
			}
			if ((rc = repeat(ps, out, from, lo, hi)))
				return rc;
			skip_space(ps, false);
			if (ps->p < ps->end && *ps->p && strchr("?*+{", *ps->p))
				return perr(ps, "line %d: %s",
				            "two quantifiers in a row (put the first in a group)");
		}
		if (rc)
			return rc;
	}
}

static int parse_alternatives(struct parser *ps, int32_t rule)
{
	for (;;) {
		struct evec a = {0};
		int rc = parse_sequence(ps, &a);
		if (rc || (rc = add_alt(ps, rule, &a))) {
			free(a.v);
			return rc;
		}
		skip_space(ps, true);
		if (ps->p < ps->end && *ps->p == '|') {
			ps->p++;
			continue;
		}
		return 0;
	}
}

static int parse_grammar(struct parser *ps)
{
	for (;;) {
		const char *n;
		int32_t r;
		int rc;

		skip_space(ps, true);
		if (ps->p >= ps->end)
			return 0;
		n = ps->p;
		while (ps->p < ps->end && is_name_char(*ps->p))
			ps->p++;
		if (ps->p == n)
			return perr(ps, "line %d: %s", "a rule name expected");
		if (ps->p - n > MAX_NAME)
			return perr(ps, "line %d: %s", "a rule name longer than 128 bytes");
		if ((r = find_rule(ps, n, (size_t)(ps->p - n))) < 0)
			return lp_errf(ps->err, -ENOMEM, "out of memory");
		skip_space(ps, false);
		if (ps->end - ps->p < 3 || memcmp(ps->p, "::=", 3))
			return perr(ps, "line %d: %s", "'::=' expected after the rule name");
		ps->p += 3;
		if (ps->rules[r].defined)
			return lp_errf(ps->err, -EINVAL, "line %d: rule '%s' is defined twice",
			               ps->line, ps->rules[r].name);
		ps->rules[r].defined = true;
		ps->rules[r].line = ps->line;
		if ((rc = parse_alternatives(ps, r)))
			return rc;
		skip_space(ps, true);
		if (ps->p < ps->end && *ps->p == ')')
			return perr(ps, "line %d: %s", "unbalanced ')'");
	}
}

/* ---- checks: undefined rules, left recursion ---- */

static const char *rule_label(const struct parser *ps, int32_t r)
{
	return ps->rules[r].name ? ps->rules[r].name : "(a group or repetition)";
}

static int check_grammar(struct parser *ps, struct lp_grammar *g)
{
	bool *nullable = calloc((size_t)g->n_rules, sizeof(bool));
	uint8_t *mark = calloc((size_t)g->n_rules, 1);
	int32_t *stack = malloc(((size_t)g->n_rules + 1) * 2 * sizeof(int32_t));
	bool changed = true;
	int rc = 0;

	if (!nullable || !mark || !stack) {
		rc = lp_errf(ps->err, -ENOMEM, "out of memory");
		goto out;
	}
	for (int32_t r = 0; r < g->n_rules; r++)
		if (ps->rules[r].name && !ps->rules[r].defined) {
			rc = lp_errf(ps->err, -EINVAL, "line %d: rule '%s' is used but not defined",
			             ps->rules[r].line, ps->rules[r].name);
			goto out;
		}
	while (changed) {
		changed = false;
		for (int32_t r = 0; r < g->n_rules; r++) {
			if (nullable[r])
				continue;
			for (int32_t a = g->rule_alt[r]; a < g->rule_alt[r + 1] && !nullable[r];
			     a++) {
				const struct element *e = &g->el[g->alt_start[a]];
				while (e->kind == EL_REF && nullable[e->arg])
					e++;
				if (e->kind == EL_END)
					nullable[r] = changed = true;
			}
		}
	}
	if (!(g->nullable_from = malloc((size_t)g->n_el * sizeof(bool)))) {
		rc = lp_errf(ps->err, -ENOMEM, "out of memory");
		goto out;
	}
	for (int32_t i = g->n_el - 1; i >= 0; i--) {
		const struct element *e = &g->el[i];
		g->nullable_from[i] = e->kind == EL_END || (e->kind == EL_REF && nullable[e->arg] &&
		                                            g->nullable_from[i + 1]);
	}
	/* left calls: r -> s when s can come first in r; a cycle is left
	 * recursion. Iterative DFS, colours in mark (1 on the path, 2 done). */
	for (int32_t r0 = 0; r0 < g->n_rules && !rc; r0++) {
		int sp = 0;
		if (mark[r0])
			continue;
		stack[sp++] = r0;
		stack[sp++] = 0; /* next left call to visit, as a flat index */
		mark[r0] = 1;
		while (sp && !rc) {
			int32_t r = stack[sp - 2], k = stack[sp - 1], seen = 0, next = -1;
			for (int32_t a = g->rule_alt[r]; a < g->rule_alt[r + 1] && next < 0; a++) {
				for (const struct element *e = &g->el[g->alt_start[a]];
				     e->kind == EL_REF; e++) {
					if (seen++ == k) {
						next = e->arg;
						break;
					}
					if (!nullable[e->arg])
						break;
				}
			}
			if (next < 0) {
				mark[r] = 2;
				sp -= 2;
				continue;
			}
			stack[sp - 1] = k + 1;
			if (mark[next] == 1) {
				rc = lp_errf(
				    ps->err, -EINVAL,
				    "rule '%s' can reach itself without matching a byte (left "
				    "recursion, or a repetition of something that matches \"\")",
				    rule_label(ps, next));
			} else if (!mark[next]) {
				mark[next] = 1;
				stack[sp++] = next;
				stack[sp++] = 0;
			}
		}
	}
out:
	free(nullable);
	free(mark);
	free(stack);
	return rc;
}

/* The parser's rules and alternatives into g's flat arrays. */
static int flatten(struct parser *ps, struct lp_grammar *g)
{
	size_t n_el = 0;
	int32_t *count = calloc(ps->n_rules + 1, sizeof(int32_t));

	if (!count)
		return lp_errf(ps->err, -ENOMEM, "out of memory");
	for (size_t i = 0; i < ps->n_alts; i++) {
		count[ps->alts[i].rule]++;
		n_el += ps->alts[i].e.n + 1;
	}
	g->n_rules = (int32_t)ps->n_rules;
	g->rule_alt = malloc((ps->n_rules + 1) * sizeof(int32_t));
	g->alt_start = malloc((ps->n_alts + 1) * sizeof(int32_t));
	g->el = malloc((n_el + 1) * sizeof(*g->el));
	g->sets = malloc((ps->n_sets + 1) * sizeof(*g->sets));
	if (!g->rule_alt || !g->alt_start || !g->el || !g->sets) {
		free(count);
		return lp_errf(ps->err, -ENOMEM, "out of memory");
	}
	g->rule_alt[0] = 0;
	for (size_t r = 0; r < ps->n_rules; r++)
		g->rule_alt[r + 1] = g->rule_alt[r] + count[r];
	memset(count, 0, (ps->n_rules + 1) * sizeof(int32_t));
	/* alternatives in rule order, each rule's in the order written */
	{
		size_t k = 0;
		int32_t *slot = malloc((ps->n_alts + 1) * sizeof(int32_t));
		if (!slot) {
			free(count);
			return lp_errf(ps->err, -ENOMEM, "out of memory");
		}
		for (size_t i = 0; i < ps->n_alts; i++) {
			int32_t r = ps->alts[i].rule;
			slot[g->rule_alt[r] + count[r]++] = (int32_t)i;
		}
		for (size_t a = 0; a < ps->n_alts; a++) {
			const struct palt *pa = &ps->alts[slot[a]];
			g->alt_start[a] = (int32_t)k;
			if (pa->e.n)
				memcpy(g->el + k, pa->e.v, pa->e.n * sizeof(*g->el));
			k += pa->e.n;
			g->el[k++] = (struct element){EL_END, 0};
		}
		g->n_el = (int32_t)k;
		free(slot);
	}
	if (ps->n_sets)
		memcpy(g->sets, ps->sets, ps->n_sets * sizeof(*g->sets));
	g->n_sets = (int32_t)ps->n_sets;
	free(count);
	return 0;
}

static void parser_release(struct parser *ps)
{
	for (size_t i = 0; i < ps->n_rules; i++)
		free(ps->rules[i].name);
	free(ps->rules);
	for (size_t i = 0; i < ps->n_alts; i++)
		free(ps->alts[i].e.v);
	free(ps->alts);
	free(ps->sets);
}

static void entry_free(struct mask_entry *e);

static void grammar_free(struct lp_grammar *g)
{
	if (g->cache) {
		for (size_t i = 0; i < g->cache_cap; i++)
			entry_free(g->cache[i]);
		free(g->cache);
	}
	free(g->nullable_from);
	free(g->el);
	free(g->sets);
	free(g->rule_alt);
	free(g->alt_start);
	free(g);
}

int lp_grammar_parse(struct lp_grammar **out, const char *text, size_t len, struct lp_err *err)
{
	struct parser ps = {.s = text, .p = text, .end = text + len, .line = 1, .err = err};
	struct lp_grammar *g;
	int32_t root;
	int rc;

	*out = NULL;
	if (len > LP_GRAMMAR_MAX_TEXT)
		return lp_errf(err, -EINVAL, "the grammar is %zu bytes, more than %zu", len,
		               LP_GRAMMAR_MAX_TEXT);
	if (!(g = calloc(1, sizeof(*g))))
		return lp_errf(err, -ENOMEM, "out of memory");
	g->refs = 1;
	memset(ps.single, 0xff, sizeof(ps.single));
	if ((rc = parse_grammar(&ps)))
		goto fail;
	root = -1;
	for (size_t i = 0; i < ps.n_rules; i++)
		if (ps.rules[i].name && !strcmp(ps.rules[i].name, "root"))
			root = (int32_t)i;
	if (root < 0 || !ps.rules[root].defined) {
		rc = lp_errf(err, -EINVAL, "the grammar has no rule named 'root'");
		goto fail;
	}
	g->root = root;
	if ((rc = flatten(&ps, g)) || (rc = check_grammar(&ps, g)))
		goto fail;
	parser_release(&ps);
	*out = g;
	return 0;
fail:
	parser_release(&ps);
	grammar_free(g);
	return rc;
}

struct lp_grammar *lp_grammar_ref(struct lp_grammar *g)
{
	__atomic_add_fetch(&g->refs, 1, __ATOMIC_RELAXED);
	return g;
}

void lp_grammar_unref(struct lp_grammar *g)
{
	if (g && __atomic_sub_fetch(&g->refs, 1, __ATOMIC_ACQ_REL) == 0)
		grammar_free(g);
}

/* ---- stacks ---- */

#define TOP_END   (-1) /* the empty stack: the whole grammar matched */
#define PARENT_CX (-2) /* below the walked position: context not known */
#define HASH_BITS 12

struct frame {
	int32_t pos, parent, next; /* next: in its hash bucket */
};

/* An arena of hash-consed frames plus states kept as runs of tops, used
 * LIFO: a walk rolls both back to marks. */
struct pda {
	const struct lp_grammar *g;
	struct frame *f;
	int32_t n, cap;
	int32_t bucket[1 << HASH_BITS];
	int32_t *tops;
	int32_t n_tops, cap_tops;
	int32_t *work; /* expansion worklist */
	int32_t cap_work;
	bool escaped; /* the last expansion popped PARENT_CX */
	bool failed;  /* out of memory, or too many stacks */
};

static void pda_init(struct pda *d, const struct lp_grammar *g)
{
	memset(d, 0, sizeof(*d));
	d->g = g;
	memset(d->bucket, 0xff, sizeof(d->bucket));
}

static void pda_release(struct pda *d)
{
	free(d->f);
	free(d->tops);
	free(d->work);
}

static uint32_t frame_hash(int32_t pos, int32_t parent)
{
	uint32_t h = (uint32_t)pos * 0x9e3779b1u ^ (uint32_t)parent * 0x85ebca77u;
	return (h ^ h >> 15) & ((1u << HASH_BITS) - 1);
}

static int32_t frame_get(struct pda *d, int32_t pos, int32_t parent)
{
	uint32_t h = frame_hash(pos, parent);

	for (int32_t i = d->bucket[h]; i >= 0; i = d->f[i].next)
		if (d->f[i].pos == pos && d->f[i].parent == parent)
			return i;
	if (d->n == d->cap) {
		int32_t c = d->cap ? d->cap * 2 : 256;
		struct frame *q = realloc(d->f, (size_t)c * sizeof(*q));
		if (!q) {
			d->failed = true;
			return -3;
		}
		d->f = q;
		d->cap = c;
	}
	d->f[d->n] = (struct frame){pos, parent, d->bucket[h]};
	d->bucket[h] = d->n;
	return d->n++;
}

/* Drops the frames from mark on (they were made after it, LIFO). */
static void frames_rollback(struct pda *d, int32_t mark)
{
	while (d->n > mark) {
		struct frame *f = &d->f[--d->n];
		d->bucket[frame_hash(f->pos, f->parent)] = f->next;
	}
}

static void push_top(struct pda *d, int32_t start, int32_t t)
{
	for (int32_t i = start; i < d->n_tops; i++)
		if (d->tops[i] == t)
			return;
	if (d->n_tops - start >= LP_GRAMMAR_MAX_STACKS) {
		d->failed = true;
		return;
	}
	if (d->n_tops == d->cap_tops) {
		int32_t c = d->cap_tops ? d->cap_tops * 2 : 256;
		int32_t *q = realloc(d->tops, (size_t)c * sizeof(*q));
		if (!q) {
			d->failed = true;
			return;
		}
		d->tops = q;
		d->cap_tops = c;
	}
	d->tops[d->n_tops++] = t;
}

static bool work_push(struct pda *d, int32_t *n, int32_t v)
{
	if (*n == d->cap_work) {
		int32_t c = d->cap_work ? d->cap_work * 2 : 256;
		int32_t *q = realloc(d->work, (size_t)c * sizeof(*q));
		if (!q) {
			d->failed = true;
			return false;
		}
		d->work = q;
		d->cap_work = c;
	}
	d->work[(*n)++] = v;
	return true;
}

/* Expands the stack topped by frame t (or TOP_END / PARENT_CX) until every
 * top points at a SET, appending the tops to the state starting at start. */
static void expand(struct pda *d, int32_t start, int32_t t)
{
	const struct lp_grammar *g = d->g;
	int32_t n = 0;

	if (!work_push(d, &n, t))
		return;
	while (n > 0 && !d->failed) {
		int32_t x = d->work[--n];
		const struct element *e;

		if (x == TOP_END) {
			push_top(d, start, TOP_END);
			continue;
		}
		if (x == PARENT_CX) {
			d->escaped = true;
			continue;
		}
		e = &g->el[d->f[x].pos];
		if (e->kind == EL_SET) {
			push_top(d, start, x);
		} else if (e->kind == EL_END) {
			work_push(d, &n, d->f[x].parent);
		} else {
			int32_t parent = d->f[x].parent, base = parent, r = e->arg;
			if (g->el[d->f[x].pos + 1].kind != EL_END &&
			    (base = frame_get(d, d->f[x].pos + 1, parent)) < -2)
				return;
			for (int32_t a = g->rule_alt[r + 1] - 1; a >= g->rule_alt[r]; a--) {
				int32_t y = frame_get(d, g->alt_start[a], base);
				if (y < -2 || !work_push(d, &n, y))
					return;
			}
		}
	}
}

/* The state tops[from .. to) advanced by byte b, appended after them.
 * Returns the new state's start. */
static int32_t advance(struct pda *d, int32_t from, int32_t to, unsigned b)
{
	const struct lp_grammar *g = d->g;
	int32_t start = d->n_tops;

	for (int32_t i = from; i < to && !d->failed; i++) {
		int32_t t = d->tops[i], y;
		const struct frame *f;
		if (t < 0)
			continue;
		f = &d->f[t];
		if (!(g->sets[g->el[f->pos].arg].w[b >> 5] >> (b & 31) & 1))
			continue;
		if ((y = frame_get(d, f->pos + 1, f->parent)) < -2)
			break;
		expand(d, start, y);
	}
	return start;
}

/* The start state of g into d (its tops from 0). */
static void start_state(struct pda *d)
{
	const struct lp_grammar *g = d->g;

	for (int32_t a = g->rule_alt[g->root]; a < g->rule_alt[g->root + 1]; a++) {
		int32_t y = frame_get(d, g->alt_start[a], TOP_END);
		if (y < -2)
			return;
		expand(d, 0, y);
	}
}

int lp_grammar_match(const struct lp_grammar *g, const void *s, size_t n)
{
	const unsigned char *b = s;
	struct pda d;
	int32_t from = 0, to;
	int rc = -1;

	pda_init(&d, g);
	start_state(&d);
	to = d.n_tops;
	for (size_t i = 0; i < n && !d.failed; i++) {
		int32_t next = advance(&d, from, to, b[i]);
		/* the old state is no longer needed: move the new one down */
		memmove(d.tops, d.tops + next, (size_t)(d.n_tops - next) * sizeof(int32_t));
		d.n_tops -= next;
		from = 0;
		to = d.n_tops;
		if (to == 0)
			break;
	}
	if (!d.failed && to > 0) {
		rc = 0;
		for (int32_t i = 0; i < to; i++)
			if (d.tops[i] == TOP_END)
				rc = 1;
	}
	pda_release(&d);
	return rc;
}

/* ---- the vocabulary ---- */

struct lp_grammar_vocab {
	int32_t n_vocab; /* logit rows */
	size_t words;    /* of a mask */
	int32_t n;       /* walkable tokens, sorted by their bytes */
	int32_t *ids;    /* [n] the token at each sorted index */
	int32_t *lcp;    /* [n] bytes shared with the previous sorted token */
	uint32_t *off;   /* [n + 1] each token's bytes in bytes[] */
	unsigned char *bytes;
	int32_t *sorted; /* [n_vocab] each id's sorted index, or -1 */
	int32_t *eos;    /* [n_eos] */
	int n_eos;
	int32_t max_len; /* longest token, in bytes */
};

static int cmp_tokens(const void *a, const void *b, void *arg)
{
	const struct lp_grammar_vocab *v = arg;
	int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
	uint32_t lx = v->off[x + 1] - v->off[x], ly = v->off[y + 1] - v->off[y];
	int c = memcmp(v->bytes + v->off[x], v->bytes + v->off[y], lx < ly ? lx : ly);

	if (c)
		return c;
	return lx < ly ? -1 : lx > ly ? 1 : (x > y) - (x < y);
}

int lp_grammar_vocab_new(struct lp_grammar_vocab **out, const struct lp_tokenizer *tok,
                         int32_t n_vocab, const int32_t *eos, int n_eos, struct lp_err *err)
{
	struct lp_grammar_vocab *v = calloc(1, sizeof(*v));
	int32_t n_tok = lp_tokenizer_vocab_size(tok), *order = NULL;
	uint32_t *off = NULL;
	unsigned char *bytes = NULL, buf[LP_TOKEN_BYTES_MAX];
	size_t len = 0, cap = 0;
	int rc = -ENOMEM;

	*out = NULL;
	if (!v)
		return lp_errf(err, -ENOMEM, "out of memory");
	if (n_tok > n_vocab)
		n_tok = n_vocab;
	v->n_vocab = n_vocab;
	v->words = ((size_t)n_vocab + 31) / 32;
	v->sorted = malloc((size_t)n_vocab * sizeof(int32_t));
	v->eos = malloc(((size_t)n_eos + 1) * sizeof(int32_t));
	off = malloc(((size_t)n_tok + 1) * sizeof(uint32_t));
	order = malloc(((size_t)n_tok + 1) * sizeof(int32_t));
	v->ids = malloc(((size_t)n_tok + 1) * sizeof(int32_t));
	if (!v->sorted || !v->eos || !off || !order || !v->ids)
		goto fail;
	memset(v->sorted, 0xff, (size_t)n_vocab * sizeof(int32_t));
	for (int i = 0; i < n_eos; i++)
		if (eos[i] >= 0 && eos[i] < n_vocab)
			v->eos[v->n_eos++] = eos[i];
	/* the walkable tokens: their bytes, in id order first */
	for (int32_t id = 0; id < n_tok; id++) {
		bool is_eos = false;
		int k;
		for (int i = 0; i < v->n_eos; i++)
			is_eos |= v->eos[i] == id;
		if (is_eos || lp_tokenizer_is_special(tok, id))
			continue;
		k = lp_detok_token_bytes(tok, id, buf, sizeof(buf));
		if (k <= 0)
			continue;
		if (len + (size_t)k > cap) {
			size_t c = cap ? cap * 2 : 1 << 16;
			unsigned char *q;
			while (c < len + (size_t)k)
				c *= 2;
			if (!(q = realloc(bytes, c)))
				goto fail;
			bytes = q;
			cap = c;
		}
		memcpy(bytes + len, buf, (size_t)k);
		off[v->n] = (uint32_t)len;
		v->ids[v->n++] = id;
		len += (size_t)k;
		if (k > v->max_len)
			v->max_len = k;
	}
	off[v->n] = (uint32_t)len;
	v->off = off;
	v->bytes = bytes;
	for (int32_t i = 0; i < v->n; i++)
		order[i] = i;
	qsort_r(order, (size_t)v->n, sizeof(int32_t), cmp_tokens, v);
	/* re-lay the bytes and ids in sorted order */
	{
		unsigned char *sb = malloc(len + 1);
		uint32_t *so = malloc(((size_t)v->n + 1) * sizeof(uint32_t));
		int32_t *sid = malloc(((size_t)v->n + 1) * sizeof(int32_t));
		size_t p = 0;
		if (!sb || !so || !sid ||
		    !(v->lcp = malloc(((size_t)v->n + 1) * sizeof(int32_t)))) {
			free(sb);
			free(so);
			free(sid);
			goto fail;
		}
		for (int32_t i = 0; i < v->n; i++) {
			int32_t o = order[i];
			uint32_t l = off[o + 1] - off[o];
			memcpy(sb + p, bytes + off[o], l);
			so[i] = (uint32_t)p;
			sid[i] = v->ids[o];
			p += l;
		}
		so[v->n] = (uint32_t)p;
		free(bytes);
		free(off);
		free(v->ids);
		v->bytes = sb;
		v->off = so;
		v->ids = sid;
		off = NULL;
	}
	for (int32_t i = 0; i < v->n; i++) {
		int32_t l = 0;
		v->sorted[v->ids[i]] = i;
		if (i > 0) {
			uint32_t a = v->off[i - 1], la = v->off[i] - a, b = v->off[i],
			         lb = v->off[i + 1] - b;
			while ((uint32_t)l < la && (uint32_t)l < lb &&
			       v->bytes[a + l] == v->bytes[b + l])
				l++;
		}
		v->lcp[i] = l;
	}
	free(order);
	*out = v;
	return 0;
fail:
	free(order);
	if (off != v->off)
		free(off);
	if (bytes != v->bytes)
		free(bytes);
	lp_grammar_vocab_free(v);
	return lp_errf(err, rc, "out of memory");
}

void lp_grammar_vocab_free(struct lp_grammar_vocab *v)
{
	if (!v)
		return;
	free(v->ids);
	free(v->lcp);
	free(v->off);
	free(v->bytes);
	free(v->sorted);
	free(v->eos);
	free(v);
}

size_t lp_grammar_vocab_mask_words(const struct lp_grammar_vocab *v)
{
	return v->words;
}

/* ---- matchers ---- */

struct lp_grammar_matcher {
	struct lp_grammar *g;
	struct pda d; /* the state: tops [0, d.n_tops) */
	struct pda w; /* scratch of mask walks */
	bool dead;    /* a mask found no token: only the end is left */
	/* per depth of a walk: a state's tops, the frame mark after it, and
	 * whether any path to it left the walked position's rule */
	int32_t *st_from, *st_to, *fmark;
	bool *esc;
	int32_t depth_cap;
};

int lp_grammar_matcher_new(struct lp_grammar_matcher **out, struct lp_grammar *g,
                           struct lp_err *err)
{
	struct lp_grammar_matcher *m = calloc(1, sizeof(*m));

	*out = NULL;
	if (!m)
		return lp_errf(err, -ENOMEM, "out of memory");
	m->g = lp_grammar_ref(g);
	pda_init(&m->d, g);
	pda_init(&m->w, g);
	start_state(&m->d);
	if (m->d.failed) {
		lp_grammar_matcher_free(m);
		return lp_errf(err, -ENOMEM, "the grammar's start has more than %d stacks",
		               LP_GRAMMAR_MAX_STACKS);
	}
	*out = m;
	return 0;
}

void lp_grammar_matcher_free(struct lp_grammar_matcher *m)
{
	if (!m)
		return;
	pda_release(&m->d);
	pda_release(&m->w);
	free(m->st_from);
	free(m->st_to);
	free(m->fmark);
	free(m->esc);
	lp_grammar_unref(m->g);
	free(m);
}

/* Copies the stack topped by t in src into dst; its top in dst, or < -2
 * when out of memory. map[src frame] caches copies (-3: none yet). */
static int32_t copy_stack(struct pda *dst, const struct pda *src, int32_t t, int32_t *map)
{
	int32_t chain[256], n = 0, parent, x = t;

	/* walk down to a frame already copied (or the bottom), at most 256 at a
	 * time; deeper stacks take several rounds */
	for (;;) {
		n = 0;
		x = t;
		while (x >= 0 && (!map || map[x] < -2) && n < 256) {
			chain[n++] = x;
			x = src->f[x].parent;
		}
		if (x >= 0 && (!map || map[x] < -2)) {
			/* too deep for one round: copy the lower part first */
			if (copy_stack(dst, src, x, map) < -2)
				return -3;
			continue;
		}
		break;
	}
	parent = x < 0 ? x : map[x];
	while (n > 0) {
		int32_t s = chain[--n], y = frame_get(dst, src->f[s].pos, parent);
		if (y < -2)
			return -3;
		if (map)
			map[s] = y;
		parent = y;
	}
	return parent;
}

/* Rebuilds the state's arena holding only the frames its stacks use. */
static void compact(struct lp_grammar_matcher *m)
{
	struct pda e;
	int32_t *map = malloc((size_t)m->d.n * sizeof(int32_t));

	if (!map)
		return;                                      /* keep the larger arena */
	memset(map, 0xfd, (size_t)m->d.n * sizeof(int32_t)); /* -33686019: none */
	pda_init(&e, m->g);
	for (int32_t i = 0; i < m->d.n_tops && !e.failed; i++) {
		int32_t t = m->d.tops[i];
		if (t >= 0)
			t = copy_stack(&e, &m->d, t, map);
		if (t >= -2)
			push_top(&e, 0, t);
	}
	free(map);
	if (e.failed) {
		pda_release(&e);
		return;
	}
	pda_release(&m->d);
	m->d = e;
}

bool lp_grammar_matcher_accept_bytes(struct lp_grammar_matcher *m, const void *s, size_t n)
{
	const unsigned char *b = s;
	struct pda *d = &m->d;
	int32_t mark_f = d->n, mark_t = d->n_tops, from = 0, to = mark_t;

	for (size_t i = 0; i < n; i++) {
		from = advance(d, from, to, b[i]);
		to = d->n_tops;
		if (d->failed || from == to) {
			d->failed = false;
			d->n_tops = mark_t;
			frames_rollback(d, mark_f);
			return false;
		}
	}
	if (n) {
		memmove(d->tops, d->tops + from, (size_t)(to - from) * sizeof(int32_t));
		d->n_tops = to - from;
	}
	if (d->n > 4096)
		compact(m);
	return true;
}

bool lp_grammar_matcher_can_end(const struct lp_grammar_matcher *m)
{
	for (int32_t i = 0; i < m->d.n_tops; i++)
		if (m->d.tops[i] == TOP_END)
			return true;
	return false;
}

bool lp_grammar_matcher_must_end(const struct lp_grammar_matcher *m)
{
	return m->dead || (m->d.n_tops == 1 && m->d.tops[0] == TOP_END);
}

/* ---- masks ---- */

static int depth_room(struct lp_grammar_matcher *m, int32_t need)
{
	if (need <= m->depth_cap)
		return 0;
	free(m->st_from);
	free(m->st_to);
	free(m->fmark);
	free(m->esc);
	m->st_from = malloc((size_t)need * sizeof(int32_t));
	m->st_to = malloc((size_t)need * sizeof(int32_t));
	m->fmark = malloc((size_t)need * sizeof(int32_t));
	m->esc = malloc((size_t)need * sizeof(bool));
	if (!m->st_from || !m->st_to || !m->fmark || !m->esc) {
		m->depth_cap = 0;
		return -ENOMEM;
	}
	m->depth_cap = need;
	return 0;
}

struct walk_out {
	uint32_t *accepted; /* bits by token id */
	/* uncertain tokens (walks from a position alone): sorted indices and
	 * the bytes each shares with the previous one */
	int32_t *unc, *unc_lcp;
	int32_t n_unc, cap_unc;
	int32_t run_lcp; /* min lcp since the last uncertain token */
	bool failed;
};

static void note_uncertain(struct walk_out *o, int32_t i)
{
	if (o->n_unc == o->cap_unc) {
		int32_t c = o->cap_unc ? o->cap_unc * 2 : 64;
		int32_t *a = realloc(o->unc, (size_t)c * sizeof(int32_t));
		int32_t *b = a ? realloc(o->unc_lcp, (size_t)c * sizeof(int32_t)) : NULL;
		if (a)
			o->unc = a;
		if (!b) {
			o->failed = true;
			return;
		}
		o->unc_lcp = b;
		o->cap_unc = c;
	}
	o->unc[o->n_unc] = i;
	o->unc_lcp[o->n_unc] = o->n_unc == 0 ? 0 : o->run_lcp;
	o->n_unc++;
	o->run_lcp = INT32_MAX;
}

/* Walks the tokens list[0..n) (sorted indices; NULL: every token) with
 * lcp[k] the bytes token k shares with token k - 1, from the state in
 * m->w's tops [0, m->w.n_tops). Tokens that keep a stack alive get their
 * bit in o->accepted; tokens that only survive by leaving the state's
 * bottom (PARENT_CX) go to o's uncertain list. */
static void walk(struct lp_grammar_matcher *m, const struct lp_grammar_vocab *v,
                 const int32_t *list, const int32_t *lcp, int32_t n, struct walk_out *o)
{
	struct pda *w = &m->w;
	int32_t cur = 0;

	m->st_from[0] = 0;
	m->st_to[0] = w->n_tops;
	m->fmark[0] = w->n;
	m->esc[0] = false;
	o->run_lcp = INT32_MAX;
	for (int32_t k = 0; k < n && !o->failed; k++) {
		int32_t i = list ? list[k] : k, l = lcp[k];
		const unsigned char *b = v->bytes + v->off[i];
		int32_t len = (int32_t)(v->off[i + 1] - v->off[i]), d;
		bool dead = false;

		if (l < o->run_lcp)
			o->run_lcp = l;
		if (l < cur)
			cur = l;
		w->n_tops = m->st_to[cur];
		frames_rollback(w, m->fmark[cur]);
		for (d = cur; d < len; d++) {
			w->escaped = false;
			m->st_from[d + 1] = advance(w, m->st_from[d], m->st_to[d], b[d]);
			if (w->failed) {
				w->failed = false;
				w->n_tops = m->st_from[d + 1];
			}
			m->st_to[d + 1] = w->n_tops;
			m->fmark[d + 1] = w->n;
			m->esc[d + 1] = m->esc[d] || w->escaped;
			cur = d + 1;
			if (m->st_from[d + 1] == m->st_to[d + 1]) {
				dead = true;
				break;
			}
		}
		if (!dead) {
			o->accepted[v->ids[i] >> 5] |= 1u << (v->ids[i] & 31);
			continue;
		}
		/* every following token that shares bytes [0, d] meets the
		 * same dead state */
		for (;;) {
			if (m->esc[d + 1])
				note_uncertain(o, i);
			if (k + 1 >= n || lcp[k + 1] <= d)
				break;
			k++;
			i = list ? list[k] : k;
			if (lcp[k] < o->run_lcp)
				o->run_lcp = lcp[k];
		}
	}
}

/* The key of the stack topped by t in d: its top frame, and each frame
 * below while the ones above can all be left without a byte more. */
static void stack_key(const struct lp_grammar *g, const struct pda *d, int32_t t,
                      struct mask_key *k)
{
	int32_t x = t;

	k->n = 0;
	k->bottom = false;
	while (k->n < KEY_MAX) {
		int32_t p = d->f[x].pos;
		k->pos[k->n++] = p;
		/* the top frame's element is a byte still to match */
		if (!g->nullable_from[x == t ? p + 1 : p])
			return;
		x = d->f[x].parent;
		if (x < 0) {
			k->bottom = x == TOP_END;
			return;
		}
	}
}

static uint64_t key_hash(const struct mask_key *k)
{
	uint64_t h = 0x9e3779b97f4a7c15ull ^ (uint64_t)k->n << 1 ^ (uint64_t)k->bottom;

	for (int32_t i = 0; i < k->n; i++) {
		h ^= (uint64_t)(uint32_t)k->pos[i];
		h *= 0xbf58476d1ce4e5b9ull;
		h ^= h >> 31;
	}
	return h;
}

static bool key_eq(const struct mask_key *a, const struct mask_key *b)
{
	return a->n == b->n && a->bottom == b->bottom &&
	       !memcmp(a->pos, b->pos, (size_t)a->n * sizeof(int32_t));
}

static void entry_free(struct mask_entry *e)
{
	if (!e)
		return;
	free(e->accepted);
	free(e->unc);
	free(e->unc_lcp);
	free(e);
}

/* Walks every token from the key's frames alone (PARENT_CX below them,
 * unless they are the whole stack). */
static struct mask_entry *build_entry(struct lp_grammar_matcher *m,
                                      const struct lp_grammar_vocab *v, const struct mask_key *k)
{
	struct mask_entry *e = calloc(1, sizeof(*e));
	struct walk_out o = {0};
	struct pda *w = &m->w;
	int32_t t = k->bottom ? TOP_END : PARENT_CX;

	if (!e || !(o.accepted = calloc(v->words, sizeof(uint32_t)))) {
		free(e);
		return NULL;
	}
	e->key = *k;
	frames_rollback(w, 0);
	w->n_tops = 0;
	w->failed = false;
	for (int32_t i = k->n - 1; i >= 0 && t >= -2; i--)
		t = frame_get(w, k->pos[i], t);
	if (t >= 0)
		push_top(w, 0, t);
	if (t < 0 || w->failed) {
		free(o.accepted);
		free(e);
		return NULL;
	}
	walk(m, v, NULL, v->lcp, v->n, &o);
	e->accepted = o.accepted;
	e->unc = o.unc;
	e->unc_lcp = o.unc_lcp;
	e->n_unc = o.n_unc;
	if (o.failed) {
		entry_free(e);
		return NULL;
	}
	return e;
}

static size_t entry_bytes(const struct lp_grammar_vocab *v, const struct mask_entry *e)
{
	return v->words * sizeof(uint32_t) + (size_t)e->n_unc * 2 * sizeof(int32_t) + sizeof(*e);
}

/* The cache's entry for key k, built when missing; NULL when out of memory.
 * Past the cache's byte budget a new entry is not kept: *temp says the
 * caller frees it after use. */
static struct mask_entry *cache_get(struct lp_grammar_matcher *m, const struct lp_grammar_vocab *v,
                                    const struct mask_key *k, bool *temp)
{
	struct lp_grammar *g = m->g;
	struct mask_entry *e;
	size_t i;

	*temp = false;
	if (g->cache_n * 2 >= g->cache_cap) {
		size_t cap = g->cache_cap ? g->cache_cap * 2 : 64;
		struct mask_entry **c = calloc(cap, sizeof(*c));
		if (!c)
			return NULL;
		for (size_t j = 0; j < g->cache_cap; j++) {
			struct mask_entry *e = g->cache[j];
			if (!e)
				continue;
			for (i = key_hash(&e->key) & (cap - 1); c[i]; i = (i + 1) & (cap - 1))
				;
			c[i] = e;
		}
		free(g->cache);
		g->cache = c;
		g->cache_cap = cap;
	}
	for (i = key_hash(k) & (g->cache_cap - 1); g->cache[i]; i = (i + 1) & (g->cache_cap - 1))
		if (key_eq(&g->cache[i]->key, k))
			return g->cache[i];
	if (!(e = build_entry(m, v, k)))
		return NULL;
	if (g->cache_bytes + entry_bytes(v, e) > LP_GRAMMAR_CACHE_BYTES) {
		*temp = true;
		return e;
	}
	g->cache_bytes += entry_bytes(v, e);
	g->cache[i] = e;
	g->cache_n++;
	return e;
}

int lp_grammar_matcher_fill_mask(struct lp_grammar_matcher *m, const struct lp_grammar_vocab *v,
                                 uint32_t *mask, struct lp_err *err)
{
	struct lp_grammar *g = m->g;
	bool can_end = false, any = false, temp = false;

	if (g->vocab && g->vocab != v)
		return lp_errf(err, -EINVAL,
		               "the grammar's masks were built for another vocabulary");
	g->vocab = v;
	if (depth_room(m, v->max_len + 2))
		return lp_errf(err, -ENOMEM, "out of memory");
	memset(mask, 0, v->words * sizeof(uint32_t));
	for (int32_t i = 0; i < m->d.n_tops; i++) {
		int32_t t = m->d.tops[i];
		struct mask_entry *e;
		struct mask_key k;
		if (t == TOP_END) {
			can_end = true;
			continue;
		}
		stack_key(g, &m->d, t, &k);
		if (!(e = cache_get(m, v, &k, &temp)))
			return lp_errf(err, -ENOMEM, "out of memory building a grammar mask");
		for (size_t j = 0; j < v->words; j++)
			mask[j] |= e->accepted[j];
		if (e->n_unc) {
			struct walk_out o = {.accepted = mask};
			int32_t y;
			/* the uncertain tokens, walked with the whole stack */
			frames_rollback(&m->w, 0);
			m->w.n_tops = 0;
			m->w.failed = false;
			y = copy_stack(&m->w, &m->d, t, NULL);
			if (y >= -2) {
				push_top(&m->w, 0, y);
				walk(m, v, e->unc, e->unc_lcp, e->n_unc, &o);
			}
			free(o.unc);
			free(o.unc_lcp);
			if (y < -2) {
				if (temp)
					entry_free(e);
				return lp_errf(err, -ENOMEM, "out of memory");
			}
		}
		if (temp)
			entry_free(e);
	}
	if (can_end)
		for (int i = 0; i < v->n_eos; i++)
			mask[v->eos[i] >> 5] |= 1u << (v->eos[i] & 31);
	for (size_t j = 0; j < v->words && !any; j++)
		any = mask[j] != 0;
	if (!any) {
		/* no token spells what the grammar needs next: end rather than
		 * sample from nothing */
		m->dead = true;
		for (int i = 0; i < v->n_eos; i++)
			mask[v->eos[i] >> 5] |= 1u << (v->eos[i] & 31);
	}
	return 0;
}

int lp_grammar_matcher_accept_token(struct lp_grammar_matcher *m, const struct lp_grammar_vocab *v,
                                    int32_t t, struct lp_err *err)
{
	int32_t i;

	for (int k = 0; k < v->n_eos; k++)
		if (v->eos[k] == t) {
			if (lp_grammar_matcher_can_end(m))
				return 0;
			return lp_errf(err, -EINVAL,
			               "end of sequence where the grammar cannot end");
		}
	if (t < 0 || t >= v->n_vocab || (i = v->sorted[t]) < 0)
		return lp_errf(err, -EINVAL, "token %d is not allowed by the grammar", t);
	if (!lp_grammar_matcher_accept_bytes(m, v->bytes + v->off[i], v->off[i + 1] - v->off[i]))
		return lp_errf(err, -EINVAL, "token %d does not continue the grammar", t);
	return 0;
}
