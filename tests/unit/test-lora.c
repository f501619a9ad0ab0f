/* Multi-LoRA serving against the real peft: every adapter of
 * tests/fixtures/goldens/lora-*.json gives transformers + peft's greedy
 * tokens and logits, alone and in mixed batches, from every converted
 * format; and the adapter tiers behave: LRU eviction, pinning, in-place
 * reload, unload while running, the host-tier-full refusal. */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>

#include "agent/engine/engine.h"
#include "agent/engine/model.h"
#include "common/buf.h"
#include "tests/test.h"

#define N_GREEDY 32
#define MAX_REQ  64

struct req {
	const char *adapter; /* NULL: base */
	int32_t ids[512];
	int n_ids;
	int32_t greedy[N_GREEDY];
	float *logits; /* reference first-step logits or NULL */
	float range;
};

static struct lp_backend *be;
static struct lp_model *tiny, *smol;

static int read_req(json_t *p, struct req *r, int vocab)
{
	json_t *ids = json_object_get(p, "ids"), *greedy = json_object_get(p, "greedy"), *v;
	const char *lf = json_string_value(json_object_get(p, "logits_file"));
	size_t i;

	memset(r, 0, sizeof(*r));
	if (!json_is_array(ids) || json_array_size(ids) > 512 || !json_is_array(greedy) ||
	    json_array_size(greedy) != N_GREEDY)
		return -1;
	json_array_foreach(ids, i, v) r->ids[i] = (int32_t)json_integer_value(v);
	r->n_ids = (int)json_array_size(ids);
	json_array_foreach(greedy, i, v) r->greedy[i] = (int32_t)json_integer_value(v);
	if (lf) {
		char path[512];
		struct lp_buf b;
		lp_buf_init(&b, 64u << 20);
		snprintf(path, sizeof(path), "%s/goldens/%s", test_fixtures_dir(), lf);
		if (lp_buf_read_file(&b, path, 64u << 20, NULL) ||
		    b.len != (size_t)vocab * sizeof(float)) {
			lp_buf_release(&b);
			return -1;
		}
		r->logits = (float *)lp_buf_detach(&b, NULL);
		r->range = (float)(json_number_value(json_object_get(p, "logit_max")) -
		                   json_number_value(json_object_get(p, "logit_min")));
	}
	return 0;
}

static void small_config(struct lp_engine_config *ec)
{
	lp_engine_config_default(ec);
	ec->max_model_len = 256;
	ec->kv_cache_bytes = 64u << 20;
	ec->max_num_seqs = 32;
}

/* Runs reqs as one batch; out[i] gets each one's tokens and, when first is
 * set, first[i] its first logits. Returns 0 or a negative code. */
static int run(struct lp_engine *e, struct req *reqs, int n, int32_t (*out)[N_GREEDY],
               float **first, struct lp_err *err)
{
	struct lp_seq *seqs[MAX_REQ] = {0};
	int counts[MAX_REQ] = {0}, rc = 0;

	for (int i = 0; i < n; i++) {
		struct lp_seq_params p = {0};
		p.adapter = reqs[i].adapter;
		p.prompt = reqs[i].ids;
		p.n_prompt = (size_t)reqs[i].n_ids;
		p.max_tokens = N_GREEDY;
		p.ignore_eos = true;
		lp_sampling_params_default(&p.sampling);
		p.sampling.temperature = 0;
		if ((rc = lp_engine_add(e, &p, &seqs[i], err)))
			goto out;
		seqs[i]->user = (void *)(intptr_t)i;
	}
	while (lp_engine_has_work(e)) {
		const struct lp_step_output *o;
		int n_o;
		if ((rc = lp_engine_step(e, &o, &n_o, err)))
			goto out;
		for (int k = 0; k < n_o; k++) {
			int i = (int)(intptr_t)o[k].seq->user;
			if (counts[i] == 0 && first && first[i])
				memcpy(first[i], o[k].logits,
				       (size_t)o[k].seq->sampler.vocab * sizeof(float));
			if (counts[i] < N_GREEDY)
				out[i][counts[i]++] = o[k].token;
		}
	}
out:
	for (int i = 0; i < n; i++)
		lp_engine_release(e, seqs[i]);
	return rc;
}

