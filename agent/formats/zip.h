/* A read-only zip reader for archives held in memory (a mapped PyTorch
 * checkpoint): the end-of-central-directory record (and its zip64 locator
 * and record when present) gives the central directory; each central
 * header gives an entry's sizes, CRC-32 and local header offset, with a
 * zip64 extra field (id 1) holding, in order, whichever of uncompressed
 * size, compressed size and local offset are 0xffffffff in the header.
 * Only stored (uncompressed, unencrypted) entries on one disk are read;
 * every offset and size is bounds-checked against the bytes given, names
 * must be unique and free of NUL bytes. Sizes in a trailing data
 * descriptor (flag bit 3) are ignored: only the central sizes count. */
#ifndef LP_FORMATS_ZIP_H
#define LP_FORMATS_ZIP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/err.h"

struct lp_zip_entry {
	const char *name; /* inside the archive bytes, not NUL-terminated */
	size_t name_len;
	const unsigned char *data; /* inside the archive bytes */
	uint64_t size;
	uint32_t crc; /* as the central directory records it */
	bool crc_ok;  /* set by lp_zip_verify() */
};

struct lp_zip {
	const char *label; /* borrowed; names the archive in messages */
	const unsigned char *bytes;
	size_t size;
	struct lp_zip_entry *entries; /* sorted by name */
	size_t n_entries;
};

/* Lists the entries of the n bytes at p (borrowed; they and label must
 * outlive z). Release with lp_zip_release(), also after a failure. */
int lp_zip_read(struct lp_zip *z, const void *p, size_t n, const char *label, struct lp_err *err);
void lp_zip_release(struct lp_zip *z);

/* The entry named by the len bytes at name, or NULL. */
struct lp_zip_entry *lp_zip_find(const struct lp_zip *z, const char *name, size_t len);

/* Checks the entry's bytes against its CRC-32 (once; later calls return 0
 * at once). -EINVAL naming the entry when they differ. */
int lp_zip_verify(const struct lp_zip *z, struct lp_zip_entry *e, struct lp_err *err);

#endif
