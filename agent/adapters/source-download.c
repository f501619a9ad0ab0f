/* Download helpers of the sources module: every file of a remote adapter
 * goes through src_get_file(), which enforces the file-count and size
 * limits, creates subdirectories, records the file's digest and reports
 * progress; src_copy_file() does the same for a local file (model mode's
 * file:// sources). See source-internal.h. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "agent/adapters/sigv4.h"
#include "agent/adapters/source-internal.h"
#include "common/file.h"

#define COPY_CHUNK (1 << 20)

bool src_name_ok(const char *name)
{
	size_t n = strlen(name);
	const char *seg = name;

	if (n == 0 || n >= SRC_NAME_MAX || strcmp(name, SRC_META_NAME) == 0)
		return false;
	for (const char *p = name;; p++) {
		if (*p == '/' || *p == '\0') {
			size_t len = (size_t)(p - seg);
			if (len == 0 || len > 255 || (len == 1 && seg[0] == '.') ||
			    (len == 2 && seg[0] == '.' && seg[1] == '.'))
				return false;
			if (*p == '\0')
				return true;
			seg = p + 1;
		} else if ((unsigned char)*p < 0x20 || *p == 0x7f || *p == '\\') {
			return false;
		}
	}
}

int src_url_append(struct lp_buf *out, const char *s, bool keep_slash, struct lp_err *err)
{
	return lp_sigv4_uri_encode(out, s, strlen(s), !keep_slash, err);
}

int src_download_init(struct src_download *d, const char *ca_bundle, struct lp_err *err)
{
	struct lp_http_policy p = d->cache->policy;

	p.ca_bundle = ca_bundle;
	return lp_http_client_init(&d->http, &p, err);
}

void src_download_release(struct src_download *d)
{
	lp_http_client_release(&d->http);
	for (int i = 0; i < d->n_files; i++)
		free(d->files[i].name);
	free(d->files);
	d->files = NULL;
	d->n_files = 0;
}

static long ms_since(const struct timespec *t)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (now.tv_sec - t->tv_sec) * 1000L + (now.tv_nsec - t->tv_nsec) / 1000000L;
}

static void on_progress(void *arg, uint64_t bytes)
{
	struct src_download *d = arg;
	struct lp_source_cache *c = d->cache;

	if (!c->progress || ms_since(&d->last_progress) < c->progress_interval_ms)
		return;
	clock_gettime(CLOCK_MONOTONIC, &d->last_progress);
	c->progress(c->progress_arg, d->uri, d->progress_base + bytes, d->announced);
}

void src_progress_final(struct src_download *d)
{
	if (d->cache->progress)
		d->cache->progress(d->cache->progress_arg, d->uri, d->bytes,
		                   d->announced ? d->announced : d->bytes);
}

/* mkdir -p for the directories of name below d->dir. */
static int make_parents(struct src_download *d, const char *name, struct lp_err *err)
{
	char path[PATH_MAX];
	int n = snprintf(path, sizeof(path), "%s/%s", d->dir, name);
	size_t base = strlen(d->dir) + 1;

	if (n < 0 || (size_t)n >= sizeof(path))
		return lp_errf(err, -ENAMETOOLONG, "file name '%.200s' is too long", name);
	for (size_t i = base; path[i]; i++) {
		if (path[i] != '/')
			continue;
		path[i] = '\0';
		if (mkdir(path, 0755) < 0 && errno != EEXIST) {
			int e = errno;
			return lp_errf(err, -e, "cannot create '%s': %s", path, strerror(e));
		}
		path[i] = '/';
	}
	return 0;
}

static int record_file(struct src_download *d, const char *name, uint64_t size, const char *sha256,
                       struct lp_err *err)
{
	struct src_file *f;
	struct src_file *grown = realloc(d->files, (size_t)(d->n_files + 1) * sizeof(*d->files));