static bool same_tokens(const int32_t *a, const int32_t *b)
{
	return !memcmp(a, b, N_GREEDY * sizeof(int32_t));
}

/* ---- goldens of every adapter ---- */

static int checked_adapters, checked_variants;

/* One golden file: the adapter and each of its converted variants, every
 * prompt alone. */
static void check_golden_file(const char *file)
{
	char path[512];
	json_error_t jerr;
	json_t *root, *arr, *v;
	struct req reqs[16];
	int n = 0;
	size_t i;
	struct lp_err err = {0};
	struct lp_model *m;
	const char *adapter;

	snprintf(path, sizeof(path), "%s/goldens/%s", test_fixtures_dir(), file);
	root = json_load_file(path, 0, &jerr);
	CHECK_MSG(root, "%s: %s", path, jerr.text);
	adapter = json_string_value(json_object_get(root, "adapter"));
	m = strstr(file, "-smollm2-") ? smol : tiny;
	arr = json_object_get(root, "prompts");
	json_array_foreach(arr, i, v)
	{
		if (n < 16 && read_req(v, &reqs[n], m->cfg.vocab_size) == 0)
			n++;
	}
	if (!adapter || n == 0) {
		json_decref(root);
		CHECK_MSG(0, "%s: no adapter or prompts", path);
	}

	/* the adapter itself, then every converted variant */
	json_t *variants = json_object_get(root, "variants");
	size_t n_paths = 1 + (json_is_array(variants) ? json_array_size(variants) : 0);
	for (size_t k = 0; k < n_paths; k++) {
		const char *apath =
		    k == 0 ? adapter : json_string_value(json_array_get(variants, k - 1));
		struct lp_engine_config ec;
		struct lp_engine *e = NULL;
		bool already;
		float *first = malloc((size_t)m->cfg.vocab_size * sizeof(float));
		int32_t toks[1][N_GREEDY];
		char failure[1200] = "";

		small_config(&ec);
		if (lp_engine_new(&e, m, &ec, &err)) {
			free(first);
			snprintf(failure, sizeof(failure), "engine: %s", err.msg);
		} else if (lp_lora_cache_load(lp_engine_loras(e), "x", apath, NULL, NULL, false,
		                              &already, &err)) {
			snprintf(failure, sizeof(failure), "%s: %s", apath, err.msg);
		} else {
			double worst_rel = 0;
			for (int r = 0; r < n && !failure[0]; r++) {
				float *firsts[1] = {first};
				reqs[r].adapter = "x";
				if (run(e, &reqs[r], 1, toks, firsts, &err)) {
					snprintf(failure, sizeof(failure), "%s: %s", apath,
					         err.msg);
					break;
				}
				if (!same_tokens(toks[0], reqs[r].greedy))
					snprintf(failure, sizeof(failure),
					         "%s prompt %d: greedy tokens differ from peft's",
					         apath, r);
				for (int t = 0; reqs[r].logits && t < m->cfg.vocab_size; t++) {
					double d =
					    fabs(first[t] - reqs[r].logits[t]) / reqs[r].range;
					if (d > worst_rel)
						worst_rel = d;
				}
			}
			if (!failure[0] && worst_rel > 1e-3)
				snprintf(failure, sizeof(failure),
				         "%s: logits differ from peft's by %.2e of the range",
				         apath, worst_rel);
			printf("  %s: %d prompts, max |logit - peft| = %.2e of the range\n", apath,
			       n, worst_rel);
		}
		if (e)
			lp_engine_free(e);
		free(first);
		if (failure[0]) {
			for (int r = 0; r < n; r++)
				free(reqs[r].logits);
			json_decref(root);
			CHECK_MSG(0, "%s", failure);
		}
		if (k == 0)
			checked_adapters++;
		else
			checked_variants++;
	}
	for (int r = 0; r < n; r++)
		free(reqs[r].logits);
	json_decref(root);
}

