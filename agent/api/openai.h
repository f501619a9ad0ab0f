/* The public OpenAI-compatible API (docs/api.md, section 3): GET /v1/models,
 * GET /v1/models/{id}, POST /v1/completions and POST /v1/chat/completions,
 * streamed as server-sent events or answered whole. Each handler returns
 * the HTTP status it sent. */
#ifndef LP_API_OPENAI_H
#define LP_API_OPENAI_H

#include "agent/api/server.h"

int lp_openai_models(struct lp_call *c);
/* GET /v1/models/{id}: the card /v1/models lists for id (the base model or
 * an adapter; the rest of the path, '/' included), 404 model_not_found
 * otherwise. */
int lp_openai_model(struct lp_call *c);
int lp_openai_completions(struct lp_call *c);
int lp_openai_chat(struct lp_call *c);

#endif
