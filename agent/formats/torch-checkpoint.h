/* PyTorch checkpoints as torch.save writes them (the zip format, torch 1.6
 * and later), read without Python: zip.h's reader for the stored entries
 * (CRC-32 verified for every entry used) and pickle.h's restricted machine
 * for the pickled state dict.
 *
 * Archive layout: <archive>/data.pkl, the pickled dict
 *   {name: torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
 *                                          requires_grad, hooks[, meta])}
 * where each storage is a persistent id
 *   ('storage', torch.<Type>Storage, key, location, numel)
 * whose bytes are <archive>/data/<key>, raw little-endian. Only contiguous
 * tensors are accepted; any other global, opcode or shape is an error. */
#ifndef LP_FORMATS_TORCH_CHECKPOINT_H
#define LP_FORMATS_TORCH_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "agent/formats/tensor.h"
#include "common/err.h"

struct lp_torch_ckpt;

/* Maps the file at path and reads it. Free with lp_torch_ckpt_free(). With
 * the _in variant the file must stay below root (borrowed; NULL or "" for
 * none; common/file.h), else -EACCES; a FIFO or device is refused at once. */
int lp_torch_ckpt_open(struct lp_torch_ckpt **out, const char *path, struct lp_err *err);
int lp_torch_ckpt_open_in(struct lp_torch_ckpt **out, const char *root, const char *path,
                          struct lp_err *err);

/* Reads a checkpoint held in memory (a tar member, say). Borrows data,
 * which must outlive the checkpoint; label names it in messages. */
int lp_torch_ckpt_open_mem(struct lp_torch_ckpt **out, const void *data, size_t size,
                           const char *label, struct lp_err *err);

void lp_torch_ckpt_free(struct lp_torch_ckpt *c);

size_t lp_torch_ckpt_count(const struct lp_torch_ckpt *c);
/* Tensors (tensor.h) in the order the dict holds them: name the state
 * dict key, file the checkpoint's label, data inside its bytes. */
const struct lp_fmt_tensor *lp_torch_ckpt_at(const struct lp_torch_ckpt *c, size_t i);
/* The file path or label given when opening. */
const char *lp_torch_ckpt_label(const struct lp_torch_ckpt *c);

#endif
