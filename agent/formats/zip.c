/* Zip reader; see zip.h. CRC-32 through zlib. */
#include "agent/formats/zip.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "agent/formats/le.h"

#define ZIP_MAX_ENTRIES 1000000u

static int cmp_entry(const void *a, const void *b)
{
	const struct lp_zip_entry *x = a, *y = b;
	size_t n = x->name_len < y->name_len ? x->name_len : y->name_len;
	int c = memcmp(x->name, y->name, n);
	if (c)
		return c;
	return x->name_len < y->name_len ? -1 : x->name_len > y->name_len;
}

struct lp_zip_entry *lp_zip_find(const struct lp_zip *z, const char *name, size_t len)
{
	struct lp_zip_entry key = {.name = name, .name_len = len};
	return bsearch(&key, z->entries, z->n_entries, sizeof(key), cmp_entry);
}

int lp_zip_verify(const struct lp_zip *c, struct lp_zip_entry *e, struct lp_err *err)
{
	uint32_t crc;

	if (e->crc_ok)
		return 0;
	crc = (uint32_t)crc32_z(0, e->data, (z_size_t)e->size);
	if (crc != e->crc)
		return lp_errf(err, -EINVAL,
		               "'%s': entry '%.*s' is corrupted (crc-32 %08x, the directory says "
		               "%08x)",
		               c->label, (int)e->name_len, e->name, crc, e->crc);
	e->crc_ok = true;
	return 0;
}

/* Finds the end of central directory and, through zip64 records when
 * present, the directory's offset, size and entry count. */
static int zip_find_directory(struct lp_zip *c, uint64_t *cd_off, uint64_t *cd_size,
                              uint64_t *count, struct lp_err *err)
{
	const unsigned char *d = c->bytes;
	size_t n = c->size, eocd = SIZE_MAX, lim;

	if (n < 22)
		return lp_errf(err, -EINVAL, "'%s': %zu bytes is too small for a zip archive",
		               c->label, n);
	lim = n - 22 > 65535 ? n - 22 - 65535 : 0;
	for (size_t i = n - 22 + 1; i-- > lim;) {
		if (lp_le32(d + i) == 0x06054b50u && i + 22 + lp_le16(d + i + 20) == n) {
			eocd = i;
			break;
		}
	}
	if (eocd == SIZE_MAX)
		return lp_errf(err, -EINVAL,
		               "'%s': no zip end-of-central-directory record (truncated or not a "
		               "zip archive)",
		               c->label);
	if (lp_le16(d + eocd + 4) != 0 || lp_le16(d + eocd + 6) != 0)
		return lp_errf(err, -EINVAL, "'%s': multi-disk zip archives are not supported",
		               c->label);
	*count = lp_le16(d + eocd + 10);
	*cd_size = lp_le32(d + eocd + 12);
	*cd_off = lp_le32(d + eocd + 16);
	if (eocd >= 20 && lp_le32(d + eocd - 20) == 0x07064b50u) {
		uint64_t z = lp_le64(d + eocd - 20 + 8);

		if (n < 56 || z > n - 56)
			return lp_errf(err, -EINVAL,
			               "'%s': zip64 end record offset %llu is out of range",
			               c->label, (unsigned long long)z);
		if (lp_le32(d + z) != 0x06064b50u)
			return lp_errf(err, -EINVAL, "'%s': zip64 end record is missing at %llu",
			               c->label, (unsigned long long)z);
		if (lp_le32(d + z + 16) != 0 || lp_le32(d + z + 20) != 0)
			return lp_errf(err, -EINVAL,
			               "'%s': multi-disk zip archives are not supported", c->label);
		*count = lp_le64(d + z + 32);
		*cd_size = lp_le64(d + z + 40);
		*cd_off = lp_le64(d + z + 48);
		if (*cd_off > z || *cd_size > z - *cd_off)
			return lp_errf(err, -EINVAL,
			               "'%s': zip central directory [%llu, +%llu) overlaps its end "
			               "record",
			               c->label, (unsigned long long)*cd_off,
			               (unsigned long long)*cd_size);
	} else if (*cd_off > eocd || *cd_size > eocd - *cd_off) {
		return lp_errf(err, -EINVAL,
		               "'%s': zip central directory [%llu, +%llu) runs past its end record",
		               c->label, (unsigned long long)*cd_off, (unsigned long long)*cd_size);
	}
	if (*count > *cd_size / 46) /* a central header takes at least 46 bytes */
		return lp_errf(
		    err, -EINVAL,
		    "'%s': %llu zip entries cannot fit a central directory of %llu bytes", c->label,
		    (unsigned long long)*count, (unsigned long long)*cd_size);
	if (*count > ZIP_MAX_ENTRIES)
		return lp_errf(err, -EINVAL, "'%s': %llu zip entries is over the limit of %u",
		               c->label, (unsigned long long)*count, ZIP_MAX_ENTRIES);
	return 0;
}

/* Reads the zip64 extended information extra field for the header fields
 * that are saturated. */
