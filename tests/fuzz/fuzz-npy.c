/* libFuzzer target: a NumPy .npy array (TensorRT-LLM adapters), parsed
 * in memory. */
#include "tests/fuzz/fuzz.h"

#include "agent/adapters/npy.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct lp_npy a;
	struct lp_err err;

	if (lp_npy_parse(&a, data, size, "fuzz.npy", &err))
		return 0;
	FUZZ_ASSERT(a.n_dims <= LP_NPY_MAX_DIMS && memchr(a.descr, '\0', sizeof(a.descr)));
	fuzz_check_tensor(a.dtype, a.n_dims, a.shape, a.data, a.nbytes);
	FUZZ_ASSERT((const uint8_t *)a.data >= data &&
	            (const uint8_t *)a.data + a.nbytes <= data + size);
	return 0;
}
