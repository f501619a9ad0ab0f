/* Adapter sources: URIs, the download cache and single flight; see
 * source.h. The remote schemes live in source-s3.c, source-hf.c and
 * source-https.c, the download helpers in source-download.c. */
#include "agent/adapters/source.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>
#include <openssl/evp.h>

#include "agent/adapters/sigv4.h"
#include "agent/adapters/source-internal.h"
#include "common/credentials.h"
#include "common/file.h"

#define DEFAULT_MAX_FILE_BYTES  (8ULL << 30)
#define DEFAULT_MAX_TOTAL_BYTES (16ULL << 30)
#define DEFAULT_MAX_FILES       64
#define DEFAULT_MAX_CACHE_BYTES (32ULL << 30)
#define MODEL_MAX_FILE_BYTES    (256ULL << 30)
#define MODEL_MAX_TOTAL_BYTES   (1ULL << 40)
#define MODEL_MAX_FILES         4096
#define META_MAX_BYTES          (4u << 20)
/* A .tmp directory of a dead process is removed once it is this old, in
 * case the pid belongs to another namespace sharing the cache. */
#define STALE_TMP_SECONDS (60 * 60)

/* Weights files in the order their digest is reported. */
static const char *const weights_names[] = {
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.lora_weights.npy",
};

/* A download in progress for one URI; later callers wait on cond. */
struct src_inflight {
	struct src_inflight *next;
	char *uri;
	pthread_cond_t cond;
	bool done;
	int waiters;
	char pin[65];   /* the leader's pin, "" for none */
	uint64_t creds; /* the leader's credentials' fingerprint, 0 for none */
	int rc;
	struct lp_err err;
	struct lp_source_result res;
	char path[PATH_MAX];
};

const char *src_scheme_name(enum src_scheme s)
{
	switch (s) {
	case SRC_FILE:
		return "file";
	case SRC_S3:
		return "s3";
	case SRC_HF:
		return "hf";
	case SRC_HTTPS:
		return "https";
	}
	return "?";
}

/* ---- URIs ---- */

static bool repo_segment_ok(const char *s, size_t n)
{
	if (n == 0 || n > 96 || s[0] == '.' || s[0] == '-' || s[n - 1] == '.')
		return false;
	for (size_t i = 0; i < n; i++)
		if (!isalnum((unsigned char)s[i]) && s[i] != '-' && s[i] != '_' && s[i] != '.')
			return false;
	for (size_t i = 1; i < n; i++)
		if (s[i] == '.' && s[i - 1] == '.')
			return false;
	return true;
}

static int parse_hf(struct src_uri *u, const char *uri, const char *rest, struct lp_err *err)
{
	const char *at = strchr(rest, '@');
	size_t rn = at ? (size_t)(at - rest) : strlen(rest);
	const char *slash = memchr(rest, '/', rn);

	if (rn == 0)
		return lp_errf(err, -EINVAL, "source '%.200s' names no repository (hf://org/repo)",
		               uri);
	if (rn >= sizeof(u->repo))
		return lp_errf(err, -EINVAL, "repository name in '%.200s' is too long", uri);
	if (slash) {
		size_t a = (size_t)(slash - rest), b = rn - a - 1;
		if (!repo_segment_ok(rest, a) || memchr(slash + 1, '/', b) ||
		    !repo_segment_ok(slash + 1, b))
			goto out_bad_repo;
	} else if (!repo_segment_ok(rest, rn)) {
		goto out_bad_repo;
	}
	memcpy(u->repo, rest, rn);
	u->repo[rn] = '\0';
	if (!at) {
		memcpy(u->revision, "main", 5);
		return 0;
	}
	at++;
	if (!*at)
		return lp_errf(err, -EINVAL, "source '%.200s' has an empty revision after '@'",
		               uri);
	if (strlen(at) >= sizeof(u->revision))
		return lp_errf(err, -EINVAL, "revision in '%.200s' is too long", uri);
	for (const char *p = at; *p; p++)
		if (!isalnum((unsigned char)*p) && !strchr("-_./", *p))
			return lp_errf(err, -EINVAL,
			               "revision '%.200s' has a character not allowed "
			               "in a git reference",
			               at);
	if (strstr(at, "..") || at[0] == '/' || at[strlen(at) - 1] == '/')
		return lp_errf(err, -EINVAL, "revision '%.200s' is not a valid git reference", at);
	memcpy(u->revision, at, strlen(at) + 1);
	return 0;
out_bad_repo:
	return lp_errf(err, -EINVAL,
	               "'%.*s' is not a repository name (org/name of letters, "
	               "digits, '-', '_' and '.')",
	               (int)(rn > 200 ? 200 : rn), rest);
}

/* hf://org/repo[@rev][/path/file.gguf]: the revision is one path
 * segment, or three when it starts with refs/ (refs/pr/1); without a
 * revision the repository is org/name, so that a third segment starts the
 * file's path. */
static int parse_hf_model(struct src_uri *u, const char *uri, const char *rest, struct lp_err *err)
{
	char head[LP_SOURCE_URI_MAX];
	const char *at = strchr(rest, '@'), *end = NULL;
	size_t hn;
	int rc;

	if (at) {
		const char *p = at + 1;
		int segs = strncmp(p, "refs/", 5) == 0 ? 3 : 1;
		for (int i = 0; i < segs; i++) {
			const char *q = strchr(p, '/');
			if (!q)
				break;
			if (i == segs - 1)
				end = q;
			p = q + 1;
		}
	} else {
		const char *s1 = strchr(rest, '/');
		end = s1 ? strchr(s1 + 1, '/') : NULL;
	}
	hn = end ? (size_t)(end - rest) : strlen(rest);
	memcpy(head, rest, hn);
	head[hn] = '\0';
	if ((rc = parse_hf(u, uri, head, err)) < 0)
		return rc;
	if (!end)
		return 0;
	if (!src_name_ok(end + 1) || !src_is_gguf(end + 1))
		return lp_errf(err, -EINVAL,
		               "'%.200s' names neither a repository nor one .gguf file in it "
		               "(hf://org/repo[@revision][/path/file.gguf])",
		               uri);
	memcpy(u->file, end + 1, strlen(end + 1) + 1);
	return 0;
}

static int parse_s3(struct src_uri *u, const char *uri, const char *rest, struct lp_err *err)
{
	const char *slash = strchr(rest, '/');
	size_t bn = slash ? (size_t)(slash - rest) : strlen(rest);
	const char *prefix = slash ? slash + 1 : "";

	if (bn < 3 || bn > 63)
		return lp_errf(err, -EINVAL,
		               "source '%.200s' needs a bucket name of 3 to 63 "
		               "characters (s3://bucket/prefix)",
		               uri);
	for (size_t i = 0; i < bn; i++)
		if (!islower((unsigned char)rest[i]) && !isdigit((unsigned char)rest[i]) &&
		    rest[i] != '-' && rest[i] != '.')
			return lp_errf(err, -EINVAL,
			               "'%.*s' is not a bucket name (lower-case "
			               "letters, digits, '-' and '.')",
			               (int)bn, rest);
	if (strlen(prefix) >= sizeof(u->prefix))
		return lp_errf(err, -EINVAL, "prefix in '%.200s' is too long", uri);
	if (prefix[0] == '/')
		return lp_errf(err, -EINVAL, "prefix in '%.200s' starts with '/'", uri);
	memcpy(u->bucket, rest, bn);
	u->bucket[bn] = '\0';
	memcpy(u->prefix, prefix, strlen(prefix) + 1);
	return 0;
}

static int parse_https(struct src_uri *u, const char *uri, struct lp_err *err)
{
	CURLU *h = curl_url();
	char *host = NULL, *path = NULL, *part = NULL;
	int rc = 0;

	if (!h)
		return lp_errf(err, -ENOMEM, "out of memory");
	if (curl_url_set(h, CURLUPART_URL, uri, 0) != CURLUE_OK ||
	    curl_url_get(h, CURLUPART_HOST, &host, 0) != CURLUE_OK || !host[0]) {
		rc = lp_errf(err, -EINVAL, "source '%.200s' is not a valid https url", uri);
		goto out;
	}
	if (curl_url_get(h, CURLUPART_USER, &part, 0) == CURLUE_OK) {
		rc = lp_errf(err, -EINVAL, "source '%.200s' carries credentials in the url", uri);
		goto out;
	}
	if (curl_url_get(h, CURLUPART_QUERY, &part, 0) == CURLUE_OK ||
	    curl_url_get(h, CURLUPART_FRAGMENT, &part, 0) == CURLUE_OK) {
		rc = lp_errf(err, -EINVAL,
		             "source '%.200s' has a query or fragment; give the "
		             "directory or .nemo file url",
		             uri);
		goto out;
	}
	if (curl_url_get(h, CURLUPART_PATH, &path, 0) != CURLUE_OK) {
		rc = lp_errf(err, -EINVAL, "source '%.200s' is not a valid https url", uri);
		goto out;
	}
	memcpy(u->url, uri, strlen(uri) + 1);
	{
		size_t n = strlen(path);
		u->single_file = n > 5 && strcasecmp(path + n - 5, ".nemo") == 0;
		u->gguf = src_is_gguf(path);
	}
out:
	curl_free(part);
	curl_free(host);
	curl_free(path);
	curl_url_cleanup(h);
	return rc;
}

static int uri_parse(struct src_uri *u, const char *uri, bool model, bool allow_http,
                     struct lp_err *err)
{
	size_t n;

