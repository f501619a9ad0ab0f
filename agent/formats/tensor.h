/* The one description of a tensor that every file-format reader in
 * agent/formats hands out (GGUF, safetensors, .npy, torch checkpoints):
 * what its elements are, its shape, and where its bytes lie.
 *
 * Shape is row-major: shape[n_dims - 1] is the contiguous dimension, so a
 * [rows, cols] matrix has shape {rows, cols} (GGUF's dims[0]-fastest order
 * is reversed by its reader). Entries past n_dims are 0. */
#ifndef LP_FORMATS_TENSOR_H
#define LP_FORMATS_TENSOR_H

#include <stddef.h>
#include <stdint.h>

/* Element types the readers report: safetensors' plain types and ggml's
 * (quantized ones in blocks of lp_fmt_type_block() elements). Which of
 * these a reader accepts is its own business; which the engine loads is
 * the engine's (kernels/dtype.h). */
enum lp_fmt_type {
	LP_FMT_F64,
	LP_FMT_F32,
	LP_FMT_F16,
	LP_FMT_BF16,
	LP_FMT_I64,
	LP_FMT_I32,
	LP_FMT_I16,
	LP_FMT_I8,
	LP_FMT_U8,
	LP_FMT_BOOL,
	LP_FMT_Q4_0,
	LP_FMT_Q4_1,
	LP_FMT_Q5_0,
	LP_FMT_Q5_1,
	LP_FMT_Q8_0,
	LP_FMT_Q8_1,
	LP_FMT_Q2_K,
	LP_FMT_Q3_K,
	LP_FMT_Q4_K,
	LP_FMT_Q5_K,
	LP_FMT_Q6_K,
	LP_FMT_Q8_K,
	LP_FMT_COUNT
};

#define LP_FMT_MAX_DIMS 8

struct lp_fmt_tensor {
	const char *name; /* NUL-terminated, owned by the reader */
	enum lp_fmt_type type;
	int n_dims;                     /* 0 (a scalar) to LP_FMT_MAX_DIMS */
	int64_t shape[LP_FMT_MAX_DIMS]; /* row-major, last dimension contiguous */
	const void *data;               /* inside the reader's bytes, little-endian */
	size_t nbytes;
	const char *file; /* the file or label it came from, owned by the reader */
};

/* Bytes per block (the element size for plain types); 0 for a value
 * outside the enum. */
size_t lp_fmt_type_size(enum lp_fmt_type t);
/* Elements per block: 1 for plain types, 32 or 256 for quantized ones; 0
 * for a value outside the enum. */
size_t lp_fmt_type_block(enum lp_fmt_type t);
/* "F32", "BF16", "Q4_1", ...; "invalid" for a value outside the enum. */
const char *lp_fmt_type_name(enum lp_fmt_type t);

#endif
