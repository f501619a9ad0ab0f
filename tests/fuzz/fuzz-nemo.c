/* libFuzzer target: a NeMo .nemo adapter (an uncompressed tar holding
 * model_config.yaml and model_weights.ckpt) loaded for the tiny test model.
 * An input that looks like a tar (ustar magic at byte 257) is the whole
 * .nemo; anything else is taken as model_config.yaml and packed into a tar
 * with the weights of tests/fixtures/lora/tiny/r16-attn.nemo, so that
 * mutations of the YAML are not lost to tar checksums. */
#include "tests/fuzz/fuzz.h"

#include "agent/adapters/lora.h"
#include "agent/formats/tar.h"

static unsigned char *ckpt; /* model_weights.ckpt of the fixture */
static size_t ckpt_size;
static unsigned char *nemo; /* the tar built for one input */
static size_t nemo_cap;

int LLVMFuzzerInitialize(int *argc, char ***argv);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	const struct lp_tar_member *m;
	struct lp_tar t = {0};
	struct lp_err err;
	size_t n;
	char *p = fuzz_read_fixture("lora/tiny/r16-attn.nemo", &n);

	(void)argc;
	(void)argv;
	if (lp_tar_read(&t, p, n, "r16-attn.nemo", &err) ||
	    !(m = lp_tar_find(&t, "model_weights.ckpt")) || !(ckpt = malloc(m->size))) {
		fprintf(stderr, "fuzz: cannot read the fixture .nemo\n");
		abort();
	}
	memcpy(ckpt, m->data, m->size);
	ckpt_size = m->size;
	lp_tar_release(&t);
	free(p);
	return 0;
}

/* Appends a ustar member to nemo at *off. */
static void tar_member(size_t *off, const char *name, const void *data, size_t size)
{
	unsigned char *h = nemo + *off;
	unsigned sum = 0;

	memset(h, 0, 512);
	snprintf((char *)h, 100, "%s", name);
	memcpy(h + 100, "0000644", 8);
	memcpy(h + 108, "0000000", 8);
	memcpy(h + 116, "0000000", 8);
	snprintf((char *)h + 124, 12, "%011zo", size);
	memcpy(h + 136, "00000000000", 12);
	memset(h + 148, ' ', 8);
	h[156] = '0';
	memcpy(h + 257, "ustar", 6);
	memcpy(h + 263, "00", 2);
	for (int i = 0; i < 512; i++)
		sum += h[i];
	snprintf((char *)h + 148, 8, "%06o", sum);
	memcpy(h + 512, data, size);
	*off += 512 + (size + 511) / 512 * 512;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const struct lp_lora_shape s = {2, 64, 64, 32, 160, 64, NULL, false};
	struct lp_lora *l = NULL;
	struct lp_err err;
	char path[128];

	fuzz_path(path, sizeof(path), "adapter.nemo");
	if (size >= 512 && memcmp(data + 257, "ustar", 5) == 0) {
		fuzz_write_file(path, data, size);
	} else {
		size_t need = 512 * 4 + size + ckpt_size + 1024, off = 0;
		if (need > nemo_cap) {
			free(nemo);
			if (!(nemo = calloc(1, need)))
				abort();
			nemo_cap = need;
		}
		memset(nemo, 0, need);
		tar_member(&off, "./model_config.yaml", data, size);
		tar_member(&off, "./model_weights.ckpt", ckpt, ckpt_size);
		fuzz_write_file(path, nemo, off + 1024);
	}
	if (lp_lora_load(&l, path, &s, &err) == 0)
		lp_lora_free(l);
	return 0;
}
