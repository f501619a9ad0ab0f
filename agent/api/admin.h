/* The admin API (docs/api.md, section 5): adapter management (/v1/loras and vLLM's
 * /v1/load_lora_adapter, /v1/unload_lora_adapter), Prometheus metrics,
 * health and readiness. Each handler returns the HTTP status it sent. */
#ifndef LP_API_ADMIN_H
#define LP_API_ADMIN_H

#include <jansson.h>

#include "agent/api/errors.h"
#include "agent/api/loras.h"
#include "agent/api/server.h"

int lp_admin_health(struct lp_call *c);
int lp_admin_ready(struct lp_call *c);
int lp_admin_metrics(struct lp_call *c);
/* POST /v1/loras, GET /v1/loras, GET and DELETE /v1/loras/{name}. */
int lp_admin_loras_load(struct lp_call *c);
int lp_admin_loras_list(struct lp_call *c);
int lp_admin_loras_get(struct lp_call *c);
int lp_admin_loras_delete(struct lp_call *c);
/* The bodies of POST /v1/loras and POST /v1/load_lora_adapter, checked
 * without touching the server (the fuzz targets call these): 0 with a
 * filled (its strings borrow body; a->creds points at cr when the body
 * has source.credentials), or a negative 400 with e. */
int lp_admin_loras_parse(json_t *body, struct lp_lora_load_args *a,
                         struct lp_source_credentials *cr, struct lp_api_error *e);
int lp_admin_vllm_load_parse(json_t *body, struct lp_lora_load_args *a, struct lp_api_error *e);
/* vLLM's endpoints, with vLLM's status codes and text replies. */
int lp_admin_vllm_load(struct lp_call *c);
int lp_admin_vllm_unload(struct lp_call *c);

#endif
