/* The admin API (DESIGN 3.3): adapter management (/v1/loras and vLLM's
 * /v1/load_lora_adapter, /v1/unload_lora_adapter), Prometheus metrics,
 * health and readiness. Each handler returns the HTTP status it sent. */
#ifndef LP_API_ADMIN_H
#define LP_API_ADMIN_H

#include "agent/api/server.h"

int lp_admin_health(struct lp_call *c);
int lp_admin_ready(struct lp_call *c);
int lp_admin_metrics(struct lp_call *c);
/* POST /v1/loras, GET /v1/loras, GET and DELETE /v1/loras/{name}. */
int lp_admin_loras_load(struct lp_call *c);
int lp_admin_loras_list(struct lp_call *c);
int lp_admin_loras_get(struct lp_call *c);
int lp_admin_loras_delete(struct lp_call *c);
/* vLLM's endpoints, with vLLM's status codes and text replies. */
int lp_admin_vllm_load(struct lp_call *c);
int lp_admin_vllm_unload(struct lp_call *c);

#endif
