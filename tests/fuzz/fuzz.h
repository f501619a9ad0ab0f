/* What the libFuzzer harnesses (tests/fuzz/fuzz-*.c) share: a private
 * temporary directory for readers that only take a path, fixture files
 * read once at start, and a UTF-8 check. Harness code, not library code:
 * a broken environment aborts, since libFuzzer has no error channel. See
 * docs/fuzzing.md. */
#ifndef LP_TESTS_FUZZ_H
#define LP_TESTS_FUZZ_H

#include <fcntl.h>
#include <ftw.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent/formats/tensor.h"
#include "agent/engine/tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Each harness uses some of these. */
#define FUZZ_FN static __attribute__((unused))

static char fuzz_dir[64];

static int fuzz_rm_one(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
	(void)st;
	(void)type;
	(void)ftw;
	remove(path);
	return 0;
}

static void fuzz_rm_dir(void)
{
	if (fuzz_dir[0])
		nftw(fuzz_dir, fuzz_rm_one, 8, FTW_DEPTH | FTW_PHYS);
}

/* A directory of this process's own (mode 0700), removed at exit. */
FUZZ_FN const char *fuzz_tmpdir(void)
{
	if (!fuzz_dir[0]) {
		const char *t = getenv("TMPDIR");
		snprintf(fuzz_dir, sizeof(fuzz_dir), "%.40s/lp-fuzz-XXXXXX", t && *t ? t : "/tmp");
		if (!mkdtemp(fuzz_dir)) {
			perror("fuzz: mkdtemp");
			abort();
		}
		atexit(fuzz_rm_dir);
	}
	return fuzz_dir;
}

/* fuzz_tmpdir()/name, into out. */
FUZZ_FN const char *fuzz_path(char *out, size_t cap, const char *name)
{
	snprintf(out, cap, "%s/%s", fuzz_tmpdir(), name);
	return out;
}

/* Replaces the file at path with the n bytes at p (a regular file: the
 * readers refuse anything else). */
FUZZ_FN void fuzz_write_file(const char *path, const void *p, size_t n)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	const char *b = p;

	if (fd < 0) {
		perror(path);
		abort();
	}
	while (n > 0) {
		ssize_t w = write(fd, b, n);
		if (w <= 0) {
			perror(path);
			abort();
		}
		b += w;
		n -= (size_t)w;
	}
	close(fd);
}

/* The fixture at $LP_FIXTURES/rel (default tests/fixtures, relative to the
 * repository root), NUL-terminated; the caller frees it. */
FUZZ_FN char *fuzz_read_fixture(const char *rel, size_t *n)
{
	const char *root = getenv("LP_FIXTURES");
	char path[4096];
	struct stat st;
	char *p = NULL;
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", root && *root ? root : "tests/fixtures", rel);
	f = fopen(path, "rb");
	if (!f || fstat(fileno(f), &st) || !(p = malloc((size_t)st.st_size + 1)) ||
	    fread(p, 1, (size_t)st.st_size, f) != (size_t)st.st_size) {
		fprintf(stderr,
		        "fuzz: cannot read fixture '%s' (run from the repository root "
		        "or set LP_FIXTURES)\n",
		        path);
		abort();
	}
	fclose(f);
	p[st.st_size] = '\0';
	if (n)
		*n = (size_t)st.st_size;
	return p;
}

/* A NUL-terminated copy of the input, for readers that take a C string;
 * the caller frees it. */
FUZZ_FN char *fuzz_strndup(const uint8_t *data, size_t size)
{
	char *s = malloc(size + 1);

	if (!s)
		abort();
	memcpy(s, data, size);
	s[size] = '\0';
	return s;
}

/* True when s[0..n) is well-formed UTF-8 (no overlongs, surrogates or
 * code points past U+10FFFF). */
FUZZ_FN bool fuzz_utf8_valid(const char *s, size_t n)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t i = 0;

	while (i < n) {
		unsigned c = p[i], need, cp;
		if (c < 0x80) {
			i++;
			continue;
		}
		if (c >= 0xc2 && c <= 0xdf)
			need = 1, cp = c & 0x1f;
		else if (c >= 0xe0 && c <= 0xef)
			need = 2, cp = c & 0x0f;
		else if (c >= 0xf0 && c <= 0xf4)
			need = 3, cp = c & 0x07;
		else
			return false;
		if (n - i <= need)
			return false;
		for (unsigned k = 1; k <= need; k++) {
			if ((p[i + k] & 0xc0) != 0x80)
				return false;
			cp = cp << 6 | (p[i + k] & 0x3f);
		}
		if ((need == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
		    (need == 3 && (cp < 0x10000 || cp > 0x10ffff)))
			return false;
		i += need + 1;
	}
	return true;
}