static void test_adapters_match_peft(void)
{
	char dirpath[512];
	DIR *d;
	struct dirent *de;
	char *names[64];
	int n = 0;

	snprintf(dirpath, sizeof(dirpath), "%s/goldens", test_fixtures_dir());
	d = opendir(dirpath);
	CHECK(d);
	while ((de = readdir(d)) && n < 64) {
		size_t len = strlen(de->d_name);
		if (!strncmp(de->d_name, "lora-", 5) && len > 5 &&
		    !strcmp(de->d_name + len - 5, ".json") && !strstr(de->d_name, "mixed"))
			names[n++] = strdup(de->d_name);
	}
	closedir(d);
	for (int i = 0; i < n; i++) {
		int before = test_current_failed;
		check_golden_file(names[i]);
		free(names[i]);
		if (test_current_failed && !before) {
			for (int j = i + 1; j < n; j++)
				free(names[j]);
			return;
		}
	}
	printf("  %d adapters and %d converted variants checked\n", checked_adapters,
	       checked_variants);
	CHECK_MSG(checked_adapters >= 10, "only %d adapter goldens found", checked_adapters);
	CHECK_MSG(checked_variants >= 4, "only %d converted variants found", checked_variants);
}

/* ---- mixed batches ---- */

static struct req mixed[MAX_REQ];
static int n_mixed;
static char mixed_names[MAX_REQ][64];

static int load_mixed(void)
{
	char path[512];
	json_error_t jerr;
	json_t *root, *arr, *v;
	size_t i;

	snprintf(path, sizeof(path), "%s/goldens/lora-tiny-mixed.json", test_fixtures_dir());
	root = json_load_file(path, 0, &jerr);
	if (!root)
		return -1;
	arr = json_object_get(root, "requests");
	json_array_foreach(arr, i, v)
	{
		const char *a = json_string_value(json_object_get(v, "adapter"));
		if (n_mixed == MAX_REQ || read_req(v, &mixed[n_mixed], tiny->cfg.vocab_size))
			break;
		if (a) {
			snprintf(mixed_names[n_mixed], sizeof(mixed_names[0]), "%s", a);
			mixed[n_mixed].adapter = mixed_names[n_mixed];
		}
		n_mixed++;
	}
	json_decref(root);
	return n_mixed >= 24 ? 0 : -1;
}

/* Loads every adapter the mixed requests name, from tests/fixtures/lora/tiny. */
static int load_tiny_adapters(struct lp_engine *e, struct lp_err *err)
{
	for (int i = 0; i < n_mixed; i++) {
		char path[512];
		bool already;
		if (!mixed[i].adapter || lp_lora_cache_find(lp_engine_loras(e), mixed[i].adapter))
			continue;
		snprintf(path, sizeof(path), "%s/lora/tiny/%s", test_fixtures_dir(),
		         mixed[i].adapter);
		int rc = lp_lora_cache_load(lp_engine_loras(e), mixed[i].adapter, path, NULL, NULL,
		                            false, &already, err);
		if (rc)
			return rc;
	}
	return 0;
}

static void check_mixed(int max_loras, int max_batched, int max_seqs)
{
	struct lp_engine_config ec;
	struct lp_engine *e;
	struct lp_err err = {0};
	int32_t toks[MAX_REQ][N_GREEDY];
	int rc;

	small_config(&ec);
	ec.max_loras = max_loras;
	ec.max_cpu_loras = 16;
	ec.max_batched_tokens = max_batched;
	ec.max_num_seqs = max_seqs;
	CHECK_OK(lp_engine_new(&e, tiny, &ec, &err), &err);
	rc = load_tiny_adapters(e, &err);
	if (!rc)
		rc = run(e, mixed, n_mixed, toks, NULL, &err);
	lp_engine_free(e);
	CHECK_MSG(rc == 0, "%s", err.msg);
	for (int i = 0; i < n_mixed; i++)
		CHECK_MSG(same_tokens(toks[i], mixed[i].greedy),
		          "request %d (adapter %s): tokens differ from its solo run", i,
		          mixed[i].adapter ? mixed[i].adapter : "base");
}

/* 24 requests over 6 adapters and the base model, one batch. */
static void test_mixed_batch_equals_alone(void)
{
	check_mixed(8, 512, 32);
}

/* The same with 2 device slots: requests wait for a slot, slots turn over. */
static void test_mixed_batch_two_slots(void)
{
	check_mixed(2, 512, 32);
}

