/* NumPy .npy arrays (format versions 1.0, 2.0 and 3.0), read in place:
 *   "\x93NUMPY", u8 major, u8 minor, header length (u16 LE in 1.x, u32 LE in
 *   2.x and 3.x), then a Python literal dict
 *   {'descr': '<f4', 'fortran_order': False, 'shape': (1, 3, 3), }
 *   padded with spaces and a newline, then the data, row-major.
 * Little-endian (or byte-sized) descrs only, C order only; the data must be
 * exactly what the shape describes. */
#ifndef LP_FORMATS_NPY_H
#define LP_FORMATS_NPY_H

#include <stddef.h>
#include <stdint.h>

#include "agent/formats/tensor.h"
#include "common/err.h"

struct lp_npy {
	char descr[16];         /* as written, e.g. "<f4" */
	struct lp_fmt_tensor t; /* type is what descr means; name and file are
	                           the label given */
};

/* Parses the n bytes at p (a mapped file, say) into *out, whose data
 * points into p. label names the file in messages; it is borrowed and
 * must outlive out (out->t.name and out->t.file point at it). */
int lp_npy_parse(struct lp_npy *out, const void *p, size_t n, const char *label,
                 struct lp_err *err);

#endif
