/* Encoding text to token ids, the way HF `tokenizers` does it:
 *   1. added tokens are matched in the raw text (leftmost, longest first);
 *   2. each stretch of text between them is normalized (Prepend, Replace,
 *      NFC);
 *   3. pre-tokenizers cut it into pieces (Split regexes, Digits, ByteLevel
 *      with the GPT-2 regex, Metaspace);
 *   4. the model turns each piece into ids: BPE by merge rank, or
 *      SentencePiece BPE by token score, with byte fallback;
 *   5. the post-processor's BOS/EOS are added around the result.
 * Building the tokenizer is in tokenizer-load.c, decoding in
 * tokenizer-decode.c. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "agent/engine/tokenizer-internal.h"
#include "agent/engine/unicode-nfc.h"
#include "agent/engine/unicode-utf8.h"

#define TOK_MAX_IDS ((size_t)1 << 30)

void lp_tokens_release(struct lp_tokens *t)
{
	free(t->ids);
	t->ids = NULL;
	t->n = 0;
	t->cap = 0;
}

int lp_tokens_push(struct lp_tokens *t, int32_t id, struct lp_err *err)
{
	if (t->n == t->cap) {
		size_t cap = t->cap ? t->cap * 2 : 64;
		int32_t *p;

		if (cap > TOK_MAX_IDS)
			return lp_errf(err, -E2BIG, "more than %zu token ids", TOK_MAX_IDS);
		p = realloc(t->ids, cap * sizeof(*p));
		if (!p)
			return lp_errf(err, -ENOMEM, "out of memory for %zu token ids", cap);
		t->ids = p;
		t->cap = cap;
	}
	t->ids[t->n++] = id;
	return 0;
}

int32_t lp_tokenizer_vocab_size(const struct lp_tokenizer *tok)
{
	return tok->n_vocab;
}

int32_t lp_tokenizer_bos(const struct lp_tokenizer *tok)
{
	return tok->bos;
}

int32_t lp_tokenizer_eos(const struct lp_tokenizer *tok)
{
	return tok->eos;
}

bool lp_tokenizer_is_special(const struct lp_tokenizer *tok, int32_t id)
{
	return id >= 0 && id < tok->n_vocab && (tok->tok_flags[id] & TOK_F_SPECIAL);
}

int32_t lp_tokenizer_find(const struct lp_tokenizer *tok, const char *s)
{
	return tok_lookup(tok, s, strlen(s));
}

const char *lp_tokenizer_chat_template(const struct lp_tokenizer *tok)
{
	return tok->chat_template;
}

/* ---- scratch state of one encode call ---- */

struct piece {
	size_t off, len; /* in the arena */
	bool at_start;   /* begins at offset 0 of the input (Metaspace "first") */
};

struct range {
	size_t a, b;
	bool match;
};

struct sym {
	int32_t id;
	int32_t prev, next;
	uint32_t off, len; /* bytes of the word; len 0: merged away */
};

struct cand {
	uint32_t rank; /* BPE: merge rank, lower first */
	float score;   /* SPM: token score, higher first */
	int32_t left, right;
	int32_t new_id;
};

struct enc {
	const struct lp_tokenizer *t;
	struct lp_tokens *out;
	struct lp_err *err;
	pcre2_match_data *md;
	char *arena; /* normalized text and rewritten pieces */
	size_t alen, acap;
	struct piece *pcs[2];
	size_t npc[2], pcap[2];
	struct range *rg;
	size_t nrg, rgcap;
	struct sym *syms;
	size_t symcap;
	struct cand *heap;
	size_t nheap, heapcap;
	char *word; /* byte-level text of a piece, for ignore_merges */
	size_t wordcap;
};

static int grow(void **p, size_t *cap, size_t need, size_t elem, struct lp_err *err)
{
	size_t ncap = *cap ? *cap : 64;
	void *np;

	if (need <= *cap)
		return 0;
	while (ncap < need)
		ncap *= 2;
	if (ncap > ((size_t)1 << 34) / elem)
		return lp_errf(err, -E2BIG, "input too large to tokenize");
	np = realloc(*p, ncap * elem);
	if (!np)
		return lp_errf(err, -ENOMEM, "out of memory while tokenizing");
	*p = np;
	*cap = ncap;
	return 0;
}