	if (!grown)
		return lp_errf(err, -ENOMEM, "out of memory");
	d->files = grown;
	f = &d->files[d->n_files];
	f->name = strdup(name);
	if (!f->name)
		return lp_errf(err, -ENOMEM, "out of memory");
	f->size = size;
	memcpy(f->sha256, sha256, sizeof(f->sha256));
	d->n_files++;
	return 0;
}

int src_file_admit(struct src_download *d, const char *name, uint64_t announced_size,
                   struct lp_err *err)
{
	struct lp_source_cache *c = d->cache;
	bool budget;
	uint64_t limit = src_adapter_limit(c, &budget);
	uint64_t room = limit - d->bytes;

	if (!src_name_ok(name))
		return lp_errf(err, -EINVAL,
		               "source file '%.200s' cannot be stored as a local file", name);
	for (int i = 0; i < d->n_files; i++)
		if (strcmp(d->files[i].name, name) == 0)
			return lp_errf(err, -EINVAL, "source lists '%.200s' twice", name);
	if (d->n_files >= c->max_files)
		return lp_errf(err, -EFBIG, "source has more files than the limit of %d",
		               c->max_files);
	if (announced_size > c->max_file_bytes)
		return lp_errf(
		    err, -EFBIG, "'%.200s' is %llu bytes, over the limit of %llu per file", name,
		    (unsigned long long)announced_size, (unsigned long long)c->max_file_bytes);
	if (announced_size > room && budget)
		return lp_errf(err, -ENOSPC,
		               "'%.200s' would bring the adapter over the adapter cache's "
		               "budget of %llu bytes",
		               name, (unsigned long long)limit);
	if (announced_size > room)
		return lp_errf(err, -EFBIG,
		               "'%.200s' would bring the %s over the limit of %llu "
		               "bytes",
		               name, c->noun, (unsigned long long)c->max_total_bytes);
	return 0;
}

int src_get_file(struct src_download *d, struct lp_http_get *g, const char *name,
                 uint64_t announced_size, struct lp_http_result *res, struct lp_err *err)
{
	struct lp_source_cache *c = d->cache;
	bool budget;
	uint64_t limit = src_adapter_limit(c, &budget);
	uint64_t room = limit - d->bytes;
	char path[PATH_MAX];
	int rc, n;

	if ((rc = src_file_admit(d, name, announced_size, err)) < 0)
		return rc;
	if ((rc = make_parents(d, name, err)) < 0)
		return rc;
	n = snprintf(path, sizeof(path), "%s/%s", d->dir, name);
	if (n < 0 || (size_t)n >= sizeof(path))
		return lp_errf(err, -ENAMETOOLONG, "file name '%.200s' is too long", name);
	g->path = path;
	g->body = NULL;
	g->max_bytes = room < c->max_file_bytes ? room : c->max_file_bytes;
	g->progress = on_progress;
	g->progress_arg = d;
	rc = lp_http_get(&d->http, g, res, err);
	g->path = NULL;
	if (rc == -EFBIG && budget && g->max_bytes == room && room < c->max_file_bytes)
		return lp_errf(err, -ENOSPC,
		               "'%.200s' exceeds the %llu bytes left of the adapter cache's "
		               "budget of %llu bytes",
		               name, (unsigned long long)g->max_bytes, (unsigned long long)limit);
	if (rc == -EFBIG)
		return lp_errf(err, -EFBIG, "'%.200s' exceeds the limit of %llu bytes%s%s", name,
		               (unsigned long long)g->max_bytes,
		               g->max_bytes == c->max_file_bytes ? " per file" : " left for the ",
		               g->max_bytes == c->max_file_bytes ? "" : c->noun);
	if (rc < 0 || res->status < 200 || res->status >= 300)
		return rc;
	d->bytes += res->bytes;
	d->progress_base += res->bytes;
	return record_file(d, name, res->bytes, res->sha256, err);
}

