/* Encodings for the Kubernetes client; see encoding.h. */
#include "operator/kube/encoding.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/evp.h>

static int b64_value(unsigned char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

int kube_base64_decode(const char *text, size_t len, unsigned char **out, size_t *out_len,
                       struct lp_err *err)
{
	unsigned char *dst;
	uint32_t acc = 0;
	size_t n = 0, nbits = 0, pad = 0, i;

	*out = NULL;
	*out_len = 0;
	dst = malloc(len / 4 * 3 + 4);
	if (!dst)
		return lp_errf(err, -ENOMEM, "out of memory");
	for (i = 0; i < len; i++) {
		unsigned char c = (unsigned char)text[i];
		int v;

		if (c == ' ' || c == '\n' || c == '\r' || c == '\t')
			continue;
		if (c == '=') {
			pad++;
			continue;
		}
		v = b64_value(c);
		if (v < 0 || pad) {
			free(dst);
			return lp_errf(err, -EINVAL, "invalid base64 character at offset %zu", i);
		}
		acc = (acc << 6) | (uint32_t)v;
		nbits += 6;
		if (nbits >= 8) {
			nbits -= 8;
			dst[n++] = (unsigned char)(acc >> nbits);
		}
	}
	/* 6 leftover bits cannot come from whole bytes; nor can 3+ pads */
	if (nbits >= 6 || pad > 2) {
		free(dst);
		return lp_errf(err, -EINVAL, "invalid base64 length or padding");
	}
	dst[n] = '\0';
	*out = dst;
	*out_len = n;
	return 0;
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
