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
#include <sys/stat.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>
#include <openssl/evp.h>

#include "agent/adapters/sigv4.h"
#include "agent/adapters/source-internal.h"
#include "common/credentials.h"

#define DEFAULT_MAX_FILE_BYTES  (8ULL << 30)
#define DEFAULT_MAX_TOTAL_BYTES (16ULL << 30)
#define DEFAULT_MAX_FILES       64
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
	}
out:
	curl_free(part);
	curl_free(host);
	curl_free(path);
	curl_url_cleanup(h);
	return rc;
}

int src_uri_parse(struct src_uri *u, const char *uri, struct lp_err *err)
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
		return parse_hf(u, uri, uri + 5, err);
	}
	if (strncmp(uri, "https://", 8) == 0) {
		u->scheme = SRC_HTTPS;
		return parse_https(u, uri, err);
	}
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

static int mkdir_p(const char *dir, struct lp_err *err)
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
		if (mkdir(p, 0755) < 0 && errno != EEXIST) {
			int e = errno;
			return lp_errf(err, -e, "cannot create '%s': %s", p, strerror(e));
		}
		p[i] = c;
	}
	return 0;
}

static int fsync_path(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	int rc = 0;

	if (fd < 0)
		return -errno;
	if (fsync(fd) < 0)
		rc = -errno;
	close(fd);
	return rc;
}

