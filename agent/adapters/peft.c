/* Hugging Face PEFT LoRA adapters: adapter_config.json with
 * adapter_model.safetensors (or adapter_model.bin, a torch zip checkpoint).
 *
 * Which modules an adapter targets, and each one's rank and alpha, follow
 * PEFT's own rules (peft/tuners/tuners_utils.py check_target_module_exists
 * and peft/utils/other.py get_pattern_key), with module names as the base
 * model's named_modules() gives them ("model.layers.3.self_attn.q_proj"):
 *   target_modules string   re.fullmatch(target_modules, name)
 *   target_modules list     name in list, or name ends with "." + entry; then
 *                           layers_to_transform keeps the layer index that
 *                           re.match(r".*\.[^.]*\.(\d+)\.", name) (or, with
 *                           layers_pattern p, r".*\.{p}\.(\d+)\.") finds
 *   exclude_modules         the same string / list rules, checked first
 *   rank_pattern, alpha_pattern  the first key k, in file order, with
 *                           re.match(rf"(.*\.)?({k})$", name); else r, lora_alpha
 * Every tensor must be one of the A/B pairs of the selected modules; a
 * selected module with neither tensor is absent (PEFT loads such a file and
 * leaves the module's B at its initial zero: it adds nothing), listed in
 * lp_lora.absent, but not every selected module may be. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "agent/adapters/lora-internal.h"
#include "agent/formats/torch-checkpoint.h"
#include "agent/formats/safetensors.h"
#include "common/buf.h"

#define CONFIG_MAX_BYTES (1u << 20)
#define KEY_MAX          128
/* What a config's regular expressions may cost. Each is matched against
 * module names of at most KEY_MAX bytes, so the limits are generous for
 * any sane expression, and a load runs at most (keys + 3) * modules
 * matches: a catastrophic one is refused (422) on its first module. */
#define MAX_PATTERNS   256  /* keys of rank_pattern, and of alpha_pattern */
#define MAX_LIST       1024 /* entries of target_modules / exclude_modules */
#define MAX_LAYER_RES  16   /* layers_pattern entries */
#define REGEX_MAX      4096 /* bytes of a target_modules / exclude_modules regex */
#define RE_MATCH_LIMIT 100000
#define RE_DEPTH_LIMIT 1000
#define RE_HEAP_LIMIT  1024 /* KiB */

struct pattern {
	const char *key; /* borrowed from the json */
	pcre2_code *re;
	double value;
};

struct peft_config {
	const char *path;
	json_t *root;
	int r;
	double alpha;
	bool rslora;
	const char *target_str; /* target_modules as a regex, or NULL */
	bool all_linear;        /* target_modules "all-linear" */
	json_t *target_list;    /* target_modules as a list, or NULL */
	pcre2_code *target_re;
	const char *exclude_str;
	json_t *exclude_list;
	pcre2_code *exclude_re;
	struct pattern *rank_pat, *alpha_pat;
	size_t n_rank_pat, n_alpha_pat;
	bool has_layers; /* layers_to_transform given and not empty */
	int *layers;     /* its indices */
	size_t n_layers;
	pcre2_code **layer_re;  /* one per layers_pattern, or the default */
	const char **layer_src; /* their layers_pattern entries, borrowed */
	size_t n_layer_re;
	const char *base_model;
	const char *bias; /* "lora_only" or "all", or NULL for "none" */
	pcre2_match_data *md;
	pcre2_match_context *mctx; /* the match limits */
};

static void config_release(struct peft_config *c)
{
	for (size_t i = 0; i < c->n_rank_pat; i++)
		pcre2_code_free(c->rank_pat[i].re);
	for (size_t i = 0; i < c->n_alpha_pat; i++)
		pcre2_code_free(c->alpha_pat[i].re);
	for (size_t i = 0; i < c->n_layer_re; i++)
		pcre2_code_free(c->layer_re[i]);
	free(c->rank_pat);
	free(c->alpha_pat);
	free(c->layer_re);
	free(c->layer_src);
	free(c->layers);
	pcre2_code_free(c->target_re);
	pcre2_code_free(c->exclude_re);
	pcre2_match_data_free(c->md);
	pcre2_match_context_free(c->mctx);
	json_decref(c->root);
}

static int compile_re(const struct peft_config *c, const char *what, const char *src,
                      const char *pattern, pcre2_code **out, struct lp_err *err)
{
	PCRE2_UCHAR msg[128];
	PCRE2_SIZE eo;
	int ec;

	*out = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED, PCRE2_UTF, &ec, &eo, NULL);
	if (*out)
		return 0;
	if (ec == PCRE2_ERROR_NOMEMORY)
		return lp_errf(err, -ENOMEM, "out of memory");
	pcre2_get_error_message(ec, msg, sizeof(msg));
	return lp_errf(err, -EINVAL, "'%s': %s '%.200s' is not a valid regular expression: %s",
	               c->path, what, src, (const char *)msg);
}

/* re.match (anchored at the start) or re.fullmatch of re, the config's
 * field what (pattern src), against s: 1 on a match, 0 on none, -EINVAL
 * naming the pattern when it hits a match limit. */
