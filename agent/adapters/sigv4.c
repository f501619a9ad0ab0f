/* AWS Signature Version 4; see sigv4.h. The steps follow AWS's description:
 * canonical request -> string to sign -> HMAC chain over date, region,
 * service and "aws4_request" -> signature. */
#include "agent/adapters/sigv4.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>

#define MAX_PARAMS     64
#define MAX_NAME_LEN   256
#define MAX_SECRET_LEN 256

/* One encoded query pair or one normalised header, heap-owned. */
struct pair {
	char *a;
	char *b;
};

static void pairs_free(struct pair *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		free(p[i].a);
		free(p[i].b);
	}
}

static int pair_cmp(const void *x, const void *y)
{
	const struct pair *p = x, *q = y;
	int c = strcmp(p->a, q->a);
	return c ? c : strcmp(p->b, q->b);
}

static void hex_encode(const unsigned char *p, size_t n, char *out)
{
	static const char digits[] = "0123456789abcdef";
	for (size_t i = 0; i < n; i++) {
		out[2 * i] = digits[p[i] >> 4];
		out[2 * i + 1] = digits[p[i] & 15];
	}
	out[2 * n] = '\0';
}

void lp_sha256_hex(const void *p, size_t n, char *out)
{
	unsigned char md[SHA256_DIGEST_LENGTH];
	SHA256(p, n, md);
	hex_encode(md, sizeof(md), out);
}

void lp_sigv4_format_date(time_t t, char *out)
{
	struct tm tm;
	gmtime_r(&t, &tm);
	if (strftime(out, LP_SIGV4_DATE_LEN, "%Y%m%dT%H%M%SZ", &tm) == 0)
		out[0] = '\0';
}

static bool is_unreserved(unsigned char c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
	       c == '-' || c == '_' || c == '.' || c == '~';
}

int lp_sigv4_uri_encode(struct lp_buf *out, const char *s, size_t n, bool encode_slash,
                        struct lp_err *err)
{
	static const char digits[] = "0123456789ABCDEF";
	char esc[3] = {'%', 0, 0};
	size_t run = 0; /* start of the current run of bytes that stay */
	int rc;

	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (is_unreserved(c) || (c == '/' && !encode_slash))
			continue;
		if (i > run && (rc = lp_buf_append(out, s + run, i - run, err)) < 0)
			return rc;
		esc[1] = digits[c >> 4];
		esc[2] = digits[c & 15];
		if ((rc = lp_buf_append(out, esc, 3, err)) < 0)
			return rc;
		run = i + 1;
	}
	if (n > run)
		return lp_buf_append(out, s + run, n - run, err);
	return 0;
}

/* Encodes s into a new heap string; NULL on failure with err set. */
static char *encode_dup(const char *s, struct lp_err *err)
{
	struct lp_buf b;
	size_t n = s ? strlen(s) : 0;

	lp_buf_init(&b, 3 * n + 1);
	if (lp_buf_append(&b, "", 0, err) < 0 || lp_sigv4_uri_encode(&b, s ? s : "", n, true, err))
		goto out_fail;
	return lp_buf_detach(&b, NULL);
out_fail:
	lp_buf_release(&b);
	return NULL;
}

/* Encodes and sorts the query pairs into p[n]; the caller frees them. */
static int encode_query(struct pair *p, const struct lp_sigv4_param *q, size_t n,
                        struct lp_err *err)
{
	if (n > MAX_PARAMS)
		return lp_errf(err, -EINVAL, "too many query parameters to sign (%zu)", n);
	memset(p, 0, n * sizeof(*p));
	for (size_t i = 0; i < n; i++) {
		if (!q[i].name || !q[i].name[0]) {
			pairs_free(p, n);
			return lp_errf(err, -EINVAL, "query parameter %zu has no name", i);
		}
		p[i].a = encode_dup(q[i].name, err);
		p[i].b = p[i].a ? encode_dup(q[i].value, err) : NULL;
		if (!p[i].b) {
			pairs_free(p, n);
			return err && err->code ? err->code : -ENOMEM;
		}
	}
	qsort(p, n, sizeof(*p), pair_cmp);
	return 0;
}

int lp_sigv4_canonical_query(struct lp_buf *out, const struct lp_sigv4_param *q, size_t n,
                             struct lp_err *err)
{
	struct pair p[MAX_PARAMS];
	int rc;

	if ((rc = encode_query(p, q, n, err)) < 0)
		return rc;
	for (size_t i = 0; i < n && rc == 0; i++)
		rc = lp_buf_appendf(out, err, "%s%s=%s", i ? "&" : "", p[i].a, p[i].b);
	if (rc == 0)
		rc = lp_buf_append(out, "", 0, err);
	pairs_free(p, n);
	return rc;
}

/* Lower-cases the name, trims the value and collapses its inner runs of
 * spaces, sorts by name and joins repeated names with ','. *np receives
 * the number of distinct headers. */
