/* libFuzzer target: a NumPy .npy array (TensorRT-LLM adapters), parsed
 * in memory. */
#include "tests/fuzz/fuzz.h"

#include "agent/formats/npy.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct lp_npy a;
	struct lp_err err;

	if (lp_npy_parse(&a, data, size, "fuzz.npy", &err))
		return 0;
	FUZZ_ASSERT(memchr(a.descr, '\0', sizeof(a.descr)));
	fuzz_check_tensor(&a.t);
	FUZZ_ASSERT((const uint8_t *)a.t.data >= data &&
	            (const uint8_t *)a.t.data + a.t.nbytes <= data + size);
	return 0;
}
