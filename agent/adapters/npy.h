/* NumPy .npy arrays (format versions 1.0, 2.0 and 3.0), read in place:
 *   "\x93NUMPY", u8 major, u8 minor, header length (u16 LE in 1.x, u32 LE in
 *   2.x and 3.x), then a Python literal dict
 *   {'descr': '<f4', 'fortran_order': False, 'shape': (1, 3, 3), }
 *   padded with spaces and a newline, then the data, row-major.
 * Little-endian (or byte-sized) descrs only, C order only; the data must be
 * exactly what the shape describes. */
#ifndef LP_ADAPTERS_NPY_H
#define LP_ADAPTERS_NPY_H

#include <stddef.h>
#include <stdint.h>

#include "agent/engine/safetensors.h"
#include "common/err.h"

#define LP_NPY_MAX_DIMS 8

struct lp_npy {
	char descr[16];         /* as written, e.g. "<f4" */
	enum lp_st_dtype dtype; /* what descr means */
	int n_dims;
	int64_t shape[LP_NPY_MAX_DIMS];
	const void *data; /* inside the bytes given */
	size_t nbytes;
};

/* Parses the n bytes at p (a mapped file, say) into *out, whose data
 * points into p. label names the file in messages. */
int lp_npy_parse(struct lp_npy *out, const void *p, size_t n, const char *label,
                 struct lp_err *err);

#endif
