/* Read-only file mapping; see mapped-file.h. */
#include "common/mapped-file.h"

#include "common/file.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int lp_mapped_file_open(struct lp_mapped_file *mf, const char *path, struct lp_err *err)
{
	return lp_mapped_file_open_in(mf, NULL, path, err);
}

int lp_mapped_file_open_in(struct lp_mapped_file *mf, const char *root, const char *path,
                           struct lp_err *err)
{
	struct stat st;
	void *p = NULL;
	int fd, rc;

	memset(mf, 0, sizeof(*mf));
	fd = lp_file_open(root, path, &st, err);
	if (fd < 0)
		return fd;
	if (st.st_size > 0) {
		p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
		if (p == MAP_FAILED) {
			rc = lp_errf(err, -errno, "cannot map '%s': %s", path, strerror(errno));
			goto out_close;
		}
	}
	mf->path = strdup(path);
	if (!mf->path) {
		if (p)
			munmap(p, (size_t)st.st_size);
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out_close;
	}
	mf->data = p;
	mf->size = (size_t)st.st_size;
	rc = 0;
out_close:
	close(fd);
	return rc;
}

void lp_mapped_file_release(struct lp_mapped_file *mf)
{
	if (mf->data)
		munmap((void *)mf->data, mf->size);
	free(mf->path);
	memset(mf, 0, sizeof(*mf));
}
