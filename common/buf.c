/* Capped growable buffer; see buf.h. */
#include "common/buf.h"

#include "common/file.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void lp_buf_init(struct lp_buf *b, size_t max)
{
	b->data = NULL;
	b->len = 0;
	b->cap = 0;
	b->max = max;
}

void lp_buf_release(struct lp_buf *b)
{
	free(b->data);
	b->data = NULL;
	b->len = 0;
	b->cap = 0;
}

void lp_buf_reset(struct lp_buf *b)
{
	b->len = 0;
	if (b->data)
		b->data[0] = '\0';
}

static int buf_reserve(struct lp_buf *b, size_t extra, struct lp_err *err)
{
	size_t need, cap;
	char *p;

	if (extra > b->max - b->len)
		return lp_errf(err, -E2BIG, "data exceeds the limit of %zu bytes", b->max);
	need = b->len + extra + 1;
	if (need <= b->cap)
		return 0;
	cap = b->cap ? b->cap : 64;
	while (cap < need)
		cap = cap > ((size_t)-1) / 2 ? need : cap * 2;
	p = realloc(b->data, cap);
	if (!p)
		return lp_errf(err, -ENOMEM, "out of memory");
	b->data = p;
	b->cap = cap;
	return 0;
}

int lp_buf_append(struct lp_buf *b, const void *p, size_t n, struct lp_err *err)
{
	int rc = buf_reserve(b, n, err);

	if (rc)
		return rc;
	if (n)
		memcpy(b->data + b->len, p, n);
	b->len += n;
	b->data[b->len] = '\0';
	return 0;
}

int lp_buf_appendf(struct lp_buf *b, struct lp_err *err, const char *fmt, ...)
{
	va_list ap;
	int n, rc;

	va_start(ap, fmt);
	n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	if (n < 0)
		return lp_errf(err, -EINVAL, "bad format");
	rc = buf_reserve(b, (size_t)n, err);
	if (rc)
		return rc;
	va_start(ap, fmt);
	vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
	return 0;
}

int lp_buf_read_file(struct lp_buf *b, const char *path, size_t max, struct lp_err *err)
{
	return lp_buf_read_file_in(b, NULL, path, max, err);
}

int lp_buf_read_file_in(struct lp_buf *b, const char *root, const char *path, size_t max,
                        struct lp_err *err)
{
	char chunk[65536];
	ssize_t n;
	int fd, rc = 0;

	b->max = max;
	lp_buf_reset(b);
	fd = lp_file_open(root, path, NULL, err);
	if (fd < 0)
		return fd;
	while ((n = read(fd, chunk, sizeof(chunk))) != 0) {
		if (n < 0) {
			if (errno == EINTR)
				continue;
			rc = lp_errf(err, -EIO, "cannot read '%s': %s", path, strerror(errno));
			goto out_close;
		}
		rc = lp_buf_append(b, chunk, (size_t)n, err);
		if (rc) {
			lp_err_prefix(err, "'%s'", path);
			goto out_close;
		}
	}
	if (!b->data)
		rc = lp_buf_append(b, "", 0, err);
out_close:
	close(fd);
	return rc;
}

char *lp_buf_detach(struct lp_buf *b, size_t *len)
{
	char *p = b->data;

	if (len)
		*len = b->len;
	b->data = NULL;
	b->len = 0;
	b->cap = 0;
	return p;
}
