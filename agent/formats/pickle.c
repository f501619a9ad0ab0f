/* The restricted pickle machine; see pickle.h.
 *
 * A stack machine over protocol 2 (plus the few protocol 3/4 opcodes a
 * newer writer might use). Values live in an arena of nodes; containers
 * hold node indices, so the memo shares them the way Python does. Every
 * count is bounded before anything grows. */
#include "agent/formats/pickle.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent/formats/le.h"

#define PKL_MAX_NODES (1u << 21)
#define PKL_MAX_STACK (1u << 20)
#define PKL_MAX_MARKS 4096u
#define PKL_MAX_MEMO  (1u << 21)
#define PKL_MAX_KIDS  (1u << 22) /* children of all containers together */

struct pk_vm {
	const char *label;  /* the file, for messages */
	const char *member; /* the pickle's name inside it, for messages */
	const unsigned char *p;
	size_t n, pos;
	struct lp_pickle_node *nodes;
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
	return lp_errf(vm->err, -EINVAL, "'%s': %s: %s at offset %zu", vm->label, vm->member, what,
	               vm->pos);
}

static int vm_new(struct pk_vm *vm, enum lp_pickle_kind kind, uint32_t *out)
{
	if (vm->n_nodes == vm->cap_nodes) {
		uint32_t cap = vm->cap_nodes ? vm->cap_nodes * 2 : 256;
		struct lp_pickle_node *n;

		if (vm->cap_nodes >= PKL_MAX_NODES)
			return vm_fail(vm, "too many objects");
		if (cap > PKL_MAX_NODES)
			cap = PKL_MAX_NODES;
		n = realloc(vm->nodes, (size_t)cap * sizeof(*n));
		if (!n)
			return lp_errf(vm->err, -ENOMEM, "out of memory reading '%s'", vm->label);
		vm->nodes = n;
		vm->cap_nodes = cap;
	}
	memset(&vm->nodes[vm->n_nodes], 0, sizeof(struct lp_pickle_node));
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
			return lp_errf(vm->err, -ENOMEM, "out of memory reading '%s'", vm->label);
		vm->stack = s;
		vm->cap_stack = cap;
	}
	vm->stack[vm->sp++] = node;
	return 0;
}

static int vm_push_new(struct pk_vm *vm, enum lp_pickle_kind kind, uint32_t *out)
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
	struct lp_pickle_node *n = &vm->nodes[parent];

	if (vm->total_kids >= PKL_MAX_KIDS)
		return vm_fail(vm, "too many container items");
	if (n->len == n->cap) {
		uint32_t cap = n->cap ? n->cap * 2 : 4, *k;
		k = realloc(n->kids, (size_t)cap * sizeof(*k));
		if (!k)
			return lp_errf(vm->err, -ENOMEM, "out of memory reading '%s'", vm->label);
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
	int rc = vm_new(vm, LP_PICKLE_TUPLE, &t);

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
			return lp_errf(vm->err, -ENOMEM, "out of memory reading '%s'", vm->label);
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
	enum lp_fmt_type type;
} storage_classes[] = {
    {"FloatStorage", LP_FMT_F32},  {"HalfStorage", LP_FMT_F16}, {"BFloat16Storage", LP_FMT_BF16},
    {"DoubleStorage", LP_FMT_F64}, {"LongStorage", LP_FMT_I64}, {"IntStorage", LP_FMT_I32},
    {"ShortStorage", LP_FMT_I16},  {"CharStorage", LP_FMT_I8},  {"ByteStorage", LP_FMT_U8},
    {"BoolStorage", LP_FMT_BOOL},
};

static bool str_is(const char *s, size_t n, const char *lit)
{
	return strlen(lit) == n && memcmp(s, lit, n) == 0;
}

