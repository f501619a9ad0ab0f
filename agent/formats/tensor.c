/* Sizes and names of the element types in tensor.h. */
#include "agent/formats/tensor.h"

static const struct {
	const char *name;
	unsigned block; /* elements per block */
	unsigned bytes; /* bytes per block */
} types[LP_FMT_COUNT] = {
    [LP_FMT_F64] = {"F64", 1, 8},       [LP_FMT_F32] = {"F32", 1, 4},
    [LP_FMT_F16] = {"F16", 1, 2},       [LP_FMT_BF16] = {"BF16", 1, 2},
    [LP_FMT_I64] = {"I64", 1, 8},       [LP_FMT_I32] = {"I32", 1, 4},
    [LP_FMT_I16] = {"I16", 1, 2},       [LP_FMT_I8] = {"I8", 1, 1},
    [LP_FMT_U8] = {"U8", 1, 1},         [LP_FMT_BOOL] = {"BOOL", 1, 1},
    [LP_FMT_Q4_0] = {"Q4_0", 32, 18},   [LP_FMT_Q4_1] = {"Q4_1", 32, 20},
    [LP_FMT_Q5_0] = {"Q5_0", 32, 22},   [LP_FMT_Q5_1] = {"Q5_1", 32, 24},
    [LP_FMT_Q8_0] = {"Q8_0", 32, 34},   [LP_FMT_Q8_1] = {"Q8_1", 32, 36},
    [LP_FMT_Q2_K] = {"Q2_K", 256, 84},  [LP_FMT_Q3_K] = {"Q3_K", 256, 110},
    [LP_FMT_Q4_K] = {"Q4_K", 256, 144}, [LP_FMT_Q5_K] = {"Q5_K", 256, 176},
    [LP_FMT_Q6_K] = {"Q6_K", 256, 210}, [LP_FMT_Q8_K] = {"Q8_K", 256, 292},
};

size_t lp_fmt_type_size(enum lp_fmt_type t)
{
	return (unsigned)t < LP_FMT_COUNT ? types[t].bytes : 0;
}

size_t lp_fmt_type_block(enum lp_fmt_type t)
{
	return (unsigned)t < LP_FMT_COUNT ? types[t].block : 0;
}

const char *lp_fmt_type_name(enum lp_fmt_type t)
{
	return (unsigned)t < LP_FMT_COUNT ? types[t].name : "invalid";
}
