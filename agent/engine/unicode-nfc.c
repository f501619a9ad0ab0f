/* NFC: decompose every code point fully (tables, Hangul by arithmetic),
 * put each run of non-starters in canonical order (stable by combining
 * class), then compose each character with the last starter when nothing
 * between them blocks it (UAX #15, "Canonical Composition Algorithm"). */
#include "agent/engine/unicode-nfc.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

#include "agent/engine/unicode-nfc-tables.h"
#include "agent/engine/unicode-utf8.h"

/* Hangul syllables (Unicode chapter 3.12) */
#define S_BASE  0xAC00u
#define L_BASE  0x1100u
#define V_BASE  0x1161u
#define T_BASE  0x11A7u
#define L_COUNT 19u
#define V_COUNT 21u
#define T_COUNT 28u
#define N_COUNT (V_COUNT * T_COUNT)
#define S_COUNT (L_COUNT * N_COUNT)

/* a canonical decomposition is at most 4 code points long */
#define MAX_DECOMP 4

bool lp_utf8_nfc_quick(const char *s, size_t len)
{
	/* U+0300 is 0xCC 0x80: any lead byte from 0xCC up starts a code point
	 * at or above it */
	for (size_t i = 0; i < len; i++)
		if ((unsigned char)s[i] >= 0xCC)
			return false;
	return true;
}

static uint8_t ccc_of(uint32_t cp)
{
	size_t lo = 0, hi = sizeof(nfc_ccc) / sizeof(nfc_ccc[0]);

	if (cp < 0x300)
		return 0;
	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		if (cp < nfc_ccc[mid].first)
			hi = mid;
		else if (cp > nfc_ccc[mid].last)
			lo = mid + 1;
		else
			return nfc_ccc[mid].ccc;
	}
	return 0;
}

static const struct nfc_decomp *decomp_of(uint32_t cp)
{
	size_t lo = 0, hi = sizeof(nfc_decomps) / sizeof(nfc_decomps[0]);

	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		if (cp < nfc_decomps[mid].cp)
			hi = mid;
		else if (cp > nfc_decomps[mid].cp)
			lo = mid + 1;
		else
			return &nfc_decomps[mid];
	}
	return NULL;
}

/* Appends the full canonical decomposition of cp to out[*n]. */
static void decompose(uint32_t cp, uint32_t *out, size_t *n)
{
	const struct nfc_decomp *d;

	if (cp >= S_BASE && cp < S_BASE + S_COUNT) {
		uint32_t s = cp - S_BASE;
		out[(*n)++] = L_BASE + s / N_COUNT;
		out[(*n)++] = V_BASE + s % N_COUNT / T_COUNT;
		if (s % T_COUNT)
			out[(*n)++] = T_BASE + s % T_COUNT;
		return;
	}
	if (cp < 0xC0 || !(d = decomp_of(cp))) {
		out[(*n)++] = cp;
		return;
	}
	decompose(d->a, out, n);
	if (d->b)
		decompose(d->b, out, n);
}

/* The primary composite of a followed by b, or 0. */
static uint32_t compose(uint32_t a, uint32_t b)
{
	size_t lo = 0, hi = sizeof(nfc_compose) / sizeof(nfc_compose[0]);

	if (a >= L_BASE && a < L_BASE + L_COUNT && b >= V_BASE && b < V_BASE + V_COUNT)
		return S_BASE + ((a - L_BASE) * V_COUNT + (b - V_BASE)) * T_COUNT;
	if (a >= S_BASE && a < S_BASE + S_COUNT && (a - S_BASE) % T_COUNT == 0 && b > T_BASE &&
	    b < T_BASE + T_COUNT)
		return a + (b - T_BASE);
	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		const struct nfc_decomp *d = &nfc_decomps[nfc_compose[mid]];
		if (a < d->a || (a == d->a && b < d->b))
			hi = mid;
		else if (a > d->a || b > d->b)
			lo = mid + 1;
		else
			return d->cp;
	}
	return 0;
}

int lp_utf8_nfc(const char *s, size_t len, char **out, size_t *out_len, struct lp_err *err)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t n = 0, w = 0, i, o = 0;
	uint32_t *cps;
	long starter = -1;
	int prev_cc = 0;
	char *dst;

	*out = NULL;
	/* every byte is at most one code point, which decomposes into at most
	 * MAX_DECOMP (Hangul: 3) */
	cps = malloc((len * MAX_DECOMP + 1) * sizeof(*cps));
	if (!cps)
		return lp_errf(err, -ENOMEM, "out of memory normalizing %zu bytes", len);
	for (i = 0; i < len;) {
		uint32_t cp;
		i += lp_utf8_decode(p + i, len - i, &cp);
		decompose(cp, cps, &n);
	}
	/* canonical order: a stable sort of each run of non-starters */
	for (i = 1; i < n; i++) {
		uint32_t c = cps[i];
		uint8_t cc = ccc_of(c);
		size_t j = i;

		if (cc == 0)
			continue;
		while (j > 0 && ccc_of(cps[j - 1]) > cc) {
			cps[j] = cps[j - 1];
			j--;
		}
		cps[j] = c;
	}
	/* composition, in place: cps[0..w) is the output so far */
	for (i = 0; i < n; i++) {
		uint32_t c = cps[i], comp;
		int cc = ccc_of(c);

		/* blocked unless adjacent to the starter or every character
		 * between them has a lower, non-zero class */
		if (starter >= 0 && ((size_t)starter + 1 == w || (prev_cc != 0 && prev_cc < cc)) &&
		    (comp = compose(cps[starter], c))) {
			cps[starter] = comp;
			continue;
		}
		if (cc == 0)
			starter = (long)w;
		prev_cc = cc;
		cps[w++] = c;
	}
	dst = malloc(w * 4 + 1);
	if (!dst) {
		free(cps);
		return lp_errf(err, -ENOMEM, "out of memory normalizing %zu bytes", len);
	}
	for (i = 0; i < w; i++)
		o += lp_utf8_encode(cps[i], (unsigned char *)dst + o);
	dst[o] = '\0';
	free(cps);
	*out = dst;
	*out_len = o;
	return 0;
}
