/* Opening a file that someone else may have put there: an adapter, a cache
 * entry, a model, a token file. Every file the agent reads goes through
 * lp_file_open(), which
 *   - never blocks: a FIFO, socket, device or directory is refused at once
 *     (opened with O_NONBLOCK, checked with fstat, then made blocking);
 *   - when given a root, never leaves it: the path is resolved ('..' and
 *     symbolic links) and must lie below the root, then opened one
 *     component at a time from the root with O_NOFOLLOW, so a component
 *     replaced by a symbolic link between the check and the open is
 *     refused instead of followed.
 * A symbolic link whose target stays below the root is fine (Hugging Face
 * cache snapshots are links into blobs/); one that leads outside is
 * refused like a path outside the root. Messages name the path as given
 * and the root, never where a link points. */
#ifndef LP_COMMON_FILE_H
#define LP_COMMON_FILE_H

#include <stdbool.h>
#include <sys/stat.h>

#include "common/err.h"

/* Opens path (borrowed) read-only as a regular file, below root when root
 * is neither NULL nor "" (path then absolute or relative to the working
 * directory, root likewise). Returns a blocking O_CLOEXEC descriptor that
 * the caller closes, with its fstat in *st (st may be NULL), or:
 *   -ENOENT  path or one of its directories does not exist
 *   -EACCES  path leads outside root, or a component changed into a
 *            symbolic link while it was opened; or permission denied
 *   -EINVAL  not a regular file (FIFO, socket, device, directory)
 *   -ENAMETOOLONG, -errno for other failures
 * with err (may be NULL) naming path. */
int lp_file_open(const char *root, const char *path, struct stat *st, struct lp_err *err);

/* Whether path, with '..' and symbolic links resolved, is root or lies
 * below it. True when root is NULL or ""; false when either cannot be
 * resolved. Does not open path. */
bool lp_file_below(const char *root, const char *path);

#endif
