/* The operator's client for the agents' HTTP APIs (docs/api.md, sections 3 and 5):
 * GET /v1/models on the public port (which base model a pod serves),
 * POST/GET/DELETE /v1/loras on the admin port. Every call has a connect
 * timeout and an overall timeout; bodies are capped at 4 MiB. Thread-safe:
 * a call borrows a curl handle kept for its agent's port, so that calls to
 * one agent reuse a kept-alive connection (up to 256 ports; more are
 * served by handles of their own). */
#ifndef LP_OPERATOR_RECONCILE_AGENTS_H
#define LP_OPERATOR_RECONCILE_AGENTS_H

#include <stdbool.h>

#include <jansson.h>

#include "common/err.h"

/* Where one agent listens: the pod IP and the container ports named
 * "http" (public, default 8000) and "admin" (default 8001). */
struct agent_addr {
	char host[64];
	int http_port;
	int admin_port;
};

struct agent_opts {
	double connect_timeout; /* seconds; default 2 */
	double timeout;         /* whole request, seconds */
	const char *token;      /* bearer token for the admin API, or NULL */
};

/* What a call answered, also on failure. */
struct agent_reply {
	long http_status;  /* 0 when no answer */
	char message[256]; /* error message from the body, or transport error */
};

/* What a loaded adapter is, as the agent reports it. */
struct agent_lora {
	char source[1024];
	char sha256[65];
};

/* The id of the base model the agent serves (the /v1/models entry whose
 * parent is null) into base. */
int agent_base_model(const struct agent_addr *a, const struct agent_opts *o, char *base,
                     size_t size, struct agent_reply *r, struct lp_err *err);

/* POST /v1/loras. 0 on 200/201 with *out filled from the body; else
 * -EEXIST for 409 (loaded from another source), -EIO for other statuses
 * (r says which), or the transport error. sha256 may be NULL; creds (NULL
 * for none) is sent as source.credentials, an object of AWS_ and HF_
 * variables (from the resource's secretRef). */
int agent_load(const struct agent_addr *a, const struct agent_opts *o, const char *name,
               const char *uri, const char *sha256, json_t *creds, bool inplace,
               struct agent_lora *out, struct agent_reply *r, struct lp_err *err);

/* GET /v1/loras: *loras is a new object name -> {source, sha256, ...}. */
int agent_list(const struct agent_addr *a, const struct agent_opts *o, json_t **loras,
               struct agent_reply *r, struct lp_err *err);

/* The source uri and digest of entry (an element of agent_list's object
 * or a load reply); false when the entry has no source. */
bool agent_lora_from_json(json_t *entry, struct agent_lora *out);

/* DELETE /v1/loras/{name} (name percent-encoded). 0 on 200 and on 404
 * (not loaded is what we wanted). */
int agent_unload(const struct agent_addr *a, const struct agent_opts *o, const char *name,
                 struct agent_reply *r, struct lp_err *err);

/* Closes the kept connections and frees their handles (at exit, after
 * every call has returned). */
void agent_client_cleanup(void);

#endif
