/* libFuzzer target: one .safetensors file (8-byte header length, JSON
 * header, data). The input is written to a private file, as the reader
 * maps a path. */
#include "tests/fuzz/fuzz.h"

#include "agent/formats/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct lp_safetensors *st = NULL;
	struct lp_err err;
	char path[128];

	fuzz_write_file(fuzz_path(path, sizeof(path), "model.safetensors"), data, size);
	if (lp_safetensors_open_file(&st, path, &err))
		return 0;
	for (size_t i = 0; i < lp_safetensors_count(st); i++) {
		const struct lp_fmt_tensor *t = lp_safetensors_at(st, i);
		fuzz_check_tensor(t);
		FUZZ_ASSERT(lp_safetensors_find(st, t->name) != NULL);
		FUZZ_ASSERT(t->file != NULL);
	}
	lp_safetensors_free(st);
	return 0;
}
