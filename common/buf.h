/* A growable byte buffer with a hard size cap, used for every body read
 * from the outside world. The contents are always NUL-terminated so that
 * text can be used as a C string. */
#ifndef LP_COMMON_BUF_H
#define LP_COMMON_BUF_H

#include <stddef.h>

#include "common/err.h"

struct lp_buf {
	char *data; /* NULL until the first append */
	size_t len; /* bytes used, excluding the terminating NUL */
	size_t cap; /* bytes allocated */
	size_t max; /* len never exceeds this */
};

/* Initialises an empty buffer that refuses to grow past max bytes. */
void lp_buf_init(struct lp_buf *b, size_t max);
/* Frees the contents; the buffer is empty and reusable afterwards. */
void lp_buf_release(struct lp_buf *b);
void lp_buf_reset(struct lp_buf *b);

/* Appends n bytes; -E2BIG (with err) if the cap would be exceeded,
 * -ENOMEM if allocation fails. The buffer is unchanged on failure. */
int lp_buf_append(struct lp_buf *b, const void *p, size_t n, struct lp_err *err);
int lp_buf_appendf(struct lp_buf *b, struct lp_err *err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Reads a whole file of at most max bytes into b (which is reset first).
 * The file is opened with lp_file_open() (common/file.h): a FIFO, device
 * or directory is refused at once (-EINVAL); with the _in variant the file
 * must stay below root (borrowed; NULL or "" for none), else -EACCES. */
int lp_buf_read_file(struct lp_buf *b, const char *path, size_t max, struct lp_err *err);
int lp_buf_read_file_in(struct lp_buf *b, const char *root, const char *path, size_t max,
                        struct lp_err *err);

/* Hands the contents to the caller (free() them) and empties b. */
char *lp_buf_detach(struct lp_buf *b, size_t *len);

#endif