	memset(u, 0, sizeof(*u));
	if (!uri || !uri[0])
		return lp_errf(err, -EINVAL, "source uri is empty");
	n = strlen(uri);
	if (n >= LP_SOURCE_URI_MAX)
		return lp_errf(err, -EINVAL, "source uri is longer than %d bytes",
		               LP_SOURCE_URI_MAX - 1);
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)uri[i] < 0x20 || uri[i] == 0x7f)
			return lp_errf(err, -EINVAL, "source uri contains a control character");
	if (uri[0] == '/' || strncmp(uri, "file://", 7) == 0) {
		const char *p = uri[0] == '/' ? uri : uri + 7;
		u->scheme = SRC_FILE;
		if (p[0] != '/')
			return lp_errf(err, -EINVAL, "source '%.200s' is not file:///absolute/path",
			               uri);
		if (strlen(p) >= sizeof(u->path))
			return lp_errf(err, -EINVAL, "path in '%.200s' is too long", uri);
		memcpy(u->path, p, strlen(p) + 1);
		return 0;
	}
	if (strncmp(uri, "s3://", 5) == 0) {
		u->scheme = SRC_S3;
		return parse_s3(u, uri, uri + 5, err);
	}
	if (strncmp(uri, "hf://", 5) == 0) {
		u->scheme = SRC_HF;
		return model ? parse_hf_model(u, uri, uri + 5, err)
		             : parse_hf(u, uri, uri + 5, err);
	}
	if (strncmp(uri, "https://", 8) == 0) {
		u->scheme = SRC_HTTPS;
		return parse_https(u, uri, err);
	}
	if (strncmp(uri, "http://", 7) == 0 && model && allow_http) {
		u->scheme = SRC_HTTPS;
		return parse_https(u, uri, err);
	}
	if (strncmp(uri, "http://", 7) == 0 && model)
		return lp_errf(err, -EINVAL,
		               "source '%.200s' uses plain http; models are fetched over https "
		               "unless --allow-insecure-source-endpoints is given",
		               uri);
	if (strncmp(uri, "http://", 7) == 0)
		return lp_errf(err, -EINVAL,
		               "source '%.200s' uses plain http; adapters are fetched "
		               "over https only",
		               uri);
	if (strstr(uri, "://")) {
		size_t sn = (size_t)(strstr(uri, "://") - uri);
		return lp_errf(err, -EINVAL,
		               "unsupported source scheme '%.*s' (use file://, s3://, "
		               "hf:// or https://)",
		               (int)(sn > 32 ? 32 : sn), uri);
	}
	return lp_errf(err, -EINVAL, "source '%.200s' is neither a uri nor an absolute path", uri);
}

int src_uri_parse(struct src_uri *u, const char *uri, struct lp_err *err)
{
	return uri_parse(u, uri, false, false, err);
}

int src_uri_parse_model(struct src_uri *u, const char *uri, bool allow_http, struct lp_err *err)
{
	return uri_parse(u, uri, true, allow_http, err);
}

int lp_source_cache_name(const char *uri, char *out, size_t cap, struct lp_err *err)
{
	struct src_uri *u = malloc(sizeof(*u));
	char hex[65];
	int rc, n;

	if (!u)
		return lp_errf(err, -ENOMEM, "out of memory");
	rc = src_uri_parse(u, uri, err);
	if (rc == 0 && u->scheme == SRC_FILE)
		rc = lp_errf(err, -EINVAL, "file sources are not cached");
	if (rc == 0) {
		lp_sha256_hex(uri, strlen(uri), hex);
		n = snprintf(out, cap, "%s-%.32s", src_scheme_name(u->scheme), hex);
		if (n < 0 || (size_t)n >= cap)
			rc = lp_errf(err, -ENAMETOOLONG, "cache name does not fit");
	}
	free(u);
	return rc;
}

/* ---- files ---- */

/* snprintf into a path buffer; false when the result does not fit. */
static bool __attribute__((format(printf, 3, 4)))
path_fmt(char *out, size_t cap, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(out, cap, fmt, ap);
	va_end(ap);
	return n >= 0 && (size_t)n < cap;
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	remove(path);
	return 0;
}