static int vm_global(struct pk_vm *vm, const char *mod, size_t mlen, const char *name, size_t nlen)
{
	uint32_t g;
	int rc = vm_push_new(vm, LP_PICKLE_GLOBAL, &g);
	struct lp_pickle_node *n;

	if (rc)
		return rc;
	n = &vm->nodes[g];
	if (str_is(mod, mlen, "torch._utils") && str_is(name, nlen, "_rebuild_tensor_v2")) {
		n->global = LP_PICKLE_G_REBUILD_TENSOR_V2;
		return 0;
	}
	if (str_is(mod, mlen, "torch._utils") && str_is(name, nlen, "_rebuild_parameter")) {
		n->global = LP_PICKLE_G_REBUILD_PARAMETER;
		return 0;
	}
	if (str_is(mod, mlen, "collections") && str_is(name, nlen, "OrderedDict")) {
		n->global = LP_PICKLE_G_ORDERED_DICT;
		return 0;
	}
	if (str_is(mod, mlen, "torch")) {
		for (size_t i = 0; i < sizeof(storage_classes) / sizeof(storage_classes[0]); i++) {
			if (str_is(name, nlen, storage_classes[i].name)) {
				n->global = LP_PICKLE_G_STORAGE;
				n->dtype = (uint8_t)storage_classes[i].type;
				return 0;
			}
		}
	}
	return lp_errf(vm->err, -EINVAL,
	               "'%s': %s: unsupported global '%.*s.%.*s' at offset %zu (only "
	               "tensors in a dict are accepted)",
	               vm->label, vm->member, (int)(mlen > 100 ? 100 : mlen), mod,
	               (int)(nlen > 100 ? 100 : nlen), name, vm->pos);
}

static bool is_int_tuple(const struct pk_vm *vm, uint32_t t, size_t max)
{
	const struct lp_pickle_node *n = &vm->nodes[t];

	if (n->kind != LP_PICKLE_TUPLE || n->len > max)
		return false;
	for (uint32_t i = 0; i < n->len; i++) {
		if (vm->nodes[n->kids[i]].kind != LP_PICKLE_INT)
			return false;
	}
	return true;
}

