/* Streaming decoding: one id at a time through the tokenizer's decoder
 * chain (ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace), then
 * through a UTF-8 assembler that holds back an incomplete character until
 * its last byte arrives. Bytes that cannot complete become U+FFFD: one per
 * maximal invalid subpart (what HF's ByteLevel decoder does through
 * from_utf8_lossy), or one per byte with ByteFallback (HF replaces each
 * byte of an invalid run).
 *
 * Where streaming must differ from HF's whole-sequence decode: ByteFallback
 * replaces a whole run of byte tokens when any part of it is invalid, but
 * a stream has already emitted the run's valid prefix; and a Strip after
 * Fuse applies to the first token's text only. Ids that encoding produces
 * never hit either case. */
#include <errno.h>
#include <string.h>

#include "agent/engine/tokenizer-internal.h"
#include "agent/engine/unicode-utf8.h"
#include "common/hex.h"

/* per-token work buffers: a token's text after Replace steps */
#define WORK_MAX (4 * TOK_MAX_TOKEN_BYTES + 16)
_Static_assert(LP_TOKEN_BYTES_MAX >= WORK_MAX, "lp_detok_token_bytes may need WORK_MAX bytes");

struct sink {
	char *out;
	size_t cap, len; /* len may pass cap: the caller then gets -ENOBUFS */
};

static void put(struct sink *k, const void *p, size_t n)
{
	if (k->len + n <= k->cap)
		memcpy(k->out + k->len, p, n);
	k->len += n;
}

static void put_fffd(struct sink *k, int count)
{
	while (count-- > 0)
		put(k, "\xef\xbf\xbd", 3);
}

static void feed(const struct lp_tokenizer *t, struct lp_detok *d, struct sink *k, unsigned char b)
{
	for (;;) {
		int need;

		if (d->n_pending == 0) {
			need = lp_utf8_seq_len(b);
			if (need == 1)
				put(k, &b, 1);
			else if (need == 0)
				put_fffd(k, 1);
			else
				d->pending[d->n_pending++] = b;
			return;
		}
		if (lp_utf8_continues(d->pending, d->n_pending, b)) {
			d->pending[d->n_pending++] = b;
			if (d->n_pending == lp_utf8_seq_len(d->pending[0])) {
				put(k, d->pending, (size_t)d->n_pending);
				d->n_pending = 0;
			}
			return;
		}
		/* the pending sequence cannot complete: replace it and look
		 * at b again as the start of a new one */
		put_fffd(k, t->dec_per_byte_invalid ? d->n_pending : 1);
		d->n_pending = 0;
	}
}

/* Replaces every pat in src[0..*len) by rep into dst; -ENOBUFS if the
 * result does not fit. */
static int replace(const char *src, size_t len, const char *pat, size_t plen, const char *rep,
                   size_t rlen, char *dst, size_t *out_len)
{
	size_t i = 0, n = 0;

	while (i < len) {
		if (len - i >= plen && memcmp(src + i, pat, plen) == 0) {
			if (n + rlen > WORK_MAX)
				return -ENOBUFS;
			memcpy(dst + n, rep, rlen);
			n += rlen;
			i += plen;
		} else {
			if (n + 1 > WORK_MAX)
				return -ENOBUFS;
			dst[n++] = src[i++];
		}
	}
	*out_len = n;
	return 0;
}

/* GPT-2 code points back to bytes; a token with a code point outside the
 * table keeps its own bytes, as HF does. */
static void byte_level(const struct lp_tokenizer *t, char *s, size_t *len)
{
	size_t i = 0, n = 0;

	while (i < *len) {
		uint32_t cp;
		size_t c = lp_utf8_decode((const unsigned char *)s + i, *len - i, &cp);

		if (cp >= 324 || t->cp_byte[cp] < 0)
			return;
		i += c;
	}
	for (i = 0; i < *len;) {
		uint32_t cp;

		i += lp_utf8_decode((const unsigned char *)s + i, *len - i, &cp);
		s[n++] = (char)t->cp_byte[cp];
	}
	*len = n;
}

static void strip(char *s, size_t *len, const char *c, size_t clen, int start, int stop)
{
	size_t a = 0, b = *len;

	while (start-- > 0 && b - a >= clen && memcmp(s + a, c, clen) == 0)
		a += clen;
	while (stop-- > 0 && b - a >= clen && memcmp(s + b - clen, c, clen) == 0)
		b -= clen;
	memmove(s, s + a, b - a);
	*len = b - a;
}