/* And with chunked prefill and few sequences at a time. */
static void test_mixed_batch_chunked(void)
{
	check_mixed(3, 9, 6);
}

/* ---- tiers ---- */

static struct lp_engine *tier_engine(int max_loras, int max_cpu_loras, struct lp_err *err)
{
	struct lp_engine_config ec;
	struct lp_engine *e;

	small_config(&ec);
	ec.max_loras = max_loras;
	ec.max_cpu_loras = max_cpu_loras;
	return lp_engine_new(&e, tiny, &ec, err) ? NULL : e;
}

static int load_as(struct lp_engine *e, const char *name, const char *dir, bool inplace,
                   struct lp_err *err)
{
	char path[512];
	bool already;

	snprintf(path, sizeof(path), "%s/lora/tiny/%s", test_fixtures_dir(), dir);
	return lp_lora_cache_load(lp_engine_loras(e), name, path, NULL, NULL, inplace, &already,
	                          err);
}

static enum lp_adapter_tier tier_of(struct lp_engine *e, const char *name)
{
	struct lp_adapter *a = lp_lora_cache_find(lp_engine_loras(e), name);
	return a ? lp_adapter_tier(a) : (enum lp_adapter_tier) - 1;
}

/* Host tier of 3: a fourth load evicts the least recently used idle one to
 * disk, and using it again brings it back. */
static void test_host_lru_eviction(void)
{
	struct lp_err err = {0};
	struct lp_engine *e = tier_engine(1, 3, &err);
	struct lp_adapter *a;

	CHECK_MSG(e, "%s", err.msg);
	CHECK_OK(load_as(e, "a", "r4-qv", false, &err), &err);
	CHECK_OK(load_as(e, "b", "r8-all", false, &err), &err);
	CHECK_OK(load_as(e, "c", "r16-attn", false, &err), &err);
	/* touch a, so b becomes the least recently used */
	CHECK_OK(lp_lora_cache_acquire(lp_engine_loras(e), "a", &a, &err), &err);
	lp_lora_cache_release(lp_engine_loras(e), a);
	CHECK_OK(load_as(e, "d", "r64-mlp", false, &err), &err);
	CHECK_EQ_INT(tier_of(e, "b"), LP_TIER_DISK);
	CHECK_EQ_INT(tier_of(e, "a"), LP_TIER_HOST);
	CHECK_EQ_INT(tier_of(e, "c"), LP_TIER_HOST);
	CHECK_EQ_INT(tier_of(e, "d"), LP_TIER_HOST);
	/* b comes back from disk; now c is the oldest */
	CHECK_OK(lp_lora_cache_acquire(lp_engine_loras(e), "b", &a, &err), &err);
	lp_lora_cache_release(lp_engine_loras(e), a);
	CHECK_EQ_INT(tier_of(e, "b"), LP_TIER_HOST);
	CHECK_EQ_INT(tier_of(e, "c"), LP_TIER_DISK);
	struct lp_lora_cache_stats st;
	lp_lora_cache_stats(lp_engine_loras(e), &st);
	CHECK_EQ_INT(st.host_evictions, 2);
	CHECK_EQ_INT(st.on_disk, 1);
	CHECK_EQ_INT(st.on_host, 3);
	lp_engine_free(e);
}

/* One device slot: a request for a second adapter waits until the first
 * adapter's request is done (its slot is pinned), then takes the slot; both
 * give their solo tokens. */
