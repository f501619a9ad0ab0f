/* A whole file mapped read-only into memory. */
#ifndef LP_COMMON_MAPPED_FILE_H
#define LP_COMMON_MAPPED_FILE_H

#include <stddef.h>

#include "common/err.h"

struct lp_mapped_file {
	const unsigned char *data; /* NULL for an empty file */
	size_t size;
	char *path; /* owned copy, for error messages */
};

/* Maps path read-only. On failure mf is left released and err says why
 * (with the path). Release with lp_mapped_file_release(). The file is
 * opened with lp_file_open() (common/file.h): a FIFO, device or directory
 * is refused at once (-EINVAL), and with the _in variant the file must
 * stay below root (borrowed; NULL or "" for none), else -EACCES. */
int lp_mapped_file_open(struct lp_mapped_file *mf, const char *path, struct lp_err *err);
int lp_mapped_file_open_in(struct lp_mapped_file *mf, const char *root, const char *path,
                           struct lp_err *err);

/* Unmaps; pointers into data are invalid afterwards. Safe on a zeroed or
 * already released struct. */
void lp_mapped_file_release(struct lp_mapped_file *mf);

#endif
