/* Encodings for the Kubernetes client; see encoding.h. */
#include "operator/kube/encoding.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/evp.h>

int kube_base64_decode(const char *text, size_t len, unsigned char **out, size_t *out_len,
                       struct lp_err *err)
{
	static const char alphabet[] =
	    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	unsigned char *clean, *dst = NULL;
	size_t n = 0, pad = 0, fill, i;
	int got, rc = 0;

	*out = NULL;
	*out_len = 0;
	if (len > INT_MAX - 4)
		return lp_errf(err, -E2BIG, "base64 text of %zu bytes is too long", len);
	/* EVP_DecodeBlock wants whole quads with no whitespace inside and
	 * reads '=' anywhere as zero bits: clean and check the text first */
	clean = malloc(len + 4);
	if (!clean)
		return lp_errf(err, -ENOMEM, "out of memory");
	for (i = 0; i < len; i++) {
		char c = text[i];

		if (c == ' ' || c == '\n' || c == '\r' || c == '\t')
			continue;
		if (c == '=') {
			pad++;
			continue;
		}
		if (c == '\0' || !strchr(alphabet, c) || pad) {
			rc = lp_errf(err, -EINVAL, "invalid base64 character at offset %zu", i);
			goto out;
		}
		clean[n++] = (unsigned char)c;
	}
	/* one leftover character cannot come from whole bytes; nor can 3+ pads */
	if (n % 4 == 1 || pad > 2) {
		rc = lp_errf(err, -EINVAL, "invalid base64 length or padding");
		goto out;
	}
	fill = (4 - n % 4) % 4; /* padding optional on input: put it back */
	memset(clean + n, '=', fill);
	dst = malloc((n + fill) / 4 * 3 + 1);
	if (!dst) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	got = n ? EVP_DecodeBlock(dst, clean, (int)(n + fill)) : 0;
	if (got < 0 || (size_t)got < fill) {
		rc = lp_errf(err, -EINVAL, "invalid base64");
		goto out;
	}
	/* its length counts a zero byte for every '=' */
	n = (size_t)got - fill;
	dst[n] = '\0';
	*out = dst;
	*out_len = n;
	dst = NULL;
out:
	free(dst);
	free(clean);
	return rc;
}

int kube_percent_encode(struct lp_buf *b, const char *s, bool keep_slash, struct lp_err *err)
{
	static const char hex[] = "0123456789ABCDEF";
	int rc;

	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		bool plain = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
		             (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' ||
		             c == '~' || (keep_slash && c == '/');
		char enc[3] = {'%', hex[c >> 4], hex[c & 15]};

		rc = plain ? lp_buf_append(b, s, 1, err) : lp_buf_append(b, enc, 3, err);
		if (rc)
			return rc;
	}
	return lp_buf_append(b, "", 0, err);
}

void kube_sha256_hex(const void *data, size_t len, char hex[65])
{
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0, i;

	hex[0] = '\0';
	if (!EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL) || mdlen != 32)
		return;
	for (i = 0; i < mdlen; i++)
		snprintf(hex + 2 * i, 3, "%02x", md[i]);
}

void kube_time_format(const struct timespec *t, bool micro, char *out, size_t size)
{
	struct tm tm;
	char base[32];

	gmtime_r(&t->tv_sec, &tm);
	strftime(base, sizeof(base), "%Y-%m-%dT%H:%M:%S", &tm);
	if (micro)
		snprintf(out, size, "%s.%06ldZ", base, t->tv_nsec / 1000);
	else
		snprintf(out, size, "%sZ", base);
}

static int parse_digits(const char **p, int n, int *out)
{
	int v = 0, i;

	for (i = 0; i < n; i++) {
		if ((*p)[i] < '0' || (*p)[i] > '9')
			return -1;
		v = v * 10 + ((*p)[i] - '0');
	}
	*p += n;
	*out = v;
	return 0;
}

int kube_time_parse(const char *s, struct timespec *t, struct lp_err *err)
{
	const char *p = s;
	int year, mon, day, hh, mm, ss, oh = 0, om = 0, sign = 0;
	long nsec = 0, scale = 100000000;
	struct tm tm;

	if (parse_digits(&p, 4, &year) || *p++ != '-' || parse_digits(&p, 2, &mon) || *p++ != '-' ||
	    parse_digits(&p, 2, &day) || (*p != 'T' && *p != 't'))
		goto bad;
	p++;
	if (parse_digits(&p, 2, &hh) || *p++ != ':' || parse_digits(&p, 2, &mm) || *p++ != ':' ||
	    parse_digits(&p, 2, &ss))
		goto bad;
	if (*p == '.') {
		p++;
		if (*p < '0' || *p > '9')
			goto bad;
		for (; *p >= '0' && *p <= '9'; p++) {
			nsec += (*p - '0') * scale;
			scale /= 10;
		}
	}
	if (*p == 'Z' || *p == 'z') {
		p++;
	} else if (*p == '+' || *p == '-') {
		sign = *p == '+' ? 1 : -1;
		p++;
		if (parse_digits(&p, 2, &oh) || *p++ != ':' || parse_digits(&p, 2, &om))
			goto bad;
	} else {
		goto bad;
	}
	if (*p || mon < 1 || mon > 12 || day < 1 || day > 31 || hh > 23 || mm > 59 || ss > 60)
		goto bad;
	memset(&tm, 0, sizeof(tm));
	tm.tm_year = year - 1900;
	tm.tm_mon = mon - 1;
	tm.tm_mday = day;
	tm.tm_hour = hh;
	tm.tm_min = mm;
	tm.tm_sec = ss;
	t->tv_sec = timegm(&tm) - sign * (oh * 3600 + om * 60);
	t->tv_nsec = nsec;
	return 0;
bad:
	return lp_errf(err, -EINVAL, "invalid RFC 3339 time '%.64s'", s);
}

double kube_now_wall(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

double kube_now_mono(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

double kube_random(void)
{
	static _Thread_local uint64_t state;

	if (!state) {
		struct timespec ts;

		clock_gettime(CLOCK_MONOTONIC, &ts);
		state = ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec ^
		        ((uint64_t)getpid() << 40) ^ (uint64_t)(uintptr_t)&state;
		if (!state)
			state = 0x9e3779b97f4a7c15ull;
	}
	/* xorshift64* */
	state ^= state >> 12;
	state ^= state << 25;
	state ^= state >> 27;
	return (double)((state * 0x2545f4914f6cdd1dull) >> 11) / 9007199254740992.0;
}