/* A finding that is not a memory error: libFuzzer saves the input. */
#define FUZZ_ASSERT(cond)                                                                          \
	do {                                                                                       \
		if (!(cond)) {                                                                     \
			fprintf(stderr, "fuzz: %s:%d: assertion '%s' failed\n", __FILE__,          \
			        __LINE__, #cond);                                                  \
			abort();                                                                   \
		}                                                                                  \
	} while (0)

static volatile unsigned fuzz_sink;

/* Reads the first and last of the n bytes at p: a view a reader hands out
 * that leaves its buffer is an ASan report here. */
FUZZ_FN void fuzz_touch(const void *p, uint64_t n)
{
	if (n)
		fuzz_sink += ((const unsigned char *)p)[0] + ((const unsigned char *)p)[n - 1];
}

/* Checks what every tensor reader promises (agent/formats/tensor.h): a
 * name, a known type, 0..max dims, no negative dim, nbytes = the shape's
 * element count (whole blocks) x the type's block size, all readable. */
FUZZ_FN void fuzz_check_tensor(const struct lp_fmt_tensor *t)
{
	uint64_t numel = 1;
	size_t esize = lp_fmt_type_size(t->type), block = lp_fmt_type_block(t->type);

	FUZZ_ASSERT(t->name != NULL);
	FUZZ_ASSERT(esize > 0 && block > 0 && t->n_dims >= 0 && t->n_dims <= LP_FMT_MAX_DIMS);
	for (int i = 0; i < t->n_dims; i++) {
		FUZZ_ASSERT(t->shape[i] >= 0);
		FUZZ_ASSERT(!__builtin_mul_overflow(numel, (uint64_t)t->shape[i], &numel));
	}
	FUZZ_ASSERT(numel % block == 0 && numel / block * esize == t->nbytes);
	fuzz_touch(t->data, t->nbytes);
}

/* Encodes text (and, with extra, the n bytes at extra as text too) both
 * with and without special-token parsing, then decodes every id back with
 * the streaming decoder, which must give well-formed UTF-8. */
FUZZ_FN void fuzz_tokenizer_round_trip(const struct lp_tokenizer *tok, const char *extra, size_t n)
{
	static const char sample[] =
	    "Hello, world! <|im_start|>user\n  caf\xc3\xa9 \xe2\x82\xac 42\t"
	    "<s></s>\xf0\x9f\x98\x80 don't\r\n\xff\xc3 end";
	const char *texts[2] = {sample, extra};
	size_t lens[2] = {sizeof(sample) - 1, n};
	int32_t vocab = lp_tokenizer_vocab_size(tok);
	char piece[512];

	for (int t = 0; t < 2; t++) {
		if (!texts[t])
			continue;
		for (unsigned flags = 0; flags < 4; flags++) {
			struct lp_tokens ids = {0};
			struct lp_detok d;
			struct lp_err err;
			if (lp_tokenizer_encode(tok, texts[t], lens[t], flags, &ids, &err) == 0) {
				lp_detok_init(&d, flags & 1);
				for (size_t i = 0; i < ids.n; i++) {
					FUZZ_ASSERT(ids.ids[i] >= 0 && ids.ids[i] < vocab);
					int k = lp_detok_piece(tok, &d, ids.ids[i], piece,
					                       sizeof(piece));
					FUZZ_ASSERT(k >= 0 && (size_t)k <= sizeof(piece));
					FUZZ_ASSERT(fuzz_utf8_valid(piece, (size_t)k));
				}
				int k = lp_detok_flush(tok, &d, piece, sizeof(piece));
				FUZZ_ASSERT(k >= 0 && fuzz_utf8_valid(piece, (size_t)k));
			}
			lp_tokens_release(&ids);
		}
	}
	/* ids the model may produce, whatever the text: every one decodes */
	for (int32_t id = -1; id <= vocab && id < 4096; id++) {
		struct lp_detok d;
		lp_detok_init(&d, false);
		int k = lp_detok_piece(tok, &d, id, piece, sizeof(piece));
		FUZZ_ASSERT(k < 0 ? (id < 0 || id >= vocab) : fuzz_utf8_valid(piece, (size_t)k));
	}
	(void)lp_tokenizer_chat_template(tok);
}

#endif