static void rm_rf(const char *path)
{
	nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

/* mkdir -p dir: the last directory is made with last_mode, its parents
 * 0755. */
static int mkdir_p(const char *dir, mode_t last_mode, struct lp_err *err)
{
	char p[PATH_MAX];
	size_t n = strlen(dir);

	if (n == 0 || n >= sizeof(p))
		return lp_errf(err, -EINVAL, "cache directory '%.200s' is not a usable path", dir);
	memcpy(p, dir, n + 1);
	for (size_t i = 1; i <= n; i++) {
		if (p[i] != '/' && p[i] != '\0')
			continue;
		char c = p[i];
		p[i] = '\0';
		if (mkdir(p, c == '\0' ? last_mode : 0755) < 0 && errno != EEXIST) {
			int e = errno;
			return lp_errf(err, -e, "cannot create '%s': %s", p, strerror(e));
		}
		p[i] = c;
	}
	return 0;
}

static int fsync_path(const char *path)
{
	/* only paths the agent made itself; still never a link or a FIFO */
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
	int rc = 0;

	if (fd < 0)
		return -errno;
	if (fsync(fd) < 0)
		rc = -errno;
	close(fd);
	return rc;
}

/* Hex SHA-256 of a file (opened below root, NULL for none) into out[65]. */
static int hash_file(const char *root, const char *path, char *out, struct lp_err *err)
{
	static const char digits[] = "0123456789abcdef";
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;
	EVP_MD_CTX *ctx;
	char *buf;
	ssize_t n;
	int fd, rc = 0;

	fd = lp_file_open(root, path, NULL, err);
	if (fd < 0)
		return fd;
	buf = malloc(1 << 20);
	ctx = EVP_MD_CTX_new();
	if (!buf || !ctx || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1) {
		rc = lp_errf(err, -ENOMEM, "out of memory hashing '%s'", path);
		goto out;
	}
	while ((n = read(fd, buf, 1 << 20)) != 0) {
		if (n < 0) {
			if (errno == EINTR)
				continue;
			rc = lp_errf(err, -EIO, "cannot read '%s': %s", path, strerror(errno));
			goto out;
		}
		EVP_DigestUpdate(ctx, buf, (size_t)n);
	}
	EVP_DigestFinal_ex(ctx, md, &mdlen);
	for (unsigned int i = 0; i < 32; i++) {
		out[2 * i] = digits[md[i] >> 4];
		out[2 * i + 1] = digits[md[i] & 15];
	}
	out[64] = '\0';
out:
	EVP_MD_CTX_free(ctx);
	free(buf);
	close(fd);
	return rc;
}

static bool is_regular(const char *dir, const char *name)
{
	char p[PATH_MAX];
	struct stat st;
	int n = snprintf(p, sizeof(p), "%s/%s", dir, name);

	return n > 0 && (size_t)n < sizeof(p) && stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

static bool ends_with_nemo(const char *s)
{
	size_t n = strlen(s);
	return n > 5 && strcasecmp(s + n - 5, ".nemo") == 0;
}

static int copy_out(char *out, size_t cap, const char *a, const char *b, struct lp_err *err)
{
	int n = b && b[0] ? snprintf(out, cap, "%s/%s", a, b) : snprintf(out, cap, "%s", a);
	if (n < 0 || (size_t)n >= cap)
		return lp_errf(err, -ENAMETOOLONG,
		               "local path of the adapter does not fit in %zu "
		               "bytes",
		               cap);
	return 0;
}

static int check_pin(const char *pin, const char *sha, const char *uri, struct lp_err *err)
{
	if (!pin)
		return 0;
	if (!sha[0])
		return lp_errf(err, -EBADMSG,
		               "source '%.200s' has no weights file to check the "
		               "sha256 pin against",
		               uri);
	if (strcmp(pin, sha) != 0)
		return lp_errf(err, -EBADMSG,
		               "weights of '%.200s' have sha256 %s, not the pinned %s", uri, sha,
		               pin);
	return 0;
}

/* ---- file:// ---- */

/* Resolves "." and ".." of an absolute path without touching the disk. */
static void lexical_normalize(const char *in, char *out, size_t cap)
{
	size_t o = 0;
	const char *p = in;

	out[0] = '\0';
	while (*p) {
		const char *seg;
		size_t n;
		while (*p == '/')
			p++;
		seg = p;
		while (*p && *p != '/')
			p++;
		n = (size_t)(p - seg);
		if (n == 0 || (n == 1 && seg[0] == '.'))
			continue;
		if (n == 2 && seg[0] == '.' && seg[1] == '.') {
			while (o > 0 && out[o - 1] != '/')
				o--;
			if (o > 0)
				o--;
			out[o] = '\0';
			continue;
		}
		if (o + 1 + n + 1 > cap)
			break;
		out[o++] = '/';
		memcpy(out + o, seg, n);
		o += n;
		out[o] = '\0';
	}
	if (o == 0 && cap > 1) {
		out[0] = '/';
		out[1] = '\0';
	}
}

/* The allowed root that holds path, or NULL. */
static const char *root_of(const struct lp_source_cache *c, const char *path)
{
	for (int i = 0; i < c->n_roots; i++) {
		size_t n = strlen(c->roots[i]);
		if (strcmp(c->roots[i], "/") == 0)
			return c->roots[i];
		if (strncmp(path, c->roots[i], n) == 0 && (path[n] == '\0' || path[n] == '/'))
			return c->roots[i];
	}
	return NULL;
}

static bool below_root(const struct lp_source_cache *c, const char *path)
{
	return root_of(c, path) != NULL;
}

static int fetch_file(struct lp_source_cache *c, const struct src_uri *u, const char *uri,
                      const char *pin, bool from_api, char *out, size_t cap,
                      struct lp_source_result *res, struct lp_err *err)
{
	char real[PATH_MAX], lex[PATH_MAX], p[PATH_MAX];
	const char *weights = NULL, *res_root;
	struct stat st;
	int rc;

	if (from_api && c->n_roots == 0)
		return lp_errf(err, -EACCES,
		               "file sources through the API are disabled (no allowed "
		               "local roots are configured)");
	if (!realpath(u->path, real)) {
		int e = errno;
		lexical_normalize(u->path, lex, sizeof(lex));
		/* do not tell whether paths outside the roots exist */
		if (from_api && !below_root(c, lex))
			return lp_errf(err, -EACCES, "'%.200s' is outside the allowed local roots",
			               u->path);
		if (e == ENOENT || e == ENOTDIR)
			return lp_errf(err, -ENOENT, "'%.200s' does not exist", u->path);
		return lp_errf(err, e == EACCES ? -EACCES : -EIO, "cannot resolve '%.200s': %s",
		               u->path, strerror(e));
	}
	if (from_api && !below_root(c, real))
		return lp_errf(err, -EACCES, "'%.200s' is outside the allowed local roots%s",
		               u->path,
		               strcmp(real, u->path) ? " (after resolving '..' and links)" : "");
	res_root = from_api ? root_of(c, real) : NULL;
	if (stat(real, &st) < 0)
		return lp_errf(err, -ENOENT, "'%.200s' does not exist", u->path);
	if (S_ISREG(st.st_mode)) {
		weights = real;
		res->files = 1;
		res->bytes_total = (uint64_t)st.st_size;
	} else if (S_ISDIR(st.st_mode)) {
		DIR *d = opendir(real);
		struct dirent *e;
		if (!d)
			return lp_errf(err, errno == EACCES ? -EACCES : -EIO,
			               "cannot read '%.200s': %s", u->path, strerror(errno));
		while ((e = readdir(d))) {
			struct stat fs;
			int n = snprintf(p, sizeof(p), "%s/%s", real, e->d_name);
			/* a link leading out of the root counts for nothing: its
			 * size would tell what lies outside */
			if (n > 0 && (size_t)n < sizeof(p) && stat(p, &fs) == 0 &&
			    S_ISREG(fs.st_mode) && (!from_api || lp_file_below(res_root, p))) {
				res->files++;
				res->bytes_total += (uint64_t)fs.st_size;
			}
		}
		closedir(d);
		for (size_t i = 0; i < sizeof(weights_names) / sizeof(*weights_names); i++) {
			if (is_regular(real, weights_names[i])) {
				if (path_fmt(p, sizeof(p), "%s/%s", real, weights_names[i]))
					weights = p;
				break;
			}
		}
	} else {
		return lp_errf(err, -EINVAL, "'%.200s' is neither a directory nor a file", u->path);
	}
	if (weights &&
	    (rc = hash_file(from_api ? root_of(c, real) : NULL, weights, res->sha256, err)) < 0)
		return rc;
	if ((rc = check_pin(pin, res->sha256, uri, err)) < 0)
		return rc;
	if (from_api)
		snprintf(res->root, sizeof(res->root), "%s", root_of(c, real));
	return copy_out(out, cap, real, NULL, err);
}

/* ---- cache entries ---- */

/* Picks, among the downloaded names, what the local path points at
 * (rel: "" for the directory, or a .nemo file) and the weights file. */
static void pick_layout(const struct src_download *d, const char **rel, const char **weights)
{
	const char *nemo = NULL;
	int n_nemo = 0;
	bool dir_format = false;

	*rel = "";
	*weights = NULL;
	for (int i = 0; i < d->n_files; i++) {
		const char *n = d->files[i].name;
		if (strcmp(n, "adapter_config.json") == 0 ||
		    strcmp(n, "model.lora_config.npy") == 0)
			dir_format = true;
		if (!strchr(n, '/') && ends_with_nemo(n)) {
			nemo = n;
			n_nemo++;
		}
	}
	if (!dir_format && n_nemo == 1) {
		*rel = nemo;
		*weights = nemo;
		return;
	}
	for (size_t w = 0; w < sizeof(weights_names) / sizeof(*weights_names) && !*weights; w++)
		for (int i = 0; i < d->n_files; i++)
			if (strcmp(d->files[i].name, weights_names[w]) == 0)
				*weights = weights_names[w];
}

static int write_meta(const struct src_download *d, const char *rel, const char *weights,
                      const char *sha, struct lp_err *err)
{
	json_t *root = json_object(), *files = json_array();
	char path[PATH_MAX], *text = NULL;
	int fd = -1, rc = 0;

	if (!root || !files) {
		json_decref(files);
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	json_object_set_new(root, "version", json_integer(1));
	json_object_set_new(root, "uri", json_string(d->uri));
	json_object_set_new(root, "path", json_string(rel));
	json_object_set_new(root, "weights", weights ? json_string(weights) : json_null());
	json_object_set_new(root, "sha256", json_string(sha));
	for (int i = 0; i < d->n_files; i++)
		json_array_append_new(files, json_pack("{s:s, s:I, s:s}", "name", d->files[i].name,
		                                       "size", (json_int_t)d->files[i].size,
		                                       "sha256", d->files[i].sha256));
	json_object_set_new(root, "files", files);
	text = json_dumps(root, JSON_INDENT(1) | JSON_SORT_KEYS);
	if (!text) {
		rc = lp_errf(err, -ENOMEM, "cannot encode the cache metadata");
		goto out;
	}
	if (!path_fmt(path, sizeof(path), "%s/%s", d->dir, SRC_META_NAME)) {
		rc = lp_errf(err, -ENAMETOOLONG, "cache path is too long");
		goto out;
	}
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text) || fsync(fd) < 0) {
		int e = errno;
		rc = lp_errf(err, -e, "cannot write '%s': %s", path, strerror(e));
	}
out:
	if (fd >= 0)
		close(fd);
	free(text);
	json_decref(root);
	return rc;
}

static bool is_hex64(const char *s)
{
	return s && strlen(s) == 64 && strspn(s, "0123456789abcdef") == 64;
}

/* Uses the complete entry at dir when it is for uri, its files are all
 * there, regular, with the sizes and sha256 digests its metadata records
 * (the weights' too), and (with a pin) its weights hash to the pin.
 * Returns 1 when used, 0 when the entry must be (re)downloaded (*intact
 * says whether it is whole and only another pin's). Every byte is hashed:
 * an entry changed behind the agent's back (another user, a disk error) is
 * never served. */
static int entry_use(const char *dir, const char *uri, const char *pin, char *out, size_t cap,
                     struct lp_source_result *res, bool *intact, struct lp_err *err)
{
	char path[PATH_MAX], sha[65];
	struct lp_buf text;
	json_t *root = NULL, *files, *f;
	const char *rel, *weights, *msha, *muri;
	bool weights_seen = false;
	size_t i;
	int used = 0;

	lp_buf_init(&text, META_MAX_BYTES);
	if (!path_fmt(path, sizeof(path), "%s/%s", dir, SRC_META_NAME) || access(dir, F_OK) < 0 ||
	    lp_buf_read_file_in(&text, dir, path, META_MAX_BYTES, NULL) < 0)
		goto out;
	root = json_loadb(text.data, text.len, JSON_REJECT_DUPLICATES, NULL);
	muri = json_string_value(json_object_get(root, "uri"));
	rel = json_string_value(json_object_get(root, "path"));
	weights = json_string_value(json_object_get(root, "weights"));
	msha = json_string_value(json_object_get(root, "sha256"));
	files = json_object_get(root, "files");
	if (!muri || strcmp(muri, uri) != 0 || !rel || !msha || (msha[0] && !is_hex64(msha)) ||
	    !json_is_array(files) || json_array_size(files) == 0)
		goto out;
	if ((rel[0] && !src_name_ok(rel)) || (weights && !src_name_ok(weights)))
		goto out;
	json_array_foreach(files, i, f)
	{
		const char *name = json_string_value(json_object_get(f, "name"));
		const char *fsha = json_string_value(json_object_get(f, "sha256"));
		json_t *size = json_object_get(f, "size");
		struct stat st;
		if (!name || !src_name_ok(name) || !json_is_integer(size) || !is_hex64(fsha))
			goto out;
		if (!path_fmt(path, sizeof(path), "%s/%s", dir, name) || lstat(path, &st) < 0 ||
		    !S_ISREG(st.st_mode) || (json_int_t)st.st_size != json_integer_value(size))
			goto out;
		if (hash_file(dir, path, sha, NULL) < 0 || strcmp(sha, fsha) != 0)
			goto out;
		if (weights && strcmp(name, weights) == 0) {
			if (strcmp(sha, msha) != 0)
				goto out;
			weights_seen = true;
		}
	}
	if (weights ? !weights_seen : msha[0] != '\0')
		goto out;
	/* a pin is checked against the bytes on disk, hashed above */
	if (pin && (!weights || strcmp(msha, pin) != 0)) {
		*intact = true;
		goto out;
	}
	if (copy_out(out, cap, dir, rel, err) < 0) {
		used = err ? err->code : -ENAMETOOLONG;
		goto out;
	}
	memcpy(res->sha256, msha, strlen(msha) + 1);
	res->files = (int)json_array_size(files);
	json_array_foreach(files, i, f)
	{
		res->bytes_total += (uint64_t)json_integer_value(json_object_get(f, "size"));
	}
	res->from_cache = true;
	used = 1;
out:
	json_decref(root);
	lp_buf_release(&text);
	return used;
}

/* Moves the finished tmp directory to final, replacing an older entry. */
static int entry_install(struct lp_source_cache *c, const char *tmp, const char *final,
                         struct lp_err *err)
{
	char old[PATH_MAX];
	unsigned long n;
	int e;

	if (rename(tmp, final) == 0)
		goto out_ok;
	if (errno != ENOTEMPTY && errno != EEXIST)
		goto out_fail;
	/* an older entry is there (a pin did not match it, or another
	 * process finished first): swap atomically, then drop the old one */
	if (renameat2(AT_FDCWD, tmp, AT_FDCWD, final, RENAME_EXCHANGE) == 0) {
		rm_rf(tmp);
		goto out_ok;
	}
	if (errno != EINVAL && errno != ENOSYS)
		goto out_fail;
	pthread_mutex_lock(&c->lock);
	n = c->tmp_counter++;
	pthread_mutex_unlock(&c->lock);
	if (!path_fmt(old, sizeof(old), "%s.old.%ld.%lu", final, (long)getpid(), n)) {
		errno = ENAMETOOLONG;
		goto out_fail;
	}
	if (rename(final, old) < 0 || rename(tmp, final) < 0)
		goto out_fail;
	rm_rf(old);
out_ok:
	fsync_path(c->dir);
	return 0;
out_fail:
	e = errno;
	return lp_errf(err, -EIO, "cannot move the download into '%s': %s", final, strerror(e));
}

/* ---- holds, LRU and the budget ---- */

uint64_t src_adapter_limit(const struct lp_source_cache *c, bool *is_cache_budget)
{
	*is_cache_budget = c->max_cache_bytes < c->max_total_bytes;
	return *is_cache_budget ? c->max_cache_bytes : c->max_total_bytes;
}

/* The record of entry name; created when create is set (NULL when out of
 * memory or absent). Called with c->lock held. */
static struct src_entry *entry_rec(struct lp_source_cache *c, const char *name, bool create)
{
	struct src_entry *grown;

	for (int i = 0; i < c->n_entries; i++)
		if (strcmp(c->entries[i].name, name) == 0)
			return &c->entries[i];
	if (!create || strlen(name) >= sizeof(c->entries[0].name))
		return NULL;
	grown = realloc(c->entries, (size_t)(c->n_entries + 1) * sizeof(*c->entries));
	if (!grown)
		return NULL;
	c->entries = grown;
	memset(&grown[c->n_entries], 0, sizeof(*grown));
	memcpy(grown[c->n_entries].name, name, strlen(name) + 1);
	return &grown[c->n_entries++];
}

/* Marks entry name used now and, with hold, held by one more fetch. */
static int entry_touch(struct lp_source_cache *c, const char *name, bool hold, struct lp_err *err)
{
	struct src_entry *e;

	pthread_mutex_lock(&c->lock);
	e = entry_rec(c, name, true);
	if (e) {
		e->last_use = ++c->use_clock;
		if (hold) {
			e->holds++;
			e->gen++;
		}
	}
	pthread_mutex_unlock(&c->lock);
	return e ? 0 : lp_errf(err, -ENOMEM, "out of memory");
}

static void entry_unhold(struct lp_source_cache *c, const char *name)
{
	struct src_entry *e;

	pthread_mutex_lock(&c->lock);
	e = entry_rec(c, name, false);
	if (e && e->holds > 0)
		e->holds--;
	pthread_mutex_unlock(&c->lock);
}

/* Moves the directory at path aside and removes it (readers that opened
 * its files keep them). */
static int remove_dir(struct lp_source_cache *c, const char *path, struct lp_err *err)
{
	char gone[PATH_MAX];
	unsigned long n;

	pthread_mutex_lock(&c->lock);
	n = c->tmp_counter++;
	pthread_mutex_unlock(&c->lock);
	if (!path_fmt(gone, sizeof(gone), "%s.old.%ld.%lu", path, (long)getpid(), n))
		return lp_errf(err, -ENAMETOOLONG, "cache directory path is too long");
	if (rename(path, gone) < 0) {
		int e = errno;
		if (e == ENOENT)
			return 0;
		return lp_errf(err, -EIO, "cannot remove cache entry '%s': %s", path, strerror(e));
	}
	rm_rf(gone);
	return 0;
}

/* Removes entry name unless a fetch holds it or a loaded adapter uses it;
 * true when it is gone. */
static bool entry_drop_unused(struct lp_source_cache *c, const char *name)
{
	char path[PATH_MAX], gone[PATH_MAX];
	struct src_entry *e;
	uint64_t gen = 0;
	bool ok = false;

	pthread_mutex_lock(&c->lock);
	e = entry_rec(c, name, false);
	if (e)
		gen = e->gen;
	pthread_mutex_unlock(&c->lock);
	if (c->in_use && c->in_use(c->in_use_arg, name))
		return false;
	if (!path_fmt(path, sizeof(path), "%s/%s", c->dir, name))
		return false;
	pthread_mutex_lock(&c->lock);
	e = entry_rec(c, name, false);
	/* no hold now and none taken since in_use() answered */
	if (!e || (e->holds == 0 && e->gen == gen)) {
		ok = path_fmt(gone, sizeof(gone), "%s.old.%ld.%lu", path, (long)getpid(),
		              c->tmp_counter++) &&
		     rename(path, gone) == 0;
		if (e && ok)
			e->last_use = 0;
	}
	pthread_mutex_unlock(&c->lock);
	if (ok)
		rm_rf(gone);
	return ok;
}

static bool is_entry_name(const char *n)
{
	const char *dash = strchr(n, '-');

	if (!dash || strlen(dash + 1) != 32 || strspn(dash + 1, "0123456789abcdef") != 32)
		return false;
	return !strncmp(n, "s3-", 3) || !strncmp(n, "hf-", 3) || !strncmp(n, "https-", 6);
}

static uint64_t du_total;

static int du_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)path;
	(void)ftw;
	if (flag == FTW_F && S_ISREG(st->st_mode))
		du_total += (uint64_t)st->st_size;
	return 0;
}

