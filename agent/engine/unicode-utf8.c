/* UTF-8 helpers and whitespace classes; see unicode-utf8.h. */
#include "agent/engine/unicode-utf8.h"

int lp_utf8_seq_len(unsigned char b)
{
	if (b < 0x80)
		return 1;
	if (b >= 0xC2 && b <= 0xDF)
		return 2;
	if (b >= 0xE0 && b <= 0xEF)
		return 3;
	if (b >= 0xF0 && b <= 0xF4)
		return 4;
	return 0;
}

bool lp_utf8_continues(const unsigned char *seq, int n, unsigned char b)
{
	unsigned char lo = 0x80, hi = 0xBF;

	if (n == 1) {
		/* the second byte's range depends on the lead (table 3-7) */
		switch (seq[0]) {
		case 0xE0:
			lo = 0xA0;
			break;
		case 0xED:
			hi = 0x9F;
			break;
		case 0xF0:
			lo = 0x90;
			break;
		case 0xF4:
			hi = 0x8F;
			break;
		default:
			break;
		}
	}
	return b >= lo && b <= hi;
}

size_t lp_utf8_decode(const unsigned char *s, size_t len, uint32_t *cp)
{
	int need = lp_utf8_seq_len(s[0]);
	uint32_t v;
	int i;

	if (need == 1) {
		*cp = s[0];
		return 1;
	}
	if (need == 0) {
		*cp = LP_UTF8_REPLACEMENT;
		return 1;
	}
	v = s[0] & (0x7F >> need);
	for (i = 1; i < need; i++) {
		if ((size_t)i >= len || !lp_utf8_continues(s, i, s[i])) {
			*cp = LP_UTF8_REPLACEMENT;
			return (size_t)i;
		}
		v = (v << 6) | (s[i] & 0x3F);
	}
	*cp = v;
	return (size_t)need;
}

size_t lp_utf8_encode(uint32_t cp, unsigned char out[4])
{
	if (cp < 0x80) {
		out[0] = (unsigned char)cp;
		return 1;
	}
	if (cp < 0x800) {
		out[0] = (unsigned char)(0xC0 | (cp >> 6));
		out[1] = (unsigned char)(0x80 | (cp & 0x3F));
		return 2;
	}
	if (cp < 0x10000) {
		out[0] = (unsigned char)(0xE0 | (cp >> 12));
		out[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
		out[2] = (unsigned char)(0x80 | (cp & 0x3F));
		return 3;
	}
	out[0] = (unsigned char)(0xF0 | (cp >> 18));
	out[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
	out[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
	out[3] = (unsigned char)(0x80 | (cp & 0x3F));
	return 4;
}

bool lp_utf8_valid(const char *s, size_t len)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t i = 0;
	uint32_t cp;

	while (i < len) {
		size_t n;

		if (p[i] < 0x80) {
			i++;
			continue;
		}
		n = lp_utf8_decode(p + i, len - i, &cp);
		if (n != (size_t)lp_utf8_seq_len(p[i]))
			return false;
		i += n;
	}
	return true;
}

bool lp_unicode_is_space(uint32_t cp)
{
	if (cp >= 0x09 && cp <= 0x0D)
		return true;
	switch (cp) {
	case 0x20:
	case 0x85:
	case 0xA0:
	case 0x1680:
	case 0x2028:
	case 0x2029:
	case 0x202F:
	case 0x205F:
	case 0x3000:
		return true;
	default:
		return cp >= 0x2000 && cp <= 0x200A;
	}
}

bool lp_unicode_is_py_space(uint32_t cp)
{
	/* Python adds the information separators U+001C..U+001F */
	return lp_unicode_is_space(cp) || (cp >= 0x1C && cp <= 0x1F);
}

const char *lp_utf8_py_strip(const char *s, size_t *len)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t start = 0, end = *len;
	uint32_t cp;

	while (start < end) {
		size_t n = lp_utf8_decode(p + start, end - start, &cp);

		if (!lp_unicode_is_py_space(cp))
			break;
		start += n;
	}
	while (end > start) {
		/* step back to the start of the last code point */
		size_t b = end - 1;

		while (b > start && (p[b] & 0xC0) == 0x80 && end - b < 4)
			b--;
		if (lp_utf8_decode(p + b, end - b, &cp) != end - b || !lp_unicode_is_py_space(cp))
			break;
		end = b;
	}
	*len = end - start;
	return s + start;
}