static int re_match(const struct peft_config *c, const pcre2_code *re, const char *s, bool full,
                    const char *what, const char *src, struct lp_err *err)
{
	uint32_t opts = PCRE2_ANCHORED | (full ? PCRE2_ENDANCHORED : 0);
	int rc = pcre2_match(re, (PCRE2_SPTR)s, PCRE2_ZERO_TERMINATED, 0, opts, c->md, c->mctx);
	PCRE2_UCHAR msg[128];

	if (rc >= 0)
		return 1;
	if (rc == PCRE2_ERROR_NOMATCH)
		return 0;
	if (rc == PCRE2_ERROR_NOMEMORY)
		return lp_errf(err, -ENOMEM, "out of memory");
	pcre2_get_error_message(rc, msg, sizeof(msg));
	if (rc == PCRE2_ERROR_MATCHLIMIT || rc == PCRE2_ERROR_DEPTHLIMIT ||
	    rc == PCRE2_ERROR_HEAPLIMIT)
		return lp_errf(err, -EINVAL,
		               "'%s': %s '%.200s' is too costly to match against '%s' (%s): "
		               "simplify the regular expression",
		               c->path, what, src, s, (const char *)msg);
	return lp_errf(err, -EINVAL, "'%s': %s '%.200s' cannot be matched against '%s': %s",
	               c->path, what, src, s, (const char *)msg);
}

/* A key of rank_pattern or alpha_pattern, compiled as PEFT builds it. */
static int read_patterns(struct peft_config *c, const char *field, bool integer,
                         struct pattern **out, size_t *n_out, struct lp_err *err)
{
	json_t *obj = json_object_get(c->root, field), *v;
	const char *key;
	char pat[KEY_MAX * 2 + 16];
	int rc;

	*out = NULL;
	*n_out = 0;
	if (!obj || json_is_null(obj))
		return 0;
	if (!json_is_object(obj))
		return lp_errf(err, -EINVAL, "'%s': '%s' is not an object", c->path, field);
	if (json_object_size(obj) > MAX_PATTERNS)
		return lp_errf(err, -EINVAL, "'%s': '%s' has %zu keys, more than %d", c->path,
		               field, json_object_size(obj), MAX_PATTERNS);
	*out = calloc(json_object_size(obj) + 1, sizeof(**out));
	if (!*out)
		return lp_errf(err, -ENOMEM, "out of memory");
	json_object_foreach(obj, key, v)
	{
		struct pattern *p = &(*out)[*n_out];

		if (integer ? !json_is_integer(v) || json_integer_value(v) <= 0 ||
		                  json_integer_value(v) > LORA_RANK_LIMIT
		            : !json_is_number(v) || !isfinite(json_number_value(v)))
			return lp_errf(err, -EINVAL, "'%s': %s['%.100s'] must be %s", c->path,
			               field, key, integer ? "a positive integer" : "a number");
		if (strlen(key) > KEY_MAX * 2)
			return lp_errf(err, -EINVAL, "'%s': %s key '%.100s...' is too long",
			               c->path, field, key);
		snprintf(pat, sizeof(pat), "(.*\\.)?(%s)$", key);
		p->key = key;
		p->value = json_number_value(v);
		rc = compile_re(c, field, key, pat, &p->re, err);
		(*n_out)++;
		if (rc)
			return rc;
	}
	return 0;
}

/* The first pattern of field, in file order, matching name, as
 * get_pattern_key: *out is it, or NULL. */
static int find_pattern(const struct peft_config *c, const char *field, const struct pattern *p,
                        size_t n, const char *name, const struct pattern **out, struct lp_err *err)
{
	*out = NULL;
	for (size_t i = 0; i < n; i++) {
		int rc = re_match(c, p[i].re, name, false, field, p[i].key, err);
		if (rc < 0)
			return rc;
		if (rc) {
			*out = &p[i];
			return 0;
		}
	}
	return 0;
}

static bool json_false_or_absent(json_t *v)
{
	return !v || json_is_null(v) || json_is_false(v);
}

static int read_string_or_list(struct peft_config *c, const char *field, const char **str,
                               json_t **list, pcre2_code **re, struct lp_err *err)
{
	json_t *v = json_object_get(c->root, field);

	*str = NULL;
	*list = NULL;
	if (!v || json_is_null(v))
		return 0;
	if (json_is_string(v)) {
		*str = json_string_value(v);
		if (strlen(*str) > REGEX_MAX)
			return lp_errf(err, -EINVAL, "'%s': '%s' is longer than %d bytes", c->path,
			               field, REGEX_MAX);
		return re ? compile_re(c, field, *str, *str, re, err) : 0;
	}
	if (json_is_array(v)) {
		size_t i;
		json_t *e;
		if (json_array_size(v) > MAX_LIST)
			return lp_errf(err, -EINVAL, "'%s': '%s' has %zu entries, more than %d",
			               c->path, field, json_array_size(v), MAX_LIST);
		json_array_foreach(v, i, e)
		{
			if (!json_is_string(e))
				return lp_errf(err, -EINVAL, "'%s': '%s' holds a non-string",
				               c->path, field);
		}
		*list = v;
		return 0;
	}
	return lp_errf(err, -EINVAL, "'%s': '%s' must be a string or a list of strings", c->path,
	               field);
}