/* Bytes of the regular files below path. Called with budget_lock held
 * (du_total is shared). */
static uint64_t dir_bytes(const char *path)
{
	du_total = 0;
	nftw(path, du_one, 16, FTW_PHYS);
	return du_total;
}

struct lru_item {
	char name[64];
	uint64_t bytes;
	uint64_t last_use; /* this process's use counter, 0: none */
	time_t mtime;      /* before any use by this process */
};

static int lru_cmp(const void *pa, const void *pb)
{
	const struct lru_item *a = pa, *b = pb;

	if (a->last_use != b->last_use)
		return a->last_use < b->last_use ? -1 : 1;
	if (a->mtime != b->mtime)
		return a->mtime < b->mtime ? -1 : 1;
	return strcmp(a->name, b->name);
}

/* Makes room for an entry of need bytes replacing entry keep: evicts the
 * least recently used entries that nothing uses until the complete
 * entries fit in max_cache_bytes. Called with budget_lock held. -ENOSPC
 * when they cannot. */
static int make_room(struct lp_source_cache *c, const char *keep, uint64_t need, const char *uri,
                     struct lp_err *err)
{
	struct lru_item *items = NULL, *grown;
	uint64_t used = 0;
	int n = 0, rc = 0;
	struct dirent *de;
	DIR *d;

	if (need > c->max_cache_bytes)
		return lp_errf(err, -ENOSPC,
		               "'%.200s' is %llu bytes, more than the adapter cache's budget of "
		               "%llu bytes",
		               uri, (unsigned long long)need,
		               (unsigned long long)c->max_cache_bytes);
	if (!(d = opendir(c->dir)))
		return lp_errf(err, -EIO, "cannot read the cache directory '%s': %s", c->dir,
		               strerror(errno));
	while ((de = readdir(d))) {
		char path[PATH_MAX];
		struct stat st;
		if (!is_entry_name(de->d_name) || strcmp(de->d_name, keep) == 0 ||
		    !path_fmt(path, sizeof(path), "%s/%s", c->dir, de->d_name) ||
		    lstat(path, &st) < 0 || !S_ISDIR(st.st_mode))
			continue;
		if (!(grown = realloc(items, (size_t)(n + 1) * sizeof(*items)))) {
			rc = lp_errf(err, -ENOMEM, "out of memory");
			goto out;
		}
		items = grown;
		memset(&items[n], 0, sizeof(*items));
		memcpy(items[n].name, de->d_name, strlen(de->d_name) + 1);
		items[n].bytes = dir_bytes(path);
		items[n].mtime = st.st_mtime;
		used += items[n].bytes;
		n++;
	}
	pthread_mutex_lock(&c->lock);
	for (int i = 0; i < n; i++) {
		struct src_entry *e = entry_rec(c, items[i].name, false);
		items[i].last_use = e ? e->last_use : 0;
	}
	pthread_mutex_unlock(&c->lock);
	if (n > 1)
		qsort(items, (size_t)n, sizeof(*items), lru_cmp);
	for (int i = 0; i < n && used + need > c->max_cache_bytes; i++)
		if (entry_drop_unused(c, items[i].name))
			used -= items[i].bytes;
	if (used + need > c->max_cache_bytes)
		rc =
		    lp_errf(err, -ENOSPC,
		            "no room for '%.200s' (%llu bytes) in the adapter cache: its budget is "
		            "%llu bytes and %llu are in entries that loaded adapters or running "
		            "downloads use",
		            uri, (unsigned long long)need, (unsigned long long)c->max_cache_bytes,
		            (unsigned long long)used);
out:
	closedir(d);
	free(items);
	return rc;
}

/* The work of the one caller that downloads uri. */
static int fetch_remote(struct lp_source_cache *c, const struct src_env *env,
                        const struct src_uri *u, const char *uri, const char *pin, char *out,
                        size_t cap, struct lp_source_result *res, struct lp_err *err)
{
	struct src_download d;
	char name[64], final[PATH_MAX], tmp[PATH_MAX];
	const char *rel, *weights, *ca;
	bool intact = false;
	unsigned long n;
	int rc;

	if ((rc = lp_source_cache_name(uri, name, sizeof(name), err)) < 0)
		return rc;
	if (!path_fmt(final, sizeof(final), "%s/%s", c->dir, name) || strlen(final) > PATH_MAX - 64)
		return lp_errf(err, -ENAMETOOLONG, "cache directory path is too long");
	rc = entry_use(final, uri, pin, out, cap, res, &intact, err);
	if (rc > 0)
		utimensat(AT_FDCWD, final, NULL, 0); /* LRU order across restarts */
	if (rc != 0)
		return rc < 0 ? rc : 0;
	/* a damaged entry is never served: drop it now (one only another pin's
	 * stays until a download replaces it) */
	if (!intact && access(final, F_OK) == 0 && (rc = remove_dir(c, final, err)) < 0)
		return rc;

	pthread_mutex_lock(&c->lock);
	n = c->tmp_counter++;
	pthread_mutex_unlock(&c->lock);
	if (!path_fmt(tmp, sizeof(tmp), "%s.tmp.%ld.%lu", final, (long)getpid(), n))
		return lp_errf(err, -ENAMETOOLONG, "cache directory path is too long");
	if (mkdir(tmp, 0755) < 0) {
		int e = errno;
		return lp_errf(err, -EIO, "cannot create '%s': %s", tmp, strerror(e));
	}
	memset(&d, 0, sizeof(d));
	d.cache = c;
	d.env = env;
	d.u = u;
	d.uri = uri;
	d.dir = tmp;
	clock_gettime(CLOCK_MONOTONIC, &d.last_progress);
	ca = env->curl_ca_bundle;
	if (u->scheme == SRC_S3 && env->aws_ca_bundle)
		ca = env->aws_ca_bundle;
	if ((rc = src_download_init(&d, ca, err)) < 0)
		goto out;
	switch (u->scheme) {
	case SRC_S3:
		rc = src_s3_fetch(&d, err);
		break;
	case SRC_HF:
		rc = src_hf_fetch(&d, err);
		break;
	case SRC_HTTPS:
		rc = src_https_fetch(&d, err);
		break;
	case SRC_FILE:
		rc = lp_errf(err, -EINVAL, "file sources are not downloaded");
		break;
	}
	if (rc < 0)
		goto out;
	if (d.n_files == 0) {
		rc = lp_errf(err, -ENOENT, "source '%.200s' has no files", uri);
		goto out;
	}
	pick_layout(&d, &rel, &weights);
	for (int i = 0; weights && i < d.n_files; i++)
		if (strcmp(d.files[i].name, weights) == 0)
			memcpy(res->sha256, d.files[i].sha256, sizeof(res->sha256));
	if ((rc = check_pin(pin, res->sha256, uri, err)) < 0)
		goto out;
	if ((rc = write_meta(&d, rel, weights, res->sha256, err)) < 0)
		goto out;
	fsync_path(tmp);
	pthread_mutex_lock(&c->budget_lock);
	rc = make_room(c, name, dir_bytes(tmp), uri, err);
	if (rc == 0)
		rc = entry_install(c, tmp, final, err);
	pthread_mutex_unlock(&c->budget_lock);
	if (rc < 0)
		goto out;
	src_progress_final(&d);
	res->bytes_downloaded = d.bytes;
	res->bytes_total = d.bytes;
	res->files = d.n_files;
	rc = copy_out(out, cap, final, rel, err);
out:
	if (rc < 0) {
		res->http_status = d.http_status;
		res->sha256[0] = '\0';
	}
	rm_rf(tmp); /* gone already after a plain rename */
	src_download_release(&d);
	return rc;
}

