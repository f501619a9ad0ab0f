/* PyTorch zip checkpoints without Python; see torch-checkpoint.h.
 *
 * Zip: the end-of-central-directory record (and its zip64 locator and
 * record when torch writes them, which it always does now) gives the
 * central directory; each central header gives an entry's sizes, CRC-32
 * and local header offset, with a zip64 extra field (id 1) holding, in
 * order, whichever of uncompressed size, compressed size and local offset
 * are 0xffffffff in the header. torch writes stored entries with sizes in a
 * trailing data descriptor (flag bit 3), so only the central sizes count.
 *
 * Pickle: a stack machine over protocol 2 (plus the few protocol 3/4
 * opcodes a newer writer might use). Values live in an arena of nodes;
 * containers hold node indices, so the memo shares them the way Python
 * does. Every count is bounded before anything grows. */
#include "agent/adapters/torch-checkpoint.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/mapped-file.h"

#define ZIP_MAX_ENTRIES  1000000u
#define PKL_MAX_BYTES    (64u << 20)
#define PKL_MAX_NODES    (1u << 21)
#define PKL_MAX_STACK    (1u << 20)
#define PKL_MAX_MARKS    4096u
#define PKL_MAX_MEMO     (1u << 21)
#define PKL_MAX_KIDS     (1u << 22) /* children of all containers together */
#define CKPT_MAX_TENSORS 1000000u

struct zip_entry {
	const char *name; /* inside the archive bytes, not NUL-terminated */
	size_t name_len;
	const unsigned char *data;
	uint64_t size;
	uint32_t crc;
	bool crc_ok;
};

struct lp_torch_ckpt {
	struct lp_mapped_file mf; /* when opened from a path */
	char *label;
	const unsigned char *bytes;
	size_t size;
	struct zip_entry *entries; /* sorted by name */
	size_t n_entries;
	struct lp_torch_tensor *tensors;
	size_t n_tensors;
	uint32_t crc_table[8][256];
};

static uint16_t rd16(const unsigned char *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t rd32(const unsigned char *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t rd64(const unsigned char *p)
{
	return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32;
}

/* CRC-32 (IEEE, reflected), eight bytes at a time. */
static void crc_init(uint32_t t[8][256])
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
		t[0][i] = c;
	}
	for (uint32_t i = 0; i < 256; i++)
		for (int k = 1; k < 8; k++)
			t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xff];
}

static uint32_t crc32_of(uint32_t t[8][256], const unsigned char *p, uint64_t n)
{
	uint32_t c = 0xffffffffu;

	while (n >= 8) {
		uint32_t lo = rd32(p) ^ c, hi = rd32(p + 4);
		c = t[7][lo & 0xff] ^ t[6][(lo >> 8) & 0xff] ^ t[5][(lo >> 16) & 0xff] ^
		    t[4][lo >> 24] ^ t[3][hi & 0xff] ^ t[2][(hi >> 8) & 0xff] ^
		    t[1][(hi >> 16) & 0xff] ^ t[0][hi >> 24];
		p += 8;
		n -= 8;
	}
	while (n--)
		c = t[0][(c ^ *p++) & 0xff] ^ (c >> 8);
	return c ^ 0xffffffffu;
}

static int cmp_entry(const void *a, const void *b)
{
	const struct zip_entry *x = a, *y = b;
	size_t n = x->name_len < y->name_len ? x->name_len : y->name_len;
	int c = memcmp(x->name, y->name, n);
	if (c)
		return c;
	return x->name_len < y->name_len ? -1 : x->name_len > y->name_len;
}

static struct zip_entry *zip_find(struct lp_torch_ckpt *c, const char *name, size_t len)
{
	struct zip_entry key = {.name = name, .name_len = len};
	return bsearch(&key, c->entries, c->n_entries, sizeof(key), cmp_entry);
}