static int read_layers(struct peft_config *c, int n_model_layers, struct lp_err *err)
{
	json_t *v = json_object_get(c->root, "layers_to_transform"), *e;
	json_t *pat = json_object_get(c->root, "layers_pattern");
	size_t i;
	int rc;

	if (!v || json_is_null(v))
		return 0;
	if (json_is_integer(v)) {
		c->layers = malloc(sizeof(int));
		if (!c->layers)
			return lp_errf(err, -ENOMEM, "out of memory");
		c->n_layers = 1;
		if (json_integer_value(v) < 0 || json_integer_value(v) >= n_model_layers)
			return lp_errf(
			    err, -EINVAL,
			    "'%s': layers_to_transform names layer %lld, but the base model "
			    "has %d layers",
			    c->path, (long long)json_integer_value(v), n_model_layers);
		c->layers[0] = (int)json_integer_value(v);
	} else if (json_is_array(v)) {
		if (json_array_size(v) == 0)
			return 0;
		if (json_array_size(v) > 100000)
			return lp_errf(err, -EINVAL, "'%s': layers_to_transform is too long",
			               c->path);
		c->layers = malloc(json_array_size(v) * sizeof(int));
		if (!c->layers)
			return lp_errf(err, -ENOMEM, "out of memory");
		json_array_foreach(v, i, e)
		{
			if (!json_is_integer(e))
				return lp_errf(err, -EINVAL,
				               "'%s': layers_to_transform holds a non-integer",
				               c->path);
			if (json_integer_value(e) < 0 || json_integer_value(e) >= n_model_layers)
				return lp_errf(
				    err, -EINVAL,
				    "'%s': layers_to_transform names layer %lld, but the base "
				    "model has %d layers",
				    c->path, (long long)json_integer_value(e), n_model_layers);
			c->layers[c->n_layers++] = (int)json_integer_value(e);
		}
	} else {
		return lp_errf(err, -EINVAL,
		               "'%s': layers_to_transform must be an integer or a list of integers",
		               c->path);
	}
	c->has_layers = true;

	/* layers_pattern: None, "" or [] mean any; else each regex in turn */
	if (pat && json_is_string(pat) && *json_string_value(pat))
		pat = json_pack("[O]", pat);
	else if (pat && json_is_array(pat) && json_array_size(pat))
		json_incref(pat);
	else if (!pat || json_is_null(pat) || (json_is_string(pat) && !*json_string_value(pat)) ||
	         (json_is_array(pat) && !json_array_size(pat)))
		pat = NULL;
	else
		return lp_errf(err, -EINVAL, "'%s': layers_pattern must be a string or a list",
		               c->path);
	if (pat && json_array_size(pat) > MAX_LAYER_RES) {
		rc = lp_errf(err, -EINVAL, "'%s': 'layers_pattern' has %zu entries, more than %d",
		             c->path, json_array_size(pat), MAX_LAYER_RES);
		json_decref(pat);
		return rc;
	}
	c->layer_re = calloc(pat ? json_array_size(pat) : 1, sizeof(*c->layer_re));
	c->layer_src = calloc(pat ? json_array_size(pat) : 1, sizeof(*c->layer_src));
	if (!c->layer_re || !c->layer_src) {
		json_decref(pat);
		return lp_errf(err, -ENOMEM, "out of memory");
	}
	if (!pat) {
		rc = compile_re(c, "layers_pattern", "", ".*\\.[^.]*\\.(\\d+)\\.", &c->layer_re[0],
		                err);
		c->layer_src[0] = ".*\\.[^.]*\\.(\\d+)\\.";
		c->n_layer_re = rc ? 0 : 1;
		return rc;
	}
	rc = 0;
	json_array_foreach(pat, i, e)
	{
		char re[KEY_MAX * 2 + 32];
		if (!json_is_string(e) || strlen(json_string_value(e)) > KEY_MAX * 2) {
			rc = lp_errf(err, -EINVAL, "'%s': layers_pattern holds a bad entry",
			             c->path);
			break;
		}
		snprintf(re, sizeof(re), ".*\\.%s\\.(\\d+)\\.", json_string_value(e));
		rc = compile_re(c, "layers_pattern", json_string_value(e), re,
		                &c->layer_re[c->n_layer_re], err);
		if (rc)
			break;
		c->layer_src[c->n_layer_re++] = json_string_value(e);
	}
	json_decref(pat);
	return rc;
}

/* Config keys of features that change what the adapter computes; each must
 * be absent, null, false or empty. */
static const struct {
	const char *key, *what;
} unsupported[] = {
    {"layer_replication", "replicated layers"},
    {"target_parameters", "adapters on parameters (not modules)"},
    {"trainable_token_indices", "trained token embeddings"},
    {"alora_invocation_tokens", "activated LoRA adapters"},
    {"use_qalora", "QALoRA adapters"},
    {"use_bdlora", "block-diagonal LoRA adapters"},
    {"arrow_config", "Arrow routing adapters"},
    {"velora_config", "VeLoRA adapters"},
    {"monteclora_config", "MonteCLoRA adapters"},
    {"kasa_config", "KaSA adapters"},
};

