/* Tar reader; see tar.h.
 *
 * Header block (512 bytes): name[100] mode[8] uid[8] gid[8] size[12]
 * mtime[12] chksum[8] typeflag[1] linkname[100] magic[6] version[2]
 * uname[32] gname[32] devmajor[8] devminor[8] prefix[155]. Numbers are
 * octal text, or (GNU) big-endian base-256 when the first byte has its high
 * bit set. The checksum is the sum of the header's bytes with the checksum
 * field read as spaces. Data follows, padded to 512; the archive ends with
 * a zero block. */
#include "agent/formats/tar.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TAR_BLOCK        512
#define TAR_MAX_NAME     4096
#define TAR_MAX_PAX      (1u << 20)
#define TAR_MAX_FILESIZE ((uint64_t)1 << 40)

static bool parse_number(const unsigned char *f, size_t len, uint64_t *out)
{
	uint64_t v = 0;
	size_t i = 0;

	if (f[0] & 0x80) { /* base-256 */
		if (f[0] != 0x80)
			return false; /* negative, or too large */
		for (i = 1; i < len; i++) {
			if (v >> 56)
				return false;
			v = v << 8 | f[i];
		}
		*out = v;
		return true;
	}
	while (i < len && f[i] == ' ')
		i++;
	for (; i < len && f[i] >= '0' && f[i] <= '7'; i++) {
		if (v >> 60)
			return false;
		v = v * 8 + (uint64_t)(f[i] - '0');
	}
	for (; i < len; i++) {
		if (f[i] != ' ' && f[i] != '\0')
			return false;
	}
	*out = v;
	return true;
}

static bool checksum_ok(const unsigned char *h)
{
	uint64_t want;
	uint32_t sum_u = 0;
	int32_t sum_s = 0;

	if (!parse_number(h + 148, 8, &want))
		return false;
	for (int i = 0; i < TAR_BLOCK; i++) {
		unsigned char c = i >= 148 && i < 156 ? ' ' : h[i];
		sum_u += c;
		sum_s += (signed char)c;
	}
	return want == sum_u || (int64_t)want == sum_s;
}

static bool is_zero_block(const unsigned char *h)
{
	for (int i = 0; i < TAR_BLOCK; i++) {
		if (h[i])
			return false;
	}
	return true;
}

/* Copies a NUL-padded field. */
static size_t field_len(const unsigned char *f, size_t cap)
{
	const unsigned char *z = memchr(f, '\0', cap);
	return z ? (size_t)(z - f) : cap;
}

static char *normalize(const char *s, size_t n)
{
	char *out;

	while (n >= 2 && s[0] == '.' && s[1] == '/') {
		s += 2;
		n -= 2;
		while (n && *s == '/')
			s++, n--;
	}
	while (n && s[n - 1] == '/')
		n--;
	out = malloc(n + 1);
	if (out) {
		memcpy(out, s, n);
		out[n] = '\0';
	}
	return out;
}

/* A member name that would leave the directory an extracting tool writes
 * to: absolute, or with a ".." component. */
static bool name_escapes(const char *s)
{
	if (*s == '/')
		return true;
	for (const char *p = s; *p; p = strchr(p, '/') ? strchr(p, '/') + 1 : p + strlen(p)) {
		if (p[0] == '.' && p[1] == '.' && (p[2] == '/' || !p[2]))
			return true;
	}
	return false;
}

/* The name of the member whose header is h: the pending long name (taken),
 * else prefix / name from the header. */
static char *member_name(const unsigned char *h, char **long_name)
{
	char full[TAR_MAX_NAME];
	size_t nl = field_len(h, 100), pl = 0;
	char *name = *long_name;

	if (name) {
		*long_name = NULL;
		return name;
	}
	if (!memcmp(h + 257, "ustar\0", 6))
		pl = field_len(h + 345, 155);
	snprintf(full, sizeof(full), "%.*s%s%.*s", (int)pl, (const char *)h + 345, pl ? "/" : "",
	         (int)nl, (const char *)h);
	return normalize(full, strlen(full));
}

