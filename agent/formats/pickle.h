/* A restricted pickle machine: runs a pickle (protocol 2, plus the few
 * protocol 3/4 opcodes a newer writer might use) without Python and
 * yields its value as a tree of nodes. It knows only the opcodes
 * torch.save emits for a state dict of tensors, and only this allowlist of
 * globals:
 *   torch._utils._rebuild_tensor_v2  called on (storage, offset, size,
 *                                    stride, requires_grad, hooks[, meta])
 *                                    gives a LP_PICKLE_TENSOR node
 *   torch._utils._rebuild_parameter  gives back its tensor argument
 *   collections.OrderedDict          called with no arguments: a dict
 *   torch.<Type>Storage              a storage class (Float, Half,
 *                                    BFloat16, Double, Long, Int, Short,
 *                                    Char, Byte, Bool)
 * Persistent ids must be ('storage', class, key, location, numel), which
 * gives a LP_PICKLE_STORAGE node. Any other global, opcode or call is an
 * error naming it and its offset. Object, stack, memo and container
 * counts are bounded. */
#ifndef LP_FORMATS_PICKLE_H
#define LP_FORMATS_PICKLE_H

#include <stddef.h>
#include <stdint.h>

#include "agent/formats/tensor.h"
#include "common/err.h"

enum lp_pickle_kind {
	LP_PICKLE_NONE,
	LP_PICKLE_BOOL,
	LP_PICKLE_INT,
	LP_PICKLE_FLOAT,
	LP_PICKLE_STR,
	LP_PICKLE_TUPLE,
	LP_PICKLE_LIST,
	LP_PICKLE_DICT, /* kids: key, value, key, value ... */
	LP_PICKLE_GLOBAL,
	LP_PICKLE_STORAGE,
	LP_PICKLE_TENSOR, /* i: node of _rebuild_tensor_v2's argument tuple */
};

enum lp_pickle_global {
	LP_PICKLE_G_REBUILD_TENSOR_V2,
	LP_PICKLE_G_REBUILD_PARAMETER,
	LP_PICKLE_G_ORDERED_DICT,
	LP_PICKLE_G_STORAGE, /* storage class; the node's dtype says which */
};

struct lp_pickle_node {
	uint8_t kind;
	uint8_t global; /* LP_PICKLE_GLOBAL */
	uint8_t dtype;  /* enum lp_fmt_type: of a storage class or a storage */
	uint32_t len;   /* LP_PICKLE_STR bytes; containers: kids used */
	uint32_t cap;   /* containers: kids allocated */
	int64_t i;      /* LP_PICKLE_INT, LP_PICKLE_BOOL; LP_PICKLE_STORAGE: numel;
	                   LP_PICKLE_TENSOR: node of the argument tuple */
	const char *s;  /* LP_PICKLE_STR, LP_PICKLE_STORAGE key; inside the pickle */
	uint32_t *kids;
};

struct lp_pickle {
	struct lp_pickle_node *nodes; /* n_nodes; kids index into it */
	uint32_t n_nodes;
	uint32_t root; /* the value STOP left */
};

/* Runs the n bytes at p. Strings in the nodes point into p, which must
 * outlive pk. label (the file) and member (the pickle inside it, e.g.
 * "data.pkl") name it in messages. On failure pk is empty; on success
 * release it with lp_pickle_release(). */
int lp_pickle_read(struct lp_pickle *pk, const void *p, size_t n, const char *label,
                   const char *member, struct lp_err *err);
void lp_pickle_release(struct lp_pickle *pk);

#endif