static int read_config(struct peft_config *c, const char *root, const char *dir, char *path,
                       size_t path_cap, const struct lp_lora_shape *s, struct lp_err *err)
{
	struct lp_buf b;
	json_error_t jerr;
	json_t *v;
	int rc;

	memset(c, 0, sizeof(*c));
	snprintf(path, path_cap, "%s/adapter_config.json", dir);
	c->path = path;
	c->md = pcre2_match_data_create(16, NULL);
	c->mctx = pcre2_match_context_create(NULL);
	if (!c->md || !c->mctx)
		return lp_errf(err, -ENOMEM, "out of memory");
	pcre2_set_match_limit(c->mctx, RE_MATCH_LIMIT);
	pcre2_set_depth_limit(c->mctx, RE_DEPTH_LIMIT);
	pcre2_set_heap_limit(c->mctx, RE_HEAP_LIMIT);
	lp_buf_init(&b, CONFIG_MAX_BYTES);
	rc = lp_buf_read_file_in(&b, root, path, CONFIG_MAX_BYTES, err);
	if (rc == -E2BIG) /* an invalid adapter (422), not a server error */
		rc = lp_errf(err, -EINVAL, "'%s' is larger than the limit of %u bytes (1 MiB)",
		             path, CONFIG_MAX_BYTES);
	if (rc) {
		lp_buf_release(&b);
		return rc;
	}
	c->root = json_loadb(b.data ? b.data : "", b.len, JSON_REJECT_DUPLICATES, &jerr);
	lp_buf_release(&b);
	if (!c->root) {
		/* jansson quotes the text "near" the error: keep the file's
		 * content out of the message */
		char *near = strstr(jerr.text, " near ");
		if (near)
			*near = '\0';
		return lp_errf(err, -EINVAL, "'%s': not valid json: %s (line %d column %d)", path,
		               jerr.text, jerr.line, jerr.column);
	}
	if (!json_is_object(c->root))
		return lp_errf(err, -EINVAL, "'%s': not a json object", path);

	v = json_object_get(c->root, "peft_type");
	if (v && !json_is_null(v) && !(json_is_string(v) && !strcmp(json_string_value(v), "LORA")))
		return lp_errf(err, -EINVAL, "'%s': peft_type '%.64s' is not supported (only LORA)",
		               path, json_is_string(v) ? json_string_value(v) : "?");
	v = json_object_get(c->root, "r");
	if (!v)
		return lp_errf(err, -EINVAL, "'%s': missing 'r' (the lora rank)", path);
	if (!json_is_integer(v) || json_integer_value(v) <= 0 ||
	    json_integer_value(v) > LORA_RANK_LIMIT)
		return lp_errf(err, -EINVAL, "'%s': 'r' must be a positive integer", path);
	c->r = (int)json_integer_value(v);
	v = json_object_get(c->root, "lora_alpha");
	if (!v)
		return lp_errf(err, -EINVAL, "'%s': missing 'lora_alpha'", path);
	if (!json_is_number(v) || !isfinite(json_number_value(v)))
		return lp_errf(err, -EINVAL, "'%s': 'lora_alpha' must be a number", path);
	c->alpha = json_number_value(v);
	v = json_object_get(c->root, "target_modules");
	if (!v || json_is_null(v))
		return lp_errf(err, -EINVAL, "'%s': missing 'target_modules'", path);
	if (json_is_string(v) && !strcasecmp(json_string_value(v), "all-linear"))
		c->all_linear = true;
	else if ((rc = read_string_or_list(c, "target_modules", &c->target_str, &c->target_list,
	                                   &c->target_re, err)))
		return rc;
	if (c->target_list && !json_array_size(c->target_list))
		return lp_errf(err, -EINVAL, "'%s': 'target_modules' is empty", path);
	if ((rc = read_string_or_list(c, "exclude_modules", &c->exclude_str, &c->exclude_list,
	                              &c->exclude_re, err)))
		return rc;

	v = json_object_get(c->root, "use_rslora");
	if (v && !json_is_null(v) && !json_is_boolean(v))
		return lp_errf(err, -EINVAL, "'%s': 'use_rslora' must be true or false", path);
	c->rslora = v && json_is_true(v);
	if (!json_false_or_absent(json_object_get(c->root, "use_dora")))
		return lp_errf(err, -EINVAL,
		               "'%s': use_dora is set: DoRA adapters are not supported", path);
	if (!json_false_or_absent(json_object_get(c->root, "fan_in_fan_out")))
		return lp_errf(err, -EINVAL,
		               "'%s': fan_in_fan_out is set: transposed (Conv1D-style) weights are "
		               "not supported",
		               path);
	if (!json_false_or_absent(json_object_get(c->root, "lora_bias")))
		return lp_errf(err, -EINVAL,
		               "'%s': lora_bias is set: biases on lora_B are not "
		               "supported",
		               path);
	/* "lora_only" and "all" save the biases the adapter trained; with
	 * none in the file (a model without biases) they are "none"
	 * (check_bias, once the tensors are known) */
	v = json_object_get(c->root, "bias");
	if (v && !json_is_null(v) &&
	    !(json_is_string(v) && !strcmp(json_string_value(v), "none"))) {
		const char *b = json_is_string(v) ? json_string_value(v) : NULL;
		if (!b || (strcmp(b, "lora_only") && strcmp(b, "all")))
			return lp_errf(err, -EINVAL,
			               "'%s': bias '%.32s' is not supported (only 'none'): the "
			               "adapter trains the base model's biases",
			               path, b ? b : "?");
		c->bias = b;
	}
	v = json_object_get(c->root, "modules_to_save");
	if (v && !json_is_null(v) && !(json_is_array(v) && json_array_size(v) == 0)) {
		json_t *first = json_is_array(v) ? json_array_get(v, 0) : v;
		return lp_errf(err, -EINVAL,
		               "'%s': modules_to_save ('%.64s'...) is not supported: the adapter "
		               "replaces whole modules",
		               path, json_is_string(first) ? json_string_value(first) : "?");
	}
	for (size_t i = 0; i < sizeof(unsupported) / sizeof(unsupported[0]); i++) {
		v = json_object_get(c->root, unsupported[i].key);
		if (v && !json_is_null(v) && !json_is_false(v) &&
		    !(json_is_array(v) && !json_array_size(v)) &&
		    !(json_is_object(v) && !json_object_size(v)))
			return lp_errf(err, -EINVAL, "'%s': %s is set: %s are not supported", path,
			               unsupported[i].key, unsupported[i].what);
	}
	v = json_object_get(c->root, "task_type");
	if (v && !json_is_null(v) &&
	    !(json_is_string(v) && (!strcmp(json_string_value(v), "CAUSAL_LM"))))
		return lp_errf(err, -EINVAL,
		               "'%s': task_type '%.32s' is not supported (only CAUSAL_LM)", path,
		               json_is_string(v) ? json_string_value(v) : "?");
	v = json_object_get(c->root, "base_model_name_or_path");
	if (v && !json_is_null(v) && !json_is_string(v))
		return lp_errf(err, -EINVAL, "'%s': 'base_model_name_or_path' must be a string",
		               path);
	c->base_model = v && json_is_string(v) ? json_string_value(v) : NULL;

	if ((rc = read_patterns(c, "rank_pattern", true, &c->rank_pat, &c->n_rank_pat, err)) ||
	    (rc = read_patterns(c, "alpha_pattern", false, &c->alpha_pat, &c->n_alpha_pat, err)))
		return rc;
	return read_layers(c, s->n_layers, err);
}

