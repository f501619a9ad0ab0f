/* Adapter management shared by the admin API, vLLM's endpoints, the
 * startup flags and the lora-dir watcher: name rules (docs/api.md, section 4),
 * source resolution (agent/adapters/source.h) and the load itself on the
 * calling thread (lp_worker_lora_load), with every outcome mapped to the
 * HTTP status docs/api.md section 5.1 gives it. */
#ifndef LP_API_LORAS_H
#define LP_API_LORAS_H

#include <stdbool.h>

#include "agent/api/errors.h"
#include "agent/adapters/source.h"
#include "agent/api/server.h"
#include "agent/engine/worker.h"

#define LP_LORA_NAME_MAX 128

/* True when name is 1-128 characters of [A-Za-z0-9._:/-], holds no '..'
 * and does not start with '/'; otherwise err says why. */
bool lp_lora_name_valid(const char *name, struct lp_err *err);

struct lp_lora_load_args {
	const char *name;
	const char *uri;    /* file:///abs, /abs, s3://, hf://, https:// */
	const char *sha256; /* pin of the weights file, or NULL */
	bool inplace;       /* replace a loaded version from another source */
	bool from_api;      /* file:// only below --allowed-local-roots */
	/* every file of an operator-named local source is opened below this
	 * directory (the --lora-dir of its adapters), or NULL; API file://
	 * loads stay below their allowed root and remote ones below the cache
	 * whatever this says (lp_source_result.root) */
	const char *root;
	/* credentials for this download (NULL: the agent's environment) */
	const struct lp_source_credentials *creds;
};

/* Loads (or finds already loaded) an adapter. 0 with *already set when the
 * name was loaded from the same uri (and digest, when pinned); out (may be
 * NULL) describes the adapter. Errors, as a negative status with e:
 * 400 bad name/uri/pin (or the base model's name), 403 file:// outside the allowed roots, 404
 * source not found, 409 loaded from another source, 422 invalid adapter or digest mismatch, 429
 * busy, 502 remote source failed, 507 no room (in the engine, or in the download cache's
 * --lora-cache-max-bytes). 400 invalid_credentials for credentials the sources refuse (a
 * plain http endpoint without --allow-insecure-source-endpoints). A failed load of a
 * downloaded adapter removes its cache entry unless something else uses it. */
int lp_api_lora_load(struct lp_server *s, const struct lp_lora_load_args *a, bool *already,
                     struct lp_adapter_summary *out, struct lp_api_error *e);
/* 400 bad name, 404 not loaded. */
int lp_api_lora_unload(struct lp_server *s, const char *name, struct lp_api_error *e);

/* lp_source_config's in_use for the agent: whether an adapter loaded in
 * server's worker (a struct lp_server *) comes from cache entry
 * entry_name, so that the cache never evicts it (the disk tier reloads
 * from it). */
bool lp_api_source_in_use(void *server, const char *entry_name);

/* The JSON description of a loaded adapter (docs/api.md 5.1's body fields). */
json_t *lp_api_lora_json(const struct lp_adapter_summary *a);

#endif
