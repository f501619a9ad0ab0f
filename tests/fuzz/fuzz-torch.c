/* libFuzzer target: a PyTorch checkpoint (adapter_model.bin: a zip
 * archive holding a pickled state dict and its storages), read in
 * memory. */
#include "tests/fuzz/fuzz.h"

#include "agent/formats/torch-checkpoint.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct lp_torch_ckpt *c = NULL;
	struct lp_err err;

	if (lp_torch_ckpt_open_mem(&c, data, size, "fuzz.bin", &err))
		return 0;
	for (size_t i = 0; i < lp_torch_ckpt_count(c); i++) {
		const struct lp_fmt_tensor *t = lp_torch_ckpt_at(c, i);
		fuzz_check_tensor(t);
		FUZZ_ASSERT(t->nbytes == 0 ||
		            ((const uint8_t *)t->data >= data &&
		             (const uint8_t *)t->data + t->nbytes <= data + size));
	}
	(void)lp_torch_ckpt_label(c);
	lp_torch_ckpt_free(c);
	return 0;
}