static void test_device_slot_pinning(void)
{
	struct lp_err err = {0};
	struct lp_engine *e = tier_engine(1, 4, &err);
	struct req r[2];
	int32_t toks[2][N_GREEDY];
	int ia = -1, ib = -1;

	CHECK_MSG(e, "%s", err.msg);
	for (int i = 0; i < n_mixed; i++) {
		if (mixed[i].adapter && ia < 0)
			ia = i;
		else if (mixed[i].adapter && ia >= 0 &&
		         strcmp(mixed[i].adapter, mixed[ia].adapter) && ib < 0)
			ib = i;
	}
	CHECK(ia >= 0 && ib >= 0);
	r[0] = mixed[ia];
	r[1] = mixed[ib];
	CHECK_OK(load_tiny_adapters(e, &err), &err);
	/* step by step: after the first step only one adapter runs */
	struct lp_seq *s[2];
	for (int i = 0; i < 2; i++) {
		struct lp_seq_params p = {0};
		p.adapter = r[i].adapter;
		p.prompt = r[i].ids;
		p.n_prompt = (size_t)r[i].n_ids;
		p.max_tokens = N_GREEDY;
		p.ignore_eos = true;
		lp_sampling_params_default(&p.sampling);
		p.sampling.temperature = 0;
		CHECK_OK(lp_engine_add(e, &p, &s[i], &err), &err);
	}
	int counts[2] = {0};
	bool overlapped = false;
	while (lp_engine_has_work(e)) {
		const struct lp_step_output *o;
		int n_o;
		CHECK_OK(lp_engine_step(e, &o, &n_o, &err), &err);
		if (s[0]->state == LP_SEQ_RUNNING && s[1]->state == LP_SEQ_RUNNING)
			overlapped = true;
		for (int k = 0; k < n_o; k++) {
			int i = o[k].seq == s[1];
			if (counts[i] < N_GREEDY)
				toks[i][counts[i]++] = o[k].token;
		}
	}
	CHECK_MSG(!overlapped, "two adapters ran at once with one device slot");
	CHECK(same_tokens(toks[0], r[0].greedy));
	CHECK(same_tokens(toks[1], r[1].greedy));
	lp_engine_release(e, s[0]);
	lp_engine_release(e, s[1]);
	lp_engine_free(e);
}

/* Replacing an adapter in place: the running request finishes on the old
 * weights, a new one gets the new weights. */
static void test_inplace_reload(void)
{
	struct lp_err err = {0};
	struct lp_engine *e = tier_engine(2, 4, &err);
	struct req old_req, new_req;
	bool found_old = false, found_new = false;

	CHECK_MSG(e, "%s", err.msg);
	for (int i = 0; i < n_mixed; i++) {
		if (mixed[i].adapter && !strcmp(mixed[i].adapter, "r4-qv") && !found_old) {
			old_req = mixed[i];
			found_old = true;
		}
		if (mixed[i].adapter && !strcmp(mixed[i].adapter, "r8-all") && !found_new) {
			new_req = mixed[i];
			found_new = true;
		}
	}
	CHECK_MSG(found_old && found_new, "the mixed golden needs r4-qv and r8-all requests");
	CHECK_OK(load_as(e, "x", "r4-qv", false, &err), &err);
	old_req.adapter = "x";
	new_req.adapter = "x";
	struct lp_seq_params p = {0};
	struct lp_seq *s_old, *s_new;
	int32_t t_old[N_GREEDY], t_new[N_GREEDY];
	int c_old = 0, c_new = 0;
	p.adapter = "x";
	p.prompt = old_req.ids;
	p.n_prompt = (size_t)old_req.n_ids;
	p.max_tokens = N_GREEDY;
	p.ignore_eos = true;
	lp_sampling_params_default(&p.sampling);
	p.sampling.temperature = 0;
	CHECK_OK(lp_engine_add(e, &p, &s_old, &err), &err);
	/* a few steps on the old weights */
	for (int i = 0; i < 3; i++) {
		const struct lp_step_output *o;
		int n_o;
		CHECK_OK(lp_engine_step(e, &o, &n_o, &err), &err);
		for (int k = 0; k < n_o; k++)
			t_old[c_old++] = o[k].token;
	}
	/* same name, another source, without load_inplace: refused */
	CHECK_EQ_INT(load_as(e, "x", "r8-all", false, &err), -EEXIST);
	CHECK_OK(load_as(e, "x", "r8-all", true, &err), &err);
	p.prompt = new_req.ids;
	p.n_prompt = (size_t)new_req.n_ids;
	CHECK_OK(lp_engine_add(e, &p, &s_new, &err), &err);
	CHECK(s_new->adapter != s_old->adapter);
	while (lp_engine_has_work(e)) {
		const struct lp_step_output *o;
		int n_o;
		CHECK_OK(lp_engine_step(e, &o, &n_o, &err), &err);
		for (int k = 0; k < n_o; k++) {
			if (o[k].seq == s_old && c_old < N_GREEDY)
				t_old[c_old++] = o[k].token;
			else if (o[k].seq == s_new && c_new < N_GREEDY)
				t_new[c_new++] = o[k].token;
		}
	}
	CHECK_MSG(same_tokens(t_old, old_req.greedy), "the running request changed weights");
	CHECK_MSG(same_tokens(t_new, new_req.greedy),
	          "the new request did not get the new weights");
	lp_engine_release(e, s_old);
	lp_engine_release(e, s_new);
	lp_engine_free(e);
}