/* Appends s, which may point into the arena itself. */
static int arena_append(struct enc *e, const char *s, size_t len)
{
	bool inside = e->arena && s >= e->arena && s < e->arena + e->acap;
	size_t at = inside ? (size_t)(s - e->arena) : 0;
	int rc = grow((void **)&e->arena, &e->acap, e->alen + len + 1, 1, e->err);

	if (rc)
		return rc;
	if (inside)
		s = e->arena + at;
	if (len)
		memcpy(e->arena + e->alen, s, len);
	e->alen += len;
	return 0;
}

static int piece_push(struct enc *e, int list, size_t off, size_t len, bool at_start)
{
	int rc = grow((void **)&e->pcs[list], &e->pcap[list], e->npc[list] + 1,
	              sizeof(struct piece), e->err);

	if (rc)
		return rc;
	e->pcs[list][e->npc[list]++] = (struct piece){off, len, at_start};
	return 0;
}

static int range_push(struct enc *e, size_t a, size_t b, bool match)
{
	int rc = grow((void **)&e->rg, &e->rgcap, e->nrg + 1, sizeof(struct range), e->err);

	if (rc)
		return rc;
	e->rg[e->nrg++] = (struct range){a, b, match};
	return 0;
}

/* Fills e->rg with the alternating non-match / match ranges of re in
 * s[0..len), as HF's find_matches does. */
static int find_ranges(struct enc *e, const pcre2_code *re, const char *s, size_t len)
{
	size_t start = 0, prev = 0;
	int rc;

	e->nrg = 0;
	while (start <= len) {
		PCRE2_SIZE *ov;
		size_t ms, me;

		rc = pcre2_match(re, (PCRE2_SPTR)s, len, start, PCRE2_NO_UTF_CHECK, e->md, NULL);
		if (rc == PCRE2_ERROR_NOMATCH)
			break;
		if (rc < 0) {
			PCRE2_UCHAR msg[120];

			pcre2_get_error_message(rc, msg, sizeof(msg));
			return lp_errf(e->err, -EINVAL, "regex match failed: %s",
			               (const char *)msg);
		}
		ov = pcre2_get_ovector_pointer(e->md);
		ms = ov[0];
		me = ov[1];
		if (ms > prev && (rc = range_push(e, prev, ms, false)))
			return rc;
		if ((rc = range_push(e, ms, me, true)))
			return rc;
		prev = me;
		if (me > ms) {
			start = me;
		} else {
			/* an empty match: step over one character */
			int n;

			if (ms >= len)
				break;
			n = lp_utf8_seq_len((unsigned char)s[ms]);
			start = ms + (size_t)(n > 0 ? n : 1);
		}
	}
	if (prev < len && (rc = range_push(e, prev, len, false)))
		return rc;
	return 0;
}

/* Splits piece p by re with HF's SplitDelimiterBehavior into list `to`. */
static int split_piece(struct enc *e, const struct piece *p, const pcre2_code *re,
                       enum tok_split_behavior b, bool invert, int to)
{
	size_t i, n, first = e->npc[to];
	size_t pending = SIZE_MAX;
	int rc;