int src_copy_file(struct src_download *d, const char *src, const char *name, struct lp_err *err)
{
	static const char digits[] = "0123456789abcdef";
	struct lp_source_cache *c = d->cache;
	bool budget;
	uint64_t room = src_adapter_limit(c, &budget) - d->bytes;
	uint64_t cap = room < c->max_file_bytes ? room : c->max_file_bytes, done = 0;
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;
	char path[PATH_MAX], sha[65];
	EVP_MD_CTX *ctx = NULL;
	struct stat st;
	char *buf = NULL;
	int in, out = -1, rc, n;

	in = lp_file_open(NULL, src, &st, err);
	if (in < 0)
		return in;
	if ((rc = src_file_admit(d, name, (uint64_t)st.st_size, err)) < 0 ||
	    (rc = make_parents(d, name, err)) < 0)
		goto out;
	n = snprintf(path, sizeof(path), "%s/%s", d->dir, name);
	if (n < 0 || (size_t)n >= sizeof(path)) {
		rc = lp_errf(err, -ENAMETOOLONG, "file name '%.200s' is too long", name);
		goto out;
	}
	buf = malloc(COPY_CHUNK);
	ctx = EVP_MD_CTX_new();
	if (!buf || !ctx || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	out = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (out < 0) {
		rc = lp_errf(err, -errno, "cannot create '%s': %s", path, strerror(errno));
		goto out;
	}
	for (;;) {
		ssize_t got = read(in, buf, COPY_CHUNK);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0) {
			rc = lp_errf(err, -EIO, "cannot read '%s': %s", src, strerror(errno));
			goto out;
		}
		if (got == 0)
			break;
		/* the file may grow while it is copied */
		if ((uint64_t)got > cap - done) {
			rc = lp_errf(err, -EFBIG, "'%.200s' exceeds the limit of %llu bytes%s%s",
			             name, (unsigned long long)cap,
			             cap == c->max_file_bytes ? " per file" : " left for the ",
			             cap == c->max_file_bytes ? "" : c->noun);
			goto out;
		}
		for (ssize_t w = 0; w < got;) {
			ssize_t k = write(out, buf + w, (size_t)(got - w));
			if (k < 0 && errno == EINTR)
				continue;
			if (k < 0) {
				rc = lp_errf(err, -errno, "cannot write '%s': %s", path,
				             strerror(errno));
				goto out;
			}
			w += k;
		}
		EVP_DigestUpdate(ctx, buf, (size_t)got);
		done += (uint64_t)got;
		on_progress(d, done);
	}
	if (fsync(out) < 0) {
		rc = lp_errf(err, -errno, "cannot write '%s': %s", path, strerror(errno));
		goto out;
	}
	EVP_DigestFinal_ex(ctx, md, &mdlen);
	for (unsigned int i = 0; i < 32; i++) {
		sha[2 * i] = digits[md[i] >> 4];
		sha[2 * i + 1] = digits[md[i] & 15];
	}
	sha[64] = '\0';
	d->bytes += done;
	d->progress_base += done;
	rc = record_file(d, name, done, sha, err);
out:
	if (out >= 0)
		close(out);
	EVP_MD_CTX_free(ctx);
	free(buf);
	close(in);
	return rc;
}

int src_get_memory(struct src_download *d, struct lp_http_get *g, struct lp_buf *body,
                   struct lp_http_result *res, struct lp_err *err)
{
	int rc;

	g->path = NULL;
	g->body = body;
	g->progress = NULL;
	rc = lp_http_get(&d->http, g, res, err);
	g->body = NULL;
	if (rc == -EFBIG)
		return lp_errf(err, -EFBIG, "response of '%s' exceeds %zu bytes", g->url,
		               body->max);
	return rc;
}

int src_http_error(struct src_download *d, long status, const char *detail, struct lp_err *err,
                   const char *what_fmt, ...)
{
	char what[256];
	va_list ap;
	int code = lp_http_status_errno(status);

	if (code == 0)
		code = -EIO; /* a 2xx that still failed: the caller's parse error */
	va_start(ap, what_fmt);
	vsnprintf(what, sizeof(what), what_fmt, ap);
	va_end(ap);
	d->http_status = (int)status;
	return lp_errf(err, code, "%s: %ld %.300s", what, status,
	               detail && detail[0] ? detail : "(no reason given)");
}