static struct src_inflight *inflight_find(struct lp_source_cache *c, const char *uri)
{
	for (struct src_inflight *f = c->inflight; f; f = f->next)
		if (strcmp(f->uri, uri) == 0)
			return f;
	return NULL;
}

static void inflight_free(struct src_inflight *f)
{
	pthread_cond_destroy(&f->cond);
	free(f->uri);
	free(f);
}

/* Single flight: the first caller for uri downloads; callers arriving
 * meanwhile wait and take its outcome. creds: a fingerprint of the
 * caller's own credentials (0: the environment's). */
static int fetch_shared(struct lp_source_cache *c, const struct src_env *env, uint64_t creds,
                        const struct src_uri *u, const char *uri, const char *pin, char *out,
                        size_t cap, struct lp_source_result *res, struct lp_err *err)
{
	struct src_inflight *f;
	int rc;

	pthread_mutex_lock(&c->lock);
	for (;;) {
		char leader_pin[65], path[PATH_MAX];
		uint64_t leader_creds;
		f = inflight_find(c, uri);
		if (!f)
			break;
		f->waiters++;
		while (!f->done)
			pthread_cond_wait(&f->cond, &c->lock);
		rc = f->rc;
		*res = f->res;
		if (err)
			*err = f->err;
		memcpy(leader_pin, f->pin, sizeof(leader_pin));
		memcpy(path, f->path, sizeof(path));
		leader_creds = f->creds;
		if (--f->waiters == 0)
			inflight_free(f);
		/* a download rejected only for the leader's pin is retried
		 * for a caller with another pin */
		if (rc == -EBADMSG && strcmp(leader_pin, pin ? pin : "") != 0)
			continue;
		/* and one refused, or that found nothing, for the leader's
		 * credentials for a caller with others */
		if ((rc == -EACCES || rc == -ENOENT) && leader_creds != creds)
			continue;
		pthread_mutex_unlock(&c->lock);
		res->bytes_downloaded = 0;
		res->joined = true;
		if (rc < 0)
			return rc;
		if ((rc = check_pin(pin, res->sha256, uri, err)) < 0)
			return rc;
		return copy_out(out, cap, path, NULL, err);
	}
	f = calloc(1, sizeof(*f));
	if (!f || !(f->uri = strdup(uri)) || pthread_cond_init(&f->cond, NULL) != 0) {
		pthread_mutex_unlock(&c->lock);
		if (f)
			free(f->uri);
		free(f);
		return lp_errf(err, -ENOMEM, "out of memory");
	}
	if (pin)
		memcpy(f->pin, pin, 65);
	f->creds = creds;
	f->next = c->inflight;
	c->inflight = f;
	pthread_mutex_unlock(&c->lock);

	rc = fetch_remote(c, env, u, uri, pin, f->path, sizeof(f->path), res, err);

	pthread_mutex_lock(&c->lock);
	for (struct src_inflight **pp = &c->inflight; *pp; pp = &(*pp)->next)
		if (*pp == f) {
			*pp = f->next;
			break;
		}
	f->done = true;
	f->rc = rc;
	f->res = *res;
	if (rc < 0 && err)
		f->err = *err;
	else
		lp_err_clear(&f->err);
	pthread_cond_broadcast(&f->cond);
	if (rc == 0)
		rc = copy_out(out, cap, f->path, NULL, err);
	if (f->waiters == 0)
		inflight_free(f);
	pthread_mutex_unlock(&c->lock);
	return rc;
}

static int env_with(struct src_env *e, const struct src_env *base,
                    const struct lp_source_credentials *cr, bool allow_http, struct lp_err *err);
static void env_release(struct src_env *e);

/* The fields of c, in the order of lp_credential_keys. */
static void cred_fields(struct lp_source_credentials *c, const char **f[LP_N_CREDENTIAL_KEYS])
{
	f[0] = &c->aws_access_key_id;
	f[1] = &c->aws_secret_access_key;
	f[2] = &c->aws_session_token;
	f[3] = &c->aws_region;
	f[4] = &c->aws_endpoint_url;
	f[5] = &c->hf_token;
	f[6] = &c->hf_endpoint;
}

int lp_source_credentials_set(struct lp_source_credentials *c, const char *key, const char *value)
{
	const char **f[LP_N_CREDENTIAL_KEYS];

	cred_fields(c, f);
	for (int i = 0; i < LP_N_CREDENTIAL_KEYS; i++)
		if (strcmp(lp_credential_keys[i], key) == 0) {
			*f[i] = value;
			return 0;
		}
	return -EINVAL;
}

/* FNV-1a over the credentials' fields, never 0 (0: none given). */
static uint64_t creds_fingerprint(const struct lp_source_credentials *cr)
{
	struct lp_source_credentials c = *cr;
	const char **f[LP_N_CREDENTIAL_KEYS];
	uint64_t h = 0xcbf29ce484222325ull;

	cred_fields(&c, f);
	for (int i = 0; i < LP_N_CREDENTIAL_KEYS; i++) {
		for (const char *p = *f[i] ? *f[i] : ""; *p; p++)
			h = (h ^ (unsigned char)*p) * 0x100000001b3ull;
		h = (h ^ (*f[i] ? 0xff : 0xfe)) * 0x100000001b3ull;
	}
	return h ? h : 1;
}

/* Lower-cases a sha256 pin (NULL: none) into pin; *pinp is pin or NULL. */
static int pin_parse(const char *in, char pin[65], const char **pinp, struct lp_err *err)
{
	*pinp = NULL;
	if (!in)
		return 0;
	if (strlen(in) != 64 || strspn(in, "0123456789abcdefABCDEF") != 64)
		return lp_errf(err, -EINVAL, "sha256 pin must be 64 hex characters");
	for (size_t i = 0; i < 64; i++)
		pin[i] = (char)tolower((unsigned char)in[i]);
	pin[64] = '\0';
	*pinp = pin;
	return 0;
}

int lp_source_fetch(struct lp_source_cache *c, const char *uri, const char *sha256_or_null,
                    bool from_api, const struct lp_source_credentials *creds, char *local_path,
                    size_t cap, struct lp_source_result *res, struct lp_err *err)
{
	struct lp_source_result scratch;
	struct src_uri *u;
	struct src_env own = {0};
	char pin[65], name[64];
	const char *pinp = NULL;
	int rc;

	if (!res)
		res = &scratch;
	memset(res, 0, sizeof(*res));
	if (cap > 0)
		local_path[0] = '\0';
	if (c->model)
		return lp_errf(err, -EINVAL,
		               "a model-mode source fetches with lp_source_fetch_model");
	if ((rc = pin_parse(sha256_or_null, pin, &pinp, err)) < 0)
		return rc;
	u = malloc(sizeof(*u));
	if (!u)
		return lp_errf(err, -ENOMEM, "out of memory");
	if ((rc = src_uri_parse(u, uri, err)) < 0)
		goto out;
	if (u->scheme == SRC_FILE) {
		rc = fetch_file(c, u, uri, pinp, from_api, local_path, cap, res, err);
		goto out;
	}
	if (creds && (rc = env_with(&own, &c->env, creds, c->allow_insecure_endpoints, err)) < 0)
		goto out;
	/* held from here, so that no eviction removes it under this fetch */
	if ((rc = lp_source_cache_name(uri, name, sizeof(name), err)) < 0 ||
	    (rc = entry_touch(c, name, true, err)) < 0)
		goto out;
	if (!creds)
		rc = fetch_shared(c, &c->env, 0, u, uri, pinp, local_path, cap, res, err);
	else
		rc = fetch_shared(c, &own, creds_fingerprint(creds), u, uri, pinp, local_path, cap,
		                  res, err);
	if (rc < 0) {
		entry_unhold(c, name);
		goto out;
	}
	res->held = true;
	snprintf(res->root, sizeof(res->root), "%s", c->dir);
out:
	env_release(&own);
	free(u);
	if (rc < 0 && cap > 0)
		local_path[0] = '\0';
	return rc;
}

/* ---- model mode: one download into a directory of the caller's ---- */

/* A destination directory split into its parent and last name. */
struct model_dest {
	char path[PATH_MAX];   /* as given, without trailing slashes */
	char parent[PATH_MAX]; /* "." when path has no slash */
	char base[256];
};

static int dest_split(struct model_dest *md, const char *dest, struct lp_err *err)
{
	size_t n = dest ? strlen(dest) : 0;
	const char *slash, *base;

	while (n > 1 && dest[n - 1] == '/')
		n--;
	if (n == 0 || n >= sizeof(md->path) - 300)
		return lp_errf(err, -EINVAL, "destination '%.200s' is not a usable path",
		               dest ? dest : "");
	memcpy(md->path, dest, n);
	md->path[n] = '\0';
	slash = strrchr(md->path, '/');
	base = slash ? slash + 1 : md->path;
	if (!base[0] || strcmp(base, ".") == 0 || strcmp(base, "..") == 0 || strlen(base) > 200)
		return lp_errf(err, -EINVAL,
		               "destination '%.200s' must end in a directory name of at most 200 "
		               "bytes (like /models/base)",
		               dest);
	memcpy(md->base, base, strlen(base) + 1);
	if (!slash)
		memcpy(md->parent, ".", 2);
	else if (slash == md->path)
		memcpy(md->parent, "/", 2);
	else {
		memcpy(md->parent, md->path, (size_t)(slash - md->path));
		md->parent[slash - md->path] = '\0';
	}
	return 0;
}

/* The parent as the start of "<parent>/<name>": "" for the root. */
static const char *dest_parent(const struct model_dest *md)
{
	return strcmp(md->parent, "/") == 0 ? "" : md->parent;
}

/* Opens and locks <parent>/.<base>.lock (flock, waiting for another
 * fetch into the same destination to finish). Returns the descriptor;
 * *locked is false where the file system has no locks. */