	if ((rc = find_ranges(e, re, e->arena + p->off, p->len)))
		return rc;
	n = e->nrg;
	for (i = 0; i < n; i++)
		e->rg[i].match ^= invert;
	for (i = 0; i < n; i++) {
		struct range r = e->rg[i];
		struct piece *last = e->npc[to] > first ? &e->pcs[to][e->npc[to] - 1] : NULL;

		switch (b) {
		case SPLIT_REMOVED:
			if (r.match)
				continue;
			break;
		case SPLIT_ISOLATED:
			break;
		case SPLIT_MERGED_PREV:
			if (r.match && i > 0 && !e->rg[i - 1].match && last) {
				last->len = p->off + r.b - last->off;
				continue;
			}
			break;
		case SPLIT_MERGED_NEXT:
			if (pending != SIZE_MAX) {
				r.a = pending;
				pending = SIZE_MAX;
			}
			if (r.match && i + 1 < n && !e->rg[i + 1].match) {
				pending = r.a;
				continue;
			}
			break;
		case SPLIT_CONTIGUOUS:
			if (last && r.match == e->rg[i - 1].match) {
				last->len = p->off + r.b - last->off;
				continue;
			}
			break;
		}
		if ((rc = piece_push(e, to, p->off + r.a, r.b - r.a, p->at_start && r.a == 0)))
			return rc;
	}
	/* HF drops the empty splits */
	for (i = first, n = first; i < e->npc[to]; i++)
		if (e->pcs[to][i].len)
			e->pcs[to][n++] = e->pcs[to][i];
	e->npc[to] = n;
	return 0;
}

static bool starts_with(const char *s, size_t len, const char *p, size_t plen)
{
	return len >= plen && memcmp(s, p, plen) == 0;
}

/* Writes piece p rewritten by a Metaspace pre-tokenizer to the arena. */
static int metaspace_piece(struct enc *e, const struct tok_pre *pre, struct piece *p)
{
	size_t start = e->alen, i;
	bool prepend;
	int rc;

	for (i = 0; i < p->len; i++) {
		char c = e->arena[p->off + i];

		rc = c == ' ' ? arena_append(e, pre->repl, pre->repl_len) : arena_append(e, &c, 1);
		if (rc)
			return rc;
	}
	prepend =
	    !starts_with(e->arena + start, e->alen - start, pre->repl, pre->repl_len) &&
	    (pre->prepend == PREPEND_ALWAYS || (pre->prepend == PREPEND_FIRST && p->at_start));
	if (prepend) {
		if ((rc = arena_append(e, pre->repl, pre->repl_len)))
			return rc;
		memmove(e->arena + start + pre->repl_len, e->arena + start,
		        e->alen - start - pre->repl_len);
		memcpy(e->arena + start, pre->repl, pre->repl_len);
	}
	p->off = start;
	p->len = e->alen - start;
	return 0;
}

static int pre_tokenize(struct enc *e, int *list)
{
	const struct lp_tokenizer *t = e->t;
	int from = 0, k, rc;
	size_t i;

	for (k = 0; k < t->n_pre; k++) {
		const struct tok_pre *pre = &t->pre[k];
		int to = !from;

		e->npc[to] = 0;
		for (i = 0; i < e->npc[from]; i++) {
			struct piece p = e->pcs[from][i];

			if (pre->type == PRE_BYTE_LEVEL && pre->add_prefix_space &&
			    !(p.len && e->arena[p.off] == ' ')) {
				size_t start = e->alen;

				if ((rc = arena_append(e, " ", 1)) ||
				    (rc = arena_append(e, e->arena + p.off, p.len)))
					return rc;
				p.off = start;
				p.len++;
			} else if (pre->type == PRE_METASPACE) {
				if ((rc = metaspace_piece(e, pre, &p)))
					return rc;
			}
			if (pre->re)
				rc = split_piece(e, &p, pre->re, pre->behavior, pre->invert, to);
			else
				rc = p.len ? piece_push(e, to, p.off, p.len, p.at_start) : 0;
			if (rc)
				return rc;
		}
		from = to;
	}
	*list = from;
	return 0;
}

/* ---- models ---- */

static bool cand_before(const struct enc *e, const struct cand *a, const struct cand *b)
{
	if (e->t->model == TOK_MODEL_SPM) {
		if (a->score != b->score)
			return a->score > b->score;
	} else if (a->rank != b->rank) {
		return a->rank < b->rank;
	}
	return a->left < b->left;
}

static int heap_push(struct enc *e, struct cand c)
{
	size_t i;
	int rc = grow((void **)&e->heap, &e->heapcap, e->nheap + 1, sizeof(c), e->err);

	if (rc)
		return rc;
	i = e->nheap++;
	while (i > 0) {
		size_t parent = (i - 1) / 2;

		if (!cand_before(e, &c, &e->heap[parent]))
			break;
		e->heap[i] = e->heap[parent];
		i = parent;
	}
	e->heap[i] = c;
	return 0;
}