static int vm_reduce(struct pk_vm *vm)
{
	uint32_t args = 0, fn = 0, out;
	const struct lp_pickle_node *f, *a;
	int rc;

	if ((rc = vm_pop(vm, &args)) || (rc = vm_pop(vm, &fn)))
		return rc;
	f = &vm->nodes[fn];
	a = &vm->nodes[args];
	if (f->kind != LP_PICKLE_GLOBAL || a->kind != LP_PICKLE_TUPLE)
		return vm_fail(vm, "REDUCE of something that is not a known global");
	switch (f->global) {
	case LP_PICKLE_G_ORDERED_DICT:
		if (a->len != 0)
			return vm_fail(vm, "OrderedDict called with arguments");
		return vm_push_new(vm, LP_PICKLE_DICT, NULL);
	case LP_PICKLE_G_REBUILD_PARAMETER:
		if (a->len < 1 || vm->nodes[a->kids[0]].kind != LP_PICKLE_TENSOR)
			return vm_fail(vm, "_rebuild_parameter without a tensor");
		return vm_push(vm, a->kids[0]);
	case LP_PICKLE_G_REBUILD_TENSOR_V2:
		if (a->len != 6 && a->len != 7)
			return vm_fail(vm, "_rebuild_tensor_v2 with an unexpected argument count");
		if (vm->nodes[a->kids[0]].kind != LP_PICKLE_STORAGE ||
		    vm->nodes[a->kids[1]].kind != LP_PICKLE_INT ||
		    !is_int_tuple(vm, a->kids[2], LP_FMT_MAX_DIMS) ||
		    !is_int_tuple(vm, a->kids[3], LP_FMT_MAX_DIMS) ||
		    vm->nodes[a->kids[2]].len != vm->nodes[a->kids[3]].len)
			return vm_fail(vm, "_rebuild_tensor_v2 with unexpected arguments (storage, "
			                   "offset, size, stride)");
		if ((rc = vm_push_new(vm, LP_PICKLE_TENSOR, &out)))
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
	const struct lp_pickle_node *t, *k0, *cls, *key, *numel;
	int rc;

	if ((rc = vm_pop(vm, &pid)))
		return rc;
	t = &vm->nodes[pid];
	if (t->kind != LP_PICKLE_TUPLE || t->len != 5)
		return vm_fail(vm, "persistent id is not a 5-tuple");
	k0 = &vm->nodes[t->kids[0]];
	cls = &vm->nodes[t->kids[1]];
	key = &vm->nodes[t->kids[2]];
	numel = &vm->nodes[t->kids[4]];
	if (k0->kind != LP_PICKLE_STR || !str_is(k0->s, k0->len, "storage") ||
	    cls->kind != LP_PICKLE_GLOBAL || cls->global != LP_PICKLE_G_STORAGE ||
	    key->kind != LP_PICKLE_STR || key->len == 0 || key->len > 64 ||
	    numel->kind != LP_PICKLE_INT || numel->i < 0)
		return vm_fail(vm, "persistent id is not ('storage', class, key, location, numel)");
	if ((rc = vm_push_new(vm, LP_PICKLE_STORAGE, &s)))
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
	if ((rc = vm_need(vm, len)) || (rc = vm_push_new(vm, LP_PICKLE_STR, &s)))
		return rc;
	vm->nodes[s].s = (const char *)vm->p + vm->pos;
	vm->nodes[s].len = (uint32_t)len;
	vm->pos += len;
	return 0;
}

static int vm_int(struct pk_vm *vm, int64_t v)
{
	uint32_t s;
	int rc = vm_push_new(vm, LP_PICKLE_INT, &s);
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

	if (vm->nodes[dict].kind != LP_PICKLE_DICT)
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

	if (vm->nodes[list].kind != LP_PICKLE_LIST)
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
			rc = vm_push_new(vm, LP_PICKLE_DICT, NULL);
			break;
		case ']': /* EMPTY_LIST */
			rc = vm_push_new(vm, LP_PICKLE_LIST, NULL);
			break;
		case ')': /* EMPTY_TUPLE */
			rc = vm_push_new(vm, LP_PICKLE_TUPLE, NULL);
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
			l1 = lp_le32(vm->p + vm->pos);
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
			if (lp_le64(vm->p + vm->pos) > vm->n)
				return vm_fail(vm, "truncated pickle");
			l1 = (size_t)lp_le64(vm->p + vm->pos);
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
			if (vm->nodes[a].kind != LP_PICKLE_STR ||
			    vm->nodes[b].kind != LP_PICKLE_STR)
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
			rc = vm_int(vm, (int32_t)lp_le32(vm->p + vm->pos));
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
			rc = vm_int(vm, lp_le16(vm->p + vm->pos));
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
			rc = vm_push_new(vm, LP_PICKLE_FLOAT, NULL);
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
			if ((rc = vm_push_new(vm, LP_PICKLE_BOOL, &a)))
				return rc;
			vm->nodes[a].i = op == 0x88;
			break;
		case 'N': /* NONE */
			rc = vm_push_new(vm, LP_PICKLE_NONE, NULL);
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
			if (vm->nodes[b].kind != LP_PICKLE_DICT)
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
			rc = vm_memo_put(vm, lp_le32(vm->p + vm->pos));
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
			rc = vm_memo_get(vm, lp_le32(vm->p + vm->pos));
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

int lp_pickle_read(struct lp_pickle *pk, const void *p, size_t n, const char *label,
                   const char *member, struct lp_err *err)
{
	struct pk_vm vm = {0};
	uint32_t result = 0;
	int rc;

	memset(pk, 0, sizeof(*pk));
	vm.label = label;
	vm.member = member;
	vm.p = p;
	vm.n = n;
	vm.err = err;
	rc = vm_run(&vm, &result);
	free(vm.stack);
	free(vm.memo);
	pk->nodes = vm.nodes;
	pk->n_nodes = vm.n_nodes;
	pk->root = result;
	if (rc)
		lp_pickle_release(pk);
	return rc;
}

void lp_pickle_release(struct lp_pickle *pk)
{
	for (uint32_t i = 0; i < pk->n_nodes; i++)
		free(pk->nodes[i].kids);
	free(pk->nodes);
	memset(pk, 0, sizeof(*pk));
}
