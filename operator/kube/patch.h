/* Builders for the patches the operator sends. A merge patch replaces
 * whole lists, so list edits (finalizers) are JSON patches guarded by
 * `test` ops: if someone changed the list meanwhile the server answers
 * 409/422 and the caller re-reads and retries. */
#ifndef LP_OPERATOR_KUBE_PATCH_H
#define LP_OPERATOR_KUBE_PATCH_H

#include <stdbool.h>

#include <jansson.h>

#include "common/buf.h"
#include "common/err.h"

/* Appends the JSON-pointer form of a key (RFC 6901: '~' -> "~0",
 * '/' -> "~1") to b. */
int kube_json_pointer_escape(struct lp_buf *b, const char *key, struct lp_err *err);

/* True when obj's metadata.finalizers holds name. */
bool kube_has_finalizer(json_t *obj, const char *name);

/* A JSON patch (new array, caller decrefs) adding finalizer name to obj:
 * with a list, test the list as read and append; without one, test the
 * resourceVersion and create the list. NULL when obj already has it or
 * memory runs out. */
json_t *kube_patch_add_finalizer(json_t *obj, const char *name);

/* A JSON patch removing every occurrence of name, each guarded by a test
 * of the value at its index (highest index first, so indexes stay
 * valid). NULL when obj does not have it. */
json_t *kube_patch_remove_finalizer(json_t *obj, const char *name);

#endif