static struct cand heap_pop(struct enc *e)
{
	struct cand top = e->heap[0], last = e->heap[--e->nheap];
	size_t i = 0, n = e->nheap;

	for (;;) {
		size_t c = 2 * i + 1;

		if (c >= n)
			break;
		if (c + 1 < n && cand_before(e, &e->heap[c + 1], &e->heap[c]))
			c++;
		if (!cand_before(e, &e->heap[c], &last))
			break;
		e->heap[i] = e->heap[c];
		i = c;
	}
	if (n)
		e->heap[i] = last;
	return top;
}

static int sym_push(struct enc *e, size_t *n, int32_t id, size_t off, size_t len)
{
	int rc = grow((void **)&e->syms, &e->symcap, *n + 1, sizeof(struct sym), e->err);

	if (rc)
		return rc;
	e->syms[*n] =
	    (struct sym){id, (int32_t)*n - 1, (int32_t)*n + 1, (uint32_t)off, (uint32_t)len};
	(*n)++;
	return 0;
}

/* Queues the pair (left, its next symbol) if it can merge. */
static int try_pair(struct enc *e, const char *w, int32_t left)
{
	const struct lp_tokenizer *t = e->t;
	struct cand c = {0};
	int32_t right;

	if (left < 0 || (right = e->syms[left].next) < 0)
		return 0;
	c.left = left;
	c.right = right;
	if (t->model == TOK_MODEL_SPM) {
		int32_t id =
		    tok_lookup(t, w + e->syms[left].off, e->syms[left].len + e->syms[right].len);

		if (id < 0)
			return 0;
		c.new_id = id;
		c.score = t->scores[id];
	} else {
		c.rank = tok_merge_rank(t, e->syms[left].id, e->syms[right].id, &c.new_id);
		if (c.rank == UINT32_MAX)
			return 0;
	}
	return heap_push(e, c);
}

static void merge_syms(struct enc *e, int32_t left, int32_t right, int32_t new_id, size_t n)
{
	struct sym *l = &e->syms[left], *r = &e->syms[right];

	l->id = new_id;
	l->len += r->len;
	r->len = 0;
	l->next = r->next;
	if (l->next >= 0 && (size_t)l->next < n)
		e->syms[l->next].prev = left;
}

static int emit(struct enc *e, int32_t id)
{
	return lp_tokens_push(e->out, id, e->err);
}

