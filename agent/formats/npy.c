/* NumPy .npy reader; see npy.h. */
#include "agent/formats/npy.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#define NPY_MAX_HEADER (1u << 20)

struct cursor {
	const char *p, *end;
};

static void skip_ws(struct cursor *c)
{
	while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
		c->p++;
}

static bool eat(struct cursor *c, char ch)
{
	skip_ws(c);
	if (c->p < c->end && *c->p == ch) {
		c->p++;
		return true;
	}
	return false;
}

/* A quoted Python string without escapes, copied into buf. */
static bool read_str(struct cursor *c, char *buf, size_t cap)
{
	char q;
	size_t n = 0;

	skip_ws(c);
	if (c->p >= c->end || (*c->p != '\'' && *c->p != '"'))
		return false;
	q = *c->p++;
	while (c->p < c->end && *c->p != q) {
		if (*c->p == '\\' || n + 1 >= cap)
			return false;
		buf[n++] = *c->p++;
	}
	if (c->p >= c->end)
		return false;
	c->p++;
	buf[n] = '\0';
	return true;
}

static bool read_word(struct cursor *c, const char *w)
{
	size_t n = strlen(w);

	skip_ws(c);
	if ((size_t)(c->end - c->p) < n || memcmp(c->p, w, n))
		return false;
	c->p += n;
	return true;
}

static bool read_shape(struct cursor *c, struct lp_fmt_tensor *out)
{
	if (!eat(c, '('))
		return false;
	out->n_dims = 0;
	for (;;) {
		int64_t v = 0;
		int digits = 0;

		if (eat(c, ')'))
			return true;
		if (out->n_dims == LP_FMT_MAX_DIMS)
			return false;
		skip_ws(c);
		while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
			if (++digits > 15)
				return false;
			v = v * 10 + (*c->p++ - '0');
		}
		if (!digits)
			return false;
		/* numpy writes Python ints; a long suffix 'L' came from Python 2 */
		if (c->p < c->end && *c->p == 'L')
			c->p++;
		out->shape[out->n_dims++] = v;
		if (eat(c, ','))
			continue;
		if (eat(c, ')'))
			return true;
		return false;
	}
}

static const struct {
	const char *descr;
	enum lp_fmt_type type;
} descrs[] = {
    {"<f4", LP_FMT_F32}, {"<f2", LP_FMT_F16}, {"<f8", LP_FMT_F64},
    {"<i4", LP_FMT_I32}, {"<i8", LP_FMT_I64}, {"<i2", LP_FMT_I16},
    {"|i1", LP_FMT_I8},  {"|u1", LP_FMT_U8},  {"|b1", LP_FMT_BOOL},
};

int lp_npy_parse(struct lp_npy *out, const void *data, size_t n, const char *label,
                 struct lp_err *err)
{
	const unsigned char *p = data;
	size_t hlen, hoff, esize = 0;
	struct cursor c;
	bool have_descr = false, have_fo = false, have_shape = false, fortran = false;
	uint64_t numel = 1;
	char key[32];

	memset(out, 0, sizeof(*out));
	out->t.name = label;
	out->t.file = label;
	if (n < 10 || memcmp(p, "\x93NUMPY", 6) != 0)
		return lp_errf(err, -EINVAL, "'%s': not a .npy file (no \\x93NUMPY magic)", label);
	if (p[6] == 1) {
		hlen = (size_t)p[8] | (size_t)p[9] << 8;
		hoff = 10;
	} else if (p[6] == 2 || p[6] == 3) {
		if (n < 12)
			return lp_errf(err, -EINVAL, "'%s': truncated .npy header", label);
		hlen = (size_t)p[8] | (size_t)p[9] << 8 | (size_t)p[10] << 16 | (size_t)p[11] << 24;
		hoff = 12;
	} else {
		return lp_errf(err, -EINVAL, "'%s': .npy format version %u.%u is not supported",
		               label, p[6], p[7]);
	}
	if (hlen > NPY_MAX_HEADER)
		return lp_errf(err, -EINVAL, "'%s': .npy header of %zu bytes is over the limit",
		               label, hlen);
	if (hlen > n - hoff)
		return lp_errf(err, -EINVAL,
		               "'%s': .npy header of %zu bytes runs past the end of "
		               "the file (truncated?)",
		               label, hlen);

	c.p = (const char *)p + hoff;
	c.end = c.p + hlen;
	if (!eat(&c, '{'))
		goto bad_header;
	while (!eat(&c, '}')) {
		if (!read_str(&c, key, sizeof(key)) || !eat(&c, ':'))
			goto bad_header;
		if (!strcmp(key, "descr") && !have_descr) {
			if (!read_str(&c, out->descr, sizeof(out->descr)))
				goto bad_header;
			have_descr = true;
		} else if (!strcmp(key, "fortran_order") && !have_fo) {
			if (read_word(&c, "True"))
				fortran = true;
			else if (!read_word(&c, "False"))
				goto bad_header;
			have_fo = true;
		} else if (!strcmp(key, "shape") && !have_shape) {
			if (!read_shape(&c, &out->t))
				goto bad_header;
			have_shape = true;
		} else {
			return lp_errf(err, -EINVAL, "'%s': unexpected key '%s' in the .npy header",
			               label, key);
		}
		if (!eat(&c, ',')) {
			if (!eat(&c, '}'))
				goto bad_header;
			break;
		}
	}
	skip_ws(&c);
	if (c.p != c.end)
		goto bad_header;
	if (!have_descr || !have_fo || !have_shape)
		return lp_errf(err, -EINVAL, "'%s': .npy header lacks %s", label,
		               !have_descr ? "'descr'"
		               : !have_fo  ? "'fortran_order'"
		                           : "'shape'");
	if (fortran)
		return lp_errf(err, -EINVAL, "'%s': fortran-order arrays are not supported", label);
	for (size_t i = 0; i < sizeof(descrs) / sizeof(descrs[0]); i++) {
		if (!strcmp(out->descr, descrs[i].descr)) {
			out->t.type = descrs[i].type;
			esize = lp_fmt_type_size(descrs[i].type);
		}
	}
	if (!esize)
		return lp_errf(err, -EINVAL, "'%s': .npy dtype '%s' is not supported%s", label,
		               out->descr, out->descr[0] == '>' ? " (big-endian)" : "");
	for (int i = 0; i < out->t.n_dims; i++) {
		if (out->t.shape[i] && numel > UINT64_MAX / 8 / (uint64_t)out->t.shape[i])
			return lp_errf(err, -EINVAL, "'%s': .npy shape is too large", label);
		numel *= (uint64_t)out->t.shape[i];
	}
	hoff += hlen;
	if (numel * esize != n - hoff)
		return lp_errf(
		    err, -EINVAL,
		    "'%s': .npy data is %zu bytes, the header describes %llu (truncated or "
		    "corrupted?)",
		    label, n - hoff, (unsigned long long)(numel * esize));
	out->t.data = p + hoff;
	out->t.nbytes = n - hoff;
	return 0;
bad_header:
	return lp_errf(err, -EINVAL, "'%s': malformed .npy header near offset %zu", label,
	               (size_t)(c.p - (const char *)p));
}