static int zip64_extra(const struct lp_zip *c, const unsigned char *x, size_t xlen, uint64_t *usize,
                       uint64_t *csize, uint64_t *loff, struct lp_err *err)
{
	bool need_u = *usize == 0xffffffffu, need_c = *csize == 0xffffffffu,
	     need_o = *loff == 0xffffffffu;
	size_t i = 0;

	if (!need_u && !need_c && !need_o)
		return 0;
	while (i + 4 <= xlen) {
		uint16_t id = lp_le16(x + i), len = lp_le16(x + i + 2);
		const unsigned char *f = x + i + 4;
		size_t need = 8 * ((size_t)need_u + need_c + need_o), k = 0;

		if (i + 4 + len > xlen)
			break;
		if (id == 1) {
			if (len < need)
				return lp_errf(err, -EINVAL, "'%s': zip64 extra field is too short",
				               c->label);
			if (need_u)
				*usize = lp_le64(f + 8 * k++);
			if (need_c)
				*csize = lp_le64(f + 8 * k++);
			if (need_o)
				*loff = lp_le64(f + 8 * k++);
			return 0;
		}
		i += 4 + (size_t)len;
	}
	return lp_errf(err, -EINVAL, "'%s': zip entry needs a zip64 extra field it does not have",
	               c->label);
}

int lp_zip_read(struct lp_zip *c, const void *p, size_t n, const char *label, struct lp_err *err)
{
	const unsigned char *d = p;
	uint64_t cd_off = 0, cd_size = 0, count = 0, pos;
	int rc;

	memset(c, 0, sizeof(*c));
	c->label = label;
	c->bytes = p;
	c->size = n;
	rc = zip_find_directory(c, &cd_off, &cd_size, &count, err);
	if (rc)
		return rc;
	c->entries = calloc(count ? count : 1, sizeof(*c->entries));
	if (!c->entries)
		return lp_errf(err, -ENOMEM, "'%s': out of memory", c->label);
	pos = cd_off;
	for (uint64_t i = 0; i < count; i++) {
		struct lp_zip_entry *e = &c->entries[i];
		const unsigned char *h = d + pos;
		uint64_t end = cd_off + cd_size, usize, csize, loff, data_off;
		uint16_t flags, method, nlen, xlen, clen, lnlen, lxlen;

		if (end - pos < 46 || lp_le32(h) != 0x02014b50u)
			return lp_errf(err, -EINVAL, "'%s': zip central header %llu is malformed",
			               c->label, (unsigned long long)i);
		flags = lp_le16(h + 8);
		method = lp_le16(h + 10);
		e->crc = lp_le32(h + 16);
		csize = lp_le32(h + 20);
		usize = lp_le32(h + 24);
		nlen = lp_le16(h + 28);
		xlen = lp_le16(h + 30);
		clen = lp_le16(h + 32);
		loff = lp_le32(h + 42);
		if (end - pos - 46 < (uint64_t)nlen + xlen + clen)
			return lp_errf(err, -EINVAL,
			               "'%s': zip central header %llu runs past the "
			               "directory",
			               c->label, (unsigned long long)i);
		e->name = (const char *)h + 46;
		e->name_len = nlen;
		rc = zip64_extra(c, h + 46 + nlen, xlen, &usize, &csize, &loff, err);
		if (rc)
			return rc;
		if (flags & 1)
			return lp_errf(err, -EINVAL, "'%s': zip entry '%.*s' is encrypted",
			               c->label, (int)nlen, e->name);
		if (method != 0 || csize != usize)
			return lp_errf(err, -EINVAL,
			               "'%s': zip entry '%.*s' is compressed (method %u); torch "
			               "checkpoints store entries uncompressed",
			               c->label, (int)nlen, e->name, method);
		if (memchr(e->name, '\0', nlen))
			return lp_errf(err, -EINVAL, "'%s': zip entry name holds a NUL byte",
			               c->label);
		if (loff > c->size || c->size - loff < 30 || lp_le32(d + loff) != 0x04034b50u)
			return lp_errf(err, -EINVAL,
			               "'%s': zip entry '%.*s' has no local header at %llu",
			               c->label, (int)nlen, e->name, (unsigned long long)loff);
		lnlen = lp_le16(d + loff + 26);
		lxlen = lp_le16(d + loff + 28);
		data_off = loff + 30 + lnlen + lxlen;
		if (lnlen != nlen || c->size - loff - 30 < nlen ||
		    memcmp(d + loff + 30, e->name, nlen) != 0 || data_off > c->size)
			return lp_errf(err, -EINVAL,
			               "'%s': zip entry '%.*s': local header does not match the "
			               "directory",
			               c->label, (int)nlen, e->name);
		if (usize > c->size - data_off)
			return lp_errf(
			    err, -EINVAL,
			    "'%s': zip entry '%.*s' of %llu bytes runs past the end of the "
			    "file (truncated?)",
			    c->label, (int)nlen, e->name, (unsigned long long)usize);
		e->data = d + data_off;
		e->size = usize;
		pos += 46 + (uint64_t)nlen + xlen + clen;
	}
	c->n_entries = count;
	qsort(c->entries, count, sizeof(*c->entries), cmp_entry);
	for (size_t i = 1; i < count; i++) {
		if (cmp_entry(&c->entries[i - 1], &c->entries[i]) == 0)
			return lp_errf(err, -EINVAL, "'%s': zip entry '%.*s' appears twice",
			               c->label, (int)c->entries[i].name_len, c->entries[i].name);
	}
	return 0;
}

void lp_zip_release(struct lp_zip *z)
{
	free(z->entries);
	z->entries = NULL;
	z->n_entries = 0;
}