/* One pre-tokenized piece through the model. */
static int encode_word(struct enc *e, const char *w, size_t len)
{
	const struct lp_tokenizer *t = e->t;
	size_t n = 0, i;
	int32_t unk_pending = -1;
	int rc;

	if (len == 0)
		return 0;
	if (t->ignore_merges) {
		int32_t id;

		if (t->byte_level) {
			size_t wl = 0;

			if ((rc = grow((void **)&e->word, &e->wordcap, 2 * len, 1, e->err)))
				return rc;
			for (i = 0; i < len; i++)
				wl += lp_utf8_encode(t->byte_cp[(unsigned char)w[i]],
				                     (unsigned char *)e->word + wl);
			id = tok_lookup(t, e->word, wl);
		} else {
			id = tok_lookup(t, w, len);
		}
		if (id >= 0)
			return emit(e, id);
	}
	/* one symbol per character (per byte for byte-level models) */
	for (i = 0; i < len;) {
		size_t clen = t->byte_level ? 1 : (size_t)lp_utf8_seq_len((unsigned char)w[i]);
		int32_t id;

		if (clen == 0 || clen > len - i)
			clen = 1; /* cannot happen on sanitized text */
		if (t->byte_level)
			id = t->byte_char_id[(unsigned char)w[i]];
		else
			id = tok_lookup(t, w + i, clen);
		if (id >= 0 || t->model == TOK_MODEL_SPM) {
			/* SentencePiece keeps unknown characters as symbols:
			 * they may still merge, else they become bytes below */
			if (unk_pending >= 0) {
				if ((rc = sym_push(e, &n, unk_pending, i, 0)))
					return rc;
				unk_pending = -1;
			}
			if ((rc = sym_push(e, &n, id, i, clen)))
				return rc;
			i += clen;
			continue;
		}
		if (t->byte_fallback && !t->byte_level) {
			size_t k;

			for (k = 0; k < clen && t->byte_id[(unsigned char)w[i + k]] >= 0; k++)
				;
			if (k == clen) {
				/* HF adds the bytes without flushing a pending unk */
				for (k = 0; k < clen; k++)
					if ((rc = sym_push(e, &n,
					                   t->byte_id[(unsigned char)w[i + k]],
					                   i + k, 1)))
						return rc;
				i += clen;
				continue;
			}
		}
		if (t->unk >= 0) {
			if (unk_pending >= 0 && !t->fuse_unk &&
			    (rc = sym_push(e, &n, unk_pending, i, 0)))
				return rc;
			unk_pending = t->unk;
		}
		i += clen;
	}
	if (unk_pending >= 0 && (rc = sym_push(e, &n, unk_pending, len, 0)))
		return rc;
	if (n == 0)
		return 0;
	e->syms[n - 1].next = -1;
	/* unk symbols have length 0 but must stay alive: give them 1 */
	for (i = 0; i < n; i++)
		if (e->syms[i].len == 0)
			e->syms[i].len = 1;

	e->nheap = 0;
	for (i = 0; i + 1 < n; i++)
		if ((rc = try_pair(e, w, (int32_t)i)))
			return rc;
	while (e->nheap) {
		struct cand c = heap_pop(e);
		struct sym *l = &e->syms[c.left];

		if (l->len == 0 || l->next < 0)
			continue;
		if (t->model == TOK_MODEL_SPM) {
			/* both sides must be unchanged since the pair was queued */
			if (l->next != c.right || e->syms[c.right].len == 0 ||
			    tok_lookup(t, w + l->off, l->len + e->syms[c.right].len) != c.new_id)
				continue;
		} else {
			/* HF's test: the pair now at this position still makes
			 * the queued token */
			int32_t id;

			c.right = l->next;
			if (tok_merge_rank(t, l->id, e->syms[c.right].id, &id) == UINT32_MAX ||
			    id != c.new_id)
				continue;
		}
		merge_syms(e, c.left, c.right, c.new_id, n);
		if ((rc = try_pair(e, w, l->prev)) || (rc = try_pair(e, w, c.left)))
			return rc;
	}
	for (i = 0; i < n; i = (size_t)e->syms[i].next) {
		const struct sym *s = &e->syms[i];

		if (s->id >= 0) {
			rc = emit(e, s->id);
		} else {
			/* SentencePiece: an unknown character as its bytes */
			size_t k;

			rc = 0;
			for (k = 0; k < s->len && !rc; k++) {
				int32_t b = t->byte_id[(unsigned char)w[s->off + k]];

				if (b >= 0)
					rc = emit(e, b);
				else if (t->unk >= 0 && (k == 0 || !t->fuse_unk))
					rc = emit(e, t->unk);
			}
		}
		if (rc)
			return rc;
		if (s->next < 0)
			break;
	}
	return 0;
}

/* ---- added tokens ---- */

static bool space_at(const char *s, size_t len, size_t pos, size_t *clen)
{
	uint32_t cp;

	*clen = lp_utf8_decode((const unsigned char *)s + pos, len - pos, &cp);
	return lp_unicode_is_space(cp);
}

/* the start of the character that ends at s[end] (valid UTF-8) */
static size_t char_before(const char *s, size_t from, size_t end)
{
	size_t b = end - 1;

	while (b > from && ((unsigned char)s[b] & 0xC0) == 0x80)
		b--;
	return b;
}

static bool word_char(const struct lp_tokenizer *t, pcre2_match_data *md, const char *s, size_t len,
                      size_t pos)
{
	return pcre2_match(t->word_re, (PCRE2_SPTR)s, len, pos, PCRE2_ANCHORED | PCRE2_NO_UTF_CHECK,
	                   md, NULL) >= 0;
}

