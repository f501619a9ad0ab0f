/* libFuzzer target: a Hugging Face PEFT adapter_config.json, loaded as an
 * adapter for the tiny test model together with the weights of
 * tests/fixtures/lora/tiny/r4-qv (rank 4, q_proj and v_proj). */
#include "tests/fuzz/fuzz.h"

#include "agent/adapters/lora.h"

static char dir[128];

int LLVMFuzzerInitialize(int *argc, char ***argv);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	char path[256];
	size_t n;
	char *w = fuzz_read_fixture("lora/tiny/r4-qv/adapter_model.safetensors", &n);

	(void)argc;
	(void)argv;
	fuzz_path(dir, sizeof(dir), "adapter");
	if (mkdir(dir, 0700)) {
		perror(dir);
		abort();
	}
	snprintf(path, sizeof(path), "%s/adapter_model.safetensors", dir);
	fuzz_write_file(path, w, n);
	free(w);
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const struct lp_lora_shape s = {2, 64, 64, 32, 160, 64, NULL, false};
	struct lp_lora *l = NULL;
	struct lp_err err;
	char path[256];

	snprintf(path, sizeof(path), "%s/adapter_config.json", dir);
	fuzz_write_file(path, data, size);
	if (lp_lora_load(&l, dir, &s, &err) == 0) {
		FUZZ_ASSERT(l->max_rank >= 1 && l->max_rank <= 64);
		lp_lora_free(l);
	}
	return 0;
}