/* Hex SHA-256 of a file into out[65]. */
static int hash_file(const char *path, char *out, struct lp_err *err)
{
	static const char digits[] = "0123456789abcdef";
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;
	EVP_MD_CTX *ctx;
	char *buf;
	ssize_t n;
	int fd, rc = 0;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		int e = errno;
		return lp_errf(err, -e, "cannot open '%s': %s", path, strerror(e));
	}
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
	const char *weights = NULL;
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
			if (n > 0 && (size_t)n < sizeof(p) && stat(p, &fs) == 0 &&
			    S_ISREG(fs.st_mode)) {
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
	if (weights && (rc = hash_file(weights, res->sha256, err)) < 0)
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

/* Uses the complete entry at dir when it is for uri, its files are all
 * there with their sizes and (with a pin) its weights hash to the pin.
 * Returns 1 when used, 0 when the entry must be (re)downloaded. */
static int entry_use(const char *dir, const char *uri, const char *pin, char *out, size_t cap,
                     struct lp_source_result *res, struct lp_err *err)
{
	char path[PATH_MAX], sha[65];
	struct lp_buf text;
	json_t *root = NULL, *files, *f;
	const char *rel, *weights, *msha, *muri;
	size_t i;
	int used = 0;

	lp_buf_init(&text, META_MAX_BYTES);
	if (!path_fmt(path, sizeof(path), "%s/%s", dir, SRC_META_NAME) || access(dir, F_OK) < 0 ||
	    lp_buf_read_file(&text, path, META_MAX_BYTES, NULL) < 0)
		goto out;
	root = json_loadb(text.data, text.len, JSON_REJECT_DUPLICATES, NULL);
	muri = json_string_value(json_object_get(root, "uri"));
	rel = json_string_value(json_object_get(root, "path"));
	weights = json_string_value(json_object_get(root, "weights"));
	msha = json_string_value(json_object_get(root, "sha256"));
	files = json_object_get(root, "files");
	if (!muri || strcmp(muri, uri) != 0 || !rel || !msha || strlen(msha) > 64 ||
	    !json_is_array(files) || json_array_size(files) == 0)
		goto out;
	if ((rel[0] && !src_name_ok(rel)) || (weights && !src_name_ok(weights)))
		goto out;
	json_array_foreach(files, i, f)
	{
		const char *name = json_string_value(json_object_get(f, "name"));
		json_t *size = json_object_get(f, "size");
		struct stat st;
		if (!name || !src_name_ok(name) || !json_is_integer(size))
			goto out;
		if (!path_fmt(path, sizeof(path), "%s/%s", dir, name) || stat(path, &st) < 0 ||
		    !S_ISREG(st.st_mode) || (json_int_t)st.st_size != json_integer_value(size))
			goto out;
	}
	if (pin) {
		/* a pin is checked against the bytes on disk, not the record */
		if (!weights)
			goto out;
		if (!path_fmt(path, sizeof(path), "%s/%s", dir, weights) ||
		    hash_file(path, sha, NULL) < 0 || strcmp(sha, pin) != 0)
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

/* The work of the one caller that downloads uri. */
static int fetch_remote(struct lp_source_cache *c, const struct src_env *env,
                        const struct src_uri *u, const char *uri, const char *pin, char *out,
                        size_t cap, struct lp_source_result *res, struct lp_err *err)
{
	struct src_download d;
	char name[64], final[PATH_MAX], tmp[PATH_MAX];
	const char *rel, *weights, *ca;
	unsigned long n;
	int rc;

	if ((rc = lp_source_cache_name(uri, name, sizeof(name), err)) < 0)
		return rc;
	if (!path_fmt(final, sizeof(final), "%s/%s", c->dir, name) || strlen(final) > PATH_MAX - 64)
		return lp_errf(err, -ENAMETOOLONG, "cache directory path is too long");
	rc = entry_use(final, uri, pin, out, cap, res, err);
	if (rc != 0)
		return rc < 0 ? rc : 0;

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
	if ((rc = entry_install(c, tmp, final, err)) < 0)
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
                    const struct lp_source_credentials *cr, struct lp_err *err);
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

int lp_source_fetch(struct lp_source_cache *c, const char *uri, const char *sha256_or_null,
                    bool from_api, const struct lp_source_credentials *creds, char *local_path,
                    size_t cap, struct lp_source_result *res, struct lp_err *err)
{
	struct lp_source_result scratch;
	struct src_uri *u;
	struct src_env own = {0};
	char pin[65];
	const char *pinp = NULL;
	int rc;

	if (!res)
		res = &scratch;
	memset(res, 0, sizeof(*res));
	if (cap > 0)
		local_path[0] = '\0';
	if (sha256_or_null) {
		size_t n = strlen(sha256_or_null);
		if (n != 64 || strspn(sha256_or_null, "0123456789abcdefABCDEF") != 64)
			return lp_errf(err, -EINVAL, "sha256 pin must be 64 hex characters");
		for (size_t i = 0; i < n; i++)
			pin[i] = (char)tolower((unsigned char)sha256_or_null[i]);
		pin[64] = '\0';
		pinp = pin;
	}
	u = malloc(sizeof(*u));
	if (!u)
		return lp_errf(err, -ENOMEM, "out of memory");
	if ((rc = src_uri_parse(u, uri, err)) < 0)
		goto out;
	if (u->scheme == SRC_FILE)
		rc = fetch_file(c, u, uri, pinp, from_api, local_path, cap, res, err);
	else if (!creds)
		rc = fetch_shared(c, &c->env, 0, u, uri, pinp, local_path, cap, res, err);
	else if ((rc = env_with(&own, &c->env, creds, err)) == 0)
		rc = fetch_shared(c, &own, creds_fingerprint(creds), u, uri, pinp, local_path, cap,
		                  res, err);
	if (rc == 0 && u->scheme != SRC_FILE)
		snprintf(res->root, sizeof(res->root), "%s", c->dir);
out:
	env_release(&own);
	free(u);
	if (rc < 0 && cap > 0)
		local_path[0] = '\0';
	return rc;
}

int lp_source_evict(struct lp_source_cache *c, const char *uri, struct lp_err *err)
{
	char name[64], final[PATH_MAX], gone[PATH_MAX];
	unsigned long n;
	int rc;

	if ((rc = lp_source_cache_name(uri, name, sizeof(name), err)) < 0)
		return rc;
	pthread_mutex_lock(&c->lock);
	n = c->tmp_counter++;
	pthread_mutex_unlock(&c->lock);
	if (!path_fmt(final, sizeof(final), "%s/%s", c->dir, name) ||
	    !path_fmt(gone, sizeof(gone), "%s.old.%ld.%lu", final, (long)getpid(), n))
		return lp_errf(err, -ENAMETOOLONG, "cache directory path is too long");
	if (rename(final, gone) < 0) {
		if (errno == ENOENT)
			return 0;
		int e = errno;
		return lp_errf(err, -EIO, "cannot remove cache entry '%s': %s", final, strerror(e));
	}
	rm_rf(gone);
	return 0;
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

/* *e = base with the fields cr gives replaced; release with env_release(). */
static int env_with(struct src_env *e, const struct src_env *base,
                    const struct lp_source_credentials *cr, struct lp_err *err)
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
	e->s3_endpoint_set = base->s3_endpoint_set;
	/* keys given replace the environment's whole: its session token goes */
	if (!cr->aws_access_key_id) {
		e->aws_access_key = dup_or_null(base->aws_access_key);
		e->aws_secret_key = dup_or_null(base->aws_secret_key);
		e->aws_session_token = dup_or_null(base->aws_session_token);
	}
	e->aws_region = dup_or_null(base->aws_region);
	e->aws_ca_bundle = dup_or_null(base->aws_ca_bundle);
	e->hf_endpoint = dup_or_null(base->hf_endpoint);
	e->hf_token = dup_or_null(base->hf_token);
	e->curl_ca_bundle = dup_or_null(base->curl_ca_bundle);
	if (cr->aws_region && (rc = region_check(cr->aws_region, err)) < 0)
		return rc;
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

int lp_source_cache_new(struct lp_source_cache **out, const struct lp_source_config *cfg,
                        struct lp_err *err)
{
	struct lp_source_cache *c;
	int rc, n = 0;

	*out = NULL;
	if (!cfg->cache_dir || !cfg->cache_dir[0])
		return lp_errf(err, -EINVAL, "no adapter cache directory given");
	if (cfg->max_files < 0 || cfg->max_attempts < 0 || cfg->backoff_initial_ms < 0 ||
	    cfg->backoff_max_ms < 0 || cfg->s3_list_page_size < 0 || cfg->s3_list_page_size > 1000)
		return lp_errf(err, -EINVAL, "negative or out-of-range adapter source limit");
	c = calloc(1, sizeof(*c));
	if (!c)
		return lp_errf(err, -ENOMEM, "out of memory");
	pthread_mutex_init(&c->lock, NULL);
	if ((rc = mkdir_p(cfg->cache_dir, err)) < 0)
		goto out_fail;
	if (!realpath(cfg->cache_dir, c->dir)) {
		rc = lp_errf(err, -errno, "cannot resolve cache directory '%.200s': %s",
		             cfg->cache_dir, strerror(errno));
		goto out_fail;
	}
	if (strlen(c->dir) > PATH_MAX - 256) {
		rc = lp_errf(err, -ENAMETOOLONG, "cache directory path '%.200s' is too long",
		             c->dir);
		goto out_fail;
	}
	if (access(c->dir, W_OK | X_OK) < 0) {
		rc = lp_errf(err, -EACCES, "cache directory '%.200s' is not writable", c->dir);
		goto out_fail;
	}
	c->max_file_bytes = cfg->max_file_bytes ? cfg->max_file_bytes : DEFAULT_MAX_FILE_BYTES;
	c->max_total_bytes = cfg->max_total_bytes ? cfg->max_total_bytes : DEFAULT_MAX_TOTAL_BYTES;
	c->max_files = cfg->max_files ? cfg->max_files : DEFAULT_MAX_FILES;
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
	for (const char *const *r = cfg->allowed_roots; r && *r; r++)
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
	pthread_mutex_destroy(&c->lock);
	free(c);
}