/* The leftmost, longest added token in s[from..len) that applies (special
 * ones only with parse_special; normalized ones only on normalized text).
 * Returns its index and the matched range including lstrip/rstrip
 * whitespace, or -1. */
static int find_added(const struct enc *e, const char *s, size_t len, size_t from,
                      bool parse_special, bool normalized, size_t *ms, size_t *me)
{
	const struct lp_tokenizer *t = e->t;
	size_t pos, k, cl;

	if (!t->n_added)
		return -1;
	for (pos = from; pos < len; pos++) {
		unsigned char b = (unsigned char)s[pos];

		for (k = t->added_bucket[b]; k < t->added_bucket[b + 1]; k++) {
			const struct tok_added *a = &t->added[k];

			if (a->normalized != normalized || (a->special && !parse_special))
				continue;
			if (a->len > len - pos || memcmp(s + pos, t->strtab + a->off, a->len) != 0)
				continue;
			if (a->single_word &&
			    ((pos > 0 && word_char(t, e->md, s, len, char_before(s, 0, pos))) ||
			     (pos + a->len < len && word_char(t, e->md, s, len, pos + a->len))))
				continue;
			*ms = pos;
			*me = pos + a->len;
			while (a->lstrip && *ms > from) {
				size_t c = char_before(s, from, *ms);

				if (!space_at(s, len, c, &cl))
					break;
				*ms = c;
			}
			while (a->rstrip && *me < len && space_at(s, len, *me, &cl))
				*me += cl;
			return (int)k;
		}
	}
	return -1;
}

/* ---- the pipeline ---- */

static int model_text(struct enc *e, size_t off, size_t len, bool at_start)
{
	int list = 0, rc;
	size_t i;

	e->npc[0] = 0;
	if ((rc = piece_push(e, 0, off, len, at_start)) || (rc = pre_tokenize(e, &list)))
		return rc;
	for (i = 0; i < e->npc[list]; i++) {
		const struct piece *p = &e->pcs[list][i];

		if ((rc = encode_word(e, e->arena + p->off, p->len)))
			return rc;
	}
	return 0;
}

static int normalize(struct enc *e, size_t *off, size_t *len)
{
	const struct lp_tokenizer *t = e->t;
	int k, rc;

	for (k = 0; k < t->n_norm; k++) {
		const struct tok_norm *n = &t->norm[k];
		size_t start = e->alen, i;

		if (n->type == NORM_PREPEND) {
			if (*len == 0)
				continue; /* HF prepends only to non-empty text */
			if ((rc = arena_append(e, n->text, n->text_len)) ||
			    (rc = arena_append(e, e->arena + *off, *len)))
				return rc;
		} else if (n->type == NORM_NFC) {
			char *nfc;
			size_t nfc_len;

			if (lp_utf8_nfc_quick(e->arena + *off, *len))
				continue;
			if ((rc = lp_utf8_nfc(e->arena + *off, *len, &nfc, &nfc_len, e->err)))
				return rc;
			rc = arena_append(e, nfc, nfc_len);
			free(nfc);
			if (rc)
				return rc;
		} else {
			size_t prev = 0;

			if ((rc = find_ranges(e, n->re, e->arena + *off, *len)))
				return rc;
			for (i = 0; i < e->nrg; i++) {
				const struct range *r = &e->rg[i];

				if (!r->match)
					continue;
				if ((rc = arena_append(e, e->arena + *off + prev, r->a - prev)) ||
				    (rc = arena_append(e, n->text, n->text_len)))
					return rc;
				prev = r->b;
			}
			if ((rc = arena_append(e, e->arena + *off + prev, *len - prev)))
				return rc;
		}
		*off = start;
		*len = e->alen - start;
	}
	return 0;
}

