/* Safe opening of untrusted files; see file.h. */
#include "common/file.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Whether real (resolved) is root (resolved) or below it. */
static bool under(const char *root, const char *real)
{
	size_t n = strlen(root);

	if (n == 1 && root[0] == '/')
		return real[0] == '/';
	return !strncmp(real, root, n) && (real[n] == '\0' || real[n] == '/');
}

static int open_errf(struct lp_err *err, int e, const char *path)
{
	if (e == ENOENT || e == ENOTDIR)
		return lp_errf(err, -ENOENT, "cannot open '%s': %s", path, strerror(ENOENT));
	return lp_errf(err, -e, "cannot open '%s': %s", path, strerror(e));
}

/* Opens real (a resolved path below the resolved root) one component at a
 * time from root, following no symbolic link: realpath() found none, so
 * one met now was put there after the check. */
static int open_beneath(const char *root, const char *real, const char *path, struct lp_err *err)
{
	char rel[PATH_MAX];
	const int leaf_flags = O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY | O_NOFOLLOW;
	char *comp, *next;
	int dfd, fd, e;
	size_t n = strlen(root);

	if (n == 1)
		n = 0; /* root "/": every path is below it */
	if (real[n] == '\0') {
		fd = open(real, leaf_flags);
		return fd < 0 ? open_errf(err, errno, path) : fd;
	}
	if (strlen(real + n + 1) >= sizeof(rel))
		return lp_errf(err, -ENAMETOOLONG, "cannot open '%s': path too long", path);
	memcpy(rel, real + n + 1, strlen(real + n + 1) + 1);
	dfd = open(n ? root : "/", O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0)
		return open_errf(err, errno, path);
	for (comp = rel;; comp = next) {
		next = strchr(comp, '/');
		if (!next)
			break;
		*next++ = '\0';
		fd = openat(dfd, comp, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		e = errno;
		close(dfd);
		if (fd < 0) {
			/* O_PATH | O_NOFOLLOW opens a link itself: ENOTDIR */
			if (e == ENOTDIR || e == ELOOP)
				return lp_errf(
				    err, -EACCES,
				    "cannot open '%s': a directory on its path was replaced "
				    "by a symbolic link while it was opened",
				    path);
			return open_errf(err, e, path);
		}
		dfd = fd;
	}
	fd = openat(dfd, comp, leaf_flags);
	e = errno;
	close(dfd);
	if (fd < 0 && e == ELOOP)
		return lp_errf(err, -EACCES,
		               "cannot open '%s': it was replaced by a symbolic link while it was "
		               "opened",
		               path);
	return fd < 0 ? open_errf(err, e, path) : fd;
}

int lp_file_open(const char *root, const char *path, struct stat *st, struct lp_err *err)
{
	char rroot[PATH_MAX], real[PATH_MAX];
	struct stat sb;
	int fd, fl, rc;

	if (!st)
		st = &sb;
	if (!root || !root[0]) {
		fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
		if (fd < 0)
			return open_errf(err, errno, path);
	} else {
		if (!realpath(root, rroot))
			return lp_errf(err, -EACCES,
			               "cannot open '%s': its root '%s' cannot be resolved: %s",
			               path, root, strerror(errno));
		if (!realpath(path, real)) {
			int e = errno;
			/* a dangling link: do not tell whether its target
			 * (maybe outside the root) exists */
			if (lstat(path, &sb) == 0 && S_ISLNK(sb.st_mode))
				return lp_errf(
				    err, -EACCES,
				    "'%s' is a symbolic link that does not resolve to a file "
				    "below '%s'",
				    path, root);
			return open_errf(err, e, path);
		}
		if (!under(rroot, real))
			return lp_errf(err, -EACCES,
			               "'%s' leads outside '%s' (after resolving '..' and links)",
			               path, root);
		fd = open_beneath(rroot, real, path, err);
		if (fd < 0)
			return fd;
	}
	if (fstat(fd, st) < 0) {
		rc = lp_errf(err, -errno, "cannot stat '%s': %s", path, strerror(errno));
		goto out_close;
	}
	if (!S_ISREG(st->st_mode)) {
		rc = lp_errf(err, -EINVAL, "'%s' is not a regular file", path);
		goto out_close;
	}
	fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0) {
		rc = lp_errf(err, -errno, "cannot open '%s': %s", path, strerror(errno));
		goto out_close;
	}
	return fd;
out_close:
	close(fd);
	return rc;
}

bool lp_file_below(const char *root, const char *path)
{
	char rroot[PATH_MAX], real[PATH_MAX];

	if (!root || !root[0])
		return true;
	return realpath(root, rroot) && realpath(path, real) && under(rroot, real);
}