static bool in_list_or_suffix(json_t *list, const char *name)
{
	size_t i, n = strlen(name);
	json_t *e;

	json_array_foreach(list, i, e)
	{
		const char *t = json_string_value(e);
		size_t m = strlen(t);
		if (!strcmp(t, name))
			return true;
		if (m < n && name[n - m - 1] == '.' && !strcmp(name + n - m, t))
			return true;
	}
	return false;
}

/* check_target_module_exists for one module name: 1 or 0, or a negative
 * code when a regular expression hits a match limit. */
static int is_targeted(const struct peft_config *c, const char *name, struct lp_err *err)
{
	PCRE2_SIZE *ov;
	bool found;
	int rc;

	if (c->exclude_re &&
	    (rc = re_match(c, c->exclude_re, name, true, "exclude_modules", c->exclude_str, err)))
		return rc < 0 ? rc : 0;
	if (c->exclude_list && in_list_or_suffix(c->exclude_list, name))
		return false;
	if (c->all_linear)
		return true;
	if (c->target_re)
		return re_match(c, c->target_re, name, true, "target_modules", c->target_str, err);
	if (!c->target_list)
		return false;
	for (size_t i = 0; i < json_array_size(c->target_list); i++) {
		if (!strcmp(json_string_value(json_array_get(c->target_list, i)), name))
			return true;
	}
	found = in_list_or_suffix(c->target_list, name);
	if (!found || !c->has_layers)
		return found;
	for (size_t i = 0; i < c->n_layer_re; i++) {
		long idx;
		char *end;

		rc = re_match(c, c->layer_re[i], name, false, "layers_pattern", c->layer_src[i],
		              err);
		if (rc < 0)
			return rc;
		if (!rc)
			continue;
		ov = pcre2_get_ovector_pointer(c->md);
		if (pcre2_get_ovector_count(c->md) < 2 || ov[2] == PCRE2_UNSET)
			return false;
		idx = strtol(name + ov[2], &end, 10);
		if (end != name + ov[3])
			return false;
		for (size_t k = 0; k < c->n_layers; k++) {
			if (c->layers[k] == idx)
				return true;
		}
		return false;
	}
	return false;
}

static void module_name(char *buf, size_t cap, const char *prefix, int layer, enum lp_lora_target t)
{
	snprintf(buf, cap, "%slayers.%d.%s.%s", prefix, layer, t <= LP_LORA_O ? "self_attn" : "mlp",
	         lp_lora_target_name(t));
}

/* Every target_modules entry must name one of the modules loraplane adapts;
 * a regex must select at least one and neither lm_head nor the embeddings. */