/* Unloading while a request runs: it finishes on its weights; new requests
 * for the name are refused. */
static void test_unload_while_running(void)
{
	struct lp_err err = {0};
	struct lp_engine *e = tier_engine(2, 4, &err);
	struct req r = {0};
	struct lp_seq *s;
	int32_t t[N_GREEDY];
	int c = 0;

	CHECK_MSG(e, "%s", err.msg);
	for (int i = 0; i < n_mixed && !r.adapter; i++)
		if (mixed[i].adapter && !strcmp(mixed[i].adapter, "r8-all"))
			r = mixed[i];
	CHECK(r.adapter);
	CHECK_OK(load_as(e, "y", "r8-all", false, &err), &err);
	struct lp_seq_params p = {0};
	p.adapter = "y";
	p.prompt = r.ids;
	p.n_prompt = (size_t)r.n_ids;
	p.max_tokens = N_GREEDY;
	p.ignore_eos = true;
	lp_sampling_params_default(&p.sampling);
	p.sampling.temperature = 0;
	CHECK_OK(lp_engine_add(e, &p, &s, &err), &err);
	const struct lp_step_output *o;
	int n_o;
	CHECK_OK(lp_engine_step(e, &o, &n_o, &err), &err);
	for (int k = 0; k < n_o; k++)
		t[c++] = o[k].token;
	CHECK_OK(lp_lora_cache_unload(lp_engine_loras(e), "y", &err), &err);
	CHECK(lp_lora_cache_find(lp_engine_loras(e), "y") == NULL);
	struct lp_seq *s2;
	CHECK_EQ_INT(lp_engine_add(e, &p, &s2, &err), -ENOENT);
	CHECK_EQ_INT(lp_lora_cache_unload(lp_engine_loras(e), "y", &err), -ENOENT);
	while (lp_engine_has_work(e)) {
		CHECK_OK(lp_engine_step(e, &o, &n_o, &err), &err);
		for (int k = 0; k < n_o; k++)
			if (c < N_GREEDY)
				t[c++] = o[k].token;
	}
	CHECK(same_tokens(t, r.greedy));
	lp_engine_release(e, s);
	lp_engine_free(e);
}

/* Host tier of 2, both adapters needed by queued requests: a request for a
 * third adapter, evicted to disk, is refused with -EAGAIN until one of them
 * is done. */
static void test_host_tier_full_refusal(void)
{
	struct lp_err err = {0};
	struct lp_engine *e = tier_engine(1, 2, &err);
	struct lp_seq *s[3] = {0};
	struct lp_seq_params p = {0};

	CHECK_MSG(e, "%s", err.msg);
	CHECK_OK(load_as(e, "a", "r4-qv", false, &err), &err);
	CHECK_OK(load_as(e, "b", "r8-all", false, &err), &err);
	CHECK_OK(load_as(e, "c", "r16-attn", false, &err), &err); /* a goes to disk */
	CHECK_EQ_INT(tier_of(e, "a"), LP_TIER_DISK);
	p.prompt = mixed[0].ids;
	p.n_prompt = (size_t)mixed[0].n_ids;
	p.max_tokens = 4;
	lp_sampling_params_default(&p.sampling);
	p.adapter = "b";
	CHECK_OK(lp_engine_add(e, &p, &s[0], &err), &err);
	p.adapter = "c";
	CHECK_OK(lp_engine_add(e, &p, &s[1], &err), &err);
	p.adapter = "a";
	CHECK_EQ_INT(lp_engine_add(e, &p, &s[2], &err), -EAGAIN);
	CHECK(strstr(err.msg, "host"));
	/* a full host tier of needed adapters also refuses a new load */
	CHECK_EQ_INT(load_as(e, "d", "r64-mlp", false, &err), -ENOSPC);
	lp_engine_release(e, s[0]);
	CHECK_OK(lp_engine_add(e, &p, &s[2], &err), &err);
	CHECK_EQ_INT(tier_of(e, "b"), LP_TIER_DISK);
	lp_engine_release(e, s[1]);
	lp_engine_release(e, s[2]);
	lp_engine_free(e);
}