static int dest_lock(const struct model_dest *md, bool *locked, struct lp_err *err)
{
	char path[PATH_MAX];
	int fd;

	*locked = false;
	if (!path_fmt(path, sizeof(path), "%s/.%s.lock", dest_parent(md), md->base))
		return lp_errf(err, -ENAMETOOLONG, "destination path is too long");
	fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
	if (fd < 0) {
		int e = errno;
		return lp_errf(err, -e, "cannot create the lock file '%s': %s", path, strerror(e));
	}
	while (flock(fd, LOCK_EX) < 0) {
		int e = errno;
		if (e == EINTR)
			continue;
		if (e == ENOLCK || e == EOPNOTSUPP || e == ENOSYS)
			return fd; /* no locks here: nothing is swept either */
		close(fd);
		return lp_errf(err, -e, "cannot lock '%s': %s", path, strerror(e));
	}
	*locked = true;
	return fd;
}

/* Removes the .<base>.tmp.* and .<base>.old.* directories beside the
 * destination: with its lock held, they are what killed fetches left. */
static void dest_sweep(const struct model_dest *md)
{
	char tmp[300], old[300], path[PATH_MAX];
	DIR *d = opendir(md->parent);
	struct dirent *e;
	struct stat st;

	if (!d)
		return;
	snprintf(tmp, sizeof(tmp), ".%s.tmp.", md->base);
	snprintf(old, sizeof(old), ".%s.old.", md->base);
	while ((e = readdir(d))) {
		if (strncmp(e->d_name, tmp, strlen(tmp)) != 0 &&
		    strncmp(e->d_name, old, strlen(old)) != 0)
			continue;
		if (path_fmt(path, sizeof(path), "%s/%s", dest_parent(md), e->d_name) &&
		    lstat(path, &st) == 0 && S_ISDIR(st.st_mode))
			rm_rf(path);
	}
	closedir(d);
}

/* The destination may be replaced when it is absent, an empty directory or
 * one an earlier fetch wrote (it holds the metadata file); it must not be
 * a mount point, which cannot be renamed. */
static int dest_check(const struct model_dest *md, struct lp_err *err)
{
	struct stat st, pst;
	struct dirent *e;
	bool meta = false;
	int others = 0;
	DIR *d;

	if (lstat(md->path, &st) < 0) {
		int e = errno;
		if (e == ENOENT)
			return 0;
		return lp_errf(err, -e, "cannot stat '%s': %s", md->path, strerror(e));
	}
	if (S_ISLNK(st.st_mode))
		return lp_errf(err, -EINVAL,
		               "destination '%s' is a symbolic link; give the directory itself",
		               md->path);
	if (!S_ISDIR(st.st_mode))
		return lp_errf(err, -ENOTDIR, "destination '%s' is not a directory", md->path);
	if (stat(md->parent, &pst) == 0 && pst.st_dev != st.st_dev)
		return lp_errf(err, -EBUSY,
		               "destination '%s' is a mount point, which cannot be replaced whole; "
		               "give a directory inside the volume (like %s/model)",
		               md->path, md->path);
	if (!(d = opendir(md->path))) {
		int e = errno;
		return lp_errf(err, -e, "cannot read '%s': %s", md->path, strerror(e));
	}
	while ((e = readdir(d))) {
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
			continue;
		if (strcmp(e->d_name, SRC_META_NAME) == 0)
			meta = true;
		else
			others++;
	}
	closedir(d);
	if (others > 0 && !meta)
		return lp_errf(err, -EEXIST,
		               "destination '%s' holds files that no fetch wrote (no %s); empty "
		               "it or choose another directory",
		               md->path, SRC_META_NAME);
	return 0;
}

/* Moves the finished tmp directory to the destination, replacing an
 * earlier one whole. */
static int dest_install(struct lp_source_cache *c, const struct model_dest *md, const char *tmp,
                        struct lp_err *err)
{
	char old[PATH_MAX];
	unsigned long n;
	int e;

	if (rename(tmp, md->path) == 0)
		goto out_ok;
	if (errno != ENOTEMPTY && errno != EEXIST)
		goto out_fail;
	if (renameat2(AT_FDCWD, tmp, AT_FDCWD, md->path, RENAME_EXCHANGE) == 0) {
		rm_rf(tmp); /* the earlier model */
		goto out_ok;
	}
	if (errno != EINVAL && errno != ENOSYS)
		goto out_fail;
	pthread_mutex_lock(&c->lock);
	n = c->tmp_counter++;
	pthread_mutex_unlock(&c->lock);
	if (!path_fmt(old, sizeof(old), "%s/.%s.old.%ld.%lu", dest_parent(md), md->base,
	              (long)getpid(), n)) {
		errno = ENAMETOOLONG;
		goto out_fail;
	}
	if (rename(md->path, old) < 0)
		goto out_fail;
	if (rename(tmp, md->path) < 0) {
		e = errno;
		rename(old, md->path); /* put the earlier model back */
		errno = e;
		goto out_fail;
	}
	rm_rf(old);
out_ok:
	fsync_path(md->parent);
	return 0;
out_fail:
	e = errno;
	return lp_errf(err, -EIO, "cannot move the download into '%s': %s", md->path, strerror(e));
}

/* Whether the URI's form names one file (a .gguf): only then is a sha256
 * pin meaningful. */
static bool uri_names_gguf(const struct src_uri *u)
{
	switch (u->scheme) {
	case SRC_FILE:
		return src_is_gguf(u->path);
	case SRC_S3:
		return src_is_gguf(u->prefix);
	case SRC_HF:
		return u->file[0] != '\0';
	case SRC_HTTPS:
		return u->gguf;
	}
	return false;
}

/* The single .gguf file a download consists of, or NULL for a directory
 * model. */
static const char *model_single_file(const struct src_download *d)
{
	if (d->n_files == 1 && !strchr(d->files[0].name, '/') && src_is_gguf(d->files[0].name))
		return d->files[0].name;
	return NULL;
}

int lp_source_fetch_model(struct lp_source_cache *c, const char *uri, const char *sha256_or_null,
                          const char *dest, char *local_path, size_t cap,
                          struct lp_source_result *res, struct lp_err *err)
{
	struct lp_source_result scratch;
	struct model_dest *md = NULL;
	struct src_uri *u = NULL;
	struct src_download d;
	char pin[65], tmp[PATH_MAX] = "";
	const char *pinp, *single = NULL, *ca;
	bool locked, intact = false;
	unsigned long n;
	int lock_fd = -1, rc;

	if (!res)
		res = &scratch;
	memset(res, 0, sizeof(*res));
	memset(&d, 0, sizeof(d));
	if (cap > 0)
		local_path[0] = '\0';
	if (!c->model)
		return lp_errf(err, -EINVAL, "lp_source_fetch_model needs a model-mode source");
	if ((rc = pin_parse(sha256_or_null, pin, &pinp, err)) < 0)
		return rc;
	md = malloc(sizeof(*md));
	u = malloc(sizeof(*u));
	if (!md || !u) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	if ((rc = src_uri_parse_model(u, uri, c->allow_insecure_endpoints, err)) < 0 ||
	    (rc = dest_split(md, dest, err)) < 0)
		goto out;
	if (pinp && !uri_names_gguf(u)) {
		rc = lp_errf(err, -EINVAL,
		             "a sha256 pin applies to a single-file model (a uri ending in .gguf); "
		             "'%.200s' names a directory model",
		             uri);
		goto out;
	}
	/* checked before anything is created beside it, and again once
	 * no other fetch can change it */
	if ((rc = dest_check(md, err)) < 0 || (rc = mkdir_p(md->parent, 0755, err)) < 0)
		goto out;
	if ((rc = lock_fd = dest_lock(md, &locked, err)) < 0)
		goto out;
	if (locked)
		dest_sweep(md);
	if ((rc = dest_check(md, err)) < 0)
		goto out;
	/* a complete earlier fetch of the same uri: every byte is checked */
	rc = entry_use(md->path, uri, pinp, local_path, cap, res, &intact, err);
	if (rc != 0) {
		rc = rc < 0 ? rc : 0;
		goto out;
	}

	pthread_mutex_lock(&c->lock);
	n = c->tmp_counter++;
	pthread_mutex_unlock(&c->lock);
	if (!path_fmt(tmp, sizeof(tmp), "%s/.%s.tmp.%ld.%lu", dest_parent(md), md->base,
	              (long)getpid(), n)) {
		tmp[0] = '\0';
		rc = lp_errf(err, -ENAMETOOLONG, "destination path is too long");
		goto out;
	}
	if (mkdir(tmp, 0755) < 0) {
		int e = errno;
		rc = lp_errf(err, -e, "cannot create '%s': %s", tmp, strerror(e));
		tmp[0] = '\0';
		goto out;
	}
	d.cache = c;
	d.env = &c->env;
	d.u = u;
	d.uri = uri;
	d.dir = tmp;
	clock_gettime(CLOCK_MONOTONIC, &d.last_progress);
	ca = u->scheme == SRC_S3 && c->env.aws_ca_bundle ? c->env.aws_ca_bundle
	                                                 : c->env.curl_ca_bundle;
	if (u->scheme != SRC_FILE && (rc = src_download_init(&d, ca, err)) < 0)
		goto out;
	switch (u->scheme) {
	case SRC_S3:
		rc = src_s3_fetch(&d, err);
		break;
	case SRC_HF:
		rc = src_hf_fetch(&d, err);
		break;
	case SRC_HTTPS:
		rc = src_https_fetch(&d, err);
		break;
	case SRC_FILE:
		rc = src_file_model_fetch(&d, err);
		break;
	}
	if (rc < 0)
		goto out;
	if (d.n_files == 0) {
		rc = lp_errf(err, -ENOENT, "source '%.200s' has no files", uri);
		goto out;
	}
	if ((single = model_single_file(&d)))
		memcpy(res->sha256, d.files[0].sha256, sizeof(res->sha256));
	if (pinp && !single) {
		rc = lp_errf(err, -EINVAL,
		             "a sha256 pin applies to a single-file model; '%.200s' is a directory "
		             "model of %d files",
		             uri, d.n_files);
		goto out;
	}
	if (pinp && strcmp(pinp, res->sha256) != 0) {
		rc = lp_errf(err, -EBADMSG, "'%.200s' has sha256 %s, not the pinned %s", uri,
		             res->sha256, pinp);
		goto out;
	}
	if ((rc = write_meta(&d, single ? single : "", single, res->sha256, err)) < 0)
		goto out;
	fsync_path(tmp);
	if ((rc = dest_install(c, md, tmp, err)) < 0)
		goto out;
	src_progress_final(&d);
	res->bytes_downloaded = d.bytes;
	res->bytes_total = d.bytes;
	res->files = d.n_files;
	rc = copy_out(local_path, cap, md->path, single, err);
out:
	if (rc < 0) {
		res->http_status = d.http_status;
		res->sha256[0] = '\0';
		if (cap > 0)
			local_path[0] = '\0';
	}
	if (tmp[0])
		rm_rf(tmp); /* gone already after a plain rename */
	src_download_release(&d);
	if (lock_fd >= 0)
		close(lock_fd); /* and with it the lock */
	free(md);
	free(u);
	return rc;
}