static int check_targets(const struct peft_config *c, const char *prefix,
                         const struct lp_lora_shape *s, struct lp_err *err)
{
	char name[KEY_MAX];
	static const char *const others[] = {"lm_head", "model.embed_tokens", "embed_tokens"};

	if (c->all_linear)
		return 0;
	if (c->target_re) {
		for (size_t i = 0; i < sizeof(others) / sizeof(others[0]); i++) {
			int rc = re_match(c, c->target_re, others[i], true, "target_modules",
			                  c->target_str, err);
			if (rc < 0)
				return rc;
			if (rc)
				return lp_errf(err, -EINVAL,
				               "module '%s' is not supported (lora targets: %s)",
				               others[i], LORA_SUPPORTED_TEXT);
		}
		for (int l = 0; l < s->n_layers; l++) {
			for (int t = 0; t < LP_LORA_N_TARGETS; t++) {
				int rc;
				module_name(name, sizeof(name), prefix, l, (enum lp_lora_target)t);
				rc = re_match(c, c->target_re, name, true, "target_modules",
				              c->target_str, err);
				if (rc)
					return rc < 0 ? rc : 0;
			}
		}
		return lp_errf(err, -EINVAL,
		               "'%s': target_modules '%.100s' selects no module of the base model",
		               c->path, c->target_str);
	}
	for (size_t i = 0; i < json_array_size(c->target_list); i++) {
		const char *e = json_string_value(json_array_get(c->target_list, i));
		json_t *one = json_pack("[s]", e);
		bool hit = false;

		if (!one)
			return lp_errf(err, -ENOMEM, "out of memory");
		for (int l = 0; l < s->n_layers && !hit; l++) {
			for (int t = 0; t < LP_LORA_N_TARGETS && !hit; t++) {
				module_name(name, sizeof(name), prefix, l, (enum lp_lora_target)t);
				hit = in_list_or_suffix(one, name);
			}
		}
		json_decref(one);
		if (!hit)
			return lp_errf(err, -EINVAL,
			               "module '%.100s' is not supported (lora targets: %s)", e,
			               LORA_SUPPORTED_TEXT);
	}
	return 0;
}

/* Where each tensor goes: [layer][target][0 = A, 1 = B] → tensor index + 1. */
struct slots {
	size_t *idx;
};

static int parse_layer_module(const char *m, size_t len, int *layer, enum lp_lora_target *target,
                              bool *has_model_prefix)
{
	char buf[KEY_MAX];
	const char *p;
	char *end;
	long v;

	if (len >= sizeof(buf))
		return -1;
	memcpy(buf, m, len);
	buf[len] = '\0';
	p = buf;
	*has_model_prefix = !strncmp(p, "model.", 6);
	if (*has_model_prefix)
		p += 6;
	if (strncmp(p, "layers.", 7))
		return -1;
	p += 7;
	if (*p < '0' || *p > '9' || strspn(p, "0123456789") > 9)
		return -1;
	v = strtol(p, &end, 10);
	if (*end != '.')
		return -1;
	p = end + 1;
	for (int t = 0; t < LP_LORA_N_TARGETS; t++) {
		char want[32];
		snprintf(want, sizeof(want), "%s.%s", t <= LP_LORA_O ? "self_attn" : "mlp",
		         lp_lora_target_name((enum lp_lora_target)t));
		if (!strcmp(p, want)) {
			*layer = (int)v;
			*target = (enum lp_lora_target)t;
			return 0;
		}
	}
	return -1;
}

struct tensor_list {
	struct lp_fmt_tensor *t;
	size_t n;
	const char *file;
};

/* bias "lora_only" or "all" with no bias of the base model in the file
 * computes what "none" does; with one, the adapter changes the base
 * model's biases, which loraplane does not do. */
static int check_bias(const struct peft_config *c, const struct tensor_list *tl, struct lp_err *err)
{
	if (!c->bias)
		return 0;
	for (size_t i = 0; i < tl->n; i++) {
		const char *name = tl->t[i].name;
		size_t n = strlen(name);

		if (n > 5 && !strcmp(name + n - 5, ".bias") && !strstr(name, ".lora_"))
			return lp_errf(err, -EINVAL,
			               "'%s': bias '%s' is not supported (only 'none'): the "
			               "adapter trains the base model's biases ('%s' in '%s')",
			               c->path, c->bias, name, tl->file);
	}
	return 0;
}

/* Places every tensor in its slot, rejecting what is not a LoRA A/B weight
 * of a supported module. */
