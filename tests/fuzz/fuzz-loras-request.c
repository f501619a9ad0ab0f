/* libFuzzer target: the bodies of the management API's load requests,
 * POST /v1/loras and vLLM's POST /v1/load_lora_adapter (the parse
 * functions of agent/api/admin.c), and the adapter name rules every route
 * applies (agent/api/loras.c). */
#include "tests/fuzz/fuzz.h"

#include <jansson.h>

#include "agent/api/admin.h"
#include "agent/api/loras.h"

static void check_name(const char *name)
{
	struct lp_err err;

	if (lp_lora_name_valid(name, &err)) {
		size_t n = strlen(name);
		FUZZ_ASSERT(n >= 1 && n <= LP_LORA_NAME_MAX && name[0] != '/' &&
		            !strstr(name, ".."));
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct lp_source_credentials cr = {0};
	struct lp_lora_load_args a;
	struct lp_api_error e;
	json_error_t je;
	json_t *body = json_loadb((const char *)data, size, 0, &je), *v;

	if (!body)
		return 0;
	if (json_is_object(body)) {
		if (lp_admin_loras_parse(body, &a, &cr, &e) == 0) {
			FUZZ_ASSERT(a.name && a.uri && a.from_api);
			check_name(a.name);
		} else {
			FUZZ_ASSERT(e.status == 400 && e.param[0]);
		}
		if (lp_admin_vllm_load_parse(body, &a, &e) == 0) {
			FUZZ_ASSERT(a.name[0] && a.uri[0]);
			check_name(a.name);
		} else {
			FUZZ_ASSERT(e.status == 400);
		}
		v = json_object_get(body, "lora_name"); /* also what unload takes */
		if (json_is_string(v))
			check_name(json_string_value(v));
	}
	json_decref(body);
	return 0;
}