/* pax extended header records "LEN key=value\n": picks path and size. */
static int parse_pax(const unsigned char *p, size_t n, char **path, uint64_t *size, bool *has_size,
                     const char *label, struct lp_err *err)
{
	size_t off = 0;

	while (off < n) {
		size_t len = 0, i = off;
		const unsigned char *kv, *eq;

		while (i < n && p[i] >= '0' && p[i] <= '9' && len < TAR_MAX_PAX)
			len = len * 10 + (size_t)(p[i++] - '0');
		if (i >= n || p[i] != ' ' || len <= i - off + 1 || len > n - off ||
		    p[off + len - 1] != '\n')
			return lp_errf(err, -EINVAL, "'%s': malformed pax header record", label);
		kv = p + i + 1;
		eq = memchr(kv, '=', (size_t)(p + off + len - 1 - kv));
		if (!eq)
			return lp_errf(err, -EINVAL, "'%s': malformed pax header record", label);
		if (eq - kv == 4 && !memcmp(kv, "path", 4)) {
			size_t vlen = (size_t)(p + off + len - 1 - (eq + 1));
			if (vlen > TAR_MAX_NAME || memchr(eq + 1, '\0', vlen))
				return lp_errf(err, -EINVAL, "'%s': bad pax path", label);
			free(*path);
			*path = normalize((const char *)eq + 1, vlen);
			if (!*path)
				return lp_errf(err, -ENOMEM, "out of memory");
		} else if (eq - kv == 4 && !memcmp(kv, "size", 4)) {
			uint64_t v = 0;
			const unsigned char *q = eq + 1, *end = p + off + len - 1;
			if (q == end)
				return lp_errf(err, -EINVAL, "'%s': bad pax size", label);
			for (; q < end; q++) {
				if (*q < '0' || *q > '9' || v > TAR_MAX_FILESIZE)
					return lp_errf(err, -EINVAL, "'%s': bad pax size", label);
				v = v * 10 + (uint64_t)(*q - '0');
			}
			*size = v;
			*has_size = true;
		}
		off += len;
	}
	return 0;
}

