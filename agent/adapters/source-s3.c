/* s3://bucket/prefix sources: ListObjectsV2 with continuation tokens, then
 * a GET per object, path-style ({endpoint}/{bucket}/{key}), each request
 * signed with SigV4 (UNSIGNED-PAYLOAD) when credentials are set and sent
 * anonymously otherwise. S3's error XML (Code, Message) goes into the
 * error message. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent/adapters/sigv4.h"
#include "agent/adapters/source-internal.h"

#define LIST_BODY_MAX (16u << 20)
#define MAX_PAGES     10000

struct s3_ctx {
	struct src_download *d;
	const struct src_env *env;
	char base[1024];       /* scheme://host[:port] of the endpoint */
	char host[320];        /* Host header, as signed */
	char path_prefix[256]; /* path of the endpoint, "" or "/x" */
};

/* Argument of the headers callback of one request. */
struct s3_req {
	struct s3_ctx *s3;
	const char *path; /* encoded, as sent */
	const struct lp_sigv4_param *query;
	size_t n_query;
};

struct s3_object {
	char *key;
	uint64_t size;
};

static int append_line(struct curl_slist **list, const char *name, const char *value,
                       struct lp_err *err)
{
	struct lp_buf b;
	struct curl_slist *t = NULL;
	int rc;

	lp_buf_init(&b, 32 * 1024);
	rc = lp_buf_appendf(&b, err, "%s: %s", name, value);
	if (rc == 0 && !(t = curl_slist_append(*list, b.data)))
		rc = lp_errf(err, -ENOMEM, "out of memory");
	if (t)
		*list = t;
	lp_buf_release(&b);
	return rc;
}

/* Signs the request at the time of each try. */
static int s3_headers(void *arg, struct curl_slist **list, struct lp_err *err)
{
	const struct s3_req *r = arg;
	const struct src_env *env = r->s3->env;
	struct lp_sigv4_param h[4];
	size_t nh = 0;
	char date[LP_SIGV4_DATE_LEN], auth[1024];
	int rc;

	if ((rc = append_line(list, "Host", r->s3->host, err)) < 0)
		return rc;
	if (!env->aws_access_key)
		return 0; /* anonymous: a public bucket */
	lp_sigv4_format_date(time(NULL), date);
	h[nh++] = (struct lp_sigv4_param){"host", r->s3->host};
	h[nh++] = (struct lp_sigv4_param){"x-amz-content-sha256", LP_SIGV4_UNSIGNED};
	h[nh++] = (struct lp_sigv4_param){"x-amz-date", date};
	if (env->aws_session_token)
		h[nh++] = (struct lp_sigv4_param){"x-amz-security-token", env->aws_session_token};
	const struct lp_sigv4_request req = {
	    .method = "GET",
	    .path = r->path,
	    .query = r->query,
	    .n_query = r->n_query,
	    .headers = h,
	    .n_headers = nh,
	    .payload_hash = LP_SIGV4_UNSIGNED,
	};
	const struct lp_sigv4_key key = {
	    .access_key = env->aws_access_key,
	    .secret_key = env->aws_secret_key,
	    .region = env->aws_region,
	    .service = "s3",
	};
	if ((rc = lp_sigv4_authorization(auth, sizeof(auth), NULL, &key, &req, date, err)) < 0)
		return rc;
	for (size_t i = 1; i < nh && rc == 0; i++)
		rc = append_line(list, h[i].name, h[i].value, err);
	if (rc == 0)
		rc = append_line(list, "Authorization", auth, err);
	return rc;
}