/* The entry's bytes, CRC-checked on first use. */
static int zip_verify(struct lp_torch_ckpt *c, struct zip_entry *e, struct lp_err *err)
{
	uint32_t crc;

	if (e->crc_ok)
		return 0;
	crc = crc32_of(c->crc_table, e->data, e->size);
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
static int zip_find_directory(struct lp_torch_ckpt *c, uint64_t *cd_off, uint64_t *cd_size,
                              uint64_t *count, struct lp_err *err)
{
	const unsigned char *d = c->bytes;
	size_t n = c->size, eocd = SIZE_MAX, lim;

	if (n < 22)
		return lp_errf(err, -EINVAL, "'%s': %zu bytes is too small for a zip archive",
		               c->label, n);
	lim = n - 22 > 65535 ? n - 22 - 65535 : 0;
	for (size_t i = n - 22 + 1; i-- > lim;) {
		if (rd32(d + i) == 0x06054b50u && i + 22 + rd16(d + i + 20) == n) {
			eocd = i;
			break;
		}
	}
	if (eocd == SIZE_MAX)
		return lp_errf(err, -EINVAL,
		               "'%s': no zip end-of-central-directory record (truncated or not a "
		               "zip archive)",
		               c->label);
	if (rd16(d + eocd + 4) != 0 || rd16(d + eocd + 6) != 0)
		return lp_errf(err, -EINVAL, "'%s': multi-disk zip archives are not supported",
		               c->label);
	*count = rd16(d + eocd + 10);
	*cd_size = rd32(d + eocd + 12);
	*cd_off = rd32(d + eocd + 16);
	if (eocd >= 20 && rd32(d + eocd - 20) == 0x07064b50u) {
		uint64_t z = rd64(d + eocd - 20 + 8);

		if (n < 56 || z > n - 56)
			return lp_errf(err, -EINVAL,
			               "'%s': zip64 end record offset %llu is out of range",
			               c->label, (unsigned long long)z);
		if (rd32(d + z) != 0x06064b50u)
			return lp_errf(err, -EINVAL, "'%s': zip64 end record is missing at %llu",
			               c->label, (unsigned long long)z);
		if (rd32(d + z + 16) != 0 || rd32(d + z + 20) != 0)
			return lp_errf(err, -EINVAL,
			               "'%s': multi-disk zip archives are not supported", c->label);
		*count = rd64(d + z + 32);
		*cd_size = rd64(d + z + 40);
		*cd_off = rd64(d + z + 48);
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
static int zip64_extra(const struct lp_torch_ckpt *c, const unsigned char *x, size_t xlen,
                       uint64_t *usize, uint64_t *csize, uint64_t *loff, struct lp_err *err)
{
	bool need_u = *usize == 0xffffffffu, need_c = *csize == 0xffffffffu,
	     need_o = *loff == 0xffffffffu;
	size_t i = 0;

	if (!need_u && !need_c && !need_o)
		return 0;
	while (i + 4 <= xlen) {
		uint16_t id = rd16(x + i), len = rd16(x + i + 2);
		const unsigned char *f = x + i + 4;
		size_t need = 8 * ((size_t)need_u + need_c + need_o), k = 0;

		if (i + 4 + len > xlen)
			break;
		if (id == 1) {
			if (len < need)
				return lp_errf(err, -EINVAL, "'%s': zip64 extra field is too short",
				               c->label);
			if (need_u)
				*usize = rd64(f + 8 * k++);
			if (need_c)
				*csize = rd64(f + 8 * k++);
			if (need_o)
				*loff = rd64(f + 8 * k++);
			return 0;
		}
		i += 4 + (size_t)len;
	}
	return lp_errf(err, -EINVAL, "'%s': zip entry needs a zip64 extra field it does not have",
	               c->label);
}

static int zip_read(struct lp_torch_ckpt *c, struct lp_err *err)
{
	const unsigned char *d = c->bytes;
	uint64_t cd_off = 0, cd_size = 0, count = 0, pos;
	int rc;

	if (c->size >= 2 && d[0] == 0x80 && d[1] <= 5)
		return lp_errf(
		    err, -EINVAL,
		    "'%s': legacy (non-zip) torch checkpoints are not supported; re-save "
		    "it with torch 1.6 or later",
		    c->label);
	if (c->size < 4 || rd32(d) != 0x04034b50u)
		return lp_errf(err, -EINVAL,
		               "'%s': not a pytorch zip checkpoint (no zip signature)", c->label);
	rc = zip_find_directory(c, &cd_off, &cd_size, &count, err);
	if (rc)
		return rc;
	c->entries = calloc(count ? count : 1, sizeof(*c->entries));
	if (!c->entries)
		return lp_errf(err, -ENOMEM, "'%s': out of memory", c->label);
	pos = cd_off;
	for (uint64_t i = 0; i < count; i++) {
		struct zip_entry *e = &c->entries[i];
		const unsigned char *h = d + pos;
		uint64_t end = cd_off + cd_size, usize, csize, loff, data_off;
		uint16_t flags, method, nlen, xlen, clen, lnlen, lxlen;

		if (end - pos < 46 || rd32(h) != 0x02014b50u)
			return lp_errf(err, -EINVAL, "'%s': zip central header %llu is malformed",
			               c->label, (unsigned long long)i);
		flags = rd16(h + 8);
		method = rd16(h + 10);
		e->crc = rd32(h + 16);
		csize = rd32(h + 20);
		usize = rd32(h + 24);
		nlen = rd16(h + 28);
		xlen = rd16(h + 30);
		clen = rd16(h + 32);
		loff = rd32(h + 42);
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
		if (loff > c->size || c->size - loff < 30 || rd32(d + loff) != 0x04034b50u)
			return lp_errf(err, -EINVAL,
			               "'%s': zip entry '%.*s' has no local header at %llu",
			               c->label, (int)nlen, e->name, (unsigned long long)loff);
		lnlen = rd16(d + loff + 26);
		lxlen = rd16(d + loff + 28);
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

/* ---- pickle ---- */

enum pk_kind {
	PK_NONE,
	PK_BOOL,
	PK_INT,
	PK_FLOAT,
	PK_STR,
	PK_TUPLE,
	PK_LIST,
	PK_DICT, /* kids: key, value, key, value ... */
	PK_GLOBAL,
	PK_STORAGE,
	PK_TENSOR, /* i: node of _rebuild_tensor_v2's argument tuple */
};

enum pk_global {
	G_REBUILD_TENSOR_V2,
	G_REBUILD_PARAMETER,
	G_ORDERED_DICT,
	G_STORAGE, /* storage class; dtype says which */
};

struct pk_node {
	uint8_t kind;
	uint8_t global; /* PK_GLOBAL */
	uint8_t dtype;  /* PK_GLOBAL storage class, PK_STORAGE */
	uint32_t len;   /* PK_STR bytes; containers: kids used */
	uint32_t cap;   /* containers: kids allocated */
	int64_t i;      /* PK_INT, PK_BOOL, PK_STORAGE numel, PK_TENSOR args */
	const char *s;  /* PK_STR, PK_STORAGE key; inside the pickle */
	uint32_t *kids;
};

struct pk_vm {
	const struct lp_torch_ckpt *c;
	const unsigned char *p;
	size_t n, pos;
	struct pk_node *nodes;
	uint32_t n_nodes, cap_nodes;
	uint32_t *stack;
	uint32_t sp, cap_stack;
	uint32_t marks[PKL_MAX_MARKS];
	uint32_t n_marks;
	uint32_t *memo;
	uint32_t cap_memo, memo_len;
	size_t total_kids;
	struct lp_err *err;
};

#define NO_NODE UINT32_MAX

static int vm_fail(struct pk_vm *vm, const char *what)
{
	return lp_errf(vm->err, -EINVAL, "'%s': data.pkl: %s at offset %zu", vm->c->label, what,
	               vm->pos);
}

static int vm_new(struct pk_vm *vm, enum pk_kind kind, uint32_t *out)
{
	if (vm->n_nodes == vm->cap_nodes) {
		uint32_t cap = vm->cap_nodes ? vm->cap_nodes * 2 : 256;
		struct pk_node *n;

		if (vm->cap_nodes >= PKL_MAX_NODES)
			return vm_fail(vm, "too many objects");
		if (cap > PKL_MAX_NODES)
			cap = PKL_MAX_NODES;
		n = realloc(vm->nodes, (size_t)cap * sizeof(*n));
		if (!n)
			return lp_errf(vm->err, -ENOMEM, "out of memory reading '%s'",
			               vm->c->label);
		vm->nodes = n;
		vm->cap_nodes = cap;
	}
	memset(&vm->nodes[vm->n_nodes], 0, sizeof(struct pk_node));
	vm->nodes[vm->n_nodes].kind = (uint8_t)kind;
	*out = vm->n_nodes++;
	return 0;
}

static int vm_push(struct pk_vm *vm, uint32_t node)
{
	if (vm->sp == vm->cap_stack) {
		uint32_t cap = vm->cap_stack ? vm->cap_stack * 2 : 256, *s;

		if (vm->cap_stack >= PKL_MAX_STACK)
			return vm_fail(vm, "stack too deep");
		s = realloc(vm->stack, (size_t)cap * sizeof(*s));
		if (!s)
			return lp_errf(vm->err, -ENOMEM, "out of memory reading '%s'",
			               vm->c->label);
		vm->stack = s;
		vm->cap_stack = cap;
	}
	vm->stack[vm->sp++] = node;
	return 0;
}

static int vm_push_new(struct pk_vm *vm, enum pk_kind kind, uint32_t *out)
{
	uint32_t id;
	int rc = vm_new(vm, kind, &id);
	if (rc)
		return rc;
	if (out)
		*out = id;
	return vm_push(vm, id);
}

/* The bottom of the current frame: values above the last MARK. */
static uint32_t vm_floor(const struct pk_vm *vm)
{
	return vm->n_marks ? vm->marks[vm->n_marks - 1] : 0;
}

static int vm_pop(struct pk_vm *vm, uint32_t *out)
{
	if (vm->sp <= vm_floor(vm))
		return vm_fail(vm, "stack underflow");
	*out = vm->stack[--vm->sp];
	return 0;
}

static int vm_top(struct pk_vm *vm, uint32_t *out)
{
	if (vm->sp <= vm_floor(vm))
		return vm_fail(vm, "stack underflow");
	*out = vm->stack[vm->sp - 1];
	return 0;
}

static int vm_add_kid(struct pk_vm *vm, uint32_t parent, uint32_t kid)
{
	struct pk_node *n = &vm->nodes[parent];

	if (vm->total_kids >= PKL_MAX_KIDS)
		return vm_fail(vm, "too many container items");
	if (n->len == n->cap) {
		uint32_t cap = n->cap ? n->cap * 2 : 4, *k;
		k = realloc(n->kids, (size_t)cap * sizeof(*k));
		if (!k)
			return lp_errf(vm->err, -ENOMEM, "out of memory reading '%s'",
			               vm->c->label);
		n->kids = k;
		n->cap = cap;
	}
	n->kids[n->len++] = kid;
	vm->total_kids++;
	return 0;
}

/* Pops the values above the last MARK (and the mark) into a new container
 * of kind, or appends them to the container below the mark. */
static int vm_pop_mark(struct pk_vm *vm, uint32_t *first, uint32_t *count)
{
	if (!vm->n_marks)
		return vm_fail(vm, "no mark on the stack");
	*first = vm->marks[--vm->n_marks];
	*count = vm->sp - *first;
	return 0;
}

static int vm_tuple(struct pk_vm *vm, uint32_t first, uint32_t count)
{
	uint32_t t;
	int rc = vm_new(vm, PK_TUPLE, &t);

	for (uint32_t i = 0; !rc && i < count; i++)
		rc = vm_add_kid(vm, t, vm->stack[first + i]);
	if (rc)
		return rc;
	vm->sp = first;
	return vm_push(vm, t);
}

static int vm_need(struct pk_vm *vm, size_t k)
{
	if (vm->n - vm->pos < k)
		return vm_fail(vm, "truncated pickle");
	return 0;
}

static int vm_memo_put(struct pk_vm *vm, uint64_t key)
{
	uint32_t top = 0;
	int rc;

	rc = vm_top(vm, &top);
	if (rc)
		return rc;
	if (key >= PKL_MAX_MEMO)
		return vm_fail(vm, "memo key too large");
	if (key >= vm->cap_memo) {
		uint32_t cap = vm->cap_memo ? vm->cap_memo : 64, *m;
		while (cap <= key)
			cap *= 2;
		m = realloc(vm->memo, (size_t)cap * sizeof(*m));
		if (!m)
			return lp_errf(vm->err, -ENOMEM, "out of memory reading '%s'",
			               vm->c->label);
		for (uint32_t i = vm->cap_memo; i < cap; i++)
			m[i] = NO_NODE;
		vm->memo = m;
		vm->cap_memo = cap;
	}
	if (vm->memo[key] == NO_NODE)
		vm->memo_len++;
	vm->memo[key] = top;
	return 0;
}

static int vm_memo_get(struct pk_vm *vm, uint64_t key)
{
	if (key >= vm->cap_memo || vm->memo[key] == NO_NODE)
		return vm_fail(vm, "memo key not set");
	return vm_push(vm, vm->memo[key]);
}

static const struct {
	const char *name;
	enum lp_st_dtype dtype;
} storage_classes[] = {
    {"FloatStorage", LP_ST_F32},  {"HalfStorage", LP_ST_F16}, {"BFloat16Storage", LP_ST_BF16},
    {"DoubleStorage", LP_ST_F64}, {"LongStorage", LP_ST_I64}, {"IntStorage", LP_ST_I32},
    {"ShortStorage", LP_ST_I16},  {"CharStorage", LP_ST_I8},  {"ByteStorage", LP_ST_U8},
    {"BoolStorage", LP_ST_BOOL},
};

static bool str_is(const char *s, size_t n, const char *lit)
{
	return strlen(lit) == n && memcmp(s, lit, n) == 0;
}

static int vm_global(struct pk_vm *vm, const char *mod, size_t mlen, const char *name, size_t nlen)
{
	uint32_t g;
	int rc = vm_push_new(vm, PK_GLOBAL, &g);
	struct pk_node *n;

	if (rc)
		return rc;
	n = &vm->nodes[g];
	if (str_is(mod, mlen, "torch._utils") && str_is(name, nlen, "_rebuild_tensor_v2")) {
		n->global = G_REBUILD_TENSOR_V2;
		return 0;
	}
	if (str_is(mod, mlen, "torch._utils") && str_is(name, nlen, "_rebuild_parameter")) {
		n->global = G_REBUILD_PARAMETER;
		return 0;
	}
	if (str_is(mod, mlen, "collections") && str_is(name, nlen, "OrderedDict")) {
		n->global = G_ORDERED_DICT;
		return 0;
	}
	if (str_is(mod, mlen, "torch")) {
		for (size_t i = 0; i < sizeof(storage_classes) / sizeof(storage_classes[0]); i++) {
			if (str_is(name, nlen, storage_classes[i].name)) {
				n->global = G_STORAGE;
				n->dtype = (uint8_t)storage_classes[i].dtype;
				return 0;
			}
		}
	}
	return lp_errf(vm->err, -EINVAL,
	               "'%s': data.pkl: unsupported global '%.*s.%.*s' at offset %zu (only "
	               "tensors in a dict are accepted)",
	               vm->c->label, (int)(mlen > 100 ? 100 : mlen), mod,
	               (int)(nlen > 100 ? 100 : nlen), name, vm->pos);
}

static bool is_int_tuple(const struct pk_vm *vm, uint32_t t, size_t max)
{
	const struct pk_node *n = &vm->nodes[t];

	if (n->kind != PK_TUPLE || n->len > max)
		return false;
	for (uint32_t i = 0; i < n->len; i++) {
		if (vm->nodes[n->kids[i]].kind != PK_INT)
			return false;
	}
	return true;
}

static int vm_reduce(struct pk_vm *vm)
{
	uint32_t args = 0, fn = 0, out;
	const struct pk_node *f, *a;
	int rc;

	if ((rc = vm_pop(vm, &args)) || (rc = vm_pop(vm, &fn)))
		return rc;
	f = &vm->nodes[fn];
	a = &vm->nodes[args];
	if (f->kind != PK_GLOBAL || a->kind != PK_TUPLE)
		return vm_fail(vm, "REDUCE of something that is not a known global");
	switch (f->global) {
	case G_ORDERED_DICT:
		if (a->len != 0)
			return vm_fail(vm, "OrderedDict called with arguments");
		return vm_push_new(vm, PK_DICT, NULL);
	case G_REBUILD_PARAMETER:
		if (a->len < 1 || vm->nodes[a->kids[0]].kind != PK_TENSOR)
			return vm_fail(vm, "_rebuild_parameter without a tensor");
		return vm_push(vm, a->kids[0]);
	case G_REBUILD_TENSOR_V2:
		if (a->len != 6 && a->len != 7)
			return vm_fail(vm, "_rebuild_tensor_v2 with an unexpected argument count");
		if (vm->nodes[a->kids[0]].kind != PK_STORAGE ||
		    vm->nodes[a->kids[1]].kind != PK_INT ||
		    !is_int_tuple(vm, a->kids[2], LP_ST_MAX_DIMS) ||
		    !is_int_tuple(vm, a->kids[3], LP_ST_MAX_DIMS) ||
		    vm->nodes[a->kids[2]].len != vm->nodes[a->kids[3]].len)
			return vm_fail(vm, "_rebuild_tensor_v2 with unexpected arguments (storage, "
			                   "offset, size, stride)");
		if ((rc = vm_push_new(vm, PK_TENSOR, &out)))
			return rc;
		vm->nodes[out].i = args;
		return 0;
	default:
		return vm_fail(vm, "REDUCE of a storage class");
	}
}

static int vm_persid(struct pk_vm *vm)
{
	uint32_t pid = 0, s;
	const struct pk_node *t, *k0, *cls, *key, *numel;
	int rc;

	if ((rc = vm_pop(vm, &pid)))
		return rc;
	t = &vm->nodes[pid];
	if (t->kind != PK_TUPLE || t->len != 5)
		return vm_fail(vm, "persistent id is not a 5-tuple");
	k0 = &vm->nodes[t->kids[0]];
	cls = &vm->nodes[t->kids[1]];
	key = &vm->nodes[t->kids[2]];
	numel = &vm->nodes[t->kids[4]];
	if (k0->kind != PK_STR || !str_is(k0->s, k0->len, "storage") || cls->kind != PK_GLOBAL ||
	    cls->global != G_STORAGE || key->kind != PK_STR || key->len == 0 || key->len > 64 ||
	    numel->kind != PK_INT || numel->i < 0)
		return vm_fail(vm, "persistent id is not ('storage', class, key, location, numel)");
	if ((rc = vm_push_new(vm, PK_STORAGE, &s)))
		return rc;
	vm->nodes[s].dtype = cls->dtype;
	vm->nodes[s].s = key->s;
	vm->nodes[s].len = key->len;
	vm->nodes[s].i = numel->i;
	return 0;
}

static int vm_str(struct pk_vm *vm, size_t len)
{
	uint32_t s;
	int rc;

	if (len > UINT32_MAX)
		return vm_fail(vm, "string too long");
	if ((rc = vm_need(vm, len)) || (rc = vm_push_new(vm, PK_STR, &s)))
		return rc;
	vm->nodes[s].s = (const char *)vm->p + vm->pos;
	vm->nodes[s].len = (uint32_t)len;
	vm->pos += len;
	return 0;
}

static int vm_int(struct pk_vm *vm, int64_t v)
{
	uint32_t s;
	int rc = vm_push_new(vm, PK_INT, &s);
	if (!rc)
		vm->nodes[s].i = v;
	return rc;
}

/* Reads a newline-terminated line (GLOBAL's arguments). */
static int vm_line(struct pk_vm *vm, const char **s, size_t *len)
{
	const unsigned char *nl = memchr(vm->p + vm->pos, '\n', vm->n - vm->pos);

	if (!nl)
		return vm_fail(vm, "truncated pickle");
	*s = (const char *)vm->p + vm->pos;
	*len = (size_t)(nl - (vm->p + vm->pos));
	vm->pos += *len + 1;
	return 0;
}

static int vm_setitems(struct pk_vm *vm, uint32_t dict, uint32_t first, uint32_t count)
{
	int rc = 0;

	if (vm->nodes[dict].kind != PK_DICT)
		return vm_fail(vm, "SETITEM on something that is not a dict");
	if (count % 2)
		return vm_fail(vm, "SETITEMS with an odd number of values");
	for (uint32_t i = 0; !rc && i < count; i++)
		rc = vm_add_kid(vm, dict, vm->stack[first + i]);
	vm->sp = first;
	return rc;
}

static int vm_appends(struct pk_vm *vm, uint32_t list, uint32_t first, uint32_t count)
{
	int rc = 0;

	if (vm->nodes[list].kind != PK_LIST)
		return vm_fail(vm, "APPEND on something that is not a list");
	for (uint32_t i = 0; !rc && i < count; i++)
		rc = vm_add_kid(vm, list, vm->stack[first + i]);
	vm->sp = first;
	return rc;
}

/* Runs the pickle to STOP; *result is the node left on the stack. */
static int vm_run(struct pk_vm *vm, uint32_t *result)
{
	uint32_t a = 0, b = 0, first = 0, count = 0;
	const char *s1, *s2;
	size_t l1, l2;
	int rc = 0;

	while (!rc) {
		unsigned char op;

		if ((rc = vm_need(vm, 1)))
			return rc;
		op = vm->p[vm->pos++];
		switch (op) {
		case 0x80: /* PROTO */
			if ((rc = vm_need(vm, 1)))
				return rc;
			if (vm->p[vm->pos] > 5)
				return vm_fail(vm, "unsupported pickle protocol");
			vm->pos++;
			break;
		case 0x95: /* FRAME: a length hint only */
			rc = vm_need(vm, 8);
			vm->pos += 8;
			break;
		case '}': /* EMPTY_DICT */
			rc = vm_push_new(vm, PK_DICT, NULL);
			break;
		case ']': /* EMPTY_LIST */
			rc = vm_push_new(vm, PK_LIST, NULL);
			break;
		case ')': /* EMPTY_TUPLE */
			rc = vm_push_new(vm, PK_TUPLE, NULL);
			break;
		case '(': /* MARK */
			if (vm->n_marks == PKL_MAX_MARKS)
				return vm_fail(vm, "marks nested too deep");
			vm->marks[vm->n_marks++] = vm->sp;
			break;
		case 'X': /* BINUNICODE */
		case 'B': /* BINBYTES */
			if ((rc = vm_need(vm, 4)))
				return rc;
			l1 = rd32(vm->p + vm->pos);
			vm->pos += 4;
			rc = vm_str(vm, l1);
			break;
		case 0x8c: /* SHORT_BINUNICODE */
		case 'C':  /* SHORT_BINBYTES */
		case 'U':  /* SHORT_BINSTRING */
			if ((rc = vm_need(vm, 1)))
				return rc;
			l1 = vm->p[vm->pos++];
			rc = vm_str(vm, l1);
			break;
		case 0x8d: /* BINUNICODE8 */
			if ((rc = vm_need(vm, 8)))
				return rc;
			if (rd64(vm->p + vm->pos) > vm->n)
				return vm_fail(vm, "truncated pickle");
			l1 = (size_t)rd64(vm->p + vm->pos);
			vm->pos += 8;
			rc = vm_str(vm, l1);
			break;
		case 'c': /* GLOBAL */
			if ((rc = vm_line(vm, &s1, &l1)) || (rc = vm_line(vm, &s2, &l2)))
				return rc;
			rc = vm_global(vm, s1, l1, s2, l2);
			break;
		case 0x93: /* STACK_GLOBAL */
			if ((rc = vm_pop(vm, &b)) || (rc = vm_pop(vm, &a)))
				return rc;
			if (vm->nodes[a].kind != PK_STR || vm->nodes[b].kind != PK_STR)
				return vm_fail(vm, "STACK_GLOBAL of non-strings");
			rc = vm_global(vm, vm->nodes[a].s, vm->nodes[a].len, vm->nodes[b].s,
			               vm->nodes[b].len);
			break;
		case 'Q': /* BINPERSID */
			rc = vm_persid(vm);
			break;
		case 'J': /* BININT */
			if ((rc = vm_need(vm, 4)))
				return rc;
			rc = vm_int(vm, (int32_t)rd32(vm->p + vm->pos));
			vm->pos += 4;
			break;
		case 'K': /* BININT1 */
			if ((rc = vm_need(vm, 1)))
				return rc;
			rc = vm_int(vm, vm->p[vm->pos]);
			vm->pos += 1;
			break;
		case 'M': /* BININT2 */
			if ((rc = vm_need(vm, 2)))
				return rc;
			rc = vm_int(vm, rd16(vm->p + vm->pos));
			vm->pos += 2;
			break;
		case 0x8a: { /* LONG1 */
			uint64_t v = 0;
			if ((rc = vm_need(vm, 1)))
				return rc;
			l1 = vm->p[vm->pos++];
			if (l1 > 8)
				return vm_fail(vm, "integer wider than 64 bits");
			if ((rc = vm_need(vm, l1)))
				return rc;
			for (size_t i = 0; i < l1; i++)
				v |= (uint64_t)vm->p[vm->pos + i] << (8 * i);
			if (l1 && l1 < 8 && (vm->p[vm->pos + l1 - 1] & 0x80))
				v |= ~(uint64_t)0 << (8 * l1);
			vm->pos += l1;
			rc = vm_int(vm, (int64_t)v);
			break;
		}
		case 'G': /* BINFLOAT: kept only as a value in metadata */
			if ((rc = vm_need(vm, 8)))
				return rc;
			vm->pos += 8;
			rc = vm_push_new(vm, PK_FLOAT, NULL);
			break;
		case 't': /* TUPLE */
			if ((rc = vm_pop_mark(vm, &first, &count)))
				return rc;
			rc = vm_tuple(vm, first, count);
			break;
		case 0x85: /* TUPLE1 */
		case 0x86: /* TUPLE2 */
		case 0x87: /* TUPLE3 */
			count = (uint32_t)(op - 0x84);
			if (vm->sp - vm_floor(vm) < count)
				return vm_fail(vm, "stack underflow");
			rc = vm_tuple(vm, vm->sp - count, count);
			break;
		case 0x88: /* NEWTRUE */
		case 0x89: /* NEWFALSE */
			if ((rc = vm_push_new(vm, PK_BOOL, &a)))
				return rc;
			vm->nodes[a].i = op == 0x88;
			break;
		case 'N': /* NONE */
			rc = vm_push_new(vm, PK_NONE, NULL);
			break;
		case 'R': /* REDUCE */
			rc = vm_reduce(vm);
			break;
		case 's': /* SETITEM */
			if (vm->sp - vm_floor(vm) < 3)
				return vm_fail(vm, "stack underflow");
			rc = vm_setitems(vm, vm->stack[vm->sp - 3], vm->sp - 2, 2);
			break;
		case 'u': /* SETITEMS */
			if ((rc = vm_pop_mark(vm, &first, &count)))
				return rc;
			if (first <= vm_floor(vm))
				return vm_fail(vm, "SETITEMS without a dict");
			rc = vm_setitems(vm, vm->stack[first - 1], first, count);
			break;
		case 'a': /* APPEND */
			if (vm->sp - vm_floor(vm) < 2)
				return vm_fail(vm, "stack underflow");
			rc = vm_appends(vm, vm->stack[vm->sp - 2], vm->sp - 1, 1);
			break;
		case 'e': /* APPENDS */
			if ((rc = vm_pop_mark(vm, &first, &count)))
				return rc;
			if (first <= vm_floor(vm))
				return vm_fail(vm, "APPENDS without a list");
			rc = vm_appends(vm, vm->stack[first - 1], first, count);
			break;
		case 'b': /* BUILD: only OrderedDict's _metadata, which is dropped */
			if ((rc = vm_pop(vm, &a)) || (rc = vm_top(vm, &b)))
				return rc;
			if (vm->nodes[b].kind != PK_DICT)
				return vm_fail(vm, "BUILD of something that is not a dict");
			break;
		case 'q': /* BINPUT */
			if ((rc = vm_need(vm, 1)))
				return rc;
			rc = vm_memo_put(vm, vm->p[vm->pos++]);
			break;
		case 'r': /* LONG_BINPUT */
			if ((rc = vm_need(vm, 4)))
				return rc;
			rc = vm_memo_put(vm, rd32(vm->p + vm->pos));
			vm->pos += 4;
			break;
		case 0x94: /* MEMOIZE */
			rc = vm_memo_put(vm, vm->memo_len);
			break;
		case 'h': /* BINGET */
			if ((rc = vm_need(vm, 1)))
				return rc;
			rc = vm_memo_get(vm, vm->p[vm->pos++]);
			break;
		case 'j': /* LONG_BINGET */
			if ((rc = vm_need(vm, 4)))
				return rc;
			rc = vm_memo_get(vm, rd32(vm->p + vm->pos));
			vm->pos += 4;
			break;
		case '.': /* STOP */
			if (vm->n_marks || vm->sp != 1)
				return vm_fail(vm, "STOP with an unbalanced stack");
			*result = vm->stack[0];
			return 0;
		default: {
			char what[64];
			vm->pos--;
			snprintf(what, sizeof(what), "unsupported pickle opcode 0x%02x", op);
			return vm_fail(vm, what);
		}
		}
	}
	return rc;
}

static void vm_release(struct pk_vm *vm)
{
	for (uint32_t i = 0; i < vm->n_nodes; i++)
		free(vm->nodes[i].kids);
	free(vm->nodes);
	free(vm->stack);
	free(vm->memo);
}

/* Turns a PK_TENSOR node into a tensor over the zip entry its storage
 * names. */
static int make_tensor(struct lp_torch_ckpt *c, struct pk_vm *vm, uint32_t node, const char *prefix,
                       size_t plen, struct lp_torch_tensor *t, struct lp_err *err)
{
	const struct pk_node *args = &vm->nodes[vm->nodes[node].i];
	const struct pk_node *st = &vm->nodes[args->kids[0]];
	const struct pk_node *size = &vm->nodes[args->kids[2]];
	const struct pk_node *stride = &vm->nodes[args->kids[3]];
	int64_t offset = vm->nodes[args->kids[1]].i;
	uint64_t numel = 1, expect = 1, esize;
	char ename[160];
	struct zip_entry *e;
	int rc, w;

	t->dtype = (enum lp_st_dtype)st->dtype;
	t->n_dims = (int)size->len;
	esize = lp_st_dtype_size(t->dtype);
	for (int d = 0; d < t->n_dims; d++) {
		int64_t v = vm->nodes[size->kids[d]].i;
		if (v < 0 || v > (int64_t)1 << 40)
			return lp_errf(err, -EINVAL, "'%s': tensor '%s' has a bad size", c->label,
			               t->name);
		t->shape[d] = v;
		if (v && numel > UINT64_MAX / (uint64_t)v)
			return lp_errf(err, -EINVAL, "'%s': tensor '%s' is too large", c->label,
			               t->name);
		numel *= (uint64_t)v;
	}
	for (int d = t->n_dims - 1; d >= 0; d--) {
		int64_t sv = vm->nodes[stride->kids[d]].i;
		if (t->shape[d] != 1 && (uint64_t)sv != expect && numel)
			return lp_errf(
			    err, -EINVAL,
			    "'%s': tensor '%s' is not contiguous (stride %lld in dimension "
			    "%d, expected %llu); save it with .contiguous()",
			    c->label, t->name, (long long)sv, d, (unsigned long long)expect);
		expect *= (uint64_t)t->shape[d];
	}
	if (offset < 0 || (uint64_t)offset > (uint64_t)st->i || numel > (uint64_t)st->i - offset)
		return lp_errf(err, -EINVAL,
		               "'%s': tensor '%s' (offset %lld, %llu elements) lies outside its "
		               "storage of %lld elements",
		               c->label, t->name, (long long)offset, (unsigned long long)numel,
		               (long long)st->i);
	w = snprintf(ename, sizeof(ename), "%.*s/data/%.*s", (int)plen, prefix, (int)st->len,
	             st->s);
	if (w < 0 || (size_t)w >= sizeof(ename))
		return lp_errf(err, -EINVAL, "'%s': storage key too long", c->label);
	e = zip_find(c, ename, (size_t)w);
	if (!e)
		return lp_errf(err, -EINVAL, "'%s': tensor '%s': storage '%s' is missing", c->label,
		               t->name, ename);
	if ((uint64_t)st->i > UINT64_MAX / esize || e->size < (uint64_t)st->i * esize)
		return lp_errf(err, -EINVAL,
		               "'%s': storage '%s' holds %llu bytes, %lld elements of %s need more",
		               c->label, ename, (unsigned long long)e->size, (long long)st->i,
		               lp_st_dtype_name(t->dtype));
	rc = zip_verify(c, e, err);
	if (rc)
		return rc;
	t->data = e->data + (uint64_t)offset * esize;
	t->nbytes = (size_t)(numel * esize);
	return 0;
}

static int read_pickle(struct lp_torch_ckpt *c, struct lp_err *err)
{
	struct zip_entry *pkl = NULL, *bo;
	struct pk_vm vm = {0};
	const struct pk_node *root;
	uint32_t result = 0;
	size_t plen = 0, n_items;
	char name[160];
	int rc;

	for (size_t i = 0; i < c->n_entries; i++) {
		const struct zip_entry *e = &c->entries[i];
		const char *slash = memchr(e->name, '/', e->name_len);
		if (slash && (size_t)(slash - e->name) + 1 + 8 == e->name_len &&
		    memcmp(slash + 1, "data.pkl", 8) == 0) {
			if (pkl)
				return lp_errf(err, -EINVAL,
				               "'%s': more than one data.pkl in the archive",
				               c->label);
			pkl = &c->entries[i];
			plen = (size_t)(slash - e->name);
		}
	}
	if (!pkl || plen > 100)
		return lp_errf(err, -EINVAL,
		               "'%s': not a pytorch checkpoint (no <archive>/data.pkl entry)",
		               c->label);
	snprintf(name, sizeof(name), "%.*s/byteorder", (int)plen, pkl->name);
	bo = zip_find(c, name, strlen(name));
	if (bo && !(bo->size == 6 && memcmp(bo->data, "little", 6) == 0))
		return lp_errf(err, -EINVAL, "'%s': big-endian checkpoints are not supported",
		               c->label);
	if (pkl->size > PKL_MAX_BYTES)
		return lp_errf(err, -EINVAL, "'%s': data.pkl of %llu bytes is over the limit of %u",
		               c->label, (unsigned long long)pkl->size, PKL_MAX_BYTES);
	rc = zip_verify(c, pkl, err);
	if (rc)
		return rc;

	vm.c = c;
	vm.p = pkl->data;
	vm.n = (size_t)pkl->size;
	vm.err = err;
	rc = vm_run(&vm, &result);
	if (rc)
		goto out;
	root = &vm.nodes[result];
	if (root->kind != PK_DICT) {
		rc = lp_errf(err, -EINVAL, "'%s': data.pkl does not hold a dict of tensors",
		             c->label);
		goto out;
	}
	n_items = root->len / 2;
	if (n_items > CKPT_MAX_TENSORS) {
		rc =
		    lp_errf(err, -EINVAL, "'%s': %zu entries is over the limit", c->label, n_items);
		goto out;
	}
	c->tensors = calloc(n_items ? n_items : 1, sizeof(*c->tensors));
	if (!c->tensors) {
		rc = lp_errf(err, -ENOMEM, "'%s': out of memory", c->label);
		goto out;
	}
	for (size_t i = 0; i < n_items; i++) {
		const struct pk_node *k = &vm.nodes[root->kids[2 * i]];
		uint32_t v = root->kids[2 * i + 1];
		struct lp_torch_tensor *t = &c->tensors[c->n_tensors];
		char *nm;

		if (k->kind != PK_STR || memchr(k->s, '\0', k->len)) {
			rc = lp_errf(err, -EINVAL, "'%s': a key of the state dict is not a string",
			             c->label);
			goto out;
		}
		if (vm.nodes[v].kind == PK_NONE)
			continue;
		if (vm.nodes[v].kind != PK_TENSOR) {
			rc = lp_errf(err, -EINVAL, "'%s': entry '%.*s' is not a tensor", c->label,
			             (int)(k->len > 200 ? 200 : k->len), k->s);
			goto out;
		}
		nm = malloc((size_t)k->len + 1);
		if (!nm) {
			rc = lp_errf(err, -ENOMEM, "'%s': out of memory", c->label);
			goto out;
		}
		memcpy(nm, k->s, k->len);
		nm[k->len] = '\0';
		t->name = nm;
		c->n_tensors++;
		rc = make_tensor(c, &vm, v, pkl->name, plen, t, err);
		if (rc)
			goto out;
	}
out:
	vm_release(&vm);
	return rc;
}

static int open_common(struct lp_torch_ckpt *c, struct lp_err *err)
{
	int rc;

	crc_init(c->crc_table);
	rc = zip_read(c, err);
	if (rc)
		return rc;
	return read_pickle(c, err);
}

int lp_torch_ckpt_open_mem(struct lp_torch_ckpt **out, const void *data, size_t size,
                           const char *label, struct lp_err *err)
{
	struct lp_torch_ckpt *c;
	int rc;

	*out = NULL;
	c = calloc(1, sizeof(*c));
	if (!c)
		return lp_errf(err, -ENOMEM, "out of memory");
	c->label = strdup(label);
	if (!c->label) {
		free(c);
		return lp_errf(err, -ENOMEM, "out of memory");
	}
	c->bytes = data;
	c->size = size;
	rc = open_common(c, err);
	if (rc) {
		lp_torch_ckpt_free(c);
		return rc;
	}
	*out = c;
	return 0;
}

int lp_torch_ckpt_open(struct lp_torch_ckpt **out, const char *path, struct lp_err *err)
{
	return lp_torch_ckpt_open_in(out, NULL, path, err);
}

int lp_torch_ckpt_open_in(struct lp_torch_ckpt **out, const char *root, const char *path,
                          struct lp_err *err)
{
	struct lp_torch_ckpt *c;
	int rc;

	*out = NULL;
	c = calloc(1, sizeof(*c));
	if (!c)
		return lp_errf(err, -ENOMEM, "out of memory");
	rc = lp_mapped_file_open_in(&c->mf, root, path, err);
	if (rc) {
		free(c);
		return rc;
	}
	c->label = strdup(path);
	if (!c->label) {
		lp_torch_ckpt_free(c);
		return lp_errf(err, -ENOMEM, "out of memory");
	}
	c->bytes = c->mf.data;
	c->size = c->mf.size;
	rc = open_common(c, err);
	if (rc) {
		lp_torch_ckpt_free(c);
		return rc;
	}
	*out = c;
	return 0;
}

void lp_torch_ckpt_free(struct lp_torch_ckpt *c)
{
	if (!c)
		return;
	for (size_t i = 0; i < c->n_tensors; i++)
		free((char *)c->tensors[i].name);
	free(c->tensors);
	free(c->entries);
	free(c->label);
	lp_mapped_file_release(&c->mf);
	free(c);
}

size_t lp_torch_ckpt_count(const struct lp_torch_ckpt *c)
{
	return c->n_tensors;
}

const struct lp_torch_tensor *lp_torch_ckpt_at(const struct lp_torch_ckpt *c, size_t i)
{
	return i < c->n_tensors ? &c->tensors[i] : NULL;
}

const char *lp_torch_ckpt_label(const struct lp_torch_ckpt *c)
{
	return c->label;
}