static int place_tensors(const struct tensor_list *tl, const struct lp_lora_shape *s, size_t *slots,
                         int *prefix_kind, struct lp_err *err)
{
	static const char head[] = "base_model.model.";
	const char *adapter = NULL;
	size_t adapter_len = 0;
	int rc;

	*prefix_kind = -1;
	for (size_t i = 0; i < tl->n; i++) {
		const char *name = tl->t[i].name, *rest, *lora, *tail, *w;
		enum lp_lora_target target;
		int layer, ab;
		bool mp;
		size_t *slot, n;

		if (strncmp(name, head, sizeof(head) - 1))
			return lp_errf(err, -EINVAL,
			               "unexpected tensor '%s' in '%s' (lora weights are named "
			               "base_model.model.<module>.lora_A.weight)",
			               name, tl->file);
		rest = name + sizeof(head) - 1;
		lora = strstr(rest, ".lora_");
		if (!lora) {
			n = strlen(rest);
			if (n > 5 && !strcmp(rest + n - 5, ".bias"))
				return lp_errf(
				    err, -EINVAL,
				    "'%s' in '%s' is a bias; adapters that train biases are not "
				    "supported",
				    name, tl->file);
			return lp_errf(err, -EINVAL,
			               "unexpected tensor '%s' in '%s': not a lora A or B weight "
			               "(modules_to_save and full weights are not supported)",
			               name, tl->file);
		}
		tail = lora + 1;
		if (!strncmp(tail, "lora_magnitude_vector", 21))
			return lp_errf(
			    err, -EINVAL,
			    "'%s' in '%s' is a DoRA magnitude vector; DoRA adapters are not "
			    "supported",
			    name, tl->file);
		if (!strncmp(tail, "lora_embedding_", 15))
			return lp_errf(err, -EINVAL,
			               "module '%.*s' is not supported (lora targets: %s)",
			               (int)(lora - rest), rest, LORA_SUPPORTED_TEXT);
		if (strncmp(tail, "lora_A.", 7) && strncmp(tail, "lora_B.", 7))
			return lp_errf(err, -EINVAL, "unexpected tensor '%s' in '%s'", name,
			               tl->file);
		ab = tail[5] == 'B';
		w = tail + 7;
		n = strlen(w);
		if (n >= 5 && !strcmp(w + n - 5, ".bias"))
			return lp_errf(err, -EINVAL,
			               "'%s' in '%s' is a bias; lora_B biases are not supported",
			               name, tl->file);
		if (n == 4 && !strcmp(w, "bias"))
			return lp_errf(err, -EINVAL,
			               "'%s' in '%s' is a bias; lora_B biases are not supported",
			               name, tl->file);
		if (strcmp(w, "weight")) {
			/* lora_A.<adapter name>.weight, as older PEFT saved */
			const char *dot = strchr(w, '.');
			if (!dot || dot == w || strcmp(dot, ".weight"))
				return lp_errf(err, -EINVAL, "unexpected tensor '%s' in '%s'", name,
				               tl->file);
			if (adapter &&
			    ((size_t)(dot - w) != adapter_len || strncmp(adapter, w, adapter_len)))
				return lp_errf(
				    err, -EINVAL,
				    "'%s' in '%s' belongs to adapter '%.*s', other tensors to "
				    "'%.*s'; one adapter per file",
				    name, tl->file, (int)(dot - w), w, (int)adapter_len, adapter);
			adapter = w;
			adapter_len = (size_t)(dot - w);
		}
		rc = lora_check_float(&tl->t[i], err);
		if (rc)
			return lp_err_prefix(err, "'%s'", tl->file);
		if (parse_layer_module(rest, (size_t)(lora - rest), &layer, &target, &mp))
			return lp_errf(err, -EINVAL,
			               "module '%.*s' is not supported (lora targets: %s)",
			               (int)(lora - rest), rest, LORA_SUPPORTED_TEXT);
		if (layer >= s->n_layers)
			return lp_errf(err, -EINVAL,
			               "layer %d of '%s' is out of range (the base model has %d "
			               "layers)",
			               layer, name, s->n_layers);
		if (*prefix_kind >= 0 && *prefix_kind != (int)mp)
			return lp_errf(err, -EINVAL,
			               "'%s' in '%s': tensor names mix 'model.layers' and 'layers'",
			               name, tl->file);
		*prefix_kind = mp;
		slot = &slots[((size_t)layer * LP_LORA_N_TARGETS + target) * 2 + ab];
		if (*slot)
			return lp_errf(err, -EINVAL, "'%s' and '%s' in '%s' are the same weight",
			               tl->t[*slot - 1].name, name, tl->file);
		*slot = i + 1;
	}
	if (*prefix_kind < 0)
		*prefix_kind = 1;
	return 0;
}