static int normalise_headers(struct pair *p, size_t *np, const struct lp_sigv4_request *r,
                             struct lp_err *err)
{
	size_t n = r->n_headers, k = 0;
	const char *bad = NULL;
	bool host = false;

	if (n > MAX_PARAMS)
		return lp_errf(err, -EINVAL, "too many headers to sign (%zu)", n);
	memset(p, 0, n * sizeof(*p));
	for (size_t i = 0; i < n; i++) {
		const char *name = r->headers[i].name,
		           *v = r->headers[i].value ? r->headers[i].value : "";
		size_t nl = name ? strlen(name) : 0, vl, j = 0;

		bad = name;
		if (nl == 0 || nl > MAX_NAME_LEN)
			goto out_bad_name;
		for (size_t c = 0; c < nl; c++)
			if (!isalnum((unsigned char)name[c]) && name[c] != '-' && name[c] != '_')
				goto out_bad_name;
		if (strpbrk(v, "\r\n")) {
			lp_errf(err, -EINVAL, "header '%s' has a line break in its value", name);
			goto out_fail;
		}
		p[i].a = malloc(nl + 1);
		vl = strlen(v);
		p[i].b = malloc(vl + 1);
		if (!p[i].a || !p[i].b) {
			lp_errf(err, -ENOMEM, "out of memory signing a request");
			goto out_fail;
		}
		for (size_t c = 0; c <= nl; c++)
			p[i].a[c] = (char)tolower((unsigned char)name[c]);
		while (*v == ' ' || *v == '\t')
			v++;
		for (; *v; v++) {
			bool space = *v == ' ' || *v == '\t';
			if (space && (j == 0 || p[i].b[j - 1] == ' '))
				continue;
			p[i].b[j++] = space ? ' ' : *v;
		}
		while (j > 0 && p[i].b[j - 1] == ' ')
			j--;
		p[i].b[j] = '\0';
		if (strcmp(p[i].a, "host") == 0)
			host = true;
	}
	if (!host) {
		lp_errf(err, -EINVAL, "the signed headers lack 'host'");
		goto out_fail;
	}
	/* a stable order by name keeps repeated values in the caller's order */
	for (size_t i = 1; i < n; i++)
		for (size_t j = i; j > 0 && strcmp(p[j - 1].a, p[j].a) > 0; j--) {
			struct pair t = p[j];
			p[j] = p[j - 1];
			p[j - 1] = t;
		}
	for (size_t i = 0; i < n; i++) {
		if (k > 0 && strcmp(p[k - 1].a, p[i].a) == 0) {
			size_t la = strlen(p[k - 1].b), lb = strlen(p[i].b);
			char *joined = realloc(p[k - 1].b, la + lb + 2);
			if (!joined) {
				lp_errf(err, -ENOMEM, "out of memory signing a request");
				goto out_fail;
			}
			joined[la] = ',';
			memcpy(joined + la + 1, p[i].b, lb + 1);
			p[k - 1].b = joined;
			free(p[i].a);
			free(p[i].b);
			p[i].a = p[i].b = NULL;
			continue;
		}
		if (k != i) {
			p[k] = p[i];
			p[i].a = p[i].b = NULL;
		}
		k++;
	}
	*np = k;
	return 0;

out_bad_name:
	lp_errf(err, -EINVAL, "header name '%.64s' cannot be signed", bad ? bad : "");
out_fail:
	pairs_free(p, n);
	return err ? err->code : -EINVAL;
}

/* Appends "a;b;c" of the normalised header names. */
static int append_signed_headers(struct lp_buf *out, const struct pair *h, size_t n,
                                 struct lp_err *err)
{
	int rc = 0;
	for (size_t i = 0; i < n && rc == 0; i++)
		rc = lp_buf_appendf(out, err, "%s%s", i ? ";" : "", h[i].a);
	return rc;
}

int lp_sigv4_canonical_request(struct lp_buf *out, const struct lp_sigv4_request *r,
                               struct lp_err *err)
{
	struct pair h[MAX_PARAMS];
	size_t nh = 0;
	int rc;

	if (!r->method || !r->method[0] || !r->payload_hash)
		return lp_errf(err, -EINVAL, "request to sign lacks a method or a payload hash");
	if ((rc = normalise_headers(h, &nh, r, err)) < 0)
		return rc;
	lp_buf_reset(out);
	rc = lp_buf_appendf(out, err, "%s\n%s\n", r->method, r->path && r->path[0] ? r->path : "/");
	if (rc == 0)
		rc = lp_sigv4_canonical_query(out, r->query, r->n_query, err);
	if (rc == 0)
		rc = lp_buf_append(out, "\n", 1, err);
	for (size_t i = 0; i < nh && rc == 0; i++)
		rc = lp_buf_appendf(out, err, "%s:%s\n", h[i].a, h[i].b);
	if (rc == 0)
		rc = lp_buf_append(out, "\n", 1, err);
	if (rc == 0)
		rc = append_signed_headers(out, h, nh, err);
	if (rc == 0)
		rc = lp_buf_appendf(out, err, "\n%s", r->payload_hash);
	pairs_free(h, nh);
	return rc;
}