/* Cancelling a request frees its cache blocks and its adapter at once. */
static void test_cancel_frees_blocks(void)
{
	struct lp_err err = {0};
	struct lp_engine *e = tier_engine(1, 2, &err);
	struct lp_engine_stats st;
	struct lp_seq *s;
	struct lp_seq_params p = {0};
	const struct lp_step_output *o;
	int n_o;

	CHECK_MSG(e, "%s", err.msg);
	CHECK_OK(load_as(e, "a", "r4-qv", false, &err), &err);
	p.adapter = "a";
	p.prompt = mixed[n_mixed - 1].ids;
	p.n_prompt = (size_t)mixed[n_mixed - 1].n_ids;
	p.max_tokens = 32;
	lp_sampling_params_default(&p.sampling);
	CHECK_OK(lp_engine_add(e, &p, &s, &err), &err);
	CHECK_OK(lp_engine_step(e, &o, &n_o, &err), &err);
	lp_engine_stats(e, &st);
	CHECK(st.kv_blocks_used > 0);
	struct lp_adapter *a = lp_lora_cache_find(lp_engine_loras(e), "a");
	CHECK_EQ_INT(a->running_refs, 1);
	lp_engine_finish(e, s);
	lp_engine_stats(e, &st);
	CHECK_EQ_INT(st.kv_blocks_used, 0);
	CHECK_EQ_INT(a->running_refs, 0);
	CHECK_EQ_INT(a->seq_refs, 0);
	CHECK_EQ_INT(s->finish, LP_FINISH_ABORT);
	CHECK(!lp_engine_has_work(e));
	lp_engine_release(e, s);
	lp_engine_free(e);
}

/* lora_id is stable (the same on every pod) and positive. */
static void test_lora_id_stable(void)
{
	CHECK(lp_lora_id("sql") > 0);
	CHECK_EQ_INT(lp_lora_id("sql"), lp_lora_id("sql"));
	CHECK(lp_lora_id("sql") != lp_lora_id("sql2"));
	/* FNV-1a of "a", masked to 31 bits */
	CHECK_EQ_INT(lp_lora_id("a"), 0xe40c292cu & 0x7fffffffu);
}

int main(void)
{
	struct lp_err err = {0};
	char path[512];
	const char *smol_path = getenv("MODEL");

	TEST_MAIN_BEGIN("test-lora");
	if (lp_backend_cpu_new(&be, 0, &err)) {
		printf("FAIL test-lora:backend: %s\n", err.msg);
		return 1;
	}
	snprintf(path, sizeof(path), "%s/tiny-llama", test_fixtures_dir());
	if (lp_model_load(&tiny, path, be, &err) ||
	    lp_model_load(&smol, smol_path ? smol_path : "models/smollm2-135m-instruct-q4_1.gguf",
	                  be, &err)) {
		printf("FAIL test-lora:models: %s\n", err.msg);
		return 1;
	}
	if (load_mixed()) {
		printf("FAIL test-lora:mixed_golden: cannot read lora-tiny-mixed.json\n");
		return 1;
	}
	RUN(test_lora_id_stable);
	RUN(test_adapters_match_peft);
	RUN(test_mixed_batch_equals_alone);
	RUN(test_mixed_batch_two_slots);
	RUN(test_mixed_batch_chunked);
	RUN(test_host_lru_eviction);
	RUN(test_device_slot_pinning);
	RUN(test_inplace_reload);
	RUN(test_unload_while_running);
	RUN(test_host_tier_full_refusal);
	RUN(test_cancel_frees_blocks);
	for (int i = 0; i < n_mixed; i++)
		free(mixed[i].logits);
	lp_model_free(tiny);
	lp_model_free(smol);
	lp_backend_destroy(be);
	TEST_MAIN_END();
}
