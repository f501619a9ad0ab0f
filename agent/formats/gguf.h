/* GGUF (version 2 and 3) reader: maps a file, parses and bounds-checks the
 * header, metadata and tensor infos, and gives access to both.
 *
 * Every count, length, offset and size in the file is checked against the
 * file size before use; a truncated or corrupted file is an error that names
 * the file and the reason. Pointers returned below point into the mapping
 * and stay valid until lp_gguf_free(). */
#ifndef LP_FORMATS_GGUF_H
#define LP_FORMATS_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "agent/formats/tensor.h"
#include "common/err.h"

enum lp_gguf_type {
	LP_GGUF_U8 = 0,
	LP_GGUF_I8 = 1,
	LP_GGUF_U16 = 2,
	LP_GGUF_I16 = 3,
	LP_GGUF_U32 = 4,
	LP_GGUF_I32 = 5,
	LP_GGUF_F32 = 6,
	LP_GGUF_BOOL = 7,
	LP_GGUF_STRING = 8,
	LP_GGUF_ARRAY = 9,
	LP_GGUF_U64 = 10,
	LP_GGUF_I64 = 11,
	LP_GGUF_F64 = 12,
};

/* ggml tensor type codes as the file writes them; the reader accepts
 * these and reports each as its enum lp_fmt_type (only some are loadable). */
enum lp_ggml_type {
	LP_GGML_F32 = 0,
	LP_GGML_F16 = 1,
	LP_GGML_Q4_0 = 2,
	LP_GGML_Q4_1 = 3,
	LP_GGML_Q5_0 = 6,
	LP_GGML_Q5_1 = 7,
	LP_GGML_Q8_0 = 8,
	LP_GGML_Q8_1 = 9,
	LP_GGML_Q2_K = 10,
	LP_GGML_Q3_K = 11,
	LP_GGML_Q4_K = 12,
	LP_GGML_Q5_K = 13,
	LP_GGML_Q6_K = 14,
	LP_GGML_Q8_K = 15,
	LP_GGML_BF16 = 30,
};

struct lp_gguf_str {
	const char *s; /* not NUL-terminated */
	uint64_t len;
};

struct lp_gguf_kv {
	struct lp_gguf_str key;
	enum lp_gguf_type type;
	/* scalar value (for ints, floats, bool) */
	union {
		uint64_t u;
		int64_t i;
		double f;
	} v;
	struct lp_gguf_str str;       /* type STRING */
	enum lp_gguf_type arr_type;   /* type ARRAY: element type */
	uint64_t arr_len;             /* type ARRAY: element count */
	const void *arr_data;         /* type ARRAY of fixed-size elements: raw
	                                 little-endian elements in the file */
	struct lp_gguf_str *arr_strs; /* type ARRAY of STRING: arr_len entries */
};

struct lp_gguf;

/* Opens and validates path. On failure *out is NULL and err names the
 * file and the problem. Free with lp_gguf_free(). */
int lp_gguf_open(struct lp_gguf **out, const char *path, struct lp_err *err);
void lp_gguf_free(struct lp_gguf *g);

const char *lp_gguf_path(const struct lp_gguf *g);
uint32_t lp_gguf_version(const struct lp_gguf *g);

size_t lp_gguf_kv_count(const struct lp_gguf *g);
const struct lp_gguf_kv *lp_gguf_kv_at(const struct lp_gguf *g, size_t i);
/* The metadata entry named key, or NULL. */
const struct lp_gguf_kv *lp_gguf_find(const struct lp_gguf *g, const char *key);

/* Typed getters. Each returns -ENOENT (with err) when key is absent and
 * -EINVAL when the value has a type that does not convert: any integer type
 * converts to the integer getters when in range, any int or float type to
 * get_f32. */
int lp_gguf_get_u32(const struct lp_gguf *g, const char *key, uint32_t *out, struct lp_err *err);
int lp_gguf_get_f32(const struct lp_gguf *g, const char *key, float *out, struct lp_err *err);
int lp_gguf_get_bool(const struct lp_gguf *g, const char *key, bool *out, struct lp_err *err);
int lp_gguf_get_str(const struct lp_gguf *g, const char *key, struct lp_gguf_str *out,
                    struct lp_err *err);
/* Array of the given element type; *out points at the entry. */
int lp_gguf_get_arr(const struct lp_gguf *g, const char *key, enum lp_gguf_type elem,
                    const struct lp_gguf_kv **out, struct lp_err *err);

/* Tensors (tensor.h): 1 to 4 dimensions, shape in row-major order (the
 * file's dims reversed: shape[n_dims - 1] is the file's dims[0], the
 * contiguous one), name a NUL-terminated copy of the file's, file the
 * path. */
size_t lp_gguf_tensor_count(const struct lp_gguf *g);
const struct lp_fmt_tensor *lp_gguf_tensor_at(const struct lp_gguf *g, size_t i);
/* The tensor named name, or NULL. */
const struct lp_fmt_tensor *lp_gguf_find_tensor(const struct lp_gguf *g, const char *name);

/* Reads element i of a fixed-size array entry as the given C type
 * (caller checks kv->arr_type and i < kv->arr_len). */
int32_t lp_gguf_arr_i32(const struct lp_gguf_kv *kv, uint64_t i);
float lp_gguf_arr_f32(const struct lp_gguf_kv *kv, uint64_t i);

#endif
