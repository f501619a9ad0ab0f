/* safetensors reader: one file, or a sharded set through
 * model.safetensors.index.json. Maps each file, parses and bounds-checks the
 * JSON header (the header length is capped before anything is allocated;
 * every tensor's offsets must match its dtype and shape and lie inside the
 * file; tensors must not overlap). Pointers returned stay valid until
 * lp_safetensors_free(). */
#ifndef LP_ENGINE_SAFETENSORS_H
#define LP_ENGINE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "common/err.h"

enum lp_st_dtype {
	LP_ST_F64,
	LP_ST_F32,
	LP_ST_F16,
	LP_ST_BF16,
	LP_ST_I64,
	LP_ST_I32,
	LP_ST_I16,
	LP_ST_I8,
	LP_ST_U8,
	LP_ST_BOOL,
};

#define LP_ST_MAX_DIMS 8

struct lp_st_tensor {
	const char *name; /* NUL-terminated, owned by the set */
	enum lp_st_dtype dtype;
	int n_dims;
	int64_t shape[LP_ST_MAX_DIMS];
	const void *data; /* inside the file's mapping */
	size_t nbytes;
	const char *file; /* path of the file holding it */
};

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
const struct lp_st_tensor *lp_safetensors_at(const struct lp_safetensors *st, size_t i);
/* The tensor named name, or NULL. */
const struct lp_st_tensor *lp_safetensors_find(const struct lp_safetensors *st, const char *name);
/* Element size of a dtype in bytes. */
size_t lp_st_dtype_size(enum lp_st_dtype t);
const char *lp_st_dtype_name(enum lp_st_dtype t);

#endif