int tok_normalize(const struct lp_tokenizer *t, const char *s, size_t len, char **out,
                  size_t *out_len, struct lp_err *err)
{
	struct enc e = {.t = t, .err = err};
	size_t off = 0;
	int rc;

	*out = NULL;
	e.md = pcre2_match_data_create(1, NULL);
	if (!e.md)
		return lp_errf(err, -ENOMEM, "out of memory");
	if (!(rc = arena_append(&e, s, len)) && !(rc = normalize(&e, &off, &len))) {
		*out = malloc(len + 1);
		if (*out) {
			memcpy(*out, e.arena + off, len);
			(*out)[len] = '\0';
			*out_len = len;
		} else {
			rc = lp_errf(err, -ENOMEM, "out of memory");
		}
	}
	pcre2_match_data_free(e.md);
	free(e.arena);
	free(e.rg);
	return rc;
}

/* A stretch of input between added tokens. */
static int encode_segment(struct enc *e, const char *s, size_t len, bool at_start,
                          bool parse_special)
{
	size_t off = 0, pos, ms, me;
	int k, rc;

	e->alen = 0;
	if ((rc = arena_append(e, s, len)) || (rc = normalize(e, &off, &len)))
		return rc;
	if (!e->t->any_normalized_added)
		return model_text(e, off, len, at_start);
	/* added tokens that match the normalized text; the arena grows as
	 * pieces are rewritten, so work with offsets */
	for (pos = 0;;) {
		k = find_added(e, e->arena + off, len, pos, parse_special, true, &ms, &me);
		if (k < 0)
			ms = len;
		if (ms > pos && (rc = model_text(e, off + pos, ms - pos, at_start && pos == 0)))
			return rc;
		if (k < 0)
			return 0;
		if ((rc = emit(e, e->t->added[k].id)))
			return rc;
		pos = me;
	}
}

/* Invalid UTF-8 becomes U+FFFD, one per maximal invalid subpart. */
static char *sanitize(const char *s, size_t len, size_t *out_len)
{
	char *o = malloc(3 * len + 1);
	size_t i = 0, n = 0;

	if (!o)
		return NULL;
	while (i < len) {
		uint32_t cp;
		size_t c = lp_utf8_decode((const unsigned char *)s + i, len - i, &cp);

		n += lp_utf8_encode(cp, (unsigned char *)o + n);
		i += c;
	}
	*out_len = n;
	return o;
}

int lp_tokenizer_encode(const struct lp_tokenizer *tok, const char *text, size_t len,
                        unsigned flags, struct lp_tokens *out, struct lp_err *err)
{
	bool parse_special = flags & LP_ENCODE_PARSE_SPECIAL;
	struct enc e = {.t = tok, .out = out, .err = err};
	size_t n0 = out->n, pos = 0, ms, me;
	char *clean = NULL;
	int i, k, rc = 0;

	if (len && !lp_utf8_valid(text, len)) {
		if (len > ((size_t)1 << 32) || !(clean = sanitize(text, len, &len)))
			return lp_errf(err, -ENOMEM, "out of memory while tokenizing");
		text = clean;
	}
	e.md = pcre2_match_data_create(1, NULL);
	if (!e.md) {
		rc = lp_errf(err, -ENOMEM, "out of memory while tokenizing");
		goto out;
	}
	for (i = 0; (flags & LP_ENCODE_ADD_SPECIAL) && i < tok->n_prefix && !rc; i++)
		rc = emit(&e, tok->prefix[i]);
	while (!rc) {
		k = find_added(&e, text, len, pos, parse_special, false, &ms, &me);
		if (k < 0)
			ms = len;
		if (ms > pos &&
		    (rc = encode_segment(&e, text + pos, ms - pos, pos == 0, parse_special)))
			break;
		if (k < 0)
			break;
		if ((rc = emit(&e, tok->added[k].id)))
			break;
		pos = me;
	}
	for (i = 0; (flags & LP_ENCODE_ADD_SPECIAL) && i < tok->n_suffix && !rc; i++)
		rc = emit(&e, tok->suffix[i]);
out:
	if (rc)
		out->n = n0;
	pcre2_match_data_free(e.md);
	free(e.arena);
	free(e.pcs[0]);
	free(e.pcs[1]);
	free(e.rg);
	free(e.syms);
	free(e.heap);
	free(e.word);
	free(clean);
	return rc;
}