int lp_source_evict(struct lp_source_cache *c, const char *uri, struct lp_err *err)
{
	char name[64], final[PATH_MAX];
	int rc;

	if (c->model)
		return lp_errf(err, -EINVAL, "a model-mode source has no cache to evict from");
	if ((rc = lp_source_cache_name(uri, name, sizeof(name), err)) < 0)
		return rc;
	if (!path_fmt(final, sizeof(final), "%s/%s", c->dir, name))
		return lp_errf(err, -ENAMETOOLONG, "cache directory path is too long");
	return remove_dir(c, final, err);
}

void lp_source_release(struct lp_source_cache *c, const char *uri, bool discard)
{
	char name[64];

	if (!c || lp_source_cache_name(uri, name, sizeof(name), NULL) < 0)
		return;
	entry_unhold(c, name);
	if (discard)
		entry_drop_unused(c, name);
}

int lp_source_credentials_check(const struct lp_source_cache *c,
                                const struct lp_source_credentials *creds, struct lp_err *err)
{
	struct src_env e;
	int rc = env_with(&e, &c->env, creds, c->allow_insecure_endpoints, err);

	env_release(&e);
	return rc;
}

/* ---- the cache object ---- */

static char *env_dup(const char *name)
{
	const char *v = getenv(name);
	return v && v[0] ? strdup(v) : NULL;
}

static char *strip_slash(char *s)
{
	size_t n = s ? strlen(s) : 0;
	while (n > 0 && s[n - 1] == '/')
		s[--n] = '\0';
	return s;
}

/* Frees a secret, overwritten first. */
static void free_secret(char *s)
{
	if (s) {
		explicit_bzero(s, strlen(s));
		free(s);
	}
}

static void env_release(struct src_env *e)
{
	free_secret(e->aws_access_key);
	free_secret(e->aws_secret_key);
	free_secret(e->aws_session_token);
	free(e->aws_region);
	free(e->s3_endpoint);
	free(e->aws_ca_bundle);
	free(e->hf_endpoint);
	free_secret(e->hf_token);
	free(e->curl_ca_bundle);
	memset(e, 0, sizeof(*e));
}

static int region_check(const char *region, struct lp_err *err)
{
	for (const char *p = region; *p; p++)
		if (!isalnum((unsigned char)*p) && *p != '-')
			return lp_errf(err, -EINVAL, "AWS_REGION '%.64s' is not a region name",
			               region);
	if (strlen(region) > 64)
		return lp_errf(err, -EINVAL, "AWS_REGION '%.64s...' is not a region name", region);
	return 0;
}

/* *out = the S3 endpoint of an AWS region (malloc'd). */
static int region_endpoint(const char *region, char **out, struct lp_err *err)
{
	char def[128];
	int rc;

	if ((rc = region_check(region, err)) < 0)
		return rc;
	snprintf(def, sizeof(def), "https://s3.%s.amazonaws.com", region);
	*out = strdup(def);
	return *out ? 0 : lp_errf(err, -ENOMEM, "out of memory");
}

static int env_read(struct src_env *e, struct lp_err *err)
{
	int rc;

	e->aws_access_key = env_dup("AWS_ACCESS_KEY_ID");
	e->aws_secret_key = env_dup("AWS_SECRET_ACCESS_KEY");
	e->aws_session_token = env_dup("AWS_SESSION_TOKEN");
	e->aws_region = env_dup("AWS_REGION");
	if (!e->aws_region)
		e->aws_region = env_dup("AWS_DEFAULT_REGION");
	if (!e->aws_region)
		e->aws_region = strdup("us-east-1");
	e->s3_endpoint = env_dup("AWS_ENDPOINT_URL_S3");
	if (!e->s3_endpoint)
		e->s3_endpoint = env_dup("AWS_ENDPOINT_URL");
	e->s3_endpoint_set = e->s3_endpoint != NULL;
	if (!e->s3_endpoint && e->aws_region &&
	    (rc = region_endpoint(e->aws_region, &e->s3_endpoint, err)) < 0)
		return rc;
	e->aws_ca_bundle = env_dup("AWS_CA_BUNDLE");
	e->hf_endpoint = env_dup("HF_ENDPOINT");
	if (!e->hf_endpoint)
		e->hf_endpoint = strdup("https://huggingface.co");
	e->hf_token = env_dup("HF_TOKEN");
	if (!e->hf_token)
		e->hf_token = env_dup("HUGGING_FACE_HUB_TOKEN");
	e->curl_ca_bundle = env_dup("CURL_CA_BUNDLE");
	if (!e->aws_region || !e->s3_endpoint || !e->hf_endpoint)
		return lp_errf(err, -ENOMEM, "out of memory");
	strip_slash(e->s3_endpoint);
	strip_slash(e->hf_endpoint);
	if ((e->aws_access_key == NULL) != (e->aws_secret_key == NULL))
		return lp_errf(err, -EINVAL,
		               "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be "
		               "set together");
	return 0;
}

/* Replaces *dst (malloc'd or NULL) by a copy of v when v is given. */
static int env_set(char **dst, const char *v, struct lp_err *err)
{
	char *c;

	if (!v)
		return 0;
	if (!v[0] || strlen(v) > 4096)
		return lp_errf(err, -EINVAL,
		               "a credential value is empty or longer than 4096 bytes");
	for (const char *p = v; *p; p++)
		if ((unsigned char)*p < 0x20 || *p == 0x7f)
			return lp_errf(err, -EINVAL, "a credential value has a control character");
	if (!(c = strdup(v)))
		return lp_errf(err, -ENOMEM, "out of memory");
	free(*dst);
	*dst = c;
	return 0;
}

static char *dup_or_null(const char *s)
{
	return s ? strdup(s) : NULL;
}

/* True for an AWS region name (us-east-1, eu-central-2, us-gov-west-1,
 * cn-north-1): a region from a request that derives the endpoint
 * s3.<region>.amazonaws.com can only name AWS's own hosts. */
static bool aws_region_shaped(const char *r)
{
	const char *p = r;
	int words = 0;

	while (*p >= 'a' && *p <= 'z') {
		const char *w = p;
		while (*p >= 'a' && *p <= 'z')
			p++;
		if (p - w < 2 || *p != '-')
			return false;
		p++;
		words++;
	}
	if (words < 2 || !(*p >= '1' && *p <= '9'))
		return false;
	while (*p >= '0' && *p <= '9')
		p++;
	return *p == '\0' && p - r <= 32;
}

/* An endpoint from a request: an http(s) url without credentials, query
 * or fragment; plain http only when allowed. */