/* Runs the decoder chain on one token's text; the result is in *cur. */
static int decode_token(const struct lp_tokenizer *t, bool first, const char *text, size_t len,
                        char *bufa, char *bufb, char **cur, size_t *out_len)
{
	char *a = bufa, *b = bufb, *tmp;
	int k, rc;

	memcpy(a, text, len);
	for (k = 0; k < t->n_dec; k++) {
		const struct tok_dec *d = &t->dec[k];

		switch (d->type) {
		case DEC_REPLACE:
			if ((rc = replace(a, len, d->pattern, d->pattern_len, d->content,
			                  d->content_len, b, &len)))
				return rc;
			tmp = a, a = b, b = tmp;
			break;
		case DEC_METASPACE:
			/* the first token loses its replacement characters */
			if ((rc = replace(a, len, d->pattern, d->pattern_len, " ",
			                  first && d->prepend ? 0 : 1, b, &len)))
				return rc;
			tmp = a, a = b, b = tmp;
			break;
		case DEC_BYTE_LEVEL:
			byte_level(t, a, &len);
			break;
		case DEC_BYTE_FALLBACK:
			if (len == 6 && memcmp(a, "<0x", 3) == 0 && a[5] == '>' &&
			    lp_hex_digit(a[3]) >= 0 && lp_hex_digit(a[4]) >= 0) {
				a[0] = (char)(lp_hex_digit(a[3]) * 16 + lp_hex_digit(a[4]));
				len = 1;
			}
			break;
		case DEC_FUSE:
			break;
		case DEC_STRIP:
			if (!d->after_fuse)
				strip(a, &len, d->content, d->content_len, d->start, d->stop);
			break;
		}
	}
	*cur = a;
	*out_len = len;
	return 0;
}

void lp_detok_init(struct lp_detok *d, bool skip_special)
{
	memset(d, 0, sizeof(*d));
	d->skip_special = skip_special;
}

int lp_detok_piece(const struct lp_tokenizer *tok, struct lp_detok *d, int32_t id, char *out,
                   size_t cap)
{
	char bufa[WORK_MAX], bufb[WORK_MAX], *text;
	struct lp_detok st = *d;
	struct sink k = {out, cap, 0};
	const char *tt;
	size_t len, i;
	int rc;

	if (id < 0 || id >= tok->n_vocab)
		return -EINVAL;
	if (d->skip_special && (tok->tok_flags[id] & TOK_F_SPECIAL)) {
		if (cap)
			out[0] = '\0';
		return 0;
	}
	if (tok->tok_flags[id] & TOK_F_NORM) {
		tt = tok->strtab + tok->dec_off[id];
		len = tok->dec_len[id];
	} else {
		tt = tok_text(tok, id, &len);
	}
	if ((rc = decode_token(tok, !st.started, tt, len, bufa, bufb, &text, &len)))
		return rc;
	for (i = 0; i < len; i++)
		feed(tok, &st, &k, (unsigned char)text[i]);
	if (k.len > cap)
		return -ENOBUFS;
	if (!st.started && tok->dec_stream_strip)
		strip(out, &k.len, tok->dec_strip_char, tok->dec_strip_len, tok->dec_strip_start,
		      0);
	st.started = true;
	if (k.len < cap)
		out[k.len] = '\0';
	*d = st;
	return (int)k.len;
}

int lp_detok_flush(const struct lp_tokenizer *tok, struct lp_detok *d, char *out, size_t cap)
{
	struct sink k = {out, cap, 0};

	if (d->n_pending)
		put_fffd(&k, tok->dec_per_byte_invalid ? d->n_pending : 1);
	if (k.len > cap)
		return -ENOBUFS;
	d->n_pending = 0;
	if (k.len < cap)
		out[k.len] = '\0';
	return (int)k.len;
}

int lp_detok_token_bytes(const struct lp_tokenizer *tok, int32_t id, unsigned char *out, size_t cap)
{
	char bufa[WORK_MAX], bufb[WORK_MAX], *text;
	const char *tt;
	size_t len;
	int rc;

	if (id < 0 || id >= tok->n_vocab)
		return -EINVAL;
	if (tok->tok_flags[id] & TOK_F_NORM) {
		tt = tok->strtab + tok->dec_off[id];
		len = tok->dec_len[id];
	} else {
		tt = tok_text(tok, id, &len);
	}
	if ((rc = decode_token(tok, false, tt, len, bufa, bufb, &text, &len)))
		return rc;
	if (len > cap)
		return -ENOBUFS;
	memcpy(out, text, len);
	return (int)len;
}

const char *lp_tokenizer_token_text(const struct lp_tokenizer *tok, int32_t id, size_t *len)
{
	if (id < 0 || id >= tok->n_vocab) {
		*len = 0;
		return NULL;
	}
	return tok_text(tok, id, len);
}
