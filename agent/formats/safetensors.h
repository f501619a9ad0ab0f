/* safetensors reader: one file, or a sharded set through
 * model.safetensors.index.json. Maps each file, parses and bounds-checks the
 * JSON header (the header length is capped before anything is allocated;
 * every tensor's offsets must match its dtype and shape and lie inside the
 * file; tensors must not overlap). Pointers returned stay valid until
 * lp_safetensors_free(). Tensors are struct lp_fmt_tensor (tensor.h) of the
 * types F64, F32, F16, BF16, I64, I32, I16, I8, U8 and BOOL, with file the
 * path of the file holding each. */
#ifndef LP_FORMATS_SAFETENSORS_H
#define LP_FORMATS_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "agent/formats/tensor.h"
#include "common/err.h"

struct lp_safetensors;

/* Opens one .safetensors file; with the _in variant it must stay below
 * root (borrowed; NULL or "" for none; common/file.h), else -EACCES. A
 * FIFO, device or directory is refused at once (-EINVAL). */
int lp_safetensors_open_file(struct lp_safetensors **out, const char *path, struct lp_err *err);
int lp_safetensors_open_file_in(struct lp_safetensors **out, const char *root, const char *path,
                                struct lp_err *err);
/* Opens a model directory: dir/model.safetensors.index.json when present
 * (every shard it names, each opened once), else dir/model.safetensors, else
 * the single *.safetensors file in dir. */
int lp_safetensors_open_dir(struct lp_safetensors **out, const char *dir, struct lp_err *err);
void lp_safetensors_free(struct lp_safetensors *st);

size_t lp_safetensors_count(const struct lp_safetensors *st);
const struct lp_fmt_tensor *lp_safetensors_at(const struct lp_safetensors *st, size_t i);
/* The tensor named name, or NULL. */
const struct lp_fmt_tensor *lp_safetensors_find(const struct lp_safetensors *st, const char *name);

#endif