static int s3_endpoint(struct s3_ctx *s, struct lp_err *err)
{
	const char *ep = s->env->s3_endpoint;
	CURLU *h = curl_url();
	char *scheme = NULL, *host = NULL, *port = NULL, *path = NULL;
	int rc = 0, n;

	if (!h)
		return lp_errf(err, -ENOMEM, "out of memory");
	if (curl_url_set(h, CURLUPART_URL, ep, 0) != CURLUE_OK ||
	    curl_url_get(h, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
	    curl_url_get(h, CURLUPART_HOST, &host, 0) != CURLUE_OK ||
	    (strcmp(scheme, "http") != 0 && strcmp(scheme, "https") != 0)) {
		rc = lp_errf(err, -EINVAL, "S3 endpoint '%.200s' is not an http or https url", ep);
		goto out;
	}
	curl_url_get(h, CURLUPART_PORT, &port, 0); /* only when the url names one */
	curl_url_get(h, CURLUPART_PATH, &path, 0);
	if (port && ((strcmp(scheme, "http") == 0 && strcmp(port, "80") == 0) ||
	             (strcmp(scheme, "https") == 0 && strcmp(port, "443") == 0))) {
		curl_free(port);
		port = NULL;
	}
	n = port ? snprintf(s->host, sizeof(s->host), "%s:%s", host, port)
	         : snprintf(s->host, sizeof(s->host), "%s", host);
	if (n < 0 || (size_t)n >= sizeof(s->host)) {
		rc = lp_errf(err, -EINVAL, "S3 endpoint host is too long");
		goto out;
	}
	n = snprintf(s->base, sizeof(s->base), "%s://%s", scheme, s->host);
	if (n < 0 || (size_t)n >= sizeof(s->base)) {
		rc = lp_errf(err, -EINVAL, "S3 endpoint is too long");
		goto out;
	}
	n = snprintf(s->path_prefix, sizeof(s->path_prefix), "%s", path ? path : "");
	if (n < 0 || (size_t)n >= sizeof(s->path_prefix)) {
		rc = lp_errf(err, -EINVAL, "S3 endpoint path is too long");
		goto out;
	}
	while (n > 0 && s->path_prefix[n - 1] == '/')
		s->path_prefix[--n] = '\0';
out:
	curl_free(scheme);
	curl_free(host);
	curl_free(port);
	curl_free(path);
	curl_url_cleanup(h);
	return rc;
}

/* ---- a little XML: S3's answers are flat and never use attributes on
 * the elements read here, and '<' never appears unescaped in text ---- */

static const char *xml_elem(const char *p, const char *end, const char *tag, const char **vb,
                            const char **ve)
{
	char open[48], close[48];
	size_t no = (size_t)snprintf(open, sizeof(open), "<%s>", tag);
	size_t nc = (size_t)snprintf(close, sizeof(close), "</%s>", tag);
	const char *a, *c;

	if (p >= end || !(a = memmem(p, (size_t)(end - p), open, no)))
		return NULL;
	a += no;
	if (!(c = memmem(a, (size_t)(end - a), close, nc)))
		return NULL;
	*vb = a;
	*ve = c;
	return c + nc;
}

static size_t utf8_put(char *out, unsigned long cp)
{
	if (cp < 0x80) {
		out[0] = (char)cp;
		return 1;
	}
	if (cp < 0x800) {
		out[0] = (char)(0xc0 | (cp >> 6));
		out[1] = (char)(0x80 | (cp & 0x3f));
		return 2;
	}
	if (cp < 0x10000) {
		out[0] = (char)(0xe0 | (cp >> 12));
		out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
		out[2] = (char)(0x80 | (cp & 0x3f));
		return 3;
	}
	out[0] = (char)(0xf0 | (cp >> 18));
	out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
	out[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
	out[3] = (char)(0x80 | (cp & 0x3f));
	return 4;
}

/* Decodes the text [b, e) (entities) into out; false when it does not fit
 * or an entity is malformed. */
static bool xml_text(const char *b, const char *e, char *out, size_t cap)
{
	static const struct {
		const char *name;
		char c;
	} named[] = {{"amp;", '&'}, {"lt;", '<'}, {"gt;", '>'}, {"quot;", '"'}, {"apos;", '\''}};
	size_t o = 0;

	while (b < e) {
		if (o + 4 >= cap)
			return false;
		if (*b != '&') {
			out[o++] = *b++;
			continue;
		}
		b++;
		bool done = false;
		for (size_t i = 0; i < sizeof(named) / sizeof(*named); i++) {
			size_t n = strlen(named[i].name);
			if ((size_t)(e - b) >= n && memcmp(b, named[i].name, n) == 0) {
				out[o++] = named[i].c;
				b += n;
				done = true;
				break;
			}
		}
		if (done)
			continue;
		if (b < e && *b == '#') {
			char num[16], *end;
			const char *semi = memchr(b, ';', (size_t)(e - b));
			size_t n = semi ? (size_t)(semi - b - 1) : 0;
			unsigned long cp;
			if (!semi || n == 0 || n >= sizeof(num))
				return false;
			memcpy(num, b + 1, n);
			num[n] = '\0';
			cp = num[0] == 'x' ? strtoul(num + 1, &end, 16) : strtoul(num, &end, 10);
			if (*end || cp == 0 || cp > 0x10ffff)
				return false;
			o += utf8_put(out + o, cp);
			b = semi + 1;
			continue;
		}
		return false;
	}
	out[o] = '\0';
	return true;
}

/* "Code: Message" of an S3 error body, or its start. */
static void s3_error_detail(const char *body, char *out, size_t cap)
{
	const char *end = body + strlen(body), *cb, *ce, *mb, *me;
	char code[128] = "", msg[512] = "";

	if (xml_elem(body, end, "Code", &cb, &ce))
		xml_text(cb, ce, code, sizeof(code));
	if (xml_elem(body, end, "Message", &mb, &me))
		xml_text(mb, me, msg, sizeof(msg));
	if (code[0])
		snprintf(out, cap, "%s%s%s", code, msg[0] ? ": " : "", msg);
	else
		snprintf(out, cap, "%.200s", body);
}

static void objects_free(struct s3_object *o, int n)
{
	for (int i = 0; i < n; i++)
		free(o[i].key);
	free(o);
}

static int bucket_path(struct s3_ctx *s, struct lp_buf *out, const char *key, struct lp_err *err)
{
	int rc = lp_buf_appendf(out, err, "%s/%s", s->path_prefix, s->d->u->bucket);
	if (rc == 0 && key) {
		rc = lp_buf_append(out, "/", 1, err);
		if (rc == 0)
			rc = src_url_append(out, key, true, err);
	}
	return rc;
}

/* Lists every key under prefix into *objs (folder markers included). */
static int s3_list(struct s3_ctx *s, const char *prefix, struct s3_object **objs, int *n_objs,
                   struct lp_err *err)
{
	struct src_download *d = s->d;
	struct lp_buf path, query, url, body;
	char token[1024] = "", page[16];
	struct s3_object *o = NULL;
	int n = 0, rc = 0, limit = d->cache->max_files;

	lp_buf_init(&path, 4096);
	lp_buf_init(&query, 8192);
	lp_buf_init(&url, 16384);
	lp_buf_init(&body, LIST_BODY_MAX);
	snprintf(page, sizeof(page), "%d", d->cache->s3_list_page_size);
	if ((rc = bucket_path(s, &path, NULL, err)) < 0)
		goto out;
	for (int pages = 0;; pages++) {
		struct lp_sigv4_param q[4] = {{"list-type", "2"},
		                              {"prefix", prefix},
		                              {"max-keys", page},
		                              {"continuation-token", token}};
		size_t nq = token[0] ? 4 : 3;
		struct s3_req req = {s, path.data, q, nq};
		struct lp_http_get g = {.headers_fn = s3_headers, .headers_arg = &req};
		struct lp_http_result res;
		const char *p, *end, *vb, *ve;
		char truncated[8] = "";

		if (pages >= MAX_PAGES) {
			rc = lp_errf(err, -EFBIG, "listing of s3://%s/%s has more than %d pages",
			             d->u->bucket, prefix, MAX_PAGES);
			goto out;
		}
		lp_buf_reset(&query);
		lp_buf_reset(&url);
		if ((rc = lp_sigv4_canonical_query(&query, q, nq, err)) < 0 ||
		    (rc = lp_buf_appendf(&url, err, "%s%s?%s", s->base, path.data, query.data)) < 0)
			goto out;
		g.url = url.data;
		if ((rc = src_get_memory(d, &g, &body, &res, err)) < 0) {
			lp_err_prefix(err, "listing s3://%s/%s", d->u->bucket, prefix);
			goto out;
		}
		if (res.status != 200) {
			char detail[700];
			s3_error_detail(res.error_body, detail, sizeof(detail));
			rc = src_http_error(d, res.status, detail, err, "listing s3://%s/%s failed",
			                    d->u->bucket, prefix);
			goto out;
		}
		end = body.data ? body.data + body.len : NULL;
		p = body.data;
		while (p && (p = xml_elem(p, end, "Contents", &vb, &ve))) {
			const char *kb, *ke, *sb, *se;
			char key[SRC_NAME_MAX * 2], size[32], *tail;
			struct s3_object *grown;
			if (!xml_elem(vb, ve, "Key", &kb, &ke) ||
			    !xml_elem(vb, ve, "Size", &sb, &se) ||
			    !xml_text(kb, ke, key, sizeof(key)) ||
			    !xml_text(sb, se, size, sizeof(size))) {
				rc = lp_errf(err, -EIO,
				             "listing of s3://%s/%s has an entry without a "
				             "readable Key or Size",
				             d->u->bucket, prefix);
				goto out;
			}
			if (n >= limit + 16) {
				rc = lp_errf(err, -EFBIG,
				             "s3://%s/%s holds more than %d objects (the "
				             "file limit)",
				             d->u->bucket, prefix, limit);
				goto out;
			}
			grown = realloc(o, (size_t)(n + 1) * sizeof(*o));
			if (!grown || !(grown[n].key = strdup(key))) {
				if (grown)
					o = grown;
				rc = lp_errf(err, -ENOMEM, "out of memory");
				goto out;
			}
			o = grown;
			o[n].size = strtoull(size, &tail, 10);
			n++;
		}
		if (end && xml_elem(body.data, end, "IsTruncated", &vb, &ve))
			xml_text(vb, ve, truncated, sizeof(truncated));
		if (strcmp(truncated, "true") != 0)
			break;
		if (!xml_elem(body.data, end, "NextContinuationToken", &vb, &ve) ||
		    !xml_text(vb, ve, token, sizeof(token)) || !token[0]) {
			rc = lp_errf(err, -EIO,
			             "truncated listing of s3://%s/%s has no usable "
			             "continuation token",
			             d->u->bucket, prefix);
			goto out;
		}
	}
out:
	lp_buf_release(&path);
	lp_buf_release(&query);
	lp_buf_release(&url);
	lp_buf_release(&body);
	if (rc < 0) {
		objects_free(o, n);
		return rc;
	}
	*objs = o;
	*n_objs = n;
	return 0;
}

static int s3_get_object(struct s3_ctx *s, const char *key, const char *name, uint64_t size,
                         struct lp_err *err)
{
	struct src_download *d = s->d;
	struct lp_buf path, url;
	struct lp_http_result *res = malloc(sizeof(*res));
	int rc;

	if (!res)
		return lp_errf(err, -ENOMEM, "out of memory");
	lp_buf_init(&path, 8192);
	lp_buf_init(&url, 16384);
	if ((rc = bucket_path(s, &path, key, err)) < 0 ||
	    (rc = lp_buf_appendf(&url, err, "%s%s", s->base, path.data)) < 0)
		goto out;
	{
		struct s3_req req = {s, path.data, NULL, 0};
		struct lp_http_get g = {
		    .url = url.data, .headers_fn = s3_headers, .headers_arg = &req};
		rc = src_get_file(d, &g, name, size, res, err);
	}
	if (rc < 0) {
		lp_err_prefix(err, "s3://%s/%s", d->u->bucket, key);
		goto out;
	}
	if (res->status < 200 || res->status >= 300) {
		char detail[700];
		s3_error_detail(res->error_body, detail, sizeof(detail));
		rc = src_http_error(d, res->status, detail, err, "GET s3://%s/%s failed",
		                    d->u->bucket, key);
	}
out:
	free(res);
	lp_buf_release(&path);
	lp_buf_release(&url);
	return rc;
}

int src_s3_fetch(struct src_download *d, struct lp_err *err)
{
	const struct src_uri *u = d->u;
	struct lp_source_cache *c = d->cache;
	struct s3_ctx s = {.d = d, .env = d->env};
	struct s3_object *o = NULL;
	char list_prefix[SRC_NAME_MAX + 2];
	size_t pl = strlen(u->prefix);
	bool single = false;
	uint64_t total = 0;
	int n = 0, files = 0, rc;

	if ((rc = s3_endpoint(&s, err)) < 0)
		return rc;
	/* "a/b" means the directory a/b/ unless only the object a/b exists */
	snprintf(list_prefix, sizeof(list_prefix), "%s%s", u->prefix,
	         pl == 0 || u->prefix[pl - 1] == '/' ? "" : "/");
	if ((rc = s3_list(&s, list_prefix, &o, &n, err)) < 0)
		return rc;
	if (n == 0 && strcmp(list_prefix, u->prefix) != 0) {
		objects_free(o, n);
		o = NULL;
		if ((rc = s3_list(&s, u->prefix, &o, &n, err)) < 0)
			return rc;
		single = true;
	}
	for (int i = 0; i < n; i++) {
		size_t kl = strlen(o[i].key);
		if (single ? strcmp(o[i].key, u->prefix) != 0 : (kl > 0 && o[i].key[kl - 1] == '/'))
			continue; /* another object sharing the prefix, or a folder marker */
		files++;
		total += o[i].size;
		if (o[i].size > c->max_file_bytes) {
			rc = lp_errf(err, -EFBIG,
			             "s3://%s/%s is %llu bytes, over the limit of %llu per "
			             "file",
			             u->bucket, o[i].key, (unsigned long long)o[i].size,
			             (unsigned long long)c->max_file_bytes);
			goto out;
		}
	}
	if (files == 0) {
		rc = lp_errf(err, -ENOENT, "no objects under s3://%s/%s", u->bucket, u->prefix);
		goto out;
	}
	if (files > c->max_files) {
		rc = lp_errf(err, -EFBIG, "s3://%s/%s holds %d objects, over the limit of %d",
		             u->bucket, u->prefix, files, c->max_files);
		goto out;
	}
	if (total > c->max_cache_bytes) {
		rc = lp_errf(err, -ENOSPC,
		             "s3://%s/%s holds %llu bytes, more than the adapter cache's budget "
		             "of %llu",
		             u->bucket, u->prefix, (unsigned long long)total,
		             (unsigned long long)c->max_cache_bytes);
		goto out;
	}
	if (total > c->max_total_bytes) {
		rc = lp_errf(err, -EFBIG, "s3://%s/%s holds %llu bytes, over the limit of %llu",
		             u->bucket, u->prefix, (unsigned long long)total,
		             (unsigned long long)c->max_total_bytes);
		goto out;
	}
	d->announced = total;
	for (int i = 0; i < n && rc == 0; i++) {
		size_t kl = strlen(o[i].key);
		const char *name;
		if (single) {
			if (strcmp(o[i].key, u->prefix) != 0)
				continue;
			name = strrchr(o[i].key, '/') ? strrchr(o[i].key, '/') + 1 : o[i].key;
		} else {
			if (kl > 0 && o[i].key[kl - 1] == '/')
				continue;
			name = o[i].key + strlen(list_prefix);
		}
		rc = s3_get_object(&s, o[i].key, name, o[i].size, err);
	}
out:
	objects_free(o, n);
	return rc;
}