static bool valid_amz_date(const char *d)
{
	if (!d || strlen(d) != 16 || d[8] != 'T' || d[15] != 'Z')
		return false;
	for (int i = 0; i < 15; i++)
		if (i != 8 && !isdigit((unsigned char)d[i]))
			return false;
	return true;
}

static int hmac(const void *key, size_t klen, const char *msg, unsigned char *out)
{
	unsigned int len = 0;
	if (!HMAC(EVP_sha256(), key, (int)klen, (const unsigned char *)msg, strlen(msg), out,
	          &len) ||
	    len != SHA256_DIGEST_LENGTH)
		return -1;
	return 0;
}

int lp_sigv4_authorization(char *out, size_t cap, char *signature, const struct lp_sigv4_key *k,
                           const struct lp_sigv4_request *r, const char *amz_date,
                           struct lp_err *err)
{
	struct lp_buf canon, names;
	struct pair h[MAX_PARAMS];
	size_t nh = 0;
	char date8[9], scope[256], creq_hex[65], sts[512], sig_hex[65];
	char secret[MAX_SECRET_LEN + 8];
	unsigned char kd[32], kr[32], ks[32], kk[32], sig[32];
	int rc, n;

	if (!k->access_key || !k->secret_key || !k->region || !k->service || !k->access_key[0])
		return lp_errf(err, -EINVAL,
		               "signing key lacks an access key, secret, region or "
		               "service");
	if (strlen(k->secret_key) > MAX_SECRET_LEN)
		return lp_errf(err, -EINVAL, "secret access key is too long");
	if (!valid_amz_date(amz_date))
		return lp_errf(err, -EINVAL, "'%.32s' is not an x-amz-date (YYYYMMDDTHHMMSSZ)",
		               amz_date ? amz_date : "");
	memcpy(date8, amz_date, 8);
	date8[8] = '\0';
	n = snprintf(scope, sizeof(scope), "%s/%s/%s/aws4_request", date8, k->region, k->service);
	if (n < 0 || (size_t)n >= sizeof(scope))
		return lp_errf(err, -EINVAL, "region '%.64s' is too long", k->region);

	lp_buf_init(&canon, 1 << 20);
	lp_buf_init(&names, 1 << 16);
	if ((rc = lp_sigv4_canonical_request(&canon, r, err)) < 0)
		goto out;
	lp_sha256_hex(canon.data, canon.len, creq_hex);
	n = snprintf(sts, sizeof(sts), "AWS4-HMAC-SHA256\n%s\n%s\n%s", amz_date, scope, creq_hex);
	if (n < 0 || (size_t)n >= sizeof(sts)) {
		rc = lp_errf(err, -EINVAL, "string to sign is too long");
		goto out;
	}
	n = snprintf(secret, sizeof(secret), "AWS4%s", k->secret_key);
	if (hmac(secret, (size_t)n, date8, kd) || hmac(kd, 32, k->region, kr) ||
	    hmac(kr, 32, k->service, ks) || hmac(ks, 32, "aws4_request", kk) ||
	    hmac(kk, 32, sts, sig)) {
		rc = lp_errf(err, -EIO, "HMAC-SHA256 failed in OpenSSL");
		goto out;
	}
	hex_encode(sig, 32, sig_hex);
	if ((rc = normalise_headers(h, &nh, r, err)) < 0)
		goto out;
	rc = append_signed_headers(&names, h, nh, err);
	if (rc == 0)
		rc = lp_buf_append(&names, "", 0, err);
	pairs_free(h, nh);
	if (rc < 0)
		goto out;
	n = snprintf(out, cap, "AWS4-HMAC-SHA256 Credential=%s/%s,SignedHeaders=%s,Signature=%s",
	             k->access_key, scope, names.data, sig_hex);
	if (n < 0 || (size_t)n >= cap) {
		rc = lp_errf(err, -ENAMETOOLONG, "authorization header does not fit in %zu bytes",
		             cap);
		goto out;
	}
	if (signature)
		memcpy(signature, sig_hex, sizeof(sig_hex));
out:
	OPENSSL_cleanse(secret, sizeof(secret));
	OPENSSL_cleanse(kd, sizeof(kd));
	OPENSSL_cleanse(kr, sizeof(kr));
	OPENSSL_cleanse(ks, sizeof(ks));
	OPENSSL_cleanse(kk, sizeof(kk));
	lp_buf_release(&canon);
	lp_buf_release(&names);
	return rc;
}