static int build_plan(struct peft_config *c, const struct tensor_list *tl,
                      const struct lp_lora_shape *s, struct lora_plan *plan, struct lp_err *err)
{
	size_t *slots;
	int prefix_kind, rc, present = 0;
	const char *prefix;

	slots = calloc((size_t)s->n_layers * LP_LORA_N_TARGETS * 2, sizeof(*slots));
	if (!slots)
		return lp_errf(err, -ENOMEM, "out of memory");
	rc = check_bias(c, tl, err);
	if (!rc)
		rc = place_tensors(tl, s, slots, &prefix_kind, err);
	if (rc)
		goto out;
	prefix = prefix_kind ? "model." : "";
	rc = check_targets(c, prefix, s, err);
	if (rc)
		goto out;
	for (int l = 0; l < s->n_layers; l++) {
		for (int t = 0; t < LP_LORA_N_TARGETS; t++) {
			size_t *sl = &slots[((size_t)l * LP_LORA_N_TARGETS + t) * 2];
			const struct lp_fmt_tensor *a = sl[0] ? &tl->t[sl[0] - 1] : NULL;
			const struct lp_fmt_tensor *b = sl[1] ? &tl->t[sl[1] - 1] : NULL;
			const struct pattern *pr, *pa;
			struct lora_plan_pair *pp;
			char name[KEY_MAX];
			int in, out, r;
			double alpha;

			module_name(name, sizeof(name), prefix, l, (enum lp_lora_target)t);
			rc = is_targeted(c, name, err);
			if (rc < 0)
				goto out;
			if (!rc) {
				if (a || b) {
					rc = lp_errf(
					    err, -EINVAL,
					    "'%s' is for module '%s', which target_modules in "
					    "adapter_config.json does not select",
					    (a ? a : b)->name, name);
					goto out;
				}
				continue;
			}
			if (!a && !b) { /* as PEFT: B stays 0, the module adds nothing */
				lp_lora_absent_add(&plan->absent, l, (enum lp_lora_target)t);
				continue;
			}
			if (!a || !b) {
				rc = lp_errf(err, -EINVAL, "'%s' has no matching lora_%s in '%s'",
				             (a ? a : b)->name, a ? "B" : "A", tl->file);
				goto out;
			}
			rc = find_pattern(c, "rank_pattern", c->rank_pat, c->n_rank_pat, name, &pr,
			                  err);
			if (!rc)
				rc = find_pattern(c, "alpha_pattern", c->alpha_pat, c->n_alpha_pat,
				                  name, &pa, err);
			if (rc)
				goto out;
			r = pr ? (int)pr->value : c->r;
			alpha = pa ? pa->value : c->alpha;
			lp_lora_target_dims(s, (enum lp_lora_target)t, &in, &out);
			if (a->n_dims == 2 && a->shape[1] == in && a->shape[0] != r) {
				rc = lp_errf(
				    err, -EINVAL,
				    "'%s' has rank %lld, but adapter_config.json gives '%s' rank "
				    "%d",
				    a->name, (long long)a->shape[0], name, r);
				goto out;
			}
			if ((rc = lora_check_shape(a, r, in, err)) ||
			    (rc = lora_check_shape(b, out, r, err)))
				goto out;
			pp = lora_plan_at(plan, l, (enum lp_lora_target)t);
			pp->rank = r;
			pp->a = (struct lora_src){a->data, a->type, a->name};
			pp->b = (struct lora_src){b->data, b->type, b->name};
			pp->scale = c->rslora ? alpha / sqrt((double)r) : alpha / (double)r;
			present++;
		}
	}
	if (!present && plan->absent.n)
		rc = lp_errf(err, -EINVAL,
		             "'%s' holds no lora weights for any of the %d modules "
		             "adapter_config.json targets",
		             tl->file, plan->absent.n);
out:
	free(slots);
	return rc;
}

static bool file_exists(const char *path)
{
	struct stat st;
	return stat(path, &st) == 0;
}

int lora_load_peft(struct lp_lora **out, const char *root, const char *dir,
                   const struct lp_lora_shape *s, struct lp_err *err)
{
	char cfg_path[4096], wpath[4096];
	struct peft_config c;
	struct lp_safetensors *st = NULL;
	struct lp_torch_ckpt *ck = NULL;
	struct tensor_list tl = {0};
	struct lora_plan plan = {0};
	const char *format;
	int rc;

	*out = NULL;
	if (strlen(dir) > sizeof(wpath) - 64)
		return lp_errf(err, -ENAMETOOLONG, "adapter path '%.100s...' is too long", dir);
	rc = read_config(&c, root, dir, cfg_path, sizeof(cfg_path), s, err);
	if (rc)
		goto out;
	rc = lora_check_base_model(c.base_model, s, err);
	if (rc)
		goto out;

	snprintf(wpath, sizeof(wpath), "%s/adapter_model.safetensors", dir);
	if (file_exists(wpath)) {
		format = "peft";
		rc = lp_safetensors_open_file_in(&st, root, wpath, err);
		if (rc)
			goto out;
		tl.n = lp_safetensors_count(st);
	} else {
		snprintf(wpath, sizeof(wpath), "%s/adapter_model.bin", dir);
		if (!file_exists(wpath)) {
			rc = lp_errf(
			    err, -ENOENT,
			    "'%s' has adapter_config.json but no adapter_model.safetensors or "
			    "adapter_model.bin",
			    dir);
			goto out;
		}
		format = "peft-bin";
		rc = lp_torch_ckpt_open_in(&ck, root, wpath, err);
		if (rc)
			goto out;
		tl.n = lp_torch_ckpt_count(ck);
	}
	tl.file = wpath;
	tl.t = calloc(tl.n ? tl.n : 1, sizeof(*tl.t));
	if (!tl.t) {
		rc = lp_errf(err, -ENOMEM, "out of memory");
		goto out;
	}
	for (size_t i = 0; i < tl.n; i++)
		tl.t[i] = st ? *lp_safetensors_at(st, i) : *lp_torch_ckpt_at(ck, i);
	rc = lora_plan_init(&plan, s->n_layers, err);
	if (rc)
		goto out;
	rc = build_plan(&c, &tl, s, &plan, err);
	if (rc)
		goto out;
	rc = lora_plan_finish(out, &plan, s, format, c.base_model, err);
out:
	lora_plan_release(&plan);
	free(tl.t);
	lp_safetensors_free(st);
	lp_torch_ckpt_free(ck);
	config_release(&c);
	return rc;
}