static int endpoint_check(const char *name, const char *url, bool allow_http, struct lp_err *err)
{
	CURLU *h = curl_url();
	char *scheme = NULL, *host = NULL, *part = NULL;
	int rc = 0;

	if (!h)
		return lp_errf(err, -ENOMEM, "out of memory");
	if (curl_url_set(h, CURLUPART_URL, url, 0) != CURLUE_OK ||
	    curl_url_get(h, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
	    curl_url_get(h, CURLUPART_HOST, &host, 0) != CURLUE_OK || !host[0] ||
	    (strcmp(scheme, "https") != 0 && strcmp(scheme, "http") != 0)) {
		rc = lp_errf(err, -EINVAL, "credential %s '%.200s' is not an https url", name, url);
		goto out;
	}
	if (curl_url_get(h, CURLUPART_USER, &part, 0) == CURLUE_OK ||
	    curl_url_get(h, CURLUPART_QUERY, &part, 0) == CURLUE_OK ||
	    curl_url_get(h, CURLUPART_FRAGMENT, &part, 0) == CURLUE_OK) {
		rc = lp_errf(err, -EINVAL,
		             "credential %s '%.200s' must not carry a user, query or fragment",
		             name, url);
		goto out;
	}
	if (strcmp(scheme, "http") == 0 && !allow_http)
		rc = lp_errf(err, -EINVAL,
		             "credential %s '%.200s' is plain http; endpoints given with a "
		             "request must be https unless the agent runs with "
		             "--allow-insecure-source-endpoints",
		             name, url);
out:
	curl_free(part);
	curl_free(host);
	curl_free(scheme);
	curl_url_cleanup(h);
	return rc;
}

/* *e = base with the fields cr gives replaced; release with env_release().
 * An endpoint cr gives goes with cr's secrets only (none: anonymous),
 * never with the environment's: a request cannot send the agent's own
 * keys or token to a host it chose. */
static int env_with(struct src_env *e, const struct src_env *base,
                    const struct lp_source_credentials *cr, bool allow_http, struct lp_err *err)
{
	int rc;

	memset(e, 0, sizeof(*e));
	if ((cr->aws_access_key_id == NULL) != (cr->aws_secret_access_key == NULL))
		return lp_errf(err, -EINVAL,
		               "credentials need AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
		               "together");
	if (cr->aws_session_token && !cr->aws_access_key_id)
		return lp_errf(err, -EINVAL,
		               "credentials with AWS_SESSION_TOKEN need AWS_ACCESS_KEY_ID and "
		               "AWS_SECRET_ACCESS_KEY");
	if (cr->aws_endpoint_url &&
	    (rc = endpoint_check("AWS_ENDPOINT_URL", cr->aws_endpoint_url, allow_http, err)) < 0)
		return rc;
	if (cr->hf_endpoint &&
	    (rc = endpoint_check("HF_ENDPOINT", cr->hf_endpoint, allow_http, err)) < 0)
		return rc;
	if (cr->aws_region && (rc = region_check(cr->aws_region, err)) < 0)
		return rc;
	if (cr->aws_region && !cr->aws_endpoint_url && !base->s3_endpoint_set &&
	    !aws_region_shaped(cr->aws_region))
		return lp_errf(err, -EINVAL,
		               "AWS_REGION '%.64s' is not an AWS region name (like us-east-1); "
		               "give AWS_ENDPOINT_URL for another S3 service",
		               cr->aws_region);
	e->s3_endpoint_set = base->s3_endpoint_set;
	/* keys given replace the environment's whole: its session token
	 * goes; an endpoint given takes none of the environment's */
	if (!cr->aws_access_key_id && !cr->aws_endpoint_url) {
		e->aws_access_key = dup_or_null(base->aws_access_key);
		e->aws_secret_key = dup_or_null(base->aws_secret_key);
		e->aws_session_token = dup_or_null(base->aws_session_token);
	}
	e->aws_region = dup_or_null(base->aws_region);
	e->aws_ca_bundle = dup_or_null(base->aws_ca_bundle);
	e->hf_endpoint = dup_or_null(base->hf_endpoint);
	if (!cr->hf_endpoint)
		e->hf_token = dup_or_null(base->hf_token);
	e->curl_ca_bundle = dup_or_null(base->curl_ca_bundle);
	if ((rc = env_set(&e->aws_access_key, cr->aws_access_key_id, err)) < 0 ||
	    (rc = env_set(&e->aws_secret_key, cr->aws_secret_access_key, err)) < 0 ||
	    (rc = env_set(&e->aws_session_token, cr->aws_session_token, err)) < 0 ||
	    (rc = env_set(&e->aws_region, cr->aws_region, err)) < 0 ||
	    (rc = env_set(&e->hf_token, cr->hf_token, err)) < 0 ||
	    (rc = env_set(&e->hf_endpoint, cr->hf_endpoint, err)) < 0)
		return rc;
	if (cr->aws_endpoint_url) {
		if ((rc = env_set(&e->s3_endpoint, cr->aws_endpoint_url, err)) < 0)
			return rc;
		e->s3_endpoint_set = true;
	} else if (cr->aws_region && !base->s3_endpoint_set) {
		if ((rc = region_endpoint(e->aws_region, &e->s3_endpoint, err)) < 0)
			return rc;
	} else if (!(e->s3_endpoint = dup_or_null(base->s3_endpoint))) {
		return lp_errf(err, -ENOMEM, "out of memory");
	}
	if (!e->aws_region || !e->hf_endpoint)
		return lp_errf(err, -ENOMEM, "out of memory");
	strip_slash(e->s3_endpoint);
	strip_slash(e->hf_endpoint);
	return 0;
}

/* Removes .tmp and .old directories left by processes that died. */
static void sweep_stale(struct lp_source_cache *c)
{
	DIR *d = opendir(c->dir);
	struct dirent *e;
	time_t now = time(NULL);

	if (!d)
		return;
	while ((e = readdir(d))) {
		const char *t = strstr(e->d_name, ".tmp.");
		char path[PATH_MAX], *end;
		struct stat st;
		long pid;

		if (!t)
			t = strstr(e->d_name, ".old.");
		if (!t)
			continue;
		pid = strtol(t + 5, &end, 10);
		if (pid <= 0 || *end != '.' || pid == (long)getpid())
			continue;
		if (kill((pid_t)pid, 0) == 0 || errno != ESRCH)
			continue;
		if ((size_t)snprintf(path, sizeof(path), "%s/%s", c->dir, e->d_name) >=
		    sizeof(path))
			continue;
		if (lstat(path, &st) == 0 && S_ISDIR(st.st_mode) &&
		    now - st.st_mtime > STALE_TMP_SECONDS)
			rm_rf(path);
	}
	closedir(d);
}

/* The cache directory (given: as configured, real: resolved) must be
 * this user's alone: another local user who could write there could plant
 * an entry that the agent serves as a remote adapter. */
static int cache_dir_check(const char *given, const char *real, struct lp_err *err)
{
	uid_t me = geteuid();
	struct stat st;

	if (lstat(given, &st) == 0 && S_ISLNK(st.st_mode) && st.st_uid != me && st.st_uid != 0)
		return lp_errf(err, -EPERM,
		               "cache directory '%.200s' is a symbolic link owned by uid %u, not "
		               "by this agent's uid %u",
		               given, (unsigned)st.st_uid, (unsigned)me);
	if (stat(real, &st) < 0) {
		int e = errno;
		return lp_errf(err, -e, "cannot stat cache directory '%.200s': %s", real,
		               strerror(e));
	}
	if (!S_ISDIR(st.st_mode))
		return lp_errf(err, -ENOTDIR, "cache directory '%.200s' is not a directory", real);
	if (st.st_uid != me)
		return lp_errf(err, -EPERM,
		               "cache directory '%.200s' is owned by uid %u, not by this agent's "
		               "uid %u; remove it or choose another with --lora-cache-dir",
		               real, (unsigned)st.st_uid, (unsigned)me);
	if (st.st_mode & (S_IWGRP | S_IWOTH))
		return lp_errf(err, -EPERM,
		               "cache directory '%.200s' is writable by group or others (mode "
		               "%04o); make it 0700 or choose another with --lora-cache-dir",
		               real, (unsigned)(st.st_mode & 07777));
	return 0;
}

/* Creates and checks the cache directory of an adapter cache (c->dir). */
static int cache_dir_setup(struct lp_source_cache *c, const char *dir, struct lp_err *err)
{
	int rc;

	/* the cache itself is private; parents are ordinary directories */
	if ((rc = mkdir_p(dir, 0700, err)) < 0)
		return rc;
	if (!realpath(dir, c->dir))
		return lp_errf(err, -errno, "cannot resolve cache directory '%.200s': %s", dir,
		               strerror(errno));
	if (strlen(c->dir) > PATH_MAX - 256)
		return lp_errf(err, -ENAMETOOLONG, "cache directory path '%.200s' is too long",
		               c->dir);
	if ((rc = cache_dir_check(dir, c->dir, err)) < 0)
		return rc;
	if (access(c->dir, W_OK | X_OK) < 0)
		return lp_errf(err, -EACCES, "cache directory '%.200s' is not writable", c->dir);
	return 0;
}

int lp_source_cache_new(struct lp_source_cache **out, const struct lp_source_config *cfg,
                        struct lp_err *err)
{
	struct lp_source_cache *c;
	int rc, n = 0;

	*out = NULL;
	if (!cfg->model && (!cfg->cache_dir || !cfg->cache_dir[0]))
		return lp_errf(err, -EINVAL, "no adapter cache directory given");
	if (cfg->max_files < 0 || cfg->max_attempts < 0 || cfg->backoff_initial_ms < 0 ||
	    cfg->backoff_max_ms < 0 || cfg->s3_list_page_size < 0 || cfg->s3_list_page_size > 1000)
		return lp_errf(err, -EINVAL, "negative or out-of-range adapter source limit");
	c = calloc(1, sizeof(*c));
	if (!c)
		return lp_errf(err, -ENOMEM, "out of memory");
	pthread_mutex_init(&c->lock, NULL);
	pthread_mutex_init(&c->budget_lock, NULL);
	c->model = cfg->model;
	c->noun = cfg->model ? "model" : "adapter";
	if (!c->model && (rc = cache_dir_setup(c, cfg->cache_dir, err)) < 0)
		goto out_fail;
	c->max_file_bytes = cfg->max_file_bytes ? cfg->max_file_bytes
	                    : c->model          ? MODEL_MAX_FILE_BYTES
	                                        : DEFAULT_MAX_FILE_BYTES;
	c->max_total_bytes = cfg->max_total_bytes ? cfg->max_total_bytes
	                     : c->model           ? MODEL_MAX_TOTAL_BYTES
	                                          : DEFAULT_MAX_TOTAL_BYTES;
	c->max_cache_bytes = cfg->max_cache_bytes ? cfg->max_cache_bytes : DEFAULT_MAX_CACHE_BYTES;
	if (c->model)
		c->max_cache_bytes = UINT64_MAX; /* no cache, no budget */
	c->allow_insecure_endpoints = cfg->allow_insecure_endpoints;
	c->in_use = c->model ? NULL : cfg->in_use;
	c->in_use_arg = cfg->in_use_arg;
	c->max_files = cfg->max_files ? cfg->max_files
	               : c->model     ? MODEL_MAX_FILES
	                              : DEFAULT_MAX_FILES;
	c->s3_list_page_size = cfg->s3_list_page_size ? cfg->s3_list_page_size : 1000;
	c->policy.max_attempts = cfg->max_attempts ? cfg->max_attempts : 4;
	c->policy.backoff_initial_ms = cfg->backoff_initial_ms ? cfg->backoff_initial_ms : 250;
	c->policy.backoff_max_ms = cfg->backoff_max_ms ? cfg->backoff_max_ms : 8000;
	c->policy.connect_timeout_s = cfg->connect_timeout_s > 0 ? cfg->connect_timeout_s : 10;
	c->policy.low_speed_bytes = cfg->low_speed_bytes > 0 ? cfg->low_speed_bytes : 1024;
	c->policy.low_speed_time_s = cfg->low_speed_time_s > 0 ? cfg->low_speed_time_s : 60;
	c->policy.memory_timeout_s = 120;
	c->progress = cfg->progress;
	c->progress_arg = cfg->progress_arg;
	c->progress_interval_ms = cfg->progress_interval_ms > 0 ? cfg->progress_interval_ms : 1000;
	for (const char *const *r = cfg->allowed_roots; !c->model && r && *r; r++)
		n++;
	if (n > 0 && !(c->roots = calloc((size_t)n, sizeof(*c->roots)))) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out_fail;
	}
	for (int i = 0; i < n; i++) {
		struct stat st;
		char real[PATH_MAX];
		if (!realpath(cfg->allowed_roots[i], real) || stat(real, &st) < 0 ||
		    !S_ISDIR(st.st_mode)) {
			rc = lp_errf(err, -ENOENT, "allowed local root '%.200s' is not a directory",
			             cfg->allowed_roots[i]);
			goto out_fail;
		}
		if (!(c->roots[i] = strdup(real))) {
			rc = lp_errf(err, -ENOMEM, "out of memory");
			goto out_fail;
		}
		c->n_roots++;
	}
	if ((rc = env_read(&c->env, err)) < 0)
		goto out_fail;
	if (!c->model)
		sweep_stale(c);
	*out = c;
	return 0;
out_fail:
	lp_source_cache_free(c);
	return rc;
}

void lp_source_cache_free(struct lp_source_cache *c)
{
	if (!c)
		return;
	for (int i = 0; i < c->n_roots; i++)
		free(c->roots[i]);
	free(c->roots);
	env_release(&c->env);
	free(c->entries);
	pthread_mutex_destroy(&c->lock);
	pthread_mutex_destroy(&c->budget_lock);
	free(c);
}
