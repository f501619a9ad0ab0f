/* A read-only tar reader for archives held in memory (a mapped .nemo file):
 * POSIX ustar and GNU headers, GNU long names ('L') and pax 'path' / 'size'
 * records; every header checksum is verified and every member must lie
 * inside the bytes given. Only regular files are listed; directories are
 * skipped; links and devices, absolute names and names with a ".."
 * component are refused (-EINVAL naming the member). Compressed archives
 * are not read. */
#ifndef LP_FORMATS_TAR_H
#define LP_FORMATS_TAR_H

#include <stddef.h>

#include "common/err.h"

#define LP_TAR_MAX_MEMBERS 10000

struct lp_tar_member {
	char *name;                /* without leading "./", owned by the lp_tar */
	const unsigned char *data; /* inside the archive bytes */
	size_t size;
};

struct lp_tar {
	struct lp_tar_member *members;
	size_t n;
};

/* Lists the regular files of the n bytes at p (borrowed; they must outlive
 * t). label names the archive in messages. Release with lp_tar_release(),
 * also after a failure. */
int lp_tar_read(struct lp_tar *t, const void *p, size_t n, const char *label, struct lp_err *err);
void lp_tar_release(struct lp_tar *t);

/* The member named name, or NULL. */
const struct lp_tar_member *lp_tar_find(const struct lp_tar *t, const char *name);

#endif