int lp_tar_read(struct lp_tar *t, const void *data, size_t n, const char *label, struct lp_err *err)
{
	const unsigned char *p = data;
	size_t off = 0, cap = 0;
	char *long_name = NULL;
	uint64_t pax_size = 0;
	bool has_pax_size = false, ended = false;
	int rc = 0;

	memset(t, 0, sizeof(*t));
	if (n >= 2 && p[0] == 0x1f && p[1] == 0x8b)
		return lp_errf(err, -EINVAL,
		               "'%s' is gzip-compressed; only uncompressed tar archives are read",
		               label);
	while (n - off >= TAR_BLOCK) {
		const unsigned char *h = p + off;
		uint64_t size;
		size_t data_off = off + TAR_BLOCK, padded;
		char type = (char)h[156];

		if (is_zero_block(h)) {
			ended = true;
			break;
		}
		if (!checksum_ok(h)) {
			rc = lp_errf(
			    err, -EINVAL,
			    "'%s': tar header at offset %zu has a bad checksum (corrupted or "
			    "not a tar archive)",
			    label, off);
			goto out;
		}
		if (!parse_number(h + 124, 12, &size) || size > TAR_MAX_FILESIZE) {
			rc = lp_errf(err, -EINVAL, "'%s': tar header at offset %zu has a bad size",
			             label, off);
			goto out;
		}
		if (has_pax_size)
			size = pax_size;
		if (size > n - data_off) {
			rc = lp_errf(
			    err, -EINVAL,
			    "'%s': tar member at offset %zu of %llu bytes runs past the end "
			    "of the archive (truncated?)",
			    label, off, (unsigned long long)size);
			goto out;
		}
		padded = (size_t)((size + TAR_BLOCK - 1) / TAR_BLOCK * TAR_BLOCK);
		switch (type) {
		case 'L': /* GNU long name for the next member */
			if (size == 0 || size > TAR_MAX_NAME) {
				rc = lp_errf(err, -EINVAL, "'%s': bad gnu long name", label);
				goto out;
			}
			free(long_name);
			long_name = normalize((const char *)p + data_off,
			                      field_len(p + data_off, (size_t)size));
			if (!long_name) {
				rc = lp_errf(err, -ENOMEM, "out of memory");
				goto out;
			}
			break;
		case 'x': /* pax header for the next member */
			if (size > TAR_MAX_PAX) {
				rc = lp_errf(err, -EINVAL, "'%s': pax header too large", label);
				goto out;
			}
			rc = parse_pax(p + data_off, (size_t)size, &long_name, &pax_size,
			               &has_pax_size, label, err);
			if (rc)
				goto out;
			break;
		case 'g': /* pax global header: nothing we use */
		case 'K': /* GNU long link name */
			break;
		case '0':
		case '\0':
		case '7': {
			struct lp_tar_member *m;
			char *name = member_name(h, &long_name);

			if (!name) {
				rc = lp_errf(err, -ENOMEM, "out of memory");
				goto out;
			}
			if (name_escapes(name)) {
				rc = lp_errf(err, -EINVAL,
				             "'%s': tar member '%.200s' is an absolute path or "
				             "leads out of the archive with '..'",
				             label, name);
				free(name);
				goto out;
			}
			if (t->n == LP_TAR_MAX_MEMBERS) {
				free(name);
				rc = lp_errf(err, -EINVAL, "'%s': more than %d tar members", label,
				             LP_TAR_MAX_MEMBERS);
				goto out;
			}
			if (t->n == cap) {
				size_t nc = cap ? cap * 2 : 8;
				m = realloc(t->members, nc * sizeof(*m));
				if (!m) {
					free(name);
					rc = lp_errf(err, -ENOMEM, "out of memory");
					goto out;
				}
				t->members = m;
				cap = nc;
			}
			m = &t->members[t->n];
			m->name = name;
			m->data = p + data_off;
			m->size = (size_t)size;
			t->n++;
			has_pax_size = false;
			break;
		}
		case '1':
		case '2':
		case '3':
		case '4':
		case '6': { /* a link or device could stand in for a member read */
			static const char *const kinds[] = {"hard link",        "symbolic link",
			                                    "character device", "block device",
			                                    "directory",        "fifo"};
			char *name = member_name(h, &long_name);

			rc = lp_errf(
			    err, -EINVAL,
			    "'%s': tar member '%.200s' is a %s; a .nemo holds regular files "
			    "and directories only",
			    label, name ? name : "?", kinds[type - '1']);
			free(name);
			goto out;
		}
		case '5': {
			char *name = member_name(h, &long_name);
			bool bad = name && name_escapes(name);

			if (bad)
				rc = lp_errf(
				    err, -EINVAL,
				    "'%s': tar member '%.200s' is an absolute path or leads "
				    "out of the archive with '..'",
				    label, name);
			free(name);
			if (bad)
				goto out;
			has_pax_size = false;
			break;
		}
		default:
			rc = lp_errf(err, -EINVAL,
			             "'%s': tar member type '%c' at offset %zu is not "
			             "supported",
			             label, type, off);
			goto out;
		}
		if (padded > n - data_off) {
			rc = lp_errf(err, -EINVAL, "'%s': tar archive is truncated at offset %zu",
			             label, data_off);
			goto out;
		}
		off = data_off + padded;
	}
	if (!ended)
		rc = lp_errf(err, -EINVAL,
		             "'%s': tar archive is truncated (no end-of-archive block after %zu "
		             "bytes)",
		             label, off);
out:
	free(long_name);
	return rc;
}

void lp_tar_release(struct lp_tar *t)
{
	for (size_t i = 0; i < t->n; i++)
		free(t->members[i].name);
	free(t->members);
	memset(t, 0, sizeof(*t));
}

const struct lp_tar_member *lp_tar_find(const struct lp_tar *t, const char *name)
{
	for (size_t i = 0; i < t->n; i++) {
		if (!strcmp(t->members[i].name, name))
			return &t->members[i];
	}
	return NULL;
}
